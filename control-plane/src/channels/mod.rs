//! Chat channels. Every arrival, accepted or refused, goes in through one call,
//! [`Service::receive`] (stored before anything else happens); every reply comes out of
//! the service's outbound queue. A channel holds no store handle.
//!
//! Two ways out: a push channel (Telegram) implements [`Channel`] and a delivery worker
//! hands it one reply at a time, recording each result; a pull channel (the
//! [`console`] on the admin socket, the [`bridge`]'s long-poll) keeps replies queued
//! until its client fetches and acknowledges them. [`naming`] says which session each
//! channel's chat belongs to.
//!
//! [`Service::receive`]: crate::service::Service::receive

pub mod bridge;
pub mod console;
pub mod naming;
pub mod telegram;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::service::Service;
use crate::state::now_secs;
use crate::store::outbound::{Delivered, document_parts};
use crate::store::state::OutboundKind;

/// Why a channel could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("reading the {channel} token file {path} failed")]
    Token {
        channel: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: crate::model::http::KeyFileError,
    },
    #[error("the bridge could not listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A chat app replies are pushed to.
pub trait Channel: Send + Sync + 'static {
    /// The channel's name in the store.
    fn name(&self) -> &'static str;
    /// Hands one reply to `chat`.
    fn deliver(&self, chat: &str, text: &str) -> impl Future<Output = Delivered> + Send;
    /// Hands one document (a text file named `name`) to `chat`.
    fn deliver_document(
        &self,
        chat: &str,
        name: &str,
        content: &str,
    ) -> impl Future<Output = Delivered> + Send;
}

/// Starts every configured channel; the console is carried by the admin socket.
pub fn start(service: &Arc<Service>) -> Result<Vec<JoinHandle<()>>, ChannelError> {
    let mut tasks = Vec::new();
    if let Some(cfg) = &service.config().channels.telegram {
        let tg = Arc::new(telegram::Telegram::new(cfg)?);
        tasks.push(tokio::spawn(telegram::poll(service.clone(), tg.clone())));
        tasks.push(tokio::spawn(telegram::prompts(service.clone(), tg.clone())));
        tasks.push(tokio::spawn(telegram::fetch_files(
            service.clone(),
            tg.clone(),
        )));
        tasks.push(tokio::spawn(deliver_loop(service.clone(), tg)));
    }
    if let Some(cfg) = &service.config().channels.bridge {
        tasks.push(bridge::start(service.clone(), cfg)?);
    }
    Ok(tasks)
}

/// Chats a push channel delivers to at once: a chat whose deliveries are slow (a chat
/// app holding it back, a long reply in parts) holds one lane, never all.
pub const DELIVERY_LANES: usize = 4;

/// Chats remembered for fairness; beyond this, those served longest ago are forgotten.
const CHATS_REMEMBERED: usize = 10_000;

/// Hands queued replies to a push channel, fairly: each free lane takes the oldest
/// reply of the chat served longest ago (never one already being served), so one chat's
/// flood waits its turn behind every other chat's next reply. Each chat's replies go
/// out in order, one at a time. Waits for new replies or for the next retry time.
pub async fn deliver_loop<C: Channel>(service: Arc<Service>, channel: Arc<C>) {
    let mut changes = service.watch_outbound();
    let mut lanes: tokio::task::JoinSet<(String, i64, Delivered)> = tokio::task::JoinSet::new();
    let mut busy: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut served: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let mut turn: u64 = 0;
    loop {
        let mut failing = false;
        while lanes.len() < DELIVERY_LANES {
            let rank =
                |chat: &str| (!busy.contains(chat)).then(|| served.get(chat).copied().unwrap_or(0));
            match service.next_delivery(channel.name(), now_secs(), rank) {
                Ok(Some(out)) => {
                    turn += 1;
                    busy.insert(out.chat.clone());
                    served.insert(out.chat.clone(), turn);
                    let channel = channel.clone();
                    lanes.spawn(async move {
                        let result = if out.kind == OutboundKind::Document {
                            let (name, content) = document_parts(&out.text);
                            channel.deliver_document(&out.chat, name, content).await
                        } else {
                            channel.deliver(&out.chat, &out.text).await
                        };
                        (out.chat, out.id, result)
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "reading the outbound queue failed");
                    failing = true;
                    break;
                }
            }
        }
        if served.len() > CHATS_REMEMBERED {
            let mut turns: Vec<u64> = served.values().copied().collect();
            turns.sort_unstable();
            let cut = turns[turns.len() - CHATS_REMEMBERED / 2];
            served.retain(|_, t| *t >= cut);
        }
        tokio::select! {
            Some(done) = lanes.join_next(), if !lanes.is_empty() => {
                let Ok((chat, id, result)) = done else { continue };
                busy.remove(&chat);
                if let Delivered::Failed(reason) = &result {
                    tracing::warn!(channel = channel.name(), outbound = id, reason = %reason, "a reply could not be delivered");
                }
                if let Err(e) = service.record_delivery(id, &result, now_secs()) {
                    tracing::error!(error = %e, "recording a delivery failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            // New replies wake us; retries come due on their own.
            _ = tokio::time::sleep(Duration::from_secs(1)), if failing => {}
            _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()), if !failing => {}
        }
    }
}

/// Splits `text` into pieces of at most `max_units` UTF-16 code units (Telegram counts
/// message length that way), preferring to break after a newline or a space.
pub fn split_message(text: &str, max_units: usize) -> Vec<String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut units = 0;
        let mut cut = rest.len();
        let mut soft = None;
        for (i, c) in rest.char_indices() {
            if units + c.len_utf16() > max_units {
                cut = i;
                break;
            }
            units += c.len_utf16();
            if c == '\n' || c == ' ' {
                soft = Some(i + c.len_utf8());
            }
        }
        if cut < rest.len()
            && let Some(s) = soft
        {
            cut = s;
        }
        parts.push(rest[..cut].to_owned());
        rest = &rest[cut..];
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_keeps_every_character_and_respects_the_limit() {
        let text = format!(
            "{} {}\n{}",
            "a".repeat(5000),
            "é".repeat(3000),
            "😀".repeat(3000)
        );
        let parts = split_message(&text, 4096);
        assert_eq!(parts.concat(), text);
        for p in &parts {
            assert!(p.encode_utf16().count() <= 4096);
        }
        assert_eq!(split_message("short", 4096), vec!["short"]);
        assert!(split_message("", 4096).is_empty());
    }
}
