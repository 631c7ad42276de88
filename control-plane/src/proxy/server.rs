//! The proxy's socket server. The socket identifies the session: the server is started
//! with the session's id and never reads one from a request.
//!
//! What a hostile agent meets, in order: at most [`ProxyLimits::max_connections`] open
//! connections (more are closed at once); headers must arrive within
//! [`ProxyLimits::header_timeout`] and fit in [`MAX_HEADER_BYTES`]; the route must be
//! one of the ten endpoints; a body is refused on its declared length before it is
//! read, and cut off at the endpoint's limit while it is read; the body must parse into
//! the endpoint's closed type; the handler must answer within its timeout. Every refusal
//! is one opaque [`Refusal`]; the detail stays on this side.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use queue_proto::ids::{Seq, SessionId};
use queue_proto::items::ChangeRequest;
use queue_proto::proxy::{
    ChangeRequestFiled, Endpoint, ModelRequest, ModelResponse, OutboxNotice, Refusal, RefusalCode,
    ReminderAnswer, ReminderCancel, ReminderList, ReminderRequest, RequestBody,
    TranscriptionAnswer, TranscriptionRequest, WaitResponse, WebAnswer, WebFetchRequest,
    WebSearchRequest, parse_body, parse_wait_query,
};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

/// Largest request head (request line and headers) accepted, in bytes.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// What one session's agent may cost the control plane.
#[derive(Debug, Clone, Copy)]
pub struct ProxyLimits {
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Time to send a complete request head.
    pub header_timeout: Duration,
    /// Time to send a complete body.
    pub body_timeout: Duration,
    /// Time a model call may take, retries included.
    pub model_timeout: Duration,
    /// Time a `wait` long-poll is held open.
    pub wait_timeout: Duration,
    /// Time any other handler may take.
    pub handler_timeout: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_connections: 8,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            model_timeout: Duration::from_secs(180),
            wait_timeout: Duration::from_secs(60),
            handler_timeout: Duration::from_secs(10),
        }
    }
}

/// A refusal with the HTTP status it is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub code: RefusalCode,
}

impl Refused {
    pub const REJECTED: Refused = Refused {
        status: StatusCode::BAD_REQUEST,
        code: RefusalCode::Rejected,
    };

    pub const BUDGET: Refused = Refused {
        status: StatusCode::TOO_MANY_REQUESTS,
        code: RefusalCode::BudgetExhausted,
    };
    pub const UNAVAILABLE: Refused = Refused {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: RefusalCode::Unavailable,
    };
}

/// What the endpoints do for one session. The server has already checked and parsed
/// the request; the handler decides.
pub trait SessionHandler: Send + Sync + 'static {
    /// Inbox segments published after `after`; may wait for new ones (long-poll).
    fn wait(&self, after: Seq) -> impl Future<Output = Result<WaitResponse, Refused>> + Send;
    /// One model call.
    fn model(
        &self,
        request: ModelRequest,
    ) -> impl Future<Output = Result<ModelResponse, Refused>> + Send;
    /// An outbox segment was published.
    fn outbox(&self, notice: OutboxNotice) -> impl Future<Output = Result<(), Refused>> + Send;
    /// The agent asks for a change.
    fn change_request(
        &self,
        request: ChangeRequest,
    ) -> impl Future<Output = Result<ChangeRequestFiled, Refused>> + Send;
    /// The agent asks for a reminder.
    fn set_reminder(
        &self,
        request: ReminderRequest,
    ) -> impl Future<Output = Result<ReminderAnswer, Refused>> + Send;
    /// The session's reminders still to come.
    fn reminders(&self) -> impl Future<Output = Result<ReminderList, Refused>> + Send;
    /// The agent cancels one of its session's reminders.
    fn cancel_reminder(
        &self,
        request: ReminderCancel,
    ) -> impl Future<Output = Result<ReminderAnswer, Refused>> + Send;
    /// The agent asks for the transcript of a voice note the person sent.
    fn transcribe(
        &self,
        request: TranscriptionRequest,
    ) -> impl Future<Output = Result<TranscriptionAnswer, Refused>> + Send;
    /// The agent asks for a page.
    fn web_fetch(
        &self,
        request: WebFetchRequest,
    ) -> impl Future<Output = Result<WebAnswer, Refused>> + Send;
    /// The agent asks for search results.
    fn web_search(
        &self,
        request: WebSearchRequest,
    ) -> impl Future<Output = Result<WebAnswer, Refused>> + Send;
}

/// Serves `session`'s socket until the listener fails or the task is aborted.
pub async fn serve<H: SessionHandler>(
    listener: UnixListener,
    session: SessionId,
    handler: Arc<H>,
    limits: ProxyLimits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(session = %session, error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Over the connection limit: close at once.
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(respond(handler.as_ref(), req, &limits).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(session = %session, error = %e, "proxy connection ended with an error");
            }
            drop(permit);
        });
    }
}

