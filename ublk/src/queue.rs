//! One ublk queue: a thread with its own io_uring that fetches I/O commands from the kernel,
//! validates each descriptor once, hands it to the [`Target`], and commits the answer.
//!
//! A request that needs no waiting (a read from memory, a flush with nothing outstanding) is
//! answered on this thread, in the handler that received it (`Target::answer_now`): read data
//! is copied straight into the tag's buffer, and the commit goes out with the next submission.
//!
//! Otherwise the target answers on other threads (the device runs on an async runtime). An answer is
//! pushed onto the queue's [`Completions`] and the queue's eventfd is written; a read of that
//! eventfd is always pending in the queue's io_uring, so a queue sleeping in `io_uring_enter`
//! wakes at once. That is the whole cross-thread wake-up: no polling interval, no timeout, and
//! a queue with nothing else to do still answers within one eventfd round trip.
//!
//! The kernel-owned buffers (one per tag, `max_io_bytes` each) never leave this thread: write
//! data is copied out before the request is handed over, read data is copied in before commit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkIORes};

use crate::request::{decode, Decoded, Geometry, IoError, Op};
use crate::{Io, Reply, Target};

/// Answers waiting for their queue thread, and the eventfd that wakes it.
#[derive(Debug)]
pub(crate) struct Completions {
    done: Mutex<Vec<(u16, Result<Reply, IoError>)>>,
    /// Set while a wake-up is already on its way: later answers need not write the eventfd.
    signalled: AtomicBool,
    efd: OwnedFd,
    /// The 8-byte buffer the pending eventfd read fills. It lives as long as the kernel may write
    /// it: until the queue's ring is gone, which happens before the last `Arc` drops.
    counter: Box<std::cell::UnsafeCell<u64>>,
}

// SAFETY: `counter` is only written by the kernel (the pending read) and never read or written
// by Rust code; everything else is Sync.
unsafe impl Sync for Completions {}

