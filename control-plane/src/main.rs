//! `ironclaw`: the control plane and operator CLI.
//!
//! # Trust
//!
//! The only trusted component: runs as root, holds the master key, talks to chat apps and
//! starts one gVisor sandbox per session. Everything that arrives from a chat app, a
//! sandbox or the network is untrusted.
//!
//! The commands are parsed by clap ([`Cli`]); the exit statuses are [`EXIT_STATUSES`].

#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use std::time::Duration;

use control_plane::admin::{self, Outcome, Request, Response};
use control_plane::config::Config;
use control_plane::error_chain as chain;
use control_plane::printable;
use control_plane::service::Service;
use control_plane::state::StateDir;
use control_plane::store::state::{ChangeState, MessageState};

/// The exit statuses, shown under every command's help.
const EXIT_STATUSES: &str = "Exit status: 0 done; 1 refused or failed; 2 usage; 3 `send` has no reply yet; \
4 no such session or change request; 5 not an operator.";

/// IronClaw's control plane and operator CLI.
///
/// `serve` runs the assistant; the other commands talk to a running `serve` through
/// its admin socket, or read the state directory themselves (`init`, `doctor`,
/// `audit`).
#[derive(Debug, Parser)]
#[command(name = "ironclaw", version, after_help = EXIT_STATUSES)]
struct Cli {
    /// The state directory [default: $IRONCLAW_STATE_DIR, else /var/lib/ironclaw]
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Make a new state directory: master key, configuration and control store
    Init,
    /// Run the assistant: the channels, the sandboxes, the gateway and the admin socket
    Serve {
        /// The configuration file [default: config.toml in the state directory]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Is serve running, with which configuration, model and channels; sessions, live
    /// sandboxes, pending changes and the last warning (exit 1 when serve is not running)
    Status {
        /// Print the status as JSON
        #[arg(long)]
        json: bool,
    },
    /// Send a message to a session as the console and print the replies
    Send {
        /// The session to talk to
        #[arg(long, value_name = "NAME", default_value = "console")]
        session: String,
        /// How long to wait for the replies, in seconds
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        wait: u64,
        /// Print replies exactly as they came, escape sequences included (by default
        /// control and invisible characters are shown escaped)
        #[arg(long)]
        raw: bool,
        /// The message; `-` reads it from standard input (after `--`, words may begin
        /// with a dash)
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// List, inspect or delete sessions
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Change requests: list, inspect, propose, approve, reject
    #[command(subcommand)]
    Changes(ChangesCmd),
    /// The hash-chained audit trail
    #[command(subcommand)]
    Audit(AuditCmd),
    /// The configuration: the file, or the approved version in force
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Check the installation and the configuration (exit 1 on any critical finding)
    Doctor {
        /// Print the findings as JSON
        #[arg(long)]
        json: bool,
        /// Also make one real call to the configured model and to Telegram's getMe
        #[arg(long)]
        probe: bool,
    },
    /// Print a shell completion script
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), for `man -l -` or /usr/share/man/man1
    Manpage,
}

#[derive(Debug, Subcommand)]
enum SessionsCmd {
    /// Every session with its message and reply counts
    List {
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
    },
    /// A session's last agent turns
    Show {
        name: String,
        /// Print the turns as JSON
        #[arg(long)]
        json: bool,
    },
    /// Stop a session's sandbox, destroy its keys and remove everything it left
    Delete { name: String },
    /// A session's web: on or off, and its last fetches and searches (with on/off, turn
    /// it on or off)
    Web {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        set: Option<String>,
        /// Print as JSON
        #[arg(long)]
        json: bool,
    },
    /// Set the time zone of a session's person (an IANA name such as Europe/Berlin);
    /// with --default, go back to agent.timezone
    Timezone {
        name: String,
        #[arg(required_unless_present = "default", conflicts_with = "default")]
        zone: Option<String>,
        /// Use agent.timezone again
        #[arg(long)]
        default: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ChangesCmd {
    /// Undecided change requests (all of them with --all)
    List {
        /// Also the decided and expired ones
        #[arg(long)]
        all: bool,
        /// Print the list as JSON
        #[arg(long)]
        json: bool,
    },
    /// One change request in full, with the exact change
    Show {
        /// The change request's id
        id: String,
        /// Print the request as JSON
        #[arg(long)]
        json: bool,
    },
    /// File a whole configuration file as a change request
    Propose {
        /// The proposed configuration
        file: PathBuf,
        /// Why, for whoever decides
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Approve the change request exactly as shown
    Approve { id: String },
    /// Reject the change request
    Reject { id: String },
    /// Withdraw a change request you proposed yourself
    Withdraw { id: String },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Print the configuration file, or with --approved the version in force
    Show {
        /// The approved version in force (read from the control store), not the file
        #[arg(long)]
        approved: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Check the whole chain and its sealed head
    Verify,
    /// Print every entry as one JSON line
    Export,
}

/// Writes a line to stdout. A reader that went away (`ironclaw audit export | head -1`)
/// ends the command quietly, as the reader asked; any other failure is an error.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            stdout_failed(e)
        }
    }};
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("ironclaw: writing to standard output failed: {e}");
    std::process::exit(1)
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
    // Help and version go to stdout with status 0, usage errors to stderr with 2.
    let cli = Cli::parse();
    let state = StateDir::choose(cli.state_dir);
    let result = match cli.command {
        Cmd::Init => init(&state),
        Cmd::Serve { config } => serve(&state, config),
        Cmd::Status { json } => status(&state, json),
        Cmd::Send {
            session,
            wait,
            raw,
            text,
        } => send(&state, &session, wait, raw, &text),
        Cmd::Sessions(SessionsCmd::List { json }) => sessions_list(&state, json),
        Cmd::Sessions(SessionsCmd::Show { name, json }) => sessions_show(&state, &name, json),
        Cmd::Sessions(SessionsCmd::Delete { name }) => sessions_delete(&state, &name),
        Cmd::Sessions(SessionsCmd::Web { name, set, json }) => {
            sessions_web(&state, &name, set.as_deref(), json)
        }
        Cmd::Sessions(SessionsCmd::Timezone { name, zone, .. }) => {
            sessions_timezone(&state, &name, zone)
        }
        Cmd::Changes(ChangesCmd::List { all, json }) => changes_list(&state, all, json),
        Cmd::Changes(ChangesCmd::Show { id, json }) => {
            changes_show(&state, &id, json).map(|_| ExitCode::SUCCESS)
        }
        Cmd::Changes(ChangesCmd::Propose { file, reason }) => {
            changes_propose(&state, &file, reason.as_deref())
        }
        Cmd::Changes(ChangesCmd::Approve { id }) => changes_decide(&state, &id, Verdict::Approve),
        Cmd::Changes(ChangesCmd::Reject { id }) => changes_decide(&state, &id, Verdict::Reject),
        Cmd::Changes(ChangesCmd::Withdraw { id }) => changes_decide(&state, &id, Verdict::Withdraw),
        Cmd::Config(ConfigCmd::Show { approved }) => config_show(&state, approved),
        Cmd::Audit(AuditCmd::Verify) => audit_verify(&state),
        Cmd::Audit(AuditCmd::Export) => audit_export(&state),
        Cmd::Doctor { json, probe } => doctor(&state, json, probe),
        Cmd::Completions { shell } => completions(shell),
        Cmd::Manpage => manpage(),
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

fn completions(shell: clap_complete::Shell) -> CliResult {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ironclaw", &mut buf);
    write_all(&buf)
}

fn manpage() -> CliResult {
    let mut buf = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut buf)?;
    write_all(&buf)
}

/// Writes `bytes` to stdout whole, a closed pipe ending the command quietly.
fn write_all(bytes: &[u8]) -> CliResult {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        stdout_failed(e)
    }
    Ok(ExitCode::SUCCESS)
}

type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

fn init(state: &StateDir) -> CliResult {
    state.init().map_err(|e| chain(&e))?;
    out!("initialised {}", state.root.display());
    out!("  configuration  {}", state.config().display());
    out!(
        "  master key     {} (0400; back it up offline)",
        state.master_key().display()
    );
    out!("  control store  {}", state.store().display());
    // The next step must work as written: serve needs the static agent.
    let agent = control_plane::sandbox::agent_binary::resolve(None);
    match control_plane::sandbox::agent_binary::require_static(&agent) {
        Ok(()) => out!("next: ironclaw serve --state-dir {}", state.root.display()),
        Err(e) => {
            out!("the sandbox's agent is not ready: {}", chain(&e));
            out!(
                "next: in the source tree, scripts/build-static (it prints the agent's path), then"
            );
            out!(
                "      IRONCLAW_AGENT_BIN=<that path> ironclaw serve --state-dir {}",
                state.root.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(state: &StateDir, config: Option<PathBuf>) -> CliResult {
    control_plane::logging::init();
    // One serve per state directory, taken before anything is read or bound.
    let _lock = state.lock_for_serve().map_err(|e| chain(&e))?;
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
    let service = Service::start(config_path.clone(), text, state.clone(), master)
        .await
        .map_err(|e| chain(&e))?;
    let listener = admin::bind(&state.admin_socket())?;
    let mut tasks = vec![tokio::spawn(admin::serve(service.clone(), listener))];
    tasks.extend(control_plane::channels::start(&service).map_err(|e| chain(&e))?);
    if let Some(cfg) = &service.config().admin_api {
        tasks.push(control_plane::admin_api::start(service.clone(), cfg));
    }
    notify_ready();
    match service.status() {
        Ok(s) => tracing::info!(
            release = %s.release,
            config_version = s.config_version,
            model = %s.model,
            channels = %s.channels.join(","),
            state_dir = %state.root.display(),
            admin_socket = %state.admin_socket().display(),
            "serving"
        ),
        Err(e) => tracing::warn!(error = %chain(&e), "serving, but the store could not be read"),
    }
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

/// Tells systemd (`Type=notify`) that serve is ready: `READY=1` on `$NOTIFY_SOCKET`, a
/// path or an abstract name (`@...`), if the variable is set.
fn notify_ready() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = name.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name),
        None => SocketAddr::from_pathname(&name),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &a));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "telling systemd that serve is ready failed");
    }
}

