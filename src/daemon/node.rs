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

use openraft::async_runtime::WatchReceiver;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::record::{load_json, store_json, Record};
use super::status::{replica_figures, start_status_socket, Replicas, Served};
use super::{require_ublk, Frontend};
use crate::device::member::{Member, MemberOptions};
use crate::device::{CacheMode, Device, DeviceConfig};
use crate::net::tls::{Identity, TlsSource};
use crate::net::{RpcServer, Security};
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
    /// Where this member's certificate is, or plaintext.
    pub tls: TlsSource,
    pub listen: SocketAddr,
    pub location: Location,
    /// Incoming snapshots and `member.json`.
    pub state_dir: PathBuf,
    pub tuning: RaftTuning,
    /// Attach and serve the device as soon as the node runs.
    pub attach: bool,
    pub shape: DeviceShape,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics: Option<SocketAddr>,
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
    /// Where the status socket goes (`xdevice status`).
    pub run_dir: PathBuf,
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
        // Bound before anything starts, so a taken address fails the start with nothing made.
        let metrics = match req.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--metrics {addr}: cannot listen"))?,
            ),
            None => None,
        };
        // Segments are filled with zeros as they are made (off the commit path), as `serve`
        // does: a sync then never waits on extent allocation.
        let engine =
            EngineConfig { node_id: Some(req.id), fill_segments: true, ..EngineConfig::default() };
        let replica = open_replica(&req.location, engine, &req.state_dir, DEFAULT_CACHE_BYTES)
            .with_context(|| format!("opening {}", req.location.describe()))?;
        let cluster_id = replica.engine.superblock().cluster_id;
        let security = req
            .tls
            .security(cluster_id, Identity::Member(req.id))
            .map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
        if matches!(security, Security::Plaintext) {
            tracing::warn!("--plaintext: peers are not authenticated and traffic is clear text");
        }
        let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new(
            cluster_id,
            req.id,
            Some(req.listen.ip()),
            security.clone(),
        ));
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
            security.clone(),
        );
        let host = Arc::new(MemberHost {
            node: node.clone(),
            opts: MemberOptions {
                cluster_id,
                security: security.clone(),
                bind: Some(req.listen.ip()),
                // A follower votes for no one until `election_max` after it last heard this
                // leader; openraft dates an acknowledgement by when its request was sent. One
                // heartbeat is left for the clocks' rates to differ. (`election_min` fenced a
                // member whose heartbeats a loaded TCG guest delayed past 600 ms.)
                lease: req.tuning.election_max - req.tuning.heartbeat,
                election_max: req.tuning.election_max,
                // Four election timeouts past the lease: a stall of that long is survived.
                hold: req.tuning.election_max * 4,
                attach_within: req.shape.attach_within,
                timeout: Duration::from_secs(5),
                relinquished: Arc::default(),
            },
            service: Arc::downgrade(&service),
            shape: req.shape.clone(),
            state_dir: req.state_dir.clone(),
            heartbeat: req.tuning.heartbeat,
            serving: tokio::sync::Mutex::new(None),
            active: std::sync::Mutex::new(None),
            shown: std::sync::Mutex::new(None),
        });
        service.set_host(host.clone());
        service.quiet_votes_for(req.tuning.election_max);
        if let Some(listener) = metrics {
            let host = host.clone();
            let figures = move || {
                let served = host.shown.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let mut f = served.map(|s| s.figures()).unwrap_or_default();
                f.replicas.push(replica_figures(&host.node));
                f
            };
            let registry = crate::metrics::registry(Arc::new(figures));
            tokio::spawn(crate::metrics::http::serve(listener, Arc::new(registry)));
        }
        let server = RpcServer::start(listener, cluster_id, MAX_PAYLOAD, security, service)?;
        println!("node {} of cluster {cluster_id} listening on {}", req.id, server.local_addr());
        let listening = format!("node {} listening on {}", req.id, server.local_addr());
        if req.attach {
            let attached = host.attach_now().await.context("attaching the device")?;
            println!("{}", attached.path);
            super::notify::ready(&format!("{listening}; serving {}", attached.path));
        } else {
            super::notify::ready(&listening);
        }
        super::notify::spawn_watchdog();
        use std::io::Write;
        std::io::stdout().flush()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping");
        super::notify::stopping(&format!("node {} stopping", req.id));
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
    /// The status socket, removed when the device stops.
    socket: Option<PathBuf>,
    /// What the status socket and the metrics report.
    served: Arc<Served>,
}

