//! The control plane's shape, checked from its source: no import cycle among its
//! top-level modules, no row state spelled as SQL text outside `store/state.rs`, and no
//! store handle in the channels or the operator interfaces (they call the service).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A file's code: comment lines and its unit tests left out.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level module a source file belongs to (`store` for `store/messages.rs`).
fn top_module(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap();
    first.trim_end_matches(".rs").to_owned()
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Which top-level modules each top-level module names through `crate::`.
fn module_graph() -> Graph {
    let mut graph = Graph::new();
    for path in sources(&src()) {
        let from = top_module(&path);
        if from == "lib" || from == "main" {
            continue;
        }
        let code = code(&path);
        let entry = graph.entry(from.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() && name != from {
                entry.insert(name);
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one, as the path that closes it.
fn cycle_through(graph: &Graph, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![start.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("paths are never empty");
        for next in graph.get(last).into_iter().flatten() {
            let mut longer = path.clone();
            longer.push(next.clone());
            if next == start {
                return Some(longer);
            }
            if seen.insert(next.clone()) {
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn no_import_cycle_among_top_level_modules() {
    let graph = module_graph();
    assert!(graph.len() > 10, "the modules were found: {graph:?}");
    assert!(graph["service"].contains("store"), "edges were found");
    for module in graph.keys() {
        if let Some(cycle) = cycle_through(&graph, module) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut graph = Graph::new();
    for (a, b) in [
        ("config", "proxy"),
        ("proxy", "gateway"),
        ("gateway", "config"),
    ] {
        graph.entry(a.into()).or_default().insert(b.into());
    }
    graph.entry("model".into()).or_default();
    assert_eq!(
        cycle_through(&graph, "config").unwrap(),
        ["config", "proxy", "gateway", "config"]
    );
    assert!(cycle_through(&graph, "model").is_none());
}

/// Every state word of the control store (`store/state.rs` spells each once).
fn state_words() -> Vec<String> {
    let text = std::fs::read_to_string(src().join("store/state.rs")).unwrap();
    let mut words = Vec::new();
    for line in text.lines() {
        if let Some((variant, rest)) = line.trim().split_once(" = \"")
            && variant.chars().all(|c| c.is_ascii_alphabetic())
            && let Some(word) = rest.strip_suffix("\",")
        {
            words.push(word.to_owned());
        }
    }
    words
}

#[test]
fn no_state_is_spelled_as_sql_text_outside_its_module() {
    let words = state_words();
    assert!(
        words.iter().any(|w| w == "published") && words.len() > 15,
        "{words:?}"
    );
    let mut found = Vec::new();
    for path in sources(&src()) {
        if path.ends_with("store/state.rs") {
            continue;
        }
        let code = code(&path);
        for w in &words {
            if code.contains(&format!("'{w}'")) {
                found.push(format!("{} spells '{w}'", path.display()));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}

/// Whether `code` holds `word` not followed by more of an identifier (`Stored` does
/// not name `Store`).
fn names(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(i, _)| {
        !code[i + word.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
    })
}

#[test]
fn channels_and_operator_interfaces_hold_no_store_handle() {
    assert!(names("fn f(s: &Store)", "Store") && !names("Accepted::Stored(m)", "Store"));
    let outside: Vec<PathBuf> = sources(&src())
        .into_iter()
        .filter(|p| ["channels", "admin", "admin_api"].contains(&top_module(p).as_str()))
        .collect();
    assert!(outside.len() >= 8, "{outside:?}");
    for path in outside {
        let code = code(&path);
        for handle in [".db(", "Store", "rusqlite", "Connection"] {
            assert!(!names(&code, handle), "{} names {handle}", path.display());
        }
    }
}
