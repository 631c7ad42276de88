//! Telegram Bot API: long-poll `getUpdates` (`message` and `callback_query` updates
//! only), replies with `sendMessage`, approval prompts with inline buttons.
//!
//! - `api.rs`: the transport (one call, its size limits, how it failed, retry bounds);
//! - `updates.rs`: the typed answers and updates read from Telegram;
//! - `poll.rs`: long polling and the inbound rules (who may talk, in which chat, what);
//! - `deliver.rs`: the [`Channel`](super::Channel) that sends replies, with retries;
//! - `prompts.rs`: approval prompts and button presses, and the rules that make an
//!   approval cover exactly what was shown;
//! - here: the channel value.
//!
//! Everything that arrives goes in through [`Service::receive`](crate::service::Service::receive);
//! the channel holds no store handle. The bot token is part of every URL: errors are
//! reported without their URL, and nothing here logs a URL.

mod api;
mod deliver;
mod fetch;
mod poll;
mod prompts;
mod updates;

use super::ChannelError;
use crate::config::TelegramConfig;
use crate::model::http::{ApiKey, ApprovedEndpoint};

pub use fetch::fetch_files;
pub use poll::poll;
pub use prompts::prompts;

/// The channel's name in the store.
pub const CHANNEL: &str = "telegram";
/// Telegram's limit on one message, in UTF-16 code units.
pub const MAX_MESSAGE_UNITS: usize = 4096;

/// A configured bot.
pub struct Telegram {
    api: api::BotApi,
    poll_timeout: u64,
    refusals: poll::Refusals,
    /// Chats shown "typing…" now: one loop per chat (see [`poll::show_typing`]).
    typing: std::sync::Mutex<std::collections::HashSet<i64>>,
}

impl std::fmt::Debug for Telegram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telegram")
            .field("api", self.api.endpoint())
            .finish_non_exhaustive()
    }
}

/// One `getMe` call with the configured token (`doctor --probe`): the bot's name, or
/// what went wrong and at which address. The token is never part of the answer.
pub async fn probe(cfg: &TelegramConfig) -> Result<String, String> {
    use api::CallError;
    let tg = Telegram::new(cfg).map_err(|e| crate::error_chain(&e))?;
    let base = tg.api.endpoint().join("");
    let at = format!("{}/bot<token>/getMe", base.as_str().trim_end_matches('/'));
    let answer = tg
        .api
        .call::<serde_json::Value>(
            "getMe",
            &serde_json::json!({}),
            std::time::Duration::from_secs(15),
            64 * 1024,
        )
        .await;
    match answer {
        Ok(Some(me)) => Ok(format!(
            "the bot is @{}",
            me["username"].as_str().unwrap_or("(no name)")
        )),
        Ok(None) => Err(format!("{at} answered without a bot")),
        Err(CallError::Status {
            code: code @ (401 | 404),
            ..
        }) => Err(format!(
            "{at} refused the bot token (status {code}): it is wrong or was revoked; get one from @BotFather"
        )),
        Err(CallError::Status {
            code, description, ..
        }) => Err(format!("{at} answered status {code}: {description}")),
        Err(CallError::Network) => Err(format!(
            "{at} could not be reached (connection refused, no route, DNS or TLS)"
        )),
        Err(CallError::Uncertain | CallError::TooLarge(_)) => {
            Err(format!("{at} did not give a whole answer"))
        }
    }
}

impl Telegram {
    pub fn new(cfg: &TelegramConfig) -> Result<Telegram, ChannelError> {
        let token = ApiKey::from_file(&cfg.token_file).map_err(|source| ChannelError::Token {
            channel: CHANNEL,
            path: cfg.token_file.clone(),
            source,
        })?;
        let endpoint = ApprovedEndpoint::parse(&cfg.api_base)
            .expect("the configuration check accepted api_base");
        Ok(Telegram {
            api: api::BotApi::new(endpoint, token),
            poll_timeout: cfg.poll_timeout_secs,
            refusals: poll::Refusals::default(),
            typing: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }
}
