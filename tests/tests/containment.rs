//! Containment, from the attacker's side, against the real `ironclaw serve` under real
//! gVisor: what one local user, one agent or one stranger can reach beyond their lane.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use control_plane::sandbox::layout::Layout;
use control_plane::sandbox::runtime::NetNs;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tests::fake_telegram::FakeTelegram;
use tests::service::Serve;

const TG_TOKEN: &str = "123456:tg-token-c0ffee77";

/// An unprivileged local user (not root, not the agents' uid).
const LOCAL_USER: u32 = 1000;

/// What an unprivileged local user finds of runsc's control sockets: every abstract
/// socket named `@runsc-…` listed in `/proc/net/unix`, and whether connecting to each of
/// those and to `expected` (as a name, written as `/proc/net/unix` shows it) succeeds.
fn probe_control_sockets(expected: &str) -> Value {
    let script = r#"
import json, socket, sys
names = set()
with open("/proc/net/unix") as f:
    for line in f:
        parts = line.split()
        if len(parts) >= 8 and parts[7].startswith("@runsc-"):
            names.add(parts[7][1:])
names_listed = sorted(names)
names.add(sys.argv[1])
reached = []
for name in sorted(names):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # /proc/net/unix shows a NUL in a name as "@".
        s.connect("\0" + name.replace("@", "\0"))
        reached.append(name)
    except OSError:
        pass
    finally:
        s.close()
print(json.dumps({"listed": names_listed, "reached": reached}))
"#;
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={LOCAL_USER}"),
            &format!("--regid={LOCAL_USER}"),
            "--clear-groups",
            "--",
            "/usr/bin/python3",
            "-c",
            script,
            expected,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the probe ran: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_local_user_reaches_no_runsc_control_socket_of_a_live_session() {
    let mut s = Serve::init("[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n");
    s.start();
    let (state, _) = s.send("probe", "hello", 60).unwrap();
    assert_eq!(state, "answered");
    let found = probe_control_sockets("runsc-sandbox.ironclaw-probe@");
    assert_eq!(
        found["listed"],
        serde_json::json!([]),
        "no runsc control socket is visible to a local user: {found}"
    );
    assert_eq!(
        found["reached"],
        serde_json::json!([]),
        "no runsc control socket answers a local user: {found}"
    );
    // The session's sandbox is live (it stops only when idle for ten minutes), and its
    // control socket exists, in the namespace serve keeps for its sandboxes: the probe
    // above looked for something that is there.
    let layout = Layout::new(&s.state, &s.state.join("run"));
    let ns = NetNs::of(&layout);
    let inside = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["--", "cat", "/proc/net/unix"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&inside.stdout).contains("@runsc-sandbox.ironclaw-probe"),
        "the probe looks for a socket that exists"
    );
    // The sandbox still works behind its wall.
    let (state, _) = s.send("probe", "still there?", 60).unwrap();
    assert_eq!(state, "answered");
}

#[test]
fn an_agents_escape_sequences_never_reach_the_operators_terminal_raw() {
    let mut s = Serve::init("[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n");
    s.start();
    // The demo model echoes the message: a compromised agent's reply could hold the same.
    // OSC 52 writes the terminal's clipboard; CSI 2J clears the screen; U+2028 breaks
    // a line where none shows; U+200B hides inside a word.
    let hostile = "copy \x1b]52;c;cm0gLXJmIH4=\x07 clear \x1b[2J sep\u{2028}x zero\u{200b}width";
    let out = s.cli(&["send", "--session", "esc", hostile]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.contains("You said: copy"), "{shown}");
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "no escape byte reaches the terminal: {shown:?}"
    );
    assert!(
        !shown.contains('\u{2028}') && !shown.contains('\u{200b}'),
        "{shown:?}"
    );
    assert!(
        shown.contains("\\u{1b}]52;c;cm0gLXJmIH4=\\u{7}") && shown.contains("\\u{200b}"),
        "they are shown as escapes: {shown:?}"
    );
    // --raw prints the reply as it came, for an operator who asks for it.
    let out = s.cli(&["send", "--session", "esc", "--raw", hostile]);
    assert!(out.status.success());
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("\x1b]52;c;")
    );
}

