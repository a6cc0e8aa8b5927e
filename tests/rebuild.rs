//! A lost embedded replica rebuilt from the others: each replica in a directory of its own, one
//! directory's files removed while the device serves (it keeps serving), and on restart the
//! replica is made anew under a new node id, caught up, and made a voter in place of the lost
//! one; its image then holds every write. Without a majority of stores nothing starts.

#![allow(clippy::unwrap_used)]

mod common;

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use xdevice::device::local::{Embedded, EmbeddedOptions};
use xdevice::device::{CacheMode, Device, DeviceConfig};

const BS: usize = 4096;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

fn options(base: &std::path::Path) -> EmbeddedOptions {
    let mut opts = common::embedded_options(&base.join("data"), 3);
    opts.replica_dirs = (1..=3).map(|i| base.join(format!("disk{i}"))).collect();
    opts.rebuild_lost = true;
    opts
}

fn block(lba: u64, version: u8) -> Vec<u8> {
    let mut b = vec![version; BS];
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b
}

fn device(cluster: &Arc<Embedded>) -> Arc<Device> {
    let blocks = cluster.device_bytes() / BS as u64;
    Device::start(DeviceConfig::new(BS as u32, blocks, CacheMode::Writeback), cluster.clone())
}

/// Waits until slot `slot`'s replica has applied what its leader has, then checks its image.
async fn image_holds(cluster: &Embedded, slot: u64, want: &[(u64, Vec<u8>)]) {
    let node = cluster.node(slot).unwrap();
    let leader = cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
    let target = leader.raft.metrics().borrow_watched().last_log_index.unwrap_or(0);
    let mut rx = node.raft.metrics();
    tokio::time::timeout(Duration::from_secs(30), async {
        while rx.borrow_watched().last_applied.map_or(0, |l| l.index) < target {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the rebuilt replica caught up");
    let mut got = vec![0u8; BS];
    for (lba, data) in want {
        node.engine.image().read_blocks(*lba, &mut got).unwrap();
        assert!(&got == data, "replica {slot} (node {}): block {lba} differs", node.id);
    }
}

#[test]
fn a_replica_whose_directory_is_removed_is_rebuilt_on_restart() {
    runtime().block_on(async {
        let base = tempfile::tempdir().unwrap();
        let opts = options(base.path());
        let cluster = Embedded::start(opts.clone()).await.unwrap();
        let dev = device(&cluster);
        let mut want = Vec::new();
        for lba in 0..64u64 {
            dev.write(lba * BS as u64, &block(lba, 1), false).await.unwrap();
            want.push((lba, block(lba, 1)));
        }
        dev.flush().await.unwrap();

        // Replica 2's disk is lost while the device serves: it keeps serving.
        std::fs::remove_dir_all(base.path().join("disk2")).unwrap();
        std::fs::create_dir(base.path().join("disk2")).unwrap();
        for lba in 64..128u64 {
            dev.write(lba * BS as u64, &block(lba, 2), true).await.unwrap();
            want.push((lba, block(lba, 2)));
        }
        dev.flush().await.unwrap();
        assert_eq!(dev.read(64 * BS as u64, BS as u64).await.unwrap(), block(64, 2));
        dev.close();
        cluster.shutdown().await.unwrap();
        drop(cluster);

        // Restart: replica 2 is rebuilt under a new id, caught up, and a voter.
        let cluster = Embedded::start(opts.clone()).await.unwrap();
        assert_eq!(cluster.node_id(2), 4, "the rebuilt replica's node id");
        assert_eq!((cluster.node_id(1), cluster.node_id(3)), (1, 3));
        image_holds(&cluster, 2, &want).await;
        let leader = cluster.wait_leader(Duration::from_secs(10)).await.unwrap();
        let voters: Vec<u64> = leader
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        assert_eq!(voters, vec![1, 3, 4]);
        // The device serves on the rebuilt cluster.
        let dev = device(&cluster);
        assert_eq!(dev.read(5 * BS as u64, BS as u64).await.unwrap(), block(5, 1));
        dev.write(200 * BS as u64, &block(200, 3), true).await.unwrap();
        want.push((200, block(200, 3)));
        dev.close();
        cluster.shutdown().await.unwrap();
        drop(cluster);

        // A second restart finds every store: nothing to rebuild, the same ids.
        let cluster = Embedded::start(opts.clone()).await.unwrap();
        assert_eq!((cluster.node_id(1), cluster.node_id(2), cluster.node_id(3)), (1, 4, 3));
        image_holds(&cluster, 2, &want).await;
        cluster.shutdown().await.unwrap();
        drop(cluster);

        // Two of three disks lost: not a majority; refused, nothing formatted.
        for d in ["disk1", "disk3"] {
            std::fs::remove_dir_all(base.path().join(d)).unwrap();
            std::fs::create_dir(base.path().join(d)).unwrap();
        }
        let err = Embedded::start(opts).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("not a majority") && msg.contains("disk1"), "{msg}");
        assert_eq!(
            std::fs::read_dir(base.path().join("disk1")).unwrap().count(),
            0,
            "disk1 was written"
        );
    });
}
