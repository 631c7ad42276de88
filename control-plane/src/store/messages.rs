//! Messages from people: accepted (or refused) once, with the channel's cursor in the
//! same transaction; taken into inbox segments in batches; failed with a notice when
//! no answer comes. See [`MessageState`] for the lifecycle.

use queue_proto::ids::{Seq, SessionId};
use rusqlite::types::ToSql;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::json;

use super::cursors::{Cursor, set_cursor};
use super::outbound::queue_outbound;
use super::sessions::{session_ids, session_row};
use super::state::{
    MESSAGE_WAITING_SQL, MessageState, NO_FILE_PENDING_SQL, OutboundKind, READY_FILES_SQL,
};
use super::{Store, StoreError};
use crate::audit::{self, AuditEvent};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT,
    channel TEXT NOT NULL,
    chat TEXT NOT NULL,
    external_id TEXT,
    text TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    state TEXT NOT NULL,
    inbox_seq INTEGER,
    published_at INTEGER,
    reason TEXT,
    UNIQUE (channel, external_id)
);
CREATE INDEX IF NOT EXISTS messages_by_state ON messages (session, state);
";

/// Messages published to an agent in one inbox segment, at most.
pub const MAX_BATCH: usize = 64;

/// A message arriving from a channel, already checked against the channel's rules.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub channel: String,
    pub chat: String,
    /// The channel's own id for it (Telegram's update id), for de-duplication.
    pub external_id: Option<String>,
    pub text: String,
    pub received_at: i64,
    /// Files that came with it, to be fetched before it is published.
    pub files: Vec<super::attachments::IncomingFile>,
}

/// What became of an inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Stored; it will be published to the session's agent.
    Stored(i64),
    /// Seen before (same channel and external id): nothing changed.
    Duplicate,
    /// The session has too many messages waiting: refused, with a notice queued.
    Refused(i64),
    /// Refused by its channel beyond the refusals recorded a minute for its chat:
    /// counted, not recorded (the channel's cursor still moves past it).
    Counted,
}

/// A message the channel refused before it reached any session (unknown sender, too
/// large, malformed): only its metadata is kept.
#[derive(Debug, Clone)]
pub struct Refusal<'a> {
    pub channel: &'a str,
    pub chat: &'a str,
    /// The channel's own id for it, so a refused update is recorded once.
    pub external_id: Option<&'a str>,
    pub bytes: usize,
    pub reason: &'a str,
    /// A fixed text for the sender, if one is due.
    pub notice: Option<&'a str>,
}

/// A message as published to an agent.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub id: i64,
    pub text: String,
    pub received_at: i64,
    /// Files that came with it and were passed on.
    pub files: u32,
}

