//! `DirVolume`: a data directory as a `Volume`. It owns naming, creation with preallocation,
//! removal and the directory fsync that makes those durable; the disks it hands out do the I/O.
//! It never follows a name outside its directory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use super::file::{open_direct, OpenedFile};
use super::{AlignedBuf, Backend, Disk, FileDisk, UringDisk, IO_ALIGN};

/// Size of each zero write when a created file is filled.
const FILL_CHUNK_BYTES: usize = 1 << 20;

/// A directory of disk files, each opened with the volume's backend.
#[derive(Debug)]
pub struct DirVolume {
    dir: PathBuf,
    backend: Backend,
}

impl DirVolume {
    /// Opens the existing directory `dir`; files in it will use `backend`.
    pub fn open(dir: &Path, backend: Backend) -> io::Result<DirVolume> {
        if !fs::metadata(dir)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(DirVolume { dir: dir.to_path_buf(), backend })
    }

    /// The directory this volume manages.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The path of `name` inside the directory, after checking that it names a plain entry.
    fn entry(&self, name: &str) -> io::Result<PathBuf> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid file name {name:?} in volume {}", self.dir.display()),
            ));
        }
        Ok(self.dir.join(name))
    }

    fn disk(&self, opened: OpenedFile) -> io::Result<Arc<dyn Disk>> {
        Ok(match self.backend {
            Backend::Uring => Arc::new(UringDisk::new(opened)?),
            Backend::File => Arc::new(FileDisk::new(opened)),
        })
    }

    /// Everything `create` does after the file exists; on error the caller removes the file.
    fn allocate(
        &self,
        mut opened: OpenedFile,
        len_bytes: u64,
        fill: bool,
    ) -> io::Result<Arc<dyn Disk>> {
        reserve(&opened.file, len_bytes)?;
        opened.len_bytes = len_bytes;
        let disk = self.disk(opened)?;
        if fill {
            write_zeros(disk.as_ref())?;
        }
        Ok(disk)
    }
}

/// Reserves `len_bytes` of blocks (unwritten extents reading as zeros). Filesystems without
/// fallocate get a sparse file of the right size instead.
fn reserve(file: &File, len_bytes: u64) -> io::Result<()> {
    if len_bytes == 0 {
        return Ok(());
    }
    let len = i64::try_from(len_bytes).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{len_bytes} bytes is too large"))
    })?;
    match fallocate(file.as_raw_fd(), FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP) => file.set_len(len_bytes),
        Err(errno) => Err(errno.into()),
    }
}

/// Writes zeros over the whole disk, then flushes once, so that later overwrites land on written
/// extents and their `sync_data` needs no allocation metadata.
fn write_zeros(disk: &dyn Disk) -> io::Result<()> {
    let len_bytes = disk.len_bytes();
    let zeros = AlignedBuf::zeroed(FILL_CHUNK_BYTES);
    let mut offset = 0;
    while offset < len_bytes {
        let chunk = (len_bytes - offset).min(FILL_CHUNK_BYTES as u64) as usize;
        disk.write_at(offset, &zeros[..chunk])?;
        offset += chunk as u64;
    }
    disk.sync_data()
}

impl super::Volume for DirVolume {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    /// `{name}.lock` in the directory, holding the holder's pid.
    fn lock(&self, name: &str) -> io::Result<super::lock::Hold> {
        super::lock::lock_file(&self.dir.join(format!("{name}.lock")))
    }

