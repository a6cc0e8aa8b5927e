//! The serving side: accepts connections, checks each one's handshake and every frame, runs the
//! handler for each request concurrently and writes the answers back tagged with their request
//! id. It never retries, never dials out, and drops a connection on the first malformed frame or
//! request.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

use super::{bounded_message, write_loop, Answer, Caller, Handler, Hello, Refusal, Security};
use super::{CODE_INTERNAL, CODE_MALFORMED, MAX_ERROR_MESSAGE_BYTES};
use super::{KIND_HELLO, KIND_HELLO_OK, KIND_REJECT, PROTOCOL_VERSION, RESERVED_KINDS};
use crate::net::frame::{encode, read_frame, Frame, FrameError, MAX_PAYLOAD_LIMIT};
use crate::net::tls::{identity_of, Identity};

/// Requests of one connection that may run at once; the next frame is not read until one ends.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;
/// Connections served at once; further ones are closed right after accept.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections still in their TLS handshake or `HELLO`, in all and from one address: past
/// these a new connection is closed at accept, so strangers cannot take the connection slots
/// members need to reconnect.
pub const MAX_UNAUTHENTICATED: usize = 64;
pub const MAX_UNAUTHENTICATED_PER_IP: usize = 8;
/// Time a new connection has to complete its TLS handshake, and then its `HELLO`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Encoded responses queued for one connection's writer.
const WRITE_QUEUE_FRAMES: usize = 256;
/// Time the writer gets to flush queued frames (such as a `REJECT`) once the reader has stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (for example out of file descriptors) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A running server. Dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct RpcServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept_task: Option<JoinHandle<()>>,
}

struct Config {
    cluster_id: Uuid,
    max_payload: usize,
    security: Security,
    handler: Arc<dyn Handler>,
}

impl RpcServer {
    /// Serves `listener` on the current tokio runtime. `max_payload` bounds request and response
    /// payloads in bytes.
    pub fn start(
        listener: TcpListener,
        cluster_id: Uuid,
        max_payload: usize,
        security: Security,
        handler: Arc<dyn Handler>,
    ) -> std::io::Result<RpcServer> {
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let max_payload = max_payload.min(MAX_PAYLOAD_LIMIT);
        let config = Arc::new(Config { cluster_id, max_payload, security, handler });
        let accept_task = tokio::spawn(accept_loop(listener, config, stopped));
        Ok(RpcServer { local_addr, stop, accept_task: Some(accept_task) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and closes every connection; when this returns the listening port is
    /// released and every handler still running has been cancelled.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            task.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, config: Arc<Config>, mut stop: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    let pending = Arc::new(Mutex::new(HashMap::new()));
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if connections.len() >= MAX_CONNECTIONS => {
                    tracing::warn!(%peer, limit = MAX_CONNECTIONS, "refusing connection: too many");
                    drop(stream);
                }
                Ok((stream, peer)) => match Unauthenticated::enter(&pending, peer.ip()) {
                    Some(ticket) => {
                        connections.spawn(serve_connection(stream, peer, config.clone(), ticket));
                    }
                    None => {
                        tracing::warn!(%peer, "refusing connection: too many still unauthenticated");
                        drop(stream);
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Runs one connection until the peer leaves, a frame is malformed, or the server stops.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<Config>,
    ticket: Unauthenticated,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    match &config.security {
        Security::Plaintext => {
            let (reader, writer) = stream.into_split();
            run_connection(reader, writer, peer, None, &config, ticket).await;
        }
        Security::Tls(tls) => {
            let accepted =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await;
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    return tracing::warn!(%peer, error = %e, "refusing connection: TLS handshake")
                }
                Err(_) => {
                    return tracing::warn!(%peer, "refusing connection: no TLS handshake in time")
                }
            };
            let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first().cloned());
            // The handshake verified the chain; the identity is the name the certificate bears.
            let identity = match cert.map(|c| identity_of(&c, config.cluster_id)) {
                Some(Ok(identity)) => identity,
                Some(Err(e)) => return tracing::warn!(%peer, error = e, "refusing connection"),
                None => return tracing::warn!(%peer, "refusing connection: no client certificate"),
            };
            let (reader, writer) = tokio::io::split(stream);
            run_connection(reader, writer, peer, Some(identity), &config, ticket).await;
        }
    }
}

async fn run_connection<R, W>(
    reader: R,
    writer: W,
    peer: SocketAddr,
    verified: Option<Identity>,
    config: &Arc<Config>,
    ticket: Unauthenticated,
) where
    R: AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_FRAMES);
    let writer = write_loop(writer, rx);
    tokio::pin!(writer);
    tokio::select! {
        written = &mut writer => {
            if let Err(e) = written {
                tracing::debug!(%peer, error = %e, "connection write failed");
            }
        }
        () = read_requests(reader, peer, verified, config, tx, ticket) => {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, writer).await;
        }
    }
}

