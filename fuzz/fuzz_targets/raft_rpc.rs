//! `postcard::from_bytes::<RaftRpc>`: the payload of a `RAFT` frame, and beside it the node
//! protocol's exact decode of the same bytes (`replication::wire::exact`, which `NodeRequest::
//! decode` uses for a `RAFT` frame: postcard with no trailing bytes allowed). The whole
//! `NodeRequest::decode`, limits included, is the `request` target.
//!
//! No mode bits (the frame's checksum is `frame`'s business).
//!
//! Properties: a decoded RPC encodes, and that encoding decodes to an RPC that encodes to the
//! same bytes and prints the same (postcard need not be canonical on input, so the input itself
//! is not compared). The exact decode accepts what `from_bytes` accepts, the same RPC, unless
//! bytes follow it, and then says so.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdevice::replication::network::RaftRpc;
use xdevice::replication::wire;
use xdevice_fuzz::split;

fuzz_target!(|data: &[u8]| {
    let Some((_mode, bytes)) = split(data) else { return };
    let exact = wire::exact::<RaftRpc>(bytes, "Raft RPC");
    let Ok(rpc) = postcard::from_bytes::<RaftRpc>(bytes) else {
        assert!(exact.is_err(), "exact decode accepted what from_bytes refused");
        return;
    };
    match &exact {
        Ok(e) => assert_eq!(format!("{e:?}"), format!("{rpc:?}")),
        Err(e) => assert!(e.message.contains("bytes after its end"), "{e}"),
    }
    let once = postcard::to_allocvec(&rpc).expect("a decoded RPC encodes");
    let back: RaftRpc = postcard::from_bytes(&once).expect("a re-encoded RPC decodes");
    let twice = postcard::to_allocvec(&back).expect("encodes again");
    assert_eq!(once, twice, "RaftRpc encoding is not stable");
    assert_eq!(format!("{rpc:?}"), format!("{back:?}"));
    wire::exact::<RaftRpc>(&once, "Raft RPC").expect("a re-encoded RPC decodes exactly");
});
