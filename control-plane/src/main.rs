//! `ironclaw`: the control plane and operator CLI.
//!
//! # Trust
//!
//! The only trusted component: runs as root, holds the master key, talks to chat apps and
//! starts one gVisor sandbox per session. Everything that arrives from a chat app, a
//! sandbox or the network is untrusted. Only the spine (`queue-proto`) exists so far; the
//! commands of DESIGN.md's CLI contract arrive with later issues, and until then this
//! binary says so and exits with status 2.

#![deny(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    let command = std::env::args().nth(1).unwrap_or_default();
    match command.as_str() {
        "--version" | "version" => {
            println!("ironclaw {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "ironclaw: `{command}` is not available yet; only the spine library is built so far"
            );
            ExitCode::from(2)
        }
    }
}
