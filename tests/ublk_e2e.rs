//! The end-to-end tests of the ublk frontend: `ublk/guest/e2e` (file systems, fio with
//! verification, daemon SIGKILL and recover, PostgreSQL, bad requests) against this build's
//! `xdevice`, run by `ublk/guest/test-e2e`: natively where this kernel has ublk, otherwise inside
//! a QEMU guest with Debian's backports kernel (docs/guest.md). One test function, so the suite
//! runs once; its output streams as it goes.
//!
//! Needs root, and ublk in this kernel or `qemu-system-x86_64` (installed by
//! `ublk/guest/prepare`). Without them the test says why and passes, unless
//! `XDEVICE_REQUIRE_UBLK=1` (CI) makes that a failure.
//!
//! `XDEVICE_E2E_TESTS="ext4 postgres"` runs only those tests (names and groups as
//! `ublk/guest/e2e --list`). The logs of a failed test are kept under `target/tmp/ublk-e2e/e2e/`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Host paths the guest does not see (it mounts fresh tmpfs over them).
const GUEST_MASKED: [&str; 4] = ["/tmp", "/var/tmp", "/run", "/dev/shm"];

fn effective_uid() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let ids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    ids.split_whitespace().nth(1).map(str::to_string)
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// This kernel has ublk (loading the module if need be), as `test-e2e` checks it.
fn native_ublk() -> bool {
    Path::new("/sys/module/ublk_drv").exists()
        || Command::new("modprobe").args(["-q", "ublk_drv"]).status().is_ok_and(|s| s.success())
}

/// Why the end-to-end tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    let euid = effective_uid();
    if euid.as_deref() != Some("0") {
        return Some(format!("not running as root (effective uid {euid:?})"));
    }
    if native_ublk() {
        return None;
    }
    if in_path("qemu-system-x86_64") {
        return None;
    }
    Some(format!(
        "this kernel ({}) has no ublk_drv and qemu-system-x86_64 is not installed \
         (ublk/guest/prepare installs it)",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    ))
}

/// The directory of `path` if the guest would not see it: shared with the guest read-write.
fn masked_dir(path: &Path) -> Option<PathBuf> {
    GUEST_MASKED.iter().any(|m| path.starts_with(m)).then(|| path.to_path_buf())
}

#[test]
fn ublk_e2e() {
    let required = std::env::var("XDEVICE_REQUIRE_UBLK").is_ok_and(|v| v == "1");
    if let Some(why) = unavailable() {
        assert!(!required, "ublk_e2e: XDEVICE_REQUIRE_UBLK=1 but {why}");
        eprintln!("ublk_e2e: skipped: {why} (XDEVICE_REQUIRE_UBLK=1 makes this a failure)");
        return;
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let xdevice = Path::new(env!("CARGO_BIN_EXE_xdevice"));
    // target/tmp/ublk-e2e: the guest's job directory, kept, so that the logs a failed test
    // copies there outlive the guest.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ublk-e2e");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("create the e2e output directory");

    let mut cmd = Command::new(root.join("ublk/guest/test-e2e"));
    cmd.arg(root.join("ublk/guest/e2e"))
        .current_dir(root)
        .env("XDEVICE_BIN", xdevice)
        .env("XDEVICE_GUEST_OUT", &out);
    if let Ok(tests) = std::env::var("XDEVICE_E2E_TESTS") {
        cmd.args(tests.split_whitespace());
    }
    // Three replicas preallocate their stores in the guest's memory, beside PostgreSQL.
    if std::env::var_os("XDEVICE_GUEST_MEM").is_none() {
        cmd.env("XDEVICE_GUEST_MEM", "6G");
    }
    // A checkout or target directory under /tmp is invisible in the guest unless shared.
    let mut shares: Vec<String> =
        std::env::var("XDEVICE_GUEST_RW").ok().filter(|s| !s.is_empty()).into_iter().collect();
    let mut masked: Vec<PathBuf> = Vec::new();
    for dir in [Some(root), xdevice.parent()].into_iter().flatten() {
        if let Some(dir) = masked_dir(dir) {
            if !masked.iter().any(|m| dir.starts_with(m)) {
                masked.push(dir);
            }
        }
    }
    shares.extend(masked.iter().map(|d| d.display().to_string()));
    if !shares.is_empty() {
        cmd.env("XDEVICE_GUEST_RW", shares.join(":"));
    }

    eprintln!(
        "ublk_e2e: {} {} (xdevice {})",
        root.join("ublk/guest/test-e2e").display(),
        root.join("ublk/guest/e2e").display(),
        xdevice.display()
    );
    // stdout and stderr are inherited: the suite's lines stream as they come.
    let status = cmd.status().expect("run ublk/guest/test-e2e");
    assert!(
        status.success(),
        "ublk/guest/e2e failed ({status}): see its `e2e: FAIL` lines above; \
         the logs of a failed test are in {}/e2e/",
        out.display()
    );
    check_metrics_scrapes(&out.join("metrics"));
}

/// The `metrics` test's scrapes (`ublk/guest/e2e` keeps them), parsed here with a Prometheus
/// text parser: every metric `docs/operations.md` documents for a serving daemon is there, and
/// the request histograms' counts moved by at least what fio did. Absent when the test was not
/// among those run.
fn check_metrics_scrapes(dir: &Path) {
    use common::metrics::{documented, parse, value};
    let Ok(after) = std::fs::read_to_string(dir.join("after.prom")) else {
        eprintln!(
            "ublk_e2e: no metrics scrapes in {} (the metrics test did not run)",
            dir.display()
        );
        return;
    };
    let before = parse(&std::fs::read_to_string(dir.join("before.prom")).unwrap());
    let during = parse(&std::fs::read_to_string(dir.join("during.prom")).unwrap());
    let after = parse(&after);
    for (name, scope) in documented() {
        if matches!(scope.as_str(), "every daemon" | "serving" | "replica" | "leader") {
            assert!(after.samples.iter().any(|s| s.metric == name), "{name} ({scope}) missing");
        }
    }
    let fio = |file: &str, side: &str| -> f64 {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        v["jobs"][0][side]["total_ios"].as_f64().unwrap()
    };
    let (writes, reads) = (fio("write.json", "write"), fio("read.json", "read"));
    let syncs = fio("write.json", "sync");
    let moved = |name: &str, op: &str| {
        let l = [("op", op)];
        value(&after, name, &l).unwrap_or(0.0) - value(&before, name, &l).unwrap_or(0.0)
    };
    for (op, did) in [("write", writes), ("read", reads), ("flush", syncs)] {
        let counted = moved("xdevice_request_duration_seconds", op);
        assert!(counted >= did, "{op}: the histogram counted {counted}, fio did {did}");
        assert_eq!(counted, moved("xdevice_requests_total", op), "{op}: histogram and counter");
    }
    // A scrape under load answered, between the two.
    let mid = value(&during, "xdevice_request_duration_seconds", &[("op", "write")]).unwrap_or(0.0);
    let first =
        value(&before, "xdevice_request_duration_seconds", &[("op", "write")]).unwrap_or(0.0);
    assert!(mid >= first, "the scrape during the load went backwards");
    eprintln!(
        "ublk_e2e: metrics scrapes parsed: {writes} writes and {reads} reads by fio, every \
         documented metric present"
    );
}
