//! The persisted Raft hard state: `StateStore::open` (the two-slot `SlotPair::load` of
//! `storage/slots.rs`, then `HardState::decode` of `storage/state.rs`) on an in-memory disk
//! holding the input as its two 4 KiB slots, exactly as a node opens its store.
//!
//! Mode bits: 0 reseal both slots' crc32c; 1 decode the input as a hard-state payload alone
//! (`HardState::decode`) instead of as two slots.
//!
//! Properties: the outcome is the one the slot format's documentation gives (the valid slot with
//! the higher seq, blank pair is the default state, a failed slot beside a valid one is reported
//! damaged, neither valid is an error, an intact slot of another owner refuses the store); the state re-encodes to the payload it came from, except
//! the bytes the decoder does not read (`hard_state_ignored`); storing it again and reopening
//! gives the same state with no damage.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use xdevice::storage::disk::{AlignedBuf, Disk, SimDisk};
use xdevice::storage::poison::Poison;
use xdevice::storage::state::{HardState, StateStore};
use xdevice_fuzz::{assert_same_except, crc, reseal, split, u32_at, OWNER, RESEAL};

const SLOT: usize = 4096;
const HEAD: usize = 40;

/// Why the slot format refuses a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    Damaged,
    /// Intact, and another device's.
    Foreign,
}

/// What the slot format says a slot holds: `Ok(None)` blank, `Ok(Some((seq, payload)))` valid.
fn slot_says(slot: &[u8], index: u64) -> Result<Option<(u64, &[u8])>, Refused> {
    if slot.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let seq = u64::from_le_bytes(slot[8..16].try_into().expect("8 bytes"));
    let len = u32_at(slot, 16).expect("in slot") as usize;
    if &slot[..8] != b"XDEVSTAT" || len > SLOT - HEAD {
        return Err(Refused::Damaged);
    }
    let payload = &slot[HEAD..HEAD + len];
    if crc(0, &[&slot[..20], &slot[24..40], payload]) != u32_at(slot, 20).expect("in slot") {
        return Err(Refused::Damaged);
    }
    if slot[24..40] != *OWNER.as_bytes() {
        return Err(Refused::Foreign);
    }
    if seq % 2 != index {
        return Err(Refused::Damaged);
    }
    Ok(Some((seq, payload)))
}

/// Bytes of a hard-state payload `HardState::decode` does not read: [2, 8) (documented zero),
/// the vote's fields when its flag is clear, the committed id's when its flag is clear, and the
/// flags byte itself when "vote committed" is set without "vote present".
fn hard_state_ignored(p: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut r = Vec::new();
    r.push(2..8);
    if p[1] & 1 == 0 {
        r.push(8..24);
        if p[1] & 2 != 0 {
            r.push(1..2);
        }
    }
    if p[1] & 4 == 0 {
        r.push(24..48);
    }
    r
}

fn check_hard_state(payload: &[u8], state: &HardState) {
    let again = state.encode();
    assert_eq!(HardState::decode(&again).as_ref(), Ok(state), "re-encoded hard state");
    assert_same_except(&again, payload, &hard_state_ignored(payload), "hard state");
}

fn open(disk: &Arc<SimDisk>) -> xdevice::storage::Result<(StateStore, Option<String>)> {
    StateStore::open(disk.clone(), 0, OWNER, Arc::new(Poison::default()))
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, bytes)) = split(data) else { return };
    if mode & 2 != 0 {
        if let Ok(state) = HardState::decode(bytes) {
            check_hard_state(bytes, &state);
        }
        return;
    }

    let mut image = AlignedBuf::zeroed(2 * SLOT);
    let n = bytes.len().min(2 * SLOT);
    image[..n].copy_from_slice(&bytes[..n]);
    if mode & RESEAL != 0 {
        reseal::slot(&mut image[..SLOT]);
        reseal::slot(&mut image[SLOT..]);
    }
    let disk = SimDisk::new("state", 2 * SLOT as u64);
    disk.write_at(0, &image).expect("write slots");

    // The documented outcome.
    let (s0, s1) = (slot_says(&image[..SLOT], 0), slot_says(&image[SLOT..], 1));
    let newest = [s0, s1].into_iter().flatten().flatten().max_by_key(|(seq, _)| *seq);
    let damaged = s0.is_err() || s1.is_err();
    let foreign = [s0, s1].contains(&Err(Refused::Foreign));
    let opened = open(&disk);
    if foreign {
        let e = opened.expect_err("a slot of another owner was taken");
        assert!(e.to_string().contains(&OWNER.to_string()), "{e}");
        return;
    }

    match (opened, newest) {
        (Ok((store, report)), Some((_, payload))) => {
            let state = store.get();
            assert_eq!(HardState::decode(payload).as_ref(), Ok(&state), "not the newest slot");
            assert_eq!(report.is_some(), damaged, "damage report {report:?}");
            check_hard_state(payload, &state);
            // Store it again (the other slot) and reopen.
            store.update(|_| {}).expect("store the same state");
            let (again, report) = open(&disk).expect("reopen after update");
            assert_eq!(again.get(), state);
            assert_eq!(report, None);
        }
        (Ok((store, report)), None) => {
            assert!(s0 == Ok(None) && s1 == Ok(None), "opened without a valid slot");
            assert_eq!((store.get(), report), (HardState::default(), None));
        }
        (Err(e), Some((_, payload))) => {
            assert!(HardState::decode(payload).is_err(), "valid newest slot refused: {e}");
        }
        (Err(e), None) => {
            assert!(damaged, "blank pair refused: {e}");
            assert!(!e.to_string().is_empty());
        }
    }
});
