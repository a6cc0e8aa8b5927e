//! S3-FIFO eviction (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023)
//! over block numbers. Pure logic: no data, no I/O, no clock.
//!
//! Why S3-FIFO: a WAL device's writes are one long sequential stream, mostly never read again,
//! while its reads (a replica or archiver re-reading a recent segment, a file system's metadata)
//! are a small hot set. LRU lets the stream flush the hot set; S3-FIFO admits every new block to
//! a small FIFO (a tenth of the cache) and promotes to the main FIFO only the blocks read again
//! while there, so a scan passes through the small queue and leaves the main one alone. Against
//! CLOCK-Pro and ARC it needs no tuning and no list surgery on a hit (a hit only bumps a 2-bit
//! counter), and against SIEVE it adds the ghost queue that lets a block evicted too early come
//! back straight into the main queue.
//!
//! - insert: into main if the block is in the ghost queue, else into small; frequency 0.
//! - hit: frequency + 1, saturating at 3.
//! - evict: from small while it holds more than its share (or main is empty): the oldest block
//!   moves to main if it was hit since insertion, else it leaves and its number goes to the
//!   ghost queue. From main: the oldest block is re-queued with frequency - 1 if it was hit,
//!   else it leaves.
//!
//! Queues hold `(block, generation)`; a removed or moved block leaves a stale item behind that is
//! skipped when it reaches the front, and queues are compacted when stale items dominate.

use std::collections::VecDeque;

use super::BlockMap;

const MAX_FREQ: u8 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    generation: u32,
    freq: u8,
    queue: Queue,
}

/// The eviction order of the clean blocks of a cache holding at most `capacity` blocks.
#[derive(Debug)]
pub struct S3Fifo {
    small_target: usize,
    ghost_capacity: usize,
    entries: BlockMap<Meta>,
    small: VecDeque<(u64, u32)>,
    main: VecDeque<(u64, u32)>,
    small_len: usize,
    main_len: usize,
    ghost: VecDeque<u64>,
    ghost_count: BlockMap<u32>,
    generation: u32,
}

impl S3Fifo {
    /// An empty policy for a cache of `capacity` blocks.
    pub fn new(capacity: usize) -> S3Fifo {
        S3Fifo {
            small_target: (capacity / 10).max(1),
            ghost_capacity: capacity.max(1),
            entries: BlockMap::default(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_len: 0,
            main_len: 0,
            ghost: VecDeque::new(),
            ghost_count: BlockMap::default(),
            generation: 0,
        }
    }

    /// Blocks tracked (each one evictable).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, block: u64) -> bool {
        self.entries.contains_key(&block)
    }

