//! The storage engine of one replica: formats and opens a store, recovers it (superblock, then
//! WAL scan, then replay of committed entries into the image), applies committed entries, and
//! checkpoints. Owns the order of durable steps; the pieces it drives own their formats.

use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::disk::lock::Hold;
use super::disk::{AlignedBuf, Disk, Volume};
use super::error::{Result, StorageError};
use super::image::{Applied, Attachment, Image, ImageGeometry};
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
    /// The node this store belongs to; 0 leaves it to the first node that starts on it.
    pub node_id: u64,
    /// Format even over data that is not an xdevice store (unknown files in the directory, a
    /// file system or partition table on the device). Never over an xdevice store.
    pub force: bool,
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
            node_id: 0,
            force: false,
        }
    }
}

/// How an opened engine behaves.
#[derive(Clone, Debug, Default)]
pub struct EngineConfig {
    pub wal: WalConfig,
    /// Write zeros over new directory segments so syncs never wait on extent allocation.
    pub fill_segments: bool,
    /// The cluster member opening the store: a store bound to another node is refused before
    /// anything is written, and an unbound one is bound to this node. `None` (tools, tests of
    /// the engine alone) checks nothing.
    pub node_id: Option<u64>,
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
    /// This process's exclusive hold on the store, released by `close` or when the engine is
    /// dropped.
    hold: Mutex<Option<Hold>>,
    /// Block-write entries skipped at apply: sent under an attachment no longer current.
    fenced_writes: std::sync::atomic::AtomicU64,
}

