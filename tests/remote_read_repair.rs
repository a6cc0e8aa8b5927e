//! Checksum repair in the remote mode, on three `xdevice node` processes on 127.0.0.21-23: a
//! byte flipped in the leader's image is detected on a read through the device, the block is
//! read from another node and the leader's copy rewritten; a block damaged on every node fails
//! the read, naming the block, and never returns made-up data. Also the node's side of the
//! protocol: a damaged block is listed, never answered as data; a `REPAIR` with data its
//! checksum table does not promise is refused; malformed requests are refused with an error.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::node::{free_addr, NodeProc};

use xdevice::device::remote::RemoteCluster;
use xdevice::device::{CacheMode, Device, DeviceConfig, DeviceError};
use xdevice::net::rpc::CODE_MALFORMED;
use xdevice::net::{ClientOptions, RpcClient, RpcError};
use xdevice::replication::tcp::{
    Admin, AdminReply, BadBlockReport, ErrorCode, LocalRead, NodeStatus, Repair, KIND_READ,
    KIND_READ_LOCAL, KIND_REPAIR,
};
use xdevice::storage::image::block_checksum;

const BS: usize = 4096;
const DEVICE: u64 = 16 << 20;
const BLOCKS: u64 = 32;

/// Node `id` of the three, formatted for `cluster` and started on 127.0.0.(20 + id).
fn node(base: &Path, id: u64, cluster: &uuid::Uuid) -> NodeProc {
    let addr = free_addr(&format!("127.0.0.{}", 20 + id));
    let mut p = NodeProc::format(base, id, cluster, "16M", addr, &[]);
    p.start();
    p
}

/// Flips one byte of block `lba` in node `p`'s image file.
fn flip_byte(p: &NodeProc, lba: u64) {
    common::flip_image_byte(&p.dir, DEVICE, BS as u32, lba);
}

async fn statuses(procs: &[NodeProc], cluster: uuid::Uuid) -> Vec<NodeStatus> {
    let mut out = Vec::new();
    for p in procs {
        if let Ok(AdminReply::Status(s)) =
            p.client(cluster).admin(Admin::Status, Duration::from_millis(500)).await
        {
            out.push(*s);
        }
    }
    out
}

