//! A process's exclusive hold on a store: `flock(2)` on a file (a directory store's lock file,
//! or the raw device node itself), so two processes never run on one store. The lock is
//! advisory (every xdevice process takes it before touching a store) and the kernel drops it
//! when the holder exits, however it exits, so a crashed daemon never leaves a stale lock behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Held while the store is in use; dropping it (or the process ending) releases the lock.
#[derive(Debug)]
pub struct Hold {
    /// `None`: a store that no other process can open (the simulator's memory).
    _file: Option<File>,
}

impl Hold {
    /// For a store only this process can reach.
    pub fn private() -> Hold {
        Hold { _file: None }
    }
}

/// How long a lock this process itself seems to hold is waited for. A lock released by this
/// process stays held while a child it is spawning (from any thread) is between its fork and its
/// exec, which closes the child's copy of every descriptor; a real second open in this process is
/// still refused, after this long.
const OWN_RELEASE: Duration = Duration::from_secs(1);

/// Locks a directory store through its lock file `path` (created if missing), and writes this
/// process's id into it for the next one to name. Refused with `ErrorKind::WouldBlock`, naming
/// the holder's pid, while another open file holds it (another process, or another open in
/// this one).
pub fn lock_file(path: &Path) -> io::Result<Hold> {
    let deadline = Instant::now() + OWN_RELEASE;
    loop {
        match try_lock_file(path) {
            Err((e, Some(pid))) if pid == std::process::id() && Instant::now() < deadline => {
                drop(e);
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other.map_err(|(e, _)| e),
        }
    }
}

/// One attempt; a refusal carries the holder's pid when the lock file names one.
fn try_lock_file(path: &Path) -> Result<Hold, (io::Error, Option<u32>)> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| (e, None))?;
    if let Err(e) = try_flock(&file) {
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err((e, None));
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let pid = text.trim().parse::<u32>().ok();
        let holder = pid.map_or_else(|| "another process".to_string(), describe_pid);
        let e = io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("in use by {holder} (lock {})", path.display()),
        );
        return Err((e, pid));
    }
    let stamp = |file: &mut File| -> io::Result<()> {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        writeln!(file, "{}", std::process::id())
    };
    stamp(&mut file).map_err(|e| (e, None))?;
    Ok(Hold { _file: Some(file) })
}

/// Locks a raw device through its device node. A block device holds no pid file, so a refusal
/// names the processes that have the device open (from /proc).
pub fn lock_device(path: &Path) -> io::Result<Hold> {
    let file = OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(path)?;
    let deadline = Instant::now() + OWN_RELEASE;
    while let Err(e) = try_flock(&file) {
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
        let holders = openers(path);
        if holders.is_empty() && Instant::now() < deadline {
            // No other process has it open: this one holds it (or just released it).
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let holder = if holders.is_empty() {
            describe_pid(std::process::id())
        } else {
            holders.into_iter().map(describe_pid).collect::<Vec<_>>().join(", ")
        };
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("in use by {holder} (lock on {})", path.display()),
        ));
    }
    Ok(Hold { _file: Some(file) })
}

fn try_flock(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor this `File` owns and keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// "pid N (command)", or "pid N" when /proc no longer shows it.
fn describe_pid(pid: u32) -> String {
    if pid == std::process::id() {
        return format!("pid {pid} (this process)");
    }
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => format!("pid {pid} ({})", comm.trim()),
        Err(_) => format!("pid {pid}"),
    }
}

/// Processes that have `path` open, other than this one.
fn openers(path: &Path) -> Vec<u32> {
    let Ok(target) = std::fs::canonicalize(path) else { return Vec::new() };
    let mut pids = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return pids };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target)) {
            pids.push(pid);
        }
    }
    pids
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_second_hold_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xdb0.lock");
        let first = lock_file(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), std::process::id().to_string());
        let e = lock_file(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        drop(first);
        let again = lock_file(&path).unwrap();
        drop(again);
    }

    #[test]
    fn a_device_node_is_locked_the_same_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let first = lock_device(&path).unwrap();
        let e = lock_device(&path).unwrap_err();
        assert!(e.to_string().contains("in use by"), "{e}");
        drop(first);
        lock_device(&path).unwrap();
    }
}
