//! Segment publish benchmark: latency p50/p99 and items/s for batches of 1, 16 and 256
//! items, SQLCipher against plain SQLite on the same code path (`InboxWriter::publish`,
//! row envelopes included in both), interleaved so both see the same disk.
//!
//! Run: `cargo bench -p queue-proto --features control-plane,agent,plain-files`
//! (or `scripts/bench-segments`). `BENCH_DIR` chooses the directory (default: the
//! system temp dir); publishing fsyncs, so the disk under it matters.

use std::time::{Duration, Instant};

use queue_proto::control::InboxWriter;
use queue_proto::ids::{Seq, SessionId};
use queue_proto::items::{InboxItem, UserMessage};
use queue_proto::keys::{MasterKey, SessionSalt, derive_session_keys};

const BATCHES: [(usize, usize); 3] = [(1, 300), (16, 200), (256, 60)];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let base = std::env::var_os("BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let root = tempfile::tempdir_in(base).expect("bench directory is writable");
    let master = MasterKey::generate().expect("random source");
    let id = SessionId::try_from("bench").expect("valid id");
    let keys = derive_session_keys(
        &master,
        &id,
        &SessionSalt::generate().expect("random source"),
    );
    let dirs = ["encrypted", "plain"].map(|d| {
        let p = root.path().join(d);
        std::fs::create_dir(&p).expect("create bench dir");
        p
    });
    let encrypted = InboxWriter::new(dirs[0].clone(), id.clone(), &keys);
    let plain = InboxWriter::new(dirs[1].clone(), id, &keys).without_file_encryption();

    println!(
        "segment publish (write temp, fsync, rename, fsync dir); items are ~200-byte user messages"
    );
    println!("dir: {}", root.path().display());
    println!(
        "{:>6} {:>10} {:>11} {:>11} {:>12} {:>11} {:>11} {:>12} {:>7}",
        "batch",
        "runs",
        "enc p50 ms",
        "enc p99 ms",
        "enc items/s",
        "pln p50 ms",
        "pln p99 ms",
        "pln items/s",
        "ratio"
    );
    let mut seq = 0u64;
    for (batch, runs) in BATCHES {
        let items: Vec<InboxItem> = (0..batch)
            .map(|i| {
                InboxItem::UserMessage(UserMessage {
                    message_id: i as u64,
                    received_at: 1_700_000_000,
                    text: "x".repeat(200),
                    local_time: String::new(),
                    time_zone: String::new(),
                    attachments: 0,
                })
            })
            .collect();
        let mut times = [Vec::with_capacity(runs), Vec::with_capacity(runs)];
        for _ in 0..runs {
            seq += 1;
            for (writer, t) in [&encrypted, &plain].into_iter().zip(times.iter_mut()) {
                let start = Instant::now();
                let path = writer.publish(Seq(seq), &items).expect("publish");
                t.push(start.elapsed());
                std::fs::remove_file(path).expect("remove");
            }
        }
        let rate =
            |t: &[Duration]| (batch * t.len()) as f64 / t.iter().sum::<Duration>().as_secs_f64();
        for t in &mut times {
            t.sort_unstable();
        }
        let (enc, pln) = (&times[0], &times[1]);
        println!(
            "{:>6} {:>10} {:>11.3} {:>11.3} {:>12.0} {:>11.3} {:>11.3} {:>12.0} {:>7.2}",
            batch,
            runs,
            ms(percentile(enc, 0.5)),
            ms(percentile(enc, 0.99)),
            rate(enc),
            ms(percentile(pln, 0.5)),
            ms(percentile(pln, 0.99)),
            rate(pln),
            rate(enc) / rate(pln),
        );
    }
    println!("ratio = encrypted items/s ÷ plain items/s (target ≥ 0.50)");
}
