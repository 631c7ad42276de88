//! The audit trail: an append-only table in the control store where every entry holds
//! the SHA-256 of the one before it. An entry is written inside the transaction of the
//! change it records, so the trail and the state cannot disagree.
//!
//! `hash = SHA-256(prev_hash ‖ seq as 8 bytes big-endian ‖ at as 8 bytes big-endian ‖
//! kind ‖ 0x00 ‖ detail)`, with `prev_hash` of the first entry 32 zero bytes.
//!
//! The chain alone cannot show that entries were cut off its end, nor stop someone who
//! holds the control-store key from recomputing it after an edit. So the last entry's
//! seq and hash are also kept in `audit_head`, sealed with
//! `HMAC-SHA256(audit-head key, seq as 8 bytes big-endian ‖ hash)`. The audit-head key
//! is derived from the master key and never stored: a shortened, extended or rewritten
//! trail needs a new seal, which only the master key's holder can make. (Rolling the
//! whole store back to an older copy, seal included, is not caught here.)

use hmac::{Hmac, Mac};
use queue_proto::keys::SecretKey;
use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use sha2::{Digest, Sha256};

/// The table, created with the rest of the control store.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash BLOB NOT NULL,
    seal BLOB NOT NULL
);";

/// The SQL function, registered on the store's connection by [`install_seal`], that
/// seals a head inside the transaction that appends the entry.
const SEAL_FUNCTION: &str = "ironclaw_audit_seal";

fn seal(key: &SecretKey, seq: i64, hash: &[u8]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key.expose_secret()).expect("any key length");
    mac.update(&seq.to_be_bytes());
    mac.update(hash);
    mac.finalize().into_bytes().into()
}

/// Gives `conn` the sealing function under `key`. Direct-only: no trigger or view a
/// hostile schema might add can call it.
pub fn install_seal(conn: &Connection, key: SecretKey) -> rusqlite::Result<()> {
    conn.create_scalar_function(
        SEAL_FUNCTION,
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DIRECTONLY,
        move |ctx| {
            let seq: i64 = ctx.get(0)?;
            let hash: Vec<u8> = ctx.get(1)?;
            Ok(seal(&key, seq, &hash).to_vec())
        },
    )
}

/// What an audit entry records: its `kind`, spelled only here. The start-up check that
/// the version in force is the one the trail last put in force reads the entries of
/// [`AuditEvent::PUTS_IN_FORCE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditEvent {
    /// A file that came with a message was refused (too large, not an accepted kind,
    /// not fetched): never passed on.
    AttachmentRefused,
    /// A minute's count of refused admin peers beyond those recorded one by one.
    AdminRefusalsLimited,
    /// A peer of the admin socket or API was refused.
    AdminRefused,
    /// An approved change became the version in force (with `change_approved`, in one transaction).
    ChangeApplied,
    /// An operator approved a change request.
    ChangeApproved,
    /// A change request expired undecided.
    ChangeExpired,
    /// An operator rejected a change request.
    ChangeRejected,
    /// A change request was filed (pending or denied).
    ChangeRequested,
    /// A minute's count of change requests refused unfiled by the rate limit.
    ChangeRequestsLimited,
    /// The configuration file became approved version 1.
    ConfigBootstrapped,
    /// A decision was refused, and why.
    DecisionRefused,
    /// A reply was given up on (or was in flight at a crash).
    DeliveryDeadLettered,
    /// `init` finished.
    Initialised,
    /// A message was stored for its session.
    MessageAccepted,
    /// A message was refused, by its channel's rules or the waiting limit.
    MessageRefused,
    /// Refused messages beyond the records kept a minute for one chat, counted.
    MessageRefusalsLimited,
    /// Waiting messages were given up on, with a notice.
    MessagesFailed,
    /// A model call was made (metadata only).
    ModelCall,
    /// A model call failed or was refused by a budget.
    ModelFailed,
    /// An agent's outbox segment was taken in, with its turn's summary and risk.
    OutboxIngested,
    /// The proxy refused something an agent sent.
    ProxyRefused,
    /// An agent cancelled one of its session's reminders.
    ReminderCancelled,
    /// An agent set a reminder through its proxy (when, and how it comes back).
    ReminderSet,
    /// A sandbox ended, and how.
    SandboxEnded,
    /// A session was paused after repeated crashes.
    SandboxPaused,
    /// A sandbox started.
    SandboxStarted,
    /// `serve` started, with the provider and version in force.
    ServiceStarted,
    /// `serve` stopped.
    ServiceStopped,
    /// A chat got its session (and salt).
    SessionCreated,
    /// A session was deleted and its keys' inputs destroyed.
    SessionDeleted,
    /// A live session was stopped to run under a newly applied version.
    SessionRestarted,
    /// An operator set (or cleared) a session's time zone.
    SessionTimeZoneSet,
    /// An operator turned the web off or on for a session.
    SessionWebSet,
    /// The web broker fetched (or refused to fetch) a URL for an agent.
    WebFetched,
    /// The web broker searched (or refused to search) for an agent.
    WebSearched,
    /// The store and its tables were made (`init`); the first entry.
    StoreCreated,
}