impl Completions {
    fn new() -> std::io::Result<Completions> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Completions {
            done: Mutex::new(Vec::new()),
            signalled: AtomicBool::new(false),
            // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
            counter: Box::new(std::cell::UnsafeCell::new(0)),
        })
    }

    pub(crate) fn push(&self, tag: u16, result: Result<Reply, IoError>) {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).push((tag, result));
        if !self.signalled.swap(true, Ordering::AcqRel) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local buffer to an eventfd we own.
            let n = unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), 8) };
            if n != 8 {
                // Only a counter overflow (2^64 - 2 unread wake-ups) can fail this.
                tracing::error!(
                    "waking the ublk queue failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// Takes every answer; the next `push` signals again.
    fn take(&self) -> Vec<(u16, Result<Reply, IoError>)> {
        // Clear the flag first: an answer pushed after this either lands in this batch or
        // writes the eventfd again, so none is left without a wake-up.
        self.signalled.store(false, Ordering::Release);
        std::mem::take(&mut *self.done.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The handle a target completes a request through. Dropping it unanswered fails the request
/// with EIO, so a lost future can never hang the kernel's request forever.
#[derive(Debug)]
pub struct Done {
    tag: u16,
    completions: Option<Arc<Completions>>,
}

impl Done {
    /// Answers the request: `Reply::Data` for a read (exactly the requested length),
    /// `Reply::Done` for everything else, or the error.
    pub fn complete(mut self, result: Result<Reply, IoError>) {
        if let Some(c) = self.completions.take() {
            c.push(self.tag, result);
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(c) = self.completions.take() {
            c.push(self.tag, Err(IoError::Dropped));
        }
    }
}

/// The user_data tag of the eventfd read: one past the last I/O tag (`extra_ios` reserves it).
fn wake_tag(depth: u16) -> u16 {
    depth
}

fn arm_wakeup(q: &UblkQueue, c: &Completions, depth: u16) -> Result<(), libublk::UblkError> {
    let read = opcode::Read::new(types::Fd(c.efd.as_raw_fd()), c.counter.get().cast(), 8)
        .build()
        .user_data(UblkIOCtx::build_user_data(wake_tag(depth), 0, 0, true));
    q.ublk_submit_sqe_sync(read)
}

/// Per-tag state of the queue thread.
struct Slot {
    /// The request the target is working on, if any.
    pending: Option<Decoded>,
}

/// Runs queue `qid` until the device stops. Called on the queue's own thread by libublk.
pub(crate) fn run(qid: u16, dev: &UblkDev, geo: Geometry, target: Arc<dyn Target>) {
    name_thread(qid);
    // libublk ends the queue on any io_uring_enter error but ETIME, so a signal handled on this
    // thread (EINTR) would take the device's queue down: every catchable signal goes to the
    // daemon's other threads instead.
    if let Err(e) = block_signals() {
        tracing::warn!("ublk queue {qid}: blocking signals failed: {e}");
    }
    if let Err(e) = serve_queue(qid, dev, geo, target) {
        tracing::error!("ublk queue {qid} stopped: {e}");
    }
}

/// Names this thread `ublk-q<qid>` (libublk starts its queue threads unnamed), so tools such as
/// `top -H` and the end-to-end tests can tell the queues apart.
fn name_thread(qid: u16) {
    let name = format!("ublk-q{qid}\0");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes (longer ones are
    // truncated by the kernel) from a live buffer; it only renames the calling thread.
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!("naming ublk queue {qid}'s thread: {}", std::io::Error::last_os_error());
    }
}

fn block_signals() -> std::io::Result<()> {
    // SAFETY: `set` is a local sigset_t initialised by sigfillset before use; pthread_sigmask
    // only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    geo: Geometry,
    target: Arc<dyn Target>,
) -> Result<(), String> {
    let depth = dev.dev_info.queue_depth;
    let completions =
        Arc::new(Completions::new().map_err(|e| format!("creating the queue eventfd: {e}"))?);
    let bufs: Rc<Vec<IoBuf<u8>>> = Rc::new(dev.alloc_queue_io_bufs());
    let queue = UblkQueue::new(qid, dev)
        .map_err(|e| format!("creating queue {qid}: {e}"))?
        .submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs)))
        .map_err(|e| format!("fetching commands on queue {qid}: {e}"))?;
    arm_wakeup(&queue, &completions, depth).map_err(|e| format!("arming the wake-up: {e}"))?;

    let mut slots: Vec<Slot> = (0..depth).map(|_| Slot { pending: None }).collect();
    let handler = |q: &UblkQueue, tag: u16, ctx: &UblkIOCtx| {
        if ctx.is_tgt_io() {
            if tag == wake_tag(depth) {
                for (tag, result) in completions.take() {
                    finish(q, &bufs, &mut slots, tag, result);
                }
                if let Err(e) = arm_wakeup(q, &completions, depth) {
                    tracing::error!("re-arming the ublk queue wake-up failed: {e}");
                }
            }
            return;
        }
        let Some(slot) = slots.get_mut(usize::from(tag)) else {
            tracing::error!("ublk queue {qid}: tag {tag} beyond depth {depth}");
            return;
        };
        let iod = q.get_iod(tag);
        let decoded = match decode(iod.op_flags, iod.start_sector, iod.nr_sectors, &geo) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("ublk queue {qid} tag {tag}: {e}");
                commit(q, &bufs, tag, -e.errno());
                return;
            }
        };
        let io = match decoded.op {
            Op::Read => Io::Read { offset: decoded.offset, len: decoded.len },
            Op::Write => Io::Write {
                offset: decoded.offset,
                data: bufs[usize::from(tag)].as_slice()[..decoded.len as usize].to_vec(),
                fua: decoded.fua,
            },
            Op::Flush => Io::Flush,
            Op::Discard => Io::Discard { offset: decoded.offset, len: decoded.len },
            Op::WriteZeroes => {
                Io::WriteZeroes { offset: decoded.offset, len: decoded.len, fua: decoded.fua }
            }
        };
        if matches!(io, Io::Read { .. } | Io::Flush) {
            let len = if decoded.op == Op::Read { decoded.len as usize } else { 0 };
            if let Some(result) = target.answer_now(&io, tag_buf(&bufs, tag, len)) {
                let res = match result {
                    Ok(()) => decoded.len as i32,
                    Err(e) => failed(&decoded, &e),
                };
                commit(q, &bufs, tag, res);
                return;
            }
        }
        slot.pending = Some(decoded);
        target.submit(io, Done { tag, completions: Some(completions.clone()) });
    };
    queue.wait_and_handle_io(handler);
    Ok(())
}

