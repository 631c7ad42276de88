//! Immutable encrypted segment files: the one way data crosses between the control plane
//! and an agent.
//!
//! A segment is a SQLCipher 4 database keyed with its direction's raw 256-bit key, holding
//! exactly two tables (see [`SCHEMA`]). It is built under a temporary name, fsynced,
//! renamed to `<seq as 16 hex>.db`, and the directory is fsynced; after that nobody
//! modifies it. Each row is also sealed with the direction's envelope key (see
//! [`crate::envelope`]).
//!
//! Reading treats the file as hostile: size cap, regular file only, immutable read-only
//! open, `cell_size_check`, `trusted_schema=OFF`, defensive mode, `mmap_size=0`, a bound on
//! SQLite VM steps, `quick_check`, an exact schema match, and every row parsed into closed
//! types.

// Without either role feature nothing in the crate publishes or reads segments.
#![cfg_attr(
    not(any(feature = "agent", feature = "control-plane")),
    allow(dead_code)
)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rusqlite::config::DbConfig;
use rusqlite::limits::Limit;
use rusqlite::{Connection, ErrorCode, params};
use zeroize::Zeroizing;

use crate::envelope::{self, EnvelopeError, RowPlace};
use crate::ids::{Direction, Seq, SessionId};
use crate::items::{ItemError, ItemKind, MAX_ITEM_BYTES, QueueItem};
use crate::keys::QueueKeys;
use crate::sqlcipher;

/// Largest segment file accepted, in bytes; checked before opening.
pub const MAX_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Most items in one segment.
pub const MAX_ITEMS_PER_SEGMENT: usize = 1024;
/// Version stored in every segment header.
pub const FORMAT_VERSION: i64 = 1;
/// SQLite VM steps a read may take before it is abandoned (a guard against hostile
/// files crafted to make queries slow). Checked every [`PROGRESS_INTERVAL`] steps.
pub const MAX_READ_VM_STEPS: u64 = 200_000_000;
const PROGRESS_INTERVAL: i32 = 10_000;
/// Largest string or blob SQLite may load while reading a segment: one sealed item.
const MAX_VALUE_BYTES: i32 = (MAX_ITEM_BYTES + 64) as i32;

/// The exact schema of a segment, as `sqlite_schema` rows `(type, name, tbl_name, sql)`.
/// A file whose schema differs in any way — an extra table, a view, a trigger, an index,
/// another column type — is rejected.
pub const SCHEMA: [(&str, &str, &str); 2] = [
    (
        "table",
        "items",
        "CREATE TABLE items (idx INTEGER PRIMARY KEY, kind TEXT NOT NULL, sealed BLOB NOT NULL) STRICT",
    ),
    (
        "table",
        "segment",
        "CREATE TABLE segment (id INTEGER PRIMARY KEY CHECK (id = 1), format INTEGER NOT NULL, \
         session TEXT NOT NULL, direction TEXT NOT NULL, seq INTEGER NOT NULL, \
         item_count INTEGER NOT NULL) STRICT",
    ),
];

/// Errors from publishing or reading a segment. The control plane reports them to the
/// agent only as an opaque refusal.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("segment {path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("segment {path} has {bytes} bytes, more than the limit of {max}")]
    TooLarge { path: PathBuf, bytes: u64, max: u64 },
    #[error("segment {path} cannot be decrypted: wrong key, or not a segment")]
    Undecryptable { path: PathBuf },
    #[error("segment {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("segment {path} has an unexpected schema: {detail}")]
    Schema { path: PathBuf, detail: String },
    #[error("segment {path} belongs elsewhere: {detail}")]
    Misplaced { path: PathBuf, detail: String },
    #[error("segment {path} holds too many items (limit {max})")]
    TooManyItems { path: PathBuf, max: usize },
    #[error("segment {path} took more than {MAX_READ_VM_STEPS} SQLite steps to read")]
    WorkLimit { path: PathBuf },
    #[error("segment {path}, row {index}: {source}")]
    Envelope {
        path: PathBuf,
        index: u32,
        #[source]
        source: EnvelopeError,
    },
    #[error("segment {path}, row {index}: {source}")]
    Item {
        path: PathBuf,
        index: u32,
        #[source]
        source: ItemError,
    },
    #[error("segment {path}: {detail}")]
    Row { path: PathBuf, detail: String },
    #[error("sqlite failed to {op} {path}")]
    Sqlite {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

/// Which queue a segment is in and where: the reader's expectation, the writer's label.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place<'a> {
    pub(crate) session: &'a SessionId,
    pub(crate) direction: Direction,
    pub(crate) seq: Seq,
}

