//! Crash safety of the real service under gVisor: a stream of 500 Telegram messages
//! while `ironclaw serve` is killed with SIGKILL at random points and started again.
//! Every update Telegram handed over is stored exactly once (so the offset never moved
//! past one that was not stored), every stored message ends answered or reported, and
//! no reply reaches the person twice.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::time::{Duration, Instant};

use control_plane::model::demo::DEMO_LABEL;
use tests::fake_telegram::FakeTelegram;
use tests::service::Serve;

const TOKEN: &str = "98765:crash-test-token";
const USERS: [i64; 5] = [101, 102, 103, 104, 105];
const MESSAGES: usize = 500;
const KILLS: usize = 10;

/// A small deterministic generator, seeded from the clock and printed, so a failing
/// run can be repeated.
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn sigkill_during_a_stream_of_500_messages_loses_nothing_and_repeats_nothing() {
    let seed = std::env::var("IRONCLAW_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (set IRONCLAW_CRASH_SEED to repeat)");
    let mut rng = Lcg(seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start(TOKEN));
    let mut s = Serve::init("");
    let token = s.secret_file("tg.token", TOKEN);
    let users: Vec<String> = USERS.iter().map(i64::to_string).collect();
    let config = format!(
        r#"
[model]
provider = "demo"

[budgets]
requests_per_minute = 100000

[delivery]
max_waiting_per_session = 1000
reply_timeout_secs = 600

[channels.telegram]
token_file = "{}"
api_base = "{}"
allowed_users = [{}]
poll_timeout_secs = 1
"#,
        token.display(),
        tg.http.base(),
        users.join(", ")
    );
    std::fs::write(s.state.join("config.toml"), config).unwrap();
    s.start();

    // Each round: kill, let messages pile up at Telegram while serve is down, start it
    // again, and kill it at a random point while it works through the pile.
    let per_round = MESSAGES / KILLS;
    let mut sent = 0;
    for round in 0..KILLS {
        let delay = rng.below(300);
        std::thread::sleep(Duration::from_millis(delay));
        println!(
            "round {round}: SIGKILL {delay} ms after start; {} replies so far",
            tg.sent().len()
        );
        s.kill9();
        for _ in 0..per_round {
            let user = USERS[sent % USERS.len()];
            tg.push_text(user, &format!("m-{sent}"));
            sent += 1;
        }
        s.start();
    }

    // Wait until every message is settled and every reply handed over.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut idle_since: Option<Instant> = None;
    let settled = loop {
        let list = s.sessions();
        let stored: u64 = list
            .iter()
            .map(|x| x.answered + x.failed + x.refused + x.dead_lettered + x.pending)
            .sum();
        let busy: u64 = list.iter().map(|x| x.pending + x.replies_waiting).sum();
        if stored == MESSAGES as u64 && busy == 0 && tg.unconfirmed() == 0 {
            break list;
        }
        // Nothing left anywhere, yet fewer stored than sent: Telegram forgot updates
        // the store never held.
        if busy == 0 && tg.unconfirmed() == 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            assert!(
                since.elapsed() < Duration::from_secs(15),
                "updates lost: {stored} of {MESSAGES} stored, Telegram holds none"
            );
        } else {
            idle_since = None;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: {list:?}, {} unconfirmed\n{}",
            tg.unconfirmed(),
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // Every update stored once: Telegram forgot each only after the store held it.
    let count = |f: fn(&control_plane::store::sessions::SessionSummary) -> u64| {
        settled.iter().map(f).sum::<u64>()
    };
    let (answered, failed, refused, dead) = (
        count(|x| x.answered),
        count(|x| x.failed),
        count(|x| x.refused),
        count(|x| x.dead_lettered),
    );
    assert_eq!(
        answered + failed + refused + dead,
        MESSAGES as u64,
        "{settled:?}"
    );

    // No reply twice; every answered message's reply delivered or dead-lettered.
    let mut delivered: HashMap<String, usize> = HashMap::new();
    for (_, text) in tg.sent() {
        if let Some(m) = text.strip_prefix(&format!("{DEMO_LABEL} You said: ")) {
            *delivered.entry(m.to_owned()).or_default() += 1;
        }
    }
    let twice: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "replies sent twice: {twice:?}");
    let replies_dead = count(|x| x.replies_dead);
    assert!(
        delivered.len() as u64 + replies_dead >= answered,
        "{} delivered + {replies_dead} dead-lettered < {answered} answered",
        delivered.len()
    );
    println!(
        "{MESSAGES} messages, {KILLS} SIGKILLs: {answered} answered ({} delivered, {replies_dead} replies dead-lettered), {failed} failed with a notice, {dead} dead-lettered",
        delivered.len()
    );
    let verify = s.cli(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
