//! Raft and client traffic between processes over the framed RPC layer (`net`): one listening
//! address per replica, the cluster id checked on every frame.
//!
//! Kinds: `RAFT` carries a postcard `RaftRpc` and answers a `RaftReply`; `WRITE` proposes a
//! `Request` and answers its entry's index once committed (`commits`, before apply); `READ` answers a
//! `BlocksReply` from the leader's image after a linearizable check; `ADMIN` carries an `Admin`
//! request. Writes from one connection are handed to Raft in arrival order.
//!
//! Checksum repair: a `BlocksReply` never carries a block that failed its checksum; it lists it
//! instead (zero-filled in the data). The client then asks the other nodes for that block with
//! `READ_LOCAL` (any node's own image, once it has applied as far as the leader had, no
//! leadership check) and sends a good copy back to the leader with `REPAIR`, which rewrites the
//! block only if the copy is what the leader's own checksum table already says it holds.

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::commits::Proposer;
use super::network::{dispatch, BoxFuture, RaftRpc, SnapshotInbox, Transport, TransportError};
use super::node::applied_index;
use super::snapshot::{ReceivePhase, ReceiveProgress, Shape};
use super::types::{NodeId, Raft, Request};
use crate::net::{ClientOptions, Handler, RpcClient, RpcError};
use crate::storage::engine::Engine;

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

/// How long a `READ_LOCAL` waits for the node to apply as far as asked (a follower applies a
/// commit one heartbeat or so after the leader) before refusing.
const READ_LOCAL_WAIT: Duration = Duration::from_secs(1);

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

/// Where a node serves the device once attached (the daemon, which owns the frontend; the
/// replication layer knows none of it).
pub trait DeviceHost: Send + Sync + 'static {
    fn attach(self: Arc<Self>) -> BoxFuture<Result<Attached, String>>;
    fn detach(self: Arc<Self>) -> BoxFuture<Result<(), String>>;
    /// This node is about to hand its leadership over (`Admin::Handover`): a device it serves
    /// must stop answering first. openraft's transfer lets the voters elect the other node at
    /// once, without waiting out this leader's lease, so the lease no longer protects it.
    fn relinquish(&self, why: &str);
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

/// What a write or read answer says when this node is not the leader.
pub const NOT_LEADER: &str = "not the leader";

