//! The block image (data region): the device's blocks as of the applied log index, each block
//! verified against a per-block checksum on every read. Written on apply; made durable only by
//! `checkpoint`, which is the one place that advances the persisted applied index.
//!
//! ```text
//! image disk
//! [0, 8 KiB)          header slot pair ("XDEVIMGH"): applied log id + applied membership
//! [8 KiB, data)       checksum table: 512-byte sectors of 127 little-endian u32 entries and a
//!                     crc32c (seeded with the sector number) over the 508 entry bytes
//! [data, +blocks*bs)  the blocks, data offset aligned to 64 KiB
//! ```
//! Entry value 0 means "never written or discarded": the block reads as zeros without I/O.
//! Otherwise it is crc32c(lba little-endian, then the block), with 0 mapped to 0xFFFF_FFFF, so a
//! block written to the wrong place fails its check too.
//!
//! Crash safety: blocks and table sectors written after the last checkpoint may be torn or stale,
//! but every one of them belongs to an entry above the persisted applied index, which recovery
//! replays, rewriting the block and its entry. The table is written in 4 KiB pages, but each
//! 512-byte sector carries its own checksum, so a page torn at any sector boundary leaves every
//! sector wholly old or wholly new, and each valid. Only committed entries are ever applied, and
//! replay re-applies through the persisted committed index, so no applied block is left unreplayed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};

use super::disk::{AlignedBuf, Disk, IO_ALIGN, SECTOR_BYTES};
use super::error::{Result, StorageError};
use super::le::{put_u32, put_u64, u32_at, u64_at};
use super::poison::Poison;
use super::slots::SlotPair;
use super::state::LogId;

/// Checksum entries per table sector.
pub const ENTRIES_PER_SECTOR: u64 = 127;
const TABLE_OFFSET: u64 = SlotPair::bytes();
const DATA_ALIGN: u64 = 64 * 1024;
const IO_CHUNK_BYTES: usize = 1 << 20;
const _: () = assert!(ENTRIES_PER_SECTOR as usize * 4 + 4 == SECTOR_BYTES);

/// Where things sit inside an image of `blocks` blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ImageGeometry {
    pub block_bytes: u32,
    pub blocks: u64,
    pub table_sectors: u64,
    pub data_offset: u64,
    pub total_bytes: u64,
}

impl ImageGeometry {
    /// The geometry of an image for a device of `device_bytes` in blocks of `block_bytes`.
    pub fn new(device_bytes: u64, block_bytes: u32) -> ImageGeometry {
        let blocks = device_bytes / block_bytes as u64;
        let table_sectors = blocks.div_ceil(ENTRIES_PER_SECTOR);
        let table_end = TABLE_OFFSET + table_sectors * SECTOR_BYTES as u64;
        let data_offset = table_end.next_multiple_of(DATA_ALIGN);
        let total_bytes = data_offset + blocks * block_bytes as u64;
        ImageGeometry { block_bytes, blocks, table_sectors, data_offset, total_bytes }
    }
}

/// What the image has applied, persisted in its header at each checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub log_id: Option<LogId>,
    /// The last applied membership entry: its log id and the replication layer's bytes.
    #[serde(skip)]
    pub membership: Option<(LogId, Vec<u8>)>,
    /// The last applied attach entry (`entry::EntryBody::Attach`): which member serves the
    /// device, under which epoch. None: no member ever attached.
    pub attachment: Option<Attachment>,
}

/// Which member serves the device, as the log last said.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Attachment {
    /// The attach entry's index.
    pub epoch: u64,
    /// The member serving the device; 0 once it detached.
    pub node: u64,
}

