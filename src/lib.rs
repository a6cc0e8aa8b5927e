//! xdevice: a Raft-replicated block device for write-ahead logs.
//!
//! Layers (see `docs/ARCHITECTURE.md`): `storage` is the persistence kernel of one replica;
//! `entry` is the pure encoding of what a log entry asks the block image to do; `replication`
//! makes the WAL an openraft log and the image its state machine; `net` is the framed RPC layer
//! between processes; `device` is the block-device API (write, flush, read, discard) on top.

pub mod cache;
pub mod cli;
pub mod device;
pub mod entry;
pub mod net;
pub mod replication;
pub mod storage;
