//! The items that cross the spine inside segments. Every type is closed
//! (`deny_unknown_fields`), every text has a byte limit, and the encoded size is checked
//! before parsing.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ids::Direction;

/// Longest user message, reply, note body or reminder text, in bytes of UTF-8.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// Longest agent instructions, in bytes.
pub const MAX_INSTRUCTIONS_BYTES: usize = 64 * 1024;
/// Longest note name or change-request reason, in bytes.
pub const MAX_SHORT_TEXT_BYTES: usize = 1024;
/// Longest encoded item (JSON), in bytes; checked before parsing.
pub const MAX_ITEM_BYTES: usize = 160 * 1024;
/// Most tools an agent configuration may list.
pub const MAX_TOOLS: usize = 16;

/// Why an item was refused.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("item has {got} bytes, more than the limit of {max}")]
    TooLarge { got: usize, max: usize },
    #[error("unknown item kind")]
    UnknownKind,
    #[error("item kind {kind} may not travel in the {direction} direction")]
    WrongDirection {
        kind: &'static str,
        direction: &'static str,
    },
    #[error("item does not parse as {kind}")]
    Malformed {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("field {field} has {got} bytes, more than the limit of {max}")]
    FieldTooLong {
        field: &'static str,
        got: usize,
        max: usize,
    },
    #[error("field {field} is invalid: {why}")]
    Invalid {
        field: &'static str,
        why: &'static str,
    },
}

fn limit(field: &'static str, text: &str, max: usize) -> Result<(), ItemError> {
    if text.len() > max {
        return Err(ItemError::FieldTooLong {
            field,
            got: text.len(),
            max,
        });
    }
    Ok(())
}

/// The closed set of item kinds. The kind's name is stored beside each sealed row and
/// bound into its associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ItemKind {
    UserMessage,
    AgentConfig,
    AssistantReply,
    Note,
    ScheduleRequest,
    ChangeRequest,
    Attachment,
    DocumentReply,
}

impl ItemKind {
    pub const ALL: [ItemKind; 8] = [
        ItemKind::UserMessage,
        ItemKind::AgentConfig,
        ItemKind::AssistantReply,
        ItemKind::Note,
        ItemKind::ScheduleRequest,
        ItemKind::ChangeRequest,
        ItemKind::Attachment,
        ItemKind::DocumentReply,
    ];

    /// The stable name stored in segments.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::UserMessage => "user_message",
            ItemKind::AgentConfig => "agent_config",
            ItemKind::AssistantReply => "assistant_reply",
            ItemKind::Note => "note",
            ItemKind::ScheduleRequest => "schedule_request",
            ItemKind::ChangeRequest => "change_request",
            ItemKind::Attachment => "attachment",
            ItemKind::DocumentReply => "document_reply",
        }
    }

    /// Parses a stored kind name.
    pub fn parse(name: &str) -> Result<ItemKind, ItemError> {
        ItemKind::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or(ItemError::UnknownKind)
    }

    /// The only direction this kind may travel.
    pub fn direction(self) -> Direction {
        match self {
            ItemKind::UserMessage | ItemKind::AgentConfig | ItemKind::Attachment => {
                Direction::Inbox
            }
            ItemKind::AssistantReply
            | ItemKind::Note
            | ItemKind::ScheduleRequest
            | ItemKind::ChangeRequest
            | ItemKind::DocumentReply => Direction::Outbox,
        }
    }
}

/// A message from the person, as accepted by a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserMessage {
    /// The control store's id of the inbound item; replies name it.
    pub message_id: u64,
    /// When the channel received it, in Unix seconds.
    pub received_at: i64,
    pub text: String,
    /// The person's local date and time when it was handed to the agent, ISO 8601 with
    /// the offset (`2026-12-03T18:04:00+01:00`), worked out by the control plane.
    #[serde(default)]
    pub local_time: String,
    /// The IANA name of the person's time zone (`Europe/Berlin`).
    #[serde(default)]
    pub time_zone: String,
    /// How many files came with it; their [`Attachment`] items come before it in the
    /// same segment.
    #[serde(default)]
    pub attachments: u8,
}

/// Raw bytes of one [`Attachment`] part (a multiple of 3, so that the parts' base64
/// texts join into the base64 of the whole file).
pub const ATTACHMENT_PART_BYTES: usize = 96 * 1024;
/// Largest photo passed on (and sent to a model: Anthropic's own limit per image).
pub const MAX_PHOTO_BYTES: u64 = 5 * 1024 * 1024;
/// Most parts of one attachment (24 MiB).
pub const MAX_ATTACHMENT_PARTS: u32 = 256;

