//! The serving side of the node protocol (`wire`): one replica's answers to Raft, client,
//! repair and admin requests, each decoded once into a `NodeRequest`.
//!
//! What a caller may ask depends on who it is (`net::Caller`): under TLS a member's certificate
//! allows everything, the admin's allows `ADMIN` only; over plaintext every caller is taken at
//! its word. Writes from one connection are handed to Raft in arrival order through a bounded
//! queue, with a bound on the proposal bytes in flight: a full queue holds the connection's
//! reader back (`net::Handler`), so a client that writes faster than the cluster commits slows
//! down instead of filling memory.
//!
//! Checksum repair: a `BlocksReply` never carries a block that failed its checksum; it lists it
//! instead (zero-filled in the data). The client then asks the other nodes for that block with
//! `READ_LOCAL` (any node's own image, once it has applied as far as the leader had, no
//! leadership check) and sends a good copy back to the leader with `REPAIR`, which rewrites the
//! block only if the copy is what the leader's own checksum table already says it holds.

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ForwardToLeader, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, TryAsRef};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::commits::Proposer;
use super::network::{dispatch, BoxFuture, RaftRpc, SnapshotInbox};
use super::node::applied_index;
use super::snapshot::{ReceiveProgress, Shape};
use super::tcp::client_options;
use super::types::{NodeId, Raft, Request, TypeConfig};
use super::wire::{encode, Admin, AdminReply, Attached, BadBlockReport, BlocksReply, ErrorCode};
use super::wire::{LocalRead, NodeError, NodeRequest, NodeStatus, Repair, SnapshotTransfer};
use super::wire::{WriteRequest, MAX_READ_BYTES};
use crate::entry::BlockOp;
use crate::net::rpc::{admitted, Admission, Answer, Caller, Handler, RpcClient, RpcError};
use crate::net::tls::Identity;
use crate::net::Security;
use crate::storage::engine::Engine;

/// How long a `READ_LOCAL` waits for the node to apply as far as asked (a follower applies a
/// commit one heartbeat or so after the leader) before refusing.
const READ_LOCAL_WAIT: Duration = Duration::from_secs(1);

/// Proposals queued for Raft, waiting for `propose_in_order`.
const PROPOSAL_QUEUE: usize = 1024;
/// Bytes of proposals admitted and not yet answered (committed or refused), across all clients.
pub const PROPOSAL_BYTES_IN_FLIGHT: usize = 256 << 20;

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

