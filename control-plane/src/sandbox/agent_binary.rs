//! The agent binary: where `serve` and `doctor` find it, and the check that it is
//! statically linked. A sandbox's root holds nothing but this one file, so an agent that
//! needs a program interpreter or a shared library cannot start there; such a binary is
//! refused before any sandbox is launched, with the command that builds a good one.
//!
//! The check reads the ELF header and the program headers, nothing else: a dynamically
//! linked program names its interpreter (`PT_INTERP`), or lists the libraries it needs
//! (`DT_NEEDED`) in its dynamic section. A static-pie program, which is what
//! `scripts/build-static` makes, has a dynamic section only to relocate itself, and
//! neither of those.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable that names the agent binary when the configuration does not.
pub const AGENT_BIN_VAR: &str = "IRONCLAW_AGENT_BIN";

/// The agent's file name, looked for next to `ironclaw` when nothing else names it.
pub const AGENT_FILE_NAME: &str = "ironclaw-agent";

/// Why an agent binary cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AgentBinaryError {
    #[error("the agent binary {path} cannot be read; build it with scripts/build-static")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the agent binary {path} is not statically linked ({linking}), and the sandbox's root holds nothing else; build it with scripts/build-static"
    )]
    NotStatic { path: PathBuf, linking: Linking },
}

/// The agent binary: the configured path, else `$IRONCLAW_AGENT_BIN`, else
/// `ironclaw-agent` next to this executable, else (in a source tree, where `ironclaw`
/// is `target/<profile>/ironclaw`) the static one `scripts/build-static` leaves in
/// `target/x86_64-unknown-linux-gnu/release/`.
pub fn resolve(configured: Option<&Path>) -> PathBuf {
    resolve_from(
        configured,
        std::env::var_os(AGENT_BIN_VAR),
        std::env::current_exe().ok(),
    )
}

/// [`resolve`] with the environment variable's value and this executable's path given.
fn resolve_from(configured: Option<&Path>, var: Option<OsString>, exe: Option<PathBuf>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_owned();
    }
    if let Some(p) = var {
        return PathBuf::from(p);
    }
    let Some(dir) = exe.as_deref().and_then(Path::parent) else {
        return PathBuf::from(AGENT_FILE_NAME);
    };
    let beside = dir.join(AGENT_FILE_NAME);
    let built = dir
        .parent()
        .filter(|target| target.file_name().is_some_and(|n| n == "target"))
        .map(|target| target.join(STATIC_BUILD_DIR).join(AGENT_FILE_NAME));
    // The first static one; else the first there is (to be reported as it is).
    let candidates: Vec<PathBuf> = std::iter::once(beside.clone()).chain(built).collect();
    candidates
        .iter()
        .find(|p| require_static(p).is_ok())
        .or_else(|| candidates.iter().find(|p| p.exists()))
        .cloned()
        .unwrap_or(beside)
}

/// Where `scripts/build-static` leaves its binaries, under `target/`.
const STATIC_BUILD_DIR: &str = "x86_64-unknown-linux-gnu/release";

/// Refuses an agent binary that cannot be read or is not statically linked.
pub fn require_static(path: &Path) -> Result<(), AgentBinaryError> {
    let bytes = std::fs::read(path).map_err(|source| AgentBinaryError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    match linking(&bytes) {
        Linking::Static => Ok(()),
        linking => Err(AgentBinaryError::NotStatic {
            path: path.to_owned(),
            linking,
        }),
    }
}

/// How an executable is linked, as far as its program headers tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linking {
    /// Runs alone: no interpreter, no shared library (static-pie included).
    Static,
    /// Names a program interpreter (`PT_INTERP`), such as `/lib64/ld-linux-x86-64.so.2`.
    Interpreter,
    /// Needs shared libraries (`DT_NEEDED` in its dynamic section).
    SharedLibraries,
    /// Not a 64-bit little-endian ELF executable, or one whose headers do not fit the file.
    NotElf,
}

impl std::fmt::Display for Linking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Linking::Static => "statically linked",
            Linking::Interpreter => "it names a program interpreter",
            Linking::SharedLibraries => "it needs shared libraries",
            Linking::NotElf => "it is not a 64-bit little-endian ELF executable",
        })
    }
}

