//! The web, brokered: an agent's fetch or search, decided here from what the control
//! plane itself knows.
//!
//! - A URL may be fetched only if the control plane has seen it for this session (in
//!   the person's message, in a search result it returned, as a link of a page it
//!   fetched) or an operator granted a prefix of it (`web.allowed_prefixes`). The model
//!   can choose a link; it cannot compose one.
//! - Every fetch and search takes in outside content: the session is tainted (see
//!   [`crate::store::web`]); while it is, its change requests are denied, its searches
//!   may only use words of the person's waiting messages, and an operator's prefix
//!   grant covers no URL with a query string.
//! - Each is charged to the session's day (`web.requests_per_day`, `bytes_per_day`)
//!   and recorded in the audit trail with its URL, provenance, bytes and outcome.

use base64::Engine;
use queue_proto::ids::SessionId;
use queue_proto::proxy::{SearchResult, WebAnswer};
use serde_json::{Value, json};
use url::Url;

use super::Service;
use crate::audit::AuditEvent;
use crate::config::{SearchKind, WebConfig};
use crate::proxy::session::WebCall;
use crate::store::usage::Daily;
use crate::web::fetch::{Reach, check_form};

/// Results returned by one search, at most.
pub(super) const MAX_RESULTS: usize = 8;
/// Longest title and snippet of a result, in characters.
const MAX_TITLE_CHARS: usize = 200;
const MAX_SNIPPET_CHARS: usize = 400;
/// Longest query while the session is tainted, in bytes.
pub(super) const MAX_TAINTED_QUERY_BYTES: usize = 100;

fn refused(reason: impl Into<String>) -> Option<WebAnswer> {
    Some(WebAnswer::Refused {
        reason: reason.into(),
    })
}

/// The https URLs written in `text` (as a person writes them: up to a space, a quote
/// or an angle bracket, closing punctuation left off), at most 50.
pub fn urls_in_text(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("https://") {
        let candidate = &rest[at..];
        let end = candidate
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>'))
            .unwrap_or(candidate.len());
        let raw = candidate[..end].trim_end_matches(['.', ',', ';', ':', '!', '?', ')', ']', '}']);
        rest = &candidate[end..];
        if let Ok(mut u) = Url::parse(raw) {
            u.set_fragment(None);
            if check_form(&u).is_ok() && !out.contains(&u.to_string()) {
                out.push(u.to_string());
            }
        }
        if out.len() >= 50 {
            break;
        }
    }
    out
}

/// Whether `url` lies under the operator's grant `prefix`: the same scheme, host and
/// port, and a path that starts with the prefix's path, which ends in `/` (the
/// configuration check requires it), so `https://a.test/api/` covers neither
/// `https://a.test/api-admin` nor `https://a.test.evil.example/`.
pub(super) fn granted(url: &Url, prefix: &str) -> bool {
    let Ok(p) = Url::parse(prefix) else {
        return false;
    };
    url.scheme() == p.scheme()
        && url.host_str() == p.host_str()
        && url.port_or_known_default() == p.port_or_known_default()
        && prefix.ends_with('/')
        && url.path().starts_with(p.path())
}

impl Service {
    /// Turns the web off or on for `session` (`None`: leaves it), recorded in the trail
    /// as `by`; whether it is on now, and its last fetches and searches.
    pub fn session_web(
        &self,
        session: &SessionId,
        set_off: Option<bool>,
        by: &str,
    ) -> Result<(bool, Vec<crate::store::web::WebRecord>), super::ServiceError> {
        if self.db(|s| s.session(session))?.is_none() {
            return Err(super::ServiceError::NoSession(session.clone()));
        }
        if let Some(off) = set_off {
            self.db(|s| s.set_web_off(session, off))?;
            self.audit(
                AuditEvent::SessionWebSet,
                json!({ "session": session.as_str(), "web": if off { "off" } else { "on" }, "by": by }),
            );
        }
        let off = self.db(|s| s.web_off(session))?;
        let records = self.db(|s| s.web_records(session, 50))?;
        Ok((!off, records))
    }

