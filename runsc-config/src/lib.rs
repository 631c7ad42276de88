//! Turns a [`SandboxSpec`] into an OCI `config.json` value and the `runsc` argument list,
//! and checks any such pair against the hardening invariants.
//!
//! # Trust
//!
//! Trusted, pure code used by the control plane (as root) and by `ironclaw doctor`. Its
//! inputs come from the control plane's own validated configuration. The checker is
//! written against the generated JSON, not the spec, so it also judges a bundle that was
//! edited on disk or produced by other code.
//!
//! The invariants ([`Violation`] lists them): a read-only root holding only the agent
//! binary; `/inbox` a read-only bind; `/outbox` a read-write bind; `/run/ironclaw` a bind
//! of the directory holding only `proxy.sock`; `/tmp` a tmpfs; `/sys` a read-only sysfs; every writable mount
//! `noexec,nosuid,nodev`; no other mounts; no network; every capability set empty;
//! `noNewPrivileges`; a non-root uid and gid; memory, pids and CPU limits; rlimits; an
//! environment of fixed, non-secret variables only.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use queue_proto::ids::SessionId;
use serde_json::{Value, json};

/// Where the agent binary sits in the sandbox's root.
pub const AGENT_PATH: &str = "/ironclaw-agent";
/// Mount point of the session's inbox directory.
pub const INBOX_MOUNT: &str = "/inbox";
/// Mount point of the session's outbox directory.
pub const OUTBOX_MOUNT: &str = "/outbox";
/// Mount point of the directory holding only the session's `proxy.sock`.
pub const SOCKET_MOUNT: &str = "/run/ironclaw";
/// File name of the proxy socket inside [`SOCKET_MOUNT`].
pub const SOCKET_NAME: &str = "proxy.sock";
/// Longest unix socket path the kernel accepts, including the terminating NUL.
pub const SUN_PATH_BYTES: usize = 108;
/// The directories the root must provide as mount points (created empty).
pub const MOUNT_POINTS: [&str; 6] = [
    "/proc",
    "/tmp",
    INBOX_MOUNT,
    OUTBOX_MOUNT,
    SOCKET_MOUNT,
    "/sys",
];
/// The only environment the agent gets: fixed values, nothing secret.
pub const ENVIRONMENT: [&str; 2] = ["PATH=/", "HOME=/tmp"];
/// `runsc` flags that must be present on every invocation.
pub const REQUIRED_RUNSC_FLAGS: [&str; 3] =
    ["--network=none", "--host-uds=open", "--platform=ptrace"];
/// Options every writable mount carries.
pub const WRITABLE_MOUNT_OPTIONS: [&str; 3] = ["noexec", "nosuid", "nodev"];

/// Resource limits of one sandbox. runsc charges memory and pids to the host cgroup of
/// gVisor's own sentry and gofer, so `pids` must leave headroom for gVisor's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
    /// CPU time allowed per `cpu_period_us`, in microseconds.
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    /// `RLIMIT_NOFILE` inside the sandbox.
    pub open_files: u64,
    /// Size of the `/tmp` tmpfs.
    pub tmp_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 256 * 1024 * 1024,
            pids: 512,
            cpu_quota_us: 100_000,
            cpu_period_us: 100_000,
            open_files: 256,
            tmp_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Everything that makes one session's sandbox.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub session: SessionId,
    /// The read-only root: holds only the agent binary (at [`AGENT_PATH`]) and the empty
    /// [`MOUNT_POINTS`].
    pub rootfs: PathBuf,
    /// Host directory mounted read-only at `/inbox`.
    pub inbox_dir: PathBuf,
    /// Host directory mounted read-write (noexec) at `/outbox`.
    pub outbox_dir: PathBuf,
    /// Host directory holding only `proxy.sock`, mounted at `/run/ironclaw`.
    pub socket_dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub limits: Limits,
    /// The control plane instance the sandbox belongs to: lowercase letters, digits
    /// and dashes, naming the parent of its cgroup (see [`cgroup_path`]).
    pub instance: String,
}

/// Errors in a spec that make it impossible to generate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{what} path {path} is not absolute")]
    RelativePath { what: &'static str, path: PathBuf },
    #[error("{what} path {path} is not valid UTF-8")]
    NonUtf8Path { what: &'static str, path: PathBuf },
    #[error(
        "proxy socket path {path} is {len} bytes; a unix socket path must be under {SUN_PATH_BYTES}"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error("the instance name {0:?} is not 1 to 32 lowercase letters, digits and dashes")]
    BadInstance(String),
}

