//! What the proxy endpoints do for one session: wake the agent when its inbox grows,
//! forward model calls to the configured provider within the session's budgets, take in
//! published outbox segments as hostile input, and pass change requests to the gateway.
//!
//! Two ways to the rest of the control plane, by what may be lost:
//! - what must not be lost (an outbox segment's items, a change request) is handed to
//!   the session's [`Intake`] in an ordinary awaited call, whose answer the agent gets;
//! - records for the audit trail are [`SessionEvent`]s on a bounded queue, dropped when
//!   its consumer is behind, so an agent cannot grow the control plane's memory.
//!
//! The proxy also keeps the summary of the agent's current turn (model calls, tools
//! asked for, refusals, change requests), counted here as each happens, and hands it
//! over with the outbox segment that ends the turn.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use queue_proto::control::OutboxReader;
use queue_proto::ids::{ChangeId, Seq, SessionId};
use queue_proto::items::{ChangeRequest, OutboxItem, ToolName};
use queue_proto::proxy::{
    ChangeRequestFiled, ContentBlock, ModelRequest, ModelResponse, OutboxNotice, ReminderAnswer,
    ReminderCancel, ReminderList, ReminderRequest, TranscriptionAnswer, TranscriptionRequest,
    WaitResponse, WebAnswer, WebFetchRequest, WebSearchRequest,
};
use tokio::sync::{Mutex, mpsc, watch};

use super::budget::{
    BudgetMeter, Budgets, INGEST_BUDGETS, REMINDER_CALL_BUDGETS, TRANSCRIPTION_CALL_BUDGETS,
    WEB_CALL_BUDGETS,
};
use super::server::{Refused, SessionHandler};
use crate::model::{Provider, ProviderError};
use crate::proxy::turn::TurnSummary;

/// A record for the audit trail; dropped, not queued, when the consumer is behind.
#[derive(Debug)]
pub enum SessionEvent {
    /// A model call that was made.
    ModelCall {
        session: SessionId,
        provider: &'static str,
        input_tokens: u64,
        output_tokens: u64,
        /// What the session's budget was charged for it.
        tokens_charged: u64,
        bytes_sent: u64,
    },
    /// A model call that failed or was refused. The agent tells the person; if it stays
    /// silent, the message fails with a notice at its timeout.
    ModelFailed { session: SessionId, reason: String },
    /// A segment or request the proxy refused.
    Refused {
        session: SessionId,
        what: &'static str,
        detail: String,
    },
}

/// An outbox segment that was not stored: it stays for the agent to announce again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotStored;

/// What the intake did with a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Its items are stored, with the turn it ends.
    Stored,
    /// The same seq with the same items was taken in before: nothing new, and the turn
    /// it would have ended goes on (a replayed segment never erases a turn's record).
    Duplicate,
}

/// Where a session's proxy hands what must not be lost. Each call returns once the
/// thing is durable (or known not to be).
pub trait Intake: Send + Sync + 'static {
    /// Stores a validated outbox segment's items with the summary of the turn it ends.
    fn outbox(
        &self,
        session: &SessionId,
        seq: Seq,
        items: Vec<OutboxItem>,
        turn: TurnSummary,
    ) -> impl Future<Output = Result<Taken, NotStored>> + Send;
    /// Files the agent's change request with the gateway: its id, or `None` if it was
    /// not filed.
    fn change_request(
        &self,
        session: &SessionId,
        request: ChangeRequest,
    ) -> impl Future<Output = Option<ChangeId>> + Send;
    /// Sets, lists or cancels the session's reminders; `None` if the store could not
    /// be used.
    fn reminders(
        &self,
        session: &SessionId,
        call: ReminderCall,
    ) -> impl Future<Output = Option<ReminderReply>> + Send;
    /// The transcript of a voice note of the session's; `None` if it could not be
    /// worked out for a reason on this side.
    fn transcribe(
        &self,
        session: &SessionId,
        request: TranscriptionRequest,
    ) -> impl Future<Output = Option<TranscriptionAnswer>> + Send;
    /// A fetch or a search for the session's agent; `None` if it could not be worked
    /// out for a reason on this side.
    fn web(
        &self,
        session: &SessionId,
        call: WebCall,
    ) -> impl Future<Output = Option<WebAnswer>> + Send;
}

/// A web call of the agent, checked for its form and rate.
#[derive(Debug, Clone)]
pub enum WebCall {
    Fetch(String),
    Search(String),
}

