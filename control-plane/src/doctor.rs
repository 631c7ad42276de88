//! `ironclaw doctor`: a security audit of the configuration and the host, offline on the
//! state directory. Each finding has a stable id, a severity and a fix hint; any critical
//! finding makes the command exit non-zero.
//!
//! Both the configuration file (what an operator edits) and the approved version in the
//! control store (what runs) are examined, as raw TOML, so a file `serve` would refuse is
//! still audited rather than only rejected.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::sandbox::agent_binary::{self, AgentBinaryError};
use crate::state::StateDir;
use crate::store::Store;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable: scripts depend on it.
    pub id: &'static str,
    pub severity: Severity,
    pub problem: String,
    pub fix: &'static str,
}

/// What doctor looks at, by the prefix of the ids of its findings, for the list of
/// what was checked and passed.
pub const CHECKS: [(&str, &str); 13] = [
    ("state", "the state directory's owner and modes"),
    (
        "keys",
        "the master key: loadable, private, not in the environment",
    ),
    (
        "audit",
        "the control store opens, its audit chain and sealed head hold",
    ),
    (
        "config",
        "the file and the approved version parse and pass serve's checks (and, for a first file, its policy)",
    ),
    (
        "files",
        "the key and token files exist and only root reads them",
    ),
    ("operators", "someone may approve changes"),
    ("model", "the model endpoint follows the endpoint rule"),
    ("telegram", "Telegram lets someone in"),
    (
        "admin-api",
        "the admin API listens only on tailnet addresses and has operators",
    ),
    (
        "sandbox",
        "gVisor, no network, cgroups and outbox file systems on this host",
    ),
    (
        "agent",
        "the agent binary: present, static, not writable by others",
    ),
    ("deploy", "sealed credentials have a TPM to seal them to"),
    (
        "web",
        "the brokered web: no test overrides, grants narrower than a whole host, budgets set",
    ),
];

/// What `doctor --probe` found of one outside service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub what: &'static str,
    /// What answered, or what went wrong and at which address.
    pub result: Result<String, String>,
}

/// One real call to the configured model and to Telegram's `getMe`, for
/// `doctor --probe`: each result names the exact failure (refused connection, DNS, TLS,
/// a status with the address tried).
pub async fn probe(config: &crate::config::Config) -> Vec<Probe> {
    use crate::model::Provider;
    use queue_proto::proxy::{ChatMessage, ContentBlock, ModelRequest, Role};
    let model = match crate::service::provider(config) {
        Err(e) => Err(crate::error_chain(&e)),
        Ok(p) => {
            let request = ModelRequest {
                system: String::new(),
                messages: vec![ChatMessage {
                    role: Role::User,
                    content: vec![ContentBlock::Text {
                        text: "Reply with the word ok.".into(),
                    }],
                }],
                tools: Vec::new(),
                max_tokens: 16,
            };
            let started = std::time::Instant::now();
            match p.complete(&request).await {
                Ok(r) => Ok(format!(
                    "{} answered in {} ms ({} tokens)",
                    p.name(),
                    started.elapsed().as_millis(),
                    r.usage.input_tokens.saturating_add(r.usage.output_tokens)
                )),
                Err(e) => Err(format!("{}: {e}", p.name())),
            }
        }
    };
    let mut out = vec![Probe {
        what: "model",
        result: model,
    }];
    if let Some(tg) = &config.channels.telegram {
        out.push(Probe {
            what: "telegram",
            result: crate::channels::telegram::probe(tg).await,
        });
    }
    out
}

/// Where `deploy/install` seals the master key as a systemd credential.
pub const SEALED_MASTER_KEY: &str = "/etc/ironclaw/master-key.cred";

struct Report(Vec<Finding>);

impl Report {
    fn add(&mut self, id: &'static str, severity: Severity, problem: String, fix: &'static str) {
        if !self.0.iter().any(|f| f.id == id) {
            self.0.push(Finding {
                id,
                severity,
                problem,
                fix,
            });
        }
    }
}

