//! WAL record encoding: pure functions from records to bytes and back. No I/O, no state.
//!
//! ```text
//! offset size field
//!  0      4   magic           RECORD_MAGIC
//!  4      4   crc32c          seeded with the segment salt, over bytes 8..48 and the stored payload
//!  8      8   index           Raft log index (for markers: the index the marker names)
//! 16      8   term            Raft term of the entry (0 for a truncate marker)
//! 24      8   timestamp_us    wall-clock microseconds when the record was encoded
//! 32      2   kind            1 entry, 2 truncate marker, 3 purge marker
//! 34      2   flags           bit 0 lz4-compressed, bit 1 first of its batch, bit 2 last of its batch
//! 36      4   stored_len      payload bytes on disk
//! 40      4   raw_len         payload bytes after decompression
//! 44      4   reserved        zero
//! 48      …   payload         stored_len bytes, then zero padding to RECORD_ALIGN
//! ```
//! A batch starts on a `SECTOR_BYTES` boundary; records inside it follow each other at
//! `RECORD_ALIGN`; after the record flagged last-of-batch the next batch starts at the next sector.

use super::disk::SECTOR_BYTES;

/// "XREC" little-endian.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"XREC");
/// Bytes of the fixed record header.
pub const RECORD_HEADER_BYTES: usize = 48;
/// Alignment of records inside a batch.
pub const RECORD_ALIGN: usize = 8;

const _: () = assert!(RECORD_HEADER_BYTES % RECORD_ALIGN == 0);
const _: () = assert!(SECTOR_BYTES % RECORD_ALIGN == 0);

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecordKind {
    /// A log entry; the payload is opaque to the WAL.
    Entry = 1,
    /// Entries at `index` and above are gone (a Raft conflict).
    Truncate = 2,
    /// Entries at `index` and below are purged; the payload is the purged entry's leader node id.
    Purge = 3,
}

impl RecordKind {
    fn from_u16(value: u16) -> Option<Self> {
        match value {
            1 => Some(RecordKind::Entry),
            2 => Some(RecordKind::Truncate),
            3 => Some(RecordKind::Purge),
            _ => None,
        }
    }
}

/// Payload is lz4-compressed.
pub const FLAG_COMPRESSED: u16 = 1;
/// First record of a group-commit batch (starts on a sector boundary).
pub const FLAG_BATCH_START: u16 = 2;
/// Last record of a group-commit batch (the next batch starts at the next sector boundary).
pub const FLAG_BATCH_END: u16 = 4;
const KNOWN_FLAGS: u16 = FLAG_COMPRESSED | FLAG_BATCH_START | FLAG_BATCH_END;

/// The decoded fixed header of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub index: u64,
    pub term: u64,
    pub timestamp_us: u64,
    pub kind: RecordKind,
    pub flags: u16,
    pub stored_len: u32,
    pub raw_len: u32,
}

impl RecordHeader {
    /// Bytes this record occupies including padding to `RECORD_ALIGN`.
    pub fn padded_len(&self) -> usize {
        padded_record_len(self.stored_len as usize)
    }
}

/// On-disk size of a record with `stored_len` payload bytes, padded to `RECORD_ALIGN`.
pub fn padded_record_len(stored_len: usize) -> usize {
    (RECORD_HEADER_BYTES + stored_len).next_multiple_of(RECORD_ALIGN)
}

/// A record to encode (its payload is passed as stored).
#[derive(Clone, Copy, Debug)]
pub struct RecordInput {
    pub index: u64,
    pub term: u64,
    pub kind: RecordKind,
    /// The payload's length before compression.
    pub raw_len: usize,
}

/// The seed every record checksum of a segment starts from.
pub fn salt_seed(salt: u32) -> u32 {
    crc32c::crc32c(&salt.to_le_bytes())
}

/// Compresses `payload` when that saves at least an eighth of it; returns the stored bytes and
/// whether they are compressed.
pub fn maybe_compress(payload: &[u8]) -> (std::borrow::Cow<'_, [u8]>, bool) {
    if payload.len() >= 256 {
        let compressed = lz4_flex::block::compress(payload);
        if compressed.len() + payload.len() / 8 <= payload.len() {
            return (std::borrow::Cow::Owned(compressed), true);
        }
    }
    (std::borrow::Cow::Borrowed(payload), false)
}

