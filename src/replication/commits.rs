//! Commit notification for proposals made in this process: a proposal's future resolves when
//! the entry holding it is committed (a majority holds it durably, the leader counted only
//! after its own flush), which openraft reports to the log store (`save_committed`) before it
//! applies the entry. Answering at commit takes the apply (an image write) off the write path;
//! readers wait for apply separately.
//!
//! A proposal carries a [`Tag`] that only this process sees (it is never encoded: the WAL and
//! the network carry none). The log store of the replica it was proposed to places the tag at
//! the entry's index when it appends it, and from then on:
//! - a committed index at or past the entry resolves it (`committed`);
//! - a truncation at or below the entry fails it (`truncated`): the entry was replaced, and a
//!   later commit at that index would be someone else's;
//! - a purge that reaches it before it resolved fails it (`purged`): only an installed snapshot
//!   removes entries that were never reported committed here (openraft replaces the log without
//!   truncating it when the snapshot's last entry is not in it), and whether the entry was in
//!   that snapshot is unknown;
//! - the replica stopping fails every entry still watched (`close`).
//!
//! A placed entry still in the log when the committed index passes it is committed: a replica's
//! committed prefix is the cluster's (Raft's log matching), and an entry leaves the log only by
//! truncation, which fails it first.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

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

/// Resolves to the entry's log index once committed, or to why it never will be.
pub type CommitReceiver = oneshot::Receiver<Result<u64, String>>;

type Sender = oneshot::Sender<Result<u64, String>>;

#[derive(Debug, Default)]
struct State {
    /// Registered, not yet appended.
    waiting: HashMap<u64, Sender>,
    /// Appended: entry index → (tag, sender).
    placed: BTreeMap<u64, (u64, Sender)>,
}

/// One replica's registry of proposals awaiting commit.
#[derive(Debug, Default)]
pub struct CommitWatch {
    state: Mutex<State>,
}

impl CommitWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches for the entry `tag` will be appended as. Call before proposing it.
    pub fn register(&self, tag: Tag) -> CommitReceiver {
        let (tx, rx) = oneshot::channel();
        self.lock().waiting.insert(tag.0, tx);
        rx
    }

    /// `register`, as a future that stops watching when it is dropped (answered or abandoned).
    pub fn watch(self: &Arc<Self>, tag: Tag) -> Pending {
        Pending { rx: self.register(tag), watch: self.clone(), tag }
    }

    /// Stops watching `tag` (its proposal was refused or abandoned).
    pub fn forget(&self, tag: Tag) {
        let mut st = self.lock();
        st.waiting.remove(&tag.0);
        st.placed.retain(|_, (t, _)| *t != tag.0);
    }

    /// The log store appended entries: (index, tag) of each one that carries a tag.
    pub fn appended(&self, tagged: impl IntoIterator<Item = (u64, Tag)>) {
        let mut st = self.lock();
        if st.waiting.is_empty() {
            return;
        }
        for (index, tag) in tagged {
            if let Some(tx) = st.waiting.remove(&tag.0) {
                st.placed.insert(index, (tag.0, tx));
            }
        }
    }

    /// Entries from `index` on were removed from the log (a conflict with a new leader's log).
    pub fn truncated(&self, index: u64) {
        let gone = self.lock().placed.split_off(&index);
        for (at, (_, tx)) in gone {
            let _ = tx.send(Err(format!("log entry {at} was replaced by another leader's")));
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
        for (at, (_, tx)) in gone {
            let _ = tx.send(Err(format!(
                "log entry {at} was removed by a snapshot before it was seen committed"
            )));
        }
    }

    /// The replica stopped: nothing watched here will be reported.
    pub fn close(&self) {
        let (waiting, placed) = {
            let mut st = self.lock();
            (std::mem::take(&mut st.waiting), std::mem::take(&mut st.placed))
        };
        let why = || Err("the replica stopped".to_string());
        for tx in waiting.into_values() {
            let _ = tx.send(why());
        }
        for (_, (_, tx)) in placed {
            let _ = tx.send(why());
        }
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
        for (at, (_, tx)) in done {
            let _ = tx.send(Ok(at));
        }
    }
}