/// Runs every check; findings ordered by severity, then id.
pub fn run(state: &StateDir) -> Vec<Finding> {
    let mut r = Report(Vec::new());
    permissions(state, &mut r);
    let master = master_key(state, &mut r);
    let file_text = match std::fs::read_to_string(state.config()) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            r.add(
                "state.unreadable",
                Severity::Critical,
                format!(
                    "this user (uid {}) may not read {}: nothing of the state directory can be checked",
                    rustix::process::getuid().as_raw(),
                    state.config().display()
                ),
                "run doctor as root: sudo ironclaw doctor",
            );
            r.0.sort_by(|a, b| a.severity.cmp(&b.severity).then(a.id.cmp(b.id)));
            return r.0;
        }
        Err(_) => None,
    };
    // What the store holds: `None` when that cannot be told (no key, or it would not
    // open); `Some(None)` when nothing is approved yet and the file will be the first.
    let stored = master
        .as_ref()
        .and_then(|m| store(state, m, file_text.as_deref(), &mut r));
    let first = stored == Some(None);
    let approved = stored.flatten();
    let texts: Vec<(&str, String)> = [
        ("the configuration file", file_text),
        ("the approved configuration", approved),
    ]
    .into_iter()
    .filter_map(|(w, t)| t.map(|t| (w, t)))
    .collect();
    if texts.is_empty() {
        r.add(
            "config.missing",
            Severity::Critical,
            format!("no configuration at {}", state.config().display()),
            "run `ironclaw init`",
        );
    }
    for (where_, text) in &texts {
        let name = match *where_ {
            "the configuration file" => state.config().display().to_string(),
            _ => "the approved configuration".to_owned(),
        };
        match text.parse::<toml::Table>() {
            Ok(t) => {
                configuration(where_, &t, &mut r);
                as_serve_reads_it(&name, text, first, &mut r);
                key_files(&t, &mut r);
            }
            Err(e) => r.add(
                "config.invalid",
                Severity::Critical,
                format!(
                    "{name}{} is not valid TOML: {}",
                    e.span()
                        .map(|s| crate::config::line_column(text, s.start))
                        .map_or(String::new(), |(l, c)| format!(":{l}:{c}")),
                    e.message()
                ),
                "fix the line shown; `serve` refuses the file",
            ),
        }
    }
    // The host parts follow what runs (the approved version), else the file.
    if let Some((_, text)) = texts.last()
        && let Ok(t) = text.parse::<toml::Table>()
    {
        host(&t, &mut r);
    }
    r.0.sort_by(|a, b| a.severity.cmp(&b.severity).then(a.id.cmp(b.id)));
    r.0
}

/// What `serve` says of `text`: the same parse and checks (unknown keys, types,
/// providers, endpoints, listen addresses) and, for a first file, the same policy;
/// named by file, line and column.
fn as_serve_reads_it(name: &str, text: &str, first: bool, r: &mut Report) {
    let refused = match crate::config::Config::parse(text) {
        Err(e) => Some((e.position(text), e.what())),
        Ok(_) if first => crate::gateway::policy::check_bootstrap(text)
            .err()
            .map(|d| {
                // The rules a first file can break beyond the checks, by the key they
                // are about.
                let key = match d.rule {
                    "sandbox_network" => "sandbox.network",
                    _ => "operators",
                };
                let at = crate::config::locate_key(text, key);
                (at, crate::config::ConfigError::from(d).to_string())
            }),
        Ok(_) => None,
    };
    if let Some((at, why)) = refused {
        let at = at.map_or(String::new(), |(l, c)| format!(":{l}:{c}"));
        r.add(
            "config.refused",
            Severity::Critical,
            format!("{name}{at}: {why}"),
            "fix the line shown; `serve` refuses this configuration",
        );
    }
}

/// The keys in a configuration that name a key or token file.
const SECRET_FILES: [&[&str]; 5] = [
    &["model", "api_key_file"],
    &["transcription", "api_key_file"],
    &["web", "search_key_file"],
    &["channels", "telegram", "token_file"],
    &["channels", "bridge", "token_file"],
];

