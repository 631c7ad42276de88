//! Timers an agent asked for (`schedule`): held per session, and turned into reminders
//! in the outbound queue when they come due. A recurring timer keeps its normalised
//! rule and zone ([`crate::clock::Rule`]) and is moved to its next time when it fires.

use queue_proto::ids::SessionId;
use rusqlite::{Transaction, params};
use serde_json::json;

use super::outbound::queue_outbound;
use super::state::OutboundKind;
use super::usage;
use super::{Store, StoreError};
use crate::audit::{self, AuditEvent};
use crate::clock::{self, Rule};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS timers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session TEXT NOT NULL,
    due_at INTEGER NOT NULL,
    text TEXT NOT NULL,
    rule TEXT,
    zone TEXT
);
";

/// Adds the recurrence columns to a store made before reminders could come back.
pub(super) fn upgrade(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let has: bool = tx.query_row(
        "SELECT count(*) > 0 FROM pragma_table_info('timers') WHERE name = 'rule'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        tx.execute_batch(
            "ALTER TABLE timers ADD COLUMN rule TEXT; ALTER TABLE timers ADD COLUMN zone TEXT;",
        )?;
    }
    Ok(())
}

/// Timers one session may hold at once.
pub const MAX_TIMERS_PER_SESSION: i64 = 100;

/// How far in the past a reminder from an outbox segment may be due and still be set
/// (it then fires at once). One set through the proxy is worked out at the moment it
/// is asked for, and one in the past is refused.
pub const PAST_GRACE_SECS: i64 = 300;

/// Timers moved into the outbound queue by one call of [`Store::fire_timers`], at most.
const FIRE_BATCH: i64 = 256;

/// Why a timer was not added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerRefused {
    Past,
    TooFar,
    TooMany,
    OverBudget,
}

impl TimerRefused {
    /// The reason as the agent is told it.
    pub fn reason(self) -> String {
        match self {
            TimerRefused::Past => "the time is in the past".into(),
            TimerRefused::TooFar => format!(
                "a reminder may be at most {} days ahead",
                clock::MAX_AHEAD_DAYS
            ),
            TimerRefused::TooMany => format!(
                "this conversation holds {MAX_TIMERS_PER_SESSION} reminders already; cancel one first"
            ),
            TimerRefused::OverBudget => format!(
                "today's allowance of {} new reminders is used up",
                usage::REMINDERS.count
            ),
        }
    }
}

/// A timer to add.
#[derive(Debug, Clone, Copy)]
pub struct NewTimer<'a> {
    pub due_at: i64,
    pub text: &'a str,
    /// How it comes back, and in which zone; `None`: once.
    pub rule: Option<(&'a Rule, &'a str)>,
}

/// Adds a timer for `session` inside `tx` at `now`, unless it is due more than
/// `grace` seconds in the past, the session holds [`MAX_TIMERS_PER_SESSION`] already,
/// or its day's [`usage::REMINDERS`] are used up. Returns its id.
pub(super) fn add_timer(
    tx: &Transaction<'_>,
    session: &SessionId,
    timer: NewTimer<'_>,
    now: i64,
    grace: i64,
) -> rusqlite::Result<Result<i64, TimerRefused>> {
    if timer.due_at < now.saturating_sub(grace) {
        return Ok(Err(TimerRefused::Past));
    }
    if timer.due_at > now.saturating_add(clock::MAX_AHEAD_DAYS * 86_400) {
        return Ok(Err(TimerRefused::TooFar));
    }
    let held: i64 = tx.query_row(
        "SELECT count(*) FROM timers WHERE session = ?1",
        params![session.as_str()],
        |r| r.get(0),
    )?;
    if held >= MAX_TIMERS_PER_SESSION {
        return Ok(Err(TimerRefused::TooMany));
    }
    if !usage::charge(tx, session, usage::REMINDERS, now, timer.text.len())? {
        return Ok(Err(TimerRefused::OverBudget));
    }
    let (rule, zone) = match timer.rule {
        Some((r, z)) => (
            Some(serde_json::to_string(r).expect("rules serialise")),
            Some(z),
        ),
        None => (None, None),
    };
    tx.execute(
        "INSERT INTO timers (session, due_at, text, rule, zone) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![session.as_str(), timer.due_at, timer.text, rule, zone],
    )?;
    Ok(Ok(tx.last_insert_rowid()))
}

/// A timer as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerRow {
    pub id: i64,
    pub due_at: i64,
    pub text: String,
    pub rule: Option<Rule>,
    /// The zone its rule is read in; `None` for a one-off timer.
    pub zone: Option<String>,
}

fn timer_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TimerRow> {
    let rule: Option<String> = r.get(3)?;
    Ok(TimerRow {
        id: r.get(0)?,
        due_at: r.get(1)?,
        text: r.get(2)?,
        // A rule this build cannot read fires once and is not moved on.
        rule: rule.and_then(|j| serde_json::from_str(&j).ok()),
        zone: r.get(4)?,
    })
}

impl Store {
    /// Sets a reminder the agent asked for through its proxy, with its audit entry.
    pub fn set_reminder(
        &mut self,
        session: &SessionId,
        timer: NewTimer<'_>,
        now: i64,
    ) -> Result<Result<i64, TimerRefused>, StoreError> {
        let tx = self.tx()?;
        let added = add_timer(&tx, session, timer, now, 0)?;
        if let Ok(id) = added {
            audit::append(
                &tx,
                now,
                AuditEvent::ReminderSet,
                &json!({ "session": session.as_str(), "id": id, "due_at": timer.due_at,
                         "repeats": timer.rule.map(|(r, _)| r.describe()),
                         "zone": timer.rule.map(|(_, z)| z), "text_bytes": timer.text.len() }),
            )?;
        }
        tx.commit()?;
        Ok(added)
    }

