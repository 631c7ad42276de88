//! The agent binary cannot contain an inbox writer: `sandbox-agent` is built on its own
//! (`cargo build -p sandbox-agent`), and in that build
//! `queue-proto` has the `agent` feature and not the `control-plane` feature that holds
//! `InboxWriter`, `OutboxReader`, `MasterKey` and key derivation.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

/// The `queue-proto` features enabled when `package` alone is built.
fn queue_proto_features(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "features",
            "-i",
            "queue-proto",
            "--prefix",
            "none",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut features: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("queue-proto feature \""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_owned)
        .collect();
    features.sort();
    features.dedup();
    features
}

#[test]
fn the_agent_links_only_the_agent_half() {
    assert_eq!(queue_proto_features("sandbox-agent"), ["agent", "default"]);
}

#[test]
fn the_control_plane_links_only_its_half() {
    // Also shows the check can see a `control-plane` feature when it is there.
    assert_eq!(
        queue_proto_features("control-plane"),
        ["control-plane", "default"]
    );
}
