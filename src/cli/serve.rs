//! `xdevice serve`, `xdevice recover` and `xdevice status`: their flags, checked before anything
//! is touched (so a bad flag is named even where ublk is missing), and what `status` prints. The
//! daemon itself is `crate::daemon`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use clap::ArgMatches;

use crate::cli::config::{self, fill, Config};
use crate::cli::exit::{bail_usage, usage};
use crate::cli::node::TuningArgs;
use crate::cli::size;
use crate::daemon::{self, Daemon, ServeRequest, DEFAULT_RUN_DIR};
use crate::device::CacheMode;
use crate::storage::disk::Backend;

pub use crate::daemon::record::udev_name;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// A TOML configuration file (docs/operations.md); flags and their environment variables
    /// override it.
    #[arg(long, env = "XDEVICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory: one subdirectory per replica, and serve.json.
    #[arg(long, default_value = "/var/lib/xdevice/xdb0", env = "XDEVICE_DIR")]
    pub dir: PathBuf,
    /// Device size for a new store (e.g. 1G); an existing store keeps its size.
    #[arg(long, value_parser = size::parse, env = "XDEVICE_SIZE")]
    pub size: Option<u64>,
    /// Replicas in this process (a new store; an existing one keeps its count).
    #[arg(long, env = "XDEVICE_REPLICAS")]
    pub replicas: Option<u64>,
    /// writeback: volatile cache + FUA advertised, plain writes complete once the leader has
    /// them, FLUSH/FUA once committed on a majority. writethrough: every write completes once
    /// committed on a majority.
    #[arg(long, value_enum, env = "XDEVICE_MODE")]
    pub mode: Option<CacheMode>,
    /// ublk hardware queues (one thread each).
    #[arg(long, default_value_t = 1, env = "XDEVICE_QUEUES")]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 64, env = "XDEVICE_DEPTH")]
    pub depth: u16,
    /// Largest READ/WRITE the kernel sends (larger ones are split by the block layer).
    #[arg(long, default_value = "1M", value_parser = size::parse, env = "XDEVICE_MAX_IO")]
    pub max_io: u64,
    /// Device number N of /dev/ublkbN (default: the one recorded in --dir, else the first free).
    #[arg(long, env = "XDEVICE_UBLK_ID")]
    pub id: Option<u32>,
    /// A replica's data directory, once per replica in replica order, each on its own disk so
    /// the device survives the loss of one (default: --dir/replica-N). Recorded in
    /// serve.json when the device is made; later runs may leave it out, not change it.
    #[arg(long = "replica-dir", value_name = "DIR")]
    pub replica_dirs: Vec<PathBuf>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

/// How the daemon runs, for `serve` and `recover` alike.
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// I/O backend of the replicas' stores.
    #[arg(long, default_value = "uring", env = "XDEVICE_BACKEND")]
    pub backend: Backend,
    /// Directory for the status socket.
    #[arg(long, default_value = DEFAULT_RUN_DIR, env = "XDEVICE_RUN_DIR")]
    pub run_dir: PathBuf,
    #[command(flatten)]
    pub tuning: TuningArgs,
    /// Proposals in flight (handed to the leader, not yet committed); writes arriving meanwhile
    /// merge into the next one.
    #[arg(long, default_value_t = 2, env = "XDEVICE_INFLIGHT_PROPOSALS")]
    pub inflight_proposals: usize,
    /// Hot cache size: unconfirmed writes stay pinned in it (writers wait when they would not
    /// fit), recent and hot blocks stay clean until evicted (S3-FIFO). At least 16M.
    #[arg(long, default_value = "256M", value_parser = size::parse, env = "XDEVICE_CACHE")]
    pub cache: u64,
    /// Largest read-ahead window for a sequential reader; 0 turns read-ahead off.
    #[arg(long, default_value = "2M", value_parser = size::parse, env = "XDEVICE_READAHEAD")]
    pub readahead: u64,
    /// Serve Prometheus metrics (cache, I/O, replicas) at http://ADDR/metrics, e.g.
    /// 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR", env = "XDEVICE_METRICS")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Rebuild a replica whose store is gone (a lost disk) from the others, under a new node id,
    /// while a majority of the replicas remain. Without it such a start is refused: a disk that
    /// is only not mounted looks the same as a lost one.
    #[arg(long)]
    pub rebuild: bool,
}

