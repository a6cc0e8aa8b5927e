//! The RPC layer over loopback TCP: pipelining, cluster isolation, malformed input, server loss and
//! return, remote errors, timeouts and payload limits.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;
use xdevice::net::frame::{encode, read_frame, Frame};
use xdevice::net::rpc::{admitted, Admission, CODE_MALFORMED};
use xdevice::net::rpc::{Hello, KIND_HELLO, KIND_HELLO_OK, PROTOCOL_VERSION};
use xdevice::net::Security;
use xdevice::net::{Caller, ClientOptions, Handler, Refusal, RpcClient, RpcError, RpcServer};

const ECHO: u8 = 1;
const FAIL: u8 = 2;
const SLOW: u8 = 3;
const ECHO_LATER: u8 = 4;
const PANIC: u8 = 5;
/// Answered as malformed: the server closes the connection after the answer.
const MALFORMED: u8 = 6;
/// Admitted only once `TestHandler::gate` has a permit: the connection's next frame waits.
const GATED: u8 = 7;
/// The application's error code the test handler refuses with.
const CODE_REFUSED: u16 = 100;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const SERVER_MAX: usize = 64 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Echoes, fails, or answers late depending on the kind; counts the requests it saw, and keeps
/// the payloads of `ECHO_LATER` requests in the order it was called with them.
struct TestHandler {
    requests: AtomicUsize,
    called: std::sync::Mutex<Vec<Vec<u8>>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl Default for TestHandler {
    fn default() -> Self {
        TestHandler {
            requests: AtomicUsize::new(0),
            called: std::sync::Mutex::new(Vec::new()),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl Handler for TestHandler {
    #[allow(clippy::async_yields_async)]
    fn call(&self, _caller: &Caller, kind: u8, payload: Vec<u8>) -> Admission {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if kind == ECHO_LATER {
            self.called.lock().unwrap().push(payload.clone());
        }
        if kind == GATED {
            let gate = self.gate.clone();
            return Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                let answer: xdevice::net::Answer = Box::pin(async move { Ok(payload) });
                Ok(answer)
            });
        }
        if kind == MALFORMED {
            let refusal = Refusal::new(CODE_MALFORMED, "this request does not decode");
            return Box::pin(std::future::ready(Err(refusal)));
        }
        admitted(Box::pin(async move {
            match kind {
                ECHO => Ok(payload),
                FAIL => Err(Refusal::new(
                    CODE_REFUSED,
                    format!("refused {} bytes: état invalide", payload.len()),
                )),
                SLOW => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Ok(payload)
                }
                ECHO_LATER => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok(payload)
                }
                PANIC => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    panic!("test handler panics on purpose");
                }
                other => Err(Refusal::new(CODE_MALFORMED, format!("unknown kind {other}"))),
            }
        }))
    }
}

fn cluster_a() -> Uuid {
    Uuid::from_u128(0xaaaa_0000_0000_4000_8000_0000_0000_0001)
}

fn cluster_b() -> Uuid {
    Uuid::from_u128(0xbbbb_0000_0000_4000_8000_0000_0000_0002)
}

fn options() -> ClientOptions {
    ClientOptions {
        connect_timeout: Duration::from_millis(500),
        max_payload: SERVER_MAX,
        queue_depth: 64,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..ClientOptions::default()
    }
}

async fn serve_at(addr: SocketAddr, cluster: Uuid) -> (RpcServer, Arc<TestHandler>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let handler = Arc::new(TestHandler::default());
    let server =
        RpcServer::start(listener, cluster, SERVER_MAX, Security::Plaintext, handler.clone())
            .unwrap();
    (server, handler)
}

async fn serve(cluster: Uuid) -> (RpcServer, Arc<TestHandler>) {
    serve_at(SocketAddr::new(LOCALHOST, 0), cluster).await
}

fn client(server: &RpcServer, cluster: Uuid) -> RpcClient {
    RpcClient::new(server.local_addr(), None, cluster, 7, options())
}

/// A payload that names its call, so a response delivered to the wrong call is caught.
fn payload_of(call: usize) -> Vec<u8> {
    let mut bytes = format!("call {call}:").into_bytes();
    bytes.extend((0..call % 200).map(|i| (call + i) as u8));
    bytes
}

/// Waits until the peer closes `stream`; fails if it stays open for `limit`.
async fn assert_closed_by_peer(stream: &mut TcpStream, limit: Duration) {
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "server kept the connection open");
}

