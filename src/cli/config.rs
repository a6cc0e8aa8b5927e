//! Configuration files: TOML for an embedded device (`xdevice serve --config`) or a cluster
//! member (`xdevice node --config`), read through the `toml` crate and checked here key by key,
//! so every mistake in a file is reported at once (key and reason) rather than the first one.
//!
//! A flag or its environment variable overrides the file; the file overrides the built-in
//! default. Which flags were given is taken from clap's `ArgMatches` (`ValueSource`), so a
//! default value never hides a setting in the file. Keys carry their unit in their name
//! (`_bytes`, `_ms`, `_secs`); sizes take integers or `K`/`M`/`G`/`T` strings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::parser::ValueSource;
use clap::ArgMatches;

use super::exit::Usage;
use super::size;
use crate::device::CacheMode;
use crate::storage::disk::Backend;

/// The daemon a file is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// `xdevice serve` (and `recover`): an embedded device.
    Serve,
    /// `xdevice node`: a cluster member.
    Node,
}

/// A checked configuration file. Every field is optional: what the file leaves out comes from
/// flags or defaults.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Config {
    pub dir: Option<PathBuf>,
    pub raw_device: Option<PathBuf>,
    pub name: Option<String>,
    pub backend: Option<String>,
    pub size_bytes: Option<u64>,
    pub replicas: Option<u64>,
    pub replica_dirs: Option<Vec<PathBuf>>,
    pub mode: Option<String>,
    pub ublk_id: Option<u64>,
    pub queues: Option<u64>,
    pub queue_depth: Option<u64>,
    pub max_io_bytes: Option<u64>,
    pub cache_bytes: Option<u64>,
    pub readahead_bytes: Option<u64>,
    pub inflight_proposals: Option<u64>,
    pub run_dir: Option<PathBuf>,
    pub node_id: Option<u64>,
    pub listen: Option<SocketAddr>,
    pub snapshot_dir: Option<PathBuf>,
    pub attach: Option<bool>,
    pub attach_timeout_secs: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    pub election_min_ms: Option<u64>,
    pub election_max_ms: Option<u64>,
    pub snapshot_segments: Option<u64>,
    pub keep_entries: Option<u64>,
    pub metrics_listen: Option<SocketAddr>,
    pub tls_dir: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub plaintext: Option<bool>,
}

/// Every mistake found in a file, each as `section.key: reason`.
#[derive(Debug, thiserror::Error)]
#[error("{} has {} mistake(s):\n  {}", .file.display(), .mistakes.len(), .mistakes.join("\n  "))]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub mistakes: Vec<String>,
}

/// Keys by section, and which daemons take them.
const SCHEMA: &[(&str, &str, &[Role])] = &[
    ("device", "dir", &[Role::Serve, Role::Node]),
    ("device", "raw_device", &[Role::Node]),
    ("device", "name", &[Role::Node]),
    ("device", "backend", &[Role::Serve, Role::Node]),
    ("device", "size_bytes", &[Role::Serve]),
    ("device", "replicas", &[Role::Serve]),
    ("device", "replica_dirs", &[Role::Serve]),
    ("device", "mode", &[Role::Serve, Role::Node]),
    ("device", "ublk_id", &[Role::Serve, Role::Node]),
    ("device", "queues", &[Role::Serve, Role::Node]),
    ("device", "queue_depth", &[Role::Serve, Role::Node]),
    ("device", "max_io_bytes", &[Role::Serve, Role::Node]),
    ("device", "cache_bytes", &[Role::Serve, Role::Node]),
    ("device", "readahead_bytes", &[Role::Serve, Role::Node]),
    ("device", "inflight_proposals", &[Role::Serve, Role::Node]),
    ("device", "run_dir", &[Role::Serve, Role::Node]),
    ("node", "id", &[Role::Node]),
    ("node", "listen", &[Role::Node]),
    ("node", "snapshot_dir", &[Role::Node]),
    ("node", "attach", &[Role::Node]),
    ("node", "attach_timeout_secs", &[Role::Node]),
    ("raft", "heartbeat_ms", &[Role::Serve, Role::Node]),
    ("raft", "election_min_ms", &[Role::Serve, Role::Node]),
    ("raft", "election_max_ms", &[Role::Serve, Role::Node]),
    ("raft", "snapshot_segments", &[Role::Serve, Role::Node]),
    ("raft", "keep_entries", &[Role::Serve, Role::Node]),
    ("metrics", "listen", &[Role::Serve, Role::Node]),
    ("tls", "dir", &[Role::Node]),
    ("tls", "ca", &[Role::Node]),
    ("tls", "cert", &[Role::Node]),
    ("tls", "key", &[Role::Node]),
    ("tls", "plaintext", &[Role::Node]),
];

