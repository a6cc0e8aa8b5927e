//! `xdevice node` (run one replica as a server) and `xdevice cluster` (manage a cluster through
//! any of its nodes).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::exit::bail_usage;

use super::serve::{check_pipeline, check_queues};
use super::{size, StoreArgs};
use crate::daemon::node::{DeviceShape, NodeRequest};
use crate::device::CacheMode;
use crate::replication::node::RaftTuning;
use crate::replication::types::NodeId;

/// Options of `xdevice node`.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// A TOML configuration file (docs/operations.md); flags and their environment variables
    /// override it.
    #[arg(long, env = "XDEVICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// This replica's node id (unique in the cluster, > 0). Required, here or in --config.
    #[arg(long, env = "XDEVICE_NODE_ID")]
    pub id: Option<NodeId>,
    /// Address to listen on for Raft and client traffic (also the source of outgoing
    /// connections). Required, here or in --config.
    #[arg(long, env = "XDEVICE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where `member.json` is kept, and, for a store on a raw device (--device), where incoming
    /// snapshots are staged; a directory store stages them in its data directory (default: the
    /// data directory).
    #[arg(long, env = "XDEVICE_SNAPSHOT_DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// Serve Prometheus metrics (Raft, replication lag, WAL, fsync latency, and the device's
    /// figures while it is served here) at http://ADDR/metrics, e.g. 127.0.0.1:9478.
    #[arg(long, value_name = "ADDR", env = "XDEVICE_METRICS")]
    pub metrics: Option<SocketAddr>,
    #[command(flatten)]
    pub tuning: TuningArgs,
    #[command(flatten)]
    pub serve: MemberServeArgs,
    /// This member's certificate (node-ID.pem and .key in --tls-dir), or --plaintext.
    #[command(flatten)]
    pub tls: super::TlsArgs,
}

impl NodeArgs {
    /// Takes what the configuration file sets and no flag or variable overrides.
    pub fn apply_config(&mut self, m: &clap::ArgMatches) -> Result<()> {
        use super::config::{self, fill};
        let Some(path) = self.config.clone() else { return Ok(()) };
        let store_given = ["dir", "device"].iter().any(|id| config::is_given(m, id));
        let mut given = Vec::new();
        for (id, key) in [("id", "node.id"), ("listen", "node.listen")] {
            if config::is_given(m, id) {
                given.push(key);
            }
        }
        if store_given {
            given.push("device.dir");
        }
        let c = config::load_for(&path, config::Role::Node, &given)?;
        if !store_given {
            self.store.dir = c.dir.clone();
            self.store.device = c.raw_device.clone();
        }
        fill(m, "name", &mut self.store.name, c.name.clone().map(Some));
        fill(m, "backend", &mut self.store.backend, c.backend.as_deref().and_then(config::backend));
        fill(m, "id", &mut self.id, c.node_id.map(Some));
        fill(m, "listen", &mut self.listen, c.listen.map(Some));
        fill(m, "snapshot_dir", &mut self.snapshot_dir, c.snapshot_dir.clone().map(Some));
        fill(m, "metrics", &mut self.metrics, c.metrics_listen.map(Some));
        let t = &mut self.tls;
        fill(m, "tls_dir", &mut t.tls_dir, c.tls_dir.clone().map(Some));
        fill(m, "tls_ca", &mut t.tls_ca, c.tls_ca.clone().map(Some));
        fill(m, "tls_cert", &mut t.tls_cert, c.tls_cert.clone().map(Some));
        fill(m, "tls_key", &mut t.tls_key, c.tls_key.clone().map(Some));
        fill(m, "plaintext", &mut t.plaintext, c.plaintext);
        self.tuning.apply_config(m, &c);
        let s = &mut self.serve;
        fill(m, "attach", &mut s.attach, c.attach);
        fill(m, "mode", &mut s.mode, c.mode.as_deref().and_then(config::mode));
        fill(m, "queues", &mut s.queues, c.queues.map(|q| q as u16));
        fill(m, "depth", &mut s.depth, c.queue_depth.map(|d| d as u16));
        fill(m, "max_io", &mut s.max_io, c.max_io_bytes);
        fill(m, "ublk_id", &mut s.ublk_id, c.ublk_id.map(|i| Some(i as u32)));
        fill(m, "cache", &mut s.cache, c.cache_bytes);
        fill(m, "readahead", &mut s.readahead, c.readahead_bytes);
        fill(
            m,
            "inflight_proposals",
            &mut s.inflight_proposals,
            c.inflight_proposals.map(|n| n as usize),
        );
        fill(m, "attach_secs", &mut s.attach_secs, c.attach_timeout_secs);
        fill(m, "run_dir", &mut s.run_dir, c.run_dir.clone());
        Ok(())
    }
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
    #[arg(long, value_enum, default_value = "writeback", env = "XDEVICE_MODE")]
    pub mode: CacheMode,
    /// ublk hardware queues (one thread each).
    #[arg(long, default_value_t = 1, env = "XDEVICE_QUEUES")]
    pub queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 64, env = "XDEVICE_DEPTH")]
    pub depth: u16,
    /// Largest READ/WRITE the kernel sends.
    #[arg(long, default_value = "1M", value_parser = size::parse, env = "XDEVICE_MAX_IO")]
    pub max_io: u64,
    /// Device number N of /dev/ublkbN (default: the one this member served before, else the
    /// first free).
    #[arg(long, env = "XDEVICE_UBLK_ID")]
    pub ublk_id: Option<u32>,
    /// Hot cache size.
    #[arg(long, default_value = "256M", value_parser = size::parse, env = "XDEVICE_CACHE")]
    pub cache: u64,
    /// Largest read-ahead window; 0 turns read-ahead off.
    #[arg(long, default_value = "2M", value_parser = size::parse, env = "XDEVICE_READAHEAD")]
    pub readahead: u64,
    /// Proposals in flight.
    #[arg(long, default_value_t = 2, env = "XDEVICE_INFLIGHT_PROPOSALS")]
    pub inflight_proposals: usize,
    /// How long attaching may take, winning leadership included.
    #[arg(long, default_value_t = 30, env = "XDEVICE_ATTACH_SECS")]
    pub attach_secs: u64,
    /// Directory for the status socket of the device while served here.
    #[arg(long, default_value = crate::daemon::DEFAULT_RUN_DIR, env = "XDEVICE_RUN_DIR")]
    pub run_dir: PathBuf,
}

