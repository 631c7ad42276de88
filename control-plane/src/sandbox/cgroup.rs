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
//! (`/sys/fs/cgroup/memory/<path>`, likewise `pids` and `cpu`), and the unified v2
//! hierarchy (`/sys/fs/cgroup/<path>`), where `<path>` is
//! [`runsc_config::cgroup_path`]. A directory the kernel did not fill with its
//! controller's files is not a cgroup (a writable tmpfs where a controller is not
//! mounted): the limits are refused there, never written into plain files.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runsc_config::Limits;

/// The v1 controllers the control plane makes and limits itself, each with a file the
/// kernel puts in every cgroup of that controller.
const V1_CONTROLLERS: [(&str, &str); 3] = [
    ("memory", "memory.limit_in_bytes"),
    ("pids", "pids.max"),
    ("cpu", "cpu.cfs_quota_us"),
];
/// The files the kernel puts in a v2 cgroup with the three controllers enabled.
const V2_FILES: [&str; 3] = ["memory.max", "pids.max", "cpu.max"];

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
    /// Processes the kernel's OOM killer killed in the cgroup.
    pub oom_kills: u64,
    /// Forks refused at the pids limit (`pids.events max`).
    pub pids_refused: u64,
}

impl Hits {
    /// Whether a limit stopped the sandbox: something was killed for memory, or a
    /// thread or process was refused. Reaching the memory limit alone (reclaim, which
    /// page cache does all the time) is not counted.
    pub fn any(&self) -> bool {
        self.oom_kills > 0 || self.pids_refused > 0
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

    /// The directory of cgroup `path` under `controller` (v1), or the one (v2).
    fn dir(&self, controller: &str, path: &str) -> PathBuf {
        let relative = path.trim_start_matches('/');
        match self.version {
            Version::V1 => self.root.join(controller).join(relative),
            Version::V2 => self.root.join(relative),
        }
    }

    /// Every directory of cgroup `path`.
    fn dirs(&self, path: &str) -> Vec<PathBuf> {
        match self.version {
            Version::V1 => V1_CONTROLLERS
                .iter()
                .map(|(c, _)| self.dir(c, path))
                .collect(),
            Version::V2 => vec![self.dir("", path)],
        }
    }

    /// Makes cgroup `path` afresh with `limits` in it. One left from an earlier run is
    /// removed first, so its counters never speak for this one; one that still holds
    /// processes, or a directory that is not a cgroup, is an error.
    pub fn make(&self, path: &str, limits: &Limits) -> Result<(), CgroupError> {
        self.remove(path)?;
        self.create(path)?;
        self.limit(path, limits)
    }

    /// Creates the directories of cgroup `path` (and, on v2, hands the controllers
    /// down to it).
    fn create(&self, path: &str) -> Result<(), CgroupError> {
        if self.version == Version::V2 {
            // Each level above the sandbox's hands the three controllers down.
            let leaf = self.dir("", path);
            let mut above: Vec<&Path> = leaf
                .ancestors()
                .skip(1)
                .take_while(|a| a.starts_with(&self.root))
                .collect();
            above.reverse();
            for dir in above {
                create(dir)?;
                let enabled = read(dir, "cgroup.subtree_control").unwrap_or_default();
                let missing: Vec<String> = ["memory", "pids", "cpu"]
                    .iter()
                    .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
                    .map(|c| format!("+{c}"))
                    .collect();
                if !missing.is_empty() {
                    write(dir, "cgroup.subtree_control", &missing.join(" "))?;
                }
            }
        }
        for dir in self.dirs(path) {
            create(&dir)?;
        }
        Ok(())
    }

    /// Writes `limits` into cgroup `path`, into files the kernel made and nowhere else.
    fn limit(&self, path: &str, limits: &Limits) -> Result<(), CgroupError> {
        let bytes = limits.memory_bytes.to_string();
        let count = limits.pids.to_string();
        match self.version {
            Version::V1 => {
                for (controller, file) in V1_CONTROLLERS {
                    kernel_made(&self.dir(controller, path), file)?;
                }
                let memory = self.dir("memory", path);
                write(&memory, "memory.limit_in_bytes", &bytes)?;
                // With swap accounting, memory and swap together stay within the limit.
                if memory.join("memory.memsw.limit_in_bytes").exists() {
                    write(&memory, "memory.memsw.limit_in_bytes", &bytes)?;
                }
                write(&self.dir("pids", path), "pids.max", &count)?;
                let cpu = self.dir("cpu", path);
                write(&cpu, "cpu.cfs_period_us", &limits.cpu_period_us.to_string())?;
                write(&cpu, "cpu.cfs_quota_us", &limits.cpu_quota_us.to_string())?;
            }
            Version::V2 => {
                let dir = self.dir("", path);
                for file in V2_FILES {
                    kernel_made(&dir, file)?;
                }
                write(&dir, "memory.max", &bytes)?;
                // No swap beyond the limit: the limit is what the sandbox may hold.
                if dir.join("memory.swap.max").exists() {
                    write(&dir, "memory.swap.max", "0")?;
                }
                write(&dir, "pids.max", &count)?;
                let cpu_max = format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us);
                write(&dir, "cpu.max", &cpu_max)?;
            }
        }
        Ok(())
    }

