//! Damage to every on-disk structure, on the simulated disk: each flipped byte must end in a clear
//! error (naming the structure and where it lies) or in a correct fallback — never a panic and
//! never different data.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use common::*;
use xdevice::storage::disk::{Disk, SimDisk, SimVolume, Volume};
use xdevice::storage::engine::{Engine, FormatOptions, Recovery};
use xdevice::storage::image::ImageGeometry;
use xdevice::storage::layout::Location;
use xdevice::storage::record::{self, Decoded, RECORD_HEADER_BYTES};
use xdevice::storage::state::{HardState, LogId, Vote};
use xdevice::storage::superblock::{Superblock, FORMAT_VERSION};
use xdevice::storage::wal::NewEntry;
use xdevice::storage::StorageError;

const SB_BYTES: u64 = 4096;
const SLOT_BYTES: u64 = 4096;
const SEGMENT_HEADER: u64 = 4096;
const RAW_DISK_BYTES: u64 = 8 << 20;
const RAW_STATE_OFFSET: u64 = 64 * 1024;
const SEG_1: &str = "t0_log_0000000001";
const SEG_2: &str = "t0_log_0000000002";
const SEG_3: &str = "t0_log_0000000003";

/// A formatted store on the simulator, in either layout.
#[derive(Clone)]
enum Store {
    Dir(Arc<SimVolume>),
    Raw(Arc<SimDisk>, Superblock),
}

impl Store {
    fn dir() -> Store {
        Store::Dir(formatted_volume())
    }

    fn raw() -> Store {
        let disk = SimDisk::new("raw", RAW_DISK_BYTES);
        let sb = Engine::format(&raw_location(&disk), &small_format()).expect("format raw");
        Store::Raw(disk, sb)
    }

    fn location(&self) -> Location {
        match self {
            Store::Dir(volume) => dir_location(volume),
            Store::Raw(disk, _) => raw_location(disk),
        }
    }

    fn open(&self) -> Result<(Engine, Recovery), StorageError> {
        Engine::open(&self.location(), inline_config())
    }

    /// Only what is durable now, on fresh disks: damage applied to it leaves `self` alone.
    fn clean(&self) -> Store {
        match self {
            Store::Dir(volume) => Store::Dir(volume.clean_image()),
            Store::Raw(disk, sb) => Store::Raw(disk.clean_image(), sb.clone()),
        }
    }

    /// The disk holding `file` (directory layout) or the raw disk, and the byte offset where the
    /// structure starts on it.
    fn place(&self, file: &str, raw_offset: u64) -> (Arc<SimDisk>, u64) {
        match self {
            Store::Dir(volume) => (file_disk(volume, file), 0),
            Store::Raw(disk, _) => (disk.clone(), raw_offset),
        }
    }

    fn state_slots(&self) -> (Arc<SimDisk>, u64) {
        self.place("t0_state_raft", RAW_STATE_OFFSET)
    }

    fn image(&self) -> (Arc<SimDisk>, u64) {
        let raw_offset = match self {
            Store::Raw(_, sb) => sb.raw.image_offset,
            Store::Dir(_) => 0,
        };
        self.place("t0_state_image", raw_offset)
    }

    fn name(&self) -> &'static str {
        match self {
            Store::Dir(_) => "directory",
            Store::Raw(..) => "raw",
        }
    }
}

/// The volume's WAL segment files in the chain's format, without prepared spares.
fn segment_names(volume: &SimVolume) -> Vec<String> {
    wal_files(volume, false)
}

/// The volume's prepared spare segment files (header magic "XDEVSPR1").
fn spare_names(volume: &SimVolume) -> Vec<String> {
    wal_files(volume, true)
}

fn wal_files(volume: &SimVolume, spares: bool) -> Vec<String> {
    let mut names: Vec<String> = volume
        .names()
        .into_iter()
        .filter(|n| n.contains("_log_"))
        .filter(|n| (file_disk(volume, n).peek(0, 8).as_slice() == b"XDEVSPR1") == spares)
        .collect();
    names.sort();
    names
}

fn file_disk(volume: &SimVolume, name: &str) -> Arc<SimDisk> {
    volume.disk(name).unwrap_or_else(|| panic!("{name} is missing: {:?}", volume.names()))
}

fn err_of(result: Result<(Engine, Recovery), StorageError>, what: &str) -> StorageError {
    match result {
        Ok((engine, rec)) => {
            panic!("{what}: open succeeded (log {:?}, recovery {rec:?})", engine.wal().bounds())
        }
        Err(e) => e,
    }
}

fn assert_mentions(err: &StorageError, needles: &[&str]) {
    let text = err.to_string();
    for needle in needles {
        assert!(text.contains(needle), "error does not mention {needle:?}: {text}");
    }
}

/// Appends `batches`, each made durable by its own flush; returns every payload by index.
fn write_batches(engine: &Engine, batches: &[Vec<NewEntry>]) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    for batch in batches {
        payloads.extend(batch.iter().map(|e| e.payload.to_vec()));
        engine.wal().append(batch.clone()).expect("append");
        engine.wal().flush().expect("flush");
    }
    payloads
}

/// `count` one- or two-block entries from `first`, in batches of `per_batch`.
fn block_batches(first: u64, count: u64, per_batch: u64) -> Vec<Vec<NewEntry>> {
    let entries: Vec<NewEntry> = (first..first + count)
        .map(|i| block_entry(i, 1, i % 60, 1 + (i as usize % 2), i * 3 + 1))
        .collect();
    entries.chunks(per_batch as usize).map(<[NewEntry]>::to_vec).collect()
}

