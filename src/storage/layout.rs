//! Where each structure lives: a data directory of files named by the device prefix, or fixed
//! regions of one raw block device. Everything above sees only disks and a segment store.
//!
//! Directory: `{dev}_meta_superblock` (4 copies), `{dev}_state_raft` (hard-state slots),
//! `{dev}_state_image` (image), `{dev}_log_{seq:010}` (WAL segments).
//! Raw device: superblock copies at 0, 4 KiB, end − 8 KiB and end − 4 KiB; hard-state slots at
//! 64 KiB; WAL slots from 1 MiB; the image after them; the last 1 MiB holds only the tail copies.

use std::sync::Arc;

use super::disk::{Disk, RegionDisk, Volume};
use super::error::{Result, StorageError};
use super::image::ImageGeometry;
use super::segment::{DirSegments, RawSegments, SegmentStore};
use super::slots::SlotPair;
use super::superblock::{CopyLocations, RawGeometry, SUPERBLOCK_BYTES, SUPERBLOCK_COPIES};

const MIB: u64 = 1 << 20;
/// Raw layout: start of the hard-state slots.
pub const RAW_STATE_OFFSET: u64 = 64 * 1024;
/// Raw layout: start of the WAL slots.
pub const RAW_WAL_OFFSET: u64 = MIB;
/// Raw layout: bytes reserved at the end for the tail superblock copies.
pub const RAW_TAIL_RESERVE: u64 = MIB;
const _: () = assert!(RAW_STATE_OFFSET >= 2 * SUPERBLOCK_BYTES as u64);
const _: () = assert!(RAW_STATE_OFFSET + SlotPair::bytes() <= RAW_WAL_OFFSET);

/// Where a store lives.
#[derive(Clone, Debug)]
pub enum Location {
    /// A data directory; `name` is the device prefix of its files.
    Directory { volume: Arc<dyn Volume>, name: String },
    /// A raw block device (or a file used as one).
    Raw { disk: Arc<dyn Disk> },
}

impl Location {
    pub fn describe(&self) -> String {
        match self {
            Location::Directory { volume, name } => {
                format!("{} (device {name})", volume.describe())
            }
            Location::Raw { disk } => disk.describe(),
        }
    }
}

/// File names in directory layout.
pub fn superblock_file(name: &str) -> String {
    format!("{name}_meta_superblock")
}
pub fn state_file(name: &str) -> String {
    format!("{name}_state_raft")
}
pub fn image_file(name: &str) -> String {
    format!("{name}_state_image")
}

/// Device names present in a data directory (from their superblock files).
pub fn devices_in(volume: &dyn Volume) -> Result<Vec<String>> {
    let mut names: Vec<String> = volume
        .list()
        .map_err(|e| StorageError::io("list", volume.describe(), e))?
        .into_iter()
        .filter_map(|f| f.strip_suffix("_meta_superblock").map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// The opened regions of a store.
#[derive(Debug)]
pub struct Layout {
    pub superblock: CopyLocations,
    pub state: (Arc<dyn Disk>, u64),
    pub image: Arc<dyn Disk>,
    pub segments: Arc<dyn SegmentStore>,
}

/// Superblock copy locations, which must be readable before the superblock is known.
pub fn superblock_copies(location: &Location) -> Result<CopyLocations> {
    match location {
        Location::Directory { volume, name } => {
            let file = superblock_file(name);
            let disk = volume.open(&file).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => StorageError::Foreign(format!(
                    "{} has no device {name:?} (no {file})",
                    volume.describe()
                )),
                _ => StorageError::io("open", file.clone(), e),
            })?;
            Ok(CopyLocations(
                (0..SUPERBLOCK_COPIES)
                    .map(|c| (disk.clone(), (c * SUPERBLOCK_BYTES) as u64))
                    .collect(),
            ))
        }
        Location::Raw { disk } => {
            let len = disk.len_bytes();
            if len < RAW_WAL_OFFSET + RAW_TAIL_RESERVE {
                return Err(StorageError::Invalid(format!(
                    "{} is too small ({len} bytes)",
                    disk.describe()
                )));
            }
            let b = SUPERBLOCK_BYTES as u64;
            Ok(CopyLocations(
                [0, b, len - 2 * b, len - b].into_iter().map(|o| (disk.clone(), o)).collect(),
            ))
        }
    }
}