    /// Remembers the URLs the person wrote in a message of `session`.
    pub(super) fn person_wrote(&self, session: &SessionId, text: &str) {
        let urls = urls_in_text(text);
        let now = crate::state::now_secs();
        let done = self.db(|s| {
            s.person_wrote(session)?;
            s.remember_urls(session, &urls, "message", now)
        });
        if let Err(e) = done {
            tracing::error!(session = %session, error = %e, "recording a message's links failed");
        }
    }

    /// Answers one web call of `session`'s agent.
    pub(super) async fn web(&self, session: &SessionId, call: WebCall) -> Option<WebAnswer> {
        let config = self.config();
        let Some(web) = config.web.as_ref() else {
            return refused("the web is off for this assistant");
        };
        if self.db(|s| s.web_off(session)).unwrap_or(true) {
            return refused("an operator turned the web off for this conversation");
        }
        match call {
            WebCall::Fetch(url) => self.web_fetch(session, web, &url).await,
            WebCall::Search(query) => self.web_search(session, web, &query).await,
        }
    }

    fn day(web: &WebConfig) -> Daily {
        Daily {
            kind: "web",
            count: i64::from(web.requests_per_day),
            bytes: i64::try_from(web.bytes_per_day).unwrap_or(i64::MAX),
        }
    }

    /// Where `url` may be fetched from for `session`: the source that showed it, or
    /// the operator's grant; `None`: it was composed. While the session is tainted a
    /// grant covers no URL with a query string: a page read could otherwise have the
    /// model put the person's words into one.
    fn provenance(&self, session: &SessionId, web: &WebConfig, url: &Url) -> Option<String> {
        if let Ok(Some(source)) = self.db(|s| s.url_seen(session, url.as_str())) {
            return Some(source);
        }
        let granted = web.allowed_prefixes.iter().any(|p| granted(url, p));
        let tainted = !matches!(self.db(|s| s.taint_of(session)), Ok(None));
        (granted && !(tainted && url.query().is_some())).then(|| "granted prefix".to_owned())
    }

    fn record_web(&self, kind: AuditEvent, detail: Value) {
        self.audit(kind, detail);
    }

    async fn web_fetch(
        &self,
        session: &SessionId,
        web: &WebConfig,
        raw: &str,
    ) -> Option<WebAnswer> {
        let now = crate::state::now_secs();
        let record = |outcome: &str,
                      provenance: Option<&str>,
                      bytes: usize,
                      final_url: Option<&str>| {
            self.record_web(
                AuditEvent::WebFetched,
                json!({ "session": session.as_str(), "url": raw.chars().take(512).collect::<String>(),
                        "final_url": final_url, "provenance": provenance, "bytes": bytes,
                        "outcome": outcome }),
            );
        };
        let url = match Url::parse(raw) {
            Ok(mut u) => {
                u.set_fragment(None);
                u
            }
            Err(_) => {
                record("refused: not a URL", None, 0, None);
                return refused("that is not a URL");
            }
        };
        if let Err(e) = check_form(&url) {
            record(&format!("refused: {e}"), None, 0, None);
            return refused(e.to_string());
        }
        let Some(provenance) = self.provenance(session, web, &url) else {
            let why = "the control plane has not seen this URL for this conversation (in the person's message, a search result or a fetched page), and no operator granted it: a link can be followed, not composed";
            record("refused: not seen", None, 0, None);
            return refused(why);
        };
        let day = Self::day(web);
        match self.db(|s| s.charge_usage(session, day, now, 0)) {
            Ok(true) => {}
            Ok(false) => {
                record(
                    "refused: the day's web budget is used up",
                    Some(&provenance),
                    0,
                    None,
                );
                return refused("today's web budget for this conversation is used up");
            }
            Err(e) => {
                tracing::error!(session = %session, error = %e, "charging a fetch failed");
                return None;
            }
        }
        let reach = match self.reach(web) {
            Ok(r) => r,
            Err(why) => {
                record(&format!("failed: {why}"), Some(&provenance), 0, None);
                return refused(why);
            }
        };
        // A redirect is followed within the same host, or to a URL this side would
        // fetch anyway.
        let follow = |from: &Url, to: &Url| {
            if from.host_str() == to.host_str() || self.provenance(session, web, to).is_some() {
                Ok(())
            } else {
                Err("another host, not seen by the control plane and not granted".to_owned())
            }
        };
        // Whatever the server answers is outside content, a refusal included.
        if let Err(e) = self.db(|s| s.taint(session, url.as_str(), now)) {
            tracing::error!(session = %session, error = %e, "tainting a session failed");
            return None;
        }
        let page = match reach.fetch(&url, follow).await {
            Ok(p) => p,
            Err(e) => {
                record(&format!("refused: {e}"), Some(&provenance), 0, None);
                return refused(e.to_string());
            }
        };
        let bytes = page.body.len();
        let links: Vec<String> = crate::web::links::links(&page.body, &page.url)
            .into_iter()
            .map(String::from)
            .collect();
        let kept = self.db(|s| {
            s.add_usage(session, day.kind, now, 0, bytes as u64)?;
            s.remember_urls(session, &links, "page", now)?;
            s.taint(session, page.url.as_str(), now)
        });
        if let Err(e) = kept {
            tracing::error!(session = %session, error = %e, "recording a fetch failed");
            return None;
        }
        record("ok", Some(&provenance), bytes, Some(page.url.as_str()));
        Some(WebAnswer::Page {
            url: page.url.to_string(),
            content_type: page.content_type,
            data: base64::engine::general_purpose::STANDARD.encode(&page.body),
        })
    }

