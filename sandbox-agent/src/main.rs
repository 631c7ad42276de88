//! `ironclaw-agent`: the agent that runs inside one gVisor sandbox per session.
//!
//! # Trust
//!
//! Untrusted by design: assume a prompt injection has taken it over. It runs with no
//! network, a read-only root, no capabilities and a non-root uid; its only way out is the
//! proxy socket. It links `queue-proto` with the `agent` feature alone, so it holds an
//! inbox reader and an outbox writer and nothing that could write its inbox or derive
//! another session's keys.
//!
//! Start-up contract with the control plane: the session's keys arrive on stdin (the
//! control plane writes them and closes the pipe); the agent checks them and its mounts,
//! opens its own state, then prints `ready` on stdout and runs the loop in [`turn`].
//!
//! Exit codes: 0 stopped cleanly, 1 an I/O failure, 3 a malformed key handover.
//! (2 and 137 are left to runsc, which uses them for a sandbox killed by a limit.)

#![forbid(unsafe_code)]

mod files;
mod html;
mod pdf;
mod proxy_client;
mod state;
mod turn;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use queue_proto::agent::{InboxReader, OutboxWriter};
use queue_proto::keys::SessionKeys;

/// The key handover is a few hundred bytes; anything longer is refused unread.
const MAX_HANDOVER_BYTES: u64 = 1024;

/// Where the agent finds its queues. Inside the sandbox these are the fixed mount points;
/// the development-only host runtime passes its own directories as arguments.
struct Paths {
    inbox: PathBuf,
    outbox: PathBuf,
    socket: PathBuf,
}

fn paths() -> Paths {
    let mut args = std::env::args().skip(1);
    match (args.next(), args.next(), args.next()) {
        (Some(inbox), Some(outbox), Some(socket)) => Paths {
            inbox: inbox.into(),
            outbox: outbox.into(),
            socket: socket.into(),
        },
        _ => Paths {
            inbox: "/inbox".into(),
            outbox: "/outbox".into(),
            socket: "/run/ironclaw/proxy.sock".into(),
        },
    }
}

fn main() -> ExitCode {
    // Sized up front so the buffer holding key bytes is never reallocated (which would
    // leave an unwiped copy behind); wiped once decoded.
    let mut handover = Vec::with_capacity(MAX_HANDOVER_BYTES as usize + 1);
    if let Err(e) = std::io::stdin()
        .take(MAX_HANDOVER_BYTES + 1)
        .read_to_end(&mut handover)
    {
        eprintln!("ironclaw-agent: reading the key handover failed: {e}");
        return ExitCode::from(1);
    }
    let keys = SessionKeys::from_handover(&handover);
    handover.fill(0);
    let (session, keys) = match keys {
        Ok(k) => k,
        Err(e) => {
            eprintln!("ironclaw-agent: {e}");
            return ExitCode::from(3);
        }
    };
    let paths = paths();
    let inbox = InboxReader::new(paths.inbox, session.clone(), &keys);
    if let Err(e) = inbox.list_after(None) {
        eprintln!("ironclaw-agent: the inbox is not readable: {e}");
        return ExitCode::from(1);
    }
    let state_dir = paths.outbox.join("state");
    if let Err(e) = std::fs::create_dir_all(&state_dir) {
        eprintln!("ironclaw-agent: the outbox is not writable: {e}");
        return ExitCode::from(1);
    }
    let state = match state::State::open(&state_dir.join("agent.db"), &keys.agent_state) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ironclaw-agent: opening the agent state failed: {e}");
            return ExitCode::from(1);
        }
    };
    let mut agent = turn::Agent {
        inbox,
        outbox: OutboxWriter::new(paths.outbox, session, &keys),
        proxy: proxy_client::ProxyClient::new(&paths.socket),
        state,
        read_outside: false,
    };
    drop(keys);
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
        return ExitCode::from(1);
    }
    drop(out);
    match agent.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ironclaw-agent: stopped: {e}");
            ExitCode::from(1)
        }
    }
}
