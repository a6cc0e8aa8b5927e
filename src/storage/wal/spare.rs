//! The WAL's prepared spare: the next segment, made ready off the commit path so that rotation
//! only switches to it. Making a segment (allocating it and, in a data directory, zero-filling a
//! 64 MiB file, then syncing it and the directory) takes tens of milliseconds; done inside a
//! commit, every append queued behind the rotation waits that long.
//!
//! A spare is durable before it is ever used: its place allocated (filled where the store fills),
//! its spare header (`segment::SpareHeader`, a magic of its own) written and synced, and the
//! allocation synced (the directory entry, or the raw device). Recovery tells it from the chain
//! by that header: it is kept as the next spare or removed, never scanned for records.
//!
//! Who prepares: the `xdevice-wal-spare` thread (`CommitMode::Thread`), or the committer after a
//! batch (`CommitMode::Inline`). Rotation takes the ready spare; if none is ready it waits for a
//! preparation in progress, or prepares one itself, so two preparations never run at once and a
//! raw slot is never handed out twice. This module never writes to a place in the chain.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use uuid::Uuid;

use crate::storage::error::{Result, StorageError};
use crate::storage::poison::Poison;
use crate::storage::segment::{SegmentPlace, SegmentStore, SpareHeader};

/// A prepared spare: durable, allocated for segment `seq`, not in the chain.
#[derive(Debug)]
pub struct Spare {
    pub place: SegmentPlace,
    pub seq: u64,
}

/// What the next preparation makes: a spare for `seq`, on no place in `live` (store ids). A
/// stale `live` is safe: places only leave the chain behind the writer's back (purge), and only
/// rotation, which requests the next spare, adds one.
#[derive(Debug)]
pub struct Want {
    pub seq: u64,
    pub live: HashSet<u64>,
}

#[derive(Debug, Default)]
struct SpareState {
    ready: Option<Spare>,
    want: Option<Want>,
    /// A preparation runs outside the lock.
    busy: bool,
    shutdown: bool,
}

/// The spare and the request for the next one.
#[derive(Debug)]
pub struct Spares {
    store: Arc<dyn SegmentStore>,
    device_uuid: Uuid,
    segment_bytes: u64,
    state: Mutex<SpareState>,
    changed: Condvar,
}

impl Spares {
    /// Starts with `ready` (a spare recovery kept) and, if there is none, a request for `want`.
    pub fn new(
        store: Arc<dyn SegmentStore>,
        device_uuid: Uuid,
        segment_bytes: u64,
        ready: Option<Spare>,
        want: Want,
    ) -> Spares {
        let want = ready.is_none().then_some(want);
        let state = SpareState { ready, want, busy: false, shutdown: false };
        Spares {
            store,
            device_uuid,
            segment_bytes,
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SpareState> {
        self.state.lock().expect("wal spare lock")
    }

    /// For rotation to segment `seq`: the ready spare, or one prepared now (after waiting for a
    /// preparation in progress). Requests the next spare, for `seq + 1`, avoiding `live` and the
    /// place taken. An error here fails the batch that rotates, which poisons the engine.
    pub fn take(&self, seq: u64, live: HashSet<u64>) -> Result<Spare> {
        let mut st = self.lock();
        while st.busy {
            st = self.changed.wait(st).expect("wal spare lock");
        }
        st.want = None;
        let ready = st.ready.take();
        drop(st);
        let spare = match ready {
            Some(spare) if spare.seq == seq => spare,
            stale => {
                if let Some(stale) = stale {
                    // Not reachable through the writer (it asks for the seq it requested), but a
                    // spare for another seq must not be used: its directory name says that seq.
                    self.store.release(&stale.place)?;
                    self.store.sync()?;
                }
                tracing::debug!(seq, "no spare WAL segment ready; preparing one inside the commit");
                self.prepare(seq, &live)?
            }
        };
        let mut live = live;
        live.insert(spare.place.id);
        self.lock().want = Some(Want { seq: seq + 1, live });
        self.changed.notify_all();
        Ok(spare)
    }

    /// Prepares the requested spare, if one is requested and none is being prepared. Returns
    /// false when there was nothing to do. A store without room (every raw slot live) leaves no
    /// spare and no poison: rotation tries again and fails as it would have without spares. Any
    /// other failure poisons the engine.
    pub fn step(&self, poison: &Poison) -> bool {
        let want = {
            let mut st = self.lock();
            if st.busy || st.ready.is_some() || st.shutdown || poison.check().is_err() {
                return false;
            }
            let Some(want) = st.want.take() else { return false };
            // In the same critical section as taking the request, so that `take` never sees
            // neither a request nor a preparation and prepares the same place a second time.
            st.busy = true;
            want
        };
        let result = self.prepare(want.seq, &want.live);
        let mut st = self.lock();
        st.busy = false;
        match result {
            Ok(spare) => st.ready = Some(spare),
            Err(StorageError::NoSpace(reason)) => {
                tracing::debug!(%reason, "no room for a spare WAL segment");
            }
            Err(e) => {
                poison.set(&e);
            }
        }
        drop(st);
        self.changed.notify_all();
        true
    }

    /// The preparing thread's loop: prepares whenever a spare is requested, until `shutdown`.
    pub fn run(&self, poison: &Poison) {
        loop {
            if self.step(poison) {
                continue;
            }
            let st = self.lock();
            if st.shutdown {
                return;
            }
            let idle =
                st.busy || st.ready.is_some() || st.want.is_none() || poison.check().is_err();
            if idle {
                drop(self.changed.wait(st).expect("wal spare lock"));
            }
        }
    }

    /// Stops `run` after the preparation in progress, if any.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.changed.notify_all();
    }

    /// The ready spare's name and seq, for reports.
    pub fn ready(&self) -> Option<(String, u64)> {
        self.lock().ready.as_ref().map(|s| (s.place.name.clone(), s.seq))
    }

    /// Allocates a place for `seq`, writes and syncs its spare header, and syncs the allocation.
    fn prepare(&self, seq: u64, live: &HashSet<u64>) -> Result<Spare> {
        let place = self.store.allocate(seq, live)?;
        let header = SpareHeader::new(self.device_uuid, seq, self.segment_bytes);
        place
            .disk
            .write_and_sync(0, &header.encode())
            .map_err(|e| StorageError::io("write spare segment header", &place.name, e))?;
        self.store.sync()?;
        tracing::debug!(seq, place = %place.name, "spare WAL segment prepared");
        Ok(Spare { place, seq })
    }
}
