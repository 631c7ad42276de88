//! The life of a session's sandbox: started on demand, stopped when idle, killed at a
//! wall-clock cap, reaped, restarted after a crash with backoff, and — when it ends
//! after its cgroup counted a memory or pids limit — reported as "killed by a limit"
//! and left stopped until the next message, never restarted in a loop.
//!
//! The decisions are pure functions of the exit and the restart history
//! ([`classify`], [`RestartHistory::after_exit`]), unit-tested without gVisor; the
//! [`Manager`] applies them to real children.

use std::collections::{HashMap, VecDeque};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use queue_proto::ids::SessionId;
use queue_proto::keys::SessionKeys;
use tokio::process::Child;
use tokio::sync::{Mutex, mpsc};

use super::SandboxSettings;
use super::launch::{LaunchError, launch};
use super::layout::{self, Layout};
use super::runtime::{Runtime, RuntimeError, blocking};

/// How long a killed sandbox's runtime child gets to exit by itself.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// How a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The control plane stopped it (idle, delete, shutdown).
    Stopped,
    /// Killed at the wall-clock cap.
    WallClockCap,
    /// It ended with a non-zero status after the kernel counted a memory or pids limit
    /// against its cgroup.
    KilledByLimit,
    /// The agent exited by itself with status 0.
    Exited,
    /// Anything else: a non-zero status or a signal.
    Crashed { code: Option<i32> },
}

/// Classifies an exit the control plane did not cause itself, from its status and
/// whether the kernel counted a limit against the sandbox (`limited`, from
/// [`Runtime::hit_limit`]). The status alone never says "limit": the agent can exit
/// with any code, the ones runsc uses for a killed sentry (2, 137) included.
pub fn classify(status: ExitStatus, limited: bool) -> Exit {
    match status.code() {
        Some(0) => Exit::Exited,
        _ if limited => Exit::KilledByLimit,
        code => Exit::Crashed { code },
    }
}

/// When and how often a crashed sandbox is restarted.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// More crashes than this within `window` and the session is given up on until
    /// the next message after the window.
    pub max_crashes: usize,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_crashes: 5,
            window: Duration::from_secs(600),
        }
    }
}

/// What to do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Stay stopped; start again on the next message.
    StayStopped,
    /// Restart by itself at this time.
    RestartAt(Instant),
    /// Too many crashes: stay stopped, and refuse to start until this time.
    GiveUpUntil(Instant),
}

/// The recent crashes of one session.
#[derive(Debug, Default, Clone)]
pub struct RestartHistory {
    crashes: VecDeque<Instant>,
}

impl RestartHistory {
    /// Decides what follows `exit` at `now`.
    pub fn after_exit(&mut self, exit: Exit, now: Instant, policy: &RestartPolicy) -> Next {
        match exit {
            // Nothing went wrong, or what went wrong would happen again at once: a
            // limit kill restarts only when the person writes again, never in a loop.
            Exit::Stopped | Exit::WallClockCap | Exit::Exited | Exit::KilledByLimit => {
                Next::StayStopped
            }
            Exit::Crashed { .. } => {
                while self
                    .crashes
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > policy.window)
                {
                    self.crashes.pop_front();
                }
                self.crashes.push_back(now);
                let n = self.crashes.len();
                if n > policy.max_crashes {
                    return Next::GiveUpUntil(now + policy.window);
                }
                let factor = 1u32 << (n - 1).min(16);
                Next::RestartAt(
                    now + policy
                        .first_delay
                        .saturating_mul(factor)
                        .min(policy.max_delay),
                )
            }
        }
    }
}

/// Something the rest of the control plane must hear about: the user is told about
/// limit kills and give-ups; everything goes to the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started { session: SessionId },
    Ended { session: SessionId, exit: Exit },
    GaveUp { session: SessionId },
}

