//! Who may use the admin API: a tailnet address that tailscaled's LocalAPI (a loopback
//! fake on a unix socket) names as a configured operator — anything else is refused.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;

use control_plane::operator::Identity;
use control_plane::tailnet::{Refusal, Whois, authorize};
use tests::fake_tailscaled::{FakeTailscaled, Known};

/// The server's own address in these checks.
const OWN: &str = "100.101.1.100";

#[tokio::test]
async fn only_operators_on_the_tailnet_pass_and_any_error_refuses() {
    let peers: HashMap<String, Known> = [
        ("100.101.1.1", Known::User("alice@example.com".into())),
        ("100.101.1.2", Known::User("mallory@example.com".into())),
        ("100.101.1.3", Known::Tagged(vec!["tag:ci".into()])),
        ("100.101.1.4", Known::Tagged(vec!["tag:admin".into()])),
        ("100.101.1.5", Known::Error(500)),
        ("100.101.1.6", Known::Raw("<html>not json</html>".into())),
        ("fd7a:115c:a1e0::7", Known::User("alice@example.com".into())),
        (OWN, Known::User("alice@example.com".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let fake = FakeTailscaled::start(peers).await;
    let whois = Whois {
        socket: fake.socket.clone(),
    };
    let ops = vec!["alice@example.com".to_owned(), "tag:admin".to_owned()];
    let check = |addr: &str| {
        let whois = whois.clone();
        let ops = ops.clone();
        let addr = addr.parse().unwrap();
        async move { authorize(addr, OWN.parse().unwrap(), &whois, &ops).await }
    };
    assert_eq!(
        check("100.101.1.1:41000").await,
        Ok(Identity::Tailnet("alice@example.com".into()))
    );
    assert_eq!(
        check("[fd7a:115c:a1e0::7]:41000").await,
        Ok(Identity::Tailnet("alice@example.com".into()))
    );
    assert_eq!(
        check("100.101.1.4:41000").await,
        Ok(Identity::Tailnet("tag:admin".into()))
    );
    assert!(matches!(
        check("100.101.1.2:41000").await,
        Err(Refusal::NotOperator(_))
    ));
    assert!(matches!(
        check("100.101.1.3:41000").await,
        Err(Refusal::NotOperator(_))
    ));
    assert_eq!(check("100.101.1.5:41000").await, Err(Refusal::Status(500)));
    assert_eq!(check("100.101.1.6:41000").await, Err(Refusal::BadAnswer));
    assert_eq!(check("100.101.1.9:41000").await, Err(Refusal::Status(404)));
    // Outside the tailnet: refused without asking tailscaled.
    let asked_before = fake.asked().len();
    for outside in ["127.0.0.1:41000", "192.168.1.5:41000", "100.128.0.1:41000"] {
        assert!(
            matches!(check(outside).await, Err(Refusal::NotTailnet(_))),
            "{outside}"
        );
    }
    // This machine's own address (a local process): refused without asking either.
    assert!(matches!(
        check(&format!("{OWN}:41000")).await,
        Err(Refusal::ThisMachine(_))
    ));
    assert_eq!(fake.asked().len(), asked_before);
    assert!(fake.asked().contains(&"100.101.1.1:41000".to_owned()));
    // No tailscaled at all.
    let gone = Whois {
        socket: "/nonexistent/tailscaled.sock".into(),
    };
    let ops2 = ops.clone();
    assert!(matches!(
        authorize(
            "100.101.1.1:41000".parse().unwrap(),
            OWN.parse().unwrap(),
            &gone,
            &ops2
        )
        .await,
        Err(Refusal::Unreachable(_))
    ));
}
