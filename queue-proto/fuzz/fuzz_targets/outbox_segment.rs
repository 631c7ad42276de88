//! Outbox-segment ingestion: arbitrary bytes as the file an agent published. The first
//! byte chooses a SQLCipher reader (fixed keys) or a plain-SQLite reader on the same code
//! path, so the fuzzer also reaches the schema, header and row checks that sit behind
//! decryption. Whatever the bytes, the reader must return, not panic or hang.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use queue_proto::control::OutboxReader;
use queue_proto::ids::{SessionId, Seq};
use queue_proto::keys::{MasterKey, SessionSalt, derive_session_keys};

struct Dirs {
    _root: tempfile::TempDir,
    outbox: std::path::PathBuf,
    private: std::path::PathBuf,
}

fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = tempfile::tempdir().expect("temp dir");
        let outbox = root.path().join("outbox.d");
        let private = root.path().join("private");
        std::fs::create_dir(&outbox).expect("outbox dir");
        std::fs::create_dir(&private).expect("private dir");
        Dirs { _root: root, outbox, private }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, file)) = data.split_first() else { return };
    let d = dirs();
    let session = SessionId::try_from("fuzz").expect("valid id");
    let keys = derive_session_keys(&MasterKey::from_bytes([7; 32]), &session, &SessionSalt::from_bytes([9; 32]));
    std::fs::write(d.outbox.join(Seq(1).file_name()), file).expect("write input");
    let reader = OutboxReader::new(d.outbox.clone(), d.private.clone(), session, &keys);
    let reader = if mode & 1 == 0 { reader.without_file_encryption() } else { reader };
    let _ = reader.read(Seq(1));
});