/// Copies a directory tree as root keeps it (owners and modes), replacing `to`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn an_agent_whose_state_went_back_still_has_its_new_replies_delivered() {
    let mut s = Serve::init("[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n");
    s.start();
    assert_eq!(s.send("back", "first", 60).unwrap().0, "answered");
    // A snapshot of the agent's own state, taken while its sandbox is stopped.
    s.stop();
    let state = s.state.join("sessions/back/outbox.d/state");
    let snapshot = s.state.join("agent-state-snapshot");
    copy_tree(&state, &snapshot);
    s.start();
    assert_eq!(s.send("back", "second", 60).unwrap().0, "answered");
    // The agent's state goes back (its database is not synced at every commit): its
    // next turn is published under the seq the second one used.
    s.stop();
    copy_tree(&snapshot, &state);
    s.start();
    let (state_word, replies) = s.send("back", "third", 30).unwrap();
    assert_eq!(state_word, "answered", "{replies:?}");
    assert!(
        replies.iter().any(|r| r.contains("You said: third")),
        "{replies:?}"
    );
    let ingested = s.audit_of("outbox_ingested");
    assert!(
        ingested
            .iter()
            .any(|e| e["detail"]["seq_reused"] == true && e["detail"]["replies"] == 1),
        "the reuse is recorded: {ingested:#?}"
    );
}

/// A serve (demo model, gVisor) reading Telegram at the fake `tg`, which lets `users`
/// in; its bot token is a 0600 file.
fn telegram_serve(tg: &FakeTelegram, users: &[i64]) -> Serve {
    Serve::telegram(&tg.http.base(), TG_TOKEN, users, "provider = \"demo\"")
}

#[test]
fn strangers_and_groups_cost_a_bounded_number_of_records() {
    const USER: i64 = 4242;
    const STRANGER: i64 = 666;
    const GROUP: i64 = -100_777;
    const FLOOD: usize = 600;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TG_TOKEN));
    let mut s = telegram_serve(&tg, &[USER]);
    for i in 0..FLOOD {
        tg.push_text(STRANGER, &format!("let me in {i}"));
        tg.push_raw(|id| {
            json!({ "update_id": id, "message": { "message_id": id, "date": 0,
                    "from": { "id": USER }, "chat": { "id": GROUP, "type": "group" },
                    "text": format!("in a group {i}") } })
        });
    }
    // The person the assistant serves is still answered in the flood.
    tg.push_text(USER, "hello");
    let answered = tg.wait_for(Duration::from_secs(60), |sent| {
        sent.iter()
            .any(|(chat, text)| *chat == USER && text.contains("You said: hello"))
    });
    assert!(rt.block_on(answered), "{:?}", tg.sent_to(USER));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tg.unconfirmed() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tg.unconfirmed(), 0, "every update was taken");
    // Stopping ends the minute: the counts are recorded.
    s.stop();
    let refused = s.audit_of("message_refused");
    let limited = s.audit_of("message_refusals_limited");
    let counted = |chat: &str| -> u64 {
        limited
            .iter()
            .filter(|e| e["detail"]["chat"] == chat)
            .map(|e| e["detail"]["refused"].as_u64().unwrap())
            .sum()
    };
    for chat in [STRANGER, GROUP] {
        let key = format!("telegram:{chat}");
        let name = chat.to_string();
        let recorded = refused
            .iter()
            .filter(|e| e["detail"]["chat"].as_str() == Some(name.as_str()))
            .count();
        assert!(
            recorded <= 10,
            "at most ten records a minute for {chat}: {recorded}"
        );
        assert_eq!(
            recorded as u64 + counted(&key),
            FLOOD as u64,
            "every refusal of {chat} is recorded or counted: {limited:#?}"
        );
    }
    // The stranger was told once, and nobody in the group was told anything.
    assert_eq!(tg.sent_to(STRANGER).len(), 1);
    assert!(tg.sent_to(GROUP).is_empty());
}

/// Every text or blob value in every table of `conn` that holds `needle`, as
/// `table: value`, leaving out the tables in `except`.
fn rows_holding(conn: &rusqlite::Connection, needle: &str, except: &[&str]) -> Vec<String> {
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut found = Vec::new();
    for t in tables.iter().filter(|t| !except.contains(&t.as_str())) {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{t}\"")).unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..columns {
                let bytes = match row.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => b,
                    _ => continue,
                };
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(format!("{t}: {}", String::from_utf8_lossy(bytes)));
                }
            }
        }
    }
    found
}

