//! Shared plumbing of the storage benchmarks: the machine banner, the scratch directory on the
//! repository's file system, fio (run, parse, pool histograms), latency percentiles, engine setup,
//! and the `target/bench/<name>.json` report.
//!
//! Every benchmark follows one rule: its goal is a ratio against a reference measured in the
//! same run, on the same file system, so noise from a shared machine hits both sides. To make that
//! hold on a cloud disk whose flush latency swings by an order of magnitude from minute to minute,
//! the benchmarks interleave reference and xdevice phases in rounds rather than running one after
//! the other.
#![allow(dead_code)] // each benchmark uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde_json::{json, Value};

use xdevice::storage::disk::{AlignedBuf, Backend, DirVolume, Volume};
use xdevice::storage::engine::{Engine, EngineConfig, FormatOptions, Recovery};
use xdevice::storage::layout::Location;
use xdevice::storage::wal::{CommitMode, WalConfig};

/// The device name every benchmark store uses.
pub const DEVICE: &str = "bench";

/// Where the machine and the scratch directory stand; printed first and kept in the report.
#[derive(Debug, Clone)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub fs_type: String,
    pub fs_source: String,
    pub date: String,
    pub fio: String,
    pub dir: PathBuf,
}

impl Machine {
    /// Probes the machine for a benchmark whose scratch files live in `dir`. Fails (with the fix)
    /// when fio is missing, since every reference needs it.
    pub fn probe(dir: &Path) -> Result<Machine> {
        let fio = fio_version()?;
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| command_output("uname", &["-r"]).unwrap_or_default());
        let df = command_output("df", &["--output=fstype,source", &dir.to_string_lossy()])
            .unwrap_or_default();
        let mut fields = df.lines().nth(1).unwrap_or("unknown unknown").split_whitespace();
        let fs_type = fields.next().unwrap_or("unknown").to_string();
        let fs_source = fields.next().unwrap_or("unknown").to_string();
        let date = command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default();
        Ok(Machine { nproc, kernel, fs_type, fs_source, date, fio, dir: dir.to_path_buf() })
    }

    /// Prints the banner every benchmark starts with.
    pub fn print(&self, bench: &str) {
        println!("== xdevice benchmark: {bench}");
        println!(
            "machine: {} cpus, kernel {}, {} on {} ({}), {}",
            self.nproc, self.kernel, self.fs_type, self.fs_source, self.fio, self.date
        );
        println!("scratch: {}", self.dir.display());
        if matches!(self.fs_type.as_str(), "tmpfs" | "ramfs" | "overlay") {
            println!(
                "WARNING: {} is not a disk file system; durability costs measured here are not \
                 a disk's",
                self.fs_type
            );
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "nproc": self.nproc,
            "kernel": self.kernel,
            "fs_type": self.fs_type,
            "fs_source": self.fs_source,
            "date": self.date,
            "fio": self.fio,
            "scratch": self.dir.display().to_string(),
        })
    }
}

fn command_output(program: &str, args: &[&str]) -> Result<String> {
    let out =
        Command::new(program).args(args).output().with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!("{program} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The repository root (benchmarks may be built with a different `CARGO_TARGET_DIR`; their files
/// still go under the repository's own `target/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh scratch directory `target/bench-tmp/<bench>-XXXX` on the repository's file system
/// (never /tmp, which may be tmpfs), removed when the guard drops.
pub fn scratch_dir(bench: &str) -> Result<tempfile::TempDir> {
    let base = repo_root().join("target").join("bench-tmp");
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    tempfile::Builder::new()
        .prefix(&format!("{bench}-"))
        .tempdir_in(&base)
        .with_context(|| format!("create a scratch directory in {}", base.display()))
}

/// A floating-point setting from the environment, or `default`.
pub fn env_f64(name: &str, default: f64) -> Result<f64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(s) => match s.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
            _ => bail!("{name}={s:?}: expected a positive number"),
        },
    }
}

/// An integer setting from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(s) => match s.trim().parse::<usize>() {
            Ok(v) if v > 0 => Ok(v),
            _ => bail!("{name}={s:?}: expected a positive integer"),
        },
    }
}

