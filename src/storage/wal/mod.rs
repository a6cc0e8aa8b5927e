//! The write-ahead log: ordered appends, group commit, suffix truncation, prefix purge, reads.
//!
//! Write path: `append` checks the indices, queues the entries and makes them readable from
//! memory at once (`written`). One committer at a time takes a bounded batch from the queue,
//! writes it with one aligned write and one data sync, and only then advances `durable`, turns
//! the entries into on-disk locations and runs the callbacks of everything the sync covered.
//! A failed write or sync poisons the engine: nothing queued or later is ever acknowledged.
//!
//! Truncation and purge are records in the same ordered stream (markers), so the log on disk is
//! append-only and recovery replays them in order. Purge waits until its marker is durable, then
//! removes whole segments that hold nothing above the purge point.
//!
//! Rotation switches to a spare segment prepared ahead, off the commit path (`spare`).

mod deliver;
mod log;
mod payload;
mod scan;
mod spare;
mod writer;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use uuid::Uuid;

use deliver::INLINE_CALLBACKS;
pub use log::DiskLoc;
pub use payload::Payload;
pub use scan::{LiveSegment, TailStop};
use spare::{Spare, Spares, Want};
use writer::{marker_payload, PendingOp, Writer};

use super::disk::{AlignedBuf, IO_ALIGN, SECTOR_BYTES};
use super::error::{Result, StorageError};
use super::poison::Poison;
use super::record::{self, Decoded, RecordKind};
use super::segment::{SegmentHeader, SegmentStore, SEGMENT_HEADER_BYTES};
use super::state::LogId;
use super::superblock::MAX_SEGMENT_BYTES;

/// The largest stored payload any record may have: records never span segments, and this is
/// the largest segment the format allows. Decoding is bounded by it; appends by `WalConfig`.
pub const MAX_STORED_BYTES: usize = MAX_SEGMENT_BYTES as usize;

/// Who performs group commits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitMode {
    /// A dedicated thread commits whenever entries are queued (production).
    Thread,
    /// Callers commit inside `flush`/`wait` (deterministic tests and tools).
    Inline,
}

/// Bounds and behaviour of the WAL.
#[derive(Clone, Debug)]
pub struct WalConfig {
    /// Largest entry payload accepted.
    pub max_record_bytes: usize,
    /// Largest batch (uncompressed bytes) one sync covers.
    pub max_batch_bytes: usize,
    /// Most records one sync covers.
    pub max_batch_records: usize,
    /// Queued-but-not-durable bytes beyond which `append` waits (back-pressure).
    pub max_pending_bytes: usize,
    /// lz4-compress entry payloads where that saves space.
    pub compress: bool,
    pub mode: CommitMode,
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            // A 4 MiB proposal of block data (the device's default) with its entry and op
            // headers (16 bytes per op, up to 4096 ops).
            max_record_bytes: (4 << 20) + (128 << 10),
            max_batch_bytes: 4 << 20,
            max_batch_records: 4096,
            max_pending_bytes: 64 << 20,
            compress: true,
            mode: CommitMode::Thread,
        }
    }
}

impl WalConfig {
    /// Checks the bounds against a segment size.
    pub fn validate(&self, segment_bytes: u64) -> Result<()> {
        let room =
            segment_bytes.saturating_sub(SEGMENT_HEADER_BYTES + SECTOR_BYTES as u64) as usize;
        let record = record::padded_record_len(self.max_record_bytes);
        if record > room || self.max_batch_bytes > room || self.max_batch_records == 0 {
            return Err(StorageError::Invalid(format!(
                "WAL bounds (record {}, batch {}) do not fit {segment_bytes}-byte segments",
                self.max_record_bytes, self.max_batch_bytes
            )));
        }
        if self.max_pending_bytes < record {
            return Err(StorageError::Invalid(
                "max_pending_bytes is smaller than one record".into(),
            ));
        }
        Ok(())
    }
}

/// An entry to append.
#[derive(Clone, Debug)]
pub struct NewEntry {
    pub index: u64,
    pub term: u64,
    pub payload: Payload,
}

/// Called once with the outcome of an append: `Ok` only after the entries are durable.
pub type Callback = Box<dyn FnOnce(Result<()>) + Send>;

