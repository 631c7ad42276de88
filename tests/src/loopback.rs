//! Tailnet-looking addresses on this machine, for tests of who may reach the admin API:
//! an address added to the loopback interface (needs root, as the whole suite does)
//! stands for a device on the tailnet, and a plain HTTP/1.1 request can be sent from any
//! such address so the server sees it as the TCP peer.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An address on `lo` for the life of the value.
#[derive(Debug)]
pub struct LoopbackAddress {
    pub ip: IpAddr,
}

impl LoopbackAddress {
    /// Adds `ip` to `lo` (an address left by a killed earlier run is taken over).
    pub fn add(ip: &str) -> LoopbackAddress {
        let parsed: IpAddr = ip.parse().expect("an IP address");
        let prefix = if parsed.is_ipv4() { 32 } else { 128 };
        let mut cmd = Command::new("ip");
        cmd.args(["addr", "add", &format!("{ip}/{prefix}"), "dev", "lo"]);
        if parsed.is_ipv6() {
            // Usable at once, without duplicate address detection.
            cmd.arg("nodad");
        }
        let out = cmd.output().expect("run ip (iproute2)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("File exists") || err.contains("already assigned"),
            "adding {ip} to lo failed (the tests run as root): {err}"
        );
        LoopbackAddress { ip: parsed }
    }

    /// Makes this machine's connections to this address come from `from` (a local
    /// route's preferred source), as a browser's would from another tailnet device; the
    /// route goes with the address.
    pub fn reached_from(&self, from: &LoopbackAddress) {
        let out = Command::new("ip")
            .args([
                "route",
                "replace",
                "local",
                &self.ip.to_string(),
                "dev",
                "lo",
            ])
            .args(["table", "local", "proto", "kernel", "scope", "host", "src"])
            .arg(from.ip.to_string())
            .output()
            .expect("run ip (iproute2)");
        assert!(
            out.status.success(),
            "routing {} from {} failed: {}",
            self.ip,
            from.ip,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A port free on this address now.
    pub fn free_port(&self) -> u16 {
        std::net::TcpListener::bind((self.ip, 0))
            .expect("bind")
            .local_addr()
            .expect("local addr")
            .port()
    }
}

impl Drop for LoopbackAddress {
    fn drop(&mut self) {
        let prefix = if self.ip.is_ipv4() { 32 } else { 128 };
        // A route left by `reached_from` outlives its address otherwise.
        let _ = Command::new("ip")
            .args([
                "route",
                "del",
                "local",
                &self.ip.to_string(),
                "table",
                "local",
            ])
            .output();
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/{prefix}", self.ip), "dev", "lo"])
            .output();
    }
}

/// An answer: status, headers (names lower-cased) and body.
#[derive(Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} {}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "not JSON ({}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 connection from a chosen address, kept open between requests.
#[derive(Debug)]
pub struct Conn {
    stream: tokio::net::TcpStream,
    to: SocketAddr,
    /// The address and port the server sees.
    pub local: SocketAddr,
}

impl Conn {
    /// Connects from `from` (port chosen by the kernel) to `to`.
    pub async fn open(from: IpAddr, to: SocketAddr) -> std::io::Result<Conn> {
        let socket = if from.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(from, 0))?;
        let stream = socket.connect(to).await?;
        let local = stream.local_addr()?;
        Ok(Conn { stream, to, local })
    }

    /// Sends one request (with `Host: to` unless `headers` names another) and reads its
    /// answer; an error if the server closed the connection without one.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Answer> {
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: {}\r\n", self.to));
        }
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.write_all(body).await?;
        tokio::time::timeout(Duration::from_secs(30), self.read_answer())
            .await
            .map_err(|_| std::io::Error::other("no answer in 30 s"))?
    }

    async fn read_answer(&mut self) -> std::io::Result<Answer> {
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let split = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed without an answer",
                ));
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let mut answer = parse_head(&String::from_utf8_lossy(&raw[..split]));
        let length = answer
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = raw[split + 4..].to_vec();
        while body.len() < length {
            let n = self.stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        answer.body = body;
        Ok(answer)
    }
}

/// Sends one request from `from` to `to` on a connection of its own: the address and
/// port the server saw, and the answer.
pub async fn request_from(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(SocketAddr, Answer)> {
    let mut conn = Conn::open(from, to).await?;
    let local = conn.local;
    let answer = conn.send(method, path, headers, body).await?;
    Ok((local, answer))
}

fn parse_head(head: &str) -> Answer {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: Vec::new(),
    }
}