/// Why a sandbox could not be made to run.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("session {0} crashed too often and is paused")]
    Paused(SessionId),
    #[error("session {0} has no keys to start with")]
    NoKeys(SessionId),
    #[error(
        "all {max} sandbox slots are taken by sessions that had messages within the reply timeout"
    )]
    Full { max: usize },
    #[error("removing sandboxes left over from a previous run failed")]
    Leftovers(#[source] RuntimeError),
    #[error("installing the agent binary failed")]
    Install(#[source] std::io::Error),
}

enum State {
    Running {
        child: Box<Child>,
        started: Instant,
        last_active: Instant,
        /// Its share of `max_live`, given back whenever this state is left.
        _slot: LiveSlot,
    },
    Waiting {
        restart_at: Instant,
    },
    Paused {
        until: Instant,
    },
    Stopped,
}

struct Slot {
    state: State,
    history: RestartHistory,
    /// Held only while the sandbox runs or waits to be restarted; dropped (and wiped)
    /// when it stops, so a stopped or deleted session's keys do not linger here.
    keys: Option<SessionKeys>,
}

/// One of the `max_live` slots, held by a sandbox that runs or is being launched; its
/// count is given back when it is dropped, however its holder ends.
#[derive(Debug)]
struct LiveSlot(Arc<AtomicUsize>);

impl Drop for LiveSlot {
    fn drop(&mut self) {
        let _ = self.0.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
    }
}

/// Supervises every session's sandbox.
#[derive(Debug)]
pub struct Manager {
    runtime: Arc<dyn Runtime>,
    /// Replaced when an approved change sets new limits; each launch takes a copy.
    settings: std::sync::RwLock<Arc<SandboxSettings>>,
    layout: Layout,
    /// One lock per session, so a slow launch or stop holds up only its own session;
    /// the map's own lock is held just long enough to find a slot.
    slots: std::sync::Mutex<HashMap<SessionId, Arc<Mutex<Slot>>>>,
    /// Sandboxes running or being launched, never more than `max_live`: each holds a
    /// [`LiveSlot`] that gives its count back when dropped.
    live: Arc<AtomicUsize>,
    events: mpsc::UnboundedSender<Event>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Running { .. } => "running",
            State::Waiting { .. } => "waiting to restart",
            State::Paused { .. } => "paused",
            State::Stopped => "stopped",
        };
        f.write_str(state)
    }
}

impl Manager {
    /// Installs the agent into the shared root, removes sandboxes left over from an
    /// earlier run, and returns the manager with the receiver of its events.
    pub fn new(
        runtime: Arc<dyn Runtime>,
        settings: SandboxSettings,
    ) -> Result<(Arc<Manager>, mpsc::UnboundedReceiver<Event>), ManagerError> {
        let layout = Layout::new(&settings.state_dir, &settings.run_dir);
        layout::install_rootfs(&layout, &settings.agent_binary).map_err(ManagerError::Install)?;
        for session in runtime
            .leftovers(&layout)
            .map_err(ManagerError::Leftovers)?
        {
            tracing::warn!(session = %session, "removing a sandbox left over from a previous run");
            runtime
                .destroy(&layout, &session)
                .map_err(ManagerError::Leftovers)?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let manager = Manager {
            runtime,
            settings: std::sync::RwLock::new(Arc::new(settings)),
            layout,
            slots: std::sync::Mutex::new(HashMap::new()),
            live: Arc::new(AtomicUsize::new(0)),
            events: tx,
        };
        Ok((Arc::new(manager), rx))
    }

    /// The settings sandboxes start with now.
    pub fn settings(&self) -> Arc<SandboxSettings> {
        self.settings
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sets the settings for sandboxes started from now on.
    pub fn set_settings(&self, settings: SandboxSettings) {
        *self
            .settings
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(settings);
    }

    /// The directory layout the sandboxes use.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Makes sure `session`'s sandbox runs (starting it if needed) and marks it active.
    /// At most `max_live` sandboxes run at once: when every slot is taken, the one idle
    /// longest makes room if it has been idle for `evict_after` (it starts again on its
    /// next message); otherwise this one is refused with [`ManagerError::Full`].
    pub async fn ensure_running(
        &self,
        session: &SessionId,
        keys: &SessionKeys,
    ) -> Result<(), ManagerError> {
        let slot = self
            .map()
            .entry(session.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Slot {
                    state: State::Stopped,
                    history: RestartHistory::default(),
                    keys: None,
                }))
            })
            .clone();
        let mut slot = slot.lock().await;
        let now = Instant::now();
        // A paused session is refused before it is given keys to hold.
        if let State::Paused { until } = slot.state
            && now < until
        {
            return Err(ManagerError::Paused(session.clone()));
        }
        slot.keys = Some(keys.clone());
        if let State::Running { last_active, .. } = &mut slot.state {
            *last_active = now;
            return Ok(());
        }
        self.start(session, &mut slot).await
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Mutex<Slot>>>> {
        // A panic while holding this lock leaves the map itself intact.
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, session: &SessionId) -> Option<Arc<Mutex<Slot>>> {
        self.map().get(session).cloned()
    }