    /// `len_bytes` must be a multiple of `IO_ALIGN`. A failure after the file was created
    /// removes it again, so a retry can succeed.
    fn create(&self, name: &str, len_bytes: u64, fill: bool) -> io::Result<Arc<dyn Disk>> {
        let path = self.entry(name)?;
        if len_bytes % IO_ALIGN as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: size {len_bytes} is not a multiple of {IO_ALIGN}"),
            ));
        }
        let opened = open_direct(&path, true)?;
        self.allocate(opened, len_bytes, fill).inspect_err(|_| {
            // Best effort: the creation error is the one worth reporting.
            let _ = fs::remove_file(&path);
        })
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn Disk>> {
        let opened = open_direct(&self.entry(name)?, false)?;
        self.disk(opened)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.entry(name)?)
    }

    /// `rename(2)` inside the directory: atomic, replacing `to`.
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.entry(from)?, self.entry(to)?)
    }

    /// Regular files only (no directories, symlinks or devices); names that are not UTF-8
    /// cannot have been created through this API and are skipped.
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn sync(&self) -> io::Result<()> {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(&self.dir)?;
        dir.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::super::Volume;
    use super::*;

    const DISK_BYTES: u64 = 3 * FILL_CHUNK_BYTES as u64 + 2 * IO_ALIGN as u64;

    fn volume(dir: &Path, backend: Backend) -> DirVolume {
        DirVolume::open(dir, backend).expect("open volume")
    }

    fn sorted(mut names: Vec<String>) -> Vec<String> {
        names.sort();
        names
    }

    fn assert_reads_zeros(disk: &dyn Disk) {
        let mut back = AlignedBuf::from_slice_padded(&[0xAA; IO_ALIGN]);
        for offset in [0, FILL_CHUNK_BYTES as u64, disk.len_bytes() - IO_ALIGN as u64] {
            disk.read_at(offset, &mut back).expect("read");
            assert!(back.iter().all(|&b| b == 0), "non-zero byte at {offset}");
            back.fill(0xAA);
        }
    }

    fn lifecycle(backend: Backend) {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path(), backend);
        assert_eq!(vol.path(), dir.path());
        assert_eq!(vol.describe(), dir.path().display().to_string());
        fs::create_dir(dir.path().join("subdir")).expect("mkdir");

        let disk = vol.create("wal", DISK_BYTES, false).expect("create");
        assert_eq!(disk.len_bytes(), DISK_BYTES);
        assert_reads_zeros(disk.as_ref());
        let data = AlignedBuf::from_slice_padded(b"written through the volume");
        disk.write_and_sync(IO_ALIGN as u64, &data).expect("write");
        vol.create("image", 4 * IO_ALIGN as u64, false).expect("create second");
        vol.sync().expect("sync");
        assert_eq!(sorted(vol.list().expect("list")), ["image", "wal"]);

        let reopened = vol.open("wal").expect("open");
        assert_eq!(reopened.len_bytes(), DISK_BYTES);
        let mut back = AlignedBuf::zeroed(IO_ALIGN);
        reopened.read_at(IO_ALIGN as u64, &mut back).expect("read");
        assert_eq!(&back[..], &data[..]);

        vol.remove("image").expect("remove");
        vol.sync().expect("sync");
        assert_eq!(vol.list().expect("list"), ["wal"]);
        assert_eq!(vol.open("image").expect_err("removed").kind(), io::ErrorKind::NotFound);

        // A rename moves the data and replaces the target; the old handle keeps working.
        let other = vol.create("other", 4 * IO_ALIGN as u64, false).expect("create other");
        vol.rename("wal", "other").expect("rename");
        vol.sync().expect("sync");
        assert_eq!(vol.list().expect("list"), ["other"]);
        assert_eq!(vol.open("other").expect("open").len_bytes(), DISK_BYTES);
        other.read_at(0, &mut back).expect("the replaced file's handle still reads");
        disk.read_at(IO_ALIGN as u64, &mut back).expect("read through the old handle");
        assert_eq!(&back[..], &data[..]);
        let err = vol.rename("missing", "x").expect_err("missing source");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn lifecycle_with_file_backend() {
        lifecycle(Backend::File);
    }

    #[test]
    fn lifecycle_with_uring_backend() {
        lifecycle(Backend::Uring);
    }

    #[test]
    fn create_fails_if_the_name_exists_and_keeps_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path(), Backend::File);
        let disk = vol.create("a", 2 * IO_ALIGN as u64, false).expect("create");
        let data = AlignedBuf::from_slice_padded(b"keep me");
        disk.write_and_sync(0, &data).expect("write");
        let err = vol.create("a", 8 * IO_ALIGN as u64, true).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        let reopened = vol.open("a").expect("open");
        assert_eq!(reopened.len_bytes(), 2 * IO_ALIGN as u64);
        let mut back = AlignedBuf::zeroed(IO_ALIGN);
        reopened.read_at(0, &mut back).expect("read");
        assert_eq!(&back[..], &data[..]);
    }

    #[test]
    fn bad_names_and_sizes_are_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path(), Backend::File);
        for name in ["", ".", "..", "a/b", "../escape", "nul\0byte"] {
            let kind = |r: io::Result<Arc<dyn Disk>>| r.expect_err("must fail").kind();
            assert_eq!(kind(vol.create(name, IO_ALIGN as u64, false)), io::ErrorKind::InvalidInput);
            assert_eq!(kind(vol.open(name)), io::ErrorKind::InvalidInput);
            assert_eq!(vol.remove(name).expect_err(name).kind(), io::ErrorKind::InvalidInput);
            let err = vol.rename(name, "ok").expect_err(name);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
        let err = vol.create("odd", 1000, false).expect_err("unaligned size");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(vol.list().expect("list").is_empty(), "a rejected create left a file");
    }

    #[test]
    fn create_with_fill_allocates_and_reads_zeros() {
        for backend in [Backend::File, Backend::Uring] {
            let dir = tempfile::tempdir().expect("tempdir");
            let vol = volume(dir.path(), backend);
            let disk = vol.create("filled", DISK_BYTES, true).expect("create filled");
            assert_reads_zeros(disk.as_ref());
            let meta = fs::metadata(dir.path().join("filled")).expect("stat");
            assert_eq!(meta.len(), DISK_BYTES);
            assert!(meta.blocks() * 512 >= DISK_BYTES, "file is sparse: {} blocks", meta.blocks());
        }
    }

    #[test]
    fn open_requires_an_existing_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = DirVolume::open(&dir.path().join("missing"), Backend::File);
        assert_eq!(missing.expect_err("missing").kind(), io::ErrorKind::NotFound);
        let file = dir.path().join("plain");
        fs::write(&file, b"x").expect("write");
        let not_dir = DirVolume::open(&file, Backend::File);
        assert_eq!(not_dir.expect_err("file").kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn volume_on_tmpfs_round_trips() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let dir = tempfile::tempdir_in(shm).expect("tempdir in /dev/shm");
        for backend in [Backend::File, Backend::Uring] {
            let vol = volume(dir.path(), backend);
            let name = format!("{backend:?}");
            let disk = vol.create(&name, DISK_BYTES, true).expect("create on tmpfs");
            assert_reads_zeros(disk.as_ref());
            let data = AlignedBuf::from_slice_padded(b"tmpfs");
            disk.write_and_sync(2 * IO_ALIGN as u64, &data).expect("write");
            let mut back = AlignedBuf::zeroed(IO_ALIGN);
            vol.open(&name).expect("open").read_at(2 * IO_ALIGN as u64, &mut back).expect("read");
            assert_eq!(&back[..], &data[..]);
        }
    }
}
