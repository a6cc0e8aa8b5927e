//! Prometheus metrics of a serving daemon (`xdevice serve`) and of every node (`xdevice node`),
//! through the `prometheus-client` crate.
//!
//! Two kinds of figure:
//! - **Recorded on the path** (`recorders()`), process-wide: each device request's latency,
//!   bytes and count by kind (recorded where the ublk target answers it), requests in flight,
//!   every data fsync's latency (in the disk backends) and each proposal's time to commit (in
//!   the device pipeline). In the embedded daemon every replica's fsyncs feed the one histogram.
//! - **Read at scrape time** (`Figures`): the device's cache and I/O counters, and per replica
//!   its Raft term, log positions, WAL size, replication lag per follower and incoming snapshot.
//!   The daemon hands a closure that builds them; nothing is computed between scrapes.
//!
//! `http::serve` answers `GET /metrics` with the Prometheus text format. Every name is listed,
//! with its meaning, in `docs/operations.md`.

pub mod http;

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::cache::CacheStats;
use crate::device::{DeviceStats, PipelineStats};
use crate::replication::trail::Lag;

/// The kind of a device request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
}

impl Op {
    fn label(self) -> [(&'static str, &'static str); 1] {
        [(
            "op",
            match self {
                Op::Read => "read",
                Op::Write => "write",
                Op::Flush => "flush",
                Op::Discard => "discard",
            },
        )]
    }
}

type OpLabel = [(&'static str, &'static str); 1];

/// 10 µs to about 10.5 s, doubling: a request answered from the cache at the bottom, a stalled
/// commit at the top.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(10e-6, 2.0, 21))
}

/// The figures recorded on the I/O path, one set per process.
#[derive(Debug)]
pub struct Recorders {
    request_seconds: Family<OpLabel, Histogram, fn() -> Histogram>,
    request_bytes: Family<OpLabel, Counter>,
    requests: Family<OpLabel, Counter>,
    in_flight: Gauge,
    fsync_seconds: Histogram,
    commit_seconds: Histogram,
    /// Each kind's members of the three families, taken from them at its first request (so a
    /// kind never seen is not exported) and kept, so a request takes no family lock.
    by_op: [std::sync::OnceLock<OpMetrics>; 4],
}

/// One kind's latency histogram, request counter and byte counter.
#[derive(Debug)]
struct OpMetrics {
    seconds: Histogram,
    requests: Counter,
    bytes: Counter,
}

static RECORDERS: LazyLock<Recorders> = LazyLock::new(|| Recorders {
    request_seconds: Family::new_with_constructor(latency_histogram),
    request_bytes: Family::default(),
    requests: Family::default(),
    by_op: Default::default(),
    in_flight: Gauge::default(),
    fsync_seconds: latency_histogram(),
    commit_seconds: latency_histogram(),
});

/// This process's recorders.
pub fn recorders() -> &'static Recorders {
    &RECORDERS
}

impl Recorders {
    /// A device request arrived.
    pub fn request_started(&self) {
        self.in_flight.inc();
    }

    /// A device request of `op` moving `bytes`, started at `started`, was answered.
    pub fn request_done(&self, op: Op, started: Instant, bytes: u64) {
        let m = self.by_op[op as usize].get_or_init(|| {
            let label = op.label();
            OpMetrics {
                seconds: self.request_seconds.get_or_create_owned(&label),
                requests: self.requests.get_or_create_owned(&label),
                bytes: self.request_bytes.get_or_create_owned(&label),
            }
        });
        m.seconds.observe(started.elapsed().as_secs_f64());
        m.requests.inc();
        m.bytes.inc_by(bytes);
        self.in_flight.dec();
    }

