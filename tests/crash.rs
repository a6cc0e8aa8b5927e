//! Crash tests on the simulated disk. Each trial formats a store (directory or raw layout), runs a
//! seeded random schedule of appends, flushes, truncations, commits, applies, checkpoints and
//! purges, loses power at a random mutating disk operation, builds a crash image (unsynced writes
//! dropped, kept, torn at a sector or kept sector by sector) and reopens it. It then checks:
//! - every entry acknowledged by a completed flush (and not truncated since) reads back identical,
//!   unless a purge that covers it was issued;
//! - every entry the recovered log holds is one that was appended at that index (nothing torn,
//!   corrupt or stale is accepted);
//! - the persisted committed index never goes back, and the image after replay equals a model
//!   that applied exactly the committed entries;
//! - the recovered store accepts new appends that survive another reopen.
//!
//! `XDEVICE_CRASH_TRIALS` sets the number of trials (default 1000; `XDEVICE_LONG=1` makes it
//! 20000); `XDEVICE_CRASH_SEED` reruns one seed, which every failure prints.
//!
//! Two sweeps crash at every mutating operation of a fixed scenario instead: a WAL rotating
//! through spare segments, and a snapshot install (staging, intent, swap, cleanup), each in a
//! directory and on a raw device.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use xdevice::entry::{BlockOp, EntryBody, EntryPayload};
use xdevice::storage::disk::{CrashPlan, SimDisk, SimVolume};
use xdevice::storage::engine::Engine;
use xdevice::storage::layout::Location;
use xdevice::storage::state::LogId;
use xdevice::storage::wal::NewEntry;

const BLOCKS: u64 = 64;

/// The store under test, in either layout.
enum Store {
    Dir(Arc<SimVolume>),
    Raw(Arc<SimDisk>),
}

impl Store {
    fn location(&self) -> Location {
        match self {
            Store::Dir(v) => dir_location(v),
            Store::Raw(d) => raw_location(d),
        }
    }
    fn crash_after(&self, ops: u64) {
        match self {
            Store::Dir(v) => v.crash_after(ops),
            Store::Raw(d) => d.crash_after(ops),
        }
    }
    fn crash_now(&self) {
        match self {
            Store::Dir(v) => v.crash_now(),
            Store::Raw(d) => d.crash_now(),
        }
    }
    fn crash_image(&self, seed: u64, plan: CrashPlan) -> Store {
        match self {
            Store::Dir(v) => Store::Dir(v.crash_image(seed, plan)),
            Store::Raw(d) => Store::Raw(d.crash_image(seed, plan)),
        }
    }
    fn clean_image(&self) -> Store {
        match self {
            Store::Dir(v) => Store::Dir(v.clean_image()),
            Store::Raw(d) => Store::Raw(d.clean_image()),
        }
    }
}

/// What the test knows must hold after a crash.
#[derive(Default)]
struct Model {
    /// The log as the engine shows it now.
    log: BTreeMap<u64, Vec<u8>>,
    next: u64,
    /// Every payload ever appended at each index.
    history: HashMap<u64, HashSet<Vec<u8>>>,
    /// The log as of the last completed flush.
    acked: BTreeMap<u64, Vec<u8>>,
    acked_next: u64,
    /// Lowest truncation point issued since the last completed flush.
    truncated_since_ack: Option<u64>,
    /// Highest committed index whose state update returned Ok, and the highest ever issued.
    committed_ok: Option<u64>,
    committed_issued: Option<u64>,
    /// Payloads of committed entries (never truncated), by index.
    fixed: BTreeMap<u64, Vec<u8>>,
    /// Highest purge point issued.
    purge_issued: Option<u64>,
    term: u64,
}

fn random_entry(rng: &mut SmallRng, index: u64, term: u64) -> NewEntry {
    let ops = (0..rng.gen_range(1..=3))
        .map(|_| {
            let lba = rng.gen_range(0..BLOCKS - 4);
            if rng.gen_ratio(1, 6) {
                BlockOp::Zero { lba, blocks: rng.gen_range(1..=4) }
            } else {
                let blocks = rng.gen_range(1..=4) as usize;
                BlockOp::Write { lba, data: pattern(lba, blocks, rng.gen()).into() }
            }
        })
        .collect();
    let payload = EntryPayload { leader_node: 1 + term % 3, body: EntryBody::Blocks(ops) };
    NewEntry { index, term, payload: payload.encode().into() }
}

