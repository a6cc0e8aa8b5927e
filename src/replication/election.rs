//! When a replica may campaign: pre-vote, on top of openraft 0.9 (which has none).
//!
//! A Raft candidate raises its term before it asks for votes. A voter that cannot win (its log
//! is behind: restarted, or back from a partition, or still receiving a snapshot) still raises
//! the term, and the leader steps down on seeing it: every such campaign costs the cluster an
//! election. The CI run of `cluster_membership` that failed showed it: a voter restarted after
//! the leader had purged past it campaigned 525 ms after starting, before the leader's
//! reconnect backoff let it through, and leadership churned.
//!
//! `ElectionGate` keeps openraft's elections switched off (`Config::enable_elect` is false from
//! the start) and switches them on only while a pre-vote round would win, as in §9.6 of Ongaro's
//! thesis. A voter that has not heard from a leader for `quiet` (the shortest election timeout)
//! asks every voter, without raising any term, whether it would vote for it now. A voter grants
//! only if it is not the leader, has not heard from one for `quiet` either, and holds no log
//! newer than the candidate's. Once a majority of every configuration (joint ones included)
//! grants, elections are on, and openraft's own timer decides when to campaign; a leader heard
//! from again switches them off. A chunk of a snapshot being received counts as hearing from
//! the leader for as long as it is handled, so a voter verifying a large snapshot does not
//! campaign either.
//!
//! Failover stays as fast: followers of a failed leader pass their pre-vote `quiet` after its
//! last heartbeat, well before openraft's timer (its leader lease plus the election timeout)
//! fires. Pre-vote only ever withholds a campaign; the vote itself is openraft's, so Raft's
//! safety does not depend on this module.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{LogId, ServerState};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::log_store::LogStore;
use super::network::{RaftReply, RaftRpc, Transport};
use super::types::{NodeId, Raft};

/// "Would you vote for me now?", asked without raising a term.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log_id: Option<LogId<NodeId>>,
}

/// The answer, with the reason for a refusal (logged by the candidate).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreVoteReply {
    Granted,
    /// The asked replica is the leader.
    IAmLeader,
    /// It heard from a leader this many milliseconds ago.
    HeardLeader {
        ms_ago: u64,
    },
    /// Its log is newer than the candidate's.
    LogNewer {
        mine: Option<LogId<NodeId>>,
    },
}

/// One replica's election switch; cheap to clone.
#[derive(Clone)]
pub struct ElectionGate {
    inner: Arc<Inner>,
}

struct Inner {
    me: NodeId,
    raft: Raft,
    log: LogStore,
    /// Not having heard from a leader for this long makes a replica a candidate for pre-vote,
    /// and makes it grant pre-votes.
    quiet: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When a leader's AppendEntries or snapshot chunk was last accepted.
    last_contact: Option<Instant>,
    /// Snapshot chunks being handled now: the leader is being heard from.
    receiving: usize,
    /// What openraft's switch was last set to.
    elect: bool,
}

impl std::fmt::Debug for ElectionGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElectionGate").field("me", &self.inner.me).finish_non_exhaustive()
    }
}

/// A snapshot chunk being handled; `accepted` counts it as hearing from the leader when it ends.
#[derive(Debug)]
pub struct Receiving {
    gate: ElectionGate,
    pub accepted: bool,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        let mut st = self.gate.state();
        st.receiving -= 1;
        if self.accepted {
            st.last_contact = Some(Instant::now());
        }
    }
}

