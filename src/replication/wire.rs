//! The node protocol: every request a node serves and every answer it gives, as typed values,
//! and how they travel in the RPC layer's frames (`net`). A request is decoded once, here, into a
//! `NodeRequest`, with every limit a peer could push checked before anything acts on it; a
//! payload that does not decode exactly (unknown kind, trailing bytes, a field past its limit) is
//! refused as malformed, and the server closes that connection. Refusals carry an `ErrorCode`.
//!
//! Kinds: `RAFT` carries a postcard `RaftRpc` and answers a `RaftReply`; `WRITE` proposes a
//! `WriteRequest` and answers its entry's index once committed; `READ` answers a `BlocksReply`
//! from the leader's image after a linearizable check; `READ_LOCAL` one from any node's own image;
//! `REPAIR` offers a good copy of a block and answers whether it was rewritten; `ADMIN` carries
//! an `Admin` request and answers an `AdminReply`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::network::RaftRpc;
use super::snapshot::ReceivePhase;
use super::types::{NodeId, Request};
use crate::net::rpc::{Refusal, RpcError, CODE_FORBIDDEN, CODE_INTERNAL, CODE_MALFORMED};

pub const KIND_RAFT: u8 = 1;
pub const KIND_WRITE: u8 = 2;
pub const KIND_READ: u8 = 3;
pub const KIND_ADMIN: u8 = 4;
pub const KIND_READ_LOCAL: u8 = 5;
pub const KIND_REPAIR: u8 = 6;

/// Largest frame payload: a 4 MiB proposal or a snapshot record, with room for headers.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Largest `data` of a `BlocksReply`: a frame's payload less room for the rest of the reply.
pub const MAX_READ_BYTES: usize = MAX_PAYLOAD - (128 << 10);

// The rest of a `BlocksReply` (postcard varints: `applied` and the two lengths at most 10 bytes
// each, each listed block at most 10 + 5 + 5) fits the room left even if every block is listed.
const _: () = assert!(
    MAX_PAYLOAD - MAX_READ_BYTES
        >= 30 + MAX_READ_BYTES / crate::storage::superblock::MIN_BLOCK_BYTES as usize * 20
);

/// `READ_LOCAL`: blocks from one node's own image, leader or not.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LocalRead {
    pub lba: u64,
    pub blocks: u64,
    /// The node answers only once it has applied at least this log index.
    pub applied_at_least: u64,
}

/// `REPAIR`: a good copy of one block for a node whose copy failed its checksum.
#[derive(Debug, Serialize, Deserialize)]
pub struct Repair {
    pub lba: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// The answer to `READ` and `READ_LOCAL`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlocksReply {
    /// The node's applied log index when it read: the image held at least every entry up to it.
    /// For `READ`, taken after the linearizable check, so it covers every write committed before
    /// the read arrived.
    pub applied: u64,
    /// The blocks; those listed in `bad` are zero-filled, never the bytes that failed.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Blocks that failed their checksum on this node, in block order.
    pub bad: Vec<BadBlockReport>,
}

/// A block that failed its checksum on the node that answered (the node logs where it lies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadBlockReport {
    pub lba: u64,
    /// What the node's checksum table says the block holds.
    pub expected: u32,
    /// The checksum of what it read.
    pub found: u32,
}

/// Cluster management requests. Membership changes (`AddLearner`, `SetVoters`, `Remove`) must be
/// sent to the leader; another node refuses them, naming the leader it knows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Admin {
    /// Make a new cluster of these members (id, address) on a fresh node. Answers `Done`.
    Init(Vec<(NodeId, String)>),
    /// Add a learner (id, address). Answers `Index`, the log index of the membership entry, once
    /// that entry is committed; it does not wait for the learner to catch up, which for a large
    /// device means a snapshot lasting longer than any one request should. The learner has caught
    /// up once the leader's `replication` entry for it reaches that index; meanwhile the
    /// learner's own `snapshot_in` shows a snapshot arriving.
    AddLearner(NodeId, String),
    /// Make the voters exactly this set (learners not listed stay learners). Answers `Done` once
    /// the new configuration is committed.
    SetVoters(Vec<NodeId>),
    /// Remove a node (voter or learner): the leader stops replicating to it. A voter is first
    /// made a learner and given that configuration (waiting a few seconds for it to confirm),
    /// so it knows it may no longer vote and never campaigns once the leader stops contacting
    /// it. Refused for the leader itself: move leadership first (`Campaign` on another node).
    /// Answers `Done`.
    Remove(NodeId),
    /// Start an election on this node (leadership transfer to it). Answers `Done`.
    Campaign,
    /// Answers `Status`: this node's view.
    Status,
    /// To the leader: hand leadership to this node (openraft's `transfer_leader`: the node
    /// campaigns at once and the voters grant it despite the leader's lease, so it works while
    /// the leader is alive, unlike `Campaign`). Answers `Done`; ignored by a node not leading.
    Handover(NodeId),
    /// Serve the device from this node (`DeviceHost::attach`): lead, commit an attach entry
    /// that raises the attachment epoch, serve `/dev/ublkbN`. Answers `Attached`.
    Attach,
    /// Stop serving the device here and commit a detach entry. Answers `Done`.
    Detach,
}

