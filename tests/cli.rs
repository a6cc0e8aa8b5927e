//! The command line as a script sees it: the exit status of every command (0 done, 1 failed,
//! 2 bad usage, 3 a status socket unreachable, 4 not done in time) and the `--json` output of
//! every command a script reads, parsed; human output free of debug formatting; an error that
//! names its cause once; completions and the man page. `serve`'s flags and `status` are in
//! `serve_cli.rs`, configuration files in `config.rs`; `cluster attach --json` is read by the
//! guest's member tests (`ublk/guest/members`).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::node::{free_addr, xdevice_bin, NodeProc};
use serde_json::Value;
use xdevice::daemon::status::{DeviceStatus, ReplicaStatus};
use xdevice::device::CacheMode;

/// A child process killed when the test ends, passed or not.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xdevice(args: &[&str]) -> Output {
    Command::new(xdevice_bin())
        .args(args)
        .env_remove("XDEVICE_CONFIG")
        .output()
        .expect("run xdevice")
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), stderr(out))
    })
}

#[test]
fn usage_mistakes_exit_2_and_failures_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().to_str().unwrap();
    let nil = &uuid::Uuid::nil().to_string();
    let usage: &[(&[&str], &str)] = &[
        (&["no-such-command"], "unrecognized subcommand"),
        (&["format", "--size", "16M"], "give --dir or --device"),
        (&["format", "--dir", empty, "--node-id", "0"], "--node-id must be greater than 0"),
        (&["format", "--dir", empty, "--size", "12Q"], "unknown size unit"),
        (&["node", "--dir", empty], "--id is required"),
        (&["node", "--dir", empty, "--id", "1"], "--listen is required"),
        (&["node", "--dir", empty, "--id", "0", "--listen", "127.0.0.1:1"], "--id must be greater"),
        (&["cluster", "status"], "--node"),
        (
            &["cluster", "--node", "127.0.0.1:1", "--cluster-id", nil, "status"],
            "no TLS certificate",
        ),
        (
            &[
                "cluster",
                "--plaintext",
                "--tls-dir",
                empty,
                "--node",
                "127.0.0.1:1",
                "--cluster-id",
                nil,
                "status",
            ],
            "--plaintext with a TLS certificate",
        ),
        (
            &["cluster", "--tls-ca", empty, "--node", "127.0.0.1:1", "--cluster-id", nil, "status"],
            "--tls-cert",
        ),
        (
            &[
                "cluster",
                "--tls-dir",
                empty,
                "--node",
                "127.0.0.1:1",
                "--cluster-id",
                nil,
                "status",
            ],
            "ca.pem: No such file",
        ),
        (&["node", "--dir", empty, "--id", "1", "--listen", "127.0.0.1:1"], "no TLS certificate"),
        (
            &["tls", "dev", "--dir", empty, "--cluster-id", nil, "--node", "0"],
            "node ids start at 1",
        ),
        (&["stop"], "DEVICE"),
        (&["completions", "tcsh"], "invalid value 'tcsh'"),
    ];
    for (args, needle) in usage {
        let out = xdevice(args);
        assert_eq!(code(&out), 2, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {} lacks {needle:?}", stderr(&out));
    }
    let failed: &[(&[&str], &str)] = &[
        (&["inspect", "--dir", empty], "holds no xdevice store"),
        (&["udev-name", "sda"], "is not a ublk block device name"),
        (
            &[
                "cluster",
                "--plaintext",
                "--node",
                "127.0.0.1:1",
                "--cluster-id",
                &uuid::Uuid::nil().to_string(),
                "status",
            ],
            "127.0.0.1:1",
        ),
    ];
    for (args, needle) in failed {
        let out = xdevice(args);
        assert_eq!(code(&out), 1, "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{args:?}: {} lacks {needle:?}", stderr(&out));
    }
    let out = xdevice(&["--version"]);
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("xdevice "));
}

