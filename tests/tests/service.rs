//! The whole service, run as the real `ironclaw serve` process under real gVisor, with
//! loopback fakes of Telegram's Bot API and of an OpenAI-compatible model: messages in
//! through Telegram, the bridge and the console reach a sandboxed agent and its replies
//! come back; hostile or oversized input is refused clearly while others are served;
//! nothing from a conversation is left in plaintext under the state directory.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use control_plane::service::notice;
use serde_json::{Value, json};
use tests::fake_model::{ECHO, start_echo_model};
use tests::fake_telegram::FakeTelegram;
use tests::service::{Serve, bridge_post, free_port, http};

const TG_TOKEN: &str = "123456:tg-token-e5c0ffee51";
const BRIDGE_TOKEN: &str = "bridge-token-77af0c12d9";
const USER: i64 = 4242;
const FLOODER: i64 = 777;
const STRANGER: i64 = 666;

/// A configuration with the fake model, the fake Telegram and the bridge.
fn config(s: &Serve, model: &str, telegram: &str, bridge_port: u16, extra: &str) -> String {
    let tg = s.secret_file("tg.token", TG_TOKEN);
    let br = s.secret_file("bridge.token", BRIDGE_TOKEN);
    format!(
        r#"
[model]
provider = "openai"
base_url = "{model}"
model = "fake-echo"

[sandbox]
runtime = "gvisor"

[channels.telegram]
token_file = "{tg}"
api_base = "{telegram}"
allowed_users = [{USER}, {FLOODER}]
poll_timeout_secs = 1

[channels.bridge]
listen = "127.0.0.1:{bridge_port}"
token_file = "{br}"
{extra}
"#,
        tg = tg.display(),
        br = br.display(),
    )
}

fn summary<'a>(
    list: &'a [control_plane::store::sessions::SessionSummary],
    name: &str,
) -> &'a control_plane::store::sessions::SessionSummary {
    list.iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no session {name} in {list:?}"))
}

/// Waits until `text` was sent to `chat`; on failure shows what was sent and the log.
fn expect_sent(
    rt: &tokio::runtime::Runtime,
    tg: &FakeTelegram,
    s: &Serve,
    chat: i64,
    text: &str,
    secs: u64,
) {
    let arrived = rt.block_on(tg.wait_for(Duration::from_secs(secs), |sent| {
        sent.iter().any(|(c, t)| *c == chat && t == text)
    }));
    let sent: Vec<_> = tg
        .sent()
        .iter()
        .map(|(c, t)| (*c, t.chars().take(60).collect::<String>()))
        .collect();
    assert!(
        arrived,
        "{text:?} never reached chat {chat}; sent: {sent:?}\n{}",
        s.log_text()
    );
}

/// A running `serve` with the fake model, the fake Telegram and the bridge.
struct Rig {
    rt: tokio::runtime::Runtime,
    tg: FakeTelegram,
    model: tests::fake_http::FakeHttp,
    s: Serve,
    port: u16,
}

impl Rig {
    fn start(extra: &str) -> Rig {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let tg = rt.block_on(FakeTelegram::start(TG_TOKEN));
        let model = rt.block_on(start_echo_model());
        let mut s = Serve::init("");
        let port = free_port();
        let text = config(&s, &model.base(), &tg.http.base(), port, extra);
        std::fs::write(s.state.join("config.toml"), text).unwrap();
        s.start();
        Rig {
            rt,
            tg,
            model,
            s,
            port,
        }
    }
}