/// The log's positions. `next` counts everything appended (`written`); `durable_next` only what a
/// completed sync covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogBounds {
    /// First index held (equals `next` when the log is empty).
    pub first: u64,
    /// One past the last index written.
    pub next: u64,
    /// One past the last index known durable.
    pub durable_next: u64,
    pub purged: Option<LogId>,
}

/// Counters since open.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct WalStats {
    pub batches: u64,
    pub records: u64,
    /// Record bytes made durable, counting payloads uncompressed and padded.
    pub bytes: u64,
    /// Entry record bytes as stored (header and payload, compressed where that paid off).
    pub stored_bytes: u64,
    /// Bytes appended and not yet durable (bounded by `max_pending_bytes`).
    pub pending_bytes: u64,
}

/// What recovery did, for logs and `inspect`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WalRecovery {
    pub segments: usize,
    pub records: u64,
    pub tail: TailStop,
    pub discarded: Vec<String>,
    /// The prepared spare kept for the next rotation, if recovery found one.
    pub spare: Option<String>,
}

#[derive(Debug)]
enum Slot {
    Pending { ticket: u64, term: u64, payload: Payload },
    Durable(DiskLoc),
}

struct LogState {
    segs: VecDeque<LiveSegment>,
    first: u64,
    next: u64,
    durable_next: u64,
    purged: Option<LogId>,
    slots: VecDeque<Slot>,
    pending: VecDeque<PendingOp>,
    pending_bytes: usize,
    next_ticket: u64,
    durable_ticket: u64,
    callbacks: VecDeque<(u64, Callback)>,
    /// The commit thread sleeps on `work`: only then does queueing an op wake it (a wake-up is
    /// a futex system call, which every append made, the committer asleep or not).
    committer_idle: bool,
    /// Appends are refused; the committer commits what is queued and stops.
    shutdown: bool,
    /// Nothing more will be committed: every callback left is delivered now.
    closed: bool,
    /// Callbacks are being run outside the lock; nobody takes more until they are done.
    delivering: bool,
}

struct Shared {
    cfg: WalConfig,
    store: Arc<dyn SegmentStore>,
    poison: Arc<Poison>,
    state: Mutex<LogState>,
    work: Condvar,
    done: Condvar,
    /// Wakes the delivery thread (`deliver.rs`).
    deliver: Condvar,
    writer: Mutex<Writer>,
    spares: Spares,
    batches: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    stored_bytes: AtomicU64,
}

/// The write-ahead log of one replica.
pub struct Wal {
    shared: Arc<Shared>,
    threads: Mutex<Threads>,
}

/// The WAL's threads in `CommitMode::Thread`: the committer, the spare preparer and the
/// callback deliverer.
#[derive(Default)]
struct Threads {
    commit: Option<JoinHandle<()>>,
    spare: Option<JoinHandle<()>>,
    deliver: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").field("bounds", &self.bounds()).finish()
    }
}

impl Wal {
    /// Creates the first segment of a new log whose first entry will be `first_index`.
    pub fn format(
        store: &dyn SegmentStore,
        device_uuid: Uuid,
        segment_bytes: u64,
        first_index: u64,
    ) -> Result<()> {
        let place = store.allocate(1, &HashSet::new())?;
        let header = SegmentHeader::new(device_uuid, 1, first_index, 0, segment_bytes, None);
        Writer::init_segment(store, place, header)?;
        Ok(())
    }

