//! Raft RPCs behind one interface. openraft talks to `NetworkFactory`; it forwards each RPC as a
//! `RaftRpc` through a `Transport`: `LocalRouter` (replicas in one process, the embedded mode) or
//! TCP between processes (`tcp`). The receiving side answers with `dispatch`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::{Deserialize, Serialize};

use super::election::{ElectionGate, PreVoteReply, PreVoteRequest};
use super::types::{NodeId, Raft, TypeConfig};

/// A Raft RPC on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    PreVote(PreVoteRequest),
}

/// Its answer, with the remote Raft's own error when it refused.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    PreVote(PreVoteReply),
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why an RPC did not reach its target.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The peer cannot be reached now; openraft backs off.
    #[error("node {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The exchange failed in a way a retry may fix (timeout, reset mid-call).
    #[error("RPC to node {0} failed: {1}")]
    Failed(NodeId, String),
    /// The request encodes to more bytes (`.1`) than the transport carries in one message (`.2`).
    #[error("RPC to node {0} of {1} bytes exceeds the {2}-byte message limit")]
    TooLarge(NodeId, usize, usize),
}

/// Delivers RPCs to other replicas.
pub trait Transport: Send + Sync + 'static {
    fn call(
        &self,
        target: NodeId,
        node: &BasicNode,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> BoxFuture<Result<RaftReply, TransportError>>;
}

/// Answers an RPC with the local Raft; `gate` is that replica's (see `election`): accepted
/// AppendEntries and snapshot chunks count as hearing from the leader, and pre-votes are
/// answered there.
pub async fn dispatch(raft: &Raft, gate: &ElectionGate, rpc: RaftRpc) -> RaftReply {
    match rpc {
        RaftRpc::Append(r) => {
            let reply = raft.append_entries(r).await;
            // Anything but a higher vote: the sender is the leader this replica follows.
            if reply.as_ref().is_ok_and(|r| !matches!(r, AppendEntriesResponse::HigherVote(_))) {
                gate.heard_leader();
            }
            RaftReply::Append(reply)
        }
        RaftRpc::Vote(r) => RaftReply::Vote(raft.vote(r).await),
        RaftRpc::Snapshot(r) => {
            let vote = r.vote;
            let mut receiving = gate.receiving();
            let reply = raft.install_snapshot(r).await;
            // Accepted: this replica's vote is not above the sender's.
            receiving.accepted = reply.as_ref().is_ok_and(|resp| resp.vote <= vote);
            RaftReply::Snapshot(reply)
        }
        RaftRpc::PreVote(r) => RaftReply::PreVote(gate.answer(&r)),
    }
}

/// openraft's network factory for one replica.
#[derive(Clone)]
pub struct NetworkFactory {
    transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for NetworkFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkFactory").finish_non_exhaustive()
    }
}

impl NetworkFactory {
    pub fn new(transport: Arc<dyn Transport>) -> NetworkFactory {
        NetworkFactory { transport }
    }
}

/// AppendEntries carrying more entry bytes than this go to a peer whose log is not known to
/// match first as a probe without entries (see `PeerNetwork::append_entries`).
const PROBE_ABOVE_BYTES: usize = 1 << 20;

/// The most entry bytes one AppendEntries carries when it has more than one entry: one of the
/// device's largest proposals. openraft 0.9 gives every AppendEntries the heartbeat interval to
/// complete, and a follower answers only once the entries are durable, so a request must be
/// small enough to transfer and sync within it; three 4 MiB entries at once timed out at 30 ms
/// on every retry, and the follower never caught up.
const APPEND_BUDGET_BYTES: usize = 4 << 20;

/// The link to one peer.
pub struct PeerNetwork {
    target: NodeId,
    node: BasicNode,
    transport: Arc<dyn Transport>,
    /// The newest log id this peer answered it holds (None: unknown, or it conflicted).
    matched: Option<openraft::LogId<NodeId>>,
}

impl std::fmt::Debug for PeerNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNetwork").field("target", &self.target).finish_non_exhaustive()
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        PeerNetwork { target, node: node.clone(), transport: self.transport.clone(), matched: None }
    }
}

