//! The embedded mode: several replicas in this process, each with its own data directory,
//! talking through in-process channels (`LocalRouter`), and a `Cluster` over them for the device.

use openraft::async_runtime::WatchReceiver;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, ServerState};

use super::readers::{ReaderPool, DEFAULT_READERS};
use super::{BoxFuture, Cluster, ReadOutcome};
use crate::replication::commits::OnCommit;
use crate::replication::network::{LocalRouter, LocalTransport, Transport};
use crate::replication::node::{applied_index, Node, RaftTuning};
use crate::replication::open_replica;
use crate::replication::types::{NodeId, Request};
use crate::storage::disk::{Backend, DirVolume, Volume};
use crate::storage::engine::{Engine, EngineConfig, FormatOptions};
use crate::storage::layout::Location;
use crate::storage::StorageError;

/// Each embedded replica's cache of decoded log entries: the replicas share one process and its
/// memory budget (the goal: resident ≤ hot cache + 64 MiB), and in-process followers run
/// within a proposal or two (4 MiB each) of the leader, so a small cache still serves
/// replication from memory.
pub const EMBEDDED_LOG_CACHE_BYTES: usize = 16 << 20;

/// How long a rebuilt replica may take to catch up (a snapshot of the whole device included)
/// before the start gives up; the next start carries on from where it stopped.
const REBUILD_CATCH_UP: Duration = Duration::from_secs(1800);

/// Where and how the embedded replicas live.
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    pub dir: PathBuf,
    pub replicas: u64,
    pub format: FormatOptions,
    pub engine: EngineConfig,
    pub backend: Backend,
    pub tuning: RaftTuning,
    /// Each replica's cache of decoded recent log entries (`LogStore`).
    pub log_cache_bytes: usize,
    /// Each replica's data directory, replica 1 first (one per disk, so the device survives
    /// the loss of one); empty: `dir/replica-N` for replica N.
    pub replica_dirs: Vec<PathBuf>,
    /// Rebuild replicas whose store is gone (`Embedded::rebuild`). Asked for explicitly: a
    /// disk that is merely not mounted looks the same as a lost one, and a rebuild on the empty
    /// mount point would drop that replica from the cluster for good.
    pub rebuild_lost: bool,
}

impl EmbeddedOptions {
    /// Replica `id`'s data directory.
    pub fn replica_dir(&self, id: NodeId) -> PathBuf {
        match self.replica_dirs.get((id as usize).wrapping_sub(1)) {
            Some(dir) => dir.clone(),
            None => self.dir.join(format!("replica-{id}")),
        }
    }
}

/// Formats (first start) or opens every replica's store, starts them, and makes them one
/// cluster. A restart recovers each replica from its own directory, and rebuilds a replica whose
/// store is gone from the others (`rebuild`).
///
/// Replicas are numbered by position (slot) 1..=N: slot `s` lives in `replica_dir(s)`. A slot's
/// Raft node id is the one its store is bound to: `s` from the first start, a new id (above every
/// id the cluster has known) once the slot was rebuilt.
pub struct Embedded {
    pub router: Arc<LocalRouter>,
    /// The running replica of each slot.
    nodes: Mutex<Vec<Option<Arc<Node>>>>,
    /// Each slot's Raft node id (0 until its store is opened).
    ids: Mutex<Vec<NodeId>>,
    opts: EmbeddedOptions,
    /// The commit index a leader of this process confirmed with a quorum before the first read:
    /// entries committed before this process started (which no device of this process
    /// confirmed) are at or below it. Reads go to a replica that has applied this far.
    recovered: tokio::sync::OnceCell<u64>,
    /// The threads that read replica images for reads missing the device's cache.
    readers: ReaderPool,
    /// Each replica's store, when the caller chose them (`start_on`); otherwise a directory
    /// per replica under `opts.dir`.
    volumes: Option<Vec<Arc<dyn Volume>>>,
    /// Wakes `leadership_watch`: a proposal was handed to a leader.
    proposed: Arc<tokio::sync::Notify>,
    /// The cluster id of the first replica store opened: every other must have the same.
    cluster_id: Mutex<Option<uuid::Uuid>>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded").field("dir", &self.opts.dir).finish_non_exhaustive()
    }
}

