//! Three `xdevice node` processes on mutual TLS, attacked from outside: a caller with no
//! certificate, with a certificate of another cluster's CA, or with a member certificate claiming
//! another node's id cannot vote, send entries, write or join; garbage, truncated, oversized and
//! malformed frames sent to the peer port by an authenticated caller close that caller's
//! connection only. Through all of it the cluster keeps its leader and term, changes no data, and
//! goes on serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::node::{free_addr, xdevice_bin, NodeProc, CLIENT_ID};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use xdevice::device::remote::RemoteCluster;
use xdevice::device::{CacheMode, Device, DeviceConfig};
use xdevice::net::frame::{encode, Frame, HEADER_BYTES};
use xdevice::net::rpc::{Hello, KIND_HELLO, PROTOCOL_VERSION};
use xdevice::net::tls::{create_dev, Identity, Tls, TlsFiles};
use xdevice::net::{ClientOptions, RpcClient, RpcError, Security};
use xdevice::replication::network::RaftRpc;
use xdevice::replication::tcp::{Admin, AdminReply, NodeRequest, NodeStatus, KIND_RAFT};
use xdevice::replication::types::{log_id, Entry, Vote};

const BS: usize = 4096;
const T: Duration = Duration::from_secs(5);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn status(p: &NodeProc) -> Option<NodeStatus> {
    match p.client(p.cluster).admin(Admin::Status, Duration::from_millis(500)).await {
        Ok(AdminReply::Status(s)) => Some(*s),
        _ => None,
    }
}

/// Three voters, initialised, with a leader every node agrees on: that status.
async fn cluster(base: &Path, cluster: uuid::Uuid) -> (Vec<NodeProc>, NodeStatus) {
    let mut procs: Vec<NodeProc> = (1..=3u64)
        .map(|id| {
            let addr = free_addr(&format!("127.0.0.{}", 60 + id));
            NodeProc::format(base, id, &cluster, "16M", addr, &[])
        })
        .collect();
    for p in &mut procs {
        p.start();
    }
    let members: Vec<(u64, String)> = procs.iter().map(|p| (p.id, p.addr.to_string())).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let init = procs[0].admin_client(cluster).admin(Admin::Init(members.clone()), T).await;
        if init.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "init: {init:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = agreed(&procs_ref(&procs)).await;
    (procs, leader)
}

fn procs_ref(procs: &[NodeProc]) -> Vec<&NodeProc> {
    procs.iter().collect()
}

