//! `embedded-commit`: commit latency of the embedded default (three replicas in one process, on
//! one disk), one writer, 8 KiB write + flush, against one fio 8 KiB write + fdatasync of the same
//! disk in the same run (goal: p50 ≤ 1.3×). A write commits once two of the three replicas hold
//! it durably, so the goal is met only when the replicas' fsyncs overlap rather than run in
//! series.
//!
//! The replicas are `Embedded` with the settings `xdevice serve` uses (64 MiB segments, filled,
//! io_uring), under a writeback `Device` in this process: no ublk, so the figure is the
//! replication and storage path alone. One writer loops { `write` 8 KiB of random bytes at the
//! next offset; `flush` } and times each pair. Beside it, the same loop on one embedded replica
//! (what replication adds over a single replica's WAL).
//!
//! Reference, in the same run on the same file system: one 8 KiB `pwrite` with O_DIRECT +
//! `fdatasync` per pair, the shape of a replica's WAL commit, on a prewritten file, as the
//! replicas' segments are (filled when made, so a sync has no extent metadata to write), timed
//! in this process with as many pairs per round as each device. Beside it, fio's 8 KiB write +
//! fdatasync job (`common::fio_append_args`, the wal-append reference) on a prewritten and on a
//! fresh fallocated file; fio runs for a fixed time, so its pooled percentiles weigh the disk's
//! fast minutes more than its slow ones, which is why it is not the headline. Phases run
//! interleaved in rounds with a rotating order and are pooled, because this disk's flush
//! latency drifts by an order of magnitude from minute to minute.
//!
//! Settings: `XDEVICE_BENCH_SAMPLES` (pairs timed per round and device; default 1000),
//! `XDEVICE_BENCH_SECONDS` (each fio phase, each round; default 5), `XDEVICE_BENCH_ROUNDS`
//! (default 5), `XDEVICE_BENCH_DIR` (where the scratch directory is made; default the
//! repository's `target/bench-tmp`).

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use common::{FioSide, LatencySide, Machine, Report, Samples};
use xdevice::device::local::{Embedded, EmbeddedOptions, EMBEDDED_LOG_CACHE_BYTES};
use xdevice::device::{CacheMode, Device, DeviceConfig};
use xdevice::replication::node::RaftTuning;
use xdevice::storage::disk::Backend;
use xdevice::storage::engine::{EngineConfig, FormatOptions};

const BENCH: &str = "embedded-commit";
const WRITE_BYTES: usize = 8192;
const GOAL: f64 = 1.3;
const DEVICE_BYTES: u64 = 1 << 30;
const BLOCK_BYTES: u32 = 4096;
/// Untimed pairs before each latency phase.
const WARMUP_OPS: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Fio { prewritten: bool },
    Direct,
    Replicas(usize),
}

/// An embedded cluster of `replicas` with a writeback device on top, as `xdevice serve` makes it.
struct Served {
    replicas: u64,
    embedded: Arc<Embedded>,
    device: Arc<Device>,
    next_offset: u64,
}

impl Served {
    async fn start(dir: &std::path::Path, replicas: u64) -> Result<Served> {
        let opts = EmbeddedOptions {
            dir: dir.to_path_buf(),
            replicas,
            format: FormatOptions {
                device_name: "xdb0".into(),
                device_bytes: Some(DEVICE_BYTES),
                block_bytes: BLOCK_BYTES,
                segment_bytes: 64 << 20,
                ..FormatOptions::default()
            },
            engine: EngineConfig { fill_segments: true, ..EngineConfig::default() },
            backend: Backend::Uring,
            tuning: RaftTuning::default(),
            log_cache_bytes: EMBEDDED_LOG_CACHE_BYTES,
            replica_dirs: Vec::new(),
            rebuild_lost: false,
        };
        let embedded = Embedded::start(opts).await.context("start the replicas")?;
        embedded.wait_leader(Duration::from_secs(30)).await?;
        let cfg = DeviceConfig::new(
            BLOCK_BYTES,
            DEVICE_BYTES / u64::from(BLOCK_BYTES),
            CacheMode::Writeback,
        );
        let device = Device::start(cfg, embedded.clone());
        Ok(Served { replicas, embedded, device, next_offset: 0 })
    }

    /// `count` timed write + flush pairs after the warm-up.
    async fn pairs(&mut self, count: usize, payloads: &[bytes::Bytes]) -> Result<Samples> {
        let mut samples = Samples::default();
        for i in 0..WARMUP_OPS + count {
            let offset = self.next_offset;
            self.next_offset = (offset + WRITE_BYTES as u64) % DEVICE_BYTES;
            let data = &payloads[i % payloads.len()];
            let t = Instant::now();
            self.device.write(offset, data, false).await?;
            self.device.flush().await?;
            if i >= WARMUP_OPS {
                samples.push(t.elapsed());
            }
        }
        Ok(samples)
    }

    async fn stop(self) -> Result<()> {
        self.device.close();
        self.embedded.shutdown().await
    }
}

