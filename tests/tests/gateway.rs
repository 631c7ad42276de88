//! The gateway, tested from the attacker's side on the real `ironclaw serve` under real
//! gVisor: a hostile model drives the agent through thousands of change attempts; a
//! compromised agent talks to its proxy socket directly; Telegram button presses come
//! from the wrong people and places; the store is edited behind the gateway's back, the
//! configuration file by hand, and the service is killed — and nothing changes without
//! an operator's approval of exactly what was shown.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use control_plane::config::Config;
use control_plane::service::notice;
use control_plane::store::state::ChangeState;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tests::fake_http::FakeHttp;
use tests::fake_model::{ECHO, start_echo_model};
use tests::fake_telegram::FakeTelegram;
use tests::hostile_model::start_hostile_model;
use tests::service::{Serve, wait_until};

const TG_TOKEN: &str = "654321:gate-token-0badc0de";
const USER: i64 = 4242;
const OPERATOR: i64 = 5151;
const NEWCOMER: i64 = 7373;

fn sha(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn telegram_config(s: &Serve, model: &str, telegram: &str, allowed: &[i64], extra: &str) -> String {
    let tg = s.dir.path().join("tg.token");
    if !tg.exists() {
        s.secret_file("tg.token", TG_TOKEN);
    }
    let allowed: Vec<String> = allowed.iter().map(i64::to_string).collect();
    format!(
        r#"[model]
provider = "openai"
base_url = "{model}"
model = "fake"

[sandbox]
runtime = "gvisor"

[channels.telegram]
token_file = "{tg}"
api_base = "{telegram}"
allowed_users = [{allowed}]
poll_timeout_secs = 1

[operators]
unix_uids = [0]
telegram = [{OPERATOR}]
{extra}
"#,
        tg = tg.display(),
        allowed = allowed.join(", "),
    )
}

/// A running serve with the echo model and the fake Telegram (letting [`USER`] in),
/// its configuration ending in `extra`: the runtime the fakes run on, the fakes, and the
/// serve.
fn telegram_rig(extra: &str) -> (tokio::runtime::Runtime, FakeTelegram, FakeHttp, Serve) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TG_TOKEN));
    let model = rt.block_on(start_echo_model());
    let mut s = Serve::init("");
    let first = telegram_config(&s, &model.base(), &tg.http.base(), &[USER], extra);
    std::fs::write(s.state.join("config.toml"), &first).unwrap();
    s.start();
    (rt, tg, model, s)
}

fn wait_sent(rt: &tokio::runtime::Runtime, tg: &FakeTelegram, s: &Serve, chat: i64, text: &str) {
    let arrived = rt.block_on(tg.wait_for(Duration::from_secs(90), |sent| {
        sent.iter().any(|(c, t)| *c == chat && t == text)
    }));
    assert!(
        arrived,
        "{text:?} never reached {chat}; sent {:?}\n{}",
        tg.sent(),
        s.log_text()
    );
}

