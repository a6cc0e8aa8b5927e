//! What a log entry asks of the device, and its byte encoding inside a WAL record's payload.
//! Pure: no I/O. The storage engine applies `Blocks` to the image; replication adds the rest.
//!
//! ```text
//!  0  1  version (1)
//!  1  1  kind: 0 blank, 1 membership, 2 blocks, 3 flush barrier, 4 attach, 5 fenced blocks
//!  2  6  zero
//!  8  8  leader node id (the node that created the entry)
//! 16  …  body
//!        membership: the replication layer's membership bytes
//!        blocks: u32 op count, u32 zero, then per op:
//!          u8 op (1 write, 2 zero-fill), 3 zero, u32 data bytes (write) or block count (zero),
//!          u64 first block (lba), then for a write the data bytes
//!        attach: u64 node id of the member that serves the device from here on (0: detached)
//!        fenced blocks: u64 attachment epoch of the server that sent them, then as blocks
//! ```
//!
//! An attachment's epoch is the log index of its attach entry, so each one is higher than any
//! before it without anyone having to know the last. Blocks (kind 2) carry no epoch: they come
//! from writers outside the attachment scheme (the embedded mode, a remote client) and always
//! apply; fenced blocks apply only under the attachment they name (`Engine::apply_entries`).

use bytes::Bytes;

use crate::storage::le::{put_u32, put_u64, u32_at, u64_at};
use crate::storage::wal::Payload;

const VERSION: u8 = 1;
const HEADER_BYTES: usize = 16;
const OP_HEADER_BYTES: usize = 16;

/// One change to the block image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BlockOp {
    /// Write whole blocks starting at block `lba`. The data is reference-counted: the device's
    /// cache, the Raft log cache, replication to in-process followers and the WAL queue share
    /// one buffer per write instead of each holding a copy.
    Write { lba: u64, data: Bytes },
    /// Make `blocks` blocks from `lba` read as zeros (discard and write-zeroes).
    Zero { lba: u64, blocks: u32 },
}

/// The body of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryBody {
    /// No effect (a new leader's first entry).
    Blank,
    /// A membership change; the bytes are the replication layer's encoding.
    Membership(Vec<u8>),
    /// Block writes applied in order.
    Blocks(Vec<BlockOp>),
    /// A flush barrier: no effect on the image. The device's FLUSH proposes none (it waits for
    /// the writes before it to commit); a client with nothing in flight proposes one to learn
    /// that everything the leader accepted before it is committed.
    Flush,
    /// From this entry on, the device is served by member `node` (0: by nobody), under the
    /// epoch that is this entry's index.
    Attach(u64),
    /// Block writes sent by the server attached at `epoch`; applied only while that attachment
    /// is the current one.
    Fenced(u64, Vec<BlockOp>),
}

/// A decoded entry payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryPayload {
    pub leader_node: u64,
    pub body: EntryBody,
}

impl EntryPayload {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let body = match &self.body {
            EntryBody::Blank => BodyRef::Blank,
            EntryBody::Membership(bytes) => BodyRef::Membership(bytes),
            EntryBody::Blocks(ops) => BodyRef::Blocks(ops),
            EntryBody::Flush => BodyRef::Flush,
            EntryBody::Attach(node) => BodyRef::Attach(*node),
            EntryBody::Fenced(epoch, ops) => BodyRef::Fenced(*epoch, ops),
        };
        encode_parts(self.leader_node, body)
    }

    /// Decodes a payload, refusing anything malformed with the reason.
    pub fn decode(buf: &[u8]) -> Result<EntryPayload, String> {
        if buf.len() < HEADER_BYTES {
            return Err(format!("entry payload of {} bytes is shorter than its header", buf.len()));
        }
        if buf[0] != VERSION {
            return Err(format!("unknown entry version {}", buf[0]));
        }
        let leader_node = u64_at(buf, 8);
        let rest = &buf[HEADER_BYTES..];
        let body = match buf[1] {
            0 if rest.is_empty() => EntryBody::Blank,
            1 => EntryBody::Membership(rest.to_vec()),
            2 => EntryBody::Blocks(decode_ops(rest)?),
            3 if rest.is_empty() => EntryBody::Flush,
            4 if rest.len() == 8 => EntryBody::Attach(u64_at(rest, 0)),
            5 if rest.len() >= 8 => EntryBody::Fenced(u64_at(rest, 0), decode_ops(&rest[8..])?),
            kind => return Err(format!("entry kind {kind} with {} body bytes", rest.len())),
        };
        Ok(EntryPayload { leader_node, body })
    }
}

