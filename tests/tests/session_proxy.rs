//! The session proxy's two ways to the rest of the control plane. Outbox ingestion: a
//! segment is removed only once the intake has stored its items, a re-published seq is
//! handed over again (the store binds each seq to its content), and a hostile segment
//! is refused and dropped. Change requests: the agent gets the gateway's id or a refusal,
//! never silence. Neither waits behind the droppable audit records.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use control_plane::model::demo::DemoProvider;
use control_plane::proxy::budget::Budgets;
use control_plane::proxy::server::{Refused, SessionHandler};
use control_plane::proxy::session::{EVENT_QUEUE, Outlets, SessionEvent, SessionProxy};
use queue_proto::agent::OutboxWriter;
use queue_proto::control::OutboxReader;
use queue_proto::ids::{ChangeId, Seq, SessionId};
use queue_proto::items::{AssistantReply, ChangeRequest, ChangeTarget, OutboxItem};
use queue_proto::keys::{MasterKey, SessionKeys, SessionSalt, derive_session_keys};
use queue_proto::proxy::OutboxNotice;
use tests::intake::{Filing, Recorded, RecordingIntake};
use tokio::sync::mpsc;

struct Rig {
    dir: tempfile::TempDir,
    id: SessionId,
    keys: SessionKeys,
    proxy: Arc<SessionProxy<DemoProvider, RecordingIntake>>,
    intake: Arc<RecordingIntake>,
    recorded: Recorded,
    /// The proxy's audit records, and a sender that can fill their queue.
    events: mpsc::Receiver<SessionEvent>,
    filler: mpsc::Sender<SessionEvent>,
}

fn rig(name: &str, storing: bool) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    for d in ["inbox.d", "outbox.d", "private"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let id = SessionId::try_from(name).unwrap();
    let keys = derive_session_keys(
        &MasterKey::generate().unwrap(),
        &id,
        &SessionSalt::generate().unwrap(),
    );
    let (tx, events) = mpsc::channel(EVENT_QUEUE);
    let (intake, recorded) = RecordingIntake::new(storing);
    let intake = Arc::new(intake);
    let reader = OutboxReader::new(
        dir.path().join("outbox.d"),
        dir.path().join("private"),
        id.clone(),
        &keys,
    );
    let (proxy, _signal) = SessionProxy::new(
        id.clone(),
        dir.path().join("inbox.d"),
        reader,
        Arc::new(DemoProvider),
        Budgets::default(),
        Duration::from_secs(1),
        Outlets {
            intake: intake.clone(),
            events: tx.clone(),
        },
    );
    Rig {
        dir,
        id,
        keys,
        proxy: Arc::new(proxy),
        intake,
        recorded,
        events,
        filler: tx,
    }
}

impl Rig {
    fn outbox_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("outbox.d")
    }

    fn writer(&self) -> OutboxWriter {
        OutboxWriter::new(self.outbox_dir(), self.id.clone(), &self.keys)
    }

    /// The name of the next audit record, if one is queued.
    fn next_record(&mut self) -> Option<String> {
        self.events.try_recv().ok().map(|e| match e {
            SessionEvent::Refused { what, .. } => format!("refused {what}"),
            other => format!("{other:?}"),
        })
    }

    /// Fills the audit records' queue to the brim, as a flood of refusals would.
    fn fill_records(&self) {
        for _ in 0..EVENT_QUEUE {
            self.filler
                .try_send(SessionEvent::ModelFailed {
                    session: self.id.clone(),
                    reason: "filler".into(),
                })
                .unwrap();
        }
        assert!(
            self.filler
                .try_send(SessionEvent::ModelFailed {
                    session: self.id.clone(),
                    reason: "one more".into(),
                })
                .is_err()
        );
    }
}