/// Runs the schedule until it ends or the disk "loses power". Errors after the crash are expected.
fn run_schedule(engine: &Engine, rng: &mut SmallRng, model: &mut Model, steps: usize) {
    for _ in 0..steps {
        let ok = match rng.gen_range(0..100) {
            0..=39 => append(engine, rng, model),
            40..=59 => flush(engine, model),
            60..=66 => truncate(engine, rng, model),
            67..=77 => commit(engine, rng, model),
            78..=85 => model.committed_ok.is_none_or(|c| engine.apply_through(c).is_ok()),
            86..=93 => engine.checkpoint().is_ok(),
            _ => purge(engine, model),
        };
        if !ok {
            return;
        }
    }
}

fn append(engine: &Engine, rng: &mut SmallRng, model: &mut Model) -> bool {
    let n = rng.gen_range(1..=6);
    let entries: Vec<NewEntry> =
        (0..n).map(|i| random_entry(rng, model.next + i, model.term)).collect();
    for e in &entries {
        model.history.entry(e.index).or_default().insert(e.payload.to_vec());
    }
    let logged: Vec<(u64, Vec<u8>)> =
        entries.iter().map(|e| (e.index, e.payload.to_vec())).collect();
    if engine.wal().append(entries).is_err() {
        return false;
    }
    for (i, p) in logged {
        model.log.insert(i, p);
        model.next = i + 1;
    }
    true
}

fn flush(engine: &Engine, model: &mut Model) -> bool {
    if engine.wal().flush().is_err() {
        return false;
    }
    model.acked = model.log.clone();
    model.acked_next = model.next;
    model.truncated_since_ack = None;
    true
}

fn truncate(engine: &Engine, rng: &mut SmallRng, model: &mut Model) -> bool {
    let low =
        model.committed_issued.map_or(0, |c| c + 1).max(model.purge_issued.map_or(0, |p| p + 1));
    if low >= model.next {
        return true;
    }
    let from = rng.gen_range(low..model.next);
    if engine.wal().truncate(from).is_err() {
        return false;
    }
    model.log.split_off(&from);
    model.next = from;
    model.term += 1;
    model.truncated_since_ack = Some(model.truncated_since_ack.map_or(from, |t| t.min(from)));
    true
}

fn commit(engine: &Engine, rng: &mut SmallRng, model: &mut Model) -> bool {
    // Only durable entries may be committed (single replica): those acked and not truncated since.
    let durable_end =
        model.truncated_since_ack.map_or(model.acked_next, |t| t.min(model.acked_next));
    let low = model.committed_issued.map_or(0, |c| c + 1);
    if low >= durable_end {
        return true;
    }
    let index = rng.gen_range(low..durable_end);
    for i in low..=index {
        model.fixed.insert(i, model.log[&i].clone());
    }
    model.committed_issued = Some(index);
    let term = engine.wal().term(index).unwrap_or(0);
    if engine.state().update(|s| s.committed = Some(LogId { term, node: 1, index })).is_err() {
        return false;
    }
    model.committed_ok = Some(index);
    true
}

fn purge(engine: &Engine, model: &mut Model) -> bool {
    let applied = engine.applied().log_id.map(|id| id.index);
    if let Some(a) = applied {
        model.purge_issued = Some(model.purge_issued.map_or(a, |p| p.max(a)));
    }
    engine.checkpoint_and_purge().is_ok()
}

