//! Request/response calls over framed TCP connections: the handshake, the handler seam, the
//! errors a caller sees, and the write loop both ends share. It never interprets a request's
//! `kind` or payload; those belong to whoever implements `Handler`.
//!
//! Handshake, on every new connection:
//! 0. under `Security::Tls`, the TLS handshake: both ends present a certificate of the cluster's
//!    CA (`tls`); a client without one, or with another CA's, is refused here;
//! 1. the client sends `HELLO` (request id 0) with `{protocol version u16, caller node id u64}`;
//!    under TLS the id must be the one the client's certificate names (0 for the admin);
//! 2. the server answers `HELLO_OK` with `{protocol version u16}`, or `REJECT` with a UTF-8 reason
//!    and closes. A frame carrying another cluster's id is answered with `REJECT` encoded under
//!    the caller's cluster id (so the caller can read it), at any point of the connection.
//!
//! An error answer's payload is `{code u16, UTF-8 message}`: the code is for programs, the
//! message for people. Codes below `FIRST_APP_CODE` belong to this layer (`CODE_*`); a request
//! the handler finds malformed (`CODE_MALFORMED`) is answered and its connection closed.

mod backoff;
pub mod client;
pub mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use super::tls::{Identity, Tls};

pub use client::{ClientOptions, RpcClient, SentCall};
pub use server::RpcServer;

/// The RPC protocol version carried in `HELLO` and `HELLO_OK`.
pub const PROTOCOL_VERSION: u16 = 1;
/// Kinds from here up belong to this layer; callers may not use them.
pub const RESERVED_KINDS: u8 = 0xF0;
/// Client to server, first frame of a connection.
pub const KIND_HELLO: u8 = 0xF0;
/// Server to client: handshake accepted.
pub const KIND_HELLO_OK: u8 = 0xF1;
/// Server to client: refused, payload is the reason; the server closes after sending it.
pub const KIND_REJECT: u8 = 0xF2;

const HELLO_BYTES: usize = 10;
/// Bytes of an error message put on the wire; longer messages are cut at a char boundary.
const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
/// Bytes buffered by the write loop before it must flush.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;

/// Error code: the request could not be decoded or broke the protocol; the server closes the
/// connection after answering.
pub const CODE_MALFORMED: u16 = 1;
/// Error code: the server failed (its handler panicked, or its answer was too large).
pub const CODE_INTERNAL: u16 = 2;
/// Error code: the caller's identity may not make this request.
pub const CODE_FORBIDDEN: u16 = 3;
/// Codes from here up are the handler's own.
pub const FIRST_APP_CODE: u16 = 100;

/// Whether connections are encrypted and both ends authenticated.
#[derive(Clone, Debug)]
pub enum Security {
    /// Mutual TLS under the cluster's CA (`tls`).
    Tls(Arc<Tls>),
    /// Clear text, and a caller is whoever it says it is: for tests and benchmarks only, and
    /// only when asked for by name (`--plaintext`).
    Plaintext,
}

/// Who sent a request, as the server knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub peer: SocketAddr,
    /// The node id its `HELLO` gave (0: not a member).
    pub node_id: u64,
    /// What its certificate proved; `None` over plaintext, where the id is only a claim.
    pub verified: Option<Identity>,
}

/// A handler's refusal: a code (`CODE_*` or the handler's own from `FIRST_APP_CODE`) and a
/// message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub message: String,
}

impl Refusal {
    pub fn new(code: u16, message: impl Into<String>) -> Refusal {
        Refusal { code, message: message.into() }
    }

    /// The error payload: the code, then the message cut to `max` bytes at a char boundary.
    pub fn encode(&self, max: usize) -> Vec<u8> {
        let message = bounded_message(&self.message, max.saturating_sub(2));
        let mut out = Vec::with_capacity(2 + message.len());
        out.extend_from_slice(&self.code.to_le_bytes());
        out.extend_from_slice(message.as_bytes());
        out
    }