/// A raw connection that has completed the handshake.
async fn raw_connection(server: &RpcServer) -> TcpStream {
    let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let hello = Hello { protocol_version: PROTOCOL_VERSION, node_id: 9 };
    let frame = Frame::request(KIND_HELLO, 0, hello.encode());
    stream.write_all(&encode(cluster_a(), &frame).unwrap()).await.unwrap();
    let answer = read_frame(&mut stream, cluster_a(), 1024).await.unwrap().unwrap();
    assert_eq!(answer.kind, KIND_HELLO_OK);
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_pipelined_calls_get_their_own_answers() {
    let (server, handler) = serve(cluster_a()).await;
    let client = client(&server, cluster_a());
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for call in 0..1000 {
        let client = client.clone();
        calls.spawn(async move {
            let answer = client.call(ECHO_LATER, payload_of(call), CALL_TIMEOUT).await;
            (call, answer)
        });
    }
    while let Some(done) = calls.join_next().await {
        let (call, answer) = done.unwrap();
        assert_eq!(answer.unwrap(), payload_of(call), "call {call} got another call's answer");
    }
    assert_eq!(handler.requests.load(Ordering::SeqCst), 1000);
    // Each request takes 5 ms in the handler: serially that is 5 s.
    assert!(started.elapsed() < Duration::from_secs(3), "not pipelined: {:?}", started.elapsed());
}

/// Requests sent one after another on a connection (`send`, without waiting for answers) reach
/// the handler in that order, as a node relies on to propose pipelined WRITEs in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_requests_reach_the_handler_in_the_order_sent() {
    let (server, handler) = serve(cluster_a()).await;
    let client = client(&server, cluster_a());
    let mut answers = Vec::new();
    for call in 0..500 {
        answers.push(client.send(ECHO_LATER, payload_of(call), CALL_TIMEOUT).await.unwrap());
    }
    for (call, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer.answer().await.unwrap(), payload_of(call));
    }
    let called = handler.called.lock().unwrap().clone();
    let sent: Vec<Vec<u8>> = (0..500).map(payload_of).collect();
    assert!(called == sent, "the handler was called out of order");
}

