//! Opening files and block devices for direct I/O (`open_direct`), and `FileDisk`, the plain
//! pread/pwrite/fdatasync backend. It owns one file descriptor per disk and never caches data.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{check_io, Disk};

/// A file or block device opened read-write for the disk backends.
#[derive(Debug)]
pub struct OpenedFile {
    /// The open descriptor; every backend keeps it for as long as it does I/O through it.
    pub file: File,
    /// The path it was opened at, for error messages.
    pub path: PathBuf,
    /// Whether O_DIRECT is in effect. False on filesystems that refuse it (tmpfs before Linux
    /// 6.6, some overlay and FUSE filesystems): fdatasync still provides durability, but reads
    /// and writes go through the page cache.
    pub direct: bool,
    /// Size in bytes at open time.
    pub len_bytes: u64,
}

/// Opens `path` read-write with O_DIRECT and O_CLOEXEC. With `create`, the file must not exist
/// yet (O_EXCL) and is created empty with mode 0o644. If the filesystem refuses O_DIRECT with
/// EINVAL, reopens without it (`direct == false`) and logs a warning naming the path.
pub fn open_direct(path: &Path, create: bool) -> io::Result<OpenedFile> {
    open_direct_with(path, create, open_with)
}

/// The signature of the raw open call, so tests can make it refuse O_DIRECT.
type OpenFn = fn(&Path, bool, i32) -> io::Result<File>;

fn open_direct_with(path: &Path, create: bool, open: OpenFn) -> io::Result<OpenedFile> {
    let (mut file, direct) = match open(path, create, libc::O_DIRECT) {
        Ok(file) => (file, true),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                path = %path.display(),
                "filesystem refuses O_DIRECT; using buffered I/O (fdatasync still makes writes \
                 durable, but the page cache is no longer bypassed)"
            );
            (open_buffered(path, create, open)?, false)
        }
        Err(err) => return Err(err),
    };
    // Seeking to the end measures regular files and block devices alike (stat gives 0 for the
    // latter). The descriptor's position is never used again: all I/O is positional.
    let len_bytes = file.seek(SeekFrom::End(0))?;
    Ok(OpenedFile { file, path: path.to_path_buf(), direct, len_bytes })
}

/// The reopen after O_DIRECT was refused. Linux creates the inode before it checks O_DIRECT
/// support, so an exclusive create may find the empty file the refused attempt left behind:
/// that one (and only an empty one) is taken over.
fn open_buffered(path: &Path, create: bool, open: OpenFn) -> io::Result<File> {
    match open(path, create, 0) {
        Err(err) if create && err.kind() == io::ErrorKind::AlreadyExists => {
            let file = open(path, false, 0)?;
            if file.metadata()?.len() != 0 {
                return Err(err);
            }
            Ok(file)
        }
        other => other,
    }
}

/// The raw open: read-write, close-on-exec, plus `extra_flags`; exclusive create with `create`.
fn open_with(path: &Path, create: bool, extra_flags: i32) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).custom_flags(extra_flags | libc::O_CLOEXEC);
    if create {
        options.create_new(true).mode(0o644);
    }
    options.open(path)
}

/// A disk backed by pread/pwrite/fdatasync on one file or block device. Errors are the kernel's
/// own (errno preserved, for the errno mapping at the ublk boundary); callers add the location
/// from `describe`.
#[derive(Debug)]
pub struct FileDisk {
    opened: OpenedFile,
}

impl FileDisk {
    /// Wraps an opened file; the disk's size is the file's size at open time.
    pub fn new(opened: OpenedFile) -> Self {
        FileDisk { opened }
    }

    /// Whether O_DIRECT is in effect (false after the buffered fallback).
    pub fn is_direct(&self) -> bool {
        self.opened.direct
    }
}

impl Disk for FileDisk {
    fn lock(&self) -> io::Result<super::lock::Hold> {
        super::lock::lock_device(&self.opened.path)
    }

