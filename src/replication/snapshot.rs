//! Snapshots: the image streamed as fixed-size, individually checksummed records, staged on the
//! receiver, verified whole, then installed under a durable intent so a crash mid-install is
//! redone on restart.
//!
//! ```text
//! stream = header record, then one record per chunk of CHUNK_BLOCKS blocks; every record is
//!          RECORD_HEAD + CHUNK_BLOCKS × block_bytes bytes (the last chunk is zero-padded)
//! header record: [0,8) "XDEVSNAP" [8,12) version (2) [12,16) block bytes [16,24) device bytes
//!          [24,28) chunk blocks [28,32) meta length [32,36) crc32c of the head page with this
//!          field zero [36,40) 1 if an attachment follows, else 0 [40,48) its epoch [48,56) its
//!          node [56,72) the sender's cluster id [72,80) zero [80,…) the snapshot meta
//!          (postcard), the rest zero. Version 1 (before the cluster id) had the meta at 64 and
//!          bytes 56..64 zero; it is read only to finish an install a crash interrupted.
//! chunk record: [0,8) "XDEVSCHK" [8,16) chunk number [16,24) first lba [24,28) blocks
//!          [28,32) crc32c of the head page with this field zero, then the data [32,64) zero
//!          [64,…) a bitmap of the blocks holding data (others read as zeros), then the data
//! ```
//!
//! A snapshot is sent from the live image: the stream's meta names the index of the checkpoint
//! it was built at, and each record is read with applies excluded, so it holds every block as of
//! some index at or after that one. Installing it and then applying the log from that index on
//! yields the same image, because applying block writes in order is idempotent: each block ends
//! at its last write. Records are sent whole and in order (`network::PeerNetwork`), and the
//! receiver stages them in order (`network::SnapshotInbox`); a transfer that fails starts over.
//!
//! The receiving side, on a `Volume` (the store's data directory; the snapshot directory for a
//! store on a raw device), every step through the disk seam:
//!
//! 1. **Stage**: `{dev}_snap_recv` is created with the exact length of a complete stream for
//!    this device (a leftover one removed first), the records are written in order (the header
//!    is checked against this device as soon as it has arrived), then synced.
//! 2. **Verify**: the staged stream is read whole: header (cluster, then geometry), length, and
//!    every record's checksum and place. Nothing has changed yet; a refused stream is removed.
//! 3. **Intent**: `{dev}_snap_recv` is renamed to `{dev}_snap_install` and the volume synced.
//!    Once that sync returns, the install is decided: its presence is the durable intent.
//! 4. **Swap**: every block of the stream is written over the image (blocks without data
//!    zeroed), the applied state set to the snapshot's (log id, membership, attachment), and the
//!    image checkpointed. Idempotent: a crash anywhere in it is repaired by running it again.
//! 5. **Cleanup**: `{dev}_snap_install` is removed and the volume synced, before the install is
//!    reported: nothing is applied above the snapshot while its intent could still be redone.
//!
//! On open (`recover`), an intent finishes the install (steps 4 and 5) before Raft starts, and a
//! staged stream without one is removed. A failed sync of the staged stream or of the volume, and
//! a failed removal of the intent, poison the engine: a failed fsync is never retried.

use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, ReadBuf};
use uuid::Uuid;

use super::types::SnapshotMeta;
use crate::storage::disk::{AlignedBuf, Disk, Volume, IO_ALIGN};
use crate::storage::engine::Engine;
use crate::storage::image::Attachment;
use crate::storage::le::{put_u32, put_u64, u32_at, u64_at};
use crate::storage::StorageError;

/// Blocks per chunk record.
pub const CHUNK_BLOCKS: u64 = 256;
/// The head page of every record.
pub const RECORD_HEAD: u64 = 4096;
const HEADER_MAGIC: &[u8; 8] = b"XDEVSNAP";
const CHUNK_MAGIC: &[u8; 8] = b"XDEVSCHK";
const VERSION: u32 = 2;
/// The version before the cluster id, read only to redo an interrupted install.
const VERSION_1: u32 = 1;
const CLUSTER_AT: usize = 56;
const META_AT: usize = 80;
const META_AT_V1: usize = 64;
const BITMAP_AT: usize = 64;
/// Bytes staged per write.
const STAGE_BYTES: usize = 1 << 20;
const _: () = assert!(STAGE_BYTES % IO_ALIGN == 0 && RECORD_HEAD as usize % IO_ALIGN == 0);

/// Bytes of one record for a device of `block_bytes` blocks: also openraft's snapshot chunk size.
pub fn record_bytes(block_bytes: u32) -> u64 {
    RECORD_HEAD + CHUNK_BLOCKS * u64::from(block_bytes)
}

/// The stream's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub block_bytes: u32,
    pub device_bytes: u64,
}

