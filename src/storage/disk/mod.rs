//! The one narrow disk seam. `Disk` is a linear, fixed-size byte space (a file, a block device, a
//! region of one, or a simulated disk); `Volume` is a namespace of such files (a data directory).
//! Implementations: io_uring (`uring`), plain pread/pwrite (`file`), and the fault-injecting
//! simulator (`sim`). Nothing above this module issues a system call for data.
//!
//! Every read and write must be aligned: offset, length and buffer address are multiples of
//! `IO_ALIGN`, as O_DIRECT requires. Every backend checks this with `check_io`, so a misaligned
//! caller fails the same way on the simulator as on NVMe.

mod aligned;
mod file;
pub mod lock;
mod sim;
mod uring;
mod volume;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

pub use aligned::{round_up, AlignedBuf};
pub use file::FileDisk;
pub use sim::{CrashPlan, Fault, FaultOp, SimDisk, SimStats, SimVolume};
pub use uring::UringDisk;
pub use volume::DirVolume;

/// Alignment of every offset, length and buffer address on the seam.
pub const IO_ALIGN: usize = 4096;
/// The unit a power loss can tear a write at: sectors are written whole or not at all.
pub const SECTOR_BYTES: usize = 512;

/// A fixed-size byte space with aligned reads, writes and a data flush.
pub trait Disk: Send + Sync + fmt::Debug {
    /// A name for error messages: the path, or the path and region.
    fn describe(&self) -> String;
    /// Size in bytes (a multiple of `IO_ALIGN`).
    fn len_bytes(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`. Not durable until `sync_data` returns.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync). An error here means data written since
    /// the last successful sync may be lost: callers must treat it as fatal.
    fn sync_data(&self) -> io::Result<()>;
    /// Writes `buf` at `offset` and then makes it durable. Backends may link the two (io_uring).
    fn write_and_sync(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write_at(offset, buf)?;
        self.sync_data()
    }
    /// Takes this process's exclusive hold on the store this disk holds (a raw device), for as
    /// long as the returned guard lives; `ErrorKind::WouldBlock`, naming the holder, while
    /// another process (or another open in this one) has it.
    fn lock(&self) -> io::Result<lock::Hold>;
}

/// A namespace of disks: a data directory, or the simulator's model of one.
/// Creations, renames and removals are durable only after `sync` returns.
pub trait Volume: Send + Sync + fmt::Debug {
    /// A name for error messages.
    fn describe(&self) -> String;
    /// Creates `name` with `len_bytes` allocated and reading as zeros. Fails if it exists.
    /// With `fill`, the blocks are written (not merely reserved), so later overwrites need no
    /// allocation metadata and `sync_data` stays a pure data flush.
    fn create(&self, name: &str, len_bytes: u64, fill: bool) -> io::Result<Arc<dyn Disk>>;
    /// Opens an existing `name`; `io::ErrorKind::NotFound` if absent.
    fn open(&self, name: &str) -> io::Result<Arc<dyn Disk>>;
    /// Removes `name`.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Renames `from` to `to`, replacing any `to`, in one atomic step (`rename(2)`): after a
    /// crash the namespace holds either name, never both or neither. Open handles keep
    /// working. Durable only after `sync`; a rename never synced may be undone by a power loss.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Names currently present, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Makes creations, renames and removals durable (fsync of the directory).
    fn sync(&self) -> io::Result<()>;
    /// Takes this process's exclusive hold on the store named `name` here, as `Disk::lock`.
    fn lock(&self, name: &str) -> io::Result<lock::Hold>;
}

/// Which system-call path a real disk uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// io_uring with O_DIRECT (the default).
    #[default]
    Uring,
    /// pread/pwrite/fdatasync with O_DIRECT.
    File,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io-uring" | "io_uring" => Ok(Backend::Uring),
            "file" => Ok(Backend::File),
            other => Err(format!("unknown disk backend {other:?}: expected \"uring\" or \"file\"")),
        }
    }
}

/// Opens an existing file or block device at `path` with the chosen backend.
pub fn open_path(path: &Path, backend: Backend) -> io::Result<Arc<dyn Disk>> {
    let direct = file::open_direct(path, false)?;
    Ok(match backend {
        Backend::Uring => Arc::new(UringDisk::new(direct)?),
        Backend::File => Arc::new(FileDisk::new(direct)),
    })
}

/// Checks the seam's preconditions for one I/O: alignment of offset, length and address, and that
/// the range lies inside the disk.
pub fn check_io(disk_len: u64, offset: u64, buf: &[u8]) -> io::Result<()> {
    let len = buf.len() as u64;
    let align = IO_ALIGN as u64;
    if offset % align != 0 || len % align != 0 || buf.as_ptr() as usize % IO_ALIGN != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unaligned I/O: offset {offset}, length {len} (alignment {IO_ALIGN})"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= disk_len => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("I/O at {offset}+{len} beyond the end of a {disk_len}-byte disk"),
        )),
    }
}

/// A window `[base, base + len)` of another disk, addressed from zero. Used to carve a raw block
/// device into superblock, state, WAL and image regions.
#[derive(Debug)]
pub struct RegionDisk {
    inner: Arc<dyn Disk>,
    name: &'static str,
    base: u64,
    len: u64,
}

impl RegionDisk {
    /// A region of `inner`; `base` and `len` must be aligned and inside it.
    pub fn new(inner: Arc<dyn Disk>, name: &'static str, base: u64, len: u64) -> io::Result<Self> {
        let align = IO_ALIGN as u64;
        if base % align != 0 || len % align != 0 || base + len > inner.len_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("region {name} [{base}, {}) does not fit {}", base + len, inner.describe()),
            ));
        }
        Ok(RegionDisk { inner, name, base, len })
    }
}

impl Disk for RegionDisk {
    fn lock(&self) -> io::Result<lock::Hold> {
        self.inner.lock()
    }
    fn describe(&self) -> String {
        format!("{} ({} region at byte {})", self.inner.describe(), self.name, self.base)
    }
    fn len_bytes(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_io(self.len, offset, buf)?;
        self.inner.read_at(self.base + offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_io(self.len, offset, buf)?;
        self.inner.write_at(self.base + offset, buf)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn write_and_sync(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_io(self.len, offset, buf)?;
        self.inner.write_and_sync(self.base + offset, buf)
    }
}
