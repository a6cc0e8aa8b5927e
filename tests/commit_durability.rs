//! A write's completion is never reported before a majority of the replicas hold it durably,
//! and the leader counts toward that majority only once its own flush has completed, although
//! the followers receive the entry before that flush (overlapped log I/O).
//!
//! Three embedded replicas run on simulated disks (`SimVolume`), whose data syncs can be held
//! back: a held sync blocks as a slow device's flush does, and what it would make durable stays
//! pending. While a FUA write is in flight, the syncs of chosen replicas are held; a replica
//! "holds the write durably" when a copy of its disk with every pending write dropped (a power
//! loss now) recovers a log that reaches the write's entry.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use xdevice::device::local::Embedded;
use xdevice::device::{CacheMode, Device, DeviceConfig};
use xdevice::storage::disk::{SimVolume, Volume};
use xdevice::storage::engine::{Engine, EngineConfig};
use xdevice::storage::layout::Location;

const BS: usize = 4096;
/// How long a write that must not complete is watched.
const MUST_WAIT: Duration = Duration::from_millis(1500);
/// How long a write that may complete is given.
const MAY_COMPLETE: Duration = Duration::from_secs(20);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

fn block(lba: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&lba.to_le_bytes());
        chunk[8..].copy_from_slice(&(version ^ i as u64).to_le_bytes());
    }
    b
}

/// One past the last log index a replica's store recovers from `volume` as it is now: its
/// durable state only (`durable`), or with every pending write applied.
fn log_next(volume: &SimVolume, durable: bool) -> u64 {
    let image = if durable { volume.clean_image() } else { volume.volatile_image() };
    let location = Location::Directory { volume: image as Arc<dyn Volume>, name: "xdb0".into() };
    let (engine, _) = Engine::open(&location, EngineConfig::default()).unwrap();
    let next = engine.wal().bounds().next;
    engine.close().unwrap();
    next
}

struct Rig {
    _dir: tempfile::TempDir,
    cluster: Arc<Embedded>,
    dev: Arc<Device>,
    volumes: Vec<Arc<SimVolume>>,
}

impl Rig {
    async fn start() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let volumes: Vec<Arc<SimVolume>> =
            (1..=3).map(|id| SimVolume::new(&format!("replica-{id}"))).collect();
        let mut opts = common::embedded_options(dir.path(), 3);
        // A replica whose syncs are held still answers heartbeats; the long election timeout
        // keeps a busy machine from turning a held sync into a change of leader mid-test.
        opts.tuning.election_min = Duration::from_millis(1500);
        opts.tuning.election_max = Duration::from_millis(3000);
        let stores = volumes.iter().map(|v| v.clone() as Arc<dyn Volume>).collect();
        let cluster = Embedded::start_on(opts, stores).await.unwrap();
        cluster.wait_leader(Duration::from_secs(20)).await.unwrap();
        let blocks = cluster.device_bytes() / BS as u64;
        let dev = Device::start(
            DeviceConfig::new(BS as u32, blocks, CacheMode::Writeback),
            cluster.clone(),
        );
        // One write through, so the leader has committed in its term before the test starts.
        dev.write(0, &block(0, 0), true).await.unwrap();
        Rig { _dir: dir, cluster, dev, volumes }
    }

    /// The leader's id and its followers' ids.
    fn roles(&self) -> (u64, u64, u64) {
        let leader = self.cluster.leader().unwrap().id;
        let mut followers = (1..=3u64).filter(|&id| id != leader);
        (leader, followers.next().unwrap(), followers.next().unwrap())
    }

    fn volume(&self, id: u64) -> &SimVolume {
        &self.volumes[(id - 1) as usize]
    }

    /// Starts a FUA write of `block(lba, version)`; returns it and the log index its entry takes
    /// (one past the leader's log end before it).
    fn start_write(
        &self,
        leader: u64,
        lba: u64,
        version: u64,
    ) -> (tokio::task::JoinHandle<()>, u64) {
        let entry = log_next(self.volume(leader), false);
        let dev = self.dev.clone();
        let write = tokio::spawn(async move {
            dev.write(lba * BS as u64, &block(lba, version), true).await.unwrap();
        });
        (write, entry)
    }

    /// Which replicas hold log index `entry` durably now.
    fn durable_holders(&self, entry: u64) -> Vec<u64> {
        (1..=3u64).filter(|&id| log_next(self.volume(id), true) > entry).collect()
    }
}

