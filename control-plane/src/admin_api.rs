//! The admin HTTP API and its approval page, for operators on the tailnet. It listens on
//! this machine's Tailscale address only, and every request must pass [`tailnet::authorize`]
//! on the TCP peer's address (never a header the client sent: `X-Forwarded-For`,
//! `Forwarded` and the like are not read) before anything else is looked at.
//!
//! ```text
//! GET    /                                the approval page (with /page.js and /page.css)
//! GET    /api/v1/health                   → {"version", "sessions", "pending_changes", "you"}
//! GET    /api/v1/sessions                 → [session]
//! GET    /api/v1/sessions/NAME            → [turn] (its last agent turns, with risk)
//! DELETE /api/v1/sessions/NAME            → the deleted session
//! GET    /api/v1/changes[?all=1]          → [change] (pending ones, or all)
//! GET    /api/v1/changes/ID               → {"detail", "diff"}
//! POST   /api/v1/changes                  {"text", "reason"} → 201 the filed request
//! POST   /api/v1/changes/ID/approve       {"hash"} → {"outcome", "version", "why"}
//! POST   /api/v1/changes/ID/reject        {} or {"hash"} → {"outcome", "version", "why"}
//! GET    /api/v1/audit[?after=SEQ&limit=N] → [entry] (oldest first, N ≤ 10000)
//! ```
//! An approval carries the SHA-256 (64 hex digits) of the text its client showed; the
//! request is applied only if it is still that text. A refused decision answers 409;
//! errors are `{"error": "..."}` with 400, 403, 404, 405, 408, 413, 415 or 421.
//!
//! A connection from outside the tailnet's ranges, or from this machine's own address (a
//! local process), is closed at once, unanswered. At most 64 connections are served, 8
//! from one address, each for at most two minutes.
//!
//! Browsers are kept from acting for an operator: a request must name this API's own
//! host (so a page cannot point a name of its own at this address), a request that
//! changes anything must come from this API's own origin when it says where it comes
//! from (and a POST must carry JSON, which no form can send), and every answer forbids
//! framing, caching and other origins.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue, ORIGIN};
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::admin::{self, MAX_REQUEST_BYTES, Outcome, Request, Response};
use crate::config::AdminApiConfig;
use crate::operator::Identity;
use crate::service::Service;
use crate::tailnet::{self, Whois};

/// Connections served at once: in all, from one address, and for how long each.
const LIMITS: crate::http::Limits = crate::http::Limits {
    connections: 64,
    per_peer: 8,
    lifetime: Some(Duration::from_secs(120)),
};

/// How long a client has to send a request's body.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How often binding the address is tried again while it is not there (tailscaled not
/// up yet).
const BIND_RETRY: Duration = Duration::from_secs(5);

const PAGE_HTML: &str = include_str!("admin_page/index.html");
const PAGE_JS: &str = include_str!("admin_page/page.js");
const PAGE_CSS: &str = include_str!("admin_page/page.css");

/// Sent with every answer: nothing cached, framed, sniffed or loaded from elsewhere.
const SECURITY_HEADERS: [(&str, &str); 7] = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
];

type Answer = hyper::Response<Full<Bytes>>;

/// What every connection shares.
struct Api {
    service: Arc<Service>,
    /// This machine's Tailscale address, the one listened on.
    own: IpAddr,
    whois: Whois,
    /// `Host` values this API answers to.
    hosts: HashSet<String>,
}

/// Binds `cfg.listen` (waiting for the address to appear, as it does once tailscaled is
/// up) and serves the API in a task.
pub fn start(service: Arc<Service>, cfg: &AdminApiConfig) -> JoinHandle<()> {
    let api = Arc::new(Api {
        service,
        own: cfg.listen.ip(),
        whois: Whois {
            socket: cfg.tailscaled_socket.clone(),
        },
        hosts: hosts(cfg),
    });
    let addr = cfg.listen;
    tokio::spawn(async move {
        let mut last_error = None;
        let listener = loop {
            match bind(addr) {
                Ok(l) => break l,
                Err(e) => {
                    // Said once per kind of failure, not every few seconds for hours.
                    if last_error != Some(e.kind()) {
                        tracing::warn!(%addr, error = %e, "the admin API cannot listen yet; trying again every 5 s");
                        last_error = Some(e.kind());
                    }
                    tokio::time::sleep(BIND_RETRY).await;
                }
            }
        };
        tracing::info!(%addr, "admin API listening");
        let gate = api.clone();
        let admit = move |peer: SocketAddr| match tailnet::reachable(peer.ip(), gate.own) {
            Ok(()) => true,
            Err(why) => {
                // Counted under one name per kind, however many addresses they use.
                let key = match why {
                    tailnet::Refusal::ThisMachine(_) => "this-machine",
                    _ => "outside-tailnet",
                };
                refused(&gate.service, key, peer, &why);
                false
            }
        };
        crate::http::serve(listener, LIMITS, admit, move |peer, req| {
            let api = api.clone();
            async move { respond(&api, peer, req).await }
        })
        .await;
    })
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std_listener)
}

