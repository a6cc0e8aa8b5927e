//! The raw-device layout on a real block device: a loop device (direct I/O) over a sparse file in
//! the target directory, driven through both disk backends. Needs root and `losetup`; without them
//! the tests say why and skip, unless `XDEVICE_REQUIRE_LOOP=1` makes that a failure.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use xdevice::entry::{BlockOp, EntryBody, EntryPayload};
use xdevice::storage::disk::{self, Backend};
use xdevice::storage::engine::{Engine, EngineConfig, FormatOptions};
use xdevice::storage::layout::Location;
use xdevice::storage::state::LogId;
use xdevice::storage::wal::{CommitMode, NewEntry, WalConfig};
use xdevice::storage::StorageError;

const BLOCK: usize = 4096;
const BACKING_BYTES: u64 = 256 << 20;
const DEVICE_BYTES: u64 = 16 << 20;
const DEVICE_BLOCKS: u64 = DEVICE_BYTES / BLOCK as u64;
const SEGMENT_BYTES: u64 = 4 << 20;
const ENTRIES: u64 = 2000;
/// Entries `0..=PURGED` are committed, applied, checkpointed and purged before the close.
const PURGED: u64 = 1199;

/// Loop devices are a shared system resource: one test at a time attaches one.
static LOOP_LOCK: Mutex<()> = Mutex::new(());

/// A loop device over a sparse backing file; detached and removed on drop, whatever happens.
struct LoopDevice {
    device: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    fn attach(name: &str) -> Result<LoopDevice, String> {
        let dir = target_dir().join("loopdev-tmp");
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let backing = dir.join(format!("{name}-{}.img", std::process::id()));
        let file = File::create(&backing).map_err(|e| format!("{}: {e}", backing.display()))?;
        file.set_len(BACKING_BYTES).map_err(|e| format!("size {}: {e}", backing.display()))?;
        drop(file);
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(&backing)
            .output()
            .map_err(|e| format!("run losetup: {e}"));
        let out = match out {
            Ok(out) if out.status.success() => out,
            Ok(out) => {
                let _ = fs::remove_file(&backing);
                return Err(format!("losetup failed: {}", String::from_utf8_lossy(&out.stderr)));
            }
            Err(e) => {
                let _ = fs::remove_file(&backing);
                return Err(e);
            }
        };
        let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(LoopDevice { device, backing })
    }

    fn path(&self) -> &Path {
        &self.device
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.device).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("loopdev: could not detach {}: {other:?}", self.device.display()),
        }
        let _ = fs::remove_file(&self.backing);
    }
}

/// The target directory (`CARGO_TARGET_TMPDIR` is its `tmp` subdirectory), not /tmp, which may be
/// a tmpfs without direct I/O.
fn target_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().unwrap_or(tmp).to_path_buf()
}

/// Why loop devices cannot be used here, if they cannot.
fn unavailable() -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_string));
    if euid.as_deref() != Some("0") {
        return Some(format!("not running as root (effective uid {euid:?})"));
    }
    match Command::new("losetup").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("losetup --version failed: {:?}", out.status)),
        Err(e) => Some(format!("losetup not found: {e}")),
    }
}

/// Attaches a loop device, or explains why not: a skip, or a failure with XDEVICE_REQUIRE_LOOP=1.
fn loop_device(name: &str) -> Option<LoopDevice> {
    let required = std::env::var("XDEVICE_REQUIRE_LOOP").is_ok_and(|v| v == "1");
    let attached = match unavailable() {
        Some(why) => Err(why),
        None => LoopDevice::attach(name),
    };
    match attached {
        Ok(device) => Some(device),
        Err(why) if required => panic!("loopdev: XDEVICE_REQUIRE_LOOP=1 but {why}"),
        Err(why) => {
            eprintln!("loopdev: skipped {name}: {why}");
            None
        }
    }
}

fn format_options() -> FormatOptions {
    FormatOptions {
        device_name: "loop0".into(),
        device_bytes: Some(DEVICE_BYTES),
        block_bytes: BLOCK as u32,
        segment_bytes: SEGMENT_BYTES,
        wal_slots: 8,
        ..FormatOptions::default()
    }
}

