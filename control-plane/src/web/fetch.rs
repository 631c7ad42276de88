//! One HTTPS GET made by the control plane for an agent: no cookies, no credentials,
//! fixed headers; the host resolved here and the connection made to the address that
//! was checked (never resolved again, so a DNS answer cannot change between the check
//! and the connection); TLS verified; redirects followed only as the caller allows,
//! each hop checked again, at most [`MAX_REDIRECTS`]; the body read within a byte cap
//! and the whole fetch within a deadline, so a server that trickles is cut off; only
//! text-like content types are taken.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use url::Url;

use super::address;

/// Redirects followed, at most.
pub const MAX_REDIRECTS: usize = 3;
/// Largest body read.
pub const MAX_BODY_BYTES: u64 = 2 * 1024 * 1024;
/// Time one fetch may take, redirects and body included.
pub const FETCH_DEADLINE: Duration = Duration::from_secs(20);
/// The content types taken.
pub const CONTENT_TYPES: [&str; 5] = [
    "text/html",
    "text/plain",
    "application/xhtml+xml",
    "application/json",
    "text/markdown",
];

/// How the broker reaches the web.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// Names answered here instead of by DNS (tests only; `doctor` flags them).
    pub test_hosts: BTreeMap<String, IpAddr>,
    /// An extra trusted CA, PEM (tests only; `doctor` flags it).
    pub extra_ca: Option<Vec<u8>>,
    /// Clients already built, by host, the address they are pinned to and the CA: a
    /// client takes tens of milliseconds to build (its TLS roots).
    pub clients: Clients,
}

/// Clients kept for reuse, at most [`MAX_CLIENTS`]; one is reused only for the same
/// host pinned to the same checked address, with the same extra CA.
#[derive(Debug, Clone, Default)]
pub struct Clients(std::sync::Arc<std::sync::Mutex<ClientMap>>);

/// Clients by host, pinned address and extra CA (its hash).
type ClientMap = std::collections::HashMap<(String, IpAddr, u64), reqwest::Client>;

/// Clients kept, at most.
pub const MAX_CLIENTS: usize = 64;

/// Why a fetch was refused or failed: said to the agent and recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("only https URLs without credentials may be fetched")]
    NotHttps,
    #[error("only port 443 may be fetched")]
    Port,
    #[error("{host} could not be resolved")]
    Unresolved { host: String },
    #[error("{host} resolves to {ip}, {why}")]
    Address {
        host: String,
        ip: IpAddr,
        why: &'static str,
    },
    #[error("a redirect was not followed: {why}")]
    Redirect { why: String },
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("the connection or TLS failed: {0}")]
    Connect(String),
    #[error("the server answered status {0}")]
    Status(u16),
    #[error("the content type is not text")]
    ContentType,
    #[error("the answer is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("the fetch took longer than {} seconds", FETCH_DEADLINE.as_secs())]
    Deadline,
}

