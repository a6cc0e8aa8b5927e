//! Decoding and validating one I/O descriptor from the kernel, and the one place where errors
//! become errnos. Pure logic: no kernel, no buffers, unit-tested below.
//!
//! Every descriptor is checked once, here, before anything else looks at it: a known opcode, a
//! length within the advertised limits, block alignment, and a range inside the device (with
//! overflow-checked arithmetic). The kernel's block layer already enforces most of this for a
//! well-behaved driver, but the daemon must never trust it: a wrong answer here would write
//! outside the image or index past a buffer.

use libublk::sys;

/// The device shape the frontend advertises and enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Logical (and physical) block size in bytes: a power of two, 512..=65536.
    pub block_bytes: u32,
    /// Device size in bytes, a multiple of `block_bytes`.
    pub size_bytes: u64,
    /// Largest READ or WRITE in bytes (the per-tag buffer size), a multiple of `block_bytes`.
    pub max_io_bytes: u32,
    /// Largest DISCARD or WRITE_ZEROES in bytes, a multiple of `block_bytes`.
    pub max_discard_bytes: u32,
    /// Writeback: a volatile write cache and FUA are advertised, so the kernel sends FLUSH and
    /// FUA. Writethrough: neither (every write is durable when it completes).
    pub volatile_cache: bool,
}

impl Geometry {
    /// Checks the shape is one the kernel and this frontend accept.
    pub fn validate(&self) -> Result<(), String> {
        let bs = self.block_bytes;
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(format!("block size {bs} is not a power of two in 512..=65536"));
        }
        if self.size_bytes == 0 || self.size_bytes % u64::from(bs) != 0 {
            return Err(format!(
                "device size {} is not a positive multiple of the {bs}-byte block",
                self.size_bytes
            ));
        }
        for (what, v) in [("max I/O", self.max_io_bytes), ("max discard", self.max_discard_bytes)] {
            if v < bs || v % bs != 0 {
                return Err(format!("{what} size {v} is not a positive multiple of {bs}"));
            }
        }
        Ok(())
    }
}

/// What a request asks for, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// A validated descriptor: byte offset and length inside the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub op: Op,
    pub offset: u64,
    pub len: u32,
    /// Forced unit access: complete only once durable (writes and write-zeroes).
    pub fua: bool,
}

/// Why a request failed. [`IoError::errno`] is the only mapping to the kernel's errno.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IoError {
    #[error("unsupported operation {0}")]
    UnsupportedOp(u8),
    #[error("request [{offset}, +{len}) is beyond the {size}-byte device")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request at byte {offset} of {len} bytes is not aligned to {block} bytes")]
    Misaligned { offset: u64, len: u64, block: u32 },
    #[error("request of {len} bytes is larger than the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    #[error("read returned {got} bytes for a {want}-byte request")]
    ShortRead { got: usize, want: usize },
    #[error("not completed in time: {0}")]
    Timeout(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("the device is shutting down")]
    Closed,
    #[error("the request was dropped without an answer")]
    Dropped,
}

impl IoError {
    /// The errno the block layer gets (the driver turns it into a `blk_status_t`: EINVAL and
    /// EOPNOTSUPP keep their meaning, everything else is an I/O error).
    pub fn errno(&self) -> i32 {
        match self {
            IoError::UnsupportedOp(_) => libc::EOPNOTSUPP,
            IoError::OutOfRange { .. } | IoError::Misaligned { .. } | IoError::TooLarge { .. } => {
                libc::EINVAL
            }
            IoError::Timeout(_) => libc::ETIMEDOUT,
            IoError::ShortRead { .. } | IoError::Io(_) | IoError::Closed | IoError::Dropped => {
                libc::EIO
            }
        }
    }
}

