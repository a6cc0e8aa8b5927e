//! xdevice's ublk frontend: serves a [`Target`] as `/dev/ublkbN` through the kernel's ublk
//! driver. This crate is the only code that links libublk and touches kernel-owned I/O
//! buffers; it knows nothing of Raft or storage.
//!
//! - [`request`] decodes and validates each descriptor once and is the one place errors become
//!   errnos.
//! - [`queue`](crate::queue) runs one thread per hardware queue; answers produced on other
//!   threads wake it through an eventfd read kept pending in its io_uring.
//! - This module creates the device (with user recovery, so it outlives a crashed daemon),
//!   tells the kernel the truth about it (block sizes, limits, volatile cache and FUA in
//!   writeback mode, none in writethrough, discard), re-attaches to a quiesced device, and
//!   stops one.

mod queue;
pub mod request;

use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{sys, UblkFlags};

pub use queue::Done;
pub use request::{Geometry, IoError};

/// One request for the target, validated (inside the device, block-aligned, within limits).
#[derive(Debug)]
pub enum Io {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// Complete once every write completed before it is durable.
    Flush,
    Discard {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
}

/// A target's answer to one request.
#[derive(Debug)]
pub enum Reply {
    /// Write, flush, discard or write-zeroes done.
    Done,
    /// The bytes of a read, exactly as many as asked for.
    Data(Vec<u8>),
}

/// What the frontend serves. Both methods are called on a queue thread and must not block.
pub trait Target: Send + Sync + 'static {
    /// Answers `io` at once if that needs no waiting (a read whose every block is in memory, a
    /// flush with nothing outstanding), on the queue thread: a read's data goes straight into
    /// `buf`, the request's own buffer of exactly its length. `None` hands it to `submit`.
    /// Called for reads and flushes only.
    fn answer_now(&self, io: &Io, buf: &mut [u8]) -> Option<Result<(), IoError>> {
        let _ = (io, buf);
        None
    }

    /// Hands the request to wherever the work happens; the answer comes through `done`, from
    /// any thread (the queue collects answers in batches through its eventfd).
    fn submit(&self, io: Io, done: Done);
}

/// How to create (or re-attach to) a device.
#[derive(Clone, Debug)]
pub struct Config {
    /// The device number (`/dev/ublkbN`); `None` lets the driver choose.
    pub id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    pub geometry: Geometry,
    /// Stored with the device (the driver's json export) so a later `recover` can check it is
    /// re-attaching the right data to the right device.
    pub owner: serde_json::Value,
}

/// Errors of the control path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Ublk {
        what: String,
        #[source]
        source: libublk::UblkError,
    },
}

fn ublk(what: impl Into<String>) -> impl FnOnce(libublk::UblkError) -> Error {
    let what = what.into();
    move |source| Error::Ublk { what, source }
}

/// The live device, as reported once it serves I/O.
#[derive(Clone, Debug)]
pub struct Live {
    pub id: u32,
    pub path: String,
    /// True when this attached to a device a crashed daemon left behind.
    pub recovered: bool,
}

/// The state of an existing device, from the driver.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub id: u32,
    pub state: &'static str,
    pub user_recovery: bool,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    /// The daemon pid the driver has on record (that of the last daemon to start it).
    pub daemon_pid: i32,
    /// What `Config::owner` held when the device was created or last recovered.
    pub owner: Option<serde_json::Value>,
}

/// Looks up device `id`; `Ok(None)` if it does not exist.
pub fn device_info(id: u32) -> Result<Option<DeviceInfo>, Error> {
    if !std::path::Path::new(&format!("/dev/ublkc{id}")).exists() {
        return Ok(None);
    }
    let ctrl =
        UblkCtrl::new_simple(id as i32).map_err(ublk(format!("opening ublk device {id}")))?;
    let info = ctrl.dev_info();
    let state = match u32::from(info.state) {
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_DEAD => "dead",
        _ => "unknown",
    };
    Ok(Some(DeviceInfo {
        id,
        state,
        user_recovery: info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        max_io_bytes: info.max_io_buf_bytes,
        daemon_pid: info.ublksrv_pid,
        owner: ctrl.get_target_data_from_json(),
    }))
}

