//! Sessions: each binds one chat of one channel to its own salt (the input of its keys)
//! and its inbox sequence. Deleting a session deletes its salt, so its files can never
//! be read again, and everything the store kept for it.

use queue_proto::ids::SessionId;
use queue_proto::keys::SessionSalt;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;

use super::state::{ChangeState, MessageState, OutboundState};
use super::{Store, StoreError};
use crate::audit::{self, AuditEvent};
use crate::gateway::Requester;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    chat TEXT NOT NULL,
    salt BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    next_inbox_seq INTEGER NOT NULL DEFAULT 1,
    UNIQUE (channel, chat)
);
";

/// Adds the per-session time zone to a store made before sessions had one.
pub(super) fn upgrade(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let has: bool = tx.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('sessions') WHERE name = 'timezone'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        tx.execute_batch("ALTER TABLE sessions ADD COLUMN timezone TEXT")?;
    }
    Ok(())
}

/// The tables holding rows of one session, emptied when it is deleted.
const SESSION_TABLES: [&str; 10] = [
    "messages",
    "outbound",
    "timers",
    "ingested",
    "turns",
    "usage",
    "attachments",
    "web_seen",
    "web_taint",
    "web_off",
];

/// How often folding the write-ahead log is tried while a reader holds it.
const WAL_FOLD_TRIES: u32 = 20;

/// A session and the chat it belongs to.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub id: SessionId,
    pub channel: String,
    pub chat: String,
    pub salt: SessionSalt,
}

/// One session's counts for `sessions list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionSummary {
    pub name: String,
    pub channel: String,
    pub chat: String,
    pub pending: u64,
    pub answered: u64,
    pub failed: u64,
    pub refused: u64,
    pub dead_lettered: u64,
    pub replies_waiting: u64,
    pub replies_dead: u64,
}

