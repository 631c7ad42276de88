//! The admin HTTP API on the real `ironclaw serve`, reached from addresses on this
//! machine that stand for tailnet devices, with a loopback fake of tailscaled's LocalAPI
//! saying who each is: only a configured operator gets in, whatever the request claims,
//! and not a process on the server itself; a browser cannot be made to act for one; and
//! the approval page, driven in headless Chromium, shows the diff and applies exactly
//! what it showed.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use control_plane::store::state::ChangeState;
use serde_json::{Value, json};
use tests::fake_tailscaled::{FakeTailscaled, Known};
use tests::loopback::{Answer, Conn, LoopbackAddress, request_from};
use tests::service::Serve;
use tests::webdriver::Browser;

const ALICE: &str = "alice@example.com";

fn config(listen: SocketAddr, socket: &Path) -> String {
    format!(
        r#"[model]
provider = "demo"

[sandbox]
runtime = "gvisor"
memory_mib = 256

[operators]
unix_uids = [0]
tailnet = ["{ALICE}", "tag:admin"]

[admin_api]
listen = "{listen}"
host_names = ["homebox.tail1234.ts.net"]
tailscaled_socket = "{socket}"
"#,
        socket = socket.display()
    )
}

fn peers(list: &[(&str, Known)]) -> HashMap<String, Known> {
    list.iter()
        .map(|(ip, k)| ((*ip).to_owned(), k.clone()))
        .collect()
}

/// `serve` with the admin API on `server` and tailscaled's fake answering `list`, once
/// the API answers `operator`: the service, the fake, the configuration and the API's
/// address.
fn started(
    rt: &tokio::runtime::Runtime,
    server: &LoopbackAddress,
    operator: IpAddr,
    list: &[(&str, Known)],
) -> (Serve, FakeTailscaled, String, SocketAddr) {
    let fake = rt.block_on(FakeTailscaled::start(peers(list)));
    let listen = SocketAddr::new(server.ip, server.free_port());
    let text = config(listen, &fake.socket);
    let mut s = Serve::init(&text);
    s.start();
    Client { rt, to: listen }.wait_listening(operator);
    (s, fake, text, listen)
}

struct Client<'a> {
    rt: &'a tokio::runtime::Runtime,
    to: SocketAddr,
}