    fn reach(&self, web: &WebConfig) -> Result<Reach, String> {
        let extra_ca = match &web.tls_extra_ca_file {
            Some(p) => Some(
                std::fs::read(p)
                    .map_err(|e| format!("the extra CA {} cannot be read: {e}", p.display()))?,
            ),
            None => None,
        };
        Ok(Reach {
            test_hosts: web.test_hosts.clone(),
            extra_ca,
            clients: self.web_clients.clone(),
        })
    }

    async fn web_search(
        &self,
        session: &SessionId,
        web: &WebConfig,
        query: &str,
    ) -> Option<WebAnswer> {
        let now = crate::state::now_secs();
        let record = |outcome: &str, results: usize| {
            self.record_web(
                AuditEvent::WebSearched,
                json!({ "session": session.as_str(), "query_bytes": query.len(),
                        "results": results, "outcome": outcome }),
            );
        };
        let day = Self::day(web);
        match self.db(|s| s.charge_usage(session, day, now, 0)) {
            Ok(true) => {}
            Ok(false) => return refused("today's web budget for this conversation is used up"),
            Err(_) => return None,
        }
        // A tainted session searches only with the person's own words, whole; a store
        // that cannot say counts as tainted.
        let taint = match self.db(|s| s.taint_of(session)) {
            Ok(t) => t.map(|t| t.url),
            Err(_) => Some("(unknown: the store failed)".to_owned()),
        };
        if let Some(read) = taint {
            let waiting = self.db(|s| s.waiting_texts(session)).unwrap_or_default();
            let theirs: std::collections::HashSet<String> =
                waiting.iter().flat_map(|t| words(t)).collect();
            let foreign = words(query).iter().any(|w| !theirs.contains(w));
            if query.len() > MAX_TAINTED_QUERY_BYTES || foreign {
                record("refused: tainted query", 0);
                return refused(format!(
                    "after reading {read} this conversation may search only with the person's own words (at most {MAX_TAINTED_QUERY_BYTES} bytes)"
                ));
            }
        }
        let results = match search(web, query).await {
            Ok(r) => r,
            Err(why) => {
                record(&format!("failed: {why}"), 0);
                return refused(format!("the search failed: {why}"));
            }
        };
        let urls: Vec<String> = results.iter().map(|r| r.url.clone()).collect();
        let kept = self.db(|s| {
            s.remember_urls(session, &urls, "search", now)?;
            s.taint(
                session,
                &format!("search results for a {}-byte query", query.len()),
                now,
            )
        });
        if kept.is_err() {
            return None;
        }
        record("ok", results.len());
        Some(WebAnswer::Results { results })
    }
}