impl Serving {
    /// Stops the device (the kernel drains in-flight I/O, the watchdog still fencing it if the
    /// attachment is lost meanwhile) and its status socket. A failure to stop is logged: the
    /// caller goes on ending the attachment either way.
    async fn stop(self) -> (Arc<Member>, Arc<Device>) {
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
        if let Err(e) = self.frontend.stop().await {
            tracing::error!(error = %e, "stopping the ublk device");
        }
        self.watchdog.abort();
        (self.member, self.device)
    }
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
    /// The attachment being served, reachable without waiting for an attach or detach under
    /// way (`relinquish`).
    active: std::sync::Mutex<Option<(Arc<Member>, Arc<Device>)>>,
    /// The device being served, for the metrics.
    shown: std::sync::Mutex<Option<Arc<Served>>>,
    /// This node's service, whose unfenced `WRITE`s are held off while it attaches.
    service: std::sync::Weak<NodeService>,
}

impl MemberHost {
    async fn attach_now(&self) -> Result<Attached> {
        let started = Instant::now();
        let mut slot = self.serving.lock().await;
        if let Some(s) = slot.as_ref() {
            let lost = matches!(
                crate::device::Cluster::serving(&*s.member),
                Err(crate::device::NotServing::Lost(_))
            );
            if s.member.fenced().is_none() && !lost {
                return Ok(s.attached.clone());
            }
        }
        if let Some(old) = slot.take() {
            *self.active.lock().expect("active lock") = None;
            *self.shown.lock().expect("shown lock") = None;
            tracing::warn!(
                epoch = old.member.epoch(),
                reason = old.member.fenced().unwrap_or("unknown"),
                "the previous attachment was lost; stopping its device before attaching again"
            );
            old.device.fence("attaching again");
            let (_, device) = old.stop().await;
            device.close();
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
        // The kernel side is checked before the attach entry is committed, so a refusal here
        // fences nobody: a device this member left that is still live (its daemon runs), or a
        // device number that belongs to another daemon.
        let left = match record.ublk_id {
            Some(old) => match xdevice_ublk::device_info(old)? {
                Some(info) if info.owner.as_ref() == Some(&owner) => match info.state {
                    "quiesced" => Some(old),
                    state => bail!(
                        "/dev/ublkb{old} of this member is already {state}, served by pid {}",
                        info.daemon_pid
                    ),
                },
                Some(_) if self.shape.ublk_id == Some(old) => {
                    bail!("/dev/ublkb{old} exists and belongs to another daemon")
                }
                Some(_) => {
                    // The recorded number went to another daemon: take the first free one.
                    record.ublk_id = None;
                    None
                }
                None => None,
            },
            None => None,
        };
        // No unfenced WRITE lands after the attach entry (it would apply under this member,
        // unseen by its cache).
        let service = self.service.upgrade().context("the node is stopping")?;
        service.begin_attach().await;
        let member = Member::attach(self.node.clone(), self.opts.clone()).await;
        service.end_attach();
        let member = member?;
        match self.serve_attached(&member, record, owner, left, started).await {
            Ok(serving) => {
                let attached = serving.attached.clone();
                *self.active.lock().expect("active lock") =
                    Some((member.clone(), serving.device.clone()));
                *self.shown.lock().expect("shown lock") = Some(serving.served.clone());
                super::notify::status(&format!(
                    "serving {} at epoch {}",
                    attached.path, attached.epoch
                ));
                *slot = Some(serving);
                Ok(attached)
            }
            Err(e) => {
                // The attach entry is committed but nothing serves: commit a detach, so the
                // log does not name a server that is not there.
                member.abandon().await;
                Err(e)
            }
        }
    }

    /// Serves the device once `member` is attached: re-attaches to the device `left` (quiesced
    /// by this member's crashed daemon) if no other member attached since, so the kernel
    /// reissues what it held; otherwise removes it (its I/O is stale) and makes a new one.
    async fn serve_attached(
        &self,
        member: &Arc<Member>,
        mut record: MemberRecord,
        owner: serde_json::Value,
        left: Option<u32>,
        started: Instant,
    ) -> Result<Serving> {
        let mut id = self.shape.ublk_id.or(record.ublk_id);
        let mut recover = false;
        if let Some(old) = left {
            let mine = Attachment { epoch: record.epoch, node: self.node.id };
            if member.replaced() == Some(mine) {
                recover = true;
                id = Some(old);
            } else {
                tracing::warn!(
                    device = old,
                    epoch = record.epoch,
                    replaced = ?member.replaced(),
                    "another member served the device since this member's daemon stopped: its \
                     quiesced device holds stale I/O; removing it (the I/O fails with EIO)"
                );
                tokio::task::spawn_blocking(move || xdevice_ublk::remove(old)).await??;
                if id == Some(old) && self.shape.ublk_id.is_none() {
                    id = None;
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
        // What this member serves, as `serve` records it: the ublk geometry comes from it, and
        // the status shows it.
        let voters =
            self.node.raft.metrics().borrow_watched().membership_config.voter_ids().count();
        let mut shown = Record {
            serve_uuid: record.serve_uuid,
            ublk_id: None,
            replicas: voters as u64,
            mode: self.shape.mode,
            size_bytes: sb.device_bytes,
            block_bytes: sb.block_bytes,
            queues: self.shape.queues,
            depth: self.shape.depth,
            max_io_bytes: self.shape.max_io,
            replica_dirs: Vec::new(),
        };
        let ublk_cfg = xdevice_ublk::Config {
            id,
            queues: self.shape.queues,
            depth: self.shape.depth,
            geometry: shown.geometry(),
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
        if let Err(e) = store_json(&self.state_dir, MEMBER_RECORD, &record) {
            device.fence("the member record could not be written");
            frontend.stop().await?;
            device.close();
            return Err(e);
        }
        let watchdog =
            tokio::spawn(watch_attachment(member.clone(), device.clone(), self.heartbeat));
        shown.ublk_id = Some(frontend.live.id);
        let served = Arc::new(Served {
            record: shown,
            dir: self.state_dir.clone(),
            id: frontend.live.id,
            recovered: frontend.live.recovered,
            started,
            replicas: Replicas::Member(self.node.clone()),
            device: device.clone(),
        });
        let socket =
            start_status_socket(&self.shape.run_dir, frontend.live.id, served.clone()).await;
        let attached = Attached {
            path: frontend.live.path.clone(),
            epoch: member.epoch(),
            term: member.term(),
            millis: started.elapsed().as_millis() as u64,
            recovered: frontend.live.recovered,
        };
        tracing::info!(
            path = %attached.path,
            epoch = attached.epoch,
            term = attached.term,
            recovered = attached.recovered,
            millis = attached.millis,
            "serving the device from this member"
        );
        Ok(Serving { member: member.clone(), device, frontend, watchdog, attached, socket, served })
    }

    async fn detach_now(&self) -> Result<()> {
        let mut slot = self.serving.lock().await;
        let Some(s) = slot.take() else { bail!("node {} is not serving the device", self.node.id) };
        *self.active.lock().expect("active lock") = None;
        *self.shown.lock().expect("shown lock") = None;
        let (member, device) = s.stop().await;
        // Everything completed must be committed before the attachment ends.
        let flushed = device.flush().await;
        device.close();
        flushed.context("committing the writes accepted before the detach")?;
        let index = member.detach().await?;
        tracing::info!(index, "detached: the device is served by no member");
        super::notify::status(&format!("node {} not serving the device (detached)", self.node.id));
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
    fn relinquish(&self, why: &str) {
        // Every attachment of this term stops serving, including one being made or ended
        // right now (not yet, or no longer, in `active`).
        let term = self.node.raft.metrics().borrow_watched().current_term;
        self.opts.relinquished.fetch_max(term, std::sync::atomic::Ordering::SeqCst);
        if let Some((member, device)) = self.active.lock().expect("active lock").as_ref() {
            member.relinquish(why);
            device.fence(why);
        }
    }
}

/// Fences `device` as soon as `member` loses its attachment, so requests waiting inside the
/// device fail too, not only the next one to arrive. Checked every heartbeat; a lapsed lease
/// is first put to a quorum again (`Cluster::reconfirm`), and only a loss fences.
async fn watch_attachment(member: Arc<Member>, device: Arc<Device>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let outcome = match crate::device::Cluster::serving(&*member) {
            Ok(()) => Ok(()),
            Err(crate::device::NotServing::Lapsed(why)) => {
                tracing::warn!(
                    reason = why,
                    "the attachment's lease lapsed; asking a quorum again"
                );
                let outcome = crate::device::Cluster::reconfirm(member.clone()).await;
                if outcome.is_ok() {
                    tracing::info!("a quorum acknowledged this member again; serving");
                }
                outcome
            }
            Err(crate::device::NotServing::Lost(why)) => Err(why),
        };
        if let Err(why) = outcome {
            device.fence(&why);
            return;
        }
    }
}
