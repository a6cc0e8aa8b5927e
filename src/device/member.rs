//! A `Cluster` for a device served by one member of a node cluster, from its own replica: the
//! device across hosts. The member leads (leadership moves to it on attach), so a write costs
//! its own WAL append and the followers' round trip, and reads come from its own image.
//!
//! Attaching (`Member::attach`):
//! 1. The member wins leadership: it asks the leader it knows to hand over (openraft's
//!    `transfer_leader`, which the voters grant despite the leader's lease), or, with no leader
//!    (the serving host was lost), stands for election itself once the leases have run out.
//! 2. As leader it commits an attach entry naming itself; the entry's log index is the
//!    attachment's epoch, higher than every earlier one. Every replica's state machine from
//!    then on applies only block writes carrying that epoch (`Attachment::admits`).
//! 3. It serves only while it still leads in the term it attached in and a quorum acknowledged
//!    it within the lease (`election_max` less a heartbeat, below the `election_max` every
//!    follower waits before it may vote for anyone else). `serving` checks that on every
//!    request. Losing the leadership or the term, or handing it over, fences the device for
//!    good. A lease that ran out while this member still leads in its term is a lapse: nothing
//!    is answered from this side alone (no read, not even from the cache, and no flush), and
//!    `reconfirm` asks a quorum again (a read-index round). A quorum's answer renews the lease;
//!    a lapse longer than `hold` fences the device for good.
//!
//! Why a lapse may end and a loss may not: another member attaches only as leader of a later
//! term, which takes a quorum's votes; a quorum that acknowledges this member in its own term
//! afterwards proves no such leader exists yet, so nothing was written elsewhere and the cache
//! is current. Once the term moved on, another member may have attached and written: the cache
//! may be stale and nothing this member sends can commit. Failing every request (the frontend
//! answers EIO) is then the only answer that never lies; the operator (or the unit that
//! restarts it) attaches again. A lapse is held, not failed, because a stall of a second (a
//! loaded host, a slow disk) would otherwise end the attachment for good.
//!
//! Why a write that commits here is never one the state machine refuses: an entry this member
//! commits as leader of term `t` follows its own attach entry (made in `t`) in the log, and no
//! other attach entry can lie between them, since another member attaches only as leader of a
//! later term, after this one's entries. The epoch check at apply is what stops a superseded
//! server's writes that reach a later leader's log another way.

use openraft::async_runtime::WatchReceiver;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use openraft::{Instant as _, ServerState};

use super::readers::{ReaderPool, DEFAULT_READERS};
use super::remote::good_copy_from;
use super::{BoxFuture, Cluster, NotServing, ReadOutcome};
use crate::replication::commits::OnCommit;
use crate::replication::node::{applied_index, Node};
use crate::replication::tcp::{Admin, NodeClient};
use crate::replication::types::{NodeId, Request};
use crate::storage::image::Attachment;

/// How a member attaches.
#[derive(Clone, Debug)]
pub struct MemberOptions {
    /// The cluster's id (its peers' connections are checked against it).
    pub cluster_id: uuid::Uuid,
    /// How this member reaches the others (its own certificate under TLS).
    pub security: crate::net::Security,
    /// The address this member's connections leave from (its listen address).
    pub bind: Option<IpAddr>,
    /// How long a quorum's acknowledgement keeps this member serving: below the time a
    /// follower waits for its leader before it may vote for another (`election_max`).
    pub lease: Duration,
    /// One election timeout: how long to wait for leadership to move before asking again.
    pub election_max: Duration,
    /// How long past its lease a lapsed attachment is held while a quorum is asked again,
    /// before the device is fenced for good (a member cut off for longer gives its I/O EIO).
    pub hold: Duration,
    /// How long attaching may take in all.
    pub attach_within: Duration,
    /// Each request to a peer (a repair read).
    pub timeout: Duration,
    /// The term in which this node handed its leadership over (0: never): no attachment made
    /// in that term or before serves again (`relinquish`, set before openraft's transfer).
    pub relinquished: Arc<std::sync::atomic::AtomicU64>,
}

