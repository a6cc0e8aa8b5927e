//! Snapshots: the image streamed as fixed-size, individually checksummed records, staged on the
//! receiver, verified whole, then installed with a durable intent so a crash mid-install is
//! redone on restart.
//!
//! ```text
//! stream = header record, then one record per chunk of CHUNK_BLOCKS blocks; every record is
//!          RECORD_HEAD + CHUNK_BLOCKS × block_bytes bytes (the last chunk is zero-padded)
//! header record: [0,8) "XDEVSNAP" [8,12) version [12,16) block bytes [16,24) device bytes
//!          [24,28) chunk blocks [28,32) meta length [32,36) crc32c of the head page with this
//!          field zero [36,40) 1 if an attachment follows, else 0 [40,48) its epoch [48,56) its
//!          node [64,…) the snapshot meta (postcard), the rest zero
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

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt, AsyncWrite, ReadBuf};

use super::types::SnapshotMeta;
use crate::storage::engine::Engine;
use crate::storage::image::Attachment;
use crate::storage::le::{put_u32, put_u64, u32_at, u64_at};

/// Blocks per chunk record.
pub const CHUNK_BLOCKS: u64 = 256;
/// The head page of every record.
pub const RECORD_HEAD: u64 = 4096;
const HEADER_MAGIC: &[u8; 8] = b"XDEVSNAP";
const CHUNK_MAGIC: &[u8; 8] = b"XDEVSCHK";
const VERSION: u32 = 1;
const META_AT: usize = 64;
const BITMAP_AT: usize = 64;

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

fn header_record(shape: Shape, described: &Described) -> io::Result<Vec<u8>> {
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
    rec[META_AT..META_AT + meta_bytes.len()].copy_from_slice(&meta_bytes);
    let crc = crc_with_zero_field(&rec[..RECORD_HEAD as usize], 32, &[]);
    put_u32(&mut rec, 32, crc);
    Ok(rec)
}

/// Parses and checks a header record against the receiving device's shape.
pub fn parse_header(page: &[u8], shape: Shape) -> Result<Described, String> {
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
    if u32_at(page, 8) != VERSION {
        return Err(format!("snapshot version {} is not {VERSION}", u32_at(page, 8)));
    }
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
    let meta = page.get(META_AT..META_AT + len).ok_or("snapshot meta length out of range")?;
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
struct Chunk<'a> {
    lba: u64,
    blocks: Vec<Option<&'a [u8]>>,
}

fn parse_chunk(rec: &[u8], shape: Shape, n: u64) -> Result<Chunk<'_>, String> {
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
/// staging file (the receiving side).
#[derive(Debug)]
pub enum SnapshotData {
    Live(LiveStream),
    File(Staging),
}

impl SnapshotData {
    /// The record size and the whole stream's length of a snapshot to send (a live stream; a
    /// staging file is only ever received).
    pub fn geometry(&self) -> io::Result<(u64, u64)> {
        match self {
            SnapshotData::Live(s) => Ok((s.shape.record(), s.shape.stream_bytes())),
            SnapshotData::File(_) => {
                Err(io::Error::other("a received snapshot is not sent on (a live one is)"))
            }
        }
    }
}

/// What a replica's incoming snapshot is doing, for `NodeStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReceivePhase {
    /// Chunks are arriving in the staging file.
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

/// The receiving side's staging file: openraft seeks to each chunk's offset and writes it; the
/// highest offset written is reported to `ReceiveProgress`.
#[derive(Debug)]
pub struct Staging {
    file: tokio::fs::File,
    pos: u64,
    progress: Arc<ReceiveProgress>,
}

impl Staging {
    pub fn new(file: tokio::fs::File, progress: Arc<ReceiveProgress>) -> Staging {
        Staging { file, pos: 0, progress }
    }
    pub async fn sync_all(&self) -> io::Result<()> {
        self.file.sync_all().await
    }
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
        let shape = Shape::of(&engine);
        let header = Arc::new(header_record(shape, described)?);
        Ok(LiveStream { engine, shape, header, pos: 0, current: None, pending: None })
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

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Live(s) => Pin::new(s).poll_read(cx, buf),
            SnapshotData::File(f) => {
                let before = buf.filled().len();
                std::task::ready!(Pin::new(&mut f.file).poll_read(cx, buf))?;
                f.pos += (buf.filled().len() - before) as u64;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SnapshotData::Live(_) => Poll::Ready(Err(read_only())),
            SnapshotData::File(f) => {
                let n = std::task::ready!(Pin::new(&mut f.file).poll_write(cx, buf))?;
                f.pos += n as u64;
                f.progress.staged(f.pos);
                Poll::Ready(Ok(n))
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Live(_) => Poll::Ready(Ok(())),
            SnapshotData::File(f) => Pin::new(&mut f.file).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Live(_) => Poll::Ready(Ok(())),
            SnapshotData::File(f) => Pin::new(&mut f.file).poll_shutdown(cx),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        match self.get_mut() {
            SnapshotData::Live(s) => Pin::new(s).start_seek(position),
            SnapshotData::File(f) => Pin::new(&mut f.file).start_seek(position),
        }
    }
    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.get_mut() {
            SnapshotData::Live(s) => Pin::new(s).poll_complete(cx),
            SnapshotData::File(f) => {
                let pos = std::task::ready!(Pin::new(&mut f.file).poll_complete(cx))?;
                f.pos = pos;
                Poll::Ready(Ok(pos))
            }
        }
    }
}

