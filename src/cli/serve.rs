//! `xdevice serve`, `xdevice recover` and `xdevice status`: a replicated device served as
//! `/dev/ublkbN` on the embedded default (every replica in this process, each in its own data
//! directory under `--dir`), re-attached after a daemon crash, and reported on.
//!
//! The daemon:
//! 1. moves into its own mount namespace (private propagation) before any thread exists, so a
//!    file system later mounted on its own device never appears in its namespace and its exit
//!    cannot block on unmounting it;
//! 2. opens (or formats) the replicas, waits for a leader, starts the device pipeline;
//! 3. serves the device through `xdevice_ublk` (created with user recovery), answering each
//!    request from the async runtime;
//! 4. prints the device path on stdout once it is live, and answers `status` on a unix socket
//!    in the run directory;
//! 5. on SIGTERM or SIGINT stops the device (the kernel drains in-flight I/O first), waits for
//!    every accepted write to commit, and stops the replicas.
//!
//! `DIR/serve.json` records what was served from `DIR` (device number, replicas, mode, shape).
//! If the daemon dies, the kernel keeps the device quiesced, holding its I/O; `serve` or
//! `recover` on the same `DIR` re-attaches (after the replicas recover from their WALs), and
//! the kernel reissues what the dead daemon held.

use openraft::async_runtime::WatchReceiver;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xdevice_ublk::Geometry;

use crate::cache::CacheStats;
use crate::cli::node::TuningArgs;
use crate::cli::size;
use crate::cli::target::DeviceTarget;
use crate::device::local::{Embedded, EmbeddedOptions};
use crate::device::{CacheMode, Device, DeviceConfig, DeviceStats, PipelineStats};
use crate::replication::node::RaftTuning;
use crate::storage::disk::Backend;
use crate::storage::engine::{EngineConfig, FormatOptions};

/// Where daemons put their status sockets (`ublkbN.sock`).
pub const DEFAULT_RUN_DIR: &str = "/run/xdevice";
const RECORD: &str = "serve.json";

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Data directory: one subdirectory per replica, and serve.json.
    #[arg(long, default_value = "/var/lib/xdevice/xdb0")]
    pub dir: PathBuf,
    /// Device size for a new store (e.g. 1G); an existing store keeps its size.
    #[arg(long, value_parser = size::parse)]
    pub size: Option<u64>,
    /// Replicas in this process (a new store; an existing one keeps its count).
    #[arg(long)]
    pub replicas: Option<u64>,
    /// writeback: volatile cache + FUA advertised, plain writes complete once the leader has
    /// them, FLUSH/FUA once committed on a majority. writethrough: every write completes once
    /// committed on a majority.
    #[arg(long, value_enum)]
    pub mode: Option<CacheMode>,
    /// ublk hardware queues (one thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 64)]
    pub depth: u16,
    /// Largest READ/WRITE the kernel sends (larger ones are split by the block layer).
    #[arg(long, default_value = "1M", value_parser = size::parse)]
    pub max_io: u64,
    /// Device number N of /dev/ublkbN (default: the one recorded in --dir, else the first free).
    #[arg(long)]
    pub id: Option<u32>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// How the daemon runs, for `serve` and `recover` alike.
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// I/O backend of the replicas' stores.
    #[arg(long, default_value = "uring")]
    pub backend: Backend,
    /// Directory for the status socket.
    #[arg(long, default_value = DEFAULT_RUN_DIR, env = "XDEVICE_RUN_DIR")]
    pub run_dir: PathBuf,
    #[command(flatten)]
    pub tuning: TuningArgs,
    /// Proposals in flight (handed to the leader, not yet committed); writes arriving meanwhile
    /// merge into the next one.
    #[arg(long, default_value_t = 2)]
    pub inflight_proposals: usize,
    /// Hot cache size: unconfirmed writes stay pinned in it (writers wait when they would not
    /// fit), recent and hot blocks stay clean until evicted (S3-FIFO). At least 16M.
    #[arg(long, default_value = "256M", value_parser = size::parse)]
    pub cache: u64,
    /// Largest read-ahead window for a sequential reader; 0 turns read-ahead off.
    #[arg(long, default_value = "2M", value_parser = size::parse)]
    pub readahead: u64,
    /// Serve Prometheus metrics (cache, I/O, replicas) at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

