//! The device API for the layers above (the ublk frontend, tests, benchmarks): `write`, `flush`,
//! `read` and `discard` on a replicated block image, with the durability contract of
//! `docs/durability.md`:
//!
//! - writeback: a write completes once the leader has accepted it into its log; FLUSH (and a
//!   write with FUA) completes once every write completed before it is committed on a majority.
//!   When every replica lives in this process (the embedded mode), acceptance dies with the
//!   process, so a write completes once committed: a daemon crash then loses no completed
//!   write, and a FLUSH reissued to the next daemon is truthful.
//! - writethrough: every write completes once committed on a majority.
//!
//! Writes go through one ordered pipeline: queued in submission order, merged into proposals
//! (bounded in bytes and count), and handed to the leader in that order. Until a write is
//! committed and everything before it is too, its blocks stay pinned in the hot cache
//! (`crate::cache`), which reads consult first, so a read always returns the latest completed
//! write; then they stay as clean blocks until evicted. Reads that miss go to a replica's image
//! (checksum verified, a bad block fetched from another replica) and fill the cache; a
//! sequential reader gets the next blocks read ahead. If a proposal fails (leader lost,
//! timeout), every unconfirmed write is proposed again, in order, to the next leader: block
//! writes are idempotent, so replaying the suffix in order ends in the same image, and a flush
//! never completes while a write before it is unconfirmed.

pub mod local;
pub mod member;
pub mod pipeline;
pub mod readers;
pub mod remote;

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;

use crate::cache::{CacheStats, HotCache, Lookup};
use crate::entry::BlockOp;
use crate::replication::types::Request;
use pipeline::{Limits, Need, Pipeline, Ready};

pub use crate::replication::commits::OnCommit;
pub use crate::replication::network::BoxFuture;

/// What the device needs from a cluster.
pub trait Cluster: Send + Sync + 'static {
    /// Hands `req` to the leader, in call order: the device calls it again only once the
    /// future it returned has resolved. Resolves once the leader has accepted it; `on_commit`
    /// then runs once, with its log index when it is committed (held durably by a majority; not
    /// necessarily applied yet) or with why it will not be, from whichever thread learns it.
    /// An error means it was not accepted, and `on_commit` never runs.
    ///
    /// The device polls the future once on the submitting thread (a ublk queue thread, inside
    /// the device's runtime context) and awaits it in a task only if that poll did not finish:
    /// a cluster that can hand a proposal over without waiting should do so on the first poll.
    fn submit(self: Arc<Self>, req: Request, on_commit: OnCommit) -> BoxFuture<Result<(), String>>;
    /// Whether a proposal the leader has accepted (not yet committed) still commits if this
    /// process dies. When false (every replica in this process; or a remote leader, where a
    /// proposal counts as accepted once queued on the connection), a writeback write completes
    /// only once committed, or a daemon crash would lose completed writes and a FLUSH the kernel
    /// reissues to the next daemon would succeed without them.
    fn acceptance_outlives_process(&self) -> bool;
    /// Reads `blocks` blocks at `lba` from a replica that has applied at least log index
    /// `applied_at_least` (the newest commit this device has confirmed; blocks of writes not
    /// yet confirmed are read from the device's cache instead). Every block is checksum
    /// verified; one that fails is taken from another replica (and the bad copy repaired) or,
    /// if no replica has a good copy, the read fails. Never wrong data.
    fn read(
        self: Arc<Self>,
        lba: u64,
        blocks: u64,
        applied_at_least: u64,
    ) -> BoxFuture<Result<ReadOutcome, String>>;
    /// Whether this device may answer requests now. `Lost` once its attachment is lost
    /// (`member::Member`: another member may serve the device, so this one's cache may be stale
    /// and its writes are refused): always `Lost` from then on, and the device fails every
    /// waiting and later request (`Device::fence`). `Lapsed` while it cannot tell (its lease
    /// ran out, nothing says another member attached): requests that need the attachment wait
    /// for `reconfirm`. Called on every request, on the request's thread: it must not block.
    /// Clusters without attachments are always serving.
    fn serving(&self) -> Result<(), NotServing> {
        Ok(())
    }
    /// Waits until `serving` is Ok again, or Err (why) once the lapse became a loss: bounded by
    /// the cluster's hold on a lapse.
    fn reconfirm(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Why a device may not answer a request now (`Cluster::serving`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotServing {
    /// For now: `Cluster::reconfirm` decides. Writes are admitted (they are proposed only once
    /// the attachment is confirmed); reads and flushes wait.
    Lapsed(String),
    /// For good.
    Lost(String),
}

impl std::fmt::Display for NotServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotServing::Lapsed(why) | NotServing::Lost(why) => f.write_str(why),
        }
    }
}

