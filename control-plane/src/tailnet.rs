//! Who is on the other end of a Tailscale connection. A peer is an operator only if its
//! address is inside the tailnet's ranges (100.64.0.0/10, fd7a:115c:a1e0::/48) and
//! tailscaled's LocalAPI, asked over its unix socket (`GET /localapi/v0/whois?addr=`),
//! names a configured operator: the login name of the device's user, or, for a tagged
//! device (which has no user), one of its tags (`tag:…`). Only the TCP peer address is
//! used, never a header a client sent; any error is a refusal. A connection from this
//! machine's own Tailscale address is refused before whois is asked: it comes from a
//! local process, and whois would name the machine's own owner.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

use crate::operator::Identity;

/// tailscaled's LocalAPI socket on Debian.
pub const DEFAULT_SOCKET: &str = "/run/tailscale/tailscaled.sock";

/// The largest whois answer read.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// How long tailscaled has to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not a tailnet address")]
    NotTailnet(IpAddr),
    #[error("{0} is this machine's own address: a local process, not a tailnet device")]
    ThisMachine(IpAddr),
    #[error("tailscaled could not be asked: {0}")]
    Unreachable(String),
    #[error("tailscaled answered {0}")]
    Status(u16),
    #[error("tailscaled's answer could not be read")]
    BadAnswer,
    #[error("{0} is not an operator")]
    NotOperator(String),
}

/// Inside Tailscale's ranges: 100.64.0.0/10 or fd7a:115c:a1e0::/48 (loopback is not).
pub fn in_tailnet(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            o[0] == 100 && (o[1] & 0xc0) == 64
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => in_tailnet(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
            }
        },
    }
}

/// What whois says of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub login: Option<String>,
    pub tags: Vec<String>,
}

/// The client of tailscaled's LocalAPI.
#[derive(Debug, Clone)]
pub struct Whois {
    pub socket: PathBuf,
}

impl Whois {
    /// Asks tailscaled who `peer` is.
    pub async fn ask(&self, peer: SocketAddr) -> Result<Peer, Refusal> {
        let ask = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| Refusal::Unreachable(e.to_string()))?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| Refusal::Unreachable(e.to_string()))?;
            tokio::spawn(conn);
            let req = hyper::Request::get(format!("/localapi/v0/whois?addr={peer}"))
                .header("host", "local-tailscaled.sock")
                .body(Empty::<bytes::Bytes>::new())
                .map_err(|_| Refusal::BadAnswer)?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| Refusal::Unreachable(e.to_string()))?;
            if resp.status() != hyper::StatusCode::OK {
                return Err(Refusal::Status(resp.status().as_u16()));
            }
            let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|_| Refusal::BadAnswer)?
                .to_bytes();
            parse(&body)
        };
        tokio::time::timeout(TIMEOUT, ask)
            .await
            .map_err(|_| Refusal::Unreachable("no answer in time".into()))?
    }
}

/// Reads the two fields used from a whois answer.
fn parse(body: &[u8]) -> Result<Peer, Refusal> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| Refusal::BadAnswer)?;
    let tags = match v.pointer("/Node/Tags") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_owned).ok_or(Refusal::BadAnswer))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Refusal::BadAnswer),
    };
    let login = v
        .pointer("/UserProfile/LoginName")
        .and_then(|l| l.as_str())
        .filter(|l| !l.is_empty())
        .map(str::to_owned);
    if !v.get("Node").is_some_and(serde_json::Value::is_object) {
        return Err(Refusal::BadAnswer);
    }
    Ok(Peer { login, tags })
}

/// The operator `peer` is, if any: a tagged device by one of its tags, any other by its
/// user's login name.
pub fn operator(peer: &Peer, operators: &[String]) -> Result<Identity, Refusal> {
    if !peer.tags.is_empty() {
        return peer
            .tags
            .iter()
            .find(|t| operators.contains(t))
            .map(|t| Identity::Tailnet(t.clone()))
            .ok_or_else(|| {
                Refusal::NotOperator(format!("a device tagged {}", peer.tags.join(",")))
            });
    }
    match &peer.login {
        Some(l) if operators.contains(l) => Ok(Identity::Tailnet(l.clone())),
        Some(l) => Err(Refusal::NotOperator(l.clone())),
        None => Err(Refusal::NotOperator("a device without a user".into())),
    }
}

