//! The service's side of the gateway: filing change requests (from agents, operators
//! and configuration drift), deciding them, and putting an applied version in force by
//! restarting the live sessions with it. Agent turns are summarised and scored here too.

use std::sync::Arc;

use queue_proto::ids::{ChangeId, SessionId};
use queue_proto::items::{ChangeRequest, OutboxItem};
use serde_json::json;

use super::{Service, ServiceError, blocking, provider};
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::gateway::rate::{RateLimit, Refusals};
use crate::gateway::risk::change_risk;
use crate::gateway::{self, Denial, Requester, candidate, policy};
use crate::model::AnyProvider;
use crate::operator::Identity;
use crate::state::now_secs;
use crate::store::changes::{
    ChangeSummary, ConfigVersion, Decided, Decision, FILE_SEEN, NewChange, Standing, seen_key,
};
use crate::store::cursors::Cursor;
use crate::store::messages::Refusal;
use crate::store::state::ChangeState;

/// Refusals of one admin peer recorded one by one each minute; the rest are counted.
const REFUSALS_RECORDED_PER_MINUTE: u32 = 10;
/// Refused messages recorded one by one a minute for one chat, and in all.
pub(super) const REFUSALS_RECORDED_PER_CHAT: u32 = 10;
pub(super) const REFUSALS_RECORDED_IN_ALL: u32 = 120;
/// The name the refusals beyond the overall limit are counted under.
const ALL_CHATS: &str = "(all chats)";

/// The approved configuration in force: parsed, its version, and its exact text.
#[derive(Debug)]
pub struct Effective {
    pub config: Arc<Config>,
    pub version: u64,
    pub text: String,
}

/// What of the change from `old` to `new` takes effect only when `serve` is restarted:
/// the parts that are set up once, at start.
pub fn restart_notes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut notes = Vec::new();
    if new.sandbox.runtime != old.sandbox.runtime
        || new.sandbox.runsc != old.sandbox.runsc
        || new.sandbox.agent_binary != old.sandbox.agent_binary
    {
        notes.push(
            "sandbox.runtime, runsc or agent_binary changed: they take effect when serve is restarted",
        );
    }
    let changed = started_differently(old, new);
    if changed.iter().any(|c| *c != "admin_api") {
        notes.push(
            "the channels changed (Telegram's token, address or polling, the bridge): they take effect when serve is restarted",
        );
    }
    if changed.contains(&"admin_api") {
        notes.push(
            "admin_api changed: its address, names and socket take effect when serve is restarted",
        );
    }
    notes
}

/// What of `a` and `b` that is set up once, when serve starts, differs: `telegram`
/// (but for `allowed_users`, read at every message), `bridge`, `admin_api` (but for who
/// may use it, `operators.tailnet`, read at every request).
pub fn started_differently(a: &Config, b: &Config) -> Vec<&'static str> {
    let telegram = |c: &Config| {
        c.channels.telegram.clone().map(|mut t| {
            t.allowed_users.clear();
            t
        })
    };
    let mut out = Vec::new();
    if telegram(a) != telegram(b) {
        out.push("telegram");
    }
    if a.channels.bridge != b.channels.bridge {
        out.push("bridge");
    }
    if a.admin_api != b.admin_api {
        out.push("admin_api");
    }
    out
}

/// Replaces the regular file `path`, which holds `expected`, with `text` through a
/// temporary file beside it, keeping its owner and mode. A symbolic link, or anything
/// but a regular file, is left as it is (its target is someone else's to manage), and
/// so is a file that changed meanwhile (an operator's save wins).
fn write_atomically(path: &std::path::Path, expected: &str, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_file() {
        return Err(std::io::Error::other(
            "it is a symbolic link or not a regular file, so it is left as it is",
        ));
    }
    let name = path
        .file_name()
        .map_or_else(|| "config".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.ironclaw-new"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.mode() & 0o777)
        .open(&tmp)?;
    let written = f
        .write_all(text.as_bytes())
        .and_then(|()| std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid())))
        .and_then(|()| f.sync_all());
    let unchanged = std::fs::read_to_string(path).is_ok_and(|now| now == expected);
    match (written, unchanged) {
        (Ok(()), true) => std::fs::rename(&tmp, path),
        (Err(e), _) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
        (Ok(()), false) => {
            let _ = std::fs::remove_file(&tmp);
            Err(std::io::Error::other(
                "it changed while the approved version was being written, so it is left as it is",
            ))
        }
    }
}

