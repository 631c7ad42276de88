//! The sandbox under real gVisor: a probe launched exactly like the agent reports what a
//! hijacked agent could do; weakened specs show each check fires; keys travel only
//! through stdin; nothing is orphaned after a kill; bombs end only their own session.
//!
//! Needs root, `runsc` and `runc` (scripts/setup installs them) and the static binaries
//! named by `IRONCLAW_AGENT_BIN` and `IRONCLAW_PROBE_BIN` (scripts/test builds them with
//! scripts/build-static).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::sandbox::launch::spec_for;
use control_plane::sandbox::layout::{self, Layout};
use control_plane::sandbox::lifecycle::{Event, Exit, Manager};
use control_plane::sandbox::runtime::{RunscRuntime, Runtime};
use control_plane::sandbox::{Limits, SandboxSettings};
use queue_proto::ids::SessionId;
use queue_proto::keys::{MasterKey, SessionKeys, SessionSalt, derive_session_keys};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

/// A fake API key placed in the control plane's environment: it must never be visible
/// inside a sandbox.
const API_KEY_CANARY: &str = "sk-canary-3b7e61c0d2f94a58";

fn binary(var: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: build the static binaries with scripts/build-static (scripts/test does)")
    });
    assert!(path.is_file(), "{var}={} does not exist", path.display());
    path
}

fn session(name: &str) -> (SessionId, SessionKeys) {
    let id = SessionId::try_from(name).unwrap();
    let keys = derive_session_keys(
        &MasterKey::generate().unwrap(),
        &id,
        &SessionSalt::generate().unwrap(),
    );
    (id, keys)
}

fn key_needles(keys: &SessionKeys) -> Vec<Vec<u8>> {
    let all = [
        &keys.inbox.db,
        &keys.inbox.envelope,
        &keys.outbox.db,
        &keys.outbox.envelope,
        &keys.agent_state,
    ];
    all.iter()
        .flat_map(|k| {
            [
                k.expose_secret().to_vec(),
                hex::encode(k.expose_secret()).into_bytes(),
            ]
        })
        .chain([API_KEY_CANARY.as_bytes().to_vec()])
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Stand-ins for "outside": a TCP listener and a DNS server on the host's loopback. A
/// sandbox without network cannot reach them; one with the host's network can.
struct Outside {
    tcp: TcpListener,
    dns: SocketAddr,
}

fn outside() -> Outside {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = udp.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(&buf[..n], from); // echo: any answer counts as reached
        }
    });
    Outside { tcp, dns }
}

struct Rig {
    dir: tempfile::TempDir,
    settings: SandboxSettings,
    layout: Layout,
    outside: Outside,
    _proxies: Vec<UnixListener>,
    /// Whether the probe is ordered to fill its outbox.
    fill: bool,
}

impl Rig {
    fn new(agent: &Path) -> Rig {
        let dir = tempfile::Builder::new()
            .prefix("icsb")
            .tempdir_in("/tmp")
            .unwrap();
        let mut settings = SandboxSettings::new(dir.path().join("state"), agent.to_owned());
        settings.run_dir = dir.path().join("run");
        settings.ready_timeout = Duration::from_secs(60);
        let layout = Layout::new(&settings.state_dir, &settings.run_dir);
        Rig {
            dir,
            settings,
            layout,
            outside: outside(),
            _proxies: Vec::new(),
            fill: false,
        }
    }

    /// Prepares a session's directories, its probe orders and a listening proxy socket.
    fn prepare(&mut self, s: &SessionId, bomb: Option<&str>) {
        self.proxy_socket(s);
        self.orders(s, bomb);
        let _ = std::fs::remove_file(self.layout.outbox(s).join("probe.json"));
    }

