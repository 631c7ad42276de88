//! The gateway's pure parts: who asks and who decides, how an agent's request becomes
//! an exact new configuration, the deterministic policy that runs before any human,
//! the risk scores, and the diff an approver is shown. Nothing here touches the store;
//! `store::changes` keeps the requests and applies them.
//!
//! A change is always a whole new configuration text. What an operator approves is
//! that text (by its SHA-256); what is applied is that text, re-hashed at the moment it
//! is applied.

use std::collections::HashSet;

use queue_proto::ids::SessionId;
use queue_proto::items::{ChangeTarget, ToolName};
use sha2::{Digest, Sha256};
use toml_edit::{DocumentMut, Item, Value as TomlValue};

use crate::config::{Config, RuntimeChoice};

// moved: remove once callers use crate::operator::Identity
pub use crate::operator::Identity;

/// Who asked for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// An agent, through its session's proxy socket.
    Agent(SessionId),
    /// An operator, through `changes propose`.
    Operator(Identity),
    /// A hand edit of the configuration file found at start.
    ConfigFile,
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requester::Agent(s) => write!(f, "agent:{s}"),
            Requester::Operator(i) => write!(f, "{i}"),
            Requester::ConfigFile => f.write_str("config-file"),
        }
    }
}

/// A rule that refused a change, and why, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub rule: &'static str,
    pub why: String,
}

fn deny<T>(rule: &'static str, why: impl Into<String>) -> Result<T, Denial> {
    Err(Denial {
        rule,
        why: why.into(),
    })
}

/// The SHA-256 of a configuration text, as lowercase hex.
pub fn text_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The target's name as stored and shown.
pub fn target_name(t: ChangeTarget) -> &'static str {
    match t {
        ChangeTarget::Instructions => "instructions",
        ChangeTarget::Tools => "tools",
        ChangeTarget::Model => "model",
        ChangeTarget::Endpoints => "endpoints",
        ChangeTarget::Budgets => "budgets",
        ChangeTarget::AllowedUsers => "allowed_users",
        ChangeTarget::SandboxLimits => "sandbox_limits",
    }
}

/// The keys an agent may set in the sections it may ask about. Anything naming a host
/// path (a key file, `runsc`, the agent binary) or the runtime is never an agent's to ask.
const AGENT_MODEL_KEYS: [&str; 3] = ["provider", "base_url", "model"];
const AGENT_BUDGET_KEYS: [&str; 3] = ["requests_per_minute", "tokens_per_day", "bytes_per_day"];
const AGENT_SANDBOX_KEYS: [&str; 2] = ["memory_mib", "idle_stop_secs"];

/// The whole configuration text an agent's request would make from `current`: the one
/// targeted value replaced, everything else (comments included) as it was.
pub fn agent_candidate(current: &str, target: ChangeTarget, after: &str) -> Result<String, Denial> {
    let mut doc: DocumentMut = current.parse().map_err(|_| Denial {
        rule: "parse",
        why: "the approved configuration does not parse".into(),
    })?;
    let json = || -> Result<serde_json::Value, Denial> {
        serde_json::from_str(after).map_err(|_| Denial {
            rule: "parse",
            why: format!("{} needs a JSON value", target_name(target)),
        })
    };
    match target {
        ChangeTarget::Instructions => {
            section(&mut doc, &["agent"])?.insert("instructions", toml_edit::value(after));
        }
        ChangeTarget::Endpoints => {
            section(&mut doc, &["model"])?.insert("base_url", toml_edit::value(after.trim()));
        }
        ChangeTarget::Tools => {
            let tools: Vec<ToolName> = serde_json::from_value(json()?).map_err(|_| Denial {
                rule: "parse",
                why: "tools needs a JSON list of known tool names".into(),
            })?;
            let mut array = toml_edit::Array::new();
            // Spelled as the configuration spells them: through ToolName's own serde names.
            for t in serde_json::to_value(&tools)
                .map_err(|_| Denial {
                    rule: "parse",
                    why: "tools could not be written".into(),
                })?
                .as_array()
                .into_iter()
                .flatten()
            {
                array.push(t.as_str().unwrap_or_default());
            }
            section(&mut doc, &["agent"])?.insert("tools", toml_edit::value(array));
        }
        ChangeTarget::AllowedUsers => {
            let users: Vec<i64> = serde_json::from_value(json()?).map_err(|_| Denial {
                rule: "parse",
                why: "allowed_users needs a JSON list of Telegram user ids".into(),
            })?;
            let Some(tg) = doc
                .get_mut("channels")
                .and_then(|c| c.get_mut("telegram"))
                .and_then(Item::as_table_like_mut)
            else {
                return deny("no_channel", "the Telegram channel is not configured");
            };
            let array: toml_edit::Array = users.iter().copied().collect();
            tg.insert("allowed_users", toml_edit::value(array));
        }
        ChangeTarget::Model => merge(&mut doc, "model", &AGENT_MODEL_KEYS, json()?)?,
        ChangeTarget::Budgets => merge(&mut doc, "budgets", &AGENT_BUDGET_KEYS, json()?)?,
        ChangeTarget::SandboxLimits => merge(&mut doc, "sandbox", &AGENT_SANDBOX_KEYS, json()?)?,
    }
    Ok(doc.to_string())
}

