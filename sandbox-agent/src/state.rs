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
             CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY AUTOINCREMENT, json TEXT NOT NULL);
             CREATE VIRTUAL TABLE IF NOT EXISTS memory USING fts5(
                 kind UNINDEXED, ref UNINDEXED, text, tokenize = 'unicode61 remove_diacritics 2');",
        )?;
        // Provenance, added to a database made before notes kept it.
        let has: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('notes') WHERE name = 'turn'",
            [],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch(
                "ALTER TABLE notes ADD COLUMN turn INTEGER; ALTER TABLE notes ADD COLUMN outside INTEGER NOT NULL DEFAULT 0;",
            )?;
        }
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

    /// Writes (or overwrites) note `name`, with where it came from, and indexes it.
    pub(crate) fn write_note(
        &self,
        name: &str,
        body: &str,
        from: Provenance,
    ) -> rusqlite::Result<()> {
        self.in_tx(|| {
            self.conn.execute(
                "INSERT OR REPLACE INTO notes (name, body, turn, outside) VALUES (?1, ?2, ?3, ?4)",
                params![name, body, from.turn as i64, from.outside],
            )?;
            self.unindex("note", name)?;
            self.conn.execute(
                "INSERT INTO memory (kind, ref, text) VALUES ('note', ?1, ?2)",
                params![name, format!("{name}\n{body}")],
            )?;
            Ok(())
        })
    }

    /// Deletes note `name` and its index entry; whether there was one.
    pub(crate) fn delete_note(&self, name: &str) -> rusqlite::Result<bool> {
        self.in_tx(|| {
            let gone = self
                .conn
                .execute("DELETE FROM notes WHERE name = ?1", params![name])?;
            self.unindex("note", name)?;
            Ok(gone > 0)
        })
    }

    fn unindex(&self, kind: &str, reference: &str) -> rusqlite::Result<()> {
        self.conn
            .execute(
                "DELETE FROM memory WHERE kind = ?1 AND ref = ?2",
                params![kind, reference],
            )
            .map(drop)
    }

    pub(crate) fn read_note(&self, name: &str) -> rusqlite::Result<Option<(String, Provenance)>> {
        self.conn
            .query_row(
                "SELECT body, turn, outside FROM notes WHERE name = ?1",
                params![name],
                |r| {
                    Ok((
                        r.get(0)?,
                        Provenance {
                            turn: r.get::<_, Option<i64>>(1)?.unwrap_or(0) as u64,
                            outside: r.get(2)?,
                        },
                    ))
                },
            )
            .optional()
    }

    pub(crate) fn note_names(&self) -> rusqlite::Result<Vec<String>> {
        let mut stmt = self.conn.prepare("SELECT name FROM notes ORDER BY name")?;
        stmt.query_map([], |r| r.get(0))?.collect()
    }

    /// Full-text search over the notes and the whole conversation, best matches first.
    /// The query's words are matched as plain words (any of them), never as FTS5 syntax.
    pub(crate) fn search(&self, query: &str) -> rusqlite::Result<Vec<Found>> {
        let words: Vec<String> = query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .take(MAX_QUERY_WORDS)
            .map(|w| format!("\"{}\"", w.chars().take(64).collect::<String>()))
            .collect();
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let mut stmt = self.conn.prepare(
            "SELECT kind, ref, snippet(memory, 2, '[', ']', '…', 24) FROM memory
             WHERE memory MATCH ?1 ORDER BY bm25(memory) LIMIT ?2",
        )?;
        stmt.query_map(params![words.join(" OR "), MAX_FOUND as i64], |r| {
            Ok(Found {
                kind: r.get(0)?,
                reference: r.get(1)?,
                snippet: r.get(2)?,
            })
        })?
        .collect()
    }

    fn in_tx<T>(&self, f: impl FnOnce() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        self.conn.execute_batch("BEGIN")?;
        let done = f();
        self.conn
            .execute_batch(if done.is_ok() { "COMMIT" } else { "ROLLBACK" })?;
        done
    }

    /// Keeps a message of the conversation, and indexes what was said in it.
    pub(crate) fn remember(&self, message: &ChatMessage) -> rusqlite::Result<()> {
        self.in_tx(|| self.keep(message))
    }

    fn keep(&self, message: &ChatMessage) -> rusqlite::Result<()> {
        let json = serde_json::to_string(message).expect("messages serialise");
        self.conn
            .execute("INSERT INTO history (json) VALUES (?1)", params![json])?;
        let said = said(message);
        if !said.is_empty() {
            let id = self.conn.last_insert_rowid();
            self.conn.execute(
                "INSERT INTO memory (kind, ref, text) VALUES (?1, ?2, ?3)",
                params![role_name(message.role), id.to_string(), said],
            )?;
        }
        Ok(())
    }

    /// Keeps an assistant message and the tool results that answer it, in one
    /// transaction.
    pub(crate) fn remember_pair(
        &self,
        call: &ChatMessage,
        results: &ChatMessage,
    ) -> rusqlite::Result<()> {
        self.in_tx(|| self.keep(call).and_then(|()| self.keep(results)))
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

/// Most words of a search query used.
const MAX_QUERY_WORDS: usize = 16;
/// Most matches a search returns.
const MAX_FOUND: usize = 8;

/// Where a note came from: the message whose turn wrote it, and whether that turn had
/// read outside content (a document, a transcript), as the inbox said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Provenance {
    pub(crate) turn: u64,
    pub(crate) outside: bool,
}