impl DaemonArgs {
    fn daemon(&self) -> Result<Daemon> {
        if self.inflight_proposals == 0 {
            bail!("--inflight-proposals must be at least 1");
        }
        if self.cache < crate::cache::MIN_CACHE_BYTES {
            bail!(
                "--cache {} is too small: at least {} MiB (two of the largest proposals pinned)",
                self.cache,
                crate::cache::MIN_CACHE_BYTES >> 20
            );
        }
        if self.readahead > self.cache / 4 {
            bail!(
                "--readahead {} is more than a quarter of --cache {}",
                self.readahead,
                self.cache
            );
        }
        Ok(Daemon {
            backend: self.backend,
            run_dir: self.run_dir.clone(),
            tuning: self.tuning.tuning()?,
            inflight: self.inflight_proposals,
            cache: self.cache,
            readahead: self.readahead,
            metrics: self.metrics,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct RecoverArgs {
    /// The data directory the crashed daemon served from.
    #[arg(long, default_value = "/var/lib/xdevice/xdb0")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Directory of the daemons' status sockets.
    #[arg(long, default_value = DEFAULT_RUN_DIR, env = "XDEVICE_RUN_DIR")]
    pub run_dir: PathBuf,
}

/// What `DIR/serve.json` records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    /// Identifies this data directory to the ublk device it serves.
    serve_uuid: uuid::Uuid,
    ublk_id: Option<u32>,
    replicas: u64,
    mode: CacheMode,
    size_bytes: u64,
    block_bytes: u32,
    queues: u16,
    depth: u16,
    max_io_bytes: u32,
}

impl Record {
    fn load(dir: &Path) -> Result<Option<Record>> {
        let path = dir.join(RECORD);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("{} is not a valid serve record", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the record durably (temporary file, fsync, rename, fsync of the directory).
    fn store(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        let tmp = dir.join(format!("{RECORD}.tmp"));
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(RECORD))?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    fn owner(&self, dir: &Path) -> serde_json::Value {
        serde_json::json!({ "xdevice": self.serve_uuid.to_string(), "dir": dir.display().to_string() })
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            block_bytes: self.block_bytes,
            size_bytes: self.size_bytes,
            max_io_bytes: self.max_io_bytes,
            max_discard_bytes: discard_limit(self.block_bytes),
            volatile_cache: self.mode == CacheMode::Writeback,
        }
    }
}

/// The largest discard or write-zeroes accepted at once: 256 MiB, whole blocks (the device
/// splits it into zero entries; the block layer splits larger ones).
fn discard_limit(block_bytes: u32) -> u32 {
    (256u32 << 20) / block_bytes * block_bytes
}

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

struct Served {
    record: Record,
    dir: PathBuf,
    id: u32,
    recovered: bool,
    started: Instant,
    embedded: Arc<Embedded>,
    device: Arc<Device>,
}

impl Served {
    fn status(&self) -> DeviceStatus {
        let leader = self.embedded.leader();
        let matched: std::collections::BTreeMap<u64, Option<u64>> = leader
            .as_ref()
            .and_then(|l| l.raft.metrics().borrow_watched().replication.clone())
            .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
            .unwrap_or_default();
        let replicas = (1..=self.record.replicas)
            .map(|id| match self.embedded.node(id) {
                Some(node) => {
                    let m = node.raft.metrics().borrow_watched().clone();
                    ReplicaStatus {
                        id,
                        role: format!("{:?}", m.state),
                        term: m.current_term,
                        last_log_index: m.last_log_index,
                        committed: match &m.replication {
                            Some(r) => majority_index(
                                m.membership_config.membership().voter_ids().map(|v| {
                                    if v == id {
                                        m.last_log_index
                                    } else {
                                        r.get(&v).copied().flatten().map(|l| l.index)
                                    }
                                }),
                            ),
                            None => m.last_applied.map(|l| l.index),
                        },
                        applied: m.last_applied.map(|l| l.index),
                        snapshot: m.snapshot.map(|l| l.index),
                        purged: m.purged.map(|l| l.index),
                        matched: matched.get(&id).copied().flatten(),
                    }
                }
                None => ReplicaStatus {
                    id,
                    role: "Stopped".into(),
                    term: 0,
                    last_log_index: None,
                    committed: None,
                    applied: None,
                    snapshot: None,
                    purged: None,
                    matched: None,
                },
            })
            .collect();
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
            leader: leader.map(|l| l.id),
            replicas,
            io: self.device.stats(),
            pipeline: self.device.pipeline(),
            cache: self.device.cache_stats(),
        }
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

/// A private mount namespace: mounts of this daemon's own device (made later, by anyone)
/// never propagate into it. Must run before any thread is started (unshare of the fs context
/// fails in a threaded process).
fn private_mount_namespace() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS): a private mount namespace")?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .context("making the daemon's mounts private")?;
    // The new namespace starts as a copy of the old one: a daemon re-attaching after a crash
    // would hold its own device's file system (still mounted by its users) and keep it alive
    // after they unmount it. Detach every copied mount of a ublk device; users' mounts outside
    // this namespace are untouched.
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for mount_point in ublk_mounts(&mountinfo).into_iter().rev() {
        nix::mount::umount2(mount_point.as_str(), nix::mount::MntFlags::MNT_DETACH).with_context(
            || format!("detaching the copy of {mount_point} in the daemon's mount namespace"),
        )?;
    }
    Ok(())
}

/// Mount points in `mountinfo` (the format of /proc/self/mountinfo) whose source is a ublk block
/// device, in mount order.
fn ublk_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let source = after.split(' ').nth(1)?;
            source.starts_with("/dev/ublkb").then(|| unescape_mountinfo(mount_point))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn require_ublk() -> Result<()> {
    if nix::unistd::geteuid().as_raw() != 0 {
        bail!("serving a ublk device needs root");
    }
    if !xdevice_ublk::available() {
        bail!(
            "/dev/ublk-control is missing: this kernel has no ublk driver loaded (modprobe \
             ublk_drv; on a kernel without ublk, `make run` shows the device in a guest kernel)"
        );
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("xdevice")
        .build()
        .context("starting the async runtime")
}

/// `xdevice serve`.
pub fn run_serve(args: ServeArgs) -> Result<()> {
    // Everything that can be checked without the kernel is checked first, so a bad flag or
    // record is named even where ublk is missing.
    let daemon = args.daemon.daemon()?;
    if args.replicas == Some(0) {
        bail!("--replicas must be at least 1");
    }
    let max_io = u32::try_from(args.max_io)
        .ok()
        .filter(|m| (4096..=(8 << 20)).contains(m) && m % 4096 == 0)
        .with_context(|| {
            format!("--max-io {} must be a multiple of 4096 in 4K..=8M", args.max_io)
        })?;
    if let Some(size) = args.size {
        if size == 0 || size % 4096 != 0 {
            bail!("--size {size} must be a positive multiple of the 4096-byte block");
        }
    }
    if args.queues == 0 || args.depth == 0 || args.depth > 4096 {
        bail!("--queues must be at least 1 and --depth in 1..=4096");
    }
    let existing = match args.dir.canonicalize() {
        Ok(dir) => Record::load(&dir)?,
        Err(_) => None,
    };
    require_ublk()?;
    private_mount_namespace()?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating data directory {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let original = existing.clone();
    let mut record = match existing {
        Some(r) => {
            let check = |what: &str, given: Option<String>, have: String| -> Result<()> {
                match given {
                    Some(g) if g != have => bail!(
                        "{} already holds a device with {what} {have}; --{what} {g} cannot change it",
                        dir.display()
                    ),
                    _ => Ok(()),
                }
            };
            check("replicas", args.replicas.map(|r| r.to_string()), r.replicas.to_string())?;
            check("size", args.size.map(|s| s.to_string()), r.size_bytes.to_string())?;
            let mut r = r;
            // Mode and queue shape may change between runs of a stopped device.
            if let Some(mode) = args.mode {
                r.mode = mode;
            }
            r.queues = args.queues;
            r.depth = args.depth;
            r.max_io_bytes = max_io;
            r
        }
        None => Record {
            serve_uuid: uuid::Uuid::new_v4(),
            ublk_id: None,
            replicas: args.replicas.unwrap_or(3),
            mode: args.mode.unwrap_or(CacheMode::Writeback),
            size_bytes: args.size.unwrap_or(1 << 30),
            block_bytes: 4096,
            queues: args.queues,
            depth: args.depth,
            max_io_bytes: max_io,
        },
    };
    // Re-attach if the device this directory served is still there, quiesced.
    let wanted = args.id.or(record.ublk_id);
    let mut recover = false;
    if let Some(id) = wanted {
        if let Some(info) = xdevice_ublk::device_info(id)? {
            let ours = info.owner.as_ref() == Some(&record.owner(&dir));
            match (ours, info.state) {
                (true, "quiesced") => recover = true,
                (true, state) => bail!(
                    "/dev/ublkb{id} from {} is already {state}, served by pid {}",
                    dir.display(),
                    info.daemon_pid
                ),
                (false, _) if args.id.is_some() => {
                    bail!("/dev/ublkb{id} exists and belongs to another daemon")
                }
                (false, _) => {}
            }
        }
    }
    let id = if recover {
        wanted
    } else {
        args.id
            .or(record.ublk_id)
            .filter(|i| xdevice_ublk::device_info(*i).ok().flatten().is_none())
    };
    if recover {
        // The kernel keeps the device's shape (queues, depth, limits, cache mode): serve it as
        // it was created, whatever the flags of this run say.
        if let Some(original) = original {
            record = original;
        }
        eprintln!(
            "xdevice: /dev/ublkb{} was left by a stopped daemon: re-attaching as it was created \
             ({:?}, {} queue(s) x {})",
            id.unwrap_or(0),
            record.mode,
            record.queues,
            record.depth
        );
    }
    serve_device(dir, record, id, recover, daemon)
}

/// `xdevice recover`.
pub fn run_recover(args: RecoverArgs) -> Result<()> {
    let daemon = args.daemon.daemon()?;
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("data directory {}", args.dir.display()))?;
    let Some(record) = Record::load(&dir)? else {
        bail!("{} has no {RECORD}: nothing was served from it", dir.display());
    };
    let Some(id) = record.ublk_id else {
        bail!("{} never served a device", dir.display());
    };
    require_ublk()?;
    private_mount_namespace()?;
    let Some(info) = xdevice_ublk::device_info(id)? else {
        bail!(
            "/dev/ublkb{id} (served from {}) no longer exists; start it with `xdevice serve`",
            dir.display()
        );
    };
    if info.owner.as_ref() != Some(&record.owner(&dir)) {
        bail!("/dev/ublkb{id} belongs to another daemon, not to {}", dir.display());
    }
    if info.state != "quiesced" {
        bail!(
            "/dev/ublkb{id} is {}, not quiesced: its daemon (pid {}) is still running, or the \
             driver has not noticed it died yet",
            info.state,
            info.daemon_pid
        );
    }
    serve_device(dir, record, Some(id), true, daemon)
}

/// How the daemon runs, whatever it serves.
struct Daemon {
    backend: Backend,
    run_dir: PathBuf,
    tuning: RaftTuning,
    inflight: usize,
    cache: u64,
    readahead: u64,
    metrics: Option<std::net::SocketAddr>,
}

fn serve_device(
    dir: PathBuf,
    mut record: Record,
    id: Option<u32>,
    recover: bool,
    daemon: Daemon,
) -> Result<()> {
    let Daemon { backend, run_dir, tuning, inflight, cache, readahead, metrics } = daemon;
    let rt = runtime()?;
    rt.block_on(async move {
        let started = Instant::now();
        // Bound before anything starts, so a taken address fails the start with nothing made.
        let metrics = match metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--metrics {addr}: cannot listen"))?,
            ),
            None => None,
        };
        let opts = EmbeddedOptions {
            dir: dir.clone(),
            replicas: record.replicas,
            format: FormatOptions {
                device_name: "xdb0".into(),
                device_bytes: Some(record.size_bytes),
                block_bytes: record.block_bytes,
                segment_bytes: 64 << 20,
                ..FormatOptions::default()
            },
            engine: EngineConfig { fill_segments: true, ..EngineConfig::default() },
            backend,
            tuning,
            log_cache_bytes: crate::device::local::EMBEDDED_LOG_CACHE_BYTES,
        };
        let embedded = Embedded::start(opts).await.context("starting the replicas")?;
        let leader = embedded.wait_leader(Duration::from_secs(30)).await?;
        let sb = leader.engine.superblock().clone();
        record.size_bytes = sb.device_bytes;
        record.block_bytes = sb.block_bytes;
        let cfg = DeviceConfig::new(
            sb.block_bytes,
            sb.device_bytes / u64::from(sb.block_bytes),
            record.mode,
        );
        let cfg = DeviceConfig {
            max_inflight_proposals: inflight,
            cache_bytes: cache,
            readahead_bytes: readahead,
            ..cfg
        };
        let device = Device::start(cfg, embedded.clone());

        let geometry = record.geometry();
        let ublk_cfg = xdevice_ublk::Config {
            id,
            queues: record.queues,
            depth: record.depth,
            geometry,
            owner: record.owner(&dir),
        };
        let target = Arc::new(DeviceTarget::new(device.clone()));
        let (live_tx, live_rx) = tokio::sync::oneshot::channel();
        let server = std::thread::Builder::new().name("ublk".into()).spawn(move || {
            xdevice_ublk::serve(&ublk_cfg, recover, target, move |live| {
                let _ = live_tx.send(live);
            })
        })?;
        let live = match live_rx.await {
            Ok(live) => live,
            Err(_) => {
                let err = match server.join() {
                    Ok(Err(e)) => anyhow::Error::new(e),
                    Ok(Ok(())) => anyhow::anyhow!("the device stopped before it was live"),
                    Err(_) => anyhow::anyhow!("the ublk thread panicked"),
                };
                device.close();
                embedded.shutdown().await?;
                return Err(err);
            }
        };
        record.ublk_id = Some(live.id);
        record.store(&dir)?;
        let served = Arc::new(Served {
            record: record.clone(),
            dir: dir.clone(),
            id: live.id,
            recovered: live.recovered,
            started,
            embedded: embedded.clone(),
            device: device.clone(),
        });
        let socket = start_status_socket(&run_dir, live.id, served.clone()).await;
        if let Some(listener) = metrics {
            let served = served.clone();
            let status = Arc::new(move || served.status());
            tokio::spawn(crate::cli::metrics::serve(listener, status));
        }
        tracing::info!(
            "serving {} ({} bytes, {:?}, {} replicas) from {} in {:.2}s",
            live.path,
            record.size_bytes,
            record.mode,
            record.replicas,
            dir.display(),
            started.elapsed().as_secs_f64()
        );
        println!("{}", live.path);
        use std::io::Write;
        std::io::stdout().flush()?;

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let server_done = tokio::task::spawn_blocking(move || server.join());
        tokio::pin!(server_done);
        let stopped_by_signal = tokio::select! {
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = &mut server_done => false,
        };
        if stopped_by_signal {
            eprintln!("xdevice: stopping {}", live.path);
            let id = live.id;
            tokio::task::spawn_blocking(move || xdevice_ublk::stop(id)).await??;
            match (&mut server_done).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("ublk: {e}"),
                _ => tracing::warn!("the ublk thread ended abnormally"),
            }
        } else {
            eprintln!("xdevice: {} was removed from outside", live.path);
        }
        // Everything completed must be committed before the replicas stop.
        let flushed = device.flush().await;
        device.close();
        embedded.shutdown().await?;
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        flushed.context("committing the writes accepted before the stop")?;
        eprintln!("xdevice: {} stopped; every completed write is durable", live.path);
        Ok(())
    })
}

fn socket_path(run_dir: &Path, id: u32) -> PathBuf {
    run_dir.join(format!("ublkb{id}.sock"))
}

/// Answers each connection with one JSON status line. A failure to set it up is logged, not
/// fatal: the device serves without it.
async fn start_status_socket(run_dir: &Path, id: u32, served: Arc<Served>) -> Option<PathBuf> {
    let path = socket_path(run_dir, id);
    let listener = (|| -> std::io::Result<tokio::net::UnixListener> {
        std::fs::create_dir_all(run_dir)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        tokio::net::UnixListener::bind(&path)
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
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
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

/// `xdevice status`.
pub fn run_status(args: StatusArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut devices = Vec::new();
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(&args.run_dir) {
        Ok(e) => e.filter_map(|e| e.ok()).map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", args.run_dir.display())),
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
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "devices": devices, "unreachable": problems })
            )?
        );
        return Ok(());
    }
    if devices.is_empty() && problems.is_empty() {
        println!("no xdevice daemons running (no sockets in {})", args.run_dir.display());
    }
    for d in &devices {
        println!(
            "{}  {}  {:?}  {} MiB  block {}  {} queue(s) x {}  pid {}  up {:.0}s{}",
            d.path,
            d.state,
            d.mode,
            d.size_bytes >> 20,
            d.block_bytes,
            d.queues,
            d.depth,
            d.daemon_pid,
            d.uptime_secs,
            if d.recovered { "  (recovered)" } else { "" }
        );
        println!("  data      {}", d.dir);
        println!(
            "  leader    {}",
            d.leader.map_or_else(|| "none".to_string(), |l| format!("replica {l}"))
        );
        for r in &d.replicas {
            let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
            println!(
                "  replica {}  {:<9} term {:<4} log {:<8} committed {:<8} applied {:<8} snapshot {:<8} \
                 matched {}",
                r.id,
                r.role,
                r.term,
                opt(r.last_log_index),
                opt(r.committed),
                opt(r.applied),
                opt(r.snapshot),
                opt(r.matched)
            );
        }
        println!(
            "  io        {} writes, {} flushes, {} reads, {} proposals",
            d.io.writes, d.io.flushes, d.io.reads, d.io.proposals
        );
        println!(
            "  pipeline  {} bytes in {} batches not yet committed ({} proposals in flight), {} \
             blocks pinned in the cache",
            d.pipeline.unconfirmed_bytes,
            d.pipeline.unconfirmed_batches,
            d.pipeline.inflight_proposals,
            d.pipeline.pinned_blocks
        );
        let c = &d.cache;
        println!(
            "  cache     {} of {} MiB ({} MiB pinned), {} hits, {} misses ({:.1}% hits), \
             {} evictions, {} blocks read ahead",
            c.resident_bytes >> 20,
            c.capacity_bytes >> 20,
            c.pinned_bytes >> 20,
            c.hits,
            c.misses,
            100.0 * c.hit_ratio(),
            c.evictions,
            c.readahead_blocks
        );
        println!(
            "  checksums {} bad blocks read, {} repaired from another replica",
            d.io.corrupt_blocks, d.io.repaired_blocks
        );
    }
    for p in &problems {
        println!("unreachable: {p}");
    }
    Ok(())
}

