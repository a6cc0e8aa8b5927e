//! The frame: the unit of the RPC wire format, and its byte encoding. Pure except `read_frame`,
//! which reads one frame from any `AsyncRead`; it never opens sockets and never interprets `kind`.
//!
//! ```text
//!  0   4  magic "XDRP"
//!  4   1  version (1)
//!  5   1  kind (opaque here; 0xF0.. are reserved by the RPC layer)
//!  6   2  flags: bit 0 response, bit 1 error response; all other bits zero
//!  8  16  cluster id (UUID bytes)
//! 24   8  request id
//! 32   4  payload length in bytes
//! 36   8  zero (reserved)
//! 44   4  crc32c of bytes [0, 44) followed by the payload
//! 48   …  payload
//! ```
//!
//! All integers are little-endian. Decoding checks, in order: magic, version, claimed length
//! against the receiver's limit (before any allocation), checksum, then flags, reserved bytes and
//! cluster id. So a damaged frame reports `Checksum` (or a header error), and `ClusterMismatch`
//! only ever describes an intact frame from another cluster.

use tokio::io::{AsyncRead, AsyncReadExt};
use uuid::Uuid;

/// Bytes of the fixed header in front of every payload.
pub const HEADER_BYTES: usize = 48;
/// The first four bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"XDRP");
/// The wire-format version this code writes and accepts.
pub const VERSION: u8 = 1;
/// Flag bit: the frame answers the request with the same request id.
pub const FLAG_RESPONSE: u16 = 1 << 0;
/// Flag bit: the response carries an error message (UTF-8) instead of a result.
pub const FLAG_ERROR: u16 = 1 << 1;
/// The largest payload the length field can describe.
pub const MAX_PAYLOAD_LIMIT: usize = u32::MAX as usize;

const KNOWN_FLAGS: u16 = FLAG_RESPONSE | FLAG_ERROR;
const CRC_AT: usize = 44;
/// Payload bytes are allocated in steps of this size as they arrive, so a peer that claims a large
/// payload and then stalls holds at most one step of memory beyond what it actually sent.
const READ_STEP_BYTES: usize = 1 << 20;

const _: () = assert!(CRC_AT + 4 == HEADER_BYTES);

/// One decoded frame. The cluster id is checked on decode and supplied on encode, not stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u16,
    pub request_id: u64,
    pub payload: Vec<u8>,
}

impl Frame {
    /// A request of `kind`.
    pub fn request(kind: u8, request_id: u64, payload: Vec<u8>) -> Frame {
        Frame { kind, flags: 0, request_id, payload }
    }

    /// A successful response to request `request_id`.
    pub fn response(kind: u8, request_id: u64, payload: Vec<u8>) -> Frame {
        Frame { kind, flags: FLAG_RESPONSE, request_id, payload }
    }

    /// An error response to request `request_id` carrying `payload` (the RPC layer's code and
    /// message).
    pub fn error_response(kind: u8, request_id: u64, payload: Vec<u8>) -> Frame {
        Frame { kind, flags: FLAG_RESPONSE | FLAG_ERROR, request_id, payload }
    }

    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RESPONSE != 0
    }

    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

/// Why bytes are not a valid frame for this receiver.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:#010x} (expected {MAGIC:#010x})")]
    BadMagic(u32),
    #[error("unsupported frame version {0} (this side speaks {VERSION})")]
    Version(u8),
    #[error("unknown flag bits {0:#06x}")]
    UnknownFlags(u16),
    #[error("reserved header bytes are not zero: {0:#018x}")]
    Reserved(u64),
    #[error("cluster id mismatch: expected {expected}, got {got}")]
    ClusterMismatch { expected: Uuid, got: Uuid },
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("checksum mismatch: header says {expected:#010x}, content hashes to {got:#010x}")]
    Checksum { expected: u32, got: u32 },
    #[error("truncated frame: have {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The encoded bytes of `frame` in cluster `cluster_id`. Fails only if the payload is longer than
/// the length field can describe.
pub fn encode(cluster_id: Uuid, frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let len = frame.payload.len();
    if len > MAX_PAYLOAD_LIMIT {
        return Err(FrameError::TooLarge { len, max: MAX_PAYLOAD_LIMIT });
    }
    let mut buf = Vec::with_capacity(HEADER_BYTES + len);
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.push(VERSION);
    buf.push(frame.kind);
    buf.extend_from_slice(&frame.flags.to_le_bytes());
    buf.extend_from_slice(cluster_id.as_bytes());
    buf.extend_from_slice(&frame.request_id.to_le_bytes());
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&[0u8; 8]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..CRC_AT]), &frame.payload);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(&frame.payload);
    Ok(buf)
}

