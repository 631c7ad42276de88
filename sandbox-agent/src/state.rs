//! The agent's own durable state, in an SQLCipher database under `/outbox/state` keyed
//! with the agent-state key: its cursors, its configuration, its notes and its
//! conversation memory. Nothing here crosses to the control plane except through
//! outbox segments.

use std::path::Path;

use queue_proto::ids::Seq;
use queue_proto::items::AgentConfig;
use queue_proto::keys::SecretKey;
use queue_proto::proxy::ChatMessage;
use rusqlite::{Connection, OptionalExtension, params};

/// How many past messages go into each model call.
pub(crate) const HISTORY_MESSAGES: usize = 40;
/// Most bytes of history sent with a model call.
pub(crate) const MAX_HISTORY_BYTES: usize = 512 * 1024;

#[derive(Debug)]
pub(crate) struct State {
    conn: Connection,
}

impl State {
    pub(crate) fn open(path: &Path, key: &SecretKey) -> rusqlite::Result<State> {
        let conn = queue_proto::sqlcipher::open_keyed(path, key)?;
        // The agent is this database's only user: an exclusive lock, taken before WAL is
        // switched on, lets WAL keep its index in memory (no shared-memory file), and
        // the journal mode is left as the file has it. A commit appends to the log
        // without a sync. Each sync is a round trip through gVisor's gofer; a crash of
        // the box loses nothing committed, and a lost cursor only makes the agent handle
        // a segment again, which the control plane de-duplicates.
        conn.execute_batch(
            "PRAGMA locking_mode = EXCLUSIVE; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
        )?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS cursor (id INTEGER PRIMARY KEY CHECK (id = 1), inbox INTEGER NOT NULL, outbox INTEGER NOT NULL);
             INSERT OR IGNORE INTO cursor VALUES (1, 0, 0);
             CREATE TABLE IF NOT EXISTS config (id INTEGER PRIMARY KEY CHECK (id = 1), json TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS notes (name TEXT PRIMARY KEY, body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY AUTOINCREMENT, json TEXT NOT NULL);",
        )?;
        Ok(State { conn })
    }

    /// The last inbox seq fully handled (0: none; segments start at 1).
    pub(crate) fn inbox_cursor(&self) -> rusqlite::Result<Seq> {
        self.conn
            .query_row("SELECT inbox FROM cursor", [], |r| r.get::<_, i64>(0))
            .map(|v| Seq(v as u64))
    }

    /// The next outbox seq to publish.
    pub(crate) fn next_outbox(&self) -> rusqlite::Result<Seq> {
        self.conn
            .query_row("SELECT outbox FROM cursor", [], |r| r.get::<_, i64>(0))
            .map(|v| Seq(v as u64 + 1))
    }

    /// Records that inbox `inbox` is handled and outbox `outbox` is published.
    pub(crate) fn advance(&self, inbox: Seq, outbox: Option<Seq>) -> rusqlite::Result<()> {
        self.conn
            .execute(
                "UPDATE cursor SET inbox = ?1, outbox = coalesce(?2, outbox)",
                params![inbox.0 as i64, outbox.map(|o| o.0 as i64)],
            )
            .map(drop)
    }

    pub(crate) fn config(&self) -> rusqlite::Result<Option<AgentConfig>> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT json FROM config", [], |r| r.get(0))
            .optional()?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Stores `config`; a write only when it differs from the stored one.
    pub(crate) fn set_config(&self, config: &AgentConfig) -> rusqlite::Result<()> {
        let json = serde_json::to_string(config).expect("configs serialise");
        self.conn
            .execute(
                "INSERT INTO config VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET json = excluded.json
                 WHERE json IS NOT excluded.json",
                params![json],
            )
            .map(drop)
    }

    pub(crate) fn write_note(&self, name: &str, body: &str) -> rusqlite::Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO notes VALUES (?1, ?2)",
                params![name, body],
            )
            .map(drop)
    }

    pub(crate) fn read_note(&self, name: &str) -> rusqlite::Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT body FROM notes WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
    }

    pub(crate) fn note_names(&self) -> rusqlite::Result<Vec<String>> {
        let mut stmt = self.conn.prepare("SELECT name FROM notes ORDER BY name")?;
        stmt.query_map([], |r| r.get(0))?.collect()
    }

    pub(crate) fn remember(&self, message: &ChatMessage) -> rusqlite::Result<()> {
        let json = serde_json::to_string(message).expect("messages serialise");
        self.conn
            .execute("INSERT INTO history (json) VALUES (?1)", params![json])
            .map(drop)
    }

    /// Keeps an assistant message and the tool results that answer it, in one
    /// transaction.
    pub(crate) fn remember_pair(
        &self,
        call: &ChatMessage,
        results: &ChatMessage,
    ) -> rusqlite::Result<()> {
        self.conn.execute_batch("BEGIN")?;
        let kept = self.remember(call).and_then(|()| self.remember(results));
        self.conn
            .execute_batch(if kept.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
        kept
    }

    /// The most recent messages, oldest first, starting at a user message.
    pub(crate) fn recent(&self) -> rusqlite::Result<Vec<ChatMessage>> {
        let mut stmt = self
            .conn
            .prepare("SELECT json FROM history ORDER BY id DESC LIMIT ?1")?;
        let rows: Vec<String> = stmt
            .query_map(params![HISTORY_MESSAGES as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut messages: Vec<ChatMessage> = rows
            .iter()
            .rev()
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect();
        // A window that opens on a tool result or an assistant turn confuses providers.
        while messages.first().is_some_and(not_an_opening) {
            messages.remove(0);
        }
        // Keep the model request well under the proxy's 1 MiB limit: drop the oldest
        // messages until the history fits, never opening on an answer.
        while serde_json::to_vec(&messages).map_or(0, |b| b.len()) > MAX_HISTORY_BYTES {
            messages.remove(0);
            while messages.first().is_some_and(not_an_opening) {
                messages.remove(0);
            }
        }
        Ok(messages)
    }
}

/// A window that opens on an assistant turn or a tool result confuses providers.
fn not_an_opening(m: &ChatMessage) -> bool {
    m.role != queue_proto::proxy::Role::User
        || m.content
            .iter()
            .any(|b| matches!(b, queue_proto::proxy::ContentBlock::ToolResult { .. }))
}
