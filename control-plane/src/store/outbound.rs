//! The outbound queue: replies, notices and reminders for chats, each delivered once.
//! A push channel takes the oldest due row, marks it `sending`, and records how the
//! attempt ended; a pull channel's client reads its pending rows and acknowledges them.
//! See [`OutboundState`] for the lifecycle.

use queue_proto::ids::SessionId;
use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::json;

use super::state::{OutboundKind, OutboundState};
use super::{Store, StoreError};
use crate::audit::{self, AuditEvent};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbound (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    chat TEXT NOT NULL,
    session TEXT,
    message_id INTEGER,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS outbound_by_state ON outbound (channel, state, next_attempt_at);
";

const OUTBOUND_COLUMNS: &str = "id, channel, chat, message_id, kind, text";

/// A reply or notice for a chat.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub id: i64,
    pub channel: String,
    pub chat: String,
    pub message_id: Option<i64>,
    pub kind: OutboundKind,
    pub text: String,
}

/// What happened to a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    Sent,
    /// Try again after this many seconds.
    Retry(u64),
    /// The chat app asked to wait this many seconds before sending: nothing was sent,
    /// and the attempt does not count towards giving up.
    Throttled(u64),
    /// Give up: the chat app refused it for good.
    Failed(String),
}

impl Store {
    /// Marks replies that were being handed to a chat app when the service stopped as
    /// dead-lettered: whether they arrived is unknown, and sending them again could
    /// show the person the same reply twice. Call once at start.
    pub fn recover_in_flight(&mut self, now: i64) -> Result<u32, StoreError> {
        let tx = self.tx()?;
        let n = tx.execute(
            "UPDATE outbound SET state = ?1, reason = 'in flight when the service stopped; not resent'
             WHERE state = ?2",
            params![OutboundState::Dead, OutboundState::Sending],
        )?;
        if n > 0 {
            audit::append(
                &tx,
                now,
                AuditEvent::DeliveryDeadLettered,
                &json!({ "count": n, "reason": "in flight at a crash" }),
            )?;
        }
        tx.commit()?;
        Ok(n as u32)
    }

    /// Each chat's oldest waiting reply on a push channel, as (chat, outbound id), if
    /// it is due (a chat whose oldest reply waits for its retry time sends nothing
    /// newer before it), for at most `limit` chats, those waiting longest first.
    pub fn due_heads(
        &self,
        channel: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT o.chat, o.id FROM outbound o
             WHERE o.channel = ?1 AND o.state = ?3 AND o.next_attempt_at <= ?2
               AND o.id = (SELECT min(p.id) FROM outbound p
                           WHERE p.channel = o.channel AND p.chat = o.chat AND p.state = ?3)
             ORDER BY o.id LIMIT ?4",
        )?;
        let heads = stmt
            .query_map(params![channel, now, OutboundState::Pending, limit], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(heads)
    }

    /// Outbound `id`, marked as being sent, if it is still pending and due.
    pub fn take_outbound(&mut self, id: i64, now: i64) -> Result<Option<Outbound>, StoreError> {
        let tx = self.tx()?;
        let row = tx
            .query_row(
                &format!(
                    "SELECT {OUTBOUND_COLUMNS} FROM outbound
                     WHERE id = ?1 AND state = ?3 AND next_attempt_at <= ?2"
                ),
                params![id, now, OutboundState::Pending],
                outbound_row,
            )
            .optional()?;
        if row.is_some() {
            tx.execute(
                "UPDATE outbound SET state = ?2, attempts = attempts + 1 WHERE id = ?1",
                params![id, OutboundState::Sending],
            )?;
        }
        tx.commit()?;
        Ok(row)
    }

    /// The oldest reply due on a push channel, marked as being sent.
    pub fn next_outbound(
        &mut self,
        channel: &str,
        now: i64,
    ) -> Result<Option<Outbound>, StoreError> {
        let tx = self.tx()?;
        let row = tx
            .query_row(
                &format!(
                    "SELECT {OUTBOUND_COLUMNS} FROM outbound
                     WHERE channel = ?1 AND state = ?3 AND next_attempt_at <= ?2 ORDER BY id LIMIT 1"
                ),
                params![channel, now, OutboundState::Pending],
                outbound_row,
            )
            .optional()?;
        if let Some(o) = &row {
            tx.execute(
                "UPDATE outbound SET state = ?2, attempts = attempts + 1 WHERE id = ?1",
                params![o.id, OutboundState::Sending],
            )?;
        }
        tx.commit()?;
        Ok(row)
    }

