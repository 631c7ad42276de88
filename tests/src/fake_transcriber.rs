//! A loopback fake of an OpenAI-compatible transcription server
//! (`POST /v1/audio/transcriptions`, multipart with `model` and `file`): it answers
//! `{"text": ...}` with the transcript the test set for the audio's bytes, and refuses
//! (400, OpenAI's error shape) audio it has no transcript for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::fake_http::{FakeHttp, Handler, Scripted};

/// A running fake transcriber.
#[derive(Debug)]
pub struct FakeTranscriber {
    pub http: FakeHttp,
    transcripts: Arc<Mutex<HashMap<Vec<u8>, String>>>,
}

impl FakeTranscriber {
    pub async fn start() -> FakeTranscriber {
        let transcripts: Arc<Mutex<HashMap<Vec<u8>, String>>> = Arc::default();
        let known = transcripts.clone();
        let handler: Handler = Arc::new(move |req| {
            let known = known.clone();
            Box::pin(async move {
                if req.path != "/v1/audio/transcriptions" || req.method != "POST" {
                    return Scripted::status(404);
                }
                let found = known
                    .lock()
                    .expect("transcripts")
                    .iter()
                    .find(|(audio, _)| contains(&req.body, audio))
                    .map(|(_, t)| t.clone());
                match found {
                    Some(text) if contains(&req.body, b"name=\"model\"") => {
                        Scripted::json(json!({ "text": text }))
                    }
                    _ => {
                        let mut s = Scripted::json(json!({ "error": {
                            "message": "Invalid file format.", "type": "invalid_request_error" } }));
                        s.status = 400;
                        s
                    }
                }
            })
        });
        FakeTranscriber {
            http: FakeHttp::serve(handler).await,
            transcripts,
        }
    }

    /// Audio containing `audio` is transcribed as `text`.
    pub fn knows(&self, audio: &[u8], text: &str) {
        self.transcripts
            .lock()
            .expect("transcripts")
            .insert(audio.to_vec(), text.to_owned());
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
