//! Attachment and fencing under the device API, with three in-process members: a member that
//! attaches serves the device; when another attaches while the first is cut off, the first's
//! device fails every request (reads from its cache and free flushes included) and nothing it
//! sends under its old epoch reaches any replica's image; a detach lets unfenced writers in
//! again; a lease that lapses while the member still leads holds requests and serving resumes
//! once a quorum answers. The same paths over real processes and ublk are in the guest (`ublk/guest/e2e`,
//! the `members-*` tests).

#![allow(clippy::unwrap_used)]

mod common;

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use xdevice::device::local::{Embedded, EmbeddedOptions};
use xdevice::device::member::{Member, MemberOptions};
use xdevice::device::{CacheMode, Cluster, Device, DeviceConfig, DeviceError};
use xdevice::entry::BlockOp;
use xdevice::replication::node::Node;
use xdevice::replication::types::Request;
use xdevice::storage::image::Attachment;

const BS: usize = 4096;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

/// A member's options for the embedded three started with `opts`: the lease is their shortest
/// election timeout.
fn options(opts: &EmbeddedOptions) -> MemberOptions {
    let (election_min, election_max) = (opts.tuning.election_min, opts.tuning.election_max);
    MemberOptions {
        cluster_id: uuid::Uuid::nil(),
        // In process: the members never dial each other.
        security: xdevice::net::Security::Plaintext,
        bind: None,
        lease: election_min,
        election_max,
        hold: election_max * 2,
        attach_within: Duration::from_secs(20),
        timeout: Duration::from_secs(2),
        relinquished: Default::default(),
    }
}