    async fn start(&self, session: &SessionId, slot: &mut Slot) -> Result<(), ManagerError> {
        let Some(keys) = slot.keys.clone() else {
            slot.state = State::Stopped;
            return Err(ManagerError::NoKeys(session.clone()));
        };
        // The slot is held from here: dropped with a failed launch, moved into the
        // running state on success, and given back however this future ends, a caller
        // that stops waiting included.
        let live = match self.admit(session).await {
            Ok(live) => live,
            Err(e) => {
                if !matches!(slot.state, State::Waiting { .. }) {
                    slot.keys = None;
                }
                return Err(e);
            }
        };
        let launched = launch(
            self.runtime.as_ref(),
            &self.settings(),
            &self.layout,
            session,
            &keys,
        )
        .await;
        match launched {
            Ok(l) => {
                slot.state = State::Running {
                    child: Box::new(l.child),
                    started: l.started,
                    last_active: Instant::now(),
                    _slot: live,
                };
                let _ = self.events.send(Event::Started {
                    session: session.clone(),
                });
                Ok(())
            }
            Err(e) => {
                let exit = match &e {
                    LaunchError::NotReady {
                        status: Some(st),
                        limited,
                        ..
                    } => classify(*st, *limited),
                    _ => Exit::Crashed { code: None },
                };
                self.after_exit(session, slot, exit, Instant::now());
                Err(e.into())
            }
        }
    }

    /// Takes one of the `max_live` slots, first stopping the longest idle sandbox of
    /// another session if every slot is taken and it has been idle long enough. Other
    /// sessions' locks are only tried, never waited for.
    async fn admit(&self, session: &SessionId) -> Result<LiveSlot, ManagerError> {
        let settings = self.settings();
        let max = settings.max_live;
        if let Some(live) = self.reserve(max) {
            return Ok(live);
        }
        let now = Instant::now();
        let others: Vec<(SessionId, Arc<Mutex<Slot>>)> = self
            .map()
            .iter()
            .filter(|(s, _)| *s != session)
            .map(|(s, slot)| (s.clone(), slot.clone()))
            .collect();
        let idlest = others
            .into_iter()
            .filter_map(|(s, slot)| {
                let since = match &slot.try_lock().ok()?.state {
                    State::Running { last_active, .. } => *last_active,
                    _ => return None,
                };
                (now.duration_since(since) >= settings.evict_after).then_some((since, s, slot))
            })
            .min_by_key(|(since, _, _)| *since);
        // Still running and still idle when its lock is held.
        if let Some((_, s, slot)) = idlest
            && let Ok(mut slot) = slot.try_lock()
            && let State::Running {
                child, last_active, ..
            } = &mut slot.state
            && Instant::now().duration_since(*last_active) >= settings.evict_after
        {
            tracing::info!(session = %s, "stopping the longest idle sandbox to make room");
            let _ = self.kill(&s, child).await;
            self.after_exit(&s, &mut slot, Exit::Stopped, Instant::now());
        }
        self.reserve(max).ok_or(ManagerError::Full { max })
    }

    /// Takes a slot if fewer than `max` are taken.
    fn reserve(&self, max: usize) -> Option<LiveSlot> {
        self.live
            .fetch_update(SeqCst, SeqCst, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| LiveSlot(self.live.clone()))
    }

    /// How many sandboxes run or are being launched now.
    pub fn live(&self) -> usize {
        self.live.load(SeqCst)
    }

    /// Records the end of a sandbox that [`start`](Self::start) launched (or failed to).
    /// Leaving the running state gives its slot back.
    fn after_exit(&self, session: &SessionId, slot: &mut Slot, exit: Exit, now: Instant) {
        let _ = self.events.send(Event::Ended {
            session: session.clone(),
            exit,
        });
        slot.state = match slot.history.after_exit(exit, now, &self.settings().restart) {
            Next::StayStopped => State::Stopped,
            Next::RestartAt(t) => State::Waiting { restart_at: t },
            Next::GiveUpUntil(t) => {
                let _ = self.events.send(Event::GaveUp {
                    session: session.clone(),
                });
                State::Paused { until: t }
            }
        };
        if !matches!(slot.state, State::Waiting { .. }) {
            slot.keys = None;
        }
        match exit {
            Exit::KilledByLimit => tracing::warn!(session = %session, "sandbox killed by a limit"),
            Exit::Crashed { code } => tracing::warn!(session = %session, ?code, "sandbox crashed"),
            _ => tracing::info!(session = %session, ?exit, "sandbox ended"),
        }
    }