impl Attachment {
    /// Whether block writes sent under `epoch` (None: by a writer outside the attachment
    /// scheme: the embedded mode, a remote client) apply under this attachment state (None: no
    /// member ever attached). Fenced writes apply only under the attachment they name while it
    /// is held. Unfenced writes always apply: their writer was answered at commit and is not a
    /// server that can be superseded, so skipping one would lose a write it was told is durable
    /// (a node refuses an unfenced `WRITE` while a member serves the device instead).
    pub fn admits(current: Option<Attachment>, epoch: Option<u64>) -> bool {
        match (current, epoch) {
            (Some(a), Some(e)) => a.node != 0 && a.epoch == e,
            (None, Some(_)) => false,
            (_, None) => true,
        }
    }
}

const APPLIED_FIXED: usize = 56;
const HAS_LOG_ID: u8 = 1;
const HAS_MEMBERSHIP: u8 = 2;
const HAS_ATTACHMENT: u8 = 4;
/// An attachment (epoch, node) follows the membership bytes.
const ATTACHMENT_BYTES: usize = 16;

fn put_log_id(buf: &mut [u8], at: usize, id: LogId) {
    put_u64(buf, at, id.term);
    put_u64(buf, at + 8, id.node);
    put_u64(buf, at + 16, id.index);
}

fn log_id_at(buf: &[u8], at: usize) -> LogId {
    LogId { term: u64_at(buf, at), node: u64_at(buf, at + 8), index: u64_at(buf, at + 16) }
}

impl Applied {
    fn encode(&self) -> Vec<u8> {
        let bytes = self.membership.as_ref().map_or(&[][..], |(_, b)| b.as_slice());
        let attachment = if self.attachment.is_some() { ATTACHMENT_BYTES } else { 0 };
        let mut buf = vec![0u8; APPLIED_FIXED + bytes.len() + attachment];
        if let Some(id) = self.log_id {
            buf[0] |= HAS_LOG_ID;
            put_log_id(&mut buf, 8, id);
        }
        if let Some((id, _)) = &self.membership {
            buf[0] |= HAS_MEMBERSHIP;
            put_log_id(&mut buf, 32, *id);
        }
        put_u32(&mut buf, 4, bytes.len() as u32);
        buf[APPLIED_FIXED..APPLIED_FIXED + bytes.len()].copy_from_slice(bytes);
        if let Some(a) = self.attachment {
            buf[0] |= HAS_ATTACHMENT;
            let at = APPLIED_FIXED + bytes.len();
            put_u64(&mut buf, at, a.epoch);
            put_u64(&mut buf, at + 8, a.node);
        }
        buf
    }

    fn decode(buf: &[u8]) -> std::result::Result<Applied, String> {
        let bad = || format!("malformed applied state of {} bytes", buf.len());
        if buf.len() < APPLIED_FIXED
            || buf[0] & !(HAS_LOG_ID | HAS_MEMBERSHIP | HAS_ATTACHMENT) != 0
        {
            return Err(bad());
        }
        let m_len = u32_at(buf, 4) as usize;
        let a_len = if buf[0] & HAS_ATTACHMENT != 0 { ATTACHMENT_BYTES } else { 0 };
        if APPLIED_FIXED.checked_add(m_len).and_then(|n| n.checked_add(a_len)) != Some(buf.len())
            || (buf[0] & HAS_MEMBERSHIP == 0 && m_len != 0)
        {
            return Err(bad());
        }
        let log_id = (buf[0] & HAS_LOG_ID != 0).then(|| log_id_at(buf, 8));
        let m_end = APPLIED_FIXED + m_len;
        let membership = (buf[0] & HAS_MEMBERSHIP != 0)
            .then(|| (log_id_at(buf, 32), buf[APPLIED_FIXED..m_end].to_vec()));
        let attachment = (a_len != 0)
            .then(|| Attachment { epoch: u64_at(buf, m_end), node: u64_at(buf, m_end + 8) });
        Ok(Applied { log_id, membership, attachment })
    }
}

/// The checksum of block `lba` holding `data`, never 0.
pub fn block_checksum(lba: u64, data: &[u8]) -> u32 {
    match crc32c::crc32c_append(crc32c::crc32c(&lba.to_le_bytes()), data) {
        0 => u32::MAX,
        crc => crc,
    }
}

