//! OpenAI-compatible chat completions: `POST {base}/v1/chat/completions` with a bearer
//! key. Covers OpenAI and local servers (Ollama, vLLM, llama.cpp). Tool calls arrive as
//! `tool_calls` whose arguments are a JSON *string*; tool results go back as role `tool`.

use queue_proto::proxy::{ContentBlock, ModelRequest, ModelResponse, Role, StopReason, Usage};
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{ApiKey, ApprovedEndpoint, RetryPolicy, client, post_json};
use super::{Provider, ProviderError};

/// One configured OpenAI-compatible model.
#[derive(Debug, Clone)]
pub struct OpenAiCompatible {
    pub endpoint: ApprovedEndpoint,
    pub model: String,
    /// Local servers often need no key.
    pub key: Option<ApiKey>,
    pub retry: RetryPolicy,
    client: reqwest::Client,
}

impl OpenAiCompatible {
    pub fn new(endpoint: ApprovedEndpoint, model: String, key: Option<ApiKey>) -> Self {
        OpenAiCompatible {
            endpoint,
            model,
            key,
            retry: RetryPolicy::default(),
            client: client(),
        }
    }
}

/// The request body for `request`.
pub fn body(model: &str, request: &ModelRequest) -> Value {
    let mut messages = Vec::new();
    if !request.system.is_empty() {
        messages.push(json!({ "role": "system", "content": request.system }));
    }
    for m in &request.messages {
        let text: String = m
            .content
            .iter()
            .filter_map(|b| match b {
                ContentBlock::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n");
        match m.role {
            Role::User => {
                for b in &m.content {
                    if let ContentBlock::ToolResult {
                        tool_use_id,
                        content,
                        ..
                    } = b
                    {
                        messages.push(json!({ "role": "tool", "tool_call_id": tool_use_id, "content": content }));
                    }
                }
                // A photo makes the content a list of parts: the text, then each image
                // as a data URI.
                let images: Vec<Value> = m
                    .content
                    .iter()
                    .filter_map(|b| match b {
                        ContentBlock::Image { media_type, data } => Some(json!({
                            "type": "image_url",
                            "image_url": { "url": format!("data:{media_type};base64,{data}") }
                        })),
                        _ => None,
                    })
                    .collect();
                if !images.is_empty() {
                    let mut parts = Vec::new();
                    if !text.is_empty() {
                        parts.push(json!({ "type": "text", "text": text }));
                    }
                    parts.extend(images);
                    messages.push(json!({ "role": "user", "content": parts }));
                } else if !text.is_empty() {
                    messages.push(json!({ "role": "user", "content": text }));
                }
            }
            Role::Assistant => {
                let calls: Vec<Value> = m
                    .content
                    .iter()
                    .filter_map(|b| match b {
                        ContentBlock::ToolUse { id, name, input } => Some(json!({
                            "id": id, "type": "function",
                            "function": { "name": name, "arguments": input.to_string() }
                        })),
                        _ => None,
                    })
                    .collect();
                let mut msg = json!({ "role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) } });
                if !calls.is_empty() {
                    msg["tool_calls"] = json!(calls);
                }
                messages.push(msg);
            }
        }
    }
    let mut body =
        json!({ "model": model, "max_tokens": request.max_tokens, "messages": messages });
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|t| json!({ "type": "function", "function": { "name": t.name, "description": t.description, "parameters": t.input_schema } }))
            .collect();
    }
    body
}

#[derive(Deserialize)]
struct Answer {
    choices: Vec<Choice>,
    usage: Option<AnswerUsage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    content: Option<String>,
    tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Deserialize)]
struct ToolCall {
    id: String,
    function: Function,
}

#[derive(Deserialize)]
struct Function {
    name: String,
    arguments: String,
}

#[derive(Deserialize)]
struct AnswerUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// Parses an answer into the provider-neutral response. Tool-call arguments must be a
/// JSON object encoded as a string.
pub fn parse(bytes: &[u8]) -> Result<ModelResponse, ProviderError> {
    let a: Answer = serde_json::from_slice(bytes).map_err(|_| ProviderError::BadAnswer)?;
    let choice = a
        .choices
        .into_iter()
        .next()
        .ok_or(ProviderError::BadAnswer)?;
    let mut content = Vec::new();
    if let Some(text) = choice.message.content.filter(|t| !t.is_empty()) {
        content.push(ContentBlock::Text { text });
    }
    let calls = choice.message.tool_calls.unwrap_or_default();
    let called = !calls.is_empty();
    for call in calls {
        let input: Value =
            serde_json::from_str(&call.function.arguments).map_err(|_| ProviderError::BadAnswer)?;
        if !input.is_object() {
            return Err(ProviderError::BadAnswer);
        }
        content.push(ContentBlock::ToolUse {
            id: call.id,
            name: call.function.name,
            input,
        });
    }
    let stop_reason = match choice.finish_reason.as_deref() {
        Some("tool_calls") => StopReason::ToolUse,
        Some("length") => StopReason::MaxTokens,
        _ if called => StopReason::ToolUse,
        _ => StopReason::EndTurn,
    };
    let usage = a.usage.map_or(
        Usage {
            input_tokens: 0,
            output_tokens: 0,
        },
        |u| Usage {
            input_tokens: u.prompt_tokens.unwrap_or(0),
            output_tokens: u.completion_tokens.unwrap_or(0),
        },
    );
    Ok(ModelResponse {
        content,
        stop_reason,
        usage,
    })
}

impl Provider for OpenAiCompatible {
    fn name(&self) -> &'static str {
        "openai"
    }

    async fn complete(&self, request: &ModelRequest) -> Result<ModelResponse, ProviderError> {
        let url = self.endpoint.join("/v1/chat/completions");
        let bearer = self.key.as_ref().map(|k| format!("Bearer {}", k.expose()));
        let bearer = bearer.map(zeroize::Zeroizing::new);
        let headers: Vec<(&'static str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
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
