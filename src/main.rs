//! `xdevice`: the command-line entry point. Parses arguments, sets up logging, and runs the
//! chosen subcommand; every error is reported with its context and a non-zero exit.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use uuid::Uuid;

use xdevice::cli::{demo, node, serve, size, StoreArgs};
use xdevice::storage::engine::{Engine, FormatOptions};
use xdevice::storage::inspect;
use xdevice::storage::StorageError;

// jemalloc: glibc's per-thread arenas kept gigabytes of freed write buffers resident under a
// sustained write stream (bench `cache-memory`: 5.4 GiB peak with a 16 MiB cache, 466 MiB with
// jemalloc). Settings in `xdevice::MALLOC_CONF`.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
#[used]
static malloc_conf: &[u8; xdevice::MALLOC_CONF.len()] = xdevice::MALLOC_CONF;

#[derive(Parser, Debug)]
#[command(name = "xdevice", version, about = "A Raft-replicated block device for write-ahead logs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a replicated device as /dev/ublkbN: every replica in this process, each with its
    /// own data directory under --dir. Prints the device path once it is live; SIGTERM stops it
    /// cleanly. Re-attaches by itself to the device a crashed daemon left behind.
    Serve(serve::ServeArgs),
    /// Re-attach to the device a crashed daemon served from --dir; in-flight I/O is reissued.
    Recover(serve::RecoverArgs),
    /// Show every served device: replicas, leader, log positions, I/O and pipeline. Exits 0
    /// when every daemon answered (or none runs), 3 when a daemon's status socket did not
    /// answer (it is named on stderr; a daemon that died leaves its socket), 1 on other errors.
    Status(serve::StatusArgs),
    /// Print the stable name of ublkbN (the last component of the data directory it is served
    /// from), for the udev rule in systemd/90-xdevice.rules.
    #[command(hide = true)]
    UdevName {
        /// The kernel's name of the device, e.g. ublkb0.
        kernel_name: String,
    },
    /// Create a new store for one replica of one device.
    Format {
        #[command(flatten)]
        store: StoreArgs,
        /// Size of the served device (e.g. 1G). Required with --dir; with --device the
        /// default is as large as fits.
        #[arg(long, value_parser = size::parse)]
        size: Option<u64>,
        /// Block size of the device and of its image.
        #[arg(long, default_value = "4096", value_parser = size::parse)]
        block_size: u64,
        /// Size of each WAL segment.
        #[arg(long, default_value = "64M", value_parser = size::parse)]
        segment_size: u64,
        /// Raw devices: number of WAL segment slots.
        #[arg(long, default_value_t = 16)]
        wal_slots: u64,
        /// Cluster id (a UUID) the store belongs to; a new one if left out.
        #[arg(long)]
        cluster_id: Option<Uuid>,
        /// The node id of the member this store is for; left out, the first `xdevice node`
        /// started on it binds it. A store is never started as another node.
        #[arg(long)]
        node_id: Option<u64>,
        /// Format even where the directory holds files, or the device data, that are not an
        /// xdevice store (they are left as they are in a directory, overwritten on a device).
        /// Never formats over an xdevice store.
        #[arg(long)]
        force: bool,
    },
    /// Print a store's superblock, Raft state, image and WAL without changing anything.
    Inspect {
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one replica as a server (Raft and client traffic on --listen) until SIGTERM.
    Node(node::NodeArgs),
    /// Manage a cluster through one of its nodes: init, add, remove, transfer, status.
    Cluster(node::ClusterArgs),
    /// Show the storage engine working: format, append, commit, apply, reopen, verify, inspect.
    Demo {
        #[command(flatten)]
        store: StoreArgs,
        /// Number of block writes.
        #[arg(long, default_value_t = 2000)]
        writes: u64,
        /// Blocks per write.
        #[arg(long, default_value_t = 2)]
        blocks_per_write: u64,
    },
}

fn main() {
    // SAFETY: called first in main, before any thread exists; restoring the default SIGPIPE action
    // makes `xdevice inspect | head` end quietly instead of panicking on a closed pipe.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a daemon's log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("xdevice: error: {e:#}");
        let code = match e.downcast_ref::<serve::Unreachable>() {
            Some(_) => serve::UNREACHABLE_EXIT,
            None => 1,
        };
        std::process::exit(code);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run_serve(args)?,
        Command::Recover(args) => serve::run_recover(args)?,
        Command::Status(args) => serve::run_status(args)?,
        Command::UdevName { kernel_name } => println!("{}", serve::udev_name(&kernel_name)?),
        Command::Node(args) => node::run_node(args)?,
        Command::Cluster(args) => node::run_cluster(args)?,
        Command::Format {
            store,
            size,
            block_size,
            segment_size,
            wal_slots,
            cluster_id,
            node_id,
            force,
        } => {
            if node_id == Some(0) {
                anyhow::bail!("--node-id must be greater than 0");
            }
            let location = store.location(Some("xdb0"))?;
            let name = store.name.clone().unwrap_or_else(|| "xdb0".into());
            let opts = FormatOptions {
                device_name: name,
                device_bytes: size,
                block_bytes: u32::try_from(block_size).context("--block-size is too large")?,
                segment_bytes: segment_size,
                wal_slots,
                device_uuid: Uuid::new_v4(),
                cluster_id: cluster_id.unwrap_or_else(Uuid::new_v4),
                node_id: node_id.unwrap_or(0),
                force,
            };
            let sb = Engine::format(&location, &opts)
                .map_err(|e| match e {
                    StorageError::Unrecognised(_) => {
                        anyhow::anyhow!("{e}; --force formats anyway")
                    }
                    other => other.into(),
                })
                .with_context(|| format!("formatting {}", location.describe()))?;
            println!(
                "formatted {}: device {} of {} bytes, uuid {}, cluster {}{}",
                location.describe(),
                sb.device_name,
                sb.device_bytes,
                sb.device_uuid,
                sb.cluster_id,
                match sb.node_id {
                    0 => String::new(),
                    id => format!(", node {id}"),
                }
            );
        }
        Command::Inspect { store, json } => {
            let location = store.location(None)?;
            let report = inspect::inspect(&location)
                .with_context(|| format!("inspecting {}", location.describe()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
        }
        Command::Demo { store, writes, blocks_per_write } => {
            let location = store.location(Some("xdb0"))?;
            demo::run(&location, writes, blocks_per_write)?;
        }
    }
    Ok(())
}
