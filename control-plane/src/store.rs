//! The control store: one SQLCipher database under the control-store key, the authority
//! for sessions and their channel bindings, every accepted message and where it stands,
//! the replies waiting for delivery, `schedule` timers, channel cursors (the Telegram
//! offset) and the audit trail. Every change is one transaction together with its audit
//! entry; inbox segments are published from what this store says.
//!
//! A message moves `received → published → answered`, or ends `failed` (the person was
//! sent a notice), `refused` (never passed to an agent; a notice where one is due) or
//! `dead` (visible to the operator in `sessions list`). A reply moves
//! `pending → sending → sent`, or ends `dead`.

use std::path::Path;

use queue_proto::ids::{Seq, SessionId};
use queue_proto::items::OutboxItem;
use queue_proto::keys::{MasterKey, SessionSalt, derive_audit_head_key, derive_control_store_key};
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde_json::json;

use crate::audit;

mod changes;
pub use changes::*;

/// The file name of the control store inside the state directory.
pub const STORE_FILE: &str = "control.db";

/// Messages published to an agent in one inbox segment, at most.
pub const MAX_BATCH: usize = 64;

/// Timers one session may hold at once.
pub const MAX_TIMERS_PER_SESSION: i64 = 100;

/// Why the control store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the control store {path} failed (wrong master key, or not a control store)")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the control store {path} does not exist or was never initialised (run `ironclaw init`)"
    )]
    NotInitialised { path: std::path::PathBuf },
    #[error(
        "the control store has no approved configuration, but its audit trail records one: it was changed outside ironclaw"
    )]
    VersionsMissing,
    #[error("a control store query failed")]
    Query(#[from] rusqlite::Error),
    #[error("the control store holds an invalid session name")]
    BadSession,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    name TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    chat TEXT NOT NULL,
    salt BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    next_inbox_seq INTEGER NOT NULL DEFAULT 1,
    UNIQUE (channel, chat)
);
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
CREATE TABLE IF NOT EXISTS ingested (
    session TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (session, seq)
);
CREATE TABLE IF NOT EXISTS timers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    due_at INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS channel_state (
    channel TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// A session and the chat it belongs to.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub id: SessionId,
    pub channel: String,
    pub chat: String,
    pub salt: SessionSalt,
}

/// A message arriving from a channel, already checked against the channel's rules.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub channel: String,
    pub chat: String,
    /// The channel's own id for it (Telegram's update id), for de-duplication.
    pub external_id: Option<String>,
    pub text: String,
    pub received_at: i64,
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
}

/// A message as published to an agent.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub id: i64,
    pub text: String,
    pub received_at: i64,
}

/// A reply or notice for a chat.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub id: i64,
    pub channel: String,
    pub chat: String,
    pub message_id: Option<i64>,
    pub kind: String,
    pub text: String,
}

/// What happened to a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    Sent,
    /// Try again after this many seconds.
    Retry(u64),
    /// Give up: the chat app refused it for good.
    Failed(String),
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

/// What ingesting one outbox segment did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    pub duplicate: bool,
    pub replies: u32,
    pub dropped_replies: u32,
    pub timers: u32,
    pub notes: u32,
    pub change_requests: u32,
}

/// The open control store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// False while (or if, after a failure) the connection may not be back at
    /// `synchronous = FULL`: the next transaction restores it first.
    synced: bool,
}

impl Store {
    /// Creates the store at `path` (for `init`): its tables and the first audit entry.
    pub fn create(path: &Path, master: &MasterKey) -> Result<Store, StoreError> {
        Store::open_with(path, master, true)
    }

