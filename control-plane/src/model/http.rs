//! What every HTTP provider shares: an approved endpoint, the API key, a client that
//! follows no redirect, bounded answers, and retries with backoff.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use zeroize::Zeroizing;

use super::ProviderError;

/// Largest provider answer read, in bytes.
pub const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// An endpoint the control plane may call (a model provider, the Telegram Bot API),
/// built only through [`ApprovedEndpoint::parse`], which is the endpoint rule: HTTPS to a
/// DNS name, or HTTP or HTTPS to loopback (a local Ollama or llama.cpp server) or to a
/// Tailscale address (an Ollama on another machine of the tailnet, which WireGuard
/// reaches encrypted and authenticated). The
/// configuration check, the gateway's policy and `doctor` all ask it, so what a file may
/// hold and what a change request may ask for are the same. The agent never supplies one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovedEndpoint(Url);

/// Why an endpoint was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("{0} is not a URL")]
    NotAUrl(String),
    #[error("{0} carries credentials, a query or a fragment")]
    Extras(String),
    #[error(
        "{0} is an IP address, not a host name: away from loopback and Tailscale addresses an endpoint is named by the host name its certificate is checked against"
    )]
    IpLiteral(String),
    #[error(
        "{0} is plain HTTP to a host that is neither loopback nor a Tailscale address: plain HTTP is allowed only to loopback (127.0.0.1, ::1, localhost) and to Tailscale addresses (100.64.0.0/10, fd7a:115c:a1e0::/48), whose traffic WireGuard encrypts; use https:// with a host name otherwise"
    )]
    NotHttps(String),
}

/// Whether `url`'s host is a loopback address or `localhost`.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// Whether `url`'s host is a Tailscale address. Names are not taken (`*.ts.net`): the
/// DNS that resolves them is not the tunnel's to vouch for.
fn is_tailnet(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => crate::tailnet::in_tailnet(a.into()),
        Some(url::Host::Ipv6(a)) => crate::tailnet::in_tailnet(a.into()),
        _ => false,
    }
}

impl ApprovedEndpoint {
    /// The endpoint rule. Away from loopback the host must be a DNS name: it is what the
    /// certificate is checked against and what an approver reads, where an IP address
    /// says neither who answers nor that it is the one meant.
    pub fn parse(base: &str) -> Result<Self, EndpointError> {
        let url = Url::parse(base).map_err(|_| EndpointError::NotAUrl(base.into()))?;
        if !url.username().is_empty()
            || url.password().is_some()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(EndpointError::Extras(base.into()));
        }
        let inside = is_loopback(&url) || is_tailnet(&url);
        match url.scheme() {
            "https" => {}
            "http" if inside => {}
            _ => return Err(EndpointError::NotHttps(base.into())),
        }
        if !inside && matches!(url.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))) {
            return Err(EndpointError::IpLiteral(base.into()));
        }
        Ok(ApprovedEndpoint(url))
    }

    /// The base URL joined with a fixed API path. A base that already ends in the
    /// path's version (`http://127.0.0.1:11434/v1`, as Ollama's documentation writes
    /// it) is not given it twice.
    pub fn join(&self, path: &str) -> Url {
        let mut url = self.0.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        let path = match path.strip_prefix("/v1/") {
            Some(rest) if base.ends_with("/v1") => format!("/{rest}"),
            _ => path.to_owned(),
        };
        url.set_path(&format!("{base}{path}"));
        url
    }
}

/// A provider's API key, read by the control plane only. Wiped on drop, never printed.
#[derive(Clone)]
pub struct ApiKey(Zeroizing<String>);

/// Why an API key file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading the API key file {path} failed")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the API key file {path} is empty, larger than 4 KiB, or not one line of text")]
    Malformed { path: std::path::PathBuf },
    #[error(
        "the API key file {path} is readable by other users (mode {mode:o}); make it 0600 or 0400"
    )]
    Exposed { path: std::path::PathBuf, mode: u32 },
    #[error(
        "{name} is named as a systemd credential, but no credentials were passed (run under systemd with LoadCredentialEncrypted={name}:…, see deploy/seal-credential)"
    )]
    NoCredentials { name: String },
    #[error("{name} is not a credential name (letters, digits, '.', '_' and '-', at most 64)")]
    BadCredentialName { name: String },
}

