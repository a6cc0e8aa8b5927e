//! The serving side: accepts connections, checks each one's handshake and every frame, runs the
//! handler for each request concurrently and writes the answers back tagged with their request
//! id. It never retries, never dials out, and drops a connection on the first malformed frame.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

use super::{bounded_message, write_loop, Handler, Hello, MAX_ERROR_MESSAGE_BYTES};
use super::{KIND_HELLO, KIND_HELLO_OK, KIND_REJECT, PROTOCOL_VERSION, RESERVED_KINDS};
use crate::net::frame::{encode, read_frame, Frame, FrameError, MAX_PAYLOAD_LIMIT};

/// Requests of one connection that may run at once; the next frame is not read until one ends.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 256;
/// Connections served at once; further ones are closed right after accept.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a new connection has to complete its `HELLO`.
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
    handler: Arc<dyn Handler>,
}

impl RpcServer {
    /// Serves `listener` on the current tokio runtime. `max_payload` bounds request and response
    /// payloads in bytes.
    pub fn start(
        listener: TcpListener,
        cluster_id: Uuid,
        max_payload: usize,
        handler: Arc<dyn Handler>,
    ) -> std::io::Result<RpcServer> {
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let max_payload = max_payload.min(MAX_PAYLOAD_LIMIT);
        let config = Arc::new(Config { cluster_id, max_payload, handler });
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
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if connections.len() >= MAX_CONNECTIONS => {
                    tracing::warn!(%peer, limit = MAX_CONNECTIONS, "refusing connection: too many");
                    drop(stream);
                }
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, config.clone()));
                }
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
async fn serve_connection(stream: TcpStream, peer: SocketAddr, config: Arc<Config>) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let (reader, writer) = stream.into_split();
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_FRAMES);
    let writer = write_loop(writer, rx);
    tokio::pin!(writer);
    tokio::select! {
        written = &mut writer => {
            if let Err(e) = written {
                tracing::debug!(%peer, error = %e, "connection write failed");
            }
        }
        () = read_requests(reader, peer, &config, tx) => {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, writer).await;
        }
    }
}

/// The reader side of a connection: handshake, then one task per request. Returns when the
/// connection must close; the request tasks still running are cancelled with it.
async fn read_requests(
    reader: OwnedReadHalf,
    peer: SocketAddr,
    config: &Arc<Config>,
    tx: mpsc::Sender<Vec<u8>>,
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
    if !handshake(hello, peer, config, &tx).await {
        return;
    }

    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    let mut requests = JoinSet::new();
    loop {
        while requests.try_join_next().is_some() {}
        let frame = read_frame(&mut reader, config.cluster_id, config.max_payload).await;
        let Some(frame) = accept_frame(frame, peer, &tx).await else { return };
        if frame.flags != 0 || frame.kind >= RESERVED_KINDS {
            let problem =
                format!("unexpected frame kind {:#04x} flags {:#x}", frame.kind, frame.flags);
            return tracing::warn!(%peer, problem, "closing connection: protocol violation");
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        // The handler is called here, in frame order (a node queues WRITEs in the order this
        // makes), and only its future runs in a task of its own.
        let started = start(config, frame);
        let config = config.clone();
        let tx = tx.clone();
        requests.spawn(async move {
            if let Some(answer) = answer(&config, started).await {
                let _ = tx.send(answer).await;
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

/// Checks the first frame; answers `HELLO_OK` and returns true, or `REJECT` and returns false.
async fn handshake(
    frame: Frame,
    peer: SocketAddr,
    config: &Config,
    tx: &mpsc::Sender<Vec<u8>>,
) -> bool {
    let hello = (frame.kind == KIND_HELLO && frame.flags == 0)
        .then(|| Hello::decode(&frame.payload))
        .flatten();
    let reason = match hello {
        None => format!("expected HELLO, got kind {:#04x} flags {:#x}", frame.kind, frame.flags),
        Some(h) if h.protocol_version != PROTOCOL_VERSION => format!(
            "unsupported protocol version {} (this server speaks {PROTOCOL_VERSION})",
            h.protocol_version
        ),
        Some(h) => {
            tracing::debug!(%peer, node_id = h.node_id, "connection accepted");
            let ok = Frame::response(KIND_HELLO_OK, 0, PROTOCOL_VERSION.to_le_bytes().to_vec());
            return match encode(config.cluster_id, &ok) {
                Ok(bytes) => tx.send(bytes).await.is_ok(),
                Err(_) => false,
            };
        }
    };
    tracing::warn!(%peer, reason, "rejecting connection");
    send_reject(tx, config.cluster_id, &reason).await;
    false
}

async fn send_reject(tx: &mpsc::Sender<Vec<u8>>, cluster_id: Uuid, reason: &str) {
    let reason = bounded_message(reason, MAX_ERROR_MESSAGE_BYTES);
    let reject = Frame::response(KIND_REJECT, 0, reason.as_bytes().to_vec());
    if let Ok(bytes) = encode(cluster_id, &reject) {
        let _ = tx.send(bytes).await;
    }
}

/// A request whose handler has been called: its future (`None` if the call itself panicked).
struct Started {
    kind: u8,
    request_id: u64,
    call: Option<HandlerFuture>,
}

/// Calls the handler for one request, on the connection's reader, so calls happen in the order
/// the requests arrived.
fn start(config: &Config, request: Frame) -> Started {
    let Frame { kind, request_id, payload, .. } = request;
    let call =
        std::panic::catch_unwind(AssertUnwindSafe(|| config.handler.call(kind, payload))).ok();
    Started { kind, request_id, call }
}

/// Runs a started request's future and encodes its answer. A handler that panics or returns more
/// than `max_payload` bytes produces an error response instead.
///
/// The future runs inside the request's own task (not a task of its own): one task hand-off less
/// per request, and it is cancelled with the connection because the request tasks are.
async fn answer(config: &Config, started: Started) -> Option<Vec<u8>> {
    let Started { kind, request_id, call } = started;
    let outcome = match call {
        Some(future) => CatchUnwind(future).await,
        None => Err(()),
    };
    let response = match outcome {
        Ok(Ok(result)) if result.len() <= config.max_payload => {
            Frame::response(kind, request_id, result)
        }
        Ok(Ok(result)) => {
            let message = format!(
                "response of {} bytes exceeds the limit of {}",
                result.len(),
                config.max_payload
            );
            Frame::error_response(kind, request_id, &message)
        }
        Ok(Err(message)) => {
            let limit = MAX_ERROR_MESSAGE_BYTES.min(config.max_payload);
            Frame::error_response(kind, request_id, bounded_message(&message, limit))
        }
        Err(()) => {
            tracing::warn!(kind, request_id, "handler panicked");
            Frame::error_response(kind, request_id, "handler panicked")
        }
    };
    // Cannot fail: `start` keeps `max_payload` within what the length field can describe.
    encode(config.cluster_id, &response).ok()
}

/// A handler's future whose panic becomes `Err(())` instead of unwinding through the request's
/// task (which would drop the request unanswered). It is not polled again after a panic.
struct CatchUnwind(HandlerFuture);

type HandlerFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>;

impl std::future::Future for CatchUnwind {
    type Output = Result<Result<Vec<u8>, String>, ()>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(poll) => poll.map(Ok),
            Err(_) => std::task::Poll::Ready(Err(())),
        }
    }
}
