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
//! committed and everything before it is too, its blocks stay in an overlay that reads consult
//! first, so a read always returns the latest completed write. If a proposal fails (leader lost,
//! timeout), every unconfirmed write is proposed again, in order, to the next leader: block
//! writes are idempotent, so replaying the suffix in order ends in the same image, and a flush
//! never completes while a write before it is unconfirmed.

pub mod local;
pub mod remote;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

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
    /// yet confirmed are read from the device's overlay instead).
    fn read(
        self: Arc<Self>,
        lba: u64,
        blocks: u64,
        applied_at_least: u64,
    ) -> BoxFuture<Result<Vec<u8>, String>>;
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
    /// Writers wait while this many bytes are unconfirmed.
    pub max_unconfirmed_bytes: usize,
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

/// An unconfirmed block: the seq of its newest write, and its data (`None` reads as zeros).
type Overlay = (u64, Option<Arc<[u8]>>);

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Batch>,
    /// Blocks of unconfirmed writes: lba → (seq, data; `None` reads as zeros).
    overlay: HashMap<u64, Overlay>,
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
    /// longer in the overlay is at or below it.
    commit_floor: u64,
    closed: bool,
    stats: DeviceStats,
}

/// Counters for status and metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceStats {
    pub writes: u64,
    pub flushes: u64,
    pub reads: u64,
    pub proposals: u64,
    pub resubmissions: u64,
}

/// The write pipeline at one moment, for status.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PipelineStats {
    /// Batches queued or proposed and not yet committed.
    pub unconfirmed_batches: usize,
    pub unconfirmed_bytes: usize,
    /// Blocks whose newest write is not committed yet (reads take them from memory).
    pub overlay_blocks: usize,
    /// Writes accepted by a leader but not committed: what a crash of every replica may lose
    /// in writeback mode (a FLUSH waits for them).
    pub accepted_not_committed: u64,
}

/// A replicated block device.
pub struct Device {
    cfg: DeviceConfig,
    cluster: Arc<dyn Cluster>,
    inner: Mutex<Inner>,
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
        let dev = Arc::new(Device {
            cfg,
            cluster,
            inner: Mutex::new(Inner::default()),
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
            overlay_blocks: inner.overlay.len(),
            accepted_not_committed: inner.accepted.saturating_sub(inner.confirmed),
        }
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
        self.write_parts(lba, data, fua).await
    }

    async fn write_parts(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        // A write larger than one proposal goes as several, in order, each whole blocks; it
        // completes with its last part, and the contract covers the parts in order.
        let bs = self.cfg.block_bytes as usize;
        let part = (self.cfg.max_proposal_bytes / bs).max(1) * bs;
        let mut seq = 0;
        for (i, chunk) in data.chunks(part).enumerate() {
            let op = BlockOp::Write { lba: lba + (i * part / bs) as u64, data: chunk.to_vec() };
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
            return self.write_parts(lba, &data, fua).await;
        }
        let seq = self.enqueue(BlockOp::Write { lba, data }).await?;
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

    /// Reads `len` bytes at `offset`: unconfirmed writes from the overlay, the rest from the
    /// leader's image.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, DeviceError> {
        let (lba, blocks) = self.check(offset, len)?;
        let bs = self.cfg.block_bytes as usize;
        let (overlay, complete, floor) = {
            let mut inner = self.lock();
            inner.stats.reads += 1;
            let floor = inner.commit_floor;
            let hits: Vec<(usize, Option<Arc<[u8]>>)> = (0..blocks)
                .filter_map(|i| inner.overlay.get(&(lba + i)).map(|(_, d)| (i as usize, d.clone())))
                .collect();
            let complete = hits.len() as u64 == blocks;
            (hits, complete, floor)
        };
        let mut out = if complete || blocks == 0 {
            vec![0u8; len as usize]
        } else {
            let data =
                self.cluster.clone().read(lba, blocks, floor).await.map_err(DeviceError::Read)?;
            if data.len() != len as usize {
                return Err(DeviceError::Read(format!(
                    "leader returned {} bytes for a {len}-byte read",
                    data.len()
                )));
            }
            data
        };
        for (i, data) in overlay {
            let dst = &mut out[i * bs..(i + 1) * bs];
            match data {
                Some(d) => dst.copy_from_slice(&d),
                None => dst.fill(0),
            }
        }
        Ok(out)
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
                    let bs = self.cfg.block_bytes as usize;
                    match &op {
                        BlockOp::Write { lba, data } => {
                            for (i, block) in data.chunks(bs).enumerate() {
                                inner.overlay.insert(lba + i as u64, (seq, Some(Arc::from(block))));
                            }
                        }
                        BlockOp::Zero { lba, blocks } => {
                            for b in *lba..lba + u64::from(*blocks) {
                                inner.overlay.insert(b, (seq, None));
                            }
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
            let (lba, n) = match &b.op {
                BlockOp::Write { lba, data } => {
                    (*lba, (data.len() / self.cfg.block_bytes as usize) as u64)
                }
                BlockOp::Zero { lba, blocks } => (*lba, u64::from(*blocks)),
            };
            for l in lba..lba + n {
                if inner.overlay.get(&l).is_some_and(|(s, _)| *s == b.seq) {
                    inner.overlay.remove(&l);
                }
            }
        }
        drop(inner);
        self.changed.notify_waiters();
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
