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
pub mod remote;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::cache::{CacheStats, HotCache, Lookup};
use crate::entry::BlockOp;
use crate::replication::types::Request;

pub use crate::replication::network::BoxFuture;

/// Resolves when a submitted proposal is committed (and applied on the leader), to its index.
pub type Commit = BoxFuture<Result<u64, String>>;

/// What the device needs from a cluster.
pub trait Cluster: Send + Sync + 'static {
    /// Hands `req` to the leader, in call order. Resolves once the leader has accepted it, to a
    /// future of its commit; an error means it was not accepted.
    fn submit(self: Arc<Self>, req: Request) -> BoxFuture<Result<Commit, String>>;
    /// Whether a proposal the leader has accepted (not yet committed) still commits if this
    /// process dies. False when every replica lives in this process: then a writeback write
    /// completes only once committed, or a daemon crash would lose completed writes and a FLUSH
    /// the kernel reissues to the next daemon would succeed without them.
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
}

/// The frontend's error for each device error; `xdevice_ublk::IoError::errno` is the one place
/// errors become errnos.
impl From<DeviceError> for xdevice_ublk::IoError {
    fn from(e: DeviceError) -> Self {
        use xdevice_ublk::IoError;
        match e {
            DeviceError::OutOfRange { offset, len, size } => {
                IoError::OutOfRange { offset, len, size }
            }
            DeviceError::Misaligned { offset, len, block } => {
                IoError::Misaligned { offset, len, block }
            }
            DeviceError::Timeout(d) => IoError::Timeout(format!("not committed within {d:?}")),
            DeviceError::Read(e) => IoError::Io(e),
            DeviceError::Closed => IoError::Closed,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Queued,
    Submitted,
    Committed,
}

#[derive(Debug)]
struct Batch {
    seq: u64,
    op: BlockOp,
    bytes: usize,
    state: State,
}

#[derive(Debug)]
struct Inner {
    queue: VecDeque<Batch>,
    /// Unconfirmed writes pinned, recent and hot blocks clean.
    cache: HotCache,
    readahead: ReadAhead,
    next_seq: u64,
    /// Every seq below is committed.
    confirmed: u64,
    /// Every seq below has been accepted by a leader at least once.
    accepted: u64,
    epoch: u64,
    unconfirmed_bytes: usize,
    /// Proposals of this epoch submitted and not yet committed.
    inflight: usize,
    /// The highest log index a commit of this device's writes resolved to: every write no
    /// longer pinned in the cache is at or below it.
    commit_floor: u64,
    closed: bool,
    stats: DeviceStats,
}

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
}

/// A replicated block device.
pub struct Device {
    cfg: DeviceConfig,
    cluster: Arc<dyn Cluster>,
    inner: Mutex<Inner>,
    /// This device, for the read-ahead tasks it spawns.
    me: Weak<Device>,
    /// Wakes waiters when `confirmed`/`accepted` move or room frees up.
    changed: Notify,
    /// Wakes the proposer.
    kick: Notify,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Device {
    /// Starts the device's proposer on the current tokio runtime; it runs until `close`.
    pub fn start(cfg: DeviceConfig, cluster: Arc<dyn Cluster>) -> Arc<Device> {
        let cache = HotCache::new(cfg.cache_bytes, cfg.block_bytes);
        let cfg = DeviceConfig {
            max_unconfirmed_bytes: cfg.max_unconfirmed_bytes.min(cache.capacity_bytes() as usize),
            ..cfg
        };
        let inner = Inner {
            queue: VecDeque::new(),
            cache,
            readahead: ReadAhead::default(),
            next_seq: 0,
            confirmed: 0,
            accepted: 0,
            epoch: 0,
            unconfirmed_bytes: 0,
            inflight: 0,
            commit_floor: 0,
            closed: false,
            stats: DeviceStats::default(),
        };
        let dev = Arc::new_cyclic(|me| Device {
            cfg,
            cluster,
            inner: Mutex::new(inner),
            me: me.clone(),
            changed: Notify::new(),
            kick: Notify::new(),
        });
        tokio::spawn(proposer(dev.clone()));
        dev
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    pub fn size_bytes(&self) -> u64 {
        self.cfg.blocks * u64::from(self.cfg.block_bytes)
    }

    pub fn stats(&self) -> DeviceStats {
        self.lock().stats
    }

    pub fn pipeline(&self) -> PipelineStats {
        let inner = self.lock();
        PipelineStats {
            unconfirmed_batches: inner.queue.len(),
            unconfirmed_bytes: inner.unconfirmed_bytes,
            pinned_blocks: inner.cache.pinned_blocks(),
            accepted_not_committed: inner.accepted.saturating_sub(inner.confirmed),
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
        if data.len() <= self.cfg.max_proposal_bytes {
            return self.write_vec(offset, data.to_vec(), fua).await;
        }
        let (lba, _) = self.check(offset, data.len() as u64)?;
        self.write_parts(lba, Bytes::copy_from_slice(data), fua).await
    }

    async fn write_parts(&self, lba: u64, data: Bytes, fua: bool) -> Result<(), DeviceError> {
        // A write larger than one proposal goes as several, in order, each whole blocks; it
        // completes with its last part, and the contract covers the parts in order.
        let bs = self.cfg.block_bytes as usize;
        let part = (self.cfg.max_proposal_bytes / bs).max(1) * bs;
        let mut seq = 0;
        for (i, at) in (0..data.len()).step_by(part).enumerate() {
            let chunk = data.slice(at..(at + part).min(data.len()));
            let op = BlockOp::Write { lba: lba + (i * part / bs) as u64, data: chunk };
            seq = self.enqueue(op).await?;
        }
        self.lock().stats.writes += 1;
        self.complete(seq, fua).await
    }

    /// `write` of a buffer the caller gives up, without copying it when it fits one proposal.
    pub async fn write_vec(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), DeviceError> {
        let (lba, _) = self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        if data.len() > self.cfg.max_proposal_bytes {
            return self.write_parts(lba, Bytes::from(data), fua).await;
        }
        let seq = self.enqueue(BlockOp::Write { lba, data: Bytes::from(data) }).await?;
        self.lock().stats.writes += 1;
        self.complete(seq, fua).await
    }

    /// Makes `[offset, +len)` read as zeros (discard and write-zeroes).
    pub async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        let (lba, blocks) = self.check(offset, len)?;
        let mut start = lba;
        let mut last = None;
        while start < lba + blocks {
            let n = (lba + blocks - start).min(u64::from(u32::MAX));
            last = Some(self.enqueue(BlockOp::Zero { lba: start, blocks: n as u32 }).await?);
            start += n;
        }
        match last {
            Some(seq) => self.complete(seq, fua).await,
            None => Ok(()),
        }
    }

    /// Completes once every write completed before it is committed on a majority.
    ///
    /// A flush adds nothing to the log: every write before it is already queued for proposal,
    /// and commit means durable on a majority, so it only waits for that prefix to commit. With
    /// nothing unconfirmed it completes at once.
    pub async fn flush(&self) -> Result<(), DeviceError> {
        let upto = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(DeviceError::Closed);
            }
            inner.stats.flushes += 1;
            inner.next_seq
        };
        self.wait_until(|i| i.confirmed >= upto).await
    }

