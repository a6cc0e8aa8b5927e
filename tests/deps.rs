//! `scripts/deps`, the setup step of the README's two commands and of CI: on a machine state
//! without the packages it installs every one the build and the tests need, says so, and on a
//! machine that has them it installs nothing. The machine's package database and apt-get are
//! replaced by stand-ins, so the test runs anywhere without touching the machine.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deps")
}

fn list(set: &str) -> Vec<String> {
    let out = Command::new(script()).args(["--list", set]).output().unwrap();
    assert!(out.status.success(), "--list {set}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

/// A stand-in for `dpkg-query -W -f='${db:Status-Status}' PKG` that reports the packages named
/// in `installed` (one a line) as installed and every other as unknown.
fn fake_dpkg_query(dir: &Path, installed: &[String]) -> PathBuf {
    let db = dir.join("installed");
    std::fs::write(&db, installed.join("\n") + "\n").unwrap();
    let path = dir.join("dpkg-query");
    let body = format!(
        "#!/bin/sh\n# the package is the last argument\nfor p; do :; done\n\
         if grep -qx \"$p\" '{}'; then printf installed; exit 0; fi\n\
         echo \"dpkg-query: no packages found matching $p\" >&2; exit 1\n",
        db.display()
    );
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A stand-in for apt-get that appends its arguments, one call a line, to `calls`.
fn fake_apt_get(dir: &Path) -> (PathBuf, PathBuf) {
    let calls = dir.join("apt-calls");
    let path = dir.join("apt-get");
    std::fs::write(&path, format!("#!/bin/sh\necho \"$*\" >>'{}'\n", calls.display())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (path, calls)
}

fn run_deps(set: &str, dpkg: &Path, apt: &Path) -> Output {
    Command::new(script())
        .arg(set)
        .env("XDEVICE_DPKG_QUERY", dpkg)
        .env("XDEVICE_APT_GET", apt)
        .output()
        .unwrap()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn the_lists_hold_what_the_build_and_the_tests_need() {
    let build = list("build");
    // libublk's -sys crate runs bindgen, which loads libclang: the first-run failure this
    // script exists for.
    for p in ["libclang-dev", "gcc", "libc6-dev", "make"] {
        assert!(build.contains(&p.to_string()), "build list {build:?} lacks {p}");
    }
    let test = list("test");
    for p in &build {
        assert!(test.contains(p), "test list lacks the build's {p}");
    }
    // What the tests run: fio (benchmarks' references, loop-device test), losetup, mkfs.ext4
    // and mkfs.xfs, ip and iptables (partition faults), python3 and PostgreSQL (end to end),
    // dmsetup (a replica's disk failing under PostgreSQL), systemd-analyze (the units,
    // tests/systemd.rs) and udevadm (the udev rule, end to end).
    let used = ["fio", "util-linux", "e2fsprogs", "xfsprogs", "iproute2", "iptables", "dmsetup"];
    for p in used.into_iter().chain(["systemd", "udev", "postgresql"]) {
        assert!(test.contains(&p.to_string()), "test list {test:?} lacks {p}");
    }
    assert_eq!(list("run"), build, "make run builds; the guest's packages come from prepare");
    let mut unique = test.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), test.len(), "a package listed twice: {test:?}");
}

#[test]
fn a_machine_without_the_packages_gets_every_one_and_is_told() {
    let tmp = tempfile::tempdir().unwrap();
    // A fresh machine: only what every Debian image has.
    let dpkg = fake_dpkg_query(tmp.path(), &["util-linux".to_string()]);
    let (apt, calls) = fake_apt_get(tmp.path());
    let want: Vec<String> =
        list("test").into_iter().filter(|p| p != "util-linux").collect::<Vec<_>>();
    let out = run_deps("test", &dpkg, &apt);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !is_root() {
        // Without root it installs nothing and names every missing package.
        assert!(!out.status.success(), "succeeded without root: {stderr}");
        assert!(stderr.contains(&format!("missing packages: {}", want.join(" "))), "{stderr}");
        assert!(!calls.exists(), "apt-get ran without root");
        return;
    }
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("installing {}", want.join(" "))), "{stderr}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 2, "apt-get calls: {calls}");
    assert!(lines[0].starts_with("update"), "{calls}");
    let install: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(install[0], "install", "{calls}");
    for p in &want {
        assert!(install.contains(&p.as_str()), "{p} not installed: {calls}");
    }
    assert!(!install.contains(&"util-linux"), "an installed package was installed again");
}

#[test]
fn a_machine_with_the_packages_installs_nothing_and_says_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dpkg = fake_dpkg_query(tmp.path(), &list("test"));
    let (apt, calls) = fake_apt_get(tmp.path());
    for set in ["build", "test", "run"] {
        let out = run_deps(set, &dpkg, &apt);
        assert!(out.status.success(), "{set}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{set} printed something");
    }
    assert!(!calls.exists(), "apt-get ran with everything installed");
}

#[test]
fn an_unknown_set_is_named() {
    let out = Command::new(script()).arg("everything").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument 'everything'"));
}
