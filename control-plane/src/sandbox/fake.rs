//! A recording [`Runtime`] for unit tests of the launch and the lifecycle, without root,
//! runsc or gVisor. It records every call it receives, and stands for `runsc` with a
//! tiny real child (`/bin/sh -c`), so the launch's pipes, the key handover on stdin, the
//! ready line and the exit handling all run for real. The child is built with the same
//! cleared environment as the real runtimes' children and given the arguments `runsc`
//! would get; it writes what it saw (its pid, arguments, environment and every byte of
//! its stdin) into a directory of its own, then behaves as the test asked.

use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use queue_proto::ids::SessionId;
use queue_proto::keys::{MasterKey, SessionKeys, SessionSalt, derive_session_keys};
use runsc_config::runsc_run_args;
use tokio::process::Command;

use super::SandboxSettings;
use super::layout::Layout;
use super::runtime::{Runtime, RuntimeError, RuntimeKind, base_command};

/// One call the fake received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    /// [`Runtime::command`]: the command for this session's bundle was built (and then
    /// spawned, or not, by the caller).
    Command {
        session: SessionId,
        bundle_dir: PathBuf,
    },
    Kill(SessionId),
    /// [`Runtime::confine`]: the session's limits were set before its spawn.
    Confine(SessionId),
    Destroy(SessionId),
    Leftovers,
}

/// How the next "sandbox" behaves. Every one that runs first reads its stdin to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Behaviour {
    /// Says `ready` and runs until [`Runtime::kill`], then exits 137, as runsc does when
    /// its container is killed.
    Ready,
    /// Says `ready`, then exits at once with this status.
    ReadyThenExit(i32),
    /// Exits with this status without saying `ready`.
    ExitEarly(i32),
    /// Prints a line that is not `ready`, then exits 0.
    SaysSomethingElse,
    /// Never says anything and never exits by itself.
    Hangs,
    /// Cannot be spawned at all: the program does not exist.
    Unspawnable,
}

/// What one spawned child saw, read back from its directory.
#[derive(Debug, Clone)]
pub(super) struct Spawn {
    pub(super) session: SessionId,
    dir: PathBuf,
}

impl Spawn {
    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap_or_default()
    }

    /// Its arguments (after `$0`), as `runsc` would have received them.
    pub(super) fn argv(&self) -> Vec<String> {
        self.read("argv")
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }

    /// Its environment exactly as it was started with (`/proc/<pid>/environ`).
    pub(super) fn environ(&self) -> Vec<u8> {
        self.read("environ")
    }

    /// Every byte it read from its stdin before the pipe was closed.
    pub(super) fn stdin(&self) -> Vec<u8> {
        self.read("stdin")
    }

    /// Whether it read its stdin to the end: the pipe was closed.
    pub(super) fn stdin_closed(&self) -> bool {
        self.dir.join("stdin-closed").exists()
    }

    /// Its host pid.
    pub(super) fn pid(&self) -> Option<u32> {
        String::from_utf8_lossy(&self.read("pid"))
            .trim()
            .parse()
            .ok()
    }

    /// Whether its process still exists (a zombie counts: not yet reaped).
    pub(super) fn alive(&self) -> bool {
        self.pid()
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
    }
}

#[derive(Debug, Default)]
struct Recorded {
    calls: Vec<Call>,
    spawns: Vec<Spawn>,
    plan: VecDeque<Behaviour>,
    leftovers: Vec<SessionId>,
    fail_destroy: bool,
    fail_confine: bool,
    limited: bool,
}

/// The recording runtime. Behaves as [`Behaviour::Ready`] unless told otherwise.
#[derive(Debug)]
pub(super) struct FakeRuntime {
    kind: RuntimeKind,
    dir: tempfile::TempDir,
    recorded: Mutex<Recorded>,
}