async fn respond<H: SessionHandler>(
    handler: &H,
    req: Request<Incoming>,
    limits: &ProxyLimits,
) -> Response<Full<Bytes>> {
    match handle(handler, req, limits).await {
        Ok(body) => json(StatusCode::OK, body),
        Err(r) => json(
            r.status,
            serde_json::to_vec(&Refusal { error: r.code }).expect("refusals serialise"),
        ),
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("response types serialise")
}

/// Runs a handler under a timeout; a handler that overruns is `Unavailable`.
async fn bounded<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, Refused>>,
) -> Result<T, Refused> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(Refused::UNAVAILABLE))
}

async fn handle<H: SessionHandler>(
    handler: &H,
    req: Request<Incoming>,
    limits: &ProxyLimits,
) -> Result<Vec<u8>, Refused> {
    let endpoint = Endpoint::route(req.method().as_str(), req.uri().path()).ok_or(Refused {
        status: StatusCode::NOT_FOUND,
        code: RefusalCode::Rejected,
    })?;
    match endpoint {
        Endpoint::Wait => {
            let after =
                parse_wait_query(req.uri().query().unwrap_or("")).map_err(|_| Refused::REJECTED)?;
            if declared_length(&req)? != 0 {
                return Err(Refused::REJECTED);
            }
            bounded(
                limits.wait_timeout + limits.handler_timeout,
                handler.wait(after),
            )
            .await
            .map(|r| to_json(&r))
        }
        Endpoint::Model => {
            let body: ModelRequest = read_body(req, limits).await?;
            bounded(limits.model_timeout, handler.model(body))
                .await
                .map(|r| to_json(&r))
        }
        Endpoint::Outbox => {
            let body: OutboxNotice = read_body(req, limits).await?;
            bounded(limits.handler_timeout, handler.outbox(body))
                .await
                .map(|()| b"{}".to_vec())
        }
        Endpoint::ChangeRequests => {
            let body: ChangeRequest = read_body(req, limits).await?;
            bounded(limits.handler_timeout, handler.change_request(body))
                .await
                .map(|r| to_json(&r))
        }
        Endpoint::SetReminder => {
            let body: ReminderRequest = read_body(req, limits).await?;
            bounded(limits.handler_timeout, handler.set_reminder(body))
                .await
                .map(|r| to_json(&r))
        }
        Endpoint::ListReminders => {
            if req.uri().query().is_some() || declared_length(&req)? != 0 {
                return Err(Refused::REJECTED);
            }
            bounded(limits.handler_timeout, handler.reminders())
                .await
                .map(|r| to_json(&r))
        }
        Endpoint::CancelReminder => {
            let body: ReminderCancel = read_body(req, limits).await?;
            bounded(limits.handler_timeout, handler.cancel_reminder(body))
                .await
                .map(|r| to_json(&r))
        }
        Endpoint::Transcribe => {
            let body: TranscriptionRequest = read_body(req, limits).await?;
            bounded(limits.model_timeout, handler.transcribe(body))
                .await
                .map(|r| to_json(&r))
        }
        Endpoint::WebFetch => {
            let body: WebFetchRequest = read_body(req, limits).await?;
            bounded(limits.model_timeout, handler.web_fetch(body))
                .await
                .map(|r| to_json(&r))
        }
        Endpoint::WebSearch => {
            let body: WebSearchRequest = read_body(req, limits).await?;
            bounded(limits.model_timeout, handler.web_search(body))
                .await
                .map(|r| to_json(&r))
        }
    }
}

/// The declared body length; a missing header is 0 only if the body is not chunked.
fn declared_length(req: &Request<Incoming>) -> Result<u64, Refused> {
    match req.headers().get(CONTENT_LENGTH) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(Refused::REJECTED),
        None if req.headers().contains_key(hyper::header::TRANSFER_ENCODING) => Ok(u64::MAX),
        None => Ok(0),
    }
}

/// Reads a body no larger than `T`'s limit, within the body timeout, and parses it.
async fn read_body<T: RequestBody>(
    req: Request<Incoming>,
    limits: &ProxyLimits,
) -> Result<T, Refused> {
    let too_large = Refused {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: RefusalCode::Rejected,
    };
    let declared = declared_length(&req)?;
    if declared != u64::MAX && declared > T::MAX_BYTES as u64 {
        return Err(too_large);
    }
    let body = Limited::new(req.into_body(), T::MAX_BYTES);
    let bytes = match tokio::time::timeout(limits.body_timeout, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => return Err(too_large),
        Err(_) => {
            return Err(Refused {
                status: StatusCode::REQUEST_TIMEOUT,
                code: RefusalCode::Rejected,
            });
        }
    };
    parse_body::<T>(&bytes).map_err(|_| Refused::REJECTED)
}
