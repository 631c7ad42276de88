//! The person's time, worked out on the trusted side: the local time each turn is
//! told, and when a reminder the agent asked for is due. The sandbox has no tz
//! database and is not asked to do calendar arithmetic; what the model says about a
//! time is only ever a request, normalised and bounded here.

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use queue_proto::proxy::{Every, ReminderRequest, Weekday};
use serde::{Deserialize, Serialize};

/// How far ahead a reminder may be set.
pub const MAX_AHEAD_DAYS: i64 = 2 * 366;

/// The time zone named `zone`; UTC if the name is unknown (the configuration check
/// refuses such a name, so only a tz database changed under a running serve can).
pub fn zone(name: &str) -> TimeZone {
    TimeZone::get(name).unwrap_or(TimeZone::UTC)
}

/// `at` in the time zone named `zone`, as ISO 8601 with its offset
/// (`2026-12-03T18:04:00+01:00`).
pub fn local_time(zone_name: &str, at: Timestamp) -> String {
    at.to_zoned(zone(zone_name))
        .strftime("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// How a reminder comes back, normalised: stored beside the timer, with its zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub every: Every,
    /// For weekly rules: the days, sorted, without repeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<Weekday>,
    /// For monthly rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_of_month: Option<u8>,
    pub hour: i8,
    pub minute: i8,
}

impl Rule {
    /// The rule in words, as the agent and the operator are shown it.
    pub fn describe(&self) -> String {
        let at = format!("at {:02}:{:02}", self.hour, self.minute);
        match self.every {
            Every::Day => format!("every day {at}"),
            Every::Week => {
                let days: Vec<&str> = self.on.iter().map(|d| weekday_name(*d)).collect();
                format!("every week on {} {at}", days.join(", "))
            }
            Every::Month => format!("every month on day {} {at}", self.day_of_month.unwrap_or(1)),
        }
    }

    fn matches(&self, date: Date) -> bool {
        match self.every {
            Every::Day => true,
            Every::Week => self.on.contains(&weekday(date.weekday())),
            Every::Month => {
                let wanted = self
                    .day_of_month
                    .unwrap_or(1)
                    .min(date.days_in_month() as u8);
                date.day() as u8 == wanted
            }
        }
    }

    /// The first time the rule fires strictly after `after`, in `tz`. A local time the
    /// clocks skip is moved on by the gap; one they pass twice fires at the first.
    pub fn next_after(&self, tz: &TimeZone, after: Timestamp) -> Option<Timestamp> {
        let start = after.to_zoned(tz.clone()).date();
        let time = Time::new(self.hour, self.minute, 0, 0).ok()?;
        // A monthly rule finds its day within 62 days, a weekly one within 8.
        for offset in 0..=62 {
            let date = start.checked_add(offset.days()).ok()?;
            if !self.matches(date) {
                continue;
            }
            let at = date
                .to_datetime(time)
                .to_zoned(tz.clone())
                .ok()?
                .timestamp();
            if at > after {
                return Some(at);
            }
        }
        None
    }
}

/// When a reminder fires first, and how it comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub first: Timestamp,
    pub rule: Option<Rule>,
}

/// Works out a reminder request in `tz` at `now`, or says why it cannot be set.
pub fn plan(request: &ReminderRequest, tz: &TimeZone, now: Timestamp) -> Result<Plan, String> {
    let given = [
        request.in_minutes.is_some(),
        request.at.is_some(),
        request.every.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err("say when with exactly one of in_minutes, at or every".into());
    }
    let recurring_fields =
        !request.on.is_empty() || request.day_of_month.is_some() || request.time.is_some();
    if request.every.is_none() && recurring_fields {
        return Err("on, day_of_month and time go only with every".into());
    }
    let latest = now
        .checked_add((MAX_AHEAD_DAYS * 24).hours())
        .map_err(|_| "the clock is out of range".to_owned())?;
    let plan = if let Some(minutes) = request.in_minutes {
        if minutes == 0 {
            return Err("in_minutes must be at least 1".into());
        }
        let first = now
            .checked_add(i64::from(minutes).minutes())
            .map_err(|_| "in_minutes is too large".to_owned())?;
        Plan { first, rule: None }
    } else if let Some(at) = &request.at {
        let first = parse_at(at, tz)?;
        if first <= now {
            return Err(format!(
                "{} is in the past: it is now {}",
                first.to_zoned(tz.clone()).strftime("%Y-%m-%dT%H:%M:%S%:z"),
                now.to_zoned(tz.clone()).strftime("%Y-%m-%dT%H:%M:%S%:z")
            ));
        }
        Plan { first, rule: None }
    } else {
        let rule = rule(request)?;
        let first = rule
            .next_after(tz, now)
            .ok_or_else(|| "the rule never fires".to_owned())?;
        Plan {
            first,
            rule: Some(rule),
        }
    };
    if plan.first > latest {
        return Err(format!(
            "a reminder may be at most {MAX_AHEAD_DAYS} days ahead"
        ));
    }
    Ok(plan)
}

