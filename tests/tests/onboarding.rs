//! A person's first contact through Telegram: a sender not yet allowed learns nothing,
//! while the operator's log names their id once; a wrong bot token is named as such;
//! "typing…" shows while the assistant works.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use tests::fake_telegram::FakeTelegram;
use tests::service::{Serve, wait_until};

const TG_TOKEN: &str = "123456:onboarding-token";

/// A serve reading Telegram at the fake `tg` with the bot token `token`.
fn telegram_serve(tg: &FakeTelegram, token: &str, users: &[i64], model: &str) -> Serve {
    Serve::telegram(&tg.http.base(), token, users, model)
}

#[test]
fn a_refused_sender_is_named_to_the_operator_once_and_told_nothing_more() {
    const OWNER: i64 = 4242;
    const NEWCOMER: i64 = 777_001;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TG_TOKEN));
    let s = telegram_serve(&tg, TG_TOKEN, &[OWNER], "provider = \"demo\"");
    for i in 0..5 {
        tg.push_text(NEWCOMER, &format!("hello {i}"));
    }
    assert!(wait_until(30, || tg.unconfirmed() == 0));
    assert!(wait_until(10, || !tg.sent_to(NEWCOMER).is_empty()));
    let log = s.log_text();
    let hints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&format!("user {NEWCOMER}")))
        .collect();
    assert_eq!(hints.len(), 1, "once a period:\n{log}");
    assert!(hints[0].contains("allowed_users"), "{}", hints[0]);
    // The newcomer gets the one fixed refusal, nothing about ids or the operator.
    assert_eq!(tg.sent_to(NEWCOMER).len(), 1);
    assert!(!tg.sent_to(NEWCOMER)[0].contains(&NEWCOMER.to_string()));
}

#[test]
fn a_wrong_bot_token_is_named_as_such() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TG_TOKEN));
    let s = telegram_serve(&tg, "999:not-the-token", &[4242], "provider = \"demo\"");
    assert!(wait_until(30, || tg.unauthorised_calls() > 0));
    assert!(wait_until(10, || s
        .log_text()
        .contains("Telegram refused the bot token")));
    let log = s.log_text();
    assert!(log.contains("ERROR") && log.contains("@BotFather"), "{log}");
    assert!(!log.contains("not-the-token"), "the token is never logged");
}

#[test]
fn typing_shows_while_the_assistant_works_and_stops_after() {
    const OWNER: i64 = 4242;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TG_TOKEN));
    let model = rt.block_on(tests::fake_model::start_slow_echo_model(
        Duration::from_secs(5),
    ));
    let model = format!(
        "provider = \"openai\"\nbase_url = \"{}\"\nmodel = \"m\"",
        model.base()
    );
    let _s = telegram_serve(&tg, TG_TOKEN, &[OWNER], &model);
    tg.push_text(OWNER, "take your time");
    let answered = tg.wait_for(Duration::from_secs(60), |sent| {
        sent.iter()
            .any(|(c, t)| *c == OWNER && t.contains("take your time"))
    });
    assert!(rt.block_on(answered), "{:?}", tg.sent_to(OWNER));
    // A call already on its way when the answer came may still land.
    std::thread::sleep(Duration::from_secs(1));
    let typing = tg.actions();
    assert!(
        typing.len() >= 2 && typing.iter().all(|(c, a)| *c == OWNER && a == "typing"),
        "shown, and shown again while the model took its time: {typing:?}"
    );
    // Answered: no more "typing…".
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(tg.actions().len(), typing.len(), "stopped after the answer");
}