    /// Stops `session`'s sandbox if it runs, and cancels a pending restart. A paused
    /// session stays paused.
    pub async fn stop(&self, session: &SessionId) -> Result<(), RuntimeError> {
        let Some(slot) = self.get(session) else {
            return Ok(());
        };
        let mut slot = slot.lock().await;
        match &mut slot.state {
            State::Running { child, .. } => {
                let killed = self.kill(session, child).await;
                // The child is reaped whatever `destroy` said: record the stop first.
                self.after_exit(session, &mut slot, Exit::Stopped, Instant::now());
                killed
            }
            State::Waiting { .. } => {
                slot.state = State::Stopped;
                slot.keys = None;
                Ok(())
            }
            State::Paused { .. } | State::Stopped => Ok(()),
        }
    }

    /// Stops `session`'s sandbox and forgets the session, keys and crash history
    /// included (for session deletion).
    pub async fn forget(&self, session: &SessionId) -> Result<(), RuntimeError> {
        let stopped = self.stop(session).await;
        self.map().remove(session);
        stopped
    }

    /// Stops every sandbox, for shutdown.
    pub async fn stop_all(&self) {
        let sessions: Vec<SessionId> = self.map().keys().cloned().collect();
        for s in sessions {
            if let Err(e) = self.stop(&s).await {
                tracing::warn!(session = %s, error = %e, "stopping a sandbox failed");
            }
        }
    }