impl Drop for Rig {
    /// A failed assertion must fail the test, not hang it on threads blocked in held syncs.
    fn drop(&mut self) {
        for volume in &self.volumes {
            volume.hold_syncs(false);
        }
    }
}

async fn completes(write: &mut tokio::task::JoinHandle<()>, within: Duration) -> bool {
    match tokio::time::timeout(within, write).await {
        Ok(joined) => {
            joined.unwrap();
            true
        }
        Err(_) => false,
    }
}

#[test]
fn completion_waits_for_a_durable_majority_counting_the_leader_after_its_flush() {
    runtime().block_on(async {
        let rig = Rig::start().await;
        let (leader, f1, f2) = rig.roles();

        // One follower's disk stalls: the leader and the other follower are a majority.
        rig.volume(f1).hold_syncs(true);
        let (mut write, entry) = rig.start_write(leader, 1, 1);
        assert!(completes(&mut write, MAY_COMPLETE).await, "a majority was available");
        let holders = rig.durable_holders(entry);
        assert!(
            holders.contains(&leader) && holders.contains(&f2),
            "completed with entry {entry} durable only on {holders:?} (leader {leader}, \
             follower {f2} not stalled)"
        );
        assert!(!holders.contains(&f1), "replica {f1}'s syncs are held, yet it is durable");

        // Now the leader's disk stalls too: at most one replica (f2) can hold the next write
        // durably, and the leader's own copy, written but not flushed, must not count. The
        // entry reaches f2 durably while the leader's sync is still held: replication does not
        // wait for the leader's own flush (the two overlap).
        rig.volume(leader).hold_syncs(true);
        let (mut write, entry) = rig.start_write(leader, 2, 1);
        let overlap_by = tokio::time::Instant::now() + MAY_COMPLETE;
        while rig.durable_holders(entry) != vec![f2] {
            assert!(
                tokio::time::Instant::now() < overlap_by,
                "entry {entry} never became durable on follower {f2} while the leader's sync \
                 was held (durable on {:?})",
                rig.durable_holders(entry)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !completes(&mut write, MUST_WAIT).await,
            "a write completed while only replica {f2} held it durably"
        );
        let holders = rig.durable_holders(entry);
        assert_eq!(holders, vec![f2], "durable on {holders:?}");
        assert!(
            log_next(rig.volume(leader), false) > entry,
            "the leader has not even written entry {entry}: the stall was not exercised"
        );
        // The leader's flush completes: leader + f2 are a durable majority.
        rig.volume(leader).hold_syncs(false);
        assert!(completes(&mut write, MAY_COMPLETE).await, "the leader's flush completed");
        let holders = rig.durable_holders(entry);
        assert!(
            holders.contains(&leader) && holders.contains(&f2),
            "completed with entry {entry} durable only on {holders:?}"
        );

        // Both followers stall: the leader's durable copy alone is not a majority.
        rig.volume(f2).hold_syncs(true);
        let (mut write, entry) = rig.start_write(leader, 3, 1);
        assert!(
            !completes(&mut write, MUST_WAIT).await,
            "a write completed while only the leader held it durably"
        );
        assert_eq!(rig.durable_holders(entry), vec![leader], "only the leader can be durable");
        rig.volume(f2).hold_syncs(false);
        assert!(completes(&mut write, MAY_COMPLETE).await, "follower {f2}'s flush completed");
        let holders = rig.durable_holders(entry);
        assert!(holders.contains(&leader) && holders.contains(&f2), "durable on {holders:?}");

        // The stalled follower catches up, and every write reads back.
        rig.volume(f1).hold_syncs(false);
        rig.dev.flush().await.unwrap();
        for lba in 1..=3u64 {
            let got = rig.dev.read(lba * BS as u64, BS as u64).await.unwrap();
            assert_eq!(got, block(lba, 1), "block {lba}");
        }
        assert_eq!(rig.cluster.leader().unwrap().id, leader, "leadership moved mid-test");
        rig.dev.close();
        rig.cluster.shutdown().await.unwrap();
    });
}