/// The table at `path`, created if missing.
fn section<'d>(
    doc: &'d mut DocumentMut,
    path: &[&str],
) -> Result<&'d mut dyn toml_edit::TableLike, Denial> {
    let mut item = doc.as_item_mut();
    for key in path {
        let table = item.as_table_like_mut().ok_or_else(|| Denial {
            rule: "parse",
            why: format!("{key} is not a table in the approved configuration"),
        })?;
        item = table.entry(key).or_insert(toml_edit::table());
    }
    item.as_table_like_mut().ok_or_else(|| Denial {
        rule: "parse",
        why: "not a table in the approved configuration".into(),
    })
}

/// Sets the given keys of table `name` from a JSON object; keys outside `allowed` are
/// refused, whatever their value.
fn merge(
    doc: &mut DocumentMut,
    name: &str,
    allowed: &[&str],
    value: serde_json::Value,
) -> Result<(), Denial> {
    let serde_json::Value::Object(map) = value else {
        return deny("parse", format!("{name} needs a JSON object"));
    };
    if map.is_empty() {
        return deny("unchanged", "the request changes nothing");
    }
    let table = section(doc, &[name])?;
    for (key, v) in map {
        if !allowed.contains(&key.as_str()) {
            // The key is the agent's: kept short and printable in the record.
            let key: String = key
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(40)
                .collect();
            return deny("agent_scope", format!("an agent may not set {name}.{key}"));
        }
        let v: TomlValue = match v {
            serde_json::Value::String(s) => s.into(),
            serde_json::Value::Bool(b) => b.into(),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => i.into(),
                None => return deny("parse", format!("{name}.{key} must be an integer")),
            },
            _ => {
                return deny(
                    "parse",
                    format!("{name}.{key} must be a string or a number"),
                );
            }
        };
        table.insert(&key, Item::Value(v));
    }
    Ok(())
}

/// The deterministic policy: plain rules with yes/no answers, before any human sees the
/// change. Returns the new configuration if no rule refuses it.
pub fn check(before: &Config, after_text: &str, by_agent: bool) -> Result<Config, Denial> {
    let raw: toml::Table = toml::from_str(after_text).map_err(|e| Denial {
        rule: "parse",
        why: format!("the new configuration does not parse: {}", e.message()),
    })?;
    if raw
        .get("sandbox")
        .and_then(|s| s.as_table())
        .is_some_and(|s| s.contains_key("network"))
    {
        return deny("sandbox_network", "the sandbox never gets a network");
    }
    let after = Config::parse(after_text).map_err(|e| Denial {
        rule: "invalid",
        why: e.to_string(),
    })?;
    if after.sandbox.runtime != RuntimeChoice::Gvisor
        && before.sandbox.runtime == RuntimeChoice::Gvisor
    {
        return deny(
            "sandbox_off",
            "turning the gVisor sandbox off is never allowed",
        );
    }
    let mut endpoints = vec![("model.base_url", after.model.base_url.clone())];
    if let Some(t) = &after.channels.telegram {
        endpoints.push(("channels.telegram.api_base", Some(t.api_base.clone())));
    }
    for (key, url) in endpoints {
        if let Some(url) = url {
            endpoint_rule(key, &url)?;
        }
    }
    let o = &after.operators;
    if o.unix_uids.is_empty() && o.telegram.is_empty() && o.tailnet.is_empty() {
        return deny(
            "no_operators",
            "a configuration without operators could never change again",
        );
    }
    if by_agent {
        let (b, a) = (&before.sandbox, &after.sandbox);
        if b.agent_binary != a.agent_binary
            || b.runsc != a.runsc
            || b.runtime != a.runtime
            || before.model.api_key_file != after.model.api_key_file
        {
            return deny(
                "agent_scope",
                "an agent may not change host paths, key files or the runtime",
            );
        }
    }
    Ok(after)
}

