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
//! providers together for `serve`; [`admin`] is the local socket the CLI talks to.

#![deny(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod channels;
pub mod config;
pub mod gateway;
pub mod model;
pub mod proxy;
pub mod sandbox;
pub mod service;
pub mod state;
pub mod store;

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
