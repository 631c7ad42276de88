//! Telegram Bot API: long-poll `getUpdates` (`message` and `callback_query` updates
//! only), replies with `sendMessage`, approval prompts with inline buttons. The offset sent to Telegram (which confirms every earlier
//! update) only moves past an update once the store holds it, in the same transaction
//! as the message. Senders not in `allowed_users` get one fixed refusal (at most one an
//! hour each) and never reach an agent; only private chats are served, so no reply is
//! shown to people who were not allowed to ask.
//!
//! Approval prompts go to each operator's private chat. A button press decides only as
//! the Telegram user who pressed it (`callback_query.from.id`, which Telegram vouches
//! for), only in a private chat, and only for an operator; every press is answered and
//! recorded, and the buttons are removed once the request is decided.
//!
//! The bot token is part of every URL: errors are reported without their URL, and
//! nothing here logs a URL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use queue_proto::ids::SessionId;
use queue_proto::items::MAX_TEXT_BYTES;
use serde_json::{Value, json};

use super::{Channel, ChannelError, split_message};
use crate::audit::AuditEvent;
use crate::config::TelegramConfig;
use crate::gateway;
use crate::model::http::{ApiKey, ApprovedEndpoint};
use crate::operator::Identity;
use crate::service::Arrival;
use crate::service::{Service, notice};
use crate::state::now_secs;
use crate::store::changes::{ChangeDetail, Decided, Decision, Prompt};
use crate::store::cursors::Cursor;
use crate::store::messages::{Inbound, Refusal};
use crate::store::outbound::Delivered;

/// The channel's name in the store.
pub const CHANNEL: &str = "telegram";
/// Telegram's limit on one message, in UTF-16 code units.
pub const MAX_MESSAGE_UNITS: usize = 4096;
/// The largest `getUpdates` answer read; a larger one is asked for again one update at
/// a time, and a single update larger than this is skipped and recorded.
pub const MAX_UPDATES_BYTES: usize = 16 * 1024 * 1024;
/// The largest answer to any other call.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Refusals sent to one unknown sender, at most one per this period.
const REFUSAL_PERIOD: Duration = Duration::from_secs(3600);
/// Attempts to send one part of a reply before giving up on it for now.
const SEND_TRIES: u32 = 5;
/// The longest `retry_after` believed; a larger one is clamped to this.
const MAX_RETRY_AFTER_SECS: u64 = 3600;
/// The longest wait between attempts to reach Telegram while it is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A configured bot.
pub struct Telegram {
    api: ApprovedEndpoint,
    token: ApiKey,
    client: reqwest::Client,
    poll_timeout: u64,
    refused_at: std::sync::Mutex<HashMap<i64, Instant>>,
}

impl std::fmt::Debug for Telegram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telegram")
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

/// How a Bot API call failed.
#[derive(Debug)]
enum CallError {
    /// Not reached: the request was not sent (details withheld: they hold the URL).
    Network,
    /// Sent, but no whole answer came back: whether Telegram acted on it is unknown.
    Uncertain,
    /// The answer was larger than allowed; the first update's id, if one was found.
    TooLarge(Option<i64>),
    /// Telegram answered `ok: false`, or with a non-JSON error.
    Status {
        code: u16,
        retry_after: Option<u64>,
        description: String,
    },
}

/// The session of a Telegram chat (see [`super::naming::telegram`]).
pub fn session_for(chat: i64) -> SessionId {
    super::naming::telegram(chat)
}

impl Telegram {
    pub fn new(cfg: &TelegramConfig) -> Result<Telegram, ChannelError> {
        let token = ApiKey::from_file(&cfg.token_file).map_err(|source| ChannelError::Token {
            channel: CHANNEL,
            path: cfg.token_file.clone(),
            source,
        })?;
        let api = ApprovedEndpoint::parse(&cfg.api_base)
            .expect("the configuration check accepted api_base");
        Ok(Telegram {
            api,
            token,
            client: crate::model::http::client(),
            poll_timeout: cfg.poll_timeout_secs,
            refused_at: std::sync::Mutex::new(HashMap::new()),
        })
    }

