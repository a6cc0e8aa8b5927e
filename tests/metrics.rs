//! `xdevice node --metrics`: three node processes on 127.0.0.41-43 under a write load, each
//! scraped over HTTP during and after it and parsed with a Prometheus text parser
//! (`prometheus-parse`). Every metric `docs/operations.md` documents for a node is present, the
//! fsync histogram's count and the commit index move with the writes, and the leader reports
//! each follower's lag. (The device's own request histograms are checked in the guest, under
//! fio: `ublk/guest/metrics`, parsed here by `tests/ublk_e2e.rs`.)

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::metrics::{documented, value};
use common::node::{free_addr, NodeProc};
use prometheus_parse::Scrape;
use xdevice::device::remote::RemoteCluster;
use xdevice::device::{CacheMode, Device, DeviceConfig};
use xdevice::replication::tcp::{Admin, AdminReply};

const BS: usize = 4096;

/// `GET /metrics` on `addr`, parsed.
fn scrape(addr: SocketAddr) -> Scrape {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    common::metrics::parse(body)
}

#[test]
fn nodes_serve_documented_metrics_that_move_with_the_writes() {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let base = tempfile::tempdir().unwrap();
        let cluster = uuid::Uuid::new_v4();
        let mut procs = Vec::new();
        let mut scrapes = Vec::new();
        for id in 1..=3u64 {
            let ip = format!("127.0.0.{}", 40 + id);
            let metrics = free_addr(&ip);
            let m = metrics.to_string();
            let mut p = NodeProc::format(
                base.path(),
                id,
                &cluster,
                "64M",
                free_addr(&ip),
                &["--metrics", &m],
            );
            p.start();
            procs.push(p);
            scrapes.push(metrics);
        }
        let members: Vec<(u64, String)> =
            procs.iter().map(|p| (p.id, p.addr.to_string())).collect();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let init = Admin::Init(members.clone());
            match procs[0].admin_client(cluster).admin(init, Duration::from_secs(5)).await {
                Ok(_) => break,
                Err(e) => assert!(Instant::now() < deadline, "init: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let leader = loop {
            if let Ok(AdminReply::Status(s)) =
                procs[0].client(cluster).admin(Admin::Status, Duration::from_secs(2)).await
            {
                if let Some(l) = s.leader {
                    break l;
                }
            }
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let li = (leader - 1) as usize;
        let lid = leader.to_string();
        let before: Vec<Scrape> = scrapes.iter().map(|a| scrape(*a)).collect();

        // The write load: 300 writes of 8 blocks with a flush after every tenth.
        let addrs: Vec<SocketAddr> = procs.iter().map(|p| p.addr).collect();
        let security = procs[0].security();
        let remote = RemoteCluster::new(&addrs, None, cluster, &security, Duration::from_secs(5));
        let cfg = DeviceConfig::new(BS as u32, (64 << 20) / BS as u64, CacheMode::Writeback);
        let dev = Device::start(cfg, remote);
        let writes = 300u64;
        let load = {
            let dev = dev.clone();
            tokio::spawn(async move {
                for i in 0..writes {
                    let data = vec![(i % 251) as u8; 8 * BS];
                    dev.write((i % 1000) * 8 * BS as u64, &data, false).await.unwrap();
                    if i % 10 == 9 {
                        dev.flush().await.unwrap();
                    }
                }
                dev.flush().await.unwrap();
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let during = scrape(scrapes[li]);
        load.await.unwrap();
        dev.close();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after: Vec<Scrape> = scrapes.iter().map(|a| scrape(*a)).collect();

        // Every metric documented for a node is there, on every node; the leader's lag
        // figures on the leader.
        for (name, scope) in documented() {
            let on_node = matches!(scope.as_str(), "every daemon" | "replica");
            for (i, s) in after.iter().enumerate() {
                let present = s.samples.iter().any(|x| x.metric == name);
                if on_node || (scope == "leader" && i == li) {
                    assert!(present, "{name} ({scope}) missing on node {}", i + 1);
                }
                if scope == "serving" {
                    assert!(!present, "{name} on node {}, which serves no device", i + 1);
                }
            }
        }
        assert!(
            during.samples.iter().any(|x| x.metric == "xdevice_raft_commit_index"),
            "a scrape under load answers"
        );
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let id = (i + 1).to_string();
            let r = [("replica", id.as_str())];
            let fsyncs = |s: &Scrape| value(s, "xdevice_fsync_duration_seconds", &[]).unwrap();
            assert!(
                fsyncs(a) >= fsyncs(b) + 30.0,
                "node {id}: fsyncs {} -> {} for {writes} writes with 30 flushes",
                fsyncs(b),
                fsyncs(a)
            );
            let applied = |s: &Scrape| value(s, "xdevice_raft_applied_index", &r).unwrap();
            assert!(applied(a) > applied(b), "node {id}: applied {} -> {}", applied(b), applied(a));
            assert_eq!(value(a, "xdevice_build_info", &[]), Some(1.0));
            assert!(value(a, "xdevice_wal_bytes", &r).unwrap() >= 8.0 * (1 << 20) as f64);
            assert_eq!(value(a, "xdevice_raft_leader", &r), Some(leader as f64), "node {id}");
        }
        let a = &after[li];
        let committed = value(a, "xdevice_raft_commit_index", &[("replica", &lid)]).unwrap();
        let first = value(&before[li], "xdevice_raft_commit_index", &[("replica", &lid)]).unwrap();
        assert!(committed > first, "commit index {first} -> {committed}");
        assert_eq!(value(a, "xdevice_raft_is_leader", &[("replica", &lid)]), Some(1.0));
        let followers: BTreeSet<String> = a
            .samples
            .iter()
            .filter(|x| x.metric == "xdevice_replication_lag_entries")
            .filter_map(|x| x.labels.get("follower").map(str::to_string))
            .collect();
        let expected: BTreeSet<String> =
            (1..=3u64).filter(|i| *i != leader).map(|i| i.to_string()).collect();
        assert_eq!(followers, expected, "lag reported for each follower");
        for f in &expected {
            let l = [("replica", lid.as_str()), ("follower", f.as_str())];
            let entries = value(a, "xdevice_replication_lag_entries", &l).unwrap();
            assert!(entries < 50.0, "follower {f} is {entries} entries behind once idle");
            assert!(value(a, "xdevice_replication_lag_seconds", &l).unwrap() < 30.0);
        }
        for p in &mut procs {
            p.stop();
        }
    });
}
