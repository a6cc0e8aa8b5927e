//! Framed request/response RPC over TCP between the nodes of one cluster. It knows nothing of Raft
//! or of what a request means; callers pick message kinds and encode payloads.
//!
//! What the layer guarantees:
//! - **Framing**: every message is one frame, a 48-byte header and a payload (`frame` has the byte
//!   diagram). A receiver never allocates more than its `max_payload` for a claimed length, and a
//!   sender refuses a payload over its own limit before anything is sent (`RpcError::TooLarge`).
//! - **Integrity**: a crc32c covers header and payload. A frame that fails any check (magic,
//!   version, length, checksum, flags, reserved bytes) closes its connection; the peer is logged
//!   with `tracing::warn!` and every other connection is unaffected.
//! - **Authentication**: under `Security::Tls` (the default everywhere but tests and benchmarks)
//!   both ends present a certificate of the cluster's CA naming who they are (`tls`), and the
//!   server holds each connection to the identity its certificate names. Over `Plaintext` a
//!   caller is whoever it claims.
//! - **Cluster isolation**: every frame carries the cluster id. A server answers a frame from
//!   another cluster with `REJECT` naming both ids and closes; the client reports
//!   `RpcError::Rejected` and backs off.
//! - **Pipelining**: one connection per client carries many calls at once, matched by request id;
//!   the server runs up to `MAX_IN_FLIGHT_PER_CONNECTION` requests of a connection concurrently
//!   and answers in completion order.
//! - **Back-pressure**: every queue is bounded: the client's send queue (`queue_depth`), the
//!   server's in-flight requests per connection and its response queue, the number of
//!   connections. A full queue makes the producer wait (within the call's timeout) rather than
//!   buffer without limit.
//! - **Failure and reconnect**: an I/O or protocol error drops the connection and fails its
//!   pending calls with `RpcError::Unreachable`. The next call reconnects, but not before an
//!   exponential backoff (`backoff_min` doubling to `backoff_max`, plus up to 25% jitter) since
//!   the last failure; calls during the backoff fail at once. A successful handshake resets it.
//! - **Calls are bounded and abandonable**: a call never waits longer than its timeout
//!   (connecting included), and a timed-out or dropped call leaves the connection usable; a late
//!   answer is discarded. Calls are never retried by this layer.

pub mod frame;
pub mod rpc;
pub mod tls;

pub use frame::{Frame, FrameError};
pub use rpc::{Admission, Answer, Caller, Handler, Refusal, Security};
pub use rpc::{ClientOptions, RpcClient, RpcError, RpcServer, SentCall};