/// Whether this kernel can serve ublk devices (`/dev/ublk-control` exists).
pub fn available() -> bool {
    std::path::Path::new("/dev/ublk-control").exists()
}

/// Parameters for the kernel: all true of the target, nothing assumed.
fn params(geo: &Geometry) -> sys::ublk_params {
    let shift = geo.block_bytes.trailing_zeros() as u8;
    let attrs =
        if geo.volatile_cache { sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA } else { 0 };
    sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: geo.max_io_bytes >> 9,
            dev_sectors: geo.size_bytes >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: geo.block_bytes,
            max_discard_sectors: geo.max_discard_bytes >> 9,
            max_write_zeroes_sectors: geo.max_discard_bytes >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Creates a new device (or, with `recover`, re-attaches to the quiesced device `cfg.id`) and
/// serves it until it is stopped ([`stop`]). Calls `on_live` once the device serves I/O.
/// Blocks; queue threads run inside.
pub fn serve(
    cfg: &Config,
    recover: bool,
    target: Arc<dyn Target>,
    on_live: impl FnOnce(Live) + Send + Sync + 'static,
) -> Result<(), Error> {
    cfg.geometry.validate().map_err(Error::Invalid)?;
    if cfg.queues == 0 || cfg.depth == 0 || cfg.depth > 4096 {
        return Err(Error::Invalid(format!(
            "queues ({}) must be at least 1 and depth ({}) in 1..=4096",
            cfg.queues, cfg.depth
        )));
    }
    let ctrl = if recover {
        let Some(id) = cfg.id else {
            return Err(Error::Invalid("recovering needs the device number".into()));
        };
        let Some(info) = device_info(id)? else {
            return Err(Error::Invalid(format!("/dev/ublkc{id} does not exist")));
        };
        if !info.user_recovery {
            return Err(Error::Invalid(format!(
                "ublk device {id} was not created with user recovery; it cannot be re-attached"
            )));
        }
        if info.state != "quiesced" {
            return Err(Error::Invalid(format!(
                "ublk device {id} is {} (pid {}), not quiesced: its daemon is still running or it \
                 is being removed",
                info.state, info.daemon_pid
            )));
        }
        if info.owner.as_ref() != Some(&cfg.owner) {
            return Err(Error::Invalid(format!(
                "ublk device {id} belongs to {}, not to {}",
                info.owner.map_or_else(|| "an unknown daemon".into(), |o| o.to_string()),
                cfg.owner
            )));
        }
        UblkCtrl::new_simple(id as i32)
            .and_then(|c| c.start_user_recover())
            .map_err(ublk(format!("starting recovery of ublk device {id}")))?;
        UblkCtrlBuilder::default()
            .name("xdevice")
            .id(id as i32)
            .nr_queues(info.queues)
            .depth(info.depth)
            .io_buf_bytes(info.max_io_bytes)
            .ctrl_flags(u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE))
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build()
            .map_err(ublk(format!("re-attaching to ublk device {id}")))?
    } else {
        UblkCtrlBuilder::default()
            .name("xdevice")
            .id(cfg.id.map_or(-1, |i| i as i32))
            .nr_queues(cfg.queues)
            .depth(cfg.depth)
            .io_buf_bytes(cfg.geometry.max_io_bytes)
            // Recovery keeps the device when the daemon dies; REISSUE hands the requests the
            // dead daemon held to the next one instead of failing them (block writes are
            // idempotent, so a write done twice is harmless).
            .ctrl_flags(u64::from(sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE))
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(ublk("creating a ublk device (is ublk_drv loaded and are we root?)"))?
    };
    let dev_info = ctrl.dev_info();
    if recover && u64::from(dev_info.max_io_buf_bytes) < u64::from(cfg.geometry.max_io_bytes) {
        return Err(Error::Invalid(format!(
            "ublk device {} takes I/O of up to {} bytes, fewer than the {} configured",
            dev_info.dev_id, dev_info.max_io_buf_bytes, cfg.geometry.max_io_bytes
        )));
    }
    let geo = cfg.geometry;
    let owner = cfg.owner.clone();
    let tgt_init = move |dev: &mut UblkDev| {
        dev.tgt.dev_size = geo.size_bytes;
        dev.tgt.params = params(&geo);
        // Room in the ring for every tag's command plus the wake-up read.
        dev.tgt.extra_ios = 1;
        dev.tgt.sq_depth = dev.dev_info.queue_depth.saturating_mul(2);
        dev.tgt.cq_depth = dev.dev_info.queue_depth.saturating_mul(2);
        dev.set_target_json(owner);
        Ok(())
    };
    let q_fn = move |qid: u16, dev: &UblkDev| queue::run(qid, dev, geo, target.clone());
    let id = dev_info.dev_id;
    ctrl.run_target(tgt_init, q_fn, move |c: &UblkCtrl| {
        on_live(Live { id, path: c.get_bdev_path(), recovered: recover })
    })
    .map_err(ublk(format!("serving ublk device {id}")))?;
    if recover {
        // A control made for recovery does not delete the device when dropped; a clean stop
        // removes it all the same.
        if let Err(e) = ctrl.del_dev() {
            tracing::debug!("deleting ublk device {id} after recovery: {e}");
        }
    }
    Ok(())
}

