//! Engine behaviour on the simulated disk: append, read, truncate, purge, apply, checkpoint,
//! reopen — with data checked at every step.

mod common;

use common::*;
use xdevice::storage::engine::Engine;
use xdevice::storage::state::LogId;

#[test]
fn append_reopen_read_back() {
    let volume = formatted_volume();
    let (engine, _) = Engine::open(&dir_location(&volume), inline_config()).expect("open");
    let entries: Vec<_> =
        (0..40).map(|i| block_entry(i, 1, i % 64, 1 + (i as usize % 3), i)).collect();
    let expected: Vec<Vec<u8>> = entries.iter().map(|e| e.payload.to_vec()).collect();
    engine.wal().append(entries).expect("append");
    assert_eq!(engine.wal().read(5).expect("pending read"), expected[5]);
    engine.wal().flush().expect("flush");
    assert_eq!(engine.wal().bounds().durable_next, 40);
    drop(engine);
    let (engine, rec) =
        Engine::open(&dir_location(&volume.clean_image()), inline_config()).expect("reopen");
    assert_eq!(rec.wal.records, 40);
    assert_eq!(engine.wal().bounds().next, 40);
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&engine.wal().read(i as u64).expect("read"), want, "entry {i}");
    }
}

#[test]
fn truncate_then_rewrite_survives_reopen() {
    let volume = formatted_volume();
    let (engine, _) = Engine::open(&dir_location(&volume), inline_config()).expect("open");
    engine.wal().append((0..10).map(|i| block_entry(i, 1, i, 1, i)).collect()).expect("append");
    engine.wal().flush().expect("flush");
    engine.wal().truncate(6).expect("truncate");
    engine
        .wal()
        .append((6..8).map(|i| block_entry(i, 2, i, 1, 100 + i)).collect())
        .expect("append");
    engine.wal().flush().expect("flush");
    drop(engine);
    let (engine, _) =
        Engine::open(&dir_location(&volume.clean_image()), inline_config()).expect("reopen");
    assert_eq!(engine.wal().bounds().next, 8);
    assert_eq!(engine.wal().term(7).expect("term"), 2);
    assert_eq!(engine.wal().read(7).expect("read"), block_entry(7, 2, 7, 1, 107).payload.to_vec());
    assert_eq!(engine.wal().read(5).expect("read"), block_entry(5, 1, 5, 1, 5).payload.to_vec());
}

#[test]
fn apply_checkpoint_purge_reopen() {
    let volume = formatted_volume();
    let (engine, _) = Engine::open(&dir_location(&volume), inline_config()).expect("open");
    // Enough data to rotate through several 256 KiB segments.
    let n = 300u64;
    let lba_of = |i: u64| i % 63;
    engine
        .wal()
        .append((0..n).map(|i| block_entry(i, 1, lba_of(i), 2, i)).collect())
        .expect("append");
    engine.wal().flush().expect("flush");
    assert!(engine.wal().segments().len() > 2, "expected rotation");
    engine
        .state()
        .update(|s| s.committed = Some(LogId { term: 1, node: 1, index: n - 1 }))
        .expect("commit");
    engine.apply_through(n - 1).expect("apply");
    engine.checkpoint_and_purge().expect("checkpoint");
    assert_eq!(engine.wal().bounds().first, n);
    assert!(engine.wal().segments().len() <= 2, "purge frees segments");
    let mut model = vec![0u8; 64 * BLOCK];
    for i in 0..n {
        let at = lba_of(i) as usize * BLOCK;
        model[at..at + 2 * BLOCK].copy_from_slice(&pattern(lba_of(i), 2, i));
    }
    drop(engine);
    let (engine, rec) =
        Engine::open(&dir_location(&volume.clean_image()), inline_config()).expect("reopen");
    assert_eq!(rec.replayed_entries, 0);
    assert_eq!(engine.applied().log_id.map(|id| id.index), Some(n - 1));
    let mut image = vec![0u8; 64 * BLOCK];
    engine.image().read_blocks(0, &mut image).expect("read");
    assert!(image == model, "image differs from the model after reopen");
}

#[test]
fn replay_applies_committed_entries_after_crash() {
    let volume = formatted_volume();
    let (engine, _) = Engine::open(&dir_location(&volume), inline_config()).expect("open");
    engine.wal().append((0..20).map(|i| block_entry(i, 1, i, 1, i)).collect()).expect("append");
    engine.wal().flush().expect("flush");
    engine
        .state()
        .update(|s| s.committed = Some(LogId { term: 1, node: 1, index: 14 }))
        .expect("commit");
    engine.apply_through(9).expect("apply");
    engine.checkpoint().expect("checkpoint");
    engine.apply_through(14).expect("apply");
    // Blocks 10..15 are applied but not checkpointed: lost with the crash, then replayed.
    let crashed = volume.clean_image();
    drop(engine);
    let (engine, rec) = Engine::open(&dir_location(&crashed), inline_config()).expect("reopen");
    assert_eq!(rec.replayed_entries, 5);
    for lba in 0..20u64 {
        let mut block = vec![0u8; BLOCK];
        engine.image().read_blocks(lba, &mut block).expect("read");
        let want = if lba <= 14 { pattern(lba, 1, lba) } else { vec![0u8; BLOCK] };
        assert!(block == want, "block {lba}");
    }
}