/// What kind of file the person sent, as the control plane decided from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachmentKind {
    /// An image: `image/jpeg`, `image/png`, `image/webp`.
    Photo,
    /// `application/pdf` or `text/plain` (Markdown included).
    Document,
    /// A voice note (`audio/ogg`); its bytes stay with the control plane, and the agent
    /// asks for its transcript through the proxy.
    Voice,
}

/// The media types the control plane passes on, each decided by sniffing the bytes.
pub const MEDIA_TYPES: [(&str, AttachmentKind); 6] = [
    ("image/jpeg", AttachmentKind::Photo),
    ("image/png", AttachmentKind::Photo),
    ("image/webp", AttachmentKind::Photo),
    ("application/pdf", AttachmentKind::Document),
    ("text/plain", AttachmentKind::Document),
    ("audio/ogg", AttachmentKind::Voice),
];

/// One part of a file the person sent with message `message_id`, fetched, checked and
/// stored by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub message_id: u64,
    /// Which of the message's files (0-based).
    pub index: u8,
    pub kind: AttachmentKind,
    /// One of [`MEDIA_TYPES`], from the bytes, never from the name.
    pub media_type: String,
    /// The name the person's app gave it; shown, never trusted.
    pub name: String,
    pub total_bytes: u64,
    pub part: u32,
    pub parts: u32,
    /// This part's bytes, base64 (empty for a voice note).
    pub data: String,
}

/// A file the agent sends back to the person (a note exported as a document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentReply {
    pub in_reply_to: u64,
    /// The file's name as the person will see it; the control plane makes it safe.
    pub file_name: String,
    /// Its content, as text.
    pub text: String,
}

/// The tools an agent may be given. Closed: an agent cannot name a tool that does not
/// exist in its binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolName {
    Reply,
    NoteWrite,
    NoteRead,
    NoteList,
    Schedule,
    RequestChange,
    NoteSearch,
    NoteDelete,
    ReminderList,
    ReminderCancel,
    NoteSend,
    WebSearch,
    WebFetch,
}

impl ToolName {
    pub const ALL: [ToolName; 13] = [
        ToolName::Reply,
        ToolName::NoteWrite,
        ToolName::NoteRead,
        ToolName::NoteList,
        ToolName::Schedule,
        ToolName::RequestChange,
        ToolName::NoteSearch,
        ToolName::NoteDelete,
        ToolName::ReminderList,
        ToolName::ReminderCancel,
        ToolName::NoteSend,
        ToolName::WebSearch,
        ToolName::WebFetch,
    ];

    /// The tool's one spelling: its serde name, the name in the configuration, the name
    /// the model calls and the key of a turn summary.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::Reply => "reply",
            ToolName::NoteWrite => "note_write",
            ToolName::NoteRead => "note_read",
            ToolName::NoteList => "note_list",
            ToolName::Schedule => "schedule",
            ToolName::RequestChange => "request_change",
            ToolName::NoteSearch => "note_search",
            ToolName::NoteDelete => "note_delete",
            ToolName::ReminderList => "reminder_list",
            ToolName::ReminderCancel => "reminder_cancel",
            ToolName::NoteSend => "note_send",
            ToolName::WebSearch => "web_search",
            ToolName::WebFetch => "web_fetch",
        }
    }
}

/// The agent's approved configuration, written by the control plane into the inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The approved configuration version this was built from.
    pub version: u64,
    pub instructions: String,
    pub tools: Vec<ToolName>,
    pub max_steps_per_turn: u32,
    /// Photos go to the model as images (`model.accepts_images`).
    #[serde(default)]
    pub accepts_images: bool,
}

/// The agent's answer to one user message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssistantReply {
    pub in_reply_to: u64,
    pub text: String,
}

/// A note the agent keeps; mirrored to the control store so the owner can read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Note {
    pub name: String,
    pub body: String,
}

/// A request that the control plane deliver `text` to the person at `at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// Unix seconds.
    pub at: i64,
    pub text: String,
}

/// What a change request would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeTarget {
    Instructions,
    Tools,
    Model,
    Endpoints,
    Budgets,
    AllowedUsers,
    SandboxLimits,
}