/// A node serving the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// `/dev/ublkbN`.
    pub path: String,
    /// The attachment's epoch: its attach entry's log index.
    pub epoch: u64,
    pub term: u64,
    /// How long it took, from the request to the device being live.
    pub millis: u64,
    /// The device is the one this member's crashed daemon left, re-attached (the kernel
    /// reissued what it held); false: a new device.
    pub recovered: bool,
}

/// An incoming snapshot on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotTransfer {
    pub phase: ReceivePhase,
    /// Stream bytes staged so far.
    pub received: u64,
    /// Stream bytes of a whole snapshot of this device (its size plus one record head per
    /// chunk and a header record).
    pub total: u64,
}

/// A node's view, for `xdevice cluster status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub state: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub snapshot: Option<u64>,
    pub purged: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub nodes: BTreeMap<NodeId, String>,
    /// Per follower and learner: matched index (on the leader only).
    pub replication: BTreeMap<NodeId, Option<u64>>,
    /// The snapshot this node is receiving or installing, if any.
    pub snapshot_in: Option<SnapshotTransfer>,
    /// Snapshots this node has installed since its process started.
    pub snapshots_installed: u64,
    /// The attachment as of this node's applied index: (epoch, serving node, 0 once detached).
    pub attachment: Option<(u64, NodeId)>,
    /// Block-write entries this node skipped at apply because they came from a superseded
    /// attachment (since its process started).
    pub fenced_writes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AdminReply {
    Done,
    /// A membership change committed at this log index.
    Index(u64),
    Status(Box<NodeStatus>),
    Attached(Attached),
}

/// A `WRITE` on the wire: the proposal, and for a client that pipelines (`RemoteCluster`) its id
/// and this proposal's place in its order.
#[derive(Debug, Serialize, Deserialize)]
pub struct WriteRequest {
    pub origin: Option<(uuid::Uuid, u64)>,
    pub req: Request,
}

/// Members a membership request may name.
pub const MAX_MEMBERS: usize = 64;
/// Bytes of an address in a membership request.
pub const MAX_ADDR_BYTES: usize = 256;

/// Why a node refused a request: the code on the wire (the RPC layer's own below 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// The request did not decode, or broke a limit (the connection is closed after it).
    Malformed = CODE_MALFORMED,
    /// The node failed in a way that is not the request's fault.
    Internal = CODE_INTERNAL,
    /// The caller's certificate does not allow this request.
    Forbidden = CODE_FORBIDDEN,
    /// Only the leader answers this; the message names the leader this node knows.
    NotLeader = 100,
    /// Valid, but not now: the device is attaching or served by a member, votes are quiet.
    Refused = 101,
    /// A pipelined `WRITE` that is not after its client's newest one.
    StaleWrite = 102,
    /// Larger than this node takes (an entry past the WAL record limit, a read past a frame).
    TooLarge = 103,
    /// Raft or the storage failed the request, or the node is shutting down.
    Failed = 104,
    /// This node does not do that (it serves no device).
    Unsupported = 105,
    /// A code this side does not know (a newer peer).
    Unknown = u16::MAX,
}

impl ErrorCode {
    pub fn from_code(code: u16) -> ErrorCode {
        use ErrorCode::*;
        [Malformed, Internal, Forbidden, NotLeader, Refused, StaleWrite, TooLarge, Failed]
            .into_iter()
            .chain([Unsupported])
            .find(|c| *c as u16 == code)
            .unwrap_or(Unknown)
    }
}

/// A node's refusal as its client sees it, or why the call got no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    /// `None`: no answer came (unreachable, timed out, rejected connection).
    pub code: Option<ErrorCode>,
    pub message: String,
}

