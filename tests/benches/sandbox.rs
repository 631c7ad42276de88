//! Sandbox benchmark, under real gVisor:
//! - cold start (spawn → agent ready) p50/p95 over 20 runs through the real launch path,
//!   next to `runsc run` of a trivial static binary in the same run, as a ratio;
//! - the memory of an idle session (PSS summed over all its host processes) with 10
//!   sessions idle, next to a raw `runsc` sandbox running a static sleeper;
//! - the static agent's size.
//!
//! Run: `scripts/bench-sandbox` (builds the static binaries, then
//! `cargo bench -p tests --bench sandbox`). Needs root and runsc.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::sandbox::SandboxSettings;
use control_plane::sandbox::lifecycle::Manager;
use control_plane::sandbox::runtime::RunscRuntime;
use queue_proto::ids::SessionId;
use queue_proto::keys::{MasterKey, SessionKeys, SessionSalt, derive_session_keys};
use serde_json::json;

const COLD_RUNS: usize = 20;
const IDLE_SESSIONS: usize = 10;

fn env_path(var: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os(var)
            .unwrap_or_else(|| panic!("{var} is not set: run scripts/bench-sandbox")),
    )
}

fn session(i: usize) -> (SessionId, SessionKeys) {
    let id = SessionId::try_from(format!("bench-{i}").as_str()).expect("valid id");
    let keys = derive_session_keys(
        &MasterKey::generate().expect("rng"),
        &id,
        &SessionSalt::generate().expect("rng"),
    );
    (id, keys)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// PSS in KiB of `pid` and every descendant of it.
fn tree_pss_kib(pid: u32) -> u64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised command name.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        if let Some(ppid) = after
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse::<u32>().ok())
        {
            children.entry(ppid).or_default().push(p);
        }
    }
    let mut total = 0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(rollup) = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")) {
            total += rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        stack.extend(children.get(&p).into_iter().flatten());
    }
    total
}

/// A raw runsc bundle: runsc's minimal spec, a read-only root holding only `binary`.
fn raw_bundle(dir: &Path, binary: &Path, args: &[&str]) -> PathBuf {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs");
    std::fs::copy(binary, rootfs.join("payload")).expect("copy payload");
    let mut argv = vec!["/payload"];
    argv.extend(args);
    let config = json!({
        "ociVersion": "1.0.2",
        "process": { "args": argv, "cwd": "/", "env": ["PATH=/"], "user": { "uid": 65534, "gid": 65534 } },
        "root": { "path": rootfs, "readonly": true },
        "linux": { "namespaces": [{ "type": "pid" }, { "type": "network" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }] }
    });
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle");
    std::fs::write(bundle.join("config.json"), config.to_string()).expect("config");
    bundle
}

