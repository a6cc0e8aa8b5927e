//! The openraft type configuration and the conversions between openraft's entries and the
//! storage engine's log records. Pure: no I/O.

use openraft::{BasicNode, EntryPayload as RaftPayload};
use serde::{Deserialize, Serialize};

use crate::entry::{encode_shared, encoded_len, BlockOp, BodyRef, EntryBody, EntryPayload};
use crate::storage::state::{LogId as StoreLogId, Vote as StoreVote};
use crate::storage::wal::Payload;

use super::commits::Tag;

/// What a client proposes: block changes, or a flush barrier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Block writes and zero-fills, applied in order; the tag (never encoded) lets a proposer
    /// in this process learn when the entry commits (`commits`).
    Blocks(Vec<BlockOp>, #[serde(skip)] Tag),
    /// Block writes from the member attached at the epoch given (`entry::EntryBody::Fenced`):
    /// applied only while that attachment is current.
    Fenced(u64, Vec<BlockOp>, #[serde(skip)] Tag),
    /// A barrier: committing it commits every entry before it.
    Flush,
    /// Member `node` serves the device from this entry on (0: nobody does); its epoch is the
    /// entry's index.
    Attach(NodeId),
}

impl Request {
    /// Block changes without a tag (a proposer that learns of the commit from the answer).
    pub fn blocks(ops: Vec<BlockOp>) -> Request {
        Request::Blocks(ops, Tag::default())
    }

    /// The bytes of the WAL record payload an entry of this request takes (`encode_entry`).
    pub fn payload_len(&self) -> usize {
        encoded_len(self.body())
    }

    /// The entry body this request becomes.
    pub fn body(&self) -> BodyRef<'_> {
        match self {
            Request::Blocks(ops, _) => BodyRef::Blocks(ops),
            Request::Fenced(epoch, ops, _) => BodyRef::Fenced(*epoch, ops),
            Request::Flush => BodyRef::Flush,
            Request::Attach(node) => BodyRef::Attach(*node),
        }
    }

    /// The block ops it carries, if any.
    pub fn ops(&self) -> Option<&[BlockOp]> {
        match self {
            Request::Blocks(ops, _) | Request::Fenced(_, ops, _) => Some(ops),
            Request::Flush | Request::Attach(_) => None,
        }
    }

    /// The tag of a block request (a default one for the others).
    pub fn tag(&self) -> Tag {
        match self {
            Request::Blocks(_, tag) | Request::Fenced(_, _, tag) => *tag,
            Request::Flush | Request::Attach(_) => Tag::default(),
        }
    }

    /// The request with `tag`, if it can carry one (block requests do).
    pub fn with_tag(self, tag: Tag) -> Request {
        match self {
            Request::Blocks(ops, _) => Request::Blocks(ops, tag),
            Request::Fenced(epoch, ops, _) => Request::Fenced(epoch, ops, tag),
            other => other,
        }
    }
}

/// openraft 0.10 logs requests through `Display`: the kind and size, never the data.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Blocks(ops, _) => {
                write!(f, "blocks({} ops, {} bytes)", ops.len(), self.payload_len())
            }
            Request::Fenced(epoch, ops, _) => {
                write!(f, "blocks(epoch {epoch}, {} ops, {} bytes)", ops.len(), self.payload_len())
            }
            Request::Flush => write!(f, "flush"),
            Request::Attach(0) => write!(f, "detach"),
            Request::Attach(node) => write!(f, "attach(node {node})"),
        }
    }
}

/// What applying an entry answers: the index it was applied at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub index: u64,
}

openraft::declare_raft_types!(
    /// xdevice's Raft: node ids and terms are u64, nodes carry their RPC address; leader ids,
    /// votes and entries are openraft's defaults (a leader id is a term and a node id, as in
    /// 0.9, so log ids and memberships encode as they did).
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
);