/// Decodes the descriptor fields `op_flags`, `start_sector` and `nr_sectors` (sectors are 512
/// bytes whatever the block size).
pub fn decode(
    op_flags: u32,
    start_sector: u64,
    nr_sectors: u32,
    geo: &Geometry,
) -> Result<Decoded, IoError> {
    let code = (op_flags & 0xff) as u8;
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    let op = match u32::from(code) {
        sys::UBLK_IO_OP_READ => Op::Read,
        sys::UBLK_IO_OP_WRITE => Op::Write,
        sys::UBLK_IO_OP_FLUSH => Op::Flush,
        sys::UBLK_IO_OP_DISCARD => Op::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        _ => return Err(IoError::UnsupportedOp(code)),
    };
    if op == Op::Flush {
        return Ok(Decoded { op, offset: 0, len: 0, fua: false });
    }
    let len = u64::from(nr_sectors) << 9;
    let offset = start_sector.checked_mul(512).ok_or(IoError::OutOfRange {
        offset: u64::MAX,
        len,
        size: geo.size_bytes,
    })?;
    let max = match op {
        Op::Read | Op::Write => geo.max_io_bytes,
        _ => geo.max_discard_bytes,
    };
    if len > u64::from(max) {
        return Err(IoError::TooLarge { len, max: u64::from(max) });
    }
    let bs = u64::from(geo.block_bytes);
    if len == 0 || offset % bs != 0 || len % bs != 0 {
        return Err(IoError::Misaligned { offset, len, block: geo.block_bytes });
    }
    match offset.checked_add(len) {
        Some(end) if end <= geo.size_bytes => {}
        _ => return Err(IoError::OutOfRange { offset, len, size: geo.size_bytes }),
    }
    let fua = fua && matches!(op, Op::Write | Op::WriteZeroes);
    // `len` fits: it is at most `max`, a u32.
    Ok(Decoded { op, offset, len: len as u32, fua })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            block_bytes: 4096,
            size_bytes: 1 << 30,
            max_io_bytes: 1 << 20,
            max_discard_bytes: 64 << 20,
            volatile_cache: true,
        }
    }

    const SECTORS_PER_BLOCK: u32 = 8;

    #[test]
    fn decodes_reads_writes_and_flags() {
        let g = geo();
        let w = decode(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 16, 2 * SECTORS_PER_BLOCK, &g);
        assert_eq!(w, Ok(Decoded { op: Op::Write, offset: 8192, len: 8192, fua: true }));
        let r = decode(sys::UBLK_IO_OP_READ | sys::UBLK_IO_F_FUA, 0, SECTORS_PER_BLOCK, &g);
        assert_eq!(r, Ok(Decoded { op: Op::Read, offset: 0, len: 4096, fua: false }));
        // A flush carries no range; whatever the fields say is ignored.
        let f = decode(sys::UBLK_IO_OP_FLUSH, u64::MAX, u32::MAX, &g);
        assert_eq!(f, Ok(Decoded { op: Op::Flush, offset: 0, len: 0, fua: false }));
        let z = decode(sys::UBLK_IO_OP_WRITE_ZEROES | sys::UBLK_IO_F_NOUNMAP, 8, 8, &g);
        assert_eq!(z, Ok(Decoded { op: Op::WriteZeroes, offset: 4096, len: 4096, fua: false }));
        let d = decode(sys::UBLK_IO_OP_DISCARD, 0, 64 << 11, &g);
        assert_eq!(d, Ok(Decoded { op: Op::Discard, offset: 0, len: 64 << 20, fua: false }));
    }

    #[test]
    fn last_block_is_in_range_and_the_next_is_not() {
        let g = geo();
        let last = (g.size_bytes >> 9) - u64::from(SECTORS_PER_BLOCK);
        assert!(decode(sys::UBLK_IO_OP_WRITE, last, SECTORS_PER_BLOCK, &g).is_ok());
        let past = decode(sys::UBLK_IO_OP_WRITE, last + 8, SECTORS_PER_BLOCK, &g);
        assert_eq!(
            past,
            Err(IoError::OutOfRange { offset: g.size_bytes, len: 4096, size: g.size_bytes })
        );
        // Straddling the end is out of range too.
        assert!(matches!(
            decode(sys::UBLK_IO_OP_READ, last, 2 * SECTORS_PER_BLOCK, &g),
            Err(IoError::OutOfRange { .. })
        ));
    }

    #[test]
    fn overflowing_sectors_are_rejected_not_wrapped() {
        let g = geo();
        for start in [u64::MAX, u64::MAX >> 9, (u64::MAX >> 9) - 7] {
            let e = decode(sys::UBLK_IO_OP_WRITE, start & !7, SECTORS_PER_BLOCK, &g);
            assert!(matches!(e, Err(IoError::OutOfRange { .. })), "{start}: {e:?}");
            assert_eq!(e.unwrap_err().errno(), libc::EINVAL);
        }
    }

    #[test]
    fn unknown_and_zoned_opcodes_are_unsupported() {
        let g = geo();
        for op in [sys::UBLK_IO_OP_WRITE_SAME, sys::UBLK_IO_OP_ZONE_APPEND, 0xff] {
            let e = decode(op, 0, 8, &g).unwrap_err();
            assert_eq!(e, IoError::UnsupportedOp(op as u8));
            assert_eq!(e.errno(), libc::EOPNOTSUPP);
        }
    }

    #[test]
    fn misaligned_empty_and_oversized_requests_are_invalid() {
        let g = geo();
        for (start, n) in [(1, 8), (0, 1), (0, 0), (4, 8)] {
            let e = decode(sys::UBLK_IO_OP_WRITE, start, n, &g).unwrap_err();
            assert!(matches!(e, IoError::Misaligned { .. }), "{start}+{n}: {e:?}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
        let big = decode(sys::UBLK_IO_OP_READ, 0, (1 << 11) + 8, &g).unwrap_err();
        assert_eq!(big, IoError::TooLarge { len: (1 << 20) + 4096, max: 1 << 20 });
        // Discards have their own, larger limit.
        assert!(decode(sys::UBLK_IO_OP_DISCARD, 0, 1 << 12, &g).is_ok());
        assert!(decode(sys::UBLK_IO_OP_DISCARD, 0, (64 << 11) + 8, &g).is_err());
    }

    #[test]
    fn every_error_has_an_errno() {
        let all = [
            IoError::UnsupportedOp(9),
            IoError::OutOfRange { offset: 0, len: 0, size: 0 },
            IoError::Misaligned { offset: 0, len: 0, block: 0 },
            IoError::TooLarge { len: 0, max: 0 },
            IoError::ShortRead { got: 0, want: 1 },
            IoError::Timeout("t".into()),
            IoError::Io("x".into()),
            IoError::Closed,
            IoError::Dropped,
        ];
        for e in all {
            assert!(e.errno() > 0, "{e}");
        }
    }

    #[test]
    fn geometry_validation_names_the_problem() {
        assert!(geo().validate().is_ok());
        let bad = Geometry { block_bytes: 3000, ..geo() };
        assert!(bad.validate().unwrap_err().contains("power of two"));
        let bad = Geometry { size_bytes: 4097, ..geo() };
        assert!(bad.validate().unwrap_err().contains("device size"));
        let bad = Geometry { max_io_bytes: 100, ..geo() };
        assert!(bad.validate().unwrap_err().contains("max I/O"));
    }
}
