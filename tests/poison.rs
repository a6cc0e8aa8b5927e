//! A failed write, flush or creation of anything durable poisons the engine: the failing call
//! reports it, nothing queued is ever acknowledged, every later write path refuses with
//! `StorageError::Poisoned`, and reopening what is durable recovers everything acknowledged before.

mod common;

use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use common::*;
use xdevice::storage::disk::{CrashPlan, Fault, FaultOp, SimVolume};
use xdevice::storage::engine::{Engine, EngineConfig};
use xdevice::storage::state::LogId;
use xdevice::storage::wal::{Callback, CommitMode, NewEntry};
use xdevice::storage::StorageError;

/// The fault a scenario injects, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// EIO from the data sync of a WAL batch.
    WalSync,
    /// EIO from the write of a WAL batch.
    WalWrite,
    /// EIO from the data sync of the image at a checkpoint.
    CheckpointSync,
    /// EIO from the write of a hard-state slot.
    StateWrite,
    /// EIO from the sync of a hard-state slot.
    StateSync,
    /// ENOSPC creating the next segment: the spare prepared, off the commit path, when the WAL
    /// rotates to the one prepared before it.
    SpareEnospc,
    /// EIO from the directory sync that makes that spare's creation durable.
    SpareDirSync,
    /// EIO from a block write of the image while applying committed entries.
    ApplyWrite,
}

fn config(mode: CommitMode) -> EngineConfig {
    let mut cfg = inline_config();
    cfg.wal.mode = mode;
    cfg
}

/// Entry `i` of every scenario: incompressible blocks so rotation comes at a known pace.
fn entry(i: u64) -> NewEntry {
    block_entry(i, 1, i % 60, 1 + (i as usize % 2), i * 3 + 1)
}

fn payload(i: u64) -> Vec<u8> {
    entry(i).payload.to_vec()
}

/// The device after entries `0..=upto` are applied.
fn model_through(upto: Option<u64>) -> Vec<u8> {
    let mut model = vec![0u8; 64 * BLOCK];
    for i in upto.map_or(0..0, |u| 0..u + 1) {
        let blocks = 1 + (i as usize % 2);
        let at = (i % 60) as usize * BLOCK;
        model[at..at + blocks * BLOCK].copy_from_slice(&pattern(i % 60, blocks, i * 3 + 1));
    }
    model
}

fn committed(index: u64) -> Option<LogId> {
    Some(LogId { term: 1, node: 1, index })
}

/// A callback that reports its outcome on a channel.
fn reporting_callback() -> (Callback, Receiver<Result<(), String>>) {
    let (tx, rx) = mpsc::channel();
    let cb: Callback = Box::new(move |result| {
        let _ = tx.send(result.map_err(|e| e.to_string()));
    });
    (cb, rx)
}

fn is_poisoned<T: std::fmt::Debug>(result: Result<T, StorageError>) -> bool {
    matches!(result, Err(StorageError::Poisoned { .. }))
}

/// What was durable and acknowledged when the fault struck.
#[derive(Debug)]
struct Acknowledged {
    /// Entries `0..entries` were acknowledged by a successful flush.
    entries: u64,
    /// The last hard state whose update returned Ok.
    committed: Option<LogId>,
}

/// Opens a fresh store, acknowledges 20 entries, commits 14 and checkpoints at 9.
fn prepare(mode: CommitMode) -> (std::sync::Arc<SimVolume>, Engine, Acknowledged) {
    let volume = formatted_volume();
    let (engine, _) = Engine::open(&dir_location(&volume), config(mode)).expect("open");
    for range in [0..12u64, 12..20] {
        engine.wal().append(range.map(entry).collect()).expect("append");
        engine.wal().flush().expect("flush");
    }
    engine.state().update(|s| s.committed = committed(9)).expect("commit 9");
    engine.apply_through(9).expect("apply");
    engine.checkpoint().expect("checkpoint");
    engine.state().update(|s| s.committed = committed(14)).expect("commit 14");
    let ack = Acknowledged { entries: 20, committed: committed(14) };
    (volume, engine, ack)
}

/// The first index whose one-entry flush rotates the WAL after `prepare` (found on a probe store:
/// the sizes are deterministic).
fn rotation_index(mode: CommitMode) -> u64 {
    let (_volume, engine, _) = prepare(mode);
    let before = engine.wal().segments().len();
    for i in 20..200 {
        engine.wal().append(vec![entry(i)]).expect("append");
        engine.wal().flush().expect("flush");
        if engine.wal().segments().len() > before {
            return i;
        }
    }
    panic!("no rotation within 180 entries");
}

