//! The control store: one SQLCipher database under the control-store key, the authority
//! for sessions and their channel bindings, every accepted message and where it stands,
//! the replies waiting for delivery, `schedule` timers, cursors (the Telegram offset),
//! the gateway's records and the audit trail. Every change is one transaction together
//! with its audit entry; inbox segments are published from what this store says.
//!
//! This module opens the store and runs its transactions; each table has a module of
//! its own, and [`state`] is the one place where the states of rows are spelled:
//!
//! - [`sessions`]: sessions, their salts and counts, and deletion;
//! - [`messages`]: messages from people, accepted or refused, published in batches,
//!   failed with a notice;
//! - [`ingest`]: an agent's outbox segment taken in, once;
//! - [`outbound`]: the replies, notices and reminders waiting for delivery;
//! - [`timers`]: `schedule` timers, fired into the outbound queue;
//! - [`cursors`]: a channel's offset and the configuration file last looked at;
//! - [`changes`]: approved configuration versions, change requests, decisions, prompts
//!   and agent turns.
//!
//! No function here reads the clock: every time is passed in by the caller.

use std::path::Path;

use queue_proto::keys::{MasterKey, derive_audit_head_key, derive_control_store_key};
use rusqlite::{Connection, Transaction};
use serde_json::json;

use crate::audit::{self, AuditEvent};

pub mod attachments;
pub mod changes;
pub mod cursors;
pub mod ingest;
pub mod messages;
pub mod outbound;
pub mod sessions;
pub mod state;
pub mod timers;
pub mod usage;
pub mod web;

/// The file name of the control store inside the state directory.
pub const STORE_FILE: &str = "control.db";

/// Why the control store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the control store {path} failed (wrong master key, or not a control store)")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the control store {path} does not exist or was never initialised (run `ironclaw init`)"
    )]
    NotInitialised { path: std::path::PathBuf },
    #[error(
        "the control store has no approved configuration, but its audit trail records one: it was changed outside ironclaw"
    )]
    VersionsMissing,
    #[error("a control store query failed")]
    Query(#[from] rusqlite::Error),
    #[error("the control store holds an invalid session name")]
    BadSession,
    #[error("the operating system gave no randomness for a new salt or id")]
    NoRandomness,
    #[error(
        "the control store's write-ahead log is held by another reader and could not be folded back; deleted rows stay in it until the next checkpoint"
    )]
    WalBusy,
}

/// The open control store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// False while (or if, after a failure) the connection may not be back at
    /// `synchronous = FULL`: the next transaction restores it first.
    synced: bool,
}

impl Store {
    /// Creates the store at `path` (for `init`, at time `now`): its tables and the
    /// first audit entry.
    pub fn create(path: &Path, master: &MasterKey, now: i64) -> Result<Store, StoreError> {
        Store::open_with(path, master, Some(now))
    }

    /// Opens the store `init` created at `path` under the master key's control-store
    /// key. A missing file, or one without tables, is an error: an emptied store must
    /// never look like a new one.
    pub fn open(path: &Path, master: &MasterKey) -> Result<Store, StoreError> {
        if !path.is_file() {
            return Err(StoreError::NotInitialised {
                path: path.to_owned(),
            });
        }
        Store::open_with(path, master, None)
    }