    /// Recovers the log from `store` and starts accepting appends.
    pub fn open(
        store: Arc<dyn SegmentStore>,
        device_uuid: Uuid,
        cfg: WalConfig,
        poison: Arc<Poison>,
    ) -> Result<(Wal, WalRecovery)> {
        // Records are bounded on disk by their segment, not by today's append limit, which may
        // have been larger when they were written.
        let rec = scan::recover(&*store, device_uuid, MAX_STORED_BYTES, true)?;
        let mut segs: VecDeque<LiveSegment> = rec.segments.into();
        let mut report = WalRecovery {
            segments: segs.len(),
            records: rec.records,
            tail: rec.tail.clone(),
            discarded: rec.discarded,
            spare: None,
        };
        let log = rec.log;
        finish_purge(&*store, &mut segs, log.purged)?;
        let tail =
            segs.back().cloned().ok_or_else(|| StorageError::Foreign("no WAL segment".into()))?;
        let ready = keep_spare(&*store, rec.spares, tail.header.seq + 1, &mut report)?;
        let mut writer = Writer {
            device_uuid,
            active: writer::ActiveSegment { place: tail.place.clone(), header: tail.header },
            header_pending: false,
            write_pos: SEGMENT_HEADER_BYTES,
            tail: AlignedBuf::zeroed(IO_ALIGN),
            next_index: log.next,
            purged: log.purged,
            compress: cfg.compress,
            seal_at: None,
            batch_buf: None,
        };
        if rec.tail_has_records {
            // Never append behind a possibly torn tail: the first batch starts a new segment that
            // seals this one where its valid records end. Deferred, so that a store whose WAL
            // region is full still opens (and can checkpoint and purge).
            writer.write_pos = tail.header.segment_bytes;
            writer.seal_at = Some(rec.tail.offset);
        } else {
            // An empty tail is reused under a fresh salt, so nothing left in it can ever validate.
            let header = writer.next_header(tail.header.seq, tail.header.prev_sealed);
            writer.active = Writer::init_segment(&*store, tail.place.clone(), header)?;
            if let Some(last) = segs.back_mut() {
                last.header = header;
            }
        }
        let want = Want {
            seq: writer.active.header.seq + 1,
            live: segs.iter().map(|s| s.place.id).collect(),
        };
        let spares =
            Spares::new(store.clone(), device_uuid, tail.header.segment_bytes, ready, want);
        let state = LogState {
            segs,
            first: log.first(),
            next: log.next,
            durable_next: log.next,
            purged: log.purged,
            slots: log.entries.iter().map(|&loc| Slot::Durable(loc)).collect(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            next_ticket: 1,
            durable_ticket: 0,
            callbacks: VecDeque::new(),
            committer_idle: false,
            shutdown: false,
            closed: false,
            delivering: false,
        };
        let shared = Arc::new(Shared {
            cfg,
            store,
            poison,
            state: Mutex::new(state),
            work: Condvar::new(),
            done: Condvar::new(),
            deliver: Condvar::new(),
            writer: Mutex::new(writer),
            spares,
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            stored_bytes: AtomicU64::new(0),
        });
        let wal = Wal { shared, threads: Mutex::new(Threads::default()) };
        if wal.shared.cfg.mode == CommitMode::Thread {
            // On an error, dropping `wal` closes it, which stops the threads already started.
            let spare = wal.spawn("xdevice-wal-spare", |s| s.spares.run(&s.poison))?;
            wal.threads.lock().expect("wal threads lock").spare = Some(spare);
            let deliver = wal.spawn("xdevice-wal-cb", |s| s.deliver_loop())?;
            wal.threads.lock().expect("wal threads lock").deliver = Some(deliver);
            let commit = wal.spawn("xdevice-wal", |s| s.commit_loop())?;
            wal.threads.lock().expect("wal threads lock").commit = Some(commit);
        }
        Ok((wal, report))
    }

    fn spawn(&self, name: &str, body: fn(&Shared)) -> Result<JoinHandle<()>> {
        let shared = self.shared.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(&shared))
            .map_err(|e| StorageError::io("spawn WAL thread", name, e))
    }

    /// Queues `entries` (consecutive, starting at the log's next index). They are readable when
    /// this returns; the returned ticket becomes durable later (`wait`, `flush`).
    pub fn append(&self, entries: Vec<NewEntry>) -> Result<u64> {
        self.shared.append(entries, None)
    }

    /// Like `append`; `callback` runs once the entries are durable (or with the error that
    /// prevents it). It runs on the committing thread and must not block on this WAL.
    pub fn append_with(&self, entries: Vec<NewEntry>, callback: Callback) -> Result<u64> {
        self.shared.append(entries, Some(callback))
    }

    /// Waits until everything up to `ticket` is durable.
    pub fn wait(&self, ticket: u64) -> Result<()> {
        self.shared.wait(ticket)
    }

    /// Waits until everything queued so far is durable.
    pub fn flush(&self) -> Result<()> {
        let ticket = self.shared.lock().next_ticket - 1;
        self.shared.wait(ticket)
    }

    /// Removes entries at `from` and above (a Raft conflict). Visible at once; durable in order
    /// with everything queued after it.
    pub fn truncate(&self, from: u64) -> Result<u64> {
        self.shared.truncate(from)
    }

    /// Purges entries up to and including `upto`, durably, then frees whole segments.
    pub fn purge(&self, upto: LogId) -> Result<()> {
        self.shared.purge(upto)
    }

