//! `xdevice::replication::snapshot`: `parse_header` and `parse_chunk`, the checks `verify` and
//! `install` run on every record of a received snapshot stream, against the small `SHAPE`
//! (16-byte blocks, 300 of them: a full chunk 0 and a partial chunk 1, 8 KiB records) of a
//! replica in cluster `CLUSTER`.
//!
//! Mode bits: 0 reseal the record's crc32c; 1 parse a chunk record (else the header); 2 as chunk
//! number 1 (else 0); 3 zero-pad or cut the input to a whole record first.
//!
//! Properties: an accepted header (version 2) carries the shape and cluster it was parsed against
//! and a meta that postcard round-trips; its fixed fields re-encode to the bytes parsed. An accepted chunk holds
//! exactly the blocks of its place, each `block_bytes` long, present exactly where the bitmap
//! says, and re-encodes to the bytes parsed except those the parser does not read (normalized in
//! `unread_zeroed`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdevice::replication::snapshot::{
    parse_chunk, parse_header, Target, CHUNK_BLOCKS, RECORD_HEAD,
};
use xdevice::replication::types::SnapshotMeta;
use xdevice_fuzz::{assert_same_except, reseal, split, CLUSTER, RESEAL, SHAPE};

const HEAD: usize = RECORD_HEAD as usize;
const BITMAP_AT: usize = 64;
/// The receiving replica: `SHAPE`, in cluster `CLUSTER`.
const TARGET: Target = Target { shape: SHAPE, cluster: CLUSTER };

fn record_len() -> usize {
    HEAD + CHUNK_BLOCKS as usize * SHAPE.block_bytes as usize
}

fn blocks_in(n: u64) -> usize {
    let total = SHAPE.device_bytes / u64::from(SHAPE.block_bytes);
    CHUNK_BLOCKS.min(total - n * CHUNK_BLOCKS) as usize
}

/// `rec` with what `parse_chunk` does not read set to zero: the checksum (compared by the
/// parser, not kept), the documented-zero [32, 64), bitmap bits past the chunk's blocks, the rest
/// of the head page after the bitmap, the data of blocks the bitmap marks absent, and the padding
/// after the last block.
fn unread_zeroed(rec: &[u8], blocks: usize) -> Vec<u8> {
    let bs = SHAPE.block_bytes as usize;
    let mut r = rec.to_vec();
    r[28..64].fill(0);
    r[BITMAP_AT + CHUNK_BLOCKS as usize / 8..HEAD].fill(0);
    for i in 0..CHUNK_BLOCKS as usize {
        let bit = r[BITMAP_AT + i / 8] & (1 << (i % 8)) != 0;
        if i >= blocks || !bit {
            r[BITMAP_AT + i / 8] &= !(1 << (i % 8));
            r[HEAD + i * bs..HEAD + (i + 1) * bs].fill(0);
        }
    }
    r
}

fn check_chunk(rec: &[u8], n: u64) {
    let Ok(chunk) = parse_chunk(rec, SHAPE, n) else { return };
    let bs = SHAPE.block_bytes as usize;
    let blocks = blocks_in(n);
    assert_eq!(chunk.lba, n * CHUNK_BLOCKS);
    assert_eq!(chunk.blocks.len(), blocks);
    // Re-encode the parsed chunk per the format.
    let mut again = vec![0u8; record_len()];
    again[..8].copy_from_slice(b"XDEVSCHK");
    again[8..16].copy_from_slice(&n.to_le_bytes());
    again[16..24].copy_from_slice(&chunk.lba.to_le_bytes());
    again[24..28].copy_from_slice(&(blocks as u32).to_le_bytes());
    for (i, b) in chunk.blocks.iter().enumerate() {
        let bit = rec[BITMAP_AT + i / 8] & (1 << (i % 8)) != 0;
        assert_eq!(b.is_some(), bit, "block {i} presence disagrees with the bitmap");
        if let Some(d) = b {
            assert_eq!(d.len(), bs);
            assert_eq!(*d, &rec[HEAD + i * bs..HEAD + (i + 1) * bs]);
            again[BITMAP_AT + i / 8] |= 1 << (i % 8);
            again[HEAD + i * bs..HEAD + (i + 1) * bs].copy_from_slice(d);
        }
    }
    assert_same_except(&again, &unread_zeroed(rec, blocks), &[], "snapshot chunk");
}

fn check_header(page: &[u8]) {
    let Ok(described) = parse_header(page, TARGET) else { return };
    let meta = postcard::to_allocvec(&described.meta).expect("meta encodes");
    let back: SnapshotMeta = postcard::from_bytes(&meta).expect("meta decodes");
    assert_eq!(back, described.meta);
    let mut again = vec![0u8; HEAD];
    again[..8].copy_from_slice(b"XDEVSNAP");
    again[8..12].copy_from_slice(&2u32.to_le_bytes());
    again[12..16].copy_from_slice(&SHAPE.block_bytes.to_le_bytes());
    again[16..24].copy_from_slice(&SHAPE.device_bytes.to_le_bytes());
    again[24..28].copy_from_slice(&(CHUNK_BLOCKS as u32).to_le_bytes());
    if let Some(a) = described.attachment {
        again[36..40].copy_from_slice(&1u32.to_le_bytes());
        again[40..48].copy_from_slice(&a.epoch.to_le_bytes());
        again[48..56].copy_from_slice(&a.node.to_le_bytes());
    }
    again[56..72].copy_from_slice(CLUSTER.as_bytes());
    // Compared decoded instead: the meta (length at 28, bytes from 80: postcard need not be
    // canonical) and the checksum at 32. Not read: what follows the meta.
    assert_same_except(&again, &page[..HEAD], &[28..36, 80..HEAD], "snapshot header");
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split(data) else { return };
    let chunk = mode & 2 != 0;
    let mut rec = bytes.to_vec();
    if mode & 8 != 0 {
        rec.resize(if chunk { record_len() } else { HEAD }, 0);
    }
    if mode & RESEAL != 0 {
        if chunk {
            reseal::snapshot(&mut rec, 28, true);
        } else {
            reseal::snapshot(&mut rec, 32, false);
        }
    }
    if chunk {
        check_chunk(&rec, u64::from(mode >> 2 & 1));
    } else {
        check_header(&rec);
    }
});