impl Service {
    /// The model provider in force.
    pub(super) fn provider(&self) -> Arc<AnyProvider> {
        self.provider
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until approval prompts may be waiting to be sent or closed.
    pub async fn prompts_changed(&self) {
        self.prompts.notified().await;
    }

    /// Files the configuration file's text as a change request if it differs from the
    /// approved version, unless it was once the approved text (a file left behind by a
    /// change approved another way is not a request to undo it) or was already filed
    /// against the version in force. Nothing changes until an operator approves it. To
    /// ask again for a text that was rejected or expired, propose it (`changes propose`).
    pub fn check_drift(&self, file_text: &str) -> Option<ChangeSummary> {
        let eff = self.effective();
        let hash = gateway::text_hash(file_text);
        let seen = self.db(|s| s.cursor(FILE_SEEN)).ok().flatten();
        // A text once approved is a file left behind, not an edit; a text filed against
        // the version in force waits for its decision.
        let approved_once = seen_key(None, &hash);
        let filed_now = seen_key(Some(eff.version), &hash);
        if seen.as_deref() == Some(approved_once.as_str())
            || seen.as_deref() == Some(filed_now.as_str())
        {
            return None;
        }
        if file_text == eff.text {
            if let Err(e) = self.db(|s| {
                s.set_cursor(Cursor {
                    name: FILE_SEEN,
                    value: &approved_once,
                })
            }) {
                tracing::warn!(error = %e, "remembering the configuration file's hash failed");
            }
            return None;
        }
        let outcome = policy::check(&eff.config, file_text, false)
            .map(|after| change_risk(&eff.config, &after, false));
        let new = NewChange {
            requester: Requester::ConfigFile.to_string(),
            target: "file".into(),
            reason: "the configuration file differs from the approved version".into(),
            base_version: eff.version,
            after: file_text.to_owned(),
            outcome,
        };
        let filed = self.file(&new)?;
        tracing::warn!(change = %filed.id, state = %filed.state, version = eff.version,
            "the configuration file differs from the approved version; the approved version stays in force until the change request is approved");
        Some(filed)
    }

    fn file(&self, new: &NewChange) -> Option<ChangeSummary> {
        let config = self.config();
        let notify = if config.channels.telegram.is_some() {
            config.operators.telegram.clone()
        } else {
            Vec::new()
        };
        let gw = &config.gateway;
        match self.db(|s| {
            s.file_change(
                new,
                now_secs(),
                gw.request_ttl_secs,
                gw.max_pending_per_requester,
                &notify,
            )
        }) {
            Ok(filed) => {
                if filed.state == ChangeState::Pending {
                    self.prompts.notify_one();
                    // The operator hears of every request waiting for them.
                    tracing::warn!(change = %filed.id, requester = %filed.requester,
                        target = %filed.target, risk = filed.risk,
                        "a change request waits for an operator: ironclaw changes show {}", filed.id);
                }
                Some(filed)
            }
            Err(e) => {
                tracing::error!(error = %e, "filing a change request failed");
                None
            }
        }
    }

    /// Files an agent's request: the exact new configuration it would make, checked by
    /// the policy. Returns the request's id, or nothing if it could not be stored.
    pub(super) fn file_agent_change(
        &self,
        session: &SessionId,
        request: &ChangeRequest,
    ) -> Option<ChangeId> {
        let eff = self.effective();
        let requester = Requester::Agent(session.clone()).to_string();
        let per_minute = eff.config.gateway.max_requests_per_minute;
        let (admitted, done) = self.rate().admit(&requester, now_secs(), per_minute);
        self.record_refusals(done);
        if !admitted {
            return None;
        }
        let candidate = candidate::agent_candidate(&eff.text, request.target, &request.after);
        // A session that has taken in outside content may not ask for changes until the
        // taint ends: the request is filed as denied, with what it had read.
        // A store that cannot say counts as tainted.
        let taint = self.db(|s| s.taint_of(session)).unwrap_or_else(|_| {
            Some(crate::store::web::Taint {
                url: "(unknown: the store failed)".into(),
                at: 0,
            })
        });
        let outcome = match taint {
            Some(t) => Err(Denial {
                rule: "tainted",
                why: format!("asked after reading {}", t.url),
            }),
            None => candidate.as_ref().map_err(Denial::clone).and_then(|text| {
                policy::check(&eff.config, text, true)
                    .map(|after| change_risk(&eff.config, &after, true))
            }),
        };
        let new = NewChange {
            requester,
            target: request.target.as_str().into(),
            reason: request.reason.clone(),
            base_version: eff.version,
            // What was asked for stays visible even when it could not be built.
            after: candidate.unwrap_or_else(|_| request.after.clone()),
            outcome,
        };
        let filed = self.file(&new)?;
        ChangeId::try_from(filed.id.as_str()).ok()
    }

    fn rate(&self) -> std::sync::MutexGuard<'_, RateLimit> {
        self.rate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records each finished minute's count of change requests refused by the rate limit.
    fn record_refusals(&self, done: impl IntoIterator<Item = Refusals>) {
        self.record_limited(AuditEvent::ChangeRequestsLimited, "requester", done);
    }

    /// Records each finished minute's count as a `kind` entry naming its `who`.
    fn record_limited(
        &self,
        kind: AuditEvent,
        who: &str,
        done: impl IntoIterator<Item = Refusals>,
    ) {
        for r in done {
            self.audit(
                kind,
                json!({ who: r.requester, "minute_start": r.minute_start,
                        "refused": r.refused }),
            );
        }
    }

    /// Change requests an agent wrote into its outbox go through the same gateway.
    pub(super) fn file_outbox_requests(&self, session: &SessionId, items: &[OutboxItem]) {
        for item in items {
            if let OutboxItem::ChangeRequest(r) = item {
                self.file_agent_change(session, r);
            }
        }
    }

    /// Records a peer the admin socket or the admin API refused. The first
    /// [`REFUSALS_RECORDED_PER_MINUTE`] a minute from one peer are each an `admin_refused`
    /// entry; the rest are one `admin_refusals_limited` count a minute, so a peer knocking
    /// in a loop cannot grow the trail without bound. Whether this one was recorded.
    pub fn refuse_admin_peer(&self, peer: &str, detail: serde_json::Value) -> bool {
        let (record, done) = self
            .refused_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(peer, now_secs(), REFUSALS_RECORDED_PER_MINUTE);
        self.record_limited(AuditEvent::AdminRefusalsLimited, "peer", done);
        if record {
            self.audit(AuditEvent::AdminRefused, detail);
        }
        record
    }

    /// Whether a refused message is recorded on its own: at most
    /// [`REFUSALS_RECORDED_PER_CHAT`] a minute for one chat and
    /// [`REFUSALS_RECORDED_IN_ALL`] a minute in all; the rest are counted, one
    /// `message_refusals_limited` entry a minute per chat (or for all), so strangers and
    /// groups cannot grow the store and the trail by writing.
    pub(super) fn record_refusal(&self, refusal: &Refusal<'_>, now: i64) -> bool {
        let chat = format!("{}:{}", refusal.channel, refusal.chat);
        let mut limits = self
            .refused_messages
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (mine, done) = limits.admit(&chat, now, REFUSALS_RECORDED_PER_CHAT);
        let (all, done_all) = if mine {
            limits.admit(ALL_CHATS, now, REFUSALS_RECORDED_IN_ALL)
        } else {
            (false, None)
        };
        drop(limits);
        self.record_limited(
            AuditEvent::MessageRefusalsLimited,
            "chat",
            done.into_iter().chain(done_all),
        );
        mine && all
    }

    /// Records every rate limit's minutes that are over at `now` (all of them at
    /// `i64::MAX`, as at shutdown): change requests, refused admin peers, refused
    /// messages.
    pub(super) fn flush_rate_limits(&self, now: i64) {
        let limits = [
            (&self.rate, AuditEvent::ChangeRequestsLimited, "requester"),
            (
                &self.refused_peers,
                AuditEvent::AdminRefusalsLimited,
                "peer",
            ),
            (
                &self.refused_messages,
                AuditEvent::MessageRefusalsLimited,
                "chat",
            ),
        ];
        for (limit, kind, who) in limits {
            let done = limit.lock().unwrap_or_else(|p| p.into_inner()).flush(now);
            self.record_limited(kind, who, done);
        }
    }

    /// An operator's proposal: a whole new configuration text.
    pub fn propose(
        &self,
        by: &Identity,
        text: &str,
        reason: &str,
    ) -> Result<ChangeSummary, String> {
        if text.len() as u64 > crate::config::MAX_CONFIG_BYTES {
            return Err("the proposed configuration is larger than 256 KiB".into());
        }
        let eff = self.effective();
        let outcome = policy::check(&eff.config, text, false)
            .map(|after| change_risk(&eff.config, &after, false));
        let new = NewChange {
            requester: Requester::Operator(by.clone()).to_string(),
            target: "file".into(),
            reason: reason.chars().take(1024).collect(),
            base_version: eff.version,
            after: text.to_owned(),
            outcome,
        };
        self.file(&new)
            .ok_or_else(|| "the change request could not be stored".into())
    }

    /// Decides a change request as `by` (an authenticated identity, never a name the
    /// client sent). An approval is applied in the same transaction and put in force
    /// before this returns.
    pub async fn decide(
        self: &Arc<Self>,
        id: &str,
        decision: Decision,
        by: &Identity,
        shown_hash: Option<&str>,
    ) -> Result<Decided, ServiceError> {
        let _one_at_a_time = self.applying.lock().await;
        let config = self.config();
        let operator = by.is_operator(&config);
        let standing = match (operator, config.operators.sole()) {
            (false, _) => Standing::None,
            (true, false) => Standing::Operator,
            (true, true) => Standing::SoleOperator,
        };
        // Telegram's server says who pressed a button: above the threshold, that word
        // does not carry an approval.
        if decision == Decision::Approve
            && matches!(by, Identity::Telegram(_))
            && let Some(detail) = self.db(|s| s.change(id))?
            && !telegram_may_approve(&self.config(), detail.summary.risk)
        {
            let why = format!(
                "its risk {:.2} is above gateway.telegram_max_risk; approve it with `ironclaw changes approve` or on the approval page",
                detail.summary.risk
            );
            self.audit(
                AuditEvent::DecisionRefused,
                json!({ "change": id, "by": by.to_string(), "decision": "approve", "why": why }),
            );
            return Ok(Decided::Refused(why));
        }
        // Everything the new version needs is built before it is applied, so nothing
        // can fail once the store says it is in force (a missing key file refuses the
        // approval instead).
        let mut ready = None;
        if decision == Decision::Approve
            && operator
            && let Some(detail) = self.db(|s| s.change(id))?
            && detail.summary.state.can_decide()
            && let Ok(candidate) = Config::parse(&detail.after)
        {
            match provider(&candidate) {
                Ok(p) => ready = Some((detail.after_hash, candidate, Arc::new(p))),
                Err(e) => {
                    let why = format!("the new model provider cannot be set up: {e}");
                    self.audit(
                        AuditEvent::DecisionRefused,
                        json!({ "change": id, "by": by.to_string(), "decision": "approve", "why": why }),
                    );
                    return Ok(Decided::Refused(why));
                }
            }
        }
        let decided = self.db(|s| s.decide(id, decision, by, standing, shown_hash, now_secs()))?;
        self.prompts.notify_one();
        if let Decided::Applied(version) = &decided {
            // What was applied hashes to what was filed, which is what was built above
            // (re-built only if the stored text changed in between and changed back).
            let (config, new_provider) = match ready {
                Some((hash, config, p)) if hash == version.hash => (config, p),
                _ => {
                    let config =
                        Config::parse(&version.text).map_err(|source| ServiceError::Config {
                            version: version.version,
                            source,
                        })?;
                    let p = Arc::new(provider(&config)?);
                    (config, p)
                }
            };
            self.put_in_force(version, config, new_provider).await;
        }
        Ok(decided)
    }

    /// Makes `version` the configuration in force and restarts the live sessions with it.
    async fn put_in_force(
        self: &Arc<Self>,
        version: &ConfigVersion,
        config: Config,
        new_provider: Arc<AnyProvider>,
    ) {
        let mut settings = (*self.manager.settings()).clone();
        super::put_limits(&mut settings, &config);
        for note in restart_notes(&self.config(), &config) {
            tracing::warn!("{note}");
        }
        self.manager.set_settings(settings);
        let replaced = self.effective().text.clone();
        *self.provider.write().unwrap_or_else(|p| p.into_inner()) = new_provider;
        *self.effective.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Effective {
            config: Arc::new(config),
            version: version.version,
            text: version.text.clone(),
        });
        tracing::info!(
            version = version.version,
            "an approved change is in force; restarting live sessions"
        );
        blocking(|| self.write_back(&replaced, version));
        self.restart_sessions().await;
    }

