//! xdevice: a Raft-replicated block device for write-ahead logs.
//!
//! Layers (see `docs/ARCHITECTURE.md`): `storage` is the persistence kernel of one replica;
//! `entry` is the pure encoding of what a log entry asks the block image to do.

pub mod cli;
pub mod entry;
pub mod net;
pub mod storage;