/// Whether the segment file is SQLCipher-encrypted. Only the benchmark and the fuzz
/// targets (feature `plain-files`) turn it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileCipher {
    SqlCipher,
    #[cfg_attr(not(feature = "plain-files"), allow(dead_code))]
    Plain,
}

fn sqlite_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(rusqlite::Error) -> SegmentError + 'a {
    move |source| SegmentError::Sqlite {
        op,
        path: path.to_owned(),
        source,
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Publishes `items` as segment `place.seq` in `dir`: build `.tmp-<seq>`, fsync it, rename
/// Whether a published segment is made durable before `publish` returns.
// Each role uses one of the two.
#[cfg_attr(
    not(all(feature = "agent", feature = "control-plane")),
    allow(dead_code)
)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The file and the directory entry are fsynced: a power cut cannot take it back.
    Synced,
    /// Atomic (built under a temporary name, then renamed) but not fsynced: survives
    /// any process crash, not a power cut.
    Unsynced,
}

/// it to `<seq>.db`, fsync `dir`. Returns the published path.
pub(crate) fn publish<T: QueueItem>(
    dir: &Path,
    place: Place<'_>,
    keys: &QueueKeys,
    cipher: FileCipher,
    durability: Durability,
    items: &[T],
) -> Result<PathBuf, SegmentError> {
    debug_assert_eq!(place.direction, T::DIRECTION);
    let tmp = dir.join(place.seq.temp_file_name());
    let dest = dir.join(place.seq.file_name());
    if items.len() > MAX_ITEMS_PER_SEGMENT {
        return Err(SegmentError::TooManyItems {
            path: dest,
            max: MAX_ITEMS_PER_SEGMENT,
        });
    }
    // Seal every row before touching the disk, so a bad item leaves nothing behind.
    let mut rows = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let index = u32::try_from(i).expect("at most MAX_ITEMS_PER_SEGMENT items");
        let kind = item.kind().as_str();
        let plaintext = Zeroizing::new(item.encode().map_err(|source| SegmentError::Item {
            path: dest.clone(),
            index,
            source,
        })?);
        let row_place = RowPlace {
            session: place.session,
            direction: place.direction,
            seq: place.seq,
            index,
            kind,
        };
        let sealed = envelope::seal(&keys.envelope, &row_place, &plaintext).map_err(|source| {
            SegmentError::Envelope {
                path: dest.clone(),
                index,
                source,
            }
        })?;
        rows.push((index, kind, sealed));
    }

    // A leftover temp file is from a crashed writer; it was never published.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove stale", &tmp)(e)),
    }
    let len = match write_db(&tmp, place, keys, cipher, &rows) {
        Ok(len) => len,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    if len > MAX_SEGMENT_BYTES {
        let _ = fs::remove_file(&tmp);
        return Err(SegmentError::TooLarge {
            path: dest,
            bytes: len,
            max: MAX_SEGMENT_BYTES,
        });
    }
    if durability == Durability::Synced {
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", &tmp))?;
    }
    // A published segment is never replaced: the other side may have read it already.
    // (The only writer of this directory is this process, so the check cannot race.)
    if fs::symlink_metadata(&dest).is_ok() {
        let _ = fs::remove_file(&tmp);
        return Err(SegmentError::Io {
            op: "publish over existing",
            path: dest,
            source: io::ErrorKind::AlreadyExists.into(),
        });
    }
    if let Err(e) = fs::rename(&tmp, &dest) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("rename", &tmp)(e));
    }
    if durability == Durability::Synced {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync directory", dir))?;
    }
    Ok(dest)
}

