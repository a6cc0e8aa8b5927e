//! `xdevice::replication::wire::NodeRequest::decode`: every request a node serves, decoded from a
//! frame's kind and payload exactly as the node service does before acting on it (postcard, no
//! trailing bytes, every limit checked).
//!
//! Mode byte: the frame kind (taken modulo 8, so the six kinds and a few unknown ones are all
//! reached).
//!
//! Properties: a decoded request has the kind it was decoded from; it encodes, and that encoding
//! decodes to a request that encodes to the same bytes and prints the same (postcard need not be
//! canonical on input, so the input itself is not compared); a refusal is `Malformed` with a
//! message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdevice::replication::wire::{ErrorCode, NodeRequest};
use xdevice_fuzz::split;

fuzz_target!(|data: &[u8]| {
    let Some((mode, payload)) = split(data) else { return };
    let kind = mode % 8;
    match NodeRequest::decode(kind, payload) {
        Ok(req) => {
            assert_eq!(req.kind(), kind);
            let (k, once) = req.encode().expect("a decoded request encodes");
            assert_eq!(k, kind);
            assert!(once.len() <= payload.len(), "re-encoded longer than decoded");
            let back = NodeRequest::decode(kind, &once).expect("a re-encoded request decodes");
            let (_, twice) = back.encode().expect("encodes again");
            assert_eq!(once, twice, "request encoding is not stable");
            assert_eq!(format!("{req:?}"), format!("{back:?}"));
        }
        Err(e) => {
            assert_eq!(e.code, Some(ErrorCode::Malformed), "{e}");
            assert!(!e.message.is_empty());
        }
    }
});
