//! The superblock: identity and geometry of one replica's store, kept in `SUPERBLOCK_COPIES`
//! checksummed copies and chosen on open by the valid copies with the highest sequence number.
//!
//! ```text
//! offset size field
//!   0     8   magic            "XDEVSUPR"
//!   8     4   format_version   FORMAT_VERSION
//!  12     4   copy             which copy this is (0..SUPERBLOCK_COPIES)
//!  16     8   seq              bumped on every superblock rewrite
//!  24    16   device_uuid
//!  40    16   cluster_id
//!  56     8   device_bytes     size of the block device served
//!  64     4   block_bytes      block size of the image and of device I/O
//!  68     4   layout           1 directory of files, 2 raw block device
//!  72     8   segment_bytes    size of each WAL segment
//!  80     8   wal_offset       raw layout: first byte of the WAL slots (0 for directories)
//!  88     8   wal_slots        raw layout: number of segment slots
//!  96     8   state_offset     raw layout: Raft state slots
//! 104     8   image_offset     raw layout: image region
//! 112     8   image_bytes      raw layout: image region length
//! 120     8   created_us
//! 128    32   device_name      UTF-8, zero padded
//! 160     8   node_id          the cluster member this store is for (0: not bound yet)
//! 168  3924   zero
//! 4092    4   crc32c of bytes 0..4092
//! ```

use std::sync::Arc;

use uuid::Uuid;

use super::disk::{AlignedBuf, Disk};
use super::error::{Result, StorageError};
use super::le::{now_us, put_u32, put_u64, seal, sealed, u32_at, u64_at};

/// Bytes of one superblock copy.
pub const SUPERBLOCK_BYTES: usize = 4096;
/// How many copies are written.
pub const SUPERBLOCK_COPIES: usize = 4;
/// The on-disk format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"XDEVSUPR";
/// Smallest block size: the image does aligned I/O per block, so no smaller than `IO_ALIGN`.
pub const MIN_BLOCK_BYTES: u32 = 4096;
/// Largest block size.
pub const MAX_BLOCK_BYTES: u32 = 65536;
/// Smallest WAL segment.
pub const MIN_SEGMENT_BYTES: u64 = 256 * 1024;
/// Largest WAL segment (it bounds every record's length on disk).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
const _: () = assert!(MIN_BLOCK_BYTES as usize == super::disk::IO_ALIGN);
const CRC_AT: usize = SUPERBLOCK_BYTES - 4;
const NAME_BYTES: usize = 32;
const _: () = assert!(128 + NAME_BYTES <= CRC_AT);
/// Where the node id lies (after the name).
const NODE_ID_AT: usize = 128 + NAME_BYTES;
const _: () = assert!(NODE_ID_AT + 8 <= CRC_AT);

/// How the store is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayoutKind {
    /// Files in a data directory.
    Directory = 1,
    /// Regions of one raw block device.
    Raw = 2,
}

/// Raw-device geometry (all zero for directories).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RawGeometry {
    pub wal_offset: u64,
    pub wal_slots: u64,
    pub state_offset: u64,
    pub image_offset: u64,
    pub image_bytes: u64,
}

/// The decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Superblock {
    pub seq: u64,
    pub device_uuid: Uuid,
    pub cluster_id: Uuid,
    pub device_bytes: u64,
    pub block_bytes: u32,
    pub layout: LayoutKind,
    pub segment_bytes: u64,
    pub raw: RawGeometry,
    pub created_us: u64,
    pub device_name: String,
    /// The cluster member this store is a replica of; 0 until a node first starts on it (or
    /// `format` names one). A store is never started as another node.
    pub node_id: u64,
}

/// Whether `buf` (one copy's bytes) starts with the superblock magic: an xdevice superblock,
/// valid or damaged, rather than someone else's data.
pub fn has_magic(buf: &[u8]) -> bool {
    buf.get(0..8) == Some(&MAGIC[..])
}