/// `raft`'s view; `receiving` and `stream_bytes` describe its incoming snapshot.
pub fn status_of(
    raft: &Raft,
    id: NodeId,
    engine: &Engine,
    receiving: &ReceiveProgress,
    stream_bytes: u64,
) -> NodeStatus {
    let m = raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    NodeStatus {
        id,
        state: format!("{:?}", m.state),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        last_applied: m.last_applied.as_ref().map(|l| l.index),
        snapshot: m.snapshot.as_ref().map(|l| l.index),
        purged: m.purged.as_ref().map(|l| l.index),
        voters: voters.iter().copied().collect(),
        learners: membership.learner_ids().collect(),
        nodes: membership.nodes().map(|(id, n)| (*id, n.addr.clone())).collect(),
        replication: m
            .replication
            .map(|r| r.iter().map(|(id, l)| (*id, l.as_ref().map(|l| l.index))).collect())
            .unwrap_or_default(),
        snapshot_in: receiving.current().map(|(phase, received)| SnapshotTransfer {
            phase,
            received,
            total: stream_bytes,
        }),
        snapshots_installed: receiving.installed(),
        attachment: engine.attachment().map(|a| (a.epoch, a.node)),
        fenced_writes: engine.fenced_writes(),
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    postcard::to_allocvec(v).map_err(|e| format!("encode: {e}"))
}

fn decode<'a, T: Deserialize<'a>>(b: &'a [u8], what: &str) -> Result<T, String> {
    postcard::from_bytes(b).map_err(|e| format!("malformed {what}: {e}"))
}

/// A client write and where to send what became of it: refused, or accepted with a future of its
/// committed index.
type Proposal = (Request, oneshot::Sender<Result<BoxFuture<Result<u64, String>>, String>>);

/// A `WRITE` on the wire: the proposal, and for a client that pipelines (`RemoteCluster`) its id
/// and this proposal's place in its order.
#[derive(Debug, Serialize, Deserialize)]
pub struct WriteRequest {
    pub origin: Option<(uuid::Uuid, u64)>,
    pub req: Request,
}

/// Clients whose order is tracked at once; past this the one heard from longest ago is
/// forgotten.
const MAX_ORDERED_CLIENTS: usize = 1024;

/// The newest `WRITE` sequence this node proposed for each pipelining client. Requests on one
/// connection reach the handler in frame order, but after a reconnect a copy the node still
/// reads from the dropped connection could come after the client's newer WRITEs on the new one;
/// such a copy (a sequence not after the newest proposed) is refused, not proposed: the client
/// gave up on it and sent its content again under a newer sequence.
#[derive(Debug, Default)]
struct ClientOrder {
    newest: HashMap<uuid::Uuid, (u64, u64)>,
    /// Counts admissions, to find the client heard from longest ago.
    clock: u64,
}

impl ClientOrder {
    fn admit(&mut self, client: uuid::Uuid, seq: u64) -> Result<(), String> {
        if let Some(&(newest, _)) = self.newest.get(&client) {
            if seq <= newest {
                return Err(format!(
                    "stale WRITE: sequence {seq} of client {client} is not after {newest}, \
                     already proposed"
                ));
            }
        } else if self.newest.len() >= MAX_ORDERED_CLIENTS {
            let oldest = self.newest.iter().min_by_key(|(_, (_, at))| *at).map(|(c, _)| *c);
            if let Some(oldest) = oldest {
                self.newest.remove(&oldest);
            }
        }
        self.clock += 1;
        self.newest.insert(client, (seq, self.clock));
        Ok(())
    }
}

/// Serves one replica's RPCs.
pub struct NodeService {
    id: NodeId,
    raft: Raft,
    engine: Arc<Engine>,
    receiving: Arc<ReceiveProgress>,
    inbox: Arc<SnapshotInbox>,
    proposals: mpsc::UnboundedSender<Proposal>,
    /// Held while a WRITE is checked and queued, so the check and the queue order agree.
    order: Mutex<ClientOrder>,
    /// Unfenced writes and an attach on this node (`begin_attach`).
    gate: Arc<WriteGate>,
    /// When this service started, and how long after it no vote is granted.
    started: std::time::Instant,
    vote_quiet: std::sync::OnceLock<Duration>,
    /// Where `Attach` and `Detach` go; none: this node does not serve devices.
    host: std::sync::OnceLock<Arc<dyn DeviceHost>>,
}

impl std::fmt::Debug for NodeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeService").field("id", &self.id).finish_non_exhaustive()
    }
}

/// How long `Admin::Remove` waits for a demoted voter to receive its learner configuration.
const DEMOTE_CONFIRM: Duration = Duration::from_secs(5);

/// How long `Admin::AddLearner` waits for the joining node to answer.
const JOIN_CHECK: Duration = Duration::from_secs(5);

