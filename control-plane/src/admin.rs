//! The local admin socket (`<state>/run/admin.sock`, mode 0600): the CLI's way to a
//! running `serve`. Each connection carries one JSON request line and gets one JSON
//! response line. The peer's uid, as the kernel reports it (`SO_PEERCRED`), must be one
//! of the configured `operators.unix_uids`; the request never names its sender.
//!
//! `send` is the console channel's (see [`crate::channels::console`]); the admin socket
//! only carries it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use queue_proto::ids::SessionId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::channels::console::{self, Ack};
use crate::error_chain as chain;
use crate::gateway;
use crate::operator::Identity;
use crate::service::{Service, ServiceError};
use crate::store::changes::{ChangeDetail, ChangeSummary, Decided, Decision, TurnRow};
use crate::store::sessions::SessionSummary;
use crate::store::state::MessageState;

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
    /// A session's web: its last fetches and searches; turned off or on with `off`.
    SessionsWeb {
        name: String,
        off: Option<bool>,
    },
    /// Sets a session's time zone (`None`: back to `agent.timezone`).
    SessionsTimezone {
        name: String,
        zone: Option<String>,
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
        /// A rejection by the request's own requester only (`changes withdraw`).
        #[serde(default)]
        withdraw: bool,
    },
    /// The version in force, and how many sessions and pending change requests there are.
    Health,
    /// The service at a glance (`ironclaw status`).
    Status,
    /// The approved configuration in force (`ironclaw config show --approved`).
    ConfigShow,
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
        /// `None`: the message is gone (its session was deleted meanwhile).
        state: Option<MessageState>,
        replies: Vec<String>,
    },
    Sessions(Vec<SessionSummary>),
    /// Whether a session's web is on, and its last fetches and searches.
    Web {
        on: bool,
        records: Vec<crate::store::web::WebRecord>,
    },
    /// The time zone now in force for a session.
    TimeZone {
        name: String,
        zone: String,
    },
    Deleted(SessionSummary),
    Turns(Vec<TurnRow>),
    Changes(Vec<ChangeSummary>),
    Change {
        detail: Box<ChangeDetail>,
        diff: String,
    },
    Filed(ChangeSummary),
    /// Applied (with the new version), rejected, or refused (with why).
    Decided {
        outcome: Outcome,
        version: Option<u64>,
        why: Option<String>,
    },
    Health {
        version: u64,
        sessions: u64,
        pending_changes: u64,
    },
    Audit(Vec<crate::audit::Entry>),
    Status(Box<crate::service::Status>),
    Config {
        version: u64,
        text: String,
    },
    Error(Failure),
}

/// How a decision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    Rejected,
    /// Nothing changed; why is in the answer and the audit trail.
    Refused,
}

impl Outcome {
    /// The outcome's word, as the admin protocol spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Rejected => "rejected",
            Outcome::Refused => "refused",
        }
    }
}

/// What kind of failure a request met. The CLI's exit code and the admin API's HTTP
/// status are derived from it, never from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The request is malformed, too large, or asks for something invalid.
    BadRequest,
    /// No such session or change request.
    NotFound,
    /// The peer is not an operator.
    NotOperator,
    /// The service could not do it (its store failed, a session is busy).
    Unavailable,
}

impl FailureKind {
    /// The CLI's exit status for it (see the CLI's usage text).
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::BadRequest | FailureKind::Unavailable => 1,
            FailureKind::NotFound => 4,
            FailureKind::NotOperator => 5,
        }
    }

    /// The admin API's HTTP status for it.
    pub fn http_status(self) -> u16 {
        match self {
            FailureKind::BadRequest => 400,
            FailureKind::NotOperator => 403,
            FailureKind::NotFound => 404,
            FailureKind::Unavailable => 503,
        }
    }
}

