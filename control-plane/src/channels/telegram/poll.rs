//! Long-polling `getUpdates` and the inbound rules. The offset sent to Telegram (which
//! confirms every earlier update) only moves past an update once the store holds it, or
//! its refusal (in the same transaction), or, beyond the refusals recorded a minute for
//! its chat, once the refusal is counted. Senders not in `allowed_users` get one fixed
//! refusal (at most one an hour each, and none while their refusals are only counted)
//! and never reach an agent; only private chats are served, so no reply is shown to
//! people who were not allowed to ask.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use queue_proto::items::MAX_TEXT_BYTES;
use serde_json::json;

use super::api::{CallError, MAX_BACKOFF, MAX_UPDATES_BYTES};
use super::updates::{FileRef, Message, Update, Updates};
use super::{CHANNEL, Telegram, prompts};
use crate::channels::naming;
use crate::files;
use crate::service::{Arrival, Service, ServiceError, notice};
use crate::state::now_secs;
use crate::store::attachments::IncomingFile;
use crate::store::cursors::Cursor;
use crate::store::messages::{Accepted, Inbound, Refusal};

/// Refusals sent to one unknown sender, at most one per this period.
const REFUSAL_PERIOD: Duration = Duration::from_secs(3600);
/// Senders remembered before those whose period is over are forgotten.
const REFUSALS_KEPT: usize = 10_000;

/// When each unknown sender was last sent the refusal.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    at: Mutex<HashMap<i64, Instant>>,
}

impl Refusals {
    /// Whether unknown sender `user` may be sent the refusal now.
    fn may_refuse(&self, user: i64) -> bool {
        self.may_refuse_at(user, Instant::now())
    }

    fn may_refuse_at(&self, user: i64, now: Instant) -> bool {
        let mut map = self.at.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > REFUSALS_KEPT {
            map.retain(|_, t| now.duration_since(*t) < REFUSAL_PERIOD);
        }
        match map.get(&user) {
            Some(t) if now.duration_since(*t) < REFUSAL_PERIOD => false,
            _ => {
                map.insert(user, now);
                true
            }
        }
    }
}