impl FakeRuntime {
    pub(super) fn new(kind: RuntimeKind) -> Arc<FakeRuntime> {
        Arc::new(FakeRuntime {
            kind,
            dir: tempfile::tempdir().expect("a temporary directory"),
            recorded: Mutex::new(Recorded::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next spawns behave in this order; after them, as [`Behaviour::Ready`].
    pub(super) fn plan(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.lock().plan.extend(behaviours);
    }

    /// Sessions [`Runtime::leftovers`] reports.
    pub(super) fn set_leftovers(&self, sessions: Vec<SessionId>) {
        self.lock().leftovers = sessions;
    }

    /// Makes [`Runtime::destroy`] fail (after recording the call).
    pub(super) fn fail_destroy(&self, fail: bool) {
        self.lock().fail_destroy = fail;
    }

    /// Makes [`Runtime::confine`] fail (after recording the call).
    pub(super) fn fail_confine(&self, fail: bool) {
        self.lock().fail_confine = fail;
    }

    /// What [`Runtime::hit_limit`] answers: whether "the kernel" counted a limit.
    pub(super) fn set_limited(&self, limited: bool) {
        self.lock().limited = limited;
    }

    pub(super) fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// How many commands were built for `session`.
    pub(super) fn commands(&self, session: &SessionId) -> usize {
        self.calls()
            .iter()
            .filter(|c| matches!(c, Call::Command { session: s, .. } if s == session))
            .count()
    }

    pub(super) fn spawns(&self) -> Vec<Spawn> {
        self.lock().spawns.clone()
    }

    /// The script the stand-in runs: record what it was given, then behave.
    fn script(dir: &Path, behaviour: Behaviour) -> String {
        let d = dir.display().to_string();
        assert!(!d.contains('\''), "a quotable directory: {d}");
        let record = format!(
            "echo $$ > '{d}/pid'\n\
             printf '%s\\0' \"$@\" > '{d}/argv'\n\
             cat /proc/$$/environ > '{d}/environ'\n\
             cat > '{d}/stdin' && : > '{d}/stdin-closed'\n"
        );
        let then = match behaviour {
            Behaviour::Ready => format!(
                "printf 'ready\\n'\nwhile [ ! -e '{d}/killed' ]; do sleep 0.02; done\nexit 137\n"
            ),
            Behaviour::ReadyThenExit(code) => format!("printf 'ready\\n'\nexit {code}\n"),
            Behaviour::ExitEarly(code) => format!("exit {code}\n"),
            Behaviour::SaysSomethingElse => "printf 'steady\\n'\nexit 0\n".to_owned(),
            Behaviour::Hangs | Behaviour::Unspawnable => "exec sleep 600\n".to_owned(),
        };
        record + &then
    }
}

impl Runtime for FakeRuntime {
    fn kind(&self) -> RuntimeKind {
        self.kind
    }

    fn command(&self, layout: &Layout, session: &SessionId, bundle_dir: &Path) -> Command {
        let mut r = self.lock();
        r.calls.push(Call::Command {
            session: session.clone(),
            bundle_dir: bundle_dir.to_owned(),
        });
        let behaviour = r.plan.pop_front().unwrap_or(Behaviour::Ready);
        let dir = self.dir.path().join(r.spawns.len().to_string());
        std::fs::create_dir(&dir).expect("a directory for the spawn");
        r.spawns.push(Spawn {
            session: session.clone(),
            dir: dir.clone(),
        });
        let program = match behaviour {
            Behaviour::Unspawnable => Path::new("/nonexistent/runsc"),
            _ => Path::new("/bin/sh"),
        };
        let mut cmd = base_command(program);
        cmd.arg("-c")
            .arg(Self::script(&dir, behaviour))
            .arg("runsc")
            .args(runsc_run_args(&layout.runsc_root(), bundle_dir, session));
        cmd
    }

    fn kill(&self, _layout: &Layout, session: &SessionId) {
        let mut r = self.lock();
        r.calls.push(Call::Kill(session.clone()));
        if let Some(spawn) = r.spawns.iter().rev().find(|s| &s.session == session) {
            let _ = std::fs::write(spawn.dir.join("killed"), "");
        }
    }

    fn confine(
        &self,
        _layout: &Layout,
        session: &SessionId,
        _limits: &runsc_config::Limits,
    ) -> Result<(), RuntimeError> {
        let mut r = self.lock();
        r.calls.push(Call::Confine(session.clone()));
        if r.fail_confine {
            return Err(RuntimeError::NoCgroups);
        }
        Ok(())
    }

    fn hit_limit(&self, _layout: &Layout, _session: &SessionId) -> bool {
        self.lock().limited
    }

    fn destroy(&self, _layout: &Layout, session: &SessionId) -> Result<(), RuntimeError> {
        let mut r = self.lock();
        r.calls.push(Call::Destroy(session.clone()));
        if r.fail_destroy {
            return Err(RuntimeError::Failed {
                command: "fake destroy".into(),
                stderr: "told to fail".into(),
            });
        }
        Ok(())
    }

    fn leftovers(&self, _layout: &Layout) -> Result<Vec<SessionId>, RuntimeError> {
        let mut r = self.lock();
        r.calls.push(Call::Leftovers);
        Ok(r.leftovers.clone())
    }
}

/// Sandbox settings in a fresh temporary directory, with an agent binary (any file: the
/// fake never runs it), the caller's own uid when it is not root (so no test needs
/// root to hand the outbox over), and short timeouts.
pub(super) fn settings(dir: &Path) -> SandboxSettings {
    let agent = dir.join("agent");
    std::fs::write(&agent, "not run by the fake runtime").expect("writing the agent");
    let mut s = SandboxSettings::new(dir.join("state"), agent);
    s.run_dir = dir.join("run");
    // The hardening check refuses uid 0; root may hand the outbox to anyone.
    let me = std::fs::metadata(dir).expect("the directory's owner");
    (s.uid, s.gid) = match (me.uid(), me.gid()) {
        (0, _) | (_, 0) => (65534, 65534),
        ids => ids,
    };
    s.ready_timeout = Duration::from_secs(10);
    s.restart.first_delay = Duration::from_millis(100);
    s.restart.max_delay = Duration::from_millis(400);
    s
}

/// A session and fresh keys for it.
pub(super) fn session(name: &str) -> (SessionId, SessionKeys) {
    let id = SessionId::try_from(name).expect("a valid session id");
    let master = MasterKey::generate().expect("the OS random source");
    let salt = SessionSalt::generate().expect("the OS random source");
    let keys = derive_session_keys(&master, &id, &salt);
    (id, keys)
}