    fn open_with(
        path: &Path,
        master: &MasterKey,
        create: Option<i64>,
    ) -> Result<Store, StoreError> {
        let open = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let key = derive_control_store_key(master);
        let conn = queue_proto::sqlcipher::open_keyed(path, &key).map_err(open)?;
        // Every commit that changes what the outside world is told (a message accepted,
        // the Telegram offset, a reply taken in or being sent) is synced (WAL with
        // synchronous FULL), so not even a power cut can undo what was confirmed; only
        // audit-only entries skip the sync (see `record`). secure_delete overwrites
        // freed content, so a deleted session's salt does not linger in free pages.
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON;",
        )
        .map_err(open)?;
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(open)?;
        if (tables == 0) != create.is_some() {
            return Err(if create.is_some() {
                StoreError::Open {
                    path: path.to_owned(),
                    source: rusqlite::Error::InvalidPath(path.to_owned()),
                }
            } else {
                StoreError::NotInitialised {
                    path: path.to_owned(),
                }
            });
        }
        audit::install_seal(&conn, derive_audit_head_key(master)).map_err(open)?;
        let mut store = Store { conn, synced: true };
        // The tables and the trail's first entry are made in one transaction, so a crash
        // in `init` never leaves tables without a trail; an emptied trail never looks
        // intact.
        let tx = store.tx().map_err(open)?;
        for schema in [
            sessions::SCHEMA,
            messages::SCHEMA,
            outbound::SCHEMA,
            ingest::SCHEMA,
            timers::SCHEMA,
            cursors::SCHEMA,
            audit::SCHEMA,
            changes::SCHEMA,
            usage::SCHEMA,
            attachments::SCHEMA,
            web::SCHEMA,
        ] {
            tx.execute_batch(schema).map_err(open)?;
        }
        ingest::upgrade(&tx).map_err(open)?;
        timers::upgrade(&tx).map_err(open)?;
        sessions::upgrade(&tx).map_err(open)?;
        if let Some(now) = create {
            audit::append(&tx, now, AuditEvent::StoreCreated, &json!({})).map_err(open)?;
        }
        tx.commit().map_err(open)?;
        Ok(store)
    }

    /// Checks the audit trail and its sealed head.
    pub fn verify_audit(&self, master: &MasterKey) -> Result<u64, audit::ChainError> {
        audit::verify(&self.conn, &derive_audit_head_key(master))
    }

    /// The connection, for the audit functions and tests.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    fn tx(&mut self) -> rusqlite::Result<Transaction<'_>> {
        if !self.synced {
            self.conn.execute_batch("PRAGMA synchronous = FULL")?;
            self.synced = true;
        }
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
    }

    /// Appends an audit entry on its own (an event with no other state change).
    pub fn record(
        &mut self,
        kind: AuditEvent,
        detail: &serde_json::Value,
        now: i64,
    ) -> Result<(), StoreError> {
        // An entry that only records is not worth a sync of its own: the next synced
        // commit carries it to the disk.
        self.unsynced(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            audit::append(&tx, now, kind, detail)?;
            tx.commit()
        })
    }

    /// Runs `f` with commits that are not synced: for changes whose loss in a power cut
    /// costs nothing that matters (an audit-only entry).
    fn unsynced<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        // Cleared first: if anything below fails or panics, the next transaction puts
        // FULL back before it begins.
        self.synced = false;
        self.conn.execute_batch("PRAGMA synchronous = NORMAL")?;
        let done = f(&mut self.conn);
        self.conn.execute_batch("PRAGMA synchronous = FULL")?;
        self.synced = true;
        Ok(done?)
    }
}

/// What the tables' tests share: a fresh store, and the calls that put a message in.
#[cfg(test)]
pub(crate) mod testing {
    use queue_proto::ids::SessionId;
    use queue_proto::keys::MasterKey;

    use super::Store;
    use super::cursors::Cursor;
    use super::messages::{Accepted, Inbound};

    /// The master key of every test store.
    pub(crate) fn master() -> MasterKey {
        MasterKey::from_bytes([1; 32])
    }

    pub(crate) fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::create(&dir.path().join("c.db"), &master(), 1).unwrap();
        (dir, s)
    }

    pub(crate) fn id(name: &str) -> SessionId {
        SessionId::try_from(name).unwrap()
    }

    pub(crate) fn inbound(chat: &str, ext: Option<&str>, text: &str) -> Inbound {
        Inbound {
            channel: "telegram".into(),
            chat: chat.into(),
            external_id: ext.map(str::to_owned),
            text: text.into(),
            received_at: 100,
            files: Vec::new(),
        }
    }

    /// Binds session `session` to the Telegram chat of the same name and offers it a
    /// message, moving the cursor to 9.
    pub(crate) fn accept(s: &mut Store, session: &str, ext: Option<&str>, max: u32) -> Accepted {
        let sid = id(session);
        s.bind(&sid, "telegram", session, 1).unwrap();
        s.accept(
            &sid,
            &inbound(session, ext, "hi"),
            max,
            "busy",
            Some(Cursor {
                name: "telegram",
                value: "9",
            }),
        )
        .unwrap()
    }
}