/// A client write and where to send what became of it: refused, or accepted with a future of its
/// committed index.
/// The proposal's share of `PROPOSAL_BYTES_IN_FLIGHT` travels with it and is released when the
/// entry commits or fails, whether or not its client still waits.
type Proposal = (
    Request,
    OwnedSemaphorePermit,
    oneshot::Sender<Result<BoxFuture<Result<u64, String>>, NodeError>>,
);

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
    fn admit(&mut self, client: uuid::Uuid, seq: u64) -> Result<(), NodeError> {
        if let Some(&(newest, _)) = self.newest.get(&client) {
            if seq <= newest {
                return Err(NodeError::new(
                    ErrorCode::StaleWrite,
                    format!(
                        "stale WRITE: sequence {seq} of client {client} is not after {newest}, \
                         already proposed"
                    ),
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
    proposals: mpsc::Sender<Proposal>,
    /// Proposal bytes admitted and not yet answered, in bytes (`PROPOSAL_BYTES_IN_FLIGHT`).
    budget: Arc<Semaphore>,
    /// How this node reaches others (`check_joining`).
    security: Security,
    /// Held while a WRITE is checked and queued, so the check and the queue order agree.
    order: Arc<Mutex<ClientOrder>>,
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
/// refuses the handshake, a store is bound to one node id, and under TLS the node must present
/// the certificate for `nid`; so none of them is ever added. A node not listening yet (just
/// started) is given `JOIN_CHECK` to come up.
async fn check_joining(
    cluster_id: uuid::Uuid,
    security: &Security,
    nid: NodeId,
    addr: &str,
) -> Result<(), NodeError> {
    let refused = |why: String| {
        NodeError::new(
            ErrorCode::Refused,
            format!("node {nid} at {addr} cannot join cluster {cluster_id}: {why}"),
        )
    };
    let sock: SocketAddr =
        addr.parse().map_err(|e| refused(format!("{addr:?} is not an address ({e})")))?;
    let options = client_options(security, Some(nid));
    let rpc = RpcClient::new(sock, None, cluster_id, 0, options);
    let deadline = tokio::time::Instant::now() + JOIN_CHECK;
    let (kind, request) = NodeRequest::Admin(Admin::Status).encode()?;
    let answer = loop {
        match rpc.call(kind, request.clone(), JOIN_CHECK).await {
            Ok(bytes) => break bytes,
            Err(RpcError::Unreachable(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(refused(e.to_string())),
        }
    };
    let status = match super::wire::exact::<AdminReply>(&answer, "admin reply")? {
        AdminReply::Status(s) => s,
        other => return Err(refused(format!("it answered {other:?} to a status request"))),
    };
    if status.id != nid {
        return Err(refused(format!("the node there is node {}", status.id)));
    }
    Ok(())
}

/// A Raft API error as a node's refusal: `NotLeader` (naming the leader) where openraft says to
/// forward to the leader.
fn raft_error<E>(e: RaftError<TypeConfig, E>) -> NodeError
where
    E: std::fmt::Debug + std::fmt::Display + TryAsRef<ForwardToLeader<TypeConfig>>,
{
    match e.forward_to_leader() {
        Some(f) => NodeError::new(
            ErrorCode::NotLeader,
            format!("not the leader; leader is {:?}", f.leader_id),
        ),
        None => NodeError::new(ErrorCode::Failed, e.to_string()),
    }
}

fn failed(e: impl std::fmt::Display) -> NodeError {
    NodeError::new(ErrorCode::Failed, e.to_string())
}

impl NodeService {
    /// `receiving`: the state machine's incoming snapshot progress
    /// (`StateMachine::receive_progress`), shown in the status; `inbox` and `proposer`: the
    /// node's (`Node::inbox`, `Node::proposer`); `security`: how it dials a joining node.
    pub fn new(
        id: NodeId,
        raft: Raft,
        engine: Arc<Engine>,
        receiving: Arc<ReceiveProgress>,
        inbox: Arc<SnapshotInbox>,
        proposer: Proposer,
        security: Security,
    ) -> Arc<NodeService> {
        let (tx, rx) = mpsc::channel(PROPOSAL_QUEUE);
        let gate = Arc::new(WriteGate::default());
        tokio::spawn(propose_in_order(raft.clone(), proposer, rx, gate.clone()));
        Arc::new(NodeService {
            id,
            raft,
            engine,
            receiving,
            inbox,
            proposals: tx,
            budget: Arc::new(Semaphore::new(PROPOSAL_BYTES_IN_FLIGHT)),
            security,
            order: Arc::new(Mutex::new(ClientOrder::default())),
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
        security: Security,
        req: Admin,
    ) -> Result<AdminReply, NodeError> {
        match req {
            Admin::Init(members) => {
                let nodes: BTreeMap<NodeId, BasicNode> =
                    members.into_iter().map(|(id, a)| (id, BasicNode::new(a))).collect();
                raft.initialize(nodes).await.map_err(failed)?;
            }
            Admin::AddLearner(nid, addr) => {
                check_joining(cluster_id, &security, nid, &addr).await?;
                let r =
                    raft.add_learner(nid, BasicNode::new(addr), false).await.map_err(raft_error)?;
                return Ok(AdminReply::Index(r.log_id.index));
            }
            Admin::SetVoters(ids) => {
                let set: BTreeSet<NodeId> = ids.into_iter().collect();
                raft.change_membership(set, true).await.map_err(raft_error)?;
            }
            Admin::Remove(nid) => {
                if nid == id && raft.metrics().borrow_watched().state == ServerState::Leader {
                    return Err(NodeError::new(
                        ErrorCode::Refused,
                        format!("node {nid} is the leader: move leadership to another node first"),
                    ));
                }
                let m = raft.metrics().borrow_watched().membership_config.membership().clone();
                if m.voter_ids().any(|v| v == nid) {
                    // Demote, keeping it a learner so the leader still replicates the new
                    // configuration to it. Dropped straight away, it would keep the joint
                    // configuration in which it is a voter and campaign forever (harmlessly, as
                    // its log is behind, but every election timeout).
                    let voters: BTreeSet<NodeId> = m.voter_ids().filter(|v| *v != nid).collect();
                    let r = raft.change_membership(voters, true).await.map_err(raft_error)?;
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
                    .map_err(raft_error)?;
            }
            // A forced election, without pre-vote: voters whose lease holds still refuse it.
            Admin::Campaign => raft.trigger().elect(false).await.map_err(failed)?,
            Admin::Handover(to) => raft.trigger().transfer_leader(to).await.map_err(failed)?,
            Admin::Status | Admin::Attach | Admin::Detach => {
                return Err(NodeError::new(ErrorCode::Internal, "answered by `call`"))
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
    mut rx: mpsc::Receiver<Proposal>,
    gate: Arc<WriteGate>,
) {
    while let Some((req, held, done)) = rx.recv().await {
        if raft.metrics().borrow_watched().state != ServerState::Leader {
            let leader = raft.metrics().borrow_watched().current_leader;
            let message = format!("not the leader; leader is {leader:?}");
            let _ = done.send(Err(NodeError::new(ErrorCode::NotLeader, message)));
        } else {
            // The request's own task awaits the outcome: no task in between on the way back. The
            // budget is released by the commit callback, which runs even if nobody waits.
            let (tx, rx) = oneshot::channel();
            let on_commit: super::commits::OnCommit = Box::new(move |r| {
                drop(held);
                let _ = tx.send(r);
            });
            let proposed = proposer.propose_then(req, on_commit).await.map_err(failed);
            let _ = done.send(proposed.map(|()| {
                let commit: BoxFuture<Result<u64, String>> = Box::pin(async move {
                    rx.await.unwrap_or_else(|_| Err("the replica stopped".to_string()))
                });
                commit
            }));
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

/// What a queued proposal's sender awaits: its commit's future, or why it was not proposed.
type Proposed = oneshot::Receiver<Result<BoxFuture<Result<u64, String>>, NodeError>>;

/// Admits a checked `WRITE` into the queue slot it holds: the order check and the queue order
/// agree because both happen under the order lock.
fn admit(
    order: &Mutex<ClientOrder>,
    gate: &WriteGate,
    origin: Option<(uuid::Uuid, u64)>,
    req: Request,
    held: OwnedSemaphorePermit,
    slot: mpsc::OwnedPermit<Proposal>,
) -> Result<Proposed, NodeError> {
    let mut order = order.lock().unwrap_or_else(|p| p.into_inner());
    // Checked again under the lock `begin_attach` takes: no write is admitted after it counted
    // the admitted ones.
    if gate.attaching.load(std::sync::atomic::Ordering::SeqCst)
        && matches!(req, Request::Blocks(..))
    {
        return Err(NodeError::new(ErrorCode::Refused, "this member is attaching the device"));
    }
    if let Some((client, seq)) = origin {
        order.admit(client, seq)?;
    }
    let (tx, rx) = oneshot::channel();
    slot.send((req, held, tx));
    gate.admitted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    drop(order);
    Ok(rx)
}

/// A request refused before admission: answered at once, and a malformed one closes its
/// connection before the next frame is read.
fn refuse(e: NodeError) -> Admission {
    Box::pin(std::future::ready(Err(e.refusal())))
}

/// Runs a request's answer and encodes it.
fn answer<T, F>(f: F) -> Answer
where
    T: serde::Serialize,
    F: std::future::Future<Output = Result<T, NodeError>> + Send + 'static,
{
    Box::pin(async move {
        let v = f.await.map_err(NodeError::refusal)?;
        encode(&v).map_err(NodeError::refusal)
    })
}

impl Handler for NodeService {
    fn call(&self, caller: &Caller, kind: u8, payload: Vec<u8>) -> Admission {
        let request = match NodeRequest::decode(kind, &payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(peer = %caller.peer, error = %e, "malformed request");
                return refuse(e);
            }
        };
        drop(payload);
        if let Err(e) = self.allowed(caller, kind, &request) {
            tracing::warn!(peer = %caller.peer, error = %e, "request refused");
            return refuse(e);
        }
        match request {
            NodeRequest::Raft(rpc) => admitted(self.raft_rpc(rpc)),
            NodeRequest::Write(w) => self.write(w),
            NodeRequest::Read { lba, blocks } => admitted(self.read(lba, blocks)),
            NodeRequest::ReadLocal(req) => admitted(self.read_local(req)),
            NodeRequest::Repair(req) => admitted(self.repair(req)),
            NodeRequest::Admin(req) => admitted(self.admin_request(req)),
        }
    }
}

impl NodeService {
    /// Whether `caller` may send `request`. Under TLS the certificate says who calls: the admin's
    /// may only administer; a member's may take part in Raft only as itself (the id inside the
    /// message is the certificate's) and only while it is in this node's membership (any
    /// member of the cluster's CA before this node has one); members may ask each other for
    /// status and hand leadership over, but membership changes, attach and detach are the
    /// admin's. Over plaintext every caller is taken at its word.
    fn allowed(&self, caller: &Caller, kind: u8, request: &NodeRequest) -> Result<(), NodeError> {
        let forbidden = |m: String| Err(NodeError::new(ErrorCode::Forbidden, m));
        match (caller.verified, request) {
            (None, _) => Ok(()),
            (Some(Identity::Admin), NodeRequest::Admin(_)) => Ok(()),
            (Some(Identity::Admin), _) => {
                forbidden(format!("an admin certificate may not send {} requests", kind_name(kind)))
            }
            (Some(Identity::Member(_)), NodeRequest::Admin(Admin::Status | Admin::Handover(_))) => {
                Ok(())
            }
            (Some(Identity::Member(n)), NodeRequest::Admin(a)) => forbidden(format!(
                "node {n}'s member certificate may not send {a:?}: it is the admin's"
            )),
            (Some(Identity::Member(n)), NodeRequest::Raft(rpc)) => {
                let claimed = match rpc {
                    RaftRpc::Vote(v) | RaftRpc::PreVote(v) => v.vote.leader_id().node_id,
                    RaftRpc::Append(a) => a.vote.leader_id().node_id,
                    RaftRpc::Snapshot(c) => c.vote.leader_id().node_id,
                    RaftRpc::TransferLeader(t) => t.from_leader().leader_id().node_id,
                };
                if claimed != n {
                    return forbidden(format!(
                        "node {n}'s certificate sent a Raft message as node {claimed}"
                    ));
                }
                let m = self.raft.metrics().borrow_watched().membership_config.clone();
                let nodes = m.membership().nodes().count();
                if nodes > 0 && !m.membership().nodes().any(|(id, _)| *id == n) {
                    return forbidden(format!("node {n} is not a member of this cluster"));
                }
                Ok(())
            }
            (Some(Identity::Member(_)), _) => Ok(()),
        }
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        super::wire::KIND_RAFT => "RAFT",
        super::wire::KIND_WRITE => "WRITE",
        super::wire::KIND_READ => "READ",
        super::wire::KIND_READ_LOCAL => "READ_LOCAL",
        super::wire::KIND_REPAIR => "REPAIR",
        super::wire::KIND_ADMIN => "ADMIN",
        _ => "unknown",
    }
}

impl NodeService {
    fn raft_rpc(&self, rpc: RaftRpc) -> Answer {
        let (raft, inbox) = (self.raft.clone(), self.inbox.clone());
        let quiet = self.vote_quiet.get().copied().unwrap_or_default();
        let young = self.started.elapsed() < quiet;
        answer(async move {
            if young && matches!(rpc, RaftRpc::Vote(_) | RaftRpc::PreVote(_)) {
                return Err(NodeError::new(
                    ErrorCode::Refused,
                    format!("this node started less than {quiet:?} ago and grants no vote yet"),
                ));
            }
            Ok(dispatch(&raft, &inbox, rpc).await)
        })
    }

    /// Checks a `WRITE` and queues it, in frame order, before the answer is awaited; a pipelining
    /// client's copy that comes after its newer WRITEs is refused (`ClientOrder`). A request too
    /// large for one WAL record is refused here: appended, it would fail every replica's log
    /// store, which openraft treats as fatal. The admission waits for room in the queue and in
    /// the proposal bytes in flight, holding the connection back meanwhile.
    // The admission resolves to the answer's future on purpose: the server awaits the first on
    // the connection's reader and the second in the request's task.
    #[allow(clippy::async_yields_async)]
    fn write(&self, w: WriteRequest) -> Admission {
        let WriteRequest { origin, req } = w;
        if let Err(e) = self.check_write(&req) {
            return refuse(e);
        }
        let weight = req.payload_len().clamp(1, PROPOSAL_BYTES_IN_FLIGHT) as u32;
        let (budget, proposals) = (self.budget.clone(), self.proposals.clone());
        let (order, gate) = (self.order.clone(), self.gate.clone());
        Box::pin(async move {
            let shutting_down = || NodeError::new(ErrorCode::Failed, "node shutting down");
            let queued = async {
                let held = budget.acquire_many_owned(weight).await.map_err(|_| shutting_down())?;
                let slot = proposals.reserve_owned().await.map_err(|_| shutting_down())?;
                admit(&order, &gate, origin, req, held, slot)
            }
            .await;
            let answer: Answer = Box::pin(async move {
                let rx = queued.map_err(NodeError::refusal)?;
                let commit = rx.await.map_err(|_| shutting_down().refusal())?;
                let commit = commit.map_err(NodeError::refusal)?;
                let index = commit.await.map_err(|e| failed(e).refusal())?;
                encode(&index).map_err(NodeError::refusal)
            });
            Ok(answer)
        })
    }

    /// Each operation within the device and in whole blocks: one that is not would fail its
    /// apply on every replica, which stops Raft, and again at every replay.
    fn check_ops(&self, ops: &[BlockOp]) -> Result<(), NodeError> {
        let sb = self.engine.superblock();
        let (bs, blocks) = (u64::from(sb.block_bytes), sb.device_bytes / u64::from(sb.block_bytes));
        let bad = |m: String| Err(NodeError::new(ErrorCode::Malformed, m));
        if ops.is_empty() {
            return bad("a write of no operations".to_string());
        }
        for op in ops {
            let (lba, count) = match op {
                BlockOp::Write { lba, data } => {
                    let len = data.len() as u64;
                    if len == 0 || len % bs != 0 {
                        return bad(format!(
                            "a write of {len} bytes at block {lba}: not whole {bs}-byte blocks"
                        ));
                    }
                    (*lba, len / bs)
                }
                BlockOp::Zero { lba, blocks: 0 } => {
                    return bad(format!("a zero-fill of no blocks at block {lba}"))
                }
                BlockOp::Zero { lba, blocks } => (*lba, u64::from(*blocks)),
            };
            if lba.checked_add(count).is_none_or(|end| end > blocks) {
                return bad(format!("blocks {lba}..+{count} are beyond the {blocks}-block device"));
            }
        }
        Ok(())
    }

    fn check_write(&self, req: &Request) -> Result<(), NodeError> {
        let refused = |m: String| Err(NodeError::new(ErrorCode::Refused, m));
        match req {
            Request::Attach(_) | Request::Fenced(..) => {
                return Err(NodeError::new(
                    ErrorCode::Refused,
                    "attach entries and fenced writes are proposed only by the member serving \
                     the device (ADMIN Attach), never through WRITE",
                ))
            }
            // A member serves the device (or this one is attaching): its cache would not see
            // this write.
            Request::Blocks(ops, _) => {
                self.check_ops(ops)?;
                if self.gate.attaching.load(std::sync::atomic::Ordering::SeqCst) {
                    return refused(
                        "this member is attaching the device: write through its /dev/ublkbN"
                            .to_string(),
                    );
                }
                if let Some(a) = self.engine.attachment().filter(|a| a.node != 0) {
                    return refused(format!(
                        "the device is served by member {} (attachment epoch {}): write through \
                         its /dev/ublkbN, or detach it first",
                        a.node, a.epoch
                    ));
                }
            }
            Request::Flush => {}
        }
        let limit = self.engine.wal().max_record_bytes();
        if req.payload_len() > limit {
            return Err(NodeError::new(
                ErrorCode::TooLarge,
                format!(
                    "a proposal of {} bytes exceeds the {limit}-byte entry limit",
                    req.payload_len()
                ),
            ));
        }
        Ok(())
    }

    fn read(&self, lba: u64, blocks: u64) -> Answer {
        let (raft, engine, id) = (self.raft.clone(), self.engine.clone(), self.id);
        answer(async move {
            if raft.metrics().borrow_watched().state != ServerState::Leader {
                let leader = raft.metrics().borrow_watched().current_leader;
                return Err(NodeError::new(
                    ErrorCode::NotLeader,
                    format!("not the leader; leader is {leader:?}"),
                ));
            }
            raft.ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                .await
                .map_err(raft_error)?;
            let applied = applied_index(&raft);
            read_verified(engine, id, "read", lba, blocks, applied).await
        })
    }

    fn read_local(&self, req: LocalRead) -> Answer {
        let (raft, engine, id) = (self.raft.clone(), self.engine.clone(), self.id);
        answer(async move {
            let floor = req.applied_at_least;
            if applied_index(&raft) < floor {
                raft.wait(Some(READ_LOCAL_WAIT))
                    .applied_index_at_least(Some(floor), "local read")
                    .await
                    .map_err(|_| {
                        NodeError::new(
                            ErrorCode::Refused,
                            format!(
                                "node {id} has applied log index {} only, not {floor}",
                                applied_index(&raft)
                            ),
                        )
                    })?;
            }
            let applied = applied_index(&raft);
            read_verified(engine, id, "local read", req.lba, req.blocks, applied).await
        })
    }

    fn repair(&self, req: Repair) -> Answer {
        let (engine, id) = (self.engine.clone(), self.id);
        answer(async move {
            let lba = req.lba;
            // Accepted from any member only because `repair_block` writes nothing but the bytes
            // this image's checksum table already says the block holds (and refuses a wrong
            // length or a block out of range): it restores the image, never changes what it
            // means, and no entry goes through Raft. The table is a crc32c, which catches a wrong
            // or stale copy but is no authenticator: a member forging a colliding block on
            // purpose could change this replica's copy alone, but a member can as well send a
            // `WRITE`.
            let rewrote = tokio::task::spawn_blocking(move || {
                engine.image().repair_block(req.lba, &req.data)
            })
            .await
            .map_err(|e| failed(format!("repair task failed: {e}")))?
            .map_err(|e| NodeError::new(ErrorCode::Refused, e.to_string()))?;
            if rewrote {
                tracing::warn!(node = id, lba, "data block repaired from another replica");
            }
            Ok(rewrote)
        })
    }

    fn admin_request(&self, req: Admin) -> Answer {
        let (raft, id, security) = (self.raft.clone(), self.id, self.security.clone());
        let cluster_id = self.engine.superblock().cluster_id;
        // Status needs the service's snapshot progress: answered here.
        let status = matches!(req, Admin::Status).then(|| self.status());
        let host = self.host.get().cloned();
        answer(async move {
            if let Some(s) = status {
                return Ok(AdminReply::Status(Box::new(s)));
            }
            match (&req, host) {
                (Admin::Attach, Some(h)) => {
                    return Ok(AdminReply::Attached(h.attach().await.map_err(failed)?))
                }
                (Admin::Detach, Some(h)) => {
                    h.detach().await.map_err(failed)?;
                    return Ok(AdminReply::Done);
                }
                (Admin::Attach | Admin::Detach, None) => {
                    return Err(NodeError::new(
                        ErrorCode::Unsupported,
                        format!("node {id} does not serve devices"),
                    ))
                }
                (Admin::Handover(to), Some(h)) => {
                    h.relinquish(&format!("node {id} hands its leadership to node {to}"))
                }
                _ => {}
            }
            NodeService::admin(raft, id, cluster_id, security, req).await
        })
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
) -> Result<BlocksReply, NodeError> {
    let bs = u64::from(engine.superblock().block_bytes);
    let len = blocks.checked_mul(bs).filter(|l| *l <= MAX_READ_BYTES as u64);
    let len = len.ok_or_else(|| {
        NodeError::new(ErrorCode::TooLarge, format!("{what} of {blocks} blocks is too large"))
    })?;
    tokio::task::spawn_blocking(move || {
        let mut data = vec![0u8; len as usize];
        let bad = engine.image().read_verified(lba, &mut data).map_err(|e| {
            NodeError::new(ErrorCode::Refused, format!("{what} at block {lba}: {e}"))
        })?;
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
    .map_err(|e| failed(format!("{what} task failed: {e}")))?
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
        assert!(
            late.message.contains("stale WRITE") && late.message.contains("sequence 3"),
            "{late}"
        );
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