impl Embedded {
    pub async fn start(opts: EmbeddedOptions) -> anyhow::Result<Arc<Embedded>> {
        Embedded::start_with(opts, None).await
    }

    /// As `start`, with replica `i + 1`'s store on `volumes[i]` (a simulated disk in tests;
    /// incoming snapshots are staged on the same volume).
    pub async fn start_on(
        opts: EmbeddedOptions,
        volumes: Vec<Arc<dyn Volume>>,
    ) -> anyhow::Result<Arc<Embedded>> {
        anyhow::ensure!(
            volumes.len() as u64 == opts.replicas,
            "{} volumes given for {} replicas",
            volumes.len(),
            opts.replicas
        );
        Embedded::start_with(opts, Some(volumes)).await
    }

    async fn start_with(
        opts: EmbeddedOptions,
        volumes: Option<Vec<Arc<dyn Volume>>>,
    ) -> anyhow::Result<Arc<Embedded>> {
        anyhow::ensure!(opts.replicas >= 1, "at least one replica is needed");
        anyhow::ensure!(
            opts.replica_dirs.is_empty() || opts.replica_dirs.len() as u64 == opts.replicas,
            "{} replica directories given for {} replicas",
            opts.replica_dirs.len(),
            opts.replicas
        );
        let router = Arc::new(LocalRouter::default());
        let embedded = Arc::new(Embedded {
            router,
            nodes: Mutex::new(vec![None; opts.replicas as usize]),
            ids: Mutex::new(vec![0; opts.replicas as usize]),
            opts,
            recovered: tokio::sync::OnceCell::new(),
            readers: ReaderPool::new(DEFAULT_READERS, "xdevice-read")?,
            volumes,
            proposed: Arc::new(tokio::sync::Notify::new()),
            cluster_id: Mutex::new(None),
        });
        tokio::spawn(leadership_watch(Arc::downgrade(&embedded), embedded.proposed.clone()));
        let lost = embedded.lost_replicas()?;
        let mut fresh = false;
        for slot in (1..=embedded.opts.replicas).filter(|s| !lost.contains(s)) {
            match embedded.start_replica(slot).await {
                Ok(formatted) => fresh |= formatted,
                Err(e) => {
                    // Stop the replicas already started: they hold their stores.
                    if let Err(stop) = embedded.shutdown().await {
                        tracing::warn!(error = %stop, "stopping the replicas started so far");
                    }
                    return Err(e.context(format!("starting replica {slot}")));
                }
            }
        }
        if fresh {
            let members: Vec<(NodeId, String)> =
                (1..=embedded.opts.replicas).map(|id| (id, format!("local:{id}"))).collect();
            embedded
                .node(1)
                .ok_or_else(|| anyhow::anyhow!("replica 1 is not running"))?
                .bootstrap(&members)
                .await?;
        }
        if let Err(e) = embedded.rebuild(&lost).await {
            if let Err(stop) = embedded.shutdown().await {
                tracing::warn!(error = %stop, "stopping the replicas after a failed rebuild");
            }
            return Err(e.context("rebuilding the lost replicas"));
        }
        Ok(embedded)
    }

    /// Whether replica `slot`'s store exists (looked at without creating anything).
    fn store_exists(&self, slot: u64) -> anyhow::Result<bool> {
        let name = &self.opts.format.device_name;
        Ok(match &self.volumes {
            Some(volumes) => {
                let volume = volumes
                    .get((slot - 1) as usize)
                    .ok_or_else(|| anyhow::anyhow!("no volume for replica {slot}"))?;
                crate::storage::layout::devices_in(&**volume)?.contains(name)
            }
            None => self
                .opts
                .replica_dir(slot)
                .join(crate::storage::layout::superblock_file(name))
                .exists(),
        })
    }

