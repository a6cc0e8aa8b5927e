//! Persisted Raft hard state: the vote, the committed log id and the membership blob, written
//! atomically through a `SlotPair` and durable before `StateStore::update` returns.
//!
//! Payload (inside a slot), little-endian:
//! ```text
//!  0  1  version (1)
//!  1  1  flags: bit 0 vote present, bit 1 vote committed, bit 2 committed present
//!  2  6  zero
//!  8  8  vote term      16  8  vote node
//! 24  8  committed term 32  8  committed node   40  8  committed index
//! 48  4  membership length, then the membership bytes (opaque; the replication layer's encoding)
//! ```

use std::sync::{Arc, Mutex};

use super::disk::Disk;
use super::error::{Result, StorageError};
use super::le::{put_u32, put_u64, u32_at, u64_at};
use super::poison::Poison;
use super::slots::{SlotPair, MAX_SLOT_PAYLOAD};

/// A Raft log id: the leader (term, node) that created the entry, and its index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct LogId {
    pub term: u64,
    pub node: u64,
    pub index: u64,
}

/// A persisted vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Vote {
    pub term: u64,
    pub node: u64,
    pub committed: bool,
}

/// Everything Raft needs durable outside the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HardState {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    #[serde(skip)]
    pub membership: Vec<u8>,
}

const VERSION: u8 = 1;
const FIXED: usize = 52;
const _: () = assert!(FIXED < MAX_SLOT_PAYLOAD);

impl HardState {
    /// Encodes into a slot payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; FIXED + self.membership.len()];
        buf[0] = VERSION;
        let mut flags = 0u8;
        if let Some(v) = self.vote {
            flags |= 1 | if v.committed { 2 } else { 0 };
            put_u64(&mut buf, 8, v.term);
            put_u64(&mut buf, 16, v.node);
        }
        if let Some(c) = self.committed {
            flags |= 4;
            put_u64(&mut buf, 24, c.term);
            put_u64(&mut buf, 32, c.node);
            put_u64(&mut buf, 40, c.index);
        }
        buf[1] = flags;
        put_u32(&mut buf, 48, self.membership.len() as u32);
        buf[FIXED..].copy_from_slice(&self.membership);
        buf
    }

    /// Decodes a slot payload.
    pub fn decode(buf: &[u8]) -> std::result::Result<HardState, String> {
        if buf.len() < FIXED {
            return Err(format!("{} bytes, need at least {FIXED}", buf.len()));
        }
        if buf[0] != VERSION {
            return Err(format!("unknown hard-state version {}", buf[0]));
        }
        let flags = buf[1];
        if flags & !7 != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let len = u32_at(buf, 48) as usize;
        if FIXED + len != buf.len() {
            return Err(format!("membership length {len} does not match payload {}", buf.len()));
        }
        Ok(HardState {
            vote: (flags & 1 != 0).then(|| Vote {
                term: u64_at(buf, 8),
                node: u64_at(buf, 16),
                committed: flags & 2 != 0,
            }),
            committed: (flags & 4 != 0).then(|| LogId {
                term: u64_at(buf, 24),
                node: u64_at(buf, 32),
                index: u64_at(buf, 40),
            }),
            membership: buf[FIXED..].to_vec(),
        })
    }
}

/// The largest membership blob a hard state can hold.
pub const MAX_MEMBERSHIP_BYTES: usize = MAX_SLOT_PAYLOAD - FIXED;

/// Owner of the persisted hard state.
#[derive(Debug)]
pub struct StateStore {
    pair: SlotPair,
    poison: Arc<Poison>,
    current: Mutex<(u64, HardState)>,
}

impl StateStore {
    /// Opens the slot pair at `base` of `disk` and loads the newest state (default if blank).
    pub fn open(
        disk: Arc<dyn Disk>,
        base: u64,
        owner: uuid::Uuid,
        poison: Arc<Poison>,
    ) -> Result<(StateStore, Option<String>)> {
        let location = format!("{} offset {base}", disk.describe());
        let pair = SlotPair::new(disk, base, *b"XDEVSTAT", owner, "raft hard state");
        let (seq, state, damaged) = match pair.load()? {
            None => (0, HardState::default(), None),
            Some(loaded) => {
                let state = HardState::decode(&loaded.payload)
                    .map_err(|r| StorageError::corrupt("raft hard state", location, r))?;
                (loaded.seq, state, loaded.damaged)
            }
        };
        Ok((StateStore { pair, poison, current: Mutex::new((seq, state)) }, damaged))
    }

    /// The bytes a fresh store's slots need.
    pub const fn bytes() -> u64 {
        SlotPair::bytes()
    }

    /// The last saved state.
    pub fn get(&self) -> HardState {
        self.current.lock().expect("state lock").1.clone()
    }

    /// Applies `change` to the current state and makes the result durable before returning.
    /// A failed write poisons the engine.
    pub fn update(&self, change: impl FnOnce(&mut HardState)) -> Result<()> {
        self.poison.check()?;
        let mut current = self.current.lock().expect("state lock");
        let mut next = current.1.clone();
        change(&mut next);
        if next.membership.len() > MAX_MEMBERSHIP_BYTES {
            return Err(StorageError::Invalid(format!(
                "membership of {} bytes exceeds {MAX_MEMBERSHIP_BYTES}",
                next.membership.len()
            )));
        }
        let seq = current.0 + 1;
        if let Err(e) = self.pair.store(seq, &next.encode()) {
            return Err(self.poison.set(&e));
        }
        *current = (seq, next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let state = HardState {
            vote: Some(Vote { term: 4, node: 2, committed: true }),
            committed: Some(LogId { term: 3, node: 1, index: 99 }),
            membership: b"members".to_vec(),
        };
        assert_eq!(HardState::decode(&state.encode()).expect("decode"), state);
        assert_eq!(
            HardState::decode(&HardState::default().encode()).expect("decode"),
            HardState::default()
        );
    }

    #[test]
    fn malformed_payloads_are_refused() {
        let good = HardState { membership: vec![1, 2, 3], ..Default::default() }.encode();
        assert!(HardState::decode(&good[..10]).is_err());
        let mut bad_len = good.clone();
        put_u32(&mut bad_len, 48, 1000);
        assert!(HardState::decode(&bad_len).is_err());
        let mut bad_flags = good;
        bad_flags[1] = 0x80;
        assert!(HardState::decode(&bad_flags).is_err());
    }
}
