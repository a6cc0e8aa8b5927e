//! `xdevice cluster`: manage a node cluster through any of its nodes (init, add, remove,
//! transfer, attach, detach, status), each with text for a person or `--json` for a script.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::exit::TimedOut;
use super::TlsArgs;
use crate::net::tls::Identity;
use crate::net::Security;
use crate::replication::snapshot::ReceivePhase;
use crate::replication::tcp::{Admin, AdminReply, NodeClient, NodeError, NodeStatus};
use crate::replication::types::NodeId;

/// Options of `xdevice cluster`.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// Any node of the cluster (`add` and `remove` find the leader through it).
    #[arg(long)]
    pub node: SocketAddr,
    /// The cluster id every node's store was formatted with.
    #[arg(long)]
    pub cluster_id: uuid::Uuid,
    /// Print JSON (before or after the subcommand).
    #[arg(long, global = true)]
    pub json: bool,
    /// The admin certificate (`admin.pem` and `.key` in --tls-dir), or --plaintext.
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(subcommand)]
    pub op: ClusterOp,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterOp {
    /// Make a new cluster from fresh nodes: --member ID=ADDR for each voter.
    /// Returns once a leader is elected and prints it (exit status 4 if none is within
    /// --timeout-secs).
    Init {
        #[arg(long = "member", value_parser = parse_member, required = true)]
        members: Vec<(NodeId, String)>,
        /// How long to wait for the first leader.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Add a node: as a learner, wait until it has caught up (by snapshot and log, progress on
    /// stderr), then make it a voter. With --json, one JSON object on stdout at the end instead.
    Add {
        #[arg(long)]
        id: NodeId,
        #[arg(long)]
        addr: SocketAddr,
        /// Leave it a learner (still waits until it has caught up).
        #[arg(long)]
        learner: bool,
        /// Give up, leaving it a learner, after this many seconds without progress (a snapshot
        /// being verified and installed on the node does not count as a stall).
        #[arg(long, default_value_t = 60)]
        stall_secs: u64,
    },
    /// Remove a node; the leader stops replicating to it.
    Remove {
        #[arg(long)]
        id: NodeId,
    },
    /// Move leadership to --node: the leader hands it over, and the command returns once --node
    /// leads (exit status 4 if it does not within 10 s).
    Transfer,
    /// Serve the device from --node (a member started by root on a host with ublk): it wins
    /// leadership, commits an attach entry that fences whichever member served before, and
    /// serves /dev/ublkbN on its host. Prints the path, the attachment's epoch and the time it
    /// took. The failover command once the serving host is lost.
    Attach,
    /// Stop serving the device from --node: its device is stopped (in-flight I/O drained),
    /// everything completed committed, and a detach entry committed.
    Detach,
    /// Show the node's view: role, term, leader, log positions, membership, incoming snapshot.
    Status,
}

fn parse_member(s: &str) -> std::result::Result<(NodeId, String), String> {
    let (id, addr) = s.split_once('=').ok_or("expected ID=ADDR, like 1=127.0.0.1:7001")?;
    let id: NodeId = id.parse().map_err(|e| format!("node id {id:?}: {e}"))?;
    let addr: SocketAddr = addr.parse().map_err(|e| format!("address {addr:?}: {e}"))?;
    Ok((id, addr.to_string()))
}

/// Membership changes wait for a commit; a status answer is immediate.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// A node of the cluster, by address.
#[derive(Clone, Debug)]
struct Peer {
    addr: SocketAddr,
    client: NodeClient,
    security: Security,
}

impl Peer {
    fn new(addr: SocketAddr, cluster_id: uuid::Uuid, security: &Security) -> Peer {
        let client = NodeClient::new(addr, None, cluster_id, security);
        Peer { addr, client, security: security.clone() }
    }

    async fn ask(&self, req: Admin, timeout: Duration) -> Result<AdminReply> {
        let addr = self.addr;
        self.client.admin(req, timeout).await.map_err(|e| anyhow::Error::new(e).context(addr))
    }

    async fn status(&self) -> Result<Box<NodeStatus>> {
        match self.ask(Admin::Status, STATUS_TIMEOUT).await? {
            AdminReply::Status(s) => Ok(s),
            other => bail!("{}: unexpected reply to status: {other:?}", self.addr),
        }
    }

    /// The leader as this node knows it, with its status.
    /// An election under way is waited out (up to `STATUS_TIMEOUT`): a node that knows no
    /// leader yet, or names one that has just lost leadership, is asked again.
    async fn leader(&self, cluster_id: uuid::Uuid) -> Result<(Peer, Box<NodeStatus>)> {
        let deadline = Instant::now() + STATUS_TIMEOUT;
        loop {
            match self.leader_now(cluster_id).await {
                Err(e) if Instant::now() < deadline && e.to_string().ends_with("try again") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                outcome => return outcome,
            }
        }
    }

    /// Asks the leader `req`; a leader that has just lost leadership (openraft answers that
    /// the request has to be forwarded) is looked up again, up to `STATUS_TIMEOUT`. The leader
    /// that answered.
    async fn through_leader(&self, cluster_id: uuid::Uuid, req: Admin) -> Result<Peer> {
        let deadline = Instant::now() + STATUS_TIMEOUT;
        loop {
            let (leader, _) = self.leader(cluster_id).await?;
            match leader.ask(req.clone(), CHANGE_TIMEOUT).await {
                Err(e)
                    if Instant::now() < deadline
                        && e.downcast_ref::<NodeError>().is_some_and(NodeError::not_leader) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
                Ok(_) => return Ok(leader),
            }
        }
    }

    async fn leader_now(&self, cluster_id: uuid::Uuid) -> Result<(Peer, Box<NodeStatus>)> {
        let s = self.status().await?;
        if s.state == "Leader" {
            return Ok((self.clone(), s));
        }
        let Some(id) = s.leader else {
            bail!("{} ({}, term {}) knows no leader now; try again", self.addr, s.state, s.term)
        };
        let addr = s.nodes.get(&id).ok_or_else(|| anyhow!("leader {id} has no address"))?;
        let addr: SocketAddr =
            addr.parse().map_err(|e| anyhow!("leader {id}'s address {addr:?}: {e}"))?;
        let peer = Peer::new(addr, cluster_id, &self.security);
        let s = peer.status().await?;
        if s.state != "Leader" {
            bail!("node {id} at {addr} is no longer the leader ({}); try again", s.state);
        }
        Ok((peer, s))
    }
}

pub fn run_cluster(args: ClusterArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let security = args.tls.source()?.security(args.cluster_id, Identity::Admin);
        let security = security.map_err(super::exit::usage)?;
        let node = Peer::new(args.node, args.cluster_id, &security);
        match args.op {
            ClusterOp::Init { members, timeout_secs } => {
                node.ask(Admin::Init(members), CHANGE_TIMEOUT).await?;
                let within = Duration::from_secs(timeout_secs);
                let s = wait_leader(&node, within).await?;
                let leader = s.leader.unwrap_or_default();
                say(
                    args.json,
                    &serde_json::json!({ "leader": leader, "term": s.term, "voters": s.voters }),
                    format_args!("initialised: node {leader} leads at term {}", s.term),
                )
            }
            ClusterOp::Add { id, addr, learner, stall_secs } => {
                let stall = Duration::from_secs(stall_secs);
                add_node(&node, args.cluster_id, id, addr, learner, stall, args.json).await
            }
            ClusterOp::Remove { id } => {
                let leader = node.through_leader(args.cluster_id, Admin::Remove(id)).await?;
                let s = leader.status().await?;
                say(
                    args.json,
                    &serde_json::json!({ "removed": id, "voters": s.voters, "learners": s.learners }),
                    format_args!("removed node {id}; voters {}", list(&s.voters)),
                )
            }
            ClusterOp::Transfer => {
                let me = node.status().await?.id;
                if node.status().await?.state != "Leader" {
                    node.through_leader(args.cluster_id, Admin::Handover(me)).await?;
                }
                let s = wait_leading(&node, STATUS_TIMEOUT * 2).await?;
                let leader = s.id;
                say(
                    args.json,
                    &serde_json::json!({ "leader": leader, "term": s.term }),
                    format_args!("node {leader} leads at term {}", s.term),
                )
            }
            ClusterOp::Attach => {
                let a = match node.ask(Admin::Attach, CHANGE_TIMEOUT).await? {
                    AdminReply::Attached(a) => a,
                    other => bail!("{}: unexpected reply to attach: {other:?}", node.addr),
                };
                if args.json {
                    println!("{}", serde_json::to_string(&a)?);
                } else {
                    println!("{}", a.path);
                    eprintln!(
                        "attached to {} at epoch {} (term {}) in {:.3}s",
                        node.addr,
                        a.epoch,
                        a.term,
                        a.millis as f64 / 1000.0
                    );
                }
                Ok(())
            }
            ClusterOp::Detach => {
                node.ask(Admin::Detach, CHANGE_TIMEOUT).await?;
                say(
                    args.json,
                    &serde_json::json!({ "detached": node.addr.to_string() }),
                    format_args!("detached: {} serves the device no longer", node.addr),
                )
            }
            ClusterOp::Status => {
                let s = node.status().await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                } else {
                    print!("{}", status_table(&s));
                }
                Ok(())
            }
        }
    })
}

