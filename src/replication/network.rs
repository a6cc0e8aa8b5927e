//! Raft RPCs behind one interface. openraft talks to `NetworkFactory`; it forwards each RPC as a
//! `RaftRpc` through a `Transport`: `LocalRouter` (replicas in one process, the embedded mode) or
//! TCP between processes (`tcp`). The receiving side answers with `dispatch`.

use openraft::async_runtime::WatchReceiver;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, RaftNetworkV2};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::snapshot::SnapshotData;
use super::state_machine::StateMachine;
use super::types::{LogId, NodeId, Raft, Snapshot, SnapshotMeta, TypeConfig, Vote};

/// A Raft RPC on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRpc {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<TypeConfig>),
    /// openraft 0.10's pre-vote: "would you vote for me", without raising any term.
    PreVote(VoteRequest<TypeConfig>),
    Snapshot(SnapshotChunk),
    /// The leader hands its leadership to the receiver (`Trigger::transfer_leader`): the
    /// receiver campaigns at once, and the other voters grant it despite the leader's lease.
    TransferLeader(TransferLeaderRequest<TypeConfig>),
}

/// Its answer, with the remote Raft's own error when it refused.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    Append(Result<AppendEntriesResponse<TypeConfig>, RaftError<TypeConfig>>),
    Vote(Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>>),
    PreVote(Result<VoteResponse<TypeConfig>, RaftError<TypeConfig>>),
    /// The receiver's vote (a higher one ends the transfer), or why the chunk was refused.
    Snapshot(Result<SnapshotResponse<TypeConfig>, String>),
    TransferLeader(Result<TransferLeaderResponse<TypeConfig>, String>),
}

/// One record of a snapshot stream (`snapshot`), sent in order from offset 0; the last one
/// (`done`) has the receiver install the whole staged stream through openraft.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    pub done: bool,
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

/// The receiving side of snapshot transfers for one replica. openraft 0.10 leaves sending a
/// snapshot to the application (`RaftNetworkV2::full_snapshot`) and installs it only once it is
/// whole (`Raft::install_full_snapshot`): chunks are staged here, in order, into the state
/// machine's staged stream, and the last one hands the staged stream to openraft, which installs
/// it through `StateMachine::install_snapshot` (verified whole, then installed under a durable
/// intent). Only one snapshot is received at a time; a chunk at offset 0 starts over.
pub struct SnapshotInbox {
    sm: StateMachine,
    incoming: tokio::sync::Mutex<Option<Incoming>>,
}

struct Incoming {
    vote: Vote,
    last_log_id: Option<LogId>,
    next: u64,
    data: SnapshotData,
}

impl std::fmt::Debug for SnapshotInbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotInbox").finish_non_exhaustive()
    }
}

impl SnapshotInbox {
    /// `sm` is a handle on the replica's state machine (the one given to openraft).
    pub fn new(sm: StateMachine) -> Arc<SnapshotInbox> {
        Arc::new(SnapshotInbox { sm, incoming: tokio::sync::Mutex::new(None) })
    }

    /// Stages one chunk; the last one installs the snapshot through `raft`.
    pub async fn receive(
        &self,
        raft: &Raft,
        chunk: SnapshotChunk,
    ) -> Result<SnapshotResponse<TypeConfig>, String> {
        // A sender whose vote is below ours is not our leader: answer our vote, which ends its
        // transfer (openraft sees the higher vote). openraft checks again at install.
        let mine = raft.metrics().borrow_watched().vote;
        if chunk.vote < mine {
            return Ok(SnapshotResponse::new(mine));
        }
        let mut incoming = self.incoming.lock().await;
        if chunk.offset == 0 {
            let data = self.sm.begin_receiving().await.map_err(|e| e.to_string())?;
            *incoming = Some(Incoming {
                vote: chunk.vote,
                last_log_id: chunk.meta.last_log_id,
                next: 0,
                data,
            });
        }
        let Some(inc) = incoming.as_mut() else {
            return Err(format!("snapshot chunk at {} without its start", chunk.offset));
        };
        if inc.vote != chunk.vote || inc.last_log_id != chunk.meta.last_log_id {
            return Err("snapshot chunk of another transfer than the one being received".into());
        }
        if chunk.offset != inc.next {
            return Err(format!("snapshot chunk at {}, expected {}", chunk.offset, inc.next));
        }
        inc.data.stage(&chunk.data).await.map_err(|e| format!("staging a snapshot: {e}"))?;
        inc.next += chunk.data.len() as u64;
        if !chunk.done {
            return Ok(SnapshotResponse::new(mine));
        }
        let Some(inc) = incoming.take() else {
            return Err("snapshot transfer vanished".into());
        };
        let snapshot = Snapshot { meta: chunk.meta, snapshot: inc.data };
        raft.install_full_snapshot(chunk.vote, snapshot).await.map_err(|e| e.to_string())
    }
}

