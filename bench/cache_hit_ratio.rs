//! `cache-hit-ratio`: the hot cache's hit ratio on a skewed read workload with a concurrent
//! sequential write stream, against an LRU of the same size in the same run, on the same trace.
//!
//! The trace: reads of 4 KiB blocks drawn from a Zipf distribution (exponent
//! `XDEVICE_HIT_ZIPF`, default 0.9) over 256 MiB (four times the 64 MiB cache; hot blocks
//! scattered over the range), interleaved with a sequential write stream elsewhere on the device
//! (a WAL being appended), `w` written blocks per read. The hot cache is driven exactly as the
//! device drives it: a write pins its block and its commit unpins it (clean), a read that
//! misses fills the block. The LRU reference caches what it reads and what is written (a page
//! cache). Headline: one written block per read; rows for 0, 1 and 4 show the trend.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::Result;
use rand::{Rng, SeedableRng};
use serde_json::json;

use common::{Machine, Report};
use xdevice::cache::{HotCache, Lookup};

const BENCH: &str = "cache-hit-ratio";
const BS: usize = 4096;
const CACHE_BLOCKS: u64 = 16_384;
const READ_BLOCKS: u64 = 4 * CACHE_BLOCKS;
const WAL_START: u64 = 1 << 30;

/// Least recently used, by access tick.
struct Lru {
    capacity: usize,
    tick: u64,
    at: HashMap<u64, u64>,
    order: BTreeMap<u64, u64>,
}

impl Lru {
    fn new(capacity: usize) -> Lru {
        Lru { capacity, tick: 0, at: HashMap::new(), order: BTreeMap::new() }
    }

    /// Touches `block` (inserting it); true if it was held.
    fn access(&mut self, block: u64) -> bool {
        self.tick += 1;
        let hit = match self.at.insert(block, self.tick) {
            Some(old) => {
                self.order.remove(&old);
                true
            }
            None => false,
        };
        self.order.insert(self.tick, block);
        while self.at.len() > self.capacity {
            if let Some((_, victim)) = self.order.pop_first() {
                self.at.remove(&victim);
            }
        }
        hit
    }
}

/// Zipf over `n` ranks, each rank mapped to a random block of `[0, n)`.
struct Zipf {
    cdf: Vec<f64>,
    blocks: Vec<u64>,
}

impl Zipf {
    fn new(n: u64, exponent: f64, rng: &mut impl Rng) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(exponent);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        let mut blocks: Vec<u64> = (0..n).collect();
        for i in (1..blocks.len()).rev() {
            blocks.swap(i, rng.gen_range(0..=i));
        }
        Zipf { cdf, blocks }
    }

    fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.gen();
        let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1);
        self.blocks[rank]
    }
}

struct Outcome {
    writes_per_read: u64,
    hot: f64,
    lru: f64,
    evictions: u64,
}

fn run(zipf: &Zipf, writes_per_read: u64, reads: u64, warmup: u64) -> Outcome {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let mut hot = HotCache::new(CACHE_BLOCKS * BS as u64, BS as u32);
    let mut lru = Lru::new(CACHE_BLOCKS as usize);
    let data = bytes::Bytes::from(vec![0x5au8; BS]);
    let mut out = vec![0u8; BS];
    let (mut hot_hits, mut lru_hits) = (0u64, 0u64);
    let mut wal = WAL_START;
    let mut seq = 0;
    for i in 0..warmup + reads {
        for _ in 0..writes_per_read {
            hot.pin_write(seq, wal, &data);
            hot.unpin_write(seq, wal, 1);
            lru.access(wal);
            seq += 1;
            wal += 1;
        }
        let block = zipf.sample(&mut rng);
        let counted = i >= warmup;
        match hot.lookup(block, &mut out) {
            Lookup::Hit => hot_hits += u64::from(counted),
            Lookup::Fill(token) => hot.complete_fill(block, token, &data, false),
            Lookup::Miss => {}
        }
        if lru.access(block) {
            lru_hits += u64::from(counted);
        }
    }
    Outcome {
        writes_per_read,
        hot: hot_hits as f64 / reads as f64,
        lru: lru_hits as f64 / reads as f64,
        evictions: hot.stats().evictions,
    }
}

fn main() -> Result<()> {
    let exponent = common::env_f64("XDEVICE_HIT_ZIPF", 0.9)?;
    let reads = common::env_usize("XDEVICE_HIT_READS", 2_000_000)? as u64;
    let scratch = common::scratch_dir(BENCH)?;
    let machine = Machine::probe(scratch.path())?;
    machine.print(BENCH);
    println!(
        "workload: {reads} reads, Zipf {exponent} over {} MiB, cache {} MiB (S3-FIFO hot cache \
         vs LRU), a sequential write stream of w blocks per read",
        (READ_BLOCKS * BS as u64) >> 20,
        (CACHE_BLOCKS * BS as u64) >> 20
    );
    let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
    let zipf = Zipf::new(READ_BLOCKS, exponent, &mut rng);
    let t = Instant::now();
    let outcomes: Vec<Outcome> =
        [0u64, 1, 4].iter().map(|&w| run(&zipf, w, reads, reads / 4)).collect();
    println!("simulated in {:.1} s", t.elapsed().as_secs_f64());
    println!();
    common::print_table(
        &["writes per read", "hot cache hits", "LRU hits", "÷ LRU", "hot cache evictions"],
        &outcomes
            .iter()
            .map(|o| {
                vec![
                    o.writes_per_read.to_string(),
                    format!("{:.1}%", 100.0 * o.hot),
                    format!("{:.1}%", 100.0 * o.lru),
                    format!("{:.2}", o.hot / o.lru),
                    o.evictions.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    let head = outcomes.iter().find(|o| o.writes_per_read == 1).unwrap_or(&outcomes[0]);
    let ratio = head.hot / head.lru;
    Report {
        bench: BENCH.into(),
        metric: "hit ratio of the hot cache ÷ hit ratio of an LRU of the same size, skewed reads \
                 with one sequentially written block per read"
            .into(),
        xdevice: head.hot,
        reference: head.lru,
        ratio,
        goal: "> 1 (scan resistance: the write stream does not flush the hot set)".into(),
        met: ratio > 1.0,
        details: json!({
            "zipf_exponent": exponent,
            "reads": reads,
            "cache_blocks": CACHE_BLOCKS,
            "read_range_blocks": READ_BLOCKS,
            "rows": outcomes.iter().map(|o| json!({
                "writes_per_read": o.writes_per_read,
                "hot_cache_hit_ratio": common::finite(o.hot),
                "lru_hit_ratio": common::finite(o.lru),
                "ratio": common::finite(o.hot / o.lru),
                "evictions": o.evictions,
            })).collect::<Vec<_>>(),
        }),
    }
    .finish(&machine)?;
    Ok(())
}