    /// The slots whose store is gone (a lost disk, a removed directory) while other replicas
    /// hold the device: `rebuild` makes them anew. None on a first start (no store at all).
    /// Refused when fewer than a majority of the stores remain: the survivors cannot elect a
    /// leader to rebuild from, and a replica formatted afresh must never vote as the one it
    /// replaces (it would grant its vote to a replica missing writes it had acknowledged).
    fn lost_replicas(&self) -> anyhow::Result<Vec<u64>> {
        let slots = 1..=self.opts.replicas;
        let present =
            slots.clone().map(|s| self.store_exists(s)).collect::<anyhow::Result<Vec<_>>>()?;
        let missing: Vec<u64> = slots.zip(&present).filter(|(_, p)| !**p).map(|(s, _)| s).collect();
        let kept = present.iter().filter(|p| **p).count() as u64;
        if kept == 0 || missing.is_empty() {
            return Ok(Vec::new());
        }
        let dirs: Vec<String> =
            missing.iter().map(|s| self.opts.replica_dir(*s).display().to_string()).collect();
        if !self.opts.rebuild_lost && kept * 2 > self.opts.replicas {
            anyhow::bail!(
                "the stores of replicas {missing:?} ({}) are gone while {kept} of {} remain: \
                 nothing was started. If the disk is only not mounted, mount it and start again; \
                 if it is lost, start with --rebuild to rebuild the replica from the others \
                 under a new node id (or, if the device was never served, a first start having \
                 failed part-way, empty every replica's directory and start again).",
                dirs.join(", "),
                self.opts.replicas
            );
        }
        if kept * 2 <= self.opts.replicas {
            anyhow::bail!(
                "the stores of replicas {missing:?} ({}) are gone and only {kept} of {} remain, \
                 not a majority: the device cannot be rebuilt from them, and a replica formatted \
                 afresh could vote away writes it had acknowledged. Nothing was started. Restore \
                 the replicas' directories to serve the device.",
                dirs.join(", "),
                self.opts.replicas
            );
        }
        tracing::warn!(replicas = ?missing, "replica stores are gone: rebuilding them from the others");
        Ok(missing)
    }

    fn location(&self, slot: u64) -> anyhow::Result<Location> {
        let dir = self.opts.replica_dir(slot);
        std::fs::create_dir_all(&dir)?;
        let volume = match &self.volumes {
            Some(volumes) => volumes
                .get((slot - 1) as usize)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no volume for replica {slot}"))?,
            None => Arc::new(DirVolume::open(&dir, self.opts.backend)?) as Arc<dyn Volume>,
        };
        Ok(Location::Directory { volume, name: self.opts.format.device_name.clone() })
    }

    /// Starts the replica in slot `slot`; true if its store was formatted just now (a first
    /// start: it is bound to node id `slot`).
    pub async fn start_replica(&self, slot: u64) -> anyhow::Result<bool> {
        self.start_slot(slot, None).await
    }

