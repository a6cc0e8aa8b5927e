//! Little-endian field access for fixed on-disk structures (superblock, segment header, state and
//! image slots). Offsets are compile-time constants of each format, so out-of-range access is a
//! programming error caught by the format's own tests.

/// Reads a `u32` at `offset`.
pub fn u32_at(buf: &[u8], offset: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_le_bytes(b)
}

/// Reads a `u64` at `offset`.
pub fn u64_at(buf: &[u8], offset: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_le_bytes(b)
}

/// Writes a `u32` at `offset`.
pub fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// Writes a `u64` at `offset`.
pub fn put_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

/// Stores the crc32c of `buf[..at]` at `buf[at..at + 4]`.
pub fn seal(buf: &mut [u8], at: usize) {
    let crc = crc32c::crc32c(&buf[..at]);
    put_u32(buf, at, crc);
}

/// Whether `buf[at..at + 4]` holds the crc32c of `buf[..at]`.
pub fn sealed(buf: &[u8], at: usize) -> bool {
    crc32c::crc32c(&buf[..at]) == u32_at(buf, at)
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
