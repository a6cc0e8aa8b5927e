//! The calling side: one lazily opened connection to one peer, shared by every call and
//! multiplexed by request id, with a reconnect backoff after failures. It never retries a call;
//! a call that cannot be answered fails and the caller decides what to do.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use uuid::Uuid;

use super::backoff::Backoff;
use super::{write_loop, Hello, Refusal, RpcError, Security, Stream, MAX_ERROR_MESSAGE_BYTES};
use super::{KIND_HELLO, KIND_HELLO_OK, KIND_REJECT, PROTOCOL_VERSION, RESERVED_KINDS};
use crate::net::frame::{encode, read_frame, Frame, FrameError, MAX_PAYLOAD_LIMIT};

/// Limits and timing of one client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Time for TCP connect plus handshake.
    pub connect_timeout: Duration,
    /// Largest request and response payload in bytes. A larger request is refused before it is
    /// sent; a larger response breaks the connection.
    pub max_payload: usize,
    /// Encoded requests queued for the connection's writer; a full queue makes `call` wait.
    pub queue_depth: usize,
    /// Wait after the first failure before reconnecting.
    pub backoff_min: Duration,
    /// Longest wait between reconnect attempts.
    pub backoff_max: Duration,
    /// Plaintext, or TLS with this side's certificate (whose identity then gives the `HELLO`'s
    /// node id).
    pub security: Security,
    /// Under TLS: the node the peer's certificate must name; `None` accepts any member.
    pub peer_node: Option<u64>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(1),
            max_payload: 16 << 20,
            queue_depth: 256,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            security: Security::Plaintext,
            peer_node: None,
        }
    }
}

/// A client of one peer. Clones share the connection.
#[derive(Clone)]
pub struct RpcClient {
    shared: Arc<Shared>,
}

struct Shared {
    peer: SocketAddr,
    bind: Option<IpAddr>,
    cluster_id: Uuid,
    node_id: u64,
    opts: ClientOptions,
    next_request_id: AtomicU64,
    next_connection_id: AtomicU64,
    state: Mutex<State>,
}

struct State {
    phase: Phase,
    backoff: Backoff,
}

/// The result of a connect attempt, published to every call waiting for it.
type Attempt = Option<Result<Arc<Connection>, RpcError>>;

enum Phase {
    Idle,
    Connecting(watch::Receiver<Attempt>),
    Connected(Arc<Connection>),
}

/// One established connection. Dropping the last reference stops its tasks and fails its calls.
struct Connection {
    id: u64,
    tx: mpsc::Sender<Vec<u8>>,
    pending: Arc<Pending>,
    tasks: [AbortHandle; 2],
}

/// Calls waiting for their response on one connection.
#[derive(Default)]
struct Pending {
    inner: Mutex<PendingInner>,
}

#[derive(Default)]
struct PendingInner {
    calls: HashMap<u64, oneshot::Sender<Frame>>,
    /// Set once the connection failed; no call is registered after that.
    closed: Option<String>,
}

/// What a connection's tasks use to report that it failed.
#[derive(Clone)]
struct Link {
    peer: SocketAddr,
    shared: Weak<Shared>,
    connection_id: u64,
    pending: Arc<Pending>,
}

impl RpcClient {
    /// A client of `peer`; nothing is connected until the first call. `bind` is the source
    /// address to connect from (port chosen by the system).
    pub fn new(
        peer: SocketAddr,
        bind: Option<IpAddr>,
        cluster_id: Uuid,
        node_id: u64,
        opts: ClientOptions,
    ) -> RpcClient {
        let backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
        let shared = Shared {
            peer,
            bind,
            cluster_id,
            node_id,
            opts,
            next_request_id: AtomicU64::new(1),
            next_connection_id: AtomicU64::new(1),
            state: Mutex::new(State { phase: Phase::Idle, backoff }),
        };
        RpcClient { shared: Arc::new(shared) }
    }

    pub fn peer(&self) -> SocketAddr {
        self.shared.peer
    }

    /// Sends a request of `kind` and waits for its answer, at most `timeout` in all (connecting
    /// included). Dropping the returned future abandons the call without harming the connection.
    pub async fn call(
        &self,
        kind: u8,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        self.send(kind, payload, timeout).await?.answer().await
    }