/// The `Host` header values that name this API: its address and each configured name,
/// with the port (and without it too when the port is 80, as browsers then send).
fn hosts(cfg: &AdminApiConfig) -> HashSet<String> {
    let port = cfg.listen.port();
    let ip = match cfg.listen {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let mut out = HashSet::new();
    for name in std::iter::once(ip).chain(cfg.host_names.iter().map(|n| n.to_ascii_lowercase())) {
        if port == 80 {
            out.insert(name.clone());
        }
        out.insert(format!("{name}:{port}"));
    }
    out
}

fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut resp = hyper::Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    for (name, value) in SECURITY_HEADERS {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    resp
}

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    answer(status, "application/json", body.to_string())
}

fn error(status: StatusCode, message: &str) -> Answer {
    json_answer(status, &json!({ "error": message }))
}

/// One request: who is asking first, then whether a browser could be acting for them,
/// then what they ask.
async fn respond(api: &Api, peer: SocketAddr, req: hyper::Request<Incoming>) -> Answer {
    let config = api.service.config();
    let operators = &config.operators.tailnet;
    let who = match tailnet::authorize(peer, api.own, &api.whois, operators).await {
        Ok(who) => who,
        Err(why) => {
            refused(
                &api.service,
                &peer.ip().to_canonical().to_string(),
                peer,
                &why,
            );
            return closing(error(
                StatusCode::FORBIDDEN,
                "refused: this API is for the operators on the tailnet",
            ));
        }
    };
    if let Some(refused) = browser_check(api, &req) {
        return refused;
    }
    route(api, who, req).await
}

/// Records a refused peer (under `key`, so many a minute each), and logs it when it is
/// recorded.
fn refused(service: &Service, key: &str, peer: SocketAddr, why: &tailnet::Refusal) {
    let detail = json!({ "peer": peer.to_string(), "why": why.to_string() });
    if service.refuse_admin_peer(key, detail) {
        tracing::warn!(%peer, why = %why, "admin API: refused a peer");
    }
}

/// `answer`, and the connection closed after it.
fn closing(mut answer: Answer) -> Answer {
    answer
        .headers_mut()
        .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
    answer
}

/// Refuses a request a browser may be making for an operator without their knowing: one
/// naming another host (a name rebound to this address), or one that changes something
/// and comes from another origin or is not JSON (a form).
fn browser_check(api: &Api, req: &hyper::Request<Incoming>) -> Option<Answer> {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    let Some(host) = host.filter(|h| api.hosts.contains(h)) else {
        return Some(closing(error(
            StatusCode::MISDIRECTED_REQUEST,
            "this API answers only to its own address or admin_api.host_names",
        )));
    };
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    let own_origin = format!("http://{host}");
    if let Some(origin) = req.headers().get(ORIGIN)
        && origin.as_bytes() != own_origin.as_bytes()
    {
        return Some(error(
            StatusCode::FORBIDDEN,
            "refused: the request comes from another origin",
        ));
    }
    if let Some(site) = req.headers().get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Some(error(
            StatusCode::FORBIDDEN,
            "refused: the request comes from another site",
        ));
    }
    let json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if *req.method() == Method::POST && !json {
        return Some(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be application/json",
        ));
    }
    None
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Propose {
    text: String,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Decide {
    #[serde(default)]
    hash: Option<String>,
}

async fn route(api: &Api, who: Identity, req: hyper::Request<Incoming>) -> Answer {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    // Each path once, then its methods: any other method on a known path is a 405.
    let wrong_method = || error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    let page = |content_type: &'static str, body: &'static str| {
        if method == Method::GET {
            answer(StatusCode::OK, content_type, body)
        } else {
            wrong_method()
        }
    };
    let request = match parts.as_slice() {
        [""] => return page("text/html; charset=utf-8", PAGE_HTML),
        ["page.js"] => return page("text/javascript; charset=utf-8", PAGE_JS),
        ["page.css"] => return page("text/css; charset=utf-8", PAGE_CSS),
        ["api", "v1", "health"] => match method {
            Method::GET => Request::Health,
            _ => return wrong_method(),
        },
        ["api", "v1", "sessions"] => match method {
            Method::GET => Request::SessionsList,
            _ => return wrong_method(),
        },
        ["api", "v1", "sessions", name] => match method {
            Method::GET => Request::SessionsShow {
                name: (*name).to_owned(),
            },
            Method::DELETE => Request::SessionsDelete {
                name: (*name).to_owned(),
            },
            _ => return wrong_method(),
        },
        ["api", "v1", "changes"] => match method {
            Method::GET => match query_values(&query, &["all"]) {
                Ok(q) => Request::ChangesList {
                    all: q[0].is_some_and(|v| v != 0),
                },
                Err(e) => return e.answer(),
            },
            Method::POST => match body::<Propose>(req).await {
                Ok(p) => Request::ChangesPropose {
                    text: p.text,
                    reason: p.reason,
                },
                Err(e) => return e.answer(),
            },
            _ => return wrong_method(),
        },
        ["api", "v1", "changes", id] => match method {
            Method::GET => Request::ChangesShow {
                id: (*id).to_owned(),
            },
            _ => return wrong_method(),
        },
        ["api", "v1", "changes", id, verb @ ("approve" | "reject")] => {
            if method != Method::POST {
                return wrong_method();
            }
            let approve = *verb == "approve";
            match body::<Decide>(req).await {
                Ok(d) if approve && !d.hash.as_deref().is_some_and(full_sha256) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "an approval carries the SHA-256 of the text it showed, 64 hex digits: {\"hash\": \"...\"}",
                    );
                }
                Ok(d) => Request::ChangesDecide {
                    id: (*id).to_owned(),
                    approve,
                    hash: d.hash,
                    withdraw: false,
                },
                Err(e) => return e.answer(),
            }
        }
        ["api", "v1", "audit"] => match method {
            Method::GET => match query_values(&query, &["after", "limit"]) {
                Ok(q) => Request::AuditPage {
                    after: i64::try_from(q[0].unwrap_or(0)).unwrap_or(i64::MAX),
                    limit: q[1].map_or(1000, |l| u32::try_from(l).unwrap_or(u32::MAX)),
                },
                Err(e) => return e.answer(),
            },
            _ => return wrong_method(),
        },
        _ => return error(StatusCode::NOT_FOUND, "no such page or endpoint"),
    };
    let (response, _) = admin::handle(&api.service, request, who.clone()).await;
    translate(response, &who)
}

