//! Writes the seed corpora, `fuzz/corpus/<target>/`, from the library's own encoders: a few valid
//! examples of each format (the product's bytes, so the fuzzer starts past the checks a random
//! input fails) and a few hand-made bad ones. Every file is the target's input: a mode byte
//! (`xdevice_fuzz`, each target's documentation) and then the bytes. Deterministic; run it again
//! after a format changes:
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --bin seeds
//!
//! It replaces each target's `seed-*` files and leaves others (crash reproducers) alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use openraft::{BasicNode, EntryPayload as RaftPayload};
use xdevice::cli::config::{load_given, Role};
use xdevice::entry::BlockOp;
use xdevice::net::frame::{self, Frame, FLAG_ERROR, FLAG_RESPONSE};
use xdevice::replication::network::{RaftRpc, SnapshotChunk};
use xdevice::replication::snapshot::{
    parse_chunk, parse_header, Target, CHUNK_BLOCKS, RECORD_HEAD,
};
use xdevice::replication::types::{
    encode_entry, encode_membership, from_store_vote, log_id, Entry, Membership, Request,
    SnapshotMeta, StoredMembership,
};
use xdevice::replication::wire::{
    Admin, LocalRead, NodeRequest, Repair, WriteRequest, KIND_ADMIN, KIND_READ,
};
use xdevice::storage::disk::SimDisk;
use xdevice::storage::record::{self, RecordInput, RecordKind, FLAG_BATCH_END, FLAG_BATCH_START};
use xdevice::storage::state::{HardState, LogId, StateStore, Vote};
use xdevice::storage::superblock::{LayoutKind, RawGeometry, Superblock};
use xdevice_fuzz::{reseal, CLUSTER, OWNER, RESEAL, SALT, SHAPE};

struct Corpus {
    dir: PathBuf,
    written: usize,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Corpus {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        for e in std::fs::read_dir(&dir).expect("list corpus dir") {
            let path = e.expect("corpus entry").path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-")) {
                std::fs::remove_file(&path).expect("remove old seed");
            }
        }
        Corpus { dir, written: 0 }
    }

    /// Writes `bytes` after the mode byte as `seed-<name>`.
    fn put(&mut self, name: &str, mode: u8, bytes: &[u8]) {
        let mut data = Vec::with_capacity(1 + bytes.len());
        data.push(mode);
        data.extend_from_slice(bytes);
        assert!(data.len() < 64 << 10, "seed {name} is {} bytes", data.len());
        std::fs::write(self.dir.join(format!("seed-{name}")), data).expect("write seed");
        self.written += 1;
    }
}

fn frames(c: &mut Corpus) {
    let enc = |f: &Frame| {
        let bytes = frame::encode(CLUSTER, f).expect("encode frame");
        assert_eq!(&frame::decode(&bytes, CLUSTER, 1 << 20).expect("frame seed").0, f);
        bytes
    };
    c.put("request", 0, &enc(&Frame::request(1, 7, b"payload".to_vec())));
    c.put("response-empty", 0, &enc(&Frame::response(2, 8, Vec::new())));
    let error = Frame {
        kind: 4,
        flags: FLAG_RESPONSE | FLAG_ERROR,
        request_id: 9,
        payload: b"not the leader".to_vec(),
    };
    c.put("error-response", 0, &enc(&error));
    let mut two = enc(&Frame::request(3, 1, vec![0xAB; 40]));
    two.extend_from_slice(&enc(&Frame::request(3, 2, vec![1])));
    c.put("two-frames", 0, &two);
    c.put("over-small-limit", 2, &enc(&Frame::request(1, 1, vec![7; 1100])));
    // Bad: a flipped checksum, an unknown flag (resealed), another cluster, a cut header.
    let mut bad = enc(&Frame::request(1, 5, b"x".to_vec()));
    bad[44] ^= 1;
    c.put("bad-crc", 0, &bad);
    let mut flags = enc(&Frame::request(1, 5, b"x".to_vec()));
    flags[7] = 0x80;
    c.put("bad-flags-resealed", RESEAL, &flags);
    c.put(
        "other-cluster",
        0,
        &frame::encode(uuid_other(), &Frame::request(1, 5, vec![])).expect("encode"),
    );
    c.put("cut-header", 0, &enc(&Frame::request(1, 5, vec![]))[..30]);
}

