//! `xdevice stop`: stops the daemons serving the named devices, found through their status
//! sockets: SIGTERM (the daemon stops its device, the kernel drains in-flight I/O, everything
//! completed is committed), then waits until each daemon has exited.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::exit::{bail_usage, TimedOut};
use super::serve::Unreachable;
use crate::daemon::status::{self, DeviceStatus};
use crate::daemon::DEFAULT_RUN_DIR;

#[derive(clap::Args, Debug)]
pub struct StopArgs {
    /// Devices to stop: /dev/ublkbN, ublkbN, or the data directory a device is served from.
    #[arg(value_name = "DEVICE", required_unless_present = "all")]
    pub targets: Vec<String>,
    /// Stop every device with a status socket in --run-dir.
    #[arg(long, conflicts_with = "targets")]
    pub all: bool,
    /// How long to wait for each daemon to finish (exit status 4 past it; the daemon goes on
    /// stopping).
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Directory of the daemons' status sockets.
    #[arg(long, default_value = DEFAULT_RUN_DIR, env = "XDEVICE_RUN_DIR")]
    pub run_dir: PathBuf,
    /// Print JSON: the devices stopped, each with its daemon's pid and how long it took.
    #[arg(long)]
    pub json: bool,
}

/// What `stop --json` prints per device.
#[derive(Debug, serde::Serialize)]
struct Stopped {
    device: String,
    dir: String,
    pid: u32,
    seconds: f64,
}

/// Whether `target` names `d`.
fn names(target: &str, d: &DeviceStatus) -> bool {
    let kernel = format!("ublkb{}", d.id);
    let dir = std::path::absolute(target).ok().map(|t| super::serve::normal(&t));
    target == d.path
        || target == kernel
        || target == d.id.to_string()
        || dir.is_some_and(|t| t == super::serve::normal(std::path::Path::new(&d.dir)))
}

fn alive(pid: u32) -> bool {
    // Signal 0 checks the process exists; a zombie (not yet reaped) counts as gone.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit(')').next().and_then(|s| s.split_whitespace().next());
    state != Some("Z")
}

pub fn run(args: StopArgs) -> Result<()> {
    let (devices, unreachable) = status::query(&args.run_dir)?;
    let chosen: Vec<&DeviceStatus> = if args.all {
        devices.iter().collect()
    } else {
        let mut chosen = Vec::new();
        for t in &args.targets {
            match devices.iter().find(|d| names(t, d)) {
                Some(d) => chosen.push(d),
                None => bail_usage!(
                    "no running daemon serves {t:?} (running: {}{})",
                    if devices.is_empty() {
                        "none".to_string()
                    } else {
                        devices.iter().map(|d| d.path.as_str()).collect::<Vec<_>>().join(", ")
                    },
                    if unreachable.is_empty() {
                        String::new()
                    } else {
                        format!("; {} status socket(s) did not answer", unreachable.len())
                    }
                ),
            }
        }
        chosen
    };
    let started = Instant::now();
    let mut pending = Vec::new();
    for d in chosen {
        let pid = Pid::from_raw(i32::try_from(d.daemon_pid).context("daemon pid out of range")?);
        match kill(pid, Signal::SIGTERM) {
            Ok(()) => {}
            Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("signalling pid {} ({})", d.daemon_pid, d.path))
            }
        }
        if !args.json {
            eprintln!("stopping {} (pid {}, {})", d.path, d.daemon_pid, d.dir);
        }
        pending.push(d);
    }
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut stopped = Vec::new();
    while !pending.is_empty() {
        pending.retain(|d| {
            if alive(d.daemon_pid) {
                return true;
            }
            stopped.push(Stopped {
                device: d.path.clone(),
                dir: d.dir.clone(),
                pid: d.daemon_pid,
                seconds: started.elapsed().as_secs_f64(),
            });
            false
        });
        if pending.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let names: Vec<&str> = pending.iter().map(|d| d.path.as_str()).collect();
            return Err(TimedOut(format!(
                "{} still stopping after {}s (they go on: a daemon commits what it completed \
                 before it exits)",
                names.join(", "),
                args.timeout_secs
            ))
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "stopped": stopped, "unreachable": unreachable })
            )?
        );
    } else {
        for s in &stopped {
            println!("stopped {} in {:.1}s", s.device, s.seconds);
        }
    }
    if args.all && !unreachable.is_empty() {
        // A daemon whose socket does not answer may still hold its device: say so.
        for p in &unreachable {
            eprintln!("unreachable: {} (not stopped)", p["socket"].as_str().unwrap_or("-"));
        }
        return Err(Unreachable(unreachable.len()).into());
    }
    Ok(())
}