    /// The session's timers, soonest first.
    pub fn timers(&self, session: &SessionId) -> Result<Vec<TimerRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, due_at, text, rule, zone FROM timers WHERE session = ?1 ORDER BY due_at, id",
        )?;
        let rows = stmt
            .query_map(params![session.as_str()], timer_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Cancels the session's timer `id`; whether there was one. Another session's
    /// timer is not found.
    pub fn cancel_reminder(
        &mut self,
        session: &SessionId,
        id: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.tx()?;
        let gone = tx.execute(
            "DELETE FROM timers WHERE id = ?1 AND session = ?2",
            params![id, session.as_str()],
        )? > 0;
        if gone {
            audit::append(
                &tx,
                now,
                AuditEvent::ReminderCancelled,
                &json!({ "session": session.as_str(), "id": id }),
            )?;
        }
        tx.commit()?;
        Ok(gone)
    }

    /// Moves due timers into the outbound queue as reminders; a recurring one is moved
    /// on to its next time after now (a stretch while serve was down fires it once).
    pub fn fire_timers(&mut self, now: i64) -> Result<u32, StoreError> {
        let tx = self.tx()?;
        let mut stmt = tx.prepare(
            "SELECT t.id, t.due_at, t.text, t.rule, t.zone, t.session, s.channel, s.chat
             FROM timers t JOIN sessions s ON s.name = t.session
             WHERE t.due_at <= ?1 ORDER BY t.id LIMIT ?2",
        )?;
        let due: Vec<(TimerRow, String, String, String)> = stmt
            .query_map(params![now, FIRE_BATCH], |r| {
                Ok((timer_row(r)?, r.get(5)?, r.get(6)?, r.get(7)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        drop(stmt);
        for (timer, session, channel, chat) in &due {
            let s = SessionId::try_from(session.as_str()).map_err(|_| StoreError::BadSession)?;
            queue_outbound(
                &tx,
                channel,
                chat,
                Some(&s),
                None,
                OutboundKind::Reminder,
                &format!("Reminder: {}", timer.text),
            )?;
            let next = timer.rule.as_ref().and_then(|rule| {
                let tz = clock::zone(timer.zone.as_deref().unwrap_or("UTC"));
                let after = jiff::Timestamp::from_second(now.max(timer.due_at)).ok()?;
                rule.next_after(&tz, after).map(|t| t.as_second())
            });
            match next {
                Some(at) => tx.execute(
                    "UPDATE timers SET due_at = ?2 WHERE id = ?1",
                    params![timer.id, at],
                )?,
                None => tx.execute("DELETE FROM timers WHERE id = ?1", params![timer.id])?,
            };
        }
        tx.commit()?;
        Ok(due.len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{id, store};
    use queue_proto::proxy::{Every, Weekday};

    #[test]
    fn a_recurring_timer_fires_at_each_time_and_a_cancelled_one_never() {
        let (_d, mut s) = store();
        let (a, b) = (id("a"), id("b"));
        s.bind(&a, "telegram", "a", 1).unwrap();
        s.bind(&b, "telegram", "b", 1).unwrap();
        // Every Monday and Wednesday at 08:00 in Berlin, first due Monday 2026-12-07.
        let rule = Rule {
            every: Every::Week,
            on: vec![Weekday::Monday, Weekday::Wednesday],
            day_of_month: None,
            hour: 8,
            minute: 0,
        };
        let first: jiff::Timestamp = "2026-12-07T07:00:00Z".parse().unwrap();
        let timer = NewTimer {
            due_at: first.as_second(),
            text: "stretch",
            rule: Some((&rule, "Europe/Berlin")),
        };
        let now = first.as_second() - 60;
        let id_a = s.set_reminder(&a, timer, now).unwrap().unwrap();
        // A one-off timer in the past is refused through the proxy's path.
        let past = NewTimer {
            due_at: now - 1,
            text: "late",
            rule: None,
        };
        assert_eq!(
            s.set_reminder(&a, past, now).unwrap(),
            Err(TimerRefused::Past)
        );
        assert_eq!(s.fire_timers(first.as_second() - 1).unwrap(), 0);
        assert_eq!(s.fire_timers(first.as_second()).unwrap(), 1);
        let wednesday: jiff::Timestamp = "2026-12-09T07:00:00Z".parse().unwrap();
        let rows = s.timers(&a).unwrap();
        assert_eq!((rows.len(), rows[0].due_at), (1, wednesday.as_second()));
        assert_eq!(s.fire_timers(wednesday.as_second() + 5).unwrap(), 1);
        let next_monday: jiff::Timestamp = "2026-12-14T07:00:00Z".parse().unwrap();
        assert_eq!(s.timers(&a).unwrap()[0].due_at, next_monday.as_second());
        // Another session cannot cancel it; its own can, and then it never fires.
        assert!(!s.cancel_reminder(&b, id_a, now).unwrap());
        assert!(s.cancel_reminder(&a, id_a, now).unwrap());
        assert_eq!(
            s.fire_timers(next_monday.as_second() + 86_400 * 30)
                .unwrap(),
            0
        );
    }
}
