//! `xdevice::storage::record`: `decode` and `payload`, as WAL recovery (`wal/scan.rs`) and
//! `Wal::read` call them, with the segment salt's seed and the product's limits
//! (`MAX_STORED_BYTES` for both the stored and the decompressed length) or `SMALL_LIMIT`.
//!
//! Mode bits: 0 reseal the record checksum; 1 small limits.
//!
//! Properties: an accepted record's lengths are within the limits and `buf`; its header and
//! stored payload re-encode (`encode_into`) to exactly the bytes decoded; `payload` returns
//! `raw_len` bytes within the limit; `Short` asks for more than `buf` holds, `Zero` means an
//! all-zero header. And the other way: the input's bytes, encoded with `encode_into` (compressed
//! when `maybe_compress` says so), decode to the same header and payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdevice::storage::record::{
    self, Decoded, RecordInput, RecordKind, FLAG_BATCH_END, FLAG_BATCH_START, FLAG_COMPRESSED,
    RECORD_HEADER_BYTES,
};
use xdevice::storage::wal::MAX_STORED_BYTES;
use xdevice_fuzz::{reseal, split, RESEAL, SALT, SMALL_LIMIT};

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split(data) else { return };
    let seed = record::salt_seed(SALT);
    let mut buf = bytes.to_vec();
    if mode & RESEAL != 0 {
        reseal::record(&mut buf, seed);
    }
    let (max_stored, max_raw) = if mode & 2 != 0 {
        (SMALL_LIMIT, SMALL_LIMIT)
    } else {
        (MAX_STORED_BYTES, MAX_STORED_BYTES)
    };

    match record::decode(&buf, seed, max_stored) {
        Decoded::Record(h) => {
            let stored_len = h.stored_len as usize;
            assert!(stored_len <= max_stored, "stored length {stored_len} over {max_stored}");
            let end = RECORD_HEADER_BYTES + stored_len;
            assert!(end <= buf.len(), "record of {end} bytes accepted from {}", buf.len());
            let compressed = h.flags & FLAG_COMPRESSED != 0;
            if !compressed {
                assert_eq!(h.raw_len, h.stored_len);
            }
            // Re-encode what was decoded: it must be the very bytes.
            let stored = &buf[RECORD_HEADER_BYTES..end];
            let input = RecordInput {
                index: h.index,
                term: h.term,
                kind: h.kind,
                raw_len: h.raw_len as usize,
            };
            let mut out = vec![0u8; record::padded_record_len(stored_len)];
            let batch = h.flags & (FLAG_BATCH_START | FLAG_BATCH_END);
            let n = record::encode_into(
                &mut out,
                &input,
                &[stored],
                compressed,
                batch,
                h.timestamp_us,
                seed,
            );
            assert_eq!(n, h.padded_len());
            assert_eq!(out[..end], buf[..end], "decoded record does not re-encode to its bytes");

            match record::payload(&h, &buf, max_raw) {
                Ok(p) => {
                    assert_eq!(p.len(), h.raw_len as usize);
                    assert!(p.len() <= max_raw.max(max_stored));
                    if !compressed {
                        assert_eq!(p, stored);
                    }
                }
                Err(e) => {
                    assert!(compressed, "an uncompressed payload was refused: {e}");
                    assert!(!e.is_empty());
                }
            }
        }
        Decoded::Zero => {
            assert!(buf.len() >= RECORD_HEADER_BYTES);
            assert!(buf[..RECORD_HEADER_BYTES].iter().all(|&b| b == 0));
        }
        Decoded::Short { needed } => {
            assert!(needed > buf.len(), "Short({needed}) with {}", buf.len())
        }
        Decoded::Invalid(reason) => assert!(!reason.is_empty()),
    }

    // The encoder's side: the input as a payload round-trips through a record.
    let payload: &[u8] = if bytes.len() > SMALL_LIMIT { &bytes[..SMALL_LIMIT] } else { bytes };
    let kind =
        [RecordKind::Entry, RecordKind::Truncate, RecordKind::Purge][usize::from((mode >> 2) % 3)];
    let (stored, compressed) = record::maybe_compress(payload);
    let input = RecordInput { index: u64::from(mode), term: 7, kind, raw_len: payload.len() };
    let mut out = vec![0u8; record::padded_record_len(stored.len())];
    let half = stored.len() / 2;
    let n = record::encode_into(
        &mut out,
        &input,
        &[&stored[..half], &stored[half..]],
        compressed,
        FLAG_BATCH_START,
        9,
        seed,
    );
    assert_eq!(n, out.len());
    let Decoded::Record(h) = record::decode(&out, seed, SMALL_LIMIT.max(out.len())) else {
        panic!("encode_into output of {} bytes does not decode", payload.len());
    };
    assert_eq!((h.index, h.term, h.kind, h.timestamp_us), (input.index, 7, kind, 9));
    assert_eq!(h.flags & FLAG_COMPRESSED != 0, compressed);
    assert_eq!(record::payload(&h, &out, payload.len()).expect("own payload"), payload);
});
