//! xdevice: a Raft-replicated block device for write-ahead logs.
//!
//! Layers (see `docs/ARCHITECTURE.md`): `storage` is the persistence kernel of one replica;
//! `entry` is the pure encoding of what a log entry asks the block image to do; `replication`
//! makes the WAL an openraft log and the image its state machine; `net` is the framed RPC layer
//! between processes; `device` is the block-device API (write, flush, read, discard) on top; `daemon` serves
//! it as /dev/ublkbN through the ublk frontend (the `xdevice-ublk` crate); `cli` is the command
//! line.

pub mod cache;
pub mod cli;
pub mod daemon;
pub mod device;
pub mod entry;
pub mod metrics;
pub mod net;
pub mod replication;
pub mod storage;

/// jemalloc's settings for the binaries (exported as `_rjem_malloc_conf` next to the global
/// allocator): freed pages go back to the kernel after 100 ms instead of ten seconds, from a
/// background thread, so resident memory follows what is live (the serving process's goal:
/// resident memory within its hot cache + 64 MiB). `cache-memory` measured 1000, 100 and 0 ms at the same
/// throughput once the write path stopped allocating per block and per batch; the peak was
/// 352, 346 and 337 MiB.
pub const MALLOC_CONF: &[u8; 59] = b"background_thread:true,dirty_decay_ms:100,muzzy_decay_ms:0\0";