fn thread_config() -> EngineConfig {
    EngineConfig {
        wal: WalConfig {
            max_record_bytes: 1 << 20,
            max_batch_bytes: 2 << 20,
            max_batch_records: 512,
            max_pending_bytes: 16 << 20,
            compress: true,
            mode: CommitMode::Thread,
        },
        fill_segments: false,
        node_id: None,
    }
}

fn location(device: &LoopDevice, backend: Backend) -> Location {
    let disk = disk::open_path(device.path(), backend)
        .unwrap_or_else(|e| panic!("open {} with {backend:?}: {e}", device.path().display()));
    Location::Raw { disk }
}

/// Entry `i`: mostly block writes of 1..=6 blocks (a third of them compressible), with blank,
/// membership and zero-fill entries mixed in.
fn payload(i: u64) -> EntryPayload {
    let body = match i % 10 {
        0 => EntryBody::Blank,
        5 => EntryBody::Membership(format!("members at {i}").into_bytes()),
        7 => EntryBody::Blocks(vec![BlockOp::Zero { lba: lba_of(i), blocks: 8 }]),
        _ => {
            let blocks = 1 + (i * 7 % 6) as usize;
            let data = common::pattern(lba_of(i), blocks, i);
            EntryBody::Blocks(vec![BlockOp::Write { lba: lba_of(i), data: data.into() }])
        }
    };
    EntryPayload { leader_node: 1 + i % 3, body }
}

fn lba_of(i: u64) -> u64 {
    i * 13 % (DEVICE_BLOCKS - 8)
}

fn entry(i: u64) -> NewEntry {
    NewEntry { index: i, term: 1 + i / 500, payload: payload(i).encode().into() }
}

/// The device after entries `0..=upto` are applied.
fn model_through(upto: u64) -> Vec<u8> {
    let mut model = vec![0u8; DEVICE_BYTES as usize];
    for i in 0..=upto {
        let EntryBody::Blocks(ops) = payload(i).body else { continue };
        for op in ops {
            match op {
                BlockOp::Write { lba, data } => {
                    let at = lba as usize * BLOCK;
                    model[at..at + data.len()].copy_from_slice(&data);
                }
                BlockOp::Zero { lba, .. } => {
                    let at = lba as usize * BLOCK;
                    model[at..at + 8 * BLOCK].fill(0);
                }
            }
        }
    }
    model
}

fn assert_device_equals(engine: &Engine, model: &[u8], why: &str) {
    let mut chunk = vec![0u8; 256 * BLOCK];
    for (n, want) in model.chunks(chunk.len()).enumerate() {
        let lba = (n * 256) as u64;
        engine.image().read_blocks(lba, &mut chunk).expect("read blocks");
        assert!(chunk == want, "{why}: blocks {lba}..{} differ", lba + 256);
    }
}

fn assert_entries(engine: &Engine, range: std::ops::Range<u64>, why: &str) {
    for i in range {
        let got = engine.wal().read(i).unwrap_or_else(|e| panic!("{why}: read {i}: {e}"));
        assert!(got == payload(i).encode(), "{why}: entry {i} differs");
        assert_eq!(engine.wal().term(i).expect("term"), 1 + i / 500, "{why}: term of {i}");
    }
}

fn commit(engine: &Engine, index: u64) {
    let id = LogId { term: 1 + index / 500, node: 1, index };
    engine.state().update(|s| s.committed = Some(id)).expect("commit");
}

/// Appends every entry in chunks of 1..=47 with some callbacks and a flush every ~400 entries;
/// returns how many callbacks reported Ok.
fn append_all(engine: &Engine) -> Arc<AtomicU64> {
    let acknowledged = Arc::new(AtomicU64::new(0));
    let mut next = 0;
    let mut chunk = 1;
    while next < ENTRIES {
        let end = (next + chunk).min(ENTRIES);
        let entries: Vec<NewEntry> = (next..end).map(entry).collect();
        if chunk % 3 == 0 {
            let ok = acknowledged.clone();
            let callback = Box::new(move |result: Result<(), StorageError>| {
                result.expect("append callback");
                ok.fetch_add(1, Ordering::SeqCst);
            });
            engine.wal().append_with(entries, callback).expect("append_with");
        } else {
            engine.wal().append(entries).expect("append");
        }
        if next / 400 != end / 400 {
            engine.wal().flush().expect("flush");
        }
        next = end;
        chunk = chunk % 47 + 1;
    }
    acknowledged
}