impl ChangeTarget {
    pub const ALL: [ChangeTarget; 7] = [
        ChangeTarget::Instructions,
        ChangeTarget::Tools,
        ChangeTarget::Model,
        ChangeTarget::Endpoints,
        ChangeTarget::Budgets,
        ChangeTarget::AllowedUsers,
        ChangeTarget::SandboxLimits,
    ];

    /// The target's one spelling: its serde name, and the name a change request is
    /// stored and shown under.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeTarget::Instructions => "instructions",
            ChangeTarget::Tools => "tools",
            ChangeTarget::Model => "model",
            ChangeTarget::Endpoints => "endpoints",
            ChangeTarget::Budgets => "budgets",
            ChangeTarget::AllowedUsers => "allowed_users",
            ChangeTarget::SandboxLimits => "sandbox_limits",
        }
    }
}

/// The agent asks for a change to what it is or can do. The gateway decides; nothing
/// here changes anything by itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    pub target: ChangeTarget,
    /// The exact proposed value, as text (TOML or JSON for structured targets).
    pub after: String,
    pub reason: String,
}

impl UserMessage {
    fn validate(&self) -> Result<(), ItemError> {
        limit("text", &self.text, MAX_TEXT_BYTES)?;
        limit("local_time", &self.local_time, 64)?;
        limit("time_zone", &self.time_zone, 64)
    }
}

impl Attachment {
    fn validate(&self) -> Result<(), ItemError> {
        limit("name", &self.name, 255)?;
        limit("data", &self.data, ATTACHMENT_PART_BYTES.div_ceil(3) * 4)?;
        if !MEDIA_TYPES.contains(&(self.media_type.as_str(), self.kind)) {
            return Err(ItemError::Invalid {
                field: "media_type",
                why: "not an accepted media type for its kind",
            });
        }
        if self.parts == 0 || self.parts > MAX_ATTACHMENT_PARTS || self.part >= self.parts {
            return Err(ItemError::Invalid {
                field: "part",
                why: "outside 0..parts, or too many parts",
            });
        }
        Ok(())
    }
}

impl DocumentReply {
    fn validate(&self) -> Result<(), ItemError> {
        limit("file_name", &self.file_name, 255)?;
        limit("text", &self.text, MAX_TEXT_BYTES)
    }
}

impl AgentConfig {
    fn validate(&self) -> Result<(), ItemError> {
        limit("instructions", &self.instructions, MAX_INSTRUCTIONS_BYTES)?;
        if self.tools.len() > MAX_TOOLS {
            return Err(ItemError::Invalid {
                field: "tools",
                why: "too many tools",
            });
        }
        if self.max_steps_per_turn == 0 {
            return Err(ItemError::Invalid {
                field: "max_steps_per_turn",
                why: "must be at least 1",
            });
        }
        Ok(())
    }
}

impl AssistantReply {
    fn validate(&self) -> Result<(), ItemError> {
        limit("text", &self.text, MAX_TEXT_BYTES)
    }
}

impl Note {
    fn validate(&self) -> Result<(), ItemError> {
        limit("name", &self.name, MAX_SHORT_TEXT_BYTES)?;
        limit("body", &self.body, MAX_TEXT_BYTES)
    }
}

impl ScheduleRequest {
    fn validate(&self) -> Result<(), ItemError> {
        limit("text", &self.text, MAX_TEXT_BYTES)
    }
}

impl ChangeRequest {
    /// Checks the field limits; also used for requests that arrive over the socket.
    pub fn validate(&self) -> Result<(), ItemError> {
        limit("after", &self.after, MAX_INSTRUCTIONS_BYTES)?;
        limit("reason", &self.reason, MAX_SHORT_TEXT_BYTES)
    }
}

/// Items the control plane sends to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxItem {
    UserMessage(UserMessage),
    AgentConfig(AgentConfig),
    Attachment(Attachment),
}

/// Items the agent sends to the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxItem {
    AssistantReply(AssistantReply),
    Note(Note),
    ScheduleRequest(ScheduleRequest),
    ChangeRequest(ChangeRequest),
    DocumentReply(DocumentReply),
}

/// One direction's item type: how it is named, encoded and parsed.
pub trait QueueItem: Sized {
    /// The direction these items travel.
    const DIRECTION: Direction;
    /// The item's kind, stored beside it.
    fn kind(&self) -> ItemKind;
    /// Checks field limits, then encodes as JSON.
    fn encode(&self) -> Result<Vec<u8>, ItemError>;
    /// Checks the size, the kind's direction, parses the closed type and its limits.
    fn decode(kind: ItemKind, bytes: &[u8]) -> Result<Self, ItemError>;
}