impl Shape {
    pub fn of(engine: &Engine) -> Shape {
        let sb = engine.superblock();
        Shape { block_bytes: sb.block_bytes, device_bytes: sb.device_bytes }
    }
    fn blocks(&self) -> u64 {
        self.device_bytes / u64::from(self.block_bytes)
    }
    fn chunks(&self) -> u64 {
        self.blocks().div_ceil(CHUNK_BLOCKS)
    }
    fn record(&self) -> u64 {
        record_bytes(self.block_bytes)
    }
    /// Total stream length.
    pub fn stream_bytes(&self) -> u64 {
        self.record() * (1 + self.chunks())
    }
}

/// The device a snapshot may install on: its geometry and its cluster (one cluster replicates
/// one device, so the cluster id names the device; the store's own uuid differs per replica).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub shape: Shape,
    pub cluster: Uuid,
}

impl Target {
    pub fn of(engine: &Engine) -> Target {
        Target { shape: Shape::of(engine), cluster: engine.superblock().cluster_id }
    }
}

fn crc_with_zero_field(page: &[u8], field: usize, rest: &[u8]) -> u32 {
    let c = crc32c::crc32c(&page[..field]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    let c = crc32c::crc32c_append(c, &page[field + 4..]);
    crc32c::crc32c_append(c, rest)
}

/// What a snapshot stream's header says: openraft's meta, and the attachment as of the same
/// index (the image's applied state at the checkpoint the snapshot was built at), which the
/// receiver installs with the image so that it fences the same writes as its leader.
#[derive(Clone, Debug, PartialEq)]
pub struct Described {
    pub meta: SnapshotMeta,
    pub attachment: Option<Attachment>,
}

/// The header record of a snapshot of a device of `target`.
fn header_record(target: Target, described: &Described) -> io::Result<Vec<u8>> {
    let shape = target.shape;
    let meta = &described.meta;
    let meta_bytes = postcard::to_allocvec(meta).map_err(io::Error::other)?;
    if META_AT + meta_bytes.len() > RECORD_HEAD as usize {
        return Err(io::Error::other(format!(
            "snapshot meta of {} bytes does not fit the header page",
            meta_bytes.len()
        )));
    }
    let mut rec = vec![0u8; shape.record() as usize];
    rec[..8].copy_from_slice(HEADER_MAGIC);
    put_u32(&mut rec, 8, VERSION);
    put_u32(&mut rec, 12, shape.block_bytes);
    put_u64(&mut rec, 16, shape.device_bytes);
    put_u32(&mut rec, 24, CHUNK_BLOCKS as u32);
    put_u32(&mut rec, 28, meta_bytes.len() as u32);
    if let Some(a) = described.attachment {
        put_u32(&mut rec, 36, 1);
        put_u64(&mut rec, 40, a.epoch);
        put_u64(&mut rec, 48, a.node);
    }
    rec[CLUSTER_AT..CLUSTER_AT + 16].copy_from_slice(target.cluster.as_bytes());
    rec[META_AT..META_AT + meta_bytes.len()].copy_from_slice(&meta_bytes);
    let crc = crc_with_zero_field(&rec[..RECORD_HEAD as usize], 32, &[]);
    put_u32(&mut rec, 32, crc);
    Ok(rec)
}

/// Parses a header record and checks it against the receiving device: its cluster first (a
/// snapshot of another cluster is another device's, whatever its geometry), then its geometry.
pub fn parse_header(page: &[u8], target: Target) -> Result<Described, String> {
    parse_header_as(page, target, false)
}

/// As `parse_header`; with `redo`, a version 1 header (no cluster id) is accepted too: its
/// stream was verified by an earlier build before the intent to install it was recorded.
fn parse_header_as(page: &[u8], target: Target, redo: bool) -> Result<Described, String> {
    if page.len() < RECORD_HEAD as usize {
        return Err(format!("snapshot header of {} bytes is truncated", page.len()));
    }
    let page = &page[..RECORD_HEAD as usize];
    if &page[..8] != HEADER_MAGIC {
        return Err("not an xdevice snapshot (bad header magic)".into());
    }
    let crc = crc_with_zero_field(page, 32, &[]);
    if crc != u32_at(page, 32) {
        return Err(format!("snapshot header checksum mismatch ({crc:#010x})"));
    }
    let meta_at = match u32_at(page, 8) {
        VERSION => {
            let cluster = Uuid::from_slice(&page[CLUSTER_AT..CLUSTER_AT + 16])
                .map_err(|e| format!("snapshot cluster id: {e}"))?;
            if cluster != target.cluster {
                return Err(format!(
                    "snapshot of cluster {cluster} cannot install on a replica of cluster {}: \
                     it is another device's",
                    target.cluster
                ));
            }
            if page[CLUSTER_AT + 16..META_AT].iter().any(|b| *b != 0) {
                return Err("snapshot header: reserved bytes 72..80 are not zero".into());
            }
            META_AT
        }
        VERSION_1 if redo => META_AT_V1,
        VERSION_1 => {
            return Err(format!(
                "snapshot version 1 carries no cluster id (an older build's): version {VERSION} \
                 is needed"
            ))
        }
        other => return Err(format!("snapshot version {other} is not {VERSION}")),
    };
    let shape = target.shape;
    let theirs = Shape { block_bytes: u32_at(page, 12), device_bytes: u64_at(page, 16) };
    if theirs != shape || u64::from(u32_at(page, 24)) != CHUNK_BLOCKS {
        return Err(format!(
            "snapshot of a {}-byte device with {}-byte blocks cannot install on a {}-byte device \
             with {}-byte blocks",
            theirs.device_bytes, theirs.block_bytes, shape.device_bytes, shape.block_bytes
        ));
    }
    let attachment = match u32_at(page, 36) {
        0 if page[40..56].iter().all(|b| *b == 0) => None,
        1 => Some(Attachment { epoch: u64_at(page, 40), node: u64_at(page, 48) }),
        0 => return Err("snapshot header: attachment bytes set without the flag".into()),
        other => return Err(format!("snapshot attachment flag {other} is neither 0 nor 1")),
    };
    let len = u32_at(page, 28) as usize;
    let meta = meta_at
        .checked_add(len)
        .and_then(|end| page.get(meta_at..end))
        .ok_or("snapshot meta length out of range")?;
    let meta = postcard::from_bytes(meta).map_err(|e| format!("undecodable snapshot meta: {e}"))?;
    Ok(Described { meta, attachment })
}

/// Builds chunk record `n` from the live image, with applies excluded while it is read.
fn chunk_record(engine: &Engine, shape: Shape, n: u64) -> io::Result<Vec<u8>> {
    let bs = shape.block_bytes as usize;
    let lba = n * CHUNK_BLOCKS;
    let blocks = CHUNK_BLOCKS.min(shape.blocks() - lba) as usize;
    let mut rec = vec![0u8; shape.record() as usize];
    let head = RECORD_HEAD as usize;
    let present = engine
        .with_applied(|_| engine.image().read_extent(lba, &mut rec[head..head + blocks * bs]))
        .map_err(|e| io::Error::other(format!("snapshot read of chunk {n}: {e}")))?;
    rec[..8].copy_from_slice(CHUNK_MAGIC);
    put_u64(&mut rec, 8, n);
    put_u64(&mut rec, 16, lba);
    put_u32(&mut rec, 24, blocks as u32);
    for (i, p) in present.iter().enumerate() {
        if *p {
            rec[BITMAP_AT + i / 8] |= 1 << (i % 8);
        }
    }
    let (page, data) = rec.split_at(head);
    let crc = crc_with_zero_field(page, 28, data);
    put_u32(&mut rec, 28, crc);
    Ok(rec)
}

/// A verified chunk: its first lba, and per block the data or `None` for an unwritten block.
#[derive(Debug)]
pub struct Chunk<'a> {
    pub lba: u64,
    pub blocks: Vec<Option<&'a [u8]>>,
}