/// One search match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Found {
    /// `note`, `person` or `assistant`.
    pub(crate) kind: String,
    /// The note's name, or the conversation message's number.
    pub(crate) reference: String,
    pub(crate) snippet: String,
}

fn role_name(role: queue_proto::proxy::Role) -> &'static str {
    match role {
        queue_proto::proxy::Role::User => "person",
        queue_proto::proxy::Role::Assistant => "assistant",
    }
}

/// What was said in a message, for the index: its text, and the text of replies sent
/// through the reply tool. Tool results are not what anyone said.
fn said(message: &ChatMessage) -> String {
    use queue_proto::proxy::ContentBlock;
    let mut parts = Vec::new();
    for block in &message.content {
        match block {
            ContentBlock::Text { text } => parts.push(text.as_str()),
            ContentBlock::ToolUse { name, input, .. } if name == "reply" => {
                if let Some(t) = input["text"].as_str() {
                    parts.push(t);
                }
            }
            _ => {}
        }
    }
    parts.join("\n")
}

/// A window that opens on an assistant turn or a tool result confuses providers.
fn not_an_opening(m: &ChatMessage) -> bool {
    m.role != queue_proto::proxy::Role::User
        || m.content
            .iter()
            .any(|b| matches!(b, queue_proto::proxy::ContentBlock::ToolResult { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue_proto::proxy::{ContentBlock, Role};

    fn open() -> (std::path::PathBuf, State) {
        let dir = std::env::temp_dir().join(format!(
            "agent-state-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = State::open(&dir.join("state.db"), &SecretKey::from_bytes([7; 32])).unwrap();
        (dir, state)
    }

    fn said_by(role: Role, text: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: vec![ContentBlock::Text { text: text.into() }],
        }
    }

    #[test]
    fn what_left_the_history_is_still_found_and_a_deleted_note_is_not() {
        let (dir, s) = open();
        s.remember(&said_by(
            Role::User,
            "my locker code is 4711, remember the blue door",
        ))
        .unwrap();
        for i in 0..HISTORY_MESSAGES + 5 {
            s.remember(&said_by(Role::User, &format!("small talk {i}")))
                .unwrap();
        }
        let window = s.recent().unwrap();
        assert!(
            !serde_json::to_string(&window)
                .unwrap()
                .contains("blue door")
        );
        let found = s.search("which door? the BLUE one").unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].kind, "person");
        assert!(found[0].snippet.contains("[blue]"), "{:?}", found[0]);

        let from = Provenance {
            turn: 9,
            outside: true,
        };
        s.write_note("garage", "the spare key is under the flowerpot", from)
            .unwrap();
        s.write_note("garage", "the spare key is with the neighbour", from)
            .unwrap();
        let hits = s.search("flowerpot").unwrap();
        assert!(
            hits.is_empty(),
            "an overwritten note's old words are gone: {hits:?}"
        );
        let hits = s.search("neighbour").unwrap();
        assert_eq!(
            (hits[0].kind.as_str(), hits[0].reference.as_str()),
            ("note", "garage")
        );
        assert_eq!(s.read_note("garage").unwrap().unwrap().1, from);
        assert!(s.delete_note("garage").unwrap());
        assert!(!s.delete_note("garage").unwrap());
        assert!(s.search("neighbour").unwrap().is_empty());
        assert!(s.read_note("garage").unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_query_is_words_never_fts5_syntax() {
        let (dir, s) = open();
        s.remember(&said_by(Role::User, "near the station"))
            .unwrap();
        for q in ["\"", "NEAR(a b)", "* ^ : -", "text:station", "station)", ""] {
            // Never an error: syntax is not passed through.
            s.search(q).unwrap();
        }
        assert_eq!(s.search("text:station").unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
