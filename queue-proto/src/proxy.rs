//! Requests and responses on the per-session proxy socket, the agent's only way out.
//!
//! The socket itself identifies the session, so no request names one. Bodies are closed
//! types, and every body's size is checked against its endpoint's limit before parsing.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ids::Seq;
use crate::items::{ChangeRequest, ItemError, MAX_TEXT_BYTES};

/// Largest `POST /v1/model` body, in bytes: room for one photo of up to 5 MiB, base64.
pub const MAX_MODEL_REQUEST_BYTES: usize = 8 * 1024 * 1024;
/// Largest `POST /v1/web/fetch` or `POST /v1/web/search` body, in bytes.
pub const MAX_WEB_REQUEST_BYTES: usize = 8 * 1024;
/// Longest URL an agent may ask for, in bytes.
pub const MAX_URL_BYTES: usize = 4096;
/// Longest search query, in bytes.
pub const MAX_QUERY_BYTES: usize = 400;
/// Largest `POST /v1/transcriptions` body, in bytes.
pub const MAX_TRANSCRIPTION_REQUEST_BYTES: usize = 256;
/// Largest `POST /v1/outbox` body, in bytes.
pub const MAX_OUTBOX_NOTICE_BYTES: usize = 256;
/// Largest `POST /v1/change-requests` body, in bytes.
pub const MAX_CHANGE_REQUEST_BYTES: usize = 96 * 1024;
/// Most messages in one model request.
pub const MAX_MODEL_MESSAGES: usize = 512;
/// Most tools offered in one model request.
pub const MAX_MODEL_TOOLS: usize = 32;
/// Largest `POST /v1/reminders` body, in bytes.
pub const MAX_REMINDER_REQUEST_BYTES: usize = 80 * 1024;
/// Largest `POST /v1/reminders/cancel` body, in bytes.
pub const MAX_REMINDER_CANCEL_BYTES: usize = 256;

/// Why a request body was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request body has {got} bytes, more than the limit of {max}")]
    TooLarge { got: usize, max: usize },
    #[error("request body is not a valid {what}")]
    Malformed {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("request is invalid: {0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Item(#[from] ItemError),
}

/// The endpoints, each with its path, method and body limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v1/wait?after=<seq>`: long-poll for new inbox segments.
    Wait,
    /// `POST /v1/model`: one provider-neutral model call.
    Model,
    /// `POST /v1/outbox`: an outbox segment was published.
    Outbox,
    /// `POST /v1/change-requests`: ask the gateway for a change.
    ChangeRequests,
    /// `POST /v1/reminders`: set a reminder for the person.
    SetReminder,
    /// `GET /v1/reminders`: the session's reminders still to come.
    ListReminders,
    /// `POST /v1/reminders/cancel`: cancel one of them.
    CancelReminder,
    /// `POST /v1/transcriptions`: the transcript of a voice note the person sent.
    Transcribe,
    /// `POST /v1/web/fetch`: a page, fetched by the control plane.
    WebFetch,
    /// `POST /v1/web/search`: search results, from the configured backend.
    WebSearch,
}

impl Endpoint {
    /// Maps a method and path to an endpoint; anything else is `None` (404).
    pub fn route(method: &str, path: &str) -> Option<Endpoint> {
        match (method, path) {
            ("GET", "/v1/wait") => Some(Endpoint::Wait),
            ("POST", "/v1/model") => Some(Endpoint::Model),
            ("POST", "/v1/outbox") => Some(Endpoint::Outbox),
            ("POST", "/v1/change-requests") => Some(Endpoint::ChangeRequests),
            ("POST", "/v1/reminders") => Some(Endpoint::SetReminder),
            ("GET", "/v1/reminders") => Some(Endpoint::ListReminders),
            ("POST", "/v1/reminders/cancel") => Some(Endpoint::CancelReminder),
            ("POST", "/v1/transcriptions") => Some(Endpoint::Transcribe),
            ("POST", "/v1/web/fetch") => Some(Endpoint::WebFetch),
            ("POST", "/v1/web/search") => Some(Endpoint::WebSearch),
            _ => None,
        }
    }

