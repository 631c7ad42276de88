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

use control_plane::admin::{self, Outcome, Request, Response};
use control_plane::config::Config;
use control_plane::error_chain as chain;
use control_plane::printable;
use control_plane::service::Service;
use control_plane::state::StateDir;
use control_plane::store::state::{ChangeState, MessageState};

const USAGE: &str = "usage:
  ironclaw init [--state-dir DIR]
  ironclaw serve [--config FILE] [--state-dir DIR]
  ironclaw send [--session NAME] [--wait SECS] [--raw] TEXT...   (TEXT - reads standard input;
                 replies are printed with control and invisible characters escaped, unless --raw)
  ironclaw sessions list [--json] | show NAME [--json] | delete NAME
  ironclaw changes list [--all] [--json] | show ID [--json] | propose FILE [--reason TEXT]
  ironclaw changes approve ID | reject ID
  ironclaw audit verify | export
  ironclaw doctor [--json]                                (exit 1 on any critical finding)
Exit status: 0 done; 1 refused or failed; 2 usage; 3 `send` has no reply yet;
4 no such session or change request; 5 not an operator.
The state directory is --state-dir, else $IRONCLAW_STATE_DIR, else /var/lib/ironclaw.";

struct Args {
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    session: Option<String>,
    wait: Option<u64>,
    json: bool,
    all: bool,
    reason: Option<String>,
    /// `send`: print replies exactly as they came, escape sequences included.
    raw: bool,
    rest: Vec<String>,
}

