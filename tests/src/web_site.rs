//! The "public" HTTPS sites of the web tests and benchmark: a test CA and certificates
//! made with `openssl`, and `web/site.py` (Python's http.server behind ssl) serving
//! them on an address of the test's own network namespace.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A CA only this test trusts, and a certificate from it for `names` (`key`, `pem`).
pub fn certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("test site");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=IronClaw test CA",
        ],
    ]
    .concat());
    for (name, sans) in [
        (
            "site",
            "DNS:site.test,DNS:other.test,DNS:granted.test,DNS:inside.test,DNS:rebind.test",
        ),
        ("wrong", "DNS:somewhere-else.test"),
    ] {
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        ]
        .concat());
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!(
                "subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
            ),
        )
        .expect("test site");
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

/// A running site, stopped when dropped.
#[derive(Debug)]
pub struct Site(Child);

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A site on `address`:443 with the certificate `name`.
pub fn site(dir: &Path, address: &str, name: &str) -> Site {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("web/site.py");
    let mut command = python();
    command
        .arg(script)
        .args([address, &format!("{name}.pem"), &format!("{name}.key")])
        .current_dir(dir);
    started(command)
}

fn python() -> Command {
    Command::new(std::env::var("IRONCLAW_SYSTEM_PYTHON").unwrap_or_else(|_| "python3".into()))
}

/// Starts `command` and waits for its `ready` line.
fn started(mut command: Command) -> Site {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("a test server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("its stdout")),
        &mut line,
    )
    .expect("its ready line");
    assert_eq!(line.trim(), "ready");
    Site(child)
}

/// The first name server the host's resolv.conf names: inside a test's own network
/// namespace that address is nobody's, so a test DNS server may take it there.
pub fn host_name_server() -> Option<std::net::IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()?
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|a| a.trim().parse().ok())
}

/// A DNS server on `address`:53 answering each `(name, first, then)` with `first`, then
/// with `then` on every later query (`web/dns.py`).
pub fn dns(address: std::net::IpAddr, answers: &[(&str, &str, &str)]) -> Site {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("web/dns.py");
    let mut command = python();
    command
        .arg(script)
        .arg(address.to_string())
        .args(answers.iter().map(|(n, a, b)| format!("{n}={a},{b}")));
    started(command)
}
