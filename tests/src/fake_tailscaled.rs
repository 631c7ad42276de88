//! A loopback fake of tailscaled's LocalAPI on a unix socket: `GET
//! /localapi/v0/whois?addr=IP:PORT` answered from a table of peers (by IP), with an error
//! status for a peer marked so, and every question recorded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// What the fake says of one peer.
#[derive(Debug, Clone)]
pub enum Known {
    /// A user's device.
    User(String),
    /// A tagged device.
    Tagged(Vec<String>),
    /// tailscaled answers with this status.
    Error(u16),
    /// tailscaled answers 200 with this body.
    Raw(String),
}

/// A running fake tailscaled.
#[derive(Debug)]
pub struct FakeTailscaled {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    asked: Arc<Mutex<Vec<String>>>,
    peers: Arc<Mutex<HashMap<String, Known>>>,
}

impl FakeTailscaled {
    pub async fn start(peers: HashMap<String, Known>) -> FakeTailscaled {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("tailscaled.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let asked = Arc::new(Mutex::new(Vec::new()));
        let peers = Arc::new(Mutex::new(peers));
        let (table, log) = (peers.clone(), asked.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (peers, log) = (table.clone(), log.clone());
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (peers, log) = (peers.clone(), log.clone());
                            let peers = peers.lock().expect("peers").clone();
                            async move { Ok::<_, Infallible>(answer(&peers, &log, &req)) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeTailscaled {
            socket,
            _dir: dir,
            asked,
            peers,
        }
    }

    /// From now on, says `known` of `ip`.
    pub fn set(&self, ip: &str, known: Known) {
        self.peers
            .lock()
            .expect("peers")
            .insert(ip.to_owned(), known);
    }

    /// Every `addr` asked about.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("asked").clone()
    }
}

fn answer(
    peers: &HashMap<String, Known>,
    log: &Mutex<Vec<String>>,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    let addr = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("addr="))
        .map(str::to_owned);
    if req.uri().path() != "/localapi/v0/whois" {
        return reply(StatusCode::NOT_FOUND, "not found".into());
    }
    let Some(addr) = addr else {
        return reply(StatusCode::BAD_REQUEST, "missing 'addr' parameter".into());
    };
    log.lock().expect("log").push(addr.clone());
    let ip = addr.rsplit_once(':').map_or(addr.as_str(), |(ip, _)| ip);
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let body: Value = match peers.get(ip) {
        None => return reply(StatusCode::NOT_FOUND, "no match for IP:port".into()),
        Some(Known::Error(s)) => {
            return reply(
                StatusCode::from_u16(*s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "error".into(),
            );
        }
        Some(Known::Raw(b)) => return reply(StatusCode::OK, b.clone()),
        Some(Known::User(login)) => json!({
            "Node": { "ID": 1, "Name": "laptop.tail.ts.net.", "Tags": null },
            "UserProfile": { "ID": 2, "LoginName": login, "DisplayName": "U" },
            "CapMap": {} }),
        Some(Known::Tagged(tags)) => json!({
            "Node": { "ID": 3, "Name": "server.tail.ts.net.", "Tags": tags },
            "UserProfile": { "ID": 4, "LoginName": "tagged-devices", "DisplayName": "Tagged Devices" } }),
    };
    reply(StatusCode::OK, body.to_string())
}