/// The status of the leader once every node names it in the same term.
async fn agreed(procs: &[&NodeProc]) -> NodeStatus {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut all = Vec::new();
        for p in procs {
            if let Some(s) = status(p).await {
                all.push(s);
            }
        }
        let leader = all.iter().find(|s| s.state == "Leader").cloned();
        if let Some(l) = leader {
            let same = all.iter().all(|s| s.leader == Some(l.id) && s.term == l.term);
            if all.len() == procs.len() && same && l.last_applied == l.last_log_index {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn block(lba: u64) -> Vec<u8> {
    (0..BS).map(|i| (lba as usize * 31 + i * 7) as u8).collect()
}

fn device(procs: &[NodeProc]) -> Arc<Device> {
    let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
    let security = procs[0].security();
    let remote = RemoteCluster::new(&addrs, None, procs[0].cluster, &security, T);
    let mut cfg = DeviceConfig::new(BS as u32, (16 << 20) / BS as u64, CacheMode::Writethrough);
    cfg.readahead_bytes = 0;
    Device::start(cfg, remote)
}

/// Blocks 0..8 written and flushed through `dev`; what the device then reads there.
async fn write_known(dev: &Device) -> Vec<u8> {
    for lba in 0..8u64 {
        dev.write(lba * BS as u64, &block(lba), false).await.unwrap();
    }
    dev.flush().await.unwrap();
    dev.read(0, 8 * BS as u64).await.unwrap()
}

/// The requests an intruder would send: a vote in a far higher term, entries from a made-up
/// leader in that term, and a write.
fn intrusions(term: u64) -> Vec<(&'static str, NodeRequest)> {
    let vote = openraft::raft::VoteRequest::new(Vote::new(term + 100, 2), None);
    let entry = Entry { log_id: log_id(term + 100, 2, 1), payload: openraft::EntryPayload::Blank };
    let append = openraft::raft::AppendEntriesRequest {
        vote: Vote::new_committed(term + 100, 2),
        prev_log_id: None,
        leader_commit: Some(log_id(term + 100, 2, 1)),
        entries: vec![entry],
    };
    let write = xdevice::replication::tcp::WriteRequest {
        origin: None,
        req: xdevice::replication::types::Request::blocks(vec![xdevice::entry::BlockOp::Zero {
            lba: 0,
            blocks: 4,
        }]),
    };
    vec![
        ("vote", NodeRequest::Raft(RaftRpc::Vote(vote))),
        ("entries", NodeRequest::Raft(RaftRpc::Append(append))),
        ("write", NodeRequest::Write(write)),
    ]
}

/// Sends each intrusion through `client`; every one must fail without an answer from Raft.
async fn intrude(who: &str, client: &RpcClient, term: u64) {
    for (what, request) in intrusions(term) {
        let (kind, payload) = request.encode().unwrap();
        let r = client.call(kind, payload, T).await;
        assert!(
            matches!(
                r,
                Err(RpcError::Rejected(_) | RpcError::Unreachable(_) | RpcError::Protocol(_))
            ),
            "{who}: {what} got through: {r:?}"
        );
    }
}

fn client(addr: SocketAddr, cluster: uuid::Uuid, security: Security, node_id: u64) -> RpcClient {
    let options = ClientOptions { security, ..ClientOptions::default() };
    RpcClient::new(addr, None, cluster, node_id, options)
}

/// A TLS connection to `addr` as `tls`'s identity, whose `HELLO` claims `claim`: the server's
/// answer (`None`: it closed without one).
async fn hello_as(addr: SocketAddr, tls: &Tls, cluster: uuid::Uuid, claim: u64) -> Option<Frame> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut s = tls.connector(None).unwrap().connect(tls.server_name(), stream).await.ok()?;
    let hello = Hello { protocol_version: PROTOCOL_VERSION, node_id: claim };
    s.write_all(&encode(cluster, &Frame::request(KIND_HELLO, 0, hello.encode())).unwrap())
        .await
        .ok()?;
    let frame = xdevice::net::frame::read_frame(&mut s, cluster, 1 << 20).await.ok()??;
    // Whatever it answered, a vote sent now must not be acted on.
    let vote = &intrusions(1_000)[0].1;
    let (kind, payload) = vote.encode().unwrap();
    let _ = s.write_all(&encode(cluster, &Frame::request(kind, 1, payload)).unwrap()).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut rest)).await;
    Some(frame)
}

