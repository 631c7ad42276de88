//! A minimal HTTP/1.1 client for the proxy socket: one kept-alive connection,
//! `Content-Length` bodies, answers bounded in size. The agent needs nothing more, and
//! every line of a general client would run in the untrusted box.

use std::cell::RefCell;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest answer read from the proxy.
const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;
/// Largest answer head read from the proxy.
const MAX_HEAD_BYTES: usize = 16 * 1024;

#[derive(Debug)]
pub(crate) struct ProxyClient {
    socket: PathBuf,
    timeout: Duration,
    /// The connection kept open between calls: each new connection to the host's
    /// socket costs a round trip through gVisor's gofer.
    conn: RefCell<Option<BufReader<UnixStream>>>,
}

#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

impl ProxyClient {
    pub(crate) fn new(socket: &Path) -> Self {
        ProxyClient {
            socket: socket.to_owned(),
            timeout: Duration::from_secs(300),
            conn: RefCell::new(None),
        }
    }

    fn connect(&self) -> io::Result<BufReader<UnixStream>> {
        let stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        Ok(BufReader::with_capacity(64 * 1024, stream))
    }

    pub(crate) fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> io::Result<Answer> {
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        // A kept connection the proxy has since closed fails before any answer byte;
        // only then is the request sent again, on a fresh connection.
        let kept = self.conn.borrow_mut().take();
        if let Some(mut conn) = kept {
            match exchange(&mut conn, &request) {
                Ok((answer, keep)) => {
                    if keep {
                        *self.conn.borrow_mut() = Some(conn);
                    }
                    return Ok(answer);
                }
                Err(Failure::BeforeAnswer(_)) => {}
                Err(Failure::During(e)) => return Err(e),
            }
        }
        let mut conn = self.connect()?;
        match exchange(&mut conn, &request) {
            Ok((answer, keep)) => {
                if keep {
                    *self.conn.borrow_mut() = Some(conn);
                }
                Ok(answer)
            }
            Err(Failure::BeforeAnswer(e) | Failure::During(e)) => Err(e),
        }
    }
}

enum Failure {
    /// Nothing of an answer arrived: the request may be sent again.
    BeforeAnswer(io::Error),
    During(io::Error),
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Whether `e` says the proxy closed the connection (so it never saw the request, or
/// never began to answer it): only then may the request be sent again. A timeout is not
/// such a sign: the proxy may be working on it.
fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

/// Sends one request and reads its answer; also says whether the connection may be kept.
fn exchange(conn: &mut BufReader<UnixStream>, request: &[u8]) -> Result<(Answer, bool), Failure> {
    let early = |e: io::Error| {
        if closed(&e) {
            Failure::BeforeAnswer(e)
        } else {
            Failure::During(e)
        }
    };
    conn.get_mut().write_all(request).map_err(early)?;
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = (&mut *conn)
            .take((MAX_HEAD_BYTES + 1 - head.len().min(MAX_HEAD_BYTES)) as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| {
                if head.is_empty() {
                    early(e)
                } else {
                    Failure::During(e)
                }
            })?;
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed");
            return Err(if head.is_empty() {
                early(e)
            } else {
                Failure::During(e)
            });
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD_BYTES {
            return Err(Failure::During(bad("answer head too large")));
        }
        if line == b"\r\n" {
            break;
        }
    }
    let (status, length, keep) = parse_head(&head).map_err(Failure::During)?;
    if length > MAX_ANSWER_BYTES {
        return Err(Failure::During(bad("answer too large")));
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).map_err(Failure::During)?;
    Ok((Answer { status, body }, keep))
}

/// The status, the `Content-Length` (required) and whether the server keeps the
/// connection open.
fn parse_head(head: &[u8]) -> io::Result<(u16, usize, bool)> {
    let head = std::str::from_utf8(head).map_err(|_| bad("headers are not text"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let mut length = None;
    let mut keep = true;
    for line in head.lines().skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep = false;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(bad("chunked answers are not expected"));
        }
    }
    let length = length.ok_or_else(|| bad("no content-length"))?;
    Ok((status, length, keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_answer_head() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";
        assert_eq!(parse_head(head).unwrap(), (200, 2, true));
        let closing = b"HTTP/1.1 429 Too Many\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_head(closing).unwrap(), (429, 0, false));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no length");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"garbage").is_err());
    }
}
