//! The write pipeline's decisions, as plain state: which writes are admitted and with which
//! sequence numbers, how they merge into proposals, what a failed proposal sends again, which
//! epoch an answer belongs to, how many bytes are unconfirmed, and which waiting requests an
//! event completes. No locks, clocks or runtime: the device (`super::Device`) holds it under
//! its lock, passes the time in, and runs the completions it hands back after unlocking.
//!
//! Sequence numbers count admitted writes (block writes and discards, each part of a split
//! write its own). Three positions move forward only:
//!
//! ```text
//!   confirmed ≤ accepted ≤ next_seq
//!   every seq below `confirmed` is committed, and so is everything before it;
//!   every seq below `accepted` was accepted by a leader at least once;
//!   `next_seq` is the next seq to admit.
//! ```
//!
//! A write waiting for room (the unconfirmed bytes are at their bound) is parked, unsequenced,
//! behind any parked before it; it is admitted, in arrival order, once commits free room.

use std::collections::VecDeque;
use std::time::Instant;

use crate::entry::BlockOp;

use super::DeviceError;

/// The pipeline's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Writes merge into one proposal up to this many bytes of data.
    pub max_proposal_bytes: usize,
    /// At most this many ops in one proposal.
    pub max_proposal_ops: usize,
    /// Writes park while this many bytes are unconfirmed (one write is always admitted).
    pub max_unconfirmed_bytes: usize,
    /// Proposals of one epoch handed to the leader and not yet committed.
    pub max_inflight: usize,
}

/// What a request waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// The leader accepted the request's writes into its log (writeback, when acceptance
    /// outlives this process).
    Accepted,
    /// The request's writes, and every write admitted before them, are committed.
    Committed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Queued,
    Submitted,
    Committed,
}

#[derive(Debug)]
struct Batch {
    seq: u64,
    op: BlockOp,
    bytes: usize,
    state: State,
}

/// A request waiting for a position to reach `upto`.
#[derive(Debug)]
struct Waiter<W> {
    upto: u64,
    deadline: Instant,
    waiter: W,
}

/// A write waiting for room: its parts not yet admitted, in order.
#[derive(Debug)]
struct Parked<W> {
    parts: VecDeque<BlockOp>,
    need: Need,
    deadline: Instant,
    waiter: W,
}

/// One proposal: the ops of consecutive queued writes, in order.
#[derive(Debug)]
pub struct Proposal {
    pub epoch: u64,
    pub seqs: Vec<u64>,
    pub ops: Vec<BlockOp>,
}

/// The counters the pipeline keeps for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub proposals: u64,
    pub resubmissions: u64,
}

/// Requests completed by an event, with their results; the caller runs them unlocked.
pub type Ready<W> = Vec<(W, Result<(), DeviceError>)>;

/// The pipeline: `W` is whatever completes a request (a callback, a channel, a test's id).
#[derive(Debug)]
pub struct Pipeline<W> {
    limits: Limits,
    queue: VecDeque<Batch>,
    parked: VecDeque<Parked<W>>,
    /// Waiting for `accepted`, in order of `upto`.
    on_accepted: VecDeque<Waiter<W>>,
    /// Waiting for `confirmed`, in order of `upto`.
    on_confirmed: VecDeque<Waiter<W>>,
    next_seq: u64,
    confirmed: u64,
    accepted: u64,
    epoch: u64,
    unconfirmed_bytes: usize,
    inflight: usize,
    commit_floor: u64,
    closed: bool,
    counts: Counts,
}

fn op_bytes(op: &BlockOp) -> usize {
    match op {
        BlockOp::Write { data, .. } => data.len(),
        BlockOp::Zero { .. } => 0,
    }
}

