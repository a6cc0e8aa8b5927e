//! `xdevice node` (run one replica as a server) and `xdevice cluster` (manage a cluster through
//! any of its nodes).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::serve::{check_pipeline, check_queues};
use super::{size, StoreArgs};
use crate::daemon::node::{DeviceShape, NodeRequest};
use crate::device::CacheMode;
use crate::replication::node::RaftTuning;
use crate::replication::snapshot::ReceivePhase;
use crate::replication::tcp::{Admin, AdminReply, NodeClient, NodeStatus};
use crate::replication::types::NodeId;

/// Options of `xdevice node`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// This replica's node id (unique in the cluster, > 0).
    #[arg(long)]
    pub id: NodeId,
    /// Address to listen on for Raft and client traffic (also the source of outgoing
    /// connections).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where incoming snapshots are staged and `member.json` is kept (default: the data
    /// directory).
    #[arg(long)]
    pub snapshot_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (Raft, replication lag, WAL, fsync latency, and the device's
    /// figures while it is served here) at http://ADDR/metrics, e.g. 127.0.0.1:9478.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub tuning: TuningArgs,
    #[command(flatten)]
    pub serve: MemberServeArgs,
}

/// How a member serves the device when attached (`--attach`, or `xdevice cluster attach`).
#[derive(clap::Args, Debug, Clone)]
pub struct MemberServeArgs {
    /// Attach the device and serve it as /dev/ublkbN as soon as the node runs (needs root and
    /// ublk): win leadership, commit an attach entry that fences any earlier server, serve.
    /// The path is printed on stdout once live.
    #[arg(long)]
    pub attach: bool,
    /// writeback: volatile cache + FUA advertised; writethrough: neither. Either way a write
    /// completes once committed on a majority.
    #[arg(long, value_enum, default_value = "writeback")]
    pub mode: CacheMode,
    /// ublk hardware queues (one thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 64)]
    pub depth: u16,
    /// Largest READ/WRITE the kernel sends.
    #[arg(long, default_value = "1M", value_parser = size::parse)]
    pub max_io: u64,
    /// Device number N of /dev/ublkbN (default: the one this member served before, else the
    /// first free).
    #[arg(long)]
    pub ublk_id: Option<u32>,
    /// Hot cache size.
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    pub cache: u64,
    /// Largest read-ahead window; 0 turns read-ahead off.
    #[arg(long, default_value = "2M", value_parser = size::parse)]
    pub readahead: u64,
    /// Proposals in flight.
    #[arg(long, default_value_t = 2)]
    pub inflight_proposals: usize,
    /// How long attaching may take, winning leadership included.
    #[arg(long, default_value_t = 30)]
    pub attach_secs: u64,
    /// Directory for the status socket of the device while served here.
    #[arg(long, default_value = crate::daemon::DEFAULT_RUN_DIR, env = "XDEVICE_RUN_DIR")]
    pub run_dir: PathBuf,
}

/// Raft timing and log retention, shared by `node` and `serve`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TuningArgs {
    /// Leader heartbeat interval in milliseconds [default: 50].
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Election timeout range in milliseconds, MIN-MAX [default: 150-300]. A follower stands
    /// for election once MAX (openraft's leader lease) plus a random time in the range have
    /// passed without a heartbeat.
    #[arg(long, value_parser = parse_range)]
    pub election_ms: Option<(u64, u64)>,
    /// Snapshot (checkpoint the image, then purge the log) once the WAL holds this many live
    /// segments [default: the built-in tuning's].
    #[arg(long)]
    pub snapshot_segments: Option<usize>,
    /// Log entries kept below a snapshot, so a follower slightly behind catches up from the log
    /// rather than by snapshot [default: the built-in tuning's].
    #[arg(long)]
    pub keep_entries: Option<u64>,
}

