//! The serving daemon behind `xdevice serve` and `xdevice recover`: a replicated device served
//! as `/dev/ublkbN` on the embedded default (every replica in this process, each in its own data
//! directory), re-attached after a daemon crash, and reported on (`status`, `metrics`). The
//! command line (`src/cli`) parses and checks flags and calls `serve` or `recover` here.
//!
//! The daemon:
//! 1. moves into its own mount namespace (a slave of the host's) before any thread exists,
//!    without the copies of its own device's mounts, so its exit cannot block on unmounting a
//!    file system on its own device, and the host's unmounts reach it;
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

pub mod mount;
pub mod notify;
pub mod record;
pub mod status;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::device::local::{Embedded, EmbeddedOptions};
use crate::device::{CacheMode, Device, DeviceConfig};
use crate::replication::node::RaftTuning;
use crate::storage::disk::Backend;
use crate::storage::engine::{EngineConfig, FormatOptions};
use mount::private_mount_namespace;
use record::{Record, RECORD};
use status::{start_status_socket, Served};
use target::DeviceTarget;

pub mod node;

/// Where status sockets go unless told otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/xdevice";

/// How the daemon runs, whatever it serves.
#[derive(Clone, Debug)]
pub struct Daemon {
    /// I/O backend of the replicas' stores.
    pub backend: Backend,
    /// Where the status socket goes.
    pub run_dir: PathBuf,
    pub tuning: RaftTuning,
    /// Proposals in flight (`DeviceConfig::max_inflight_proposals`).
    pub inflight: usize,
    /// The hot cache's size.
    pub cache: u64,
    /// The largest read-ahead window.
    pub readahead: u64,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Rebuild replicas whose store is gone from the others (`EmbeddedOptions::rebuild_lost`).
    pub rebuild_lost: bool,
}

/// What `xdevice serve` asks for: the data directory, and for a new device its shape (an
/// existing one keeps its replicas and size; its mode and queue shape may change between runs).
#[derive(Clone, Debug)]
pub struct ServeRequest {
    pub dir: PathBuf,
    pub size: Option<u64>,
    pub replicas: Option<u64>,
    pub mode: Option<CacheMode>,
    pub queues: u16,
    pub depth: u16,
    pub max_io: u32,
    /// The device number N of /dev/ublkbN (default: the recorded one, else the first free).
    pub id: Option<u32>,
    /// Each replica's data directory (absolute), replica 1 first; empty: the recorded ones, or
    /// for a new device `dir/replica-N`.
    pub replica_dirs: Vec<PathBuf>,
}