#[test]
fn interrupted_format_can_be_redone_but_a_store_is_never_overwritten() {
    use xdevice::storage::disk::{SimVolume, Volume};
    use xdevice::storage::StorageError;
    let volume = SimVolume::new("vol");
    // What a format interrupted before its superblock copies were written leaves behind.
    volume.create("t0_meta_superblock", 16384, false).expect("create");
    volume.create("t0_state_raft", 8192, false).expect("create");
    let err = Engine::open(&dir_location(&volume), inline_config()).expect_err("not a store");
    assert!(err.to_string().contains("not formatted"), "{err}");
    Engine::format(&dir_location(&volume), &small_format()).expect("format over leftovers");
    Engine::open(&dir_location(&volume), inline_config()).expect("open after format");
    let again = Engine::format(&dir_location(&volume), &small_format()).expect_err("refuse");
    assert!(matches!(again, StorageError::AlreadyFormatted(_)), "{again}");
}

#[test]
fn apply_never_runs_past_the_persisted_commit() {
    let volume = formatted_volume();
    let (engine, _) = Engine::open(&dir_location(&volume), inline_config()).expect("open");
    engine.wal().append((0..5).map(|i| block_entry(i, 1, i, 1, i)).collect()).expect("append");
    engine.wal().flush().expect("flush");
    assert!(engine.apply_through(0).is_err(), "nothing committed yet");
    engine
        .state()
        .update(|s| s.committed = Some(LogId { term: 1, node: 1, index: 2 }))
        .expect("commit");
    assert!(engine.apply_through(3).is_err(), "3 is not committed");
    assert_eq!(engine.apply_through(2).expect("apply"), 3);
    let mut block = vec![0u8; BLOCK];
    engine.image().read_blocks(2, &mut block).expect("read");
    assert!(block == pattern(2, 1, 2));
    engine.image().read_blocks(3, &mut block).expect("read");
    assert!(block.iter().all(|&b| b == 0), "uncommitted entry 3 must not be applied");
}

/// Block data reaches the WAL as shared parts (headers, then each write's own buffer): records
/// are stored compressed when a sample of their first 4 KiB compresses and as the parts
/// otherwise, at every size (80 KiB and 8 KiB entries here), and every form reads back as the
/// joined payload (queued, durable, after reopening) and applies to the same image. The third
/// kind of data, random in its first 4 KiB and constant after, would compress if lz4 were tried
/// on the whole payload: stored whole, it shows that the sample decides.
#[test]
fn payloads_in_shared_parts_are_stored_whole() {
    let volume = formatted_volume();
    let mut config = inline_config();
    config.wal.max_record_bytes = 160 * 1024;
    config.wal.max_batch_bytes = 160 * 1024;
    let (engine, _) = Engine::open(&dir_location(&volume), config.clone()).expect("open");
    let mut model = vec![0u8; 64 * BLOCK];
    let mut expected = Vec::new();
    // 20 blocks per entry in writes of 12 and 8 blocks, then 2 blocks in writes of 1 and 1.
    for (blocks, first_write) in [(20u64, 12u64), (2, 1)] {
        let before = engine.wal().stats().stored_bytes;
        let start = expected.len() as u64;
        let whole = append_three_kinds(&engine, &mut model, &mut expected, blocks, first_write);
        for (i, want) in expected.iter().enumerate().skip(start as usize) {
            assert_eq!(&engine.wal().read(i as u64).expect("durable read"), want, "entry {i}");
        }
        // Three of the nine compress to under a sixteenth each; the other six are stored whole.
        let written = engine.wal().stats().stored_bytes - before;
        let slack = 3 * (blocks * BLOCK as u64) / 16;
        assert!(
            written >= whole && written < whole + slack,
            "{blocks}-block entries: {written} bytes stored, {whole} raw in the six incompressible"
        );
    }
    let last = expected.len() as u64 - 1;
    engine
        .state()
        .update(|s| s.committed = Some(LogId { term: 1, node: 1, index: last }))
        .expect("commit");
    engine.apply_through(last).expect("apply");
    drop(engine);
    let (engine, _) = Engine::open(&dir_location(&volume.clean_image()), config).expect("reopen");
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(&engine.wal().read(i as u64).expect("reopened read"), want, "entry {i}");
    }
    let mut image = vec![0u8; 64 * BLOCK];
    engine.image().read_blocks(0, &mut image).expect("read");
    assert!(image == model, "image differs from the model");
}

