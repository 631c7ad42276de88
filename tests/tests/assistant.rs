//! What the assistant knows and can do for the person, through the real `serve` under
//! gVisor: the local time and time zone each turn is told.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use tests::fake_model::start_echo_model;
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
