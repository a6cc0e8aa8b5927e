//! `xdevice node` processes for the multi-process tests: a formatted store, a listen address,
//! and start, stop (SIGTERM), kill and signal. A node's stderr goes to `node.log` in its
//! directory, started afresh on every start.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use xdevice::replication::tcp::NodeClient;

pub fn xdevice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_xdevice")
}

/// An address on `ip` with a port that is free now.
pub fn free_addr(ip: &str) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// One node process (not running until `start`).
pub struct NodeProc {
    pub id: u64,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    /// Extra `xdevice node` flags.
    pub args: Vec<String>,
    pub child: Option<Child>,
}

impl NodeProc {
    /// Formats node `id`'s store in `base/n{id}` (a `size` device, 8 MiB segments) for
    /// `cluster`; once started it listens on `addr` with the extra flags `args`.
    pub fn format(
        base: &Path,
        id: u64,
        cluster: &uuid::Uuid,
        size: &str,
        addr: SocketAddr,
        args: &[&str],
    ) -> NodeProc {
        let dir = base.join(format!("n{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(xdevice_bin())
            .args(["format", "--size", size, "--segment-size", "8M", "--cluster-id"])
            .arg(cluster.to_string())
            .arg("--dir")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "format: {}", String::from_utf8_lossy(&out.stderr));
        let args = args.iter().map(|s| s.to_string()).collect();
        NodeProc { id, dir, addr, args, child: None }
    }

    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("node.log")).unwrap();
        let child = Command::new(xdevice_bin())
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
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = c.wait().unwrap();
            assert!(status.success(), "node {} stopped with {status}", self.id);
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).unwrap();
        }
    }

    pub fn client(&self, cluster: uuid::Uuid) -> NodeClient {
        NodeClient::new(self.addr, None, cluster)
    }

    /// What the node logged since it last started.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        // A stopped (SIGSTOP) node is resumed so the kill is not left pending.
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.kill();
    }
}
