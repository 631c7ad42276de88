//! The audit trail: an append-only table in the control store where every entry holds
//! the SHA-256 of the one before it. An entry is written inside the transaction of the
//! change it records, so the trail and the state cannot disagree.
//!
//! `hash = SHA-256(prev_hash ‖ seq as 8 bytes big-endian ‖ at as 8 bytes big-endian ‖
//! kind ‖ 0x00 ‖ detail)`, with `prev_hash` of the first entry 32 zero bytes.

use rusqlite::{OptionalExtension, Transaction, params};
use sha2::{Digest, Sha256};

/// The table, created with the rest of the control store.
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev BLOB NOT NULL,
    hash BLOB NOT NULL
);";

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
    kind: &str,
    detail: &serde_json::Value,
) -> rusqlite::Result<()> {
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, vec![0u8; 32]),
    };
    let detail = detail.to_string();
    let hash = entry_hash(&prev, seq, at, kind, &detail);
    tx.execute(
        "INSERT INTO audit (seq, at, kind, detail, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![seq, at, kind, detail, prev, hash.as_slice()],
    )?;
    Ok(())
}

/// One entry as exported.
#[derive(Debug, Clone, serde::Serialize)]
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
    #[error("reading the audit trail failed: {0}")]
    Read(String),
}

/// Checks the whole chain; returns the number of entries.
pub fn verify(conn: &rusqlite::Connection) -> Result<u64, ChainError> {
    let read = |e: rusqlite::Error| ChainError::Read(e.to_string());
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
    Ok((expected - 1) as u64)
}

/// Every entry, oldest first.
pub fn export(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare("SELECT seq, at, kind, detail FROM audit ORDER BY seq")?;
    let rows = stmt.query_map([], |r| {
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

    fn store() -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    fn add(conn: &mut rusqlite::Connection, n: i64) {
        for i in 0..n {
            let tx = conn.transaction().unwrap();
            append(&tx, 1000 + i, "test", &serde_json::json!({ "i": i })).unwrap();
            tx.commit().unwrap();
        }
    }

    #[test]
    fn an_untouched_chain_verifies_and_each_tamper_is_found() {
        let mut conn = store();
        add(&mut conn, 5);
        assert_eq!(verify(&conn), Ok(5));
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
        ];
        for (sql, want) in tampers {
            let mut conn = store();
            add(&mut conn, 5);
            conn.execute_batch(sql).unwrap();
            assert_eq!(verify(&conn), Err(want), "{sql}");
        }
    }
}