/// Flushes dirty pages and drops the page cache, if this process may (root). Returns whether it
/// did, so the report can say so.
pub fn drop_caches() -> bool {
    // SAFETY: sync() takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

// ---------------------------------------------------------------------------------------------
// fio

fn fio_version() -> Result<String> {
    match Command::new("fio").arg("--version").output() {
        Ok(out) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        }
        Ok(out) => bail!(
            "`fio --version` failed ({}); the benchmarks need a working fio for their reference",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!(
            "fio not found ({e}): the benchmarks measure xdevice against fio on the same file \
             system. Install it: `apt-get install fio` (Debian/Ubuntu) or `dnf install fio`"
        ),
    }
}

/// The store both append benchmarks use: a 64 MiB device, default 64 MiB filled segments, the
/// group-commit thread.
pub fn append_store() -> (FormatOptions, EngineConfig) {
    let format = FormatOptions {
        device_name: DEVICE.into(),
        device_bytes: Some(64 << 20),
        ..FormatOptions::default()
    };
    let config = EngineConfig {
        wal: WalConfig { mode: CommitMode::Thread, ..WalConfig::default() },
        fill_segments: true,
        node_id: None,
    };
    (format, config)
}

/// The reference job of the append benchmarks: 8 KiB writes each followed by an fdatasync.
/// The design's reference writes a fresh file (fio fallocates it, so each fdatasync also commits
/// the conversion of unwritten extents); the prewritten variant lays the file out with data first
/// and then overwrites it, which is what xdevice's filled segments see.
pub fn fio_append_args(dir: &Path, seconds: f64, prewritten: bool) -> Vec<String> {
    let file = dir.join("fio-ref");
    let mut args = vec![
        "--name=ref".to_string(),
        format!("--filename={}", file.display()),
        "--rw=write".into(),
        "--bs=8k".into(),
        "--ioengine=sync".into(),
        "--fdatasync=1".into(),
        "--direct=0".into(),
        "--time_based".into(),
        format!("--runtime={}ms", (seconds * 1000.0).round() as u64),
    ];
    if prewritten {
        // Laying out is not timed by fio; the run then wraps over the written 64 MiB.
        args.push("--size=64m".into());
        args.push("--overwrite=1".into());
    } else {
        // Large enough that the run never wraps onto blocks it already wrote.
        args.push("--size=2g".into());
    }
    args
}

/// One fio job run: the exact command (for the report) and its `jobs[0]` object.
#[derive(Debug, Clone)]
pub struct FioRun {
    pub command: String,
    pub job: Value,
}

/// Runs fio with `args` (which must not choose an output format) and returns `jobs[0]` of its
/// `json+` output (`json` plus the latency histogram bins, which lets rounds be pooled).
pub fn run_fio(args: &[String]) -> Result<FioRun> {
    let mut full: Vec<String> = args.to_vec();
    full.push("--output-format=json+".into());
    let command = format!("fio {}", full.join(" "));
    let out = Command::new("fio").args(&full).output().context("run fio")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{command} failed ({}):\n{}\n{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // fio may print notes before the JSON document; it starts at the first '{'.
    let start = stdout.find('{').ok_or_else(|| anyhow!("{command}: no JSON in its output"))?;
    let doc: Value = serde_json::from_str(&stdout[start..])
        .with_context(|| format!("{command}: unparsable JSON output"))?;
    let job = doc
        .pointer("/jobs/0")
        .cloned()
        .ok_or_else(|| anyhow!("{command}: output has no jobs[0]"))?;
    if job.get("error").and_then(Value::as_i64).unwrap_or(0) != 0 {
        bail!("{command}: job reported error {}", job["error"]);
    }
    Ok(FioRun { command, job })
}

impl FioRun {
    /// A number at a JSON pointer inside the job, e.g. `/write/iops`.
    pub fn num(&self, pointer: &str) -> Result<f64> {
        self.job
            .pointer(pointer)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("fio output has no number at jobs[0]{pointer}"))
    }

    /// The latency histogram at `pointer` (e.g. `/sync/lat_ns`).
    pub fn hist(&self, pointer: &str) -> Result<Histogram> {
        Histogram::from_fio(&self.job, pointer)
    }
}

/// A latency histogram in nanoseconds: fio's `bins` (value → count), pooled over runs.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    bins: BTreeMap<u64, u64>,
    sum_ns: f64,
}