/// The first bytes of a 64-bit (ELFCLASS64), little-endian (ELFDATA2LSB) ELF file.
const ELF64_LE_IDENT: [u8; 6] = [0x7f, b'E', b'L', b'F', 2, 1];
/// Offsets in the ELF header.
const E_TYPE: usize = 0x10;
const E_PHOFF: usize = 0x20;
const E_PHENTSIZE: usize = 0x36;
const E_PHNUM: usize = 0x38;
/// Executable file types: a fixed-address executable, and a position-independent one
/// (which is how a pie or static-pie program is marked).
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
/// The size of one 64-bit program header, and the offsets in it.
const PHDR_BYTES: usize = 56;
const P_TYPE: usize = 0;
const P_OFFSET: usize = 8;
const P_FILESZ: usize = 32;
/// Program header types.
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
/// The size of one dynamic section entry (`d_tag`, `d_val`), and the tags looked at.
const DYN_BYTES: usize = 16;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

/// How the ELF executable in `elf` is linked. Anything that cannot be read as one counts
/// as [`Linking::NotElf`], which is not static.
pub fn linking(elf: &[u8]) -> Linking {
    program_headers(elf).unwrap_or(Linking::NotElf)
}

fn program_headers(b: &[u8]) -> Option<Linking> {
    if b.get(..ELF64_LE_IDENT.len())? != ELF64_LE_IDENT {
        return None;
    }
    if !matches!(u16_at(b, E_TYPE)?, ET_EXEC | ET_DYN) {
        return None;
    }
    let phoff = usize::try_from(u64_at(b, E_PHOFF)?).ok()?;
    let phentsize = usize::from(u16_at(b, E_PHENTSIZE)?);
    let phnum = usize::from(u16_at(b, E_PHNUM)?);
    if phentsize < PHDR_BYTES {
        return None;
    }
    let (mut loads, mut needs_libraries) = (0, false);
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let ph = b.get(at..at.checked_add(PHDR_BYTES)?)?;
        match u32_at(ph, P_TYPE)? {
            PT_INTERP => return Some(Linking::Interpreter),
            PT_LOAD => loads += 1,
            PT_DYNAMIC => {
                let offset = usize::try_from(u64_at(ph, P_OFFSET)?).ok()?;
                let size = usize::try_from(u64_at(ph, P_FILESZ)?).ok()?;
                let dynamic = b.get(offset..offset.checked_add(size)?)?;
                needs_libraries |= needs(dynamic);
            }
            _ => {}
        }
    }
    // Nothing to load is nothing to run.
    if loads == 0 {
        return None;
    }
    Some(if needs_libraries {
        Linking::SharedLibraries
    } else {
        Linking::Static
    })
}