/// What a fetch brought back.
#[derive(Debug, Clone)]
pub struct Page {
    /// The URL the body came from (after redirects).
    pub url: Url,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// Checks `url` for the fetch rules that do not depend on where it came from.
pub fn check_form(url: &Url) -> Result<(), FetchError> {
    if url.scheme() != "https"
        || !url.username().is_empty()
        || url.password().is_some()
        || url.host_str().is_none()
    {
        return Err(FetchError::NotHttps);
    }
    if url.port().is_some_and(|p| p != 443) {
        return Err(FetchError::Port);
    }
    Ok(())
}

impl Reach {
    /// The address to connect to for `host`: the test override, else the resolver's
    /// answers, every one of which must be public (one that is not refuses the host:
    /// a name that answers with a private address now may answer with it next time).
    pub async fn resolve(&self, host: &str) -> Result<IpAddr, FetchError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let candidates: Vec<IpAddr> = if let Some(ip) = self.test_hosts.get(&host) {
            vec![*ip]
        } else if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            vec![ip]
        } else {
            tokio::net::lookup_host((host.as_str(), 443))
                .await
                .map_err(|_| FetchError::Unresolved { host: host.clone() })?
                .map(|a| a.ip())
                .collect()
        };
        if candidates.is_empty() {
            return Err(FetchError::Unresolved { host });
        }
        for ip in &candidates {
            let why = address::refused(*ip).or_else(|| {
                (self.test_hosts.is_empty() && address::documentation(*ip))
                    .then_some("a documentation address (allowed only with web.test_hosts)")
            });
            if let Some(why) = why {
                return Err(FetchError::Address { host, ip: *ip, why });
            }
        }
        Ok(candidates[0])
    }

    /// GETs `url`, following redirects that `may_follow` allows (it says why not).
    pub async fn fetch(
        &self,
        url: &Url,
        may_follow: impl Fn(&Url, &Url) -> Result<(), String>,
    ) -> Result<Page, FetchError> {
        let deadline = Instant::now() + FETCH_DEADLINE;
        let mut url = url.clone();
        for hop in 0..=MAX_REDIRECTS {
            check_form(&url)?;
            let host = url.host_str().unwrap_or_default().to_owned();
            let left = deadline.saturating_duration_since(Instant::now());
            let ip = tokio::time::timeout(left, self.resolve(&host))
                .await
                .map_err(|_| FetchError::Deadline)??;
            let client = self.client(&host, ip)?;
            let left = deadline.saturating_duration_since(Instant::now());
            let sent = tokio::time::timeout(left, client.get(url.clone()).send()).await;
            let mut resp = match sent {
                Err(_) => return Err(FetchError::Deadline),
                Ok(Err(e)) => return Err(FetchError::Connect(crate::error_chain(&e))),
                Ok(Ok(r)) => r,
            };
            let status = resp.status();
            if status.is_redirection() {
                let to = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| url.join(l).ok())
                    .ok_or(FetchError::Status(status.as_u16()))?;
                if hop == MAX_REDIRECTS {
                    return Err(FetchError::TooManyRedirects);
                }
                check_form(&to).map_err(|e| FetchError::Redirect { why: e.to_string() })?;
                may_follow(&url, &to).map_err(|why| FetchError::Redirect { why })?;
                url = to;
                continue;
            }
            if !status.is_success() {
                return Err(FetchError::Status(status.as_u16()));
            }
            let content_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_ascii_lowercase();
            let essence = content_type
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            if !CONTENT_TYPES.contains(&essence.as_str()) {
                return Err(FetchError::ContentType);
            }
            if resp.content_length().is_some_and(|n| n > MAX_BODY_BYTES) {
                return Err(FetchError::TooLarge);
            }
            let mut body = Vec::new();
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, resp.chunk()).await {
                    Err(_) => return Err(FetchError::Deadline),
                    Ok(Err(e)) => return Err(FetchError::Connect(crate::error_chain(&e))),
                    Ok(Ok(None)) => break,
                    Ok(Ok(Some(chunk))) => {
                        if body.len() as u64 + chunk.len() as u64 > MAX_BODY_BYTES {
                            return Err(FetchError::TooLarge);
                        }
                        body.extend_from_slice(&chunk);
                    }
                }
            }
            return Ok(Page {
                url,
                content_type: essence,
                body,
            });
        }
        Err(FetchError::TooManyRedirects)
    }

    /// A client that connects `host` to `ip` only: no redirects, no cookies, no proxy,
    /// fixed headers, TLS verified against the web's roots (and the extra CA, if set).
    fn client(&self, host: &str, ip: IpAddr) -> Result<reqwest::Client, FetchError> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.extra_ca.hash(&mut h);
        let key = (host.to_owned(), ip, h.finish());
        let mut kept = self.clients.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = kept.get(&key) {
            return Ok(c.clone());
        }
        let built = self.build_client(host, ip)?;
        if kept.len() >= MAX_CLIENTS {
            kept.clear();
        }
        kept.insert(key, built.clone());
        Ok(built)
    }

    fn build_client(&self, host: &str, ip: IpAddr) -> Result<reqwest::Client, FetchError> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::ACCEPT,
            reqwest::header::HeaderValue::from_static(
                "text/html, text/plain, application/xhtml+xml, application/json;q=0.9",
            ),
        );
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(true)
            .user_agent("IronClaw-fetch/1")
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(10))
            .resolve(host, SocketAddr::new(ip, 443));
        if let Some(pem) = &self.extra_ca {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| FetchError::Connect(format!("the extra CA is not usable: {e}")))?;
            b = b.add_root_certificate(ca);
        }
        b.build()
            .map_err(|e| FetchError::Connect(crate::error_chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hosts_that_resolve_to_forbidden_addresses_are_refused_before_any_connection() {
        let mut reach = Reach::default();
        reach
            .test_hosts
            .insert("inside.test".into(), "10.0.0.5".parse().unwrap());
        reach
            .test_hosts
            .insert("meta.test".into(), "169.254.169.254".parse().unwrap());
        for host in [
            "inside.test",
            "META.test.",
            "127.0.0.1",
            "[::1]",
            "localhost",
        ] {
            let got = reach.resolve(host).await;
            assert!(
                matches!(got, Err(FetchError::Address { .. })),
                "{host}: {got:?}"
            );
        }
    }

    #[test]
    fn only_https_on_443_without_credentials_has_the_right_form() {
        for ok in ["https://site.test/a?b=c", "https://site.test:443/"] {
            assert_eq!(check_form(&Url::parse(ok).unwrap()), Ok(()), "{ok}");
        }
        for bad in [
            "http://site.test/",
            "https://u:p@site.test/",
            "https://site.test:8443/",
            "ftp://site.test/",
            "file:///etc/passwd",
        ] {
            assert!(check_form(&Url::parse(bad).unwrap()).is_err(), "{bad}");
        }
    }
}
