//! Model providers against loopback fakes that speak the real Anthropic Messages and
//! OpenAI chat-completions JSON: the key is added by the control plane, tool calls map
//! both ways, failures are retried then reported, and no redirect is followed.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use control_plane::model::anthropic::Anthropic;
use control_plane::model::http::{ApiKey, ApprovedEndpoint, RetryPolicy};
use control_plane::model::openai::OpenAiCompatible;
use control_plane::model::{Provider, ProviderError};
use queue_proto::proxy::{ChatMessage, ContentBlock, ModelRequest, Role, StopReason, ToolSpec};
use serde_json::json;
use tests::fake_http::{FakeHttp, Scripted};

const KEY: &str = "sk-test-5f0c1e77a9";

fn fast() -> RetryPolicy {
    RetryPolicy {
        attempts: 3,
        first_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        request_timeout: Duration::from_secs(5),
    }
}

fn request(messages: Vec<ChatMessage>) -> ModelRequest {
    ModelRequest {
        system: "be brief".into(),
        messages,
        tools: vec![ToolSpec {
            name: "note_write".into(),
            description: "write a note".into(),
            input_schema: json!({"type": "object", "properties": {"name": {"type": "string"}}}),
        }],
        max_tokens: 256,
    }
}

fn user(text: &str) -> ChatMessage {
    ChatMessage {
        role: Role::User,
        content: vec![ContentBlock::Text { text: text.into() }],
    }
}

/// The second request of a tool-use exchange: the user's message, the model's tool
/// call, and the tool's result.
fn follow_up(call: &[ContentBlock], tool_use_id: &str) -> ModelRequest {
    request(vec![
        user("remember milk"),
        ChatMessage {
            role: Role::Assistant,
            content: call.to_vec(),
        },
        ChatMessage {
            role: Role::User,
            content: vec![ContentBlock::ToolResult {
                tool_use_id: tool_use_id.into(),
                content: "saved".into(),
                is_error: false,
            }],
        },
    ])
}

fn anthropic(fake: &FakeHttp) -> Anthropic {
    let mut p = Anthropic::new(
        ApprovedEndpoint::parse(&fake.base()).unwrap(),
        "claude-test".into(),
        ApiKey::new(KEY.into()),
    );
    p.retry = fast();
    p
}

fn openai(fake: &FakeHttp) -> OpenAiCompatible {
    let mut p = OpenAiCompatible::new(
        ApprovedEndpoint::parse(&fake.base()).unwrap(),
        "llama-test".into(),
        Some(ApiKey::new(KEY.into())),
    );
    p.retry = fast();
    p
}

#[tokio::test]
async fn anthropic_tool_use_round_trip() {
    let fake = FakeHttp::start(vec![
        Scripted::json(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": "Noting."}, {"type": "tool_use", "id": "toolu_1", "name": "note_write", "input": {"name": "milk"}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 7}
        })),
        Scripted::json(json!({
            "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [{"type": "text", "text": "Done."}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 20, "output_tokens": 2}
        })),
    ])
    .await;
    let p = anthropic(&fake);
    let first = p
        .complete(&request(vec![user("remember milk")]))
        .await
        .unwrap();
    assert_eq!(first.stop_reason, StopReason::ToolUse);
    assert_eq!(first.usage.input_tokens, 12);
    let ContentBlock::ToolUse { id, name, input } = &first.content[1] else {
        panic!("{first:?}")
    };
    assert_eq!(
        (id.as_str(), name.as_str(), &input["name"]),
        ("toolu_1", "note_write", &json!("milk"))
    );

    let follow_up = follow_up(&first.content, "toolu_1");
    let second = p.complete(&follow_up).await.unwrap();
    assert_eq!(second.stop_reason, StopReason::EndTurn);

    let got = fake.received();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(
            (r.method.as_str(), r.path.as_str()),
            ("POST", "/v1/messages")
        );
        assert_eq!(
            r.header("x-api-key"),
            Some(KEY),
            "the control plane adds the key"
        );
        assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    }
    let body = got[1].json();
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["system"], "be brief");
    assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
    assert_eq!(
        body["messages"][2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": "toolu_1", "content": "saved", "is_error": false})
    );
}

