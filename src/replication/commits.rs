//! Commit notification for proposals made in this process: a proposal's callback runs when the
//! entry holding it is committed (a majority holds it durably, the leader counted only
//! after its own flush), which openraft reports to the log store (`save_committed`) before it
//! applies the entry. Answering at commit takes the apply (an image write) off the write path;
//! readers wait for apply separately.
//!
//! A proposal carries a [`Tag`] that only this process sees (it is never encoded: the WAL and
//! the network carry none). The log store of the replica it was proposed to places the tag at
//! the entry's index when it appends it, and from then on:
//! - a committed index at or past the entry reports it committed (`committed`), on openraft's
//!   core task, which learns it: no task of ours in between;
//! - a truncation at or below the entry fails it (`truncated`): the entry was replaced, and a
//!   later commit at that index would be someone else's;
//! - a purge that reaches it before it was reported fails it (`purged`): only an installed snapshot
//!   removes entries that were never reported committed here (openraft replaces the log without
//!   truncating it when the snapshot's last entry is not in it), and whether the entry was in
//!   that snapshot is unknown;
//! - the replica stopping, or losing the leadership, fails every entry still watched
//!   (`close`, `fail_all`).
//!
//! A placed entry still in the log when the committed index passes it is committed: a replica's
//! committed prefix is the cluster's (Raft's log matching), and an entry leaves the log only by
//! truncation, which fails it first.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use tokio::sync::oneshot;

use super::network::BoxFuture;
use super::node::wait_apply_lag;
use super::types::{Raft, Request};

/// A proposal's identity within this process (0: none). Never encoded; equal to every other
/// tag, so it never makes two requests differ.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tag(pub u64);

impl PartialEq for Tag {
    fn eq(&self, _: &Tag) -> bool {
        true
    }
}

impl Eq for Tag {}

impl Tag {
    /// A tag no other proposal of this process has.
    pub fn fresh() -> Tag {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Tag(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// What a watched proposal runs once its fate is known: its entry's index at commit, or why it
/// will never commit. It runs exactly once, on the thread that learns it (openraft's core task at
/// `save_committed`, for a commit), after the watch's lock is released; it must not block.
pub type OnCommit = Box<dyn FnOnce(Result<u64, String>) + Send>;

#[derive(Default)]
struct State {
    /// Registered, not yet appended.
    waiting: HashMap<u64, OnCommit>,
    /// Appended: entry index → (tag, callback).
    placed: BTreeMap<u64, (u64, OnCommit)>,
}

/// One replica's registry of proposals awaiting commit.
#[derive(Default)]
pub struct CommitWatch {
    state: Mutex<State>,
}

impl std::fmt::Debug for CommitWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("CommitWatch")
            .field("waiting", &st.waiting.len())
            .field("placed", &st.placed.len())
            .finish()
    }
}

impl CommitWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches for the entry `tag` will be appended as; `on_commit` runs when its fate is
    /// known. Call before proposing it.
    pub fn register(&self, tag: Tag, on_commit: OnCommit) {
        self.lock().waiting.insert(tag.0, on_commit);
    }

    /// Stops watching `tag` without running its callback (its proposal was never handed to
    /// openraft).
    pub fn forget(&self, tag: Tag) {
        let mut st = self.lock();
        st.waiting.remove(&tag.0);
        st.placed.retain(|_, (t, _)| *t != tag.0);
    }

    /// Settles `tag` with `outcome` if it is still watched (openraft answered it before its
    /// commit was seen here: an error, or, should it ever come first, the applied entry).
    pub fn settle(&self, tag: Tag, outcome: Result<u64, String>) {
        let found = {
            let mut st = self.lock();
            st.waiting.remove(&tag.0).or_else(|| {
                let at = st.placed.iter().find(|(_, (t, _))| *t == tag.0).map(|(at, _)| *at)?;
                st.placed.remove(&at).map(|(_, cb)| cb)
            })
        };
        if let Some(cb) = found {
            cb(outcome);
        }
    }

    /// Whether no proposal is watched.
    pub fn is_idle(&self) -> bool {
        let st = self.lock();
        st.waiting.is_empty() && st.placed.is_empty()
    }

    /// The log store appended entries: (index, tag) of each one that carries a tag.
    pub fn appended(&self, tagged: impl IntoIterator<Item = (u64, Tag)>) {
        let mut st = self.lock();
        if st.waiting.is_empty() {
            return;
        }
        for (index, tag) in tagged {
            if let Some(cb) = st.waiting.remove(&tag.0) {
                st.placed.insert(index, (tag.0, cb));
            }
        }
    }

    /// Entries from `index` on were removed from the log (a conflict with a new leader's log).
    pub fn truncated(&self, index: u64) {
        let gone = self.lock().placed.split_off(&index);
        for (at, (_, cb)) in gone {
            cb(Err(format!("log entry {at} was replaced by another leader's")));
        }
    }