/// Encodes one record at `out[0..]`, returning the padded length written. `stored` is the payload
/// as it goes to disk (already compressed when `compressed`), in parts written back to back.
/// `out` must be large enough.
pub fn encode_into(
    out: &mut [u8],
    rec: &RecordInput,
    stored: &[&[u8]],
    compressed: bool,
    batch_flags: u16,
    timestamp_us: u64,
    seed: u32,
) -> usize {
    let stored_len: usize = stored.iter().map(|p| p.len()).sum();
    let total = padded_record_len(stored_len);
    let (head, rest) = out[..total].split_at_mut(RECORD_HEADER_BYTES);
    head[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    head[8..16].copy_from_slice(&rec.index.to_le_bytes());
    head[16..24].copy_from_slice(&rec.term.to_le_bytes());
    head[24..32].copy_from_slice(&timestamp_us.to_le_bytes());
    head[32..34].copy_from_slice(&(rec.kind as u16).to_le_bytes());
    let flags = batch_flags | if compressed { FLAG_COMPRESSED } else { 0 };
    head[34..36].copy_from_slice(&flags.to_le_bytes());
    head[36..40].copy_from_slice(&(stored_len as u32).to_le_bytes());
    head[40..44].copy_from_slice(&(rec.raw_len as u32).to_le_bytes());
    head[44..48].fill(0);
    let mut crc = crc32c::crc32c_append(seed, &head[8..]);
    let mut at = 0;
    for part in stored {
        rest[at..at + part.len()].copy_from_slice(part);
        crc = crc32c::crc32c_append(crc, part);
        at += part.len();
    }
    rest[at..].fill(0);
    head[4..8].copy_from_slice(&crc.to_le_bytes());
    total
}

/// What the bytes at a position hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record; its payload is `buf[RECORD_HEADER_BYTES..][..stored_len]`.
    Record(RecordHeader),
    /// All-zero header: nothing was ever written here.
    Zero,
    /// The header needs more bytes than `buf` holds: read `needed` bytes from this position.
    Short { needed: usize },
    /// Not a valid record, with the reason.
    Invalid(String),
}

/// Decodes the record at the start of `buf`, verifying magic, fields and checksum.
/// `max_stored` bounds the payload length so a corrupt length cannot make the caller read far.
pub fn decode(buf: &[u8], seed: u32, max_stored: usize) -> Decoded {
    if buf.len() < RECORD_HEADER_BYTES {
        return Decoded::Short { needed: RECORD_HEADER_BYTES };
    }
    let head = &buf[..RECORD_HEADER_BYTES];
    if head.iter().all(|&b| b == 0) {
        return Decoded::Zero;
    }
    let u32_at = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[o..o + 8]);
        u64::from_le_bytes(b)
    };
    if u32_at(0) != RECORD_MAGIC {
        return Decoded::Invalid(format!("bad magic {:#010x}", u32_at(0)));
    }
    let stored_len = u32_at(36);
    if stored_len as usize > max_stored {
        return Decoded::Invalid(format!("payload length {stored_len} exceeds limit {max_stored}"));
    }
    let total = RECORD_HEADER_BYTES + stored_len as usize;
    if buf.len() < total {
        return Decoded::Short { needed: total };
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(seed, &head[8..]), &buf[48..total]);
    if crc != u32_at(4) {
        return Decoded::Invalid(format!(
            "checksum mismatch (stored {:#010x}, computed {crc:#010x})",
            u32_at(4)
        ));
    }
    let Some(kind) = RecordKind::from_u16(u16_at(32)) else {
        return Decoded::Invalid(format!("unknown record kind {}", u16_at(32)));
    };
    let flags = u16_at(34);
    if flags & !KNOWN_FLAGS != 0 {
        return Decoded::Invalid(format!("unknown flags {flags:#06x}"));
    }
    if u32_at(44) != 0 {
        return Decoded::Invalid(format!("reserved field holds {:#010x}", u32_at(44)));
    }
    let raw_len = u32_at(40);
    if flags & FLAG_COMPRESSED == 0 && raw_len != stored_len {
        return Decoded::Invalid(format!("raw length {raw_len} != stored length {stored_len}"));
    }
    Decoded::Record(RecordHeader {
        index: u64_at(8),
        term: u64_at(16),
        timestamp_us: u64_at(24),
        kind,
        flags,
        stored_len,
        raw_len,
    })
}

