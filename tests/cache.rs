//! The hot cache and read path under the device API: read-your-writes with concurrent writers
//! and readers on a cache far smaller than the data, pinned blocks under eviction pressure and
//! the back-pressure on writers, checksum failures detected and repaired from a peer (or EIO),
//! discard visibility, and read-ahead for a sequential reader.

#![allow(clippy::unwrap_used)]

mod common;

use openraft::async_runtime::WatchReceiver;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use xdevice::device::local::Embedded;
use xdevice::device::{
    BoxFuture, CacheMode, Cluster, Device, DeviceConfig, DeviceError, OnCommit, ReadOutcome,
};
use xdevice::entry::BlockOp;
use xdevice::replication::types::Request;

const BS: usize = 4096;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

/// Block `lba` as written by `writer` at `version`: every 16 bytes carry all three, so a torn,
/// misplaced or mixed block is recognised.
fn stamp(lba: u64, writer: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for chunk in b.chunks_mut(16) {
        chunk[..8].copy_from_slice(&lba.to_le_bytes());
        chunk[8..12].copy_from_slice(&(writer as u32).to_le_bytes());
        chunk[12..].copy_from_slice(&(version as u32).to_le_bytes());
    }
    b
}

/// (writer, version) of a block read back; None for a never-written (zero) block. Panics on a
/// block that is not one whole stamp of `lba`.
fn unstamp(lba: u64, b: &[u8]) -> Option<(u64, u64)> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let writer = u64::from(u32::from_le_bytes(b[8..12].try_into().unwrap()));
    let version = u64::from(u32::from_le_bytes(b[12..16].try_into().unwrap()));
    assert_eq!(b, stamp(lba, writer, version).as_slice(), "block {lba} is not a whole write");
    Some((writer, version))
}

fn small_cache(blocks: u64, cache_bytes: u64, mode: CacheMode) -> DeviceConfig {
    DeviceConfig {
        cache_bytes,
        readahead_bytes: 64 << 10,
        ..DeviceConfig::new(BS as u32, blocks, mode)
    }
}