/// How a key file names a systemd credential instead of a path: `credential:NAME`.
pub const CREDENTIAL_PREFIX: &str = "credential:";

/// Where a key file is: a path as written, or for `credential:NAME` the file systemd
/// decrypted into `$CREDENTIALS_DIRECTORY/NAME` for this service alone.
pub fn key_file_path(written: &std::path::Path) -> Result<std::path::PathBuf, KeyFileError> {
    let Some(name) = written
        .to_str()
        .and_then(|w| w.strip_prefix(CREDENTIAL_PREFIX))
    else {
        return Ok(written.to_owned());
    };
    let valid = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !valid {
        return Err(KeyFileError::BadCredentialName { name: name.into() });
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
        .ok_or_else(|| KeyFileError::NoCredentials { name: name.into() })?;
    Ok(std::path::Path::new(&dir).join(name))
}

impl ApiKey {
    pub fn new(key: String) -> Self {
        ApiKey(Zeroizing::new(key.trim().to_owned()))
    }

    /// Reads the key from `api_key_file` (a path, or `credential:NAME`, see
    /// [`key_file_path`]): one line, at most 4 KiB, not readable by group or others.
    pub fn from_file(written: &std::path::Path) -> Result<Self, KeyFileError> {
        use std::os::unix::fs::PermissionsExt;
        let path = &key_file_path(written)?;
        let read = |source| KeyFileError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read(path).map_err(read)?);
        let malformed = || KeyFileError::Malformed {
            path: path.to_owned(),
        };
        let text = std::str::from_utf8(&text).map_err(|_| malformed())?;
        let key = text.trim();
        if key.is_empty() || text.len() > 4096 || key.contains(['\n', '\r']) {
            return Err(malformed());
        }
        Ok(ApiKey::new(key.to_owned()))
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

/// Retries of one call.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// A `multipart/form-data` body, built by hand: fields and files, under a random
/// boundary that none of the parts contains.
#[derive(Debug)]
pub struct Multipart {
    parts: Vec<(String, Vec<u8>)>,
}

impl Multipart {
    pub fn new() -> Self {
        Multipart { parts: Vec::new() }
    }

    /// A plain field.
    pub fn field(mut self, name: &str, value: &str) -> Self {
        self.parts.push((
            format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"),
            value.as_bytes().to_vec(),
        ));
        self
    }

    /// A file: its name loses quotes, backslashes and control characters.
    pub fn file(mut self, name: &str, file_name: &str, content_type: &str, bytes: &[u8]) -> Self {
        let file_name: String = file_name
            .chars()
            .filter(|c| !matches!(c, '"' | '\\') && !c.is_control())
            .collect();
        self.parts.push((
            format!(
                "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file_name}\"\r\n\
                 Content-Type: {content_type}\r\n\r\n"
            ),
            bytes.to_vec(),
        ));
        self
    }

    /// The content type (with its boundary) and the body; `None` without a random source.
    pub fn finish(self) -> Option<(String, Vec<u8>)> {
        let boundary = loop {
            let mut r = [0u8; 16];
            getrandom::getrandom(&mut r).ok()?;
            let b = format!("ironclaw-{}", hex::encode(r));
            let inside = |hay: &[u8]| hay.windows(b.len()).any(|w| w == b.as_bytes());
            if !self
                .parts
                .iter()
                .any(|(h, v)| inside(h.as_bytes()) || inside(v))
            {
                break b;
            }
        };
        let mut body = Vec::new();
        for (head, value) in &self.parts {
            body.extend_from_slice(format!("--{boundary}\r\n{head}").as_bytes());
            body.extend_from_slice(value);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        Some((format!("multipart/form-data; boundary={boundary}"), body))
    }
}

impl Default for Multipart {
    fn default() -> Self {
        Self::new()
    }
}

/// More bytes than the cap, or the answer broke off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    TooLarge,
    Broken,
}

/// Reads `resp`'s body, at most `cap` bytes (a declared larger length is refused at once).
pub async fn read_capped(resp: &mut reqwest::Response, cap: u64) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(ReadError::TooLarge);
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|_| ReadError::Broken)? {
        if (bytes.len() + chunk.len()) as u64 > cap {
            return Err(ReadError::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// The HTTP client every provider uses: no redirects (a redirect is an answer, not a
/// new destination), no proxy from the environment, rustls.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        // A connection that cannot be made is reported as such (nothing was sent), not
        // as a request that timed out after it may have arrived.
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("a client with a fixed configuration builds")
}

fn header(name: &'static str, value: &str) -> Result<(HeaderName, HeaderValue), ProviderError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| ProviderError::Refused {
        status: 0,
        at: String::new(),
    })?;
    v.set_sensitive(true);
    Ok((HeaderName::from_static(name), v))
}

/// POSTs `body` to `url` with `headers`, retrying timeouts, 429 and 5xx with backoff
/// (honouring `Retry-After`), and returns the answer's bytes.
pub async fn post_json(
    client: &reqwest::Client,
    url: &Url,
    headers: &[(&'static str, &str)],
    body: &serde_json::Value,
    retry: &RetryPolicy,
) -> Result<Vec<u8>, ProviderError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let (n, v) = header(name, value)?;
        map.insert(n, v);
    }
    let mut last = ProviderError::Timeout;
    for attempt in 0..retry.attempts.max(1) {
        if attempt > 0 {
            let backoff = retry
                .first_delay
                .saturating_mul(1 << (attempt - 1).min(10))
                .min(retry.max_delay);
            let wait = match &last {
                ProviderError::Unavailable {
                    retry_after_secs: Some(s),
                    ..
                } => Duration::from_secs(*s).min(retry.max_delay).max(backoff),
                _ => backoff,
            };
            tokio::time::sleep(wait).await;
        }
        match once(client, url, &map, body, retry.request_timeout).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) if e.retryable() => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// The innermost causes of a failed request, most specific last ("tcp connect error:
/// Connection refused (os error 111)", "dns error: ...", "invalid peer certificate").
/// Neither holds a header, so no key can be in it.
fn innermost(e: &reqwest::Error) -> String {
    let mut causes: Vec<String> = Vec::new();
    let mut next: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = next {
        causes.push(c.to_string());
        next = c.source();
    }
    // Outer causes repeat their inner ones; the last two say what happened.
    let tail = causes.len().saturating_sub(2);
    match causes.split_off(tail).join(": ") {
        s if s.is_empty() => e.to_string(),
        s => s,
    }
}

async fn once(
    client: &reqwest::Client,
    url: &Url,
    headers: &HeaderMap,
    body: &serde_json::Value,
    timeout: Duration,
) -> Result<Vec<u8>, ProviderError> {
    let sent = client
        .post(url.clone())
        .headers(headers.clone())
        .json(body)
        .timeout(timeout)
        .send()
        .await;
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Err(ProviderError::Timeout),
        Err(e) => {
            return Err(ProviderError::Unreachable {
                cause: format!("{url}: {}", innermost(&e)),
            });
        }
    };
    let status = resp.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let retry_after_secs = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        return Err(ProviderError::Unavailable {
            status: status.as_u16(),
            retry_after_secs,
        });
    }
    if !status.is_success() {
        // Includes every 3xx: redirects are not followed.
        return Err(ProviderError::Refused {
            status: status.as_u16(),
            at: url.to_string(),
        });
    }
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if out.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(ProviderError::BadAnswer);
                }
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out),
            Err(e) if e.is_timeout() => return Err(ProviderError::Timeout),
            Err(_) => {
                return Err(ProviderError::Unavailable {
                    status: 0,
                    retry_after_secs: None,
                });
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The endpoint rule's answer for each kind of endpoint; `doctor`'s tests hold the
    /// configuration check, the policy and doctor to the same table.
    pub(crate) const ENDPOINTS: [(&str, Result<(), &str>); 23] = [
        ("http://100.101.102.103:11434", Ok(())),
        ("http://[fd7a:115c:a1e0::7]:11434/v1", Ok(())),
        ("https://100.64.0.1", Ok(())),
        ("http://100.128.0.1:11434", Err("not_https")),
        ("http://ollama.tail1234.ts.net:11434", Err("not_https")),
        ("https://api.anthropic.com", Ok(())),
        ("https://api.example.com/v1/", Ok(())),
        ("http://127.0.0.1:11434", Ok(())),
        ("http://localhost:8080/v1", Ok(())),
        ("http://[::1]:1", Ok(())),
        ("https://127.0.0.1:8443", Ok(())),
        ("https://203.0.113.9", Err("ip_literal")),
        ("https://[2001:db8::1]:443", Err("ip_literal")),
        ("https://[::ffff:127.0.0.1]", Err("ip_literal")),
        ("http://10.0.0.5:11434", Err("not_https")),
        ("http://169.254.169.254/latest", Err("not_https")),
        ("http://api.example.com", Err("not_https")),
        ("http://localhost.example.com", Err("not_https")),
        ("ftp://127.0.0.1", Err("not_https")),
        ("https://user:pw@api.example.com", Err("extras")),
        ("http://user@127.0.0.1:11434", Err("extras")),
        ("https://api.example.com/?x=1", Err("extras")),
        ("not a url", Err("not_a_url")),
    ];

    /// The variant's name in [`ENDPOINTS`].
    pub(crate) fn kind(e: &EndpointError) -> &'static str {
        match e {
            EndpointError::NotAUrl(_) => "not_a_url",
            EndpointError::Extras(_) => "extras",
            EndpointError::IpLiteral(_) => "ip_literal",
            EndpointError::NotHttps(_) => "not_https",
        }
    }

    #[test]
    fn a_base_ending_in_the_version_is_not_given_it_twice() {
        for (base, want) in [
            (
                "http://127.0.0.1:11434",
                "http://127.0.0.1:11434/v1/chat/completions",
            ),
            (
                "http://127.0.0.1:11434/v1",
                "http://127.0.0.1:11434/v1/chat/completions",
            ),
            (
                "http://127.0.0.1:11434/v1/",
                "http://127.0.0.1:11434/v1/chat/completions",
            ),
            (
                "https://api.example.com/openai",
                "https://api.example.com/openai/v1/chat/completions",
            ),
            (
                "https://api.example.com/v10",
                "https://api.example.com/v10/v1/chat/completions",
            ),
        ] {
            let e = ApprovedEndpoint::parse(base).unwrap();
            assert_eq!(e.join("/v1/chat/completions").as_str(), want, "{base}");
        }
    }

    #[test]
    fn the_endpoint_rule_answers_the_table() {
        for (url, want) in ENDPOINTS {
            let got = ApprovedEndpoint::parse(url)
                .map(|_| ())
                .map_err(|e| kind(&e));
            assert_eq!(got, want, "{url}");
        }
    }

    #[test]
    fn only_https_or_loopback_endpoints_are_approved() {
        for ok in [
            "https://api.anthropic.com",
            "http://127.0.0.1:11434",
            "http://localhost:8080/v1",
            "http://[::1]:1",
        ] {
            assert!(ApprovedEndpoint::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://api.example.com",
            "http://10.0.0.1",
            "http://169.254.169.254",
            "ftp://x",
            "https://user:pw@api.example.com",
            "https://api.example.com/?x=1",
            "not a url",
        ] {
            assert!(ApprovedEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_joined_under_the_base() {
        let e = ApprovedEndpoint::parse("http://127.0.0.1:9/prefix/").unwrap();
        assert_eq!(
            e.join("/v1/chat/completions").as_str(),
            "http://127.0.0.1:9/prefix/v1/chat/completions"
        );
    }

    #[test]
    fn key_files_must_be_private_single_lines() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.key");
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("sk-abc\n", 0o600);
        assert_eq!(ApiKey::from_file(&path).unwrap().expose(), "sk-abc");
        write("sk-abc\n", 0o644);
        assert!(matches!(
            ApiKey::from_file(&path),
            Err(KeyFileError::Exposed { .. })
        ));
        for bad in ["", "\n", "a\nb\n"] {
            write(bad, 0o400);
            assert!(
                matches!(
                    ApiKey::from_file(&path),
                    Err(KeyFileError::Malformed { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            ApiKey::from_file(&dir.path().join("missing")),
            Err(KeyFileError::Read { .. })
        ));
    }

    #[test]
    fn keys_are_not_printed() {
        assert_eq!(
            format!("{:?}", ApiKey::new("sk-secret".into())),
            "ApiKey([redacted])"
        );
    }
}
