//! The console channel, for local use through the admin socket (`ironclaw send`): the
//! text becomes a message of the console chat named after its session; the call waits
//! until the message is settled (or the wait ends) and returns every reply waiting for
//! that chat. Replies count as delivered only once the answer reaches the client, so the
//! chat's lock is held from reading them to acknowledging them.

use std::sync::Arc;
use std::time::Duration;

use queue_proto::items::MAX_TEXT_BYTES;

use super::naming;
use crate::service::{Arrival, Service};
use crate::state::now_secs;
use crate::store::messages::{Accepted, Inbound};
use crate::store::state::MessageState;

/// The console channel's name in the store.
pub const CHANNEL: &str = "console";

/// The most replies one `send` returns.
const MAX_REPLIES: usize = 1000;

/// What one `send` got back.
#[derive(Debug)]
pub struct Sent {
    pub message: i64,
    /// Where the message stood when the call stopped waiting (`None`: it is gone, its
    /// session deleted meanwhile).
    pub state: Option<MessageState>,
    pub replies: Vec<String>,
    /// To pass to [`acknowledge`] once the replies have reached the client.
    pub ack: Ack,
}

/// Console replies to acknowledge once the answer is written: the chat, the last id,
/// and the chat's lock.
#[derive(Debug)]
pub struct Ack(Option<(String, i64, tokio::sync::OwnedMutexGuard<()>)>);

impl Ack {
    /// Nothing to acknowledge.
    pub fn none() -> Ack {
        Ack(None)
    }
}

/// One lock per console chat, held from reading its waiting replies to acknowledging
/// them.
fn chat_lock(chat: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    let locks = LOCKS.get_or_init(Default::default);
    let mut map = locks.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(chat.to_owned()).or_default().clone()
}

/// Sends `text` to console session `session` and waits up to `wait_secs` for it to be
/// settled. The error is for the operator.
pub async fn send(
    service: &Arc<Service>,
    session: &str,
    text: String,
    wait_secs: u64,
) -> Result<Sent, String> {
    let id = naming::console(session)?;
    if text.len() > MAX_TEXT_BYTES {
        return Err("the message is longer than 64 KiB; nothing was sent".into());
    }
    if text.trim().is_empty() {
        return Err("the message is empty; nothing was sent".into());
    }
    let inbound = Inbound {
        channel: CHANNEL.into(),
        chat: id.as_str().into(),
        external_id: None,
        text,
        received_at: now_secs(),
        files: Vec::new(),
    };
    let mut changes = service.watch_outbound();
    let arrival = Arrival::Message {
        max_sessions: None,
        session: &id,
        inbound: &inbound,
    };
    let message = match service.receive(arrival, None).await {
        Ok(Accepted::Stored(m) | Accepted::Refused(m)) => m,
        Ok(Accepted::Duplicate | Accepted::Counted) => return Err("duplicate message".into()),
        Err(e) => return Err(e.to_string()),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let state = service.message_state(message).map_err(|e| e.to_string())?;
        let settled = !state.is_some_and(MessageState::is_waiting);
        if settled || tokio::time::Instant::now() >= deadline {
            // Every reply waiting for this chat, earlier ones included; acknowledged once
            // the answer reaches the client.
            let held = chat_lock(id.as_str()).lock_owned().await;
            let pending = service
                .pending_replies(CHANNEL, Some(id.as_str()), 0, MAX_REPLIES)
                .map_err(|e| e.to_string())?;
            let ack = pending
                .last()
                .map(|last| (id.as_str().to_owned(), last.id, held));
            return Ok(Sent {
                message,
                state,
                replies: pending.into_iter().map(|o| o.text).collect(),
                ack: Ack(ack),
            });
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

/// Marks the replies of a [`Sent`] delivered, once its answer reached the client.
pub fn acknowledge(service: &Service, ack: Ack) -> Result<(), String> {
    if let Some((chat, upto, _held)) = ack.0 {
        service
            .acknowledge_replies(CHANNEL, Some(&chat), upto)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