    fn describe(&self) -> String {
        self.opened.path.display().to_string()
    }

    fn len_bytes(&self) -> u64 {
        self.opened.len_bytes
    }

    /// Meeting end of file (the file shrank after open) fails with `UnexpectedEof`; the buffer
    /// is never silently zero-filled.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_io(self.opened.len_bytes, offset, buf)?;
        self.opened.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        check_io(self.opened.len_bytes, offset, buf)?;
        self.opened.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let started = std::time::Instant::now();
        let r = self.opened.file.sync_data();
        crate::metrics::recorders().fsync_done(started);
        r
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::{AlignedBuf, IO_ALIGN};
    use super::*;

    const DISK_BYTES: u64 = 64 * IO_ALIGN as u64;

    /// A regular file of `len` zero bytes inside `dir`, opened through `open_direct`.
    pub(crate) fn make_file(dir: &Path, len: u64) -> OpenedFile {
        let path = dir.join("disk");
        let created = open_direct(&path, true).expect("create");
        created.file.set_len(len).expect("set_len");
        drop(created);
        open_direct(&path, false).expect("reopen")
    }

    fn pattern(len: usize, seed: u8) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(len);
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        buf
    }

    /// Writes distinct patterns at several aligned offsets, syncs, and reads each back.
    pub(crate) fn round_trip(disk: &dyn Disk) {
        let cases = [
            (0u64, IO_ALIGN, 1u8),
            (IO_ALIGN as u64, 3 * IO_ALIGN, 2),
            (40 * 4096, 8 * IO_ALIGN, 3),
        ];
        for &(offset, len, seed) in &cases {
            disk.write_at(offset, &pattern(len, seed)).expect("write");
        }
        disk.sync_data().expect("sync");
        for &(offset, len, seed) in &cases {
            let mut back = AlignedBuf::zeroed(len);
            disk.read_at(offset, &mut back).expect("read");
            assert_eq!(&back[..], &pattern(len, seed)[..], "data at {offset}");
        }
        let last = disk.len_bytes() - IO_ALIGN as u64;
        disk.write_and_sync(last, &pattern(IO_ALIGN, 9)).expect("write_and_sync");
        let mut back = AlignedBuf::zeroed(IO_ALIGN);
        disk.read_at(last, &mut back).expect("read last");
        assert_eq!(&back[..], &pattern(IO_ALIGN, 9)[..]);
        // An unwritten block still reads as zeros.
        disk.read_at(20 * IO_ALIGN as u64, &mut back).expect("read hole");
        assert!(back.iter().all(|&b| b == 0));
    }

    /// Misaligned offset, length or address is `InvalidInput` and leaves the data untouched;
    /// so is any range beyond the end.
    pub(crate) fn rejects_bad_io(disk: &dyn Disk) {
        disk.write_at(0, &pattern(2 * IO_ALIGN, 5)).expect("write");
        let big = pattern(3 * IO_ALIGN, 7);
        let kind = |r: io::Result<()>| r.expect_err("must fail").kind();
        assert_eq!(kind(disk.write_at(512, &big[..IO_ALIGN])), io::ErrorKind::InvalidInput);
        assert_eq!(kind(disk.write_at(0, &big[..IO_ALIGN + 512])), io::ErrorKind::InvalidInput);
        assert_eq!(kind(disk.write_at(0, &big[512..512 + IO_ALIGN])), io::ErrorKind::InvalidInput);
        assert_eq!(kind(disk.write_and_sync(512, &big[..IO_ALIGN])), io::ErrorKind::InvalidInput);
        let mut back = AlignedBuf::zeroed(2 * IO_ALIGN);
        disk.read_at(0, &mut back).expect("read");
        assert_eq!(&back[..], &pattern(2 * IO_ALIGN, 5)[..], "rejected writes touched the file");
        assert_eq!(kind(disk.read_at(100, &mut back[..IO_ALIGN])), io::ErrorKind::InvalidInput);
        let end = disk.len_bytes();
        assert_eq!(kind(disk.read_at(end, &mut back[..IO_ALIGN])), io::ErrorKind::InvalidInput);
        assert_eq!(
            kind(disk.read_at(end - IO_ALIGN as u64, &mut back)),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(kind(disk.write_at(end, &big[..IO_ALIGN])), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn open_direct_on_ext4_reports_direct_and_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = make_file(dir.path(), DISK_BYTES);
        assert_eq!(opened.len_bytes, DISK_BYTES);
        assert!(opened.direct, "O_DIRECT expected on {}", dir.path().display());
    }

    #[test]
    fn create_is_exclusive_and_open_needs_existing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x");
        let err = open_direct(&path, false).expect_err("absent");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        open_direct(&path, true).expect("create");
        let err = open_direct(&path, true).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn file_disk_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        round_trip(&FileDisk::new(make_file(dir.path(), DISK_BYTES)));
    }

    #[test]
    fn file_disk_rejects_bad_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        rejects_bad_io(&FileDisk::new(make_file(dir.path(), DISK_BYTES)));
    }

    #[test]
    fn file_disk_short_read_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opened = make_file(dir.path(), DISK_BYTES);
        let file = opened.file.try_clone().expect("clone fd");
        let disk = FileDisk::new(opened);
        file.set_len(DISK_BYTES / 2).expect("shrink under the disk");
        let mut back = AlignedBuf::zeroed(IO_ALIGN);
        let err = disk.read_at(DISK_BYTES - IO_ALIGN as u64, &mut back).expect_err("past EOF");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Opens as the kernel does on a filesystem without O_DIRECT support: the inode is created
    /// first, then the open fails with EINVAL.
    fn open_refusing_direct(path: &Path, create: bool, extra_flags: i32) -> io::Result<File> {
        if extra_flags & libc::O_DIRECT != 0 {
            if create {
                drop(open_with(path, true, 0)?);
            }
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        open_with(path, create, extra_flags)
    }

    /// Like `make_file`, but through the buffered fallback (`direct == false`).
    pub(crate) fn make_buffered_file(dir: &Path, len: u64) -> OpenedFile {
        let path = dir.join("disk");
        let created = open_direct_with(&path, true, open_refusing_direct).expect("create");
        created.file.set_len(len).expect("set_len");
        drop(created);
        let opened = open_direct_with(&path, false, open_refusing_direct).expect("reopen");
        assert!(!opened.direct);
        opened
    }

    #[test]
    fn refused_o_direct_falls_back_to_buffered_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk");
        let created = open_direct_with(&path, true, open_refusing_direct).expect("create");
        assert!(!created.direct);
        created.file.set_len(DISK_BYTES).expect("set_len");
        drop(created);
        let err = open_direct_with(&path, true, open_refusing_direct).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "non-empty file must not be taken");
        let opened = open_direct_with(&path, false, open_refusing_direct).expect("reopen");
        assert!(!opened.direct);
        assert_eq!(opened.len_bytes, DISK_BYTES);
        let disk = FileDisk::new(opened);
        round_trip(&disk);
        rejects_bad_io(&disk);
    }

    /// tmpfs refused O_DIRECT before Linux 6.6 and accepts it since; either way the data must
    /// round-trip, and `direct` must say which path was taken.
    #[test]
    fn tmpfs_round_trips_with_or_without_o_direct() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
        let opened = make_file(dir.path(), DISK_BYTES);
        let probe = open_with(&dir.path().join("probe"), true, libc::O_DIRECT);
        assert_eq!(opened.direct, probe.is_ok(), "direct flag disagrees with the kernel");
        let disk = FileDisk::new(opened);
        round_trip(&disk);
        let err = open_direct(&dir.path().join("disk"), true).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    }
}
