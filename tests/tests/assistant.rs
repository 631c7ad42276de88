//! What the assistant knows and can do for the person, through the real `serve` under
//! gVisor: the local time and time zone each turn is told, and reminders set in the
//! person's own terms that fire when they should, with serve's wall clock moved by the
//! test (libfaketime; its monotonic clock and the sandbox's are left alone).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tests::fake_model::{start_echo_model, start_tool_model, tool_results};
use tests::fake_telegram::FakeTelegram;
use tests::service::{Serve, agent_bin, ironclaw_bin};

#[test]
fn each_turn_tells_the_model_the_persons_local_time_and_zone() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt.block_on(start_echo_model());
    let mut s = Serve::init(&format!(
        "[model]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"m\"\n\n\
         [agent]\ntimezone = \"Asia/Kolkata\"\n\n[sandbox]\nruntime = \"gvisor\"\n",
        model.base()
    ));
    s.start();
    let before = jiff::Timestamp::now();
    assert_eq!(
        s.send("console", "what time is it?", 60).unwrap().0,
        "answered"
    );
    let after = jiff::Timestamp::now();
    let system = model.received()[0].json()["messages"][0].clone();
    assert_eq!(system["role"], "system");
    let text = system["content"].as_str().unwrap();
    let (_, told) = text
        .split_once("The current date and time for the person is ")
        .unwrap_or_else(|| panic!("{text}"));
    // India has one offset all year, so the test holds in every season.
    let (when, zone) = told.split_once(' ').unwrap();
    assert_eq!(zone, "(Asia/Kolkata).");
    assert!(when.ends_with("+05:30"), "{when}");
    let at: jiff::Timestamp = when.parse().unwrap();
    let second = jiff::SignedDuration::from_secs(1);
    assert!(
        at >= before - second && at <= after,
        "{at} between {before} and {after}"
    );

    // An operator sets this person's own zone; the next turn is told the time there.
    let bad = s.cli(&["sessions", "timezone", "console", "Mars/Olympus"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("IANA"));
    let set = s.cli(&["sessions", "timezone", "console", "Asia/Tokyo"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(String::from_utf8_lossy(&set.stdout).contains("Asia/Tokyo"));
    model.clear_received();
    assert_eq!(s.send("console", "and now?", 60).unwrap().0, "answered");
    let system = model.received()[0].json()["messages"][0]["content"].clone();
    let told = system.as_str().unwrap();
    assert!(told.contains("+09:00 (Asia/Tokyo)."), "{told}");
    assert_eq!(s.audit_of("session_time_zone_set").len(), 1);
    let back = s.cli(&["sessions", "timezone", "console", "--default"]);
    assert!(String::from_utf8_lossy(&back.stdout).contains("Asia/Kolkata"));
}

#[test]
fn a_time_zone_the_machine_does_not_know_is_refused_by_doctor_and_serve() {
    let s = Serve::init("[model]\nprovider = \"demo\"\n\n[agent]\ntimezone = \"Mars/Olympus\"\n");
    let doctor = Command::new(ironclaw_bin())
        .args(["doctor", "--state-dir"])
        .arg(&s.state)
        .env("IRONCLAW_AGENT_BIN", agent_bin())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&doctor.stdout);
    assert!(shown.contains("config.toml:5:1: agent.timezone"), "{shown}");
    let serve = Command::new("timeout")
        .arg("20")
        .arg(ironclaw_bin())
        .args(["serve", "--state-dir"])
        .arg(&s.state)
        .env("IRONCLAW_AGENT_BIN", agent_bin())
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&serve.stderr).contains("agent.timezone"));
}

/// Debian's libfaketime (`scripts/setup test` installs it).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// serve's wall clock, as an offset from the real one that the test moves.
struct Clock(PathBuf);

