//! Risk scores: a number in [0, 1] beside every change request and every agent turn, so
//! an approver sees at once what deserves a slow read. Deterministic: the weights of the
//! operations involved, all in the one table [`WEIGHTS`] (which SECURITY.md quotes),
//! combine as `1 − Π(1 − w)`, rounded to two decimals.

use std::collections::HashSet;

use queue_proto::items::ToolName;

use crate::config::Config;
use crate::proxy::turn::TurnSummary;

/// Something a change or an agent turn does that weighs on its risk; each has its row
/// in [`WEIGHTS`], at its own index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Runtime,
    HostBinary,
    OperatorsAdded,
    OperatorsRemoved,
    ModelEndpoint,
    Model,
    KeyFile,
    PeopleAdded,
    PeopleRemoved,
    Channel,
    AdminApi,
    TailscaledSocket,
    ToolsAdded,
    ToolsRemoved,
    Instructions,
    MoreSteps,
    BudgetsRaised,
    BudgetsLowered,
    SandboxLimitsRaised,
    SandboxLimitsLowered,
    GatewaySettings,
    TelegramApprovalsWidened,
    DeliverySettings,
    CommentsOnly,
    ByAgent,
    TurnChangeRequest,
    TurnRefusal,
    TurnSchedule,
    TurnBytesOut,
    TurnModelCalls,
}

/// One row of [`WEIGHTS`]: an operation, what it is called where an approver reads it,
/// its weight, and why it weighs that much.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weight {
    pub op: Op,
    pub what: &'static str,
    pub weight: f64,
    pub why: &'static str,
}

