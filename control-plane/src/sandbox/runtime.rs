//! How a sandbox is run: the real `runsc` (gVisor), or the development-only host runtime,
//! which runs the agent as a plain child process with no isolation at all.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use queue_proto::ids::SessionId;
use runsc_config::{AGENT_PATH, Limits, cgroup_path, container_id, runsc_run_args};
use tokio::process::Command;

use super::cgroup::{CgroupError, Cgroups};
use super::layout::Layout;

/// The only `PATH` a runtime's child gets; nothing else of the control plane's
/// environment is passed on.
pub(super) const CHILD_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Which runtime runs the sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// gVisor's `runsc`: the only isolating runtime.
    Gvisor,
    /// No isolation, for development only (`doctor` reports it as critical).
    Host,
}

/// Errors from a runtime's housekeeping commands.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("running {command} failed")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "no memory cgroup controller under /sys/fs/cgroup: gVisor would run sandboxes without limits"
    )]
    NoCgroups,
}

/// A way to run a session's agent. The launch sequence ([`super::launch`]) is the same for
/// every runtime; only the command and the clean-up differ.
pub trait Runtime: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> RuntimeKind;

    /// The command that runs `session`'s agent from the bundle in `bundle_dir`, with a
    /// cleared environment and all three standard streams piped.
    fn command(&self, layout: &Layout, session: &SessionId, bundle_dir: &Path) -> Command;

    /// Asks `session`'s sandbox to end now (SIGKILL to everything in it); its runtime
    /// child then exits by itself.
    fn kill(&self, layout: &Layout, session: &SessionId);

    /// Gives `session`'s next sandbox its resource limits, before it is started: the
    /// host cgroup that the control plane, not the sandbox, reads afterwards.
    fn confine(
        &self,
        _layout: &Layout,
        _session: &SessionId,
        _limits: &Limits,
    ) -> Result<(), RuntimeError> {
        Ok(())
    }

    /// Whether a resource limit stopped `session`'s sandbox, by the kernel's own count;
    /// read after the sandbox ended and before [`destroy`](Self::destroy). Never the
    /// exit status, which the agent chooses.
    fn hit_limit(&self, _layout: &Layout, _session: &SessionId) -> bool {
        false
    }

    /// Removes `session`'s sandbox and everything running in it, if any, its cgroup
    /// included. Idempotent.
    fn destroy(&self, layout: &Layout, session: &SessionId) -> Result<(), RuntimeError>;

    /// Sessions whose sandboxes are left over from an earlier run of the control plane.
    fn leftovers(&self, layout: &Layout) -> Result<Vec<SessionId>, RuntimeError>;
}

/// A runtime child's command: `program` with a cleared environment (but for a fixed
/// `PATH`), `/` as its directory, the three standard streams piped, killed if dropped.
pub(super) fn base_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", CHILD_PATH)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// How often a sandbox is killed and deleted before its removal is given up on.
const DESTROY_TRIES: u32 = 3;

/// How long one housekeeping command (`runsc kill`, `delete`, `list`) may take.
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs a housekeeping command to completion, killing it at [`HOUSEKEEPING_TIMEOUT`].
fn run(program: &Path, args: &[String]) -> Result<std::process::Output, RuntimeError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let mut child = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RuntimeError::Spawn {
            command: command.clone(),
            source,
        })?;
    let deadline = Instant::now() + HOUSEKEEPING_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RuntimeError::Failed {
                    command,
                    stderr: "timed out".into(),
                });
            }
        }
    }
    child
        .wait_with_output()
        .map_err(|source| RuntimeError::Spawn { command, source })
}

