//! A scripted loopback HTTP server: the stand-in for model providers (and anything else
//! outside) in tests. It answers each request with the next scripted response and
//! records every request it received, headers and body.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Scripted {
    pub fn json(body: serde_json::Value) -> Self {
        Scripted {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }
    /// 200 with `body` as it is.
    pub fn bytes(body: Vec<u8>) -> Self {
        Scripted {
            status: 200,
            headers: vec![("content-type".into(), "application/octet-stream".into())],
            body,
        }
    }
    pub fn status(status: u16) -> Self {
        Scripted {
            status,
            headers: vec![],
            body: Vec::new(),
        }
    }
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// One received request.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the request body is JSON")
    }
}

#[derive(Debug, Default)]
struct State {
    script: VecDeque<Scripted>,
    received: Vec<Received>,
}

/// A running fake; stops when dropped.
#[derive(Debug)]
pub struct FakeHttp {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

/// How a fake answers one request.
pub type Handler = Arc<
    dyn Fn(Received) -> std::pin::Pin<Box<dyn std::future::Future<Output = Scripted> + Send>>
        + Send
        + Sync,
>;

impl FakeHttp {
    /// Starts a fake on 127.0.0.1 with `script`; once the script is used up it answers 500.
    pub async fn start(script: Vec<Scripted>) -> FakeHttp {
        let state = Arc::new(Mutex::new(State {
            script: script.into(),
            received: Vec::new(),
        }));
        let shared = state.clone();
        let handler: Handler = Arc::new(move |_| {
            let next = shared.lock().expect("fake state").script.pop_front();
            Box::pin(async move { next.unwrap_or_else(|| Scripted::status(500)) })
        });
        Self::with_state(handler, state).await
    }

    /// Starts a fake on 127.0.0.1 that answers every request with `handler`.
    pub async fn serve(handler: Handler) -> FakeHttp {
        Self::with_state(handler, Arc::new(Mutex::new(State::default()))).await
    }

    async fn with_state(handler: Handler, state: Arc<Mutex<State>>) -> FakeHttp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound");
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            let handler = handler.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes().to_vec())
                                    .unwrap_or_default();
                                let received = Received {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_owned(),
                                    headers: parts
                                        .headers
                                        .iter()
                                        .map(|(n, v)| {
                                            (
                                                n.to_string(),
                                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                            )
                                        })
                                        .collect(),
                                    body,
                                };
                                state
                                    .lock()
                                    .expect("fake state")
                                    .received
                                    .push(received.clone());
                                let s = handler(received).await;
                                let mut resp = Response::new(Full::new(Bytes::from(s.body)));
                                *resp.status_mut() =
                                    StatusCode::from_u16(s.status).expect("valid status");
                                for (n, v) in s.headers {
                                    resp.headers_mut().insert(
                                        hyper::header::HeaderName::from_bytes(n.as_bytes())
                                            .expect("header name"),
                                        hyper::header::HeaderValue::from_str(&v)
                                            .expect("header value"),
                                    );
                                }
                                Ok::<_, Infallible>(resp)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeHttp { addr, state, task }
    }

    /// Forgets the requests recorded so far (a long run need not keep them all).
    pub fn clear_received(&self) {
        self.state.lock().expect("fake state").received.clear();
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().expect("fake state").received.clone()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
