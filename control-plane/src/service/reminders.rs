//! Reminders an agent sets, lists and cancels through its proxy: the request is worked
//! out here, in the session's time zone at the control plane's own clock, and answered
//! with the instant it will fire, or why it will not.

use queue_proto::ids::SessionId;
use queue_proto::proxy::{Reminder, ReminderAnswer, ReminderList, ReminderRequest};

use super::{Service, ServiceError};
use crate::clock;
use crate::proxy::session::{ReminderCall, ReminderReply};
use crate::store::timers::{NewTimer, TimerRow};

impl Service {
    /// The time zone the session's person lives in: the session's own if an operator
    /// set one, else `agent.timezone`.
    pub(super) fn session_zone(&self, session: &SessionId) -> String {
        match self.db(|s| s.session_zone(session)) {
            Ok(Some(zone)) => zone,
            Ok(None) => self.config().agent.timezone.clone(),
            Err(e) => {
                tracing::error!(session = %session, error = %e, "reading a session's time zone failed");
                self.config().agent.timezone.clone()
            }
        }
    }

    /// Sets (or clears, with `None`) `session`'s time zone for operator `by`; the zone
    /// in force for it afterwards. The caller checks the name (see [`zone_known`]).
    pub fn set_session_zone(
        &self,
        session: &SessionId,
        zone: Option<&str>,
        by: &str,
    ) -> Result<String, ServiceError> {
        let now = crate::state::now_secs();
        if !self.db(|s| s.set_session_zone(session, zone, by, now))? {
            return Err(ServiceError::NoSession(session.clone()));
        }
        Ok(self.session_zone(session))
    }
}

/// Whether `zone` is an IANA name this machine's tz database knows.
pub fn zone_known(zone: &str) -> bool {
    zone.len() <= 64 && jiff::tz::TimeZone::get(zone).is_ok()
}

impl Service {
    /// Answers one reminder call of `session`; `None` if the store failed.
    pub(super) fn reminder_call(
        &self,
        session: &SessionId,
        call: ReminderCall,
    ) -> Option<ReminderReply> {
        let now = jiff::Timestamp::now();
        let zone = self.session_zone(session);
        let answer = match call {
            ReminderCall::Set(request) => self.set_reminder(session, &request, &zone, now)?,
            ReminderCall::List => {
                let rows = self
                    .db(|s| s.timers(session))
                    .map_err(|e| tracing::error!(session = %session, error = %e, "listing reminders failed"))
                    .ok()?;
                let reminders = rows.iter().map(|r| shown(r, &zone)).collect();
                return Some(ReminderReply::List(ReminderList { reminders }));
            }
            ReminderCall::Cancel(id) => {
                let Ok(id) = i64::try_from(id) else {
                    return Some(ReminderReply::Answer(not_found()));
                };
                let gone = self
                    .db(|s| s.cancel_reminder(session, id, now.as_second()))
                    .map_err(|e| tracing::error!(session = %session, error = %e, "cancelling a reminder failed"))
                    .ok()?;
                if gone {
                    ReminderAnswer::Cancelled { id: id as u64 }
                } else {
                    not_found()
                }
            }
        };
        Some(ReminderReply::Answer(answer))
    }

    fn set_reminder(
        &self,
        session: &SessionId,
        request: &ReminderRequest,
        zone: &str,
        now: jiff::Timestamp,
    ) -> Option<ReminderAnswer> {
        let plan = match clock::plan(request, &clock::zone(zone), now) {
            Ok(p) => p,
            Err(reason) => return Some(ReminderAnswer::Refused { reason }),
        };
        let timer = NewTimer {
            due_at: plan.first.as_second(),
            text: &request.text,
            rule: plan.rule.as_ref().map(|r| (r, zone)),
        };
        let set = self
            .db(|s| s.set_reminder(session, timer, now.as_second()))
            .map_err(
                |e| tracing::error!(session = %session, error = %e, "setting a reminder failed"),
            )
            .ok()?;
        Some(match set {
            Ok(id) => ReminderAnswer::Set(Reminder {
                id: id as u64,
                next: clock::local_time(zone, plan.first),
                zone: zone.to_owned(),
                repeats: plan.rule.map(|r| r.describe()),
                text: request.text.clone(),
            }),
            Err(refused) => ReminderAnswer::Refused {
                reason: refused.reason(),
            },
        })
    }
}

/// A stored timer as the agent is shown it; a recurring one in its own zone.
fn shown(row: &TimerRow, zone: &str) -> Reminder {
    let zone = row.zone.as_deref().unwrap_or(zone);
    let at = jiff::Timestamp::from_second(row.due_at).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    Reminder {
        id: row.id as u64,
        next: clock::local_time(zone, at),
        zone: zone.to_owned(),
        repeats: row.rule.as_ref().map(clock::Rule::describe),
        text: row.text.clone(),
    }
}

fn not_found() -> ReminderAnswer {
    ReminderAnswer::Refused {
        reason: "there is no such reminder in this conversation".into(),
    }
}