/// Parses and checks chunk record `n` of a stream of `shape`: its checksum, then its place.
pub fn parse_chunk(rec: &[u8], shape: Shape, n: u64) -> Result<Chunk<'_>, String> {
    let head = RECORD_HEAD as usize;
    if rec.len() != shape.record() as usize {
        return Err(format!("chunk {n} is {} bytes, expected {}", rec.len(), shape.record()));
    }
    let (page, data) = rec.split_at(head);
    if &page[..8] != CHUNK_MAGIC {
        return Err(format!("chunk {n}: bad magic"));
    }
    let crc = crc_with_zero_field(page, 28, data);
    if crc != u32_at(page, 28) {
        return Err(format!("chunk {n}: checksum mismatch ({crc:#010x})"));
    }
    let lba = n * CHUNK_BLOCKS;
    let blocks = CHUNK_BLOCKS.min(shape.blocks() - lba) as usize;
    if u64_at(page, 8) != n || u64_at(page, 16) != lba || u32_at(page, 24) as usize != blocks {
        return Err(format!("chunk {n}: out of place (claims chunk {})", u64_at(page, 8)));
    }
    let bs = shape.block_bytes as usize;
    let out = (0..blocks)
        .map(|i| {
            (page[BITMAP_AT + i / 8] & (1 << (i % 8)) != 0).then(|| &data[i * bs..(i + 1) * bs])
        })
        .collect();
    Ok(Chunk { lba, blocks: out })
}

/// openraft's snapshot data: a stream generated from the live image (the sending side), or a
/// stream being staged (the receiving side).
#[derive(Debug)]
pub enum SnapshotData {
    Live(LiveStream),
    File(Staging),
}