fn uuid_other() -> uuid::Uuid {
    uuid::Uuid::from_u128(42)
}

fn wal_record(kind: RecordKind, index: u64, payload: &[u8], batch: u16) -> Vec<u8> {
    let seed = record::salt_seed(SALT);
    let (stored, compressed) = record::maybe_compress(payload);
    let input = RecordInput { index, term: 3, kind, raw_len: payload.len() };
    let mut out = vec![0u8; record::padded_record_len(stored.len())];
    record::encode_into(
        &mut out,
        &input,
        &[&stored],
        compressed,
        batch,
        1_700_000_000_000_000,
        seed,
    );
    let record::Decoded::Record(h) = record::decode(&out, seed, out.len()) else {
        panic!("record seed")
    };
    assert_eq!(record::payload(&h, &out, payload.len()).expect("record seed payload"), payload);
    out
}

fn wal_records(c: &mut Corpus) {
    let entry = xdevice::entry::EntryPayload {
        leader_node: 1,
        body: xdevice::entry::EntryBody::Blocks(vec![BlockOp::Write {
            lba: 2,
            data: Bytes::from(vec![9u8; 64]),
        }]),
    }
    .encode();
    c.put(
        "entry",
        0,
        &wal_record(RecordKind::Entry, 10, &entry, FLAG_BATCH_START | FLAG_BATCH_END),
    );
    c.put(
        "entry-compressed",
        0,
        &wal_record(RecordKind::Entry, 11, &[0u8; 2048], FLAG_BATCH_START),
    );
    c.put("entry-compressed-small-limit", 2, &wal_record(RecordKind::Entry, 11, &[5u8; 4096], 0));
    c.put("truncate", 0, &wal_record(RecordKind::Truncate, 12, &[], FLAG_BATCH_END));
    c.put("purge", 0, &wal_record(RecordKind::Purge, 9, &2u64.to_le_bytes(), 0));
    let mut batch = wal_record(RecordKind::Entry, 20, b"first", FLAG_BATCH_START);
    batch.extend_from_slice(&wal_record(RecordKind::Entry, 21, b"second", FLAG_BATCH_END));
    c.put("batch-of-two", 0, &batch);
    // Bad: all zero, cut, a flipped payload byte, a compressed record whose lz4 is damaged.
    c.put("zero", 0, &[0u8; 64]);
    c.put("cut", 0, &wal_record(RecordKind::Entry, 1, b"abcdef", 0)[..40]);
    let mut flipped = wal_record(RecordKind::Entry, 1, b"abcdef", 0);
    flipped[50] ^= 0x20;
    c.put("bad-crc", 0, &flipped);
    let mut lz = wal_record(RecordKind::Entry, 2, &[1u8; 1024], 0);
    lz[49] ^= 0xFF;
    c.put("bad-lz4-resealed", RESEAL, &lz);
}

