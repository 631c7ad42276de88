//! The Bot API transport: one HTTPS `POST` per call, its answer read up to a size limit
//! before anything is parsed, and every failure sorted by what it says about whether
//! Telegram acted on the request.
//!
//! The bot token is part of every URL: errors are reported without their URL, and
//! nothing here logs a URL.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::updates::{Answer, FirstUpdateId, Object};
use crate::model::http::{ApiKey, ApprovedEndpoint, Multipart, ReadError, read_capped};

/// The largest `getUpdates` answer read; a larger one is asked for again one update at
/// a time, and a single update larger than this is skipped and recorded.
pub(super) const MAX_UPDATES_BYTES: usize = 16 * 1024 * 1024;
/// The largest answer to any other call.
pub(super) const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Attempts to send one part of a reply before giving up on it for now.
pub(super) const SEND_TRIES: u32 = 5;
/// The longest `retry_after` believed; a larger one is clamped to this.
pub(super) const MAX_RETRY_AFTER_SECS: u64 = 3600;
/// The longest wait between attempts to reach Telegram while it is unreachable.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The Bot API of one bot: where it is, and the token every call carries.
pub(super) struct BotApi {
    endpoint: ApprovedEndpoint,
    token: ApiKey,
    client: reqwest::Client,
}

impl std::fmt::Debug for BotApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotApi")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// How a Bot API call failed.
#[derive(Debug)]
pub(super) enum CallError {
    /// Not reached: the request was not sent (details withheld: they hold the URL).
    Network,
    /// Sent, but no whole answer came back: whether Telegram acted on it is unknown.
    Uncertain,
    /// The answer was larger than allowed; the first update's id, if one was found.
    TooLarge(Option<i64>),
    /// Telegram answered `ok: false`, or with a non-JSON error.
    Status {
        code: u16,
        retry_after: Option<u64>,
        description: String,
    },
}

/// Why a file could not be downloaded.
#[derive(Debug)]
pub(super) enum DownloadError {
    /// More bytes than the cap.
    TooLarge,
    /// Not fetched (details withheld: the URL holds the token).
    Failed,
}

impl BotApi {
    /// Downloads the file at Telegram's `file_path` (from `getFile`), reading at most
    /// `cap` bytes. The path is checked first: Telegram's own form, no way up.
    pub(super) async fn download(
        &self,
        file_path: &str,
        cap: u64,
        timeout: Duration,
    ) -> Result<Vec<u8>, DownloadError> {
        let safe = !file_path.is_empty()
            && file_path.len() <= 256
            && !file_path
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
            && file_path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'));
        if !safe {
            return Err(DownloadError::Failed);
        }
        let url = self
            .endpoint
            .join(&format!("/file/bot{}/{file_path}", self.token.expose()));
        let work = async {
            let mut resp = self
                .client
                .get(url)
                .send()
                .await
                .map_err(|_| DownloadError::Failed)?;
            if !resp.status().is_success() {
                return Err(DownloadError::Failed);
            }
            read_capped(&mut resp, cap).await.map_err(|e| match e {
                ReadError::TooLarge => DownloadError::TooLarge,
                ReadError::Broken => DownloadError::Failed,
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(DownloadError::Failed))
    }

    /// Sends `content` to `chat_id` as a document named `name` (`sendDocument`,
    /// multipart). The name was made safe when the document was queued.
    pub(super) async fn send_document(
        &self,
        chat_id: i64,
        name: &str,
        content: &[u8],
        timeout: Duration,
    ) -> Result<(), CallError> {
        let Some((content_type, body)) = Multipart::new()
            .field("chat_id", &chat_id.to_string())
            .file("document", name, "text/plain; charset=utf-8", content)
            .finish()
        else {
            return Err(CallError::Network);
        };
        let url = self
            .endpoint
            .join(&format!("/bot{}/sendDocument", self.token.expose()));
        let sent = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    CallError::Network
                } else {
                    CallError::Uncertain
                }
            })?;
        let status = sent.status().as_u16();
        let mut sent = sent;
        let bytes = read_capped(&mut sent, MAX_ANSWER_BYTES as u64)
            .await
            .map_err(|_| CallError::Uncertain)?;
        let answer: Answer<serde::de::IgnoredAny> =
            serde_json::from_slice(&bytes).map_err(|_| CallError::Uncertain)?;
        settle(answer, status).map(drop)
    }

    pub(super) fn new(endpoint: ApprovedEndpoint, token: ApiKey) -> BotApi {
        BotApi {
            endpoint,
            token,
            client: crate::model::http::client(),
        }
    }

    /// Where the Bot API is (the token is not part of it).
    pub(super) fn endpoint(&self) -> &ApprovedEndpoint {
        &self.endpoint
    }

    /// Calls `method` with `body`, reading at most `cap` bytes of answer. A successful
    /// call's `result` is `None` if it is missing or not of the shape `T`.
    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        body: &Value,
        timeout: Duration,
        cap: usize,
    ) -> Result<Option<T>, CallError> {
        let url = self
            .endpoint
            .join(&format!("/bot{}/{method}", self.token.expose()));
        let sent = self
            .client
            .post(url)
            .json(body)
            .timeout(timeout)
            .send()
            .await;
        let mut resp = sent.map_err(|e| {
            if e.is_connect() {
                CallError::Network
            } else {
                CallError::Uncertain
            }
        })?;
        let status = resp.status().as_u16();
        let mut bytes = Vec::new();
        let mut scanner: Option<FirstUpdateId> = None;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if let Some(scan) = scanner.as_mut() {
                        scan.feed(&chunk);
                    } else if bytes.len() + chunk.len() > cap {
                        // Too large to keep: read on without keeping it, looking only
                        // for the first update's id so that update can be skipped.
                        let mut scan = FirstUpdateId::default();
                        scan.feed(&bytes);
                        scan.feed(&chunk);
                        bytes = Vec::new();
                        scanner = Some(scan);
                    } else {
                        bytes.extend_from_slice(&chunk);
                    }
                }
                Ok(None) => break,
                Err(_) => return Err(CallError::Uncertain),
            }
        }
        if let Some(scan) = scanner {
            return Err(CallError::TooLarge(scan.found()));
        }
        let answer = match serde_json::from_slice::<Object<Answer<T>>>(&bytes) {
            Ok(Object(answer)) => answer,
            // JSON, but not an object: an error without a description.
            Err(e) if e.is_data() => {
                return Err(CallError::Status {
                    code: status,
                    retry_after: None,
                    description: "no description".into(),
                });
            }
            // Not Telegram's own answer: a front end failed, and may have passed the
            // request on before it did.
            Err(_) if status >= 500 => return Err(CallError::Uncertain),
            Err(_) => {
                return Err(CallError::Status {
                    code: status,
                    retry_after: None,
                    description: "an answer that is not JSON".into(),
                });
            }
        };
        settle(answer, status)
    }
}

/// A Bot API answer's result, or its error with the code, wait and description.
fn settle<T>(answer: Answer<T>, status: u16) -> Result<Option<T>, CallError> {
    if answer.ok == Some(true) {
        return Ok(answer.result);
    }
    Err(CallError::Status {
        code: answer.error_code.map_or(status, |c| c as u16),
        retry_after: answer.parameters.and_then(|p| p.retry_after),
        description: answer
            .description
            .as_deref()
            .unwrap_or("no description")
            .chars()
            .take(200)
            .collect(),
    })
}
