//! What is read from the Bot API's answers: the answer envelope, `getUpdates` updates
//! with the messages and button presses in them, and the id of the first update of an
//! answer too large to parse at all.
//!
//! The types name only the fields this channel reads, each with its Rust type. They do
//! not deny unknown fields: Telegram adds fields to its objects over time, and refusing
//! them would break the channel against the real API the day it does. What the types
//! guarantee instead:
//! - every field the channel relies on is typed and checked while parsing; a field that
//!   is absent, `null` or of another JSON type reads as absent (`None`), an object field
//!   that holds something else than an object reads as an empty object, and the rules
//!   in `poll.rs` and `prompts.rs` then refuse what they cannot use (as before, when
//!   these were JSON pointers);
//! - an update is refused or skipped on its own, never with its batch: one that cannot be
//!   read but whose `update_id` can (a repeated key, say) is refused like a malformed
//!   message, so the cursor moves past it; one without a readable `update_id` is
//!   skipped;
//! - objects are JSON objects: an array in the place of one is not read by position.
//!
//! Size limits are checked before anything is parsed (`api.rs`).

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor, value::MapAccessDeserializer};

/// A Bot API answer: `ok` with a `result`, or an error with its code and description.
#[derive(Debug, Deserialize)]
#[serde(bound = "T: Deserialize<'de>")]
pub(super) struct Answer<T> {
    #[serde(default, deserialize_with = "scalar")]
    pub(super) ok: Option<bool>,
    /// `None` also when the result is not of the shape `T`.
    #[serde(default = "none", deserialize_with = "scalar")]
    pub(super) result: Option<T>,
    #[serde(default, deserialize_with = "scalar")]
    pub(super) error_code: Option<u64>,
    #[serde(default, deserialize_with = "scalar")]
    pub(super) description: Option<String>,
    #[serde(default, deserialize_with = "object")]
    pub(super) parameters: Option<Parameters>,
}

/// Why a request failed, beyond its description.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Parameters {
    /// Seconds to wait before sending again (429 answers).
    #[serde(default, deserialize_with = "scalar")]
    pub(super) retry_after: Option<u64>,
}

/// The `result` of `getUpdates`, one element per update Telegram sent.
#[derive(Debug, Deserialize)]
#[serde(from = "Vec<Slot>")]
pub(super) struct Updates(pub(super) Vec<Update>);

/// One element of a `getUpdates` result, whatever it holds.
#[derive(Deserialize)]
#[serde(untagged)]
enum Slot {
    Update(Box<Object<Update>>),
    /// Not readable as an update, but its id is: refused on its own.
    IdOnly(Object<UpdateId>),
    /// No id to be read: skipped.
    Other(IgnoredAny),
}

/// An update read for its id alone.
#[derive(Debug, Default, Deserialize)]
struct UpdateId {
    #[serde(default, deserialize_with = "scalar")]
    update_id: Option<i64>,
}

impl From<Vec<Slot>> for Updates {
    fn from(slots: Vec<Slot>) -> Updates {
        let update = |slot| match slot {
            Slot::Update(b) => b.0,
            Slot::IdOnly(Object(id)) => Update {
                update_id: id.update_id,
                ..Update::default()
            },
            Slot::Other(_) => Update::default(),
        };
        Updates(slots.into_iter().map(update).collect())
    }
}

/// One update: a message or a button press (the only kinds asked for).
#[derive(Debug, Default, Deserialize)]
pub(super) struct Update {
    #[serde(default, deserialize_with = "scalar")]
    pub(super) update_id: Option<i64>,
    #[serde(default, deserialize_with = "object")]
    pub(super) message: Option<Message>,
    #[serde(default, deserialize_with = "object")]
    pub(super) callback_query: Option<CallbackQuery>,
}

/// A message: who sent it, in which chat, and its text if it is a text message.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Message {
    #[serde(default, deserialize_with = "object")]
    pub(super) from: Option<User>,
    #[serde(default, deserialize_with = "object")]
    pub(super) chat: Option<Chat>,
    #[serde(default, deserialize_with = "scalar")]
    pub(super) text: Option<String>,
    /// The text that came with a photo, document or voice note.
    #[serde(default, deserialize_with = "scalar")]
    pub(super) caption: Option<String>,
    /// A photo, in the sizes Telegram keeps of it, smallest first.
    #[serde(default, deserialize_with = "scalar")]
    pub(super) photo: Option<Vec<Object<FileRef>>>,
    #[serde(default, deserialize_with = "object")]
    pub(super) document: Option<FileRef>,
    #[serde(default, deserialize_with = "object")]
    pub(super) voice: Option<FileRef>,
}

