//! The simulated disk and volume: in-memory `Disk` and `Volume` implementations that model what
//! fsync promises (and no more), lose power on command, inject I/O errors, and build the images a
//! power loss could leave behind. Crash and fault-injection tests run on it; production never does.
//!
//! Model. Each `SimDisk` holds a durable image and an ordered list of pending (unsynced) writes;
//! reads see the durable image with the pending writes applied in order. `sync_data` makes that
//! disk's pending writes durable. A `SimVolume` holds a durable namespace and an ordered list of
//! pending creations, renames and removals; `Volume::sync` makes them durable, and a power loss
//! keeps a prefix of them. A disk's data and its name are independent, as in a real file system:
//! a synced file whose creation was not synced can vanish, a rename that was not synced can be
//! undone (the file is found under its old name), and so can a removal.
//!
//! Control. A volume and all of its disks share one `Shared` block: the crash counter, the crashed
//! flag and the armed faults. Every operation holds its lock while it applies, so a power loss
//! freezes everything at once and never lands inside an operation.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{check_io, Disk, Volume, IO_ALIGN, SECTOR_BYTES};

/// How a crash image treats each pending write: `keep` is the probability it survives whole,
/// `tear` the probability it survives in part (half of those as a sector-aligned prefix, half as
/// a random subset of its sectors); the rest is dropped. Out-of-range values are not an error:
/// a write is kept if a uniform draw falls below `keep`, torn if below `keep + tear`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrashPlan {
    /// Probability that a pending write survives whole.
    pub keep: f64,
    /// Probability that a pending write survives torn.
    pub tear: f64,
}

impl Default for CrashPlan {
    fn default() -> Self {
        CrashPlan { keep: 0.5, tear: 0.25 }
    }
}

/// The error an injected fault produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `EIO`: the device failed the request.
    Eio,
    /// `ENOSPC`: the device or file system is out of space.
    Enospc,
}

impl Fault {
    fn error(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            Fault::Eio => libc::EIO,
            Fault::Enospc => libc::ENOSPC,
        })
    }
}

/// The kind of operation a fault is injected into. `Sync` covers both `Disk::sync_data` and
/// `Volume::sync`, since both are fsyncs that a real device can fail; `DirSync` only the latter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// `Disk::read_at`.
    Read,
    /// `Disk::write_at` (and the write half of `write_and_sync`).
    Write,
    /// `Disk::sync_data` and `Volume::sync`.
    Sync,
    /// `Volume::sync` only (the directory fsync).
    DirSync,
    /// `Volume::create`.
    Create,
}

impl FaultOp {
    /// Whether a fault armed for `self` counts (and may fail) an operation of kind `op`.
    fn covers(self, op: FaultOp) -> bool {
        self == op || (self == FaultOp::Sync && op == FaultOp::DirSync)
    }
}

/// Operations a `SimDisk` has completed successfully.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Completed `read_at` calls.
    pub reads: u64,
    /// Completed `write_at` calls.
    pub writes: u64,
    /// Completed `sync_data` calls.
    pub syncs: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("sim lock")
}

fn power_loss() -> io::Error {
    io::Error::other("simulated power loss")
}

/// A fault waiting for its operation: it fires when `remaining` ops of kind `op` have passed.
#[derive(Debug)]
struct ArmedFault {
    op: FaultOp,
    fault: Fault,
    remaining: u64,
}

#[derive(Debug, Default)]
struct Control {
    /// Mutating operations still allowed before power is lost; `None` when no crash is armed.
    crash_budget: Option<u64>,
    crashed: bool,
    faults: Vec<ArmedFault>,
}

impl Control {
    /// Counts one op of kind `op` against every armed fault of that kind and fires the first due.
    fn take_fault(&mut self, op: FaultOp) -> Option<Fault> {
        let due = self.faults.iter().position(|armed| armed.op.covers(op) && armed.remaining == 0);
        let fired = due.map(|index| self.faults.remove(index).fault);
        for armed in self.faults.iter_mut().filter(|armed| armed.op.covers(op)) {
            armed.remaining = armed.remaining.saturating_sub(1);
        }
        fired
    }
}

/// The control block a volume shares with all of its disks (or a standalone disk owns alone).
#[derive(Debug, Default)]
struct Shared {
    control: Mutex<Control>,
    /// While true, every data sync waits (a slow disk's flush), without holding `control`.
    syncs_held: Mutex<bool>,
    syncs_released: Condvar,
}

impl Shared {
    /// Lets one operation through or fails it. The caller holds the returned guard while the
    /// operation applies, so a crash triggered by another thread cannot land halfway through it.
    fn admit(&self, op: Option<FaultOp>, mutating: bool) -> io::Result<MutexGuard<'_, Control>> {
        let mut control = lock(&self.control);
        if control.crashed {
            return Err(power_loss());
        }
        if mutating {
            match control.crash_budget {
                Some(0) => {
                    control.crashed = true;
                    return Err(power_loss());
                }
                Some(left) => control.crash_budget = Some(left - 1),
                None => {}
            }
        }
        if let Some(fault) = op.and_then(|op| control.take_fault(op)) {
            return Err(fault.error());
        }
        Ok(control)
    }

    fn crash_after(&self, mutating_ops: u64) {
        lock(&self.control).crash_budget = Some(mutating_ops);
    }

    fn crash_now(&self) {
        lock(&self.control).crashed = true;
    }

    fn crashed(&self) -> bool {
        lock(&self.control).crashed
    }

    fn inject(&self, op: FaultOp, fault: Fault, after: u64) {
        lock(&self.control).faults.push(ArmedFault { op, fault, remaining: after });
    }

    fn hold_syncs(&self, held: bool) {
        *lock(&self.syncs_held) = held;
        if !held {
            self.syncs_released.notify_all();
        }
    }

    /// Blocks the calling thread while syncs are held.
    fn wait_syncs_released(&self) {
        let mut held = lock(&self.syncs_held);
        while *held {
            held = self.syncs_released.wait(held).expect("sim sync hold");
        }
    }
}

