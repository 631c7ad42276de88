//! Files that came with a message. Each is stored `pending` with the message (in the
//! same transaction), fetched and checked by its channel's fetcher, then `ready` with
//! its bytes or `refused` with a fixed notice; a message waits for its files before it
//! is published. The bytes live here, under the store's key, until the message is
//! settled; a voice note's transcript is kept beside them for that long.

use queue_proto::ids::SessionId;
use queue_proto::items::AttachmentKind;
use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::json;

use super::outbound::queue_outbound;
use super::state::{AttachmentState, MESSAGE_WAITING_SQL, MessageState, OutboundKind};
use super::{Store, StoreError};
use crate::audit::{self, AuditEvent};
pub use crate::files::Fetched;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS attachments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message INTEGER NOT NULL,
    session TEXT NOT NULL,
    idx INTEGER NOT NULL,
    source TEXT NOT NULL,
    name TEXT NOT NULL,
    declared_bytes INTEGER,
    state TEXT NOT NULL,
    kind TEXT,
    media_type TEXT,
    data BLOB,
    transcript TEXT,
    UNIQUE (message, idx)
);
CREATE INDEX IF NOT EXISTS attachments_by_state ON attachments (state, id);
";

/// A file as a channel announced it, before it is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingFile {
    /// The channel's reference to fetch it by (Telegram's `file_id`).
    pub source: String,
    /// The name the person's app gave it (shown, never trusted).
    pub name: String,
    /// The size the channel declared, if it did.
    pub declared_bytes: Option<u64>,
    /// The bytes, for a channel whose client sends them with the message (the bridge).
    pub data: Option<Vec<u8>>,
}

/// A pending file for the fetcher.
#[derive(Debug, Clone)]
pub struct PendingFile {
    pub id: i64,
    pub message: i64,
    pub source: String,
    pub declared_bytes: Option<u64>,
    /// The bytes, if they came with the message.
    pub data: Option<Vec<u8>>,
    /// The session it belongs to.
    pub session: String,
}

/// A checked file, ready to be published.
#[derive(Debug, Clone)]
pub struct ReadyFile {
    pub index: u8,
    pub kind: AttachmentKind,
    pub media_type: String,
    pub name: String,
    pub data: Vec<u8>,
}

fn kind_name(k: AttachmentKind) -> &'static str {
    match k {
        AttachmentKind::Photo => "photo",
        AttachmentKind::Document => "document",
        AttachmentKind::Voice => "voice",
    }
}

fn kind_from(name: &str) -> Option<AttachmentKind> {
    [
        AttachmentKind::Photo,
        AttachmentKind::Document,
        AttachmentKind::Voice,
    ]
    .into_iter()
    .find(|k| kind_name(*k) == name)
}

/// Whether message `message` came with outside content for the agent to read: a
/// document or a voice note (its transcript).
pub(super) fn outside_content(tx: &Transaction<'_>, message: i64) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT count(*) > 0 FROM attachments WHERE message = ?1 AND kind IN (?2, ?3)",
        params![
            message,
            kind_name(AttachmentKind::Document),
            kind_name(AttachmentKind::Voice)
        ],
        |r| r.get(0),
    )
}

/// Stores `files` of message `message` as pending, inside the message's transaction.
pub(super) fn add_pending(
    tx: &Transaction<'_>,
    session: &SessionId,
    message: i64,
    files: &[IncomingFile],
) -> rusqlite::Result<()> {
    for (i, f) in files.iter().enumerate() {
        tx.execute(
            "INSERT INTO attachments (message, session, idx, source, name, declared_bytes, state, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                message,
                session.as_str(),
                i as i64,
                f.source,
                f.name,
                f.declared_bytes.map(|b| b.min(i64::MAX as u64) as i64),
                AttachmentState::Pending,
                f.data
            ],
        )?;
    }
    Ok(())
}

