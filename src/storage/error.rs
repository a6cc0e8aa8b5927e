//! Typed errors of the storage engine. Every error names what failed and where; nothing here
//! decides policy (poisoning lives in the WAL and image writers that own the flushes).

use std::io;

/// Result alias used throughout the storage engine.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything the storage engine can report.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system I/O call failed.
    #[error("I/O error: {op} {location}: {source}")]
    Io {
        op: &'static str,
        location: String,
        #[source]
        source: io::Error,
    },
    /// An on-disk structure failed validation. `location` names the file (or device) and offset.
    #[error("corrupt {structure} at {location}: {reason}")]
    Corrupt { structure: &'static str, location: String, reason: String },
    /// The store or device does not hold an xdevice data set (or one of another device/cluster).
    #[error("not an xdevice store: {0}")]
    Foreign(String),
    /// The on-disk format is newer or older than this build understands.
    #[error(
        "unsupported format version {found} at {location} (this build reads version {supported})"
    )]
    Version { found: u32, supported: u32, location: String },
    /// A flush or fsync failed earlier; the engine refuses all further writes.
    #[error("storage is poisoned by an earlier failed flush ({cause}); no write is accepted or acknowledged any more")]
    Poisoned { cause: String },
    /// The caller asked for something the engine's state or configuration forbids.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The configured space is exhausted.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// The store was already formatted (format refuses to overwrite it).
    #[error("already formatted: {0}")]
    AlreadyFormatted(String),
    /// Another process (or another open in this one) holds the store.
    #[error("store in use: {0}")]
    InUse(String),
    /// The store belongs to another cluster member than the one opening it.
    #[error(
        "{location} is the store of node {belongs} of cluster {cluster}; it cannot be started as node {asked}"
    )]
    WrongNode { location: String, belongs: u64, asked: u64, cluster: uuid::Uuid },
    /// Format found data that is not an xdevice store where it would write.
    #[error("refusing to format over data that is not an xdevice store: {0}")]
    Unrecognised(String),
}

impl StorageError {
    /// Wraps an `io::Error` with the operation and location it came from.
    pub fn io(op: &'static str, location: impl Into<String>, source: io::Error) -> Self {
        StorageError::Io { op, location: location.into(), source }
    }

    /// Builds a corruption error.
    pub fn corrupt(
        structure: &'static str,
        location: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        StorageError::Corrupt { structure, location: location.into(), reason: reason.into() }
    }

    /// The errno this error maps to at a kernel boundary.
    pub fn errno(&self) -> i32 {
        match self {
            StorageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            StorageError::NoSpace(_) => libc::ENOSPC,
            StorageError::Invalid(_) => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}