    /// A data fsync started at `started` returned.
    pub fn fsync_done(&self, started: Instant) {
        self.fsync_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// A proposal handed to the leader at `started` committed.
    pub fn commit_done(&self, started: Instant) {
        self.commit_seconds.observe(started.elapsed().as_secs_f64());
    }
}

/// What the daemon reports at each scrape.
#[derive(Debug, Default)]
pub struct Figures {
    /// The device, while this process serves it.
    pub device: Option<DeviceFigures>,
    /// The replicas running in this process.
    pub replicas: Vec<ReplicaFigures>,
}

#[derive(Debug)]
pub struct DeviceFigures {
    /// The kernel's name, `ublkbN`.
    pub name: String,
    pub size_bytes: u64,
    pub io: DeviceStats,
    pub pipeline: PipelineStats,
    pub cache: CacheStats,
}

#[derive(Debug, Default)]
pub struct ReplicaFigures {
    pub id: u64,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub committed: Option<u64>,
    pub applied: Option<u64>,
    pub snapshot: Option<u64>,
    pub wal_segments: u64,
    pub wal_bytes: u64,
    /// On a leader: how far behind each follower and learner is.
    pub lag: Vec<(u64, Lag)>,
    /// The snapshot being received: (bytes received, bytes in all).
    pub snapshot_in: Option<(u64, u64)>,
    pub snapshots_installed: u64,
}

/// A registry holding this process's recorders, build information, and `figures()` read at
/// each scrape.
pub fn registry(figures: Arc<dyn Fn() -> Figures + Send + Sync>) -> Registry {
    let r = recorders();
    let mut reg = Registry::with_prefix("xdevice");
    reg.register(
        "request_duration_seconds",
        "Device requests from arrival to answer, by kind",
        r.request_seconds.clone(),
    );
    reg.register("requests", "Device requests answered, by kind", r.requests.clone());
    reg.register(
        "request_bytes",
        "Bytes of device requests answered, by kind (0 for flushes)",
        r.request_bytes.clone(),
    );
    reg.register(
        "requests_in_flight",
        "Device requests received and not yet answered (queue depth)",
        r.in_flight.clone(),
    );
    reg.register(
        "fsync_duration_seconds",
        "Data syncs (fdatasync) of the stores in this process",
        r.fsync_seconds.clone(),
    );
    reg.register(
        "commit_duration_seconds",
        "Proposals from being handed to the leader to committed on a majority",
        r.commit_seconds.clone(),
    );
    reg.register_collector(Box::new(Scrape(figures)));
    reg
}

/// The registry in the Prometheus text format.
pub fn render(reg: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, reg);
    out
}