/// HTTPS to a host name, or plain HTTP to a loopback model server (the explicit
/// exception for local servers such as Ollama). An IP literal elsewhere is refused.
fn endpoint_rule(key: &str, url: &str) -> Result<(), Denial> {
    let Ok(u) = url::Url::parse(url) else {
        return deny("endpoint", format!("{key} is not a URL"));
    };
    if crate::model::http::is_loopback(&u) {
        return Ok(());
    }
    if matches!(u.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))) {
        return deny(
            "endpoint_ip_literal",
            format!("{key} is an IP address, not a host name"),
        );
    }
    if u.scheme() != "https" {
        return deny("endpoint_not_https", format!("{key} is not HTTPS"));
    }
    Ok(())
}

/// One operation a change performs, with its weight toward the risk score.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Operation {
    pub what: String,
    pub weight: f64,
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

/// The operations a change performs and its risk score. Weights (SECURITY.md lists
/// them): the runtime, a host path or tailscaled's socket 0.9, operators added 0.9, the
/// model endpoint 0.8,
/// the model or provider 0.6, a key file 0.6, people allowed to talk added 0.6, the
/// admin API turned on or moved 0.6, a channel added or moved 0.5, tools added 0.4,
/// instructions 0.3, budgets raised 0.3, sandbox limits raised 0.2, operators removed
/// 0.3, anything else 0.05; an agent as the requester adds 0.2.
pub fn change_risk(before: &Config, after: &Config, by_agent: bool) -> (Vec<Operation>, f64) {
    let mut ops = Vec::new();
    let mut op = |changed: bool, what: &str, weight: f64| {
        if changed {
            ops.push(Operation {
                what: what.to_owned(),
                weight,
            });
        }
    };
    let (b, a) = (before, after);
    op(
        b.sandbox.runtime != a.sandbox.runtime,
        "sandbox.runtime changed",
        0.9,
    );
    op(
        b.sandbox.runsc != a.sandbox.runsc || b.sandbox.agent_binary != a.sandbox.agent_binary,
        "a host binary path changed",
        0.9,
    );
    let (bo, ao) = (&b.operators, &a.operators);
    op(
        added(&bo.telegram, &ao.telegram)
            || added(&bo.unix_uids, &ao.unix_uids)
            || added(&bo.tailnet, &ao.tailnet),
        "operators added",
        0.9,
    );
    op(
        added(&ao.telegram, &bo.telegram)
            || added(&ao.unix_uids, &bo.unix_uids)
            || added(&ao.tailnet, &bo.tailnet),
        "operators removed",
        0.3,
    );
    op(
        b.model.base_url != a.model.base_url,
        "model endpoint changed",
        0.8,
    );
    op(
        b.model.provider != a.model.provider || b.model.model != a.model.model,
        "model changed",
        0.6,
    );
    op(
        b.model.api_key_file != a.model.api_key_file,
        "model key file changed",
        0.6,
    );
    let users = |c: &Config| {
        c.channels
            .telegram
            .as_ref()
            .map(|t| t.allowed_users.clone())
            .unwrap_or_default()
    };
    op(
        added(&users(b), &users(a)),
        "people allowed to talk added",
        0.6,
    );
    op(
        added(&users(a), &users(b)),
        "people allowed to talk removed",
        0.05,
    );
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
        "a channel added or moved",
        0.5,
    );
    op(
        a.admin_api.is_some() && b.admin_api != a.admin_api,
        "admin API turned on or moved",
        0.6,
    );
    // Whatever answers on this socket decides who is an operator.
    let socket = |c: &Config| c.admin_api.as_ref().map(|x| x.tailscaled_socket.clone());
    op(
        socket(a).is_some_and(|s| s != std::path::Path::new(crate::tailnet::DEFAULT_SOCKET))
            && socket(a) != socket(b),
        "tailscaled socket changed",
        0.9,
    );
    let tools = |c: &Config| c.agent.tools.iter().copied().collect::<HashSet<_>>();
    op(
        tools(a).difference(&tools(b)).next().is_some(),
        "tools added",
        0.4,
    );
    op(
        tools(b).difference(&tools(a)).next().is_some(),
        "tools removed",
        0.05,
    );
    op(
        b.agent.instructions != a.agent.instructions,
        "instructions changed",
        0.3,
    );
    op(
        b.agent.max_steps_per_turn < a.agent.max_steps_per_turn,
        "more steps per turn",
        0.1,
    );
    let (bb, ab) = (&b.budgets, &a.budgets);
    op(
        ab.requests_per_minute > bb.requests_per_minute
            || ab.tokens_per_day > bb.tokens_per_day
            || ab.bytes_per_day > bb.bytes_per_day,
        "budgets raised",
        0.3,
    );
    op(
        ab.requests_per_minute < bb.requests_per_minute
            || ab.tokens_per_day < bb.tokens_per_day
            || ab.bytes_per_day < bb.bytes_per_day,
        "budgets lowered",
        0.05,
    );
    op(
        a.sandbox.memory_mib > b.sandbox.memory_mib
            || a.sandbox.idle_stop_secs > b.sandbox.idle_stop_secs,
        "sandbox limits raised",
        0.2,
    );
    op(
        a.sandbox.memory_mib < b.sandbox.memory_mib
            || a.sandbox.idle_stop_secs < b.sandbox.idle_stop_secs,
        "sandbox limits lowered",
        0.05,
    );
    op(b.gateway != a.gateway, "gateway settings changed", 0.3);
    op(b.delivery != a.delivery, "delivery settings changed", 0.05);
    if ops.is_empty() {
        ops.push(Operation {
            what: "comments or layout only".into(),
            weight: 0.0,
        });
    }
    if by_agent {
        ops.push(Operation {
            what: "asked for by an agent".into(),
            weight: 0.2,
        });
    }
    let score = combine(ops.iter().map(|o| o.weight));
    (ops, score)
}

