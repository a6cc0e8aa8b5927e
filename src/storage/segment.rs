//! WAL segments: the header that opens each one, and the two places segments live — files named
//! `{dev}_log_{seq:010}` in a data directory, or fixed slots of a raw device's WAL region.
//!
//! ```text
//! segment header (first 4096 bytes of every segment; records start at byte 4096)
//! offset size field
//!   0     8   magic            "XDEVSEG1"
//!   8     4   format_version
//!  12     4   salt             random per incarnation; seeds every record checksum in it
//!  16    16   device_uuid
//!  32     8   seq              position in the segment chain (consecutive)
//!  40     8   first_index      index the first entry written here will have
//!  48     8   prev_sealed      where the previous segment's records end (0: no previous)
//!  56     8   segment_bytes
//!  64     8   created_us
//!  72     1   purged present   (then 7 zero bytes)
//!  80    24   purged log id    term, node, index, at creation
//! 104     4   crc32c of bytes 0..104
//! ```
//!
//! A prepared spare (the next segment, made ready off the commit path and not yet part of the
//! chain) has a header of the same layout, every other byte zero; rotation writes a segment
//! header over it in the same write as the segment's first records:
//!
//! ```text
//! spare header (first 4096 bytes of a prepared spare)
//! offset size field
//!   0     8   magic            "XDEVSPR1"
//!   8     4   format_version
//!  16    16   device_uuid
//!  32     8   seq              the seq this spare is prepared for
//!  56     8   segment_bytes
//!  64     8   created_us
//! 104     4   crc32c of bytes 0..104
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

use super::disk::{AlignedBuf, Disk, RegionDisk, Volume, IO_ALIGN};
use super::error::{Result, StorageError};
use super::le::{put_u32, put_u64, seal, sealed, u32_at, u64_at};
use super::state::LogId;
use super::superblock::FORMAT_VERSION;

/// Bytes reserved for the header at the start of each segment.
pub const SEGMENT_HEADER_BYTES: u64 = IO_ALIGN as u64;
const MAGIC: &[u8; 8] = b"XDEVSEG1";
const SPARE_MAGIC: &[u8; 8] = b"XDEVSPR1";
const CRC_AT: usize = 104;
const _: () = assert!(CRC_AT + 4 <= SEGMENT_HEADER_BYTES as usize);

/// The decoded header of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SegmentHeader {
    pub salt: u32,
    pub device_uuid: Uuid,
    pub seq: u64,
    pub first_index: u64,
    pub prev_sealed: u64,
    pub segment_bytes: u64,
    pub created_us: u64,
    pub purged: Option<LogId>,
}

impl SegmentHeader {
    /// A header for a new incarnation of segment `seq`: a fresh random salt and the time now.
    pub fn new(
        device_uuid: Uuid,
        seq: u64,
        first_index: u64,
        prev_sealed: u64,
        segment_bytes: u64,
        purged: Option<LogId>,
    ) -> SegmentHeader {
        use rand::Rng;
        SegmentHeader {
            salt: rand::thread_rng().gen(),
            device_uuid,
            seq,
            first_index,
            prev_sealed,
            segment_bytes,
            created_us: super::le::now_us(),
            purged,
        }
    }

    pub fn encode(&self) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(SEGMENT_HEADER_BYTES as usize);
        buf[0..8].copy_from_slice(MAGIC);
        put_u32(&mut buf, 8, FORMAT_VERSION);
        put_u32(&mut buf, 12, self.salt);
        buf[16..32].copy_from_slice(self.device_uuid.as_bytes());
        put_u64(&mut buf, 32, self.seq);
        put_u64(&mut buf, 40, self.first_index);
        put_u64(&mut buf, 48, self.prev_sealed);
        put_u64(&mut buf, 56, self.segment_bytes);
        put_u64(&mut buf, 64, self.created_us);
        if let Some(p) = self.purged {
            buf[72] = 1;
            put_u64(&mut buf, 80, p.term);
            put_u64(&mut buf, 88, p.node);
            put_u64(&mut buf, 96, p.index);
        }
        seal(&mut buf, CRC_AT);
        buf
    }

    /// Decodes a header; `Ok(None)` for an all-zero (never written or released) header. A
    /// spare's header is an error here: use `HeaderBlock::decode` where spares may appear.
    pub fn decode(buf: &[u8]) -> std::result::Result<Option<SegmentHeader>, String> {
        match HeaderBlock::decode(buf)? {
            HeaderBlock::Blank => Ok(None),
            HeaderBlock::Segment(h) => Ok(Some(h)),
            HeaderBlock::Spare(s) => Err(format!("a prepared spare for seq {}", s.seq)),
        }
    }

    fn decode_fields(buf: &[u8]) -> std::result::Result<SegmentHeader, String> {
        if buf[72] > 1 {
            return Err(format!("bad purged flag {}", buf[72]));
        }
        Ok(SegmentHeader {
            salt: u32_at(buf, 12),
            device_uuid: uuid_at(buf),
            seq: u64_at(buf, 32),
            first_index: u64_at(buf, 40),
            prev_sealed: u64_at(buf, 48),
            segment_bytes: u64_at(buf, 56),
            created_us: u64_at(buf, 64),
            purged: (buf[72] == 1).then(|| LogId {
                term: u64_at(buf, 80),
                node: u64_at(buf, 88),
                index: u64_at(buf, 96),
            }),
        })
    }
}