#[test]
fn format_and_inspect_answer_in_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let d = dir.to_str().unwrap();
    let cluster = uuid::Uuid::new_v4().to_string();
    let args = ["format", "--dir", d, "--size", "16M", "--cluster-id", &cluster, "--node-id", "3"];
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = xdevice(&with_json);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["size_bytes"], 16 << 20);
    assert_eq!(v["cluster_id"], cluster.as_str());
    assert_eq!(v["node_id"], 3);
    assert_eq!(v["block_bytes"], 4096);
    // Never over a store: exit 1, the store left as it was.
    let again = xdevice(&args);
    assert_eq!(code(&again), 1, "{}", stderr(&again));
    let out = xdevice(&["inspect", "--dir", d, "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["superblock"]["device_uuid"], v["device_uuid"], "{report}");
    let text = String::from_utf8_lossy(&xdevice(&["inspect", "--dir", d]).stdout).into_owned();
    assert!(!text.contains("Some(") && !text.contains("None"), "debug formatting in:\n{text}");
}

/// A stand-in daemon: a status socket in `run_dir` answering for ublkb7 served by `pid`.
fn fake_daemon(run_dir: &Path, pid: u32) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(run_dir.join("ublkb7.sock")).unwrap();
    let status = serde_json::to_string(&DeviceStatus {
        id: 7,
        path: "/dev/ublkb7".into(),
        state: "live".into(),
        daemon_pid: pid,
        dir: "/srv/x7".into(),
        mode: CacheMode::Writeback,
        size_bytes: 1 << 30,
        block_bytes: 4096,
        queues: 1,
        depth: 64,
        recovered: false,
        uptime_secs: 1.0,
        leader: Some(1),
        replicas: vec![ReplicaStatus {
            id: 1,
            role: "Leader".into(),
            term: 4,
            last_log_index: Some(120),
            committed: Some(120),
            applied: Some(119),
            snapshot: None,
            purged: None,
            matched: None,
        }],
        io: Default::default(),
        pipeline: Default::default(),
        cache: Default::default(),
    })
    .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = writeln!(conn, "{status}");
        }
    })
}

