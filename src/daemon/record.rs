//! `DIR/serve.json`: what a data directory serves (the device number, replicas, mode, shape),
//! and the owner record the daemon leaves with the ublk device, by which `serve` and `recover`
//! recognise the device a directory served and udev names it.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use xdevice_ublk::Geometry;

use crate::device::CacheMode;

/// The record's file name in the data directory.
pub const RECORD: &str = "serve.json";

/// What `DIR/serve.json` records.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    /// Identifies this data directory to the ublk device it serves.
    pub serve_uuid: uuid::Uuid,
    pub ublk_id: Option<u32>,
    pub replicas: u64,
    pub mode: CacheMode,
    pub size_bytes: u64,
    pub block_bytes: u32,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    /// Each replica's data directory (absolute), replica 1 first; empty: `DIR/replica-N`.
    /// Fixed when the device is made: a later run naming other directories is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replica_dirs: Vec<std::path::PathBuf>,
}

/// Writes `value` as `dir/name` durably (temporary file, fsync, rename, fsync of the directory).
pub fn store_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(value)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Reads `dir/name` as `what`; None if there is no such file.
pub fn load_json<T: serde::de::DeserializeOwned>(
    dir: &Path,
    name: &str,
    what: &str,
) -> Result<Option<T>> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a valid {what}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

impl Record {
    pub fn load(dir: &Path) -> Result<Option<Record>> {
        load_json(dir, RECORD, "serve record")
    }

    /// Writes the record durably.
    pub fn store(&self, dir: &Path) -> Result<()> {
        store_json(dir, RECORD, self)
    }

    pub fn owner(&self, dir: &Path) -> serde_json::Value {
        serde_json::json!({ "xdevice": self.serve_uuid.to_string(), "dir": dir.display().to_string() })
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            block_bytes: self.block_bytes,
            size_bytes: self.size_bytes,
            max_io_bytes: self.max_io_bytes,
            max_discard_bytes: discard_limit(self.block_bytes),
            volatile_cache: self.mode == CacheMode::Writeback,
        }
    }
}

/// The largest discard or write-zeroes accepted at once: 256 MiB, whole blocks (the device
/// splits it into zero entries; the block layer splits larger ones).
fn discard_limit(block_bytes: u32) -> u32 {
    (256u32 << 20) / block_bytes * block_bytes
}

/// The directory `xdevice@NAME.service` serves from is `STATE_ROOT/NAME`.
pub const STATE_ROOT: &str = "/var/lib/xdevice";

/// The stable name of `ublkbN` (`/dev/xdevice/NAME`, systemd/90-xdevice.rules): the name of the
/// data directory its daemon recorded with the device ([`stable_name`]).
pub fn udev_name(kernel_name: &str) -> Result<String> {
    let id: u32 = kernel_name
        .strip_prefix("ublkb")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{kernel_name:?} is not a ublk block device name (ublkbN)"))?;
    let info =
        xdevice_ublk::device_info(id)?.with_context(|| format!("/dev/ublkc{id} does not exist"))?;
    let dir = info
        .owner
        .as_ref()
        .and_then(|o| o.get("dir"))
        .and_then(|d| d.as_str())
        .with_context(|| format!("ublk device {id} is not served by xdevice"))?;
    stable_name(dir)
}

/// The name under /dev/xdevice of the device served from the data directory `dir`, distinct for
/// distinct directories:
///
/// - a directory directly under [`STATE_ROOT`] is named by its last component (`pgwal` for
///   `/var/lib/xdevice/pgwal`, as `xdevice@pgwal.service` serves it); characters outside
///   `[A-Za-z0-9:_.-]`, and a leading `.` or `-`, become `\xNN`: it never starts with `-`;
/// - any other directory by its absolute path escaped as `systemd-escape PATH` does
///   (`/srv/a-b/x` is `-srv-a\x2db-x`): each `/` becomes `-`, and `-` and every other character
///   outside `[A-Za-z0-9:_.]` becomes `\xNN`. It always starts with `-` (the root's `/`), so it
///   is never the short name of a directory under [`STATE_ROOT`]: `/pgwal` is `-pgwal`.
///
/// Both escapings are injective, so no two directories share a name. `dir` must be absolute
/// without `..` (the daemon records it canonical); `.` components and repeated or trailing
/// slashes are ignored.
pub fn stable_name(dir: &str) -> Result<String> {
    use std::path::Component;
    let refuse = || anyhow::anyhow!("data directory {dir:?} is not an absolute path without `..`");
    if !dir.starts_with('/') {
        return Err(refuse());
    }
    let mut parts = Vec::new();
    for c in Path::new(dir).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            // A &str's components are &str too.
            Component::Normal(part) => parts.push(part.to_str().ok_or_else(refuse)?),
            Component::ParentDir | Component::Prefix(_) => return Err(refuse()),
        }
    }
    let mut out = String::new();
    match parts.split_last() {
        Some((name, parent)) if parent.join("/") == STATE_ROOT.trim_start_matches('/') => {
            for (i, &b) in name.as_bytes().iter().enumerate() {
                escape_byte(&mut out, b, i == 0 && (b == b'.' || b == b'-'));
            }
        }
        _ => {
            out.push('-');
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    out.push('-');
                }
                for &b in part.as_bytes() {
                    escape_byte(&mut out, b, b == b'-');
                }
            }
        }
    }
    Ok(out)
}

