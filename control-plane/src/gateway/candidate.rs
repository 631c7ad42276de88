//! An agent's request made into a whole configuration: its one value set into its one
//! target with a TOML editor, so nothing the agent sends can reach another key, and the
//! operator's comments and layout stay as they were.

use queue_proto::items::{ChangeTarget, ToolName};
use toml_edit::{DocumentMut, Item, Value as TomlValue};

use super::{Denial, deny};

/// The keys an agent may set in the sections it may ask about. Anything naming a host
/// path (a key file, `runsc`, the agent binary) or the runtime is never an agent's to ask.
const AGENT_MODEL_KEYS: [&str; 3] = ["provider", "base_url", "model"];
const AGENT_BUDGET_KEYS: [&str; 3] = ["requests_per_minute", "tokens_per_day", "bytes_per_day"];
const AGENT_SANDBOX_KEYS: [&str; 2] = ["memory_mib", "idle_stop_secs"];

/// The whole configuration text an agent's request would make from `current`: the one
/// targeted value replaced, everything else (comments included) as it was.
pub fn agent_candidate(current: &str, target: ChangeTarget, after: &str) -> Result<String, Denial> {
    // What an approver approves must be what they can see: no control character but a
    // line break or a tab, nothing invisible (bidi overrides, zero widths, tags).
    if after
        .chars()
        .any(|c| (c.is_control() && c != '\n' && c != '\t') || crate::is_invisible(c))
    {
        return deny(
            "hidden_characters",
            "the value holds control or invisible characters, which an approver could not see",
        );
    }
    let mut doc: DocumentMut = current.parse().map_err(|_| Denial {
        rule: "parse",
        why: "the approved configuration does not parse".into(),
    })?;
    let json = || -> Result<serde_json::Value, Denial> {
        serde_json::from_str(after).map_err(|_| Denial {
            rule: "parse",
            why: format!("{} needs a JSON value", target.as_str()),
        })
    };
    match target {
        ChangeTarget::Instructions => {
            section(&mut doc, &["agent"])?.insert("instructions", toml_edit::value(after));
        }
        ChangeTarget::Endpoints => {
            section(&mut doc, &["model"])?.insert("base_url", toml_edit::value(after.trim()));
        }
        ChangeTarget::Tools => {
            let tools: Vec<ToolName> = serde_json::from_value(json()?).map_err(|_| Denial {
                rule: "parse",
                why: "tools needs a JSON list of known tool names".into(),
            })?;
            // Spelled as the configuration spells them: ToolName's one spelling.
            let array: toml_edit::Array = tools.iter().map(|t| t.as_str()).collect();
            section(&mut doc, &["agent"])?.insert("tools", toml_edit::value(array));
        }
        ChangeTarget::AllowedUsers => {
            let users: Vec<i64> = serde_json::from_value(json()?).map_err(|_| Denial {
                rule: "parse",
                why: "allowed_users needs a JSON list of Telegram user ids".into(),
            })?;
            let Some(tg) = doc
                .get_mut("channels")
                .and_then(|c| c.get_mut("telegram"))
                .and_then(Item::as_table_like_mut)
            else {
                return deny("no_channel", "the Telegram channel is not configured");
            };
            let array: toml_edit::Array = users.iter().copied().collect();
            tg.insert("allowed_users", toml_edit::value(array));
        }
        ChangeTarget::Model => merge(&mut doc, "model", &AGENT_MODEL_KEYS, json()?)?,
        ChangeTarget::Budgets => merge(&mut doc, "budgets", &AGENT_BUDGET_KEYS, json()?)?,
        ChangeTarget::SandboxLimits => merge(&mut doc, "sandbox", &AGENT_SANDBOX_KEYS, json()?)?,
    }
    Ok(doc.to_string())
}

/// The table at `path`, created if missing.
fn section<'d>(
    doc: &'d mut DocumentMut,
    path: &[&str],
) -> Result<&'d mut dyn toml_edit::TableLike, Denial> {
    let mut item = doc.as_item_mut();
    for key in path {
        let table = item.as_table_like_mut().ok_or_else(|| Denial {
            rule: "parse",
            why: format!("{key} is not a table in the approved configuration"),
        })?;
        item = table.entry(key).or_insert(toml_edit::table());
    }
    item.as_table_like_mut().ok_or_else(|| Denial {
        rule: "parse",
        why: "not a table in the approved configuration".into(),
    })
}

/// Sets the given keys of table `name` from a JSON object; keys outside `allowed` are
/// refused, whatever their value.
fn merge(
    doc: &mut DocumentMut,
    name: &str,
    allowed: &[&str],
    value: serde_json::Value,
) -> Result<(), Denial> {
    let serde_json::Value::Object(map) = value else {
        return deny("parse", format!("{name} needs a JSON object"));
    };
    if map.is_empty() {
        return deny("unchanged", "the request changes nothing");
    }
    let table = section(doc, &[name])?;
    for (key, v) in map {
        if !allowed.contains(&key.as_str()) {
            // The key is the agent's: kept short and printable in the record.
            let key: String = key
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(40)
                .collect();
            return deny("agent_scope", format!("an agent may not set {name}.{key}"));
        }
        let v: TomlValue = match v {
            serde_json::Value::String(s) => s.into(),
            serde_json::Value::Bool(b) => b.into(),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => i.into(),
                None => return deny("parse", format!("{name}.{key} must be an integer")),
            },
            _ => {
                return deny(
                    "parse",
                    format!("{name}.{key} must be a string or a number"),
                );
            }
        };
        table.insert(&key, Item::Value(v));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DEFAULT_CONFIG};
    use crate::gateway::diff::diff;
    use crate::gateway::policy::check;
    use crate::gateway::risk::change_risk;

    const AGENT: bool = true;

    fn base() -> Config {
        Config::parse(DEFAULT_CONFIG).unwrap()
    }

    #[test]
    fn a_value_with_characters_an_approver_could_not_see_is_denied() {
        let current = "[model]\nprovider = \"demo\"\n";
        for hidden in [
            "a\u{202e}b",
            "a\u{9b}2Jb",
            "a\u{200b}b",
            "a\x1b[2Jb",
            "a\u{e0041}b",
        ] {
            let denied = agent_candidate(current, ChangeTarget::Instructions, hidden).unwrap_err();
            assert_eq!(denied.rule, "hidden_characters", "{hidden:?}");
        }
        let seen = "Be brief.\n\tAnswer in Deutsch, ünïcödé and 😀.";
        assert!(agent_candidate(current, ChangeTarget::Instructions, seen).is_ok());
    }

    #[test]
    fn an_agent_request_changes_only_its_target_and_keeps_comments() {
        let text = agent_candidate(
            DEFAULT_CONFIG,
            ChangeTarget::Instructions,
            "Be brief.\n[operators]\nunix_uids = [1000]",
        )
        .unwrap();
        let c = check(&base(), &text, AGENT).unwrap();
        assert_eq!(
            c.agent.instructions,
            "Be brief.\n[operators]\nunix_uids = [1000]"
        );
        assert_eq!(
            c.operators.unix_uids,
            vec![0],
            "no injection through the value"
        );
        assert!(text.contains("# IronClaw configuration"));
        let (ops, risk) = change_risk(&base(), &c, AGENT);
        assert_eq!(ops.len(), 2);
        assert_eq!(risk, 0.44);
        let d = diff(DEFAULT_CONFIG, &text);
        assert!(d.contains("+ instructions = "), "{d}");
    }
}