impl SnapshotData {
    /// The record size and the whole stream's length of a snapshot to send (a live stream; a
    /// staged one is only ever received).
    pub fn geometry(&self) -> io::Result<(u64, u64)> {
        match self {
            SnapshotData::Live(s) => Ok((s.shape.record(), s.shape.stream_bytes())),
            SnapshotData::File(_) => Err(not_sent()),
        }
    }

    /// Appends the next bytes of a stream being received (`SnapshotInbox`).
    pub async fn stage(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            SnapshotData::Live(_) => Err(read_only()),
            SnapshotData::File(f) => f.append(bytes).await,
        }
    }
}

/// What a replica's incoming snapshot is doing, for `NodeStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReceivePhase {
    /// Chunks are arriving in the staged stream.
    Receiving,
    /// The stream is complete: being verified whole, then installed over the image.
    Installing,
}

/// Progress of the incoming snapshot, shared by the state machine (which writes it) and the
/// node's status (which reads it). Only one snapshot is received at a time.
#[derive(Debug, Default)]
pub struct ReceiveProgress {
    /// 0 idle, 1 receiving, 2 installing.
    phase: AtomicU8,
    /// The highest stream offset staged so far (a resent chunk does not count twice).
    received: AtomicU64,
    /// Snapshots installed since the process started.
    installed: AtomicU64,
}

impl ReceiveProgress {
    /// A new incoming stream replaces any earlier, abandoned one.
    pub fn begin(&self) {
        self.received.store(0, Ordering::Relaxed);
        self.phase.store(1, Ordering::Relaxed);
    }
    pub fn installing(&self) {
        self.phase.store(2, Ordering::Relaxed);
    }
    /// The install finished: `ok` counts it.
    pub fn finished(&self, ok: bool) {
        if ok {
            self.installed.fetch_add(1, Ordering::Relaxed);
        }
        self.phase.store(0, Ordering::Relaxed);
    }
    fn staged(&self, end: u64) {
        self.received.fetch_max(end, Ordering::Relaxed);
    }
    /// The phase and bytes staged of the snapshot in progress, if one is.
    pub fn current(&self) -> Option<(ReceivePhase, u64)> {
        let phase = match self.phase.load(Ordering::Relaxed) {
            1 => ReceivePhase::Receiving,
            2 => ReceivePhase::Installing,
            _ => return None,
        };
        Some((phase, self.received.load(Ordering::Relaxed)))
    }
    pub fn installed(&self) -> u64 {
        self.installed.load(Ordering::Relaxed)
    }
}

/// The receiving side's staged stream: `{dev}_snap_recv`, created with the length of a complete
/// stream for this device, written in order through an aligned buffer, each write on the
/// blocking pool. The highest offset staged is reported to `ReceiveProgress`.
#[derive(Debug)]
pub struct Staging {
    engine: Arc<Engine>,
    disk: Arc<dyn Disk>,
    target: Target,
    /// Bytes not yet written, staged from offset `written`; `None` only while a write has it,
    /// or after a write failed.
    buf: Option<AlignedBuf>,
    filled: usize,
    /// Bytes on the disk, from offset 0 (whole buffers until `finish`).
    written: u64,
    /// The header has arrived and was checked against this device.
    header_checked: bool,
    progress: Arc<ReceiveProgress>,
}

impl Staging {
    /// Creates `{dev}_snap_recv` (replacing one an abandoned transfer left) on the blocking pool.
    pub async fn begin(
        engine: Arc<Engine>,
        files: &SnapshotFiles,
        progress: Arc<ReceiveProgress>,
    ) -> io::Result<Staging> {
        let target = Target::of(&engine);
        let creating = files.clone();
        let disk = tokio::task::spawn_blocking(move || {
            creating.create_staging(target.shape.stream_bytes())
        })
        .await
        .map_err(io::Error::other)??;
        let buf = Some(AlignedBuf::zeroed(STAGE_BYTES));
        Ok(Staging {
            engine,
            disk,
            target,
            buf,
            filled: 0,
            written: 0,
            header_checked: false,
            progress,
        })
    }

    fn end(&self) -> u64 {
        self.written + self.filled as u64
    }

