//! `serve`: the control plane as one running service. It routes each chat to its
//! session, stores every accepted message before anything else happens to it, publishes
//! inbox segments from the store, keeps one sandbox and one proxy per live session,
//! takes replies in from the proxies and queues them for the channels, and sweeps for
//! messages that must fail with a notice (no reply in time, a sandbox stopped by a
//! limit). Every message it accepts ends answered, failed with a notice, refused with a
//! notice, or dead-lettered where the operator sees it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use queue_proto::control::{InboxWriter, OutboxReader};
use queue_proto::ids::{ChangeId, Seq, SessionId};
use queue_proto::items::{ChangeRequest, InboxItem, OutboxItem, UserMessage};
use queue_proto::keys::{MasterKey, SessionKeys, derive_session_keys};
use queue_proto::proxy::{TranscriptionAnswer, TranscriptionRequest, WebAnswer};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::audit::AuditEvent;
use crate::config::{Config, ProviderKind, RuntimeChoice};
use crate::gateway::rate::RateLimit;
use crate::model::anthropic::Anthropic;
use crate::model::demo::DemoProvider;
use crate::model::http::{ApiKey, ApprovedEndpoint};
use crate::model::openai::OpenAiCompatible;
use crate::model::{AnyProvider, Provider};
use crate::proxy::server::{ProxyLimits, serve};
use crate::proxy::session::{
    EVENT_QUEUE, InboxSignal, Intake, NotStored, Outlets, ReminderCall, ReminderReply,
    SessionEvent, SessionProxy, Taken, WebCall,
};
use crate::proxy::turn::TurnSummary;
use crate::sandbox::SandboxSettings;
use crate::sandbox::layout;
use crate::sandbox::lifecycle::{Event, Exit, Manager, ManagerError};
use crate::sandbox::runtime::{HostRuntime, RunscRuntime, Runtime, blocking};
use crate::state::{StateDir, now_secs};
use crate::store::cursors::Cursor;
use crate::store::messages::{Accepted, Inbound, Refusal, Waiting};
use crate::store::sessions::SessionSummary;
use crate::store::usage;
use crate::store::{Store, StoreError};

mod calls;
mod files;
pub use calls::Status;
mod gate;
mod reminders;
mod web;
pub use gate::{Effective, restart_notes, started_differently, telegram_may_approve};
pub use reminders::zone_known;
pub use web::urls_in_text;

/// Fixed notices sent to the person. None of them quotes the message.
pub mod notice {
    pub const TOO_MANY: &str = "Too many of your messages are waiting for the assistant; this one \
        was not passed on. Please wait for a reply, then send it again.";
    pub const TIMEOUT: &str = "Sorry, the assistant did not answer your message in time.";
    pub const LIMIT: &str = "Sorry, the assistant was stopped because it reached a resource \
        limit while working on your message.";
    pub const UNAVAILABLE: &str = "Sorry, the assistant could not be started for your message. \
        The operator can see what went wrong.";
    pub const TOO_LONG: &str = "This message is too long for the assistant (at most 64 KiB of \
        text); it was not passed on.";
    pub const NOT_ALLOWED: &str = "This assistant is private. Your message was not passed on.";
    pub const NOT_TEXT: &str = "Only text, photos, documents and voice notes can be passed to \
        the assistant.";
    pub const BUSY: &str = "Sorry, the assistant is busy with other conversations right now. \
        Please send your message again in a minute.";
}

/// How often the sweeper looks for timeouts, due timers and unpublished messages.
pub const SWEEP_PERIOD: Duration = Duration::from_millis(500);