    /// The body limit, checked before reading further.
    pub fn max_body_bytes(self) -> usize {
        match self {
            Endpoint::Wait | Endpoint::ListReminders => 0,
            Endpoint::Model => MAX_MODEL_REQUEST_BYTES,
            Endpoint::Outbox => MAX_OUTBOX_NOTICE_BYTES,
            Endpoint::ChangeRequests => MAX_CHANGE_REQUEST_BYTES,
            Endpoint::SetReminder => MAX_REMINDER_REQUEST_BYTES,
            Endpoint::CancelReminder => MAX_REMINDER_CANCEL_BYTES,
            Endpoint::Transcribe => MAX_TRANSCRIPTION_REQUEST_BYTES,
            Endpoint::WebFetch | Endpoint::WebSearch => MAX_WEB_REQUEST_BYTES,
        }
    }
}

/// Parses `after=<decimal seq>`, the only query `GET /v1/wait` accepts.
pub fn parse_wait_query(query: &str) -> Result<Seq, RequestError> {
    let digits = query
        .strip_prefix("after=")
        .ok_or(RequestError::Invalid("expected after=<seq>"))?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::Invalid("seq must be a decimal number"));
    }
    digits
        .parse()
        .map(Seq)
        .map_err(|_| RequestError::Invalid("seq is out of range"))
}

/// Answer to `GET /v1/wait`: the inbox segments published after the given seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitResponse {
    pub seqs: Vec<Seq>,
}

/// Who said a message in a model conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
}

/// One block of a message, provider-neutral.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: serde_json::Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
        is_error: bool,
    },
    /// A photo the person sent, base64, for a model that accepts images.
    Image {
        media_type: String,
        data: String,
    },
}

/// One message of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Vec<ContentBlock>,
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub input_schema: serde_json::Value,
}

/// Body of `POST /v1/model`. No URL, model name or key: the control plane chooses those.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRequest {
    pub system: String,
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolSpec>,
    pub max_tokens: u32,
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    ToolUse,
    MaxTokens,
}

/// Token counts of one model call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Answer to `POST /v1/model`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelResponse {
    pub content: Vec<ContentBlock>,
    pub stop_reason: StopReason,
    pub usage: Usage,
}

/// Body of `POST /v1/outbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxNotice {
    pub seq: Seq,
}

/// Answer to `POST /v1/change-requests`: the request was filed for the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequestFiled {
    pub id: crate::ids::ChangeId,
}

/// How often a reminder comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Every {
    Day,
    Week,
    Month,
}

/// A day of the week, for weekly reminders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weekday {
    Monday,
    Tuesday,
    Wednesday,
    Thursday,
    Friday,
    Saturday,
    Sunday,
}

/// Body of `POST /v1/reminders`, and the `schedule` tool's input as the model gives it:
/// when, in the person's own terms. Exactly one of `in_minutes`, `at` and `every` says
/// when; the control plane works out the instant in the session's time zone, and
/// refuses what is in the past, malformed or beyond its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReminderRequest {
    pub text: String,
    /// Minutes from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_minutes: Option<u32>,
    /// A local date and time (`2026-12-08T08:00`), or an instant with its offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// A reminder that comes back, at `time` (local `HH:MM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<Every>,
    /// For `every: week`: the days it comes back on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<Weekday>,
    /// For `every: month`: the day of the month (the month's last day when it is shorter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_of_month: Option<u8>,
    /// For `every`: the local time of day, `HH:MM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

/// A reminder as the control plane holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reminder {
    pub id: u64,
    /// When it next fires: the person's local time, ISO 8601 with the offset.
    pub next: String,
    /// The IANA zone `next` is given in.
    pub zone: String,
    /// How it comes back (`every week on monday, friday at 08:00`); absent: once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeats: Option<String>,
    pub text: String,
}