fn write_db(
    path: &Path,
    place: Place<'_>,
    keys: &QueueKeys,
    cipher: FileCipher,
    rows: &[(u32, &str, Vec<u8>)],
) -> Result<u64, SegmentError> {
    let conn = sqlcipher::open_for_writing(path).map_err(sqlite_err("create", path))?;
    if cipher == FileCipher::SqlCipher {
        sqlcipher::apply_key(&conn, &keys.db).map_err(sqlite_err("key", path))?;
    }
    // The file is this connection's alone: an exclusive lock spares SQLite its checks
    // for other users' journals on every transaction.
    conn.execute_batch("PRAGMA locking_mode = EXCLUSIVE;")
        .map_err(sqlite_err("configure", path))?;
    // No journal and no temp files: the file is private until the rename, and a crash
    // simply leaves a temp file that the next publish removes. We fsync ourselves.
    conn.pragma_update_and_check(None, "journal_mode", "OFF", |_| Ok(()))
        .map_err(sqlite_err("configure", path))?;
    conn.execute_batch("PRAGMA synchronous = OFF; PRAGMA temp_store = MEMORY;")
        .map_err(sqlite_err("configure", path))?;
    let mut sql = String::from("BEGIN;");
    for (_, _, create) in SCHEMA {
        sql.push_str(create);
        sql.push(';');
    }
    conn.execute_batch(&sql)
        .map_err(sqlite_err("create schema in", path))?;
    conn.execute(
        "INSERT INTO segment (id, format, session, direction, seq, item_count) VALUES (1, ?1, ?2, ?3, ?4, ?5)",
        params![
            FORMAT_VERSION,
            place.session.as_str(),
            place.direction.as_str(),
            seq_to_sql(place.seq),
            i64::try_from(rows.len()).expect("at most MAX_ITEMS_PER_SEGMENT items"),
        ],
    )
    .map_err(sqlite_err("write header to", path))?;
    {
        let mut insert = conn
            .prepare("INSERT INTO items (idx, kind, sealed) VALUES (?1, ?2, ?3)")
            .map_err(sqlite_err("prepare insert into", path))?;
        for (index, kind, sealed) in rows {
            insert
                .execute(params![index, kind, sealed])
                .map_err(sqlite_err("insert into", path))?;
        }
    }
    conn.execute_batch("COMMIT;")
        .map_err(sqlite_err("commit", path))?;
    // The file holds exactly this many pages.
    let len: i64 = conn
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
            [],
            |r| r.get(0),
        )
        .map_err(sqlite_err("measure", path))?;
    conn.close()
        .map_err(|(_, e)| sqlite_err("close", path)(e))?;
    Ok(u64::try_from(len).unwrap_or(u64::MAX))
}

/// Seqs are stored as SQLite's signed 64-bit integers, bit for bit.
fn seq_to_sql(seq: Seq) -> i64 {
    i64::from_ne_bytes(seq.0.to_ne_bytes())
}

fn seq_from_sql(v: i64) -> Seq {
    Seq(u64::from_ne_bytes(v.to_ne_bytes()))
}