/// The intersection of `[a, a + a_len)` and `[b, b + b_len)`, as (start within a, start within b,
/// length); `None` if they do not meet.
fn overlap(a: u64, a_len: usize, b: u64, b_len: usize) -> Option<(usize, usize, usize)> {
    let start = a.max(b);
    let end = a.saturating_add(a_len as u64).min(b.saturating_add(b_len as u64));
    if start >= end {
        return None;
    }
    // Each difference is bounded by a_len or b_len, so it fits in usize.
    Some(((start - a) as usize, (start - b) as usize, (end - start) as usize))
}

/// Copies the part of `bytes` (placed at `offset`) that falls inside `image` (placed at zero).
fn apply(image: &mut [u8], offset: u64, bytes: &[u8]) {
    if let Some((at, from, len)) = overlap(0, image.len(), offset, bytes.len()) {
        image[at..at + len].copy_from_slice(&bytes[from..from + len]);
    }
}

/// XORs `mask` (placed at `mask_offset`) into `dst` (placed at `dst_offset`) where they meet.
fn xor(dst: &mut [u8], dst_offset: u64, mask: &[u8], mask_offset: u64) {
    if let Some((at, from, len)) = overlap(dst_offset, dst.len(), mask_offset, mask.len()) {
        for (byte, flip) in dst[at..at + len].iter_mut().zip(&mask[from..from + len]) {
            *byte ^= flip;
        }
    }
}

/// A write that has completed but is not yet durable.
#[derive(Clone)]
struct PendingWrite {
    offset: u64,
    bytes: Vec<u8>,
}

/// The data of one disk. Invariant: `durable` is at least as long as the end of every pending
/// write, so making writes durable (or building an image) never needs to allocate or can fail.
/// Bytes beyond `durable.len()` read as zeros: memory grows with the highest byte written, not
/// with the disk's size.
struct DiskState {
    durable: Vec<u8>,
    pending: Vec<PendingWrite>,
}

impl DiskState {
    /// Extends `durable` with zeros to cover `end`, failing (not aborting) if it cannot.
    fn reserve(&mut self, end: u64) -> io::Result<()> {
        let end = usize::try_from(end).map_err(|_| io::ErrorKind::OutOfMemory)?;
        if end > self.durable.len() {
            let more = end - self.durable.len();
            self.durable.try_reserve_exact(more).map_err(|_| io::ErrorKind::OutOfMemory)?;
            self.durable.resize(end, 0);
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.reserve(offset.saturating_add(buf.len() as u64))?;
        self.pending.push(PendingWrite { offset, bytes: buf.to_vec() });
        Ok(())
    }

    fn sync(&mut self) {
        for write in std::mem::take(&mut self.pending) {
            apply(&mut self.durable, write.offset, &write.bytes);
        }
    }

    /// Fills `buf` from the volatile view: durable data with every pending write applied.
    fn read_volatile(&self, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        if let Some((at, from, len)) = overlap(offset, buf.len(), 0, self.durable.len()) {
            buf[at..at + len].copy_from_slice(&self.durable[from..from + len]);
        }
        for write in &self.pending {
            if let Some((at, from, len)) =
                overlap(offset, buf.len(), write.offset, write.bytes.len())
            {
                buf[at..at + len].copy_from_slice(&write.bytes[from..from + len]);
            }
        }
    }

    fn volatile_data(&self) -> Vec<u8> {
        let mut image = self.durable.clone();
        for write in &self.pending {
            apply(&mut image, write.offset, &write.bytes);
        }
        image
    }

    /// What a power loss could leave: durable data plus a random fate for each pending write.
    fn crash_data(&self, rng: &mut SmallRng, plan: CrashPlan) -> Vec<u8> {
        let mut image = self.durable.clone();
        for write in &self.pending {
            apply_after_crash(&mut image, write, rng, plan);
        }
        image
    }
}

/// Applies what survives of one pending write. Sectors are the unit: a sector is written whole
/// or not at all, so a torn write never leaves a partly updated sector.
fn apply_after_crash(image: &mut [u8], write: &PendingWrite, rng: &mut SmallRng, plan: CrashPlan) {
    let draw: f64 = rng.gen();
    if draw < plan.keep {
        apply(image, write.offset, &write.bytes);
    } else if draw < plan.keep + plan.tear {
        let sectors = write.bytes.chunks(SECTOR_BYTES);
        let count = sectors.len();
        let sector_offset = |index: usize| write.offset + (index * SECTOR_BYTES) as u64;
        if rng.gen::<bool>() {
            // A strict prefix with at least one sector: whole and nothing are the other fates.
            let cut = if count >= 2 { rng.gen_range(1..count) } else { 0 };
            for (index, sector) in sectors.take(cut).enumerate() {
                apply(image, sector_offset(index), sector);
            }
        } else {
            for (index, sector) in sectors.enumerate() {
                if rng.gen::<bool>() {
                    apply(image, sector_offset(index), sector);
                }
            }
        }
    }
}

/// An in-memory disk that models durability, power loss and I/O faults. See the module docs.
pub struct SimDisk {
    name: String,
    len_bytes: u64,
    shared: Arc<Shared>,
    state: Mutex<DiskState>,
    reads: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
}

impl SimDisk {
    /// A standalone disk of `len_bytes` zeros with its own crash counter and faults.
    pub fn new(name: &str, len_bytes: u64) -> Arc<SimDisk> {
        SimDisk::from_image(name.to_string(), len_bytes, Arc::default(), Vec::new())
    }

