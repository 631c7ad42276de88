//! Service benchmark: the real `ironclaw serve` process, the console channel, the
//! offline demo model (instant) and the real agent.
//! - warm round trip (message in → reply out, through the admin socket) p50/p99 over
//!   200 messages, under gVisor and under the host runtime in the same run, as a ratio;
//! - messages per second across 20 concurrent sessions (gVisor);
//! - resident memory of `serve` idle and with 20 live sessions.
//!
//! Run: `scripts/bench-service` (builds the release binaries, then
//! `cargo bench -p tests --bench service`). Needs root and runsc.

use std::time::{Duration, Instant};

use tests::service::Serve;

const ROUND_TRIPS: usize = 200;
const WARM_UP: usize = 10;
const SESSIONS: usize = 20;
const PER_SESSION: usize = 20;

fn config(runtime: &str) -> String {
    format!(
        "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"{runtime}\"\n\n[budgets]\nrequests_per_minute = 1000000\n"
    )
}

fn round_trip(s: &Serve, session: &str, text: &str) -> Duration {
    let t = Instant::now();
    let (state, replies) = s.send(session, text, 60).expect("send");
    let d = t.elapsed();
    assert_eq!(state, "answered", "{replies:?}");
    assert_eq!(replies.len(), 1, "{replies:?}");
    d
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// p50 and p99 of warm round trips, in milliseconds.
fn warm(runtime: &str) -> (f64, f64) {
    let mut s = Serve::init(&config(runtime));
    s.start();
    for i in 0..WARM_UP {
        round_trip(&s, "bench", &format!("warm-up {i}"));
    }
    let mut times: Vec<Duration> = (0..ROUND_TRIPS)
        .map(|i| round_trip(&s, "bench", &format!("message {i}")))
        .collect();
    times.sort();
    s.stop();
    (percentile(&times, 0.50), percentile(&times, 0.99))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn main() {
    let (g50, g99) = warm("gvisor");
    let (h50, h99) = warm("host");
    println!("warm round trip over {ROUND_TRIPS} messages (console → agent → reply, demo model):");
    println!("  gvisor  p50 {g50:.2} ms  p99 {g99:.2} ms");
    println!("  host    p50 {h50:.2} ms  p99 {h99:.2} ms");
    println!(
        "  ratio gvisor/host: p50 {:.2}x  p99 {:.2}x",
        g50 / h50,
        g99 / h99
    );

    let mut s = Serve::init(&config("gvisor"));
    s.start();
    let pid = s.pid().expect("serve runs");
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(pid);
    let names: Vec<String> = (0..SESSIONS).map(|i| format!("bench-{i}")).collect();
    for n in &names {
        round_trip(&s, n, "start");
    }
    let t = Instant::now();
    std::thread::scope(|scope| {
        for n in &names {
            let s = &s;
            scope.spawn(move || {
                for i in 0..PER_SESSION {
                    round_trip(s, n, &format!("concurrent {i}"));
                }
            });
        }
    });
    let elapsed = t.elapsed().as_secs_f64();
    let live = rss_kib(pid);
    println!(
        "throughput: {} messages across {SESSIONS} concurrent sessions in {elapsed:.2} s = {:.0} messages/s",
        SESSIONS * PER_SESSION,
        (SESSIONS * PER_SESSION) as f64 / elapsed
    );
    println!(
        "serve resident memory: idle {:.1} MiB, with {SESSIONS} live sessions {:.1} MiB",
        idle as f64 / 1024.0,
        live as f64 / 1024.0
    );
    s.stop();
}