impl Clock {
    /// Prepares `s` to start under a clock at the real time.
    fn install(s: &mut Serve) -> Clock {
        assert!(
            std::path::Path::new(LIBFAKETIME).exists(),
            "{LIBFAKETIME} is missing: run scripts/setup test"
        );
        let clock = Clock(s.dir.path().join("clock"));
        clock.set(0);
        for (k, v) in [
            ("LD_PRELOAD", PathBuf::from(LIBFAKETIME)),
            ("FAKETIME_TIMESTAMP_FILE", clock.0.clone()),
            ("FAKETIME_NO_CACHE", "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ] {
            s.env.push((k.into(), v));
        }
        clock
    }

    /// Sets serve's clock `secs` ahead of the real one.
    fn set(&self, secs: i64) {
        std::fs::write(&self.0, format!("{secs:+}\n")).unwrap();
    }
}

const PERSON: i64 = 4242;

/// The tool calls the scripted model makes for the person's words.
fn reminder_script(text: &str) -> Vec<(&'static str, serde_json::Value)> {
    match text {
        "remind me in 2 minutes to stretch" => vec![
            ("schedule", json!({ "in_minutes": 2, "text": "stretch" })),
            ("reply", json!({ "text": "I will remind you." })),
        ],
        "every day at 08:00 say good morning" => vec![(
            "schedule",
            json!({ "every": "day", "time": "08:00", "text": "good morning" }),
        )],
        "remind me on new year 2020" => {
            vec![(
                "schedule",
                json!({ "at": "2020-01-01T00:00", "text": "party" }),
            )]
        }
        "which reminders are set?" => vec![("reminder_list", json!({}))],
        t if t.starts_with("cancel reminder ") => {
            let id: u64 = t["cancel reminder ".len()..].parse().unwrap();
            vec![("reminder_cancel", json!({ "id": id }))]
        }
        _ => vec![],
    }
}

#[test]
fn reminders_fire_once_at_their_time_recur_and_can_be_listed_and_cancelled() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start("42:reminders"));
    let model = rt.block_on(start_tool_model(Arc::new(reminder_script)));
    let mut s = Serve::init("");
    let token = s.secret_file("tg.token", "42:reminders");
    std::fs::write(
        s.state.join("config.toml"),
        format!(
            "[model]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"m\"\n\n\
             [agent]\ntimezone = \"Europe/Berlin\"\n\n[sandbox]\nruntime = \"gvisor\"\n\n\
             [channels.telegram]\ntoken_file = \"{}\"\napi_base = \"{}\"\n\
             allowed_users = [{PERSON}]\npoll_timeout_secs = 1\n",
            model.base(),
            token.display(),
            tg.http.base()
        ),
    )
    .unwrap();
    let clock = Clock::install(&mut s);
    s.start();
    let count = |text: &str| tg.sent_to(PERSON).iter().filter(|t| *t == text).count();
    let wait_sent = |text: &str, n: usize| {
        let ok = rt.block_on(tg.wait_for(Duration::from_secs(90), |sent| {
            sent.iter()
                .filter(|(c, t)| *c == PERSON && t == text)
                .count()
                >= n
        }));
        assert!(
            ok,
            "{text:?} was not sent {n} times: {:?}\n{}",
            tg.sent_to(PERSON),
            s.log_text()
        );
    };

    // "In two minutes": set at serve's now, answered with the local time it fires.
    tg.push_text(PERSON, "remind me in 2 minutes to stretch");
    wait_sent("I will remind you.", 1);
    let set = tool_results(&model);
    let set = set.iter().find(|r| r.starts_with("set: ")).unwrap();
    assert!(
        set.contains("(Europe/Berlin)") && set.ends_with(": stretch"),
        "{set}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(count("Reminder: stretch"), 0, "not before its time");
    clock.set(121);
    wait_sent("Reminder: stretch", 1);
    clock.set(600);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        count("Reminder: stretch"),
        1,
        "a one-off reminder fires once"
    );

    // A reminder in the past is refused, with the reason, and nothing is set.
    tg.push_text(PERSON, "remind me on new year 2020");
    wait_sent("done", 1);
    assert!(
        tool_results(&model)
            .iter()
            .any(|r| r.starts_with("refused: ") && r.contains("in the past")),
        "{:?}",
        tool_results(&model)
    );

    // Every day at 08:00 Berlin time: the answer says when it fires first; moved there
    // and a day on, it fires twice.
    tg.push_text(PERSON, "every day at 08:00 say good morning");
    wait_sent("done", 2);
    let results = tool_results(&model);
    let daily = results
        .iter()
        .rev()
        .find(|r| r.starts_with("set: "))
        .unwrap();
    assert!(daily.contains("every day at 08:00"), "{daily}");
    let id: u64 = daily["set: id ".len()..]
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let next = daily
        .split("next ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(
        next.contains("T08:00:00+01:00") || next.contains("T08:00:00+02:00"),
        "{next}"
    );
    let first: jiff::Timestamp = next.parse().unwrap();
    let ahead = (first - jiff::Timestamp::now()).get_seconds();
    clock.set(ahead + 2);
    wait_sent("Reminder: good morning", 1);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count("Reminder: good morning"), 1);
    clock.set(ahead + 86_400 + 2);
    wait_sent("Reminder: good morning", 2);

    // Listed with its id and rule; cancelled, it fires no more.
    tg.push_text(PERSON, "which reminders are set?");
    wait_sent("done", 3);
    let listed = tool_results(&model).last().cloned().unwrap();
    assert!(
        listed.contains(&format!("id {id}: next ")) && listed.contains("every day at 08:00"),
        "{listed}"
    );
    tg.push_text(PERSON, &format!("cancel reminder {id}"));
    wait_sent("done", 4);
    assert_eq!(
        tool_results(&model).last().unwrap(),
        &format!("cancelled reminder {id}")
    );
    clock.set(ahead + 2 * 86_400 + 2);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        count("Reminder: good morning"),
        2,
        "a cancelled reminder does not fire"
    );
    let audit = s.audit_of("reminder_set");
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert_eq!(s.audit_of("reminder_cancelled").len(), 1);
}