#[test]
fn a_deleted_session_leaves_nothing_in_the_store_but_its_audit_counts() {
    const MARK: &str = "fig-7741-marker";
    const NAME: &str = "gone7";
    let mut s = Serve::init("[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n");
    s.start();
    assert_eq!(s.send(NAME, MARK, 60).unwrap().0, "answered");
    assert_eq!(s.send("stays", "hello", 60).unwrap().0, "answered");
    let before = rows_holding(&s.store(), NAME, &["audit"]);
    assert!(
        before.iter().any(|r| r.starts_with("turns:")) && before.len() >= 3,
        "the session has rows to delete: {before:#?}"
    );
    let out = s.cli(&["sessions", "delete", NAME]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing of it is left in any table.
    s.stop();
    let store = s.store();
    assert_eq!(rows_holding(&store, MARK, &[]), Vec::<String>::new());
    assert_eq!(rows_holding(&store, NAME, &["audit"]), Vec::<String>::new());
    assert!(!rows_holding(&store, "stays", &["audit"]).is_empty());
    assert!(
        !rows_holding(&store, NAME, &[]).is_empty(),
        "the trail still counts it"
    );
}

const BRIDGE_TOKEN: &str = "bridge-token-5e11a0c7";

/// A running serve (demo model, gVisor) with the bridge on a free loopback port, its
/// `[channels.bridge]` section ending in `extra`; returns it and the port.
fn bridge_serve(extra: &str) -> (Serve, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = Serve::init("");
    let token = s.secret_file("bridge.token", BRIDGE_TOKEN);
    std::fs::write(
        s.state.join("config.toml"),
        format!(
            "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n\n\
             [channels.bridge]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n{extra}",
            token.display()
        ),
    )
    .unwrap();
    s.start();
    (s, port)
}

#[test]
fn a_client_without_the_token_cannot_take_the_bridge_from_its_users() {
    use std::io::{Read, Write};
    const TOKEN: &str = BRIDGE_TOKEN;
    let (_s, port) = bridge_serve("");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The attacker, from another address, opens every connection the bridge would take
    // and holds them without a word.
    let held: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..control_plane::channels::bridge::MAX_CONNECTIONS {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            if let Ok(c) = sock.connect(addr).await {
                held.push(c);
            }
        }
        held
    });
    assert!(!held.is_empty());
    // A request without the token is answered 401, and its connection closed.
    let mut bad = std::net::TcpStream::connect(addr).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"GET /v1/replies?after=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    bad.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // The bridge's user is served throughout.
    let mut served = 0;
    for _ in 0..18 {
        let Ok(mut c) = std::net::TcpStream::connect(addr) else {
            continue;
        };
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = format!(
            "GET /v1/replies?after=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        );
        if c.write_all(req.as_bytes()).is_err() {
            continue;
        }
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        if got.starts_with(b"HTTP/1.1 200") {
            served += 1;
        }
    }
    assert_eq!(
        served, 18,
        "every request of the bridge's user was answered"
    );
    drop(held);
}

#[test]
fn a_chat_held_back_by_telegram_never_holds_back_another() {
    const A: i64 = 4242;
    const B: i64 = 5353;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TG_TOKEN));
    let s = telegram_serve(&tg, &[A, B]);
    // Telegram holds A's chat back (a 429 asking for 45 s) while A writes on.
    tg.throttle_chat(A, Some(45));
    for i in 0..5 {
        tg.push_text(A, &format!("flood {i}"));
    }
    let held = Instant::now() + Duration::from_secs(60);
    while tg.throttled_sends() == 0 && Instant::now() < held {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(tg.throttled_sends() > 0, "A's replies met the throttle");
    // B's reply goes out at once, not after A's wait.
    let asked = Instant::now();
    tg.push_text(B, "hello");
    let answered = tg.wait_for(Duration::from_secs(15), |sent| {
        sent.iter()
            .any(|(chat, text)| *chat == B && text.contains("You said: hello"))
    });
    assert!(
        rt.block_on(answered),
        "B was answered within 15 s while A waits 45 s: {:?}",
        tg.sent()
    );
    eprintln!("bystander answered after {:?}", asked.elapsed());
    assert!(tg.sent_to(A).is_empty(), "A's chat is still held back");
    // Nothing of A's was given up on: its replies wait their turn in the queue.
    assert!(s.audit_of("delivery_dead_lettered").is_empty());
}