fn reply(t: &str) -> OutboxItem {
    OutboxItem::AssistantReply(AssistantReply {
        in_reply_to: 1,
        text: t.into(),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_is_removed_only_once_stored_and_a_hostile_one_is_dropped() {
    let mut r = rig("ingest", false);
    let writer = r.writer();
    let outbox = r.outbox_dir();

    // Not stored: refused, and the segment stays for a later announce.
    writer.publish(Seq(2), &[reply("first")]).unwrap();
    assert_eq!(
        r.proxy.outbox(OutboxNotice { seq: Seq(2) }).await,
        Err(Refused::UNAVAILABLE)
    );
    assert!(outbox.join(Seq(2).file_name()).exists());
    let t = r.recorded.taken.recv().await.unwrap();
    assert_eq!((t.seq, t.stored), (Seq(2), false));
    r.intake.set_storing(true);
    r.proxy.outbox(OutboxNotice { seq: Seq(2) }).await.unwrap();
    let t = r.recorded.taken.recv().await.unwrap();
    assert_eq!((t.seq, t.stored, t.items.len()), (Seq(2), true, 1));
    assert!(
        !outbox.join(Seq(2).file_name()).exists(),
        "a stored segment is removed"
    );

    // The agent publishes seq 2 again, and an older seq 1 (its own state went back):
    // each is read and handed over, for the store to bind the seq to its content.
    writer.publish(Seq(2), &[reply("again")]).unwrap();
    writer.publish(Seq(1), &[reply("older")]).unwrap();
    for seq in [Seq(2), Seq(1)] {
        r.proxy.outbox(OutboxNotice { seq }).await.unwrap();
        let t = r.recorded.taken.recv().await.unwrap();
        assert_eq!((t.seq, t.stored), (seq, true));
        assert!(!outbox.join(seq.file_name()).exists());
    }

    // A hostile file at the next seq is refused and dropped; a good one after it is taken.
    std::fs::write(outbox.join(Seq(3).file_name()), b"not a segment").unwrap();
    assert_eq!(
        r.proxy.outbox(OutboxNotice { seq: Seq(3) }).await,
        Err(Refused::REJECTED)
    );
    assert_eq!(r.next_record().as_deref(), Some("refused outbox"));
    assert!(!outbox.join(Seq(3).file_name()).exists());
    writer.publish(Seq(4), &[reply("next")]).unwrap();
    r.proxy.outbox(OutboxNotice { seq: Seq(4) }).await.unwrap();
    assert_eq!(r.recorded.taken.recv().await.unwrap().seq, Seq(4));
    assert!(
        r.recorded.taken.try_recv().is_err(),
        "no items were taken twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_segment_is_stored_while_the_audit_records_queue_is_full() {
    let mut r = rig("full", true);
    r.fill_records();
    r.writer().publish(Seq(1), &[reply("hello")]).unwrap();
    r.proxy
        .outbox(OutboxNotice { seq: Seq(1) })
        .await
        .expect("stored although no record can be queued");
    assert_eq!(r.recorded.taken.recv().await.unwrap().seq, Seq(1));
    let request = ChangeRequest {
        target: ChangeTarget::Tools,
        after: "[\"shell\"]".into(),
        reason: "x".into(),
    };
    r.intake.answer_next(Filing::Filed(
        ChangeId::try_from("c0123456789abcdef").unwrap(),
    ));
    assert_eq!(
        r.proxy.change_request(request).await.unwrap().id.as_str(),
        "c0123456789abcdef",
        "filed although no record can be queued"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_turn_ends_with_the_segment_that_is_stored() {
    let mut r = rig("turn", false);
    let request = ChangeRequest {
        target: ChangeTarget::Tools,
        after: "[]".into(),
        reason: "x".into(),
    };
    // A change request and a refused segment belong to the turn in progress.
    assert_eq!(
        r.proxy.change_request(request).await,
        Err(Refused::UNAVAILABLE)
    );
    std::fs::write(r.outbox_dir().join(Seq(1).file_name()), b"garbage").unwrap();
    assert!(r.proxy.outbox(OutboxNotice { seq: Seq(1) }).await.is_err());
    // A segment that is not stored hands the turn over, and gets it back.
    r.writer().publish(Seq(2), &[reply("hi")]).unwrap();
    assert!(r.proxy.outbox(OutboxNotice { seq: Seq(2) }).await.is_err());
    let t = r.recorded.taken.recv().await.unwrap();
    assert_eq!((t.turn.change_requests, t.turn.refusals), (1, 1));
    r.intake.set_storing(true);
    r.proxy.outbox(OutboxNotice { seq: Seq(2) }).await.unwrap();
    let t = r.recorded.taken.recv().await.unwrap();
    assert_eq!(
        (t.turn.change_requests, t.turn.refusals),
        (1, 1),
        "the turn was kept while its segment was not stored"
    );
    // The next turn starts empty.
    r.writer().publish(Seq(3), &[reply("again")]).unwrap();
    r.proxy.outbox(OutboxNotice { seq: Seq(3) }).await.unwrap();
    let t = r.recorded.taken.recv().await.unwrap();
    assert_eq!(t.turn, Default::default());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_request_gets_the_gateways_id_or_a_refusal_never_silence() {
    let mut r = rig("flood", true);
    let request = ChangeRequest {
        target: ChangeTarget::Tools,
        after: "[\"shell\"]".into(),
        reason: "x".repeat(1000),
    };
    // The gateway files it: the agent learns the gateway's id.
    r.intake.answer_next(Filing::Filed(
        ChangeId::try_from("c0123456789abcdef").unwrap(),
    ));
    assert_eq!(
        r.proxy
            .change_request(request.clone())
            .await
            .unwrap()
            .id
            .as_str(),
        "c0123456789abcdef"
    );
    let (session, asked) = r.recorded.requests.recv().await.unwrap();
    assert_eq!((session, asked.reason.len()), (r.id.clone(), 1000));
    // The gateway could not file it: refused.
    r.intake.answer_next(Filing::NotFiled);
    assert_eq!(
        r.proxy.change_request(request.clone()).await,
        Err(Refused::UNAVAILABLE)
    );
    // The gateway never answers: refused when the proxy stops waiting.
    r.intake.answer_next(Filing::Hang);
    assert_eq!(
        r.proxy.change_request(request).await,
        Err(Refused::UNAVAILABLE)
    );
}

/// A provider that answers at once and claims a usage of its choosing.
struct Claims(u64, u64);

impl control_plane::model::Provider for Claims {
    fn name(&self) -> &'static str {
        "claims"
    }

    async fn complete(
        &self,
        _request: &queue_proto::proxy::ModelRequest,
    ) -> Result<queue_proto::proxy::ModelResponse, control_plane::model::ProviderError> {
        Ok(queue_proto::proxy::ModelResponse {
            content: vec![queue_proto::proxy::ContentBlock::Text { text: "ok".into() }],
            stop_reason: queue_proto::proxy::StopReason::EndTurn,
            usage: queue_proto::proxy::Usage {
                input_tokens: self.0,
                output_tokens: self.1,
            },
        })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_claiming_huge_usage_exhausts_the_budget_instead_of_wrapping() {
    let dir = tempfile::tempdir().unwrap();
    let id = SessionId::try_from("usage").unwrap();
    let keys = derive_session_keys(
        &MasterKey::generate().unwrap(),
        &id,
        &SessionSalt::generate().unwrap(),
    );
    let (tx, _events) = mpsc::channel(EVENT_QUEUE);
    let (intake, _recorded) = RecordingIntake::new(true);
    let (proxy, _) = SessionProxy::new(
        id.clone(),
        dir.path().into(),
        OutboxReader::new(dir.path().into(), dir.path().into(), id, &keys),
        // Together the two counts wrap a u64 round to 4 tokens.
        Arc::new(Claims(u64::MAX, 5)),
        Budgets::default(),
        Duration::from_secs(1),
        Outlets {
            intake: Arc::new(intake),
            events: tx,
        },
    );
    let request = queue_proto::proxy::ModelRequest {
        system: String::new(),
        messages: Vec::new(),
        tools: Vec::new(),
        max_tokens: 16,
    };
    proxy.model(request.clone()).await.unwrap();
    assert_eq!(
        proxy.model(request).await,
        Err(Refused::BUDGET),
        "the day's tokens are spent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_flooding_its_outbox_is_held_to_its_ingestion_budget() {
    let mut r = rig("ingestflood", true);
    let writer = r.writer();
    let budget = control_plane::proxy::budget::INGEST_BUDGETS.requests_per_minute;
    // Empty segments cost no write and no record of their own.
    for seq in 1..=5 {
        writer.publish(Seq(seq), &[]).unwrap();
        r.proxy
            .outbox(OutboxNotice { seq: Seq(seq) })
            .await
            .unwrap();
        assert!(!r.outbox_dir().join(Seq(seq).file_name()).exists());
    }
    assert!(
        r.recorded.taken.try_recv().is_err(),
        "nothing was handed over"
    );
    let mut stored = 0;
    let mut refused = 0;
    let last = u64::from(budget) + 40;
    for seq in 6..=last {
        writer.publish(Seq(seq), &[reply("flood")]).unwrap();
        match r.proxy.outbox(OutboxNotice { seq: Seq(seq) }).await {
            Ok(()) => stored += 1,
            Err(Refused::BUDGET) => refused += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    // The empty ones counted against the minute too: 5 empty, budget - 5 taken, 40 refused.
    assert_eq!(stored, budget - 5);
    assert_eq!(refused, 40);
    let mut taken = 0;
    while r.recorded.taken.try_recv().is_ok() {
        taken += 1;
    }
    assert_eq!(taken, stored);
    // A refused segment stays for a later announce; nothing was recorded one by one.
    assert!(r.outbox_dir().join(Seq(last).file_name()).exists());
    assert_eq!(r.next_record(), None, "{:?}", r.next_record());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_segment_never_erases_the_turn_in_progress() {
    let mut r = rig("replay", true);
    // The turn so far: a change request the gateway did not file.
    let request = ChangeRequest {
        target: ChangeTarget::Tools,
        after: "[]".into(),
        reason: "x".into(),
    };
    assert!(r.proxy.change_request(request).await.is_err());
    // The agent publishes an earlier segment again: the store calls it a duplicate.
    r.intake.set_duplicates(true);
    r.writer().publish(Seq(1), &[reply("old")]).unwrap();
    r.proxy.outbox(OutboxNotice { seq: Seq(1) }).await.unwrap();
    assert_eq!(
        r.recorded.taken.recv().await.unwrap().turn.change_requests,
        1
    );
    // The turn goes on, and is handed over whole with the segment that ends it.
    r.intake.set_duplicates(false);
    r.writer().publish(Seq(2), &[reply("new")]).unwrap();
    r.proxy.outbox(OutboxNotice { seq: Seq(2) }).await.unwrap();
    assert_eq!(
        r.recorded.taken.recv().await.unwrap().turn.change_requests,
        1,
        "the replay did not erase the turn"
    );
}
