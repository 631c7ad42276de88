//! The service's calls for channels and the operator interfaces: each is one question
//! or one step, answered from the store. Nothing outside the service holds the store;
//! what a channel or the admin socket may do to it is exactly this list (and
//! [`Service::receive`] for what arrives).

use queue_proto::ids::SessionId;

use super::{Service, ServiceError};
use crate::audit;
use crate::store::changes::{ChangeDetail, ChangeSummary, Prompt, TurnRow};
use crate::store::outbound::{Delivered, Outbound};
use crate::store::state::MessageState;

/// The shortest beginning of a change request's id that may name it.
const MIN_ID_PREFIX: usize = 4;

/// Chats looked at for each delivery: the ones waiting longest.
const DUE_HEADS: u32 = 256;

/// The counts `health` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub version: u64,
    pub sessions: u64,
    pub pending_changes: u64,
}

/// What `ironclaw status` shows of a running service.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// The `ironclaw` release.
    pub release: String,
    pub pid: u32,
    /// Unix seconds.
    pub started_at: i64,
    /// The approved configuration version in force.
    pub config_version: u64,
    /// The provider, and the model if one is named.
    pub model: String,
    /// The channels and interfaces listening: `console`, `telegram`, `bridge`, `admin_api`.
    pub channels: Vec<String>,
    /// Those whose configuration in force (added, removed or changed) takes effect only
    /// once serve restarts.
    pub after_restart: Vec<String>,
    pub sessions: u64,
    pub sandboxes_live: u64,
    pub max_live: u64,
    pub pending_changes: u64,
    pub last_warning: Option<crate::logging::Warning>,
}

/// The channels and interfaces `config` names, as `status` calls them.
fn channel_names(config: &crate::config::Config) -> Vec<String> {
    let mut names = vec!["console".to_owned()];
    names.extend(
        config
            .channels
            .telegram
            .as_ref()
            .map(|_| "telegram".to_owned()),
    );
    names.extend(config.channels.bridge.as_ref().map(|_| "bridge".to_owned()));
    names.extend(config.admin_api.as_ref().map(|_| "admin_api".to_owned()));
    names
}

impl Service {
    /// The service at a glance, for `ironclaw status`.
    pub fn status(&self) -> Result<Status, ServiceError> {
        let health = self.health()?;
        let config = self.config();
        let provider = format!("{:?}", config.model.provider).to_lowercase();
        let model = match &config.model.model {
            Some(m) => format!("{provider} {m}"),
            None => provider,
        };
        let channels = channel_names(&self.started_with);
        let after_restart = super::started_differently(&self.started_with, &config)
            .into_iter()
            .map(str::to_owned)
            .collect();
        Ok(Status {
            release: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_at: self.started_at,
            config_version: health.version,
            model,
            channels,
            after_restart,
            sessions: health.sessions,
            sandboxes_live: self.manager.live() as u64,
            max_live: config.sandbox.max_live as u64,
            pending_changes: health.pending_changes,
            last_warning: crate::logging::last_warning(),
        })
    }

    /// The stored value of cursor `name` (a channel's offset).
    pub fn cursor(&self, name: &str) -> Result<Option<String>, ServiceError> {
        Ok(self.db(|s| s.cursor(name))?)
    }

    /// The next reply to hand to push channel `channel`, marked as being sent: the
    /// oldest due reply of the chat that `rank` puts first (lowest) among those it
    /// does not rule out (`None`: a chat already being served).
    pub fn next_delivery(
        &self,
        channel: &str,
        now: i64,
        rank: impl Fn(&str) -> Option<u64>,
    ) -> Result<Option<Outbound>, ServiceError> {
        Ok(self.db(|s| {
            let heads = s.due_heads(channel, now, DUE_HEADS)?;
            let pick = heads
                .iter()
                .filter_map(|(chat, id)| rank(chat).map(|r| (r, *id)))
                .min();
            match pick {
                Some((_, id)) => s.take_outbound(id, now),
                None => Ok(None),
            }
        })?)
    }

    /// Records how a push channel's delivery attempt of `id` ended.
    pub fn record_delivery(
        &self,
        id: i64,
        result: &Delivered,
        now: i64,
    ) -> Result<(), ServiceError> {
        let max_attempts = self.config().delivery.max_delivery_attempts;
        Ok(self.db(|s| s.delivered(id, result, max_attempts, now))?)
    }

    /// A pull channel's replies after `after` not yet acknowledged, for one chat or all.
    pub fn pending_replies(
        &self,
        channel: &str,
        chat: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Outbound>, ServiceError> {
        Ok(self.db(|s| s.pending_for(channel, chat, after, limit))?)
    }

    /// A pull channel's client has everything up to `upto`.
    pub fn acknowledge_replies(
        &self,
        channel: &str,
        chat: Option<&str>,
        upto: i64,
    ) -> Result<u64, ServiceError> {
        Ok(self.db(|s| s.acknowledge(channel, chat, upto))?)
    }

    /// Where message `id` stands, if it exists.
    pub fn message_state(&self, id: i64) -> Result<Option<MessageState>, ServiceError> {
        Ok(self.db(|s| s.message_state(id))?)
    }

    /// A session's last `limit` agent turns, newest first.
    pub fn turns(&self, session: &SessionId, limit: u32) -> Result<Vec<TurnRow>, ServiceError> {
        Ok(self.db(|s| s.turns(session, limit))?)
    }

    /// Change requests, newest first: the undecided ones, or all (at most `limit`).
    pub fn changes(&self, all: bool, limit: u32) -> Result<Vec<ChangeSummary>, ServiceError> {
        Ok(self.db(|s| s.changes(all, limit))?)
    }

    /// The change requests that `given` names: its own id, else every id it begins
    /// (at least [`MIN_ID_PREFIX`] characters); at most ten.
    pub fn change_ids(&self, given: &str) -> Result<Vec<String>, ServiceError> {
        Ok(self.db(|s| {
            if s.change(given)?.is_some() {
                return Ok(vec![given.to_owned()]);
            }
            if given.len() < MIN_ID_PREFIX {
                return Ok(Vec::new());
            }
            s.change_ids_starting(given, 10)
        })?)
    }

    /// One change request in full.
    pub fn change(&self, id: &str) -> Result<Option<ChangeDetail>, ServiceError> {
        Ok(self.db(|s| s.change(id))?)
    }

    /// Approval prompts to send or to close.
    pub fn prompts_due(&self) -> Result<Vec<Prompt>, ServiceError> {
        Ok(self.db(|s| s.prompts_due())?)
    }

    /// Records what became of a prompt: sent as `sent_as`, or finished.
    pub fn prompt_done(
        &self,
        change_id: &str,
        chat: i64,
        sent_as: Option<i64>,
    ) -> Result<(), ServiceError> {
        Ok(self.db(|s| s.prompt_done(change_id, chat, sent_as))?)
    }

    /// The version in force and how many sessions and undecided requests there are.
    pub fn health(&self) -> Result<Health, ServiceError> {
        let (sessions, pending_changes) =
            self.db(|s| Ok((s.summaries()?.len(), s.pending_changes()?)))?;
        Ok(Health {
            version: self.effective().version,
            sessions: sessions as u64,
            pending_changes,
        })
    }

    /// At most `limit` audit entries after sequence number `after`, oldest first.
    pub fn audit_page(&self, after: i64, limit: u32) -> Result<Vec<audit::Entry>, ServiceError> {
        Ok(self.db(|s| Ok(audit::page(s.connection(), after, limit)?))?)
    }
}