/// A local date and time in `tz` (`2026-12-08T08:00`, seconds optional), or an instant
/// that carries its own offset (`2026-12-08T08:00:00+01:00`, `...Z`).
fn parse_at(at: &str, tz: &TimeZone) -> Result<Timestamp, String> {
    let bad = || format!("at {at:?} is not a date and time such as 2026-12-08T08:00");
    if let Ok(instant) = at.parse::<Timestamp>() {
        return Ok(instant);
    }
    let local: DateTime = at.parse().map_err(|_| bad())?;
    local
        .to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .map_err(|_| bad())
}

fn rule(request: &ReminderRequest) -> Result<Rule, String> {
    let every = request.every.expect("called only for every");
    let time = request
        .time
        .as_deref()
        .ok_or_else(|| "every needs a time of day, HH:MM".to_owned())?;
    let time: Time = time
        .parse()
        .map_err(|_| format!("time {time:?} is not a time of day such as 08:00"))?;
    let mut on = request.on.clone();
    on.sort();
    on.dedup();
    match every {
        Every::Day if !on.is_empty() || request.day_of_month.is_some() => {
            return Err("every day takes only a time".into());
        }
        Every::Week if on.is_empty() || request.day_of_month.is_some() => {
            return Err(
                "every week needs the days it comes back on (on) and no day_of_month".into(),
            );
        }
        Every::Month
            if !on.is_empty() || !request.day_of_month.is_some_and(|d| (1..=31).contains(&d)) =>
        {
            return Err(
                "every month needs a day_of_month from 1 to 31 and no days of the week".into(),
            );
        }
        _ => {}
    }
    Ok(Rule {
        every,
        on,
        day_of_month: request.day_of_month,
        hour: time.hour(),
        minute: time.minute(),
    })
}

fn weekday(d: jiff::civil::Weekday) -> Weekday {
    use jiff::civil::Weekday as W;
    match d {
        W::Monday => Weekday::Monday,
        W::Tuesday => Weekday::Tuesday,
        W::Wednesday => Weekday::Wednesday,
        W::Thursday => Weekday::Thursday,
        W::Friday => Weekday::Friday,
        W::Saturday => Weekday::Saturday,
        W::Sunday => Weekday::Sunday,
    }
}