/// The image a correct store holds after applying committed entries `0..=upto`.
fn model_image(model: &Model, upto: Option<u64>) -> Vec<u8> {
    let mut image = vec![0u8; BLOCKS as usize * BLOCK];
    let Some(upto) = upto else { return image };
    for (_, payload) in model.fixed.range(..=upto) {
        let Ok(EntryPayload { body: EntryBody::Blocks(ops), .. }) = EntryPayload::decode(payload)
        else {
            continue;
        };
        for op in ops {
            match op {
                BlockOp::Write { lba, data } => {
                    let at = lba as usize * BLOCK;
                    image[at..at + data.len()].copy_from_slice(&data);
                }
                BlockOp::Zero { lba, blocks } => {
                    let at = lba as usize * BLOCK;
                    image[at..at + blocks as usize * BLOCK].fill(0);
                }
            }
        }
    }
    image
}

fn verify(engine: &Engine, model: &Model) -> Result<(), String> {
    let b = engine.wal().bounds();
    for (&i, want) in &model.acked {
        if i < b.first {
            if model.purge_issued.is_none_or(|p| i > p) {
                return Err(format!(
                    "acknowledged entry {i} lost: log starts at {} with no purge past it",
                    b.first
                ));
            }
            continue;
        }
        if model.truncated_since_ack.is_some_and(|t| i >= t) {
            continue;
        }
        if i >= b.next {
            return Err(format!("acknowledged entry {i} lost: log ends at {}", b.next));
        }
        let got = engine.wal().read(i).map_err(|e| format!("read acknowledged {i}: {e}"))?;
        if &got != want {
            return Err(format!("acknowledged entry {i} changed"));
        }
    }
    for i in b.first..b.next {
        let got = engine.wal().read(i).map_err(|e| format!("read recovered {i}: {e}"))?;
        if !model.history.get(&i).is_some_and(|h| h.contains(&got)) {
            return Err(format!("recovered entry {i} was never appended at that index"));
        }
    }
    let committed = engine.state().get().committed.map(|c| c.index);
    if committed < model.committed_ok {
        return Err(format!(
            "committed index went back from {:?} to {committed:?}",
            model.committed_ok
        ));
    }
    if committed > model.committed_issued {
        return Err(format!("committed index {committed:?} was never issued"));
    }
    let applied = engine.applied().log_id.map(|id| id.index);
    if applied != committed {
        return Err(format!("after replay applied {applied:?} != committed {committed:?}"));
    }
    let mut image = vec![0u8; BLOCKS as usize * BLOCK];
    engine.image().read_blocks(0, &mut image).map_err(|e| format!("read image: {e}"))?;
    if image != model_image(model, committed) {
        let want = model_image(model, committed);
        let lba = (0..BLOCKS as usize)
            .find(|&l| image[l * BLOCK..(l + 1) * BLOCK] != want[l * BLOCK..(l + 1) * BLOCK]);
        return Err(format!(
            "image differs from the committed model at block {lba:?} (applied {applied:?})"
        ));
    }
    Ok(())
}

/// Appends to the recovered store and checks the result survives a clean reopen.
fn still_usable(store: &Store) -> Result<(), String> {
    let (engine, _) =
        Engine::open(&store.location(), inline_config()).map_err(|e| format!("reopen: {e}"))?;
    let next = engine.wal().bounds().next;
    let entry = block_entry(next, 1000, 1, 1, 77);
    let want = entry.payload.to_vec();
    engine.wal().append(vec![entry]).map_err(|e| format!("append after recovery: {e}"))?;
    engine.wal().flush().map_err(|e| format!("flush after recovery: {e}"))?;
    drop(engine);
    let again = store.clean_image();
    let (engine, _) = Engine::open(&again.location(), inline_config())
        .map_err(|e| format!("second reopen: {e}"))?;
    let got = engine.wal().read(next).map_err(|e| format!("read after second reopen: {e}"))?;
    if got != want {
        return Err("entry appended after recovery changed".into());
    }
    Ok(())
}