/// The reader side of a connection: handshake, then one task per request. Returns when the
/// connection must close; the request tasks still running are cancelled with it.
async fn read_requests<R: AsyncRead + Unpin>(
    reader: R,
    peer: SocketAddr,
    verified: Option<Identity>,
    config: &Arc<Config>,
    tx: mpsc::Sender<Vec<u8>>,
    ticket: Unauthenticated,
) {
    let mut reader = BufReader::new(reader);
    let hello = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_frame(&mut reader, config.cluster_id, config.max_payload),
    )
    .await;
    let hello = match hello {
        Err(_) => return tracing::warn!(%peer, "closing connection: no HELLO in time"),
        Ok(frame) => match accept_frame(frame, peer, &tx).await {
            Some(frame) => frame,
            None => return,
        },
    };
    let Some(caller) = handshake(hello, peer, verified, config, &tx).await else { return };
    drop(ticket);

    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    let mut requests = JoinSet::new();
    // Set by a request task that answered `CODE_MALFORMED`: the connection closes.
    let (malformed, mut closing) = watch::channel(false);
    loop {
        while requests.try_join_next().is_some() {}
        let frame = tokio::select! {
            frame = read_frame(&mut reader, config.cluster_id, config.max_payload) => frame,
            _ = closing.changed() => {
                return tracing::warn!(%peer, "closing connection: malformed request");
            }
        };
        let Some(frame) = accept_frame(frame, peer, &tx).await else { return };
        if frame.flags != 0 || frame.kind >= RESERVED_KINDS {
            let problem =
                format!("unexpected frame kind {:#04x} flags {:#x}", frame.kind, frame.flags);
            return tracing::warn!(%peer, problem, "closing connection: protocol violation");
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        // The handler is called here, in frame order, and its admission awaited before the next
        // frame is read (a node queues WRITEs in the order this makes, and a full queue holds
        // this connection back); only the answer runs in a task of its own.
        let started = match start(config, &caller, frame).await {
            Ok(started) => started,
            // Refused at admission: answered here, and a malformed request closes the
            // connection before anything behind it is read.
            Err((bytes, malformed)) => {
                if let Some(bytes) = bytes {
                    let _ = tx.send(bytes).await;
                }
                if malformed {
                    return tracing::warn!(%peer, "closing connection: malformed request");
                }
                continue;
            }
        };
        let config = config.clone();
        let tx = tx.clone();
        let malformed = malformed.clone();
        requests.spawn(async move {
            let (bytes, bad) = answer(&config, started).await;
            if let Some(bytes) = bytes {
                let _ = tx.send(bytes).await;
            }
            if bad {
                let _ = malformed.send(true);
            }
            drop(permit);
        });
    }
}

/// The frame to act on, or `None` after dealing with the end of the stream or a bad frame (a frame
/// from another cluster is answered with `REJECT` first).
async fn accept_frame(
    read: Result<Option<Frame>, FrameError>,
    peer: SocketAddr,
    tx: &mpsc::Sender<Vec<u8>>,
) -> Option<Frame> {
    match read {
        Ok(Some(frame)) => Some(frame),
        Ok(None) => None,
        Err(FrameError::ClusterMismatch { expected, got }) => {
            let reason = format!(
                "cluster id mismatch: this server belongs to cluster {expected}, \
                 the caller sent cluster {got}"
            );
            tracing::warn!(%peer, reason, "rejecting connection");
            send_reject(tx, got, &reason).await;
            None
        }
        Err(FrameError::Io(e)) => {
            tracing::debug!(%peer, error = %e, "connection read failed");
            None
        }
        Err(e) => {
            tracing::warn!(%peer, problem = %e, "closing connection: malformed frame");
            None
        }
    }
}

/// Checks the first frame; answers `HELLO_OK` and returns the caller, or `REJECT` and `None`.
/// Under TLS the `HELLO` must give the id the caller's certificate names.
async fn handshake(
    frame: Frame,
    peer: SocketAddr,
    verified: Option<Identity>,
    config: &Config,
    tx: &mpsc::Sender<Vec<u8>>,
) -> Option<Caller> {
    let hello = (frame.kind == KIND_HELLO && frame.flags == 0)
        .then(|| Hello::decode(&frame.payload))
        .flatten();
    let reason = match hello {
        None => format!("expected HELLO, got kind {:#04x} flags {:#x}", frame.kind, frame.flags),
        Some(h) if h.protocol_version != PROTOCOL_VERSION => format!(
            "unsupported protocol version {} (this server speaks {PROTOCOL_VERSION})",
            h.protocol_version
        ),
        Some(h) if verified.is_some_and(|v| v.hello_id() != h.node_id) => format!(
            "HELLO claims node id {} but the certificate is for {}",
            h.node_id,
            verified.map(|v| v.to_string()).unwrap_or_default()
        ),
        Some(h) => {
            tracing::debug!(%peer, node_id = h.node_id, ?verified, "connection accepted");
            let ok = Frame::response(KIND_HELLO_OK, 0, PROTOCOL_VERSION.to_le_bytes().to_vec());
            let sent = match encode(config.cluster_id, &ok) {
                Ok(bytes) => tx.send(bytes).await.is_ok(),
                Err(_) => false,
            };
            return sent.then_some(Caller { peer, node_id: h.node_id, verified });
        }
    };
    tracing::warn!(%peer, reason, "rejecting connection");
    send_reject(tx, config.cluster_id, &reason).await;
    None
}