/// Why the service failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("making the sandboxes' own network namespace failed (is iproute2 installed?)")]
    Netns(#[source] crate::sandbox::runtime::RuntimeError),
    #[error("the model provider could not be set up: {0}")]
    Provider(String),
    #[error("the approved configuration (version {version}) is not valid")]
    Config {
        version: u64,
        #[source]
        source: crate::config::ConfigError,
    },
    #[error("there is no approved configuration, and the configuration file is not valid")]
    Bootstrap(#[source] crate::config::ConfigError),
    #[error(
        "the audit trail is broken, so the control store was changed outside ironclaw; not starting (see `ironclaw audit verify`)"
    )]
    AuditBroken(#[source] crate::audit::ChainError),
    #[error(
        "approved configuration version {0} is not in the audit trail: the control store was changed outside ironclaw; not starting"
    )]
    UnrecordedVersion(u64),
    #[error("the sandbox manager could not start")]
    Manager(#[source] ManagerError),
    #[error("the agent binary {0} does not exist; build it with scripts/build-static")]
    NoAgent(PathBuf),
    #[error(transparent)]
    AgentBinary(#[from] crate::sandbox::agent_binary::AgentBinaryError),
    #[error("preparing session {session} failed")]
    Prepare {
        session: SessionId,
        #[source]
        source: std::io::Error,
    },
    #[error("session {0} does not exist")]
    NoSession(SessionId),
    #[error("session {0} is being deleted")]
    Deleting(SessionId),
    #[error("session {session} belongs to the {channel} channel")]
    WrongChannel { session: SessionId, channel: String },
    #[error("the channel has as many chats as it may (bridge.max_chats)")]
    TooManyChats,
    #[error("publishing an inbox segment for {session} failed")]
    Publish {
        session: SessionId,
        #[source]
        source: Box<queue_proto::segment::SegmentError>,
    },
}

/// What a channel hands to [`Service::receive`].
#[derive(Debug)]
pub enum Arrival<'a> {
    /// A message that passed the channel's rules, for `session`.
    Message {
        session: &'a SessionId,
        inbound: &'a Inbound,
        /// A new session for this chat only while its channel has fewer than this many
        /// (a channel whose clients name their chats); `None`: no such limit.
        max_sessions: Option<u32>,
    },
    /// A message the channel refused (unknown sender, too large, malformed).
    Refused(Refusal<'a>),
    /// Nothing to store (an update handled elsewhere): only the cursor moves.
    Nothing,
}

/// One live session: its keys, its proxy and the task that consumes its events.
struct Live {
    keys: SessionKeys,
    signal: InboxSignal,
    /// Taking a batch and writing its segment happen under this lock, so segments
    /// appear in seq order.
    publish: tokio::sync::Mutex<()>,
    /// Set (under `publish`) when the session is deleted, or retired to restart with
    /// a new configuration: nothing starts this instance again.
    deleted: std::sync::atomic::AtomicBool,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Takes a session off the list of those being deleted when dropped.
struct Unmark<'a>(&'a Service, SessionId);

impl Drop for Unmark<'_> {
    fn drop(&mut self) {
        self.0.deleting().remove(&self.1);
    }
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

/// The running control plane.
#[derive(Debug)]
pub struct Service {
    /// The approved configuration in force, replaced when a change is applied.
    effective: std::sync::RwLock<Arc<Effective>>,
    master: MasterKey,
    store: std::sync::Mutex<Store>,
    manager: Arc<Manager>,
    /// When this service started, in Unix seconds.
    started_at: i64,
    /// The configuration file it was started with, kept in step with the approved
    /// version (see `write_back`).
    config_file: std::path::PathBuf,
    /// The configuration it was started with: its channels are the ones listening, and
    /// what differs from it waits for a restart.
    started_with: Arc<Config>,
    provider: std::sync::RwLock<Arc<AnyProvider>>,
    limits: ProxyLimits,
    /// Change requests per agent per minute.
    rate: std::sync::Mutex<RateLimit>,
    /// Refused admin peers recorded one by one, per peer per minute.
    refused_peers: std::sync::Mutex<RateLimit>,
    /// Refused messages recorded one by one, per chat per minute and in all.
    refused_messages: std::sync::Mutex<RateLimit>,
    /// Wakes the Telegram channel when approval prompts are waiting.
    prompts: tokio::sync::Notify,
    /// Wakes the channels' fetchers when a message with files is stored.
    files: tokio::sync::Notify,
    /// The web broker's clients, kept for reuse.
    web_clients: crate::web::fetch::Clients,
    /// Applying one change at a time: decisions, and the restarts that follow them.
    applying: tokio::sync::Mutex<()>,
    live: std::sync::Mutex<HashMap<SessionId, Arc<Live>>>,
    /// Held while a session's live parts are created.
    creating: std::sync::Mutex<()>,
    /// Sessions being deleted: nothing may bring them back to life meanwhile.
    deleting: std::sync::Mutex<std::collections::HashSet<SessionId>>,
    /// Bumped whenever replies are queued, so delivery workers and waiting clients look.
    outbound: watch::Sender<u64>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// Builds the configured model provider. The API key is read here, by the control plane.
pub fn provider(config: &Config) -> Result<AnyProvider, ServiceError> {
    let m = &config.model;
    let endpoint = || {
        let base = m.base_url.as_deref().unwrap_or_default();
        ApprovedEndpoint::parse(base).map_err(|e| ServiceError::Provider(e.to_string()))
    };
    let key = |required: bool| -> Result<Option<ApiKey>, ServiceError> {
        match &m.api_key_file {
            Some(p) => ApiKey::from_file(p)
                .map(Some)
                .map_err(|e| ServiceError::Provider(e.to_string())),
            None if required => Err(ServiceError::Provider("an api_key_file is required".into())),
            None => Ok(None),
        }
    };
    let model = m.model.clone().unwrap_or_default();
    Ok(match m.provider {
        ProviderKind::Demo => AnyProvider::Demo(DemoProvider),
        ProviderKind::Anthropic => {
            let key = key(true)?.expect("required keys are present");
            AnyProvider::Anthropic(Anthropic::new(endpoint()?, model, key))
        }
        ProviderKind::Openai => {
            AnyProvider::OpenAi(OpenAiCompatible::new(endpoint()?, model, key(false)?))
        }
    })
}

/// The agent binary a configuration names (see [`crate::sandbox::agent_binary::resolve`]).
pub fn agent_binary(config: &Config) -> PathBuf {
    crate::sandbox::agent_binary::resolve(config.sandbox.agent_binary.as_deref())
}

/// The sandbox limits a configuration sets, at start and again when an approved change
/// puts it in force: they hold for every sandbox started from then on.
fn put_limits(settings: &mut SandboxSettings, config: &Config) {
    settings.limits.memory_bytes = config.sandbox.memory_mib * 1024 * 1024;
    settings.idle_timeout = Duration::from_secs(config.sandbox.idle_stop_secs);
    settings.max_live = config.sandbox.max_live;
    // A session quiet for the reply timeout has no message left waiting: its sandbox
    // may make room for another.
    settings.evict_after = Duration::from_secs(config.delivery.reply_timeout_secs);
}

/// The sandbox settings a configuration asks for.
fn sandbox_settings(config: &Config, state: &StateDir) -> SandboxSettings {
    let mut settings = SandboxSettings::new(state.root.clone(), agent_binary(config));
    settings.run_dir = state.run_dir();
    put_limits(&mut settings, config);
    // Under gVisor every outbox is a file system of its own; the development-only host
    // runtime keeps plain directories (it may run without the right to mount).
    if config.sandbox.runtime == RuntimeChoice::Gvisor {
        settings.outbox_bytes = Some(config.sandbox.outbox_mib * 1024 * 1024);
        // Each session's agent runs as a uid of its own: one escaped agent reads no
        // other session's outbox.
        settings.uid_base = Some(config.sandbox.uid_base);
    }
    settings
}

impl Service {
    /// Opens the store, takes the approved configuration from it (the first time, from
    /// `file_text`; a later difference becomes a change request), recovers from however
    /// the last run ended, and starts the supervisor, the sweeper and every session that
    /// has work waiting.
    pub async fn start(
        config_file: std::path::PathBuf,
        file_text: String,
        state: StateDir,
        master: MasterKey,
    ) -> Result<Arc<Service>, ServiceError> {
        let mut store = blocking(|| Store::open(&state.store(), &master))?;
        // Nothing runs on a store someone changed behind ironclaw's back.
        blocking(|| store.verify_audit(&master)).map_err(ServiceError::AuditBroken)?;
        if store.current_config()?.is_none() {
            Config::parse(&file_text).map_err(ServiceError::Bootstrap)?;
            crate::gateway::policy::check_bootstrap(&file_text)
                .map_err(|denial| ServiceError::Bootstrap(denial.into()))?;
        }
        let version = store.bootstrap_config(&file_text, now_secs())?;
        if !store.version_recorded(&version)? {
            return Err(ServiceError::UnrecordedVersion(version.version));
        }
        let config = Config::parse(&version.text).map_err(|source| ServiceError::Config {
            version: version.version,
            source,
        })?;
        let settings = sandbox_settings(&config, &state);
        let runtime: Arc<dyn Runtime> = match config.sandbox.runtime {
            RuntimeChoice::Gvisor => {
                let runsc = config
                    .sandbox
                    .runsc
                    .clone()
                    .unwrap_or_else(|| "runsc".into());
                let layout = layout::Layout::new(&settings.state_dir, &settings.run_dir);
                let runtime = RunscRuntime::private(runsc, &layout).map_err(ServiceError::Netns)?;
                Arc::new(runtime)
            }
            RuntimeChoice::Host => {
                tracing::warn!(
                    "sandbox.runtime = \"host\": agents run WITHOUT isolation (development only)"
                );
                Arc::new(HostRuntime)
            }
        };
        let provider = Arc::new(provider(&config)?);
        if !settings.agent_binary.is_file() {
            return Err(ServiceError::NoAgent(settings.agent_binary));
        }
        crate::sandbox::agent_binary::require_static(&settings.agent_binary)?;
        let lost = store.recover_in_flight(now_secs())?;
        if lost > 0 {
            tracing::warn!(
                count = lost,
                "replies in flight at the last stop are dead-lettered, not resent"
            );
        }
        store.record(
            AuditEvent::ServiceStarted,
            &json!({ "provider": provider.name(), "config_version": version.version }),
            now_secs(),
        )?;
        let (manager, sandbox_events) =
            blocking(|| Manager::new(runtime, settings)).map_err(ServiceError::Manager)?;
        let started_with = Arc::new(config.clone());
        let service = Arc::new(Service {
            effective: std::sync::RwLock::new(Arc::new(Effective {
                config: Arc::new(config),
                version: version.version,
                text: version.text,
            })),
            master,
            store: std::sync::Mutex::new(store),
            manager,
            started_at: now_secs(),
            provider: std::sync::RwLock::new(provider),
            limits: ProxyLimits::default(),
            rate: std::sync::Mutex::new(RateLimit::default()),
            refused_peers: std::sync::Mutex::new(RateLimit::default()),
            refused_messages: std::sync::Mutex::new(RateLimit::default()),
            prompts: tokio::sync::Notify::new(),
            files: tokio::sync::Notify::new(),
            web_clients: crate::web::fetch::Clients::default(),
            applying: tokio::sync::Mutex::new(()),
            live: std::sync::Mutex::new(HashMap::new()),
            creating: std::sync::Mutex::new(()),
            deleting: std::sync::Mutex::new(std::collections::HashSet::new()),
            outbound: watch::channel(0).0,
            tasks: std::sync::Mutex::new(Vec::new()),
            config_file,
            started_with,
        });
        let supervisor = service.manager.supervise(Duration::from_millis(500));
        let events = tokio::spawn(sandbox_events_loop(
            Arc::downgrade(&service),
            sandbox_events,
        ));
        service.tasks().extend([supervisor, events]);
        service.check_drift(&file_text);
        // Recovery first, then the sweeper: the two would otherwise publish the same
        // sessions at once.
        service.recover().await;
        let sweeper = tokio::spawn(sweep_loop(Arc::downgrade(&service)));
        service.tasks().push(sweeper);
        Ok(service)
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the store, off the async workers. Private to the service: channels
    /// and the operator interfaces go through its methods (see `calls.rs`).
    fn db<T>(&self, f: impl FnOnce(&mut Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
        blocking(|| f(&mut self.store.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// The approved configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.effective().config.clone()
    }

    /// The approved configuration in force now, with its version and text.
    pub fn effective(&self) -> Arc<Effective> {
        self.effective
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wakes whoever waits for replies.
    pub fn outbound_changed(&self) {
        self.outbound.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever replies are queued.
    pub fn watch_outbound(&self) -> watch::Receiver<u64> {
        self.outbound.subscribe()
    }

    /// After a restart: publish again any segment the store says was published but
    /// whose file is missing, start sessions with unanswered messages, and publish what
    /// was received but not yet published.
    async fn recover(self: &Arc<Self>) {
        let sessions = match self.db(|s| s.session_names()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "listing sessions for recovery failed");
                return;
            }
        };
        for id in sessions {
            let published = match self.db(|s| s.published(&id)) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(session = %id, error = %e, "reading published messages failed");
                    continue;
                }
            };
            if published.is_empty() {
                continue;
            }
            let live = match self.ensure_live(&id) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(session = %id, error = %e, "recovering a session failed");
                    continue;
                }
            };
            let _order = live.publish.lock().await;
            for (seq, batch) in &published {
                let path = self.manager.layout().inbox(&id).join(seq.file_name());
                if !path.exists()
                    && let Err(e) = self.write_segment(&id, &live.keys, *seq, batch)
                {
                    tracing::error!(session = %id, error = %e, "republishing a segment failed");
                }
                live.signal.published(*seq);
            }
            self.run_sandbox(&id, &live).await;
        }
        self.publish_all_received().await;
    }

    async fn publish_all_received(self: &Arc<Self>) {
        match self.db(|s| s.sessions_with_received()) {
            Ok(ids) => {
                for id in ids {
                    self.publish(&id).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "listing sessions with waiting messages failed"),
        }
    }

    /// The one way in for everything a channel receives: a message for a session is
    /// stored first (with the channel's cursor, if any, in the same transaction), then
    /// published; a message the channel refused by its own rules is recorded (metadata
    /// only) with its notice, if one is due; a cursor on its own just moves. A refused
    /// arrival seen before comes back as [`Accepted::Duplicate`]; one beyond the
    /// refusals recorded a minute for its chat is counted, not recorded, and comes back
    /// as [`Accepted::Counted`] (its cursor still moves).
    pub async fn receive(
        self: &Arc<Self>,
        arrival: Arrival<'_>,
        cursor: Option<Cursor<'_>>,
    ) -> Result<Accepted, ServiceError> {
        let now = now_secs();
        let (session, inbound, max_sessions) = match arrival {
            Arrival::Message {
                session,
                inbound,
                max_sessions,
            } => (session, inbound, max_sessions),
            Arrival::Refused(refusal) => {
                if !self.record_refusal(&refusal, now) {
                    if let Some(c) = cursor {
                        self.db(|s| s.set_cursor(c))?;
                    }
                    return Ok(Accepted::Counted);
                }
                let recorded = self.db(|s| s.refuse(&refusal, cursor, now))?;
                return Ok(match recorded {
                    Some(id) => {
                        if refusal.notice.is_some() {
                            self.outbound_changed();
                        }
                        Accepted::Refused(id)
                    }
                    None => Accepted::Duplicate,
                });
            }
            Arrival::Nothing => {
                if let Some(c) = cursor {
                    self.db(|s| s.set_cursor(c))?;
                }
                return Ok(Accepted::Duplicate);
            }
        };
        let row = self
            .db(|s| s.bind_within(session, &inbound.channel, &inbound.chat, now, max_sessions))?
            .ok_or(ServiceError::TooManyChats)?;
        if row.channel != inbound.channel || row.chat != inbound.chat {
            return Err(ServiceError::WrongChannel {
                session: session.clone(),
                channel: row.channel,
            });
        }
        let max = self.config().delivery.max_waiting_per_session;
        let accepted = self.db(|s| s.accept(session, inbound, max, notice::TOO_MANY, cursor))?;
        match accepted {
            Accepted::Stored(_) => {
                self.person_wrote(session, &inbound.text);
                if !inbound.files.is_empty() {
                    self.files.notify_waiters();
                }
                // Also for a message waiting for its files: the sandbox starts meanwhile.
                self.publish(session).await;
            }
            Accepted::Refused(_) => self.outbound_changed(),
            Accepted::Duplicate | Accepted::Counted => {}
        }
        Ok(accepted)
    }

    /// Publishes every received message of `session` and makes sure its sandbox runs.
    /// Failures end in the store (messages failed with a notice), never in the caller.
    pub async fn publish(self: &Arc<Self>, id: &SessionId) {
        let live = match self.ensure_live(id) {
            Ok(l) => l,
            Err(ServiceError::Deleting(_)) => return,
            Err(e) => {
                tracing::error!(session = %id, error = %e, "a session could not be prepared");
                self.fail_session(id, "the session could not be prepared", notice::UNAVAILABLE);
                return;
            }
        };
        // Held until the sandbox runs: segments appear in seq order, and a deletion
        // (which takes this lock) never races a start.
        let _order = live.publish.lock().await;
        if live.deleted.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        loop {
            let batch = match self.db(|s| s.take_batch(id, now_secs())) {
                Ok(Some(b)) => b,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(session = %id, error = %e, "taking messages to publish failed");
                    return;
                }
            };
            let (seq, msgs) = batch;
            if let Err(e) = self.write_segment(id, &live.keys, seq, &msgs) {
                tracing::error!(session = %id, error = %e, "publishing an inbox segment failed");
                self.fail_session(id, "publishing failed", notice::UNAVAILABLE);
                return;
            }
            live.signal.published(seq);
        }
        self.run_sandbox(id, &live).await;
    }

    async fn run_sandbox(&self, id: &SessionId, live: &Live) {
        match self.manager.ensure_running(id, &live.keys).await {
            Ok(()) => {}
            // Repeated crashes: the person is told now rather than after the timeout.
            Err(ManagerError::Paused(_)) => self.fail_session(
                id,
                "the session is paused after repeated crashes",
                notice::UNAVAILABLE,
            ),
            // Every sandbox slot is taken by a session with a message within the reply
            // timeout.
            Err(e @ ManagerError::Full { .. }) => {
                tracing::warn!(session = %id, error = %e, "no sandbox slot is free; raise sandbox.max_live if this recurs");
                self.fail_session(id, "every sandbox slot was busy", notice::BUSY)
            }
            // A failed launch counts as a crash: the supervisor retries with backoff and
            // pauses the session (failing its messages) if it keeps failing.
            Err(e) => {
                tracing::warn!(session = %id, error = %e, "the sandbox could not be started; the supervisor retries")
            }
        }
    }

    fn fail_session(&self, id: &SessionId, reason: &str, text: &str) {
        match self.db(|s| s.fail_waiting(id, reason, text, now_secs())) {
            Ok(n) if n > 0 => self.outbound_changed(),
            Ok(_) => {}
            Err(e) => tracing::error!(session = %id, error = %e, "failing waiting messages failed"),
        }
    }

    fn write_segment(
        &self,
        id: &SessionId,
        keys: &SessionKeys,
        seq: Seq,
        msgs: &[Waiting],
    ) -> Result<(), ServiceError> {
        // Every segment carries the approved agent configuration, so a fresh sandbox
        // never answers with another one.
        let effective = self.effective();
        let mut items = vec![InboxItem::AgentConfig(
            effective.config.agent_config(effective.version),
        )];
        // The person's local time, worked out here: the sandbox has no tz database.
        let zone = &self.session_zone(id);
        let local_time = crate::clock::local_time(zone, jiff::Timestamp::now());
        for m in msgs {
            // A message's files come before it, so the agent has them for its turn.
            let files = if m.files > 0 {
                self.db(|s| s.ready_files(m.id))
                    .map_err(ServiceError::Store)?
            } else {
                Vec::new()
            };
            if files
                .iter()
                .any(|f| f.kind == queue_proto::items::AttachmentKind::Document)
            {
                self.db(|s| s.taint(id, "a document the person sent", now_secs()))
                    .map_err(ServiceError::Store)?;
            }
            items.extend(files::attachment_items(m.id as u64, &files));
            items.push(InboxItem::UserMessage(UserMessage {
                message_id: m.id as u64,
                received_at: m.received_at,
                text: m.text.clone(),
                local_time: local_time.clone(),
                time_zone: zone.clone(),
                attachments: files.len() as u8,
            }));
        }
        let writer = InboxWriter::new(self.manager.layout().inbox(id), id.clone(), keys);
        blocking(|| writer.publish(seq, &items))
            .map(|_| ())
            .map_err(|source| ServiceError::Publish {
                session: id.clone(),
                source: Box::new(source),
            })
    }

    /// The live parts of `id`, started if needed: directories, keys, the proxy on its
    /// socket, and the consumer of its events.
    fn ensure_live(self: &Arc<Self>, id: &SessionId) -> Result<Arc<Live>, ServiceError> {
        if let Some(l) = self.live_map().get(id) {
            return Ok(l.clone());
        }
        // One creator at a time: two would each bind the socket, and the loser's
        // unlink would leave the winner listening on a name nobody can reach.
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if self.deleting().contains(id) {
            return Err(ServiceError::Deleting(id.clone()));
        }
        if let Some(l) = self.live_map().get(id) {
            return Ok(l.clone());
        }
        let row = self
            .db(|s| s.session(id))?
            .ok_or_else(|| ServiceError::NoSession(id.clone()))?;
        let keys = derive_session_keys(&self.master, id, &row.salt);
        let layout = self.manager.layout();
        let settings = self.manager.settings();
        let prepare = |source| ServiceError::Prepare {
            session: id.clone(),
            source,
        };
        let listener = blocking(|| -> std::io::Result<tokio::net::UnixListener> {
            let (uid, gid) = settings.ids_for(layout, id)?;
            layout::prepare_session(layout, id, uid, gid)?;
            let sock = runsc_config::socket_path(&layout.socket_dir(id));
            match std::fs::remove_file(&sock) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            let listener = std::os::unix::net::UnixListener::bind(&sock)?;
            std::os::unix::fs::chown(&sock, Some(uid), Some(gid))?;
            listener.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(listener)
        })
        .map_err(prepare)?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let outbox = OutboxReader::new(layout.outbox(id), layout.private(id), id.clone(), &keys);
        let (proxy, signal) = SessionProxy::new(
            id.clone(),
            layout.inbox(id),
            outbox,
            self.provider(),
            self.config().budgets(),
            self.limits.wait_timeout,
            Outlets {
                intake: Arc::new(ServiceIntake(Arc::downgrade(self))),
                events: tx,
            },
        );
        let proxy = proxy.accepts_images(self.config().model.accepts_images);
        // The day's model budget goes on from what this session already used.
        let (tokens, bytes) = self
            .db(|s| s.usage_today(id, usage::MODEL, now_secs()))
            .unwrap_or_default();
        let proxy = proxy.spent_today(tokens, bytes);
        let server = tokio::spawn(serve(listener, id.clone(), Arc::new(proxy), self.limits));
        let consumer = tokio::spawn(session_events_loop(Arc::downgrade(self), rx));
        let live = Arc::new(Live {
            keys,
            signal,
            publish: tokio::sync::Mutex::new(()),
            deleted: std::sync::atomic::AtomicBool::new(false),
            tasks: vec![server, consumer],
        });
        self.live_map().insert(id.clone(), live.clone());
        Ok(live)
    }

    fn deleting(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<SessionId>> {
        self.deleting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live_map(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every session's counts.
    pub fn sessions(&self) -> Result<Vec<SessionSummary>, ServiceError> {
        Ok(self.db(|s| s.summaries())?)
    }

    /// Deletes a session: stop its sandbox and proxy, destroy its salt (so its keys can
    /// never be derived again), remove its files.
    pub async fn delete_session(&self, id: &SessionId) -> Result<SessionSummary, ServiceError> {
        if self.db(|s| s.session(id))?.is_none() {
            return Err(ServiceError::NoSession(id.clone()));
        }
        {
            let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
            if !self.deleting().insert(id.clone()) {
                return Err(ServiceError::Deleting(id.clone()));
            }
        }
        // Unmarked however deletion ends, a panic or a cancelled caller included.
        let _unmark = Unmark(self, id.clone());
        self.delete_marked(id).await
    }

    async fn delete_marked(&self, id: &SessionId) -> Result<SessionSummary, ServiceError> {
        // No publish is under way once this lock is ours, and none starts the sandbox
        // again afterwards.
        let live = self.live_map().get(id).cloned();
        let _order = match &live {
            Some(l) => {
                let guard = l.publish.lock().await;
                l.deleted.store(true, std::sync::atomic::Ordering::SeqCst);
                Some(guard)
            }
            None => None,
        };
        if let Err(e) = self.manager.forget(id).await {
            tracing::warn!(session = %id, error = %e, "stopping a deleted session's sandbox failed");
        }
        self.live_map().remove(id);
        let summary = self
            .db(|s| s.delete_session(id, now_secs()))?
            .ok_or_else(|| ServiceError::NoSession(id.clone()))?;
        let layout = self.manager.layout();
        if let Err(e) = blocking(|| layout::release_outbox(layout, id)) {
            tracing::warn!(session = %id, error = %e, "unmounting a deleted session's outbox failed");
        }
        for dir in [layout.session_dir(id), layout.socket_dir(id)] {
            if let Err(e) = blocking(|| std::fs::remove_dir_all(&dir))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(session = %id, error = %e, "removing a deleted session's files failed");
            }
        }
        self.outbound_changed();
        // Deleted is deleted only once the old pages are out of the log as well: a log
        // held by another reader is folded at the next checkpoint, and the operator is
        // told (the deletion itself is done).
        if let Err(e) = self.db(|s| s.fold_wal()) {
            tracing::warn!(session = %id, error = %e, "the deleted session's old pages stay in the control store's log until its next checkpoint");
        }
        Ok(summary)
    }

    /// Stops every sandbox and task, for shutdown.
    pub async fn shutdown(&self) {
        for t in self.tasks().drain(..) {
            t.abort();
        }
        self.manager.stop_all().await;
        self.live_map().clear();
        self.flush_rate_limits(i64::MAX);
        let _ = self.db(|s| s.record(AuditEvent::ServiceStopped, &json!({}), now_secs()));
    }

    /// Stores an outbox segment's items with the turn it ends, then files the change
    /// requests among them and wakes the delivery workers.
    fn take_outbox(
        &self,
        session: &SessionId,
        seq: Seq,
        items: &[OutboxItem],
        mut turn: TurnSummary,
    ) -> Result<Taken, NotStored> {
        turn.add_items(items);
        let ingested = self.db(|s| s.ingest(session, seq, items, &turn, now_secs()));
        let done = ingested.map_err(|e| {
            tracing::error!(session = %session, error = %e, "storing an outbox segment failed");
            NotStored
        })?;
        if done.duplicate {
            return Ok(Taken::Duplicate);
        }
        self.file_outbox_requests(session, items);
        if done.dropped_replies > 0 {
            tracing::warn!(session = %session, count = done.dropped_replies,
                "replies to unknown or settled messages were dropped");
        }
        if done.replies > 0 || done.timers > 0 {
            self.outbound_changed();
        }
        self.prune_inbox(session);
        Ok(Taken::Stored)
    }

    /// Records what a session's proxy reported for the audit trail.
    fn on_session_event(&self, event: SessionEvent) {
        match event {
            SessionEvent::ModelCall {
                session,
                provider,
                input_tokens,
                output_tokens,
                tokens_charged,
                bytes_sent,
            } => {
                let used = |s: &mut Store| {
                    s.add_usage(
                        &session,
                        usage::MODEL,
                        now_secs(),
                        tokens_charged,
                        bytes_sent,
                    )
                };
                if let Err(e) = self.db(used) {
                    tracing::warn!(session = %session, error = %e, "recording a model call's use failed");
                }
                self.audit(AuditEvent::ModelCall, json!({ "session": session.as_str(), "provider": provider,
                    "input_tokens": input_tokens, "output_tokens": output_tokens, "bytes": bytes_sent }));
            }
            SessionEvent::ModelFailed { session, reason } => {
                tracing::warn!(session = %session, cause = %reason,
                    "a model call failed; check [model] (provider, base_url, model, api_key_file) and that the provider answers");
                self.audit(
                    AuditEvent::ModelFailed,
                    json!({ "session": session.as_str(), "reason": reason }),
                );
            }
            SessionEvent::Refused {
                session,
                what,
                detail,
            } => {
                let detail: String = detail.chars().take(256).collect();
                self.audit(
                    AuditEvent::ProxyRefused,
                    json!({ "session": session.as_str(), "what": what, "detail": detail }),
                );
            }
        }
    }

    /// Removes inbox segments whose messages are all settled, so a session's inbox
    /// holds only what its agent may still need.
    fn prune_inbox(&self, id: &SessionId) {
        let needed = match self.db(|s| s.inbox_needed_from(id)) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(session = %id, error = %e, "reading the inbox low-water mark failed");
                return;
            }
        };
        let dir = self.manager.layout().inbox(id);
        blocking(|| {
            for seq in queue_proto::control::list_inbox(&dir).unwrap_or_default() {
                if seq >= needed {
                    break;
                }
                if let Err(e) = std::fs::remove_file(dir.join(seq.file_name())) {
                    tracing::warn!(session = %id, error = %e, "removing a settled inbox segment failed");
                }
            }
        });
    }

    pub(crate) fn audit(&self, kind: AuditEvent, detail: serde_json::Value) {
        if let Err(e) = self.db(|s| s.record(kind, &detail, now_secs())) {
            tracing::error!(kind = %kind, error = %e, "writing an audit entry failed");
        }
    }

    async fn on_sandbox_event(&self, event: Event) {
        match event {
            Event::Started { session } => self.audit(
                AuditEvent::SandboxStarted,
                json!({ "session": session.as_str() }),
            ),
            Event::Ended { session, exit } => {
                self.audit(
                    AuditEvent::SandboxEnded,
                    json!({ "session": session.as_str(), "exit": format!("{exit:?}") }),
                );
                if exit == Exit::KilledByLimit {
                    self.fail_session(&session, "the sandbox was killed by a limit", notice::LIMIT);
                }
            }
            Event::GaveUp { session } => {
                self.audit(
                    AuditEvent::SandboxPaused,
                    json!({ "session": session.as_str() }),
                );
                self.fail_session(
                    &session,
                    "the sandbox crashed repeatedly",
                    notice::UNAVAILABLE,
                );
            }
        }
    }

    async fn sweep(self: &Arc<Self>) {
        let now = now_secs();
        let timeout = self.config().reply_timeout().as_secs() as i64;
        let mut changed = false;
        match self.db(|s| s.expire(now - timeout, notice::TIMEOUT, now)) {
            Ok(n) => changed |= n > 0,
            Err(e) => tracing::error!(error = %e, "expiring unanswered messages failed"),
        }
        match self.db(|s| s.fire_timers(now)) {
            Ok(n) => changed |= n > 0,
            Err(e) => tracing::error!(error = %e, "firing timers failed"),
        }
        if let Err(e) = self.db(|s| s.drop_settled_files()) {
            tracing::error!(error = %e, "removing the files of settled messages failed");
        }
        if changed {
            self.outbound_changed();
        }
        self.flush_rate_limits(now);
        match self.db(|s| s.expire_changes(now)) {
            Ok(n) if n > 0 => self.prompts.notify_one(),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "expiring change requests failed"),
        }
        self.publish_all_received().await;
    }
}

/// The service as a session proxy's intake.
struct ServiceIntake(std::sync::Weak<Service>);

impl Intake for ServiceIntake {
    async fn outbox(
        &self,
        session: &SessionId,
        seq: Seq,
        items: Vec<OutboxItem>,
        turn: TurnSummary,
    ) -> Result<Taken, NotStored> {
        let service = self.0.upgrade().ok_or(NotStored)?;
        // A session being deleted takes nothing more in.
        if service.deleting().contains(session) {
            return Err(NotStored);
        }
        service.take_outbox(session, seq, &items, turn)
    }

    async fn change_request(
        &self,
        session: &SessionId,
        request: ChangeRequest,
    ) -> Option<ChangeId> {
        let service = self.0.upgrade()?;
        if service.deleting().contains(session) {
            return None;
        }
        service.file_agent_change(session, &request)
    }

    async fn transcribe(
        &self,
        session: &SessionId,
        request: TranscriptionRequest,
    ) -> Option<TranscriptionAnswer> {
        let service = self.0.upgrade()?;
        if service.deleting().contains(session) {
            return None;
        }
        service.transcribe(session, request).await
    }

    async fn web(&self, session: &SessionId, call: WebCall) -> Option<WebAnswer> {
        let service = self.0.upgrade()?;
        if service.deleting().contains(session) {
            return None;
        }
        service.web(session, call).await
    }

    async fn reminders(&self, session: &SessionId, call: ReminderCall) -> Option<ReminderReply> {
        let service = self.0.upgrade()?;
        if service.deleting().contains(session) {
            return None;
        }
        service.reminder_call(session, call)
    }
}

async fn session_events_loop(
    service: std::sync::Weak<Service>,
    mut rx: mpsc::Receiver<SessionEvent>,
) {
    while let Some(event) = rx.recv().await {
        let Some(s) = service.upgrade() else { return };
        s.on_session_event(event);
    }
}

async fn sandbox_events_loop(
    service: std::sync::Weak<Service>,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    while let Some(event) = rx.recv().await {
        let Some(s) = service.upgrade() else { return };
        s.on_sandbox_event(event).await;
    }
}

async fn sweep_loop(service: std::sync::Weak<Service>) {
    let mut interval = tokio::time::interval(SWEEP_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(s) = service.upgrade() else { return };
        s.sweep().await;
    }
}