#[test]
fn reads_see_the_latest_completed_write_under_concurrent_overlapping_io() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(common::embedded_options(dir.path(), 3)).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        // 1,024 blocks written, a cache of 64: reads miss and fill while writes overtake them.
        const WRITERS: u64 = 4;
        const REGION: u64 = 256;
        let dev = Device::start(
            small_cache(WRITERS * REGION, 64 * BS as u64, CacheMode::Writeback),
            cluster.clone(),
        );
        // Per block: the newest version whose write completed, and the newest one started.
        let completed: Arc<Vec<AtomicU64>> =
            Arc::new((0..WRITERS * REGION).map(|_| AtomicU64::new(0)).collect());
        let started: Arc<Vec<AtomicU64>> =
            Arc::new((0..WRITERS * REGION).map(|_| AtomicU64::new(0)).collect());
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (dev, completed, started) = (dev.clone(), completed.clone(), started.clone());
            // Each writer owns a region, so each block's versions grow in write order; writes
            // are random ranges inside it, reads span every region.
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(w);
                for version in 1..=150u64 {
                    let len = rng.gen_range(1..=16u64);
                    let first = w * REGION + rng.gen_range(0..=REGION - len);
                    let data: Vec<u8> =
                        (first..first + len).flat_map(|b| stamp(b, w, version)).collect();
                    for b in first..first + len {
                        started[b as usize].store(version, Ordering::SeqCst);
                    }
                    dev.write(first * BS as u64, &data, rng.gen_bool(0.1)).await.unwrap();
                    for b in first..first + len {
                        completed[b as usize].fetch_max(version, Ordering::SeqCst);
                    }
                }
            }));
        }
        let checked = Arc::new(AtomicU64::new(0));
        for r in 0..4u64 {
            let (dev, completed, started) = (dev.clone(), completed.clone(), started.clone());
            let checked = checked.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(100 + r);
                for i in 0..400u64 {
                    let len = rng.gen_range(1..=64u64);
                    // Every fourth reader runs front to back, to drive read-ahead.
                    let first = if r == 3 {
                        (i * 8) % (WRITERS * REGION - len)
                    } else {
                        rng.gen_range(0..=WRITERS * REGION - len)
                    };
                    let floor: Vec<u64> = (first..first + len)
                        .map(|b| completed[b as usize].load(Ordering::SeqCst))
                        .collect();
                    let got = dev.read(first * BS as u64, len * BS as u64).await.unwrap();
                    for (j, block) in got.chunks(BS).enumerate() {
                        let b = first + j as u64;
                        let seen = unstamp(b, block).map_or(0, |(writer, version)| {
                            assert_eq!(writer, b / REGION, "block {b} written by its owner");
                            version
                        });
                        assert!(
                            seen >= floor[j],
                            "block {b}: read version {seen}, but {} had completed before",
                            floor[j]
                        );
                        let newest = started[b as usize].load(Ordering::SeqCst);
                        assert!(seen <= newest, "block {b}: version {seen} was never written");
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        dev.flush().await.unwrap();
        // Quiet now: every block reads its last completed version, through misses and hits.
        for _ in 0..2 {
            let all = dev.read(0, WRITERS * REGION * BS as u64).await.unwrap();
            for (b, block) in all.chunks(BS).enumerate() {
                let want = completed[b].load(Ordering::SeqCst);
                assert_eq!(unstamp(b as u64, block).map_or(0, |(_, v)| v), want, "block {b}");
            }
        }
        let stats = dev.cache_stats();
        assert!(checked.load(Ordering::Relaxed) > 10_000);
        assert!(stats.misses > 0 && stats.hits > 0, "{stats:?}");
        assert!(stats.evictions > 0, "a 64-block cache under 1,024 blocks evicts: {stats:?}");
        assert!(stats.resident_bytes <= stats.capacity_bytes, "{stats:?}");
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// A cluster whose commits wait for the test to release them, over an in-memory image that a
/// commit applies: the device above cannot tell it from a slow majority.
#[derive(Default)]
struct GatedCluster {
    image: Mutex<HashMap<u64, Vec<u8>>>,
    released: tokio::sync::Notify,
    open: std::sync::atomic::AtomicBool,
    index: AtomicU64,
}

impl GatedCluster {
    fn release(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.released.notify_waiters();
    }
}

impl Cluster for GatedCluster {
    fn submit(self: Arc<Self>, req: Request, on_commit: OnCommit) -> BoxFuture<Result<(), String>> {
        Box::pin(async move {
            let commit = async move {
                loop {
                    let released = self.released.notified();
                    if self.open.load(Ordering::SeqCst) {
                        break;
                    }
                    released.await;
                }
                let Request::Blocks(ops, _) = req else { return Err("not blocks".into()) };
                let mut image = self.image.lock().unwrap();
                for op in ops {
                    match op {
                        BlockOp::Write { lba, data } => {
                            for (i, b) in data.chunks(BS).enumerate() {
                                image.insert(lba + i as u64, b.to_vec());
                            }
                        }
                        BlockOp::Zero { lba, blocks } => {
                            for b in lba..lba + u64::from(blocks) {
                                image.remove(&b);
                            }
                        }
                    }
                }
                Ok(self.index.fetch_add(1, Ordering::SeqCst) + 1)
            };
            tokio::spawn(async move { on_commit(commit.await) });
            Ok(())
        })
    }

    fn acceptance_outlives_process(&self) -> bool {
        true
    }

    fn read(
        self: Arc<Self>,
        lba: u64,
        blocks: u64,
        _applied_at_least: u64,
    ) -> BoxFuture<Result<ReadOutcome, String>> {
        Box::pin(async move {
            let image = self.image.lock().unwrap();
            let data = (lba..lba + blocks)
                .flat_map(|b| image.get(&b).cloned().unwrap_or_else(|| vec![0; BS]))
                .collect();
            Ok(ReadOutcome::clean(data))
        })
    }
}

#[test]
fn pinned_blocks_survive_eviction_pressure_and_writers_wait_for_room() {
    runtime().block_on(async {
        let cluster = Arc::new(GatedCluster::default());
        // Blocks 10,000.. hold old data in the replicas' image, to be read through the cache.
        for b in 10_000..14_000u64 {
            cluster.image.lock().unwrap().insert(b, stamp(b, 9, 1));
        }
        // A 1 MiB cache (256 blocks). Every write is its own proposal, none commits: let them
        // all be in flight, so writeback writes complete at acceptance.
        let cfg = DeviceConfig {
            max_inflight_proposals: 100_000,
            ..small_cache(16_384, 1 << 20, CacheMode::Writeback)
        };
        let dev = Device::start(cfg, cluster.clone());
        // 128 blocks written (accepted, so complete in writeback) and never committed.
        for b in 0..128u64 {
            dev.write(b * BS as u64, &stamp(b, 1, 1), false).await.unwrap();
        }
        assert_eq!(dev.cache_stats().pinned_bytes, 128 * BS as u64);
        // 4,000 other blocks read through the cache: 30 times its size.
        for b in (10_000..14_000u64).step_by(8) {
            let got = dev.read(b * BS as u64, 8 * BS as u64).await.unwrap();
            assert_eq!(unstamp(b, &got[..BS]), Some((9, 1)));
        }
        let stats = dev.cache_stats();
        assert!(stats.evictions >= 3_000, "{stats:?}");
        assert!(stats.resident_bytes <= stats.capacity_bytes, "{stats:?}");
        // The image has none of the pinned writes: only the cache can answer them.
        for b in 0..128u64 {
            let got = dev.read(b * BS as u64, BS as u64).await.unwrap();
            assert_eq!(unstamp(b, &got), Some((1, 1)), "pinned block {b} was lost");
        }
        // Pinned bytes are bounded by the cache: 128 more blocks fit, the next write waits.
        for b in 128..256u64 {
            dev.write(b * BS as u64, &stamp(b, 1, 1), false).await.unwrap();
        }
        let blocked = tokio::spawn({
            let dev = dev.clone();
            async move { dev.write(300 * BS as u64, &stamp(300, 1, 1), false).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!blocked.is_finished(), "a write past the pinned bound completed");
        assert!(dev.cache_stats().pinned_bytes <= 1 << 20);
        cluster.release();
        blocked.await.unwrap().unwrap();
        dev.flush().await.unwrap();
        assert_eq!(dev.cache_stats().pinned_bytes, 0);
        for b in [0u64, 255, 300] {
            let got = dev.read(b * BS as u64, BS as u64).await.unwrap();
            assert_eq!(unstamp(b, &got), Some((1, 1)));
        }
        dev.close();
    });
}

#[test]
fn discard_and_write_zeroes_are_visible_in_reads() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(common::embedded_options(dir.path(), 3)).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let dev = Device::start(small_cache(4096, 16 << 20, CacheMode::Writeback), cluster.clone());
        let data: Vec<u8> = (0..64u64).flat_map(|b| stamp(b, 1, 1)).collect();
        dev.write(0, &data, false).await.unwrap();
        dev.flush().await.unwrap();
        // Cached and clean now.
        assert_eq!(dev.read(0, data.len() as u64).await.unwrap(), data);
        // Discard 8..24, not waiting for its commit.
        dev.discard(8 * BS as u64, 16 * BS as u64, false).await.unwrap();
        let expect = |b: u64| if (8..24).contains(&b) { vec![0; BS] } else { stamp(b, 1, 1) };
        let want: Vec<u8> = (0..64u64).flat_map(expect).collect();
        assert_eq!(dev.read(0, data.len() as u64).await.unwrap(), want);
        dev.flush().await.unwrap();
        assert_eq!(dev.read(0, data.len() as u64).await.unwrap(), want);
        // A fresh device (empty cache) reads the same from the replicas.
        dev.close();
        let dev = Device::start(small_cache(4096, 16 << 20, CacheMode::Writeback), cluster.clone());
        assert_eq!(dev.read(0, data.len() as u64).await.unwrap(), want);
        // A write after a discard wins over it.
        dev.discard(0, 64 * BS as u64, false).await.unwrap();
        dev.write(BS as u64, &stamp(1, 2, 2), false).await.unwrap();
        let got = dev.read(0, 2 * BS as u64).await.unwrap();
        assert_eq!(&got[..BS], &[0u8; BS][..]);
        assert_eq!(unstamp(1, &got[BS..]), Some((2, 2)));
        dev.flush().await.unwrap();
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// Flips one byte of block `lba` in replica `id`'s image file.
fn flip_byte(dir: &std::path::Path, id: u64, lba: u64) {
    common::flip_image_byte(&dir.join(format!("replica-{id}")), 16 << 20, BS as u32, lba);
}

/// Waits until every running replica has applied the leader's whole log (a write completes
/// at commit, before it is applied).
async fn all_applied(cluster: &Embedded) {
    use xdevice::replication::node::applied_index;
    for _ in 0..500 {
        let last = cluster.leader().and_then(|l| l.raft.metrics().borrow_watched().last_log_index);
        if cluster.running().iter().all(|n| Some(applied_index(&n.raft)) == last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("replicas did not converge");
}

#[test]
fn a_flipped_byte_is_detected_and_repaired_from_a_peer() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(common::embedded_options(dir.path(), 3)).await.unwrap();
        let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let cfg = small_cache(4096, 16 << 20, CacheMode::Writethrough);
        let dev = Device::start(cfg.clone(), cluster.clone());
        let data: Vec<u8> = (0..32u64).flat_map(|b| stamp(b, 1, 7)).collect();
        dev.write(0, &data, false).await.unwrap();
        dev.close();
        all_applied(&cluster).await;

        // The leader's copy of block 5 is damaged; reads go to the leader.
        flip_byte(dir.path(), leader.id, 5);
        let mut direct = vec![0u8; BS];
        let err = leader.engine.image().read_blocks(5, &mut direct).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");

        // A fresh device, so nothing is cached.
        let dev = Device::start(cfg.clone(), cluster.clone());
        assert_eq!(dev.read(0, data.len() as u64).await.unwrap(), data, "never wrong data");
        assert_eq!(dev.stats().corrupt_blocks, 1);
        assert_eq!(dev.stats().repaired_blocks, 1);
        leader.engine.image().read_blocks(5, &mut direct).unwrap();
        assert_eq!(direct, stamp(5, 1, 7), "the leader's copy was rewritten");
        dev.close();

        // Damaged on every replica: the read fails, naming the block; nothing is made up.
        for id in 1..=3 {
            flip_byte(dir.path(), id, 9);
        }
        let dev = Device::start(cfg, cluster.clone());
        let err = dev.read(8 * BS as u64, 2 * BS as u64).await.unwrap_err();
        let DeviceError::Read(msg) = &err else { panic!("{err:?}") };
        assert!(msg.contains("lba 9") && msg.contains("no other replica"), "{msg}");
        assert_eq!(xdevice_ublk::IoError::from(err).errno(), libc::EIO);
        // The other blocks still read.
        assert_eq!(dev.read(0, 9 * BS as u64).await.unwrap(), data[..9 * BS]);
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

#[test]
fn a_single_replica_fails_a_damaged_read_with_eio() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(common::embedded_options(dir.path(), 1)).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let cfg = small_cache(4096, 16 << 20, CacheMode::Writethrough);
        let dev = Device::start(cfg.clone(), cluster.clone());
        dev.write(0, &stamp(0, 1, 1), false).await.unwrap();
        dev.close();
        all_applied(&cluster).await;
        flip_byte(dir.path(), 1, 0);
        let dev = Device::start(cfg, cluster.clone());
        let err = dev.read(0, BS as u64).await.unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert_eq!(xdevice_ublk::IoError::from(err).errno(), libc::EIO);
        assert_eq!(dev.stats().corrupt_blocks, 0, "counted only when the read succeeds");
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

#[test]
fn a_sequential_reader_is_served_by_read_ahead() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(common::embedded_options(dir.path(), 3)).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let cfg = DeviceConfig {
            cache_bytes: 16 << 20,
            readahead_bytes: 1 << 20,
            ..DeviceConfig::new(BS as u32, 4096, CacheMode::Writethrough)
        };
        let dev = Device::start(cfg.clone(), cluster.clone());
        let data: Vec<u8> = (0..2048u64).flat_map(|b| stamp(b, 1, 3)).collect();
        dev.write(0, &data, false).await.unwrap();
        dev.close();
        all_applied(&cluster).await;
        // A fresh device reads it front to back in 16 KiB reads, as WAL recovery does.
        let dev = Device::start(cfg, cluster.clone());
        for (i, want) in data.chunks(4 * BS).enumerate() {
            let got = dev.read((i * 4 * BS) as u64, (4 * BS) as u64).await.unwrap();
            assert!(got == want, "read {i} differs");
            // Give the read-ahead a moment, as a reader processing what it read would.
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let stats = dev.cache_stats();
        assert!(stats.readahead_blocks >= 1500, "{stats:?}");
        assert!(
            stats.hits > stats.misses * 4,
            "read-ahead should turn most reads into hits: {stats:?}"
        );
        // The window is bounded: never more than 1 MiB past the reader.
        assert!(stats.resident_bytes <= 16 << 20);
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

#[test]
fn reads_right_after_a_restart_see_every_write_completed_before_it() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(common::embedded_options(dir.path(), 3)).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let cfg = small_cache(4096, 16 << 20, CacheMode::Writethrough);
        let dev = Device::start(cfg.clone(), cluster.clone());
        let data: Vec<u8> = (0..64u64).flat_map(|b| stamp(b, 1, 5)).collect();
        dev.write(0, &data, false).await.unwrap();
        dev.flush().await.unwrap();
        dev.close();
        cluster.shutdown().await.unwrap();
        drop(cluster);
        // The committed index is persisted only by checkpoints: after the restart the images
        // hold none of these writes until a leader re-applies them. The first read must wait.
        let cluster = Embedded::start(common::embedded_options(dir.path(), 3)).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let dev = Device::start(cfg, cluster.clone());
        assert!(dev.read(0, data.len() as u64).await.unwrap() == data, "stale read after restart");
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// What the ublk queue thread answers itself (`Target::answer_now`): a read whose every block the
/// cache holds, and a flush with nothing outstanding, answered on the calling thread with no
/// runtime at hand; anything that needs waiting is declined, leaving nothing changed.
#[test]
fn cache_hits_and_an_empty_flush_are_answered_on_the_calling_thread() {
    let rt = runtime();
    let cluster = Arc::new(GatedCluster::default());
    for b in 100..104u64 {
        cluster.image.lock().unwrap().insert(b, stamp(b, 9, 1));
    }
    let dev = rt.block_on(async {
        let cfg = small_cache(4096, 1 << 20, CacheMode::Writeback);
        Device::start(cfg, cluster.clone())
    });
    // Nothing written yet: a flush is free, on this plain thread.
    assert!(dev.try_flush_now());
    // A write the cluster has not committed: flushes must wait, the write's blocks are pinned.
    let writer = {
        let dev = dev.clone();
        rt.spawn(async move { dev.write(0, &stamp(0, 1, 1), true).await })
    };
    let mut buf = vec![0u8; BS];
    for _ in 0..1000 {
        if dev.pipeline().unconfirmed_batches == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!dev.try_flush_now(), "a flush answered with a write outstanding");
    assert!(dev.try_read_cached(0, &mut buf).unwrap(), "a pinned block is a hit");
    assert_eq!(buf, stamp(0, 1, 1));
    // Blocks never read are declined, and declining reserves nothing: the read that follows
    // goes to the replica and fills the cache.
    let mut two = vec![0u8; 2 * BS];
    assert!(!dev.try_read_cached(100 * BS as u64, &mut two).unwrap());
    let misses = dev.cache_stats().misses;
    assert_eq!(rt.block_on(dev.read(100 * BS as u64, 2 * BS as u64)).unwrap(), {
        let mut w = stamp(100, 9, 1);
        w.extend(stamp(101, 9, 1));
        w
    });
    assert!(dev.cache_stats().misses > misses);
    assert!(dev.try_read_cached(100 * BS as u64, &mut two).unwrap(), "filled by the read");
    assert_eq!(&two[BS..], stamp(101, 9, 1).as_slice());
    // A range the device does not have is an error, not a decline.
    let end = 4096 * BS as u64;
    assert!(matches!(dev.try_read_cached(end, &mut buf), Err(DeviceError::OutOfRange { .. })));
    // Once the write commits, flushes are free again.
    cluster.release();
    rt.block_on(writer).unwrap().unwrap();
    assert!(dev.try_flush_now());
    let reads = dev.stats().reads;
    assert!(reads >= 3, "answered reads are counted: {reads}");
    dev.close();
}

/// Reads that miss the cache go to a replica's image on a fixed pool of reader threads: however
/// many are waiting, the process does not grow a thread per read (tokio's blocking pool grew to
/// about 185 threads at queue depth 32).
#[test]
fn reads_that_miss_the_cache_run_on_a_fixed_number_of_threads() {
    const WORKERS: usize = 2;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name("miss-bound")
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(common::embedded_options(dir.path(), 1)).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        const BLOCKS: u64 = 4096; // 16 MiB written, read back through a 256 KiB cache
        let cfg = DeviceConfig {
            readahead_bytes: 0,
            ..small_cache(BLOCKS, 256 << 10, CacheMode::Writethrough)
        };
        let dev = Device::start(cfg.clone(), cluster.clone());
        for chunk in 0..BLOCKS / 64 {
            let data: Vec<u8> =
                (chunk * 64..(chunk + 1) * 64).flat_map(|b| stamp(b, 1, 1)).collect();
            dev.write(chunk * 64 * BS as u64, &data, false).await.unwrap();
        }
        dev.close();
        let dev = Device::start(cfg, cluster.clone());

        let count = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with("miss-bound"))
                .count()
        };
        let peak = Arc::new(AtomicU64::new(count() as u64));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(count() as u64, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let mut tasks = Vec::new();
        for t in 0..256u64 {
            let dev = dev.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
                for _ in 0..8 {
                    let b = rng.gen_range(0..BLOCKS);
                    let got = dev.read(b * BS as u64, BS as u64).await.unwrap();
                    assert_eq!(unstamp(b, &got), Some((1, 1)), "block {b}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        sampler.join().unwrap();
        let stats = dev.cache_stats();
        assert!(stats.misses > 1000, "the reads must miss the cache: {stats:?}");
        // The runtime's threads (named after it, blocking ones included): its workers and a few
        // blocking threads for the replica's own log and apply work. The reader pool's threads
        // are a fixed number by construction (`device::readers`), so they are not counted here:
        // other tests in this binary run reader pools of their own at the same time.
        let bound = (WORKERS + 4) as u64;
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= bound, "{peak} threads for 256 concurrent missing reads (bound {bound})");
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// A cluster whose hand-overs often do not finish on their first poll (the device then finishes
/// them in a task while other threads keep submitting) and whose commits come back from other
/// tasks, late and in any order: every proposal must still reach it in the order the device
/// admitted the writes.
struct SlowHandCluster {
    /// (lba, writer, version) of each block write, in the order proposals arrived.
    arrived: Mutex<Vec<(u64, u64, u64)>>,
    index: AtomicU64,
    polls: AtomicU64,
}

impl Cluster for SlowHandCluster {
    fn submit(self: Arc<Self>, req: Request, on_commit: OnCommit) -> BoxFuture<Result<(), String>> {
        // Every other proposal waits one poll before it is taken.
        let mut wait = self.polls.fetch_add(1, Ordering::SeqCst) % 2 == 0;
        Box::pin(async move {
            std::future::poll_fn(|cx| {
                if std::mem::take(&mut wait) {
                    cx.waker().wake_by_ref();
                    std::task::Poll::Pending
                } else {
                    std::task::Poll::Ready(())
                }
            })
            .await;
            let Request::Blocks(ops, _) = req else { return Err("not blocks".into()) };
            {
                let mut arrived = self.arrived.lock().unwrap();
                for op in &ops {
                    if let BlockOp::Write { lba, data } = op {
                        for (i, b) in data.chunks(BS).enumerate() {
                            let lba = lba + i as u64;
                            let (w, v) = unstamp(lba, b).unwrap();
                            arrived.push((lba, w, v));
                        }
                    }
                }
            }
            let index = self.index.fetch_add(1, Ordering::SeqCst) + 1;
            let delay = Duration::from_micros(index * 7919 % 1500);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                on_commit(Ok(index));
            });
            Ok(())
        })
    }

    fn acceptance_outlives_process(&self) -> bool {
        false
    }

    fn read(
        self: Arc<Self>,
        _lba: u64,
        _blocks: u64,
        _applied_at_least: u64,
    ) -> BoxFuture<Result<ReadOutcome, String>> {
        Box::pin(async { Err("not read in this test".to_string()) })
    }
}

#[test]
fn proposals_reach_the_cluster_in_order_when_hand_overs_wait() {
    runtime().block_on(async {
        let cluster = Arc::new(SlowHandCluster {
            arrived: Mutex::new(Vec::new()),
            index: AtomicU64::new(0),
            polls: AtomicU64::new(0),
        });
        // Proposals of one block each: a writer's consecutive versions are consecutive
        // proposals, so any two that overtake each other show.
        let cfg = DeviceConfig {
            max_inflight_proposals: 3,
            max_proposal_bytes: BS,
            ..small_cache(64, 16 << 20, CacheMode::Writeback)
        };
        let dev = Device::start(cfg, cluster.clone());
        const WRITERS: u64 = 2;
        const VERSIONS: u64 = 200;
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let dev = dev.clone();
                tokio::spawn(async move {
                    // Each writer rewrites its own block without waiting for the last write
                    // (as the kernel does with a deep queue): its versions must arrive in order.
                    let mut done = Vec::new();
                    for v in 1..=VERSIONS {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        let data = bytes::Bytes::from(stamp(w, w, v));
                        dev.submit_write(
                            w * BS as u64,
                            data,
                            false,
                            Box::new(move |r| drop(tx.send(r))),
                        );
                        done.push(rx);
                        // A burst without yielding, then a pause: a hand-off left to a task
                        // meets further submissions from this thread before it has run.
                        if v % 8 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    for rx in done {
                        rx.await.unwrap().unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        dev.flush().await.unwrap();
        let arrived = cluster.arrived.lock().unwrap().clone();
        let mut last = HashMap::new();
        for (lba, w, v) in &arrived {
            assert_eq!(*lba, *w, "block {lba} carries writer {w}'s data");
            let prev = last.insert(*lba, *v).unwrap_or(0);
            assert!(*v > prev, "block {lba}: version {v} arrived after version {prev}");
        }
        assert!(
            (0..WRITERS).all(|w| last.get(&w) == Some(&VERSIONS)),
            "every writer's last version arrived: {last:?}"
        );
        assert!(cluster.polls.load(Ordering::SeqCst) > 100, "too few proposals to mean anything");
        dev.close();
    });
}