#[test]
fn strangers_cannot_vote_send_entries_write_or_join() {
    let base = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::new_v4();
    runtime().block_on(async {
        let (mut procs, before) = cluster(base.path(), id).await;
        let leader = procs.iter().find(|p| p.id == before.id).unwrap().addr;
        let dev = device(&procs);
        let written = write_known(&dev).await;
        let before = agreed(&procs_ref(&procs)).await;

        // No certificate: plaintext to a TLS port.
        for p in &procs {
            intrude("plaintext", &client(p.addr, id, Security::Plaintext, 2), before.term).await;
        }
        // A certificate of another cluster's CA, for a voter's id and this cluster's id.
        let other = tempfile::tempdir().unwrap();
        create_dev(other.path(), id, &[2]).unwrap();
        let foreign = Tls::load(
            &TlsFiles::in_dir(other.path(), Identity::Member(2)),
            id,
            Identity::Member(2),
        )
        .unwrap();
        for p in &procs {
            let c = client(p.addr, id, Security::Tls(Arc::new(foreign.clone())), 2);
            intrude("another CA", &c, before.term).await;
        }
        // A member certificate of this CA, for node 5, whose HELLO claims voter 2.
        create_dev(&procs[0].tls, id, &[5]).unwrap();
        let five = Tls::load(
            &TlsFiles::in_dir(&procs[0].tls, Identity::Member(5)),
            id,
            Identity::Member(5),
        )
        .unwrap();
        for p in &procs {
            let answer = hello_as(p.addr, &five, id, 2).await;
            match answer {
                Some(f) if f.kind == xdevice::net::rpc::KIND_REJECT => {
                    let why = String::from_utf8_lossy(&f.payload).into_owned();
                    assert!(why.contains("certificate is for node 5"), "{why}");
                }
                other => {
                    panic!("node {}: a HELLO as node 2 with node 5's certificate: {other:?}", p.id)
                }
            }
            let log = p.log();
            assert!(log.contains("claims node id 2 but the certificate is for node 5"), "{log}");
        }
        // The admin certificate may administer, never vote or write.
        let admin =
            Tls::load(&TlsFiles::in_dir(&procs[0].tls, Identity::Admin), id, Identity::Admin)
                .unwrap();
        let c = client(leader, id, Security::Tls(Arc::new(admin)), 0);
        for (what, request) in intrusions(before.term) {
            let (kind, payload) = request.encode().unwrap();
            match c.call(kind, payload, T).await {
                Err(RpcError::Remote { code, message }) => {
                    assert_eq!(code, xdevice::net::rpc::CODE_FORBIDDEN, "{what}: {message}");
                    assert!(message.contains("admin certificate"), "{what}: {message}");
                }
                other => panic!("admin {what}: {other:?}"),
            }
        }
        let (kind, payload) = NodeRequest::Admin(Admin::Status).encode().unwrap();
        assert!(c.call(kind, payload, T).await.is_ok(), "the admin may ask for status");

        // Member certificates of this CA speak only as themselves, and only while members: node
        // 3's cannot vote or send entries as node 2, nor a certificate outside the membership
        // (CLIENT_ID's) as itself; neither may change the membership.
        let member = |who: u64| {
            let files = TlsFiles::in_dir(&procs[0].tls, Identity::Member(who));
            let tls = Tls::load(&files, id, Identity::Member(who)).unwrap();
            client(leader, id, Security::Tls(Arc::new(tls)), who)
        };
        let forged_vote_from = |node: u64| {
            let vote = openraft::raft::VoteRequest::new(Vote::new(before.term + 100, node), None);
            NodeRequest::Raft(RaftRpc::Vote(vote))
        };
        let mut cases: Vec<(u64, &str, NodeRequest, &str)> = intrusions(before.term)
            .into_iter()
            .filter(|(what, _)| *what != "write")
            .map(|(what, r)| (3, what, r, "sent a Raft message as node 2"))
            .collect();
        cases.push((CLIENT_ID, "vote as itself", forged_vote_from(CLIENT_ID), "is not a member"));
        cases.push((
            CLIENT_ID,
            "remove",
            NodeRequest::Admin(Admin::Remove(2)),
            "it is the admin's",
        ));
        cases.push((
            3,
            "init",
            NodeRequest::Admin(Admin::Init(vec![(3, leader.to_string())])),
            "it is the admin's",
        ));
        for (who, what, request, needle) in cases {
            let (kind, payload) = request.encode().unwrap();
            match member(who).call(kind, payload, T).await {
                Err(RpcError::Remote { code, message }) => {
                    assert_eq!(
                        code,
                        xdevice::net::rpc::CODE_FORBIDDEN,
                        "node {who} {what}: {message}"
                    );
                    assert!(message.contains(needle), "node {who} {what}: {message}");
                }
                other => panic!("node {who}'s certificate, {what}: {other:?}"),
            }
        }
        // A write beyond the device, or not in whole blocks, is refused before it is proposed:
        // committed, it would fail its apply on every replica.
        for (what, op) in [
            (
                "past the end",
                xdevice::entry::BlockOp::Zero { lba: (16 << 20) / BS as u64, blocks: 1 },
            ),
            (
                "a partial block",
                xdevice::entry::BlockOp::Write { lba: 0, data: vec![1u8; 100].into() },
            ),
        ] {
            let req = xdevice::replication::types::Request::blocks(vec![op]);
            let e = procs[0].client(id).write(&req, T).await;
            let e = e.expect_err(what);
            assert_eq!(
                e.code,
                Some(xdevice::replication::tcp::ErrorCode::Malformed),
                "{what}: {e}"
            );
        }

        // A node started with another CA's certificates cannot join.
        let addr4 = free_addr("127.0.0.64");
        let mut four = NodeProc::format(base.path(), 4, &id, "16M", addr4, &[]);
        create_dev(other.path(), id, &[4]).unwrap();
        four.tls = other.path().to_path_buf();
        four.start();
        let out = Command::new(xdevice_bin())
            .args(["cluster", "--node", &leader.to_string(), "--cluster-id", &id.to_string()])
            .arg("--tls-dir")
            .arg(&procs[0].tls)
            .args(["add", "--id", "4", "--addr", &addr4.to_string(), "--stall-secs", "5"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a node with another CA's certificate joined");
        assert!(err.contains("cannot join") && err.contains("TLS handshake"), "{err}");
        four.kill();

        // Nothing moved: the same leader and term, no entry, the same members, the same data.
        let after = agreed(&procs_ref(&procs)).await;
        assert_eq!((after.id, after.term), (before.id, before.term), "leadership moved");
        assert_eq!(after.last_log_index, before.last_log_index, "an entry was appended");
        assert_eq!(
            (after.voters.clone(), after.learners.clone()),
            (before.voters.clone(), before.learners.clone())
        );
        assert_eq!(dev.read(0, 8 * BS as u64).await.unwrap(), written);
        // And the cluster serves.
        dev.write(8 * BS as u64, &block(8), true).await.unwrap();
        assert_eq!(dev.read(8 * BS as u64, BS as u64).await.unwrap(), block(8));
        dev.close();
        for p in &mut procs {
            p.stop();
        }
    });
}

#[test]
fn bad_frames_from_a_member_close_only_its_connection() {
    let base = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::new_v4();
    runtime().block_on(async {
        let (mut procs, _) = cluster(base.path(), id).await;
        let dev = device(&procs);
        let written = write_known(&dev).await;
        let before = agreed(&procs_ref(&procs)).await;
        let me = Tls::load(
            &TlsFiles::in_dir(&procs[0].tls, Identity::Member(CLIENT_ID)),
            id,
            Identity::Member(CLIENT_ID),
        )
        .unwrap();

        // Each: what is sent after a good HELLO, on a TLS connection as a member.
        let good = |kind, payload: Vec<u8>| encode(id, &Frame::request(kind, 1, payload)).unwrap();
        let mut oversized = good(KIND_RAFT, Vec::new());
        oversized[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut damaged = good(KIND_RAFT, vec![1, 2, 3, 4]);
        let last = damaged.len() - 1;
        damaged[last] ^= 0x40;
        let truncated = good(KIND_RAFT, vec![9; 1000])[..HEADER_BYTES + 10].to_vec();
        let (raft, mut payload) = intrusions(before.term)[1].1.encode().unwrap();
        payload.truncate(payload.len() / 2);
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("garbage", vec![0x5a; 300], false),
            ("an oversized length", oversized, false),
            ("a damaged checksum", damaged, false),
            ("a truncated frame", truncated, true),
            ("a payload that does not decode", good(KIND_RAFT, vec![0xff; 64]), false),
            ("half an AppendEntries", good(raft, payload), false),
            ("an unknown kind", good(0x42, vec![1]), false),
            (
                "trailing bytes",
                {
                    let (k, mut p) = NodeRequest::Admin(Admin::Status).encode().unwrap();
                    p.push(0);
                    good(k, p)
                },
                false,
            ),
        ];
        for (what, bytes, then_close) in cases {
            for p in &procs {
                let stream = TcpStream::connect(p.addr).await.unwrap();
                let mut s = me
                    .connector(Some(p.id))
                    .unwrap()
                    .connect(me.server_name(), stream)
                    .await
                    .unwrap();
                let hello = Hello { protocol_version: PROTOCOL_VERSION, node_id: CLIENT_ID };
                s.write_all(&encode(id, &Frame::request(KIND_HELLO, 0, hello.encode())).unwrap())
                    .await
                    .unwrap();
                s.write_all(&bytes).await.unwrap();
                if then_close {
                    s.shutdown().await.unwrap();
                }
                // The node answers at most an error and closes this connection.
                let mut rest = Vec::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
                assert!(read.is_ok(), "node {}: {what} left the connection open", p.id);
            }
        }
        let after = agreed(&procs_ref(&procs)).await;
        assert_eq!((after.id, after.term), (before.id, before.term), "leadership moved");
        assert_eq!(after.last_log_index, before.last_log_index, "an entry was appended");
        assert_eq!(dev.read(0, 8 * BS as u64).await.unwrap(), written, "data changed");
        for p in &procs {
            let log = p.log();
            assert!(log.contains("malformed"), "node {} logged no malformed input: {log}", p.id);
        }
        dev.write(8 * BS as u64, &block(8), true).await.unwrap();
        assert_eq!(dev.read(8 * BS as u64, BS as u64).await.unwrap(), block(8));
        dev.close();
        for p in &mut procs {
            p.stop();
        }
    });
}
