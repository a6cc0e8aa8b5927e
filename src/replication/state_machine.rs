//! The state machine: the engine's block image. Applying an entry writes its blocks; a snapshot
//! is a checkpoint of the image (which also lets the log prefix it covers be purged), sent as a
//! stream of the live image (see `snapshot`).

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, RaftSnapshotBuilder, StorageIOError};

use super::snapshot::{
    self, LiveStream, ReceiveProgress, Shape, SnapshotData, SnapshotFiles, Staging,
};
use super::types::{
    decode_membership, from_store_log_id, into_entry_body, to_store_log_id, Entry, LogId, Response,
    SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::storage::engine::Engine;
use crate::storage::image::Applied;

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

/// The applied state in openraft's terms.
fn stored_membership(applied: &Applied) -> Result<StoredMembership, StorageError> {
    match &applied.membership {
        None => Ok(StoredMembership::default()),
        Some((id, bytes)) => {
            let m = decode_membership(bytes).map_err(sm_err)?;
            Ok(StoredMembership::new(Some(from_store_log_id(*id)), m))
        }
    }
}

fn meta_of(applied: &Applied) -> Result<Option<SnapshotMeta>, StorageError> {
    let Some(id) = applied.log_id else { return Ok(None) };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
    Ok(Some(SnapshotMeta {
        last_log_id: Some(from_store_log_id(id)),
        last_membership: stored_membership(applied)?,
        snapshot_id: format!("{}-{}-{}-{now}", id.term, id.node, id.index),
    }))
}

/// openraft's state machine over one replica's engine.
#[derive(Clone, Debug)]
pub struct StateMachine {
    engine: Arc<Engine>,
    files: SnapshotFiles,
    current: Arc<Mutex<Option<SnapshotMeta>>>,
    receiving: Arc<ReceiveProgress>,
}

impl StateMachine {
    /// Wraps an opened engine, first finishing a snapshot install a crash interrupted. The
    /// current snapshot is the image's last checkpoint.
    pub fn new(engine: Arc<Engine>, files: SnapshotFiles) -> Result<StateMachine, StorageError> {
        if files.installing().exists() {
            tracing::warn!(path = %files.installing().display(), "redoing an interrupted snapshot install");
            snapshot::install(&engine, &files).map_err(snap_err)?;
        }
        let current = meta_of(&engine.image().applied())?;
        Ok(StateMachine {
            engine,
            files,
            current: Arc::new(Mutex::new(current)),
            receiving: Arc::default(),
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Stages (if it is not staged yet), verifies and installs a received snapshot.
    async fn install(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        match &mut *snapshot {
            SnapshotData::File(f) => f.sync_all().await.map_err(snap_err)?,
            live @ SnapshotData::Live(_) => {
                snapshot::stage(&self.files, live).await.map_err(snap_err)?
            }
        }
        drop(snapshot);
        let shape = Shape::of(&self.engine);
        let staged = snapshot::verify(&self.files.staging(), shape).await.map_err(snap_err)?;
        if staged.last_log_id != meta.last_log_id || staged.last_membership != meta.last_membership
        {
            return Err(snap_err(format!(
                "received snapshot is of {:?}, expected {:?}",
                staged.last_log_id, meta.last_log_id
            )));
        }
        let engine = self.engine.clone();
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || {
            snapshot::begin_install(&files).map_err(|e| format!("starting the install: {e}"))?;
            snapshot::install(&engine, &files)
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        tracing::info!(last_log_id = ?meta.last_log_id, "snapshot installed");
        self.set_current(meta.clone());
        Ok(())
    }

    /// The progress of the snapshot this replica is receiving (shown in its status).
    pub fn receive_progress(&self) -> Arc<ReceiveProgress> {
        self.receiving.clone()
    }

    fn set_current(&self, meta: SnapshotMeta) {
        *self.current.lock().expect("snapshot lock") = Some(meta);
    }
}

/// Builds a snapshot: checkpoints the image and describes the stream of it.
#[derive(Debug)]
pub struct SnapshotBuilder {
    sm: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let engine = self.sm.engine.clone();
        let applied = tokio::task::spawn_blocking(move || engine.checkpoint())
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        let meta = match meta_of(&applied)? {
            Some(meta) => meta,
            None => SnapshotMeta {
                last_log_id: None,
                last_membership: StoredMembership::default(),
                snapshot_id: "empty".into(),
            },
        };
        tracing::info!(last_log_id = ?meta.last_log_id, "snapshot built (image checkpointed)");
        self.sm.set_current(meta.clone());
        let stream = LiveStream::new(self.sm.engine.clone(), &meta).map_err(snap_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::Live(stream)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.engine.applied();
        Ok((applied.log_id.map(from_store_log_id), stored_membership(&applied)?))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut replies = Vec::new();
        let mut bodies = Vec::new();
        for e in entries {
            replies.push(Response { index: e.log_id.index });
            bodies.push((to_store_log_id(&e.log_id), into_entry_body(e)));
        }
        // Image writes block: keep them off the runtime's workers, where they would stall the
        // heartbeats and RPCs sharing the worker.
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || {
            engine.apply_entries(bodies.iter().map(|(id, body)| (*id, body)))
        })
        .await
        .map_err(sm_err)?
        .map_err(sm_err)?;
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let file = tokio::fs::File::create(self.files.staging()).await.map_err(snap_err)?;
        self.receiving.begin();
        Ok(Box::new(SnapshotData::File(Staging::new(file, self.receiving.clone()))))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        self.receiving.installing();
        let r = self.install(meta, snapshot).await;
        self.receiving.finished(r.is_ok());
        r
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(meta) = self.current.lock().expect("snapshot lock").clone() else {
            return Ok(None);
        };
        let stream = LiveStream::new(self.engine.clone(), &meta).map_err(snap_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(SnapshotData::Live(stream)) }))
    }
}