/// Long-polls `getUpdates` until the task is aborted, reconnecting after outages.
pub async fn poll(service: Arc<Service>, tg: Arc<Telegram>) {
    let stored = service.cursor(CHANNEL).ok().flatten();
    let mut offset: i64 = stored.and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut limit = 100;
    let mut backoff = Duration::from_secs(1);
    let mut failing = false;
    loop {
        let body = json!({
            "offset": offset,
            "limit": limit,
            "timeout": tg.poll_timeout,
            "allowed_updates": ["message", "callback_query"],
        });
        let timeout = Duration::from_secs(tg.poll_timeout + 15);
        let result = tg
            .api
            .call::<Updates>("getUpdates", &body, timeout, MAX_UPDATES_BYTES)
            .await;
        let error = match result {
            Ok(Some(Updates(updates))) => {
                if failing {
                    tracing::info!("telegram reachable again");
                }
                failing = false;
                backoff = Duration::from_secs(1);
                limit = 100;
                for u in &updates {
                    match handle(&service, &tg, u, offset).await {
                        Ok(Some(next)) => offset = next,
                        Ok(None) => {}
                        // Not stored: the offset stays, the update comes again.
                        Err(()) => {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            break;
                        }
                    }
                }
                continue;
            }
            Ok(None) => "an answer that is not a list of updates".to_owned(),
            Err(CallError::TooLarge(first)) => {
                if limit > 1 {
                    limit = 1;
                    continue;
                }
                match first {
                    Some(id) if id >= offset && id < i64::MAX => {
                        let next = (id + 1).to_string();
                        let ext = id.to_string();
                        let refusal = Refusal {
                            channel: CHANNEL,
                            chat: "",
                            external_id: Some(&ext),
                            bytes: MAX_UPDATES_BYTES,
                            reason: "update larger than 16 MiB",
                            notice: None,
                        };
                        let cursor = Cursor {
                            name: CHANNEL,
                            value: &next,
                        };
                        let skipped = service
                            .receive(Arrival::Refused(refusal), Some(cursor))
                            .await;
                        if skipped.is_ok() {
                            tracing::warn!(update = id, "skipped an update larger than 16 MiB");
                            offset = id + 1;
                            continue;
                        }
                        "an oversized update that could not be recorded".to_owned()
                    }
                    _ => "an oversized answer without an update id".to_owned(),
                }
            }
            Err(CallError::Status {
                code: 429,
                retry_after,
                ..
            }) => {
                tokio::time::sleep(Duration::from_secs(retry_after.unwrap_or(5).min(300))).await;
                continue;
            }
            Err(CallError::Status {
                code, description, ..
            }) => format!("status {code}: {description}"),
            Err(CallError::Network | CallError::Uncertain) => "not reachable".to_owned(),
        };
        if !failing {
            // The token itself is refused: retrying cannot help until it is replaced.
            if error.starts_with("status 401") || error.starts_with("status 404") {
                tracing::error!(problem = %error,
                    "Telegram refused the bot token (401/404): the token in channels.telegram.token_file is wrong or was revoked; get one from @BotFather, write it to that file, and restart serve");
            } else {
                tracing::warn!(problem = %error, "telegram getUpdates failed; retrying with backoff");
            }
        }
        failing = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Stores one update (or records why it is refused) with the next offset. Returns the
/// next offset, `None` for an update to skip, or `Err` if the store failed.
async fn handle(
    service: &Arc<Service>,
    tg: &Arc<Telegram>,
    u: &Update,
    offset: i64,
) -> Result<Option<i64>, ()> {
    let Some(update_id) = u.update_id else {
        return Ok(None);
    };
    if update_id < offset || update_id == i64::MAX {
        return Ok(None);
    }
    let next = (update_id + 1).to_string();
    let cursor = Some(Cursor {
        name: CHANNEL,
        value: &next,
    });
    if let Some(cq) = &u.callback_query {
        prompts::button_pressed(service, tg, cq).await;
        return match service.receive(Arrival::Nothing, cursor).await {
            Ok(_) => Ok(Some(update_id + 1)),
            Err(e) => {
                tracing::error!(error = %e, "storing the telegram offset failed");
                Err(())
            }
        };
    }
    let ext = update_id.to_string();
    let msg = u.message.as_ref();
    let bytes = msg.and_then(|m| m.text.as_deref()).map_or(0, str::len);
    let refuse = async |chat: &str, reason: &'static str, notice: Option<&'static str>| {
        let refusal = Refusal {
            channel: CHANNEL,
            chat,
            external_id: Some(&ext),
            bytes,
            reason,
            notice,
        };
        service.receive(Arrival::Refused(refusal), cursor).await
    };
    let (chat, text, files) = match judge(msg, |user| allowed(service, user)) {
        Verdict::Accept { chat, files, .. }
            if files.len() > usize::from(service.config().attachments.max_per_message) =>
        {
            return match refuse(
                &chat.to_string(),
                "too many files",
                Some(files::notice::TOO_MANY_FILES),
            )
            .await
            {
                Ok(_) => Ok(Some(update_id + 1)),
                Err(e) => {
                    tracing::error!(error = %e, "recording a refused update failed");
                    Err(())
                }
            };
        }
        Verdict::Accept { chat, text, files } => (chat, text, files),
        Verdict::Refuse {
            chat,
            reason,
            notice,
        } => {
            let notice = match notice {
                Notice::Never => None,
                Notice::Always(text) => Some(text),
                Notice::OncePerPeriod(user) => {
                    let first = tg.refusals.may_refuse(user);
                    if first {
                        // Once a period per sender: how the owner learns an id to allow.
                        tracing::warn!(
                            user,
                            "refused a Telegram message from user {user}, who is not in channels.telegram.allowed_users; if that is you or your family, add {user} to allowed_users and approve the change"
                        );
                    }
                    first.then_some(notice::NOT_ALLOWED)
                }
            };
            let chat = chat.map(|c| c.to_string()).unwrap_or_default();
            return match refuse(&chat, reason, notice).await {
                Ok(_) => Ok(Some(update_id + 1)),
                Err(e) => {
                    tracing::error!(error = %e, "recording a refused update failed");
                    Err(())
                }
            };
        }
    };
    let inbound = Inbound {
        channel: CHANNEL.into(),
        chat: chat.to_string(),
        external_id: Some(ext.clone()),
        text: text.to_owned(),
        received_at: now_secs(),
        files,
    };
    let session = naming::telegram(chat);
    // Telegram's sessions are bounded by allowed_users.
    let arrival = Arrival::Message {
        max_sessions: None,
        session: &session,
        inbound: &inbound,
    };
    match service.receive(arrival, cursor).await {
        Ok(Accepted::Stored(id)) => {
            tokio::spawn(show_typing(service.clone(), tg.clone(), chat, id));
            Ok(Some(update_id + 1))
        }
        Ok(_) => Ok(Some(update_id + 1)),
        // Not a store failure: this update can never be stored, so it is refused and
        // passed, rather than holding up every update after it.
        Err(e @ ServiceError::WrongChannel { .. }) => {
            tracing::error!(error = %e, "a telegram chat's session name is taken");
            refuse(
                &chat.to_string(),
                "session name taken by another channel",
                None,
            )
            .await
            .map(|_| Some(update_id + 1))
            .map_err(|_| ())
        }
        Err(e) => {
            tracing::error!(error = %e, "storing a telegram message failed");
            Err(())
        }
    }
}

/// How often "typing…" is sent again: Telegram shows it for five seconds.
const TYPING_EVERY: Duration = Duration::from_secs(4);

/// Shows "typing…" in `chat` while message `id` waits for its answer, for at most the
/// reply timeout; one loop per chat, however many of its messages wait.
pub(super) async fn show_typing(service: Arc<Service>, tg: Arc<Telegram>, chat: i64, id: i64) {
    let lock = || {
        tg.typing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if !lock().insert(chat) {
        return;
    }
    let until = tokio::time::Instant::now()
        + Duration::from_secs(service.config().delivery.reply_timeout_secs);
    while tokio::time::Instant::now() < until
        && matches!(service.message_state(id), Ok(Some(s)) if s.is_waiting())
    {
        let body = json!({ "chat_id": chat, "action": "typing" });
        let _ = tg
            .api
            .call::<serde_json::Value>("sendChatAction", &body, Duration::from_secs(10), 4096)
            .await;
        tokio::time::sleep(TYPING_EVERY).await;
    }
    lock().remove(&chat);
}

/// What becomes of a message update.
#[derive(Debug, PartialEq, Eq)]
enum Verdict<'a> {
    /// Passed on to the chat's session, with the files to fetch for it.
    Accept {
        chat: i64,
        text: &'a str,
        files: Vec<IncomingFile>,
    },
    /// Recorded as refused, in `chat` if there is one to name.
    Refuse {
        chat: Option<i64>,
        reason: &'static str,
        notice: Notice,
    },
}

/// What a refused sender is told.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    /// Nothing: others in the chat were not allowed to ask, or there is no chat.
    Never,
    Always(&'static str),
    /// The fixed refusal for unknown sender `user`, at most once per [`REFUSAL_PERIOD`].
    OncePerPeriod(i64),
}

/// The inbound rules, in order: a message from someone in a chat, private, from a sender
/// `allowed` lets in, with text, and at most [`MAX_TEXT_BYTES`] of it, is passed on;
/// anything else is refused, and said so only where it is safe to.
fn judge(msg: Option<&Message>, allowed: impl Fn(i64) -> bool) -> Verdict<'_> {
    let (from, chat) = match msg.map(|m| (m.sender(), m.chat_id())) {
        Some((Some(from), Some(chat))) => (from, chat),
        _ => {
            return Verdict::Refuse {
                chat: None,
                reason: "malformed or unsupported update",
                notice: Notice::Never,
            };
        }
    };
    let msg = msg.expect("a sender and a chat were read from it");
    let refuse = |reason, notice| Verdict::Refuse {
        chat: Some(chat),
        reason,
        notice,
    };
    // Nothing is said in a group: others there were not allowed to ask.
    if !msg.in_private_chat() {
        return refuse("not a private chat", Notice::Never);
    }
    if !allowed(from) {
        return refuse("sender not in allowed_users", Notice::OncePerPeriod(from));
    }
    let files = files(msg);
    let Some(text) = msg
        .text
        .as_deref()
        .or(msg.caption.as_deref())
        .or(if files.is_empty() { None } else { Some("") })
    else {
        return refuse("not a text message", Notice::Always(notice::NOT_TEXT));
    };
    if text.len() > MAX_TEXT_BYTES {
        return refuse("longer than 64 KiB", Notice::Always(notice::TOO_LONG));
    }
    Verdict::Accept { chat, text, files }
}

/// The files a message carries: of a photo, the largest size Telegram declares within
/// what a model accepts (else the smallest); a document; a voice note.
fn files(msg: &Message) -> Vec<IncomingFile> {
    let mut out = Vec::new();
    let file = |f: &FileRef, name: &str| {
        let source = f
            .file_id
            .clone()
            .filter(|id| !id.is_empty() && id.len() <= 512)?;
        Some(IncomingFile {
            source,
            name: f
                .file_name
                .clone()
                .unwrap_or_else(|| name.to_owned())
                .chars()
                .take(128)
                .collect(),
            declared_bytes: f.file_size,
            data: None,
        })
    };
    if let Some(sizes) = &msg.photo {
        let fits = |f: &&FileRef| f.file_size.is_some_and(|b| b <= files::MAX_PHOTO_BYTES);
        let chosen = sizes
            .iter()
            .map(|o| &o.0)
            .rfind(fits)
            .or(sizes.first().map(|o| &o.0));
        out.extend(chosen.and_then(|f| file(f, "photo.jpg")));
    }
    out.extend(msg.document.as_ref().and_then(|f| file(f, "document")));
    out.extend(msg.voice.as_ref().and_then(|f| file(f, "voice.ogg")));
    out
}

/// Whether the approved configuration in force lets `user` talk to the assistant.
fn allowed(service: &Service, user: i64) -> bool {
    service
        .config()
        .channels
        .telegram
        .as_ref()
        .is_some_and(|t| t.allowed_users.contains(&user))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: &str) -> Message {
        serde_json::from_str(json).unwrap()
    }

    const USER: i64 = 42;

    /// The verdict on a message from `json`, by a rule that lets [`USER`] alone in (the
    /// message is leaked so that the verdict may borrow its text for the whole test).
    fn verdict(json: &str) -> Verdict<'static> {
        let m = Box::leak(Box::new(message(json)));
        judge(Some(m), |u| u == USER)
    }

    #[test]
    fn an_allowed_sender_in_a_private_chat_is_passed_on() {
        assert_eq!(
            verdict(r#"{"from":{"id":42},"chat":{"id":42,"type":"private"},"text":"hi"}"#),
            Verdict::Accept {
                chat: 42,
                text: "hi",
                files: vec![]
            }
        );
        let most = "x".repeat(MAX_TEXT_BYTES);
        let json = format!(
            r#"{{"from":{{"id":42}},"chat":{{"id":42,"type":"private"}},"text":"{most}"}}"#
        );
        assert!(matches!(verdict(&json), Verdict::Accept { .. }));
    }

    #[test]
    fn nothing_is_said_in_a_group_even_to_an_allowed_sender() {
        for kind in ["group", "supergroup", "channel"] {
            let json = format!(
                r#"{{"from":{{"id":42}},"chat":{{"id":-100,"type":"{kind}"}},"text":"hi"}}"#
            );
            assert_eq!(
                verdict(&json),
                Verdict::Refuse {
                    chat: Some(-100),
                    reason: "not a private chat",
                    notice: Notice::Never
                }
            );
        }
    }

    #[test]
    fn an_unknown_sender_gets_only_the_rate_limited_refusal() {
        assert_eq!(
            verdict(r#"{"from":{"id":7},"chat":{"id":7,"type":"private"},"text":"let me in"}"#),
            Verdict::Refuse {
                chat: Some(7),
                reason: "sender not in allowed_users",
                notice: Notice::OncePerPeriod(7)
            }
        );
        // Even a message that is not text tells a stranger nothing more.
        assert_eq!(
            verdict(r#"{"from":{"id":7},"chat":{"id":7,"type":"private"},"sticker":{}}"#),
            Verdict::Refuse {
                chat: Some(7),
                reason: "sender not in allowed_users",
                notice: Notice::OncePerPeriod(7)
            }
        );
    }

    #[test]
    fn non_text_and_oversized_messages_are_refused_with_a_notice() {
        for json in [
            r#"{"from":{"id":42},"chat":{"id":42,"type":"private"},"sticker":{}}"#,
            r#"{"from":{"id":42},"chat":{"id":42,"type":"private"},"text":5}"#,
        ] {
            assert_eq!(
                verdict(json),
                Verdict::Refuse {
                    chat: Some(42),
                    reason: "not a text message",
                    notice: Notice::Always(notice::NOT_TEXT)
                },
                "{json}"
            );
        }
        let long = "x".repeat(MAX_TEXT_BYTES + 1);
        let json = format!(
            r#"{{"from":{{"id":42}},"chat":{{"id":42,"type":"private"}},"text":"{long}"}}"#
        );
        assert_eq!(
            verdict(&json),
            Verdict::Refuse {
                chat: Some(42),
                reason: "longer than 64 KiB",
                notice: Notice::Always(notice::TOO_LONG)
            }
        );
    }

    #[test]
    fn an_update_without_a_sender_or_a_chat_is_malformed_and_answered_nowhere() {
        let malformed = Verdict::Refuse {
            chat: None,
            reason: "malformed or unsupported update",
            notice: Notice::Never,
        };
        assert_eq!(judge(None, |_| true), malformed);
        for json in [
            r#"{"from":{"id":42},"text":"no chat"}"#,
            r#"{"chat":{"id":42,"type":"private"},"text":"no sender"}"#,
            r#"{"from":{"id":"42"},"chat":{"id":42,"type":"private"},"text":"id not a number"}"#,
        ] {
            assert_eq!(verdict(json), malformed, "{json}");
        }
    }

    #[test]
    fn a_stranger_is_sent_the_refusal_at_most_once_per_period() {
        let r = Refusals::default();
        let t0 = Instant::now();
        assert!(r.may_refuse_at(7, t0));
        assert!(!r.may_refuse_at(7, t0 + Duration::from_secs(1)));
        assert!(!r.may_refuse_at(7, t0 + REFUSAL_PERIOD - Duration::from_secs(1)));
        // Another stranger has a period of their own.
        assert!(r.may_refuse_at(8, t0 + Duration::from_secs(1)));
        assert!(r.may_refuse_at(7, t0 + REFUSAL_PERIOD));
    }
}
