//! The bootstrap configuration, `<state-dir>/config.toml`: parsed into closed types
//! (unknown keys are errors, so a typo never silently means "default"), with the safe
//! defaults `ironclaw init` writes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use queue_proto::items::{AgentConfig, MAX_INSTRUCTIONS_BYTES, ToolName};
use serde::Deserialize;

use crate::model::http::{ApprovedEndpoint, EndpointError};
use crate::operator::Identity;
use crate::proxy::budget::Budgets;

/// The largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 256 * 1024;

/// Why a configuration was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the configuration {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration {path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the configuration {} is not valid{}: {message}", shown(path), at.map_or(String::new(), |(l, c)| format!(" at line {l}, column {c}")))]
    Parse {
        path: PathBuf,
        message: String,
        /// Line and column (from 1) where the parser stopped.
        at: Option<(usize, usize)>,
    },
    #[error("{key} is not an approved endpoint")]
    Endpoint {
        key: &'static str,
        #[source]
        source: EndpointError,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The line and column (from 1) of byte `offset` of `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Where the key `dotted` (`sandbox.memory_mib`) is set in `text`, as line and column
/// (from 1): the key of a `key = value` line under its table's header, or the header of
/// a table of that name.
pub fn locate_key(text: &str, dotted: &str) -> Option<(usize, usize)> {
    let mut table = String::new();
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let column = line.len() - trimmed.len() + 1;
        if let Some(header) = trimmed.strip_prefix('[') {
            table = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
                .split('.')
                .map(|p| p.trim().trim_matches('"'))
                .collect::<Vec<_>>()
                .join(".");
            if table == dotted {
                return Some((n + 1, column));
            }
            continue;
        }
        let Some((key, _)) = trimmed.split_once('=') else {
            continue;
        };
        let key = key.trim().trim_matches('"');
        let full = if table.is_empty() {
            key.to_owned()
        } else {
            format!("{table}.{key}")
        };
        if full == dotted {
            return Some((n + 1, column));
        }
    }
    None
}

impl ConfigError {
    /// What is wrong, without where (for a message that gives the place itself).
    pub fn what(&self) -> String {
        match self {
            ConfigError::Parse { message, .. } => message.clone(),
            other => crate::error_chain(other),
        }
    }

    /// Where in `text` the problem is, as line and column (from 1), when it can be
    /// told: where the parser stopped, or the line of the key a check names.
    pub fn position(&self, text: &str) -> Option<(usize, usize)> {
        match self {
            ConfigError::Parse { at, .. } => *at,
            ConfigError::Endpoint { key, .. } => locate_key(text, key),
            ConfigError::Invalid(message) => {
                let key = message.split_whitespace().next()?;
                let key = key.trim_end_matches([',', ':']);
                // A key that is missing is placed at its table.
                let mut candidate = Some(key);
                while let Some(k) = candidate.filter(|k| k.contains('.')) {
                    if let Some(at) = locate_key(text, k) {
                        return Some(at);
                    }
                    candidate = k.rsplit_once('.').map(|(parent, _)| parent);
                }
                candidate.and_then(|k| locate_key(text, k))
            }
            ConfigError::Read { .. } | ConfigError::TooLarge { .. } => None,
        }
    }
}

/// A path for a message, or "text" when the text came from elsewhere.
fn shown(path: &Path) -> String {
    if path.as_os_str().is_empty() {
        "text".into()
    } else {
        path.display().to_string()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub sandbox: SandboxSection,
    #[serde(default)]
    pub budgets: BudgetSection,
    #[serde(default)]
    pub delivery: DeliverySection,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub channels: Channels,
    #[serde(default)]
    pub operators: Operators,
    /// The admin HTTP API and its approval page; absent = off.
    #[serde(default)]
    pub admin_api: Option<AdminApiConfig>,
    #[serde(default)]
    pub attachments: AttachmentsSection,
    /// Where voice notes are transcribed; absent = a voice note gets a fixed notice.
    #[serde(default)]
    pub transcription: Option<TranscriptionConfig>,
    /// The brokered web; absent = web tools off.
    #[serde(default)]
    pub web: Option<WebConfig>,
}

/// The web search backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchKind {
    Searxng,
    Brave,
}

/// Search and fetch, brokered by the control plane.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    pub search: SearchKind,
    /// SearXNG's base URL, or Brave's API base; the endpoint rule of `[model]`.
    pub search_url: String,
    /// Brave's subscription token, added by the control plane.
    #[serde(default)]
    pub search_key_file: Option<PathBuf>,
    /// Operator-granted URL prefixes an agent may fetch under without having been shown
    /// the URL.
    #[serde(default)]
    pub allowed_prefixes: Vec<String>,
    /// An extra trusted CA (tests); `doctor` flags it.
    #[serde(default)]
    pub tls_extra_ca_file: Option<PathBuf>,
    /// Names answered without DNS (tests); `doctor` flags them.
    #[serde(default)]
    pub test_hosts: std::collections::BTreeMap<String, std::net::IpAddr>,
    #[serde(default = "web_requests_per_day")]
    pub requests_per_day: u32,
    #[serde(default = "web_bytes_per_day")]
    pub bytes_per_day: u64,
}

fn web_requests_per_day() -> u32 {
    200
}

fn web_bytes_per_day() -> u64 {
    50 * 1024 * 1024
}

/// What files the person may send.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttachmentsSection {
    /// Largest file, in bytes (Telegram's own download limit by default).
    pub max_bytes: u64,
    /// Most files with one message.
    pub max_per_message: u8,
}

impl Default for AttachmentsSection {
    fn default() -> Self {
        AttachmentsSection {
            max_bytes: 20 * 1024 * 1024,
            max_per_message: 10,
        }
    }
}

/// An OpenAI-compatible `POST /v1/audio/transcriptions` endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TranscriptionConfig {
    pub provider: TranscriptionProvider,
    pub base_url: String,
    pub model: String,
    /// A bearer key, injected by the control plane.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TranscriptionProvider {
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Anthropic,
    Openai,
    Demo,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub provider: ProviderKind,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Photos go to the model as images; only for a model that accepts them.
    #[serde(default)]
    pub accepts_images: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    pub instructions: String,
    pub tools: Vec<ToolName>,
    pub max_steps_per_turn: u32,
    /// The person's IANA time zone: each turn tells the model the local time in it.
    pub timezone: String,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            instructions: "You are a careful personal assistant. Answer the person through the \
                reply tool. Keep notes of what they ask you to remember."
                .into(),
            tools: vec![
                ToolName::Reply,
                ToolName::NoteWrite,
                ToolName::NoteRead,
                ToolName::NoteList,
                ToolName::Schedule,
                ToolName::RequestChange,
                ToolName::NoteSearch,
                ToolName::NoteDelete,
                ToolName::ReminderList,
                ToolName::ReminderCancel,
                ToolName::NoteSend,
            ],
            max_steps_per_turn: 8,
            timezone: "UTC".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeChoice {
    Gvisor,
    Host,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSection {
    pub runtime: RuntimeChoice,
    pub memory_mib: u64,
    /// The size of each session's own outbox file system, where its agent keeps its
    /// notes and history and writes its segments.
    pub outbox_mib: u64,
    /// The first of the uids (and gids) each session's agent is given one of.
    pub uid_base: u32,
    pub idle_stop_secs: u64,
    /// The most sandboxes that run at once, over every channel and session.
    pub max_live: usize,
    /// The static agent binary; by default `ironclaw-agent` next to `ironclaw`.
    pub agent_binary: Option<PathBuf>,
    /// The `runsc` binary; by default found on `PATH`.
    pub runsc: Option<PathBuf>,
}

impl Default for SandboxSection {
    fn default() -> Self {
        SandboxSection {
            runtime: RuntimeChoice::Gvisor,
            memory_mib: 256,
            outbox_mib: 64,
            uid_base: 200_000,
            idle_stop_secs: 600,
            max_live: 32,
            agent_binary: None,
            runsc: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetSection {
    pub requests_per_minute: u32,
    pub tokens_per_day: u64,
    pub bytes_per_day: u64,
}

impl Default for BudgetSection {
    fn default() -> Self {
        let b = Budgets::default();
        BudgetSection {
            requests_per_minute: b.requests_per_minute,
            tokens_per_day: b.tokens_per_day,
            bytes_per_day: b.bytes_per_day,
        }
    }
}

/// How long a message may wait for an answer, and how hard delivery is tried.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// A message published to an agent and unanswered this long fails, with a notice.
    pub reply_timeout_secs: u64,
    /// Messages waiting for an agent per session; more are refused with a notice.
    pub max_waiting_per_session: u32,
    /// Attempts to hand a reply to a chat app before it is dead-lettered.
    pub max_delivery_attempts: u32,
}

impl Default for DeliverySection {
    fn default() -> Self {
        DeliverySection {
            reply_timeout_secs: 300,
            max_waiting_per_session: 50,
            max_delivery_attempts: 8,
        }
    }
}

/// How long change requests wait for a decision, and how many one requester may have.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// A change request not decided within this many seconds expires.
    pub request_ttl_secs: u64,
    /// Undecided change requests one requester may have at once; more are refused.
    pub max_pending_per_requester: u32,
    /// Change requests one agent may file a minute; more are refused unfiled and
    /// recorded as a count.
    pub max_requests_per_minute: u32,
    /// The highest risk a change may have and still be approved with a Telegram
    /// button. Telegram's server vouches for who pressed it, and that server is not
    /// ours: riskier changes are approved with the CLI or on the approval page.
    pub telegram_max_risk: f64,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            request_ttl_secs: 86_400,
            max_pending_per_requester: 5,
            max_requests_per_minute: 20,
            telegram_max_risk: 0.7,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channels {
    pub telegram: Option<TelegramConfig>,
    pub bridge: Option<BridgeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    pub token_file: PathBuf,
    #[serde(default = "default_telegram_api")]
    pub api_base: String,
    pub allowed_users: Vec<i64>,
    /// Seconds a `getUpdates` call is held open by Telegram.
    #[serde(default = "default_poll_secs")]
    pub poll_timeout_secs: u64,
}

fn default_telegram_api() -> String {
    "https://api.telegram.org".into()
}
fn default_poll_secs() -> u64 {
    30
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Loopback or a Tailscale address only.
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    /// Chats (each a session, and a sandbox while live) the bridge may open; a message
    /// for a new chat beyond them is refused with 429.
    #[serde(default = "default_max_chats")]
    pub max_chats: u32,
}

fn default_max_chats() -> u32 {
    64
}

/// The admin HTTP API: reachable only over Tailscale, by configured operators.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminApiConfig {
    /// This machine's Tailscale address and a port.
    pub listen: SocketAddr,
    /// Other names the API answers to (the machine's MagicDNS name, say); a request
    /// naming any other host is refused, so a web page cannot rebind a name of its own
    /// to this address.
    #[serde(default)]
    pub host_names: Vec<String>,
    /// tailscaled's LocalAPI socket, asked who every peer is.
    #[serde(default = "default_tailscaled_socket")]
    pub tailscaled_socket: PathBuf,
}

fn default_tailscaled_socket() -> PathBuf {
    PathBuf::from(crate::tailnet::DEFAULT_SOCKET)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operators {
    #[serde(default)]
    pub telegram: Vec<i64>,
    #[serde(default = "root_only")]
    pub unix_uids: Vec<u32>,
    #[serde(default)]
    pub tailnet: Vec<String>,
}

impl Operators {
    /// Whether the configuration names exactly one operator, who is one person: one
    /// uid, one Telegram user or one tailnet login (a tag stands for many devices).
    pub fn sole(&self) -> bool {
        self.unix_uids.len() + self.telegram.len() + self.tailnet.len() == 1
            && !self.tailnet.iter().any(|t| t.starts_with("tag:"))
    }
}

fn root_only() -> Vec<u32> {
    vec![0]
}

impl Default for Operators {
    fn default() -> Self {
        Operators {
            telegram: Vec::new(),
            unix_uids: root_only(),
            tailnet: Vec::new(),
        }
    }
}

// Written here, beside the lists it reads, so that `operator` depends on nothing.
impl Identity {
    /// Whether the current configuration names this identity as an operator.
    pub fn is_operator(&self, config: &Config) -> bool {
        let o = &config.operators;
        match self {
            Identity::Unix(u) => o.unix_uids.contains(u),
            Identity::Telegram(t) => o.telegram.contains(t),
            Identity::Tailnet(l) => o.tailnet.iter().any(|x| x == l),
        }
    }
}

impl Config {
    /// Reads the text of `path` (at most [`MAX_CONFIG_BYTES`]) without checking it.
    pub fn read_text(path: &Path) -> Result<String, ConfigError> {
        use std::io::Read;
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        Ok(text)
    }

    /// Parses and checks configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.message().to_owned(),
            at: e.span().map(|s| line_column(text, s.start)),
        })?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        // Every endpoint the file names follows the one endpoint rule, used or not.
        let endpoint = |key, url: &str| {
            ApprovedEndpoint::parse(url).map_err(|source| ConfigError::Endpoint { key, source })
        };
        if let Some(base) = &self.model.base_url {
            endpoint("model.base_url", base)?;
        }
        match self.model.provider {
            ProviderKind::Demo => {}
            ProviderKind::Anthropic | ProviderKind::Openai => {
                if self.model.base_url.is_none() {
                    return invalid("model.base_url is required for this provider");
                }
                if self.model.model.as_deref().is_none_or(str::is_empty) {
                    return invalid("model.model is required for this provider");
                }
                if self.model.provider == ProviderKind::Anthropic
                    && self.model.api_key_file.is_none()
                {
                    return invalid("model.api_key_file is required for anthropic");
                }
            }
        }
        if let Some(t) = &self.transcription {
            endpoint("transcription.base_url", &t.base_url)?;
            if t.model.is_empty() || t.model.len() > 256 {
                return invalid("transcription.model must name the model, in at most 256 bytes");
            }
        }
        if let Some(w) = &self.web {
            endpoint("web.search_url", &w.search_url)?;
            if w.search == SearchKind::Brave && w.search_key_file.is_none() {
                return invalid("web.search_key_file is required for brave");
            }
            for p in &w.allowed_prefixes {
                let ok = url::Url::parse(p).is_ok_and(|u| {
                    u.scheme() == "https"
                        && u.host_str().is_some()
                        && u.username().is_empty()
                        && u.password().is_none()
                        && u.fragment().is_none()
                        && u.query().is_none()
                        && u.path().ends_with('/')
                        && p.ends_with('/')
                });
                if !ok {
                    return invalid(
                        "web.allowed_prefixes must be https URLs with a host and a path ending in /, without credentials, a query or a fragment",
                    );
                }
            }
            if w.requests_per_day == 0 || w.bytes_per_day == 0 {
                return invalid("web.requests_per_day and web.bytes_per_day must be at least 1");
            }
            if w.test_hosts.keys().any(|h| !host_name_ok(h)) {
                return invalid("web.test_hosts must map DNS names to addresses");
            }
        }
        if !(1..=24 * 1024 * 1024).contains(&self.attachments.max_bytes) {
            return invalid("attachments.max_bytes must be between 1 and 25165824 (24 MiB)");
        }
        if !(1..=32).contains(&self.attachments.max_per_message) {
            return invalid("attachments.max_per_message must be between 1 and 32");
        }
        if self.agent.instructions.len() > MAX_INSTRUCTIONS_BYTES {
            return invalid("agent.instructions is longer than 64 KiB");
        }
        if !(1..=64).contains(&self.agent.max_steps_per_turn) {
            return invalid("agent.max_steps_per_turn must be between 1 and 64");
        }
        if self.agent.timezone.len() > 64 || jiff::tz::TimeZone::get(&self.agent.timezone).is_err()
        {
            return invalid(
                "agent.timezone is not an IANA time zone name this machine's tz database knows (such as \"Europe/Berlin\" or \"UTC\")",
            );
        }
        if !self.agent.tools.contains(&ToolName::Reply) {
            return invalid("agent.tools must include \"reply\", or no answer can reach anyone");
        }
        if !(64..=65536).contains(&self.sandbox.memory_mib) {
            return invalid("sandbox.memory_mib must be between 64 and 65536");
        }
        if !(8..=65536).contains(&self.sandbox.outbox_mib) {
            return invalid("sandbox.outbox_mib must be between 8 and 65536");
        }
        if !(1..=1024).contains(&self.sandbox.max_live) {
            return invalid("sandbox.max_live must be between 1 and 1024");
        }
        if !(100_000..=2_000_000_000).contains(&self.sandbox.uid_base) {
            return invalid(
                "sandbox.uid_base must be between 100000 and 2000000000 (clear of the host's own users)",
            );
        }
        if self.sandbox.idle_stop_secs == 0 {
            return invalid("sandbox.idle_stop_secs must be at least 1");
        }
        if self.delivery.reply_timeout_secs == 0 || self.delivery.max_delivery_attempts == 0 {
            return invalid("delivery timeouts and attempts must be at least 1");
        }
        if self.delivery.max_waiting_per_session == 0 {
            return invalid("delivery.max_waiting_per_session must be at least 1");
        }
        if !(1..=30 * 86_400).contains(&self.gateway.request_ttl_secs) {
            return invalid("gateway.request_ttl_secs must be between 1 and 2592000 (30 days)");
        }
        if !(1..=1000).contains(&self.gateway.max_pending_per_requester) {
            return invalid("gateway.max_pending_per_requester must be between 1 and 1000");
        }
        if !(1..=100_000).contains(&self.gateway.max_requests_per_minute) {
            return invalid("gateway.max_requests_per_minute must be between 1 and 100000");
        }
        if !(0.0..=1.0).contains(&self.gateway.telegram_max_risk) {
            return invalid("gateway.telegram_max_risk must be between 0.0 and 1.0");
        }
        if let Some(t) = &self.channels.telegram {
            if t.allowed_users.is_empty() {
                return invalid(
                    "channels.telegram.allowed_users is empty: nobody could talk to the assistant",
                );
            }
            endpoint("channels.telegram.api_base", &t.api_base)?;
            if !(1..=50).contains(&t.poll_timeout_secs) {
                return invalid("channels.telegram.poll_timeout_secs must be between 1 and 50");
            }
        }
        if let Some(b) = &self.channels.bridge
            && !bridge_address_allowed(b.listen.ip())
        {
            return invalid("channels.bridge.listen must be a loopback or Tailscale address");
        }
        if let Some(b) = &self.channels.bridge
            && !(1..=10_000).contains(&b.max_chats)
        {
            return invalid("channels.bridge.max_chats must be between 1 and 10000");
        }
        if let Some(a) = &self.admin_api {
            let ip = a.listen.ip();
            if ip != ip.to_canonical() || !crate::tailnet::in_tailnet(ip) {
                return invalid(
                    "admin_api.listen must be this machine's Tailscale address (100.64.0.0/10 or fd7a:115c:a1e0::/48)",
                );
            }
            if self.operators.tailnet.is_empty() {
                return invalid(
                    "admin_api is on but operators.tailnet is empty: nobody could use it",
                );
            }
            if a.host_names.iter().any(|h| !host_name_ok(h)) {
                return invalid(
                    "admin_api.host_names must be DNS names (letters, digits, '-' and '.'), without a port",
                );
            }
        }
        Ok(())
    }

    /// The agent configuration sent to every sandbox, from approved version `version`.
    pub fn agent_config(&self, version: u64) -> AgentConfig {
        // The web tools come with an approved [web] section, and only with it.
        let mut tools: Vec<ToolName> = self
            .agent
            .tools
            .iter()
            .copied()
            .filter(|t| !matches!(t, ToolName::WebSearch | ToolName::WebFetch))
            .collect();
        if self.web.is_some() {
            tools.extend([ToolName::WebSearch, ToolName::WebFetch]);
        }
        AgentConfig {
            version,
            instructions: self.agent.instructions.clone(),
            tools,
            max_steps_per_turn: self.agent.max_steps_per_turn,
            accepts_images: self.model.accepts_images,
        }
    }

    pub fn budgets(&self) -> Budgets {
        Budgets {
            requests_per_minute: self.budgets.requests_per_minute,
            tokens_per_day: self.budgets.tokens_per_day,
            bytes_per_day: self.budgets.bytes_per_day,
        }
    }

    pub fn reply_timeout(&self) -> Duration {
        Duration::from_secs(self.delivery.reply_timeout_secs)
    }
}

/// A DNS name as it appears in a `Host` header, without the port.
fn host_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Loopback, or inside Tailscale's ranges (100.64.0.0/10, fd7a:115c:a1e0::/48), written
/// as itself (not an IPv4 address in IPv6 form).
pub fn bridge_address_allowed(ip: std::net::IpAddr) -> bool {
    ip == ip.to_canonical() && (ip.is_loopback() || crate::tailnet::in_tailnet(ip))
}

/// The file `ironclaw init` writes: the offline demo model, gVisor, the console channel
/// only, root as the one operator.
pub const DEFAULT_CONFIG: &str = r#"# IronClaw configuration (bootstrap). See README.md, "Configuration".
# Every key below is checked at start; an unknown key is an error.
# After the first start the approved version lives in the control store: an edit of
# this file changes nothing until an operator approves it (`ironclaw changes list`).

[model]
# "demo" is offline and scripted: every reply says it is not an AI.
# For Anthropic:
#   provider = "anthropic"
#   base_url = "https://api.anthropic.com"
#   model = "claude-sonnet-4-5"
#   api_key_file = "/etc/ironclaw/model.key"   # mode 0600; never enters a sandbox
# For an OpenAI-compatible server such as Ollama:
#   provider = "openai"
#   base_url = "http://127.0.0.1:11434"         # plain HTTP only to loopback or a Tailscale address
#   model = "llama3.1"
provider = "demo"

# [agent]
# timezone = "Europe/Berlin"   # the person's IANA time zone, for the time each turn is told; default "UTC"

[sandbox]
runtime = "gvisor"          # "gvisor" | "host" (development only, no isolation)
memory_mib = 256
outbox_mib = 64            # each session's own outbox file system (notes, history, segments)
idle_stop_secs = 600
max_live = 32               # sandboxes running at once; the longest idle one makes room

[delivery]
reply_timeout_secs = 300    # an unanswered message fails with a notice after this
max_waiting_per_session = 50
max_delivery_attempts = 8

[gateway]
request_ttl_secs = 86400     # a change request not decided within a day expires
max_pending_per_requester = 5
max_requests_per_minute = 20  # per agent; more are refused and counted
telegram_max_risk = 0.7       # riskier changes are approved with the CLI or the page, not a Telegram button

# [channels.telegram]
# token_file = "/etc/ironclaw/telegram.token"
# api_base = "https://api.telegram.org"
# allowed_users = [123456789]

# [channels.bridge]         # HTTP API for other chat apps
# listen = "127.0.0.1:8787" # loopback or a Tailscale address only
# token_file = "/etc/ironclaw/bridge.token"

[operators]
unix_uids = [0]
# telegram = [123456789]
# tailnet = ["alice@example.com"]    # a login name, or "tag:..." for a tagged device

# [admin_api]               # HTTP API and approval page, for operators.tailnet only
# listen = "100.101.102.103:8790"          # this machine's Tailscale address
# host_names = ["homebox.tail1234.ts.net"] # its MagicDNS name, if used in the browser
# tailscaled_socket = "/run/tailscale/tailscaled.sock"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_parses_to_the_demo_model_under_gvisor() {
        let c = Config::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(c.model.provider, ProviderKind::Demo);
        assert_eq!(c.sandbox.runtime, RuntimeChoice::Gvisor);
        assert!(c.channels.telegram.is_none());
        assert_eq!(c.operators.unix_uids, vec![0]);
    }

    #[test]
    fn unknown_keys_and_unsafe_values_are_errors() {
        let bad = [
            "[model]\nprovider = \"demo\"\nprovder = \"x\"\n",
            "[model]\nprovider = \"skynet\"\n",
            "[model]\nprovider = \"openai\"\nbase_url = \"http://10.0.0.5:11434\"\nmodel = \"m\"\n",
            "[model]\nprovider = \"anthropic\"\nbase_url = \"https://api.anthropic.com\"\nmodel = \"m\"\n",
            "[model]\nprovider = \"demo\"\n[channels.telegram]\ntoken_file = \"/t\"\nallowed_users = []\n",
            "[model]\nprovider = \"demo\"\n[channels.bridge]\nlisten = \"0.0.0.0:8787\"\ntoken_file = \"/t\"\n",
            "[model]\nprovider = \"demo\"\n[agent]\ntools = [\"note_write\"]\n",
            "[model]\nprovider = \"demo\"\n[sandbox]\nruntime = \"none\"\n",
        ];
        for text in bad {
            assert!(Config::parse(text).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn the_admin_api_listens_on_the_tailnet_for_tailnet_operators_only() {
        let admin = |listen: &str, ops: &str, names: &str| {
            format!(
                "[model]\nprovider = \"demo\"\n[operators]\ntailnet = [{ops}]\n[admin_api]\nlisten = \"{listen}\"\nhost_names = [{names}]\n"
            )
        };
        let ok = Config::parse(&admin(
            "100.101.1.2:8790",
            "\"a@example.com\"",
            "\"box.ts.net\"",
        ))
        .unwrap();
        let api = ok.admin_api.unwrap();
        assert_eq!(
            api.tailscaled_socket,
            PathBuf::from(crate::tailnet::DEFAULT_SOCKET)
        );
        assert!(Config::parse(&admin("[fd7a:115c:a1e0::9]:8790", "\"tag:admin\"", "")).is_ok());
        let bad = [
            admin("0.0.0.0:8790", "\"a@example.com\"", ""),
            admin("127.0.0.1:8790", "\"a@example.com\"", ""),
            admin("192.168.1.2:8790", "\"a@example.com\"", ""),
            admin("[::ffff:100.101.1.2]:8790", "\"a@example.com\"", ""),
            admin("100.101.1.2:8790", "", ""),
            admin("100.101.1.2:8790", "\"a@example.com\"", "\"box.ts.net:8790\""),
            admin("100.101.1.2:8790", "\"a@example.com\"", "\"evil.example/x\""),
            admin("100.101.1.2:8790", "\"a@example.com\"", "\"\""),
            "[model]\nprovider = \"demo\"\n[admin_api]\nlisten = \"100.101.1.2:8790\"\ntrust_proxy = true\n".into(),
        ];
        for text in bad {
            assert!(Config::parse(&text).is_err(), "accepted: {text}");
        }
    }

    #[test]
    fn bridge_addresses_are_loopback_or_tailnet() {
        for ok in [
            "127.0.0.1",
            "::1",
            "100.64.0.1",
            "100.127.255.254",
            "fd7a:115c:a1e0::1",
        ] {
            assert!(bridge_address_allowed(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "0.0.0.0",
            "192.168.1.2",
            "100.128.0.1",
            "100.63.255.255",
            "::",
            "::ffff:100.64.0.1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!bridge_address_allowed(bad.parse().unwrap()), "{bad}");
        }
    }
}