    /// What the kernel counted against cgroup `path`'s limits. A counter that cannot
    /// be read counts as nothing.
    pub fn hits(&self, path: &str) -> Hits {
        let pids_refused = field(&self.dir("pids", path), "pids.events", "max");
        let memory = self.dir("memory", path);
        let oom_kills = match self.version {
            Version::V1 => field(&memory, "memory.oom_control", "oom_kill"),
            Version::V2 => field(&memory, "memory.events", "oom_kill"),
        };
        Hits {
            oom_kills,
            pids_refused,
        }
    }

    /// Removes cgroup `path`, waiting briefly for its last processes to leave.
    /// Idempotent.
    pub fn remove(&self, path: &str) -> Result<(), CgroupError> {
        for dir in self.dirs(path) {
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

fn create(dir: &Path) -> Result<(), CgroupError> {
    std::fs::create_dir_all(dir).map_err(|source| CgroupError {
        what: "making the cgroup",
        path: dir.to_owned(),
        source,
    })
}

/// Refuses a directory the kernel did not fill: `file` is missing, so `dir` is a plain
/// directory, not a cgroup, and a limit written there would limit nothing.
fn kernel_made(dir: &Path, file: &str) -> Result<(), CgroupError> {
    match dir.join(file).exists() {
        true => Ok(()),
        false => Err(CgroupError {
            what: "not a cgroup (the controller is not mounted there):",
            path: dir.to_owned(),
            source: std::io::ErrorKind::NotFound.into(),
        }),
    }
}

/// Writes `value` into an existing file of `dir`; never creates one.
fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| CgroupError {
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

    const PATH: &str = "/ironclaw/0123456789ab/ironclaw-cg";

    fn v1(root: &Path) -> Cgroups {
        for (c, _) in V1_CONTROLLERS {
            std::fs::create_dir_all(root.join(c)).unwrap();
        }
        std::fs::write(root.join("memory/memory.limit_in_bytes"), "max").unwrap();
        Cgroups::at(root).expect("a v1 layout")
    }

    /// What the kernel does on `mkdir` in a cgroup file system: fills the directory
    /// with its controller's files.
    fn as_the_kernel_would(dirs: &[PathBuf], files: &[&str]) {
        for d in dirs {
            for f in files {
                std::fs::write(d.join(f), "").unwrap();
            }
        }
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
    fn v1_limits_go_into_each_controllers_own_files_and_counters_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let cg = v1(dir.path());
        cg.create(PATH).unwrap();
        let files = [
            "memory.limit_in_bytes",
            "memory.memsw.limit_in_bytes",
            "pids.max",
            "cpu.cfs_quota_us",
            "cpu.cfs_period_us",
        ];
        as_the_kernel_would(&cg.dirs(PATH), &files);
        cg.limit(PATH, &Limits::default()).unwrap();
        let at = |c: &str, f: &str| std::fs::read_to_string(cg.dir(c, PATH).join(f)).unwrap();
        assert_eq!(at("memory", "memory.limit_in_bytes"), "268435456");
        assert_eq!(at("memory", "memory.memsw.limit_in_bytes"), "268435456");
        assert_eq!(at("pids", "pids.max"), "512");
        assert_eq!(at("cpu", "cpu.cfs_quota_us"), "100000");
        assert!(!cg.hits(PATH).any());

        // Reaching the memory limit is not a limit kill; an OOM kill or a refused fork is.
        let memory = cg.dir("memory", PATH);
        std::fs::write(memory.join("memory.failcnt"), "13\n").unwrap();
        assert!(!cg.hits(PATH).any());
        std::fs::write(
            memory.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        std::fs::write(cg.dir("pids", PATH).join("pids.events"), "max 7\n").unwrap();
        assert_eq!(
            cg.hits(PATH),
            Hits {
                oom_kills: 2,
                pids_refused: 7
            }
        );
    }

    #[test]
    fn v2_limits_and_counters_live_in_one_directory_with_the_controllers_handed_down() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "memory pids").unwrap();
        let cg = Cgroups::at(dir.path()).unwrap();
        // The levels above the leaf as the kernel keeps them, with nothing handed down.
        let parents = [
            dir.path().join("ironclaw"),
            dir.path().join("ironclaw/0123456789ab"),
        ];
        for p in &parents {
            std::fs::create_dir_all(p).unwrap();
        }
        as_the_kernel_would(&parents, &["cgroup.subtree_control"]);
        cg.create(PATH).unwrap();
        let leaf = cg.dir("", PATH);
        as_the_kernel_would(
            std::slice::from_ref(&leaf),
            &["memory.max", "pids.max", "cpu.max"],
        );
        let limits = Limits {
            memory_bytes: 1 << 20,
            pids: 9,
            cpu_quota_us: 50_000,
            ..Limits::default()
        };
        cg.limit(PATH, &limits).unwrap();
        let at = |f: &str| std::fs::read_to_string(leaf.join(f)).unwrap();
        assert_eq!(at("memory.max"), "1048576");
        assert_eq!(at("pids.max"), "9");
        assert_eq!(at("cpu.max"), "50000 100000");
        // Only what is missing is asked for, at each level above the leaf.
        let control = |d: &Path| std::fs::read_to_string(d.join("cgroup.subtree_control")).unwrap();
        assert_eq!(control(dir.path()), "+cpu");
        assert_eq!(control(&dir.path().join("ironclaw")), "+memory +pids +cpu");
        assert_eq!(
            control(&dir.path().join("ironclaw/0123456789ab")),
            "+memory +pids +cpu"
        );
        std::fs::write(
            leaf.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(
            cg.hits(PATH),
            Hits {
                oom_kills: 1,
                pids_refused: 0
            }
        );
    }

    #[test]
    fn a_directory_that_is_not_a_cgroup_is_never_given_limits() {
        // A writable tmpfs where the pids controller is not mounted: the directory is
        // made, but the kernel puts nothing in it.
        let dir = tempfile::tempdir().unwrap();
        let cg = v1(dir.path());
        let e = cg.make(PATH, &Limits::default()).unwrap_err();
        assert!(e.to_string().starts_with("not a cgroup"), "{e}");
        assert!(
            !cg.dir("memory", PATH)
                .join("memory.limit_in_bytes")
                .exists(),
            "no file written"
        );
    }

    #[test]
    fn removal_is_idempotent_and_a_cgroup_that_cannot_go_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cg = v1(dir.path());
        cg.remove(PATH).unwrap();
        // In a plain directory a file stands for a process: the directory is not
        // empty, so it cannot be removed, as a busy cgroup cannot.
        cg.create(PATH).unwrap();
        std::fs::write(cg.dir("pids", PATH).join("held"), "").unwrap();
        let e = cg.remove(PATH).unwrap_err();
        assert!(e.to_string().starts_with("removing the cgroup"), "{e}");
        assert!(
            cg.make(PATH, &Limits::default()).is_err(),
            "never made over a live one"
        );
    }
}
