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
    #[error("giving session {session}'s sandbox its limits failed")]
    Confine {
        session: SessionId,
        #[source]
        source: RuntimeError,
    },
    #[error("the agent of session {session} did not become ready ({why})")]
    NotReady {
        session: SessionId,
        why: String,
        status: Option<ExitStatus>,
        /// Whether the kernel counted a resource limit against it.
        limited: bool,
    },
}

/// A launched, ready sandbox.
#[derive(Debug)]
pub struct Launched {
    pub child: Child,
    pub started: Instant,
}

/// The spec the control plane runs `session` with, as `(uid, gid)`.
pub fn spec_for(
    settings: &SandboxSettings,
    layout: &Layout,
    session: &SessionId,
    (uid, gid): (u32, u32),
) -> SandboxSpec {
    SandboxSpec {
        session: session.clone(),
        rootfs: layout.rootfs(),
        inbox_dir: layout.inbox(session),
        outbox_dir: layout.outbox(session),
        socket_dir: layout.socket_dir(session),
        uid,
        gid,
        limits: settings.limits,
        instance: layout.instance(),
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

    // 1. Validate: generate the spec from validated ids and settings (the session's own
    //    uid among them), and refuse to run anything the hardening checker objects to.
    let ids = settings
        .ids_for(layout, session)
        .map_err(|source| LaunchError::Prepare {
            session: s(),
            source,
        })?;
    let (uid, gid) = ids;
    let spec = spec_for(settings, layout, session, ids);
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

    // 2. Prepare the session's directories with their owners and modes, and give its
    //    outbox a file system of its own, of a fixed size, if the settings ask for one.
    let prepared = layout::prepare_session(layout, session, uid, gid).and_then(|()| match settings
        .outbox_bytes
    {
        Some(bytes) => layout::limit_outbox(layout, session, bytes, uid, gid),
        None => Ok(()),
    });
    prepared.map_err(|source| LaunchError::Prepare {
        session: s(),
        source,
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

    // 5. Make the sandbox's cgroup with its limits: the kernel's record of them is the
    //    control plane's own, read when the sandbox ends.
    super::runtime::blocking(|| runtime.confine(layout, session, &settings.limits)).map_err(
        |source| LaunchError::Confine {
            session: s(),
            source,
        },
    )?;

    // 6. Spawn with a cleared environment; the three pipes are its only inherited fds
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

    // 7. Hand over the keys through stdin, then close it: never a file, an argument or an
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

    // 8. Wait for `ready` on stdout, bounded by the ready timeout and by length.
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
            limited: status.is_some() && runtime.hit_limit(layout, session),
        };
        return fail(child, e).await;
    }
    let stdout = head.into_inner();
    drain(stdout);

    // 9. Hand the ready sandbox over: log it and return its child. The caller registers
    //    it (the lifecycle's `Manager` marks the session running and emits
    //    `Event::Started`, which the service writes to the audit trail); launch itself
    //    keeps nothing.
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::sandbox::fake::{self, Behaviour, Call, FakeRuntime};
    use crate::sandbox::runtime::RuntimeKind;

    struct Rig {
        dir: tempfile::TempDir,
        settings: SandboxSettings,
        layout: Layout,
        fake: Arc<FakeRuntime>,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let settings = fake::settings(dir.path());
        let layout = Layout::new(&settings.state_dir, &settings.run_dir);
        Rig {
            dir,
            settings,
            layout,
            fake: FakeRuntime::new(RuntimeKind::Gvisor),
        }
    }

    impl Rig {
        async fn launch(&self, s: &SessionId, keys: &SessionKeys) -> Result<Launched, LaunchError> {
            launch(self.fake.as_ref(), &self.settings, &self.layout, s, keys).await
        }
    }

    /// Every key of the session, raw and in hex.
    fn needles(keys: &SessionKeys) -> Vec<Vec<u8>> {
        [
            &keys.inbox.db,
            &keys.inbox.envelope,
            &keys.outbox.db,
            &keys.outbox.envelope,
            &keys.agent_state,
        ]
        .iter()
        .flat_map(|k| {
            let raw = k.expose_secret().to_vec();
            let hex = hex::encode(&raw).into_bytes();
            [raw, hex]
        })
        .collect()
    }

    fn holds_a_key(haystack: &[u8], keys: &SessionKeys) -> bool {
        needles(keys)
            .iter()
            .any(|n| haystack.windows(n.len()).any(|w| w == n.as_slice()))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_launch_writes_the_bundle_then_spawns_with_a_cleared_environment_and_keys_on_stdin_only()
     {
        let r = rig();
        let (s, keys) = fake::session("alice");
        let mut launched = r.launch(&s, &keys).await.unwrap();
        let bundle = r.layout.bundle(&s);

        // 4, 5, 6: the stale sandbox is removed, the new one given its limits, then
        // spawned, once.
        assert_eq!(
            r.fake.calls(),
            [
                Call::Destroy(s.clone()),
                Call::Confine(s.clone()),
                Call::Command {
                    session: s.clone(),
                    bundle_dir: bundle.clone()
                }
            ]
        );
        // 2: the outbox belongs to the agent's uid, the rest stays the control plane's.
        let outbox = std::fs::metadata(r.layout.outbox(&s)).unwrap();
        assert_eq!(
            (outbox.uid(), outbox.gid()),
            (r.settings.uid, r.settings.gid)
        );
        assert_eq!(
            std::fs::metadata(r.layout.private(&s)).unwrap().mode() & 0o777,
            0o700
        );
        // 3: the bundle is the checked spec, 0600, written whole.
        let config_path = bundle.join("config.json");
        let config = std::fs::read(&config_path).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&config).unwrap(),
            oci_config(&spec_for(
                &r.settings,
                &r.layout,
                &s,
                (r.settings.uid, r.settings.gid)
            ))
            .unwrap()
        );
        assert_eq!(
            std::fs::metadata(&config_path)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(!bundle.join(".config.json.tmp").exists());

        // 5: the child got runsc's arguments for this bundle and nothing of this
        // process's environment but a fixed PATH.
        let spawns = r.fake.spawns();
        let [spawn] = spawns.as_slice() else {
            panic!("one spawn: {spawns:?}")
        };
        assert_eq!(
            spawn.argv(),
            runsc_run_args(&r.layout.runsc_root(), &bundle, &s)
        );
        assert_eq!(spawn.environ(), b"PATH=/usr/sbin:/usr/bin:/sbin:/bin\0");

        // 6: exactly the handover on stdin, then the pipe closed; no key anywhere else.
        assert_eq!(spawn.stdin(), keys.to_handover(&s).to_vec());
        assert!(spawn.stdin_closed());
        assert!(!holds_a_key(spawn.argv().join(" ").as_bytes(), &keys));
        assert!(!holds_a_key(&spawn.environ(), &keys));
        assert!(!holds_a_key(&config, &keys));

        // 7 and 8: ready, and the caller holds the running child.
        assert_eq!(launched.child.id(), spawn.pid());
        assert!(launched.child.try_wait().unwrap().is_none());
        r.fake.kill(&r.layout, &s);
        let status = launched.child.wait().await.unwrap();
        assert_eq!(status.code(), Some(137));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_spec_that_fails_generation_or_the_hardening_check_runs_nothing() {
        let mut r = rig();
        let (s, keys) = fake::session("refused");
        // uid 0 inside the sandbox breaks a hardening invariant.
        let good_uid = r.settings.uid;
        r.settings.uid = 0;
        match r.launch(&s, &keys).await {
            Err(LaunchError::Unsafe { violations, .. }) => {
                assert!(violations.contains(&Violation::RootUser), "{violations:?}")
            }
            other => panic!("not refused as unsafe: {other:?}"),
        }
        // A socket path too long for a unix socket cannot even be put in a spec.
        r.settings.uid = good_uid;
        r.settings.run_dir = r.dir.path().join("r".repeat(120));
        r.layout = Layout::new(&r.settings.state_dir, &r.settings.run_dir);
        match r.launch(&s, &keys).await {
            Err(LaunchError::Spec {
                source: runsc_config::SpecError::SocketPathTooLong { .. },
                ..
            }) => {}
            other => panic!("not refused as an invalid spec: {other:?}"),
        }
        assert_eq!(r.fake.calls(), []);
        assert!(!r.layout.session_dir(&s).exists());
    }

    /// Launches with the sandbox behaving as `behaviour`, expects it refused as not
    /// ready, and checks the child is gone (killed and reaped) and its sandbox removed.
    async fn not_ready(r: &Rig, name: &str, behaviour: Behaviour) -> (String, Option<ExitStatus>) {
        let (s, keys) = fake::session(name);
        r.fake.plan([behaviour]);
        let (why, status) = match r.launch(&s, &keys).await {
            Err(LaunchError::NotReady { why, status, .. }) => (why, status),
            other => panic!("{behaviour:?}: not refused as not ready: {other:?}"),
        };
        let spawn = r.fake.spawns().pop().unwrap();
        assert!(!spawn.alive(), "{behaviour:?}: the child is reaped");
        let calls = r.fake.calls();
        assert_eq!(
            calls[calls.len() - 4..],
            [
                Call::Destroy(s.clone()),
                Call::Confine(s.clone()),
                Call::Command {
                    session: s.clone(),
                    bundle_dir: r.layout.bundle(&s)
                },
                Call::Destroy(s.clone()),
            ],
            "{behaviour:?}: the abandoned sandbox is removed"
        );
        (why, status)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_child_that_exits_early_is_reported_with_its_status_and_cleaned_up() {
        let r = rig();
        let (why, status) = not_ready(&r, "early", Behaviour::ExitEarly(3)).await;
        assert_eq!(why, "it exited");
        assert_eq!(status.and_then(|s| s.code()), Some(3));
        let (why, status) = not_ready(&r, "chatty", Behaviour::SaysSomethingElse).await;
        assert_eq!((why.as_str(), status), ("it printed something else", None));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_child_that_never_says_ready_is_killed_at_the_timeout_and_cleaned_up() {
        let mut r = rig();
        r.settings.ready_timeout = Duration::from_millis(300);
        let (why, status) = not_ready(&r, "silent", Behaviour::Hangs).await;
        assert_eq!((why.as_str(), status), ("timed out", None));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_stale_sandbox_that_cannot_be_removed_stops_the_launch_before_the_spawn() {
        let r = rig();
        let (s, keys) = fake::session("stale");
        r.fake.fail_destroy(true);
        assert!(matches!(
            r.launch(&s, &keys).await,
            Err(LaunchError::Stale { .. })
        ));
        assert_eq!(r.fake.calls(), [Call::Destroy(s)]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_sandbox_that_cannot_be_given_its_limits_is_never_spawned() {
        let r = rig();
        let (s, keys) = fake::session("unlimited");
        r.fake.fail_confine(true);
        let e = r.launch(&s, &keys).await.unwrap_err();
        assert!(matches!(e, LaunchError::Confine { .. }), "{e}");
        assert_eq!(r.fake.calls(), [Call::Destroy(s.clone()), Call::Confine(s)]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_runtime_that_cannot_be_spawned_is_an_error() {
        let r = rig();
        let (s, keys) = fake::session("nobinary");
        r.fake.plan([Behaviour::Unspawnable]);
        assert!(matches!(
            r.launch(&s, &keys).await,
            Err(LaunchError::Spawn { .. })
        ));
        assert_eq!(r.fake.commands(&s), 1);
    }
}
