//! A loopback fake of an OpenAI-compatible chat-completions server that drives the
//! agent through real tool calls: to a user message it answers by calling `reply` with
//! `echo: <the message>` (and, for `remind me in N: TEXT`, `schedule` at the instant N
//! seconds ahead); once it sees the tools' results it ends the turn.

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

/// Starts the fake model, answering each call only after `delay` (a slow model).
pub async fn start_slow_echo_model(delay: std::time::Duration) -> FakeHttp {
    let handler: Handler = Arc::new(move |req| {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            answer(&req.json())
        })
    });
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
        let mut calls = vec![json!({
            "id": format!("call-{}", messages.len()), "type": "function",
            "function": { "name": "reply", "arguments": args } })];
        if let Some((secs, what)) = text
            .strip_prefix("remind me in ")
            .and_then(|r| r.split_once(": "))
            .and_then(|(n, w)| Some((n.parse::<i64>().ok()?, w)))
        {
            // An instant with its offset: the control plane takes it as it is.
            let at = jiff::Timestamp::now()
                .checked_add(jiff::SignedDuration::from_secs(secs))
                .unwrap_or(jiff::Timestamp::MAX);
            let args = json!({ "at": at.to_string(), "text": what }).to_string();
            calls.push(json!({
                "id": format!("call-{}-s", messages.len()), "type": "function",
                "function": { "name": "schedule", "arguments": args } }));
        }
        json!({ "role": "assistant", "content": null, "tool_calls": calls })
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
