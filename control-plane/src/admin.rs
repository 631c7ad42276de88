//! The local admin socket (`<state>/run/admin.sock`, mode 0600): the CLI's way to a
//! running `serve`. Each connection carries one JSON request line and gets one JSON
//! response line. The peer's uid, as the kernel reports it (`SO_PEERCRED`), must be one
//! of the configured `operators.unix_uids`; the request never names its sender.
//!
//! The console channel lives here too: `send` stores the text as a message of the
//! console chat named after its session, waits until the message is settled, and
//! returns every reply waiting for that chat, acknowledged once the answer is written.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use queue_proto::ids::SessionId;
use queue_proto::items::MAX_TEXT_BYTES;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::error_chain as chain;
use crate::gateway::{self, Identity};
use crate::service::Service;
use crate::state::now_secs;
use crate::store::{
    Accepted, ChangeDetail, ChangeSummary, Decided, Decision, Inbound, SessionSummary, TurnRow,
};

/// Session name prefixes the other channels own.
const TELEGRAM_PREFIX: &str = "tg-";
const BRIDGE_PREFIX: &str = "br-";

/// The console channel's name in the store.
pub const CONSOLE: &str = "console";

/// The largest request line read.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest `send` may wait for a reply.
pub const MAX_WAIT_SECS: u64 = 3600;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Send {
        session: String,
        text: String,
        wait_secs: u64,
    },
    SessionsList,
    SessionsDelete {
        name: String,
    },
    /// A session's last agent turns, with their risk.
    SessionsShow {
        name: String,
    },
    ChangesList {
        all: bool,
    },
    ChangesShow {
        id: String,
    },
    /// A whole new configuration text, proposed by the peer.
    ChangesPropose {
        text: String,
        reason: String,
    },
    /// Approve or reject as the peer. `hash` is the SHA-256 of the text the client
    /// showed its user; the request is decided only if it is still that text.
    ChangesDecide {
        id: String,
        approve: bool,
        hash: Option<String>,
    },
    /// The version in force, and how many sessions and pending change requests there are.
    Health,
    /// At most `limit` audit entries after sequence number `after`, oldest first.
    AuditPage {
        after: i64,
        limit: u32,
    },
}

/// The most audit entries one `AuditPage` returns.
pub const MAX_AUDIT_PAGE: u32 = 10_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The message's state when `send` stopped waiting, and the replies it collected.
    Replies {
        message: i64,
        state: String,
        replies: Vec<String>,
    },
    Sessions(Vec<SessionSummary>),
    Deleted(SessionSummary),
    Turns(Vec<TurnRow>),
    Changes(Vec<ChangeSummary>),
    Change {
        detail: Box<ChangeDetail>,
        diff: String,
    },
    Filed(ChangeSummary),
    /// `applied` (with the new version), `rejected`, or `refused` (with why).
    Decided {
        outcome: String,
        version: Option<u64>,
        why: Option<String>,
    },
    Health {
        version: u64,
        sessions: u64,
        pending_changes: u64,
    },
    Audit(Vec<crate::audit::Entry>),
    Error(String),
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach the service at {path}; is `ironclaw serve` running with this state directory?"
    )]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the service failed")]
    Io(#[from] std::io::Error),
    #[error("the service sent an answer that could not be read")]
    BadAnswer,
}

/// Sends one request and reads the answer (the CLI side).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, AdminError> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| AdminError::Connect {
            path: path.to_owned(),
            source,
        })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(|_| AdminError::BadAnswer)?;
    line.push(b'\n');
    // A refused or oversized request may be answered before all of it is written:
    // read the answer anyway.
    let written = stream.write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(stream)
        .take(64 * 1024 * 1024)
        .read_line(&mut answer);
    match serde_json::from_str(&answer) {
        Ok(a) => Ok(a),
        Err(_) => {
            written?;
            read?;
            Err(AdminError::BadAnswer)
        }
    }
}

