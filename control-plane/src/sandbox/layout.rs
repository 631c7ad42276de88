//! Where a session's files live. Every path is built from a validated [`SessionId`].
//!
//! ```text
//! <state>/rootfs/ironclaw-agent            shared read-only root: the agent binary only
//! <state>/runsc/                           runsc's own state (--root)
//! <state>/sessions/<id>/inbox.d/           inbox segments (mounted read-only at /inbox)
//! <state>/sessions/<id>/outbox.d/          outbox segments (mounted at /outbox, owned by the agent uid)
//! <state>/sessions/<id>/private/           where hostile outbox segments are copied to be parsed
//! <state>/sessions/<id>/bundle/config.json the OCI bundle
//! <run>/<id>/proxy.sock                    the session's only way out
//! ```

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use queue_proto::ids::SessionId;
use runsc_config::{AGENT_PATH, MOUNT_POINTS};

/// The directory layout under a state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    state_dir: PathBuf,
    run_dir: PathBuf,
}

impl Layout {
    pub fn new(state_dir: &Path, run_dir: &Path) -> Self {
        Layout {
            state_dir: state_dir.to_owned(),
            run_dir: run_dir.to_owned(),
        }
    }
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
    pub fn rootfs(&self) -> PathBuf {
        self.state_dir.join("rootfs")
    }
    pub fn runsc_root(&self) -> PathBuf {
        self.state_dir.join("runsc")
    }
    pub fn session_dir(&self, s: &SessionId) -> PathBuf {
        self.state_dir.join("sessions").join(s.as_str())
    }
    pub fn inbox(&self, s: &SessionId) -> PathBuf {
        self.session_dir(s).join("inbox.d")
    }
    pub fn outbox(&self, s: &SessionId) -> PathBuf {
        self.session_dir(s).join("outbox.d")
    }
    pub fn private(&self, s: &SessionId) -> PathBuf {
        self.session_dir(s).join("private")
    }
    pub fn bundle(&self, s: &SessionId) -> PathBuf {
        self.session_dir(s).join("bundle")
    }
    pub fn socket_dir(&self, s: &SessionId) -> PathBuf {
        self.run_dir.join(s.as_str())
    }
}

fn dir(path: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Installs the shared read-only root: the agent binary (root-owned, 0555) and the empty
/// mount points, nothing else. The binary is copied under a temporary name and renamed,
/// so a running sandbox never sees a half-written file.
pub fn install_rootfs(layout: &Layout, agent_binary: &Path) -> io::Result<()> {
    let root = layout.rootfs();
    dir(&root, 0o755)?;
    for m in MOUNT_POINTS {
        dir(&root.join(m.trim_start_matches('/')), 0o755)?;
    }
    let dest = root.join(AGENT_PATH.trim_start_matches('/'));
    let tmp = root.join(".ironclaw-agent.tmp");
    fs::copy(agent_binary, &tmp)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o555))?;
    fs::rename(&tmp, &dest)
}

/// Creates a session's directories with their owners and modes: the inbox and private
/// directories root-only writable, the outbox owned by the agent's uid, the socket
/// directory searchable by the agent but writable only by root.
pub fn prepare_session(layout: &Layout, s: &SessionId, uid: u32, gid: u32) -> io::Result<()> {
    dir(&layout.session_dir(s), 0o711)?;
    dir(&layout.inbox(s), 0o755)?;
    dir(&layout.private(s), 0o700)?;
    dir(&layout.bundle(s), 0o700)?;
    dir(&layout.outbox(s), 0o700)?;
    std::os::unix::fs::chown(layout.outbox(s), Some(uid), Some(gid))?;
    dir(&layout.socket_dir(s), 0o711)
}