fn weekday_name(d: Weekday) -> &'static str {
    match d {
        Weekday::Monday => "monday",
        Weekday::Tuesday => "tuesday",
        Weekday::Wednesday => "wednesday",
        Weekday::Thursday => "thursday",
        Weekday::Friday => "friday",
        Weekday::Saturday => "saturday",
        Weekday::Sunday => "sunday",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn request(json: serde_json::Value) -> ReminderRequest {
        let mut v = json;
        v["text"] = "water the plants".into();
        serde_json::from_value(v).unwrap()
    }

    fn berlin() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    #[test]
    fn the_local_time_carries_the_zones_offset_for_that_day() {
        assert_eq!(
            local_time("Europe/Berlin", at("2026-12-03T17:04:00Z")),
            "2026-12-03T18:04:00+01:00"
        );
        assert_eq!(
            local_time("Europe/Berlin", at("2026-07-01T12:00:00Z")),
            "2026-07-01T14:00:00+02:00"
        );
        assert_eq!(
            local_time("UTC", at("2026-07-01T12:00:00Z")),
            "2026-07-01T12:00:00+00:00"
        );
        assert_eq!(
            local_time("Nowhere/Atlantis", at("2026-07-01T12:00:00Z")),
            "2026-07-01T12:00:00+00:00"
        );
    }

    #[test]
    fn a_delay_counts_from_now_and_a_local_time_is_read_in_the_persons_zone() {
        let now = at("2026-12-03T17:04:00Z");
        let p = plan(
            &request(serde_json::json!({"in_minutes": 2})),
            &berlin(),
            now,
        )
        .unwrap();
        assert_eq!((p.first, p.rule), (at("2026-12-03T17:06:00Z"), None));
        let p = plan(
            &request(serde_json::json!({"at": "2026-12-04T08:00"})),
            &berlin(),
            now,
        )
        .unwrap();
        assert_eq!(p.first, at("2026-12-04T07:00:00Z"));
        // An explicit offset is an instant of its own.
        let p = plan(
            &request(serde_json::json!({"at": "2026-12-04T08:00:00Z"})),
            &berlin(),
            now,
        )
        .unwrap();
        assert_eq!(p.first, at("2026-12-04T08:00:00Z"));
    }

    #[test]
    fn the_past_the_malformed_and_the_far_future_are_refused_with_a_reason() {
        let now = at("2026-12-03T17:04:00Z");
        for (bad, why) in [
            (serde_json::json!({"at": "2026-12-03T18:00"}), "in the past"),
            (serde_json::json!({"at": "tomorrow"}), "not a date"),
            (serde_json::json!({"in_minutes": 0}), "at least 1"),
            (serde_json::json!({"in_minutes": 2_000_000}), "days ahead"),
            (serde_json::json!({"at": "2031-01-01T00:00"}), "days ahead"),
            (serde_json::json!({}), "exactly one"),
            (
                serde_json::json!({"in_minutes": 5, "at": "2026-12-04T08:00"}),
                "exactly one",
            ),
            (
                serde_json::json!({"in_minutes": 5, "time": "08:00"}),
                "only with every",
            ),
            (serde_json::json!({"every": "day"}), "time of day"),
            (
                serde_json::json!({"every": "day", "time": "25:00"}),
                "not a time",
            ),
            (
                serde_json::json!({"every": "week", "time": "08:00"}),
                "days it comes back",
            ),
            (
                serde_json::json!({"every": "month", "time": "08:00", "day_of_month": 32}),
                "1 to 31",
            ),
            (
                serde_json::json!({"every": "day", "time": "08:00", "on": ["monday"]}),
                "only a time",
            ),
        ] {
            let got = plan(&request(bad.clone()), &berlin(), now).unwrap_err();
            assert!(got.contains(why), "{bad}: {got}");
        }
    }

    #[test]
    fn recurring_rules_find_their_next_day_across_weeks_months_and_clock_changes() {
        let tz = berlin();
        // A Thursday evening; "every monday and friday at 08:00" is Friday next.
        let now = at("2026-12-03T17:04:00Z");
        let p = plan(
            &request(serde_json::json!({"every": "week", "on": ["monday", "friday", "monday"], "time": "08:00"})),
            &tz,
            now,
        )
        .unwrap();
        assert_eq!(p.first, at("2026-12-04T07:00:00Z"));
        let rule = p.rule.unwrap();
        assert_eq!(rule.describe(), "every week on monday, friday at 08:00");
        assert_eq!(
            rule.next_after(&tz, p.first),
            Some(at("2026-12-07T07:00:00Z"))
        );
        // Day 31 in a 30-day month is its last day; in February, the 28th.
        let monthly = plan(
            &request(serde_json::json!({"every": "month", "day_of_month": 31, "time": "09:30"})),
            &tz,
            at("2027-01-31T09:00:00Z"),
        )
        .unwrap();
        assert_eq!(monthly.first, at("2027-02-28T08:30:00Z"));
        let rule = monthly.rule.unwrap();
        assert_eq!(
            rule.next_after(&tz, monthly.first),
            Some(at("2027-03-31T07:30:00Z"))
        );
        // Daily at 02:30 on the night Berlin skips 02:00-03:00: moved on by the gap, and
        // the offset of each day is that day's own.
        let daily = plan(
            &request(serde_json::json!({"every": "day", "time": "02:30"})),
            &tz,
            at("2027-03-27T12:00:00Z"),
        )
        .unwrap();
        assert_eq!(daily.first, at("2027-03-28T01:30:00Z"));
        let rule = daily.rule.unwrap();
        assert_eq!(
            rule.next_after(&tz, daily.first),
            Some(at("2027-03-29T00:30:00Z"))
        );
    }
}
