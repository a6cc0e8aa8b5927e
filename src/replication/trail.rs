//! The leader's record of when its recent log entries were appended and how many bytes they
//! hold, so replication lag can be told in bytes and seconds as well as entries. One mark per
//! appended batch (not per entry), at most `MARKS` of them: a follower further behind than the
//! oldest mark is reported at least that far behind.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

/// Batches remembered: enough for seconds of a busy log.
const MARKS: usize = 8192;

#[derive(Clone, Copy, Debug)]
struct Mark {
    /// The batch's last index.
    last: u64,
    at: Instant,
    /// Entry bytes appended up to and including this batch.
    bytes: u64,
}

/// How far a follower is behind the leader's log.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Lag {
    pub entries: u64,
    pub bytes: u64,
    /// Since the oldest entry the follower lacks was appended on the leader; 0 when it lacks
    /// nothing.
    pub seconds: f64,
}

#[derive(Debug, Default)]
pub struct AppendTrail {
    marks: Mutex<VecDeque<Mark>>,
}

impl AppendTrail {
    /// A batch ending at index `last` holding `bytes` of entries was appended now.
    pub fn appended(&self, last: u64, bytes: u64) {
        let mut marks = self.lock();
        // A re-append after a truncation replaces the marks it overwrote.
        while marks.back().is_some_and(|m| m.last >= last) {
            marks.pop_back();
        }
        let total = marks.back().map_or(0, |m| m.bytes) + bytes;
        if marks.len() == MARKS {
            marks.pop_front();
        }
        marks.push_back(Mark { last, at: Instant::now(), bytes: total });
    }

    /// Entries from `from` on were removed.
    pub fn truncated(&self, from: u64) {
        let mut marks = self.lock();
        while marks.back().is_some_and(|m| m.last >= from) {
            marks.pop_back();
        }
    }

    /// How far behind `last` (the leader's last index) a follower holding up to `matched` is.
    pub fn lag(&self, matched: Option<u64>, last: u64) -> Lag {
        self.lag_at(matched, last, Instant::now())
    }

    fn lag_at(&self, matched: Option<u64>, last: u64, now: Instant) -> Lag {
        let held = matched.unwrap_or(0);
        let entries = last.saturating_sub(held);
        if entries == 0 && matched.is_some() {
            return Lag::default();
        }
        let marks = self.lock();
        let Some(newest) = marks.back() else {
            return Lag { entries, ..Lag::default() };
        };
        // The first batch holding an entry the follower lacks, and the bytes before it.
        let first_missing = marks.partition_point(|m| matched.is_some_and(|h| m.last <= h));
        let before = match first_missing {
            0 => 0,
            i => marks[i - 1].bytes,
        };
        let oldest_missing = marks.get(first_missing).unwrap_or(newest);
        Lag {
            entries,
            bytes: newest.bytes - before,
            seconds: now.saturating_duration_since(oldest_missing.at).as_secs_f64(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Mark>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lag_counts_bytes_and_time_of_what_the_follower_lacks() {
        let t = AppendTrail::default();
        t.appended(3, 300); // entries 1..=3
        t.appended(5, 200); // 4..=5
        t.appended(9, 400); // 6..=9
        let now = Instant::now() + Duration::from_secs(2);
        assert_eq!(t.lag_at(Some(9), 9, now), Lag::default());
        let l = t.lag_at(Some(5), 9, now);
        assert_eq!((l.entries, l.bytes), (4, 400));
        assert!(l.seconds >= 2.0, "{l:?}");
        let l = t.lag_at(Some(3), 9, now);
        assert_eq!((l.entries, l.bytes), (6, 600));
        let l = t.lag_at(None, 9, now);
        assert_eq!((l.entries, l.bytes), (9, 900));
        // Inside a batch: counted from the batch's start.
        let l = t.lag_at(Some(4), 9, now);
        assert_eq!((l.entries, l.bytes), (5, 600));
    }

    #[test]
    fn truncation_and_reappend_replace_marks() {
        let t = AppendTrail::default();
        t.appended(3, 300);
        t.appended(6, 300);
        t.truncated(5);
        t.appended(5, 50);
        let l = t.lag_at(Some(3), 5, Instant::now());
        assert_eq!((l.entries, l.bytes), (2, 50));
    }

    #[test]
    fn the_window_is_bounded() {
        let t = AppendTrail::default();
        for i in 1..=(MARKS as u64 + 10) {
            t.appended(i, 1);
        }
        assert_eq!(t.lock().len(), MARKS);
        // Further behind than the oldest mark: at least what the marks hold.
        let l = t.lag_at(Some(1), MARKS as u64 + 10, Instant::now());
        assert_eq!(l.entries, MARKS as u64 + 9);
        assert!(l.bytes >= MARKS as u64 - 1);
    }
}
