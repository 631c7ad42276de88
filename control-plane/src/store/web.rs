//! What the web broker keeps per session: the URLs the control plane itself has seen
//! (in the person's messages, in search results it returned, as links of pages it
//! fetched), which are the only URLs an agent may fetch besides operator-granted
//! prefixes; and the session's taint, set when it takes in outside content.

use queue_proto::ids::SessionId;
use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS web_seen (
    session TEXT NOT NULL,
    url TEXT NOT NULL,
    source TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (session, url)
);
CREATE TABLE IF NOT EXISTS web_off (
    session TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS web_taint (
    session TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    at INTEGER NOT NULL,
    clean_messages INTEGER NOT NULL DEFAULT 0
);
";

/// URLs kept per session; beyond it, the oldest are forgotten.
pub const MAX_SEEN_PER_SESSION: i64 = 5000;

/// Messages the person must write, with no outside content read in between, before a
/// session's taint ends: by then what was read has left the 40 messages of history
/// the model is sent.
pub const CLEAN_MESSAGES_TO_END_TAINT: i64 = 20;

/// A session's taint: what it read last, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub url: String,
    pub at: i64,
}

/// One fetch or search, as the audit trail recorded it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WebRecord {
    pub at: i64,
    /// `web_fetched` or `web_searched`.
    pub kind: String,
    pub detail: serde_json::Value,
}

impl Store {
    /// Whether an operator turned the web off for `session`.
    pub fn web_off(&self, session: &SessionId) -> Result<bool, StoreError> {
        Ok(self.conn.query_row(
            "SELECT count(*) > 0 FROM web_off WHERE session = ?1",
            params![session.as_str()],
            |r| r.get(0),
        )?)
    }

    /// Turns the web off (or on again) for `session`.
    pub fn set_web_off(&mut self, session: &SessionId, off: bool) -> Result<(), StoreError> {
        if off {
            self.conn.execute(
                "INSERT OR IGNORE INTO web_off (session) VALUES (?1)",
                params![session.as_str()],
            )?;
        } else {
            self.conn.execute(
                "DELETE FROM web_off WHERE session = ?1",
                params![session.as_str()],
            )?;
        }
        Ok(())
    }

    /// `session`'s last `limit` fetches and searches, newest first, from the trail.
    pub fn web_records(
        &self,
        session: &SessionId,
        limit: u32,
    ) -> Result<Vec<WebRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT at, kind, detail FROM audit WHERE kind IN ('web_fetched', 'web_searched')
             AND json_extract(detail, '$.session') = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![session.as_str(), limit], |r| {
                let detail: String = r.get(2)?;
                Ok(WebRecord {
                    at: r.get(0)?,
                    kind: r.get(1)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Remembers `urls` as seen by the control plane for `session`, from `source`.
    pub fn remember_urls(
        &mut self,
        session: &SessionId,
        urls: &[String],
        source: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        if urls.is_empty() {
            return Ok(());
        }
        let tx = self.tx()?;
        for u in urls {
            tx.execute(
                "INSERT INTO web_seen (session, url, source, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (session, url) DO UPDATE SET at = excluded.at",
                params![session.as_str(), u, source, now],
            )?;
        }
        tx.execute(
            "DELETE FROM web_seen WHERE session = ?1 AND url NOT IN
             (SELECT url FROM web_seen WHERE session = ?1 ORDER BY at DESC LIMIT ?2)",
            params![session.as_str(), MAX_SEEN_PER_SESSION],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Where the control plane saw `url` for `session`, if it did.
    pub fn url_seen(&self, session: &SessionId, url: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT source FROM web_seen WHERE session = ?1 AND url = ?2",
                params![session.as_str(), url],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Marks `session` as having taken in outside content from `url` now.
    pub fn taint(&mut self, session: &SessionId, url: &str, now: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO web_taint (session, url, at, clean_messages) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT (session) DO UPDATE SET url = excluded.url, at = excluded.at, clean_messages = 0",
            params![session.as_str(), url, now],
        )?;
        Ok(())
    }

    /// The person wrote again: one more clean message; the taint ends after
    /// [`CLEAN_MESSAGES_TO_END_TAINT`].
    pub fn person_wrote(&mut self, session: &SessionId) -> Result<(), StoreError> {
        let tx = self.tx()?;
        tx.execute(
            "UPDATE web_taint SET clean_messages = clean_messages + 1 WHERE session = ?1",
            params![session.as_str()],
        )?;
        tx.execute(
            "DELETE FROM web_taint WHERE session = ?1 AND clean_messages > ?2",
            params![session.as_str(), CLEAN_MESSAGES_TO_END_TAINT],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// `session`'s taint, if it has one.
    pub fn taint_of(&self, session: &SessionId) -> Result<Option<Taint>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT url, at FROM web_taint WHERE session = ?1",
                params![session.as_str()],
                |r| {
                    Ok(Taint {
                        url: r.get(0)?,
                        at: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }
}
