//! The Raft log on the storage engine's WAL: openraft's `RaftLogStorage`.
//!
//! Entries are WAL records (index and term in the record header, the rest in the payload); the
//! vote and the committed log id live in the hard state. `append` hands openraft's flush callback
//! to the WAL, which calls it from the completion of the sync that covers the entries. A bounded
//! cache keeps the newest entries decoded, so replication to followers does not read back from
//! disk what it has just written.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::RaftLogReader;

use super::commits::CommitWatch;
use super::trail::AppendTrail;
use super::types::{
    decode_entry, encode_entry, from_store_log_id, from_store_vote, to_store_log_id, to_store_vote,
    Entry, LogId, TypeConfig, Vote,
};
use crate::storage::engine::Engine;
use crate::storage::state::LogId as StoreLogId;
use crate::storage::wal::NewEntry;

/// Default bound of the decoded-entry cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

fn entry_bytes(e: &Entry) -> usize {
    use crate::entry::BlockOp;
    use openraft::EntryPayload as P;
    64 + match &e.payload {
        P::Normal(req) => req
            .ops()
            .unwrap_or_default()
            .iter()
            .map(|op| if let BlockOp::Write { data, .. } = op { data.len() } else { 16 })
            .sum(),
        _ => 0,
    }
}

/// The newest entries, contiguous, oldest first.
#[derive(Debug, Default)]
struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
    limit: usize,
}

impl EntryCache {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.first()?;
        self.entries.get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    fn push(&mut self, e: Entry) {
        if self.entries.back().is_some_and(|b| b.log_id.index + 1 != e.log_id.index) {
            self.clear();
        }
        self.bytes += entry_bytes(&e);
        self.entries.push_back(e);
        while self.bytes > self.limit && self.entries.len() > 1 {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= entry_bytes(&old);
            }
        }
    }

    /// Drops entries at `from` and above.
    fn truncate(&mut self, from: u64) {
        while self.entries.back().is_some_and(|b| b.log_id.index >= from) {
            if let Some(e) = self.entries.pop_back() {
                self.bytes -= entry_bytes(&e);
            }
        }
    }

    /// Drops entries at `upto` and below.
    fn purge(&mut self, upto: u64) {
        while self.entries.front().is_some_and(|f| f.log_id.index <= upto) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= entry_bytes(&e);
            }
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }
}

#[derive(Debug)]
struct Inner {
    engine: Arc<Engine>,
    cache: Mutex<EntryCache>,
    /// The last entry's log id, `None` when the log holds nothing and nothing was purged.
    last: Mutex<Option<LogId>>,
    /// Proposals of this process awaiting commit (`commits`).
    commits: Arc<CommitWatch>,
    /// When recent entries were appended, for replication lag in bytes and seconds.
    trail: Arc<AppendTrail>,
}

/// openraft's log storage (and, cloned, its log reader) over one replica's engine.
#[derive(Clone, Debug)]
pub struct LogStore {
    inner: Arc<Inner>,
}

/// openraft 0.10's storage traits answer `io::Error`; openraft adds what was being done.
fn io_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

fn read_err(index: u64, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("reading log entry {index}: {e}"))
}

impl LogStore {
    /// Wraps an opened engine; reads the last entry's id from the log.
    pub fn new(engine: Arc<Engine>, cache_bytes: usize) -> io::Result<LogStore> {
        let bounds = engine.wal().bounds();
        let last = if bounds.next > bounds.first {
            let index = bounds.next - 1;
            let entry = read_from_wal(&engine, index)?;
            Some(entry.log_id)
        } else {
            bounds.purged.map(from_store_log_id)
        };
        let cache = EntryCache { limit: cache_bytes.max(1), ..Default::default() };
        Ok(LogStore {
            inner: Arc::new(Inner {
                engine,
                cache: Mutex::new(cache),
                last: Mutex::new(last),
                commits: Arc::default(),
                trail: Arc::default(),
            }),
        })
    }

