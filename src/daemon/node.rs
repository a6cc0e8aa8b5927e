//! The member daemon behind `xdevice node`: one replica of a node cluster (Raft and client
//! traffic on its address) that can also serve the device on its own host once attached
//! (`--attach` at start, or `xdevice attach` to a running node): the device across hosts.
//!
//! Attaching (`MemberHost::attach`) wins leadership and commits the attachment
//! (`device::member`), then serves `/dev/ublkbN` from this replica. A watchdog checks the
//! attachment every heartbeat and fences the device the moment it is lost, so I/O waiting
//! inside it fails too, not only later requests. Detaching (`xdevice detach`, or SIGTERM)
//! stops the device (the kernel drains in-flight I/O), commits everything completed, and
//! commits a detach entry.
//!
//! `STATE/member.json` (the state directory: `--snapshot-dir`, else the data directory)
//! records the ublk device this member served and its epoch. A member daemon that crashed
//! leaves that device quiesced in the kernel, holding its I/O. Attaching again re-attaches to it
//! (the kernel reissues what it held) only if no other member attached meanwhile; otherwise the
//! file system above it was changed elsewhere and its held writes are stale, so the device is
//! removed (its I/O fails with EIO) and a fresh one made.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::record::{load_json, store_json};
use super::{require_ublk, Frontend};
use crate::device::member::{Member, MemberOptions};
use crate::device::{CacheMode, Device, DeviceConfig};
use crate::net::RpcServer;
use crate::replication::log_store::DEFAULT_CACHE_BYTES;
use crate::replication::network::{BoxFuture, Transport};
use crate::replication::node::{Node, RaftTuning};
use crate::replication::open_replica;
use crate::replication::tcp::{Attached, DeviceHost, NodeService, TcpTransport, MAX_PAYLOAD};
use crate::replication::types::NodeId;
use crate::storage::engine::EngineConfig;
use crate::storage::image::Attachment;
use crate::storage::layout::Location;

/// The record's file name in the state directory.
pub const MEMBER_RECORD: &str = "member.json";

/// What `xdevice node` asks for.
#[derive(Debug)]
pub struct NodeRequest {
    pub id: NodeId,
    pub listen: SocketAddr,
    pub location: Location,
    /// Incoming snapshots and `member.json`.
    pub state_dir: PathBuf,
    pub tuning: RaftTuning,
    /// Attach and serve the device as soon as the node runs.
    pub attach: bool,
    pub shape: DeviceShape,
}

/// How this member serves the device once attached.
#[derive(Clone, Debug)]
pub struct DeviceShape {
    pub mode: CacheMode,
    pub queues: u16,
    pub depth: u16,
    pub max_io: u32,
    /// The device number N of /dev/ublkbN (default: the one recorded, else the first free).
    pub ublk_id: Option<u32>,
    pub cache: u64,
    pub readahead: u64,
    pub inflight: usize,
    /// How long attaching may take (winning leadership included).
    pub attach_within: Duration,
}

/// `STATE/member.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct MemberRecord {
    /// Identifies this member's state directory to the ublk device it serves.
    serve_uuid: uuid::Uuid,
    ublk_id: Option<u32>,
    /// The epoch this member served that device under.
    epoch: u64,
}

