//! The hot cache: the device's recent and hot blocks in memory, bounded in bytes.
//!
//! Three kinds of entry, one per block at most:
//! - **pinned**: the newest write (or discard) of the block is not committed yet.
//!   Reads must see it, and the replicas' images may not hold it, so it is never evicted; it
//!   becomes clean when its write is confirmed (`unpin`), and a discard's entry is dropped then.
//! - **clean**: the block as the images hold it, evictable in S3-FIFO order (`policy.rs`).
//! - **filling**: a reader missed and is reading the block from a replica. The entry holds only a
//!   token; a write or discard of the block replaces it, and the reader's fill lands only if its
//!   token is still there, so a fill can never cache a block older than a write that overtook it.
//!
//! Pending discards are kept as ranges too, so a block under a discard that is not committed yet
//! reads as zeros even when no entry for it exists (the replica read would still see old data).
//!
//! Pinned blocks are not counted against eviction: `Device` bounds them by making writers wait
//! (`pin_limit_bytes`), and clean blocks are evicted until pinned + clean fit the capacity.
//! Pure logic: no I/O, no locks, no clock; the device holds it under its lock.

mod frames;
pub mod policy;

use std::collections::BTreeMap;
use std::hash::{BuildHasherDefault, Hasher};

use bytes::Bytes;

use frames::{Frame, Frames};

pub use policy::S3Fifo;

/// Default hot cache size: room for the write pipeline's pinned blocks (64 MiB at most) and a
/// recent tail of the WAL, which a WAL's readers (a walsender, an archiver, recovery) read
/// back soon after it was written.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;
/// The smallest cache accepted: two of the largest proposals must fit pinned.
pub const MIN_CACHE_BYTES: u64 = 16 << 20;
/// Default read-ahead window for sequential readers.
pub const DEFAULT_READAHEAD_BYTES: u64 = 2 << 20;

/// A hasher for block numbers: the splitmix64 finaliser, a few cycles against SipHash's
/// twenty-odd nanoseconds, which on a 1 MiB cache hit (256 blocks, two lookups each) was a
/// fifth of the time. Keys are block numbers the frontend has range-checked, not input an
/// attacker chooses freely, and a skewed set of them still spreads evenly.
#[derive(Default, Clone, Copy, Debug)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)) ^ (self.0 >> 56);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

/// A map keyed by block number.
pub type BlockMap<V> = std::collections::HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

#[derive(Debug)]
enum Slot {
    /// A slice of the write's own buffer (shared with the proposal in flight); copied into a
    /// frame when it becomes clean, so clean blocks never keep a larger write alive.
    Pinned {
        seq: u64,
        /// Boxed: `Bytes` is four words, and the block map's every bucket is as large as its
        /// largest entry (this keeps a bucket at 32 bytes instead of 56).
        data: Option<Box<Bytes>>,
    },
    Clean(Frame),
    Filling(u64),
}

// One entry per cached block lives in the block map: keep it three words.
const _: () = assert!(std::mem::size_of::<Slot>() <= 24);

/// Counters and sizes, for `xdevice status` and the benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub capacity_bytes: u64,
    /// Pinned and clean block bytes held.
    pub resident_bytes: u64,
    pub pinned_bytes: u64,
    /// Blocks answered from memory, and blocks read from a replica.
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Blocks brought in by read-ahead.
    pub readahead_blocks: u64,
}

impl CacheStats {
    /// Hits over all block reads, 0 before the first read.
    pub fn hit_ratio(&self) -> f64 {
        let all = self.hits + self.misses;
        if all == 0 {
            0.0
        } else {
            self.hits as f64 / all as f64
        }
    }
}

/// A read's view of one block.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Copied into the caller's buffer.
    Hit,
    /// Not held: read it from a replica and `complete_fill` with this token.
    Fill(u64),
    /// Not held and another reader is filling it: read it from a replica, do not fill.
    Miss,
}

/// The block cache of one device.
#[derive(Debug)]
pub struct HotCache {
    block_bytes: usize,
    capacity_blocks: usize,
    slots: BlockMap<Slot>,
    policy: S3Fifo,
    /// Clean blocks' bytes.
    frames: Frames,
    /// Pinned entries holding data (a pinned discard holds none).
    pinned_data: usize,
    /// Discards not yet confirmed: seq → (first block, blocks).
    zeroing: BTreeMap<u64, (u64, u64)>,
    next_token: u64,
    stats: CacheStats,
}

