//! `group-commit`: durable 8 KiB appends per second with 1, 4, 16 and 64 concurrent writers,
//! against the fdatasyncs per second of the same disk on a prewritten file (goal: ≥ 20× at 64
//! writers; 64× is the limit, one batch per fdatasync). A fresh file's rate is reported beside it.
//!
//! The WAL takes consecutive indices, so writers share one append lock: each writer loops
//! { lock; append one 8 KiB random entry with a completion callback; unlock; wait for its
//! callback }. The callback is how the replication layer learns of durability; a second run at
//! the highest concurrency uses `Wal::wait` instead (every waiter wakes at every batch) to show
//! what that costs. Counted: appends acknowledged durable inside the measured window, and the
//! WAL's own batch and record counters over the same window.
//!
//! The reference is fio's 8 KiB write + fdatasync job (`--fdatasync=1`, sync engine, one job):
//! each write is followed by one fdatasync, so its IOPS are fdatasyncs per second.
//!
//! Phases run interleaved in rounds with a rotating order, and figures are pooled over rounds,
//! so the disk's drift hits reference and xdevice alike. Settings: `XDEVICE_BENCH_SECONDS` (each
//! phase, each round; default 4), `XDEVICE_BENCH_ROUNDS` (default 3), `XDEVICE_GC_WRITERS`
//! (comma-separated concurrencies; default 1,4,16,64; the headline is the largest).

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use common::{Machine, Report, Samples};
use xdevice::storage::disk::Backend;
use xdevice::storage::engine::{EngineConfig, FormatOptions};
use xdevice::storage::wal::{NewEntry, Wal};

const BENCH: &str = "group-commit";
const ENTRY_BYTES: usize = 8192;
/// Goal on appends/s at the most writers ÷ fio's fdatasyncs/s on a prewritten file.
const GOAL: f64 = 20.0;
/// Time each phase runs before its measured window opens.
const WARMUP: Duration = Duration::from_millis(500);

/// How a writer learns its append is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ack {
    /// `append_with` and a per-writer channel the callback sends on.
    Callback,
    /// `append` then `Wal::wait(ticket)`.
    Wait,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Fio { prewritten: bool },
    Engine { writers: usize, ack: Ack },
}

/// Pooled figures of one engine configuration.
#[derive(Debug, Default)]
struct Level {
    seconds: f64,
    appends: u64,
    batches: u64,
    records: u64,
    bytes: u64,
    rotations: u64,
    latency: Samples,
    rounds: Vec<Value>,
}

impl Level {
    fn appends_per_s(&self) -> f64 {
        self.appends as f64 / self.seconds
    }
    fn batches_per_s(&self) -> f64 {
        self.batches as f64 / self.seconds
    }
    fn records_per_batch(&self) -> f64 {
        self.records as f64 / self.batches.max(1) as f64
    }
}

/// Pooled fio figures.
#[derive(Debug, Default)]
struct FioSide {
    seconds: f64,
    ios: f64,
    command: Option<String>,
    rounds: Vec<Value>,
}

impl FioSide {
    fn per_s(&self) -> f64 {
        self.ios / self.seconds
    }
}

