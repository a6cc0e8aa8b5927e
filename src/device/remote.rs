//! A `Cluster` of replicas in other processes, reached over TCP (`replication::tcp`).
//!
//! Requests go to the node that claims leadership with the highest term (asked of every node at
//! once when none is known). One proposal is in flight at a time, so proposals reach the leader
//! in order across reconnects; the device merges queued writes into each one.
//!
//! A leader that is paused or cut off never answers, and an isolated one does not know it was
//! replaced, so a request does not simply wait out its timeout: while it is outstanding, the
//! other nodes are asked every `PROBE` whether one of them now leads in a higher term, and if so
//! the request is abandoned for the new leader. (The device then proposes every unconfirmed
//! write again, in order; an abandoned proposal that does commit comes before them in the new
//! leader's log, and block writes are idempotent.)

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{BoxFuture, Cluster, Commit, ReadOutcome};
use crate::replication::tcp::{Admin, AdminReply, NodeClient};
use crate::replication::types::Request;

/// How long a request waits before checking whether another node took over, and between checks.
const PROBE: Duration = Duration::from_millis(50);

/// Replicas by address.
#[derive(Debug)]
pub struct RemoteCluster {
    addrs: Vec<SocketAddr>,
    nodes: Vec<NodeClient>,
    /// The node believed to lead, and its term.
    leader: Mutex<Option<(usize, u64)>>,
    timeout: Duration,
}

impl RemoteCluster {
    /// `timeout` bounds each request to a node.
    pub fn new(
        addrs: &[SocketAddr],
        bind: Option<IpAddr>,
        cluster_id: uuid::Uuid,
        timeout: Duration,
    ) -> Arc<RemoteCluster> {
        let nodes = addrs.iter().map(|a| NodeClient::new(*a, bind, cluster_id)).collect();
        Arc::new(RemoteCluster { addrs: addrs.to_vec(), nodes, leader: Mutex::new(None), timeout })
    }

    fn cached(&self) -> Option<(usize, u64)> {
        *self.leader.lock().expect("leader lock")
    }

    fn forget(&self, node: usize) {
        let mut l = self.leader.lock().expect("leader lock");
        if l.is_some_and(|(i, _)| i == node) {
            *l = None;
        }
    }

    /// Asks every node except `skip` for its status at once; the one claiming leadership in the
    /// highest term, if any.
    async fn claimed_leader(&self, skip: Option<usize>) -> Option<(usize, u64)> {
        let mut asks = tokio::task::JoinSet::new();
        let wait = PROBE.max(self.timeout / 4);
        for (i, node) in self.nodes.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
            let node = node.clone();
            asks.spawn(async move { (i, node.admin(Admin::Status, wait).await) });
        }
        let mut best: Option<(usize, u64)> = None;
        while let Some(joined) = asks.join_next().await {
            if let Ok((i, Ok(AdminReply::Status(s)))) = joined {
                if s.state == "Leader" && best.is_none_or(|(_, t)| s.term > t) {
                    best = Some((i, s.term));
                }
            }
        }
        best
    }

    /// The leader to send to: the cached one, or the one the nodes name now.
    async fn leader(&self) -> Result<(usize, u64), String> {
        if let Some(l) = self.cached() {
            return Ok(l);
        }
        let found = self.claimed_leader(None).await.ok_or("no node claims leadership")?;
        *self.leader.lock().expect("leader lock") = Some(found);
        Ok(found)
    }

    /// Runs `req` against the leader; gives up early if another node leads in a higher term.
    async fn on_leader<T, F, Fut>(&self, req: F) -> Result<T, String>
    where
        F: FnOnce(NodeClient, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let (i, term) = self.leader().await?;
        let call = req(self.nodes[i].clone(), self.timeout);
        let mut call = std::pin::pin!(call);
        let mut probe = tokio::time::interval_at(tokio::time::Instant::now() + PROBE, PROBE);
        loop {
            tokio::select! {
                r = &mut call => {
                    if r.is_err() {
                        self.forget(i);
                    }
                    return r;
                }
                _ = probe.tick() => {
                    if let Some((j, t)) = self.claimed_leader(Some(i)).await {
                        if t > term {
                            *self.leader.lock().expect("leader lock") = Some((j, t));
                            return Err(format!(
                                "the leader at {} was replaced by {} in term {t}",
                                self.addrs[i], self.addrs[j]
                            ));
                        }
                    }
                }
            }
        }
    }
}

impl Cluster for RemoteCluster {
    /// The leader is another process: it commits what it accepted whether or not this one
    /// lives.
    fn acceptance_outlives_process(&self) -> bool {
        true
    }

    fn submit(self: Arc<Self>, req: Request) -> BoxFuture<Result<Commit, String>> {
        Box::pin(async move {
            let index =
                self.on_leader(|node, timeout| async move { node.write(&req, timeout).await });
            let index = index.await?;
            let done: Commit = Box::pin(async move { Ok(index) });
            Ok(done)
        })
    }

    /// Remote reads are linearizable reads on the leader (the node checks its leadership with
    /// a quorum first), which covers `_applied_at_least`: other clients may write too.
    fn read(
        self: Arc<Self>,
        lba: u64,
        blocks: u64,
        _applied_at_least: u64,
    ) -> BoxFuture<Result<ReadOutcome, String>> {
        Box::pin(async move {
            let mut last = String::from("no replicas");
            for _ in 0..self.nodes.len() * 3 {
                let read =
                    self.on_leader(
                        |node, timeout| async move { node.read(lba, blocks, timeout).await },
                    );
                match read.await {
                    Ok(data) => return Ok(ReadOutcome::clean(data)),
                    Err(e) => {
                        last = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            Err(last)
        })
    }
}
