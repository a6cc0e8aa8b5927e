//! The files in systemd/ and their installer, on the host (no root needed): every unit passes
//! `systemd-analyze verify` without a warning; the long-running ones keep the exposure level
//! `systemd-analyze security` gave their hardening; the modules-load entry names ublk_drv;
//! `scripts/install` puts every file in place under a DESTDIR, pointed at $PREFIX/bin/xdevice;
//! device names agree with `systemd-escape`. Without systemd-analyze the tests say why and skip,
//! unless `XDEVICE_REQUIRE_SYSTEMD=1` (CI) makes that a failure.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use xdevice::daemon::record::stable_name;

/// The path the units and the udev rule name the binary by (what `make install` rewrites).
const INSTALLED_BIN: &str = "/usr/local/bin/xdevice";

/// Each unit, with the instance verified and analysed, and the highest exposure level
/// `systemd-analyze security` may give it: what it gave when the hardening was written
/// (systemd 252, Debian 12), where the units without hardening scored 9.6 UNSAFE. Removing one
/// hardening line raises it by 0.1 to 1.9; a systemd whose scoring changed needs a new measure.
const UNITS: [(&str, &str, f64); 3] = [
    ("xdevice@.service", "xdevice@pgwal.service", 2.8),
    ("xdevice-member@.service", "xdevice-member@pgwal.service", 2.8),
    ("xdevice-attach@.service", "xdevice-attach@pgwal.service", 1.2),
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `tool` is there. If it is not, the test skips, saying why, unless
/// XDEVICE_REQUIRE_SYSTEMD is set: then, as when the tool is there but fails, the test fails.
fn have(tool: &str, test: &str) -> bool {
    match Command::new(tool).arg("--version").output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "`{tool} --version` failed ({}): {}",
                out.status,
                stderr(&out)
            );
            true
        }
        Err(e) => {
            let why = format!("{tool} not found: {e} (package systemd; scripts/deps test)");
            assert!(
                std::env::var_os("XDEVICE_REQUIRE_SYSTEMD").is_none(),
                "systemd: XDEVICE_REQUIRE_SYSTEMD is set but {why}"
            );
            eprintln!(
                "systemd: skipped {test}: {why} (XDEVICE_REQUIRE_SYSTEMD=1 makes this a failure)"
            );
            false
        }
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The units copied into a new directory, the binary path rewritten to this build's xdevice (a
/// unit whose ExecStart does not exist fails verification).
fn units_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_xdevice");
    for (template, _, _) in UNITS {
        let text = fs::read_to_string(repo().join("systemd").join(template)).unwrap();
        assert!(text.contains(INSTALLED_BIN), "{template} does not run {INSTALLED_BIN}");
        fs::write(dir.path().join(template), text.replace(INSTALLED_BIN, bin)).unwrap();
    }
    dir
}

#[test]
fn every_unit_verifies_without_a_warning() {
    if !have("systemd-analyze", "every_unit_verifies_without_a_warning") {
        return;
    }
    let dir = units_dir();
    for (_, instance, _) in UNITS {
        // The template is found beside the instance's path.
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(instance))
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "systemd-analyze verify {instance}: {}\n{err}", out.status);
        // Unknown keys and values that do not parse are warnings, and the status stays 0. Lines
        // about other units on this machine (none mention xdevice) are not this test's business.
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("xdevice")).collect();
        assert!(ours.is_empty(), "systemd-analyze verify {instance} warned:\n{err}");
    }
}

#[test]
fn the_long_running_units_keep_their_hardening() {
    if !have("systemd-analyze", "the_long_running_units_keep_their_hardening") {
        return;
    }
    let dir = units_dir();
    for (_, instance, limit) in UNITS {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(dir.path().join(instance))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "systemd-analyze security {instance}: {}", stderr(&out));
        // "→ Overall exposure level for xdevice@pgwal.service: 2.8 OK 🙂"
        let prefix = format!("Overall exposure level for {instance}: ");
        let level: f64 = text
            .lines()
            .find_map(|l| l.split_once(&prefix).map(|(_, rest)| rest))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level for {instance} in:\n{text}"));
        assert!(
            level <= limit,
            "{instance}: exposure level {level}, at most {limit} expected (hardening removed?):\n{text}"
        );
        println!("{instance}: exposure level {level} (limit {limit})");
    }
}

#[test]
fn the_modules_load_entry_names_ublk_drv() {
    let text = fs::read_to_string(repo().join("systemd/xdevice-modules.conf")).unwrap();
    let modules: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .collect();
    assert_eq!(modules, ["ublk_drv"], "systemd/xdevice-modules.conf:\n{text}");
    // The units leave module loading to it: ProtectKernelModules= forbids a modprobe of theirs.
    for (template, _, _) in UNITS {
        let unit = fs::read_to_string(repo().join("systemd").join(template)).unwrap();
        assert!(!unit.contains("modprobe"), "{template} still runs modprobe");
    }
}

