//! Segments from the attacker's side: what the files reveal, and what a reader does with
//! files that are wrong, moved, damaged or built to hurt it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use queue_proto::agent::{InboxReader, OutboxWriter};
use queue_proto::control::{InboxWriter, OutboxReader};
use queue_proto::ids::{Seq, SessionId};
use queue_proto::items::{
    AgentConfig, AssistantReply, InboxItem, Note, OutboxItem, ToolName, UserMessage,
};
use queue_proto::keys::{MasterKey, SessionKeys, SessionSalt, derive_session_keys};
use queue_proto::segment::{MAX_SEGMENT_BYTES, SCHEMA, SegmentError};

const MARKER: &str = "MARKER-7f3a9c-never-on-disk";

struct Session {
    id: SessionId,
    keys: SessionKeys,
    _root: tempfile::TempDir,
    inbox: PathBuf,
    outbox: PathBuf,
    private: PathBuf,
}

fn session(name: &str, master: &MasterKey) -> Session {
    let id = SessionId::try_from(name).unwrap();
    let keys = derive_session_keys(master, &id, &SessionSalt::generate().unwrap());
    let root = tempfile::tempdir().unwrap();
    let [inbox, outbox, private] = ["inbox.d", "outbox.d", "private"].map(|d| {
        let p = root.path().join(d);
        fs::create_dir(&p).unwrap();
        p
    });
    Session {
        id,
        keys,
        _root: root,
        inbox,
        outbox,
        private,
    }
}

impl Session {
    fn inbox_writer(&self) -> InboxWriter {
        InboxWriter::new(self.inbox.clone(), self.id.clone(), &self.keys)
    }
    fn inbox_reader(&self) -> InboxReader {
        InboxReader::new(self.inbox.clone(), self.id.clone(), &self.keys)
    }
    fn outbox_writer(&self) -> OutboxWriter {
        OutboxWriter::new(self.outbox.clone(), self.id.clone(), &self.keys)
    }
    fn outbox_reader(&self) -> OutboxReader {
        OutboxReader::new(
            self.outbox.clone(),
            self.private.clone(),
            self.id.clone(),
            &self.keys,
        )
    }
    /// A reader of this session's outbox directory that believes it is `other`.
    fn reader_as(&self, other: &Session) -> OutboxReader {
        OutboxReader::new(
            self.outbox.clone(),
            self.private.clone(),
            other.id.clone(),
            &other.keys,
        )
    }
}

fn master() -> MasterKey {
    MasterKey::generate().unwrap()
}

fn user_message(text: &str) -> InboxItem {
    InboxItem::UserMessage(UserMessage {
        message_id: 1,
        received_at: 1_700_000_000,
        text: text.into(),
        local_time: String::new(),
        time_zone: String::new(),
        attachments: 0,
    })
}

