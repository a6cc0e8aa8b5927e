//! `serve --metrics ADDR`: the device's figures in Prometheus' text exposition format over HTTP
//! (`GET /metrics`), rendered from the same `DeviceStatus` that `xdevice status` prints.
//!
//! The HTTP side is deliberately small: one request per connection, a request head of at most
//! 8 KiB read within 5 s, `GET /metrics` answered, anything else refused with its status code.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::status::DeviceStatus;

const MAX_HEAD: usize = 8 << 10;
const READ_LIMIT: Duration = Duration::from_secs(5);

/// The exposition of one device's status.
pub fn render(s: &DeviceStatus) -> String {
    let mut out = String::new();
    let dev = format!("device=\"ublkb{}\"", s.id);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP xdevice_{name} {help}");
        let _ = writeln!(out, "# TYPE xdevice_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "xdevice_{name}{{{labels}}} {value}");
        }
    };
    let one = |v: u64| vec![(dev.clone(), v as f64)];
    let c = &s.cache;
    family("cache_capacity_bytes", "gauge", "Hot cache size.", &one(c.capacity_bytes));
    family(
        "cache_resident_bytes",
        "gauge",
        "Block bytes the hot cache holds, pinned and clean.",
        &one(c.resident_bytes),
    );
    family(
        "cache_pinned_bytes",
        "gauge",
        "Bytes of writes not yet committed, held until they are.",
        &one(c.pinned_bytes),
    );
    family("cache_hits_total", "counter", "Blocks read from the hot cache.", &one(c.hits));
    family("cache_misses_total", "counter", "Blocks read from a replica.", &one(c.misses));
    family("cache_evictions_total", "counter", "Clean blocks evicted.", &one(c.evictions));
    family(
        "cache_readahead_blocks_total",
        "counter",
        "Blocks brought in by read-ahead.",
        &one(c.readahead_blocks),
    );
    let io = &s.io;
    family("writes_total", "counter", "Write requests completed or in flight.", &one(io.writes));
    family("flushes_total", "counter", "Flush requests.", &one(io.flushes));
    family("reads_total", "counter", "Read requests.", &one(io.reads));
    family("proposals_total", "counter", "Proposals handed to the leader.", &one(io.proposals));
    family(
        "resubmissions_total",
        "counter",
        "Writes proposed again after a lost proposal.",
        &one(io.resubmissions),
    );
    family(
        "corrupt_blocks_total",
        "counter",
        "Blocks that failed their checksum on the replica read.",
        &one(io.corrupt_blocks),
    );
    family(
        "repaired_blocks_total",
        "counter",
        "Damaged blocks rewritten from another replica.",
        &one(io.repaired_blocks),
    );
    family(
        "unconfirmed_bytes",
        "gauge",
        "Bytes written and not yet committed.",
        &one(s.pipeline.unconfirmed_bytes as u64),
    );
    family("leader", "gauge", "The leading replica's id, 0 if none.", &one(s.leader.unwrap_or(0)));
    let per_replica = |f: &dyn Fn(&super::status::ReplicaStatus) -> Option<u64>| {
        s.replicas
            .iter()
            .filter_map(|r| f(r).map(|v| (format!("{dev},replica=\"{}\"", r.id), v as f64)))
            .collect::<Vec<_>>()
    };
    family("replica_term", "gauge", "Raft term.", &per_replica(&|r| Some(r.term)));
    family(
        "replica_last_log_index",
        "gauge",
        "Last log index.",
        &per_replica(&|r| r.last_log_index),
    );
    family("replica_applied_index", "gauge", "Last applied index.", &per_replica(&|r| r.applied));
    family(
        "replica_matched_index",
        "gauge",
        "Index the leader knows the replica holds.",
        &per_replica(&|r| r.matched),
    );
    out
}

