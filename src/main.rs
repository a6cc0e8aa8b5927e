//! `xdevice`: the command-line entry point. Sets the allocator, restores the default SIGPIPE
//! action outside the daemons, sets up logging and hands over to `xdevice::cli::app`.

// jemalloc: glibc's per-thread arenas kept gigabytes of freed write buffers resident under a
// sustained write stream (bench `cache-memory`: 5.4 GiB peak with a 16 MiB cache, 466 MiB with
// jemalloc). Settings in `xdevice::MALLOC_CONF`.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
#[used]
static malloc_conf: &[u8; xdevice::MALLOC_CONF.len()] = xdevice::MALLOC_CONF;

fn main() {
    // The daemons keep Rust's SIGPIPE disposition (ignored): a peer that drops its connection
    // must cost that connection an EPIPE, never the daemon its life (vectored socket writes, as
    // TLS makes them, do not pass MSG_NOSIGNAL). Every other command gets the default back, so
    // `xdevice inspect | head` ends quietly instead of panicking on a closed pipe.
    let daemon = matches!(std::env::args().nth(1).as_deref(), Some("serve" | "recover" | "node"));
    if !daemon {
        // SAFETY: called first in main, before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a daemon's log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    xdevice::cli::app::main();
}
