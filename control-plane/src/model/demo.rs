//! The offline demo model: scripted, no network, no account, and labelled as a demo in
//! every reply, so a new user can see the whole pipeline work before configuring a real
//! model. It answers a user message by calling the `reply` tool with an echo, and ends
//! the turn once it sees that tool's result.

use queue_proto::proxy::{ContentBlock, ModelRequest, ModelResponse, Role, StopReason, Usage};

use super::{Provider, ProviderError};

/// The label every demo reply starts with.
pub const DEMO_LABEL: &str = "[demo model, not an AI]";

/// What the first demo reply of a conversation adds: what IronClaw is, what the real
/// agent does, and how to switch to a real model.
pub const INTRO: &str = "This is IronClaw, a private assistant. Its agent runs in a gVisor \
sandbox with no network: it reads only your messages and reaches only the model you \
approve, and nothing about it changes unless an operator approves the exact change. With \
a real model it answers, keeps notes and sets reminders. This reply comes from the \
offline demo model, which only echoes. To use a real one, edit [model] in config.toml: \
for Anthropic, provider = \"anthropic\", base_url = \"https://api.anthropic.com\", \
model = \"claude-sonnet-4-5\", api_key_file = \"/etc/ironclaw/model.key\"; for Ollama, \
provider = \"openai\", base_url = \"http://127.0.0.1:11434/v1\", model = \"llama3.1\". \
Then send serve a SIGHUP and approve the change: ironclaw changes list, then \
ironclaw changes approve ID.";

/// The demo's reply to `echo`; the first of a conversation carries [`INTRO`].
pub fn reply(echo: &str, first: bool) -> String {
    let echo: String = echo.chars().take(500).collect();
    match first {
        true => format!("{DEMO_LABEL} You said: {echo}\n\n{INTRO}"),
        false => format!("{DEMO_LABEL} You said: {echo}"),
    }
}

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
            // A conversation's first request holds its one user message.
            let reply = reply(user_text, request.messages.len() == 1);
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
        // The first reply of a conversation says what IronClaw is and how to leave the demo.
        let text = input["text"].as_str().unwrap();
        assert!(text.starts_with(&format!("{DEMO_LABEL} You said: hello\n\n{INTRO}")));
        assert!(text.contains("provider = \"anthropic\"") && text.contains("11434"));
        // A later one only echoes.
        let later = DemoProvider::answer(&request(
            vec![user("hello"), user("again"), user("and again")],
            true,
        ));
        let ContentBlock::ToolUse { input, .. } = &later.content[0] else {
            panic!("{later:?}")
        };
        assert_eq!(input["text"], format!("{DEMO_LABEL} You said: and again"));

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
