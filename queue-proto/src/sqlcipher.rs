//! Opening SQLCipher databases with a raw 256-bit key (no passphrase KDF).

// Without either role feature nothing in the crate publishes or reads segments.
#![cfg_attr(
    not(any(feature = "agent", feature = "control-plane")),
    allow(dead_code)
)]

use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use zeroize::Zeroizing;

use crate::keys::SecretKey;

/// Keys a fresh connection with `PRAGMA key = "x'<64 hex>'"`: SQLCipher uses the 32 bytes
/// directly as the page-encryption key. Must be the first statement on the connection.
///
/// SQLCipher's own log is switched off first: it writes a line to stderr for every page
/// that fails authentication, which would let an agent flood the control plane's log
/// with a stream of bad segments. Failures are reported through our errors instead.
pub(crate) fn apply_key(conn: &Connection, key: &SecretKey) -> rusqlite::Result<()> {
    silence_log(conn)?;
    let hex_key = Zeroizing::new(hex::encode(key.expose_secret()));
    let pragma = Zeroizing::new(format!("PRAGMA key = \"x'{}'\";", hex_key.as_str()));
    conn.execute_batch(&pragma)
}

/// Opens (creating if needed) a private SQLCipher database keyed with `key`, leaving
/// its journal mode as the file has it, so a second connection can open a database
/// another process holds in WAL mode.
pub fn open_keyed(path: &Path, key: &SecretKey) -> rusqlite::Result<Connection> {
    let conn = open_for_writing(path)?;
    apply_key(&conn, key)?;
    conn.execute_batch("PRAGMA temp_store = MEMORY; PRAGMA busy_timeout = 5000;")?;
    Ok(conn)
}

/// Turns off SQLCipher's process-wide logging to stderr.
pub(crate) fn silence_log(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA cipher_log_level = NONE", [], |_| Ok(()))
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(()),
            e => Err(e),
        })
}

/// Opens `path` read-only as an immutable file: no locks, no journal, no writes, so a
/// reader can never change a published segment.
pub(crate) fn open_immutable(path: &Path) -> rusqlite::Result<Connection> {
    let uri = format!("file:{}?mode=ro&immutable=1", uri_escape(path));
    Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// Opens (creating if needed) a database for writing, without URI interpretation.
pub(crate) fn open_for_writing(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// Percent-encodes every byte of a path except the unreserved ones and `/`, so a
/// directory name holding `?`, `#` or `%` cannot change the URI's meaning.
fn uri_escape(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_escape_neutralises_uri_syntax() {
        assert_eq!(
            uri_escape(Path::new("/a b/c?mode=rw#x%")),
            "/a%20b/c%3Fmode%3Drw%23x%25"
        );
    }
}