/// Decodes the frame at the start of `buf`; returns it and the bytes it occupied.
pub fn decode(
    buf: &[u8],
    cluster_id: Uuid,
    max_payload: usize,
) -> Result<(Frame, usize), FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_BYTES>() else {
        return Err(FrameError::Truncated { have: buf.len(), need: HEADER_BYTES });
    };
    let len = check_header(header, max_payload)?;
    let need = HEADER_BYTES + len;
    let Some(payload) = buf.get(HEADER_BYTES..need) else {
        return Err(FrameError::Truncated { have: buf.len(), need });
    };
    let frame = finish(header, payload.to_vec(), cluster_id)?;
    Ok((frame, need))
}

/// Reads one frame. `Ok(None)` is a clean end of stream before the first header byte; an end of
/// stream anywhere else is `Truncated`. Not cancellation-safe: a dropped read loses its position
/// in the stream, so callers read frames from one loop that they do not abandon midway.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    cluster_id: Uuid,
    max_payload: usize,
) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    let got = read_full(r, &mut header).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_BYTES {
        return Err(FrameError::Truncated { have: got, need: HEADER_BYTES });
    }
    let len = check_header(&header, max_payload)?;
    let mut payload = Vec::with_capacity(len.min(READ_STEP_BYTES));
    while payload.len() < len {
        let start = payload.len();
        let end = len.min(start + READ_STEP_BYTES);
        payload.reserve_exact(end - start);
        payload.resize(end, 0);
        let got = read_full(r, &mut payload[start..end]).await?;
        if got < end - start {
            let have = HEADER_BYTES + start + got;
            return Err(FrameError::Truncated { have, need: HEADER_BYTES + len });
        }
    }
    finish(&header, payload, cluster_id).map(Some)
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Checks what must hold before the payload is read; returns the payload length.
fn check_header(h: &[u8; HEADER_BYTES], max_payload: usize) -> Result<usize, FrameError> {
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if h[4] != VERSION {
        return Err(FrameError::Version(h[4]));
    }
    let len = u32::from_le_bytes([h[32], h[33], h[34], h[35]]) as usize;
    if len > max_payload {
        return Err(FrameError::TooLarge { len, max: max_payload });
    }
    Ok(len)
}