    /// Prepares a session's directories and a proxy socket that accepts connections
    /// and never answers: a real agent's first `wait` then simply blocks.
    fn proxy_socket(&mut self, s: &SessionId) {
        layout::prepare_session(&self.layout, s, self.settings.uid, self.settings.gid).unwrap();
        let sock = runsc_config::socket_path(&self.layout.socket_dir(s));
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).unwrap();
        std::os::unix::fs::chown(&sock, Some(self.settings.uid), Some(self.settings.gid)).unwrap();
        self._proxies.push(listener);
    }

    fn orders(&self, s: &SessionId, bomb: Option<&str>) {
        let orders = json!({
            "tcp": self.outside.tcp.local_addr().unwrap().to_string(),
            "dns": self.outside.dns.to_string(),
            "bomb": bomb,
            "fill": self.fill,
        });
        std::fs::write(self.layout.inbox(s).join("probe.json"), orders.to_string()).unwrap();
    }

    fn manager(&self) -> (Arc<Manager>, UnboundedReceiver<Event>) {
        Manager::new(Arc::new(RunscRuntime::default()), self.settings.clone()).unwrap()
    }

    fn report(&self, s: &SessionId) -> Value {
        let path = self.layout.outbox(s).join("probe.json");
        self.try_report(s)
            .unwrap_or_else(|| panic!("no probe report at {}", path.display()))
    }

    /// The probe's report, or `None` if it has not appeared within a minute.
    fn try_report(&self, s: &SessionId) -> Option<Value> {
        let path = self.layout.outbox(s).join("probe.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(bytes) = std::fs::read(&path) {
                return Some(serde_json::from_slice(&bytes).unwrap());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Host processes that belong to this rig's sandboxes (runsc passes its --root to
    /// every process it starts).
    fn sandbox_processes(&self) -> Vec<(u32, String)> {
        let marker = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
            .filter(|pid| *pid != std::process::id())
            .filter_map(|pid| {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                cmd.contains(&marker).then_some((pid, cmd))
            })
            .collect()
    }

    fn runsc_list(&self) -> String {
        let out = Command::new("runsc")
            .arg(format!("--root={}", self.layout.runsc_root().display()))
            .args(["list", "--quiet"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// Every guarantee the probe report must show, by name; returns the broken ones.
fn broken_guarantees(r: &Value) -> Vec<&'static str> {
    let host_kernel = std::fs::read_to_string("/proc/version").unwrap();
    let opts = |m: &str| -> Vec<String> {
        r["mounts"][m]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let has = |m: &str, o: &str| opts(m).iter().any(|x| x == o);
    let zero = |f: &str| {
        r[f].as_str()
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b == b'0'))
    };
    let text = |f: &str| r[f].as_str().unwrap_or("").to_owned();
    let env: Vec<String> = r["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let argv = r["argv"].clone();
    let mut broken = Vec::new();
    let mut require = |ok: bool, name: &'static str| {
        if !ok {
            broken.push(name);
        }
    };
    require(
        has("/", "ro") && text("root_write") != "ok",
        "root is read-only",
    );
    require(
        has("/inbox", "ro") && text("inbox_write") != "ok",
        "/inbox is read-only",
    );
    require(
        text("outbox_write") == "ok" && has("/outbox", "noexec"),
        "/outbox is writable and noexec",
    );
    require(has("/tmp", "noexec"), "/tmp is noexec");
    require(has("/sys", "ro"), "/sys is read-only");
    require(r["interfaces"] == json!(["lo"]), "only lo exists");
    require(text("tcp_outside") != "ok", "outside TCP fails");
    require(text("dns") != "ok", "DNS fails");
    require(
        zero("cap_eff") && zero("cap_prm") && zero("cap_bnd"),
        "no capabilities",
    );
    require(r["no_new_privs"] == json!({"Ok": true}), "NoNewPrivs is 1");
    require(
        !text("uid").starts_with("0\t") && !text("uid").is_empty(),
        "uid is not 0",
    );
    require(r["handover_ok"] == json!(true), "keys arrive on stdin");
    require(
        r["key_hits"] == json!([])
            && r["env_key_hits"] == json!(false)
            && !env.iter().any(|e| e.contains(API_KEY_CANARY))
            && env.len() == runsc_config::ENVIRONMENT.len()
            && argv == json!([runsc_config::AGENT_PATH]),
        "no key material in env, argv or files",
    );
    require(
        r["connectable_sockets"] == json!(["/run/ironclaw/proxy.sock"]),
        "proxy.sock is the only socket",
    );
    require(
        text("proc_version") != host_kernel.trim() && !text("proc_version").is_empty(),
        "the kernel is gVisor's",
    );
    broken
}

async fn wait_for_exit(
    manager: &Manager,
    events: &mut UnboundedReceiver<Event>,
    s: &SessionId,
) -> Exit {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        manager.tick().await;
        while let Ok(e) = events.try_recv() {
            if let Event::Ended { session, exit } = e
                && &session == s
            {
                return exit;
            }
        }
        assert!(Instant::now() < deadline, "session {s} did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_probe_finds_every_guarantee_in_a_real_sandbox() {
    if !in_process_with_canary_env("the_probe_finds_every_guarantee_in_a_real_sandbox") {
        return;
    }
    let mut rig = Rig::new(&binary("IRONCLAW_PROBE_BIN"));
    let (s, keys) = session("probe");
    rig.prepare(&s, None);
    let (manager, _events) = rig.manager();
    manager.ensure_running(&s, &keys).await.unwrap();
    let report = rig.report(&s);
    assert_eq!(
        broken_guarantees(&report),
        Vec::<&str>::new(),
        "report: {report:#}"
    );
    manager.stop(&s).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_reach_the_agent_only_through_stdin() {
    if !in_process_with_canary_env("keys_reach_the_agent_only_through_stdin") {
        return;
    }
    let mut rig = Rig::new(&binary("IRONCLAW_AGENT_BIN"));
    let (s, keys) = session("stdin-only");
    rig.proxy_socket(&s);
    let (manager, _events) = rig.manager();
    // The real agent prints `ready` only after it decoded its keys from stdin.
    manager.ensure_running(&s, &keys).await.unwrap();
    let needles = key_needles(&keys);

    let mut scanned = 0;
    for dir in [
        rig.layout.bundle(&s),
        rig.layout.rootfs(),
        rig.layout.inbox(&s),
        rig.layout.outbox(&s),
        rig.layout.socket_dir(&s),
    ] {
        for f in tests::files_under(&dir) {
            let bytes = std::fs::read(&f).unwrap_or_default();
            scanned += 1;
            assert!(
                !needles.iter().any(|n| contains(&bytes, n)),
                "key material in {}",
                f.display()
            );
        }
    }
    assert!(rig.layout.bundle(&s).join("config.json").is_file());
    let procs = rig.sandbox_processes();
    assert!(
        procs.len() >= 2,
        "runsc and its sandbox processes are found: {procs:?}"
    );
    for (pid, cmd) in &procs {
        assert!(
            !needles.iter().any(|n| contains(cmd.as_bytes(), n)),
            "key material in the command line of {pid}"
        );
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !needles.iter().any(|n| contains(&environ, n)),
            "key material in the environment of {pid}"
        );
    }
    assert!(scanned >= 2);
    manager.stop(&s).await.unwrap();
}

/// Weakens a good config and runsc command line (the session's keys at hand).
type Weaken = Box<dyn Fn(&mut Value, &mut Vec<String>, &Rig, &SessionKeys)>;

/// runc instead of runsc: the same bundle, run on the host kernel without gVisor.
/// (Debian's crun refuses this machine's hybrid cgroup layout; runc accepts it.)
fn use_runc(a: &mut Vec<String>, rig: &Rig) {
    let bundle = a
        .iter()
        .find_map(|x| x.strip_prefix("--bundle="))
        .unwrap()
        .to_owned();
    let id = a.last().unwrap().clone();
    *a = vec![
        "runc".into(),
        format!("--root={}", rig.dir.path().join("runc").display()),
        "run".into(),
        "--bundle".into(),
        bundle,
        id,
    ];
}

/// The host's network: runsc's `--network=host`, and no network namespace of its own.
#[allow(clippy::ptr_arg)] // shares the `Weaken` signature
fn host_network(c: &mut Value, a: &mut Vec<String>, _: &Rig, _: &SessionKeys) {
    a[2] = "--network=host".into();
    c["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|n| n["type"] != "network");
}

fn unchanged(_: &mut Value, _: &mut Vec<String>, _: &Rig, _: &SessionKeys) {}

/// Runs the probe once, by hand, with a (possibly weakened) config and runtime, and
/// returns its report.
fn run_weakened(rig: &mut Rig, name: &str, weaken: &Weaken) -> Value {
    let (s, keys) = session(name);
    rig.prepare(&s, None);
    layout::install_rootfs(&rig.layout, &rig.settings.agent_binary).unwrap();
    let mut config = runsc_config::oci_config(&spec_for(
        &rig.settings,
        &rig.layout,
        &s,
        (rig.settings.uid, rig.settings.gid),
    ))
    .unwrap();
    let bundle = rig.layout.bundle(&s);
    let mut cmd = runsc_config::runsc_run_args(&rig.layout.runsc_root(), &bundle, &s);
    cmd.insert(0, "runsc".into());
    weaken(&mut config, &mut cmd, rig, &keys);
    std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&keys.to_handover(&s))
        .unwrap();
    let report = rig.try_report(&s);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    // A case run by runc leaves its container (and the cgroup runc made for it) until
    // runc removes it; then runsc's clean-up finds the cgroup empty or gone.
    let runc_root = format!("--root={}", rig.dir.path().join("runc").display());
    let id = runsc_config::container_id(&s);
    let _ = Command::new("runc")
        .args([&runc_root, "kill", &id, "KILL"])
        .status();
    std::thread::sleep(Duration::from_millis(200));
    let _ = Command::new("runc")
        .args([&runc_root, "delete", "-f", &id])
        .status();
    RunscRuntime::default().destroy(&rig.layout, &s).unwrap();
    report.unwrap_or_else(|| {
        panic!(
            "{name}: no probe report; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn each_probe_fires_against_a_weakened_spec() {
    let mut rig = Rig::new(&binary("IRONCLAW_PROBE_BIN"));
    let baseline = run_weakened(&mut rig, "baseline", &(Box::new(unchanged) as Weaken));
    assert_eq!(
        broken_guarantees(&baseline),
        Vec::<&str>::new(),
        "the hand-run baseline passes: {baseline:#}"
    );

    let cases: Vec<(&str, &str, Weaken)> = vec![
        (
            "rw-root",
            "root is read-only",
            Box::new(|c, _, _, _| c["root"]["readonly"] = json!(false)),
        ),
        (
            "rw-sys",
            "/sys is read-only",
            Box::new(|c, _, _, _| c["mounts"][5]["options"][0] = json!("rw")),
        ),
        (
            "rw-inbox",
            "/inbox is read-only",
            Box::new(|c, _, _, _| c["mounts"][2]["options"][1] = json!("rw")),
        ),
        ("host-net", "only lo exists", Box::new(host_network)),
        ("host-net-tcp", "outside TCP fails", Box::new(host_network)),
        ("host-net-dns", "DNS fails", Box::new(host_network)),
        (
            "caps",
            "no capabilities",
            Box::new(|c, _, _, _| {
                for set in [
                    "bounding",
                    "effective",
                    "permitted",
                    "inheritable",
                    "ambient",
                ] {
                    // Not CAP_NET_RAW: runsc strips that one unless given --net-raw.
                    c["process"]["capabilities"][set] = json!(["CAP_SYS_ADMIN"]);
                }
            }),
        ),
        (
            // gVisor reports NoNewPrivs 1 whatever the spec says, so this weakening needs
            // a runtime that honours the flag.
            "nnp",
            "NoNewPrivs is 1",
            Box::new(|c, a, rig, _| {
                c["process"]["noNewPrivileges"] = json!(false);
                use_runc(a, rig);
            }),
        ),
        (
            "root-uid",
            "uid is not 0",
            Box::new(|c, _, _, _| {
                c["process"]["user"]["uid"] = json!(0);
                // Root without capabilities cannot write the agent's 0700 outbox; open it
                // so the report can get out.
                let outbox = c["mounts"][3]["source"].as_str().unwrap();
                std::fs::set_permissions(
                    outbox,
                    std::os::unix::fs::PermissionsExt::from_mode(0o777),
                )
                .unwrap();
            }),
        ),
        (
            "env-key",
            "no key material in env, argv or files",
            Box::new(|c, _, _, _| {
                c["process"]["env"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!(format!("API_KEY={API_KEY_CANARY}")))
            }),
        ),
        (
            "key-file",
            "no key material in env, argv or files",
            Box::new(|c, _, rig, keys| {
                // Leaves one of the session's keys in a file the sandbox can read.
                let dir = rig.dir.path().join("leak");
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("key"), hex::encode(keys.inbox.db.expose_secret()))
                    .unwrap();
                c["mounts"].as_array_mut().unwrap().push(json!({
                    "destination": "/leak", "type": "bind", "source": dir, "options": ["rbind", "ro"]
                }));
            }),
        ),
        (
            "extra-socket",
            "proxy.sock is the only socket",
            Box::new(|c, _, rig, _| {
                let dir = rig.dir.path().join("other-sock");
                std::fs::create_dir_all(&dir).unwrap();
                let l = UnixListener::bind(dir.join("control.sock")).unwrap();
                std::os::unix::fs::chown(dir.join("control.sock"), Some(65534), Some(65534))
                    .unwrap();
                Box::leak(Box::new(l)); // listening for the rest of the test
                c["mounts"].as_array_mut().unwrap().push(json!({
                    "destination": "/run/other", "type": "bind", "source": dir, "options": ["rbind", "ro"]
                }));
            }),
        ),
        (
            "runc",
            "the kernel is gVisor's",
            Box::new(|_, a, rig, _| use_runc(a, rig)),
        ),
    ];
    for (name, guarantee, weaken) in cases {
        let report = run_weakened(&mut rig, name, &weaken);
        let broken = broken_guarantees(&report);
        assert!(
            broken.contains(&guarantee),
            "{name}: expected \"{guarantee}\" to break, got {broken:?} in {report:#}"
        );
    }
}

/// Runs the calling test again in a child process whose environment holds the API key
/// canary, as a control plane's would (setting it in this process would race the other
/// tests). Returns true in the child, which then runs the body; false in the parent,
/// after the child passed.
fn in_process_with_canary_env(test: &str) -> bool {
    const VAR: &str = "IRONCLAW_MODEL_API_KEY";
    if std::env::var(VAR).as_deref() == Ok(API_KEY_CANARY) {
        return true;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(VAR, API_KEY_CANARY)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn kills_leave_no_orphan_after_the_next_start() {
    let mut rig = Rig::new(&binary("IRONCLAW_AGENT_BIN"));
    let (s, keys) = session("orphans");
    rig.proxy_socket(&s);

    // Killing the agent: runsc kills the container's process; the manager reaps it and
    // removes the sandbox.
    let (manager, mut events) = rig.manager();
    manager.ensure_running(&s, &keys).await.unwrap();
    let status = Command::new("runsc")
        .arg(format!("--root={}", rig.layout.runsc_root().display()))
        .args(["kill", &runsc_config::container_id(&s), "KILL"])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_for_exit(&manager, &mut events, &s).await;
    assert_ne!(exit, Exit::Stopped);
    drop(manager);
    let (manager, _events) = rig.manager();
    assert_eq!(rig.runsc_list(), "");
    assert_eq!(rig.sandbox_processes(), vec![], "after killing the agent");

    // Killing `runsc run` itself leaves gVisor's sentry and gofer behind until the next
    // start removes them.
    manager.ensure_running(&s, &keys).await.unwrap();
    let runsc_run = rig
        .sandbox_processes()
        .into_iter()
        .find(|(_, c)| c.contains(" run "))
        .unwrap();
    Command::new("kill")
        .args(["-KILL", &runsc_run.0.to_string()])
        .status()
        .unwrap();
    drop(manager); // dropping cleans nothing up: the sandbox processes are left to chance
    std::thread::sleep(Duration::from_millis(300));
    let (manager, _events) = rig.manager();
    assert_eq!(rig.runsc_list(), "");
    assert_eq!(rig.sandbox_processes(), vec![], "after killing runsc");

    // Killing the control plane: a separate process that starts a sandbox and is
    // SIGKILLed.
    drop(manager);
    // The proxy socket is the test's, not the holder's: it outlives the holder, so the
    // agent waits on it instead of exiting when its control plane dies.
    rig.proxy_socket(&SessionId::try_from("held").unwrap());
    let holder = env!("CARGO_BIN_EXE_sandbox-holder");
    let mut child = Command::new(holder)
        .arg(&rig.settings.state_dir)
        .arg(&rig.settings.run_dir)
        .arg(&rig.settings.agent_binary)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "started");
    assert!(!rig.sandbox_processes().is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !rig.sandbox_processes().is_empty(),
        "the sandbox outlives its control plane"
    );
    let (_manager, _events) = rig.manager();
    assert_eq!(rig.runsc_list(), "");
    assert_eq!(
        rig.sandbox_processes(),
        vec![],
        "after killing the control plane"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bombs_end_only_their_own_session() {
    let mut rig = Rig::new(&binary("IRONCLAW_PROBE_BIN"));
    rig.settings.limits = Limits {
        memory_bytes: 192 * 1024 * 1024,
        pids: 256,
        ..Limits::default()
    };
    let (quiet, quiet_keys) = session("bystander");
    rig.prepare(&quiet, None);
    let (manager, mut events) = rig.manager();
    manager.ensure_running(&quiet, &quiet_keys).await.unwrap();

    // The bystander runs in the cgroup the control plane made, with its limits.
    let memory = cgroup(&rig.layout, "memory", &quiet);
    assert_eq!(
        std::fs::read_to_string(memory.join("memory.limit_in_bytes"))
            .unwrap()
            .trim(),
        (192 * 1024 * 1024).to_string()
    );
    assert_eq!(
        std::fs::read_to_string(cgroup(&rig.layout, "pids", &quiet).join("pids.max"))
            .unwrap()
            .trim(),
        "256"
    );
    let procs = std::fs::read_to_string(memory.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().count() >= 2,
        "gVisor's sentry and gofer: {procs:?}"
    );

    for bomb in ["fork-bomb", "memory-bomb"] {
        let (s, keys) = session(bomb);
        rig.prepare(&s, Some(bomb));
        manager.ensure_running(&s, &keys).await.unwrap();
        let exit = wait_for_exit(&manager, &mut events, &s).await;
        assert_eq!(exit, Exit::KilledByLimit, "{bomb}");
        for controller in ["memory", "pids", "cpu"] {
            assert!(
                !cgroup(&rig.layout, controller, &s).exists(),
                "{bomb}: its cgroup is removed"
            );
        }
        assert!(
            !manager.is_running(&s).await,
            "{bomb}: not restarted in a loop"
        );
        assert!(
            manager.is_running(&quiet).await,
            "{bomb}: the other session still runs"
        );
        // The next message restarts it cleanly (the probe is told not to bomb again).
        rig.orders(&s, None);
        manager.ensure_running(&s, &keys).await.unwrap();
        manager.stop(&s).await.unwrap();
    }
    manager.stop(&quiet).await.unwrap();
    assert_eq!(rig.runsc_list(), "");
}

/// `session`'s cgroup directory under a v1 `controller` (the layout of this machine).
fn cgroup(layout: &Layout, controller: &str, session: &SessionId) -> PathBuf {
    let path = runsc_config::cgroup_path(&layout.instance(), session);
    Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'))
}

/// An agent that exits with the codes runsc itself gives a sandbox a limit killed is
/// still a crash: only the kernel's count in the cgroup makes a limit kill.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_pass_its_own_exit_for_a_limit_kill() {
    let mut rig = Rig::new(&binary("IRONCLAW_PROBE_BIN"));
    let (manager, mut events) = rig.manager();
    for code in [2, 137] {
        let order = format!("exit-{code}");
        let (s, keys) = session(&order);
        rig.prepare(&s, Some(&order));
        manager.ensure_running(&s, &keys).await.unwrap();
        let exit = wait_for_exit(&manager, &mut events, &s).await;
        assert_eq!(exit, Exit::Crashed { code: Some(code) }, "{order}");
        manager.forget(&s).await.unwrap();
    }
    assert_eq!(rig.runsc_list(), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sandboxes_stop_capped_ones_die_and_crashes_restart_with_backoff() {
    let mut rig = Rig::new(&binary("IRONCLAW_PROBE_BIN"));
    rig.settings.idle_timeout = Duration::from_secs(1);
    rig.settings.wall_clock_cap = Duration::from_secs(3600);
    rig.settings.restart.first_delay = Duration::from_millis(500);
    let (idle, idle_keys) = session("idler");
    rig.prepare(&idle, None);
    let (manager, mut events) = rig.manager();
    manager.ensure_running(&idle, &idle_keys).await.unwrap();
    assert_eq!(
        wait_for_exit(&manager, &mut events, &idle).await,
        Exit::Stopped
    );
    assert!(!manager.is_running(&idle).await);
    assert_eq!(rig.runsc_list(), "", "an idle stop leaves no sandbox");

    // A crash is restarted by the supervisor after its backoff, without a new message.
    let (crashy, crashy_keys) = session("crasher");
    rig.prepare(&crashy, Some("crash"));
    manager.ensure_running(&crashy, &crashy_keys).await.unwrap();
    let exit = wait_for_exit(&manager, &mut events, &crashy).await;
    assert_eq!(exit, Exit::Crashed { code: Some(1) });
    rig.orders(&crashy, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !manager.is_running(&crashy).await {
        assert!(
            Instant::now() < deadline,
            "the crashed session was not restarted"
        );
        manager.tick().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    manager.stop(&crashy).await.unwrap();
    drop(manager);

    // The wall-clock cap ends a sandbox even while it is busy.
    rig.settings.idle_timeout = Duration::from_secs(3600);
    rig.settings.wall_clock_cap = Duration::from_secs(2);
    let (busy, busy_keys) = session("busy");
    rig.prepare(&busy, None);
    let (manager, mut events) = rig.manager();
    manager.ensure_running(&busy, &busy_keys).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        manager.ensure_running(&busy, &busy_keys).await.unwrap(); // activity
        manager.tick().await;
        if let Ok(Event::Ended { exit, .. }) = events.try_recv() {
            break exit;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(exit, Exit::WallClockCap);
    assert_eq!(rig.runsc_list(), "");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_writes_without_end_fills_only_its_own_outbox() {
    const LIMIT: u64 = 16 * 1024 * 1024;
    let mut rig = Rig::new(&binary("IRONCLAW_PROBE_BIN"));
    rig.settings.outbox_bytes = Some(LIMIT);
    rig.fill = true;
    let (s, keys) = session("filler");
    rig.prepare(&s, None);
    let (manager, _events) = rig.manager();
    manager.ensure_running(&s, &keys).await.unwrap();
    let report = rig.report(&s);
    manager.stop(&s).await.unwrap();
    layout::release_outbox(&rig.layout, &s).unwrap();
    let written = report["fill_bytes"].as_u64().unwrap();
    // ENOSPC: the outbox's own file system is full; nothing else is.
    assert_eq!(report["fill_error"], json!(28), "{report:#}");
    assert!(
        written < LIMIT,
        "the agent wrote {written} bytes into a {LIMIT}-byte outbox"
    );
    // On the state directory's file system the outbox is one file of the limit's size
    // (and the host file system's own bookkeeping for it), whatever the agent wrote.
    let image = std::fs::metadata(rig.layout.outbox_image(&s)).unwrap();
    assert_eq!(image.len(), LIMIT);
    let used = std::os::unix::fs::MetadataExt::blocks(&image) * 512;
    assert!(used <= LIMIT + 1024 * 1024, "{used} bytes on the host");
}

#[test]
fn an_outbox_from_before_its_limit_moves_into_its_file_system_whole_and_owned() {
    use std::os::unix::fs::MetadataExt;
    let rig = Rig::new(&binary("IRONCLAW_AGENT_BIN"));
    let (s, _) = session("migrated");
    // An outbox as an agent of the shared uid left it: its state, a pending segment.
    layout::prepare_session(&rig.layout, &s, 65534, 65534).unwrap();
    let outbox = rig.layout.outbox(&s);
    std::fs::create_dir(outbox.join("state")).unwrap();
    std::fs::write(outbox.join("state/agent.db"), b"the agent's memory").unwrap();
    std::fs::write(outbox.join("0000000000000003.db"), b"a segment").unwrap();
    for p in ["state", "state/agent.db", "0000000000000003.db"] {
        std::os::unix::fs::chown(outbox.join(p), Some(65534), Some(65534)).unwrap();
    }
    // Too small for what it holds: refused, nothing mounted, nothing lost.
    let big = vec![7u8; 12 * 1024 * 1024];
    std::fs::write(outbox.join("state/history.db"), &big).unwrap();
    assert!(layout::limit_outbox(&rig.layout, &s, 8 * 1024 * 1024, 300_000, 300_000).is_err());
    assert!(!rig.layout.outbox_image(&s).exists());
    assert_eq!(std::fs::read(outbox.join("state/history.db")).unwrap(), big);
    // Large enough: moved in whole and handed to the session's own uid.
    layout::limit_outbox(&rig.layout, &s, 32 * 1024 * 1024, 300_000, 300_000).unwrap();
    let moved = (
        std::fs::read(outbox.join("state/agent.db")),
        std::fs::metadata(outbox.join("state/agent.db")).map(|m| m.uid()),
        std::fs::metadata(outbox.join("state")).map(|m| m.uid()),
        std::fs::read(outbox.join("state/history.db")).map(|b| b.len()),
    );
    layout::release_outbox(&rig.layout, &s).unwrap();
    assert_eq!(moved.0.unwrap(), b"the agent's memory");
    assert_eq!((moved.1.unwrap(), moved.2.unwrap()), (300_000, 300_000));
    assert_eq!(moved.3.unwrap(), big.len());
    // Nothing is left hidden under the mount point.
    assert_eq!(std::fs::read_dir(&outbox).unwrap().count(), 0);
}
