//! Configuration files (`--config`, `xdevice config check`): the error matrix (missing keys,
//! wrong types, bad sizes and addresses, unreadable paths, unknown keys), every mistake of a
//! file reported at once with its key; a good file's settings taken by the daemon unless a flag
//! or an environment variable overrides them.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use xdevice::cli::config::{load, Role};

fn xdevice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xdevice"))
        .args(args)
        .env_remove("XDEVICE_CONFIG")
        .output()
        .expect("run xdevice")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// The mistakes `text` has for `role`, each `key: reason`.
fn mistakes(dir: &Path, text: &str, role: Role) -> Vec<String> {
    let p = write(dir, "x.toml", text);
    match load(Path::new(&p), role) {
        Ok(c) => panic!("{text:?} was accepted: {c:?}"),
        Err(e) => e.mistakes,
    }
}

#[test]
fn each_kind_of_mistake_is_named_with_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let file = write(t, "plain-file", "x");
    let node = "[node]\nid = 1\nlisten = \"127.0.0.1:1\"\n[device]\ndir = \"/tmp\"\n";
    let locked = t.join("locked");
    std::fs::create_dir(&locked).unwrap();
    let cases: Vec<(Role, String, &str, &str)> = vec![
        // Missing keys.
        (Role::Node, "[device]\ndir = \"/tmp\"\n".into(), "node.id", "missing"),
        (Role::Node, "[node]\nid = 1\nlisten = \"127.0.0.1:7000\"\n".into(), "device.dir", "missing: give device.dir or device.raw_device"),
        (Role::Node, "[node]\nid = 1\n[device]\ndir = \"/tmp\"\n".into(), "node.listen", "missing"),
        // Wrong types.
        (Role::Serve, "[device]\nqueues = \"four\"\n".into(), "device.queues", "expected an integer, found a string"),
        (Role::Serve, "[device]\nmode = 3\n".into(), "device.mode", "expected a string, found an integer"),
        (Role::Node, "[node]\nid = 1\nlisten = \"127.0.0.1:1\"\nattach = \"yes\"\n[device]\ndir = \"/tmp\"\n".into(), "node.attach", "expected true or false, found a string"),
        (Role::Serve, "device = 5\n".into(), "device", "expected a [device] table, found an integer"),
        (Role::Serve, "[device]\nreplica_dirs = \"/a\"\n".into(), "device.replica_dirs", "expected a list of paths"),
        // Bad values and sizes.
        (Role::Serve, "[device]\ncache_bytes = \"12Q\"\n".into(), "device.cache_bytes", "unknown size unit"),
        (Role::Serve, "[device]\nsize_bytes = \"1.5\"\n".into(), "device.size_bytes", "not a whole number of bytes"),
        (Role::Serve, "[device]\nsize_bytes = -4096\n".into(), "device.size_bytes", "negative"),
        (Role::Serve, "[device]\nsize_bytes = 1.5\n".into(), "device.size_bytes", "found a float"),
        (Role::Serve, "[device]\nqueue_depth = 5000\n".into(), "device.queue_depth", "5000 is out of range 1..=4096"),
        (Role::Serve, "[device]\nmode = \"sometimes\"\n".into(), "device.mode", "\"sometimes\" is not writeback or writethrough"),
        (Role::Serve, "[device]\nbackend = \"floppy\"\n".into(), "device.backend", "floppy"),
        (Role::Serve, "[raft]\nelection_min_ms = 300\nelection_max_ms = 100\n".into(), "raft.election_min_ms", "must be below raft.election_max_ms"),
        (Role::Serve, "[raft]\nelection_min_ms = 300\n".into(), "raft", "give both or neither"),
        (Role::Serve, "[device]\nreplicas = 3\nreplica_dirs = [\"/tmp\"]\n".into(), "device.replica_dirs", "1 given for 3 replicas"),
        // Bad addresses.
        (Role::Serve, "[metrics]\nlisten = \"nowhere\"\n".into(), "metrics.listen", "\"nowhere\" is not an address IP:PORT"),
        (Role::Node, "[node]\nid = 1\nlisten = \"10.0.0.1\"\n[device]\ndir = \"/tmp\"\n".into(), "node.listen", "is not an address"),
        // Unreadable and impossible paths.
        (Role::Serve, format!("[device]\ndir = \"{file}\"\n"), "device.dir", "is not a directory"),
        (Role::Serve, format!("[device]\ndir = \"{}\"\n", t.join("absent/sub").display()), "device.dir", "does not exist, nor does its parent"),
        (Role::Serve, format!("[device]\ndir = \"{file}/sub\"\n"), "device.dir", "Not a directory"),
        (Role::Node, format!("[node]\nid = 1\nlisten = \"127.0.0.1:1\"\n[device]\nraw_device = \"{}\"\n", t.join("no-such-disk").display()), "device.raw_device", "cannot be opened"),
        (Role::Serve, "[device]\ndir = \"\"\n".into(), "device.dir", "an empty path"),
        // Unknown keys, sections, and keys of the other daemon.
        (Role::Serve, "[device]\ncahce_bytes = \"1G\"\n".into(), "device.cahce_bytes", "unknown key (did you mean cache_bytes?)"),
        (Role::Serve, "[devise]\n".into(), "devise", "unknown key (did you mean device?)"),
        (Role::Serve, "[security]\ncert = \"/x\"\n".into(), "security", "unknown key (known:"),
        (Role::Serve, "[tls]\ndir = \"/tmp\"\n".into(), "tls.dir", "applies to a cluster member"),
        // TLS: the files exist, come together, and one way is chosen.
        (Role::Node, format!("{node}[tls]\ncert = \"{}\"\n", t.join("absent.pem").display()), "tls.cert", "No such file"),
        (Role::Node, format!("{node}[tls]\ncert = \"{file}\"\n"), "tls", "ca, cert and key go together"),
        (Role::Node, format!("{node}[tls]\ndir = \"/tmp\"\nplaintext = true\n"), "tls", "give one of dir"),
        (Role::Node, format!("{node}[tls]\nplaintext = \"yes\"\n"), "tls.plaintext", "expected true or false"),
        (Role::Serve, "[node]\nid = 1\n".into(), "node.id", "applies to a cluster member"),
        (Role::Node, "[node]\nid = 1\nlisten = \"127.0.0.1:1\"\n[device]\ndir = \"/tmp\"\nreplicas = 3\n".into(), "device.replicas", "applies to an embedded device"),
    ];
    for (role, text, key, reason) in &cases {
        let m = mistakes(t, text, *role);
        let line = format!("{key}: ");
        assert!(
            m.iter().any(|l| l.starts_with(&line) && l.contains(reason)),
            "{text:?} ({role:?}): expected \"{key}: …{reason}…\", got {m:?}"
        );
    }

    // A directory that cannot be read (not for root, who reads everything).
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        let m = mistakes(t, &format!("[device]\ndir = \"{}\"\n", locked.display()), Role::Serve);
        assert!(
            m.iter().any(|l| l.starts_with("device.dir: ") && l.contains("cannot be read")),
            "{m:?}"
        );
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    // What flags give need not be in the file: a member's id, address and store by flag.
    let p = write(t, "member.toml", "[node]\nattach_timeout_secs = 60\n");
    let given = ["node.id", "node.listen", "device.dir"];
    let c = xdevice::cli::config::load_given(Path::new(&p), Role::Node, &given).unwrap();
    assert_eq!(c.attach_timeout_secs, Some(60));
    let m = mistakes(t, "[node]\nattach_timeout_secs = 60\n", Role::Node);
    assert_eq!(m.len(), 3, "without flags all three are missing: {m:?}");

    // Not TOML at all, and no file.
    let m = mistakes(t, "[device\nqueues = 1", Role::Serve);
    assert!(m.len() == 1 && m[0].starts_with("not valid TOML"), "{m:?}");
    let e = load(&t.join("absent.toml"), Role::Serve).unwrap_err();
    assert!(e.mistakes[0].starts_with("cannot read it: No such file"), "{:?}", e.mistakes);
}