    /// Ends a running sandbox: kill everything in it, let the runtime child exit (or
    /// kill it after a grace period), reap it, remove what is left.
    async fn kill(&self, session: &SessionId, child: &mut Child) -> Result<(), RuntimeError> {
        blocking(|| self.runtime.kill(&self.layout, session));
        if tokio::time::timeout(KILL_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        blocking(|| self.runtime.destroy(&self.layout, session))
    }

    /// The host pid of the runtime child of `session`'s running sandbox.
    pub async fn pid(&self, session: &SessionId) -> Option<u32> {
        let slot = self.get(session)?;
        let slot = slot.lock().await;
        match &slot.state {
            State::Running { child, .. } => child.id(),
            _ => None,
        }
    }

    /// Whether `session`'s sandbox is running now.
    pub async fn is_running(&self, session: &SessionId) -> bool {
        match self.get(session) {
            Some(slot) => matches!(slot.lock().await.state, State::Running { .. }),
            None => false,
        }
    }

    /// One supervision pass: reap exits, stop idle sandboxes, kill those over the
    /// wall-clock cap, restart crashed ones whose backoff has passed. A session busy
    /// launching or stopping is looked at again on the next pass.
    pub async fn tick(&self) {
        let now = Instant::now();
        let settings = self.settings();
        let all: Vec<(SessionId, Arc<Mutex<Slot>>)> = self
            .map()
            .iter()
            .map(|(s, slot)| (s.clone(), slot.clone()))
            .collect();
        for (session, slot) in all {
            let Ok(mut slot) = slot.try_lock() else {
                continue;
            };
            let slot = &mut *slot;
            match &mut slot.state {
                State::Running {
                    child,
                    started,
                    last_active,
                    ..
                } => {
                    if let Ok(Some(status)) = child.try_wait() {
                        let exit = classify(status, self.runtime.hit_limit(&self.layout, &session));
                        // Make sure nothing of the sandbox outlives its agent.
                        let _ = blocking(|| self.runtime.destroy(&self.layout, &session));
                        self.after_exit(&session, slot, exit, now);
                    } else if now.duration_since(*started) >= settings.wall_clock_cap {
                        let _ = self.kill(&session, child).await;
                        self.after_exit(&session, slot, Exit::WallClockCap, now);
                    } else if now.duration_since(*last_active) >= settings.idle_timeout {
                        let _ = self.kill(&session, child).await;
                        self.after_exit(&session, slot, Exit::Stopped, now);
                    }
                }
                State::Waiting { restart_at } if now >= *restart_at => {
                    if let Err(e) = self.start(&session, slot).await {
                        tracing::warn!(session = %session, error = %e, "restarting a sandbox failed");
                    }
                }
                _ => {}
            }
        }
    }

    /// Runs [`tick`](Self::tick) every `period` until the manager is dropped elsewhere.
    pub fn supervise(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            loop {
                interval.tick().await;
                let Some(m) = weak.upgrade() else { return };
                m.tick().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn status(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn only_the_kernels_count_makes_an_exit_a_limit_kill() {
        // The codes runsc uses for a killed sentry, chosen by the agent itself: crashes.
        for code in [2, 137] {
            assert_eq!(
                classify(status(code), false),
                Exit::Crashed { code: Some(code) }
            );
        }
        assert_eq!(
            classify(ExitStatus::from_raw(9), false),
            Exit::Crashed { code: None }
        );
        // Any non-zero end after a counted limit is a limit kill ...
        for st in [status(1), status(2), ExitStatus::from_raw(9)] {
            assert_eq!(classify(st, true), Exit::KilledByLimit);
        }
        // ... but a clean exit stays clean, whatever was counted on the way.
        assert_eq!(classify(status(0), true), Exit::Exited);
        assert_eq!(classify(status(0), false), Exit::Exited);
    }

    #[test]
    fn a_limit_kill_never_restarts_by_itself() {
        let policy = RestartPolicy::default();
        let mut h = RestartHistory::default();
        let now = Instant::now();
        for i in 0..100 {
            assert_eq!(
                h.after_exit(Exit::KilledByLimit, now + Duration::from_secs(i), &policy),
                Next::StayStopped
            );
        }
    }

    #[test]
    fn crashes_back_off_exponentially_then_give_up() {
        let policy = RestartPolicy {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            max_crashes: 4,
            window: Duration::from_secs(100),
        };
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        let delays: Vec<Next> = (0..5)
            .map(|_| h.after_exit(Exit::Crashed { code: Some(1) }, t0, &policy))
            .collect();
        assert_eq!(
            delays,
            [
                Next::RestartAt(t0 + Duration::from_secs(1)),
                Next::RestartAt(t0 + Duration::from_secs(2)),
                Next::RestartAt(t0 + Duration::from_secs(4)),
                Next::RestartAt(t0 + Duration::from_secs(5)),
                Next::GiveUpUntil(t0 + Duration::from_secs(100)),
            ]
        );
        // Outside the window the history is forgotten.
        let later = t0 + Duration::from_secs(1000);
        assert_eq!(
            h.after_exit(Exit::Crashed { code: Some(1) }, later, &policy),
            Next::RestartAt(later + Duration::from_secs(1))
        );
    }

    #[test]
    fn clean_ends_stay_stopped() {
        let mut h = RestartHistory::default();
        for e in [Exit::Stopped, Exit::WallClockCap, Exit::Exited] {
            assert_eq!(
                h.after_exit(e, Instant::now(), &RestartPolicy::default()),
                Next::StayStopped
            );
        }
    }

    mod manager {
        use super::*;
        use crate::sandbox::fake::{self, Behaviour, Call, FakeRuntime};
        use crate::sandbox::runtime::RuntimeKind;
        use tokio::sync::mpsc::UnboundedReceiver;

        struct Rig {
            _dir: tempfile::TempDir,
            fake: Arc<FakeRuntime>,
            manager: Arc<Manager>,
            events: UnboundedReceiver<Event>,
        }

        fn rig_with(kind: RuntimeKind, edit: impl FnOnce(&mut SandboxSettings)) -> Rig {
            let dir = tempfile::tempdir().unwrap();
            let mut settings = fake::settings(dir.path());
            edit(&mut settings);
            let fake = FakeRuntime::new(kind);
            let (manager, events) = Manager::new(fake.clone(), settings).unwrap();
            Rig {
                _dir: dir,
                fake,
                manager,
                events,
            }
        }

        fn rig(edit: impl FnOnce(&mut SandboxSettings)) -> Rig {
            rig_with(RuntimeKind::Gvisor, edit)
        }

        impl Rig {
            /// The next event, ticking the supervisor while there is none.
            async fn next_event(&mut self) -> Event {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Ok(e) = self.events.try_recv() {
                        return e;
                    }
                    assert!(Instant::now() < deadline, "no event within 10 s");
                    self.manager.tick().await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }

            /// Ticks for `d`, and returns the events seen meanwhile.
            async fn tick_for(&mut self, d: Duration) -> Vec<Event> {
                let end = Instant::now() + d;
                while Instant::now() < end {
                    self.manager.tick().await;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                std::iter::from_fn(|| self.events.try_recv().ok()).collect()
            }

            async fn keys_held(&self, s: &SessionId) -> bool {
                match self.manager.get(s) {
                    Some(slot) => slot.lock().await.keys.is_some(),
                    None => false,
                }
            }

            async fn state(&self, s: &SessionId) -> String {
                match self.manager.get(s) {
                    Some(slot) => format!("{:?}", *slot.lock().await),
                    None => "forgotten".into(),
                }
            }
        }

        fn started(s: &SessionId) -> Event {
            Event::Started { session: s.clone() }
        }

        fn ended(s: &SessionId, exit: Exit) -> Event {
            Event::Ended {
                session: s.clone(),
                exit,
            }
        }

        fn crashed(s: &SessionId, code: i32) -> Event {
            ended(s, Exit::Crashed { code: Some(code) })
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn new_installs_the_agent_and_removes_the_leftovers_of_an_earlier_run() {
            let dir = tempfile::tempdir().unwrap();
            let settings = fake::settings(dir.path());
            let fake = FakeRuntime::new(RuntimeKind::Gvisor);
            let (a, _) = fake::session("left-a");
            let (b, _) = fake::session("left-b");
            fake.set_leftovers(vec![a.clone(), b.clone()]);
            let (manager, _events) = Manager::new(fake.clone(), settings.clone()).unwrap();
            assert_eq!(
                fake.calls(),
                [Call::Leftovers, Call::Destroy(a), Call::Destroy(b)]
            );
            let agent = manager.layout().rootfs().join("ironclaw-agent");
            assert_eq!(
                std::fs::read(&agent).unwrap(),
                std::fs::read(&settings.agent_binary).unwrap()
            );
            // A leftover that cannot be removed stops the start.
            fake.fail_destroy(true);
            assert!(matches!(
                Manager::new(fake.clone(), settings),
                Err(ManagerError::Leftovers(_))
            ));
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn a_sandbox_starts_on_demand_once_and_is_stopped_when_idle() {
            let mut r = rig(|s| s.idle_timeout = Duration::from_millis(400));
            let (s, keys) = fake::session("idler");
            assert!(!r.manager.is_running(&s).await);
            r.manager.ensure_running(&s, &keys).await.unwrap();
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.fake.commands(&s), 1, "started once");
            assert!(r.manager.is_running(&s).await);
            let spawn = r.fake.spawns().pop().unwrap();
            assert_eq!(r.manager.pid(&s).await, spawn.pid());
            assert!(r.keys_held(&s).await);
            // Activity keeps it running past the idle timeout.
            let busy_until = Instant::now() + Duration::from_millis(700);
            while Instant::now() < busy_until {
                r.manager.ensure_running(&s, &keys).await.unwrap();
                r.manager.tick().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(r.tick_for(Duration::from_millis(100)).await, [started(&s)]);
            assert!(r.manager.is_running(&s).await);

            assert_eq!(r.next_event().await, ended(&s, Exit::Stopped));
            assert!(!r.manager.is_running(&s).await);
            assert!(!spawn.alive(), "the child is reaped");
            assert!(
                !r.keys_held(&s).await,
                "a stopped session's keys are dropped"
            );
            let calls = r.fake.calls();
            assert_eq!(
                calls[calls.len() - 2..],
                [Call::Kill(s.clone()), Call::Destroy(s.clone())]
            );
            // It stays stopped until the next message.
            assert_eq!(r.tick_for(Duration::from_millis(300)).await, []);
            assert_eq!(r.fake.commands(&s), 1);
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.fake.commands(&s), 2);
            r.manager.stop_all().await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn the_wall_clock_cap_ends_a_busy_sandbox() {
            let mut r = rig(|s| s.wall_clock_cap = Duration::from_millis(300));
            let (s, keys) = fake::session("busy");
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.next_event().await, started(&s));
            let exit = loop {
                r.manager.ensure_running(&s, &keys).await.unwrap(); // activity
                r.manager.tick().await;
                if let Ok(e) = r.events.try_recv() {
                    break e;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            assert_eq!(exit, ended(&s, Exit::WallClockCap));
            assert!(r.fake.calls().contains(&Call::Kill(s.clone())));
            assert!(!r.keys_held(&s).await);
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn a_crash_is_restarted_by_itself_after_its_backoff() {
            let mut r = rig(|s| s.restart.first_delay = Duration::from_millis(400));
            let (s, keys) = fake::session("crasher");
            r.fake.plan([Behaviour::ReadyThenExit(1)]);
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.next_event().await, started(&s));
            assert_eq!(r.next_event().await, crashed(&s, 1));
            let crashed_at = Instant::now();
            // Nothing of the crashed sandbox is left; its keys wait for the restart.
            assert_eq!(r.fake.calls().last(), Some(&Call::Destroy(s.clone())));
            assert!(!r.manager.is_running(&s).await);
            assert!(r.keys_held(&s).await);
            // Not before the backoff.
            assert_eq!(r.tick_for(Duration::from_millis(250)).await, []);
            assert_eq!(r.fake.commands(&s), 1);
            assert_eq!(r.next_event().await, started(&s));
            assert!(crashed_at.elapsed() >= Duration::from_millis(350));
            assert_eq!(r.fake.commands(&s), 2);
            assert!(r.manager.is_running(&s).await);
            r.manager.stop(&s).await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn repeated_crashes_pause_the_session_and_emit_gave_up() {
            let mut r = rig(|s| {
                s.restart.max_crashes = 2;
                s.restart.first_delay = Duration::from_millis(20);
            });
            let (s, keys) = fake::session("flaky");
            r.fake.plan([Behaviour::ExitEarly(1); 3]);
            assert!(matches!(
                r.manager.ensure_running(&s, &keys).await,
                Err(ManagerError::Launch(LaunchError::NotReady { .. }))
            ));
            let mut seen = Vec::new();
            while !seen.contains(&Event::GaveUp { session: s.clone() }) {
                seen.push(r.next_event().await);
            }
            assert_eq!(
                seen,
                [
                    crashed(&s, 1),
                    crashed(&s, 1),
                    crashed(&s, 1),
                    Event::GaveUp { session: s.clone() }
                ]
            );
            assert_eq!(r.state(&s).await, "paused");
            assert!(!r.keys_held(&s).await);
            // Paused: neither the supervisor nor a new message starts it.
            assert_eq!(r.tick_for(Duration::from_millis(200)).await, []);
            assert!(matches!(
                r.manager.ensure_running(&s, &keys).await,
                Err(ManagerError::Paused(_))
            ));
            assert_eq!(r.fake.commands(&s), 3);
            assert!(!r.keys_held(&s).await, "a paused session holds no keys");
            // Forgetting the session forgets its crashes too.
            r.manager.forget(&s).await.unwrap();
            assert_eq!(r.state(&s).await, "forgotten");
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.fake.commands(&s), 4);
            r.manager.stop_all().await;
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn a_limit_kill_is_reported_and_left_stopped_until_the_next_message() {
            let mut r = rig(|s| s.restart.first_delay = Duration::from_millis(20));
            let (s, keys) = fake::session("bomb");
            // The exit codes runsc uses for a limit, without a limit counted, are a crash.
            r.fake.plan([Behaviour::ReadyThenExit(137)]);
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.next_event().await, started(&s));
            assert_eq!(r.next_event().await, crashed(&s, 137));
            r.manager.forget(&s).await.unwrap();
            // Killed while running after the kernel counted a limit ...
            r.fake.set_limited(true);
            r.fake.plan([Behaviour::ReadyThenExit(137)]);
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.next_event().await, started(&s));
            assert_eq!(r.next_event().await, ended(&s, Exit::KilledByLimit));
            assert_eq!(r.tick_for(Duration::from_millis(200)).await, []);
            assert_eq!(r.fake.commands(&s), 2, "not restarted by itself");
            assert_eq!(r.state(&s).await, "stopped");
            assert!(!r.keys_held(&s).await);
            // ... or while starting.
            r.fake.plan([Behaviour::ExitEarly(2)]);
            assert!(r.manager.ensure_running(&s, &keys).await.is_err());
            assert_eq!(r.next_event().await, ended(&s, Exit::KilledByLimit));
            assert_eq!(r.tick_for(Duration::from_millis(200)).await, []);
            assert_eq!(r.fake.commands(&s), 3);
            // The next message starts it again.
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.fake.commands(&s), 4);
            r.manager.stop(&s).await.unwrap();
            r.fake.set_limited(false);

            // The host runtime counts no limits: the same status is a crash, restarted.
            let mut r = rig_with(RuntimeKind::Host, |s| {
                s.restart.first_delay = Duration::from_millis(20)
            });
            r.fake.plan([Behaviour::ReadyThenExit(137)]);
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.next_event().await, started(&s));
            assert_eq!(r.next_event().await, crashed(&s, 137));
            assert_eq!(r.next_event().await, started(&s));
            r.manager.stop(&s).await.unwrap();
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn no_more_than_max_live_sandboxes_run_and_the_idlest_makes_room() {
            let mut r = rig(|s| {
                s.max_live = 2;
                s.evict_after = Duration::from_secs(3600);
            });
            let (a, a_keys) = fake::session("a");
            let (b, b_keys) = fake::session("b");
            let (c, c_keys) = fake::session("c");
            r.manager.ensure_running(&a, &a_keys).await.unwrap();
            r.manager.ensure_running(&b, &b_keys).await.unwrap();
            assert_eq!(r.next_event().await, started(&a));
            assert_eq!(r.next_event().await, started(&b));
            // Both busy within `evict_after`: the third is refused, launches nothing and
            // keeps no keys.
            assert!(matches!(
                r.manager.ensure_running(&c, &c_keys).await,
                Err(ManagerError::Full { max: 2 })
            ));
            assert_eq!(r.fake.commands(&c), 0);
            assert!(!r.keys_held(&c).await);
            assert_eq!(r.manager.live(), 2);
            // Once they may be evicted, the one idle longest (b, since a has just had a
            // message) is stopped to make room.
            let mut settings = (*r.manager.settings()).clone();
            settings.evict_after = Duration::ZERO;
            r.manager.set_settings(settings);
            r.manager.ensure_running(&a, &a_keys).await.unwrap();
            r.manager.ensure_running(&c, &c_keys).await.unwrap();
            assert_eq!(r.next_event().await, ended(&b, Exit::Stopped));
            assert_eq!(r.next_event().await, started(&c));
            assert!(r.manager.is_running(&a).await);
            assert!(!r.manager.is_running(&b).await);
            assert_eq!(r.manager.live(), 2);
            // A launch whose caller stops waiting gives its slot back.
            r.manager.stop(&c).await.unwrap();
            assert_eq!(r.manager.live(), 1);
            r.fake.plan([Behaviour::Hangs]);
            let cancelled = tokio::time::timeout(
                Duration::from_millis(300),
                r.manager.ensure_running(&c, &c_keys),
            )
            .await;
            assert!(cancelled.is_err(), "still launching when given up on");
            assert_eq!(r.manager.live(), 1);
            r.manager.ensure_running(&c, &c_keys).await.unwrap();
            assert_eq!(r.manager.live(), 2);
            // A failed launch and a crash give their slots back.
            r.manager.stop(&c).await.unwrap();
            r.fake.plan([Behaviour::ExitEarly(1)]);
            assert!(r.manager.ensure_running(&b, &b_keys).await.is_err());
            r.manager.forget(&b).await.unwrap();
            assert_eq!(r.manager.live(), 1);
            r.manager.stop_all().await;
            assert_eq!(r.manager.live(), 0);
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn stop_cancels_a_pending_restart_and_stop_all_stops_every_sandbox() {
            let mut r = rig(|s| s.restart.first_delay = Duration::from_millis(100));
            let (a, a_keys) = fake::session("a");
            let (b, b_keys) = fake::session("b");
            let (c, c_keys) = fake::session("c");
            r.manager.ensure_running(&a, &a_keys).await.unwrap();
            r.manager.ensure_running(&b, &b_keys).await.unwrap();
            r.fake.plan([Behaviour::ExitEarly(1)]);
            assert!(r.manager.ensure_running(&c, &c_keys).await.is_err());
            assert_eq!(r.state(&c).await, "waiting to restart");
            r.manager.stop(&c).await.unwrap();
            assert_eq!(r.state(&c).await, "stopped");
            assert!(!r.keys_held(&c).await);

            let spawns = r.fake.spawns();
            r.manager.stop_all().await;
            for s in [&a, &b] {
                assert!(!r.manager.is_running(s).await);
                assert!(!r.keys_held(s).await);
                assert!(r.fake.calls().contains(&Call::Kill(s.clone())));
            }
            assert!(spawns.iter().all(|sp| !sp.alive()), "every child reaped");
            let events = r.tick_for(Duration::from_millis(300)).await;
            assert_eq!(events[..3], [started(&a), started(&b), crashed(&c, 1)]);
            // stop_all goes through the sessions in no particular order.
            assert_eq!(events.len(), 5, "{events:?}");
            for s in [&a, &b] {
                assert!(events[3..].contains(&ended(s, Exit::Stopped)), "{events:?}");
            }
            assert_eq!(r.fake.commands(&c), 1, "the cancelled restart never ran");
            // Stopping what is stopped does nothing.
            let calls = r.fake.calls().len();
            r.manager.stop(&a).await.unwrap();
            assert_eq!(r.fake.calls().len(), calls);
        }

        #[tokio::test(flavor = "multi_thread")]
        async fn a_stop_whose_clean_up_fails_is_still_recorded() {
            let mut r = rig(|_| {});
            let (s, keys) = fake::session("sticky");
            r.manager.ensure_running(&s, &keys).await.unwrap();
            assert_eq!(r.next_event().await, started(&s));
            r.fake.fail_destroy(true);
            assert!(r.manager.stop(&s).await.is_err());
            assert_eq!(r.next_event().await, ended(&s, Exit::Stopped));
            assert!(!r.manager.is_running(&s).await);
            assert!(!r.keys_held(&s).await);
            // Forget reports the failure too, and forgets the session all the same.
            r.fake.fail_destroy(false);
            r.manager.ensure_running(&s, &keys).await.unwrap();
            r.fake.fail_destroy(true);
            assert!(r.manager.forget(&s).await.is_err());
            assert_eq!(r.state(&s).await, "forgotten");
        }
    }
}