#[derive(Debug)]
struct Table {
    entries: Vec<u32>,
    dirty_pages: BTreeSet<u64>,
    /// The aligned buffer block writes are staged in, kept between writes so applying a steady
    /// stream does not allocate and free an I/O chunk per write.
    staging: Option<AlignedBuf>,
}

/// A block whose bytes on disk do not match its checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadBlock {
    pub lba: u64,
    /// What the checksum table says the block holds.
    pub expected: u32,
    /// The checksum of what was read.
    pub found: u32,
    /// The disk and byte offset, for the error report.
    pub location: String,
}

impl BadBlock {
    pub fn into_error(self) -> StorageError {
        StorageError::corrupt(
            "data block",
            format!("{} (lba {})", self.location, self.lba),
            format!(
                "checksum mismatch (expected {:#010x}, found {:#010x})",
                self.expected, self.found
            ),
        )
    }
}

/// The block image of one replica.
#[derive(Debug)]
pub struct Image {
    disk: Arc<dyn Disk>,
    geometry: ImageGeometry,
    header: SlotPair,
    poison: Arc<Poison>,
    /// Writers (apply, discard, checkpoint) exclude readers so a read never sees a block and its
    /// checksum from different writes.
    table: RwLock<Table>,
    applied: Mutex<(u64, Applied)>,
}

impl Image {
    /// Initialises a fresh image on `disk`: blank header state and an all-zero checksum table.
    /// `owner`: the device uuid, which the header's slots carry.
    pub fn format(disk: &Arc<dyn Disk>, geometry: ImageGeometry, owner: uuid::Uuid) -> Result<()> {
        check_fits(disk, &geometry)?;
        let header = SlotPair::new(disk.clone(), 0, *b"XDEVIMGH", owner, "image header");
        let entries = vec![0u32; geometry.blocks as usize];
        let pages = table_pages(&geometry);
        write_table_pages(disk, &entries, 0..pages)?;
        disk.sync_data().map_err(|e| StorageError::io("sync", disk.describe(), e))?;
        header.store(1, &Applied::default().encode())
    }

    /// Opens the image of device `owner`: header, then the whole checksum table, verifying every
    /// sector. Another device's image is refused as foreign.
    pub fn open(
        disk: Arc<dyn Disk>,
        geometry: ImageGeometry,
        owner: uuid::Uuid,
        poison: Arc<Poison>,
    ) -> Result<(Image, Option<String>)> {
        check_fits(&disk, &geometry)?;
        let header = SlotPair::new(disk.clone(), 0, *b"XDEVIMGH", owner, "image header");
        let location = format!("{} offset 0", disk.describe());
        let loaded = header.load()?.ok_or_else(|| {
            StorageError::corrupt("image header", &location, "both slots are blank")
        })?;
        let applied = Applied::decode(&loaded.payload)
            .map_err(|r| StorageError::corrupt("image header", &location, r))?;
        let entries = read_table(&disk, &geometry)?;
        let image = Image {
            disk,
            geometry,
            header,
            poison,
            table: RwLock::new(Table { entries, dirty_pages: BTreeSet::new(), staging: None }),
            applied: Mutex::new((loaded.seq, applied)),
        };
        Ok((image, loaded.damaged))
    }

    pub fn geometry(&self) -> ImageGeometry {
        self.geometry
    }

