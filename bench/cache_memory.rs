//! `cache-memory`: resident memory of the serving process while `XDEVICE_CACHE_MEMORY_GIB`
//! (default 10) GiB are written through a device whose hot cache is `XDEVICE_CACHE_MEMORY_MIB`
//! (default 256) MiB, against the goal: resident memory ≤ cache + 64 MiB.
//!
//! The serving process is this one, set up as `xdevice serve` sets up the embedded default:
//! three replicas in one process (jemalloc as configured in `xdevice::MALLOC_CONF`, data directories on the repository's file system, io_uring,
//! 64 MiB filled WAL segments, snapshots and purges as configured by default) and the device
//! pipeline with the given cache. What `serve` adds on top is the ublk queue threads and their
//! request buffers (queue depth × max I/O of address space, resident only where the kernel
//! copied data in); they are not part of this measurement.
//!
//! 16 writers issue 1 MiB writes of random (incompressible) bytes over a 1 GiB device, so the
//! 10 GiB overwrite it ten times; a FLUSH every 64 MiB per writer. Each write is a fresh copy of
//! one of 4 random 1 MiB source buffers (4 MiB of the process that a server would not hold). A sampler reads VmRSS from
//! /proc/self/status every 50 ms; the headline is the peak (VmHWM at the end agrees with it, or
//! is larger if a spike fell between samples, and the larger of the two is reported).

#[path = "common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use common::{Machine, Report};
use xdevice::device::local::{Embedded, EmbeddedOptions, EMBEDDED_LOG_CACHE_BYTES};
use xdevice::device::{CacheMode, Device, DeviceConfig};
use xdevice::replication::node::RaftTuning;
use xdevice::storage::disk::Backend;
use xdevice::storage::engine::{EngineConfig, FormatOptions};
use xdevice::storage::wal::WalConfig;

// The allocator and its settings of the `xdevice` binary (src/main.rs), so the serving process
// measured here allocates as `xdevice serve` does.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
#[used]
static malloc_conf: &[u8; xdevice::MALLOC_CONF.len()] = xdevice::MALLOC_CONF;

const BENCH: &str = "cache-memory";
const MIB: u64 = 1 << 20;
const DEVICE_BYTES: u64 = 1 << 30;
const WRITE_BYTES: usize = 1 << 20;
const WRITERS: u64 = 16;
const BLOCK: u32 = 4096;
const SOURCE_PAYLOADS: usize = 4;