/// The key and token files a configuration names exist, and only root reads them.
/// Names of systemd credentials (`credential:NAME`) are systemd's to check.
fn key_files(t: &toml::Table, r: &mut Report) {
    for key in SECRET_FILES {
        let Some(path) = get(t, key).and_then(|v| v.as_str()) else {
            continue;
        };
        if path.starts_with(crate::model::http::CREDENTIAL_PREFIX) {
            continue;
        }
        let name = key.join(".");
        match std::fs::metadata(path) {
            Err(e) => r.add(
                "files.unreadable",
                Severity::Critical,
                format!("{name} = {path:?} cannot be read: {e}"),
                "write the key or token into that file (mode 0600, owned by root), or correct the path",
            ),
            Ok(m) if m.mode() & 0o077 != 0 || m.uid() != 0 => r.add(
                "files.exposed",
                Severity::Critical,
                format!(
                    "{name} = {path:?} is mode {:o}, owner uid {}: others may read or replace the secret",
                    m.mode() & 0o777,
                    m.uid()
                ),
                "chown root and chmod 0600 the file",
            ),
            Ok(_) => {}
        }
    }
}

/// The `[web]` section: test overrides outside tests, a grant that covers a whole host
/// (every path and query string on it), budgets left at their defaults.
fn web(where_: &str, t: &toml::Table, r: &mut Report) {
    let Some(web) = t.get("web").and_then(|v| v.as_table()) else {
        return;
    };
    if web
        .get("test_hosts")
        .and_then(|v| v.as_table())
        .is_some_and(|h| !h.is_empty())
    {
        r.add(
            "web.test-hosts",
            Severity::Warning,
            format!("{where_} answers some host names itself (web.test_hosts): for tests only"),
            "remove web.test_hosts outside tests",
        );
    }
    if web.contains_key("tls_extra_ca_file") {
        r.add(
            "web.extra-ca",
            Severity::Warning,
            format!("{where_} trusts an extra certificate authority for the web (web.tls_extra_ca_file): for tests only"),
            "remove web.tls_extra_ca_file outside tests",
        );
    }
    let prefixes = web.get("allowed_prefixes").and_then(|v| v.as_array());
    for p in prefixes.into_iter().flatten().filter_map(|p| p.as_str()) {
        let whole = url::Url::parse(p).is_ok_and(|u| u.path() == "/" && u.query().is_none());
        if whole {
            r.add(
                "web.prefix-whole-host",
                Severity::Warning,
                format!("{where_} grants {p:?}: every path and query string on that host, so an agent may put anything it read into a URL there"),
                "grant the narrowest prefix the site's API needs (https://host/api/v1/forecast)",
            );
        }
    }
    for key in ["requests_per_day", "bytes_per_day"] {
        if !web.contains_key(key) {
            r.add(
                "web.budget-unset",
                Severity::Warning,
                format!("{where_} leaves web.{key} at its default"),
                "set web.requests_per_day and web.bytes_per_day to what one conversation should use a day",
            );
        }
    }
}

fn get<'t>(t: &'t toml::Table, path: &[&str]) -> Option<&'t toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut table = t;
    for p in parents {
        table = table.get(*p)?.as_table()?;
    }
    table.get(*last)
}

fn permissions(state: &StateDir, r: &mut Report) {
    match std::fs::metadata(&state.root) {
        Ok(m) if m.mode() & 0o077 != 0 || m.uid() != 0 => r.add(
            "state.permissions",
            Severity::Critical,
            format!(
                "the state directory {} is mode {:o}, owner uid {}: others may read or enter it",
                state.root.display(),
                m.mode() & 0o777,
                m.uid()
            ),
            "chown root and chmod 0700 the state directory",
        ),
        Ok(_) => {}
        Err(e) => r.add(
            "state.missing",
            Severity::Critical,
            format!("the state directory {}: {e}", state.root.display()),
            "run `ironclaw init`",
        ),
    }
    if let Ok(m) = std::fs::metadata(state.config())
        && m.mode() & 0o022 != 0
    {
        r.add(
            "state.config-writable",
            Severity::Critical,
            format!(
                "config.toml is mode {:o}: others may write it",
                m.mode() & 0o777
            ),
            "chmod 0600 the configuration file",
        );
    }
}

