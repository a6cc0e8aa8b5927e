//! `xdevice demo`: shows the storage engine working end to end on a data directory without a
//! kernel device — format, append block writes through the WAL with group commit, commit, apply,
//! checkpoint, reopen (recovery), read every block back and compare, then inspect.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::entry::{BlockOp, EntryBody, EntryPayload};
use crate::storage::engine::{Engine, EngineConfig, FormatOptions};
use crate::storage::inspect;
use crate::storage::layout::Location;
use crate::storage::state::LogId;
use crate::storage::wal::NewEntry;
use crate::storage::StorageError;

/// Runs the demo; `writes` block writes of `blocks_per_write` blocks each.
pub fn run(location: &Location, writes: u64, blocks_per_write: u64) -> Result<()> {
    let opts = FormatOptions {
        segment_bytes: 16 << 20,
        device_bytes: Some(256 << 20),
        ..FormatOptions::default()
    };
    match Engine::format(location, &opts) {
        Ok(sb) => println!(
            "formatted {} ({} bytes, uuid {})",
            location.describe(),
            sb.device_bytes,
            sb.device_uuid
        ),
        Err(StorageError::AlreadyFormatted(_)) => {
            println!("using existing store {}", location.describe())
        }
        Err(e) => return Err(e).context("format"),
    }
    let cfg = EngineConfig { fill_segments: true, ..EngineConfig::default() };
    let (engine, recovery) = Engine::open(location, cfg.clone()).context("open")?;
    println!(
        "opened: {} WAL records scanned, {} entries replayed",
        recovery.wal.records, recovery.replayed_entries
    );
    let block = engine.superblock().block_bytes as usize;
    let blocks = engine.superblock().device_bytes / block as u64;
    if blocks_per_write == 0 || blocks_per_write > blocks {
        bail!("--blocks-per-write must be in 1..={blocks}");
    }
    let start = engine.wal().bounds().next;
    let started = Instant::now();
    let mut tickets = Vec::new();
    for i in 0..writes {
        let lba = (i * blocks_per_write) % (blocks - blocks_per_write + 1);
        let data = block_pattern(start + i, (blocks_per_write as usize) * block);
        let payload = EntryPayload {
            leader_node: 1,
            body: EntryBody::Blocks(vec![BlockOp::Write { lba, data: data.into() }]),
        };
        let entry = NewEntry { index: start + i, term: 1, payload: payload.encode().into() };
        tickets.push(engine.wal().append(vec![entry]).context("append")?);
    }
    engine.wal().flush().context("flush")?;
    let elapsed = started.elapsed();
    let stats = engine.wal().stats();
    println!(
        "appended {writes} writes of {} KiB durably in {:.1} ms: {} syncs covered them ({:.1} records per sync)",
        blocks_per_write * block as u64 / 1024,
        elapsed.as_secs_f64() * 1e3,
        stats.batches,
        stats.records as f64 / stats.batches.max(1) as f64
    );
    let last = start + writes - 1;
    let term = engine.wal().term(last)?;
    engine.state().update(|s| s.committed = Some(LogId { term, node: 1, index: last }))?;
    engine.apply_through(last)?;
    engine.checkpoint()?;
    engine.close()?;
    drop(engine);
    let (engine, recovery) = Engine::open(location, cfg).context("reopen")?;
    println!(
        "reopened: {} WAL records scanned, {} entries replayed",
        recovery.wal.records, recovery.replayed_entries
    );
    verify(&engine, start, writes, blocks_per_write, blocks)?;
    engine.close()?;
    drop(engine);
    print!("{}", inspect::inspect(location)?);
    Ok(())
}

/// Reads back every block the demo wrote (the last write to each wins) and compares.
fn verify(engine: &Engine, start: u64, writes: u64, per: u64, blocks: u64) -> Result<()> {
    let block = engine.superblock().block_bytes as usize;
    let mut expected: std::collections::BTreeMap<u64, (u64, usize)> = Default::default();
    for i in 0..writes {
        let lba = (i * per) % (blocks - per + 1);
        for b in 0..per {
            expected.insert(lba + b, (start + i, b as usize));
        }
    }
    let mut buf = vec![0u8; block];
    for (&lba, &(index, nth)) in &expected {
        engine.image().read_blocks(lba, &mut buf).with_context(|| format!("read block {lba}"))?;
        let want = block_pattern(index, per as usize * block);
        if buf[..] != want[nth * block..(nth + 1) * block] {
            bail!("block {lba} does not hold what entry {index} wrote");
        }
    }
    println!("verified {} blocks: every one holds its last write", expected.len());
    Ok(())
}

fn block_pattern(index: u64, len: usize) -> Vec<u8> {
    let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