/// What `Device::gate` lets a request do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    Open,
    /// The attachment awaits reconfirmation: nothing may be answered from this side alone.
    Lapsed,
}

/// A replica read's data, and what it met on the way.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub data: Vec<u8>,
    /// Blocks that failed their checksum on the replica read first.
    pub corrupt_blocks: u64,
    /// Of those, blocks rewritten on that replica from a good copy.
    pub repaired_blocks: u64,
}

impl ReadOutcome {
    pub fn clean(data: Vec<u8>) -> ReadOutcome {
        ReadOutcome { data, corrupt_blocks: 0, repaired_blocks: 0 }
    }
}

/// When a write completes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    Writeback,
    Writethrough,
}

/// Device shape and limits.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub block_bytes: u32,
    pub blocks: u64,
    pub mode: CacheMode,
    /// Largest proposal: writes are merged up to this many bytes.
    pub max_proposal_bytes: usize,
    /// Writers wait while this many bytes are unconfirmed (at most `cache_bytes`: unconfirmed
    /// blocks are pinned in the cache).
    pub max_unconfirmed_bytes: usize,
    /// The hot cache's size (`crate::cache`).
    pub cache_bytes: u64,
    /// The largest read-ahead window for a sequential reader; 0 turns read-ahead off.
    pub readahead_bytes: u64,
    /// A flush or write still unconfirmed after this long fails with EIO (it stays queued).
    pub io_timeout: Duration,
    /// Proposals handed to the leader and not yet committed. While this many are out, new
    /// writes queue and merge into the next proposal: group commit at the device, so many
    /// concurrent small writes become few log entries.
    pub max_inflight_proposals: usize,
}

impl DeviceConfig {
    pub fn new(block_bytes: u32, blocks: u64, mode: CacheMode) -> DeviceConfig {
        DeviceConfig {
            block_bytes,
            blocks,
            mode,
            max_proposal_bytes: 4 << 20,
            max_unconfirmed_bytes: 64 << 20,
            cache_bytes: crate::cache::DEFAULT_CACHE_BYTES,
            readahead_bytes: crate::cache::DEFAULT_READAHEAD_BYTES,
            io_timeout: Duration::from_secs(30),
            max_inflight_proposals: 4,
        }
    }
}

/// Why a request failed, with the errno a block device reports.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("request [{offset}, +{len}) is beyond the {size}-byte device")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request at byte {offset} of {len} bytes is not aligned to {block} bytes")]
    Misaligned { offset: u64, len: u64, block: u32 },
    #[error("not committed within {0:?} (the cluster has no working majority?)")]
    Timeout(Duration),
    #[error("read failed: {0}")]
    Read(String),
    #[error("device is shut down")]
    Closed,
    #[error("this server lost the device's attachment: {0}")]
    Fenced(String),
}

/// What completes a request: the frontend's answer, or an async caller's channel. Run after the
/// device's lock is released.
pub type Completion = Box<dyn FnOnce(Result<(), DeviceError>) + Send>;

struct Inner {
    /// Ordering, batching, resubmission and waiting requests (pure; `pipeline.rs`).
    pipe: Pipeline<Completion>,
    hand_off: HandOff,
    /// Unconfirmed writes pinned, recent and hot blocks clean.
    cache: HotCache,
    readahead: ReadAhead,
    stats: DeviceStats,
}

/// Who hands proposals to the cluster now (`Device::pump`).
#[derive(Debug)]
struct HandOff {
    /// A thread (or a task) is handing a proposal over; others leave theirs to it.
    busy: bool,
    /// The last hand-off failed: the next waits out `backoff` (a task resumes pumping).
    backing_off: bool,
    backoff: Duration,
}

/// The first wait after a failed hand-off; it doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(40);