    /// The first half of `call`: resolves once the request is queued for the connection's
    /// writer, which writes requests in the order they were queued; `SentCall::answer` waits for
    /// the reply. So a caller can have several requests in flight and still have them reach the
    /// peer in its own order. `timeout` bounds both halves together.
    pub async fn send(
        &self,
        kind: u8,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<SentCall, RpcError> {
        if kind >= RESERVED_KINDS {
            return Err(RpcError::Protocol(format!(
                "kind {kind:#04x} is reserved for the RPC layer"
            )));
        }
        let max = self.shared.opts.max_payload.min(MAX_PAYLOAD_LIMIT);
        if payload.len() > max {
            return Err(RpcError::TooLarge { len: payload.len(), max });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let connection = self.connection(timeout, deadline).await?;
        let request_id = self.shared.next_request_id.fetch_add(1, Ordering::Relaxed);
        let request = Frame::request(kind, request_id, payload);
        let bytes = encode(self.shared.cluster_id, &request)
            .map_err(|e| RpcError::Protocol(e.to_string()))?;
        let answer = connection.pending.register(request_id)?;
        let sent = SentCall { connection, request_id, answer, deadline, timeout };
        match tokio::time::timeout_at(deadline, sent.connection.tx.send(bytes)).await {
            Err(_) => Err(RpcError::Timeout(timeout)),
            Ok(Err(_)) => Err(sent.connection.pending.unreachable()),
            Ok(Ok(())) => Ok(sent),
        }
    }

    /// The open connection, or the outcome of a connect attempt started (or joined) now.
    async fn connection(
        &self,
        timeout: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Connection>, RpcError> {
        let mut attempt = match self.open_or_attempt()? {
            Ready::Open(connection) => return Ok(connection),
            Ready::Wait(attempt) => attempt,
        };
        let outcome = tokio::time::timeout_at(deadline, attempt.wait_for(Option::is_some)).await;
        match outcome {
            Err(_) => Err(RpcError::Timeout(timeout)),
            Ok(Err(_)) => Err(RpcError::Unreachable(format!(
                "connect attempt to {} was abandoned",
                self.shared.peer
            ))),
            Ok(Ok(result)) => match result.as_ref() {
                Some(result) => result.clone(),
                None => Err(RpcError::Unreachable("connect attempt ended without outcome".into())),
            },
        }
    }

    /// The open connection, or a connect attempt to wait for (joining the one under way or
    /// starting one). Fails fast while the backoff after a failure lasts.
    fn open_or_attempt(&self) -> Result<Ready, RpcError> {
        let mut state = lock(&self.shared.state);
        let broken = match &state.phase {
            Phase::Connected(c) => match c.pending.closed_reason() {
                None => return Ok(Ready::Open(c.clone())),
                Some(reason) => Some((c.id, reason)),
            },
            // A closed channel means the attempt's task was cancelled without reporting.
            Phase::Connecting(rx) if rx.has_changed().is_ok() => {
                return Ok(Ready::Wait(rx.clone()))
            }
            Phase::Connecting(_) | Phase::Idle => None,
        };
        let lost = broken.and_then(|(id, reason)| state.lose(id, reason));
        let result = match state.backoff.waiting(Instant::now()) {
            Some((left, RpcError::Rejected(reason))) => {
                Err(RpcError::Rejected(format!("{reason} (next attempt in {left:?})")))
            }
            Some((left, error)) => Err(RpcError::Unreachable(format!(
                "{}: next attempt in {left:?}; last failure: {error}",
                self.shared.peer
            ))),
            None => {
                let (done, attempt) = watch::channel(None);
                state.phase = Phase::Connecting(attempt.clone());
                tokio::spawn(connect(self.shared.clone(), done));
                Ok(Ready::Wait(attempt))
            }
        };
        drop(state);
        drop(lost);
        result
    }
}

enum Ready {
    Open(Arc<Connection>),
    Wait(watch::Receiver<Attempt>),
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("peer", &self.shared.peer)
            .field("bind", &self.shared.bind)
            .field("cluster_id", &self.shared.cluster_id)
            .field("node_id", &self.shared.node_id)
            .finish_non_exhaustive()
    }
}

impl State {
    /// Forgets connection `id` after it failed and starts the backoff. Returns the connection so
    /// the caller drops it outside the lock.
    fn lose(&mut self, id: u64, reason: String) -> Option<Arc<Connection>> {
        if !matches!(&self.phase, Phase::Connected(c) if c.id == id) {
            return None;
        }
        let jitter = rand::random::<f64>();
        self.backoff.record_failure(Instant::now(), RpcError::Unreachable(reason), jitter);
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Connected(c) => Some(c),
            _ => None,
        }
    }
}

/// One connect attempt: dial, handshake, start the connection; publishes the outcome.
async fn connect(shared: Arc<Shared>, done: watch::Sender<Attempt>) {
    let limit = shared.opts.connect_timeout;
    let result = match tokio::time::timeout(limit, dial(&shared)).await {
        Ok(result) => result,
        Err(_) => Err(RpcError::Unreachable(format!(
            "connect to {} timed out after {limit:?}",
            shared.peer
        ))),
    };
    let result = result.map(|stream| Connection::start(&shared, stream));
    {
        let mut state = lock(&shared.state);
        match &result {
            Ok(connection) => {
                state.phase = Phase::Connected(connection.clone());
                state.backoff.reset();
            }
            Err(e) => {
                tracing::debug!(peer = %shared.peer, error = %e, "connect failed");
                state.phase = Phase::Idle;
                state.backoff.record_failure(Instant::now(), e.clone(), rand::random::<f64>());
            }
        }
    }
    let _ = done.send(Some(result));
}

/// Opens a TCP connection (and TLS session) and completes the handshake on it.
async fn dial(shared: &Shared) -> Result<Box<dyn Stream>, RpcError> {
    let peer = shared.peer;
    let io = |what: &str, e: std::io::Error| RpcError::Unreachable(format!("{what} {peer}: {e}"));
    let socket = if peer.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
    let socket = socket.map_err(|e| io("socket for", e))?;
    if let Some(ip) = shared.bind {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| io(&format!("bind {ip} to reach"), e))?;
    }
    let stream = socket.connect(peer).await.map_err(|e| io("connect to", e))?;
    stream.set_nodelay(true).map_err(|e| io("TCP_NODELAY on connection to", e))?;
    let (mut stream, node_id): (Box<dyn Stream>, u64) = match &shared.opts.security {
        Security::Plaintext => (Box::new(stream), shared.node_id),
        Security::Tls(tls) => {
            let connector = tls.connector(shared.opts.peer_node).map_err(RpcError::Protocol)?;
            // A certificate refused either way is a rejection, not a network fault.
            let stream = connector.connect(tls.server_name(), stream).await.map_err(|e| {
                RpcError::Rejected(format!("TLS handshake with {peer} failed: {e}"))
            })?;
            (Box::new(stream), tls.identity().hello_id())
        }
    };