    /// Stages the next bytes of the stream. The header is checked against this device as soon
    /// as it has arrived, so a snapshot of another device is refused before its data comes.
    pub async fn append(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let capacity = self.disk.len_bytes();
        while !bytes.is_empty() {
            if self.end() >= capacity {
                return Err(io::Error::other(format!(
                    "snapshot stream runs past {capacity} bytes, the length of a complete one"
                )));
            }
            let left = capacity - self.end();
            let Some(buf) = self.buf.as_mut() else { return Err(lost_buffer()) };
            let room = (buf.len() - self.filled).min(usize::try_from(left).unwrap_or(usize::MAX));
            let take = room.min(bytes.len());
            buf[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if !self.header_checked && self.written == 0 && self.filled >= RECORD_HEAD as usize {
                parse_header(&buf[..RECORD_HEAD as usize], self.target)
                    .map_err(io::Error::other)?;
                self.header_checked = true;
            }
            if self.filled == buf.len() {
                self.write_buffer().await?;
            }
        }
        self.progress.staged(self.end());
        Ok(())
    }

    /// Writes the buffer (its last block zero-padded) at `written`.
    async fn write_buffer(&mut self) -> io::Result<()> {
        let Some(mut buf) = self.buf.take() else { return Err(lost_buffer()) };
        let len = self.filled.next_multiple_of(IO_ALIGN);
        buf[self.filled..len].fill(0);
        let (disk, at) = (self.disk.clone(), self.written);
        let (buf, written) = tokio::task::spawn_blocking(move || {
            let r = disk.write_at(at, &buf[..len]);
            (buf, r)
        })
        .await
        .map_err(io::Error::other)?;
        written.map_err(|e| {
            io::Error::new(e.kind(), format!("staging a snapshot in {}: {e}", self.disk.describe()))
        })?;
        self.buf = Some(buf);
        self.written += self.filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// Writes what is buffered and syncs the staged stream; returns its length. A failed sync
    /// poisons the engine.
    pub async fn finish(&mut self) -> io::Result<u64> {
        if self.filled > 0 {
            self.write_buffer().await?;
        }
        // Nothing may follow: after a partial buffer the next write would not be aligned.
        self.buf = None;
        let (disk, engine) = (self.disk.clone(), self.engine.clone());
        tokio::task::spawn_blocking(move || {
            disk.sync_data().map_err(|e| {
                let cause = StorageError::io("sync", disk.describe(), e);
                io::Error::other(engine.fail_durable(cause))
            })
        })
        .await
        .map_err(io::Error::other)??;
        Ok(self.written)
    }
}

fn lost_buffer() -> io::Error {
    io::Error::other("the snapshot being staged is finished, or a write of it failed")
}

/// The sending side's stream: records built on demand on the blocking pool (a record is 1 MiB
/// of image reads at 4 KiB blocks), the current one kept so a read split across calls sees one
/// version of it.
pub struct LiveStream {
    engine: Arc<Engine>,
    shape: Shape,
    header: Arc<Vec<u8>>,
    pos: u64,
    current: Option<(u64, Vec<u8>)>,
    /// The record being read, and the read.
    pending: Option<(u64, tokio::task::JoinHandle<io::Result<Vec<u8>>>)>,
}

impl std::fmt::Debug for LiveStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStream").field("shape", &self.shape).field("pos", &self.pos).finish()
    }
}

impl LiveStream {
    pub fn new(engine: Arc<Engine>, described: &Described) -> io::Result<LiveStream> {
        let target = Target::of(&engine);
        let header = Arc::new(header_record(target, described)?);
        Ok(LiveStream { engine, shape: target.shape, header, pos: 0, current: None, pending: None })
    }
}

impl AsyncRead for LiveStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let end = this.shape.stream_bytes();
        if this.pos >= end || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let record = this.shape.record();
        let n = this.pos / record;
        let within = (this.pos % record) as usize;
        let bytes: &[u8] = if n == 0 {
            &this.header
        } else {
            if this.current.as_ref().is_none_or(|(c, _)| *c != n) {
                if this.pending.as_ref().is_none_or(|(p, _)| *p != n) {
                    let (engine, shape) = (this.engine.clone(), this.shape);
                    let read =
                        tokio::task::spawn_blocking(move || chunk_record(&engine, shape, n - 1));
                    this.pending = Some((n, read));
                }
                let Some((_, read)) = this.pending.as_mut() else {
                    return Poll::Ready(Err(io::Error::other("snapshot record read missing")));
                };
                let rec = match std::future::Future::poll(Pin::new(read), cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(joined) => joined.map_err(io::Error::other)??,
                };
                this.pending = None;
                this.current = Some((n, rec));
            }
            match &this.current {
                Some((_, rec)) => rec,
                None => return Poll::Ready(Err(io::Error::other("snapshot record missing"))),
            }
        };
        let take = buf.remaining().min(bytes.len() - within);
        buf.put_slice(&bytes[within..within + take]);
        this.pos += take as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for LiveStream {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        let end = this.shape.stream_bytes() as i128;
        let target = match position {
            SeekFrom::Start(p) => i128::from(p),
            SeekFrom::End(d) => end + i128::from(d),
            SeekFrom::Current(d) => i128::from(this.pos) + i128::from(d),
        };
        if target < 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"));
        }
        this.pos = u64::try_from(target).unwrap_or(u64::MAX);
        Ok(())
    }
    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.pos))
    }
}

fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "a live snapshot stream is read-only")
}

