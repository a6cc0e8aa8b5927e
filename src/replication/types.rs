//! The openraft type configuration and the conversions between openraft's entries and the
//! storage engine's log records. Pure: no I/O.

use openraft::{BasicNode, EntryPayload as RaftPayload, Membership};
use serde::{Deserialize, Serialize};

use crate::entry::{encode_shared, encoded_len, BlockOp, BodyRef, EntryBody, EntryPayload};
use crate::storage::state::{LogId as StoreLogId, Vote as StoreVote};
use crate::storage::wal::Payload;

use super::commits::Tag;
use super::snapshot::SnapshotData;

/// What a client proposes: block changes, or a flush barrier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Block writes and zero-fills, applied in order; the tag (never encoded) lets a proposer
    /// in this process learn when the entry commits (`commits`).
    Blocks(Vec<BlockOp>, #[serde(skip)] Tag),
    /// A barrier: committing it commits every entry before it.
    Flush,
}

impl Request {
    /// Block changes without a tag (a proposer that learns of the commit from the answer).
    pub fn blocks(ops: Vec<BlockOp>) -> Request {
        Request::Blocks(ops, Tag::default())
    }

    /// The bytes of the WAL record payload an entry of this request takes (`encode_entry`).
    pub fn payload_len(&self) -> usize {
        match self {
            Request::Blocks(ops, _) => encoded_len(BodyRef::Blocks(ops)),
            Request::Flush => encoded_len(BodyRef::Flush),
        }
    }
}

/// What applying an entry answers: the index it was applied at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub index: u64,
}

openraft::declare_raft_types!(
    /// xdevice's Raft: node ids are u64, nodes carry their RPC address.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotData,
);

pub type NodeId = u64;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Raft = openraft::Raft<TypeConfig>;

pub fn to_store_log_id(id: &LogId) -> StoreLogId {
    StoreLogId { term: id.leader_id.term, node: id.leader_id.node_id, index: id.index }
}

pub fn from_store_log_id(id: StoreLogId) -> LogId {
    openraft::LogId::new(openraft::CommittedLeaderId::new(id.term, id.node), id.index)
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
pub fn encode_membership(m: &Membership<NodeId, BasicNode>) -> Vec<u8> {
    // Serializing plain in-memory collections into a Vec cannot fail.
    postcard::to_allocvec(m).unwrap_or_default()
}

/// Decodes a membership written by `encode_membership`.
pub fn decode_membership(bytes: &[u8]) -> Result<Membership<NodeId, BasicNode>, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("undecodable membership: {e}"))
}

/// The record payload of an entry, as the WAL stores it, sharing the entry's block data.
pub fn encode_entry(entry: &Entry) -> Payload {
    let leader = entry.log_id.leader_id.node_id;
    match &entry.payload {
        RaftPayload::Blank => encode_shared(leader, BodyRef::Blank),
        RaftPayload::Normal(Request::Blocks(ops, _)) => encode_shared(leader, BodyRef::Blocks(ops)),
        RaftPayload::Normal(Request::Flush) => encode_shared(leader, BodyRef::Flush),
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
        RaftPayload::Membership(m) => EntryBody::Membership(encode_membership(&m)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn id(term: u64, node: u64, index: u64) -> LogId {
        openraft::LogId::new(openraft::CommittedLeaderId::new(term, node), index)
    }

    #[test]
    fn entries_round_trip_through_wal_payloads() {
        let nodes: BTreeMap<u64, BasicNode> =
            (1..=3).map(|n| (n, BasicNode::new(format!("127.0.0.{n}:7000")))).collect();
        let members: BTreeSet<u64> = nodes.keys().copied().collect();
        let membership = Membership::new(vec![members], nodes);
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

    #[test]
    fn votes_and_log_ids_map_both_ways() {
        let mut v = openraft::Vote::new(7, 3);
        v.committed = true;
        assert_eq!(from_store_vote(to_store_vote(&v)), v);
        let l = id(4, 2, 99);
        assert_eq!(from_store_log_id(to_store_log_id(&l)), l);
    }
}