fn master_key(state: &StateDir, r: &mut Report) -> Option<queue_proto::keys::MasterKey> {
    let path = state.master_key();
    if let Ok(m) = std::fs::metadata(&path)
        && (m.mode() & 0o077 != 0 || m.uid() != 0)
    {
        r.add(
            "keys.master-key-exposed",
            Severity::Critical,
            format!(
                "{} is mode {:o}, owner uid {}: others may read the master key",
                path.display(),
                m.mode() & 0o777,
                m.uid()
            ),
            "chown root and chmod 0400 the master key, or pass it with systemd's LoadCredentialEncrypted=",
        );
    }
    let key = match state.load_master_key() {
        Ok(k) => Some(k),
        // Installed by deploy/install: the key is only a sealed systemd credential, which
        // systemd opens for the service (and for a command run with it), not for a shell.
        Err(_) if !path.exists() && Path::new(SEALED_MASTER_KEY).exists() => {
            r.add(
                "keys.sealed-credential",
                Severity::Warning,
                format!(
                    "the master key is the sealed credential {SEALED_MASTER_KEY}: the store and its audit trail were not checked"
                ),
                "run doctor with the credential: systemd-run --wait --pipe -p LoadCredentialEncrypted=master-key:/etc/ironclaw/master-key.cred ironclaw doctor --state-dir /var/lib/ironclaw",
            );
            None
        }
        // Already said: the key is refused because others may read it.
        Err(_) if r.0.iter().any(|f| f.id == "keys.master-key-exposed") => None,
        Err(e) => {
            r.add(
                "keys.master-key-unreadable",
                Severity::Critical,
                format!(
                    "the master key cannot be loaded: {}",
                    crate::error_chain(&e)
                ),
                "restore the master key from its offline backup",
            );
            None
        }
    };
    let hex_key = key.as_ref().map(|k| hex::encode(k.expose_secret()));
    for (name, value) in std::env::vars_os() {
        let (name, value) = (name.to_string_lossy(), value.to_string_lossy());
        let named = name.to_ascii_uppercase().contains("MASTER_KEY");
        let holds = hex_key
            .as_deref()
            .is_some_and(|h| value.to_ascii_lowercase().contains(h));
        if named || holds {
            r.add(
                "keys.master-key-in-environment",
                Severity::Critical,
                format!("the environment variable {name} holds or names the master key"),
                "remove it: every child process and crash report can see the environment",
            );
        }
    }
    key
}

/// The store's checks; returns the approved configuration text, `Some(None)` if there
/// is none yet, `None` if the store cannot say.
fn store(
    state: &StateDir,
    master: &queue_proto::keys::MasterKey,
    file_text: Option<&str>,
    r: &mut Report,
) -> Option<Option<String>> {
    let store =
        match Store::open(&state.store(), master) {
            Ok(s) => s,
            Err(e) => {
                r.add(
                "audit.store-unreadable",
                Severity::Critical,
                format!("the control store cannot be opened: {}", crate::error_chain(&e)),
                "restore the state directory from a backup, or run `ironclaw init` in a new one",
            );
                return None;
            }
        };
    if let Err(e) = store.verify_audit(master) {
        r.add(
            "audit.chain-broken",
            Severity::Critical,
            format!("the audit trail is broken: {e}"),
            "the control store was changed outside ironclaw: investigate before running it",
        );
    }
    let current = match store.current_config() {
        Ok(Some(c)) => c,
        Ok(None) => return Some(None),
        Err(_) => return None,
    };
    if !store.version_recorded(&current).unwrap_or(false) {
        r.add(
            "audit.version-unrecorded",
            Severity::Critical,
            format!(
                "approved configuration version {} is not the one the audit trail put in force",
                current.version
            ),
            "the control store was changed outside ironclaw: investigate before running it",
        );
    }
    let pending = store
        .changes(false, 10_000)
        .map(|c| c.len())
        .unwrap_or_default();
    let differs = file_text.is_some_and(|f| f != current.text);
    if differs || pending > 0 {
        let mut parts = Vec::new();
        if differs {
            parts.push(format!(
                "the configuration file differs from approved version {} (a running serve files it as a change request at its next SIGHUP or start)",
                current.version
            ));
        }
        if pending > 0 {
            parts.push(format!("{pending} change requests wait for a decision"));
        }
        r.add(
            "config.drift-pending",
            Severity::Warning,
            parts.join("; "),
            "review with `ironclaw changes list` and decide; an edit takes effect only once approved",
        );
    }
    Some(Some(current.text))
}