/// Answers `GET /metrics` on `listener` with `status()` rendered, until the task is dropped.
pub async fn serve(listener: TcpListener, status: Arc<dyn Fn() -> DeviceStatus + Send + Sync>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &*status).await {
                tracing::debug!(%peer, error = %e, "metrics request");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    status: &(dyn Fn() -> DeviceStatus + Send + Sync),
) -> std::io::Result<()> {
    let head = tokio::time::timeout(READ_LIMIT, read_head(&mut stream)).await;
    let (code, body) = match head {
        Err(_) => (408, "request head not received within 5 s\n".to_string()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => (431, "request head larger than 8 KiB\n".to_string()),
        Ok(Ok(Some(head))) => route(&head, status),
    };
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        _ => "Request Header Fields Too Large",
    };
    let content_type =
        if code == 200 { "text/plain; version=0.0.4; charset=utf-8" } else { "text/plain" };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line ending the request head; None if it exceeds `MAX_HEAD`.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
    }
    Ok(Some(head))
}

/// The status code and body for a request head.
fn route(head: &[u8], status: &dyn Fn() -> DeviceStatus) -> (u16, String) {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (400, "malformed request line\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return (400, format!("unsupported protocol {version:?}\n"));
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => (200, render(&status())),
        ("GET", _) => (404, "only /metrics is served\n".into()),
        _ => (405, format!("{method} is not supported; use GET /metrics\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheStats;
    use crate::daemon::status::ReplicaStatus;
    use crate::device::{CacheMode, DeviceStats, PipelineStats};

    fn status() -> DeviceStatus {
        DeviceStatus {
            id: 3,
            path: "/dev/ublkb3".into(),
            state: "live".into(),
            daemon_pid: 1,
            dir: "/d".into(),
            mode: CacheMode::Writeback,
            size_bytes: 1 << 30,
            block_bytes: 4096,
            queues: 1,
            depth: 64,
            recovered: false,
            uptime_secs: 1.0,
            leader: Some(2),
            replicas: vec![ReplicaStatus {
                id: 2,
                role: "Leader".into(),
                term: 5,
                last_log_index: Some(40),
                committed: Some(40),
                applied: Some(39),
                snapshot: None,
                purged: None,
                matched: None,
            }],
            io: DeviceStats { reads: 7, repaired_blocks: 1, ..DeviceStats::default() },
            pipeline: PipelineStats::default(),
            cache: CacheStats { hits: 11, misses: 4, pinned_bytes: 8192, ..CacheStats::default() },
        }
    }

    #[test]
    fn renders_cache_io_and_replica_figures() {
        let text = render(&status());
        for line in [
            "xdevice_cache_hits_total{device=\"ublkb3\"} 11",
            "xdevice_cache_misses_total{device=\"ublkb3\"} 4",
            "xdevice_cache_pinned_bytes{device=\"ublkb3\"} 8192",
            "xdevice_cache_evictions_total{device=\"ublkb3\"} 0",
            "xdevice_reads_total{device=\"ublkb3\"} 7",
            "xdevice_repaired_blocks_total{device=\"ublkb3\"} 1",
            "xdevice_leader{device=\"ublkb3\"} 2",
            "xdevice_replica_applied_index{device=\"ublkb3\",replica=\"2\"} 39",
            "# TYPE xdevice_cache_hits_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("replica_matched_index{"), "no sample for an unknown value");
    }

    #[test]
    fn routes_requests() {
        let get = |head: &str| route(head.as_bytes(), &status).0;
        assert_eq!(get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), 200);
        assert_eq!(get("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), 200);
        assert_eq!(get("GET / HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(get("POST /metrics HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(get("GET /metrics\r\n\r\n"), 400);
        assert_eq!(get("GET /metrics SPDY/3\r\n\r\n"), 400);
        assert_eq!(get("\u{0}\u{ff}garbage"), 400);
        assert_eq!(get(""), 400);
    }

    #[tokio::test]
    async fn answers_over_tcp_and_refuses_an_endless_head() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, Arc::new(status)));
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.expect("write");
        let mut reply = String::new();
        c.read_to_string(&mut reply).await.expect("read");
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("xdevice_cache_hits_total{device=\"ublkb3\"} 11"));
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(&[b'a'; 9000]).await.expect("write");
        let mut reply = String::new();
        c.read_to_string(&mut reply).await.expect("read");
        assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
        server.abort();
    }
}