/// A file a message carries (`PhotoSize`, `Document`, `Voice`): what it is fetched by,
/// and what Telegram says of it (a size and a name, neither trusted).
#[derive(Debug, Default, Deserialize)]
pub(super) struct FileRef {
    #[serde(default, deserialize_with = "scalar")]
    pub(super) file_id: Option<String>,
    #[serde(default, deserialize_with = "scalar")]
    pub(super) file_size: Option<u64>,
    #[serde(default, deserialize_with = "scalar")]
    pub(super) file_name: Option<String>,
}

/// The `result` of `getFile`: where the file can be downloaded.
#[derive(Debug, Default, Deserialize)]
pub(super) struct TelegramFile {
    #[serde(default, deserialize_with = "scalar")]
    pub(super) file_size: Option<u64>,
    #[serde(default, deserialize_with = "scalar")]
    pub(super) file_path: Option<String>,
}

impl Message {
    /// The sender's Telegram user id.
    pub(super) fn sender(&self) -> Option<i64> {
        self.from.as_ref().and_then(|u| u.id)
    }

    /// The chat's id.
    pub(super) fn chat_id(&self) -> Option<i64> {
        self.chat.as_ref().and_then(|c| c.id)
    }

    /// Whether the chat is a private chat (with the bot).
    pub(super) fn in_private_chat(&self) -> bool {
        self.chat
            .as_ref()
            .is_some_and(|c| c.kind == Some(ChatKind::Private))
    }
}

/// A Telegram user, as far as we read one.
#[derive(Debug, Default, Deserialize)]
pub(super) struct User {
    #[serde(default, deserialize_with = "scalar")]
    pub(super) id: Option<i64>,
}

/// A chat, as far as we read one.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Chat {
    #[serde(default, deserialize_with = "scalar")]
    pub(super) id: Option<i64>,
    #[serde(rename = "type", default, deserialize_with = "scalar")]
    pub(super) kind: Option<ChatKind>,
}

/// A chat's type; only private chats are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ChatKind {
    Private,
    /// Groups, supergroups, channels, and any type Telegram adds.
    #[serde(other)]
    Other,
}

/// A press of an inline button.
#[derive(Debug, Default, Deserialize)]
pub(super) struct CallbackQuery {
    /// What the answer to the press names.
    #[serde(default, deserialize_with = "scalar")]
    pub(super) id: Option<String>,
    /// Who pressed it, as Telegram vouches.
    #[serde(default, deserialize_with = "object")]
    pub(super) from: Option<User>,
    /// The message whose button was pressed.
    #[serde(default, deserialize_with = "object")]
    pub(super) message: Option<Message>,
    /// The button's callback data.
    #[serde(default, deserialize_with = "scalar")]
    pub(super) data: Option<String>,
}

/// The `result` of `sendMessage`: the message as sent.
#[derive(Debug, Default, Deserialize)]
pub(super) struct SentMessage {
    #[serde(default, deserialize_with = "scalar")]
    pub(super) message_id: Option<i64>,
}

/// A default for `Option<T>` fields without asking `T` for one.
fn none<T>() -> Option<T> {
    None
}

/// A value read as `T` if it is one, and otherwise kept apart.
#[derive(Deserialize)]
#[serde(untagged)]
enum Shaped<T> {
    As(T),
    Other(IgnoredAny),
}

/// A field read leniently: present but not a `T` (or `null`), it is `None`.
fn scalar<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(match Shaped::<T>::deserialize(d)? {
        Shaped::As(t) => Some(t),
        Shaped::Other(_) => None,
    })
}

/// An object field: present, it is `Some`, and empty if it is not an object of the
/// shape `T` (so a malformed button press is still a button press, and refused as one).
fn object<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(match Shaped::<Object<T>>::deserialize(d)? {
        Shaped::As(Object(t)) => t,
        Shaped::Other(_) => T::default(),
    }))
}

/// A `T` read only from a JSON object, never from an array by position (which serde's
/// derived structs otherwise accept).
#[derive(Debug)]
pub(super) struct Object<T>(pub(super) T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Only<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Only<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Only(PhantomData)).map(Object)
    }
}