impl Store {
    /// Stores an inbound message for `session` (and moves the channel's cursor, in the
    /// same transaction), unless it is a duplicate or the session has too many waiting.
    pub fn accept(
        &mut self,
        session: &SessionId,
        m: &Inbound,
        max_waiting: u32,
        refusal_notice: &str,
        cursor: Option<Cursor<'_>>,
    ) -> Result<Accepted, StoreError> {
        let tx = self.tx()?;
        set_cursor(&tx, cursor)?;
        if let Some(ext) = &m.external_id {
            let seen: Option<i64> = tx
                .query_row(
                    "SELECT id FROM messages WHERE channel = ?1 AND external_id = ?2",
                    params![m.channel, ext],
                    |r| r.get(0),
                )
                .optional()?;
            if seen.is_some() {
                tx.commit()?;
                return Ok(Accepted::Duplicate);
            }
        }
        let waiting: i64 = tx.query_row(
            &format!("SELECT count(*) FROM messages WHERE session = ?1 AND {MESSAGE_WAITING_SQL}"),
            params![session.as_str()],
            |r| r.get(0),
        )?;
        // A refused message keeps no external id: the person is told to send it again,
        // and the same id must then be accepted.
        let (state, text, reason, external_id) = if waiting >= i64::from(max_waiting) {
            (
                MessageState::Refused,
                "",
                Some("too many messages waiting"),
                None,
            )
        } else {
            (
                MessageState::Received,
                m.text.as_str(),
                None,
                m.external_id.as_deref(),
            )
        };
        tx.execute(
            "INSERT INTO messages (session, channel, chat, external_id, text, bytes, received_at, state, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                session.as_str(),
                m.channel,
                m.chat,
                external_id,
                text,
                m.text.len() as i64,
                m.received_at,
                state,
                reason
            ],
        )?;
        let id = tx.last_insert_rowid();
        let refused = state == MessageState::Refused;
        if !refused {
            super::attachments::add_pending(&tx, session, id, &m.files)?;
        }
        audit::append(
            &tx,
            m.received_at,
            if refused {
                AuditEvent::MessageRefused
            } else {
                AuditEvent::MessageAccepted
            },
            &json!({ "message": id, "session": session.as_str(), "channel": m.channel,
                     "bytes": m.text.len(), "reason": reason }),
        )?;
        if refused {
            queue_outbound(
                &tx,
                &m.channel,
                &m.chat,
                Some(session),
                Some(id),
                OutboundKind::Notice,
                refusal_notice,
            )?;
            tx.commit()?;
            return Ok(Accepted::Refused(id));
        }
        tx.commit()?;
        Ok(Accepted::Stored(id))
    }

    /// Records a message that never reaches an agent: metadata only, an optional
    /// notice, and the channel's cursor moved. Returns its id, or `None` if it was
    /// recorded before.
    pub fn refuse(
        &mut self,
        r: &Refusal<'_>,
        cursor: Option<Cursor<'_>>,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let tx = self.tx()?;
        set_cursor(&tx, cursor)?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO messages (session, channel, chat, external_id, text, bytes, received_at, state, reason)
             VALUES (NULL, ?1, ?2, ?3, '', ?4, ?5, ?6, ?7)",
            params![
                r.channel,
                r.chat,
                r.external_id,
                r.bytes as i64,
                now,
                MessageState::Refused,
                r.reason
            ],
        )?;
        let recorded = (inserted == 1).then(|| tx.last_insert_rowid());
        if let Some(id) = recorded {
            audit::append(
                &tx,
                now,
                AuditEvent::MessageRefused,
                &json!({ "message": id, "channel": r.channel, "chat": r.chat, "bytes": r.bytes,
                         "reason": r.reason }),
            )?;
            if let Some(text) = r.notice {
                queue_outbound(
                    &tx,
                    r.channel,
                    r.chat,
                    None,
                    Some(id),
                    OutboundKind::Notice,
                    text,
                )?;
            }
        }
        tx.commit()?;
        Ok(recorded)
    }

    /// The state of message `id`, if it exists.
    pub fn message_state(&self, id: i64) -> Result<Option<MessageState>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT state FROM messages WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Takes up to [`MAX_BATCH`] received messages of `session` into the next inbox
    /// segment: they are marked published under its seq, which is then used up.
    pub fn take_batch(
        &mut self,
        session: &SessionId,
        now: i64,
    ) -> Result<Option<(Seq, Vec<Waiting>)>, StoreError> {
        let tx = self.tx()?;
        let mut batch = waiting(
            &tx,
            session,
            &format!("state = ?3 AND {NO_FILE_PENDING_SQL}"),
            &[&MessageState::Received],
            MAX_BATCH,
        )?;
        // A message with files travels in a segment of its own (they may be large).
        match batch.iter().position(|m| m.files > 0) {
            Some(0) => batch.truncate(1),
            Some(i) => batch.truncate(i),
            None => {}
        }
        if batch.is_empty() {
            return Ok(None);
        }
        let seq: i64 = tx.query_row(
            "SELECT next_inbox_seq FROM sessions WHERE name = ?1",
            params![session.as_str()],
            |r| r.get(0),
        )?;
        tx.execute(
            "UPDATE sessions SET next_inbox_seq = next_inbox_seq + 1 WHERE name = ?1",
            params![session.as_str()],
        )?;
        for m in &batch {
            tx.execute(
                "UPDATE messages SET state = ?4, inbox_seq = ?1, published_at = ?2 WHERE id = ?3",
                params![seq, now, m.id, MessageState::Published],
            )?;
        }
        tx.commit()?;
        Ok(Some((Seq(seq as u64), batch)))
    }

    /// Published, unanswered messages by inbox seq: after a restart, any segment whose
    /// file is missing is published again from these.
    pub fn published(&self, session: &SessionId) -> Result<Vec<(Seq, Vec<Waiting>)>, StoreError> {
        let all = waiting(
            &self.conn,
            session,
            "state = ?3",
            &[&MessageState::Published],
            usize::MAX,
        )?;
        let mut seqs: Vec<(Seq, Vec<Waiting>)> = Vec::new();
        let mut stmt = self
            .conn
            .prepare("SELECT inbox_seq FROM messages WHERE id = ?1")?;
        for m in all {
            let seq: i64 = stmt.query_row(params![m.id], |r| r.get(0))?;
            let seq = Seq(seq as u64);
            match seqs.iter_mut().find(|(s, _)| *s == seq) {
                Some((_, v)) => v.push(m),
                None => seqs.push((seq, vec![m])),
            }
        }
        Ok(seqs)
    }

    /// The lowest inbox seq still needed by `session`: that of its oldest published,
    /// unsettled message, else the next seq to be used. Segments below it are done.
    pub fn inbox_needed_from(&self, session: &SessionId) -> Result<Seq, StoreError> {
        let seq: i64 = self.conn.query_row(
            "SELECT coalesce(
                 (SELECT min(inbox_seq) FROM messages WHERE session = ?1 AND state = ?2),
                 (SELECT next_inbox_seq FROM sessions WHERE name = ?1),
                 0)",
            params![session.as_str(), MessageState::Published],
            |r| r.get(0),
        )?;
        Ok(Seq(seq as u64))
    }

    /// The texts of `session`'s messages still waiting for an answer.
    pub fn waiting_texts(&self, session: &SessionId) -> Result<Vec<String>, StoreError> {
        Ok(waiting(&self.conn, session, MESSAGE_WAITING_SQL, &[], 64)?
            .into_iter()
            .map(|m| m.text)
            .collect())
    }

    /// Sessions holding received messages not yet published.
    pub fn sessions_with_received(&self) -> Result<Vec<SessionId>, StoreError> {
        session_ids(
            &self.conn,
            "SELECT DISTINCT session FROM messages WHERE state = ?1 AND session IS NOT NULL",
            [MessageState::Received],
        )
    }

    /// Fails every waiting message of `session` (received or published) with a notice
    /// to the person: the sandbox was stopped by a limit, or gave up.
    pub fn fail_waiting(
        &mut self,
        session: &SessionId,
        reason: &str,
        notice: &str,
        now: i64,
    ) -> Result<u32, StoreError> {
        let tx = self.tx()?;
        let msgs = waiting(&tx, session, MESSAGE_WAITING_SQL, &[], usize::MAX)?;
        let n = fail(&tx, session, &msgs, reason, notice, now)?;
        tx.commit()?;
        Ok(n)
    }

    /// Fails messages published (or received and never published) before
    /// `published_before` and still unanswered.
    pub fn expire(
        &mut self,
        published_before: i64,
        notice: &str,
        now: i64,
    ) -> Result<u32, StoreError> {
        let tx = self.tx()?;
        // Published and unanswered, or never published at all (a session that could not
        // be started or prepared): both are told after the timeout.
        let overdue = "((state = ?3 AND published_at < ?4) OR (state = ?5 AND received_at < ?4))";
        let overdue_params: [&dyn ToSql; 3] = [
            &MessageState::Published,
            &published_before,
            &MessageState::Received,
        ];
        let sessions = session_ids(
            &tx,
            "SELECT DISTINCT session FROM messages WHERE session IS NOT NULL AND
             ((state = ?1 AND published_at < ?2) OR (state = ?3 AND received_at < ?2))",
            overdue_params,
        )?;
        let mut n = 0;
        for s in sessions {
            let msgs = waiting(&tx, &s, overdue, &overdue_params, usize::MAX)?;
            n += fail(&tx, &s, &msgs, "no reply in time", notice, now)?;
        }
        tx.commit()?;
        Ok(n)
    }
}

