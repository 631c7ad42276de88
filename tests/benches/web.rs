//! Web broker benchmark, in one run, inside a network namespace the benchmark makes
//! (only `lo`, holding 198.51.100.10; the benchmark runs itself there through
//! `nsenter --net`), against the tests' HTTPS site (Python's http.server behind ssl):
//! - the latency the broker adds: a page fetched 200 times by the broker (resolution
//!   and address checks, its kept client pinned to the checked address, the caps) next
//!   to 200 direct fetches of the same page by a plain client that trusts the same CA,
//!   both keeping their connection between fetches;
//! - the trusted-side link extractor's throughput on a 2 MiB page of links.
//!
//! Run: `cargo bench -p tests --bench web` (needs root, ip, nsenter, openssl, python3).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use control_plane::web::fetch::Reach;
use control_plane::web::links::links;
use tests::netns::{NetNs, inside};
use tests::web_site::{certificates, site};

const ROUNDS: usize = 200;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn main() {
    if !inside() {
        let ns = NetNs::new(
            &format!("icwb{}", std::process::id()),
            &["198.51.100.10/32"],
        );
        let exe = std::env::current_exe().expect("the bench binary");
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg(exe)
            .arg("--bench")
            .env(tests::netns::INSIDE, &ns.name)
            .output()
            .expect("run the bench inside its namespace");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success());
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    certificates(dir.path());
    let _site = site(dir.path(), "198.51.100.10", "site");
    let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca");
    let mut reach = Reach::default();
    reach
        .test_hosts
        .insert("site.test".into(), "198.51.100.10".parse().expect("ip"));
    reach.extra_ca = Some(ca.clone());
    let url = url::Url::parse("https://site.test/page").expect("url");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let direct = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca"))
        .resolve(
            "site.test",
            SocketAddr::new("198.51.100.10".parse().expect("ip"), 443),
        )
        .build()
        .expect("client");
    let (mut brokered, mut plain) = (Vec::new(), Vec::new());
    rt.block_on(async {
        for _ in 0..10 {
            reach.fetch(&url, |_, _| Ok(())).await.expect("warm-up");
        }
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let page = reach
                .fetch(&url, |_, _| Ok(()))
                .await
                .expect("brokered fetch");
            brokered.push(t.elapsed());
            assert!(!page.body.is_empty());
            // Both keep their connection to the site between fetches.
            let t = Instant::now();
            let body = direct
                .get(url.clone())
                .send()
                .await
                .expect("direct fetch")
                .bytes()
                .await
                .expect("direct body");
            plain.push(t.elapsed());
            assert_eq!(body.len(), page.body.len());
        }
    });
    // 2 MiB: 400 links (under the cap of 500, so the whole page is read) among text.
    let filler = "The harvest festival programme, with words between the links. ".repeat(80);
    let big: String = (0..400)
        .map(|i| format!("<p>{filler} <a href=\"/article/{i}?ref=list\">read</a></p>\n"))
        .collect();
    let base = url::Url::parse("https://site.test/list").expect("url");
    let t = Instant::now();
    let mut found = 0;
    for _ in 0..20 {
        found = links(big.as_bytes(), &base).len();
    }
    let per = t.elapsed() / 20;
    let (b, p) = (median(brokered), median(plain));
    println!(
        "web broker benchmark (network namespace, HTTPS to 198.51.100.10, {ROUNDS} fetches each, medians):"
    );
    println!("  direct fetch (plain client):                  {p:8.2} ms");
    println!("  brokered fetch (resolve, check, pin, caps):  {b:8.2} ms");
    println!(
        "  added by the broker:                          {:8.2} ms",
        b - p
    );
    println!(
        "  link extractor: {:.1} MiB page, {found} links, {:.1} ms, {:.0} MiB/s",
        big.len() as f64 / 1048576.0,
        per.as_secs_f64() * 1000.0,
        big.len() as f64 / 1048576.0 / per.as_secs_f64()
    );
}