    /// Records how a delivery attempt ended.
    pub fn delivered(
        &mut self,
        id: i64,
        result: &Delivered,
        max_attempts: u32,
        now: i64,
    ) -> Result<(), StoreError> {
        let tx = self.tx()?;
        let attempts: i64 = tx.query_row(
            "SELECT attempts FROM outbound WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )?;
        match result {
            Delivered::Sent => {
                tx.execute(
                    "UPDATE outbound SET state = ?2, text = '' WHERE id = ?1",
                    params![id, OutboundState::Sent],
                )?;
            }
            Delivered::Throttled(after) => {
                tx.execute(
                    "UPDATE outbound SET state = ?3, next_attempt_at = ?2, attempts = max(attempts - 1, 0)
                     WHERE id = ?1",
                    params![
                        id,
                        now.saturating_add(i64::try_from(*after).unwrap_or(i64::MAX)),
                        OutboundState::Pending
                    ],
                )?;
            }
            Delivered::Retry(after) if attempts < i64::from(max_attempts) => {
                tx.execute(
                    "UPDATE outbound SET state = ?3, next_attempt_at = ?2 WHERE id = ?1",
                    params![
                        id,
                        now.saturating_add(i64::try_from(*after).unwrap_or(i64::MAX)),
                        OutboundState::Pending
                    ],
                )?;
            }
            Delivered::Retry(_) | Delivered::Failed(_) => {
                let reason = match result {
                    Delivered::Failed(r) => r.clone(),
                    _ => "too many failed attempts".into(),
                };
                tx.execute(
                    "UPDATE outbound SET state = ?3, reason = ?2 WHERE id = ?1",
                    params![id, reason, OutboundState::Dead],
                )?;
                audit::append(
                    &tx,
                    now,
                    AuditEvent::DeliveryDeadLettered,
                    &json!({ "outbound": id, "reason": reason }),
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Replies for a pull channel's chat after `after` (console, bridge), not yet
    /// acknowledged.
    pub fn pending_for(
        &self,
        channel: &str,
        chat: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Outbound>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {OUTBOUND_COLUMNS} FROM outbound
             WHERE channel = ?1 AND (?2 IS NULL OR chat = ?2) AND state = ?5 AND id > ?3
             ORDER BY id LIMIT ?4"
        ))?;
        let rows = stmt.query_map(
            params![channel, chat, after, limit as i64, OutboundState::Pending],
            outbound_row,
        )?;
        // A pull channel's client reads text: a document is shown by its name, then
        // its content.
        let shown = |mut o: Outbound| {
            if o.kind == OutboundKind::Document {
                let (name, content) = document_parts(&o.text);
                o.text = format!("[document: {name}]\n{content}");
            }
            o
        };
        Ok(rows
            .map(|r| r.map(shown))
            .collect::<rusqlite::Result<_>>()?)
    }

    /// A pull channel's client acknowledges everything up to `upto`.
    pub fn acknowledge(
        &mut self,
        channel: &str,
        chat: Option<&str>,
        upto: i64,
    ) -> Result<u64, StoreError> {
        let n = self.conn.execute(
            "UPDATE outbound SET state = ?4, text = '' WHERE channel = ?1 AND (?2 IS NULL OR chat = ?2)
             AND state = ?5 AND id <= ?3",
            params![
                channel,
                chat,
                upto,
                OutboundState::Sent,
                OutboundState::Pending
            ],
        )?;
        Ok(n as u64)
    }
}

/// Queues `text` for `chat` inside `tx`.
pub(super) fn queue_outbound(
    tx: &Transaction<'_>,
    channel: &str,
    chat: &str,
    session: Option<&SessionId>,
    message_id: Option<i64>,
    kind: OutboundKind,
    text: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO outbound (channel, chat, session, message_id, kind, text, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            channel,
            chat,
            session.map(SessionId::as_str),
            message_id,
            kind,
            text,
            OutboundState::Pending
        ],
    )?;
    Ok(())
}

/// How a document is kept in the outbound queue: its name, a NUL, its content. The
/// name is made safe first: no path, no control characters, at most 64 characters,
/// and `.txt` or `.md` at the end.
pub fn document_text(file_name: &str, content: &str) -> String {
    let base = file_name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut name: String = base
        .chars()
        .filter(|c| !c.is_control() && !crate::is_invisible(*c))
        .take(60)
        .collect();
    name = name
        .trim_matches(|c: char| c == '.' || c.is_whitespace())
        .to_owned();
    if name.is_empty() {
        name = "note".into();
    }
    let lower = name.to_lowercase();
    if !(lower.ends_with(".txt") || lower.ends_with(".md")) {
        name.push_str(".txt");
    }
    format!("{name}\0{content}")
}

/// The name and content of a document kept by [`document_text`].
pub fn document_parts(text: &str) -> (&str, &str) {
    text.split_once('\0').unwrap_or(("note.txt", text))
}

fn outbound_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Outbound> {
    Ok(Outbound {
        id: r.get(0)?,
        channel: r.get(1)?,
        chat: r.get(2)?,
        message_id: r.get(3)?,
        kind: r.get(4)?,
        text: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::turn::TurnSummary;
    use crate::store::testing::{id, store};
    use queue_proto::ids::Seq;
    use queue_proto::items::{OutboxItem, ScheduleRequest};

    #[test]
    fn deliveries_retry_then_die_and_timers_fire_once() {
        let (_d, mut s) = store();
        let sid = id("a");
        s.bind(&sid, "telegram", "a", 1).unwrap();
        let timer = OutboxItem::ScheduleRequest(ScheduleRequest {
            at: 500,
            text: "call mum".into(),
        });
        let turn = TurnSummary::default();
        assert_eq!(
            s.ingest(&sid, Seq(1), &[timer], &turn, 1).unwrap().timers,
            1
        );
        assert_eq!(s.fire_timers(499).unwrap(), 0);
        assert_eq!(s.fire_timers(500).unwrap(), 1);
        assert_eq!(s.fire_timers(501).unwrap(), 0);
        let o = s.next_outbound("telegram", 500).unwrap().unwrap();
        assert_eq!(
            (o.kind, o.text.as_str()),
            (OutboundKind::Reminder, "Reminder: call mum")
        );
        s.delivered(o.id, &Delivered::Retry(30), 2, 500).unwrap();
        assert!(
            s.next_outbound("telegram", 529).unwrap().is_none(),
            "not before its retry time"
        );
        let o = s.next_outbound("telegram", 530).unwrap().unwrap();
        s.delivered(o.id, &Delivered::Retry(30), 2, 530).unwrap();
        assert!(
            s.next_outbound("telegram", 10_000).unwrap().is_none(),
            "dead after 2 attempts"
        );
        assert_eq!(s.summaries().unwrap()[0].replies_dead, 1);
    }

    #[test]
    fn a_pull_channels_replies_wait_until_acknowledged_for_their_chat_only() {
        let (_d, mut s) = store();
        let tx = s.tx().unwrap();
        for chat in ["x", "y", "x"] {
            queue_outbound(&tx, "console", chat, None, None, OutboundKind::Reply, chat).unwrap();
        }
        tx.commit().unwrap();
        let x = s.pending_for("console", Some("x"), 0, 10).unwrap();
        assert_eq!(x.len(), 2);
        assert_eq!(s.acknowledge("console", Some("x"), x[0].id).unwrap(), 1);
        let left = s.pending_for("console", None, 0, 10).unwrap();
        assert_eq!(
            left.iter().map(|o| o.chat.as_str()).collect::<Vec<_>>(),
            ["y", "x"]
        );
        assert!(
            s.next_outbound("telegram", 0).unwrap().is_none(),
            "another channel's"
        );
    }

    #[test]
    fn each_chat_sends_its_replies_in_order_and_a_throttle_costs_no_attempt() {
        let (_d, mut s) = store();
        let tx = s.tx().unwrap();
        for (chat, text) in [("a", "a1"), ("a", "a2"), ("b", "b1")] {
            queue_outbound(
                &tx,
                "telegram",
                chat,
                None,
                None,
                OutboundKind::Notice,
                text,
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let heads = s.due_heads("telegram", 10, 10).unwrap();
        assert_eq!(
            heads.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // a1 is held back: a2 waits behind it, b goes on.
        let a1 = s.take_outbound(heads[0].1, 10).unwrap().unwrap();
        assert_eq!(a1.text, "a1");
        s.delivered(a1.id, &Delivered::Throttled(60), 1, 10)
            .unwrap();
        let heads = s.due_heads("telegram", 11, 10).unwrap();
        assert_eq!(
            heads.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        // Throttled does not count: with one attempt allowed, a1 is still there later.
        let a1 = s.take_outbound(a1.id, 70).unwrap().unwrap();
        s.delivered(a1.id, &Delivered::Throttled(1), 1, 70).unwrap();
        assert!(s.take_outbound(a1.id, 71).unwrap().is_some());
    }
}