    /// The last log id as openraft's log state reports it (the purge point on an empty log).
    pub fn last_log_id(&self) -> Option<LogId> {
        let purged = self.inner.engine.wal().bounds().purged.map(from_store_log_id);
        let last = *self.inner.last.lock().expect("last lock");
        last.max(purged)
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// Where proposals made in this process learn that their entry committed.
    pub fn commits(&self) -> Arc<CommitWatch> {
        self.inner.commits.clone()
    }

    /// When recent entries were appended (replication lag in bytes and seconds).
    pub fn trail(&self) -> Arc<AppendTrail> {
        self.inner.trail.clone()
    }

    fn cache(&self) -> MutexGuard<'_, EntryCache> {
        self.inner.cache.lock().expect("entry cache lock")
    }

    fn entry(&self, index: u64) -> io::Result<Entry> {
        if let Some(e) = self.cache().get(index) {
            return Ok(e.clone());
        }
        read_from_wal(&self.inner.engine, index)
    }

    /// Runs blocking engine work (a sync) off the async worker threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let engine = self.inner.engine.clone();
        tokio::task::spawn_blocking(move || f(&engine)).await.map_err(|e| io_err("log task", e))?
    }
}

fn read_from_wal(engine: &Engine, index: u64) -> io::Result<Entry> {
    let term = engine.wal().term(index).map_err(|e| read_err(index, e))?;
    let bytes = engine.wal().read(index).map_err(|e| read_err(index, e))?;
    decode_entry(index, term, &bytes).map_err(|e| read_err(index, e))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let bounds = self.inner.engine.wal().bounds();
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(bounds.first);
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        }
        .min(bounds.next);
        let range = start..end.max(start);
        let cached: Option<Vec<Entry>> = {
            let cache = self.cache();
            range.clone().map(|i| cache.get(i).cloned()).collect()
        };
        if let Some(entries) = cached {
            return Ok(entries);
        }
        // A lagging reader: the entries come from disk, off the async workers. The log may be
        // truncated or purged meanwhile (a deposed leader's replication stream still reading
        // while the node, now a follower, truncates a conflicting suffix): an entry no longer
        // held ends the read with the entries before it, as openraft allows ("entry that is not
        // found is allowed"); a storage error is still an error.
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(range.clone().count());
            for i in range {
                match this.entry(i) {
                    Ok(e) => out.push(e),
                    Err(e) => {
                        let b = this.inner.engine.wal().bounds();
                        if i < b.first || i >= b.next {
                            break;
                        }
                        return Err(e);
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| io_err("log read task", e))?
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        Ok(self.inner.engine.state().get().vote.map(from_store_vote))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let purged = self.inner.engine.wal().bounds().purged.map(from_store_log_id);
        Ok(LogState { last_purged_log_id: purged, last_log_id: self.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    /// Durable before it returns (`StateStore::update` syncs), as openraft requires, and only
    /// after every append queued before it is durable: openraft 0.10 submits appends without
    /// awaiting them and requires log and vote I/O to complete in order (it counts a later
    /// completion as covering earlier submissions). The vote lives in the hard state, not in
    /// the WAL's queue, so the WAL is flushed first. Votes change rarely (a new term, a new
    /// leader); the flush costs at most the appends in flight.
    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let v = to_store_vote(vote);
        self.blocking(move |engine| {
            engine.wal().flush().map_err(|e| io_err("flushing the log before a vote", e))?;
            engine.state().update(|s| s.vote = Some(v)).map_err(|e| io_err("saving the vote", e))
        })
        .await
    }

    /// Kept in memory only: the committed index is persisted by each checkpoint (which covers
    /// everything applied), and openraft re-learns the rest from the leader. Persisting it here
    /// would add a second sync to every commit.
    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        if let Some(c) = committed {
            self.inner.engine.note_committed(to_store_log_id(&c));
            self.inner.commits.committed(c.index);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.inner.engine.state().get().committed.map(from_store_log_id))
    }

    /// Returns once the entries are queued in the WAL and readable (from the entry cache, and
    /// from the WAL's memory until written): openraft 0.10 replicates them to followers from
    /// here, before they are durable. The callback runs from the WAL sync that covers them.
    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let wal = self.inner.engine.wal();
        let bounds = wal.bounds();
        // Entries at or below the purged index are already covered by the image; openraft's own
        // tests append such entries after purging, and there is nothing to store for them.
        let purged = bounds.purged.map(|p| p.index);
        let entries: Vec<Entry> =
            entries.into_iter().filter(|e| purged.is_none_or(|p| e.log_id.index > p)).collect();
        let Some(first) = entries.first() else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        if bounds.first == bounds.next && first.log_id.index > bounds.next {
            // An empty log may start anywhere (openraft's own tests do this); the gap is
            // recorded as purged, attributed to no leader (term 0), and never read.
            let gap = StoreLogId { term: 0, node: 0, index: first.log_id.index - 1 };
            self.blocking(move |engine| {
                engine.wal().purge(gap).map_err(|e| io_err("recording the log's start", e))
            })
            .await?;
            self.cache().clear();
        }
        let records: Vec<NewEntry> = entries
            .iter()
            .map(|e| NewEntry {
                index: e.log_id.index,
                term: e.log_id.leader_id.term,
                payload: encode_entry(e),
            })
            .collect();
        let first_index = first.log_id.index;
        let last = entries.last().map(|e| e.log_id);
        let batch_bytes: u64 = records.iter().map(|r| r.payload.len() as u64).sum();
        self.inner.commits.appended(entries.iter().filter_map(|e| match &e.payload {
            openraft::EntryPayload::Normal(req) if req.tag().0 != 0 => {
                Some((e.log_id.index, req.tag()))
            }
            _ => None,
        }));
        {
            let mut cache = self.cache();
            for e in entries {
                cache.push(e);
            }
        }
        let done = Box::new(move |r: crate::storage::Result<()>| {
            callback.io_completed(r.map_err(|e| io::Error::other(e.to_string())));
        });
        if let Err(e) = wal.append_with(records, done) {
            self.inner.commits.truncated(first_index);
            self.cache().truncate(first_index);
            return Err(io_err("appending to the log", e));
        }
        if let Some(l) = last {
            self.inner.trail.appended(l.index, batch_bytes);
        }
        *self.inner.last.lock().expect("last lock") = last;
        Ok(())
    }

    /// Removes the entries after `last` (all of them for None), durably before it returns.
    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let from = last.as_ref().map_or(0, |l| l.index + 1);
        if from >= self.inner.engine.wal().bounds().next {
            // Nothing after `last`: openraft 0.10 may ask for a truncation that removes nothing.
            return Ok(());
        }
        self.inner.commits.truncated(from);
        self.inner.trail.truncated(from);
        self.cache().truncate(from);
        let new_last = {
            let bounds = self.inner.engine.wal().bounds();
            if from > bounds.first {
                Some(self.entry(from - 1)?.log_id)
            } else {
                bounds.purged.map(from_store_log_id)
            }
        };
        self.blocking(move |engine| {
            let ticket =
                engine.wal().truncate(from).map_err(|e| io_err("truncating the log", e))?;
            engine.wal().wait(ticket).map_err(|e| io_err("truncating the log", e))
        })
        .await?;
        *self.inner.last.lock().expect("last lock") = new_last;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        self.inner.commits.purged(log_id.index);
        self.cache().purge(log_id.index);
        let upto = to_store_log_id(&log_id);
        self.blocking(move |engine| {
            engine.wal().purge(upto).map_err(|e| io_err("purging the log", e))
        })
        .await?;
        let mut last = self.inner.last.lock().expect("last lock");
        if last.is_none_or(|l| l.index < log_id.index) {
            *last = Some(log_id);
        }
        Ok(())
    }
}
