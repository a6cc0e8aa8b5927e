//! The WAL's physical writer: encodes a batch of records after the current write position,
//! writes it with one aligned write followed by one data sync, and rotates to a prepared spare
//! segment when a batch does not fit (the spare's segment header goes out in the same write as
//! its first batch). Owned by exactly one committer at a time (the group-commit thread, or an
//! inline flusher holding the writer lock), so batches reach the disk in the order they were taken.

use std::borrow::Cow;

use uuid::Uuid;

use super::log::DiskLoc;
use super::payload::Payload;
use super::spare::Spare;
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
    pub device_uuid: Uuid,
    pub active: ActiveSegment,
    /// The active segment is a spare just rotated to: its place still holds the spare header,
    /// and the segment header goes out with the first batch, in the same write and sync.
    pub header_pending: bool,
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

    /// Writes `ops` as one batch and syncs it. `spare` hands over the prepared segment for a
    /// seq, in case the batch must rotate. Returns the placements of entry records and, if it
    /// rotated, the new segment.
    pub fn write_batch(
        &mut self,
        ops: &[PendingOp],
        spare: impl FnOnce(u64) -> Result<Spare>,
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
            rotated = Some(self.rotate(spare(self.active.header.seq + 1)?)?);
        }
        // The write starts at the block holding the write position, or at the segment's start
        // when its header goes out with this batch.
        let start_block = match self.header_pending {
            true => 0,
            false => self.write_pos - self.write_pos % IO_ALIGN as u64,
        };
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
        match self.header_pending {
            true => buf[..head].copy_from_slice(&self.active.header.encode()),
            false => buf[..head].copy_from_slice(&self.tail[..head]),
        }
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
                self.header_pending = false;
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

    /// Switches to `spare`, the durable prepared place of the next segment. Nothing is written
    /// here: the segment header (with a fresh salt, this seq's first index and the old segment's
    /// sealed end) goes out with the first batch. Until that batch is synced the place still
    /// reads as a spare, so recovery ends the chain at the old segment, which holds every
    /// acknowledged record.
    fn rotate(&mut self, spare: Spare) -> Result<Rotated> {
        let seq = self.active.header.seq + 1;
        if spare.seq != seq {
            return Err(StorageError::Invalid(format!(
                "spare segment for seq {} handed over for seq {seq}",
                spare.seq
            )));
        }
        let prev_sealed = self.seal_at.take().unwrap_or(self.write_pos);
        let header = self.next_header(seq, prev_sealed);
        let rotated = Rotated { place: spare.place.clone(), header };
        self.active = ActiveSegment { place: spare.place, header };
        self.header_pending = true;
        self.write_pos = SEGMENT_HEADER_BYTES;
        self.tail.fill(0);
        tracing::debug!(seq, first_index = header.first_index, "WAL rotated to a spare segment");
        Ok(rotated)
    }
}

/// Every entry payload is first tried on a sample of its first this many bytes (or on itself, if
/// smaller). One 4 KiB block is enough to tell block data that compresses from block data that
/// does not, and costs a fraction of an lz4 pass over an 8 KiB or 4 MiB payload.
const COMPRESS_SAMPLE_BYTES: usize = 4 << 10;

/// An entry payload compressed, if lz4 saves at least an eighth of it. The decision is taken on
/// the payload's first `COMPRESS_SAMPLE_BYTES` at every size: block data is often random,
/// encrypted or already compressed, and lz4 over it costs CPU on the commit path (for an 8 KiB
/// write, as much as its checksum) and, for a 4 MiB record, two record-sized buffers (the joined
/// payload and lz4's output) for nothing. A payload no larger than the sample is decided by its
/// own compression, so it never goes through lz4 twice. A payload stored as is stays in its
/// shared parts.
fn pack(payload: &Payload) -> Option<Vec<u8>> {
    if payload.len() > COMPRESS_SAMPLE_BYTES && !sample_compresses(payload) {
        return None;
    }
    match record::maybe_compress(&payload.contiguous()) {
        (Cow::Owned(packed), true) => Some(packed),
        _ => None,
    }
}

/// Whether the payload's first `COMPRESS_SAMPLE_BYTES` compress by the rule `maybe_compress`
/// applies. The sample is borrowed when the first part holds it (the common case for one
/// block-sized buffer) and copied from the parts otherwise.
fn sample_compresses(payload: &Payload) -> bool {
    match payload.parts().first() {
        Some(first) if first.len() >= COMPRESS_SAMPLE_BYTES => {
            record::maybe_compress(&first[..COMPRESS_SAMPLE_BYTES]).1
        }
        _ => {
            let mut sample = [0u8; COMPRESS_SAMPLE_BYTES];
            let mut filled = 0;
            for part in payload.parts() {
                let take = part.len().min(COMPRESS_SAMPLE_BYTES - filled);
                sample[filled..filled + take].copy_from_slice(&part[..take]);
                filled += take;
                if filled == COMPRESS_SAMPLE_BYTES {
                    break;
                }
            }
            record::maybe_compress(&sample[..filled]).1
        }
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// Bytes that lz4 cannot shorten (a xorshift stream).
    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn the_sample_decides_at_every_size() {
        for len in [512, COMPRESS_SAMPLE_BYTES, 8 << 10, 80 << 10] {
            let zeros = Payload::from(vec![0u8; len]);
            assert!(pack(&zeros).is_some_and(|p| p.len() < len / 8), "{len} zero bytes");
            let noise = Payload::from(random(len, len as u64));
            assert!(pack(&noise).is_none(), "{len} random bytes");
        }
        // Random in the sample, constant after: lz4 over the whole would save half of it, but
        // the sample says no, so no lz4 pass over the whole is made.
        let mixed = [random(COMPRESS_SAMPLE_BYTES, 3), vec![7u8; COMPRESS_SAMPLE_BYTES]].concat();
        assert!(record::maybe_compress(&mixed).1, "the whole would compress");
        assert!(pack(&Payload::from(mixed.clone())).is_none());
        // Constant in the sample, random after: tried, and stored as is since it saves too little.
        let tail_noise = [vec![0u8; 1024], random(7 << 10, 5)].concat();
        assert!(pack(&Payload::from(tail_noise)).is_none());
        // Constant in the sample and after: compressed.
        let mostly = [vec![0u8; 6 << 10], random(1024, 9)].concat();
        assert!(pack(&Payload::from(mostly)).is_some());
    }

    #[test]
    fn the_sample_spans_parts() {
        // A small header part, then data: the sample joins them.
        let header = Bytes::from(vec![1u8; 40]);
        let noise = Payload::from_parts(vec![header.clone(), Bytes::from(random(8 << 10, 11))]);
        assert!(pack(&noise).is_none());
        let zeros = Payload::from_parts(vec![header, Bytes::from(vec![0u8; 8 << 10])]);
        assert!(pack(&zeros).is_some());
        let parts: Vec<Bytes> = (0..16).map(|_| Bytes::from(vec![2u8; 512])).collect();
        assert!(pack(&Payload::from_parts(parts)).is_some());
    }
}
