//! `cache-read`: reads that hit the hot cache, through `Device::read_into`, against a plain
//! memory copy of the same bytes in the same run (goal: ≥ 0.5× the copy's bandwidth).
//!
//! A device with one embedded replica and the default 256 MiB cache gets 64 MiB of random
//! bytes written (1 MiB writes) and flushed: every block is then a clean cache entry, and a
//! first read of all of it confirms every block is a hit and reads back what was written. The
//! reference is a 64 MiB buffer holding the same bytes; both sides copy from a working set far
//! larger than the CPU caches, at the same random offsets, into one reused destination buffer.
//!
//! Timed, for 4 KiB and 1 MiB reads: `XDEVICE_CACHE_READ_ROUNDS` (default 5) rounds alternating
//! the copy and the device, each `XDEVICE_CACHE_READ_MIB` (default 1024) MiB; medians of the
//! rounds' bandwidths. One reader, so the figure is per-core cost, not lock contention.

#[path = "common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::json;

use common::{Machine, Report};
use xdevice::device::local::{Embedded, EmbeddedOptions, EMBEDDED_LOG_CACHE_BYTES};
use xdevice::device::{CacheMode, Device, DeviceConfig};
use xdevice::replication::node::RaftTuning;
use xdevice::storage::disk::Backend;
use xdevice::storage::engine::{EngineConfig, FormatOptions};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const BENCH: &str = "cache-read";
const MIB: u64 = 1 << 20;
const SET_BYTES: usize = 64 << 20;
const BLOCK: u32 = 4096;
const GOAL: f64 = 0.5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let rounds = common::env_usize("XDEVICE_CACHE_READ_ROUNDS", 5)?;
    let per_round = common::env_usize("XDEVICE_CACHE_READ_MIB", 1024)? as u64 * MIB;
    let scratch = common::scratch_dir(BENCH)?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    println!(
        "workload: 64 MiB written and cached, then random reads of 4 KiB and 1 MiB, {rounds} \
         rounds of {} MiB per side and size",
        per_round / MIB
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let opts = EmbeddedOptions {
        dir: scratch.path().join("data"),
        replicas: 1,
        format: FormatOptions {
            device_name: "xdb0".into(),
            device_bytes: Some(256 << 20),
            block_bytes: BLOCK,
            segment_bytes: 64 << 20,
            ..FormatOptions::default()
        },
        engine: EngineConfig::default(),
        backend: Backend::Uring,
        tuning: RaftTuning::default(),
        log_cache_bytes: EMBEDDED_LOG_CACHE_BYTES,
        replica_dirs: Vec::new(),
        rebuild_lost: false,
    };
    let embedded = rt.block_on(Embedded::start(opts)).context("start the replica")?;
    rt.block_on(embedded.wait_leader(Duration::from_secs(30)))?;
    let device = {
        let _guard = rt.enter();
        Device::start(
            DeviceConfig::new(BLOCK, (256 << 20) / u64::from(BLOCK), CacheMode::Writeback),
            embedded.clone(),
        )
    };
    let mut source = vec![0u8; SET_BYTES];
    rand::rngs::SmallRng::seed_from_u64(0xcac4e).fill(&mut source[..]);

    let rows: Vec<(usize, f64, f64)> = rt.block_on(async {
        for (i, chunk) in source.chunks(MIB as usize).enumerate() {
            device.write(i as u64 * MIB, chunk, false).await?;
        }
        device.flush().await?;
        let before = device.cache_stats();
        let mut all = vec![0u8; SET_BYTES];
        device.read_into(0, &mut all).await?;
        let after = device.cache_stats();
        if all != source {
            bail!("the device read back different bytes");
        }
        if after.misses != before.misses {
            bail!("{} blocks missed the cache after the writes", after.misses - before.misses);
        }
        let mut rows = Vec::new();
        for size in [4096usize, 1 << 20] {
            let count = (per_round / size as u64) as usize;
            let slots = SET_BYTES / size;
            let mut rng = rand::rngs::SmallRng::seed_from_u64(size as u64);
            let offsets: Vec<usize> = (0..count).map(|_| rng.gen_range(0..slots) * size).collect();
            let mut buf = vec![0u8; size];
            let (mut copy_bw, mut dev_bw) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                let t = Instant::now();
                for &o in &offsets {
                    buf.copy_from_slice(&source[o..o + size]);
                    std::hint::black_box(&mut buf);
                }
                copy_bw.push(per_round as f64 / MIB as f64 / t.elapsed().as_secs_f64());
                let t = Instant::now();
                for &o in &offsets {
                    device.read_into(o as u64, &mut buf).await?;
                    std::hint::black_box(&mut buf);
                }
                dev_bw.push(per_round as f64 / MIB as f64 / t.elapsed().as_secs_f64());
            }
            rows.push((size, median(copy_bw), median(dev_bw)));
        }
        let end = device.cache_stats();
        if end.misses != before.misses {
            bail!("timed reads missed the cache ({} blocks)", end.misses - before.misses);
        }
        Ok(rows)
    })?;
    let stats = device.cache_stats();
    device.close();
    rt.block_on(embedded.shutdown())?;

    println!();
    common::print_table(
        &["read", "memory copy MiB/s", "device (cache hit) MiB/s", "÷ copy"],
        &rows
            .iter()
            .map(|&(size, copy, dev)| {
                vec![
                    if size == 4096 { "4 KiB".into() } else { "1 MiB".into() },
                    format!("{copy:.0}"),
                    format!("{dev:.0}"),
                    format!("{:.2}", dev / copy),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let (worst, copy, dev) = rows
        .iter()
        .map(|&(size, copy, dev)| (size, copy, dev))
        .min_by(|a, b| (a.2 / a.1).total_cmp(&(b.2 / b.1)))
        .context("no rows")?;
    let ratio = dev / copy;
    Report {
        bench: BENCH.into(),
        metric: format!(
            "cache-hit read bandwidth ÷ memory copy bandwidth, the worse of 4 KiB and 1 MiB ({} \
             here)",
            if worst == 4096 { "4 KiB" } else { "1 MiB" }
        ),
        xdevice: dev,
        reference: copy,
        ratio,
        goal: format!("≥ {GOAL}"),
        met: ratio >= GOAL,
        details: json!({
            "rows": rows.iter().map(|&(size, copy, dev)| json!({
                "read_bytes": size,
                "copy_mib_s": common::finite(copy),
                "device_mib_s": common::finite(dev),
                "ratio": common::finite(dev / copy),
            })).collect::<Vec<_>>(),
            "rounds": rounds,
            "mib_per_round": per_round / MIB,
            "working_set_bytes": SET_BYTES,
            "cache": serde_json::to_value(stats)?,
        }),
    }
    .finish(&machine)?;
    Ok(())
}