    let hello = Hello { protocol_version: PROTOCOL_VERSION, node_id };
    let hello = encode(shared.cluster_id, &Frame::request(KIND_HELLO, 0, hello.encode()))
        .map_err(|e| RpcError::Protocol(e.to_string()))?;
    stream.write_all(&hello).await.map_err(|e| io("send HELLO to", e))?;
    let max = shared.opts.max_payload.max(MAX_ERROR_MESSAGE_BYTES);
    match read_frame(&mut stream, shared.cluster_id, max).await {
        Ok(Some(f)) if f.kind == KIND_HELLO_OK && f.is_response() && !f.is_error() => Ok(stream),
        Ok(Some(f)) if f.kind == KIND_REJECT => {
            Err(RpcError::Rejected(String::from_utf8_lossy(&f.payload).into_owned()))
        }
        Ok(Some(f)) => Err(RpcError::Protocol(format!(
            "{peer} answered HELLO with kind {:#04x} flags {:#x}",
            f.kind, f.flags
        ))),
        Ok(None) => {
            Err(RpcError::Unreachable(format!("{peer} closed the connection in the handshake")))
        }
        Err(FrameError::Io(e)) => Err(io("handshake with", e)),
        Err(e) => Err(RpcError::Protocol(format!("bad handshake answer from {peer}: {e}"))),
    }
}

impl Connection {
    /// Starts the reader and writer tasks of an established connection.
    fn start(shared: &Arc<Shared>, stream: Box<dyn Stream>) -> Arc<Connection> {
        let id = shared.next_connection_id.fetch_add(1, Ordering::Relaxed);
        let (reader, writer) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(shared.opts.queue_depth.max(1));
        let pending = Arc::new(Pending::default());
        let link = Link {
            peer: shared.peer,
            shared: Arc::downgrade(shared),
            connection_id: id,
            pending: pending.clone(),
        };
        let write_link = link.clone();
        let write_task = tokio::spawn(async move {
            let reason = match write_loop(writer, rx).await {
                Ok(()) => "connection closed by this client".to_string(),
                Err(e) => format!("write to {} failed: {e}", write_link.peer),
            };
            write_link.lost(reason);
        });
        let max = shared.opts.max_payload.min(MAX_PAYLOAD_LIMIT);
        let read_task = tokio::spawn(read_responses(reader, shared.cluster_id, max, link));
        let tasks = [read_task.abort_handle(), write_task.abort_handle()];
        Arc::new(Connection { id, tx, pending, tasks })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.pending.close("connection dropped by this client");
    }
}

