//! Files benchmark: the real `ironclaw serve` under gVisor, a fake Telegram, a scripted
//! model that answers at once and a fake transcriber that answers at once, in one run:
//! - a plain text round trip (update queued → reply sent to the chat);
//! - a photo round trip (update queued → getFile, download, check, publish, an image
//!   block to the model → reply sent);
//! - a voice note from its arrival to its transcript reaching the model (update queued
//!   → the model request that carries the transcript arrives at the fake model).
//!
//! Each is the median of 9 (after 1 to warm up). Run: `scripts/bench-files` (builds
//! the release binaries, then `cargo bench -p tests --bench files`). Needs root and runsc.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::fake_model::start_tool_model;
use tests::fake_telegram::FakeTelegram;
use tests::fake_transcriber::FakeTranscriber;
use tests::service::Serve;

const PERSON: i64 = 9001;
/// Rounds measured, after the warm-up: a session may ask for 10 transcripts a minute,
/// and the whole run stays within one minute's allowance.
const ROUNDS: usize = 9;
const WARM_UP: usize = 1;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let tg = rt.block_on(FakeTelegram::start("9:bench"));
    let model = rt.block_on(start_tool_model(Arc::new(|_: &str| vec![])));
    let transcriber = rt.block_on(FakeTranscriber::start());
    let mut s = Serve::init("");
    let token = s.secret_file("tg.token", "9:bench");
    std::fs::write(
        s.state.join("config.toml"),
        format!(
            "[model]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"m\"\naccepts_images = true\n\n\
             [sandbox]\nruntime = \"gvisor\"\n\n[budgets]\nrequests_per_minute = 100000\n\n\
             [transcription]\nprovider = \"openai\"\nbase_url = \"{}\"\nmodel = \"whisper-1\"\n\n\
             [channels.telegram]\ntoken_file = \"{}\"\napi_base = \"{}\"\n\
             allowed_users = [{PERSON}]\npoll_timeout_secs = 1\n",
            model.base(),
            transcriber.http.base(),
            token.display(),
            tg.http.base()
        ),
    )
    .expect("config");
    s.start();
    let sent_count = || tg.sent_to(PERSON).len();
    let wait_reply = |before: usize| {
        let ok = rt.block_on(tg.wait_for(Duration::from_secs(60), |sent| {
            sent.iter().filter(|(c, _)| *c == PERSON).count() > before
        }));
        assert!(ok, "no reply:\n{}", s.log_text());
    };
    // A photo of 200 KiB, as a phone's compressed one might be.
    let mut photo = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00".to_vec();
    photo.resize(200 * 1024, 0x55);
    let mut text = Vec::new();
    let mut photos = Vec::new();
    let mut voices = Vec::new();
    for i in 0..WARM_UP + ROUNDS {
        let before = sent_count();
        let t = Instant::now();
        tg.push_text(PERSON, &format!("hello {i}"));
        wait_reply(before);
        let text_rt = t.elapsed();

        let id = format!("ph-{i}");
        tg.add_file(&id, photo.clone());
        let before = sent_count();
        let t = Instant::now();
        tg.push_file(
            PERSON,
            "photo",
            &[(&id, Some(photo.len() as u64))],
            None,
            Some("look"),
        );
        wait_reply(before);
        let photo_rt = t.elapsed();

        let marker = format!("bench voice {i}");
        let mut voice = b"OggS\x00\x02".to_vec();
        voice.extend_from_slice(marker.as_bytes());
        voice.resize(32 * 1024, 0);
        transcriber.knows(&voice[..6 + marker.len()], &format!("transcript {i}"));
        let id = format!("vn-{i}");
        tg.add_file(&id, voice);
        let before = sent_count();
        let t = Instant::now();
        tg.push_file(PERSON, "voice", &[(&id, None)], None, None);
        let want = format!("transcript {i}");
        let reached = rt.block_on(async {
            loop {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "no transcript:\n{}",
                    s.log_text()
                );
                if model
                    .received()
                    .iter()
                    .any(|r| String::from_utf8_lossy(&r.body).contains(&want))
                {
                    return t.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        wait_reply(before);
        model.clear_received();
        if i >= WARM_UP {
            text.push(text_rt);
            photos.push(photo_rt);
            voices.push(reached);
        }
    }
    println!(
        "files benchmark (gVisor, Telegram fake with 1 s long polls, {ROUNDS} rounds, medians):"
    );
    println!(
        "  text round trip:                        {:8.1} ms",
        median(text)
    );
    println!(
        "  photo round trip (200 KiB, image block): {:8.1} ms",
        median(photos)
    );
    println!(
        "  voice note arrival → transcript at model: {:7.1} ms",
        median(voices)
    );
    s.stop();
}