impl AuditEvent {
    /// Every kind.
    pub const ALL: &'static [AuditEvent] = &[
        AuditEvent::AttachmentRefused,
        AuditEvent::AdminRefusalsLimited,
        AuditEvent::AdminRefused,
        AuditEvent::ChangeApplied,
        AuditEvent::ChangeApproved,
        AuditEvent::ChangeExpired,
        AuditEvent::ChangeRejected,
        AuditEvent::ChangeRequested,
        AuditEvent::ChangeRequestsLimited,
        AuditEvent::ConfigBootstrapped,
        AuditEvent::DecisionRefused,
        AuditEvent::DeliveryDeadLettered,
        AuditEvent::Initialised,
        AuditEvent::MessageAccepted,
        AuditEvent::MessageRefused,
        AuditEvent::MessageRefusalsLimited,
        AuditEvent::MessagesFailed,
        AuditEvent::ModelCall,
        AuditEvent::ModelFailed,
        AuditEvent::OutboxIngested,
        AuditEvent::ProxyRefused,
        AuditEvent::ReminderCancelled,
        AuditEvent::ReminderSet,
        AuditEvent::SandboxEnded,
        AuditEvent::SandboxPaused,
        AuditEvent::SandboxStarted,
        AuditEvent::ServiceStarted,
        AuditEvent::ServiceStopped,
        AuditEvent::SessionCreated,
        AuditEvent::SessionDeleted,
        AuditEvent::SessionRestarted,
        AuditEvent::SessionTimeZoneSet,
        AuditEvent::SessionWebSet,
        AuditEvent::StoreCreated,
        AuditEvent::WebFetched,
        AuditEvent::WebSearched,
    ];

    /// The entries that put a configuration version in force.
    pub const PUTS_IN_FORCE: [AuditEvent; 2] =
        [AuditEvent::ConfigBootstrapped, AuditEvent::ChangeApplied];

    /// The kind as stored in the trail (and hashed into its entry).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::AttachmentRefused => "attachment_refused",
            AuditEvent::AdminRefusalsLimited => "admin_refusals_limited",
            AuditEvent::AdminRefused => "admin_refused",
            AuditEvent::ChangeApplied => "change_applied",
            AuditEvent::ChangeApproved => "change_approved",
            AuditEvent::ChangeExpired => "change_expired",
            AuditEvent::ChangeRejected => "change_rejected",
            AuditEvent::ChangeRequested => "change_requested",
            AuditEvent::ChangeRequestsLimited => "change_requests_limited",
            AuditEvent::ConfigBootstrapped => "config_bootstrapped",
            AuditEvent::DecisionRefused => "decision_refused",
            AuditEvent::DeliveryDeadLettered => "delivery_dead_lettered",
            AuditEvent::Initialised => "initialised",
            AuditEvent::MessageAccepted => "message_accepted",
            AuditEvent::MessageRefused => "message_refused",
            AuditEvent::MessageRefusalsLimited => "message_refusals_limited",
            AuditEvent::MessagesFailed => "messages_failed",
            AuditEvent::ModelCall => "model_call",
            AuditEvent::ModelFailed => "model_failed",
            AuditEvent::OutboxIngested => "outbox_ingested",
            AuditEvent::ProxyRefused => "proxy_refused",
            AuditEvent::ReminderCancelled => "reminder_cancelled",
            AuditEvent::ReminderSet => "reminder_set",
            AuditEvent::SandboxEnded => "sandbox_ended",
            AuditEvent::SandboxPaused => "sandbox_paused",
            AuditEvent::SandboxStarted => "sandbox_started",
            AuditEvent::ServiceStarted => "service_started",
            AuditEvent::ServiceStopped => "service_stopped",
            AuditEvent::SessionCreated => "session_created",
            AuditEvent::SessionDeleted => "session_deleted",
            AuditEvent::SessionRestarted => "session_restarted",
            AuditEvent::SessionTimeZoneSet => "session_time_zone_set",
            AuditEvent::SessionWebSet => "session_web_set",
            AuditEvent::WebFetched => "web_fetched",
            AuditEvent::WebSearched => "web_searched",
            AuditEvent::StoreCreated => "store_created",
        }
    }
}

