//! Files that came with messages: handed to the channel's fetcher, recorded when
//! fetched or refused (the message is published once none is pending), and the
//! transcripts of voice notes an agent asks for, made from the bytes the control plane
//! fetched itself and within the session's day's allowance.

use std::sync::Arc;

use queue_proto::ids::SessionId;
use queue_proto::items::{
    ATTACHMENT_PART_BYTES, Attachment, AttachmentKind, InboxItem, MAX_TEXT_BYTES,
};
use queue_proto::proxy::{TranscriptionAnswer, TranscriptionRequest};

use super::{Service, ServiceError};
use crate::model::transcribe::Transcriber;
use crate::store::attachments::{Fetched, PendingFile, ReadyFile};

impl Service {
    /// The next file of `channel`'s messages to fetch, taking sessions in turn: that of
    /// the first session after `after` (see [`crate::store::Store::next_pending_file`]).
    pub fn next_pending_file(
        &self,
        channel: &str,
        after: Option<&str>,
    ) -> Result<Option<PendingFile>, ServiceError> {
        Ok(self.db(|s| s.next_pending_file(channel, after))?)
    }

    /// How many files, and bytes of them, `session` passed on today (`None`: unknown).
    pub fn files_used_today(&self, session: &SessionId) -> Option<(u64, u64)> {
        let now = crate::state::now_secs();
        self.db(|s| s.usage_today(session, crate::store::usage::FILES.kind, now))
            .ok()
    }

    /// Takes `channel`'s pending files in turn by session, judges each with `fetch`,
    /// and records what it found; waits for new files when there are none. Runs until
    /// serve stops.
    pub async fn take_files<F, Fut>(self: Arc<Self>, channel: &'static str, fetch: F)
    where
        F: Fn(PendingFile) -> Fut,
        Fut: std::future::Future<Output = (i64, Fetched)>,
    {
        let mut last: Option<String> = None;
        loop {
            match self.next_pending_file(channel, last.as_deref()) {
                Ok(Some(p)) => {
                    last = Some(p.session.clone());
                    let (id, fetched) = fetch(p).await;
                    self.file_fetched(id, &fetched, crate::state::now_secs())
                        .await;
                }
                Ok(None) => self.files_arrived(std::time::Duration::from_secs(1)).await,
                Err(e) => {
                    tracing::error!(channel, error = %e, "reading the files to fetch failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Waits until a message with files may have been stored, or `at_most`.
    pub async fn files_arrived(&self, at_most: std::time::Duration) {
        let _ = tokio::time::timeout(at_most, self.files.notified()).await;
    }

    /// Records what fetching file `id` found, then publishes what no longer waits.
    pub async fn file_fetched(self: &Arc<Self>, id: i64, fetched: &Fetched, now: i64) {
        if let Err(e) = self.db(|s| s.file_fetched(id, fetched, now)) {
            tracing::error!(error = %e, "recording a fetched file failed");
            return;
        }
        self.outbound_changed();
        self.publish_all_received().await;
    }

    /// The transcript of the voice note `request` names, for `session`'s agent.
    pub(super) async fn transcribe(
        &self,
        session: &SessionId,
        request: TranscriptionRequest,
    ) -> Option<TranscriptionAnswer> {
        let refused = |reason: &str| {
            Some(TranscriptionAnswer::Refused {
                reason: reason.to_owned(),
            })
        };
        let Ok(message) = i64::try_from(request.message_id) else {
            return refused("there is no such voice note waiting for an answer");
        };
        let found = self
            .db(|s| s.voice_note(session, message, request.index))
            .map_err(
                |e| tracing::error!(session = %session, error = %e, "reading a voice note failed"),
            )
            .ok()?;
        let Some((audio, kept)) = found else {
            return refused("there is no such voice note waiting for an answer");
        };
        if let Some(text) = kept {
            return Some(TranscriptionAnswer::Text { text });
        }
        let Some(transcriber) = self.transcriber() else {
            return refused("no transcription service is set up");
        };
        let now = crate::state::now_secs();
        let charged = self
            .db(|s| s.charge_transcription(session, audio.len(), now))
            .map_err(|e| tracing::error!(session = %session, error = %e, "charging a transcription failed"))
            .ok()?;
        if !charged {
            return refused("today's transcription allowance for this conversation is used up");
        }
        match transcriber.transcribe(audio).await {
            Ok(text) => {
                let text: String = text.chars().take(MAX_TEXT_BYTES / 4).collect();
                if let Err(e) =
                    self.db(|s| s.keep_transcript(session, message, request.index, &text))
                {
                    tracing::warn!(session = %session, error = %e, "keeping a transcript failed");
                }
                Some(TranscriptionAnswer::Text { text })
            }
            Err(e) => {
                tracing::warn!(session = %session, error = %e, "a voice note could not be transcribed");
                refused(&format!(
                    "the transcription service could not transcribe it: {e}"
                ))
            }
        }
    }

    fn transcriber(&self) -> Option<Transcriber> {
        let config = self.config();
        let t = config.transcription.as_ref()?;
        Transcriber::new(&t.base_url, &t.model, t.api_key_file.as_deref())
            .map_err(|e| tracing::error!(error = %e, "the transcription service is not usable"))
            .ok()
    }
}

/// A message's ready files as inbox items: each in parts of at most
/// [`ATTACHMENT_PART_BYTES`]; a voice note as one item without its bytes. A file whose
/// items would not pass the item checks is left out (and logged), never the segment.
pub(super) fn attachment_items(message_id: u64, files: &[ReadyFile]) -> Vec<InboxItem> {
    use base64::Engine;
    use queue_proto::items::QueueItem;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut items = Vec::new();
    for f in files {
        let mut name = f.name.clone();
        let mut cut = name.len().min(255);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
        let mut these = Vec::new();
        let chunks: Vec<&[u8]> = if f.kind == AttachmentKind::Voice || f.data.is_empty() {
            vec![&[]]
        } else {
            f.data.chunks(ATTACHMENT_PART_BYTES).collect()
        };
        let parts = chunks.len() as u32;
        for (part, chunk) in chunks.into_iter().enumerate() {
            these.push(InboxItem::Attachment(Attachment {
                message_id,
                index: f.index,
                kind: f.kind,
                media_type: f.media_type.clone(),
                name: name.clone(),
                total_bytes: f.data.len() as u64,
                part: part as u32,
                parts,
                data: b64.encode(chunk),
            }));
        }
        match these.iter().find_map(|i| i.encode().err()) {
            None => items.extend(these),
            Some(e) => {
                tracing::error!(message = message_id, error = %e, "a file was left out of its segment")
            }
        }
    }
    items
}
