//! `xdevice::storage::superblock::Superblock::decode`: one copy of the superblock, as `choose`
//! reads each of the copies on open.
//!
//! Mode bits: 0 reseal the crc32c; 1 zero-pad the input to a whole copy (4 KiB), so short inputs
//! reach the field checks.
//!
//! Properties: an accepted superblock satisfies the geometry rules (block size a power of two in
//! range, device size a positive multiple of it, segment size in range and 4 KiB-aligned) and a
//! name of at most 32 UTF-8 bytes without NUL; it re-encodes (as the copy its bytes name) to the
//! bytes decoded, except those the decoder does not read (`ignored` below), and that encoding
//! decodes to the same superblock.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdevice::storage::superblock::{
    Superblock, MAX_BLOCK_BYTES, MAX_SEGMENT_BYTES, MIN_BLOCK_BYTES, MIN_SEGMENT_BYTES,
    SUPERBLOCK_BYTES,
};
use xdevice_fuzz::{assert_same_except, reseal, split, u32_at, RESEAL};

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split(data) else { return };
    let mut buf = bytes.to_vec();
    if mode & 2 != 0 && buf.len() < SUPERBLOCK_BYTES {
        buf.resize(SUPERBLOCK_BYTES, 0);
    }
    if mode & RESEAL != 0 {
        reseal::superblock(&mut buf);
    }
    let Ok(sb) = Superblock::decode(&buf, "fuzz") else { return };

    let block = u64::from(sb.block_bytes);
    assert!(block.is_power_of_two());
    assert!((u64::from(MIN_BLOCK_BYTES)..=u64::from(MAX_BLOCK_BYTES)).contains(&block));
    assert!(sb.device_bytes > 0 && sb.device_bytes % block == 0);
    assert!((MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&sb.segment_bytes));
    assert_eq!(sb.segment_bytes % 4096, 0);
    assert!(sb.device_name.len() <= 32 && !sb.device_name.contains('\0'));

    let copy = u32_at(&buf, 12).expect("decoded from a whole copy") as usize;
    let again = sb.encode(copy);
    assert_eq!(Superblock::decode(&again, "again").expect("re-encoded copy decodes"), sb);
    // Not read by the decoder: the name's bytes after its terminating NUL, the zero area after
    // the node id, and so the checksum when either differs.
    let name_end = (128 + sb.device_name.len() + 1).min(160);
    let ignored = [name_end..160, 168..4096];
    assert_same_except(&again, &buf[..SUPERBLOCK_BYTES], &ignored, "superblock");
});