/// The words of `text`, lowercased.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Asks the configured backend; results bounded in number and length, https only.
async fn search(web: &WebConfig, query: &str) -> Result<Vec<SearchResult>, String> {
    let endpoint =
        crate::model::http::ApprovedEndpoint::parse(&web.search_url).map_err(|e| e.to_string())?;
    let client = crate::model::http::client();
    let (url, key_header) = match web.search {
        SearchKind::Searxng => {
            let mut u = endpoint.join("/search");
            u.query_pairs_mut()
                .append_pair("q", query)
                .append_pair("format", "json");
            (u, None)
        }
        SearchKind::Brave => {
            let mut u = endpoint.join("/res/v1/web/search");
            u.query_pairs_mut().append_pair("q", query);
            let key = match &web.search_key_file {
                Some(p) => crate::model::http::ApiKey::from_file(p).map_err(|e| e.to_string())?,
                None => return Err("no search key".into()),
            };
            (u, Some(key))
        }
    };
    let mut req = client.get(url).timeout(std::time::Duration::from_secs(20));
    if let Some(k) = &key_header {
        let mut v = reqwest::header::HeaderValue::from_str(k.expose())
            .map_err(|_| "the key is not a header value".to_owned())?;
        v.set_sensitive(true);
        req = req
            .header("X-Subscription-Token", v)
            .header("Accept", "application/json");
    }
    let mut resp = req
        .send()
        .await
        .map_err(|_| "the search backend could not be reached".to_owned())?;
    if !resp.status().is_success() {
        return Err(format!(
            "the search backend answered status {}",
            resp.status().as_u16()
        ));
    }
    let body = crate::model::http::read_capped(&mut resp, 2 * 1024 * 1024)
        .await
        .map_err(|_| "the search backend's answer was too large or broke off".to_owned())?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|_| "the search backend's answer was not JSON".to_owned())?;
    let (list, snippet) = match web.search {
        SearchKind::Searxng => (&v["results"], "content"),
        SearchKind::Brave => (&v["web"]["results"], "description"),
    };
    let cut = |s: &Value, n: usize| s.as_str().unwrap_or("").chars().take(n).collect::<String>();
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let mut u = Url::parse(r["url"].as_str()?).ok()?;
            u.set_fragment(None);
            check_form(&u).ok()?;
            Some(SearchResult {
                url: u.to_string(),
                title: cut(&r["title"], MAX_TITLE_CHARS),
                snippet: cut(&r[snippet], MAX_SNIPPET_CHARS),
            })
        })
        .take(MAX_RESULTS)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_covers_its_host_and_path_only() {
        let p = "https://granted.test/api/";
        for ok in [
            "https://granted.test/api/v1?x=1",
            "https://GRANTED.test:443/api/",
        ] {
            assert!(granted(&Url::parse(ok).unwrap(), p), "{ok}");
        }
        for bad in [
            "https://granted.test/api-admin",
            "https://granted.test/api",
            "https://granted.test.evil.example/api/",
            "https://granted.test:8443/api/",
            "https://granted.test/other/../api-x",
        ] {
            assert!(!granted(&Url::parse(bad).unwrap(), p), "{bad}");
        }
        assert!(!granted(
            &Url::parse("https://granted.test/x").unwrap(),
            "https://granted.test"
        ));
    }

    #[test]
    fn urls_are_read_from_text_as_a_person_writes_them() {
        let text = "see https://site.test/a?b=1. and (https://other.test/x) or \
                    <https://third.test/p#frag>, not http://plain.test/ nor https://u:p@c.test/";
        assert_eq!(
            urls_in_text(text),
            vec![
                "https://site.test/a?b=1",
                "https://other.test/x",
                "https://third.test/p",
            ]
        );
    }
}
