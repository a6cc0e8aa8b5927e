//! `ublk-device`: xdevice served as `/dev/ublkbN` with one replica and with the embedded default
//! of three, against the `rublk` loop target (the same class of userspace ublk target) and the
//! kernel loop device with direct I/O, all backed by tmpfs in the same kernel. Goal: each xdevice
//! ≥ 0.8× rublk's IOPS on 4 KiB random read (a working set eight times the hot cache, so reads
//! reach the replicas' images) and random write at QD32 and on 1 MiB sequential write, and an
//! 8 KiB write + fdatasync p50 ≤ 1.5× rublk's; the kernel loop device reported beside it.
//!
//! Each round does every target in turn (the order rotates each round):
//! - **xdevice** and **xdevice-3**: `xdevice serve --dir <tmpfs>/xdevice --size SIZE --replicas
//!   1 (or 3) --cache CACHE --mode writeback` (default queues and depth: 1 queue of 64), a fresh
//!   data directory each round;
//! - **rublk loop**: `rublk add loop -f <tmpfs>/backing.img` with rublk's defaults (1 queue of
//!   128, 512 KiB I/O buffers, O_DIRECT on the backing file, volatile write cache advertised,
//!   FLUSH = fsync of the file);
//! - **kernel loop**: `losetup --direct-io=on -f --show <tmpfs>/backing.img`.
//!
//! The backing file (SIZE bytes, made fresh each round, shared by the two loop targets) and
//! xdevice's data directory live on the same tmpfs. Before its jobs, each device is written once
//! in full with 1 MiB sequential writes (not a measurement: so that random reads read data, not
//! holes or never-written blocks). Then, with fio on the block device (`--direct=1
//! --ioengine=libaio`, the same job for every target, `--time_based` with a ramp):
//! 4 KiB random read at iodepth 32, 4 KiB random write at iodepth 32 (IOPS), 1 MiB sequential
//! write at iodepth 8 (MiB/s), and 8 KiB write + fdatasync at iodepth 1, whose latency is the
//! write's p50 plus the fdatasync's p50, as in `wal-append` (p99 likewise). A row of its own,
//! not part of the goal: 4 KiB random read at iodepth 32 over the first CACHE/4 bytes only,
//! which xdevice serves from its hot cache.
//!
//! After the prewrite and after every write job the device is flushed (an fsync of the block
//! device), untimed, so that no job inherits the previous one's backlog (a writeback device may
//! complete writes it has not committed yet; xdevice did until it completed them at commit, and
//! was then still committing seconds of writes when fio stopped). How long that flush took is
//! reported, and beside the goal the write rates including it. So are the CPU time (user +
//! system) and the context switches (voluntary and not, summed over its threads) of the serving
//! process (xdevice, or rublk's daemon) per I/O in each job.
//!
//! Each figure is the median over the rounds of that round's figure; the ratio is xdevice's
//! median ÷ the reference's median.
//!
//! Where the running kernel has no ublk (`/dev/ublk-control` missing and `modprobe ublk_drv`
//! failing), the benchmark runs itself again inside the QEMU guest of `ublk/guest/test-e2e
//! --rublk` (docs/guest.md) with `XDEVICE_UBLK_BENCH_INNER=1`, relays its output and exit status,
//! and copies its report to `target/bench/ublk-device.json`. Needs root.
//!
//! Settings: `XDEVICE_BENCH_ROUNDS` (default 5), `XDEVICE_BENCH_SECONDS` (each fio job's
//! measured time; default 3), `XDEVICE_BENCH_RAMP` (seconds of each job before measuring;
//! default 1), `XDEVICE_BENCH_SIZE_MIB` (device and backing file size; default 256),
//! `XDEVICE_BENCH_CACHE_MIB` (xdevice's `--cache`; default 32),
//! `XDEVICE_BENCH_DIR` (a tmpfs directory for the backing data; default `/dev/shm`),
//! `XDEVICE_BENCH_MODE` (xdevice's `--mode`; default `writeback`), `XDEVICE_BENCH_TARGETS` (for
//! diagnosis: a comma-separated subset of `xdevice,xdevice-3,rublk,loop`), `XDEVICE_RUBLK` (the rublk
//! binary; default the guest cache's, then `PATH`), `XDEVICE_GUEST_MEM` (the guest's memory,
//! half of it its `/dev/shm`; default 8G).

#[path = "common/mod.rs"]
mod common;
#[path = "ublk_device/served.rs"]
mod served;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use common::{Histogram, Machine, Report};
use served::{output, Kind, Served};