    /// The log was purged through `index`. A leader purges only what it applied, which resolved
    /// here first; anything still placed was removed by a snapshot install.
    pub fn purged(&self, index: u64) {
        let gone = {
            let mut st = self.lock();
            let rest = st.placed.split_off(&(index + 1));
            std::mem::replace(&mut st.placed, rest)
        };
        for (at, (_, cb)) in gone {
            cb(Err(format!(
                "log entry {at} was removed by a snapshot before it was seen committed"
            )));
        }
    }

    /// Fails every watched proposal with `why`: the replica stopped, or it no longer leads (an
    /// entry of a deposed leader may still commit; its proposer sends it again, and block
    /// writes are idempotent).
    pub fn fail_all(&self, why: &str) {
        let (waiting, placed) = {
            let mut st = self.lock();
            (std::mem::take(&mut st.waiting), std::mem::take(&mut st.placed))
        };
        for cb in waiting.into_values() {
            cb(Err(why.to_string()));
        }
        for (_, (_, cb)) in placed {
            cb(Err(why.to_string()));
        }
    }

    /// The replica stopped: nothing watched here will be reported.
    pub fn close(&self) {
        self.fail_all("the replica stopped");
    }

    /// Every entry up to `index` is committed.
    pub fn committed(&self, index: u64) {
        let done = {
            let mut st = self.lock();
            if st.placed.first_key_value().is_none_or(|(&first, _)| first > index) {
                return;
            }
            let rest = st.placed.split_off(&(index + 1));
            std::mem::replace(&mut st.placed, rest)
        };
        for (at, (_, cb)) in done {
            cb(Ok(at));
        }
    }
}

/// Proposes block changes to one replica (its leader's role) and reports each at commit: the
/// back-pressure on apply, the tag, the watch, and openraft's late answer, in one place for
/// both proposers (the embedded cluster and a node's `WRITE`).
#[derive(Clone)]
pub struct Proposer {
    raft: Raft,
    commits: Arc<CommitWatch>,
    late: LateAnswers,
}

impl std::fmt::Debug for Proposer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proposer").finish_non_exhaustive()
    }
}

impl Proposer {
    /// Proposes through `raft`, whose log store reports to `commits`; on the current runtime.
    pub fn new(raft: Raft, commits: Arc<CommitWatch>) -> Proposer {
        Proposer { raft, commits, late: LateAnswers::start() }
    }

    /// Waits until the log holds at most `MAX_APPLY_LAG_ENTRIES` unapplied entries (up to a
    /// second: answered at commit, apply must not fall behind without bound), then hands `req`
    /// to openraft, and resolves once openraft took it. `on_commit` then runs once, when the
    /// entry commits or will not (refused, dropped, truncated, the replica stopped or lost the
    /// leadership). If this resolves to an error, `on_commit` never runs.
    ///
    /// Nothing waits in between: on the usual path (apply keeping up, room in openraft's
    /// channel) the first poll finishes, so a caller may poll it once on its own thread.
    pub async fn propose_then(&self, req: Request, on_commit: OnCommit) -> Result<(), String> {
        wait_apply_lag(&self.raft, Duration::from_secs(1)).await?;
        let tag = Tag::fresh();
        let req = req.with_tag(tag);
        self.commits.register(tag, on_commit);
        let (responder, answer) = openraft::impls::ProgressResponder::complete_only();
        if let Err(e) = self.raft.client_write_ff(req, Some(responder)).await {
            self.commits.forget(tag);
            return Err(e.to_string());
        }
        // openraft answers after apply, which follows commit, or earlier with an error (not the
        // leader, dropped): then the proposal fails unless its commit was seen first.
        let commits = self.commits.clone();
        self.late.keep(async move {
            let outcome = match answer.await {
                Ok(Ok(r)) => Ok(r.log_id.index),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("openraft dropped the proposal".to_string()),
            };
            commits.settle(tag, outcome);
        });
        Ok(())
    }

    /// `propose_then`, resolving to a future of the commit.
    pub async fn propose(&self, req: Request) -> Result<BoxFuture<Result<u64, String>>, String> {
        let (tx, rx) = oneshot::channel();
        self.propose_then(req, Box::new(move |r| drop(tx.send(r)))).await?;
        Ok(Box::pin(
            async move { rx.await.unwrap_or_else(|_| Err("the replica stopped".to_string())) },
        ))
    }

    /// Whether no proposal of this proposer awaits its commit.
    pub fn is_idle(&self) -> bool {
        self.commits.is_idle()
    }

    /// Fails every proposal still awaiting its commit with `why` (this replica no longer
    /// leads).
    pub fn abandon(&self, why: &str) {
        self.commits.fail_all(why);
    }

    /// The replica stopped: every proposal still watched fails.
    pub fn close(&self) {
        self.commits.close();
    }
}

/// Holds openraft's answers to proposals (sent after apply, or earlier with an error) until
/// openraft sends them: an answer settles a proposal not yet seen committed, and openraft logs a
/// warning for every answer whose receiver is gone. One task per replica awaits them all, in
/// whatever order they come, off the write path.
#[derive(Clone, Debug)]
pub struct LateAnswers(
    tokio::sync::mpsc::UnboundedSender<Pin<Box<dyn Future<Output = ()> + Send>>>,
);