/// A failed request: its kind, and words for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// A request that cannot be done as asked.
    pub fn bad(message: impl Into<String>) -> Failure {
        Failure::new(FailureKind::BadRequest, message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl From<&ServiceError> for Failure {
    fn from(e: &ServiceError) -> Failure {
        let kind = match e {
            ServiceError::NoSession(_) => FailureKind::NotFound,
            ServiceError::WrongChannel { .. } => FailureKind::BadRequest,
            _ => FailureKind::Unavailable,
        };
        Failure::new(kind, chain(e))
    }
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
    let mut delivered = Ack::none();
    let answer = if !service.config().operators.unix_uids.contains(&uid) {
        // Logged when recorded, so a local user knocking in a loop fills neither.
        if service.refuse_admin_peer(&format!("uid:{uid}"), serde_json::json!({ "uid": uid })) {
            tracing::warn!(uid, "admin socket: refused a peer that is not an operator");
        }
        Response::Error(Failure::new(
            FailureKind::NotOperator,
            "this user is not an operator (operators.unix_uids)",
        ))
    } else {
        match read {
            Err(_) => Response::Error(Failure::bad("no request in time")),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) if line.len() > MAX_REQUEST_BYTES => {
                Response::Error(Failure::bad("the request is larger than 1 MiB"))
            }
            Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    let (answer, ack) = handle(&service, req, Identity::Unix(uid)).await;
                    delivered = ack;
                    answer
                }
                Err(e) => Response::Error(Failure::bad(format!("malformed request: {e}"))),
            },
        }
    };
    let mut bytes = serde_json::to_vec(&answer).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    // Console replies count as delivered once they are written to the client; the
    // chat's lock is held until then, so the next `send` cannot show them again.
    console::acknowledge(&service, delivered).map_err(std::io::Error::other)
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
            return match console::send(service, &session, text, wait_secs.min(MAX_WAIT_SECS)).await
            {
                Ok(sent) => (
                    Response::Replies {
                        message: sent.message,
                        state: sent.state,
                        replies: sent.replies,
                    },
                    sent.ack,
                ),
                Err(e) => (Response::Error(Failure::bad(e)), Ack::none()),
            };
        }
        Request::SessionsList => match service.sessions() {
            Ok(s) => Response::Sessions(s),
            Err(e) => Response::Error(Failure::from(&e)),
        },
        Request::SessionsDelete { name } => match SessionId::try_from(name.as_str()) {
            Err(_) => Response::Error(Failure::bad(format!(
                "{name:?} is not a valid session name"
            ))),
            Ok(id) => match service.delete_session(&id).await {
                Ok(s) => Response::Deleted(s),
                Err(e) => Response::Error(Failure::from(&e)),
            },
        },
        Request::SessionsWeb { name, off } => match SessionId::try_from(name.as_str()) {
            Err(_) => Response::Error(Failure::bad(format!(
                "{name:?} is not a valid session name"
            ))),
            Ok(id) => match service.session_web(&id, off, &peer.to_string()) {
                Ok((on, records)) => Response::Web { on, records },
                Err(e) => Response::Error(Failure::from(&e)),
            },
        },
        Request::SessionsTimezone { name, zone } => match SessionId::try_from(name.as_str()) {
            Err(_) => Response::Error(Failure::bad(format!(
                "{name:?} is not a valid session name"
            ))),
            Ok(_)
                if zone
                    .as_deref()
                    .is_some_and(|z| !crate::service::zone_known(z)) =>
            {
                Response::Error(Failure::bad(format!(
                    "{:?} is not an IANA time zone name this machine's tz database knows (such as \"Europe/Berlin\")",
                    zone.unwrap_or_default()
                )))
            }
            Ok(id) => match service.set_session_zone(&id, zone.as_deref(), &peer.to_string()) {
                Ok(zone) => Response::TimeZone { name, zone },
                Err(e) => Response::Error(Failure::from(&e)),
            },
        },
        Request::SessionsShow { name } => match SessionId::try_from(name.as_str()) {
            Err(_) => Response::Error(Failure::bad(format!(
                "{name:?} is not a valid session name"
            ))),
            Ok(id) => match service.turns(&id, 50) {
                Ok(t) => Response::Turns(t),
                Err(e) => Response::Error(Failure::from(&e)),
            },
        },
        Request::ChangesList { all } => match service.changes(all, 10_000) {
            Ok(c) => Response::Changes(c),
            Err(e) => Response::Error(Failure::from(&e)),
        },
        Request::ChangesShow { id } => match service.change_ids(&id) {
            // A unique beginning names the request; the answer carries its full id, and
            // a decision names that and the hash of the text shown.
            Ok(ids) if ids.len() > 1 => Response::Error(Failure::bad(format!(
                "{id:?} is the beginning of several change requests: {}",
                ids.join(", ")
            ))),
            Ok(ids) => match ids.first().map(|full| service.change(full)).transpose() {
                Ok(Some(Some(detail))) => change_shown(detail),
                Ok(_) => Response::Error(Failure::new(
                    FailureKind::NotFound,
                    format!("no change request {id:?}"),
                )),
                Err(e) => Response::Error(Failure::from(&e)),
            },
            Err(e) => Response::Error(Failure::from(&e)),
        },
        Request::ChangesPropose { text, reason } => match service.propose(&peer, &text, &reason) {
            Ok(filed) => Response::Filed(filed),
            Err(e) => Response::Error(Failure::bad(e)),
        },
        Request::ChangesDecide {
            id,
            approve,
            hash,
            withdraw,
        } => {
            let decision = match (approve, withdraw) {
                (_, true) => Decision::Withdraw,
                (true, false) => Decision::Approve,
                (false, false) => Decision::Reject,
            };
            let before = service.config();
            match service.decide(&id, decision, &peer, hash.as_deref()).await {
                Ok(d @ Decided::Applied(_)) => {
                    let notes = crate::service::restart_notes(&before, &service.config());
                    let mut answer = decided(d);
                    if let Response::Decided { why, .. } = &mut answer
                        && !notes.is_empty()
                    {
                        *why = Some(notes.join("; "));
                    }
                    answer
                }
                Ok(d) => decided(d),
                Err(e) => Response::Error(Failure::from(&e)),
            }
        }
        Request::Health => match service.health() {
            Ok(h) => Response::Health {
                version: h.version,
                sessions: h.sessions,
                pending_changes: h.pending_changes,
            },
            Err(e) => Response::Error(Failure::from(&e)),
        },
        Request::ConfigShow => {
            let e = service.effective();
            Response::Config {
                version: e.version,
                text: e.text.clone(),
            }
        }
        Request::Status => match service.status() {
            Ok(s) => Response::Status(Box::new(s)),
            Err(e) => Response::Error(Failure::from(&e)),
        },
        Request::AuditPage { after, limit } => {
            let limit = limit.min(MAX_AUDIT_PAGE);
            match service.audit_page(after, limit) {
                Ok(entries) => Response::Audit(entries),
                Err(e) => Response::Error(Failure::from(&e)),
            }
        }
    };
    (answer, Ack::none())
}

/// A change request as `changes show` prints it, with its diff.
fn change_shown(detail: ChangeDetail) -> Response {
    Response::Change {
        // A request denied before it could be built holds the raw value asked for, not
        // a configuration: shown as it is.
        diff: if detail.after.parse::<toml::Table>().is_ok() {
            gateway::diff::diff(&detail.before, &detail.after)
        } else {
            format!(
                "(not a configuration; the value asked for)\n{}\n",
                detail.after
            )
        },
        detail: Box::new(detail),
    }
}

fn decided(d: Decided) -> Response {
    let (outcome, version, why) = match d {
        Decided::Applied(v) => (Outcome::Applied, Some(v.version), None),
        Decided::Rejected => (Outcome::Rejected, None, None),
        Decided::Refused(why) => (Outcome::Refused, None, Some(why)),
    };
    Response::Decided {
        outcome,
        version,
        why,
    }
}