/// The stable name of `ublkbN`: the last component of the data directory its daemon recorded
/// with the device.
pub fn udev_name(kernel_name: &str) -> Result<String> {
    let id: u32 = kernel_name
        .strip_prefix("ublkb")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{kernel_name:?} is not a ublk block device name (ublkbN)"))?;
    let info =
        xdevice_ublk::device_info(id)?.with_context(|| format!("/dev/ublkc{id} does not exist"))?;
    let dir = info
        .owner
        .as_ref()
        .and_then(|o| o.get("dir"))
        .and_then(|d| d.as_str())
        .with_context(|| format!("ublk device {id} is not served by xdevice"))?;
    Path::new(dir)
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("data directory {dir:?} has no usable last component"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ublk_mounts_in_mountinfo() {
        let info = "\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
62 59 259:0 / /tmp/m rw,relatime - ext4 /dev/ublkb0 rw
63 62 0:50 / /tmp/m/sub rw - tmpfs tmpfs rw
64 22 259:1 / /mnt/with\\040space rw shared:9 - xfs /dev/ublkb12 rw,attr2
65 22 7:0 / /mnt/loop rw - ext4 /dev/loop0 rw
";
        assert_eq!(ublk_mounts(info), vec!["/tmp/m".to_string(), "/mnt/with space".to_string()]);
        assert!(ublk_mounts("garbage\n\n - \n").is_empty());
    }

    #[test]
    fn majority_index_is_what_most_voters_hold() {
        assert_eq!(majority_index([Some(9), Some(7), Some(3)].into_iter()), Some(7));
        assert_eq!(majority_index([Some(9), None, None].into_iter()), None);
        assert_eq!(majority_index([Some(5)].into_iter()), Some(5));
        assert_eq!(majority_index([Some(5), Some(8), Some(2), Some(8)].into_iter()), Some(5));
        assert_eq!(majority_index(std::iter::empty()), None);
    }
}
