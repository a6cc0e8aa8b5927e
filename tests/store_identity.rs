//! Stores that cannot be mixed up, on real directories and `xdevice` processes on 127.0.0.x:
//! a second process on a live store, a store started as another node, a node of another cluster
//! (or answering as another id) added to a membership, and `format` over files or a device that
//! hold something else are each refused with a message naming the problem, and nothing changes.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::node::{free_addr, xdevice_bin, NodeProc};

use xdevice::replication::tcp::{Admin, AdminReply, NodeStatus};
use xdevice::storage::disk::{Backend, DirVolume, Volume};
use xdevice::storage::engine::{describe_signature, Engine, EngineConfig, FormatOptions};
use xdevice::storage::layout::Location;
use xdevice::storage::StorageError;

fn xdevice(args: &[&str]) -> Output {
    Command::new(xdevice_bin()).args(args).output().unwrap()
}

/// The command failed and said `needle` on stderr.
fn refused(out: &Output, needle: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a refusal, got success: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}:\n{stderr}");
    stderr
}

/// `xdevice inspect --json` of the store in `dir`: its superblock.
fn superblock(dir: &Path) -> serde_json::Value {
    let out = xdevice(&["inspect", "--json", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "inspect: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    report["superblock"].clone()
}

/// Every file in `dir` with its length and modification time: what "nothing changed" compares.
fn listing(dir: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (e.file_name().to_string_lossy().to_string(), m.len(), m.modified().unwrap())
        })
        .collect();
    files.sort();
    files
}

