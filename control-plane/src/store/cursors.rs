//! Cursors: one value per name that a channel (the Telegram offset) or the gateway (the
//! configuration file last looked at) keeps across restarts. A channel's cursor moves
//! in the same transaction as whatever the update it passes was turned into, so an
//! update is never both skipped and lost.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Store, StoreError};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS channel_state (
    channel TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// A cursor's new value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor<'a> {
    /// Whose cursor: a channel's name, or [`super::changes::FILE_SEEN`].
    pub name: &'a str,
    pub value: &'a str,
}

impl Store {
    /// The stored value of cursor `name`.
    pub fn cursor(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT value FROM channel_state WHERE channel = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Moves a cursor on its own (an update with nothing to store).
    pub fn set_cursor(&mut self, cursor: Cursor<'_>) -> Result<(), StoreError> {
        let tx = self.tx()?;
        set_cursor(&tx, Some(cursor))?;
        tx.commit()?;
        Ok(())
    }
}

/// Moves `cursor`, if any, inside `tx`.
pub(super) fn set_cursor(tx: &Transaction<'_>, cursor: Option<Cursor<'_>>) -> rusqlite::Result<()> {
    if let Some(c) = cursor {
        tx.execute(
            "INSERT INTO channel_state (channel, value) VALUES (?1, ?2)
             ON CONFLICT (channel) DO UPDATE SET value = excluded.value",
            params![c.name, c.value],
        )?;
    }
    Ok(())
}