impl NodeError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> NodeError {
        NodeError { code: Some(code), message: message.into() }
    }

    /// Whether the node answered that it is not the leader.
    pub fn not_leader(&self) -> bool {
        self.code == Some(ErrorCode::NotLeader)
    }

    pub fn refusal(self) -> Refusal {
        Refusal::new(self.code.unwrap_or(ErrorCode::Failed) as u16, self.message)
    }
}

impl From<RpcError> for NodeError {
    fn from(e: RpcError) -> NodeError {
        match e {
            RpcError::Remote { code, message } => {
                NodeError { code: Some(ErrorCode::from_code(code)), message }
            }
            other => NodeError { code: None, message: other.to_string() },
        }
    }
}

impl From<NodeError> for String {
    fn from(e: NodeError) -> String {
        e.message
    }
}

/// A request to a node, decoded.
#[derive(Debug)]
pub enum NodeRequest {
    Raft(RaftRpc),
    Write(WriteRequest),
    /// A linearizable read of `blocks` blocks at `lba` on the leader.
    Read {
        lba: u64,
        blocks: u64,
    },
    ReadLocal(LocalRead),
    Repair(Repair),
    Admin(Admin),
}

impl NodeRequest {
    pub fn kind(&self) -> u8 {
        match self {
            NodeRequest::Raft(_) => KIND_RAFT,
            NodeRequest::Write(_) => KIND_WRITE,
            NodeRequest::Read { .. } => KIND_READ,
            NodeRequest::ReadLocal(_) => KIND_READ_LOCAL,
            NodeRequest::Repair(_) => KIND_REPAIR,
            NodeRequest::Admin(_) => KIND_ADMIN,
        }
    }

    /// The frame kind and payload.
    pub fn encode(&self) -> Result<(u8, Vec<u8>), NodeError> {
        let bytes = match self {
            NodeRequest::Raft(r) => encode(r),
            NodeRequest::Write(w) => encode(w),
            NodeRequest::Read { lba, blocks } => encode(&(lba, blocks)),
            NodeRequest::ReadLocal(r) => encode(r),
            NodeRequest::Repair(r) => encode(r),
            NodeRequest::Admin(a) => encode(a),
        }?;
        Ok((self.kind(), bytes))
    }

    /// Decodes a request of `kind`: exactly the payload, every limit checked.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<NodeRequest, NodeError> {
        let request = match kind {
            KIND_RAFT => NodeRequest::Raft(exact(payload, "Raft RPC")?),
            KIND_WRITE => NodeRequest::Write(exact(payload, "write")?),
            KIND_READ => {
                let (lba, blocks) = exact(payload, "read")?;
                NodeRequest::Read { lba, blocks }
            }
            KIND_READ_LOCAL => NodeRequest::ReadLocal(exact(payload, "local read")?),
            KIND_REPAIR => NodeRequest::Repair(exact(payload, "repair")?),
            KIND_ADMIN => NodeRequest::Admin(exact(payload, "admin request")?),
            other => {
                return Err(NodeError::new(
                    ErrorCode::Malformed,
                    format!("unknown request kind {other}"),
                ))
            }
        };
        request.check_limits()?;
        Ok(request)
    }

    fn check_limits(&self) -> Result<(), NodeError> {
        let bad = |m: String| Err(NodeError::new(ErrorCode::Malformed, m));
        let min_block = u64::from(crate::storage::superblock::MIN_BLOCK_BYTES);
        let blocks_ok = |blocks: u64| blocks >= 1 && blocks <= MAX_READ_BYTES as u64 / min_block;
        match self {
            NodeRequest::Read { blocks, .. } | NodeRequest::ReadLocal(LocalRead { blocks, .. })
                if !blocks_ok(*blocks) =>
            {
                bad(format!(
                    "a read of {blocks} blocks (1 to {} allowed)",
                    MAX_READ_BYTES as u64 / min_block
                ))
            }
            NodeRequest::Admin(admin) => admin.check_limits().or_else(bad),
            _ => Ok(()),
        }
    }
}

