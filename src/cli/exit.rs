//! Exit statuses of `xdevice` and how an error becomes one line on stderr.
//!
//! | status | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | failed (the message names what and why) |
//! | 2 | bad usage: a flag, a value, or a configuration file (clap uses 2 for its own) |
//! | 3 | `status`, `stop --all`: a daemon's socket did not answer |
//! | 4 | `stop`, `cluster init`, `cluster transfer`: not done within the time allowed |

/// Failure.
pub const FAILED: i32 = 1;
/// A flag, value or configuration file is wrong.
pub const USAGE: i32 = 2;
/// `xdevice status`: a daemon did not answer.
pub const UNREACHABLE: i32 = 3;
/// Not done within the time allowed.
pub const TIMED_OUT: i32 = 4;

/// The text shown in `--help` and the man page.
pub const HELP: &str = "Exit status: 0 done; 1 failed; 2 bad usage (a flag, a value, a \
configuration file); 3 `status`, `stop --all`: a daemon's socket did not answer; 4 `stop`, \
`cluster init`, `cluster transfer`: not done within the time allowed.";

/// A wrong flag, value or configuration: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Something not done within its time: exit status 4.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TimedOut(pub String);

/// A usage error for `bail`-like use: `return Err(usage(format!(...)))`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

/// Returns a usage error (exit status 2) from the enclosing function, formatted like `format!`.
macro_rules! bail_usage {
    ($($arg:tt)*) => {
        return Err($crate::cli::exit::usage(format!($($arg)*)))
    };
}
pub(crate) use bail_usage;

/// The exit status for `e`: the first cause that has one decides.
pub fn code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.is::<Usage>() {
            return USAGE;
        }
        if cause.is::<TimedOut>() {
            return TIMED_OUT;
        }
        if cause.is::<super::serve::Unreachable>() {
            return UNREACHABLE;
        }
    }
    FAILED
}

/// `e` and its causes on one line, outermost first, leaving out a cause whose text the line
/// already holds (an error that prints its source, and then that source again).
pub fn message(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(13);
        let e = anyhow::Error::new(std::io::Error::other(format!("open sb: {io}")))
            .context("inspecting /d");
        let inner = anyhow::Error::from(io).context("open sb: Permission denied (os error 13)");
        for e in [e, inner.context("inspecting /d")] {
            let m = message(&e);
            assert_eq!(m.matches("os error 13").count(), 1, "{m}");
            assert!(m.starts_with("inspecting /d: open sb"), "{m}");
        }
    }

    #[test]
    fn the_status_follows_the_cause() {
        assert_eq!(code(&usage("--size 0")), USAGE);
        assert_eq!(code(&usage("--size 0").context("serving")), USAGE);
        assert_eq!(code(&TimedOut("no leader".into()).into()), TIMED_OUT);
        assert_eq!(code(&super::super::serve::Unreachable(1).into()), UNREACHABLE);
        assert_eq!(code(&anyhow::anyhow!("disk full")), FAILED);
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("x")).context("y");
        assert_eq!(code(&e.unwrap_err()), FAILED);
    }
}