/// Reads and opens every item of the segment at `path`, which must be the segment
/// `place`. The file must not change while it is read: the outbox reader copies it to a
/// private place first.
pub(crate) fn read<T: QueueItem>(
    path: &Path,
    place: Place<'_>,
    keys: &QueueKeys,
    cipher: FileCipher,
) -> Result<Vec<T>, SegmentError> {
    debug_assert_eq!(place.direction, T::DIRECTION);
    check_file(path)?;
    let conn = sqlcipher::open_immutable(path).map_err(sqlite_err("open", path))?;
    harden(&conn, path, keys, cipher)?;
    let guarded = |e: rusqlite::Error| classify(path, e);

    let found: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(guarded)?;
    let check: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .map_err(guarded)?;
    if check != "ok" {
        return Err(SegmentError::Corrupt {
            path: path.to_owned(),
            detail: check,
        });
    }
    check_schema(&conn, path, found)?;
    let count = check_header(&conn, path, place)?;

    let mut stmt = conn
        .prepare("SELECT idx, kind, sealed FROM items ORDER BY idx")
        .map_err(guarded)?;
    let mut rows = stmt.query([]).map_err(guarded)?;
    let mut items = Vec::with_capacity(count);
    while let Some(row) = rows.next().map_err(guarded)? {
        let expected = u32::try_from(items.len()).expect("bounded by MAX_ITEMS_PER_SEGMENT");
        if items.len() == count {
            return Err(row_err(path, "more rows than the header's item_count"));
        }
        let index: i64 = row.get(0).map_err(guarded)?;
        if index != i64::from(expected) {
            return Err(row_err(path, "row indexes are not 0, 1, 2, …"));
        }
        let kind: String = row.get(1).map_err(guarded)?;
        let kind = ItemKind::parse(&kind).map_err(|source| SegmentError::Item {
            path: path.to_owned(),
            index: expected,
            source,
        })?;
        let sealed = row
            .get_ref(2)
            .map_err(guarded)?
            .as_blob()
            .map_err(|e| guarded(e.into()))?;
        let row_place = RowPlace {
            session: place.session,
            direction: place.direction,
            seq: place.seq,
            index: expected,
            kind: kind.as_str(),
        };
        let plaintext = envelope::open(&keys.envelope, &row_place, sealed, MAX_ITEM_BYTES)
            .map_err(|source| SegmentError::Envelope {
                path: path.to_owned(),
                index: expected,
                source,
            })?;
        let item = T::decode(kind, &plaintext).map_err(|source| SegmentError::Item {
            path: path.to_owned(),
            index: expected,
            source,
        })?;
        items.push(item);
    }
    if items.len() != count {
        return Err(row_err(path, "fewer rows than the header's item_count"));
    }
    Ok(items)
}

fn row_err(path: &Path, detail: &str) -> SegmentError {
    SegmentError::Row {
        path: path.to_owned(),
        detail: detail.to_owned(),
    }
}

/// Refuses anything but a regular file within the size cap, without following a symlink.
fn check_file(path: &Path) -> Result<(), SegmentError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    if !meta.file_type().is_file() {
        return Err(SegmentError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    if meta.len() > MAX_SEGMENT_BYTES {
        return Err(SegmentError::TooLarge {
            path: path.to_owned(),
            bytes: meta.len(),
            max: MAX_SEGMENT_BYTES,
        });
    }
    Ok(())
}

/// Keys the connection, then shuts every door a hostile file could use.
fn harden(
    conn: &Connection,
    path: &Path,
    keys: &QueueKeys,
    cipher: FileCipher,
) -> Result<(), SegmentError> {
    match cipher {
        FileCipher::SqlCipher => sqlcipher::apply_key(conn, &keys.db),
        FileCipher::Plain => sqlcipher::silence_log(conn),
    }
    .map_err(sqlite_err("key", path))?;
    // Cap what SQLite will parse or load before anything is read: a hostile schema of
    // huge statements or wide tables, or an oversized value, fails instead of costing
    // memory. Our own schema and rows sit well inside these.
    for (limit, value) in [
        (Limit::SQLITE_LIMIT_SQL_LENGTH, 4096),
        (Limit::SQLITE_LIMIT_COLUMN, 16),
        (Limit::SQLITE_LIMIT_EXPR_DEPTH, 16),
        (Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES),
    ] {
        conn.set_limit(limit, value)
            .map_err(sqlite_err("limit", path))?;
    }
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)
        .map_err(sqlite_err("set defensive mode on", path))?;
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false)
        .map_err(sqlite_err("distrust the schema of", path))?;
    conn.execute_batch(
        "PRAGMA cell_size_check = ON; PRAGMA mmap_size = 0; PRAGMA trusted_schema = OFF; \
         PRAGMA query_only = ON; PRAGMA temp_store = MEMORY;",
    )
    .map_err(sqlite_err("configure", path))?;
    let mut steps: u64 = 0;
    conn.progress_handler(
        PROGRESS_INTERVAL,
        Some(move || {
            steps += PROGRESS_INTERVAL as u64;
            steps > MAX_READ_VM_STEPS
        }),
    );
    Ok(())
}