/// Every weight of a change request (the first rows, through [`Op::ByAgent`], which an
/// agent as the requester adds) and of an agent turn (the rows after it, counted from a
/// model response's tool calls to the outbox segment that ends the turn). SECURITY.md
/// quotes this table row for row, and a test holds it to that.
pub const WEIGHTS: [Weight; 30] = [
    Weight {
        op: Op::Runtime,
        what: "sandbox.runtime changed",
        weight: 0.9,
        why: "gVisor is what keeps an agent off the host kernel",
    },
    Weight {
        op: Op::HostBinary,
        what: "a host binary path changed",
        weight: 0.9,
        why: "runsc and the agent binary run on the host: whoever picks them runs code there",
    },
    Weight {
        op: Op::OperatorsAdded,
        what: "operators added",
        weight: 0.9,
        why: "an operator approves every later change",
    },
    Weight {
        op: Op::OperatorsRemoved,
        what: "operators removed",
        weight: 0.3,
        why: "fewer people can decide, and the ones left decide alone",
    },
    Weight {
        op: Op::ModelEndpoint,
        what: "model endpoint changed",
        weight: 0.8,
        why: "every conversation and the API key go there",
    },
    Weight {
        op: Op::Model,
        what: "model changed",
        weight: 0.6,
        why: "another model or provider reads everything and drives the agent",
    },
    Weight {
        op: Op::KeyFile,
        what: "model key file changed",
        weight: 0.6,
        why: "the control plane reads that file and sends what it holds upstream",
    },
    Weight {
        op: Op::PeopleAdded,
        what: "people allowed to talk added",
        weight: 0.6,
        why: "a new person can drive the agent and read its answers",
    },
    Weight {
        op: Op::PeopleRemoved,
        what: "people allowed to talk removed",
        weight: 0.05,
        why: "it only narrows who is heard",
    },
    Weight {
        op: Op::Channel,
        what: "a channel added or moved",
        weight: 0.5,
        why: "a new way in for messages and a new place replies go",
    },
    Weight {
        op: Op::AdminApi,
        what: "admin API turned on or moved",
        weight: 0.6,
        why: "a new way in for operators, over the network",
    },
    Weight {
        op: Op::TailscaledSocket,
        what: "tailscaled socket changed",
        weight: 0.9,
        why: "whatever answers on it decides who is an operator of the admin API",
    },
    Weight {
        op: Op::ToolsAdded,
        what: "tools added",
        weight: 0.4,
        why: "the agent can do more than before",
    },
    Weight {
        op: Op::ToolsRemoved,
        what: "tools removed",
        weight: 0.05,
        why: "the agent can do less",
    },
    Weight {
        op: Op::Instructions,
        what: "instructions changed",
        weight: 0.3,
        why: "they steer everything the agent does",
    },
    Weight {
        op: Op::MoreSteps,
        what: "more steps per turn",
        weight: 0.1,
        why: "a turn may call the model and tools more often",
    },
    Weight {
        op: Op::BudgetsRaised,
        what: "budgets raised",
        weight: 0.3,
        why: "more spending and more bytes out before anything is stopped",
    },
    Weight {
        op: Op::BudgetsLowered,
        what: "budgets lowered",
        weight: 0.05,
        why: "it only stops spending sooner",
    },
    Weight {
        op: Op::SandboxLimitsRaised,
        what: "sandbox limits raised",
        weight: 0.2,
        why: "more memory or a longer life for each sandbox",
    },
    Weight {
        op: Op::SandboxLimitsLowered,
        what: "sandbox limits lowered",
        weight: 0.05,
        why: "it only stops sandboxes sooner",
    },
    Weight {
        op: Op::GatewaySettings,
        what: "gateway settings changed",
        weight: 0.3,
        why: "how long requests wait and how many may be filed",
    },
    Weight {
        op: Op::TelegramApprovalsWidened,
        what: "riskier changes approvable from Telegram",
        weight: 0.9,
        why: "Telegram's server says who pressed a button; raising the limit lets it carry more",
    },
    Weight {
        op: Op::DeliverySettings,
        what: "delivery settings changed",
        weight: 0.05,
        why: "timeouts and retries of replies, nothing an agent gains",
    },
    Weight {
        op: Op::CommentsOnly,
        what: "comments or layout only",
        weight: 0.0,
        why: "the configuration in force stays the same",
    },
    Weight {
        op: Op::ByAgent,
        what: "asked for by an agent",
        weight: 0.2,
        why: "the requester is what the gateway constrains",
    },
    Weight {
        op: Op::TurnChangeRequest,
        what: "a turn: each change request (at most 20)",
        weight: 0.4,
        why: "an agent asking to change what it is or can do",
    },
    Weight {
        op: Op::TurnRefusal,
        what: "a turn: each proxy refusal (at most 20)",
        weight: 0.3,
        why: "the agent tried something its proxy would not do",
    },
    Weight {
        op: Op::TurnSchedule,
        what: "a turn: each schedule call (at most 20)",
        weight: 0.1,
        why: "a reminder acts later, when nobody asked",
    },
    Weight {
        op: Op::TurnBytesOut,
        what: "a turn: more than 256 KiB out",
        weight: 0.2,
        why: "that much leaving the box in one turn may be data walking out",
    },
    Weight {
        op: Op::TurnModelCalls,
        what: "a turn: more than 8 model calls",
        weight: 0.1,
        why: "a long loop costs money and may be probing",
    },
];

// Each row sits at its operation's index and the last operation closes the table, so
// `Op::row` is a plain index and a row missing or out of place does not compile.
const _: () = {
    let mut i = 0;
    while i < WEIGHTS.len() {
        assert!(WEIGHTS[i].op as usize == i, "WEIGHTS is in the order of Op");
        i += 1;
    }
    assert!(Op::TurnModelCalls as usize + 1 == WEIGHTS.len());
};

impl Op {
    /// This operation's row of [`WEIGHTS`].
    pub fn row(self) -> &'static Weight {
        &WEIGHTS[self as usize]
    }

    fn weight(self) -> f64 {
        self.row().weight
    }
}

/// Most of each counted thing a turn's score takes in.
const TURN_COUNT_CAP: u32 = 20;
/// Bytes out of the box in one turn beyond which it weighs.
const TURN_BYTES_OUT: u64 = 256 * 1024;
/// Model calls in one turn beyond which it weighs.
const TURN_MODEL_CALLS: u32 = 8;

/// One operation a change performs, with its weight toward the risk score.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Operation {
    pub what: String,
    pub weight: f64,
}