/// Waits until the WAL holds a prepared spare (the preparing thread makes it after open).
fn wait_for_spare(engine: &Engine) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.wal().spare().is_none() {
        assert!(std::time::Instant::now() < deadline, "no spare prepared within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the engine is poisoned (a fault off the commit path, in the preparing thread).
fn wait_for_poison(engine: &Engine) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.poisoned().is_none() {
        assert!(std::time::Instant::now() < deadline, "not poisoned within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An append whose callback outcome is observed. `registered` is false when `append_with`
/// refused it (the engine was already poisoned): then the callback must never report Ok.
struct Observed {
    rx: Receiver<Result<(), String>>,
    registered: bool,
}

/// Injects the scenario's fault and drives the engine into it. Returns the error the failing
/// call reported, and the callbacks of appends that were pending when the fault struck.
fn strike(
    scenario: Scenario,
    mode: CommitMode,
    volume: &SimVolume,
    engine: &Engine,
    ack: &mut Acknowledged,
) -> (StorageError, Vec<Observed>) {
    let mut observed = Vec::new();
    let err = match scenario {
        Scenario::WalSync | Scenario::WalWrite => {
            let op = if scenario == Scenario::WalSync { FaultOp::Sync } else { FaultOp::Write };
            volume.inject(op, Fault::Eio, 0);
            let mut tickets = Vec::new();
            for (first, count) in [(20u64, 3u64), (23, 2)] {
                let (cb, rx) = reporting_callback();
                let entries = (first..first + count).map(entry).collect();
                let registered = match engine.wal().append_with(entries, cb) {
                    Ok(ticket) => {
                        tickets.push(ticket);
                        true
                    }
                    // The commit thread may already have failed the first batch.
                    Err(StorageError::Poisoned { .. }) if mode == CommitMode::Thread => false,
                    Err(e) => panic!("{scenario:?}: append before the fault: {e}"),
                };
                observed.push(Observed { rx, registered });
            }
            let mut errors = tickets.iter().map(|&t| engine.wal().wait(t));
            let first = errors.next().expect("the first append is accepted");
            assert!(errors.all(is_poisoned), "{scenario:?}: a later wait succeeded");
            first.expect_err("wait on a failed batch")
        }
        Scenario::ApplyWrite => {
            volume.inject(FaultOp::Write, Fault::Eio, 2);
            engine.apply_through(14).expect_err("apply over a failed block write")
        }
        Scenario::CheckpointSync => {
            engine.apply_through(14).expect("apply");
            volume.inject(FaultOp::Sync, Fault::Eio, 0);
            engine.checkpoint().expect_err("checkpoint over a failed sync")
        }
        Scenario::StateWrite | Scenario::StateSync => {
            let op = if scenario == Scenario::StateWrite { FaultOp::Write } else { FaultOp::Sync };
            volume.inject(op, Fault::Eio, 0);
            engine
                .state()
                .update(|s| s.committed = committed(19))
                .expect_err("hard-state update over a failed write")
        }
        Scenario::SpareEnospc | Scenario::SpareDirSync => {
            let rotating = rotation_index(mode);
            for i in 20..rotating {
                engine.wal().append(vec![entry(i)]).expect("append");
                engine.wal().flush().expect("flush");
                ack.entries = i + 1;
            }
            let before = engine.wal().segments().len();
            wait_for_spare(engine);
            // Only preparing a spare creates a file or syncs the directory here (nothing is
            // purged), so the fault strikes the preparation of the spare after this rotation's.
            if scenario == Scenario::SpareEnospc {
                volume.inject(FaultOp::Create, Fault::Enospc, 0);
            } else {
                volume.inject(FaultOp::DirSync, Fault::Eio, 0);
            }
            // The rotating batch goes to the prepared spare and may be acknowledged before the
            // preparation after it fails; from that failure on, nothing is.
            engine.wal().append(vec![entry(rotating)]).expect("append");
            let err = match engine.wal().flush() {
                Ok(()) => {
                    ack.entries = rotating + 1;
                    assert_eq!(engine.wal().segments().len(), before + 1, "{scenario:?}");
                    wait_for_poison(engine);
                    engine.wal().append(vec![entry(rotating + 1)]).expect_err("append after")
                }
                Err(err) => err,
            };
            assert!(engine.wal().spare().is_none(), "{scenario:?}: a failed spare is kept");
            err
        }
    };
    (err, observed)
}

/// Every write path of a poisoned engine refuses with `Poisoned`. Returns the paths that did not.
fn refusals_missing(engine: &Engine, ack: &Acknowledged) -> Vec<&'static str> {
    let mut missing = Vec::new();
    let mut expect = |what: &'static str, refused: bool| {
        if !refused {
            missing.push(what);
        }
    };
    expect("poisoned() is Some", engine.poisoned().is_some());
    let next = engine.wal().bounds().next;
    expect("append", is_poisoned(engine.wal().append(vec![entry(next)])));
    let (cb, rx) = reporting_callback();
    expect("append_with", is_poisoned(engine.wal().append_with(vec![entry(next)], cb)));
    let outcome = rx.recv_timeout(Duration::from_millis(200));
    expect("refused append_with never acknowledges", !matches!(outcome, Ok(Ok(()))));
    expect("flush", is_poisoned(engine.wal().flush()));
    expect("truncate", is_poisoned(engine.wal().truncate(next.saturating_sub(1))));
    expect(
        "hard-state update",
        is_poisoned(engine.state().update(|s| s.committed = committed(ack.entries - 1))),
    );
    expect("checkpoint", is_poisoned(engine.checkpoint()));
    expect("checkpoint_and_purge", is_poisoned(engine.checkpoint_and_purge()));
    expect("purge", is_poisoned(engine.wal().purge(LogId { term: 1, node: 1, index: 3 })));
    // Entries 10..=14 are committed but (in most scenarios) not applied: applying writes blocks.
    if engine.applied().log_id.is_some_and(|id| id.index < 14) {
        expect("apply", is_poisoned(engine.apply_through(14)));
    }
    expect("close", is_poisoned(engine.close()));
    missing
}

/// Reopens what is durable and checks that everything acknowledged is there.
fn assert_recovers(volume: &SimVolume, mode: CommitMode, scenario: Scenario, ack: &Acknowledged) {
    let why = format!("{mode:?} {scenario:?}");
    let durable = volume.clean_image();
    let (engine, _) = Engine::open(&dir_location(&durable), config(mode))
        .unwrap_or_else(|e| panic!("{why}: reopen failed: {e}"));
    assert_eq!(engine.poisoned(), None);
    let bounds = engine.wal().bounds();
    assert_eq!(bounds.first, 0, "{why}");
    assert!(bounds.next >= ack.entries, "{why}: log ends at {} < {}", bounds.next, ack.entries);
    for i in 0..bounds.next {
        let got = engine.wal().read(i).unwrap_or_else(|e| panic!("{why}: read {i}: {e}"));
        assert!(got == payload(i), "{why}: entry {i} differs");
    }
    assert_eq!(engine.state().get().committed, ack.committed, "{why}: hard state");
    let upto = ack.committed.map(|c| c.index);
    assert_eq!(engine.applied().log_id.map(|id| id.index), upto, "{why}: applied");
    let mut device = vec![0u8; 64 * BLOCK];
    engine.image().read_blocks(0, &mut device).expect("read device");
    assert!(device == model_through(upto), "{why}: device differs from the committed entries");

    // The recovered engine takes writes again, and they last.
    let next = bounds.next;
    engine.wal().append((next..next + 4).map(entry).collect()).expect("append after recovery");
    engine.wal().flush().expect("flush after recovery");
    engine.state().update(|s| s.committed = committed(next + 3)).expect("commit");
    engine.apply_through(next + 3).expect("apply");
    engine.checkpoint().expect("checkpoint");
    drop(engine);
    let (engine, _) = Engine::open(&dir_location(&durable.clean_image()), config(mode))
        .unwrap_or_else(|e| panic!("{why}: second reopen failed: {e}"));
    assert_eq!(engine.wal().bounds().next, next + 4, "{why}");
    for i in 0..next + 4 {
        assert!(engine.wal().read(i).expect("read") == payload(i), "{why}: entry {i}");
    }
    engine.image().read_blocks(0, &mut device).expect("read device");
    assert!(device == model_through(Some(next + 3)), "{why}: device after recovery");
}

/// What a power loss right after the fault could leave (pending writes of the failed operation
/// kept, dropped or torn) also recovers everything acknowledged. The failed operation itself may
/// have reached the disk: entries beyond the acknowledged ones must then read as appended, and the
/// committed index may be the one the failed update tried to save.
fn assert_recovers_from_power_loss(volume: &SimVolume, why: &str, ack: &Acknowledged) {
    for seed in 0..8 {
        let image = volume.crash_image(seed, CrashPlan::default());
        let (engine, _) = Engine::open(&dir_location(&image), inline_config())
            .unwrap_or_else(|e| panic!("{why} seed {seed}: reopen failed: {e}"));
        let bounds = engine.wal().bounds();
        assert!(bounds.next >= ack.entries, "{why} seed {seed}: log ends at {}", bounds.next);
        for i in 0..bounds.next {
            let got = engine.wal().read(i).unwrap_or_else(|e| panic!("{why}: read {i}: {e}"));
            assert!(got == payload(i), "{why} seed {seed}: entry {i} differs");
        }
        let committed = engine.state().get().committed;
        assert!(committed >= ack.committed, "{why} seed {seed}: committed {committed:?}");
        let upto = committed.map(|c| c.index);
        let mut device = vec![0u8; 64 * BLOCK];
        engine.image().read_blocks(0, &mut device).expect("read device");
        assert!(device == model_through(upto), "{why} seed {seed}: device differs");
    }
}

fn run(mode: CommitMode, scenario: Scenario) {
    let why = format!("{mode:?} {scenario:?}");
    let (volume, engine, mut ack) = prepare(mode);
    let (err, observed) = strike(scenario, mode, &volume, &engine, &mut ack);
    assert!(
        matches!(err, StorageError::Poisoned { .. }),
        "{why}: the failing call reported {err} rather than Poisoned"
    );
    let cause = engine.poisoned().unwrap_or_default();
    let expected_cause = match scenario {
        Scenario::SpareEnospc => "No space left on device",
        _ => "Input/output error",
    };
    assert!(cause.contains(expected_cause), "{why}: cause {cause:?}");
    for (i, Observed { rx, registered }) in observed.iter().enumerate() {
        let outcome = rx.recv_timeout(Duration::from_secs(if *registered { 10 } else { 1 }));
        if *registered {
            assert!(
                matches!(outcome, Ok(Err(ref e)) if e.contains("poisoned")),
                "{why}: callback {i} of a failed append got {outcome:?}"
            );
        } else {
            assert!(!matches!(outcome, Ok(Ok(()))), "{why}: refused append {i} acknowledged");
        }
        assert!(rx.try_recv().is_err(), "{why}: callback {i} called twice");
    }
    let missing = refusals_missing(&engine, &ack);
    drop(engine);
    assert_recovers(&volume, mode, scenario, &ack);
    assert_recovers_from_power_loss(&volume, &why, &ack);
    assert!(missing.is_empty(), "{why}: a poisoned engine did not refuse: {missing:?}");
}

/// Inline only (deterministic): an append queued before a fault elsewhere is never acknowledged.
#[test]
fn pending_append_is_never_acknowledged_after_a_fault_elsewhere() {
    for scenario in [Scenario::CheckpointSync, Scenario::StateWrite, Scenario::StateSync] {
        let (volume, engine, mut ack) = prepare(CommitMode::Inline);
        let (cb, rx) = reporting_callback();
        let ticket = engine.wal().append_with(vec![entry(20)], cb).expect("append");
        strike(scenario, CommitMode::Inline, &volume, &engine, &mut ack);
        assert!(is_poisoned(engine.wal().wait(ticket)), "{scenario:?}: wait");
        assert!(is_poisoned(engine.wal().flush()), "{scenario:?}: flush");
        drop(engine);
        let outcome = rx.recv_timeout(Duration::from_secs(1));
        assert!(
            matches!(outcome, Ok(Err(_))),
            "{scenario:?}: callback of an append queued before the fault got {outcome:?}"
        );
        assert_recovers(&volume, CommitMode::Inline, scenario, &ack);
    }
}

#[test]
fn wal_sync_eio_inline() {
    run(CommitMode::Inline, Scenario::WalSync);
}

#[test]
fn wal_sync_eio_thread() {
    run(CommitMode::Thread, Scenario::WalSync);
}

#[test]
fn wal_write_eio_inline() {
    run(CommitMode::Inline, Scenario::WalWrite);
}

#[test]
fn wal_write_eio_thread() {
    run(CommitMode::Thread, Scenario::WalWrite);
}

#[test]
fn checkpoint_sync_eio_inline() {
    run(CommitMode::Inline, Scenario::CheckpointSync);
}

#[test]
fn checkpoint_sync_eio_thread() {
    run(CommitMode::Thread, Scenario::CheckpointSync);
}

#[test]
fn hard_state_write_eio_inline() {
    run(CommitMode::Inline, Scenario::StateWrite);
}

#[test]
fn hard_state_write_eio_thread() {
    run(CommitMode::Thread, Scenario::StateWrite);
}

#[test]
fn hard_state_sync_eio_inline() {
    run(CommitMode::Inline, Scenario::StateSync);
}

#[test]
fn hard_state_sync_eio_thread() {
    run(CommitMode::Thread, Scenario::StateSync);
}

#[test]
fn spare_enospc_inline() {
    run(CommitMode::Inline, Scenario::SpareEnospc);
}

#[test]
fn spare_enospc_thread() {
    run(CommitMode::Thread, Scenario::SpareEnospc);
}

#[test]
fn spare_directory_sync_eio_inline() {
    run(CommitMode::Inline, Scenario::SpareDirSync);
}

#[test]
fn spare_directory_sync_eio_thread() {
    run(CommitMode::Thread, Scenario::SpareDirSync);
}

#[test]
fn apply_write_eio_inline() {
    run(CommitMode::Inline, Scenario::ApplyWrite);
}

#[test]
fn apply_write_eio_thread() {
    run(CommitMode::Thread, Scenario::ApplyWrite);
}
