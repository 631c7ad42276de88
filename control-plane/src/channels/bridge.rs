//! The bridge: an HTTP API through which other chat apps reach the assistant, bound to
//! loopback or a Tailscale address only, every request carrying the bearer token from
//! `token_file` (compared in constant time).
//!
//! ```text
//! POST /v1/messages   {"chat": "<a-z0-9_->", "text": "...", "id": "<optional client id>",
//!                      "files": [{"name": "...", "data": "<base64>"}]}   (files optional)
//!                     → 202 {"message": N, "state": "accepted" | "refused" | "duplicate"}
//! GET  /v1/replies?after=K[&wait=S]
//!                     acknowledges every reply up to K, then returns those after K
//!                     (long-polled up to S ≤ 60 seconds)
//!                     → 200 {"replies": [{"id", "chat", "kind", "in_reply_to", "text"}]}
//! ```
//! A file is judged by its bytes like every channel's, within `[attachments]`; one that
//! is refused gets its notice in the replies. Errors are `{"error": "..."}` with 400,
//! 401, 404, 405, 413 or 503. A chat `c` is the
//! session `br-c`. A 401 closes its connection; one peer address holds at most
//! [`MAX_CONNECTIONS_PER_PEER`] connections, each for at most [`CONNECTION_LIFETIME`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use queue_proto::items::MAX_TEXT_BYTES;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;

use super::{ChannelError, naming};
use crate::config::BridgeConfig;
use crate::model::http::ApiKey;
use crate::service::{Arrival, Service};
use crate::state::now_secs;
use crate::store::attachments::IncomingFile;
use crate::store::messages::{Accepted, Inbound};

/// The channel's name in the store.
pub const CHANNEL: &str = "bridge";
/// The largest request body read without files (JSON escaping can make 64 KiB of
/// text longer).
pub const MAX_BODY_BYTES: usize = 512 * 1024;
/// Request bodies larger than [`MAX_BODY_BYTES`] (files) read at once, bridge-wide: a
/// client cannot hold many large bodies in memory.
pub const MAX_LARGE_BODIES: usize = 2;
/// Connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one peer address may hold at once: a client without the token cannot
/// take them all.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// The longest a connection is kept (a long poll waits at most [`MAX_WAIT_SECS`]).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// The longest long-poll.
pub const MAX_WAIT_SECS: u64 = 60;
/// Replies returned by one poll, at most.
const MAX_REPLIES: usize = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    chat: String,
    text: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    files: Vec<PostFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostFile {
    name: String,
    /// The file's bytes, base64.
    data: String,
}

/// The largest body a message with files may have: its files at the configured limit,
/// base64, and its text.
fn max_body(service: &Service) -> usize {
    let a = service.config().attachments.clone();
    let files = (a.max_bytes as usize).div_ceil(3) * 4 * usize::from(a.max_per_message);
    files.min(64 * 1024 * 1024) + MAX_BODY_BYTES
}

/// Permits to read a large body.
static LARGE_BODIES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LARGE_BODIES);

/// Binds the listener and serves it in a task.
pub fn start(service: Arc<Service>, cfg: &BridgeConfig) -> Result<JoinHandle<()>, ChannelError> {
    let token = ApiKey::from_file(&cfg.token_file).map_err(|source| ChannelError::Token {
        channel: CHANNEL,
        path: cfg.token_file.clone(),
        source,
    })?;
    let listen = |source| ChannelError::Listen {
        addr: cfg.listen,
        source,
    };
    let std_listener = std::net::TcpListener::bind(cfg.listen).map_err(listen)?;
    std_listener.set_nonblocking(true).map_err(listen)?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(listen)?;
    tracing::info!(addr = %cfg.listen, "bridge listening");
    let checker = tokio::spawn(check_files(service.clone()));
    Ok(tokio::spawn(async move {
        serve(service, listener, Arc::new(token)).await;
        checker.abort();
    }))
}

/// Judges the files that came with bridge messages (they arrive with their bytes).
async fn check_files(service: Arc<Service>) {
    let s = service.clone();
    service
        .take_files(CHANNEL, move |p| {
            let fetched = match p.data {
                Some(data) => crate::files::check(data, &s.config()),
                None => crate::files::too_large(0),
            };
            std::future::ready((p.id, fetched))
        })
        .await;
}

async fn serve(service: Arc<Service>, listener: tokio::net::TcpListener, token: Arc<ApiKey>) {
    let limits = crate::http::Limits {
        connections: MAX_CONNECTIONS,
        per_peer: MAX_CONNECTIONS_PER_PEER,
        lifetime: Some(CONNECTION_LIFETIME),
    };
    crate::http::serve(
        listener,
        limits,
        |_| true,
        move |_, req| {
            let (service, token) = (service.clone(), token.clone());
            async move { respond(&service, &token, req).await }
        },
    )
    .await;
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply(status, &json!({ "error": message }))
}

fn authorised(req: &Request<Incoming>, token: &ApiKey) -> bool {
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    given.ct_eq(token.expose().as_bytes()).into()
}

