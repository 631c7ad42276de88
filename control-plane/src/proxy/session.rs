//! What the proxy endpoints do for one session: wake the agent when its inbox grows,
//! forward model calls to the configured provider within the session's budgets, take in
//! published outbox segments as hostile input, and pass change requests to the gateway.
//! Everything that must reach the rest of the control plane leaves as a [`SessionEvent`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use queue_proto::control::OutboxReader;
use queue_proto::ids::{ChangeId, Seq, SessionId};
use queue_proto::items::{ChangeRequest, OutboxItem, ToolName};
use queue_proto::proxy::{
    ChangeRequestFiled, ContentBlock, ModelRequest, ModelResponse, OutboxNotice, WaitResponse,
};
use tokio::sync::{Mutex, mpsc, oneshot, watch};

use super::budget::{BudgetMeter, Budgets};
use super::server::{Refused, SessionHandler};
use crate::model::{Provider, ProviderError};

/// Something the proxy saw that the rest of the control plane acts on.
#[derive(Debug)]
pub enum SessionEvent {
    /// Items from a published outbox segment, already validated. The segment is
    /// removed only after the consumer sends on `stored` (its items are durable); if it
    /// does not, the segment stays for the agent to announce again.
    Outbox {
        session: SessionId,
        seq: Seq,
        items: Vec<OutboxItem>,
        stored: oneshot::Sender<()>,
    },
    /// A model call that was made (for the audit trail and the turn summary).
    ModelCall {
        session: SessionId,
        provider: &'static str,
        /// The tools the model asked to use, by name (at most 64 listed).
        tools: Vec<String>,
        input_tokens: u64,
        output_tokens: u64,
        bytes_sent: u64,
    },
    /// A model call that failed or was refused (for the audit trail). The agent tells
    /// the person; if it stays silent, the message fails with a notice at its timeout.
    ModelFailed { session: SessionId, reason: String },
    /// A segment or request the proxy refused (for the audit trail).
    Refused {
        session: SessionId,
        what: &'static str,
        detail: String,
    },
    /// The agent asks for a change; the gateway files it and sends back its id (or
    /// nothing, if it could not be filed).
    ChangeRequested {
        session: SessionId,
        request: ChangeRequest,
        filed: oneshot::Sender<ChangeId>,
    },
}

/// Tells a waiting agent that its inbox grew.
#[derive(Debug, Clone)]
pub struct InboxSignal(Arc<watch::Sender<Option<Seq>>>);

impl InboxSignal {
    /// Call after publishing inbox segment `seq`.
    pub fn published(&self, seq: Seq) {
        self.0.send_if_modified(|latest| {
            let newer = latest.is_none_or(|l| seq > l);
            if newer {
                *latest = Some(seq);
            }
            newer
        });
    }
}

/// The endpoints' behaviour for one session.
#[derive(Debug)]
pub struct SessionProxy<P> {
    session: SessionId,
    inbox_dir: PathBuf,
    /// Ingestion holds this lock from read to removal, one segment at a time; the value
    /// is the last seq taken in, and only a later seq is accepted.
    outbox: Arc<Mutex<(OutboxReader, Option<Seq>)>>,
    provider: Arc<P>,
    budget: Arc<Mutex<BudgetMeter>>,
    /// One model call in flight per session.
    model_gate: Arc<tokio::sync::Semaphore>,
    latest: watch::Receiver<Option<Seq>>,
    wait_timeout: Duration,
    /// Bounded: an agent cannot grow the control plane's memory by producing events
    /// faster than they are consumed.
    events: mpsc::Sender<SessionEvent>,
}

impl<P: Provider> SessionProxy<P> {
    /// A session's proxy behaviour, and the signal to call when its inbox grows.
    pub fn new(
        session: SessionId,
        inbox_dir: PathBuf,
        outbox: OutboxReader,
        provider: Arc<P>,
        budgets: Budgets,
        wait_timeout: Duration,
        events: mpsc::Sender<SessionEvent>,
    ) -> (Self, InboxSignal) {
        let latest = queue_proto::control::list_inbox(&inbox_dir)
            .ok()
            .and_then(|s| s.last().copied());
        let (tx, rx) = watch::channel(latest);
        let proxy = SessionProxy {
            session,
            inbox_dir,
            outbox: Arc::new(Mutex::new((outbox, None))),
            provider,
            budget: Arc::new(Mutex::new(BudgetMeter::new(budgets))),
            model_gate: Arc::new(tokio::sync::Semaphore::new(1)),
            latest: rx,
            wait_timeout,
            events,
        };
        (proxy, InboxSignal(Arc::new(tx)))
    }

    fn emit(&self, event: SessionEvent) {
        // Records only: when the consumer is behind they are dropped, not queued.
        if self.events.try_send(event).is_err() {
            tracing::debug!(session = %self.session, "session event dropped: consumer is behind");
        }
    }

    fn refuse(&self, what: &'static str, detail: String, refusal: Refused) -> Refused {
        self.emit(SessionEvent::Refused {
            session: self.session.clone(),
            what,
            detail,
        });
        refusal
    }
}

/// How many events a session's proxy may have waiting for the consumer.
pub const EVENT_QUEUE: usize = 256;

/// How long the consumer may take to store an outbox segment's items.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(8);

