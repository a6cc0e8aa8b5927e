//! `xdevice node` processes for the multi-process tests: a formatted store, a listen address,
//! and start, stop (SIGTERM), kill and signal. A node's stderr goes to `node.log` in its
//! directory, started afresh on every start. Nodes speak mutual TLS with certificates from a
//! development CA in `base/tls` (made with the first node), unless given `--plaintext`; test
//! clients speak as member `CLIENT_ID`, and `xdevice cluster` as the admin (`cli_env`).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use xdevice::net::tls::{create_dev, Identity, TlsSource};
use xdevice::net::Security;
use xdevice::replication::tcp::NodeClient;

/// The member id test clients' certificate names: no node runs as it.
pub const CLIENT_ID: u64 = 999_999;

/// The development CA and certificates of `cluster`'s nodes formatted under `base`.
pub fn tls_dir(base: &Path, cluster: uuid::Uuid) -> PathBuf {
    base.join(format!("tls-{cluster}"))
}

/// Connections as `identity`, with the certificates in `tls_dir`.
pub fn security(base: &Path, cluster: uuid::Uuid, identity: Identity) -> Security {
    TlsSource::Dir(tls_dir(base, cluster)).security(cluster, identity).unwrap()
}

/// What an `xdevice cluster` command needs to reach `cluster`'s nodes under `base` as the
/// admin.
pub fn cli_env(base: &Path, cluster: uuid::Uuid) -> [(&'static str, PathBuf); 1] {
    [("XDEVICE_TLS_DIR", tls_dir(base, cluster))]
}

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
    /// The certificates' directory (`tls_dir`) and the cluster.
    pub tls: PathBuf,
    pub cluster: uuid::Uuid,
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
        let tls = tls_dir(base, *cluster);
        create_dev(&tls, *cluster, &[id, CLIENT_ID]).unwrap();
        NodeProc { id, dir, addr, args, child: None, tls, cluster: *cluster }
    }

    pub fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("node.log")).unwrap();
        let child = Command::new(xdevice_bin())
            .args(["node", "--id", &self.id.to_string(), "--listen", &self.addr.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .args(self.tls_args())
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

    /// `--tls-dir`, unless the node was given `--plaintext`.
    pub fn tls_args(&self) -> Vec<std::ffi::OsString> {
        if self.args.iter().any(|a| a == "--plaintext") {
            return Vec::new();
        }
        vec!["--tls-dir".into(), self.tls.clone().into()]
    }

    /// A client of this node, as member `CLIENT_ID` (or in clear text if the node is).
    pub fn client(&self, cluster: uuid::Uuid) -> NodeClient {
        NodeClient::new(self.addr, None, cluster, &self.security())
    }

    /// A client of this node as the admin (cluster commands), or in clear text if the node is.
    pub fn admin_client(&self, cluster: uuid::Uuid) -> NodeClient {
        let security = if self.args.iter().any(|a| a == "--plaintext") {
            Security::Plaintext
        } else {
            TlsSource::Dir(self.tls.clone()).security(self.cluster, Identity::Admin).unwrap()
        };
        NodeClient::new(self.addr, None, cluster, &security)
    }

    /// How a test client reaches this node.
    pub fn security(&self) -> Security {
        if self.args.iter().any(|a| a == "--plaintext") {
            return Security::Plaintext;
        }
        TlsSource::Dir(self.tls.clone())
            .security(self.cluster, Identity::Member(CLIENT_ID))
            .unwrap()
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
