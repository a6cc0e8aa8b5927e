//! The `xdevice` command: its subcommands, and `main`'s work (parse, run, exit status). The
//! binary's `main.rs` only sets the allocator and calls `main` here; the man page and the shell
//! completions are generated from these definitions (`xdevice man`, `xdevice completions`).

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use uuid::Uuid;

use super::{cluster, config, demo, exit, node, serve, size, stop, tls, StoreArgs};
use crate::storage::engine::{Engine, FormatOptions};
use crate::storage::inspect;
use crate::storage::StorageError;

#[derive(Parser, Debug)]
#[command(
    name = "xdevice",
    version,
    about = "A Raft-replicated block device for write-ahead logs",
    after_help = exit::HELP
)]
pub struct Cli {
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
    /// Stop the daemons serving the named devices (or --all): SIGTERM, then wait until each
    /// has committed what it completed and exited. Unmount file systems on them first.
    Stop(stop::StopArgs),
    /// Print the stable name of ublkbN for the udev rule in systemd/90-xdevice.rules: the last
    /// component of its data directory if that lies directly in /var/lib/xdevice, else the
    /// directory's absolute path escaped as `systemd-escape PATH` prints it (`-srv-pg-wal`), so
    /// two devices never get one name.
    #[command(hide = true)]
    UdevName {
        /// The kernel's name of the device, e.g. ublkb0.
        kernel_name: String,
    },
    /// Create a new store for one replica of one device.
    Format(FormatArgs),
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
    Cluster(cluster::ClusterArgs),
    /// Check a configuration file: every mistake is reported at once, each with its key.
    Config(config::ConfigArgs),
    /// Certificates for mutual TLS between members: `tls dev` makes a development CA.
    Tls(tls::TlsCommand),
    /// Print the completion script for a shell (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page, xdevice(1), in roff.
    Man,
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

#[derive(clap::Args, Debug)]
struct FormatArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Size of the served device (e.g. 1G). Required with --dir; with --device the default is
    /// as large as fits.
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
    /// The node id of the member this store is for; left out, the first `xdevice node` started
    /// on it binds it. A store is never started as another node.
    #[arg(long)]
    node_id: Option<u64>,
    /// Format even where the directory holds files, or the device data, that are not an
    /// xdevice store (they are left as they are in a directory, overwritten on a device). Never
    /// formats over an xdevice store.
    #[arg(long)]
    force: bool,
    /// Print what was made as JSON.
    #[arg(long)]
    json: bool,
}

/// What `format --json` prints.
#[derive(Debug, serde::Serialize)]
struct Formatted {
    location: String,
    device: String,
    size_bytes: u64,
    block_bytes: u32,
    segment_bytes: u64,
    device_uuid: Uuid,
    cluster_id: Uuid,
    /// 0: bound by the first node started on it.
    node_id: u64,
}

/// Parses the command line, runs it, and exits with its status (`exit`).
pub fn main() {
    let matches = Cli::command().get_matches();
    let outcome = Cli::from_arg_matches(&matches)
        .map_err(anyhow::Error::from)
        .and_then(|cli| run(cli, &matches));
    if let Err(e) = outcome {
        eprintln!("xdevice: error: {}", exit::message(&e));
        std::process::exit(exit::code(&e));
    }
}

fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    let sub = |name: &str| matches.subcommand_matches(name).cloned().unwrap_or_default();
    match cli.command {
        Command::Serve(mut args) => {
            args.apply_config(&sub("serve"))?;
            serve::run_serve(args)?
        }
        Command::Recover(mut args) => {
            args.apply_config(&sub("recover"))?;
            serve::run_recover(args)?
        }
        Command::Status(args) => serve::run_status(args)?,
        Command::Stop(args) => stop::run(args)?,
        Command::UdevName { kernel_name } => println!("{}", serve::udev_name(&kernel_name)?),
        Command::Node(mut args) => {
            args.apply_config(&sub("node"))?;
            node::run_node(args)?
        }
        Command::Cluster(args) => cluster::run_cluster(args)?,
        Command::Config(args) => config::run(args)?,
        Command::Tls(args) => tls::run(args)?,
        Command::Format(args) => format(args)?,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "xdevice", &mut std::io::stdout())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
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

fn format(args: FormatArgs) -> Result<()> {
    if args.node_id == Some(0) {
        exit::bail_usage!("--node-id must be greater than 0");
    }
    let block_bytes = u32::try_from(args.block_size)
        .map_err(|_| exit::usage(format!("--block-size {} is too large", args.block_size)))?;
    let location = args.store.location(Some("xdb0"))?;
    let name = args.store.name.clone().unwrap_or_else(|| "xdb0".into());
    let opts = FormatOptions {
        device_name: name,
        device_bytes: args.size,
        block_bytes,
        segment_bytes: args.segment_size,
        wal_slots: args.wal_slots,
        device_uuid: Uuid::new_v4(),
        cluster_id: args.cluster_id.unwrap_or_else(Uuid::new_v4),
        node_id: args.node_id.unwrap_or(0),
        force: args.force,
    };
    let sb = Engine::format(&location, &opts)
        .map_err(|e| match e {
            StorageError::Unrecognised(_) => anyhow::anyhow!("{e}; --force formats anyway"),
            other => other.into(),
        })
        .with_context(|| format!("formatting {}", location.describe()))?;
    let made = Formatted {
        location: location.describe(),
        device: sb.device_name.clone(),
        size_bytes: sb.device_bytes,
        block_bytes: sb.block_bytes,
        segment_bytes: sb.segment_bytes,
        device_uuid: sb.device_uuid,
        cluster_id: sb.cluster_id,
        node_id: sb.node_id,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&made)?);
    } else {
        println!(
            "formatted {}: device {} of {} bytes, uuid {}, cluster {}{}",
            made.location,
            made.device,
            made.size_bytes,
            made.device_uuid,
            made.cluster_id,
            match made.node_id {
                0 => String::new(),
                id => format!(", node {id}"),
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_definitions_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