/// Runs blocking runtime housekeeping from async code without stalling the other tasks
/// on this worker thread. Needs tokio's multi-threaded runtime, which the control plane
/// uses.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// gVisor: `runsc --network=none --host-uds=open --platform=ptrace run --bundle DIR ID`,
/// with runsc's state under `<state>/runsc`.
///
/// Debian's runsc names each sandbox's control socket in the abstract socket namespace
/// of the network namespace it starts in, and its peer check cannot tell host users
/// apart; anyone who can connect can list, signal, pause, checkpoint or exec in the
/// sandbox. So every runsc command of a [`RunscRuntime::private`] runtime (`run`,
/// `kill`, `delete`, `list`) runs through `nsenter` in a network namespace of the
/// control plane's own, which only a process with `CAP_SYS_ADMIN` can enter; no host
/// process outside it can reach a control socket. `--network=none` still applies inside.
#[derive(Debug, Clone)]
pub struct RunscRuntime {
    pub runsc: PathBuf,
    /// The network namespace every runsc command runs in; `None` runs them in the
    /// caller's own (tests of the sandbox alone).
    netns: Option<NetNs>,
    /// Where each sandbox's cgroup is made; `None` when the host has no memory
    /// controller, and then nothing is launched.
    cgroups: Option<Cgroups>,
}

/// A named network namespace (`ip netns`), kept at `/run/netns/<name>` so that it
/// outlives the process that made it and a restarted control plane finds its sandboxes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    name: String,
}

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";