fn main() -> Result<()> {
    let seconds = common::env_f64("XDEVICE_BENCH_SECONDS", 4.0)?;
    let rounds = common::env_usize("XDEVICE_BENCH_ROUNDS", 3)?;
    let levels = writer_levels()?;
    let top = *levels.last().ok_or_else(|| anyhow!("no writer counts"))?;
    let scratch = common::scratch_dir(BENCH)?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    let (format, config) = common::append_store();
    println!(
        "workload: N writers share an append lock; each appends one {ENTRY_BYTES}-byte random \
         entry and waits for its durability callback; {rounds} rounds of {seconds} s per phase \
         (after {} ms warm-up); io_uring backend; segments {} MiB (filled), compress {}",
        WARMUP.as_millis(),
        format.segment_bytes >> 20,
        config.wal.compress
    );
    let payloads = common::random_payloads(256, ENTRY_BYTES, 0x6c0c);

    let mut phases = vec![Phase::Fio { prewritten: false }, Phase::Fio { prewritten: true }];
    phases.extend(levels.iter().map(|&writers| Phase::Engine { writers, ack: Ack::Callback }));
    phases.push(Phase::Engine { writers: top, ack: Ack::Wait });
    let mut fio = FioSide::default();
    let mut fio_pre = FioSide::default();
    let mut results: Vec<(Phase, Level)> = phases
        .iter()
        .filter(|p| matches!(p, Phase::Engine { .. }))
        .map(|&p| (p, Level::default()))
        .collect();
    let bar = common::RoundsBar::new(BENCH, rounds);
    for round in 0..rounds {
        let mut line = format!("round {}/{rounds}:", round + 1);
        for i in 0..phases.len() {
            bar.phase(format_args!("{:?}", phases[(i + round) % phases.len()]));
            let phase = phases[(i + round) % phases.len()];
            let dir = scratch.path().join(format!("r{round}-{i}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            match phase {
                Phase::Fio { prewritten } => {
                    let run = common::run_fio(&common::fio_append_args(&dir, seconds, prewritten))?;
                    let iops = run.num("/write/iops")?;
                    let runtime_s = run.num("/write/runtime")? / 1000.0;
                    let side = if prewritten { &mut fio_pre } else { &mut fio };
                    side.seconds += runtime_s;
                    side.ios += iops * runtime_s;
                    side.command.get_or_insert(run.command.clone());
                    side.rounds.push(json!({ "fdatasyncs_per_s": common::finite(iops) }));
                    let name = if prewritten { "fio-prewritten" } else { "fio" };
                    line += &format!(" {name} {iops:.0}/s;");
                }
                Phase::Engine { writers, ack } => {
                    let level = results
                        .iter_mut()
                        .find(|(p, _)| *p == phase)
                        .map(|(_, l)| l)
                        .ok_or_else(|| anyhow!("no slot for {phase:?}"))?;
                    let rate = run_engine(
                        &dir, &format, &config, writers, ack, seconds, &payloads, level,
                    )?;
                    let tag = if ack == Ack::Wait { "w" } else { "" };
                    line += &format!(" {writers}{tag}: {rate:.0}/s;");
                }
            }
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        bar.round_done();
        println!("{line}");
    }
    bar.finish();

    let reference = fio.per_s();
    println!();
    println!(
        "pooled over {rounds} rounds: fio fdatasyncs/s {reference:.0} (fresh file), {:.0} \
         (pre-written file)",
        fio_pre.per_s()
    );
    let mut rows = Vec::new();
    let mut levels_json = Vec::new();
    for (phase, level) in results.iter_mut() {
        let Phase::Engine { writers, ack } = *phase else { continue };
        let ratio = level.appends_per_s() / reference;
        rows.push(vec![
            format!("{writers}{}", if ack == Ack::Wait { " (wait)" } else { "" }),
            format!("{:.0}", level.appends_per_s()),
            format!("{:.0}", level.batches_per_s()),
            format!("{:.1}", level.records_per_batch()),
            format!("{:.0}", level.latency.quantile_us(0.5)),
            format!("{:.0}", level.latency.quantile_us(0.99)),
            format!("{:.1}", level.bytes as f64 / level.seconds / 1e6),
            level.rotations.to_string(),
            format!("{ratio:.2}"),
            format!("{:.2}", level.appends_per_s() / fio_pre.per_s()),
        ]);
        levels_json.push(json!({
            "writers": writers,
            "ack": format!("{ack:?}").to_lowercase(),
            "appends_per_s": common::finite(level.appends_per_s()),
            "batches_per_s": common::finite(level.batches_per_s()),
            "records_per_batch": common::finite(level.records_per_batch()),
            "wal_mb_per_s": common::finite(level.bytes as f64 / level.seconds / 1e6),
            "latency_p50_us": common::finite(level.latency.quantile_us(0.5)),
            "latency_p99_us": common::finite(level.latency.quantile_us(0.99)),
            "segment_rotations": level.rotations,
            "ratio": common::finite(ratio),
            "ratio_vs_prewritten_fio": common::finite(level.appends_per_s() / fio_pre.per_s()),
            "rounds": level.rounds,
        }));
    }
    common::print_table(
        &[
            "writers",
            "appends/s",
            "batches/s",
            "rec/batch",
            "p50 µs",
            "p99 µs",
            "WAL MB/s",
            "rotations",
            "÷ fdatasync/s",
            "÷ pre-written",
        ],
        &rows,
    );
    println!("fio commands (first round; the file name changes each round):");
    println!("  {}", fio.command.as_deref().unwrap_or(""));
    println!("  {}", fio_pre.command.as_deref().unwrap_or(""));

    let headline = results
        .iter()
        .find(|(p, _)| *p == Phase::Engine { writers: top, ack: Ack::Callback })
        .map(|(_, l)| l.appends_per_s())
        .ok_or_else(|| anyhow!("no result at {top} writers"))?;
    let ratio = headline / fio_pre.per_s();
    let report = Report {
        bench: BENCH.into(),
        metric: format!(
            "durable 8 KiB appends/s with {top} writers ÷ fio fdatasyncs/s (8 KiB write + \
             fdatasync, prewritten file)"
        ),
        xdevice: headline,
        reference: fio_pre.per_s(),
        ratio,
        goal: format!("≥ {GOAL}"),
        met: ratio >= GOAL,
        details: json!({
            "entry_bytes": ENTRY_BYTES,
            "seconds_per_phase": seconds,
            "rounds": rounds,
            "segment_bytes": format.segment_bytes,
            "compress": config.wal.compress,
            "max_batch_records": config.wal.max_batch_records,
            "levels": levels_json,
            "ratio_vs_fresh_fio": common::finite(headline / reference),
            "fio": {
                "command": fio.command,
                "fdatasyncs_per_s": common::finite(reference),
                "rounds": fio.rounds,
            },
            "fio_prewritten": {
                "command": fio_pre.command,
                "fdatasyncs_per_s": common::finite(fio_pre.per_s()),
                "rounds": fio_pre.rounds,
            },
        }),
    };
    report.finish(&machine)?;
    Ok(())
}

fn writer_levels() -> Result<Vec<usize>> {
    let raw = std::env::var("XDEVICE_GC_WRITERS").unwrap_or_else(|_| "1,4,16,64".into());
    let mut levels = Vec::new();
    for part in raw.split(',') {
        match part.trim().parse::<usize>() {
            Ok(n) if (1..=4096).contains(&n) => levels.push(n),
            _ => bail!("XDEVICE_GC_WRITERS={raw:?}: expected comma-separated counts in 1..=4096"),
        }
    }
    levels.sort_unstable();
    levels.dedup();
    Ok(levels)
}

/// What every writer of one phase shares.
struct Writers<'a> {
    wal: &'a Wal,
    /// The append lock: holds the next log index.
    next: Mutex<u64>,
    payloads: &'a [bytes::Bytes],
    stop: AtomicBool,
    /// Set while the measured window is open: only then are latencies kept.
    measuring: AtomicBool,
    durable: AtomicU64,
}

impl Writers<'_> {
    /// One writer's loop; returns its latencies from the measured window.
    fn run(&self, ack: Ack) -> Result<Samples> {
        let mut samples = Samples::default();
        let (tx, rx) = mpsc::sync_channel::<xdevice::storage::Result<()>>(1);
        while !self.stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let ticket = {
                let mut next = self.next.lock().map_err(|_| anyhow!("append lock poisoned"))?;
                let index = *next;
                let payload = self.payloads[index as usize % self.payloads.len()].clone();
                let entry = vec![NewEntry { index, term: 1, payload: payload.into() }];
                let ticket = match ack {
                    Ack::Callback => {
                        let tx = tx.clone();
                        self.wal.append_with(
                            entry,
                            Box::new(move |r| {
                                // The writer only goes away after its last callback ran.
                                let _ = tx.send(r);
                            }),
                        )
                    }
                    Ack::Wait => self.wal.append(entry),
                }
                .context("append")?;
                *next += 1;
                ticket
            };
            match ack {
                Ack::Callback => rx.recv().context("callback channel")?.context("durability")?,
                Ack::Wait => self.wal.wait(ticket).context("wait until durable")?,
            }
            self.durable.fetch_add(1, Ordering::Relaxed);
            if self.measuring.load(Ordering::Relaxed) {
                samples.push(t.elapsed());
            }
        }
        Ok(samples)
    }
}