    /// Reads an error payload; a payload too short for a code is itself a protocol error.
    pub fn decode(payload: &[u8]) -> Result<Refusal, RpcError> {
        match payload {
            [a, b, message @ ..] => Ok(Refusal {
                code: u16::from_le_bytes([*a, *b]),
                message: String::from_utf8_lossy(message).into_owned(),
            }),
            _ => Err(RpcError::Protocol(format!(
                "an error answer of {} bytes has no code",
                payload.len()
            ))),
        }
    }
}

/// A request's answer, or its refusal.
pub type Answer = Pin<Box<dyn Future<Output = Result<Vec<u8>, Refusal>> + Send>>;
/// A request being admitted: resolves to its answer's future once the handler has taken the
/// request in (queued it, reserved room for it), or to its refusal at once. A refusal with
/// `CODE_MALFORMED` here closes the connection before its next frame is read.
pub type Admission = Pin<Box<dyn Future<Output = Result<Answer, Refusal>> + Send>>;

/// A request needing no admission step.
pub fn admitted(answer: Answer) -> Admission {
    Box::pin(std::future::ready(Ok(answer)))
}

/// Serves requests. Called once per request, on the connection's reader, in the order the
/// requests arrived on that connection; the server awaits the returned admission before it reads
/// the connection's next frame (so a handler can queue work in the caller's order, and a full
/// queue holds the connection back rather than growing), then runs the answers concurrently. A
/// refusal reaches the caller as `RpcError::Remote`. `call` itself must not block.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, caller: &Caller, kind: u8, payload: Vec<u8>) -> Admission;
}

/// A connection's byte stream: TCP, or TLS over TCP.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for S {}

/// Why a call did not return a result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// No usable connection: connect failed, the connection broke, or reconnect is backing off.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// No answer within the call's timeout; the connection stays up.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer refused the request: its code and message.
    #[error("remote error: {message}")]
    Remote { code: u16, message: String },
    /// The peer refused the connection (for example another cluster id).
    #[error("rejected by peer: {0}")]
    Rejected(String),
    /// A caller or peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The payload exceeds the configured limit; nothing was sent.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
}

/// The `HELLO` payload: who is calling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u16,
    pub node_id: u64,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(HELLO_BYTES);
        buf.extend_from_slice(&self.protocol_version.to_le_bytes());
        buf.extend_from_slice(&self.node_id.to_le_bytes());
        buf
    }

    pub fn decode(payload: &[u8]) -> Option<Hello> {
        let bytes: &[u8; HELLO_BYTES] = payload.try_into().ok()?;
        let protocol_version = u16::from_le_bytes([bytes[0], bytes[1]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[2..]);
        Some(Hello { protocol_version, node_id: u64::from_le_bytes(id) })
    }
}

/// `message` cut to at most `max` bytes without splitting a character.
fn bounded_message(message: &str, max: usize) -> &str {
    let mut end = message.len().min(max);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Writes encoded frames from `rx` until every sender is gone or a write fails. Frames that are
/// already queued are written together and flushed once, so pipelined traffic costs few syscalls.
async fn write_loop<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, w);
    while let Some(bytes) = rx.recv().await {
        w.write_all(&bytes).await?;
        while let Ok(more) = rx.try_recv() {
            w.write_all(&more).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip_and_bad_lengths() {
        let hello = Hello { protocol_version: 1, node_id: u64::MAX - 3 };
        assert_eq!(Hello::decode(&hello.encode()), Some(hello));
        assert_eq!(Hello::decode(&[0; 9]), None);
        assert_eq!(Hello::decode(&[0; 11]), None);
    }

    #[test]
    fn messages_are_cut_at_char_boundaries() {
        assert_eq!(bounded_message("héllo", 2), "h");
        assert_eq!(bounded_message("héllo", 3), "hé");
        assert_eq!(bounded_message("abc", 10), "abc");
    }
}
