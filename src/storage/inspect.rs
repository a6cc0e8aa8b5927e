//! A read-only report of a store: superblock and its copies, hard state, image, and what a WAL
//! scan finds. Never writes: safe on a store another process has open.

use std::fmt;

use super::error::Result;
use super::image::{Image, ImageGeometry};
use super::layout::{self, Location};
use super::poison::Poison;
use super::state::{HardState, StateStore};
use super::superblock::{self, Superblock};
use super::wal::{self, LogSummary};

/// Everything `xdevice inspect` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub location: String,
    pub superblock: Superblock,
    /// Copies that are damaged or older than the chosen one.
    pub superblock_stale: Vec<String>,
    pub state: HardState,
    pub membership_bytes: usize,
    pub state_slot_damaged: Option<String>,
    pub image: ImageReport,
    pub wal: LogSummary,
}

/// The image part of the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageReport {
    pub geometry: ImageGeometry,
    pub applied: super::image::Applied,
    pub written_blocks: u64,
    pub header_slot_damaged: Option<String>,
}

/// Reads everything and reports it.
pub fn inspect(location: &Location) -> Result<Report> {
    let choice = superblock::choose(&layout::superblock_copies(location)?)?;
    let sb = choice.superblock;
    let regions = layout::open_regions(location, &sb, false, false)?;
    let poison = std::sync::Arc::new(Poison::default());
    let (state, state_damaged) =
        StateStore::open(regions.state.0.clone(), regions.state.1, sb.device_uuid, poison.clone())?;
    let geometry = ImageGeometry::new(sb.device_bytes, sb.block_bytes);
    let (image, header_damaged) =
        Image::open(regions.image.clone(), geometry, sb.device_uuid, poison)?;
    let wal = wal::inspect(&*regions.segments, sb.device_uuid)?;
    let state = state.get();
    Ok(Report {
        location: location.describe(),
        superblock: sb,
        superblock_stale: choice.stale.iter().map(|(c, r)| format!("copy {c}: {r}")).collect(),
        membership_bytes: state.membership.len(),
        state,
        state_slot_damaged: state_damaged,
        image: ImageReport {
            geometry,
            applied: image.applied(),
            written_blocks: image.written_blocks(),
            header_slot_damaged: header_damaged,
        },
        wal,
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sb = &self.superblock;
        writeln!(f, "store        {}", self.location)?;
        writeln!(
            f,
            "device       {} uuid {} cluster {} node {}",
            sb.device_name,
            sb.device_uuid,
            sb.cluster_id,
            match sb.node_id {
                0 => "(not bound yet)".to_string(),
                id => id.to_string(),
            }
        )?;
        writeln!(
            f,
            "geometry     {} bytes in {}-byte blocks, {:?} layout, {}-byte WAL segments",
            sb.device_bytes, sb.block_bytes, sb.layout, sb.segment_bytes
        )?;
        writeln!(
            f,
            "superblock   seq {}, {} stale or damaged copies{}",
            sb.seq,
            self.superblock_stale.len(),
            list(&self.superblock_stale)
        )?;
        let vote = self.state.vote.map_or("none".into(), |v| {
            format!("term {} node {} committed {}", v.term, v.node, v.committed)
        });
        writeln!(f, "vote         {vote}")?;
        writeln!(f, "committed    {}", log_id(self.state.committed))?;
        writeln!(f, "membership   {} bytes", self.membership_bytes)?;
        if let Some(d) = &self.state_slot_damaged {
            writeln!(f, "state slot   damaged: {d}")?;
        }
        writeln!(
            f,
            "image        applied {}, {} of {} blocks written",
            log_id(self.image.applied.log_id),
            self.image.written_blocks,
            self.image.geometry.blocks
        )?;
        if let Some(d) = &self.image.header_slot_damaged {
            writeln!(f, "image slot   damaged: {d}")?;
        }
        let w = &self.wal;
        writeln!(
            f,
            "wal          entries [{}, {}), purged {}, {} records in {} segments",
            w.first,
            w.next,
            log_id(w.purged),
            w.records,
            w.segments.len()
        )?;
        for s in &w.segments {
            let max = s.max_index.map_or("-".into(), |m| m.to_string());
            writeln!(
                f,
                "  {:<28} seq {:<6} first index {:<10} last entry {max}",
                s.name, s.seq, s.first_index
            )?;
        }
        writeln!(f, "wal tail     {} offset {}: {}", w.tail.segment, w.tail.offset, w.tail.reason)?;
        for spare in &w.spares {
            writeln!(f, "  spare      {spare}")?;
        }
        for d in &w.discarded {
            writeln!(f, "  discarded  {d}")?;
        }
        Ok(())
    }
}

fn log_id(id: Option<super::state::LogId>) -> String {
    id.map_or("none".into(), |id| {
        format!("index {} (term {}, node {})", id.index, id.term, id.node)
    })
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(": {}", items.join("; "))
    }
}