/// A voice note's audio, and its transcript once made.
pub type VoiceNote = (Vec<u8>, Option<String>);

/// Most bytes of files one message may pass on: its segment must stay well within the
/// segment limits (64 MiB, 1024 items).
pub const MAX_MESSAGE_FILE_BYTES: u64 = 40 * 1024 * 1024;

impl Store {
    /// Charges one transcription of `bytes` of audio to `session`'s day; whether it fits.
    pub fn charge_transcription(
        &mut self,
        session: &SessionId,
        bytes: usize,
        now: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.tx()?;
        let ok = super::usage::charge(&tx, session, super::usage::TRANSCRIPTIONS, now, bytes)?;
        tx.commit()?;
        Ok(ok)
    }

    /// The next pending file of `channel`'s messages: the oldest of the first session
    /// after `after` (by name) that has one, else of the first session; so each session's
    /// files take their turn, and one session's many files cannot hold up another's.
    pub fn next_pending_file(
        &self,
        channel: &str,
        after: Option<&str>,
    ) -> Result<Option<PendingFile>, StoreError> {
        let pick = |after: &str| {
            self.conn
                .query_row(
                    "SELECT a.id, a.message, a.source, a.declared_bytes, a.data, a.session
                     FROM attachments a JOIN messages m ON m.id = a.message
                     WHERE a.state = ?1 AND m.channel = ?2 AND a.session > ?3
                     ORDER BY a.session, a.id LIMIT 1",
                    params![AttachmentState::Pending, channel, after],
                    |r| {
                        Ok(PendingFile {
                            id: r.get(0)?,
                            message: r.get(1)?,
                            source: r.get(2)?,
                            declared_bytes: r.get::<_, Option<i64>>(3)?.map(|b| b as u64),
                            data: r.get(4)?,
                            session: r.get(5)?,
                        })
                    },
                )
                .optional()
        };
        let next = match after {
            Some(a) => pick(a)?,
            None => None,
        };
        Ok(match next {
            Some(p) => Some(p),
            None => pick("")?,
        })
    }