    /// The payload of entry `index`.
    pub fn read(&self, index: u64) -> Result<Vec<u8>> {
        self.shared.read(index)
    }

    /// The term of entry `index`, without reading it.
    pub fn term(&self, index: u64) -> Result<u64> {
        let st = self.shared.lock();
        match st.slot(index)? {
            Slot::Pending { term, .. } => Ok(*term),
            Slot::Durable(loc) => Ok(loc.term),
        }
    }

    /// The largest entry payload `append` accepts.
    pub fn max_record_bytes(&self) -> usize {
        self.shared.cfg.max_record_bytes
    }

    pub fn bounds(&self) -> LogBounds {
        let st = self.shared.lock();
        LogBounds {
            first: st.first,
            next: st.next,
            durable_next: st.durable_next,
            purged: st.purged,
        }
    }

    pub fn stats(&self) -> WalStats {
        WalStats {
            batches: self.shared.batches.load(Ordering::Relaxed),
            records: self.shared.records.load(Ordering::Relaxed),
            bytes: self.shared.bytes.load(Ordering::Relaxed),
            stored_bytes: self.shared.stored_bytes.load(Ordering::Relaxed),
            pending_bytes: self.shared.state.lock().expect("wal lock").pending_bytes as u64,
        }
    }

    /// The live segments, oldest first.
    pub fn segments(&self) -> Vec<LiveSegment> {
        self.shared.lock().segs.iter().cloned().collect()
    }

    /// Commits everything queued, delivers every callback and stops the WAL's threads.
    pub fn close(&self) -> Result<()> {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        let mut threads = self.threads.lock().expect("wal threads lock");
        let commit = join(threads.commit.take(), "writer");
        while self.shared.commit_next() {}
        self.shared.spares.shutdown();
        let spare = join(threads.spare.take(), "spare preparer");
        self.shared.lock().closed = true;
        self.shared.deliver.notify_all();
        let deliver = join(threads.deliver.take(), "callback");
        // Inline (or if the delivery thread died): whatever is left is delivered here.
        let left = self.shared.lock().take_all(self.shared.poison.check().is_err());
        left.run(&self.shared);
        commit.and(spare).and(deliver)?;
        self.shared.poison.check()
    }

    /// The prepared spare's name, if one is ready for the next rotation.
    pub fn spare(&self) -> Option<String> {
        self.shared.spares.ready().map(|(name, _)| name)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "WAL closed with an error");
        }
    }
}

/// Joins a WAL thread, if it was started.
fn join(handle: Option<JoinHandle<()>>, name: &str) -> Result<()> {
    match handle.map(JoinHandle::join) {
        Some(Err(_)) => Err(StorageError::Invalid(format!("WAL {name} thread panicked"))),
        _ => Ok(()),
    }
}

/// A read-only look at a log: what recovery would find, without repairing anything.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LogSummary {
    pub segments: Vec<SegmentSummary>,
    pub first: u64,
    pub next: u64,
    pub purged: Option<LogId>,
    pub records: u64,
    pub tail: TailStop,
    pub discarded: Vec<String>,
    /// Prepared spares (never part of the chain), by name.
    pub spares: Vec<String>,
}

/// One live segment as `inspect` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SegmentSummary {
    pub name: String,
    pub seq: u64,
    pub first_index: u64,
    pub max_index: Option<u64>,
    pub prev_sealed: u64,
}

/// Scans the log in `store` without writing anything.
pub fn inspect(store: &dyn SegmentStore, device_uuid: Uuid) -> Result<LogSummary> {
    let rec = scan::recover(store, device_uuid, MAX_STORED_BYTES, false)?;
    let segments = rec
        .segments
        .iter()
        .map(|s| SegmentSummary {
            name: s.place.name.clone(),
            seq: s.header.seq,
            first_index: s.header.first_index,
            max_index: s.max_index,
            prev_sealed: s.header.prev_sealed,
        })
        .collect();
    Ok(LogSummary {
        segments,
        first: rec.log.first(),
        next: rec.log.next,
        purged: rec.log.purged,
        records: rec.records,
        tail: rec.tail,
        discarded: rec.discarded,
        spares: rec
            .spares
            .iter()
            .map(|(place, h)| format!("{} (prepared for seq {})", place.name, h.seq))
            .collect(),
    })
}