fn trial(seed: u64) -> Result<(), String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let store = if seed % 2 == 0 {
        let volume = SimVolume::new("vol");
        Store::Dir(volume)
    } else {
        Store::Raw(SimDisk::new("raw", 8 << 20))
    };
    Engine::format(&store.location(), &small_format()).map_err(|e| format!("format: {e}"))?;
    let store = store.clean_image();
    let (engine, _) =
        Engine::open(&store.location(), inline_config()).map_err(|e| format!("open: {e}"))?;
    let mut model = Model { term: 1, ..Model::default() };
    store.crash_after(rng.gen_range(1..=400));
    run_schedule(&engine, &mut rng, &mut model, 60);
    store.crash_now();
    drop(engine);
    let plan = CrashPlan { keep: rng.gen_range(0.0..1.0), tear: rng.gen_range(0.0..0.5) };
    let image = store.crash_image(rng.gen(), plan);
    let (engine, _) = Engine::open(&image.location(), inline_config())
        .map_err(|e| format!("recovery failed: {e}"))?;
    verify(&engine, &model)?;
    drop(engine);
    still_usable(&image.clean_image())
}

fn trials() -> u64 {
    let long = std::env::var("XDEVICE_LONG").is_ok_and(|v| v == "1");
    let default = if long { 20_000 } else { 1_000 };
    std::env::var("XDEVICE_CRASH_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn random_crash_points_lose_no_acknowledged_write() {
    let seeds: Vec<u64> =
        match std::env::var("XDEVICE_CRASH_SEED").ok().and_then(|v| v.parse().ok()) {
            Some(seed) => vec![seed],
            None => {
                let base: u64 = std::env::var("XDEVICE_CRASH_BASE")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0x5eed);
                (0..trials()).map(|i| base.wrapping_add(i)).collect()
            }
        };
    let mut failures = Vec::new();
    for &seed in &seeds {
        let outcome = std::panic::catch_unwind(|| trial(seed));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => failures.push(format!("seed {seed}: {msg}")),
            Err(_) => failures.push(format!("seed {seed}: panicked")),
        }
    }
    println!("crash trials: {} run, {} failed", seeds.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{} of {} crash trials failed (rerun one with XDEVICE_CRASH_SEED=<seed>):\n{}",
        failures.len(),
        seeds.len(),
        failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

/// Where a crash point of the rotation scenario landed, from what the engine shows after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Landed {
    /// Preparing the next spare: the batch of the failed flush is durable, the spare is not.
    Preparing,
    /// Writing or syncing the first batch of a segment just rotated to (its header with it).
    Rotating,
    /// The batch right after that first one.
    AfterRotation,
    Elsewhere,
    /// The schedule finished before the crash point.
    Completed,
}

/// Appends one 8 KiB entry and flushes it, `flushes` times, or until a flush fails. Returns the
/// payloads acknowledged (flush returned Ok), every payload appended, and the number of live
/// segments after each successful flush.
fn rotation_schedule(engine: &Engine, flushes: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<usize>) {
    let (mut acked, mut appended, mut segments) = (Vec::new(), Vec::new(), Vec::new());
    for index in 0..flushes {
        let mut rng = SmallRng::seed_from_u64(index);
        let payload: Vec<u8> = (0..8192).map(|_| rng.gen()).collect();
        appended.push(payload.clone());
        let entry = NewEntry { index, term: 1, payload: payload.into() };
        if engine.wal().append(vec![entry]).is_err() || engine.wal().flush().is_err() {
            break;
        }
        acked.push(appended[index as usize].clone());
        segments.push(engine.wal().segments().len());
    }
    (acked, appended, segments)
}