struct Scrape(Arc<dyn Fn() -> Figures + Send + Sync>);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: its samples, each with its labels.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(Labels, f64)],
) -> std::fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let m = metric.encode_family(labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*value).encode(m)?,
            _ => ConstGauge::new(*value).encode(m)?,
        }
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let f = (self.0)();
        let gauge = MetricType::Gauge;
        let counter = MetricType::Counter;
        let version = vec![("version", env!("CARGO_PKG_VERSION").to_string())];
        family(&mut enc, "build_info", "The running build (always 1)", gauge, &[(version, 1.0)])?;
        if let Some(d) = &f.device {
            let dev = || vec![("device", d.name.clone())];
            let one = |v: u64| [(dev(), v as f64)];
            let c = &d.cache;
            let io = &d.io;
            let p = &d.pipeline;
            for (name, help, kind, v) in [
                ("device_size_bytes", "Size of the served device", gauge, d.size_bytes),
                ("cache_capacity_bytes", "Hot cache size", gauge, c.capacity_bytes),
                (
                    "cache_resident_bytes",
                    "Block bytes the hot cache holds",
                    gauge,
                    c.resident_bytes,
                ),
                (
                    "cache_pinned_bytes",
                    "Bytes of writes held until committed",
                    gauge,
                    c.pinned_bytes,
                ),
                ("cache_hits", "Blocks read from the hot cache", counter, c.hits),
                ("cache_misses", "Blocks read from a replica", counter, c.misses),
                ("cache_evictions", "Clean blocks evicted", counter, c.evictions),
                ("cache_readahead_blocks", "Blocks read ahead", counter, c.readahead_blocks),
                ("writes", "Write requests taken into the pipeline", counter, io.writes),
                ("flushes", "Flush requests", counter, io.flushes),
                ("reads", "Read requests", counter, io.reads),
                ("proposals", "Proposals handed to the leader", counter, io.proposals),
                (
                    "resubmissions",
                    "Writes proposed again after a lost proposal",
                    counter,
                    io.resubmissions,
                ),
                (
                    "corrupt_blocks",
                    "Blocks that failed their checksum when read",
                    counter,
                    io.corrupt_blocks,
                ),
                (
                    "repaired_blocks",
                    "Damaged blocks rewritten from another replica",
                    counter,
                    io.repaired_blocks,
                ),
                (
                    "unconfirmed_bytes",
                    "Bytes written and not yet committed",
                    gauge,
                    p.unconfirmed_bytes as u64,
                ),
                (
                    "inflight_proposals",
                    "Proposals handed to the leader, not yet committed",
                    gauge,
                    p.inflight_proposals as u64,
                ),
            ] {
                family(&mut enc, name, help, kind, &one(v))?;
            }
        }
        let per = |v: &dyn Fn(&ReplicaFigures) -> Option<u64>| {
            f.replicas
                .iter()
                .filter_map(|r| v(r).map(|v| (vec![("replica", r.id.to_string())], v as f64)))
                .collect::<Vec<_>>()
        };
        type Read<'a> = &'a dyn Fn(&ReplicaFigures) -> Option<u64>;
        let replica_families: [(&str, &str, Read); 10] = [
            ("raft_term", "Raft term", &|r| Some(r.term)),
            ("raft_leader", "The leader this replica knows (0: none)", &|r| {
                Some(r.leader.unwrap_or(0))
            }),
            ("raft_is_leader", "1 on the leader", &|r| Some(u64::from(r.leader == Some(r.id)))),
            ("raft_last_log_index", "Last log index", &|r| Some(r.last_log_index.unwrap_or(0))),
            ("raft_commit_index", "Highest index known committed", &|r| {
                Some(r.committed.unwrap_or(0))
            }),
            ("raft_applied_index", "Highest index applied to the image", &|r| {
                Some(r.applied.unwrap_or(0))
            }),
            ("raft_snapshot_index", "Index of the last snapshot", &|r| {
                Some(r.snapshot.unwrap_or(0))
            }),
            ("wal_segments", "Live WAL segments", &|r| Some(r.wal_segments)),
            ("wal_bytes", "Space the live WAL segments take", &|r| Some(r.wal_bytes)),
            ("snapshot_receive_bytes", "Bytes of the incoming snapshot received", &|r| {
                r.snapshot_in.map(|s| s.0)
            }),
        ];
        for (name, help, v) in replica_families {
            family(&mut enc, name, help, gauge, &per(v))?;
        }
        family(
            &mut enc,
            "snapshot_receive_total_bytes",
            "Size of the incoming snapshot",
            gauge,
            &per(&|r| r.snapshot_in.map(|s| s.1)),
        )?;
        family(
            &mut enc,
            "snapshots_installed",
            "Snapshots installed since the process started",
            counter,
            &per(&|r| Some(r.snapshots_installed)),
        )?;
        let lag = |v: &dyn Fn(&Lag) -> f64| {
            f.replicas
                .iter()
                .flat_map(|r| {
                    r.lag.iter().map(move |(follower, l)| {
                        (
                            vec![("replica", r.id.to_string()), ("follower", follower.to_string())],
                            v(l),
                        )
                    })
                })
                .collect::<Vec<_>>()
        };
        for (name, help, v) in [
            (
                "replication_lag_entries",
                "Log entries the follower lacks (on the leader)",
                &(|l: &Lag| l.entries as f64) as &dyn Fn(&Lag) -> f64,
            ),
            (
                "replication_lag_bytes",
                "Entry bytes the follower lacks (on the leader)",
                &|l: &Lag| l.bytes as f64,
            ),
            (
                "replication_lag_seconds",
                "Age of the oldest entry the follower lacks (on the leader)",
                &|l: &Lag| l.seconds,
            ),
        ] {
            family(&mut enc, name, help, gauge, &lag(v))?;
        }
        Ok(())
    }
}