    /// Starts slot `slot`: its existing store as the node it is bound to, or a store formatted
    /// now, for node `new_id` (a rebuild: the cluster's id) or node `slot` (a first start).
    async fn start_slot(&self, slot: u64, new_id: Option<NodeId>) -> anyhow::Result<bool> {
        let location = self.location(slot)?;
        let mut fresh = false;
        let mut format = self.opts.format.clone();
        format.device_uuid = uuid::Uuid::new_v4();
        format.node_id = new_id.unwrap_or(slot);
        if new_id.is_some() {
            format.cluster_id = self
                .cluster_id
                .lock()
                .expect("cluster id lock")
                .ok_or_else(|| anyhow::anyhow!("rebuilding before any replica was opened"))?;
        }
        match Engine::format(&location, &format) {
            Ok(_) => fresh = new_id.is_none(),
            Err(StorageError::AlreadyFormatted(_)) if new_id.is_none() => {}
            Err(e) => return Err(e.into()),
        }
        // The node the store is bound to: a rebuilt slot's is above the first ids. A store of
        // one of the first ids in another slot (swapped directories) is refused by the engine.
        let bound = store_node_id(&location)?;
        let id = match bound {
            0 => slot,
            id if id > self.opts.replicas => id,
            _ => slot,
        };
        let dir = self.opts.replica_dir(slot);
        let engine = EngineConfig { node_id: Some(id), ..self.opts.engine.clone() };
        let replica = open_replica(&location, engine, &dir, self.opts.log_cache_bytes)?;
        // Replicas of one device share its cluster id: a directory of another device's replica
        // (a mixed-up --replica-dir) is refused before it joins.
        let theirs = replica.engine.superblock().cluster_id;
        {
            let mut ours = self.cluster_id.lock().expect("cluster id lock");
            match *ours {
                Some(c) if c != theirs => anyhow::bail!(
                    "{} holds a replica of another device (cluster {theirs}, not {c})",
                    dir.display()
                ),
                _ => *ours = Some(theirs),
            }
        }
        let transport: Arc<dyn Transport> =
            Arc::new(LocalTransport { router: self.router.clone(), me: id });
        let node = Arc::new(Node::start(id, replica, transport, &self.opts.tuning).await?);
        self.router.register(id, node.raft.clone(), node.inbox.clone());
        self.ids.lock().expect("ids lock")[(slot - 1) as usize] = id;
        self.nodes.lock().expect("nodes lock")[(slot - 1) as usize] = Some(node);
        Ok(fresh)
    }

