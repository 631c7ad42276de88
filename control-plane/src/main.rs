//! `ironclaw`: the control plane and operator CLI.
//!
//! # Trust
//!
//! The only trusted component: runs as root, holds the master key, talks to chat apps and
//! starts one gVisor sandbox per session. Everything that arrives from a chat app, a
//! sandbox or the network is untrusted.
//!
//! Exit codes: 0 success; 1 the command failed; 2 usage error or a command not built
//! yet; 3 `send` got no reply in time (the message stays queued).

#![deny(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use control_plane::admin::{self, Request, Response};
use control_plane::config::Config;
use control_plane::service::Service;
use control_plane::state::StateDir;

const USAGE: &str = "usage:
  ironclaw init [--state-dir DIR]
  ironclaw serve [--config FILE] [--state-dir DIR]
  ironclaw send [--session NAME] [--wait SECS] TEXT...   (TEXT - reads standard input)
  ironclaw sessions list [--json] | delete NAME
  ironclaw audit verify | export
The state directory is --state-dir, else $IRONCLAW_STATE_DIR, else /var/lib/ironclaw.";

struct Args {
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    session: Option<String>,
    wait: Option<u64>,
    json: bool,
    rest: Vec<String>,
}

fn parse(raw: Vec<String>) -> Result<Args, String> {
    let mut args = Args {
        state_dir: None,
        config: None,
        session: None,
        wait: None,
        json: false,
        rest: Vec::new(),
    };
    let mut it = raw.into_iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--state-dir" => args.state_dir = Some(value("--state-dir")?.into()),
            "--config" => args.config = Some(value("--config")?.into()),
            "--session" => args.session = Some(value("--session")?),
            "--wait" => {
                let v = value("--wait")?;
                args.wait = Some(
                    v.parse()
                        .map_err(|_| format!("--wait {v:?} is not a number"))?,
                );
            }
            "--json" => args.json = true,
            "--version" | "-V" => args.rest.push("version".into()),
            "--" => args.rest.extend(it.by_ref()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => args.rest.push(a),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1).collect()) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    let state = StateDir::choose(args.state_dir.clone());
    let words: Vec<&str> = args.rest.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["version"] => {
            println!("ironclaw {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        ["init"] => init(&state),
        ["serve"] => serve(&state, args.config.clone()),
        ["send", text @ ..] if !text.is_empty() => send(&state, &args, text),
        ["sessions", "list"] => sessions_list(&state, args.json),
        ["sessions", "delete", name] => sessions_delete(&state, name),
        ["audit", "verify"] => audit_verify(&state),
        ["audit", "export"] => audit_export(&state),
        ["changes", ..] | ["doctor"] => {
            eprintln!(
                "ironclaw: `{}` is not available in this version yet",
                words[0]
            );
            Ok(ExitCode::from(2))
        }
        _ => return usage("unknown or incomplete command"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ironclaw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("ironclaw: {problem}\n{USAGE}");
    ExitCode::from(2)
}

type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

/// Writes an error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

fn init(state: &StateDir) -> CliResult {
    state.init().map_err(|e| chain(&e))?;
    println!("initialised {}", state.root.display());
    println!("  configuration  {}", state.config().display());
    println!(
        "  master key     {} (0400; back it up offline)",
        state.master_key().display()
    );
    println!("  control store  {}", state.store().display());
    println!("next: ironclaw serve --state-dir {}", state.root.display());
    Ok(ExitCode::SUCCESS)
}

fn serve(state: &StateDir, config: Option<PathBuf>) -> CliResult {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IRONCLAW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let config_path = config.unwrap_or_else(|| state.config());
    let config = Config::load(&config_path).map_err(|e| chain(&e))?;
    let master = state.load_master_key().map_err(|e| chain(&e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(state.clone(), config, master))
}

async fn run(state: StateDir, config: Config, master: queue_proto::keys::MasterKey) -> CliResult {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let service = Service::start(config, state.clone(), master)
        .await
        .map_err(|e| chain(&e))?;
    let listener = admin::bind(&state.admin_socket())?;
    let mut tasks = vec![tokio::spawn(admin::serve(service.clone(), listener))];
    tasks.extend(control_plane::channels::start(&service).map_err(|e| chain(&e))?);
    tracing::info!(state_dir = %state.root.display(), admin_socket = %state.admin_socket().display(), "serving");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::warn!("SIGHUP ignored: the configuration is never reloaded silently; restart to apply a change");
            }
        }
    }
    tracing::info!("shutting down");
    for t in &tasks {
        t.abort();
    }
    service.shutdown().await;
    let _ = std::fs::remove_file(state.admin_socket());
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn send(state: &StateDir, args: &Args, text: &[&str]) -> CliResult {
    let text = if text == ["-"] {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        text.join(" ")
    };
    let wait = args.wait.unwrap_or(120);
    let req = Request::Send {
        session: args.session.clone().unwrap_or_else(|| "console".into()),
        text,
        wait_secs: wait,
    };
    let answer = admin::request(&state.admin_socket(), &req, Duration::from_secs(wait + 30))
        .map_err(|e| chain(&e))?;
    match answer {
        Response::Replies { state, replies, .. } => {
            for r in &replies {
                println!("{r}");
            }
            if matches!(state.as_str(), "received" | "published") {
                eprintln!(
                    "ironclaw: no reply yet; it stays queued and the next `send` to this session prints it"
                );
                return Ok(ExitCode::from(3));
            }
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(e) => Err(e.into()),
        _ => Err("unexpected answer from the service".into()),
    }
}

fn sessions_list(state: &StateDir, json: bool) -> CliResult {
    let answer = admin::request(
        &state.admin_socket(),
        &Request::SessionsList,
        Duration::from_secs(30),
    )
    .map_err(|e| chain(&e))?;
    let Response::Sessions(list) = answer else {
        return Err(match answer {
            Response::Error(e) => e.into(),
            _ => "unexpected answer from the service".into(),
        });
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<32} {:<9} {:>7} {:>8} {:>6} {:>7} {:>5} {:>8} {:>10}",
        "SESSION",
        "CHANNEL",
        "PENDING",
        "ANSWERED",
        "FAILED",
        "REFUSED",
        "DEAD",
        "TO-SEND",
        "SEND-DEAD"
    );
    for s in list {
        let name = if s.name.is_empty() {
            "(no session)"
        } else {
            s.name.as_str()
        };
        println!(
            "{:<32} {:<9} {:>7} {:>8} {:>6} {:>7} {:>5} {:>8} {:>10}",
            name,
            s.channel,
            s.pending,
            s.answered,
            s.failed,
            s.refused,
            s.dead_lettered,
            s.replies_waiting,
            s.replies_dead
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn sessions_delete(state: &StateDir, name: &str) -> CliResult {
    let req = Request::SessionsDelete { name: name.into() };
    match admin::request(&state.admin_socket(), &req, Duration::from_secs(60))
        .map_err(|e| chain(&e))?
    {
        Response::Deleted(s) => {
            println!(
                "deleted {}: sandbox stopped, keys destroyed, files removed ({} pending messages and {} unsent replies discarded)",
                s.name, s.pending, s.replies_waiting
            );
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(e) => Err(e.into()),
        _ => Err("unexpected answer from the service".into()),
    }
}

fn open_store(state: &StateDir) -> Result<control_plane::store::Store, String> {
    let master = state.load_master_key().map_err(|e| chain(&e))?;
    control_plane::store::Store::open(&state.store(), &master).map_err(|e| chain(&e))
}

fn audit_verify(state: &StateDir) -> CliResult {
    let store = open_store(state)?;
    match control_plane::audit::verify(store.connection()) {
        Ok(n) => {
            println!("audit trail intact: {n} entries");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("ironclaw: audit trail BROKEN: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn audit_export(state: &StateDir) -> CliResult {
    let store = open_store(state)?;
    for entry in control_plane::audit::export(store.connection())? {
        println!("{}", serde_json::to_string(&entry)?);
    }
    Ok(ExitCode::SUCCESS)
}