/// Stops device `id`: the kernel drains in-flight I/O through the still-running queues, then
/// the queues exit and [`serve`] returns. Blocks until the driver has stopped the device, so
/// call it off the threads the target answers on.
pub fn stop(id: u32) -> Result<(), Error> {
    UblkCtrl::new_simple(id as i32)
        .and_then(|c| c.kill_dev())
        .map(|_| ())
        .map_err(ublk(format!("stopping ublk device {id}")))
}

/// Removes device `id`, which no daemon serves (one a crashed daemon left quiesced): the kernel
/// fails the I/O it held with EIO, then the device is deleted.
pub fn remove(id: u32) -> Result<(), Error> {
    let ctrl =
        UblkCtrl::new_simple(id as i32).map_err(ublk(format!("opening ublk device {id}")))?;
    ctrl.kill_dev().map_err(ublk(format!("stopping ublk device {id}")))?;
    ctrl.del_dev().map(|_| ()).map_err(ublk(format!("deleting ublk device {id}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn geo(volatile_cache: bool) -> Geometry {
        Geometry {
            block_bytes: 4096,
            size_bytes: 1 << 30,
            max_io_bytes: 1 << 20,
            max_discard_bytes: 64 << 20,
            volatile_cache,
        }
    }

    #[test]
    fn writeback_advertises_a_volatile_cache_and_fua_writethrough_neither() {
        let wb = params(&geo(true));
        assert_eq!(wb.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        let wt = params(&geo(false));
        assert_eq!(wt.basic.attrs, 0);
    }

    #[test]
    fn parameters_describe_the_geometry() {
        let p = params(&geo(true));
        assert_eq!(p.types, sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(p.basic.logical_bs_shift, 12);
        assert_eq!(p.basic.physical_bs_shift, 12);
        assert_eq!(p.basic.max_sectors, 2048);
        assert_eq!(p.basic.dev_sectors, 1 << 21);
        assert_eq!(p.discard.discard_granularity, 4096);
        assert_eq!(p.discard.max_discard_sectors, 64 << 11);
        assert_eq!(p.discard.max_write_zeroes_sectors, 64 << 11);
        assert_eq!(p.discard.max_discard_segments, 1);
    }
}
