//! The gateway's records in the control store: the versioned effective configuration,
//! change requests and their decisions, the Telegram approval prompts, and agent turns.
//! A decision and the application of what it approved are one transaction, with the
//! audit entries for both: there is no moment at which an approved request waits to be
//! applied, so nothing can be edited in between.

use queue_proto::ids::SessionId;
use rusqlite::{OptionalExtension, params};
use serde_json::json;

use super::cursors::{Cursor, set_cursor};
use super::state::{ChangeState, PROMPT_DUE_SQL, PromptState};
use super::{Store, StoreError};
use crate::audit::{self, AuditEvent};
use crate::config::Config;
use crate::gateway::risk::Operation;
use crate::gateway::{self, Denial, policy};
use crate::operator::Identity;
use crate::proxy::turn::TurnSummary;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS config_versions (
    version INTEGER PRIMARY KEY,
    text TEXT NOT NULL,
    hash TEXT NOT NULL,
    change_id TEXT,
    applied_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    requester TEXT NOT NULL,
    target TEXT NOT NULL,
    reason TEXT NOT NULL,
    base_version INTEGER NOT NULL,
    after TEXT NOT NULL,
    after_hash TEXT NOT NULL,
    risk REAL NOT NULL,
    operations TEXT NOT NULL,
    state TEXT NOT NULL,
    rule TEXT,
    decided_by TEXT,
    decided_at INTEGER,
    applied_version INTEGER
);
CREATE INDEX IF NOT EXISTS changes_by_state ON changes (state, requester);
CREATE TABLE IF NOT EXISTS prompts (
    change_id TEXT NOT NULL,
    chat INTEGER NOT NULL,
    message_id INTEGER,
    state TEXT NOT NULL,
    PRIMARY KEY (change_id, chat)
);
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    at INTEGER NOT NULL,
    summary TEXT NOT NULL,
    risk REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_session ON turns (session, id);
";

/// How much of a denied request's text is kept.
const DENIED_TEXT_CHARS: usize = 2048;

/// Where the hash of the configuration file last looked at is kept (`channel_state`).
pub const FILE_SEEN: &str = "config-file";

/// What is remembered of the file's text: filed against version `base`, or (`None`)
/// once the approved text.
pub fn seen_key(base: Option<u64>, hash: &str) -> String {
    match base {
        Some(b) => format!("{b}:{hash}"),
        None => format!("approved:{hash}"),
    }
}

/// One approved version of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigVersion {
    pub version: u64,
    pub text: String,
    pub hash: String,
}

/// A change request to file: the exact new text, and what the policy said of it.
#[derive(Debug, Clone)]
pub struct NewChange {
    pub requester: String,
    pub target: String,
    pub reason: String,
    pub base_version: u64,
    pub after: String,
    /// The operations and risk, or the rule that denied it.
    pub outcome: Result<(Vec<Operation>, f64), Denial>,
}

/// A change request as listed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChangeSummary {
    pub id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub requester: String,
    pub target: String,
    pub state: ChangeState,
    pub risk: f64,
    /// The policy rule that denied it, or why it ended without a decision.
    pub rule: Option<String>,
    pub decided_by: Option<String>,
    pub applied_version: Option<u64>,
}

/// A change request in full, for `changes show` and the approval prompts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChangeDetail {
    pub summary: ChangeSummary,
    pub reason: String,
    pub base_version: u64,
    pub before: String,
    pub after: String,
    /// SHA-256 of `after`, hex: what an approval names.
    pub after_hash: String,
    pub operations: Vec<Operation>,
}

/// What deciding did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    /// Approved and applied as this version.
    Applied(ConfigVersion),
    Rejected,
    /// Nothing changed; the refusal is in the audit trail.
    Refused(String),
}

