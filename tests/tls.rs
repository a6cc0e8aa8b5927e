//! Mutual TLS in the RPC layer over loopback: a member's certificate gets it in as that member;
//! no certificate, plaintext, another cluster's CA, or a `HELLO` that claims another node than the
//! certificate names are refused before any request reaches the handler, and the server keeps
//! serving its members.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;
use xdevice::net::frame::{encode, read_frame, Frame};
use xdevice::net::rpc::{admitted, Admission, Hello, KIND_HELLO, KIND_REJECT, PROTOCOL_VERSION};
use xdevice::net::tls::{create_dev, Identity, Tls, TlsFiles};
use xdevice::net::{Caller, ClientOptions, Handler, RpcClient, RpcError, RpcServer, Security};

const ECHO: u8 = 1;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Echoes, and keeps who called.
#[derive(Default)]
struct Recorder {
    callers: Mutex<Vec<Caller>>,
}

impl Handler for Recorder {
    fn call(&self, caller: &Caller, _kind: u8, payload: Vec<u8>) -> Admission {
        self.callers.lock().unwrap().push(*caller);
        admitted(Box::pin(async move { Ok(payload) }))
    }
}

fn cluster() -> Uuid {
    Uuid::from_u128(0x7777_0000_0000_4000_8000_0000_0000_0001)
}

fn tls(dir: &Path, cluster: Uuid, identity: Identity) -> Arc<Tls> {
    Arc::new(Tls::load(&TlsFiles::in_dir(dir, identity), cluster, identity).unwrap())
}

async fn serve(dir: &Path) -> (RpcServer, Arc<Recorder>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let handler = Arc::new(Recorder::default());
    let security = Security::Tls(tls(dir, cluster(), Identity::Member(1)));
    let server = RpcServer::start(listener, cluster(), 1 << 20, security, handler.clone()).unwrap();
    (server, handler)
}

fn client(addr: SocketAddr, security: Security, peer: Option<u64>) -> RpcClient {
    let options = ClientOptions {
        security,
        peer_node: peer,
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(20),
        ..ClientOptions::default()
    };
    RpcClient::new(addr, None, cluster(), 0, options)
}

#[tokio::test]
async fn members_and_the_admin_get_in_as_who_their_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    create_dev(dir.path(), cluster(), &[1, 2]).unwrap();
    let (server, handler) = serve(dir.path()).await;
    let two = Security::Tls(tls(dir.path(), cluster(), Identity::Member(2)));
    let c = client(server.local_addr(), two, Some(1));
    assert_eq!(c.call(ECHO, b"hi".to_vec(), TIMEOUT).await.unwrap(), b"hi");
    let admin = Security::Tls(tls(dir.path(), cluster(), Identity::Admin));
    let a = client(server.local_addr(), admin, None);
    assert_eq!(a.call(ECHO, b"op".to_vec(), TIMEOUT).await.unwrap(), b"op");
    let callers = handler.callers.lock().unwrap().clone();
    assert_eq!(callers.len(), 2);
    assert_eq!((callers[0].node_id, callers[0].verified), (2, Some(Identity::Member(2))));
    assert_eq!((callers[1].node_id, callers[1].verified), (0, Some(Identity::Admin)));
}

#[tokio::test]
async fn a_client_refuses_a_server_that_is_not_the_node_it_dialled() {
    let dir = tempfile::tempdir().unwrap();
    create_dev(dir.path(), cluster(), &[1, 2]).unwrap();
    let (server, handler) = serve(dir.path()).await;
    let two = Security::Tls(tls(dir.path(), cluster(), Identity::Member(2)));
    // The server is node 1; a transport that dials node 3 at this address refuses it.
    let c = client(server.local_addr(), two, Some(3));
    match c.call(ECHO, b"x".to_vec(), TIMEOUT).await {
        Err(RpcError::Rejected(m)) => assert!(m.contains("for node 1, not 3"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(handler.callers.lock().unwrap().is_empty());
}

#[tokio::test]
async fn strangers_are_refused_before_any_request_and_members_still_served() {
    let dir = tempfile::tempdir().unwrap();
    create_dev(dir.path(), cluster(), &[1, 2]).unwrap();
    let (server, handler) = serve(dir.path()).await;
    let addr = server.local_addr();

    // Plaintext: the server expects a TLS handshake and drops the connection.
    let plain = client(addr, Security::Plaintext, None);
    let r = plain.call(ECHO, b"x".to_vec(), TIMEOUT).await;
    assert!(matches!(r, Err(RpcError::Unreachable(_) | RpcError::Protocol(_))), "{r:?}");

    // Another cluster's CA, a certificate for the same node id and cluster id.
    let other = tempfile::tempdir().unwrap();
    create_dev(other.path(), cluster(), &[2]).unwrap();
    let foreign = Security::Tls(tls(other.path(), cluster(), Identity::Member(2)));
    let r = client(addr, foreign, Some(1)).call(ECHO, b"x".to_vec(), TIMEOUT).await;
    assert!(matches!(r, Err(RpcError::Rejected(_) | RpcError::Unreachable(_))), "{r:?}");

    // A TLS client with no certificate at all.
    let stream = TcpStream::connect(addr).await.unwrap();
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(dir.path().join("ca.pem")).unwrap();
        use rustls_pki_types::pem::PemObject;
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    };
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from(Identity::Member(1).name(cluster())).unwrap();
    // TLS 1.3 finishes the client's side before the server checks the client: the refusal shows
    // as the connection closing before any answer.
    if let Ok(mut tls) = connector.connect(name, stream).await {
        let hello = Hello { protocol_version: PROTOCOL_VERSION, node_id: 2 };
        let frame = encode(cluster(), &Frame::request(KIND_HELLO, 0, hello.encode())).unwrap();
        let _ = tls.write_all(&frame).await;
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(TIMEOUT, tls.read(&mut buf)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "a client without a certificate was answered");
    }

    assert!(handler.callers.lock().unwrap().is_empty(), "a stranger's request was handled");
    let two = Security::Tls(tls(dir.path(), cluster(), Identity::Member(2)));
    let member = client(addr, two, Some(1));
    assert_eq!(member.call(ECHO, b"ok".to_vec(), TIMEOUT).await.unwrap(), b"ok");
}

#[tokio::test]
async fn a_hello_claiming_another_node_than_the_certificate_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    create_dev(dir.path(), cluster(), &[1, 2, 5]).unwrap();
    let (server, handler) = serve(dir.path()).await;
    // Node 5's certificate, speaking as node 2 (a voter it wants to impersonate).
    let five = tls(dir.path(), cluster(), Identity::Member(5));
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let mut tls =
        five.connector(Some(1)).unwrap().connect(five.server_name(), stream).await.unwrap();
    let hello = Hello { protocol_version: PROTOCOL_VERSION, node_id: 2 };
    let frame = encode(cluster(), &Frame::request(KIND_HELLO, 0, hello.encode())).unwrap();
    tls.write_all(&frame).await.unwrap();
    let answer = read_frame(&mut tls, cluster(), 1 << 20).await.unwrap().unwrap();
    assert_eq!(answer.kind, KIND_REJECT);
    let reason = String::from_utf8(answer.payload).unwrap();
    assert!(reason.contains("claims node id 2 but the certificate is for node 5"), "{reason}");
    // And nothing more is read from it.
    let request = encode(cluster(), &Frame::request(ECHO, 1, b"vote".to_vec())).unwrap();
    let _ = tls.write_all(&request).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(handler.callers.lock().unwrap().is_empty());
}
