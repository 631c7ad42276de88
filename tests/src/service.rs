//! Runs the real `ironclaw` binary as a separate process on a state directory of its
//! own, so tests can talk to it as an operator would, kill it with SIGKILL and start it
//! again. The binary is `$IRONCLAW_BIN` (set by scripts/test), else the workspace's
//! debug build.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use control_plane::admin::{self, Request, Response};
use control_plane::sandbox::layout::Layout;
use control_plane::sandbox::runtime::{NetNs, RunscRuntime, Runtime};
use control_plane::store::changes::{ChangeDetail, ChangeSummary};
use control_plane::store::sessions::SessionSummary;

/// The `ironclaw` binary under test.
pub fn ironclaw_bin() -> PathBuf {
    std::env::var_os("IRONCLAW_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ironclaw"),
        PathBuf::from,
    )
}

/// The static agent binary (`$IRONCLAW_AGENT_BIN`, set by scripts/test).
pub fn agent_bin() -> PathBuf {
    PathBuf::from(
        std::env::var_os("IRONCLAW_AGENT_BIN").expect("IRONCLAW_AGENT_BIN is set by scripts/test"),
    )
}

/// One state directory and the `serve` running on it (if any).
#[derive(Debug)]
pub struct Serve {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub log: PathBuf,
    /// Extra environment for `serve` (what systemd would pass, such as
    /// `CREDENTIALS_DIRECTORY`).
    pub env: Vec<(String, PathBuf)>,
    child: Option<Child>,
}

impl Serve {
    /// `ironclaw init` on a fresh directory, then `config` written as its configuration.
    pub fn init(config: &str) -> Serve {
        let dir = tempfile::Builder::new()
            .prefix("icsv")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let state = dir.path().join("s");
        let out = Command::new(ironclaw_bin())
            .args(["init", "--state-dir"])
            .arg(&state)
            .output()
            .expect("run ironclaw init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(state.join("config.toml"), config).expect("write config");
        let log = dir.path().join("serve.log");
        Serve {
            dir,
            state,
            log,
            env: Vec::new(),
            child: None,
        }
    }

    /// A serve (gVisor, the `[model]` body `model`) reading Telegram at the fake whose
    /// base address is `api_base`, with the bot token `token` in a 0600 file, letting
    /// `users` in. Started.
    pub fn telegram(api_base: &str, token: &str, users: &[i64], model: &str) -> Serve {
        let mut s = Serve::init("");
        let token = s.secret_file("tg.token", token);
        let users: Vec<String> = users.iter().map(i64::to_string).collect();
        std::fs::write(
            s.state.join("config.toml"),
            format!(
                "[model]\n{model}\n\n[sandbox]\nruntime = \"gvisor\"\n\n\
                 [channels.telegram]\ntoken_file = \"{}\"\napi_base = \"{api_base}\"\n\
                 allowed_users = [{}]\npoll_timeout_secs = 1\n",
                token.display(),
                users.join(", ")
            ),
        )
        .expect("write config");
        s.start();
        s
    }

    /// A private (0600) file in the test directory holding `text`.
    pub fn secret_file(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.dir.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .expect("create secret file");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write secret file");
        p
    }

    /// Starts `serve` and waits until its admin socket answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new(ironclaw_bin())
            .args(["serve", "--state-dir"])
            .arg(&self.state)
            .env("IRONCLAW_AGENT_BIN", agent_bin())
            .env("IRONCLAW_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ironclaw serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("serve exited at start ({status}):\n{}", self.log_text());
            }
            // Any answer means the admin socket is up (a refusal included).
            if self.request(&Request::SessionsList).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("serve did not come up:\n{}", self.log_text());
    }