/// Whether a dynamic section lists a needed library before its terminating `DT_NULL`.
fn needs(dynamic: &[u8]) -> bool {
    dynamic
        .chunks_exact(DYN_BYTES)
        .filter_map(|entry| u64_at(entry, 0))
        .take_while(|tag| *tag != DT_NULL)
        .any(|tag| tag == DT_NEEDED)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made ELF64 little-endian file of type `e_type` whose program headers are
    /// `segments` (type and contents), the contents laid out after the headers.
    fn elf(e_type: u16, segments: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(&ELF64_LE_IDENT);
        b[E_TYPE..E_TYPE + 2].copy_from_slice(&e_type.to_le_bytes());
        b[E_PHOFF..E_PHOFF + 8].copy_from_slice(&64u64.to_le_bytes());
        b[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&(PHDR_BYTES as u16).to_le_bytes());
        b[E_PHNUM..E_PHNUM + 2].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut offset = 64 + segments.len() * PHDR_BYTES;
        let mut contents = Vec::new();
        for (p_type, data) in segments {
            let mut ph = [0u8; PHDR_BYTES];
            ph[P_TYPE..P_TYPE + 4].copy_from_slice(&p_type.to_le_bytes());
            ph[P_OFFSET..P_OFFSET + 8].copy_from_slice(&(offset as u64).to_le_bytes());
            ph[P_FILESZ..P_FILESZ + 8].copy_from_slice(&(data.len() as u64).to_le_bytes());
            b.extend_from_slice(&ph);
            contents.extend_from_slice(data);
            offset += data.len();
        }
        b.extend_from_slice(&contents);
        b
    }

    /// A dynamic section holding `tags` (each with value 0).
    fn dynamic(tags: &[u64]) -> Vec<u8> {
        tags.iter()
            .flat_map(|t| [t.to_le_bytes(), 0u64.to_le_bytes()])
            .flatten()
            .collect()
    }

    const DT_RELA: u64 = 7;
    const DT_FLAGS_1: u64 = 0x6fff_fffb;

    fn load() -> (u32, Vec<u8>) {
        (PT_LOAD, vec![0x90; 16])
    }

    #[test]
    fn static_and_static_pie_executables_are_static() {
        assert_eq!(linking(&elf(ET_EXEC, &[load()])), Linking::Static);
        // What +crt-static makes: relocates itself, needs nothing.
        let static_pie = elf(
            ET_DYN,
            &[
                load(),
                (PT_DYNAMIC, dynamic(&[DT_RELA, DT_FLAGS_1, DT_NULL])),
            ],
        );
        assert_eq!(linking(&static_pie), Linking::Static);
        // A needed library listed after the end of the section is not read.
        let after_end = elf(
            ET_DYN,
            &[
                load(),
                (PT_DYNAMIC, dynamic(&[DT_RELA, DT_NULL, DT_NEEDED])),
            ],
        );
        assert_eq!(linking(&after_end), Linking::Static);
    }

    #[test]
    fn an_interpreter_or_a_needed_library_is_dynamic() {
        let interp = (PT_INTERP, b"/lib64/ld-linux-x86-64.so.2\0".to_vec());
        assert_eq!(
            linking(&elf(ET_DYN, &[interp.clone(), load()])),
            Linking::Interpreter
        );
        assert_eq!(
            linking(&elf(ET_EXEC, &[load(), interp])),
            Linking::Interpreter
        );
        // No interpreter but a needed library, as in a shared object.
        let needs = elf(
            ET_DYN,
            &[
                load(),
                (PT_DYNAMIC, dynamic(&[DT_RELA, DT_NEEDED, DT_NULL])),
            ],
        );
        assert_eq!(linking(&needs), Linking::SharedLibraries);
    }

    #[test]
    fn anything_that_is_not_a_whole_elf_executable_is_not_static() {
        let good = elf(ET_EXEC, &[load()]);
        assert_eq!(linking(&good), Linking::Static);
        let not_elf: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("a script", b"#!/bin/sh\nexit 0\n".to_vec()),
            ("the header alone, cut short", good[..40].to_vec()),
            ("its program headers cut short", good[..64 + 20].to_vec()),
            ("32-bit", {
                let mut b = good.clone();
                b[4] = 1;
                b
            }),
            ("big-endian", {
                let mut b = good.clone();
                b[5] = 2;
                b
            }),
            ("a relocatable object", elf(1, &[load()])),
            ("nothing to load", elf(ET_EXEC, &[])),
            ("program headers past the end", {
                let mut b = good.clone();
                b[E_PHOFF..E_PHOFF + 8].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            }),
            ("program headers too small", {
                let mut b = good.clone();
                b[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&8u16.to_le_bytes());
                b
            }),
            ("a dynamic section past the end", {
                let mut b = elf(ET_DYN, &[load(), (PT_DYNAMIC, dynamic(&[DT_NULL]))]);
                let ph = 64 + PHDR_BYTES + P_FILESZ;
                b[ph..ph + 8].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            }),
        ];
        for (what, bytes) in not_elf {
            assert_eq!(linking(&bytes), Linking::NotElf, "{what}");
        }
    }

    /// The static agent `scripts/build-static` makes (`$IRONCLAW_AGENT_BIN` under
    /// scripts/test), and the dynamic one a plain `cargo build -p sandbox-agent` leaves in
    /// target/debug, and a shared library, when they are there; the test binary itself
    /// and `/bin/sh` always.
    #[test]
    fn real_binaries_are_told_apart() {
        let this = std::env::current_exe().unwrap();
        let this_bytes = std::fs::read(&this).unwrap();
        assert_eq!(
            linking(&this_bytes),
            Linking::Interpreter,
            "test binaries are dynamically linked"
        );
        assert_eq!(
            linking(&std::fs::read("/bin/sh").unwrap()),
            Linking::Interpreter
        );
        // A shared library names no interpreter, but needs libc.
        let libm = Path::new("/lib/x86_64-linux-gnu/libm.so.6");
        if libm.is_file() {
            assert_eq!(
                linking(&std::fs::read(libm).unwrap()),
                Linking::SharedLibraries
            );
        }
        if let Some(agent) = std::env::var_os(AGENT_BIN_VAR) {
            require_static(Path::new(&agent)).unwrap();
        }
        let static_agent = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/x86_64-unknown-linux-gnu/release/ironclaw-agent"
        );
        if Path::new(static_agent).is_file() {
            require_static(Path::new(static_agent)).unwrap();
        }
        // target/debug/deps/<test> → target/debug/ironclaw-agent
        let dynamic_agent = this
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join(AGENT_FILE_NAME));
        if let Some(p) = dynamic_agent.filter(|p| p.is_file()) {
            assert!(matches!(
                require_static(&p),
                Err(AgentBinaryError::NotStatic {
                    linking: Linking::Interpreter,
                    ..
                })
            ));
        }
    }

    #[test]
    fn refusals_name_the_binary_and_scripts_build_static() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-agent");
        let e = require_static(&missing).unwrap_err();
        assert!(matches!(e, AgentBinaryError::Unreadable { .. }));
        let dynamic = std::env::current_exe().unwrap();
        let e2 = require_static(&dynamic).unwrap_err();
        assert!(matches!(e2, AgentBinaryError::NotStatic { .. }));
        for (e, path) in [(e, missing), (e2, dynamic)] {
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert!(text.contains("scripts/build-static"), "{text}");
        }
        let good = dir.path().join("static-agent");
        std::fs::write(&good, elf(ET_EXEC, &[load()])).unwrap();
        require_static(&good).unwrap();
    }

    #[test]
    fn the_configured_path_wins_then_the_variable_then_next_to_ironclaw() {
        let configured = Path::new("/opt/agent");
        let var = || Some(OsString::from("/from/var"));
        let exe = || Some(PathBuf::from("/usr/local/bin/ironclaw"));
        assert_eq!(resolve_from(Some(configured), var(), exe()), configured);
        assert_eq!(resolve_from(None, var(), exe()), Path::new("/from/var"));
        assert_eq!(
            resolve_from(None, None, exe()),
            Path::new("/usr/local/bin/ironclaw-agent")
        );
        assert_eq!(resolve_from(None, None, None), Path::new(AGENT_FILE_NAME));
    }

    #[test]
    fn in_a_source_tree_the_static_build_is_found_unless_one_is_beside_ironclaw() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let release = target.join("release");
        let built = target.join(STATIC_BUILD_DIR);
        std::fs::create_dir_all(&release).unwrap();
        std::fs::create_dir_all(&built).unwrap();
        let exe = || Some(release.join("ironclaw"));
        // Nothing built yet: the place next to ironclaw is named (and reported missing).
        assert_eq!(
            resolve_from(None, None, exe()),
            release.join(AGENT_FILE_NAME)
        );
        // A dynamic agent beside ironclaw (what `cargo build --workspace` leaves) loses
        // to the static build; a static one beside it wins.
        std::fs::write(
            release.join(AGENT_FILE_NAME),
            elf(ET_DYN, &[(PT_INTERP, b"/lib64/ld".to_vec())]),
        )
        .unwrap();
        assert_eq!(
            resolve_from(None, None, exe()),
            release.join(AGENT_FILE_NAME),
            "only one there"
        );
        std::fs::write(built.join(AGENT_FILE_NAME), elf(ET_EXEC, &[load()])).unwrap();
        assert_eq!(resolve_from(None, None, exe()), built.join(AGENT_FILE_NAME));
        std::fs::write(release.join(AGENT_FILE_NAME), elf(ET_EXEC, &[load()])).unwrap();
        assert_eq!(
            resolve_from(None, None, exe()),
            release.join(AGENT_FILE_NAME)
        );
        // Outside a target directory nothing else is looked for.
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        assert_eq!(
            resolve_from(None, None, Some(bin.join("ironclaw"))),
            bin.join(AGENT_FILE_NAME)
        );
    }
}