fn parse(raw: Vec<String>) -> Result<Args, String> {
    let mut args = Args {
        state_dir: None,
        config: None,
        session: None,
        wait: None,
        json: false,
        all: false,
        reason: None,
        raw: false,
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
            "--all" => args.all = true,
            "--raw" => args.raw = true,
            "--reason" => args.reason = Some(value("--reason")?),
            "--version" | "-V" => args.rest.push("version".into()),
            "--" => args.rest.extend(it.by_ref()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}")),
            _ => args.rest.push(a),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    // The master key, session keys and tokens live in this process's memory: it is
    // never dumped to a core file, and no process of the same uid may trace or read it.
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        eprintln!("ironclaw: making the process undumpable failed: {e}");
        return ExitCode::FAILURE;
    }
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
        ["sessions", "show", name] => sessions_show(&state, name, args.json),
        ["changes", "list"] => changes_list(&state, args.all, args.json),
        ["changes", "show", id] => changes_show(&state, id, args.json).map(|_| ExitCode::SUCCESS),
        ["changes", "propose", file] => changes_propose(&state, file, args.reason.as_deref()),
        ["changes", "approve", id] => changes_decide(&state, id, true),
        ["changes", "reject", id] => changes_decide(&state, id, false),
        ["audit", "verify"] => audit_verify(&state),
        ["audit", "export"] => audit_export(&state),
        ["doctor"] => doctor(&state, args.json),
        _ => return usage("unknown or incomplete command"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ironclaw: {e}");
            // The service's failures carry their kind; anything else is a failure.
            e.downcast_ref::<admin::Failure>()
                .map_or(ExitCode::FAILURE, |f| ExitCode::from(f.kind.exit_code()))
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("ironclaw: {problem}\n{USAGE}");
    ExitCode::from(2)
}

type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

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
    let text = Config::read_text(&config_path).map_err(|e| chain(&e))?;
    let master = state.load_master_key().map_err(|e| chain(&e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(state.clone(), config_path, text, master))
}

async fn run(
    state: StateDir,
    config_path: PathBuf,
    text: String,
    master: queue_proto::keys::MasterKey,
) -> CliResult {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let service = Service::start(text, state.clone(), master)
        .await
        .map_err(|e| chain(&e))?;
    let listener = admin::bind(&state.admin_socket())?;
    let mut tasks = vec![tokio::spawn(admin::serve(service.clone(), listener))];
    tasks.extend(control_plane::channels::start(&service).map_err(|e| chain(&e))?);
    if let Some(cfg) = &service.config().admin_api {
        tasks.push(control_plane::admin_api::start(service.clone(), cfg));
    }
    tracing::info!(state_dir = %state.root.display(), admin_socket = %state.admin_socket().display(), "serving");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Never a reload: a difference becomes a change request for an operator.
                match Config::read_text(&config_path) {
                    Ok(text) => {
                        if service.check_drift(&text).is_none() {
                            tracing::info!("SIGHUP: nothing new in the configuration file (it is an approved text, or already filed)");
                        }
                    }
                    Err(e) => tracing::warn!(error = %chain(&e), "SIGHUP: reading the configuration file failed"),
                }
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
                // An agent's text may hold escape sequences aimed at the terminal.
                if args.raw {
                    println!("{r}");
                } else {
                    println!("{}", printable(r));
                }
            }
            if state.is_some_and(MessageState::is_waiting) {
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

/// One request to the running service; an `Error` answer becomes the command's error.
fn ask(
    state: &StateDir,
    req: &Request,
    timeout: Duration,
) -> Result<Response, Box<dyn std::error::Error>> {
    match admin::request(&state.admin_socket(), req, timeout).map_err(|e| chain(&e))? {
        Response::Error(e) => Err(e.into()),
        other => Ok(other),
    }
}

fn unexpected() -> Box<dyn std::error::Error> {
    "unexpected answer from the service".into()
}

fn when(secs: i64) -> String {
    let now = control_plane::state::now_secs();
    if secs >= now {
        format!("in {}", span(secs - now))
    } else {
        format!("{} ago", span(now - secs))
    }
}

fn span(s: i64) -> String {
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn sessions_show(state: &StateDir, name: &str, json: bool) -> CliResult {
    let req = Request::SessionsShow { name: name.into() };
    let Response::Turns(turns) = ask(state, &req, Duration::from_secs(30))? else {
        return Err(unexpected());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&turns)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("last agent turns of {name}, newest first:");
    println!(
        "{:<10} {:>5} {:>6} {:>9} {:>7} {:>8}  TOOLS",
        "WHEN", "RISK", "CALLS", "BYTES-OUT", "REFUSED", "CHANGES"
    );
    for t in turns {
        let tools: Vec<String> = t
            .summary
            .tools
            .iter()
            .map(|(k, v)| format!("{}×{v}", printable(k)))
            .collect();
        println!(
            "{:<10} {:>5.2} {:>6} {:>9} {:>7} {:>8}  {}",
            when(t.at),
            t.risk,
            t.summary.model_calls,
            t.summary.bytes_out,
            t.summary.refusals,
            t.summary.change_requests,
            tools.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn changes_list(state: &StateDir, all: bool, json: bool) -> CliResult {
    let Response::Changes(list) = ask(
        state,
        &Request::ChangesList { all },
        Duration::from_secs(30),
    )?
    else {
        return Err(unexpected());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no {}change requests", if all { "" } else { "undecided " });
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<18} {:<10} {:>5} {:<15} {:<24} {:<10} NOTE",
        "ID", "STATE", "RISK", "TARGET", "REQUESTER", "EXPIRES"
    );
    for c in list {
        let note = c
            .decided_by
            .map(|b| format!("by {b}"))
            .or(c.rule)
            .map(|n| printable(&n))
            .unwrap_or_default();
        println!(
            "{:<18} {:<10} {:>5.2} {:<15} {:<24} {:<10} {}",
            c.id,
            c.state,
            c.risk,
            c.target,
            c.requester,
            when(c.expires_at),
            note
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints a change request in full; returns the hash of the text shown.
fn changes_show(
    state: &StateDir,
    id: &str,
    json: bool,
) -> Result<String, Box<dyn std::error::Error>> {
    let req = Request::ChangesShow { id: id.into() };
    let Response::Change { detail, diff } = ask(state, &req, Duration::from_secs(30))? else {
        return Err(unexpected());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&detail)?);
        return Ok(detail.after_hash);
    }
    let c = &detail.summary;
    println!("change request {}", c.id);
    println!("  state       {}", c.state);
    println!("  requester   {}", c.requester);
    println!("  target      {}", c.target);
    println!(
        "  reason      {}",
        printable(&detail.reason.replace('\n', " "))
    );
    println!(
        "  made from   configuration version {}",
        detail.base_version
    );
    println!("  risk        {:.2}", c.risk);
    for op in &detail.operations {
        println!("                {:.2}  {}", op.weight, op.what);
    }
    if let Some(rule) = &c.rule {
        println!("  policy      {}", printable(rule));
    }
    if let Some(by) = &c.decided_by {
        println!("  decided by  {by}");
    }
    println!("  expires     {}", when(c.expires_at));
    println!("  sha256      {}", detail.after_hash);
    println!("the exact change:");
    print!("{}", printable(&diff));
    Ok(detail.after_hash)
}

fn changes_propose(state: &StateDir, file: &str, reason: Option<&str>) -> CliResult {
    let text = Config::read_text(std::path::Path::new(file)).map_err(|e| chain(&e))?;
    let req = Request::ChangesPropose {
        text,
        reason: reason.unwrap_or("proposed by an operator").into(),
    };
    let Response::Filed(c) = ask(state, &req, Duration::from_secs(30))? else {
        return Err(unexpected());
    };
    match c.state {
        ChangeState::Pending => {
            println!(
                "filed {} (risk {:.2}); another operator approves it with: ironclaw changes approve {}",
                c.id, c.risk, c.id
            );
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!(
                "ironclaw: {} was denied by the policy: {}",
                c.id,
                printable(&c.rule.unwrap_or_default())
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn changes_decide(state: &StateDir, id: &str, approve: bool) -> CliResult {
    // What is decided is exactly what was just shown: the service checks the hash.
    let hash = changes_show(state, id, false)?;
    let req = Request::ChangesDecide {
        id: id.into(),
        approve,
        hash: Some(hash),
    };
    let Response::Decided {
        outcome,
        version,
        why,
    } = ask(state, &req, Duration::from_secs(120))?
    else {
        return Err(unexpected());
    };
    match (outcome, version) {
        (Outcome::Applied, Some(v)) => {
            println!("approved and applied: configuration version {v} is in force");
            Ok(ExitCode::SUCCESS)
        }
        (Outcome::Rejected, _) => {
            println!("rejected");
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!("ironclaw: refused: {}", why.unwrap_or_default());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn doctor(state: &StateDir, json: bool) -> CliResult {
    use control_plane::doctor::Severity;
    let findings = control_plane::doctor::run(state);
    if json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        for f in &findings {
            let level = match f.severity {
                Severity::Critical => "CRITICAL",
                Severity::Warning => "warning",
                Severity::Info => "info",
            };
            println!(
                "{level:<9} {}\n          {}\n          fix: {}",
                f.id,
                printable(&f.problem),
                f.fix
            );
        }
        let critical = findings
            .iter()
            .filter(|f| f.severity == Severity::Critical)
            .count();
        println!(
            "{} findings, {critical} critical ({})",
            findings.len(),
            state.root.display()
        );
    }
    Ok(
        if findings.iter().any(|f| f.severity == Severity::Critical) {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}

fn open_store(
    state: &StateDir,
) -> Result<(control_plane::store::Store, queue_proto::keys::MasterKey), String> {
    let master = state.load_master_key().map_err(|e| chain(&e))?;
    let store =
        control_plane::store::Store::open(&state.store(), &master).map_err(|e| chain(&e))?;
    Ok((store, master))
}

fn audit_verify(state: &StateDir) -> CliResult {
    let (store, master) = open_store(state)?;
    match store.verify_audit(&master) {
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
    let (store, _) = open_store(state)?;
    for entry in control_plane::audit::export(store.connection())? {
        println!("{}", serde_json::to_string(&entry)?);
    }
    Ok(ExitCode::SUCCESS)
}