#[test]
fn a_full_outbox_fails_only_its_own_session() {
    let mut s = Serve::init(
        "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\noutbox_mib = 16\n\n\
         [delivery]\nreply_timeout_secs = 10\n",
    );
    s.start();
    assert_eq!(s.send("filled", "first", 60).unwrap().0, "answered");
    // What a runaway agent would do: write into its outbox until nothing more fits
    // (from the host here, as the agent's own uid could; capped, so that an outbox
    // without a limit does not fill this machine).
    let outbox = s.state.join("sessions/filled/outbox.d");
    let chunk = vec![0u8; 1024 * 1024];
    let mut written = 0u64;
    let mut stopped = None;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(outbox.join("fill")).unwrap();
        while written < 192 * 1024 * 1024 {
            match f.write(&chunk) {
                Ok(n) => written += n as u64,
                Err(e) => {
                    stopped = e.raw_os_error();
                    break;
                }
            }
        }
    }
    assert_eq!(stopped, Some(28), "ENOSPC after {written} bytes");
    assert!(written < 16 * 1024 * 1024);
    // The bystander is answered. The filled session goes on as far as its own room
    // allows (segments taken in free theirs): its person gets an answer or a notice,
    // never silence.
    assert_eq!(s.send("bystander", "hello", 60).unwrap().0, "answered");
    let (state, replies) = s.send("filled", "second", 40).unwrap();
    assert!(
        state == "answered" || state == "failed",
        "{state}: {replies:?}"
    );
    assert!(!replies.is_empty(), "the person is told");
    assert_eq!(s.send("bystander", "again", 60).unwrap().0, "answered");
}

#[test]
fn a_process_of_the_same_user_cannot_read_the_control_planes_memory() {
    // serve as an ordinary user (the host runtime needs no root), and another process
    // of that same user trying to read what it holds.
    let dir = tempfile::Builder::new()
        .prefix("icdump")
        .tempdir_in("/tmp")
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(LOCAL_USER), Some(LOCAL_USER)).unwrap();
    let state = dir.path().join("s");
    let as_user = |args: &[&str]| {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={LOCAL_USER}"),
            &format!("--regid={LOCAL_USER}"),
            "--clear-groups",
            "--",
        ]);
        c.args(args);
        c
    };
    let bin = tests::service::ironclaw_bin();
    let bin = bin.to_str().unwrap();
    let out = as_user(&[bin, "init", "--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        state.join("config.toml"),
        format!(
            "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"host\"\n\n[operators]\nunix_uids = [{LOCAL_USER}]\n"
        ),
    )
    .unwrap();
    let mut serve = as_user(&[bin, "serve", "--state-dir", state.to_str().unwrap()])
        .env("IRONCLAW_AGENT_BIN", tests::service::agent_bin())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let socket = state.join("run/admin.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(socket.exists(), "serve came up as the ordinary user");
    let pid = serve.id().to_string();
    let probe = as_user(&[
        "/usr/bin/python3",
        "-c",
        "import sys\ntry:\n open(f'/proc/{sys.argv[1]}/environ','rb').read(); print('read')\nexcept OSError as e: print(e.errno)",
        &pid,
    ])
    .output()
    .unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(
        socket.exists() || deadline < Instant::now(),
        "serve came up"
    );
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "13",
        "EACCES: the process is not dumpable"
    );
}

#[test]
fn a_token_can_come_from_a_systemd_credential_instead_of_a_file_in_the_config() {
    use std::os::unix::fs::OpenOptionsExt;
    const USER: i64 = 4242;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TG_TOKEN));
    let mut s = Serve::init("");
    // What systemd does with LoadCredentialEncrypted=: the decrypted token in a
    // directory of the service's own, named by CREDENTIALS_DIRECTORY.
    let creds = s.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(creds.join("telegram.token"))
        .unwrap();
    std::io::Write::write_all(&mut f, TG_TOKEN.as_bytes()).unwrap();
    s.env.push(("CREDENTIALS_DIRECTORY".into(), creds));
    std::fs::write(
        s.state.join("config.toml"),
        format!(
            "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n\n\
             [channels.telegram]\ntoken_file = \"credential:telegram.token\"\napi_base = \"{}\"\n\
             allowed_users = [{USER}]\npoll_timeout_secs = 1\n",
            tg.http.base()
        ),
    )
    .unwrap();
    s.start();
    tg.push_text(USER, "hello");
    let answered = tg.wait_for(Duration::from_secs(60), |sent| {
        sent.iter()
            .any(|(chat, text)| *chat == USER && text.contains("You said: hello"))
    });
    assert!(rt.block_on(answered), "{:?}", tg.sent());
    assert_eq!(tg.unauthorised_calls(), 0);
    // Without the credentials, serve refuses to start and says why.
    s.stop();
    let out = Command::new("timeout")
        .arg("30")
        .arg(tests::service::ironclaw_bin())
        .args(["serve", "--state-dir"])
        .arg(&s.state)
        .env("IRONCLAW_AGENT_BIN", tests::service::agent_bin())
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code() != Some(124),
        "{said}"
    );
    assert!(said.contains("no credentials were passed"), "{said}");
}

