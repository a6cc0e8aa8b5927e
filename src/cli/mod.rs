//! The `xdevice` command line: argument types shared by subcommands and the code behind each.
//! Errors carry context with `anyhow`; nothing here decides storage policy.

pub mod app;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod exit;
pub mod node;
pub mod serve;
pub mod size;
pub mod stop;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

pub use tls::TlsArgs;

use crate::storage::disk::{self, Backend, DirVolume, Volume};
use crate::storage::layout::{self, Location};

/// Where a store lives: exactly one of `--dir` or `--device`.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Data directory holding the store's files (directory layout).
    #[arg(long, conflicts_with = "device")]
    pub dir: Option<PathBuf>,
    /// Raw block device (an NVMe namespace, a loop device) holding the store.
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Device name: the prefix of the store's files in --dir.
    #[arg(long)]
    pub name: Option<String>,
    /// I/O backend.
    #[arg(long, default_value = "uring")]
    pub backend: Backend,
}

impl StoreArgs {
    /// Resolves the location. In a directory, `--name` may be left out when it holds one device
    /// (or, with `default_name`, none yet).
    pub fn location(&self, default_name: Option<&str>) -> Result<Location> {
        if let Some(path) = &self.device {
            let disk = disk::open_path(path, self.backend)
                .with_context(|| format!("opening {}", path.display()))?;
            return Ok(Location::Raw { disk });
        }
        let Some(dir) = &self.dir else {
            return Err(exit::usage("give --dir or --device"));
        };
        if default_name.is_some() {
            // Creating a store: make its data directory as `mkdir -p` would.
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating data directory {}", dir.display()))?;
        }
        let volume: Arc<dyn Volume> = Arc::new(
            DirVolume::open(dir, self.backend)
                .with_context(|| format!("opening data directory {}", dir.display()))?,
        );
        let name = match (&self.name, default_name) {
            (Some(name), _) => name.clone(),
            (None, default) => {
                let found = layout::devices_in(&*volume)?;
                match (found.as_slice(), default) {
                    ([one], _) => one.clone(),
                    ([], Some(default)) => default.to_string(),
                    ([], None) => {
                        bail!("{} holds no xdevice store (run `xdevice format`)", dir.display())
                    }
                    (many, _) => bail!(
                        "{} holds several devices ({}); choose one with --name",
                        dir.display(),
                        many.join(", ")
                    ),
                }
            }
        };
        Ok(Location::Directory { volume, name })
    }
}