/// The tool calls of the memory test's model.
fn memory_script(text: &str) -> Vec<(&'static str, serde_json::Value)> {
    match text {
        "remember the garage code" => vec![(
            "note_write",
            json!({ "name": "garage", "body": "the garage code is 9914" }),
        )],
        "what were my locker and the garage code?" => {
            vec![("note_search", json!({ "query": "locker garage code" }))]
        }
        _ => vec![],
    }
}

#[test]
fn what_has_left_the_history_is_still_found_by_search() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt.block_on(start_tool_model(Arc::new(memory_script)));
    let mut s = Serve::init(&format!(
        "[model]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"m\"\n\n\
         [sandbox]\nruntime = \"gvisor\"\n\n[budgets]\nrequests_per_minute = 1000\n",
        model.base()
    ));
    s.start();
    let say = |text: &str| {
        let (state, replies) = s.send("console", text, 60).unwrap();
        assert_eq!(state, "answered", "{text}: {replies:?}\n{}", s.log_text());
    };
    say("my locker is number 312");
    say("remember the garage code");
    // Twenty-five more turns: the history the model is sent holds 40 messages.
    for i in 0..25 {
        say(&format!("small talk {i}"));
    }
    model.clear_received();
    say("what were my locker and the garage code?");
    let requests = model.received();
    let first = requests[0].json().to_string();
    assert!(
        !first.contains("312") && !first.contains("9914"),
        "both have left the history the model is sent: {first}"
    );
    let found = tool_results(&model).join("\n");
    assert!(
        found.contains("note \"garage\"") && found.contains("9914"),
        "{found}"
    );
    assert!(
        found.contains("person said") && found.contains("[locker] is number 312"),
        "{found}"
    );
}
