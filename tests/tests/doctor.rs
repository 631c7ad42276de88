//! `ironclaw doctor` on real state directories: silent on what `init` writes, and each
//! check firing on a configuration or host made bad in just that way.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use serde_json::Value;
use tests::service::{Serve, agent_bin, ironclaw_bin};

/// A fresh state directory from `ironclaw init`, its configuration edited by `edit`.
fn state(edit: impl Fn(&str) -> String) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s");
    let out = Command::new(ironclaw_bin())
        .args(["init", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success());
    let config = state.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, edit(&text)).unwrap();
    (dir, state)
}

/// A fresh state directory whose configuration has `from` replaced by `to`.
fn state_with(from: &str, to: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    state(|t| {
        assert!(t.contains(from), "{from}");
        t.replacen(from, to, 1)
    })
}

/// Runs doctor (with `args`) as a person reads it: its exit code and its text.
fn doctor_text(state: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(ironclaw_bin())
        .arg("doctor")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env("IRONCLAW_AGENT_BIN", agent_bin())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs doctor: its exit code and findings (id, severity).
fn doctor(state: &std::path::Path, env: &[(&str, &str)]) -> (i32, Vec<(String, String)>) {
    let mut cmd = Command::new(ironclaw_bin());
    cmd.args(["doctor", "--json", "--state-dir"])
        .arg(state)
        .env("IRONCLAW_AGENT_BIN", agent_bin());
    for (k, v) in env {
        cmd.env(k, v);
    }
    findings(&cmd.output().unwrap())
}

/// Doctor's exit code and findings (id, severity) from its output.
fn findings(out: &std::process::Output) -> (i32, Vec<(String, String)>) {
    let findings: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let list = findings
        .iter()
        .map(|f| {
            (
                f["id"].as_str().unwrap().to_owned(),
                f["severity"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (out.status.code().unwrap(), list)
}

/// Exactly `id` (with `severity`) is found, and the exit code follows it. A fault that
/// `serve` refuses as well also brings `config.refused`, and a made-up token path
/// `files.unreadable` (each tested on its own below).
fn only(state: &std::path::Path, env: &[(&str, &str)], id: &str, severity: &str) {
    let (code, found) = doctor(state, env);
    let found: Vec<(String, String)> = found
        .into_iter()
        .filter(|(f, _)| f != "config.refused" && f != "files.unreadable")
        .collect();
    assert_eq!(found, vec![(id.to_owned(), severity.to_owned())], "{id}");
    assert_eq!(code, i32::from(severity == "critical"), "{id}: exit code");
}

#[test]
fn doctor_is_silent_on_the_default_and_each_check_fires_on_its_own_fault() {
    let (_d, s) = state(str::to_owned);
    let (code, found) = doctor(&s, &[]);
    assert_eq!((code, found), (0, vec![]), "the default has findings");

    let admin = |listen: &str, socket: &str, tailnet: &str| {
        format!(
            "unix_uids = [0]\ntailnet = [{tailnet}]\n\n[admin_api]\nlisten = \"{listen}\"\ntailscaled_socket = \"{socket}\""
        )
    };
    let outside = admin("0.0.0.0:8790", "/", "\"a@example.com\"");
    let on_loopback = admin("127.0.0.1:8790", "/", "\"a@example.com\"");
    let no_tailscaled = admin(
        "100.101.1.1:8790",
        "/nonexistent/tailscaled.sock",
        "\"a@example.com\"",
    );
    let nobody = admin("100.101.1.1:8790", "/", "");
    // A socket in a directory anyone may write to: anyone could answer for tailscaled.
    let open_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let fake_socket = open_dir.path().join("tailscaled.sock");
    std::fs::write(&fake_socket, "").unwrap();
    let planted = admin(
        "100.101.1.1:8790",
        fake_socket.to_str().unwrap(),
        "\"a@example.com\"",
    );
    let edits: [(&str, &str, &str, &str); 15] = [
        (
            "runtime = \"gvisor\"",
            "runtime = \"host\"",
            "sandbox.not-gvisor",
            "critical",
        ),
        (
            "memory_mib = 256",
            "memory_mib = 256\nrunsc = \"/nonexistent/runsc\"",
            "sandbox.runsc-missing",
            "critical",
        ),
        (
            "memory_mib = 256",
            "memory_mib = 256\nrunsc = \"/bin/false\"",
            "sandbox.runsc-unusable",
            "critical",
        ),
        (
            "memory_mib = 256",
            "memory_mib = 256\nnetwork = \"host\"",
            "sandbox.network-not-none",
            "critical",
        ),
        (
            "unix_uids = [0]",
            "unix_uids = []",
            "operators.none",
            "critical",
        ),
        (
            "provider = \"demo\"",
            "provider = \"openai\"\nbase_url = \"http://10.0.0.5:11434\"\nmodel = \"m\"",
            "model.endpoint-insecure",
            "critical",
        ),
        (
            "provider = \"demo\"",
            "provider = \"openai\"\nbase_url = \"https://203.0.113.9\"\nmodel = \"m\"",
            "model.endpoint-insecure",
            "critical",
        ),
        (
            "provider = \"demo\"",
            "provider = \"openai\"\nbase_url = \"https://[2001:db8::1]\"\nmodel = \"m\"",
            "model.endpoint-insecure",
            "critical",
        ),
        (
            "provider = \"demo\"",
            "provider = \"openai\"\nbase_url = \"https://user:pw@api.example.com\"\nmodel = \"m\"",
            "model.endpoint-insecure",
            "critical",
        ),
        (
            "[operators]",
            "[channels.telegram]\ntoken_file = \"/t\"\nallowed_users = []\n\n[operators]",
            "telegram.no-allowed-users",
            "critical",
        ),
        (
            "unix_uids = [0]",
            &outside,
            "admin-api.outside-tailnet",
            "critical",
        ),
        (
            "unix_uids = [0]",
            &on_loopback,
            "admin-api.outside-tailnet",
            "critical",
        ),
        (
            "unix_uids = [0]",
            &no_tailscaled,
            "admin-api.tailscaled-missing",
            "warning",
        ),
        (
            "unix_uids = [0]",
            &nobody,
            "admin-api.no-operators",
            "critical",
        ),
        (
            "unix_uids = [0]",
            &planted,
            "admin-api.tailscaled-socket-unsafe",
            "critical",
        ),
    ];
    for (from, to, id, severity) in edits {
        let (_d, s) = state_with(from, to);
        only(&s, &[], id, severity);
    }

    // Keys sealed as systemd credentials on a machine without a TPM.
    if !std::path::Path::new("/dev/tpmrm0").exists() {
        let (_d, s) = state(|t| {
            t.replacen(
                "provider = \"demo\"",
                "provider = \"openai\"\nbase_url = \"https://api.example.com\"\nmodel = \"m\"\napi_key_file = \"credential:model.key\"",
                1,
            )
        });
        only(&s, &[], "deploy.credentials-without-tpm", "warning");
    }

    // The host: permissions, the environment, the agent binary.
    let (_d, s) = state(str::to_owned);
    std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
    only(&s, &[], "state.permissions", "critical");
    let (_d, s) = state(str::to_owned);
    std::fs::set_permissions(s.join("master.key"), std::fs::Permissions::from_mode(0o444)).unwrap();
    only(&s, &[], "keys.master-key-exposed", "critical");
    let (_d, s) = state(str::to_owned);
    only(
        &s,
        &[("IRONCLAW_MASTER_KEY", "00")],
        "keys.master-key-in-environment",
        "critical",
    );
    only(
        &s,
        &[("IRONCLAW_AGENT_BIN", "/bin/true")],
        "agent.not-static",
        "critical",
    );
    let loose = s.join("agent-copy");
    std::fs::copy(agent_bin(), &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).unwrap();
    only(
        &s,
        &[("IRONCLAW_AGENT_BIN", loose.to_str().unwrap())],
        "agent.writable",
        "critical",
    );
}

#[test]
fn doctor_sees_pending_drift_and_a_broken_audit_trail() {
    let mut s = Serve::init(control_plane::config::DEFAULT_CONFIG);
    s.start();
    assert_eq!(s.stop().map(|e| e.success()), Some(true));
    assert_eq!(doctor(&s.state, &[]), (0, vec![]));
    let config = s.state.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("memory_mib = 256", "memory_mib = 512"),
    )
    .unwrap();
    only(&s.state, &[], "config.drift-pending", "warning");
    std::fs::write(&config, &text).unwrap();
    s.store().execute("DELETE FROM audit_head", []).unwrap();
    only(&s.state, &[], "audit.chain-broken", "critical");
}

/// The trap a plain `cargo build --workspace` lays: a dynamically linked
/// `ironclaw-agent` next to `ironclaw`, where the agent is looked for when nothing names
/// it. Doctor finds exactly that, and nothing once the static agent is put there.
#[test]
fn doctor_refuses_a_dynamic_agent_next_to_ironclaw() {
    let (_d, s) = state(str::to_owned);
    let bin = tempfile::tempdir().unwrap();
    let ironclaw = bin.path().join("ironclaw");
    std::fs::copy(ironclaw_bin(), &ironclaw).unwrap();
    let next_to_it = bin.path().join("ironclaw-agent");
    let run = || {
        let out = Command::new(&ironclaw)
            .args(["doctor", "--json", "--state-dir"])
            .arg(&s)
            .env_remove("IRONCLAW_AGENT_BIN")
            .output()
            .unwrap();
        findings(&out)
    };
    // Dynamically linked, root's and 0755, like the one cargo leaves in target/debug.
    std::fs::copy("/bin/true", &next_to_it).unwrap();
    assert_eq!(
        run(),
        (1, vec![("agent.not-static".into(), "critical".into())])
    );
    std::fs::copy(agent_bin(), &next_to_it).unwrap();
    std::fs::set_permissions(&next_to_it, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(run(), (0, vec![]));
}

/// Each way a configuration file is wrong that `serve` refuses, and the line doctor
/// names for it: (edit of the file `init` wrote, line of the fault, what it says).
#[test]
fn doctor_refuses_what_serve_refuses_and_names_the_line() {
    let cases: [(&str, &str, &str, &str); 6] = [
        (
            "memory_mib = 256",
            "memroy_mib = 256",
            "memroy_mib",
            "unknown field",
        ),
        (
            "memory_mib = 256",
            "memory_mib = \"256\"",
            "memory_mib",
            "invalid type",
        ),
        (
            "provider = \"demo\"",
            "provider = \"gemini\"",
            "provider = \"gemini\"",
            "unknown variant",
        ),
        (
            "provider = \"demo\"",
            "provider = \"openai\"\nmodel = \"m\"",
            "[model]",
            "model.base_url is required",
        ),
        (
            "[operators]",
            "[channels.bridge]\nlisten = \"0.0.0.0:8080\"\ntoken_file = \"/t\"\n\n[operators]",
            "listen =",
            "channels.bridge.listen",
        ),
        (
            "[operators]\nunix_uids = [0]",
            "[operators]\nunix_uids = []",
            "[operators]",
            "operator",
        ),
    ];
    for (from, to, line_holding, says) in cases {
        let (_d, s) = state_with(from, to);
        let text = std::fs::read_to_string(s.join("config.toml")).unwrap();
        let line = text
            .lines()
            .position(|l| l.starts_with(line_holding))
            .unwrap_or_else(|| panic!("{line_holding} in\n{text}"))
            + 1;
        let (code, shown) = doctor_text(&s, &[]);
        assert_eq!(code, 1, "{to}: {shown}");
        let at = format!("config.toml:{line}:");
        let finding = shown
            .lines()
            .find(|l| l.contains(&at))
            .unwrap_or_else(|| panic!("{to}: no line naming {at} in\n{shown}"));
        assert!(finding.contains(says), "{to}: {finding}");
        assert!(shown.contains("config.refused"), "{to}: {shown}");
        // serve refuses the same file.
        let serve = Command::new("timeout")
            .arg("20")
            .arg(ironclaw_bin())
            .args(["serve", "--state-dir"])
            .arg(&s)
            .env("IRONCLAW_AGENT_BIN", agent_bin())
            .output()
            .unwrap();
        assert_eq!(serve.status.code(), Some(1), "{to}: serve refuses it too");
    }
}

#[test]
fn key_and_token_files_must_exist_and_stay_private() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("model.key");
    let to = format!(
        "provider = \"openai\"\nbase_url = \"http://127.0.0.1:11434\"\nmodel = \"m\"\napi_key_file = \"{}\"",
        key.display()
    );
    let (_d, s) = state(|t| t.replacen("provider = \"demo\"", &to, 1));
    let (_, missing) = doctor(&s, &[]);
    assert!(
        missing.contains(&("files.unreadable".into(), "critical".into())),
        "{missing:?}"
    );
    std::fs::write(&key, "sk-test").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (_, exposed) = doctor(&s, &[]);
    assert!(
        exposed.contains(&("files.exposed".into(), "critical".into())),
        "{exposed:?}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, fine) = doctor(&s, &[]);
    assert!(
        !fine.iter().any(|(id, _)| id.starts_with("files.")),
        "{fine:?}"
    );
}

#[test]
fn doctor_lists_what_it_checked_and_whether_serve_runs() {
    let (_d, s) = state(|t| t.to_owned());
    let (_, shown) = doctor_text(&s, &[]);
    for line in [
        "checked:",
        "ok        config",
        "ok        keys",
        "serve: not running",
    ] {
        assert!(shown.contains(line), "{line:?} in\n{shown}");
    }
    // A user who may not read the state directory is told to run it as root.
    let out = Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "--"])
        .arg(ironclaw_bin())
        .args(["doctor", "--state-dir"])
        .arg(&s)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("state.unreadable") && shown.contains("sudo ironclaw doctor"),
        "{shown}"
    );
    assert!(!shown.contains("no configuration"), "{shown}");
}

/// `doctor --probe` against a model and a Telegram that each fail in one way, then work:
/// what it printed.
fn probe(state: &std::path::Path) -> (i32, String) {
    doctor_text(state, &["--probe"])
}

#[test]
fn a_probe_names_the_exact_failure_of_the_model_and_of_telegram() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let missing = rt.block_on(tests::fake_http::FakeHttp::start(vec![
        tests::fake_http::Scripted::status(404),
    ]));
    let echo = rt.block_on(tests::fake_model::start_echo_model());
    let tg = rt.block_on(tests::fake_telegram::FakeTelegram::start("42:right-token"));
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("tg.token");
    std::fs::write(&token, "42:wrong-token").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let model = |base: &str| format!("provider = \"openai\"\nbase_url = \"{base}\"\nmodel = \"m\"");
    let telegram = format!(
        "[channels.telegram]\ntoken_file = \"{}\"\napi_base = \"{}\"\nallowed_users = [1]\n\n[operators]",
        token.display(),
        tg.http.base()
    );
    for (base, says) in [
        (
            format!("http://127.0.0.1:{closed}"),
            "Connection refused".to_owned(),
        ),
        (
            missing.base(),
            format!("status 404 from {}/v1/chat/completions", missing.base()),
        ),
    ] {
        let (_d, s) = state(|t| {
            t.replacen("provider = \"demo\"", &model(&base), 1)
                .replacen("[operators]", &telegram, 1)
        });
        let (code, shown) = probe(&s);
        assert_eq!(code, 1, "{shown}");
        let failed = shown
            .lines()
            .skip_while(|l| !l.contains("probe.model-failed"))
            .nth(1)
            .unwrap_or_else(|| panic!("{shown}"));
        assert!(failed.contains(&says), "{says}: {failed}");
        assert!(
            shown.contains("probe.telegram-failed")
                && shown.contains("refused the bot token (status 401)"),
            "{shown}"
        );
        assert!(!shown.contains("wrong-token"), "the token is never shown");
    }
    // Both answer: the probe says who.
    std::fs::write(&token, "42:right-token").unwrap();
    let (_d, s) = state(|t| {
        t.replacen("provider = \"demo\"", &model(&echo.base()), 1)
            .replacen("[operators]", &telegram, 1)
    });
    let (code, shown) = probe(&s);
    assert_eq!(code, 0, "{shown}");
    assert!(shown.contains("model      ok: openai answered"), "{shown}");
    assert!(
        shown.contains("telegram   ok: the bot is @ironclaw_test_bot"),
        "{shown}"
    );
}
