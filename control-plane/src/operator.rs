//! Who an authenticated person is: the identity every way in (the admin socket, a
//! Telegram button, the admin API over the tailnet) reduces its caller to before any
//! decision. This module depends on nothing else of the crate, so the configuration, the
//! tailnet check and the gateway can all name an operator without importing each other.
//! Whether an identity is an operator is [`Identity::is_operator`], written beside
//! `config::Operators`, the list it reads.

/// An authenticated person: the admin socket's peer uid, the Telegram user who pressed a
/// button (Telegram vouches for `from.id`), or a tailnet login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Unix(u32),
    Telegram(i64),
    Tailnet(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Unix(u) => write!(f, "unix:{u}"),
            Identity::Telegram(t) => write!(f, "telegram:{t}"),
            Identity::Tailnet(l) => write!(f, "tailnet:{l}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_shown_with_their_way_in() {
        assert_eq!(Identity::Unix(0).to_string(), "unix:0");
        assert_eq!(Identity::Telegram(-5).to_string(), "telegram:-5");
        assert_eq!(
            Identity::Tailnet("tag:ci".into()).to_string(),
            "tailnet:tag:ci"
        );
    }
}