impl std::fmt::Display for AuditEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn entry_hash(prev: &[u8], seq: i64, at: i64, kind: &str, detail: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(at.to_be_bytes());
    h.update(kind.as_bytes());
    h.update([0u8]);
    h.update(detail.as_bytes());
    h.finalize().into()
}

/// Appends one entry inside `tx`. `detail` is metadata only, never message content.
pub fn append(
    tx: &Transaction<'_>,
    at: i64,
    kind: AuditEvent,
    detail: &serde_json::Value,
) -> rusqlite::Result<()> {
    let kind = kind.as_str();
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    // The new entry extends only a trail that still ends at its sealed head: a trail
    // rewritten or cut outside ironclaw is never sealed again, and nothing more is
    // recorded (or changed, since every change carries its entry) until an operator
    // looks.
    let head: Option<(i64, Vec<u8>, bool)> = tx
        .query_row(
            &format!(
                "SELECT seq, hash, seal = {SEAL_FUNCTION}(seq, hash) FROM audit_head WHERE id = 1"
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (seq, prev) = match (last, head) {
        (None, None) => (1, vec![0u8; 32]),
        (Some((s, h)), Some((hs, hh, true))) if s == hs && h == hh => (s + 1, h),
        _ => {
            return Err(rusqlite::Error::UserFunctionError(Box::new(Broken)));
        }
    };
    let detail = detail.to_string();
    let hash = entry_hash(&prev, seq, at, kind, &detail);
    tx.execute(
        "INSERT INTO audit (seq, at, kind, detail, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![seq, at, kind, detail, prev, hash.as_slice()],
    )?;
    tx.execute(
        &format!(
            "INSERT INTO audit_head (id, seq, hash, seal) VALUES (1, ?1, ?2, {SEAL_FUNCTION}(?1, ?2))
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,
             seal = excluded.seal"
        ),
        params![seq, hash.as_slice()],
    )?;
    Ok(())
}

/// Why an entry was not appended.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "the audit trail does not end at its sealed head: it was changed outside ironclaw (see `ironclaw audit verify`)"
)]
pub struct Broken;

/// One entry as exported.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub seq: i64,
    pub at: i64,
    pub kind: String,
    pub detail: serde_json::Value,
}

/// Where the chain first fails to hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("audit entry {seq} does not follow entry {expected}")]
    Gap { seq: i64, expected: i64 },
    #[error("audit entry {seq} does not hold the hash of the entry before it")]
    Link { seq: i64 },
    #[error("audit entry {seq} does not match its own hash")]
    Hash { seq: i64 },
    #[error("the audit trail's sealed head is missing")]
    NoHead,
    #[error("the audit trail's head is not sealed by this master key")]
    Seal,
    #[error("the audit trail ends at entry {found}, but its sealed head is entry {sealed}")]
    Tail { found: i64, sealed: i64 },
    #[error("reading the audit trail failed: {0}")]
    Read(String),
}