/// Change requests per requester per minute: beyond the limit an attempt is refused
/// without being filed, and refused attempts are recorded as one count per minute, so a
/// flood costs one audit entry a minute instead of one an attempt.
#[derive(Debug, Default)]
pub struct RateLimit {
    windows: std::collections::HashMap<String, Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: i64,
    filed: u32,
    refused: u32,
}

/// A minute whose refused attempts are to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusals {
    pub requester: String,
    pub minute_start: i64,
    pub refused: u32,
}

impl RateLimit {
    /// Whether `requester` may file one more request at `now` (seconds), at most
    /// `per_minute` a minute. Returns the finished minute's refusals to record, if any.
    pub fn admit(
        &mut self,
        requester: &str,
        now: i64,
        per_minute: u32,
    ) -> (bool, Option<Refusals>) {
        let w = self.windows.entry(requester.to_owned()).or_insert(Window {
            start: now,
            filed: 0,
            refused: 0,
        });
        let mut done = None;
        if now - w.start >= 60 {
            if w.refused > 0 {
                done = Some(Refusals {
                    requester: requester.to_owned(),
                    minute_start: w.start,
                    refused: w.refused,
                });
            }
            *w = Window {
                start: now,
                filed: 0,
                refused: 0,
            };
        }
        if w.filed < per_minute {
            w.filed += 1;
            (true, done)
        } else {
            w.refused += 1;
            (false, done)
        }
    }