impl ElectionGate {
    /// `log` is a handle on the replica's log store (for its last log id); `quiet` is the
    /// shortest election timeout.
    pub fn new(me: NodeId, raft: Raft, log: LogStore, quiet: Duration) -> ElectionGate {
        let state = Mutex::new(State::default());
        ElectionGate { inner: Arc::new(Inner { me, raft, log, quiet, state }) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("election gate lock")
    }

    /// A leader's AppendEntries was accepted (its vote is not below ours).
    pub fn heard_leader(&self) {
        self.state().last_contact = Some(Instant::now());
    }

    /// A snapshot chunk from the leader is being handled until the guard drops.
    pub fn receiving(&self) -> Receiving {
        self.state().receiving += 1;
        Receiving { gate: self.clone(), accepted: false }
    }

    /// How long ago a leader was last heard from: zero while a snapshot chunk is handled, None
    /// if never since this replica started.
    fn silence(&self, now: Instant) -> Option<Duration> {
        let st = self.state();
        if st.receiving > 0 {
            return Some(Duration::ZERO);
        }
        st.last_contact.map(|t| now.saturating_duration_since(t))
    }

    /// The silence, if a leader was heard from less than `quiet` ago.
    fn heard_recently(&self, now: Instant) -> Option<Duration> {
        self.silence(now).filter(|s| *s < self.inner.quiet)
    }

    /// Answers another voter's pre-vote.
    pub fn answer(&self, req: &PreVoteRequest) -> PreVoteReply {
        if self.inner.raft.metrics().borrow().state == ServerState::Leader {
            return PreVoteReply::IAmLeader;
        }
        let now = Instant::now();
        if let Some(s) = self.heard_recently(now) {
            return PreVoteReply::HeardLeader { ms_ago: s.as_millis() as u64 };
        }
        let mine = self.inner.log.last_log_id();
        if req.last_log_id < mine {
            return PreVoteReply::LogNewer { mine };
        }
        PreVoteReply::Granted
    }

    /// Sets openraft's election switch, logging changes.
    fn set_elect(&self, on: bool, why: &str) {
        let changed = {
            let mut st = self.state();
            std::mem::replace(&mut st.elect, on) != on
        };
        if changed {
            self.inner.raft.runtime_config().elect(on);
            if on {
                tracing::info!(node = self.inner.me, "elections on: {why}");
            } else {
                tracing::info!(node = self.inner.me, "elections off: {why}");
            }
        }
    }

    /// Decides, every `tick`, whether openraft may campaign, until the task is aborted.
    pub async fn run(self, transport: Arc<dyn Transport>, tick: Duration) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            if let Some((on, why)) = self.decide(&transport).await {
                self.set_elect(on, &why);
            }
        }
    }

    /// Whether openraft may campaign now and why; None for a leader (it does not campaign, and
    /// the switch is left as it was).
    async fn decide(&self, transport: &Arc<dyn Transport>) -> Option<(bool, String)> {
        let me = self.inner.me;
        let (state, configs, nodes) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let configs: Vec<BTreeSet<NodeId>> = membership.get_joint_config().clone();
            let nodes: Vec<(NodeId, openraft::BasicNode)> =
                membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
            (m.state, configs, nodes)
        };
        if state == ServerState::Leader {
            return None;
        }
        if !configs.iter().any(|c| c.contains(&me)) {
            return Some((false, "not a voter".into()));
        }
        if configs.iter().all(|c| c.len() == 1) {
            return Some((true, "the only voter".into()));
        }
        if self.heard_recently(Instant::now()).is_some() {
            return Some((false, "hearing from the leader".into()));
        }
        let voters: BTreeSet<NodeId> = configs.iter().flatten().copied().collect();
        let req = PreVoteRequest { candidate: me, last_log_id: self.inner.log.last_log_id() };
        let mut asks = tokio::task::JoinSet::new();
        for (id, node) in nodes.into_iter().filter(|(id, _)| *id != me && voters.contains(id)) {
            let transport = transport.clone();
            let rpc = RaftRpc::PreVote(req.clone());
            let timeout = self.inner.quiet;
            asks.spawn(async move { (id, transport.call(id, &node, rpc, timeout).await) });
        }
        let mut granted: BTreeSet<NodeId> = [me].into();
        let mut refusals = Vec::new();
        while let Some(done) = asks.join_next().await {
            let Ok((id, reply)) = done else { continue };
            match reply {
                Ok(RaftReply::PreVote(PreVoteReply::Granted)) => {
                    granted.insert(id);
                }
                Ok(RaftReply::PreVote(refused)) => refusals.push(format!("{id}: {refused:?}")),
                Ok(_) => refusals.push(format!("{id}: reply of the wrong kind")),
                Err(e) => refusals.push(format!("{id}: {e}")),
            }
        }
        let won = configs.iter().all(|c| c.intersection(&granted).count() * 2 > c.len());
        let granted: Vec<String> = granted.iter().map(|id| id.to_string()).collect();
        if won {
            Some((true, format!("pre-vote granted by {}", granted.join(", "))))
        } else {
            let why = format!(
                "pre-vote lost (granted by {}; refused: {})",
                granted.join(", "),
                refusals.join("; ")
            );
            tracing::debug!(node = me, "{why}");
            Some((false, why))
        }
    }
}