/// Checks the whole chain and its sealed head (under the audit-head key); returns the
/// number of entries.
pub fn verify(conn: &rusqlite::Connection, key: &SecretKey) -> Result<u64, ChainError> {
    let read = |e: rusqlite::Error| ChainError::Read(e.to_string());
    // One snapshot for the rows and the head: a running service may append meanwhile.
    let _snapshot = conn.unchecked_transaction().map_err(read)?;
    let mut stmt = conn
        .prepare("SELECT seq, at, kind, detail, prev, hash FROM audit ORDER BY seq")
        .map_err(read)?;
    let mut rows = stmt.query([]).map_err(read)?;
    let mut prev = vec![0u8; 32];
    let mut expected = 1i64;
    while let Some(r) = rows.next().map_err(read)? {
        let seq: i64 = r.get(0).map_err(read)?;
        let at: i64 = r.get(1).map_err(read)?;
        let kind: String = r.get(2).map_err(read)?;
        let detail: String = r.get(3).map_err(read)?;
        let stored_prev: Vec<u8> = r.get(4).map_err(read)?;
        let hash: Vec<u8> = r.get(5).map_err(read)?;
        if seq != expected {
            return Err(ChainError::Gap { seq, expected });
        }
        if stored_prev != prev {
            return Err(ChainError::Link { seq });
        }
        if entry_hash(&prev, seq, at, &kind, &detail).as_slice() != hash.as_slice() {
            return Err(ChainError::Hash { seq });
        }
        prev = hash;
        expected += 1;
    }
    let last = expected - 1;
    let head: Option<(i64, Vec<u8>, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash, seal FROM audit_head WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(read)?;
    let Some((seq, hash, sealed)) = head else {
        return Err(ChainError::NoHead);
    };
    let want = seal(key, seq, &hash);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        want.as_slice(),
        sealed.as_slice(),
    )) {
        return Err(ChainError::Seal);
    }
    if seq != last || hash != prev {
        return Err(ChainError::Tail {
            found: last,
            sealed: seq,
        });
    }
    Ok(last as u64)
}

/// Every entry, oldest first.
pub fn export(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<Entry>> {
    page(conn, 0, u32::MAX)
}

/// At most `limit` entries after sequence number `after`, oldest first.
pub fn page(conn: &rusqlite::Connection, after: i64, limit: u32) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn
        .prepare("SELECT seq, at, kind, detail FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
    let rows = stmt.query_map(rusqlite::params![after, i64::from(limit)], |r| {
        let detail: String = r.get(3)?;
        Ok(Entry {
            seq: r.get(0)?,
            at: r.get(1)?,
            kind: r.get(2)?,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_bytes([7; 32])
    }

    fn store() -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        install_seal(&conn, key()).unwrap();
        conn
    }

    fn add(conn: &mut rusqlite::Connection, n: i64) {
        for i in 0..n {
            let tx = conn.transaction().unwrap();
            append(
                &tx,
                1000 + i,
                AuditEvent::ModelCall,
                &serde_json::json!({ "i": i }),
            )
            .unwrap();
            tx.commit().unwrap();
        }
    }

    #[test]
    fn an_untouched_chain_verifies_and_each_tamper_is_found() {
        let mut conn = store();
        add(&mut conn, 5);
        assert_eq!(verify(&conn, &key()), Ok(5));
        assert_eq!(
            verify(&conn, &SecretKey::from_bytes([8; 32])),
            Err(ChainError::Seal)
        );
        let tampers = [
            (
                "UPDATE audit SET detail = '{\"i\":9}' WHERE seq = 3",
                ChainError::Hash { seq: 3 },
            ),
            (
                "DELETE FROM audit WHERE seq = 2",
                ChainError::Gap {
                    seq: 3,
                    expected: 2,
                },
            ),
            (
                "UPDATE audit SET at = at + 1 WHERE seq = 5",
                ChainError::Hash { seq: 5 },
            ),
            (
                "DELETE FROM audit WHERE seq = 5",
                ChainError::Tail {
                    found: 4,
                    sealed: 5,
                },
            ),
            ("DELETE FROM audit_head", ChainError::NoHead),
            (
                "DELETE FROM audit WHERE seq = 5;
                 UPDATE audit_head SET seq = 4, hash = (SELECT hash FROM audit WHERE seq = 4)",
                ChainError::Seal,
            ),
            ("UPDATE audit_head SET seq = 4", ChainError::Seal),
        ];
        for (sql, want) in tampers {
            let mut conn = store();
            add(&mut conn, 5);
            conn.execute_batch(sql).unwrap();
            assert_eq!(verify(&conn, &key()), Err(want), "{sql}");
            // Nothing is sealed onto a trail whose end changed behind the store's back
            // (edits further back are for `verify`, which runs at every start).
            if sql.contains("audit_head") || sql.contains("seq = 5") && sql.starts_with("DELETE") {
                let tx = conn.transaction().unwrap();
                assert!(
                    append(&tx, 2000, AuditEvent::ModelCall, &serde_json::json!({})).is_err(),
                    "{sql}"
                );
            }
        }
    }

    #[test]
    fn every_event_has_its_own_kind() {
        let kinds: std::collections::HashSet<&str> =
            AuditEvent::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(kinds.len(), AuditEvent::ALL.len());
        assert!(
            kinds
                .iter()
                .all(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
    }
}
