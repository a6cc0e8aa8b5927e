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
    ];
    for (flags, needle) in cases {
        let mut args = vec!["serve", "--dir", d];
        args.extend_from_slice(flags);
        fails_with(&xdevice(&args, tmp.path()), needle);
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
    let out = xdevice(&["status", "--json"], tmp.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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