/// The device's cluster as one member serving it sees it.
pub struct Member {
    node: Arc<Node>,
    opts: MemberOptions,
    /// The attachment's epoch (its attach entry's index) and the term it was made in.
    epoch: u64,
    term: u64,
    /// The attachment the log held just before this one's entry.
    replaced: Option<Attachment>,
    /// Set once, when the attachment is lost: why.
    fenced: OnceLock<String>,
    /// When the last quorum round `reconfirm` asked for was sent, if one was answered.
    confirmed: std::sync::Mutex<Option<Instant>>,
    /// When the current lapse was first seen (None while serving): `hold` counts from here.
    lapsed_since: std::sync::Mutex<Option<Instant>>,
    /// One quorum round at a time, however many requests wait on a lapse.
    round: tokio::sync::Mutex<()>,
    /// The other members (id, address), for repair reads.
    peers: Vec<(NodeId, String, NodeClient)>,
    readers: ReaderPool,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("node", &self.node.id)
            .field("epoch", &self.epoch)
            .field("term", &self.term)
            .finish_non_exhaustive()
    }
}

impl Member {
    /// Attaches the device to `node` (steps 1 and 2 above); the device may be served once this
    /// returns.
    pub async fn attach(node: Arc<Node>, opts: MemberOptions) -> anyhow::Result<Arc<Member>> {
        let deadline = Instant::now() + opts.attach_within;
        // Leadership can be lost between winning it and committing the attach entry (another
        // member's election timer fired at the same time): then it is won again.
        let (term, epoch, replaced) = loop {
            let term = win_leadership(&node, &opts, deadline).await?;
            // Everything committed before this leadership applied: the attachment this one
            // replaces is then known (a restarted member's own state may be behind the log).
            let attempt = async {
                node.raft
                    .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                    .await
                    .map_err(|e| anyhow::anyhow!("confirming the leadership: {e}"))?;
                let replaced = node.engine.attachment();
                let epoch = propose_attach(&node, deadline, &opts).await?;
                Ok::<_, anyhow::Error>((epoch, replaced))
            };
            // Bounded: openraft's wait for apply has no limit of its own.
            let left = deadline.saturating_duration_since(Instant::now()).max(opts.election_max);
            let attempt = async {
                tokio::time::timeout(left, attempt).await.unwrap_or_else(|_| {
                    Err(anyhow::anyhow!("confirming the leadership did not finish in {left:?}"))
                })
            };
            match attempt.await {
                Ok((epoch, replaced)) => break (term, epoch, replaced),
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "attaching failed; winning leadership again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        // The attach entry is committed: from here on, a failure commits a detach entry, so the
        // log never names a server that is not there.
        let peers = {
            let m = node.raft.metrics().borrow_watched().clone();
            m.membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != node.id)
                .filter_map(|(id, n)| {
                    let addr = n.addr.parse().ok()?;
                    let client = NodeClient::new(addr, opts.bind, opts.cluster_id, &opts.security);
                    Some((*id, n.addr.clone(), client))
                })
                .collect()
        };
        let readers = match ReaderPool::new(DEFAULT_READERS, "xdevice-read") {
            Ok(r) => r,
            Err(e) => {
                abandon_attach(&node, epoch, &opts).await;
                return Err(e.into());
            }
        };
        let member = Member {
            node,
            opts,
            epoch,
            term,
            replaced,
            fenced: OnceLock::new(),
            confirmed: std::sync::Mutex::new(None),
            lapsed_since: std::sync::Mutex::new(None),
            round: tokio::sync::Mutex::new(()),
            peers,
            readers,
        };
        let checked = async {
            // The proposal resolves at commit: once the entry is applied too, the image holds
            // every write before it and the state machine names this member.
            wait_applied(&member.node, epoch, member.opts.attach_within)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let held = member.node.engine.attachment();
            anyhow::ensure!(
                held == Some(Attachment { epoch, node: member.node.id }),
                "the attach entry at index {epoch} is applied, but the attachment is {held:?}"
            );
            member.serving().map_err(|why| anyhow::anyhow!("attached at epoch {epoch}, then {why}"))
        };
        if let Err(e) = checked.await {
            abandon_attach(&member.node, epoch, &member.opts).await;
            return Err(e);
        }
        tracing::info!(epoch, term, node = member.node.id, "device attached to this member");
        Ok(Arc::new(member))
    }

    /// After the attach entry committed, a failure commits a detach entry (best effort: a
    /// member that lost its leadership cannot, and is superseded anyway).
    pub async fn abandon(&self) {
        let _ = self.fenced.set("the attach was abandoned".to_string());
        abandon_attach(&self.node, self.epoch, &self.opts).await;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The attachment the log held just before this one (None: no member had attached).
    pub fn replaced(&self) -> Option<Attachment> {
        self.replaced
    }

    /// Gives the attachment up (this member is about to hand its leadership to another): from
    /// now on `serving` fails, before any other member can be elected.
    pub fn relinquish(&self, why: &str) {
        self.fence(why.to_string());
    }

    /// Why this member stopped serving, if it did.
    pub fn fenced(&self) -> Option<&str> {
        self.fenced.get().map(String::as_str)
    }

    /// Ends the attachment cleanly: commits a detach entry (no member serves; this epoch's
    /// writes are refused from then on) and fences this side. The device must have stopped and
    /// committed everything it completed first.
    pub async fn detach(self: &Arc<Self>) -> anyhow::Result<u64> {
        self.clone().reconfirm().await.map_err(|why| anyhow::anyhow!("cannot detach: {why}"))?;
        let commit = self
            .node
            .proposer
            .propose(Request::Attach(0))
            .await
            .map_err(|e| anyhow::anyhow!("proposing the detach entry: {e}"))?;
        let index = tokio::time::timeout(self.opts.attach_within, commit)
            .await
            .map_err(|_| anyhow::anyhow!("the detach entry did not commit in time"))?
            .map_err(|e| anyhow::anyhow!("the detach entry failed: {e}"))?;
        let _ = self.fenced.set(format!("detached at log index {index}"));
        Ok(index)
    }

    /// Fails `why` once: the attachment is lost for good.
    fn fence(&self, why: String) -> String {
        let why = self.fenced.get_or_init(|| why).clone();
        // Proposals still waiting for their commit will not see it from this leader.
        self.node.proposer.abandon(&why);
        why
    }
}

/// Commits a detach entry for the attachment at `epoch` if this node still leads and the log
/// still names it; logs what happened.
async fn abandon_attach(node: &Arc<Node>, epoch: u64, opts: &MemberOptions) {
    if node.engine.attachment() != Some(Attachment { epoch, node: node.id }) {
        return;
    }
    let proposed = node.proposer.propose(Request::Attach(0)).await;
    let outcome = match proposed {
        Ok(commit) => tokio::time::timeout(opts.election_max.max(Duration::from_secs(5)), commit)
            .await
            .map_err(|_| "not committed in time".to_string())
            .and_then(|r| r),
        Err(e) => Err(e),
    };
    match outcome {
        Ok(index) => tracing::warn!(epoch, index, "attach abandoned: detach entry committed"),
        Err(e) => tracing::warn!(epoch, error = %e, "attach abandoned; no detach entry committed"),
    }
}

/// Step 2: proposes the attach entry; its index, once committed.
async fn propose_attach(
    node: &Arc<Node>,
    deadline: Instant,
    opts: &MemberOptions,
) -> anyhow::Result<u64> {
    let commit = node
        .proposer
        .propose(Request::Attach(node.id))
        .await
        .map_err(|e| anyhow::anyhow!("proposing the attach entry: {e}"))?;
    tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()).max(opts.election_max),
        commit,
    )
    .await
    .map_err(|_| anyhow::anyhow!("the attach entry did not commit in time"))?
    .map_err(|e| anyhow::anyhow!("the attach entry failed: {e}"))
}