fn assert_log_equals(engine: &Engine, payloads: &[Vec<u8>], upto: u64) {
    for index in 0..upto {
        let got = engine.wal().read(index).unwrap_or_else(|e| panic!("read {index}: {e}"));
        assert!(got == payloads[index as usize], "entry {index} reads back different bytes");
    }
}

/// A store with `batches` written and durable, the engine closed.
fn store_with(store: &Store, batches: &[Vec<NewEntry>]) -> Vec<Vec<u8>> {
    let (engine, _) = store.open().expect("open");
    let payloads = write_batches(&engine, batches);
    engine.close().expect("close");
    payloads
}

/// A valid record found by scanning a segment from its header, as recovery would.
#[derive(Clone, Copy, Debug)]
struct RecordAt {
    offset: u64,
    index: u64,
    stored_len: u64,
}

/// The valid records of a clean segment, in order. Uses the segment's salt from its header.
fn records_in(disk: &SimDisk) -> Vec<RecordAt> {
    let header = disk.peek(0, 108);
    let salt = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    let seed = record::salt_seed(salt);
    let mut out = Vec::new();
    let mut pos = SEGMENT_HEADER;
    loop {
        let head = disk.peek(pos, RECORD_HEADER_BYTES);
        let stored = u32::from_le_bytes([head[36], head[37], head[38], head[39]]) as usize;
        let bytes = disk.peek(pos, RECORD_HEADER_BYTES + stored.min(1 << 20));
        let Decoded::Record(h) = record::decode(&bytes, seed, 1 << 20) else { break };
        out.push(RecordAt { offset: pos, index: h.index, stored_len: h.stored_len as u64 });
        let end = pos as usize + RECORD_HEADER_BYTES + h.stored_len as usize;
        pos = record::next_position(end, h.flags) as u64;
    }
    out
}

/// Flips one byte in the middle of a record's stored payload.
fn damage_payload(disk: &SimDisk, rec: &RecordAt) {
    disk.corrupt(rec.offset + RECORD_HEADER_BYTES as u64 + rec.stored_len / 2, &[0x5a]);
}

// ---------------------------------------------------------------------------------------------
// Superblock

/// A format version newer than this build's.
const NEWER: u32 = FORMAT_VERSION + 1;
/// Bytes of a slot's header before its payload (docs/disk-format.md, "Slot pair").
const SLOT_HEADER_BYTES: u64 = 40;

#[test]
fn superblock_one_damaged_copy_falls_back_and_is_rewritten() {
    for copy in 0..4u64 {
        for at in [20, 130, 3000, 4093] {
            let store = Store::dir();
            let payloads = store_with(&store, &block_batches(0, 6, 3));
            let store = store.clean();
            let (disk, _) = store.place("t0_meta_superblock", 0);
            disk.corrupt(copy * SB_BYTES + at, &[0x40]);
            let (engine, rec) = store.open().expect("one damaged copy must fall back");
            assert_eq!(rec.superblock_repaired.len(), 1, "copy {copy} at {at}: {rec:?}");
            assert!(
                rec.superblock_repaired[0].starts_with(&format!("copy {copy}: ")),
                "copy {copy} at {at}: {:?}",
                rec.superblock_repaired
            );
            assert_eq!(engine.superblock().device_name, "t0");
            assert_log_equals(&engine, &payloads, 6);
            drop(engine);
            let (engine, rec) = store.open().expect("reopen");
            assert!(rec.superblock_repaired.is_empty(), "copy {copy} was not rewritten: {rec:?}");
            assert_log_equals(&engine, &payloads, 6);
        }
    }
}

#[test]
fn superblock_all_copies_damaged_is_refused() {
    for store in [Store::dir(), Store::raw()] {
        let (disk, _) = store.place("t0_meta_superblock", 0);
        let len = disk.len_bytes();
        let offsets = match store {
            Store::Dir(_) => [0, SB_BYTES, 2 * SB_BYTES, 3 * SB_BYTES],
            Store::Raw(..) => [0, SB_BYTES, len - 2 * SB_BYTES, len - SB_BYTES],
        };
        for offset in offsets {
            disk.corrupt(offset + 40, &[0x01]);
        }
        let err = err_of(store.open(), store.name());
        assert!(matches!(err, StorageError::Foreign(_)), "{}: {err}", store.name());
        assert_mentions(&err, &["superblock", "copy 0", "copy 3", "checksum mismatch"]);
        if let Store::Dir(_) = store {
            assert_mentions(&err, &["t0_meta_superblock"]);
        }
    }
}

/// Re-encodes the superblock copy at `offset` of `disk` with another format version (and seq),
/// sealed with a valid checksum, as a newer build would write it.
fn rewrite_copy(disk: &SimDisk, offset: u64, version: u32, seq: u64) {
    let old = disk.peek(offset, SB_BYTES as usize);
    let mut new = old.clone();
    new[8..12].copy_from_slice(&version.to_le_bytes());
    new[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&new[..4092]);
    new[4092..].copy_from_slice(&crc.to_le_bytes());
    let mask: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
    disk.corrupt(offset, &mask);
}

#[test]
fn superblock_of_a_newer_format_is_refused_with_version() {
    let store = Store::dir();
    let (disk, _) = store.place("t0_meta_superblock", 0);
    for copy in 0..4 {
        rewrite_copy(&disk, copy * SB_BYTES, NEWER, 1);
    }
    let err = err_of(store.open(), "newer format");
    assert!(
        matches!(err, StorageError::Version { found: NEWER, supported: FORMAT_VERSION, .. }),
        "expected a version error: {err}"
    );
    let named = format!("unsupported format version {NEWER}");
    assert_mentions(&err, &[named.as_str(), "t0_meta_superblock"]);
}

