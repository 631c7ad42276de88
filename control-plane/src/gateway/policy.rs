//! The deterministic policy: plain rules with yes/no answers, applied before any human
//! sees a change. Some rules hold for every configuration, whoever wrote it; the others
//! judge what a change does to the configuration in force.

use crate::config::{Config, ConfigError, RuntimeChoice};
use crate::model::http::EndpointError;

use super::{Denial, deny};

/// The policy on a change: returns the new configuration if no rule refuses it. Every
/// rule of [`check_bootstrap`] holds; then gVisor is never turned off, and an agent
/// touches no host path, key file or runtime.
pub fn check(before: &Config, after_text: &str, by_agent: bool) -> Result<Config, Denial> {
    let after = standing(after_text)?;
    if after.sandbox.runtime != RuntimeChoice::Gvisor
        && before.sandbox.runtime == RuntimeChoice::Gvisor
    {
        return deny(
            "sandbox_off",
            "turning the gVisor sandbox off is never allowed",
        );
    }
    if by_agent {
        let (b, a) = (&before.sandbox, &after.sandbox);
        if b.agent_binary != a.agent_binary
            || b.runsc != a.runsc
            || b.runtime != a.runtime
            || before.model.api_key_file != after.model.api_key_file
        {
            return deny(
                "agent_scope",
                "an agent may not change host paths, key files or the runtime",
            );
        }
    }
    Ok(after)
}

/// The policy on the bootstrap text, the configuration file `serve` takes as approved
/// version 1 when the store holds none: what no change request may put in force, a first
/// file may not either. It parses, gives the sandbox no network, passes the
/// configuration check (endpoints by the one endpoint rule), and names an operator.
///
/// `sandbox.runtime = "host"` stays allowed here, as the development mode it is: the
/// rule that refuses it judges a change, which turns off the gVisor in force, and a first
/// file turns nothing off. Whoever writes that file is root on this machine already, so
/// refusing it would protect nothing and only take the mode away; instead it is loud:
/// `serve` warns at every start and `doctor` reports it as critical. A store begun under
/// gVisor can never leave it.
pub fn check_bootstrap(text: &str) -> Result<Config, Denial> {
    standing(text)
}

/// A first file the policy refuses is an invalid configuration to `serve`.
impl From<Denial> for ConfigError {
    fn from(d: Denial) -> Self {
        ConfigError::Invalid(format!("{} (policy rule {})", d.why, d.rule))
    }
}

/// The rules every configuration obeys, whoever wrote it and whatever was in force.
fn standing(text: &str) -> Result<Config, Denial> {
    let raw: toml::Table = toml::from_str(text).map_err(|e| Denial {
        rule: "parse",
        why: format!("the new configuration does not parse: {}", e.message()),
    })?;
    if raw
        .get("sandbox")
        .and_then(|s| s.as_table())
        .is_some_and(|s| s.contains_key("network"))
    {
        return deny("sandbox_network", "the sandbox never gets a network");
    }
    let config = Config::parse(text).map_err(refused)?;
    let o = &config.operators;
    if o.unix_uids.is_empty() && o.telegram.is_empty() && o.tailnet.is_empty() {
        return deny(
            "no_operators",
            "a configuration without operators could never change again",
        );
    }
    Ok(config)
}