pub type NodeId = u64;
pub type LeaderId = openraft::impls::leader_id_adv::LeaderId<u64, NodeId>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::LogId<LeaderId>;
pub type Vote = openraft::impls::Vote<LeaderId>;
pub type Membership = openraft::Membership<NodeId, BasicNode>;
pub type StoredMembership = openraft::StoredMembership<LeaderId, NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<LeaderId, NodeId, BasicNode>;
pub type Snapshot = openraft::Snapshot<LeaderId, NodeId, BasicNode, super::snapshot::SnapshotData>;
pub type StorageError = openraft::StorageError<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig, super::state_machine::StateMachine>;

/// A log id from its parts.
pub fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
    openraft::LogId::new(LeaderId { term, node_id: node }, index)
}

pub fn to_store_log_id(id: &LogId) -> StoreLogId {
    StoreLogId { term: id.leader_id.term, node: id.leader_id.node_id, index: id.index }
}

pub fn from_store_log_id(id: StoreLogId) -> LogId {
    log_id(id.term, id.node, id.index)
}

pub fn to_store_vote(v: &Vote) -> StoreVote {
    StoreVote { term: v.leader_id.term, node: v.leader_id.node_id, committed: v.committed }
}

pub fn from_store_vote(v: StoreVote) -> Vote {
    let mut vote = openraft::Vote::new(v.term, v.node);
    vote.committed = v.committed;
    vote
}

/// Encodes a membership for the log and the image header.
pub fn encode_membership(m: &Membership) -> Vec<u8> {
    // Serializing plain in-memory collections into a Vec cannot fail.
    postcard::to_allocvec(m).unwrap_or_default()
}

/// Decodes a membership written by `encode_membership`.
pub fn decode_membership(bytes: &[u8]) -> Result<Membership, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("undecodable membership: {e}"))
}

/// The record payload of an entry, as the WAL stores it, sharing the entry's block data.
pub fn encode_entry(entry: &Entry) -> Payload {
    let leader = entry.log_id.leader_id.node_id;
    match &entry.payload {
        RaftPayload::Blank => encode_shared(leader, BodyRef::Blank),
        RaftPayload::Normal(req) => encode_shared(leader, req.body()),
        RaftPayload::Membership(m) => {
            encode_shared(leader, BodyRef::Membership(&encode_membership(m)))
        }
    }
}

/// Rebuilds an entry from its WAL record: index and term from the record, the rest from the
/// payload.
pub fn decode_entry(index: u64, term: u64, payload: &[u8]) -> Result<Entry, String> {
    let decoded = EntryPayload::decode(payload)?;
    let log_id = from_store_log_id(StoreLogId { term, node: decoded.leader_node, index });
    let payload = match decoded.body {
        EntryBody::Blank => RaftPayload::Blank,
        EntryBody::Flush => RaftPayload::Normal(Request::Flush),
        EntryBody::Blocks(ops) => RaftPayload::Normal(Request::Blocks(ops, Tag::default())),
        EntryBody::Fenced(epoch, ops) => {
            RaftPayload::Normal(Request::Fenced(epoch, ops, Tag::default()))
        }
        EntryBody::Attach(node) => RaftPayload::Normal(Request::Attach(node)),
        EntryBody::Membership(bytes) => RaftPayload::Membership(decode_membership(&bytes)?),
    };
    Ok(Entry { log_id, payload })
}