/// A reminder call of the agent, checked for its form and budget.
#[derive(Debug, Clone)]
pub enum ReminderCall {
    Set(ReminderRequest),
    List,
    Cancel(u64),
}

/// What the intake answers a [`ReminderCall`].
#[derive(Debug, Clone)]
pub enum ReminderReply {
    Answer(ReminderAnswer),
    List(ReminderList),
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
pub struct SessionProxy<P, I> {
    session: SessionId,
    inbox_dir: PathBuf,
    /// Ingestion holds this lock from read to removal, one segment at a time. Which
    /// seqs were taken in, with what content, is the store's to say (through the
    /// intake): an agent whose state went back reuses seqs, and its new replies must
    /// not be refused for it.
    outbox: Arc<Mutex<OutboxReader>>,
    /// What taking in this session's segments may cost ([`INGEST_BUDGETS`]), and what
    /// was passed over without a record of its own (see [`Passed`]).
    ingest: std::sync::Mutex<(BudgetMeter, Passed)>,
    /// Whether model calls may carry photos (`model.accepts_images`).
    accepts_images: bool,
    /// One transcription at a time for this session.
    transcribing: Arc<tokio::sync::Semaphore>,
    /// One web call at a time for this session, at most [`WEB_CALL_BUDGETS`].
    web_gate: Arc<tokio::sync::Semaphore>,
    web_calls: std::sync::Mutex<BudgetMeter>,
    /// What reminder calls may cost ([`REMINDER_CALL_BUDGETS`]).
    reminder_calls: std::sync::Mutex<BudgetMeter>,
    /// How often transcripts may be asked for ([`TRANSCRIPTION_CALL_BUDGETS`]); the
    /// day's audio is charged in the store.
    transcriptions: std::sync::Mutex<BudgetMeter>,
    provider: Arc<P>,
    budget: Arc<Mutex<BudgetMeter>>,
    /// One model call in flight per session.
    model_gate: Arc<tokio::sync::Semaphore>,
    latest: watch::Receiver<Option<Seq>>,
    wait_timeout: Duration,
    intake: Arc<I>,
    /// What the agent has done since its last outbox segment.
    turn: Arc<std::sync::Mutex<TurnSummary>>,
    /// Bounded: an agent cannot grow the control plane's memory by producing records
    /// faster than they are consumed.
    events: mpsc::Sender<SessionEvent>,
}

/// Where a session's proxy sends what it takes in and what it records.
#[derive(Debug)]
pub struct Outlets<I> {
    pub intake: Arc<I>,
    pub events: mpsc::Sender<SessionEvent>,
}

impl<P: Provider, I: Intake> SessionProxy<P, I> {
    /// Starts the model budget from what the session already used today.
    pub fn spent_today(self, tokens: u64, bytes: u64) -> Self {
        if let Ok(mut meter) = self.budget.try_lock() {
            *meter = meter.clone().spent_today(now_ms(), tokens, bytes);
        }
        self
    }

    /// Lets model calls carry photos, as the approved configuration says.
    pub fn accepts_images(mut self, accepts: bool) -> Self {
        self.accepts_images = accepts;
        self
    }

    /// A session's proxy behaviour, and the signal to call when its inbox grows.
    pub fn new(
        session: SessionId,
        inbox_dir: PathBuf,
        outbox: OutboxReader,
        provider: Arc<P>,
        budgets: Budgets,
        wait_timeout: Duration,
        outlets: Outlets<I>,
    ) -> (Self, InboxSignal) {
        let latest = queue_proto::control::list_inbox(&inbox_dir)
            .ok()
            .and_then(|s| s.last().copied());
        let (tx, rx) = watch::channel(latest);
        let proxy = SessionProxy {
            session,
            inbox_dir,
            outbox: Arc::new(Mutex::new(outbox)),
            ingest: std::sync::Mutex::new((BudgetMeter::new(INGEST_BUDGETS), Passed::default())),
            accepts_images: false,
            transcribing: Arc::new(tokio::sync::Semaphore::new(1)),
            web_gate: Arc::new(tokio::sync::Semaphore::new(1)),
            web_calls: std::sync::Mutex::new(BudgetMeter::new(WEB_CALL_BUDGETS)),
            reminder_calls: std::sync::Mutex::new(BudgetMeter::new(REMINDER_CALL_BUDGETS)),
            transcriptions: std::sync::Mutex::new(BudgetMeter::new(TRANSCRIPTION_CALL_BUDGETS)),
            provider,
            budget: Arc::new(Mutex::new(BudgetMeter::new(budgets))),
            model_gate: Arc::new(tokio::sync::Semaphore::new(1)),
            latest: rx,
            wait_timeout,
            intake: outlets.intake,
            turn: Arc::default(),
            events: outlets.events,
        };
        (proxy, InboxSignal(Arc::new(tx)))
    }