    /// Keeps the configuration file in step with the approved version: a file that
    /// holds the version just replaced (or one approved before it) is given the new
    /// text, comments and all, so that a difference between the two means only what a
    /// person edited. A file with edits of its own is left as it is; they are a change
    /// request of their own.
    fn write_back(&self, replaced: &str, version: &ConfigVersion) {
        let path = &self.config_file;
        let current = match Config::read_text(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "the approved version could not be written into the configuration file");
                return;
            }
        };
        let remember = |text: &str| {
            let key = seen_key(None, &gateway::text_hash(text));
            if let Err(e) = self.db(|s| {
                s.set_cursor(Cursor {
                    name: FILE_SEEN,
                    value: &key,
                })
            }) {
                tracing::warn!(error = %e, "remembering the configuration file's hash failed");
            }
        };
        if current == version.text {
            remember(&current);
            return;
        }
        let seen = self.db(|s| s.cursor(FILE_SEEN)).ok().flatten();
        let left_behind = current == replaced
            || seen.as_deref() == Some(seen_key(None, &gateway::text_hash(&current)).as_str());
        if !left_behind {
            tracing::warn!(
                version = version.version,
                file = %path.display(),
                "the configuration file has edits of its own, so the approved version was not written into it; `ironclaw config show --approved` prints it"
            );
            return;
        }
        match write_atomically(path, &current, &version.text) {
            Ok(()) => {
                remember(&version.text);
                tracing::info!(version = version.version, file = %path.display(),
                    "wrote the approved version into the configuration file");
            }
            Err(e) => tracing::warn!(error = %e, file = %path.display(),
                "the approved version could not be written into the configuration file"),
        }
    }

    /// Stops every live session's sandbox and proxy; those with messages waiting start
    /// again at once under the configuration now in force, the rest on their next message.
    async fn restart_sessions(self: &Arc<Self>) {
        let live: Vec<_> = self
            .live_map()
            .iter()
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect();
        for (id, l) in live {
            let _order = l.publish.lock().await;
            l.deleted.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = self.manager.stop(&id).await {
                tracing::warn!(session = %id, error = %e, "stopping a sandbox for a restart failed");
            }
            self.live_map().remove(&id);
            let version = self.effective().version;
            self.audit(
                AuditEvent::SessionRestarted,
                json!({ "session": id.as_str(), "config_version": version }),
            );
        }
        self.recover().await;
    }
}

/// Whether a change of risk `risk` may be approved with a Telegram button.
pub fn telegram_may_approve(config: &Config, risk: f64) -> bool {
    risk <= config.gateway.telegram_max_risk
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(telegram: &str) -> Config {
        Config::parse(&format!(
            "[model]\nprovider = \"demo\"\n\n[channels.telegram]\ntoken_file = \"/t\"\n{telegram}\n"
        ))
        .unwrap()
    }

    #[test]
    fn who_may_use_telegram_is_in_force_at_once_and_its_connection_waits_for_a_restart() {
        let before = config("allowed_users = [1]");
        assert_eq!(
            started_differently(&before, &config("allowed_users = [1, 2]")),
            Vec::<&str>::new()
        );
        assert!(restart_notes(&before, &config("allowed_users = [2]")).is_empty());
        let moved = config("allowed_users = [1]\npoll_timeout_secs = 5");
        assert_eq!(started_differently(&before, &moved), ["telegram"]);
        assert_eq!(restart_notes(&before, &moved).len(), 1);
        let gone = Config::parse("[model]\nprovider = \"demo\"\n").unwrap();
        assert_eq!(started_differently(&before, &gone), ["telegram"]);
    }
}
