//! The IronClaw control plane.
//!
//! # Trust
//!
//! The only trusted component: runs as root, holds the master key, talks to chat apps and
//! starts one gVisor sandbox per session. Everything that arrives from a chat app, a
//! sandbox or the network is untrusted. So far it holds the sandbox lifecycle
//! ([`sandbox`]); the service, channels, proxy and gateway arrive with later issues.

#![deny(unsafe_code)]

pub mod model;
pub mod proxy;
pub mod sandbox;