/// One raw HTTP/1.1 request on a unix socket: the status and the body.
fn unix_http(path: &std::path::Path, method: &str, target: &str, body: &str) -> (u16, String) {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[test]
fn a_hostile_model_changes_nothing_without_an_operator_and_every_attempt_is_recorded() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (model, counts) = rt.block_on(start_hostile_model());
    let mut s = Serve::init("");
    let config = format!(
        r#"[model]
provider = "openai"
base_url = "{}"
model = "hostile"

[budgets]
requests_per_minute = 100000
tokens_per_day = 100000000
bytes_per_day = 10000000000

[gateway]
max_pending_per_requester = 5
max_requests_per_minute = 100000
"#,
        model.base()
    );
    std::fs::write(s.state.join("config.toml"), &config).unwrap();
    s.start();
    let sessions = ["h1", "h2", "h3"];
    let per_session = 6;
    std::thread::scope(|scope| {
        for name in sessions {
            let s = &s;
            scope.spawn(move || {
                for i in 0..per_session {
                    let (state, _) = s.send(name, &format!("message {i}"), 300).unwrap();
                    assert_eq!(state, "answered", "{}", s.log_text());
                }
            });
        }
    });

    // A compromised agent on its own socket: approval endpoints do not exist, fields
    // a request does not have are refused, and what it may file is only filed.
    let layout = control_plane::sandbox::layout::Layout::new(&s.state, &s.state.join("run"));
    let h1 = queue_proto::ids::SessionId::try_from("h1").unwrap();
    let sock = runsc_config::socket_path(&layout.socket_dir(&h1));
    let valid = r#"{"target": "tools", "after": "[\"reply\"]", "reason": "direct"}"#;
    for (method, target, body) in [
        (
            "POST",
            "/v1/change-requests/c0000000000000000/approve",
            "{}",
        ),
        ("POST", "/v1/approve", r#"{"id": "c0000000000000000"}"#),
        ("PUT", "/v1/change-requests", valid),
        (
            "POST",
            "/v1/change-requests",
            r#"{"target": "tools", "after": "[]", "reason": "x", "approved": true}"#,
        ),
        (
            "POST",
            "/v1/change-requests",
            r#"{"target": "tools", "after": "[]", "reason": "x", "session": "h2"}"#,
        ),
        (
            "POST",
            "/v1/change-requests",
            r#"{"target": "operators", "after": "[1000]", "reason": "x"}"#,
        ),
    ] {
        let (status, answer) = unix_http(&sock, method, target, body);
        assert!(
            (400..500).contains(&status),
            "{method} {target} {body}: {status} {answer}"
        );
    }
    // The same request replayed: each is a new request of its own, none applied.
    let mut direct_ids = Vec::new();
    for _ in 0..3 {
        let (status, answer) = unix_http(&sock, "POST", "/v1/change-requests", valid);
        assert_eq!(status, 200, "{answer}");
        let filed: Value = serde_json::from_str(&answer).unwrap();
        direct_ids.push(filed["id"].as_str().unwrap().to_owned());
    }
    direct_ids.dedup();
    assert_eq!(direct_ids.len(), 3);

    let issued = counts.well_formed.load(Ordering::SeqCst) + 3;
    assert!(issued >= 2000, "only {issued} attempts");
    let audit = s.audit();
    let requested: Vec<&Value> = audit
        .iter()
        .filter(|e| e["kind"] == "change_requested")
        .collect();
    assert_eq!(
        requested.len() as u64,
        issued,
        "every attempt that reached the control plane is in the audit trail"
    );
    for e in &requested {
        let by = e["detail"]["requester"].as_str().unwrap();
        assert!(
            sessions.iter().any(|n| by == format!("agent:{n}")),
            "requester named by the socket, not the agent: {by}"
        );
    }
    for kind in ["change_approved", "change_applied"] {
        assert!(
            audit.iter().all(|e| e["kind"] != kind),
            "{kind} without an operator"
        );
    }
    assert_eq!(s.versions().len(), 1, "the configuration never changed");
    let all = s.changes(true);
    assert_eq!(all.len() as u64, issued);
    let mut rules: BTreeMap<String, u32> = BTreeMap::new();
    for c in &all {
        assert!(
            matches!(c.state, ChangeState::Pending | ChangeState::Denied),
            "{c:?}"
        );
        let rule = c.rule.clone().unwrap_or_else(|| "pending".into());
        *rules
            .entry(rule.split(':').next().unwrap().to_owned())
            .or_default() += 1;
    }
    for rule in [
        "agent_scope",
        "endpoint_ip_literal",
        "endpoint_not_https",
        "parse",
        "too_many_pending",
        "pending",
    ] {
        assert!(rules.contains_key(rule), "no {rule} among {rules:?}");
    }
    let pending = s.changes(false);
    for name in sessions {
        let mine = pending
            .iter()
            .filter(|c| c.requester == format!("agent:{name}"))
            .count();
        assert!(mine <= 5, "{name} has {mine} pending");
    }
    // A value never escapes into the rest of the configuration.
    for c in pending.iter().filter(|c| c.target == "instructions") {
        let after = Config::parse(&s.change(&c.id).after).unwrap();
        assert_eq!(after.operators.unix_uids, vec![0]);
    }
    // Each turn is summarised with its risk, visible through the CLI.
    let out = s.cli(&["sessions", "show", "h1", "--json"]);
    assert!(out.status.success());
    let turns: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!turns.is_empty());
    for t in &turns {
        assert!(t["risk"].as_f64().unwrap() >= 0.9, "{t}");
        assert!(t["summary"]["tools"]["request_change"].as_u64().unwrap() > 0);
    }

    // Each request that waits for an operator reaches the log, with how to see it.
    let log = s.log_text();
    assert!(
        log.contains("a change request waits for an operator: ironclaw changes show c"),
        "{log}"
    );

    // An operator's approval is what it takes: then it applies, named as the operator.
    let candidate = pending
        .iter()
        .find(|c| c.target == "instructions" && c.requester == "agent:h2")
        .expect("a pending instructions request");
    let out = s.cli(&["changes", "approve", &candidate.id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration version 2"));
    let applied = s.audit_of("change_approved");
    assert_eq!(applied.len(), 1);
    assert_eq!(applied[0]["detail"]["by"], "unix:0");
    assert_eq!(s.versions().len(), 2);
    let out = s.cli(&["audit", "verify"]);
    assert!(out.status.success());

    // The agent's approved change was written into the file, so a SIGHUP with the file
    // untouched files nothing, and never a request to undo it.
    let approved = s.cli(&["config", "show", "--approved"]);
    let file = std::fs::read_to_string(s.state.join("config.toml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&approved.stdout), file);
    let from_file = |s: &Serve| {
        s.changes(true)
            .into_iter()
            .filter(|c| c.requester == "config-file")
            .count()
    };
    let before = from_file(&s);
    s.hup();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(from_file(&s), before, "no undo request");
}

#[test]
fn telegram_approvals_come_only_from_an_operator_in_a_private_chat_once() {
    let gateway = "\n[gateway]\nrequest_ttl_secs = 8\n";
    let (rt, tg, model, s) = telegram_rig(gateway);
    tg.push_text(NEWCOMER, "before");
    wait_sent(&rt, &tg, &s, NEWCOMER, notice::NOT_ALLOWED);

    // Root proposes letting the newcomer in; only another operator may approve it.
    let propose = |allowed: &[i64]| -> String {
        let text = telegram_config(&s, &model.base(), &tg.http.base(), allowed, gateway);
        let file = s.dir.path().join("proposal.toml");
        std::fs::write(&file, &text).unwrap();
        let out = s.cli(&[
            "changes",
            "propose",
            file.to_str().unwrap(),
            "--reason",
            "test",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let c = s.changes(false);
        c.iter()
            .find(|c| c.requester == "unix:0")
            .unwrap()
            .id
            .clone()
    };
    let id = propose(&[USER, NEWCOMER]);
    assert_eq!(
        s.decide(&id, true, None).0,
        "refused",
        "the requester may not approve"
    );
    let prompt = |id: &str| -> (i64, String) {
        let mut found = None;
        assert!(
            wait_until(30, || {
                found = tg.keyboards().into_iter().find(|(chat, _, data)| {
                    *chat == OPERATOR && data.iter().any(|d| d.starts_with(&format!("a:{id}:")))
                });
                found.is_some()
            }),
            "no prompt for {id}: {:?}",
            tg.sent()
        );
        let (_, message, data) = found.unwrap();
        (message, data[0].clone())
    };
    let (message, approve) = prompt(&id);
    let prompt_text = tg
        .sent_to(OPERATOR)
        .into_iter()
        .find(|t| t.contains(&id))
        .unwrap();
    assert!(prompt_text.contains("Risk: 0.60"), "{prompt_text}");
    assert!(prompt_text.contains(&format!("+ allowed_users = [{USER}, {NEWCOMER}]")));

    let press = |user: i64, chat: i64, kind: &str, data: &str| -> String {
        let q = tg.push_press(user, chat, kind, message, data);
        let mut answer = None;
        assert!(
            wait_until(30, || {
                answer = tg.answer_to(&q);
                answer.is_some()
            }),
            "press {q} never answered\n{}",
            s.log_text()
        );
        answer.unwrap()
    };
    let a = press(USER, USER, "private", &approve);
    assert!(a.contains("not an operator"), "{a}");
    let a = press(OPERATOR, -100_777, "group", &approve);
    assert!(a.contains("private chat"), "{a}");
    let forged = format!("a:{id}:{}", "0".repeat(32));
    let a = press(OPERATOR, OPERATOR, "private", &forged);
    assert!(a.contains("not the one that was shown"), "{a}");
    assert_eq!(s.changes(false).len(), 1, "still undecided");
    assert_eq!(s.versions().len(), 1);

    let a = press(OPERATOR, OPERATOR, "private", &approve);
    assert!(a.contains("version 2"), "{a}");
    let a = press(OPERATOR, OPERATOR, "private", &approve);
    assert!(a.contains("already applied"), "{a}");
    assert!(
        wait_until(30, || tg.edits().iter().any(|(c, m, t, buttons)| *c
            == OPERATOR
            && *m == message
            && t.contains("applied")
            && !buttons)),
        "buttons not removed: {:?}",
        tg.edits()
    );
    tg.push_text(NEWCOMER, "after");
    wait_sent(&rt, &tg, &s, NEWCOMER, &format!("{ECHO}after"));

    // Rejected by a press; and one left to expire.
    let reject_id = propose(&[USER]);
    let (_, approve_r) = prompt(&reject_id);
    let a = press(
        OPERATOR,
        OPERATOR,
        "private",
        &approve_r.replacen("a:", "r:", 1),
    );
    assert_eq!(a, "Rejected.");
    let late = propose(&[USER]);
    let (_, approve_late) = prompt(&late);
    std::thread::sleep(Duration::from_secs(9));
    let a = press(OPERATOR, OPERATOR, "private", &approve_late);
    assert!(a.contains("expired"), "{a}");

    // A change too long for its prompt can only be rejected from Telegram.
    let long = telegram_config(
        &s,
        &model.base(),
        &tg.http.base(),
        &[USER],
        &format!(
            "{gateway}\n[agent]\ninstructions = \"{}\"\n",
            "x".repeat(4000)
        ),
    );
    let file = s.dir.path().join("long.toml");
    std::fs::write(&file, &long).unwrap();
    assert!(
        s.cli(&["changes", "propose", file.to_str().unwrap()])
            .status
            .success()
    );
    let long_id = s.changes(false)[0].id.clone();
    assert!(wait_until(30, || tg.keyboards().iter().any(
        |(_, _, data)| data.iter().any(|d| d.starts_with(&format!("r:{long_id}:")))
    )));
    assert!(
        !tg.keyboards()
            .iter()
            .any(|(_, _, data)| data.iter().any(|d| d.starts_with(&format!("a:{long_id}:")))),
        "an Approve button for a change the prompt could not show whole"
    );
    let hash = s.change(&long_id).after_hash;
    let a = press(
        OPERATOR,
        OPERATOR,
        "private",
        &format!("a:{long_id}:{}", &hash[..32]),
    );
    assert!(a.contains("too long"), "{a}");

    let refused = s.audit_of("decision_refused");
    let whys: Vec<String> = refused
        .iter()
        .map(|e| e["detail"]["why"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(refused.len(), 7, "{whys:?}");
    let approved = s.audit_of("change_approved");
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0]["detail"]["by"], format!("telegram:{OPERATOR}"));
    assert_eq!(s.audit_of("change_rejected").len(), 1);
    assert_eq!(s.versions().len(), 2);
    assert!(s.cli(&["audit", "verify"]).status.success());
}

#[test]
fn a_flood_of_change_requests_is_refused_beyond_the_limit_and_counted() {
    let mut s = Serve::init(&control_plane::config::DEFAULT_CONFIG.replace(
        "max_requests_per_minute = 20",
        "max_requests_per_minute = 10",
    ));
    s.start();
    s.send("flood", "hello", 120).unwrap();
    let layout = control_plane::sandbox::layout::Layout::new(&s.state, &s.state.join("run"));
    let id = queue_proto::ids::SessionId::try_from("flood").unwrap();
    let sock = runsc_config::socket_path(&layout.socket_dir(&id));
    let body = r#"{"target": "instructions", "after": "Be brief.", "reason": "flood"}"#;
    let started = Instant::now();
    let statuses: Vec<u16> = (0..50)
        .map(|_| unix_http(&sock, "POST", "/v1/change-requests", body).0)
        .collect();
    let filed = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the flood outlasted its minute"
    );
    assert_eq!(filed, 10, "{statuses:?}");
    assert_eq!(s.audit_of("change_requested").len(), 10);
    // The refused forty are recorded as one count once their minute is over.
    let mut limited = Vec::new();
    assert!(
        wait_until(90, || {
            limited = s.audit_of("change_requests_limited");
            !limited.is_empty()
        }),
        "no record of the refused requests"
    );
    assert_eq!(limited.len(), 1);
    assert_eq!(limited[0]["detail"]["refused"], 40);
    assert_eq!(limited[0]["detail"]["requester"], "agent:flood");
}

/// Drift filed by SIGHUP, for the tamper tests: the change request's id.
fn drift(s: &Serve, instructions: &str) -> String {
    let path = s.state.join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = match text.find("\n[agent]\ninstructions = ") {
        Some(i) => format!("{}\n[agent]\ninstructions = {instructions:?}\n", &text[..i]),
        None => format!("{text}\n[agent]\ninstructions = {instructions:?}\n"),
    };
    std::fs::write(&path, edited).unwrap();
    let before: Vec<String> = s.changes(true).into_iter().map(|c| c.id).collect();
    s.hup();
    let mut id = None;
    assert!(wait_until(20, || {
        id = s
            .changes(false)
            .into_iter()
            .find(|c| !before.contains(&c.id))
            .map(|c| c.id);
        id.is_some()
    }));
    id.unwrap()
}

#[test]
fn an_edit_after_showing_or_racing_the_approval_never_applies_anything_else() {
    // Rounds the editor wins leave their request pending: room for all of them.
    let mut s = Serve::init(&control_plane::config::DEFAULT_CONFIG.replace(
        "max_pending_per_requester = 5",
        "max_pending_per_requester = 50",
    ));
    s.start();
    let id = drift(&s, "Be brief.");
    let shown = s.change(&id);
    assert_eq!(shown.summary.requester, "config-file");
    let evil = shown
        .after
        .replace("unix_uids = [0]", "unix_uids = [0, 1000]");
    assert_ne!(evil, shown.after);
    let conn = s.store();
    // The text edited after it was shown.
    conn.execute("UPDATE changes SET after = ?2 WHERE id = ?1", [&id, &evil])
        .unwrap();
    let (outcome, why) = s.decide(&id, true, Some(&shown.after_hash));
    assert_eq!(outcome, "refused");
    assert!(why.unwrap().contains("no longer matches"));
    // Text and hash both rewritten: not what the approver was shown.
    conn.execute(
        "UPDATE changes SET after = ?2, after_hash = ?3 WHERE id = ?1",
        [&id, &evil, &sha(&evil)],
    )
    .unwrap();
    let (outcome, why) = s.decide(&id, true, Some(&shown.after_hash));
    assert_eq!(outcome, "refused");
    assert!(why.unwrap().contains("not the one that was shown"));
    assert_eq!(s.versions().len(), 1);
    conn.execute(
        "UPDATE changes SET after = ?2, after_hash = ?3 WHERE id = ?1",
        [&id, &shown.after, &shown.after_hash],
    )
    .unwrap();

    // Approvals racing an editor that flips the text back and forth.
    let mut ids = vec![id];
    let mut refused = 0;
    for round in 0..8 {
        if round > 0 {
            ids.push(drift(&s, &format!("Round {round}.")));
        }
        let id = ids.last().unwrap().clone();
        let shown = s.change(&id);
        let evil = shown
            .after
            .replace("unix_uids = [0]", "unix_uids = [0, 1000]");
        let stop = std::sync::atomic::AtomicBool::new(false);
        let outcome = std::thread::scope(|scope| {
            scope.spawn(|| {
                let conn = s.store();
                let mut flip = false;
                while !stop.load(Ordering::SeqCst) {
                    let text = if flip { &shown.after } else { &evil };
                    let _ =
                        conn.execute("UPDATE changes SET after = ?2 WHERE id = ?1", [&id, text]);
                    flip = !flip;
                    // A pause, or the service could never take the write lock at all.
                    std::thread::sleep(Duration::from_millis(3));
                }
                // Leave it as shown, so a refused round can be seen to be the race's doing.
                let _ = conn.execute(
                    "UPDATE changes SET after = ?2 WHERE id = ?1",
                    [&id, &shown.after],
                );
            });
            std::thread::sleep(Duration::from_millis(30));
            let req = control_plane::admin::Request::ChangesDecide {
                id: id.clone(),
                approve: true,
                hash: Some(shown.after_hash.clone()),
                withdraw: false,
            };
            let answer = s.request(&req);
            stop.store(true, Ordering::SeqCst);
            match answer {
                Ok(control_plane::admin::Response::Decided { outcome, why, .. }) => (outcome, why),
                other => panic!("{other:?}"),
            }
        });
        let versions = s.versions();
        match outcome.0.as_str() {
            "applied" => assert_eq!(&versions.last().unwrap().1, &shown.after),
            "refused" => refused += 1,
            other => panic!("{other}"),
        }
        for (_, text) in &versions {
            assert!(!text.contains("1000"), "an edited text was applied");
        }
    }
    assert!(
        refused > 0,
        "the editor never won a race: nothing was tested"
    );
    assert!(s.cli(&["audit", "verify"]).status.success());
}

#[test]
fn audit_verify_finds_every_kind_of_tampering_and_passes_an_untouched_store() {
    let mut s = Serve::init(control_plane::config::DEFAULT_CONFIG);
    s.start();
    for i in 0..3 {
        s.send("console", &format!("hello {i}"), 120).unwrap();
    }
    assert_eq!(s.stop().map(|e| e.success()), Some(true));
    let verify = |state: &std::path::Path| {
        std::process::Command::new(tests::service::ironclaw_bin())
            .args(["audit", "verify", "--state-dir"])
            .arg(state)
            .output()
            .unwrap()
    };
    let out = verify(&s.state);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = s.audit().len() as i64;
    assert!(entries >= 10, "{entries}");

    // Recomputes every hash from `from` on, as an attacker who knows the formula would.
    fn rechain(conn: &rusqlite::Connection, from: i64) {
        let rows: Vec<(i64, i64, String, String)> = conn
            .prepare("SELECT seq, at, kind, detail FROM audit WHERE seq >= ?1 ORDER BY seq")
            .unwrap()
            .query_map([from], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut prev: Vec<u8> = conn
            .query_row("SELECT hash FROM audit WHERE seq = ?1", [from - 1], |r| {
                r.get(0)
            })
            .unwrap();
        for (seq, at, kind, detail) in rows {
            let mut h = Sha256::new();
            h.update(&prev);
            h.update(seq.to_be_bytes());
            h.update(at.to_be_bytes());
            h.update(kind.as_bytes());
            h.update([0u8]);
            h.update(detail.as_bytes());
            let hash = h.finalize().to_vec();
            conn.execute(
                "UPDATE audit SET prev = ?2, hash = ?3 WHERE seq = ?1",
                rusqlite::params![seq, prev, hash],
            )
            .unwrap();
            prev = hash;
        }
    }
    let n = entries;
    type Tamper = Box<dyn Fn(&rusqlite::Connection)>;
    let cases: Vec<(&str, Tamper)> = vec![
        (
            "a flipped byte",
            Box::new(|c| {
                let d: String = c
                    .query_row("SELECT detail FROM audit WHERE seq = 5", [], |r| r.get(0))
                    .unwrap();
                let mut b = d.into_bytes();
                b[1] ^= 0x01;
                c.execute(
                    "UPDATE audit SET detail = ?1 WHERE seq = 5",
                    [String::from_utf8(b).unwrap()],
                )
                .unwrap();
            }),
        ),
        (
            "a deleted entry",
            Box::new(|c| {
                c.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
            }),
        ),
        (
            "two entries swapped",
            Box::new(|c| {
                c.execute_batch(
                    "UPDATE audit SET seq = -1 WHERE seq = 3;
                     UPDATE audit SET seq = 3 WHERE seq = 4;
                     UPDATE audit SET seq = 4 WHERE seq = -1;",
                )
                .unwrap();
            }),
        ),
        (
            "an entry inserted and the chain recomputed",
            Box::new(move |c| {
                c.execute_batch(
                    "UPDATE audit SET seq = seq + 1000000 WHERE seq >= 4;
                     UPDATE audit SET seq = seq - 1000000 + 1 WHERE seq >= 1000000;
                     INSERT INTO audit (seq, at, kind, detail, prev, hash)
                       VALUES (4, 1, 'change_applied', '{}', x'00', x'00');",
                )
                .unwrap();
                rechain(c, 4);
                assert_eq!(
                    c.query_row("SELECT max(seq) FROM audit", [], |r| r.get::<_, i64>(0))
                        .unwrap(),
                    n + 1
                );
            }),
        ),
        (
            "the tail cut off",
            Box::new(move |c| {
                c.execute("DELETE FROM audit WHERE seq > ?1", [n - 3])
                    .unwrap();
            }),
        ),
        (
            "the tail cut off and the head moved back",
            Box::new(move |c| {
                c.execute("DELETE FROM audit WHERE seq > ?1", [n - 3])
                    .unwrap();
                c.execute(
                    "UPDATE audit_head SET seq = ?1, hash = (SELECT hash FROM audit WHERE seq = ?1)",
                    [n - 3],
                )
                .unwrap();
            }),
        ),
        (
            "an entry edited, the chain recomputed and the head moved along",
            Box::new(move |c| {
                c.execute("UPDATE audit SET detail = '{}' WHERE seq = 6", [])
                    .unwrap();
                rechain(c, 6);
                c.execute(
                    "UPDATE audit_head SET hash = (SELECT hash FROM audit WHERE seq = ?1)",
                    [n],
                )
                .unwrap();
            }),
        ),
        (
            "the whole trail emptied",
            Box::new(|c| {
                c.execute_batch("DELETE FROM audit; DELETE FROM audit_head;")
                    .unwrap();
            }),
        ),
        (
            "every table dropped",
            Box::new(|c| {
                let tables: Vec<String> = c
                    .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
                    .unwrap()
                    .query_map([], |r| r.get(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
                for t in tables {
                    c.execute_batch(&format!("DROP TABLE IF EXISTS \"{t}\""))
                        .unwrap();
                }
            }),
        ),
        (
            "every approved configuration version deleted",
            Box::new(|c| {
                c.execute("DELETE FROM config_versions", []).unwrap();
            }),
        ),
        (
            "an approved configuration version inserted",
            Box::new(|c| {
                let text = "[model]\nprovider = \"demo\"\n[operators]\nunix_uids = [0, 1000]\n";
                c.execute(
                    "INSERT INTO config_versions (version, text, hash, change_id, applied_at)
                     VALUES (2, ?1, ?2, 'c0000000000000000', 1)",
                    [text, &sha(text)],
                )
                .unwrap();
            }),
        ),
    ];
    for (i, (what, tamper)) in cases.iter().enumerate() {
        let copy = s.dir.path().join(format!("copy{i}"));
        std::fs::create_dir(&copy).unwrap();
        for f in ["control.db", "master.key", "config.toml"] {
            std::fs::copy(s.state.join(f), copy.join(f)).unwrap();
        }
        let master = control_plane::state::StateDir::choose(Some(copy.clone()))
            .load_master_key()
            .unwrap();
        let key = queue_proto::keys::derive_control_store_key(&master);
        let conn = queue_proto::sqlcipher::open_keyed(&copy.join("control.db"), &key).unwrap();
        tamper(&conn);
        drop(conn);
        // `serve` refuses to run on it, and says why.
        let out = std::process::Command::new(tests::service::ironclaw_bin())
            .args(["serve", "--state-dir"])
            .arg(&copy)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "serve ran on {what}: {err}");
        assert!(err.contains("changed outside ironclaw"), "{what}: {err}");
        if what.contains("configuration version") {
            // The trail itself is intact: only the version has no record in it.
            assert!(verify(&copy).status.success());
            continue;
        }
        let out = verify(&copy);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what} not found: {err}");
        assert!(err.contains("BROKEN"), "{what}: {err}");
    }
}

#[test]
fn a_hand_edit_changes_nothing_until_approved_and_everything_survives_kill_9() {
    let (rt, tg, model, mut s) = telegram_rig("");
    tg.push_text(USER, "one");
    wait_sent(&rt, &tg, &s, USER, &format!("{ECHO}one"));

    // By hand: the user out, the newcomer in. Nothing changes at the restart.
    let edited = telegram_config(&s, &model.base(), &tg.http.base(), &[NEWCOMER], "");
    std::fs::write(s.state.join("config.toml"), &edited).unwrap();
    assert_eq!(s.stop().map(|e| e.success()), Some(true));
    s.start();
    tg.push_text(USER, "two");
    wait_sent(&rt, &tg, &s, USER, &format!("{ECHO}two"));
    tg.push_text(NEWCOMER, "let me in");
    wait_sent(&rt, &tg, &s, NEWCOMER, notice::NOT_ALLOWED);
    let pending = s.changes(false);
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].requester, "config-file");
    let id = pending[0].id.clone();

    // Killed: the request is still there, once, and the old version still in force.
    s.kill9();
    s.start();
    let pending = s.changes(false);
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].id, id);
    tg.push_text(USER, "three");
    wait_sent(&rt, &tg, &s, USER, &format!("{ECHO}three"));

    // A name the client sends is not an identity: the request is refused as malformed.
    let forged = json!({ "op": "changes_decide", "id": id, "approve": true, "hash": null,
                         "by": "telegram:5151" });
    let mut conn = std::os::unix::net::UnixStream::connect(s.state.join("run/admin.sock")).unwrap();
    conn.write_all(format!("{forged}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(conn), &mut answer).unwrap();
    assert!(answer.contains("unknown field"), "{answer}");
    assert_eq!(s.changes(false).len(), 1);

    let out = s.cli(&["changes", "approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!("- allowed_users = [{USER}]")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!("+ allowed_users = [{NEWCOMER}]")),
        "{shown}"
    );
    tg.push_text(NEWCOMER, "in now");
    wait_sent(&rt, &tg, &s, NEWCOMER, &format!("{ECHO}in now"));

    // Killed again: the approved version stays in force, with no new drift.
    s.kill9();
    s.start();
    tg.push_text(USER, "four");
    tg.push_text(NEWCOMER, "five");
    wait_sent(&rt, &tg, &s, NEWCOMER, &format!("{ECHO}five"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !tg.sent_to(USER).iter().any(|t| t.ends_with("four")),
        "the user was removed by the approved change"
    );
    assert!(s.changes(false).is_empty());
    let all = s.changes(true);
    let decided = all.iter().find(|c| c.id == id).unwrap();
    assert_eq!(decided.state, ChangeState::Applied);
    assert_eq!(decided.decided_by.as_deref(), Some("unix:0"));
    assert_eq!(s.versions().len(), 2);
    assert_eq!(s.versions()[1].1, edited);
    assert!(s.cli(&["audit", "verify"]).status.success());
}

/// The first start takes the configuration file as approved version 1 only if the
/// policy would let a change request put it in force: `serve` refuses a first file with
/// no operator or with an endpoint at an IP address, and stores no version. gVisor off
/// stays the one development exception, allowed in a first file only.
#[test]
fn serve_refuses_a_first_file_no_change_request_could_make() {
    let default = control_plane::config::DEFAULT_CONFIG;
    let refused = [
        (
            default.replace("unix_uids = [0]", "unix_uids = []"),
            "no_operators",
        ),
        (
            default.replace(
                "provider = \"demo\"",
                "provider = \"demo\"\nbase_url = \"https://203.0.113.9\"",
            ),
            "is not an approved endpoint",
        ),
    ];
    for (text, why) in refused {
        let s = Serve::init(&text);
        let mut serve = std::process::Command::new(tests::service::ironclaw_bin())
            .args(["serve", "--state-dir"])
            .arg(&s.state)
            .env("IRONCLAW_AGENT_BIN", tests::service::agent_bin())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let exited = wait_until(30, || serve.try_wait().unwrap().is_some());
        if !exited {
            let _ = serve.kill();
        }
        let out = serve.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(exited, "serve started on a first file with {why}");
        assert!(!out.status.success(), "{why}: {err}");
        assert!(err.contains(why), "{why}: {err}");
        assert!(s.versions().is_empty(), "{why}: a version was stored");
    }
    let host = default.replace("runtime = \"gvisor\"", "runtime = \"host\"");
    let mut s = Serve::init(&host);
    s.start();
    assert_eq!(s.versions().len(), 1, "the development mode starts");
    assert_eq!(s.stop().map(|e| e.success()), Some(true));
}

#[test]
fn a_change_above_the_telegram_risk_limit_is_never_approved_by_a_button() {
    let (_rt, tg, _model, s) = telegram_rig("");
    // A new model endpoint (risk 0.8) would send every conversation elsewhere.
    let risky = telegram_config(&s, "http://127.0.0.1:9", &tg.http.base(), &[USER], "");
    let file = s.dir.path().join("risky.toml");
    std::fs::write(&file, &risky).unwrap();
    let out = s.cli(&["changes", "propose", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = s.changes(false)[0].id.clone();
    let detail = s.change(&id);
    assert!(detail.summary.risk > 0.7, "{}", detail.summary.risk);

    // The prompt shows the change, says where to approve it, and offers only Reject.
    let mut keyboard = None;
    assert!(
        wait_until(30, || {
            keyboard = tg
                .keyboards()
                .into_iter()
                .find(|(chat, _, data)| *chat == OPERATOR && data.iter().any(|d| d.contains(&id)));
            keyboard.is_some()
        }),
        "no prompt: {:?}",
        tg.sent()
    );
    let (_, message, data) = keyboard.unwrap();
    assert_eq!(data.len(), 1, "{data:?}");
    assert!(data[0].starts_with(&format!("r:{id}:")), "{data:?}");
    let text = tg
        .sent_to(OPERATOR)
        .into_iter()
        .find(|t| t.contains(&id))
        .unwrap();
    assert!(
        text.contains("too risky to approve from Telegram"),
        "{text}"
    );

    // An Approve press made up with the right hash, from the operator's own chat, is
    // refused: Telegram's word on who pressed does not carry this approval.
    let approve = format!("a:{id}:{}", &detail.after_hash[..32]);
    let q = tg.push_press(OPERATOR, OPERATOR, "private", message, &approve);
    let mut answer = None;
    assert!(wait_until(30, || {
        answer = tg.answer_to(&q);
        answer.is_some()
    }));
    assert!(answer.unwrap().contains("too risky"));
    assert_eq!(s.versions().len(), 1, "nothing applied");
    assert_eq!(s.changes(false).len(), 1, "still undecided");
    assert!(
        s.audit_of("decision_refused")
            .iter()
            .any(|e| e["detail"]["why"]
                .as_str()
                .unwrap_or("")
                .contains("telegram_max_risk")),
        "the refusal is recorded"
    );
}

/// `ironclaw changes propose` of the configuration file with `from` replaced by `to`;
/// the filed request's id.
fn propose(s: &Serve, from: &str, to: &str) -> String {
    let file = s.state.join("proposed.toml");
    let text = std::fs::read_to_string(s.state.join("config.toml")).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(&file, text.replacen(from, to, 1)).unwrap();
    let out = s.cli(&["changes", "propose", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    said.split_whitespace().nth(1).unwrap().to_owned()
}

/// `ironclaw changes withdraw ID` succeeds: the request is rejected, recorded as
/// withdrawn.
fn withdraw(s: &Serve, id: &str) {
    let out = s.cli(&["changes", "withdraw", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.change(id).summary.state, ChangeState::Rejected);
    let rejected = s.audit_of("change_rejected");
    let last = rejected.last().unwrap();
    assert_eq!(last["detail"]["change"], id);
    assert_eq!(last["detail"]["withdrawn"], true);
}

#[test]
fn the_only_operator_applies_their_own_change_and_any_operator_withdraws_theirs() {
    // The default configuration names one operator, root.
    let mut s = Serve::init(control_plane::config::DEFAULT_CONFIG);
    s.start();
    let id = propose(&s, "max_live = 32", "max_live = 9");
    let out = s.cli(&["changes", "approve", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.versions().len(), 2, "applied without a second person");
    let approved = s.audit_of("change_approved");
    assert_eq!(approved.last().unwrap()["detail"]["own_request"], true);
    // A proposal can be withdrawn by the one who made it.
    withdraw(&s, &propose(&s, "max_live = 9", "max_live = 10"));
    s.stop();

    // With a second operator named, nobody approves their own request; withdrawing
    // stays theirs.
    let two =
        control_plane::config::DEFAULT_CONFIG.replace("unix_uids = [0]", "unix_uids = [0, 1000]");
    assert_ne!(two, control_plane::config::DEFAULT_CONFIG);
    let mut s = Serve::init(&two);
    s.start();
    let id = propose(&s, "max_live = 32", "max_live = 9");
    let out = s.cli(&["changes", "approve", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not approve their own request"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.versions().len(), 1);
    withdraw(&s, &id);
    // Someone else's request (here the file's drift) is rejected, never withdrawn.
    let drifted = drift(&s, "Be brief.");
    let out = s.cli(&["changes", "withdraw", &drifted]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only its requester withdraws"));
    assert_eq!(s.change(&drifted).summary.state, ChangeState::Pending);
}

#[test]
fn an_approved_change_that_waits_for_a_restart_says_so() {
    let mut s = Serve::init(control_plane::config::DEFAULT_CONFIG);
    s.start();
    let token = s.secret_file("bridge.token", "a-bridge-token-of-enough-length-0123456789");
    let bridge = format!(
        "[channels.bridge]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"{}\"\n\n[operators]",
        token.display()
    );
    let id = propose(&s, "[operators]", &bridge);
    let out = s.cli(&["changes", "approve", &id]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("is in force") && said.contains("note: the channels changed"),
        "{said}"
    );
    assert!(s.log_text().contains("the channels changed"));
    let status = s.cli(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("channels      console (changes to bridge wait for a restart)"),
        "{status}"
    );
    // After the restart it listens.
    s.stop();
    s.start();
    let status = s.cli(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("channels      console, bridge\n"),
        "{status}"
    );
}

#[test]
fn an_approved_change_is_written_back_so_drift_is_only_what_a_person_edits() {
    let mut s = Serve::init(control_plane::config::DEFAULT_CONFIG);
    s.start();
    let id = propose(&s, "max_live = 32", "max_live = 9");
    assert!(s.cli(&["changes", "approve", &id]).status.success());
    // The file now holds the approved version, comments and all.
    let file = std::fs::read_to_string(s.state.join("config.toml")).unwrap();
    let approved = s.cli(&["config", "show", "--approved"]);
    assert!(approved.status.success());
    assert_eq!(String::from_utf8_lossy(&approved.stdout), file);
    assert!(
        file.contains("max_live = 9") && file.contains("# "),
        "{file}"
    );
    // After deploy/install no key file is left: the approved version comes from serve.
    let key = s.state.join("master.key");
    let away = s.state.join("master.key.away");
    std::fs::rename(&key, &away).unwrap();
    let shown = s.cli(&["config", "show", "--approved"]);
    std::fs::rename(&away, &key).unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&shown.stdout), file);
    // A SIGHUP with the file untouched files nothing, an undo least of all.
    let before = s.changes(true).len();
    s.hup();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        s.changes(true).len(),
        before,
        "no request from an untouched file"
    );
    // A one-line edit is a one-line change.
    std::fs::write(
        s.state.join("config.toml"),
        file.replace("max_live = 9", "max_live = 10"),
    )
    .unwrap();
    s.hup();
    let mut drifted = None;
    assert!(wait_until(20, || {
        drifted = s
            .changes(false)
            .into_iter()
            .find(|c| c.requester == "config-file");
        drifted.is_some()
    }));
    let shown = s.cli(&["changes", "show", &drifted.unwrap().id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    let diff: Vec<&str> = shown
        .lines()
        .skip_while(|l| !l.starts_with("the exact change"))
        .filter(|l| l.starts_with('-') || l.starts_with('+'))
        .collect();
    assert_eq!(diff.len(), 2, "{shown}");
}

#[test]
fn a_configuration_file_that_is_a_symlink_is_never_replaced() {
    let mut s = Serve::init(control_plane::config::DEFAULT_CONFIG);
    let config = s.state.join("config.toml");
    let target = s.state.join("managed.toml");
    std::fs::rename(&config, &target).unwrap();
    std::os::unix::fs::symlink(&target, &config).unwrap();
    s.start();
    let before = std::fs::read_to_string(&target).unwrap();
    let id = propose(&s, "max_live = 32", "max_live = 9");
    assert!(s.cli(&["changes", "approve", &id]).status.success());
    assert!(
        std::fs::symlink_metadata(&config)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), before);
    assert!(s.log_text().contains("symbolic link"), "{}", s.log_text());
}