fn entries(c: &mut Corpus) {
    let mut put = |name: &str, entry: Entry| c.put(name, 0, &encode_entry(&entry).to_vec());
    let id = log_id(3, 2, 5);
    put("blank", Entry { log_id: id, payload: RaftPayload::Blank });
    put("flush", Entry { log_id: id, payload: RaftPayload::Normal(Request::Flush) });
    put("attach", Entry { log_id: id, payload: RaftPayload::Normal(Request::Attach(2)) });
    let ops = vec![
        BlockOp::Write { lba: 7, data: Bytes::from(vec![1u8; 32]) },
        BlockOp::Zero { lba: 100, blocks: 8 },
    ];
    put("blocks", Entry { log_id: id, payload: RaftPayload::Normal(Request::blocks(ops.clone())) });
    put(
        "fenced",
        Entry {
            log_id: id,
            payload: RaftPayload::Normal(Request::Fenced(41, ops, Default::default())),
        },
    );
    put("membership", Entry { log_id: id, payload: RaftPayload::Membership(membership()) });
    c.put("bad-kind", 0, &[1, 9, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    c.put(
        "bad-op-count",
        0,
        &[1, 2, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0],
    );
}

fn membership() -> Membership {
    let nodes: BTreeMap<u64, BasicNode> =
        [(1, BasicNode::new("10.0.0.1:7100")), (2, BasicNode::new("10.0.0.2:7100"))].into();
    Membership::new(vec![BTreeSet::from([1, 2])], nodes).expect("membership")
}

fn superblocks(c: &mut Corpus) {
    let dir = Superblock {
        seq: 3,
        device_uuid: uuid::Uuid::from_u128(1),
        cluster_id: CLUSTER,
        device_bytes: 1 << 30,
        block_bytes: 4096,
        layout: LayoutKind::Directory,
        segment_bytes: 64 << 20,
        raw: RawGeometry::default(),
        created_us: 1_700_000_000_000_000,
        device_name: "xdb0".into(),
        node_id: 0,
    };
    assert_eq!(Superblock::decode(&dir.encode(0), "seed").expect("superblock seed"), dir);
    c.put("directory", 0, &dir.encode(0));
    let raw = Superblock {
        layout: LayoutKind::Raw,
        block_bytes: 65536,
        segment_bytes: 256 << 10,
        raw: RawGeometry {
            wal_offset: 1 << 20,
            wal_slots: 8,
            state_offset: 1 << 16,
            image_offset: 4 << 20,
            image_bytes: 1 << 30,
        },
        device_name: "a-name-of-exactly-thirty-two-byt".into(),
        node_id: 3,
        ..dir.clone()
    };
    assert_eq!(Superblock::decode(&raw.encode(3), "seed").expect("superblock seed"), raw);
    c.put("raw-copy-3", 0, &raw.encode(3));
    // Zero-padded (mode 2): the trailing zeros of a copy left off.
    c.put("padded-resealed", 2 | RESEAL, &dir.encode(1)[..200]);
    let mut bad = dir.encode(2);
    bad[64] = 3;
    c.put("bad-block-size-resealed", RESEAL, &bad);
    let mut version = dir.encode(2);
    version[8] = 2;
    c.put("bad-version-resealed", RESEAL, &version);
    c.put("bad-magic", 2, b"XDEVSUPX");
}

fn state_slots(c: &mut Corpus) {
    let states = [
        HardState::default(),
        HardState {
            vote: Some(Vote { term: 4, node: 2, committed: true }),
            committed: Some(LogId { term: 3, node: 1, index: 99 }),
            membership: encode_membership(&membership()),
        },
        HardState { vote: Some(Vote { term: 1, node: 1, committed: false }), ..Default::default() },
    ];
    for (i, state) in states.iter().enumerate() {
        c.put(&format!("payload-{i}"), 2, &state.encode());
    }
    // Slot pairs as a store leaves them: after one, two and three updates.
    let disk = SimDisk::new("state", 8192);
    let (store, _) =
        StateStore::open(disk.clone(), 0, OWNER, Default::default()).expect("open blank");
    for (i, state) in states.iter().enumerate() {
        store.update(|s| *s = state.clone()).expect("update");
        c.put(&format!("slots-after-{}", i + 1), 0, &disk.peek(0, 8192));
    }
    // Bad: a slot's seq in the wrong slot, a flipped payload byte, a blank pair.
    let mut wrong = disk.peek(0, 8192);
    wrong[8] ^= 1;
    reseal::slot(&mut wrong[..4096]);
    c.put("seq-in-wrong-slot", 0, &wrong);
    let mut flipped = disk.peek(0, 8192);
    flipped[4096 + 30] ^= 4;
    c.put("damaged-slot", 0, &flipped);
    let mut foreign = disk.peek(0, 8192);
    foreign[4096 + 30] ^= 4;
    reseal::slot(&mut foreign[4096..]);
    c.put("foreign-slot", 0, &foreign);
    c.put("blank", 0, &[]);
}

fn snapshot_records(c: &mut Corpus) {
    let bs = SHAPE.block_bytes as usize;
    let head = RECORD_HEAD as usize;
    let record_len = head + CHUNK_BLOCKS as usize * bs;
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(4, 2, 99)),
        last_membership: StoredMembership::new(Some(log_id(1, 2, 3)), membership()),
    };
    // Version 2: the sender's cluster id at 56, the meta at 80.
    let header = |attachment: Option<(u64, u64)>| {
        let m = postcard::to_allocvec(&meta).expect("meta");
        let mut rec = vec![0u8; head];
        rec[..8].copy_from_slice(b"XDEVSNAP");
        rec[8..12].copy_from_slice(&2u32.to_le_bytes());
        rec[12..16].copy_from_slice(&SHAPE.block_bytes.to_le_bytes());
        rec[16..24].copy_from_slice(&SHAPE.device_bytes.to_le_bytes());
        rec[24..28].copy_from_slice(&(CHUNK_BLOCKS as u32).to_le_bytes());
        rec[28..32].copy_from_slice(&(m.len() as u32).to_le_bytes());
        if let Some((epoch, node)) = attachment {
            rec[36..40].copy_from_slice(&1u32.to_le_bytes());
            rec[40..48].copy_from_slice(&epoch.to_le_bytes());
            rec[48..56].copy_from_slice(&node.to_le_bytes());
        }
        rec[56..72].copy_from_slice(CLUSTER.as_bytes());
        rec[80..80 + m.len()].copy_from_slice(&m);
        reseal::snapshot(&mut rec, 32, false);
        rec
    };
    let target = Target { shape: SHAPE, cluster: CLUSTER };
    assert!(parse_header(&header(None), target).is_ok(), "header seed refused");
    assert!(parse_header(&header(Some((12, 2))), target).is_ok_and(|d| d.attachment.is_some()));
    c.put("header", 0, &header(None));
    c.put("header-attached", 0, &header(Some((12, 2))));
    let mut other = header(None);
    other[12] = 32;
    c.put("header-other-shape-resealed", RESEAL, &other);
    let mut cluster = header(None);
    cluster[60] ^= 1;
    c.put("header-other-cluster-resealed", RESEAL, &cluster);
    // Version 1 (meta at 64, no cluster id): refused for a transfer.
    let mut v1 = vec![0u8; head];
    v1[..64].copy_from_slice(&header(None)[..64]);
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    v1[56..64].fill(0);
    let m = postcard::to_allocvec(&meta).expect("meta");
    v1[64..64 + m.len()].copy_from_slice(&m);
    c.put("header-version-1-resealed", RESEAL, &v1);
    let chunk = |n: u64, present: &[usize]| {
        let total = (SHAPE.device_bytes / u64::from(SHAPE.block_bytes)) as usize;
        let blocks = (CHUNK_BLOCKS as usize).min(total - n as usize * CHUNK_BLOCKS as usize);
        let mut rec = vec![0u8; record_len];
        rec[..8].copy_from_slice(b"XDEVSCHK");
        rec[8..16].copy_from_slice(&n.to_le_bytes());
        rec[16..24].copy_from_slice(&(n * CHUNK_BLOCKS).to_le_bytes());
        rec[24..28].copy_from_slice(&(blocks as u32).to_le_bytes());
        for &i in present.iter().filter(|&&i| i < blocks) {
            rec[64 + i / 8] |= 1 << (i % 8);
            rec[head + i * bs..head + (i + 1) * bs].fill((i as u8).wrapping_add(1));
        }
        reseal::snapshot(&mut rec, 28, true);
        rec
    };
    assert!(parse_chunk(&chunk(0, &[1]), SHAPE, 0).is_ok(), "chunk seed refused");
    assert!(parse_chunk(&chunk(1, &[1]), SHAPE, 1).is_ok(), "chunk seed refused");
    // Mode: bit 1 chunk, bit 2 chunk 1.
    c.put("chunk-0", 2, &chunk(0, &[0, 1, 2, 100, 255]));
    c.put("chunk-0-empty", 2, &chunk(0, &[]));
    c.put("chunk-1-partial", 2 | 4, &chunk(1, &[0, 43]));
    c.put("chunk-1-as-0", 2, &chunk(1, &[5]));
    let mut short = chunk(0, &[3]);
    short.truncate(5000);
    c.put("chunk-0-padded-resealed", 2 | 8 | RESEAL, &short);
}

