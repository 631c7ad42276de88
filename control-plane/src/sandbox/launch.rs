//! Launching one session's sandbox: one function, its steps numbered. The same list is in
//! the README ("The sandbox").

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Instant;

use queue_proto::ids::SessionId;
use queue_proto::keys::SessionKeys;
use runsc_config::{SandboxSpec, Violation, check, oci_config, runsc_run_args};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdout};

use super::SandboxSettings;
use super::layout::{self, Layout};
use super::runtime::{Runtime, RuntimeError};

/// What a ready agent prints first.
const READY_LINE: &[u8] = b"ready\n";
/// How long a child that closed its stdout gets to exit.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Most stderr lines of one sandbox that reach the log, and their longest length: a
/// hostile agent cannot flood the control plane's log.
const MAX_LOGGED_STDERR_LINES: usize = 50;
const MAX_LOGGED_LINE_BYTES: usize = 200;

/// Why a launch failed. Every failure leaves no sandbox behind.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the sandbox spec for session {session} is invalid")]
    Spec {
        session: SessionId,
        #[source]
        source: runsc_config::SpecError,
    },
    #[error("the sandbox spec for session {session} breaks hardening invariants: {violations:?}")]
    Unsafe {
        session: SessionId,
        violations: Vec<Violation>,
    },
    #[error("preparing the files of session {session} failed")]
    Prepare {
        session: SessionId,
        #[source]
        source: std::io::Error,
    },
    #[error("removing a stale sandbox of session {session} failed")]
    Stale {
        session: SessionId,
        #[source]
        source: RuntimeError,
    },
    #[error("spawning the sandbox of session {session} failed")]
    Spawn {
        session: SessionId,
        #[source]
        source: std::io::Error,
    },
    #[error("handing the keys to session {session}'s agent failed")]
    Handover {
        session: SessionId,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent of session {session} did not become ready ({why})")]
    NotReady {
        session: SessionId,
        why: String,
        status: Option<ExitStatus>,
    },
}

/// A launched, ready sandbox.
#[derive(Debug)]
pub struct Launched {
    pub child: Child,
    pub started: Instant,
}

/// The spec the control plane runs `session` with.
pub fn spec_for(settings: &SandboxSettings, layout: &Layout, session: &SessionId) -> SandboxSpec {
    SandboxSpec {
        session: session.clone(),
        rootfs: layout.rootfs(),
        inbox_dir: layout.inbox(session),
        outbox_dir: layout.outbox(session),
        socket_dir: layout.socket_dir(session),
        uid: settings.uid,
        gid: settings.gid,
        limits: settings.limits,
    }
}