impl HotCache {
    /// A cache of `capacity_bytes` (rounded down to whole blocks, at least one).
    pub fn new(capacity_bytes: u64, block_bytes: u32) -> HotCache {
        let capacity_blocks = (capacity_bytes / u64::from(block_bytes)).max(1) as usize;
        HotCache {
            block_bytes: block_bytes as usize,
            capacity_blocks,
            slots: BlockMap::default(),
            policy: S3Fifo::new(capacity_blocks),
            frames: Frames::new(block_bytes as usize, capacity_blocks),
            pinned_data: 0,
            zeroing: BTreeMap::new(),
            next_token: 1,
            stats: CacheStats {
                capacity_bytes: capacity_blocks as u64 * u64::from(block_bytes),
                ..CacheStats::default()
            },
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.stats.capacity_bytes
    }

    pub fn pinned_bytes(&self) -> u64 {
        (self.pinned_data * self.block_bytes) as u64
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            resident_bytes: ((self.pinned_data + self.policy.len()) * self.block_bytes) as u64,
            pinned_bytes: self.pinned_bytes(),
            ..self.stats
        }
    }

    /// Pinned entries (with or without data): blocks whose newest write is unconfirmed.
    pub fn pinned_blocks(&self) -> usize {
        self.slots.values().filter(|s| matches!(s, Slot::Pinned { .. })).count()
    }

    /// Pins the blocks of write `seq` at `lba` (`data` is whole blocks), without copying them.
    pub fn pin_write(&mut self, seq: u64, lba: u64, data: &Bytes) {
        let bs = self.block_bytes;
        for i in 0..data.len() / bs {
            self.pin(lba + i as u64, seq, Some(Box::new(data.slice(i * bs..(i + 1) * bs))));
        }
        self.evict_to_fit();
    }

    /// Pins discard `seq` of `[lba, +blocks)`: every block in it reads as zeros from now on.
    pub fn pin_zero(&mut self, seq: u64, lba: u64, blocks: u64) {
        self.zeroing.insert(seq, (lba, blocks));
        // Entries in the range are superseded.
        for b in self.held_in(lba, blocks, |_| true) {
            match self.slots.get(&b) {
                Some(Slot::Pinned { .. }) => self.pin(b, seq, None),
                _ => self.drop_block(b),
            }
        }
    }

    /// The blocks of `[lba, +blocks)` with an entry `keep` accepts. A range larger than the
    /// cache is answered by walking the cache instead of the range.
    fn held_in(&self, lba: u64, blocks: u64, keep: impl Fn(&Slot) -> bool) -> Vec<u64> {
        let range = lba..lba + blocks;
        if blocks as usize > self.slots.len() {
            self.slots
                .iter()
                .filter(|(b, s)| range.contains(*b) && keep(s))
                .map(|(b, _)| *b)
                .collect()
        } else {
            range.filter(|b| self.slots.get(b).is_some_and(&keep)).collect()
        }
    }

    fn pin(&mut self, block: u64, seq: u64, data: Option<Box<Bytes>>) {
        let has_data = data.is_some();
        let old = self.slots.insert(block, Slot::Pinned { seq, data });
        self.release(block, old);
        if has_data {
            self.pinned_data += 1;
        }
    }

    fn drop_block(&mut self, block: u64) {
        let old = self.slots.remove(&block);
        self.release(block, old);
    }

    /// Accounts for `old`, the entry block `block` no longer has.
    fn release(&mut self, block: u64, old: Option<Slot>) {
        match old {
            Some(Slot::Clean(frame)) => {
                self.policy.remove(block);
                self.frames.release(frame);
            }
            Some(Slot::Pinned { data: Some(_), .. }) => self.pinned_data -= 1,
            _ => {}
        }
    }

    /// Whether `block` lies under a discard not yet confirmed.
    fn zeroing(&self, block: u64) -> bool {
        self.zeroing.values().any(|&(lba, n)| (lba..lba + n).contains(&block))
    }

    /// Write `seq` of `blocks` blocks at `lba` is committed, and so is every write
    /// before it: its blocks (those not rewritten since) become clean.
    pub fn unpin_write(&mut self, seq: u64, lba: u64, blocks: u64) {
        for b in lba..lba + blocks {
            if let Some(Slot::Pinned { seq: s, data }) = self.slots.get_mut(&b) {
                if *s == seq {
                    match data.take() {
                        Some(d) => {
                            self.pinned_data -= 1;
                            self.slots.remove(&b);
                            self.insert_clean(b, &d);
                        }
                        None => {
                            self.slots.remove(&b);
                        }
                    }
                }
            }
        }
        self.evict_to_fit();
    }

