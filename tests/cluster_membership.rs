//! Clusters of `xdevice node` processes: a proposal too large for a log record is refused
//! without harm.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xdevice::entry::BlockOp;
use xdevice::replication::tcp::{Admin, AdminReply, NodeClient, NodeStatus};
use xdevice::replication::types::Request;

const BS: usize = 4096;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_xdevice")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `xdevice node` process; its output goes to `node.log` in its directory.
struct Proc {
    id: u64,
    dir: PathBuf,
    addr: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
}

impl Proc {
    fn new(base: &Path, id: u64, cluster: &uuid::Uuid, size: &str, args: &[&str]) -> Proc {
        let dir = base.join(format!("n{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(bin())
            .args(["format", "--size", size, "--segment-size", "8M", "--cluster-id"])
            .arg(cluster.to_string())
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "format: {}", String::from_utf8_lossy(&out.stderr));
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let args = args.iter().map(|s| s.to_string()).collect();
        Proc { id, dir, addr, args, child: None }
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("node.log")).unwrap();
        let child = Command::new(bin())
            .args(["node", "--id", &self.id.to_string(), "--listen", &self.addr.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGTERM, then waits for the clean stop.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = c.wait().unwrap();
            assert!(status.success(), "node {} stopped with {status}", self.id);
        }
    }

    fn client(&self, cluster: uuid::Uuid) -> NodeClient {
        NodeClient::new(self.addr, None, cluster)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn leader_status(procs: &[Proc], cluster: uuid::Uuid) -> NodeStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for p in procs.iter().filter(|p| p.child.is_some()) {
            let c = p.client(cluster);
            if let Ok(AdminReply::Status(s)) =
                c.admin(Admin::Status, Duration::from_millis(500)).await
            {
                if s.state == "Leader" {
                    return *s;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Formats and starts `n` nodes, initialises a cluster of them.
async fn cluster_of(
    base: &Path,
    cluster: uuid::Uuid,
    n: u64,
    size: &str,
    args: &[&str],
) -> Vec<Proc> {
    let mut procs: Vec<Proc> =
        (1..=n).map(|id| Proc::new(base, id, &cluster, size, args)).collect();
    for p in &mut procs {
        p.start();
    }
    let members: Vec<(u64, String)> = procs.iter().map(|p| (p.id, p.addr.to_string())).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    // Init once the first node listens.
    loop {
        match procs[0]
            .client(cluster)
            .admin(Admin::Init(members.clone()), Duration::from_secs(10))
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "init: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    leader_status(&procs, cluster).await;
    procs
}

/// Block `lba` as written at `version`: its number and version, then bytes derived from both,
/// incompressible so the WAL holds the whole gigabyte.
fn fill_block(lba: u64, version: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&lba.to_le_bytes());
    out[8..16].copy_from_slice(&version.to_le_bytes());
    let mut x = (lba.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.rotate_left(32)) | 1;
    for chunk in out[16..].chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

fn blocks_data(lba: u64, blocks: usize, version: u64) -> Vec<u8> {
    let mut data = vec![0u8; blocks * BS];
    for (i, b) in data.chunks_exact_mut(BS).enumerate() {
        fill_block(lba + i as u64, version, b);
    }
    data
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A proposal too large for one WAL record is refused by the node it reaches, and the cluster
/// goes on: appended, it would fail every replica's log store, which openraft treats as fatal.
#[test]
fn oversized_proposal_is_refused_not_fatal() {
    runtime().block_on(async {
        let base = tempfile::tempdir().unwrap();
        let cluster = uuid::Uuid::new_v4();
        let mut procs = cluster_of(base.path(), cluster, 3, "16M", &[]).await;
        let leader = leader_status(&procs, cluster).await;
        let at = procs.iter().find(|p| p.id == leader.id).unwrap();
        let client = at.client(cluster);
        let t = Duration::from_secs(10);
        let huge = Request::Blocks(vec![BlockOp::Write { lba: 0, data: vec![7; 5 << 20] }]);
        let e = client.write(&huge, t).await.unwrap_err();
        assert!(e.contains("exceeds") && e.contains("entry limit"), "{e}");
        // The largest proposal the device makes (4 MiB of data in 1024 writes) goes through.
        let ops = (0..1024u64).map(|lba| BlockOp::Write { lba, data: blocks_data(lba, 1, 1) });
        let index = client.write(&Request::Blocks(ops.collect()), t).await.unwrap();
        let after = leader_status(&procs, cluster).await;
        assert_eq!((after.id, after.term), (leader.id, leader.term));
        assert!(after.last_applied >= Some(index));
        for p in &mut procs {
            p.stop();
        }
    });
}