/// A newer build that upgraded the store wrote its first copy (with a higher seq) before a crash:
/// this build must not take the older copies and silently overwrite the newer one.
#[test]
fn one_superblock_copy_of_a_newer_format_is_refused_not_downgraded() {
    let store = Store::dir();
    let (disk, _) = store.place("t0_meta_superblock", 0);
    rewrite_copy(&disk, 0, NEWER, 2);
    let result = store.open();
    let still_newer = disk.peek(8, 4) == NEWER.to_le_bytes();
    match result {
        Err(StorageError::Version { found: NEWER, supported: FORMAT_VERSION, .. }) => {}
        Err(other) => panic!("expected a version error, got: {other}"),
        Ok((_, rec)) => panic!(
            "open accepted a store a newer format version wrote (copy 0 overwritten with the \
             older version: {}): {:?}",
            !still_newer, rec.superblock_repaired
        ),
    }
    assert!(still_newer, "the newer copy was overwritten");
}

#[test]
fn random_bytes_are_a_foreign_store() {
    let mut noise = vec![0u8; 4 * SB_BYTES as usize];
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for byte in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    let volume = SimVolume::new("foreign");
    let file = volume.create("t0_meta_superblock", 4 * SB_BYTES, false).expect("create");
    drop(file);
    file_disk(&volume, "t0_meta_superblock").corrupt(0, &noise);
    let err = Engine::open(&dir_location(&volume), inline_config()).expect_err("random file");
    assert!(matches!(err, StorageError::Foreign(_)), "{err}");
    assert_mentions(&err, &["t0_meta_superblock", "bad magic"]);

    let disk = SimDisk::new("noise", RAW_DISK_BYTES);
    disk.corrupt(0, &noise);
    disk.corrupt(RAW_DISK_BYTES - noise.len() as u64, &noise);
    let err = Engine::open(&raw_location(&disk), inline_config()).expect_err("random device");
    assert!(matches!(err, StorageError::Foreign(_)), "{err}");
    assert_mentions(&err, &["sim:noise", "bad magic"]);

    let blank = SimDisk::new("blank", RAW_DISK_BYTES);
    let err = Engine::open(&raw_location(&blank), inline_config()).expect_err("blank device");
    assert!(matches!(err, StorageError::Foreign(_)), "{err}");
    assert_mentions(&err, &["not formatted"]);
}

#[test]
fn raw_superblock_copies_at_both_ends_fall_back() {
    for pair in [[0usize, 3], [1, 2], [0, 2], [1, 3]] {
        let store = Store::raw();
        let payloads = store_with(&store, &block_batches(0, 9, 4));
        let store = store.clean();
        let Store::Raw(disk, _) = &store else { unreachable!() };
        let offsets = [0, SB_BYTES, RAW_DISK_BYTES - 2 * SB_BYTES, RAW_DISK_BYTES - SB_BYTES];
        for copy in pair {
            disk.corrupt(offsets[copy] + 64, &[0x80]);
        }
        let (engine, rec) = store.open().expect("two damaged raw copies must fall back");
        let repaired: Vec<&str> =
            rec.superblock_repaired.iter().map(|r| &r[..r.find(':').unwrap_or(0)]).collect();
        let want: Vec<String> = pair.iter().map(|c| format!("copy {c}")).collect();
        assert_eq!(repaired, want, "{:?}", rec.superblock_repaired);
        assert_log_equals(&engine, &payloads, 9);
        drop(engine);
        let (engine, rec) = store.open().expect("reopen");
        assert!(rec.superblock_repaired.is_empty(), "not rewritten: {rec:?}");
        assert_log_equals(&engine, &payloads, 9);
    }
}

// ---------------------------------------------------------------------------------------------
// Hard-state slots

fn hard_state(n: u64) -> HardState {
    HardState {
        vote: Some(Vote { term: n, node: n % 3, committed: n % 2 == 0 }),
        committed: Some(LogId { term: 1, node: 1, index: n }),
        membership: format!("members after update {n}").into_bytes(),
    }
}

/// A store whose hard state was saved three times (seq 1..=3; seq 3 sits in slot 1).
fn store_with_states(store: &Store) -> Vec<Vec<u8>> {
    let (engine, _) = store.open().expect("open");
    let payloads = write_batches(&engine, &block_batches(0, 8, 8));
    for n in 1..=3 {
        engine.state().update(|s| *s = hard_state(n)).expect("save hard state");
    }
    engine.close().expect("close");
    payloads
}

#[test]
fn hard_state_newest_slot_damaged_falls_back_to_the_older() {
    for store in [Store::dir(), Store::raw()] {
        let payloads = store_with_states(&store);
        for at in [3, 9, 21, 30, 60] {
            let damaged = store.clean();
            let (disk, base) = damaged.state_slots();
            disk.corrupt(base + SLOT_BYTES + at, &[0x10]);
            let (engine, rec) = damaged.open().expect("the older slot must be used");
            assert_eq!(engine.state().get(), hard_state(2), "{} byte {at}", store.name());
            let report = rec.state_slot_damaged.unwrap_or_default();
            assert!(
                report.contains(&format!("offset {}", base + SLOT_BYTES)),
                "{} byte {at}: damage not reported: {report:?}",
                store.name()
            );
            assert_log_equals(&engine, &payloads, 8);
            // The next save lands in the damaged slot and repairs it.
            engine.state().update(|s| *s = hard_state(4)).expect("save");
            drop(engine);
            let (engine, rec) = damaged.open().expect("reopen");
            assert_eq!(rec.state_slot_damaged, None);
            assert_eq!(engine.state().get(), hard_state(4));
        }
    }
}