    /// Discard `seq` is committed: its entries are dropped, and the images read zeros there
    /// without I/O once they applied it (a read that goes to an image waits for that).
    pub fn unpin_zero(&mut self, seq: u64, lba: u64, blocks: u64) {
        self.zeroing.remove(&seq);
        let mine = |s: &Slot| matches!(s, Slot::Pinned { seq: s, data: None } if *s == seq);
        for b in self.held_in(lba, blocks, mine) {
            self.slots.remove(&b);
        }
    }

    /// Answers block `block` into `out` (one block) if it is held, else says how to fill it.
    pub fn lookup(&mut self, block: u64, out: &mut [u8]) -> Lookup {
        match self.slots.get(&block) {
            Some(Slot::Pinned { data: Some(d), .. }) => out.copy_from_slice(d),
            Some(Slot::Clean(frame)) => out.copy_from_slice(self.frames.get(*frame)),
            Some(Slot::Pinned { data: None, .. }) => out.fill(0),
            None if self.zeroing(block) => out.fill(0),
            Some(Slot::Filling(_)) => {
                self.stats.misses += 1;
                return Lookup::Miss;
            }
            None => {
                self.stats.misses += 1;
                return Lookup::Fill(self.begin_fill(block));
            }
        }
        // A hit; only clean blocks are tracked by the policy (touching others does nothing).
        self.policy.touch(block);
        self.stats.hits += 1;
        Lookup::Hit
    }

    /// Whether a read of `block` is answered from memory now (its data, or zeros of a discard),
    /// not from a replica or a fill in progress.
    pub fn holds_data(&self, block: u64) -> bool {
        match self.slots.get(&block) {
            Some(Slot::Filling(_)) => false,
            Some(_) => true,
            None => self.zeroing(block),
        }
    }

    /// Whether block `block` is held or being filled (read-ahead skips those).
    pub fn holds(&self, block: u64) -> bool {
        self.slots.contains_key(&block) || self.zeroing(block)
    }

