//! `xdevice node` (run one replica as a server) and `xdevice cluster` (manage a cluster through
//! any of its nodes).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::StoreArgs;
use crate::net::RpcServer;
use crate::replication::log_store::DEFAULT_CACHE_BYTES;
use crate::replication::node::{Node, RaftTuning};
use crate::replication::tcp::{
    Admin, AdminReply, NodeClient, NodeService, TcpTransport, MAX_PAYLOAD,
};
use crate::replication::types::NodeId;
use crate::replication::{network::Transport, open_replica};
use crate::storage::engine::EngineConfig;

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
    /// Where incoming snapshots are staged (default: the data directory).
    #[arg(long)]
    pub snapshot_dir: Option<PathBuf>,
    /// Leader heartbeat interval in milliseconds [default: 30].
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Election timeout range in milliseconds, MIN-MAX [default: 100-300]. A follower stands
    /// for election once MAX (openraft's leader lease) plus a random time in the range have
    /// passed without a heartbeat.
    #[arg(long, value_parser = parse_range)]
    pub election_ms: Option<(u64, u64)>,
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

/// Runs a replica until SIGTERM or SIGINT, then stops cleanly (everything queued committed).
pub fn run_node(args: NodeArgs) -> Result<()> {
    if args.id == 0 {
        bail!("--id must be greater than 0");
    }
    let mut tuning = RaftTuning::default();
    if let Some(ms) = args.heartbeat_ms {
        tuning.heartbeat = Duration::from_millis(ms);
    }
    if let Some((lo, hi)) = args.election_ms {
        tuning.election_min = Duration::from_millis(lo);
        tuning.election_max = Duration::from_millis(hi);
    }
    if tuning.heartbeat.is_zero() || tuning.heartbeat >= tuning.election_min {
        bail!(
            "--heartbeat-ms ({:?}) must be above 0 and below the election timeout's minimum \
             ({:?})",
            tuning.heartbeat,
            tuning.election_min
        );
    }
    let location = args.store.location(None)?;
    let snapshot_dir = match (&args.snapshot_dir, &args.store.dir) {
        (Some(d), _) | (None, Some(d)) => d.clone(),
        (None, None) => bail!("--snapshot-dir is required with --device"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let replica =
            open_replica(&location, EngineConfig::default(), &snapshot_dir, DEFAULT_CACHE_BYTES)
                .with_context(|| format!("opening {}", location.describe()))?;
        let cluster_id = replica.engine.superblock().cluster_id;
        let transport: Arc<dyn Transport> =
            Arc::new(TcpTransport::new(cluster_id, args.id, Some(args.listen.ip())));
        let node = Node::start(args.id, replica, transport, &tuning).await?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let service = NodeService::new(args.id, node.raft.clone(), node.engine.clone());
        let server = RpcServer::start(listener, cluster_id, MAX_PAYLOAD, service)?;
        println!("node {} of cluster {cluster_id} listening on {}", args.id, server.local_addr());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping");
        server.shutdown().await;
        node.shutdown().await?;
        println!("node {} stopped", args.id);
        Ok(())
    })
}

/// Options of `xdevice cluster`.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Any node of the cluster (membership changes go to the leader: name it, or see `status`).
    #[arg(long)]
    pub node: SocketAddr,
    /// The cluster id every node's store was formatted with.
    #[arg(long)]
    pub cluster_id: uuid::Uuid,
    /// Print JSON.
    #[arg(long)]
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
    /// Add a node: as a learner, wait until it has caught up, then make it a voter.
    Add {
        #[arg(long)]
        id: NodeId,
        #[arg(long)]
        addr: SocketAddr,
        /// Leave it a learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node; it stops receiving entries.
    Remove {
        #[arg(long)]
        id: NodeId,
    },
    /// Move leadership to --node (it starts an election).
    Transfer,
    /// Show the node's view: role, term, leader, log positions, membership.
    Status,
}

fn parse_member(s: &str) -> std::result::Result<(NodeId, String), String> {
    let (id, addr) = s.split_once('=').ok_or("expected ID=ADDR, like 1=127.0.0.1:7001")?;
    let id: NodeId = id.parse().map_err(|e| format!("node id {id:?}: {e}"))?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr:?}: {e}"))?;
    Ok((id, addr.to_string()))
}

pub fn run_cluster(args: ClusterArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let client = NodeClient::new(args.node, None, args.cluster_id);
        let t = Duration::from_secs(600);
        let ask = |req| {
            let client = client.clone();
            async move { client.admin(req, t).await.map_err(|e| anyhow::anyhow!("{}: {e}", args.node)) }
        };
        match args.op {
            ClusterOp::Init { members } => {
                ask(Admin::Init(members)).await?;
            }
            ClusterOp::Add { id, addr, learner } => {
                eprintln!("adding node {id} at {addr} as a learner; waiting for it to catch up");
                ask(Admin::AddLearner(id, addr.to_string())).await?;
                if !learner {
                    let status = match ask(Admin::Status).await? {
                        AdminReply::Status(s) => s,
                        AdminReply::Done => bail!("unexpected reply to status"),
                    };
                    let mut voters = status.voters.clone();
                    voters.push(id);
                    ask(Admin::SetVoters(voters)).await?;
                }
            }
            ClusterOp::Remove { id } => {
                ask(Admin::Remove(id)).await?;
            }
            ClusterOp::Transfer => {
                ask(Admin::Campaign).await?;
            }
            ClusterOp::Status => {
                if let AdminReply::Status(s) = ask(Admin::Status).await? {
                    if args.json {
                        println!("{}", serde_json::to_string_pretty(&s)?);
                    } else {
                        println!("node {} {} term {} leader {:?}", s.id, s.state, s.term, s.leader);
                        println!("log last {:?} applied {:?} snapshot {:?} purged {:?}", s.last_log_index, s.last_applied, s.snapshot, s.purged);
                        println!("voters {:?} learners {:?}", s.voters, s.learners);
                        for (id, addr) in &s.nodes {
                            let matched = s.replication.get(id).copied().flatten();
                            println!("  node {id} {addr} matched {matched:?}");
                        }
                    }
                }
                return Ok(());
            }
        }
        println!("ok");
        Ok(())
    })
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