impl Operation {
    fn of(op: Op) -> Operation {
        let row = op.row();
        Operation {
            what: row.what.to_owned(),
            weight: row.weight,
        }
    }
}

/// Combines independent weights: `1 − Π(1 − w)`, rounded to two decimals, in [0, 1].
fn combine(weights: impl IntoIterator<Item = f64>) -> f64 {
    let keep: f64 = weights
        .into_iter()
        .map(|w| 1.0 - w.clamp(0.0, 1.0))
        .product();
    ((1.0 - keep) * 100.0).round() / 100.0
}

/// Whether `after` holds anything `before` does not.
fn added<T: PartialEq>(before: &[T], after: &[T]) -> bool {
    after.iter().any(|v| !before.contains(v))
}

/// The operations a change performs, in the order of [`WEIGHTS`], and its risk score.
pub fn change_risk(before: &Config, after: &Config, by_agent: bool) -> (Vec<Operation>, f64) {
    let mut ops = Vec::new();
    let mut op = |changed: bool, what: Op| {
        if changed {
            ops.push(Operation::of(what));
        }
    };
    let (b, a) = (before, after);
    op(b.sandbox.runtime != a.sandbox.runtime, Op::Runtime);
    op(
        b.sandbox.runsc != a.sandbox.runsc || b.sandbox.agent_binary != a.sandbox.agent_binary,
        Op::HostBinary,
    );
    let (bo, ao) = (&b.operators, &a.operators);
    op(
        added(&bo.telegram, &ao.telegram)
            || added(&bo.unix_uids, &ao.unix_uids)
            || added(&bo.tailnet, &ao.tailnet),
        Op::OperatorsAdded,
    );
    op(
        added(&ao.telegram, &bo.telegram)
            || added(&ao.unix_uids, &bo.unix_uids)
            || added(&ao.tailnet, &bo.tailnet),
        Op::OperatorsRemoved,
    );
    op(b.model.base_url != a.model.base_url, Op::ModelEndpoint);
    op(
        b.model.provider != a.model.provider || b.model.model != a.model.model,
        Op::Model,
    );
    op(b.model.api_key_file != a.model.api_key_file, Op::KeyFile);
    let users = |c: &Config| {
        c.channels
            .telegram
            .as_ref()
            .map(|t| t.allowed_users.clone())
            .unwrap_or_default()
    };
    op(added(&users(b), &users(a)), Op::PeopleAdded);
    op(added(&users(a), &users(b)), Op::PeopleRemoved);
    let tg = |c: &Config| {
        c.channels
            .telegram
            .as_ref()
            .map(|t| (t.token_file.clone(), t.api_base.clone()))
    };
    let bridge = |c: &Config| {
        c.channels
            .bridge
            .as_ref()
            .map(|t| (t.token_file.clone(), t.listen))
    };
    op(
        (tg(a).is_some() && tg(b) != tg(a)) || (bridge(a).is_some() && bridge(b) != bridge(a)),
        Op::Channel,
    );
    op(
        a.admin_api.is_some() && b.admin_api != a.admin_api,
        Op::AdminApi,
    );
    // Whatever answers on this socket decides who is an operator.
    let socket = |c: &Config| c.admin_api.as_ref().map(|x| x.tailscaled_socket.clone());
    op(
        socket(a).is_some_and(|s| s != std::path::Path::new(crate::tailnet::DEFAULT_SOCKET))
            && socket(a) != socket(b),
        Op::TailscaledSocket,
    );
    let tools = |c: &Config| c.agent.tools.iter().copied().collect::<HashSet<_>>();
    op(
        tools(a).difference(&tools(b)).next().is_some(),
        Op::ToolsAdded,
    );
    op(
        tools(b).difference(&tools(a)).next().is_some(),
        Op::ToolsRemoved,
    );
    op(
        b.agent.instructions != a.agent.instructions,
        Op::Instructions,
    );
    op(
        b.agent.max_steps_per_turn < a.agent.max_steps_per_turn,
        Op::MoreSteps,
    );
    let (bb, ab) = (&b.budgets, &a.budgets);
    op(
        ab.requests_per_minute > bb.requests_per_minute
            || ab.tokens_per_day > bb.tokens_per_day
            || ab.bytes_per_day > bb.bytes_per_day,
        Op::BudgetsRaised,
    );
    op(
        ab.requests_per_minute < bb.requests_per_minute
            || ab.tokens_per_day < bb.tokens_per_day
            || ab.bytes_per_day < bb.bytes_per_day,
        Op::BudgetsLowered,
    );
    op(
        a.sandbox.memory_mib > b.sandbox.memory_mib
            || a.sandbox.outbox_mib > b.sandbox.outbox_mib
            || a.sandbox.idle_stop_secs > b.sandbox.idle_stop_secs
            || a.sandbox.max_live > b.sandbox.max_live,
        Op::SandboxLimitsRaised,
    );
    op(
        a.sandbox.memory_mib < b.sandbox.memory_mib
            || a.sandbox.outbox_mib < b.sandbox.outbox_mib
            || a.sandbox.idle_stop_secs < b.sandbox.idle_stop_secs
            || a.sandbox.max_live < b.sandbox.max_live,
        Op::SandboxLimitsLowered,
    );
    op(b.gateway != a.gateway, Op::GatewaySettings);
    op(
        a.gateway.telegram_max_risk > b.gateway.telegram_max_risk,
        Op::TelegramApprovalsWidened,
    );
    op(b.delivery != a.delivery, Op::DeliverySettings);
    if ops.is_empty() {
        ops.push(Operation::of(Op::CommentsOnly));
    }
    if by_agent {
        ops.push(Operation::of(Op::ByAgent));
    }
    let score = combine(ops.iter().map(|o| o.weight));
    (ops, score)
}