    /// What the last checkpoint persisted.
    pub fn applied(&self) -> Applied {
        self.applied.lock().expect("image lock").1.clone()
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<()> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.geometry.blocks => Ok(()),
            _ => Err(StorageError::Invalid(format!(
                "blocks [{lba}, +{blocks}) beyond the device's {} blocks",
                self.geometry.blocks
            ))),
        }
    }

    fn block_offset(&self, lba: u64) -> u64 {
        self.geometry.data_offset + lba * self.geometry.block_bytes as u64
    }

    /// Writes whole blocks starting at `lba`. Not durable until `checkpoint`.
    pub fn write_blocks(&self, lba: u64, data: &[u8]) -> Result<()> {
        self.poison.check()?;
        let bs = self.geometry.block_bytes as usize;
        if data.len() % bs != 0 {
            return Err(StorageError::Invalid(format!(
                "write of {} bytes is not whole {bs}-byte blocks",
                data.len()
            )));
        }
        self.check_range(lba, (data.len() / bs) as u64)?;
        let mut table = self.table.write().expect("image lock");
        let chunk_blocks = (IO_CHUNK_BYTES / bs).max(1);
        let mut buf = match table.staging.take() {
            Some(buf) if buf.len() >= (chunk_blocks * bs).next_multiple_of(IO_ALIGN) => buf,
            _ => AlignedBuf::zeroed(chunk_blocks * bs),
        };
        for (i, chunk) in data.chunks(chunk_blocks * bs).enumerate() {
            let first = lba + (i * chunk_blocks) as u64;
            let len = chunk.len().next_multiple_of(IO_ALIGN);
            buf[..chunk.len()].copy_from_slice(chunk);
            buf[chunk.len()..len].fill(0);
            if let Err(e) = self.disk.write_at(self.block_offset(first), &buf[..len]) {
                table.staging = Some(buf);
                let err = StorageError::io(
                    "write block",
                    format!("{} lba {first}", self.disk.describe()),
                    e,
                );
                return Err(self.poison.set(&err));
            }
            for (j, block) in chunk.chunks(bs).enumerate() {
                let b = first + j as u64;
                table.entries[b as usize] = block_checksum(b, block);
                table.dirty_pages.insert(page_of(b));
            }
        }
        table.staging = Some(buf);
        Ok(())
    }

    /// Makes `[lba, lba + blocks)` read as zeros (discard and write-zeroes).
    pub fn zero_blocks(&self, lba: u64, blocks: u64) -> Result<()> {
        self.poison.check()?;
        self.check_range(lba, blocks)?;
        let mut table = self.table.write().expect("image lock");
        for b in lba..lba + blocks {
            table.entries[b as usize] = 0;
            table.dirty_pages.insert(page_of(b));
        }
        Ok(())
    }

    /// Checks that `len` bytes at `lba` are whole blocks inside the image; returns the blocks.
    fn check_read(&self, lba: u64, len: usize) -> Result<usize> {
        let bs = self.geometry.block_bytes as usize;
        if len % bs != 0 {
            return Err(StorageError::Invalid(format!(
                "read of {len} bytes is not whole {bs}-byte blocks"
            )));
        }
        self.check_range(lba, (len / bs) as u64)?;
        Ok(len / bs)
    }

    /// Reads whole blocks into `out`, verifying each block's checksum.
    pub fn read_blocks(&self, lba: u64, out: &mut [u8]) -> Result<()> {
        self.check_read(lba, out.len())?;
        let table = self.table.read().expect("image lock");
        self.read_locked(&table, lba, out)
    }

    /// Like `read_blocks`, also saying which blocks hold written data (the rest read as zeros),
    /// both from one instant: no write lands between the two.
    pub fn read_extent(&self, lba: u64, out: &mut [u8]) -> Result<Vec<bool>> {
        let blocks = self.check_read(lba, out.len())?;
        let table = self.table.read().expect("image lock");
        self.read_locked(&table, lba, out)?;
        Ok(table.entries[lba as usize..lba as usize + blocks].iter().map(|&s| s != 0).collect())
    }

    fn read_locked(&self, table: &Table, lba: u64, out: &mut [u8]) -> Result<()> {
        match self.read_checked_locked(table, lba, out)?.into_iter().next() {
            None => Ok(()),
            Some(bad) => Err(bad.into_error()),
        }
    }

    /// Like `read_blocks`, but a block failing its checksum does not fail the read: it is
    /// zero-filled in `out` and reported, so the caller can fetch it from another replica.
    pub fn read_verified(&self, lba: u64, out: &mut [u8]) -> Result<Vec<BadBlock>> {
        self.check_read(lba, out.len())?;
        let table = self.table.read().expect("image lock");
        self.read_checked_locked(&table, lba, out)
    }

    fn read_checked_locked(
        &self,
        table: &Table,
        lba: u64,
        out: &mut [u8],
    ) -> Result<Vec<BadBlock>> {
        let bs = self.geometry.block_bytes as usize;
        let chunk_blocks = (IO_CHUNK_BYTES / bs).max(1);
        let mut bad = Vec::new();
        for (i, chunk) in out.chunks_mut(chunk_blocks * bs).enumerate() {
            let first = lba + (i * chunk_blocks) as u64;
            let sums = &table.entries[first as usize..first as usize + chunk.len() / bs];
            if sums.iter().all(|&s| s == 0) {
                chunk.fill(0);
                continue;
            }
            let mut buf = AlignedBuf::zeroed(chunk.len());
            let len = chunk.len().next_multiple_of(IO_ALIGN);
            self.disk.read_at(self.block_offset(first), &mut buf[..len]).map_err(|e| {
                StorageError::io("read block", format!("{} lba {first}", self.disk.describe()), e)
            })?;
            for (j, (dst, &sum)) in chunk.chunks_mut(bs).zip(sums).enumerate() {
                let b = first + j as u64;
                let src = &buf[j * bs..(j + 1) * bs];
                if sum == 0 {
                    dst.fill(0);
                    continue;
                }
                let found = block_checksum(b, src);
                if found == sum {
                    dst.copy_from_slice(src);
                } else {
                    dst.fill(0);
                    bad.push(BadBlock {
                        lba: b,
                        expected: sum,
                        found,
                        location: format!(
                            "{} offset {}",
                            self.disk.describe(),
                            self.block_offset(b)
                        ),
                    });
                }
            }
        }
        Ok(bad)
    }

    /// Rewrites block `lba` with `data` from another replica, but only if `data` is exactly what
    /// this image's checksum table says the block holds: a repair never changes what the image
    /// means, only restores it. True if the block was rewritten (and synced).
    pub fn repair_block(&self, lba: u64, data: &[u8]) -> Result<bool> {
        self.poison.check()?;
        let bs = self.geometry.block_bytes as usize;
        if data.len() != bs {
            return Err(StorageError::Invalid(format!(
                "a repair is one {bs}-byte block, not {} bytes",
                data.len()
            )));
        }
        self.check_range(lba, 1)?;
        let table = self.table.write().expect("image lock");
        let sum = table.entries[lba as usize];
        if sum == 0 || sum != block_checksum(lba, data) {
            return Ok(false);
        }
        let buf = AlignedBuf::from_slice_padded(data);
        let io = &buf[..bs.next_multiple_of(IO_ALIGN)];
        let result = self
            .disk
            .write_at(self.block_offset(lba), io)
            .and_then(|()| self.disk.sync_data())
            .map_err(|e| {
                StorageError::io("repair block", format!("{} lba {lba}", self.disk.describe()), e)
            });
        drop(table);
        match result {
            Ok(()) => Ok(true),
            Err(e) => Err(self.poison.set(&e)),
        }
    }

    /// Makes every block written so far durable together with its checksum, then persists
    /// `applied` as the new replay start. Blocks writers for its duration.
    pub fn checkpoint(&self, applied: Applied) -> Result<()> {
        self.poison.check()?;
        let mut table = self.table.write().expect("image lock");
        let pages = std::mem::take(&mut table.dirty_pages);
        let result = self.persist(&table.entries, &pages, &applied);
        if let Err(e) = result {
            return Err(self.poison.set(&e));
        }
        Ok(())
    }

    fn persist(&self, entries: &[u32], pages: &BTreeSet<u64>, applied: &Applied) -> Result<()> {
        for &page in pages {
            write_table_pages(&self.disk, entries, page..page + 1)?;
        }
        self.disk.sync_data().map_err(|e| StorageError::io("sync", self.disk.describe(), e))?;
        let mut current = self.applied.lock().expect("image lock");
        let seq = current.0 + 1;
        self.header.store(seq, &applied.encode())?;
        *current = (seq, applied.clone());
        Ok(())
    }

    /// Number of written (non-zero) blocks, for inspection.
    pub fn written_blocks(&self) -> u64 {
        self.table.read().expect("image lock").entries.iter().filter(|&&s| s != 0).count() as u64
    }
}