/// Finds the `update_id` of the first update in a `getUpdates` answer fed in pieces,
/// keeping nothing but a few bytes of state: it follows JSON strings and nesting, and
/// reads the number after the key `update_id` of the first object inside `result`.
#[derive(Debug, Default)]
pub(super) struct FirstUpdateId {
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
    pub(super) fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.found.is_some() || self.updates_seen > 1 {
                return;
            }
            self.step(b);
        }
    }

    /// The first update's id, if it was found.
    pub(super) fn found(&self) -> Option<i64> {
        self.found
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(parts: &[&str]) -> Option<i64> {
        let mut f = FirstUpdateId::default();
        for p in parts {
            f.feed(p.as_bytes());
        }
        f.found()
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

    fn updates(answer: &str) -> Option<Vec<Update>> {
        let Object(a) = serde_json::from_str::<Object<Answer<Updates>>>(answer).unwrap();
        assert_eq!(a.ok, Some(true));
        a.result.map(|u| u.0)
    }

    #[test]
    fn a_batch_is_read_update_by_update_and_unknown_fields_are_ignored() {
        let got = updates(
            r#"{"ok":true,"result":[
                {"update_id":7,"message":{"message_id":1,"date":1,"from":{"id":42,"is_bot":false},
                 "chat":{"id":42,"type":"private"},"text":"hi","new_field":{"x":[1]}}},
                {"update_id":8,"message":[1,2,3]},
                {"update_id":9,"message":{"from":{"id":42},"chat":{"id":42,"type":"private"},"text":5}},
                {"update_id":10,"update_id_twice":1,"message":{},"message":{}},
                {"message":"no update id"},
                [11],
                {"update_id":12,"callback_query":5}
            ]}"#,
        )
        .unwrap();
        assert_eq!(got.len(), 7);
        let m = got[0].message.as_ref().unwrap();
        assert_eq!(got[0].update_id, Some(7));
        assert_eq!((m.sender(), m.chat_id()), (Some(42), Some(42)));
        assert!(m.in_private_chat());
        assert_eq!(m.text.as_deref(), Some("hi"));
        // Not an object: read as an empty message, refused as malformed.
        let m = got[1].message.as_ref().unwrap();
        assert_eq!(
            (got[1].update_id, m.sender(), m.chat_id()),
            (Some(8), None, None)
        );
        // A text that is not a string is no text.
        let m = got[2].message.as_ref().unwrap();
        assert_eq!((m.sender(), m.text.as_deref()), (Some(42), None));
        // A repeated key: only the id is read, so it is refused on its own.
        assert_eq!(got[3].update_id, Some(10));
        assert!(got[3].message.is_none() && got[3].callback_query.is_none());
        // No id at all, or an array read by position: skipped.
        assert_eq!((got[4].update_id, got[5].update_id), (None, None));
        // A button press that is not an object is still a (malformed) button press.
        let cq = got[6].callback_query.as_ref().unwrap();
        assert!(cq.id.is_none() && cq.from.is_none() && cq.data.is_none());
    }

    #[test]
    fn chat_types_other_than_private_are_not_private() {
        for (kind, private) in [
            (r#""private""#, true),
            (r#""group""#, false),
            (r#""supergroup""#, false),
            (r#""a type from next year""#, false),
            ("1", false),
            ("null", false),
        ] {
            let text = format!(r#"{{"chat":{{"id":1,"type":{kind}}}}}"#);
            let m: Message = serde_json::from_str(&text).unwrap();
            assert_eq!(m.in_private_chat(), private, "{kind}");
        }
    }

    #[test]
    fn a_result_of_another_shape_reads_as_none_and_errors_keep_their_parameters() {
        assert!(updates(r#"{"ok":true,"result":{"not":"a list"}}"#).is_none());
        assert!(updates(r#"{"ok":true}"#).is_none());
        let Object(a) = serde_json::from_str::<Object<Answer<IgnoredAny>>>(
            r#"{"ok":false,"error_code":429,"description":"slow down","parameters":{"retry_after":7}}"#,
        )
        .unwrap();
        assert_eq!(a.ok, Some(false));
        assert_eq!(a.error_code, Some(429));
        assert_eq!(a.description.as_deref(), Some("slow down"));
        assert_eq!(a.parameters.and_then(|p| p.retry_after), Some(7));
        // An envelope that is not an object is not read by position.
        assert!(serde_json::from_str::<Object<Answer<IgnoredAny>>>("[true, 1]").is_err());
    }
}