/// Reads and checks `path` for `role`; every mistake in one error.
pub fn load(path: &Path, role: Role) -> Result<Config, ConfigErrors> {
    load_given(path, role, &[])
}

/// As `load`, for a daemon given the required keys in `given` (`node.id`, `node.listen`,
/// `device.dir`) by flags or variables: the file need not hold them.
pub fn load_given(path: &Path, role: Role, given: &[&str]) -> Result<Config, ConfigErrors> {
    let fail = |m: String| ConfigErrors { file: path.to_path_buf(), mistakes: vec![m] };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let root: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        fail(format!("not valid TOML: {}", e.to_string().trim_end().replace('\n', "\n    ")))
    })?;
    let mut c = Checker {
        role,
        given: given.iter().map(|k| k.to_string()).collect(),
        mistakes: Vec::new(),
    };
    let cfg = c.config(&root);
    if c.mistakes.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors { file: path.to_path_buf(), mistakes: c.mistakes })
    }
}

/// The role a file is for: `node` if it has a `[node]` section.
pub fn role_of(path: &Path) -> Role {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    match text.parse::<toml::Table>() {
        Ok(t) if t.contains_key("node") => Role::Node,
        _ => Role::Serve,
    }
}

struct Checker {
    role: Role,
    /// Required keys given elsewhere (flags, variables).
    given: Vec<String>,
    mistakes: Vec<String>,
}

/// The closest key in `known` to `key`, if it is a likely misspelling.
fn suggestion<'a>(key: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    known.map(|k| (distance(key, k), k)).filter(|(d, _)| *d <= 2).min().map(|(_, k)| k)
}

impl Checker {
    fn mistake(&mut self, key: &str, why: impl std::fmt::Display) {
        self.mistakes.push(format!("{key}: {why}"));
    }

