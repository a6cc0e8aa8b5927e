//! When a client may try to connect again after failures. Pure: the clock and the random jitter are
//! inputs, so the policy is tested without sleeping.

use std::time::{Duration, Instant};

use super::RpcError;

/// Exponential reconnect backoff: after the n-th consecutive failure the next attempt waits
/// `min(backoff_max, backoff_min * 2^(n-1))` plus up to a quarter of that as jitter, never more
/// than `backoff_max`. A successful handshake resets it.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<RpcError>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max: max.max(min), failures: 0, retry_at: None, last_error: None }
    }

    /// The wait after the current number of failures; `jitter` is in `[0, 1)`.
    pub fn delay(&self, jitter: f64) -> Duration {
        if self.failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (self.failures - 1).min(30);
        let base = self.min.saturating_mul(1u32 << doublings).min(self.max);
        let extra = base.mul_f64(jitter.clamp(0.0, 1.0) / 4.0);
        (base + extra).min(self.max)
    }

    /// Records a failed connection (or a connection lost after it was up) at `now`.
    pub fn record_failure(&mut self, now: Instant, error: RpcError, jitter: f64) {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(now + self.delay(jitter));
        self.last_error = Some(error);
    }

    /// Forgets past failures after a successful handshake.
    pub fn reset(&mut self) {
        self.failures = 0;
        self.retry_at = None;
        self.last_error = None;
    }

    /// While waiting: how long is left and the failure that caused the wait.
    pub fn waiting(&self, now: Instant) -> Option<(Duration, &RpcError)> {
        let retry_at = self.retry_at?;
        let error = self.last_error.as_ref()?;
        (now < retry_at).then(|| (retry_at - now, error))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn failed(times: u32) -> Backoff {
        let mut b = Backoff::new(10 * MS, 100 * MS);
        for _ in 0..times {
            b.record_failure(Instant::now(), RpcError::Unreachable("x".into()), 0.0);
        }
        b
    }

    #[test]
    fn grows_exponentially_and_caps() {
        let delays: Vec<_> = (0..7).map(|n| failed(n).delay(0.0)).collect();
        assert_eq!(delays, [0, 10, 20, 40, 80, 100, 100].map(|ms| ms * MS));
        assert_eq!(failed(1000).delay(0.99), 100 * MS);
    }

    #[test]
    fn jitter_adds_at_most_a_quarter_and_never_passes_max() {
        assert_eq!(failed(1).delay(0.5), 10 * MS + 1250 * Duration::from_micros(1));
        assert!(failed(1).delay(0.999) < 13 * MS);
        assert_eq!(failed(5).delay(0.999), 100 * MS);
        assert_eq!(failed(1).delay(7.0), 12500 * Duration::from_micros(1));
    }

    #[test]
    fn waiting_until_retry_at_then_free_and_reset_clears() {
        let now = Instant::now();
        let mut b = Backoff::new(10 * MS, 100 * MS);
        assert!(b.waiting(now).is_none());
        b.record_failure(now, RpcError::Rejected("no".into()), 0.0);
        let (left, err) = b.waiting(now).map(|(d, e)| (d, e.clone())).unwrap();
        assert_eq!((left, err), (10 * MS, RpcError::Rejected("no".into())));
        assert!(b.waiting(now + 10 * MS).is_none());
        b.reset();
        assert!(b.waiting(now).is_none());
        assert_eq!(b.delay(0.0), Duration::ZERO);
    }

    #[test]
    fn max_below_min_is_raised_to_min() {
        let mut b = Backoff::new(50 * MS, 10 * MS);
        b.record_failure(Instant::now(), RpcError::Unreachable("x".into()), 0.9);
        assert_eq!(b.delay(0.9), 50 * MS);
    }
}