/// Appends `b` to `out`, as `\xNN` if `force` or if it is outside `[A-Za-z0-9:_.-]`.
fn escape_byte(out: &mut String, b: u8, force: bool) {
    if !force && (b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-')) {
        out.push(char::from(b));
    } else {
        use std::fmt::Write;
        // Writing to a String cannot fail.
        let _ = write!(out, "\\x{b:02x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(dir: &str) -> String {
        stable_name(dir).unwrap_or_else(|e| panic!("{dir}: {e}"))
    }

    #[test]
    fn a_directory_under_the_state_root_keeps_its_short_name() {
        assert_eq!(name("/var/lib/xdevice/pgwal"), "pgwal");
        assert_eq!(name("/var/lib/xdevice/pg-wal_1.x:y"), "pg-wal_1.x:y");
        assert_eq!(name("/var/lib/xdevice//pgwal/"), "pgwal");
        assert_eq!(name("/var/lib/xdevice/./pgwal"), "pgwal");
        // Characters a device link should not hold, and a leading dot or dash, are escaped.
        assert_eq!(name("/var/lib/xdevice/pg wal"), "pg\\x20wal");
        assert_eq!(name("/var/lib/xdevice/.hidden"), "\\x2ehidden");
        assert_eq!(name("/var/lib/xdevice/-x-y"), "\\x2dx-y");
        assert_eq!(name("/var/lib/xdevice/a\\b"), "a\\x5cb");
        assert_eq!(name("/var/lib/xdevice/é"), "\\xc3\\xa9");
    }

    #[test]
    fn any_other_directory_is_named_by_its_escaped_path() {
        // As `systemd-escape /srv/a-b/x` prints it.
        assert_eq!(name("/srv/a-b/x"), "-srv-a\\x2db-x");
        assert_eq!(name("/srv/a/b-x"), "-srv-a-b\\x2dx");
        assert_ne!(name("/srv/a-b/x"), name("/srv/a/b-x"));
        assert_eq!(name("/a/pgwal"), "-a-pgwal");
        assert_ne!(name("/a/pgwal"), name("/b/pgwal"));
        assert_eq!(name("/srv/.pg/x y"), "-srv-.pg-x\\x20y");
        // The state root itself, and directories deeper in it.
        assert_eq!(name("/var/lib/xdevice"), "-var-lib-xdevice");
        assert_eq!(name("/var/lib/xdevice/a/b"), "-var-lib-xdevice-a-b");
        assert_eq!(name("/"), "-");
    }

    #[test]
    fn short_names_and_escaped_paths_never_meet() {
        // A directory directly under / is not taken for one under the state root, and a short
        // name with a dash is not taken for a path.
        assert_eq!(name("/pgwal"), "-pgwal");
        assert_ne!(name("/pgwal"), name("/var/lib/xdevice/pgwal"));
        assert_ne!(name("/var/lib/xdevice/srv-a"), name("/srv/a"));
        assert_ne!(name("/var/lib/xdevice/-srv-a"), name("/srv/a"));
        // Escaping is injective: a literal escape sequence is escaped again.
        assert_ne!(name("/srv/a\\x2db"), name("/srv/a-b"));
        assert_ne!(name("/var/lib/xdevice/a\\x20b"), name("/var/lib/xdevice/a b"));
    }

    #[test]
    fn names_of_many_directories_are_distinct() {
        let parts = [
            "a", "b", "a-b", "-", ".", ".a", "a.", "x y", "\\x2d", "pgwal", "var", "lib", "xdevice",
        ];
        let mut dirs = vec!["/".to_string()];
        for a in parts {
            dirs.push(format!("/{a}"));
            dirs.push(format!("/var/lib/xdevice/{a}"));
            for b in parts {
                dirs.push(format!("/{a}/{b}"));
                dirs.push(format!("/var/lib/{a}/{b}"));
                dirs.push(format!("/var/lib/xdevice/{a}/{b}"));
            }
        }
        // Different strings may be one directory: `.` components are ignored.
        let mut seen = std::collections::HashMap::new();
        for d in &dirs {
            let canonical: std::path::PathBuf = Path::new(d).components().collect();
            if let Some(other) = seen.insert(name(d), canonical.clone()) {
                assert_eq!(
                    other,
                    canonical,
                    "{d} and {} share the name {}",
                    other.display(),
                    name(d)
                );
            }
        }
    }

    #[test]
    fn relative_paths_and_dot_dot_are_refused() {
        for dir in ["pgwal", "var/lib/xdevice/pgwal", "/var/lib/xdevice/../pgwal", ""] {
            assert!(stable_name(dir).is_err(), "{dir:?} was named");
        }
    }
}
