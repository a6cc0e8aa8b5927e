//! `replay`: time to reopen a store whose WAL holds `XDEVICE_REPLAY_GIB` GiB, against fio reading
//! the same bytes sequentially (goal: ≤ 1.5×).
//!
//! The WAL is written with 64 KiB random (incompressible) entries, compression off (so the scan
//! measures I/O and checksums, not lz4) and large segments, then the engine is closed. With no
//! committed index, `Engine::open` is the WAL scan of every record and nothing is applied. Page
//! caches are dropped before every timed phase (xdevice reads with O_DIRECT and fio runs with
//! `--direct=1`, so neither is served from memory anyway).
//!
//! Timed, in this order: fio; the first open (a restart); fio; a second open; fio. The reference
//! is the mean of the three fio runs (they bracket the opens, so the disk's drift is shared); the
//! headline is the first open. Each open also reports the bytes the process read from storage
//! (`/proc/self/io`) and its CPU time, which show where time beyond the reference goes.
//!
//! Settings: `XDEVICE_REPLAY_GIB` (default 2; fractions allowed), `XDEVICE_REPLAY_SEGMENT_MIB`
//! (default 256).

#[path = "common/mod.rs"]
mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use common::{Machine, Report};
use xdevice::storage::disk::Backend;
use xdevice::storage::engine::{Engine, EngineConfig, FormatOptions, Recovery};
use xdevice::storage::wal::{CommitMode, NewEntry, WalConfig};

const BENCH: &str = "replay";
const ENTRY_BYTES: usize = 64 * 1024;
/// Entries per `append` call while writing the WAL (1 MiB).
const ENTRIES_PER_APPEND: usize = 16;
const GOAL: f64 = 1.5;
const MIB: f64 = (1 << 20) as f64;