/// The header of a prepared spare: a segment file or slot allocated (and, in a directory,
/// filled and named) for `seq`, durable, and not part of the chain until rotation writes a
/// segment header over this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SpareHeader {
    pub device_uuid: Uuid,
    pub seq: u64,
    pub segment_bytes: u64,
    pub created_us: u64,
}

impl SpareHeader {
    pub fn new(device_uuid: Uuid, seq: u64, segment_bytes: u64) -> SpareHeader {
        SpareHeader { device_uuid, seq, segment_bytes, created_us: super::le::now_us() }
    }

    pub fn encode(&self) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(SEGMENT_HEADER_BYTES as usize);
        buf[0..8].copy_from_slice(SPARE_MAGIC);
        put_u32(&mut buf, 8, FORMAT_VERSION);
        buf[16..32].copy_from_slice(self.device_uuid.as_bytes());
        put_u64(&mut buf, 32, self.seq);
        put_u64(&mut buf, 56, self.segment_bytes);
        put_u64(&mut buf, 64, self.created_us);
        seal(&mut buf, CRC_AT);
        buf
    }

    fn decode_fields(buf: &[u8]) -> std::result::Result<SpareHeader, String> {
        let unused = [12..16, 40..56, 72..104];
        if unused.iter().any(|r| buf[r.clone()].iter().any(|&b| b != 0)) {
            return Err("a spare header with fields set that a spare leaves zero".into());
        }
        Ok(SpareHeader {
            device_uuid: uuid_at(buf),
            seq: u64_at(buf, 32),
            segment_bytes: u64_at(buf, 56),
            created_us: u64_at(buf, 64),
        })
    }
}

/// What the first block of a segment place holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderBlock {
    /// All zero: never written, or released.
    Blank,
    /// A segment of the chain (or a stale one).
    Segment(SegmentHeader),
    /// A prepared spare, never part of the chain.
    Spare(SpareHeader),
}

impl HeaderBlock {
    /// Decodes the header block; an error says why it is neither blank nor a valid header.
    pub fn decode(buf: &[u8]) -> std::result::Result<HeaderBlock, String> {
        if buf[..CRC_AT + 4].iter().all(|&b| b == 0) {
            return Ok(HeaderBlock::Blank);
        }
        let spare = match &buf[0..8] {
            m if m == MAGIC => false,
            m if m == SPARE_MAGIC => true,
            _ => return Err("bad segment magic".into()),
        };
        if !sealed(buf, CRC_AT) {
            return Err("segment header checksum mismatch".into());
        }
        let version = u32_at(buf, 8);
        if version != FORMAT_VERSION {
            return Err(format!(
                "segment format version {version}, this build reads {FORMAT_VERSION}"
            ));
        }
        if spare {
            SpareHeader::decode_fields(buf).map(HeaderBlock::Spare)
        } else {
            SegmentHeader::decode_fields(buf).map(HeaderBlock::Segment)
        }
    }
}

fn uuid_at(buf: &[u8]) -> Uuid {
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&buf[16..32]);
    Uuid::from_bytes(uuid)
}

/// A place that may hold a segment: its store id, a name for messages, and its disk.
#[derive(Clone, Debug)]
pub struct SegmentPlace {
    pub id: u64,
    pub name: String,
    pub disk: Arc<dyn Disk>,
    /// For directories: the seq in the file name (the header must agree).
    pub named_seq: Option<u64>,
}

/// Where segments live. Allocation and release become durable with `sync`.
pub trait SegmentStore: Send + Sync + fmt::Debug {
    /// Every place that holds (or may hold) a segment.
    fn list(&self) -> Result<Vec<SegmentPlace>>;
    /// A place for a new segment `seq`, not one of `live` (store ids).
    fn allocate(&self, seq: u64, live: &HashSet<u64>) -> Result<SegmentPlace>;
    /// Gives a place back.
    fn release(&self, place: &SegmentPlace) -> Result<()>;
    /// Makes allocations and releases durable.
    fn sync(&self) -> Result<()>;
}

/// Segments as files `{prefix}log_{seq:010}` of a volume.
#[derive(Debug)]
pub struct DirSegments {
    volume: Arc<dyn Volume>,
    prefix: String,
    segment_bytes: u64,
    fill: bool,
}

impl DirSegments {
    pub fn new(volume: Arc<dyn Volume>, prefix: &str, segment_bytes: u64, fill: bool) -> Self {
        DirSegments { volume, prefix: format!("{prefix}log_"), segment_bytes, fill }
    }

    fn name(&self, seq: u64) -> String {
        format!("{}{seq:010}", self.prefix)
    }
}

