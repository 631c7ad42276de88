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
    /// A short name of this state directory (12 hex digits of its path's SHA-256):
    /// what names its own network namespace and the parent of its sandboxes' cgroups.
    pub fn instance(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.state_dir.as_os_str().as_encoded_bytes());
        hex::encode(digest)[..12].to_owned()
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
    /// Where each uid given to a session is claimed (see [`session_ids`]).
    pub fn uid_claims(&self) -> PathBuf {
        self.state_dir.join("uids")
    }
    /// The file holding the outbox's own file system, when it has one.
    pub fn outbox_image(&self, s: &SessionId) -> PathBuf {
        self.session_dir(s).join("outbox.img")
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

/// How many uids sessions may be given from a base.
pub const UID_RANGE: u32 = 65_536;

/// The uid (and gid, the same number) of session `s`: given once from `base` onwards,
/// never to another session, and kept. A uid is claimed by creating an empty `uids/<uid>` with
/// `O_EXCL` (so two sessions started at once cannot take the same one) and recorded in
/// the session's `uid` file; a deleted session's uid is not given again.
pub fn session_ids(layout: &Layout, s: &SessionId, base: u32) -> io::Result<(u32, u32)> {
    let record = layout.session_dir(s).join("uid");
    if let Ok(text) = fs::read_to_string(&record)
        && let Ok(uid) = text.trim().parse::<u32>()
        && (base..base.saturating_add(UID_RANGE)).contains(&uid)
    {
        return Ok((uid, uid));
    }
    let claims = layout.uid_claims();
    dir(&claims, 0o700)?;
    let highest = fs::read_dir(&claims)?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|u| *u >= base)
        .max();
    let mut uid = highest.map_or(base, |h| h.saturating_add(1));
    loop {
        if uid >= base.saturating_add(UID_RANGE) {
            return Err(io::Error::other(format!(
                "every uid from {base} to {} is given to a session",
                base.saturating_add(UID_RANGE - 1)
            )));
        }
        match std::os::unix::fs::OpenOptionsExt::mode(
            fs::OpenOptions::new().write(true).create_new(true),
            0o600,
        )
        .open(claims.join(uid.to_string()))
        {
            // The claim names no session: a deleted one leaves no trace of its name.
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => uid += 1,
            Err(e) => return Err(e),
        }
    }
    dir(&layout.session_dir(s), 0o711)?;
    let tmp = layout.session_dir(s).join(".uid.tmp");
    fs::write(&tmp, uid.to_string())?;
    fs::rename(&tmp, &record)?;
    Ok((uid, uid))
}

/// Gives the session's outbox a file system of its own, `bytes` large, so its agent can
/// fill nothing but that: an ext4 image reserved on disk in full when it is made
/// (`fallocate`, so no later write of anyone else can take its room), mounted over
/// `outbox.d` with `nosuid,nodev,noexec`, its root owned by the agent's uid and 0700.
/// Idempotent: an outbox that is a mount point already is left as it is. What an
/// outbox held before it had a file system of its own is moved into the new one.
pub fn limit_outbox(
    layout: &Layout,
    s: &SessionId,
    bytes: u64,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    let outbox = layout.outbox(s);
    if is_mount_point(&outbox)? {
        return Ok(());
    }
    let image = layout.outbox_image(s);
    if !image.exists() {
        // Made and filled under a temporary name, and renamed only once whole: a crash
        // or a failed copy never leaves an image that would hide what it should hold.
        let tmp = layout.session_dir(s).join(".outbox.img.tmp");
        let _ = fs::remove_file(&tmp);
        command(
            "fallocate",
            &["-l".as_ref(), bytes.to_string().as_ref(), tmp.as_os_str()],
        )?;
        let owner = format!("root_owner={uid}:{gid},nodiscard");
        command(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-m".as_ref(),
                "0".as_ref(),
                "-E".as_ref(),
                owner.as_ref(),
                tmp.as_os_str(),
            ],
        )?;
        if fs::read_dir(&outbox)?.next().is_some() {
            move_into_image(layout, s, &tmp, uid, gid)?;
        }
        fs::rename(&tmp, &image)?;
    }
    mount(&image, &outbox)?;
    // An image made for another uid (a session from before uids were its own) is
    // handed over whole.
    if std::os::unix::fs::MetadataExt::uid(&fs::metadata(&outbox)?) != uid {
        chown_tree(&outbox, uid, gid)?;
    }
    fs::set_permissions(&outbox, fs::Permissions::from_mode(0o700))
}

