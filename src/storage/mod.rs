//! The storage engine of one replica of one device: superblock, WAL, Raft hard state and the
//! block image (data region), over the `disk` seam. It never talks to the network or the kernel's
//! block layer; replication drives it through its public methods.

pub mod disk;
mod error;

pub use error::{Result, StorageError};
pub mod engine;
pub mod image;
pub mod inspect;
pub mod layout;
pub(crate) mod le;
pub mod poison;
pub mod record;
pub mod segment;
mod slots;
pub mod state;
pub mod superblock;
pub mod wal;
