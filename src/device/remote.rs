//! A `Cluster` of replicas in other processes, reached over TCP (`replication::tcp`).
//!
//! Requests go to the node that claims leadership with the highest term (asked of every node at
//! once when none is known). Proposals are pipelined: `submit` resolves once its `WRITE` is
//! queued on the leader's connection, whose writer sends frames in queue order, and the node
//! proposes them in the order they arrive; the answer comes at commit. So up to the device's
//! `max_inflight_proposals` are in flight at once, in order. A proposal queued but never read by
//! the leader dies with this process, so a write completes only at commit here too
//! (`acceptance_outlives_process` is false), as it did when one proposal was in flight and its
//! answer came at commit.
//!
//! Order holds across a reconnect to the same leader too: each WRITE carries this client's id
//! and a sequence taken in submit order, and the node refuses one not after the newest it
//! proposed for the client, so a copy it reads late from a dropped connection, behind the
//! client's resent WRITEs, is not proposed after them (its content was resent already).
//!
//! A leader that is paused or cut off never answers, and an isolated one does not know it was
//! replaced, so a request does not simply wait out its timeout: while it is outstanding, the
//! other nodes are asked every `PROBE` whether one of them now leads in a higher term, and if so
//! the request is abandoned for the new leader. (The device then proposes every unconfirmed
//! write again, in order; an abandoned proposal that does commit comes before them in the new
//! leader's log, and block writes are idempotent.)
//!
//! Reads go to the leader too. A block failing its checksum there comes back listed, not as
//! data; it is read from another node that has applied as far as the leader had (`READ_LOCAL`),
//! and the good copy is offered back to the leader (`REPAIR`) when it is exactly what the
//! leader's checksum table promises. No node with a good copy: the read fails, naming the block.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{BoxFuture, Cluster, ReadOutcome};
use crate::net::Security;
use crate::replication::commits::OnCommit;
use crate::replication::tcp::{
    Admin, AdminReply, BadBlockReport, BlocksReply, LocalRead, NodeClient, Repair,
};
use crate::replication::types::Request;
use crate::storage::image::{block_checksum, BadBlock};

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
    /// This client's id and the next proposal's sequence (`NodeClient::send_write`).
    client: uuid::Uuid,
    next_seq: AtomicU64,
}

impl RemoteCluster {
    /// `timeout` bounds each request to a node.
    pub fn new(
        addrs: &[SocketAddr],
        bind: Option<IpAddr>,
        cluster_id: uuid::Uuid,
        security: &Security,
        timeout: Duration,
    ) -> Arc<RemoteCluster> {
        let nodes = addrs.iter().map(|a| NodeClient::new(*a, bind, cluster_id, security)).collect();
        Arc::new(RemoteCluster {
            addrs: addrs.to_vec(),
            nodes,
            leader: Mutex::new(None),
            timeout,
            client: uuid::Uuid::new_v4(),
            next_seq: AtomicU64::new(1),
        })
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
    /// The node that answered, and its answer.
    async fn on_leader<T, F, Fut>(&self, req: F) -> Result<(usize, T), String>
    where
        F: FnOnce(NodeClient, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        let (i, term) = self.leader().await?;
        let call = req(self.nodes[i].clone(), self.timeout);
        self.until_replaced(i, term, call).await.map(|r| (i, r))
    }

    /// Awaits `call`, made to node `i` as the leader of `term`; gives up early if another node
    /// leads in a higher term, and forgets `i` as the leader when the call fails.
    async fn until_replaced<T, Fut>(&self, i: usize, term: u64, call: Fut) -> Result<T, String>
    where
        Fut: std::future::Future<Output = Result<T, String>>,
    {
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
    /// A proposal is accepted once queued on the leader's connection: if this process dies
    /// before the leader has read it, it is gone, and a FLUSH the kernel reissues to the next
    /// daemon must not succeed without it.
    fn acceptance_outlives_process(&self) -> bool {
        false
    }

    /// Resolves once the `WRITE` is queued for the leader, behind the proposals submitted
    /// before it; `on_commit` runs with the leader's answer (sent at commit), from a task that
    /// awaits it, or with an error as soon as another node leads in a higher term.
    fn submit(self: Arc<Self>, req: Request, on_commit: OnCommit) -> BoxFuture<Result<(), String>> {
        // Taken before anything waits: the device calls submit in its order.
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            let (i, term) = self.leader().await?;
            let origin = Some((self.client, seq));
            let answer = match self.nodes[i].send_write(origin, &req, self.timeout).await {
                Ok(answer) => Box::pin(async move { answer.await.map_err(String::from) }),
                Err(e) => {
                    self.forget(i);
                    return Err(e.into());
                }
            };
            tokio::spawn(async move { on_commit(self.until_replaced(i, term, answer).await) });
            Ok(())
        })
    }