fn main() -> Result<()> {
    let gib = common::env_f64("XDEVICE_REPLAY_GIB", 2.0)?;
    let segment_mib = common::env_usize("XDEVICE_REPLAY_SEGMENT_MIB", 256)?;
    let scratch = common::scratch_dir(BENCH)?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    let dir = scratch.path().join("store");
    let format = FormatOptions {
        device_name: common::DEVICE.into(),
        device_bytes: Some(64 << 20),
        segment_bytes: (segment_mib as u64) << 20,
        ..FormatOptions::default()
    };
    let config = EngineConfig {
        wal: WalConfig { mode: CommitMode::Thread, compress: false, ..WalConfig::default() },
        fill_segments: true,
        node_id: None,
    };
    let entries = ((gib * (1u64 << 30) as f64) / ENTRY_BYTES as f64).ceil() as u64;
    println!(
        "workload: WAL of {entries} entries of {} KiB random bytes ({gib} GiB), segments \
         {segment_mib} MiB (filled), compress off; io_uring backend; no committed index",
        ENTRY_BYTES / 1024
    );

    // Write the WAL (untimed, with progress).
    let write_start = Instant::now();
    let (engine, _) = common::fresh_engine(&dir, Backend::Uring, &format, config.clone())?;
    write_wal(&engine, entries)?;
    let write_s = write_start.elapsed().as_secs_f64();
    let stats = engine.wal().stats();
    engine.close().context("close after writing")?;
    drop(engine);
    let segment_files = segment_files(&dir)?;
    println!(
        "wrote {entries} entries, {:.0} MiB of records in {} segment files in {write_s:.1} s",
        stats.bytes as f64 / MIB,
        segment_files.len()
    );

    // The bytes a replay must read: every record, in its segments.
    let log_bytes = stats.bytes;
    let mut cache_dropped = true;
    let mut fio_runs = Vec::new();
    let fio_args = fio_args(&segment_files, log_bytes);
    let mut run_fio = |label: &str, dropped: &mut bool| -> Result<f64> {
        *dropped &= common::drop_caches();
        let run = common::run_fio(&fio_args)?;
        let secs = run.num("/read/runtime")? / 1000.0;
        let bytes = run.num("/read/io_bytes")?;
        println!("  fio read ({label}): {secs:.3} s, {:.0} MB/s", bytes / secs / 1e6);
        fio_runs.push(json!({
            "label": label,
            "seconds": common::finite(secs),
            "bytes": bytes,
            "mb_per_s": common::finite(bytes / secs / 1e6),
        }));
        Ok(secs)
    };

    println!("timed phases:");
    let fio1 = run_fio("before", &mut cache_dropped)?;
    cache_dropped &= common::drop_caches();
    let first = timed_open(&dir, &config, entries)?;
    println!(
        "  xdevice open #1 (restart): {:.3} s ({:.0} MB/s of log), cpu {:.3} s, read {:.0} MiB, \
         {} segment files after",
        first.seconds,
        log_bytes as f64 / first.seconds / 1e6,
        first.cpu_seconds,
        first.read_bytes as f64 / MIB,
        first.segments_after
    );
    let fio2 = run_fio("between", &mut cache_dropped)?;
    cache_dropped &= common::drop_caches();
    let second = timed_open(&dir, &config, entries)?;
    println!(
        "  xdevice open #2: {:.3} s, cpu {:.3} s, read {:.0} MiB, \
         {} segment files after",
        second.seconds,
        second.cpu_seconds,
        second.read_bytes as f64 / MIB,
        second.segments_after
    );
    let fio3 = run_fio("after", &mut cache_dropped)?;

    let reference = (fio1 + fio2 + fio3) / 3.0;
    let ratio = first.seconds / reference;
    println!();
    let rows = vec![
        vec![
            "fio sequential read (mean of 3)".into(),
            format!("{reference:.3}"),
            format!("{:.0}", log_bytes as f64 / reference / 1e6),
            "-".into(),
            format!("{:.0}", log_bytes as f64 / MIB),
            segment_files.len().to_string(),
            "1.00".into(),
        ],
        vec![
            "xdevice open #1 (restart)".into(),
            format!("{:.3}", first.seconds),
            format!("{:.0}", log_bytes as f64 / first.seconds / 1e6),
            format!("{:.3}", first.cpu_seconds),
            format!("{:.0}", first.read_bytes as f64 / MIB),
            first.segments_after.to_string(),
            format!("{ratio:.2}"),
        ],
        vec![
            "xdevice open #2".into(),
            format!("{:.3}", second.seconds),
            format!("{:.0}", log_bytes as f64 / second.seconds / 1e6),
            format!("{:.3}", second.cpu_seconds),
            format!("{:.0}", second.read_bytes as f64 / MIB),
            second.segments_after.to_string(),
            format!("{:.2}", second.seconds / reference),
        ],
    ];
    common::print_table(
        &["", "seconds", "MB/s of log", "cpu s", "read MiB", "segments after", "÷ fio"],
        &rows,
    );
    println!(
        "log: {:.0} MiB of records in {} segment files; page cache dropped before each phase: \
         {cache_dropped}",
        log_bytes as f64 / MIB,
        segment_files.len()
    );
    println!("fio command:");
    println!("  fio {}", fio_args.join(" "));

    let report = Report {
        bench: BENCH.into(),
        metric: "seconds to reopen (WAL scan) ÷ seconds for fio to read the same bytes".into(),
        xdevice: first.seconds,
        reference,
        ratio,
        goal: format!("≤ {GOAL}"),
        met: ratio <= GOAL,
        details: json!({
            "gib": gib,
            "entries": entries,
            "entry_bytes": ENTRY_BYTES,
            "segment_bytes": format.segment_bytes,
            "segments": segment_files.len(),
            "log_bytes": log_bytes,
            "write_seconds": common::finite(write_s),
            "open_first": first.to_json(),
            "open_second": second.to_json(),
            "ratio_second_open": common::finite(second.seconds / reference),
            "fio_command": format!("fio {}", fio_args.join(" ")),
            "fio_runs": fio_runs,
            "page_cache_dropped": cache_dropped,
        }),
    };
    report.finish(&machine)?;
    Ok(())
}