/// The container id runsc knows this session's sandbox by.
pub fn container_id(session: &SessionId) -> String {
    format!("ironclaw-{session}")
}

/// The session's cgroup, relative to each cgroup hierarchy's root, under the parent of
/// the control plane `instance` it belongs to (a name of its state directory), so two
/// instances on one host never share or remove each other's. The control plane makes
/// it, with the limits, before the launch (runsc then joins it as it is).
pub fn cgroup_path(instance: &str, session: &SessionId) -> String {
    format!("/ironclaw/{instance}/{}", container_id(session))
}

/// The host path of the session's proxy socket.
pub fn socket_path(socket_dir: &Path) -> PathBuf {
    socket_dir.join(SOCKET_NAME)
}

fn path_str<'a>(what: &'static str, p: &'a Path) -> Result<&'a str, SpecError> {
    if !p.is_absolute() {
        return Err(SpecError::RelativePath {
            what,
            path: p.to_owned(),
        });
    }
    p.to_str().ok_or_else(|| SpecError::NonUtf8Path {
        what,
        path: p.to_owned(),
    })
}

fn bind(source: &str, destination: &str, writable: bool) -> Value {
    let mut options = vec!["rbind", if writable { "rw" } else { "ro" }];
    options.extend(WRITABLE_MOUNT_OPTIONS);
    json!({ "destination": destination, "type": "bind", "source": source, "options": options })
}

/// The OCI runtime spec (`config.json`) of the sandbox.
pub fn oci_config(spec: &SandboxSpec) -> Result<Value, SpecError> {
    let rootfs = path_str("rootfs", &spec.rootfs)?;
    let inbox = path_str("inbox", &spec.inbox_dir)?;
    let outbox = path_str("outbox", &spec.outbox_dir)?;
    let sockets = path_str("socket directory", &spec.socket_dir)?;
    let sock = socket_path(&spec.socket_dir);
    let len = sock.as_os_str().len();
    if len >= SUN_PATH_BYTES {
        return Err(SpecError::SocketPathTooLong { path: sock, len });
    }
    let i = &spec.instance;
    if i.is_empty()
        || i.len() > 32
        || !i
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(SpecError::BadInstance(i.clone()));
    }
    let l = &spec.limits;
    let no_caps: [&str; 0] = [];
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": spec.uid, "gid": spec.gid },
            "args": [AGENT_PATH],
            "env": ENVIRONMENT,
            "cwd": "/",
            "capabilities": {
                "bounding": no_caps, "effective": no_caps, "inheritable": no_caps,
                "permitted": no_caps, "ambient": no_caps
            },
            "rlimits": [
                { "type": "RLIMIT_NOFILE", "hard": l.open_files, "soft": l.open_files },
                { "type": "RLIMIT_CORE", "hard": 0, "soft": 0 }
            ],
            "noNewPrivileges": true
        },
        "root": { "path": rootfs, "readonly": true },
        "hostname": "ironclaw",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", format!("size={}", l.tmp_bytes)] },
            bind(inbox, INBOX_MOUNT, false),
            bind(outbox, OUTBOX_MOUNT, true),
            bind(sockets, SOCKET_MOUNT, false),
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["ro", "nosuid", "noexec", "nodev"] },
        ],
        "linux": {
            "namespaces": [
                { "type": "pid" }, { "type": "network" }, { "type": "ipc" },
                { "type": "uts" }, { "type": "mount" }
            ],
            "resources": {
                "memory": { "limit": l.memory_bytes },
                "pids": { "limit": l.pids },
                "cpu": { "quota": l.cpu_quota_us, "period": l.cpu_period_us }
            },
            "cgroupsPath": cgroup_path(&spec.instance, &spec.session)
        }
    }))
}

/// `runsc` arguments to run the bundle in `bundle_dir`, with runsc's state under
/// `runsc_root`.
pub fn runsc_run_args(runsc_root: &Path, bundle_dir: &Path, session: &SessionId) -> Vec<String> {
    let mut args = vec![format!("--root={}", runsc_root.display())];
    args.extend(REQUIRED_RUNSC_FLAGS.map(String::from));
    args.extend([
        "run".into(),
        format!("--bundle={}", bundle_dir.display()),
        container_id(session),
    ]);
    args
}