fn configuration(where_: &str, t: &toml::Table, r: &mut Report) {
    admin_api(where_, t, r);
    web(where_, t, r);
    if get(t, &["sandbox", "runtime"]).and_then(|v| v.as_str()) == Some("host") {
        r.add(
            "sandbox.not-gvisor",
            Severity::Critical,
            format!("{where_} runs agents without isolation (sandbox.runtime = \"host\")"),
            "set sandbox.runtime = \"gvisor\" (development only otherwise)",
        );
    }
    if let Some(n) = get(t, &["sandbox", "network"])
        && n.as_str() != Some("none")
    {
        r.add(
            "sandbox.network-not-none",
            Severity::Critical,
            format!("{where_} asks for a sandbox network ({n:?})"),
            "remove sandbox.network: agents reach the world only through the proxy",
        );
    }
    let ops = |k: &str| {
        get(t, &["operators", k])
            .and_then(|v| v.as_array())
            .is_some_and(|a| !a.is_empty())
    };
    // `unix_uids` defaults to root when absent.
    let unix_default = get(t, &["operators", "unix_uids"]).is_none();
    if !(unix_default || ops("unix_uids") || ops("telegram") || ops("tailnet")) {
        r.add(
            "operators.none",
            Severity::Critical,
            format!("{where_} names no operators: nothing could ever be approved"),
            "name at least one operator in [operators]",
        );
    }
    if let Some(url) = get(t, &["model", "base_url"]).and_then(|v| v.as_str())
        && insecure(url)
    {
        r.add(
            "model.endpoint-insecure",
            Severity::Critical,
            format!("{where_} sends model calls to {url}: not HTTPS to a host name, nor loopback"),
            "use https:// with a host name, or a model server on 127.0.0.1",
        );
    }
    if let Some(tg) = get(t, &["channels", "telegram"]).and_then(|v| v.as_table())
        && tg
            .get("allowed_users")
            .and_then(|v| v.as_array())
            .is_none_or(|a| a.is_empty())
    {
        r.add(
            "telegram.no-allowed-users",
            Severity::Critical,
            format!("{where_} turns Telegram on without allowed_users"),
            "list the Telegram user ids that may talk to the assistant",
        );
    }
}

/// The admin API: on a tailnet address, with someone to use it.
fn admin_api(where_: &str, t: &toml::Table, r: &mut Report) {
    let Some(listen) = get(t, &["admin_api", "listen"]) else {
        return;
    };
    let addr = listen
        .as_str()
        .and_then(|l| l.parse::<std::net::SocketAddr>().ok());
    if !addr.is_some_and(|a| crate::tailnet::in_tailnet(a.ip())) {
        r.add(
            "admin-api.outside-tailnet",
            Severity::Critical,
            format!(
                "{where_} puts the admin API on {}, outside the tailnet",
                listen.as_str().unwrap_or("an address that is not one")
            ),
            "set admin_api.listen to this machine's Tailscale address (`tailscale ip -4`)",
        );
    }
    let tailnet_ops = get(t, &["operators", "tailnet"])
        .and_then(|v| v.as_array())
        .is_some_and(|a| !a.is_empty());
    if !tailnet_ops {
        r.add(
            "admin-api.no-operators",
            Severity::Critical,
            format!(
                "{where_} turns the admin API on with no operators.tailnet: nobody could use it"
            ),
            "name the tailnet logins (or tag:…) that may use it in operators.tailnet",
        );
    }
}

/// Refused by the endpoint rule, the one the configuration check and the policy apply.
fn insecure(url: &str) -> bool {
    crate::model::http::ApprovedEndpoint::parse(url).is_err()
}

