//! Delivery of append callbacks. A callback runs with `Ok` only once the sync covering its
//! entries returned Ok, and with the poison error once the engine is poisoned; callbacks run in
//! ticket order, each exactly once.
//!
//! Who runs them: after a batch, the committer runs its callbacks itself when there are at most
//! `INLINE_CALLBACKS` of them (one writer, or a few: a handoff to another thread would add a
//! wake-up to each one's latency). More go to the `xdevice-wal-cb` thread, so the committer
//! starts the next batch while they run: waking a writer is a futex wake per callback, which
//! took ~42% of the commit thread's time at 64 writers. `LogState::delivering` marks callbacks
//! being run outside the lock; nobody takes more until they are done, which keeps ticket order.
//! Inline (`CommitMode::Inline`), the committer always runs them. This module never touches the
//! disk.

use super::{Callback, LogState, Shared};
use crate::storage::error::StorageError;

/// Most callbacks of one batch the committer runs itself (see the module comment).
pub(super) const INLINE_CALLBACKS: usize = 4;

/// Callbacks ready to run, in ticket order: first the durable ones, then those that failed.
#[derive(Default)]
pub(super) struct Deliverable {
    durable: Vec<Callback>,
    failed: Vec<Callback>,
    /// Callbacks left when the WAL closed, neither durable nor failed by poison (none are
    /// expected: closing commits everything queued first).
    unfinished: Vec<Callback>,
}

impl Deliverable {
    pub(super) fn is_empty(&self) -> bool {
        self.durable.is_empty() && self.failed.is_empty() && self.unfinished.is_empty()
    }

    /// Runs the callbacks, with no WAL lock held.
    pub(super) fn run(self, shared: &Shared) {
        for cb in self.durable {
            cb(Ok(()));
        }
        for cb in self.failed {
            cb(shared.poison.check());
        }
        for cb in self.unfinished {
            cb(Err(StorageError::Invalid("WAL closed before the entries were durable".into())));
        }
    }
}

impl LogState {
    /// How many callbacks `take_deliverable` would take, counted up to `limit + 1`.
    pub(super) fn deliverable(&self, poisoned: bool, limit: usize) -> usize {
        match poisoned {
            true => self.callbacks.len().min(limit + 1),
            false => (self.callbacks.iter().take(limit + 1))
                .take_while(|(t, _)| *t <= self.durable_ticket)
                .count(),
        }
    }

    /// Takes every callback whose ticket is durable and, once the engine is `poisoned`, every
    /// other one (they get the error: nothing after a failed write or sync is acknowledged).
    pub(super) fn take_deliverable(&mut self, poisoned: bool) -> Deliverable {
        let mut out = Deliverable::default();
        let durable = self.callbacks.iter().take_while(|(t, _)| *t <= self.durable_ticket).count();
        out.durable.extend(self.callbacks.drain(..durable).map(|(_, cb)| cb));
        if poisoned {
            out.failed.extend(self.callbacks.drain(..).map(|(_, cb)| cb));
        }
        out
    }

    /// For a WAL that will commit nothing more: every callback, deliverable or not.
    pub(super) fn take_all(&mut self, poisoned: bool) -> Deliverable {
        let mut out = self.take_deliverable(poisoned);
        out.unfinished.extend(self.callbacks.drain(..).map(|(_, cb)| cb));
        out
    }
}

impl Shared {
    /// The delivery thread: runs callbacks as batches become durable (woken on `deliver`),
    /// until the WAL is closed and nothing is left.
    pub(super) fn deliver_loop(&self) {
        let mut st = self.lock();
        loop {
            if st.delivering {
                st = self.deliver.wait(st).expect("wal state lock");
                continue;
            }
            let poisoned = self.poison.check().is_err();
            let closed = st.closed;
            let ready = match closed {
                true => st.take_all(poisoned),
                false => st.take_deliverable(poisoned),
            };
            if ready.is_empty() {
                if closed {
                    return;
                }
                st = self.deliver.wait(st).expect("wal state lock");
                continue;
            }
            st.delivering = true;
            drop(st);
            ready.run(self);
            st = self.lock();
            st.delivering = false;
        }
    }

    /// Ends the committer's run of callbacks outside the lock (`delivering`), and wakes the
    /// delivery thread if something became deliverable meanwhile (or the WAL closed).
    pub(super) fn finish_delivering(&self) {
        let mut st = self.lock();
        st.delivering = false;
        let more = st.closed || st.deliverable(self.poison.check().is_err(), 0) > 0;
        drop(st);
        if more {
            self.deliver.notify_one();
        }
    }
}