/// An entry's block data bytes (what makes an AppendEntries large).
fn entry_bytes(e: &openraft::Entry<TypeConfig>) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(r) => r.payload_len(),
        _ => 0,
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl PeerNetwork {
    async fn call(&self, rpc: RaftRpc, option: &RPCOption) -> Result<RaftReply, TransportError> {
        self.transport.call(self.target, &self.node, rpc, option.hard_ttl()).await
    }

    fn lift<E: std::error::Error>(
        &self,
        e: TransportError,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        match e {
            TransportError::Unreachable(..) => {
                RPCError::Unreachable(Unreachable::new(&AnyError::error(e.to_string())))
            }
            TransportError::Failed(..) | TransportError::TooLarge(..) => {
                RPCError::Network(NetworkError::new(&AnyError::error(e.to_string())))
            }
        }
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e))
    }

    fn mismatch<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::Network(NetworkError::new(&AnyError::error(format!(
            "node {} answered with a reply of the wrong kind",
            self.target
        ))))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let entries = rpc.entries.len() as u64;
        // openraft finds where a follower's log matches by sending AppendEntries with entries
        // attached, and with large entries such a probe (to a new learner, say) can be too big
        // to transfer within the heartbeat-long timeout, for ever: then the follower never
        // answers "conflict" and is never sent the snapshot it needs. So a large request to a
        // peer not known to hold `prev_log_id` first goes without entries. Whether the peer
        // holds `prev_log_id` decides conflict alone, so a conflict (or a higher vote) answers
        // the real request too; success means the entries are worth sending.
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        let bytes: usize = rpc.entries.iter().map(entry_bytes).sum();
        if entries > 1 && bytes > APPEND_BUDGET_BYTES {
            // openraft resends at once with at most this many entries (for its next few
            // requests): the longest prefix within the budget, at least one entry.
            let mut fit = 0u64;
            let mut sum = 0;
            for e in &rpc.entries {
                sum += entry_bytes(e);
                if sum > APPEND_BUDGET_BYTES {
                    break;
                }
                fit += 1;
            }
            let hint = fit.clamp(1, entries - 1);
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint)));
        }
        if bytes > PROBE_ABOVE_BYTES && rpc.prev_log_id.is_some() && self.matched != rpc.prev_log_id
        {
            let probe = AppendEntriesRequest {
                vote: rpc.vote,
                prev_log_id: rpc.prev_log_id,
                leader_commit: rpc.leader_commit,
                entries: Vec::new(),
            };
            match self.call(RaftRpc::Append(probe), &option).await.map_err(|e| self.lift(e))? {
                RaftReply::Append(Ok(AppendEntriesResponse::Success)) => {
                    self.matched = rpc.prev_log_id;
                }
                RaftReply::Append(Ok(other)) => {
                    self.matched = None;
                    return Ok(other);
                }
                RaftReply::Append(Err(e)) => return Err(self.remote(e)),
                _ => return Err(self.mismatch()),
            }
        }
        let reply = match self.call(RaftRpc::Append(rpc), &option).await {
            // Too many large entries for one message (a follower far behind on 4 MiB writes):
            // openraft retries at once with at most the hinted number. Without this the same
            // batch would be refused forever and the follower never catch up.
            Err(TransportError::TooLarge(_, bytes, limit)) if entries > 1 => {
                let fit = entries * limit as u64 / (bytes as u64).max(1);
                let hint = fit.clamp(1, entries - 1);
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(hint)));
            }
            r => r.map_err(|e| self.lift(e))?,
        };
        let reply = match reply {
            RaftReply::Append(r) => r.map_err(|e| self.remote(e))?,
            _ => return Err(self.mismatch()),
        };
        self.matched = match &reply {
            AppendEntriesResponse::Success => last,
            AppendEntriesResponse::PartialSuccess(upto) => *upto,
            _ => None,
        };
        Ok(reply)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.call(RaftRpc::Snapshot(rpc), &option).await.map_err(|e| self.lift(e))? {
            RaftReply::Snapshot(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatch()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(RaftRpc::Vote(rpc), &option).await.map_err(|e| self.lift(e))? {
            RaftReply::Vote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatch()),
        }
    }

    /// How long replication to an unreachable peer pauses between attempts. openraft's default
    /// is a flat 500 ms, so a peer back from a partition or a restart would wait up to that long
    /// before it is sent what it missed, and a stale peer is a poor candidate if the leader fails
    /// again meanwhile. Start at 10 ms and double to 200 ms: a returning peer catches up within
    /// a few heartbeats, and a peer that stays down costs at most five attempts a second (the
    /// TCP transport paces its reconnects on its own besides).
    fn backoff(&self) -> Backoff {
        Backoff::new(
            std::iter::successors(Some(Duration::from_millis(10)), |d| Some(*d * 2))
                .map(|d| d.min(Duration::from_millis(200))),
        )
    }
}