/// `value` as JSON with `--json`, else `text`: on stdout either way.
fn say(json: bool, value: &serde_json::Value, text: std::fmt::Arguments) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

/// Node ids as `1, 2, 3` (`none` for none).
fn list(ids: &[NodeId]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The node's status as a person reads it: the node, its log, the attachment, and a table of
/// the members.
fn status_table(s: &NodeStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let leader = s.leader.map_or_else(|| "none".to_string(), |l| format!("node {l}"));
    let _ = writeln!(
        out,
        "node      {} ({}, term {}), leader {leader}",
        s.id,
        s.state.to_lowercase(),
        s.term
    );
    let _ = writeln!(
        out,
        "log       last {}, applied {}, snapshot {}, purged {}",
        opt(s.last_log_index),
        opt(s.last_applied),
        opt(s.snapshot),
        opt(s.purged)
    );
    let device = match s.attachment {
        Some((epoch, 0)) => format!("detached (epoch {epoch})"),
        Some((epoch, id)) => format!("served by node {id} (epoch {epoch})"),
        None => "never attached".to_string(),
    };
    let _ = writeln!(out, "device    {device}");
    if s.fenced_writes > 0 {
        let _ = writeln!(out, "fenced    {} writes of superseded servers skipped", s.fenced_writes);
    }
    if let Some(t) = s.snapshot_in {
        let phase = match t.phase {
            ReceivePhase::Receiving => "receiving",
            _ => "installing",
        };
        let _ = writeln!(out, "snapshot  {phase} {} of {}", mib(t.received), mib(t.total));
    }
    let _ = writeln!(out, "{:<6} {:<22} {:<8} MATCHED", "ID", "ADDRESS", "ROLE");
    for (id, addr) in &s.nodes {
        let role = if s.voters.contains(id) { "voter" } else { "learner" };
        let matched = if *id == s.id {
            "(this node)".to_string()
        } else if s.state == "Leader" {
            opt(s.replication.get(id).copied().flatten())
        } else {
            "-".to_string()
        };
        let _ = writeln!(out, "{id:<6} {addr:<22} {role:<8} {matched}");
    }
    out
}

/// Polls `node` until it leads; exit status 4 past `within`.
async fn wait_leading(node: &Peer, within: Duration) -> Result<Box<NodeStatus>> {
    let deadline = Instant::now() + within;
    loop {
        let s = node.status().await?;
        if s.state == "Leader" {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            let leader = s.leader.map_or_else(|| "no node".to_string(), |l| format!("node {l}"));
            return Err(TimedOut(format!(
                "node {} did not take leadership within {}s: {leader} leads at term {}",
                s.id,
                within.as_secs(),
                s.term
            ))
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `node` until it knows a leader; exit status 4 past `within`.
async fn wait_leader(node: &Peer, within: Duration) -> Result<Box<NodeStatus>> {
    let deadline = Instant::now() + within;
    loop {
        let last = node.status().await;
        if let Ok(s) = &last {
            if s.leader.is_some() {
                return last;
            }
        }
        if Instant::now() >= deadline {
            let why = match last {
                Ok(s) => format!("{} is {} at term {}", node.addr, s.state.to_lowercase(), s.term),
                Err(e) => format!("{e:#}"),
            };
            return Err(TimedOut(format!("no leader within {}s: {why}", within.as_secs())).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// What `cluster add --json` prints.
#[derive(Debug, serde::Serialize)]
struct AddReport {
    node: NodeId,
    addr: String,
    /// Log index of the membership entry that added it as a learner.
    learner_index: u64,
    /// The leader's matched index for it when it was found caught up (≥ `learner_index`).
    caught_up_index: u64,
    voter: bool,
    voters: Vec<NodeId>,
    /// From the learner being added to it being caught up.
    catch_up_seconds: f64,
    /// Snapshot stream bytes seen received (0 when it caught up from the log alone).
    snapshot_bytes: u64,
    /// From the first sight of the snapshot arriving to the first sight of it complete.
    snapshot_seconds: f64,
    snapshots_installed: u64,
}

/// Progress lines on stderr (none with --json).
/// Catch-up progress on stderr: a bar (indicatif) on a terminal, plain lines otherwise (a
/// log, a pipe), nothing with `--json`.
struct Progress {
    id: NodeId,
    quiet: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(id: NodeId, quiet: bool) -> Progress {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "node {prefix}: {msg:<24} [{wide_bar}] {percent:>3}%",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            let bar = indicatif::ProgressBar::new(1).with_style(style);
            bar.set_prefix(id.to_string());
            bar
        });
        Progress { id, quiet, bar }
    }

    /// A line that stays: above the bar, or on its own.
    fn say(&self, line: impl std::fmt::Display) {
        match (&self.bar, self.quiet) {
            (_, true) => {}
            (Some(bar), false) => bar.println(format!("node {}: {line}", self.id)),
            (None, false) => eprintln!("node {}: {line}", self.id),
        }
    }

    /// Where the catch-up stands: the bar moves, or (off a terminal) `line` is printed.
    fn progress(&self, position: u64, length: u64, what: &str, line: impl std::fmt::Display) {
        match (&self.bar, self.quiet) {
            (_, true) => {}
            (Some(bar), false) => {
                bar.set_length(length.max(1));
                bar.set_position(position.min(length));
                bar.set_message(what.to_string());
            }
            (None, false) => eprintln!("node {}: {line}", self.id),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `cluster add`: adds `id` as a learner through the leader, follows its catch-up (the leader's
/// matched index for it; the learner's own incoming snapshot) until the leader has replicated
/// the membership entry to it, then makes it a voter unless `learner`.
async fn add_node(
    node: &Peer,
    cluster_id: uuid::Uuid,
    id: NodeId,
    addr: SocketAddr,
    learner: bool,
    stall: Duration,
    json: bool,
) -> Result<()> {
    let out = Progress::new(id, json);
    let (mut leader, _) = node.leader(cluster_id).await?;
    let learner_peer = Peer::new(addr, cluster_id, &node.security);
    // Snapshots it installed before this add do not count.
    let installed_before = learner_peer.status().await.map_or(0, |s| s.snapshots_installed);
    out.say(format_args!("adding at {addr} as a learner (through leader {})", leader.addr));
    let target = match leader.ask(Admin::AddLearner(id, addr.to_string()), CHANGE_TIMEOUT).await? {
        AdminReply::Index(i) => i,
        other => bail!("unexpected reply to add-learner: {other:?}"),
    };
    let started = Instant::now();
    out.say(format_args!("learner from log index {target}; waiting for it to catch up"));

    let mut last_change = Instant::now();
    let mut last_seen = None;
    // (when, bytes) of the last snapshot progress line, and when the stream was first seen.
    let mut last_line: Option<(Instant, u64)> = None;
    let mut snap_first: Option<Instant> = None;
    let mut snap_bytes = 0u64;
    let mut snap_seconds = 0f64;
    let mut installing_said = false;
    let mut installs_said = installed_before;
    let mut log_said = Instant::now();
    let caught_up = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let leader_status = match leader.status().await {
            Ok(s) if s.state == "Leader" => s,
            _ => match node.leader(cluster_id).await {
                Ok((l, s)) => {
                    leader = l;
                    s
                }
                Err(e) => {
                    if last_change.elapsed() > stall {
                        return Err(e.context(format!("node {id} was added as a learner")));
                    }
                    continue;
                }
            },
        };
        let matched = leader_status.replication.get(&id).copied().flatten();
        let theirs = learner_peer.status().await.ok();
        let incoming = theirs.as_ref().and_then(|s| s.snapshot_in);
        let installed = theirs.as_ref().map_or(0, |s| s.snapshots_installed);
        let now = Instant::now();
        if installed > installs_said {
            installs_said = installed;
            let at = theirs.as_ref().and_then(|s| s.snapshot);
            let at = at.map_or("?".to_string(), |i| i.to_string());
            out.say(format_args!("snapshot installed at log index {at}"));
            if snap_seconds == 0.0 {
                snap_seconds = snap_first.map_or(0.0, |f| (now - f).as_secs_f64());
            }
        }
        if matched >= Some(target) {
            break matched.unwrap_or(target);
        }
        let seen = (matched, incoming.map(|t| (t.phase, t.received)), installed);
        if last_seen.as_ref() != Some(&seen) {
            last_seen = Some(seen);
            last_change = now;
        }
        match incoming {
            Some(t) if t.phase == ReceivePhase::Receiving => {
                installing_said = false;
                snap_bytes = t.received;
                let of = format!("{} / {}", mib(t.received), mib(t.total));
                let pct = t.received * 100 / t.total.max(1);
                if last_line.is_some_and(|(_, b)| t.received < b) {
                    out.say("snapshot restarted");
                    last_line = None;
                }
                match last_line {
                    None => {
                        snap_first.get_or_insert(now);
                        let line = format_args!("receiving snapshot {of} ({pct}%)");
                        out.progress(t.received, t.total, "receiving the snapshot", line);
                        last_line = Some((now, t.received));
                    }
                    Some((at, from)) if now - at >= Duration::from_secs(1) => {
                        let rate = (t.received - from) as f64
                            / (now - at).as_secs_f64()
                            / f64::from(1 << 20);
                        let line =
                            format_args!("receiving snapshot {of} ({pct}%), {rate:.0} MiB/s");
                        out.progress(t.received, t.total, "receiving the snapshot", line);
                        last_line = Some((now, t.received));
                    }
                    Some(_) => {}
                }
            }
            Some(t) => {
                if !installing_said {
                    installing_said = true;
                    snap_bytes = t.received;
                    snap_seconds = snap_first.map_or(0.0, |f| (now - f).as_secs_f64());
                    out.say(format_args!(
                        "snapshot received ({}); verifying and installing",
                        mib(t.received)
                    ));
                }
                // Local work on the node: not a stall.
                last_change = now;
            }
            None => {
                installing_said = false;
                if now - log_said >= Duration::from_secs(2) {
                    log_said = now;
                    let held = matched.unwrap_or(0);
                    let line =
                        format_args!("replicating the log: matched {} of {target}", opt(matched));
                    out.progress(held, target, "replicating the log", line);
                }
            }
        }
        if last_change.elapsed() > stall {
            bail!(
                "node {id} made no progress for {}s (matched {} of {target}); it stays \
                 a learner: check that it runs at {addr}, then add it again or remove it",
                stall.as_secs(),
                opt(matched)
            );
        }
    };
    out.finish();
    let catch_up = started.elapsed();
    out.say(format_args!(
        "log caught up to index {caught_up} in {:.1}s{}",
        catch_up.as_secs_f64(),
        if snap_bytes > 0 {
            format!(
                " (snapshot of {} in {snap_seconds:.1}s, {:.0} MiB/s)",
                mib(snap_bytes),
                snap_bytes as f64 / snap_seconds.max(1e-3) / f64::from(1 << 20)
            )
        } else {
            String::new()
        }
    ));
    let mut voters = leader.status().await?.voters;
    if !learner && !voters.contains(&id) {
        voters.push(id);
        out.say("promoting to voter");
        leader.ask(Admin::SetVoters(voters.clone()), CHANGE_TIMEOUT).await?;
        voters = leader.status().await?.voters;
        if !voters.contains(&id) {
            bail!("node {id} is not a voter after promotion (voters {})", list(&voters));
        }
        out.say(format_args!("now a voter (voters {})", list(&voters)));
    }
    let installed = learner_peer.status().await.map_or(0, |s| s.snapshots_installed);
    if json {
        let report = AddReport {
            node: id,
            addr: addr.to_string(),
            learner_index: target,
            caught_up_index: caught_up,
            voter: voters.contains(&id),
            voters,
            catch_up_seconds: catch_up.as_secs_f64(),
            snapshot_bytes: snap_bytes,
            snapshot_seconds: snap_seconds,
            snapshots_installed: installed.saturating_sub(installed_before),
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let role = if voters.contains(&id) { "a voter" } else { "a learner" };
        println!("node {id} added as {role} (voters {})", list(&voters));
    }
    Ok(())
}