impl LateAnswers {
    /// Starts the task on the current runtime; it ends when every handle is dropped and every
    /// answer kept has come.
    pub fn start() -> LateAnswers {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<Pin<Box<dyn Future<Output = ()> + Send>>>();
        tokio::spawn(async move {
            let mut pending = FuturesUnordered::new();
            loop {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(answer) => pending.push(answer),
                        None => break,
                    },
                    Some(()) = pending.next(), if !pending.is_empty() => {}
                }
            }
            while pending.next().await.is_some() {}
        });
        LateAnswers(tx)
    }

    /// Keeps `answer` until it resolves.
    pub fn keep<F: Future<Output = ()> + Send + 'static>(&self, answer: F) {
        let _ = self.0.send(Box::pin(answer));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Registers `tag` with a callback that reports into the returned receiver.
    fn register(w: &CommitWatch, tag: Tag) -> oneshot::Receiver<Result<u64, String>> {
        let (tx, rx) = oneshot::channel();
        w.register(tag, Box::new(move |r| drop(tx.send(r))));
        rx
    }

    #[test]
    fn a_placed_entry_resolves_at_commit_and_a_truncated_one_fails() {
        let w = CommitWatch::default();
        let (a, b, c) = (Tag::fresh(), Tag::fresh(), Tag::fresh());
        let mut ra = register(&w, a);
        let mut rb = register(&w, b);
        let mut rc = register(&w, c);
        w.appended([(5, a), (6, Tag::fresh()), (7, b)]);
        w.committed(4);
        assert!(ra.try_recv().is_err(), "nothing at or below 4 is ours");
        w.committed(6);
        assert_eq!(ra.try_recv().unwrap(), Ok(5));
        assert!(rb.try_recv().is_err(), "7 is not committed yet");
        w.truncated(7);
        assert!(rb.try_recv().unwrap().unwrap_err().contains("replaced"));
        // Committing past a truncated entry's index says nothing about it.
        w.appended([(7, c)]);
        w.committed(9);
        assert_eq!(rc.try_recv().unwrap(), Ok(7));
    }

    #[test]
    fn a_purge_or_a_stop_fails_what_is_still_watched() {
        let w = CommitWatch::default();
        let (a, b, c) = (Tag::fresh(), Tag::fresh(), Tag::fresh());
        let mut ra = register(&w, a);
        let mut rb = register(&w, b);
        let mut rc = register(&w, c);
        w.appended([(3, a), (9, c)]);
        // A snapshot through 5 replaced entry 3 without a truncation.
        w.purged(5);
        assert!(ra.try_recv().unwrap().unwrap_err().contains("snapshot"));
        assert!(rc.try_recv().is_err(), "entry 9 is still in the log");
        assert!(!w.is_idle());
        w.close();
        assert!(rc.try_recv().unwrap().unwrap_err().contains("stopped"));
        assert!(rb.try_recv().unwrap().unwrap_err().contains("stopped"), "a watch never appended");
        assert!(w.is_idle());
    }

    #[test]
    fn an_early_answer_settles_only_what_is_still_watched() {
        let w = CommitWatch::default();
        let (a, b, c) = (Tag::fresh(), Tag::fresh(), Tag::fresh());
        let mut ra = register(&w, a);
        let mut rb = register(&w, b);
        let mut rc = register(&w, c);
        w.appended([(4, a), (5, b)]);
        w.committed(4);
        // openraft's answer to a, after apply, finds it already reported.
        w.settle(a, Err("late".into()));
        assert_eq!(ra.try_recv().unwrap(), Ok(4));
        // b placed and c never appended: an error answer fails each, once.
        w.settle(b, Err("not the leader".into()));
        w.settle(c, Err("dropped".into()));
        assert_eq!(rb.try_recv().unwrap().unwrap_err(), "not the leader");
        assert_eq!(rc.try_recv().unwrap().unwrap_err(), "dropped");
        w.committed(9);
        assert!(w.is_idle(), "nothing left to report");
    }

    #[test]
    fn a_deposed_leader_fails_every_proposal_it_holds() {
        let w = CommitWatch::default();
        let (a, b) = (Tag::fresh(), Tag::fresh());
        let mut ra = register(&w, a);
        let mut rb = register(&w, b);
        w.appended([(7, a)]);
        w.fail_all("node 1 lost the leadership");
        assert!(ra.try_recv().unwrap().unwrap_err().contains("leadership"));
        assert!(rb.try_recv().unwrap().unwrap_err().contains("leadership"));
        w.committed(7);
        assert!(w.is_idle());
    }

    #[test]
    fn an_unregistered_or_forgotten_tag_is_ignored() {
        let w = CommitWatch::default();
        let t = Tag::fresh();
        let mut r = register(&w, t);
        w.forget(t);
        w.appended([(1, t)]);
        w.committed(1);
        assert!(matches!(r.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
        assert_eq!(Tag(1), Tag(2), "tags never make requests differ");
    }
}