/// Commits a target's answer for `tag`: copies read data into the tag's buffer first.
fn finish(
    q: &UblkQueue,
    bufs: &[IoBuf<u8>],
    slots: &mut [Slot],
    tag: u16,
    result: Result<Reply, IoError>,
) {
    let Some(decoded) = slots.get_mut(usize::from(tag)).and_then(|s| s.pending.take()) else {
        tracing::error!("ublk: an answer for tag {tag}, which has no request; ignored");
        return;
    };
    let res = match (decoded.op, result) {
        (_, Err(e)) => failed(&decoded, &e),
        (Op::Read, Ok(Reply::Data(data))) if data.len() == decoded.len as usize => {
            tag_buf(bufs, tag, data.len()).copy_from_slice(&data);
            decoded.len as i32
        }
        (Op::Read, Ok(reply)) => {
            let got = match reply {
                Reply::Data(d) => d.len(),
                Reply::Done => 0,
            };
            let e = IoError::ShortRead { got, want: decoded.len as usize };
            tracing::error!("ublk: read at {}: {e}", decoded.offset);
            -e.errno()
        }
        (_, Ok(_)) => decoded.len as i32,
    };
    commit(q, bufs, tag, res);
}

/// The first `len` bytes of `tag`'s buffer, for a read's data. Only for a tag whose request is
/// this thread's (taken from the kernel, not yet committed), with `len` bounded by `decode`.
#[allow(clippy::mut_from_ref)]
fn tag_buf(bufs: &[IoBuf<u8>], tag: u16, len: usize) -> &mut [u8] {
    // SAFETY: the buffer belongs to `tag`, whose request is ours until committed, and the kernel
    // does not touch it meanwhile; `decode` bounded `len` by the buffer size. Each caller holds
    // the slice only while it fills it, before the commit, so no two exist at once.
    unsafe { std::slice::from_raw_parts_mut(bufs[usize::from(tag)].as_mut_ptr(), len) }
}

/// A request that failed: logged, and answered with its errno.
fn failed(decoded: &Decoded, e: &IoError) -> i32 {
    tracing::warn!("ublk: {:?} at {} (+{}): {e}", decoded.op, decoded.offset, decoded.len);
    -e.errno()
}

fn commit(q: &UblkQueue, bufs: &[IoBuf<u8>], tag: u16, res: i32) {
    let desc = BufDesc::Slice(bufs[usize::from(tag)].as_slice());
    if let Err(e) = q.complete_io_cmd_unified(tag, desc, Ok(UblkIORes::Result(res))) {
        tracing::error!("ublk: committing tag {tag} failed: {e}");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Reads the eventfd counter without blocking: the number of wake-ups written since the
    /// last read, or 0.
    fn wakeups(c: &Completions) -> u64 {
        let mut pfd = libc::pollfd { fd: c.efd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, zero timeout.
        if unsafe { libc::poll(&mut pfd, 1, 0) } != 1 {
            return 0;
        }
        let mut v = [0u8; 8];
        // SAFETY: reads 8 bytes into a live local buffer from our eventfd.
        assert_eq!(unsafe { libc::read(c.efd.as_raw_fd(), v.as_mut_ptr().cast(), 8) }, 8);
        u64::from_ne_bytes(v)
    }

    #[test]
    fn answers_from_other_threads_wake_the_queue_once_per_batch() {
        let c = Arc::new(Completions::new().expect("eventfd"));
        let threads: Vec<_> = (0..8u16)
            .map(|tag| {
                let done = Done { tag, completions: Some(c.clone()) };
                std::thread::spawn(move || done.complete(Ok(Reply::Done)))
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        // Eight answers, one wake-up: later pushes saw the signal already pending.
        assert_eq!(wakeups(&c), 1);
        let mut tags: Vec<u16> = c
            .take()
            .into_iter()
            .map(|(t, r)| {
                assert!(matches!(r, Ok(Reply::Done)));
                t
            })
            .collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..8).collect::<Vec<_>>());
        // After a take, the next answer signals again.
        Done { tag: 9, completions: Some(c.clone()) }.complete(Ok(Reply::Data(vec![1; 4096])));
        assert_eq!(wakeups(&c), 1);
        let got = c.take();
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0], (9, Ok(Reply::Data(d))) if d.len() == 4096));
        assert!(c.take().is_empty());
    }

    #[test]
    fn a_dropped_done_answers_eio() {
        let c = Arc::new(Completions::new().expect("eventfd"));
        drop(Done { tag: 3, completions: Some(c.clone()) });
        assert_eq!(wakeups(&c), 1);
        let got = c.take();
        assert_eq!(got.len(), 1);
        let (tag, result) = &got[0];
        assert_eq!(*tag, 3);
        let err = result.as_ref().expect_err("dropped");
        assert_eq!(*err, IoError::Dropped);
        assert_eq!(err.errno(), libc::EIO);
    }
}
