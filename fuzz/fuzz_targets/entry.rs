//! `xdevice::replication::types::decode_entry`: a WAL record's payload back to an openraft entry
//! (`entry::EntryPayload::decode`, then postcard for a membership), as the log store reads every
//! entry it serves. The step after `wal_record`.
//!
//! No mode bits (the entry payload has no checksum of its own: the record's covers it).
//!
//! Properties: a decoded entry re-encodes (`encode_entry`) to the bytes it was decoded from,
//! except the bytes the format declares zero and the decoder does not read (`IGNORED`, listed
//! below) and a membership's postcard bytes (compared decoded); the re-encoding decodes to the
//! same entry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openraft::EntryPayload as RaftPayload;
use xdevice::replication::types::{decode_entry, encode_entry};
use xdevice_fuzz::{assert_same_except, split, u32_at};

fuzz_target!(|data: &[u8]| {
    let Some((_mode, bytes)) = split(data) else { return };
    let Ok(entry) = decode_entry(5, 3, bytes) else { return };
    let again = encode_entry(&entry).to_vec();
    let back = decode_entry(5, 3, &again).expect("a re-encoded entry decodes");
    assert_eq!(back, entry, "re-encoded entry decodes differently");
    // Bytes documented as zero that the decoder does not check: header [2, 8); for block
    // entries the op count's upper word, and in each op header [1, 4).
    if let RaftPayload::Membership(_) = entry.payload {
        let zero = 2..8;
        assert_same_except(
            &again[..16],
            &bytes[..16],
            std::slice::from_ref(&zero),
            "membership entry header",
        );
        return;
    }
    let mut ignored = Vec::new();
    ignored.push(2..8);
    if bytes.len() == again.len() && matches!(again[1], 2 | 5) {
        let base = if again[1] == 5 { 24 } else { 16 };
        ignored.push(base + 4..base + 8);
        let mut at = base + 8;
        while at + 16 <= again.len() {
            ignored.push(at + 1..at + 4);
            let n = u32_at(&again, at + 4).unwrap_or(0) as usize;
            at += 16 + if again[at] == 1 { n } else { 0 };
        }
    }
    assert_same_except(&again, bytes, &ignored, "entry");
});