fn main() -> Result<()> {
    let samples = common::env_usize("XDEVICE_BENCH_SAMPLES", 1000)?;
    let seconds = common::env_f64("XDEVICE_BENCH_SECONDS", 5.0)?;
    let rounds = common::env_usize("XDEVICE_BENCH_ROUNDS", 5)?;
    let scratch = common::scratch_dir(BENCH)?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    println!(
        "workload: one writer, {WRITE_BYTES}-byte random write + flush, {samples} pairs per round \
         and device after {WARMUP_OPS} warm-up; the embedded default (3 replicas, one process, \
         one disk) and 1 replica beside it; {rounds} rounds, phase order rotated"
    );
    println!(
        "reference: {WRITE_BYTES}-byte O_DIRECT pwrite + fdatasync on a prewritten file, \
         {samples} pairs per round; beside it fio write + fdatasync ({seconds} s per round, \
         prewritten and fresh fallocated file)"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("build the runtime")?;
    let mut three = rt.block_on(Served::start(&scratch.path().join("three"), 3))?;
    let mut one = rt.block_on(Served::start(&scratch.path().join("one"), 1))?;
    let payloads = common::random_payloads(256, WRITE_BYTES, 0xe3b0);

    let phases = [
        Phase::Fio { prewritten: false },
        Phase::Replicas(3),
        Phase::Direct,
        Phase::Fio { prewritten: true },
        Phase::Replicas(1),
    ];
    let mut direct = LatencySide::default();
    let mut fio = FioSide::default();
    let mut fio_pre = FioSide::default();
    let mut x3 = LatencySide::default();
    let mut x1 = LatencySide::default();
    let bar = common::RoundsBar::new(BENCH, rounds);
    for round in 0..rounds {
        let mut line = format!("round {}/{rounds}:", round + 1);
        for i in 0..phases.len() {
            bar.phase(format_args!("{:?}", phases[(i + round) % phases.len()]));
            match phases[(i + round) % phases.len()] {
                Phase::Fio { prewritten } => {
                    let side = if prewritten { &mut fio_pre } else { &mut fio };
                    let (p50, _) =
                        common::fio_phase(side, scratch.path(), round, seconds, prewritten)?;
                    let variant = if prewritten { "pre" } else { "fresh" };
                    line += &format!(" fio-{variant} p50 {p50:.0}us;");
                }
                Phase::Direct => {
                    let file = scratch.path().join(format!("direct-r{round}"));
                    let got = common::direct_syncs(&file, WARMUP_OPS, samples, &payloads, true)?;
                    let p50 = direct.add(got, json!({}));
                    line += &format!(" direct p50 {p50:.0}us;");
                }
                Phase::Replicas(n) => {
                    let (served, side) =
                        if n == 3 { (&mut three, &mut x3) } else { (&mut one, &mut x1) };
                    let before = served.device.stats();
                    let got = rt.block_on(served.pairs(samples, &payloads))?;
                    let proposals = served.device.stats().proposals - before.proposals;
                    let p50 = side.add(got, json!({ "proposals": proposals }));
                    line += &format!(" xdevice-{} p50 {p50:.0}us;", served.replicas);
                }
            }
            std::io::stdout().flush().ok();
        }
        bar.round_done();
        println!("{line}");
    }
    bar.finish();
    rt.block_on(three.stop())?;
    rt.block_on(one.stop())?;

    let reference = direct.p50();
    let x3_p50 = x3.p50();
    let ratio = x3_p50 / reference;
    let ratio_p99 = x3.p99() / direct.p99();
    let ratio_fio = x3_p50 / fio_pre.p50();
    let ratio_fresh = x3_p50 / fio.p50();
    let ratio_one = x1.p50() / reference;
    let replication_cost = x3_p50 / x1.p50();

    println!();
    println!("pooled over {rounds} rounds (latency in µs; fio rows are write + fdatasync):");
    let mut rows = Vec::new();
    for (name, side) in [("fio write+fdatasync, prewritten", &fio_pre), ("fio, fresh file", &fio)] {
        rows.push(vec![
            name.to_string(),
            side.write.count().to_string(),
            common::us(side.p50()),
            common::us(side.p99()),
            common::us(side.mean()),
            String::new(),
        ]);
    }
    for (name, side, r) in [
        ("O_DIRECT pwrite+fdatasync, prewritten", &mut direct, 1.0),
        ("xdevice write+flush, 1 replica", &mut x1, ratio_one),
        ("xdevice write+flush, 3 replicas", &mut x3, ratio),
    ] {
        rows.push(side.row(name, format!("{r:.2}")));
    }
    common::print_table(&["", "samples", "p50", "p99", "mean", "÷ reference"], &rows);
    println!(
        "p50 ratio {ratio:.3} (goal ≤ {GOAL}: {}); p99 ratio {ratio_p99:.3}; against fio's \
         prewritten file {ratio_fio:.3}, its fresh file {ratio_fresh:.3}; three replicas ÷ one {replication_cost:.3}",
        if ratio <= GOAL { "met" } else { "missed" }
    );

    let report = Report {
        bench: BENCH.into(),
        metric:
            "p50 of 8 KiB write + flush, 3 embedded replicas ÷ O_DIRECT pwrite + fdatasync p50 \
                 (prewritten file)"
                .into(),
        xdevice: x3_p50,
        reference,
        ratio,
        goal: format!("<= {GOAL}"),
        met: ratio <= GOAL,
        details: json!({
            "write_bytes": WRITE_BYTES,
            "rounds": rounds,
            "samples_per_round": samples,
            "direct_prewritten": direct.summary(),
            "fio": fio.to_json(),
            "fio_prewritten": fio_pre.to_json(),
            "xdevice_3": x3.summary(),
            "xdevice_1": x1.summary(),
            "ratio_p99": common::finite(ratio_p99),
            "ratio_fio_prewritten": common::finite(ratio_fio),
            "ratio_fio_fresh_file": common::finite(ratio_fresh),
            "ratio_one_replica": common::finite(ratio_one),
            "three_over_one": common::finite(replication_cost),
        }),
    };
    report.finish(&machine)?;
    Ok(())
}
