//! What a serving daemon reports: `DeviceStatus` (replicas, I/O, the write pipeline, the hot
//! cache), answered as one JSON line on a unix socket in the run directory per device, and read
//! back from every socket there by `xdevice status`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use openraft::async_runtime::WatchReceiver;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::record::Record;
use crate::cache::CacheStats;
use crate::device::local::Embedded;
use crate::device::{CacheMode, Device, DeviceStats, PipelineStats};
use crate::metrics::{DeviceFigures, Figures, ReplicaFigures};
use crate::replication::node::Node;

/// The status of one device, as `xdevice status --json` prints it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub id: u32,
    pub path: String,
    pub state: String,
    pub daemon_pid: u32,
    pub dir: String,
    pub mode: CacheMode,
    pub size_bytes: u64,
    pub block_bytes: u32,
    pub queues: u16,
    pub depth: u16,
    pub recovered: bool,
    pub uptime_secs: f64,
    pub leader: Option<u64>,
    pub replicas: Vec<ReplicaStatus>,
    pub io: DeviceStats,
    /// The write pipeline: blocks held in memory until committed.
    pub pipeline: PipelineStats,
    /// The hot cache in front of reads.
    pub cache: CacheStats,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The replica's Raft node id: its position's, or the new id a rebuilt replica got.
    pub id: u64,
    pub role: String,
    pub term: u64,
    pub last_log_index: Option<u64>,
    /// The commit index as this replica knows it: on the leader, the highest index a majority
    /// of voters holds; on a follower, its applied index (everything applied is committed; the
    /// leader may know of more).
    pub committed: Option<u64>,
    pub applied: Option<u64>,
    pub snapshot: Option<u64>,
    pub purged: Option<u64>,
    /// On the leader: the index each follower has matched.
    pub matched: Option<u64>,
}

/// Where a served device's replicas run.
#[derive(Debug)]
pub enum Replicas {
    /// Every replica in this process.
    Embedded(Arc<Embedded>),
    /// This member's replica; the others run on their own hosts.
    Member(Arc<Node>),
}

/// A device being served, for its status.
#[derive(Debug)]
pub struct Served {
    pub record: Record,
    pub dir: PathBuf,
    pub id: u32,
    pub recovered: bool,
    pub started: Instant,
    pub replicas: Replicas,
    pub device: Arc<Device>,
}

/// One running replica's status; `matched`: what the leader knows it holds.
fn replica_status(node: &Node, matched: Option<u64>) -> ReplicaStatus {
    let id = node.id;
    let m = node.raft.metrics().borrow_watched().clone();
    ReplicaStatus {
        id,
        role: format!("{:?}", m.state),
        term: m.current_term,
        last_log_index: m.last_log_index,
        committed: match &m.replication {
            Some(r) => majority_index(m.membership_config.membership().voter_ids().map(|v| {
                if v == id {
                    m.last_log_index
                } else {
                    r.get(&v).copied().flatten().map(|l| l.index)
                }
            })),
            None => m.last_applied.map(|l| l.index),
        },
        applied: m.last_applied.map(|l| l.index),
        snapshot: m.snapshot.map(|l| l.index),
        purged: m.purged.map(|l| l.index),
        matched,
    }
}

/// A replica known only by what the leader says of it.
fn remote_status(id: u64, role: &str, matched: Option<u64>) -> ReplicaStatus {
    ReplicaStatus {
        id,
        role: role.into(),
        term: 0,
        last_log_index: None,
        committed: None,
        applied: None,
        snapshot: None,
        purged: None,
        matched,
    }
}

/// The leader's matched index per follower, if `leader` leads.
fn matched_by(leader: Option<&Node>) -> std::collections::BTreeMap<u64, Option<u64>> {
    leader
        .and_then(|l| l.raft.metrics().borrow_watched().replication.clone())
        .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
        .unwrap_or_default()
}

impl Served {
    pub fn status(&self) -> DeviceStatus {
        let (leader, replicas) = match &self.replicas {
            Replicas::Embedded(embedded) => {
                let leader = embedded.leader();
                let matched = matched_by(leader.as_deref());
                let replicas = (1..=self.record.replicas)
                    .map(|slot| match embedded.node(slot) {
                        Some(node) => {
                            replica_status(&node, matched.get(&node.id).copied().flatten())
                        }
                        None => remote_status(embedded.node_id(slot), "Stopped", None),
                    })
                    .collect();
                (leader.map(|l| l.id), replicas)
            }
            Replicas::Member(node) => {
                let m = node.raft.metrics().borrow_watched().clone();
                let leads = m.current_leader == Some(node.id);
                let matched = matched_by(leads.then_some(&**node));
                let membership = m.membership_config.membership();
                let voters: Vec<u64> = membership.voter_ids().collect();
                let replicas = membership
                    .nodes()
                    .map(|(id, _)| match *id == node.id {
                        true => replica_status(node, None),
                        false => {
                            let role = if voters.contains(id) { "Voter" } else { "Learner" };
                            remote_status(*id, role, matched.get(id).copied().flatten())
                        }
                    })
                    .collect();
                (m.current_leader, replicas)
            }
        };
        DeviceStatus {
            id: self.id,
            path: format!("/dev/ublkb{}", self.id),
            state: "live".into(),
            daemon_pid: std::process::id(),
            dir: self.dir.display().to_string(),
            mode: self.record.mode,
            size_bytes: self.record.size_bytes,
            block_bytes: self.record.block_bytes,
            queues: self.record.queues,
            depth: self.record.depth,
            recovered: self.recovered,
            uptime_secs: self.started.elapsed().as_secs_f64(),
            leader,
            replicas,
            io: self.device.stats(),
            pipeline: self.device.pipeline(),
            cache: self.device.cache_stats(),
        }
    }
}