    // Each field is set from its key in turn, so the file's mistakes are all found.
    #[allow(clippy::field_reassign_with_default)]
    fn config(&mut self, root: &toml::Table) -> Config {
        let sections: Vec<&str> = SCHEMA.iter().map(|(s, _, _)| *s).collect();
        let mut values: BTreeMap<(String, String), toml::Value> = BTreeMap::new();
        for (section, value) in root {
            let Some(table) = value.as_table() else {
                if sections.contains(&section.as_str()) {
                    self.mistake(
                        section,
                        format!("expected a [{section}] table, found {}", kind(value)),
                    );
                } else {
                    self.unknown(section, None);
                }
                continue;
            };
            if !sections.contains(&section.as_str()) {
                self.unknown(section, None);
                continue;
            }
            for (key, v) in table {
                let full = format!("{section}.{key}");
                match SCHEMA.iter().find(|(s, k, _)| s == section && k == key) {
                    None => self.unknown(&full, Some(section)),
                    Some((_, _, roles)) if !roles.contains(&self.role) => {
                        let other = match self.role {
                            Role::Serve => "a cluster member (`xdevice node`)",
                            Role::Node => "an embedded device (`xdevice serve`)",
                        };
                        self.mistake(&full, format!("applies to {other} only"));
                    }
                    Some(_) => {
                        values.insert((section.clone(), key.clone()), v.clone());
                    }
                }
            }
        }
        let mut get = |s: &str, k: &str| values.remove(&(s.to_string(), k.to_string()));
        let mut c = Config::default();
        c.dir = get("device", "dir").and_then(|v| self.dir(&v, "device.dir"));
        c.raw_device = get("device", "raw_device").and_then(|v| self.raw_device(&v));
        c.name = get("device", "name").and_then(|v| self.string(&v, "device.name"));
        c.backend = get("device", "backend").and_then(|v| {
            let s = self.string(&v, "device.backend")?;
            match s.parse::<Backend>() {
                Ok(_) => Some(s),
                Err(e) => {
                    self.mistake("device.backend", e);
                    None
                }
            }
        });
        c.size_bytes = get("device", "size_bytes").and_then(|v| self.size(&v, "device.size_bytes"));
        c.replicas = get("device", "replicas").and_then(|v| self.int(&v, "device.replicas", 1, 15));
        c.replica_dirs = get("device", "replica_dirs").and_then(|v| {
            let Some(list) = v.as_array() else {
                self.mistake(
                    "device.replica_dirs",
                    format!("expected a list of paths, found {}", kind(&v)),
                );
                return None;
            };
            let dirs: Vec<Option<PathBuf>> = list
                .iter()
                .enumerate()
                .map(|(i, d)| self.dir(d, &format!("device.replica_dirs[{i}]")))
                .collect();
            dirs.into_iter().collect()
        });
        c.mode = get("device", "mode").and_then(|v| {
            let s = self.string(&v, "device.mode")?;
            match <CacheMode as clap::ValueEnum>::from_str(&s, false) {
                Ok(_) => Some(s),
                Err(_) => {
                    self.mistake("device.mode", format!("{s:?} is not writeback or writethrough"));
                    None
                }
            }
        });
        c.ublk_id = get("device", "ublk_id")
            .and_then(|v| self.int(&v, "device.ublk_id", 0, u64::from(u32::MAX)));
        c.queues = get("device", "queues").and_then(|v| self.int(&v, "device.queues", 1, 64));
        c.queue_depth =
            get("device", "queue_depth").and_then(|v| self.int(&v, "device.queue_depth", 1, 4096));
        c.max_io_bytes =
            get("device", "max_io_bytes").and_then(|v| self.size(&v, "device.max_io_bytes"));
        c.cache_bytes =
            get("device", "cache_bytes").and_then(|v| self.size(&v, "device.cache_bytes"));
        c.readahead_bytes =
            get("device", "readahead_bytes").and_then(|v| self.size(&v, "device.readahead_bytes"));
        c.inflight_proposals = get("device", "inflight_proposals")
            .and_then(|v| self.int(&v, "device.inflight_proposals", 1, 1024));
        c.run_dir = get("device", "run_dir").and_then(|v| self.path(&v, "device.run_dir"));
        c.node_id = get("node", "id").and_then(|v| self.int(&v, "node.id", 1, u64::MAX));
        c.listen = get("node", "listen").and_then(|v| self.addr(&v, "node.listen"));
        c.snapshot_dir =
            get("node", "snapshot_dir").and_then(|v| self.dir(&v, "node.snapshot_dir"));
        c.attach = get("node", "attach").and_then(|v| match v.as_bool() {
            Some(b) => Some(b),
            None => {
                self.mistake("node.attach", format!("expected true or false, found {}", kind(&v)));
                None
            }
        });
        c.attach_timeout_secs = get("node", "attach_timeout_secs")
            .and_then(|v| self.int(&v, "node.attach_timeout_secs", 1, 86_400));
        c.heartbeat_ms =
            get("raft", "heartbeat_ms").and_then(|v| self.int(&v, "raft.heartbeat_ms", 1, 60_000));
        c.election_min_ms = get("raft", "election_min_ms")
            .and_then(|v| self.int(&v, "raft.election_min_ms", 1, 600_000));
        c.election_max_ms = get("raft", "election_max_ms")
            .and_then(|v| self.int(&v, "raft.election_max_ms", 1, 600_000));
        c.snapshot_segments = get("raft", "snapshot_segments")
            .and_then(|v| self.int(&v, "raft.snapshot_segments", 1, 1 << 20));
        c.keep_entries = get("raft", "keep_entries")
            .and_then(|v| self.int(&v, "raft.keep_entries", 0, u64::MAX));
        c.metrics_listen = get("metrics", "listen").and_then(|v| self.addr(&v, "metrics.listen"));
        c.tls_dir = get("tls", "dir").and_then(|v| self.dir(&v, "tls.dir"));
        c.tls_ca = get("tls", "ca").and_then(|v| self.file(&v, "tls.ca"));
        c.tls_cert = get("tls", "cert").and_then(|v| self.file(&v, "tls.cert"));
        c.tls_key = get("tls", "key").and_then(|v| self.file(&v, "tls.key"));
        c.plaintext = get("tls", "plaintext").and_then(|v| match v.as_bool() {
            Some(b) => Some(b),
            None => {
                self.mistake(
                    "tls.plaintext",
                    format!("expected true or false, found {}", kind(&v)),
                );
                None
            }
        });
        let files_given = ["ca", "cert", "key"].iter().filter(|k| root_has(root, "tls", k)).count();
        if files_given != 0 && files_given != 3 {
            self.mistake("tls", "ca, cert and key go together: give all three or none");
        }
        let choices = [root_has(root, "tls", "dir"), files_given > 0, c.plaintext == Some(true)];
        if choices.iter().filter(|c| **c).count() > 1 {
            self.mistake("tls", "give one of dir, the files (ca, cert, key), or plaintext = true");
        }

        match (c.election_min_ms, c.election_max_ms) {
            (Some(lo), Some(hi)) if lo >= hi => self.mistake(
                "raft.election_min_ms",
                format!("{lo} must be below raft.election_max_ms ({hi})"),
            ),
            (Some(_), None) | (None, Some(_)) => self.mistake(
                "raft",
                "election_min_ms and election_max_ms go together: give both or neither",
            ),
            _ => {}
        }
        if let (Some(n), Some(dirs)) = (c.replicas, &c.replica_dirs) {
            if dirs.len() as u64 != n {
                self.mistake(
                    "device.replica_dirs",
                    format!("{} given for {n} replicas", dirs.len()),
                );
            }
        }
        let given = |k: &str| self.given.iter().any(|g| g == k);
        let (given_id, given_listen, given_dir) =
            (given("node.id"), given("node.listen"), given("device.dir"));
        if self.role == Role::Node {
            if c.node_id.is_none() && !root_has(root, "node", "id") && !given_id {
                self.mistake("node.id", "missing: a member needs its node id");
            }
            if c.listen.is_none() && !root_has(root, "node", "listen") && !given_listen {
                self.mistake("node.listen", "missing: a member needs the address it listens on");
            }
            let (dir, raw) =
                (root_has(root, "device", "dir"), root_has(root, "device", "raw_device"));
            if !dir && !raw && !given_dir {
                self.mistake("device.dir", "missing: give device.dir or device.raw_device");
            } else if dir && raw {
                self.mistake("device.raw_device", "give device.dir or device.raw_device, not both");
            }
        }
        c
    }