impl Store {
    /// The time zone set for session `name`, if one is (else `agent.timezone` holds).
    pub fn session_zone(&self, name: &SessionId) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT timezone FROM sessions WHERE name = ?1",
                params![name.as_str()],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Sets (or, with `None`, clears) session `name`'s time zone, with its audit entry;
    /// whether the session exists.
    pub fn set_session_zone(
        &mut self,
        name: &SessionId,
        zone: Option<&str>,
        by: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.tx()?;
        let n = tx.execute(
            "UPDATE sessions SET timezone = ?2 WHERE name = ?1",
            params![name.as_str(), zone],
        )?;
        if n > 0 {
            audit::append(
                &tx,
                now,
                AuditEvent::SessionTimeZoneSet,
                &json!({ "session": name.as_str(), "zone": zone, "by": by }),
            )?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// The session `name`, if it exists.
    pub fn session(&self, name: &SessionId) -> Result<Option<SessionRow>, StoreError> {
        session_row(&self.conn, name)
    }

    /// Every session's name.
    pub fn session_names(&self) -> Result<Vec<SessionId>, StoreError> {
        session_ids(&self.conn, "SELECT name FROM sessions ORDER BY name", [])
    }

    /// The session bound to `(channel, chat)`, created (with a fresh salt) if needed and
    /// if the channel has fewer than `max_sessions` (when given); `None` if it has as many.
    pub fn bind_within(
        &mut self,
        name: &SessionId,
        channel: &str,
        chat: &str,
        now: i64,
        max_sessions: Option<u32>,
    ) -> Result<Option<SessionRow>, StoreError> {
        if let Some(row) = self.session(name)? {
            return Ok(Some(row));
        }
        if let Some(max) = max_sessions {
            let held: i64 = self.conn.query_row(
                "SELECT count(*) FROM sessions WHERE channel = ?1",
                params![channel],
                |r| r.get(0),
            )?;
            if held >= i64::from(max) {
                return Ok(None);
            }
        }
        self.bind(name, channel, chat, now).map(Some)
    }

    /// The session bound to `(channel, chat)`, created (with a fresh salt) if needed.
    pub fn bind(
        &mut self,
        name: &SessionId,
        channel: &str,
        chat: &str,
        now: i64,
    ) -> Result<SessionRow, StoreError> {
        if let Some(row) = self.session(name)? {
            return Ok(row);
        }
        let salt = SessionSalt::generate().map_err(|_| StoreError::NoRandomness)?;
        let tx = self.tx()?;
        tx.execute(
            "INSERT INTO sessions (name, channel, chat, salt, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name.as_str(), channel, chat, salt.expose_secret().as_slice(), now],
        )?;
        audit::append(
            &tx,
            now,
            AuditEvent::SessionCreated,
            &json!({ "session": name.as_str(), "channel": channel }),
        )?;
        tx.commit()?;
        Ok(SessionRow {
            id: name.clone(),
            channel: channel.to_owned(),
            chat: chat.to_owned(),
            salt,
        })
    }

    /// Counts for every session, plus a line (empty name) for messages refused before
    /// reaching a session.
    pub fn summaries(&self) -> Result<Vec<SessionSummary>, StoreError> {
        let mut out: Vec<SessionSummary> = Vec::new();
        let mut stmt = self
            .conn
            .prepare("SELECT name, channel, chat FROM sessions ORDER BY name")?;
        let rows: Vec<(String, String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (name, channel, chat) in rows {
            let mut s = SessionSummary {
                name: name.clone(),
                channel,
                chat,
                ..Default::default()
            };
            self.count_into(&mut s, Some(&name))?;
            out.push(s);
        }
        let mut unrouted = SessionSummary::default();
        self.count_into(&mut unrouted, None)?;
        if unrouted != SessionSummary::default() {
            out.push(unrouted);
        }
        Ok(out)
    }

    fn count_into(&self, s: &mut SessionSummary, session: Option<&str>) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT state, count(*) FROM messages WHERE session IS ?1 GROUP BY state")?;
        for row in stmt.query_map(params![session], |r| {
            Ok((r.get::<_, MessageState>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (state, n) = row?;
            let n = n as u64;
            match state {
                MessageState::Received | MessageState::Published => s.pending += n,
                MessageState::Answered => s.answered += n,
                MessageState::Failed => s.failed += n,
                MessageState::Refused => s.refused += n,
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT state, count(*) FROM outbound WHERE session IS ?1 GROUP BY state")?;
        for row in stmt.query_map(params![session], |r| {
            Ok((r.get::<_, OutboundState>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (state, n) = row?;
            match state {
                OutboundState::Pending | OutboundState::Sending => s.replies_waiting += n as u64,
                OutboundState::Dead => s.replies_dead += n as u64,
                OutboundState::Sent => {}
            }
        }
        Ok(())
    }

    /// Deletes `session`: its row and salt (so its keys can never be derived again),
    /// its messages, replies, timers and records, with an audit entry. Returns its
    /// counts as they were.
    pub fn delete_session(
        &mut self,
        session: &SessionId,
        now: i64,
    ) -> Result<Option<SessionSummary>, StoreError> {
        let Some(summary) = self
            .summaries()?
            .into_iter()
            .find(|s| s.name == session.as_str())
        else {
            return Ok(None);
        };
        let row = session_row(&self.conn, session)?.ok_or(StoreError::BadSession)?;
        let requester = Requester::Agent(session.clone()).to_string();
        let tx = self.tx()?;
        for table in SESSION_TABLES {
            tx.execute(
                &format!("DELETE FROM {table} WHERE session = ?1"),
                params![session.as_str()],
            )?;
        }
        // What its chat sent or was sent without a session (refusals and notices).
        for table in ["messages", "outbound"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE channel = ?1 AND chat = ?2"),
                params![row.channel, row.chat],
            )?;
        }
        // Its agent's change requests: their prompts, and every request but an applied
        // one, whose text is a configuration version; that one loses the agent's reason.
        tx.execute(
            "DELETE FROM prompts WHERE change_id IN (SELECT id FROM changes WHERE requester = ?1)",
            params![requester],
        )?;
        tx.execute(
            "DELETE FROM changes WHERE requester = ?1 AND state != ?2",
            params![requester, ChangeState::Applied],
        )?;
        tx.execute(
            "UPDATE changes SET reason = '' WHERE requester = ?1",
            params![requester],
        )?;
        tx.execute(
            "DELETE FROM sessions WHERE name = ?1",
            params![session.as_str()],
        )?;
        audit::append(
            &tx,
            now,
            AuditEvent::SessionDeleted,
            &json!({ "session": session.as_str(), "pending": summary.pending,
                     "replies_waiting": summary.replies_waiting }),
        )?;
        tx.commit()?;
        Ok(Some(summary))
    }

    /// Folds the write-ahead log back into the database and empties it, so pages that
    /// held deleted rows (a session's salt among them) leave it; secure_delete has
    /// overwritten them in the database. Tried a few times while a reader holds it.
    pub fn fold_wal(&mut self) -> Result<(), StoreError> {
        for _ in 0..WAL_FOLD_TRIES {
            let busy: i64 = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
            if busy == 0 {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(StoreError::WalBusy)
    }
}

/// The session names a query selects, each validated.
pub(super) fn session_ids(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<SessionId>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let names = stmt.query_map(params, |r| r.get::<_, String>(0))?;
    names
        .map(|n| SessionId::try_from(n?.as_str()).map_err(|_| StoreError::BadSession))
        .collect()
}

pub(super) fn session_row(
    conn: &Connection,
    name: &SessionId,
) -> Result<Option<SessionRow>, StoreError> {
    let row: Option<(String, String, Vec<u8>)> = conn
        .query_row(
            "SELECT channel, chat, salt FROM sessions WHERE name = ?1",
            params![name.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((channel, chat, salt)) = row else {
        return Ok(None);
    };
    let salt: [u8; 32] = salt.try_into().map_err(|_| StoreError::BadSession)?;
    Ok(Some(SessionRow {
        id: name.clone(),
        channel,
        chat,
        salt: SessionSalt::from_bytes(salt),
    }))
}

#[cfg(test)]
mod tests {
    use crate::store::testing::{accept, id, master, store};

    #[test]
    fn deleting_a_session_removes_its_salt_and_records() {
        let (_d, mut s) = store();
        accept(&mut s, "a", None, 10);
        accept(&mut s, "b", None, 10);
        let gone = s.delete_session(&id("a"), 9).unwrap().unwrap();
        assert_eq!(gone.pending, 1);
        assert!(s.session(&id("a")).unwrap().is_none());
        assert!(s.session(&id("b")).unwrap().is_some());
        let left: i64 = s
            .connection()
            .query_row(
                "SELECT count(*) FROM messages WHERE session = 'a'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(left, 0);
        assert!(s.delete_session(&id("a"), 9).unwrap().is_none());
        // The store's creation, two sessions created, two messages accepted, one deletion.
        assert_eq!(s.verify_audit(&master()).unwrap(), 6);
    }

    #[test]
    fn a_session_is_bound_once_with_its_own_salt() {
        let (_d, mut s) = store();
        let a = s.bind(&id("a"), "telegram", "1", 5).unwrap();
        let again = s.bind(&id("a"), "telegram", "1", 6).unwrap();
        let b = s.bind(&id("b"), "telegram", "2", 7).unwrap();
        assert_eq!(a.salt.expose_secret(), again.salt.expose_secret());
        assert_ne!(a.salt.expose_secret(), b.salt.expose_secret());
        assert_eq!(s.session_names().unwrap(), [id("a"), id("b")]);
    }

    /// Every table's every text or blob value that holds `needle`, as `table: value`;
    /// the tables named in `except` are not read.
    fn holding(s: &crate::store::Store, needle: &str, except: &[&str]) -> Vec<String> {
        let conn = s.connection();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(tables.len() >= 10, "{tables:?}");
        let mut found = Vec::new();
        for t in tables.iter().filter(|t| !except.contains(&t.as_str())) {
            let mut stmt = conn.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
            let columns = stmt.column_count();
            let mut rows = stmt.query([]).unwrap();
            while let Some(row) = rows.next().unwrap() {
                for i in 0..columns {
                    let bytes = match row.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => {
                            b
                        }
                        _ => continue,
                    };
                    if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                        found.push(format!("{t}: {}", String::from_utf8_lossy(bytes)));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn a_deleted_session_leaves_nothing_readable_but_its_audit_counts() {
        use queue_proto::ids::Seq;
        use queue_proto::items::{AssistantReply, OutboxItem, ScheduleRequest};

        use crate::gateway::Denial;
        use crate::proxy::turn::TurnSummary;
        use crate::store::changes::NewChange;
        use crate::store::messages::{Accepted, Refusal};

        // Conversation content (messages, replies, reminders, an agent's requests) is
        // marked; what the store records of it otherwise is fixed text and metadata.
        const SECRET: &str = "marker-7f3a91";
        const NAME: &str = "zzdel7";
        let (_d, mut s) = store();
        let sid = id(NAME);
        s.bind(&sid, "telegram", NAME, 1).unwrap();
        let mut inbound = crate::store::testing::inbound(NAME, Some("u1"), SECRET);
        let Accepted::Stored(m) = s.accept(&sid, &inbound, 10, "busy", None).unwrap() else {
            panic!()
        };
        inbound.external_id = Some("u2".into());
        s.accept(&sid, &inbound, 10, "busy", None).unwrap();
        s.refuse(
            &Refusal {
                channel: "telegram",
                chat: NAME,
                external_id: Some("u3"),
                bytes: 5,
                reason: "sender not in allowed_users",
                notice: Some("This assistant is private."),
            },
            None,
            2,
        )
        .unwrap();
        s.take_batch(&sid, 3).unwrap().unwrap();
        let mut turn = TurnSummary::default();
        turn.tools.insert("reply".into(), 1);
        let items = [
            OutboxItem::AssistantReply(AssistantReply {
                in_reply_to: m as u64,
                text: SECRET.into(),
            }),
            OutboxItem::ScheduleRequest(ScheduleRequest {
                at: 10_000,
                text: SECRET.into(),
            }),
        ];
        s.ingest(&sid, Seq(1), &items, &turn, 4).unwrap();
        let next = s.next_outbound("telegram", 5).unwrap().unwrap();
        s.delivered(
            next.id,
            &crate::store::outbound::Delivered::Failed("telegram refused it".into()),
            1,
            6,
        )
        .unwrap();
        for outcome in [
            Ok((Vec::new(), 0.5)),
            Err(Denial {
                rule: "r",
                why: SECRET.into(),
            }),
        ] {
            let new = NewChange {
                requester: format!("agent:{NAME}"),
                target: "instructions".into(),
                reason: SECRET.into(),
                base_version: 1,
                after: format!("instructions = \"{SECRET}\""),
                outcome,
            };
            s.file_change(&new, 7, 60, 3, &[42]).unwrap();
        }
        // A bystander keeps everything.
        accept(&mut s, "bystander", None, 10);
        assert!(
            holding(&s, SECRET, &[]).len() >= 8,
            "{:#?}",
            holding(&s, SECRET, &[])
        );

        s.delete_session(&sid, 9).unwrap().unwrap();
        s.fold_wal().unwrap();
        assert_eq!(holding(&s, SECRET, &[]), Vec::<String>::new());
        assert_eq!(holding(&s, NAME, &["audit"]), Vec::<String>::new());
        assert!(s.session(&id("bystander")).unwrap().is_some());
        assert_eq!(
            holding(&s, "bystander", &["audit"]).len(),
            4,
            "{:#?}",
            holding(&s, "bystander", &["audit"])
        );
        assert!(
            !holding(&s, NAME, &[]).is_empty(),
            "the audit trail still counts it"
        );
    }
}
