//! The memory of clean cached blocks: fixed-size frames carved from 1 MiB chunks that are
//! allocated as the cache fills and kept. A block entering or leaving the cache takes or returns
//! a frame, so a steady stream through a full cache allocates nothing, and the cache's memory is
//! its capacity in a few hundred allocations instead of one allocation (and allocator metadata)
//! per block. Pure bookkeeping, no I/O.

/// Bytes per chunk (at least one block).
const CHUNK_BYTES: usize = 1 << 20;

/// A frame: an index into the chunks, block-sized.
pub type Frame = u32;

#[derive(Debug)]
pub struct Frames {
    block_bytes: usize,
    /// Frames per chunk: a power of two, so a frame's place is a shift and a mask.
    per_chunk: usize,
    chunk_shift: u32,
    /// The most frames ever carved.
    limit: usize,
    carved: usize,
    chunks: Vec<Box<[u8]>>,
    free: Vec<Frame>,
}

impl Frames {
    /// Frames of `block_bytes`, at most `limit` of them.
    pub fn new(block_bytes: usize, limit: usize) -> Frames {
        let fit = (CHUNK_BYTES / block_bytes).max(1);
        let chunk_shift = fit.ilog2();
        let per_chunk = 1 << chunk_shift;
        Frames {
            block_bytes,
            per_chunk,
            chunk_shift,
            limit,
            carved: 0,
            chunks: Vec::new(),
            free: Vec::new(),
        }
    }

    /// A free frame, carving a new chunk when none is free and the limit allows; None when every
    /// frame is in use.
    pub fn take(&mut self) -> Option<Frame> {
        if self.free.is_empty() && self.carved < self.limit {
            let n = self.per_chunk.min(self.limit - self.carved);
            self.chunks.push(vec![0u8; n * self.block_bytes].into_boxed_slice());
            // Handed out lowest first.
            self.free.extend((self.carved..self.carved + n).rev().map(|f| f as Frame));
            self.carved += n;
        }
        self.free.pop()
    }

    /// Returns a frame taken before.
    pub fn release(&mut self, frame: Frame) {
        debug_assert!((frame as usize) < self.carved);
        self.free.push(frame);
    }

    pub fn get(&self, frame: Frame) -> &[u8] {
        let (chunk, at) = self.place(frame);
        &self.chunks[chunk][at..at + self.block_bytes]
    }

    pub fn get_mut(&mut self, frame: Frame) -> &mut [u8] {
        let (chunk, at) = self.place(frame);
        &mut self.chunks[chunk][at..at + self.block_bytes]
    }

    fn place(&self, frame: Frame) -> (usize, usize) {
        let f = frame as usize;
        (f >> self.chunk_shift, (f & (self.per_chunk - 1)) * self.block_bytes)
    }

    /// Bytes of frames carved so far (in use or free).
    #[cfg(test)]
    pub fn carved_bytes(&self) -> usize {
        self.carved * self.block_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_distinct_reused_and_bounded() {
        // 3 frames per chunk (CHUNK_BYTES / block) would need a huge block; use the real chunk
        // size with a block of a third of it.
        let bs = CHUNK_BYTES / 3;
        let mut f = Frames::new(bs, 5);
        let taken: Vec<Frame> = (0..5).map(|_| f.take().expect("frame")).collect();
        assert_eq!(taken, [0, 1, 2, 3, 4]);
        assert_eq!(f.take(), None, "the limit holds");
        assert_eq!(f.carved_bytes(), 5 * bs);
        for (i, &fr) in taken.iter().enumerate() {
            f.get_mut(fr).fill(i as u8 + 1);
        }
        for (i, &fr) in taken.iter().enumerate() {
            assert!(f.get(fr).iter().all(|&b| b == i as u8 + 1), "frame {fr} kept its bytes");
        }
        f.release(3);
        assert_eq!(f.take(), Some(3));
        assert_eq!(f.carved_bytes(), 5 * bs, "reuse carves nothing");
    }
}