/// Step 1: until `node` leads, asks the leader it knows to hand over, or stands for election
/// when there is none; at most once per election timeout, so that a campaign (a vote round
/// under emulation takes a good part of one) is never cut short by the next. The term it leads
/// in.
async fn win_leadership(
    node: &Arc<Node>,
    opts: &MemberOptions,
    deadline: Instant,
) -> anyhow::Result<u64> {
    let mut rx = node.raft.metrics();
    let mut last_try: Option<Instant> = None;
    loop {
        let (state, leader, term, addr) = {
            let m = rx.borrow_watched();
            let addr = m.current_leader.and_then(|l| {
                m.membership_config.membership().get_node(&l).map(|n| n.addr.clone())
            });
            (m.state, m.current_leader, m.current_term, addr)
        };
        if state == ServerState::Leader && leader == Some(node.id) {
            // openraft reports leadership once elected; its blank entry commits next. The
            // attach entry follows it in the log either way.
            return Ok(term);
        }
        let now = Instant::now();
        anyhow::ensure!(
            now < deadline,
            "node {} did not become the leader within the attach time (state {state:?}, \
             leader {leader:?}, term {term})",
            node.id
        );
        let due = last_try.is_none_or(|t| now.duration_since(t) >= opts.election_max);
        if due && state != ServerState::Candidate {
            last_try = Some(now);
            match (leader, addr) {
                (Some(l), Some(addr)) if l != node.id => {
                    tracing::info!(leader = l, "asking the leader to hand leadership over");
                    match addr.parse() {
                        Ok(sock) => {
                            // Bounded by an election timeout: a leader that is gone (or cut
                            // off) does not answer, and then there is an election to stand in.
                            let client =
                                NodeClient::new(sock, opts.bind, opts.cluster_id, &opts.security);
                            let ask = client.admin(Admin::Handover(node.id), opts.election_max);
                            if let Err(e) = ask.await {
                                tracing::warn!(leader = l, error = %e, "handover request failed");
                            }
                        }
                        Err(e) => tracing::warn!(leader = l, %addr, error = %e, "leader address"),
                    }
                }
                _ => {
                    // No leader known: the serving host may be gone. An election without
                    // pre-vote; voters whose lease still holds refuse it, and it is tried again
                    // an election timeout later.
                    tracing::info!(term, "no leader known: standing for election");
                    if let Err(e) = node.raft.trigger().elect(false).await {
                        anyhow::bail!("node {} cannot stand for election: {e}", node.id);
                    }
                }
            }
        }
        let wait =
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
        if let Ok(Err(_)) = tokio::time::timeout(wait, rx.changed()).await {
            anyhow::bail!("node {} stopped while attaching", node.id);
        }
    }
}