impl TuningArgs {
    /// The built-in tuning with these overrides, checked.
    pub fn tuning(&self) -> Result<RaftTuning> {
        let mut tuning = RaftTuning::default();
        if let Some(ms) = self.heartbeat_ms {
            tuning.heartbeat = Duration::from_millis(ms);
        }
        if let Some((lo, hi)) = self.election_ms {
            tuning.election_min = Duration::from_millis(lo);
            tuning.election_max = Duration::from_millis(hi);
        }
        if let Some(n) = self.snapshot_segments {
            tuning.snapshot_segments = n.max(1);
        }
        if let Some(n) = self.keep_entries {
            tuning.keep_entries = n;
        }
        if tuning.heartbeat.is_zero() || tuning.heartbeat >= tuning.election_min {
            bail!(
                "--heartbeat-ms ({:?}) must be above 0 and below the election timeout's minimum \
                 ({:?})",
                tuning.heartbeat,
                tuning.election_min
            );
        }
        Ok(tuning)
    }
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("{s:?} is not MIN-MAX in milliseconds (e.g. 100-300)");
    let (lo, hi) = s.split_once('-').ok_or_else(bad)?;
    let lo: u64 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u64 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo >= hi {
        return Err(format!("election timeout {s:?}: MIN must be above 0 and below MAX"));
    }
    Ok((lo, hi))
}

/// `xdevice node`: the flags checked, then the member daemon (`crate::daemon::node`).
pub fn run_node(args: NodeArgs) -> Result<()> {
    if args.id == 0 {
        bail!("--id must be greater than 0");
    }
    let tuning = args.tuning.tuning()?;
    let s = &args.serve;
    let max_io = check_queues(s.queues, s.depth, s.max_io)?;
    check_pipeline(s.inflight_proposals, s.cache, s.readahead)?;
    if s.attach_secs == 0 {
        bail!("--attach-secs must be at least 1");
    }
    let state_dir = match (&args.snapshot_dir, &args.store.dir) {
        (Some(d), _) | (None, Some(d)) => d.clone(),
        (None, None) => bail!("--snapshot-dir is required with --device"),
    };
    let location = args.store.location(None)?;
    crate::daemon::node::run_node(NodeRequest {
        id: args.id,
        listen: args.listen,
        location,
        state_dir,
        tuning,
        attach: s.attach,
        metrics: args.metrics,
        shape: DeviceShape {
            mode: s.mode,
            queues: s.queues,
            depth: s.depth,
            max_io,
            ublk_id: s.ublk_id,
            cache: s.cache,
            readahead: s.readahead,
            inflight: s.inflight_proposals,
            attach_within: Duration::from_secs(s.attach_secs),
            run_dir: s.run_dir.clone(),
        },
    })
}

/// Options of `xdevice cluster`.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Any node of the cluster (`add` and `remove` find the leader through it).
    #[arg(long)]
    pub node: SocketAddr,
    /// The cluster id every node's store was formatted with.
    #[arg(long)]
    pub cluster_id: uuid::Uuid,
    /// Print JSON (before or after the subcommand).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub op: ClusterOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterOp {
    /// Make a new cluster from fresh nodes: --member ID=ADDR for each voter.
    Init {
        #[arg(long = "member", value_parser = parse_member, required = true)]
        members: Vec<(NodeId, String)>,
    },
    /// Add a node: as a learner, wait until it has caught up (by snapshot and log, progress on
    /// stderr), then make it a voter. With --json, one JSON object on stdout at the end instead.
    Add {
        #[arg(long)]
        id: NodeId,
        #[arg(long)]
        addr: SocketAddr,
        /// Leave it a learner (still waits until it has caught up).
        #[arg(long)]
        learner: bool,
        /// Give up, leaving it a learner, after this many seconds without progress (a snapshot
        /// being verified and installed on the node does not count as a stall).
        #[arg(long, default_value_t = 60)]
        stall_secs: u64,
    },
    /// Remove a node; the leader stops replicating to it.
    Remove {
        #[arg(long)]
        id: NodeId,
    },
    /// Move leadership to --node (it starts an election).
    Transfer,
    /// Serve the device from --node (a member started by root on a host with ublk): it wins
    /// leadership, commits an attach entry that fences whichever member served before, and
    /// serves /dev/ublkbN on its host. Prints the path, the attachment's epoch and the time it
    /// took. The failover command once the serving host is lost.
    Attach,
    /// Stop serving the device from --node: its device is stopped (in-flight I/O drained),
    /// everything completed committed, and a detach entry committed.
    Detach,
    /// Show the node's view: role, term, leader, log positions, membership, incoming snapshot.
    Status,
}