/// Hands each response to the call waiting for it, until the connection fails.
async fn read_responses<R: AsyncRead + Unpin>(
    reader: R,
    cluster_id: Uuid,
    max_payload: usize,
    link: Link,
) {
    let peer = link.peer;
    let mut reader = BufReader::new(reader);
    let reason = loop {
        match read_frame(&mut reader, cluster_id, max_payload).await {
            Ok(Some(f)) if f.kind == KIND_REJECT => {
                break format!("{peer} rejected: {}", String::from_utf8_lossy(&f.payload));
            }
            Ok(Some(f)) if f.is_response() => link.pending.complete(f),
            Ok(Some(f)) => {
                break format!("{peer} sent a request (kind {:#04x}) to a client", f.kind)
            }
            Ok(None) => break format!("{peer} closed the connection"),
            Err(e) => break format!("reading from {peer}: {e}"),
        }
    };
    link.lost(reason);
}

impl Link {
    /// Fails every pending call with `reason` and lets the client reconnect after its backoff.
    fn lost(&self, reason: String) {
        if !self.pending.close(&reason) {
            return;
        }
        tracing::debug!(peer = %self.peer, reason, "connection lost");
        if let Some(shared) = self.shared.upgrade() {
            let lost = lock(&shared.state).lose(self.connection_id, reason);
            drop(lost);
        }
    }
}

impl Pending {
    fn register(&self, request_id: u64) -> Result<oneshot::Receiver<Frame>, RpcError> {
        let mut inner = lock(&self.inner);
        if let Some(reason) = &inner.closed {
            return Err(RpcError::Unreachable(reason.clone()));
        }
        let (tx, rx) = oneshot::channel();
        inner.calls.insert(request_id, tx);
        Ok(rx)
    }

    /// Delivers a response; one whose call is gone (timed out or dropped) is ignored.
    fn complete(&self, frame: Frame) {
        let call = lock(&self.inner).calls.remove(&frame.request_id);
        if let Some(call) = call {
            let _ = call.send(frame);
        }
    }

    fn forget(&self, request_id: u64) {
        lock(&self.inner).calls.remove(&request_id);
    }

    /// Marks the connection failed and drops every waiting call. Returns false if it already was.
    fn close(&self, reason: &str) -> bool {
        let calls = {
            let mut inner = lock(&self.inner);
            if inner.closed.is_some() {
                return false;
            }
            inner.closed = Some(reason.to_string());
            std::mem::take(&mut inner.calls)
        };
        drop(calls);
        true
    }

    fn closed_reason(&self) -> Option<String> {
        lock(&self.inner).closed.clone()
    }

    fn unreachable(&self) -> RpcError {
        let reason = self.closed_reason();
        RpcError::Unreachable(reason.unwrap_or_else(|| "connection closed".to_string()))
    }
}

/// A request queued on a connection, waiting for its reply. Dropping it abandons the call
/// without harming the connection, and leaves nothing behind.
pub struct SentCall {
    connection: Arc<Connection>,
    request_id: u64,
    answer: oneshot::Receiver<Frame>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl SentCall {
    /// The reply's payload, or why there is none (the peer's error, the deadline, a lost
    /// connection).
    pub async fn answer(mut self) -> Result<Vec<u8>, RpcError> {
        let frame = match tokio::time::timeout_at(self.deadline, &mut self.answer).await {
            Err(_) => return Err(RpcError::Timeout(self.timeout)),
            Ok(Err(_)) => return Err(self.connection.pending.unreachable()),
            Ok(Ok(frame)) => frame,
        };
        if frame.is_error() {
            let Refusal { code, message } = Refusal::decode(&frame.payload)?;
            return Err(RpcError::Remote { code, message });
        }
        Ok(frame.payload)
    }
}

impl Drop for SentCall {
    fn drop(&mut self) {
        self.connection.pending.forget(self.request_id);
    }
}

impl std::fmt::Debug for SentCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentCall")
            .field("connection", &self.connection.id)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