/// Checks the device pipeline's flags, for `serve`, `recover` and `node` alike.
pub(crate) fn check_pipeline(inflight: usize, cache: u64, readahead: u64) -> Result<()> {
    if inflight == 0 {
        bail_usage!("--inflight-proposals must be at least 1");
    }
    if cache < crate::cache::MIN_CACHE_BYTES {
        bail_usage!(
            "--cache {cache} is too small: at least {} MiB (two of the largest proposals pinned)",
            crate::cache::MIN_CACHE_BYTES >> 20
        );
    }
    if readahead > cache / 4 {
        bail_usage!("--readahead {readahead} is more than a quarter of --cache {cache}");
    }
    Ok(())
}

/// Checks the ublk queue shape's flags; the largest I/O as the kernel takes it.
pub(crate) fn check_queues(queues: u16, depth: u16, max_io: u64) -> Result<u32> {
    let max_io = u32::try_from(max_io)
        .ok()
        .filter(|m| (4096..=(8 << 20)).contains(m) && m % 4096 == 0)
        .ok_or_else(|| usage(format!("--max-io {max_io} must be a multiple of 4096 in 4K..=8M")))?;
    if queues == 0 || depth == 0 || depth > 4096 {
        bail_usage!("--queues must be at least 1 and --depth in 1..=4096");
    }
    Ok(max_io)
}