impl Histogram {
    fn from_fio(job: &Value, pointer: &str) -> Result<Histogram> {
        let lat = job.pointer(pointer).ok_or_else(|| anyhow!("fio output lacks {pointer}"))?;
        let bins = lat
            .get("bins")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("fio output lacks {pointer}/bins (needs json+ output)"))?;
        let mut h = Histogram::default();
        for (value, count) in bins {
            let value: u64 = value.parse().with_context(|| format!("fio bin {value:?}"))?;
            let count = count.as_u64().ok_or_else(|| anyhow!("fio bin count {count}"))?;
            *h.bins.entry(value).or_default() += count;
        }
        let n = lat.get("N").and_then(Value::as_f64).unwrap_or(0.0);
        h.sum_ns = lat.get("mean").and_then(Value::as_f64).unwrap_or(0.0) * n;
        Ok(h)
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (v, c) in &other.bins {
            *self.bins.entry(*v).or_default() += c;
        }
        self.sum_ns += other.sum_ns;
    }

    pub fn count(&self) -> u64 {
        self.bins.values().sum()
    }

    /// The `q`-quantile (0..=1) in microseconds, nearest rank.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (v, c) in &self.bins {
            seen += c;
            if seen >= rank {
                return *v as f64 / 1000.0;
            }
        }
        f64::NAN
    }

    pub fn mean_us(&self) -> f64 {
        self.sum_ns / self.count().max(1) as f64 / 1000.0
    }
}

// ---------------------------------------------------------------------------------------------
// Latency samples measured in the benchmark itself

/// Latency samples in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    ns: Vec<u64>,
    sorted: bool,
}

impl Samples {
    pub fn push(&mut self, d: Duration) {
        self.ns.push(d.as_nanos().min(u64::MAX as u128) as u64);
        self.sorted = false;
    }

    pub fn extend(&mut self, other: &Samples) {
        self.ns.extend_from_slice(&other.ns);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.ns.len()
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.ns.sort_unstable();
            self.sorted = true;
        }
    }

    /// The `q`-quantile (0..=1) in microseconds, nearest rank.
    pub fn quantile_us(&mut self, q: f64) -> f64 {
        self.sort();
        let n = self.ns.len();
        if n == 0 {
            return f64::NAN;
        }
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.ns[rank - 1] as f64 / 1000.0
    }

    pub fn mean_us(&self) -> f64 {
        let sum: u128 = self.ns.iter().map(|&v| v as u128).sum();
        sum as f64 / self.ns.len().max(1) as f64 / 1000.0
    }

    /// Microseconds of the samples above `threshold_us`, and how many there are.
    pub fn tail_above(&self, threshold_us: f64) -> (usize, f64) {
        let t = (threshold_us * 1000.0) as u64;
        let above: Vec<u64> = self.ns.iter().copied().filter(|&v| v > t).collect();
        (above.len(), above.iter().map(|&v| v as f64).sum::<f64>() / 1000.0)
    }

    /// Total of all samples, in microseconds.
    pub fn total_us(&self) -> f64 {
        self.ns.iter().map(|&v| v as f64).sum::<f64>() / 1000.0
    }
}

// ---------------------------------------------------------------------------------------------
// Engine setup

/// A directory store inside `dir`, using `backend` for its files.
pub fn location(dir: &Path, backend: Backend) -> Result<Location> {
    let volume =
        DirVolume::open(dir, backend).with_context(|| format!("open volume {}", dir.display()))?;
    Ok(Location::Directory { volume: Arc::new(volume) as Arc<dyn Volume>, name: DEVICE.into() })
}

/// Formats a fresh store in the (new, empty) directory `dir` and opens it.
pub fn fresh_engine(
    dir: &Path,
    backend: Backend,
    format: &FormatOptions,
    cfg: EngineConfig,
) -> Result<(Engine, Recovery)> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let loc = location(dir, backend)?;
    Engine::format(&loc, format).with_context(|| format!("format a store in {}", dir.display()))?;
    Engine::open(&loc, cfg).with_context(|| format!("open the store in {}", dir.display()))
}

/// `count` distinct payloads of `bytes` random (incompressible) bytes each.
pub fn random_payloads(count: usize, bytes: usize, seed: u64) -> Vec<bytes::Bytes> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let mut v = vec![0u8; bytes];
            rng.fill_bytes(&mut v);
            bytes::Bytes::from(v)
        })
        .collect()
}