impl Served {
    /// What a scrape reports: the device, and the replicas running in this process.
    pub fn figures(&self) -> Figures {
        let replicas = match &self.replicas {
            Replicas::Embedded(embedded) => (1..=self.record.replicas)
                .filter_map(|slot| embedded.node(slot))
                .map(|node| replica_figures(&node))
                .collect(),
            // The member daemon adds its replica's figures (with its incoming snapshot).
            Replicas::Member(_) => Vec::new(),
        };
        Figures { device: Some(self.device_figures()), replicas }
    }

    fn device_figures(&self) -> DeviceFigures {
        DeviceFigures {
            name: format!("ublkb{}", self.id),
            size_bytes: self.record.size_bytes,
            io: self.device.stats(),
            pipeline: self.device.pipeline(),
            cache: self.device.cache_stats(),
        }
    }
}

/// One running replica's figures for a scrape.
pub fn replica_figures(node: &Node) -> ReplicaFigures {
    let m = node.raft.metrics().borrow_watched().clone();
    let status = replica_status(node, None);
    let last = m.last_log_index.unwrap_or(0);
    let lag = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != node.id)
                .map(|(id, l)| (*id, node.trail.lag(l.as_ref().map(|l| l.index), last)))
                .collect()
        })
        .unwrap_or_default();
    let segments = node.engine.wal().segments().len() as u64;
    ReplicaFigures {
        id: node.id,
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        committed: status.committed,
        applied: status.applied,
        snapshot: status.snapshot,
        wal_segments: segments,
        wal_bytes: segments * node.engine.superblock().segment_bytes,
        lag,
        snapshot_in: node.receiving.current().map(|(_, received)| {
            (received, crate::replication::snapshot::Shape::of(&node.engine).stream_bytes())
        }),
        snapshots_installed: node.receiving.installed(),
    }
}

/// The highest index held by a majority of `voters` (`None` for a voter holding nothing).
fn majority_index(voters: impl Iterator<Item = Option<u64>>) -> Option<u64> {
    let mut held: Vec<Option<u64>> = voters.collect();
    if held.is_empty() {
        return None;
    }
    held.sort_unstable_by(|a, b| b.cmp(a));
    held[held.len() / 2]
}

fn socket_path(run_dir: &Path, id: u32) -> PathBuf {
    run_dir.join(format!("ublkb{id}.sock"))
}

/// Answers each connection with one JSON status line. Only the daemon's owner (and root) may
/// connect: the socket is made mode 0600 in a directory made 0700, and a connection from another
/// user is dropped by its peer credentials, should the socket's mode be loosened. A failure to
/// set it up is logged, not fatal: the device serves without it.
pub async fn start_status_socket(run_dir: &Path, id: u32, served: Arc<Served>) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = socket_path(run_dir, id);
    let listener = (|| -> std::io::Result<tokio::net::UnixListener> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(run_dir)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    })();
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(
                "status socket {}: {e}; `xdevice status` will not see this device",
                path.display()
            );
            return None;
        }
    };
    let owner = nix::unistd::geteuid().as_raw();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            match conn.peer_cred() {
                Ok(c) if c.uid() == owner || c.uid() == 0 => {}
                Ok(c) => {
                    tracing::warn!(uid = c.uid(), "status socket: refusing another user");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "status socket: no peer credentials");
                    continue;
                }
            }
            let served = served.clone();
            tokio::spawn(async move {
                let mut line = serde_json::to_vec(&served.status()).unwrap_or_default();
                line.push(b'\n');
                let _ = conn.write_all(&line).await;
            });
        }
    });
    Some(path)
}

/// Every daemon's status from the sockets in `run_dir`; a socket that does not answer (its daemon
/// died) is reported with what the driver knows of its device.
pub fn query(run_dir: &Path) -> Result<(Vec<DeviceStatus>, Vec<serde_json::Value>)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut devices = Vec::new();
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e.filter_map(|e| e.ok()).map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", run_dir.display())),
    };
    let mut sockets: Vec<PathBuf> =
        entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "sock")).collect();
    sockets.sort();
    for path in sockets {
        let got = rt.block_on(async {
            let mut conn = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::UnixStream::connect(&path),
            )
            .await??;
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf)).await??;
            anyhow::Ok(serde_json::from_slice::<DeviceStatus>(&buf)?)
        });
        match got {
            Ok(s) => devices.push(s),
            Err(e) => {
                // A daemon that died leaves its socket; say what the driver knows.
                let id = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.strip_prefix("ublkb"))
                    .and_then(|s| s.parse::<u32>().ok());
                let driver = id.and_then(|id| xdevice_ublk::device_info(id).ok().flatten());
                problems.push(serde_json::json!({
                    "socket": path.display().to_string(),
                    "error": format!("{e:#}"),
                    "device": id.map(|i| format!("/dev/ublkb{i}")),
                    "driver_state": driver.map(|d| d.state),
                }));
            }
        }
    }
    Ok((devices, problems))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majority_index_is_what_most_voters_hold() {
        assert_eq!(majority_index([Some(9), Some(7), Some(3)].into_iter()), Some(7));
        assert_eq!(majority_index([Some(9), None, None].into_iter()), None);
        assert_eq!(majority_index([Some(5)].into_iter()), Some(5));
        assert_eq!(majority_index([Some(5), Some(8), Some(2), Some(8)].into_iter()), Some(5));
        assert_eq!(majority_index(std::iter::empty()), None);
    }
}
