//! `sandbox-probe`: a static binary that runs inside a session sandbox in place of the
//! agent, launched the same way (same spec, keys through stdin), and reports what an
//! attacker in control of the agent could see and do, as one JSON object on stdout.
//! The tests in `tests/tests/sandbox.rs` judge the report; they also run it under
//! weakened specs to show each check fires.

#![forbid(unsafe_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use queue_proto::keys::SessionKeys;
use serde_json::{Value, json};

/// Files larger than this are scanned only up to here.
const SCAN_LIMIT: u64 = 64 * 1024 * 1024;

fn errno_of(r: std::io::Result<()>) -> Value {
    match r {
        Ok(()) => json!("ok"),
        Err(e) => json!(
            e.raw_os_error()
                .map(|n| n.to_string())
                .unwrap_or_else(|| e.to_string())
        ),
    }
}

/// The mount flags (`ST_RDONLY`, `ST_NOEXEC`, …) of the file system holding `path`.
fn mount_flags(path: &str) -> Value {
    match rustix::fs::statvfs(path) {
        Ok(v) => {
            use rustix::fs::StatVfsMountFlags as F;
            let named = [
                (F::RDONLY, "ro"),
                (F::NOEXEC, "noexec"),
                (F::NOSUID, "nosuid"),
                (F::NODEV, "nodev"),
            ];
            json!(
                named
                    .iter()
                    .filter(|(f, _)| v.f_flag.contains(*f))
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
            )
        }
        Err(e) => json!(format!("error: {e}")),
    }
}

fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// Walks the file system from `/`, skipping `/proc` and `/sys` (kernel views of this
/// very process, which hold its own memory), collecting regular files and sockets.
fn walk(dir: &Path, files: &mut Vec<PathBuf>, sockets: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path == Path::new("/proc") || path == Path::new("/sys") || path == Path::new("/dev") {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(&path, files, sockets);
        } else if ft.is_socket() {
            sockets.push(path);
        } else if ft.is_file() {
            files.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn main() {
    let mut handover = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut handover);
    let keys = SessionKeys::from_handover(&handover).map(|(_, k)| k);
    let mut needles: Vec<Vec<u8>> = Vec::new();
    if let Ok(k) = &keys {
        for key in [
            &k.inbox.db,
            &k.inbox.envelope,
            &k.outbox.db,
            &k.outbox.envelope,
            &k.agent_state,
        ] {
            needles.push(key.expose_secret().to_vec());
            needles.push(hex::encode(key.expose_secret()).into_bytes());
        }
    }

    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let interfaces: Vec<String> = fs::read_to_string("/proc/net/dev")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(|n| n.trim().to_owned()))
        .collect();

    let outside: SocketAddr = "1.1.1.1:443".parse().expect("literal address");
    let tcp = TcpStream::connect_timeout(&outside, Duration::from_secs(2)).map(drop);
    let dns = UdpSocket::bind("0.0.0.0:0").and_then(|s| {
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        // A DNS query for example.com, type A.
        let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
        s.send_to(query, "8.8.8.8:53")?;
        let mut buf = [0u8; 512];
        s.recv_from(&mut buf).map(drop)
    });

    let mut files = Vec::new();
    let mut sockets = Vec::new();
    walk(Path::new("/"), &mut files, &mut sockets);
    files.push("/proc/self/environ".into());
    files.push("/proc/self/cmdline".into());
    let mut key_hits = Vec::new();
    let mut readable = 0usize;
    for f in &files {
        let Ok(file) = fs::File::open(f) else {
            continue;
        };
        let mut bytes = Vec::new();
        if file.take(SCAN_LIMIT).read_to_end(&mut bytes).is_err() {
            continue;
        }
        readable += 1;
        if needles.iter().any(|n| contains(&bytes, n)) {
            key_hits.push(f.display().to_string());
        }
    }
    let connectable: Vec<String> = sockets
        .iter()
        .filter(|s| UnixStream::connect(s).is_ok())
        .map(|s| s.display().to_string())
        .collect();
    let env: Vec<String> = std::env::vars_os()
        .map(|(k, v)| format!("{}={}", k.to_string_lossy(), v.to_string_lossy()))
        .collect();
    let env_hits = env
        .iter()
        .any(|e| needles.iter().any(|n| contains(e.as_bytes(), n)));

    let report = json!({
        "handover_ok": keys.is_ok(),
        "proc_version": fs::read_to_string("/proc/version").unwrap_or_default().trim(),
        "root_write": errno_of(fs::write("/probe-was-here", b"x")),
        "inbox_write": errno_of(fs::write("/inbox/probe-was-here", b"x")),
        "outbox_write": errno_of(fs::write("/outbox/probe-was-here", b"x").and_then(|()| fs::remove_file("/outbox/probe-was-here"))),
        "mounts": {
            "/": mount_flags("/"),
            "/inbox": mount_flags("/inbox"),
            "/outbox": mount_flags("/outbox"),
            "/run/ironclaw": mount_flags("/run/ironclaw"),
            "/tmp": mount_flags("/tmp"),
        },
        "mountinfo": fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        "proxy_connect": errno_of(UnixStream::connect("/run/ironclaw/proxy.sock").map(drop)),
        "sockets_found": sockets.iter().map(|s| s.display().to_string()).collect::<Vec<_>>(),
        "socket_dir_write": errno_of(fs::write("/run/ironclaw/probe-was-here", b"x")),
        "interfaces": interfaces,
        "tcp_outside": errno_of(tcp),
        "dns": errno_of(dns),
        "cap_eff": status_field(&status, "CapEff:"),
        "cap_prm": status_field(&status, "CapPrm:"),
        "cap_bnd": status_field(&status, "CapBnd:"),
        "no_new_privs": rustix::thread::no_new_privs().map_err(|e| e.to_string()),
        "uid": status_field(&status, "Uid:"),
        "readable_files": readable,
        "key_hits": key_hits,
        "env": env,
        "env_key_hits": env_hits,
        "argv": std::env::args().collect::<Vec<_>>(),
        "connectable_sockets": connectable,
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{report}");
}