    fn from_image(
        name: String,
        len_bytes: u64,
        shared: Arc<Shared>,
        durable: Vec<u8>,
    ) -> Arc<Self> {
        Arc::new(SimDisk {
            name,
            len_bytes,
            shared,
            state: Mutex::new(DiskState { durable, pending: Vec::new() }),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        })
    }

    /// A new disk with the same name and size holding `durable`, with fresh control and stats.
    fn image(&self, durable: Vec<u8>) -> Arc<SimDisk> {
        SimDisk::from_image(self.name.clone(), self.len_bytes, Arc::default(), durable)
    }

    /// Operations this disk has completed successfully.
    pub fn stats(&self) -> SimStats {
        SimStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
        }
    }

    /// Loses power when `mutating_ops` more writes and syncs have completed: the next one and
    /// every later operation fail. On a disk of a volume this arms the volume-wide counter.
    pub fn crash_after(&self, mutating_ops: u64) {
        self.shared.crash_after(mutating_ops);
    }

    /// Loses power now.
    pub fn crash_now(&self) {
        self.shared.crash_now();
    }

    /// Whether power has been lost.
    pub fn crashed(&self) -> bool {
        self.shared.crashed()
    }

    /// Fails the `(after + 1)`-th next operation of kind `op` once with `fault`. On a disk of a
    /// volume the fault is shared: the first matching operation on any of its disks counts.
    pub fn inject(&self, op: FaultOp, fault: Fault, after: u64) {
        self.shared.inject(op, fault, after);
    }

    /// Holds back (`true`) or lets through (`false`) every `sync_data`: a held sync blocks its
    /// caller until released, as a slow device's flush does, and then completes normally. On a
    /// disk of a volume this holds every disk of the volume.
    pub fn hold_syncs(&self, held: bool) {
        self.shared.hold_syncs(held);
    }

    /// A new, powered disk holding what a power loss now could leave (see `CrashPlan`).
    pub fn crash_image(&self, seed: u64, plan: CrashPlan) -> Arc<SimDisk> {
        let mut rng = SmallRng::seed_from_u64(seed);
        self.image(lock(&self.state).crash_data(&mut rng, plan))
    }

    /// A new disk holding only the durable data: every pending write dropped.
    pub fn clean_image(&self) -> Arc<SimDisk> {
        self.image(lock(&self.state).durable.clone())
    }

    /// A new disk holding the volatile view: every pending write applied.
    pub fn volatile_image(&self) -> Arc<SimDisk> {
        self.image(lock(&self.state).volatile_data())
    }

    /// Flips bits at `offset` in both the durable data and every pending copy, bypassing
    /// alignment, power and fault checks. Bytes beyond the end of the disk are ignored, as is
    /// a range the simulator cannot allocate memory for.
    pub fn corrupt(&self, offset: u64, xor_mask: &[u8]) {
        let end = offset.saturating_add(xor_mask.len() as u64).min(self.len_bytes);
        let mut state = lock(&self.state);
        if end <= offset || state.reserve(end).is_err() {
            return;
        }
        xor(&mut state.durable, 0, xor_mask, offset);
        for write in &mut state.pending {
            xor(&mut write.bytes, write.offset, xor_mask, offset);
        }
    }

    /// Up to `len` bytes of the volatile view at `offset`, without alignment, power or fault
    /// checks; shorter (possibly empty) where the range runs past the end of the disk.
    pub fn peek(&self, offset: u64, len: usize) -> Vec<u8> {
        let end = offset.saturating_add(len as u64).min(self.len_bytes);
        // Bounded by `len`, so it fits in usize.
        let mut out = vec![0; end.saturating_sub(offset) as usize];
        lock(&self.state).read_volatile(offset, &mut out);
        out
    }
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDisk")
            .field("name", &self.name)
            .field("len_bytes", &self.len_bytes)
            .field("pending_writes", &lock(&self.state).pending.len())
            .finish()
    }
}

impl Disk for SimDisk {
    /// The simulator lives in this process's memory: no other process can reach it.
    fn lock(&self) -> io::Result<super::lock::Hold> {
        Ok(super::lock::Hold::private())
    }

    fn describe(&self) -> String {
        format!("sim:{}", self.name)
    }

    fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_io(self.len_bytes, offset, buf)?;
        let _gate = self.shared.admit(Some(FaultOp::Read), false)?;
        lock(&self.state).read_volatile(offset, buf);
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_io(self.len_bytes, offset, buf)?;
        let _gate = self.shared.admit(Some(FaultOp::Write), true)?;
        lock(&self.state).write(offset, buf)?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.shared.wait_syncs_released();
        let _gate = self.shared.admit(Some(FaultOp::Sync), true)?;
        lock(&self.state).sync();
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A creation, rename or removal that `Volume::sync` has not yet made durable.
#[derive(Clone, Debug)]
enum NamespaceOp {
    Create(String, Arc<SimDisk>),
    Rename(String, String),
    Remove(String),
}

/// The names of a volume. `live` is `durable` with `pending` applied in order.
#[derive(Debug, Default)]
struct Namespace {
    durable: BTreeMap<String, Arc<SimDisk>>,
    live: BTreeMap<String, Arc<SimDisk>>,
    pending: Vec<NamespaceOp>,
}

impl Namespace {
    /// The durable names with the first `survivors` pending operations applied.
    fn after_crash(&self, survivors: usize) -> BTreeMap<String, Arc<SimDisk>> {
        let mut files = self.durable.clone();
        for op in self.pending.iter().take(survivors) {
            match op {
                NamespaceOp::Create(name, disk) => files.insert(name.clone(), Arc::clone(disk)),
                NamespaceOp::Rename(from, to) => match files.remove(from) {
                    Some(disk) => files.insert(to.clone(), disk),
                    None => None,
                },
                NamespaceOp::Remove(name) => files.remove(name),
            };
        }
        files
    }
}

/// Rejects names a directory could not hold as one plain file.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid file name {name:?}: must be one non-empty path component"),
        ));
    }
    Ok(())
}

/// An in-memory directory of `SimDisk`s sharing one crash counter and one set of faults.
pub struct SimVolume {
    name: String,
    shared: Arc<Shared>,
    namespace: Mutex<Namespace>,
}

impl SimVolume {
    /// An empty volume.
    pub fn new(name: &str) -> Arc<SimVolume> {
        SimVolume::from_files(name.to_string(), Arc::default(), BTreeMap::new())
    }

    fn from_files(
        name: String,
        shared: Arc<Shared>,
        files: BTreeMap<String, Arc<SimDisk>>,
    ) -> Arc<SimVolume> {
        let namespace = Namespace { durable: files.clone(), live: files, pending: Vec::new() };
        Arc::new(SimVolume { name, shared, namespace: Mutex::new(namespace) })
    }

    /// A new volume (fresh control) holding `files`, each disk's data chosen by `data`; called in
    /// name order so seeded choices are reproducible.
    fn image(
        &self,
        files: BTreeMap<String, Arc<SimDisk>>,
        mut data: impl FnMut(&DiskState) -> Vec<u8>,
    ) -> Arc<SimVolume> {
        let shared: Arc<Shared> = Arc::default();
        let files = files
            .into_iter()
            .map(|(name, disk)| {
                let durable = data(&lock(&disk.state));
                let copy = SimDisk::from_image(
                    disk.name.clone(),
                    disk.len_bytes,
                    Arc::clone(&shared),
                    durable,
                );
                (name, copy)
            })
            .collect();
        SimVolume::from_files(self.name.clone(), shared, files)
    }

    /// A new, powered volume holding what a power loss now could leave: a random prefix of the
    /// pending creations and removals, and each surviving file's data as `SimDisk::crash_image`.
    pub fn crash_image(&self, seed: u64, plan: CrashPlan) -> Arc<SimVolume> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let files = {
            let namespace = lock(&self.namespace);
            let survivors = rng.gen_range(0..=namespace.pending.len());
            namespace.after_crash(survivors)
        };
        self.image(files, |state| state.crash_data(&mut rng, plan))
    }

    /// A new volume holding only durable state: pending namespace operations and writes dropped.
    pub fn clean_image(&self) -> Arc<SimVolume> {
        let files = lock(&self.namespace).durable.clone();
        self.image(files, |state| state.durable.clone())
    }

    /// A new volume holding everything, as if every pending operation had reached the device.
    pub fn volatile_image(&self) -> Arc<SimVolume> {
        let files = lock(&self.namespace).live.clone();
        self.image(files, DiskState::volatile_data)
    }

    /// Loses power when `mutating_ops` more writes, data syncs, creations, renames, removals and
    /// volume syncs (on any of its disks, together) have completed.
    pub fn crash_after(&self, mutating_ops: u64) {
        self.shared.crash_after(mutating_ops);
    }

    /// Loses power now.
    pub fn crash_now(&self) {
        self.shared.crash_now();
    }

    /// Whether power has been lost.
    pub fn crashed(&self) -> bool {
        self.shared.crashed()
    }

    /// Fails the `(after + 1)`-th next operation of kind `op`, on any of its disks, once.
    pub fn inject(&self, op: FaultOp, fault: Fault, after: u64) {
        self.shared.inject(op, fault, after);
    }

    /// Holds back (`true`) or lets through (`false`) the data syncs of every disk of the volume
    /// (`SimDisk::hold_syncs`). Directory syncs are not held.
    pub fn hold_syncs(&self, held: bool) {
        self.shared.hold_syncs(held);
    }

    /// The file currently visible as `name`, bypassing power and fault checks.
    pub fn disk(&self, name: &str) -> Option<Arc<SimDisk>> {
        lock(&self.namespace).live.get(name).cloned()
    }

    /// The names currently visible, sorted, bypassing power and fault checks.
    pub fn names(&self) -> Vec<String> {
        lock(&self.namespace).live.keys().cloned().collect()
    }

    /// The names a power loss now would certainly keep (as of the last `Volume::sync`), sorted,
    /// bypassing power and fault checks.
    pub fn durable_names(&self) -> Vec<String> {
        lock(&self.namespace).durable.keys().cloned().collect()
    }

    fn not_found(&self, name: &str) -> io::Error {
        io::Error::new(io::ErrorKind::NotFound, format!("sim:{}/{name}: no such file", self.name))
    }
}

