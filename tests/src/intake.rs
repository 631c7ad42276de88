//! A stand-in for the service behind a session proxy: it hands each outbox segment it
//! takes to the test, stores only while told to, and answers change requests as the
//! test scripted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use control_plane::proxy::session::{
    Intake, NotStored, ReminderCall, ReminderReply, Taken, WebCall,
};
use control_plane::proxy::turn::TurnSummary;
use queue_proto::ids::{ChangeId, Seq, SessionId};
use queue_proto::items::{ChangeRequest, OutboxItem};
use queue_proto::proxy::{
    ReminderAnswer, ReminderList, TranscriptionAnswer, TranscriptionRequest, WebAnswer,
};
use tokio::sync::mpsc;

/// An outbox segment handed to the intake.
#[derive(Debug)]
pub struct Handed {
    pub seq: Seq,
    pub items: Vec<OutboxItem>,
    pub turn: TurnSummary,
    /// Whether the intake said it was stored.
    pub stored: bool,
}

/// How the intake answers one change request.
#[derive(Debug, Clone)]
pub enum Filing {
    Filed(ChangeId),
    NotFiled,
    /// Never answers (the proxy must still answer the agent).
    Hang,
}

/// Records every call; see the module documentation.
#[derive(Debug)]
pub struct RecordingIntake {
    storing: AtomicBool,
    /// While set, a stored segment is answered as a duplicate of an earlier one.
    duplicates: AtomicBool,
    taken: mpsc::UnboundedSender<Handed>,
    filings: Mutex<VecDeque<Filing>>,
    requests: mpsc::UnboundedSender<(SessionId, ChangeRequest)>,
}

/// What the test reads back.
#[derive(Debug)]
pub struct Recorded {
    pub taken: mpsc::UnboundedReceiver<Handed>,
    pub requests: mpsc::UnboundedReceiver<(SessionId, ChangeRequest)>,
}

impl RecordingIntake {
    /// An intake that stores from the start if `storing`, and files nothing until told.
    pub fn new(storing: bool) -> (RecordingIntake, Recorded) {
        let (taken, taken_rx) = mpsc::unbounded_channel();
        let (requests, requests_rx) = mpsc::unbounded_channel();
        let intake = RecordingIntake {
            storing: AtomicBool::new(storing),
            duplicates: AtomicBool::new(false),
            taken,
            filings: Mutex::new(VecDeque::new()),
            requests,
        };
        (
            intake,
            Recorded {
                taken: taken_rx,
                requests: requests_rx,
            },
        )
    }

    pub fn set_storing(&self, storing: bool) {
        self.storing.store(storing, Ordering::SeqCst);
    }

    pub fn set_duplicates(&self, duplicates: bool) {
        self.duplicates.store(duplicates, Ordering::SeqCst);
    }

    /// Queues the answer to the next change request (none queued: not filed).
    pub fn answer_next(&self, filing: Filing) {
        self.filings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(filing);
    }
}

impl Intake for RecordingIntake {
    async fn outbox(
        &self,
        _session: &SessionId,
        seq: Seq,
        items: Vec<OutboxItem>,
        turn: TurnSummary,
    ) -> Result<Taken, NotStored> {
        let stored = self.storing.load(Ordering::SeqCst);
        let _ = self.taken.send(Handed {
            seq,
            items,
            turn,
            stored,
        });
        if stored && self.duplicates.load(Ordering::SeqCst) {
            Ok(Taken::Duplicate)
        } else if stored {
            Ok(Taken::Stored)
        } else {
            Err(NotStored)
        }
    }

    async fn change_request(
        &self,
        session: &SessionId,
        request: ChangeRequest,
    ) -> Option<ChangeId> {
        let _ = self.requests.send((session.clone(), request));
        let next = self
            .filings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        match next {
            Some(Filing::Filed(id)) => Some(id),
            Some(Filing::NotFiled) | None => None,
            Some(Filing::Hang) => std::future::pending().await,
        }
    }

    /// Has no web.
    async fn web(&self, _session: &SessionId, _call: WebCall) -> Option<WebAnswer> {
        Some(WebAnswer::Refused {
            reason: "this intake has no web".into(),
        })
    }

    /// Holds no voice notes.
    async fn transcribe(
        &self,
        _session: &SessionId,
        _request: TranscriptionRequest,
    ) -> Option<TranscriptionAnswer> {
        Some(TranscriptionAnswer::Refused {
            reason: "this intake holds no voice notes".into(),
        })
    }

    /// Keeps no reminders: every one is refused, and none are listed.
    async fn reminders(&self, _session: &SessionId, call: ReminderCall) -> Option<ReminderReply> {
        Some(match call {
            ReminderCall::List => ReminderReply::List(ReminderList { reminders: vec![] }),
            ReminderCall::Set(_) | ReminderCall::Cancel(_) => {
                ReminderReply::Answer(ReminderAnswer::Refused {
                    reason: "this intake keeps no reminders".into(),
                })
            }
        })
    }
}