/// Runs a replica until SIGTERM or SIGINT, serving the device while attached; then detaches
/// (if attached) and stops cleanly (everything queued committed).
pub fn run_node(req: NodeRequest) -> Result<()> {
    if req.attach {
        require_ublk()?;
    }
    // A file system mounted later on this member's device must never appear in the daemon's
    // own namespace (see `mount`). Only root can make one; a node that is not root cannot
    // serve a device either.
    if nix::unistd::geteuid().is_root() {
        super::mount::private_mount_namespace()?;
    }
    let rt = super::runtime()?;
    rt.block_on(async move {
        let engine = EngineConfig { node_id: Some(req.id), ..EngineConfig::default() };
        let replica = open_replica(&req.location, engine, &req.state_dir, DEFAULT_CACHE_BYTES)
            .with_context(|| format!("opening {}", req.location.describe()))?;
        let cluster_id = replica.engine.superblock().cluster_id;
        let transport: Arc<dyn Transport> =
            Arc::new(TcpTransport::new(cluster_id, req.id, Some(req.listen.ip())));
        let receiving = replica.sm.receive_progress();
        let node = Arc::new(Node::start(req.id, replica, transport, &req.tuning).await?);
        let listener = tokio::net::TcpListener::bind(req.listen)
            .await
            .with_context(|| format!("listening on {}", req.listen))?;
        let service = NodeService::new(
            req.id,
            node.raft.clone(),
            node.engine.clone(),
            receiving,
            node.inbox.clone(),
            node.proposer.clone(),
        );
        let host = Arc::new(MemberHost {
            node: node.clone(),
            opts: MemberOptions {
                cluster_id,
                bind: Some(req.listen.ip()),
                lease: req.tuning.election_min,
                election_max: req.tuning.election_max,
                attach_within: req.shape.attach_within,
                timeout: Duration::from_secs(5),
            },
            shape: req.shape.clone(),
            state_dir: req.state_dir.clone(),
            heartbeat: req.tuning.heartbeat,
            serving: tokio::sync::Mutex::new(None),
        });
        service.set_host(host.clone());
        let server = RpcServer::start(listener, cluster_id, MAX_PAYLOAD, service)?;
        println!("node {} of cluster {cluster_id} listening on {}", req.id, server.local_addr());
        if req.attach {
            let attached = host.attach_now().await.context("attaching the device")?;
            println!("{}", attached.path);
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping");
        if let Err(e) = host.detach_now().await {
            tracing::warn!(error = %e, "detaching on the way out");
        }
        server.shutdown().await;
        node.shutdown().await?;
        println!("node {} stopped", req.id);
        Ok(())
    })
}

/// The device served from this member while attached.
struct Serving {
    member: Arc<Member>,
    device: Arc<Device>,
    frontend: Frontend,
    watchdog: tokio::task::JoinHandle<()>,
    attached: Attached,
}

/// Attaches and detaches this member (`DeviceHost`, reached through `ADMIN`).
struct MemberHost {
    node: Arc<Node>,
    opts: MemberOptions,
    shape: DeviceShape,
    state_dir: PathBuf,
    heartbeat: Duration,
    /// One attach or detach at a time.
    serving: tokio::sync::Mutex<Option<Serving>>,
}

impl MemberHost {
    async fn attach_now(&self) -> Result<Attached> {
        let started = Instant::now();
        let mut slot = self.serving.lock().await;
        if let Some(s) = slot.as_ref() {
            if s.member.fenced().is_none() && crate::device::Cluster::serving(&*s.member).is_ok() {
                return Ok(s.attached.clone());
            }
        }
        if let Some(old) = slot.take() {
            tracing::warn!(
                epoch = old.member.epoch(),
                reason = old.member.fenced().unwrap_or("unknown"),
                "the previous attachment was lost; stopping its device before attaching again"
            );
            old.device.fence("attaching again");
            old.watchdog.abort();
            old.frontend.stop().await?;
            old.device.close();
        }
        require_ublk()?;
        let mut record: MemberRecord =
            load_json(&self.state_dir, MEMBER_RECORD, "member record")?.unwrap_or_default();
        if record.serve_uuid.is_nil() {
            record.serve_uuid = uuid::Uuid::new_v4();
        }
        let owner = serde_json::json!({
            "xdevice": record.serve_uuid.to_string(),
            "dir": self.state_dir.display().to_string(),
            "member": self.node.id,
        });
        // What the log said before this attach: whether the device this member left (if any)
        // may be re-attached.
        let before = self.node.engine.attachment();
        let member = Member::attach(self.node.clone(), self.opts.clone()).await?;
        let mut id = self.shape.ublk_id.or(record.ublk_id);
        let mut recover = false;
        if let Some(old) = record.ublk_id {
            if let Some(info) = xdevice_ublk::device_info(old)? {
                let ours = info.owner.as_ref() == Some(&owner);
                let unchanged =
                    before == Some(Attachment { epoch: record.epoch, node: self.node.id });
                match (ours, info.state) {
                    (true, "quiesced") if unchanged => {
                        recover = true;
                        id = Some(old);
                    }
                    (true, "quiesced") => {
                        tracing::warn!(
                            device = old,
                            epoch = record.epoch,
                            now = ?before,
                            "another member served the device since this member's daemon \
                             stopped: its quiesced device holds stale I/O; removing it (the \
                             I/O fails with EIO)"
                        );
                        tokio::task::spawn_blocking(move || xdevice_ublk::remove(old)).await??;
                        if id == Some(old) && self.shape.ublk_id.is_none() {
                            id = None;
                        }
                    }
                    (true, state) => bail!(
                        "/dev/ublkb{old} of this member is already {state}, served by pid {}",
                        info.daemon_pid
                    ),
                    (false, _) if self.shape.ublk_id == Some(old) => {
                        bail!("/dev/ublkb{old} exists and belongs to another daemon")
                    }
                    (false, _) => id = self.shape.ublk_id,
                }
            }
        }
        let sb = self.node.engine.superblock().clone();
        let cfg = DeviceConfig::new(
            sb.block_bytes,
            sb.device_bytes / u64::from(sb.block_bytes),
            self.shape.mode,
        );
        let cfg = DeviceConfig {
            max_inflight_proposals: self.shape.inflight,
            cache_bytes: self.shape.cache,
            readahead_bytes: self.shape.readahead,
            ..cfg
        };
        let device = Device::start(cfg, member.clone());
        let ublk_cfg = xdevice_ublk::Config {
            id,
            queues: self.shape.queues,
            depth: self.shape.depth,
            geometry: xdevice_ublk::Geometry {
                block_bytes: sb.block_bytes,
                size_bytes: sb.device_bytes,
                max_io_bytes: self.shape.max_io,
                max_discard_bytes: super::record::discard_limit(sb.block_bytes),
                volatile_cache: self.shape.mode == CacheMode::Writeback,
            },
            owner,
        };
        let frontend = match Frontend::start(ublk_cfg, recover, device.clone()).await {
            Ok(f) => f,
            Err(e) => {
                device.close();
                return Err(e);
            }
        };
        record.ublk_id = Some(frontend.live.id);
        record.epoch = member.epoch();
        store_json(&self.state_dir, MEMBER_RECORD, &record)?;
        let watchdog =
            tokio::spawn(watch_attachment(member.clone(), device.clone(), self.heartbeat));
        let attached = Attached {
            path: frontend.live.path.clone(),
            epoch: member.epoch(),
            term: member.term(),
            millis: started.elapsed().as_millis() as u64,
        };
        tracing::info!(
            path = %attached.path,
            epoch = attached.epoch,
            term = attached.term,
            recovered = frontend.live.recovered,
            millis = attached.millis,
            "serving the device from this member"
        );
        *slot = Some(Serving { member, device, frontend, watchdog, attached: attached.clone() });
        Ok(attached)
    }

    async fn detach_now(&self) -> Result<()> {
        let mut slot = self.serving.lock().await;
        let Some(s) = slot.take() else { bail!("node {} is not serving the device", self.node.id) };
        s.frontend.stop().await?;
        // Everything completed must be committed before the attachment ends.
        let flushed = s.device.flush().await;
        s.device.close();
        s.watchdog.abort();
        flushed.context("committing the writes accepted before the detach")?;
        let index = s.member.detach().await?;
        tracing::info!(index, "detached: the device is served by no member");
        Ok(())
    }
}

impl DeviceHost for MemberHost {
    fn attach(self: Arc<Self>) -> BoxFuture<Result<Attached, String>> {
        Box::pin(async move { self.attach_now().await.map_err(|e| format!("{e:#}")) })
    }
    fn detach(self: Arc<Self>) -> BoxFuture<Result<(), String>> {
        Box::pin(async move { self.detach_now().await.map_err(|e| format!("{e:#}")) })
    }
}

/// Fences `device` as soon as `member` loses its attachment, so requests waiting inside the
/// device fail too, not only the next one to arrive. Checked every heartbeat.
async fn watch_attachment(member: Arc<Member>, device: Arc<Device>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(why) = crate::device::Cluster::serving(&*member) {
            device.fence(&why);
            return;
        }
    }
}
