//! `AlignedBuf`: an owned, zero-initialised byte buffer whose address and length are multiples of
//! `IO_ALIGN`, as O_DIRECT and io_uring require. It owns its allocation; nothing else frees it.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::IO_ALIGN;

/// A heap buffer aligned to `IO_ALIGN` whose length is a multiple of `IO_ALIGN`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Vec<u8>); moving it across threads moves
// that ownership, and shared references only permit reads.
unsafe impl Send for AlignedBuf {}
// SAFETY: &AlignedBuf only gives out &[u8]; there is no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of at least `len` bytes, rounded up to a multiple of `IO_ALIGN`
    /// (never empty: a zero request gives one aligned unit).
    pub fn zeroed(len: usize) -> Self {
        let len = round_up(len.max(1), IO_ALIGN);
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len >= IO_ALIGN) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len }
    }

    /// A buffer holding `data` followed by zero padding up to the next multiple of `IO_ALIGN`.
    pub fn from_slice_padded(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf[..data.len()].copy_from_slice(data);
        buf
    }

    fn layout(len: usize) -> Layout {
        match Layout::from_size_align(len, IO_ALIGN) {
            Ok(layout) => layout,
            // Only reachable if len overflows isize, which allocation would refuse anyway.
            Err(_) => panic!("aligned buffer of {len} bytes exceeds the address space"),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised (zeroed at allocation) bytes for self's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        let mut copy = Self::zeroed(self.len);
        copy.copy_from_slice(self);
        copy
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two).
pub const fn round_up(value: usize, align: usize) -> usize {
    (value + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_padded() {
        let buf = AlignedBuf::from_slice_padded(b"abc");
        assert_eq!(buf.len(), IO_ALIGN);
        assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(&buf[..3], b"abc");
        assert!(buf[3..].iter().all(|&b| b == 0));
        assert_eq!(AlignedBuf::zeroed(IO_ALIGN + 1).len(), 2 * IO_ALIGN);
    }
}
