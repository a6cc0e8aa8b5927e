//! `xdevice::cli::config::load_given`: a configuration file read and checked key by key, as
//! `xdevice serve --config` and `xdevice node --config` do. The module has no entry point taking
//! text (it reads a path), so the input is written to a per-process scratch file first.
//!
//! Mode bits: 1 check for a cluster member (`node`), else an embedded device (`serve`); 2, 3, 4:
//! `node.id`, `node.listen`, `device.dir` given by flags.
//!
//! Properties: a refused file names at least one mistake, none empty; an accepted configuration
//! keeps every rule the checker states (roles, ranges, pairs, required keys, TLS choices), and
//! written back out as TOML (every field: `PLACES`) it reads back as the same configuration.
//!
//! The checker opens `device.raw_device` and the TLS files to see that it can: an input naming an
//! existing path that is neither a file nor a directory (a device, a FIFO) is skipped, not
//! opened.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use toml::{Table, Value};
use xdevice::cli::config::{load_given, Config, Role};
use xdevice_fuzz::split;

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();

extern "C" {
    fn atexit(f: extern "C" fn()) -> i32;
}

/// Removes the scratch file when libFuzzer exits normally (a crash leaves it, named by pid).
extern "C" fn remove_scratch() {
    if let Some(p) = SCRATCH.get() {
        let _ = std::fs::remove_file(p);
    }
}

/// This process's scratch file, on tmpfs where there is one.
fn scratch() -> &'static Path {
    SCRATCH.get_or_init(|| {
        // SAFETY: registers a plain function with no arguments, as atexit(3) requires.
        unsafe { atexit(remove_scratch) };
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        dir.join(format!("xdevice-fuzz-config-{}.toml", std::process::id()))
    })
}

fn load(text: &str, role: Role, given: &[&str]) -> Result<Config, Vec<String>> {
    std::fs::write(scratch(), text).expect("write the scratch file");
    load_given(scratch(), role, given).map_err(|e| {
        assert_eq!(e.file, scratch());
        assert!(e.to_string().contains(&format!("{} mistake(s)", e.mistakes.len())));
        e.mistakes
    })
}

/// Whether some string in the file names an existing path that is neither a file nor a directory
/// (a device, a FIFO): the checker opens `device.raw_device` and `tls.ca`/`cert`/`key`.
fn names_special(text: &str) -> bool {
    fn special(v: &Value) -> bool {
        match v {
            Value::String(p) => std::fs::metadata(p).is_ok_and(|m| !m.is_file() && !m.is_dir()),
            Value::Array(a) => a.iter().any(special),
            Value::Table(t) => t.values().any(special),
            _ => false,
        }
    }
    text.parse::<Table>().is_ok_and(|root| root.values().any(special))
}

/// Where each `Config` field lives in a file: (field, section, key, a size). Sizes are written as
/// strings of digits (a size may exceed a TOML integer). A field missing here fails the target:
/// written back without it, a configuration would not read back the same.
const PLACES: &[(&str, &str, &str, bool)] = &[
    ("dir", "device", "dir", false),
    ("raw_device", "device", "raw_device", false),
    ("name", "device", "name", false),
    ("backend", "device", "backend", false),
    ("size_bytes", "device", "size_bytes", true),
    ("replicas", "device", "replicas", false),
    ("replica_dirs", "device", "replica_dirs", false),
    ("mode", "device", "mode", false),
    ("ublk_id", "device", "ublk_id", false),
    ("queues", "device", "queues", false),
    ("queue_depth", "device", "queue_depth", false),
    ("max_io_bytes", "device", "max_io_bytes", true),
    ("cache_bytes", "device", "cache_bytes", true),
    ("readahead_bytes", "device", "readahead_bytes", true),
    ("inflight_proposals", "device", "inflight_proposals", false),
    ("run_dir", "device", "run_dir", false),
    ("node_id", "node", "id", false),
    ("listen", "node", "listen", false),
    ("snapshot_dir", "node", "snapshot_dir", false),
    ("attach", "node", "attach", false),
    ("attach_timeout_secs", "node", "attach_timeout_secs", false),
    ("heartbeat_ms", "raft", "heartbeat_ms", false),
    ("election_min_ms", "raft", "election_min_ms", false),
    ("election_max_ms", "raft", "election_max_ms", false),
    ("snapshot_segments", "raft", "snapshot_segments", false),
    ("keep_entries", "raft", "keep_entries", false),
    ("metrics_listen", "metrics", "listen", false),
    ("tls_dir", "tls", "dir", false),
    ("tls_ca", "tls", "ca", false),
    ("tls_cert", "tls", "cert", false),
    ("tls_key", "tls", "key", false),
    ("plaintext", "tls", "plaintext", false),
];

/// Fields only a cluster member takes, and only an embedded device takes.
const NODE_ONLY: &[&str] = &[
    "raw_device",
    "name",
    "node_id",
    "listen",
    "snapshot_dir",
    "attach",
    "attach_timeout_secs",
    "tls_dir",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "plaintext",
];
const SERVE_ONLY: &[&str] = &["size_bytes", "replicas", "replica_dirs"];

