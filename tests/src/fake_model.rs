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
    start_tool_model(Arc::new(echo_script)).await
}

/// Starts the fake model, answering each call only after `delay` (a slow model).
pub async fn start_slow_echo_model(delay: std::time::Duration) -> FakeHttp {
    let script: ToolScript = Arc::new(echo_script);
    let handler: Handler = Arc::new(move |req| {
        let script = script.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            scripted(&req.json(), &script)
        })
    });
    FakeHttp::serve(handler).await
}

/// `reply` with `echo: <the message>`, and for `remind me in N: TEXT` a `schedule` at
/// the instant N seconds ahead (with its offset: the control plane takes it as it is).
fn echo_script(text: &str) -> Vec<(&'static str, Value)> {
    let mut calls = vec![("reply", json!({ "text": format!("{ECHO}{text}") }))];
    if let Some((secs, what)) = text
        .strip_prefix("remind me in ")
        .and_then(|r| r.split_once(": "))
        .and_then(|(n, w)| Some((n.parse::<i64>().ok()?, w)))
    {
        let at = jiff::Timestamp::now()
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .unwrap_or(jiff::Timestamp::MAX);
        calls.push(("schedule", json!({ "at": at.to_string(), "text": what })));
    }
    calls
}

/// Which tool calls a scripted model makes for a person's message: `(tool, input)`.
pub type ToolScript = Arc<dyn Fn(&str) -> Vec<(&'static str, Value)> + Send + Sync>;

/// Starts a fake model that answers a person's message with the tool calls `script`
/// gives for its text (none: a plain `echo:` answer), and ends the turn with `done`
/// once it sees their results. It speaks OpenAI's chat completions, and Anthropic's
/// Messages API when asked at `/v1/messages`. What it was sent is in
/// [`FakeHttp::received`].
pub async fn start_tool_model(script: ToolScript) -> FakeHttp {
    let handler: Handler = Arc::new(move |req| {
        let script = script.clone();
        Box::pin(async move {
            if req.path.ends_with("/v1/messages") {
                scripted_anthropic(&req.json(), &script)
            } else {
                scripted(&req.json(), &script)
            }
        })
    });
    FakeHttp::serve(handler).await
}

/// Like [`start_tool_model`] (OpenAI only), and a model that obeys what it reads:
/// `after_tool` gives the calls it makes on seeing the results of its last calls
/// (joined); none: it ends the turn with `done`.
pub async fn start_obedient_model(script: ToolScript, after_tool: ToolScript) -> FakeHttp {
    let handler: Handler = Arc::new(move |req| {
        let (script, after_tool) = (script.clone(), after_tool.clone());
        Box::pin(async move {
            let body = req.json();
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            let results = trailing_results(&messages);
            if results.is_empty() {
                return scripted(&body, &script);
            }
            let joined = results.join("\n");
            let calls = after_tool(&joined);
            if calls.is_empty() {
                return scripted(&body, &script);
            }
            openai_answer(
                openai_calls(calls, &format!("obey-{}", messages.len())),
                String::new(),
            )
        })
    });
    FakeHttp::serve(handler).await
}

fn scripted(body: &Value, script: &ToolScript) -> Scripted {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    // A user message with an image is a list of parts; its text is the first part's.
    let text = last["content"]
        .as_str()
        .or_else(|| last["content"][0]["text"].as_str())
        .unwrap_or("");
    let calls = if last["role"] == "tool" {
        Vec::new()
    } else {
        openai_calls(script(text), &format!("call-{}", messages.len()))
    };
    let said = if last["role"] == "tool" {
        "done".to_owned()
    } else {
        format!("{ECHO}{text}")
    };
    openai_answer(calls, said)
}

/// OpenAI `tool_calls` for `calls`, their ids `<tag>-<index>`.
fn openai_calls(calls: Vec<(&'static str, Value)>, tag: &str) -> Vec<Value> {
    calls
        .into_iter()
        .enumerate()
        .map(|(i, (name, input))| {
            json!({ "id": format!("{tag}-{i}"), "type": "function",
                    "function": { "name": name, "arguments": input.to_string() } })
        })
        .collect()
}

/// A chat completion that makes `calls`, or (with none) says `said` and stops.
fn openai_answer(calls: Vec<Value>, said: String) -> Scripted {
    let (message, finish) = if calls.is_empty() {
        (json!({ "role": "assistant", "content": said }), "stop")
    } else {
        (
            json!({ "role": "assistant", "content": null, "tool_calls": calls }),
            "tool_calls",
        )
    };
    Scripted::json(json!({
        "id": "fake", "object": "chat.completion",
        "choices": [{ "index": 0, "message": message, "finish_reason": finish }],
        "usage": { "prompt_tokens": 10, "completion_tokens": 5 }
    }))
}

fn scripted_anthropic(body: &Value, script: &ToolScript) -> Scripted {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let blocks = last["content"].as_array().cloned().unwrap_or_default();
    let answered = blocks.iter().any(|b| b["type"] == "tool_result");
    let text = blocks.iter().find_map(|b| b["text"].as_str()).unwrap_or("");
    let mut content: Vec<Value> = if answered {
        Vec::new()
    } else {
        script(text)
            .into_iter()
            .enumerate()
            .map(|(i, (name, input))| {
                json!({ "type": "tool_use", "id": format!("toolu-{}-{i}", messages.len()),
                        "name": name, "input": input })
            })
            .collect()
    };
    let stop = if content.is_empty() {
        let said = if answered {
            "done".to_owned()
        } else {
            format!("{ECHO}{text}")
        };
        content.push(json!({ "type": "text", "text": said }));
        "end_turn"
    } else {
        "tool_use"
    };
    Scripted::json(json!({
        "id": "msg-fake", "type": "message", "role": "assistant", "model": "fake",
        "content": content, "stop_reason": stop,
        "usage": { "input_tokens": 10, "output_tokens": 5 }
    }))
}

/// The results of tool calls the model was sent, in order (OpenAI's `tool` messages of
/// the last message of each request that ends with them; Anthropic's `tool_result`
/// blocks).
pub fn tool_results(model: &FakeHttp) -> Vec<String> {
    let mut out = Vec::new();
    for r in model.received() {
        let body = r.json();
        let messages = body["messages"].as_array().cloned().unwrap_or_default();
        out.extend(trailing_results(&messages));
        if let Some(last) = messages.last() {
            for b in last["content"].as_array().into_iter().flatten() {
                if b["type"] == "tool_result" {
                    out.extend(b["content"].as_str().map(str::to_owned));
                }
            }
        }
    }
    out
}

/// The results of the last answer's tool calls: the run of OpenAI `tool` messages at
/// the end, in order.
fn trailing_results(messages: &[Value]) -> Vec<String> {
    let mut results: Vec<String> = messages
        .iter()
        .rev()
        .take_while(|m| m["role"] == "tool")
        .filter_map(|m| m["content"].as_str().map(str::to_owned))
        .collect();
    results.reverse();
    results
}
