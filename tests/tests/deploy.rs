//! The systemd unit: `systemd-analyze verify` passes on it, and each of its directives is
//! listed in deploy/README.md with the reason it is on or off.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn the_unit_verifies_and_every_directive_is_explained() {
    let unit = std::fs::read_to_string(repo().join("deploy/ironclaw.service")).unwrap();
    // The only change: ExecStart names the binary this test suite built.
    let exec = "ExecStart=/usr/local/bin/ironclaw ";
    assert!(unit.contains(exec));
    let bin = tests::service::ironclaw_bin();
    let local = unit.replace(exec, &format!("ExecStart={} ", bin.display()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ironclaw.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/setup installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let doc = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    let mut section = "";
    for line in unit.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line;
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        if line.starts_with('#')
            || section != "[Service]"
            || [
                "Type",
                "ExecStart",
                "Environment",
                "KillSignal",
                "LimitNOFILE",
            ]
            .contains(&key)
        {
            continue;
        }
        assert!(
            doc.contains(&format!("`{key}=`")),
            "{key}= is not explained in deploy/README.md"
        );
    }
    // The settings runsc needs are as the table says.
    for (needed, why) in [
        ("Delegate=yes", "runsc manages its sandboxes' cgroups"),
        ("User=root", "runsc needs root"),
    ] {
        assert!(unit.contains(needed), "{why}");
    }
    for absent in [
        "ProtectControlGroups=",
        "RestrictNamespaces=",
        "SystemCallFilter=",
    ] {
        assert!(!unit.contains(absent), "{absent} would stop runsc");
    }
}

/// The Debian packages `scripts/setup what` would install on a machine that has none:
/// `dpkg-query` and `apt-get` are stand-ins that say nothing is installed and record
/// what is asked for.
fn packages_asked_by_setup(what: &str) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let asked = dir.path().join("asked");
    for (name, body) in [
        ("dpkg-query", "exit 1\n".to_owned()),
        (
            "apt-get",
            format!(
                "[ \"$1\" = install ] && printf '%s\\n' \"$@\" >> {}\nexit 0\n",
                asked.display()
            ),
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(repo().join("scripts/setup"))
        .arg(what)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(&asked)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('-') && *l != "install")
        .map(str::to_owned)
        .collect()
}

#[test]
fn running_the_assistant_installs_nothing_only_the_tests_need() {
    let run = packages_asked_by_setup("run");
    for needed in ["runsc", "e2fsprogs", "iproute2"] {
        assert!(run.iter().any(|p| p == needed), "{needed} in {run:?}");
    }
    for test_only in [
        "runc",
        "chromium",
        "chromium-driver",
        "systemd",
        "fonts-liberation",
    ] {
        assert!(
            !run.iter().any(|p| p == test_only),
            "{test_only} in {run:?}"
        );
    }
    let test = packages_asked_by_setup("test");
    for needed in ["runsc", "runc", "chromium", "chromium-driver"] {
        assert!(test.iter().any(|p| p == needed), "{needed} in {test:?}");
    }
}
