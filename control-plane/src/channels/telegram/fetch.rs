//! Fetches the files that came with Telegram messages: `getFile`, then the file URL
//! (which holds the bot token, so it is never logged), at most the configured bytes,
//! within a time limit; then the bytes alone decide what the file is. One file at a
//! time, apart from the update loop, so a slow download never holds up anyone's text.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::Telegram;
use super::api::{DownloadError, MAX_ANSWER_BYTES};
use super::updates::TelegramFile;
use crate::files::{self, notice};
use crate::service::Service;
use crate::store::attachments::{Fetched, PendingFile};

/// Time to download one file.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Fetches pending files until serve stops.
pub async fn fetch_files(service: Arc<Service>, tg: Arc<Telegram>) {
    let s = service.clone();
    service
        .take_files(super::CHANNEL, move |pending| {
            let (s, tg) = (s.clone(), tg.clone());
            async move {
                let fetched = fetch(&s, &tg, &pending).await;
                if let Fetched::Refused { reason, .. } = &fetched {
                    tracing::warn!(message = pending.message, reason = %reason, "a file was refused");
                }
                (pending.id, fetched)
            }
        })
        .await;
}

async fn fetch(service: &Service, tg: &Telegram, pending: &PendingFile) -> Fetched {
    let config = service.config();
    let max = config.attachments.max_bytes;
    if pending.declared_bytes.is_some_and(|b| b > max) {
        return files::too_large(pending.declared_bytes.unwrap_or(0));
    }
    let not_fetched = |why: &str| Fetched::Refused {
        reason: format!("not fetched: {why}"),
        notice: notice::FILE_NOT_FETCHED,
    };
    let answer = tg
        .api
        .call::<TelegramFile>(
            "getFile",
            &json!({ "file_id": pending.source }),
            Duration::from_secs(30),
            MAX_ANSWER_BYTES,
        )
        .await;
    let file = match answer {
        Ok(Some(f)) => f,
        Ok(None) => return not_fetched("getFile answered without a file"),
        Err(e) => return not_fetched(&format!("getFile failed: {e:?}")),
    };
    if file.file_size.is_some_and(|b| b > max) {
        return files::too_large(file.file_size.unwrap_or(0));
    }
    let Some(path) = file.file_path else {
        return not_fetched("no file_path (the file may be too large for the Bot API)");
    };
    match tg.api.download(&path, max, DOWNLOAD_TIMEOUT).await {
        Ok(bytes) => files::check(bytes, &config),
        Err(DownloadError::TooLarge) => files::too_large(max + 1),
        Err(DownloadError::Failed) => not_fetched("the download failed"),
    }
}
