//! WAL recovery: find the live segment chain, scan its records in order, and decide where the
//! log ends. A damaged record inside the durable part is refused with an error naming the place;
//! a torn tail (the one batch that may have been in flight) is cut off.
//!
//! How durable is told from torn: the writer syncs each batch before it writes the next, and a
//! segment's sealed length is recorded in its successor's header. So damage in a sealed segment,
//! or damage in the last segment followed by the start of a later intact batch, is damage to
//! acknowledged data. Anything else is the in-flight batch.
//!
//! A prepared spare has a header of its own (`SpareHeader`) and is never part of the chain.
//! Rotation writes a segment header over a spare's in the same write as the segment's first
//! batch; a power loss leaves that header's sector whole, so a place still holding a spare header
//! never held an acknowledged record, whatever bytes follow its header.

use std::sync::Arc;

use uuid::Uuid;

use super::log::{DiskLoc, LogBuilder};
use crate::storage::disk::{AlignedBuf, Disk, IO_ALIGN, SECTOR_BYTES};
use crate::storage::error::{Result, StorageError};
use crate::storage::le::u64_at;
use crate::storage::record::{self, Decoded, RecordKind, FLAG_BATCH_START, RECORD_HEADER_BYTES};
use crate::storage::segment::{
    HeaderBlock, SegmentHeader, SegmentPlace, SegmentStore, SpareHeader, SEGMENT_HEADER_BYTES,
};
use crate::storage::state::LogId;

/// A segment in the live chain.
#[derive(Clone, Debug)]
pub struct LiveSegment {
    pub place: SegmentPlace,
    pub header: SegmentHeader,
    /// Highest entry index written in it, if any.
    pub max_index: Option<u64>,
}

/// Where and why the scan of the last segment stopped.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TailStop {
    pub segment: String,
    pub offset: u64,
    pub reason: String,
}

/// What recovery found.
#[derive(Debug)]
pub struct Recovered {
    pub segments: Vec<LiveSegment>,
    pub log: LogBuilder,
    pub tail: TailStop,
    pub tail_has_records: bool,
    pub records: u64,
    /// Segments removed or ignored (interrupted creation or purge), for the report.
    pub discarded: Vec<String>,
    /// Prepared spares: durable places never part of the chain (see `spare`).
    pub spares: Vec<(SegmentPlace, SpareHeader)>,
}

const WINDOW_BYTES: usize = 4 << 20;

/// A sliding read window over one segment.
struct Window<'a> {
    disk: &'a Arc<dyn Disk>,
    len: u64,
    buf: AlignedBuf,
    start: u64,
    filled: usize,
}

impl<'a> Window<'a> {
    fn new(disk: &'a Arc<dyn Disk>) -> Self {
        Window {
            disk,
            len: disk.len_bytes(),
            buf: AlignedBuf::zeroed(WINDOW_BYTES),
            start: 0,
            filled: 0,
        }
    }

    /// Up to `need` bytes at `pos` (fewer only at the segment's end).
    fn get(&mut self, pos: u64, need: usize) -> Result<&[u8]> {
        let want_end = (pos + need as u64).min(self.len);
        if pos < self.start || want_end > self.start + self.filled as u64 {
            let start = pos - pos % IO_ALIGN as u64;
            let span = ((want_end - start) as usize).max(WINDOW_BYTES).next_multiple_of(IO_ALIGN);
            let span = span.min((self.len - start) as usize);
            if self.buf.len() < span {
                self.buf = AlignedBuf::zeroed(span);
            }
            self.disk.read_at(start, &mut self.buf[..span]).map_err(|e| {
                StorageError::io(
                    "read segment",
                    format!("{} offset {start}", self.disk.describe()),
                    e,
                )
            })?;
            self.start = start;
            self.filled = span;
        }
        let from = (pos - self.start) as usize;
        let to = (want_end - self.start) as usize;
        Ok(&self.buf[from..to])
    }

    /// Decodes the record at `pos`, reading more as the header asks. For a purge marker it also
    /// returns the node id its payload carries.
    fn decode(&mut self, pos: u64, seed: u32, max_stored: usize) -> Result<(Decoded, Option<u64>)> {
        let mut need = RECORD_HEADER_BYTES;
        loop {
            let bytes = self.get(pos, need)?;
            match record::decode(bytes, seed, max_stored) {
                Decoded::Short { needed } if needed > need && bytes.len() >= need => need = needed,
                Decoded::Short { .. } => {
                    return Ok((
                        Decoded::Invalid("record runs past the end of the segment".into()),
                        None,
                    ))
                }
                Decoded::Record(h) if h.kind == RecordKind::Purge => {
                    let node = (h.stored_len == 8).then(|| u64_at(bytes, RECORD_HEADER_BYTES));
                    return Ok((Decoded::Record(h), node));
                }
                other => return Ok((other, None)),
            }
        }
    }
}