fn not_sent() -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, "a received snapshot is not sent on (a live one is)")
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Live(s) => Pin::new(s).poll_read(cx, buf),
            SnapshotData::File(_) => Poll::Ready(Err(not_sent())),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        match self.get_mut() {
            SnapshotData::Live(s) => Pin::new(s).start_seek(position),
            SnapshotData::File(_) => Err(not_sent()),
        }
    }
    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.get_mut() {
            SnapshotData::Live(s) => Pin::new(s).poll_complete(cx),
            SnapshotData::File(_) => Poll::Ready(Err(not_sent())),
        }
    }
}

/// The receiving side's files, on a volume: the store's data directory, or the snapshot
/// directory of a store on a raw device. `{dev}_snap_recv` is the stream being staged;
/// `{dev}_snap_install` a verified one whose install was decided (its presence is the intent).
#[derive(Clone, Debug)]
pub struct SnapshotFiles {
    volume: Arc<dyn Volume>,
    device: String,
}

impl SnapshotFiles {
    pub fn new(volume: Arc<dyn Volume>, device: &str) -> SnapshotFiles {
        SnapshotFiles { volume, device: device.to_string() }
    }
    /// The volume the files live on.
    pub fn volume(&self) -> &Arc<dyn Volume> {
        &self.volume
    }
    /// The name an incoming snapshot is staged under.
    pub fn staging(&self) -> String {
        format!("{}_snap_recv", self.device)
    }
    /// The name of a verified snapshot being installed: its presence is the install intent.
    pub fn installing(&self) -> String {
        format!("{}_snap_install", self.device)
    }
    fn describe(&self, name: &str) -> String {
        format!("{}/{name}", self.volume.describe())
    }
    fn open(&self, name: &str) -> Result<Arc<dyn Disk>, String> {
        self.volume.open(name).map_err(|e| format!("open {}: {e}", self.describe(name)))
    }
    /// Whether `name` is present.
    pub fn present(&self, name: &str) -> Result<bool, String> {
        let names =
            self.volume.list().map_err(|e| format!("list {}: {e}", self.volume.describe()))?;
        Ok(names.iter().any(|n| n == name))
    }
    /// A fresh staging disk of `len` bytes, reading as zeros.
    fn create_staging(&self, len: u64) -> io::Result<Arc<dyn Disk>> {
        let name = self.staging();
        let at = self.describe(&name);
        match self.volume.remove(&name) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("remove {at}: {e}"))),
        }
        self.volume
            .create(&name, len, false)
            .map_err(|e| io::Error::new(e.kind(), format!("create {at} ({len} bytes): {e}")))
    }
    /// Removes a staged stream that will not be installed (refused), best effort: one left
    /// behind is removed by the next transfer or on open.
    pub fn discard_staged(&self) {
        let name = self.staging();
        if let Err(e) = self.volume.remove(&name) {
            tracing::warn!(file = %self.describe(&name), error = %e, "removing a refused snapshot");
        }
    }
    /// Syncs the volume; a failure poisons the engine.
    fn sync(&self, engine: &Engine) -> Result<(), String> {
        self.volume.sync().map_err(|e| {
            engine.fail_durable(StorageError::io("sync", self.volume.describe(), e)).to_string()
        })
    }
}

/// Stages a whole live stream (a snapshot handed to `install_snapshot` without a transfer), as
/// a received one is, and syncs it; returns its length.
pub async fn stage(
    engine: &Arc<Engine>,
    files: &SnapshotFiles,
    progress: &Arc<ReceiveProgress>,
    src: &mut SnapshotData,
) -> io::Result<u64> {
    let mut staging = Staging::begin(engine.clone(), files, progress.clone()).await?;
    src.seek(SeekFrom::Start(0)).await?;
    let mut bytes = vec![0u8; STAGE_BYTES];
    loop {
        let n = src.read(&mut bytes).await?;
        if n == 0 {
            break;
        }
        staging.append(&bytes[..n]).await?;
    }
    staging.finish().await
}

/// Reads the staged stream (`staged` bytes of it were written) whole: the header against
/// `target` (cluster, then geometry) first, so a snapshot of another device is refused as such,
/// not as a stream of the wrong length; then its length; then every record.
pub fn verify(files: &SnapshotFiles, staged: u64, target: Target) -> Result<Described, String> {
    let shape = target.shape;
    let name = files.staging();
    let at = files.describe(&name);
    let disk = files.open(&name)?;
    let mut rec = AlignedBuf::zeroed(shape.record() as usize);
    let head = RECORD_HEAD as usize;
    disk.read_at(0, &mut rec[..head]).map_err(|e| format!("{at}: {e}"))?;
    let described = parse_header(&rec[..head.min(staged as usize)], target)?;
    if staged != shape.stream_bytes() || disk.len_bytes() != staged {
        return Err(format!(
            "snapshot {at} is {staged} bytes, a complete one is {}",
            shape.stream_bytes()
        ));
    }
    for n in 0..shape.chunks() {
        disk.read_at((n + 1) * shape.record(), &mut rec).map_err(|e| format!("chunk {n}: {e}"))?;
        parse_chunk(&rec, shape, n)?;
    }
    Ok(described)
}

