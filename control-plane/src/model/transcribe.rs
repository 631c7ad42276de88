//! Voice notes to text through an OpenAI-compatible `POST /v1/audio/transcriptions`
//! (a self-hosted whisper server, say): multipart with the model's name and the audio,
//! a bearer key if one is configured, no redirects, a time limit and a cap on the
//! answer. Only the control plane calls it, with bytes it fetched itself.

use std::time::Duration;

use super::http::{ApiKey, ApprovedEndpoint, Multipart, ReadError, client, read_capped};

/// Time one transcription may take.
const TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// One configured transcription endpoint.
#[derive(Debug, Clone)]
pub struct Transcriber {
    endpoint: ApprovedEndpoint,
    model: String,
    key: Option<ApiKey>,
    client: reqwest::Client,
}

/// Why a transcription failed; says nothing the key or the audio could be read from.
#[derive(Debug, thiserror::Error)]
pub enum TranscribeError {
    #[error("the service could not be reached or did not answer in time")]
    Unreachable,
    #[error("the service refused it (status {0})")]
    Refused(u16),
    #[error("the service's answer was not a transcript")]
    BadAnswer,
    #[error("{0}")]
    Setup(String),
}

impl Transcriber {
    /// The transcriber at `base_url` using `model`, with the bearer key in
    /// `api_key_file` if there is one (read now).
    pub fn new(
        base_url: &str,
        model: &str,
        api_key_file: Option<&std::path::Path>,
    ) -> Result<Transcriber, TranscribeError> {
        let endpoint =
            ApprovedEndpoint::parse(base_url).map_err(|e| TranscribeError::Setup(e.to_string()))?;
        let key = match api_key_file {
            Some(path) => {
                Some(ApiKey::from_file(path).map_err(|e| TranscribeError::Setup(e.to_string()))?)
            }
            None => None,
        };
        Ok(Transcriber {
            endpoint,
            model: model.to_owned(),
            key,
            client: client(),
        })
    }

    /// The transcript of Ogg `audio`.
    pub async fn transcribe(&self, audio: Vec<u8>) -> Result<String, TranscribeError> {
        // A random boundary the audio does not contain: its sender cannot add fields.
        let (content_type, body) = Multipart::new()
            .field("model", &self.model)
            .field("response_format", "json")
            .file("file", "voice.ogg", "audio/ogg", &audio)
            .finish()
            .ok_or_else(|| TranscribeError::Setup("no random source".into()))?;
        let url = self.endpoint.join("/v1/audio/transcriptions");
        let mut req = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .timeout(TIMEOUT);
        if let Some(k) = &self.key {
            let mut v =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", k.expose()))
                    .map_err(|_| TranscribeError::Setup("the key is not a valid header".into()))?;
            v.set_sensitive(true);
            req = req.header(reqwest::header::AUTHORIZATION, v);
        }
        let mut resp = req.send().await.map_err(|_| TranscribeError::Unreachable)?;
        let status = resp.status();
        let bytes = read_capped(&mut resp, MAX_ANSWER_BYTES as u64)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge => TranscribeError::BadAnswer,
                ReadError::Broken => TranscribeError::Unreachable,
            })?;
        if !status.is_success() {
            return Err(TranscribeError::Refused(status.as_u16()));
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|_| TranscribeError::BadAnswer)?;
        answer["text"]
            .as_str()
            .map(str::to_owned)
            .ok_or(TranscribeError::BadAnswer)
    }
}
