//! The gateway's pure parts: who asks for a change, how an agent's request becomes an
//! exact new configuration ([`candidate`]), the deterministic rules that run before any
//! human ([`policy`]), the risk scores ([`risk`]), the diff an approver is shown
//! ([`diff`]), and the per-requester rate limit ([`rate`]). Nothing here touches the
//! store; `store::changes` keeps the requests and applies them.
//!
//! A change is always a whole new configuration text. What an operator approves is
//! that text (by its SHA-256); what is applied is that text, re-hashed at the moment it
//! is applied.

pub mod candidate;
pub mod diff;
pub mod policy;
pub mod rate;
pub mod risk;

use queue_proto::ids::SessionId;
use sha2::{Digest, Sha256};

use crate::operator::Identity;

/// Who asked for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// An agent, through its session's proxy socket.
    Agent(SessionId),
    /// An operator, through `changes propose`.
    Operator(Identity),
    /// A hand edit of the configuration file found at start.
    ConfigFile,
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requester::Agent(s) => write!(f, "agent:{s}"),
            Requester::Operator(i) => write!(f, "{i}"),
            Requester::ConfigFile => f.write_str("config-file"),
        }
    }
}

/// A rule that refused a change, and why, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub rule: &'static str,
    pub why: String,
}

fn deny<T>(rule: &'static str, why: impl Into<String>) -> Result<T, Denial> {
    Err(Denial {
        rule,
        why: why.into(),
    })
}

/// The SHA-256 of a configuration text, as lowercase hex.
pub fn text_hash(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}
