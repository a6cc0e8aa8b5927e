//! Replication in one process: three replicas through in-process channels, the device API on
//! top, faults injected by cutting a replica's links or stopping it.

#![allow(clippy::unwrap_used)]

mod common;

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdevice::device::local::{Embedded, EmbeddedOptions};
use xdevice::device::{CacheMode, Device, DeviceConfig, DeviceError};
use xdevice::entry::{BlockOp, EntryBody};
use xdevice::replication::log_store::DEFAULT_CACHE_BYTES;
use xdevice::replication::node::Node;
use xdevice::replication::snapshot::{
    self, Described, LiveStream, Shape, SnapshotData, SnapshotFiles, Target,
};
use xdevice::replication::types::{from_store_log_id, SnapshotMeta};
use xdevice::replication::{open_replica, Replica};
use xdevice::storage::disk::{Backend, DirVolume, Volume};
use xdevice::storage::engine::{Engine, EngineConfig, FormatOptions};
use xdevice::storage::image::Attachment;
use xdevice::storage::layout::Location;
use xdevice::storage::state::LogId as StoreLogId;
use xdevice::storage::wal::{CommitMode, WalConfig};

const BS: usize = 4096;

fn options(dir: &std::path::Path) -> EmbeddedOptions {
    common::embedded_options(dir, 3)
}

fn block(lba: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&lba.to_le_bytes());
        chunk[8..].copy_from_slice(&(version ^ i as u64).to_le_bytes());
    }
    b
}

async fn device(cluster: &Arc<Embedded>, mode: CacheMode) -> Arc<Device> {
    let blocks = cluster.device_bytes() / BS as u64;
    Device::start(DeviceConfig::new(BS as u32, blocks, mode), cluster.clone())
}