/// Raft timing and log retention, shared by `node` and `serve`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TuningArgs {
    /// Leader heartbeat interval in milliseconds [default: 50].
    #[arg(long, env = "XDEVICE_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Election timeout range in milliseconds, MIN-MAX [default: 150-300]. A follower stands
    /// for election once MAX (openraft's leader lease) plus a random time in the range have
    /// passed without a heartbeat.
    #[arg(long, value_parser = parse_range, env = "XDEVICE_ELECTION_MS")]
    pub election_ms: Option<(u64, u64)>,
    /// Snapshot (checkpoint the image, then purge the log) once the WAL holds this many live
    /// segments [default: the built-in tuning's].
    #[arg(long, env = "XDEVICE_SNAPSHOT_SEGMENTS")]
    pub snapshot_segments: Option<usize>,
    /// Log entries kept below a snapshot, so a follower slightly behind catches up from the log
    /// rather than by snapshot [default: the built-in tuning's].
    #[arg(long, env = "XDEVICE_KEEP_ENTRIES")]
    pub keep_entries: Option<u64>,
}

impl TuningArgs {
    /// Takes what the configuration file sets and no flag or variable overrides.
    pub fn apply_config(&mut self, m: &clap::ArgMatches, c: &super::config::Config) {
        use super::config::fill;
        fill(m, "heartbeat_ms", &mut self.heartbeat_ms, c.heartbeat_ms.map(Some));
        fill(
            m,
            "election_ms",
            &mut self.election_ms,
            c.election_min_ms.zip(c.election_max_ms).map(Some),
        );
        fill(
            m,
            "snapshot_segments",
            &mut self.snapshot_segments,
            c.snapshot_segments.map(|n| Some(n as usize)),
        );
        fill(m, "keep_entries", &mut self.keep_entries, c.keep_entries.map(Some));
    }

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
            bail_usage!(
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
    let Some(id) = args.id else { bail_usage!("--id is required (or node.id in --config)") };
    let Some(listen) = args.listen else {
        bail_usage!("--listen is required (or node.listen in --config)")
    };
    if id == 0 {
        bail_usage!("--id must be greater than 0");
    }
    let tuning = args.tuning.tuning()?;
    let s = &args.serve;
    let max_io = check_queues(s.queues, s.depth, s.max_io)?;
    check_pipeline(s.inflight_proposals, s.cache, s.readahead)?;
    if s.attach_secs == 0 {
        bail_usage!("--attach-secs must be at least 1");
    }
    let state_dir = match (&args.snapshot_dir, &args.store.dir) {
        (Some(d), _) | (None, Some(d)) => super::serve::absolute(d, "--snapshot-dir")?,
        (None, None) => bail_usage!("--snapshot-dir is required with --device"),
    };
    let tls = args.tls.source()?;
    let location = args.store.location(None)?;
    crate::daemon::node::run_node(NodeRequest {
        id,
        tls,
        listen,
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
