//! End to end under real gVisor: a user message in the inbox leads the sandboxed agent
//! through model calls (a loopback fake of the Anthropic or OpenAI API, reached only
//! through the control plane's proxy) and tool calls to a reply in the outbox. The fake
//! sees the API key on every request; nothing the agent can observe holds it. When the
//! model cannot be reached, the person still gets a reply saying so.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use control_plane::model::Provider;
use control_plane::model::anthropic::Anthropic;
use control_plane::model::http::{ApiKey, ApprovedEndpoint, RetryPolicy};
use control_plane::model::openai::OpenAiCompatible;
use control_plane::proxy::budget::Budgets;
use control_plane::proxy::server::{ProxyLimits, serve};
use control_plane::proxy::session::{Outlets, SessionEvent, SessionProxy};
use control_plane::sandbox::SandboxSettings;
use control_plane::sandbox::layout::{self, Layout};
use control_plane::sandbox::lifecycle::Manager;
use control_plane::sandbox::runtime::RunscRuntime;
use queue_proto::control::{InboxWriter, OutboxReader};
use queue_proto::ids::{Seq, SessionId};
use queue_proto::items::{
    AgentConfig, AssistantReply, InboxItem, Note, OutboxItem, ToolName, UserMessage,
};
use queue_proto::keys::{MasterKey, SessionKeys, SessionSalt, derive_session_keys};
use serde_json::json;
use tests::fake_http::{FakeHttp, Scripted};
use tests::intake::{Recorded, RecordingIntake};
use tokio::sync::mpsc;

const API_KEY: &str = "sk-e2e-9d41c07a55b3";
const FAILURE_REPLY: &str = "Sorry, the model could not be reached";

fn agent_binary() -> PathBuf {
    let p = PathBuf::from(
        std::env::var_os("IRONCLAW_AGENT_BIN").expect("IRONCLAW_AGENT_BIN is set by scripts/test"),
    );
    assert!(p.is_file());
    p
}

struct Rig {
    dir: tempfile::TempDir,
    layout: Layout,
    manager: Arc<Manager>,
    id: SessionId,
    keys: SessionKeys,
    events: mpsc::Receiver<SessionEvent>,
    recorded: Recorded,
    /// Every byte the agent received from the proxy.
    seen: Arc<std::sync::Mutex<Vec<u8>>>,
}

async fn rig<P: Provider>(name: &str, provider: P) -> Rig {
    rig_with(name, provider, Budgets::default()).await
}

/// Relays the agent's socket to the real proxy socket, keeping a copy of every byte the
/// agent receives, so a test can scan all the agent ever saw from the proxy.
fn relay(
    agent_side: tokio::net::UnixListener,
    proxy_side: PathBuf,
    seen: Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while let Ok((agent, _)) = agent_side.accept().await {
            let Ok(proxy) = tokio::net::UnixStream::connect(&proxy_side).await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let (mut ar, mut aw) = agent.into_split();
                let (mut pr, mut pw) = proxy.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut ar, &mut pw).await });
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = pr.read(&mut buf).await {
                    if n == 0 || aw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                up.abort();
            });
        }
    });
}