/// One crash point of the rotation scenario: crash after `ops` mutating operations, recover from
/// three crash images, check every acknowledged entry and that the store takes new appends.
fn rotation_crash(raw: bool, ops: u64, flushes: u64, dry: &[usize]) -> Result<Landed, String> {
    let store = if raw {
        Store::Raw(SimDisk::new("raw", 8 << 20))
    } else {
        Store::Dir(SimVolume::new("vol"))
    };
    Engine::format(&store.location(), &small_format()).map_err(|e| format!("format: {e}"))?;
    let store = store.clean_image();
    let (engine, _) =
        Engine::open(&store.location(), inline_config()).map_err(|e| format!("open: {e}"))?;
    store.crash_after(ops);
    let (acked, appended, _) = rotation_schedule(&engine, flushes);
    let bounds = engine.wal().bounds();
    let failed = acked.len();
    let landed = if failed as u64 == flushes {
        Landed::Completed
    } else if bounds.durable_next == bounds.next && engine.wal().spare().is_none() {
        Landed::Preparing
    } else if failed > 0 && dry.get(failed) > dry.get(failed - 1) {
        Landed::Rotating
    } else if failed > 1 && dry.get(failed - 1) > dry.get(failed - 2) {
        Landed::AfterRotation
    } else {
        Landed::Elsewhere
    };
    store.crash_now();
    drop(engine);
    for (seed, keep, tear) in [(1, 0.0, 0.0), (2, 1.0, 0.0), (3, 0.5, 0.5)] {
        let image = store.crash_image(seed, CrashPlan { keep, tear });
        let (engine, report) = Engine::open(&image.location(), inline_config())
            .map_err(|e| format!("recovery (plan {seed}) failed: {e}"))?;
        let next = engine.wal().bounds().next;
        if next < acked.len() as u64 || next > appended.len() as u64 {
            return Err(format!(
                "plan {seed}: recovered log ends at {next}, {} acked",
                acked.len()
            ));
        }
        for index in 0..next {
            let got = engine.wal().read(index).map_err(|e| format!("read {index}: {e}"))?;
            if got != appended[index as usize] {
                return Err(format!("plan {seed}: entry {index} differs after recovery"));
            }
        }
        if report.wal.segments == 0 {
            return Err(format!("plan {seed}: no segment recovered"));
        }
        drop(engine);
        still_usable(&image.clean_image()).map_err(|e| format!("plan {seed}: {e}"))?;
    }
    Ok(landed)
}

/// Every crash point of a schedule that rotates through spare segments several times: crashes
/// while a spare is being prepared (allocated, its header written and synced, its directory
/// entry synced), while the first batch of a segment rotated to is written (with the segment's
/// header over the spare's), and right after that, lose no acknowledged entry and recover.
#[test]
fn crashes_around_spare_segments_lose_no_acknowledged_entry() {
    const FLUSHES: u64 = 100;
    for raw in [false, true] {
        let mut landed = HashMap::new();
        let mut dry = Vec::new();
        for ops in 1.. {
            if ops == 1 {
                let store = if raw {
                    Store::Raw(SimDisk::new("raw", 8 << 20))
                } else {
                    Store::Dir(SimVolume::new("vol"))
                };
                Engine::format(&store.location(), &small_format()).expect("format");
                let store = store.clean_image();
                let (engine, _) = Engine::open(&store.location(), inline_config()).expect("open");
                dry = rotation_schedule(&engine, FLUSHES).2;
                assert!(dry.last() >= Some(&4), "the schedule rotates at least three times");
            }
            let outcome = rotation_crash(raw, ops, FLUSHES, &dry)
                .unwrap_or_else(|e| panic!("raw {raw}, crash after {ops} ops: {e}"));
            if outcome == Landed::Completed {
                break;
            }
            *landed.entry(outcome).or_insert(0u32) += 1;
        }
        println!("raw {raw}: crash points by place: {landed:?}");
        for place in [Landed::Preparing, Landed::Rotating, Landed::AfterRotation] {
            assert!(landed.get(&place).is_some_and(|&n| n >= 3), "raw {raw}: {place:?} {landed:?}");
        }
    }
}

/// Snapshot install: a replica on the simulated disk receives a snapshot (staged record by
/// record as `SnapshotInbox` does, then handed to `install_snapshot`), losing power after every
/// possible number of mutating disk operations, in both layouts (a raw device is a file of the
/// same simulated volume the snapshot is staged on, so one power loss reaches both).
mod install {
    use super::*;
    use openraft::storage::RaftStateMachine;
    use tokio::io::AsyncReadExt;
    use xdevice::replication::snapshot::{Described, LiveStream, SnapshotData, SnapshotFiles};
    use xdevice::replication::state_machine::StateMachine;
    use xdevice::replication::types::{from_store_log_id, SnapshotMeta};
    use xdevice::storage::disk::Volume;
    use xdevice::storage::engine::FormatOptions;
    use xdevice::storage::image::Attachment;

