//! Atomic small-state updates: two slots written alternately, each with a sequence number and a
//! checksum. A torn or lost write of one slot leaves the other intact, so `load` always finds the
//! last state whose `store` returned. Used for the Raft hard state and the image header.
//!
//! ```text
//! offset size field
//!  0      8   magic        per use ("XDEVSTAT", "XDEVIMGH")
//!  8      8   seq          larger is newer; the pair alternates slot = seq % 2
//! 16      4   payload_len
//! 20      4   crc32c       over bytes 0..20, 24..40 and the payload
//! 24     16   owner        the device uuid of the store the slots belong to
//! 40      …   payload
//! ```
//!
//! A slot that is intact but names another owner is another device's file: `load` refuses it
//! as foreign, naming both devices, rather than taking its state or calling it damaged.

use std::sync::Arc;

use super::disk::{AlignedBuf, Disk};
use super::error::{Result, StorageError};
use super::le::{put_u32, put_u64, u32_at, u64_at};
use uuid::Uuid;

/// Bytes of each slot.
pub const SLOT_BYTES: usize = 4096;
const HEADER_BYTES: usize = 40;
const _: () = assert!(SLOT_BYTES % super::disk::IO_ALIGN == 0 && HEADER_BYTES < SLOT_BYTES);
/// Largest payload a slot holds.
pub const MAX_SLOT_PAYLOAD: usize = SLOT_BYTES - HEADER_BYTES;

/// Two alternating slots at `base` and `base + SLOT_BYTES` of `disk`.
#[derive(Debug, Clone)]
pub struct SlotPair {
    disk: Arc<dyn Disk>,
    base: u64,
    magic: [u8; 8],
    owner: Uuid,
    structure: &'static str,
}

/// What `load` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub seq: u64,
    pub payload: Vec<u8>,
    /// A slot that failed validation (not merely older), with the reason.
    pub damaged: Option<String>,
}

impl SlotPair {
    /// The pair at `base` of `disk`, holding `magic` slots of the device `owner`.
    pub fn new(
        disk: Arc<dyn Disk>,
        base: u64,
        magic: [u8; 8],
        owner: Uuid,
        structure: &'static str,
    ) -> Self {
        SlotPair { disk, base, magic, owner, structure }
    }

    /// Bytes the pair occupies.
    pub const fn bytes() -> u64 {
        2 * SLOT_BYTES as u64
    }

    fn location(&self, slot: u64) -> String {
        format!("{} offset {}", self.disk.describe(), self.base + slot * SLOT_BYTES as u64)
    }

    /// Writes `payload` as state number `seq` into slot `seq % 2` and syncs it.
    pub fn store(&self, seq: u64, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_SLOT_PAYLOAD {
            return Err(StorageError::Invalid(format!(
                "{} of {} bytes exceeds the {MAX_SLOT_PAYLOAD}-byte slot",
                self.structure,
                payload.len()
            )));
        }
        let mut buf = AlignedBuf::zeroed(SLOT_BYTES);
        buf[0..8].copy_from_slice(&self.magic);
        put_u64(&mut buf, 8, seq);
        put_u32(&mut buf, 16, payload.len() as u32);
        buf[24..40].copy_from_slice(self.owner.as_bytes());
        buf[HEADER_BYTES..HEADER_BYTES + payload.len()].copy_from_slice(payload);
        let crc = slot_crc(&buf, payload);
        put_u32(&mut buf, 20, crc);
        let slot = seq % 2;
        self.disk
            .write_and_sync(self.base + slot * SLOT_BYTES as u64, &buf)
            .map_err(|e| StorageError::io("write", self.location(slot), e))
    }

    /// Reads both slots and returns the newest valid one. Both blank: `Ok(None)`. Neither valid
    /// but something written: a corruption error naming both.
    pub fn load(&self) -> Result<Option<Loaded>> {
        let mut best: Option<Loaded> = None;
        let mut damage = Vec::new();
        let mut blank = 0;
        for slot in 0..2u64 {
            let mut buf = AlignedBuf::zeroed(SLOT_BYTES);
            self.disk
                .read_at(self.base + slot * SLOT_BYTES as u64, &mut buf)
                .map_err(|e| StorageError::io("read", self.location(slot), e))?;
            if buf.iter().all(|&b| b == 0) {
                blank += 1;
                continue;
            }
            match self.decode(&buf, slot) {
                Ok((seq, payload)) if best.as_ref().is_none_or(|b| seq > b.seq) => {
                    best = Some(Loaded { seq, payload, damaged: None });
                }
                Ok(_) => {}
                Err(Refused::Foreign(other)) => {
                    return Err(StorageError::Foreign(format!(
                        "{} ({}) belongs to device {other}, not {}",
                        self.location(slot),
                        self.structure,
                        self.owner
                    )))
                }
                Err(Refused::Damaged(reason)) => {
                    damage.push(format!("{}: {reason}", self.location(slot)))
                }
            }
        }
        match best {
            Some(mut loaded) => {
                loaded.damaged = damage.pop();
                Ok(Some(loaded))
            }
            None if blank == 2 => Ok(None),
            None => Err(StorageError::corrupt(self.structure, self.location(0), damage.join("; "))),
        }
    }

    fn decode(&self, buf: &[u8], slot: u64) -> std::result::Result<(u64, Vec<u8>), Refused> {
        let damaged = |r: String| Err(Refused::Damaged(r));
        if buf[0..8] != self.magic {
            return damaged("bad magic".into());
        }
        let seq = u64_at(buf, 8);
        let len = u32_at(buf, 16) as usize;
        if len > MAX_SLOT_PAYLOAD {
            return damaged(format!("payload length {len} exceeds {MAX_SLOT_PAYLOAD}"));
        }
        let payload = &buf[HEADER_BYTES..HEADER_BYTES + len];
        if slot_crc(buf, payload) != u32_at(buf, 20) {
            return damaged("checksum mismatch".into());
        }
        let mut owner = [0u8; 16];
        owner.copy_from_slice(&buf[24..40]);
        let owner = Uuid::from_bytes(owner);
        if owner != self.owner {
            return Err(Refused::Foreign(owner));
        }
        if seq % 2 != slot {
            return damaged(format!("seq {seq} found in slot {slot}"));
        }
        Ok((seq, payload.to_vec()))
    }
}

/// Why a written slot is not taken.
enum Refused {
    /// It fails a check: damage, which the other slot may survive.
    Damaged(String),
    /// It is intact and another device's.
    Foreign(Uuid),
}

/// The checksum of a slot: its header but the checksum itself, then the payload.
fn slot_crc(buf: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..20]), &buf[24..40]);
    crc32c::crc32c_append(crc, payload)
}
