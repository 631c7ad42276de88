//! Approval prompts and button presses. Prompts go to each operator's private chat. A
//! button press decides only as the Telegram user who pressed it
//! (`callback_query.from.id`, which Telegram vouches for), only in a private chat, and
//! only for an operator; every press is answered and recorded, and the buttons are
//! removed once the request is decided.
//!
//! What enforces "approve exactly what was shown" is pure and tested here:
//! [`prompt_text`] says whether a prompt shows the whole change, [`buttons`] offers
//! Approve only then and puts the shown text's hash in each button, [`judge`] lets a
//! press decide only as its presser, in their private chat with the bot, with a hash of
//! the right length, and never approve a change too long for its prompt, and
//! [`closing`] removes the buttons of a decided or expired request. The decision itself
//! (whether the presser is an operator, whether the hash names the request's text,
//! whether the request is still pending) is the service's.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use super::api::{CallError, MAX_ANSWER_BYTES};
use super::updates::{CallbackQuery, SentMessage};
use super::{MAX_MESSAGE_UNITS, Telegram};
use crate::audit::AuditEvent;
use crate::channels::split_message;
use crate::gateway;
use crate::operator::Identity;
use crate::service::{Service, telegram_may_approve};
use crate::store::changes::{ChangeDetail, Decided, Decision, Prompt};

/// The longest diff put in a prompt; the rest is a pointer to `changes show`.
const PROMPT_DIFF_CHARS: usize = 2500;
/// Hex digits of the text's SHA-256 carried in a button (callback data is at most 64
/// bytes): the press decides only the text it was shown with.
const BUTTON_HASH_DIGITS: usize = 32;

/// Sends waiting approval prompts and removes the buttons of decided ones, until the
/// task is aborted.
pub async fn prompts(service: Arc<Service>, tg: Arc<Telegram>) {
    loop {
        let due = service.prompts_due().unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading approval prompts failed");
            Vec::new()
        });
        let mut retry = false;
        for p in &due {
            retry |= !prompt_step(&service, &tg, p).await;
        }
        let wait = if retry { 10 } else { 60 };
        let _ = tokio::time::timeout(Duration::from_secs(wait), service.prompts_changed()).await;
    }
}

/// Sends or closes one prompt; false if it should be tried again later.
async fn prompt_step(service: &Service, tg: &Telegram, p: &Prompt) -> bool {
    let timeout = Duration::from_secs(30);
    let done = |sent: Option<i64>| service.prompt_done(&p.change_id, p.chat, sent).is_ok();
    if let Some(body) = closing(p) {
        return match tg
            .api
            .call::<IgnoredAny>("editMessageText", &body, timeout, MAX_ANSWER_BYTES)
            .await
        {
            Ok(_) => done(None),
            Err(CallError::Status { code, .. }) if code < 500 && code != 429 => done(None),
            Err(_) => false,
        };
    }
    let Ok(Some(detail)) = service.change(&p.change_id) else {
        return done(None);
    };
    let risk_ok = telegram_may_approve(&service.config(), detail.summary.risk);
    let (text, whole) = prompt_text(&detail, risk_ok);
    let body = json!({
        "chat_id": p.chat,
        "text": text,
        "reply_markup": { "inline_keyboard": [buttons(&p.change_id, &detail.after_hash, whole)] },
    });
    match tg
        .api
        .call::<SentMessage>("sendMessage", &body, timeout, MAX_ANSWER_BYTES)
        .await
    {
        Ok(m) => done(m.and_then(|m| m.message_id)),
        // This operator's chat will not take it (no chat with the bot yet, or
        // blocked): given up; the other paths still work.
        Err(CallError::Status { code, .. }) if code < 500 && code != 429 => {
            tracing::warn!(
                chat = p.chat,
                code,
                "an approval prompt was refused by Telegram"
            );
            done(None)
        }
        Err(_) => false,
    }
}

