//! The server's [`Metrics`] as a Prometheus endpoint (issue 20): `GET
//! /metrics` over plain HTTP/1.1 on its own TCP listener, off unless
//! `--metrics-listen` names an address. The counters are read at each
//! scrape (`prometheus-client` encodes them), so counting costs the
//! connection tasks and session threads nothing more than their atomics.
//!
//! One scrape is served at a time, its request read under a timeout and a
//! size bound: a scraper is one Prometheus, not the public.

use super::Metrics;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// Time a scraper has to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The metrics in Prometheus' text format.
pub fn render(metrics: &Metrics) -> String {
    let s = metrics.snapshot();
    let mut r = Registry::with_prefix("gpupool_server");
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| r.register(name, help, ConstCounter::new(v));
    let gauge = |r: &mut Registry, name: &str, help: &str, v: u64| {
        r.register(name, help, ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)))
    };
    counter(&mut r, "sessions_opened", "Sessions opened", s.sessions_opened);
    counter(&mut r, "sessions_refused", "Connections refused at the handshake", s.sessions_refused);
    gauge(&mut r, "sessions_active", "Sessions open now", s.sessions_active);
    counter(&mut r, "batches", "Batches received", s.batches);
    counter(&mut r, "calls", "Calls executed", s.calls);
    counter(&mut r, "call_errors", "Calls that failed", s.call_errors);
    counter(&mut r, "frames_rejected", "Frames that could not be decoded", s.frames_rejected);
    counter(&mut r, "bulk_received_bytes", "Bytes received over bulk streams", s.bulk_bytes_in);
    counter(&mut r, "bulk_sent_bytes", "Bytes sent over bulk streams", s.bulk_bytes_out);
    gauge(&mut r, "memory_mapped_bytes", "Device memory mapped by sessions now", s.memory_mapped);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Serves scrapes on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener");
                    continue;
                }
            },
        };
        match tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &metrics)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "metrics scrape"),
            Err(_) => tracing::debug!("metrics scrape timed out"),
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET /metrics?") {
        ("200 OK", render(metrics))
    } else {
        ("404 Not Found", "not found; scrape /metrics\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    /// A scrape over TCP shows the counters as they are at that moment.
    #[tokio::test]
    async fn scrapes_follow_the_counters() {
        let metrics = Arc::new(Metrics::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, metrics.clone(), async {
            let _ = stopped.await;
        }));
        let first = get(addr, "/metrics").await;
        assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
        assert!(first.contains("gpupool_server_calls_total 0\n"), "{first}");
        metrics.calls.fetch_add(3, Ordering::Relaxed);
        metrics.memory_mapped.fetch_add(2 << 20, Ordering::Relaxed);
        let second = get(addr, "/metrics").await;
        assert!(second.contains("gpupool_server_calls_total 3\n"), "{second}");
        assert!(second.contains("gpupool_server_memory_mapped_bytes 2097152\n"), "{second}");
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
        stop.send(()).expect("stop");
        task.await.expect("ends at shutdown");
    }
}
