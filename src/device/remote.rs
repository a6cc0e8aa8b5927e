//! A `Cluster` of replicas in other processes, reached over TCP (`replication::tcp`). Requests
//! go to the last known leader and move on when a node says it is not the leader or is down.
//! One proposal is in flight at a time, so proposals reach the leader in order across
//! reconnects; the device merges queued writes into each one.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{BoxFuture, Cluster, Commit};
use crate::replication::tcp::NodeClient;
use crate::replication::types::Request;

/// Replicas by address.
#[derive(Debug)]
pub struct RemoteCluster {
    nodes: Vec<NodeClient>,
    current: Mutex<usize>,
    timeout: Duration,
}

impl RemoteCluster {
    pub fn new(
        addrs: &[SocketAddr],
        bind: Option<IpAddr>,
        cluster_id: uuid::Uuid,
        timeout: Duration,
    ) -> Arc<RemoteCluster> {
        let nodes = addrs.iter().map(|a| NodeClient::new(*a, bind, cluster_id)).collect();
        Arc::new(RemoteCluster { nodes, current: Mutex::new(0), timeout })
    }

    fn at(&self) -> (usize, NodeClient) {
        let i = *self.current.lock().expect("current lock") % self.nodes.len().max(1);
        (i, self.nodes[i].clone())
    }

    fn next(&self, from: usize) {
        let mut c = self.current.lock().expect("current lock");
        if *c == from {
            *c = (from + 1) % self.nodes.len().max(1);
        }
    }
}

impl Cluster for RemoteCluster {
    fn submit(self: Arc<Self>, req: Request) -> BoxFuture<Result<Commit, String>> {
        Box::pin(async move {
            let (i, node) = self.at();
            match node.write(&req, self.timeout).await {
                Ok(index) => {
                    let done: Commit = Box::pin(async move { Ok(index) });
                    Ok(done)
                }
                Err(e) => {
                    self.next(i);
                    Err(e)
                }
            }
        })
    }

    fn read(self: Arc<Self>, lba: u64, blocks: u64) -> BoxFuture<Result<Vec<u8>, String>> {
        Box::pin(async move {
            let mut last = String::from("no replicas");
            for _ in 0..self.nodes.len() * 3 {
                let (i, node) = self.at();
                match node.read(lba, blocks, self.timeout).await {
                    Ok(data) => return Ok(data),
                    Err(e) => {
                        last = e;
                        self.next(i);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            Err(last)
        })
    }
}