fn reply(text: &str) -> OutboxItem {
    OutboxItem::AssistantReply(AssistantReply {
        in_reply_to: 1,
        text: text.into(),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir`, recursively.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(all_files(&p))
        } else {
            out.push(p)
        }
    }
    out
}

#[test]
fn inbox_and_outbox_round_trip() {
    let s = session("round-trip", &master());
    let items = vec![
        user_message("hello"),
        InboxItem::AgentConfig(AgentConfig {
            version: 3,
            instructions: "be brief".into(),
            tools: vec![ToolName::Reply, ToolName::NoteWrite],
            max_steps_per_turn: 8,
            accepts_images: false,
        }),
    ];
    let path = s.inbox_writer().publish(Seq(1), &items).unwrap();
    assert_eq!(path, s.inbox.join("0000000000000001.db"));
    assert_eq!(s.inbox_reader().list_after(None).unwrap(), vec![Seq(1)]);
    assert_eq!(s.inbox_reader().list_after(Some(Seq(1))).unwrap(), vec![]);
    assert_eq!(s.inbox_reader().read(Seq(1)).unwrap(), items);

    let out = vec![
        reply("hi"),
        OutboxItem::Note(Note {
            name: "n".into(),
            body: "b".into(),
        }),
    ];
    s.outbox_writer().publish(Seq(1), &out).unwrap();
    assert_eq!(s.outbox_reader().read(Seq(1)).unwrap(), out);
    assert!(
        fs::read_dir(&s.private).unwrap().next().is_none(),
        "the private copy is removed"
    );
    s.outbox_reader().remove(Seq(1)).unwrap();
    assert_eq!(s.outbox_reader().list_after(None).unwrap(), vec![]);
}

#[test]
fn empty_segments_are_valid() {
    let s = session("empty", &master());
    s.outbox_writer().publish(Seq(9), &[]).unwrap();
    assert_eq!(s.outbox_reader().read(Seq(9)).unwrap(), vec![]);
}

#[test]
fn a_marker_never_reaches_the_disk_in_plaintext() {
    let s = session("marker", &master());
    s.inbox_writer()
        .publish(Seq(1), &[user_message(MARKER)])
        .unwrap();
    s.outbox_writer().publish(Seq(1), &[reply(MARKER)]).unwrap();
    s.outbox_reader().read(Seq(1)).unwrap();
    let files: Vec<_> = [&s.inbox, &s.outbox, &s.private]
        .into_iter()
        .flat_map(|d| all_files(d))
        .collect();
    // Only the two published segments exist: no -journal, -wal or temp file was left.
    let names: Vec<_> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["0000000000000001.db", "0000000000000001.db"]);
    for f in files {
        let bytes = fs::read(&f).unwrap();
        assert!(
            !contains(&bytes, MARKER.as_bytes()),
            "{f:?} holds the marker"
        );
        assert!(
            !contains(&bytes, b"SQLite format 3"),
            "{f:?} is not encrypted"
        );
        assert!(!contains(&bytes, b"user_message") && !contains(&bytes, b"CREATE TABLE"));
    }
}

#[test]
fn wrong_keys_are_rejected() {
    let m = master();
    let (a, b) = (session("aaa", &m), session("bbb", &m));
    a.outbox_writer().publish(Seq(1), &[reply("x")]).unwrap();
    // Another session's keys, and the same session after a new salt (a deleted session).
    let reborn = OutboxReader::new(
        a.outbox.clone(),
        a.private.clone(),
        a.id.clone(),
        &derive_session_keys(&m, &a.id, &SessionSalt::generate().unwrap()),
    );
    for reader in [a.reader_as(&b), reborn] {
        let err = reader.read(Seq(1)).unwrap_err();
        assert!(matches!(err, SegmentError::Undecryptable { .. }), "{err}");
        assert!(err.to_string().contains("cannot be decrypted"));
    }
    // An inbox reader (inbox key) cannot read an outbox file either.
    fs::copy(
        a.outbox.join(Seq(1).file_name()),
        a.inbox.join(Seq(1).file_name()),
    )
    .unwrap();
    assert!(matches!(
        a.inbox_reader().read(Seq(1)),
        Err(SegmentError::Undecryptable { .. })
    ));
}

#[test]
fn a_renamed_segment_is_rejected() {
    let s = session("renamed", &master());
    s.outbox_writer().publish(Seq(1), &[reply("x")]).unwrap();
    fs::rename(
        s.outbox.join(Seq(1).file_name()),
        s.outbox.join(Seq(2).file_name()),
    )
    .unwrap();
    let err = s.outbox_reader().read(Seq(2)).unwrap_err();
    assert!(matches!(err, SegmentError::Misplaced { .. }), "{err}");
}

#[test]
fn every_flipped_page_and_any_truncation_is_rejected() {
    let s = session("flipped", &master());
    s.outbox_writer()
        .publish(Seq(1), &[reply(&"y".repeat(20_000)), reply("z")])
        .unwrap();
    let path = s.outbox.join(Seq(1).file_name());
    let good = fs::read(&path).unwrap();
    assert!(good.len() >= 4 * 4096, "several pages");
    // One flipped byte at a few offsets inside every page: salt, page body, HMAC.
    for page in 0..good.len() / 4096 {
        for off in [0, 100, 2000, 4095] {
            let mut bad = good.clone();
            bad[page * 4096 + off] ^= 0x01;
            fs::write(&path, &bad).unwrap();
            let err = s.outbox_reader().read(Seq(1)).unwrap_err();
            assert!(
                matches!(
                    err,
                    SegmentError::Undecryptable { .. } | SegmentError::Corrupt { .. }
                ),
                "page {page} offset {off}: {err}"
            );
        }
    }
    for len in [0, 1, 4096, good.len() - 4096, good.len() - 1] {
        fs::write(&path, &good[..len]).unwrap();
        let err = s.outbox_reader().read(Seq(1)).unwrap_err();
        assert!(
            matches!(
                err,
                SegmentError::Undecryptable { .. }
                    | SegmentError::Corrupt { .. }
                    | SegmentError::Schema { .. }
            ),
            "truncated to {len}: {err}"
        );
    }
    fs::write(&path, &good).unwrap();
    assert_eq!(
        s.outbox_reader().read(Seq(1)).unwrap().len(),
        2,
        "the untouched file still reads"
    );
}

/// Builds a segment the way an attacker holding the outbox key would: with SQLite
/// itself, any schema and any rows, keyed correctly.
fn forge(s: &Session, seq: Seq, sql: &str) {
    let path = s.outbox.join(seq.file_name());
    let _ = fs::remove_file(&path);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let key = hex::encode(s.keys.outbox.db.expose_secret());
    conn.execute_batch(&format!("PRAGMA key = \"x'{key}'\";"))
        .unwrap();
    conn.execute_batch(sql).unwrap();
}

fn standard_schema() -> String {
    SCHEMA.iter().map(|(_, _, sql)| format!("{sql};")).collect()
}

fn header(s: &Session, seq: Seq, count: i64) -> String {
    format!(
        "INSERT INTO segment VALUES (1, 1, '{}', 'outbox', {}, {count});",
        s.id, seq.0
    )
}

#[test]
fn the_forging_helper_builds_readable_segments() {
    // Guards the hostile tests below: with nothing hostile added, a forged empty segment
    // reads fine, so each rejection below is caused by what that test adds.
    let s = session("forge-ok", &master());
    forge(
        &s,
        Seq(1),
        &format!("{}{}", standard_schema(), header(&s, Seq(1), 0)),
    );
    assert_eq!(s.outbox_reader().read(Seq(1)).unwrap(), vec![]);
}

#[test]
fn hostile_schemas_are_rejected() {
    let s = session("hostile", &master());
    let base = || format!("{}{}", standard_schema(), header(&s, Seq(1), 0));
    let cases = [
        ("extra table", format!("{}CREATE TABLE exfil (x);", base())),
        (
            "trigger",
            format!(
                "{}CREATE TRIGGER t AFTER INSERT ON items BEGIN DELETE FROM segment; END;",
                base()
            ),
        ),
        (
            "view",
            format!("{}CREATE VIEW v AS SELECT * FROM items;", base()),
        ),
        ("index", format!("{}CREATE INDEX i ON items(kind);", base())),
        (
            "items as a view",
            format!(
                "{};{}CREATE VIEW items AS SELECT 0 AS idx, 'assistant_reply' AS kind, x'00' AS sealed;",
                SCHEMA[1].2,
                header(&s, Seq(1), 1)
            ),
        ),
        (
            "loose column types",
            format!(
                "CREATE TABLE items (idx INTEGER PRIMARY KEY, kind, sealed);{};{}",
                SCHEMA[1].2,
                header(&s, Seq(1), 0)
            ),
        ),
        (
            "no tables",
            "CREATE TABLE other (x); DROP TABLE other;".to_owned(),
        ),
    ];
    for (what, sql) in cases {
        forge(&s, Seq(1), &sql);
        let err = s.outbox_reader().read(Seq(1)).unwrap_err();
        assert!(matches!(err, SegmentError::Schema { .. }), "{what}: {err}");
    }
}

#[test]
fn hostile_rows_are_rejected() {
    let s = session("rows", &master());
    let with = |rows: &str, count: i64| {
        format!("{}{}{rows}", standard_schema(), header(&s, Seq(1), count))
    };
    let sealed_len = 24 + 16 + queue_proto::items::MAX_ITEM_BYTES + 1;
    let cases = [
        (
            "garbage row",
            with("INSERT INTO items VALUES (0, 'assistant_reply', x'00');", 1),
        ),
        (
            "unknown kind",
            with("INSERT INTO items VALUES (0, 'shell', randomblob(64));", 1),
        ),
        (
            "inbox kind",
            with(
                "INSERT INTO items VALUES (0, 'agent_config', randomblob(64));",
                1,
            ),
        ),
        (
            "oversized row",
            with(
                &format!("INSERT INTO items VALUES (0, 'note', zeroblob({sealed_len}));"),
                1,
            ),
        ),
        ("missing row", with("", 1)),
        (
            "extra row",
            with("INSERT INTO items VALUES (0, 'note', randomblob(64));", 0),
        ),
        (
            "gap in indexes",
            with("INSERT INTO items VALUES (5, 'note', randomblob(64));", 1),
        ),
        ("negative count", with("", -1)),
        ("huge count", with("", 100_000)),
        (
            "wrong format",
            with("", 0).replace("VALUES (1, 1,", "VALUES (1, 2,"),
        ),
        ("no header", standard_schema()),
        ("inbox header", with("", 0).replace("'outbox'", "'inbox'")),
        ("other session", with("", 0).replace("'rows'", "'other'")),
    ];
    for (what, sql) in cases {
        forge(&s, Seq(1), &sql);
        let err = s.outbox_reader().read(Seq(1)).unwrap_err();
        assert!(
            matches!(
                err,
                SegmentError::Envelope { .. }
                    | SegmentError::Item { .. }
                    | SegmentError::Row { .. }
                    | SegmentError::TooManyItems { .. }
                    | SegmentError::Misplaced { .. }
            ),
            "{what}: {err}"
        );
    }
}

#[test]
fn a_row_moved_between_segments_fails_to_open() {
    let s = session("moved", &master());
    s.outbox_writer()
        .publish(Seq(1), &[reply("from seq 1")])
        .unwrap();
    // Lift the sealed row out of seq 1 and plant it in an otherwise well-formed seq 2.
    let sealed: Vec<u8> = {
        let conn = rusqlite::Connection::open(s.outbox.join(Seq(1).file_name())).unwrap();
        let key = hex::encode(s.keys.outbox.db.expose_secret());
        conn.execute_batch(&format!("PRAGMA key = \"x'{key}'\";"))
            .unwrap();
        conn.query_row("SELECT sealed FROM items", [], |r| r.get(0))
            .unwrap()
    };
    forge(
        &s,
        Seq(2),
        &format!(
            "{}{}INSERT INTO items VALUES (0, 'assistant_reply', x'{}');",
            standard_schema(),
            header(&s, Seq(2), 1),
            hex::encode(sealed)
        ),
    );
    let err = s.outbox_reader().read(Seq(2)).unwrap_err();
    assert!(
        matches!(err, SegmentError::Envelope { index: 0, .. }),
        "{err}"
    );
}

#[test]
fn non_files_and_non_segments_are_rejected() {
    let s = session("nonfiles", &master());
    let path = s.outbox.join(Seq(1).file_name());

    fs::write(&path, b"this is not a database at all, just bytes").unwrap();
    assert!(matches!(
        s.outbox_reader().read(Seq(1)),
        Err(SegmentError::Undecryptable { .. })
    ));

    fs::write(&path, vec![0u8; 8192]).unwrap();
    assert!(matches!(
        s.outbox_reader().read(Seq(1)),
        Err(SegmentError::Undecryptable { .. })
    ));

    // A plaintext SQLite file with the right schema is not a segment either.
    fs::remove_file(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!("{}{}", standard_schema(), header(&s, Seq(1), 0)))
        .unwrap();
    drop(conn);
    assert!(matches!(
        s.outbox_reader().read(Seq(1)),
        Err(SegmentError::Undecryptable { .. })
    ));

    // A symlink to a file the control plane can read but the agent cannot.
    fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
    assert!(matches!(
        s.outbox_reader().read(Seq(1)),
        Err(SegmentError::NotRegularFile { .. })
    ));

    // A FIFO: opening it must not block.
    fs::remove_file(&path).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(matches!(
        s.outbox_reader().read(Seq(1)),
        Err(SegmentError::NotRegularFile { .. })
    ));

    // A directory.
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    assert!(s.outbox_reader().read(Seq(1)).is_err());

    // A (sparse) file over the size cap is refused before anything is read.
    fs::remove_dir(&path).unwrap();
    fs::File::create(&path)
        .unwrap()
        .set_len(MAX_SEGMENT_BYTES + 1)
        .unwrap();
    assert!(matches!(
        s.outbox_reader().read(Seq(1)),
        Err(SegmentError::TooLarge { .. })
    ));

    assert!(
        fs::read_dir(&s.private).unwrap().next().is_none(),
        "no private copy is left behind"
    );
}

#[test]
fn a_stale_temp_file_does_not_block_publishing() {
    let s = session("stale", &master());
    fs::write(
        s.outbox.join(Seq(1).temp_file_name()),
        b"half-written by a crashed writer",
    )
    .unwrap();
    assert_eq!(
        s.outbox_reader().list_after(None).unwrap(),
        vec![],
        "temp files are never listed"
    );
    s.outbox_writer().publish(Seq(1), &[reply("ok")]).unwrap();
    assert_eq!(s.outbox_reader().read(Seq(1)).unwrap(), vec![reply("ok")]);
    assert!(!s.outbox.join(Seq(1).temp_file_name()).exists());
}

fn outbox_item() -> impl Strategy<Value = OutboxItem> {
    prop_oneof![
        (any::<u64>(), ".{0,200}").prop_map(|(n, t)| OutboxItem::AssistantReply(AssistantReply {
            in_reply_to: n,
            text: t
        })),
        (".{0,40}", ".{0,200}").prop_map(|(name, body)| OutboxItem::Note(Note { name, body })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn publish_then_read_round_trips(
        items in proptest::collection::vec(outbox_item(), 0..20),
        seq in any::<u64>(),
    ) {
        let s = session("prop", &master());
        s.outbox_writer().publish(Seq(seq), &items).unwrap();
        prop_assert_eq!(s.outbox_reader().read(Seq(seq)).unwrap(), items);
    }
}

/// A stream of undecryptable segments must not write to the control plane's stderr:
/// SQLCipher logs every failed page there unless told not to. The test re-runs itself
/// in a child process to capture that process's real stderr.
#[test]
fn bad_segments_do_not_flood_stderr() {
    const CHILD: &str = "IRONCLAW_TEST_STDERR_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let m = master();
        let (a, b) = (session("loud-a", &m), session("loud-b", &m));
        a.outbox_writer().publish(Seq(1), &[reply("x")]).unwrap();
        for _ in 0..20 {
            assert!(a.reader_as(&b).read(Seq(1)).is_err());
        }
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "bad_segments_do_not_flood_stderr",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("hmac") && !stderr.contains("ERROR"),
        "stderr: {stderr}"
    );
}

#[test]
fn a_published_segment_is_never_replaced() {
    let s = session("once", &master());
    s.outbox_writer()
        .publish(Seq(1), &[reply("first")])
        .unwrap();
    let err = s
        .outbox_writer()
        .publish(Seq(1), &[reply("second")])
        .unwrap_err();
    assert!(matches!(err, SegmentError::Io { .. }), "{err}");
    assert_eq!(
        s.outbox_reader().read(Seq(1)).unwrap(),
        vec![reply("first")]
    );
    assert!(!s.outbox.join(Seq(1).temp_file_name()).exists());
}

#[test]
fn oversized_schemas_are_refused_before_they_cost_memory() {
    let s = session("wide", &master());
    let columns: Vec<String> = (0..2000).map(|i| format!("c{i}")).collect();
    let long_default = "x".repeat(10_000);
    for sql in [
        format!(
            "{}CREATE TABLE wide ({});",
            standard_schema(),
            columns.join(", ")
        ),
        format!(
            "{}CREATE TABLE long (a TEXT DEFAULT '{long_default}');",
            standard_schema()
        ),
    ] {
        forge(&s, Seq(1), &sql);
        let err = s.outbox_reader().read(Seq(1)).unwrap_err();
        assert!(
            // Refused while parsing, before the schema comparison ever runs.
            matches!(
                err,
                SegmentError::Sqlite { .. } | SegmentError::Corrupt { .. }
            ),
            "{err}"
        );
    }
}