/// 64 lower-case hex digits.
fn full_sha256(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The admin socket's answer as HTTP: the value inside the answer's variant, with a
/// status that says how it went.
fn translate(response: Response, who: &Identity) -> Answer {
    let status = match &response {
        Response::Error(f) => {
            StatusCode::from_u16(f.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
        Response::Filed(_) => StatusCode::CREATED,
        Response::Decided {
            outcome: Outcome::Refused,
            ..
        } => StatusCode::CONFLICT,
        _ => StatusCode::OK,
    };
    let Ok(Value::Object(tagged)) = serde_json::to_value(&response) else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the answer could not be written",
        );
    };
    let mut inner = tagged.into_iter().next().map_or(Value::Null, |(_, v)| v);
    if let Response::Error(f) = &response {
        inner = json!({ "error": f.message, "kind": f.kind });
    }
    if let (Response::Health { .. }, Value::Object(o)) = (&response, &mut inner) {
        o.insert("you".into(), Value::String(who.to_string()));
    }
    json_answer(status, &inner)
}

/// A request that cannot be served: its status and why.
#[derive(Debug)]
struct Bad(StatusCode, String);

impl Bad {
    fn answer(&self) -> Answer {
        error(self.0, &self.1)
    }
}

/// Reads a JSON body of at most 1 MiB within the time limit.
async fn body<T: serde::de::DeserializeOwned>(req: hyper::Request<Incoming>) -> Result<T, Bad> {
    let limited = Limited::new(req.into_body(), MAX_REQUEST_BYTES);
    let bytes = match tokio::time::timeout(READ_TIMEOUT, limited.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) => {
            return Err(Bad(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the body is larger than 1 MiB".into(),
            ));
        }
        Err(_) => {
            return Err(Bad(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time".into(),
            ));
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| Bad(StatusCode::BAD_REQUEST, format!("malformed body: {e}")))
}

/// The numbers `names` in a query that may hold only those names.
fn query_values(query: &str, names: &[&str]) -> Result<Vec<Option<u64>>, Bad> {
    let bad = || {
        Bad(
            StatusCode::BAD_REQUEST,
            format!("the query takes only {} (numbers)", names.join(", ")),
        )
    };
    let mut out = vec![None; names.len()];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(bad)?;
        let i = names.iter().position(|n| *n == k).ok_or_else(bad)?;
        out[i] = Some(v.parse().map_err(|_| bad())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_the_address_and_the_configured_names_with_the_port() {
        let cfg = |listen: &str, names: &[&str]| AdminApiConfig {
            listen: listen.parse().unwrap(),
            host_names: names.iter().map(|n| (*n).to_owned()).collect(),
            tailscaled_socket: tailnet::DEFAULT_SOCKET.into(),
        };
        let h = hosts(&cfg("100.101.1.2:8790", &["Box.tail1.ts.net"]));
        let mut h: Vec<_> = h.into_iter().collect();
        h.sort();
        assert_eq!(h, ["100.101.1.2:8790", "box.tail1.ts.net:8790"]);
        let h = hosts(&cfg("[fd7a:115c:a1e0::5]:80", &[]));
        assert!(h.contains("[fd7a:115c:a1e0::5]:80") && h.contains("[fd7a:115c:a1e0::5]"));
    }

    #[test]
    fn queries_are_closed() {
        assert!(
            query_values("after=5&limit=2", &["after", "limit"])
                .is_ok_and(|v| v == [Some(5), Some(2)])
        );
        assert!(query_values("", &["all"]).is_ok_and(|v| v == [None]));
        assert!(query_values("all=yes", &["all"]).is_err());
        assert!(query_values("session=x", &["all"]).is_err());
        assert!(query_values("after", &["after"]).is_err());
    }
}