/// In-process delivery between replicas of one process. Links can be cut, to test partitions.
#[derive(Default)]
pub struct LocalRouter {
    nodes: RwLock<HashMap<NodeId, (Raft, ElectionGate)>>,
    isolated: Mutex<HashSet<NodeId>>,
}

impl std::fmt::Debug for LocalRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRouter").finish_non_exhaustive()
    }
}

impl LocalRouter {
    pub fn register(&self, id: NodeId, raft: Raft, gate: ElectionGate) {
        self.nodes.write().expect("router lock").insert(id, (raft, gate));
    }
    pub fn unregister(&self, id: NodeId) {
        self.nodes.write().expect("router lock").remove(&id);
    }
    /// Cuts (or restores) every link to and from `id`.
    pub fn isolate(&self, id: NodeId, isolated: bool) {
        let mut set = self.isolated.lock().expect("router lock");
        if isolated {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }
    fn is_isolated(&self, id: NodeId) -> bool {
        self.isolated.lock().expect("router lock").contains(&id)
    }
}

/// A `LocalRouter` as seen from one replica (so cuts apply to both directions).
#[derive(Clone, Debug)]
pub struct LocalTransport {
    pub router: Arc<LocalRouter>,
    pub me: NodeId,
}

impl Transport for LocalTransport {
    fn call(
        &self,
        target: NodeId,
        _node: &BasicNode,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> BoxFuture<Result<RaftReply, TransportError>> {
        let router = self.router.clone();
        let me = self.me;
        Box::pin(async move {
            if router.is_isolated(me) || router.is_isolated(target) {
                return Err(TransportError::Unreachable(target, "link cut".into()));
            }
            let node = router.nodes.read().expect("router lock").get(&target).cloned();
            let Some((raft, gate)) = node else {
                return Err(TransportError::Unreachable(target, "not running".into()));
            };
            match tokio::time::timeout(timeout, dispatch(&raft, &gate, rpc)).await {
                Ok(reply) => Ok(reply),
                Err(_) => {
                    Err(TransportError::Failed(target, format!("timed out after {timeout:?}")))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use openraft::{Entry, EntryPayload, LogId, Vote};

    use super::*;

    /// Refuses every request as too large for one message, as TCP does past `MAX_PAYLOAD`.
    struct Small;

    impl Transport for Small {
        fn call(
            &self,
            target: NodeId,
            _node: &BasicNode,
            _rpc: RaftRpc,
            _timeout: Duration,
        ) -> BoxFuture<Result<RaftReply, TransportError>> {
            Box::pin(async move { Err(TransportError::TooLarge(target, 40 << 20, 16 << 20)) })
        }
    }

    fn append(entries: u64) -> AppendEntriesRequest<TypeConfig> {
        let entry = |i| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), i),
            payload: EntryPayload::Blank,
        };
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: (1..=entries).map(entry).collect(),
        }
    }

    #[tokio::test]
    async fn too_many_entries_for_one_message_ask_openraft_for_fewer() {
        let mut peer = PeerNetwork {
            target: 2,
            node: BasicNode::new("x"),
            transport: Arc::new(Small),
            matched: None,
        };
        let option = RPCOption::new(Duration::from_secs(1));
        // 10 entries in 40 MiB through 16 MiB messages: 4 fit.
        match peer.append_entries(append(10), option.clone()).await {
            Err(RPCError::PayloadTooLarge(p)) => assert_eq!(p.entries_hint(), 4),
            other => panic!("{other:?}"),
        }
        // One entry cannot be split: an ordinary network error, not an endless retry.
        match peer.append_entries(append(1), option).await {
            Err(RPCError::Network(e)) => assert!(e.to_string().contains("message limit"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// Answers AppendEntries like a follower holding the log up to `holds`, recording how many
    /// entries each request carried.
    struct Follower {
        holds: Mutex<u64>,
        seen: Mutex<Vec<usize>>,
    }

    impl Transport for Arc<Follower> {
        fn call(
            &self,
            _target: NodeId,
            _node: &BasicNode,
            rpc: RaftRpc,
            _timeout: Duration,
        ) -> BoxFuture<Result<RaftReply, TransportError>> {
            let RaftRpc::Append(req) = rpc else { panic!("not an append") };
            self.seen.lock().expect("seen").push(req.entries.len());
            let mut holds = self.holds.lock().expect("holds");
            let reply = match req.prev_log_id {
                Some(p) if p.index > *holds => AppendEntriesResponse::Conflict,
                _ => {
                    if let Some(last) = req.entries.last() {
                        *holds = last.log_id.index;
                    }
                    AppendEntriesResponse::Success
                }
            };
            Box::pin(async move { Ok(RaftReply::Append(Ok(reply))) })
        }
    }

    fn big_append(prev: u64, entries: u64) -> AppendEntriesRequest<TypeConfig> {
        use crate::entry::BlockOp;
        use crate::replication::types::Request;
        let id = |i| LogId::new(openraft::CommittedLeaderId::new(1, 1), i);
        let entry = |i| Entry::<TypeConfig> {
            log_id: id(i),
            payload: EntryPayload::Normal(Request::blocks(vec![BlockOp::Write {
                lba: 0,
                data: vec![1; 3 << 19].into(),
            }])),
        };
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(id(prev)),
            leader_commit: None,
            entries: (prev + 1..=prev + entries).map(entry).collect(),
        }
    }

    #[tokio::test]
    async fn a_large_append_to_an_unmatched_peer_probes_without_entries_first() {
        let follower = Arc::new(Follower { holds: Mutex::new(3), seen: Mutex::new(Vec::new()) });
        let mut peer = PeerNetwork {
            target: 2,
            node: BasicNode::new("x"),
            transport: Arc::new(follower.clone()),
            matched: None,
        };
        let option = RPCOption::new(Duration::from_secs(1));
        // The peer lacks index 5: the probe's conflict answers, the entries never travel.
        let r = peer.append_entries(big_append(5, 2), option.clone()).await.expect("append");
        assert_eq!(r, AppendEntriesResponse::Conflict);
        assert_eq!(*follower.seen.lock().expect("seen"), vec![0]);
        // It holds index 3: probe, then the entries.
        let r = peer.append_entries(big_append(3, 2), option.clone()).await.expect("append");
        assert_eq!(r, AppendEntriesResponse::Success);
        assert_eq!(*follower.seen.lock().expect("seen"), vec![0, 0, 2]);
        // Matched at 5 now: the next request goes straight away.
        let r = peer.append_entries(big_append(5, 2), option.clone()).await.expect("append");
        assert_eq!(r, AppendEntriesResponse::Success);
        assert_eq!(*follower.seen.lock().expect("seen"), vec![0, 0, 2, 2]);
        assert_eq!(*follower.holds.lock().expect("holds"), 7);
        // Three 1.5 MiB entries exceed one request's 4 MiB: openraft is asked for two.
        match peer.append_entries(big_append(7, 3), option).await {
            Err(RPCError::PayloadTooLarge(p)) => assert_eq!(p.entries_hint(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(follower.seen.lock().expect("seen").len(), 4, "nothing sent");
    }
}
