//! What one agent turn did, as the control plane saw it: counted by the session's proxy
//! as each thing happens, and stored with the outbox segment that ends the turn (its
//! risk is [`crate::gateway::risk::turn_risk`]).

use queue_proto::items::OutboxItem;

/// What one agent turn did, as the control plane saw it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TurnSummary {
    /// Tool calls the model asked for, by name.
    pub tools: std::collections::BTreeMap<String, u32>,
    pub model_calls: u32,
    /// Bytes sent to the model plus reply bytes.
    pub bytes_out: u64,
    pub refusals: u32,
    pub replies: u32,
    pub change_requests: u32,
    /// Model calls that failed (refused by the budget, or the provider failed).
    #[serde(default)]
    pub model_failures: u32,
    /// Voice-note transcripts asked for: outside content the turn read.
    #[serde(default)]
    pub transcriptions: u32,
    /// Web fetches and searches asked for.
    #[serde(default)]
    pub web_calls: u32,
}

impl TurnSummary {
    /// Whether the model could not be used in this turn at all: every call failed.
    /// What the agent then replies is a failure notice, whatever it says it is.
    pub fn model_failed(&self) -> bool {
        self.model_failures > 0 && self.model_calls == 0
    }

    /// Adds what an outbox segment's own items did: its replies and change requests.
    pub fn add_items(&mut self, items: &[OutboxItem]) {
        for item in items {
            match item {
                OutboxItem::AssistantReply(r) => {
                    self.replies += 1;
                    self.bytes_out += r.text.len() as u64;
                }
                OutboxItem::DocumentReply(d) => {
                    self.replies += 1;
                    self.bytes_out += d.text.len() as u64;
                }
                OutboxItem::ChangeRequest(_) => self.change_requests += 1,
                OutboxItem::Note(_) | OutboxItem::ScheduleRequest(_) => {}
            }
        }
    }

    /// Adds an earlier part of the same turn (one whose segment was not stored).
    pub fn absorb(&mut self, earlier: TurnSummary) {
        for (name, n) in earlier.tools {
            let count = self.tools.entry(name).or_default();
            *count = count.saturating_add(n);
        }
        self.model_calls = self.model_calls.saturating_add(earlier.model_calls);
        self.bytes_out = self.bytes_out.saturating_add(earlier.bytes_out);
        self.refusals = self.refusals.saturating_add(earlier.refusals);
        self.replies = self.replies.saturating_add(earlier.replies);
        self.change_requests = self.change_requests.saturating_add(earlier.change_requests);
        self.model_failures = self.model_failures.saturating_add(earlier.model_failures);
        self.transcriptions = self.transcriptions.saturating_add(earlier.transcriptions);
        self.web_calls = self.web_calls.saturating_add(earlier.web_calls);
    }
}
