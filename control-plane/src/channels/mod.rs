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
use crate::store::outbound::Delivered;

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
}

/// Starts every configured channel; the console is carried by the admin socket.
pub fn start(service: &Arc<Service>) -> Result<Vec<JoinHandle<()>>, ChannelError> {
    let mut tasks = Vec::new();
    if let Some(cfg) = &service.config().channels.telegram {
        let tg = Arc::new(telegram::Telegram::new(cfg)?);
        tasks.push(tokio::spawn(telegram::poll(service.clone(), tg.clone())));
        tasks.push(tokio::spawn(telegram::prompts(service.clone(), tg.clone())));
        tasks.push(tokio::spawn(deliver_loop(service.clone(), tg)));
    }
    if let Some(cfg) = &service.config().channels.bridge {
        tasks.push(bridge::start(service.clone(), cfg)?);
    }
    Ok(tasks)
}

/// Hands queued replies to a push channel, one at a time, oldest first; waits for new
/// ones or for the next retry time.
pub async fn deliver_loop<C: Channel>(service: Arc<Service>, channel: Arc<C>) {
    let mut changes = service.watch_outbound();
    loop {
        let next = service.next_delivery(channel.name(), now_secs());
        match next {
            Ok(Some(out)) => {
                let result = channel.deliver(&out.chat, &out.text).await;
                if let Delivered::Failed(reason) = &result {
                    tracing::warn!(channel = channel.name(), outbound = out.id, reason = %reason, "a reply could not be delivered");
                }
                if let Err(e) = service.record_delivery(out.id, &result, now_secs()) {
                    tracing::error!(error = %e, "recording a delivery failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Ok(None) => {
                // New replies wake us; retries come due on their own.
                let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the outbound queue failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
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