impl SegmentStore for DirSegments {
    fn list(&self) -> Result<Vec<SegmentPlace>> {
        let names =
            self.volume.list().map_err(|e| StorageError::io("list", self.volume.describe(), e))?;
        let mut places = Vec::new();
        for name in names {
            let Some(seq) = name.strip_prefix(&self.prefix).and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            let disk = self.volume.open(&name).map_err(|e| StorageError::io("open", &name, e))?;
            places.push(SegmentPlace { id: seq, name, disk, named_seq: Some(seq) });
        }
        places.sort_by_key(|p| p.id);
        Ok(places)
    }

    fn allocate(&self, seq: u64, _live: &HashSet<u64>) -> Result<SegmentPlace> {
        let name = self.name(seq);
        let disk = self.volume.create(&name, self.segment_bytes, self.fill).map_err(|e| {
            StorageError::io("create segment", format!("{}/{name}", self.volume.describe()), e)
        })?;
        Ok(SegmentPlace { id: seq, name, disk, named_seq: Some(seq) })
    }

    fn release(&self, place: &SegmentPlace) -> Result<()> {
        self.volume.remove(&place.name).map_err(|e| {
            StorageError::io(
                "remove segment",
                format!("{}/{}", self.volume.describe(), place.name),
                e,
            )
        })
    }

    fn sync(&self) -> Result<()> {
        self.volume
            .sync()
            .map_err(|e| StorageError::io("sync directory", self.volume.describe(), e))
    }
}

/// Segments as `slots` fixed slots of `segment_bytes` from `base` of a raw device.
#[derive(Debug)]
pub struct RawSegments {
    disk: Arc<dyn Disk>,
    base: u64,
    slots: u64,
    segment_bytes: u64,
}

impl RawSegments {
    pub fn new(disk: Arc<dyn Disk>, base: u64, slots: u64, segment_bytes: u64) -> Self {
        RawSegments { disk, base, slots, segment_bytes }
    }

    fn place(&self, slot: u64) -> Result<SegmentPlace> {
        let region = RegionDisk::new(
            self.disk.clone(),
            "wal slot",
            self.base + slot * self.segment_bytes,
            self.segment_bytes,
        )
        .map_err(|e| StorageError::io("map WAL slot", self.disk.describe(), e))?;
        Ok(SegmentPlace {
            id: slot,
            name: format!("WAL slot {slot}"),
            disk: Arc::new(region),
            named_seq: None,
        })
    }
}

impl SegmentStore for RawSegments {
    fn list(&self) -> Result<Vec<SegmentPlace>> {
        (0..self.slots).map(|slot| self.place(slot)).collect()
    }

    fn allocate(&self, seq: u64, live: &HashSet<u64>) -> Result<SegmentPlace> {
        let free = (0..self.slots).find(|slot| !live.contains(slot)).ok_or_else(|| {
            StorageError::NoSpace(format!(
                "all {} WAL slots hold live segments (next seq {seq}); checkpoint and purge the log",
                self.slots
            ))
        })?;
        self.place(free)
    }

    fn release(&self, place: &SegmentPlace) -> Result<()> {
        let zero = AlignedBuf::zeroed(SEGMENT_HEADER_BYTES as usize);
        place
            .disk
            .write_at(0, &zero)
            .map_err(|e| StorageError::io("release WAL slot", &place.name, e))
    }

    fn sync(&self) -> Result<()> {
        self.disk.sync_data().map_err(|e| StorageError::io("sync", self.disk.describe(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SegmentHeader {
        SegmentHeader {
            salt: 0xdead_beef,
            device_uuid: Uuid::from_u128(7),
            seq: 3,
            first_index: 100,
            prev_sealed: 8192,
            segment_bytes: 1 << 20,
            created_us: 5,
            purged: Some(LogId { term: 1, node: 2, index: 50 }),
        }
    }

    #[test]
    fn round_trip_and_zero() {
        let h = sample();
        assert_eq!(SegmentHeader::decode(&h.encode()).expect("decode"), Some(h));
        assert_eq!(SegmentHeader::decode(&[0u8; 4096]).expect("zero"), None);
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let spare = SpareHeader::new(Uuid::from_u128(7), 4, 1 << 20);
        for buf in [sample().encode(), spare.encode()] {
            for i in 0..CRC_AT + 4 {
                let mut bad = buf.clone();
                bad[i] ^= 0x04;
                assert!(HeaderBlock::decode(&bad).is_err(), "flip at {i} accepted");
            }
        }
    }

    #[test]
    fn spares_are_told_from_segments() {
        let spare = SpareHeader::new(Uuid::from_u128(7), 4, 1 << 20);
        assert_eq!(HeaderBlock::decode(&spare.encode()), Ok(HeaderBlock::Spare(spare)));
        assert!(SegmentHeader::decode(&spare.encode()).is_err(), "a spare is not a segment");
        let h = sample();
        assert_eq!(HeaderBlock::decode(&h.encode()), Ok(HeaderBlock::Segment(h)));
        assert_eq!(HeaderBlock::decode(&[0u8; 4096]), Ok(HeaderBlock::Blank));
    }
}