fn host(t: &toml::Table, r: &mut Report) {
    if get(t, &["admin_api", "listen"]).is_some() {
        let socket = get(t, &["admin_api", "tailscaled_socket"])
            .and_then(|v| v.as_str())
            .unwrap_or(crate::tailnet::DEFAULT_SOCKET);
        if !Path::new(socket).exists() {
            r.add(
                "admin-api.tailscaled-missing",
                Severity::Warning,
                format!(
                    "tailscaled's socket {socket} is not there: the admin API refuses everyone"
                ),
                "install and start Tailscale (`tailscale up`), or set admin_api.tailscaled_socket",
            );
        }
        // Whoever can put a socket there decides who is an operator.
        let dir = Path::new(socket).parent().unwrap_or(Path::new("/"));
        if let Ok(m) = std::fs::metadata(dir)
            && (m.uid() != 0 || m.mode() & 0o022 != 0)
        {
            r.add(
                "admin-api.tailscaled-socket-unsafe",
                Severity::Critical,
                format!(
                    "{} (holding tailscaled's socket) is writable by someone other than root: whoever puts a socket there decides who is an operator",
                    dir.display()
                ),
                "use tailscaled's own socket, /run/tailscale/tailscaled.sock",
            );
        }
    }
    let gvisor = get(t, &["sandbox", "runtime"]).and_then(|v| v.as_str()) != Some("host");
    if gvisor {
        let runsc = match get(t, &["sandbox", "runsc"]).and_then(|v| v.as_str()) {
            Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
            None => on_path("runsc"),
        };
        match runsc {
            None => r.add(
                "sandbox.runsc-missing",
                Severity::Critical,
                "runsc (gVisor) is not installed or not on PATH".into(),
                "apt-get install runsc (scripts/setup does)",
            ),
            Some(p) => match std::process::Command::new(&p)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(_) | Err(_) => r.add(
                    "sandbox.runsc-unusable",
                    Severity::Critical,
                    format!("{} --version fails", p.display()),
                    "reinstall runsc, or point sandbox.runsc at a working one",
                ),
            },
        }
        credentials_without_tpm(t, r);
        // Each sandbox's memory, pids and CPU limits live in a cgroup the control plane
        // makes; without a memory controller nothing is launched.
        if crate::sandbox::cgroup::Cgroups::host().is_none() {
            r.add(
                "sandbox.cgroups-unavailable",
                Severity::Critical,
                "no memory cgroup controller under /sys/fs/cgroup: sandboxes cannot be given their memory, pids and CPU limits, so serve launches none".into(),
                "boot with the memory controller enabled (cgroup v2 with memory in cgroup.controllers, or a v1 memory hierarchy)",
            );
        }
        // Each outbox is limited to sandbox.outbox_mib by a file system of its own.
        let missing: Vec<&str> = ["mkfs.ext4", "fallocate", "mount", "umount"]
            .into_iter()
            .filter(|tool| on_path(tool).is_none())
            .chain((!Path::new("/dev/loop-control").exists()).then_some("/dev/loop-control"))
            .collect();
        if !missing.is_empty() {
            r.add(
                "sandbox.outbox-limit-unavailable",
                Severity::Critical,
                format!(
                    "each session's /outbox is limited to sandbox.outbox_mib by an ext4 image of its own, mounted through a loop device; missing: {}",
                    missing.join(", ")
                ),
                "apt-get install e2fsprogs util-linux mount, and load the loop module (modprobe loop)",
            );
        }
    }
    let configured = get(t, &["sandbox", "agent_binary"])
        .and_then(|v| v.as_str())
        .map(Path::new);
    agent(&agent_binary::resolve(configured), r);
}