impl Client<'_> {
    /// One request from `from` on a connection of its own: the address and port the
    /// server saw and the answer, or the error if the connection was closed unanswered.
    fn try_send(
        &self,
        from: IpAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<(SocketAddr, Answer)> {
        self.rt
            .block_on(request_from(from, self.to, method, path, headers, body))
    }

    fn send(
        &self,
        from: IpAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (SocketAddr, Answer) {
        self.try_send(from, method, path, headers, body).unwrap()
    }

    fn get(&self, from: IpAddr, path: &str) -> Answer {
        self.send(from, "GET", path, &[], b"").1
    }

    fn post(&self, from: IpAddr, path: &str, body: &Value) -> Answer {
        let body = body.to_string();
        self.send(
            from,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .1
    }

    /// Waits until the API listens (it binds in the background once `serve` is up).
    fn wait_listening(&self, from: IpAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self
                .try_send(from, "GET", "/api/v1/health", &[], b"")
                .is_ok_and(|(_, a)| a.status == 200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the admin API did not come up on {}", self.to);
    }
}

/// Proposes a change over the admin socket (as `unix:0`): its id.
fn propose(s: &Serve, text: &str, reason: &str) -> String {
    let file = s.dir.path().join("proposed.toml");
    std::fs::write(&file, text).unwrap();
    let out = s.cli(&[
        "changes",
        "propose",
        file.to_str().unwrap(),
        "--reason",
        reason,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.changes(false)
        .into_iter()
        .find(|c| c.state == ChangeState::Pending)
        .expect("the proposal is pending")
        .id
}

#[test]
fn only_an_operator_on_the_tailnet_gets_in_and_no_header_makes_one() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = LoopbackAddress::add("100.101.7.1");
    let mallory = LoopbackAddress::add("100.101.7.2");
    let ci = LoopbackAddress::add("100.101.7.3");
    let admin_tag = LoopbackAddress::add("100.101.7.4");
    let broken = LoopbackAddress::add("100.101.7.5");
    let alice = LoopbackAddress::add("100.101.7.6");
    let outside = LoopbackAddress::add("198.18.7.1");
    let (mut s, fake, text, listen) = started(
        &rt,
        &server,
        alice.ip,
        &[
            ("100.101.7.6", Known::User(ALICE.into())),
            ("100.101.7.2", Known::User("mallory@example.com".into())),
            ("100.101.7.3", Known::Tagged(vec!["tag:ci".into()])),
            ("100.101.7.4", Known::Tagged(vec!["tag:admin".into()])),
            ("100.101.7.5", Known::Error(500)),
            // Asked about these only if the checks were broken: they would pass. (The
            // server's own address is its owner's, as tailscaled says of its own node.)
            ("100.101.7.1", Known::User(ALICE.into())),
            ("198.18.7.1", Known::User(ALICE.into())),
            ("127.0.0.1", Known::User(ALICE.into())),
        ],
    );
    let api = Client {
        rt: &rt,
        to: listen,
    };

    // The operator, by login and by tag.
    let health = api.get(alice.ip, "/api/v1/health");
    assert_eq!(
        health.status,
        200,
        "{}",
        String::from_utf8_lossy(&health.body)
    );
    assert_eq!(health.json()["you"], format!("tailnet:{ALICE}"));
    assert_eq!(health.json()["version"], 1);
    assert_eq!(health.json()["pending_changes"], 0);
    assert_eq!(health.header("x-frame-options"), Some("DENY"));
    assert!(
        health
            .header("content-security-policy")
            .is_some_and(|c| c.contains("frame-ancestors 'none'"))
    );
    let tagged = api.get(admin_tag.ip, "/api/v1/health");
    assert_eq!(tagged.status, 200);
    assert_eq!(tagged.json()["you"], "tailnet:tag:admin");

    // Tailnet devices that are not operators, on every endpoint and method, with every
    // header claiming otherwise: refused, and tailscaled asked about the TCP peer only.
    let spoofed = [
        ("X-Forwarded-For", "100.101.7.6"),
        ("Forwarded", "for=100.101.7.6"),
        ("X-Real-IP", "100.101.7.6"),
        ("Tailscale-User-Login", ALICE),
    ];
    let endpoints = [
        ("GET", "/"),
        ("GET", "/api/v1/health"),
        ("GET", "/api/v1/changes"),
        ("GET", "/api/v1/audit"),
        ("POST", "/api/v1/changes/x/approve"),
        ("DELETE", "/api/v1/sessions/console"),
    ];
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend(spoofed);
    for from in [mallory.ip, ci.ip, broken.ip] {
        for (method, path) in endpoints {
            let asked_before = fake.asked().len();
            let (port, a) = api.send(from, method, path, &headers, br#"{"hash":"00"}"#);
            assert_eq!(a.status, 403, "{method} {path} from {from}");
            assert_eq!(a.header("connection"), Some("close"));
            assert!(
                !String::from_utf8_lossy(&a.body).contains("version"),
                "nothing is told to a refused peer"
            );
            assert_eq!(fake.asked()[asked_before..], [port.to_string()]);
        }
    }
    // Peers outside the tailnet's ranges, and a process on the server itself (its
    // connection comes from the server's own address): closed unanswered, never asked.
    for from in [outside.ip, "127.0.0.1".parse().unwrap(), server.ip] {
        for (method, path) in endpoints {
            let asked_before = fake.asked().len();
            let r = api.try_send(from, method, path, &headers, br#"{"hash":"00"}"#);
            assert!(r.is_err(), "{method} {path} from {from}: {r:?}");
            assert_eq!(fake.asked().len(), asked_before, "asked about {from}");
        }
    }
    // Whois is asked at every request, not once a connection: an operator's device that
    // stops being one is refused on the connection it already has.
    let mut conn = rt.block_on(Conn::open(alice.ip, listen)).unwrap();
    let first = rt
        .block_on(conn.send("GET", "/api/v1/health", &[], b""))
        .unwrap();
    assert_eq!(first.status, 200);
    fake.set(
        "100.101.7.6",
        Known::User("alice-old-laptop@example.com".into()),
    );
    let second = rt
        .block_on(conn.send("GET", "/api/v1/health", &[], b""))
        .unwrap();
    assert_eq!(second.status, 403);
    fake.set("100.101.7.6", Known::User(ALICE.into()));
    // A peer knocking in a loop.
    for _ in 0..25 {
        assert_eq!(api.get(mallory.ip, "/api/v1/health").status, 403);
    }

    // A browser made to act for the operator: another host name (a rebound DNS name),
    // another origin, a form post. Each refused, and nothing decided.
    let id = propose(
        &s,
        &text.replace("memory_mib = 256", "memory_mib = 320"),
        "more memory",
    );
    let hash = s.change(&id).after_hash;
    let approve_path = format!("/api/v1/changes/{id}/approve");
    let body = json!({ "hash": hash }).to_string();
    let rebound = format!("evil.example:{}", listen.port());
    for (headers, status) in [
        (
            vec![
                ("Host", rebound.as_str()),
                ("Content-Type", "application/json"),
            ],
            421,
        ),
        (
            vec![
                ("Origin", "http://evil.example"),
                ("Content-Type", "application/json"),
            ],
            403,
        ),
        (
            vec![
                ("Sec-Fetch-Site", "cross-site"),
                ("Content-Type", "application/json"),
            ],
            403,
        ),
        (vec![("Content-Type", "text/plain")], 415),
        (
            vec![("Content-Type", "application/x-www-form-urlencoded")],
            415,
        ),
    ] {
        let (_, a) = api.send(alice.ip, "POST", &approve_path, &headers, body.as_bytes());
        assert_eq!(
            a.status,
            status,
            "{headers:?}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let rebound_get = api
        .send(
            alice.ip,
            "GET",
            "/api/v1/changes",
            &[("Host", &rebound)],
            b"",
        )
        .1;
    assert_eq!(rebound_get.status, 421, "a rebound name cannot read either");
    assert_eq!(s.changes(false).len(), 1, "still pending");
    assert_eq!(s.versions().len(), 1);

    // The operator's own requests: the configured MagicDNS name works too; an approval
    // needs the whole hash of what was shown, and one with a stale hash is refused.
    let by_name = api
        .send(
            alice.ip,
            "GET",
            &format!("/api/v1/changes/{id}"),
            &[(
                "Host",
                &format!("homebox.tail1234.ts.net:{}", listen.port()),
            )],
            b"",
        )
        .1;
    assert_eq!(by_name.status, 200);
    let shown = by_name.json();
    assert!(
        shown["diff"]
            .as_str()
            .unwrap()
            .contains("+ memory_mib = 320"),
        "{shown}"
    );
    assert_eq!(shown["detail"]["after_hash"], hash.as_str());
    assert_eq!(api.post(alice.ip, &approve_path, &json!({})).status, 400);
    let prefix = api.post(alice.ip, &approve_path, &json!({ "hash": &hash[..32] }));
    assert_eq!(prefix.status, 400, "a prefix is not the hash");
    let stale = api.post(alice.ip, &approve_path, &json!({ "hash": "0".repeat(64) }));
    assert_eq!(
        stale.status,
        409,
        "{}",
        String::from_utf8_lossy(&stale.body)
    );
    assert_eq!(stale.json()["outcome"], "refused");
    assert_eq!(
        api.get(alice.ip, "/api/v1/health").json()["pending_changes"],
        1
    );
    let applied = api.post(alice.ip, &approve_path, &json!({ "hash": hash }));
    assert_eq!(
        applied.status,
        200,
        "{}",
        String::from_utf8_lossy(&applied.body)
    );
    assert_eq!(applied.json()["outcome"], "applied");
    assert_eq!(applied.json()["version"], 2);
    assert_eq!(s.versions().len(), 2);
    assert_eq!(s.audit_of("change_applied").len(), 1);
    let decided = s.audit_of("change_approved");
    assert_eq!(decided.len(), 1);
    assert_eq!(
        decided[0]["detail"]["by"],
        format!("tailnet:{ALICE}"),
        "{decided:?}"
    );

    // The audit trail over the API: pages in order.
    let page = api.get(alice.ip, "/api/v1/audit?after=0&limit=3").json();
    let seqs: Vec<i64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    let rest = api.get(alice.ip, "/api/v1/audit?after=3").json();
    assert_eq!(rest[0]["seq"], 4);
    assert_eq!(api.get(alice.ip, "/api/v1/audit?after=x").status, 400);
    assert_eq!(api.get(alice.ip, "/api/v1/nothing").status, 404);
    assert_eq!(
        api.send(alice.ip, "PUT", "/api/v1/health", &[], b"")
            .1
            .status,
        405
    );

    // Every refusal was recorded: ten a minute one by one under each address (all
    // addresses outside the tailnet count as one, as does the server itself), the rest
    // counted when the minute ends (here: at shutdown).
    s.stop();
    let audit = s.audit();
    let refused_from = |ip: &str| {
        audit
            .iter()
            .filter(|e| e["kind"] == "admin_refused")
            .filter(|e| {
                e["detail"]["peer"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with(&format!("{ip}:"))
            })
            .count()
    };
    let limited = |key: &str| {
        audit
            .iter()
            .filter(|e| e["kind"] == "admin_refusals_limited" && e["detail"]["peer"] == key)
            .map(|e| e["detail"]["refused"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(refused_from("100.101.7.3"), 6);
    assert_eq!(refused_from("100.101.7.5"), 6);
    assert_eq!(refused_from("100.101.7.2"), 10);
    assert_eq!(limited("100.101.7.2"), 6 + 25 - 10);
    assert_eq!(refused_from("198.18.7.1") + refused_from("127.0.0.1"), 10);
    assert_eq!(limited("outside-tailnet"), 2);
    assert_eq!(refused_from("100.101.7.1"), 6, "the server's own address");
    assert_eq!(limited("this-machine"), 0);
    assert_eq!(refused_from("100.101.7.6"), 1, "alice's old laptop, once");
}

#[test]
fn the_approval_page_in_headless_chromium_shows_the_diff_and_applies_what_it_showed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = LoopbackAddress::add("100.101.8.1");
    let laptop = LoopbackAddress::add("100.101.8.2");
    // The browser runs here, but its connections come from the laptop's address, as
    // they would from another device on the tailnet.
    server.reached_from(&laptop);
    let (s, _fake, text, listen) = started(
        &rt,
        &server,
        laptop.ip,
        &[
            ("100.101.8.2", Known::User(ALICE.into())),
            ("100.101.8.1", Known::User(ALICE.into())),
        ],
    );
    // The reason is the requester's text: it must reach the page as text, not markup,
    // with a bidirectional override shown as an escape.
    let hostile = "more room <img src=x onerror=\"document.title='owned'\"><script>document.title='owned'</script>";
    let reason = format!("{hostile} \u{202e}evil");
    let after = text.replace("memory_mib = 256", "memory_mib = 320");
    let id = propose(&s, &after, &reason);
    let shown = s.change(&id);

    let browser = Browser::start();
    let page_url = format!("http://{listen}/");
    browser.goto(&page_url);
    let article = format!("article[data-change='{id}']");
    browser.wait_for(&article, Duration::from_secs(30), |_| true);
    let diff = browser.wait_for(
        &format!("{article} pre.diff"),
        Duration::from_secs(5),
        |_| true,
    );
    let diff = browser.text(&diff);
    assert!(diff.contains("- memory_mib = 256"), "{diff}");
    assert!(diff.contains("+ memory_mib = 320"), "{diff}");
    let page = browser.text(&browser.find_all(&article)[0]);
    assert!(
        page.contains(hostile),
        "the reason shown as written: {page}"
    );
    assert!(page.contains("\\u{202e}evil"), "{page}");
    assert!(!page.contains('\u{202e}'), "{page}");
    assert!(page.contains("Risk"), "{page}");
    assert!(
        page.contains(&format!("{:.2}", shown.summary.risk)),
        "risk {:.2} shown: {page}",
        shown.summary.risk
    );
    assert!(page.contains("unix:0"), "the requester: {page}");
    assert!(page.contains(&shown.after_hash), "{page}");
    assert_eq!(
        browser.script("return document.querySelectorAll('img, main script').length;"),
        json!(0),
        "no markup from the requester"
    );
    assert_ne!(browser.script("return document.title;"), json!("owned"));
    assert!(
        browser
            .script("return document.getElementById('who').textContent;")
            .as_str()
            .unwrap()
            .contains(&format!("tailnet:{ALICE}"))
    );

    // The request rewritten behind the page's back (text and hash, by someone with the
    // control store's key): the page approves what it showed, so nothing is applied.
    let evil = after.replace("memory_mib = 320", "memory_mib = 4096");
    let evil_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(evil.as_bytes()));
    let conn = s.store();
    let rewrite = |text: &str, hash: &str| {
        conn.execute(
            "UPDATE changes SET after = ?2, after_hash = ?3 WHERE id = ?1",
            [&id, text, hash],
        )
        .unwrap();
    };
    rewrite(&evil, &evil_hash);
    let approve = format!("{article} button.approve");
    browser.click(&browser.find_all(&approve)[0]);
    browser.wait_for(
        &format!("{article} .outcome"),
        Duration::from_secs(60),
        |t| t.contains("Not approved") && t.contains("not the one that was shown"),
    );
    assert_eq!(s.versions().len(), 1, "the rewritten text was not applied");

    // Put back, the page reloaded: the click applies what it shows, as the operator.
    rewrite(&shown.after, &shown.after_hash);
    browser.goto(&page_url);
    browser.wait_for(&article, Duration::from_secs(30), |_| true);
    browser.click(&browser.find_all(&approve)[0]);
    browser.wait_for(
        &format!("{article} .outcome"),
        Duration::from_secs(60),
        |t| t.contains("Applied: version 2"),
    );
    let versions = s.versions();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[1].1, after, "exactly the text shown");
    assert_eq!(s.audit_of("change_applied").len(), 1);
    let approved = s.audit_of("change_approved");
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0]["detail"]["by"], format!("tailnet:{ALICE}"));
    let all = s.changes(true);
    let decided = all.iter().find(|c| c.id == id).unwrap();
    assert_eq!(decided.state, ChangeState::Applied);
    assert_eq!(
        decided.decided_by.as_deref(),
        Some(format!("tailnet:{ALICE}").as_str())
    );
    // The refused click was recorded too.
    assert_eq!(s.audit_of("decision_refused").len(), 1);
}

#[test]
fn the_admin_api_waits_for_the_tailscale_address_while_the_rest_runs() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(FakeTailscaled::start(peers(&[(
        "100.101.10.2",
        Known::User(ALICE.into()),
    )])));
    // The address is not on this machine yet, as before tailscaled is up.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: SocketAddr = format!("100.101.10.1:{port}").parse().unwrap();
    let mut s = Serve::init(&config(listen, &fake.socket));
    s.start();
    let (_, replies) = s.send("console", "hello", 120).unwrap();
    assert_eq!(replies.len(), 1, "the console works meanwhile");
    assert!(s.log_text().contains("the admin API cannot listen yet"));
    let server = LoopbackAddress::add("100.101.10.1");
    let laptop = LoopbackAddress::add("100.101.10.2");
    let api = Client {
        rt: &rt,
        to: listen,
    };
    api.wait_listening(laptop.ip);
    assert_eq!(
        api.get(laptop.ip, "/api/v1/health").json()["you"],
        format!("tailnet:{ALICE}")
    );
    drop(server);
}

#[test]
fn the_tailnets_ipv6_range_is_checked_the_same_way() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = LoopbackAddress::add("fd7a:115c:a1e0::a:1");
    let laptop = LoopbackAddress::add("fd7a:115c:a1e0::a:2");
    let mallory = LoopbackAddress::add("fd7a:115c:a1e0::a:3");
    let (_s, fake, _text, listen) = started(
        &rt,
        &server,
        laptop.ip,
        &[
            ("fd7a:115c:a1e0::a:2", Known::User(ALICE.into())),
            (
                "fd7a:115c:a1e0::a:3",
                Known::User("mallory@example.com".into()),
            ),
            ("fd7a:115c:a1e0::a:1", Known::User(ALICE.into())),
        ],
    );
    let api = Client {
        rt: &rt,
        to: listen,
    };
    let (port, ok) = api.send(laptop.ip, "GET", "/api/v1/health", &[], b"");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["you"], format!("tailnet:{ALICE}"));
    assert_eq!(fake.asked().last(), Some(&port.to_string()));
    assert!(port.to_string().starts_with("[fd7a:115c:a1e0::a:2]:"));
    let (_, refused) = api.send(
        mallory.ip,
        "GET",
        "/api/v1/health",
        &[("X-Forwarded-For", "fd7a:115c:a1e0::a:2")],
        b"",
    );
    assert_eq!(refused.status, 403);
    let asked = fake.asked().len();
    assert!(
        api.try_send(server.ip, "GET", "/api/v1/health", &[], b"")
            .is_err(),
        "the server's own address"
    );
    assert_eq!(fake.asked().len(), asked);
}
