//! Ingestion: one validated outbox segment of a session, taken in once. Replies to the
//! session's own published messages are queued for delivery and the messages marked
//! answered; replies to anything else are dropped; reminders become timers; the turn
//! that ended with the segment is kept with its risk. All of it, and its audit entry,
//! is one transaction.
//!
//! A seq is bound to its content (the SHA-256 of its items): the same seq with the same
//! items again is a duplicate, taken in once; the same seq with other items is an agent
//! whose own state went back (its database is not synced at every commit) and counts
//! seqs again, so the new items are taken in, not dropped, and the reuse is recorded.

use queue_proto::ids::{Seq, SessionId};
use queue_proto::items::OutboxItem;
use rusqlite::{OptionalExtension, params};
use serde_json::json;

use super::outbound::queue_outbound;
use super::sessions::session_row;
use super::state::{MessageState, OUTBOUND_WAITING_SQL, OutboundKind};
use super::timers::{NewTimer, PAST_GRACE_SECS, add_timer};
use super::usage;
use super::{Store, StoreError};
use crate::audit::{self, AuditEvent};
use crate::gateway::risk::turn_risk;
use crate::proxy::turn::TurnSummary;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ingested (
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    content BLOB,
    PRIMARY KEY (session, seq)
);
";

/// Adds the `content` column to a store made before seqs were bound to their content
/// (its earlier rows have none, and are taken as duplicates of whatever comes again).
pub(super) fn upgrade(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let has: bool = tx.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('ingested') WHERE name = 'content'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        tx.execute_batch("ALTER TABLE ingested ADD COLUMN content BLOB")?;
    }
    Ok(())
}

/// Replies one session may have waiting in the outbound queue at once; more are
/// refused and counted, so one chat's flood cannot fill the queue.
pub const MAX_QUEUED_REPLIES: i64 = 50;

/// How many replies and reminders of `session` wait in the outbound queue.
fn queued_replies(tx: &rusqlite::Transaction<'_>, session: &SessionId) -> rusqlite::Result<i64> {
    tx.query_row(
        &format!("SELECT count(*) FROM outbound WHERE session = ?1 AND {OUTBOUND_WAITING_SQL}"),
        params![session.as_str()],
        |r| r.get(0),
    )
}

/// What ingesting one outbox segment did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    pub duplicate: bool,
    /// The seq was taken in before with other items.
    pub seq_reused: bool,
    pub replies: u32,
    pub dropped_replies: u32,
    /// Replies beyond the session's queue or its day's budget.
    pub refused_replies: u32,
    pub timers: u32,
    /// Reminders in the past, beyond the timers held or the day's budget.
    pub refused_timers: u32,
    pub notes: u32,
    /// Notes written in a turn that had read outside content (a document, a
    /// transcript), as the control plane knows it.
    pub notes_after_outside_content: u32,
    pub change_requests: u32,
}

