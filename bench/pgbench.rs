//! `pgbench`: PostgreSQL's `pgbench -N` (the simple-update transactions, one commit each) with
//! `pg_wal` on the embedded three-replica device, against PostgreSQL's own synchronous
//! streaming replication (a primary and a standby, `synchronous_commit = on`, the standby named
//! in `synchronous_standby_names`) and against one unreplicated server, all on the same real
//! disk. Goal: xdevice's TPS ≥ 1.0× synchronous replication's at 1 and at 8 clients; the ratio
//! to the unreplicated server is reported beside it, and so is the device served by member 1 of
//! three `xdevice node` members (their stores on the same disk) instead of the embedded three.
//!
//! It always runs in the QEMU guest of `ublk/guest/run` (docs/guest.md), given a raw image file
//! on this machine as a virtio disk with `cache=none` (`XDEVICE_GUEST_DISK`), so a guest fsync
//! reaches this machine's disk: tmpfs would hide the cost of every fsync the comparison is
//! about. Inside, `bench/pgbench/run` makes ext4 on that disk and sets the three up on it (each
//! initialised with `pgbench -i -s 10`), then runs the rounds: in each, every setup in turn (the
//! order rotating) runs `pgbench -N -T SECONDS` with 1 and with 8 clients. Each figure is the
//! median over the rounds; the headline is the worse of the two client counts. Beside the TPS,
//! what each transaction cost in I/O on the block devices under each setup (write requests, KiB
//! written, flushes; from the guest kernel's counters): on the WAL's device, PostgreSQL's WAL
//! pattern as the device sees it; on the disk, what reached it.
//!
//! Settings: `XDEVICE_PGBENCH_ROUNDS` (default 3), `XDEVICE_PGBENCH_SECONDS` (default 20),
//! `XDEVICE_PGBENCH_SCALE` (default 10), `XDEVICE_PGBENCH_CLIENTS` (default "1 8"),
//! `XDEVICE_GUEST_MEM` (default 6G). Needs root to prepare the guest the first time (as the
//! end-to-end tests do), and `target/release/xdevice` (built first).

#[path = "common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::json;

use common::{Machine, Report};