const SECTORS_PER_PAGE: u64 = (IO_ALIGN / SECTOR_BYTES) as u64;

fn page_of(lba: u64) -> u64 {
    lba / ENTRIES_PER_SECTOR / SECTORS_PER_PAGE
}

fn table_pages(g: &ImageGeometry) -> u64 {
    g.table_sectors.div_ceil(SECTORS_PER_PAGE)
}

fn check_fits(disk: &Arc<dyn Disk>, g: &ImageGeometry) -> Result<()> {
    if disk.len_bytes() < g.total_bytes {
        return Err(StorageError::Invalid(format!(
            "{} holds {} bytes, the image needs {}",
            disk.describe(),
            disk.len_bytes(),
            g.total_bytes
        )));
    }
    Ok(())
}

/// Encodes table pages `pages` from `entries` and writes them (without syncing).
fn write_table_pages(
    disk: &Arc<dyn Disk>,
    entries: &[u32],
    pages: std::ops::Range<u64>,
) -> Result<()> {
    const BATCH_PAGES: u64 = 256;
    let mut start = pages.start;
    while start < pages.end {
        let end = (start + BATCH_PAGES).min(pages.end);
        let mut buf = AlignedBuf::zeroed(((end - start) as usize) * IO_ALIGN);
        for sector in start * SECTORS_PER_PAGE..end * SECTORS_PER_PAGE {
            let at = ((sector - start * SECTORS_PER_PAGE) as usize) * SECTOR_BYTES;
            encode_sector(entries, sector, &mut buf[at..at + SECTOR_BYTES]);
        }
        disk.write_at(TABLE_OFFSET + start * IO_ALIGN as u64, &buf)
            .map_err(|e| StorageError::io("write checksum table", disk.describe(), e))?;
        start = end;
    }
    Ok(())
}

