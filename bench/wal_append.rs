//! `wal-append`: latency of a durable 8 KiB append with one writer, against fio's 8 KiB write +
//! fdatasync on the same file system. The goal is p50 ≤ 1.1× fio on a prewritten file (the fair
//! reference: xdevice's segments are preallocated and filled); fio on a fresh file is reported
//! beside it.
//!
//! One writer loops { append one entry of 8 KiB random bytes; wait until it is durable } on a
//! freshly formatted store, timing each iteration. The reference is fio's sync-engine job with
//! `--fdatasync=1`: its per-I/O cost is a write followed by an fdatasync, so the reference p50 is
//! fio's write p50 plus its fdatasync p50 (fio reports the two separately; their sum is the cost
//! of one durable 8 KiB append through the page cache).
//!
//! Phases run interleaved in rounds (the phase order rotates each round) and each side's samples
//! are pooled over the rounds: the disk's flush latency drifts by an order of magnitude over
//! minutes on shared cloud storage, and interleaving exposes both sides to the same drift.
//!
//! Settings: `XDEVICE_BENCH_SECONDS` (each phase, each round; default 5), `XDEVICE_BENCH_ROUNDS`
//! (default 3).

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use common::{Histogram, Machine, Report, Samples};
use xdevice::storage::disk::Backend;
use xdevice::storage::engine::{EngineConfig, FormatOptions};
use xdevice::storage::wal::NewEntry;

const BENCH: &str = "wal-append";
const ENTRY_BYTES: usize = 8192;
/// Goal on p50 ÷ fio's p50 on a prewritten file.
const GOAL: f64 = 1.1;
/// Untimed appends before each engine phase (thread ring creation, first touches).
const WARMUP_APPENDS: usize = 200;

/// The phases of one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The design's reference: fio on a new (fallocated, unwritten) file.
    Fio,
    /// fio over a file it first wrote in full (`--overwrite=1`), as xdevice's filled segments are.
    FioPrewritten,
    Engine(Backend),
}

/// One side's pooled fio figures.
#[derive(Debug, Default)]
struct FioSide {
    write: Histogram,
    sync: Histogram,
    ios: u64,
    commands: Vec<String>,
    rounds: Vec<Value>,
}

impl FioSide {
    fn add(&mut self, run: &common::FioRun) -> Result<(f64, f64)> {
        // With the sync engine there is no submission latency: clat is the write's latency.
        let write = run.hist("/write/clat_ns")?;
        let sync = run.hist("/sync/lat_ns")?;
        let p50 = write.quantile_us(0.5) + sync.quantile_us(0.5);
        let iops = run.num("/write/iops")?;
        self.ios += write.count();
        self.rounds.push(json!({
            "write_p50_us": common::finite(write.quantile_us(0.5)),
            "sync_p50_us": common::finite(sync.quantile_us(0.5)),
            "p50_us": common::finite(p50),
            "iops": common::finite(iops),
        }));
        self.write.merge(&write);
        self.sync.merge(&sync);
        if self.commands.is_empty() {
            self.commands.push(run.command.clone());
        }
        Ok((p50, iops))
    }

    fn p50(&self) -> f64 {
        self.write.quantile_us(0.5) + self.sync.quantile_us(0.5)
    }
    fn p99(&self) -> f64 {
        self.write.quantile_us(0.99) + self.sync.quantile_us(0.99)
    }
    fn mean(&self) -> f64 {
        self.write.mean_us() + self.sync.mean_us()
    }

    fn to_json(&self) -> Value {
        json!({
            "command": self.commands.first(),
            "ios": self.ios,
            "write_p50_us": common::finite(self.write.quantile_us(0.5)),
            "sync_p50_us": common::finite(self.sync.quantile_us(0.5)),
            "p50_us": common::finite(self.p50()),
            "write_p99_us": common::finite(self.write.quantile_us(0.99)),
            "sync_p99_us": common::finite(self.sync.quantile_us(0.99)),
            "p99_us": common::finite(self.p99()),
            "mean_us": common::finite(self.mean()),
            "rounds": self.rounds,
        })
    }
}

/// One engine backend's pooled figures.
#[derive(Debug, Default)]
struct EngineSide {
    samples: Samples,
    /// Latencies of the appends whose commit created a new segment.
    rotation_samples: Samples,
    seconds: f64,
    rounds: Vec<Value>,
}