/// Appends nine entries of `blocks` blocks, each in two writes split at `first_write`, cycling
/// through compressible, random, and random-then-compressible data; flushes them. Returns the
/// stored bytes the six entries that must be stored whole take (header and payload).
fn append_three_kinds(
    engine: &Engine,
    model: &mut [u8],
    expected: &mut Vec<Vec<u8>>,
    blocks: u64,
    first_write: u64,
) -> u64 {
    use xdevice::entry::{encode_shared, BlockOp, BodyRef};
    use xdevice::storage::wal::NewEntry;

    let len = blocks as usize * BLOCK;
    let data = |i: u64| -> Vec<u8> {
        let random: Vec<u8> = pattern(i * blocks, blocks as usize, i)
            .chunks(8)
            .enumerate()
            .flat_map(|(n, c)| {
                let x = (n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i;
                c.iter().zip(x.to_le_bytes()).map(|(a, b)| a ^ b ^ 0x5a).collect::<Vec<u8>>()
            })
            .collect();
        match i % 3 {
            0 => vec![(i as u8).wrapping_add(1); len],
            1 => random,
            _ => [random[..BLOCK].to_vec(), vec![7u8; len - BLOCK]].concat(),
        }
    };
    let first = expected.len() as u64;
    let mut whole = 0;
    let entries: Vec<NewEntry> = (first..first + 9)
        .map(|i| {
            let d = data(i);
            let lba = (i % 3) * blocks;
            model[lba as usize * BLOCK..][..len].copy_from_slice(&d);
            let split = first_write as usize * BLOCK;
            let ops = [
                BlockOp::Write { lba, data: d[..split].to_vec().into() },
                BlockOp::Write { lba: lba + first_write, data: d[split..].to_vec().into() },
            ];
            let payload = encode_shared(1, BodyRef::Blocks(&ops));
            assert!(payload.parts().len() >= 4, "headers and two data buffers");
            if i % 3 != 0 {
                whole += payload.len() as u64 + 48;
            }
            expected.push(payload.to_vec());
            NewEntry { index: i, term: 1, payload }
        })
        .collect();
    engine.wal().append(entries).expect("append");
    assert_eq!(engine.wal().read(first + 4).expect("queued read"), expected[first as usize + 4]);
    engine.wal().flush().expect("flush");
    whole
}

/// With the commit thread, callbacks run once each, in ticket order, and only for durable entries,
/// whether the committer runs a batch's few callbacks itself or hands many to the delivery
/// thread: 16 writers make batches of both kinds.
#[test]
fn callbacks_run_once_in_ticket_order_after_their_sync() {
    use std::sync::{Arc, Mutex};
    use xdevice::storage::wal::{CommitMode, NewEntry};

    let volume = formatted_volume();
    let mut config = inline_config();
    config.wal.mode = CommitMode::Thread;
    let (engine, _) = Engine::open(&dir_location(&volume), config).expect("open");
    let engine = Arc::new(engine);
    let append_lock = Arc::new(Mutex::new(()));
    // (ticket, index, durable_next seen by the callback, outcome), in the order callbacks ran.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let (engine, append_lock, seen) = (engine.clone(), append_lock.clone(), seen.clone());
            std::thread::spawn(move || {
                for n in 0..40u64 {
                    let (tx, rx) = std::sync::mpsc::channel();
                    {
                        let _order = append_lock.lock().expect("append lock");
                        let index = engine.wal().bounds().next;
                        let payload = vec![(w * 40 + n) as u8; 512 + 64 * (n as usize % 8)];
                        let entry = NewEntry { index, term: 1, payload: payload.into() };
                        let (wal, seen) = (engine.clone(), seen.clone());
                        let cb = Box::new(move |r: Result<(), xdevice::storage::StorageError>| {
                            let durable = wal.wal().bounds().durable_next;
                            seen.lock().expect("seen").push((index, durable, r.is_ok()));
                            let _ = tx.send(());
                        });
                        engine.wal().append_with(vec![entry], cb).expect("append");
                    }
                    rx.recv().expect("callback ran");
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    engine.wal().flush().expect("flush");
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), 16 * 40, "every callback ran once");
    for (i, &(index, durable, ok)) in seen.iter().enumerate() {
        assert!(ok, "callback of entry {index} failed");
        assert_eq!(index, i as u64, "callbacks out of ticket order at {i}");
        assert!(durable > index, "callback of entry {index} ran before durable_next passed it");
    }
    let stats = engine.wal().stats();
    assert!(stats.batches < stats.records, "no batch held more than one record: {stats:?}");
}