/// Appends `entries` 64 KiB entries in 1 MiB calls (the WAL's back-pressure bounds what is
/// queued), showing progress, then waits until all are durable.
fn write_wal(engine: &Engine, entries: u64) -> Result<()> {
    let wal = engine.wal();
    let payloads = common::random_payloads(64, ENTRY_BYTES, 0x4e91);
    let total_mib = entries as f64 * ENTRY_BYTES as f64 / MIB;
    let start = Instant::now();
    let mut last_print = start;
    let mut index = wal.bounds().next;
    let end = index + entries;
    while index < end {
        let n = (end - index).min(ENTRIES_PER_APPEND as u64);
        let batch = (index..index + n)
            .map(|i| NewEntry {
                index: i,
                term: 1,
                payload: payloads[i as usize % payloads.len()].clone().into(),
            })
            .collect();
        wal.append(batch).context("append")?;
        index += n;
        if last_print.elapsed() >= Duration::from_millis(500) {
            last_print = Instant::now();
            let done = wal.bounds().durable_next as f64 * ENTRY_BYTES as f64 / MIB;
            print!(
                "\rwriting WAL: {done:.0} / {total_mib:.0} MiB durable ({:.0} MiB/s)   ",
                done / start.elapsed().as_secs_f64()
            );
            std::io::stdout().flush().ok();
        }
    }
    wal.flush().context("flush")?;
    println!(
        "\rwriting WAL: {total_mib:.0} / {total_mib:.0} MiB durable ({:.0} MiB/s)   ",
        total_mib / start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The WAL segment files of the store, oldest first.
fn segment_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let prefix = format!("{}_log_", common::DEVICE);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no WAL segment files in {}", dir.display());
    }
    Ok(files)
}

/// fio reading `bytes` from the segment files, one file after the other (fio splits `--size`
/// evenly over the files), in 1 MiB direct reads.
fn fio_args(files: &[std::path::PathBuf], bytes: u64) -> Vec<String> {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    // A multiple of 1 MiB per file, so every read is a whole block.
    let per_file = bytes.div_ceil(files.len() as u64).next_multiple_of(1 << 20);
    vec![
        "--name=ref".into(),
        format!("--filename={}", names.join(":")),
        format!("--size={}", per_file * files.len() as u64),
        "--file_service_type=sequential".into(),
        "--rw=read".into(),
        "--bs=1M".into(),
        "--direct=1".into(),
        "--ioengine=psync".into(),
    ]
}

/// One timed `Engine::open`.
#[derive(Debug)]
struct Opened {
    seconds: f64,
    cpu_seconds: f64,
    /// Bytes this process read from storage during the open (`/proc/self/io`).
    read_bytes: u64,
    /// Segment files in the store after the open.
    segments_after: usize,
    recovery: Recovery,
}

impl Opened {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "seconds": common::finite(self.seconds),
            "cpu_seconds": common::finite(self.cpu_seconds),
            "read_bytes": self.read_bytes,
            "segments_after": self.segments_after,
            "recovery": self.recovery,
        })
    }
}

fn timed_open(dir: &Path, config: &EngineConfig, entries: u64) -> Result<Opened> {
    let loc = common::location(dir, Backend::Uring)?;
    let cpu0 = process_cpu_seconds();
    let io0 = process_io()?;
    let start = Instant::now();
    let (engine, recovery) = Engine::open(&loc, config.clone()).context("open the store")?;
    let seconds = start.elapsed().as_secs_f64();
    let cpu_seconds = process_cpu_seconds() - cpu0;
    let io1 = process_io()?;
    if recovery.wal.records < entries {
        bail!("replay found {} records, {entries} were written", recovery.wal.records);
    }
    engine.close().context("close after open")?;
    Ok(Opened {
        seconds,
        cpu_seconds,
        read_bytes: io1.saturating_sub(io0),
        segments_after: segment_files(dir)?.len(),
        recovery,
    })
}

/// Bytes this process has read from storage (`read_bytes` of `/proc/self/io`: direct reads
/// included, whichever of its threads issued them).
fn process_io() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/io").context("read /proc/self/io")?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/self/io"))
    };
    field("read_bytes:")
}

/// User + system CPU seconds of this process so far.
fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer, which points at enough memory.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return f64::NAN;
    }
    // SAFETY: getrusage returned 0, so it initialised the struct.
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