/// Runs one engine phase on a fresh store; adds to `level` and returns this phase's appends/s.
#[allow(clippy::too_many_arguments)]
fn run_engine(
    dir: &Path,
    format: &FormatOptions,
    config: &EngineConfig,
    writers: usize,
    ack: Ack,
    seconds: f64,
    payloads: &[bytes::Bytes],
    level: &mut Level,
) -> Result<f64> {
    let (engine, _) = common::fresh_engine(dir, Backend::Uring, format, config.clone())?;
    let wal = engine.wal();
    let shared = Writers {
        wal,
        next: Mutex::new(wal.bounds().next),
        payloads,
        stop: AtomicBool::new(false),
        measuring: AtomicBool::new(false),
        durable: AtomicU64::new(0),
    };
    let (window, durable, stats, segments, samples) = std::thread::scope(|s| -> Result<_> {
        let handles: Vec<_> = (0..writers).map(|_| s.spawn(|| shared.run(ack))).collect();
        std::thread::sleep(WARMUP);
        let (d0, s0, g0) = (shared.durable.load(Ordering::Relaxed), wal.stats(), wal.segments());
        let t0 = Instant::now();
        shared.measuring.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs_f64(seconds));
        let (d1, s1, g1) = (shared.durable.load(Ordering::Relaxed), wal.stats(), wal.segments());
        let window = t0.elapsed().as_secs_f64();
        shared.measuring.store(false, Ordering::Relaxed);
        shared.stop.store(true, Ordering::Relaxed);
        let mut samples = Samples::default();
        for h in handles {
            let got = h.join().map_err(|_| anyhow!("a writer thread panicked"))??;
            samples.extend(&got);
        }
        let stats = (s1.batches - s0.batches, s1.records - s0.records, s1.bytes - s0.bytes);
        Ok((window, d1 - d0, stats, (g1.len() - g0.len()) as u64, samples))
    })?;
    engine.close().context("close the engine")?;
    let rate = durable as f64 / window;
    level.seconds += window;
    level.appends += durable;
    level.batches += stats.0;
    level.records += stats.1;
    level.bytes += stats.2;
    level.rotations += segments;
    level.latency.extend(&samples);
    level.rounds.push(json!({
        "appends_per_s": common::finite(rate),
        "batches_per_s": common::finite(stats.0 as f64 / window),
        "records_per_batch": common::finite(stats.1 as f64 / stats.0.max(1) as f64),
    }));
    Ok(rate)
}
