//! The WAL's physical writer: encodes a batch of records after the current write position,
//! writes it with one aligned write followed by one data sync, and rotates to a new segment when
//! a batch does not fit. Owned by exactly one committer at a time (the group-commit thread, or an
//! inline flusher holding the writer lock), so batches reach the disk in the order they were taken.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use uuid::Uuid;

use super::log::DiskLoc;
use super::payload::Payload;
use crate::storage::disk::{AlignedBuf, IO_ALIGN, SECTOR_BYTES};
use crate::storage::error::{Result, StorageError};
use crate::storage::le::now_us;
use crate::storage::record::{self, RecordInput, RecordKind, FLAG_BATCH_END, FLAG_BATCH_START};
use crate::storage::segment::{SegmentHeader, SegmentPlace, SegmentStore, SEGMENT_HEADER_BYTES};
use crate::storage::state::LogId;

/// One queued operation: an entry or a marker.
#[derive(Clone, Debug)]
pub struct PendingOp {
    pub ticket: u64,
    pub kind: RecordKind,
    pub index: u64,
    pub term: u64,
    pub payload: Payload,
}

impl PendingOp {
    /// Bytes this op may occupy on disk (uncompressed upper bound).
    pub fn disk_bytes(&self) -> usize {
        record::padded_record_len(self.payload.len())
    }
}

/// Where an entry of a written batch landed.
#[derive(Clone, Copy, Debug)]
pub struct Placed {
    pub ticket: u64,
    pub index: u64,
    pub loc: DiskLoc,
}

/// The segment being appended to.
#[derive(Debug)]
pub struct ActiveSegment {
    pub place: SegmentPlace,
    pub header: SegmentHeader,
}

/// A segment created by rotation, for the caller to add to its live list.
#[derive(Debug)]
pub struct Rotated {
    pub place: SegmentPlace,
    pub header: SegmentHeader,
}

/// Physical write state. Fields mirror what recovery would rebuild from disk.
#[derive(Debug)]
pub struct Writer {
    pub store: Arc<dyn SegmentStore>,
    pub device_uuid: Uuid,
    pub active: ActiveSegment,
    /// Where the next batch starts: a sector boundary.
    pub write_pos: u64,
    /// The IO_ALIGN block containing `write_pos`, as last written.
    pub tail: AlignedBuf,
    /// The index the next entry record must have, after every record written so far.
    pub next_index: u64,
    /// The purge point after every record written so far.
    pub purged: Option<LogId>,
    pub compress: bool,
    /// Where the current segment's records end when that is not `write_pos`: after recovery the
    /// tail segment is sealed at the end of its valid records and never appended to again.
    pub seal_at: Option<u64>,
    /// The batch being encoded, kept between batches (grown when a batch needs more) so a
    /// steady write stream does not allocate and free a batch-sized buffer every sync.
    pub batch_buf: Option<AlignedBuf>,
}

impl Writer {
    /// Creates segment `seq` at `place`: header written and synced, allocation made durable.
    pub fn init_segment(
        store: &dyn SegmentStore,
        place: SegmentPlace,
        header: SegmentHeader,
    ) -> Result<ActiveSegment> {
        place
            .disk
            .write_and_sync(0, &header.encode())
            .map_err(|e| StorageError::io("write segment header", &place.name, e))?;
        store.sync()?;
        Ok(ActiveSegment { place, header })
    }

    /// A header for a new segment following the current write state.
    pub fn next_header(&self, seq: u64, prev_sealed: u64) -> SegmentHeader {
        let segment_bytes = self.active.header.segment_bytes;
        SegmentHeader::new(
            self.device_uuid,
            seq,
            self.next_index,
            prev_sealed,
            segment_bytes,
            self.purged,
        )
    }

