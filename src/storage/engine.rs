//! The storage engine of one replica: formats and opens a store, recovers it (superblock, then
//! WAL scan, then replay of committed entries into the image), applies committed entries, and
//! checkpoints. Owns the order of durable steps; the pieces it drives own their formats.

use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::disk::{AlignedBuf, Disk, Volume};
use super::error::{Result, StorageError};
use super::image::{Applied, Image, ImageGeometry};
use super::layout::{self, Layout, Location};
use super::poison::Poison;
use super::segment::{SegmentStore, SEGMENT_HEADER_BYTES};
use super::slots::SlotPair;
use super::state::{LogId, StateStore};
use super::superblock::{
    self, LayoutKind, RawGeometry, Superblock, MAX_BLOCK_BYTES, MAX_SEGMENT_BYTES, MIN_BLOCK_BYTES,
    MIN_SEGMENT_BYTES, SUPERBLOCK_COPIES,
};
use super::wal::{Wal, WalConfig, WalRecovery};
use crate::entry::{BlockOp, EntryBody, EntryPayload};

/// What `format` creates.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub device_name: String,
    /// Size of the served device; `None` on a raw device means "as large as fits".
    pub device_bytes: Option<u64>,
    pub block_bytes: u32,
    pub segment_bytes: u64,
    /// Raw layout only: number of WAL segment slots.
    pub wal_slots: u64,
    pub device_uuid: Uuid,
    pub cluster_id: Uuid,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            device_name: "xdb0".into(),
            device_bytes: Some(1 << 30),
            block_bytes: 4096,
            segment_bytes: 64 << 20,
            wal_slots: 16,
            device_uuid: Uuid::new_v4(),
            cluster_id: Uuid::new_v4(),
        }
    }
}

/// How an opened engine behaves.
#[derive(Clone, Debug, Default)]
pub struct EngineConfig {
    pub wal: WalConfig,
    /// Write zeros over new directory segments so syncs never wait on extent allocation.
    pub fill_segments: bool,
}

/// What opening found and repaired.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Recovery {
    pub superblock_repaired: Vec<String>,
    pub state_slot_damaged: Option<String>,
    pub image_slot_damaged: Option<String>,
    pub wal: WalRecovery,
    pub replayed_entries: u64,
}

/// One replica's storage.
#[derive(Debug)]
pub struct Engine {
    superblock: Superblock,
    location: String,
    wal: Wal,
    state: StateStore,
    image: Image,
    poison: Arc<Poison>,
    applied: Mutex<Applied>,
    /// The newest committed id replication reported (in memory; see `note_committed`).
    committed: Mutex<Option<LogId>>,
}

