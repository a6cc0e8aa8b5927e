//! `replicated-commit`: commit latency of an 8 KiB write + flush on three replicas, one writer,
//! against fio's 8 KiB write + fdatasync p50 plus a measured TCP round trip p50 on loopback
//! (goal: p50 ≤ 1.3×); and write + flush pairs per second with 64 concurrent writers,
//! beside the fdatasyncs per second of the same disk.
//!
//! Three `xdevice node` processes run on 127.0.0.1, .2 and .3, each with a freshly formatted
//! 1 GiB store (default 64 MiB segments) in the scratch directory, started and initialised the way
//! `tests/cluster_process.rs` does it. The client is this process: `RemoteCluster` under a
//! writeback `Device`. One writer loops { `write` 8 KiB of random bytes at the next offset;
//! `flush` } and times each pair: with one writer that is one Raft entry, committed (durable on a
//! majority) and applied on the leader before the pair returns.
//!
//! References, in the same run, on the same file system:
//! - fio's 8 KiB write + fdatasync job (`common::fio_append_args`, the wal-append reference) on
//!   a fresh fallocated file, as the nodes' segments are (they are not zero-filled); the same on a
//!   prewritten file beside it. p50 = fio's write p50 + fdatasync p50; its IOPS are the
//!   fdatasyncs per second the throughput is set against, as in group-commit.
//! - beside it, the shape of a node's WAL commit: 8 KiB `pwrite` with O_DIRECT + `fdatasync` on a
//!   fresh fallocated file, timed per pair in this process.
//! - the TCP round trip: an 8 KiB request and a 64-byte reply ping-ponged over one loopback
//!   connection with TCP_NODELAY between two threads of this process, which is what one
//!   replicated append costs on the wire. Beside it (not part of the reference) the same round
//!   trip through xdevice's own RPC layer (`net::RpcClient`/`RpcServer`), to show what framing
//!   and the async runtime add.
//!
//! The headline ratio is xdevice p50 ÷ (fio p50 + TCP p50). The client runs in another process
//! than the leader, so a commit crosses two round trips (client → leader, leader → followers)
//! besides the syncs.
//!
//! Phases run interleaved in rounds with a rotating order and are pooled over the rounds, like
//! the other benchmarks, because the disk's flush latency drifts by an order of magnitude over
//! minutes. The cluster stays up across rounds, and every reference file stays until the end
//! (about 6.5 GiB with the defaults), so no deletion (a discard, on file systems mounted with
//! `discard` as the test machines are) lands inside a measured phase. Where a one-writer commit's
//! time goes is traced in `docs/benchmarks.md`.
//!
//! Settings: `XDEVICE_BENCH_SAMPLES` (write + flush pairs timed per round; also the O_DIRECT and
//! TCP samples; default 2000), `XDEVICE_BENCH_SECONDS` (each fio and throughput phase, each
//! round; default 5), `XDEVICE_BENCH_ROUNDS` (default 3), `XDEVICE_BENCH_DIR` or `--dir PATH`
//! (where the scratch directory is made; default the repository's `target/bench-tmp`),
//! `XDEVICE_BENCH_BACKEND` (the nodes' `--backend`, default `uring`), `XDEVICE_BENCH_PHASES` (for
//! diagnosis: a comma-separated subset of `fio,direct,tcp,latency,rpc,fio-prewritten,throughput`;
//! figures whose phases did not run are reported as null).

#[path = "common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use common::{FioSide, LatencySide, Machine, Report, Samples};
use xdevice::device::remote::RemoteCluster;
use xdevice::device::{CacheMode, Device, DeviceConfig};
use xdevice::net::rpc::{admitted, Admission};
use xdevice::net::tls::{create_dev, Identity, TlsSource};
use xdevice::net::{Caller, ClientOptions, Handler, RpcClient, RpcServer, Security};
use xdevice::replication::tcp::{Admin, AdminReply, NodeClient, NodeStatus};