/// Binds the admin socket (replacing a stale one), owner-only.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Serves the admin socket until the task is aborted.
pub async fn serve(service: Arc<Service>, listener: tokio::net::UnixListener) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(service, stream).await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

async fn connection(service: Arc<Service>, stream: tokio::net::UnixStream) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    // The request is read (bounded, within a time limit) before anyone is refused, so
    // the client is never cut off mid-write and always gets the reason.
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST_BYTES as u64 + 1);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let mut delivered = None;
    let answer = if !service.config().operators.unix_uids.contains(&uid) {
        // Logged when recorded, so a local user knocking in a loop fills neither.
        if service.refuse_admin_peer(&format!("uid:{uid}"), serde_json::json!({ "uid": uid })) {
            tracing::warn!(uid, "admin socket: refused a peer that is not an operator");
        }
        Response::Error("this user is not an operator (operators.unix_uids)".into())
    } else {
        match read {
            Err(_) => Response::Error("no request in time".into()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => {
                Response::Error("the request is larger than 1 MiB".into())
            }
            Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let (answer, ack) = handle(&service, req, Identity::Unix(uid)).await;
                    delivered = ack;
                    answer
                }
                Err(e) => Response::Error(format!("malformed request: {e}")),
            },
        }
    };
    let mut bytes = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    // Console replies count as delivered once they are written to the client; the
    // chat's lock is held until then, so the next `send` cannot show them again.
    if let Some((chat, upto, _held)) = delivered {
        service
            .db(|s| s.acknowledge(CONSOLE, Some(&chat), upto))
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// Console replies to acknowledge once the answer is written: the chat, the last id,
/// and the chat's lock.
pub(crate) type Ack = Option<(String, i64, tokio::sync::OwnedMutexGuard<()>)>;

/// One lock per console chat, held from reading its waiting replies to acknowledging
/// them.
fn chat_lock(chat: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    let locks = LOCKS.get_or_init(Default::default);
    let mut map = locks.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(chat.to_owned()).or_default().clone()
}

/// Answers one request from `peer`, an operator identified by the caller. The answer's
/// console replies (of `Send`) are to be acknowledged once written.
pub(crate) async fn handle(
    service: &Arc<Service>,
    req: Request,
    peer: Identity,
) -> (Response, Ack) {
    let answer = match req {
        Request::Send {
            session,
            text,
            wait_secs,
        } => {
            return match console_send(service, &session, text, wait_secs.min(MAX_WAIT_SECS)).await {
                Ok(r) => r,
                Err(e) => (Response::Error(e), None),
            };
        }
        Request::SessionsList => match service.sessions() {
            Ok(s) => Response::Sessions(s),
            Err(e) => Response::Error(chain(&e)),
        },
        Request::SessionsDelete { name } => match SessionId::try_from(name.as_str()) {
            Err(_) => Response::Error(format!("{name:?} is not a valid session name")),
            Ok(id) => match service.delete_session(&id).await {
                Ok(s) => Response::Deleted(s),
                Err(e) => Response::Error(chain(&e)),
            },
        },
        Request::SessionsShow { name } => match SessionId::try_from(name.as_str()) {
            Err(_) => Response::Error(format!("{name:?} is not a valid session name")),
            Ok(id) => match service.db(|s| s.turns(&id, 50)) {
                Ok(t) => Response::Turns(t),
                Err(e) => Response::Error(chain(&e)),
            },
        },
        Request::ChangesList { all } => match service.db(|s| s.changes(all, 10_000)) {
            Ok(c) => Response::Changes(c),
            Err(e) => Response::Error(chain(&e)),
        },
        Request::ChangesShow { id } => match service.db(|s| s.change(&id)) {
            Ok(Some(detail)) => Response::Change {
                // A request denied before it could be built holds the raw value asked
                // for, not a configuration: shown as it is.
                diff: if detail.after.parse::<toml::Table>().is_ok() {
                    gateway::diff(&detail.before, &detail.after)
                } else {
                    format!(
                        "(not a configuration; the value asked for)\n{}\n",
                        detail.after
                    )
                },
                detail: Box::new(detail),
            },
            Ok(None) => Response::Error(format!("no change request {id:?}")),
            Err(e) => Response::Error(chain(&e)),
        },
        Request::ChangesPropose { text, reason } => match service.propose(&peer, &text, &reason) {
            Ok(filed) => Response::Filed(filed),
            Err(e) => Response::Error(e),
        },
        Request::ChangesDecide { id, approve, hash } => {
            let decision = if approve {
                Decision::Approve
            } else {
                Decision::Reject
            };
            match service.decide(&id, decision, &peer, hash.as_deref()).await {
                Ok(d) => decided(d),
                Err(e) => Response::Error(chain(&e)),
            }
        }
        Request::Health => {
            let counts = service.db(|s| Ok((s.summaries()?.len(), s.pending_changes()?)));
            match counts {
                Ok((sessions, pending_changes)) => Response::Health {
                    version: service.effective().version,
                    sessions: sessions as u64,
                    pending_changes,
                },
                Err(e) => Response::Error(chain(&e)),
            }
        }
        Request::AuditPage { after, limit } => {
            let limit = limit.min(MAX_AUDIT_PAGE);
            match service.db(|s| Ok(crate::audit::page(s.connection(), after, limit)?)) {
                Ok(entries) => Response::Audit(entries),
                Err(e) => Response::Error(chain(&e)),
            }
        }
    };
    (answer, None)
}

fn decided(d: Decided) -> Response {
    let (outcome, version, why) = match d {
        Decided::Applied(v) => ("applied", Some(v.version), None),
        Decided::Rejected => ("rejected", None, None),
        Decided::Refused(why) => ("refused", None, Some(why)),
    };
    Response::Decided {
        outcome: outcome.into(),
        version,
        why,
    }
}

async fn console_send(
    service: &Arc<Service>,
    session: &str,
    text: String,
    wait_secs: u64,
) -> Result<(Response, Ack), String> {
    let id = SessionId::try_from(session).map_err(|_| {
        format!("{session:?} is not a valid session name (a-z, 0-9, _ and -, at most 32)")
    })?;
    if [TELEGRAM_PREFIX, BRIDGE_PREFIX]
        .iter()
        .any(|p| id.as_str().starts_with(p))
    {
        return Err(format!(
            "{session:?}: names starting tg- or br- belong to the Telegram and bridge channels"
        ));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err("the message is longer than 64 KiB; nothing was sent".into());
    }
    if text.trim().is_empty() {
        return Err("the message is empty; nothing was sent".into());
    }
    let inbound = Inbound {
        channel: CONSOLE.into(),
        chat: id.as_str().into(),
        external_id: None,
        text,
        received_at: now_secs(),
    };
    let mut changes = service.watch_outbound();
    let message = match service.submit(&id, &inbound, None).await {
        Ok(Accepted::Stored(m) | Accepted::Refused(m)) => m,
        Ok(Accepted::Duplicate) => return Err("duplicate message".into()),
        Err(e) => return Err(e.to_string()),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let state = service
            .db(|s| s.message_state(message))
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| "dead".into());
        let settled = !matches!(state.as_str(), "received" | "published");
        if settled || tokio::time::Instant::now() >= deadline {
            // Every reply waiting for this chat, earlier ones included; acknowledged once
            // the answer reaches the client.
            let held = chat_lock(id.as_str()).lock_owned().await;
            let pending = service
                .db(|s| s.pending_for(CONSOLE, Some(id.as_str()), 0, 1000))
                .map_err(|e| e.to_string())?;
            let ack = pending
                .last()
                .map(|last| (id.as_str().to_owned(), last.id, held));
            let answer = Response::Replies {
                message,
                state,
                replies: pending.into_iter().map(|o| o.text).collect(),
            };
            return Ok((answer, ack));
        }
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
}