async fn respond(
    service: &Arc<Service>,
    token: &ApiKey,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if !authorised(&req, token) {
        // A client without the token keeps no connection open.
        let mut refused = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        refused
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return refused;
    }
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/messages") => post_message(service, req).await,
        (&Method::GET, "/v1/replies") => get_replies(service, &req).await,
        (_, "/v1/messages" | "/v1/replies") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

async fn post_message(service: &Arc<Service>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the message is longer than 64 KiB of text",
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    let limit = max_body(service);
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    // A body that may be large (declared so, or of unknown length) waits its turn.
    let _permit = if declared.is_none_or(|n| n > MAX_BODY_BYTES as u64) {
        match tokio::time::timeout(Duration::from_secs(30), LARGE_BODIES.acquire()).await {
            Ok(Ok(p)) => Some(p),
            _ => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy with other files; send it again",
                );
            }
        }
    } else {
        None
    };
    let body = Limited::new(req.into_body(), limit);
    let bytes = match tokio::time::timeout(Duration::from_secs(10), body.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(_)) => return too_large(),
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "the body did not arrive in time",
            );
        }
    };
    let msg: PostMessage = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("malformed message: {e}")),
    };
    let Some(session) = naming::bridge(&msg.chat) else {
        return error(
            StatusCode::BAD_REQUEST,
            "chat must be 1-29 of a-z, 0-9, _ and -",
        );
    };
    if msg.text.len() > MAX_TEXT_BYTES {
        return too_large();
    }
    if msg.text.trim().is_empty() && msg.files.is_empty() {
        return error(StatusCode::BAD_REQUEST, "the message is empty");
    }
    let attachments = service.config().attachments.clone();
    if msg.files.len() > usize::from(attachments.max_per_message) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            crate::files::notice::TOO_MANY_FILES,
        );
    }
    // A client that has used its chat's day of files is turned away before its bytes
    // are kept.
    if !msg.files.is_empty() {
        let used = service.files_used_today(&session);
        let budget = crate::store::usage::FILES;
        if used.is_none_or(|(n, _)| n as i64 >= budget.count) {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                crate::files::notice::FILES_OVER_BUDGET,
            );
        }
    }
    let mut files = Vec::new();
    for f in msg.files {
        use base64::Engine;
        let Ok(data) = base64::engine::general_purpose::STANDARD.decode(f.data.as_bytes()) else {
            return error(StatusCode::BAD_REQUEST, "a file's data is not base64");
        };
        files.push(IncomingFile {
            source: "inline".into(),
            name: f.name.chars().take(128).collect(),
            declared_bytes: Some(data.len() as u64),
            data: Some(data),
        });
    }
    if msg
        .id
        .as_ref()
        .is_some_and(|id| id.is_empty() || id.len() > 64)
    {
        return error(StatusCode::BAD_REQUEST, "id must be 1-64 characters");
    }
    let inbound = Inbound {
        channel: CHANNEL.into(),
        chat: msg.chat.clone(),
        external_id: msg.id.map(|id| format!("{}/{id}", msg.chat)),
        text: msg.text,
        received_at: now_secs(),
        files,
    };
    // A bridge client names its chats: at most max_chats sessions (and so sandboxes)
    // come from it.
    let max_sessions = service
        .config()
        .channels
        .bridge
        .as_ref()
        .map(|b| b.max_chats);
    let arrival = Arrival::Message {
        max_sessions,
        session: &session,
        inbound: &inbound,
    };
    match service.receive(arrival, None).await {
        Ok(Accepted::Stored(id)) => reply(
            StatusCode::ACCEPTED,
            &json!({ "message": id, "state": "accepted" }),
        ),
        Ok(Accepted::Refused(id)) => reply(
            StatusCode::ACCEPTED,
            &json!({ "message": id, "state": "refused" }),
        ),
        Ok(Accepted::Duplicate | Accepted::Counted) => {
            reply(StatusCode::ACCEPTED, &json!({ "state": "duplicate" }))
        }
        Err(crate::service::ServiceError::TooManyChats) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "no new chat: the bridge has as many as bridge.max_chats allows",
        ),
        Err(e) => {
            tracing::error!(error = %e, "storing a bridge message failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the message could not be stored; send it again",
            )
        }
    }
}

fn query_number(query: &str, name: &str) -> Result<Option<u64>, ()> {
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or(())?;
        if k == name {
            return v.parse().map(Some).map_err(|_| ());
        }
        if k != "after" && k != "wait" {
            return Err(());
        }
    }
    Ok(None)
}

async fn get_replies(service: &Arc<Service>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    let (Ok(after), Ok(wait)) = (query_number(query, "after"), query_number(query, "wait")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the query takes after=N and wait=S only",
        );
    };
    let after = i64::try_from(after.unwrap_or(0)).unwrap_or(i64::MAX);
    let wait = Duration::from_secs(wait.unwrap_or(0).min(MAX_WAIT_SECS));
    if after > 0
        && let Err(e) = service.acknowledge_replies(CHANNEL, None, after)
    {
        tracing::error!(error = %e, "acknowledging bridge replies failed");
        return error(StatusCode::SERVICE_UNAVAILABLE, "try again");
    }
    let mut changes = service.watch_outbound();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let pending = match service.pending_replies(CHANNEL, None, after, MAX_REPLIES) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "reading bridge replies failed");
                return error(StatusCode::SERVICE_UNAVAILABLE, "try again");
            }
        };
        if !pending.is_empty() || tokio::time::Instant::now() >= deadline {
            let replies: Vec<Value> = pending
                .into_iter()
                .map(|o| {
                    json!({ "id": o.id, "chat": o.chat, "kind": o.kind,
                                 "in_reply_to": o.message_id, "text": o.text })
                })
                .collect();
            return reply(StatusCode::OK, &json!({ "replies": replies }));
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replies_query_is_closed() {
        assert_eq!(query_number("after=5&wait=2", "after"), Ok(Some(5)));
        assert_eq!(query_number("wait=2", "after"), Ok(None));
        assert!(query_number("after=-1", "after").is_err());
        assert!(query_number("session=x", "after").is_err());
    }
}
