//! Replication: the WAL as a Raft log (openraft), the block image as its state machine.
//!
//! - `types`: the openraft type configuration and entry conversions (pure).
//! - `log_store`: `RaftLogStorage` on the engine's WAL and hard state.
//! - `state_machine`: `RaftStateMachine` on the engine's image.
//! - `snapshot`: the checksummed snapshot stream, staging, verification and install.
//! - `commits`: commit notification for proposals made in this process.
//! - `network`: Raft RPCs over a `Transport` (in-process or `tcp`), answered by `dispatch`.
//! - `node`: one running replica (openraft, its configuration and snapshot monitor).

// openraft's error types (RaftError, RPCError, StorageError) are large.
#![allow(clippy::result_large_err)]

pub mod commits;
pub mod log_store;
pub mod network;
pub mod node;
pub mod snapshot;
pub mod state_machine;
pub mod tcp;
pub mod trail;
pub mod types;

use std::path::Path;
use std::sync::Arc;

use crate::storage::engine::{Engine, EngineConfig, Recovery};
use crate::storage::layout::Location;

/// One replica's storage as openraft sees it.
#[derive(Debug)]
pub struct Replica {
    pub engine: Arc<Engine>,
    pub log: log_store::LogStore,
    pub sm: state_machine::StateMachine,
    pub recovery: Recovery,
}

/// Opens (recovers) a formatted store and wraps it for openraft. Snapshots are staged in
/// `snapshot_dir`.
pub fn open_replica(
    location: &Location,
    cfg: EngineConfig,
    snapshot_dir: &Path,
    entry_cache_bytes: usize,
) -> anyhow::Result<Replica> {
    let (engine, recovery) = Engine::open(location, cfg)?;
    let engine = Arc::new(engine);
    let name = engine.superblock().device_name.clone();
    let sm = state_machine::StateMachine::new(
        engine.clone(),
        snapshot::SnapshotFiles::new(snapshot_dir, &name),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let log = log_store::LogStore::new(engine.clone(), entry_cache_bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Replica { engine, log, sm, recovery })
}