    /// Records what fetching file `id` found; a refusal queues its notice for the chat.
    /// A message left with neither text nor a file to pass on is settled as refused.
    pub fn file_fetched(&mut self, id: i64, fetched: &Fetched, now: i64) -> Result<(), StoreError> {
        let tx = self.tx()?;
        let row: Option<(i64, String, String, String)> = tx
            .query_row(
                "SELECT a.message, a.session, m.channel, m.chat FROM attachments a
                 JOIN messages m ON m.id = a.message WHERE a.id = ?1 AND a.state = ?2",
                params![id, AttachmentState::Pending],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((message, session, channel, chat)) = row else {
            return Ok(());
        };
        let s = SessionId::try_from(session.as_str()).map_err(|_| StoreError::BadSession)?;
        // The message's files together stay within what one segment carries.
        let already: i64 = tx.query_row(
            "SELECT coalesce(sum(length(data)), 0) FROM attachments WHERE message = ?1 AND state = ?2",
            params![message, AttachmentState::Ready],
            |r| r.get(0),
        )?;
        let over;
        let fetched = match fetched {
            Fetched::Ready { data, .. }
                if already as u64 + data.len() as u64 > MAX_MESSAGE_FILE_BYTES =>
            {
                over = crate::files::too_large(already as u64 + data.len() as u64);
                &over
            }
            // The session's day's files, charged as each one is passed on.
            Fetched::Ready { data, .. }
                if !super::usage::charge(&tx, &s, super::usage::FILES, now, data.len())? =>
            {
                over = Fetched::Refused {
                    reason: "the day's files for this conversation are used up".into(),
                    notice: crate::files::notice::FILES_OVER_BUDGET,
                };
                &over
            }
            f => f,
        };
        match fetched {
            Fetched::Ready {
                kind,
                media_type,
                data,
            } => {
                tx.execute(
                    "UPDATE attachments SET state = ?2, kind = ?3, media_type = ?4, data = ?5 WHERE id = ?1",
                    params![id, AttachmentState::Ready, kind_name(*kind), media_type, data],
                )?;
            }
            Fetched::Refused { reason, notice } => {
                tx.execute(
                    "UPDATE attachments SET state = ?2, data = NULL WHERE id = ?1",
                    params![id, AttachmentState::Refused],
                )?;
                queue_outbound(
                    &tx,
                    &channel,
                    &chat,
                    Some(&s),
                    Some(message),
                    OutboundKind::Notice,
                    notice,
                )?;
                audit::append(
                    &tx,
                    now,
                    AuditEvent::AttachmentRefused,
                    &json!({ "session": session, "message": message, "reason": reason }),
                )?;
                // Nothing left to pass on: the message is refused, not published.
                let left: i64 = tx.query_row(
                    "SELECT (SELECT length(text) FROM messages WHERE id = ?1)
                          + (SELECT count(*) FROM attachments WHERE message = ?1 AND state != ?2)",
                    params![message, AttachmentState::Refused],
                    |r| r.get(0),
                )?;
                if left == 0 {
                    tx.execute(
                        &format!(
                            "UPDATE messages SET state = ?3, reason = ?2 WHERE id = ?1 AND {MESSAGE_WAITING_SQL}"
                        ),
                        params![message, "its only file was refused", MessageState::Refused],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The ready files of `message`, in order.
    pub fn ready_files(&self, message: i64) -> Result<Vec<ReadyFile>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT idx, kind, media_type, name, data FROM attachments
             WHERE message = ?1 AND state = ?2 ORDER BY idx",
        )?;
        let rows = stmt.query_map(params![message, AttachmentState::Ready], |r| {
            let kind: String = r.get(1)?;
            Ok((
                r.get::<_, i64>(0)?,
                kind,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (index, kind, media_type, name, data) = row?;
            let Some(kind) = kind_from(&kind) else {
                continue;
            };
            out.push(ReadyFile {
                index: index as u8,
                kind,
                media_type,
                name,
                data,
            });
        }
        Ok(out)
    }

    /// The bytes and transcript of `session`'s ready voice note `index` of `message`,
    /// if the message is still waiting for its answer.
    pub fn voice_note(
        &self,
        session: &SessionId,
        message: i64,
        index: u8,
    ) -> Result<Option<VoiceNote>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT a.data, a.transcript FROM attachments a JOIN messages m ON m.id = a.message
                     WHERE a.session = ?1 AND a.message = ?2 AND a.idx = ?3 AND a.state = ?4
                       AND a.kind = ?5 AND m.{MESSAGE_WAITING_SQL}"
                ),
                params![
                    session.as_str(),
                    message,
                    i64::from(index),
                    AttachmentState::Ready,
                    kind_name(AttachmentKind::Voice)
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Keeps the transcript of a voice note while its message waits.
    pub fn keep_transcript(
        &mut self,
        session: &SessionId,
        message: i64,
        index: u8,
        text: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE attachments SET transcript = ?4 WHERE session = ?1 AND message = ?2 AND idx = ?3",
            params![session.as_str(), message, i64::from(index), text],
        )?;
        Ok(())
    }

    /// Removes the files of messages that are settled (answered, failed, refused): what
    /// the agent was given lives on only in its own encrypted state.
    pub fn drop_settled_files(&mut self) -> Result<u32, StoreError> {
        // Driven by the files held (usually none), each looked up by its message's key,
        // not by a pass over every message: this runs at every sweep.
        let n = self.conn.execute(
            &format!(
                "DELETE FROM attachments WHERE NOT EXISTS
                 (SELECT 1 FROM messages WHERE messages.id = attachments.message AND {MESSAGE_WAITING_SQL})"
            ),
            [],
        )?;
        Ok(n as u32)
    }
}
