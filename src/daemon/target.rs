//! `xdevice serve`'s ublk target: the device API as the frontend's `Target`. Called on the ublk
//! queue threads, it never waits: reads the hot cache holds and flushes with nothing
//! outstanding are answered there and then; writes, discards and other flushes enter the
//! device's pipeline from the queue thread and are answered by whichever thread confirms them;
//! only a read that misses the cache becomes a task.

use std::sync::Arc;

use xdevice_ublk::{Done, Io, IoError, Reply, Target};

use crate::device::{Device, DeviceError};

/// The device as a ublk target.
#[derive(Debug)]
pub struct DeviceTarget {
    device: Arc<Device>,
    /// Where reads that miss the cache run.
    runtime: tokio::runtime::Handle,
}

impl DeviceTarget {
    /// Serves `device`; call on the runtime the device runs on.
    pub fn new(device: Arc<Device>) -> DeviceTarget {
        DeviceTarget { device, runtime: tokio::runtime::Handle::current() }
    }
}

impl Target for DeviceTarget {
    /// On the queue thread: a read the hot cache holds whole, copied into the request's buffer,
    /// and a flush with no write outstanding.
    fn answer_now(&self, io: &Io, buf: &mut [u8]) -> Option<Result<(), IoError>> {
        match io {
            Io::Read { offset, .. } => match self.device.try_read_cached(*offset, buf) {
                Ok(true) => Some(Ok(())),
                Ok(false) => None,
                Err(e) => Some(Err(e.into())),
            },
            Io::Flush => self.device.try_flush_now().then_some(Ok(())),
            _ => None,
        }
    }

    /// Writes, discards and flushes go into the device's pipeline from the queue thread itself,
    /// and are answered from whichever thread confirms them; only a read that misses the cache
    /// becomes a task (it waits for a replica's image).
    fn submit(&self, io: Io, done: Done) {
        fn answer(done: Done) -> crate::device::Completion {
            Box::new(move |r| done.complete(r.map(|()| Reply::Done).map_err(IoError::from)))
        }
        match io {
            Io::Read { offset, len } => {
                let device = self.device.clone();
                self.runtime.spawn(async move {
                    let result = device.read(offset, u64::from(len)).await;
                    done.complete(result.map(Reply::Data).map_err(IoError::from));
                });
            }
            Io::Write { offset, data, fua } => {
                self.device.submit_write(offset, data.into(), fua, answer(done))
            }
            Io::Flush => self.device.submit_flush(answer(done)),
            Io::Discard { offset, len } => {
                self.device.submit_discard(offset, u64::from(len), false, answer(done))
            }
            Io::WriteZeroes { offset, len, fua } => {
                self.device.submit_discard(offset, u64::from(len), fua, answer(done))
            }
        }
    }
}

/// The frontend's error for each device error, at the frontend's boundary (the device layer does
/// not know the frontend); `xdevice_ublk::IoError::errno` is the one place errors become errnos.
impl From<DeviceError> for xdevice_ublk::IoError {
    fn from(e: DeviceError) -> Self {
        use xdevice_ublk::IoError;
        match e {
            DeviceError::OutOfRange { offset, len, size } => {
                IoError::OutOfRange { offset, len, size }
            }
            DeviceError::Misaligned { offset, len, block } => {
                IoError::Misaligned { offset, len, block }
            }
            DeviceError::Timeout(d) => IoError::Timeout(format!("not committed within {d:?}")),
            DeviceError::Read(e) => IoError::Io(e),
            DeviceError::Closed => IoError::Closed,
            e @ DeviceError::Fenced(_) => IoError::Io(e.to_string()),
        }
    }
}