/// Files of the receiving side, in the replica's snapshot directory.
#[derive(Clone, Debug)]
pub struct SnapshotFiles {
    dir: PathBuf,
    device: String,
}

impl SnapshotFiles {
    pub fn new(dir: &Path, device: &str) -> SnapshotFiles {
        SnapshotFiles { dir: dir.to_path_buf(), device: device.to_string() }
    }
    /// Where an incoming snapshot is written.
    pub fn staging(&self) -> PathBuf {
        self.dir.join(format!("{}_snap_recv", self.device))
    }
    /// A verified snapshot being installed; its presence is the durable install intent.
    pub fn installing(&self) -> PathBuf {
        self.dir.join(format!("{}_snap_install", self.device))
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Copies any snapshot stream into the staging file and syncs it.
pub async fn stage(files: &SnapshotFiles, src: &mut SnapshotData) -> io::Result<()> {
    let mut out = tokio::fs::File::create(files.staging()).await?;
    src.seek(SeekFrom::Start(0)).await?;
    tokio::io::copy(src, &mut out).await?;
    out.sync_all().await
}

/// Reads the staged stream whole, checking the header against `shape` and every record.
pub async fn verify(path: &Path, shape: Shape) -> Result<Described, String> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("open snapshot {}: {e}", path.display()))?;
    let len = f.metadata().await.map_err(|e| e.to_string())?.len();
    // The header first: a snapshot of another device's geometry is refused as such, not as a
    // file of the wrong length (its length follows from that geometry).
    let mut rec = vec![0u8; shape.record() as usize];
    let head = RECORD_HEAD.min(len) as usize;
    f.read_exact(&mut rec[..head]).await.map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = parse_header(&rec[..head], shape)?;
    if len != shape.stream_bytes() {
        return Err(format!(
            "snapshot {} is {len} bytes, a complete one is {}",
            path.display(),
            shape.stream_bytes()
        ));
    }
    f.read_exact(&mut rec[head..]).await.map_err(|e| format!("{}: {e}", path.display()))?;
    for n in 0..shape.chunks() {
        f.read_exact(&mut rec).await.map_err(|e| format!("chunk {n}: {e}"))?;
        parse_chunk(&rec, shape, n)?;
    }
    Ok(meta)
}

/// Marks a verified staged snapshot as being installed (a rename, made durable).
pub fn begin_install(files: &SnapshotFiles) -> io::Result<()> {
    std::fs::rename(files.staging(), files.installing())?;
    sync_dir(files.dir())
}

/// Writes the snapshot at `files.installing()` over the image, checkpoints it at the snapshot's
/// index, then removes the intent. Idempotent: a crash anywhere is repaired by running it again.
pub fn install(engine: &Engine, files: &SnapshotFiles) -> Result<Described, String> {
    use std::io::Read;
    let shape = Shape::of(engine);
    let path = files.installing();
    let mut f = std::fs::File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut rec = vec![0u8; shape.record() as usize];
    f.read_exact(&mut rec).map_err(|e| format!("{}: {e}", path.display()))?;
    let described = parse_header(&rec, shape)?;
    let meta = &described.meta;
    let bs = shape.block_bytes as usize;
    engine
        .with_applied(|applied| {
            let image = engine.image();
            for n in 0..shape.chunks() {
                f.read_exact(&mut rec).map_err(|e| {
                    crate::storage::StorageError::Invalid(format!("chunk {n}: {e}"))
                })?;
                let chunk =
                    parse_chunk(&rec, shape, n).map_err(crate::storage::StorageError::Invalid)?;
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
    std::fs::remove_file(&path).map_err(|e| format!("remove {}: {e}", path.display()))?;
    sync_dir(files.dir()).map_err(|e| format!("sync {}: {e}", files.dir().display()))?;
    Ok(described)
}