/// Sequential read detection: one stream, the common case of a WAL read front to back.
#[derive(Debug, Default)]
struct ReadAhead {
    /// Where the last read ended.
    next: u64,
    /// The current window in blocks; 0 while reads are not sequential.
    window: u64,
    /// A read-ahead is at a replica (at most one at a time).
    inflight: bool,
}

/// Counters for status and metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceStats {
    pub writes: u64,
    pub flushes: u64,
    pub reads: u64,
    pub proposals: u64,
    pub resubmissions: u64,
    /// Blocks a replica read failed its checksum on, and of those, the ones repaired from
    /// another replica.
    pub corrupt_blocks: u64,
    pub repaired_blocks: u64,
}

/// The write pipeline at one moment, for status.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PipelineStats {
    /// Batches queued or proposed and not yet committed.
    pub unconfirmed_batches: usize,
    pub unconfirmed_bytes: usize,
    /// Blocks whose newest write or discard is not committed yet (pinned in the cache).
    pub pinned_blocks: usize,
    /// Writes accepted by a leader but not committed: what a crash of every replica may lose
    /// in writeback mode (a FLUSH waits for them).
    pub accepted_not_committed: u64,
    /// Writes waiting for room (the unconfirmed bytes are at their bound).
    #[serde(default)]
    pub parked_writes: usize,
    /// Proposals handed to the cluster and not yet committed.
    #[serde(default)]
    pub inflight_proposals: usize,
}

