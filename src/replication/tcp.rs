//! The calling side of the node protocol (`wire`) over the RPC layer (`net`): `TcpTransport`
//! carries Raft between replicas, `NodeClient` a client's writes, reads, repairs and admin
//! requests. The serving side is `service`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use openraft::BasicNode;
use serde::Serialize;

use super::network::{BoxFuture, RaftReply, RaftRpc, Transport, TransportError};
use super::types::{NodeId, Request};
use crate::net::{ClientOptions, RpcClient, RpcError, Security};

pub use super::service::{status_of, DeviceHost, NodeService};
pub use super::wire::*;

/// Connections between replicas and to them: frames up to `MAX_PAYLOAD`, and reconnects backed
/// off to at most 200 ms, as openraft's replication is (`PeerNetwork::backoff`): a restarted peer
/// is reached within an election timeout. At 500 ms a restarted voter heard nothing for 525 ms.
/// `peer`: under TLS, the node the peer's certificate must name, when known.
pub(crate) fn client_options(security: &Security, peer: Option<NodeId>) -> ClientOptions {
    ClientOptions {
        max_payload: MAX_PAYLOAD,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        security: security.clone(),
        peer_node: peer,
        ..ClientOptions::default()
    }
}

/// Raft RPCs to peers over TCP, one pipelined connection per peer.
#[derive(Debug)]
pub struct TcpTransport {
    cluster_id: uuid::Uuid,
    me: NodeId,
    bind: Option<IpAddr>,
    security: Security,
    clients: Mutex<HashMap<(NodeId, String), RpcClient>>,
}

impl TcpTransport {
    /// `bind`: the source address for outgoing connections (this node's own address).
    pub fn new(
        cluster_id: uuid::Uuid,
        me: NodeId,
        bind: Option<IpAddr>,
        security: Security,
    ) -> TcpTransport {
        TcpTransport { cluster_id, me, bind, security, clients: Mutex::new(HashMap::new()) }
    }

    fn client(&self, target: NodeId, addr: &str) -> Result<RpcClient, TransportError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&(target, addr.to_string())) {
            return Ok(c.clone());
        }
        let peer: SocketAddr = addr.parse().map_err(|e| {
            TransportError::Unreachable(target, format!("bad address {addr:?}: {e}"))
        })?;
        // Under TLS the peer must prove it is `target`, not merely a member.
        let options = client_options(&self.security, Some(target));
        let c = RpcClient::new(peer, self.bind, self.cluster_id, self.me, options);
        clients.insert((target, addr.to_string()), c.clone());
        Ok(c)
    }
}

impl Transport for TcpTransport {
    fn call(
        &self,
        target: NodeId,
        node: &BasicNode,
        rpc: RaftRpc,
        timeout: Duration,
    ) -> BoxFuture<Result<RaftReply, TransportError>> {
        let client = self.client(target, &node.addr);
        Box::pin(async move {
            let client = client?;
            let (kind, payload) = NodeRequest::Raft(rpc)
                .encode()
                .map_err(|e| TransportError::Failed(target, e.message))?;
            if payload.len() > MAX_PAYLOAD {
                return Err(TransportError::TooLarge(target, payload.len(), MAX_PAYLOAD));
            }
            match client.call(kind, payload, timeout).await {
                Ok(bytes) => exact(&bytes, "Raft reply")
                    .map_err(|e| TransportError::Failed(target, e.message)),
                Err(RpcError::Unreachable(e)) | Err(RpcError::Rejected(e)) => {
                    Err(TransportError::Unreachable(target, e))
                }
                Err(e) => Err(TransportError::Failed(target, e.to_string())),
            }
        })
    }
}

/// A client of a node's `WRITE`, `READ`, `READ_LOCAL`, `REPAIR` and `ADMIN` requests.
#[derive(Clone, Debug)]
pub struct NodeClient {
    rpc: RpcClient,
}

impl NodeClient {
    /// A client of the node at `addr`, any member of `cluster_id`. Under TLS it speaks as the
    /// identity of `security`'s certificate (a member's, or the admin's for the CLI).
    pub fn new(
        addr: SocketAddr,
        bind: Option<IpAddr>,
        cluster_id: uuid::Uuid,
        security: &Security,
    ) -> NodeClient {
        let options = client_options(security, None);
        NodeClient { rpc: RpcClient::new(addr, bind, cluster_id, 0, options) }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: NodeRequest,
        timeout: Duration,
        what: &str,
    ) -> Result<T, NodeError> {
        let (kind, payload) = request.encode()?;
        let bytes = self.rpc.call(kind, payload, timeout).await?;
        exact(&bytes, what)
    }

    pub async fn admin(&self, req: Admin, timeout: Duration) -> Result<AdminReply, NodeError> {
        self.call(NodeRequest::Admin(req), timeout, "admin reply").await
    }

    /// Proposes `req` and waits for its commit; the entry's log index.
    pub async fn write(&self, req: &Request, timeout: Duration) -> Result<u64, NodeError> {
        self.send_write(None, req, timeout).await?.await
    }

    /// Queues a `WRITE` on the connection, behind those queued before it (the node proposes
    /// them in the order they arrive), and returns its answer to await: the entry's log index
    /// once committed. Several can be in flight. `origin`: this client's id and the proposal's
    /// sequence, increasing in the client's order; the node refuses one that is not after the
    /// newest it proposed for the client (a late copy from a dropped connection).
    pub async fn send_write(
        &self,
        origin: Option<(uuid::Uuid, u64)>,
        req: &Request,
        timeout: Duration,
    ) -> Result<BoxFuture<Result<u64, NodeError>>, NodeError> {
        // Encoded by hand around the borrowed request (`WriteRequest` owns its request); the
        // same bytes as `NodeRequest::Write`.
        #[derive(Serialize)]
        struct Borrowed<'a> {
            origin: Option<(uuid::Uuid, u64)>,
            req: &'a Request,
        }
        let payload = super::wire::encode(&Borrowed { origin, req })?;
        let sent = self.rpc.send(KIND_WRITE, payload, timeout).await?;
        Ok(Box::pin(async move {
            let bytes = sent.answer().await?;
            exact(&bytes, "write reply")
        }))
    }

    /// A linearizable read on the leader.
    pub async fn read(
        &self,
        lba: u64,
        blocks: u64,
        timeout: Duration,
    ) -> Result<BlocksReply, NodeError> {
        self.call(NodeRequest::Read { lba, blocks }, timeout, "read reply").await
    }

    /// Blocks from this node's own image once it has applied `applied_at_least`.
    pub async fn read_local(
        &self,
        req: LocalRead,
        timeout: Duration,
    ) -> Result<BlocksReply, NodeError> {
        self.call(NodeRequest::ReadLocal(req), timeout, "local read reply").await
    }

    /// Offers a good copy of block `lba`; true if the node rewrote its copy with it.
    pub async fn repair(&self, req: Repair, timeout: Duration) -> Result<bool, NodeError> {
        self.call(NodeRequest::Repair(req), timeout, "repair reply").await
    }
}