/// Answers an RPC with the local Raft; snapshot chunks go through the replica's `inbox`.
pub async fn dispatch(raft: &Raft, inbox: &SnapshotInbox, rpc: RaftRpc) -> RaftReply {
    match rpc {
        RaftRpc::Append(r) => RaftReply::Append(raft.append_entries(r).await),
        RaftRpc::Vote(r) => RaftReply::Vote(raft.vote(r).await),
        RaftRpc::PreVote(r) => RaftReply::PreVote(raft.pre_vote(r).await),
        RaftRpc::Snapshot(c) => RaftReply::Snapshot(inbox.receive(raft, c).await),
        RaftRpc::TransferLeader(r) => RaftReply::TransferLeader(
            raft.handle_transfer_leader(r).await.map_err(|e| e.to_string()),
        ),
    }
}

/// openraft's network factory for one replica.
#[derive(Clone)]
pub struct NetworkFactory {
    transport: Arc<dyn Transport>,
    append_timeout: Duration,
}

impl std::fmt::Debug for NetworkFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkFactory").finish_non_exhaustive()
    }
}

impl NetworkFactory {
    /// `append_timeout`: how long an AppendEntries carrying entries may take (see
    /// `PeerNetwork::append_entries`); openraft gives every RPC one heartbeat interval.
    pub fn new(transport: Arc<dyn Transport>, append_timeout: Duration) -> NetworkFactory {
        NetworkFactory { transport, append_timeout }
    }
}

/// AppendEntries carrying more entry bytes than this go to a peer whose log is not known to
/// match first as a probe without entries (see `PeerNetwork::append_entries`).
const PROBE_ABOVE_BYTES: usize = 1 << 20;

/// The most entry bytes one AppendEntries carries when it has more than one entry: one of the
/// device's largest proposals. openraft gives every RPC the heartbeat interval to complete, and
/// a follower answers only once the entries are durable: three 4 MiB entries at once timed out
/// at 30 ms on every retry, and the follower never caught up. A request carrying entries now
/// gets up to the election timeout (`PeerNetwork::call_append`); the bound still keeps each
/// request's memory and the cost of a retry small.
const APPEND_BUDGET_BYTES: usize = 4 << 20;

/// The link to one peer.
pub struct PeerNetwork {
    target: NodeId,
    node: BasicNode,
    transport: Arc<dyn Transport>,
    /// The newest log id this peer answered it holds (None: unknown, or it conflicted).
    matched: Option<LogId>,
    append_timeout: Duration,
}

impl std::fmt::Debug for PeerNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNetwork").field("target", &self.target).finish_non_exhaustive()
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        PeerNetwork {
            target,
            node: node.clone(),
            transport: self.transport.clone(),
            matched: None,
            append_timeout: self.append_timeout,
        }
    }
}

/// An entry's block data bytes (what makes an AppendEntries large).
fn entry_bytes(e: &super::types::Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(r) => r.payload_len(),
        _ => 0,
    }
}

/// How many of `entries` fit within `budget` bytes of entry data: the longest prefix, at least
/// one entry.
fn fitting(entries: &[super::types::Entry], budget: usize) -> usize {
    let mut sum = 0;
    let mut fit = 0;
    for e in entries {
        sum += entry_bytes(e);
        if sum > budget {
            break;
        }
        fit += 1;
    }
    fit.max(1)
}

type RpcResult<T> = Result<T, RPCError<TypeConfig>>;

impl PeerNetwork {
    async fn call(&self, rpc: RaftRpc, option: &RPCOption) -> Result<RaftReply, TransportError> {
        self.transport.call(self.target, &self.node, rpc, option.hard_ttl()).await
    }

