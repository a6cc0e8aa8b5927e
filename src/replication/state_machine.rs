//! The state machine: the engine's block image. Applying an entry writes its blocks; a snapshot
//! is a checkpoint of the image (which also lets the log prefix it covers be purged), sent as a
//! stream of the live image (see `snapshot`).

use std::io;
use std::sync::{Arc, Mutex};

use futures_util::{FutureExt, Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::RaftSnapshotBuilder;

use super::snapshot::{
    self, Described, LiveStream, ReceiveProgress, SnapshotData, SnapshotFiles, Staging, Target,
};
use super::types::{
    decode_membership, from_store_log_id, into_entry_body, to_store_log_id, LogId, Response,
    Snapshot, SnapshotMeta, StoredMembership, TypeConfig,
};
use crate::storage::engine::Engine;
use crate::storage::image::Applied;

/// Entries written to the image in one blocking task at most. openraft 0.10 hands `apply` a
/// stream, but builds it (the log reader's default `entries_stream`) from one
/// `try_get_log_entries` of the whole range to apply: what bounds the memory that takes is the
/// apply-lag bound (`node::MAX_APPLY_LAG_ENTRIES`), not this.
const APPLY_BATCH_ENTRIES: usize = 8;

fn sm_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("state machine: {e}"))
}

fn snap_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("snapshot: {e}"))
}

/// The applied state in openraft's terms.
fn stored_membership(applied: &Applied) -> io::Result<StoredMembership> {
    match &applied.membership {
        None => Ok(StoredMembership::default()),
        Some((id, bytes)) => {
            let m = decode_membership(bytes).map_err(sm_err)?;
            Ok(StoredMembership::new(Some(from_store_log_id(*id)), m))
        }
    }
}

/// The snapshot of an image checkpointed at `applied`: openraft's meta and the attachment.
fn described(applied: &Applied) -> io::Result<Option<Described>> {
    let Some(id) = applied.log_id else { return Ok(None) };
    let meta = SnapshotMeta {
        last_log_id: Some(from_store_log_id(id)),
        last_membership: stored_membership(applied)?,
    };
    Ok(Some(Described { meta, attachment: applied.attachment }))
}

/// openraft's state machine over one replica's engine.
#[derive(Clone, Debug)]
pub struct StateMachine {
    engine: Arc<Engine>,
    files: SnapshotFiles,
    current: Arc<Mutex<Option<Described>>>,
    receiving: Arc<ReceiveProgress>,
}

