//! The one way the control plane serves HTTP over TCP (the bridge, the admin API): a
//! connection must be admitted by its peer's address before it takes a slot; at most a
//! set number of connections at once, and per peer address (more are closed on accept);
//! headers within 10 seconds and at most 16 KiB of them; optionally a longest life per
//! connection, so a client that stops reading its answers cannot hold one for ever.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Semaphore;

/// How long a client has to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections are served.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// At once, in all.
    pub connections: usize,
    /// At once, from one peer address.
    pub per_peer: usize,
    /// The longest a connection is kept, if limited.
    pub lifetime: Option<Duration>,
}

/// Open connections per peer address; a slot is given back when its guard drops.
#[derive(Debug, Default)]
struct PerPeer(Mutex<HashMap<IpAddr, usize>>);

struct PeerSlot(Arc<PerPeer>, IpAddr);

impl PerPeer {
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot(self.clone(), ip))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// Serves `listener` until the task is aborted. `admit` sees each connection's peer
/// first (a refused one is closed at once); `handle` answers each request.
pub async fn serve<A, F, Fut>(
    listener: tokio::net::TcpListener,
    limits: Limits,
    admit: A,
    handle: F,
) where
    A: Fn(SocketAddr) -> bool,
    F: Fn(SocketAddr, hyper::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.connections));
    let per_peer = Arc::new(PerPeer::default());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !admit(peer) {
            continue;
        }
        let Some(peer_slot) = per_peer.take(peer.ip().to_canonical(), limits.per_peer) else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let answer = handle(peer, req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            match limits.lifetime {
                Some(life) => {
                    let _ = tokio::time::timeout(life, conn).await;
                }
                None => {
                    let _ = conn.await;
                }
            }
            drop((permit, peer_slot));
        });
    }
}