/// Answer to `POST /v1/reminders` and `POST /v1/reminders/cancel`. A refusal says why,
/// in the control plane's own words: the agent asked, and may tell the person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReminderAnswer {
    Set(Reminder),
    Cancelled { id: u64 },
    Refused { reason: String },
}

/// Answer to `GET /v1/reminders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReminderList {
    pub reminders: Vec<Reminder>,
}

/// Body of `POST /v1/reminders/cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReminderCancel {
    pub id: u64,
}

/// Body of `POST /v1/transcriptions`: which voice note, by the message it came with and
/// its place there. The control plane transcribes the bytes it fetched itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscriptionRequest {
    pub message_id: u64,
    pub index: u8,
}

/// Answer to `POST /v1/transcriptions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TranscriptionAnswer {
    Text {
        text: String,
    },
    /// Why there is no transcript, in the control plane's words.
    Refused {
        reason: String,
    },
}

/// Body of `POST /v1/web/fetch`: a URL the agent chose. The control plane fetches it
/// only if it has seen it itself (in the person's message, a search result, a page it
/// fetched for this session) or an operator granted its prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebFetchRequest {
    pub url: String,
}

/// Body of `POST /v1/web/search`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSearchRequest {
    pub query: String,
}

/// One search result, bounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchResult {
    pub url: String,
    pub title: String,
    pub snippet: String,
}

/// Answer to `POST /v1/web/fetch` and `POST /v1/web/search`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WebAnswer {
    /// The page's bytes (base64) as fetched, for the agent to read inside the box.
    Page {
        url: String,
        content_type: String,
        data: String,
    },
    Results {
        results: Vec<SearchResult>,
    },
    /// Why not, in the control plane's words.
    Refused {
        reason: String,
    },
}

/// The one error body the agent ever sees. The detail stays on the trusted side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub error: RefusalCode,
}

/// Coarse refusal reasons an agent may learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalCode {
    Rejected,
    BudgetExhausted,
    Unavailable,
}

/// A request body an endpoint accepts: parsed only after its size is checked.
pub trait RequestBody: DeserializeOwned {
    const NAME: &'static str;
    const MAX_BYTES: usize;
    /// Limits that serde cannot express.
    fn validate(&self) -> Result<(), RequestError>;
}

impl RequestBody for ModelRequest {
    const NAME: &'static str = "model request";
    const MAX_BYTES: usize = MAX_MODEL_REQUEST_BYTES;
    fn validate(&self) -> Result<(), RequestError> {
        if self.messages.is_empty() || self.messages.len() > MAX_MODEL_MESSAGES {
            return Err(RequestError::Invalid("messages must number 1..=512"));
        }
        if self.tools.len() > MAX_MODEL_TOOLS {
            return Err(RequestError::Invalid("too many tools"));
        }
        if self.system.len() > MAX_TEXT_BYTES {
            return Err(RequestError::Invalid("system prompt too long"));
        }
        if self.max_tokens == 0 {
            return Err(RequestError::Invalid("max_tokens must be at least 1"));
        }
        Ok(())
    }
}

impl RequestBody for OutboxNotice {
    const NAME: &'static str = "outbox notice";
    const MAX_BYTES: usize = MAX_OUTBOX_NOTICE_BYTES;
    fn validate(&self) -> Result<(), RequestError> {
        Ok(())
    }
}

impl RequestBody for ChangeRequest {
    const NAME: &'static str = "change request";
    const MAX_BYTES: usize = MAX_CHANGE_REQUEST_BYTES;
    fn validate(&self) -> Result<(), RequestError> {
        ChangeRequest::validate(self).map_err(RequestError::from)
    }
}

impl RequestBody for ReminderRequest {
    const NAME: &'static str = "reminder request";
    const MAX_BYTES: usize = MAX_REMINDER_REQUEST_BYTES;
    fn validate(&self) -> Result<(), RequestError> {
        if self.text.trim().is_empty() || self.text.len() > MAX_TEXT_BYTES {
            return Err(RequestError::Invalid("text must be 1..=65536 bytes"));
        }
        let short = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > 40);
        if short(&self.at) || short(&self.time) || self.on.len() > 7 {
            return Err(RequestError::Invalid("a time field is too long"));
        }
        Ok(())
    }
}