/// A field of /proc/self/status in bytes (its values are in kB).
fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).map(|kb| kb * 1024)
            })
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let gib = common::env_f64("XDEVICE_CACHE_MEMORY_GIB", 10.0)?;
    let cache_mib = common::env_usize("XDEVICE_CACHE_MEMORY_MIB", 256)? as u64;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let scratch = common::scratch_dir(BENCH)?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    let total = (gib * (1u64 << 30) as f64) as u64 / WRITE_BYTES as u64 * WRITE_BYTES as u64;
    println!(
        "workload: {gib} GiB in 1 MiB random writes by {WRITERS} writers over a 1 GiB device, \
         three embedded replicas (io_uring), hot cache {cache_mib} MiB"
    );

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let baseline = status_bytes("VmRSS:");
    let opts = EmbeddedOptions {
        dir: scratch.path().join("data"),
        replicas: 3,
        format: FormatOptions {
            device_name: "xdb0".into(),
            device_bytes: Some(DEVICE_BYTES),
            block_bytes: BLOCK,
            segment_bytes: 64 << 20,
            ..FormatOptions::default()
        },
        engine: EngineConfig { fill_segments: true, wal: WalConfig::default(), node_id: None },
        backend: Backend::Uring,
        tuning: RaftTuning::default(),
        log_cache_bytes: EMBEDDED_LOG_CACHE_BYTES,
        replica_dirs: Vec::new(),
        rebuild_lost: false,
    };
    let embedded = rt.block_on(Embedded::start(opts)).context("start the replicas")?;
    rt.block_on(embedded.wait_leader(Duration::from_secs(30)))?;
    let cfg = DeviceConfig {
        cache_bytes: cache_mib * MIB,
        // As `xdevice serve` (--inflight-proposals 2).
        max_inflight_proposals: 2,
        ..DeviceConfig::new(BLOCK, DEVICE_BYTES / u64::from(BLOCK), CacheMode::Writeback)
    };
    let device = {
        let _guard = rt.enter();
        Device::start(cfg, embedded.clone())
    };
    let started_rss = status_bytes("VmRSS:");
    println!(
        "resident before start {:.0} MiB, after the replicas and device started {:.0} MiB",
        baseline as f64 / MIB as f64,
        started_rss as f64 / MIB as f64
    );

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(started_rss));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let rss = status_bytes("VmRSS:");
                peak.fetch_max(rss, Ordering::Relaxed);
                samples.push(rss);
                std::thread::sleep(Duration::from_millis(50));
            }
            samples
        })
    };
    // The writers' source data stands in for what a client sends; it is not the server's
    // memory, so it is kept small (it was 64 MiB until 2026-11-21, counted in every figure).
    let payloads = common::random_payloads(SOURCE_PAYLOADS, WRITE_BYTES, 0xcace);
    let written = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let result: Result<()> = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (device, payloads, written) = (device.clone(), payloads.clone(), written.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = w;
                let mut since_flush = 0u64;
                loop {
                    let n = written.fetch_add(WRITE_BYTES as u64, Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    let offset = (i * WRITE_BYTES as u64) % DEVICE_BYTES;
                    let data = payloads[(i % payloads.len() as u64) as usize].to_vec();
                    device.write_vec(offset, data, false).await?;
                    since_flush += WRITE_BYTES as u64;
                    if since_flush >= 64 * MIB {
                        device.flush().await?;
                        since_flush = 0;
                    }
                    i += WRITERS;
                }
                device.flush().await?;
                Ok::<(), xdevice::device::DeviceError>(())
            }));
        }
        let progress = tokio::spawn({
            let (written, device, embedded) = (written.clone(), device.clone(), embedded.clone());
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let n = written.load(Ordering::Relaxed).min(total);
                    let _ = tikv_jemalloc_ctl::epoch::advance();
                    let allocated = tikv_jemalloc_ctl::stats::allocated::read().unwrap_or(0);
                    let pending: Vec<String> = embedded
                        .running()
                        .iter()
                        .map(|n| format!("{}", n.engine.wal().stats().pending_bytes >> 20))
                        .collect();
                    eprintln!(
                        "  {:.1} of {:.1} GiB, {:.0} MiB/s, resident {:.0} MiB, allocated {} \
                         MiB (cache {} MiB, unconfirmed {} MiB, WAL pending {} MiB)",
                        n as f64 / (1u64 << 30) as f64,
                        total as f64 / (1u64 << 30) as f64,
                        n as f64 / MIB as f64 / t0.elapsed().as_secs_f64(),
                        status_bytes("VmRSS:") as f64 / MIB as f64,
                        allocated >> 20,
                        device.cache_stats().resident_bytes >> 20,
                        device.pipeline().unconfirmed_bytes >> 20,
                        pending.join("/"),
                    );
                }
            }
        });
        for t in tasks {
            t.await.context("writer task")?.context("device write")?;
        }
        progress.abort();
        // At rest (everything confirmed, freed pages returned): what stays allocated.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = tikv_jemalloc_ctl::epoch::advance();
        let allocated = tikv_jemalloc_ctl::stats::allocated::read().unwrap_or(0);
        eprintln!(
            "  at rest: resident {} MiB, allocated {} MiB (cache {} MiB)",
            status_bytes("VmRSS:") >> 20,
            allocated >> 20,
            device.cache_stats().resident_bytes >> 20
        );
        Ok(())
    });
    let seconds = t0.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    result?;
    let hwm = status_bytes("VmHWM:");
    let peak = peak.load(Ordering::Relaxed).max(hwm);
    let cache = device.cache_stats();
    let pipeline = device.pipeline();
    device.close();
    rt.block_on(embedded.shutdown())?;

    let budget = cache_mib * MIB + 64 * MIB;
    let mut sorted = samples.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    println!();
    common::print_table(
        &["what", "MiB"],
        &[
            vec!["hot cache configured".into(), format!("{cache_mib}")],
            vec!["budget (cache + 64 MiB)".into(), format!("{}", budget / MIB)],
            vec!["resident after start".into(), format!("{:.0}", started_rss as f64 / MIB as f64)],
            vec!["resident, median sample".into(), format!("{:.0}", median as f64 / MIB as f64)],
            vec!["resident, peak".into(), format!("{:.0}", peak as f64 / MIB as f64)],
            vec!["cache resident at end".into(), format!("{}", cache.resident_bytes / MIB)],
        ],
    );
    println!(
        "wrote {:.1} GiB in {seconds:.1} s ({:.0} MiB/s); cache: {} evictions, pinned at end {} \
         bytes; {} proposals",
        total as f64 / (1u64 << 30) as f64,
        total as f64 / MIB as f64 / seconds,
        cache.evictions,
        cache.pinned_bytes,
        device.stats().proposals
    );
    let ratio = peak as f64 / budget as f64;
    Report {
        bench: BENCH.into(),
        metric: "peak resident bytes ÷ (hot cache + 64 MiB)".into(),
        xdevice: peak as f64 / MIB as f64,
        reference: budget as f64 / MIB as f64,
        ratio,
        goal: "≤ 1.0".into(),
        met: ratio <= 1.0,
        details: json!({
            "gib_written": total as f64 / (1u64 << 30) as f64,
            "seconds": common::finite(seconds),
            "cache_mib": cache_mib,
            "resident_start_mib": started_rss / MIB,
            "resident_median_mib": median / MIB,
            "resident_peak_mib": peak / MIB,
            "samples": samples.len(),
            "cache": serde_json::to_value(cache)?,
            "pipeline": serde_json::to_value(pipeline)?,
            "writers": WRITERS,
            "write_bytes": WRITE_BYTES,
            "device_bytes": DEVICE_BYTES,
            "replicas": 3,
        }),
    }
    .finish(&machine)?;
    Ok(())
}
