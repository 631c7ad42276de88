//! What one session has used of its daily budgets that the store enforces (reminders
//! and replies it may queue), counted per day in the store, so a restart or an applied
//! change does not reset them.

use queue_proto::ids::SessionId;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage (
    session TEXT NOT NULL,
    kind TEXT NOT NULL,
    day INTEGER NOT NULL,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (session, kind, day)
);
";

/// One daily budget: how many, and how many bytes, a session may use a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Daily {
    /// The name its use is kept under.
    pub kind: &'static str,
    pub count: i64,
    pub bytes: i64,
}

/// Reminders one session may set a day.
pub const REMINDERS: Daily = Daily {
    kind: "reminders",
    count: 200,
    bytes: 256 * 1024,
};

/// Replies one session may queue a day.
pub const REPLIES: Daily = Daily {
    kind: "replies",
    count: 2000,
    bytes: 8 * 1024 * 1024,
};

/// Files one session may pass on a day, and their bytes.
pub const FILES: Daily = Daily {
    kind: "files",
    count: 100,
    bytes: 512 * 1024 * 1024,
};

/// Voice notes one session may have transcribed a day, and their audio bytes.
pub const TRANSCRIPTIONS: Daily = Daily {
    kind: "transcriptions",
    count: 200,
    bytes: 200 * 1024 * 1024,
};

/// Model tokens (kept as the count) and bytes sent (kept as the bytes) a session used a
/// day: the proxy's meter starts from them, so a restart or an applied change does not
/// hand out the day's model budget again. Recorded as calls are made; no limit here (the
/// proxy holds the approved one).
pub const MODEL: &str = "model";

const DAY_SECS: i64 = 86_400;

/// `session`'s use of `kind` on `day`: (count, bytes).
fn used(
    conn: &Connection,
    session: &SessionId,
    kind: &str,
    day: i64,
) -> rusqlite::Result<(i64, i64)> {
    let used = conn
        .query_row(
            "SELECT count, bytes FROM usage WHERE session = ?1 AND kind = ?2 AND day = ?3",
            params![session.as_str(), kind, day],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(used.unwrap_or((0, 0)))
}

/// Adds `count` and `bytes` to `session`'s use of `kind` on `day` (never wrapping), and
/// forgets its days before yesterday.
fn add(
    conn: &Connection,
    session: &SessionId,
    kind: &str,
    day: i64,
    count: i64,
    bytes: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO usage (session, kind, day, count, bytes) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (session, kind, day) DO UPDATE SET
           count = min(count + excluded.count, 9223372036854775807),
           bytes = min(bytes + excluded.bytes, 9223372036854775807)",
        params![session.as_str(), kind, day, count, bytes],
    )?;
    conn.execute(
        "DELETE FROM usage WHERE session = ?1 AND kind = ?2 AND day < ?3",
        params![session.as_str(), kind, day - 1],
    )?;
    Ok(())
}

/// Charges one use of `bytes` to `session`'s `budget` for the day of `now`, inside
/// `tx`, if it fits; returns whether it did. Days before yesterday are forgotten.
pub(super) fn charge(
    tx: &Transaction<'_>,
    session: &SessionId,
    budget: Daily,
    now: i64,
    bytes: usize,
) -> rusqlite::Result<bool> {
    let day = now.div_euclid(DAY_SECS);
    let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    let (count, used_bytes) = used(tx, session, budget.kind, day)?;
    if count >= budget.count || used_bytes.saturating_add(bytes) > budget.bytes {
        return Ok(false);
    }
    add(tx, session, budget.kind, day, 1, bytes)?;
    Ok(true)
}

impl super::Store {
    /// Charges one use of `bytes` to `session`'s `budget` for the day of `now`, if it
    /// fits; whether it did.
    pub fn charge_usage(
        &mut self,
        session: &SessionId,
        budget: Daily,
        now: i64,
        bytes: usize,
    ) -> Result<bool, super::StoreError> {
        let tx = self.tx()?;
        let ok = charge(&tx, session, budget, now, bytes)?;
        tx.commit()?;
        Ok(ok)
    }

    /// Adds `count` and `bytes` to `session`'s use of `kind` for the day of `now`.
    pub fn add_usage(
        &mut self,
        session: &SessionId,
        kind: &str,
        now: i64,
        count: u64,
        bytes: u64,
    ) -> Result<(), super::StoreError> {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        add(
            &self.conn,
            session,
            kind,
            now.div_euclid(DAY_SECS),
            clamp(count),
            clamp(bytes),
        )?;
        Ok(())
    }

    /// `session`'s use of `kind` for the day of `now`: (count, bytes).
    pub fn usage_today(
        &self,
        session: &SessionId,
        kind: &str,
        now: i64,
    ) -> Result<(u64, u64), super::StoreError> {
        let (c, b) = used(&self.conn, session, kind, now.div_euclid(DAY_SECS))?;
        Ok((c.max(0) as u64, b.max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::{id, store};

    const SMALL: Daily = Daily {
        kind: "test",
        count: 3,
        bytes: 10,
    };

    #[test]
    fn a_daily_budget_holds_for_the_day_and_starts_again_the_next() {
        let (_d, mut s) = store();
        let tx = s.tx().unwrap();
        let a = id("a");
        let day = 20_000 * DAY_SECS;
        assert!(charge(&tx, &a, SMALL, day, 4).unwrap());
        assert!(charge(&tx, &a, SMALL, day + 5, 4).unwrap());
        assert!(
            !charge(&tx, &a, SMALL, day + 6, 3).unwrap(),
            "11 bytes > 10"
        );
        assert!(charge(&tx, &a, SMALL, day + 7, 2).unwrap());
        assert!(!charge(&tx, &a, SMALL, day + 8, 0).unwrap(), "a fourth > 3");
        assert!(
            charge(&tx, &id("b"), SMALL, day + 8, 0).unwrap(),
            "b has its own"
        );
        assert!(
            charge(&tx, &a, SMALL, day + DAY_SECS, 4).unwrap(),
            "a new day"
        );
        let rows: i64 = tx
            .query_row("SELECT count(*) FROM usage WHERE session = 'a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(rows, 2);
    }
}