fn parse_member(s: &str) -> std::result::Result<(NodeId, String), String> {
    let (id, addr) = s.split_once('=').ok_or("expected ID=ADDR, like 1=127.0.0.1:7001")?;
    let id: NodeId = id.parse().map_err(|e| format!("node id {id:?}: {e}"))?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr:?}: {e}"))?;
    Ok((id, addr.to_string()))
}

/// Membership changes wait for a commit; a status answer is immediate.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// A node of the cluster, by address.
#[derive(Clone, Debug)]
struct Peer {
    addr: SocketAddr,
    client: NodeClient,
}

impl Peer {
    fn new(addr: SocketAddr, cluster_id: uuid::Uuid) -> Peer {
        Peer { addr, client: NodeClient::new(addr, None, cluster_id) }
    }

    async fn ask(&self, req: Admin, timeout: Duration) -> Result<AdminReply> {
        self.client.admin(req, timeout).await.map_err(|e| anyhow!("{}: {e}", self.addr))
    }

    async fn status(&self) -> Result<Box<NodeStatus>> {
        match self.ask(Admin::Status, STATUS_TIMEOUT).await? {
            AdminReply::Status(s) => Ok(s),
            other => bail!("{}: unexpected reply to status: {other:?}", self.addr),
        }
    }

    /// The leader as this node knows it, with its status.
    async fn leader(&self, cluster_id: uuid::Uuid) -> Result<(Peer, Box<NodeStatus>)> {
        let s = self.status().await?;
        if s.state == "Leader" {
            return Ok((self.clone(), s));
        }
        let Some(id) = s.leader else {
            bail!("{} ({}, term {}) knows no leader now; try again", self.addr, s.state, s.term)
        };
        let addr = s.nodes.get(&id).ok_or_else(|| anyhow!("leader {id} has no address"))?;
        let addr: SocketAddr =
            addr.parse().map_err(|e| anyhow!("leader {id}'s address {addr:?}: {e}"))?;
        let peer = Peer::new(addr, cluster_id);
        let s = peer.status().await?;
        if s.state != "Leader" {
            bail!("node {id} at {addr} is no longer the leader ({}); try again", s.state);
        }
        Ok((peer, s))
    }
}

pub fn run_cluster(args: ClusterArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let node = Peer::new(args.node, args.cluster_id);
        match args.op {
            ClusterOp::Init { members } => {
                node.ask(Admin::Init(members), CHANGE_TIMEOUT).await?;
            }
            ClusterOp::Add { id, addr, learner, stall_secs } => {
                let stall = Duration::from_secs(stall_secs);
                return add_node(&node, args.cluster_id, id, addr, learner, stall, args.json).await;
            }
            ClusterOp::Remove { id } => {
                let (leader, _) = node.leader(args.cluster_id).await?;
                leader.ask(Admin::Remove(id), CHANGE_TIMEOUT).await?;
            }
            ClusterOp::Transfer => {
                node.ask(Admin::Campaign, CHANGE_TIMEOUT).await?;
            }
            ClusterOp::Attach => {
                let a = match node.ask(Admin::Attach, CHANGE_TIMEOUT).await? {
                    AdminReply::Attached(a) => a,
                    other => bail!("{}: unexpected reply to attach: {other:?}", node.addr),
                };
                if args.json {
                    println!("{}", serde_json::to_string(&a)?);
                } else {
                    println!("{}", a.path);
                    eprintln!(
                        "attached to {} at epoch {} (term {}) in {:.3}s",
                        node.addr,
                        a.epoch,
                        a.term,
                        a.millis as f64 / 1000.0
                    );
                }
                return Ok(());
            }
            ClusterOp::Detach => {
                node.ask(Admin::Detach, CHANGE_TIMEOUT).await?;
            }
            ClusterOp::Status => {
                let s = node.status().await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    println!("node {} {} term {} leader {:?}", s.id, s.state, s.term, s.leader);
                    println!(
                        "log last {:?} applied {:?} snapshot {:?} purged {:?}",
                        s.last_log_index, s.last_applied, s.snapshot, s.purged
                    );
                    println!("voters {:?} learners {:?}", s.voters, s.learners);
                    match s.attachment {
                        Some((epoch, 0)) => println!("detached at epoch {epoch}"),
                        Some((epoch, id)) => println!("served by node {id} at epoch {epoch}"),
                        None => println!("never attached"),
                    }
                    if s.fenced_writes > 0 {
                        println!("writes of superseded servers skipped: {}", s.fenced_writes);
                    }
                    for (id, addr) in &s.nodes {
                        let matched = s.replication.get(id).copied().flatten();
                        println!("  node {id} {addr} matched {matched:?}");
                    }
                    if let Some(t) = s.snapshot_in {
                        println!(
                            "snapshot in: {:?} {} / {}",
                            t.phase,
                            mib(t.received),
                            mib(t.total)
                        );
                    }
                }
                return Ok(());
            }
        }
        println!("ok");
        Ok(())
    })
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// What `cluster add --json` prints.
#[derive(Debug, serde::Serialize)]
struct AddReport {
    node: NodeId,
    addr: String,
    /// Log index of the membership entry that added it as a learner.
    learner_index: u64,
    /// The leader's matched index for it when it was found caught up (≥ `learner_index`).
    caught_up_index: u64,
    voter: bool,
    voters: Vec<NodeId>,
    /// From the learner being added to it being caught up.
    catch_up_seconds: f64,
    /// Snapshot stream bytes seen received (0 when it caught up from the log alone).
    snapshot_bytes: u64,
    /// From the first sight of the snapshot arriving to the first sight of it complete.
    snapshot_seconds: f64,
    snapshots_installed: u64,
}