impl<W> Pipeline<W> {
    pub fn new(limits: Limits) -> Pipeline<W> {
        Pipeline {
            limits,
            queue: VecDeque::new(),
            parked: VecDeque::new(),
            on_accepted: VecDeque::new(),
            on_confirmed: VecDeque::new(),
            next_seq: 0,
            confirmed: 0,
            accepted: 0,
            epoch: 0,
            unconfirmed_bytes: 0,
            inflight: 0,
            commit_floor: 0,
            closed: false,
            counts: Counts::default(),
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn unconfirmed_bytes(&self) -> usize {
        self.unconfirmed_bytes
    }

    /// Admitted writes not yet confirmed.
    pub fn unconfirmed_batches(&self) -> usize {
        self.queue.len()
    }

    /// Proposals handed to the cluster and not yet committed (at most `max_inflight`).
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Writes waiting for room.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// The highest log index a commit of this pipeline's writes resolved to: every confirmed
    /// write is at or below it.
    pub fn commit_floor(&self) -> u64 {
        self.commit_floor
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Whether a flush arriving now completes at once: every admitted write is committed.
    pub fn flush_is_free(&self) -> bool {
        !self.closed && self.confirmed == self.next_seq
    }

    /// A write of `parts` (in order; a write larger than one proposal comes split), completed
    /// when `need` holds for its last part. Parts are admitted as room allows, each through
    /// `admit(seq, op)` (the caller pins it in the cache); the rest park. An empty write
    /// completes at once.
    pub fn write(
        &mut self,
        parts: Vec<BlockOp>,
        need: Need,
        deadline: Instant,
        waiter: W,
        admit: &mut impl FnMut(u64, &BlockOp),
        ready: &mut Ready<W>,
    ) {
        if self.closed {
            ready.push((waiter, Err(DeviceError::Closed)));
            return;
        }
        if parts.is_empty() {
            ready.push((waiter, Ok(())));
            return;
        }
        self.parked.push_back(Parked { parts: parts.into(), need, deadline, waiter });
        self.admit(admit);
    }

    /// A flush: completes once every admitted write is committed (at once if all are). Writes
    /// still parked have not completed, so the flush does not wait for them.
    pub fn flush(&mut self, deadline: Instant, waiter: W, ready: &mut Ready<W>) {
        if self.closed {
            ready.push((waiter, Err(DeviceError::Closed)));
        } else if self.confirmed >= self.next_seq {
            ready.push((waiter, Ok(())));
        } else {
            self.on_confirmed.push_back(Waiter { upto: self.next_seq, deadline, waiter });
        }
    }

    /// Admits parked writes, front first, while they fit, each part through `admit(seq, op)`
    /// (the caller pins it in the cache). `write` does it; after `committed` freed room the
    /// caller does.
    pub fn admit(&mut self, admit: &mut impl FnMut(u64, &BlockOp)) {
        self.admit_front(admit);
        self.check();
    }

    fn admit_front(&mut self, admit: &mut impl FnMut(u64, &BlockOp)) {
        while let Some(front) = self.parked.front_mut() {
            while let Some(op) = front.parts.front() {
                let bytes = op_bytes(op);
                let fits = self.unconfirmed_bytes == 0
                    || self.unconfirmed_bytes + bytes <= self.limits.max_unconfirmed_bytes;
                if !fits {
                    return;
                }
                let Some(op) = front.parts.pop_front() else { break };
                let seq = self.next_seq;
                self.next_seq += 1;
                self.unconfirmed_bytes += bytes;
                admit(seq, &op);
                self.queue.push_back(Batch { seq, op, bytes, state: State::Queued });
            }
            let Some(done) = self.parked.pop_front() else { break };
            let waiter =
                Waiter { upto: self.next_seq, deadline: done.deadline, waiter: done.waiter };
            match done.need {
                Need::Accepted => self.on_accepted.push_back(waiter),
                Need::Committed => self.on_confirmed.push_back(waiter),
            }
        }
    }

    /// Takes the next run of queued writes, in order, as one proposal, unless the inflight
    /// bound is reached or nothing is queued.
    pub fn take_proposal(&mut self) -> Option<Proposal> {
        if self.closed || self.inflight >= self.limits.max_inflight.max(1) {
            return None;
        }
        let mut seqs = Vec::new();
        let mut ops = Vec::new();
        let mut bytes = 0usize;
        for b in self.queue.iter_mut().filter(|b| b.state == State::Queued) {
            if !seqs.is_empty()
                && (bytes + b.bytes > self.limits.max_proposal_bytes
                    || ops.len() >= self.limits.max_proposal_ops)
            {
                break;
            }
            b.state = State::Submitted;
            bytes += b.bytes;
            seqs.push(b.seq);
            ops.push(b.op.clone());
        }
        if seqs.is_empty() {
            return None;
        }
        self.counts.proposals += 1;
        self.inflight += 1;
        Some(Proposal { epoch: self.epoch, seqs, ops })
    }

    /// The leader accepted a proposal of `epoch` ending at `last_seq`.
    pub fn accepted_through(&mut self, epoch: u64, last_seq: u64, ready: &mut Ready<W>) {
        if self.epoch == epoch && self.accepted <= last_seq {
            self.accepted = (last_seq + 1).min(self.next_seq);
        }
        Self::release(&mut self.on_accepted, self.accepted, ready);
        self.check();
    }

    /// A proposal of `epoch` holding `seqs` committed at log index `index`. Writes confirmed
    /// by it (the committed prefix) go through `unpin(seq, op)`; the room they free is for
    /// parked writes, which `admit` takes in next.
    pub fn committed(
        &mut self,
        epoch: u64,
        seqs: &[u64],
        index: u64,
        unpin: &mut impl FnMut(u64, &BlockOp),
        ready: &mut Ready<W>,
    ) {
        self.commit_floor = self.commit_floor.max(index);
        if self.epoch != epoch {
            // A proposal of an earlier epoch: its writes were sent again and are confirmed by
            // the new proposals' commits, in order.
            return;
        }
        self.inflight = self.inflight.saturating_sub(1);
        for b in self.queue.iter_mut() {
            if seqs.binary_search(&b.seq).is_ok() {
                b.state = State::Committed;
            }
        }
        while self.queue.front().is_some_and(|b| b.state == State::Committed) {
            let Some(b) = self.queue.pop_front() else { break };
            self.unconfirmed_bytes -= b.bytes;
            self.confirmed = b.seq + 1;
            self.accepted = self.accepted.max(self.confirmed);
            unpin(b.seq, &b.op);
        }
        Self::release(&mut self.on_accepted, self.accepted, ready);
        Self::release(&mut self.on_confirmed, self.confirmed, ready);
        self.check();
    }

    /// A proposal of `epoch` failed (leader lost, not accepted): a new epoch begins and every
    /// unconfirmed write is queued again, in order. Returns how many, or `None` for an answer
    /// of an earlier epoch (already handled).
    pub fn restart(&mut self, epoch: u64) -> Option<u64> {
        if self.epoch != epoch {
            return None;
        }
        self.epoch += 1;
        self.inflight = 0;
        for b in self.queue.iter_mut() {
            b.state = State::Queued;
        }
        let n = self.queue.len() as u64;
        self.counts.resubmissions += n;
        self.check();
        Some(n)
    }

    /// Fails every request whose deadline passed by `now` with `Timeout(after)`. Its writes
    /// stay queued (a later commit still applies them); parts of a write never admitted are
    /// dropped with it.
    pub fn expire(&mut self, now: Instant, after: std::time::Duration, ready: &mut Ready<W>) {
        for list in [&mut self.on_accepted, &mut self.on_confirmed] {
            if list.iter().any(|w| w.deadline <= now) {
                let (late, keep): (VecDeque<_>, VecDeque<_>) =
                    std::mem::take(list).into_iter().partition(|w| w.deadline <= now);
                *list = keep;
                ready
                    .extend(late.into_iter().map(|w| (w.waiter, Err(DeviceError::Timeout(after)))));
            }
        }
        if self.parked.iter().any(|p| p.deadline <= now) {
            let (late, keep): (VecDeque<_>, VecDeque<_>) =
                std::mem::take(&mut self.parked).into_iter().partition(|p| p.deadline <= now);
            self.parked = keep;
            ready.extend(late.into_iter().map(|p| (p.waiter, Err(DeviceError::Timeout(after)))));
        }
    }

    /// Stops: every waiting request fails with `Closed`; queued writes are abandoned (as on
    /// power loss).
    pub fn close(&mut self, ready: &mut Ready<W>) {
        self.closed = true;
        let waiting = std::mem::take(&mut self.on_accepted)
            .into_iter()
            .chain(std::mem::take(&mut self.on_confirmed))
            .map(|w| w.waiter)
            .chain(std::mem::take(&mut self.parked).into_iter().map(|p| p.waiter));
        ready.extend(waiting.map(|w| (w, Err(DeviceError::Closed))));
    }

    /// Completes the waiters at the front of `list` whose position has been reached.
    fn release(list: &mut VecDeque<Waiter<W>>, reached: u64, ready: &mut Ready<W>) {
        while list.front().is_some_and(|w| w.upto <= reached) {
            if let Some(w) = list.pop_front() {
                ready.push((w.waiter, Ok(())));
            }
        }
    }

    /// The invariants, checked after every change (the O(n) byte count in debug builds only).
    fn check(&self) {
        assert!(
            self.confirmed <= self.accepted && self.accepted <= self.next_seq,
            "pipeline positions out of order: confirmed {} accepted {} next {}",
            self.confirmed,
            self.accepted,
            self.next_seq
        );
        assert_eq!(
            self.queue.front().map_or(self.next_seq, |b| b.seq),
            self.confirmed,
            "the queue must hold exactly the unconfirmed writes"
        );
        assert!(self.inflight <= self.limits.max_inflight.max(1), "too many proposals in flight");
        debug_assert_eq!(
            self.queue.iter().map(|b| b.bytes).sum::<usize>(),
            self.unconfirmed_bytes,
            "unconfirmed bytes are the queue's"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            max_proposal_bytes: 8192,
            max_proposal_ops: 16,
            max_unconfirmed_bytes: 16384,
            max_inflight: 2,
        }
    }

    fn write(lba: u64, blocks: usize) -> BlockOp {
        BlockOp::Write { lba, data: Bytes::from(vec![lba as u8; blocks * 4096]) }
    }

    /// A pipeline with request ids as waiters, and the seqs admitted and unpinned.
    struct Harness {
        p: Pipeline<u32>,
        admitted: Vec<u64>,
        unpinned: Vec<u64>,
        done: Vec<(u32, Result<(), DeviceError>)>,
        now: Instant,
    }

    impl Harness {
        fn new() -> Harness {
            Harness {
                p: Pipeline::new(limits()),
                admitted: Vec::new(),
                unpinned: Vec::new(),
                done: Vec::new(),
                now: Instant::now(),
            }
        }

        fn write(&mut self, id: u32, parts: Vec<BlockOp>, need: Need) {
            let deadline = self.now + Duration::from_secs(1);
            let admitted = &mut self.admitted;
            self.p.write(parts, need, deadline, id, &mut |s, _| admitted.push(s), &mut self.done);
        }

        fn flush(&mut self, id: u32) {
            self.p.flush(self.now + Duration::from_secs(1), id, &mut self.done);
        }

        fn commit(&mut self, prop: &Proposal, index: u64) {
            let (admitted, unpinned) = (&mut self.admitted, &mut self.unpinned);
            self.p.committed(
                prop.epoch,
                &prop.seqs,
                index,
                &mut |s, _| unpinned.push(s),
                &mut self.done,
            );
            self.p.admit(&mut |s, _| admitted.push(s));
        }

        fn done_ids(&mut self) -> Vec<u32> {
            let ids = self.done.iter().map(|(id, r)| {
                assert!(r.is_ok(), "request {id} failed: {r:?}");
                *id
            });
            let ids = ids.collect();
            self.done.clear();
            ids
        }
    }

    #[test]
    fn writes_merge_into_bounded_proposals_in_order() {
        let mut h = Harness::new();
        for i in 0..5 {
            h.write(i, vec![write(u64::from(i), 1)], Need::Committed);
        }
        assert_eq!(h.admitted, vec![0, 1, 2, 3]); // 16 KiB bound: the fifth parks
        assert_eq!(h.p.parked(), 1);
        let a = h.p.take_proposal().unwrap();
        assert_eq!(a.seqs, vec![0, 1]); // 8 KiB per proposal
        let b = h.p.take_proposal().unwrap();
        assert_eq!(b.seqs, vec![2, 3]);
        assert!(h.p.take_proposal().is_none(), "two in flight at most");
        // Commits out of order confirm only the committed prefix.
        h.commit(&b, 20);
        assert!(h.done_ids().is_empty());
        assert_eq!(h.p.confirmed(), 0);
        h.commit(&a, 19);
        assert_eq!(h.unpinned, vec![0, 1, 2, 3]);
        assert_eq!(h.done_ids(), vec![0, 1, 2, 3]);
        assert_eq!(h.p.commit_floor(), 20);
        // Room freed: the parked write was admitted.
        assert_eq!(h.admitted, vec![0, 1, 2, 3, 4]);
        assert_eq!(h.p.take_proposal().unwrap().seqs, vec![4]);
    }

    #[test]
    fn a_failed_proposal_resubmits_every_unconfirmed_write_in_order() {
        let mut h = Harness::new();
        for i in 0..4 {
            h.write(i, vec![write(u64::from(i), 1)], Need::Committed);
        }
        let a = h.p.take_proposal().unwrap();
        let b = h.p.take_proposal().unwrap();
        h.p.accepted_through(a.epoch, 1, &mut h.done);
        assert_eq!(h.p.restart(b.epoch), Some(4));
        assert_eq!(h.p.restart(a.epoch), None, "the same failure seen twice");
        // A late commit of the old epoch confirms nothing; the resubmission does.
        h.commit(&a, 10);
        assert_eq!(h.p.confirmed(), 0);
        assert_eq!(h.p.commit_floor(), 10);
        let c = h.p.take_proposal().unwrap();
        assert_eq!((c.epoch, c.seqs.clone()), (1, vec![0, 1]));
        let d = h.p.take_proposal().unwrap();
        assert_eq!(d.seqs, vec![2, 3]);
        assert_eq!(h.p.counts().resubmissions, 4);
        h.commit(&c, 11);
        h.commit(&d, 12);
        assert_eq!(h.done_ids(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn writeback_completes_at_acceptance_and_flush_waits_for_commit() {
        let mut h = Harness::new();
        h.flush(100);
        assert_eq!(h.done_ids(), vec![100], "nothing outstanding: a flush is free");
        h.write(1, vec![write(0, 1)], Need::Accepted);
        h.write(2, vec![write(1, 1)], Need::Committed); // FUA
        h.flush(3);
        assert!(!h.p.flush_is_free());
        let a = h.p.take_proposal().unwrap();
        h.p.accepted_through(a.epoch, 1, &mut h.done);
        assert_eq!(h.done_ids(), vec![1]);
        h.commit(&a, 5);
        assert_eq!(h.done_ids(), vec![2, 3]);
        assert!(h.p.flush_is_free());
    }

    #[test]
    fn acceptance_of_an_old_epoch_completes_nothing() {
        let mut h = Harness::new();
        h.write(1, vec![write(0, 1)], Need::Accepted);
        let a = h.p.take_proposal().unwrap();
        h.p.restart(a.epoch);
        h.p.accepted_through(a.epoch, 0, &mut h.done);
        assert!(h.done_ids().is_empty());
        assert_eq!(h.p.accepted(), 0);
    }

    #[test]
    fn a_split_write_completes_with_its_last_part_and_parks_whole_behind_others() {
        let mut h = Harness::new();
        h.write(1, vec![write(0, 3)], Need::Committed); // 12 KiB
        h.write(2, vec![write(10, 2), write(12, 2)], Need::Committed); // 8 + 8 KiB
        h.write(3, vec![write(20, 1)], Need::Committed);
        // 12 KiB + 8 KiB exceeds 16 KiB: write 2 waits whole, and write 3 behind it.
        assert_eq!(h.admitted, vec![0]);
        let a = h.p.take_proposal().unwrap();
        h.commit(&a, 1);
        assert_eq!(h.done_ids(), vec![1]);
        // Both parts of write 2 fit now (16 KiB); write 3 does not.
        assert_eq!(h.admitted, vec![0, 1, 2]);
        let b = h.p.take_proposal().unwrap();
        assert_eq!(b.seqs, vec![1]);
        let c = h.p.take_proposal().unwrap();
        h.commit(&b, 2);
        assert!(h.done_ids().is_empty(), "write 2 completes with its last part only");
        h.commit(&c, 3);
        assert_eq!(h.done_ids(), vec![2]);
        assert_eq!(h.admitted, vec![0, 1, 2, 3]);
    }

    #[test]
    fn deadlines_fail_waiters_and_parked_writes_but_keep_queued_writes() {
        let mut h = Harness::new();
        h.write(1, vec![write(0, 4)], Need::Committed);
        h.write(2, vec![write(4, 1)], Need::Committed); // parked
        h.flush(3);
        let after = Duration::from_secs(1);
        h.p.expire(h.now, after, &mut h.done);
        assert!(h.done.is_empty(), "nothing is late yet");
        h.p.expire(h.now + after, after, &mut h.done);
        let mut late: Vec<u32> = h
            .done
            .drain(..)
            .map(|(id, r)| {
                assert_eq!(r, Err(DeviceError::Timeout(after)));
                id
            })
            .collect();
        late.sort_unstable();
        assert_eq!(late, vec![1, 2, 3]);
        assert_eq!(h.p.parked(), 0);
        assert_eq!(h.p.unconfirmed_batches(), 1, "the admitted write stays queued");
        let a = h.p.take_proposal().unwrap();
        h.commit(&a, 1);
        assert_eq!(h.p.confirmed(), 1);
    }

    #[test]
    fn close_fails_everything_waiting_and_refuses_new_requests() {
        let mut h = Harness::new();
        h.write(1, vec![write(0, 4)], Need::Accepted);
        h.write(2, vec![write(4, 1)], Need::Committed);
        h.flush(3);
        h.p.close(&mut h.done);
        h.write(4, vec![write(8, 1)], Need::Committed);
        h.flush(5);
        let mut ids: Vec<u32> = h
            .done
            .drain(..)
            .map(|(id, r)| {
                assert_eq!(r, Err(DeviceError::Closed));
                id
            })
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert!(h.p.take_proposal().is_none());
        assert!(!h.p.flush_is_free());
    }

    #[test]
    fn unconfirmed_bytes_follow_admission_and_confirmation() {
        let mut h = Harness::new();
        h.write(1, vec![write(0, 2)], Need::Committed);
        h.write(2, vec![BlockOp::Zero { lba: 5, blocks: 1000 }], Need::Committed);
        assert_eq!(h.p.unconfirmed_bytes(), 8192, "a discard carries no data");
        let a = h.p.take_proposal().unwrap();
        assert_eq!(a.seqs, vec![0, 1]);
        h.commit(&a, 7);
        assert_eq!(h.p.unconfirmed_bytes(), 0);
        assert_eq!((h.p.confirmed(), h.p.accepted(), h.p.next_seq()), (2, 2, 2));
    }
}