/// Proposes block changes to one replica (its leader's role) and resolves each at commit: the
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
    /// to openraft. Resolves, once openraft took it, to a future of its entry's index at
    /// commit, or of why it will not commit (refused, dropped, truncated, the replica stopped).
    pub async fn propose(&self, req: Request) -> Result<BoxFuture<Result<u64, String>>, String> {
        wait_apply_lag(&self.raft, Duration::from_secs(1)).await?;
        let tag = Tag::fresh();
        let req = match req {
            Request::Blocks(ops, _) => Request::Blocks(ops, tag),
            other => other,
        };
        let committed = self.commits.watch(tag);
        let (responder, answer) = openraft::impls::ProgressResponder::complete_only();
        self.raft.client_write_ff(req, Some(responder)).await.map_err(|e| e.to_string())?;
        let late = self.late.clone();
        Ok(Box::pin(async move {
            let (mut answer, mut committed) = (answer, committed);
            let first = tokio::select! {
                biased;
                c = &mut committed => Ok(c),
                // Only an error can come first: openraft answers after apply, which follows
                // commit.
                r = &mut answer => Err(r),
            };
            match first {
                Ok(c) => {
                    // openraft answers after apply; keep the receiver until it does.
                    late.keep(answer);
                    c
                }
                Err(Ok(Ok(r))) => Ok(r.log_id.index),
                Err(Ok(Err(e))) => Err(e.to_string()),
                Err(Err(_)) => Err("openraft dropped the proposal".to_string()),
            }
        }))
    }

    /// The replica stopped: every proposal still watched fails.
    pub fn close(&self) {
        self.commits.close();
    }
}

/// Holds openraft's answers to proposals already answered at commit until openraft sends them
/// (after apply): openraft logs a warning for every answer whose receiver is gone. One task per
/// replica awaits them in order, off the write path.
#[derive(Clone, Debug)]
pub struct LateAnswers(
    tokio::sync::mpsc::UnboundedSender<Pin<Box<dyn Future<Output = ()> + Send>>>,
);

impl LateAnswers {
    /// Starts the task on the current runtime; it ends when every handle is dropped.
    pub fn start() -> LateAnswers {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<Pin<Box<dyn Future<Output = ()> + Send>>>();
        tokio::spawn(async move {
            while let Some(answer) = rx.recv().await {
                answer.await;
            }
        });
        LateAnswers(tx)
    }

    /// Keeps `answer` until it resolves.
    pub fn keep<F: Future + Send + 'static>(&self, answer: F) {
        let _ = self.0.send(Box::pin(async move {
            let _ = answer.await;
        }));
    }
}

/// A watched proposal: resolves to its entry's index at commit, or to why it never will; forgets
/// the tag when dropped.
#[derive(Debug)]
pub struct Pending {
    rx: CommitReceiver,
    watch: Arc<CommitWatch>,
    tag: Tag,
}

impl Future for Pending {
    type Output = Result<u64, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err("the replica stopped".to_string())))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.watch.forget(self.tag);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_placed_entry_resolves_at_commit_and_a_truncated_one_fails() {
        let w = CommitWatch::default();
        let (a, b, c) = (Tag::fresh(), Tag::fresh(), Tag::fresh());
        let mut ra = w.register(a);
        let mut rb = w.register(b);
        let mut rc = w.register(c);
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
        let w = Arc::new(CommitWatch::default());
        let (a, b, c) = (Tag::fresh(), Tag::fresh(), Tag::fresh());
        let mut ra = w.register(a);
        let pb = w.watch(b);
        let mut rc = w.register(c);
        w.appended([(3, a), (9, c)]);
        // A snapshot through 5 replaced entry 3 without a truncation.
        w.purged(5);
        assert!(ra.try_recv().unwrap().unwrap_err().contains("snapshot"));
        assert!(rc.try_recv().is_err(), "entry 9 is still in the log");
        w.close();
        assert!(rc.try_recv().unwrap().unwrap_err().contains("stopped"));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(rt.block_on(pb).unwrap_err().contains("stopped"), "a watch never appended");
    }

    #[test]
    fn an_unregistered_or_forgotten_tag_is_ignored() {
        let w = CommitWatch::default();
        let t = Tag::fresh();
        let mut r = w.register(t);
        w.forget(t);
        w.appended([(1, t)]);
        w.committed(1);
        assert!(matches!(r.try_recv(), Err(oneshot::error::TryRecvError::Closed)));
        assert_eq!(Tag(1), Tag(2), "tags never make requests differ");
    }
}