async fn rig_with<P: Provider>(name: &str, provider: P, budgets: Budgets) -> Rig {
    let dir = tempfile::Builder::new()
        .prefix("ice2e")
        .tempdir_in("/tmp")
        .unwrap();
    let mut settings = SandboxSettings::new(dir.path().join("state"), agent_binary());
    settings.run_dir = dir.path().join("run");
    let layout = Layout::new(&settings.state_dir, &settings.run_dir);
    let (manager, _sandbox_events) =
        Manager::new(Arc::new(RunscRuntime::default()), settings.clone()).unwrap();
    let id = SessionId::try_from(name).unwrap();
    let keys = derive_session_keys(
        &MasterKey::generate().unwrap(),
        &id,
        &SessionSalt::generate().unwrap(),
    );
    layout::prepare_session(&layout, &id, settings.uid, settings.gid).unwrap();

    // The control plane's side: the proxy, reached by the agent through a recording relay.
    let sock = runsc_config::socket_path(&layout.socket_dir(&id));
    let agent_side = tokio::net::UnixListener::bind(&sock).unwrap();
    std::os::unix::fs::chown(&sock, Some(settings.uid), Some(settings.gid)).unwrap();
    let inner = dir.path().join("proxy-inner.sock");
    let listener = tokio::net::UnixListener::bind(&inner).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    relay(agent_side, inner, seen.clone());
    let (tx, events) = mpsc::channel(control_plane::proxy::session::EVENT_QUEUE);
    let (intake, recorded) = RecordingIntake::new(true);
    let outbox = OutboxReader::new(layout.outbox(&id), layout.private(&id), id.clone(), &keys);
    let (proxy, signal) = SessionProxy::new(
        id.clone(),
        layout.inbox(&id),
        outbox,
        Arc::new(provider),
        budgets,
        Duration::from_secs(30),
        Outlets {
            intake: Arc::new(intake),
            events: tx,
        },
    );
    tokio::spawn(serve(
        listener,
        id.clone(),
        Arc::new(proxy),
        ProxyLimits::default(),
    ));

    // One inbox segment: the approved configuration and a user message.
    let items = vec![
        InboxItem::AgentConfig(AgentConfig {
            version: 1,
            instructions: "You are a careful assistant.".into(),
            tools: vec![ToolName::Reply, ToolName::NoteWrite, ToolName::NoteRead],
            max_steps_per_turn: 6,
            accepts_images: false,
        }),
        InboxItem::UserMessage(UserMessage {
            message_id: 7,
            received_at: 1_700_000_000,
            text: "remember to buy milk".into(),
            local_time: "2026-12-03T18:04:00+01:00".into(),
            time_zone: "Europe/Berlin".into(),
            attachments: 0,
        }),
    ];
    InboxWriter::new(layout.inbox(&id), id.clone(), &keys)
        .publish(Seq(1), &items)
        .unwrap();
    signal.published(Seq(1));
    manager.ensure_running(&id, &keys).await.unwrap();
    Rig {
        dir,
        layout,
        manager,
        id,
        keys,
        events,
        recorded,
        seen,
    }
}

impl Rig {
    /// Waits for the first outbox segment, with the audit records made before it.
    async fn outbox(&mut self) -> (Vec<OutboxItem>, Vec<SessionEvent>) {
        let taken = tokio::time::timeout(Duration::from_secs(90), self.recorded.taken.recv())
            .await
            .expect("an outbox segment in time")
            .unwrap();
        assert_eq!(taken.seq, Seq(1));
        // Every record of the turn was sent before the agent saw its last answer.
        let mut records = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            records.push(e);
        }
        (taken.items, records)
    }

    /// Every byte the agent could see or leave: its inbox, outbox, state and socket dir.
    fn sandbox_visible_files(&self) -> Vec<PathBuf> {
        [
            self.layout.inbox(&self.id),
            self.layout.outbox(&self.id),
            self.layout.socket_dir(&self.id),
            self.layout.rootfs(),
        ]
        .iter()
        .flat_map(|d| tests::files_under(d))
        .collect()
    }
}

fn anthropic_script() -> Vec<Scripted> {
    let msg = |content: serde_json::Value, stop: &str| {
        Scripted::json(json!({
            "id": "msg", "type": "message", "role": "assistant", "model": "claude-test",
            "content": content, "stop_reason": stop, "usage": {"input_tokens": 30, "output_tokens": 10}
        }))
    };
    vec![
        msg(
            json!([{"type": "tool_use", "id": "t1", "name": "note_write", "input": {"name": "shopping", "body": "buy milk"}}]),
            "tool_use",
        ),
        msg(
            json!([{"type": "tool_use", "id": "t2", "name": "reply", "input": {"text": "Noted: buy milk."}}]),
            "tool_use",
        ),
        msg(json!([{"type": "text", "text": "Done."}]), "end_turn"),
    ]
}

