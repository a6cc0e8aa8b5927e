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
pub mod service;
pub mod snapshot;
pub mod state_machine;
pub mod tcp;
pub mod trail;
pub mod types;
pub mod wire;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use crate::storage::disk::{Backend, DirVolume, Volume};
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

/// Opens (recovers) a formatted store and wraps it for openraft. Incoming snapshots are staged
/// on the store's own volume (its data directory) when it has one, and in `snapshot_dir` for a
/// store on a raw device; either way through the disk seam, so a crash mid-install is repaired
/// here, before Raft starts.
pub fn open_replica(
    location: &Location,
    cfg: EngineConfig,
    snapshot_dir: &Path,
    entry_cache_bytes: usize,
) -> anyhow::Result<Replica> {
    let (engine, recovery) = Engine::open(location, cfg)?;
    let engine = Arc::new(engine);
    let name = engine.superblock().device_name.clone();
    let snapshots: Arc<dyn Volume> = match location {
        Location::Directory { volume, .. } => {
            finish_elsewhere(&engine, snapshot_dir, &name)?;
            volume.clone()
        }
        Location::Raw { .. } => Arc::new(
            DirVolume::open(snapshot_dir, Backend::File)
                .with_context(|| format!("snapshot directory {}", snapshot_dir.display()))?,
        ),
    };
    let sm = state_machine::StateMachine::new(
        engine.clone(),
        snapshot::SnapshotFiles::new(snapshots, &name),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let log = log_store::LogStore::new(engine.clone(), entry_cache_bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Replica { engine, log, sm, recovery })
}

/// Earlier builds staged a directory store's snapshots in `snapshot_dir` even when it was not
/// the data directory (as plain files, a stream of snapshot version 1): an install one of them
/// left interrupted there is finished, and a stream it left staged is removed, so none is
/// stranded by the move to the data directory.
fn finish_elsewhere(engine: &Engine, snapshot_dir: &Path, name: &str) -> anyhow::Result<()> {
    let volume = match DirVolume::open(snapshot_dir, Backend::File) {
        Ok(v) => Arc::new(v) as Arc<dyn Volume>,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| format!("snapshot directory {}", snapshot_dir.display()))
        }
    };
    let files = snapshot::SnapshotFiles::new(volume, name);
    match snapshot::recover(engine, &files) {
        Ok(_) => Ok(()),
        Err(e) => anyhow::bail!("finishing a snapshot install in {}: {e}", snapshot_dir.display()),
    }
}
