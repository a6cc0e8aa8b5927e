//! What the fuzz targets and the seed generator share: the fixed parameters each target decodes
//! with, and `reseal`, which lets the fuzzer past a format's checksum.
//!
//! Every target reads its input as one mode byte followed by the bytes to decode. Bit 0 of the
//! mode asks the target to recompute the format's checksum over the mutated bytes before decoding
//! ("reseal"), so mutations reach the checks that follow the checksum; the other bits are the
//! target's own (documented at its top). Seeds (`src/bin/seeds.rs`) follow the same layout.

use uuid::Uuid;
use xdevice::replication::snapshot::Shape;

/// Mode bit 0: recompute the checksum before decoding.
pub const RESEAL: u8 = 1;

/// The cluster id frames are decoded for (`frame`).
pub const CLUSTER: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);

/// The device uuid the state slots are opened for (`state_slot`).
pub const OWNER: Uuid = Uuid::from_u128(0x0000_0d0e_0000_0000_0000_0000_0000_5107);

/// The segment salt WAL records are checksummed with (`wal_record`).
pub const SALT: u32 = 0x5eed_5a17;

/// The small limit targets use besides the product's own (mode bit 1), so both sides of every
/// length check are reached with small inputs.
pub const SMALL_LIMIT: usize = 1 << 10;

/// The snapshot stream geometry `snapshot_chunk` parses against: 16-byte "blocks" keep a record
/// at 4 KiB + 256 × 16 = 8 KiB, and 300 blocks make two chunks, the second one partial.
pub const SHAPE: Shape = Shape { block_bytes: 16, device_bytes: 16 * 300 };

/// Splits an input into its mode byte and the bytes to decode.
pub fn split(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(m, rest)| (*m, rest))
}

/// Little-endian `u32` at `at`, if `buf` holds it.
pub fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// crc32c of `parts` back to back, starting from `seed`.
pub fn crc(seed: u32, parts: &[&[u8]]) -> u32 {
    parts.iter().fold(seed, |c, p| crc32c::crc32c_append(c, p))
}

/// Stores `value` little-endian at `at` if `buf` holds it.
pub fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    if let Some(b) = buf.get_mut(at..at + 4) {
        b.copy_from_slice(&value.to_le_bytes());
    }
}

/// The checksum schemes of the formats fuzzed here, as their module documentation gives them.
pub mod reseal {
    use super::{crc, put_u32, u32_at};

    /// Net frame: crc32c of bytes [0, 44) and the payload (length at 32) at 44.
    pub fn frame(buf: &mut [u8]) {
        let Some(len) = u32_at(buf, 32) else { return };
        let Some(payload) = buf.get(48..48 + len as usize) else { return };
        let c = crc(0, &[&buf[..44], payload]);
        put_u32(buf, 44, c);
    }

    /// WAL record: crc32c seeded with the salt over [8, 48) and the stored payload, at 4.
    pub fn record(buf: &mut [u8], seed: u32) {
        let Some(len) = u32_at(buf, 36) else { return };
        let Some(payload) = buf.get(48..48 + len as usize) else { return };
        let c = crc(seed, &[&buf[8..48], payload]);
        put_u32(buf, 4, c);
    }

    /// Superblock: crc32c of [0, 4092) at 4092.
    pub fn superblock(buf: &mut [u8]) {
        if buf.len() >= 4096 {
            let c = crc(0, &[&buf[..4092]]);
            put_u32(buf, 4092, c);
        }
    }

    /// State slot: crc32c of [0, 20), the owner [24, 40) and the payload (length at 16, from
    /// 40) at 20.
    pub fn slot(slot: &mut [u8]) {
        let Some(len) = u32_at(slot, 16) else { return };
        let Some(payload) = slot.get(40..40 + len as usize) else { return };
        let c = crc(0, &[&slot[..20], &slot[24..40], payload]);
        put_u32(slot, 20, c);
    }

    /// Snapshot record: crc32c of the 4 KiB head page with the field at `field` read as zero,
    /// followed (chunks) by the data after the page.
    pub fn snapshot(rec: &mut [u8], field: usize, with_data: bool) {
        if rec.len() < 4096 {
            return;
        }
        let (page, data) = rec.split_at(4096);
        let data = if with_data { data } else { &[][..] };
        let c = crc(0, &[&page[..field], &[0; 4], &page[field + 4..], data]);
        put_u32(rec, field, c);
    }
}

/// Asserts that `got` equals `want` on every byte except those in `ignored` (ranges the decoder
/// does not read), naming the first byte that differs.
pub fn assert_same_except(got: &[u8], want: &[u8], ignored: &[std::ops::Range<usize>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: re-encoded length differs");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g != w && !ignored.iter().any(|r| r.contains(&i)) {
            panic!("{what}: re-encoding differs at byte {i}: {g:#04x} != {w:#04x}");
        }
    }
}
