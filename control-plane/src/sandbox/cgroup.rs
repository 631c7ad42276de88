//! Each gVisor sandbox's host cgroup, made and read by the control plane itself.
//!
//! runsc would make the cgroup named in the spec, set its limits, and remove it when the
//! sandbox ends, taking with it the only trusted record of why the sandbox ended: the
//! kernel's count of OOM kills and of refused forks. The exit status cannot stand in for
//! it, since the agent chooses its own. So the control plane makes the cgroup before the
//! launch and writes the limits into it (runsc joins a cgroup that already exists and
//! leaves its limits and its removal to whoever made it), reads the counters after the
//! sandbox has ended, and removes it.
//!
//! Both layouts are handled: cgroup v1, one directory per controller
//! (`/sys/fs/cgroup/memory/ironclaw/ironclaw-<session>`, likewise `pids` and `cpu`), and
//! the unified v2 hierarchy (`/sys/fs/cgroup/ironclaw/ironclaw-<session>`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use queue_proto::ids::SessionId;
use runsc_config::{Limits, cgroup_path};

/// The v1 controllers the control plane makes and limits itself.
const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// How long removing an emptied cgroup is retried: the kernel refuses while the last
/// of the sandbox's processes are still leaving it.
const REMOVE_TRIES: u32 = 20;
const REMOVE_PAUSE: Duration = Duration::from_millis(50);

/// Which cgroup layout the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The host's cgroup file system.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    version: Version,
}

/// What went wrong with a sandbox's cgroup.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}")]
pub struct CgroupError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// The kernel's record of a sandbox's limits, read after it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hits {
    /// Times the memory limit was reached (v1 `memory.failcnt`, v2 `memory.events max`).
    pub memory_limit: u64,
    /// Processes the kernel's OOM killer killed in the cgroup.
    pub oom_kills: u64,
    /// Forks refused at the pids limit (`pids.events max`).
    pub pids_refused: u64,
}

impl Hits {
    /// Whether any limit stopped the sandbox from getting what it asked for.
    pub fn any(&self) -> bool {
        self.memory_limit > 0 || self.oom_kills > 0 || self.pids_refused > 0
    }
}

impl Cgroups {
    /// The host's cgroups at `/sys/fs/cgroup`, if a memory controller is there.
    pub fn host() -> Option<Cgroups> {
        Cgroups::at(Path::new("/sys/fs/cgroup"))
    }

    /// The cgroup file system mounted at `root`: v2 if `root` is a unified hierarchy
    /// offering the memory controller, v1 if it has a memory controller directory.
    pub fn at(root: &Path) -> Option<Cgroups> {
        let version = match std::fs::read_to_string(root.join("cgroup.controllers")) {
            Ok(c) if c.split_whitespace().any(|c| c == "memory") => Version::V2,
            _ if root.join("memory").join("memory.limit_in_bytes").exists() => Version::V1,
            _ => return None,
        };
        Some(Cgroups {
            root: root.to_owned(),
            version,
        })
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The directories of `session`'s cgroup: one per controller (v1), or one (v2).
    fn dirs(&self, session: &SessionId) -> Vec<PathBuf> {
        match self.version {
            Version::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| self.dir(c, session))
                .collect(),
            Version::V2 => vec![self.dir("", session)],
        }
    }

    /// `controller`'s directory of the session's cgroup: the spec's `cgroupsPath`
    /// under that controller's hierarchy (v1), or under the one hierarchy (v2).
    fn dir(&self, controller: &str, session: &SessionId) -> PathBuf {
        let path = cgroup_path(session);
        let relative = path.trim_start_matches('/');
        match self.version {
            Version::V1 => self.root.join(controller).join(relative),
            Version::V2 => self.root.join(relative),
        }
    }