fn configs(c: &mut Corpus) {
    let serve = "[device]\ndir = \"/tmp/xdevice-fuzz\"\nsize_bytes = \"1G\"\nreplicas = 3\n\
                 mode = \"writeback\"\nqueues = 2\ncache_bytes = 268435456\n\n[raft]\n\
                 heartbeat_ms = 50\nelection_min_ms = 150\nelection_max_ms = 300\n\n\
                 [metrics]\nlisten = \"127.0.0.1:9100\"\n";
    let loads = |text: &str, role: Role| {
        let path = std::env::temp_dir().join(format!("xdevice-seed-{}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        let r = load_given(&path, role, &[]);
        let _ = std::fs::remove_file(&path);
        r.map_err(|e| e.mistakes)
    };
    loads(serve, Role::Serve).expect("serve seed");
    c.put("serve.toml", 0, serve.as_bytes());
    let node = "[device]\ndir = \"/tmp/xdevice-fuzz\"\nname = \"xdb0\"\nbackend = \"file\"\n\n\
                [node]\nid = 1\nlisten = \"[::1]:7100\"\nattach = true\nattach_timeout_secs = 30\n\n\
                [raft]\nkeep_entries = 1000\nsnapshot_segments = 4\n";
    loads(node, Role::Node).expect("node seed");
    c.put("node.toml", 2, node.as_bytes());
    c.put("node-given.toml", 2 | 4 | 8 | 16, b"[device]\nreadahead_bytes = \"128K\"\n");
    let plaintext = format!("{node}\n[tls]\nplaintext = true\n");
    loads(&plaintext, Role::Node).expect("node plaintext seed");
    c.put("node-plaintext.toml", 2, plaintext.as_bytes());
    c.put(
        "tls-choices.toml",
        2 | 4 | 8 | 16,
        b"[tls]\ndir = \"/tmp\"\nplaintext = true\nca = \"/etc/hostname\"\n",
    );
    c.put("empty.toml", 0, b"");
    // Bad: misspelt keys, wrong types, out of range, a key of the other role, not TOML.
    let bad = "[device]\nsize_byte = 5\nreplicas = 99\nqueues = \"two\"\n\n[node]\nid = 0\n\n\
               [raft]\nelection_min_ms = 300\nelection_max_ms = 100\n[extra]\n";
    c.put("mistakes.toml", 0, bad.as_bytes());
    c.put(
        "other-role.toml",
        2,
        b"[device]\nsize_bytes = 4096\n[node]\nid = 1\nlisten = \"1.2.3.4:1\"\ndir = 3\n",
    );
    c.put("not-toml.toml", 0, b"[device\nx = ");
}

fn raft_rpcs(c: &mut Corpus) {
    let vote = from_store_vote(Vote { term: 5, node: 1, committed: true });
    let rpc = |r: RaftRpc| postcard::to_allocvec(&r).expect("encode rpc");
    let entries = vec![
        Entry { log_id: log_id(5, 1, 10), payload: RaftPayload::Blank },
        Entry {
            log_id: log_id(5, 1, 11),
            payload: RaftPayload::Normal(Request::blocks(vec![BlockOp::Write {
                lba: 3,
                data: Bytes::from(vec![7u8; 48]),
            }])),
        },
        Entry { log_id: log_id(5, 1, 12), payload: RaftPayload::Membership(membership()) },
    ];
    let append = AppendEntriesRequest {
        vote,
        prev_log_id: Some(log_id(4, 2, 9)),
        entries,
        leader_commit: Some(log_id(4, 2, 9)),
    };
    c.put("append", 0, &rpc(RaftRpc::Append(append)));
    let heartbeat =
        AppendEntriesRequest { vote, prev_log_id: None, entries: vec![], leader_commit: None };
    c.put("heartbeat", 0, &rpc(RaftRpc::Append(heartbeat)));
    let candidate = from_store_vote(Vote { term: 6, node: 2, committed: false });
    c.put("vote", 0, &rpc(RaftRpc::Vote(VoteRequest::new(candidate, Some(log_id(5, 1, 12))))));
    c.put("pre-vote", 0, &rpc(RaftRpc::PreVote(VoteRequest::new(candidate, None))));
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(5, 1, 12)),
        last_membership: StoredMembership::new(Some(log_id(5, 1, 12)), membership()),
    };
    let chunk = SnapshotChunk { vote, meta, offset: 8192, data: vec![1, 2, 3, 4], done: true };
    c.put("snapshot", 0, &rpc(RaftRpc::Snapshot(chunk)));
    let transfer = TransferLeaderRequest::new(vote, 2, Some(log_id(5, 1, 12)));
    c.put("transfer-leader", 0, &rpc(RaftRpc::TransferLeader(transfer)));
    c.put("bad-variant", 0, &[9, 1, 2, 3]);
    c.put("bad-truncated", 0, &rpc(RaftRpc::Vote(VoteRequest::new(candidate, None)))[..3]);
}