    async fn complete(&self, seq: u64, durable: bool) -> Result<(), DeviceError> {
        if durable
            || self.cfg.mode == CacheMode::Writethrough
            || !self.cluster.acceptance_outlives_process()
        {
            self.wait_until(|i| i.confirmed > seq).await
        } else {
            self.wait_until(|i| i.accepted > seq).await
        }
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
            (missed, inner.commit_floor, ahead)
        };
        if let Some(fills) = ahead {
            self.spawn_readahead(fills, floor);
        }
        let (Some(&(first, _)), Some(&(last, _))) = (missed.first(), missed.last()) else {
            return Ok(());
        };
        let mut guard = FillGuard { dev: self, fills: missed, readahead: false };
        let got = self.read_span(first, last - first + 1, floor).await?;
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
        tokio::spawn(async move {
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

    /// Stops accepting requests; queued ones are abandoned (as on power loss).
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
        self.kick.notify_one();
    }

    async fn enqueue(&self, op: BlockOp) -> Result<u64, DeviceError> {
        let bytes = match &op {
            BlockOp::Write { data, .. } => data.len(),
            BlockOp::Zero { .. } => 0,
        };
        let deadline = tokio::time::Instant::now() + self.cfg.io_timeout;
        loop {
            let notified = self.changed.notified();
            {
                let mut inner = self.lock();
                if inner.closed {
                    return Err(DeviceError::Closed);
                }
                if inner.unconfirmed_bytes == 0
                    || inner.unconfirmed_bytes + bytes <= self.cfg.max_unconfirmed_bytes
                {
                    let seq = inner.next_seq;
                    inner.next_seq += 1;
                    inner.unconfirmed_bytes += bytes;
                    match &op {
                        BlockOp::Write { lba, data } => inner.cache.pin_write(seq, *lba, data),
                        BlockOp::Zero { lba, blocks } => {
                            inner.cache.pin_zero(seq, *lba, u64::from(*blocks))
                        }
                    }
                    inner.queue.push_back(Batch { seq, op, bytes, state: State::Queued });
                    drop(inner);
                    self.kick.notify_one();
                    return Ok(seq);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(DeviceError::Timeout(self.cfg.io_timeout));
            }
        }
    }

    async fn wait_until(&self, done: impl Fn(&Inner) -> bool) -> Result<(), DeviceError> {
        let deadline = tokio::time::Instant::now() + self.cfg.io_timeout;
        loop {
            let notified = self.changed.notified();
            {
                let inner = self.lock();
                if done(&inner) {
                    return Ok(());
                }
                if inner.closed {
                    return Err(DeviceError::Closed);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(DeviceError::Timeout(self.cfg.io_timeout));
            }
        }
    }

    /// Takes the next run of queued batches, in order, as one proposal.
    fn take_proposal(&self) -> Option<(u64, Vec<u64>, Request)> {
        let mut inner = self.lock();
        if inner.inflight >= self.cfg.max_inflight_proposals.max(1) {
            return None;
        }
        let epoch = inner.epoch;
        let mut seqs = Vec::new();
        let mut ops = Vec::new();
        let mut bytes = 0usize;
        for b in inner.queue.iter_mut().filter(|b| b.state == State::Queued) {
            if !seqs.is_empty()
                && (bytes + b.bytes > self.cfg.max_proposal_bytes || ops.len() >= 4096)
            {
                break;
            }
            b.state = State::Submitted;
            bytes += b.bytes;
            seqs.push(b.seq);
            ops.push(b.op.clone());
        }
        if seqs.is_empty() {
            return None;
        }
        inner.stats.proposals += 1;
        inner.inflight += 1;
        Some((epoch, seqs, Request::Blocks(ops)))
    }

    /// A proposal failed: everything unconfirmed goes again, in order.
    fn restart(&self, epoch: u64, why: &str) {
        let mut inner = self.lock();
        if inner.epoch != epoch {
            return;
        }
        inner.epoch += 1;
        inner.inflight = 0;
        let mut n = 0;
        for b in inner.queue.iter_mut() {
            b.state = State::Queued;
            n += 1;
        }
        inner.stats.resubmissions += n;
        tracing::warn!(
            reason = why,
            batches = n,
            "proposal failed; resubmitting unconfirmed writes in order"
        );
    }

    fn accepted(&self, epoch: u64, last_seq: u64) {
        let mut inner = self.lock();
        if inner.epoch == epoch && inner.accepted <= last_seq {
            inner.accepted = last_seq + 1;
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    fn committed(&self, epoch: u64, seqs: &[u64], index: u64) {
        let mut inner = self.lock();
        inner.commit_floor = inner.commit_floor.max(index);
        if inner.epoch != epoch {
            return;
        }
        inner.inflight = inner.inflight.saturating_sub(1);
        // Room for another proposal: what queued meanwhile goes as one.
        self.kick.notify_one();
        for b in inner.queue.iter_mut() {
            if seqs.binary_search(&b.seq).is_ok() {
                b.state = State::Committed;
            }
        }
        while inner.queue.front().is_some_and(|b| b.state == State::Committed) {
            let Some(b) = inner.queue.pop_front() else { break };
            inner.unconfirmed_bytes -= b.bytes;
            inner.confirmed = b.seq + 1;
            if inner.accepted < inner.confirmed {
                inner.accepted = inner.confirmed;
            }
            match &b.op {
                BlockOp::Write { lba, data } => {
                    let n = (data.len() / self.cfg.block_bytes as usize) as u64;
                    inner.cache.unpin_write(b.seq, *lba, n);
                }
                BlockOp::Zero { lba, blocks } => {
                    inner.cache.unpin_zero(b.seq, *lba, u64::from(*blocks))
                }
            }
        }
        drop(inner);
        self.changed.notify_waiters();
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

/// Hands queued writes to the leader in order; one task per device, until `close`.
async fn proposer(d: Arc<Device>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        if d.lock().closed {
            return;
        }
        let kicked = d.kick.notified();
        let Some((epoch, seqs, req)) = d.take_proposal() else {
            kicked.await;
            continue;
        };
        let last = seqs.last().copied().unwrap_or_default();
        match d.cluster.clone().submit(req).await {
            Ok(commit) => {
                backoff = Duration::from_millis(5);
                d.accepted(epoch, last);
                let d = d.clone();
                tokio::spawn(async move {
                    match commit.await {
                        Ok(index) => d.committed(epoch, &seqs, index),
                        Err(e) => {
                            d.restart(epoch, &e);
                            d.kick.notify_one();
                        }
                    }
                });
            }
            Err(e) => {
                d.restart(epoch, &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(40));
            }
        }
    }
}
