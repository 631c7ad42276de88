//! Per-session budgets: for model calls (requests per minute, tokens per day, bytes sent
//! per day), and for taking in outbox segments ([`INGEST_BUDGETS`]: segments per minute,
//! bytes per day). Pure bookkeeping over a caller-supplied clock (milliseconds since the Unix
//! epoch), so it is tested without waiting.

use std::collections::VecDeque;

const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

/// The approved limits of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub requests_per_minute: u32,
    pub tokens_per_day: u64,
    pub bytes_per_day: u64,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            requests_per_minute: 20,
            tokens_per_day: 1_000_000,
            bytes_per_day: 50 * 1024 * 1024,
        }
    }
}

/// What one session's outbox may cost the control plane: each segment announced is
/// copied and checked and costs a synced write, so at most 600 a minute (ten a second,
/// more than a person typing into a script makes) and 256 MiB a day. Tokens do not
/// apply.
pub const INGEST_BUDGETS: Budgets = Budgets {
    requests_per_minute: 600,
    tokens_per_day: u64::MAX,
    bytes_per_day: 256 * 1024 * 1024,
};

/// What one session's reminder calls (set, list, cancel) may cost: each is a
/// transaction on the control store, so at most 60 a minute and 16 MiB a day. What is
/// set is charged again to the day's reminders in the store.
pub const REMINDER_CALL_BUDGETS: Budgets = Budgets {
    requests_per_minute: 60,
    tokens_per_day: u64::MAX,
    bytes_per_day: 16 * 1024 * 1024,
};

/// How often one session's agent may ask for a transcript: each is a call to the
/// transcription service (the day's audio is charged in the store).
pub const TRANSCRIPTION_CALL_BUDGETS: Budgets = Budgets {
    requests_per_minute: 10,
    tokens_per_day: u64::MAX,
    bytes_per_day: u64::MAX,
};

/// How often one session's agent may fetch or search: each is a connection the control
/// plane makes (the day's requests and bytes are the approved `[web]` budgets).
pub const WEB_CALL_BUDGETS: Budgets = Budgets {
    requests_per_minute: 20,
    tokens_per_day: u64::MAX,
    bytes_per_day: u64::MAX,
};

/// Which budget a refused call ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetExceeded {
    #[error("more than {0} requests in a minute")]
    RequestsPerMinute(u32),
    #[error("the daily token budget of {0} is used up")]
    TokensPerDay(u64),
    #[error("the daily budget of {0} bytes is used up")]
    BytesPerDay(u64),
}

/// What one session has spent.
#[derive(Debug, Clone)]
pub struct BudgetMeter {
    budgets: Budgets,
    recent: VecDeque<u64>,
    day: u64,
    tokens: u64,
    bytes: u64,
}

impl BudgetMeter {
    pub fn new(budgets: Budgets) -> Self {
        BudgetMeter {
            budgets,
            recent: VecDeque::new(),
            day: 0,
            tokens: 0,
            bytes: 0,
        }
    }

    fn roll(&mut self, now_ms: u64) {
        let day = now_ms / DAY_MS;
        if day != self.day {
            self.day = day;
            self.tokens = 0;
            self.bytes = 0;
        }
        while self
            .recent
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) >= MINUTE_MS)
        {
            self.recent.pop_front();
        }
    }

    /// The meter of a session that already used `tokens` and `bytes` on the day of
    /// `now_ms` (kept in the store across restarts and applied changes).
    pub fn spent_today(mut self, now_ms: u64, tokens: u64, bytes: u64) -> Self {
        self.day = now_ms / DAY_MS;
        self.tokens = tokens;
        self.bytes = bytes;
        self
    }

    /// Admits a call that will send `bytes` upstream, or refuses it. An admitted call is
    /// counted at once, so a refused upstream still costs its request.
    pub fn admit(&mut self, now_ms: u64, bytes: u64) -> Result<(), BudgetExceeded> {
        self.roll(now_ms);
        let b = self.budgets;
        if self.recent.len() >= b.requests_per_minute as usize {
            return Err(BudgetExceeded::RequestsPerMinute(b.requests_per_minute));
        }
        if self.tokens >= b.tokens_per_day {
            return Err(BudgetExceeded::TokensPerDay(b.tokens_per_day));
        }
        if self.bytes.saturating_add(bytes) > b.bytes_per_day {
            return Err(BudgetExceeded::BytesPerDay(b.bytes_per_day));
        }
        self.recent.push_back(now_ms);
        self.bytes += bytes;
        Ok(())
    }

    /// Records the tokens a finished call used.
    pub fn record_tokens(&mut self, now_ms: u64, tokens: u64) {
        self.roll(now_ms);
        self.tokens = self.tokens.saturating_add(tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn meter(rpm: u32, tokens: u64, bytes: u64) -> BudgetMeter {
        BudgetMeter::new(Budgets {
            requests_per_minute: rpm,
            tokens_per_day: tokens,
            bytes_per_day: bytes,
        })
    }

    #[test]
    fn requests_per_minute_slide() {
        let mut m = meter(3, u64::MAX, u64::MAX);
        for i in 0..3 {
            m.admit(T0 + i * 1000, 1).unwrap();
        }
        assert_eq!(
            m.admit(T0 + 59_000, 1),
            Err(BudgetExceeded::RequestsPerMinute(3))
        );
        // The first request leaves the window after a minute.
        m.admit(T0 + 60_000, 1).unwrap();
        assert!(m.admit(T0 + 60_500, 1).is_err());
    }

    #[test]
    fn tokens_and_bytes_reset_each_day() {
        let mut m = meter(1000, 100, 1000);
        m.admit(T0, 600).unwrap();
        assert_eq!(m.admit(T0 + 1, 401), Err(BudgetExceeded::BytesPerDay(1000)));
        m.admit(T0 + 2, 400).unwrap();
        m.record_tokens(T0 + 3, 100);
        assert_eq!(m.admit(T0 + 4, 0), Err(BudgetExceeded::TokensPerDay(100)));
        let tomorrow = (T0 / DAY_MS + 1) * DAY_MS;
        m.admit(tomorrow, 1000).unwrap();
    }

    #[test]
    fn a_refused_call_costs_nothing() {
        let mut m = meter(1, u64::MAX, 10);
        assert!(m.admit(T0, 11).is_err());
        m.admit(T0, 10).unwrap();
    }
}