#[tokio::test]
async fn openai_tool_calls_round_trip_with_string_arguments() {
    let fake = FakeHttp::start(vec![
        Scripted::json(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "llama-test",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "note_write", "arguments": "{\"name\":\"milk\"}"}}]
            }}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        })),
        Scripted::json(json!({
            "id": "chatcmpl-2", "object": "chat.completion", "created": 2, "model": "llama-test",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Done."}}]
        })),
    ])
    .await;
    let p = openai(&fake);
    let first = p
        .complete(&request(vec![user("remember milk")]))
        .await
        .unwrap();
    assert_eq!(first.stop_reason, StopReason::ToolUse);
    assert_eq!(
        first.content,
        vec![ContentBlock::ToolUse {
            id: "call_1".into(),
            name: "note_write".into(),
            input: json!({"name": "milk"})
        }]
    );
    let follow_up = follow_up(&first.content, "call_1");
    let second = p.complete(&follow_up).await.unwrap();
    assert_eq!(
        second.content,
        vec![ContentBlock::Text {
            text: "Done.".into()
        }]
    );

    let got = fake.received();
    assert_eq!(got[0].path, "/v1/chat/completions");
    assert!(
        got.iter()
            .all(|r| r.header("authorization") == Some(&format!("Bearer {KEY}")))
    );
    let body = got[1].json();
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    assert_eq!(
        body["messages"][2]["tool_calls"][0]["function"]["arguments"],
        "{\"name\":\"milk\"}"
    );
    assert_eq!(
        body["messages"][3],
        json!({"role": "tool", "tool_call_id": "call_1", "content": "saved"})
    );
    assert_eq!(body["tools"][0]["type"], "function");
}

#[tokio::test]
async fn rate_limits_and_outages_are_retried_then_reported() {
    let ok = json!({"content": [{"type": "text", "text": "fine"}], "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}});
    let fake = FakeHttp::start(vec![
        Scripted::status(429).with_header("retry-after", "0"),
        Scripted::status(503),
        Scripted::json(ok),
    ])
    .await;
    assert_eq!(
        anthropic(&fake)
            .complete(&request(vec![user("hi")]))
            .await
            .unwrap()
            .stop_reason,
        StopReason::EndTurn
    );
    assert_eq!(fake.received().len(), 3);

    // A 429 storm: every attempt refused, reported as unavailable after three tries.
    let storm = FakeHttp::start(
        (0..10)
            .map(|_| Scripted::status(429).with_header("retry-after", "0"))
            .collect(),
    )
    .await;
    let err = openai(&storm)
        .complete(&request(vec![user("hi")]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::Unavailable { status: 429, .. }),
        "{err:?}"
    );
    assert_eq!(storm.received().len(), 3);

    // Nothing listening at all.
    let gone = FakeHttp::start(vec![]).await;
    let base = gone.base();
    drop(gone);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut p = Anthropic::new(
        ApprovedEndpoint::parse(&base).unwrap(),
        "m".into(),
        ApiKey::new(KEY.into()),
    );
    p.retry = fast();
    assert!(
        p.complete(&request(vec![user("hi")]))
            .await
            .unwrap_err()
            .retryable()
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let elsewhere = FakeHttp::start(vec![]).await;
    let fake = FakeHttp::start(vec![
        Scripted::status(307).with_header("location", &format!("{}/v1/messages", elsewhere.base())),
    ])
    .await;
    let err = anthropic(&fake)
        .complete(&request(vec![user("hi")]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProviderError::Refused { status: 307, at } if at.ends_with("/v1/messages")),
        "{err:?}"
    );
    assert!(
        elsewhere.received().is_empty(),
        "the redirect target received nothing"
    );
}

#[tokio::test]
async fn malformed_answers_are_refused() {
    for body in [
        json!({"choices": []}),
        json!({"choices": [{"finish_reason": "tool_calls", "message": {"content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "x", "arguments": "not json"}}]}}]}),
        json!({"choices": [{"finish_reason": "tool_calls", "message": {"content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "x", "arguments": "[1,2]"}}]}}]}),
    ] {
        let fake = FakeHttp::start(vec![Scripted::json(body)]).await;
        assert_eq!(
            openai(&fake)
                .complete(&request(vec![user("hi")]))
                .await
                .unwrap_err(),
            ProviderError::BadAnswer
        );
    }
    let huge = "x".repeat(5 * 1024 * 1024);
    let fake = FakeHttp::start(vec![Scripted::json(
        json!({"content": [{"type": "text", "text": huge}]}),
    )])
    .await;
    assert_eq!(
        anthropic(&fake)
            .complete(&request(vec![user("hi")]))
            .await
            .unwrap_err(),
        ProviderError::BadAnswer
    );
}