/// The prompt, and whether the change may be approved from it: only if it shows the
/// whole change (an approval covers exactly what was shown) and `risk_ok` (its risk is
/// within `gateway.telegram_max_risk`). Everything a requester wrote is shown with
/// control and invisible characters escaped.
fn prompt_text(d: &ChangeDetail, risk_ok: bool) -> (String, bool) {
    let c = &d.summary;
    let diff = crate::printable(&gateway::diff::diff(&d.before, &d.after));
    let reason: String = crate::printable(&d.reason.replace('\n', " "))
        .chars()
        .take(300)
        .collect();
    let ops: Vec<String> = d
        .operations
        .iter()
        .map(|o| format!("  {:.2} {}", o.weight, o.what))
        .collect();
    let text = |shown: &str| {
        format!(
            "Change request {}\nRequested by: {}\nTarget: {}\nRisk: {:.2}\n{}\nSHA-256: {}\n\n{}\nReason given: {}",
            c.id,
            c.requester,
            c.target,
            c.risk,
            ops.join("\n"),
            d.after_hash,
            shown,
            reason
        )
    };
    // Whole only if the whole message fits Telegram's limit (UTF-16 units).
    let whole = text(&diff);
    if whole.encode_utf16().count() <= MAX_MESSAGE_UNITS {
        if risk_ok {
            return (whole, true);
        }
        let risky = format!(
            "{diff}\n… too risky to approve from Telegram: approve it with `ironclaw changes approve {}` or on the approval page.",
            c.id
        );
        let t = text(&risky);
        if t.encode_utf16().count() <= MAX_MESSAGE_UNITS {
            return (t, false);
        }
    }
    let cut: String = diff.chars().take(PROMPT_DIFF_CHARS).collect();
    let shown = format!(
        "{cut}\n… too long to approve here: review it with `ironclaw changes show {}` and approve it there.",
        c.id
    );
    let mut t = text(&shown);
    if t.encode_utf16().count() > MAX_MESSAGE_UNITS {
        t = split_message(&t, MAX_MESSAGE_UNITS).swap_remove(0);
    }
    (t, false)
}

/// An inline button, as `sendMessage` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Button {
    text: &'static str,
    callback_data: String,
}

/// A prompt's buttons: Approve only if the prompt shows the whole change, Reject always;
/// each carries the first [`BUTTON_HASH_DIGITS`] of the shown text's SHA-256.
fn buttons(change_id: &str, after_hash: &str, whole: bool) -> Vec<Button> {
    let short = &after_hash[..BUTTON_HASH_DIGITS];
    let mut buttons = Vec::new();
    if whole {
        buttons.push(Button {
            text: "Approve",
            callback_data: format!("a:{change_id}:{short}"),
        });
    }
    buttons.push(Button {
        text: "Reject",
        callback_data: format!("r:{change_id}:{short}"),
    });
    buttons
}

/// For a prompt already sent, whose request is no longer pending: the edit that says
/// how it ended and, having no `reply_markup`, removes its buttons.
fn closing(p: &Prompt) -> Option<Value> {
    let message_id = p.message_id?;
    Some(json!({
        "chat_id": p.chat,
        "message_id": message_id,
        "text": format!("Change request {}: {}.", p.change_id, p.change_state),
    }))
}

/// What a button press asks, read from the press and its callback data
/// (`a|r:<change id>:<hash>`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Press<'a> {
    /// Who pressed it, as Telegram vouches.
    from: Option<i64>,
    /// The chat the pressed message is in, and whether that chat is private.
    chat: Option<i64>,
    private: bool,
    decision: Option<Decision>,
    change: Option<&'a str>,
    hash: Option<&'a str>,
}

impl<'a> Press<'a> {
    fn read(cq: &'a CallbackQuery) -> Press<'a> {
        let message = cq.message.as_ref();
        let data = cq.data.as_deref().unwrap_or_default();
        let mut parts = data.splitn(3, ':');
        let (verb, change, hash) = (parts.next(), parts.next(), parts.next());
        Press {
            from: cq.from.as_ref().and_then(|u| u.id),
            chat: message.and_then(|m| m.chat_id()),
            private: message.is_some_and(|m| m.in_private_chat()),
            decision: match verb {
                Some("a") => Some(Decision::Approve),
                Some("r") => Some(Decision::Reject),
                _ => None,
            },
            change,
            hash,
        }
    }
}

/// What becomes of a button press.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict<'a> {
    /// Decided by the service as `user`, for the text whose hash begins with `hash`.
    Decide {
        user: i64,
        decision: Decision,
        change: &'a str,
        hash: &'a str,
    },
    /// Refused here, recorded and answered.
    Refuse(Refusal),
}

/// Why a press was refused before reaching a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NotPrivate,
    TooLongToApprove,
    Malformed,
}