/// Waits until one node leads and every node has applied as far as it; the leader's status.
async fn converged(procs: &[NodeProc], cluster: uuid::Uuid) -> NodeStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = statuses(procs, cluster).await;
        let leader = all.iter().filter(|s| s.state == "Leader").max_by_key(|s| s.term);
        if let Some(l) = leader {
            if all.len() == procs.len()
                && l.last_applied.is_some()
                && all.iter().all(|s| s.last_applied == l.last_applied)
            {
                return l.clone();
            }
        }
        assert!(Instant::now() < deadline, "the nodes did not converge: {all:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Block `lba` as written: its number, then bytes derived from it.
fn block(lba: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    let mut x = lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in b.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    b[..8].copy_from_slice(&lba.to_le_bytes());
    b
}

fn device(addrs: &[SocketAddr], node: &NodeProc) -> std::sync::Arc<Device> {
    let security = node.security();
    let remote = RemoteCluster::new(addrs, None, node.cluster, &security, Duration::from_secs(5));
    let mut cfg = DeviceConfig::new(BS as u32, DEVICE / BS as u64, CacheMode::Writethrough);
    cfg.io_timeout = Duration::from_secs(30);
    // Only the blocks asked for are read, so the counters count only them.
    cfg.readahead_bytes = 0;
    Device::start(cfg, remote)
}

#[test]
fn a_damaged_block_on_the_leader_is_read_from_a_follower_and_repaired() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let base = tempfile::tempdir().unwrap();
        let cluster = uuid::Uuid::new_v4();
        let procs: Vec<NodeProc> = (1..=3).map(|id| node(base.path(), id, &cluster)).collect();
        let members: Vec<(u64, String)> =
            procs.iter().map(|p| (p.id, p.addr.to_string())).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let init = Admin::Init(members.clone());
            match procs[0].admin_client(cluster).admin(init, Duration::from_secs(5)).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "init: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();

        let data: Vec<u8> = (0..BLOCKS).flat_map(block).collect();
        let dev = device(&addrs, &procs[0]);
        dev.write(0, &data, false).await.unwrap();
        dev.flush().await.unwrap();
        dev.close();
        let status = converged(&procs, cluster).await;
        let applied = status.last_applied.unwrap();
        let leader = procs.iter().find(|p| p.id == status.id).unwrap();
        let lc = leader.client(cluster);
        let t = Duration::from_secs(5);

        // The leader's copy of block 5 is damaged. Its own image lists the block instead of
        // answering its bytes.
        flip_byte(leader, 5);
        let r = lc.read_local(LocalRead { lba: 4, blocks: 2, applied_at_least: 0 }, t).await;
        let r = r.unwrap();
        assert!(r.applied >= applied);
        let [BadBlockReport { lba, expected, found }] = r.bad[..] else { panic!("{:?}", r.bad) };
        assert_eq!((lba, expected), (5, block_checksum(5, &block(5))));
        assert_ne!(found, expected);
        assert_eq!(&r.data[..BS], &block(4)[..]);
        assert_eq!(&r.data[BS..], &[0u8; BS][..], "a damaged block is never answered as data");

        // A repair with anything but what the checksum table promises changes nothing.
        let mut other = block(5);
        other[0] ^= 1;
        let refused = lc.repair(Repair { lba: 5, data: other }, t).await.unwrap();
        assert!(!refused, "a repair with other data was accepted");
        let short = lc.repair(Repair { lba: 5, data: vec![0; 100] }, t).await.unwrap_err().message;
        assert!(short.contains("block"), "{short}");
        let far = lc.repair(Repair { lba: 1 << 40, data: block(5) }, t).await.unwrap_err().message;
        assert!(far.contains("beyond"), "{far}");
        // A node that has not applied as far as asked refuses a local read.
        let ahead = LocalRead { lba: 5, blocks: 1, applied_at_least: applied + 1_000_000 };
        let behind = lc.read_local(ahead, t).await.unwrap_err().message;
        assert!(behind.contains("has applied"), "{behind}");
        // Malformed and oversized requests are refused as malformed (each closes its own
        // connection), and the node lives on.
        for kind in [KIND_READ, KIND_READ_LOCAL, KIND_REPAIR] {
            let options = ClientOptions { security: leader.security(), ..Default::default() };
            let rpc = RpcClient::new(leader.addr, None, cluster, 0, options);
            match rpc.call(kind, vec![0xff; 3], t).await {
                Err(RpcError::Remote { code, message }) => {
                    assert_eq!(code, CODE_MALFORMED, "kind {kind}: {message}");
                    assert!(message.contains("malformed"), "kind {kind}: {message}");
                }
                other => panic!("kind {kind}: {other:?}"),
            }
        }
        let huge = LocalRead { lba: 0, blocks: u64::MAX / 2, applied_at_least: 0 };
        let e = leader.client(cluster).read_local(huge, t).await.unwrap_err();
        assert_eq!(e.code, Some(ErrorCode::Malformed), "{e}");
        assert!(e.message.contains("a read of 9223372036854775807 blocks"), "{e}");

        // Read through a fresh device (nothing cached): exactly what was written, the block
        // taken from a follower and the leader's copy rewritten.
        let dev = device(&addrs, &procs[0]);
        assert_eq!(dev.read(0, data.len() as u64).await.unwrap(), data, "never wrong data");
        assert_eq!(dev.stats().corrupt_blocks, 1);
        assert_eq!(dev.stats().repaired_blocks, 1);
        dev.close();
        let r = lc.read_local(LocalRead { lba: 5, blocks: 1, applied_at_least: 0 }, t).await;
        let r = r.unwrap();
        assert!(r.bad.is_empty(), "the leader's copy is still damaged: {:?}", r.bad);
        assert_eq!(r.data, block(5), "the leader's copy was rewritten");
        let log = leader.log();
        assert!(log.contains("data block fails its checksum"), "{log}");
        assert!(log.contains("data block repaired from another replica"), "{log}");

        // Damaged on every node: the read fails, naming the block; nothing is made up.
        for p in &procs {
            flip_byte(p, 9);
        }
        let dev = device(&addrs, &procs[0]);
        let err = dev.read(8 * BS as u64, 2 * BS as u64).await.unwrap_err();
        let DeviceError::Read(msg) = &err else { panic!("{err:?}") };
        assert!(msg.contains("lba 9") && msg.contains("no other replica"), "{msg}");
        println!("damaged everywhere: {msg}");
        assert_eq!(dev.stats().corrupt_blocks, 0, "counted only when the read succeeds");
        // The other blocks still read.
        assert_eq!(dev.read(0, 9 * BS as u64).await.unwrap(), data[..9 * BS]);
        dev.close();
        // The leader did not change under the test (the damage was where the reads went).
        assert_eq!(converged(&procs, cluster).await.id, status.id);
    });
}