fn send(state: &StateDir, session: &str, wait: u64, raw: bool, text: &[String]) -> CliResult {
    let text = if text == ["-"] {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        text.join(" ")
    };
    let req = Request::Send {
        session: session.into(),
        text,
        wait_secs: wait,
    };
    let answer = admin::request(&state.admin_socket(), &req, Duration::from_secs(wait + 30))
        .map_err(|e| chain(&e))?;
    match answer {
        Response::Replies { state, replies, .. } => {
            for r in &replies {
                // An agent's text may hold escape sequences aimed at the terminal.
                if raw {
                    out!("{r}");
                } else {
                    out!("{}", printable(r));
                }
            }
            if state == Some(MessageState::Failed) {
                eprintln!(
                    "ironclaw: the message failed (what was printed is a notice, not an answer); `ironclaw status` shows the last warning"
                );
                return Ok(ExitCode::FAILURE);
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

fn status(state: &StateDir, json: bool) -> CliResult {
    let dir = state.root.display();
    let not_running = || {
        eprintln!("ironclaw: serve is not running with the state directory {dir}");
        eprintln!("start it with: ironclaw serve --state-dir {dir}");
        Ok(ExitCode::FAILURE)
    };
    match state.serve_pid() {
        Ok(None) if !state.admin_socket().exists() => return not_running(),
        Ok(_) => {}
        // The lock is root's: whether serve runs is asked of its socket instead.
        Err(e) if !state.admin_socket().exists() => {
            return Err(format!(
                "cannot tell whether serve runs: {}: {e} (run as root, or as an operator of this state directory)",
                state.serve_lock().display()
            )
            .into());
        }
        Err(_) => {}
    }
    let answer = match admin::request(
        &state.admin_socket(),
        &Request::Status,
        Duration::from_secs(30),
    ) {
        Ok(a) => a,
        Err(admin::AdminError::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return not_running();
        }
        Err(e) => return Err(chain(&e).into()),
    };
    let s = match answer {
        Response::Status(s) => s,
        Response::Error(e) => return Err(e.into()),
        _ => return Err(unexpected()),
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let up = control_plane::state::now_secs() - s.started_at;
    out!(
        "serve         running, pid {}, up {} (ironclaw {})",
        s.pid,
        span(up),
        s.release
    );
    out!("state         {dir}");
    out!("config        version {} in force", s.config_version);
    out!("model         {}", printable(&s.model));
    if s.after_restart.is_empty() {
        out!("channels      {}", s.channels.join(", "));
    } else {
        out!(
            "channels      {} (changes to {} wait for a restart)",
            s.channels.join(", "),
            s.after_restart.join(", ")
        );
    }
    out!(
        "sessions      {} ({} sandboxes running, at most {})",
        s.sessions,
        s.sandboxes_live,
        s.max_live
    );
    if s.pending_changes == 0 {
        out!("changes       none pending");
    } else {
        out!(
            "changes       {} pending: ironclaw changes list",
            s.pending_changes
        );
    }
    match &s.last_warning {
        None => out!("last warning  none since it started"),
        Some(w) => out!(
            "last warning  {}: {} {}",
            when(w.at),
            w.level,
            printable(&w.text)
        ),
    }
    Ok(ExitCode::SUCCESS)
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
        out!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    out!(
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
        out!(
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

fn sessions_web(state: &StateDir, name: &str, set: Option<&str>, json: bool) -> CliResult {
    let req = Request::SessionsWeb {
        name: name.into(),
        off: set.map(|s| s == "off"),
    };
    let Response::Web { on, records } = ask(state, &req, Duration::from_secs(30))? else {
        return Err(unexpected());
    };
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "on": on, "records": records }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    out!("web for {name}: {}", if on { "on" } else { "off" });
    out!("last fetches and searches, newest first:");
    for r in records {
        let d = &r.detail;
        let what = if r.kind == "web_fetched" {
            format!(
                "fetch {} ({}, {} bytes)",
                d["url"].as_str().unwrap_or(""),
                d["provenance"].as_str().unwrap_or("no provenance"),
                d["bytes"]
            )
        } else {
            format!("search ({} results)", d["results"])
        };
        out!(
            "{:<10} {}: {}",
            when(r.at),
            printable(&what),
            printable(d["outcome"].as_str().unwrap_or(""))
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn sessions_timezone(state: &StateDir, name: &str, zone: Option<String>) -> CliResult {
    let req = Request::SessionsTimezone {
        name: name.into(),
        zone,
    };
    match admin::request(&state.admin_socket(), &req, Duration::from_secs(30))
        .map_err(|e| chain(&e))?
    {
        Response::TimeZone { name, zone } => {
            out!("{name}: the person's time zone is {zone}");
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(e) => Err(e.into()),
        _ => Err("unexpected answer from the service".into()),
    }
}

fn sessions_delete(state: &StateDir, name: &str) -> CliResult {
    let req = Request::SessionsDelete { name: name.into() };
    match admin::request(&state.admin_socket(), &req, Duration::from_secs(60))
        .map_err(|e| chain(&e))?
    {
        Response::Deleted(s) => {
            out!(
                "deleted {}: sandbox stopped, keys destroyed, files removed ({} pending messages and {} unsent replies discarded)",
                s.name,
                s.pending,
                s.replies_waiting
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
    if secs > now {
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
        out!("{}", serde_json::to_string_pretty(&turns)?);
        return Ok(ExitCode::SUCCESS);
    }
    out!("last agent turns of {name}, newest first:");
    out!(
        "{:<10} {:>5} {:>6} {:>9} {:>7} {:>8}  TOOLS",
        "WHEN",
        "RISK",
        "CALLS",
        "BYTES-OUT",
        "REFUSED",
        "CHANGES"
    );
    for t in turns {
        let tools: Vec<String> = t
            .summary
            .tools
            .iter()
            .map(|(k, v)| format!("{}×{v}", printable(k)))
            .collect();
        out!(
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
    // The session's fetches and searches follow its turns.
    out!("");
    sessions_web(state, name, None, false)
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
        out!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        out!("no {}change requests", if all { "" } else { "undecided " });
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "{:<18} {:<10} {:>5} {:<15} {:<24} {:<10} NOTE",
        "ID",
        "STATE",
        "RISK",
        "TARGET",
        "REQUESTER",
        "EXPIRES"
    );
    for c in list {
        let note = c
            .decided_by
            .map(|b| format!("by {b}"))
            .or(c.rule)
            .map(|n| printable(&n))
            .unwrap_or_default();
        out!(
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

/// Prints the change request `id` names (its id, or a unique beginning of it) in full;
/// returns its full id and the hash of the text shown.
fn changes_show(
    state: &StateDir,
    id: &str,
    json: bool,
) -> Result<(String, String), Box<dyn std::error::Error>> {
    let req = Request::ChangesShow { id: id.into() };
    let Response::Change { detail, diff } = ask(state, &req, Duration::from_secs(30))? else {
        return Err(unexpected());
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&detail)?);
        return Ok((detail.summary.id.clone(), detail.after_hash));
    }
    let c = &detail.summary;
    out!("change request {}", c.id);
    out!("  state       {}", c.state);
    out!("  requester   {}", c.requester);
    out!("  target      {}", c.target);
    out!(
        "  reason      {}",
        printable(&detail.reason.replace('\n', " "))
    );
    out!(
        "  made from   configuration version {}",
        detail.base_version
    );
    out!("  risk        {:.2}", c.risk);
    for op in &detail.operations {
        out!("                {:.2}  {}", op.weight, op.what);
    }
    if let Some(rule) = &c.rule {
        out!("  policy      {}", printable(rule));
    }
    if let Some(by) = &c.decided_by {
        out!("  decided by  {by}");
    }
    out!("  expires     {}", when(c.expires_at));
    out!("  sha256      {}", detail.after_hash);
    out!("the exact change:");
    write_all(printable(&diff).as_bytes())?;
    Ok((c.id.clone(), detail.after_hash.clone()))
}

fn changes_propose(state: &StateDir, file: &Path, reason: Option<&str>) -> CliResult {
    let text = Config::read_text(file).map_err(|e| chain(&e))?;
    let req = Request::ChangesPropose {
        text,
        reason: reason.unwrap_or("proposed by an operator").into(),
    };
    let Response::Filed(c) = ask(state, &req, Duration::from_secs(30))? else {
        return Err(unexpected());
    };
    match c.state {
        ChangeState::Pending => {
            out!(
                "filed {} (risk {:.2}); approve it with `ironclaw changes approve {}` (another operator does, unless you are the only one), or withdraw it with `ironclaw changes withdraw {}`",
                c.id,
                c.risk,
                c.id,
                c.id
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

/// What `changes approve`, `reject` and `withdraw` ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Approve,
    Reject,
    Withdraw,
}

fn changes_decide(state: &StateDir, id: &str, verdict: Verdict) -> CliResult {
    // What is decided is exactly what was just shown: the service checks the hash.
    // A beginning of the id is resolved once, by `show`; the decision names the full id.
    let (id, hash) = changes_show(state, id, false)?;
    let req = Request::ChangesDecide {
        id,
        approve: verdict == Verdict::Approve,
        hash: Some(hash),
        withdraw: verdict == Verdict::Withdraw,
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
            out!("approved and applied: configuration version {v} is in force");
            // Parts set up only at start wait for a restart; the answer says which.
            if let Some(notes) = why {
                for note in notes.split("; ") {
                    out!("note: {note}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        (Outcome::Rejected, _) => {
            out!(
                "{}",
                if verdict == Verdict::Withdraw {
                    "withdrawn"
                } else {
                    "rejected"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            eprintln!("ironclaw: refused: {}", why.unwrap_or_default());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The configuration a probe tries, and what it is: the file, which is what an
/// operator edits and is about to approve (the same as the approved version when
/// nothing waits); if it does not parse, the approved version.
fn config_to_probe(state: &StateDir) -> Result<(Config, String), Box<dyn std::error::Error>> {
    let file = Config::read_text(&state.config())
        .ok()
        .and_then(|t| Config::parse(&t).ok());
    if let Some(config) = file {
        return Ok((config, state.config().display().to_string()));
    }
    let (version, text) = approved_config(state)?;
    let config = Config::parse(&text).map_err(|e| chain(&e))?;
    Ok((config, format!("approved version {version}")))
}

/// The approved configuration in force, with its version: from the running serve, which
/// holds the key (after deploy/install there is no key file); from the store itself
/// when serve is not running.
fn approved_config(state: &StateDir) -> Result<(u64, String), Box<dyn std::error::Error>> {
    match ask(state, &Request::ConfigShow, Duration::from_secs(30)) {
        Ok(Response::Config { version, text }) => Ok((version, text)),
        Ok(_) => Err(unexpected()),
        Err(_) if !state.admin_socket().exists() => {
            let (store, _) = open_store(state)?;
            let current = store.current_config().map_err(|e| chain(&e))?.ok_or(
                "no configuration has been approved yet: `ironclaw serve` approves the first file",
            )?;
            Ok((current.version, current.text))
        }
        Err(e) => Err(e),
    }
}

fn doctor(state: &StateDir, json: bool, probe: bool) -> CliResult {
    use control_plane::doctor::{Finding, Severity};
    let mut findings = control_plane::doctor::run(state);
    let mut probed = Vec::new();
    let mut probed_what = String::new();
    if probe {
        match config_to_probe(state) {
            Ok((config, what)) => {
                probed_what = what;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                probed = runtime.block_on(control_plane::doctor::probe(&config));
            }
            Err(e) => probed.push(control_plane::doctor::Probe {
                what: "model",
                result: Err(format!("no configuration to probe: {e}")),
            }),
        }
        for p in &probed {
            if let Err(why) = &p.result {
                findings.insert(
                    0,
                    Finding {
                        id: if p.what == "telegram" {
                            "probe.telegram-failed"
                        } else {
                            "probe.model-failed"
                        },
                        severity: Severity::Critical,
                        problem: why.clone(),
                        fix: "correct the address, the key or token file, or start the service it names; then probe again",
                    },
                );
            }
        }
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        for f in &findings {
            let level = match f.severity {
                Severity::Critical => "CRITICAL",
                Severity::Warning => "warning",
                Severity::Info => "info",
            };
            out!(
                "{level:<9} {}\n          {}\n          fix: {}",
                f.id,
                printable(&f.problem),
                f.fix
            );
        }
        if probe {
            out!("probed    the services named in {probed_what}");
        }
        for p in &probed {
            match &p.result {
                Ok(said) => out!("probe     {:<10} ok: {}", p.what, printable(said)),
                Err(_) => out!("probe     {:<10} FAILED (above)", p.what),
            }
        }
        out!("checked:");
        for (prefix, what) in control_plane::doctor::CHECKS {
            let found = findings
                .iter()
                .filter(|f| f.id.split('.').next() == Some(prefix))
                .map(|f| f.severity)
                .min();
            let mark = match found {
                None => "ok",
                Some(Severity::Critical) => "CRITICAL",
                Some(Severity::Warning) => "warning",
                Some(Severity::Info) => "info",
            };
            out!("  {mark:<9} {prefix:<10} {what}");
        }
        match state.serve_pid() {
            Ok(Some(pid)) => out!("serve: running (pid {pid})"),
            Ok(None) => out!("serve: not running"),
            Err(e) => out!("serve: cannot tell ({}: {e})", state.serve_lock().display()),
        }
        let critical = findings
            .iter()
            .filter(|f| f.severity == Severity::Critical)
            .count();
        out!(
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
    let master = state.load_master_key().map_err(|e| {
        // After deploy/install the key is only the service's sealed credential.
        let sealed = std::path::Path::new(control_plane::doctor::SEALED_MASTER_KEY);
        if !state.master_key().exists() && sealed.exists() {
            format!(
                "{}; the master key is the sealed credential {}: run this command through systemd with it: systemd-run --wait --pipe -p LoadCredentialEncrypted=master-key:{} {}",
                chain(&e),
                sealed.display(),
                sealed.display(),
                std::env::args().collect::<Vec<_>>().join(" ")
            )
        } else {
            chain(&e)
        }
    })?;
    let store =
        control_plane::store::Store::open(&state.store(), &master).map_err(|e| chain(&e))?;
    Ok((store, master))
}

fn config_show(state: &StateDir, approved: bool) -> CliResult {
    let text = if approved {
        let (version, text) = approved_config(state)?;
        eprintln!("approved configuration version {version}");
        text
    } else {
        Config::read_text(&state.config()).map_err(|e| chain(&e))?
    };
    // An agent's approved words may be in it: shown with control and invisible
    // characters escaped, as every requester's text is.
    write_all(printable(&text).as_bytes())
}

fn audit_verify(state: &StateDir) -> CliResult {
    let (store, master) = open_store(state)?;
    match store.verify_audit(&master) {
        Ok(n) => {
            out!("audit trail intact: {n} entries");
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
        out!("{}", serde_json::to_string(&entry)?);
    }
    Ok(ExitCode::SUCCESS)
}