impl Superblock {
    /// Encodes copy number `copy`.
    pub fn encode(&self, copy: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(SUPERBLOCK_BYTES);
        buf[0..8].copy_from_slice(MAGIC);
        put_u32(&mut buf, 8, FORMAT_VERSION);
        put_u32(&mut buf, 12, copy as u32);
        put_u64(&mut buf, 16, self.seq);
        buf[24..40].copy_from_slice(self.device_uuid.as_bytes());
        buf[40..56].copy_from_slice(self.cluster_id.as_bytes());
        put_u64(&mut buf, 56, self.device_bytes);
        put_u32(&mut buf, 64, self.block_bytes);
        put_u32(&mut buf, 68, self.layout as u32);
        put_u64(&mut buf, 72, self.segment_bytes);
        put_u64(&mut buf, 80, self.raw.wal_offset);
        put_u64(&mut buf, 88, self.raw.wal_slots);
        put_u64(&mut buf, 96, self.raw.state_offset);
        put_u64(&mut buf, 104, self.raw.image_offset);
        put_u64(&mut buf, 112, self.raw.image_bytes);
        put_u64(&mut buf, 120, self.created_us);
        let name = self.device_name.as_bytes();
        let n = name.len().min(NAME_BYTES);
        buf[128..128 + n].copy_from_slice(&name[..n]);
        put_u64(&mut buf, NODE_ID_AT, self.node_id);
        seal(&mut buf, CRC_AT);
        buf
    }

    /// Decodes one copy; `location` names it in errors.
    pub fn decode(buf: &[u8], location: &str) -> Result<Superblock> {
        let bad = |reason: String| StorageError::corrupt("superblock", location, reason);
        if buf.len() < SUPERBLOCK_BYTES {
            return Err(bad(format!("{} bytes, need {SUPERBLOCK_BYTES}", buf.len())));
        }
        if &buf[0..8] != MAGIC {
            return Err(bad("bad magic".into()));
        }
        if !sealed(buf, CRC_AT) {
            return Err(bad("checksum mismatch".into()));
        }
        let version = u32_at(buf, 8);
        if version != FORMAT_VERSION {
            return Err(StorageError::Version {
                found: version,
                supported: FORMAT_VERSION,
                location: location.into(),
            });
        }
        let layout = match u32_at(buf, 68) {
            1 => LayoutKind::Directory,
            2 => LayoutKind::Raw,
            other => return Err(bad(format!("unknown layout {other}"))),
        };
        let name_raw = &buf[128..128 + NAME_BYTES];
        let name_len = name_raw.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
        let device_name = std::str::from_utf8(&name_raw[..name_len])
            .map_err(|_| bad("device name is not UTF-8".into()))?
            .to_string();
        let uuid_at = |o: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&buf[o..o + 16]);
            Uuid::from_bytes(b)
        };
        let sb = Superblock {
            seq: u64_at(buf, 16),
            device_uuid: uuid_at(24),
            cluster_id: uuid_at(40),
            device_bytes: u64_at(buf, 56),
            block_bytes: u32_at(buf, 64),
            layout,
            segment_bytes: u64_at(buf, 72),
            raw: RawGeometry {
                wal_offset: u64_at(buf, 80),
                wal_slots: u64_at(buf, 88),
                state_offset: u64_at(buf, 96),
                image_offset: u64_at(buf, 104),
                image_bytes: u64_at(buf, 112),
            },
            created_us: u64_at(buf, 120),
            device_name,
            node_id: u64_at(buf, NODE_ID_AT),
        };
        sb.validate().map_err(bad)?;
        Ok(sb)
    }

    /// Checks geometry invariants that a valid checksum alone does not prove.
    fn validate(&self) -> std::result::Result<(), String> {
        let block = self.block_bytes as u64;
        if !(MIN_BLOCK_BYTES as u64..=MAX_BLOCK_BYTES as u64).contains(&block)
            || !block.is_power_of_two()
        {
            return Err(format!(
                "block size {block} is not a power of two in {MIN_BLOCK_BYTES}..={MAX_BLOCK_BYTES}"
            ));
        }
        if self.device_bytes == 0 || self.device_bytes % block != 0 {
            return Err(format!(
                "device size {} is not a positive multiple of {block}",
                self.device_bytes
            ));
        }
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes)
            || self.segment_bytes % 4096 != 0
        {
            return Err(format!(
                "segment size {} is not a multiple of 4 KiB in {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                self.segment_bytes
            ));
        }
        Ok(())
    }

    /// A new superblock for `format`.
    pub fn new_now(mut sb: Superblock) -> Superblock {
        sb.seq = 1;
        sb.created_us = now_us();
        sb
    }
}

/// Where the copies live: a disk and a byte offset for each.
#[derive(Clone, Debug)]
pub struct CopyLocations(pub Vec<(Arc<dyn Disk>, u64)>);

/// What reading the copies found.
#[derive(Debug)]
pub struct SuperblockChoice {
    pub superblock: Superblock,
    /// Copies that were not valid or older, with the reason; `open` rewrites them.
    pub stale: Vec<(usize, String)>,
}

