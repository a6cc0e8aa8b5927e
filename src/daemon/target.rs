//! `xdevice serve`'s ublk target: the device API as the frontend's `Target`. Called on the ublk
//! queue threads, it never waits: reads the hot cache holds and flushes with nothing
//! outstanding are answered there and then; writes, discards and other flushes enter the
//! device's pipeline from the queue thread and are answered by whichever thread confirms them;
//! only a read that misses the cache becomes a task.

use std::sync::Arc;
use std::time::Instant;

use xdevice_ublk::{Done, Io, IoError, Reply, Target};

use crate::device::{Device, DeviceError};
use crate::metrics::{recorders, Op};

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
        let started = Instant::now();
        let answer = match io {
            Io::Read { offset, .. } => match self.device.try_read_cached(*offset, buf) {
                Ok(true) => Some(Ok(())),
                Ok(false) => None,
                Err(e) => Some(Err(e.into())),
            },
            Io::Flush => self.device.try_flush_now().then_some(Ok(())),
            _ => None,
        };
        if answer.is_some() {
            let m = recorders();
            m.request_started();
            m.request_done(kind(io), started, io_bytes(io));
        }
        answer
    }

    /// Writes, discards and flushes go into the device's pipeline from the queue thread itself,
    /// and are answered from whichever thread confirms them; only a read that misses the cache
    /// becomes a task (it waits for a replica's image).
    fn submit(&self, io: Io, done: Done) {
        let started = Instant::now();
        let (op, bytes) = (kind(&io), io_bytes(&io));
        recorders().request_started();
        let answer = move |done: Done| -> crate::device::Completion {
            Box::new(move |r| {
                recorders().request_done(op, started, bytes);
                done.complete(r.map(|()| Reply::Done).map_err(IoError::from))
            })
        };
        match io {
            Io::Read { offset, len } => {
                let device = self.device.clone();
                self.runtime.spawn(async move {
                    let result = device.read(offset, u64::from(len)).await;
                    recorders().request_done(op, started, bytes);
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

/// The kind of a request, for metrics.
fn kind(io: &Io) -> Op {
    match io {
        Io::Read { .. } => Op::Read,
        Io::Write { .. } => Op::Write,
        Io::Flush => Op::Flush,
        Io::Discard { .. } | Io::WriteZeroes { .. } => Op::Discard,
    }
}

/// The bytes a request moves or covers (0 for a flush).
fn io_bytes(io: &Io) -> u64 {
    match io {
        Io::Read { len, .. } | Io::Discard { len, .. } | Io::WriteZeroes { len, .. } => {
            u64::from(*len)
        }
        Io::Write { data, .. } => data.len() as u64,
        Io::Flush => 0,
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
