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
        let out = Command::new("ip")
            .args(["addr", "add", &format!("{ip}/{prefix}"), "dev", "lo"])
            .output()
            .expect("run ip (iproute2)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("File exists"),
            "adding {ip} to lo failed (the tests run as root): {err}"
        );
        LoopbackAddress { ip: parsed }
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
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{}/{prefix}", self.ip), "dev", "lo"])
            .output();
    }
}

/// An answer: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
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

/// Sends one HTTP/1.1 request from `from` (port chosen by the kernel) to `to`, with
/// `Host: to` unless `headers` names another, and reads the whole answer.
pub async fn request_from(
    from: IpAddr,
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(SocketAddr, Answer)> {
    let socket = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let mut stream = socket.connect(to).await?;
    let local = stream.local_addr()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {to}\r\n"));
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no answer in 30 s"))??;
    Ok((local, parse(&raw)))
}

fn parse(raw: &[u8]) -> Answer {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}