#[test]
fn one_sessions_agent_uid_reads_no_other_sessions_outbox() {
    let mut s = Serve::init("[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n");
    s.start();
    assert_eq!(
        s.send("alice", "a secret of alice", 60).unwrap().0,
        "answered"
    );
    assert_eq!(s.send("bob", "hello", 60).unwrap().0, "answered");
    let outbox = |name: &str| s.state.join(format!("sessions/{name}/outbox.d"));
    let owner =
        |name: &str| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(outbox(name)).unwrap());
    let (alice, bob) = (owner("alice"), owner("bob"));
    assert!(
        alice >= 200_000 && bob >= 200_000 && alice != bob,
        "{alice} {bob}"
    );
    // An agent that escaped its sandbox runs as its session's uid on the host. The state
    // directory (0700, root's) keeps every agent uid out of all of it; opened up here
    // (as if that wall had fallen), each outbox still answers only its own uid.
    std::fs::set_permissions(
        &s.state,
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let list_as = |uid: u32, name: &str| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
                "ls",
            ])
            .arg(outbox(name))
            .output()
            .unwrap()
    };
    assert!(
        list_as(bob, "bob").status.success(),
        "bob's uid reads its own"
    );
    let out = list_as(bob, "alice");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "bob's uid reads alice's outbox: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_spent_model_budget_stays_spent_across_a_restart() {
    let mut s = Serve::init(
        "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n\n[budgets]\ntokens_per_day = 100\n",
    );
    s.start();
    let mut spent = false;
    for i in 0..10 {
        let (_, replies) = s.send("spender", &format!("message {i}"), 60).unwrap();
        if !replies.iter().any(|r| r.contains("You said")) {
            spent = true;
            break;
        }
    }
    assert!(spent, "the day's 100 tokens ran out");
    // A restart (or an applied change, which restarts the session) hands out nothing new.
    s.stop();
    s.start();
    let (_, replies) = s.send("spender", "after the restart", 60).unwrap();
    assert!(
        !replies.iter().any(|r| r.contains("You said")),
        "still spent: {replies:?}"
    );
    // Another session's budget is its own.
    let (_, replies) = s.send("other", "hello", 60).unwrap();
    assert!(
        replies.iter().any(|r| r.contains("You said: hello")),
        "{replies:?}"
    );
}

#[test]
fn a_bridge_client_opens_no_more_chats_than_it_may() {
    use std::io::{Read, Write};
    const TOKEN: &str = BRIDGE_TOKEN;
    let (s, port) = bridge_serve("max_chats = 3\n");
    let post = |chat: &str| -> String {
        let body = format!(r#"{{"chat":"{chat}","text":"hi"}}"#);
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            c,
            "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer.lines().next().unwrap_or_default().to_owned()
    };
    // An invented chat name per message: each new one would be a session and a sandbox.
    let statuses: Vec<String> = (0..8).map(|i| post(&format!("made-up-{i}"))).collect();
    assert!(
        statuses[..3].iter().all(|l| l.contains("202")),
        "{statuses:?}"
    );
    assert!(
        statuses[3..].iter().all(|l| l.contains("429")),
        "{statuses:?}"
    );
    assert_eq!(s.sessions().len(), 3);
    // The chats it has go on.
    assert!(post("made-up-1").contains("202"));
}

#[test]
fn no_more_sandboxes_run_at_once_than_the_operator_allows() {
    let mut s = Serve::init(
        "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\nmax_live = 1\n",
    );
    s.start();
    assert_eq!(s.send("first", "hello", 60).unwrap().0, "answered");
    // The one slot is held by a session active within the minute: a second session is
    // told at once, and no second sandbox starts.
    let (state, replies) = s.send("second", "hello", 60).unwrap();
    assert_eq!(state, "failed", "{replies:?}");
    assert!(
        replies
            .iter()
            .any(|r| r.contains("busy with other conversations")),
        "{replies:?}"
    );
    assert!(
        s.log_text().contains("no sandbox slot is free"),
        "the operator is told what to raise"
    );
    // The session holding the slot goes on.
    let (state, replies) = s.send("first", "again", 60).unwrap();
    assert_eq!(state, "answered", "{replies:?}");
}