#[test]
fn hard_state_both_slots_damaged_is_refused() {
    for store in [Store::dir(), Store::raw()] {
        store_with_states(&store);
        let (disk, base) = store.state_slots();
        disk.corrupt(base + 30, &[0x01]);
        disk.corrupt(base + SLOT_BYTES + 30, &[0x01]);
        let err = err_of(store.open(), store.name());
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert_mentions(&err, &["raft hard state", "checksum mismatch"]);
        assert_mentions(&err, &[&format!("offset {base}"), &format!("offset {}", base + 4096)]);
    }
}

#[test]
fn hard_state_only_slot_damaged_is_refused_not_reset() {
    let store = Store::dir();
    let (engine, _) = store.open().expect("open");
    engine.state().update(|s| *s = hard_state(7)).expect("save");
    drop(engine);
    // seq 1 is in slot 1; slot 0 was never written.
    let (disk, base) = store.state_slots();
    disk.corrupt(base + SLOT_BYTES + 25, &[0x02]);
    let err = err_of(store.open(), "only slot damaged");
    assert_mentions(&err, &["raft hard state"]);
}

// ---------------------------------------------------------------------------------------------
// Image header slots

fn lba_of(i: u64) -> u64 {
    i % 60
}

/// Applies entries `0..=upto` to a model of the device.
fn model_through(upto: u64) -> Vec<u8> {
    let mut model = vec![0u8; 64 * BLOCK];
    for i in 0..=upto {
        let blocks = 1 + (i as usize % 2);
        let at = lba_of(i) as usize * BLOCK;
        model[at..at + blocks * BLOCK].copy_from_slice(&pattern(lba_of(i), blocks, i * 3 + 1));
    }
    model
}

fn read_device(engine: &Engine) -> Vec<u8> {
    let mut image = vec![0u8; 64 * BLOCK];
    engine.image().read_blocks(0, &mut image).expect("read device");
    image
}

fn commit(engine: &Engine, index: u64) {
    engine
        .state()
        .update(|s| s.committed = Some(LogId { term: 1, node: 1, index }))
        .expect("commit");
}

/// A store with 40 entries committed; checkpoints at 9 (header seq 2, slot 0) and at 29 (seq 3,
/// slot 1); the log not purged.
fn store_with_checkpoints(store: &Store) {
    let (engine, _) = store.open().expect("open");
    write_batches(&engine, &block_batches(0, 40, 10));
    commit(&engine, 39);
    engine.apply_through(9).expect("apply");
    engine.checkpoint().expect("checkpoint 9");
    engine.apply_through(29).expect("apply");
    engine.checkpoint().expect("checkpoint 29");
    engine.close().expect("close");
}

#[test]
fn image_header_newest_slot_damaged_falls_back_and_replays() {
    for store in [Store::dir(), Store::raw()] {
        store_with_checkpoints(&store);
        for at in [0, 12, 22, 40] {
            let damaged = store.clean();
            let (disk, base) = damaged.image();
            disk.corrupt(base + SLOT_BYTES + at, &[0x08]);
            let (engine, rec) = damaged.open().expect("the older image header must be used");
            let report = rec.image_slot_damaged.clone().unwrap_or_default();
            assert!(report.contains("offset 4096"), "{} byte {at}: {rec:?}", store.name());
            // Recovery starts from the older checkpoint (9) and replays 10..=39.
            assert_eq!(rec.replayed_entries, 30, "{} byte {at}", store.name());
            assert_eq!(engine.applied().log_id.map(|id| id.index), Some(39));
            assert!(read_device(&engine) == model_through(39), "{}: image differs", store.name());
        }
    }
}

#[test]
fn image_header_both_slots_damaged_is_refused() {
    for store in [Store::dir(), Store::raw()] {
        store_with_checkpoints(&store);
        let (disk, base) = store.image();
        disk.corrupt(base + 20, &[0x01]);
        disk.corrupt(base + SLOT_BYTES + 20, &[0x01]);
        let err = err_of(store.open(), store.name());
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert_mentions(&err, &["image header", "checksum mismatch", "offset 0", "offset 4096"]);
    }
}

// ---------------------------------------------------------------------------------------------
// Checksum table and data blocks

#[test]
fn checksum_table_sector_damage_is_refused_with_its_offset() {
    // 1024 blocks: 9 table sectors from byte 8192 of the image.
    let big = FormatOptions { device_bytes: Some(1024 * BLOCK as u64), ..small_format() };
    for (sector, at) in [(0u64, 3u64), (0, 511), (5, 100), (8, 0)] {
        let volume = SimVolume::new("vol");
        Engine::format(&dir_location(&volume), &big).expect("format");
        let offset = 8192 + sector * 512;
        file_disk(&volume, "t0_state_image").corrupt(offset + at, &[0x20]);
        let err = err_of(Store::Dir(volume).open(), "table sector");
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert_mentions(
            &err,
            &["checksum table sector", "t0_state_image", &format!("offset {offset}")],
        );
    }
    let store = Store::raw();
    let (disk, base) = store.image();
    disk.corrupt(base + 8192 + 17, &[0x01]);
    let err = err_of(store.open(), "raw table sector");
    assert_mentions(&err, &["checksum table sector", "image region", "offset 8192"]);
}