/// The most output tokens one model call may ask for.
pub const MAX_TOKENS_PER_CALL: u32 = 8192;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<P: Provider> SessionHandler for SessionProxy<P> {
    async fn wait(&self, after: Seq) -> Result<WaitResponse, Refused> {
        let mut latest = self.latest.clone();
        let newer = |l: &Option<Seq>| l.is_some_and(|l| l > after);
        let _ = tokio::time::timeout(self.wait_timeout, latest.wait_for(newer)).await;
        let seqs = queue_proto::control::list_inbox(&self.inbox_dir)
            .map_err(|e| self.refuse("wait", e.to_string(), Refused::UNAVAILABLE))?
            .into_iter()
            .filter(|s| *s > after)
            .collect();
        Ok(WaitResponse { seqs })
    }

    async fn model(&self, mut request: ModelRequest) -> Result<ModelResponse, Refused> {
        // One call at a time per session, and no more output than the cap.
        let Ok(permit) = self.model_gate.clone().acquire_owned().await else {
            return Err(Refused::UNAVAILABLE);
        };
        request.max_tokens = request.max_tokens.min(MAX_TOKENS_PER_CALL);
        let bytes = serde_json::to_vec(&request).map_or(0, |b| b.len() as u64);
        if let Err(e) = self.budget.lock().await.admit(now_ms(), bytes) {
            let failed = SessionEvent::ModelFailed {
                session: self.session.clone(),
                reason: e.to_string(),
            };
            self.emit(failed);
            return Err(self.refuse("model", e.to_string(), Refused::BUDGET));
        }
        // The call runs in its own task: if the agent hangs up or the handler times out,
        // the call is still charged and recorded when it ends.
        let (provider, budget, events, session) = (
            self.provider.clone(),
            self.budget.clone(),
            self.events.clone(),
            self.session.clone(),
        );
        let call = tokio::spawn(async move {
            let result = provider.complete(&request).await;
            // A failed call may still have been billed: charge its whole allowance.
            let tokens = match &result {
                Ok(r) => (r.usage.input_tokens + r.usage.output_tokens).max(1),
                Err(_) => u64::from(request.max_tokens),
            };
            budget.lock().await.record_tokens(now_ms(), tokens);
            let event = match &result {
                Ok(r) => SessionEvent::ModelCall {
                    session: session.clone(),
                    provider: provider.name(),
                    tools: r
                        .content
                        .iter()
                        .filter_map(|b| match b {
                            // Names the model chose are not ours to record verbatim.
                            ContentBlock::ToolUse { name, .. } => Some(
                                serde_json::from_value::<ToolName>(serde_json::json!(name))
                                    .map_or_else(|_| "unknown".to_owned(), |_| name.clone()),
                            ),
                            _ => None,
                        })
                        .take(64)
                        .collect(),
                    input_tokens: r.usage.input_tokens,
                    output_tokens: r.usage.output_tokens,
                    bytes_sent: bytes,
                },
                Err(e) => SessionEvent::ModelFailed {
                    session: session.clone(),
                    reason: match e {
                        ProviderError::Refused { .. } | ProviderError::BadAnswer => {
                            format!("the model refused or garbled the request: {e}")
                        }
                        _ => format!("the model could not be reached: {e}"),
                    },
                },
            };
            let _ = events.try_send(event);
            drop(permit);
            result
        });
        match call.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.refuse("model", e.to_string(), Refused::UNAVAILABLE)),
            Err(_) => Err(Refused::UNAVAILABLE),
        }
    }

    async fn outbox(&self, notice: OutboxNotice) -> Result<(), Refused> {
        // Parsing a hostile file is blocking work: keep it off the async workers, and
        // take one segment at a time per session, each seq once, in order.
        let guard = self.outbox.clone().lock_owned().await;
        // Room for the items must exist before the segment is taken in and removed.
        let Ok(slot) = self.events.clone().try_reserve_owned() else {
            return Err(Refused::UNAVAILABLE);
        };
        if guard.1.is_some_and(|last| notice.seq <= last) {
            return Err(self.refuse(
                "outbox",
                format!("seq {} was already taken in", notice.seq),
                Refused::REJECTED,
            ));
        }
        let (guard, read) = tokio::task::spawn_blocking(move || {
            let read = guard.0.read(notice.seq);
            (guard, read)
        })
        .await
        .map_err(|_| Refused::UNAVAILABLE)?;
        let mut guard = guard;
        match read {
            Ok(items) => {
                let (stored, was_stored) = oneshot::channel();
                slot.send(SessionEvent::Outbox {
                    session: self.session.clone(),
                    seq: notice.seq,
                    items,
                    stored,
                });
                if !matches!(
                    tokio::time::timeout(STORE_TIMEOUT, was_stored).await,
                    Ok(Ok(()))
                ) {
                    return Err(Refused::UNAVAILABLE);
                }
                guard.1 = Some(notice.seq);
                guard
                    .0
                    .remove(notice.seq)
                    .map_err(|e| self.refuse("outbox", e.to_string(), Refused::UNAVAILABLE))
            }
            Err(e) => {
                // A segment that fails validation is hostile or broken: drop it. An I/O
                // failure on our side leaves it for the agent to announce again.
                if !matches!(e, queue_proto::segment::SegmentError::Io { .. }) {
                    let _ = guard.0.remove(notice.seq);
                }
                Err(self.refuse("outbox", e.to_string(), Refused::REJECTED))
            }
        }
    }

    async fn change_request(&self, request: ChangeRequest) -> Result<ChangeRequestFiled, Refused> {
        let (filed, id) = oneshot::channel();
        let event = SessionEvent::ChangeRequested {
            session: self.session.clone(),
            request,
            filed,
        };
        // A request that cannot be queued or filed is refused, never silently lost.
        if self.events.try_send(event).is_err() {
            return Err(Refused::UNAVAILABLE);
        }
        match tokio::time::timeout(STORE_TIMEOUT, id).await {
            Ok(Ok(id)) => Ok(ChangeRequestFiled { id }),
            _ => Err(Refused::UNAVAILABLE),
        }
    }
}