/// The guest's memory when none is given: room on its /dev/shm for the largest target's stores.
const GUEST_MEM: &str = "8G";
const BENCH: &str = "ublk-device";
const GOAL: f64 = 0.8;
/// Set in the run inside the guest (or natively): run the rounds, do not re-execute.
const INNER_ENV: &str = "XDEVICE_UBLK_BENCH_INNER";
/// Where the inner run also puts its report, for the outer run to pick up.
const OUT_ENV: &str = "XDEVICE_UBLK_BENCH_OUT";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Xdevice,
    Xdevice3,
    Rublk,
    Loop,
}

impl Target {
    const ALL: [Target; 4] = [Target::Xdevice, Target::Xdevice3, Target::Rublk, Target::Loop];
    /// The targets measured against the goal.
    const OURS: [Target; 2] = [Target::Xdevice, Target::Xdevice3];

    fn key(self) -> &'static str {
        match self {
            Target::Xdevice => "xdevice",
            Target::Xdevice3 => "xdevice-3",
            Target::Rublk => "rublk",
            Target::Loop => "loop",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Target::Xdevice => "xdevice (1 replica)",
            Target::Xdevice3 => "xdevice (3 replicas)",
            Target::Rublk => "rublk loop",
            Target::Loop => "kernel loop (dio)",
        }
    }

    fn replicas(self) -> Option<u32> {
        match self {
            Target::Xdevice => Some(1),
            Target::Xdevice3 => Some(3),
            Target::Rublk | Target::Loop => None,
        }
    }
}

/// The measured jobs, in the order each target runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    RandRead,
    /// Random reads over a region the hot cache holds: xdevice's cache, not its replicas.
    CachedRead,
    RandWrite,
    SeqWrite,
    SyncWrite,
}

impl Job {
    const ALL: [Job; 5] =
        [Job::RandRead, Job::CachedRead, Job::RandWrite, Job::SeqWrite, Job::SyncWrite];

    fn key(self) -> &'static str {
        match self {
            Job::RandRead => "randread_4k_qd32",
            Job::CachedRead => "randread_cached_4k_qd32",
            Job::RandWrite => "randwrite_4k_qd32",
            Job::SeqWrite => "seqwrite_1m_qd8",
            Job::SyncWrite => "write_fdatasync_8k_qd1",
        }
    }

    /// The key of its figures.
    fn metric(self) -> &'static str {
        match self {
            Job::RandRead => "randread",
            Job::CachedRead => "cachedread",
            Job::RandWrite => "randwrite",
            Job::SeqWrite => "seqwrite",
            Job::SyncWrite => "sync",
        }
    }

    /// fio's options for this job (besides file, size, engine and timing).
    fn args(self) -> &'static [&'static str] {
        match self {
            Job::RandRead | Job::CachedRead => &["--rw=randread", "--bs=4k", "--iodepth=32"],
            Job::RandWrite => &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
            Job::SeqWrite => &["--rw=write", "--bs=1M", "--iodepth=8"],
            // Total-latency percentiles (submission + completion): json+ then has the
            // write's lat_ns bins, as it has the fdatasync's.
            Job::SyncWrite => &[
                "--rw=write",
                "--bs=8k",
                "--iodepth=1",
                "--fdatasync=1",
                "--lat_percentiles=1",
                "--clat_percentiles=0",
            ],
        }
    }
}

struct Settings {
    rounds: usize,
    seconds: f64,
    ramp: f64,
    size_mib: usize,
    cache_mib: usize,
    dir: PathBuf,
    mode: String,
    targets: Vec<Target>,
    xdevice: PathBuf,
    rublk: PathBuf,
}

fn main() -> Result<()> {
    if std::env::var_os(INNER_ENV).is_none() && !ublk_here() {
        return relay_through_guest();
    }
    run()
}

