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
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout};

use super::SandboxSettings;
use super::layout::{self, Layout};
use super::runtime::{Runtime, RuntimeError};

/// Most stderr lines of one sandbox that reach the log, and their longest length: a
/// hostile agent cannot flood the control plane's log.
const MAX_LOGGED_STDERR_LINES: usize = 50;
const MAX_LOGGED_LINE_CHARS: usize = 200;

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
    runtime
        .destroy(layout, session)
        .map_err(|source| LaunchError::Stale {
            session: s(),
            source,
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

    // 7. Wait for `ready` on stdout, bounded by the ready timeout.
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    let ready = tokio::time::timeout(settings.ready_timeout, lines.read_line(&mut line)).await;
    match ready {
        Ok(Ok(_)) if line.trim_end() == "ready" => {}
        Ok(Ok(0)) | Ok(Err(_)) => {
            let status = child.wait().await.ok();
            let e = LaunchError::NotReady {
                session: s(),
                why: "it exited".into(),
                status,
            };
            return fail(child, e).await;
        }
        Ok(Ok(_)) => {
            let e = LaunchError::NotReady {
                session: s(),
                why: "it printed something else".into(),
                status: None,
            };
            return fail(child, e).await;
        }
        Err(_) => {
            let e = LaunchError::NotReady {
                session: s(),
                why: "timed out".into(),
                status: None,
            };
            return fail(child, e).await;
        }
    }
    drain(lines.into_inner());

    // 8. Register and record: the caller owns the handle from here.
    tracing::info!(session = %session, runtime = ?runtime.kind(), ms = started.elapsed().as_millis() as u64, "sandbox ready");
    Ok(Launched { child, started })
}

/// Kills and reaps a child that failed to launch, and removes its sandbox.
async fn abandon(runtime: &dyn Runtime, layout: &Layout, session: &SessionId, mut child: Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
    if let Err(e) = runtime.destroy(layout, session) {
        tracing::warn!(session = %session, error = %e, "removing a failed sandbox failed");
    }
}

/// Logs the first lines the sandbox writes to stderr, truncated, then discards the rest.
fn forward_stderr(child: &mut Child, session: &SessionId) {
    let Some(stderr) = child.stderr.take() else {
        return;
    };
    let session = session.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut logged = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            if logged < MAX_LOGGED_STDERR_LINES {
                let line: String = line.chars().take(MAX_LOGGED_LINE_CHARS).collect();
                tracing::warn!(session = %session, line = %line, "sandbox stderr");
                logged += 1;
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