fn raw_runsc(root: &Path, bundle: &Path, id: &str) -> Command {
    let mut cmd = Command::new("runsc");
    cmd.arg(format!("--root={}", root.display()))
        .args(["--network=none", "--platform=ptrace", "run"])
        .arg(format!("--bundle={}", bundle.display()))
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

#[tokio::main]
async fn main() {
    let agent = env_path("IRONCLAW_AGENT_BIN");
    let sleeper = env_path("IRONCLAW_SLEEPER_BIN");
    let dir = tempfile::Builder::new()
        .prefix("icbench")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let mut settings = SandboxSettings::new(dir.path().join("state"), agent.clone());
    settings.run_dir = dir.path().join("run");
    let (manager, _events) =
        Manager::new(Arc::new(RunscRuntime::default()), settings.clone()).expect("manager");
    // Each session gets a proxy socket that accepts and never answers, so a started
    // agent sits idle in its first `wait`, as it does between messages.
    let mut proxies = Vec::new();
    let mut with_socket = |id: &SessionId| {
        let layout = manager.layout();
        control_plane::sandbox::layout::prepare_session(layout, id, settings.uid, settings.gid)
            .expect("dirs");
        let sock = runsc_config::socket_path(&layout.socket_dir(id));
        proxies.push(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        std::os::unix::fs::chown(&sock, Some(settings.uid), Some(settings.gid)).expect("chown");
    };

    // Cold start through the real launch path, interleaved with raw runsc runs of a
    // trivial static binary.
    let raw_root = dir.path().join("raw-runsc");
    let trivial = raw_bundle(&dir.path().join("trivial"), &sleeper, &[]);
    let (mut cold, mut raw) = (Vec::new(), Vec::new());
    for i in 0..COLD_RUNS {
        let (id, keys) = session(i);
        with_socket(&id);
        let t = Instant::now();
        manager.ensure_running(&id, &keys).await.expect("start");
        cold.push(t.elapsed());
        manager.stop(&id).await.expect("stop");

        let t = Instant::now();
        let status = raw_runsc(&raw_root, &trivial, &format!("raw-{i}"))
            .status()
            .expect("runsc");
        raw.push(t.elapsed());
        assert!(status.success(), "raw runsc run failed");
        let _ = Command::new("runsc")
            .arg(format!("--root={}", raw_root.display()))
            .args(["delete", "--force", &format!("raw-{i}")])
            .status();
    }
    cold.sort_unstable();
    raw.sort_unstable();
    println!("cold start, spawn -> agent ready, {COLD_RUNS} runs:");
    println!(
        "  ironclaw session   p50 {:7.1} ms   p95 {:7.1} ms",
        ms(percentile(&cold, 0.5)),
        ms(percentile(&cold, 0.95))
    );
    println!(
        "  raw runsc run      p50 {:7.1} ms   p95 {:7.1} ms   (trivial static binary, start to exit)",
        ms(percentile(&raw, 0.5)),
        ms(percentile(&raw, 0.95))
    );
    println!(
        "  ratio (p50)        {:.2}x   (target <= 1.5x)",
        ms(percentile(&cold, 0.5)) / ms(percentile(&raw, 0.5))
    );

    // Memory of idle sessions.
    let mut ids = Vec::new();
    for i in 0..IDLE_SESSIONS {
        let (id, keys) = session(100 + i);
        with_socket(&id);
        manager.ensure_running(&id, &keys).await.expect("start");
        ids.push(id);
    }
    let sleeping = raw_bundle(&dir.path().join("sleeper"), &sleeper, &["sleep"]);
    let mut raw_child = raw_runsc(&raw_root, &sleeping, "raw-sleeper")
        .spawn()
        .expect("runsc");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut pss = Vec::new();
    for id in &ids {
        pss.push(tree_pss_kib(manager.pid(id).await.expect("running")));
    }
    let raw_pss = tree_pss_kib(raw_child.id());
    let mean = pss.iter().sum::<u64>() as f64 / pss.len() as f64;
    println!(
        "idle memory, PSS summed over each sandbox's host processes, {IDLE_SESSIONS} sessions idle:"
    );
    println!(
        "  ironclaw session   mean {:6.1} MiB   min {:6.1}   max {:6.1}",
        mean / 1024.0,
        *pss.iter().min().expect("some") as f64 / 1024.0,
        *pss.iter().max().expect("some") as f64 / 1024.0
    );
    println!(
        "  raw runsc sleeper       {:6.1} MiB",
        raw_pss as f64 / 1024.0
    );
    println!(
        "  ratio              {:.2}x   (target <= 1.2x)",
        mean / raw_pss as f64
    );
    let _ = Command::new("runsc")
        .arg(format!("--root={}", raw_root.display()))
        .args(["kill", "raw-sleeper", "KILL"])
        .status();
    let _ = raw_child.wait();
    let _ = Command::new("runsc")
        .arg(format!("--root={}", raw_root.display()))
        .args(["delete", "--force", "raw-sleeper"])
        .status();
    manager.stop_all().await;

    let size = std::fs::metadata(&agent).expect("agent").len();
    println!(
        "static agent size: {:.2} MiB ({size} bytes; target <= 12 MiB)",
        size as f64 / 1048576.0
    );
    let _ = std::io::stdout().flush();
}