    /// 320 blocks: two chunks, the second partial.
    const DEVICE_BLOCKS: u64 = 320;
    const CLUSTER: uuid::Uuid = uuid::Uuid::from_u128(0xc1a5_7e55);
    const SNAPSHOT_AT: LogId = LogId { term: 2, node: 1, index: 10 };
    const BEFORE_AT: LogId = LogId { term: 1, node: 1, index: 3 };
    const STAGED: &str = "t0_snap_recv";
    const INTENT: &str = "t0_snap_install";

    fn format() -> FormatOptions {
        FormatOptions {
            device_bytes: Some(DEVICE_BLOCKS * BLOCK as u64),
            cluster_id: CLUSTER,
            ..small_format()
        }
    }

    fn write(lbas: std::ops::Range<u64>, seed: u64) -> BlockOp {
        let blocks = (lbas.end - lbas.start) as usize;
        BlockOp::Write { lba: lbas.start, data: pattern(lbas.start, blocks, seed).into() }
    }

    fn whole_image(engine: &Engine) -> Result<Vec<u8>, String> {
        let mut image = vec![0u8; DEVICE_BLOCKS as usize * BLOCK];
        engine.image().read_blocks(0, &mut image).map_err(|e| format!("read image: {e}"))?;
        Ok(image)
    }

    /// The snapshot: a source replica's image at `SNAPSHOT_AT`, with member 2 attached, as the
    /// stream a leader sends. Returns what it describes, the stream, and the image it holds.
    fn source_snapshot(rt: &tokio::runtime::Runtime) -> (Described, Vec<u8>, Vec<u8>) {
        let volume = SimVolume::new("source");
        Engine::format(&dir_location(&volume), &format()).expect("format source");
        let (engine, _) = Engine::open(&dir_location(&volume), inline_config()).expect("open");
        let ops = vec![write(5..25, 21), write(100..103, 22), write(250..300, 23)];
        let id = |index| LogId { index, ..SNAPSHOT_AT };
        engine.apply_entries([(id(8), &EntryBody::Blocks(ops))]).expect("apply");
        engine.apply_entries([(id(9), &EntryBody::Attach(2))]).expect("attach");
        let zero = vec![BlockOp::Zero { lba: 20, blocks: 3 }];
        engine.apply_entries([(SNAPSHOT_AT, &EntryBody::Blocks(zero))]).expect("zero");
        let applied = engine.checkpoint().expect("checkpoint source");
        assert_eq!(applied.log_id, Some(SNAPSHOT_AT));
        let described = Described {
            meta: SnapshotMeta {
                last_log_id: Some(from_store_log_id(SNAPSHOT_AT)),
                last_membership: Default::default(),
            },
            attachment: applied.attachment,
        };
        let engine = Arc::new(engine);
        let mut stream = Vec::new();
        let mut live =
            SnapshotData::Live(LiveStream::new(engine.clone(), &described).expect("live"));
        rt.block_on(live.read_to_end(&mut stream)).expect("read the stream");
        let image = whole_image(&engine).expect("source image");
        (described, stream, image)
    }

    /// The receiving store, before the snapshot, on `volume`: its own data at `BEFORE_AT`,
    /// checkpointed (blocks the snapshot overwrites, and blocks it leaves unwritten).
    fn receiver(volume: &Arc<SimVolume>, raw: bool) -> Location {
        let location = if raw {
            let disk = volume.create("raw", 8 << 20, false).expect("create raw");
            volume.sync().expect("sync");
            Location::Raw { disk }
        } else {
            dir_location(volume)
        };
        Engine::format(&location, &format()).expect("format receiver");
        let (engine, _) = Engine::open(&location, inline_config()).expect("open receiver");
        let ops = vec![write(0..20, 11), write(40..60, 12), write(200..260, 13)];
        let id = |index| LogId { index, ..BEFORE_AT };
        engine.apply_entries([(id(2), &EntryBody::Blocks(ops))]).expect("apply");
        let zero = vec![BlockOp::Zero { lba: 10, blocks: 2 }];
        engine.apply_entries([(BEFORE_AT, &EntryBody::Blocks(zero))]).expect("zero");
        engine.checkpoint().expect("checkpoint receiver");
        location
    }

