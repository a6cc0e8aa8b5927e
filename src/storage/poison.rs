//! The engine-wide poison flag. A failed write or flush of anything that must be durable sets it;
//! from then on every write path refuses with `StorageError::Poisoned` and nothing is acknowledged.
//! It is never cleared: the replica must be restarted and recover from what is on disk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::error::{Result, StorageError};

/// Shared by the WAL, the state store and the image of one engine.
#[derive(Debug, Default)]
pub struct Poison(Mutex<Option<String>>, AtomicBool);

impl Poison {
    /// Fails with `Poisoned` once any durable write has failed, and with `Invalid` once the
    /// engine is closed.
    pub fn check(&self) -> Result<()> {
        if let Some(cause) = &*self.0.lock().expect("poison lock") {
            return Err(StorageError::Poisoned { cause: cause.clone() });
        }
        if self.1.load(Ordering::Acquire) {
            return Err(StorageError::Invalid("the engine is closed".into()));
        }
        Ok(())
    }

    /// The engine is closed: every later write is refused (not a failure: nothing is lost).
    pub fn close(&self) {
        self.1.store(true, Ordering::Release);
    }

    /// Records the first failure (later ones keep the first cause) and returns the error to report.
    pub fn set(&self, cause: &StorageError) -> StorageError {
        let mut slot = self.0.lock().expect("poison lock");
        let first = slot.get_or_insert_with(|| cause.to_string()).clone();
        tracing::error!(cause = %first, "storage poisoned: refusing all further writes");
        StorageError::Poisoned { cause: first }
    }

    /// The cause, if poisoned.
    pub fn cause(&self) -> Option<String> {
        self.0.lock().expect("poison lock").clone()
    }
}