/// One broken hardening invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("the root file system is writable")]
    WritableRoot,
    #[error("the process runs {0}, not {AGENT_PATH}")]
    WrongProgram(String),
    #[error("the sandbox has a network: {0}")]
    Network(String),
    #[error("capability set {0} is not empty")]
    Capability(String),
    #[error("noNewPrivileges is not set")]
    NewPrivileges,
    #[error("the process runs as root (uid or gid 0)")]
    RootUser,
    #[error("unexpected mount at {0}")]
    ExtraMount(String),
    #[error("required mount {0} is missing or wrong")]
    MissingMount(&'static str),
    #[error("mount {0} is writable without noexec, nosuid and nodev")]
    WritableMountOptions(String),
    #[error("{0} is mounted writable")]
    WritableInbox(&'static str),
    #[error("the proxy socket path {0} is too long for a unix socket")]
    SocketPathTooLong(String),
    #[error("missing resource limit: {0}")]
    MissingLimit(&'static str),
    #[error("environment variable {0} is not one of the fixed ones")]
    Environment(String),
    #[error("runsc argument {0} is missing or not allowed")]
    RunscArgument(String),
    #[error("mount {0} has an option outside the allowed set: {1}")]
    MountOption(String, String),
    #[error("{what} is {found}, not the session's own {expected}")]
    WrongPath {
        what: &'static str,
        found: String,
        expected: String,
    },
}

fn str_list(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn positive(v: &Value) -> bool {
    v.as_u64().is_some_and(|n| n > 0)
}

/// Checks `config` and the runsc `args` for `spec`'s session against every invariant,
/// returning all the violations found (empty means the pair is acceptable). Paths must be
/// exactly the spec's: the root, every bind source and the cgroup.
pub fn check(spec: &SandboxSpec, config: &Value, args: &[String]) -> Vec<Violation> {
    let mut v = Vec::new();
    check_paths(spec, config, &mut v);
    let process = &config["process"];

    if config["root"]["readonly"] != json!(true) {
        v.push(Violation::WritableRoot);
    }
    if str_list(&process["args"]) != [AGENT_PATH] {
        v.push(Violation::WrongProgram(process["args"].to_string()));
    }
    for set in [
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    ] {
        if !str_list(&process["capabilities"][set]).is_empty() {
            v.push(Violation::Capability(set.into()));
        }
    }
    if process["noNewPrivileges"] != json!(true) {
        v.push(Violation::NewPrivileges);
    }
    let uid = process["user"]["uid"].as_u64();
    let gid = process["user"]["gid"].as_u64();
    let extra_root_group = process["user"]["additionalGids"]
        .as_array()
        .is_some_and(|g| g.iter().any(|x| x.as_u64().is_none_or(|n| n == 0)));
    if uid.is_none_or(|u| u == 0) || gid.is_none_or(|g| g == 0) || extra_root_group {
        v.push(Violation::RootUser);
    }
    for var in str_list(&process["env"]) {
        if !ENVIRONMENT.contains(&var) {
            let name = var.split('=').next().unwrap_or(var);
            v.push(Violation::Environment(name.into()));
        }
    }
    if process["env"].as_array().map(Vec::len) != Some(str_list(&process["env"]).len()) {
        v.push(Violation::Environment("(not a list of strings)".into()));
    }
    check_mounts(config, &mut v);
    check_network(&spec.session, config, args, &mut v);

    let res = &config["linux"]["resources"];
    if !positive(&res["memory"]["limit"]) {
        v.push(Violation::MissingLimit("memory"));
    }
    if !positive(&res["pids"]["limit"]) {
        v.push(Violation::MissingLimit("pids"));
    }
    if !positive(&res["cpu"]["quota"]) || !positive(&res["cpu"]["period"]) {
        v.push(Violation::MissingLimit("cpu"));
    }
    let rlimits: Vec<&str> = process["rlimits"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|r| positive(&r["hard"]))
                .filter_map(|r| r["type"].as_str())
                .collect()
        })
        .unwrap_or_default();
    if !rlimits.contains(&"RLIMIT_NOFILE") {
        v.push(Violation::MissingLimit("RLIMIT_NOFILE"));
    }
    v
}

fn check_mounts(config: &Value, v: &mut Vec<Violation>) {
    let mounts = config["mounts"].as_array().cloned().unwrap_or_default();
    let find = |dest: &str| mounts.iter().find(|m| m["destination"] == json!(dest));
    for m in &mounts {
        let dest = m["destination"].as_str().unwrap_or("(none)").to_owned();
        if !MOUNT_POINTS.contains(&dest.as_str())
            || mounts
                .iter()
                .filter(|o| o["destination"] == m["destination"])
                .count()
                > 1
        {
            v.push(Violation::ExtraMount(dest.clone()));
            continue;
        }
        let flags = match MountFlags::of(&m["options"]) {
            Ok(f) => f,
            Err(bad) => {
                v.push(Violation::MountOption(dest, bad));
                continue;
            }
        };
        if !flags.read_only && !flags.hardened() {
            v.push(Violation::WritableMountOptions(dest));
        }
    }
    let kind_is = |dest: &str, ty: &str| find(dest).is_some_and(|m| m["type"] == json!(ty));
    for (dest, ty) in [("/proc", "proc"), ("/tmp", "tmpfs"), ("/sys", "sysfs")] {
        if !kind_is(dest, ty) {
            v.push(Violation::MissingMount(dest));
        }
    }
    for dest in [INBOX_MOUNT, OUTBOX_MOUNT, SOCKET_MOUNT] {
        if !kind_is(dest, "bind") || find(dest).is_none_or(|m| m["source"].as_str().is_none()) {
            v.push(Violation::MissingMount(dest));
        }
    }
    for dest in [INBOX_MOUNT, SOCKET_MOUNT, "/sys"] {
        if find(dest).is_some_and(|m| !MountFlags::of(&m["options"]).is_ok_and(|f| f.read_only)) {
            v.push(Violation::WritableInbox(dest));
        }
    }
    if let Some(src) = find(SOCKET_MOUNT).and_then(|m| m["source"].as_str()) {
        let sock = socket_path(Path::new(src));
        if sock.as_os_str().len() >= SUN_PATH_BYTES {
            v.push(Violation::SocketPathTooLong(sock.display().to_string()));
        }
    }
}

fn check_network(session: &SessionId, config: &Value, args: &[String], v: &mut Vec<Violation>) {
    let namespaces = config["linux"]["namespaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let netns = namespaces.iter().find(|n| n["type"] == json!("network"));
    match netns {
        None => v.push(Violation::Network("no network namespace".into())),
        Some(n) if n.get("path").is_some() => v.push(Violation::Network(
            "joins an existing network namespace".into(),
        )),
        Some(_) => {}
    }
    // The exact shape runsc_run_args produces: --root, the required flags, `run`,
    // --bundle, the session's container id. Nothing else, in this order.
    let root_ok = args.first().is_some_and(|a| {
        a.strip_prefix("--root=")
            .is_some_and(|p| p.starts_with('/'))
    });
    if !root_ok {
        v.push(Violation::RunscArgument(
            args.first().cloned().unwrap_or_else(|| "--root".into()),
        ));
    }
    for (i, flag) in REQUIRED_RUNSC_FLAGS.iter().enumerate() {
        if args.get(1 + i).map(String::as_str) != Some(*flag) {
            v.push(Violation::RunscArgument((*flag).into()));
        }
    }
    let tail = &args[args.len().min(1 + REQUIRED_RUNSC_FLAGS.len())..];
    let tail_ok = tail.len() == 3
        && tail[0] == "run"
        && tail[1]
            .strip_prefix("--bundle=")
            .is_some_and(|p| p.starts_with('/'))
        && tail[2] == container_id(session);
    if !tail_ok {
        v.push(Violation::RunscArgument(tail.join(" ")));
    }
    for a in args {
        if a.starts_with("--network") && a != "--network=none" {
            v.push(Violation::Network(a.clone()));
        }
    }
}

/// The effective flags of a mount after its options are applied in order (a later `rw`
/// overrides an earlier `ro`). Options outside a small allowlist are refused.
#[derive(Debug, Default)]
struct MountFlags {
    read_only: bool,
    noexec: bool,
    nosuid: bool,
    nodev: bool,
}

impl MountFlags {
    /// `noexec`, `nosuid` and `nodev` all in force.
    fn hardened(&self) -> bool {
        self.noexec && self.nosuid && self.nodev
    }

    fn of(options: &Value) -> Result<MountFlags, String> {
        let mut f = MountFlags::default();
        let Some(list) = options.as_array() else {
            return Ok(f);
        };
        for o in list {
            let o = o.as_str().ok_or_else(|| o.to_string())?;
            match o {
                "ro" => f.read_only = true,
                "rw" => f.read_only = false,
                "noexec" => f.noexec = true,
                "nosuid" => f.nosuid = true,
                "nodev" => f.nodev = true,
                "rbind" | "bind" => {}
                _ if o.starts_with("mode=") || o.starts_with("size=") => {}
                _ => return Err(o.to_owned()),
            }
        }
        Ok(f)
    }
}

/// The root, every bind source and the cgroup must be exactly the session's own.
fn check_paths(spec: &SandboxSpec, config: &Value, v: &mut Vec<Violation>) {
    let mut expect = |what: &'static str, found: &Value, expected: String| {
        if found.as_str() != Some(expected.as_str()) {
            v.push(Violation::WrongPath {
                what,
                found: found.to_string(),
                expected,
            });
        }
    };
    let path = |p: &Path| p.display().to_string();
    expect("the root", &config["root"]["path"], path(&spec.rootfs));
    // Without its own cgroup path runsc applies no memory, pids or CPU limit at all.
    expect(
        "the cgroup path",
        &config["linux"]["cgroupsPath"],
        cgroup_path(&spec.instance, &spec.session),
    );
    let mounts = config["mounts"].as_array().cloned().unwrap_or_default();
    for (what, dest, expected) in [
        ("the /inbox source", INBOX_MOUNT, &spec.inbox_dir),
        ("the /outbox source", OUTBOX_MOUNT, &spec.outbox_dir),
        ("the /run/ironclaw source", SOCKET_MOUNT, &spec.socket_dir),
    ] {
        if let Some(m) = mounts.iter().find(|m| m["destination"] == json!(dest)) {
            expect(what, &m["source"], path(expected));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            session: SessionId::try_from("tg-42").unwrap(),
            rootfs: "/var/lib/ironclaw/rootfs".into(),
            inbox_dir: "/var/lib/ironclaw/sessions/tg-42/inbox.d".into(),
            outbox_dir: "/var/lib/ironclaw/sessions/tg-42/outbox.d".into(),
            socket_dir: "/run/ironclaw/s/tg-42".into(),
            uid: 65534,
            gid: 65534,
            limits: Limits::default(),
            instance: "0123456789ab".into(),
        }
    }

    fn args() -> Vec<String> {
        runsc_run_args(
            Path::new("/var/lib/ironclaw/runsc"),
            Path::new("/b"),
            &spec().session,
        )
    }

    #[test]
    fn snapshot_of_the_generated_config() {
        let got = serde_json::to_string_pretty(&oci_config(&spec()).unwrap()).unwrap();
        let expected = include_str!("../tests/snapshots/config.json");
        assert_eq!(
            got.trim_end(),
            expected.trim_end(),
            "regenerate tests/snapshots/config.json if intended"
        );
    }

    #[test]
    fn snapshot_of_the_runsc_arguments() {
        assert_eq!(
            args(),
            [
                "--root=/var/lib/ironclaw/runsc",
                "--network=none",
                "--host-uds=open",
                "--platform=ptrace",
                "run",
                "--bundle=/b",
                "ironclaw-tg-42"
            ]
        );
    }

    #[test]
    fn the_generated_spec_passes() {
        assert_eq!(
            check(&spec(), &oci_config(&spec()).unwrap(), &args()),
            vec![]
        );
    }

    #[test]
    fn a_long_socket_path_is_refused() {
        let mut s = spec();
        s.socket_dir = PathBuf::from(format!("/{}", "d".repeat(100)));
        assert!(matches!(
            oci_config(&s),
            Err(SpecError::SocketPathTooLong { .. })
        ));
        s.socket_dir = "relative".into();
        assert!(matches!(
            oci_config(&s),
            Err(SpecError::RelativePath { .. })
        ));
    }

    /// Each weakening, applied to a good config, and the violation it must cause.
    type Weakening = (
        &'static str,
        fn(&mut Value, &mut Vec<String>),
        fn(&Violation) -> bool,
    );

    fn weakenings() -> Vec<Weakening> {
        vec![
            (
                "rw root",
                |c, _| c["root"]["readonly"] = json!(false),
                |v| *v == Violation::WritableRoot,
            ),
            (
                "no root flag",
                |c, _| {
                    c["root"].as_object_mut().unwrap().remove("readonly");
                },
                |v| *v == Violation::WritableRoot,
            ),
            (
                "network on (runsc)",
                |_, a| a[1] = "--network=sandbox".into(),
                |v| matches!(v, Violation::Network(_) | Violation::RunscArgument(_)),
            ),
            (
                "network on (host netns)",
                |c, _| {
                    c["linux"]["namespaces"][1] =
                        json!({"type": "network", "path": "/proc/1/ns/net"})
                },
                |v| matches!(v, Violation::Network(_)),
            ),
            (
                "no netns",
                |c, _| {
                    c["linux"]["namespaces"].as_array_mut().unwrap().remove(1);
                },
                |v| matches!(v, Violation::Network(_)),
            ),
            (
                "a capability",
                |c, _| c["process"]["capabilities"]["bounding"] = json!(["CAP_NET_RAW"]),
                |v| matches!(v, Violation::Capability(_)),
            ),
            (
                "an ambient capability",
                |c, _| c["process"]["capabilities"]["ambient"] = json!(["CAP_SYS_ADMIN"]),
                |v| matches!(v, Violation::Capability(_)),
            ),
            (
                "extra mount",
                |c, _| {
                    c["mounts"].as_array_mut().unwrap().push(json!({"destination": "/host", "type": "bind", "source": "/", "options": ["ro"]}))
                },
                |v| matches!(v, Violation::ExtraMount(_)),
            ),
            (
                "duplicate mount",
                |c, _| {
                    let m = c["mounts"][2].clone();
                    c["mounts"].as_array_mut().unwrap().push(m);
                },
                |v| matches!(v, Violation::ExtraMount(_)),
            ),
            (
                "rw inbox",
                |c, _| c["mounts"][2]["options"][1] = json!("rw"),
                |v| matches!(v, Violation::WritableInbox(_)),
            ),
            (
                "rw sys",
                |c, _| c["mounts"][5]["options"][0] = json!("rw"),
                |v| matches!(v, Violation::WritableInbox("/sys")),
            ),
            (
                "no sys",
                |c, _| {
                    c["mounts"].as_array_mut().unwrap().remove(5);
                },
                |v| matches!(v, Violation::MissingMount("/sys")),
            ),
            (
                "exec outbox",
                |c, _| c["mounts"][3]["options"] = json!(["rbind", "rw", "nosuid", "nodev"]),
                |v| matches!(v, Violation::WritableMountOptions(_)),
            ),
            (
                "exec tmp",
                |c, _| c["mounts"][1]["options"] = json!(["nosuid", "nodev"]),
                |v| matches!(v, Violation::WritableMountOptions(_)),
            ),
            (
                "no outbox",
                |c, _| {
                    c["mounts"].as_array_mut().unwrap().remove(3);
                },
                |v| *v == Violation::MissingMount(OUTBOX_MOUNT),
            ),
            (
                "new privileges",
                |c, _| c["process"]["noNewPrivileges"] = json!(false),
                |v| *v == Violation::NewPrivileges,
            ),
            (
                "root uid",
                |c, _| c["process"]["user"]["uid"] = json!(0),
                |v| *v == Violation::RootUser,
            ),
            (
                "root gid",
                |c, _| c["process"]["user"]["gid"] = json!(0),
                |v| *v == Violation::RootUser,
            ),
            (
                "secret in env",
                |c, _| {
                    c["process"]["env"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!("ANTHROPIC_API_KEY=sk-x"))
                },
                |v| matches!(v, Violation::Environment(_)),
            ),
            (
                "no memory limit",
                |c, _| {
                    c["linux"]["resources"]
                        .as_object_mut()
                        .unwrap()
                        .remove("memory");
                },
                |v| *v == Violation::MissingLimit("memory"),
            ),
            (
                "no pids limit",
                |c, _| c["linux"]["resources"]["pids"]["limit"] = json!(0),
                |v| *v == Violation::MissingLimit("pids"),
            ),
            (
                "no cpu limit",
                |c, _| {
                    c["linux"]["resources"]
                        .as_object_mut()
                        .unwrap()
                        .remove("cpu");
                },
                |v| *v == Violation::MissingLimit("cpu"),
            ),
            (
                "no rlimits",
                |c, _| c["process"]["rlimits"] = json!([]),
                |v| *v == Violation::MissingLimit("RLIMIT_NOFILE"),
            ),
            (
                "other program",
                |c, _| c["process"]["args"] = json!(["/bin/sh"]),
                |v| matches!(v, Violation::WrongProgram(_)),
            ),
            (
                "host uds off",
                |_, a| a.retain(|x| x != "--host-uds=open"),
                |v| matches!(v, Violation::RunscArgument(_)),
            ),
            (
                "ro then rw on the inbox",
                |c, _| {
                    c["mounts"][2]["options"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!("rw"))
                },
                |v| matches!(v, Violation::WritableInbox(_)),
            ),
            (
                "noexec then exec on the outbox",
                |c, _| {
                    c["mounts"][3]["options"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!("exec"))
                },
                |v| matches!(v, Violation::MountOption(..)),
            ),
            (
                "outbox bound to the state directory",
                |c, _| c["mounts"][3]["source"] = json!("/var/lib/ironclaw"),
                |v| matches!(v, Violation::WrongPath { .. }),
            ),
            (
                "host root",
                |c, _| c["root"]["path"] = json!("/"),
                |v| matches!(v, Violation::WrongPath { .. }),
            ),
            (
                "no cgroup path",
                |c, _| {
                    c["linux"].as_object_mut().unwrap().remove("cgroupsPath");
                },
                |v| matches!(v, Violation::WrongPath { .. }),
            ),
            (
                "runsc do",
                |_, a| {
                    a.truncate(4);
                    a.extend(["do".into(), "/bin/sh".into()]);
                },
                |v| matches!(v, Violation::RunscArgument(_)),
            ),
            (
                "root supplementary group",
                |c, _| c["process"]["user"]["additionalGids"] = json!([0]),
                |v| *v == Violation::RootUser,
            ),
            (
                "extra runsc flag",
                |_, a| a.insert(1, "--debug".into()),
                |v| matches!(v, Violation::RunscArgument(_)),
            ),
        ]
    }

    #[test]
    fn each_weakened_spec_fails_for_its_reason() {
        for (what, weaken, expected) in weakenings() {
            let mut c = oci_config(&spec()).unwrap();
            let mut a = args();
            weaken(&mut c, &mut a);
            let found = check(&spec(), &c, &a);
            assert!(found.iter().any(expected), "{what}: found {found:?}");
        }
    }

    fn arb_spec() -> impl Strategy<Value = SandboxSpec> {
        (
            "[a-z0-9][a-z0-9_-]{0,31}",
            "(/[a-zA-Z0-9._-]{1,12}){1,5}",
            "(/[a-zA-Z0-9._-]{1,12}){1,4}",
            1u32..=u32::MAX,
            1u32..=u32::MAX,
            (
                1u64..=1 << 40,
                1u32..=100_000,
                1u64..=10_000_000,
                1u64..=1_000_000,
                1u64..=65_536,
                1u64..=1 << 30,
            ),
        )
            .prop_map(
                |(id, base, sock, uid, gid, (mem, pids, quota, period, files, tmp))| {
                    let base = PathBuf::from(base);
                    SandboxSpec {
                        session: SessionId::try_from(id.as_str()).unwrap(),
                        rootfs: base.join("rootfs"),
                        inbox_dir: base.join("inbox.d"),
                        outbox_dir: base.join("outbox.d"),
                        socket_dir: PathBuf::from(sock),
                        instance: "0123456789ab".into(),
                        uid,
                        gid,
                        limits: Limits {
                            memory_bytes: mem,
                            pids,
                            cpu_quota_us: quota,
                            cpu_period_us: period,
                            open_files: files,
                            tmp_bytes: tmp,
                        },
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn every_generated_spec_passes_the_checker(s in arb_spec()) {
            let c = oci_config(&s).unwrap();
            let a = runsc_run_args(Path::new("/r"), Path::new("/b"), &s.session);
            prop_assert_eq!(check(&s, &c, &a), vec![]);
        }

        #[test]
        fn every_weakening_of_any_spec_fails(s in arb_spec(), pick in any::<prop::sample::Index>()) {
            let all = weakenings();
            let (what, weaken, expected) = &all[pick.index(all.len())];
            let mut c = oci_config(&s).unwrap();
            let mut a = runsc_run_args(Path::new("/r"), Path::new("/b"), &s.session);
            weaken(&mut c, &mut a);
            let found = check(&s, &c, &a);
            prop_assert!(found.iter().any(expected), "{}: {:?}", what, found);
        }
    }
}
