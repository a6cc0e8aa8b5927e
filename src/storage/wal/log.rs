//! The logical log as records build it: which indices exist, where each lives, and what is purged.
//! Pure state shared by recovery (fed from disk) and the writer's physical position tracking.

use std::collections::VecDeque;

use crate::storage::state::LogId;

/// Where a durable entry record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLoc {
    pub seg_seq: u64,
    pub offset: u64,
    /// Header plus stored payload bytes.
    pub len: u32,
    pub term: u64,
}

/// The log state machine over records: entries must arrive at consecutive indices; a truncate
/// marker cuts the suffix; a purge marker drops the prefix.
#[derive(Clone, Debug, Default)]
pub struct LogBuilder {
    /// The index the next entry must have.
    pub next: u64,
    pub purged: Option<LogId>,
    /// Locations of entries `[next - entries.len(), next)`, all above the purge point.
    pub entries: VecDeque<DiskLoc>,
}

impl LogBuilder {
    /// A log whose next entry is `next`, with `purged` gone.
    pub fn new(next: u64, purged: Option<LogId>) -> Self {
        LogBuilder { next, purged, entries: VecDeque::new() }
    }

    /// The first index after the purge point.
    pub fn purged_next(&self) -> u64 {
        self.purged.map_or(0, |p| p.index + 1)
    }

    /// The first index held (equals `next` when empty).
    pub fn first(&self) -> u64 {
        self.next - self.entries.len() as u64
    }

    /// An entry record at `index`.
    pub fn entry(&mut self, index: u64, loc: DiskLoc) -> Result<(), String> {
        if index != self.next {
            return Err(format!("entry index {index} where {} was expected", self.next));
        }
        self.next += 1;
        if index >= self.purged_next() {
            self.entries.push_back(loc);
        }
        Ok(())
    }

    /// A truncate marker: entries at `from` and above are gone.
    pub fn truncate(&mut self, from: u64) -> Result<(), String> {
        if from > self.next {
            return Err(format!("truncate at {from} beyond the log end {}", self.next));
        }
        if from < self.purged_next() {
            return Err(format!("truncate at {from} below the purge point {}", self.purged_next()));
        }
        // A marker may name an index below the first held entry when the segments holding
        // [from, first) were purged since: nothing held remains then.
        let keep = from.saturating_sub(self.first()) as usize;
        self.entries.truncate(keep);
        self.next = from;
        Ok(())
    }

    /// A purge marker: entries at `upto.index` and below are gone.
    pub fn purge(&mut self, upto: LogId) {
        if self.purged.is_some_and(|p| p.index >= upto.index) {
            return;
        }
        self.purged = Some(upto);
        let drop = (upto.index + 1).saturating_sub(self.first()).min(self.entries.len() as u64);
        self.entries.drain(..drop as usize);
        if upto.index >= self.next {
            self.next = upto.index + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(i: u64) -> DiskLoc {
        DiskLoc { seg_seq: 1, offset: i, len: 48, term: 1 }
    }

    #[test]
    fn entries_truncate_purge() {
        let mut log = LogBuilder::new(0, None);
        for i in 0..10 {
            log.entry(i, loc(i)).expect("entry");
        }
        assert!(log.entry(11, loc(11)).is_err());
        log.truncate(7).expect("truncate");
        assert_eq!((log.first(), log.next), (0, 7));
        log.entry(7, loc(70)).expect("rewrite");
        log.purge(LogId { term: 1, node: 1, index: 3 });
        assert_eq!((log.first(), log.next), (4, 8));
        assert_eq!(log.entries[0], loc(4));
        assert!(log.truncate(2).is_err());
        // Entries [4, 8) held; a marker at 6 after purging through 5 in a later segment.
        let mut late = LogBuilder::new(10, Some(LogId { term: 1, node: 1, index: 3 }));
        late.truncate(6).expect("truncate below first");
        assert_eq!((late.first(), late.next, late.entries.len()), (6, 6, 0));
        log.purge(LogId { term: 2, node: 1, index: 20 });
        assert_eq!((log.first(), log.next, log.entries.len()), (21, 21, 0));
    }

    #[test]
    fn entries_below_purge_are_skipped_but_ordered() {
        let mut log = LogBuilder::new(5, Some(LogId { term: 1, node: 1, index: 6 }));
        log.entry(5, loc(5)).expect("5");
        log.entry(6, loc(6)).expect("6");
        log.entry(7, loc(7)).expect("7");
        assert_eq!((log.first(), log.next), (7, 8));
    }
}