impl RequestBody for TranscriptionRequest {
    const NAME: &'static str = "transcription request";
    const MAX_BYTES: usize = MAX_TRANSCRIPTION_REQUEST_BYTES;
    fn validate(&self) -> Result<(), RequestError> {
        Ok(())
    }
}

impl RequestBody for WebFetchRequest {
    const NAME: &'static str = "web fetch request";
    const MAX_BYTES: usize = MAX_WEB_REQUEST_BYTES;
    fn validate(&self) -> Result<(), RequestError> {
        if self.url.is_empty() || self.url.len() > MAX_URL_BYTES {
            return Err(RequestError::Invalid("url must be 1..=4096 bytes"));
        }
        Ok(())
    }
}

impl RequestBody for WebSearchRequest {
    const NAME: &'static str = "web search request";
    const MAX_BYTES: usize = MAX_WEB_REQUEST_BYTES;
    fn validate(&self) -> Result<(), RequestError> {
        if self.query.trim().is_empty() || self.query.len() > MAX_QUERY_BYTES {
            return Err(RequestError::Invalid("query must be 1..=400 bytes"));
        }
        Ok(())
    }
}

impl RequestBody for ReminderCancel {
    const NAME: &'static str = "reminder cancel";
    const MAX_BYTES: usize = MAX_REMINDER_CANCEL_BYTES;
    fn validate(&self) -> Result<(), RequestError> {
        Ok(())
    }
}

/// Parses a request body: size first, then the closed type, then its limits.
pub fn parse_body<T: RequestBody>(body: &[u8]) -> Result<T, RequestError> {
    if body.len() > T::MAX_BYTES {
        return Err(RequestError::TooLarge {
            got: body.len(),
            max: T::MAX_BYTES,
        });
    }
    let value: T = serde_json::from_slice(body).map_err(|source| RequestError::Malformed {
        what: T::NAME,
        source,
    })?;
    value.validate()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_query_accepts_only_a_decimal_seq() {
        assert_eq!(parse_wait_query("after=0").unwrap(), Seq(0));
        assert_eq!(
            parse_wait_query("after=18446744073709551615").unwrap(),
            Seq(u64::MAX)
        );
        for bad in [
            "",
            "after=",
            "after=-1",
            "after=1&session=b",
            "after=18446744073709551616",
            "before=1",
            "after=0x10",
        ] {
            assert!(parse_wait_query(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_are_closed() {
        assert_eq!(Endpoint::route("POST", "/v1/model"), Some(Endpoint::Model));
        assert_eq!(Endpoint::route("GET", "/v1/model"), None);
        assert_eq!(Endpoint::route("POST", "/v1/model/../outbox"), None);
    }

    #[test]
    fn a_model_request_cannot_carry_a_destination() {
        let body = br#"{"system":"","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"tools":[],"max_tokens":10,"base_url":"http://169.254.169.254"}"#;
        assert!(matches!(
            parse_body::<ModelRequest>(body),
            Err(RequestError::Malformed { .. })
        ));
        let ok = br#"{"system":"","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"tools":[],"max_tokens":10}"#;
        assert!(parse_body::<ModelRequest>(ok).is_ok());
    }

    #[test]
    fn size_is_checked_before_parsing() {
        let body = vec![b'{'; MAX_OUTBOX_NOTICE_BYTES + 1];
        assert!(matches!(
            parse_body::<OutboxNotice>(&body),
            Err(RequestError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_session_cannot_be_claimed() {
        assert!(parse_body::<OutboxNotice>(br#"{"seq":3,"session":"other"}"#).is_err());
        assert_eq!(
            parse_body::<OutboxNotice>(br#"{"seq":3}"#).unwrap(),
            OutboxNotice { seq: Seq(3) }
        );
    }
}