impl EngineSide {
    fn summary(&mut self) -> Value {
        let appends = self.samples.len();
        let (slow, slow_us) = self.samples.tail_above(1000.0);
        json!({
            "appends": appends,
            "appends_per_s": common::finite(appends as f64 / self.seconds),
            "p50_us": common::finite(self.samples.quantile_us(0.5)),
            "p90_us": common::finite(self.samples.quantile_us(0.9)),
            "p99_us": common::finite(self.samples.quantile_us(0.99)),
            "p999_us": common::finite(self.samples.quantile_us(0.999)),
            "max_us": common::finite(self.samples.quantile_us(1.0)),
            "mean_us": common::finite(self.samples.mean_us()),
            "rotations": self.rotation_samples.len(),
            "rotation_append_mean_us": common::finite(self.rotation_samples.mean_us()),
            "rotation_share_of_time": common::finite(
                self.rotation_samples.total_us() / self.samples.total_us().max(1.0)
            ),
            "appends_over_1ms": slow,
            "share_of_time_over_1ms": common::finite(slow_us / self.samples.total_us().max(1.0)),
            "rounds": self.rounds,
        })
    }
}

fn main() -> Result<()> {
    let seconds = common::env_f64("XDEVICE_BENCH_SECONDS", 5.0)?;
    let rounds = common::env_usize("XDEVICE_BENCH_ROUNDS", 3)?;
    let scratch = common::scratch_dir(BENCH)?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    let (format, config) = common::append_store();
    println!(
        "workload: one writer, append one {ENTRY_BYTES}-byte random entry and wait until durable; \
         {rounds} rounds of {seconds} s per phase; segments {} MiB (filled), compress {}",
        format.segment_bytes >> 20,
        config.wal.compress
    );
    println!("reference p50 = fio write p50 + fio fdatasync p50 (fio reports them separately)");
    let payloads = common::random_payloads(64, ENTRY_BYTES, 0x5eed);

    let mut fio = FioSide::default();
    let mut fio_pre = FioSide::default();
    let mut uring = EngineSide::default();
    let mut file = EngineSide::default();
    let phases = [
        Phase::Fio,
        Phase::Engine(Backend::Uring),
        Phase::FioPrewritten,
        Phase::Engine(Backend::File),
    ];
    let bar = common::RoundsBar::new(BENCH, rounds);
    for round in 0..rounds {
        let mut line = format!("round {}/{rounds}:", round + 1);
        for i in 0..phases.len() {
            bar.phase(format_args!("{:?}", phases[(i + round) % phases.len()]));
            let phase = phases[(i + round) % phases.len()];
            let dir = scratch.path().join(format!("r{round}-{i}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            match phase {
                Phase::Fio | Phase::FioPrewritten => {
                    let pre = phase == Phase::FioPrewritten;
                    let run = common::run_fio(&common::fio_append_args(&dir, seconds, pre))?;
                    let side = if pre { &mut fio_pre } else { &mut fio };
                    let (p50, iops) = side.add(&run)?;
                    let name = if pre { "fio-prewritten" } else { "fio" };
                    line += &format!(" {name} p50 {p50:.0}us ({iops:.0}/s);");
                }
                Phase::Engine(backend) => {
                    let side = if backend == Backend::Uring { &mut uring } else { &mut file };
                    let (p50, n) =
                        run_engine(&dir, backend, &format, &config, seconds, &payloads, side)?;
                    line += &format!(" {backend:?} p50 {p50:.0}us ({:.0}/s);", n as f64 / seconds);
                }
            }
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
            std::io::Write::flush(&mut std::io::stdout()).ok();
        }
        bar.round_done();
        println!("{line}");
    }
    bar.finish();

    let ref_p50 = fio.p50();
    let pre_p50 = fio_pre.p50();
    let x_p50 = uring.samples.quantile_us(0.5);
    let ratio = x_p50 / pre_p50;
    println!();
    println!("pooled over {rounds} rounds (latency in µs; fio rows are write + fdatasync):");
    let mut rows = Vec::new();
    for (name, side) in [("fio write+fdatasync", &fio), ("fio, pre-written file", &fio_pre)] {
        rows.push(vec![
            name.to_string(),
            side.ios.to_string(),
            format!(
                "{} ({}+{})",
                common::us(side.p50()),
                common::us(side.write.quantile_us(0.5)),
                common::us(side.sync.quantile_us(0.5))
            ),
            common::us(side.p99()),
            common::us(side.mean()),
            format!("{:.2}", side.p50() / ref_p50),
            format!("{:.2}", side.p50() / pre_p50),
        ]);
    }
    for (name, side) in [("xdevice uring", &mut uring), ("xdevice file", &mut file)] {
        let p50 = side.samples.quantile_us(0.5);
        rows.push(vec![
            name.to_string(),
            side.samples.len().to_string(),
            common::us(p50),
            common::us(side.samples.quantile_us(0.99)),
            common::us(side.samples.mean_us()),
            format!("{:.2}", p50 / ref_p50),
            format!("{:.2}", p50 / pre_p50),
        ]);
    }
    common::print_table(
        &["", "appends", "p50", "p99", "mean", "p50 / fio", "p50 / fio pre-written"],
        &rows,
    );
    for (name, side) in [("uring", &uring), ("file", &file)] {
        let (slow, slow_us) = side.samples.tail_above(1000.0);
        println!(
            "xdevice {name}: {} segment rotations (mean append {:.0} µs across one), {} appends \
             over 1 ms holding {:.0}% of the time",
            side.rotation_samples.len(),
            side.rotation_samples.mean_us(),
            slow,
            100.0 * slow_us / side.samples.total_us().max(1.0)
        );
    }
    println!("fio commands (first round; the file name changes each round):");
    println!("  {}", fio.commands.first().map_or("", String::as_str));
    println!("  {}", fio_pre.commands.first().map_or("", String::as_str));

    let report = Report {
        bench: BENCH.into(),
        metric: "p50 durable 8 KiB append latency, µs (xdevice io_uring ÷ fio write p50 + \
                 fdatasync p50 on a prewritten file)"
            .into(),
        xdevice: x_p50,
        reference: pre_p50,
        ratio,
        goal: format!("≤ {GOAL}"),
        met: ratio <= GOAL,
        details: json!({
            "entry_bytes": ENTRY_BYTES,
            "seconds_per_phase": seconds,
            "rounds": rounds,
            "segment_bytes": format.segment_bytes,
            "compress": config.wal.compress,
            "reference_definition": "fio write p50 + fio fdatasync p50 on a prewritten file \
                                     (--size=64m --overwrite=1), histograms pooled over rounds",
            "xdevice_uring": uring.summary(),
            "xdevice_file": file.summary(),
            "fio": fio.to_json(),
            "fio_prewritten": fio_pre.to_json(),
            "ratio_vs_prewritten_fio": common::finite(x_p50 / pre_p50),
            "ratio_vs_fresh_fio": common::finite(x_p50 / ref_p50),
            "ratio_p99_vs_prewritten_fio": common::finite(
                uring.samples.quantile_us(0.99) / fio_pre.p99()
            ),
            "ratio_mean_vs_prewritten_fio": common::finite(uring.samples.mean_us() / fio_pre.mean()),
            "ratio_file_backend_vs_prewritten_fio": common::finite(
                file.samples.quantile_us(0.5) / pre_p50
            ),
        }),
    };
    report.finish(&machine)?;
    Ok(())
}

/// Runs one engine phase on a fresh store in `dir`; adds its samples to `side` and returns the
/// phase's p50 (µs) and append count.
fn run_engine(
    dir: &Path,
    backend: Backend,
    format: &FormatOptions,
    config: &EngineConfig,
    seconds: f64,
    payloads: &[bytes::Bytes],
    side: &mut EngineSide,
) -> Result<(f64, usize)> {
    let (engine, _) = common::fresh_engine(dir, backend, format, config.clone())?;
    let wal = engine.wal();
    let mut index = wal.bounds().next;
    let append = |index: u64| -> Result<()> {
        let payload = payloads[index as usize % payloads.len()].clone();
        let ticket = wal
            .append(vec![NewEntry { index, term: 1, payload: payload.into() }])
            .context("append")?;
        wal.wait(ticket).context("wait until durable")
    };
    for _ in 0..WARMUP_APPENDS {
        append(index)?;
        index += 1;
    }
    let mut samples = Samples::default();
    let mut segments = wal.segments().len();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        let t = Instant::now();
        append(index)?;
        let took = t.elapsed();
        index += 1;
        samples.push(took);
        // Outside the timed part: did this append's commit open a new segment?
        let now = wal.segments().len();
        if now != segments {
            side.rotation_samples.push(took);
            segments = now;
        }
    }
    engine.close().context("close the engine")?;
    let p50 = samples.quantile_us(0.5);
    side.rounds.push(json!({
        "appends": samples.len(),
        "p50_us": common::finite(p50),
        "p99_us": common::finite(samples.quantile_us(0.99)),
        "mean_us": common::finite(samples.mean_us()),
    }));
    side.samples.extend(&samples);
    side.seconds += seconds;
    Ok((p50, samples.len()))
}