    /// Writes `ops` as one batch and syncs it. `live` gives the store ids of live segments in
    /// case a rotation must allocate. Returns the placements of entry records and, if it
    /// rotated, the new segment.
    pub fn write_batch(
        &mut self,
        ops: &[PendingOp],
        live: impl FnOnce() -> HashSet<u64>,
    ) -> Result<(Vec<Placed>, Option<Rotated>)> {
        let stored: Vec<Option<Vec<u8>>> = ops
            .iter()
            .map(|op| {
                if op.kind == RecordKind::Entry && self.compress {
                    pack(&op.payload)
                } else {
                    None
                }
            })
            .collect();
        let stored_len = |op: &PendingOp, packed: &Option<Vec<u8>>| {
            packed.as_ref().map_or(op.payload.len(), Vec::len)
        };
        let records_bytes: u64 = ops
            .iter()
            .zip(&stored)
            .map(|(op, packed)| record::padded_record_len(stored_len(op, packed)) as u64)
            .sum();
        let segment_bytes = self.active.header.segment_bytes;
        let mut rotated = None;
        if self.write_pos + records_bytes.next_multiple_of(SECTOR_BYTES as u64) > segment_bytes {
            rotated = Some(self.rotate(live())?);
        }
        let start_block = self.write_pos - self.write_pos % IO_ALIGN as u64;
        let head = (self.write_pos - start_block) as usize;
        let end = (self.write_pos + records_bytes).next_multiple_of(SECTOR_BYTES as u64);
        if end > segment_bytes {
            return Err(StorageError::Invalid(format!(
                "a batch of {records_bytes} bytes does not fit an empty {segment_bytes}-byte segment"
            )));
        }
        // Written in whole IO_ALIGN units, as the buffer was allocated before it was kept.
        let len = ((end - start_block) as usize).next_multiple_of(IO_ALIGN);
        let mut buf = match self.batch_buf.take() {
            Some(buf) if buf.len() >= len => buf,
            _ => AlignedBuf::zeroed(len),
        };
        buf[..head].copy_from_slice(&self.tail[..head]);
        let seed = record::salt_seed(self.active.header.salt);
        let now = now_us();
        let mut placed = Vec::new();
        let mut at = head;
        for (i, (op, packed)) in ops.iter().zip(&stored).enumerate() {
            let mut flags = 0;
            if i == 0 {
                flags |= FLAG_BATCH_START;
            }
            if i + 1 == ops.len() {
                flags |= FLAG_BATCH_END;
            }
            let raw_len = op.payload.len();
            let input = RecordInput { index: op.index, term: op.term, kind: op.kind, raw_len };
            let parts: Vec<&[u8]> = match packed {
                Some(p) => vec![p],
                None => op.payload.parts().iter().map(|b| &b[..]).collect(),
            };
            let compressed = packed.is_some();
            let n =
                record::encode_into(&mut buf[at..], &input, &parts, compressed, flags, now, seed);
            let offset = start_block + at as u64;
            if op.kind == RecordKind::Entry {
                let len = (record::RECORD_HEADER_BYTES + stored_len(op, packed)) as u32;
                let loc = DiskLoc { seg_seq: self.active.header.seq, offset, len, term: op.term };
                placed.push(Placed { ticket: op.ticket, index: op.index, loc });
            }
            at += n;
        }
        // Past the last record: zeros, as recovery expects (the buffer holds an older batch).
        buf[at..len].fill(0);
        let disk = &self.active.place.disk;
        let written = disk.write_and_sync(start_block, &buf[..len]);
        let result = match written {
            Ok(()) => {
                self.advance(ops, &buf[..len], start_block, end);
                Ok((placed, rotated))
            }
            Err(e) => Err(StorageError::io(
                "write+sync WAL batch",
                format!("{} offset {start_block}", self.active.place.name),
                e,
            )),
        };
        self.batch_buf = Some(buf);
        result
    }

    /// Updates the write position, the tail block and the physical log position after a write.
    fn advance(&mut self, ops: &[PendingOp], buf: &[u8], start_block: u64, end: u64) {
        let tail_block = end - end % IO_ALIGN as u64;
        if tail_block < end {
            let from = (tail_block - start_block) as usize;
            self.tail.copy_from_slice(&buf[from..from + IO_ALIGN]);
        } else {
            self.tail.fill(0);
        }
        self.write_pos = end;
        for op in ops {
            match op.kind {
                RecordKind::Entry => self.next_index = op.index + 1,
                RecordKind::Truncate => self.next_index = op.index,
                RecordKind::Purge => {
                    let node = marker_node(&op.payload.contiguous());
                    if self.purged.is_none_or(|p| p.index < op.index) {
                        self.purged = Some(LogId { term: op.term, node, index: op.index });
                    }
                    self.next_index = self.next_index.max(op.index + 1);
                }
            }
        }
    }

    fn rotate(&mut self, live: HashSet<u64>) -> Result<Rotated> {
        let seq = self.active.header.seq + 1;
        let place = self.store.allocate(seq, &live)?;
        let prev_sealed = self.seal_at.take().unwrap_or(self.write_pos);
        let header = self.next_header(seq, prev_sealed);
        let active = Self::init_segment(&*self.store, place, header)?;
        let rotated = Rotated { place: active.place.clone(), header: active.header };
        self.active = active;
        self.write_pos = SEGMENT_HEADER_BYTES;
        self.tail.fill(0);
        tracing::debug!(seq, first_index = header.first_index, "WAL rotated to a new segment");
        Ok(rotated)
    }
}

/// Payloads larger than this are first tried on a sample of this many bytes.
const COMPRESS_SAMPLE_BYTES: usize = 64 << 10;

/// An entry payload compressed, if lz4 saves at least an eighth of it. A payload larger than
/// `COMPRESS_SAMPLE_BYTES` is tried on its first `COMPRESS_SAMPLE_BYTES` first, and stored as is
/// if those do not compress: block data is often random, encrypted or already compressed, and
/// compressing a 4 MiB record of it whole costs milliseconds and two record-sized buffers (the
/// joined payload and lz4's output) for nothing. The payload stays in its shared parts then.
fn pack(payload: &Payload) -> Option<Vec<u8>> {
    if payload.len() > COMPRESS_SAMPLE_BYTES {
        let mut sample = Vec::with_capacity(COMPRESS_SAMPLE_BYTES);
        for part in payload.parts() {
            let take = part.len().min(COMPRESS_SAMPLE_BYTES - sample.len());
            sample.extend_from_slice(&part[..take]);
            if sample.len() == COMPRESS_SAMPLE_BYTES {
                break;
            }
        }
        if !record::maybe_compress(&sample).1 {
            return None;
        }
    }
    match record::maybe_compress(&payload.contiguous()) {
        (Cow::Owned(packed), true) => Some(packed),
        _ => None,
    }
}

/// The payload of a purge marker: the purged entry's leader node id.
pub fn marker_payload(node: u64) -> Payload {
    Payload::from(node.to_le_bytes().as_slice())
}

fn marker_node(payload: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&payload[..8]);
    u64::from_le_bytes(b)
}
