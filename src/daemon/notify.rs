//! The systemd service protocol (`Type=notify`) through the `sd-notify` crate: `READY=1` once
//! the device is live (or the node serves Raft traffic), a `STATUS=` line saying what the
//! daemon does, `STOPPING=1` on the way out, and `WATCHDOG=1` pings while the runtime runs.
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "telling the service manager");
    }
}

/// Startup is done; `status` says what the daemon serves.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// What the daemon does now.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// The daemon is stopping.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Pings the watchdog at half its period from a task of the current runtime: a runtime that
/// stops running tasks (a wedged daemon) stops the pings, and the service manager restarts the
/// daemon, which re-attaches to its device. Without a watchdog (`WATCHDOG_USEC` unset) nothing.
pub fn spawn_watchdog() {
    let Some(period) = sd_notify::watchdog_enabled() else { return };
    let every = (period / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}