impl Engine {
    /// Formats a new store. Refuses a store that already holds a valid superblock.
    pub fn format(location: &Location, opts: &FormatOptions) -> Result<Superblock> {
        validate_name(&opts.device_name)?;
        if !opts.block_bytes.is_power_of_two()
            || !(MIN_BLOCK_BYTES..=MAX_BLOCK_BYTES).contains(&opts.block_bytes)
        {
            return Err(StorageError::Invalid(format!(
                "block size {} must be a power of two in {MIN_BLOCK_BYTES}..={MAX_BLOCK_BYTES}",
                opts.block_bytes
            )));
        }
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&opts.segment_bytes)
            || opts.segment_bytes % 4096 != 0
        {
            return Err(StorageError::Invalid(format!(
                "segment size {} must be a multiple of 4 KiB in {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES}",
                opts.segment_bytes
            )));
        }
        let (kind, raw, device_bytes) = match location {
            Location::Directory { volume, name } => {
                refuse_existing_dir(location, &**volume, name)?;
                let bytes = opts.device_bytes.ok_or_else(|| {
                    StorageError::Invalid("a directory store needs a device size".into())
                })?;
                (LayoutKind::Directory, RawGeometry::default(), bytes)
            }
            Location::Raw { disk } => {
                if superblock::choose(&layout::superblock_copies(location)?).is_ok() {
                    return Err(StorageError::AlreadyFormatted(format!(
                        "{} already holds an xdevice store",
                        disk.describe()
                    )));
                }
                let (raw, bytes) = layout::raw_geometry(
                    disk.len_bytes(),
                    opts.segment_bytes,
                    opts.wal_slots,
                    opts.device_bytes,
                    opts.block_bytes,
                )?;
                (LayoutKind::Raw, raw, bytes)
            }
        };
        if device_bytes == 0 || device_bytes % opts.block_bytes as u64 != 0 {
            return Err(StorageError::Invalid(format!(
                "device size {device_bytes} is not a positive multiple of the block size {}",
                opts.block_bytes
            )));
        }
        let sb = Superblock::new_now(Superblock {
            seq: 0,
            device_uuid: opts.device_uuid,
            cluster_id: opts.cluster_id,
            device_bytes,
            block_bytes: opts.block_bytes,
            layout: kind,
            segment_bytes: opts.segment_bytes,
            raw,
            created_us: 0,
            device_name: opts.device_name.clone(),
        });
        if let Location::Directory { volume, name } = location {
            // Created (zeroed) first so its copies can be addressed; written last by write_fresh.
            let file = layout::superblock_file(name);
            let bytes = (SUPERBLOCK_COPIES * superblock::SUPERBLOCK_BYTES) as u64;
            volume.create(&file, bytes, false).map_err(|e| StorageError::io("create", file, e))?;
        }
        let regions = layout::open_regions(location, &sb, true, true)?;
        write_fresh(location, &regions, &sb)?;
        Ok(sb)
    }

    /// Opens and recovers a store: superblock (repairing stale copies), hard state, image, WAL
    /// scan, then replay of committed entries above the image's applied index.
    pub fn open(location: &Location, cfg: EngineConfig) -> Result<(Engine, Recovery)> {
        let copies = layout::superblock_copies(location)?;
        let choice = superblock::choose(&copies)?;
        let sb = choice.superblock;
        check_layout(location, &sb)?;
        let regions = layout::open_regions(location, &sb, false, cfg.fill_segments)?;
        let stale: Vec<usize> = choice.stale.iter().map(|(c, _)| *c).collect();
        if !stale.is_empty() {
            tracing::warn!(copies = ?choice.stale, "rewriting stale or damaged superblock copies");
            superblock::write_copies(&regions.superblock, &sb, &stale)?;
        }
        cfg.wal.validate(sb.segment_bytes)?;
        let poison = Arc::new(Poison::default());
        let (state, state_damaged) =
            StateStore::open(regions.state.0.clone(), regions.state.1, poison.clone())?;
        let geometry = ImageGeometry::new(sb.device_bytes, sb.block_bytes);
        let (image, image_damaged) = Image::open(regions.image.clone(), geometry, poison.clone())?;
        let (wal, wal_report) =
            Wal::open(regions.segments.clone(), sb.device_uuid, cfg.wal.clone(), poison.clone())?;
        let applied = image.applied();
        let engine = Engine {
            superblock: sb,
            location: location.describe(),
            wal,
            state,
            image,
            poison,
            applied: Mutex::new(applied),
            committed: Mutex::new(None),
        };
        let replayed = engine.replay()?;
        let recovery = Recovery {
            superblock_repaired: choice
                .stale
                .iter()
                .map(|(c, r)| format!("copy {c}: {r}"))
                .collect(),
            state_slot_damaged: state_damaged,
            image_slot_damaged: image_damaged,
            wal: wal_report,
            replayed_entries: replayed,
        };
        Ok((engine, recovery))
    }

    /// Applies committed entries the image has not yet applied.
    fn replay(&self) -> Result<u64> {
        let Some(committed) = self.state.get().committed else { return Ok(0) };
        let bounds = self.wal.bounds();
        let target = committed.index.min(bounds.next.saturating_sub(1));
        let from = self.applied_next();
        if from > target || bounds.next == 0 {
            return Ok(0);
        }
        if from < bounds.first {
            return Err(StorageError::corrupt(
                "store",
                &self.location,
                format!("the image has applied up to {from} but the log starts at {}: entries are missing", bounds.first),
            ));
        }
        self.apply_through(target)
    }

    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }
    pub fn wal(&self) -> &Wal {
        &self.wal
    }
    pub fn state(&self) -> &StateStore {
        &self.state
    }
    pub fn image(&self) -> &Image {
        &self.image
    }
    pub fn poisoned(&self) -> Option<String> {
        self.poison.cause()
    }

    /// The last applied log id (in memory; durable at the next checkpoint).
    pub fn applied(&self) -> Applied {
        self.applied.lock().expect("applied lock").clone()
    }

    fn applied_next(&self) -> u64 {
        self.applied().log_id.map_or(0, |id| id.index + 1)
    }

    /// Applies entries from the one after the applied index through `upto` (which must be
    /// committed). Returns how many were applied.
    pub fn apply_through(&self, upto: u64) -> Result<u64> {
        // Replay after a crash re-applies only through the persisted committed index, so applying
        // past it could leave blocks that recovery does not rewrite.
        let committed = self.state.get().committed.map(|c| c.index);
        if committed.is_none_or(|c| upto > c) {
            return Err(StorageError::Invalid(format!(
                "apply through {upto} beyond the persisted committed index {committed:?}"
            )));
        }
        let mut applied = self.applied.lock().expect("applied lock");
        let from = applied.log_id.map_or(0, |id| id.index + 1);
        for index in from..=upto {
            let term = self.wal.term(index)?;
            let bytes = self.wal.read(index)?;
            let at = format!("{} log index {index}", self.location);
            let payload = EntryPayload::decode(&bytes)
                .map_err(|r| StorageError::corrupt("log entry", &at, r))?;
            let id = LogId { term, node: payload.leader_node, index };
            self.apply_one(&mut applied, id, &payload.body)?;
        }
        Ok((upto + 1).saturating_sub(from))
    }

    /// Applies entries that replication hands over once they are committed, in log order. Their
    /// indexes must rise above the applied index (a gap follows an installed snapshot). Blocks
    /// are written in place and become durable at the next checkpoint; see ARCHITECTURE.md for
    /// why applying above the persisted committed index is safe here.
    pub fn apply_entries<'a>(
        &self,
        entries: impl IntoIterator<Item = (LogId, &'a EntryBody)>,
    ) -> Result<()> {
        let mut applied = self.applied.lock().expect("applied lock");
        for (id, body) in entries {
            if applied.log_id.is_some_and(|a| id.index <= a.index) {
                return Err(StorageError::Invalid(format!(
                    "apply of index {} at or below the applied index {:?}",
                    id.index, applied.log_id
                )));
            }
            self.apply_one(&mut applied, id, body)?;
        }
        Ok(())
    }

    fn apply_one(&self, applied: &mut Applied, id: LogId, body: &EntryBody) -> Result<()> {
        match body {
            EntryBody::Blocks(ops) => self.apply_ops(ops)?,
            EntryBody::Membership(m) => applied.membership = Some((id, m.clone())),
            EntryBody::Blank | EntryBody::Flush => {}
        }
        applied.log_id = Some(id);
        Ok(())
    }

    /// Runs `f` with applies excluded, on the in-memory applied state (snapshot reads and
    /// installs use this to see or replace the image at one applied index).
    pub fn with_applied<T>(&self, f: impl FnOnce(&mut Applied) -> Result<T>) -> Result<T> {
        let mut applied = self.applied.lock().expect("applied lock");
        f(&mut applied)
    }

    fn apply_ops(&self, ops: &[BlockOp]) -> Result<()> {
        for op in ops {
            match op {
                BlockOp::Write { lba, data } => self.image.write_blocks(*lba, data)?,
                BlockOp::Zero { lba, blocks } => {
                    self.image.zero_blocks(*lba, u64::from(*blocks))?
                }
            }
        }
        Ok(())
    }

    /// Records the committed id replication reports. Kept in memory: each checkpoint persists
    /// the applied index as committed, and a restarted replica re-learns the rest from its
    /// leader, so a sync per commit is not needed.
    pub fn note_committed(&self, id: LogId) {
        let mut c = self.committed.lock().expect("committed lock");
        if c.is_none_or(|old| old.index < id.index) {
            *c = Some(id);
        }
    }

    /// The newest committed id known: reported by replication or persisted.
    pub fn committed(&self) -> Option<LogId> {
        let seen = *self.committed.lock().expect("committed lock");
        seen.max(self.state.get().committed)
    }

    /// Makes the image durable at the applied index, with applies excluded meanwhile, then
    /// records that index as committed in the hard state if it is newer (applied entries are
    /// committed, and replay on open runs through the persisted committed index).
    pub fn checkpoint(&self) -> Result<Applied> {
        let applied = {
            let guard = self.applied.lock().expect("applied lock");
            self.image.checkpoint(guard.clone())?;
            guard.clone()
        };
        if let Some(id) = applied.log_id {
            if self.state.get().committed.is_none_or(|c| c.index < id.index) {
                self.state.update(|s| s.committed = Some(id))?;
            }
        }
        Ok(applied)
    }

    /// Checkpoints, then purges the log through the checkpointed index.
    pub fn checkpoint_and_purge(&self) -> Result<()> {
        let applied = self.checkpoint()?;
        if let Some(id) = applied.log_id {
            self.wal.purge(id)?;
        }
        Ok(())
    }

    /// Stops the WAL writer after committing what is queued.
    pub fn close(&self) -> Result<()> {
        self.wal.close()
    }
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Invalid(format!(
            "device name {name:?} must be 1-32 characters of [A-Za-z0-9.-], not starting with '.'"
        )))
    }
}