#[test]
fn every_mistake_in_a_file_is_reported_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "[device]\nqueues = \"four\"\ncache_bytes = \"12Q\"\ncahce = 1\n\
                [metrics]\nlisten = \"nowhere\"\n[raft]\nheartbeat_ms = -5\n";
    let m = mistakes(tmp.path(), text, Role::Serve);
    assert_eq!(m.len(), 5, "{m:#?}");
    // The command says the same, with exit status 2, in text and in JSON.
    let p = write(tmp.path(), "bad.toml", text);
    let out = xdevice(&["config", "check", &p]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("has 5 mistake(s)"), "{stderr}");
    for key in [
        "device.queues:",
        "device.cache_bytes:",
        "device.cahce:",
        "metrics.listen:",
        "raft.heartbeat_ms:",
    ] {
        assert!(stderr.contains(key), "{key} missing from {stderr}");
    }
    let out = xdevice(&["config", "check", "--json", &p]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mistakes"].as_array().unwrap().len(), 5, "{v}");
    // A daemon given the file refuses to start, naming the mistakes, before touching anything.
    let dir = tmp.path().join("never-made");
    let out = xdevice(&["serve", "--config", &p, "--dir", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("device.cache_bytes: "));
    assert!(!dir.exists());
}

#[test]
fn a_good_file_is_read_and_flags_and_variables_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let text = format!(
        "[device]\ndir = \"{}\"\nsize_bytes = \"64M\"\ncache_bytes = 33554432\nreadahead_bytes = \"1M\"\n\
         mode = \"writethrough\"\nqueue_depth = 32\n[raft]\nheartbeat_ms = 40\nelection_min_ms = 200\n\
         election_max_ms = 400\n[metrics]\nlisten = \"127.0.0.1:9477\"\n",
        t.join("d").display()
    );
    let p = write(t, "serve.toml", &text);
    let c = load(Path::new(&p), Role::Serve).unwrap();
    assert_eq!(c.size_bytes, Some(64 << 20));
    assert_eq!(c.cache_bytes, Some(32 << 20));
    assert_eq!(c.queue_depth, Some(32));
    assert_eq!((c.election_min_ms, c.election_max_ms), (Some(200), Some(400)));
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9477".parse().unwrap()));
    let out = xdevice(&["config", "check", "--json", &p]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cache_bytes"], 32 << 20);

    // The file's values reach the daemon's own checks: a readahead over a quarter of the cache
    // set by the file is refused naming the flags; a flag fixes it; so does the variable.
    let bad = write(t, "ra.toml", "[device]\ncache_bytes = \"16M\"\nreadahead_bytes = \"8M\"\n");
    let dir = t.join("d2");
    let d = dir.to_str().unwrap();
    let out = xdevice(&["serve", "--config", &bad, "--dir", d]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("--readahead 8388608 is more than a quarter of --cache 16777216"));
    // With a flag the check passes, and the next check (a bad --queues, given so that the start
    // stops there, before the kernel) is the one that fails.
    let out =
        xdevice(&["serve", "--config", &bad, "--dir", d, "--readahead", "1M", "--queues", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("--readahead") && stderr.contains("--queues"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_xdevice"))
        .args(["serve", "--dir", d, "--queues", "0"])
        .env("XDEVICE_CONFIG", &bad)
        .env("XDEVICE_READAHEAD", "1M")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("--readahead") && stderr.contains("--queues"),
        "the variable overrides the file: {stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_xdevice"))
        .args(["serve", "--dir", d])
        .env("XDEVICE_CONFIG", &bad)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--readahead 8388608"),
        "XDEVICE_CONFIG names the file"
    );
}
