//! The `gpupool-server` binary as operators run it: with `--metrics-listen`
//! it serves its counters for Prometheus beside the QUIC endpoint (issue 20),
//! and ends both on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server when the test ends, passed or not.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` over plain HTTP/1.1; the whole response.
fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

#[test]
fn metrics_listen_serves_the_counters_over_http() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpupool-server"))
        .args(["--listen", "127.0.0.1:0", "--device", "emulated", "--isolation", "in-process"])
        .args(["--tokens", "cli-token", "--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the server starts");
    let (stdout, stderr) = (child.stdout.take().expect("stdout"), child.stderr.take().expect("stderr"));
    let mut served = Served(child);
    // The exporter's address is in the log (port 0 here); the log is read
    // to its end so that the server never blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("metrics at /metrics") {
                let addr = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next()).map(str::to_owned);
                let _ = tx.send(addr);
            }
        }
    });
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).expect("first line");
    assert!(first.starts_with("gpupool-server listening on 127.0.0.1:"), "{first}");
    let addr = rx.recv_timeout(Duration::from_secs(30)).expect("the exporter's address logged").expect("an address");
    let page = get(&addr, "/metrics");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for line in
        ["gpupool_server_sessions_active 0", "gpupool_server_sessions_opened_total 0", "gpupool_server_calls_total 0"]
    {
        assert!(page.lines().any(|l| l == line), "{line} missing:\n{page}");
    }
    assert!(get(&addr, "/other").starts_with("HTTP/1.1 404"));
    // SIGTERM: the server drains and exits, the exporter with it.
    let pid = served.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    let t = Instant::now();
    let status = loop {
        if let Some(status) = served.0.try_wait().expect("wait") {
            break status;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the server did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the exporter stopped with the server");
}
