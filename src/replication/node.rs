//! One running replica: its engine, its openraft instance, and the task that turns WAL growth
//! into snapshots (checkpoints) so the log prefix can be purged.

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Config, SnapshotPolicy};

use super::commits::Proposer;
use super::network::{NetworkFactory, SnapshotInbox, Transport};
use super::types::{NodeId, Raft};
use super::Replica;
use crate::storage::engine::Engine;

/// Raft timing and log retention.
///
/// openraft (0.9 and 0.10 alike) reads the election timeout through a leader lease: a follower
/// that has heard from a leader stands for election only once `election_max` (the lease) plus
/// its own random timeout in `[election_min, election_max)` have passed since; it also refuses
/// votes and pre-votes while that lease holds. With the defaults (heartbeat 50 ms, election
/// timeout 150-300 ms) a failed leader is replaced 450-675 ms after its last heartbeat, plus
/// the pre-vote round trip. openraft also gives every AppendEntries the heartbeat interval as
/// its TTL (a follower answers once the entries are durable): at 30 ms a 4 MiB entry to a
/// loaded follower timed out and was retried often enough that the follower, hearing nothing
/// between backoffs, campaigned and made the leader step down (`cluster_membership`, about one
/// run in four, under 0.9).
#[derive(Clone, Debug)]
pub struct RaftTuning {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    /// Checkpoint (openraft snapshot) once the WAL holds this many live segments.
    pub snapshot_segments: usize,
    /// Entries kept below a snapshot, so a follower slightly behind catches up from the log
    /// (and never more than `retained_segments()` segments of them).
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
    /// Segments of log kept below a snapshot, counting the one holding it: half the snapshot
    /// threshold, so after a snapshot the WAL holds about half of `snapshot_segments`.
    pub fn retained_segments(&self) -> usize {
        (self.snapshot_segments / 2).max(1)
    }

    fn config(&self, cluster: &str) -> anyhow::Result<Config> {
        let cfg = Config {
            cluster_name: cluster.to_string(),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            // Snapshots are triggered by WAL size (`snapshot_segments`), not entry counts.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.keep_entries,
            // Each snapshot record sent (`network::PeerNetwork::full_snapshot`) gets this long,
            // the last one (verified whole and installed on the receiver) included.
            install_snapshot_timeout: 10_000,
            // Entries per AppendEntries: up to 4 MiB each, so 8 bound a request to 32 MiB of
            // memory on both sides. 256 let a follower far behind be sent 1 GiB at once (read
            // back from the WAL and decoded), which the embedded mode held twice over.
            max_payload_entries: 8,
            // openraft 0.10's pre-vote: a follower whose election timer fires first asks the
            // voters whether they would vote for it, without raising its term; a voter grants
            // only if its own leader lease has expired and the candidate's log is not behind its
            // own. A voter that cannot win (restarted behind the purge point, back from a
            // partition) never raises the term and never deposes a working leader. It replaces
            // the pre-vote gate written around 0.9 (`election.rs`, removed).
            enable_pre_vote: Some(true),
            // The committed index is persisted only by checkpoints and apply does not sync, so a
            // restarted leader must not resume leadership without an election (0.10 allows it
            // by default): its image may lack entries it had applied (openraft's docs on
            // `enable_leader_restore`). As under 0.9, it is re-elected and re-learns the commit.
            enable_leader_restore: Some(false),
            // Replication reads the entries `append` has queued as soon as it returns, instead
            // of after the core's next round: the follower's write starts while the leader's
            // own is in flight.
            broadcast_submitted_on_append: Some(true),
            ..Default::default()
        };
        Ok(cfg.validate()?)
    }
}

/// A replica's applied log index (0 before anything was applied).
pub fn applied_index(raft: &Raft) -> u64 {
    raft.metrics().borrow_watched().last_applied.as_ref().map_or(0, |l| l.index)
}

/// Entries a leader may hold committed (or proposed) but not yet applied before it takes a new
/// proposal. Proposals are answered at commit, before apply; without a bound a sustained writer
/// outruns apply, and openraft 0.9 then read every committed entry not yet applied into memory
/// at once to apply them (a 10 GiB stream through the embedded default peaked at 1.9 GiB
/// resident). openraft 0.10 hands `apply` a stream, but its default log reader builds that
/// stream from one read of the whole range, so the bound is still what limits the memory; it
/// also keeps the image, and so reads that wait for apply, close behind what the device
/// confirmed. Eight entries of at most 4 MiB each keep that under 32 MiB, above the device's
/// few proposals in flight.
pub const MAX_APPLY_LAG_ENTRIES: u64 = 8;

/// Waits, up to `within`, until this replica's log holds at most `MAX_APPLY_LAG_ENTRIES`
/// entries it has not applied: the back-pressure a proposer applies before proposing. An error
/// names the lag when it does not shrink in time (apply stuck, or no majority to commit).
pub async fn wait_apply_lag(raft: &Raft, within: Duration) -> Result<(), String> {
    let mut rx = raft.metrics();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let lag = {
            let m = rx.borrow_and_update();
            let last = m.last_log_index.unwrap_or(0);
            last.saturating_sub(m.last_applied.as_ref().map_or(0, |l| l.index))
        };
        if lag <= MAX_APPLY_LAG_ENTRIES {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err("the replica stopped".to_string()),
            Err(_) => {
                return Err(format!("{lag} log entries not applied after {within:?}"));
            }
        }
    }
}