/// Keeps the spare prepared for `seq` (the next rotation's), if recovery found one, and removes
/// every other: a spare is only ever used for the seq it was prepared for.
fn keep_spare(
    store: &dyn SegmentStore,
    spares: Vec<(super::segment::SegmentPlace, super::segment::SpareHeader)>,
    seq: u64,
    report: &mut WalRecovery,
) -> Result<Option<Spare>> {
    let mut kept = None;
    let mut released = false;
    for (place, header) in spares {
        if kept.is_none() && header.seq == seq {
            report.spare = Some(place.name.clone());
            kept = Some(Spare { place, seq });
            continue;
        }
        report
            .discarded
            .push(format!("{} (spare for seq {}, not the next; removed)", place.name, header.seq));
        store.release(&place)?;
        released = true;
    }
    if released {
        store.sync()?;
    }
    Ok(kept)
}

/// Removes leading segments that hold nothing above the purge point (an interrupted purge).
fn finish_purge(
    store: &dyn SegmentStore,
    segs: &mut VecDeque<LiveSegment>,
    purged: Option<LogId>,
) -> Result<()> {
    let Some(purged) = purged else { return Ok(()) };
    let mut released = false;
    while segs.len() > 1 && segs[0].max_index.is_none_or(|m| m <= purged.index) {
        if let Some(seg) = segs.pop_front() {
            store.release(&seg.place)?;
            released = true;
        }
    }
    if released {
        store.sync()?;
    }
    Ok(())
}

impl LogState {
    fn slot(&self, index: u64) -> Result<&Slot> {
        if index < self.first || index >= self.next {
            return Err(StorageError::Invalid(format!(
                "log index {index} is not held (log holds [{}, {}))",
                self.first, self.next
            )));
        }
        Ok(&self.slots[(index - self.first) as usize])
    }