impl Cluster for Member {
    /// The member's own process holds the leader's only copy of what it accepted.
    fn acceptance_outlives_process(&self) -> bool {
        false
    }

    /// Proposes to this member's replica, as leader, with the attachment's epoch: `on_commit`
    /// runs at commit, on openraft's core task.
    fn submit(self: Arc<Self>, req: Request, on_commit: OnCommit) -> BoxFuture<Result<(), String>> {
        let req = match req {
            Request::Blocks(ops, tag) => Request::Fenced(self.epoch, ops, tag),
            other => other,
        };
        Box::pin(async move {
            self.clone().reconfirm().await?;
            self.node.proposer.propose_then(req, on_commit).await
        })
    }

    /// From this member's own image, once it has applied `applied_at_least` and its attach
    /// entry (so every write before the attachment). A block failing its checksum is taken
    /// from another member that has applied as far (`READ_LOCAL`), and rewritten here when the
    /// good copy is exactly what this image's checksum table promises.
    fn read(
        self: Arc<Self>,
        lba: u64,
        blocks: u64,
        applied_at_least: u64,
    ) -> BoxFuture<Result<ReadOutcome, String>> {
        Box::pin(async move {
            self.clone().reconfirm().await?;
            let floor = applied_at_least.max(self.epoch);
            wait_applied(&self.node, floor, Duration::from_secs(10)).await?;
            let bs = self.node.engine.superblock().block_bytes as usize;
            let node = self.node.clone();
            let (mut out, bad) = self
                .readers
                .run(move || {
                    let mut out = vec![0u8; blocks as usize * bs];
                    let bad = node
                        .engine
                        .image()
                        .read_verified(lba, &mut out)
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((out, bad))
                })
                .await??;
            let mut outcome = ReadOutcome::clean(Vec::new());
            for bad in bad {
                outcome.corrupt_blocks += 1;
                tracing::error!(
                    lba = bad.lba,
                    location = %bad.location,
                    expected = format_args!("{:#010x}", bad.expected),
                    found = format_args!("{:#010x}", bad.found),
                    "data block fails its checksum; reading it from another member"
                );
                let others = self.peers.iter().map(|(id, addr, c)| (*id, addr.clone(), c));
                let (from, block) = good_copy_from(others, bad.lba, bs, floor, self.opts.timeout)
                    .await
                    .map_err(|why| {
                        format!(
                            "{}; no other member holds a good copy: {why}",
                            bad.clone().into_error()
                        )
                    })?;
                out[((bad.lba - lba) as usize) * bs..][..bs].copy_from_slice(&block);
                let node = self.node.clone();
                let lba = bad.lba;
                let repaired =
                    self.readers.run(move || node.engine.image().repair_block(lba, &block)).await?;
                match repaired {
                    Ok(true) => {
                        outcome.repaired_blocks += 1;
                        tracing::warn!(from, lba, "data block repaired from another member");
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(lba, error = %e, "repairing a data block failed"),
                }
            }
            outcome.data = out;
            Ok(outcome)
        })
    }

    /// Step 3: serving while this member leads in the term it attached in and a quorum
    /// acknowledged it within the lease; lapsed while it leads in that term but the lease ran
    /// out, for at most `hold`; lost, for good, otherwise.
    fn serving(&self) -> Result<(), NotServing> {
        if let Some(why) = self.fenced.get() {
            return Err(NotServing::Lost(why.clone()));
        }
        let given_up = self.opts.relinquished.load(std::sync::atomic::Ordering::SeqCst);
        if given_up >= self.term {
            return Err(NotServing::Lost(self.fence(format!(
                "node {} handed its leadership over in term {given_up}",
                self.node.id
            ))));
        }
        let why = {
            let m = self.node.raft.metrics();
            let m = m.borrow_watched();
            if m.state != ServerState::Leader || m.current_leader != Some(self.node.id) {
                format!(
                    "node {} no longer leads (state {:?}, leader {:?}, term {})",
                    self.node.id, m.state, m.current_leader, m.current_term
                )
            } else if m.current_term != self.term {
                format!(
                    "node {} leads in term {}, not term {} in which it attached",
                    self.node.id, m.current_term, self.term
                )
            } else {
                // openraft's acknowledgements, or a quorum round `reconfirm` asked for: both
                // dated by when their request was sent.
                let acked = m.last_quorum_acked.as_ref().map(|t| t.elapsed());
                let confirmed = self.confirmed.lock().expect("confirmed lock").map(|t| t.elapsed());
                let age = [acked, confirmed].into_iter().flatten().min();
                let mut lapsed_since = self.lapsed_since.lock().expect("lapsed lock");
                if age.is_some_and(|age| age <= self.opts.lease) {
                    *lapsed_since = None;
                    return Ok(());
                }
                let why = match age {
                    Some(age) => format!(
                        "no quorum acknowledged node {} for {age:?} (lease {:?})",
                        self.node.id, self.opts.lease
                    ),
                    None => format!("no quorum has acknowledged node {} yet", self.node.id),
                };
                // The hold counts from when the lapse was first seen, so rounds that each
                // succeed but answer later than the lease cannot hold it open forever.
                let since = *lapsed_since.get_or_insert_with(Instant::now);
                if since.elapsed() <= self.opts.hold {
                    return Err(NotServing::Lapsed(why));
                }
                format!(
                    "{why}, nor within {:?} of asking again: another member may have attached",
                    self.opts.hold
                )
            }
        };
        Err(NotServing::Lost(self.fence(why)))
    }

    /// Asks a quorum to acknowledge this member again while its attachment is lapsed, until it
    /// serves again or the lapse outlasts `hold` (so at most about `hold` plus one round).
    /// One round runs at a time: a request that waits for it sees its outcome.
    fn reconfirm(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        Box::pin(async move {
            loop {
                match self.serving() {
                    Ok(()) => return Ok(()),
                    Err(NotServing::Lost(why)) => return Err(why),
                    Err(NotServing::Lapsed(_)) => {}
                }
                let _round = self.round.lock().await;
                // Another waiter's round may have settled it meanwhile.
                match self.serving() {
                    Ok(()) => return Ok(()),
                    Err(NotServing::Lost(why)) => return Err(why),
                    Err(NotServing::Lapsed(_)) => {}
                }
                let sent = Instant::now();
                let round =
                    self.node.raft.get_read_linearizer(openraft::raft::ReadPolicy::ReadIndex);
                if let Ok(Ok(_)) = tokio::time::timeout(self.opts.election_max, round).await {
                    let mut confirmed = self.confirmed.lock().expect("confirmed lock");
                    if confirmed.is_none_or(|t| t < sent) {
                        *confirmed = Some(sent);
                    }
                }
                // Answered too late to renew the lease, or not at all: `serving` tells a
                // lapse from a loss; the next round after a pause.
                if !matches!(self.serving(), Err(NotServing::Lapsed(_))) {
                    continue;
                }
                tokio::time::sleep(self.opts.election_max / 8).await;
            }
        })
    }
}

/// Waits until `node` has applied `index`, up to `within`.
async fn wait_applied(node: &Node, index: u64, within: Duration) -> Result<(), String> {
    if applied_index(&node.raft) >= index {
        return Ok(());
    }
    let mut rx = node.raft.metrics();
    let wait = async {
        loop {
            if rx.borrow_watched().last_applied.as_ref().map_or(0, |l| l.index) >= index {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Err("the replica stopped".to_string());
            }
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .map_err(|_| format!("this member has not applied log index {index} within {within:?}"))?
}
