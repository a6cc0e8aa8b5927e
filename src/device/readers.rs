//! A fixed pool of reader threads for replica image reads that miss the hot cache. Each thread
//! does its own blocking reads (the disk backends keep one io_uring per thread), so the number
//! of threads reading is the pool's size however deep the device's queues are; tokio's blocking
//! pool, used before, grew a thread per waiting read (about 185 at queue depth 32).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// Reader threads fed from one queue; they exit when the pool is dropped.
#[derive(Debug)]
pub struct ReaderPool {
    jobs: mpsc::Sender<Job>,
    threads: usize,
}

/// Reader threads per embedded device: enough to keep a few reads in flight per replica disk.
pub const DEFAULT_READERS: usize = 4;

impl ReaderPool {
    pub fn new(threads: usize, name: &str) -> std::io::Result<ReaderPool> {
        let threads = threads.max(1);
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || loop {
                // One thread waits on the queue; the others wait for the lock, and the next
                // job goes to whichever holds it. A poisoned lock cannot hide a job.
                let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                match job {
                    Ok(job) => job(),
                    Err(mpsc::RecvError) => return,
                }
            })?;
        }
        Ok(ReaderPool { jobs, threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on a reader thread and resolves to its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || drop(tx.send(f()))))
            .map_err(|_| "the reader threads have stopped".to_string())?;
        rx.await.map_err(|_| "a reader thread dropped the read".to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_jobs_run_on_the_fixed_threads() {
        let pool = Arc::new(ReaderPool::new(3, "test-reader").unwrap());
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    running.fetch_sub(1, Ordering::SeqCst);
                    let name = std::thread::current().name().unwrap_or_default().to_string();
                    (i * 2, name)
                })
                .await
                .unwrap()
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let (v, name) = t.await.unwrap();
            assert_eq!(v, i as u64 * 2);
            assert!(name.starts_with("test-reader-"), "ran on {name}");
        }
        assert!(peak.load(Ordering::SeqCst) <= 3, "more jobs at once than threads");
    }
}