/// Gives everything under `dir` to `uid:gid`, following no symbolic link.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let owner = format!("{uid}:{gid}");
    command(
        "chown",
        &[
            "-R".as_ref(),
            "-P".as_ref(),
            owner.as_ref(),
            dir.as_os_str(),
        ],
    )
}

/// Copies what `outbox.d` holds into the file system in `image` (through a mount of its
/// own), hands it to the session's uid, then empties `outbox.d`, so nothing is lost or
/// left hidden under the mount. A copy that does not fit fails, and nothing is mounted.
fn move_into_image(
    layout: &Layout,
    s: &SessionId,
    image: &Path,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    let outbox = layout.outbox(s);
    let staging = layout.session_dir(s).join(".outbox.move");
    dir(&staging, 0o700)?;
    mount(image, &staging)?;
    let copied = command(
        "cp",
        &[
            "-a".as_ref(),
            outbox.join(".").as_os_str(),
            staging.as_os_str(),
        ],
    )
    .and_then(|()| chown_tree(&staging, uid, gid));
    let unmounted = command("umount", &[staging.as_os_str()]);
    copied?;
    unmounted?;
    fs::remove_dir(&staging)?;
    for entry in fs::read_dir(&outbox)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Unmounts the session's outbox file system, if it has one mounted.
pub fn release_outbox(layout: &Layout, s: &SessionId) -> io::Result<()> {
    let outbox = layout.outbox(s);
    if outbox.exists() && is_mount_point(&outbox)? {
        // A file system still busy is detached now and let go when its last user ends,
        // so nothing removed after this lands inside it.
        command("umount", &[outbox.as_os_str()])
            .or_else(|_| command("umount", &["-l".as_ref(), outbox.as_os_str()]))?;
    }
    Ok(())
}

/// Whether `path` is where another file system is mounted (its device differs from its
/// parent's).
fn is_mount_point(path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let parent = path.parent().unwrap_or(path);
    Ok(fs::metadata(path)?.dev() != fs::metadata(parent)?.dev())
}

fn mount(image: &Path, at: &Path) -> io::Result<()> {
    command(
        "mount",
        &[
            "-o".as_ref(),
            "loop,nosuid,nodev,noexec".as_ref(),
            image.as_os_str(),
            at.as_os_str(),
        ],
    )
}

/// Runs a host tool to completion (no time limit: copying an outbox may take long) with
/// the runtimes' cleared environment; its failure is an error naming it.
fn command(program: &str, args: &[&std::ffi::OsStr]) -> io::Result<()> {
    let out = std::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", super::runtime::CHILD_PATH)
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    )))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_session_gets_a_uid_of_its_own_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path(), &dir.path().join("run"));
        let id = |n: &str| SessionId::try_from(n).unwrap();
        let a = session_ids(&layout, &id("a"), 300_000).unwrap();
        let b = session_ids(&layout, &id("b"), 300_000).unwrap();
        assert_eq!(a, (300_000, 300_000));
        assert_eq!(b, (300_001, 300_001));
        assert_eq!(session_ids(&layout, &id("a"), 300_000).unwrap(), a, "kept");
        // A deleted session's uid is not given again.
        fs::remove_dir_all(layout.session_dir(&id("a"))).unwrap();
        assert_eq!(session_ids(&layout, &id("c"), 300_000).unwrap().0, 300_002);
        assert_eq!(session_ids(&layout, &id("a"), 300_000).unwrap().0, 300_003);
        // A uid outside a new base is given again from that base.
        assert_eq!(session_ids(&layout, &id("b"), 400_000).unwrap().0, 400_000);
    }
}