/// Serves the device of `req.dir` until SIGTERM or SIGINT: re-attaches to the device the
/// directory served if the kernel still holds it quiesced (a crashed daemon's), else creates
/// one. The caller has checked the request's values.
pub fn serve(args: ServeRequest, daemon: Daemon) -> Result<()> {
    let max_io = args.max_io;
    let existing = match args.dir.canonicalize() {
        Ok(dir) => Record::load(&dir)?,
        Err(_) => None,
    };
    // The record is reconciled with the flags before anything is touched, ublk or not.
    let original = existing.clone();
    let shown = args.dir.display();
    let mut record = match existing {
        Some(r) => {
            let check = |what: &str, given: Option<String>, have: String| -> Result<()> {
                match given {
                    Some(g) if g != have => bail!(
                        "{shown} already holds a device with {what} {have}; --{what} {g} cannot change it"
                    ),
                    _ => Ok(()),
                }
            };
            check("replicas", args.replicas.map(|r| r.to_string()), r.replicas.to_string())?;
            check("size", args.size.map(|s| s.to_string()), r.size_bytes.to_string())?;
            if !args.replica_dirs.is_empty() && args.replica_dirs != r.replica_dirs {
                let had = if r.replica_dirs.is_empty() {
                    format!("{shown}/replica-N")
                } else {
                    r.replica_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                bail!(
                    "{shown} already serves its replicas from {had}; --replica-dir cannot move \
                     them (a replica's store stays where it was made)"
                );
            }
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
            replicas: args.replicas.unwrap_or(match args.replica_dirs.len() {
                0 => 3,
                n => n as u64,
            }),
            mode: args.mode.unwrap_or(CacheMode::Writeback),
            size_bytes: args.size.unwrap_or(1 << 30),
            block_bytes: 4096,
            queues: args.queues,
            depth: args.depth,
            max_io_bytes: max_io,
            replica_dirs: args.replica_dirs.clone(),
        },
    };
    require_ublk()?;
    private_mount_namespace()?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating data directory {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
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

/// A ublk device served from a thread of its own (`xdevice_ublk::serve`), answering through a
/// `DeviceTarget`.
pub(crate) struct Frontend {
    pub live: xdevice_ublk::Live,
    thread: Option<std::thread::JoinHandle<std::result::Result<(), xdevice_ublk::Error>>>,
    /// Set once the serving thread has returned.
    ended: tokio::sync::watch::Receiver<bool>,
}

impl Frontend {
    /// Creates (or, with `recover`, re-attaches to) the device and returns once it is live. On
    /// failure the device pipeline is left to the caller.
    pub async fn start(
        cfg: xdevice_ublk::Config,
        recover: bool,
        device: Arc<Device>,
    ) -> Result<Frontend> {
        let target = Arc::new(DeviceTarget::new(device));
        let (live_tx, live_rx) = tokio::sync::oneshot::channel();
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new().name("ublk".into()).spawn(move || {
            let r = xdevice_ublk::serve(&cfg, recover, target, move |live| {
                let _ = live_tx.send(live);
            });
            let _ = ended_tx.send(true);
            r
        })?;
        match live_rx.await {
            Ok(live) => Ok(Frontend { live, thread: Some(thread), ended }),
            Err(_) => Err(match thread.join() {
                Ok(Err(e)) => anyhow::Error::new(e),
                Ok(Ok(())) => anyhow::anyhow!("the device stopped before it was live"),
                Err(_) => anyhow::anyhow!("the ublk thread panicked"),
            }),
        }
    }

    /// Resolves once the serving thread has returned (the device was stopped, perhaps from
    /// outside).
    pub async fn ended(&mut self) {
        let _ = self.ended.wait_for(|e| *e).await;
    }

    /// Stops the device: the kernel drains in-flight I/O through the queues, which then exit.
    pub async fn stop(mut self) -> Result<()> {
        let id = self.live.id;
        tokio::task::spawn_blocking(move || xdevice_ublk::stop(id)).await??;
        let Some(thread) = self.thread.take() else { return Ok(()) };
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!("ublk: {e}"),
            _ => tracing::warn!("the ublk thread ended abnormally"),
        }
        Ok(())
    }
}

/// Re-attaches to the device `dir` served, which a crashed daemon left quiesced in the kernel.
pub fn recover(given: &Path, daemon: Daemon) -> Result<()> {
    let dir =
        given.canonicalize().with_context(|| format!("data directory {}", given.display()))?;
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

/// Refuses to go on without root and the ublk driver.
pub fn require_ublk() -> Result<()> {
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

fn serve_device(
    dir: PathBuf,
    mut record: Record,
    id: Option<u32>,
    recover: bool,
    daemon: Daemon,
) -> Result<()> {
    let Daemon { backend, run_dir, tuning, inflight, cache, readahead, metrics, rebuild_lost } =
        daemon;
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
            replica_dirs: record.replica_dirs.clone(),
            rebuild_lost,
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
        let mut frontend = match Frontend::start(ublk_cfg, recover, device.clone()).await {
            Ok(f) => f,
            Err(err) => {
                device.close();
                embedded.shutdown().await?;
                return Err(err);
            }
        };
        let live = frontend.live.clone();
        record.ublk_id = Some(live.id);
        record.store(&dir)?;
        let served = Arc::new(Served {
            record: record.clone(),
            dir: dir.clone(),
            id: live.id,
            recovered: live.recovered,
            started,
            replicas: status::Replicas::Embedded(embedded.clone()),
            device: device.clone(),
        });
        let socket = start_status_socket(&run_dir, live.id, served.clone()).await;
        if let Some(listener) = metrics {
            let served = served.clone();
            let registry = crate::metrics::registry(Arc::new(move || served.figures()));
            tokio::spawn(crate::metrics::http::serve(listener, Arc::new(registry)));
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
        notify::ready(&format!("serving {} from {}", live.path, dir.display()));
        notify::spawn_watchdog();

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let stopped_by_signal = tokio::select! {
            _ = term.recv() => true,
            _ = int.recv() => true,
            _ = frontend.ended() => false,
        };
        notify::stopping(&format!("stopping {}", live.path));
        if stopped_by_signal {
            eprintln!("xdevice: stopping {}", live.path);
            frontend.stop().await?;
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