    /// Ends every minute that is over at `now`, returning the refusals to record.
    pub fn flush(&mut self, now: i64) -> Vec<Refusals> {
        let mut out = Vec::new();
        self.windows.retain(|requester, w| {
            if now - w.start < 60 {
                return true;
            }
            if w.refused > 0 {
                out.push(Refusals {
                    requester: requester.clone(),
                    minute_start: w.start,
                    refused: w.refused,
                });
            }
            false
        });
        out
    }
}

/// What one agent turn did, as the control plane saw it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TurnSummary {
    /// Tool calls the model asked for, by name.
    pub tools: std::collections::BTreeMap<String, u32>,
    pub model_calls: u32,
    /// Bytes sent to the model plus reply bytes.
    pub bytes_out: u64,
    pub refusals: u32,
    pub replies: u32,
    pub change_requests: u32,
}

/// A turn's risk: 0.4 per change request, 0.3 per refusal, 0.1 per `schedule`, 0.2 when
/// more than 256 KiB left the box, 0.1 for more than 8 model calls; combined as above.
pub fn turn_risk(t: &TurnSummary) -> f64 {
    let count = |name: &str| t.tools.get(name).copied().unwrap_or(0);
    let mut w = Vec::new();
    // The model asking for the tool and the request arriving are the same attempt.
    let requests = count("request_change").max(t.change_requests);
    w.extend(std::iter::repeat_n(0.4, requests.min(20) as usize));
    w.extend(std::iter::repeat_n(0.3, t.refusals.min(20) as usize));
    w.extend(std::iter::repeat_n(0.1, count("schedule").min(20) as usize));
    if t.bytes_out > 256 * 1024 {
        w.push(0.2);
    }
    if t.model_calls > 8 {
        w.push(0.1);
    }
    combine(w)
}