impl fmt::Debug for SimVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let namespace = lock(&self.namespace);
        f.debug_struct("SimVolume")
            .field("name", &self.name)
            .field("files", &namespace.live.keys().collect::<Vec<_>>())
            .field("pending_namespace_ops", &namespace.pending.len())
            .finish()
    }
}

impl Volume for SimVolume {
    /// The simulator lives in this process's memory: no other process can reach it.
    fn lock(&self, _name: &str) -> io::Result<super::lock::Hold> {
        Ok(super::lock::Hold::private())
    }

    fn describe(&self) -> String {
        format!("sim:{}", self.name)
    }

    /// Files read as zeros either way, so `fill` changes nothing here. The length must be a
    /// multiple of `IO_ALIGN`, as every `Disk` length is.
    fn create(&self, name: &str, len_bytes: u64, _fill: bool) -> io::Result<Arc<dyn Disk>> {
        check_name(name)?;
        if len_bytes % IO_ALIGN as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "sim:{}/{name}: length {len_bytes} is not a multiple of the I/O alignment",
                    self.name
                ),
            ));
        }
        let _gate = self.shared.admit(Some(FaultOp::Create), true)?;
        let mut namespace = lock(&self.namespace);
        if namespace.live.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("sim:{}/{name}: file exists", self.name),
            ));
        }
        let path = format!("{}/{name}", self.name);
        let disk = SimDisk::from_image(path, len_bytes, Arc::clone(&self.shared), Vec::new());
        namespace.live.insert(name.to_string(), Arc::clone(&disk));
        namespace.pending.push(NamespaceOp::Create(name.to_string(), Arc::clone(&disk)));
        Ok(disk)
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn Disk>> {
        check_name(name)?;
        let _gate = self.shared.admit(None, false)?;
        match lock(&self.namespace).live.get(name) {
            Some(disk) => Ok(Arc::clone(disk) as Arc<dyn Disk>),
            None => Err(self.not_found(name)),
        }
    }

    /// Open handles keep working on the removed file's data, as with an unlinked inode.
    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        let _gate = self.shared.admit(None, true)?;
        let mut namespace = lock(&self.namespace);
        if namespace.live.remove(name).is_none() {
            return Err(self.not_found(name));
        }
        namespace.pending.push(NamespaceOp::Remove(name.to_string()));
        Ok(())
    }

    /// Atomic, replacing `to`; open handles keep working on the file under its new name.
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        check_name(from)?;
        check_name(to)?;
        let _gate = self.shared.admit(None, true)?;
        let mut namespace = lock(&self.namespace);
        let Some(disk) = namespace.live.remove(from) else {
            return Err(self.not_found(from));
        };
        namespace.live.insert(to.to_string(), disk);
        namespace.pending.push(NamespaceOp::Rename(from.to_string(), to.to_string()));
        Ok(())
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let _gate = self.shared.admit(None, false)?;
        Ok(self.names())
    }

    fn sync(&self) -> io::Result<()> {
        let _gate = self.shared.admit(Some(FaultOp::DirSync), true)?;
        let mut namespace = lock(&self.namespace);
        namespace.durable = namespace.live.clone();
        namespace.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::AlignedBuf;
    use super::*;

    const BLOCK: u64 = IO_ALIGN as u64;

    fn filled(byte: u8, len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(len);
        buf.fill(byte);
        buf
    }

    fn read(disk: &dyn Disk, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = AlignedBuf::zeroed(len);
        disk.read_at(offset, &mut buf)?;
        Ok(buf.to_vec())
    }

    fn is_power_loss(err: &io::Error) -> bool {
        err.kind() == io::ErrorKind::Other && err.to_string() == "simulated power loss"
    }

    #[test]
    fn pending_writes_become_durable_only_on_sync() -> io::Result<()> {
        let disk = SimDisk::new("d", 4 * BLOCK);
        assert_eq!(disk.describe(), "sim:d");
        disk.write_at(BLOCK, &filled(1, IO_ALIGN))?;
        assert_eq!(read(&*disk, BLOCK, IO_ALIGN)?, vec![1; IO_ALIGN]);
        assert_eq!(disk.clean_image().peek(BLOCK, IO_ALIGN), vec![0; IO_ALIGN]);
        disk.sync_data()?;
        disk.write_at(BLOCK, &filled(2, IO_ALIGN))?;
        assert_eq!(read(&*disk, BLOCK, IO_ALIGN)?, vec![2; IO_ALIGN]);
        assert_eq!(disk.clean_image().peek(BLOCK, IO_ALIGN), vec![1; IO_ALIGN]);
        assert_eq!(disk.volatile_image().peek(BLOCK, IO_ALIGN), vec![2; IO_ALIGN]);
        disk.sync_data()?;
        assert_eq!(disk.clean_image().peek(BLOCK, IO_ALIGN), vec![2; IO_ALIGN]);
        assert_eq!(disk.stats(), SimStats { reads: 2, writes: 2, syncs: 2 });
        Ok(())
    }

    #[test]
    fn bad_io_is_rejected_without_panics() -> io::Result<()> {
        let disk = SimDisk::new("d", 2 * BLOCK);
        let buf = filled(7, 2 * IO_ALIGN);
        for (offset, data) in [
            (1, &buf[..IO_ALIGN]),
            (0, &buf[..100]),
            (0, &buf[1..IO_ALIGN + 1]),
            (2 * BLOCK, &buf[..IO_ALIGN]),
            (u64::MAX - BLOCK + 1, &buf[..IO_ALIGN]),
        ] {
            let err = disk.write_at(offset, data).err();
            assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::InvalidInput));
        }
        assert_eq!(disk.stats().writes, 0);
        assert!(disk.peek(u64::MAX, 10).is_empty());
        assert_eq!(disk.peek(2 * BLOCK - 3, 10), vec![0; 3]);
        disk.corrupt(u64::MAX - 1, &[0xff; 8]);
        disk.corrupt(2 * BLOCK - 1, &[0xff; 8]);
        assert_eq!(disk.peek(2 * BLOCK - 2, 2), vec![0, 0xff]);
        Ok(())
    }

    #[test]
    fn crash_after_freezes_the_disk() -> io::Result<()> {
        let disk = SimDisk::new("d", 4 * BLOCK);
        disk.crash_after(2);
        disk.write_at(0, &filled(1, IO_ALIGN))?;
        disk.sync_data()?;
        assert!(!disk.crashed());
        let err = disk.write_at(BLOCK, &filled(2, IO_ALIGN)).err();
        assert!(err.as_ref().is_some_and(is_power_loss), "{err:?}");
        assert!(disk.crashed());
        assert!(read(&*disk, 0, IO_ALIGN).is_err_and(|e| is_power_loss(&e)));
        assert!(disk.sync_data().is_err_and(|e| is_power_loss(&e)));
        assert_eq!(disk.peek(0, 1), vec![1]);
        assert_eq!(disk.peek(BLOCK, 1), vec![0]);
        // An image is a fresh, powered disk.
        let image = disk.clean_image();
        assert!(!image.crashed());
        assert_eq!(read(&*image, 0, IO_ALIGN)?, vec![1; IO_ALIGN]);
        Ok(())
    }

    #[test]
    fn clean_image_drops_unsynced_writes() -> io::Result<()> {
        let disk = SimDisk::new("d", 8 * BLOCK);
        disk.write_at(0, &filled(1, 2 * IO_ALIGN))?;
        disk.sync_data()?;
        disk.write_at(BLOCK, &filled(2, 4 * IO_ALIGN))?;
        let image = disk.clean_image();
        assert_eq!(read(&*image, 0, 2 * IO_ALIGN)?, vec![1; 2 * IO_ALIGN]);
        assert_eq!(read(&*image, 2 * BLOCK, 4 * IO_ALIGN)?, vec![0; 4 * IO_ALIGN]);
        Ok(())
    }

    fn disk_with_pending_writes() -> io::Result<Arc<SimDisk>> {
        let disk = SimDisk::new("d", 64 * BLOCK);
        for block in 0..16u8 {
            disk.write_at(u64::from(block) * 2 * BLOCK, &filled(block + 1, 2 * IO_ALIGN))?;
        }
        Ok(disk)
    }

    #[test]
    fn crash_image_is_deterministic_per_seed() -> io::Result<()> {
        let disk = disk_with_pending_writes()?;
        let plan = CrashPlan::default();
        let len = 64 * IO_ALIGN;
        let images: Vec<Vec<u8>> =
            (0..8).map(|seed| disk.crash_image(seed, plan).peek(0, len)).collect();
        for (seed, image) in images.iter().enumerate() {
            assert_eq!(&disk.crash_image(seed as u64, plan).peek(0, len), image);
        }
        assert!(images.iter().any(|image| image != &images[0]), "seeds should differ");
        // Keep everything / drop everything reduce to the volatile and clean images.
        let all = CrashPlan { keep: 1.0, tear: 0.0 };
        assert_eq!(disk.crash_image(3, all).peek(0, len), disk.volatile_image().peek(0, len));
        let none = CrashPlan { keep: 0.0, tear: 0.0 };
        assert_eq!(disk.crash_image(3, none).peek(0, len), vec![0; len]);
        Ok(())
    }

    #[test]
    fn torn_writes_change_whole_sectors_to_new_content_only() -> io::Result<()> {
        let disk = SimDisk::new("d", 16 * BLOCK);
        let old = filled(0xaa, 16 * IO_ALIGN);
        disk.write_at(0, &old)?;
        disk.sync_data()?;
        disk.write_at(0, &filled(0x55, 16 * IO_ALIGN))?;
        let mut mixed = 0;
        for seed in 0..64 {
            let image = disk.crash_image(seed, CrashPlan { keep: 0.0, tear: 1.0 });
            let bytes = image.peek(0, 16 * IO_ALIGN);
            let mut fates = bytes.chunks(SECTOR_BYTES).map(|sector| {
                let whole = |byte| sector.iter().all(|&b| b == byte);
                assert!(whole(0xaa) || whole(0x55), "seed {seed}: a sector was split");
                whole(0x55)
            });
            let first = fates.next();
            if fates.any(|fate| Some(fate) != first) {
                mixed += 1;
            }
        }
        assert!(mixed > 32, "torn images should mix old and new sectors ({mixed}/64)");
        Ok(())
    }

    #[test]
    fn corrupt_flips_durable_and_pending_bytes() -> io::Result<()> {
        let disk = SimDisk::new("d", 2 * BLOCK);
        disk.write_at(0, &filled(0x0f, IO_ALIGN))?;
        disk.sync_data()?;
        disk.write_at(0, &filled(0xf0, IO_ALIGN))?;
        disk.corrupt(10, &[0xff, 0x01]);
        assert_eq!(disk.peek(9, 4), vec![0xf0, 0x0f, 0xf1, 0xf0]);
        assert_eq!(disk.clean_image().peek(9, 4), vec![0x0f, 0xf0, 0x0e, 0x0f]);
        Ok(())
    }

    #[test]
    fn namespace_ops_vanish_without_volume_sync() -> io::Result<()> {
        let volume = SimVolume::new("v");
        volume.create("a", BLOCK, true)?.write_and_sync(0, &filled(1, IO_ALIGN))?;
        volume.sync()?;
        let b = volume.create("b", BLOCK, false)?;
        b.write_and_sync(0, &filled(2, IO_ALIGN))?;
        volume.remove("a")?;
        assert_eq!(volume.names(), ["b"]);

        let clean = volume.clean_image();
        assert_eq!(clean.names(), ["a"]);
        assert_eq!(read(&*clean.open("a")?, 0, IO_ALIGN)?, vec![1; IO_ALIGN]);
        assert_eq!(volume.volatile_image().names(), ["b"]);
        // Pending ops were [create b, remove a]: only their prefixes may survive.
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..32 {
            seen.insert(volume.crash_image(seed, CrashPlan::default()).names().join(","));
        }
        let prefixes: std::collections::BTreeSet<String> =
            ["a", "a,b", "b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(seen, prefixes);

        volume.sync()?;
        assert_eq!(volume.clean_image().names(), ["b"]);
        Ok(())
    }

    #[test]
    fn renames_vanish_without_volume_sync_and_are_atomic() -> io::Result<()> {
        let volume = SimVolume::new("v");
        let a = volume.create("a", BLOCK, false)?;
        a.write_and_sync(0, &filled(1, IO_ALIGN))?;
        volume.create("b", BLOCK, false)?.write_and_sync(0, &filled(2, IO_ALIGN))?;
        volume.sync()?;
        volume.rename("a", "b")?;
        assert_eq!(volume.names(), ["b"]);
        assert_eq!(read(&*volume.open("b")?, 0, IO_ALIGN)?, vec![1; IO_ALIGN]);
        assert_eq!(read(&*a, 0, IO_ALIGN)?, vec![1; IO_ALIGN], "the open handle still works");
        // Unsynced, the rename may be undone, but never half done: a's data is under one name.
        assert_eq!(volume.clean_image().names(), ["a", "b"]);
        assert_eq!(volume.durable_names(), ["a", "b"]);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let image = volume.crash_image(seed, CrashPlan::default());
            let names = image.names();
            let at_b = read(&*image.open("b")?, 0, IO_ALIGN)?;
            match names.as_slice() {
                [a, b] if a == "a" && b == "b" => assert_eq!(at_b, vec![2; IO_ALIGN]),
                [b] if b == "b" => assert_eq!(at_b, vec![1; IO_ALIGN]),
                other => panic!("seed {seed}: names {other:?}"),
            }
            seen.insert(names.join(","));
        }
        assert_eq!(seen.len(), 2, "both fates should occur: {seen:?}");
        volume.sync()?;
        assert_eq!(volume.clean_image().names(), ["b"]);
        assert_eq!(volume.rename("a", "c").map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
        assert_eq!(
            volume.rename("b", "x/y").map_err(|e| e.kind()),
            Err(io::ErrorKind::InvalidInput)
        );
        Ok(())
    }

    #[test]
    fn namespace_errors() -> io::Result<()> {
        let volume = SimVolume::new("v");
        volume.create("a", BLOCK, false)?;
        let kind = |r: io::Result<Arc<dyn Disk>>| r.err().map(|e| e.kind());
        assert_eq!(kind(volume.create("a", BLOCK, false)), Some(io::ErrorKind::AlreadyExists));
        assert_eq!(kind(volume.open("missing")), Some(io::ErrorKind::NotFound));
        assert_eq!(kind(volume.create("x/y", BLOCK, false)), Some(io::ErrorKind::InvalidInput));
        assert_eq!(kind(volume.create("c", 100, false)), Some(io::ErrorKind::InvalidInput));
        assert_eq!(volume.remove("missing").map_err(|e| e.kind()), Err(io::ErrorKind::NotFound));
        assert_eq!(volume.open("a")?.describe(), "sim:v/a");
        assert_eq!(volume.list()?, ["a"]);
        Ok(())
    }

    #[test]
    fn injected_faults_fire_once_at_the_right_op() -> io::Result<()> {
        let disk = SimDisk::new("d", 4 * BLOCK);
        disk.inject(FaultOp::Write, Fault::Eio, 1);
        disk.write_at(0, &filled(1, IO_ALIGN))?;
        let err = disk.write_at(BLOCK, &filled(2, IO_ALIGN)).err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::EIO));
        assert_eq!(disk.peek(BLOCK, 1), vec![0], "a failed write changes nothing");
        disk.write_at(BLOCK, &filled(3, IO_ALIGN))?;

        disk.inject(FaultOp::Sync, Fault::Enospc, 0);
        let err = disk.sync_data().err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
        assert_eq!(disk.clean_image().peek(0, 1), vec![0], "writes stay pending");
        assert_eq!(disk.peek(0, 1), vec![1]);
        disk.sync_data()?;
        assert_eq!(disk.clean_image().peek(0, 1), vec![1]);

        disk.inject(FaultOp::Read, Fault::Eio, 0);
        assert!(read(&*disk, 0, IO_ALIGN).is_err());
        assert_eq!(read(&*disk, BLOCK, IO_ALIGN)?, vec![3; IO_ALIGN]);
        assert_eq!(disk.stats(), SimStats { reads: 1, writes: 2, syncs: 1 });
        assert!(!disk.crashed());
        Ok(())
    }

    #[test]
    fn volume_faults_apply_to_any_disk() -> io::Result<()> {
        let volume = SimVolume::new("v");
        volume.inject(FaultOp::Create, Fault::Enospc, 1);
        volume.inject(FaultOp::Write, Fault::Eio, 1);
        let a = volume.create("a", BLOCK, false)?;
        let err = volume.create("b", BLOCK, false).err();
        assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
        assert_eq!(volume.names(), ["a"]);
        let b = volume.create("b", BLOCK, false)?;
        a.write_at(0, &filled(1, IO_ALIGN))?;
        assert!(b.write_at(0, &filled(2, IO_ALIGN)).is_err());
        b.write_at(0, &filled(3, IO_ALIGN))?;
        assert_eq!(read(&*a, 0, IO_ALIGN)?, vec![1; IO_ALIGN]);
        assert_eq!(read(&*b, 0, IO_ALIGN)?, vec![3; IO_ALIGN]);
        Ok(())
    }

    #[test]
    fn volume_crash_counter_spans_all_disks() -> io::Result<()> {
        let volume = SimVolume::new("v");
        volume.crash_after(6);
        let a = volume.create("a", BLOCK, false)?; // 1
        let b = volume.create("b", BLOCK, false)?; // 2
        volume.sync()?; // 3
        a.write_at(0, &filled(1, IO_ALIGN))?; // 4
        b.write_at(0, &filled(2, IO_ALIGN))?; // 5
        a.sync_data()?; // 6
        assert_eq!(read(&*b, 0, IO_ALIGN)?, vec![2; IO_ALIGN], "reads do not count");
        assert!(b.sync_data().is_err_and(|e| is_power_loss(&e)));
        let disk_a = volume.disk("a").ok_or(io::ErrorKind::NotFound)?;
        assert!(volume.crashed() && disk_a.crashed());
        assert!(read(&*a, 0, IO_ALIGN).is_err_and(|e| is_power_loss(&e)));
        assert!(volume.list().is_err_and(|e| is_power_loss(&e)));
        assert!(volume.create("c", BLOCK, false).is_err());
        assert!(volume.remove("a").is_err());

        let image = volume.clean_image();
        assert!(!image.crashed());
        assert_eq!(read(&*image.open("a")?, 0, IO_ALIGN)?, vec![1; IO_ALIGN]);
        assert_eq!(read(&*image.open("b")?, 0, IO_ALIGN)?, vec![0; IO_ALIGN]);
        Ok(())
    }

    #[test]
    fn held_syncs_wait_for_release_and_keep_data_pending() -> io::Result<()> {
        let volume = SimVolume::new("v");
        let disk = volume.create("a", BLOCK, false)?;
        volume.sync()?;
        disk.write_at(0, &filled(7, IO_ALIGN))?;
        volume.hold_syncs(true);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let syncer = {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                let result = disk.sync_data();
                done_tx.send(()).ok();
                result
            })
        };
        let waited = done_rx.recv_timeout(std::time::Duration::from_millis(100));
        assert!(waited.is_err(), "a held sync returned before its release");
        let image = volume.clean_image();
        assert_eq!(read(&*image.open("a")?, 0, IO_ALIGN)?, vec![0; IO_ALIGN]);
        volume.hold_syncs(false);
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .map_err(|_| io::Error::other("a released sync did not return"))?;
        syncer.join().map_err(|_| io::Error::other("syncer panicked"))??;
        let image = volume.clean_image();
        assert_eq!(read(&*image.open("a")?, 0, IO_ALIGN)?, vec![7; IO_ALIGN]);
        Ok(())
    }
}