impl StateMachine {
    /// Wraps an opened engine, first repairing what a crash left of a snapshot install
    /// (`snapshot::recover`: an intent is finished, a staged stream without one removed). The
    /// current snapshot is the image's last checkpoint.
    pub fn new(engine: Arc<Engine>, files: SnapshotFiles) -> io::Result<StateMachine> {
        snapshot::recover(&engine, &files).map_err(snap_err)?;
        let current = described(&engine.image().applied())?;
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

    /// Stages (if it is not staged yet) and syncs a received snapshot, verifies it whole,
    /// records the intent to install it, and installs it (see `snapshot` for the steps).
    async fn install(&mut self, meta: &SnapshotMeta, mut snapshot: SnapshotData) -> io::Result<()> {
        let staged_bytes = match &mut snapshot {
            SnapshotData::File(f) => f.finish().await.map_err(snap_err)?,
            live @ SnapshotData::Live(_) => {
                snapshot::stage(&self.engine, &self.files, &self.receiving, live)
                    .await
                    .map_err(snap_err)?
            }
        };
        drop(snapshot);
        let engine = self.engine.clone();
        let files = self.files.clone();
        let expected = meta.clone();
        let staged = tokio::task::spawn_blocking(move || {
            let refused = |e: String| {
                files.discard_staged();
                e
            };
            let staged =
                snapshot::verify(&files, staged_bytes, Target::of(&engine)).map_err(refused)?;
            if staged.meta.last_log_id != expected.last_log_id
                || staged.meta.last_membership != expected.last_membership
            {
                return Err(refused(format!(
                    "received snapshot is of {:?}, expected {:?}",
                    staged.meta.last_log_id, expected.last_log_id
                )));
            }
            snapshot::record_intent(&engine, &files)
                .map_err(|e| format!("recording the install intent: {e}"))?;
            snapshot::install(&engine, &files)
        })
        .await
        .map_err(snap_err)?
        .map_err(snap_err)?;
        tracing::info!(last_log_id = ?meta.last_log_id, attachment = ?staged.attachment, "snapshot installed");
        self.set_current(staged);
        Ok(())
    }

    /// The progress of the snapshot this replica is receiving (shown in its status).
    pub fn receive_progress(&self) -> Arc<ReceiveProgress> {
        self.receiving.clone()
    }

    /// Starts receiving a snapshot into a staged stream (replacing any earlier, abandoned
    /// one). openraft 0.10 leaves the transfer to the application (`network::SnapshotInbox`),
    /// which hands the staged stream to `Raft::install_full_snapshot` once complete.
    pub async fn begin_receiving(&self) -> io::Result<SnapshotData> {
        let staging = Staging::begin(self.engine.clone(), &self.files, self.receiving.clone())
            .await
            .map_err(snap_err)?;
        self.receiving.begin();
        Ok(SnapshotData::File(staging))
    }

    fn set_current(&self, described: Described) {
        *self.current.lock().expect("snapshot lock") = Some(described);
    }
}

/// Builds a snapshot: checkpoints the image and describes the stream of it.
#[derive(Debug)]
pub struct SnapshotBuilder {
    sm: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let engine = self.sm.engine.clone();
        let applied = tokio::task::spawn_blocking(move || engine.checkpoint())
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        let described = match described(&applied)? {
            Some(d) => d,
            None => Described {
                meta: SnapshotMeta {
                    last_log_id: None,
                    last_membership: StoredMembership::default(),
                },
                attachment: applied.attachment,
            },
        };
        tracing::info!(last_log_id = ?described.meta.last_log_id, "snapshot built (image checkpointed)");
        self.sm.set_current(described.clone());
        let stream = LiveStream::new(self.sm.engine.clone(), &described).map_err(snap_err)?;
        Ok(Snapshot { meta: described.meta, snapshot: SnapshotData::Live(stream) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> io::Result<(Option<LogId>, StoredMembership)> {
        let applied = self.engine.applied();
        Ok((applied.log_id.map(from_store_log_id), stored_membership(&applied)?))
    }

    /// Applies in batches of what the stream has ready (at most `APPLY_BATCH_ENTRIES`), each
    /// one image write on the blocking pool, answering each entry once its batch is written.
    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + Send,
    {
        while let Some(first) = entries.next().await {
            let mut batch = vec![first];
            while batch.len() < APPLY_BATCH_ENTRIES {
                match entries.next().now_or_never() {
                    Some(Some(item)) => batch.push(item),
                    _ => break,
                }
            }
            let mut failed = None;
            let mut bodies = Vec::with_capacity(batch.len());
            let mut answers = Vec::with_capacity(batch.len());
            for item in batch {
                match item {
                    Ok((entry, responder)) => {
                        answers.push((entry.log_id.index, responder));
                        bodies.push((to_store_log_id(&entry.log_id), into_entry_body(entry)));
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            // Image writes block: keep them off the runtime's workers, where they would stall
            // the heartbeats and RPCs sharing the worker.
            let engine = self.engine.clone();
            tokio::task::spawn_blocking(move || {
                engine.apply_entries(bodies.iter().map(|(id, body)| (*id, body)))
            })
            .await
            .map_err(sm_err)?
            .map_err(sm_err)?;
            for (index, responder) in answers {
                if let Some(r) = responder {
                    r.send(Response { index });
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> io::Result<()> {
        self.receiving.installing();
        let r = self.install(meta, snapshot).await;
        self.receiving.finished(r.is_ok());
        r
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let Some(described) = self.current.lock().expect("snapshot lock").clone() else {
            return Ok(None);
        };
        let stream = LiveStream::new(self.engine.clone(), &described).map_err(snap_err)?;
        Ok(Some(Snapshot { meta: described.meta, snapshot: SnapshotData::Live(stream) }))
    }
}