/// An approval or a rejection.
/// Who is deciding, as the configuration in force sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Not an operator: refused before anything about the request is revealed.
    None,
    /// One of several operators: never approves their own request.
    Operator,
    /// The only operator the configuration names: may approve their own request, or
    /// nobody could (with a single operator, every operator request is their own).
    SoleOperator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject,
    /// A rejection by the request's own requester, and by nobody else.
    Withdraw,
}

/// An approval prompt for an operator's Telegram chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub change_id: String,
    pub chat: i64,
    /// Set once sent: the message whose buttons are removed after the decision.
    pub message_id: Option<i64>,
    /// The change's state now (for the closing text).
    pub change_state: ChangeState,
}

/// One recorded agent turn.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TurnRow {
    pub at: i64,
    pub risk: f64,
    pub summary: TurnSummary,
}

fn change_id() -> Result<String, StoreError> {
    let mut n = [0u8; 8];
    getrandom::getrandom(&mut n).map_err(|_| StoreError::NoRandomness)?;
    Ok(format!("c{}", hex::encode(n)))
}

const SUMMARY_COLUMNS: &str = "id, created_at, expires_at, requester, target, state, risk, rule,
    decided_by, applied_version";

fn summary_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChangeSummary> {
    Ok(ChangeSummary {
        id: r.get(0)?,
        created_at: r.get(1)?,
        expires_at: r.get(2)?,
        requester: r.get(3)?,
        target: r.get(4)?,
        state: r.get(5)?,
        risk: r.get(6)?,
        rule: r.get(7)?,
        decided_by: r.get(8)?,
        applied_version: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
    })
}

fn current(conn: &rusqlite::Connection) -> rusqlite::Result<Option<ConfigVersion>> {
    conn.query_row(
        "SELECT version, text, hash FROM config_versions ORDER BY version DESC LIMIT 1",
        [],
        |r| {
            Ok(ConfigVersion {
                version: r.get::<_, i64>(0)? as u64,
                text: r.get(1)?,
                hash: r.get(2)?,
            })
        },
    )
    .optional()
}

impl Store {
    /// The approved configuration in force.
    pub fn current_config(&self) -> Result<Option<ConfigVersion>, StoreError> {
        Ok(current(&self.conn)?)
    }