const BENCH: &str = "replicated-commit";
const WRITE_BYTES: usize = 8192;
const GOAL: f64 = 1.3;
/// 64 writers' write + flush pairs per second against one writer's fdatasyncs per second (fio).
const TPUT_GOAL: f64 = 10.0;
const DEVICE_BYTES: u64 = 1 << 30;
const BLOCK_BYTES: u32 = 4096;
const NODES: u64 = 3;
const WRITERS: usize = 64;
/// Bytes of the reply in the TCP round-trip reference (an append's acknowledgement is small).
const REPLY_BYTES: usize = 64;
/// Untimed pairs (and round trips) before each latency phase.
const WARMUP_OPS: usize = 200;
/// Time the throughput phase runs before its measured window opens.
const WARMUP: Duration = Duration::from_millis(500);
/// Longest a single RPC to a node may take during setup.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Fio { prewritten: bool },
    Direct,
    TcpRtt,
    RpcRtt,
    Latency,
    Throughput,
}

/// Pooled figures of the 64-writer phase.
#[derive(Debug, Default)]
struct ThroughputSide {
    seconds: f64,
    pairs: u64,
    proposals: u64,
    entries: u64,
    /// Proposals in flight: the sum and count of the per-millisecond samples, and the most seen.
    inflight_sum: u64,
    inflight_samples: u64,
    inflight_max: usize,
    latency: Samples,
    rounds: Vec<Value>,
}