impl DaemonArgs {
    fn daemon(&self) -> Result<Daemon> {
        check_pipeline(self.inflight_proposals, self.cache, self.readahead)?;
        Ok(Daemon {
            backend: self.backend,
            run_dir: self.run_dir.clone(),
            tuning: self.tuning.tuning()?,
            inflight: self.inflight_proposals,
            cache: self.cache,
            readahead: self.readahead,
            metrics: self.metrics,
            rebuild_lost: self.rebuild,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct RecoverArgs {
    /// A TOML configuration file; flags and their environment variables override it.
    #[arg(long, env = "XDEVICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data directory the crashed daemon served from.
    #[arg(long, default_value = "/var/lib/xdevice/xdb0", env = "XDEVICE_DIR")]
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

impl ServeArgs {
    /// Takes what the configuration file sets and no flag or variable overrides.
    pub fn apply_config(&mut self, m: &ArgMatches) -> Result<()> {
        let Some(path) = self.config.clone() else { return Ok(()) };
        let c = config::load_for(&path, config::Role::Serve, &[])?;
        fill(m, "dir", &mut self.dir, c.dir.clone());
        fill(m, "size", &mut self.size, c.size_bytes.map(Some));
        fill(m, "replicas", &mut self.replicas, c.replicas.map(Some));
        fill(m, "mode", &mut self.mode, c.mode.as_deref().map(config::mode));
        fill(m, "queues", &mut self.queues, c.queues.map(|q| q as u16));
        fill(m, "depth", &mut self.depth, c.queue_depth.map(|d| d as u16));
        fill(m, "max_io", &mut self.max_io, c.max_io_bytes);
        fill(m, "id", &mut self.id, c.ublk_id.map(|i| Some(i as u32)));
        fill(m, "replica_dirs", &mut self.replica_dirs, c.replica_dirs.clone());
        self.daemon.apply_config(m, &c);
        Ok(())
    }
}

impl RecoverArgs {
    /// Takes what the configuration file sets and no flag or variable overrides.
    pub fn apply_config(&mut self, m: &ArgMatches) -> Result<()> {
        let Some(path) = self.config.clone() else { return Ok(()) };
        let c = config::load_for(&path, config::Role::Serve, &[])?;
        fill(m, "dir", &mut self.dir, c.dir.clone());
        self.daemon.apply_config(m, &c);
        Ok(())
    }
}

impl DaemonArgs {
    fn apply_config(&mut self, m: &ArgMatches, c: &Config) {
        fill(m, "backend", &mut self.backend, c.backend.as_deref().and_then(config::backend));
        fill(m, "run_dir", &mut self.run_dir, c.run_dir.clone());
        fill(
            m,
            "inflight_proposals",
            &mut self.inflight_proposals,
            c.inflight_proposals.map(|n| n as usize),
        );
        fill(m, "cache", &mut self.cache, c.cache_bytes);
        fill(m, "readahead", &mut self.readahead, c.readahead_bytes);
        fill(m, "metrics", &mut self.metrics, c.metrics_listen.map(Some));
        self.tuning.apply_config(m, c);
    }
}

/// `xdevice serve`.
pub fn run_serve(args: ServeArgs) -> Result<()> {
    // Everything that can be checked without the kernel is checked first, so a bad flag or
    // record is named even where ublk is missing.
    let daemon = args.daemon.daemon()?;
    if args.replicas == Some(0) {
        bail_usage!("--replicas must be at least 1");
    }
    let max_io = check_queues(args.queues, args.depth, args.max_io)?;
    if let Some(size) = args.size {
        if size == 0 || size % 4096 != 0 {
            bail_usage!("--size {size} must be a positive multiple of the 4096-byte block");
        }
    }
    let replica_dirs = args
        .replica_dirs
        .iter()
        .map(|d| {
            std::path::absolute(d).map_err(|e| usage(format!("--replica-dir {}: {e}", d.display())))
        })
        .collect::<Result<Vec<_>>>()?;
    if let (Some(n), false) = (args.replicas, replica_dirs.is_empty()) {
        if replica_dirs.len() as u64 != n {
            bail_usage!(
                "{} --replica-dir given for --replicas {n}: give one per replica",
                replica_dirs.len()
            );
        }
    }
    for (i, d) in replica_dirs.iter().enumerate() {
        if replica_dirs[..i].contains(d) {
            bail_usage!("--replica-dir {} is given twice: each replica needs its own", d.display());
        }
    }
    daemon::serve(
        ServeRequest {
            // Absolute: the device's owner record names it, and udev names the device by it.
            dir: absolute(&args.dir, "--dir")?,
            size: args.size,
            replicas: args.replicas,
            mode: args.mode,
            queues: args.queues,
            depth: args.depth,
            max_io,
            id: args.id,
            replica_dirs,
        },
        daemon,
    )
}

/// `path` made absolute and lexically normal (`.` and `..` folded, links not resolved: a data
/// directory is recorded, and udev names its device, by the path the operator sees), or a usage
/// error naming `flag`.
pub(crate) fn absolute(path: &std::path::Path, flag: &str) -> Result<PathBuf> {
    let abs =
        std::path::absolute(path).map_err(|e| usage(format!("{flag} {}: {e}", path.display())))?;
    Ok(normal(&abs))
}

/// `path` (absolute) with `.` and `..` folded away.
pub fn normal(path: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// `xdevice recover`.
pub fn run_recover(args: RecoverArgs) -> Result<()> {
    let daemon = args.daemon.daemon()?;
    daemon::recover(&absolute(&args.dir, "--dir")?, daemon)
}

/// Some daemons' status sockets did not answer: `xdevice status` exits with
/// `UNREACHABLE_EXIT` (after printing what it has), so a script or a health check sees it.
#[derive(Debug, thiserror::Error)]
#[error("{0} status socket(s) did not answer (a daemon that died leaves its socket)")]
pub struct Unreachable(pub usize);

/// The exit status of `xdevice status` when a daemon did not answer.
pub const UNREACHABLE_EXIT: i32 = 3;

/// `xdevice status`.
pub fn run_status(args: StatusArgs) -> Result<()> {
    let (devices, problems) = daemon::status::query(&args.run_dir)?;
    let outcome =
        if problems.is_empty() { Ok(()) } else { Err(Unreachable(problems.len()).into()) };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "devices": devices, "unreachable": problems })
            )?
        );
        return outcome;
    }
    if devices.is_empty() && problems.is_empty() {
        println!("no xdevice daemons running (no sockets in {})", args.run_dir.display());
    }
    for d in &devices {
        println!(
            "{}  {}  {}  {} MiB  block {}  {} queue(s) x {}  pid {}  up {:.0}s{}",
            d.path,
            d.state,
            match d.mode {
                CacheMode::Writeback => "writeback",
                CacheMode::Writethrough => "writethrough",
            },
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
        println!(
            "  {:<8} {:<10} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "REPLICA", "ROLE", "TERM", "LOG", "COMMITTED", "APPLIED", "SNAPSHOT", "MATCHED"
        );
        for r in &d.replicas {
            let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
            println!(
                "  {:<8} {:<10} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9}",
                r.id,
                r.role.to_lowercase(),
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
        let field = |k: &str| p[k].as_str().unwrap_or("-").to_string();
        eprintln!(
            "unreachable: {} (device {}, driver state {}): {}",
            field("socket"),
            field("device"),
            field("driver_state"),
            field("error")
        );
    }
    outcome
}
