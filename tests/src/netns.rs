//! A network namespace a test makes for itself, with no way out: only `lo`, holding the
//! "public" test addresses it asks for (documentation ranges) besides 127.0.0.1.
//! Nothing is added to the host's own interfaces or routes. A test runs its
//! servers and the `serve` under test inside it by running its own test binary again
//! there ([`NetNs::run_test`]).

use std::path::PathBuf;
use std::process::Command;

/// Set in the environment of a test run inside a namespace: its name.
pub const INSIDE: &str = "IRONCLAW_TEST_NETNS";

/// A namespace, removed when dropped.
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    /// A fresh namespace `name` with `lo` up, holding `addresses` (CIDR) too.
    pub fn new(name: &str, addresses: &[&str]) -> NetNs {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = NetNs { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"]);
        for a in addresses {
            ip(&["-n", name, "addr", "add", a, "dev", "lo"]);
        }
        ns
    }

    /// Runs the test `test` of the current test binary inside the namespace (with
    /// [`INSIDE`] set); whether it passed, and what it printed. Only the network
    /// namespace is entered (`nsenter --net`): `ip netns exec` would also mount a fresh
    /// `/sys`, hiding the cgroups the sandboxes are confined in.
    pub fn run_test(&self, test: &str) -> (bool, String) {
        self.run_test_with(test, &[])
    }

    /// [`NetNs::run_test`] with more environment.
    pub fn run_test_with(&self, test: &str, env: &[(&str, &str)]) -> (bool, String) {
        let exe: PathBuf = std::env::current_exe().expect("the test binary");
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg(exe)
            .args([
                "--exact",
                test,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(INSIDE, &self.name)
            .envs(env.iter().copied())
            .output()
            .expect("run the test inside the namespace");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Whether this test runs inside a namespace its outer test made.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}