/// Records the durable intent to install the verified staged stream: renames it to
/// `{dev}_snap_install` and syncs the volume. Once this returns the install is decided, and a
/// crash from here on is repaired by `recover`; before, a crash leaves the image untouched.
pub fn record_intent(engine: &Engine, files: &SnapshotFiles) -> Result<(), String> {
    engine.check_writable().map_err(|e| e.to_string())?;
    let (from, to) = (files.staging(), files.installing());
    files
        .volume
        .rename(&from, &to)
        .map_err(|e| format!("rename {} to {to}: {e}", files.describe(&from)))?;
    files.sync(engine)
}

/// Writes the snapshot in `{dev}_snap_install` over the image, checkpoints the image at the
/// snapshot's index, then removes the intent and syncs the volume. Idempotent: a crash anywhere
/// is repaired by running it again. Any failure poisons the engine: the image may be part
/// written, and only running this again (on open) repairs it.
pub fn install(engine: &Engine, files: &SnapshotFiles) -> Result<Described, String> {
    let fail = |e: String| engine.fail_durable(StorageError::Invalid(e)).to_string();
    let described = swap(engine, files).map_err(fail)?;
    let name = files.installing();
    files.volume.remove(&name).map_err(|e| {
        engine.fail_durable(StorageError::io("remove", files.describe(&name), e)).to_string()
    })?;
    files.sync(engine)?;
    Ok(described)
}

/// Writes the stream over the image and checkpoints it (steps 4 of the module doc).
fn swap(engine: &Engine, files: &SnapshotFiles) -> Result<Described, String> {
    let target = Target::of(engine);
    let shape = target.shape;
    let name = files.installing();
    let at = files.describe(&name);
    let disk = files.open(&name)?;
    if disk.len_bytes() != shape.stream_bytes() {
        return Err(format!(
            "snapshot {at} is {} bytes, a complete one is {}",
            disk.len_bytes(),
            shape.stream_bytes()
        ));
    }
    let mut rec = AlignedBuf::zeroed(shape.record() as usize);
    let head = RECORD_HEAD as usize;
    disk.read_at(0, &mut rec[..head]).map_err(|e| format!("{at}: {e}"))?;
    let described =
        parse_header_as(&rec[..head], target, true).map_err(|e| format!("{at}: {e}"))?;
    let meta = &described.meta;
    let bs = shape.block_bytes as usize;
    engine
        .with_applied(|applied| {
            let image = engine.image();
            for n in 0..shape.chunks() {
                disk.read_at((n + 1) * shape.record(), &mut rec)
                    .map_err(|e| StorageError::io("read", format!("{at} chunk {n}"), e))?;
                let chunk = parse_chunk(&rec, shape, n)
                    .map_err(|e| StorageError::Invalid(format!("{at}: {e}")))?;
                let mut i = 0;
                while i < chunk.blocks.len() {
                    let written = chunk.blocks[i].is_some();
                    let run =
                        chunk.blocks[i..].iter().take_while(|b| b.is_some() == written).count();
                    let lba = chunk.lba + i as u64;
                    if written {
                        let mut data = Vec::with_capacity(run * bs);
                        for b in chunk.blocks[i..i + run].iter().flatten() {
                            data.extend_from_slice(b);
                        }
                        image.write_blocks(lba, &data)?;
                    } else {
                        image.zero_blocks(lba, run as u64)?;
                    }
                    i += run;
                }
            }
            applied.log_id = meta.last_log_id.as_ref().map(super::types::to_store_log_id);
            applied.membership = meta.last_membership.log_id().as_ref().map(|id| {
                (
                    super::types::to_store_log_id(id),
                    super::types::encode_membership(meta.last_membership.membership()),
                )
            });
            applied.attachment = described.attachment;
            Ok(())
        })
        .map_err(|e| format!("install snapshot: {e}"))?;
    engine.checkpoint().map_err(|e| format!("checkpoint after snapshot install: {e}"))?;
    Ok(described)
}