/// The fields `cfg` sets, by name, as JSON (which holds any u64).
fn fields(cfg: &Config) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(cfg).expect("a configuration serializes") {
        serde_json::Value::Object(m) => m.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        other => panic!("a configuration serialized as {other}"),
    }
}

/// `cfg` as a file.
fn render(cfg: &Config) -> String {
    fn value(v: &serde_json::Value, size: bool) -> Value {
        match v {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Bool(b) => Value::Boolean(*b),
            serde_json::Value::Number(n) if size => Value::String(n.to_string()),
            serde_json::Value::Number(n) => Value::Integer(n.as_i64().expect("read as an i64")),
            serde_json::Value::Array(a) => Value::Array(a.iter().map(|v| value(v, size)).collect()),
            other => panic!("no TOML for {other}"),
        }
    }
    let mut root = Table::new();
    for (field, v) in fields(cfg) {
        let Some((_, section, key, size)) = PLACES.iter().find(|(f, ..)| *f == field) else {
            panic!("Config.{field} has no place in PLACES (fuzz_targets/config.rs)");
        };
        let t = root.entry(*section).or_insert_with(|| Value::Table(Table::new()));
        t.as_table_mut().expect("a section").insert(key.to_string(), value(&v, *size));
    }
    toml::to_string(&root).expect("a table renders")
}

fn in_range(v: Option<u64>, lo: u64, hi: u64) -> bool {
    v.is_none_or(|v| (lo..=hi).contains(&v))
}

fn check_rules(c: &Config, role: Role, given: &[&str]) {
    let has = |k: &str| given.contains(&k);
    let set = fields(c);
    let wrong_role = if role == Role::Serve { NODE_ONLY } else { SERVE_ONLY };
    if let Some(f) = wrong_role.iter().find(|f| set.contains_key(**f)) {
        panic!("{f} accepted for {role:?}");
    }
    if role == Role::Node {
        assert!(c.node_id.is_some() || has("node.id"), "a member without its id");
        assert!(c.listen.is_some() || has("node.listen"), "a member without its address");
        assert!(c.dir.is_some() || c.raw_device.is_some() || has("device.dir"));
        assert!(c.dir.is_none() || c.raw_device.is_none(), "both dir and raw_device");
    }
    assert!(in_range(c.replicas, 1, 15) && in_range(c.queues, 1, 64));
    assert!(in_range(c.queue_depth, 1, 4096) && in_range(c.inflight_proposals, 1, 1024));
    assert!(in_range(c.ublk_id, 0, u64::from(u32::MAX)) && in_range(c.node_id, 1, u64::MAX));
    assert!(in_range(c.attach_timeout_secs, 1, 86_400) && in_range(c.heartbeat_ms, 1, 60_000));
    assert!(in_range(c.snapshot_segments, 1, 1 << 20));
    match (c.election_min_ms, c.election_max_ms) {
        (Some(lo), Some(hi)) => assert!(lo < hi && hi <= 600_000),
        (None, None) => {}
        other => panic!("election timeouts accepted alone: {other:?}"),
    }
    if let (Some(n), Some(dirs)) = (c.replicas, &c.replica_dirs) {
        assert_eq!(dirs.len() as u64, n);
    }
    let files = [&c.tls_ca, &c.tls_cert, &c.tls_key].iter().filter(|f| f.is_some()).count();
    assert!(files == 0 || files == 3, "{files} of the TLS files accepted");
    let choices = [c.tls_dir.is_some(), files > 0, c.plaintext == Some(true)];
    assert!(choices.iter().filter(|c| **c).count() <= 1, "more than one TLS choice accepted");
    for f in [&c.tls_ca, &c.tls_cert, &c.tls_key].into_iter().flatten() {
        assert!(f.is_file(), "{} accepted as a file", f.display());
    }
    for p in [&c.dir, &c.raw_device, &c.run_dir, &c.snapshot_dir, &c.tls_dir].into_iter().flatten()
    {
        assert!(!p.as_os_str().is_empty());
    }
    if let Some(b) = &c.backend {
        assert!(xdevice::cli::config::backend(b).is_some());
    }
    if let Some(m) = &c.mode {
        assert!(xdevice::cli::config::mode(m).is_some());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split(data) else { return };
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if names_special(text) {
        return;
    }
    let role = if mode & 2 != 0 { Role::Node } else { Role::Serve };
    let given: Vec<&str> = [(4, "node.id"), (8, "node.listen"), (16, "device.dir")]
        .into_iter()
        .filter(|(bit, _)| mode & bit != 0)
        .map(|(_, k)| k)
        .collect();
    match load(text, role, &given) {
        Err(mistakes) => {
            assert!(!mistakes.is_empty(), "refused without a mistake");
            assert!(mistakes.iter().all(|m| !m.trim().is_empty()));
        }
        Ok(cfg) => {
            check_rules(&cfg, role, &given);
            let out = render(&cfg);
            match load(&out, role, &given) {
                Ok(back) => assert_eq!(back, cfg, "written back as\n{out}"),
                Err(m) => panic!("accepted configuration written back is refused: {m:?}\n{out}"),
            }
        }
    }
});
