//! How each channel names the session of one of its chats, in one place: a name says
//! which channel it belongs to, so no channel can reach another's session.

use queue_proto::ids::SessionId;

/// Session names of Telegram chats start with this.
pub const TELEGRAM_PREFIX: &str = "tg-";
/// Session names of bridge chats start with this.
pub const BRIDGE_PREFIX: &str = "br-";

/// The session of a Telegram chat: `tg-<id>`, `tg-n<id>` for negative ids.
pub fn telegram(chat: i64) -> SessionId {
    let name = if chat < 0 {
        format!("{TELEGRAM_PREFIX}n{}", chat.unsigned_abs())
    } else {
        format!("{TELEGRAM_PREFIX}{chat}")
    };
    SessionId::try_from(name.as_str()).expect("tg- and at most 20 digits is a valid session id")
}

/// The session of bridge chat `chat`, if the chat name is acceptable (lowercase
/// letters, digits, `_` and `-`, at most 29).
pub fn bridge(chat: &str) -> Option<SessionId> {
    let ok = !chat.is_empty()
        && chat.len() <= 29
        && chat
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    ok.then(|| SessionId::try_from(format!("{BRIDGE_PREFIX}{chat}").as_str()).ok())
        .flatten()
}

/// The console session an operator named, unless the name is invalid or belongs to
/// another channel.
pub fn console(name: &str) -> Result<SessionId, String> {
    let id = SessionId::try_from(name).map_err(|_| {
        format!("{name:?} is not a valid session name (a-z, 0-9, _ and -, at most 32)")
    })?;
    if [TELEGRAM_PREFIX, BRIDGE_PREFIX]
        .iter()
        .any(|p| id.as_str().starts_with(p))
    {
        return Err(format!(
            "{name:?}: names starting tg- or br- belong to the Telegram and bridge channels"
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_channel_names_only_its_own_sessions() {
        assert_eq!(telegram(42).as_str(), "tg-42");
        assert_eq!(telegram(-100123).as_str(), "tg-n100123");
        assert_eq!(telegram(i64::MIN).as_str(), "tg-n9223372036854775808");
        assert_eq!(bridge("family").unwrap().as_str(), "br-family");
        for bad in ["", "Family", "../x", "a.b", "x y", &"a".repeat(30)] {
            assert!(bridge(bad).is_none(), "{bad:?}");
        }
        assert_eq!(console("work").unwrap().as_str(), "work");
        for taken in ["tg-42", "br-family", "../x", ""] {
            assert!(console(taken).is_err(), "{taken:?}");
        }
    }
}