fn requests(c: &mut Corpus) {
    // Mode byte: the frame kind.
    let mut put = |name: &str, r: NodeRequest| {
        let (kind, bytes) = r.encode().expect("encode request");
        NodeRequest::decode(kind, &bytes).expect("request seed");
        c.put(name, kind, &bytes);
    };
    let ops = vec![
        BlockOp::Write { lba: 1, data: Bytes::from(vec![3u8; 32]) },
        BlockOp::Zero { lba: 64, blocks: 16 },
    ];
    put(
        "write",
        NodeRequest::Write(WriteRequest { origin: None, req: Request::blocks(ops.clone()) }),
    );
    let origin = Some((uuid::Uuid::from_u128(0xC11E), 17));
    let fenced = Request::Fenced(3, ops, Default::default());
    put("write-pipelined", NodeRequest::Write(WriteRequest { origin, req: fenced }));
    put("write-flush", NodeRequest::Write(WriteRequest { origin, req: Request::Flush }));
    put("write-attach", NodeRequest::Write(WriteRequest { origin: None, req: Request::Attach(2) }));
    put("read", NodeRequest::Read { lba: 8, blocks: 4 });
    put(
        "read-local",
        NodeRequest::ReadLocal(LocalRead { lba: 8, blocks: 1, applied_at_least: 40 }),
    );
    put("repair", NodeRequest::Repair(Repair { lba: 8, data: vec![0x5A; 64] }));
    let candidate = from_store_vote(Vote { term: 6, node: 2, committed: false });
    put("raft-vote", NodeRequest::Raft(RaftRpc::Vote(VoteRequest::new(candidate, None))));
    let members = vec![(1, "10.0.0.1:7100".into()), (2, "10.0.0.2:7100".into())];
    put("admin-init", NodeRequest::Admin(Admin::Init(members)));
    put("admin-add-learner", NodeRequest::Admin(Admin::AddLearner(3, "10.0.0.3:7100".into())));
    put("admin-set-voters", NodeRequest::Admin(Admin::SetVoters(vec![1, 2, 3])));
    put("admin-status", NodeRequest::Admin(Admin::Status));
    put("admin-handover", NodeRequest::Admin(Admin::Handover(2)));
    // Bad: a trailing byte, an unknown kind, limits broken, an unknown admin variant.
    let (kind, mut trailing) = NodeRequest::Read { lba: 1, blocks: 1 }.encode().expect("encode");
    trailing.push(0);
    c.put("bad-trailing-byte", kind, &trailing);
    c.put("bad-unknown-kind", 7, &[1, 1]);
    c.put("bad-read-zero-blocks", KIND_READ, &[1, 0]);
    c.put("bad-admin-no-members", KIND_ADMIN, &[0, 0]);
    c.put("bad-admin-variant", KIND_ADMIN, &[200]);
}

fn main() {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    type Writer = fn(&mut Corpus);
    let targets: [(&str, Writer); 9] = [
        ("frame", frames),
        ("wal_record", wal_records),
        ("entry", entries),
        ("superblock", superblocks),
        ("state_slot", state_slots),
        ("snapshot_chunk", snapshot_records),
        ("config", configs),
        ("raft_rpc", raft_rpcs),
        ("request", requests),
    ];
    for (target, write) in targets {
        let mut c = Corpus::new(&root, target);
        write(&mut c);
        println!("{target}: {} seeds in {}", c.written, c.dir.display());
    }
}