async fn send_reject(tx: &mpsc::Sender<Vec<u8>>, cluster_id: Uuid, reason: &str) {
    let reason = bounded_message(reason, MAX_ERROR_MESSAGE_BYTES);
    let reject = Frame::response(KIND_REJECT, 0, reason.as_bytes().to_vec());
    if let Ok(bytes) = encode(cluster_id, &reject) {
        let _ = tx.send(bytes).await;
    }
}

/// A connection counted as unauthenticated until dropped (after its `HELLO` is accepted, or
/// when it closes).
struct Unauthenticated {
    pending: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Unauthenticated {
    /// A ticket for a new connection from `ip`, unless the limits are reached.
    fn enter(pending: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Unauthenticated> {
        let mut map = pending.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = map.values().sum();
        let mine = map.get(&ip).copied().unwrap_or(0);
        if total >= MAX_UNAUTHENTICATED || mine >= MAX_UNAUTHENTICATED_PER_IP {
            return None;
        }
        map.insert(ip, mine + 1);
        Some(Unauthenticated { pending: pending.clone(), ip })
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut map = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A request whose handler has been called and admitted it: its answer's future (`None` if the
/// handler panicked).
struct Started {
    kind: u8,
    request_id: u64,
    call: Option<Answer>,
}

/// Calls the handler for one request and awaits its admission, on the connection's reader, so
/// calls happen in the order the requests arrived. `Err`: refused at admission, with its encoded
/// answer and whether it was malformed.
async fn start(
    config: &Config,
    caller: &Caller,
    request: Frame,
) -> Result<Started, (Option<Vec<u8>>, bool)> {
    let Frame { kind, request_id, payload, .. } = request;
    let admission =
        std::panic::catch_unwind(AssertUnwindSafe(|| config.handler.call(caller, kind, payload)));
    let call = match admission {
        Ok(admission) => match CatchUnwind(admission).await {
            Ok(Ok(answer)) => Some(answer),
            Ok(Err(refusal)) => {
                let malformed = refusal.code == CODE_MALFORMED;
                let limit = MAX_ERROR_MESSAGE_BYTES.min(config.max_payload);
                let frame = Frame::error_response(kind, request_id, refusal.encode(limit));
                return Err((encode(config.cluster_id, &frame).ok(), malformed));
            }
            Err(()) => None,
        },
        Err(_) => None,
    };
    Ok(Started { kind, request_id, call })
}

/// Runs a started request's future and encodes its answer, and whether it was refused as
/// malformed. A handler that panics or returns more than `max_payload` bytes produces an error
/// response instead.
///
/// The future runs inside the request's own task (not a task of its own): one task hand-off less
/// per request, and it is cancelled with the connection because the request tasks are.
async fn answer(config: &Config, started: Started) -> (Option<Vec<u8>>, bool) {
    let Started { kind, request_id, call } = started;
    let outcome = match call {
        Some(future) => CatchUnwind(future).await,
        None => Err(()),
    };
    let limit = MAX_ERROR_MESSAGE_BYTES.min(config.max_payload);
    let refuse = |r: Refusal| Frame::error_response(kind, request_id, r.encode(limit));
    let mut malformed = false;
    let response = match outcome {
        Ok(Ok(result)) if result.len() <= config.max_payload => {
            Frame::response(kind, request_id, result)
        }
        Ok(Ok(result)) => refuse(Refusal::new(
            CODE_INTERNAL,
            format!(
                "response of {} bytes exceeds the limit of {}",
                result.len(),
                config.max_payload
            ),
        )),
        Ok(Err(refusal)) => {
            malformed = refusal.code == CODE_MALFORMED;
            refuse(refusal)
        }
        Err(()) => {
            tracing::warn!(kind, request_id, "handler panicked");
            refuse(Refusal::new(CODE_INTERNAL, "handler panicked"))
        }
    };
    // Cannot fail: `start` keeps `max_payload` within what the length field can describe.
    (encode(config.cluster_id, &response).ok(), malformed)
}

/// A future whose panic becomes `Err(())` instead of unwinding through the connection's reader
/// or the request's task (which would drop the request unanswered). It is not polled again after
/// a panic.
struct CatchUnwind<F>(F);

impl<F: std::future::Future + Unpin> std::future::Future for CatchUnwind<F> {
    type Output = Result<F::Output, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| std::pin::Pin::new(inner).poll(cx))) {
            Ok(poll) => poll.map(Ok),
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}