async fn status(p: &NodeProc, cluster: uuid::Uuid) -> Result<NodeStatus, String> {
    match p.client(cluster).admin(Admin::Status, Duration::from_secs(2)).await? {
        AdminReply::Status(s) => Ok(*s),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// Waits until node `p` answers a status request.
async fn answering(p: &NodeProc, cluster: uuid::Uuid) -> NodeStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match status(p, cluster).await {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "node {} never answered: {e}", p.id),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap()
}

#[test]
fn a_second_process_on_a_live_store_is_refused_naming_the_holder() {
    let base = tempfile::tempdir().unwrap();
    let cluster = uuid::Uuid::new_v4();
    let mut first = NodeProc::format(base.path(), 1, &cluster, "64M", free_addr("127.0.0.1"), &[]);
    first.start();
    let pid = first.child.as_ref().unwrap().id();
    runtime().block_on(async {
        answering(&first, cluster).await;
        let before = superblock(&first.dir);
        let lock = first.dir.join("xdb0.lock");
        assert_eq!(std::fs::read_to_string(&lock).unwrap().trim(), pid.to_string());
        let dir = first.dir.to_str().unwrap().to_string();
        let other = free_addr("127.0.0.1").to_string();
        let out = xdevice(&["node", "--plaintext", "--id", "1", "--listen", &other, "--dir", &dir]);
        let said = refused(&out, &format!("in use by pid {pid}"));
        assert!(said.contains("store in use"), "{said}");
        // `format --force` on the live store is refused the same way (force never overrides a
        // store, let alone one in use).
        let out = xdevice(&["format", "--force", "--size", "64M", "--dir", &dir]);
        refused(&out, "in use by pid");
        assert_eq!(superblock(&first.dir), before, "the superblock changed");
        assert_eq!(std::fs::read_to_string(&lock).unwrap().trim(), pid.to_string());
        let s = status(&first, cluster).await.unwrap();
        assert_eq!(s.id, 1, "the first node still serves");
    });
    first.stop();
    // Once it stopped, the store opens again.
    first.start();
    runtime().block_on(answering(&first, cluster));
    first.stop();
}

#[test]
fn a_store_is_never_started_as_another_node() {
    let base = tempfile::tempdir().unwrap();
    let cluster = uuid::Uuid::new_v4();
    let mut node = NodeProc::format(base.path(), 1, &cluster, "64M", free_addr("127.0.0.1"), &[]);
    assert_eq!(superblock(&node.dir)["node_id"], 0, "format without --node-id binds nothing");
    // The first start binds the store to node 1.
    node.start();
    runtime().block_on(answering(&node, cluster));
    node.stop();
    let bound = superblock(&node.dir);
    assert_eq!(bound["node_id"], 1);
    let before = listing(&node.dir);
    let dir = node.dir.to_str().unwrap().to_string();
    let addr = free_addr("127.0.0.1").to_string();
    let out = xdevice(&["node", "--plaintext", "--id", "2", "--listen", &addr, "--dir", &dir]);
    let said = refused(&out, "is the store of node 1 of cluster");
    assert!(said.contains(&cluster.to_string()) && said.contains("as node 2"), "{said}");
    assert_eq!(superblock(&node.dir), bound, "the superblock changed");
    // The lock file names the last process that held the store (the refused one, which held it
    // while it read the superblock): everything else stays as it was.
    let kept = |f: &(String, u64, std::time::SystemTime)| f.0 != "node.log" && f.0 != "xdb0.lock";
    let now: Vec<_> = listing(&node.dir).into_iter().filter(kept).collect();
    let then: Vec<_> = before.into_iter().filter(kept).collect();
    assert_eq!(now, then, "the store's files changed");

    // `format --node-id` binds at once.
    let named = base.path().join("named");
    let out =
        xdevice(&["format", "--size", "64M", "--node-id", "5", "--dir", named.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(superblock(&named)["node_id"], 5);
    let out = xdevice(&[
        "node",
        "--plaintext",
        "--id",
        "4",
        "--listen",
        &addr,
        "--dir",
        named.to_str().unwrap(),
    ]);
    refused(&out, "is the store of node 5");
    let out = xdevice(&["format", "--size", "64M", "--node-id", "0", "--dir", "/nonexistent"]);
    refused(&out, "--node-id must be greater than 0");
}

#[test]
fn a_node_of_another_cluster_or_another_id_is_never_added() {
    never_added(false);
}

/// The same over plaintext: the checks behind the certificates' still hold (the cluster id on
/// every frame, the node's own answer to who it is).
#[test]
fn a_node_of_another_cluster_or_another_id_is_never_added_over_plaintext() {
    never_added(true);
}

fn never_added(plaintext: bool) {
    let base = tempfile::tempdir().unwrap();
    let ours = uuid::Uuid::new_v4();
    let theirs = uuid::Uuid::new_v4();
    let a: &[&str] = if plaintext { &["--plaintext"] } else { &[] };
    let mut leader = NodeProc::format(base.path(), 1, &ours, "64M", free_addr("127.0.0.1"), a);
    let mut foreign = NodeProc::format(base.path(), 2, &theirs, "64M", free_addr("127.0.0.2"), a);
    let mut other_id = NodeProc::format(base.path(), 3, &ours, "64M", free_addr("127.0.0.3"), a);
    for p in [&mut leader, &mut foreign, &mut other_id] {
        p.start();
    }
    runtime().block_on(async {
        answering(&leader, ours).await;
        answering(&foreign, theirs).await;
        answering(&other_id, ours).await;
        let members = vec![(1, leader.addr.to_string())];
        match leader.admin_client(ours).admin(Admin::Init(members), Duration::from_secs(10)).await {
            Ok(_) => {}
            Err(e) => panic!("init: {e}"),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while status(&leader, ours).await.unwrap().state != "Leader" {
            assert!(Instant::now() < deadline, "node 1 never led");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = status(&leader, ours).await.unwrap();
        let node = leader.addr.to_string();
        let cluster = ours.to_string();
        let add = |id: &str, addr: String| {
            let tls: &[&str] = if plaintext {
                &["--plaintext"]
            } else {
                &["--tls-dir", leader.tls.to_str().unwrap()]
            };
            let args = [
                "cluster",
                "--node",
                node.as_str(),
                "--cluster-id",
                cluster.as_str(),
                "add",
                "--id",
                id,
                "--addr",
                addr.as_str(),
            ]
            .map(str::to_string);
            let args: Vec<String> = args[..1]
                .iter()
                .cloned()
                .chain(tls.iter().map(|s| s.to_string()))
                .chain(args[1..].iter().cloned())
                .collect();
            tokio::task::spawn_blocking(move || {
                Command::new(xdevice_bin()).args(&args).output().unwrap()
            })
        };
        // A node whose store belongs to another cluster: its certificate names a member of
        // that cluster, not of ours.
        let out = add("2", foreign.addr.to_string()).await.unwrap();
        let said = refused(&out, "cannot join cluster");
        if plaintext {
            // Its handshake refuses ours.
            assert!(said.contains("cluster id mismatch"), "{said}");
        } else {
            let names = format!("names no identity of cluster {ours}");
            assert!(said.contains("TLS handshake") && said.contains(&names), "{said}");
        }
        // A node of this cluster that is another node than the one named: under TLS its
        // certificate says so before its status could.
        let out = add("7", other_id.addr.to_string()).await.unwrap();
        if plaintext {
            refused(&out, "the node there is node 3");
        } else {
            refused(&out, "the server's certificate is for node 3, not 7");
        }
        let after = status(&leader, ours).await.unwrap();
        assert_eq!(
            (after.voters.clone(), after.learners.clone(), after.nodes.clone()),
            (before.voters.clone(), before.learners.clone(), before.nodes.clone()),
            "the membership changed"
        );
        assert_eq!(after.last_log_index, before.last_log_index, "something was proposed");
        // The foreign node was not touched either.
        let f = status(&foreign, theirs).await.unwrap();
        assert!(f.voters.is_empty() && f.leader.is_none(), "{f:?}");
    });
    for p in [&mut leader, &mut foreign, &mut other_id] {
        p.stop();
    }
}

#[test]
fn format_refuses_foreign_files_and_devices_unless_forced() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("d");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), b"not ours").unwrap();
    // Named like a store's file, but none: never taken for a leftover of an interrupted format.
    std::fs::write(dir.join("xdb0_notes"), b"not ours either").unwrap();
    std::fs::create_dir(dir.join("lost+found")).unwrap();
    let before = listing(&dir);
    let d = dir.to_str().unwrap();
    let out = xdevice(&["format", "--size", "64M", "--dir", d]);
    let said = refused(&out, "not an xdevice store");
    assert!(said.contains("notes.txt") && said.contains("--force"), "{said}");
    assert_eq!(listing(&dir), before, "a refused format changed the directory");
    let out = xdevice(&["format", "--force", "--size", "64M", "--dir", d]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"not ours");
    assert_eq!(std::fs::read(dir.join("xdb0_notes")).unwrap(), b"not ours either");
    // Without the stranger, a second device goes beside the first without --force: every file
    // there is xdevice's.
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    std::fs::remove_file(dir.join("xdb0_notes")).unwrap();
    let out = xdevice(&["format", "--size", "64M", "--name", "xdb1", "--dir", d]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A "device" (a file opened as a raw store) holding an ext4 superblock.
    let dev = base.path().join("disk");
    let mut bytes = vec![0u8; 64 << 20];
    bytes[1080..1082].copy_from_slice(&[0x53, 0xef]);
    std::fs::write(&dev, &bytes).unwrap();
    let p = dev.to_str().unwrap();
    let out = xdevice(&["format", "--segment-size", "1M", "--wal-slots", "4", "--device", p]);
    refused(&out, "an ext2/3/4 file system");
    assert_eq!(std::fs::read(&dev).unwrap(), bytes, "a refused format wrote to the device");
    let out =
        xdevice(&["format", "--force", "--segment-size", "1M", "--wal-slots", "4", "--device", p]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Formatted, it is an xdevice store: format refuses it even with --force.
    let out =
        xdevice(&["format", "--force", "--segment-size", "1M", "--wal-slots", "4", "--device", p]);
    refused(&out, "already holds an xdevice store");
    // A store whose every superblock copy is damaged is still a store: refused, even forced.
    let mut damaged = std::fs::read(&dev).unwrap();
    let len = damaged.len();
    for copy in [0, 4096, len - 8192, len - 4096] {
        damaged[copy + 100] ^= 0xff;
    }
    std::fs::write(&dev, &damaged).unwrap();
    let out =
        xdevice(&["format", "--force", "--segment-size", "1M", "--wal-slots", "4", "--device", p]);
    refused(&out, "checksum mismatch");
    assert_eq!(std::fs::read(&dev).unwrap(), damaged, "a damaged store was formatted over");
}

#[test]
fn signatures_are_named_and_zeros_are_not_data() {
    let mut head = vec![0u8; 1 << 20];
    assert_eq!(describe_signature(&head), None);
    head[0..4].copy_from_slice(b"XFSB");
    assert_eq!(describe_signature(&head).unwrap(), "an XFS file system");
    head[0..4].fill(0);
    head[512..520].copy_from_slice(b"EFI PART");
    assert_eq!(describe_signature(&head).unwrap(), "a GPT partition table");
    head[512..520].fill(0);
    head[4086..4096].copy_from_slice(b"SWAPSPACE2");
    assert_eq!(describe_signature(&head).unwrap(), "a swap area");
    head[4086..4096].fill(0);
    head[777_777] = 1;
    assert!(describe_signature(&head).unwrap().contains("offset 777777"));
}

/// The same rules inside one process, through the engine: a second open of a store this process
/// holds is refused, and the node id is checked before anything is written.
#[test]
fn the_engine_holds_its_store_and_checks_its_node() {
    let base = tempfile::tempdir().unwrap();
    let volume: std::sync::Arc<dyn Volume> =
        std::sync::Arc::new(DirVolume::open(base.path(), Backend::File).unwrap());
    let location = Location::Directory { volume, name: "xdb0".into() };
    let format = FormatOptions { device_bytes: Some(64 << 20), ..FormatOptions::default() };
    Engine::format(&location, &format).unwrap();
    let as_node = |id| EngineConfig { node_id: Some(id), ..EngineConfig::default() };
    let (engine, _) = Engine::open(&location, as_node(3)).unwrap();
    assert_eq!(engine.superblock().node_id, 3);
    let seq = engine.superblock().seq;
    match Engine::open(&location, as_node(3)) {
        Err(StorageError::InUse(why)) => {
            assert!(why.contains(&format!("pid {}", std::process::id())), "{why}")
        }
        other => panic!("a second open was not refused: {:?}", other.map(|_| ())),
    }
    drop(engine);
    match Engine::open(&location, as_node(4)) {
        Err(e @ StorageError::WrongNode { belongs: 3, asked: 4, .. }) => {
            assert!(e.to_string().contains("cannot be started as node 4"), "{e}")
        }
        other => panic!("node 4 opened node 3's store: {:?}", other.map(|_| ())),
    }
    let (engine, _) = Engine::open(&location, EngineConfig::default()).unwrap();
    assert_eq!(engine.superblock().seq, seq, "a refused open rewrote the superblock");
    assert_eq!(engine.superblock().node_id, 3);
}

/// The embedded mode never brings back a replica whose store is gone as a blank voter under its
/// old id: with one replica's directory emptied, the replica is formatted for a new node id,
/// caught up as a learner, and replaces the lost id among the voters; the lost id votes no more.
/// With a majority of stores gone, nothing is started or formatted (`tests/rebuild.rs`).
#[test]
fn a_lost_embedded_replica_comes_back_under_a_new_id_never_as_the_lost_voter() {
    use openraft::async_runtime::WatchReceiver;
    let base = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let opts = common::embedded_options(base.path(), 3);
        let cluster = xdevice::device::local::Embedded::start(opts.clone()).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        cluster.shutdown().await.unwrap();
        drop(cluster);
        let lost = base.path().join("replica-2");
        for f in std::fs::read_dir(&lost).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        // Not asked to rebuild (the disk may only be unmounted): refused, nothing formatted.
        let kept = listing(&base.path().join("replica-1"));
        let e = format!(
            "{:#}",
            xdevice::device::local::Embedded::start(opts.clone()).await.unwrap_err()
        );
        assert!(e.contains("replicas [2]") && e.contains("--rebuild"), "{e}");
        assert!(
            std::fs::read_dir(&lost).unwrap().next().is_none(),
            "the lost replica was formatted"
        );
        assert_eq!(listing(&base.path().join("replica-1")), kept, "replica 1 changed");
        let opts = xdevice::device::local::EmbeddedOptions { rebuild_lost: true, ..opts };
        let cluster = xdevice::device::local::Embedded::start(opts).await.unwrap();
        let location = xdevice::storage::layout::Location::Directory {
            volume: std::sync::Arc::new(
                xdevice::storage::disk::DirVolume::open(
                    &lost,
                    xdevice::storage::disk::Backend::File,
                )
                .unwrap(),
            ),
            name: "xdb0".into(),
        };
        cluster.shutdown().await.unwrap();
        let (engine, _) = Engine::open(&location, EngineConfig::default()).unwrap();
        assert_eq!(engine.superblock().node_id, 4, "the rebuilt store's node id");
        drop(engine);
        let cluster =
            xdevice::device::local::Embedded::start(common::embedded_options(base.path(), 3))
                .await
                .unwrap();
        let leader = cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let membership = leader.raft.metrics().borrow_watched().membership_config.clone();
        let voters: Vec<u64> = membership.membership().voter_ids().collect();
        assert_eq!(voters, vec![1, 3, 4], "node 2 is still a voter");
        assert!(
            membership.membership().get_node(&2).is_none(),
            "the lost node 2 is still a member"
        );
        cluster.shutdown().await.unwrap();
    });
}

/// Replicas on directories of their own (one per disk): the device serves from them, and a
/// restart with the directories swapped, or with one of another device's, is refused naming it.
#[test]
fn embedded_replicas_on_their_own_directories_are_checked_on_restart() {
    use xdevice::device::local::Embedded;
    use xdevice::device::{CacheMode, Device, DeviceConfig};
    let base = tempfile::tempdir().unwrap();
    let disks: Vec<_> = (1..=3).map(|i| base.path().join(format!("disk{i}"))).collect();
    let mut opts = common::embedded_options(&base.path().join("dev"), 3);
    opts.replica_dirs = disks.clone();
    runtime().block_on(async {
        let cluster = Embedded::start(opts.clone()).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let blocks = cluster.device_bytes() / 4096;
        let dev =
            Device::start(DeviceConfig::new(4096, blocks, CacheMode::Writeback), cluster.clone());
        dev.write(0, &[7u8; 8192], true).await.unwrap();
        dev.close();
        cluster.shutdown().await.unwrap();
        drop((dev, cluster));
        for disk in &disks {
            assert!(disk.join("xdb0_meta_superblock").exists(), "no store in {}", disk.display());
        }
        assert!(!base.path().join("dev/replica-1").exists(), "the default layout was used");

        // Replicas 1 and 2 swapped: replica 1 finds node 2's store.
        let mut swapped = opts.clone();
        swapped.replica_dirs.swap(0, 1);
        let e = format!("{:#}", Embedded::start(swapped).await.unwrap_err());
        assert!(e.contains("is the store of node 2") && e.contains("as node 1"), "{e}");

        // Replica 3's directory taken from another device.
        let other = base.path().join("other");
        let mut foreign = common::embedded_options(&other, 3);
        foreign.replica_dirs = (1..=3).map(|i| other.join(format!("d{i}"))).collect();
        let c = Embedded::start(foreign.clone()).await.unwrap();
        c.shutdown().await.unwrap();
        drop(c);
        let mut mixed = opts.clone();
        mixed.replica_dirs[2] = foreign.replica_dirs[2].clone();
        let e = format!("{:#}", Embedded::start(mixed).await.unwrap_err());
        assert!(e.contains("holds a replica of another device"), "{e}");

        // As made, it serves again with the write in place.
        let cluster = Embedded::start(opts).await.unwrap();
        cluster.wait_leader(Duration::from_secs(5)).await.unwrap();
        let dev =
            Device::start(DeviceConfig::new(4096, blocks, CacheMode::Writeback), cluster.clone());
        assert_eq!(dev.read(0, 8192).await.unwrap(), vec![7u8; 8192]);
        dev.close();
        cluster.shutdown().await.unwrap();
    });
}
