//! `ironclaw-agent`: the agent that runs inside one gVisor sandbox per session.
//!
//! # Trust
//!
//! Untrusted by design: assume a prompt injection has taken it over. It runs with no
//! network, a read-only root, no capabilities and a non-root uid; its only way out is the
//! proxy socket. It links `queue-proto` with the `agent` feature alone, so it holds an
//! inbox reader and an outbox writer and nothing that could write its inbox or derive
//! another session's keys. The agent loop arrives with issue 4; until then this binary
//! exits with status 2.

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("ironclaw-agent: the agent loop is not built yet");
    ExitCode::from(2)
}
