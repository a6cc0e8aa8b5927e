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
    /// Heartbeat interval in milliseconds; the election timeout is 3-6 heartbeats.
    #[arg(long, default_value_t = 50)]
    pub heartbeat_ms: u64,
}

/// Runs a replica until SIGTERM or SIGINT, then stops cleanly (everything queued committed).
pub fn run_node(args: NodeArgs) -> Result<()> {
    if args.id == 0 {
        bail!("--id must be greater than 0");
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
        let hb = Duration::from_millis(args.heartbeat_ms.max(10));
        let tuning = RaftTuning {
            heartbeat: hb,
            election_min: hb * 3,
            election_max: hb * 6,
            ..RaftTuning::default()
        };
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