/// Three replicas in `dir` with a writeback device on top, and the longest election timeout.
async fn writeback_cluster(dir: &std::path::Path) -> (Arc<Embedded>, Arc<Device>, Duration) {
    let opts = options(dir);
    let election = opts.tuning.election_max;
    let cluster = Embedded::start(opts).await.unwrap();
    let dev = device(&cluster, CacheMode::Writeback).await;
    (cluster, dev, election)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

#[test]
fn writes_flush_and_read_back_on_every_replica() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(options(dir.path())).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let dev = device(&cluster, CacheMode::Writeback).await;
        for lba in 0..64u64 {
            dev.write(lba * BS as u64, &block(lba, 1), false).await.unwrap();
        }
        // Read-your-writes before any flush (from the overlay or the leader).
        for lba in 0..64u64 {
            assert_eq!(dev.read(lba * BS as u64, BS as u64).await.unwrap(), block(lba, 1));
        }
        dev.flush().await.unwrap();
        dev.discard(8 * BS as u64, 4 * BS as u64, true).await.unwrap();
        let got = dev.read(8 * BS as u64, 4 * BS as u64).await.unwrap();
        assert!(got.iter().all(|&b| b == 0), "discarded blocks read as zeros");
        // Every replica applies the same image.
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let commit = leader_log_end(&cluster);
        for node in cluster.running() {
            wait_applied(&node, commit, Duration::from_secs(5)).await;
            let mut img = vec![0u8; 64 * BS];
            node.engine.image().read_blocks(0, &mut img).unwrap();
            for lba in 0..64u64 {
                let want = if (8..12).contains(&lba) { vec![0u8; BS] } else { block(lba, 1) };
                assert_eq!(
                    &img[lba as usize * BS..][..BS],
                    &want[..],
                    "node {} lba {lba}",
                    node.id
                );
            }
        }
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

#[test]
fn errors_name_the_problem() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(options(dir.path())).await.unwrap();
        let dev = device(&cluster, CacheMode::Writethrough).await;
        let size = dev.size_bytes();
        let e = dev.write(size, &block(0, 1), false).await.unwrap_err();
        assert!(matches!(e, DeviceError::OutOfRange { .. }), "{e}");
        assert_eq!(xdevice_ublk::IoError::from(e.clone()).errno(), libc::EINVAL);
        assert!(e.to_string().contains("beyond"), "{e}");
        let e = dev.read(100, BS as u64).await.unwrap_err();
        assert!(e.to_string().contains("aligned"), "{e}");
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// Cut the leader off under a write load; the flushed data survives and a new leader takes over.
/// The failover time is printed (docs/benchmarks.md); the assertion only catches a stall (10×
/// the election timeout), the 2× goal is tracked as a figure, not asserted.
#[test]
fn leader_isolation_fails_over_and_loses_no_flushed_write() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, dev, election) = writeback_cluster(dir.path()).await;
        let mut version = 0u64;
        let mut failovers = Vec::new();
        for round in 0..5u64 {
            let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
            for lba in 0..32u64 {
                version += 1;
                dev.write(lba * BS as u64, &block(lba, version), false).await.unwrap();
            }
            dev.flush().await.unwrap();
            let flushed = version;
            // Failover is measured from a healthy cluster: the node cut off in the last round
            // has caught up. (A leader lost while a replica is still stale is a double fault;
            // the stale replica's failed campaigns make that election slower.)
            let index = leader_log_end(&cluster);
            for node in cluster.running() {
                wait_applied(&node, index, Duration::from_secs(5)).await;
            }
            let cut = Instant::now();
            cluster.router.isolate(leader.id, true);
            // The first write committed after the cut marks the new leader serving writes.
            dev.write(0, &block(0, version + 1), true).await.unwrap();
            version += 1;
            let took = cut.elapsed();
            failovers.push(took);
            let new = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
            assert_ne!(new.id, leader.id, "round {round}: leadership must move");
            for lba in 1..32u64 {
                let got = dev.read(lba * BS as u64, BS as u64).await.unwrap();
                let v = flushed - 31 + lba;
                assert_eq!(got, block(lba, v), "round {round} lba {lba}");
            }
            cluster.router.isolate(leader.id, false);
        }
        let worst = failovers.iter().max().unwrap();
        println!("failover (cut to first committed write): {failovers:?}, election timeout max {election:?}");
        assert!(*worst < election * 10, "failover took {worst:?}");
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// A follower cut off for many election timeouts never campaigns: its pre-vote is refused by
/// voters that still hear the leader, so its term stays and, once its links are back, the
/// leader keeps leading in the same term while the follower catches up. (Without pre-vote it
/// raised its term every election timeout and deposed the leader on rejoining.) The leader
/// itself, cut off, is still replaced.
#[test]
fn an_isolated_follower_rejoins_without_an_election() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, dev, election) = writeback_cluster(dir.path()).await;
        let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let term = |n: &Node| n.raft.metrics().borrow_watched().current_term;
        let before = term(&leader);
        let follower = cluster.running().into_iter().find(|n| n.id != leader.id).unwrap();
        assert_eq!(term(&follower), before);

        cluster.router.isolate(follower.id, true);
        let mut version = 0u64;
        let cut = Instant::now();
        // Ten of the longest election timeouts, writing all along.
        while cut.elapsed() < election * 10 {
            version += 1;
            dev.write((version % 64) * BS as u64, &block(version % 64, version), true)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(term(&follower), before, "the isolated follower raised its term");
        assert!(
            follower.raft.metrics().borrow_watched().state != openraft::ServerState::Candidate,
            "the isolated follower is campaigning"
        );

        cluster.router.isolate(follower.id, false);
        wait_applied(&follower, leader_log_end(&cluster), Duration::from_secs(5)).await;
        // Some more election timeouts with it back: nobody campaigns.
        let healed = Instant::now();
        while healed.elapsed() < election * 4 {
            version += 1;
            dev.write((version % 64) * BS as u64, &block(version % 64, version), true)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = cluster.wait_leader(Duration::from_secs(1)).await.unwrap();
        assert_eq!((now.id, term(&now)), (leader.id, before), "leadership changed");
        for node in cluster.running() {
            assert_eq!(term(&node), before, "node {} changed term", node.id);
        }

        // Pre-vote withholds only hopeless campaigns: a cut-off leader is replaced.
        cluster.router.isolate(leader.id, true);
        let cut = Instant::now();
        dev.write(0, &block(0, version + 1), true).await.unwrap();
        let new = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        assert_ne!(new.id, leader.id);
        assert!(term(&new) > before);
        println!(
            "isolated leader replaced; first write committed {:?} after the cut",
            cut.elapsed()
        );
        cluster.router.isolate(leader.id, false);
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// Large entries and a large `keep_entries` (the default 1000, here 4 GiB of 4 MiB entries):
/// the log below each snapshot is still bounded to `retained_segments` segments, so the WAL
/// stays near `snapshot_segments` (7 segments at most here; 13 without the bound, in the same
/// run), and the data reads back.
#[test]
fn the_log_below_a_snapshot_is_bounded_in_segments_not_only_entries() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path());
        opts.tuning.snapshot_segments = 4;
        opts.tuning.keep_entries = 1000;
        let bound = opts.tuning.snapshot_segments + opts.tuning.retained_segments() + 1;
        let cluster = Embedded::start(opts).await.unwrap();
        let dev = device(&cluster, CacheMode::Writeback).await;
        let device_blocks = cluster.device_bytes() / BS as u64;
        let live = |cluster: &Embedded| {
            cluster.running().iter().map(|n| n.engine.wal().segments().len()).max().unwrap()
        };
        // 256 MiB in 1 MiB writes (proposals of up to 4 MiB) over the 16 MiB device: 32 and more
        // 8 MiB segments written on every replica.
        let per_write = 256u64;
        let mut most = 0;
        let mut want = Expected::new();
        for i in 0..256u64 {
            let lba = (i * per_write) % device_blocks;
            let data: Vec<u8> = (lba..lba + per_write).flat_map(|b| block(b, i)).collect();
            dev.write(lba * BS as u64, &data, false).await.unwrap();
            for b in lba..lba + per_write {
                want.insert(b, i);
            }
            if i % 16 == 15 {
                dev.flush().await.unwrap();
                most = most.max(live(&cluster));
            }
        }
        dev.flush().await.unwrap();
        println!("most live segments on a replica while writing 256 MiB: {most} (bound {bound})");
        assert!(most <= bound + 2, "the WAL grew to {most} segments");
        // At rest, snapshots and purges catch up with the last writes.
        let deadline = Instant::now() + Duration::from_secs(10);
        while live(&cluster) > bound {
            assert!(Instant::now() < deadline, "still {} live segments", live(&cluster));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for node in cluster.running() {
            let first = node.engine.wal().bounds().first;
            assert!(first > 0, "node {} purged nothing", node.id);
        }
        for lba in (0..device_blocks).step_by(97) {
            let v = want[&lba];
            assert_eq!(dev.read(lba * BS as u64, BS as u64).await.unwrap(), block(lba, v));
        }
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// What the device should read: lba → version of its last write (absent: zeros).
type Expected = BTreeMap<u64, u64>;

async fn write_range(dev: &Device, lbas: std::ops::Range<u64>, version: u64, want: &mut Expected) {
    for lba in lbas {
        dev.write(lba * BS as u64, &block(lba, version), false).await.unwrap();
        want.insert(lba, version);
    }
}

/// Waits until `node` has applied through `index`.
async fn wait_applied(node: &Node, index: u64, within: Duration) {
    let mut rx = node.raft.metrics();
    let deadline = Instant::now() + within;
    while rx.borrow_watched().last_applied.as_ref().map(|l| l.index) < Some(index) {
        let now = rx.borrow_watched().last_applied;
        assert!(Instant::now() < deadline, "node {} applied only {now:?}, not {index}", node.id);
        tokio::time::timeout(Duration::from_millis(100), rx.changed()).await.ok();
    }
}

/// The leader's last log index: every write the device completed (at commit, which comes
/// before apply) is at or below it, and so is everything the replicas must apply to match.
fn leader_log_end(cluster: &Embedded) -> u64 {
    let leader = cluster.leader().expect("a leader");
    let last = leader.raft.metrics().borrow_watched().last_log_index;
    last.expect("the leader's log holds something")
}

/// Compares `node`'s image with `want`, block by block, over the whole device.
fn check_image(node: &Node, want: &Expected, blocks: u64) {
    let per = 256u64;
    let mut img = vec![0u8; per as usize * BS];
    for first in (0..blocks).step_by(per as usize) {
        let n = per.min(blocks - first);
        let img = &mut img[..n as usize * BS];
        node.engine.image().read_blocks(first, img).unwrap();
        for lba in first..first + n {
            let got = &img[(lba - first) as usize * BS..][..BS];
            match want.get(&lba) {
                Some(v) => {
                    assert!(got == block(lba, *v), "node {} lba {lba}: not version {v}", node.id)
                }
                None => {
                    assert!(got.iter().all(|&b| b == 0), "node {} lba {lba}: not zeros", node.id)
                }
            }
        }
    }
}

/// A follower stopped and restarted recovers its own store and catches up from the log; the
/// leader stopped hands over to a new one that serves writes, and catches up in turn.
#[test]
fn restarted_replica_recovers_and_rejoins() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(options(dir.path())).await.unwrap();
        let blocks = cluster.device_bytes() / BS as u64;
        let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let dev = device(&cluster, CacheMode::Writeback).await;
        let mut want = Expected::new();
        write_range(&dev, 0..64, 1, &mut want).await;
        dev.flush().await.unwrap();

        let follower = (1..=3).find(|&id| id != leader.id).unwrap();
        cluster.stop_replica(follower).await.unwrap();
        write_range(&dev, 32..128, 2, &mut want).await;
        dev.discard(40 * BS as u64, 4 * BS as u64, false).await.unwrap();
        want.retain(|lba, _| !(40..44).contains(lba));
        dev.flush().await.unwrap();
        cluster.start_replica(follower).await.unwrap();
        let node = cluster.node(follower).unwrap();
        wait_applied(&node, leader_log_end(&cluster), Duration::from_secs(10)).await;
        check_image(&node, &want, blocks);

        // Now the leader itself.
        let old = cluster.wait_leader(Duration::from_secs(5)).await.unwrap().id;
        drop(leader);
        cluster.stop_replica(old).await.unwrap();
        write_range(&dev, 100..160, 3, &mut want).await;
        dev.write(0, &block(0, 3), true).await.unwrap();
        want.insert(0, 3);
        dev.flush().await.unwrap();
        let new = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        assert_ne!(new.id, old, "leadership must move off the stopped leader");
        cluster.start_replica(old).await.unwrap();
        let index = leader_log_end(&cluster);
        for node in cluster.running() {
            wait_applied(&node, index, Duration::from_secs(10)).await;
            check_image(&node, &want, blocks);
        }
        for lba in [0u64, 41, 100, 159] {
            let got = dev.read(lba * BS as u64, BS as u64).await.unwrap();
            let expect = want.get(&lba).map_or(vec![0u8; BS], |v| block(lba, *v));
            assert!(got == expect, "device read of lba {lba}");
        }
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// 1 MiB segments, snapshots every 2 live segments, 8 entries kept: a follower that misses a
/// few MiB of writes finds the leader's log purged past it and must be sent a snapshot.
fn snapshot_options(dir: &std::path::Path) -> EmbeddedOptions {
    let mut opts = options(dir);
    opts.format.segment_bytes = 1 << 20;
    opts.engine = EngineConfig {
        wal: WalConfig {
            max_record_bytes: 256 << 10,
            max_batch_bytes: 512 << 10,
            max_batch_records: 1024,
            max_pending_bytes: 8 << 20,
            compress: true,
            mode: CommitMode::Thread,
        },
        fill_segments: false,
        node_id: None,
    };
    opts.tuning.snapshot_segments = 2;
    opts.tuning.keep_entries = 8;
    opts
}

#[test]
fn lagging_replica_catches_up_by_snapshot() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(snapshot_options(dir.path())).await.unwrap();
        let blocks = cluster.device_bytes() / BS as u64;
        let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let mut cfg = DeviceConfig::new(BS as u32, blocks, CacheMode::Writeback);
        cfg.max_proposal_bytes = 64 << 10;
        let dev = Device::start(cfg, cluster.clone());
        let mut want = Expected::new();
        write_range(&dev, 0..256, 1, &mut want).await;
        dev.flush().await.unwrap();

        let follower = (1..=3).find(|&id| id != leader.id).unwrap();
        let node = cluster.node(follower).unwrap();
        wait_applied(&node, leader_log_end(&cluster), Duration::from_secs(10)).await;
        let follower_last = node.raft.metrics().borrow_watched().last_log_index.unwrap();
        drop(node);
        cluster.stop_replica(follower).await.unwrap();

        // Several segments' worth of writes, until the leader has purged past the follower.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut version = 2;
        loop {
            write_range(&dev, 0..blocks, version, &mut want).await;
            dev.flush().await.unwrap();
            version += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
            // No running replica holds the entry after the follower's last: only a snapshot
            // can bring it up to date.
            if cluster.running().iter().all(|n| n.engine.wal().bounds().first > follower_last + 1) {
                break;
            }
            assert!(Instant::now() < deadline, "leader never purged past {follower_last}");
        }
        let purged_past = cluster.leader().unwrap().engine.wal().bounds().first;

        // Writes keep landing while the snapshot streams from the live image; they cover only
        // the first 512 blocks, so the rest of the follower's image comes from the snapshot.
        let writer = {
            let dev = dev.clone();
            let version = version;
            tokio::spawn(async move {
                let mut want = Expected::new();
                for round in 0..8u64 {
                    let first = (round * 128) % 512;
                    write_range(&dev, first..first + 128, version + round, &mut want).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                want
            })
        };
        cluster.start_replica(follower).await.unwrap();
        want.extend(writer.await.unwrap());
        version += 8;
        dev.flush().await.unwrap();
        let node = cluster.node(follower).unwrap();
        wait_applied(&node, leader_log_end(&cluster), Duration::from_secs(15)).await;
        let snap = node.raft.metrics().borrow_watched().snapshot;
        let snap = snap.expect("the follower installed a snapshot");
        assert!(
            snap.index >= purged_past - 1,
            "snapshot at {} does not cover the leader's purged log (first held {purged_past})",
            snap.index
        );
        // Its log restarts above the gap (it may have purged further after snapshots of its own).
        let bounds = node.engine.wal().bounds();
        assert!(bounds.purged.is_some_and(|p| p.index > follower_last), "{bounds:?}");
        for f in ["xdb0_snap_recv", "xdb0_snap_install"] {
            let path = dir.path().join(format!("replica-{follower}")).join(f);
            assert!(!path.exists(), "{} left behind", path.display());
        }
        println!(
            "follower {follower} stopped at {follower_last}; leader log from {purged_past}; \
             follower snapshot at {}, {version} passes written, term {}",
            snap.index,
            node.raft.metrics().borrow_watched().current_term
        );
        check_image(&node, &want, blocks);

        // Writes continue and reach the caught-up replica, also across its restart (its store
        // now starts from the installed snapshot).
        write_range(&dev, 10..74, version, &mut want).await;
        dev.flush().await.unwrap();
        wait_applied(&node, leader_log_end(&cluster), Duration::from_secs(10)).await;
        check_image(&node, &want, blocks);
        drop(node);
        cluster.stop_replica(follower).await.unwrap();
        cluster.start_replica(follower).await.unwrap();
        write_range(&dev, 70..90, version + 1, &mut want).await;
        dev.flush().await.unwrap();
        let node = cluster.node(follower).unwrap();
        wait_applied(&node, leader_log_end(&cluster), Duration::from_secs(10)).await;
        check_image(&node, &want, blocks);
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// The cluster the stores of the snapshot tests belong to.
const CLUSTER: uuid::Uuid = uuid::Uuid::from_u128(0x5a95_0000_0000_0000_0000_0000_0000_0001);

/// A formatted store of `device_bytes` in `dir` (of cluster `cluster`), opened as a replica
/// (snapshots staged in `dir`, the store's volume).
fn replica_of(dir: &std::path::Path, device_bytes: u64, cluster: uuid::Uuid) -> Replica {
    let volume = DirVolume::open(dir, Backend::File).unwrap();
    let location =
        Location::Directory { volume: Arc::new(volume) as Arc<dyn Volume>, name: "xdb0".into() };
    if !dir.join("xdb0_snap_install").exists() {
        let format = FormatOptions {
            device_name: "xdb0".into(),
            device_bytes: Some(device_bytes),
            segment_bytes: 8 << 20,
            cluster_id: cluster,
            ..FormatOptions::default()
        };
        match Engine::format(&location, &format) {
            Ok(_) | Err(xdevice::storage::StorageError::AlreadyFormatted(_)) => {}
            Err(e) => panic!("format: {e}"),
        }
    }
    open_replica(&location, EngineConfig::default(), dir, DEFAULT_CACHE_BYTES).unwrap()
}

fn replica_in(dir: &std::path::Path, device_bytes: u64) -> Replica {
    replica_of(dir, device_bytes, CLUSTER)
}

/// Applies `lbas` written at `version` as log entry `index`, and records them in `want`.
fn apply(
    engine: &Engine,
    index: u64,
    lbas: std::ops::Range<u64>,
    version: u64,
    want: &mut Expected,
) {
    let ops = lbas
        .map(|lba| {
            want.insert(lba, version);
            BlockOp::Write { lba, data: block(lba, version).into() }
        })
        .collect();
    let id = StoreLogId { term: 1, node: 1, index };
    engine.apply_entries([(id, &EntryBody::Blocks(ops))]).unwrap();
}

/// Stages a snapshot of `source`'s live image on `target`'s volume; returns what it describes
/// and the bytes staged.
async fn stage_from(
    source: &Arc<Engine>,
    target: &Arc<Engine>,
    files: &SnapshotFiles,
) -> (Described, u64) {
    let applied = source.checkpoint().unwrap();
    let meta = SnapshotMeta {
        last_log_id: applied.log_id.map(from_store_log_id),
        last_membership: Default::default(),
    };
    let described = Described { meta, attachment: applied.attachment };
    let mut data = SnapshotData::Live(LiveStream::new(source.clone(), &described).unwrap());
    let staged = snapshot::stage(target, files, &Default::default(), &mut data).await.unwrap();
    (described, staged)
}

/// The files of device `xdb0` staged in `dir`.
fn files_in(dir: &std::path::Path) -> SnapshotFiles {
    let volume = DirVolume::open(dir, Backend::File).unwrap();
    SnapshotFiles::new(Arc::new(volume), "xdb0")
}

/// A crash after the install intent is durable but before the install ran: opening the replica
/// finishes the install. Damaged or foreign snapshots are refused with the reason.
#[test]
fn interrupted_snapshot_install_is_redone_on_open() {
    runtime().block_on(async {
        let src_dir = tempfile::tempdir().unwrap();
        let dst_dir = tempfile::tempdir().unwrap();
        let device_bytes = 16u64 << 20;
        let blocks = device_bytes / BS as u64;
        let source = replica_in(src_dir.path(), device_bytes).engine;
        let mut want = Expected::new();
        apply(&source, 1, 0..300, 1, &mut want);
        apply(&source, 2, 1000..1100, 2, &mut want);
        apply(&source, 3, blocks - 10..blocks, 3, &mut want);
        source.image().zero_blocks(1050, 20).unwrap();
        want.retain(|lba, _| !(1050..1070).contains(lba));
        // Member 2 attaches at index 4: the snapshot carries the attachment with the image.
        let attach = StoreLogId { term: 1, node: 1, index: 4 };
        source.apply_entries([(attach, &EntryBody::Attach(2))]).unwrap();

        // The receiver holds data of its own where the snapshot has none: it must read as zeros.
        let target = replica_in(dst_dir.path(), device_bytes);
        let mut theirs = Expected::new();
        apply(&target.engine, 1, 2000..2100, 9, &mut theirs);
        target.engine.checkpoint().unwrap();
        let files = files_in(dst_dir.path());
        let (described, staged) = stage_from(&source, &target.engine, &files).await;
        assert_eq!(described.attachment, Some(Attachment { epoch: 4, node: 2 }));
        let meta = described.meta.clone();
        let dest = Target::of(&target.engine);
        assert_eq!(snapshot::verify(&files, staged, dest).unwrap(), described);
        snapshot::record_intent(&target.engine, &files).unwrap();
        assert!(files.present(&files.installing()).unwrap());
        assert!(!files.present(&files.staging()).unwrap());
        // Crash: the install never runs.
        target.engine.close().unwrap();
        drop(target);

        let reopened = replica_in(dst_dir.path(), device_bytes);
        assert!(!files.present(&files.installing()).unwrap(), "the intent is removed once redone");
        let applied = reopened.engine.applied().log_id.map(from_store_log_id);
        assert_eq!(applied, meta.last_log_id);
        let check_engine = |engine: &Arc<Engine>, want: &Expected| {
            let mut img = vec![0u8; 256 * BS];
            for first in (0..blocks).step_by(256) {
                engine.image().read_blocks(first, &mut img).unwrap();
                for lba in first..first + 256 {
                    let got = &img[(lba - first) as usize * BS..][..BS];
                    let expect = want.get(&lba).map_or(vec![0u8; BS], |v| block(lba, *v));
                    assert!(got == expect, "lba {lba} differs from the source");
                }
            }
        };
        check_engine(&reopened.engine, &want);
        check_engine(&source, &want);
        // The attachment came with the image: the receiver fences what its leader fences.
        assert_eq!(reopened.engine.attachment(), Some(Attachment { epoch: 4, node: 2 }));
        let stale = vec![BlockOp::Write { lba: 0, data: block(0, 7).into() }];
        let stale_id = StoreLogId { term: 1, node: 1, index: 5 };
        reopened.engine.apply_entries([(stale_id, &EntryBody::Fenced(1, stale))]).unwrap();
        assert_eq!(reopened.engine.fenced_writes(), 1);
        check_engine(&reopened.engine, &want);
        reopened.engine.close().unwrap();
        drop(reopened);
        // Durable: a second open finds the same image and no intent to redo.
        let again = replica_in(dst_dir.path(), device_bytes);
        check_engine(&again.engine, &want);

        // One flipped byte in chunk 5's data is refused, naming the chunk.
        let (_, staged) = stage_from(&source, &again.engine, &files).await;
        let at = snapshot::record_bytes(BS as u32) * 6 + snapshot::RECORD_HEAD + 12345;
        let path = dst_dir.path().join(files.staging());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at as usize] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let e = snapshot::verify(&files, staged, dest).unwrap_err();
        assert!(e.contains("chunk 5") && e.contains("checksum"), "{e}");

        // A snapshot of a differently sized device is refused as such, not for its length.
        let (_, staged) = stage_from(&source, &again.engine, &files).await;
        let small =
            Target { shape: Shape { block_bytes: BS as u32, device_bytes: 8 << 20 }, ..dest };
        let e = snapshot::verify(&files, staged, small).unwrap_err();
        assert!(e.contains("16777216-byte device") && e.contains("8388608-byte device"), "{e}");
        // A short stream is refused for its length.
        let e = snapshot::verify(&files, staged - 4096, dest).unwrap_err();
        assert!(e.contains("a complete one is"), "{e}");

        // A snapshot of another cluster's device is refused while it is staged, naming both
        // clusters, and the receiver's image is untouched.
        let other_dir = tempfile::tempdir().unwrap();
        let other = uuid::Uuid::from_u128(0x07e4);
        let foreign = replica_of(other_dir.path(), device_bytes, other).engine;
        apply(&foreign, 1, 0..10, 5, &mut Expected::new());
        let applied = foreign.checkpoint().unwrap();
        let described = Described {
            meta: SnapshotMeta {
                last_log_id: applied.log_id.map(from_store_log_id),
                last_membership: Default::default(),
            },
            attachment: None,
        };
        let mut data = SnapshotData::Live(LiveStream::new(foreign.clone(), &described).unwrap());
        let e = snapshot::stage(&again.engine, &files, &Default::default(), &mut data)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&other.to_string()) && e.contains(&CLUSTER.to_string()), "{e}");
        assert!(e.contains("another device"), "{e}");
        check_engine(&again.engine, &want);
        foreign.close().unwrap();
        again.engine.close().unwrap();
        source.close().unwrap();
    });
}

/// A write larger than one proposal is split into proposals in order, and reads back whole.
#[test]
fn a_write_larger_than_a_proposal_is_split_and_reads_back() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Embedded::start(options(dir.path())).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let blocks = cluster.device_bytes() / BS as u64;
        let mut cfg = DeviceConfig::new(BS as u32, blocks, CacheMode::Writethrough);
        cfg.max_proposal_bytes = 64 << 10;
        let dev = Device::start(cfg, cluster.clone());
        let data: Vec<u8> = (0..256u64).flat_map(|lba| block(lba, 7)).collect();
        dev.write(0, &data, false).await.unwrap();
        let stats = dev.stats();
        assert_eq!(stats.writes, 1);
        assert!(stats.proposals >= 16, "1 MiB in 64 KiB proposals: {stats:?}");
        assert_eq!(dev.read(0, data.len() as u64).await.unwrap(), data);
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}