    /// Makes each slot of `lost` a replica again: a store formatted for a new node id (never
    /// the lost one's: a blank store must not vote as a replica that had acknowledged writes),
    /// added as a learner, caught up from the leader (by snapshot when the log no longer
    /// reaches back), then made a voter in place of the lost one, in one membership change.
    /// Also finishes a rebuild a crash interrupted: a running replica that is not a voter
    /// replaces a voter whose store is gone.
    async fn rebuild(&self, lost: &[u64]) -> anyhow::Result<()> {
        let running_ids =
            |me: &Embedded| -> Vec<NodeId> { me.running().iter().map(|n| n.id).collect() };
        let (voters, joint): (Vec<NodeId>, bool) = {
            let Some(any) = self.running().into_iter().next() else { return Ok(()) };
            let m = any.raft.metrics().borrow_watched().clone();
            let membership = m.membership_config.membership();
            (membership.voter_ids().collect(), membership.get_joint_config().len() > 1)
        };
        // A rebuild a crash interrupted: a running replica that is not a voter, and a voter
        // that is not running (its store gone). Not on a first start: no voters yet.
        // A change that stopped half-way leaves a joint configuration (the union of the two
        // voter sets): finish it too.
        let running = running_ids(self);
        let unvoted = running.iter().any(|id| !voters.contains(id));
        let orphaned = voters.iter().any(|id| !running.contains(id));
        if lost.is_empty() && !(orphaned && (unvoted || joint)) {
            return Ok(());
        }
        let leader = self.wait_leader(Duration::from_secs(30)).await?;
        let membership = leader.raft.metrics().borrow_watched().membership_config.clone();
        let known = membership.membership().nodes().map(|(id, _)| *id).chain(running_ids(self));
        let first = known.max().unwrap_or(self.opts.replicas) + 1;
        for (id, &slot) in (first..).zip(lost) {
            tracing::warn!(
                replica = slot,
                node = id,
                dir = %self.opts.replica_dir(slot).display(),
                "rebuilding a lost replica under a new node id"
            );
            self.start_slot(slot, Some(id)).await?;
        }
        let running = running_ids(self);
        for id in running.iter().filter(|id| !voters.contains(id)) {
            let started = std::time::Instant::now();
            let add = leader.raft.add_learner(*id, BasicNode::new(format!("local:{id}")), true);
            tokio::time::timeout(REBUILD_CATCH_UP, add)
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "node {id} did not catch up within {REBUILD_CATCH_UP:?}; start again to \
                         go on"
                    )
                })?
                .map_err(|e| anyhow::anyhow!("adding node {id} as a learner: {e}"))?;
            tracing::info!(
                node = id,
                secs = started.elapsed().as_secs_f64(),
                "rebuilt replica caught up"
            );
        }
        let voters: std::collections::BTreeSet<NodeId> = running.iter().copied().collect();
        leader
            .raft
            .change_membership(voters.clone(), false)
            .await
            .map_err(|e| anyhow::anyhow!("making {voters:?} the voters: {e}"))?;
        tracing::warn!(voters = ?voters, "replicas rebuilt: the voters are the running replicas");
        Ok(())
    }

    /// Stops the replica in slot `slot` (its store stays; `start_replica` recovers it).
    pub async fn stop_replica(&self, slot: u64) -> anyhow::Result<()> {
        let node = self.nodes.lock().expect("nodes lock")[(slot - 1) as usize].take();
        if let Some(node) = node {
            self.router.unregister(node.id);
            node.shutdown().await?;
        }
        Ok(())
    }

    /// Slot `slot`'s Raft node id (0 if its store was never opened).
    pub fn node_id(&self, slot: u64) -> NodeId {
        self.ids.lock().expect("ids lock").get((slot - 1) as usize).copied().unwrap_or(0)
    }

    /// The running replica of slot `slot`.
    pub fn node(&self, slot: u64) -> Option<Arc<Node>> {
        self.nodes.lock().expect("nodes lock").get((slot - 1) as usize).cloned().flatten()
    }

    pub fn running(&self) -> Vec<Arc<Node>> {
        self.nodes.lock().expect("nodes lock").iter().flatten().cloned().collect()
    }

    /// The running replica that is leader now, if any: of those that think they lead (an
    /// isolated old leader may still think so), the one with the highest term.
    pub fn leader(&self) -> Option<Arc<Node>> {
        self.running()
            .into_iter()
            .filter_map(|n| {
                let m = n.raft.metrics();
                let m = m.borrow_watched();
                (m.state == ServerState::Leader && m.current_leader == Some(n.id))
                    .then_some((m.current_term, n.clone()))
            })
            .max_by_key(|(term, _)| *term)
            .map(|(_, n)| n)
    }

    /// Waits up to `within` for a leader.
    pub async fn wait_leader(&self, within: Duration) -> anyhow::Result<Arc<Node>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "no leader within {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops every replica, each whatever became of the others. A replica whose store failed
    /// earlier (its disk lost: every write since was refused, and it stopped taking part) does
    /// not fail the stop while a majority stops cleanly: what the device completed is committed
    /// on that majority. It is named in the log, and the stop fails without such a majority.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        let (mut clean, mut failed) = (0usize, Vec::new());
        for slot in 1..=self.opts.replicas {
            let id = self.node_id(slot);
            let running = self.node(slot).is_some();
            match self.stop_replica(slot).await {
                Ok(()) if running => clean += 1,
                Ok(()) => failed.push(format!("replica {id} (slot {slot}) was not running")),
                Err(e) => {
                    tracing::error!(slot, node = id, error = %e, "replica {id} did not stop cleanly");
                    failed.push(format!("replica {id} (slot {slot}): {e:#}"));
                }
            }
        }
        anyhow::ensure!(
            clean * 2 > self.opts.replicas as usize,
            "only {clean} of {} replicas stopped cleanly: {}",
            self.opts.replicas,
            failed.join("; ")
        );
        Ok(())
    }

    pub fn block_bytes(&self) -> u32 {
        self.opts.format.block_bytes
    }

    pub fn device_bytes(&self) -> u64 {
        self.opts.format.device_bytes.unwrap_or(0)
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // Lets `leadership_watch` see that the cluster is gone.
        self.proposed.notify_one();
    }
}

