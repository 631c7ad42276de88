//! Prints what the gateway costs: filing an agent's change request over its proxy socket
//! (policy, risk, a synced store transaction and its audit entry), approving and applying
//! a change through the admin socket, a request to the admin HTTP API (the tailnet peer
//! check with tailscaled's `whois`, against a loopback fake), and checking the audit
//! trail (which `serve` does in full at every start). Run with `scripts/bench-gateway`.

#![allow(clippy::unwrap_used)] // bench code: a failed unwrap is a failed run

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use control_plane::admin::{Request, Response};
use queue_proto::keys::MasterKey;
use tests::service::Serve;

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "{what}: p50 {:.2} ms  p99 {:.2} ms  ({} runs)",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
        times.len()
    );
}

fn post(sock: &std::path::Path, body: &str) -> u16 {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let req = format!(
        "POST /v1/change-requests HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // Limits raised: the bench measures the path, not the refusals.
    let mut s = Serve::init(
        &control_plane::config::DEFAULT_CONFIG
            .replace(
                "max_pending_per_requester = 5",
                "max_pending_per_requester = 1000",
            )
            .replace(
                "max_requests_per_minute = 20",
                "max_requests_per_minute = 100000",
            ),
    );
    s.start();
    s.send("bench", "hello", 120).unwrap();
    let layout = control_plane::sandbox::layout::Layout::new(&s.state, &s.state.join("run"));
    let id = queue_proto::ids::SessionId::try_from("bench").unwrap();
    let sock = runsc_config::socket_path(&layout.socket_dir(&id));

    let mut filed = Vec::new();
    for i in 0..300 {
        let body = format!(
            r#"{{"target": "instructions", "after": "Be brief, {i}.", "reason": "bench"}}"#
        );
        let t = Instant::now();
        assert_eq!(post(&sock, &body), 200);
        filed.push(t.elapsed());
    }
    report(
        "agent change request filed (socket → policy → synced store + audit)",
        filed,
    );

    // Each round files one request and approves it: each applies a new version and
    // restarts the live session.
    let mut applied = Vec::new();
    for i in 0..50 {
        // A restart leaves the session idle until its next message.
        s.send("bench", "hello", 120).unwrap();
        let body = format!(
            r#"{{"target": "budgets", "after": "{{\"requests_per_minute\": {}}}", "reason": "bench"}}"#,
            100 + i
        );
        assert_eq!(post(&sock, &body), 200);
        let newest = s
            .changes(false)
            .into_iter()
            .find(|c| c.target == "budgets")
            .unwrap();
        let hash = s.change(&newest.id).after_hash;
        let t = Instant::now();
        let answer = s
            .request(&Request::ChangesDecide {
                id: newest.id.clone(),
                approve: true,
                hash: Some(hash),
                withdraw: false,
            })
            .unwrap();
        applied.push(t.elapsed());
        assert!(
            matches!(
                &answer,
                Response::Decided {
                    outcome: control_plane::admin::Outcome::Applied,
                    ..
                }
            ),
            "{answer:?}"
        );
    }
    report(
        "approval over the admin socket (checked, applied, sessions restarted)",
        applied,
    );
    drop(s);
    admin_api();

    // The audit trail: appending, and verifying it whole.
    let dir = tempfile::tempdir().unwrap();
    let master = MasterKey::from_bytes([3; 32]);
    let mut store =
        control_plane::store::Store::create(&dir.path().join("c.db"), &master, 1).unwrap();
    let n = 100_000;
    let detail = serde_json::json!({ "session": "tg-123456789", "provider": "anthropic",
        "input_tokens": 1234, "output_tokens": 567, "bytes": 8901 });
    let t = Instant::now();
    for i in 0..n {
        store
            .record(control_plane::audit::AuditEvent::ModelCall, &detail, i)
            .unwrap();
    }
    let append = t.elapsed();
    let t = Instant::now();
    let count = store.verify_audit(&master).unwrap();
    let verify = t.elapsed();
    println!(
        "audit append (unsynced entry, head check and seal): {:.1} µs per entry",
        append.as_secs_f64() * 1e6 / n as f64
    );
    println!(
        "audit verify: {count} entries in {:.0} ms ({:.0} entries/s)",
        verify.as_secs_f64() * 1000.0,
        count as f64 / verify.as_secs_f64()
    );
}

/// Requests to the admin HTTP API from tailnet addresses on `lo`, each on a new
/// connection: the peer check (ranges, then `whois` over tailscaled's socket) and the
/// answer, for an operator and for a refused peer.
fn admin_api() {
    use tests::fake_tailscaled::{FakeTailscaled, Known};
    use tests::loopback::{LoopbackAddress, request_from};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = LoopbackAddress::add("100.101.9.1");
    let other = LoopbackAddress::add("100.101.9.2");
    let laptop = LoopbackAddress::add("100.101.9.3");
    let peers = [
        (
            "100.101.9.3".to_owned(),
            Known::User("alice@example.com".into()),
        ),
        (
            "100.101.9.2".to_owned(),
            Known::User("mallory@example.com".into()),
        ),
    ];
    let fake = rt.block_on(FakeTailscaled::start(peers.into_iter().collect()));
    let listen = std::net::SocketAddr::new(server.ip, server.free_port());
    let config = format!(
        "{}\ntailnet = [\"alice@example.com\"]\n\n[admin_api]\nlisten = \"{listen}\"\ntailscaled_socket = \"{}\"\n",
        control_plane::config::DEFAULT_CONFIG,
        fake.socket.display()
    )
    .replace("# tailnet = [\"alice@example.com\"]", "");
    let mut s = Serve::init(&config);
    s.start();
    let get = |from| {
        rt.block_on(request_from(
            from,
            listen,
            "GET",
            "/api/v1/health",
            &[],
            b"",
        ))
        .map(|(_, a)| a.status)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(laptop.ip).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for (who, from, status) in [
        ("operator", laptop.ip, 200),
        ("refused peer", other.ip, 403),
    ] {
        let mut times = Vec::new();
        for _ in 0..300 {
            let t = Instant::now();
            assert_eq!(get(from).unwrap(), status);
            times.push(t.elapsed());
        }
        report(
            &format!("admin API request, new connection, {who} (whois + answer)"),
            times,
        );
    }
    s.stop();
}
