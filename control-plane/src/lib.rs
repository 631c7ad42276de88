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
pub mod config;
pub mod doctor;
pub mod gateway;
pub mod http;
pub mod model;
pub mod operator;
pub mod proxy;
pub mod sandbox;
pub mod service;
pub mod state;
pub mod store;
pub mod tailnet;

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
/// newline excepted) and bidirectional overrides become escapes, so nothing can move a
/// terminal's cursor, recolour or reorder what an operator reads before approving.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
            if (c.is_control() && c != '\n') || bidi {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