    /// An AppendEntries carrying entries waits for the follower's durable write of them, which
    /// under load (4 MiB entries, a busy disk or CPU) takes longer than the heartbeat interval
    /// openraft allows every RPC. Timed out, the request was not undone: the follower still
    /// writes it, openraft sends the same entries again after a backoff, and a follower slower
    /// than one heartbeat per request never catches up (a guest under emulation stalled so).
    /// Such a request may take up to `append_timeout` (the longest election timeout): a
    /// follower this slow does not depose the leader meanwhile, as pre-vote needs the other
    /// voters' leases to have expired too. Heartbeats keep the heartbeat-long limit.
    async fn call_append(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<RaftReply, TransportError> {
        let ttl = if rpc.entries.is_empty() {
            option.hard_ttl()
        } else {
            option.hard_ttl().max(self.append_timeout)
        };
        self.transport.call(self.target, &self.node, RaftRpc::Append(rpc), ttl).await
    }

    fn lift<E: std::error::Error>(&self, e: TransportError) -> RPCError<TypeConfig, E> {
        match e {
            TransportError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&e)),
            TransportError::Failed(..) | TransportError::TooLarge(..) => {
                RPCError::Network(NetworkError::new(&e))
            }
        }
    }

    /// The peer's Raft refused with an error of its own: it stopped (openraft 0.10's network
    /// errors carry no remote error for these RPCs). It is treated as unreachable, so
    /// replication backs off.
    fn remote(&self, e: RaftError<TypeConfig>) -> RPCError<TypeConfig> {
        RPCError::Unreachable(Unreachable::from_string(format!("node {}: {e}", self.target)))
    }

    fn mismatch<E: std::error::Error>(&self) -> RPCError<TypeConfig, E> {
        RPCError::Network(NetworkError::from_string(format!(
            "node {} answered with a reply of the wrong kind",
            self.target
        )))
    }

    /// Sends a snapshot record by record (`snapshot::record_bytes`), in order; the receiver
    /// (`SnapshotInbox`) installs it after the last. A higher vote answered ends it early.
    async fn send_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot,
        option: &RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let Snapshot { meta, snapshot: mut data } = snapshot;
        let (record, total) = data.geometry().map_err(|e| {
            StreamingError::Network(NetworkError::from_string(format!("snapshot to send: {e}")))
        })?;
        let mut offset = 0u64;
        loop {
            let len = record.min(total - offset) as usize;
            let mut buf = vec![0u8; len];
            data.read_exact(&mut buf).await.map_err(|e| {
                StreamingError::Network(NetworkError::from_string(format!(
                    "reading the snapshot at {offset}: {e}"
                )))
            })?;
            let done = offset + len as u64 >= total;
            let chunk = SnapshotChunk { vote, meta: meta.clone(), offset, data: buf, done };
            let resp = match self.call(RaftRpc::Snapshot(chunk), option).await {
                Ok(RaftReply::Snapshot(Ok(resp))) => resp,
                Ok(RaftReply::Snapshot(Err(e))) => {
                    return Err(StreamingError::Network(NetworkError::from_string(format!(
                        "node {} refused a snapshot chunk: {e}",
                        self.target
                    ))))
                }
                Ok(_) => {
                    return Err(StreamingError::Network(NetworkError::from_string(format!(
                        "node {} answered with a reply of the wrong kind",
                        self.target
                    ))))
                }
                Err(e @ TransportError::Unreachable(..)) => {
                    return Err(StreamingError::Unreachable(Unreachable::new(&e)))
                }
                Err(e) => return Err(StreamingError::Network(NetworkError::new(&e))),
            };
            if done || resp.vote > vote {
                return Ok(resp);
            }
            offset += len as u64;
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = SnapshotData;

    /// Sends at most `APPEND_BUDGET_BYTES` of entry data per request when there are several
    /// entries: a longer request is cut to the prefix that fits and answered as a partial
    /// success, and openraft sends the rest next.
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<TypeConfig>> {
        let fit = fitting(&rpc.entries, APPEND_BUDGET_BYTES);
        let cut = fit < rpc.entries.len();
        rpc.entries.truncate(fit);
        // openraft finds where a follower's log matches by sending AppendEntries with entries
        // attached, and with large entries such a probe (to a new learner, say) can be too big
        // to transfer within the heartbeat-long timeout, for ever: then the follower never
        // answers "conflict" and is never sent the snapshot it needs. So a large request to a
        // peer not known to hold `prev_log_id` first goes without entries. Whether the peer
        // holds `prev_log_id` decides conflict alone, so a conflict (or a higher vote) answers
        // the real request too; success means the entries are worth sending.
        let bytes: usize = rpc.entries.iter().map(entry_bytes).sum();
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
        let mut cut = cut;
        let reply = loop {
            let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
            let entries = rpc.entries.len();
            match self.call_append(rpc.clone(), &option).await {
                // Too many large entries for one message (a follower far behind on 4 MiB
                // writes): send the share that fits. Refused as an ordinary error instead, the
                // same batch would be rebuilt and refused for ever.
                Err(TransportError::TooLarge(_, bytes, limit)) if entries > 1 => {
                    let fit = (entries as u64 * limit as u64 / (bytes as u64).max(1)) as usize;
                    rpc.entries.truncate(fit.clamp(1, entries - 1));
                    cut = true;
                }
                r => {
                    let reply = match r.map_err(|e| self.lift(e))? {
                        RaftReply::Append(r) => r.map_err(|e| self.remote(e))?,
                        _ => return Err(self.mismatch()),
                    };
                    break match reply {
                        AppendEntriesResponse::Success if cut => {
                            AppendEntriesResponse::PartialSuccess(last)
                        }
                        other => other,
                    };
                }
            }
        };
        self.matched = match &reply {
            AppendEntriesResponse::Success => {
                rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id)
            }
            AppendEntriesResponse::PartialSuccess(upto) => *upto,
            _ => None,
        };
        Ok(reply)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<TypeConfig>> {
        match self.call(RaftRpc::Vote(rpc), &option).await.map_err(|e| self.lift(e))? {
            RaftReply::Vote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatch()),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<TypeConfig>> {
        match self.call(RaftRpc::PreVote(rpc), &option).await.map_err(|e| self.lift(e))? {
            RaftReply::PreVote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatch()),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        match self.call(RaftRpc::TransferLeader(req), &option).await.map_err(|e| self.lift(e))? {
            RaftReply::TransferLeader(r) => r.map_err(|e| {
                RPCError::Unreachable(Unreachable::from_string(format!(
                    "node {}: {e}",
                    self.target
                )))
            }),
            _ => Err(self.mismatch()),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        tokio::select! {
            r = self.send_snapshot(vote, snapshot, &option) => r,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }

    /// How long replication to an unreachable peer pauses between attempts. openraft's default
    /// starts at 200 ms, so a peer back from a partition or a restart would wait that long
    /// before it is sent what it missed, and a stale peer is a poor candidate if the leader fails
    /// again meanwhile. Start at 10 ms and double to 200 ms: a returning peer catches up within
    /// a few heartbeats, and a peer that stays down costs at most five attempts a second (the
    /// TCP transport paces its reconnects on its own besides).
    fn backoff(&self) -> Option<Backoff> {
        Some(Backoff::new(
            std::iter::successors(Some(Duration::from_millis(10)), |d| Some(*d * 2))
                .map(|d| d.min(Duration::from_millis(200))),
        ))
    }
}

/// In-process delivery between replicas of one process. Links can be cut, to test partitions.
#[derive(Default)]
pub struct LocalRouter {
    nodes: RwLock<HashMap<NodeId, (Raft, Arc<SnapshotInbox>)>>,
    isolated: Mutex<HashSet<NodeId>>,
}

impl std::fmt::Debug for LocalRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRouter").finish_non_exhaustive()
    }
}

impl LocalRouter {
    pub fn register(&self, id: NodeId, raft: Raft, inbox: Arc<SnapshotInbox>) {
        self.nodes.write().expect("router lock").insert(id, (raft, inbox));
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
            let Some((raft, inbox)) = node else {
                return Err(TransportError::Unreachable(target, "not running".into()));
            };
            match tokio::time::timeout(timeout, dispatch(&raft, &inbox, rpc)).await {
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
    use openraft::EntryPayload;

    use super::*;
    use crate::replication::types::{log_id, Entry};

    /// Refuses every request as too large for one message, as TCP does past `MAX_PAYLOAD`,
    /// recording how many entries each request carried.
    #[derive(Default)]
    struct Small {
        seen: Mutex<Vec<usize>>,
    }

    impl Transport for Arc<Small> {
        fn call(
            &self,
            target: NodeId,
            _node: &BasicNode,
            rpc: RaftRpc,
            _timeout: Duration,
        ) -> BoxFuture<Result<RaftReply, TransportError>> {
            let RaftRpc::Append(req) = rpc else { panic!("not an append") };
            self.seen.lock().expect("seen").push(req.entries.len());
            Box::pin(async move { Err(TransportError::TooLarge(target, 40 << 20, 16 << 20)) })
        }
    }

    fn append(entries: u64) -> AppendEntriesRequest<TypeConfig> {
        let entry = |i| Entry { log_id: log_id(1, 1, i), payload: EntryPayload::Blank };
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: (1..=entries).map(entry).collect(),
        }
    }

    #[tokio::test]
    async fn too_many_entries_for_one_message_are_sent_in_fewer() {
        let small = Arc::new(Small::default());
        let mut peer = PeerNetwork {
            target: 2,
            node: BasicNode::new("x"),
            transport: Arc::new(small.clone()),
            matched: None,
            append_timeout: Duration::from_secs(1),
        };
        let option = RPCOption::new(Duration::from_secs(1));
        // 10 entries in 40 MiB through 16 MiB messages: 4 fit, then 1 (the transport refuses
        // everything here); one entry cannot be split: an ordinary network error, not an
        // endless retry.
        match RaftNetworkV2::append_entries(&mut peer, append(10), option).await {
            Err(RPCError::Network(e)) => assert!(e.to_string().contains("message limit"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(*small.seen.lock().expect("seen"), vec![10, 4, 1]);
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
        let entry = |i| Entry {
            log_id: log_id(1, 1, i),
            payload: EntryPayload::Normal(Request::blocks(vec![BlockOp::Write {
                lba: 0,
                data: vec![1; 3 << 19].into(),
            }])),
        };
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(1, 1, prev)),
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
            append_timeout: Duration::from_secs(1),
        };
        let option = RPCOption::new(Duration::from_secs(1));
        let mut send = async |req| {
            RaftNetworkV2::append_entries(&mut peer, req, option.clone()).await.expect("append")
        };
        // The peer lacks index 5: the probe's conflict answers, the entries never travel.
        assert_eq!(send(big_append(5, 2)).await, AppendEntriesResponse::Conflict);
        assert_eq!(*follower.seen.lock().expect("seen"), vec![0]);
        // It holds index 3: probe, then the entries.
        assert_eq!(send(big_append(3, 2)).await, AppendEntriesResponse::Success);
        assert_eq!(*follower.seen.lock().expect("seen"), vec![0, 0, 2]);
        // Matched at 5 now: the next request goes straight away.
        assert_eq!(send(big_append(5, 2)).await, AppendEntriesResponse::Success);
        assert_eq!(*follower.seen.lock().expect("seen"), vec![0, 0, 2, 2]);
        assert_eq!(*follower.holds.lock().expect("holds"), 7);
        // Three 1.5 MiB entries exceed one request's 4 MiB: two go, as a partial success up to
        // the second, and openraft sends the third next.
        assert_eq!(
            send(big_append(7, 3)).await,
            AppendEntriesResponse::PartialSuccess(Some(log_id(1, 1, 9)))
        );
        assert_eq!(*follower.seen.lock().expect("seen"), vec![0, 0, 2, 2, 2]);
        assert_eq!(*follower.holds.lock().expect("holds"), 9);
    }

    /// Answers every append with success, recording the entries and time limit it was given.
    #[derive(Default)]
    struct Timed {
        seen: Mutex<Vec<(usize, Duration)>>,
    }

    impl Transport for Arc<Timed> {
        fn call(
            &self,
            _target: NodeId,
            _node: &BasicNode,
            rpc: RaftRpc,
            timeout: Duration,
        ) -> BoxFuture<Result<RaftReply, TransportError>> {
            let RaftRpc::Append(req) = rpc else { panic!("not an append") };
            self.seen.lock().expect("seen").push((req.entries.len(), timeout));
            Box::pin(async move { Ok(RaftReply::Append(Ok(AppendEntriesResponse::Success))) })
        }
    }

    #[tokio::test]
    async fn an_append_with_entries_gets_the_append_timeout_a_heartbeat_its_own() {
        let timed = Arc::new(Timed::default());
        let mut peer = PeerNetwork {
            target: 2,
            node: BasicNode::new("x"),
            transport: Arc::new(timed.clone()),
            matched: None,
            append_timeout: Duration::from_millis(3000),
        };
        let heartbeat = RPCOption::new(Duration::from_millis(50));
        for entries in [0, 2] {
            let reply =
                RaftNetworkV2::append_entries(&mut peer, append(entries), heartbeat.clone())
                    .await
                    .expect("append");
            assert_eq!(reply, AppendEntriesResponse::Success);
        }
        let seen = timed.seen.lock().expect("seen").clone();
        assert_eq!(seen, vec![(0, Duration::from_millis(50)), (2, Duration::from_millis(3000))]);
    }
}
