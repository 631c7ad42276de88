//! The state directory: where the configuration, the master key, the control store,
//! the sessions and the sockets live, and `ironclaw init`, which creates it.
//!
//! ```text
//! <state>/config.toml     the bootstrap configuration (0600)
//! <state>/master.key      the master key, 64 hex digits (0400), unless systemd passes
//!                         it as the credential `master-key`
//! <state>/control.db      the control store (SQLCipher)
//! <state>/run/admin.sock  the local admin socket (0600)
//! <state>/serve.lock      locked by the one `serve` of this directory; holds its pid
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use queue_proto::keys::{KEY_BYTES, MasterKey};
use zeroize::Zeroizing;

use crate::audit::AuditEvent;
use crate::config::DEFAULT_CONFIG;
use crate::store::{STORE_FILE, Store, StoreError};

/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ironclaw";
/// The environment variable that overrides it.
pub const STATE_DIR_ENV: &str = "IRONCLAW_STATE_DIR";
/// The systemd credential holding the master key.
pub const MASTER_KEY_CREDENTIAL: &str = "master-key";

/// Why the state directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path} already holds an IronClaw state directory; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("creating {path} failed")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the master key {path} failed")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the master key {path} is not 64 hex digits or 32 bytes")]
    MalformedKey { path: PathBuf },
    #[error(
        "the master key {path} is readable or writable by others (mode {mode:o}); make it 0400"
    )]
    ExposedKey { path: PathBuf, mode: u32 },
    #[error("no randomness for a new master key")]
    Random,
    #[error(
        "another `ironclaw serve` ({}) is already running with the state directory {root}; stop it first",
        pid.map_or("pid unknown".to_owned(), |p| format!("pid {p}"))
    )]
    Busy { root: PathBuf, pid: Option<u32> },
    #[error("locking {path} failed")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A state directory taken by one `serve` (see [`StateDir::lock_for_serve`]).
#[derive(Debug)]
pub struct ServeLock {
    _file: fs::File,
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Paths inside one state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// `--state-dir`, else `$IRONCLAW_STATE_DIR`, else `/var/lib/ironclaw`.
    pub fn choose(flag: Option<PathBuf>) -> StateDir {
        let root = flag
            .or_else(|| std::env::var_os(STATE_DIR_ENV).map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        StateDir { root }
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// Locked by the one `serve` of this state directory for its whole life.
    pub fn serve_lock(&self) -> PathBuf {
        self.root.join("serve.lock")
    }

    /// Takes this state directory for one `serve`: an exclusive lock on
    /// [`serve_lock`](Self::serve_lock), held until the returned guard is dropped (or
    /// the process ends, however it ends), with the pid written into it. A second
    /// `serve` is refused before it touches anything, the first one's admin socket
    /// included.
    pub fn lock_for_serve(&self) -> Result<ServeLock, StateError> {
        let path = self.serve_lock();
        let failed = |source| StateError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(failed)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StateError::Busy {
                    root: self.root.clone(),
                    pid: read_pid(&path),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(failed(e)),
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(failed)?;
        Ok(ServeLock { _file: file })
    }

    /// The pid of the `serve` running with this state directory, if one is (0 if its
    /// pid cannot be read); `Err` when that cannot be told (this user cannot open the
    /// lock file).
    pub fn serve_pid(&self) -> std::io::Result<Option<u32>> {
        let path = self.serve_lock();
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(None),
            Err(fs::TryLockError::WouldBlock) => Ok(read_pid(&path).or(Some(0))),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
    pub fn store(&self) -> PathBuf {
        self.root.join(STORE_FILE)
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.run_dir().join("admin.sock")
    }

    /// Creates the directory (0700), a fresh master key (0400), the default
    /// configuration (0600) and an empty control store. Refuses to touch a directory
    /// that already holds a key, a store or a configuration.
    pub fn init(&self) -> Result<(), StateError> {
        for existing in [self.master_key(), self.store(), self.config()] {
            if existing.exists() {
                return Err(StateError::Exists {
                    path: self.root.clone(),
                });
            }
        }
        let create = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Create { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(create(&self.root))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(create(&self.root))?;
        let master = MasterKey::generate().map_err(|_| StateError::Random)?;
        let hex_key = Zeroizing::new(format!("{}\n", hex::encode(master.expose_secret())));
        write_new(&self.master_key(), hex_key.as_bytes(), 0o400)
            .map_err(create(&self.master_key()))?;
        write_new(&self.config(), DEFAULT_CONFIG.as_bytes(), 0o600)
            .map_err(create(&self.config()))?;
        let now = now_secs();
        let mut store = Store::create(&self.store(), &master, now)?;
        store.record(AuditEvent::Initialised, &serde_json::json!({}), now)?;
        Ok(())
    }

    /// The master key: systemd's credential if one is passed, else `master.key`.
    pub fn load_master_key(&self) -> Result<MasterKey, StateError> {
        let path = std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|d| PathBuf::from(d).join(MASTER_KEY_CREDENTIAL))
            .filter(|p| p.exists())
            .unwrap_or_else(|| self.master_key());
        read_master_key(&path)
    }
}

/// Reads a master key file: 64 hex digits (a trailing newline allowed) or 32 raw bytes,
/// not readable or writable by group or others.
pub fn read_master_key(path: &Path) -> Result<MasterKey, StateError> {
    let read = |source| StateError::ReadKey {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read)?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StateError::ExposedKey {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = Zeroizing::new(fs::read(path).map_err(read)?);
    let malformed = || StateError::MalformedKey {
        path: path.to_owned(),
    };
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    if bytes.len() == KEY_BYTES {
        key.copy_from_slice(&bytes);
    } else {
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| malformed())?
            .trim_end();
        hex::decode_to_slice(text, key.as_mut_slice()).map_err(|_| malformed())?;
    }
    Ok(MasterKey::from_bytes(*key))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_a_private_directory_and_refuses_a_second_time() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir {
            root: dir.path().join("s"),
        };
        state.init().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&state.root), 0o700);
        assert_eq!(mode(&state.master_key()), 0o400);
        assert_eq!(mode(&state.config()), 0o600);
        let key = state.load_master_key().unwrap();
        Store::open(&state.store(), &key).unwrap();
        assert!(matches!(state.init(), Err(StateError::Exists { .. })));
        // Another key does not open the store.
        let other = MasterKey::generate().unwrap();
        assert!(Store::open(&state.store(), &other).is_err());
    }

    #[test]
    fn an_exposed_or_malformed_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, "00".repeat(32)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_master_key(&p),
            Err(StateError::ExposedKey { .. })
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_master_key(&p).is_ok());
        fs::write(&p, "zz").unwrap();
        assert!(matches!(
            read_master_key(&p),
            Err(StateError::MalformedKey { .. })
        ));
    }
}