/// Makes `to` the leader (openraft's transfer through the in-process transport) and returns it.
async fn lead(cluster: &Embedded, to: u64) -> Arc<Node> {
    for _ in 0..200 {
        if let Some(l) = cluster.leader() {
            if l.id == to {
                return l;
            }
            l.raft.trigger().transfer_leader(to).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node {to} never became the leader");
}

fn device(member: &Arc<Member>, blocks: u64) -> Arc<Device> {
    Device::start(DeviceConfig::new(BS as u32, blocks, CacheMode::Writeback), member.clone())
}

/// Block `lba` of replica `node`'s image.
fn image_block(node: &Node, lba: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    node.engine.image().read_blocks(lba, &mut b).unwrap();
    b
}

async fn applied_everywhere(cluster: &Embedded, index: u64) {
    for n in cluster.running() {
        let mut rx = n.raft.metrics();
        tokio::time::timeout(Duration::from_secs(10), async {
            while rx.borrow_watched().last_applied.map_or(0, |l| l.index) < index {
                rx.changed().await.unwrap();
            }
        })
        .await
        .unwrap_or_else(|_| panic!("replica {} did not apply {index}", n.id));
    }
}

#[test]
fn a_cut_off_server_is_fenced_when_another_member_attaches() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let opts = common::embedded_options(dir.path(), 3);
        let emax = opts.tuning.election_max;
        let cluster = Embedded::start(opts.clone()).await.unwrap();
        let blocks = cluster.device_bytes() / BS as u64;

        // Member 2 attaches: leadership moves to it, the attach entry's index is the epoch.
        let node2 = lead(&cluster, 2).await;
        let m2 = Member::attach(node2.clone(), options(&opts)).await.unwrap();
        let e2 = m2.epoch();
        for n in cluster.running() {
            applied_everywhere(&cluster, e2).await;
            assert_eq!(n.engine.attachment(), Some(Attachment { epoch: e2, node: 2 }));
        }
        let d2 = device(&m2, blocks);
        d2.write(0, &[1u8; BS], false).await.unwrap();
        d2.write(BS as u64, &[2u8; BS], true).await.unwrap();
        d2.flush().await.unwrap();
        assert_eq!(d2.read(0, BS as u64).await.unwrap(), vec![1u8; BS]);

        // Member 2 is cut off; member 3 attaches once the others elect a new leader.
        cluster.router.isolate(2, true);
        let node3 = lead(&cluster, 3).await;
        let m3 = Member::attach(node3.clone(), options(&opts)).await.unwrap();
        let e3 = m3.epoch();
        assert!(e3 > e2, "epochs rise: {e2} then {e3}");
        let d3 = device(&m3, blocks);
        d3.write(0, &[3u8; BS], true).await.unwrap();

        // Member 2 still thinks it leads, but its lease ran out: every request fails, even a
        // read its cache holds and a flush with nothing outstanding.
        let e = d2.read(0, BS as u64).await.unwrap_err();
        assert!(matches!(e, DeviceError::Fenced(_)), "{e:?}");
        assert!(!d2.try_flush_now(), "a fenced device answered a flush");
        assert!(matches!(d2.flush().await, Err(DeviceError::Fenced(_))));
        let mut buf = vec![0u8; BS];
        assert!(d2.try_read_cached(0, &mut buf).is_err(), "a fenced device answered from cache");
        assert!(matches!(
            d2.write(2 * BS as u64, &[9u8; BS], true).await,
            Err(DeviceError::Fenced(_))
        ));
        assert!(m2.serving().is_err());
        assert!(m2.fenced().is_some());

        // A write of the superseded epoch that does reach a leader's log is skipped by every
        // replica's state machine.
        let stale = Request::Fenced(
            e2,
            vec![BlockOp::Write { lba: 1, data: vec![7u8; BS].into() }],
            Default::default(),
        );
        let commit = node3.proposer.propose(stale).await.unwrap();
        let index = commit.await.unwrap();
        cluster.router.isolate(2, false);
        applied_everywhere(&cluster, index).await;
        for n in cluster.running() {
            assert_eq!(image_block(&n, 0), vec![3u8; BS], "replica {}: member 3's write", n.id);
            assert_eq!(
                image_block(&n, 1),
                vec![2u8; BS],
                "replica {}: the stale write landed",
                n.id
            );
            assert_eq!(
                image_block(&n, 2),
                vec![0u8; BS],
                "replica {}: a write its device refused landed",
                n.id
            );
            assert!(n.engine.fenced_writes() >= 1, "replica {} skipped nothing", n.id);
        }
        // Still fenced after the partition heals and member 2 hears of the new term.
        tokio::time::sleep(emax).await;
        assert!(matches!(d2.read(0, BS as u64).await, Err(DeviceError::Fenced(_))));

        // Member 3 detaches: its epoch is refused from then on, like member 2's; an unfenced
        // write (a writer outside the attachment scheme, answered at commit) applies.
        d3.flush().await.unwrap();
        d3.close();
        let detached = m3.detach().await.unwrap();
        applied_everywhere(&cluster, detached).await;
        assert_eq!(node3.engine.attachment(), Some(Attachment { epoch: detached, node: 0 }));
        assert!(m3.serving().is_err(), "a detached member still serves");
        let late = vec![BlockOp::Write { lba: 5, data: vec![5u8; BS].into() }];
        let late = node3.proposer.propose(Request::Fenced(e3, late, Default::default()));
        let late = late.await.unwrap().await.unwrap();
        let unfenced = Request::blocks(vec![BlockOp::Write { lba: 4, data: vec![4u8; BS].into() }]);
        let index = node3.proposer.propose(unfenced).await.unwrap().await.unwrap();
        applied_everywhere(&cluster, index.max(late)).await;
        for n in cluster.running() {
            assert_eq!(
                image_block(&n, 5),
                vec![0u8; BS],
                "replica {}: a detached epoch's write",
                n.id
            );
            assert_eq!(image_block(&n, 4), vec![4u8; BS], "replica {}", n.id);
        }
        d2.close();
        cluster.shutdown().await.unwrap();
    });
}

/// The attachment is part of the image's applied state: a restarted replica fences the same
/// writes as before.
#[test]
fn the_attachment_survives_a_restart() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let opts = common::embedded_options(dir.path(), 3);
        let cluster = Embedded::start(opts.clone()).await.unwrap();
        let node1 = lead(&cluster, 1).await;
        let m1 = Member::attach(node1.clone(), options(&opts)).await.unwrap();
        let epoch = m1.epoch();
        applied_everywhere(&cluster, epoch).await;
        // Replica 1's image is checkpointed with the attachment in its header; the others'
        // are not, so theirs comes back through the replay of the committed log.
        node1.engine.checkpoint().unwrap();
        drop(m1);
        cluster.shutdown().await.unwrap();
        drop(cluster);
        let cluster = Embedded::start(opts).await.unwrap();
        applied_everywhere(&cluster, epoch).await;
        for n in cluster.running() {
            assert_eq!(
                n.engine.attachment(),
                Some(Attachment { epoch, node: 1 }),
                "replica {}",
                n.id
            );
        }
        cluster.shutdown().await.unwrap();
    });
}