/// An Anthropic provider pointed at `fake`, retrying quickly.
fn anthropic(fake: &FakeHttp, model: &str) -> Anthropic {
    let endpoint = ApprovedEndpoint::parse(&fake.base()).unwrap();
    let mut provider = Anthropic::new(endpoint, model.into(), ApiKey::new(API_KEY.into()));
    provider.retry = fast();
    provider
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        first_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(20),
        request_timeout: Duration::from_secs(10),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_message_becomes_tool_calls_and_a_reply_with_anthropic() {
    let fake = FakeHttp::start(anthropic_script()).await;
    let provider = anthropic(&fake, "claude-test");
    let mut r = rig("e2e-anthropic", provider).await;
    let (items, _) = r.outbox().await;
    assert_eq!(
        items,
        vec![
            OutboxItem::Note(Note {
                name: "shopping".into(),
                body: "buy milk".into()
            }),
            OutboxItem::AssistantReply(AssistantReply {
                in_reply_to: 7,
                text: "Noted: buy milk.".into()
            }),
        ]
    );
    let got = fake.received();
    assert_eq!(got.len(), 3, "three model steps");
    assert!(
        got.iter().all(|q| q.header("x-api-key") == Some(API_KEY)),
        "every request carries the key"
    );
    // The agent sent the tool result back in the provider's own format.
    assert_eq!(
        got[1].json()["messages"][2]["content"][0]["tool_use_id"],
        "t1"
    );
    // The approved instructions, then the person's local time as the control plane gave it.
    assert_eq!(
        got[0].json()["system"],
        "You are a careful assistant.\n\nThe current date and time for the person is \
         2026-12-03T18:04:00+01:00 (Europe/Berlin)."
    );

    // Nothing the agent can see holds the API key.
    let mut scanned = 0;
    for f in r.sandbox_visible_files() {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes
                .windows(API_KEY.len())
                .any(|w| w == API_KEY.as_bytes()),
            "API key in {}",
            f.display()
        );
        scanned += 1;
    }
    assert!(scanned >= 2, "the agent state and the inbox were scanned");
    let seen = r.seen.lock().unwrap().clone();
    assert!(
        seen.windows(6).any(|w| w == b"reply\"" || w == b"Noted"),
        "the relay saw the model's answers"
    );
    assert!(
        !seen.windows(API_KEY.len()).any(|w| w == API_KEY.as_bytes()),
        "the API key reached the agent"
    );
    assert!(r.layout.outbox(&r.id).join("state/agent.db").is_file());
    r.manager.stop(&r.id).await.unwrap();
    drop(r.dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_pipeline_with_an_openai_compatible_server() {
    let call = |content: serde_json::Value| Scripted::json(content);
    let fake = FakeHttp::start(vec![
        call(json!({"choices": [{"finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "reply", "arguments": "{\"text\":\"Hello from llama.\"}"}}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5}})),
        call(json!({"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}]})),
    ])
    .await;
    let mut provider = OpenAiCompatible::new(
        ApprovedEndpoint::parse(&fake.base()).unwrap(),
        "llama".into(),
        None,
    );
    provider.retry = fast();
    let mut r = rig("e2e-openai", provider).await;
    let (items, _) = r.outbox().await;
    assert_eq!(
        items,
        vec![OutboxItem::AssistantReply(AssistantReply {
            in_reply_to: 7,
            text: "Hello from llama.".into()
        })]
    );
    assert_eq!(
        fake.received()[1].json()["messages"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["role"],
        "tool"
    );
    r.manager.stop(&r.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_model_is_down_the_person_is_told() {
    // Every answer is a 503.
    let fake = FakeHttp::start((0..10).map(|_| Scripted::status(503)).collect()).await;
    let provider = anthropic(&fake, "m");
    let mut r = rig("e2e-down", provider).await;
    let (items, others) = r.outbox().await;
    let [OutboxItem::AssistantReply(reply)] = items.as_slice() else {
        panic!("{items:?}")
    };
    assert!(reply.text.starts_with(FAILURE_REPLY), "{}", reply.text);
    assert!(
        others
            .iter()
            .any(|e| matches!(e, SessionEvent::ModelFailed { .. })),
        "the control plane records the failure"
    );
    assert!(r.manager.is_running(&r.id).await, "the agent carries on");
    r.manager.stop(&r.id).await.unwrap();
    let _ = &r.keys;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_budget_is_refused_and_the_person_is_told() {
    let fake = FakeHttp::start(anthropic_script()).await;
    let provider = anthropic(&fake, "m");
    let none_left = Budgets {
        requests_per_minute: 0,
        ..Budgets::default()
    };
    let mut r = rig_with("e2e-budget", provider, none_left).await;
    let (items, others) = r.outbox().await;
    let [OutboxItem::AssistantReply(reply)] = items.as_slice() else {
        panic!("{items:?}")
    };
    assert!(reply.text.starts_with(FAILURE_REPLY), "{}", reply.text);
    assert!(
        others
            .iter()
            .any(|e| matches!(e, SessionEvent::Refused { what: "model", .. })),
        "the refusal is recorded"
    );
    assert!(fake.received().is_empty(), "nothing reached the provider");
    r.manager.stop(&r.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_never_stops_calling_tools_is_cut_off_at_the_step_cap() {
    let looping = |i: usize| {
        Scripted::json(json!({
            "content": [{"type": "tool_use", "id": format!("t{i}"), "name": "note_read", "input": {"name": "x"}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 1, "output_tokens": 1}
        }))
    };
    let fake = FakeHttp::start((0..20).map(looping).collect()).await;
    let provider = anthropic(&fake, "m");
    let mut r = rig("e2e-steps", provider).await;
    let (items, _) = r.outbox().await;
    let [OutboxItem::AssistantReply(reply)] = items.as_slice() else {
        panic!("{items:?}")
    };
    assert!(reply.text.contains("too many steps"), "{}", reply.text);
    assert_eq!(
        fake.received().len(),
        6,
        "max_steps_per_turn of the approved configuration"
    );
    r.manager.stop(&r.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn one_model_answer_runs_at_most_sixteen_tool_calls() {
    // A hostile model answers once with 40 reply calls.
    let calls: Vec<serde_json::Value> = (0..40)
        .map(|i| json!({"type": "tool_use", "id": format!("t{i}"), "name": "reply", "input": {"text": format!("flood {i}")}}))
        .collect();
    let msg = |content: serde_json::Value, stop: &str| {
        Scripted::json(json!({
            "id": "msg", "type": "message", "role": "assistant", "model": "m",
            "content": content, "stop_reason": stop, "usage": {"input_tokens": 1, "output_tokens": 1}
        }))
    };
    let script = vec![
        msg(json!(calls), "tool_use"),
        msg(json!([{"type": "text", "text": "done"}]), "end_turn"),
    ];
    let fake = FakeHttp::start(script).await;
    let mut r = rig("e2e-calls", anthropic(&fake, "m")).await;
    let (items, _) = r.outbox().await;
    let replies = items
        .iter()
        .filter(|i| matches!(i, OutboxItem::AssistantReply(_)))
        .count();
    assert_eq!(replies, 16, "{items:?}");
    // The model was told which calls were not run.
    let second = String::from_utf8_lossy(&fake.received()[1].body).into_owned();
    assert_eq!(second.matches("not run: at most 16 tool calls").count(), 24);
    r.manager.stop(&r.id).await.unwrap();
}