/// A borrowed entry body, so callers holding the parts need not build an `EntryPayload`.
#[derive(Clone, Copy, Debug)]
pub enum BodyRef<'a> {
    Blank,
    Membership(&'a [u8]),
    Blocks(&'a [BlockOp]),
    Flush,
    Attach(u64),
    Fenced(u64, &'a [BlockOp]),
}

impl BodyRef<'_> {
    /// The block ops, with the epoch fenced ones carry.
    fn ops(&self) -> Option<(Option<u64>, &[BlockOp])> {
        match *self {
            BodyRef::Blocks(ops) => Some((None, ops)),
            BodyRef::Fenced(epoch, ops) => Some((Some(epoch), ops)),
            _ => None,
        }
    }
}

/// The length of `encode_parts(_, body)`, without encoding.
pub fn encoded_len(body: BodyRef<'_>) -> usize {
    HEADER_BYTES
        + match body {
            BodyRef::Blank | BodyRef::Flush => 0,
            BodyRef::Membership(bytes) => bytes.len(),
            BodyRef::Attach(_) => 8,
            BodyRef::Blocks(ops) => 8 + ops.iter().map(BlockOp::encoded_len).sum::<usize>(),
            BodyRef::Fenced(_, ops) => 16 + ops.iter().map(BlockOp::encoded_len).sum::<usize>(),
        }
}

/// Encodes an entry payload from its parts; `EntryPayload::encode` in borrowed form.
pub fn encode_parts(leader_node: u64, body: BodyRef<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(body));
    encode_head(leader_node, body, &mut out);
    match body {
        BodyRef::Blank | BodyRef::Flush | BodyRef::Attach(_) => {}
        BodyRef::Membership(bytes) => out.extend_from_slice(bytes),
        BodyRef::Blocks(ops) | BodyRef::Fenced(_, ops) => {
            for op in ops {
                out.extend_from_slice(&op_header(op));
                if let BlockOp::Write { data, .. } = op {
                    out.extend_from_slice(data);
                }
            }
        }
    }
    out
}

/// The bytes of `encode_parts`, as a WAL payload whose block data are the ops' own buffers
/// (shared, not copied); only the headers are new bytes.
pub fn encode_shared(leader_node: u64, body: BodyRef<'_>) -> Payload {
    let Some((_, ops)) = body.ops() else {
        return Payload::from(encode_parts(leader_node, body));
    };
    let mut parts = Vec::with_capacity(2 * ops.len() + 1);
    let mut head = Vec::with_capacity(HEADER_BYTES + 8 + OP_HEADER_BYTES);
    encode_head(leader_node, body, &mut head);
    for op in ops {
        head.extend_from_slice(&op_header(op));
        if let BlockOp::Write { data, .. } = op {
            parts.push(Bytes::from(std::mem::take(&mut head)));
            parts.push(data.clone());
        }
    }
    if !head.is_empty() {
        parts.push(Bytes::from(head));
    }
    Payload::from_parts(parts)
}

/// The entry header, an attach entry's node, and for blocks the epoch (fenced) and the op
/// count: everything before the first op.
fn encode_head(leader_node: u64, body: BodyRef<'_>, out: &mut Vec<u8>) {
    let mut head = [0u8; HEADER_BYTES];
    head[0] = VERSION;
    head[1] = match body {
        BodyRef::Blank => 0,
        BodyRef::Membership(_) => 1,
        BodyRef::Blocks(_) => 2,
        BodyRef::Flush => 3,
        BodyRef::Attach(_) => 4,
        BodyRef::Fenced(..) => 5,
    };
    put_u64(&mut head, 8, leader_node);
    out.extend_from_slice(&head);
    if let BodyRef::Attach(node) = body {
        out.extend_from_slice(&node.to_le_bytes());
    }
    if let Some((epoch, ops)) = body.ops() {
        if let Some(epoch) = epoch {
            out.extend_from_slice(&epoch.to_le_bytes());
        }
        let mut count = [0u8; 8];
        put_u32(&mut count, 0, ops.len() as u32);
        out.extend_from_slice(&count);
    }
}

impl BlockOp {
    fn encoded_len(&self) -> usize {
        OP_HEADER_BYTES + if let BlockOp::Write { data, .. } = self { data.len() } else { 0 }
    }
}

