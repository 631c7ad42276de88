//! The Anthropic Messages API: `POST {base}/v1/messages` with `x-api-key` and
//! `anthropic-version`; content blocks `text`, `tool_use`, `tool_result` and `image`
//! (base64 source).

use queue_proto::proxy::{ContentBlock, ModelRequest, ModelResponse, Role, StopReason, Usage};
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{ApiKey, ApprovedEndpoint, RetryPolicy, client, post_json};
use super::{Provider, ProviderError};

/// The API version this mapping is written against.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// One configured Anthropic model.
#[derive(Debug, Clone)]
pub struct Anthropic {
    pub endpoint: ApprovedEndpoint,
    pub model: String,
    pub key: ApiKey,
    pub retry: RetryPolicy,
    client: reqwest::Client,
}

impl Anthropic {
    pub fn new(endpoint: ApprovedEndpoint, model: String, key: ApiKey) -> Self {
        Anthropic {
            endpoint,
            model,
            key,
            retry: RetryPolicy::default(),
            client: client(),
        }
    }
}

fn block(b: &ContentBlock) -> Value {
    match b {
        ContentBlock::Text { text } => json!({ "type": "text", "text": text }),
        ContentBlock::ToolUse { id, name, input } => {
            json!({ "type": "tool_use", "id": id, "name": name, "input": input })
        }
        ContentBlock::ToolResult {
            tool_use_id,
            content,
            is_error,
        } => {
            json!({ "type": "tool_result", "tool_use_id": tool_use_id, "content": content, "is_error": is_error })
        }
        ContentBlock::Image { media_type, data } => json!({
            "type": "image",
            "source": { "type": "base64", "media_type": media_type, "data": data }
        }),
    }
}

/// The request body for `request`.
pub fn body(model: &str, request: &ModelRequest) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| {
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            {
                // Anthropic refuses empty text blocks.
                let content: Vec<Value> = m
                    .content
                    .iter()
                    .filter(|b| !matches!(b, ContentBlock::Text { text } if text.is_empty()))
                    .map(block)
                    .collect();
                json!({ "role": role, "content": content })
            }
        })
        .collect();
    let mut body =
        json!({ "model": model, "max_tokens": request.max_tokens, "messages": messages });
    if !request.system.is_empty() {
        body["system"] = json!(request.system);
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| json!({ "name": t.name, "description": t.description, "input_schema": t.input_schema }))
            .collect();
    }
    body
}

#[derive(Deserialize)]
struct Answer {
    content: Vec<AnswerBlock>,
    stop_reason: Option<String>,
    usage: Option<AnswerUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnswerBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct AnswerUsage {
    input_tokens: u64,
    output_tokens: u64,
}

/// Parses an answer into the provider-neutral response.
pub fn parse(bytes: &[u8]) -> Result<ModelResponse, ProviderError> {
    let a: Answer = serde_json::from_slice(bytes).map_err(|_| ProviderError::BadAnswer)?;
    let content = a
        .content
        .into_iter()
        .filter_map(|b| match b {
            AnswerBlock::Text { text } => Some(ContentBlock::Text { text }),
            AnswerBlock::ToolUse { id, name, input } => {
                Some(ContentBlock::ToolUse { id, name, input })
            }
            AnswerBlock::Other => None,
        })
        .collect();
    let stop_reason = match a.stop_reason.as_deref() {
        Some("tool_use") => StopReason::ToolUse,
        Some("max_tokens") => StopReason::MaxTokens,
        _ => StopReason::EndTurn,
    };
    let usage = a.usage.map_or(
        Usage {
            input_tokens: 0,
            output_tokens: 0,
        },
        |u| Usage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
        },
    );
    Ok(ModelResponse {
        content,
        stop_reason,
        usage,
    })
}

impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    async fn complete(&self, request: &ModelRequest) -> Result<ModelResponse, ProviderError> {
        let url = self.endpoint.join("/v1/messages");
        let headers = [
            ("x-api-key", self.key.expose()),
            ("anthropic-version", ANTHROPIC_VERSION),
        ];
        let bytes = post_json(
            &self.client,
            &url,
            &headers,
            &body(&self.model, request),
            &self.retry,
        )
        .await?;
        parse(&bytes)
    }
}