/// A replicated block device.
pub struct Device {
    cfg: DeviceConfig,
    cluster: Arc<dyn Cluster>,
    inner: Mutex<Inner>,
    /// This device, for the read-ahead tasks it spawns.
    me: Weak<Device>,
    /// The runtime the device started on: tasks are spawned there even when a request comes
    /// from a thread outside it (a ublk queue thread).
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Device {
    /// Starts the device's deadline sweeper on the current tokio runtime; it runs until
    /// `close`. Proposals are handed to `cluster` by the threads that submit and confirm
    /// requests (`pump`), with a task only where a hand-off has to wait.
    pub fn start(cfg: DeviceConfig, cluster: Arc<dyn Cluster>) -> Arc<Device> {
        let cache = HotCache::new(cfg.cache_bytes, cfg.block_bytes);
        let cfg = DeviceConfig {
            max_unconfirmed_bytes: cfg.max_unconfirmed_bytes.min(cache.capacity_bytes() as usize),
            ..cfg
        };
        let limits = Limits {
            max_proposal_bytes: cfg.max_proposal_bytes,
            max_proposal_ops: 4096,
            max_unconfirmed_bytes: cfg.max_unconfirmed_bytes,
            max_inflight: cfg.max_inflight_proposals.max(1),
        };
        let inner = Inner {
            pipe: Pipeline::new(limits),
            hand_off: HandOff { busy: false, backing_off: false, backoff: MIN_BACKOFF },
            cache,
            readahead: ReadAhead::default(),
            stats: DeviceStats::default(),
        };
        let dev = Arc::new_cyclic(|me| Device {
            cfg,
            cluster,
            inner: Mutex::new(inner),
            me: me.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(sweeper(Arc::downgrade(&dev)));
        dev
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    pub fn size_bytes(&self) -> u64 {
        self.cfg.blocks * u64::from(self.cfg.block_bytes)
    }

    pub fn stats(&self) -> DeviceStats {
        let inner = self.lock();
        let counts = inner.pipe.counts();
        DeviceStats {
            proposals: counts.proposals,
            resubmissions: counts.resubmissions,
            ..inner.stats
        }
    }

    pub fn pipeline(&self) -> PipelineStats {
        let inner = self.lock();
        PipelineStats {
            unconfirmed_batches: inner.pipe.unconfirmed_batches(),
            unconfirmed_bytes: inner.pipe.unconfirmed_bytes(),
            pinned_blocks: inner.cache.pinned_blocks(),
            accepted_not_committed: inner.pipe.accepted() - inner.pipe.confirmed(),
            parked_writes: inner.pipe.parked(),
            inflight_proposals: inner.pipe.inflight(),
        }
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.lock().cache.stats()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("device lock")
    }

    /// Checks a byte range; returns (first block, block count).
    pub fn check(&self, offset: u64, len: u64) -> Result<(u64, u64), DeviceError> {
        let bs = u64::from(self.cfg.block_bytes);
        let size = self.size_bytes();
        if offset % bs != 0 || len % bs != 0 {
            return Err(DeviceError::Misaligned { offset, len, block: self.cfg.block_bytes });
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok((offset / bs, len / bs)),
            _ => Err(DeviceError::OutOfRange { offset, len, size }),
        }
    }

    /// Writes `data` at byte `offset`. With `fua`, completes only once committed.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        self.write_bytes(offset, Bytes::copy_from_slice(data), fua).await
    }

    /// `write` of a buffer the caller gives up, without copying it.
    pub async fn write_vec(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.write_bytes(offset, Bytes::from(data), fua).await
    }

    async fn write_bytes(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        completed(|done| self.submit_write(offset, data, fua, done)).await
    }

    /// Makes `[offset, +len)` read as zeros (discard and write-zeroes).
    pub async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        completed(|done| self.submit_discard(offset, len, fua, done)).await
    }

    /// Completes once every write completed before it is committed on a majority.
    ///
    /// A flush adds nothing to the log: every write before it is already queued for proposal,
    /// and commit means durable on a majority, so it only waits for that prefix to commit. With
    /// nothing unconfirmed it completes at once.
    pub async fn flush(&self) -> Result<(), DeviceError> {
        completed(|done| self.submit_flush(done)).await
    }

    /// Hands a write to the pipeline without waiting: `done` runs once the write completes
    /// under the durability contract (from whichever thread confirms it), or fails. Never
    /// blocks: a write that finds the unconfirmed bytes at their bound waits in the pipeline,
    /// not in the caller. A write larger than one proposal goes as several, in order, each
    /// whole blocks; it completes with its last part.
    pub fn submit_write(&self, offset: u64, data: Bytes, fua: bool, done: Completion) {
        let lba = match self.check(offset, data.len() as u64) {
            Ok((lba, _)) => lba,
            Err(e) => return done(Err(e)),
        };
        let bs = self.cfg.block_bytes as usize;
        let part = (self.cfg.max_proposal_bytes / bs).max(1) * bs;
        let parts = (0..data.len())
            .step_by(part)
            .map(|at| BlockOp::Write {
                lba: lba + (at / bs) as u64,
                data: data.slice(at..(at + part).min(data.len())),
            })
            .collect::<Vec<_>>();
        let counted = !parts.is_empty();
        self.submit_ops(parts, fua, counted, done);
    }

    /// `submit_write` for a discard or write-zeroes of `[offset, +len)`.
    pub fn submit_discard(&self, offset: u64, len: u64, fua: bool, done: Completion) {
        let (lba, blocks) = match self.check(offset, len) {
            Ok(r) => r,
            Err(e) => return done(Err(e)),
        };
        let mut parts = Vec::new();
        let mut start = lba;
        while start < lba + blocks {
            let n = (lba + blocks - start).min(u64::from(u32::MAX));
            parts.push(BlockOp::Zero { lba: start, blocks: n as u32 });
            start += n;
        }
        self.submit_ops(parts, fua, false, done);
    }

    fn submit_ops(&self, parts: Vec<BlockOp>, fua: bool, count_write: bool, done: Completion) {
        if let Err(e) = self.gate() {
            return done(Err(e));
        }
        let need = if fua
            || self.cfg.mode == CacheMode::Writethrough
            || !self.cluster.acceptance_outlives_process()
        {
            Need::Committed
        } else {
            Need::Accepted
        };
        let deadline = Instant::now() + self.cfg.io_timeout;
        let mut ready = Ready::new();
        let mut inner = self.lock();
        if count_write {
            inner.stats.writes += 1;
        }
        let Inner { pipe, cache, .. } = &mut *inner;
        let before = pipe.next_seq();
        pipe.write(parts, need, deadline, done, &mut |seq, op| pin(cache, seq, op), &mut ready);
        let admitted = pipe.next_seq() > before;
        drop(inner);
        run(ready);
        if admitted {
            self.pump();
        }
    }

    /// Hands a flush to the pipeline without waiting; `done` runs once every write completed
    /// before it is committed on a majority (at once when none is outstanding).
    pub fn submit_flush(&self, done: Completion) {
        match self.gate() {
            Err(e) => return done(Err(e)),
            // Even a flush with nothing outstanding waits: a device whose attachment may be
            // lost answers nothing it cannot stand behind.
            Ok(Gate::Lapsed) => {
                let Some(me) = self.me.upgrade() else { return done(Err(DeviceError::Closed)) };
                self.runtime.spawn(async move {
                    match me.gate_open().await {
                        Ok(()) => me.submit_flush(done),
                        Err(e) => done(Err(e)),
                    }
                });
                return;
            }
            Ok(Gate::Open) => {}
        }
        let mut ready = Ready::new();
        let mut inner = self.lock();
        inner.stats.flushes += 1;
        inner.pipe.flush(Instant::now() + self.cfg.io_timeout, done, &mut ready);
        drop(inner);
        run(ready);
    }

    /// Answers a flush on the caller's thread if it needs no waiting (every admitted write is
    /// committed): true if it did.
    pub fn try_flush_now(&self) -> bool {
        if !matches!(self.gate(), Ok(Gate::Open)) {
            return false;
        }
        let mut inner = self.lock();
        if !inner.pipe.flush_is_free() {
            return false;
        }
        inner.stats.flushes += 1;
        true
    }

    /// Answers a read on the caller's thread if the cache holds every block of it: copies them
    /// into `out` and returns true. Otherwise returns false and changes nothing (the read goes
    /// through `read_into`).
    pub fn try_read_cached(&self, offset: u64, out: &mut [u8]) -> Result<bool, DeviceError> {
        let (lba, blocks) = self.check(offset, out.len() as u64)?;
        if self.gate()? == Gate::Lapsed {
            return Ok(false);
        }
        let bs = self.cfg.block_bytes as usize;
        let mut inner = self.lock();
        if !(lba..lba + blocks).all(|b| inner.cache.holds_data(b)) {
            return Ok(false);
        }
        inner.stats.reads += 1;
        for (i, dst) in out.chunks_mut(bs).enumerate() {
            let hit = inner.cache.lookup(lba + i as u64, dst);
            debug_assert!(matches!(hit, Lookup::Hit), "a held block missed");
        }
        let ahead = self.plan_readahead(&mut inner, lba, blocks);
        let floor = inner.pipe.commit_floor();
        drop(inner);
        if let Some(fills) = ahead {
            self.spawn_readahead(fills, floor);
        }
        Ok(true)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DeviceError> {
        self.check(offset, len)?;
        let mut out = vec![0u8; len as usize];
        self.read_into(offset, &mut out).await?;
        Ok(out)
    }

    /// Reads `out.len()` bytes at `offset` into `out`: blocks the cache holds (every unconfirmed
    /// write among them) from memory, the rest from a replica that has applied every write this
    /// device confirmed, filling the cache.
    pub async fn read_into(&self, offset: u64, out: &mut [u8]) -> Result<(), DeviceError> {
        let (lba, blocks) = self.check(offset, out.len() as u64)?;
        self.gate_open().await?;
        if blocks == 0 {
            return Ok(());
        }
        let bs = self.cfg.block_bytes as usize;
        let (missed, floor, ahead) = {
            let mut inner = self.lock();
            inner.stats.reads += 1;
            let mut missed = Vec::new();
            for (i, dst) in out.chunks_mut(bs).enumerate() {
                let b = lba + i as u64;
                match inner.cache.lookup(b, dst) {
                    Lookup::Hit => {}
                    Lookup::Fill(token) => missed.push((b, Some(token))),
                    Lookup::Miss => missed.push((b, None)),
                }
            }
            let ahead = self.plan_readahead(&mut inner, lba, blocks);
            (missed, inner.pipe.commit_floor(), ahead)
        };
        if let Some(fills) = ahead {
            self.spawn_readahead(fills, floor);
        }
        let (Some(&(first, _)), Some(&(last, _))) = (missed.first(), missed.last()) else {
            return Ok(());
        };
        let mut guard = FillGuard { dev: self, fills: missed, readahead: false };
        let got = self.read_span(first, last - first + 1, floor).await?;
        // Fenced while the replica was read: another member may have written since.
        self.gate_open().await?;
        for &(b, _) in &guard.fills {
            let src = &got.data[((b - first) as usize) * bs..][..bs];
            out[((b - lba) as usize) * bs..][..bs].copy_from_slice(src);
        }
        guard.land(first, &got);
        Ok(())
    }

    /// Decides on read-ahead after a read of `[lba, +blocks)`: a read starting where the last
    /// one ended doubles the window (from 128 KiB, up to `readahead_bytes`), and the blocks of
    /// the window not held yet are reserved for one background read.
    fn plan_readahead(&self, inner: &mut Inner, lba: u64, blocks: u64) -> Option<Vec<(u64, u64)>> {
        let max = self.cfg.readahead_bytes / u64::from(self.cfg.block_bytes);
        let ra = &mut inner.readahead;
        let sequential = lba == ra.next;
        ra.next = lba + blocks;
        if max == 0 || !sequential {
            ra.window = 0;
            return None;
        }
        let start_window = (128 << 10) / u64::from(self.cfg.block_bytes);
        ra.window = (ra.window * 2).max(start_window).max(2 * blocks).min(max);
        if ra.inflight {
            return None;
        }
        let start = lba + blocks;
        let end = (start + ra.window).min(self.cfg.blocks);
        let wanted: Vec<u64> = (start..end).filter(|&b| !inner.cache.holds(b)).collect();
        if wanted.is_empty() {
            return None;
        }
        inner.readahead.inflight = true;
        Some(wanted.into_iter().map(|b| (b, inner.cache.begin_fill(b))).collect())
    }

    /// Blocks `[first, +span)` from a replica that has applied `floor`, checked to be whole.
    async fn read_span(
        &self,
        first: u64,
        span: u64,
        floor: u64,
    ) -> Result<ReadOutcome, DeviceError> {
        let got = self.cluster.clone().read(first, span, floor).await.map_err(DeviceError::Read)?;
        let want = span * u64::from(self.cfg.block_bytes);
        if got.data.len() as u64 != want {
            return Err(DeviceError::Read(format!(
                "replica returned {} bytes for a {want}-byte read",
                got.data.len()
            )));
        }
        Ok(got)
    }

    fn spawn_readahead(&self, fills: Vec<(u64, u64)>, floor: u64) {
        let Some(dev) = self.me.upgrade() else { return };
        self.runtime.spawn(async move {
            let fills = fills.into_iter().map(|(b, t)| (b, Some(t))).collect::<Vec<_>>();
            let first = fills.first().map_or(0, |f| f.0);
            let span = fills.last().map_or(0, |f| f.0) + 1 - first;
            let mut guard = FillGuard { dev: &dev, fills, readahead: true };
            match dev.read_span(first, span, floor).await {
                Ok(got) => guard.land(first, &got),
                Err(e) => tracing::debug!(error = %e, "read-ahead failed"),
            }
            drop(guard);
            dev.lock().readahead.inflight = false;
        });
    }

    /// Refuses the request about to start if the cluster says this device lost its
    /// attachment (`Cluster::serving`), fencing the device first.
    fn gate(&self) -> Result<Gate, DeviceError> {
        match self.cluster.serving() {
            Ok(()) => Ok(Gate::Open),
            Err(NotServing::Lapsed(_)) => Ok(Gate::Lapsed),
            Err(NotServing::Lost(why)) => {
                self.fence(&why);
                Err(DeviceError::Fenced(why))
            }
        }
    }

    /// Waits out a lapse (`Cluster::reconfirm`, bounded): Ok once serving, Err once fenced.
    async fn gate_open(&self) -> Result<(), DeviceError> {
        loop {
            if self.gate()? == Gate::Open {
                return Ok(());
            }
            if let Err(why) = self.cluster.clone().reconfirm().await {
                self.fence(&why);
                return Err(DeviceError::Fenced(why));
            }
        }
    }

    /// The device lost its attachment: every waiting request fails (with EIO at the frontend),
    /// queued writes are abandoned, and no request is answered again, not even a FLUSH with
    /// nothing outstanding or a read the cache holds (`Cluster::serving` refuses them all from
    /// now on). Idempotent.
    pub fn fence(&self, why: &str) {
        let mut ready = Ready::new();
        let mut inner = self.lock();
        if !inner.pipe.is_closed() {
            tracing::error!(
                reason = why,
                "device fenced: failing every outstanding and later request"
            );
        }
        inner.pipe.close(&mut ready);
        drop(inner);
        run(ready);
    }

    /// Stops accepting requests; queued ones are abandoned (as on power loss), and every
    /// request still waiting fails with `Closed`.
    pub fn close(&self) {
        let mut ready = Ready::new();
        self.lock().pipe.close(&mut ready);
        run(ready);
    }

    /// A proposal failed: everything unconfirmed goes again, in order.
    fn restart(&self, epoch: u64, why: &str) {
        let Some(n) = self.lock().pipe.restart(epoch) else { return };
        tracing::warn!(
            reason = why,
            batches = n,
            "proposal failed; resubmitting unconfirmed writes in order"
        );
    }

    fn committed(&self, epoch: u64, seqs: &[u64], index: u64) {
        let bs = self.cfg.block_bytes as usize;
        let mut ready = Ready::new();
        let mut inner = self.lock();
        let Inner { pipe, cache, .. } = &mut *inner;
        // Unpinned in order: when a block's write is unpinned, every write before it is
        // committed too, so the block turns clean with the newest committed data.
        let mut cache_unpin = |seq: u64, op: &BlockOp| match op {
            BlockOp::Write { lba, data } => cache.unpin_write(seq, *lba, (data.len() / bs) as u64),
            BlockOp::Zero { lba, blocks } => cache.unpin_zero(seq, *lba, u64::from(*blocks)),
        };
        pipe.committed(epoch, seqs, index, &mut cache_unpin, &mut ready);
        pipe.admit(&mut |seq, op| pin(cache, seq, op));
        drop(inner);
        run(ready);
        // Room for another proposal: what queued meanwhile goes as one.
        self.pump();
    }

    /// Hands the pipeline's ready proposals to the cluster, in order, on the calling thread: the
    /// thread that submitted a write (a ublk queue thread, a caller of `write`) or learned of a
    /// commit (openraft's core task) proposes what is ready itself, so a write reaches the
    /// leader with no task of the device's in between. One hand-off at a time
    /// (`HandOff::busy`): a thread that finds one under way leaves its proposal to that thread,
    /// which takes proposals until none is ready. A hand-off that cannot finish on its first poll
    /// (no leader yet, apply lagging, a remote connection busy) goes on in a task and holds the
    /// line until it is done, so proposals never overtake each other.
    fn pump(&self) {
        let Some(me) = self.me.upgrade() else { return };
        loop {
            let proposal = {
                let mut inner = self.lock();
                let idle = !inner.hand_off.busy && !inner.hand_off.backing_off;
                if !idle || inner.pipe.is_closed() {
                    return;
                }
                let Some(p) = inner.pipe.take_proposal() else { return };
                inner.hand_off.busy = true;
                p
            };
            let (epoch, seqs) = (proposal.epoch, proposal.seqs);
            let last = seqs.last().copied().unwrap_or_default();
            let d = me.clone();
            let proposed = std::time::Instant::now();
            let on_commit: OnCommit = Box::new(move |outcome| match outcome {
                Ok(index) => {
                    crate::metrics::recorders().commit_done(proposed);
                    d.committed(epoch, &seqs, index)
                }
                Err(e) => {
                    d.restart(epoch, &e);
                    d.pump();
                }
            });
            let (handing, first) = {
                // A queue thread is outside the runtime; the cluster may start timers or tasks.
                let _runtime = self.runtime.enter();
                let mut handing =
                    me.cluster.clone().submit(Request::blocks(proposal.ops), on_commit);
                let first = (&mut handing).now_or_never();
                (handing, first)
            };
            match first {
                Some(outcome) => {
                    if !self.handed_off(epoch, last, outcome) {
                        return;
                    }
                }
                None => {
                    let mut unfinished = Unfinished { dev: Some(me.clone()), epoch, last };
                    self.runtime.spawn(async move {
                        let outcome = handing.await;
                        if let Some(d) = unfinished.dev.take() {
                            if d.handed_off(epoch, last, outcome) {
                                d.pump();
                            }
                        }
                    });
                    return;
                }
            }
        }
    }

    /// A hand-off of a proposal of `epoch` ending with write `last` finished; true if the next
    /// may go now. A failure starts a new epoch (everything unconfirmed goes again, in order)
    /// after a back-off.
    fn handed_off(&self, epoch: u64, last: u64, outcome: Result<(), String>) -> bool {
        let mut ready = Ready::new();
        let wait = {
            let mut inner = self.lock();
            inner.hand_off.busy = false;
            match &outcome {
                Ok(()) => {
                    inner.hand_off.backoff = MIN_BACKOFF;
                    inner.pipe.accepted_through(epoch, last, &mut ready);
                    None
                }
                Err(_) => {
                    let wait = inner.hand_off.backoff;
                    inner.hand_off.backoff = (wait * 2).min(MAX_BACKOFF);
                    inner.hand_off.backing_off = true;
                    Some(wait)
                }
            }
        };
        run(ready);
        let (Some(wait), Err(e)) = (wait, outcome) else { return true };
        self.restart(epoch, &e);
        let Some(d) = self.me.upgrade() else { return false };
        self.runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            d.lock().hand_off.backing_off = false;
            d.pump();
        });
        false
    }
}

/// A hand-off finishing in a task: if the task ends without finishing it (a panic in the
/// cluster's `submit`, the runtime shutting down), the hand-off counts as failed, so `busy` is
/// cleared and everything unconfirmed is proposed again, instead of the pipeline waiting on it
/// for ever.
struct Unfinished {
    dev: Option<Arc<Device>>,
    epoch: u64,
    last: u64,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(d) = self.dev.take() {
            d.handed_off(self.epoch, self.last, Err("the hand-off ended unfinished".into()));
        }
    }
}