impl ThroughputSide {
    fn mean_inflight(&self) -> f64 {
        self.inflight_sum as f64 / self.inflight_samples.max(1) as f64
    }
    fn pairs_per_s(&self) -> f64 {
        self.pairs as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
    fn mib_per_s(&self) -> f64 {
        self.pairs_per_s() * WRITE_BYTES as f64 / (1 << 20) as f64
    }
}

fn main() -> Result<()> {
    let samples = common::env_usize("XDEVICE_BENCH_SAMPLES", 2000)?;
    let seconds = common::env_f64("XDEVICE_BENCH_SECONDS", 5.0)?;
    let rounds = common::env_usize("XDEVICE_BENCH_ROUNDS", 3)?;
    let backend = std::env::var("XDEVICE_BENCH_BACKEND").unwrap_or_else(|_| "uring".into());
    let scratch = scratch_dir()?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    println!(
        "workload: {NODES} `xdevice node` processes on 127.0.0.1-{NODES} (store {} GiB, default \
         segments, --backend {backend}, {}); client RemoteCluster + writeback Device in this \
         process",
        DEVICE_BYTES >> 30,
        if plaintext() { "plaintext" } else { "mutual TLS" }
    );
    println!(
        "latency: one writer, {WRITE_BYTES}-byte random write + flush, {samples} pairs per round \
         after {WARMUP_OPS} warm-up; throughput: {WRITERS} writers at disjoint offsets, {seconds} \
         s per round after {} ms warm-up; {rounds} rounds, phase order rotated",
        WARMUP.as_millis()
    );
    println!(
        "reference p50 = fio write p50 + fio fdatasync p50 (fresh file) + TCP round-trip p50 \
         ({WRITE_BYTES}-byte request, {REPLY_BYTES}-byte reply, 127.0.0.1, TCP_NODELAY); an \
         O_DIRECT pwrite + fdatasync loop beside it"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build the client runtime")?;
    let mut cluster = rt.block_on(Cluster::start(scratch.path(), &backend))?;
    println!(
        "cluster {} up: leader node {} ({}); node logs in {}",
        cluster.id,
        cluster.leader,
        cluster.procs[(cluster.leader - 1) as usize].addr,
        scratch.path().display()
    );
    let status_before = rt.block_on(cluster.leader_status())?;
    let device = {
        let _guard = rt.enter();
        let remote = RemoteCluster::new(
            &cluster.addrs(),
            None,
            cluster.id,
            &cluster.security,
            Duration::from_secs(10),
        );
        let mut cfg = DeviceConfig::new(
            BLOCK_BYTES,
            DEVICE_BYTES / u64::from(BLOCK_BYTES),
            CacheMode::Writeback,
        );
        cfg.io_timeout = Duration::from_secs(60);
        Device::start(cfg, remote)
    };
    let payloads = common::random_payloads(256, WRITE_BYTES, 0x3c0a);

    let phases = phases()?;
    let mut fio = FioSide::default();
    let mut fio_pre = FioSide::default();
    let mut direct = LatencySide::default();
    let mut tcp = LatencySide::default();
    let mut rpc = LatencySide::default();
    let mut rpc_tls = LatencySide::default();
    let mut xdev = LatencySide::default();
    let mut tput = ThroughputSide::default();
    let mut next_offset = 0u64;
    let bar = common::RoundsBar::new(BENCH, rounds);
    for round in 0..rounds {
        let mut line = format!("round {}/{rounds}:", round + 1);
        for i in 0..phases.len() {
            bar.phase(format_args!("{:?}", phases[(i + round) % phases.len()]));
            let phase = phases[(i + round) % phases.len()];
            match phase {
                Phase::Fio { prewritten } => {
                    let side = if prewritten { &mut fio_pre } else { &mut fio };
                    let (p50, iops) =
                        common::fio_phase(side, scratch.path(), round, seconds, prewritten)?;
                    let name = if prewritten { "fio-prewritten" } else { "fio" };
                    line += &format!(" {name} p50 {p50:.0}us ({iops:.0}/s);");
                }
                Phase::Direct => {
                    let file = scratch.path().join(format!("direct-r{round}"));
                    let p50 = direct.add(
                        common::direct_syncs(&file, WARMUP_OPS, samples, &payloads, false)?,
                        json!({}),
                    );
                    line += &format!(" direct p50 {p50:.0}us;");
                }
                Phase::TcpRtt => {
                    let p50 = tcp.add(tcp_round_trips(samples)?, json!({}));
                    line += &format!(" tcp p50 {p50:.0}us;");
                }
                Phase::RpcRtt => {
                    let got = rt.block_on(rpc_round_trips(samples, false))?;
                    let p50 = rpc.add(got, json!({}));
                    let got = rt.block_on(rpc_round_trips(samples, true))?;
                    let p50_tls = rpc_tls.add(got, json!({}));
                    line += &format!(" rpc p50 {p50:.0}us, over TLS {p50_tls:.0}us;");
                }
                Phase::Latency => {
                    let before = device.stats();
                    let got =
                        rt.block_on(one_writer(&device, samples, &payloads, &mut next_offset))?;
                    let after = device.stats();
                    let proposals = after.proposals - before.proposals;
                    let p50 = xdev.add(got, json!({ "proposals": proposals }));
                    line += &format!(" xdevice p50 {p50:.0}us;");
                }
                Phase::Throughput => {
                    let rate =
                        rt.block_on(throughput(&device, &cluster, seconds, &payloads, &mut tput))?;
                    line += &format!(" {WRITERS} writers {rate:.0}/s;");
                }
            }
            cluster.check_alive()?;
            std::io::stdout().flush().ok();
        }
        bar.round_done();
        println!("{line}");
    }
    bar.finish();
    let status_after = rt.block_on(cluster.leader_status())?;
    device.close();

    let tcp_p50 = tcp.p50();
    let reference = fio.p50() + tcp_p50;
    let reference_p99 = fio.p99() + tcp.p99();
    let x_p50 = xdev.p50();
    let x_p99 = xdev.p99();
    let ratio = x_p50 / reference;
    let ratio_p99 = x_p99 / reference_p99;
    let ratio_pre = x_p50 / (fio_pre.p50() + tcp_p50);
    let ratio_direct = x_p50 / (direct.p50() + tcp_p50);

    println!();
    println!("pooled over {rounds} rounds (latency in µs; fio rows are write + fdatasync):");
    let mut rows = Vec::new();
    for (name, side) in [("fio write+fdatasync", &fio), ("fio, pre-written file", &fio_pre)] {
        rows.push(vec![
            name.to_string(),
            side.write.count().to_string(),
            format!(
                "{} ({}+{})",
                common::us(side.p50()),
                common::us(side.write.quantile_us(0.5)),
                common::us(side.sync.quantile_us(0.5))
            ),
            common::us(side.p99()),
            common::us(side.mean()),
            "".into(),
        ]);
    }
    for (name, side) in [
        ("pwrite+fdatasync, O_DIRECT", &mut direct),
        ("TCP round trip 8 KiB/64 B", &mut tcp),
        ("xdevice RPC round trip", &mut rpc),
    ] {
        rows.push(side.row(name, String::new()));
    }
    let tls_cost = rpc_tls.p50() / rpc.p50();
    rows.push(rpc_tls.row("xdevice RPC round trip, TLS", format!("{tls_cost:.2}× plaintext")));
    rows.push(vec![
        "reference: fio + TCP".into(),
        "".into(),
        common::us(reference),
        common::us(reference_p99),
        common::us(fio.mean() + tcp.samples.mean_us()),
        "1.00".into(),
    ]);
    rows.push(xdev.row("xdevice write+flush, 3 nodes", format!("{ratio:.2} (p99 {ratio_p99:.2})")));
    common::print_table(&["", "samples", "p50", "p99", "mean", "÷ reference"], &rows);
    println!(
        "p50 ratio {ratio:.3} (goal ≤ {GOAL}: {}); p99 ratio {ratio_p99:.3}; with the \
         pre-written fio file instead {ratio_pre:.3}, with the O_DIRECT loop instead \
         {ratio_direct:.3}",
        if ratio <= GOAL { "met" } else { "missed" }
    );

    println!();
    let direct_per_s = direct.samples.len() as f64 / (direct.samples.total_us() / 1e6);
    println!(
        "throughput, {WRITERS} writers (pooled over {rounds} rounds; durable 8 KiB writes/s of one \
         writer: fio {:.0} fresh file, {:.0} pre-written, O_DIRECT loop {direct_per_s:.0}):",
        fio.per_s(),
        fio_pre.per_s()
    );
    let tput_ratio = tput.pairs_per_s() / fio.per_s();
    common::print_table(
        &[
            "writers",
            "pairs/s",
            "MiB/s",
            "p50 µs",
            "p99 µs",
            "writes/entry",
            "in flight mean/max",
            "÷ fio/s",
            "÷ pre-written",
            "÷ O_DIRECT/s",
        ],
        &[vec![
            WRITERS.to_string(),
            format!("{:.0}", tput.pairs_per_s()),
            format!("{:.1}", tput.mib_per_s()),
            format!("{:.0}", tput.latency.quantile_us(0.5)),
            format!("{:.0}", tput.latency.quantile_us(0.99)),
            format!("{:.1}", tput.pairs as f64 / tput.entries.max(1) as f64),
            format!("{:.2}/{}", tput.mean_inflight(), tput.inflight_max),
            format!("{tput_ratio:.2}"),
            format!("{:.2}", tput.pairs_per_s() / fio_pre.per_s()),
            format!("{:.2}", tput.pairs_per_s() / direct_per_s),
        ]],
    );
    println!(
        "{WRITERS} writers: {tput_ratio:.2}× one writer's fdatasyncs/s (goal ≥ {TPUT_GOAL}: {}); \
         up to {} proposals in flight (the device's max_inflight_proposals)",
        if tput_ratio >= TPUT_GOAL { "met" } else { "missed" },
        DeviceConfig::new(BLOCK_BYTES, 1, CacheMode::Writeback).max_inflight_proposals
    );
    println!(
        "leader term {} → {}, leader node {:?} → {:?}",
        status_before.term, status_after.term, status_before.leader, status_after.leader
    );
    println!("fio commands (first round; the file name changes each round):");
    println!("  {}", fio.command.as_deref().unwrap_or(""));
    println!("  {}", fio_pre.command.as_deref().unwrap_or(""));

    let report = Report {
        bench: BENCH.into(),
        metric: "p50 latency of an 8 KiB write + flush committed on 3 replicas, µs (xdevice ÷ \
                 fio write p50 + fdatasync p50 + TCP round-trip p50)"
            .into(),
        xdevice: x_p50,
        reference,
        ratio,
        goal: format!("≤ {GOAL}"),
        met: ratio <= GOAL,
        details: json!({
            "write_bytes": WRITE_BYTES,
            "samples_per_round": samples,
            "seconds_per_phase": seconds,
            "rounds": rounds,
            "nodes": NODES,
            "node_backend": backend,
            "device_bytes": DEVICE_BYTES,
            "reference_definition": "fio write p50 + fio fdatasync p50 (fresh file, histograms \
                pooled over rounds) + TCP round-trip p50 (8 KiB request, 64-byte reply, \
                127.0.0.1, TCP_NODELAY)",
            "ratio_p99": common::finite(ratio_p99),
            "ratio_vs_prewritten_fio": common::finite(ratio_pre),
            "ratio_vs_direct_sync": common::finite(ratio_direct),
            "direct_sync": direct.summary(),
            "xdevice": xdev.summary(),
            "tcp_round_trip": tcp.summary(),
            "rpc_round_trip": rpc.summary(),
            "rpc_round_trip_tls": rpc_tls.summary(),
            "rpc_tls_cost": common::finite(tls_cost),
            "nodes_over_tls": !plaintext(),
            "fio": fio.to_json(),
            "fio_prewritten": fio_pre.to_json(),
            "throughput": {
                "writers": WRITERS,
                "seconds": common::finite(tput.seconds),
                "pairs": tput.pairs,
                "pairs_per_s": common::finite(tput.pairs_per_s()),
                "mib_per_s": common::finite(tput.mib_per_s()),
                "latency_p50_us": common::finite(tput.latency.quantile_us(0.5)),
                "latency_p99_us": common::finite(tput.latency.quantile_us(0.99)),
                "proposals": tput.proposals,
                "log_entries": tput.entries,
                "writes_per_entry": common::finite(tput.pairs as f64 / tput.entries.max(1) as f64),
                "mean_inflight_proposals": common::finite(tput.mean_inflight()),
                "max_inflight_proposals": tput.inflight_max,
                "goal_vs_fio_syncs_per_s": TPUT_GOAL,
                "ratio_vs_fdatasyncs_per_s": common::finite(tput_ratio),
                "ratio_vs_prewritten_fdatasyncs_per_s":
                    common::finite(tput.pairs_per_s() / fio_pre.per_s()),
                "ratio_vs_direct_syncs_per_s": common::finite(tput.pairs_per_s() / direct_per_s),
                "rounds": tput.rounds,
            },
            "leader": {
                "term_before": status_before.term,
                "term_after": status_after.term,
                "leader_before": status_before.leader,
                "leader_after": status_after.leader,
            },
        }),
    };
    report.finish(&machine)?;
    drop(cluster);
    Ok(())
}

/// The phases of a round, in their first round's order; `XDEVICE_BENCH_PHASES` (comma-separated
/// names) keeps a subset, for diagnosis: a figure whose phases did not run is reported as null.
fn phases() -> Result<Vec<Phase>> {
    let all = [
        ("fio", Phase::Fio { prewritten: false }),
        ("direct", Phase::Direct),
        ("tcp", Phase::TcpRtt),
        ("latency", Phase::Latency),
        ("rpc", Phase::RpcRtt),
        ("fio-prewritten", Phase::Fio { prewritten: true }),
        ("throughput", Phase::Throughput),
    ];
    let Ok(raw) = std::env::var("XDEVICE_BENCH_PHASES") else {
        return Ok(all.iter().map(|(_, p)| *p).collect());
    };
    let names: Vec<&str> = raw.split(',').map(str::trim).collect();
    if let Some(bad) = names.iter().find(|n| !all.iter().any(|(a, _)| a == *n)) {
        let known: Vec<&str> = all.iter().map(|(a, _)| *a).collect();
        bail!("XDEVICE_BENCH_PHASES: unknown phase {bad:?} (known: {})", known.join(","));
    }
    Ok(all.iter().filter(|(a, _)| names.contains(a)).map(|(_, p)| *p).collect())
}

/// The scratch directory: under `--dir PATH` or `XDEVICE_BENCH_DIR` when given (the nodes' stores
/// and fio's file must share a file system, so pick the one to measure), else the repository's.
fn scratch_dir() -> Result<tempfile::TempDir> {
    let mut args = std::env::args().skip(1);
    let mut dir = std::env::var_os("XDEVICE_BENCH_DIR").map(PathBuf::from);
    while let Some(a) = args.next() {
        match a.as_str() {
            // `cargo bench` passes this to every harness-less benchmark.
            "--bench" => {}
            "--dir" => dir = Some(args.next().ok_or_else(|| anyhow!("--dir needs a path"))?.into()),
            other => bail!("unknown argument {other:?} (this benchmark takes only --dir PATH)"),
        }
    }
    match dir {
        None => common::scratch_dir(BENCH),
        Some(base) => {
            std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
            tempfile::Builder::new()
                .prefix(&format!("{BENCH}-"))
                .tempdir_in(&base)
                .with_context(|| format!("create a scratch directory in {}", base.display()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// One node process; killed when dropped (a panic included). The child also gets SIGKILL if this
/// process dies without unwinding (see `spawn_node`).
#[derive(Debug)]
struct NodeProc {
    id: u64,
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Three running nodes of a freshly initialised cluster.
#[derive(Debug)]
struct Cluster {
    id: uuid::Uuid,
    procs: Vec<NodeProc>,
    leader: u64,
    /// How this process reaches the nodes: TLS as member `CLIENT_ID`, or plaintext.
    security: Security,
}

/// The member id this process's certificate names (no node runs as it).
const CLIENT_ID: u64 = 999_999;

/// Whether the nodes speak plaintext (`XDEVICE_BENCH_PLAINTEXT=1`) rather than mutual TLS, the
/// product's default.
fn plaintext() -> bool {
    std::env::var("XDEVICE_BENCH_PLAINTEXT").is_ok_and(|v| v == "1")
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_xdevice")
}

/// A port free on `ip` right now.
fn free_port(ip: &str) -> Result<u16> {
    let l = TcpListener::bind((ip, 0)).with_context(|| format!("bind {ip}:0"))?;
    Ok(l.local_addr()?.port())
}

impl Cluster {
    /// Formats a store per node under `base`, starts the nodes, initialises the cluster and waits
    /// for a leader.
    async fn start(base: &Path, backend: &str) -> Result<Cluster> {
        let id = uuid::Uuid::new_v4();
        let tls = base.join("tls");
        let (security, admin) = if plaintext() {
            (Security::Plaintext, Security::Plaintext)
        } else {
            let nodes: Vec<u64> = (1..=NODES).chain([CLIENT_ID]).collect();
            create_dev(&tls, id, &nodes).map_err(|e| anyhow!("{e}"))?;
            let source = TlsSource::Dir(tls.clone());
            let side = |who| source.security(id, who).map_err(|e| anyhow!("{e}"));
            (side(Identity::Member(CLIENT_ID))?, side(Identity::Admin)?)
        };
        let mut procs = Vec::new();
        for n in 1..=NODES {
            let dir = base.join(format!("n{n}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let out = Command::new(bin())
                .args(["format", "--size", &DEVICE_BYTES.to_string(), "--cluster-id"])
                .arg(id.to_string())
                .arg("--dir")
                .arg(&dir)
                .output()
                .context("run xdevice format")?;
            if !out.status.success() {
                bail!("xdevice format {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
            }
            let ip = format!("127.0.0.{n}");
            let addr: SocketAddr = format!("{ip}:{}", free_port(&ip)?).parse()?;
            let log = base.join(format!("node-{n}.log"));
            let tls_args: Vec<std::ffi::OsString> = match &security {
                Security::Plaintext => vec!["--plaintext".into()],
                Security::Tls(_) => vec!["--tls-dir".into(), tls.clone().into()],
            };
            let child = spawn_node(n, addr, &dir, backend, &tls_args, &log)?;
            procs.push(NodeProc { id: n, addr, log, child: Some(child) });
        }
        let mut cluster = Cluster { id, procs, leader: 0, security };
        // Every node answers before the cluster is initialised.
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        let nodes: Vec<(u64, SocketAddr)> = cluster.procs.iter().map(|p| (p.id, p.addr)).collect();
        for (n, addr) in nodes {
            let client = NodeClient::new(addr, None, id, &cluster.security);
            loop {
                cluster.check_alive()?;
                let asked = client.admin(Admin::Status, Duration::from_millis(500)).await;
                if asked.is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("node {n} at {addr} did not answer: {asked:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let members: Vec<(u64, String)> =
            cluster.procs.iter().map(|p| (p.id, p.addr.to_string())).collect();
        NodeClient::new(cluster.procs[0].addr, None, id, &admin)
            .admin(Admin::Init(members), ADMIN_TIMEOUT)
            .await
            .map_err(|e| anyhow!("initialise the cluster: {e}"))?;
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        cluster.leader = loop {
            if let Some(s) = cluster.find_leader().await {
                break s.id;
            }
            cluster.check_alive()?;
            if Instant::now() > deadline {
                bail!("no leader within {ADMIN_TIMEOUT:?} of initialising the cluster");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok(cluster)
    }

    async fn find_leader(&self) -> Option<NodeStatus> {
        for p in &self.procs {
            let c = NodeClient::new(p.addr, None, self.id, &self.security);
            // Generous: a node busy with the 64-writer load on two shared cores answers late.
            if let Ok(AdminReply::Status(s)) = c.admin(Admin::Status, Duration::from_secs(2)).await
            {
                if s.state == "Leader" {
                    return Some(*s);
                }
            }
        }
        None
    }

    /// The leader's status; waits out an election, up to `ADMIN_TIMEOUT`.
    async fn leader_status(&self) -> Result<NodeStatus> {
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            if let Some(s) = self.find_leader().await {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("no node said it was the leader for {ADMIN_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.procs.iter().map(|p| p.addr).collect()
    }

    /// Fails, with the tail of its log, if a node process has exited.
    fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(c) = p.child.as_mut() {
                if let Some(status) = c.try_wait().context("poll a node process")? {
                    let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    bail!(
                        "node {} exited ({status}); end of {}:\n{}",
                        p.id,
                        p.log.display(),
                        tail.join("\n")
                    );
                }
            }
        }
        Ok(())
    }
}

/// Starts `xdevice node` with its output in `log`. It is sent SIGKILL when this process dies, so
/// an interrupted benchmark leaves no node running.
fn spawn_node(
    id: u64,
    addr: SocketAddr,
    dir: &Path,
    backend: &str,
    tls: &[std::ffi::OsString],
    log: &Path,
) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(bin());
    cmd.args(["node", "--id", &id.to_string(), "--listen", &addr.to_string()])
        .arg("--dir")
        .arg(dir)
        .args(["--backend", backend])
        .args(tls)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("start node {id}"))
}

// ---------------------------------------------------------------------------------------------
// Phases

/// One writer: `samples` timed write + flush pairs at consecutive offsets (after a warm-up).
async fn one_writer(
    dev: &Device,
    samples: usize,
    payloads: &[bytes::Bytes],
    next_offset: &mut u64,
) -> Result<Samples> {
    let mut out = Samples::default();
    for i in 0..WARMUP_OPS + samples {
        let off = *next_offset;
        *next_offset = (off + WRITE_BYTES as u64) % DEVICE_BYTES;
        let data = &payloads[(off / WRITE_BYTES as u64) as usize % payloads.len()];
        let t = Instant::now();
        dev.write(off, data, false).await.context("write")?;
        dev.flush().await.context("flush")?;
        if i >= WARMUP_OPS {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

/// `WRITERS` tasks, each looping { write 8 KiB in its own 1/64 of the device; flush } for a
/// warm-up and then `seconds`; adds the measured window to `side` and returns its pairs/s.
async fn throughput(
    dev: &Arc<Device>,
    cluster: &Cluster,
    seconds: f64,
    payloads: &[bytes::Bytes],
    side: &mut ThroughputSide,
) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let region = DEVICE_BYTES / WRITERS as u64;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (dev, stop, measuring, done) =
            (dev.clone(), stop.clone(), measuring.clone(), done.clone());
        let payloads: Vec<bytes::Bytes> = payloads.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::default();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = w as u64 * region + (k * WRITE_BYTES as u64) % region;
                let data = &payloads[(k as usize + w) % payloads.len()];
                k += 1;
                let t = Instant::now();
                dev.write(off, data, false).await?;
                dev.flush().await?;
                if measuring.load(Ordering::Relaxed) {
                    samples.push(t.elapsed());
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<Samples, xdevice::device::DeviceError>(samples)
        }));
    }
    tokio::time::sleep(WARMUP).await;
    let s0 = cluster.leader_status().await?;
    let p0 = dev.stats().proposals;
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    // Proposals in flight, sampled every millisecond of the window.
    let (mut inflight_sum, mut inflight_samples, mut inflight_max) = (0u64, 0u64, 0usize);
    let end = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    while tokio::time::Instant::now() < end {
        let n = dev.pipeline().inflight_proposals;
        inflight_sum += n as u64;
        inflight_samples += 1;
        inflight_max = inflight_max.max(n);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    measuring.store(false, Ordering::Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let pairs = done.load(Ordering::Relaxed);
    let p1 = dev.stats().proposals;
    stop.store(true, Ordering::Relaxed);
    let mut latency = Samples::default();
    for t in tasks {
        let got = t.await.map_err(|e| anyhow!("a writer task failed: {e}"))??;
        latency.extend(&got);
    }
    let s1 = cluster.leader_status().await?;
    // Log entries the window's writes went into (read from the leader's log before and after).
    let entries = s1.last_log_index.unwrap_or(0).saturating_sub(s0.last_log_index.unwrap_or(0));
    let rate = pairs as f64 / window;
    side.seconds += window;
    side.pairs += pairs;
    side.proposals += p1 - p0;
    side.entries += entries;
    side.inflight_sum += inflight_sum;
    side.inflight_samples += inflight_samples;
    side.inflight_max = side.inflight_max.max(inflight_max);
    side.rounds.push(json!({
        "mean_inflight_proposals": common::finite(inflight_sum as f64 / inflight_samples.max(1) as f64),
        "max_inflight_proposals": inflight_max,
        "pairs_per_s": common::finite(rate),
        "p50_us": common::finite(latency.quantile_us(0.5)),
        "p99_us": common::finite(latency.quantile_us(0.99)),
        "proposals": p1 - p0,
        "log_entries": entries,
    }));
    side.latency.extend(&latency);
    Ok(rate)
}

/// The wire reference: `samples` round trips of an 8 KiB request and a small reply over one
/// loopback TCP connection with TCP_NODELAY, between two threads (after a warm-up).
fn tcp_round_trips(samples: usize) -> Result<Samples> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut req = vec![0u8; WRITE_BYTES];
        let reply = [7u8; REPLY_BYTES];
        loop {
            match s.read_exact(&mut req) {
                Ok(()) => s.write_all(&reply)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut c = TcpStream::connect(addr).context("connect to the round-trip server")?;
    c.set_nodelay(true)?;
    let req = vec![5u8; WRITE_BYTES];
    let mut reply = [0u8; REPLY_BYTES];
    let mut out = Samples::default();
    for i in 0..WARMUP_OPS + samples {
        let t = Instant::now();
        c.write_all(&req)?;
        c.read_exact(&mut reply)?;
        if i >= WARMUP_OPS {
            out.push(t.elapsed());
        }
    }
    drop(c);
    server.join().map_err(|_| anyhow!("round-trip server panicked"))??;
    Ok(out)
}

/// Answers every request with `REPLY_BYTES` bytes.
struct Echo;

impl Handler for Echo {
    fn call(&self, _caller: &Caller, _kind: u8, _payload: Vec<u8>) -> Admission {
        admitted(Box::pin(async { Ok(vec![7u8; REPLY_BYTES]) }))
    }
}

/// The same round trip through xdevice's RPC layer (client and server in this process's runtime):
/// what framing, checksums and task hand-offs add to the bare socket; with `tls`, over mutual
/// TLS with development certificates, as members speak by default.
async fn rpc_round_trips(samples: usize, tls: bool) -> Result<Samples> {
    let cluster_id = uuid::Uuid::new_v4();
    let certs = tempfile::tempdir()?;
    let (server_side, client_side) = if tls {
        create_dev(certs.path(), cluster_id, &[1, 2]).map_err(|e| anyhow!("{e}"))?;
        let source = TlsSource::Dir(certs.path().to_path_buf());
        let side = |n| source.security(cluster_id, Identity::Member(n)).map_err(|e| anyhow!("{e}"));
        (side(1)?, side(2)?)
    } else {
        (Security::Plaintext, Security::Plaintext)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = RpcServer::start(listener, cluster_id, 1 << 20, server_side, Arc::new(Echo))?;
    let options = ClientOptions { security: client_side, ..ClientOptions::default() };
    let client = RpcClient::new(server.local_addr(), None, cluster_id, 2, options);
    let req = vec![5u8; WRITE_BYTES];
    let mut out = Samples::default();
    for i in 0..WARMUP_OPS + samples {
        let t = Instant::now();
        client.call(1, req.clone(), Duration::from_secs(5)).await.map_err(|e| anyhow!("{e}"))?;
        if i >= WARMUP_OPS {
            out.push(t.elapsed());
        }
    }
    drop(client);
    server.shutdown().await;
    Ok(out)
}