fn op_header(op: &BlockOp) -> [u8; OP_HEADER_BYTES] {
    let mut head = [0u8; OP_HEADER_BYTES];
    let (kind, n, lba) = match op {
        BlockOp::Write { lba, data } => (1, data.len() as u32, *lba),
        BlockOp::Zero { lba, blocks } => (2, *blocks, *lba),
    };
    head[0] = kind;
    put_u32(&mut head, 4, n);
    put_u64(&mut head, 8, lba);
    head
}

fn decode_ops(buf: &[u8]) -> Result<Vec<BlockOp>, String> {
    if buf.len() < 8 {
        return Err("block entry without its op count".into());
    }
    let count = u32_at(buf, 0) as usize;
    let mut at = 8;
    // Each op takes at least its header, which bounds `count` by the bytes present.
    if count > (buf.len() - at) / OP_HEADER_BYTES {
        return Err(format!("{count} ops cannot fit in {} bytes", buf.len()));
    }
    let mut ops = Vec::with_capacity(count);
    for i in 0..count {
        let head = buf.get(at..at + OP_HEADER_BYTES).ok_or(format!("op {i} header truncated"))?;
        let n = u32_at(head, 4) as usize;
        let lba = u64_at(head, 8);
        at += OP_HEADER_BYTES;
        match head[0] {
            1 => {
                let data =
                    buf.get(at..at + n).ok_or(format!("op {i}: {n} data bytes truncated"))?;
                ops.push(BlockOp::Write { lba, data: Bytes::copy_from_slice(data) });
                at += n;
            }
            2 => ops.push(BlockOp::Zero { lba, blocks: n as u32 }),
            other => return Err(format!("op {i}: unknown block op {other}")),
        }
    }
    if at != buf.len() {
        return Err(format!("{} trailing bytes after {count} ops", buf.len() - at));
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let bodies = [
            EntryBody::Blank,
            EntryBody::Flush,
            EntryBody::Membership(b"m".to_vec()),
            EntryBody::Blocks(vec![
                BlockOp::Write { lba: 3, data: vec![5; 8192].into() },
                BlockOp::Zero { lba: 9, blocks: 4 },
            ]),
            EntryBody::Attach(3),
            EntryBody::Attach(0),
            EntryBody::Fenced(
                41,
                vec![
                    BlockOp::Zero { lba: 2, blocks: 1 },
                    BlockOp::Write { lba: 7, data: vec![6; 4096].into() },
                ],
            ),
        ];
        for body in bodies {
            let p = EntryPayload { leader_node: 7, body };
            let bytes = p.encode();
            let body = match &p.body {
                EntryBody::Blank => BodyRef::Blank,
                EntryBody::Flush => BodyRef::Flush,
                EntryBody::Membership(m) => BodyRef::Membership(m),
                EntryBody::Blocks(ops) => BodyRef::Blocks(ops),
                EntryBody::Attach(node) => BodyRef::Attach(*node),
                EntryBody::Fenced(epoch, ops) => BodyRef::Fenced(*epoch, ops),
            };
            assert_eq!(encoded_len(body), bytes.len());
            assert_eq!(encode_shared(7, body).to_vec(), bytes, "{:?}", p.body);
            assert_eq!(EntryPayload::decode(&bytes).expect("decode"), p);
        }
    }

    #[test]
    fn truncations_and_garbage_are_refused() {
        let p = EntryPayload {
            leader_node: 1,
            body: EntryBody::Blocks(vec![BlockOp::Write { lba: 0, data: vec![1; 100].into() }]),
        };
        let bytes = p.encode();
        for cut in 0..bytes.len() {
            assert!(EntryPayload::decode(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        let mut huge = bytes.clone();
        put_u32(&mut huge, HEADER_BYTES, u32::MAX);
        assert!(EntryPayload::decode(&huge).is_err());
        let mut bad_op = bytes;
        bad_op[HEADER_BYTES + 8] = 9;
        assert!(EntryPayload::decode(&bad_op).is_err());

        let attach = EntryPayload { leader_node: 1, body: EntryBody::Attach(2) }.encode();
        for cut in HEADER_BYTES..attach.len() {
            assert!(EntryPayload::decode(&attach[..cut]).is_err(), "attach cut at {cut} accepted");
        }
        let mut long = attach.clone();
        long.push(0);
        assert!(EntryPayload::decode(&long).is_err(), "attach with a trailing byte accepted");
        let fenced = EntryPayload {
            leader_node: 1,
            body: EntryBody::Fenced(9, vec![BlockOp::Write { lba: 0, data: vec![1; 10].into() }]),
        }
        .encode();
        for cut in 0..fenced.len() {
            assert!(EntryPayload::decode(&fenced[..cut]).is_err(), "fenced cut at {cut} accepted");
        }
    }
}