/// Computes raw geometry for a device of `disk_len` bytes.
pub fn raw_geometry(
    disk_len: u64,
    segment_bytes: u64,
    wal_slots: u64,
    device_bytes: Option<u64>,
    block_bytes: u32,
) -> Result<(RawGeometry, u64)> {
    let image_offset = (RAW_WAL_OFFSET + wal_slots * segment_bytes).next_multiple_of(MIB);
    let usable = disk_len.saturating_sub(RAW_TAIL_RESERVE).saturating_sub(image_offset);
    let device_bytes = match device_bytes {
        Some(bytes) => bytes,
        None => largest_device(usable, block_bytes),
    };
    let image = ImageGeometry::new(device_bytes, block_bytes);
    if device_bytes == 0 || image_offset + image.total_bytes + RAW_TAIL_RESERVE > disk_len {
        return Err(StorageError::NoSpace(format!(
            "a {device_bytes}-byte device with {wal_slots} WAL slots of {segment_bytes} bytes does not fit {disk_len} bytes"
        )));
    }
    let raw = RawGeometry {
        wal_offset: RAW_WAL_OFFSET,
        wal_slots,
        state_offset: RAW_STATE_OFFSET,
        image_offset,
        image_bytes: image.total_bytes,
    };
    Ok((raw, device_bytes))
}

/// The largest device (whole blocks) whose image fits `usable` bytes.
fn largest_device(usable: u64, block_bytes: u32) -> u64 {
    let bs = block_bytes as u64;
    // Each block costs its bytes plus 4/127 table bytes; leave 1 MiB for header and alignment.
    let blocks = usable.saturating_sub(MIB) * 127 / (127 * bs + 4);
    blocks * bs
}

/// Opens (or, with `create`, creates) the regions of a store whose superblock says `sb`.
pub fn open_regions(
    location: &Location,
    sb: &super::superblock::Superblock,
    create: bool,
    fill_segments: bool,
) -> Result<Layout> {
    let superblock = superblock_copies(location)?;
    let image_geometry = ImageGeometry::new(sb.device_bytes, sb.block_bytes);
    match location {
        Location::Directory { volume, name } => {
            let get = |file: String, len: u64| -> Result<Arc<dyn Disk>> {
                let disk =
                    if create { volume.create(&file, len, false) } else { volume.open(&file) };
                disk.map_err(|e| {
                    StorageError::io(
                        if create { "create" } else { "open" },
                        format!("{}/{file}", volume.describe()),
                        e,
                    )
                })
            };
            let state = get(state_file(name), SlotPair::bytes())?;
            let image = get(image_file(name), image_geometry.total_bytes)?;
            let segments = Arc::new(DirSegments::new(
                volume.clone(),
                &format!("{name}_"),
                sb.segment_bytes,
                fill_segments,
            ));
            Ok(Layout { superblock, state: (state, 0), image, segments })
        }
        Location::Raw { disk } => {
            let g = sb.raw;
            let region = |name: &'static str, base: u64, len: u64| -> Result<Arc<dyn Disk>> {
                let r = RegionDisk::new(disk.clone(), name, base, len)
                    .map_err(|e| StorageError::io("map region", disk.describe(), e))?;
                Ok(Arc::new(r))
            };
            let image = region("image", g.image_offset, g.image_bytes)?;
            let segments = Arc::new(RawSegments::new(
                disk.clone(),
                g.wal_offset,
                g.wal_slots,
                sb.segment_bytes,
            ));
            Ok(Layout { superblock, state: (disk.clone(), g.state_offset), image, segments })
        }
    }
}
