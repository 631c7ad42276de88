//! `sandbox-holder`: a stand-in control plane for the orphan test. It starts one session's
//! sandbox with the real lifecycle code, prints `started`, and waits to be SIGKILLed,
//! so the test can check that the next start removes what it left behind.
//!
//! usage: sandbox-holder STATE_DIR RUN_DIR AGENT_BINARY

#![forbid(unsafe_code)]

use std::sync::Arc;

use control_plane::sandbox::SandboxSettings;
use control_plane::sandbox::lifecycle::Manager;
use control_plane::sandbox::runtime::RunscRuntime;
use queue_proto::ids::SessionId;
use queue_proto::keys::{MasterKey, SessionSalt, derive_session_keys};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [state, run, agent] = args.as_slice() else {
        eprintln!("usage: sandbox-holder STATE_DIR RUN_DIR AGENT_BINARY");
        std::process::exit(2);
    };
    let mut settings = SandboxSettings::new(state.into(), agent.into());
    settings.run_dir = run.into();
    let (manager, _events) =
        Manager::new(Arc::new(RunscRuntime::default()), settings).expect("manager starts");
    let session = SessionId::try_from("held").expect("valid id");
    let keys = derive_session_keys(
        &MasterKey::generate().expect("random"),
        &session,
        &SessionSalt::generate().expect("random"),
    );
    manager
        .ensure_running(&session, &keys)
        .await
        .expect("sandbox starts");
    println!("started");
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}