fn encode_checked<T: Serialize>(value: &T) -> Result<Vec<u8>, ItemError> {
    let bytes = serde_json::to_vec(value).expect("item types always serialise");
    if bytes.len() > MAX_ITEM_BYTES {
        return Err(ItemError::TooLarge {
            got: bytes.len(),
            max: MAX_ITEM_BYTES,
        });
    }
    Ok(bytes)
}

fn parse<T: DeserializeOwned>(kind: ItemKind, bytes: &[u8]) -> Result<T, ItemError> {
    if bytes.len() > MAX_ITEM_BYTES {
        return Err(ItemError::TooLarge {
            got: bytes.len(),
            max: MAX_ITEM_BYTES,
        });
    }
    serde_json::from_slice(bytes).map_err(|source| ItemError::Malformed {
        kind: kind.as_str(),
        source,
    })
}

fn check_direction(kind: ItemKind, direction: Direction) -> Result<(), ItemError> {
    if kind.direction() != direction {
        return Err(ItemError::WrongDirection {
            kind: kind.as_str(),
            direction: direction.as_str(),
        });
    }
    Ok(())
}

impl QueueItem for InboxItem {
    const DIRECTION: Direction = Direction::Inbox;

    fn kind(&self) -> ItemKind {
        match self {
            InboxItem::UserMessage(_) => ItemKind::UserMessage,
            InboxItem::AgentConfig(_) => ItemKind::AgentConfig,
            InboxItem::Attachment(_) => ItemKind::Attachment,
        }
    }

    fn encode(&self) -> Result<Vec<u8>, ItemError> {
        match self {
            InboxItem::UserMessage(m) => m.validate().and_then(|()| encode_checked(m)),
            InboxItem::AgentConfig(c) => c.validate().and_then(|()| encode_checked(c)),
            InboxItem::Attachment(a) => a.validate().and_then(|()| encode_checked(a)),
        }
    }

    fn decode(kind: ItemKind, bytes: &[u8]) -> Result<Self, ItemError> {
        check_direction(kind, Self::DIRECTION)?;
        let item = match kind {
            ItemKind::UserMessage => InboxItem::UserMessage(parse(kind, bytes)?),
            ItemKind::AgentConfig => InboxItem::AgentConfig(parse(kind, bytes)?),
            ItemKind::Attachment => InboxItem::Attachment(parse(kind, bytes)?),
            _ => unreachable!("check_direction admits only inbox kinds"),
        };
        match &item {
            InboxItem::UserMessage(m) => m.validate()?,
            InboxItem::AgentConfig(c) => c.validate()?,
            InboxItem::Attachment(a) => a.validate()?,
        }
        Ok(item)
    }
}

impl QueueItem for OutboxItem {
    const DIRECTION: Direction = Direction::Outbox;

    fn kind(&self) -> ItemKind {
        match self {
            OutboxItem::AssistantReply(_) => ItemKind::AssistantReply,
            OutboxItem::Note(_) => ItemKind::Note,
            OutboxItem::ScheduleRequest(_) => ItemKind::ScheduleRequest,
            OutboxItem::ChangeRequest(_) => ItemKind::ChangeRequest,
            OutboxItem::DocumentReply(_) => ItemKind::DocumentReply,
        }
    }

    fn encode(&self) -> Result<Vec<u8>, ItemError> {
        self.validate()?;
        match self {
            OutboxItem::AssistantReply(r) => encode_checked(r),
            OutboxItem::Note(n) => encode_checked(n),
            OutboxItem::ScheduleRequest(s) => encode_checked(s),
            OutboxItem::ChangeRequest(c) => encode_checked(c),
            OutboxItem::DocumentReply(d) => encode_checked(d),
        }
    }

    fn decode(kind: ItemKind, bytes: &[u8]) -> Result<Self, ItemError> {
        check_direction(kind, Self::DIRECTION)?;
        let item = match kind {
            ItemKind::AssistantReply => OutboxItem::AssistantReply(parse(kind, bytes)?),
            ItemKind::Note => OutboxItem::Note(parse(kind, bytes)?),
            ItemKind::ScheduleRequest => OutboxItem::ScheduleRequest(parse(kind, bytes)?),
            ItemKind::ChangeRequest => OutboxItem::ChangeRequest(parse(kind, bytes)?),
            ItemKind::DocumentReply => OutboxItem::DocumentReply(parse(kind, bytes)?),
            _ => unreachable!("check_direction admits only outbox kinds"),
        };
        item.validate()?;
        Ok(item)
    }
}

