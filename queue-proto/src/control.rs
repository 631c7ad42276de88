//! The control plane's half of the queues: it writes inboxes and reads outboxes.
//! Compiled only with the `control-plane` feature, which the agent never enables.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::ids::{Direction, Seq, SessionId};
use crate::items::{InboxItem, OutboxItem};
use crate::keys::{QueueKeys, SessionKeys};
use crate::segment::{self, FileCipher, MAX_SEGMENT_BYTES, Place, SegmentError};

/// The published inbox seqs in `dir`, in order (for waking the agent).
pub fn list_inbox(dir: &Path) -> Result<Vec<Seq>, SegmentError> {
    segment::list_after(dir, None)
}

/// Publishes inbox segments for one session.
#[derive(Debug)]
pub struct InboxWriter {
    dir: PathBuf,
    session: SessionId,
    keys: QueueKeys,
    cipher: FileCipher,
}

impl InboxWriter {
    /// A writer for `session`'s inbox directory `dir` (the one mounted at `/inbox`).
    pub fn new(dir: PathBuf, session: SessionId, keys: &SessionKeys) -> Self {
        Self {
            dir,
            session,
            keys: keys.inbox.clone(),
            cipher: FileCipher::SqlCipher,
        }
    }

    /// Publishes `items` as segment `seq`. The segment must not exist yet.
    pub fn publish(&self, seq: Seq, items: &[InboxItem]) -> Result<PathBuf, SegmentError> {
        let place = Place {
            session: &self.session,
            direction: Direction::Inbox,
            seq,
        };
        segment::publish(
            &self.dir,
            place,
            &self.keys,
            self.cipher,
            segment::Durability::Synced,
            items,
        )
    }

    /// The same writer with SQLCipher turned off, for the benchmark's plain-SQLite
    /// comparison only.
    #[cfg(feature = "plain-files")]
    pub fn without_file_encryption(mut self) -> Self {
        self.cipher = FileCipher::Plain;
        self
    }
}

/// Reads outbox segments of one session, treating each as hostile input.
#[derive(Debug)]
pub struct OutboxReader {
    dir: PathBuf,
    private_dir: PathBuf,
    session: SessionId,
    keys: QueueKeys,
    cipher: FileCipher,
}

impl OutboxReader {
    /// A reader for `session`'s outbox directory `dir` (mounted rw in the sandbox).
    /// `private_dir` must be a directory the agent cannot reach; segments are copied
    /// there before they are opened, so the agent cannot change a file mid-parse.
    pub fn new(dir: PathBuf, private_dir: PathBuf, session: SessionId, keys: &SessionKeys) -> Self {
        Self {
            dir,
            private_dir,
            session,
            keys: keys.outbox.clone(),
            cipher: FileCipher::SqlCipher,
        }
    }

    /// Published outbox seqs after `after`, in order.
    pub fn list_after(&self, after: Option<Seq>) -> Result<Vec<Seq>, SegmentError> {
        segment::list_after(&self.dir, after)
    }

    /// Copies segment `seq` to the private directory, then validates and opens every
    /// item in it.
    pub fn read(&self, seq: Seq) -> Result<Vec<OutboxItem>, SegmentError> {
        let src = self.dir.join(seq.file_name());
        let copy = PrivateCopy::take(&src, &self.private_dir, seq)?;
        let place = Place {
            session: &self.session,
            direction: Direction::Outbox,
            seq,
        };
        segment::read(&copy.path, place, &self.keys, self.cipher)
    }

    /// The same reader expecting plain-SQLite files, so the fuzz targets can reach the
    /// checks that lie behind decryption.
    #[cfg(feature = "plain-files")]
    pub fn without_file_encryption(mut self) -> Self {
        self.cipher = FileCipher::Plain;
        self
    }

    /// The size of segment `seq` as it stands now, if it is a regular file: what a
    /// budget charges (the copy that is parsed is capped on its own).
    pub fn size(&self, seq: Seq) -> Option<u64> {
        fs::symlink_metadata(self.dir.join(seq.file_name()))
            .ok()
            .filter(fs::Metadata::is_file)
            .map(|m| m.len())
    }

    /// Removes segment `seq` after its items are durable in the control store.
    pub fn remove(&self, seq: Seq) -> Result<(), SegmentError> {
        let path = self.dir.join(seq.file_name());
        fs::remove_file(&path).map_err(|source| SegmentError::Io {
            op: "remove",
            path,
            source,
        })
    }
}

/// A private copy of a hostile file, removed when dropped.
struct PrivateCopy {
    path: PathBuf,
}

impl PrivateCopy {
    /// Opens `src` without following a symlink and without blocking on a FIFO, insists
    /// on a regular file within the size cap, and copies at most the cap into a fresh
    /// 0600 file in `private_dir`.
    fn take(src: &Path, private_dir: &Path, seq: Seq) -> Result<PrivateCopy, SegmentError> {
        let io_err = |op, path: &Path| {
            let path = path.to_owned();
            move |source| SegmentError::Io { op, path, source }
        };
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(src)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => SegmentError::NotRegularFile {
                    path: src.to_owned(),
                },
                _ => io_err("open", src)(e),
            })?;
        let meta = file.metadata().map_err(io_err("stat", src))?;
        if !meta.file_type().is_file() {
            return Err(SegmentError::NotRegularFile {
                path: src.to_owned(),
            });
        }
        if meta.len() > MAX_SEGMENT_BYTES {
            return Err(SegmentError::TooLarge {
                path: src.to_owned(),
                bytes: meta.len(),
                max: MAX_SEGMENT_BYTES,
            });
        }
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce)
            .map_err(|e| io_err("name a private copy of", src)(io::Error::other(e)))?;
        let path = private_dir.join(format!(".ingest-{seq}-{}", hex::encode(nonce)));
        let mut dst = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let copy = PrivateCopy { path };
        let copied = io::copy(&mut (&mut file).take(MAX_SEGMENT_BYTES + 1), &mut dst)
            .map_err(io_err("copy", src))?;
        if copied > MAX_SEGMENT_BYTES {
            return Err(SegmentError::TooLarge {
                path: src.to_owned(),
                bytes: copied,
                max: MAX_SEGMENT_BYTES,
            });
        }
        Ok(copy)
    }
}

impl Drop for PrivateCopy {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