    /// The pid of the running `serve`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let pid = rustix::process::Pid::from_raw(c.id() as i32).expect("a child pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    pub fn request(&self, req: &Request) -> Result<Response, admin::AdminError> {
        admin::request(
            &self.state.join("run/admin.sock"),
            req,
            Duration::from_secs(300),
        )
    }

    /// `ironclaw send`: the replies, or the error.
    pub fn send(
        &self,
        session: &str,
        text: &str,
        wait_secs: u64,
    ) -> Result<(String, Vec<String>), String> {
        let req = Request::Send {
            session: session.into(),
            text: text.into(),
            wait_secs,
        };
        match self.request(&req).map_err(|e| e.to_string())? {
            // The state's word, as the CLI's users read it ("gone" if the message is).
            Response::Replies { state, replies, .. } => {
                Ok((state.map_or("gone", |s| s.as_str()).to_owned(), replies))
            }
            Response::Error(e) => Err(e.message),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    pub fn sessions(&self) -> Vec<SessionSummary> {
        match self.request(&Request::SessionsList).expect("sessions list") {
            Response::Sessions(s) => s,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// Runs the CLI against this state directory.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(ironclaw_bin())
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .expect("run ironclaw")
    }

    /// `ironclaw audit export`, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let out = self.cli(&["audit", "export"]);
        assert!(
            out.status.success(),
            "audit export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Audit entries of `kind`.
    pub fn audit_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Change requests: the undecided ones, or all.
    pub fn changes(&self, all: bool) -> Vec<ChangeSummary> {
        match self
            .request(&Request::ChangesList { all })
            .expect("changes list")
        {
            Response::Changes(c) => c,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// One change request in full.
    pub fn change(&self, id: &str) -> ChangeDetail {
        match self
            .request(&Request::ChangesShow { id: id.into() })
            .expect("changes show")
        {
            Response::Change { detail, .. } => *detail,
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// Decides as this process's uid: the outcome (`applied`, `rejected`, `refused`)
    /// and why.
    pub fn decide(&self, id: &str, approve: bool, hash: Option<&str>) -> (String, Option<String>) {
        let req = Request::ChangesDecide {
            id: id.into(),
            approve,
            hash: hash.map(str::to_owned),
            withdraw: false,
        };
        match self.request(&req).expect("changes decide") {
            Response::Decided { outcome, why, .. } => (outcome.as_str().to_owned(), why),
            other => panic!("unexpected answer {other:?}"),
        }
    }

    /// The control store, opened as an attacker holding the control-store key would.
    pub fn store(&self) -> rusqlite::Connection {
        let master = control_plane::state::StateDir::choose(Some(self.state.clone()))
            .load_master_key()
            .expect("master key");
        let key = queue_proto::keys::derive_control_store_key(&master);
        queue_proto::sqlcipher::open_keyed(&self.state.join("control.db"), &key)
            .expect("open the control store")
    }

    /// The approved configuration versions: (version, text).
    pub fn versions(&self) -> Vec<(i64, String)> {
        let conn = self.store();
        let mut stmt = conn
            .prepare("SELECT version, text FROM config_versions ORDER BY version")
            .expect("query versions");
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("versions")
            .collect::<Result<_, _>>()
            .expect("versions")
    }

    /// Sends SIGHUP (the configuration file is compared with the approved version).
    pub fn hup(&self) {
        let pid = self.pid().expect("running");
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.stop().is_none() {
            self.kill9();
        }
        // Sandboxes a killed serve left behind.
        let layout = Layout::new(&self.state, &self.state.join("run"));
        if let Ok(runtime) = RunscRuntime::private("runsc".into(), &layout) {
            for s in runtime.leftovers(&layout).unwrap_or_default() {
                runtime.kill(&layout, &s);
                let _ = runtime.destroy(&layout, &s);
            }
        }
        // The sandboxes' network namespace, which serve keeps across its restarts.
        let _ = NetNs::of(&layout).remove();
        // The sessions' outbox file systems, which stay mounted across restarts too.
        for point in mounts_under(&self.state) {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
    }
}

/// Polls `f` every 100 ms until it holds or `secs` have passed; whether it held.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// One HTTP/1.1 request to 127.0.0.1:`port` on a fresh connection: the status and the body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("http");
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .expect("http");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("http");
    // The server may answer (413) and close before the whole body is written.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(Vec::new(), |i| out[i + 4..].to_vec());
    (status, body)
}

/// `POST /v1/messages` to the bridge on `port`: the status and the JSON answer.
pub fn bridge_post(port: u16, token: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, body) = http(
        port,
        "POST",
        "/v1/messages",
        Some(token),
        body.to_string().as_bytes(),
    );
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A TCP port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Reads every regular file under `dir` whole (outbox images included) and panics,
/// naming the file, if one holds any of `secrets` in plaintext; the bytes read.
pub fn assert_nothing_plain(dir: &Path, secrets: &[&[u8]]) -> u64 {
    let mut scanned = 0u64;
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("dir entry");
        let path = entry.path();
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            scanned += assert_nothing_plain(&path, secrets);
        } else if kind.is_file() {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            scanned += bytes.len() as u64;
            for s in secrets {
                assert!(
                    !contains(&bytes, s),
                    "{} in plaintext in {}",
                    String::from_utf8_lossy(s),
                    path.display()
                );
            }
        }
    }
    scanned
}