fn callbacks_expected() -> u64 {
    let (mut next, mut chunk, mut count) = (0, 1, 0);
    while next < ENTRIES {
        if chunk % 3 == 0 {
            count += 1;
        }
        next = (next + chunk).min(ENTRIES);
        chunk = chunk % 47 + 1;
    }
    count
}

fn round_trip(backend: Backend, reopen_with: Backend) {
    let _serial = LOOP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let Some(device) = loop_device(&format!("{backend:?}").to_lowercase()) else { return };
    let why = format!("{backend:?} then {reopen_with:?} on {}", device.path().display());

    let loc = location(&device, backend);
    let sb = Engine::format(&loc, &format_options()).expect("format");
    assert_eq!(
        (sb.device_bytes, sb.segment_bytes, sb.raw.wal_slots),
        (DEVICE_BYTES, SEGMENT_BYTES, 8)
    );
    let again = Engine::format(&loc, &format_options()).expect_err("reformat");
    assert!(matches!(again, StorageError::AlreadyFormatted(_)), "{why}: {again}");

    let (engine, _) = Engine::open(&loc, thread_config()).expect("open");
    let acknowledged = append_all(&engine);
    engine.wal().flush().expect("flush");
    let segments = engine.wal().segments().len();
    assert!(segments >= 4, "{why}: only {segments} segments for {ENTRIES} entries");
    assert_entries(&engine, 0..ENTRIES, &why);
    commit(&engine, PURGED);
    engine.apply_through(PURGED).expect("apply");
    engine.checkpoint_and_purge().expect("checkpoint and purge");
    assert_eq!(engine.wal().bounds().first, PURGED + 1, "{why}");
    assert!(engine.wal().segments().len() < segments, "{why}: purge freed no segment");
    engine.close().expect("close");
    assert_eq!(acknowledged.load(Ordering::SeqCst), callbacks_expected(), "{why}: callbacks");
    drop(engine);
    drop(loc);

    let loc = location(&device, reopen_with);
    let (engine, rec) = Engine::open(&loc, thread_config()).expect("reopen");
    assert!(rec.superblock_repaired.is_empty(), "{why}: {rec:?}");
    assert_eq!(rec.replayed_entries, 0, "{why}");
    let bounds = engine.wal().bounds();
    assert_eq!((bounds.first, bounds.next), (PURGED + 1, ENTRIES), "{why}");
    assert_eq!(engine.applied().log_id.map(|id| id.index), Some(PURGED), "{why}");
    assert_entries(&engine, PURGED + 1..ENTRIES, &why);
    assert_device_equals(&engine, &model_through(PURGED), &why);

    // Apply the rest, checkpoint, and check it once more after another reopen.
    commit(&engine, ENTRIES - 1);
    engine.apply_through(ENTRIES - 1).expect("apply rest");
    let model = model_through(ENTRIES - 1);
    assert_device_equals(&engine, &model, &why);
    engine.checkpoint().expect("checkpoint");
    engine.close().expect("close");
    drop(engine);
    let again = Engine::format(&loc, &format_options()).expect_err("reformat after use");
    assert!(matches!(again, StorageError::AlreadyFormatted(_)), "{why}: {again}");
    drop(loc);

    let loc = location(&device, backend);
    let (engine, rec) = Engine::open(&loc, thread_config()).expect("third open");
    assert_eq!(rec.replayed_entries, 0, "{why}");
    assert_eq!(engine.wal().bounds().next, ENTRIES, "{why}");
    assert_entries(&engine, PURGED + 1..ENTRIES, &why);
    assert_device_equals(&engine, &model, &why);
}

#[test]
fn raw_store_on_a_loop_device_with_uring() {
    round_trip(Backend::Uring, Backend::File);
}

#[test]
fn raw_store_on_a_loop_device_with_file() {
    round_trip(Backend::File, Backend::Uring);
}
