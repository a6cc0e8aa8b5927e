//! Framed request/response RPC over TCP between the nodes of one cluster. It knows nothing of Raft
//! or of what a request means; callers pick message kinds and encode payloads.

pub mod frame;

pub use frame::{Frame, FrameError};