#[test]
fn stop_signals_the_daemon_waits_for_it_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().to_str().unwrap();
    // Nothing runs: --all stops nothing; a named device is a usage mistake.
    let out = xdevice(&["stop", "--all", "--json", "--run-dir", run]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["stopped"], serde_json::json!([]));
    let out = xdevice(&["stop", "ublkb7", "--run-dir", run]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("no running daemon serves \"ublkb7\""), "{}", stderr(&out));

    // A daemon that stops on SIGTERM after a moment.
    let mut child = Reaped(
        Command::new("sh")
            .args(["-c", "trap 'sleep 0.3; exit 0' TERM; while :; do sleep 0.1; done"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _server = fake_daemon(tmp.path(), child.0.id());
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let out = xdevice(&["stop", "/srv/x7", "--json", "--run-dir", run]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["stopped"][0]["device"], "/dev/ublkb7");
    assert_eq!(v["stopped"][0]["pid"], child.0.id());
    assert!(v["stopped"][0]["seconds"].as_f64().unwrap() >= 0.2, "{v}");
    // Before it goes: `status` as a person reads it, then as a script does.
    let out = xdevice(&["status", "--run-dir", run]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for bad in ["Some(", "None", "Writeback", "{"] {
        assert!(!text.contains(bad), "debug formatting {bad:?} in:\n{text}");
    }
    assert!(text.contains("REPLICA  ROLE"), "a table of replicas:\n{text}");
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().eq(["1", "leader", "4", "120", "120", "119", "-", "-"])),
        "{text}"
    );
    let v = json(&xdevice(&["status", "--json", "--run-dir", run]));
    assert_eq!(v["devices"][0]["replicas"][0]["applied"], 119);
    let status = child.0.wait().unwrap();
    assert!(status.success(), "the daemon exited on its own after SIGTERM: {status}");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn stop_past_its_time_exits_4() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().to_str().unwrap();
    let stubborn = Reaped(
        Command::new("sh")
            .args(["-c", "trap '' TERM; while :; do sleep 0.1; done"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let _server = fake_daemon(tmp.path(), stubborn.0.id());
    std::thread::sleep(Duration::from_millis(200));
    let out = xdevice(&["stop", "ublkb7", "--timeout-secs", "1", "--run-dir", run]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("/dev/ublkb7 still stopping after 1s"), "{}", stderr(&out));
}

#[test]
fn cluster_commands_answer_in_json_and_plain_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = uuid::Uuid::new_v4();
    let cid = cluster.to_string();
    let mut procs: Vec<NodeProc> = (1..=2)
        .map(|id| {
            let mut p =
                NodeProc::format(tmp.path(), id, &cluster, "16M", free_addr("127.0.0.51"), &[]);
            p.start();
            p
        })
        .collect();
    // The third from a configuration file alone.
    let third = NodeProc::format(tmp.path(), 3, &cluster, "16M", free_addr("127.0.0.51"), &[]);
    let cfg = tmp.path().join("n3.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\nid = 3\nlisten = \"{}\"\n[device]\ndir = \"{}\"\n[tls]\ndir = \"{}\"\n",
            third.addr,
            third.dir.display(),
            third.tls.display()
        ),
    )
    .unwrap();
    // Killed if the test fails before its clean stop below.
    let mut n3 = Reaped(
        Command::new(xdevice_bin())
            .args(["node", "--config", cfg.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("n3.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let addrs: Vec<String> =
        procs.iter().map(|p| p.addr.to_string()).chain([third.addr.to_string()]).collect();
    let node1 = addrs[0].as_str();
    let tls = third.tls.to_str().unwrap();
    let cli = |args: &[&str]| {
        let mut all =
            vec!["cluster", "--tls-dir", tls, "--node", node1, "--cluster-id", cid.as_str()];
        all.extend_from_slice(args);
        xdevice(&all)
    };
    let members: Vec<String> =
        addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect();
    let mut init = vec!["init"];
    for m in &members {
        init.extend(["--member", m.as_str()]);
    }
    init.push("--json");
    // The nodes may still be starting: init is retried until one answers.
    let deadline = Instant::now() + Duration::from_secs(15);
    let out = loop {
        let out = cli(&init);
        if code(&out) == 0 || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    let leader = v["leader"].as_u64().unwrap();
    assert!((1..=3).contains(&leader), "{v}");
    assert!(v["term"].as_u64().unwrap() >= 1);
    assert_eq!(v["voters"], serde_json::json!([1, 2, 3]));

    let out = cli(&["status", "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["id"], 1);
    assert_eq!(v["voters"], serde_json::json!([1, 2, 3]));
    let out = cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(code(&out), 0);
    for bad in ["Some(", "None", "LogId", "{"] {
        assert!(!text.contains(bad), "debug formatting {bad:?} in:\n{text}");
    }
    assert!(text.contains("ID     ADDRESS"), "a table of members:\n{text}");
    assert!(text.contains("(this node)"), "{text}");

    // Leadership moved to another node, then that node removed from elsewhere.
    let other = (1..=3u64).find(|i| *i != leader).unwrap();
    let other_addr = addrs[(other - 1) as usize].as_str();
    let out = xdevice(&[
        "cluster",
        "--tls-dir",
        tls,
        "--node",
        other_addr,
        "--cluster-id",
        &cid,
        "--json",
        "transfer",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["leader"], other, "leadership moved to the node asked: {v}");
    let victim = (1..=3u64).find(|i| Some(*i) != v["leader"].as_u64() && *i != 1).unwrap();
    let out = cli(&["remove", "--id", &victim.to_string(), "--json"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let v = json(&out);
    assert_eq!(v["removed"], victim);
    assert!(!v["voters"].as_array().unwrap().contains(&victim.into()), "{v}");

    // Detach with nothing attached, and attach without root or ublk: failures, exit 1.
    let out = cli(&["detach", "--json"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stdout_empty(&out), "nothing on stdout on failure");

    for p in &mut procs {
        p.stop();
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(n3.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(n3.0.wait().unwrap().success());
}

fn stdout_empty(out: &Output) -> bool {
    out.stdout.is_empty()
}

#[test]
fn init_without_a_majority_exits_4() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = uuid::Uuid::new_v4();
    let mut p = NodeProc::format(tmp.path(), 1, &cluster, "16M", free_addr("127.0.0.52"), &[]);
    p.start();
    let (a, b) = (free_addr("127.0.0.52"), free_addr("127.0.0.52"));
    let members = [format!("1={}", p.addr), format!("2={a}"), format!("3={b}")];
    let deadline = Instant::now() + Duration::from_secs(15);
    let out = loop {
        let out = xdevice(&[
            "cluster",
            "--tls-dir",
            p.tls.to_str().unwrap(),
            "--node",
            &p.addr.to_string(),
            "--cluster-id",
            &cluster.to_string(),
            "init",
            "--member",
            &members[0],
            "--member",
            &members[1],
            "--member",
            &members[2],
            "--timeout-secs",
            "2",
        ]);
        if code(&out) != 1 || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("no leader within 2s"), "{}", stderr(&out));
    p.stop();
}

#[test]
fn completions_and_the_man_page_come_from_the_definitions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = xdevice(&["completions", shell]);
        assert_eq!(code(&out), 0, "{shell}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        for word in ["serve", "cluster", "stop", "replica-dir", "config"] {
            assert!(text.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = xdevice(&["man"]);
    assert_eq!(code(&out), 0);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH xdevice 1"),
        "{}",
        &page[..200.min(page.len())]
    );
    assert!(page.contains("Exit status"), "the exit statuses are in the man page");
}

#[test]
fn an_error_names_its_cause_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let out = xdevice(&["format", "--dir", dir.to_str().unwrap(), "--size", "16M"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = if nix::unistd::geteuid().is_root() {
        // Root reads every file: ask as nobody.
        Command::new("runuser")
            .args(["-u", "nobody", "--", xdevice_bin(), "inspect", "--dir", dir.to_str().unwrap()])
            .output()
            .unwrap()
    } else {
        for f in std::fs::read_dir(&dir).unwrap() {
            std::fs::set_permissions(f.unwrap().path(), std::fs::Permissions::from_mode(0o000))
                .unwrap();
        }
        xdevice(&["inspect", "--dir", dir.to_str().unwrap()])
    };
    let e = stderr(&out);
    assert_eq!(code(&out), 1, "{e}");
    assert_eq!(e.matches("Permission denied").count(), 1, "the cause once: {e}");
    assert!(e.contains("inspecting"), "{e}");
}