#[tokio::test]
async fn another_cluster_is_rejected_naming_both_ids() {
    let (server, handler) = serve(cluster_a()).await;
    let patient = ClientOptions { backoff_min: Duration::from_secs(1), ..options() };
    let stranger = RpcClient::new(server.local_addr(), None, cluster_b(), 7, patient);
    match stranger.call(ECHO, b"x".to_vec(), CALL_TIMEOUT).await {
        Err(RpcError::Rejected(reason)) => {
            assert!(reason.contains(&cluster_a().to_string()), "{reason}");
            assert!(reason.contains(&cluster_b().to_string()), "{reason}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    // In backoff: refused at once without dialing again.
    let again = stranger.call(ECHO, b"x".to_vec(), CALL_TIMEOUT).await;
    assert!(
        matches!(&again, Err(RpcError::Rejected(m)) if m.contains("next attempt")),
        "{again:?}"
    );

    let member = client(&server, cluster_a());
    assert_eq!(member.call(ECHO, b"hi".to_vec(), CALL_TIMEOUT).await.unwrap(), b"hi");
    assert_eq!(handler.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn garbage_is_disconnected_and_others_are_still_served() {
    let (server, _) = serve(cluster_a()).await;

    let mut garbage = TcpStream::connect(server.local_addr()).await.unwrap();
    garbage.write_all(&[0x5a; 100]).await.unwrap();
    assert_closed_by_peer(&mut garbage, Duration::from_secs(2)).await;

    // A damaged frame after a good handshake closes that connection too.
    let mut damaged = raw_connection(&server).await;
    let mut bytes = encode(cluster_a(), &Frame::request(ECHO, 1, b"hello".to_vec())).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    damaged.write_all(&bytes).await.unwrap();
    assert_closed_by_peer(&mut damaged, Duration::from_secs(2)).await;

    // A frame claiming more than the server's limit closes it before the payload is sent.
    let mut oversized = raw_connection(&server).await;
    let mut header = encode(cluster_a(), &Frame::request(ECHO, 1, Vec::new())).unwrap();
    header[32..36].copy_from_slice(&(SERVER_MAX as u32 + 1).to_le_bytes());
    oversized.write_all(&header).await.unwrap();
    assert_closed_by_peer(&mut oversized, Duration::from_secs(2)).await;

    let client = client(&server, cluster_a());
    assert_eq!(client.call(ECHO, b"ok".to_vec(), CALL_TIMEOUT).await.unwrap(), b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_loss_fails_fast_and_restart_reconnects_after_backoff() {
    let (server, _) = serve(cluster_a()).await;
    let addr = server.local_addr();
    let client = client(&server, cluster_a());
    assert_eq!(client.call(ECHO, b"1".to_vec(), CALL_TIMEOUT).await.unwrap(), b"1");

    server.shutdown().await;
    for _ in 0..5 {
        let started = Instant::now();
        let result = client.call(ECHO, b"2".to_vec(), CALL_TIMEOUT).await;
        assert!(matches!(result, Err(RpcError::Unreachable(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (_server, _) = serve_at(addr, cluster_a()).await;
    let started = Instant::now();
    let answer = loop {
        match client.call(ECHO, b"3".to_vec(), CALL_TIMEOUT).await {
            Ok(answer) => break answer,
            Err(RpcError::Unreachable(_)) => {
                assert!(started.elapsed() < Duration::from_secs(3), "never reconnected");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    };
    assert_eq!(answer, b"3");
}

#[tokio::test]
async fn pending_calls_fail_when_the_server_goes_away() {
    let (server, _) = serve(cluster_a()).await;
    let client = client(&server, cluster_a());
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call(SLOW, b"x".to_vec(), CALL_TIMEOUT).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.shutdown().await;
    let result = call.await.unwrap();
    assert!(matches!(result, Err(RpcError::Unreachable(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn handler_error_arrives_as_remote_with_its_text() {
    let (server, _) = serve(cluster_a()).await;
    let client = client(&server, cluster_a());
    let result = client.call(FAIL, vec![0; 12], CALL_TIMEOUT).await;
    let message = "refused 12 bytes: état invalide".to_string();
    assert_eq!(result, Err(RpcError::Remote { code: CODE_REFUSED, message }));
    assert_eq!(client.call(ECHO, b"after".to_vec(), CALL_TIMEOUT).await.unwrap(), b"after");
}

#[tokio::test]
async fn handler_panic_is_answered_and_the_connection_stays_usable() {
    let (server, _) = serve(cluster_a()).await;
    let c = client(&server, cluster_a());
    match c.call(PANIC, vec![1], CALL_TIMEOUT).await {
        Err(RpcError::Remote { code, message }) => {
            assert_eq!(
                (code, message.as_str()),
                (xdevice::net::rpc::CODE_INTERNAL, "handler panicked")
            )
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    assert_eq!(c.call(ECHO, vec![2, 3], CALL_TIMEOUT).await.unwrap(), vec![2, 3]);
}

#[tokio::test]
async fn timeout_leaves_the_connection_usable() {
    let (server, handler) = serve(cluster_a()).await;
    let client = client(&server, cluster_a());
    let limit = Duration::from_millis(100);
    let started = Instant::now();
    assert_eq!(client.call(SLOW, b"late".to_vec(), limit).await, Err(RpcError::Timeout(limit)));
    assert!(started.elapsed() < Duration::from_millis(400));

    // A call abandoned by dropping its future does not wedge the connection either.
    let abandoned = tokio::spawn({
        let client = client.clone();
        async move { client.call(SLOW, b"dropped".to_vec(), CALL_TIMEOUT).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    abandoned.abort();

    for n in 0..10u8 {
        assert_eq!(client.call(ECHO, vec![n], CALL_TIMEOUT).await.unwrap(), vec![n]);
    }
    // The late answers arrive and are discarded without disturbing later calls.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(client.call(ECHO, b"still".to_vec(), CALL_TIMEOUT).await.unwrap(), b"still");
    assert_eq!(handler.requests.load(Ordering::SeqCst), 13);
}

#[tokio::test]
async fn oversized_payload_is_refused_before_sending() {
    let (server, handler) = serve(cluster_a()).await;
    let small = RpcClient::new(
        server.local_addr(),
        None,
        cluster_a(),
        7,
        ClientOptions { max_payload: 1024, ..options() },
    );
    let result = small.call(ECHO, vec![0; 1025], CALL_TIMEOUT).await;
    assert_eq!(result, Err(RpcError::TooLarge { len: 1025, max: 1024 }));
    assert_eq!(small.call(ECHO, vec![1; 1024], CALL_TIMEOUT).await.unwrap(), vec![1; 1024]);
    assert_eq!(handler.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_over_the_server_limit_drops_only_that_connection() {
    let (server, handler) = serve(cluster_a()).await;
    let big = RpcClient::new(
        server.local_addr(),
        None,
        cluster_a(),
        7,
        ClientOptions { max_payload: 4 * SERVER_MAX, ..options() },
    );
    let result = big.call(ECHO, vec![0; SERVER_MAX + 1], CALL_TIMEOUT).await;
    assert!(matches!(result, Err(RpcError::Unreachable(_))), "{result:?}");
    assert_eq!(handler.requests.load(Ordering::SeqCst), 0);

    let other = client(&server, cluster_a());
    assert_eq!(other.call(ECHO, b"fine".to_vec(), CALL_TIMEOUT).await.unwrap(), b"fine");
}

#[tokio::test]
async fn reserved_kinds_are_refused_and_source_address_binds() {
    let (server, _) = serve(cluster_a()).await;
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let client = RpcClient::new(server.local_addr(), Some(source), cluster_a(), 7, options());
    let result = client.call(KIND_HELLO, Vec::new(), CALL_TIMEOUT).await;
    assert!(matches!(result, Err(RpcError::Protocol(_))), "{result:?}");
    assert_eq!(client.call(ECHO, b"from .2".to_vec(), CALL_TIMEOUT).await.unwrap(), b"from .2");
}

#[tokio::test]
async fn connect_to_a_closed_port_fails_fast_then_backs_off() {
    let listener = TcpListener::bind(SocketAddr::new(LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let patient = ClientOptions { backoff_min: Duration::from_secs(1), ..options() };
    let client = RpcClient::new(addr, None, cluster_a(), 7, patient);
    let started = Instant::now();
    let first = client.call(ECHO, Vec::new(), CALL_TIMEOUT).await;
    assert!(matches!(&first, Err(RpcError::Unreachable(m)) if m.contains("connect")), "{first:?}");
    let second = client.call(ECHO, Vec::new(), CALL_TIMEOUT).await;
    assert!(matches!(&second, Err(RpcError::Unreachable(m)) if m.contains("next attempt")));
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn a_request_refused_as_malformed_closes_only_its_connection() {
    let (server, handler) = serve(cluster_a()).await;
    let bad = client(&server, cluster_a());
    let good = client(&server, cluster_a());
    assert_eq!(good.call(ECHO, b"before".to_vec(), CALL_TIMEOUT).await.unwrap(), b"before");
    // A malformed request with another pipelined right behind it on the same connection.
    let refused = bad.send(MALFORMED, b"garbage".to_vec(), CALL_TIMEOUT).await.unwrap();
    let behind = bad.send(ECHO, b"behind".to_vec(), CALL_TIMEOUT).await.unwrap();
    match refused.answer().await {
        Err(RpcError::Remote { code, message }) => {
            assert_eq!(code, CODE_MALFORMED);
            assert_eq!(message, "this request does not decode");
        }
        other => panic!("{other:?}"),
    }
    // The connection closes before the request behind is read: it is never answered.
    let behind = behind.answer().await;
    assert!(matches!(behind, Err(RpcError::Unreachable(_))), "{behind:?}");
    assert_eq!(good.call(ECHO, b"after".to_vec(), CALL_TIMEOUT).await.unwrap(), b"after");
    assert_eq!(handler.requests.load(Ordering::SeqCst), 3, "the request behind was handled");
}

#[tokio::test]
async fn a_request_waiting_for_admission_holds_back_its_connection_only() {
    let (server, handler) = serve(cluster_a()).await;
    let held = client(&server, cluster_a());
    let other = client(&server, cluster_a());
    let gated = held.send(GATED, b"first".to_vec(), CALL_TIMEOUT).await.unwrap();
    let behind = held.send(ECHO_LATER, b"second".to_vec(), CALL_TIMEOUT).await.unwrap();
    // The connection's reader waits on the first request's admission: the second is not even
    // read, while another connection is served.
    assert_eq!(other.call(ECHO, b"other".to_vec(), CALL_TIMEOUT).await.unwrap(), b"other");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(handler.called.lock().unwrap().is_empty(), "a frame behind an admission was read");
    handler.gate.add_permits(1);
    assert_eq!(gated.answer().await.unwrap(), b"first");
    assert_eq!(behind.answer().await.unwrap(), b"second");
    assert_eq!(*handler.called.lock().unwrap(), vec![b"second".to_vec()]);
}