impl Refusal {
    /// What the audit trail records.
    fn why(self) -> &'static str {
        match self {
            Refusal::NotPrivate => "not pressed in the operator's private chat with the bot",
            Refusal::TooLongToApprove => {
                "an approval from Telegram of a change too long for its prompt or above gateway.telegram_max_risk"
            }
            Refusal::Malformed => "a malformed button press",
        }
    }

    /// What the presser is told.
    fn answer(self) -> &'static str {
        match self {
            Refusal::NotPrivate => "Approvals are taken only in a private chat with the bot.",
            Refusal::TooLongToApprove => {
                "This change is too long or too risky to approve here; use `ironclaw changes approve` or the approval page."
            }
            Refusal::Malformed => "This button is not understood.",
        }
    }
}

/// The rules a press must pass, in order: pressed by someone, in their own private chat
/// with the bot (its id is theirs); an approval only of a change that `fits_prompt`
/// (asked only then); a decision, a change and a hash of [`BUTTON_HASH_DIGITS`].
fn judge<'a>(press: &Press<'a>, fits_prompt: impl FnOnce(&str) -> bool) -> Verdict<'a> {
    let Some(user) = press.from else {
        return Verdict::Refuse(Refusal::Malformed);
    };
    if !press.private || press.chat != Some(user) {
        return Verdict::Refuse(Refusal::NotPrivate);
    }
    if let (Some(Decision::Approve), Some(change)) = (press.decision, press.change)
        && !fits_prompt(change)
    {
        return Verdict::Refuse(Refusal::TooLongToApprove);
    }
    match (press.decision, press.change, press.hash) {
        (Some(decision), Some(change), Some(hash)) if hash.len() == BUTTON_HASH_DIGITS => {
            Verdict::Decide {
                user,
                decision,
                change,
                hash,
            }
        }
        _ => Verdict::Refuse(Refusal::Malformed),
    }
}

/// What the presser is told of the decision.
fn decided_answer(decided: &Decided) -> String {
    match decided {
        Decided::Applied(v) => {
            format!("Approved: configuration version {} is in force.", v.version)
        }
        Decided::Rejected => "Rejected.".to_owned(),
        Decided::Refused(why) => format!("Refused: {why}."),
    }
}

/// Whether change `id` may be approved from its prompt (unknown ids are left to the
/// decision to refuse).
fn whole_in_prompt(service: &Service, id: &str) -> bool {
    match service.change(id) {
        Ok(Some(d)) => {
            let risk_ok = telegram_may_approve(&service.config(), d.summary.risk);
            prompt_text(&d, risk_ok).1
        }
        // Unknown: the decision refuses it and says so.
        Ok(None) => true,
        Err(_) => false,
    }
}