#[test]
fn telegram_bridge_and_console_reach_the_sandboxed_agent_and_leave_nothing_in_plaintext() {
    let Rig {
        rt,
        tg,
        model: _model,
        mut s,
        port,
    } = Rig::start("");

    // Telegram: an update from an allowed user; the reply arrives through sendMessage.
    tg.push_text(USER, "hello via telegram MARKER-TG-5d1");
    let want = format!("{ECHO}hello via telegram MARKER-TG-5d1");
    expect_sent(&rt, &tg, &s, USER, &want, 90);
    assert!(
        tg.allowed_updates()
            .iter()
            .all(|a| *a == json!(["message", "callback_query"]))
    );
    assert_eq!(tg.unauthorised_calls(), 0);

    // The console: `send` prints the reply.
    let (state, replies) = s
        .send("console", "hello via console MARKER-CON-8e2", 90)
        .unwrap();
    assert_eq!(
        (state.as_str(), replies),
        (
            "answered",
            vec![format!("{ECHO}hello via console MARKER-CON-8e2")]
        )
    );

    // The bridge: post, long-poll the reply, acknowledge it.
    let (status, posted) = bridge_post(
        port,
        BRIDGE_TOKEN,
        &json!({ "chat": "family", "text": "hello via bridge MARKER-BR-3f7" }),
    );
    assert_eq!(
        (status, posted["state"].as_str()),
        (202, Some("accepted")),
        "{posted}"
    );
    let (status, body) = http(port, "GET", "/v1/replies?wait=60", Some(BRIDGE_TOKEN), b"");
    let got: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    let replies = got["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 1, "{got}");
    assert_eq!(
        replies[0]["text"],
        format!("{ECHO}hello via bridge MARKER-BR-3f7")
    );
    assert_eq!(replies[0]["chat"], "family");
    assert_eq!(replies[0]["in_reply_to"], posted["message"]);
    let id = replies[0]["id"].as_i64().unwrap();
    let (_, body) = http(
        port,
        "GET",
        &format!("/v1/replies?after={id}"),
        Some(BRIDGE_TOKEN),
        b"",
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["replies"],
        json!([]),
        "acknowledged replies are not sent again"
    );

    // Each chat has its own session, and every message is accounted for.
    let list = s.sessions();
    for name in [format!("tg-{USER}"), "console".into(), "br-family".into()] {
        let one = summary(&list, &name);
        assert_eq!(
            (
                one.answered,
                one.pending,
                one.failed,
                one.dead_lettered,
                one.replies_waiting
            ),
            (1, 0, 0, 0, 0),
            "{one:?}"
        );
    }

    // Settled messages leave nothing in the inbox: segments are removed once answered.
    let inbox = s.state.join(format!("sessions/tg-{USER}/inbox.d"));
    assert!(inbox.is_dir());
    assert_eq!(tests::files_under(&inbox), Vec::<std::path::PathBuf>::new());

    // Deleting a session stops it, destroys its keys and removes its files.
    let console_dir = s.state.join("sessions/console");
    assert!(console_dir.exists());
    let out = s.cli(&["sessions", "delete", "console"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!console_dir.exists());
    assert!(!s.state.join("run/console").exists());
    assert!(s.sessions().iter().all(|x| x.name != "console"));

    // A clean stop; then nothing from the conversation is readable anywhere under the
    // state directory, and the log holds neither content nor tokens.
    let status = s.stop().unwrap();
    assert!(status.success(), "serve did not stop cleanly: {status}");
    let markers = [
        "MARKER-TG-5d1",
        "MARKER-CON-8e2",
        "MARKER-BR-3f7",
        "hello via",
    ];
    let files = tests::files_under(&s.state);
    assert!(
        files.len() > 5,
        "the scan sees the state directory: {files:?}"
    );
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for m in markers {
            assert!(
                !bytes.windows(m.len()).any(|w| w == m.as_bytes()),
                "{m} in plaintext in {}",
                f.display()
            );
        }
    }
    let log = s.log_text();
    for secret in markers.iter().chain(&[TG_TOKEN, BRIDGE_TOKEN, "tg-token"]) {
        assert!(!log.contains(secret), "{secret} in the service log");
    }
    let verify = s.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let export = String::from_utf8(s.cli(&["audit", "export"]).stdout).unwrap();
    assert!(export.contains("\"session_deleted\""));
    assert!(
        !export.contains("MARKER"),
        "the audit trail holds metadata, never content"
    );
}

#[test]
fn bad_input_gets_clear_handling_and_others_are_still_served() {
    let Rig {
        rt,
        tg,
        model,
        s,
        port,
    } = Rig::start(
        // The model budget is not what this test is about: room for every answer.
        "[delivery]\nmax_waiting_per_session = 5\n[budgets]\nrequests_per_minute = 1000\n",
    );

    // Unknown senders: one fixed refusal, whatever they send; nothing reaches an agent.
    for i in 0..3 {
        tg.push_text(STRANGER, &format!("let me in STRANGER-{i}"));
    }
    // Malformed and unsupported updates.
    let from = json!({ "id": USER, "is_bot": false, "first_name": "T" });
    let chat = json!({ "id": USER, "type": "private" });
    tg.push_raw(|id| json!({ "update_id": id, "edited_message": { "text": "x" } }));
    tg.push_raw(
        |id| json!({ "update_id": id, "message": { "from": from, "chat": chat, "sticker": {} } }),
    );
    tg.push_raw(
        |id| json!({ "update_id": id, "message": { "from": from, "chat": chat, "text": 5 } }),
    );
    tg.push_raw(|id| json!({ "update_id": id, "message": { "from": from, "text": "no chat" } }));
    tg.push_raw(|id| json!({ "update_id": id, "message": { "from": from, "chat": { "id": -100, "type": "group" }, "text": "in a group" } }));
    tg.push_raw(|_| json!({ "message": "no update id" }));
    tg.push_raw(|id| json!({ "update_id": id, "message": [1, 2, 3] }));
    // A 10 MB message, and an update too large to read at all.
    let ten_mb = "x".repeat(10 * 1024 * 1024);
    tg.push_text(USER, &ten_mb);
    let huge = tg.push_raw(|id| json!({ "update_id": id, "message": { "from": from, "chat": chat, "text": "y".repeat(20 * 1024 * 1024) } }));
    // A flood from one chat while another user talks.
    for i in 0..30 {
        tg.push_text(FLOODER, &format!("flood {i}"));
    }
    tg.push_text(USER, "still there?");

    expect_sent(&rt, &tg, &s, USER, &format!("{ECHO}still there?"), 120);
    // Every flood message ends answered or refused with a notice, none lost.
    let all_settled =
        |sent: &[(i64, String)]| sent.iter().filter(|(c, _)| *c == FLOODER).count() >= 30;
    assert!(
        rt.block_on(tg.wait_for(Duration::from_secs(120), all_settled)),
        "{:?}",
        tg.sent_to(FLOODER)
    );
    let flood = tg.sent_to(FLOODER);
    let answered = flood.iter().filter(|t| t.starts_with(ECHO)).count();
    let refused = flood.iter().filter(|t| *t == notice::TOO_MANY).count();
    assert_eq!(answered + refused, 30, "{flood:?}");
    assert!(refused > 0, "the flood went past the per-session limit");
    let list = s.sessions();
    let f = summary(&list, &format!("tg-{FLOODER}"));
    assert_eq!(
        (f.answered, f.refused, f.pending),
        (answered as u64, refused as u64, 0)
    );

    assert_eq!(
        tg.sent_to(STRANGER),
        vec![notice::NOT_ALLOWED.to_owned()],
        "one fixed refusal"
    );
    assert!(
        list.iter().all(|x| x.name != format!("tg-{STRANGER}")),
        "strangers get no session"
    );
    let user = tg.sent_to(USER);
    assert!(user.contains(&notice::TOO_LONG.to_owned()), "{user:?}");
    assert!(user.contains(&notice::NOT_TEXT.to_owned()), "{user:?}");
    let model_saw = model
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    for never in ["STRANGER-", "in a group", "xxxxxxxxxx", "yyyyyyyyyy"] {
        assert!(!model_saw.contains(never), "{never} reached the model");
    }
    // The Telegram offset moved past everything, the oversized update included.
    assert!(
        rt.block_on(async {
            for _ in 0..100 {
                if tg.unconfirmed() == 0 {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            false
        }),
        "updates left unconfirmed"
    );
    assert!(tg.offsets().iter().any(|o| *o > huge));
    assert!(
        s.log_text()
            .contains("skipped an update larger than 16 MiB")
    );

    // The bridge: oversized, unauthorised and malformed requests.
    let big = json!({ "chat": "c", "text": ten_mb }).to_string();
    assert_eq!(
        http(
            port,
            "POST",
            "/v1/messages",
            Some(BRIDGE_TOKEN),
            big.as_bytes()
        )
        .0,
        413
    );
    assert_eq!(
        bridge_post(port, "wrong-token", &json!({ "chat": "c", "text": "hi" })).0,
        401
    );
    assert_eq!(http(port, "POST", "/v1/messages", None, b"{}").0, 401);
    assert_eq!(
        http(
            port,
            "POST",
            "/v1/messages",
            Some(BRIDGE_TOKEN),
            b"{not json"
        )
        .0,
        400
    );
    for bad in [
        json!({ "chat": "../etc", "text": "hi" }),
        json!({ "chat": "c", "text": "hi", "session": "tg-4242" }),
        json!({ "chat": "c", "text": "   " }),
    ] {
        assert_eq!(bridge_post(port, BRIDGE_TOKEN, &bad).0, 400, "{bad}");
    }
    assert_eq!(
        http(
            port,
            "GET",
            "/v1/replies?session=console",
            Some(BRIDGE_TOKEN),
            b""
        )
        .0,
        400
    );
    // The console: an oversized message is an error, not a crash.
    assert!(s.send("console", &"z".repeat(70 * 1024), 5).is_err());
    assert!(s.send("Not A Name", "hi", 5).is_err());

    // Still up, still answering.
    let (state, replies) = s.send("console", "are you up?", 90).unwrap();
    assert_eq!(
        (state.as_str(), replies),
        ("answered", vec![format!("{ECHO}are you up?")])
    );
    assert!(s.pid().is_some());
}

#[test]
fn telegram_outages_rate_limits_reminders_and_long_replies() {
    let Rig {
        rt,
        tg,
        model: _model,
        s,
        port: _,
    } = Rig::start("");

    // Telegram is down for a while: getUpdates fails, then recovers on its own.
    tg.set_down(true);
    std::thread::sleep(Duration::from_secs(3));
    tg.push_text(USER, "sent during the outage");
    std::thread::sleep(Duration::from_secs(2));
    tg.set_down(false);
    expect_sent(
        &rt,
        &tg,
        &s,
        USER,
        &format!("{ECHO}sent during the outage"),
        90,
    );
    assert!(s.log_text().contains("telegram reachable again"));

    // sendMessage answers 429 with retry_after twice; the reply still arrives, once.
    tg.rate_limit_sends(2, 1);
    let started = std::time::Instant::now();
    tg.push_text(USER, "rate limited");
    let want = format!("{ECHO}rate limited");
    expect_sent(&rt, &tg, &s, USER, &want, 90);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "retry_after was honoured"
    );
    assert_eq!(tg.sent_to(USER).iter().filter(|t| **t == want).count(), 1);

    // The agent's `schedule` becomes a timer in the control store; it fires once, as a
    // reminder in the same chat.
    tg.push_text(USER, "remind me in 2: water the plants");
    let reminder = "Reminder: water the plants".to_owned();
    expect_sent(&rt, &tg, &s, USER, &reminder, 60);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        tg.sent_to(USER).iter().filter(|t| **t == reminder).count(),
        1
    );

    // A reply longer than Telegram's 4096-character limit arrives in pieces, all of it.
    let long = "word ".repeat(1500);
    tg.push_text(USER, &long);
    let whole = format!("{ECHO}{long}");
    let arrived = |sent: &[(i64, String)]| {
        sent.iter()
            .map(|(_, t)| t.as_str())
            .collect::<String>()
            .contains(&whole)
    };
    assert!(
        rt.block_on(tg.wait_for(Duration::from_secs(90), arrived)),
        "the long reply did not arrive whole"
    );
    assert!(
        tg.sent_to(USER)
            .iter()
            .all(|t| t.encode_utf16().count() <= 4096)
    );
}

#[test]
fn the_admin_socket_serves_operators_only() {
    // The socket is 0600 and root's; the peer check is what stops a root process that
    // is not a configured operator. Root (uid 0) is left out of the operators here.
    let mut s = Serve::init("[model]\nprovider = \"demo\"\n\n[operators]\nunix_uids = [4321]\n");
    s.start();
    let refused = s.send("console", "hello", 5).unwrap_err();
    assert!(refused.contains("not an operator"), "{refused}");
    let out = s.cli(&["sessions", "list"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an operator"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(s.state.join("run/admin.sock"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn console_sends_back_to_back_each_get_exactly_their_reply() {
    // Each `send` acknowledges the replies it printed; the next one, started the moment
    // the answer arrives, must not print them again. Several sessions at once, so the
    // service is busy between writing an answer and acknowledging it.
    let mut s =
        Serve::init("[model]\nprovider = \"demo\"\n\n[budgets]\nrequests_per_minute = 100000\n");
    s.start();
    std::thread::scope(|scope| {
        for t in 0..8 {
            let s = &s;
            scope.spawn(move || {
                let session = format!("c{t}");
                for i in 0..15 {
                    let (state, replies) = s.send(&session, &format!("quick {i}"), 60).unwrap();
                    assert_eq!(state, "answered");
                    assert_eq!(
                        replies,
                        vec![control_plane::model::demo::reply(
                            &format!("quick {i}"),
                            i == 0
                        )],
                        "{session}, message {i}"
                    );
                }
            });
        }
    });
}