impl Engine {
    /// Formats a new store. Refuses a store that already holds a valid superblock, one another
    /// process holds, and (unless `opts.force`) a place holding data that is not an xdevice
    /// store.
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
        // Read-only checks first: a refused format changes nothing, not even a lock file.
        if !opts.force {
            match location {
                Location::Directory { volume, .. } => refuse_unrecognised_files(&**volume)?,
                Location::Raw { disk } => {
                    if !raw_store_present(location)? {
                        refuse_unrecognised_device(&**disk)?;
                    }
                }
            }
        }
        let _hold = hold(location)?;
        let (kind, raw, device_bytes) = match location {
            Location::Directory { volume, name } => {
                refuse_existing_dir(location, &**volume, name)?;
                let bytes = opts.device_bytes.ok_or_else(|| {
                    StorageError::Invalid("a directory store needs a device size".into())
                })?;
                (LayoutKind::Directory, RawGeometry::default(), bytes)
            }
            Location::Raw { disk } => {
                if raw_store_present(location)? {
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
            node_id: opts.node_id,
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
    ///
    /// Nothing is read before this process holds the store (`Disk::lock`, `Volume::lock`), and
    /// nothing is written before the store is known to be this node's (`EngineConfig::node_id`):
    /// an unbound store is bound to it by rewriting every superblock copy with the next seq.
    pub fn open(location: &Location, cfg: EngineConfig) -> Result<(Engine, Recovery)> {
        let hold = hold(location)?;
        let copies = layout::superblock_copies(location)?;
        let choice = superblock::choose(&copies)?;
        let mut sb = choice.superblock;
        check_layout(location, &sb)?;
        let mut rewrite: Vec<usize> = choice.stale.iter().map(|(c, _)| *c).collect();
        match cfg.node_id {
            Some(id) if sb.node_id == 0 => {
                tracing::info!(node = id, store = %location.describe(), "binding the store to this node");
                sb.node_id = id;
                sb.seq += 1;
                rewrite = (0..SUPERBLOCK_COPIES).collect();
            }
            Some(id) if sb.node_id != id => {
                return Err(StorageError::WrongNode {
                    location: location.describe(),
                    belongs: sb.node_id,
                    asked: id,
                    cluster: sb.cluster_id,
                });
            }
            _ => {}
        }
        let regions = layout::open_regions(location, &sb, false, cfg.fill_segments)?;
        if !choice.stale.is_empty() {
            tracing::warn!(copies = ?choice.stale, "rewriting stale or damaged superblock copies");
        }
        if !rewrite.is_empty() {
            superblock::write_copies(&regions.superblock, &sb, &rewrite)?;
        }
        cfg.wal.validate(sb.segment_bytes)?;
        let poison = Arc::new(Poison::default());
        let (state_disk, state_base) = (regions.state.0.clone(), regions.state.1);
        let (state, state_damaged) =
            StateStore::open(state_disk, state_base, sb.device_uuid, poison.clone())?;
        let geometry = ImageGeometry::new(sb.device_bytes, sb.block_bytes);
        let (image, image_damaged) =
            Image::open(regions.image.clone(), geometry, sb.device_uuid, poison.clone())?;
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
            hold: Mutex::new(Some(hold)),
            fenced_writes: Default::default(),
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

    /// Fails once the engine is poisoned or closed, as its own write paths do.
    pub fn check_writable(&self) -> Result<()> {
        self.poison.check()
    }

    /// Records the failed write or sync of something the engine's durable state depends on
    /// outside its own files (a snapshot being installed over the image, its install intent):
    /// poisons the engine as a failure of its own would, and returns the error to report.
    pub fn fail_durable(&self, cause: StorageError) -> StorageError {
        self.poison.set(&cause)
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

    /// Applies one entry. Fenced block writes apply only if the attachment state admits their
    /// epoch (`Attachment::admits`): a write from a server whose attachment was superseded (it
    /// was paused or cut off while another member attached) is skipped, on every replica alike,
    /// since each applies the same log from the same state.
    fn apply_one(&self, applied: &mut Applied, id: LogId, body: &EntryBody) -> Result<()> {
        match body {
            EntryBody::Blocks(ops) => self.apply_ops(ops)?,
            EntryBody::Fenced(epoch, ops) => {
                if Attachment::admits(applied.attachment, Some(*epoch)) {
                    self.apply_ops(ops)?
                } else {
                    self.fenced_off(id, applied.attachment, Some(*epoch));
                }
            }
            EntryBody::Attach(node) => {
                applied.attachment = Some(Attachment { epoch: id.index, node: *node })
            }
            EntryBody::Membership(m) => applied.membership = Some((id, m.clone())),
            EntryBody::Blank | EntryBody::Flush => {}
        }
        applied.log_id = Some(id);
        Ok(())
    }

    fn fenced_off(&self, id: LogId, current: Option<Attachment>, epoch: Option<u64>) {
        self.fenced_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            index = id.index,
            epoch = ?epoch,
            attached = ?current,
            "block writes of a superseded attachment skipped"
        );
    }

    /// Block-write entries skipped at apply because their epoch was not the current attachment's
    /// (since this engine was opened).
    pub fn fenced_writes(&self) -> u64 {
        self.fenced_writes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The attachment as of the applied index.
    pub fn attachment(&self) -> Option<Attachment> {
        self.applied.lock().expect("applied lock").attachment
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

    /// Stops the WAL writer after committing what is queued, then refuses every later write
    /// (image, Raft state; the closed WAL refuses appends) and releases the store: a task still holding this engine
    /// while it winds down (openraft's state-machine worker or a snapshot build, a monitor being
    /// aborted) does not keep the store from being opened again, in this process or another,
    /// and can no longer write to it. (A write already past its check when `close` runs may
    /// still finish: closing does not wait for one.)
    pub fn close(&self) -> Result<()> {
        let closed = self.wal.close();
        self.poison.close();
        self.hold.lock().unwrap_or_else(|p| p.into_inner()).take();
        closed
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
    // Only files of this device's store: anything else stays, even under `force`.
    for leftover in files.iter().filter(|f| f.starts_with(&prefix) && recognised_file(f)) {
        tracing::warn!(file = %leftover, "removing a file left by an interrupted format");
        volume.remove(leftover).map_err(|e| StorageError::io("remove", leftover.clone(), e))?;
    }
    Ok(())
}

/// Whether a raw device holds an xdevice store. Blank copies, or copies that are someone
/// else's data (no superblock magic in any), are no store. Copies carrying the magic that are
/// damaged or of another format version are an error, never "no store", so format never writes
/// over them, forced or not.
fn raw_store_present(location: &Location) -> Result<bool> {
    let copies = layout::superblock_copies(location)?;
    match superblock::choose(&copies) {
        Ok(_) => Ok(true),
        Err(StorageError::Foreign(reason)) if reason.contains("not formatted") => Ok(false),
        Err(e) => {
            let ours = copies.0.iter().any(|(disk, offset)| {
                let mut buf = AlignedBuf::zeroed(superblock::SUPERBLOCK_BYTES);
                disk.read_at(*offset, &mut buf).is_ok() && superblock::has_magic(&buf)
            });
            if ours {
                Err(e)
            } else {
                Ok(false)
            }
        }
    }
}

/// Takes this process's exclusive hold on the store at `location`.
fn hold(location: &Location) -> Result<Hold> {
    let held = match location {
        Location::Directory { volume, name } => volume.lock(name),
        Location::Raw { disk } => disk.lock(),
    };
    held.map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock => {
            StorageError::InUse(format!("{} is {e}", location.describe()))
        }
        _ => StorageError::io("lock", location.describe(), e),
    })
}

/// Whether `file` is one an xdevice store (of any device name), the daemon serving it, or a
/// fresh file system keeps in a data directory.
fn recognised_file(file: &str) -> bool {
    const SUFFIXES: [&str; 5] =
        ["_meta_superblock", "_state_raft", "_state_image", "_snap_recv", "_snap_install"];
    let device_named = |rest: &str| validate_name(rest).is_ok();
    if let Some((device, seq)) = file.rsplit_once("_log_") {
        return device_named(device) && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit());
    }
    if let Some(device) = file.strip_suffix(".lock") {
        return device_named(device);
    }
    SUFFIXES.iter().any(|s| file.strip_suffix(s).is_some_and(device_named))
        || matches!(file, "serve.json" | "serve.json.tmp")
}

/// Refuses a directory holding files that are not an xdevice store's.
fn refuse_unrecognised_files(volume: &dyn Volume) -> Result<()> {
    let mut foreign: Vec<String> = volume
        .list()
        .map_err(|e| StorageError::io("list", volume.describe(), e))?
        .into_iter()
        .filter(|f| !recognised_file(f))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    let n = foreign.len();
    let shown = foreign.into_iter().take(5).collect::<Vec<_>>().join(", ");
    let more = if n > 5 { format!(" and {} more", n - 5) } else { String::new() };
    Err(StorageError::Unrecognised(format!(
        "{} holds {n} file(s) xdevice did not make: {shown}{more}",
        volume.describe()
    )))
}

/// How far into a raw device format looks for data: where its superblock copies and Raft state
/// lie (an interrupted format of ours leaves this range zero).
const RAW_PROBE_BYTES: usize = 1 << 20;

/// Refuses a raw device whose first MiB holds anything but zeros, naming a known signature (a
/// file system, partition table, volume manager or swap) when it finds one.
fn refuse_unrecognised_device(disk: &dyn Disk) -> Result<()> {
    let len = (disk.len_bytes() as usize).min(RAW_PROBE_BYTES);
    let mut head = AlignedBuf::zeroed(len);
    disk.read_at(0, &mut head).map_err(|e| StorageError::io("read", disk.describe(), e))?;
    match describe_signature(&head) {
        None => Ok(()),
        Some(what) => Err(StorageError::Unrecognised(format!("{} holds {what}", disk.describe()))),
    }
}

/// What the first bytes of a device hold, if not zeros: a known signature's name, or where the
/// first non-zero byte lies.
pub fn describe_signature(head: &[u8]) -> Option<String> {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    let known = [
        (at(0, b"LUKS\xba\xbe"), "a LUKS encrypted volume"),
        (at(0, b"XFSB"), "an XFS file system"),
        (at(1080, &[0x53, 0xef]), "an ext2/3/4 file system"),
        (at(512, b"EFI PART"), "a GPT partition table"),
        (at(512, b"LABELONE") || at(1024, b"LABELONE"), "an LVM physical volume"),
        (at(4096, &[0xfc, 0x4e, 0x2b, 0xa9]), "an MD RAID member"),
        (at(65600, b"_BHRfS_M"), "a Btrfs file system"),
        (at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE"), "a swap area"),
        (at(510, &[0x55, 0xaa]), "an MBR partition table or boot sector"),
    ];
    if let Some((_, what)) = known.iter().find(|(found, _)| *found) {
        return Some(what.to_string());
    }
    let first = head.iter().position(|&b| b != 0)?;
    Some(format!("data that is not zeros (first non-zero byte at offset {first})"))
}

/// Initialises every region, the superblock last so an interrupted format is never taken for a
/// store.
fn write_fresh(location: &Location, regions: &Layout, sb: &Superblock) -> Result<()> {
    let (state_disk, state_base) = &regions.state;
    state_disk
        .write_and_sync(*state_base, &AlignedBuf::zeroed(SlotPair::bytes() as usize))
        .map_err(|e| StorageError::io("clear hard state", state_disk.describe(), e))?;
    let geometry = ImageGeometry::new(sb.device_bytes, sb.block_bytes);
    Image::format(&regions.image, geometry, sb.device_uuid)?;
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