/// Whether a connection from `ip` may be looked at at all: inside the tailnet's ranges,
/// and not from `own`, this machine's Tailscale address.
pub fn reachable(ip: IpAddr, own: IpAddr) -> Result<(), Refusal> {
    let ip = ip.to_canonical();
    if !in_tailnet(ip) {
        return Err(Refusal::NotTailnet(ip));
    }
    if ip == own.to_canonical() {
        return Err(Refusal::ThisMachine(ip));
    }
    Ok(())
}

/// The whole check for one request from `peer` to a server on `own`.
pub async fn authorize(
    peer: SocketAddr,
    own: IpAddr,
    whois: &Whois,
    operators: &[String],
) -> Result<Identity, Refusal> {
    reachable(peer.ip(), own)?;
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let who = whois.ask(peer).await?;
    operator(&who, operators)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tailnet_ranges_only() {
        for ok in [
            "100.64.0.1",
            "100.127.255.254",
            "fd7a:115c:a1e0::1",
            "::ffff:100.100.1.2",
        ] {
            assert!(in_tailnet(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "::1",
            "100.128.0.1",
            "100.63.255.255",
            "10.0.0.1",
            "fd7a:115c:a1e1::1",
        ] {
            assert!(!in_tailnet(bad.parse().unwrap()), "{bad}");
        }
    }

    #[test]
    fn this_machine_and_addresses_outside_the_ranges_are_not_asked_about() {
        let own: IpAddr = "100.101.1.1".parse().unwrap();
        assert_eq!(reachable("100.101.1.2".parse().unwrap(), own), Ok(()));
        assert_eq!(
            reachable("::ffff:100.101.1.2".parse().unwrap(), own),
            Ok(())
        );
        for me in ["100.101.1.1", "::ffff:100.101.1.1"] {
            assert!(matches!(
                reachable(me.parse().unwrap(), own),
                Err(Refusal::ThisMachine(_))
            ));
        }
        assert!(matches!(
            reachable("127.0.0.1".parse().unwrap(), own),
            Err(Refusal::NotTailnet(_))
        ));
    }

    #[test]
    fn tags_decide_for_tagged_devices_and_logins_for_the_rest() {
        let ops = vec!["alice@example.com".to_owned(), "tag:admin".to_owned()];
        let user =
            parse(br#"{"Node":{"Tags":null},"UserProfile":{"LoginName":"alice@example.com"}}"#)
                .unwrap();
        assert_eq!(
            operator(&user, &ops),
            Ok(Identity::Tailnet("alice@example.com".into()))
        );
        let mallory =
            parse(br#"{"Node":{},"UserProfile":{"LoginName":"mallory@example.com"}}"#).unwrap();
        assert!(operator(&mallory, &ops).is_err());
        // A tagged device's user profile is the shared "tagged-devices" one: tags decide.
        let tagged = parse(
            br#"{"Node":{"Tags":["tag:server"]},"UserProfile":{"LoginName":"alice@example.com"}}"#,
        )
        .unwrap();
        assert!(operator(&tagged, &ops).is_err());
        let admin = parse(
            br#"{"Node":{"Tags":["tag:admin"]},"UserProfile":{"LoginName":"tagged-devices"}}"#,
        )
        .unwrap();
        assert_eq!(
            operator(&admin, &ops),
            Ok(Identity::Tailnet("tag:admin".into()))
        );
        for bad in [
            &b"not json"[..],
            b"{}",
            br#"{"Node":{"Tags":"tag:admin"}}"#,
            br#"{"Node":{"Tags":[1]}}"#,
            br#"{"Node":null,"UserProfile":{"LoginName":"alice@example.com"}}"#,
        ] {
            assert_eq!(parse(bad), Err(Refusal::BadAnswer));
        }
    }
}