/// A running replica.
pub struct Node {
    pub id: NodeId,
    pub raft: Raft,
    pub engine: Arc<Engine>,
    /// Where snapshot chunks sent to this replica are staged and installed.
    pub inbox: Arc<SnapshotInbox>,
    /// Proposes to this replica (as leader) and resolves proposals at commit.
    pub proposer: Proposer,
    /// When its recent entries were appended: replication lag in bytes and seconds.
    pub trail: Arc<super::trail::AppendTrail>,
    /// The snapshot it is receiving, if any, and how many it installed.
    pub receiving: Arc<super::snapshot::ReceiveProgress>,
    monitor: tokio::task::JoinHandle<()>,
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
        let config = Arc::new(tuning.config(&sb.cluster_id.to_string())?);
        let engine = replica.engine.clone();
        let commits = replica.log.commits();
        let trail = replica.log.trail();
        let receiving = replica.sm.receive_progress();
        let inbox = SnapshotInbox::new(replica.sm.clone());
        let network = NetworkFactory::new(transport, tuning.election_max);
        let raft = Raft::new(id, config, network, replica.log, replica.sm).await?;
        let monitor = tokio::spawn(snapshot_monitor(raft.clone(), engine.clone(), tuning.clone()));
        let proposer = Proposer::new(raft.clone(), commits);
        Ok(Node { id, raft, engine, inbox, proposer, trail, receiving, monitor })
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
        self.raft.shutdown().await.map_err(|e| anyhow::anyhow!("raft shutdown: {e}"))?;
        self.proposer.close();
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.close()).await??;
        Ok(())
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }
}

/// Asks openraft for a snapshot whenever the WAL has grown past `snapshot_segments` live
/// segments; openraft then checkpoints through the state machine and purges the log, keeping
/// `keep_entries` entries below the snapshot. Entries vary from a few KiB to 4 MiB, so a count
/// alone can keep gigabytes (1000 entries of 4 MiB): the log below the snapshot is also bounded
/// to the newest `retained_segments` segments up to the snapshot's own, purged here. Without
/// that bound the WAL stayed past `snapshot_segments` after every snapshot, and one was asked
/// for every 200 ms (650 checkpoints in one 48 s `cache-memory` run, two syncs each).
async fn snapshot_monitor(raft: Raft, engine: Arc<Engine>, tuning: RaftTuning) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_asked: Option<u64> = None;
    let retain = tuning.retained_segments();
    loop {
        tick.tick().await;
        let segments: Vec<Option<u64>> =
            engine.wal().segments().iter().map(|s| s.max_index).collect();
        let (snapshot, purged) = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            (m.snapshot.as_ref().map(|l| l.index), m.purged.as_ref().map(|l| l.index))
        };
        if let Some(upto) = snapshot.and_then(|s| purge_target(&segments, s, purged, retain)) {
            if raft.trigger().purge_log(upto).await.is_err() {
                return;
            }
        }
        let applied = engine.applied().log_id.map(|id| id.index);
        if segments.len() >= tuning.snapshot_segments && applied.is_some() && applied != last_asked
        {
            last_asked = applied;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    }
}

/// Where to purge the log through so that, below a snapshot at `snapshot`, only the segment
/// holding it and the `retain - 1` before it keep entries: the last entry of the segment before
/// those, if that is past `purged`. `segments` are the live segments' last entry indexes,
/// oldest first (None: no entry). Purging frees whole segments only, so a target inside the
/// snapshot's own segment would free nothing more.
fn purge_target(
    segments: &[Option<u64>],
    snapshot: u64,
    purged: Option<u64>,
    retain: usize,
) -> Option<u64> {
    let holding = segments.iter().position(|m| m.is_some_and(|m| m >= snapshot))?;
    let last_dropped = holding.checked_sub(retain.max(1))?;
    let target = segments[..=last_dropped].iter().rev().find_map(|m| *m)?;
    (purged.is_none_or(|p| target > p)).then_some(target)
}

#[cfg(test)]
mod tests {
    use super::purge_target;

    #[test]
    fn purge_keeps_the_segments_up_to_the_snapshot_and_frees_the_rest() {
        // Ten segments of ten entries: 0-9, 10-19, ... 90-99.
        let segs: Vec<Option<u64>> = (0..10).map(|i| Some(i * 10 + 9)).collect();
        // Snapshot at 55 (segment 5), keep 2 segments (4 and 5): purge through 39.
        assert_eq!(purge_target(&segs, 55, None, 2), Some(39));
        assert_eq!(purge_target(&segs, 55, Some(20), 2), Some(39));
        assert_eq!(purge_target(&segs, 55, Some(39), 2), None, "already purged");
        assert_eq!(purge_target(&segs, 55, Some(45), 2), None, "openraft purged further");
        // Keep 1: only the snapshot's own segment stays.
        assert_eq!(purge_target(&segs, 59, None, 1), Some(49));
        assert_eq!(purge_target(&segs, 59, None, 0), Some(49), "at least one is kept");
        // Nothing older than the kept segments: nothing to purge.
        assert_eq!(purge_target(&segs, 15, None, 2), None);
        // A snapshot beyond every entry (log emptied) and segments without entries.
        assert_eq!(purge_target(&segs, 150, None, 2), None);
        let sparse = [Some(9), None, Some(29), Some(39)];
        assert_eq!(purge_target(&sparse, 35, None, 1), Some(29));
        assert_eq!(purge_target(&sparse, 35, None, 2), Some(9), "the empty segment is skipped");
    }
}