impl NetNs {
    /// The namespace of the state directory `layout` belongs to: one per state
    /// directory, named after a hash of its path.
    pub fn of(layout: &Layout) -> NetNs {
        NetNs {
            name: format!("ironclaw-{}", layout.instance()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Makes the namespace if it does not exist yet. It holds nothing but a loopback
    /// interface that stays down. A name left without its namespace (the mount that
    /// held it was in a mount namespace that is gone, as with systemd's
    /// `ProtectSystem=`) is made again.
    pub fn ensure(&self) -> Result<(), RuntimeError> {
        if self.path().exists() {
            if self.enterable() {
                return Ok(());
            }
            self.remove()?;
        }
        let args = ["netns".to_owned(), "add".to_owned(), self.name.clone()];
        let out = run(Path::new("ip"), &args)?;
        if !out.status.success() && !self.path().exists() {
            return Err(RuntimeError::Failed {
                command: format!("ip netns add {}", self.name),
                stderr: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        Ok(())
    }

    /// Whether the name holds a namespace that can be entered.
    fn enterable(&self) -> bool {
        let args = [
            format!("--net={}", self.path().display()),
            "--".to_owned(),
            "true".to_owned(),
        ];
        run(Path::new("nsenter"), &args).is_ok_and(|out| out.status.success())
    }

    /// Removes the namespace (its sandboxes must be gone). Idempotent.
    pub fn remove(&self) -> Result<(), RuntimeError> {
        if !self.path().exists() {
            return Ok(());
        }
        let args = ["netns".to_owned(), "delete".to_owned(), self.name.clone()];
        let out = run(Path::new("ip"), &args)?;
        if !out.status.success() && self.path().exists() {
            return Err(RuntimeError::Failed {
                command: format!("ip netns delete {}", self.name),
                stderr: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        Ok(())
    }
}

impl Default for RunscRuntime {
    fn default() -> Self {
        RunscRuntime {
            runsc: "runsc".into(),
            netns: None,
            cgroups: Cgroups::host(),
        }
    }
}

impl RunscRuntime {
    /// The runtime the service uses: `runsc` at `runsc`, every command in the state
    /// directory's own network namespace (made if missing).
    pub fn private(runsc: PathBuf, layout: &Layout) -> Result<RunscRuntime, RuntimeError> {
        let netns = NetNs::of(layout);
        netns.ensure()?;
        Ok(RunscRuntime {
            runsc,
            netns: Some(netns),
            cgroups: Cgroups::host(),
        })
    }

    /// The namespace the runtime's commands run in, if it has one of its own.
    pub fn netns(&self) -> Option<&NetNs> {
        self.netns.as_ref()
    }

    fn global(layout: &Layout) -> String {
        format!("--root={}", layout.runsc_root().display())
    }

    /// The program and arguments that run `runsc args…`, entering the namespace first
    /// if the runtime has one.
    fn invocation(&self, args: Vec<String>) -> (PathBuf, Vec<String>) {
        match &self.netns {
            None => (self.runsc.clone(), args),
            Some(ns) => {
                let mut all = vec![
                    format!("--net={}", ns.path().display()),
                    "--".to_owned(),
                    self.runsc.display().to_string(),
                ];
                all.extend(args);
                (PathBuf::from("nsenter"), all)
            }
        }
    }

    /// Kills and deletes `session`'s sandbox, and runsc's state of it.
    fn delete(&self, layout: &Layout, session: &SessionId) -> Result<(), RuntimeError> {
        let id = container_id(session);
        // Kill first: `delete --force` on a running sandbox can time out waiting for it.
        // Then delete removes what is left and runsc's state; an unknown id is not an
        // error worth reporting. A sandbox caught half-started (its control plane killed
        // while launching it) can time out once more: it is killed and deleted again.
        let mut failure = String::new();
        for attempt in 0..DESTROY_TRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
            self.kill(layout, session);
            let out = self.housekeeping(vec![
                Self::global(layout),
                "delete".into(),
                "--force".into(),
                id.clone(),
            ])?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success()
                || stderr.contains("does not exist")
                || stderr.contains("not found")
            {
                return Ok(());
            }
            failure = stderr.into();
        }
        Err(RuntimeError::Failed {
            command: format!("runsc delete {id}"),
            stderr: failure,
        })
    }

    /// Runs one housekeeping command of runsc.
    fn housekeeping(&self, args: Vec<String>) -> Result<std::process::Output, RuntimeError> {
        let (program, args) = self.invocation(args);
        run(&program, &args)
    }
}

impl Runtime for RunscRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Gvisor
    }

    fn command(&self, layout: &Layout, session: &SessionId, bundle_dir: &Path) -> Command {
        let (program, args) =
            self.invocation(runsc_run_args(&layout.runsc_root(), bundle_dir, session));
        let mut cmd = base_command(&program);
        cmd.args(args);
        cmd
    }

    fn kill(&self, layout: &Layout, session: &SessionId) {
        let _ = self.housekeeping(vec![
            Self::global(layout),
            "kill".into(),
            container_id(session),
            "KILL".into(),
        ]);
    }

    fn confine(
        &self,
        layout: &Layout,
        session: &SessionId,
        limits: &Limits,
    ) -> Result<(), RuntimeError> {
        let cgroups = self.cgroups.as_ref().ok_or(RuntimeError::NoCgroups)?;
        Ok(cgroups.make(&cgroup_path(&layout.instance(), session), limits)?)
    }

    fn hit_limit(&self, layout: &Layout, session: &SessionId) -> bool {
        let path = cgroup_path(&layout.instance(), session);
        self.cgroups.as_ref().is_some_and(|c| c.hits(&path).any())
    }

    fn destroy(&self, layout: &Layout, session: &SessionId) -> Result<(), RuntimeError> {
        self.delete(layout, session)?;
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove(&cgroup_path(&layout.instance(), session))?;
        }
        Ok(())
    }

    fn leftovers(&self, layout: &Layout) -> Result<Vec<SessionId>, RuntimeError> {
        if !layout.runsc_root().exists() {
            return Ok(Vec::new());
        }
        let out = self.housekeeping(vec![Self::global(layout), "list".into(), "--quiet".into()])?;
        if !out.status.success() {
            return Err(RuntimeError::Failed {
                command: "runsc list".into(),
                stderr: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ironclaw-"))
            .filter_map(|id| SessionId::try_from(id).ok())
            .collect())
    }
}

/// Development only: runs the agent binary from the shared root directly on the host, as
/// the control plane's own user, with the session's directories as arguments. Nothing is
/// isolated.
#[derive(Debug, Clone, Default)]
pub struct HostRuntime;

impl HostRuntime {
    fn agent(layout: &Layout) -> PathBuf {
        layout.rootfs().join(AGENT_PATH.trim_start_matches('/'))
    }

    /// Host processes running our agent binary, found through `/proc/<pid>/exe`.
    fn agent_pids(layout: &Layout) -> Vec<i32> {
        let agent = Self::agent(layout);
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == agent)
            })
            .collect()
    }
}

impl Runtime for HostRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Host
    }

    fn command(&self, layout: &Layout, session: &SessionId, _bundle_dir: &Path) -> Command {
        let mut cmd = base_command(&Self::agent(layout));
        cmd.arg(layout.inbox(session))
            .arg(layout.outbox(session))
            .arg(runsc_config::socket_path(&layout.socket_dir(session)));
        cmd
    }

    fn kill(&self, _layout: &Layout, _session: &SessionId) {
        // The agent is our direct child; the lifecycle kills it.
    }

    fn destroy(&self, _layout: &Layout, _session: &SessionId) -> Result<(), RuntimeError> {
        // The agent is our direct child; the lifecycle kills and reaps it.
        Ok(())
    }

    fn leftovers(&self, layout: &Layout) -> Result<Vec<SessionId>, RuntimeError> {
        // A host agent left by a killed control plane cannot tell us its session; kill it
        // here, since nothing else will.
        for pid in Self::agent_pids(layout) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        cmd.as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// What the real runtimes' commands are built with; the fake runtime's launches show
    /// the same base command clears the environment for real.
    #[test]
    fn the_real_runtimes_run_from_slash_with_only_a_fixed_path_and_their_arguments() {
        let layout = Layout::new(Path::new("/state"), Path::new("/r"));
        let s = SessionId::try_from("alice").unwrap();
        let bundle = layout.bundle(&s);
        let runsc = RunscRuntime {
            runsc: "/usr/bin/runsc".into(),
            netns: None,
            cgroups: None,
        }
        .command(&layout, &s, &bundle);
        let host = HostRuntime.command(&layout, &s, &bundle);
        for cmd in [&runsc, &host] {
            let std = cmd.as_std();
            assert_eq!(std.get_current_dir(), Some(Path::new("/")));
            assert_eq!(
                std.get_envs().collect::<Vec<_>>(),
                [(OsStr::new("PATH"), Some(OsStr::new(CHILD_PATH)))]
            );
        }
        assert_eq!(runsc.as_std().get_program(), "/usr/bin/runsc");
        assert_eq!(
            args(&runsc),
            runsc_run_args(&layout.runsc_root(), &bundle, &s)
        );
        assert_eq!(
            host.as_std().get_program(),
            layout.rootfs().join("ironclaw-agent")
        );
        assert_eq!(
            args(&host),
            [
                "/state/sessions/alice/inbox.d",
                "/state/sessions/alice/outbox.d",
                "/r/alice/proxy.sock"
            ]
        );
    }

    #[test]
    fn a_private_runtime_enters_its_namespace_for_every_runsc_command() {
        let layout = Layout::new(Path::new("/state"), Path::new("/r"));
        let s = SessionId::try_from("alice").unwrap();
        let bundle = layout.bundle(&s);
        let ns = NetNs::of(&layout);
        assert_eq!(
            ns,
            NetNs::of(&Layout::new(Path::new("/state"), Path::new("/x")))
        );
        assert_ne!(
            ns,
            NetNs::of(&Layout::new(Path::new("/other"), Path::new("/r")))
        );
        assert!(ns.name().starts_with("ironclaw-") && ns.name().len() == 21);
        let runtime = RunscRuntime {
            runsc: "/usr/bin/runsc".into(),
            netns: Some(ns.clone()),
            cgroups: None,
        };
        let cmd = runtime.command(&layout, &s, &bundle);
        assert_eq!(cmd.as_std().get_program(), "nsenter");
        let mut expected = vec![
            format!("--net=/run/netns/{}", ns.name()),
            "--".into(),
            "/usr/bin/runsc".into(),
        ];
        expected.extend(runsc_run_args(&layout.runsc_root(), &bundle, &s));
        assert_eq!(args(&cmd), expected);
        let (program, list) = runtime.invocation(vec!["list".into()]);
        assert_eq!(program, Path::new("nsenter"));
        assert_eq!(list[..3], expected[..3]);
    }
}