const BENCH: &str = "pgbench";
const GOAL: f64 = 1.0;
/// The guest disk: room for the three setups and the device's three preallocated stores.
const DISK_BYTES: u64 = 12 << 30;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() -> Result<()> {
    let root = common::repo_root();
    let scratch = root.join("target").join("bench-tmp");
    std::fs::create_dir_all(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    let machine = Machine::probe(&scratch)?;
    machine.print(BENCH);
    let xdevice = root.join("target").join("release").join("xdevice");
    if !xdevice.exists() {
        let built = Command::new(env!("CARGO"))
            .args(["build", "--release", "--bin", "xdevice"])
            .current_dir(&root)
            .status()
            .context("cargo build --release --bin xdevice")?;
        if !built.success() {
            bail!("building xdevice failed");
        }
    }
    // A fresh sparse image each run: no blocks of an earlier run's files.
    let disk = scratch.join("pgbench-disk.img");
    let _ = std::fs::remove_file(&disk);
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_BYTES))
        .with_context(|| format!("create the guest disk {}", disk.display()))?;
    if nix::unistd::geteuid().is_root() {
        let prepared =
            Command::new(root.join("ublk/guest/prepare")).status().context("ublk/guest/prepare")?;
        if !prepared.success() {
            bail!("ublk/guest/prepare failed");
        }
    }
    println!("guest disk: {} ({} GiB, raw, virtio, cache=none)", disk.display(), DISK_BYTES >> 30);
    let mut child = Command::new(root.join("ublk/guest/run"))
        .arg("--")
        .arg(root.join("bench/pgbench/run"))
        .current_dir(&root)
        .env("XDEVICE_GUEST_DISK", &disk)
        .env("XDEVICE_BIN", &xdevice)
        .env("XDEVICE_GUEST_MEM", std::env::var("XDEVICE_GUEST_MEM").unwrap_or("6G".into()))
        .stdout(Stdio::piped())
        .spawn()
        .context("ublk/guest/run")?;
    let mut tps: BTreeMap<(String, u32), Vec<f64>> = BTreeMap::new();
    // Per (setup, clients, device): each run's write requests, KiB and flushes per transaction.
    let mut io: BTreeMap<(String, u32, String), [Vec<f64>; 3]> = BTreeMap::new();
    let mut failed = None;
    let stdout = child.stdout.take().context("the guest's output")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the guest's output")?;
        println!("{line}");
        let Some(rest) = line.trim_end().strip_prefix("pgbench: ") else { continue };
        if let Some(why) = rest.strip_prefix("FAIL ") {
            failed = Some(why.to_string());
            continue;
        }
        // "round R setup S clients C tps T"
        let f: Vec<&str> = rest.split_whitespace().collect();
        if let ["round", _, "setup", setup, "clients", c, "tps", t] = f.as_slice() {
            let (Ok(c), Ok(t)) = (c.parse::<u32>(), t.parse::<f64>()) else {
                bail!("unreadable line from the guest: {line}");
            };
            tps.entry((setup.to_string(), c)).or_default().push(t);
        }
        // "io round R setup S clients C dev D tx N writes W kib K flushes F"
        if let ["io", "round", _, "setup", setup, "clients", c, "dev", dev, "tx", n, "writes", w, "kib", k, "flushes", fl] =
            f.as_slice()
        {
            let parsed = (c.parse::<u32>(), n.parse::<f64>(), w.parse::<f64>(), k.parse::<f64>());
            let (Ok(c), Ok(n), Ok(w), Ok(k), Ok(fl)) =
                (parsed.0, parsed.1, parsed.2, parsed.3, fl.parse::<f64>())
            else {
                bail!("unreadable line from the guest: {line}");
            };
            if n > 0.0 {
                let e = io.entry((setup.to_string(), c, dev.to_string())).or_default();
                for (v, x) in e.iter_mut().zip([w, k, fl]) {
                    v.push(x / n);
                }
            }
        }
    }
    let status = child.wait().context("waiting for the guest")?;
    if let Some(why) = failed {
        bail!("the guest's run failed: {why}");
    }
    if !status.success() {
        bail!("the guest exited with {status}");
    }
    let clients: Vec<u32> = {
        let mut c: Vec<u32> = tps.keys().map(|(_, c)| *c).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    if clients.is_empty() {
        bail!("the guest reported no runs");
    }
    let runs: BTreeMap<String, Vec<f64>> =
        tps.iter().map(|((s, c), v)| (format!("{s}/{c}"), v.clone())).collect();
    let med = |s: &str, c: u32| -> Result<f64> {
        let mut v =
            tps.get(&(s.to_string(), c)).with_context(|| format!("no {s} runs at {c}"))?.clone();
        Ok(median(&mut v))
    };
    println!();
    println!("medians over the rounds (TPS, pgbench -N, scale 10):");
    println!(
        "  clients      plain    syncrep    xdevice  ÷ syncrep  ÷ plain     member  ÷ syncrep"
    );
    println!(
        "  -------  ---------  ---------  ---------  ---------  -------  ---------  ---------"
    );
    let mut rows = Vec::new();
    let mut worst: Option<(u32, f64, f64, f64)> = None;
    for &c in &clients {
        let (p, s, x) = (med("plain", c)?, med("syncrep", c)?, med("xdevice", c)?);
        let m = med("member", c)?;
        println!(
            "  {c:>7}  {p:>9.1}  {s:>9.1}  {x:>9.1}  {:>9.2}  {:>7.2}  {m:>9.1}  {:>9.2}",
            x / s,
            x / p,
            m / s
        );
        rows.push(json!({"clients": c, "plain_tps": p, "syncrep_tps": s, "xdevice_tps": x,
            "ratio_syncrep": x / s, "ratio_plain": x / p, "member_tps": m,
            "member_ratio_syncrep": m / s}));
        if worst.is_none_or(|(_, r, _, _)| x / s < r) {
            worst = Some((c, x / s, x, s));
        }
    }
    println!();
    println!(
        "I/O per transaction, medians over the rounds (vda: the disk; ublkb: the WAL's device):"
    );
    println!("  setup     clients  device  writes    KiB  flushes");
    let mut io_rows = Vec::new();
    for ((setup, c, dev), [w, k, fl]) in &io {
        let (w, k, fl) = (median(&mut w.clone()), median(&mut k.clone()), median(&mut fl.clone()));
        println!("  {setup:<8}  {c:>7}  {dev:<6}  {w:>6.2}  {k:>5.1}  {fl:>7.2}");
        io_rows.push(json!({"setup": setup, "clients": c, "device": dev,
            "writes_per_tx": w, "kib_per_tx": k, "flushes_per_tx": fl}));
    }
    let Some((c, ratio, x, s)) = worst else { bail!("no figures") };
    Report {
        bench: BENCH.into(),
        metric: format!(
            "pgbench -N TPS with pg_wal on the embedded 3-replica device ÷ synchronous \
             streaming replication's, the worse of the client counts ({c} here)"
        ),
        xdevice: x,
        reference: s,
        ratio,
        goal: format!("≥ {GOAL}"),
        met: clients.iter().all(
            |&c| matches!((med("xdevice", c), med("syncrep", c)), (Ok(x), Ok(s)) if x / s >= GOAL),
        ),
        details: json!({ "medians": rows, "runs": runs, "io_per_tx": io_rows,
            "disk_bytes": DISK_BYTES }),
    }
    .finish(&machine)?;
    let _ = std::fs::remove_file(&disk);
    Ok(())
}
