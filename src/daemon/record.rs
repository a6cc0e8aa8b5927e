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

/// The stable name of `ublkbN`: the last component of the data directory its daemon recorded
/// with the device.
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
    Path::new(dir)
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("data directory {dir:?} has no usable last component"))
}