    fn unknown(&mut self, key: &str, section: Option<&str>) {
        let known: Vec<String> = match section {
            None => SCHEMA.iter().map(|(s, _, _)| s.to_string()).collect(),
            Some(sec) => {
                SCHEMA.iter().filter(|(s, _, _)| *s == sec).map(|(_, k, _)| k.to_string()).collect()
            }
        };
        let last = key.rsplit('.').next().unwrap_or(key);
        match suggestion(last, known.iter().map(String::as_str)) {
            Some(s) => self.mistake(key, format!("unknown key (did you mean {s}?)")),
            None => self.mistake(key, format!("unknown key (known: {})", dedup(&known).join(", "))),
        }
    }

    fn string(&mut self, v: &toml::Value, key: &str) -> Option<String> {
        match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.mistake(key, format!("expected a string, found {}", kind(v)));
                None
            }
        }
    }

    fn int(&mut self, v: &toml::Value, key: &str, min: u64, max: u64) -> Option<u64> {
        let Some(i) = v.as_integer() else {
            self.mistake(key, format!("expected an integer, found {}", kind(v)));
            return None;
        };
        match u64::try_from(i) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.mistake(key, format!("{i} is out of range {min}..={max}"));
                None
            }
        }
    }

    fn size(&mut self, v: &toml::Value, key: &str) -> Option<u64> {
        let parsed = match v {
            toml::Value::Integer(i) => {
                u64::try_from(*i).map_err(|_| format!("{i} is not a size (negative)"))
            }
            toml::Value::String(s) => size::parse(s),
            other => Err(format!(
                "expected a size (an integer or a string like \"64M\"), found {}",
                kind(other)
            )),
        };
        match parsed {
            Ok(n) => Some(n),
            Err(e) => {
                self.mistake(key, e);
                None
            }
        }
    }

    fn addr(&mut self, v: &toml::Value, key: &str) -> Option<SocketAddr> {
        let s = self.string(v, key)?;
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.mistake(
                    key,
                    format!("{s:?} is not an address IP:PORT (like \"10.0.0.2:7100\")"),
                );
                None
            }
        }
    }

    fn path(&mut self, v: &toml::Value, key: &str) -> Option<PathBuf> {
        let s = self.string(v, key)?;
        if s.is_empty() {
            self.mistake(key, "an empty path");
            return None;
        }
        Some(PathBuf::from(s))
    }

    /// A file that exists and can be read.
    fn file(&mut self, v: &toml::Value, key: &str) -> Option<PathBuf> {
        let p = self.path(v, key)?;
        match std::fs::File::open(&p).and_then(|f| f.metadata()) {
            Ok(m) if m.is_file() => Some(p),
            Ok(_) => {
                self.mistake(key, format!("{} is not a file", p.display()));
                None
            }
            Err(e) => {
                self.mistake(key, format!("{}: {e}", p.display()));
                None
            }
        }
    }

    /// A directory: readable if it exists; otherwise its parent must exist (it is made).
    fn dir(&mut self, v: &toml::Value, key: &str) -> Option<PathBuf> {
        let p = self.path(v, key)?;
        match std::fs::metadata(&p) {
            Ok(m) if !m.is_dir() => {
                self.mistake(key, format!("{} is not a directory", p.display()))
            }
            Ok(_) => {
                if let Err(e) = std::fs::read_dir(&p) {
                    self.mistake(key, format!("{} cannot be read: {e}", p.display()));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = p.parent().filter(|q| !q.as_os_str().is_empty());
                if let Some(parent) = parent {
                    if !parent.is_dir() {
                        self.mistake(
                            key,
                            format!("{} does not exist, nor does its parent", p.display()),
                        );
                    }
                }
            }
            Err(e) => self.mistake(key, format!("{}: {e}", p.display())),
        }
        Some(p)
    }

    fn raw_device(&mut self, v: &toml::Value) -> Option<PathBuf> {
        let key = "device.raw_device";
        let p = self.path(v, key)?;
        if let Err(e) = std::fs::File::open(&p) {
            self.mistake(key, format!("{} cannot be opened: {e}", p.display()));
        }
        Some(p)
    }
}

