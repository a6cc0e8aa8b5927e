//! Delivery of append callbacks. A callback runs with `Ok` only once the sync covering its
//! entries returned Ok, and with the poison error once the engine is poisoned; callbacks run in
//! ticket order, each exactly once.
//!
//! With the commit thread, a dedicated `xdevice-wal-cb` thread runs them: waking a writer costs
//! a futex wake per callback, which took ~42% of the commit thread's time at 64 writers, while
//! the disk sat idle. Now the committer publishes a batch's durability (one `notify_all`) and
//! starts encoding and writing the next batch while the previous one's writers are woken.
//! Inline, the committer runs them itself. This module never touches the disk.

use super::{Callback, LogState, Shared};
use crate::storage::error::StorageError;

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
    fn is_empty(&self) -> bool {
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
    /// The delivery thread: runs callbacks as batches become durable (the committer's
    /// `notify_all` on `done` wakes it), until the WAL is closed and nothing is left.
    pub(super) fn deliver_loop(&self) {
        let mut st = self.lock();
        loop {
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
                st = self.done.wait(st).expect("wal state lock");
                continue;
            }
            drop(st);
            ready.run(self);
            st = self.lock();
        }
    }
}
