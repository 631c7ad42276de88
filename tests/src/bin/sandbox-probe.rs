//! `sandbox-probe`: a static binary that runs inside a session sandbox in place of the
//! agent, launched the same way (same spec, keys through stdin), and reports what an
//! attacker in control of the agent could see and do. It writes one JSON object to
//! `/outbox/probe.json`, then prints `ready` like the agent and waits to be stopped.
//!
//! Its orders come from `/inbox/probe.json`, written by the test: the loopback addresses
//! that stand for "outside" (a TCP listener and a fake DNS server on the host, which the
//! sandbox must not reach), and an optional bomb to set off after `ready`
//! (`fork-bomb`, `memory-bomb`), or a `crash` (exit 1) or a chosen exit (`exit-2`,
//! `exit-137`: the codes runsc uses for a killed sentry) after `ready`. Nothing it does
//! sends traffic beyond this machine.
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

/// The per-mount options (`ro`, `noexec`, …) of each mount point, from mountinfo.
fn mount_options() -> Value {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = serde_json::Map::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let (Some(point), Some(opts)) = (fields.get(4), fields.get(5)) {
            out.insert(
                (*point).to_owned(),
                json!(opts.split(',').collect::<Vec<_>>()),
            );
        }
    }
    Value::Object(out)
}

/// The most a fill writes: enough to pass any test's outbox limit, little enough that a
/// weakened run without one does not fill the host.
const FILL_CAP: u64 = 192 * 1024 * 1024;

/// Writes zeros to `/outbox/fill` in 1 MiB pieces until a write fails or [`FILL_CAP`]
/// is reached; returns the bytes written and the error, if one stopped it.
fn fill_outbox() -> (u64, Value) {
    use std::io::Write;
    let chunk = vec![0u8; 1024 * 1024];
    let mut written = 0u64;
    let mut error = Value::Null;
    match fs::File::create("/outbox/fill") {
        Ok(mut f) => {
            while written < FILL_CAP {
                match f.write(&chunk) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) => {
                        error = json!(e.raw_os_error());
                        break;
                    }
                }
            }
            if error.is_null()
                && let Err(e) = f.sync_all()
            {
                error = json!(e.raw_os_error());
            }
        }
        Err(e) => error = json!(e.raw_os_error()),
    }
    let _ = fs::remove_file("/outbox/fill");
    (written, error)
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

    let orders: Value = fs::read("/inbox/probe.json")
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let addr =
        |name: &str| -> Option<SocketAddr> { orders[name].as_str().and_then(|a| a.parse().ok()) };
    let tcp = match addr("tcp") {
        Some(a) => TcpStream::connect_timeout(&a, Duration::from_secs(2)).map(drop),
        None => Err(std::io::Error::other("no tcp target given")),
    };
    let dns = match addr("dns") {
        Some(a) => UdpSocket::bind("0.0.0.0:0").and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            // A DNS query for example.com, type A.
            let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
            s.send_to(query, a)?;
            let mut buf = [0u8; 512];
            s.recv_from(&mut buf).map(drop)
        }),
        None => Err(std::io::Error::other("no dns target given")),
    };

    // Ordered to: write into /outbox until a write fails (at most FILL_CAP), then
    // remove what it wrote, so the report still fits.
    let (fill_bytes, fill_error) = if orders["fill"] == json!(true) {
        fill_outbox()
    } else {
        (0, Value::Null)
    };

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
    // The socket directory is searchable but not listable, so the known name is tried
    // besides every socket the walk found.
    let known = PathBuf::from("/run/ironclaw/proxy.sock");
    if !sockets.contains(&known) {
        sockets.push(known);
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
        "mounts": mount_options(),
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
        "fill_bytes": fill_bytes,
        "fill_error": fill_error,
    });
    let _ = fs::write("/outbox/probe.json.tmp", report.to_string())
        .and_then(|()| fs::rename("/outbox/probe.json.tmp", "/outbox/probe.json"));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready").and_then(|()| out.flush());
    drop(out);

    match orders["bomb"].as_str() {
        Some("fork-bomb") => fork_bomb(),
        Some("memory-bomb") => memory_bomb(),
        Some("crash") => std::process::exit(1),
        Some("exit-2") => std::process::exit(2),
        Some("exit-137") => std::process::exit(137),
        _ => {}
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Creates threads without end: under gVisor's ptrace platform each is a host thread, so
/// this runs into the sandbox's pids limit.
fn fork_bomb() {
    loop {
        let _ = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(|| std::thread::sleep(Duration::from_secs(3600)));
    }
}

/// Allocates and touches memory without end, into the sandbox's memory limit.
fn memory_bomb() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![0x5a; 8 * 1024 * 1024]);
    }
}