/// Keys and tokens named as systemd credentials are sealed by `systemd-creds`: with a
/// TPM, to this machine's TPM; without one, with a key in
/// /var/lib/systemd/credential.secret, on the same disk as the sealed files.
fn credentials_without_tpm(t: &toml::Table, r: &mut Report) {
    let named = SECRET_FILES
        .iter()
        .filter_map(|p| get(t, p).and_then(|v| v.as_str()))
        .any(|v| v.starts_with(crate::model::http::CREDENTIAL_PREFIX));
    if named && !Path::new("/dev/tpmrm0").exists() {
        r.add(
            "deploy.credentials-without-tpm",
            Severity::Warning,
            "keys are systemd credentials, but this machine has no TPM: they are sealed with a key kept on the same disk (/var/lib/systemd/credential.secret), so a stolen disk opens them".into(),
            "keep the disk encrypted (LUKS), or seal on a machine with a TPM (systemd-creds encrypt --with-key=tpm2)",
        );
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The agent binary: there, root's alone, and static.
fn agent(path: &Path, r: &mut Report) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            r.add(
                "agent.missing",
                Severity::Critical,
                format!("the agent binary {}: {e}", path.display()),
                "build it with scripts/build-static and install it next to ironclaw",
            );
            return;
        }
    };
    if meta.permissions().mode() & 0o022 != 0 || meta.uid() != 0 {
        r.add(
            "agent.writable",
            Severity::Critical,
            format!(
                "the agent binary {} is mode {:o}, owner uid {}: someone other than root may replace it",
                path.display(),
                meta.mode() & 0o777,
                meta.uid()
            ),
            "chown root and chmod 0755 the agent binary",
        );
    }
    // The same check `serve` refuses the binary by.
    match agent_binary::require_static(path) {
        Ok(()) => {}
        Err(AgentBinaryError::NotStatic { linking, .. }) => r.add(
            "agent.not-static",
            Severity::Critical,
            format!(
                "the agent binary {} is not statically linked ({linking}): the sandbox's root holds nothing else, so `serve` refuses it",
                path.display()
            ),
            "build it with scripts/build-static",
        ),
        Err(AgentBinaryError::Unreadable { source, .. }) => r.add(
            "agent.missing",
            Severity::Critical,
            format!("the agent binary {} cannot be read: {source}", path.display()),
            "build it with scripts/build-static",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_web_section_is_flagged_for_test_overrides_whole_hosts_and_default_budgets() {
        let ids = |text: &str| {
            let mut r = Report(Vec::new());
            web("the file", &text.parse::<toml::Table>().unwrap(), &mut r);
            let mut ids: Vec<&str> = r.0.iter().map(|f| f.id).collect();
            ids.dedup();
            ids
        };
        let loose = "[web]\nsearch = \"searxng\"\nsearch_url = \"https://s.example\"\n\
            allowed_prefixes = [\"https://api.example/\", \"https://api.example/v1/forecast\"]\n\
            tls_extra_ca_file = \"/tmp/ca.pem\"\ntest_hosts = { \"a.test\" = \"198.51.100.1\" }\n";
        assert_eq!(
            ids(loose),
            vec![
                "web.test-hosts",
                "web.extra-ca",
                "web.prefix-whole-host",
                "web.budget-unset"
            ]
        );
        let tight = "[web]\nsearch = \"searxng\"\nsearch_url = \"https://s.example\"\n\
            allowed_prefixes = [\"https://api.example/v1/forecast\"]\n\
            requests_per_day = 50\nbytes_per_day = 1000000\n";
        assert!(ids(tight).is_empty());
        assert!(ids("[model]\nprovider = \"demo\"\n").is_empty());
    }

    #[test]
    fn endpoints_are_judged_like_the_policy() {
        assert!(!insecure("https://api.anthropic.com"));
        assert!(!insecure("http://127.0.0.1:11434"));
        assert!(insecure("http://10.0.0.5:11434"));
        assert!(insecure("not a url"));
    }

    /// One endpoint rule: for every endpoint of the rule's own table, the configuration
    /// check, the policy on a first file, on an operator's change and on an agent's
    /// request, and doctor's finding all give the same answer.
    #[test]
    fn the_config_check_the_policy_and_doctor_agree_on_every_endpoint() {
        use crate::config::{Config, DEFAULT_CONFIG};
        use crate::gateway::candidate::agent_candidate;
        use crate::gateway::policy::{check, check_bootstrap};
        use queue_proto::items::ChangeTarget;

        let before = Config::parse(DEFAULT_CONFIG).unwrap();
        for (url, rule) in crate::model::http::tests::ENDPOINTS {
            let text = DEFAULT_CONFIG.replace(
                "provider = \"demo\"",
                &format!("provider = \"openai\"\nbase_url = \"{url}\"\nmodel = \"m\""),
            );
            let mut r = Report(Vec::new());
            configuration("the file", &toml::from_str(&text).unwrap(), &mut r);
            let by_agent = agent_candidate(DEFAULT_CONFIG, ChangeTarget::Endpoints, url)
                .and_then(|t| check(&before, &t, true));
            let answers = [
                ("config", Config::parse(&text).is_ok()),
                ("bootstrap", check_bootstrap(&text).is_ok()),
                ("operator change", check(&before, &text, false).is_ok()),
                ("agent request", by_agent.is_ok()),
                (
                    "doctor",
                    r.0.iter().all(|f| f.id != "model.endpoint-insecure"),
                ),
            ];
            for (who, ok) in answers {
                assert_eq!(ok, rule.is_ok(), "{who} on {url}");
            }
        }
    }
}
