//! Validated identifiers. Every filesystem path and socket name is built from these
//! types, never from raw strings.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest accepted session id, in bytes. Short enough that
/// `<state>/run/<session>/proxy.sock` stays well under the 108-byte `sun_path` limit.
pub const MAX_SESSION_ID_BYTES: usize = 32;

/// Longest accepted change-request id, in bytes.
pub const MAX_CHANGE_ID_BYTES: usize = 32;

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} may hold only a-z, 0-9, '-' and '_', and must start with a letter or digit")]
    BadCharacter { kind: &'static str },
}

/// Checks the shared id alphabet: `[a-z0-9][a-z0-9_-]*`, 1..=max bytes. The alphabet has
/// no `.`, `/` or NUL, so an id can never name a parent directory or a hidden file.
fn check_id(kind: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    let bytes = s.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(IdError::Empty { kind });
    };
    if bytes.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    let body_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_';
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) || !bytes.iter().all(body_ok) {
        return Err(IdError::BadCharacter { kind });
    }
    Ok(())
}

macro_rules! validated_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The id as text; safe to use as one path component.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdError;
            fn try_from(s: &str) -> Result<Self, IdError> {
                check_id($kind, s, $max)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <&str>::deserialize(d)?;
                Self::try_from(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_id!(
    /// One conversation: (channel, chat) routes to exactly one session, which owns one
    /// sandbox, one inbox, one outbox and its own keys.
    SessionId,
    "session id",
    MAX_SESSION_ID_BYTES
);

validated_id!(
    /// One change request in the gateway.
    ChangeId,
    "change id",
    MAX_CHANGE_ID_BYTES
);

/// Which way a segment travels. Part of every row's associated data, so a row cannot be
/// replayed in the other direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Control plane → agent.
    Inbox,
    /// Agent → control plane.
    Outbox,
}

impl Direction {
    /// The stable name used in segment headers, associated data and key labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbox => "inbox",
            Direction::Outbox => "outbox",
        }
    }
}

/// A segment's position in its queue. Segments are named `<seq as 16 lowercase hex>.db`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// The published file name: `0000000000000001.db`.
    pub fn file_name(self) -> String {
        format!("{:016x}.db", self.0)
    }

    /// The writer's private name while the segment is being built.
    pub fn temp_file_name(self) -> String {
        format!(".tmp-{:016x}", self.0)
    }

    /// Parses a published file name back into a seq; anything else is `None`.
    pub fn from_file_name(name: &str) -> Option<Seq> {
        let hex = name.strip_suffix(".db")?;
        if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(Seq)
    }

    /// The next seq, or `None` at the end of the space.
    pub fn next(self) -> Option<Seq> {
        self.0.checked_add(1).map(Seq)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_plain_ids() {
        for ok in [
            "a",
            "tg-123456",
            "console",
            "0abc_def",
            &"x".repeat(MAX_SESSION_ID_BYTES),
        ] {
            assert_eq!(SessionId::try_from(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_anything_that_could_escape_a_directory() {
        for bad in [
            "", ".", "..", "../x", "a/b", "a.b", "-a", "_a", "A", "a\0", "é", " a",
        ] {
            assert!(SessionId::try_from(bad).is_err(), "{bad:?} was accepted");
        }
        let long = "x".repeat(MAX_SESSION_ID_BYTES + 1);
        assert_eq!(
            SessionId::try_from(long.as_str()),
            Err(IdError::TooLong {
                kind: "session id",
                max: MAX_SESSION_ID_BYTES
            })
        );
    }

    #[test]
    fn deserialising_validates() {
        assert!(serde_json::from_str::<SessionId>("\"../etc\"").is_err());
        assert!(serde_json::from_str::<SessionId>("\"ok-1\"").is_ok());
    }

    #[test]
    fn seq_file_names_round_trip_and_reject_others() {
        assert_eq!(Seq(1).file_name(), "0000000000000001.db");
        assert_eq!(Seq::from_file_name("00000000000000ff.db"), Some(Seq(255)));
        for bad in [
            "ff.db",
            "00000000000000FF.db",
            ".tmp-0000000000000001",
            "000000000000000g.db",
        ] {
            assert_eq!(Seq::from_file_name(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn seq_names_round_trip(n in any::<u64>()) {
            prop_assert_eq!(Seq::from_file_name(&Seq(n).file_name()), Some(Seq(n)));
        }

        #[test]
        fn accepted_ids_are_single_safe_path_components(s in "\\PC{0,40}") {
            if let Ok(id) = SessionId::try_from(s.as_str()) {
                let p = std::path::Path::new(id.as_str());
                prop_assert_eq!(p.components().count(), 1);
                prop_assert!(matches!(p.components().next(), Some(std::path::Component::Normal(_))));
                prop_assert!(!id.as_str().starts_with('.'));
            }
        }
    }
}