    /// Makes `session`'s cgroup afresh, with `limits` written into it. A cgroup left
    /// from an earlier run is removed first, so its counters never speak for this one;
    /// one that still holds processes is an error.
    pub fn make(&self, session: &SessionId, limits: &Limits) -> Result<(), CgroupError> {
        self.remove(session)?;
        if self.version == Version::V2 {
            // Each level above the sandbox's hands the three controllers down.
            let leaf = self.dir("", session);
            let parent = leaf.parent().unwrap_or(&self.root);
            for dir in [&self.root, parent] {
                create(dir)?;
                write(dir, "cgroup.subtree_control", "+memory +pids +cpu")?;
            }
        }
        for dir in self.dirs(session) {
            create(&dir)?;
        }
        let memory = self.dir("memory", session);
        let pids = self.dir("pids", session);
        let cpu = self.dir("cpu", session);
        let bytes = limits.memory_bytes.to_string();
        let count = limits.pids.to_string();
        match self.version {
            Version::V1 => {
                write(&memory, "memory.limit_in_bytes", &bytes)?;
                write(&pids, "pids.max", &count)?;
                write(&cpu, "cpu.cfs_period_us", &limits.cpu_period_us.to_string())?;
                write(&cpu, "cpu.cfs_quota_us", &limits.cpu_quota_us.to_string())?;
            }
            Version::V2 => {
                write(&memory, "memory.max", &bytes)?;
                // No swap beyond the limit: the limit is what the sandbox may hold.
                write(&memory, "memory.swap.max", "0").or_else(absent_is_fine)?;
                write(&pids, "pids.max", &count)?;
                let cpu_max = format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us);
                write(&cpu, "cpu.max", &cpu_max)?;
            }
        }
        Ok(())
    }

    /// What the kernel counted against `session`'s limits. A counter that cannot be
    /// read counts as nothing.
    pub fn hits(&self, session: &SessionId) -> Hits {
        let memory = self.dir("memory", session);
        let pids = self.dir("pids", session);
        let pids_refused = field(&pids, "pids.events", "max");
        match self.version {
            Version::V1 => Hits {
                memory_limit: read(&memory, "memory.failcnt")
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0),
                oom_kills: field(&memory, "memory.oom_control", "oom_kill"),
                pids_refused,
            },
            Version::V2 => Hits {
                memory_limit: field(&memory, "memory.events", "max"),
                oom_kills: field(&memory, "memory.events", "oom_kill"),
                pids_refused,
            },
        }
    }

    /// Removes `session`'s cgroup, waiting briefly for its last processes to leave.
    /// Idempotent.
    pub fn remove(&self, session: &SessionId) -> Result<(), CgroupError> {
        for dir in self.dirs(session) {
            let mut tries = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e)
                        if tries + 1 < REMOVE_TRIES
                            && e.kind() == std::io::ErrorKind::ResourceBusy =>
                    {
                        tries += 1;
                        std::thread::sleep(REMOVE_PAUSE);
                    }
                    Err(source) => {
                        return Err(CgroupError {
                            what: "removing the cgroup",
                            path: dir,
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

fn absent_is_fine(e: CgroupError) -> Result<(), CgroupError> {
    match e.source.kind() {
        std::io::ErrorKind::NotFound => Ok(()),
        _ => Err(e),
    }
}

fn create(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError {
            what: "making the cgroup",
            path: dir.to_owned(),
            source,
        }),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|source| CgroupError {
        what: "setting the limit",
        path,
        source,
    })
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

/// The number after `key` in a flat-keyed file such as `pids.events` (`max 3`).
fn field(dir: &Path, file: &str, key: &str) -> u64 {
    read(dir, file)
        .and_then(|text| {
            text.lines().find_map(|line| {
                let (k, v) = line.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionId {
        SessionId::try_from("cg").unwrap()
    }

    fn v1(root: &Path) -> Cgroups {
        for c in V1_CONTROLLERS {
            std::fs::create_dir_all(root.join(c)).unwrap();
        }
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "max").unwrap();
        Cgroups::at(root).expect("a v1 layout")
    }

    #[test]
    fn the_layout_is_recognised_by_its_memory_controller_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Cgroups::at(dir.path()).is_none(), "nothing there");
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu io pids").unwrap();
        assert!(Cgroups::at(dir.path()).is_none(), "v2 without memory");
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        assert_eq!(Cgroups::at(dir.path()).unwrap().version(), Version::V2);
        let other = tempfile::tempdir().unwrap();
        assert_eq!(v1(other.path()).version(), Version::V1);
    }

    #[test]
    fn v1_limits_are_written_into_each_controller_and_counters_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let cg = v1(dir.path());
        let s = session();
        let limits = Limits::default();
        cg.make(&s, &limits).unwrap();
        let at = |c: &str, f: &str| {
            std::fs::read_to_string(dir.path().join(c).join("ironclaw/ironclaw-cg").join(f))
                .unwrap()
        };
        assert_eq!(at("memory", "memory.limit_in_bytes"), "268435456");
        assert_eq!(at("pids", "pids.max"), "512");
        assert_eq!(at("cpu", "cpu.cfs_quota_us"), "100000");
        assert_eq!(cg.hits(&s), Hits::default());
        assert!(!cg.hits(&s).any());

        let memory = dir.path().join("memory/ironclaw/ironclaw-cg");
        std::fs::write(
            memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("pids/ironclaw/ironclaw-cg/pids.events"),
            "max 7\n",
        )
        .unwrap();
        std::fs::write(memory.join("memory.failcnt"), "13\n").unwrap();
        let hits = cg.hits(&s);
        assert_eq!(
            hits,
            Hits {
                memory_limit: 13,
                oom_kills: 2,
                pids_refused: 7
            }
        );
        assert!(hits.any());
    }

    #[test]
    fn v2_limits_and_counters_live_in_one_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        let cg = Cgroups::at(dir.path()).unwrap();
        let s = session();
        let limits = Limits {
            memory_bytes: 1 << 20,
            pids: 9,
            cpu_quota_us: 50_000,
            ..Limits::default()
        };
        cg.make(&s, &limits).unwrap();
        let leaf = dir.path().join("ironclaw/ironclaw-cg");
        let at = |f: &str| std::fs::read_to_string(leaf.join(f)).unwrap();
        assert_eq!(at("memory.max"), "1048576");
        assert_eq!(at("pids.max"), "9");
        assert_eq!(at("cpu.max"), "50000 100000");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ironclaw/cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu"
        );
        std::fs::write(
            leaf.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(
            cg.hits(&s),
            Hits {
                memory_limit: 4,
                oom_kills: 1,
                pids_refused: 0
            }
        );
    }

    #[test]
    fn removal_is_idempotent_and_a_cgroup_that_cannot_go_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cg = v1(dir.path());
        let s = session();
        cg.remove(&s).unwrap();
        // In a plain directory the written limit files stand for processes: the
        // directory is not empty, so it cannot be removed, as a busy cgroup cannot.
        cg.make(&s, &Limits::default()).unwrap();
        let e = cg.remove(&s).unwrap_err();
        assert!(e.to_string().starts_with("removing the cgroup"), "{e}");
        assert!(
            cg.make(&s, &Limits::default()).is_err(),
            "never made over a live one"
        );
    }
}