/// A member that hands its leadership over stops serving first: openraft's transfer lets the
/// voters elect another member at once, without waiting out this one's lease, so nothing the
/// lease promised holds any more. Its device fails reads the cache holds and flushes from then on.
#[test]
fn a_member_that_hands_its_leadership_over_stops_serving_first() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let opts = common::embedded_options(dir.path(), 3);
        let cluster = Embedded::start(opts.clone()).await.unwrap();
        let blocks = cluster.device_bytes() / BS as u64;
        let node1 = lead(&cluster, 1).await;
        let member_opts = options(&opts);
        let m1 = Member::attach(node1.clone(), member_opts.clone()).await.unwrap();
        let d1 = device(&m1, blocks);
        d1.write(0, &[1u8; BS], true).await.unwrap();
        assert_eq!(d1.read(0, BS as u64).await.unwrap(), vec![1u8; BS]);
        assert!(m1.serving().is_ok());
        // The handover's first step (`DeviceHost::relinquish`): this term's attachments end,
        // while node 1 still leads with a fresh lease.
        member_opts.relinquished.store(m1.term(), std::sync::atomic::Ordering::SeqCst);
        assert_eq!(cluster.leader().map(|l| l.id), Some(1));
        assert!(matches!(d1.read(0, BS as u64).await, Err(DeviceError::Fenced(_))));
        assert!(!d1.try_flush_now());
        // An attachment of a later term is not affected.
        node1.raft.trigger().transfer_leader(2).await.unwrap();
        let node2 = lead(&cluster, 2).await;
        let m2 = Member::attach(node2, options(&opts)).await.unwrap();
        lead(&cluster, 1).await;
        let m1b = Member::attach(node1, member_opts.clone()).await.unwrap();
        assert!(m1b.term() > m1.term());
        assert!(m1b.serving().is_ok(), "a later term's attachment was fenced");
        assert!(m2.serving().is_err());
        d1.close();
        cluster.shutdown().await.unwrap();
    });
}

/// A lease that runs out while the member still leads in its term (a stall, a short cut) is a
/// lapse, not a loss: while it lasts nothing is answered from the member alone (not a read its
/// cache holds, not a flush with nothing outstanding), and once a quorum acknowledges it again
/// the device goes on serving, the requests held meanwhile answered with the right data.
#[test]
fn a_lapsed_lease_holds_requests_until_a_quorum_answers_again() {
    runtime().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = common::embedded_options(dir.path(), 3);
        // The followers wait at least 1.8 s before electing anyone; the lease is 300 ms.
        opts.tuning.election_min = Duration::from_millis(300);
        opts.tuning.election_max = Duration::from_millis(1500);
        let (emin, emax) = (opts.tuning.election_min, opts.tuning.election_max);
        let cluster = Embedded::start(opts.clone()).await.unwrap();
        let blocks = cluster.device_bytes() / BS as u64;
        let node1 = lead(&cluster, 1).await;
        let m1 = Member::attach(node1.clone(), options(&opts)).await.unwrap();
        let d1 = device(&m1, blocks);
        d1.write(0, &[5u8; BS], true).await.unwrap();
        let mut buf = vec![0u8; BS];
        assert!(d1.try_read_cached(0, &mut buf).unwrap(), "the write is not in the cache");

        cluster.router.isolate(1, true);
        let cut = std::time::Instant::now();
        while !matches!(m1.serving(), Err(xdevice::device::NotServing::Lapsed(_))) {
            assert!(
                cut.elapsed() < emax,
                "no lapse {:?} after the cut: {:?}",
                cut.elapsed(),
                m1.serving()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!d1.try_read_cached(0, &mut buf).unwrap(), "a lapsed device answered from cache");
        assert!(!d1.try_flush_now(), "a lapsed device answered a flush");
        let read = tokio::spawn({
            let d1 = d1.clone();
            async move { d1.read(0, BS as u64).await }
        });
        let write = tokio::spawn({
            let d1 = d1.clone();
            async move { d1.write(BS as u64, &[6u8; BS], true).await }
        });
        let flush = tokio::spawn({
            let d1 = d1.clone();
            async move { d1.flush().await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !read.is_finished() && !write.is_finished() && !flush.is_finished(),
            "a request was answered during the lapse"
        );
        assert!(cut.elapsed() < emax + emin, "the cut outlasted the followers' patience");
        cluster.router.isolate(1, false);

        assert_eq!(read.await.unwrap().unwrap(), vec![5u8; BS]);
        write.await.unwrap().unwrap();
        flush.await.unwrap().unwrap();
        assert!(m1.serving().is_ok(), "{:?}", m1.serving());
        assert!(m1.fenced().is_none());
        assert_eq!(node1.raft.metrics().borrow_watched().current_term, m1.term());
        assert_eq!(d1.read(BS as u64, BS as u64).await.unwrap(), vec![6u8; BS]);
        d1.close();
        cluster.shutdown().await.unwrap();
    });
}