/// Repairs what a crash left of a snapshot being received or installed, before Raft starts: an
/// install intent is finished (`install`), and a staged stream without one is removed (its
/// install was never decided; the image is untouched). Returns the snapshot installed, if one
/// was finished.
pub fn recover(engine: &Engine, files: &SnapshotFiles) -> Result<Option<Described>, String> {
    let redone = if files.present(&files.installing())? {
        tracing::warn!(file = %files.describe(&files.installing()), "finishing a snapshot install a crash interrupted");
        Some(install(engine, files)?)
    } else {
        None
    };
    let staged = files.staging();
    if files.present(&staged)? {
        tracing::info!(file = %files.describe(&staged), "removing a snapshot staged but never installed");
        files
            .volume
            .remove(&staged)
            .map_err(|e| format!("remove {}: {e}", files.describe(&staged)))?;
        files.sync(engine)?;
    }
    Ok(redone)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const OURS: Uuid = Uuid::from_u128(0x0a);
    const THEIRS: Uuid = Uuid::from_u128(0x0b);

    fn target(cluster: Uuid, device_bytes: u64) -> Target {
        Target { shape: Shape { block_bytes: 4096, device_bytes }, cluster }
    }

    fn described() -> Described {
        Described {
            meta: SnapshotMeta::default(),
            attachment: Some(Attachment { epoch: 7, node: 3 }),
        }
    }

    #[test]
    fn a_header_round_trips_for_its_own_cluster_and_shape() {
        let ours = target(OURS, 4 << 20);
        let rec = header_record(ours, &described()).unwrap();
        assert_eq!(rec.len() as u64, ours.shape.record());
        assert_eq!(&rec[CLUSTER_AT..CLUSTER_AT + 16], OURS.as_bytes());
        assert_eq!(parse_header(&rec, ours).unwrap(), described());
        assert_eq!(parse_header(&rec[..RECORD_HEAD as usize], ours).unwrap(), described());
    }

    /// A snapshot of another cluster is another device's: refused naming both clusters, before
    /// its geometry is looked at.
    #[test]
    fn a_snapshot_of_another_cluster_is_refused_by_name() {
        let rec = header_record(target(THEIRS, 4 << 20), &described()).unwrap();
        for ours in [target(OURS, 4 << 20), target(OURS, 8 << 20)] {
            let e = parse_header(&rec, ours).unwrap_err();
            assert!(e.contains(&THEIRS.to_string()) && e.contains(&OURS.to_string()), "{e}");
            assert!(e.contains("another device"), "{e}");
            assert!(parse_header_as(&rec, ours, true).is_err(), "a redo checks the cluster too");
        }
        // Same cluster, other geometry: refused as such.
        let e = parse_header(&rec, target(THEIRS, 8 << 20)).unwrap_err();
        assert!(e.contains("4194304-byte device") && e.contains("8388608-byte device"), "{e}");
    }

    /// A version 1 header (no cluster id, meta at 64) is refused for a transfer, and read only
    /// to finish an install an earlier build decided.
    #[test]
    fn a_version_1_header_is_read_only_to_redo_an_install() {
        let ours = target(OURS, 4 << 20);
        let v2 = header_record(ours, &described()).unwrap();
        let meta_len = u32_at(&v2, 28) as usize;
        let mut v1 = v2.clone();
        v1[CLUSTER_AT..].fill(0);
        v1[META_AT_V1..META_AT_V1 + meta_len].copy_from_slice(&v2[META_AT..META_AT + meta_len]);
        put_u32(&mut v1, 8, VERSION_1);
        let crc = crc_with_zero_field(&v1[..RECORD_HEAD as usize], 32, &[]);
        put_u32(&mut v1, 32, crc);
        let e = parse_header(&v1, ours).unwrap_err();
        assert!(e.contains("version 1") && e.contains("cluster id"), "{e}");
        assert_eq!(parse_header_as(&v1, ours, true).unwrap(), described());
    }

    #[test]
    fn damaged_headers_are_refused_without_panics() {
        let ours = target(OURS, 4 << 20);
        let rec = header_record(ours, &described()).unwrap();
        let reseal = |mut page: Vec<u8>| {
            let crc = crc_with_zero_field(&page[..RECORD_HEAD as usize], 32, &[]);
            put_u32(&mut page, 32, crc);
            page
        };
        let mut flipped = rec.clone();
        flipped[CLUSTER_AT + 3] ^= 1;
        assert!(parse_header(&flipped, ours).unwrap_err().contains("checksum"));
        let e = parse_header(&reseal(flipped), ours).unwrap_err();
        assert!(e.contains("cluster"), "{e}");
        let mut reserved = rec.clone();
        reserved[75] = 1;
        assert!(parse_header(&reseal(reserved), ours).unwrap_err().contains("reserved"));
        let mut long = rec.clone();
        put_u32(&mut long, 28, u32::MAX);
        assert!(parse_header(&reseal(long), ours).unwrap_err().contains("out of range"));
        assert!(parse_header(&rec[..100], ours).unwrap_err().contains("truncated"));
        for at in 0..RECORD_HEAD as usize {
            let mut page = rec[..RECORD_HEAD as usize].to_vec();
            page[at] ^= 0x80;
            let _ = parse_header(&reseal(page), ours);
        }
    }
}