    /// The store at `location` on `volume` (a crash image), opened as `open_replica` does.
    fn location_on(volume: &Arc<SimVolume>, raw: bool) -> Result<Location, String> {
        Ok(if raw {
            Location::Raw { disk: volume.open("raw").map_err(|e| format!("open raw: {e}"))? }
        } else {
            dir_location(volume)
        })
    }

    fn recover(volume: &Arc<SimVolume>, raw: bool) -> Result<(Arc<Engine>, StateMachine), String> {
        let location = location_on(volume, raw)?;
        let (engine, _) =
            Engine::open(&location, inline_config()).map_err(|e| format!("open: {e}"))?;
        let engine = Arc::new(engine);
        let files = SnapshotFiles::new(volume.clone() as Arc<dyn Volume>, "t0");
        let sm = StateMachine::new(engine.clone(), files).map_err(|e| format!("recovery: {e}"))?;
        Ok((engine, sm))
    }

    /// Where a crash point landed, from what the simulator holds after it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Landed {
        /// Creating, writing or syncing the staged stream.
        Staging,
        /// The staged stream synced; renaming it to the intent, or syncing the volume after.
        Intent,
        /// The intent durable: writing the image or checkpointing it.
        Swap,
        /// The image checkpointed at the snapshot: removing the intent, or syncing that.
        Cleanup,
        /// The install completed before the crash point.
        Completed,
    }

    /// What a recovered replica holds: the state before the snapshot, or the snapshot's.
    fn check(
        engine: &Engine,
        volume: &SimVolume,
        before: &[u8],
        snapshot: &(Described, Vec<u8>, Vec<u8>),
        landed: Landed,
    ) -> Result<bool, String> {
        let names = volume.names();
        if names.iter().any(|n| n == STAGED || n == INTENT) {
            return Err(format!("snapshot files left after recovery: {names:?}"));
        }
        let image = whole_image(engine)?;
        let applied = engine.applied();
        let installed = match applied.log_id {
            Some(id) if id == SNAPSHOT_AT => true,
            Some(id) if id == BEFORE_AT => false,
            other => return Err(format!("applied {other:?} is neither before nor the snapshot")),
        };
        if installed {
            if image != snapshot.2 {
                return Err("the installed image differs from the snapshot's".into());
            }
            if applied.attachment != Some(Attachment { epoch: 9, node: 2 })
                || applied.attachment != snapshot.0.attachment
            {
                return Err(format!("attachment {:?} is not the snapshot's", applied.attachment));
            }
            if engine.state().get().committed.map(|c| c.index) < Some(SNAPSHOT_AT.index) {
                return Err("the hard state's committed index is below the snapshot".into());
            }
        } else {
            if matches!(landed, Landed::Swap | Landed::Cleanup | Landed::Completed) {
                return Err(format!("{landed:?}: the install was decided but is undone"));
            }
            if image != before {
                let lba = (0..DEVICE_BLOCKS as usize).find(|&l| {
                    image[l * BLOCK..(l + 1) * BLOCK] != before[l * BLOCK..(l + 1) * BLOCK]
                });
                return Err(format!("the image before the snapshot changed at block {lba:?}"));
            }
            if applied.attachment.is_some() {
                return Err("an attachment appeared without the snapshot".into());
            }
        }
        Ok(installed)
    }

    /// One crash point: the install loses power after `ops` mutating operations; every crash
    /// image recovers to the state before the snapshot or to the snapshot, and the recovery is
    /// durable (a second power loss right after it changes nothing).
    pub fn crash_point(
        rt: &tokio::runtime::Runtime,
        raw: bool,
        ops: u64,
        snapshot: &(Described, Vec<u8>, Vec<u8>),
    ) -> Result<Landed, String> {
        let volume = SimVolume::new("vol");
        receiver(&volume, raw);
        let volume = volume.clean_image();
        let (engine, mut sm) = recover(&volume, raw)?;
        let before = whole_image(&engine)?;
        let (described, stream, _) = snapshot;
        volume.crash_after(ops);
        let record = snapshot_record_bytes();
        let outcome: Result<(), String> = rt.block_on(async {
            let mut data = sm.begin_receiving().await.map_err(|e| e.to_string())?;
            for rec in stream.chunks(record) {
                data.stage(rec).await.map_err(|e| e.to_string())?;
            }
            sm.install_snapshot(&described.meta, data).await.map_err(|e| e.to_string())
        });
        let landed = if outcome.is_ok() {
            Landed::Completed
        } else if engine.image().applied().log_id == Some(SNAPSHOT_AT) {
            Landed::Cleanup
        } else if volume.durable_names().iter().any(|n| n == INTENT) {
            Landed::Swap
        } else if volume.names().iter().any(|n| n == INTENT)
            || volume.disk(STAGED).is_some_and(|d| d.stats().syncs > 0)
        {
            Landed::Intent
        } else {
            Landed::Staging
        };
        if let Err(e) = &outcome {
            if !e.contains("simulated power loss") {
                return Err(format!("the install failed for another reason than the crash: {e}"));
            }
        }
        volume.crash_now();
        drop(sm);
        drop(engine);
        let plans = [
            (1, 0.0, 0.0),
            (2, 1.0, 0.0),
            (3, 0.5, 0.5),
            (4, 0.0, 0.0),
            (5, 1.0, 0.0),
            (6, 0.5, 0.5),
        ];
        for (seed, keep, tear) in plans {
            let plan = format!("plan {seed} (keep {keep}, tear {tear})");
            let image = volume.crash_image(seed, CrashPlan { keep, tear });
            let (engine, sm) = recover(&image, raw).map_err(|e| format!("{plan}: {e}"))?;
            let installed = check(&engine, &image, &before, snapshot, landed)
                .map_err(|e| format!("{plan}: {e}"))?;
            drop(sm);
            drop(engine);
            let again = image.clean_image();
            let (engine, _sm) =
                recover(&again, raw).map_err(|e| format!("{plan}, reopened: {e}"))?;
            let still = check(&engine, &again, &before, snapshot, landed)
                .map_err(|e| format!("{plan}, reopened: {e}"))?;
            if still != installed {
                return Err(format!("{plan}: the recovery was not durable"));
            }
        }
        Ok(landed)
    }

    fn snapshot_record_bytes() -> usize {
        xdevice::replication::snapshot::record_bytes(BLOCK as u32) as usize
    }

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    pub fn snapshot(rt: &tokio::runtime::Runtime) -> (Described, Vec<u8>, Vec<u8>) {
        source_snapshot(rt)
    }
}