    async fn call(
        &self,
        method: &str,
        body: &Value,
        timeout: Duration,
        cap: usize,
    ) -> Result<Value, CallError> {
        let url = self
            .api
            .join(&format!("/bot{}/{method}", self.token.expose()));
        let sent = self
            .client
            .post(url)
            .json(body)
            .timeout(timeout)
            .send()
            .await;
        let mut resp = sent.map_err(|e| {
            if e.is_connect() {
                CallError::Network
            } else {
                CallError::Uncertain
            }
        })?;
        let status = resp.status().as_u16();
        let mut bytes = Vec::new();
        let mut scanner: Option<FirstUpdateId> = None;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if let Some(scan) = scanner.as_mut() {
                        scan.feed(&chunk);
                    } else if bytes.len() + chunk.len() > cap {
                        // Too large to keep: read on without keeping it, looking only
                        // for the first update's id so that update can be skipped.
                        let mut scan = FirstUpdateId::default();
                        scan.feed(&bytes);
                        scan.feed(&chunk);
                        bytes = Vec::new();
                        scanner = Some(scan);
                    } else {
                        bytes.extend_from_slice(&chunk);
                    }
                }
                Ok(None) => break,
                Err(_) => return Err(CallError::Uncertain),
            }
        }
        if let Some(scan) = scanner {
            return Err(CallError::TooLarge(scan.found));
        }
        // Not Telegram's own answer: a front end failed, and may have passed the request
        // on before it did.
        let answer: Value = serde_json::from_slice(&bytes).map_err(|_| {
            if status >= 500 {
                CallError::Uncertain
            } else {
                CallError::Status {
                    code: status,
                    retry_after: None,
                    description: "an answer that is not JSON".into(),
                }
            }
        })?;
        if answer.get("ok") == Some(&Value::Bool(true)) {
            return Ok(answer.get("result").cloned().unwrap_or(Value::Null));
        }
        Err(CallError::Status {
            code: answer
                .get("error_code")
                .and_then(Value::as_u64)
                .map_or(status, |c| c as u16),
            retry_after: answer
                .pointer("/parameters/retry_after")
                .and_then(Value::as_u64),
            description: answer
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("no description")
                .chars()
                .take(200)
                .collect(),
        })
    }

    /// Whether an unknown sender may be sent the refusal now.
    fn may_refuse(&self, user: i64) -> bool {
        let mut map = self.refused_at.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() > 10_000 {
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
                    .call(
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
                        Duration::from_secs(retry_after.unwrap_or(1).clamp(1, MAX_RETRY_AFTER_SECS))
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
            .call("getUpdates", &body, timeout, MAX_UPDATES_BYTES)
            .await;
        let error = match result {
            Ok(Value::Array(updates)) => {
                if failing {
                    tracing::info!("telegram reachable again");
                }
                failing = false;
                backoff = Duration::from_secs(1);
                limit = 100;
                for u in updates {
                    match handle(&service, &tg, &u, offset).await {
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
            Ok(_) => "an answer that is not a list of updates".to_owned(),
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
            tracing::warn!(problem = %error, "telegram getUpdates failed; retrying with backoff");
        }
        failing = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Finds the `update_id` of the first update in a `getUpdates` answer fed in pieces,
/// keeping nothing but a few bytes of state: it follows JSON strings and nesting, and
/// reads the number after the key `update_id` of the first object inside `result`.
#[derive(Debug, Default)]
struct FirstUpdateId {
    depth: u32,
    in_string: bool,
    escape: bool,
    /// Inside the first update (depth 3), whether the next string is a key.
    expect_key: bool,
    key: Vec<u8>,
    reading_key: bool,
    last_key_is_id: bool,
    number: String,
    reading_number: bool,
    updates_seen: u32,
    found: Option<i64>,
}

impl FirstUpdateId {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.found.is_some() || self.updates_seen > 1 {
                return;
            }
            self.step(b);
        }
    }

    fn step(&mut self, b: u8) {
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.reading_key {
                    self.reading_key = false;
                    self.last_key_is_id = self.key == b"update_id";
                }
            } else if self.reading_key && self.key.len() < 16 {
                self.key.push(b);
            }
            return;
        }
        if self.reading_number {
            if b.is_ascii_digit() || (b == b'-' && self.number.is_empty()) {
                self.number.push(char::from(b));
                return;
            }
            if !b.is_ascii_whitespace() || !self.number.is_empty() {
                self.reading_number = false;
                self.found = self.number.parse().ok();
                return;
            }
        }
        match b {
            b'"' => {
                self.in_string = true;
                self.reading_key = self.depth == 3 && self.expect_key;
                self.key.clear();
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth == 3 {
                    self.updates_seen += 1;
                    self.expect_key = b == b'{';
                }
            }
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            b':' if self.depth == 3 => {
                self.expect_key = false;
                if self.last_key_is_id {
                    self.reading_number = true;
                    self.number.clear();
                }
            }
            b',' if self.depth == 3 => {
                self.expect_key = true;
                self.last_key_is_id = false;
            }
            _ => {}
        }
    }
}

/// Stores one update (or records why it is refused) with the next offset. Returns the
/// next offset, `None` for an update to skip, or `Err` if the store failed.
async fn handle(
    service: &Arc<Service>,
    tg: &Telegram,
    u: &Value,
    offset: i64,
) -> Result<Option<i64>, ()> {
    let Some(update_id) = u.get("update_id").and_then(Value::as_i64) else {
        return Ok(None);
    };
    if update_id < offset || update_id == i64::MAX {
        return Ok(None);
    }
    let next = (update_id + 1).to_string();
    if let Some(cq) = u.get("callback_query") {
        button_pressed(service, tg, cq).await;
        let cursor = Cursor {
            name: CHANNEL,
            value: &next,
        };
        return match service.receive(Arrival::Nothing, Some(cursor)).await {
            Ok(_) => Ok(Some(update_id + 1)),
            Err(e) => {
                tracing::error!(error = %e, "storing the telegram offset failed");
                Err(())
            }
        };
    }
    let cursor = Some(Cursor {
        name: CHANNEL,
        value: &next,
    });
    let ext = update_id.to_string();
    let msg = u.get("message");
    let from = msg
        .and_then(|m| m.pointer("/from/id"))
        .and_then(Value::as_i64);
    let chat = msg
        .and_then(|m| m.pointer("/chat/id"))
        .and_then(Value::as_i64);
    let private = msg
        .and_then(|m| m.pointer("/chat/type"))
        .and_then(Value::as_str)
        == Some("private");
    let text = msg.and_then(|m| m.get("text")).and_then(Value::as_str);
    let bytes = text.map_or(0, str::len);
    let now = now_secs();
    let refuse = async |chat: String, reason: &'static str, notice: Option<&'static str>| {
        let refusal = Refusal {
            channel: CHANNEL,
            chat: &chat,
            external_id: Some(&ext),
            bytes,
            reason,
            notice,
        };
        service.receive(Arrival::Refused(refusal), cursor).await
    };
    let refused = match (from, chat) {
        // Nothing is said in a group: others there were not allowed to ask.
        (Some(_), Some(chat)) if !private => Some((chat.to_string(), "not a private chat", None)),
        (Some(from), Some(chat)) if !allowed(service, from) => {
            let n = tg.may_refuse(from).then_some(notice::NOT_ALLOWED);
            Some((chat.to_string(), "sender not in allowed_users", n))
        }
        (Some(_), Some(chat)) if text.is_none() => Some((
            chat.to_string(),
            "not a text message",
            Some(notice::NOT_TEXT),
        )),
        (Some(_), Some(chat)) if bytes > MAX_TEXT_BYTES => Some((
            chat.to_string(),
            "longer than 64 KiB",
            Some(notice::TOO_LONG),
        )),
        (Some(_), Some(_)) => None,
        _ => Some((String::new(), "malformed or unsupported update", None)),
    };
    if let Some((chat, reason, notice)) = refused {
        return match refuse(chat, reason, notice).await {
            Ok(_) => Ok(Some(update_id + 1)),
            Err(e) => {
                tracing::error!(error = %e, "recording a refused update failed");
                Err(())
            }
        };
    }
    let chat = chat.expect("matched above");
    let inbound = Inbound {
        channel: CHANNEL.into(),
        chat: chat.to_string(),
        external_id: Some(ext.clone()),
        text: text.expect("matched above").to_owned(),
        received_at: now,
    };
    let session = session_for(chat);
    let arrival = Arrival::Message {
        session: &session,
        inbound: &inbound,
    };
    match service.receive(arrival, cursor).await {
        Ok(_) => Ok(Some(update_id + 1)),
        // Not a store failure: this update can never be stored, so it is refused and
        // passed, rather than holding up every update after it.
        Err(e @ crate::service::ServiceError::WrongChannel { .. }) => {
            tracing::error!(error = %e, "a telegram chat's session name is taken");
            refuse(
                chat.to_string(),
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

/// Whether the approved configuration in force lets `user` talk to the assistant.
fn allowed(service: &Service, user: i64) -> bool {
    service
        .config()
        .channels
        .telegram
        .as_ref()
        .is_some_and(|t| t.allowed_users.contains(&user))
}

/// The longest diff put in a prompt; the rest is a pointer to `changes show`.
const PROMPT_DIFF_CHARS: usize = 2500;
/// Hex digits of the text's SHA-256 carried in a button (callback data is at most 64
/// bytes): the press decides only the text it was shown with.
const BUTTON_HASH_DIGITS: usize = 32;

/// The prompt, and whether it shows the whole change (only then can it be approved
/// from Telegram: an approval covers exactly what was shown). Everything a requester
/// wrote is shown with control and bidirectional characters escaped.
fn prompt_text(d: &ChangeDetail) -> (String, bool) {
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
        return (whole, true);
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
    match p.message_id {
        None => {
            let Ok(Some(detail)) = service.change(&p.change_id) else {
                return done(None);
            };
            let short = &detail.after_hash[..BUTTON_HASH_DIGITS];
            let (text, whole) = prompt_text(&detail);
            let mut buttons = Vec::new();
            if whole {
                buttons.push(
                    json!({ "text": "Approve", "callback_data": format!("a:{}:{short}", p.change_id) }),
                );
            }
            buttons.push(
                json!({ "text": "Reject", "callback_data": format!("r:{}:{short}", p.change_id) }),
            );
            let body = json!({
                "chat_id": p.chat,
                "text": text,
                "reply_markup": { "inline_keyboard": [buttons] },
            });
            match tg
                .call("sendMessage", &body, timeout, MAX_ANSWER_BYTES)
                .await
            {
                Ok(m) => match m.get("message_id").and_then(Value::as_i64) {
                    Some(id) => done(Some(id)),
                    None => done(None),
                },
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
        Some(message_id) => {
            let body = json!({
                "chat_id": p.chat,
                "message_id": message_id,
                "text": format!("Change request {}: {}.", p.change_id, p.change_state),
            });
            match tg
                .call("editMessageText", &body, timeout, MAX_ANSWER_BYTES)
                .await
            {
                Ok(_) => done(None),
                Err(CallError::Status { code, .. }) if code < 500 && code != 429 => done(None),
                Err(_) => false,
            }
        }
    }
}

/// Whether change `id` fits its prompt (unknown ids are left to the decision to refuse).
fn whole_in_prompt(service: &Service, id: &str) -> bool {
    match service.change(id) {
        Ok(Some(d)) => prompt_text(&d).1,
        // Unknown: the decision refuses it and says so.
        Ok(None) => true,
        Err(_) => false,
    }
}

/// A button press: decided as the Telegram user who pressed it, if every rule holds;
/// answered in every case, and recorded.
async fn button_pressed(service: &Arc<Service>, tg: &Telegram, cq: &Value) {
    let from = cq.pointer("/from/id").and_then(Value::as_i64);
    let query_id = cq.get("id").and_then(Value::as_str).unwrap_or_default();
    let data = cq.get("data").and_then(Value::as_str).unwrap_or_default();
    let chat = cq.pointer("/message/chat/id").and_then(Value::as_i64);
    let private = cq.pointer("/message/chat/type").and_then(Value::as_str) == Some("private");
    let mut parts = data.splitn(3, ':');
    let (verb, id, hash) = (parts.next(), parts.next(), parts.next());
    let decision = match verb {
        Some("a") => Some(Decision::Approve),
        Some("r") => Some(Decision::Reject),
        _ => None,
    };
    let refuse = |why: &str| {
        service.audit(
            AuditEvent::DecisionRefused,
            json!({ "via": "telegram", "by": from.map(|f| Identity::Telegram(f).to_string()),
                    "change": id.map(|i| i.chars().take(40).collect::<String>()), "why": why }),
        );
    };
    let answer = match (from, decision, id, hash) {
        (Some(_), _, _, _) if !private || chat != from => {
            refuse("not pressed in the operator's private chat with the bot");
            "Approvals are taken only in a private chat with the bot.".to_owned()
        }
        (Some(_), Some(Decision::Approve), Some(id), _) if !whole_in_prompt(service, id) => {
            refuse("an approval from Telegram of a change too long for its prompt");
            "This change is too long to approve here; use `ironclaw changes approve`.".to_owned()
        }
        (Some(user), Some(decision), Some(id), Some(hash)) if hash.len() == BUTTON_HASH_DIGITS => {
            match service
                .decide(id, decision, &Identity::Telegram(user), Some(hash))
                .await
            {
                Ok(Decided::Applied(v)) => {
                    format!("Approved: configuration version {} is in force.", v.version)
                }
                Ok(Decided::Rejected) => "Rejected.".to_owned(),
                Ok(Decided::Refused(why)) => format!("Refused: {why}."),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "deciding a change request failed");
                    "Something went wrong; the operator's log says what.".to_owned()
                }
            }
        }
        _ => {
            refuse("a malformed button press");
            "This button is not understood.".to_owned()
        }
    };
    if !query_id.is_empty() {
        let body = json!({ "callback_query_id": query_id, "text": answer.chars().take(190).collect::<String>() });
        if tg
            .call(
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
    use super::*;

    #[test]
    fn sessions_are_named_after_the_chat() {
        assert_eq!(session_for(42).as_str(), "tg-42");
        assert_eq!(session_for(-1001234).as_str(), "tg-n1001234");
        assert_eq!(session_for(i64::MIN).as_str(), "tg-n9223372036854775808");
    }

    fn scan(parts: &[&str]) -> Option<i64> {
        let mut f = FirstUpdateId::default();
        for p in parts {
            f.feed(p.as_bytes());
        }
        f.found
    }

    #[test]
    fn the_first_update_id_is_found_in_a_stream_whatever_the_key_order() {
        assert_eq!(
            scan(&[r#"{"ok":true,"result":[{"update_id": 991,"message":{"te"#]),
            Some(991)
        );
        assert_eq!(
            scan(&[
                r#"{"ok":true,"result":[{"message":{"update_id":1,"text":"\"update_id\": 5 "#,
                r#"x"},"update_id":"#,
                "77}]}"
            ]),
            Some(77)
        );
        assert_eq!(
            scan(&[r#"{"result":[{"message":{}},{"update_id":3}]}"#]),
            None
        );
        assert_eq!(scan(&[r#"{"ok":true,"result":[{"message":"#]), None);
    }
}
