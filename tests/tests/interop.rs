//! An independent implementation (Python: hmac, SQLCipher 4 via `sqlcipher3`, libsodium via
//! PyNaCl), written from SECURITY.md alone, opens our segments with the master key and the
//! session salt, and fails with another session's.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::{Command, Output};

use queue_proto::control::InboxWriter;
use queue_proto::ids::{Seq, SessionId};
use queue_proto::items::{InboxItem, UserMessage};
use queue_proto::keys::{MasterKey, SessionSalt, derive_session_keys};

fn python_read(
    master: &MasterKey,
    salt: &SessionSalt,
    session: &str,
    seq: Seq,
    path: &Path,
) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/read_segment.py");
    let python = std::env::var("IRONCLAW_PYTHON").unwrap_or_else(|_| "python3".into());
    Command::new(python)
        .arg(script)
        .arg(hex::encode(master.expose_secret()))
        .arg(hex::encode(salt.expose_secret()))
        .args([session, "inbox", &seq.0.to_string()])
        .arg(path)
        .output()
        .expect("python3 runs (install it with .ci/run)")
}

#[test]
fn python_opens_a_segment_from_the_documented_derivation_only() {
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKey::generate().unwrap();
    let id = SessionId::try_from("interop-a").unwrap();
    let salt = SessionSalt::generate().unwrap();
    let keys = derive_session_keys(&master, &id, &salt);
    let items: Vec<InboxItem> = ["first", "second \u{1f510}"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            InboxItem::UserMessage(UserMessage {
                message_id: i as u64,
                received_at: 1_700_000_000,
                text: t.to_string(),
                local_time: String::new(),
                time_zone: String::new(),
                attachments: 0,
            })
        })
        .collect();
    let seq = Seq(0x1234_5678_9abc);
    let path = InboxWriter::new(dir.path().to_owned(), id.clone(), &keys)
        .publish(seq, &items)
        .unwrap();

    let out = python_read(&master, &salt, "interop-a", seq, &path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the independent reader failed: {stderr}"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["kind"], "user_message");
    assert_eq!(lines[0]["item"]["text"], "first");
    assert_eq!(lines[1]["item"]["text"], "second \u{1f510}");
    assert_eq!(lines[1]["item"]["message_id"], 1);

    // Another session's derivation (its own id and salt) cannot open it.
    let other_salt = SessionSalt::generate().unwrap();
    let out = python_read(&master, &other_salt, "interop-b", seq, &path);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open segment"));
    // Nor can the right session id with a destroyed-and-replaced salt.
    let out = python_read(&master, &other_salt, "interop-a", seq, &path);
    assert!(!out.status.success());
}