/// A turn's risk, from the turn rows of [`WEIGHTS`], combined as a change's are.
pub fn turn_risk(t: &TurnSummary) -> f64 {
    let count = |name: ToolName| t.tools.get(name.as_str()).copied().unwrap_or(0);
    let each = |op: Op, n: u32| std::iter::repeat_n(op.weight(), n.min(TURN_COUNT_CAP) as usize);
    let mut w = Vec::new();
    // The model asking for the tool and the request arriving are the same attempt.
    let requests = count(ToolName::RequestChange).max(t.change_requests);
    w.extend(each(Op::TurnChangeRequest, requests));
    w.extend(each(Op::TurnRefusal, t.refusals));
    w.extend(each(Op::TurnSchedule, count(ToolName::Schedule)));
    if t.bytes_out > TURN_BYTES_OUT {
        w.push(Op::TurnBytesOut.weight());
    }
    if t.model_calls > TURN_MODEL_CALLS {
        w.push(Op::TurnModelCalls.weight());
    }
    combine(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_risk_grows_with_what_the_turn_did() {
        let mut t = TurnSummary::default();
        t.tools.insert("reply".into(), 1);
        assert_eq!(turn_risk(&t), 0.0);
        t.tools.insert("request_change".into(), 1);
        assert_eq!(turn_risk(&t), 0.4);
        t.refusals = 2;
        assert_eq!(turn_risk(&t), 0.71);
    }

    /// SECURITY.md's risk table, row for row: the lines starting with `|` under its
    /// "Risk scores" heading, header and rule excepted.
    #[test]
    fn security_md_quotes_the_weights_exactly() {
        let doc = include_str!("../../../SECURITY.md");
        let section = doc
            .split("### Risk scores")
            .nth(1)
            .and_then(|s| s.split("\n### ").next())
            .unwrap();
        let quoted: Vec<&str> = section
            .lines()
            .filter(|l| l.starts_with('|'))
            .skip(2)
            .collect();
        let rows: Vec<String> = WEIGHTS
            .iter()
            .map(|w| format!("| {} | {} | {} |", w.what, w.weight, w.why))
            .collect();
        assert_eq!(
            quoted,
            rows,
            "SECURITY.md's risk table should read:\n{}",
            rows.join("\n")
        );
    }
}