/// One round's fio reference phase (`fio_append_args`) in a directory of its own under
/// `scratch`, pooled into `side`; its p50 (write + fdatasync) and fdatasyncs per second. The
/// directory is kept until the scratch directory goes: this file system may be mounted with
/// `discard`, and deleting fio's file mid-run slowed the phases after it.
pub fn fio_phase(
    side: &mut FioSide,
    scratch: &Path,
    round: usize,
    seconds: f64,
    prewritten: bool,
) -> Result<(f64, f64)> {
    let variant = if prewritten { "pre" } else { "fresh" };
    let dir = scratch.join(format!("fio-{variant}-r{round}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    side.add(&run_fio(&fio_append_args(&dir, seconds, prewritten))?)
}

/// A disk reference shaped like a WAL commit: `samples` timed { `pwrite` of one payload with
/// O_DIRECT at the next offset; `fdatasync` } after `warmup` untimed pairs, on a new file of
/// exactly that many payloads. `prewritten`: the file is written in full and synced first (as a
/// filled WAL segment is, so a sync has no extent metadata to write); otherwise only
/// fallocated (unwritten extents, as a fresh segment is). Payloads are padded to the 4 KiB
/// alignment O_DIRECT needs. The file stays until the scratch directory goes.
pub fn direct_syncs(
    path: &Path,
    warmup: usize,
    samples: usize,
    payloads: &[bytes::Bytes],
    prewritten: bool,
) -> Result<Samples> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let write_bytes = payloads.first().map_or(0, |p| p.len());
    if write_bytes == 0 || write_bytes % xdevice::storage::disk::IO_ALIGN != 0 {
        bail!("direct_syncs needs non-empty payloads of a multiple of 4 KiB, got {write_bytes}");
    }
    let ops = warmup + samples;
    let file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .with_context(|| format!("create {} with O_DIRECT", path.display()))?;
    let len = i64::try_from(ops * write_bytes)?;
    nix::fcntl::fallocate(file.as_raw_fd(), nix::fcntl::FallocateFlags::empty(), 0, len)
        .with_context(|| format!("fallocate {}", path.display()))?;
    if prewritten {
        let zeros = AlignedBuf::zeroed(1 << 20);
        let mut at = 0u64;
        while at < len as u64 {
            let n = (len as u64 - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)
                .with_context(|| format!("prewrite {}", path.display()))?;
            at += n as u64;
        }
    }
    file.sync_all().with_context(|| format!("sync {}", path.display()))?;
    let bufs: Vec<AlignedBuf> = payloads.iter().map(|p| AlignedBuf::from_slice_padded(p)).collect();
    let mut out = Samples::default();
    for i in 0..ops {
        let buf = &bufs[i % bufs.len()];
        let t = std::time::Instant::now();
        file.write_all_at(&buf[..write_bytes], (i * write_bytes) as u64)?;
        file.sync_data()?;
        if i >= warmup {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

/// Bytes a directory's files occupy on disk (allocated blocks), for the report.
pub fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Pooled sides of the commit benchmarks

/// Pooled fio figures of one variant.
#[derive(Debug, Default)]
pub struct FioSide {
    pub write: Histogram,
    pub sync: Histogram,
    seconds: f64,
    ios: f64,
    pub command: Option<String>,
    rounds: Vec<Value>,
}

impl FioSide {
    pub fn add(&mut self, run: &FioRun) -> Result<(f64, f64)> {
        // With the sync engine there is no submission latency: clat is the write's latency.
        let write = run.hist("/write/clat_ns")?;
        let sync = run.hist("/sync/lat_ns")?;
        let p50 = write.quantile_us(0.5) + sync.quantile_us(0.5);
        let iops = run.num("/write/iops")?;
        let runtime_s = run.num("/write/runtime")? / 1000.0;
        self.rounds.push(json!({
            "p50_us": finite(p50),
            "fdatasyncs_per_s": finite(iops),
        }));
        self.write.merge(&write);
        self.sync.merge(&sync);
        self.seconds += runtime_s;
        self.ios += iops * runtime_s;
        self.command.get_or_insert_with(|| run.command.clone());
        Ok((p50, iops))
    }
    pub fn p50(&self) -> f64 {
        self.write.quantile_us(0.5) + self.sync.quantile_us(0.5)
    }
    pub fn p99(&self) -> f64 {
        self.write.quantile_us(0.99) + self.sync.quantile_us(0.99)
    }
    pub fn mean(&self) -> f64 {
        self.write.mean_us() + self.sync.mean_us()
    }
    pub fn per_s(&self) -> f64 {
        self.ios / self.seconds.max(f64::MIN_POSITIVE)
    }
    pub fn to_json(&self) -> Value {
        json!({
            "command": self.command,
            "ios": self.write.count(),
            "write_p50_us": finite(self.write.quantile_us(0.5)),
            "sync_p50_us": finite(self.sync.quantile_us(0.5)),
            "p50_us": finite(self.p50()),
            "p99_us": finite(self.p99()),
            "mean_us": finite(self.mean()),
            "fdatasyncs_per_s": finite(self.per_s()),
            "rounds": self.rounds,
        })
    }
}

/// Pooled latency samples of one measured loop (round trips or write + flush pairs).
#[derive(Debug, Default)]
pub struct LatencySide {
    pub samples: Samples,
    rounds: Vec<Value>,
}

impl LatencySide {
    pub fn add(&mut self, mut samples: Samples, extra: Value) -> f64 {
        let p50 = samples.quantile_us(0.5);
        let mut round = json!({
            "samples": samples.len(),
            "p50_us": finite(p50),
            "p99_us": finite(samples.quantile_us(0.99)),
        });
        if let (Some(r), Some(e)) = (round.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        self.rounds.push(round);
        self.samples.extend(&samples);
        p50
    }
    pub fn p50(&mut self) -> f64 {
        self.samples.quantile_us(0.5)
    }
    pub fn p99(&mut self) -> f64 {
        self.samples.quantile_us(0.99)
    }
    /// A table row: name, samples, p50, p99, mean (µs), then `last`.
    pub fn row(&mut self, name: &str, last: String) -> Vec<String> {
        vec![
            name.to_string(),
            self.samples.len().to_string(),
            us(self.p50()),
            us(self.p99()),
            us(self.samples.mean_us()),
            last,
        ]
    }
    pub fn summary(&mut self) -> Value {
        json!({
            "samples": self.samples.len(),
            "p50_us": finite(self.samples.quantile_us(0.5)),
            "p90_us": finite(self.samples.quantile_us(0.9)),
            "p99_us": finite(self.samples.quantile_us(0.99)),
            "p999_us": finite(self.samples.quantile_us(0.999)),
            "max_us": finite(self.samples.quantile_us(1.0)),
            "mean_us": finite(self.samples.mean_us()),
            "rounds": self.rounds,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Report

/// The machine-readable result, written to `target/bench/<bench>.json`.
#[derive(Debug)]
pub struct Report {
    pub bench: String,
    pub metric: String,
    pub xdevice: f64,
    pub reference: f64,
    pub ratio: f64,
    pub goal: String,
    pub met: bool,
    pub details: Value,
}

impl Report {
    /// Prints the headline and writes the JSON file; returns its path.
    pub fn finish(&self, machine: &Machine) -> Result<PathBuf> {
        println!();
        println!(
            "RESULT {}: {} = {:.3} (xdevice {} / reference {}), goal {} -> {}",
            self.bench,
            self.metric,
            self.ratio,
            figure(self.xdevice),
            figure(self.reference),
            self.goal,
            if self.met { "MET" } else { "MISSED" }
        );
        let mut details = self.details.clone();
        if let Some(obj) = details.as_object_mut() {
            obj.insert("machine".into(), machine.to_json());
            obj.insert("goal_met".into(), Value::Bool(self.met));
        }
        let doc = json!({
            "bench": self.bench,
            "metric": self.metric,
            "xdevice": finite(self.xdevice),
            "reference": finite(self.reference),
            "ratio": finite(self.ratio),
            "goal": self.goal,
            "details": details,
        });
        let dir = repo_root().join("target").join("bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.bench));
        let text = serde_json::to_string_pretty(&doc).context("encode the report")?;
        std::fs::write(&path, text + "\n").with_context(|| format!("write {}", path.display()))?;
        println!("wrote {}", path.display());
        Ok(path)
    }
}

/// A figure for the headline: three decimals below 10, one above.
fn figure(v: f64) -> String {
    if v.abs() < 10.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

/// JSON has no NaN or infinity: such a figure is written as null.
pub fn finite(v: f64) -> Value {
    if v.is_finite() {
        json!((v * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

/// Prints rows as a right-aligned text table under `header`.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    // Characters, not bytes: headers hold "µs".
    let width = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let line = |cells: &[String]| {
        let parts: Vec<String> =
            cells.iter().zip(&widths).map(|(c, w)| format!("{c:>w$}", w = *w)).collect();
        println!("  {}", parts.join("  "));
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
}

/// Formats microseconds for a table.
pub fn us(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "-".into()
    }
}

/// Rounds of a benchmark on stderr: a progress bar (indicatif) when stderr is a terminal, with
/// the phase under way; nothing otherwise, where each round's line on stdout says as much.
pub struct RoundsBar(Option<indicatif::ProgressBar>);

impl RoundsBar {
    pub fn new(bench: &str, rounds: usize) -> RoundsBar {
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return RoundsBar(None);
        }
        let style = indicatif::ProgressStyle::with_template(
            "{prefix}: round {pos}/{len} [{wide_bar}] {elapsed} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        let bar = indicatif::ProgressBar::new(rounds as u64).with_style(style);
        bar.set_prefix(bench.to_string());
        RoundsBar(Some(bar))
    }

    /// The phase now running.
    pub fn phase(&self, what: impl std::fmt::Display) {
        if let Some(b) = &self.0 {
            b.set_message(what.to_string());
        }
    }

    /// A round finished.
    pub fn round_done(&self) {
        if let Some(b) = &self.0 {
            b.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