/// Reads every copy and chooses: the valid copies with the highest `seq` must agree.
pub fn choose(locations: &CopyLocations) -> Result<SuperblockChoice> {
    let mut valid: Vec<(usize, Superblock)> = Vec::new();
    let mut stale = Vec::new();
    let mut all_zero = true;
    let mut version_error = None;
    for (copy, (disk, offset)) in locations.0.iter().enumerate() {
        let location = format!("{} offset {offset} (copy {copy})", disk.describe());
        let mut buf = AlignedBuf::zeroed(SUPERBLOCK_BYTES);
        if let Err(e) = disk.read_at(*offset, &mut buf) {
            stale.push((copy, format!("unreadable: {e}")));
            continue;
        }
        all_zero &= buf.iter().all(|&b| b == 0);
        match Superblock::decode(&buf, &location) {
            Ok(sb) => valid.push((copy, sb)),
            Err(e @ StorageError::Version { .. }) => {
                stale.push((copy, e.to_string()));
                version_error = Some(e);
            }
            Err(e) => stale.push((copy, e.to_string())),
        }
    }
    // A copy written by another format version is never overwritten: refuse instead.
    if let Some(e) = version_error {
        return Err(e);
    }
    let Some(max_seq) = valid.iter().map(|(_, sb)| sb.seq).max() else {
        let what = describe_locations(locations);
        return Err(if all_zero {
            StorageError::Foreign(format!("{what} holds no superblock (not formatted)"))
        } else {
            let reasons: Vec<String> =
                stale.iter().map(|(c, r)| format!("copy {c}: {r}")).collect();
            StorageError::Foreign(format!(
                "{what} has no valid superblock copy ({})",
                reasons.join("; ")
            ))
        });
    };
    let newest: Vec<&(usize, Superblock)> =
        valid.iter().filter(|(_, sb)| sb.seq == max_seq).collect();
    let chosen = newest[0].1.clone();
    if let Some((copy, _)) = newest.iter().find(|(_, sb)| *sb != chosen) {
        return Err(StorageError::corrupt(
            "superblock",
            describe_locations(locations),
            format!("copies {} and {copy} both have seq {max_seq} but differ", newest[0].0),
        ));
    }
    for (copy, sb) in &valid {
        if sb.seq != max_seq {
            stale.push((*copy, format!("older seq {} < {max_seq}", sb.seq)));
        }
    }
    stale.sort();
    Ok(SuperblockChoice { superblock: chosen, stale })
}

/// Writes `sb` to the copies in `which` and syncs each disk touched.
pub fn write_copies(locations: &CopyLocations, sb: &Superblock, which: &[usize]) -> Result<()> {
    for &copy in which {
        let (disk, offset) = &locations.0[copy];
        disk.write_and_sync(*offset, &sb.encode(copy))
            .map_err(|e| StorageError::io("write superblock", disk.describe(), e))?;
    }
    Ok(())
}

fn describe_locations(locations: &CopyLocations) -> String {
    locations.0.first().map(|(d, _)| d.describe()).unwrap_or_else(|| "store".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Superblock {
        Superblock::new_now(Superblock {
            seq: 0,
            device_uuid: Uuid::from_u128(1),
            cluster_id: Uuid::from_u128(2),
            device_bytes: 1 << 30,
            block_bytes: 4096,
            layout: LayoutKind::Directory,
            segment_bytes: 64 << 20,
            raw: RawGeometry::default(),
            created_us: 0,
            device_name: "xdb0".into(),
            node_id: 0,
        })
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let buf = sb.encode(2);
        assert_eq!(Superblock::decode(&buf, "t").expect("decode"), sb);
        let bound = Superblock { node_id: 7, ..sample() };
        let buf = bound.encode(1);
        assert_eq!(u64_at(&buf, 160), 7, "the node id lies after the name");
        assert_eq!(Superblock::decode(&buf, "t").expect("decode").node_id, 7);
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let buf = sample().encode(0);
        for i in 0..SUPERBLOCK_BYTES {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(Superblock::decode(&bad, "t").is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn newer_version_is_named() {
        let mut buf = sample().encode(0);
        put_u32(&mut buf, 8, 9);
        seal(&mut buf, CRC_AT);
        let err = Superblock::decode(&buf, "t").expect_err("version");
        assert!(err.to_string().contains("unsupported format version 9"), "{err}");
    }
}