/// The configuration check's refusal as a rule: an endpoint the endpoint rule
/// (`model::http::ApprovedEndpoint::parse`) refuses under a rule of its own, anything
/// else `invalid`. The endpoint's text is the requester's and stays out of the reason.
fn refused(e: ConfigError) -> Denial {
    let ConfigError::Endpoint { key, source } = &e else {
        return Denial {
            rule: "invalid",
            why: e.to_string(),
        };
    };
    let (rule, what) = match source {
        EndpointError::NotAUrl(_) => ("endpoint", "is not a URL"),
        EndpointError::Extras(_) => ("endpoint", "carries credentials, a query or a fragment"),
        EndpointError::IpLiteral(_) => ("endpoint_ip_literal", "is an IP address, not a host name"),
        EndpointError::NotHttps(_) => ("endpoint_not_https", "is not HTTPS"),
    };
    Denial {
        rule,
        why: format!("{key} {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CONFIG;
    use crate::gateway::candidate::agent_candidate;
    use crate::gateway::risk::change_risk;
    use queue_proto::items::ChangeTarget;

    const AGENT: bool = true;
    const OPERATOR: bool = false;

    fn base() -> Config {
        Config::parse(DEFAULT_CONFIG).unwrap()
    }

    #[test]
    fn the_policy_refuses_what_is_never_allowed() {
        let cases: [(ChangeTarget, &str, &str); 9] = [
            (
                ChangeTarget::SandboxLimits,
                r#"{"network": "host"}"#,
                "agent_scope",
            ),
            (
                ChangeTarget::SandboxLimits,
                r#"{"runtime": "host"}"#,
                "agent_scope",
            ),
            (
                ChangeTarget::SandboxLimits,
                r#"{"runsc": "/tmp/x"}"#,
                "agent_scope",
            ),
            (
                ChangeTarget::Model,
                r#"{"api_key_file": "/var/lib/ironclaw/master.key"}"#,
                "agent_scope",
            ),
            (
                ChangeTarget::Endpoints,
                "https://203.0.113.9",
                "endpoint_ip_literal",
            ),
            (
                ChangeTarget::Endpoints,
                "http://example.com",
                "endpoint_not_https",
            ),
            (ChangeTarget::Tools, r#"["reply", "shell"]"#, "parse"),
            (ChangeTarget::Tools, r#"["note_read"]"#, "invalid"),
            (ChangeTarget::AllowedUsers, "[1]", "no_channel"),
        ];
        for (target, after, rule) in cases {
            let got = agent_candidate(DEFAULT_CONFIG, target, after)
                .and_then(|t| check(&base(), &t, AGENT).map(|_| ()));
            assert_eq!(got.map_err(|d| d.rule), Err(rule), "{target:?} {after}");
        }
        let off = DEFAULT_CONFIG.replace("runtime = \"gvisor\"", "runtime = \"host\"");
        let by = OPERATOR;
        assert_eq!(check(&base(), &off, by).unwrap_err().rule, "sandbox_off");
        let net =
            DEFAULT_CONFIG.replace("memory_mib = 256", "memory_mib = 256\nnetwork = \"host\"");
        assert_eq!(
            check(&base(), &net, by).unwrap_err().rule,
            "sandbox_network"
        );
        let none = DEFAULT_CONFIG.replace("unix_uids = [0]", "unix_uids = []");
        assert_eq!(check(&base(), &none, by).unwrap_err().rule, "no_operators");
        let local = DEFAULT_CONFIG.replace(
            "provider = \"demo\"",
            "provider = \"openai\"\nbase_url = \"http://127.0.0.1:11434\"\nmodel = \"m\"",
        );
        let c = check(&base(), &local, by).unwrap();
        let (_, risk) = change_risk(&base(), &c, by);
        assert_eq!(risk, 0.92);
        // The admin API: on a tailnet address it is a risky change; anywhere else it
        // does not pass.
        let admin = |listen: &str| {
            DEFAULT_CONFIG.replace(
                "unix_uids = [0]",
                &format!("unix_uids = [0]\ntailnet = [\"a@example.com\"]\n\n[admin_api]\nlisten = \"{listen}\""),
            )
        };
        let on = check(&base(), &admin("100.101.1.2:8790"), by).unwrap();
        let (ops, _) = change_risk(&base(), &on, by);
        assert!(
            ops.iter()
                .any(|o| o.what == "admin API turned on or moved" && o.weight == 0.6)
        );
        assert_eq!(
            check(&base(), &admin("0.0.0.0:8790"), by).unwrap_err().rule,
            "invalid"
        );
    }

    #[test]
    fn a_first_file_obeys_every_rule_a_change_does_but_may_run_on_the_host() {
        assert!(check_bootstrap(DEFAULT_CONFIG).is_ok());
        let cases = [
            ("unix_uids = [0]", "unix_uids = []", "no_operators"),
            (
                "memory_mib = 256",
                "memory_mib = 256\nnetwork = \"host\"",
                "sandbox_network",
            ),
            (
                "provider = \"demo\"",
                "provider = \"demo\"\nbase_url = \"https://203.0.113.9\"",
                "endpoint_ip_literal",
            ),
            (
                "provider = \"demo\"",
                "provider = \"openai\"\nbase_url = \"http://api.example.com\"\nmodel = \"m\"",
                "endpoint_not_https",
            ),
            ("[operators]", "[operators", "parse"),
            ("memory_mib = 256", "memory_mib = 1", "invalid"),
        ];
        for (from, to, rule) in cases {
            let text = DEFAULT_CONFIG.replacen(from, to, 1);
            let got = check_bootstrap(&text).map(|_| ()).map_err(|d| d.rule);
            assert_eq!(got, Err(rule), "{to}");
        }
        // The development mode, decided above: allowed in a first file, refused as a change.
        let host = DEFAULT_CONFIG.replace("runtime = \"gvisor\"", "runtime = \"host\"");
        assert_eq!(
            check_bootstrap(&host).unwrap().sandbox.runtime,
            RuntimeChoice::Host
        );
        assert_eq!(
            check(&base(), &host, false).unwrap_err().rule,
            "sandbox_off"
        );
    }
}
