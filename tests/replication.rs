//! Replication in one process: three replicas through in-process channels, the device API on
//! top, faults injected by cutting a replica's links or stopping it.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use xdevice::device::local::{Embedded, EmbeddedOptions};
use xdevice::device::{CacheMode, Device, DeviceConfig};
use xdevice::replication::node::RaftTuning;
use xdevice::storage::disk::Backend;
use xdevice::storage::engine::{EngineConfig, FormatOptions};

const BS: usize = 4096;

fn options(dir: &std::path::Path) -> EmbeddedOptions {
    EmbeddedOptions {
        dir: dir.to_path_buf(),
        replicas: 3,
        format: FormatOptions {
            device_name: "xdb0".into(),
            device_bytes: Some(16 << 20),
            segment_bytes: 8 << 20,
            ..FormatOptions::default()
        },
        engine: EngineConfig::default(),
        backend: Backend::File,
        tuning: RaftTuning { snapshot_segments: 3, keep_entries: 16, ..RaftTuning::default() },
    }
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
        let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let commit = leader.raft.metrics().borrow().last_applied.unwrap().index;
        for node in cluster.running() {
            let mut rx = node.raft.metrics();
            let deadline = Instant::now() + Duration::from_secs(5);
            while rx.borrow().last_applied.map(|l| l.index) < Some(commit) {
                assert!(Instant::now() < deadline, "node {} did not apply", node.id);
                tokio::time::timeout(Duration::from_millis(100), rx.changed()).await.ok();
            }
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
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("beyond"), "{e}");
        let e = dev.read(100, BS as u64).await.unwrap_err();
        assert!(e.to_string().contains("aligned"), "{e}");
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}

/// Cut the leader off under a write load; the flushed data survives, a new leader takes over
/// within twice the election timeout, and the old leader catches up once reconnected.
#[test]
fn leader_isolation_fails_over_and_loses_no_flushed_write() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(dir.path());
        let election = opts.tuning.election_max;
        let cluster = Embedded::start(opts).await.unwrap();
        let dev = device(&cluster, CacheMode::Writeback).await;
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