/// Reads every header, builds the chain and scans it. With `repair` false nothing is written
/// (inspection): interrupted creations and stale segments are only reported.
pub fn recover(
    store: &dyn SegmentStore,
    device_uuid: Uuid,
    max_stored: usize,
    repair: bool,
) -> Result<Recovered> {
    let mut discarded = Vec::new();
    let mut spares = Vec::new();
    let chain = live_chain(store, device_uuid, &mut discarded, &mut spares, repair)?;
    let first = &chain[0].header;
    let mut log = LogBuilder::new(first.first_index, first.purged);
    let mut segments = Vec::with_capacity(chain.len());
    let mut records = 0;
    let mut tail = None;
    let mut tail_has_records = false;
    for (i, seg) in chain.iter().enumerate() {
        if seg.header.first_index != log.next {
            return Err(StorageError::corrupt(
                "WAL segment",
                &seg.place.name,
                format!(
                    "starts at index {} but the log before it ends at {}",
                    seg.header.first_index, log.next
                ),
            ));
        }
        let sealed = chain.get(i + 1).map(|next| next.header.prev_sealed);
        let scan = scan_segment(seg, sealed, &mut log, max_stored)?;
        records += scan.records;
        segments.push(LiveSegment { max_index: scan.max_index, ..seg.clone() });
        if sealed.is_none() {
            tail_has_records = scan.records > 0;
            tail = Some(scan.stop);
        }
    }
    if first.first_index > log.purged_next() {
        return Err(StorageError::corrupt(
            "WAL",
            &chain[0].place.name,
            format!(
                "entries {}..{} are missing: an earlier segment is gone",
                log.purged_next(),
                first.first_index
            ),
        ));
    }
    let tail = tail.unwrap_or_else(|| TailStop {
        segment: String::new(),
        offset: 0,
        reason: String::new(),
    });
    Ok(Recovered { segments, log, tail, tail_has_records, records, discarded, spares })
}

/// Finds the valid headers and the chain of consecutive seqs ending at the newest. Spare headers
/// go to `spares`: a spare is never in the chain, whatever its place holds after its header.
fn live_chain(
    store: &dyn SegmentStore,
    device_uuid: Uuid,
    discarded: &mut Vec<String>,
    spares: &mut Vec<(SegmentPlace, SpareHeader)>,
    repair: bool,
) -> Result<Vec<LiveSegment>> {
    let mut valid = Vec::new();
    let mut invalid = Vec::new();
    for place in store.list()? {
        let mut buf = AlignedBuf::zeroed(SEGMENT_HEADER_BYTES as usize);
        place
            .disk
            .read_at(0, &mut buf)
            .map_err(|e| StorageError::io("read segment header", &place.name, e))?;
        match HeaderBlock::decode(&buf) {
            Ok(HeaderBlock::Segment(h)) => {
                check_place(&place, device_uuid, h.device_uuid, h.seq, h.segment_bytes)?;
                valid.push(LiveSegment { place, header: h, max_index: None });
            }
            Ok(HeaderBlock::Spare(h)) => {
                check_place(&place, device_uuid, h.device_uuid, h.seq, h.segment_bytes)?;
                spares.push((place, h));
            }
            Ok(HeaderBlock::Blank) => invalid.push((place, "blank header".to_string(), true)),
            Err(reason) => invalid.push((place, reason, false)),
        }
    }
    valid.sort_by_key(|s| s.header.seq);
    let newest = valid.last().map(|s| s.header.seq);
    for (place, reason, blank) in invalid {
        // Records are written only over a durable header (a segment's, or a spare's that the
        // first batch replaces in the same write), and the header's fields lie in its first
        // sector, which a power loss leaves whole. So only a segment whose records
        // area is untouched can be an interrupted creation; any other bad header is damage.
        let interrupted = match place.named_seq {
            Some(seq) => newest.is_none_or(|n| seq > n) && records_area_blank(&place)?,
            // A raw slot with a blank header is free; released slots keep old records.
            None if blank => continue,
            None => false,
        };
        if !interrupted {
            return Err(StorageError::corrupt(
                "WAL segment header",
                format!("{} offset 0", place.name),
                format!(
                    "{reason}; the segment may hold acknowledged records, so it is not discarded"
                ),
            ));
        }
        if repair {
            store.release(&place)?;
            store.sync()?;
        }
        discarded.push(format!("{} ({reason}; creation interrupted, removed)", place.name));
    }
    let Some(newest) = newest else {
        return Err(StorageError::Foreign(
            "no WAL segment found (store not formatted, or its log is gone)".into(),
        ));
    };
    let mut start = valid.len() - 1;
    while start > 0 && valid[start - 1].header.seq + 1 == valid[start].header.seq {
        start -= 1;
    }
    for stale in valid.drain(..start) {
        if repair && stale.place.named_seq.is_some() {
            store.release(&stale.place)?;
            store.sync()?;
        }
        discarded.push(format!(
            "{} (seq {} precedes a gap before seq {newest}; purged)",
            stale.place.name, stale.header.seq
        ));
    }
    Ok(valid)
}