/// Turns SQLite's failure codes into the errors a caller can act on.
fn classify(path: &Path, e: rusqlite::Error) -> SegmentError {
    let path = path.to_owned();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => SegmentError::Undecryptable { path },
        Some(ErrorCode::DatabaseCorrupt) => SegmentError::Corrupt {
            path,
            detail: e.to_string(),
        },
        Some(ErrorCode::OperationInterrupted) => SegmentError::WorkLimit { path },
        Some(ErrorCode::TooBig) => SegmentError::Row {
            path,
            detail: "a value is larger than allowed".into(),
        },
        _ => SegmentError::Sqlite {
            op: "read",
            path,
            source: e,
        },
    }
}

fn check_schema(conn: &Connection, path: &Path, found: i64) -> Result<(), SegmentError> {
    let schema_err = |detail: String| SegmentError::Schema {
        path: path.to_owned(),
        detail,
    };
    if found != SCHEMA.len() as i64 {
        return Err(schema_err(format!(
            "{found} schema objects, expected {}",
            SCHEMA.len()
        )));
    }
    let mut stmt = conn
        .prepare("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name")
        .map_err(|e| classify(path, e))?;
    let mut rows = stmt.query([]).map_err(|e| classify(path, e))?;
    for (kind, name, sql) in SCHEMA {
        let row = rows
            .next()
            .map_err(|e| classify(path, e))?
            .ok_or_else(|| schema_err("missing object".into()))?;
        let got: (String, String, String, Option<String>) = (
            row.get(0).map_err(|e| classify(path, e))?,
            row.get(1).map_err(|e| classify(path, e))?,
            row.get(2).map_err(|e| classify(path, e))?,
            row.get(3).map_err(|e| classify(path, e))?,
        );
        if (
            got.0.as_str(),
            got.1.as_str(),
            got.2.as_str(),
            got.3.as_deref(),
        ) != (kind, name, name, Some(sql))
        {
            return Err(schema_err(format!("unexpected {} {:?}", got.0, got.1)));
        }
    }
    Ok(())
}

/// Checks the header row against where the reader expected this segment to be, and
/// returns the item count it announces.
fn check_header(conn: &Connection, path: &Path, place: Place<'_>) -> Result<usize, SegmentError> {
    let header = conn
        .query_row(
            "SELECT format, session, direction, seq, item_count FROM segment WHERE id = 1",
            [],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .map_err(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => row_err(path, "no header row"),
            e => classify(path, e),
        })?;
    let (format, session, direction, seq, count) = header;
    let misplaced = |detail: String| SegmentError::Misplaced {
        path: path.to_owned(),
        detail,
    };
    if format != FORMAT_VERSION {
        return Err(row_err(path, "unknown format version"));
    }
    if session != place.session.as_str() {
        return Err(misplaced(format!(
            "it is for another session, not {}",
            place.session
        )));
    }
    if direction != place.direction.as_str() {
        return Err(misplaced(format!(
            "it is not an {} segment",
            place.direction.as_str()
        )));
    }
    if seq_from_sql(seq) != place.seq {
        return Err(misplaced(format!(
            "it claims seq {} but was read as seq {}",
            seq_from_sql(seq),
            place.seq
        )));
    }
    let count = usize::try_from(count).map_err(|_| row_err(path, "negative item_count"))?;
    if count > MAX_ITEMS_PER_SEGMENT {
        return Err(SegmentError::TooManyItems {
            path: path.to_owned(),
            max: MAX_ITEMS_PER_SEGMENT,
        });
    }
    Ok(count)
}

/// Lists the published seqs in `dir` after `after`, in order. Names that are not
/// published segments (temp files, strays) are ignored.
pub(crate) fn list_after(dir: &Path, after: Option<Seq>) -> Result<Vec<Seq>, SegmentError> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let Some(seq) = entry.file_name().to_str().and_then(Seq::from_file_name) else {
            continue;
        };
        if after.is_none_or(|a| seq > a) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}