impl Admin {
    fn check_limits(&self) -> Result<(), String> {
        let member = |id: NodeId, addr: &str| -> Result<(), String> {
            if id == 0 {
                return Err("node id 0 is not a member's id".to_string());
            }
            if addr.len() > MAX_ADDR_BYTES {
                return Err(format!(
                    "an address of {} bytes (at most {MAX_ADDR_BYTES})",
                    addr.len()
                ));
            }
            Ok(())
        };
        let count = |n: usize| {
            if n == 0 || n > MAX_MEMBERS {
                Err(format!("{n} members named (1 to {MAX_MEMBERS} allowed)"))
            } else {
                Ok(())
            }
        };
        match self {
            Admin::Init(members) => {
                count(members.len())?;
                members.iter().try_for_each(|(id, addr)| member(*id, addr))
            }
            Admin::AddLearner(id, addr) => member(*id, addr),
            Admin::SetVoters(ids) => {
                count(ids.len())?;
                ids.iter().try_for_each(|id| member(*id, ""))
            }
            Admin::Remove(id) | Admin::Handover(id) => member(*id, ""),
            Admin::Campaign | Admin::Status | Admin::Attach | Admin::Detach => Ok(()),
        }
    }
}

/// The postcard encoding of `v`.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, NodeError> {
    postcard::to_allocvec(v)
        .map_err(|e| NodeError::new(ErrorCode::Internal, format!("encode: {e}")))
}

/// Decodes exactly `bytes` as a `what`: trailing bytes are malformed too.
pub fn exact<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, NodeError> {
    let malformed =
        |m: String| NodeError::new(ErrorCode::Malformed, format!("malformed {what}: {m}"));
    match postcard::take_from_bytes(bytes) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(malformed(format!("{} bytes after its end", rest.len()))),
        Err(e) => Err(malformed(e.to_string())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_trailing_bytes_are_malformed() {
        let requests = [
            NodeRequest::Read { lba: 7, blocks: 2 },
            NodeRequest::ReadLocal(LocalRead { lba: 1, blocks: 1, applied_at_least: 9 }),
            NodeRequest::Repair(Repair { lba: 3, data: vec![1; 4096] }),
            NodeRequest::Admin(Admin::Init(vec![(1, "127.0.0.1:1".into())])),
            NodeRequest::Write(WriteRequest { origin: None, req: Request::Flush }),
        ];
        for r in requests {
            let (kind, mut bytes) = r.encode().unwrap();
            let back = NodeRequest::decode(kind, &bytes).unwrap();
            assert_eq!(format!("{back:?}"), format!("{r:?}"));
            bytes.push(0);
            let e = NodeRequest::decode(kind, &bytes).unwrap_err();
            assert_eq!(e.code, Some(ErrorCode::Malformed));
            assert!(e.message.contains("1 bytes after its end"), "{e}");
        }
    }

    #[test]
    fn limits_are_checked_on_decode() {
        let cases: Vec<(NodeRequest, &str)> = vec![
            (NodeRequest::Read { lba: 0, blocks: 0 }, "a read of 0 blocks"),
            (NodeRequest::Read { lba: 0, blocks: u64::MAX }, "a read of 18446744073709551615"),
            (NodeRequest::Admin(Admin::Init(Vec::new())), "0 members named"),
            (
                NodeRequest::Admin(Admin::Init((1..=65).map(|i| (i, String::new())).collect())),
                "65 members named",
            ),
            (NodeRequest::Admin(Admin::AddLearner(0, "a".into())), "node id 0"),
            (NodeRequest::Admin(Admin::AddLearner(4, "a".repeat(300))), "an address of 300 bytes"),
            (NodeRequest::Admin(Admin::SetVoters(vec![1, 0])), "node id 0"),
        ];
        for (r, want) in cases {
            let (kind, bytes) = r.encode().unwrap();
            let e = NodeRequest::decode(kind, &bytes).unwrap_err();
            assert_eq!(e.code, Some(ErrorCode::Malformed), "{r:?}");
            assert!(e.message.contains(want), "{r:?}: {e}");
        }
        let e = NodeRequest::decode(99, &[]).unwrap_err();
        assert!(e.message.contains("unknown request kind 99"), "{e}");
    }

    #[test]
    fn codes_survive_the_wire_and_unknown_codes_stay_unknown() {
        for code in [ErrorCode::NotLeader, ErrorCode::Refused, ErrorCode::Malformed] {
            let r = NodeError::new(code, "x").refusal();
            let back = Refusal::decode(&r.encode(100)).unwrap();
            let e = NodeError::from(RpcError::Remote { code: back.code, message: back.message });
            assert_eq!(e.code, Some(code));
        }
        assert_eq!(ErrorCode::from_code(7), ErrorCode::Unknown);
    }
}
