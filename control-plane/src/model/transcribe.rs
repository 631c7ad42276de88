//! Voice notes to text through an OpenAI-compatible `POST /v1/audio/transcriptions`
//! (a self-hosted whisper server, say): multipart with the model's name and the audio,
//! a bearer key if one is configured, no redirects, a time limit and a cap on the
//! answer. Only the control plane calls it, with bytes it fetched itself.

use std::time::Duration;

use super::http::{ApiKey, ApprovedEndpoint, client};

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
        // A boundary the sender of the audio cannot know, and that the audio lacks.
        let boundary = loop {
            let mut r = [0u8; 16];
            getrandom::getrandom(&mut r)
                .map_err(|_| TranscribeError::Setup("no random source".into()))?;
            let b = format!("ironclaw-{}", hex::encode(r));
            if !audio.windows(b.len()).any(|w| w == b.as_bytes()) {
                break b;
            }
        };
        let mut body = Vec::with_capacity(audio.len() + 512);
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{}\r\n\
                 --{boundary}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\njson\r\n\
                 --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"voice.ogg\"\r\n\
                 Content-Type: audio/ogg\r\n\r\n",
                self.model
            )
            .as_bytes(),
        );
        body.extend_from_slice(&audio);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let url = self.endpoint.join("/v1/audio/transcriptions");
        let mut req = self
            .client
            .post(url)
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
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
        let mut bytes = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|_| TranscribeError::Unreachable)?
        {
            if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(TranscribeError::BadAnswer);
            }
            bytes.extend_from_slice(&chunk);
        }
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
