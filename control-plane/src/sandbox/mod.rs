//! One gVisor sandbox per session: the static agent binary it runs ([`agent_binary`]),
//! where its files live ([`layout`]), how it is run ([`runtime`]: real `runsc`, or the
//! development-only host runtime), the host cgroup that limits it and records why it
//! ended ([`cgroup`]), how it is launched ([`launch`]), and how it lives and dies
//! ([`lifecycle`]).

pub mod agent_binary;
pub mod cgroup;
#[cfg(test)]
mod fake;
pub mod launch;
pub mod layout;
pub mod lifecycle;
pub mod runtime;

use std::path::PathBuf;
use std::time::Duration;

pub use runsc_config::Limits;

/// Everything the control plane decides about its sandboxes.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Root of the state directory (sessions, bundles, runsc state, the shared rootfs).
    pub state_dir: PathBuf,
    /// Directory of the per-session socket directories; short, so socket paths stay
    /// under the 108-byte limit.
    pub run_dir: PathBuf,
    /// The static agent binary to install into the shared read-only root.
    pub agent_binary: PathBuf,
    /// The unprivileged uid and gid the agent runs as, unless `uid_base` gives each
    /// session one of its own.
    pub uid: u32,
    pub gid: u32,
    /// The first of [`layout::UID_RANGE`] uids (and gids of the same numbers) that
    /// sessions are given, one each, for good (see [`layout::session_ids`]).
    pub uid_base: Option<u32>,
    pub limits: Limits,
    /// The size of each session's outbox file system (see
    /// [`layout::limit_outbox`]); `None` leaves the outbox a plain directory of the
    /// state directory's file system (the host runtime, and tests of the sandbox alone).
    pub outbox_bytes: Option<u64>,
    /// How long a launched agent has to print `ready`.
    pub ready_timeout: Duration,
    /// A sandbox with no activity for this long is stopped.
    pub idle_timeout: Duration,
    /// A sandbox is killed after running this long, busy or not.
    pub wall_clock_cap: Duration,
    /// The most sandboxes running at once (see [`lifecycle::Manager::ensure_running`]).
    pub max_live: usize,
    /// When every slot is taken, the longest idle sandbox is stopped to make room if it
    /// has been idle this long; otherwise the new one is refused. The service makes it
    /// the reply timeout: by then no message of that session is still waiting.
    pub evict_after: Duration,
    pub restart: lifecycle::RestartPolicy,
}

impl SandboxSettings {
    /// The uid and gid session `s`'s agent runs as.
    pub fn ids_for(
        &self,
        layout: &layout::Layout,
        s: &queue_proto::ids::SessionId,
    ) -> std::io::Result<(u32, u32)> {
        match self.uid_base {
            Some(base) => layout::session_ids(layout, s, base),
            None => Ok((self.uid, self.gid)),
        }
    }

    /// Defaults for a state directory: `nobody`'s uid, the default limits, a 10-minute
    /// idle stop and a 24-hour wall-clock cap.
    pub fn new(state_dir: PathBuf, agent_binary: PathBuf) -> Self {
        SandboxSettings {
            run_dir: state_dir.join("run"),
            state_dir,
            agent_binary,
            uid: 65534,
            gid: 65534,
            uid_base: None,
            limits: Limits::default(),
            outbox_bytes: None,
            ready_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(600),
            wall_clock_cap: Duration::from_secs(24 * 3600),
            max_live: 32,
            evict_after: Duration::from_secs(300),
            restart: lifecycle::RestartPolicy::default(),
        }
    }
}