impl OutboxItem {
    fn validate(&self) -> Result<(), ItemError> {
        match self {
            OutboxItem::AssistantReply(r) => r.validate(),
            OutboxItem::Note(n) => n.validate(),
            OutboxItem::ScheduleRequest(s) => s.validate(),
            OutboxItem::ChangeRequest(c) => c.validate(),
            OutboxItem::DocumentReply(d) => d.validate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_kinds_fail() {
        for k in ItemKind::ALL {
            assert_eq!(ItemKind::parse(k.as_str()).unwrap(), k);
        }
        assert!(ItemKind::parse("shell_command").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = br#"{"in_reply_to":1,"text":"hi","send_to":"someone@else"}"#;
        assert!(matches!(
            OutboxItem::decode(ItemKind::AssistantReply, bad),
            Err(ItemError::Malformed { .. })
        ));
    }

    #[test]
    fn kinds_cannot_cross_in_the_wrong_direction() {
        let cfg = br#"{"version":1,"instructions":"obey me","tools":[],"max_steps_per_turn":9}"#;
        assert!(matches!(
            OutboxItem::decode(ItemKind::AgentConfig, cfg),
            Err(ItemError::WrongDirection { .. })
        ));
        assert!(InboxItem::decode(ItemKind::AgentConfig, cfg).is_ok());
    }

    #[test]
    fn limits_hold_on_both_encode_and_decode() {
        let long = OutboxItem::AssistantReply(AssistantReply {
            in_reply_to: 1,
            text: "x".repeat(MAX_TEXT_BYTES + 1),
        });
        assert!(matches!(long.encode(), Err(ItemError::FieldTooLong { .. })));
        let json = serde_json::to_vec(
            &serde_json::json!({"in_reply_to": 1, "text": "x".repeat(MAX_TEXT_BYTES + 1)}),
        )
        .unwrap();
        assert!(matches!(
            OutboxItem::decode(ItemKind::AssistantReply, &json),
            Err(ItemError::FieldTooLong { .. })
        ));
        let huge = vec![b' '; MAX_ITEM_BYTES + 1];
        assert!(matches!(
            OutboxItem::decode(ItemKind::Note, &huge),
            Err(ItemError::TooLarge { .. })
        ));
    }

    /// Where each name sits in `ALL`; the match is exhaustive, so a new variant does
    /// not compile until it is placed, and a placement past the end fails below.
    fn tool_position(t: ToolName) -> usize {
        match t {
            ToolName::Reply => 0,
            ToolName::NoteWrite => 1,
            ToolName::NoteRead => 2,
            ToolName::NoteList => 3,
            ToolName::Schedule => 4,
            ToolName::RequestChange => 5,
            ToolName::NoteSearch => 6,
            ToolName::NoteDelete => 7,
            ToolName::ReminderList => 8,
            ToolName::ReminderCancel => 9,
            ToolName::NoteSend => 10,
            ToolName::WebSearch => 11,
            ToolName::WebFetch => 12,
        }
    }

    fn target_position(t: ChangeTarget) -> usize {
        match t {
            ChangeTarget::Instructions => 0,
            ChangeTarget::Tools => 1,
            ChangeTarget::Model => 2,
            ChangeTarget::Endpoints => 3,
            ChangeTarget::Budgets => 4,
            ChangeTarget::AllowedUsers => 5,
            ChangeTarget::SandboxLimits => 6,
        }
    }

    #[test]
    fn tool_and_target_names_are_spelled_once_as_serde_spells_them() {
        for (i, t) in ToolName::ALL.into_iter().enumerate() {
            assert_eq!(tool_position(t), i, "{t:?}");
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str(), "{t:?}");
            let back: ToolName = serde_json::from_value(t.as_str().into()).unwrap();
            assert_eq!(back, t);
        }
        for (i, t) in ChangeTarget::ALL.into_iter().enumerate() {
            assert_eq!(target_position(t), i, "{t:?}");
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str(), "{t:?}");
            let back: ChangeTarget = serde_json::from_value(t.as_str().into()).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn unknown_tools_are_refused() {
        let cfg = br#"{"version":1,"instructions":"","tools":["shell"],"max_steps_per_turn":1}"#;
        assert!(InboxItem::decode(ItemKind::AgentConfig, cfg).is_err());
    }
}