/// Checks that a header belongs to this device and agrees with its place (a directory file
/// names its seq; every place has the segment size).
fn check_place(
    place: &SegmentPlace,
    device_uuid: Uuid,
    owner: Uuid,
    seq: u64,
    segment_bytes: u64,
) -> Result<()> {
    if owner != device_uuid {
        return Err(StorageError::Foreign(format!(
            "{} belongs to device {owner}, not {device_uuid}",
            place.name
        )));
    }
    if place.named_seq.is_some_and(|s| s != seq) || segment_bytes != place.disk.len_bytes() {
        return Err(StorageError::corrupt(
            "WAL segment header",
            &place.name,
            "seq or size disagrees with its file",
        ));
    }
    Ok(())
}

/// Whether the first block after a segment's header was never written.
fn records_area_blank(place: &SegmentPlace) -> Result<bool> {
    if place.disk.len_bytes() < 2 * SEGMENT_HEADER_BYTES {
        return Ok(true);
    }
    let mut buf = AlignedBuf::zeroed(SEGMENT_HEADER_BYTES as usize);
    place
        .disk
        .read_at(SEGMENT_HEADER_BYTES, &mut buf)
        .map_err(|e| StorageError::io("read segment", &place.name, e))?;
    Ok(buf.iter().all(|&b| b == 0))
}

struct SegmentScan {
    records: u64,
    max_index: Option<u64>,
    stop: TailStop,
}

fn scan_segment(
    seg: &LiveSegment,
    sealed: Option<u64>,
    log: &mut LogBuilder,
    max_stored: usize,
) -> Result<SegmentScan> {
    let seed = record::salt_seed(seg.header.salt);
    let mut window = Window::new(&seg.place.disk);
    let len = seg.place.disk.len_bytes();
    let mut pos = SEGMENT_HEADER_BYTES;
    let mut scan = SegmentScan { records: 0, max_index: None, stop: stop_at(seg, 0, "") };
    let at = |pos: u64| format!("{} offset {pos}", seg.place.name);
    let reason = loop {
        if let Some(end) = sealed {
            if pos == end {
                scan.stop = stop_at(seg, pos, "sealed end");
                return Ok(scan);
            }
            if pos > end {
                return Err(StorageError::corrupt(
                    "WAL segment",
                    at(pos),
                    format!("records run past the sealed end {end}"),
                ));
            }
        }
        if pos + RECORD_HEADER_BYTES as u64 > len {
            break "end of segment".to_string();
        }
        let (decoded, purge_node) = window.decode(pos, seed, max_stored)?;
        let header = match decoded {
            Decoded::Record(h) => h,
            Decoded::Zero => break "zeroed header (end of written records)".to_string(),
            Decoded::Invalid(reason) => break reason,
            Decoded::Short { .. } => break "record runs past the end of the segment".to_string(),
        };
        apply(log, &header, purge_node, seg.header.seq, pos)
            .map_err(|r| StorageError::corrupt("WAL record", at(pos), r))?;
        if header.kind == RecordKind::Entry {
            scan.max_index = Some(header.index);
        }
        scan.records += 1;
        pos = record::next_position(
            (pos as usize) + RECORD_HEADER_BYTES + header.stored_len as usize,
            header.flags,
        ) as u64;
    };
    if let Some(end) = sealed {
        return Err(StorageError::corrupt(
            "WAL record",
            at(pos),
            format!("{reason}, inside the sealed part (ends at {end}) of a segment a later one follows: acknowledged data is damaged"),
        ));
    }
    if let Some(later) = later_batch(&mut window, pos, len, seed, max_stored)? {
        return Err(StorageError::corrupt(
            "WAL record",
            at(pos),
            format!("{reason}, but a later intact batch starts at offset {later}: acknowledged data is damaged"),
        ));
    }
    scan.stop = stop_at(seg, pos, &reason);
    Ok(scan)
}

fn stop_at(seg: &LiveSegment, offset: u64, reason: &str) -> TailStop {
    TailStop { segment: seg.place.name.clone(), offset, reason: reason.into() }
}

/// Applies one record to the log.
fn apply(
    log: &mut LogBuilder,
    h: &record::RecordHeader,
    purge_node: Option<u64>,
    seg_seq: u64,
    pos: u64,
) -> std::result::Result<(), String> {
    match h.kind {
        RecordKind::Entry => {
            let len = RECORD_HEADER_BYTES as u32 + h.stored_len;
            log.entry(h.index, DiskLoc { seg_seq, offset: pos, len, term: h.term })
        }
        RecordKind::Truncate => log.truncate(h.index),
        RecordKind::Purge => {
            let node = purge_node.ok_or("purge marker without its 8-byte node id")?;
            log.purge(LogId { term: h.term, node, index: h.index });
            Ok(())
        }
    }
}

/// The first sector boundary after `pos` where an intact batch starts, if any.
fn later_batch(
    window: &mut Window<'_>,
    pos: u64,
    len: u64,
    seed: u32,
    max_stored: usize,
) -> Result<Option<u64>> {
    let mut at = (pos + 1).next_multiple_of(SECTOR_BYTES as u64);
    while at + RECORD_HEADER_BYTES as u64 <= len {
        if let (Decoded::Record(h), _) = window.decode(at, seed, max_stored)? {
            if h.flags & FLAG_BATCH_START != 0 {
                return Ok(Some(at));
            }
        }
        at += SECTOR_BYTES as u64;
    }
    Ok(None)
}
