//! The spine's contract between the control plane and the sandboxed agent.
//!
//! # Trust
//!
//! Linked into both programs: the trusted control plane (`ironclaw`, root) and the
//! untrusted agent (`ironclaw-agent`, inside gVisor). Every input that comes from the
//! other side — a segment file, a row inside it, a socket request — is hostile until it
//! has passed the size limits and closed types defined here. The crate is pure: no
//! async runtime, no network, no `unsafe`.
//!
//! Role-typed endpoints keep each side to its own half of the queue: the `control-plane`
//! feature provides [`MasterKey`](keys::MasterKey), key derivation, the inbox writer and
//! the outbox reader; the `agent` feature provides the inbox reader and the outbox
//! writer. The agent binary is built with `agent` alone, so it cannot contain code that
//! writes an inbox or derives another session's keys.

#![forbid(unsafe_code)]

pub mod envelope;
pub mod ids;
pub mod items;
pub mod keys;
pub mod proxy;
pub mod segment;
pub mod sqlcipher;

#[cfg(feature = "agent")]
pub mod agent;
#[cfg(feature = "control-plane")]
pub mod control;
