//! The [`Channel`] implementation: a reply split into Telegram-sized parts, each sent
//! with retries; a 429 on the first part puts the reply back in the queue for as long
//! as Telegram asks (within bounds), a 429 on a later part waits in its lane, and a
//! part that may have arrived is never sent twice.

use std::time::Duration;

use serde::de::IgnoredAny;
use serde_json::json;

use super::api::{CallError, MAX_ANSWER_BYTES, MAX_RETRY_AFTER_SECS, SEND_TRIES};
use super::{CHANNEL, MAX_MESSAGE_UNITS, Telegram};
use crate::channels::{Channel, split_message};
use crate::store::outbound::Delivered;

impl Channel for Telegram {
    fn name(&self) -> &'static str {
        CHANNEL
    }

    async fn deliver(&self, chat: &str, text: &str) -> Delivered {
        let Ok(chat_id) = chat.parse::<i64>() else {
            return Delivered::Failed("not a Telegram chat id".into());
        };
        let parts = split_message(text, MAX_MESSAGE_UNITS);
        for (i, part) in parts.iter().enumerate() {
            let body = json!({ "chat_id": chat_id, "text": part });
            let mut backoff = Duration::from_millis(500);
            for tries in 1.. {
                let result = self
                    .api
                    .call::<IgnoredAny>(
                        "sendMessage",
                        &body,
                        Duration::from_secs(30),
                        MAX_ANSWER_BYTES,
                    )
                    .await;
                let err = match result {
                    Ok(_) => break,
                    Err(e) => e,
                };
                // Parts already sent are never sent again, and a part that may have
                // arrived is not sent twice: such a reply is dead-lettered instead.
                let give_up = |why: &str| {
                    if i == 0 {
                        Delivered::Failed(why.to_owned())
                    } else {
                        Delivered::Failed(format!("only partly delivered: {why}"))
                    }
                };
                let wait = match err {
                    CallError::Uncertain | CallError::TooLarge(_) => {
                        return give_up(
                            "sent, but Telegram's answer did not arrive; not sent again",
                        );
                    }
                    CallError::Status {
                        code, description, ..
                    } if code < 500 && code != 429 => {
                        return give_up(&format!("telegram refused it ({code}): {description}"));
                    }
                    CallError::Status {
                        code: 429,
                        retry_after,
                        ..
                    } => {
                        let secs = retry_after.unwrap_or(1).clamp(1, MAX_RETRY_AFTER_SECS);
                        // Nothing of this reply has gone out: it waits in the queue,
                        // not in a delivery lane, while other chats are served.
                        if i == 0 {
                            return Delivered::Throttled(secs);
                        }
                        Duration::from_secs(secs)
                    }
                    CallError::Status { .. } | CallError::Network => backoff,
                };
                if tries >= SEND_TRIES {
                    // Nothing of this reply has arrived yet: the worker tries it later.
                    if i == 0 {
                        return Delivered::Retry(wait.as_secs().max(10));
                    }
                    return give_up("Telegram stopped accepting it");
                }
                if wait > Duration::from_secs(60) && i == 0 {
                    return Delivered::Retry(wait.as_secs());
                }
                // A later part waits as long as asked (at most five minutes): its first
                // parts have arrived and must not be sent again.
                tokio::time::sleep(wait.min(Duration::from_secs(300))).await;
                backoff = (backoff * 2).min(Duration::from_secs(8));
            }
        }
        Delivered::Sent
    }

    async fn deliver_document(&self, chat: &str, name: &str, content: &str) -> Delivered {
        let Ok(chat_id) = chat.parse::<i64>() else {
            return Delivered::Failed("not a Telegram chat id".into());
        };
        let sent = self
            .api
            .send_document(chat_id, name, content.as_bytes(), Duration::from_secs(60))
            .await;
        match sent {
            Ok(()) => Delivered::Sent,
            Err(CallError::Status {
                code: 429,
                retry_after,
                ..
            }) => Delivered::Throttled(retry_after.unwrap_or(1).clamp(1, MAX_RETRY_AFTER_SECS)),
            Err(CallError::Status {
                code, description, ..
            }) if code < 500 => {
                Delivered::Failed(format!("telegram refused it ({code}): {description}"))
            }
            Err(CallError::Network | CallError::Status { .. }) => Delivered::Retry(10),
            Err(CallError::Uncertain | CallError::TooLarge(_)) => Delivered::Failed(
                "sent, but Telegram's answer did not arrive; not sent again".into(),
            ),
        }
    }
}