    fn take_batch(&mut self, cfg: &WalConfig) -> Vec<PendingOp> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(op) = self.pending.front() {
            let size = op.disk_bytes();
            if !batch.is_empty()
                && (batch.len() >= cfg.max_batch_records || bytes + size > cfg.max_batch_bytes)
            {
                break;
            }
            bytes += size;
            if let Some(op) = self.pending.pop_front() {
                batch.push(op);
            }
        }
        batch
    }

    fn push_op(&mut self, kind: RecordKind, index: u64, term: u64, payload: Payload) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let op = PendingOp { ticket, kind, index, term, payload };
        self.pending_bytes += op.disk_bytes();
        self.pending.push_back(op);
        ticket
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().expect("wal state lock")
    }

    fn append(&self, entries: Vec<NewEntry>, callback: Option<Callback>) -> Result<u64> {
        self.poison.check()?;
        let mut st = self.lock();
        if st.shutdown {
            return Err(StorageError::Invalid("WAL is closed".into()));
        }
        for (i, e) in entries.iter().enumerate() {
            if e.index != st.next + i as u64 {
                return Err(StorageError::Invalid(format!(
                    "append of index {} where the log expects {}",
                    e.index,
                    st.next + i as u64
                )));
            }
            if e.payload.len() > self.cfg.max_record_bytes {
                return Err(StorageError::Invalid(format!(
                    "entry {} of {} bytes exceeds the {}-byte record limit",
                    e.index,
                    e.payload.len(),
                    self.cfg.max_record_bytes
                )));
            }
        }
        st = self.wait_for_room(st)?;
        for e in entries {
            let ticket = st.push_op(RecordKind::Entry, e.index, e.term, e.payload.clone());
            st.slots.push_back(Slot::Pending { ticket, term: e.term, payload: e.payload });
            st.next += 1;
        }
        let ticket = st.next_ticket - 1;
        if let Some(cb) = callback {
            if st.durable_ticket >= ticket && self.cfg.mode == CommitMode::Inline {
                drop(st);
                cb(Ok(()));
                return Ok(ticket);
            }
            // With the delivery thread, even an already durable ticket's callback goes through
            // it, so callbacks still run in ticket order.
            if st.durable_ticket >= ticket {
                st.callbacks.push_back((ticket, cb));
                drop(st);
                self.deliver.notify_one();
                return Ok(ticket);
            }
            st.callbacks.push_back((ticket, cb));
        }
        self.wake_committer(st);
        Ok(ticket)
    }

    /// Wakes the commit thread if it sleeps, after releasing the state lock.
    fn wake_committer(&self, st: MutexGuard<'_, LogState>) {
        let idle = st.committer_idle;
        drop(st);
        if idle {
            self.work.notify_one();
        }
    }

    /// Back-pressure: waits (or, inline, commits) while too many bytes are queued.
    fn wait_for_room<'a>(
        &'a self,
        mut st: MutexGuard<'a, LogState>,
    ) -> Result<MutexGuard<'a, LogState>> {
        while st.pending_bytes > self.cfg.max_pending_bytes {
            self.poison.check()?;
            match self.cfg.mode {
                CommitMode::Thread => st = self.done.wait(st).expect("wal state lock"),
                CommitMode::Inline => {
                    drop(st);
                    self.commit_next();
                    st = self.lock();
                }
            }
        }
        Ok(st)
    }

    fn wait(&self, ticket: u64) -> Result<()> {
        let mut st = self.lock();
        loop {
            // A poisoned engine acknowledges nothing, not even what was durable before.
            self.poison.check()?;
            if st.durable_ticket >= ticket {
                return Ok(());
            }
            match self.cfg.mode {
                CommitMode::Thread => st = self.done.wait(st).expect("wal state lock"),
                CommitMode::Inline => {
                    drop(st);
                    self.commit_next();
                    st = self.lock();
                }
            }
        }
    }

    fn truncate(&self, from: u64) -> Result<u64> {
        self.poison.check()?;
        let mut st = self.lock();
        if from < st.first || from > st.next {
            return Err(StorageError::Invalid(format!(
                "truncate at {from} outside the log [{}, {}]",
                st.first, st.next
            )));
        }
        let keep = (from - st.first) as usize;
        st.slots.truncate(keep);
        st.next = from;
        let ticket = st.push_op(RecordKind::Truncate, from, 0, Payload::default());
        self.wake_committer(st);
        Ok(ticket)
    }

    fn purge(&self, upto: LogId) -> Result<()> {
        self.poison.check()?;
        let ticket = {
            let mut st = self.lock();
            if st.purged.is_some_and(|p| p.index >= upto.index) {
                return Ok(());
            }
            let drop_n = (upto.index + 1).saturating_sub(st.first).min(st.slots.len() as u64);
            st.slots.drain(..drop_n as usize);
            st.first = (upto.index + 1).max(st.first);
            st.next = st.next.max(st.first);
            st.purged = Some(upto);
            let ticket =
                st.push_op(RecordKind::Purge, upto.index, upto.term, marker_payload(upto.node));
            self.wake_committer(st);
            ticket
        };
        self.wait(ticket)?;
        let released: Vec<LiveSegment> = {
            let mut st = self.lock();
            let mut out = Vec::new();
            while st.segs.len() > 1 && st.segs[0].max_index.is_none_or(|m| m <= upto.index) {
                out.extend(st.segs.pop_front());
            }
            out
        };
        for seg in &released {
            self.store.release(&seg.place)?;
        }
        if !released.is_empty() {
            self.store.sync()?;
        }
        Ok(())
    }

    fn read(&self, index: u64) -> Result<Vec<u8>> {
        let (loc, disk, salt, name) = {
            let st = self.lock();
            let loc = match st.slot(index)? {
                Slot::Pending { payload, .. } => return Ok(payload.to_vec()),
                Slot::Durable(loc) => *loc,
            };
            let seg = st.segs.iter().find(|s| s.header.seq == loc.seg_seq).ok_or_else(|| {
                StorageError::Invalid(format!("segment {} of entry {index} is gone", loc.seg_seq))
            })?;
            (loc, seg.place.disk.clone(), seg.header.salt, seg.place.name.clone())
        };
        let start = loc.offset - loc.offset % IO_ALIGN as u64;
        let end = (loc.offset + loc.len as u64).next_multiple_of(IO_ALIGN as u64);
        let mut buf = AlignedBuf::zeroed((end - start) as usize);
        let at = format!("{name} offset {}", loc.offset);
        disk.read_at(start, &mut buf).map_err(|e| StorageError::io("read WAL record", &at, e))?;
        let bytes = &buf[(loc.offset - start) as usize..];
        let header = match record::decode(bytes, record::salt_seed(salt), MAX_STORED_BYTES) {
            Decoded::Record(h) if h.index == index && h.kind == RecordKind::Entry => h,
            Decoded::Record(h) => {
                return Err(StorageError::corrupt(
                    "WAL record",
                    at,
                    format!("holds index {} where {index} belongs", h.index),
                ))
            }
            Decoded::Invalid(reason) => {
                return Err(StorageError::corrupt("WAL record", at, reason))
            }
            other => return Err(StorageError::corrupt("WAL record", at, format!("{other:?}"))),
        };
        let max_raw = MAX_STORED_BYTES;
        record::payload(&header, bytes, max_raw)
            .map_err(|r| StorageError::corrupt("WAL record", at, r))
    }

    fn commit_loop(&self) {
        loop {
            {
                let mut st = self.lock();
                while st.pending.is_empty() && !st.shutdown {
                    st.committer_idle = true;
                    st = self.work.wait(st).expect("wal state lock");
                    st.committer_idle = false;
                }
                if st.pending.is_empty() && st.shutdown {
                    return;
                }
            }
            self.commit_next();
        }
    }

    /// Takes one batch and commits it. Returns false when nothing was queued.
    fn commit_next(&self) -> bool {
        let mut writer = self.writer.lock().expect("wal writer lock");
        let batch = {
            let mut st = self.lock();
            if st.pending.is_empty() {
                return false;
            }
            st.take_batch(&self.cfg)
        };
        let result = match self.poison.check() {
            Err(e) => Err(e),
            Ok(()) => writer.write_batch(&batch, |seq| {
                let live = self.lock().segs.iter().map(|s| s.place.id).collect();
                self.spares.take(seq, live)
            }),
        };
        let batch_bytes: usize = batch.iter().map(PendingOp::disk_bytes).sum();
        let mut st = self.lock();
        st.pending_bytes -= batch_bytes;
        match result {
            Ok((placed, rotated)) => {
                if let Some(r) = rotated {
                    st.segs.push_back(LiveSegment {
                        place: r.place,
                        header: r.header,
                        max_index: None,
                    });
                }
                self.publish(&mut st, &placed);
                st.durable_ticket = batch.last().map_or(st.durable_ticket, |op| op.ticket);
                st.durable_next = writer.next_index;
                self.batches.fetch_add(1, Ordering::Relaxed);
                self.records.fetch_add(batch.len() as u64, Ordering::Relaxed);
                self.bytes.fetch_add(batch_bytes as u64, Ordering::Relaxed);
                let stored: u64 = placed.iter().map(|p| u64::from(p.loc.len)).sum();
                self.stored_bytes.fetch_add(stored, Ordering::Relaxed);
            }
            Err(e) => {
                if !matches!(e, StorageError::Poisoned { .. }) {
                    self.poison.set(&e);
                }
            }
        }
        // A few callbacks run here; more go to the delivery thread (see `deliver.rs`).
        let poisoned = self.poison.check().is_err();
        let inline = self.cfg.mode == CommitMode::Inline
            || (!st.delivering && st.deliverable(poisoned, INLINE_CALLBACKS) <= INLINE_CALLBACKS);
        let ready = inline.then(|| st.take_deliverable(poisoned)).filter(|r| !r.is_empty());
        st.delivering |= ready.is_some();
        drop(st);
        drop(writer);
        self.done.notify_all();
        match ready {
            Some(ready) => {
                ready.run(self);
                self.finish_delivering();
            }
            None if !inline => self.deliver.notify_one(),
            None => {}
        }
        if self.cfg.mode == CommitMode::Inline {
            // Between batches, with no lock held: the next rotation finds its spare ready.
            self.spares.step(&self.poison);
        }
        true
    }

    /// Turns the written entries' slots into disk locations (unless truncated or replaced since).
    fn publish(&self, st: &mut LogState, placed: &[writer::Placed]) {
        for p in placed {
            if let Some(seg) = st.segs.iter_mut().rev().find(|s| s.header.seq == p.loc.seg_seq) {
                seg.max_index = Some(seg.max_index.map_or(p.index, |m| m.max(p.index)));
            }
            if p.index < st.first || p.index >= st.next {
                continue;
            }
            let i = (p.index - st.first) as usize;
            if matches!(st.slots[i], Slot::Pending { ticket, .. } if ticket == p.ticket) {
                st.slots[i] = Slot::Durable(p.loc);
            }
        }
    }
}
