//! Files of another device put into a store: a WAL segment, the Raft hard state, the image. Each
//! is refused on open with an error naming the file and both devices, the refused open changes
//! no byte of the store, and with the store's own file back every entry reads back as written.
//! (The rest of the bad-input matrix, and where each row is tested: docs/testing.md.)
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use common::{block_entry, inline_config, small_format};
use xdevice::storage::disk::{Backend, DirVolume, Volume};
use xdevice::storage::engine::{Engine, FormatOptions};
use xdevice::storage::layout::Location;
use xdevice::storage::state::{HardState, Vote};
use xdevice::storage::StorageError;

fn location(dir: &Path) -> Location {
    let volume: Arc<dyn Volume> = Arc::new(DirVolume::open(dir, Backend::File).unwrap());
    Location::Directory { volume, name: "t0".into() }
}

/// Every file of a store directory and its bytes.
fn snapshot_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// A store with entries written, durable, checkpointed and a vote recorded; its device uuid and
/// the entries' payloads.
fn store(dir: &Path, seed: u64) -> (uuid::Uuid, Vec<Vec<u8>>) {
    let device = uuid::Uuid::new_v4();
    let format = FormatOptions { device_uuid: device, ..small_format() };
    Engine::format(&location(dir), &format).unwrap();
    let (engine, _) = Engine::open(&location(dir), inline_config()).unwrap();
    let entries: Vec<_> = (0..20u64).map(|i| block_entry(i, 1, i % 8, 1, seed + i)).collect();
    let payloads = entries.iter().map(|e| e.payload.to_vec()).collect();
    engine.wal().append(entries).unwrap();
    engine.wal().flush().unwrap();
    engine
        .state()
        .update(|s: &mut HardState| s.vote = Some(Vote { term: 1, node: 1, committed: true }))
        .unwrap();
    engine.checkpoint().unwrap();
    drop(engine);
    (device, payloads)
}

#[test]
fn another_devices_wal_state_or_image_is_refused_and_nothing_is_lost() {
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (our_id, payloads) = store(ours.path(), 100);
    let (their_id, _) = store(theirs.path(), 900);
    let segment = snapshot_of(ours.path())
        .into_keys()
        .filter(|n| n.starts_with("t0_log_"))
        .min()
        .expect("a WAL segment");
    for file in [segment.as_str(), "t0_state_raft", "t0_state_image"] {
        let mine = std::fs::read(ours.path().join(file)).unwrap();
        std::fs::copy(theirs.path().join(file), ours.path().join(file)).unwrap();
        let before = snapshot_of(ours.path());
        match Engine::open(&location(ours.path()), inline_config()) {
            Err(e @ StorageError::Foreign(_)) => {
                let said = e.to_string();
                assert!(said.contains(file), "{file}: the error does not name it: {said}");
                assert!(
                    said.contains(&format!("belongs to device {their_id}, not {our_id}")),
                    "{file}: {said}"
                );
            }
            Err(e) => panic!("{file} of another device: refused, but not as foreign: {e}"),
            Ok(_) => panic!("{file} of another device was taken"),
        }
        assert_eq!(snapshot_of(ours.path()), before, "{file}: the refused open changed the store");
        std::fs::write(ours.path().join(file), mine).unwrap();
    }
    // With its own files back the store opens whole: every entry, the vote.
    let (engine, _) = Engine::open(&location(ours.path()), inline_config()).unwrap();
    for (index, payload) in payloads.iter().enumerate() {
        assert_eq!(&engine.wal().read(index as u64).unwrap(), payload, "entry {index}");
    }
    assert_eq!(engine.state().get().vote, Some(Vote { term: 1, node: 1, committed: true }));
}