fn encode_sector(entries: &[u32], sector: u64, out: &mut [u8]) {
    let first = (sector * ENTRIES_PER_SECTOR) as usize;
    for i in 0..ENTRIES_PER_SECTOR as usize {
        put_u32(out, i * 4, entries.get(first + i).copied().unwrap_or(0));
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&sector.to_le_bytes()), &out[..508]);
    put_u32(out, 508, crc);
}

fn read_table(disk: &Arc<dyn Disk>, g: &ImageGeometry) -> Result<Vec<u32>> {
    let mut entries = vec![0u32; g.blocks as usize];
    let pages = table_pages(g);
    let batch_pages = 256u64;
    let mut start = 0;
    while start < pages {
        let end = (start + batch_pages).min(pages);
        let mut buf = AlignedBuf::zeroed(((end - start) as usize) * IO_ALIGN);
        let offset = TABLE_OFFSET + start * IO_ALIGN as u64;
        disk.read_at(offset, &mut buf)
            .map_err(|e| StorageError::io("read checksum table", disk.describe(), e))?;
        let sectors = (start * SECTORS_PER_PAGE)..(end * SECTORS_PER_PAGE).min(g.table_sectors);
        for sector in sectors {
            let at = ((sector - start * SECTORS_PER_PAGE) as usize) * SECTOR_BYTES;
            let raw = &buf[at..at + SECTOR_BYTES];
            let crc = crc32c::crc32c_append(crc32c::crc32c(&sector.to_le_bytes()), &raw[..508]);
            if crc != u32_at(raw, 508) {
                return Err(StorageError::corrupt(
                    "checksum table sector",
                    format!(
                        "{} offset {}",
                        disk.describe(),
                        TABLE_OFFSET + sector * SECTOR_BYTES as u64
                    ),
                    format!(
                        "sector {sector} fails its checksum; blocks {}..{} cannot be verified",
                        sector * ENTRIES_PER_SECTOR,
                        (sector + 1) * ENTRIES_PER_SECTOR
                    ),
                ));
            }
            for i in 0..ENTRIES_PER_SECTOR {
                let b = sector * ENTRIES_PER_SECTOR + i;
                if b < g.blocks {
                    entries[b as usize] = u32_at(raw, i as usize * 4);
                }
            }
        }
        start = end;
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_is_aligned() {
        let g = ImageGeometry::new(1 << 30, 4096);
        assert_eq!(g.blocks, 262_144);
        assert_eq!(g.table_sectors, 262_144u64.div_ceil(127));
        assert_eq!(g.data_offset % DATA_ALIGN, 0);
        assert!(g.data_offset >= TABLE_OFFSET + g.table_sectors * 512);
    }

    #[test]
    fn checksum_depends_on_lba_and_is_never_zero() {
        let block = vec![7u8; 4096];
        assert_ne!(block_checksum(1, &block), block_checksum(2, &block));
        assert_ne!(block_checksum(0, &block), 0);
    }

    #[test]
    fn applied_round_trip() {
        let id = LogId { term: 2, node: 3, index: 4 };
        let a = Applied { log_id: Some(id), membership: Some((id, vec![9; 10])), attachment: None };
        assert_eq!(Applied::decode(&a.encode()).expect("decode"), a);
        let attached = Applied { attachment: Some(Attachment { epoch: 40, node: 2 }), ..a.clone() };
        assert_eq!(Applied::decode(&attached.encode()).expect("decode"), attached);
        let bare =
            Applied { attachment: Some(Attachment { epoch: 7, node: 0 }), ..Applied::default() };
        assert_eq!(Applied::decode(&bare.encode()).expect("decode"), bare);
        let empty = Applied::default();
        assert_eq!(Applied::decode(&empty.encode()).expect("decode"), empty);
        assert!(Applied::decode(&[8u8; 56]).is_err(), "an unknown flag");
        let mut no_flag = a.encode();
        no_flag[0] = HAS_LOG_ID;
        assert!(Applied::decode(&no_flag).is_err(), "membership bytes without the flag");
        let mut cut = attached.encode();
        cut.pop();
        assert!(Applied::decode(&cut).is_err(), "a truncated attachment");
        let mut lost = attached.encode();
        lost[0] &= !HAS_ATTACHMENT;
        assert!(Applied::decode(&lost).is_err(), "attachment bytes without the flag");
    }

    #[test]
    fn attachments_admit_only_their_own_writes() {
        let held = Some(Attachment { epoch: 9, node: 2 });
        let detached = Some(Attachment { epoch: 12, node: 0 });
        assert!(Attachment::admits(None, None), "no attachment ever: unfenced writes apply");
        assert!(!Attachment::admits(None, Some(9)));
        assert!(Attachment::admits(held, Some(9)));
        assert!(!Attachment::admits(held, Some(5)), "an older epoch");
        assert!(!Attachment::admits(held, Some(12)), "an epoch not (yet) attached");
        assert!(Attachment::admits(held, None), "an unfenced write was answered: it applies");
        assert!(!Attachment::admits(detached, Some(9)), "the detached server's epoch");
        assert!(!Attachment::admits(detached, Some(12)), "the detach entry's own index");
        assert!(Attachment::admits(detached, None));
    }
}