/// The engine's view of an entry's effect on the image; consumes the entry so block data is
/// moved, not copied, on the apply path.
pub fn into_entry_body(entry: Entry) -> EntryBody {
    match entry.payload {
        RaftPayload::Blank => EntryBody::Blank,
        RaftPayload::Normal(Request::Flush) => EntryBody::Flush,
        RaftPayload::Normal(Request::Blocks(ops, _)) => EntryBody::Blocks(ops),
        RaftPayload::Normal(Request::Fenced(epoch, ops, _)) => EntryBody::Fenced(epoch, ops),
        RaftPayload::Normal(Request::Attach(node)) => EntryBody::Attach(node),
        RaftPayload::Membership(m) => EntryBody::Membership(encode_membership(&m)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn id(term: u64, node: u64, index: u64) -> LogId {
        log_id(term, node, index)
    }

    #[test]
    fn entries_round_trip_through_wal_payloads() {
        let nodes: BTreeMap<u64, BasicNode> =
            (1..=3).map(|n| (n, BasicNode::new(format!("127.0.0.{n}:7000")))).collect();
        let members: BTreeSet<u64> = nodes.keys().copied().collect();
        let membership = Membership::new(vec![members], nodes).expect("membership");
        let entries = [
            Entry { log_id: id(1, 2, 0), payload: RaftPayload::Blank },
            Entry { log_id: id(1, 2, 1), payload: RaftPayload::Membership(membership) },
            Entry { log_id: id(2, 3, 2), payload: RaftPayload::Normal(Request::Flush) },
            Entry {
                log_id: id(2, 3, 3),
                payload: RaftPayload::Normal(Request::blocks(vec![
                    BlockOp::Write { lba: 9, data: vec![5; 4096].into() },
                    BlockOp::Zero { lba: 1, blocks: 7 },
                ])),
            },
            Entry { log_id: id(2, 3, 4), payload: RaftPayload::Normal(Request::Attach(3)) },
            Entry {
                log_id: id(2, 3, 5),
                payload: RaftPayload::Normal(Request::Fenced(
                    4,
                    vec![BlockOp::Write { lba: 2, data: vec![1; 4096].into() }],
                    Tag::default(),
                )),
            },
        ];
        for e in entries {
            let bytes = encode_entry(&e).to_vec();
            let back =
                decode_entry(e.log_id.index, e.log_id.leader_id.term, &bytes).expect("decode");
            assert_eq!(back, e);
        }
    }

    #[test]
    fn corrupt_membership_is_an_error() {
        use crate::entry::encode_parts;
        let bytes = encode_parts(1, BodyRef::Membership(&[0xff; 9]));
        let err = decode_entry(4, 1, &bytes).expect_err("garbage membership");
        assert!(err.contains("membership"), "{err}");
    }

    /// The bytes openraft 0.9.25 wrote for a membership (WAL membership entries, the image
    /// header, the hard state) and a snapshot meta (the snapshot stream's header, and so a
    /// staged or interrupted install on disk), derived from 0.9.25's field order
    /// (`Membership { configs, nodes }`, `StoredMembership { log_id, membership }`,
    /// `LogId { leader_id: { term, node_id }, index }`, `SnapshotMeta { last_log_id,
    /// last_membership, snapshot_id }`): 0.10 must read and write the same, so that no on-disk
    /// format changes with the upgrade.
    #[test]
    fn memberships_and_snapshot_metas_encode_as_under_openraft_0_9() {
        let nodes: BTreeMap<u64, BasicNode> =
            [(1, BasicNode::new("a")), (2, BasicNode::new("b"))].into();
        let membership = Membership::new(vec![[1, 2].into()], nodes).expect("membership");
        let m_bytes = [1, 2, 1, 2, 2, 1, 1, b'a', 2, 1, b'b'];
        assert_eq!(encode_membership(&membership), m_bytes);
        assert_eq!(decode_membership(&m_bytes).expect("decode"), membership);

        let meta = SnapshotMeta {
            last_log_id: Some(id(4, 2, 99)),
            last_membership: StoredMembership::new(Some(id(1, 2, 3)), membership),
        };
        let mut meta_bytes = vec![1, 4, 2, 99, 1, 1, 2, 3];
        meta_bytes.extend_from_slice(&m_bytes);
        // 0.10 writes the former `snapshot_id` as an empty string...
        let mut written = meta_bytes.clone();
        written.push(0);
        assert_eq!(postcard::to_allocvec(&meta).expect("encode"), written);
        // ...and reads (and ignores) the one 0.9 wrote.
        let mut from_09 = meta_bytes;
        from_09.extend_from_slice(&[4, b'4', b'-', b'2', b'-']);
        assert_eq!(postcard::from_bytes::<SnapshotMeta>(&from_09).expect("decode"), meta);
    }

    #[test]
    fn votes_and_log_ids_map_both_ways() {
        let mut v = openraft::Vote::new(7, 3);
        v.committed = true;
        assert_eq!(from_store_vote(to_store_vote(&v)), v);
        let l = id(4, 2, 99);
        assert_eq!(from_store_log_id(to_store_log_id(&l)), l);
    }
}