// ---------------------------------------------------------------------------------------------
// Outside: no ublk in this kernel

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this kernel serves ublk devices (loading the driver if we may).
fn ublk_here() -> bool {
    let control = Path::new("/dev/ublk-control");
    if control.exists() {
        return true;
    }
    if !is_root() {
        return false;
    }
    let loaded = Command::new("modprobe")
        .args(["-q", "ublk_drv"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if loaded {
        for _ in 0..50 {
            if control.exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    false
}

/// Runs this very binary inside the guest kernel (`ublk/guest/test-e2e --rublk`), relays its
/// status and copies its report to `target/bench/`.
fn relay_through_guest() -> Result<()> {
    if !is_root() {
        bail!("{BENCH} needs root: it creates block devices (and here, boots a guest kernel)");
    }
    let exe = std::env::current_exe().context("locating this benchmark's binary")?;
    let root = common::repo_root();
    let base = root.join("target").join("bench-tmp");
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    // On the host's root file system, which the guest shares read-write at the same path.
    let out = tempfile::Builder::new()
        .prefix(&format!("{BENCH}-guest-"))
        .tempdir_in(&base)
        .context("a directory for the guest's report")?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "== {BENCH}: this kernel ({}) has no ublk driver; running the benchmark in the QEMU guest \
         (ublk/guest/test-e2e --rublk {})",
        kernel.trim(),
        exe.display()
    );
    // The guest's /dev/shm is half its memory, and the embedded three's stores alone (each an
    // image and up to nine filled 64 MiB WAL segments) take about 2.5 GiB of it: with the
    // guest's default 4 GiB they ran out of room mid-run.
    let mem = std::env::var("XDEVICE_GUEST_MEM").unwrap_or_else(|_| GUEST_MEM.to_string());
    let status = Command::new(root.join("ublk/guest/test-e2e"))
        .arg("--rublk")
        .arg(&exe)
        .env("XDEVICE_GUEST_MEM", mem)
        .env(INNER_ENV, "1")
        .env(OUT_ENV, out.path())
        .env("XDEVICE_GUEST_OUT", out.path())
        .current_dir(&root)
        .status()
        .context("run ublk/guest/test-e2e")?;
    let report = out.path().join(format!("{BENCH}.json"));
    if report.exists() {
        let dir = root.join("target").join("bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let dest = dir.join(format!("{BENCH}.json"));
        std::fs::copy(&report, &dest)
            .with_context(|| format!("copy {} to {}", report.display(), dest.display()))?;
        println!("copied the guest's report to {}", dest.display());
    }
    if !status.success() {
        bail!("the benchmark in the guest failed ({status})");
    }
    if !report.exists() {
        bail!("the guest run succeeded but left no report in {}", out.path().display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inside: the rounds

fn settings() -> Result<Settings> {
    let rounds = common::env_usize("XDEVICE_BENCH_ROUNDS", 5)?;
    let seconds = common::env_f64("XDEVICE_BENCH_SECONDS", 3.0)?;
    let ramp = common::env_f64("XDEVICE_BENCH_RAMP", 1.0)?;
    let size_mib = common::env_usize("XDEVICE_BENCH_SIZE_MIB", 256)?;
    let cache_mib = common::env_usize("XDEVICE_BENCH_CACHE_MIB", 32)?;
    if cache_mib * 8 > size_mib || cache_mib < 16 {
        bail!(
            "XDEVICE_BENCH_CACHE_MIB={cache_mib} with a {size_mib} MiB device: the device must be \
             at least 8× the cache (or random reads measure the cache), and the cache at least \
             16 MiB (serve's minimum)"
        );
    }
    let dir = PathBuf::from(std::env::var("XDEVICE_BENCH_DIR").unwrap_or("/dev/shm".into()));
    let mode = std::env::var("XDEVICE_BENCH_MODE").unwrap_or("writeback".into());
    if !matches!(mode.as_str(), "writeback" | "writethrough") {
        bail!("XDEVICE_BENCH_MODE={mode:?}: expected writeback or writethrough");
    }
    let targets = match std::env::var("XDEVICE_BENCH_TARGETS") {
        Err(_) => Target::ALL.to_vec(),
        Ok(list) => list
            .split(',')
            .map(|t| {
                Target::ALL
                    .into_iter()
                    .find(|x| x.key() == t.trim())
                    .ok_or_else(|| anyhow!("XDEVICE_BENCH_TARGETS: unknown target {t:?}"))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    if targets.is_empty() {
        bail!("XDEVICE_BENCH_TARGETS names no target");
    }
    let xdevice = PathBuf::from(env!("CARGO_BIN_EXE_xdevice"));
    if !xdevice.exists() {
        bail!("{} is missing (cargo builds it with the benchmark)", xdevice.display());
    }
    Ok(Settings {
        rounds,
        seconds,
        ramp,
        size_mib,
        cache_mib,
        dir,
        mode,
        targets,
        xdevice,
        rublk: rublk()?,
    })
}

/// The rublk binary: `XDEVICE_RUBLK`, the guest cache's (`ublk/guest/prepare --rublk`), `PATH`.
fn rublk() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("XDEVICE_RUBLK") {
        return Ok(PathBuf::from(p));
    }
    let cache = std::env::var("XDEVICE_GUEST_CACHE").unwrap_or("/var/cache/xdevice-guest".into());
    let cached = Path::new(&cache).join("rublk/bin/rublk");
    if cached.exists() {
        return Ok(cached);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("rublk")).find(|p| p.exists()).ok_or_else(|| {
        anyhow!("rublk not found: build it with `ublk/guest/prepare --rublk` or set XDEVICE_RUBLK")
    })
}

/// The fio options every job shares.
fn fio_args(name: &str, dev: &str, size_mib: usize) -> Vec<String> {
    vec![
        format!("--name={name}"),
        format!("--filename={dev}"),
        format!("--size={size_mib}m"),
        "--direct=1".into(),
        "--ioengine=libaio".into(),
    ]
}

fn timed(mut args: Vec<String>, s: &Settings) -> Vec<String> {
    args.push("--time_based".into());
    args.push(format!("--runtime={}ms", (s.seconds * 1000.0).round() as u64));
    args.push(format!("--ramp_time={}ms", (s.ramp * 1000.0).round() as u64));
    args
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Context switches (voluntary and involuntary) of each live thread of process `pid`, by id.
fn context_switches(pid: u32) -> Option<std::collections::HashMap<String, u64>> {
    let mut threads = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let task = task.ok()?;
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        let mut n = 0u64;
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().ok()?;
            }
        }
        threads.insert(task.file_name().to_string_lossy().into_owned(), n);
    }
    Some(threads)
}

/// Context switches between two samples: per thread, so a thread that exited in between (a
/// blocking-pool thread past its keep-alive) does not take its lifetime's count with it, and
/// one that started counts from zero.
fn switches_between(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
) -> f64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum::<u64>() as f64
}

/// CPU time (user + system, all threads, including exited ones) of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// Waits until everything written to `dev` is durable (an fsync of the block device: a FLUSH
/// to the target), outside any measurement, so that no job inherits the previous one's
/// backlog. Returns the seconds it took. A writeback device that completes writes before they
/// are committed may still hold many after a write job; a flush waits for all of them (and
/// xdevice fails one with EIO after its 30 s I/O timeout, so retry).
fn drain(dev: &str) -> Result<f64> {
    let t = Instant::now();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .with_context(|| format!("open {dev} to flush it"))?;
    let mut tries = 0;
    loop {
        match file.sync_all() {
            Ok(()) => return Ok(t.elapsed().as_secs_f64()),
            Err(e) if tries < 10 => {
                tries += 1;
                eprintln!("{BENCH}: flushing {dev}: {e}; retrying");
            }
            Err(e) => return Err(e).with_context(|| format!("flush {dev}")),
        }
    }
}

/// One target's figures over the rounds: per figure key (e.g. `randread`, `randread_cpu_us`),
/// one value per round.
#[derive(Debug, Default)]
struct Side {
    figures: std::collections::BTreeMap<String, Vec<f64>>,
    /// Pooled over the rounds.
    sync_write: Histogram,
    sync_sync: Histogram,
    commands: Vec<String>,
    notes: Vec<String>,
    rounds: Vec<Value>,
}

impl Side {
    fn push(&mut self, key: &str, v: f64) {
        self.figures.entry(key.to_string()).or_default().push(v);
    }

    /// The median over the rounds of figure `key`.
    fn figure(&self, key: &str) -> f64 {
        self.figures.get(key).map_or(f64::NAN, |v| median(v))
    }

    fn to_json(&self) -> Value {
        let medians: serde_json::Map<String, Value> =
            self.figures.keys().map(|k| (k.clone(), common::finite(self.figure(k)))).collect();
        json!({
            "medians": medians,
            "pooled_write_fdatasync_8k": {
                "pairs": self.sync_sync.count(),
                "write_p50_us": common::finite(self.sync_write.quantile_us(0.5)),
                "fdatasync_p50_us": common::finite(self.sync_sync.quantile_us(0.5)),
                "p50_us": common::finite(
                    self.sync_write.quantile_us(0.5) + self.sync_sync.quantile_us(0.5)
                ),
                "p99_us": common::finite(
                    self.sync_write.quantile_us(0.99) + self.sync_sync.quantile_us(0.99)
                ),
            },
            "notes": self.notes,
            "fio_commands": self.commands,
            "rounds": self.rounds,
        })
    }
}

/// Serves `target`, prewrites it, runs every job, removes it; adds the figures to `side`.
/// Returns a short line for the round's progress report.
fn run_target(
    target: Target,
    s: &Settings,
    work: &Path,
    backing: &Path,
    side: &mut Side,
) -> Result<String> {
    let t0 = Instant::now();
    let mut served = Served::start(target, s, work, backing)?;
    let setup_s = t0.elapsed().as_secs_f64();
    let dev = served.path().to_string();
    let pid = served.pid();
    if let Kind::Loop { dio, .. } = &served.0 {
        let note = format!("/sys/block/loopN/loop/dio = {dio}");
        if !side.notes.contains(&note) {
            side.notes.push(note);
        }
    }
    let first = side.commands.is_empty();
    let mut round = json!({ "device": dev, "setup_s": common::finite(setup_s) });

    // Every block written once, so random reads read data.
    let mut pre = fio_args("prewrite", &dev, s.size_mib);
    pre.extend(["--rw=write", "--bs=1M", "--iodepth=8"].map(String::from));
    let run = common::run_fio(&pre)?;
    let prewrite = run.num("/write/bw_bytes")? / (1 << 20) as f64;
    let prewrite_drain = drain(&dev)?;
    if first {
        side.commands.push(run.command.clone());
    }
    side.push("setup_s", setup_s);
    side.push("prewrite_mib_s", prewrite);
    side.push("prewrite_drain_s", prewrite_drain);
    round["prewrite_mib_s"] = common::finite(prewrite);
    round["prewrite_drain_s"] = common::finite(prewrite_drain);

    let mut line = target.key().to_string();
    for job in Job::ALL {
        let region = if job == Job::CachedRead { s.cache_mib / 4 } else { s.size_mib };
        if job == Job::CachedRead {
            // Untimed: the region read twice, so the hot cache holds it (S3-FIFO keeps a block
            // in its main queue from the second access) and the job measures hits, not fills.
            for pass in 0..2 {
                let mut warm = fio_args(&format!("warm{pass}"), &dev, region);
                warm.extend(["--rw=read", "--bs=64k", "--iodepth=8"].map(String::from));
                common::run_fio(&warm)?;
            }
        }
        let mut args = fio_args(job.key(), &dev, region);
        args.extend(job.args().iter().map(|a| a.to_string()));
        let cpu0 = pid.and_then(cpu_seconds);
        let cs0 = pid.and_then(context_switches);
        let run = common::run_fio(&timed(args, s))?;
        let cpu1 = pid.and_then(cpu_seconds);
        let cs1 = pid.and_then(context_switches);
        let read_job = matches!(job, Job::RandRead | Job::CachedRead);
        // Untimed: what the device still owes (nothing for a read job).
        let drain_s = if read_job { 0.0 } else { drain(&dev)? };
        if first {
            side.commands.push(run.command.clone());
        }
        let ios = run.num("/read/total_ios")? + run.num("/write/total_ios")?;
        let runtime_s = run.num("/job_runtime")? / 1000.0;
        let key = job.metric();
        let mut fig = json!({ "ios": ios, "drain_s": common::finite(drain_s) });
        if let (Some(a), Some(b)) = (cpu0, cpu1) {
            // Includes the ramp's I/Os in the CPU time but not in `ios`: an overestimate by
            // about ramp / (ramp + runtime), the same for every target.
            let per_io = (b - a) * 1e6 / ios.max(1.0);
            side.push(&format!("{key}_cpu_us_per_io"), per_io);
            fig["target_cpu_us_per_io"] = common::finite(per_io);
        }
        if let (Some(a), Some(b)) = (&cs0, &cs1) {
            let per_io = switches_between(a, b) / ios.max(1.0);
            side.push(&format!("{key}_cs_per_io"), per_io);
            fig["target_context_switches_per_io"] = common::finite(per_io);
        }
        side.push(&format!("{key}_drain_s"), drain_s);
        match job {
            Job::RandRead | Job::CachedRead | Job::RandWrite => {
                let iops = run.num(if read_job { "/read/iops" } else { "/write/iops" })?;
                side.push(key, iops);
                if !read_job {
                    // Writes per second including the time to make them durable afterwards.
                    side.push(&format!("{key}_with_drain"), ios / (runtime_s + drain_s));
                }
                fig["iops"] = common::finite(iops);
                line += &format!(" {key} {iops:.0}");
            }
            Job::SeqWrite => {
                let mib = run.num("/write/bw_bytes")? / (1 << 20) as f64;
                side.push(key, mib);
                let with_drain = ios / (runtime_s + drain_s);
                side.push(&format!("{key}_with_drain"), with_drain);
                fig["mib_s"] = common::finite(mib);
                line += &format!(" {key} {mib:.0} MiB/s");
            }
            Job::SyncWrite => {
                // libaio: the write's total latency (submission + completion); fio issues the
                // fdatasync itself once the write completed.
                let write = run.hist("/write/lat_ns")?;
                let sync = run.hist("/sync/lat_ns")?;
                let p50 = write.quantile_us(0.5) + sync.quantile_us(0.5);
                let p99 = write.quantile_us(0.99) + sync.quantile_us(0.99);
                side.push("sync_p50", p50);
                side.push("sync_p99", p99);
                side.sync_write.merge(&write);
                side.sync_sync.merge(&sync);
                fig["pairs"] = json!(sync.count());
                fig["write_p50_us"] = common::finite(write.quantile_us(0.5));
                fig["fdatasync_p50_us"] = common::finite(sync.quantile_us(0.5));
                fig["p50_us"] = common::finite(p50);
                fig["p99_us"] = common::finite(p99);
                line += &format!(" sync p50 {p50:.0}us");
            }
        }
        if drain_s >= 0.5 {
            line += &format!(" (+{drain_s:.1}s drain)");
        }
        round[job.key()] = fig;
    }
    let t1 = Instant::now();
    served.stop()?;
    let teardown_s = t1.elapsed().as_secs_f64();
    drop(served);
    // The stores' room on the tmpfs, for the next target of the round.
    if target.replicas().is_some() {
        let dir = work.join(target.key());
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    side.push("teardown_s", teardown_s);
    round["teardown_s"] = common::finite(teardown_s);
    side.rounds.push(round);
    Ok(line)
}

/// One row of the summary: a metric, each target's median, the ratios.
struct Row {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    /// The goal for xdevice ÷ rublk, if the row has one.
    goal: Option<Goal>,
}

#[derive(Clone, Copy)]
enum Goal {
    /// A rate: at least this ratio.
    AtLeast(f64),
    /// A latency: at most this ratio.
    AtMost(f64),
}

impl Goal {
    fn met(self, ratio: f64) -> bool {
        match self {
            Goal::AtLeast(g) => ratio >= g,
            Goal::AtMost(g) => ratio <= g,
        }
    }

    fn text(self) -> String {
        match self {
            Goal::AtLeast(g) => format!("≥ {g}"),
            Goal::AtMost(g) => format!("≤ {g}"),
        }
    }

    /// How far from missing: 1 or more is met, the lower the worse (NaN, a missing figure, is
    /// the worst).
    fn margin(self, ratio: f64) -> f64 {
        match self {
            Goal::AtLeast(g) => ratio / g,
            Goal::AtMost(g) => g / ratio,
        }
    }
}

const ROWS: [Row; 6] = [
    Row {
        key: "randread",
        label: "4 KiB random read, QD32, 8× the cache",
        unit: "IOPS",
        goal: Some(Goal::AtLeast(GOAL)),
    },
    Row {
        key: "cachedread",
        label: "4 KiB random read, QD32, within the cache",
        unit: "IOPS",
        goal: None,
    },
    Row {
        key: "randwrite",
        label: "4 KiB random write, QD32",
        unit: "IOPS",
        goal: Some(Goal::AtLeast(GOAL)),
    },
    Row {
        key: "seqwrite",
        label: "1 MiB sequential write, QD8",
        unit: "MiB/s",
        goal: Some(Goal::AtLeast(GOAL)),
    },
    Row {
        key: "sync_p50",
        label: "8 KiB write + fdatasync p50",
        unit: "µs",
        goal: Some(Goal::AtMost(1.5)),
    },
    Row { key: "sync_p99", label: "8 KiB write + fdatasync p99", unit: "µs", goal: None },
];

/// Rows beside the goal: what each target's process spent, and the writes' cost to drain.
const INFO_ROWS: [(&str, &str); 15] = [
    ("randwrite_with_drain", "4 KiB random write incl. drain (IOPS)"),
    ("seqwrite_with_drain", "1 MiB sequential write incl. drain (MiB/s)"),
    ("randread_cpu_us_per_io", "target CPU per 4 KiB read (µs)"),
    ("randwrite_cpu_us_per_io", "target CPU per 4 KiB write (µs)"),
    ("seqwrite_cpu_us_per_io", "target CPU per 1 MiB write (µs)"),
    ("sync_cpu_us_per_io", "target CPU per 8 KiB write + fdatasync (µs)"),
    ("cachedread_cpu_us_per_io", "target CPU per 4 KiB cached read (µs)"),
    ("randread_cs_per_io", "target context switches per 4 KiB read"),
    ("cachedread_cs_per_io", "target context switches per 4 KiB cached read"),
    ("randwrite_cs_per_io", "target context switches per 4 KiB write"),
    ("seqwrite_cs_per_io", "target context switches per 1 MiB write"),
    ("sync_cs_per_io", "target context switches per 8 KiB write + fdatasync"),
    ("randwrite_drain_s", "flush after the random writes (s)"),
    ("seqwrite_drain_s", "flush after the sequential writes (s)"),
    ("prewrite_mib_s", "prewrite, 1 MiB QD8, not time-based (MiB/s)"),
];

fn fmt_fig(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn run() -> Result<()> {
    let s = settings()?;
    if !is_root() {
        bail!("{BENCH} needs root: it creates block devices");
    }
    // The kernel loop device's driver may be a module.
    let _ = Command::new("modprobe").args(["-q", "loop"]).status();
    std::fs::create_dir_all(&s.dir).with_context(|| format!("create {}", s.dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{BENCH}-"))
        .tempdir_in(&s.dir)
        .with_context(|| format!("create a scratch directory in {}", s.dir.display()))?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    let guest = std::env::var("XDEVICE_GUEST").is_ok_and(|v| v == "1");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
        })
        .unwrap_or_default();
    println!(
        "where: {} (cpu: {cpu})",
        if guest {
            "QEMU guest (TCG emulation): absolute figures are emulation's, only ratios count"
        } else {
            "natively"
        }
    );
    if machine.fs_type != "tmpfs" {
        println!("WARNING: {} is {}, not tmpfs", s.dir.display(), machine.fs_type);
    }
    let rublk_version = output(Command::new(&s.rublk).arg("--version")).unwrap_or_default();
    let timing = match served::guest_raft_timing().join(" ") {
        t if t.is_empty() => t,
        t => format!("{t} "),
    };
    let targets_json = json!({
        "xdevice": format!(
            "xdevice serve --replicas 1 --cache {}M --mode {} --size {}M {}(defaults: 1 queue, \
             depth 64, max I/O 1 MiB, io_uring backend, 64 MiB zero-filled WAL segments)",
            s.cache_mib, s.mode, s.size_mib, timing
        ),
        "xdevice-3": format!(
            "xdevice serve --replicas 3 --cache {}M --mode {} --size {}M {}(the embedded \
             default: three replicas in one process, each with its own directory)",
            s.cache_mib, s.mode, s.size_mib, timing
        ),
        "rublk": format!(
            "{rublk_version}: rublk add loop -f FILE (defaults: 1 queue, depth 128, 512 KiB I/O \
             buffers, O_DIRECT on the backing file, volatile write cache, FLUSH = fsync)"
        ),
        "loop": "losetup --direct-io=on -f --show FILE",
    });
    println!("targets:");
    for t in &s.targets {
        println!("  {:<20} {}", t.label(), targets_json[t.key()].as_str().unwrap_or(""));
    }
    println!(
        "workload: {} MiB device, written in full first (1 MiB, QD8) on each target each round; \
         fio --direct=1 --ioengine=libaio, {} s per job after a {} s ramp; the device flushed \
         (untimed) after every write job; {} rounds, target order rotated",
        s.size_mib, s.seconds, s.ramp, s.rounds
    );

    let mut sides: Vec<(Target, Side)> = s.targets.iter().map(|t| (*t, Side::default())).collect();
    let started = Instant::now();
    for round in 0..s.rounds {
        let work = scratch.path().join(format!("round-{round}"));
        std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
        // The loop targets' shared backing file, sparse; each target writes it in full first.
        let backing = work.join("backing.img");
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len((s.size_mib as u64) << 20))
            .with_context(|| format!("create {}", backing.display()))?;
        println!("round {}/{}:", round + 1, s.rounds);
        let n = sides.len();
        for i in 0..n {
            let (target, side) = &mut sides[(i + round) % n];
            let t = Instant::now();
            let line = run_target(*target, &s, &work, &backing, side)
                .with_context(|| format!("round {}, {}", round + 1, target.label()))?;
            println!("  {line} ({:.0} s)", t.elapsed().as_secs_f64());
        }
        std::fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    }
    let elapsed = started.elapsed().as_secs_f64();

    let fig = |t: Target, key: &str| {
        sides.iter().find(|(x, _)| *x == t).map_or(f64::NAN, |(_, side)| side.figure(key))
    };
    println!();
    println!("medians over {} rounds ({elapsed:.0} s):", s.rounds);
    let mut table = Vec::new();
    let mut metrics = serde_json::Map::new();
    // The row and target furthest from its goal, by margin (a missing figure counts worst).
    let mut worst: Option<(&Row, Target, f64, f64)> = None;
    let mut all_met = true;
    for row in &ROWS {
        let r = fig(Target::Rublk, row.key);
        let l = fig(Target::Loop, row.key);
        let mut cells = vec![format!("{} ({})", row.label, row.unit)];
        let mut ratios = Vec::new();
        let mut verdicts = Vec::new();
        let mut entry = json!({
            "label": row.label,
            "unit": row.unit,
            "rublk_loop": common::finite(r),
            "kernel_loop": common::finite(l),
            "goal": row.goal.map(|g| g.text()),
        });
        for t in Target::OURS {
            let x = fig(t, row.key);
            let ratio = x / r;
            cells.push(fmt_fig(x));
            ratios.push(format!("{ratio:.2}"));
            entry[t.key()] = common::finite(x);
            entry[format!("{}_ratio", t.key())] = common::finite(ratio);
            entry[format!("{}_ratio_kernel_loop", t.key())] = common::finite(x / l);
            if let Some(goal) = row.goal {
                let met = goal.met(ratio);
                all_met &= met;
                entry[format!("{}_met", t.key())] = Value::Bool(met);
                verdicts.push(if met { "met" } else { "MISSED" });
                let margin = goal.margin(ratio);
                if worst.is_none_or(|(_, _, _, m)| margin.is_nan() || margin < m) {
                    worst = Some((row, t, ratio, margin));
                }
            }
        }
        cells.extend([fmt_fig(r), fmt_fig(l)]);
        cells.extend(ratios);
        cells.push(match row.goal {
            Some(g) => format!("{}: {}", g.text(), verdicts.join(" / ")),
            None => "reported".into(),
        });
        table.push(cells);
        metrics.insert(row.key.into(), entry);
    }
    common::print_table(
        &[
            "",
            "xdevice 1",
            "xdevice 3",
            "rublk loop",
            "kernel loop",
            "1 ÷ rublk",
            "3 ÷ rublk",
            "goal (1 / 3)",
        ],
        &table,
    );
    println!(
        "(IOPS and MiB/s: higher is better; latency: lower is better, fio's write p50 + \
         fdatasync p50, likewise p99; each figure the median of the rounds)"
    );
    println!();
    println!("beside it (medians; target CPU = user + system time of the serving process):");
    let mut info = Vec::new();
    let mut info_json = serde_json::Map::new();
    for (key, label) in INFO_ROWS {
        let mut cells = vec![label.to_string()];
        let mut entry = json!({ "label": label });
        for t in Target::ALL {
            let v = fig(t, key);
            cells.push(fmt_fig(v));
            entry[t.key()] = common::finite(v);
        }
        info.push(cells);
        info_json.insert(key.into(), entry);
    }
    common::print_table(&["", "xdevice 1", "xdevice 3", "rublk loop", "kernel loop"], &info);
    for (t, side) in &sides {
        for note in &side.notes {
            println!("{}: {note}", t.label());
        }
    }
    if let Some((_, side)) = sides.first() {
        println!("fio commands (first round):");
        for c in &side.commands {
            println!("  {c}");
        }
    }

    let (headline, target, ratio) = match worst {
        Some((row, t, ratio, _)) => (row, t, ratio),
        None => (&ROWS[0], Target::Xdevice, f64::NAN),
    };
    let report = Report {
        bench: BENCH.into(),
        metric: format!(
            "the xdevice ÷ rublk loop ratio furthest from its goal, over 4 KiB random read \
             (8× the cache), 4 KiB random write (QD32, IOPS), 1 MiB sequential write (MiB/s) and \
             8 KiB write + fdatasync p50, for 1 and 3 replicas, medians of {} rounds; here: {}, \
             {} ({})",
            s.rounds,
            target.label(),
            headline.label,
            headline.unit
        ),
        xdevice: fig(target, headline.key),
        reference: fig(Target::Rublk, headline.key),
        ratio,
        goal: format!("≥ {GOAL} for each rate, ≤ 1.5 for the sync p50, for both"),
        met: all_met && ratio.is_finite(),
        details: json!({
            "headline_metric": headline.key,
            "metrics": Value::Object(metrics),
            "beside": Value::Object(info_json),
            "rounds": s.rounds,
            "seconds_per_job": s.seconds,
            "ramp_seconds": s.ramp,
            "size_mib": s.size_mib,
            "xdevice_cache_mib": s.cache_mib,
            "elapsed_s": common::finite(elapsed),
            "guest_tcg": guest,
            "cpu": cpu,
            "xdevice_mode": s.mode,
            "targets": targets_json,
            "sides": sides
                .iter()
                .map(|(t, side)| (t.key().to_string(), side.to_json()))
                .collect::<serde_json::Map<_, _>>(),
        }),
    };
    let path = report.finish(&machine)?;
    if let Some(out) = std::env::var_os(OUT_ENV) {
        let dest = Path::new(&out).join(format!("{BENCH}.json"));
        std::fs::copy(&path, &dest)
            .with_context(|| format!("copy the report to {}", dest.display()))?;
    }
    Ok(())
}