/// Progress lines on stderr (none with --json).
struct Progress {
    id: NodeId,
    quiet: bool,
}

impl Progress {
    fn say(&self, line: impl std::fmt::Display) {
        if !self.quiet {
            eprintln!("node {}: {line}", self.id);
        }
    }
}

/// `cluster add`: adds `id` as a learner through the leader, follows its catch-up (the leader's
/// matched index for it; the learner's own incoming snapshot) until the leader has replicated
/// the membership entry to it, then makes it a voter unless `learner`.
async fn add_node(
    node: &Peer,
    cluster_id: uuid::Uuid,
    id: NodeId,
    addr: SocketAddr,
    learner: bool,
    stall: Duration,
    json: bool,
) -> Result<()> {
    let out = Progress { id, quiet: json };
    let (mut leader, _) = node.leader(cluster_id).await?;
    let learner_peer = Peer::new(addr, cluster_id);
    // Snapshots it installed before this add do not count.
    let installed_before = learner_peer.status().await.map_or(0, |s| s.snapshots_installed);
    out.say(format_args!("adding at {addr} as a learner (through leader {})", leader.addr));
    let target = match leader.ask(Admin::AddLearner(id, addr.to_string()), CHANGE_TIMEOUT).await? {
        AdminReply::Index(i) => i,
        other => bail!("unexpected reply to add-learner: {other:?}"),
    };
    let started = Instant::now();
    out.say(format_args!("learner from log index {target}; waiting for it to catch up"));

    let mut last_change = Instant::now();
    let mut last_seen = None;
    // (when, bytes) of the last snapshot progress line, and when the stream was first seen.
    let mut last_line: Option<(Instant, u64)> = None;
    let mut snap_first: Option<Instant> = None;
    let mut snap_bytes = 0u64;
    let mut snap_seconds = 0f64;
    let mut installing_said = false;
    let mut installs_said = installed_before;
    let mut log_said = Instant::now();
    let caught_up = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let leader_status = match leader.status().await {
            Ok(s) if s.state == "Leader" => s,
            _ => match node.leader(cluster_id).await {
                Ok((l, s)) => {
                    leader = l;
                    s
                }
                Err(e) => {
                    if last_change.elapsed() > stall {
                        return Err(e.context(format!("node {id} was added as a learner")));
                    }
                    continue;
                }
            },
        };
        let matched = leader_status.replication.get(&id).copied().flatten();
        let theirs = learner_peer.status().await.ok();
        let incoming = theirs.as_ref().and_then(|s| s.snapshot_in);
        let installed = theirs.as_ref().map_or(0, |s| s.snapshots_installed);
        let now = Instant::now();
        if installed > installs_said {
            installs_said = installed;
            let at = theirs.as_ref().and_then(|s| s.snapshot);
            let at = at.map_or("?".to_string(), |i| i.to_string());
            out.say(format_args!("snapshot installed at log index {at}"));
            if snap_seconds == 0.0 {
                snap_seconds = snap_first.map_or(0.0, |f| (now - f).as_secs_f64());
            }
        }
        if matched >= Some(target) {
            break matched.unwrap_or(target);
        }
        let seen = (matched, incoming.map(|t| (t.phase, t.received)), installed);
        if last_seen.as_ref() != Some(&seen) {
            last_seen = Some(seen);
            last_change = now;
        }
        match incoming {
            Some(t) if t.phase == ReceivePhase::Receiving => {
                installing_said = false;
                snap_bytes = t.received;
                let of = format!("{} / {}", mib(t.received), mib(t.total));
                let pct = t.received * 100 / t.total.max(1);
                if last_line.is_some_and(|(_, b)| t.received < b) {
                    out.say("snapshot restarted");
                    last_line = None;
                }
                match last_line {
                    None => {
                        snap_first.get_or_insert(now);
                        out.say(format_args!("receiving snapshot {of} ({pct}%)"));
                        last_line = Some((now, t.received));
                    }
                    Some((at, from)) if now - at >= Duration::from_secs(1) => {
                        let rate = (t.received - from) as f64
                            / (now - at).as_secs_f64()
                            / f64::from(1 << 20);
                        out.say(format_args!("receiving snapshot {of} ({pct}%), {rate:.0} MiB/s"));
                        last_line = Some((now, t.received));
                    }
                    Some(_) => {}
                }
            }
            Some(t) => {
                if !installing_said {
                    installing_said = true;
                    snap_bytes = t.received;
                    snap_seconds = snap_first.map_or(0.0, |f| (now - f).as_secs_f64());
                    out.say(format_args!(
                        "snapshot received ({}); verifying and installing",
                        mib(t.received)
                    ));
                }
                // Local work on the node: not a stall.
                last_change = now;
            }
            None => {
                installing_said = false;
                if now - log_said >= Duration::from_secs(2) {
                    log_said = now;
                    out.say(format_args!("replicating the log: matched {matched:?} of {target}"));
                }
            }
        }
        if last_change.elapsed() > stall {
            bail!(
                "node {id} made no progress for {}s (matched {matched:?} of {target}); it stays \
                 a learner: check that it runs at {addr}, then add it again or remove it",
                stall.as_secs()
            );
        }
    };
    let catch_up = started.elapsed();
    out.say(format_args!(
        "log caught up to index {caught_up} in {:.1}s{}",
        catch_up.as_secs_f64(),
        if snap_bytes > 0 {
            format!(
                " (snapshot of {} in {snap_seconds:.1}s, {:.0} MiB/s)",
                mib(snap_bytes),
                snap_bytes as f64 / snap_seconds.max(1e-3) / f64::from(1 << 20)
            )
        } else {
            String::new()
        }
    ));
    let mut voters = leader.status().await?.voters;
    if !learner && !voters.contains(&id) {
        voters.push(id);
        out.say("promoting to voter");
        leader.ask(Admin::SetVoters(voters.clone()), CHANGE_TIMEOUT).await?;
        voters = leader.status().await?.voters;
        if !voters.contains(&id) {
            bail!("node {id} is not a voter after promotion (voters {voters:?})");
        }
        out.say(format_args!("now a voter (voters {voters:?})"));
    }
    let installed = learner_peer.status().await.map_or(0, |s| s.snapshots_installed);
    if json {
        let report = AddReport {
            node: id,
            addr: addr.to_string(),
            learner_index: target,
            caught_up_index: caught_up,
            voter: voters.contains(&id),
            voters,
            catch_up_seconds: catch_up.as_secs_f64(),
            snapshot_bytes: snap_bytes,
            snapshot_seconds: snap_seconds,
            snapshots_installed: installed.saturating_sub(installed_before),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("ok");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn election_range_parses_and_rejects_nonsense() {
        assert_eq!(parse_range("100-300"), Ok((100, 300)));
        assert_eq!(parse_range(" 150 - 600 "), Ok((150, 600)));
        for bad in ["300", "300-100", "0-100", "100-100", "a-b", "-5-10", ""] {
            let e = parse_range(bad).expect_err(bad);
            assert!(e.contains(bad.trim()) || e.contains("MIN"), "{bad:?}: {e}");
        }
    }
}
