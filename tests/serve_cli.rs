//! `xdevice serve`, `recover` and `status` on the host, without a ublk kernel: bad flags and
//! bad records are refused with a message naming the problem before anything is touched, and
//! `status` reports daemons it cannot reach instead of failing. Serving itself is tested end to
//! end in the guest (tests/ublk_e2e.rs).

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn xdevice(args: &[&str], run_dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xdevice"))
        .args(args)
        .env("XDEVICE_RUN_DIR", run_dir)
        .output()
        .expect("run xdevice")
}

fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure; stderr: {stderr}");
    assert!(stderr.contains(needle), "stderr {stderr:?} does not name {needle:?}");
}

#[test]
fn bad_serve_flags_are_named_before_anything_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--replicas", "0"], "--replicas must be at least 1"),
        (&["--max-io", "1000"], "--max-io 1000 must be a multiple of 4096"),
        (&["--max-io", "16M"], "must be a multiple of 4096 in 4K..=8M"),
        (&["--inflight-proposals", "0"], "--inflight-proposals must be at least 1"),
        (&["--size", "4097"], "--size 4097 must be a positive multiple"),
        (&["--depth", "0"], "--depth in 1..=4096"),
        (&["--heartbeat-ms", "500", "--election-ms", "100-300"], "--heartbeat-ms"),
        (&["--election-ms", "300-100"], "MIN must be above 0 and below MAX"),
        (&["--mode", "sometimes"], "invalid value 'sometimes'"),
        (
            &["--replicas", "3", "--replica-dir", "/tmp/a", "--replica-dir", "/tmp/b"],
            "2 --replica-dir given for --replicas 3",
        ),
        (&["--replica-dir", "/tmp/a", "--replica-dir", "/tmp/a"], "is given twice"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["serve", "--dir", d];
        args.extend_from_slice(flags);
        let out = xdevice(&args, tmp.path());
        fails_with(&out, needle);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: a usage mistake exits 2");
        assert!(!dir.exists(), "{flags:?} created {}", dir.display());
    }
}

#[test]
fn a_foreign_serve_record_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let record = dir.join("serve.json");
    std::fs::write(&record, b"{\"not\": \"ours\"}").unwrap();
    let d = dir.to_str().unwrap();
    for cmd in ["serve", "recover"] {
        let out = xdevice(&[cmd, "--dir", d], tmp.path());
        fails_with(&out, "is not a valid serve record");
        fails_with(&out, &record.display().to_string());
    }
    assert_eq!(std::fs::read(&record).unwrap(), b"{\"not\": \"ours\"}");
}

/// A device's replica directories are fixed when it is made: a later `serve` naming others is
/// refused (before ublk is even looked for), and the record stays as it was.
#[test]
fn replica_directories_cannot_be_moved_by_a_later_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let disks: Vec<String> =
        (1..=3).map(|i| tmp.path().join(format!("disk{i}")).display().to_string()).collect();
    let record = |dirs: &[String]| {
        serde_json::json!({
            "serve_uuid": "8d6c1a52-6b6e-4c2a-9f3e-0d1c2b3a4f5e",
            "ublk_id": 7,
            "replicas": 3,
            "mode": "writeback",
            "size_bytes": 1073741824u64,
            "block_bytes": 4096,
            "queues": 1,
            "depth": 64,
            "max_io_bytes": 1048576,
            "replica_dirs": dirs,
        })
        .to_string()
    };
    let path = dir.join("serve.json");
    // Made on three disks: naming them in another order, or two of them, is refused.
    std::fs::write(&path, record(&disks)).unwrap();
    let swapped = ["serve", "--dir", d, "--replica-dir", &disks[1], "--replica-dir", &disks[0]];
    let mut args = swapped.to_vec();
    args.extend(["--replica-dir", &disks[2]]);
    let out = xdevice(&args, tmp.path());
    fails_with(&out, "--replica-dir cannot move");
    fails_with(&out, &disks[0]);
    let out = xdevice(&["serve", "--dir", d, "--replica-dir", &disks[0]], tmp.path());
    fails_with(&out, "--replica-dir cannot move");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), record(&disks));
    // Made in the default layout: it stays there.
    std::fs::write(&path, record(&[])).unwrap();
    let mut args = vec!["serve", "--dir", d];
    for disk in &disks {
        args.extend(["--replica-dir", disk.as_str()]);
    }
    fails_with(&xdevice(&args, tmp.path()), "replica-N; --replica-dir cannot move");
    assert!(disks.iter().all(|p| !std::path::Path::new(p).exists()), "a replica dir was made");
}

#[test]
fn recover_without_a_record_says_nothing_was_served() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    fails_with(&xdevice(&["recover", "--dir", d], tmp.path()), "nothing was served from it");
    let missing = tmp.path().join("missing");
    fails_with(
        &xdevice(&["recover", "--dir", missing.to_str().unwrap()], tmp.path()),
        "data directory",
    );
}

#[test]
fn status_reports_no_daemons_and_unreachable_sockets() {
    let tmp = tempfile::tempdir().unwrap();
    let out = xdevice(&["status"], tmp.path());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no xdevice daemons running"));

    // A socket left by a daemon that died: nobody accepts on it.
    let path = tmp.path().join("ublkb7.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(listener);
    // It still prints what it knows, and exits 3 so that a script or health check sees it.
    let out = xdevice(&["status"], tmp.path());
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unreachable:") && stderr.contains("/dev/ublkb7"), "{stderr}");
    assert!(stderr.contains("1 status socket(s) did not answer"), "{stderr}");
    let out = xdevice(&["status", "--json"], tmp.path());
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["devices"].as_array().unwrap().len(), 0);
    let unreachable = v["unreachable"].as_array().unwrap();
    assert_eq!(unreachable.len(), 1);
    assert_eq!(unreachable[0]["device"], "/dev/ublkb7");
    assert!(unreachable[0]["error"].as_str().unwrap().contains("refused"), "{v}");
}

#[test]
fn udev_name_rejects_names_that_are_not_ublk_devices() {
    let tmp = tempfile::tempdir().unwrap();
    fails_with(&xdevice(&["udev-name", "sda"], tmp.path()), "is not a ublk block device name");
    fails_with(&xdevice(&["udev-name", "ublkb9999"], tmp.path()), "/dev/ublkc9999 does not exist");
}