    /// Reserves `block` for a fill by a reader (or read-ahead) that will read it from a replica.
    pub fn begin_fill(&mut self, block: u64) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        let old = self.slots.insert(block, Slot::Filling(token));
        self.release(block, old);
        token
    }

    /// Lands a fill: `data` is block `block` as a replica held it when read. Ignored if a write
    /// or discard replaced the reservation meanwhile. Zero blocks are not kept (they read
    /// without I/O); `readahead` counts the block as read-ahead.
    pub fn complete_fill(&mut self, block: u64, token: u64, data: &[u8], readahead: bool) {
        if !matches!(self.slots.get(&block), Some(Slot::Filling(t)) if *t == token) {
            return;
        }
        if data.iter().all(|&b| b == 0) {
            self.slots.remove(&block);
            return;
        }
        self.slots.remove(&block);
        self.insert_clean(block, data);
        if readahead {
            self.stats.readahead_blocks += 1;
        }
        self.evict_to_fit();
    }

    /// Gives up a reservation (the replica read failed).
    pub fn abort_fill(&mut self, block: u64, token: u64) {
        if matches!(self.slots.get(&block), Some(Slot::Filling(t)) if *t == token) {
            self.slots.remove(&block);
        }
    }

    /// Makes `block` (which has no entry) a clean block holding `data`, in a free frame or
    /// the frame of the block evicted for it. With no frame to be had (every clean block's frame
    /// is in use and nothing is evictable, which the capacity rules out) it is not cached.
    fn insert_clean(&mut self, block: u64, data: &[u8]) {
        let frame = match self.frames.take() {
            Some(frame) => frame,
            None => {
                let Some(victim) = self.policy.evict() else { return };
                self.evicted(victim);
                let Some(frame) = self.frames.take() else { return };
                frame
            }
        };
        self.frames.get_mut(frame).copy_from_slice(data);
        self.slots.insert(block, Slot::Clean(frame));
        self.policy.insert(block);
    }

    /// Drops the entry of `victim`, which the policy just evicted.
    fn evicted(&mut self, victim: u64) {
        if let Some(Slot::Clean(frame)) = self.slots.remove(&victim) {
            self.frames.release(frame);
        }
        self.stats.evictions += 1;
    }

    /// Evicts clean blocks until pinned and clean blocks fit the capacity.
    fn evict_to_fit(&mut self) {
        while self.pinned_data + self.policy.len() > self.capacity_blocks {
            let Some(victim) = self.policy.evict() else { break };
            self.evicted(victim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 16;

    fn block(fill: u8) -> Vec<u8> {
        vec![fill; BS]
    }

    fn read(c: &mut HotCache, b: u64) -> Option<Vec<u8>> {
        let mut out = vec![0xEE; BS];
        match c.lookup(b, &mut out) {
            Lookup::Hit => Some(out),
            Lookup::Fill(t) => {
                c.abort_fill(b, t);
                None
            }
            Lookup::Miss => None,
        }
    }

    #[test]
    fn pinned_blocks_survive_any_eviction_pressure() {
        let mut c = HotCache::new(8 * BS as u64, BS as u32);
        c.pin_write(1, 100, &Bytes::from([block(1), block(2)].concat()));
        // Fill far more clean blocks than fit.
        for b in 1000..2000u64 {
            let Lookup::Fill(t) = c.lookup(b, &mut [0; BS]) else { panic!("block {b} held") };
            c.complete_fill(b, t, &block(9), false);
            assert!(c.stats().resident_bytes <= 8 * BS as u64);
        }
        assert_eq!(read(&mut c, 100), Some(block(1)));
        assert_eq!(read(&mut c, 101), Some(block(2)));
        assert_eq!(c.pinned_bytes(), 2 * BS as u64);
        assert!(c.stats().evictions >= 990);
        // Once confirmed they are ordinary clean blocks, evictable.
        c.unpin_write(1, 100, 2);
        assert_eq!(c.pinned_bytes(), 0);
        for b in 3000..3100u64 {
            let Lookup::Fill(t) = c.lookup(b, &mut [0; BS]) else { panic!() };
            c.complete_fill(b, t, &block(9), false);
        }
        assert_eq!(read(&mut c, 100), None);
    }

    #[test]
    fn pinned_blocks_beyond_capacity_evict_every_clean_block_but_stay() {
        let mut c = HotCache::new(4 * BS as u64, BS as u32);
        let Lookup::Fill(t) = c.lookup(0, &mut [0; BS]) else { panic!() };
        c.complete_fill(0, t, &block(5), false);
        c.pin_write(1, 10, &Bytes::from(vec![1u8; 6 * BS]));
        assert_eq!(read(&mut c, 0), None, "the clean block made room");
        for b in 10..16 {
            assert_eq!(read(&mut c, b), Some(block(1)));
        }
    }

    #[test]
    fn unpinning_more_blocks_than_frames_keeps_the_newest_with_their_own_bytes() {
        let mut c = HotCache::new(4 * BS as u64, BS as u32);
        let data: Vec<u8> = (1..=6u8).flat_map(block).collect();
        c.pin_write(1, 10, &Bytes::from(data));
        c.unpin_write(1, 10, 6);
        assert_eq!(c.pinned_bytes(), 0);
        assert_eq!(c.stats().resident_bytes, 4 * BS as u64);
        let held: Vec<u64> = (10..16).filter(|&b| c.holds(b)).collect();
        assert_eq!(held, [12, 13, 14, 15], "the oldest two gave their frames up");
        for b in held {
            assert_eq!(read(&mut c, b), Some(block((b - 9) as u8)), "block {b}");
        }
        assert_eq!(c.frames.carved_bytes(), 4 * BS, "no frame beyond the capacity");
        // Dropped and refilled blocks reuse frames without mixing bytes.
        c.pin_write(2, 13, &Bytes::from(block(9)));
        c.unpin_write(2, 13, 1);
        assert_eq!(read(&mut c, 13), Some(block(9)));
        assert_eq!(read(&mut c, 14), Some(block(5)));
        assert_eq!(c.frames.carved_bytes(), 4 * BS);
    }

    #[test]
    fn a_newer_write_wins_over_an_older_unpin() {
        let mut c = HotCache::new(64 * BS as u64, BS as u32);
        c.pin_write(1, 5, &Bytes::from(block(1)));
        c.pin_write(2, 5, &Bytes::from(block(2)));
        c.unpin_write(1, 5, 1);
        assert_eq!(read(&mut c, 5), Some(block(2)));
        assert_eq!(c.pinned_bytes(), BS as u64, "still pinned by write 2");
        c.unpin_write(2, 5, 1);
        assert_eq!(c.pinned_bytes(), 0);
        assert_eq!(read(&mut c, 5), Some(block(2)), "clean now, still held");
    }

    #[test]
    fn a_fill_overtaken_by_a_write_is_dropped() {
        let mut c = HotCache::new(64 * BS as u64, BS as u32);
        let Lookup::Fill(t) = c.lookup(3, &mut [0; BS]) else { panic!() };
        // A write lands and is confirmed while the reader is at the replica.
        c.pin_write(1, 3, &Bytes::from(block(7)));
        c.unpin_write(1, 3, 1);
        c.complete_fill(3, t, &block(6), false);
        assert_eq!(read(&mut c, 3), Some(block(7)));
        // Also when the written block was evicted before the stale fill lands.
        let Lookup::Fill(t) = c.lookup(4, &mut [0; BS]) else { panic!() };
        c.pin_write(2, 4, &Bytes::from(block(8)));
        c.unpin_write(2, 4, 1);
        c.pin_zero(3, 4, 1);
        c.unpin_zero(3, 4, 1);
        c.complete_fill(4, t, &block(6), false);
        assert_eq!(read(&mut c, 4), None, "not held: the stale fill did not land");
    }

    #[test]
    fn a_second_reader_of_a_filling_block_misses_without_a_token() {
        let mut c = HotCache::new(64 * BS as u64, BS as u32);
        let Lookup::Fill(t) = c.lookup(3, &mut [0; BS]) else { panic!() };
        assert_eq!(c.lookup(3, &mut [0; BS]), Lookup::Miss);
        c.complete_fill(3, t, &block(4), false);
        assert_eq!(read(&mut c, 3), Some(block(4)));
        assert_eq!(c.stats().misses, 2);
        assert_eq!(c.stats().hits, 1);
    }

    #[test]
    fn discard_reads_zeros_until_confirmed_and_drops_blocks() {
        let mut c = HotCache::new(64 * BS as u64, BS as u32);
        c.pin_write(1, 0, &Bytes::from(vec![1u8; 4 * BS]));
        c.unpin_write(1, 0, 4);
        c.pin_write(2, 2, &Bytes::from(block(2)));
        c.pin_zero(3, 1, 100);
        for b in [1, 2, 3, 50] {
            assert_eq!(read(&mut c, b), Some(block(0)), "block {b} under a pending discard");
        }
        assert_eq!(read(&mut c, 0), Some(block(1)));
        // A write after the discard is newer.
        c.pin_write(4, 50, &Bytes::from(block(4)));
        assert_eq!(read(&mut c, 50), Some(block(4)));
        c.unpin_write(2, 2, 1);
        assert_eq!(read(&mut c, 2), Some(block(0)), "write 2 was superseded by the discard");
        c.unpin_zero(3, 1, 100);
        for b in [1, 2, 3] {
            assert_eq!(read(&mut c, b), None, "block {b} dropped: the images read zeros");
        }
        assert_eq!(read(&mut c, 50), Some(block(4)));
        assert_eq!(c.pinned_bytes(), BS as u64);
    }

    #[test]
    fn a_discard_larger_than_the_cache_walks_the_cache() {
        let mut c = HotCache::new(64 * BS as u64, BS as u32);
        c.pin_write(1, 7, &Bytes::from(block(1)));
        c.unpin_write(1, 7, 1);
        c.pin_zero(2, 0, u64::from(u32::MAX));
        assert_eq!(read(&mut c, 7), Some(block(0)));
        c.unpin_zero(2, 0, u64::from(u32::MAX));
        assert_eq!(read(&mut c, 7), None);
        assert_eq!(c.stats().resident_bytes, 0);
    }

    #[test]
    fn zero_fills_are_not_kept() {
        let mut c = HotCache::new(64 * BS as u64, BS as u32);
        let Lookup::Fill(t) = c.lookup(3, &mut [0; BS]) else { panic!() };
        c.complete_fill(3, t, &block(0), true);
        assert_eq!(c.stats().resident_bytes, 0);
        assert_eq!(c.stats().readahead_blocks, 0);
        assert!(!c.holds(3));
    }
}