#[test]
fn damaged_data_block_fails_its_read_and_others_still_read() {
    for store in [Store::dir(), Store::raw()] {
        let (engine, _) = store.open().expect("open");
        write_batches(&engine, &block_batches(0, 40, 20));
        commit(&engine, 39);
        engine.apply_through(39).expect("apply");
        engine.checkpoint().expect("checkpoint");
        drop(engine);
        let model = model_through(39);
        let geometry = ImageGeometry::new(64 * BLOCK as u64, BLOCK as u32);
        let bad_lba = 7u64;
        let (disk, base) = store.image();
        disk.corrupt(base + geometry.data_offset + bad_lba * BLOCK as u64 + 1234, &[0x04]);
        let (engine, _) = store.open().expect("a damaged block does not stop open");
        let mut block = vec![0u8; BLOCK];
        let err = engine.image().read_blocks(bad_lba, &mut block).expect_err("damaged block");
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        let offset = geometry.data_offset + bad_lba * BLOCK as u64;
        assert_mentions(&err, &["data block", "lba 7", &format!("offset {offset}")]);
        let mut span = vec![0u8; 10 * BLOCK];
        let err = engine.image().read_blocks(2, &mut span).expect_err("span over the block");
        assert_mentions(&err, &["data block", "lba 7"]);
        for lba in (0..64u64).filter(|&l| l != bad_lba) {
            engine.image().read_blocks(lba, &mut block).expect("intact block");
            let at = lba as usize * BLOCK;
            assert!(block == model[at..at + BLOCK], "{}: lba {lba} differs", store.name());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WAL records

#[test]
fn damaged_record_in_a_sealed_segment_is_refused() {
    let store = Store::dir();
    let payloads = store_with(&store, &block_batches(0, 120, 8));
    let Store::Dir(volume) = &store else { unreachable!() };
    assert!(volume.disk(SEG_3).is_some(), "expected three segments: {:?}", volume.names());
    for (segment, nth) in [(SEG_1, 0), (SEG_1, 5), (SEG_2, 9)] {
        let damaged = store.clean();
        let Store::Dir(v) = &damaged else { unreachable!() };
        let disk = file_disk(v, segment);
        let rec = records_in(&disk)[nth];
        damage_payload(&disk, &rec);
        let err = err_of(damaged.open(), segment);
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert_mentions(
            &err,
            &[segment, &format!("offset {}", rec.offset), "acknowledged data is damaged"],
        );
    }
    // The undamaged store is fine.
    let (engine, _) = store.open().expect("open intact");
    assert_log_equals(&engine, &payloads, 120);
}

#[test]
fn damaged_record_before_a_later_intact_batch_is_refused() {
    let store = Store::dir();
    store_with(&store, &block_batches(0, 12, 3));
    let Store::Dir(volume) = &store else { unreachable!() };
    let records = records_in(&file_disk(volume, SEG_1));
    assert_eq!(records.len(), 12);
    assert_eq!(segment_names(volume), [SEG_1]);
    // Every record of every batch but the last.
    for rec in &records[..9] {
        let damaged = store.clean();
        let Store::Dir(v) = &damaged else { unreachable!() };
        damage_payload(&file_disk(v, SEG_1), rec);
        let err = err_of(damaged.open(), &format!("record {}", rec.index));
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert_mentions(
            &err,
            &[
                SEG_1,
                &format!("offset {}", rec.offset),
                "later intact batch",
                "acknowledged data is damaged",
            ],
        );
    }
}

#[test]
fn torn_last_batch_is_cut_and_the_log_continues() {
    // The last batch holds one record; then a multi-record last batch damaged in its middle.
    for (batches, damaged_nth, next_after) in
        [(block_batches(0, 13, 4), 12usize, 12u64), (block_batches(0, 12, 4), 9, 9)]
    {
        let store = Store::dir();
        let payloads = store_with(&store, &batches);
        let damaged = store.clean();
        let Store::Dir(v) = &damaged else { unreachable!() };
        let disk = file_disk(v, SEG_1);
        let rec = records_in(&disk)[damaged_nth];
        damage_payload(&disk, &rec);
        let (engine, recovery) = damaged.open().expect("a torn tail is cut, not refused");
        assert_eq!(engine.wal().bounds().next, next_after);
        assert_eq!(recovery.wal.tail.segment, SEG_1);
        assert_eq!(recovery.wal.tail.offset, rec.offset);
        assert!(recovery.wal.tail.reason.contains("checksum"), "{:?}", recovery.wal.tail);
        assert_log_equals(&engine, &payloads, next_after);
        assert!(engine.wal().read(next_after).is_err(), "the cut entry is still readable");

        // New appends go on from the cut and survive a reopen.
        let more: Vec<NewEntry> =
            (next_after..next_after + 6).map(|i| block_entry(i, 2, i, 1, 1000 + i)).collect();
        let mut expected = payloads[..next_after as usize].to_vec();
        expected.extend(more.iter().map(|e| e.payload.to_vec()));
        engine.wal().append(more[..3].to_vec()).expect("append");
        engine.wal().flush().expect("flush");
        engine.wal().append(more[3..].to_vec()).expect("append");
        engine.wal().flush().expect("flush");
        drop(engine);
        let (engine, recovery) = damaged.clean().open().expect("reopen after the cut");
        assert!(recovery.wal.discarded.is_empty(), "{recovery:?}");
        assert_eq!(engine.wal().bounds().next, next_after + 6);
        assert_eq!(engine.wal().term(next_after + 5).expect("term"), 2);
        assert_log_equals(&engine, &expected, next_after + 6);
    }
}

/// `max_record_bytes` is run-time configuration, not part of the format: reopening with a smaller
/// limit must not make an acknowledged record look like a torn tail and cut it off.
#[test]
fn record_longer_than_a_reduced_limit_is_not_cut_as_a_torn_tail() {
    let store = Store::dir();
    let mut batches = block_batches(0, 4, 4);
    batches.push(raw_batches(4, &[&[40 * 1024]]).remove(0));
    let payloads = store_with(&store, &batches);
    let mut cfg = inline_config();
    cfg.wal.max_record_bytes = 16 * 1024;
    match Engine::open(&store.location(), cfg) {
        Err(err) => assert_mentions(&err, &[SEG_1]),
        Ok((engine, rec)) => {
            let next = engine.wal().bounds().next;
            assert!(
                next == 5,
                "open with max_record_bytes 16 KiB cut the acknowledged 40 KiB entry 4 as a torn \
                 tail (log ends at {next}, tail {:?})",
                rec.wal.tail
            );
            assert_log_equals(&engine, &payloads, 5);
        }
    }
}

#[test]
fn record_damaged_after_open_fails_its_read_and_apply() {
    let store = Store::dir();
    let (engine, _) = store.open().expect("open");
    let payloads = write_batches(&engine, &block_batches(0, 12, 4));
    let Store::Dir(v) = &store else { unreachable!() };
    let disk = file_disk(v, SEG_1);
    let rec = records_in(&disk)[6];
    damage_payload(&disk, &rec);
    let err = engine.wal().read(6).expect_err("damaged record read");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    assert_mentions(&err, &["WAL record", SEG_1, &format!("offset {}", rec.offset), "checksum"]);
    assert_log_equals(&engine, &payloads, 6);
    for index in 7..12 {
        assert!(engine.wal().read(index).expect("read") == payloads[index as usize]);
    }
    commit(&engine, 11);
    let err = engine.apply_through(11).expect_err("apply over a damaged record");
    assert_mentions(&err, &["WAL record", SEG_1]);
    assert_eq!(engine.applied().log_id.map(|id| id.index), Some(5));
}

/// Falling back to an older image header whose entries the log has purged since must fail: the
/// image cannot be brought to the committed state.
#[test]
fn image_header_fallback_past_a_purge_is_refused() {
    let store = Store::dir();
    let (engine, _) = store.open().expect("open");
    write_batches(&engine, &block_batches(0, 120, 10));
    commit(&engine, 119);
    engine.apply_through(9).expect("apply");
    engine.checkpoint().expect("checkpoint 9");
    engine.apply_through(99).expect("apply");
    engine.checkpoint_and_purge().expect("checkpoint and purge 99");
    assert_eq!(engine.wal().bounds().first, 100);
    drop(engine);
    let (disk, _) = store.image();
    disk.corrupt(SLOT_BYTES + 30, &[0x01]);
    let err = err_of(store.open(), "fallback past purge");
    assert_mentions(&err, &["missing"]);
}

// ---------------------------------------------------------------------------------------------
// Segment headers

#[test]
fn damaged_header_of_a_middle_segment_is_refused() {
    let store = Store::dir();
    store_with(&store, &block_batches(0, 120, 8));
    for at in [0, 13, 40, 50, 105] {
        let damaged = store.clean();
        let Store::Dir(v) = &damaged else { unreachable!() };
        file_disk(v, SEG_2).corrupt(at, &[0x01]);
        let err = err_of(damaged.open(), &format!("middle header byte {at}"));
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert_mentions(&err, &["WAL segment header", SEG_2]);
        assert!(v.disk(SEG_2).is_some() && v.disk(SEG_3).is_some(), "open removed a segment");
    }

    let store = Store::raw();
    store_with(&store, &block_batches(0, 120, 8));
    let Store::Raw(disk, sb) = &store else { unreachable!() };
    // Segment seq 2 sits in slot 1.
    disk.corrupt(sb.raw.wal_offset + sb.segment_bytes + 33, &[0x01]);
    let err = err_of(store.open(), "raw middle header");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    assert_mentions(&err, &["WAL segment header", "WAL slot 1", "checksum mismatch"]);
}

/// A segment file newer than every valid one, with no records and a blank or invalid header, is
/// what a rotation interrupted before its header became durable leaves: it is removed.
#[test]
fn newest_segment_without_a_valid_header_or_records_is_an_interrupted_creation() {
    let store = Store::dir();
    let payloads = store_with(&store, &block_batches(0, 10, 5));
    let noise: Vec<u8> = (0..108u32).map(|i| (i * 37 + 11) as u8).collect();
    for header in [None, Some(&noise)] {
        let damaged = store.clean();
        let Store::Dir(v) = &damaged else { unreachable!() };
        // The spare prepared for seq 2 is what an interrupted creation now interrupts.
        assert_eq!(spare_names(v), [SEG_2]);
        v.remove(SEG_2).expect("remove the spare");
        drop(v.create(SEG_2, 256 * 1024, false).expect("create"));
        if let Some(bytes) = header {
            file_disk(v, SEG_2).corrupt(0, bytes);
        }
        v.sync().expect("sync");
        let (engine, rec) = damaged.open().expect("an interrupted creation is removed");
        assert!(rec.wal.discarded.iter().any(|d| d.contains(SEG_2)), "{rec:?}");
        assert_eq!(engine.wal().bounds().next, 10);
        assert_log_equals(&engine, &payloads, 10);
        // The log goes on in a new segment 2.
        engine.wal().append(block_batches(10, 2, 2).remove(0)).expect("append");
        engine.wal().flush().expect("flush");
        drop(engine);
        let (engine, _) = damaged.clean().open().expect("reopen");
        assert_eq!(engine.wal().bounds().next, 12);
        assert_log_equals(&engine, &payloads, 10);
    }
}

/// Records are only ever written to a segment after its header is durable, so a newest segment
/// whose header fails validation but which holds records is damage, not an interrupted creation:
/// open must refuse it (keeping the file), or keep every acknowledged entry.
fn newest_segment_header_damage_loses_nothing(count: u64, segment: &str) {
    let store = Store::dir();
    let payloads = store_with(&store, &block_batches(0, count, 8));
    let Store::Dir(v) = &store else { unreachable!() };
    assert!(v.disk(segment).is_some_and(|d| !records_in(&d).is_empty()));
    let newest = segment_names(v).into_iter().max();
    assert_eq!(newest.as_deref(), Some(segment));
    file_disk(v, segment).corrupt(60, &[0x01]);
    match store.open() {
        Err(err) => {
            assert!(v.disk(segment).is_some(), "open deleted {segment}, then failed: {err}");
            assert_mentions(&err, &[segment]);
        }
        Ok((engine, rec)) => {
            let next = engine.wal().bounds().next;
            assert!(
                next == count,
                "{segment}: open succeeded with the log ending at {next} instead of {count}: \
                 acknowledged entries {next}..{count} are lost silently (discarded: {:?})",
                rec.wal.discarded
            );
            assert_log_equals(&engine, &payloads, count);
        }
    }
}

#[test]
fn damaged_header_of_a_newest_segment_after_others_is_refused() {
    newest_segment_header_damage_loses_nothing(120, SEG_3);
}

#[test]
fn damaged_header_of_the_only_segment_is_refused_without_deleting_it() {
    newest_segment_header_damage_loses_nothing(10, SEG_1);
}

// ---------------------------------------------------------------------------------------------
// Exhaustive flips

/// A payload of `len` bytes for entry `index`: compressible when `index % 3 == 0`.
fn raw_payload(index: u64, len: usize) -> Vec<u8> {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if index % 3 == 0 && i % 32 > 3 {
                0
            } else {
                x as u8
            }
        })
        .collect()
}

fn raw_batches(first: u64, sizes: &[&[usize]]) -> Vec<Vec<NewEntry>> {
    let mut index = first;
    sizes
        .iter()
        .map(|batch| {
            batch
                .iter()
                .map(|&len| {
                    let e = NewEntry {
                        index,
                        term: 1 + index / 4,
                        payload: raw_payload(index, len).into(),
                    };
                    index += 1;
                    e
                })
                .collect()
        })
        .collect()
}

/// What opening a store with one flipped byte gave: refused, or the log's bounds.
type FlipOutcome = Option<(u64, u64)>;

/// Opens `store` with the byte at `offset` of `segment` flipped by `mask` (on a fresh copy) and
/// checks every entry it then holds against `payloads`.
fn open_flipped(
    store: &Store,
    segment: &str,
    offset: u64,
    mask: u8,
    payloads: &[Vec<u8>],
) -> FlipOutcome {
    let damaged = store.clean();
    let Store::Dir(v) = &damaged else { unreachable!() };
    file_disk(v, segment).corrupt(offset, &[mask]);
    let outcome = catch_unwind(AssertUnwindSafe(|| match damaged.open() {
        Err(_) => None,
        Ok((engine, _)) => {
            let bounds = engine.wal().bounds();
            for index in 0..bounds.next {
                let got = engine.wal().read(index).map_err(|e| e.to_string());
                assert!(
                    got.as_ref().is_ok_and(|g| *g == payloads[index as usize]),
                    "flip {mask:#04x} at {offset}: entry {index} reads {:?}",
                    got.map(|g| g.len())
                );
            }
            Some((bounds.first, bounds.next))
        }
    }));
    outcome.unwrap_or_else(|_| panic!("{segment}: flip {mask:#04x} at offset {offset} panicked"))
}

/// Flips every byte of the last segment's written records (and the sector after them) in turn,
/// on a fresh copy each time: open must fail, or succeed with every entry it holds intact and
/// nothing lost but (part of) the last batch. Spread over threads: each open is independent.
fn flip_every_byte(store: &Store, segment: &str, payloads: &[Vec<u8>], last_batch_first: u64) {
    let Store::Dir(volume) = store else { unreachable!() };
    let records = records_in(&file_disk(volume, segment));
    let last = records.last().expect("records");
    let end = (last.offset + RECORD_HEADER_BYTES as u64 + last.stored_len).next_multiple_of(512);
    let offsets: Vec<u64> = (SEGMENT_HEADER..end + 512).collect();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(8);
    let outcomes: Vec<(u64, FlipOutcome)> = std::thread::scope(|scope| {
        let workers: Vec<_> = offsets
            .chunks(offsets.len().div_ceil(threads))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&offset| {
                            let mask = if offset % 2 == 0 { 0xff } else { 1 << (offset % 8) };
                            (offset, open_flipped(store, segment, offset, mask, payloads))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("flip worker panicked")).collect()
    });
    let total = payloads.len() as u64;
    let (mut refused, mut cut) = (0, 0);
    for (offset, outcome) in outcomes {
        let Some((first, next)) = outcome else {
            refused += 1;
            continue;
        };
        assert_eq!(first, 0, "flip at {offset}");
        assert!(
            (last_batch_first..=total).contains(&next),
            "flip at {offset}: log ends at {next} (acknowledged batches before {last_batch_first} lost)"
        );
        if next < total {
            cut += 1;
        }
    }
    assert!(refused > 0 && cut > 0, "flips refused {refused}, cut {cut}");
}

#[test]
fn every_single_byte_flip_in_the_last_segment_is_refused_or_harmless() {
    let sizes: &[&[usize]] = &[&[5, 300, 40], &[120, 0, 70], &[64, 9, 33]];
    let store = Store::dir();
    let payloads = store_with(&store, &raw_batches(0, sizes));
    flip_every_byte(&store, SEG_1, &payloads, 6);

    // The same after a reopen: segment 1 sealed, the flips land in segment 2.
    let (engine, _) = store.open().expect("reopen");
    let mut all = payloads.clone();
    all.extend(write_batches(&engine, &raw_batches(9, &[&[400, 8, 90], &[17, 17, 17]])));
    drop(engine);
    flip_every_byte(&store, SEG_2, &all, 12);
}

/// Every byte of both hard-state slots: the newest valid slot wins, damage is reported.
#[test]
fn every_byte_flip_in_the_hard_state_slots_falls_back_or_is_harmless() {
    let store = Store::dir();
    store_with_states(&store);
    let used = SLOT_HEADER_BYTES + hard_state(3).encode().len() as u64;
    for slot in 0..2u64 {
        for at in 0..used + 16 {
            let damaged = store.clean();
            let (disk, base) = damaged.state_slots();
            disk.corrupt(base + slot * SLOT_BYTES + at, &[0x81]);
            let outcome = catch_unwind(AssertUnwindSafe(|| damaged.open()));
            let (engine, rec) = match outcome {
                Err(_) => panic!("slot {slot} byte {at}: open panicked"),
                Ok(Err(e)) => panic!("slot {slot} byte {at}: one valid slot remains, yet: {e}"),
                Ok(Ok(opened)) => opened,
            };
            let state = engine.state().get();
            match (at < used, slot) {
                (false, _) => {
                    assert_eq!(state, hard_state(3), "padding byte {at}");
                    assert_eq!(rec.state_slot_damaged, None, "padding byte {at}");
                }
                (true, 1) => assert_eq!(state, hard_state(2), "newest slot byte {at}"),
                (true, _) => assert_eq!(state, hard_state(3), "older slot byte {at}"),
            }
            if at < used {
                assert!(rec.state_slot_damaged.is_some(), "slot {slot} byte {at} not reported");
            }
        }
    }
}

/// Every byte of both image header slots: the newest valid header wins and replay makes up the
/// difference, so the device reads the same either way.
#[test]
fn every_byte_flip_in_the_image_header_slots_falls_back_or_is_harmless() {
    let store = Store::dir();
    store_with_checkpoints(&store);
    let model = model_through(39);
    // Slot header, then the 56-byte applied-state payload (docs/disk-format.md).
    let used = SLOT_HEADER_BYTES + 56;
    for slot in 0..2u64 {
        for at in 0..used + 8 {
            let damaged = store.clean();
            let (disk, base) = damaged.image();
            disk.corrupt(base + slot * SLOT_BYTES + at, &[0x18]);
            let outcome = catch_unwind(AssertUnwindSafe(|| damaged.open()));
            let (engine, rec) = match outcome {
                Err(_) => panic!("slot {slot} byte {at}: open panicked"),
                Ok(Err(e)) => panic!("slot {slot} byte {at}: one valid slot remains, yet: {e}"),
                Ok(Ok(opened)) => opened,
            };
            let replayed = if at < used && slot == 1 { 30 } else { 10 };
            assert_eq!(rec.replayed_entries, replayed, "slot {slot} byte {at}");
            assert_eq!(rec.image_slot_damaged.is_some(), at < used, "slot {slot} byte {at}");
            assert!(read_device(&engine) == model, "slot {slot} byte {at}: device differs");
        }
    }
}

/// Every byte of a middle segment's header: refused, naming the segment (bytes past the checksummed
/// part are unused).
#[test]
fn every_byte_flip_in_a_middle_segment_header_is_refused() {
    let store = Store::dir();
    let payloads = store_with(&store, &block_batches(0, 120, 8));
    for at in 0..112u64 {
        let damaged = store.clean();
        let Store::Dir(v) = &damaged else { unreachable!() };
        file_disk(v, SEG_2).corrupt(at, &[0x42]);
        let outcome = catch_unwind(AssertUnwindSafe(|| damaged.open()));
        match outcome {
            Err(_) => panic!("header byte {at}: open panicked"),
            Ok(Err(e)) => {
                assert!(at < 108, "unused header byte {at} refused: {e}");
                assert_mentions(&e, &[SEG_2]);
            }
            Ok(Ok((engine, _))) => {
                assert!(at >= 108, "header byte {at}: damage accepted");
                assert_log_equals(&engine, &payloads, 120);
            }
        }
    }
}

/// Every byte of one superblock copy's fields and checksum, and a sample of its zero padding: the
/// other copies are used and the damaged one rewritten.
#[test]
fn every_byte_flip_in_a_superblock_copy_is_repaired() {
    let store = Store::dir();
    for at in (0..SB_BYTES).filter(|&at| !(160..4092).contains(&at) || at % 61 == 0) {
        let damaged = store.clean();
        let (disk, _) = damaged.place("t0_meta_superblock", 0);
        disk.corrupt(2 * SB_BYTES + at, &[0x04]);
        let outcome = catch_unwind(AssertUnwindSafe(|| damaged.open()));
        let rec = match outcome {
            Err(_) => panic!("byte {at}: open panicked"),
            Ok(Err(e)) => panic!("byte {at}: {e}"),
            Ok(Ok((_, rec))) => rec,
        };
        assert_eq!(rec.superblock_repaired.len(), 1, "byte {at}");
        assert!(rec.superblock_repaired[0].starts_with("copy 2: "), "byte {at}");
    }
}

// ---------------------------------------------------------------------------------------------
// Entry payloads

#[test]
fn garbage_entry_payload_fails_apply_naming_its_index() {
    let store = Store::dir();
    let (engine, _) = store.open().expect("open");
    let mut entries: Vec<NewEntry> = (0..6).map(|i| block_entry(i, 1, i, 1, i * 3 + 1)).collect();
    entries[3].payload = b"not an entry payload".to_vec().into();
    engine.wal().append(entries).expect("append");
    engine.wal().flush().expect("flush");
    commit(&engine, 5);
    let err = engine.apply_through(5).expect_err("garbage entry applied");
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    assert_mentions(&err, &["log entry", "log index 3"]);
    assert_eq!(engine.applied().log_id.map(|id| id.index), Some(2));
    let mut block = vec![0u8; BLOCK];
    engine.image().read_blocks(2, &mut block).expect("read");
    assert!(block == pattern(2, 1, 7), "entry 2 was applied");
    drop(engine);

    // Recovery replays committed entries and meets the same entry.
    let err = err_of(store.clean().open(), "replay of garbage");
    assert_mentions(&err, &["log entry", "log index 3"]);
}