fn root_has(root: &toml::Table, section: &str, key: &str) -> bool {
    root.get(section).and_then(|s| s.as_table()).is_some_and(|t| t.contains_key(key))
}

fn dedup(v: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

fn kind(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
    }
}

/// Whether the argument `id` was given on the command line or in its environment variable.
fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(m.value_source(id), Some(ValueSource::CommandLine | ValueSource::EnvVariable))
}

/// Sets `slot` from the file where the flag `id` was not given.
pub fn fill<T>(m: &ArgMatches, id: &str, slot: &mut T, from_file: Option<T>) {
    if let Some(v) = from_file {
        if !given(m, id) {
            *slot = v;
        }
    }
}

/// Loads `path` for `role` (`given`: as `load_given`), as a usage error (exit status 2) when it
/// has mistakes.
pub fn load_for(path: &Path, role: Role, given: &[&str]) -> Result<Config> {
    load_given(path, role, given).map_err(|e| Usage(e.to_string()).into())
}

/// Whether the argument `id` was given on the command line or in its environment variable.
pub fn is_given(m: &ArgMatches, id: &str) -> bool {
    given(m, id)
}

/// `xdevice config`.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    op: ConfigOp,
}

#[derive(clap::Subcommand, Debug)]
enum ConfigOp {
    /// Check FILE and print the settings it makes; every mistake is reported at once, each with
    /// its key (exit status 2).
    Check {
        file: PathBuf,
        /// The daemon the file is for [default: node if it has a [node] section, else serve].
        #[arg(long = "for", value_enum)]
        role: Option<Role>,
        /// Print JSON: the settings, or {"file", "mistakes"}.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: ConfigArgs) -> Result<()> {
    let ConfigOp::Check { file, role, json } = args.op;
    let role = role.unwrap_or_else(|| role_of(&file));
    match load(&file, role) {
        Ok(cfg) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&cfg)?);
            } else {
                println!(
                    "{}: no mistakes (for {})",
                    file.display(),
                    match role {
                        Role::Serve => "xdevice serve",
                        Role::Node => "xdevice node",
                    }
                );
            }
            Ok(())
        }
        Err(e) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({ "file": e.file, "mistakes": e.mistakes })
                )?
            );
            Err(Usage(format!("{} has {} mistake(s)", e.file.display(), e.mistakes.len())).into())
        }
        Err(e) => Err(Usage(e.to_string()).into()),
    }
}

/// The cache mode a checked file names.
pub fn mode(s: &str) -> Option<CacheMode> {
    <CacheMode as clap::ValueEnum>::from_str(s, false).ok()
}

/// The backend a checked file names.
pub fn backend(s: &str) -> Option<Backend> {
    s.parse().ok()
}