/// Verifies the checksum and the remaining header fields of a complete frame.
fn finish(h: &[u8; HEADER_BYTES], payload: Vec<u8>, cluster_id: Uuid) -> Result<Frame, FrameError> {
    let expected = u32::from_le_bytes([h[44], h[45], h[46], h[47]]);
    let got = crc32c::crc32c_append(crc32c::crc32c(&h[..CRC_AT]), &payload);
    if expected != got {
        return Err(FrameError::Checksum { expected, got });
    }
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    let reserved = u64::from_le_bytes([h[36], h[37], h[38], h[39], h[40], h[41], h[42], h[43]]);
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[8..24]);
    let got = Uuid::from_bytes(id);
    if got != cluster_id {
        return Err(FrameError::ClusterMismatch { expected: cluster_id, got });
    }
    let request_id = u64::from_le_bytes([h[24], h[25], h[26], h[27], h[28], h[29], h[30], h[31]]);
    Ok(Frame { kind: h[5], flags, request_id, payload })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn cluster() -> Uuid {
        Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)
    }

    fn sample() -> Frame {
        Frame {
            kind: 7,
            flags: FLAG_RESPONSE,
            request_id: 0x1122_3344_5566_7788,
            payload: (0..37u8).collect(),
        }
    }

    /// A frame whose header fields are set by hand, with a valid checksum.
    fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..CRC_AT]), &bytes[HEADER_BYTES..]);
        bytes[CRC_AT..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn round_trip() {
        for frame in [
            sample(),
            Frame::request(0, 0, Vec::new()),
            Frame::error_response(1, 2, b"no".to_vec()),
        ] {
            let bytes = encode(cluster(), &frame).unwrap();
            assert_eq!(bytes.len(), HEADER_BYTES + frame.payload.len());
            let (decoded, used) = decode(&bytes, cluster(), MAX).unwrap();
            assert_eq!((decoded, used), (frame.clone(), bytes.len()));
            let read = block_on(read_frame(&mut &bytes[..], cluster(), MAX)).unwrap();
            assert_eq!(read, Some(frame));
        }
    }

    #[test]
    fn header_layout_is_pinned() {
        let bytes = encode(cluster(), &sample()).unwrap();
        assert_eq!(&bytes[0..4], b"XDRP");
        assert_eq!(bytes[4], VERSION);
        assert_eq!(bytes[5], 7);
        assert_eq!(&bytes[6..8], &FLAG_RESPONSE.to_le_bytes());
        assert_eq!(&bytes[8..24], cluster().as_bytes());
        assert_eq!(&bytes[24..32], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[32..36], &37u32.to_le_bytes());
        assert_eq!(&bytes[36..44], &[0u8; 8]);
    }

    #[test]
    fn decode_reports_bytes_used_with_trailing_data() {
        let mut bytes = encode(cluster(), &sample()).unwrap();
        let len = bytes.len();
        bytes.extend_from_slice(&encode(cluster(), &Frame::request(1, 1, vec![9])).unwrap());
        let (_, used) = decode(&bytes, cluster(), MAX).unwrap();
        assert_eq!(used, len);
        let (second, _) = decode(&bytes[used..], cluster(), MAX).unwrap();
        assert_eq!(second.payload, vec![9]);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let bytes = encode(cluster(), &sample()).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let result = decode(&damaged, cluster(), MAX);
            assert!(result.is_err(), "bit {bit} flipped decoded as {result:?}");
            let read = block_on(read_frame(&mut &damaged[..], cluster(), MAX));
            assert!(read.is_err(), "bit {bit} flipped read as {read:?}");
        }
    }

    #[test]
    fn every_truncation_is_reported() {
        let bytes = encode(cluster(), &sample()).unwrap();
        for cut in 0..bytes.len() {
            match decode(&bytes[..cut], cluster(), MAX) {
                Err(FrameError::Truncated { have, need }) => {
                    assert_eq!(have, cut);
                    assert!(need > cut);
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
            match block_on(read_frame(&mut &bytes[..cut], cluster(), MAX)) {
                Ok(None) => assert_eq!(cut, 0),
                Err(FrameError::Truncated { have, .. }) => assert_eq!(have, cut),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_claim_is_refused_from_the_header_alone() {
        let mut bytes = encode(cluster(), &sample()).unwrap();
        bytes.truncate(HEADER_BYTES);
        bytes[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let want = |r: Result<_, FrameError>| matches!(r, Err(FrameError::TooLarge { len, max }) if len == u32::MAX as usize && max == MAX);
        assert!(want(decode(&bytes, cluster(), MAX).map(|_| ())));
        assert!(want(block_on(read_frame(&mut &bytes[..], cluster(), MAX)).map(|_| ())));
        // Exactly at the limit is fine.
        let at_limit = Frame::request(1, 1, vec![5; 64]);
        let bytes = encode(cluster(), &at_limit).unwrap();
        assert_eq!(decode(&bytes, cluster(), 64).unwrap().0, at_limit);
        assert!(matches!(decode(&bytes, cluster(), 63), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn intact_frames_with_bad_fields_name_the_field() {
        let bytes = encode(cluster(), &sample()).unwrap();

        let other = Uuid::from_u128(42);
        match decode(&bytes, other, MAX) {
            Err(FrameError::ClusterMismatch { expected, got }) => {
                assert_eq!((expected, got), (other, cluster()));
            }
            r => panic!("{r:?}"),
        }

        let mut flags = bytes.clone();
        flags[6..8].copy_from_slice(&0x8001u16.to_le_bytes());
        let r = decode(&resealed(flags), cluster(), MAX);
        assert!(matches!(r, Err(FrameError::UnknownFlags(0x8001))), "{r:?}");

        let mut reserved = bytes.clone();
        reserved[40] = 1;
        let r = decode(&resealed(reserved), cluster(), MAX);
        assert!(matches!(r, Err(FrameError::Reserved(_))), "{r:?}");

        let mut version = bytes.clone();
        version[4] = 2;
        assert!(matches!(decode(&version, cluster(), MAX), Err(FrameError::Version(2))));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let valid = encode(cluster(), &sample()).unwrap();
        for _ in 0..20_000 {
            let mut buf = if rng.gen_bool(0.5) { valid.clone() } else { vec![0; 100] };
            let len = rng.gen_range(0..buf.len());
            buf.truncate(len);
            for _ in 0..rng.gen_range(0..4) {
                if !buf.is_empty() {
                    let i = rng.gen_range(0..buf.len());
                    buf[i] = rng.gen();
                }
            }
            let _ = decode(&buf, cluster(), MAX);
        }
    }
}
