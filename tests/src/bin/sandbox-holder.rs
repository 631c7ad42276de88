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
    // A proxy socket that takes connections and never answers: the agent's first wait
    // blocks, so the sandbox lives until it is killed (without one the agent would exit
    // at once and race the test's look at what was left behind).
    let layout = manager.layout();
    control_plane::sandbox::layout::prepare_session(layout, &session, 65534, 65534)
        .expect("session directories");
    let sock = runsc_config::socket_path(&layout.socket_dir(&session));
    let _ = std::fs::remove_file(&sock);
    let _proxy = std::os::unix::net::UnixListener::bind(&sock).expect("proxy socket");
    std::os::unix::fs::chown(&sock, Some(65534), Some(65534)).expect("socket owner");
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