/// An isolated or paused leader never hears that it was replaced, so its proposals would wait
/// until the device's I/O timeout: while any replica holds proposals awaiting commit, this
/// checks every 10 ms that it is still the leader with the highest term, and fails them as soon
/// as it is not (the device sends them again to the new leader). One task per cluster, asleep
/// while nothing is proposed; it ends with the cluster.
async fn leadership_watch(cluster: std::sync::Weak<Embedded>, proposed: Arc<tokio::sync::Notify>) {
    loop {
        let watched = {
            let Some(cluster) = cluster.upgrade() else { return };
            let holding: Vec<Arc<Node>> =
                cluster.running().into_iter().filter(|n| !n.proposer.is_idle()).collect();
            if !holding.is_empty() {
                let leader = cluster.leader().map(|l| l.id);
                for node in holding.iter().filter(|n| Some(n.id) != leader) {
                    node.proposer.abandon(&format!("node {} lost the leadership", node.id));
                }
            }
            !holding.is_empty()
        };
        if watched {
            tokio::time::sleep(Duration::from_millis(10)).await;
        } else {
            proposed.notified().await;
        }
    }
}

impl Cluster for Embedded {
    /// Every replica is in this process: what the leader accepted dies with it.
    fn acceptance_outlives_process(&self) -> bool {
        false
    }

    /// `on_commit` runs at commit (a majority of the replicas hold it durably, the leader
    /// counted after its own flush), on the leader's openraft core task through its
    /// `CommitWatch`; it does not wait for the entry to be applied. If the leader is deposed
    /// first, `leadership_watch` fails it.
    fn submit(self: Arc<Self>, req: Request, on_commit: OnCommit) -> BoxFuture<Result<(), String>> {
        let leader = self.leader();
        Box::pin(async move {
            let node = leader.ok_or_else(|| "no leader".to_string())?;
            node.proposer.propose_then(req, on_commit).await?;
            self.proposed.notify_one();
            Ok(())
        })
    }

    /// The embedded device is the cluster's only writer, so a replica that has applied the
    /// newest commit the device confirmed holds every completed write outside the device's
    /// cache: the leader (or, while there is none, any replica) serves the read once it has
    /// applied that far, without a quorum round per read. A block failing its checksum there is
    /// taken from another replica that has applied as far, and rewritten on the first one when
    /// the good copy is exactly what its checksum table promises.
    fn read(
        self: Arc<Self>,
        lba: u64,
        blocks: u64,
        applied_at_least: u64,
    ) -> BoxFuture<Result<ReadOutcome, String>> {
        let bs = self.block_bytes() as usize;
        Box::pin(async move {
            // After a restart, entries committed before it are re-applied only once a leader
            // has committed in its own term; until then a replica's image may be older than a
            // write completed before the restart. Once per process, a leader confirms its
            // commit index with a quorum, and reads wait for a replica that applied that far.
            let recovered = *self
                .recovered
                .get_or_try_init(|| async {
                    let leader = self.wait_leader(Duration::from_secs(10)).await.map_err(|e| {
                        format!("no leader to confirm the recovered commit index: {e}")
                    })?;
                    let read = leader
                        .raft
                        .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
                        .await
                        .map_err(|e| {
                            format!("confirming the recovered commit index failed: {e}")
                        })?;
                    Ok::<u64, String>(read.index())
                })
                .await?;
            let applied_at_least = applied_at_least.max(recovered);
            let node = self.replica_applied(applied_at_least, Duration::from_secs(10)).await?;
            let me = self.clone();
            me.readers
                .run(move || {
                    let mut out = vec![0u8; blocks as usize * bs];
                    let bad = node
                        .engine
                        .image()
                        .read_verified(lba, &mut out)
                        .map_err(|e| e.to_string())?;
                    let mut outcome = ReadOutcome::clean(Vec::new());
                    for bad in bad {
                        outcome.corrupt_blocks += 1;
                        tracing::error!(
                            replica = node.id,
                            lba = bad.lba,
                            location = %bad.location,
                            expected = format_args!("{:#010x}", bad.expected),
                            found = format_args!("{:#010x}", bad.found),
                            "data block fails its checksum; reading it from another replica"
                        );
                        let good = self
                            .running()
                            .into_iter()
                            .filter(|p| {
                                p.id != node.id && applied_index(&p.raft) >= applied_at_least
                            })
                            .find_map(|p| read_good_block(&p, bad.lba, bs));
                        let Some((peer, block)) = good else {
                            return Err(format!(
                                "{}; no other replica holds a good copy",
                                bad.into_error()
                            ));
                        };
                        out[((bad.lba - lba) as usize) * bs..][..bs].copy_from_slice(&block);
                        match node.engine.image().repair_block(bad.lba, &block) {
                            Ok(true) => {
                                outcome.repaired_blocks += 1;
                                tracing::warn!(
                                    replica = node.id,
                                    from = peer,
                                    lba = bad.lba,
                                    "data block repaired from another replica"
                                );
                            }
                            // The block changed since (a later write): nothing to repair, the
                            // write replaced the damaged bytes.
                            Ok(false) => {}
                            Err(e) => tracing::error!(
                                replica = node.id,
                                lba = bad.lba,
                                error = %e,
                                "repairing a data block failed"
                            ),
                        }
                    }
                    outcome.data = out;
                    Ok(outcome)
                })
                .await?
        })
    }
}