/// Returns the payload of a decoded record, decompressing it when flagged.
/// `record` is the buffer that `decode` accepted.
pub fn payload(header: &RecordHeader, record: &[u8], max_raw: usize) -> Result<Vec<u8>, String> {
    let stored = &record[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + header.stored_len as usize];
    if header.flags & FLAG_COMPRESSED == 0 {
        return Ok(stored.to_vec());
    }
    let raw_len = header.raw_len as usize;
    if raw_len > max_raw {
        return Err(format!("decompressed length {raw_len} exceeds limit {max_raw}"));
    }
    let mut raw = vec![0u8; raw_len];
    match lz4_flex::block::decompress_into(stored, &mut raw) {
        Ok(n) if n == raw_len => Ok(raw),
        Ok(n) => Err(format!("decompressed {n} bytes, header says {raw_len}")),
        Err(e) => Err(format!("lz4 payload does not decompress: {e}")),
    }
}

/// The next position after a record ending at `end`: the next record in the batch, or the next
/// sector boundary after the last record of a batch.
pub fn next_position(end: usize, flags: u16) -> usize {
    if flags & FLAG_BATCH_END != 0 {
        end.next_multiple_of(SECTOR_BYTES)
    } else {
        end.next_multiple_of(RECORD_ALIGN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(
        kind: RecordKind,
        index: u64,
        term: u64,
        payload: &[u8],
        flags: u16,
        seed: u32,
    ) -> Vec<u8> {
        let rec = RecordInput { index, term, kind, raw_len: payload.len() };
        let (stored, compressed) = maybe_compress(payload);
        let mut out = vec![0u8; padded_record_len(stored.len())];
        let n = encode_into(&mut out, &rec, &[&stored], compressed, flags, 7, seed);
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn round_trip_plain_and_compressed() {
        let seed = salt_seed(42);
        for input in [b"short".to_vec(), vec![0xAB; 8192], (0..5000u32).map(|i| i as u8).collect()]
        {
            let bytes = encode(RecordKind::Entry, 9, 3, &input, FLAG_BATCH_START, seed);
            let Decoded::Record(h) = decode(&bytes, seed, 1 << 20) else { panic!("not decoded") };
            assert_eq!((h.index, h.term, h.kind, h.timestamp_us), (9, 3, RecordKind::Entry, 7));
            assert_eq!(h.flags & FLAG_BATCH_START, FLAG_BATCH_START);
            assert_eq!(payload(&h, &bytes, 1 << 20).expect("payload"), input);
        }
        let big = vec![0u8; 8192];
        let bytes = encode(RecordKind::Entry, 1, 1, &big, 0, seed);
        assert!(bytes.len() < 1024, "zeros compress");
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let seed = salt_seed(1);
        let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let bytes = encode(RecordKind::Entry, 5, 2, &payload, 0, seed);
        let used = RECORD_HEADER_BYTES + payload.len();
        for i in 0..used {
            for mask in [0x01u8, 0x80, 0xFF] {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                match decode(&bad, seed, 1 << 20) {
                    Decoded::Record(h) => panic!("byte {i} mask {mask:#x} accepted as {h:?}"),
                    Decoded::Invalid(_) | Decoded::Short { .. } | Decoded::Zero => {}
                }
            }
        }
    }

    #[test]
    fn other_salt_is_rejected_and_zero_is_zero() {
        let bytes = encode(RecordKind::Truncate, 1, 1, &[], 0, salt_seed(1));
        assert!(matches!(decode(&bytes, salt_seed(2), 64), Decoded::Invalid(_)));
        assert_eq!(decode(&[0u8; 64], salt_seed(1), 64), Decoded::Zero);
        assert_eq!(decode(&[1u8; 10], salt_seed(1), 64), Decoded::Short { needed: 48 });
    }

    #[test]
    fn huge_length_is_bounded() {
        let mut bytes = encode(RecordKind::Entry, 1, 1, b"x", 0, 0);
        bytes[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&bytes, 0, 1 << 20), Decoded::Invalid(_)));
    }

    #[test]
    fn positions() {
        assert_eq!(next_position(49, 0), 56);
        assert_eq!(next_position(49, FLAG_BATCH_END), 512);
        assert_eq!(next_position(512, FLAG_BATCH_END), 512);
    }
}