    /// The version the audit trail says is in force: the newest bootstrap or
    /// application recorded in it, as (version, hash).
    fn recorded_in_force(&self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT json_extract(detail, '$.version'), json_extract(detail, '$.hash')
                 FROM audit WHERE kind IN (?1, ?2)
                 ORDER BY seq DESC LIMIT 1",
                AuditEvent::PUTS_IN_FORCE.map(AuditEvent::as_str),
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()?)
    }

    /// Whether `v` is exactly the version the audit trail last put in force (the trail
    /// itself is checked with `verify_audit`): a version inserted, rolled back or
    /// re-bootstrapped behind the store's back is not.
    pub fn version_recorded(&self, v: &ConfigVersion) -> Result<bool, StoreError> {
        Ok(
            self.recorded_in_force()? == Some((v.version, v.hash.clone()))
                && gateway::text_hash(&v.text) == v.hash,
        )
    }

    /// Records `text` as version 1 if there is no approved version yet (the first
    /// start: the file is the bootstrap), and returns the version in force.
    pub fn bootstrap_config(&mut self, text: &str, now: i64) -> Result<ConfigVersion, StoreError> {
        if let Some(v) = self.current_config()? {
            return Ok(v);
        }
        // Versions were put in force before: their rows are gone, which is tampering, not
        // a first start. Version 1 is not made again from the file.
        if self.recorded_in_force()?.is_some() {
            return Err(StoreError::VersionsMissing);
        }
        let hash = gateway::text_hash(text);
        let tx = self.tx()?;
        tx.execute(
            "INSERT INTO config_versions (version, text, hash, change_id, applied_at)
             VALUES (1, ?1, ?2, NULL, ?3)",
            params![text, hash, now],
        )?;
        audit::append(
            &tx,
            now,
            AuditEvent::ConfigBootstrapped,
            &json!({ "version": 1, "hash": hash }),
        )?;
        tx.commit()?;
        Ok(ConfigVersion {
            version: 1,
            text: text.to_owned(),
            hash,
        })
    }

    /// Files a change request, pending (with a prompt for each Telegram operator in
    /// `notify`) or denied by the policy, with its audit entry. A requester with
    /// `max_pending` undecided requests gets this one denied. A config-file request
    /// remembers the file's hash (see [`FILE_SEEN`]).
    pub fn file_change(
        &mut self,
        new: &NewChange,
        now: i64,
        ttl: u64,
        max_pending: u32,
        notify: &[i64],
    ) -> Result<ChangeSummary, StoreError> {
        let hash = gateway::text_hash(&new.after);
        let tx = self.tx()?;
        // A text from the file is filed once: the file's hash is remembered with it.
        if new.requester == gateway::Requester::ConfigFile.to_string() {
            let seen = seen_key(Some(new.base_version), &hash);
            set_cursor(
                &tx,
                Some(Cursor {
                    name: FILE_SEEN,
                    value: &seen,
                }),
            )?;
        }
        let pending: i64 = tx.query_row(
            "SELECT count(*) FROM changes WHERE state = ?2 AND requester = ?1",
            params![new.requester, ChangeState::Pending],
            |r| r.get(0),
        )?;
        let outcome = match &new.outcome {
            Ok(o) if pending >= i64::from(max_pending) => Err(Denial {
                rule: "too_many_pending",
                why: format!("{} already has {pending} undecided requests", new.requester),
            }),
            other => other.clone(),
        };
        let (state, rule, ops, risk) = match &outcome {
            Ok((ops, risk)) => (ChangeState::Pending, None, ops.clone(), *risk),
            Err(d) => (
                ChangeState::Denied,
                Some(format!("{}: {}", d.rule, d.why)),
                Vec::new(),
                1.0,
            ),
        };
        let id = change_id()?;
        let expires_at = now.saturating_add(ttl as i64);
        // A denied request keeps only the start of its text (its hash is of the whole):
        // denials cannot be used to fill the store.
        let after = if state == ChangeState::Denied && new.after.len() > DENIED_TEXT_CHARS {
            let start: String = new.after.chars().take(DENIED_TEXT_CHARS).collect();
            format!("{start}\n… ({} bytes in all)", new.after.len())
        } else {
            new.after.clone()
        };
        tx.execute(
            "INSERT INTO changes (id, created_at, expires_at, requester, target, reason,
                 base_version, after, after_hash, risk, operations, state, rule)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                id,
                now,
                expires_at,
                new.requester,
                new.target,
                new.reason,
                new.base_version as i64,
                after,
                hash,
                risk,
                serde_json::to_string(&ops).unwrap_or_default(),
                state,
                rule
            ],
        )?;
        if state == ChangeState::Pending {
            for chat in notify {
                tx.execute(
                    "INSERT OR IGNORE INTO prompts (change_id, chat, state) VALUES (?1, ?2, ?3)",
                    params![id, chat, PromptState::Waiting],
                )?;
            }
        }
        audit::append(
            &tx,
            now,
            AuditEvent::ChangeRequested,
            &json!({ "change": id, "requester": new.requester, "target": new.target,
                     "base_version": new.base_version, "after_hash": hash, "risk": risk,
                     "state": state, "rule": outcome.as_ref().err().map(|d| d.rule),
                     "reason_bytes": new.reason.len() }),
        )?;
        tx.commit()?;
        Ok(ChangeSummary {
            id,
            created_at: now,
            expires_at,
            requester: new.requester.clone(),
            target: new.target.clone(),
            state,
            risk,
            rule,
            decided_by: None,
            applied_version: None,
        })
    }

    /// Change requests, newest first: the undecided ones, or all (at most `limit`).
    pub fn changes(&self, all: bool, limit: u32) -> Result<Vec<ChangeSummary>, StoreError> {
        // ?2 IS NULL lists every state.
        let only = (!all).then_some(ChangeState::Pending);
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM changes WHERE ?2 IS NULL OR state = ?2
             ORDER BY created_at DESC, id LIMIT ?1"
        ))?;
        let rows = stmt.query_map(params![limit, only], summary_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many change requests are undecided.
    pub fn pending_changes(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM changes WHERE state = ?1",
            [ChangeState::Pending],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// The ids of change requests that begin with `prefix` (at most `limit`), in order.
    pub fn change_ids_starting(&self, prefix: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id FROM changes WHERE substr(id, 1, length(?1)) = ?1 ORDER BY id LIMIT ?2",
        )?;
        let ids = stmt
            .query_map(rusqlite::params![prefix, limit], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// One change request in full.
    pub fn change(&self, id: &str) -> Result<Option<ChangeDetail>, StoreError> {
        let row = self
            .conn
            .query_row(
                &format!(
                    "SELECT {SUMMARY_COLUMNS}, reason, base_version, after, after_hash, operations,
                     (SELECT text FROM config_versions WHERE version = changes.base_version)
                     FROM changes WHERE id = ?1"
                ),
                [id],
                |r| {
                    Ok(ChangeDetail {
                        summary: summary_row(r)?,
                        reason: r.get(10)?,
                        base_version: r.get::<_, i64>(11)? as u64,
                        after: r.get(12)?,
                        after_hash: r.get(13)?,
                        operations: serde_json::from_str(&r.get::<_, String>(14)?)
                            .unwrap_or_default(),
                        before: r.get::<_, Option<String>>(15)?.unwrap_or_default(),
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    /// Decides change `id` as `by`, whose `standing` the caller read from the
    /// configuration in force. Approval re-checks everything in the same transaction
    /// that applies it: the request is still pending and not expired, `by` is an
    /// operator and not the requester (unless `by` is the only operator there is), the
    /// text is the one shown (`shown_hash`) and still hashes to what was filed, it was
    /// made from the version in force, and the policy still allows it. An operator may
    /// always withdraw (reject) their own request. An agent's request is never its
    /// requester's to decide: no agent is an operator. Any refusal is recorded and
    /// changes nothing else.
    pub fn decide(
        &mut self,
        id: &str,
        decision: Decision,
        by: &Identity,
        standing: Standing,
        shown_hash: Option<&str>,
        now: i64,
    ) -> Result<Decided, StoreError> {
        let tx = self.tx()?;
        let by_name = by.to_string();
        let row: Option<(ChangeState, String, i64, i64, String, String)> = tx
            .query_row(
                "SELECT state, requester, expires_at, base_version, after, after_hash
                 FROM changes WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
            .optional()?;
        let verb = match decision {
            Decision::Approve => "approve",
            Decision::Reject => "reject",
            Decision::Withdraw => "withdraw",
        };
        let refuse = |tx: rusqlite::Transaction<'_>, why: String| -> Result<Decided, StoreError> {
            audit::append(
                &tx,
                now,
                AuditEvent::DecisionRefused,
                &json!({ "change": id, "by": by_name, "decision": verb, "why": why }),
            )?;
            tx.commit()?;
            Ok(Decided::Refused(why))
        };
        // Checked before anything about the request is revealed.
        if standing == Standing::None {
            return refuse(tx, format!("{by_name} is not an operator"));
        }
        let Some((state, requester, expires_at, base, after, filed_hash)) = row else {
            return refuse(tx, "no such change request".into());
        };
        if !state.can_decide() {
            return refuse(tx, format!("the request is already {state}"));
        }
        if now >= expires_at {
            expire(&tx, id, now)?;
            return refuse(tx, "the request has expired".into());
        }
        let own = requester == by_name;
        if decision == Decision::Withdraw && !own {
            return refuse(
                tx,
                "only its requester withdraws a request; reject it instead".into(),
            );
        }
        if own && decision == Decision::Approve && standing != Standing::SoleOperator {
            return refuse(
                tx,
                "the requester may not approve their own request while the configuration names other operators: another operator approves it, or withdraw it with `ironclaw changes withdraw`".into(),
            );
        }
        // A button carries a prefix of the hash (Telegram's 64-byte limit): 128 bits.
        if shown_hash.is_some_and(|h| h.len() < 32 || !filed_hash.starts_with(h)) {
            return refuse(tx, "the request is not the one that was shown".into());
        }
        if matches!(decision, Decision::Reject | Decision::Withdraw) {
            tx.execute(
                "UPDATE changes SET state = ?4, decided_by = ?2, decided_at = ?3 WHERE id = ?1",
                params![id, by_name, now, ChangeState::Rejected],
            )?;
            close_prompts(&tx, id)?;
            audit::append(
                &tx,
                now,
                AuditEvent::ChangeRejected,
                &json!({ "change": id, "by": by_name, "withdrawn": own }),
            )?;
            tx.commit()?;
            return Ok(Decided::Rejected);
        }
        let hash = gateway::text_hash(&after);
        if hash != filed_hash {
            return refuse(
                tx,
                "the stored request no longer matches the hash it was filed with".into(),
            );
        }
        let Some(cur) = current(&tx)? else {
            return refuse(tx, "there is no approved configuration".into());
        };
        if cur.version != base as u64 {
            tx.execute(
                "UPDATE changes SET state = ?3, rule = ?2 WHERE id = ?1",
                params![
                    id,
                    format!(
                        "made from version {base}; version {} is in force",
                        cur.version
                    ),
                    ChangeState::Superseded
                ],
            )?;
            close_prompts(&tx, id)?;
            return refuse(
                tx,
                "the request was made from an older configuration".into(),
            );
        }
        let policy = Config::parse(&cur.text)
            .map_err(|e| Denial {
                rule: "invalid",
                why: e.to_string(),
            })
            .and_then(|before| policy::check(&before, &after, requester.starts_with("agent:")));
        if let Err(d) = policy {
            return refuse(tx, format!("the policy refuses it: {}: {}", d.rule, d.why));
        }
        let version = cur.version + 1;
        tx.execute(
            "INSERT INTO config_versions (version, text, hash, change_id, applied_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![version as i64, after, hash, id, now],
        )?;
        tx.execute(
            "UPDATE changes SET state = ?5, decided_by = ?2, decided_at = ?3,
             applied_version = ?4 WHERE id = ?1",
            params![id, by_name, now, version as i64, ChangeState::Applied],
        )?;
        close_prompts(&tx, id)?;
        audit::append(
            &tx,
            now,
            AuditEvent::ChangeApproved,
            &json!({ "change": id, "by": by_name, "hash": hash, "own_request": own }),
        )?;
        audit::append(
            &tx,
            now,
            AuditEvent::ChangeApplied,
            &json!({ "change": id, "version": version, "hash": hash }),
        )?;
        tx.commit()?;
        Ok(Decided::Applied(ConfigVersion {
            version,
            text: after,
            hash,
        }))
    }

    /// Marks undecided requests past their time as expired. Returns how many.
    pub fn expire_changes(&mut self, now: i64) -> Result<usize, StoreError> {
        let ids: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id FROM changes WHERE state = ?2 AND expires_at <= ?1")?;
            stmt.query_map(params![now, ChangeState::Pending], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        if ids.is_empty() {
            return Ok(0);
        }
        let tx = self.tx()?;
        for id in &ids {
            expire(&tx, id, now)?;
        }
        tx.commit()?;
        Ok(ids.len())
    }

    /// Prompts to send (no message yet) or to close (decided, buttons still shown).
    pub fn prompts_due(&self) -> Result<Vec<Prompt>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT p.change_id, p.chat, p.message_id, c.state FROM prompts p
             JOIN changes c ON c.id = p.change_id
             WHERE {PROMPT_DUE_SQL} ORDER BY c.created_at LIMIT 100"
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok(Prompt {
                change_id: r.get(0)?,
                chat: r.get(1)?,
                message_id: r.get(2)?,
                change_state: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records what became of a prompt: sent as `message_id`, or finished (closed, or
    /// given up on).
    pub fn prompt_done(
        &mut self,
        change_id: &str,
        chat: i64,
        sent_as: Option<i64>,
    ) -> Result<(), StoreError> {
        let tx = self.tx()?;
        match sent_as {
            // Decided meanwhile: the buttons just sent are removed next.
            Some(m) => tx.execute(
                "UPDATE prompts SET message_id = ?3, state = CASE WHEN
                   (SELECT state FROM changes WHERE id = ?1) = ?4 THEN ?5 ELSE ?6 END
                 WHERE change_id = ?1 AND chat = ?2",
                params![
                    change_id,
                    chat,
                    m,
                    ChangeState::Pending,
                    PromptState::Sent,
                    PromptState::Closing
                ],
            )?,
            None => tx.execute(
                "UPDATE prompts SET state = ?3 WHERE change_id = ?1 AND chat = ?2",
                params![change_id, chat, PromptState::Closed],
            )?,
        };
        tx.commit()?;
        Ok(())
    }

    /// A session's last `limit` turns, newest first.
    pub fn turns(&self, session: &SessionId, limit: u32) -> Result<Vec<TurnRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT at, risk, summary FROM turns WHERE session = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![session.as_str(), limit], |r| {
            Ok(TurnRow {
                at: r.get(0)?,
                risk: r.get(1)?,
                summary: serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or_default(),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Marks `id` expired, with its audit entry.
fn expire(tx: &rusqlite::Transaction<'_>, id: &str, now: i64) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE changes SET state = ?2, rule = 'expired before a decision' WHERE id = ?1",
        params![id, ChangeState::Expired],
    )?;
    close_prompts(tx, id)?;
    audit::append(tx, now, AuditEvent::ChangeExpired, &json!({ "change": id }))
}

fn close_prompts(tx: &rusqlite::Transaction<'_>, id: &str) -> rusqlite::Result<()> {
    // One never sent is closed; one showing its buttons has them removed.
    for (from, to) in [
        (PromptState::Waiting, PromptState::Closed),
        (PromptState::Sent, PromptState::Closing),
    ] {
        tx.execute(
            "UPDATE prompts SET state = ?3 WHERE change_id = ?1 AND state = ?2",
            params![id, from, to],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CONFIG;
    use queue_proto::items::ChangeTarget;
    use queue_proto::keys::MasterKey;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut s =
            Store::create(&dir.path().join("c.db"), &MasterKey::from_bytes([1; 32]), 1).unwrap();
        s.bootstrap_config(DEFAULT_CONFIG, 100).unwrap();
        (dir, s)
    }

    fn agent_change(s: &mut Store, instructions: &str, now: i64) -> ChangeSummary {
        let base = s.current_config().unwrap().unwrap();
        let before = Config::parse(&base.text).unwrap();
        let after = gateway::candidate::agent_candidate(
            &base.text,
            ChangeTarget::Instructions,
            instructions,
        )
        .unwrap();
        let outcome = policy::check(&before, &after, true)
            .map(|a| gateway::risk::change_risk(&before, &a, true));
        let new = NewChange {
            requester: "agent:console".into(),
            target: "instructions".into(),
            reason: "asked".into(),
            base_version: base.version,
            after,
            outcome,
        };
        s.file_change(&new, now, 60, 3, &[42]).unwrap()
    }

    const OP: Identity = Identity::Unix(0);

    #[test]
    fn only_an_operator_other_than_the_requester_applies_exactly_the_filed_text() {
        let (_d, mut s) = store();
        let c = agent_change(&mut s, "Be brief.", 200);
        assert_eq!(c.state, ChangeState::Pending);
        let detail = s.change(&c.id).unwrap().unwrap();
        assert_eq!(detail.before, DEFAULT_CONFIG);
        let stranger = Identity::Unix(1000);
        assert!(matches!(
            s.decide(
                &c.id,
                Decision::Approve,
                &stranger,
                Standing::None,
                None,
                201
            )
            .unwrap(),
            Decided::Refused(_)
        ));
        assert!(matches!(
            s.decide(
                &c.id,
                Decision::Approve,
                &OP,
                Standing::Operator,
                Some("00"),
                201
            )
            .unwrap(),
            Decided::Refused(_)
        ));
        // An edit behind the gateway's back: refused, nothing applied.
        s.connection()
            .execute(
                "UPDATE changes SET after = after || '\n# edited' WHERE id = ?1",
                [&c.id],
            )
            .unwrap();
        assert!(matches!(
            s.decide(&c.id, Decision::Approve, &OP, Standing::Operator, None, 202)
                .unwrap(),
            Decided::Refused(_)
        ));
        assert_eq!(s.current_config().unwrap().unwrap().version, 1);
        s.connection()
            .execute(
                "UPDATE changes SET after = ?2 WHERE id = ?1",
                params![c.id, detail.after],
            )
            .unwrap();
        let Decided::Applied(v) = s
            .decide(
                &c.id,
                Decision::Approve,
                &OP,
                Standing::Operator,
                Some(&detail.after_hash),
                203,
            )
            .unwrap()
        else {
            panic!("not applied")
        };
        assert_eq!(v.version, 2);
        assert_eq!(v.text, detail.after);
        assert!(s.version_recorded(&v).unwrap());
        // Rolled back behind the store's back: the older version is no longer the one
        // the trail put in force.
        s.connection()
            .execute("DELETE FROM config_versions WHERE version = 2", [])
            .unwrap();
        let old = s.current_config().unwrap().unwrap();
        assert!(!s.version_recorded(&old).unwrap());
        s.connection()
            .execute(
                "INSERT INTO config_versions (version, text, hash, change_id, applied_at)
                 VALUES (2, ?1, ?2, ?3, 203)",
                params![v.text, v.hash, c.id],
            )
            .unwrap();
        assert!(matches!(
            s.decide(&c.id, Decision::Approve, &OP, Standing::Operator, None, 204)
                .unwrap(),
            Decided::Refused(_)
        ));
        let prompts = s.prompts_due().unwrap();
        assert!(prompts.is_empty(), "never sent, so closed: {prompts:?}");
        s.verify_audit(&MasterKey::from_bytes([1; 32])).unwrap();
    }

    #[test]
    fn requests_expire_go_stale_and_are_limited_per_requester() {
        let (_d, mut s) = store();
        let a = agent_change(&mut s, "one", 200);
        let b = agent_change(&mut s, "two", 200);
        let _c = agent_change(&mut s, "three", 200);
        assert_eq!(agent_change(&mut s, "four", 200).state, ChangeState::Denied);
        let Decided::Applied(_) = s
            .decide(&a.id, Decision::Approve, &OP, Standing::Operator, None, 201)
            .unwrap()
        else {
            panic!()
        };
        assert!(matches!(
            s.decide(&b.id, Decision::Approve, &OP, Standing::Operator, None, 202)
                .unwrap(),
            Decided::Refused(_)
        ));
        assert_eq!(
            s.change(&b.id).unwrap().unwrap().summary.state,
            ChangeState::Superseded
        );
        assert_eq!(s.expire_changes(300).unwrap(), 1);
        assert_eq!(s.changes(false, 10).unwrap().len(), 0);
    }
}
