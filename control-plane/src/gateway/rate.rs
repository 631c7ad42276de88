//! How many attempts one requester may make a minute (an agent filing change requests,
//! an admin peer being refused), and how those beyond it are counted instead of recorded
//! one by one.

/// Change requests per requester per minute: beyond the limit an attempt is refused
/// without being filed, and refused attempts are recorded as one count per minute, so a
/// flood costs one audit entry a minute instead of one an attempt.
#[derive(Debug, Default)]
pub struct RateLimit {
    windows: std::collections::HashMap<String, Window>,
}

/// The most requesters counted apart within a minute; any more share [`OVERFLOW`], so
/// a flood of new names cannot grow the map without bound.
pub const MAX_REQUESTERS: usize = 10_000;
/// The name the requesters beyond [`MAX_REQUESTERS`] are counted under.
pub const OVERFLOW: &str = "(others)";

#[derive(Debug, Clone, Copy)]
struct Window {
    start: i64,
    filed: u32,
    refused: u32,
}

/// A minute whose refused attempts are to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusals {
    pub requester: String,
    pub minute_start: i64,
    pub refused: u32,
}

impl RateLimit {
    /// Whether `requester` may file one more request at `now` (seconds), at most
    /// `per_minute` a minute. Returns the finished minute's refusals to record, if any.
    pub fn admit(
        &mut self,
        requester: &str,
        now: i64,
        per_minute: u32,
    ) -> (bool, Option<Refusals>) {
        let requester =
            if self.windows.len() >= MAX_REQUESTERS && !self.windows.contains_key(requester) {
                OVERFLOW
            } else {
                requester
            };
        let w = self.windows.entry(requester.to_owned()).or_insert(Window {
            start: now,
            filed: 0,
            refused: 0,
        });
        let mut done = None;
        if now - w.start >= 60 {
            if w.refused > 0 {
                done = Some(Refusals {
                    requester: requester.to_owned(),
                    minute_start: w.start,
                    refused: w.refused,
                });
            }
            *w = Window {
                start: now,
                filed: 0,
                refused: 0,
            };
        }
        if w.filed < per_minute {
            w.filed += 1;
            (true, done)
        } else {
            w.refused += 1;
            (false, done)
        }
    }

    /// Ends every minute that is over at `now`, returning the refusals to record.
    pub fn flush(&mut self, now: i64) -> Vec<Refusals> {
        let mut out = Vec::new();
        self.windows.retain(|requester, w| {
            if now - w.start < 60 {
                return true;
            }
            if w.refused > 0 {
                out.push(Refusals {
                    requester: requester.clone(),
                    minute_start: w.start,
                    refused: w.refused,
                });
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_refuses_beyond_the_minute_and_counts_every_refusal() {
        let mut r = RateLimit::default();
        let admitted = (0..10).filter(|_| r.admit("agent:a", 100, 3).0).count();
        assert_eq!(admitted, 3);
        assert!(
            r.admit("agent:b", 100, 3).0,
            "each requester has its own minute"
        );
        let (ok, done) = r.admit("agent:a", 160, 3);
        assert!(ok);
        assert_eq!(
            done,
            Some(Refusals {
                requester: "agent:a".into(),
                minute_start: 100,
                refused: 7
            })
        );
        r.admit("agent:a", 161, 1);
        assert_eq!(r.flush(200), Vec::new(), "the minute is not over");
        assert_eq!(r.flush(221).len(), 1);
        assert!(r.windows.is_empty());
    }

    #[test]
    fn new_names_beyond_the_cap_share_one_count() {
        let mut r = RateLimit::default();
        for i in 0..MAX_REQUESTERS {
            assert!(r.admit(&format!("chat:{i}"), 100, 1).0);
        }
        assert!(
            r.admit("chat:new", 100, 1).0,
            "the first one beyond shares a window"
        );
        assert!(
            !r.admit("chat:newer", 100, 1).0,
            "and the next is refused with it"
        );
        assert!(
            r.admit("chat:5", 100, 2).0,
            "a name already counted keeps its own"
        );
        assert_eq!(r.windows.len(), MAX_REQUESTERS + 1);
        let done = r.flush(200);
        assert!(
            done.iter()
                .any(|d| d.requester == OVERFLOW && d.refused == 1)
        );
    }
}