impl Store {
    /// Takes in one validated outbox segment of `session`, once (see the module doc).
    pub fn ingest(
        &mut self,
        session: &SessionId,
        seq: Seq,
        items: &[OutboxItem],
        turn: &TurnSummary,
        now: i64,
    ) -> Result<Ingested, StoreError> {
        let tx = self.tx()?;
        let mut out = Ingested::default();
        let content = content_hash(items);
        let before: Option<Option<Vec<u8>>> = tx
            .query_row(
                "SELECT content FROM ingested WHERE session = ?1 AND seq = ?2",
                params![session.as_str(), seq.0 as i64],
                |r| r.get(0),
            )
            .optional()?;
        match before {
            // A row from before seqs were bound to their content is taken as the same
            // content: a re-announce across the upgrade is not taken in twice.
            Some(c) if c.as_ref().is_none_or(|c| *c == content) => {
                out.duplicate = true;
                return Ok(out);
            }
            Some(_) => out.seq_reused = true,
            None => {}
        }
        tx.execute(
            "INSERT INTO ingested (session, seq, content) VALUES (?1, ?2, ?3)
             ON CONFLICT (session, seq) DO UPDATE SET content = excluded.content",
            params![session.as_str(), seq.0 as i64, content],
        )?;
        let row = session_row(&tx, session)?.ok_or(StoreError::BadSession)?;
        // The segment ends the agent's turn: its summary is kept with the items.
        let risk = turn_risk(turn);
        tx.execute(
            "INSERT INTO turns (session, at, summary, risk) VALUES (?1, ?2, ?3, ?4)",
            params![
                session.as_str(),
                now,
                serde_json::to_string(turn).unwrap_or_default(),
                risk
            ],
        )?;
        let mut answered_here: Vec<i64> = Vec::new();
        // A turn in which the model could not be used answers with a failure notice:
        // the message it answers failed, as the proxy saw, whatever the reply says.
        let (settled, reason) = if turn.model_failed() {
            (MessageState::Failed, Some("the model could not be used"))
        } else {
            (MessageState::Answered, None)
        };
        let mut queued = queued_replies(&tx, session)?;
        for item in items {
            match item {
                OutboxItem::AssistantReply(_) | OutboxItem::DocumentReply(_) => {
                    let (in_reply_to, text, kind) = match item {
                        OutboxItem::AssistantReply(r) => {
                            (r.in_reply_to, r.text.clone(), OutboundKind::Reply)
                        }
                        OutboxItem::DocumentReply(d) => (
                            d.in_reply_to,
                            super::outbound::document_text(&d.file_name, &d.text),
                            OutboundKind::Document,
                        ),
                        _ => unreachable!("matched above"),
                    };
                    // An empty reply would count as an answer while showing nothing.
                    let Ok(id) = i64::try_from(in_reply_to) else {
                        out.dropped_replies += 1;
                        continue;
                    };
                    if text.trim().is_empty() {
                        out.dropped_replies += 1;
                        continue;
                    }
                    let state: Option<MessageState> = tx
                        .query_row(
                            "SELECT state FROM messages WHERE id = ?1 AND session = ?2",
                            params![id, session.as_str()],
                            |r| r.get(0),
                        )
                        .optional()?;
                    let deliver = match state {
                        Some(MessageState::Published) => true,
                        // More than one reply to a message within one segment is fine;
                        // a later segment answering it again is a re-run, not news.
                        Some(MessageState::Answered | MessageState::Failed) => {
                            answered_here.contains(&id)
                        }
                        _ => false,
                    };
                    if !deliver {
                        out.dropped_replies += 1;
                        continue;
                    }
                    // The session's lane in the outbound queue: at most
                    // MAX_QUEUED_REPLIES waiting, and its day's reply budget.
                    if queued >= MAX_QUEUED_REPLIES
                        || !usage::charge(&tx, session, usage::REPLIES, now, text.len())?
                    {
                        out.refused_replies += 1;
                        continue;
                    }
                    tx.execute(
                        "UPDATE messages SET state = ?2, text = '', reason = ?3 WHERE id = ?1",
                        params![id, settled, reason],
                    )?;
                    answered_here.push(id);
                    queue_outbound(
                        &tx,
                        &row.channel,
                        &row.chat,
                        Some(session),
                        Some(id),
                        kind,
                        &text,
                    )?;
                    out.replies += 1;
                    queued += 1;
                }
                OutboxItem::ScheduleRequest(s) => {
                    let timer = NewTimer {
                        due_at: s.at,
                        text: &s.text,
                        rule: None,
                    };
                    if add_timer(&tx, session, timer, now, PAST_GRACE_SECS)?.is_ok() {
                        out.timers += 1;
                    } else {
                        out.refused_timers += 1;
                    }
                }
                OutboxItem::Note(_) => out.notes += 1,
                OutboxItem::ChangeRequest(_) => out.change_requests += 1,
            }
        }
        // Where the turn's notes came from, as this side knows it: whether the turn read
        // outside content (a transcript it asked for, or a document that came with a
        // message it answered).
        let tainted: bool = tx.query_row(
            "SELECT count(*) > 0 FROM web_taint WHERE session = ?1",
            params![session.as_str()],
            |r| r.get(0),
        )?;
        let outside = tainted
            || turn.transcriptions > 0
            || turn.web_calls > 0
            || answered_here.iter().try_fold(false, |seen, id| {
                Ok::<_, rusqlite::Error>(seen || super::attachments::outside_content(&tx, *id)?)
            })?;
        out.notes_after_outside_content = if outside { out.notes } else { 0 };
        audit::append(
            &tx,
            now,
            AuditEvent::OutboxIngested,
            &json!({ "session": session.as_str(), "seq": seq.0, "seq_reused": out.seq_reused,
                     "notes_after_outside_content": out.notes_after_outside_content,
                     "replies": out.replies, "refused_replies": out.refused_replies,
                     "refused_timers": out.refused_timers,
                     "dropped_replies": out.dropped_replies, "timers": out.timers,
                     "notes": out.notes, "change_requests": out.change_requests,
                     "risk": risk, "turn": turn }),
        )?;
        tx.commit()?;
        Ok(out)
    }
}

