//! Where each row of the control store stands, as closed types. The store keeps a state
//! as text; this module is the one place that spells that text, maps it to and from SQL
//! (`ToSql`/`FromSql`) and to and from JSON (the admin protocol carries the same
//! words), and names the predicates (`is_waiting()`) that the queries need. A query that
//! must select by a predicate uses the SQL fragment defined beside it here, whose
//! agreement with the predicate is checked by this module's tests.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// Defines a state enum stored as text: its one spelling per variant, and its SQL and
/// serde mappings in that spelling.
macro_rules! text_state {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
        }

        impl $name {
            /// Every state, in the order of its lifecycle.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The state's text in the store and on the admin protocol.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The state `text` names, if any.
            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                $name::parse(text).ok_or_else(|| {
                    FromSqlError::Other(format!(concat!("unknown ", stringify!($name), " {:?}"), text).into())
                })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                $name::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(concat!("unknown ", stringify!($name), " {:?}"), text))
                })
            }
        }
    };
}

text_state! {
    /// A message from a person: `received → published → answered`, or it ends `failed`
    /// (the person was sent a notice) or `refused` (never passed to an agent; a notice
    /// where one is due).
    MessageState {
        /// Stored, not yet in an inbox segment.
        Received = "received",
        /// In an inbox segment, waiting for its answer.
        Published = "published",
        Answered = "answered",
        /// Given up on, with a notice to the person.
        Failed = "failed",
        /// Never passed to an agent.
        Refused = "refused",
    }
}

impl MessageState {
    /// Still waiting for its agent: not yet settled one way or the other.
    pub fn is_waiting(self) -> bool {
        matches!(self, MessageState::Received | MessageState::Published)
    }
}

/// SQL for [`MessageState::is_waiting`] on a `state` column.
pub const MESSAGE_WAITING_SQL: &str = "state IN ('received', 'published')";

text_state! {
    /// A reply, notice or reminder for a chat: `pending → sending → sent`, or `dead`
    /// (given up on, where the operator sees it). A pull channel's replies go from
    /// `pending` straight to `sent` when its client acknowledges them.
    OutboundState {
        Pending = "pending",
        /// Being handed to a push channel's chat app.
        Sending = "sending",
        Sent = "sent",
        Dead = "dead",
    }
}

impl OutboundState {
    /// Not yet delivered, and not given up on.
    pub fn is_waiting(self) -> bool {
        matches!(self, OutboundState::Pending | OutboundState::Sending)
    }
}

/// SQL for [`OutboundState::is_waiting`] on a `state` column.
pub const OUTBOUND_WAITING_SQL: &str = "state IN ('pending', 'sending')";

text_state! {
    /// A file that came with a message: `pending` until the control plane fetched and
    /// checked it, then `ready` (passed on) or `refused` (never passed on).
    AttachmentState {
        Pending = "pending",
        Ready = "ready",
        Refused = "refused",
    }
}

/// SQL: the `messages` row has no file still to be fetched.
pub const NO_FILE_PENDING_SQL: &str = "NOT EXISTS (SELECT 1 FROM attachments a WHERE a.message = messages.id AND a.state = 'pending')";

/// SQL: how many of the `messages` row's files were passed on.
pub const READY_FILES_SQL: &str =
    "(SELECT count(*) FROM attachments a WHERE a.message = messages.id AND a.state = 'ready')";

text_state! {
    /// What an outbound row is.
    OutboundKind {
        /// An agent's answer to a message.
        Reply = "reply",
        /// A fixed text from the control plane (a refusal, a failure).
        Notice = "notice",
        /// A timer that came due.
        Reminder = "reminder",
        /// A file an agent sends in answer to a message: `text` is its name, a NUL,
        /// then its content ([`crate::store::outbound::document_text`]).
        Document = "document",
    }
}

text_state! {
    /// A change request: `pending`, then `applied`, `rejected`, `expired` or
    /// `superseded` (made from a version no longer in force); or `denied` by the policy
    /// when filed.
    ChangeState {
        Pending = "pending",
        Denied = "denied",
        Applied = "applied",
        Rejected = "rejected",
        Expired = "expired",
        Superseded = "superseded",
    }
}

impl ChangeState {
    /// Whether an operator may still approve or reject it.
    pub fn can_decide(self) -> bool {
        self == ChangeState::Pending
    }
}

text_state! {
    /// A Telegram approval prompt: `waiting` to be sent, `sent` with its buttons,
    /// `closing` (decided: its buttons are to be removed), `closed`.
    PromptState {
        Waiting = "waiting",
        Sent = "sent",
        Closing = "closing",
        Closed = "closed",
    }
}

impl PromptState {
    /// Whether the channel has something to do for it: send it, or remove its buttons.
    pub fn is_due(self) -> bool {
        matches!(self, PromptState::Waiting | PromptState::Closing)
    }
}

/// SQL for [`PromptState::is_due`] on a `p.state` column.
pub const PROMPT_DUE_SQL: &str = "p.state IN ('waiting', 'closing')";

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// The states a SQL fragment selects, evaluated by SQLite itself (the table is
    /// aliased `p` so that fragments written for a join read it too).
    fn selected<T: ToSql + Copy>(all: &[T], fragment: &str) -> Vec<T> {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (state TEXT)").unwrap();
        all.iter()
            .copied()
            .filter(|s| {
                conn.execute("DELETE FROM t", []).unwrap();
                conn.execute("INSERT INTO t (state) VALUES (?1)", [s])
                    .unwrap();
                let sql = format!("SELECT count(*) FROM t AS p WHERE {fragment}");
                conn.query_row(&sql, [], |r| r.get::<_, i64>(0)).unwrap() == 1
            })
            .collect()
    }

    #[test]
    fn each_sql_fragment_selects_exactly_what_its_predicate_says() {
        let waiting: Vec<_> = MessageState::ALL
            .iter()
            .copied()
            .filter(|s| s.is_waiting())
            .collect();
        assert_eq!(selected(MessageState::ALL, MESSAGE_WAITING_SQL), waiting);
        assert_eq!(waiting, [MessageState::Received, MessageState::Published]);
        let waiting: Vec<_> = OutboundState::ALL
            .iter()
            .copied()
            .filter(|s| s.is_waiting())
            .collect();
        assert_eq!(selected(OutboundState::ALL, OUTBOUND_WAITING_SQL), waiting);
        let due: Vec<_> = PromptState::ALL
            .iter()
            .copied()
            .filter(|s| s.is_due())
            .collect();
        assert_eq!(selected(PromptState::ALL, PROMPT_DUE_SQL), due);
    }

    #[test]
    fn every_state_reads_back_as_itself_and_unknown_text_is_an_error() {
        let conn = Connection::open_in_memory().unwrap();
        for s in ChangeState::ALL {
            let back: ChangeState = conn.query_row("SELECT ?1", [s], |r| r.get(0)).unwrap();
            assert_eq!(back, *s);
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<ChangeState>(&json).unwrap(), *s);
        }
        let bad: rusqlite::Result<MessageState> = conn.query_row("SELECT 'dead'", [], |r| r.get(0));
        assert!(bad.is_err());
        assert!(serde_json::from_str::<OutboundState>("\"lost\"").is_err());
        assert!(ChangeState::Pending.can_decide());
        assert!(!ChangeState::Applied.can_decide());
        assert!(OutboundState::Sending.is_waiting());
        assert!(!OutboundState::Dead.is_waiting());
    }
}