/// A directory format refuses a device that has a superblock; files a failed format left behind
/// (no superblock yet) are removed.
fn refuse_existing_dir(location: &Location, volume: &dyn Volume, name: &str) -> Result<()> {
    let files = volume.list().map_err(|e| StorageError::io("list", volume.describe(), e))?;
    let prefix = format!("{name}_");
    if files.contains(&layout::superblock_file(name)) {
        // The superblock file is created first and its copies written last: a file with no valid
        // (or version-mismatched) copy and nothing but zeros is what an interrupted format leaves.
        match superblock::choose(&layout::superblock_copies(location)?) {
            Err(StorageError::Foreign(reason)) if reason.contains("not formatted") => {}
            _ => {
                return Err(StorageError::AlreadyFormatted(format!(
                    "{} already holds device {name}",
                    volume.describe()
                )))
            }
        }
    }
    for leftover in files.iter().filter(|f| f.starts_with(&prefix)) {
        tracing::warn!(file = %leftover, "removing a file left by an interrupted format");
        volume.remove(leftover).map_err(|e| StorageError::io("remove", leftover.clone(), e))?;
    }
    Ok(())
}

/// Initialises every region, the superblock last so an interrupted format is never taken for a
/// store.
fn write_fresh(location: &Location, regions: &Layout, sb: &Superblock) -> Result<()> {
    let (state_disk, state_base) = &regions.state;
    state_disk
        .write_and_sync(*state_base, &AlignedBuf::zeroed(SlotPair::bytes() as usize))
        .map_err(|e| StorageError::io("clear hard state", state_disk.describe(), e))?;
    Image::format(&regions.image, ImageGeometry::new(sb.device_bytes, sb.block_bytes))?;
    if let Location::Raw { disk } = location {
        clear_slots(disk, &*regions.segments, sb)?;
    }
    Wal::format(&*regions.segments, sb.device_uuid, sb.segment_bytes, 0)?;
    if let Location::Directory { volume, .. } = location {
        volume.sync().map_err(|e| StorageError::io("sync directory", volume.describe(), e))?;
    }
    let all: Vec<usize> = (0..SUPERBLOCK_COPIES).collect();
    superblock::write_copies(&regions.superblock, sb, &all)
}

/// Zeroes every WAL slot header of a raw device so no earlier store's segment is ever read.
fn clear_slots(disk: &Arc<dyn Disk>, segments: &dyn SegmentStore, sb: &Superblock) -> Result<()> {
    let zero = AlignedBuf::zeroed(SEGMENT_HEADER_BYTES as usize);
    for slot in 0..sb.raw.wal_slots {
        let offset = sb.raw.wal_offset + slot * sb.segment_bytes;
        disk.write_at(offset, &zero)
            .map_err(|e| StorageError::io("clear WAL slot", disk.describe(), e))?;
    }
    segments.sync()
}

fn check_layout(location: &Location, sb: &Superblock) -> Result<()> {
    let expected = match location {
        Location::Directory { name, .. } => {
            if &sb.device_name != name {
                return Err(StorageError::Foreign(format!(
                    "superblock names device {:?}, not {name:?}",
                    sb.device_name
                )));
            }
            LayoutKind::Directory
        }
        Location::Raw { .. } => LayoutKind::Raw,
    };
    if sb.layout != expected {
        return Err(StorageError::Foreign(format!(
            "store has {:?} layout, opened as {expected:?}",
            sb.layout
        )));
    }
    Ok(())
}