/// `scripts/install` into a DESTDIR: every file in place, the units and the rule running
/// $PREFIX/bin/xdevice. Completions and the man page come from the binary itself.
#[test]
fn install_puts_every_file_in_place() {
    let dest = tempfile::tempdir().unwrap();
    let prefix = "/opt/xdevice-test";
    let out = Command::new(repo().join("scripts/install"))
        .env("BIN", env!("CARGO_BIN_EXE_xdevice"))
        .env("DESTDIR", dest.path())
        .env("PREFIX", prefix)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "scripts/install: {}\n{printed}{}", out.status, stderr(&out));
    let files = [
        format!("{prefix}/bin/xdevice"),
        "/etc/systemd/system/xdevice@.service".into(),
        "/etc/systemd/system/xdevice-member@.service".into(),
        "/etc/systemd/system/xdevice-attach@.service".into(),
        "/etc/udev/rules.d/90-xdevice.rules".into(),
        "/etc/modules-load.d/xdevice.conf".into(),
        "/usr/share/bash-completion/completions/xdevice".into(),
        "/usr/share/zsh/vendor-completions/_xdevice".into(),
        "/usr/share/fish/vendor_completions.d/xdevice.fish".into(),
        format!("{prefix}/share/man/man1/xdevice.1"),
    ];
    let staged = |f: &str| PathBuf::from(format!("{}{f}", dest.path().display()));
    for f in &files {
        let path = staged(f);
        let meta =
            fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}\n{printed}", path.display()));
        assert!(meta.len() > 0, "{} is empty", path.display());
        assert!(printed.contains(&path.display().to_string()), "not reported: {f}\n{printed}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(staged(&files[0])).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "the binary's mode");
    assert_eq!(
        fs::read(staged(&files[0])).unwrap(),
        fs::read(env!("CARGO_BIN_EXE_xdevice")).unwrap(),
        "the installed binary is not BIN"
    );
    let bin = format!("{prefix}/bin/xdevice");
    for f in &files[1..5] {
        let text = fs::read_to_string(staged(f)).unwrap();
        assert!(!text.contains(INSTALLED_BIN), "{f} still runs {INSTALLED_BIN}:\n{text}");
        let runs: Vec<&str> = text.lines().filter(|l| l.contains("bin/xdevice")).collect();
        assert!(!runs.is_empty(), "{f} runs no xdevice:\n{text}");
        for line in runs {
            assert!(line.contains(&format!("{bin} ")), "{f}: {line}");
        }
    }
    let modules = fs::read_to_string(staged("/etc/modules-load.d/xdevice.conf")).unwrap();
    assert!(modules.lines().any(|l| l.trim() == "ublk_drv"), "{modules}");
    let man = fs::read_to_string(staged(&files[9])).unwrap();
    assert!(man.contains(".TH"), "the man page is not roff:\n{man}");
    // With a DESTDIR nothing on this machine is touched.
    assert!(!printed.contains("daemon-reload") && !printed.contains("udevadm"), "{printed}");
}

#[test]
fn install_refuses_without_a_binary() {
    let dest = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/install"))
        .env_remove("BIN")
        .env("DESTDIR", dest.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("set BIN"), "{}", stderr(&out));
    assert_eq!(fs::read_dir(dest.path()).unwrap().count(), 0, "installed something");
}

/// A data directory outside /var/lib/xdevice is named as `systemd-escape PATH` prints it, one
/// under it by its last component.
#[test]
fn device_names_agree_with_systemd_escape() {
    if !have("systemd-escape", "device_names_agree_with_systemd_escape") {
        return;
    }
    let dirs = [
        "/srv/a-b/x",
        "/srv/a/b-x",
        "/a/pgwal",
        "/pgwal",
        "/srv/.pg/x y",
        "/tmp/xdevice-e2e.AbC123/data",
        "/srv/ü/a:b_c.d",
        "/srv/back\\slash",
        "/var/lib/xdevice/a/b",
        "/var/lib/xdevice",
    ];
    for dir in dirs {
        let out = Command::new("systemd-escape").arg(dir).output().unwrap();
        assert!(out.status.success(), "systemd-escape {dir}: {}", stderr(&out));
        let escaped = String::from_utf8(out.stdout).unwrap();
        assert_eq!(stable_name(dir).unwrap(), escaped.trim_end(), "{dir}");
    }
    assert_eq!(stable_name("/var/lib/xdevice/pgwal").unwrap(), "pgwal");
}
