//! Reminders an agent sets, lists and cancels through its proxy: the request is worked
//! out here, in the session's time zone at the control plane's own clock, and answered
//! with the instant it will fire, or why it will not.

use queue_proto::ids::SessionId;
use queue_proto::proxy::{Reminder, ReminderAnswer, ReminderList, ReminderRequest};

use super::Service;
use crate::clock;
use crate::proxy::session::{ReminderCall, ReminderReply};
use crate::store::timers::{NewTimer, TimerRow};

impl Service {
    /// The time zone the session's person lives in.
    fn session_zone(&self, _session: &SessionId) -> String {
        self.config().agent.timezone.clone()
    }

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
