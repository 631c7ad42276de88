//! Timers an agent asked for (`schedule`): held per session, and turned into reminders
//! in the outbound queue when they come due.

use queue_proto::ids::SessionId;
use rusqlite::{Transaction, params};

use super::outbound::queue_outbound;
use super::state::OutboundKind;
use super::usage;
use super::{Store, StoreError};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS timers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    due_at INTEGER NOT NULL,
    text TEXT NOT NULL
);
";

/// Timers one session may hold at once.
pub const MAX_TIMERS_PER_SESSION: i64 = 100;

/// How far in the past a reminder may be due and still be set (it then fires at once).
pub const PAST_GRACE_SECS: i64 = 300;

/// Timers moved into the outbound queue by one call of [`Store::fire_timers`], at most.
const FIRE_BATCH: i64 = 256;

/// Adds a timer for `session` inside `tx` at `now`, unless it is due in the past, the
/// session holds [`MAX_TIMERS_PER_SESSION`] already, or its day's
/// [`usage::REMINDERS`] are used up. Returns whether it was added.
pub(super) fn add_timer(
    tx: &Transaction<'_>,
    session: &SessionId,
    due_at: i64,
    text: &str,
    now: i64,
) -> rusqlite::Result<bool> {
    // A reminder set early in a long turn arrives with its segment, a little late: it
    // fires at once. One further in the past is refused.
    if due_at < now.saturating_sub(PAST_GRACE_SECS) {
        return Ok(false);
    }
    let held: i64 = tx.query_row(
        "SELECT count(*) FROM timers WHERE session = ?1",
        params![session.as_str()],
        |r| r.get(0),
    )?;
    if held >= MAX_TIMERS_PER_SESSION
        || !usage::charge(tx, session, usage::REMINDERS, now, text.len())?
    {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO timers (session, due_at, text) VALUES (?1, ?2, ?3)",
        params![session.as_str(), due_at, text],
    )?;
    Ok(true)
}

impl Store {
    /// Moves due timers into the outbound queue as reminders.
    pub fn fire_timers(&mut self, now: i64) -> Result<u32, StoreError> {
        let tx = self.tx()?;
        let mut stmt = tx.prepare(
            "SELECT t.id, t.session, t.text, s.channel, s.chat FROM timers t JOIN sessions s ON s.name = t.session
             WHERE t.due_at <= ?1 ORDER BY t.id LIMIT ?2",
        )?;
        let due: Vec<(i64, String, String, String, String)> = stmt
            .query_map(params![now, FIRE_BATCH], |r| {
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
                OutboundKind::Reminder,
                &format!("Reminder: {text}"),
            )?;
            tx.execute("DELETE FROM timers WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(due.len() as u32)
    }
}
