//! Serving and removing each target's block device for `ublk-device`: `xdevice serve`, `rublk
//! add loop`, `losetup`; the device path, and the process whose CPU time and context switches
//! are accounted.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{Settings, Target, BENCH};

/// Raft timing for `serve` in the TCG guest. The heartbeat is also openraft 0.9's AppendEntries
/// timeout: emulated, a follower needs more than the default 50 ms, and more than the
/// end-to-end suite's 150 ms, to append and sync a 4 MiB entry (a 1 MiB sequential write at QD8
/// merges into such entries), so the three-replica device's prewrite was retried until the
/// kernel timed its writes out. New entries are sent at once, not on the heartbeat, so a longer
/// one costs a write nothing.
pub fn guest_raft_timing() -> Vec<String> {
    if std::env::var("XDEVICE_GUEST").is_ok_and(|v| v == "1") {
        ["--heartbeat-ms", "500", "--election-ms", "1500-3000"].map(String::from).to_vec()
    } else {
        Vec::new()
    }
}

pub fn output(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn wait_for_block_device(path: &str) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{path} did not appear");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What serves a device.
pub enum Kind {
    Xdevice {
        child: Child,
        path: String,
        log: PathBuf,
    },
    Rublk {
        rublk: PathBuf,
        id: u32,
        pid: Option<u32>,
        path: String,
    },
    Loop {
        path: String,
        dio: String,
    },
    /// Removed already.
    Stopped {
        path: String,
    },
}

impl Kind {
    fn path(&self) -> &str {
        match self {
            Kind::Xdevice { path, .. }
            | Kind::Rublk { path, .. }
            | Kind::Loop { path, .. }
            | Kind::Stopped { path } => path,
        }
    }
}

/// A device being served; removed on drop.
pub struct Served(pub Kind);

impl Served {
    pub fn path(&self) -> &str {
        self.0.path()
    }

    /// The userspace process serving the device, whose CPU time is accounted per job.
    pub fn pid(&self) -> Option<u32> {
        match &self.0 {
            Kind::Xdevice { child, .. } => Some(child.id()),
            Kind::Rublk { pid, .. } => *pid,
            Kind::Loop { .. } | Kind::Stopped { .. } => None,
        }
    }

    pub fn start(target: Target, s: &Settings, work: &Path, backing: &Path) -> Result<Served> {
        let served = match target {
            Target::Xdevice | Target::Xdevice3 => {
                let replicas = target.replicas().unwrap_or(1).to_string();
                let dir = work.join(target.key());
                let log = work.join(format!("{}.log", target.key()));
                let stderr = std::fs::File::create(&log)
                    .with_context(|| format!("create {}", log.display()))?;
                let mut child = Command::new(&s.xdevice)
                    .arg("serve")
                    .arg("--dir")
                    .arg(&dir)
                    .args(["--size", &format!("{}M", s.size_mib), "--replicas", &replicas])
                    .args(["--cache", &format!("{}M", s.cache_mib), "--mode", &s.mode])
                    .args(guest_raft_timing())
                    .arg("--run-dir")
                    .arg(work.join("run"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(stderr)
                    .spawn()
                    .with_context(|| format!("start {} serve", s.xdevice.display()))?;
                // Its one stdout line, the device path, once live.
                let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let mut line = String::new();
                    let _ = BufReader::new(stdout).read_line(&mut line);
                    let _ = tx.send(line);
                });
                let line = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_default();
                let path = line.trim().to_string();
                if !path.starts_with("/dev/ublkb") {
                    let _ = child.kill();
                    let _ = child.wait();
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    bail!("xdevice serve did not print its device ({path:?}); its log:\n{text}");
                }
                Kind::Xdevice { child, path, log }
            }
            Target::Rublk => {
                let info = output(Command::new(&s.rublk).args(["add", "loop", "-f"]).arg(backing))?;
                let id = info
                    .lines()
                    .find_map(|l| l.strip_prefix("dev id ")?.split(':').next()?.parse().ok())
                    .ok_or_else(|| anyhow!("no device id in rublk's output: {info}"))?;
                // "... daemon pid N flags ...": the process serving the queues.
                let pid = info.split_whitespace().collect::<Vec<_>>().windows(3).find_map(|w| {
                    (w[0] == "daemon" && w[1] == "pid").then(|| w[2].parse().ok()).flatten()
                });
                Kind::Rublk { rublk: s.rublk.clone(), id, pid, path: format!("/dev/ublkb{id}") }
            }
            Target::Loop => {
                let path = output(
                    Command::new("losetup").args(["--direct-io=on", "-f", "--show"]).arg(backing),
                )?;
                let name = path.trim_start_matches("/dev/");
                let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "unknown".into());
                Kind::Loop { path, dio }
            }
        };
        let served = Served(served);
        wait_for_block_device(served.path())?;
        Ok(served)
    }

    /// Removes the device (xdevice: SIGTERM, which commits what was accepted, then exit). Once:
    /// later calls (the drop) do nothing.
    pub fn stop(&mut self) -> Result<()> {
        let path = self.path().to_string();
        match std::mem::replace(&mut self.0, Kind::Stopped { path }) {
            Kind::Stopped { .. } => Ok(()),
            Kind::Xdevice { mut child, path, log } => {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    if let Some(status) = child.try_wait()? {
                        if !status.success() {
                            let text = std::fs::read_to_string(&log).unwrap_or_default();
                            bail!("xdevice serve of {path} exited with {status}; its log:\n{text}");
                        }
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        bail!("xdevice serve of {path} did not stop within 60 s of SIGTERM");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Kind::Rublk { rublk, id, .. } => {
                output(Command::new(&rublk).args(["del", "-n", &id.to_string()]))?;
                Ok(())
            }
            Kind::Loop { path, .. } => {
                output(Command::new("losetup").args(["-d", path.as_str()]))?;
                Ok(())
            }
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("{BENCH}: removing {}: {e:#}", self.path());
        }
    }
}
