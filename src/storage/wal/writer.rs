//! The WAL's physical writer: encodes a batch of records after the current write position,
//! writes it with one aligned write followed by one data sync, and rotates to a new segment when
//! a batch does not fit. Owned by exactly one committer at a time (the group-commit thread, or an
//! inline flusher holding the writer lock), so batches reach the disk in the order they were taken.

use std::collections::HashSet;
use std::sync::Arc;

use uuid::Uuid;

use super::log::DiskLoc;
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
    pub payload: Arc<[u8]>,
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
        let stored: Vec<(std::borrow::Cow<'_, [u8]>, bool)> = ops
            .iter()
            .map(|op| match (op.kind, self.compress) {
                (RecordKind::Entry, true) => record::maybe_compress(&op.payload),
                _ => (std::borrow::Cow::Borrowed(&op.payload[..]), false),
            })
            .collect();
        let records_bytes: u64 =
            stored.iter().map(|(s, _)| record::padded_record_len(s.len()) as u64).sum();
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
        let mut buf = AlignedBuf::zeroed((end - start_block) as usize);
        buf[..head].copy_from_slice(&self.tail[..head]);
        let seed = record::salt_seed(self.active.header.salt);
        let now = now_us();
        let mut placed = Vec::new();
        let mut at = head;
        for (i, (op, (bytes, compressed))) in ops.iter().zip(&stored).enumerate() {
            let mut flags = 0;
            if i == 0 {
                flags |= FLAG_BATCH_START;
            }
            if i + 1 == ops.len() {
                flags |= FLAG_BATCH_END;
            }
            let input =
                RecordInput { index: op.index, term: op.term, kind: op.kind, payload: &op.payload };
            let n =
                record::encode_into(&mut buf[at..], &input, bytes, *compressed, flags, now, seed);
            let offset = start_block + at as u64;
            if op.kind == RecordKind::Entry {
                let len = (record::RECORD_HEADER_BYTES + bytes.len()) as u32;
                let loc = DiskLoc { seg_seq: self.active.header.seq, offset, len, term: op.term };
                placed.push(Placed { ticket: op.ticket, index: op.index, loc });
            }
            at += n;
        }
        let disk = &self.active.place.disk;
        disk.write_and_sync(start_block, &buf).map_err(|e| {
            StorageError::io(
                "write+sync WAL batch",
                format!("{} offset {start_block}", self.active.place.name),
                e,
            )
        })?;
        self.advance(ops, &buf, start_block, end);
        Ok((placed, rotated))
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
                    let node = marker_node(&op.payload);
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

/// The payload of a purge marker: the purged entry's leader node id.
pub fn marker_payload(node: u64) -> Arc<[u8]> {
    Arc::from(node.to_le_bytes().as_slice())
}

fn marker_node(payload: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&payload[..8]);
    u64::from_le_bytes(b)
}
