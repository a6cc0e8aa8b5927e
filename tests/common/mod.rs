//! Shared helpers for the integration tests: building stores on the simulator and block entries,
//! damaging a real store's image file.
#![allow(dead_code)]

pub mod metrics;
pub mod node;

use std::sync::Arc;

use xdevice::entry::{BlockOp, EntryBody, EntryPayload};
use xdevice::storage::disk::{SimDisk, SimVolume, Volume};
use xdevice::storage::engine::{Engine, EngineConfig, FormatOptions};
use xdevice::storage::layout::Location;
use xdevice::storage::wal::{CommitMode, NewEntry, WalConfig};

pub const BLOCK: usize = 4096;

/// Small geometry so tests rotate segments often.
pub fn small_format() -> FormatOptions {
    FormatOptions {
        device_name: "t0".into(),
        device_bytes: Some(64 * BLOCK as u64),
        block_bytes: BLOCK as u32,
        segment_bytes: 256 * 1024,
        wal_slots: 16,
        ..FormatOptions::default()
    }
}

pub fn inline_config() -> EngineConfig {
    EngineConfig {
        wal: WalConfig {
            max_record_bytes: 64 * 1024,
            max_batch_bytes: 128 * 1024,
            max_batch_records: 64,
            max_pending_bytes: 1 << 20,
            compress: true,
            mode: CommitMode::Inline,
        },
        fill_segments: false,
        node_id: None,
    }
}

pub fn dir_location(volume: &Arc<SimVolume>) -> Location {
    Location::Directory { volume: volume.clone() as Arc<dyn Volume>, name: "t0".into() }
}

pub fn raw_location(disk: &Arc<SimDisk>) -> Location {
    Location::Raw { disk: disk.clone() }
}

pub fn formatted_volume() -> Arc<SimVolume> {
    let volume = SimVolume::new("vol");
    Engine::format(&dir_location(&volume), &small_format()).expect("format");
    volume
}

/// A block-write entry payload: `blocks` blocks at `lba`, each filled with a pattern of `seed`.
pub fn block_entry(index: u64, term: u64, lba: u64, blocks: usize, seed: u64) -> NewEntry {
    let data = pattern(lba, blocks, seed);
    let payload = EntryPayload {
        leader_node: 1,
        body: EntryBody::Blocks(vec![BlockOp::Write { lba, data: data.into() }]),
    };
    NewEntry { index, term, payload: payload.encode().into() }
}

/// Deterministic block contents: a mix of compressible and incompressible bytes.
pub fn pattern(lba: u64, blocks: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; blocks * BLOCK];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba;
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        if seed % 3 == 0 && i % 64 > 8 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// Flips one byte (XOR 0x5A, 100 bytes into the block) of block `lba` in the image file of the
/// store in directory `store` (device `xdb0` of `device_bytes` in `block_bytes` blocks).
pub fn flip_image_byte(store: &std::path::Path, device_bytes: u64, block_bytes: u32, lba: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let geometry = xdevice::storage::image::ImageGeometry::new(device_bytes, block_bytes);
    let path = store.join(xdevice::storage::layout::image_file("xdb0"));
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open image");
    let at = geometry.data_offset + lba * u64::from(block_bytes) + 100;
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut byte).expect("read");
    byte[0] ^= 0x5A;
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(&byte).expect("write");
    f.sync_all().expect("sync");
}

/// An embedded cluster of `replicas` in `dir`: a 16 MiB device on files, 8 MiB segments, a
/// snapshot every 3 segments keeping 16 entries, default Raft timing.
pub fn embedded_options(
    dir: &std::path::Path,
    replicas: u64,
) -> xdevice::device::local::EmbeddedOptions {
    xdevice::device::local::EmbeddedOptions {
        dir: dir.to_path_buf(),
        replicas,
        format: FormatOptions {
            device_name: "xdb0".into(),
            device_bytes: Some(16 << 20),
            segment_bytes: 8 << 20,
            ..FormatOptions::default()
        },
        engine: EngineConfig::default(),
        backend: xdevice::storage::disk::Backend::File,
        tuning: xdevice::replication::node::RaftTuning {
            snapshot_segments: 3,
            keep_entries: 16,
            ..Default::default()
        },
        log_cache_bytes: xdevice::replication::log_store::DEFAULT_CACHE_BYTES,
        replica_dirs: Vec::new(),
        rebuild_lost: false,
    }
}