/// SHA-256 over a segment's items: each one's kind and its encoding, length-prefixed.
fn content_hash(items: &[OutboxItem]) -> Vec<u8> {
    use queue_proto::items::QueueItem;
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for item in items {
        // Items that were read from a segment encode again; one that would not still
        // counts, as its kind alone.
        let bytes = item.encode().unwrap_or_default();
        for part in [item.kind().as_str().as_bytes(), &bytes] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    h.finalize().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::messages::Accepted;
    use crate::store::testing::{accept, id, store};
    use queue_proto::items::AssistantReply;

    fn reply(to: i64, text: &str) -> OutboxItem {
        OutboxItem::AssistantReply(AssistantReply {
            in_reply_to: to as u64,
            text: text.into(),
        })
    }

    #[test]
    fn replies_settle_only_their_own_sessions_published_messages_once() {
        let (_d, mut s) = store();
        let turn = TurnSummary::default();
        let Accepted::Stored(m1) = accept(&mut s, "a", None, 10) else {
            panic!()
        };
        let Accepted::Stored(other) = accept(&mut s, "b", None, 10) else {
            panic!()
        };
        let (seq, batch) = s.take_batch(&id("a"), 5).unwrap().unwrap();
        assert_eq!((seq, batch.len()), (Seq(1), 1));
        assert!(s.take_batch(&id("a"), 5).unwrap().is_none());
        assert_eq!(s.published(&id("a")).unwrap()[0].0, Seq(1));

        // Session a answers its message, and tries to answer b's and an unknown one.
        let items = [
            reply(m1, "one"),
            reply(m1, "two"),
            reply(other, "x"),
            reply(9999, "y"),
        ];
        let got = s.ingest(&id("a"), Seq(1), &items, &turn, 6).unwrap();
        assert_eq!((got.replies, got.dropped_replies), (2, 2));
        assert_eq!(s.message_state(m1).unwrap(), Some(MessageState::Answered));
        assert_eq!(
            s.message_state(other).unwrap(),
            Some(MessageState::Received)
        );
        // The same segment again, or a later one answering the same message: nothing new.
        let again = s.ingest(&id("a"), Seq(1), &items, &turn, 7).unwrap();
        assert!(again.duplicate && !again.seq_reused);
        assert_eq!(
            s.ingest(&id("a"), Seq(2), &[reply(m1, "again")], &turn, 7)
                .unwrap()
                .replies,
            0
        );
        let out: Vec<String> = s
            .pending_for("telegram", Some("a"), 0, 10)
            .unwrap()
            .into_iter()
            .map(|o| o.text)
            .collect();
        assert_eq!(out, ["one", "two"]);

        // An empty reply is no answer: the message stays waiting.
        let Accepted::Stored(m2) = accept(&mut s, "a", None, 10) else {
            panic!()
        };
        assert_eq!(s.take_batch(&id("a"), 8).unwrap().unwrap().0, Seq(2));
        let got = s
            .ingest(&id("a"), Seq(3), &[reply(m2, " \n ")], &turn, 9)
            .unwrap();
        assert_eq!((got.replies, got.dropped_replies), (0, 1));
        assert_eq!(s.message_state(m2).unwrap(), Some(MessageState::Published));
        assert_eq!(s.inbox_needed_from(&id("a")).unwrap(), Seq(2));
    }

    #[test]
    fn a_reused_seq_with_other_items_is_taken_in_and_recorded() {
        let (_d, mut s) = store();
        let turn = TurnSummary::default();
        let Accepted::Stored(m1) = accept(&mut s, "a", None, 10) else {
            panic!()
        };
        s.take_batch(&id("a"), 5).unwrap().unwrap();
        assert_eq!(
            s.ingest(&id("a"), Seq(1), &[reply(m1, "first")], &turn, 6)
                .unwrap()
                .replies,
            1
        );
        // The agent's state went back: its next turn comes under seq 1 again.
        let Accepted::Stored(m2) = accept(&mut s, "a", None, 10) else {
            panic!()
        };
        s.take_batch(&id("a"), 7).unwrap().unwrap();
        let got = s
            .ingest(&id("a"), Seq(1), &[reply(m2, "second")], &turn, 8)
            .unwrap();
        assert!(got.seq_reused && !got.duplicate);
        assert_eq!(got.replies, 1);
        assert_eq!(s.message_state(m2).unwrap(), Some(MessageState::Answered));
        let entries = audit::page(s.connection(), 0, 1000).unwrap();
        let last = entries
            .iter()
            .rev()
            .find(|e| e.kind == "outbox_ingested")
            .unwrap();
        assert_eq!(last.detail["seq_reused"], true);
        // Those same items again are a duplicate of the reused seq.
        let again = s
            .ingest(&id("a"), Seq(1), &[reply(m2, "second")], &turn, 9)
            .unwrap();
        assert!(again.duplicate);
    }

    #[test]
    fn a_session_floods_only_its_own_lane_of_replies_and_reminders() {
        use queue_proto::items::ScheduleRequest;
        let (_d, mut s) = store();
        let turn = TurnSummary::default();
        let Accepted::Stored(m) = accept(&mut s, "a", None, 10) else {
            panic!()
        };
        s.take_batch(&id("a"), 5).unwrap().unwrap();
        let now = 1_000_000;
        let remind = |at: i64| {
            OutboxItem::ScheduleRequest(ScheduleRequest {
                at,
                text: "x".into(),
            })
        };
        // 200 replies to one message and 120 reminders, one of them in the past.
        let mut items: Vec<OutboxItem> = (0..200).map(|i| reply(m, &format!("r{i}"))).collect();
        items.push(remind(now - 301));
        items.extend((0..120).map(|i| remind(now + 60 + i)));
        let got = s.ingest(&id("a"), Seq(1), &items, &turn, now).unwrap();
        assert_eq!((got.replies, got.refused_replies), (50, 150));
        assert_eq!((got.timers, got.refused_timers), (100, 21));
        let entries = audit::page(s.connection(), 0, 1000).unwrap();
        let e = entries
            .iter()
            .rev()
            .find(|e| e.kind == "outbox_ingested")
            .unwrap();
        assert_eq!(
            (
                e.detail["refused_replies"].clone(),
                e.detail["refused_timers"].clone()
            ),
            (serde_json::json!(150), serde_json::json!(21)),
            "the refusals are counted where the operator sees them"
        );
        // Another session's lane is its own.
        let Accepted::Stored(b) = accept(&mut s, "b", None, 10) else {
            panic!()
        };
        s.take_batch(&id("b"), 5).unwrap().unwrap();
        let got = s
            .ingest(&id("b"), Seq(1), &[reply(b, "hello")], &turn, now)
            .unwrap();
        assert_eq!(got.replies, 1);
    }
}