    /// Remote reads are linearizable reads on the leader (the node checks its leadership with
    /// a quorum first), which covers `applied_at_least`: other clients may write too. A block
    /// failing its checksum there is taken from another node that has applied as far as the
    /// leader had when it read (and at least `applied_at_least`), and the leader's copy is
    /// repaired with it when it is what the leader's checksum table promises.
    fn read(
        self: Arc<Self>,
        lba: u64,
        blocks: u64,
        applied_at_least: u64,
    ) -> BoxFuture<Result<ReadOutcome, String>> {
        Box::pin(async move {
            let mut last = String::from("no replicas");
            for _ in 0..self.nodes.len() * 3 {
                let read = self.on_leader(|node, timeout| async move {
                    node.read(lba, blocks, timeout).await.map_err(String::from)
                });
                match read.await {
                    Ok((leader, reply)) => {
                        return self.mend(leader, lba, blocks, applied_at_least, reply).await
                    }
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

impl RemoteCluster {
    /// Completes the leader's answer to a read of `blocks` blocks at `lba`: each block it lists
    /// as failing its checksum is fetched from another node and, when it matches, repaired on
    /// the leader.
    async fn mend(
        &self,
        leader: usize,
        lba: u64,
        blocks: u64,
        applied_at_least: u64,
        reply: BlocksReply,
    ) -> Result<ReadOutcome, String> {
        let at = self.addrs[leader];
        let bs = check_reply(&reply, lba, blocks).map_err(|e| format!("node {at}: {e}"))?;
        let BlocksReply { applied, mut data, bad } = reply;
        // A copy from a node that has applied this far holds every write the leader's read had
        // to reflect (or a later one).
        let floor = applied.max(applied_at_least);
        let mut outcome = ReadOutcome::clean(Vec::new());
        for b in bad {
            outcome.corrupt_blocks += 1;
            tracing::error!(
                node = %at,
                lba = b.lba,
                expected = format_args!("{:#010x}", b.expected),
                found = format_args!("{:#010x}", b.found),
                "data block fails its checksum on the leader; reading it from another replica"
            );
            let (from, good) = self.good_copy(leader, b.lba, bs, floor).await.map_err(|why| {
                let bad = BadBlock {
                    lba: b.lba,
                    expected: b.expected,
                    found: b.found,
                    location: format!("node {at}"),
                };
                format!("{}; no other replica holds a good copy ({why})", bad.into_error())
            })?;
            let offset = ((b.lba - lba) as usize) * bs;
            data[offset..offset + bs].copy_from_slice(&good);
            if block_checksum(b.lba, &good) != b.expected {
                // A later write to the block, applied on `from` (and perhaps on the leader by
                // now): its data is a valid answer, but not what the leader's table promised.
                tracing::info!(
                    node = %at,
                    from = %self.addrs[from],
                    lba = b.lba,
                    "the good copy is of a later write: the leader's copy is left alone"
                );
                continue;
            }
            let repair = Repair { lba: b.lba, data: good };
            match self.nodes[leader].repair(repair, self.timeout).await {
                Ok(true) => {
                    outcome.repaired_blocks += 1;
                    tracing::warn!(
                        node = %at,
                        from = %self.addrs[from],
                        lba = b.lba,
                        "data block repaired from another replica"
                    );
                }
                // The block changed since (a later write replaced the damaged bytes).
                Ok(false) => {}
                Err(e) => tracing::error!(
                    node = %at,
                    lba = b.lba,
                    error = %e,
                    "repairing a data block failed"
                ),
            }
        }
        outcome.data = data;
        Ok(outcome)
    }

    /// Block `lba` from the first node other than `leader` that has applied `floor` and whose
    /// copy passes its checksum there: that node and the block. Otherwise why not, per node.
    async fn good_copy(
        &self,
        leader: usize,
        lba: u64,
        bs: usize,
        floor: u64,
    ) -> Result<(usize, Vec<u8>), String> {
        let others = self.nodes.iter().enumerate().filter(|(i, _)| *i != leader);
        let others = others.map(|(i, n)| (i, self.addrs[i].to_string(), n));
        good_copy_from(others, lba, bs, floor, self.timeout).await
    }
}

/// Block `lba` from the first of `nodes` (key, name, client) that has applied `floor` and whose
/// copy passes its checksum there: that node's key and the block. Otherwise why not, per node.
pub(crate) async fn good_copy_from<'a, K>(
    nodes: impl Iterator<Item = (K, String, &'a NodeClient)>,
    lba: u64,
    bs: usize,
    floor: u64,
    timeout: Duration,
) -> Result<(K, Vec<u8>), String> {
    let req = LocalRead { lba, blocks: 1, applied_at_least: floor };
    let mut why = Vec::new();
    for (key, name, node) in nodes {
        let got = node.read_local(req, timeout).await.map_err(String::from).and_then(|r| {
            check_reply(&r, lba, 1)?;
            if r.data.len() != bs {
                return Err(format!("answered {} bytes for one {bs}-byte block", r.data.len()));
            }
            if r.applied < floor {
                return Err(format!("answered at log index {} below {floor}", r.applied));
            }
            match r.bad.first() {
                None => Ok(r.data),
                Some(b) => Err(format!(
                    "fails its checksum there too (expected {:#010x}, found {:#010x})",
                    b.expected, b.found
                )),
            }
        });
        match got {
            Ok(block) => return Ok((key, block)),
            Err(e) => {
                tracing::error!(node = %name, lba, error = %e, "no good copy here");
                why.push(format!("{name}: {e}"));
            }
        }
    }
    if why.is_empty() {
        why.push("no other replica".to_string());
    }
    Err(why.join("; "))
}

/// Checks a node's answer to a read of `blocks` blocks at `lba` before anything uses it: whole
/// blocks of one size, the bad ones inside the range and listed once each, in order. The block
/// size.
fn check_reply(reply: &BlocksReply, lba: u64, blocks: u64) -> Result<usize, String> {
    let len = reply.data.len() as u64;
    let bs = match blocks {
        0 if len == 0 => 0,
        _ if blocks == 0 || len == 0 || len % blocks != 0 => {
            return Err(format!("answered {len} bytes for {blocks} blocks"));
        }
        _ => len / blocks,
    };
    let end = lba.saturating_add(blocks);
    let mut next = lba;
    for &BadBlockReport { lba: b, .. } in &reply.bad {
        if b < next || b >= end {
            return Err(format!("listed block {b} as bad in a read of [{lba}, +{blocks})"));
        }
        next = b + 1;
    }
    usize::try_from(bs).map_err(|_| format!("answered {bs}-byte blocks"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(len: usize, bad: &[u64]) -> BlocksReply {
        let bad = bad.iter().map(|&lba| BadBlockReport { lba, expected: 1, found: 2 }).collect();
        BlocksReply { applied: 0, data: vec![0; len], bad }
    }

    #[test]
    fn a_reply_is_checked_before_use() {
        assert_eq!(check_reply(&reply(8192, &[]), 10, 2), Ok(4096));
        assert_eq!(check_reply(&reply(8192, &[10, 11]), 10, 2), Ok(4096));
        assert_eq!(check_reply(&reply(0, &[]), 10, 0), Ok(0));
        assert!(check_reply(&reply(4096, &[]), 10, 0).is_err());
        for (len, bad) in [
            (8191, &[][..]),
            (0, &[][..]),
            (8192, &[9][..]),
            (8192, &[12][..]),
            (8192, &[11, 10][..]),
            (8192, &[10, 10][..]),
        ] {
            assert!(check_reply(&reply(len, bad), 10, 2).is_err(), "{len} {bad:?}");
        }
        // Near the end of the block numbers: no overflow.
        assert!(check_reply(&reply(4096, &[u64::MAX]), u64::MAX, 1).is_err());
        assert_eq!(check_reply(&reply(4096, &[u64::MAX - 1]), u64::MAX - 1, 1), Ok(4096));
    }
}
