//! The offline demo model: scripted, no network, no account, and labelled as a demo in
//! every reply, so a new user can see the whole pipeline work before configuring a real
//! model. It answers a user message by calling the `reply` tool with an echo, and ends
//! the turn once it sees that tool's result.

use queue_proto::proxy::{ContentBlock, ModelRequest, ModelResponse, Role, StopReason, Usage};

use super::{Provider, ProviderError};

/// The label every demo reply starts with.
pub const DEMO_LABEL: &str = "[demo model, not an AI]";

/// The scripted offline provider.
#[derive(Debug, Clone, Copy, Default)]
pub struct DemoProvider;

impl DemoProvider {
    fn answer(request: &ModelRequest) -> ModelResponse {
        let last = request.messages.last();
        let saw_tool_result = last.is_some_and(|m| {
            m.content
                .iter()
                .any(|b| matches!(b, ContentBlock::ToolResult { .. }))
        });
        let user_text = last
            .filter(|m| m.role == Role::User)
            .and_then(|m| {
                m.content.iter().find_map(|b| match b {
                    ContentBlock::Text { text } => Some(text.as_str()),
                    _ => None,
                })
            })
            .unwrap_or("");
        let offers_reply = request.tools.iter().any(|t| t.name == "reply");
        let (content, stop_reason) = if saw_tool_result || !offers_reply {
            (
                vec![ContentBlock::Text {
                    text: format!("{DEMO_LABEL} done"),
                }],
                StopReason::EndTurn,
            )
        } else {
            let echo: String = user_text.chars().take(500).collect();
            let reply = format!("{DEMO_LABEL} You said: {echo}");
            let call = ContentBlock::ToolUse {
                id: format!("demo-{}", request.messages.len()),
                name: "reply".into(),
                input: serde_json::json!({ "text": reply }),
            };
            (vec![call], StopReason::ToolUse)
        };
        let input_tokens = request.messages.len() as u64 * 10;
        ModelResponse {
            content,
            stop_reason,
            usage: Usage {
                input_tokens,
                output_tokens: 10,
            },
        }
    }
}

impl Provider for DemoProvider {
    fn name(&self) -> &'static str {
        "demo"
    }

    async fn complete(&self, request: &ModelRequest) -> Result<ModelResponse, ProviderError> {
        Ok(Self::answer(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue_proto::proxy::{ChatMessage, ToolSpec};

    fn request(messages: Vec<ChatMessage>, tools: bool) -> ModelRequest {
        let tools = if tools {
            vec![ToolSpec {
                name: "reply".into(),
                description: "".into(),
                input_schema: serde_json::json!({}),
            }]
        } else {
            vec![]
        };
        ModelRequest {
            system: String::new(),
            messages,
            tools,
            max_tokens: 100,
        }
    }

    fn user(text: &str) -> ChatMessage {
        ChatMessage {
            role: Role::User,
            content: vec![ContentBlock::Text { text: text.into() }],
        }
    }

    #[test]
    fn a_user_message_gets_a_labelled_reply_call_then_the_turn_ends() {
        let first = DemoProvider::answer(&request(vec![user("hello")], true));
        assert_eq!(first.stop_reason, StopReason::ToolUse);
        let ContentBlock::ToolUse { name, input, id } = &first.content[0] else {
            panic!("{first:?}")
        };
        assert_eq!(name, "reply");
        assert_eq!(input["text"], format!("{DEMO_LABEL} You said: hello"));

        let result = ChatMessage {
            role: Role::User,
            content: vec![ContentBlock::ToolResult {
                tool_use_id: id.clone(),
                content: "sent".into(),
                is_error: false,
            }],
        };
        let assistant = ChatMessage {
            role: Role::Assistant,
            content: first.content.clone(),
        };
        let second = DemoProvider::answer(&request(vec![user("hello"), assistant, result], true));
        assert_eq!(second.stop_reason, StopReason::EndTurn);
        assert!(
            matches!(&second.content[0], ContentBlock::Text { text } if text.starts_with(DEMO_LABEL))
        );
    }

    #[test]
    fn without_a_reply_tool_it_only_talks() {
        let r = DemoProvider::answer(&request(vec![user("hi")], false));
        assert_eq!(r.stop_reason, StopReason::EndTurn);
    }
}
