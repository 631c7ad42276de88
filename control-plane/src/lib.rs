//! The IronClaw control plane.
//!
//! # Trust
//!
//! The only trusted component: runs as root, holds the master key, talks to chat apps and
//! starts one gVisor sandbox per session. Everything that arrives from a chat app, a
//! sandbox or the network is untrusted.
//!
//! [`state`] is the state directory and `init`; [`config`] the bootstrap file; [`store`]
//! the encrypted control store with its [`audit`] trail; [`service`] ties the chat
//! [`channels`], the per-session [`sandbox`]es and [`proxy`]s and the [`model`]
//! providers together for `serve`; [`admin`] is the local socket the CLI talks to, and
//! [`admin_api`] the same operations over HTTP for operators on the tailnet ([`tailnet`]).
//! Every change to the configuration passes the [`gateway`]; [`operator`] is who may
//! decide one.

#![deny(unsafe_code)]

pub mod admin;
pub mod admin_api;
pub mod audit;
pub mod channels;
pub mod clock;
pub mod config;
pub mod doctor;
pub mod files;
pub mod gateway;
pub mod http;
pub mod logging;
pub mod model;
pub mod operator;
pub mod proxy;
pub mod sandbox;
pub mod service;
pub mod state;
pub mod store;
pub mod tailnet;
pub mod web;

/// An error and its causes on one line, for the operator.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// Text from an agent or a requester, safe to show an operator: control characters (a
/// newline excepted), bidirectional marks and overrides, line and paragraph separators
/// and invisible characters (zero-width spaces and joiners, word joiners, the byte-order
/// mark) become escapes, so nothing can move a terminal's cursor, write its clipboard,
/// recolour, reorder or hide what an operator reads. The approval page escapes the same
/// set.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if (c.is_control() && c != '\n') || is_invisible(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Characters that reorder, break or hide text without showing themselves: format
/// characters (bidirectional marks, zero-width joiners, invisible operators, tags),
/// fillers and variation selectors (all but U+FE0F, which follows many an emoji and
/// carries no more than a bit).
pub(crate) fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}'
        | '\u{180b}'..='\u{180f}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}' | '\u{3164}' | '\u{fe00}'..='\u{fe0e}' | '\u{feff}'
        | '\u{ffa0}' | '\u{fff9}'..='\u{fffb}' | '\u{e0000}'..='\u{e007f}'
        | '\u{e0100}'..='\u{e01ef}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_could_act_on_a_terminal_or_hide_text() {
        let hostile =
            "ok\x1b]52;c;aGk=\x07 \u{202e}txt \u{2028}\u{2029}a\u{200b}b\u{feff}\u{2066}\r\n";
        let shown = printable(hostile);
        assert_eq!(
            shown,
            "ok\\u{1b}]52;c;aGk=\\u{7} \\u{202e}txt \\u{2028}\\u{2029}a\\u{200b}b\\u{feff}\\u{2066}\\u{d}\n"
        );
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'));
        assert_eq!(printable("plain, ünïcödé 😀\n"), "plain, ünïcödé 😀\n");
        // Tag characters can carry a hidden message; a soft hyphen and a filler hide.
        assert_eq!(
            printable("a\u{e0041}\u{ad}\u{3164}\u{fe01}b ❤\u{fe0f}"),
            "a\\u{e0041}\\u{ad}\\u{3164}\\u{fe01}b ❤\u{fe0f}"
        );
    }
}
