//! Whole-system tests of IronClaw and loopback fakes of the outside world.
//!
//! # Trust
//!
//! Test code only; never shipped. It plays the attacker against the real components:
//! hostile segments, wrong keys, and independent implementations of the on-disk format.

#![forbid(unsafe_code)]

pub mod fake_http;
pub mod fake_model;
pub mod fake_tailscaled;
pub mod fake_telegram;
pub mod fake_transcriber;
pub mod hostile_model;
pub mod intake;
pub mod loopback;
pub mod netns;
pub mod service;
pub mod web_site;
pub mod webdriver;

/// Every regular file under `dir`, recursively (nothing if `dir` is missing).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}