/// The exact difference between two texts: the lines that differ, between the longest
/// common beginning and end, each marked `-` (before) or `+` (after), with line numbers.
pub fn diff(before: &str, after: &str) -> String {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let head = b.iter().zip(&a).take_while(|(x, y)| x == y).count();
    let tail = b[head..]
        .iter()
        .rev()
        .zip(a[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let mut out = String::new();
    if b == a {
        if before != after {
            out.push_str("(only the final newline differs)\n");
        }
        return out;
    }
    out.push_str(&format!(
        "@@ before line {}, after line {} @@\n",
        head + 1,
        head + 1
    ));
    for line in &b[head.saturating_sub(2)..head] {
        out.push_str(&format!("  {line}\n"));
    }
    for line in &b[head..b.len() - tail] {
        out.push_str(&format!("- {line}\n"));
    }
    for line in &a[head..a.len() - tail] {
        out.push_str(&format!("+ {line}\n"));
    }
    for line in &b[b.len() - tail..(b.len() - tail + 2).min(b.len())] {
        out.push_str(&format!("  {line}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CONFIG;

    const AGENT: bool = true;
    const OPERATOR: bool = false;

    fn base() -> Config {
        Config::parse(DEFAULT_CONFIG).unwrap()
    }

    #[test]
    fn an_agent_request_changes_only_its_target_and_keeps_comments() {
        let text = agent_candidate(
            DEFAULT_CONFIG,
            ChangeTarget::Instructions,
            "Be brief.\n[operators]\nunix_uids = [1000]",
        )
        .unwrap();
        let c = check(&base(), &text, AGENT).unwrap();
        assert_eq!(
            c.agent.instructions,
            "Be brief.\n[operators]\nunix_uids = [1000]"
        );
        assert_eq!(
            c.operators.unix_uids,
            vec![0],
            "no injection through the value"
        );
        assert!(text.contains("# IronClaw configuration"));
        let (ops, risk) = change_risk(&base(), &c, AGENT);
        assert_eq!(ops.len(), 2);
        assert_eq!(risk, 0.44);
        let d = diff(DEFAULT_CONFIG, &text);
        assert!(d.contains("+ instructions = "), "{d}");
    }

    #[test]
    fn the_policy_refuses_what_is_never_allowed() {
        let cases: [(ChangeTarget, &str, &str); 9] = [
            (
                ChangeTarget::SandboxLimits,
                r#"{"network": "host"}"#,
                "agent_scope",
            ),
            (
                ChangeTarget::SandboxLimits,
                r#"{"runtime": "host"}"#,
                "agent_scope",
            ),
            (
                ChangeTarget::SandboxLimits,
                r#"{"runsc": "/tmp/x"}"#,
                "agent_scope",
            ),
            (
                ChangeTarget::Model,
                r#"{"api_key_file": "/var/lib/ironclaw/master.key"}"#,
                "agent_scope",
            ),
            (
                ChangeTarget::Endpoints,
                "https://203.0.113.9",
                "endpoint_ip_literal",
            ),
            (
                ChangeTarget::Endpoints,
                "http://example.com",
                "endpoint_not_https",
            ),
            (ChangeTarget::Tools, r#"["reply", "shell"]"#, "parse"),
            (ChangeTarget::Tools, r#"["note_read"]"#, "invalid"),
            (ChangeTarget::AllowedUsers, "[1]", "no_channel"),
        ];
        for (target, after, rule) in cases {
            let got = agent_candidate(DEFAULT_CONFIG, target, after)
                .and_then(|t| check(&base(), &t, AGENT).map(|_| ()));
            assert_eq!(got.map_err(|d| d.rule), Err(rule), "{target:?} {after}");
        }
        let off = DEFAULT_CONFIG.replace("runtime = \"gvisor\"", "runtime = \"host\"");
        let by = OPERATOR;
        assert_eq!(check(&base(), &off, by).unwrap_err().rule, "sandbox_off");
        let net =
            DEFAULT_CONFIG.replace("memory_mib = 256", "memory_mib = 256\nnetwork = \"host\"");
        assert_eq!(
            check(&base(), &net, by).unwrap_err().rule,
            "sandbox_network"
        );
        let none = DEFAULT_CONFIG.replace("unix_uids = [0]", "unix_uids = []");
        assert_eq!(check(&base(), &none, by).unwrap_err().rule, "no_operators");
        let local = DEFAULT_CONFIG.replace(
            "provider = \"demo\"",
            "provider = \"openai\"\nbase_url = \"http://127.0.0.1:11434\"\nmodel = \"m\"",
        );
        let c = check(&base(), &local, by).unwrap();
        let (_, risk) = change_risk(&base(), &c, by);
        assert_eq!(risk, 0.92);
        // The admin API: on a tailnet address it is a risky change; anywhere else it
        // does not pass.
        let admin = |listen: &str| {
            DEFAULT_CONFIG.replace(
                "unix_uids = [0]",
                &format!("unix_uids = [0]\ntailnet = [\"a@example.com\"]\n\n[admin_api]\nlisten = \"{listen}\""),
            )
        };
        let on = check(&base(), &admin("100.101.1.2:8790"), by).unwrap();
        let (ops, _) = change_risk(&base(), &on, by);
        assert!(
            ops.iter()
                .any(|o| o.what == "admin API turned on or moved" && o.weight == 0.6)
        );
        assert_eq!(
            check(&base(), &admin("0.0.0.0:8790"), by).unwrap_err().rule,
            "invalid"
        );
    }

    #[test]
    fn the_rate_limit_refuses_beyond_the_minute_and_counts_every_refusal() {
        let mut r = RateLimit::default();
        let admitted = (0..10).filter(|_| r.admit("agent:a", 100, 3).0).count();
        assert_eq!(admitted, 3);
        assert!(
            r.admit("agent:b", 100, 3).0,
            "each requester has its own minute"
        );
        let (ok, done) = r.admit("agent:a", 160, 3);
        assert!(ok);
        assert_eq!(
            done,
            Some(Refusals {
                requester: "agent:a".into(),
                minute_start: 100,
                refused: 7
            })
        );
        r.admit("agent:a", 161, 1);
        assert_eq!(r.flush(200), Vec::new(), "the minute is not over");
        assert_eq!(r.flush(221).len(), 1);
        assert!(r.windows.is_empty());
    }

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

    #[test]
    fn the_diff_shows_exactly_the_changed_lines() {
        let d = diff("a\nb\nc\nd\n", "a\nb\nX\nd\n");
        assert_eq!(
            d,
            "@@ before line 3, after line 3 @@\n  a\n  b\n- c\n+ X\n  d\n"
        );
        assert_eq!(diff("a\n", "a\n"), "");
    }
}
