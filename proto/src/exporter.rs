//! The Prometheus scrape endpoint gpupool-server and gpupool-balancer
//! share (issue 20): `GET /metrics` over plain HTTP/1.1 on a TCP listener of
//! its own, answered with what `render` returns at that moment (each
//! service encodes its counters with `prometheus-client`).
//!
//! One scrape is served at a time, its request read under a timeout and a
//! size bound: a scraper is one Prometheus, not the public.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// Time a scraper has to send its request and read the answer.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves scrapes on `listener` until `shutdown` completes; each answers
/// `render()`.
pub async fn serve(listener: TcpListener, render: impl Fn() -> String, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        // A failed or slow scrape only ends that scrape.
        let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(stream, &render)).await;
    }
}

async fn answer(mut stream: TcpStream, render: &impl Fn() -> String) -> std::io::Result<()> {
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
        ("200 OK", render())
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

/// `GET path` against `addr`; the whole answer (tests of both services).
pub async fn get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Each scrape renders anew; other paths and oversized heads get no body.
    #[tokio::test]
    async fn scrapes_render_at_each_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let n = Arc::new(AtomicU64::new(0));
        let seen = n.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, move || format!("x {}\n", seen.load(Ordering::Relaxed)), async {
            let _ = stopped.await;
        }));
        let first = get(addr, "/metrics").await.expect("scrape");
        assert!(first.starts_with("HTTP/1.1 200 OK") && first.ends_with("x 0\n"), "{first}");
        n.store(7, Ordering::Relaxed);
        assert!(get(addr, "/metrics").await.expect("scrape").ends_with("x 7\n"));
        assert!(get(addr, "/").await.expect("get").starts_with("HTTP/1.1 404"));
        let mut big = TcpStream::connect(addr).await.expect("connect");
        let _ = big.write_all(&vec![b'a'; MAX_REQUEST + 10]).await;
        let mut out = Vec::new();
        let _ = big.read_to_end(&mut out).await;
        assert!(out.is_empty(), "an oversized request head gets no answer");
        stop.send(()).expect("stop");
        task.await.expect("ends at shutdown");
    }
}
