//! The agent's half of the queues: it reads its inbox and writes its outbox. Compiled
//! only with the `agent` feature; there is no inbox writer here to call.

use std::path::PathBuf;

use crate::ids::{Direction, Seq, SessionId};
use crate::items::{InboxItem, OutboxItem};
use crate::keys::{QueueKeys, SessionKeys};
use crate::segment::{self, FileCipher, Place, SegmentError};

/// Reads the session's inbox (mounted read-only at `/inbox`).
#[derive(Debug)]
pub struct InboxReader {
    dir: PathBuf,
    session: SessionId,
    keys: QueueKeys,
}

impl InboxReader {
    pub fn new(dir: PathBuf, session: SessionId, keys: &SessionKeys) -> Self {
        Self {
            dir,
            session,
            keys: keys.inbox.clone(),
        }
    }

    /// Published inbox seqs after `after`, in order.
    pub fn list_after(&self, after: Option<Seq>) -> Result<Vec<Seq>, SegmentError> {
        segment::list_after(&self.dir, after)
    }

    /// Opens segment `seq` read-only and returns its items.
    pub fn read(&self, seq: Seq) -> Result<Vec<InboxItem>, SegmentError> {
        let place = Place {
            session: &self.session,
            direction: Direction::Inbox,
            seq,
        };
        segment::read(
            &self.dir.join(seq.file_name()),
            place,
            &self.keys,
            FileCipher::SqlCipher,
        )
    }
}

/// Publishes the session's outbox segments (in `/outbox`).
#[derive(Debug)]
pub struct OutboxWriter {
    dir: PathBuf,
    session: SessionId,
    keys: QueueKeys,
}

impl OutboxWriter {
    pub fn new(dir: PathBuf, session: SessionId, keys: &SessionKeys) -> Self {
        Self {
            dir,
            session,
            keys: keys.outbox.clone(),
        }
    }

    /// Published outbox seqs still waiting to be taken in (the control plane removes
    /// each one it has ingested).
    pub fn pending(&self) -> Result<Vec<Seq>, SegmentError> {
        segment::list_after(&self.dir, None)
    }

    /// Publishes `items` as outbox segment `seq`: atomically, but not fsynced. Each sync
    /// is a round trip through gVisor's gofer, and the control plane does not rely on
    /// the agent's segments surviving a power cut: a message whose reply is lost there
    /// stays unanswered and fails with a notice at its timeout.
    pub fn publish(&self, seq: Seq, items: &[OutboxItem]) -> Result<PathBuf, SegmentError> {
        let place = Place {
            session: &self.session,
            direction: Direction::Outbox,
            seq,
        };
        segment::publish(
            &self.dir,
            place,
            &self.keys,
            FileCipher::SqlCipher,
            segment::Durability::Unsynced,
            items,
        )
    }
}
