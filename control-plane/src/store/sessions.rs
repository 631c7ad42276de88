//! Sessions: each binds one chat of one channel to its own salt (the input of its keys)
//! and its inbox sequence. Deleting a session deletes its salt, so its files can never
//! be read again, and everything the store kept for it.

use queue_proto::ids::SessionId;
use queue_proto::keys::SessionSalt;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::json;

use super::state::{MessageState, OutboundState};
use super::{Store, StoreError};
use crate::audit::{self, AuditEvent};

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

/// The tables holding rows of one session, emptied when it is deleted.
const SESSION_TABLES: [&str; 4] = ["messages", "outbound", "timers", "ingested"];

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
    /// The session `name`, if it exists.
    pub fn session(&self, name: &SessionId) -> Result<Option<SessionRow>, StoreError> {
        session_row(&self.conn, name)
    }

    /// Every session's name.
    pub fn session_names(&self) -> Result<Vec<SessionId>, StoreError> {
        session_ids(&self.conn, "SELECT name FROM sessions ORDER BY name", [])
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
        let tx = self.tx()?;
        for table in SESSION_TABLES {
            tx.execute(
                &format!("DELETE FROM {table} WHERE session = ?1"),
                params![session.as_str()],
            )?;
        }
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
        // Fold the WAL back so the old pages (salt included) leave it.
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(Some(summary))
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
}