impl Embedded {
    /// A running replica that has applied `index` (the leader first), waiting up to `within`
    /// for one: woken by the replicas' metrics as they apply, never by polling.
    async fn replica_applied(&self, index: u64, within: Duration) -> Result<Arc<Node>, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // Watch first, then look: an apply landing in between is not missed.
            let mut watched = Vec::new();
            for n in self.leader().into_iter().chain(self.running()) {
                let mut rx = n.raft.metrics();
                if rx.borrow_and_update().last_applied.map_or(0, |l| l.index) >= index {
                    return Ok(n);
                }
                watched.push(rx);
            }
            if watched.is_empty() {
                return Err("no replica is running".to_string());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no replica has applied log index {index} within {within:?}"));
            }
            // Any replica's change (the leader's is first), or a stopped one's watch closing,
            // ends the wait; the bound only covers the leader changing meanwhile.
            let changes = watched.into_iter().map(|mut rx| {
                Box::pin(async move {
                    let _ = rx.changed().await;
                })
            });
            let wait = Duration::from_millis(50).min(deadline - tokio::time::Instant::now());
            let _ = tokio::time::timeout(wait, futures_select_any(changes)).await;
        }
    }
}

/// The node id the store at `location` is bound to (0: none yet), read without opening it.
fn store_node_id(location: &Location) -> anyhow::Result<NodeId> {
    let copies = crate::storage::layout::superblock_copies(location)?;
    Ok(crate::storage::superblock::choose(&copies)?.superblock.node_id)
}

/// Resolves when the first of `futures` does.
async fn futures_select_any<F: std::future::Future<Output = ()> + Unpin>(
    futures: impl Iterator<Item = F>,
) {
    let mut futures: Vec<F> = futures.collect();
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Block `lba` from `peer`'s image if it passes its checksum there.
fn read_good_block(peer: &Arc<Node>, lba: u64, bs: usize) -> Option<(NodeId, Vec<u8>)> {
    let mut block = vec![0u8; bs];
    match peer.engine.image().read_verified(lba, &mut block) {
        Ok(bad) if bad.is_empty() => Some((peer.id, block)),
        Ok(_) => {
            tracing::error!(replica = peer.id, lba, "data block fails its checksum here too");
            None
        }
        Err(e) => {
            tracing::error!(replica = peer.id, lba, error = %e, "reading a data block failed");
            None
        }
    }
}