/// Up to `limit` messages of `session` that `cond` selects, oldest first. `cond` may use
/// `?3` onwards, bound to `extra`.
fn waiting(
    conn: &Connection,
    session: &SessionId,
    cond: &str,
    extra: &[&dyn ToSql],
    limit: usize,
) -> rusqlite::Result<Vec<Waiting>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(&format!(
        "SELECT id, text, received_at, {READY_FILES_SQL}
         FROM messages WHERE session = ?1 AND {cond} ORDER BY id LIMIT ?2"
    ))?;
    let session = session.as_str();
    let mut bound: Vec<&dyn ToSql> = vec![&session, &limit];
    bound.extend_from_slice(extra);
    let rows = stmt.query_map(rusqlite::params_from_iter(bound), |r| {
        Ok(Waiting {
            id: r.get(0)?,
            text: r.get(1)?,
            received_at: r.get(2)?,
            files: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// Marks `msgs` failed, each with `notice` queued for its chat, and records it.
fn fail(
    tx: &Transaction<'_>,
    session: &SessionId,
    msgs: &[Waiting],
    reason: &str,
    notice: &str,
    now: i64,
) -> rusqlite::Result<u32> {
    let Some(row) = session_row(tx, session).ok().flatten() else {
        return Ok(0);
    };
    for m in msgs {
        tx.execute(
            "UPDATE messages SET state = ?3, text = '', reason = ?2 WHERE id = ?1",
            params![m.id, reason, MessageState::Failed],
        )?;
        queue_outbound(
            tx,
            &row.channel,
            &row.chat,
            Some(session),
            Some(m.id),
            OutboundKind::Notice,
            notice,
        )?;
    }
    if !msgs.is_empty() {
        audit::append(
            tx,
            now,
            AuditEvent::MessagesFailed,
            &json!({ "session": session.as_str(), "count": msgs.len(), "reason": reason }),
        )?;
    }
    Ok(msgs.len() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{accept, id, store};

    #[test]
    fn a_message_is_stored_once_and_refused_beyond_the_waiting_limit() {
        let (_d, mut s) = store();
        assert!(matches!(
            accept(&mut s, "a", Some("1"), 2),
            Accepted::Stored(_)
        ));
        assert_eq!(accept(&mut s, "a", Some("1"), 2), Accepted::Duplicate);
        assert!(matches!(
            accept(&mut s, "a", Some("2"), 2),
            Accepted::Stored(_)
        ));
        let Accepted::Refused(m) = accept(&mut s, "a", Some("3"), 2) else {
            panic!("the third waiting message is refused");
        };
        assert_eq!(s.message_state(m).unwrap(), Some(MessageState::Refused));
        // Told to send it again, the person can: the refused id is not kept.
        assert!(matches!(
            accept(&mut s, "a", Some("3"), 10),
            Accepted::Stored(_)
        ));
        assert_eq!(s.cursor("telegram").unwrap().as_deref(), Some("9"));
        let notice = s.pending_for("telegram", Some("a"), 0, 10).unwrap();
        assert_eq!(notice.len(), 1);
        assert_eq!(
            (notice[0].kind, notice[0].text.as_str()),
            (OutboundKind::Notice, "busy")
        );
    }

    #[test]
    fn a_refused_update_is_recorded_once_with_its_notice_and_cursor() {
        let (_d, mut s) = store();
        let r = Refusal {
            channel: "telegram",
            chat: "77",
            external_id: Some("5"),
            bytes: 3,
            reason: "sender not in allowed_users",
            notice: Some("private"),
        };
        let cursor = Cursor {
            name: "telegram",
            value: "6",
        };
        assert!(s.refuse(&r, Some(cursor), 10).unwrap().is_some());
        assert_eq!(
            s.refuse(&r, Some(cursor), 11).unwrap(),
            None,
            "recorded once"
        );
        assert_eq!(s.cursor("telegram").unwrap().as_deref(), Some("6"));
        let notices = s.pending_for("telegram", Some("77"), 0, 10).unwrap();
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].text, "private");
        let unrouted = s.summaries().unwrap();
        assert_eq!((unrouted[0].name.as_str(), unrouted[0].refused), ("", 1));
    }

    #[test]
    fn unanswered_messages_fail_with_a_notice_and_in_flight_replies_are_not_resent() {
        let (_d, mut s) = store();
        let Accepted::Stored(m) = accept(&mut s, "a", None, 10) else {
            panic!()
        };
        s.take_batch(&id("a"), 10).unwrap();
        assert_eq!(
            s.expire(10, "late", 50).unwrap(),
            0,
            "published at 10: not before 10"
        );
        assert_eq!(s.expire(11, "late", 50).unwrap(), 1);
        assert_eq!(s.message_state(m).unwrap(), Some(MessageState::Failed));
        let o = s.next_outbound("telegram", 50).unwrap().unwrap();
        assert_eq!(o.text, "late");
        // The service dies while handing it over: after the restart it is dead, not pending.
        assert_eq!(s.recover_in_flight(60).unwrap(), 1);
        assert!(s.next_outbound("telegram", 60).unwrap().is_none());
        let sum = &s.summaries().unwrap()[0];
        assert_eq!(
            (sum.failed, sum.replies_dead, sum.replies_waiting),
            (1, 1, 0)
        );
    }

    #[test]
    fn a_message_never_published_fails_after_the_timeout_as_well() {
        let (_d, mut s) = store();
        let Accepted::Stored(m) = accept(&mut s, "a", None, 10) else {
            panic!()
        };
        // Received at 100 and never taken into a segment.
        assert_eq!(s.expire(100, "late", 150).unwrap(), 0);
        assert_eq!(s.sessions_with_received().unwrap(), [id("a")]);
        assert_eq!(s.expire(101, "late", 150).unwrap(), 1);
        assert_eq!(s.message_state(m).unwrap(), Some(MessageState::Failed));
        assert!(s.sessions_with_received().unwrap().is_empty());
    }
}