/// Hands a request to `submit` with a completion that wakes this task, and waits for it.
async fn completed(submit: impl FnOnce(Completion)) -> Result<(), DeviceError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    submit(Box::new(move |r| drop(tx.send(r))));
    rx.await.unwrap_or(Err(DeviceError::Closed))
}

/// Pins an admitted write's blocks in the cache: reads see it from now on.
fn pin(cache: &mut HotCache, seq: u64, op: &BlockOp) {
    match op {
        BlockOp::Write { lba, data } => cache.pin_write(seq, *lba, data),
        BlockOp::Zero { lba, blocks } => cache.pin_zero(seq, *lba, u64::from(*blocks)),
    }
}

/// Runs the completions an event produced (the device's lock is not held).
fn run(ready: Ready<Completion>) {
    for (done, result) in ready {
        done(result);
    }
}

/// The cache reservations of one replica read: landed with the data, or given up when the read
/// fails or its future is dropped.
struct FillGuard<'a> {
    dev: &'a Device,
    /// Blocks read from the replica, with the reservation to fill if this read holds one.
    fills: Vec<(u64, Option<u64>)>,
    readahead: bool,
}

impl FillGuard<'_> {
    /// Fills the reserved blocks from `got` (a read starting at block `first`).
    fn land(&mut self, first: u64, got: &ReadOutcome) {
        let bs = self.dev.cfg.block_bytes as usize;
        let mut inner = self.dev.lock();
        inner.stats.corrupt_blocks += got.corrupt_blocks;
        inner.stats.repaired_blocks += got.repaired_blocks;
        for (b, token) in self.fills.drain(..) {
            if let Some(t) = token {
                let src = &got.data[((b - first) as usize) * bs..][..bs];
                inner.cache.complete_fill(b, t, src, self.readahead);
            }
        }
    }
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        if self.fills.iter().all(|(_, t)| t.is_none()) {
            return;
        }
        let mut inner = self.dev.lock();
        for (b, token) in self.fills.drain(..) {
            if let Some(t) = token {
                inner.cache.abort_fill(b, t);
            }
        }
    }
}

/// Fails requests still waiting after `io_timeout` (their writes stay queued): one task per
/// device, waking a few times per timeout, instead of a timer per request.
async fn sweeper(d: Weak<Device>) {
    loop {
        let tick = match d.upgrade() {
            Some(d) => {
                let after = d.cfg.io_timeout;
                let mut ready = Ready::new();
                {
                    let mut inner = d.lock();
                    if inner.pipe.is_closed() {
                        return;
                    }
                    inner.pipe.expire(Instant::now(), after, &mut ready);
                }
                run(ready);
                (after / 8).clamp(Duration::from_millis(10), Duration::from_secs(1))
            }
            None => return,
        };
        tokio::time::sleep(tick).await;
    }
}