/// A button press: decided as the Telegram user who pressed it, if every rule holds;
/// answered in every case, and recorded.
pub(super) async fn button_pressed(service: &Arc<Service>, tg: &Telegram, cq: &CallbackQuery) {
    let press = Press::read(cq);
    let answer = match judge(&press, |id| whole_in_prompt(service, id)) {
        Verdict::Decide {
            user,
            decision,
            change,
            hash,
        } => match service
            .decide(change, decision, &Identity::Telegram(user), Some(hash))
            .await
        {
            Ok(decided) => decided_answer(&decided),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "deciding a change request failed");
                "Something went wrong; the operator's log says what.".to_owned()
            }
        },
        Verdict::Refuse(refusal) => {
            service.audit(
                AuditEvent::DecisionRefused,
                json!({ "via": "telegram", "by": press.from.map(|f| Identity::Telegram(f).to_string()),
                        "change": press.change.map(|i| i.chars().take(40).collect::<String>()),
                        "why": refusal.why() }),
            );
            refusal.answer().to_owned()
        }
    };
    let query_id = cq.id.as_deref().unwrap_or_default();
    if !query_id.is_empty() {
        let body = json!({ "callback_query_id": query_id, "text": answer.chars().take(190).collect::<String>() });
        if tg
            .api
            .call::<IgnoredAny>(
                "answerCallbackQuery",
                &body,
                Duration::from_secs(10),
                MAX_ANSWER_BYTES,
            )
            .await
            .is_err()
        {
            tracing::warn!("answering a button press failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::gateway::risk::Operation;
    use crate::store::changes::{ChangeSummary, ConfigVersion};
    use crate::store::state::ChangeState;

    const OPERATOR: i64 = 5151;
    const CHANGE: &str = "c0011223344556677";
    const HASH: &str = "00112233445566778899aabbccddeeffffeeddccbbaa99887766554433221100";
    const SHORT: &str = "00112233445566778899aabbccddeeff";

    /// A press by `from` on a message in chat `chat` of type `kind`, with `data`.
    fn press(from: Option<i64>, chat: i64, kind: &str, data: &str) -> CallbackQuery {
        let from = from.map_or("null".to_owned(), |f| format!(r#"{{"id":{f}}}"#));
        serde_json::from_str(&format!(
            r#"{{"id":"q1","from":{from},"message":{{"message_id":3,"chat":{{"id":{chat},"type":"{kind}"}}}},"data":"{data}"}}"#
        ))
        .unwrap()
    }

    fn approve() -> String {
        format!("a:{CHANGE}:{SHORT}")
    }

    fn decide(user: i64, decision: Decision, hash: &str) -> Verdict<'_> {
        Verdict::Decide {
            user,
            decision,
            change: CHANGE,
            hash,
        }
    }

    #[test]
    fn a_press_decides_only_as_its_presser_in_their_own_private_chat() {
        let own = press(Some(OPERATOR), OPERATOR, "private", &approve());
        assert_eq!(
            judge(&Press::read(&own), |_| true),
            decide(OPERATOR, Decision::Approve, SHORT)
        );
        for (cq, case) in [
            (press(Some(OPERATOR), -100, "group", &approve()), "a group"),
            (
                press(Some(OPERATOR), OPERATOR, "supergroup", &approve()),
                "not a private chat, even with the presser's id",
            ),
            (
                press(Some(OPERATOR), 777, "private", &approve()),
                "someone else's private chat",
            ),
        ] {
            assert_eq!(
                judge(&Press::read(&cq), |_| true),
                Verdict::Refuse(Refusal::NotPrivate),
                "{case}"
            );
        }
        // No message to say where it was pressed: not in the presser's private chat.
        let mut nowhere = press(Some(OPERATOR), OPERATOR, "private", &approve());
        nowhere.message = None;
        assert_eq!(
            judge(&Press::read(&nowhere), |_| true),
            Verdict::Refuse(Refusal::NotPrivate)
        );
        // Nobody vouched for: decided by no one.
        let anonymous = press(None, OPERATOR, "private", &approve());
        assert_eq!(
            judge(&Press::read(&anonymous), |_| true),
            Verdict::Refuse(Refusal::Malformed)
        );
    }

    #[test]
    fn a_press_decides_only_with_a_whole_hash_from_its_button_passed_on_unchanged() {
        let other = "fedcba9876543210fedcba9876543210";
        let cq = press(
            Some(OPERATOR),
            OPERATOR,
            "private",
            &format!("r:{CHANGE}:{other}"),
        );
        assert_eq!(
            judge(&Press::read(&cq), |_| true),
            decide(OPERATOR, Decision::Reject, other)
        );
        for data in [
            format!("a:{CHANGE}:{}", &SHORT[..31]),
            format!("a:{CHANGE}:{SHORT}0"),
            format!("a:{CHANGE}:"),
            format!("a:{CHANGE}"),
            format!("x:{CHANGE}:{SHORT}"),
            String::new(),
        ] {
            let cq = press(Some(OPERATOR), OPERATOR, "private", &data);
            assert_eq!(
                judge(&Press::read(&cq), |_| true),
                Verdict::Refuse(Refusal::Malformed),
                "{data:?}"
            );
        }
        // The hash in a button is the start of the shown text's SHA-256.
        for b in buttons(CHANGE, HASH, true) {
            assert!(b.callback_data.ends_with(&format!(":{SHORT}")), "{b:?}");
            let cq = press(Some(OPERATOR), OPERATOR, "private", &b.callback_data);
            let Verdict::Decide { hash, change, .. } = judge(&Press::read(&cq), |_| true) else {
                panic!("{b:?} was not decided");
            };
            assert_eq!((change, hash), (CHANGE, SHORT));
        }
    }

    fn detail(after: &str) -> ChangeDetail {
        ChangeDetail {
            summary: ChangeSummary {
                id: CHANGE.into(),
                created_at: 0,
                expires_at: 100,
                requester: "agent:tg-42".into(),
                target: "config".into(),
                state: ChangeState::Pending,
                risk: 0.4,
                rule: None,
                decided_by: None,
                applied_version: None,
            },
            reason: "because\nthe model\u{202e} said so".into(),
            base_version: 1,
            before: "a = 1\n".into(),
            after: after.into(),
            after_hash: HASH.into(),
            operations: vec![Operation {
                what: "change a".into(),
                weight: 0.4,
            }],
        }
    }

    #[test]
    fn a_change_shown_whole_gets_approve_and_reject() {
        let (text, whole) = prompt_text(&detail("a = 2\n"), true);
        assert!(whole, "{text}");
        assert!(text.contains("a = 2") && text.contains(HASH), "{text}");
        assert!(
            !text.contains('\u{202e}') && text.contains("because the model"),
            "{text}"
        );
        assert_eq!(
            buttons(CHANGE, HASH, whole),
            vec![
                Button {
                    text: "Approve",
                    callback_data: format!("a:{CHANGE}:{SHORT}")
                },
                Button {
                    text: "Reject",
                    callback_data: format!("r:{CHANGE}:{SHORT}")
                },
            ]
        );
    }

    #[test]
    fn a_change_too_long_for_its_prompt_gets_only_reject_and_its_approval_is_refused() {
        // Just over the limit: the whole text would be 4097 units.
        let short = prompt_text(&detail("a = \n"), true)
            .0
            .encode_utf16()
            .count();
        let long = format!("a = {}\n", "x".repeat(MAX_MESSAGE_UNITS + 1 - short));
        let (text, whole) = prompt_text(&detail(&long), true);
        assert!(!whole);
        assert!(text.encode_utf16().count() <= MAX_MESSAGE_UNITS);
        assert!(
            text.contains(&format!("ironclaw changes show {CHANGE}")),
            "{text}"
        );
        let (_, fits) = prompt_text(&detail(&long[1..]), true);
        assert!(fits, "one character less fits");
        let huge = format!("a = {}\n", "😀".repeat(10_000));
        let (text, whole) = prompt_text(&detail(&huge), true);
        assert!(!whole && text.encode_utf16().count() <= MAX_MESSAGE_UNITS);
        assert_eq!(
            buttons(CHANGE, HASH, false),
            vec![Button {
                text: "Reject",
                callback_data: format!("r:{CHANGE}:{SHORT}")
            }]
        );
        // An Approve button made up for it is refused, whatever its hash.
        let asked = Cell::new(0);
        let fits = |id: &str| {
            assert_eq!(id, CHANGE);
            asked.set(asked.get() + 1);
            false
        };
        for data in [approve(), format!("a:{CHANGE}:short")] {
            let cq = press(Some(OPERATOR), OPERATOR, "private", &data);
            assert_eq!(
                judge(&Press::read(&cq), fits),
                Verdict::Refuse(Refusal::TooLongToApprove),
                "{data}"
            );
        }
        // A rejection needs no look at the text; neither does a press refused anyway.
        let reject = press(
            Some(OPERATOR),
            OPERATOR,
            "private",
            &format!("r:{CHANGE}:{SHORT}"),
        );
        assert_eq!(
            judge(&Press::read(&reject), fits),
            decide(OPERATOR, Decision::Reject, SHORT)
        );
        let group = press(Some(OPERATOR), -100, "group", &approve());
        assert_eq!(
            judge(&Press::read(&group), fits),
            Verdict::Refuse(Refusal::NotPrivate)
        );
        assert_eq!(asked.get(), 2);
    }

    #[test]
    fn a_decided_or_expired_request_loses_its_buttons_and_a_refusal_is_told() {
        let mut p = Prompt {
            change_id: CHANGE.into(),
            chat: OPERATOR,
            message_id: None,
            change_state: ChangeState::Expired,
        };
        assert_eq!(closing(&p), None, "not sent yet: it is sent, not closed");
        p.message_id = Some(9);
        let body = closing(&p).unwrap();
        assert_eq!(
            body,
            json!({ "chat_id": OPERATOR, "message_id": 9,
                    "text": format!("Change request {CHANGE}: expired.") })
        );
        assert!(body.get("reply_markup").is_none());
        assert_eq!(
            decided_answer(&Decided::Refused("it is no longer pending".into())),
            "Refused: it is no longer pending."
        );
        assert_eq!(decided_answer(&Decided::Rejected), "Rejected.");
        let v = ConfigVersion {
            version: 4,
            text: String::new(),
            hash: String::new(),
        };
        assert_eq!(
            decided_answer(&Decided::Applied(v)),
            "Approved: configuration version 4 is in force."
        );
    }

    #[test]
    fn a_change_above_the_telegram_risk_limit_gets_only_reject_and_says_where_to_approve() {
        let (text, approvable) = prompt_text(&detail("a = 2\n"), false);
        assert!(!approvable);
        assert!(
            text.contains("a = 2"),
            "the whole change is still shown: {text}"
        );
        assert!(
            text.contains(&format!("ironclaw changes approve {CHANGE}")),
            "{text}"
        );
        assert_eq!(buttons(CHANGE, HASH, approvable).len(), 1);
    }
}