    /// Blocks in the small (probationary) and main queues.
    pub fn queue_lens(&self) -> (usize, usize) {
        (self.small_len, self.main_len)
    }

    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        self.generation
    }

    /// Starts tracking `block` (a hit if it is already tracked).
    pub fn insert(&mut self, block: u64) {
        if self.touch(block) {
            return;
        }
        let generation = self.next_generation();
        let queue = if self.ghost_count.contains_key(&block) { Queue::Main } else { Queue::Small };
        self.entries.insert(block, Meta { generation, freq: 0, queue });
        self.push(queue, block, generation);
    }

    /// Records a hit; false if `block` is not tracked.
    pub fn touch(&mut self, block: u64) -> bool {
        match self.entries.get_mut(&block) {
            Some(m) => {
                m.freq = (m.freq + 1).min(MAX_FREQ);
                true
            }
            None => false,
        }
    }

    /// Stops tracking `block` (rewritten, discarded); true if it was tracked. A block that had
    /// earned its place (in main, or hit) is remembered in the ghost queue, so when it becomes
    /// clean again it goes straight back to main.
    pub fn remove(&mut self, block: u64) -> bool {
        let Some(m) = self.entries.remove(&block) else { return false };
        match m.queue {
            Queue::Small => self.small_len -= 1,
            Queue::Main => self.main_len -= 1,
        }
        if m.queue == Queue::Main || m.freq > 0 {
            self.remember(block);
        }
        self.compact();
        true
    }

    /// Chooses the next block to evict and stops tracking it; None when nothing is tracked.
    pub fn evict(&mut self) -> Option<u64> {
        while !self.entries.is_empty() {
            let victim = if self.small_len > self.small_target || self.main_len == 0 {
                self.evict_small()
            } else {
                self.evict_main()
            };
            if victim.is_some() {
                self.compact();
                return victim;
            }
        }
        None
    }

    fn push(&mut self, queue: Queue, block: u64, generation: u32) {
        match queue {
            Queue::Small => {
                self.small.push_back((block, generation));
                self.small_len += 1;
            }
            Queue::Main => {
                self.main.push_back((block, generation));
                self.main_len += 1;
            }
        }
    }

    /// The front of `queue` if it is live, else pops stale items until one is.
    fn pop_live(&mut self, queue: Queue) -> Option<(u64, Meta)> {
        loop {
            let q = match queue {
                Queue::Small => &mut self.small,
                Queue::Main => &mut self.main,
            };
            let (block, generation) = q.pop_front()?;
            if let Some(m) = self.entries.get(&block) {
                if m.generation == generation && m.queue == queue {
                    match queue {
                        Queue::Small => self.small_len -= 1,
                        Queue::Main => self.main_len -= 1,
                    }
                    return Some((block, *m));
                }
            }
        }
    }

    /// One step from the small queue: a victim, or None if the block moved to main.
    fn evict_small(&mut self) -> Option<u64> {
        let (block, m) = self.pop_live(Queue::Small)?;
        if m.freq > 0 {
            let generation = self.next_generation();
            self.entries.insert(block, Meta { generation, freq: 0, queue: Queue::Main });
            self.push(Queue::Main, block, generation);
            None
        } else {
            self.entries.remove(&block);
            self.remember(block);
            Some(block)
        }
    }

    /// One step from the main queue: a victim, or None if the block was given another round.
    fn evict_main(&mut self) -> Option<u64> {
        let (block, m) = self.pop_live(Queue::Main)?;
        if m.freq > 0 {
            let generation = self.next_generation();
            self.entries.insert(block, Meta { generation, freq: m.freq - 1, queue: Queue::Main });
            self.push(Queue::Main, block, generation);
            None
        } else {
            self.entries.remove(&block);
            Some(block)
        }
    }

    fn remember(&mut self, block: u64) {
        self.ghost.push_back(block);
        *self.ghost_count.entry(block).or_default() += 1;
        while self.ghost.len() > self.ghost_capacity {
            let Some(old) = self.ghost.pop_front() else { break };
            if let Some(n) = self.ghost_count.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.ghost_count.remove(&old);
                }
            }
        }
    }

    /// Drops stale queue items once they outnumber the live ones, so the queues stay within a
    /// constant factor of the tracked blocks.
    fn compact(&mut self) {
        let entries = &self.entries;
        let live = |queue: Queue| {
            move |&(b, g): &(u64, u32)| {
                entries.get(&b).is_some_and(|m| m.generation == g && m.queue == queue)
            }
        };
        if self.small.len() > 2 * self.small_len + 64 {
            self.small.retain(live(Queue::Small));
        }
        if self.main.len() > 2 * self.main_len + 64 {
            self.main.retain(live(Queue::Main));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps a cache of `capacity` blocks: inserts on miss, evicts down to capacity.
    struct Sim {
        policy: S3Fifo,
        capacity: usize,
        hits: u64,
        misses: u64,
    }

    impl Sim {
        fn new(capacity: usize) -> Sim {
            Sim { policy: S3Fifo::new(capacity), capacity, hits: 0, misses: 0 }
        }

        fn access(&mut self, block: u64) {
            if self.policy.touch(block) {
                self.hits += 1;
                return;
            }
            self.misses += 1;
            self.policy.insert(block);
            while self.policy.len() > self.capacity {
                self.policy.evict().expect("something to evict");
            }
        }
    }

    #[test]
    fn evicts_in_fifo_order_without_hits() {
        let mut p = S3Fifo::new(10);
        for b in 0..5 {
            p.insert(b);
        }
        assert_eq!(p.evict(), Some(0));
        assert_eq!(p.evict(), Some(1));
        assert_eq!(p.len(), 3);
        assert!(!p.contains(0) && p.contains(2));
    }

    #[test]
    fn a_block_hit_in_small_moves_to_main_and_outlives_new_ones() {
        let mut p = S3Fifo::new(10);
        for b in 0..10 {
            p.insert(b);
        }
        assert!(p.touch(0));
        p.insert(10);
        // 0 is promoted rather than evicted; 1 goes.
        assert_eq!(p.evict(), Some(1));
        assert_eq!(p.queue_lens(), (9, 1));
        // Small is over its share of one block for as long as new blocks arrive: they go
        // first, oldest first, and 0 stays.
        for b in 11..100 {
            p.insert(b);
            assert_eq!(p.evict(), Some(b - 9));
        }
        assert!(p.contains(0));
    }

    #[test]
    fn main_gives_hit_blocks_another_round() {
        let mut p = S3Fifo::new(10);
        for b in [1, 2, 3] {
            p.insert(b);
            p.touch(b);
        }
        // All three go to main on the way out of small, then: 1 and 3 are hit again.
        for _ in 0..3 {
            assert_eq!(p.evict_small(), None);
        }
        p.touch(1);
        p.touch(3);
        assert_eq!(p.evict(), Some(2));
        assert_eq!(p.evict(), Some(1), "each hit bought one more round");
        assert_eq!(p.evict(), Some(3));
        assert_eq!(p.evict(), None);
    }

    #[test]
    fn a_ghost_comes_back_into_main() {
        let mut p = S3Fifo::new(10);
        p.insert(7);
        assert_eq!(p.evict(), Some(7));
        p.insert(7);
        assert_eq!(p.queue_lens(), (0, 1), "evicted from small, seen again: straight to main");
    }

    #[test]
    fn remove_forgets_the_block_and_stale_items_are_skipped() {
        let mut p = S3Fifo::new(4);
        for b in 0..4 {
            p.insert(b);
        }
        assert!(p.remove(0));
        assert!(!p.remove(0));
        assert!(!p.touch(0));
        assert_eq!(p.evict(), Some(1));
        // Inserting a tracked block is a hit: 2 moves to main, after which small is within its
        // share and main is evicted first.
        p.insert(2);
        assert_eq!(p.evict(), Some(2));
        assert_eq!(p.evict(), Some(3));
        assert!(p.is_empty());
        assert_eq!(p.evict(), None);
    }

    #[test]
    fn queues_stay_bounded_under_churn() {
        let mut p = S3Fifo::new(100);
        for round in 0..100_000u64 {
            p.insert(round % 150);
            if round % 3 == 0 {
                p.remove((round * 7) % 150);
            }
            while p.len() > 100 {
                p.evict();
            }
        }
        assert!(p.len() <= 100);
        assert!(p.small.len() + p.main.len() <= 3 * p.len() + 128);
        assert!(p.ghost.len() <= 100);
        assert_eq!(p.small_len + p.main_len, p.len());
    }

    #[test]
    fn a_sequential_scan_does_not_flush_the_hot_set() {
        // 100 blocks; a hot set of 50 read over and over, interleaved with a scan of 10,000
        // blocks never read again (a WAL being written).
        let mut sim = Sim::new(100);
        let mut scan = 1_000_000;
        for _ in 0..3 {
            for hot in 0..50 {
                sim.access(hot);
            }
        }
        sim.hits = 0;
        sim.misses = 0;
        for round in 0..10_000u64 {
            sim.access(round % 50);
            sim.access(scan);
            scan += 1;
        }
        // Every hot access hits after warm-up; the scan misses every time.
        assert_eq!(sim.hits, 10_000, "hot set evicted by the scan: {} misses", sim.misses);
    }

    #[test]
    fn eviction_always_finds_a_victim() {
        let mut p = S3Fifo::new(8);
        for b in 0..8 {
            p.insert(b);
            for _ in 0..5 {
                p.touch(b);
            }
        }
        let mut out = Vec::new();
        while let Some(b) = p.evict() {
            out.push(b);
        }
        out.sort_unstable();
        assert_eq!(out, (0..8).collect::<Vec<_>>());
    }
}