/// Every crash point of a snapshot install, in a directory and on a raw device: while the
/// stream is staged (created, written, synced), around the intent (the rename and the volume
/// sync that makes it durable), in the swap (the image's blocks and its checkpoint) and in the
/// cleanup (the intent's removal and its sync). Each point's crash images (unsynced writes
/// dropped, kept, torn; a random prefix of the unsynced namespace changes) recover to exactly the
/// state before the snapshot with nothing staged, or exactly the snapshot's (image, applied
/// index, attachment), and once the intent was durable, always the snapshot's.
#[test]
fn crashes_during_a_snapshot_install_lose_nothing() {
    let rt = install::runtime();
    let snapshot = install::snapshot(&rt);
    let started = std::time::Instant::now();
    for raw in [false, true] {
        let mut landed = HashMap::new();
        for ops in 0.. {
            let place = install::crash_point(&rt, raw, ops, &snapshot)
                .unwrap_or_else(|e| panic!("raw {raw}, crash after {ops} ops: {e}"));
            if place == install::Landed::Completed {
                println!("raw {raw}: {ops} crash points, by place: {landed:?}");
                break;
            }
            *landed.entry(place).or_insert(0u32) += 1;
        }
        use install::Landed::*;
        for (place, least) in [(Staging, 4), (Intent, 2), (Swap, 4), (Cleanup, 2)] {
            assert!(
                landed.get(&place).is_some_and(|&n| n >= least),
                "raw {raw}: fewer than {least} crash points in {place:?}: {landed:?}"
            );
        }
    }
    println!("snapshot install crash sweep: {:?}", started.elapsed());
}
