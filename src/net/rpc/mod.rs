//! Request/response calls over framed TCP connections: the handshake, the handler seam, the
//! errors a caller sees, and the write loop both ends share. It never interprets a request's
//! `kind` or payload; those belong to whoever implements `Handler`.
//!
//! Handshake, on every new connection:
//! 1. the client sends `HELLO` (request id 0) with `{protocol version u16, caller node id u64}`;
//! 2. the server answers `HELLO_OK` with `{protocol version u16}`, or `REJECT` with a UTF-8 reason
//!    and closes. A frame carrying another cluster's id is answered with `REJECT` encoded under
//!    the caller's cluster id (so the caller can read it), at any point of the connection.

mod backoff;
pub mod client;
pub mod server;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

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

/// Serves requests. Called once per request, on the connection's reader, in the order the
/// requests arrived on that connection (so a handler can queue work in the caller's order); the
/// returned futures run concurrently. The returned `Err` text reaches the caller as
/// `RpcError::Remote`. `call` itself must not block.
pub trait Handler: Send + Sync + 'static {
    fn call(
        &self,
        kind: u8,
        payload: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>>;
}

/// Why a call did not return a result.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// No usable connection: connect failed, the connection broke, or reconnect is backing off.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// No answer within the call's timeout; the connection stays up.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer's handler returned this error.
    #[error("remote error: {0}")]
    Remote(String),
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
