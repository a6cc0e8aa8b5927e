//! One running replica: its engine, its openraft instance, and the task that turns WAL growth
//! into snapshots (checkpoints) so the log prefix can be purged.

use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Config, SnapshotPolicy};

use super::election::ElectionGate;
use super::network::{NetworkFactory, Transport};
use super::snapshot::record_bytes;
use super::types::{NodeId, Raft};
use super::Replica;
use crate::storage::engine::Engine;

/// Raft timing and log retention.
///
/// openraft 0.9 reads the election timeout through a leader lease: a follower that has heard
/// from a leader stands for election only once `election_max` (the lease) plus its own random
/// timeout in `[election_min, election_max)` have passed since, checked on a tick of 1.5
/// heartbeats; it also refuses votes while that lease holds. With the defaults (heartbeat 50 ms,
/// election timeout 150-300 ms) a failed leader is replaced 450-675 ms after its last heartbeat.
/// openraft 0.9 also gives every AppendEntries the heartbeat interval to complete (a follower
/// answers once the entries are durable): at 30 ms a 4 MiB entry to a loaded follower timed out
/// and was retried often enough that the follower, hearing nothing between backoffs, campaigned
/// and made the leader step down (`cluster_membership`, about one run in four).
#[derive(Clone, Debug)]
pub struct RaftTuning {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Checkpoint (openraft snapshot) once the WAL holds this many live segments.
    pub snapshot_segments: usize,
    /// Entries kept below a snapshot, so a follower slightly behind catches up from the log.
    pub keep_entries: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat: Duration::from_millis(50),
            election_min: Duration::from_millis(150),
            election_max: Duration::from_millis(300),
            snapshot_segments: 8,
            keep_entries: 1000,
        }
    }
}

impl RaftTuning {
    fn config(&self, block_bytes: u32, cluster: &str) -> anyhow::Result<Config> {
        let cfg = Config {
            cluster_name: cluster.to_string(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            // Snapshots are triggered by WAL size (`snapshot_segments`), not entry counts.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.keep_entries,
            // Snapshot chunks are whole stream records (see `snapshot`).
            snapshot_max_chunk_size: record_bytes(block_bytes),
            install_snapshot_timeout: 10_000,
            // Entries per AppendEntries: up to 4 MiB each, so 8 bound a request to 32 MiB of
            // memory on both sides. 256 let a follower far behind be sent 1 GiB at once (read
            // back from the WAL and decoded), which the embedded mode held twice over.
            max_payload_entries: 8,
            // `ElectionGate` turns elections on only while a pre-vote would win.
            enable_elect: false,
            ..Default::default()
        };
        Ok(cfg.validate()?)
    }
}

/// A replica's applied log index (0 before anything was applied).
pub fn applied_index(raft: &Raft) -> u64 {
    raft.metrics().borrow().last_applied.map_or(0, |l| l.index)
}

/// A running replica.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    pub engine: Arc<Engine>,
    /// Where the RPC server reports leader contact and answers pre-votes.
    pub gate: ElectionGate,
    monitor: tokio::task::JoinHandle<()>,
    elections: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Node {
    /// Starts openraft over an opened replica.
    pub async fn start(
        id: NodeId,
        replica: Replica,
        transport: Arc<dyn Transport>,
        tuning: &RaftTuning,
    ) -> anyhow::Result<Node> {
        let sb = replica.engine.superblock();
        let config = Arc::new(tuning.config(sb.block_bytes, &sb.cluster_id.to_string())?);
        let engine = replica.engine.clone();
        let log = replica.log.clone();
        let network = NetworkFactory::new(transport.clone());
        let raft = Raft::new(id, config, network, replica.log, replica.sm).await?;
        let monitor = tokio::spawn(snapshot_monitor(raft.clone(), engine.clone(), tuning.clone()));
        let gate = ElectionGate::new(id, raft.clone(), log, tuning.election_min);
        let elections = tokio::spawn(gate.clone().run(transport, tuning.heartbeat));
        Ok(Node { id, raft, engine, gate, monitor, elections })
    }

    /// Makes a new cluster of `members` (id, address) from this node. Only on a fresh node.
    pub async fn bootstrap(&self, members: &[(NodeId, String)]) -> anyhow::Result<()> {
        let nodes: std::collections::BTreeMap<NodeId, BasicNode> =
            members.iter().map(|(id, addr)| (*id, BasicNode::new(addr))).collect();
        self.raft.initialize(nodes).await?;
        Ok(())
    }

    /// Stops Raft, then commits what the WAL has queued and stops its writer.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        self.monitor.abort();
        self.elections.abort();
        self.raft.shutdown().await.map_err(|e| anyhow::anyhow!("raft shutdown: {e}"))?;
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.close()).await??;
        Ok(())
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }
}

/// Asks openraft for a snapshot whenever the WAL has grown past `snapshot_segments` live
/// segments; openraft then checkpoints through the state machine and purges the log.
async fn snapshot_monitor(raft: Raft, engine: Arc<Engine>, tuning: RaftTuning) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_asked: Option<u64> = None;
    loop {
        tick.tick().await;
        let live = engine.wal().segments().len();
        let applied = engine.applied().log_id.map(|id| id.index);
        if live >= tuning.snapshot_segments && applied.is_some() && applied != last_asked {
            last_asked = applied;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}
