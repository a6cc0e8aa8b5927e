//! `xdevice::net::frame`: `decode` on a byte slice and `read_frame` on the same bytes as a stream.
//!
//! Mode bits: 0 reseal the crc32c; 1 decode with `SMALL_LIMIT` instead of the product's 16 MiB
//! payload limit.
//!
//! Properties: a decoded frame re-encodes to exactly the bytes it was decoded from; `read_frame`
//! agrees with `decode` (same frame, or an error of the same kind); a payload never exceeds the
//! limit; an error names a cause consistent with the input.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use xdevice::net::frame::{self, FrameError, HEADER_BYTES};
use xdevice_fuzz::{reseal, split, CLUSTER, RESEAL, SMALL_LIMIT};

/// The product's limit on a frame payload (`replication::tcp::MAX_PAYLOAD`).
const PRODUCT_LIMIT: usize = 16 << 20;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().build().expect("current-thread runtime")
    })
}

fn kind(e: &FrameError) -> std::mem::Discriminant<FrameError> {
    std::mem::discriminant(e)
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split(data) else { return };
    let mut buf = bytes.to_vec();
    if mode & RESEAL != 0 {
        reseal::frame(&mut buf);
    }
    let max = if mode & 2 != 0 { SMALL_LIMIT } else { PRODUCT_LIMIT };

    let decoded = frame::decode(&buf, CLUSTER, max);
    let read = runtime().block_on(frame::read_frame(&mut &buf[..], CLUSTER, max));
    match &decoded {
        Ok((f, used)) => {
            assert_eq!(*used, HEADER_BYTES + f.payload.len());
            assert!(f.payload.len() <= max, "payload of {} over the limit {max}", f.payload.len());
            let again = frame::encode(CLUSTER, f).expect("a decoded frame encodes");
            assert_eq!(again, buf[..*used], "decoded frame does not re-encode to its bytes");
            assert_eq!(frame::decode(&again, CLUSTER, max).expect("re-decode").0, *f);
            match &read {
                Ok(Some(r)) => assert_eq!(r, f, "read_frame and decode disagree"),
                other => panic!("decode accepted {f:?}, read_frame answered {other:?}"),
            }
        }
        Err(e) => {
            match e {
                FrameError::Truncated { have, need } => {
                    assert_eq!(*have, buf.len());
                    assert!(need > have);
                }
                FrameError::TooLarge { len, max: m } => assert!(len > m && *m == max),
                FrameError::ClusterMismatch { expected, got } => {
                    assert_eq!(*expected, CLUSTER);
                    assert_ne!(*got, CLUSTER);
                }
                FrameError::Io(io) => panic!("decode of a slice reported I/O: {io}"),
                _ => {}
            }
            match &read {
                Ok(None) => {
                    assert!(buf.is_empty(), "read_frame saw a clean end in {} bytes", buf.len())
                }
                Ok(Some(r)) => panic!("decode refused ({e}), read_frame accepted {r:?}"),
                Err(r) => assert_eq!(kind(r), kind(e), "decode: {e}; read_frame: {r}"),
            }
        }
    }
});
