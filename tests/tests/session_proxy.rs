//! The session proxy's outbox ingestion: each seq is taken in once and in order, a
//! replayed or re-published seq is refused, and a hostile segment is refused and dropped.
//! A segment is removed only once the consumer has stored its items.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use control_plane::model::demo::DemoProvider;
use control_plane::proxy::budget::Budgets;
use control_plane::proxy::server::{Refused, SessionHandler};
use control_plane::proxy::session::{SessionEvent, SessionProxy};
use queue_proto::agent::OutboxWriter;
use queue_proto::control::OutboxReader;
use queue_proto::ids::{Seq, SessionId};
use queue_proto::items::{AssistantReply, OutboxItem};
use queue_proto::keys::{MasterKey, SessionSalt, derive_session_keys};
use queue_proto::proxy::OutboxNotice;

#[tokio::test(flavor = "multi_thread")]
async fn each_outbox_seq_is_taken_in_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let [inbox, outbox, private] = ["inbox.d", "outbox.d", "private"].map(|d| {
        let p = dir.path().join(d);
        std::fs::create_dir(&p).unwrap();
        p
    });
    let id = SessionId::try_from("ingest").unwrap();
    let keys = derive_session_keys(
        &MasterKey::generate().unwrap(),
        &id,
        &SessionSalt::generate().unwrap(),
    );
    let (tx, events) = tokio::sync::mpsc::channel(control_plane::proxy::session::EVENT_QUEUE);
    let reader = OutboxReader::new(outbox.clone(), private, id.clone(), &keys);
    let (proxy, _signal) = SessionProxy::new(
        id.clone(),
        inbox,
        reader,
        Arc::new(DemoProvider),
        Budgets::default(),
        Duration::from_secs(1),
        tx,
    );
    // The consumer stores nothing until told to, then confirms every outbox segment.
    let storing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut log = consume(events, storing.clone());
    let writer = OutboxWriter::new(outbox.clone(), id, &keys);
    let reply = |t: &str| {
        OutboxItem::AssistantReply(AssistantReply {
            in_reply_to: 1,
            text: t.into(),
        })
    };

    // Not confirmed as stored: refused, and the segment stays for a later announce.
    writer.publish(Seq(2), &[reply("first")]).unwrap();
    assert_eq!(
        proxy.outbox(OutboxNotice { seq: Seq(2) }).await,
        Err(Refused::UNAVAILABLE)
    );
    assert!(outbox.join(Seq(2).file_name()).exists());
    assert_eq!(log.recv().await.unwrap(), "outbox 2 (not stored)");
    storing.store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.outbox(OutboxNotice { seq: Seq(2) }).await.unwrap();
    assert_eq!(log.recv().await.unwrap(), "outbox 2");
    assert!(
        !outbox.join(Seq(2).file_name()).exists(),
        "a stored segment is removed"
    );

    // The agent publishes seq 2 again, and an older seq 1: both refused, nothing emitted.
    writer.publish(Seq(2), &[reply("again")]).unwrap();
    writer.publish(Seq(1), &[reply("older")]).unwrap();
    for seq in [Seq(2), Seq(1)] {
        assert_eq!(
            proxy.outbox(OutboxNotice { seq }).await,
            Err(Refused::REJECTED)
        );
        assert_eq!(log.recv().await.unwrap(), "refused outbox");
    }

    // A hostile file at the next seq is refused and dropped; a good one after it is taken.
    std::fs::write(outbox.join(Seq(3).file_name()), b"not a segment").unwrap();
    assert_eq!(
        proxy.outbox(OutboxNotice { seq: Seq(3) }).await,
        Err(Refused::REJECTED)
    );
    assert_eq!(log.recv().await.unwrap(), "refused outbox");
    assert!(!outbox.join(Seq(3).file_name()).exists());
    writer.publish(Seq(4), &[reply("next")]).unwrap();
    proxy.outbox(OutboxNotice { seq: Seq(4) }).await.unwrap();
    assert_eq!(log.recv().await.unwrap(), "outbox 4");
    assert!(log.try_recv().is_err(), "no items were emitted twice");
}

/// Answers outbox events as stored when `storing` is set, and logs every event.
fn consume(
    mut events: tokio::sync::mpsc::Receiver<SessionEvent>,
    storing: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            let line = match e {
                SessionEvent::Outbox { seq, stored, .. } => {
                    if storing.load(std::sync::atomic::Ordering::SeqCst) {
                        stored.send(()).unwrap();
                        format!("outbox {}", seq.0)
                    } else {
                        format!("outbox {} (not stored)", seq.0)
                    }
                }
                SessionEvent::Refused { what, .. } => format!("refused {what}"),
                other => format!("{other:?}"),
            };
            let _ = tx.send(line);
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_request_gets_the_gateways_id_or_a_refusal_never_silence() {
    use control_plane::proxy::session::{EVENT_QUEUE, SessionEvent};
    use queue_proto::ids::ChangeId;
    use queue_proto::items::{ChangeRequest, ChangeTarget};
    let dir = tempfile::tempdir().unwrap();
    let id = SessionId::try_from("flood").unwrap();
    let keys = derive_session_keys(
        &MasterKey::generate().unwrap(),
        &id,
        &SessionSalt::generate().unwrap(),
    );
    let (tx, mut events) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let filler = tx.clone();
    let reader = OutboxReader::new(dir.path().into(), dir.path().into(), id.clone(), &keys);
    let (proxy, _) = SessionProxy::new(
        id.clone(),
        dir.path().into(),
        reader,
        Arc::new(DemoProvider),
        Budgets::default(),
        Duration::from_secs(1),
        tx,
    );
    let proxy = Arc::new(proxy);
    let request = ChangeRequest {
        target: ChangeTarget::Tools,
        after: "[\"shell\"]".into(),
        reason: "x".repeat(1000),
    };
    // The gateway files it: the agent learns the gateway's id.
    let call = tokio::spawn({
        let (p, r) = (proxy.clone(), request.clone());
        async move { p.change_request(r).await }
    });
    let Some(SessionEvent::ChangeRequested { filed, session, .. }) = events.recv().await else {
        panic!("no change request event");
    };
    assert_eq!(session, id);
    filed
        .send(ChangeId::try_from("c0123456789abcdef").unwrap())
        .unwrap();
    assert_eq!(
        call.await.unwrap().unwrap().id.as_str(),
        "c0123456789abcdef"
    );
    // The gateway could not file it (the answer is dropped): refused.
    let call = tokio::spawn({
        let (p, r) = (proxy.clone(), request.clone());
        async move { p.change_request(r).await }
    });
    drop(events.recv().await);
    assert_eq!(call.await.unwrap(), Err(Refused::UNAVAILABLE));
    // The queue is full: refused at once.
    for _ in 0..EVENT_QUEUE {
        filler
            .try_send(SessionEvent::ModelFailed {
                session: id.clone(),
                reason: "filler".into(),
            })
            .unwrap();
    }
    assert_eq!(
        proxy.change_request(request.clone()).await,
        Err(Refused::UNAVAILABLE)
    );
    // Nobody consumes any more: refused.
    drop(events);
    assert_eq!(
        proxy.change_request(request).await,
        Err(Refused::UNAVAILABLE)
    );
}