/// Before a node joins the membership: it must be running and answer, over this cluster's
/// connection handshake, as node `nid`. A node whose store was formatted for another cluster
/// refuses the handshake, and a store is bound to one node id, so neither is ever added. A node
/// not listening yet (just started) is given `JOIN_CHECK` to come up.
async fn check_joining(cluster_id: uuid::Uuid, nid: NodeId, addr: &str) -> Result<(), String> {
    let refused =
        |why: String| format!("node {nid} at {addr} cannot join cluster {cluster_id}: {why}");
    let sock: SocketAddr =
        addr.parse().map_err(|e| refused(format!("{addr:?} is not an address ({e})")))?;
    let rpc = RpcClient::new(sock, None, cluster_id, 0, client_options());
    let deadline = tokio::time::Instant::now() + JOIN_CHECK;
    let request = encode(&Admin::Status)?;
    let answer = loop {
        match rpc.call(KIND_ADMIN, request.clone(), JOIN_CHECK).await {
            Ok(bytes) => break bytes,
            Err(RpcError::Unreachable(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(refused(e.to_string())),
        }
    };
    let status = match decode::<AdminReply>(&answer, "admin reply")? {
        AdminReply::Status(s) => s,
        other => return Err(refused(format!("it answered {other:?} to a status request"))),
    };
    if status.id != nid {
        return Err(refused(format!("the node there is node {}", status.id)));
    }
    Ok(())
}

impl NodeService {
    /// `receiving`: the state machine's incoming snapshot progress
    /// (`StateMachine::receive_progress`), shown in the status; `inbox` and `proposer`: the
    /// node's (`Node::inbox`, `Node::proposer`).
    pub fn new(
        id: NodeId,
        raft: Raft,
        engine: Arc<Engine>,
        receiving: Arc<ReceiveProgress>,
        inbox: Arc<SnapshotInbox>,
        proposer: Proposer,
    ) -> Arc<NodeService> {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(WriteGate::default());
        tokio::spawn(propose_in_order(raft.clone(), proposer, rx, gate.clone()));
        Arc::new(NodeService {
            id,
            raft,
            engine,
            receiving,
            inbox,
            proposals: tx,
            order: Mutex::new(ClientOrder::default()),
            gate,
            started: std::time::Instant::now(),
            vote_quiet: std::sync::OnceLock::new(),
            host: std::sync::OnceLock::new(),
        })
    }

    /// Before this node proposes an attach entry: refuses unfenced `WRITE`s from now on, and
    /// waits until every one admitted before has been handed to openraft (`WriteGate`).
    pub async fn begin_attach(&self) {
        let target = {
            let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            self.gate.attaching.store(true, std::sync::atomic::Ordering::SeqCst);
            self.gate.admitted.load(std::sync::atomic::Ordering::SeqCst)
        };
        loop {
            let progressed = self.gate.progress.notified();
            if self.gate.handled.load(std::sync::atomic::Ordering::SeqCst) >= target {
                return;
            }
            progressed.await;
        }
    }

    /// The attach is over (done or failed): unfenced `WRITE`s are admitted again while no
    /// member is attached.
    pub fn end_attach(&self) {
        self.gate.attaching.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Grants no vote or pre-vote for `quiet` after this service started. openraft keeps a
    /// follower's leader lease in memory only: restarted, a follower would vote at once, while
    /// a member serving the device counts on no election before its lease ends
    /// (`device::member`). Set once.
    pub fn quiet_votes_for(&self, quiet: Duration) {
        let _ = self.vote_quiet.set(quiet);
    }

    /// Lets this node serve the device: `Attach` and `Detach` go to `host`. Set once.
    pub fn set_host(&self, host: Arc<dyn DeviceHost>) {
        if self.host.set(host).is_err() {
            tracing::warn!("a device host was already set; keeping the first");
        }
    }

    fn status(&self) -> NodeStatus {
        let stream_bytes = Shape::of(&self.engine).stream_bytes();
        status_of(&self.raft, self.id, &self.engine, &self.receiving, stream_bytes)
    }

    async fn admin(
        raft: Raft,
        id: NodeId,
        cluster_id: uuid::Uuid,
        req: Admin,
    ) -> Result<AdminReply, String> {
        match req {
            Admin::Init(members) => {
                let nodes: BTreeMap<NodeId, BasicNode> =
                    members.into_iter().map(|(id, a)| (id, BasicNode::new(a))).collect();
                raft.initialize(nodes).await.map_err(|e| e.to_string())?;
            }
            Admin::AddLearner(nid, addr) => {
                check_joining(cluster_id, nid, &addr).await?;
                let r = raft
                    .add_learner(nid, BasicNode::new(addr), false)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(AdminReply::Index(r.log_id.index));
            }
            Admin::SetVoters(ids) => {
                let set: BTreeSet<NodeId> = ids.into_iter().collect();
                raft.change_membership(set, true).await.map_err(|e| e.to_string())?;
            }
            Admin::Remove(nid) => {
                if nid == id && raft.metrics().borrow_watched().state == ServerState::Leader {
                    return Err(format!(
                        "node {nid} is the leader: move leadership to another node first"
                    ));
                }
                let m = raft.metrics().borrow_watched().membership_config.membership().clone();
                if m.voter_ids().any(|v| v == nid) {
                    // Demote, keeping it a learner so the leader still replicates the new
                    // configuration to it. Dropped straight away, it would keep the joint
                    // configuration in which it is a voter and campaign forever (harmlessly, as
                    // its log is behind, but every election timeout).
                    let voters: BTreeSet<NodeId> = m.voter_ids().filter(|v| *v != nid).collect();
                    let r =
                        raft.change_membership(voters, true).await.map_err(|e| e.to_string())?;
                    if !wait_matched(&raft, nid, r.log_id.index, DEMOTE_CONFIRM).await {
                        tracing::warn!(
                            node = nid,
                            index = r.log_id.index,
                            "removing a node that did not confirm its demotion to learner"
                        );
                    }
                }
                let gone: BTreeSet<NodeId> = [nid].into();
                raft.change_membership(ChangeMembers::RemoveNodes(gone), false)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            // A forced election, without pre-vote: voters whose lease holds still refuse it.
            Admin::Campaign => raft.trigger().elect(false).await.map_err(|e| e.to_string())?,
            Admin::Handover(to) => {
                raft.trigger().transfer_leader(to).await.map_err(|e| e.to_string())?
            }
            Admin::Status | Admin::Attach | Admin::Detach => {
                return Err("answered by `call`".to_string())
            }
        }
        Ok(AdminReply::Done)
    }
}

/// Waits until the leader's matched index for `target` reaches `index`; false after `within`.
async fn wait_matched(raft: &Raft, target: NodeId, index: u64, within: Duration) -> bool {
    let mut rx = raft.metrics();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let matched = rx
            .borrow_watched()
            .replication
            .as_ref()
            .and_then(|r| r.get(&target).cloned().flatten())
            .map(|l| l.index);
        if matched >= Some(index) {
            return true;
        }
        if tokio::time::timeout_at(deadline, rx.changed()).await.map_or(true, |r| r.is_err()) {
            return false;
        }
    }
}

/// Hands client proposals to Raft in the order they arrived. Each answer resolves when the
/// entry commits (`Proposer`, before apply), or fails if openraft refuses or drops it.
async fn propose_in_order(
    raft: Raft,
    proposer: Proposer,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    gate: Arc<WriteGate>,
) {
    while let Some((req, done)) = rx.recv().await {
        if raft.metrics().borrow_watched().state != ServerState::Leader {
            let leader = raft.metrics().borrow_watched().current_leader;
            let _ = done.send(Err(format!("{NOT_LEADER}; leader is {leader:?}")));
        } else {
            // The request's own task awaits the outcome: no task in between on the way back.
            let _ = done.send(proposer.propose(req).await);
        }
        gate.handled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        gate.progress.notify_waiters();
    }
}

/// Keeps unfenced `WRITE`s from landing after an attach entry this node proposes: while it
/// attaches none is admitted, and the attach entry is proposed only once every one admitted
/// before has been handed to openraft (so it precedes the attach entry in the log, and applies
/// under no attachment).
#[derive(Debug, Default)]
struct WriteGate {
    attaching: std::sync::atomic::AtomicBool,
    admitted: std::sync::atomic::AtomicU64,
    handled: std::sync::atomic::AtomicU64,
    progress: tokio::sync::Notify,
}

impl Handler for NodeService {
    fn call(
        &self,
        kind: u8,
        payload: Vec<u8>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>> {
        let raft = self.raft.clone();
        match kind {
            KIND_RAFT => {
                let inbox = self.inbox.clone();
                let quiet = self.vote_quiet.get().copied().unwrap_or_default();
                let young = self.started.elapsed() < quiet;
                Box::pin(async move {
                    let rpc: RaftRpc = decode(&payload, "Raft RPC")?;
                    if young && matches!(rpc, RaftRpc::Vote(_) | RaftRpc::PreVote(_)) {
                        return Err(format!(
                            "this node started less than {quiet:?} ago and grants no vote yet"
                        ));
                    }
                    encode(&dispatch(&raft, &inbox, rpc).await)
                })
            }
            KIND_WRITE => {
                // Queued here, in frame order, before the answer is awaited; a pipelining
                // client's copy that comes after its newer WRITEs is refused (`ClientOrder`). A
                // request too large for one WAL record is refused here: appended, it would fail
                // every replica's log store, which openraft treats as fatal.
                let limit = self.engine.wal().max_record_bytes();
                let queued = decode::<WriteRequest>(&payload, "write").and_then(|w| {
                    let WriteRequest { origin, req } = w;
                    match &req {
                        Request::Attach(_) | Request::Fenced(..) => {
                            return Err("attach entries and fenced writes are proposed only by \
                                        the member serving the device (ADMIN Attach), never \
                                        through WRITE"
                                .to_string())
                        }
                        // A member serves the device (or this one is attaching): its cache would
                        // not see this write.
                        Request::Blocks(..) => {
                            if self.gate.attaching.load(std::sync::atomic::Ordering::SeqCst) {
                                return Err("this member is attaching the device: write through \
                                            its /dev/ublkbN"
                                    .to_string());
                            }
                            if let Some(a) = self.engine.attachment().filter(|a| a.node != 0) {
                                return Err(format!(
                                    "the device is served by member {} (attachment epoch {}): \
                                     write through its /dev/ublkbN, or detach it first",
                                    a.node, a.epoch
                                ));
                            }
                        }
                        Request::Flush => {}
                    }
                    if req.payload_len() > limit {
                        return Err(format!(
                            "a proposal of {} bytes exceeds the {limit}-byte entry limit",
                            req.payload_len()
                        ));
                    }
                    let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
                    // Checked again under the lock `begin_attach` takes: no write is admitted
                    // after it counted the admitted ones.
                    if self.gate.attaching.load(std::sync::atomic::Ordering::SeqCst)
                        && matches!(req, Request::Blocks(..))
                    {
                        return Err("this member is attaching the device".to_string());
                    }
                    if let Some((client, seq)) = origin {
                        order.admit(client, seq)?;
                    }
                    let (tx, rx) = oneshot::channel();
                    let _ = self.proposals.send((req, tx));
                    self.gate.admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    drop(order);
                    Ok(rx)
                });
                Box::pin(async move {
                    let commit = queued?.await.map_err(|_| "node shutting down".to_string())??;
                    encode(&commit.await?)
                })
            }
            KIND_READ => {
                let (engine, id) = (self.engine.clone(), self.id);
                Box::pin(async move {
                    let (lba, blocks): (u64, u64) = decode(&payload, "read")?;
                    if raft.metrics().borrow_watched().state != ServerState::Leader {
                        return Err(NOT_LEADER.to_string());
                    }
                    raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                        .await
                        .map_err(|e| e.to_string())?;
                    let applied = applied_index(&raft);
                    encode(&read_verified(engine, id, "read", lba, blocks, applied).await?)
                })
            }
            KIND_READ_LOCAL => {
                let (engine, id) = (self.engine.clone(), self.id);
                Box::pin(async move {
                    let req: LocalRead = decode(&payload, "local read")?;
                    let floor = req.applied_at_least;
                    if applied_index(&raft) < floor {
                        raft.wait(Some(READ_LOCAL_WAIT))
                            .applied_index_at_least(Some(floor), "local read")
                            .await
                            .map_err(|_| {
                                format!(
                                    "node {id} has applied log index {} only, not {floor}",
                                    applied_index(&raft)
                                )
                            })?;
                    }
                    let applied = applied_index(&raft);
                    let reply =
                        read_verified(engine, id, "local read", req.lba, req.blocks, applied)
                            .await?;
                    encode(&reply)
                })
            }
            KIND_REPAIR => {
                let (engine, id) = (self.engine.clone(), self.id);
                Box::pin(async move {
                    let req: Repair = decode(&payload, "repair")?;
                    let lba = req.lba;
                    // Accepted from any client only because `repair_block` writes nothing but
                    // the bytes this image's checksum table already says the block holds (and
                    // refuses a wrong length or a block out of range): it restores the image,
                    // never changes what it means, and no entry goes through Raft. The table is
                    // a crc32c, which catches a wrong or stale copy but is no authenticator: a
                    // client forging a colliding block on purpose could change this replica's
                    // copy alone, but such a client could as well send a `WRITE` (clients are not
                    // authenticated; see the cluster id note in docs/ARCHITECTURE.md).
                    let rewrote = tokio::task::spawn_blocking(move || {
                        engine.image().repair_block(req.lba, &req.data)
                    })
                    .await
                    .map_err(|e| format!("repair task failed: {e}"))?
                    .map_err(|e| e.to_string())?;
                    if rewrote {
                        tracing::warn!(node = id, lba, "data block repaired from another replica");
                    }
                    encode(&rewrote)
                })
            }
            KIND_ADMIN => {
                let id = self.id;
                let cluster_id = self.engine.superblock().cluster_id;
                let req = decode::<Admin>(&payload, "admin request");
                // Status needs the service's snapshot progress: answered here.
                let status = matches!(req, Ok(Admin::Status)).then(|| self.status());
                let host = self.host.get().cloned();
                Box::pin(async move {
                    if let Some(s) = status {
                        return encode(&AdminReply::Status(Box::new(s)));
                    }
                    match (&req, host) {
                        (Ok(Admin::Attach), Some(h)) => {
                            return encode(&AdminReply::Attached(h.attach().await?))
                        }
                        (Ok(Admin::Detach), Some(h)) => {
                            h.detach().await?;
                            return encode(&AdminReply::Done);
                        }
                        (Ok(Admin::Attach | Admin::Detach), None) => {
                            return Err(format!("node {id} does not serve devices"))
                        }
                        (Ok(Admin::Handover(to)), Some(h)) => {
                            h.relinquish(&format!("node {id} hands its leadership to node {to}"))
                        }
                        _ => {}
                    }
                    encode(&NodeService::admin(raft, id, cluster_id, req?).await?)
                })
            }
            other => Box::pin(async move { Err(format!("unknown request kind {other}")) }),
        }
    }
}

/// Reads `blocks` blocks at `lba` from `engine`'s image on the blocking pool, verified: a block
/// failing its checksum is logged, zero-filled and listed, never answered as data.
async fn read_verified(
    engine: Arc<Engine>,
    id: NodeId,
    what: &'static str,
    lba: u64,
    blocks: u64,
    applied: u64,
) -> Result<BlocksReply, String> {
    let bs = u64::from(engine.superblock().block_bytes);
    let len = blocks.checked_mul(bs).filter(|l| *l <= MAX_READ_BYTES as u64);
    let len = len.ok_or_else(|| format!("{what} of {blocks} blocks is too large"))?;
    tokio::task::spawn_blocking(move || {
        let mut data = vec![0u8; len as usize];
        let bad = engine.image().read_verified(lba, &mut data).map_err(|e| e.to_string())?;
        let bad = bad
            .into_iter()
            .map(|b| {
                tracing::error!(
                    node = id,
                    request = what,
                    lba = b.lba,
                    location = %b.location,
                    expected = format_args!("{:#010x}", b.expected),
                    found = format_args!("{:#010x}", b.found),
                    "data block fails its checksum"
                );
                BadBlockReport { lba: b.lba, expected: b.expected, found: b.found }
            })
            .collect();
        Ok(BlocksReply { applied, data, bad })
    })
    .await
    .map_err(|e| format!("{what} task failed: {e}"))?
}

/// Connections between replicas and to them: frames up to `MAX_PAYLOAD`, and reconnects backed
/// off to at most 200 ms, as openraft's replication is (`PeerNetwork::backoff`): a restarted peer
/// is reached within an election timeout. At 500 ms a restarted voter heard nothing for 525 ms.
fn client_options() -> ClientOptions {
    ClientOptions {
        max_payload: MAX_PAYLOAD,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..ClientOptions::default()
    }
}

/// Raft RPCs to peers over TCP, one pipelined connection per peer.
#[derive(Debug)]
pub struct TcpTransport {
    cluster_id: uuid::Uuid,
    me: NodeId,
    bind: Option<IpAddr>,
    clients: Mutex<HashMap<(NodeId, String), RpcClient>>,
}

impl TcpTransport {
    /// `bind`: the source address for outgoing connections (this node's own address).
    pub fn new(cluster_id: uuid::Uuid, me: NodeId, bind: Option<IpAddr>) -> TcpTransport {
        TcpTransport { cluster_id, me, bind, clients: Mutex::new(HashMap::new()) }
    }

    fn client(&self, target: NodeId, addr: &str) -> Result<RpcClient, TransportError> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(c) = clients.get(&(target, addr.to_string())) {
            return Ok(c.clone());
        }
        let peer: SocketAddr = addr.parse().map_err(|e| {
            TransportError::Unreachable(target, format!("bad address {addr:?}: {e}"))
        })?;
        let c = RpcClient::new(peer, self.bind, self.cluster_id, self.me, client_options());
        clients.insert((target, addr.to_string()), c.clone());
        Ok(c)
    }
}

impl Transport for TcpTransport {
    fn call(
        &self,
        target: NodeId,
        node: &BasicNode,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> BoxFuture<Result<super::network::RaftReply, TransportError>> {
        let client = self.client(target, &node.addr);
        Box::pin(async move {
            let client = client?;
            let payload = encode(&rpc).map_err(|e| TransportError::Failed(target, e))?;
            if payload.len() > MAX_PAYLOAD {
                return Err(TransportError::TooLarge(target, payload.len(), MAX_PAYLOAD));
            }
            match client.call(KIND_RAFT, payload, timeout).await {
                Ok(bytes) => {
                    decode(&bytes, "Raft reply").map_err(|e| TransportError::Failed(target, e))
                }
                Err(RpcError::Unreachable(e)) | Err(RpcError::Rejected(e)) => {
                    Err(TransportError::Unreachable(target, e))
                }
                Err(e) => Err(TransportError::Failed(target, e.to_string())),
            }
        })
    }
}

/// A client of a node's `WRITE`, `READ`, `READ_LOCAL`, `REPAIR` and `ADMIN` requests.
#[derive(Clone, Debug)]
pub struct NodeClient {
    rpc: RpcClient,
}

impl NodeClient {
    pub fn new(addr: SocketAddr, bind: Option<IpAddr>, cluster_id: uuid::Uuid) -> NodeClient {
        NodeClient { rpc: RpcClient::new(addr, bind, cluster_id, 0, client_options()) }
    }

    pub async fn admin(&self, req: Admin, timeout: Duration) -> Result<AdminReply, String> {
        let bytes =
            self.rpc.call(KIND_ADMIN, encode(&req)?, timeout).await.map_err(|e| e.to_string())?;
        decode(&bytes, "admin reply")
    }

    /// Proposes `req` and waits for its commit; the entry's log index.
    pub async fn write(&self, req: &Request, timeout: Duration) -> Result<u64, String> {
        self.send_write(None, req, timeout).await?.await
    }

    /// Queues a `WRITE` on the connection, behind those queued before it (the node proposes
    /// them in the order they arrive), and returns its answer to await: the entry's log index
    /// once committed. Several can be in flight. `origin`: this client's id and the proposal's
    /// sequence, increasing in the client's order; the node refuses one that is not after the
    /// newest it proposed for the client (a late copy from a dropped connection).
    pub async fn send_write(
        &self,
        origin: Option<(uuid::Uuid, u64)>,
        req: &Request,
        timeout: Duration,
    ) -> Result<BoxFuture<Result<u64, String>>, String> {
        // Encoded by hand around the borrowed request (`WriteRequest` owns its request).
        #[derive(Serialize)]
        struct Borrowed<'a> {
            origin: Option<(uuid::Uuid, u64)>,
            req: &'a Request,
        }
        let payload = encode(&Borrowed { origin, req })?;
        let sent = self.rpc.send(KIND_WRITE, payload, timeout).await.map_err(|e| e.to_string())?;
        Ok(Box::pin(async move {
            let bytes = sent.answer().await.map_err(|e| e.to_string())?;
            decode(&bytes, "write reply")
        }))
    }

    /// A linearizable read on the leader.
    pub async fn read(
        &self,
        lba: u64,
        blocks: u64,
        timeout: Duration,
    ) -> Result<BlocksReply, String> {
        let bytes = self
            .rpc
            .call(KIND_READ, encode(&(lba, blocks))?, timeout)
            .await
            .map_err(|e| e.to_string())?;
        decode(&bytes, "read reply")
    }

    /// Blocks from this node's own image once it has applied `applied_at_least`.
    pub async fn read_local(
        &self,
        req: LocalRead,
        timeout: Duration,
    ) -> Result<BlocksReply, String> {
        let bytes = self
            .rpc
            .call(KIND_READ_LOCAL, encode(&req)?, timeout)
            .await
            .map_err(|e| e.to_string())?;
        decode(&bytes, "local read reply")
    }

    /// Offers a good copy of block `lba`; true if the node rewrote its copy with it.
    pub async fn repair(&self, req: &Repair, timeout: Duration) -> Result<bool, String> {
        let bytes =
            self.rpc.call(KIND_REPAIR, encode(req)?, timeout).await.map_err(|e| e.to_string())?;
        decode(&bytes, "repair reply")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_writes_are_admitted_only_in_increasing_order() {
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let mut order = ClientOrder::default();
        order.admit(a, 1).unwrap();
        order.admit(a, 2).unwrap();
        // Resent after a reconnect under newer sequences; then the old connection's late copy.
        order.admit(a, 5).unwrap();
        let late = order.admit(a, 3).unwrap_err();
        assert!(late.contains("stale WRITE") && late.contains("sequence 3"), "{late}");
        assert!(order.admit(a, 5).is_err(), "the same sequence twice");
        // Another client has its own order.
        order.admit(b, 1).unwrap();
        order.admit(a, 6).unwrap();
    }

    #[test]
    fn the_client_heard_from_longest_ago_is_forgotten_past_the_limit() {
        let mut order = ClientOrder::default();
        for c in 0..MAX_ORDERED_CLIENTS as u128 {
            order.admit(uuid::Uuid::from_u128(c), 10).unwrap();
        }
        // Client 0 writes again, so client 1 is now the one heard from longest ago.
        order.admit(uuid::Uuid::from_u128(0), 11).unwrap();
        order.admit(uuid::Uuid::from_u128(u128::MAX), 1).unwrap();
        assert_eq!(order.newest.len(), MAX_ORDERED_CLIENTS);
        assert!(!order.newest.contains_key(&uuid::Uuid::from_u128(1)));
        assert!(order.admit(uuid::Uuid::from_u128(0), 11).is_err(), "client 0 still tracked");
    }
}