    fn emit(&self, event: SessionEvent) {
        // Records only: when the consumer is behind they are dropped, not queued.
        if self.events.try_send(event).is_err() {
            tracing::debug!(session = %self.session, "session event dropped: consumer is behind");
        }
    }

    /// Adds to the summary of the current turn.
    fn count(&self, f: impl FnOnce(&mut TurnSummary)) {
        f(&mut self.turn.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Charges one segment of `bytes` to the ingestion budget. Beyond it the segment
    /// stays for a later announce, and is counted rather than recorded on its own.
    fn admit_ingest(&self, bytes: u64) -> Result<(), Refused> {
        let mut ingest = self.ingest.lock().unwrap_or_else(|p| p.into_inner());
        match ingest.0.admit(now_ms(), bytes) {
            Ok(()) => Ok(()),
            Err(_) => {
                drop(ingest);
                self.pass_over(|p| p.over_budget += 1);
                Err(Refused::BUDGET)
            }
        }
    }

    /// Counts something passed over without a record of its own; the counts of a
    /// minute are recorded together, once, when the next minute starts.
    fn pass_over(&self, f: impl FnOnce(&mut Passed)) {
        let now = now_ms();
        let done = {
            let mut ingest = self.ingest.lock().unwrap_or_else(|p| p.into_inner());
            let p = &mut ingest.1;
            let mut done = None;
            if p.since == 0 || now.saturating_sub(p.since) >= 60_000 {
                let fresh = Passed {
                    since: now,
                    ..Passed::default()
                };
                let old = std::mem::replace(p, fresh);
                if old.empty > 0 || old.over_budget > 0 {
                    done = Some(old);
                }
            }
            f(p);
            done
        };
        if let Some(d) = done {
            self.emit(SessionEvent::Refused {
                session: self.session.clone(),
                what: "outbox",
                detail: format!(
                    "{} empty segments passed over and {} segments beyond the ingestion budget ({} a minute, {} bytes a day) in the minute from {}",
                    d.empty,
                    d.over_budget,
                    INGEST_BUDGETS.requests_per_minute,
                    INGEST_BUDGETS.bytes_per_day,
                    d.since / 1000
                ),
            });
        }
    }

    /// One reminder call, within its budget and the store's timeout.
    async fn reminder_call(
        &self,
        call: ReminderCall,
        bytes: u64,
    ) -> Result<ReminderReply, Refused> {
        let admitted = self
            .reminder_calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(now_ms(), bytes);
        if let Err(e) = admitted {
            return Err(self.refuse("reminders", e.to_string(), Refused::BUDGET));
        }
        let answered = self.intake.reminders(&self.session, call);
        match tokio::time::timeout(STORE_TIMEOUT, answered).await {
            Ok(Some(reply)) => Ok(reply),
            _ => Err(Refused::UNAVAILABLE),
        }
    }

    /// One web call: one at a time, within its per-minute rate (the day's requests and
    /// bytes are charged in the store).
    async fn web_call(&self, call: WebCall) -> Result<WebAnswer, Refused> {
        let Ok(_one) = self.web_gate.clone().try_acquire_owned() else {
            return Err(self.refuse("web", "one web call at a time".into(), Refused::BUDGET));
        };
        let admitted = self
            .web_calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(now_ms(), 0);
        if let Err(e) = admitted {
            return Err(self.refuse("web", e.to_string(), Refused::BUDGET));
        }
        self.count(|t| t.web_calls += 1);
        match self.intake.web(&self.session, call).await {
            Some(answer) => Ok(answer),
            None => Err(Refused::UNAVAILABLE),
        }
    }

    fn refuse(&self, what: &'static str, detail: String, refusal: Refused) -> Refused {
        self.count(|t| t.refusals += 1);
        self.emit(SessionEvent::Refused {
            session: self.session.clone(),
            what,
            detail,
        });
        refusal
    }
}

/// Photos one model call may carry.
pub const MAX_IMAGES_PER_CALL: usize = 4;

/// Checks the photos of a model call: none unless the model accepts images; else at
/// most [`MAX_IMAGES_PER_CALL`], each of an accepted image type and at most 5 MiB.
fn check_images(request: &ModelRequest, accepts_images: bool) -> Result<(), &'static str> {
    let images = request
        .messages
        .iter()
        .flat_map(|m| &m.content)
        .filter_map(|b| match b {
            ContentBlock::Image { media_type, data } => Some((media_type, data)),
            _ => None,
        });
    let mut n = 0;
    for (media_type, data) in images {
        n += 1;
        if !accepts_images {
            return Err("a photo, and the model is not set up to accept images");
        }
        if n > MAX_IMAGES_PER_CALL {
            return Err("more photos than one call may carry");
        }
        if !matches!(
            media_type.as_str(),
            "image/jpeg" | "image/png" | "image/webp"
        ) {
            return Err("a photo of a type that is not accepted");
        }
        if data.len() > (queue_proto::items::MAX_PHOTO_BYTES as usize).div_ceil(3) * 4 {
            return Err("a photo larger than 5 MiB");
        }
    }
    Ok(())
}

/// Outbox segments passed over without a record of their own since `since` (ms).
#[derive(Debug, Default)]
struct Passed {
    since: u64,
    /// Segments without items: a real turn always has one.
    empty: u32,
    /// Segments announced beyond [`INGEST_BUDGETS`].
    over_budget: u32,
}

/// How many records a session's proxy may have waiting for the consumer.
pub const EVENT_QUEUE: usize = 256;

/// How long the intake may take to store an outbox segment's items or file a request.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(8);

/// The most output tokens one model call may ask for.
pub const MAX_TOKENS_PER_CALL: u32 = 8192;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<P: Provider, I: Intake> SessionHandler for SessionProxy<P, I> {
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
        if let Err(why) = check_images(&request, self.accepts_images) {
            return Err(self.refuse("model", why.into(), Refused::REJECTED));
        }
        let bytes = serde_json::to_vec(&request).map_or(0, |b| b.len() as u64);
        if let Err(e) = self.budget.lock().await.admit(now_ms(), bytes) {
            self.turn
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .model_failures += 1;
            let failed = SessionEvent::ModelFailed {
                session: self.session.clone(),
                reason: e.to_string(),
            };
            self.emit(failed);
            return Err(self.refuse("model", e.to_string(), Refused::BUDGET));
        }
        // The call runs in its own task: if the agent hangs up or the handler times out,
        // the call is still charged and recorded when it ends.
        let (provider, budget, events, session, turn) = (
            self.provider.clone(),
            self.budget.clone(),
            self.events.clone(),
            self.session.clone(),
            self.turn.clone(),
        );
        let call = tokio::spawn(async move {
            let result = provider.complete(&request).await;
            // A failed call may still have been billed: charge its whole allowance.
            let tokens = match &result {
                // Counts from the provider are not ours: added without wrapping, so a
                // huge one exhausts the budget instead of coming round to nothing.
                Ok(r) => r
                    .usage
                    .input_tokens
                    .saturating_add(r.usage.output_tokens)
                    .max(1),
                Err(_) => u64::from(request.max_tokens),
            };
            budget.lock().await.record_tokens(now_ms(), tokens);
            // Counted before the agent sees the answer, so in the turn it belongs to.
            if result.is_err() {
                let mut t = turn.lock().unwrap_or_else(|p| p.into_inner());
                t.model_failures = t.model_failures.saturating_add(1);
            }
            if let Ok(r) = &result {
                let mut t = turn.lock().unwrap_or_else(|p| p.into_inner());
                t.model_calls += 1;
                t.bytes_out += bytes;
                let asked = r.content.iter().filter_map(|b| match b {
                    ContentBlock::ToolUse { name, .. } => Some(name),
                    _ => None,
                });
                for name in asked.take(64) {
                    // Names the model chose are not ours to record verbatim.
                    let known = serde_json::from_value::<ToolName>(serde_json::json!(name));
                    let name = known.map_or_else(|_| "unknown".to_owned(), |_| name.clone());
                    *t.tools.entry(name).or_default() += 1;
                }
            }
            let event = match &result {
                Ok(r) => SessionEvent::ModelCall {
                    session: session.clone(),
                    provider: provider.name(),
                    input_tokens: r.usage.input_tokens,
                    output_tokens: r.usage.output_tokens,
                    tokens_charged: tokens,
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
        // take one segment at a time per session.
        let guard = self.outbox.clone().lock_owned().await;
        let bytes = guard.size(notice.seq).unwrap_or(0);
        self.admit_ingest(bytes)?;
        let (guard, read) = tokio::task::spawn_blocking(move || {
            let read = guard.read(notice.seq);
            (guard, read)
        })
        .await
        .map_err(|_| Refused::UNAVAILABLE)?;
        match read {
            Ok(items) if items.is_empty() => {
                // Nothing to take in: no write, no record of its own; counted.
                self.pass_over(|p| p.empty += 1);
                guard
                    .remove(notice.seq)
                    .map_err(|e| self.refuse("outbox", e.to_string(), Refused::UNAVAILABLE))
            }
            Ok(items) => {
                // The segment ends the turn; if it is not stored, the turn goes on.
                let turn =
                    std::mem::take(&mut *self.turn.lock().unwrap_or_else(|p| p.into_inner()));
                let stored = self
                    .intake
                    .outbox(&self.session, notice.seq, items, turn.clone());
                match tokio::time::timeout(STORE_TIMEOUT, stored).await {
                    Ok(Ok(Taken::Stored)) => {}
                    Ok(Ok(Taken::Duplicate)) => self.count(|t| t.absorb(turn)),
                    _ => {
                        self.count(|t| t.absorb(turn));
                        return Err(Refused::UNAVAILABLE);
                    }
                }
                // A minute of counts that ended is recorded now, if nothing else did.
                self.pass_over(|_| {});
                guard
                    .remove(notice.seq)
                    .map_err(|e| self.refuse("outbox", e.to_string(), Refused::UNAVAILABLE))
            }
            Err(e) => {
                // A segment that fails validation is hostile or broken: drop it. An I/O
                // failure on our side leaves it for the agent to announce again.
                if !matches!(e, queue_proto::segment::SegmentError::Io { .. }) {
                    let _ = guard.remove(notice.seq);
                }
                Err(self.refuse("outbox", e.to_string(), Refused::REJECTED))
            }
        }
    }

    async fn change_request(&self, request: ChangeRequest) -> Result<ChangeRequestFiled, Refused> {
        self.count(|t| t.change_requests += 1);
        // A request that cannot be filed is refused, never silently lost.
        let filed = self.intake.change_request(&self.session, request);
        match tokio::time::timeout(STORE_TIMEOUT, filed).await {
            Ok(Some(id)) => Ok(ChangeRequestFiled { id }),
            _ => Err(Refused::UNAVAILABLE),
        }
    }

    async fn set_reminder(&self, request: ReminderRequest) -> Result<ReminderAnswer, Refused> {
        let bytes = request.text.len() as u64;
        match self
            .reminder_call(ReminderCall::Set(request), bytes)
            .await?
        {
            ReminderReply::Answer(a) => Ok(a),
            ReminderReply::List(_) => Err(Refused::UNAVAILABLE),
        }
    }

    async fn reminders(&self) -> Result<ReminderList, Refused> {
        match self.reminder_call(ReminderCall::List, 0).await? {
            ReminderReply::List(l) => Ok(l),
            ReminderReply::Answer(_) => Err(Refused::UNAVAILABLE),
        }
    }

    async fn cancel_reminder(&self, request: ReminderCancel) -> Result<ReminderAnswer, Refused> {
        match self
            .reminder_call(ReminderCall::Cancel(request.id), 0)
            .await?
        {
            ReminderReply::Answer(a) => Ok(a),
            ReminderReply::List(_) => Err(Refused::UNAVAILABLE),
        }
    }

    async fn transcribe(
        &self,
        request: TranscriptionRequest,
    ) -> Result<TranscriptionAnswer, Refused> {
        let admitted = self
            .transcriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(now_ms(), 0);
        if let Err(e) = admitted {
            return Err(self.refuse("transcriptions", e.to_string(), Refused::BUDGET));
        }
        let Ok(_one) = self.transcribing.clone().try_acquire_owned() else {
            return Err(self.refuse(
                "transcriptions",
                "one transcription at a time".into(),
                Refused::BUDGET,
            ));
        };
        self.count(|t| t.transcriptions += 1);
        match self.intake.transcribe(&self.session, request).await {
            Some(answer) => Ok(answer),
            None => Err(Refused::UNAVAILABLE),
        }
    }

    async fn web_fetch(&self, request: WebFetchRequest) -> Result<WebAnswer, Refused> {
        self.web_call(WebCall::Fetch(request.url)).await
    }

    async fn web_search(&self, request: WebSearchRequest) -> Result<WebAnswer, Refused> {
        self.web_call(WebCall::Search(request.query)).await
    }
}
