//! The `ironclaw` command line as a person and a shell script meet it: help on stdout
//! with status 0, help of its own for each command, `--flag=value`, strict flags,
//! completion scripts, a man page, and a closed pipe that ends a command quietly.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::{Command, Output, Stdio};

use tests::service::ironclaw_bin;

fn ironclaw(args: &[&str]) -> Output {
    Command::new(ironclaw_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_goes_to_stdout_with_status_zero_and_each_command_has_its_own() {
    for args in [&["--help"][..], &["help"], &["-h"]] {
        let out = ironclaw(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(text(&out.stdout).contains("Usage: ironclaw"), "{args:?}");
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
    }
    let top = text(&ironclaw(&["--help"]).stdout);
    for (args, usage, names) in [
        (&["send", "--help"][..], "Usage: ironclaw send", "--raw"),
        (&["changes", "--help"], "Usage: ironclaw changes", "approve"),
        (
            &["help", "changes", "approve"],
            "Usage: ironclaw changes approve",
            "<ID>",
        ),
        (
            &["audit", "export", "-h"],
            "Usage: ironclaw audit export",
            "--state-dir",
        ),
    ] {
        let out = ironclaw(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let help = text(&out.stdout);
        assert!(
            help.contains(usage) && help.contains(names),
            "{args:?}: {help}"
        );
        assert_ne!(help, top, "{args:?} prints its own help");
    }
    let version = ironclaw(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(text(&version.stdout).starts_with("ironclaw "));
}

#[test]
fn flags_are_strict_and_take_their_value_either_way() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let flag = format!("--state-dir={}", state.display());
    let out = ironclaw(&["init", &flag]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(state.join("master.key").exists());
    // The same directory, given as two words and after the command.
    let out = ironclaw(&["audit", "verify", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A flag a command does not take, an unknown command, a missing argument: usage
    // errors, status 2, on stderr, naming what was wrong.
    for (args, says) in [
        (&["doctor", "--raw"][..], "--raw"),
        (&["audit", "verify", "--all"], "--all"),
        (&["send", "--wait", "soon", "hi"], "soon"),
        (&["frobnicate"], "frobnicate"),
        (&["changes", "approve"], "<ID>"),
        (&["send"], "<TEXT>"),
    ] {
        let out = ironclaw(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            text(&out.stderr).contains(says),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn completion_scripts_and_a_man_page_are_printed_on_request() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ironclaw"),
        ("fish", "complete -c ironclaw"),
    ] {
        let out = ironclaw(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("approve"),
            "{shell}: the commands are in it"
        );
    }
    let man = ironclaw(&["manpage"]);
    assert_eq!(man.status.code(), Some(0));
    assert!(text(&man.stdout).contains(".TH ironclaw 1"));
}

/// Runs `ironclaw args` with its stdout a pipe whose reading end is already closed, as
/// when `| head -1` has read what it wanted.
fn into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(ironclaw_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let state = state.to_str().unwrap();
    assert!(ironclaw(&["init", "--state-dir", state]).status.success());
    for args in [
        &["--help"][..],
        &["audit", "export", "--state-dir", state],
        &["completions", "bash"],
        &["doctor", "--state-dir", state],
    ] {
        let out = into_closed_pipe(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn a_second_serve_on_the_same_state_directory_is_refused_and_harms_nothing() {
    let mut s = tests::service::Serve::init(
        "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n",
    );
    s.start();
    let second = Command::new("timeout")
        .arg("30")
        .arg(ironclaw_bin())
        .args(["serve", "--state-dir"])
        .arg(&s.state)
        .env("IRONCLAW_AGENT_BIN", tests::service::agent_bin())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let said = text(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{said}");
    let pid = s.pid().unwrap();
    assert!(
        said.contains("already running") && said.contains(&format!("pid {pid}")),
        "{said}"
    );
    // The first one's admin socket is still there and answers.
    assert!(s.state.join("run/admin.sock").exists());
    assert_eq!(s.send("console", "still here?", 60).unwrap().0, "answered");
    // Once it stops, the directory can be served again.
    s.stop();
    s.start();
    assert_eq!(s.send("console", "back", 60).unwrap().0, "answered");
}

#[test]
fn status_says_whether_serve_runs_what_it_runs_and_its_last_warning() {
    let mut s = tests::service::Serve::init(
        "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\nmax_live = 7\n",
    );
    let state = s.state.to_str().unwrap().to_owned();
    let out = ironclaw(&["status", "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("serve is not running")
            && text(&out.stderr).contains("ironclaw serve --state-dir"),
        "{}",
        text(&out.stderr)
    );

    s.start();
    assert_eq!(s.send("console", "hello", 60).unwrap().0, "answered");
    let out = ironclaw(&["status", "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let pid = s.pid().unwrap();
    for line in [
        format!("running, pid {pid}"),
        "version 1 in force".into(),
        "model         demo".into(),
        "channels      console".into(),
        "sessions      1 (1 sandboxes running, at most 7)".into(),
        "changes       none pending".into(),
        "last warning  none".into(),
    ] {
        assert!(shown.contains(&line), "{line:?} in:\n{shown}");
    }
    // A warning the operator should see: a configuration file that no longer parses.
    let config = s.state.join("config.toml");
    std::fs::write(&config, "[model\n").unwrap();
    s.hup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        let out = ironclaw(&["status", "--json", "--state-dir", &state]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if !v["last_warning"].is_null() || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(status["last_warning"]["level"], "WARN", "{status:#}");
    assert_eq!(status["pid"], pid);
    s.stop();
    let out = ironclaw(&["status", "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
}

#[test]
fn serve_logs_json_lines_on_request_starting_with_what_it_runs() {
    let mut s = tests::service::Serve::init(
        "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n",
    );
    s.env.push(("IRONCLAW_LOG_FORMAT".into(), "json".into()));
    s.start();
    assert_eq!(s.send("console", "hello", 60).unwrap().0, "answered");
    s.stop();
    let log = s.log_text();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let serving = lines
        .iter()
        .find(|l| l["fields"]["message"] == "serving")
        .unwrap_or_else(|| panic!("no serving line in:\n{log}"));
    let fields = &serving["fields"];
    assert_eq!(fields["release"], env!("CARGO_PKG_VERSION"));
    assert_eq!(fields["config_version"], 1);
    assert_eq!(fields["model"], "demo");
    assert_eq!(fields["channels"], "console");
    assert_eq!(serving["level"], "INFO");
}

#[test]
fn a_unique_beginning_of_a_change_id_names_it_and_the_decision_names_it_whole() {
    let mut s = tests::service::Serve::init(control_plane::config::DEFAULT_CONFIG);
    s.start();
    let state = s.state.to_str().unwrap().to_owned();
    let config = s.state.join("config.toml");
    let file = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, file.replace("max_live = 32", "max_live = 8")).unwrap();
    s.hup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let id = loop {
        if let Some(c) = s.changes(false).into_iter().next() {
            break c.id;
        }
        assert!(std::time::Instant::now() < deadline, "no drift request");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let prefix = &id[..6];
    let out = ironclaw(&["changes", "show", prefix, "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("change request {id}\n")));
    // Too short to name anything.
    let out = ironclaw(&["changes", "show", &id[..2], "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    // A beginning two requests share names neither.
    let twin = format!(
        "{prefix}{}",
        if id.ends_with('0') { "1" } else { "0" }.repeat(id.len() - 6)
    );
    let conn = s.store();
    conn.execute_batch(&format!(
        "CREATE TEMP TABLE twin AS SELECT * FROM changes WHERE id = '{id}';
         UPDATE twin SET id = '{twin}';
         INSERT INTO changes SELECT * FROM twin;"
    ))
    .unwrap();
    let out = ironclaw(&["changes", "approve", prefix, "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let said = text(&out.stderr);
    assert!(
        said.contains("several change requests") && said.contains(&twin),
        "{said}"
    );
    conn.execute("DELETE FROM changes WHERE id = ?1", [&twin])
        .unwrap();
    // Unique again: approved, by its full id and the hash of the text shown.
    let out = ironclaw(&["changes", "approve", prefix, "--state-dir", &state]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("configuration version 2 is in force"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_model_that_cannot_be_reached_fails_the_message_and_the_log_says_why() {
    // A port nothing listens on: the connection is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = tests::service::Serve::init(&format!(
        "[model]\nprovider = \"openai\"\nbase_url = \"http://127.0.0.1:{port}\"\nmodel = \"m\"\n\n[sandbox]\nruntime = \"gvisor\"\n"
    ));
    s.start();
    let state = s.state.to_str().unwrap().to_owned();
    let out = ironclaw(&["send", "--state-dir", &state, "--wait", "120", "hello"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("could not be reached"),
        "the notice is shown"
    );
    assert!(
        text(&out.stderr).contains("the message failed"),
        "{}",
        text(&out.stderr)
    );
    let session = s
        .sessions()
        .into_iter()
        .find(|x| x.name == "console")
        .unwrap();
    assert_eq!((session.answered, session.failed), (0, 1));
    let log = s.log_text();
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("a model call failed"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        warning.contains(&format!("127.0.0.1:{port}")) && warning.contains("Connection refused"),
        "{warning}"
    );
    let shown = text(&ironclaw(&["status", "--state-dir", &state]).stdout);
    assert!(shown.contains("a model call failed"), "{shown}");
}

#[test]
fn send_takes_its_flags_before_or_after_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("nowhere");
    let state = state.to_str().unwrap();
    // No serve runs there: the answer is "cannot reach", which shows the flag was read
    // as the state directory and not sent as text.
    for args in [
        &["send", "hello", "there", "--state-dir", state][..],
        &["send", "--state-dir", state, "--", "-v", "is", "a", "word"],
        &["send", "-", "--state-dir", state],
    ] {
        let out = ironclaw(args);
        let said = text(&out.stderr);
        assert!(
            said.contains(&format!("cannot reach the service at {state}")),
            "{args:?}: {said}"
        );
    }
}

#[test]
fn inits_next_step_works_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let state_arg = state.to_str().unwrap().to_owned();
    // Without an agent where serve would look, init says how to get one.
    let out = Command::new(ironclaw_bin())
        .args(["init", "--state-dir", &state_arg])
        .env("IRONCLAW_AGENT_BIN", "/nonexistent/ironclaw-agent")
        .output()
        .unwrap();
    let said = text(&out.stdout);
    assert!(
        said.contains("scripts/build-static") && said.contains("IRONCLAW_AGENT_BIN="),
        "{said}"
    );
    std::fs::remove_dir_all(&state).unwrap();
    // From the source tree after scripts/build-static, the next line is the whole step.
    let out = Command::new(ironclaw_bin())
        .args(["init", "--state-dir", &state_arg])
        .env_remove("IRONCLAW_AGENT_BIN")
        .output()
        .unwrap();
    let said = text(&out.stdout);
    let next = said.lines().last().unwrap();
    assert_eq!(
        next,
        format!("next: ironclaw serve --state-dir {state_arg}"),
        "{said}"
    );
    let serve = Command::new(ironclaw_bin())
        .args(["serve", "--state-dir", &state_arg])
        .env_remove("IRONCLAW_AGENT_BIN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut answered = false;
    while std::time::Instant::now() < deadline {
        let out = ironclaw(&["send", "--state-dir", &state_arg, "--wait", "60", "hello"]);
        if out.status.success() {
            answered = text(&out.stdout).contains("You said: hello");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(serve.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    );
    let out = serve.wait_with_output().unwrap();
    assert!(answered, "serve as init said: {}", text(&out.stderr));
}

#[test]
fn serve_tells_systemd_when_it_is_ready() {
    let dir = tempfile::Builder::new()
        .prefix("icn")
        .tempdir_in("/tmp")
        .unwrap();
    let path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut s = tests::service::Serve::init(
        "[model]\nprovider = \"demo\"\n\n[sandbox]\nruntime = \"gvisor\"\n",
    );
    s.env.push(("NOTIFY_SOCKET".into(), path.clone()));
    s.start();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means usable: the admin socket answers.
    assert_eq!(s.send("console", "hello", 60).unwrap().0, "answered");
}
