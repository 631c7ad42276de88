//! A loopback fake of an OpenAI-compatible chat-completions server that drives the
//! agent through a real tool call: to a user message it answers by calling `reply` with
//! `echo: <the message>`; once it sees the tool's result it ends the turn.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::fake_http::{FakeHttp, Handler, Scripted};

/// The prefix of every reply the fake model asks for.
pub const ECHO: &str = "echo: ";

/// Starts the fake model.
pub async fn start_echo_model() -> FakeHttp {
    let handler: Handler = Arc::new(|req| Box::pin(async move { answer(&req.json()) }));
    FakeHttp::serve(handler).await
}

fn answer(body: &Value) -> Scripted {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let message = if last["role"] == "tool" {
        json!({ "role": "assistant", "content": "done" })
    } else {
        let text = last["content"].as_str().unwrap_or("");
        let args = json!({ "text": format!("{ECHO}{text}") }).to_string();
        json!({ "role": "assistant", "content": null, "tool_calls": [{
            "id": format!("call-{}", messages.len()), "type": "function",
            "function": { "name": "reply", "arguments": args } }] })
    };
    let finish = if message.get("tool_calls").is_some() {
        "tool_calls"
    } else {
        "stop"
    };
    Scripted::json(json!({
        "id": "fake", "object": "chat.completion",
        "choices": [{ "index": 0, "message": message, "finish_reason": finish }],
        "usage": { "prompt_tokens": 10, "completion_tokens": 5 }
    }))
}