    /// Opens the store `init` created at `path` under the master key's control-store
    /// key. A missing file, or one without tables, is an error: an emptied store must
    /// never look like a new one.
    pub fn open(path: &Path, master: &MasterKey) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::NotInitialised {
                path: path.to_owned(),
            });
        }
        Store::open_with(path, master, false)
    }

    fn open_with(path: &Path, master: &MasterKey, create: bool) -> Result<Store, StoreError> {
        let open = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let key = derive_control_store_key(master);
        let conn = queue_proto::sqlcipher::open_keyed(path, &key).map_err(open)?;
        // Every commit that changes what the outside world is told (a message accepted,
        // the Telegram offset, a reply taken in or being sent) is synced (WAL with
        // synchronous FULL), so not even a power cut can undo what was confirmed; only
        // audit-only entries skip the sync (see `record`). secure_delete overwrites
        // freed content, so a deleted session's salt does not linger in free pages.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON;",
        )
        .map_err(open)?;
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(open)?;
        if (tables == 0) != create {
            return Err(if create {
                StoreError::Open {
                    path: path.to_owned(),
                    source: rusqlite::Error::InvalidPath(path.to_owned()),
                }
            } else {
                StoreError::NotInitialised {
                    path: path.to_owned(),
                }
            });
        }
        audit::install_seal(&conn, derive_audit_head_key(master)).map_err(open)?;
        let mut store = Store { conn, synced: true };
        // The tables and the trail's first entry are made in one transaction, so a crash
        // in `init` never leaves tables without a trail; an emptied trail never looks
        // intact.
        let tx = store.tx().map_err(open)?;
        for schema in [SCHEMA, audit::SCHEMA, changes::SCHEMA] {
            tx.execute_batch(schema).map_err(open)?;
        }
        if create {
            audit::append(&tx, crate::state::now_secs(), "store_created", &json!({}))
                .map_err(open)?;
        }
        tx.commit().map_err(open)?;
        Ok(store)
    }

    /// Checks the audit trail and its sealed head.
    pub fn verify_audit(&self, master: &MasterKey) -> Result<u64, audit::ChainError> {
        audit::verify(&self.conn, &derive_audit_head_key(master))
    }

    /// The connection, for the audit functions and tests.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    fn tx(&mut self) -> rusqlite::Result<Transaction<'_>> {
        if !self.synced {
            self.conn.execute_batch("PRAGMA synchronous = FULL")?;
            self.synced = true;
        }
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
    }

    /// Appends an audit entry on its own (an event with no other state change).
    pub fn record(
        &mut self,
        kind: &str,
        detail: &serde_json::Value,
        now: i64,
    ) -> Result<(), StoreError> {
        // An entry that only records is not worth a sync of its own: the next synced
        // commit carries it to the disk.
        self.unsynced(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            audit::append(&tx, now, kind, detail)?;
            tx.commit()
        })
    }

    /// Runs `f` with commits that are not synced: for changes whose loss in a power cut
    /// costs nothing that matters (an audit-only entry).
    fn unsynced<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        // Cleared first: if anything below fails or panics, the next transaction puts
        // FULL back before it begins.
        self.synced = false;
        self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        let done = f(&mut self.conn);
        self.conn.execute_batch("PRAGMA synchronous = FULL")?;
        self.synced = true;
        Ok(done?)
    }

    /// The session `name`, if it exists.
    pub fn session(&self, name: &SessionId) -> Result<Option<SessionRow>, StoreError> {
        session_row(&self.conn, name)
    }

    /// Every session's name.
    pub fn session_names(&self) -> Result<Vec<SessionId>, StoreError> {
        session_ids(&self.conn, "SELECT name FROM sessions ORDER BY name")
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
        let salt = SessionSalt::generate().map_err(|_| {
            StoreError::Query(rusqlite::Error::InvalidParameterName(
                "no randomness".into(),
            ))
        })?;
        let tx = self.tx()?;
        tx.execute(
            "INSERT INTO sessions (name, channel, chat, salt, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name.as_str(), channel, chat, salt.expose_secret().as_slice(), now],
        )?;
        audit::append(
            &tx,
            now,
            "session_created",
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

    /// Stores an inbound message for `session` (and moves the channel's cursor, in the
    /// same transaction), unless it is a duplicate or the session has too many waiting.
    pub fn accept(
        &mut self,
        session: &SessionId,
        m: &Inbound,
        max_waiting: u32,
        refusal_notice: &str,
        cursor: Option<(&str, &str)>,
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
            "SELECT count(*) FROM messages WHERE session = ?1 AND state IN ('received', 'published')",
            params![session.as_str()],
            |r| r.get(0),
        )?;
        // A refused message keeps no external id: the person is told to send it again,
        // and the same id must then be accepted.
        let (state, text, reason, external_id) = if waiting >= i64::from(max_waiting) {
            ("refused", "", Some("too many messages waiting"), None)
        } else {
            ("received", m.text.as_str(), None, m.external_id.as_deref())
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
        audit::append(
            &tx,
            m.received_at,
            if state == "refused" {
                "message_refused"
            } else {
                "message_accepted"
            },
            &json!({ "message": id, "session": session.as_str(), "channel": m.channel,
                     "bytes": m.text.len(), "reason": reason }),
        )?;
        if state == "refused" {
            queue_outbound(
                &tx,
                &m.channel,
                &m.chat,
                Some(session),
                Some(id),
                "notice",
                refusal_notice,
            )?;
            tx.commit()?;
            return Ok(Accepted::Refused(id));
        }
        tx.commit()?;
        Ok(Accepted::Stored(id))
    }

    /// Records a message that never reaches an agent (unknown sender, too large,
    /// malformed): metadata only, an optional notice, and the channel's cursor moved.
    #[allow(clippy::too_many_arguments)]
    pub fn refuse(
        &mut self,
        channel: &str,
        chat: &str,
        external_id: Option<&str>,
        bytes: usize,
        reason: &str,
        notice: Option<&str>,
        cursor: Option<(&str, &str)>,
        now: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.tx()?;
        set_cursor(&tx, cursor)?;
        let inserted = tx.execute(
            "INSERT OR IGNORE INTO messages (session, channel, chat, external_id, text, bytes, received_at, state, reason)
             VALUES (NULL, ?1, ?2, ?3, '', ?4, ?5, 'refused', ?6)",
            params![channel, chat, external_id, bytes as i64, now, reason],
        )?;
        if inserted == 1 {
            let id = tx.last_insert_rowid();
            audit::append(
                &tx,
                now,
                "message_refused",
                &json!({ "message": id, "channel": channel, "bytes": bytes, "reason": reason }),
            )?;
            if let Some(text) = notice {
                queue_outbound(&tx, channel, chat, None, Some(id), "notice", text)?;
            }
        }
        tx.commit()?;
        Ok(inserted == 1)
    }

    /// The state of message `id` (`received`, `published`, `answered`, `failed`,
    /// `refused`, `dead`), if it exists.
    pub fn message_state(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT state FROM messages WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The channel's stored cursor (the Telegram offset).
    pub fn cursor(&self, channel: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM channel_state WHERE channel = ?1",
                params![channel],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Moves the channel's cursor on its own (an update with nothing to store).
    pub fn set_cursor(&mut self, channel: &str, value: &str) -> Result<(), StoreError> {
        let tx = self.tx()?;
        set_cursor(&tx, Some((channel, value)))?;
        tx.commit()?;
        Ok(())
    }

    /// Takes up to [`MAX_BATCH`] received messages of `session` into the next inbox
    /// segment: they are marked published under its seq, which is then used up.
    pub fn take_batch(
        &mut self,
        session: &SessionId,
        now: i64,
    ) -> Result<Option<(Seq, Vec<Waiting>)>, StoreError> {
        let tx = self.tx()?;
        let batch = waiting(&tx, session, "state = 'received'", MAX_BATCH)?;
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
                "UPDATE messages SET state = 'published', inbox_seq = ?1, published_at = ?2 WHERE id = ?3",
                params![seq, now, m.id],
            )?;
        }
        tx.commit()?;
        Ok(Some((Seq(seq as u64), batch)))
    }

    /// Published, unanswered messages by inbox seq: after a restart, any segment whose
    /// file is missing is published again from these.
    pub fn published(&self, session: &SessionId) -> Result<Vec<(Seq, Vec<Waiting>)>, StoreError> {
        let all = waiting(&self.conn, session, "state = 'published'", usize::MAX)?;
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
                 (SELECT min(inbox_seq) FROM messages WHERE session = ?1 AND state = 'published'),
                 (SELECT next_inbox_seq FROM sessions WHERE name = ?1),
                 0)",
            params![session.as_str()],
            |r| r.get(0),
        )?;
        Ok(Seq(seq as u64))
    }

    /// Sessions holding received messages not yet published.
    pub fn sessions_with_received(&self) -> Result<Vec<SessionId>, StoreError> {
        session_ids(
            &self.conn,
            "SELECT DISTINCT session FROM messages WHERE state = 'received' AND session IS NOT NULL",
        )
    }

    /// Takes in one validated outbox segment of `session`, once: replies to the
    /// session's own published messages are queued for delivery and the messages marked
    /// answered; replies to anything else are dropped; reminders become timers.
    pub fn ingest(
        &mut self,
        session: &SessionId,
        seq: Seq,
        items: &[OutboxItem],
        turn: &crate::gateway::TurnSummary,
        now: i64,
    ) -> Result<Ingested, StoreError> {
        let tx = self.tx()?;
        let mut out = Ingested::default();
        let fresh = tx.execute(
            "INSERT OR IGNORE INTO ingested (session, seq) VALUES (?1, ?2)",
            params![session.as_str(), seq.0 as i64],
        )?;
        if fresh == 0 {
            out.duplicate = true;
            return Ok(out);
        }
        let row = session_row(&tx, session)?.ok_or(StoreError::BadSession)?;
        // The segment ends the agent's turn: its summary is kept with the items.
        let risk = crate::gateway::turn_risk(turn);
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
        for item in items {
            match item {
                OutboxItem::AssistantReply(r) => {
                    // An empty reply would count as an answer while showing nothing.
                    let Ok(id) = i64::try_from(r.in_reply_to) else {
                        out.dropped_replies += 1;
                        continue;
                    };
                    if r.text.trim().is_empty() {
                        out.dropped_replies += 1;
                        continue;
                    }
                    let state: Option<String> = tx
                        .query_row(
                            "SELECT state FROM messages WHERE id = ?1 AND session = ?2",
                            params![id, session.as_str()],
                            |r| r.get(0),
                        )
                        .optional()?;
                    let deliver = match state.as_deref() {
                        Some("published") => true,
                        // More than one reply to a message within one segment is fine;
                        // a later segment answering it again is a re-run, not news.
                        Some("answered") => answered_here.contains(&id),
                        _ => false,
                    };
                    if !deliver {
                        out.dropped_replies += 1;
                        continue;
                    }
                    tx.execute(
                        "UPDATE messages SET state = 'answered', text = '' WHERE id = ?1",
                        params![id],
                    )?;
                    answered_here.push(id);
                    queue_outbound(
                        &tx,
                        &row.channel,
                        &row.chat,
                        Some(session),
                        Some(id),
                        "reply",
                        &r.text,
                    )?;
                    out.replies += 1;
                }
                OutboxItem::ScheduleRequest(s) => {
                    let held: i64 = tx.query_row(
                        "SELECT count(*) FROM timers WHERE session = ?1",
                        params![session.as_str()],
                        |r| r.get(0),
                    )?;
                    if held < MAX_TIMERS_PER_SESSION {
                        tx.execute(
                            "INSERT INTO timers (session, due_at, text) VALUES (?1, ?2, ?3)",
                            params![session.as_str(), s.at, s.text],
                        )?;
                        out.timers += 1;
                    }
                }
                OutboxItem::Note(_) => out.notes += 1,
                OutboxItem::ChangeRequest(_) => out.change_requests += 1,
            }
        }
        audit::append(
            &tx,
            now,
            "outbox_ingested",
            &json!({ "session": session.as_str(), "seq": seq.0, "replies": out.replies,
                     "dropped_replies": out.dropped_replies, "timers": out.timers,
                     "notes": out.notes, "change_requests": out.change_requests,
                     "risk": risk, "turn": turn }),
        )?;
        tx.commit()?;
        Ok(out)
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
        let msgs = waiting(
            &tx,
            session,
            "state IN ('received', 'published')",
            usize::MAX,
        )?;
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
        let overdue = format!(
            "((state = 'published' AND published_at < {published_before}) OR \
              (state = 'received' AND received_at < {published_before}))"
        );
        let sessions = session_ids(
            &tx,
            &format!(
                "SELECT DISTINCT session FROM messages WHERE session IS NOT NULL AND {overdue}"
            ),
        )?;
        let mut n = 0;
        for s in sessions {
            let msgs = waiting(&tx, &s, &overdue, usize::MAX)?;
            n += fail(&tx, &s, &msgs, "no reply in time", notice, now)?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Marks replies that were being handed to a chat app when the service stopped as
    /// dead-lettered: whether they arrived is unknown, and sending them again could
    /// show the person the same reply twice. Call once at start.
    pub fn recover_in_flight(&mut self, now: i64) -> Result<u32, StoreError> {
        let tx = self.tx()?;
        let n = tx.execute(
            "UPDATE outbound SET state = 'dead', reason = 'in flight when the service stopped; not resent'
             WHERE state = 'sending'",
            [],
        )?;
        if n > 0 {
            audit::append(
                &tx,
                now,
                "delivery_dead_lettered",
                &json!({ "count": n, "reason": "in flight at a crash" }),
            )?;
        }
        tx.commit()?;
        Ok(n as u32)
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
                "SELECT id, channel, chat, message_id, kind, text FROM outbound
                 WHERE channel = ?1 AND state = 'pending' AND next_attempt_at <= ?2 ORDER BY id LIMIT 1",
                params![channel, now],
                outbound_row,
            )
            .optional()?;
        if let Some(o) = &row {
            tx.execute(
                "UPDATE outbound SET state = 'sending', attempts = attempts + 1 WHERE id = ?1",
                params![o.id],
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
                    "UPDATE outbound SET state = 'sent', text = '' WHERE id = ?1",
                    params![id],
                )?;
            }
            Delivered::Retry(after) if attempts < i64::from(max_attempts) => {
                tx.execute(
                    "UPDATE outbound SET state = 'pending', next_attempt_at = ?2 WHERE id = ?1",
                    params![
                        id,
                        now.saturating_add(i64::try_from(*after).unwrap_or(i64::MAX))
                    ],
                )?;
            }
            Delivered::Retry(_) | Delivered::Failed(_) => {
                let reason = match result {
                    Delivered::Failed(r) => r.clone(),
                    _ => "too many failed attempts".into(),
                };
                tx.execute(
                    "UPDATE outbound SET state = 'dead', reason = ?2 WHERE id = ?1",
                    params![id, reason],
                )?;
                audit::append(
                    &tx,
                    now,
                    "delivery_dead_lettered",
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
        let mut stmt = self.conn.prepare(
            "SELECT id, channel, chat, message_id, kind, text FROM outbound
             WHERE channel = ?1 AND (?2 IS NULL OR chat = ?2) AND state = 'pending' AND id > ?3
             ORDER BY id LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![channel, chat, after, limit as i64], outbound_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A pull channel's client acknowledges everything up to `upto`.
    pub fn acknowledge(
        &mut self,
        channel: &str,
        chat: Option<&str>,
        upto: i64,
    ) -> Result<u64, StoreError> {
        let n = self.conn.execute(
            "UPDATE outbound SET state = 'sent', text = '' WHERE channel = ?1 AND (?2 IS NULL OR chat = ?2)
             AND state = 'pending' AND id <= ?3",
            params![channel, chat, upto],
        )?;
        Ok(n as u64)
    }

    /// Moves due timers into the outbound queue as reminders.
    pub fn fire_timers(&mut self, now: i64) -> Result<u32, StoreError> {
        let tx = self.tx()?;
        let mut stmt = tx.prepare(
            "SELECT t.id, t.session, t.text, s.channel, s.chat FROM timers t JOIN sessions s ON s.name = t.session
             WHERE t.due_at <= ?1 ORDER BY t.id LIMIT 256",
        )?;
        let due: Vec<(i64, String, String, String, String)> = stmt
            .query_map(params![now], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        drop(stmt);
        for (id, session, text, channel, chat) in &due {
            let s = SessionId::try_from(session.as_str()).map_err(|_| StoreError::BadSession)?;
            queue_outbound(
                &tx,
                channel,
                chat,
                Some(&s),
                None,
                "reminder",
                &format!("Reminder: {text}"),
            )?;
            tx.execute("DELETE FROM timers WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(due.len() as u32)
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
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (state, n) = row?;
            let n = n as u64;
            match state.as_str() {
                "received" | "published" => s.pending += n,
                "answered" => s.answered += n,
                "failed" => s.failed += n,
                "refused" => s.refused += n,
                _ => s.dead_lettered += n,
            }
        }
        let mut stmt = self
            .conn
            .prepare("SELECT state, count(*) FROM outbound WHERE session IS ?1 GROUP BY state")?;
        for row in stmt.query_map(params![session], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })? {
            let (state, n) = row?;
            match state.as_str() {
                "pending" | "sending" => s.replies_waiting += n as u64,
                "dead" => s.replies_dead += n as u64,
                _ => {}
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
        for table in ["messages", "outbound", "timers", "ingested"] {
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
            "session_deleted",
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
fn session_ids(conn: &Connection, sql: &str) -> Result<Vec<SessionId>, StoreError> {
    let mut stmt = conn.prepare(sql)?;
    let names = stmt.query_map([], |r| r.get::<_, String>(0))?;
    names
        .map(|n| SessionId::try_from(n?.as_str()).map_err(|_| StoreError::BadSession))
        .collect()
}

fn session_row(conn: &Connection, name: &SessionId) -> Result<Option<SessionRow>, StoreError> {
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

fn set_cursor(tx: &Transaction<'_>, cursor: Option<(&str, &str)>) -> rusqlite::Result<()> {
    if let Some((channel, value)) = cursor {
        tx.execute(
            "INSERT INTO channel_state (channel, value) VALUES (?1, ?2)
             ON CONFLICT (channel) DO UPDATE SET value = excluded.value",
            params![channel, value],
        )?;
    }
    Ok(())
}

fn waiting(
    conn: &Connection,
    session: &SessionId,
    cond: &str,
    limit: usize,
) -> rusqlite::Result<Vec<Waiting>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare(&format!(
        "SELECT id, text, received_at FROM messages WHERE session = ?1 AND {cond} ORDER BY id LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![session.as_str(), limit], |r| {
        Ok(Waiting {
            id: r.get(0)?,
            text: r.get(1)?,
            received_at: r.get(2)?,
        })
    })?;
    rows.collect()
}

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
            "UPDATE messages SET state = 'failed', text = '', reason = ?2 WHERE id = ?1",
            params![m.id, reason],
        )?;
        queue_outbound(
            tx,
            &row.channel,
            &row.chat,
            Some(session),
            Some(m.id),
            "notice",
            notice,
        )?;
    }
    if !msgs.is_empty() {
        audit::append(
            tx,
            now,
            "messages_failed",
            &json!({ "session": session.as_str(), "count": msgs.len(), "reason": reason }),
        )?;
    }
    Ok(msgs.len() as u32)
}

fn queue_outbound(
    tx: &Transaction<'_>,
    channel: &str,
    chat: &str,
    session: Option<&SessionId>,
    message_id: Option<i64>,
    kind: &str,
    text: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO outbound (channel, chat, session, message_id, kind, text, state) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending')",
        params![channel, chat, session.map(SessionId::as_str), message_id, kind, text],
    )?;
    Ok(())
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
    use queue_proto::items::{AssistantReply, ScheduleRequest};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(&dir.path().join("c.db"), &MasterKey::from_bytes([1; 32])).unwrap();
        (dir, s)
    }

    fn id(name: &str) -> SessionId {
        SessionId::try_from(name).unwrap()
    }

    fn turn() -> crate::gateway::TurnSummary {
        crate::gateway::TurnSummary::default()
    }

    fn inbound(chat: &str, ext: Option<&str>, text: &str) -> Inbound {
        Inbound {
            channel: "telegram".into(),
            chat: chat.into(),
            external_id: ext.map(str::to_owned),
            text: text.into(),
            received_at: 100,
        }
    }

    fn reply(to: i64, text: &str) -> OutboxItem {
        OutboxItem::AssistantReply(AssistantReply {
            in_reply_to: to as u64,
            text: text.into(),
        })
    }

    fn accept(s: &mut Store, session: &str, ext: Option<&str>, max: u32) -> Accepted {
        let sid = id(session);
        s.bind(&sid, "telegram", session, 1).unwrap();
        s.accept(
            &sid,
            &inbound(session, ext, "hi"),
            max,
            "busy",
            Some(("telegram", "9")),
        )
        .unwrap()
    }

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
        assert_eq!(s.message_state(m).unwrap().as_deref(), Some("refused"));
        // Told to send it again, the person can: the refused id is not kept.
        assert!(matches!(
            accept(&mut s, "a", Some("3"), 10),
            Accepted::Stored(_)
        ));
        assert_eq!(s.cursor("telegram").unwrap().as_deref(), Some("9"));
        let notice = s.pending_for("telegram", Some("a"), 0, 10).unwrap();
        assert_eq!(notice.len(), 1);
        assert_eq!(
            (notice[0].kind.as_str(), notice[0].text.as_str()),
            ("notice", "busy")
        );
    }

    #[test]
    fn replies_settle_only_their_own_sessions_published_messages_once() {
        let (_d, mut s) = store();
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
        let got = s.ingest(&id("a"), Seq(1), &items, &turn(), 6).unwrap();
        assert_eq!((got.replies, got.dropped_replies), (2, 2));
        assert_eq!(s.message_state(m1).unwrap().as_deref(), Some("answered"));
        assert_eq!(s.message_state(other).unwrap().as_deref(), Some("received"));
        // An empty reply is no answer.
        // The same segment again, or a later one answering the same message: nothing new.
        assert!(
            s.ingest(&id("a"), Seq(1), &items, &turn(), 7)
                .unwrap()
                .duplicate
        );
        assert_eq!(
            s.ingest(&id("a"), Seq(2), &[reply(m1, "again")], &turn(), 7)
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
            .ingest(&id("a"), Seq(3), &[reply(m2, " \n ")], &turn(), 9)
            .unwrap();
        assert_eq!((got.replies, got.dropped_replies), (0, 1));
        assert_eq!(s.message_state(m2).unwrap().as_deref(), Some("published"));
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
        assert_eq!(s.message_state(m).unwrap().as_deref(), Some("failed"));
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
    fn deliveries_retry_then_die_and_timers_fire_once() {
        let (_d, mut s) = store();
        let sid = id("a");
        s.bind(&sid, "telegram", "a", 1).unwrap();
        let timer = OutboxItem::ScheduleRequest(ScheduleRequest {
            at: 500,
            text: "call mum".into(),
        });
        assert_eq!(
            s.ingest(&sid, Seq(1), &[timer], &turn(), 1).unwrap().timers,
            1
        );
        assert_eq!(s.fire_timers(499).unwrap(), 0);
        assert_eq!(s.fire_timers(500).unwrap(), 1);
        assert_eq!(s.fire_timers(501).unwrap(), 0);
        let o = s.next_outbound("telegram", 500).unwrap().unwrap();
        assert_eq!(o.text, "Reminder: call mum");
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
        assert_eq!(s.verify_audit(&MasterKey::from_bytes([1; 32])).unwrap(), 6);
    }
}