/// Writes `config.json` into the bundle directory (0600, via a temporary file).
fn write_bundle(dir: &std::path::Path, config: &serde_json::Value) -> std::io::Result<PathBuf> {
    let tmp = dir.join(".config.json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(config.to_string().as_bytes())?;
    f.sync_all()?;
    let dest = dir.join("config.json");
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

/// Launches `session`'s sandbox and waits until its agent is ready.
pub async fn launch(
    runtime: &dyn Runtime,
    settings: &SandboxSettings,
    layout: &Layout,
    session: &SessionId,
    keys: &SessionKeys,
) -> Result<Launched, LaunchError> {
    let s = || session.clone();

    // 1. Validate: generate the spec from validated ids and settings, and refuse to run
    //    anything the hardening checker objects to.
    let spec = spec_for(settings, layout, session);
    let config = oci_config(&spec).map_err(|source| LaunchError::Spec {
        session: s(),
        source,
    })?;
    let bundle_dir = layout.bundle(session);
    let violations = check(
        &spec,
        &config,
        &runsc_run_args(&layout.runsc_root(), &bundle_dir, session),
    );
    if !violations.is_empty() {
        return Err(LaunchError::Unsafe {
            session: s(),
            violations,
        });
    }

    // 2. Prepare the session's directories with their owners and modes.
    layout::prepare_session(layout, session, settings.uid, settings.gid).map_err(|source| {
        LaunchError::Prepare {
            session: s(),
            source,
        }
    })?;

    // 3. Write the bundle. It holds paths and limits, never a key.
    write_bundle(&bundle_dir, &config).map_err(|source| LaunchError::Prepare {
        session: s(),
        source,
    })?;

    // 4. Remove any stale sandbox with the same id.
    super::runtime::blocking(|| runtime.destroy(layout, session)).map_err(|source| {
        LaunchError::Stale {
            session: s(),
            source,
        }
    })?;

    // 5. Spawn with a cleared environment; the three pipes are its only inherited fds
    //    (everything else the control plane holds is close-on-exec).
    let mut child = runtime
        .command(layout, session, &bundle_dir)
        .spawn()
        .map_err(|source| LaunchError::Spawn {
            session: s(),
            source,
        })?;
    let started = Instant::now();
    let fail = |child: Child, e: LaunchError| async move {
        abandon(runtime, layout, session, child).await;
        Err(e)
    };

    // 6. Hand over the keys through stdin, then close it: never a file, an argument or an
    //    environment variable.
    let handover = keys.to_handover(session);
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let written = async {
        stdin.write_all(&handover).await?;
        stdin.shutdown().await
    }
    .await;
    drop(stdin);
    drop(handover);
    if let Err(source) = written {
        return fail(
            child,
            LaunchError::Handover {
                session: s(),
                source,
            },
        )
        .await;
    }
    forward_stderr(&mut child, session);

    // 7. Wait for `ready` on stdout, bounded by the ready timeout and by length.
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut first = Vec::new();
    let mut head = stdout.take(READY_LINE.len() as u64);
    let ready = tokio::time::timeout(settings.ready_timeout, head.read_to_end(&mut first)).await;
    let why = match ready {
        Ok(Ok(_)) if first == READY_LINE => None,
        Ok(Ok(n)) if n < READY_LINE.len() => Some("it exited"),
        Ok(Ok(_)) => Some("it printed something else"),
        Ok(Err(_)) => Some("its stdout failed"),
        Err(_) => Some("timed out"),
    };
    if let Some(why) = why {
        let status = match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
            Ok(Ok(status)) if why == "it exited" => Some(status),
            _ => None,
        };
        let e = LaunchError::NotReady {
            session: s(),
            why: why.into(),
            status,
        };
        return fail(child, e).await;
    }
    let stdout = head.into_inner();
    drain(stdout);

    // 8. Register and record: the caller owns the handle from here.
    tracing::info!(session = %session, runtime = ?runtime.kind(), ms = started.elapsed().as_millis() as u64, "sandbox ready");
    Ok(Launched { child, started })
}

/// Kills and reaps a child that failed to launch, and removes its sandbox.
async fn abandon(runtime: &dyn Runtime, layout: &Layout, session: &SessionId, mut child: Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
    if let Err(e) = super::runtime::blocking(|| runtime.destroy(layout, session)) {
        tracing::warn!(session = %session, error = %e, "removing a failed sandbox failed");
    }
}

/// Logs the first lines the sandbox writes to stderr, each cut short, then discards the
/// rest. Reads through a fixed buffer: a line without end costs no memory.
fn forward_stderr(child: &mut Child, session: &SessionId) {
    let Some(mut stderr) = child.stderr.take() else {
        return;
    };
    let session = session.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        let mut line: Vec<u8> = Vec::with_capacity(MAX_LOGGED_LINE_BYTES);
        let mut logged = 0;
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if logged >= MAX_LOGGED_STDERR_LINES {
                continue;
            }
            for &b in &buf[..n] {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&line);
                    tracing::warn!(session = %session, line = %text, "sandbox stderr");
                    line.clear();
                    logged += 1;
                } else if line.len() < MAX_LOGGED_LINE_BYTES {
                    line.push(b);
                }
            }
        }
    });
}

/// Keeps reading the agent's stdout so it never blocks on a full pipe.
fn drain(mut stdout: ChildStdout) {
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while matches!(stdout.read(&mut buf).await, Ok(n) if n > 0) {}
    });
}
