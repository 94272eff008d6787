//! Every server log line carries the context of its own session only
//! (issue 20, finding 12): spans of one session appeared on the lines of
//! another session's work when a session's span stayed entered on a runtime
//! thread while its task was parked.
//!
//! Its own test binary: it installs the process's global log subscriber,
//! which captures every line the in-process server writes.

use gpupool_client::Session;
use gpupool_server::Isolation;
use gpupool_tests::{TestServer, fresh_seed, round_trip, server_config};
use std::io::Write;
use std::sync::{Arc, Mutex};

/// Log output collected in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[test]
fn each_log_line_names_only_its_own_session() {
    let logs = Captured::default();
    tracing_subscriber::fmt().with_writer(logs.clone()).with_ansi(false).with_max_level(tracing::Level::DEBUG).init();
    // In-process: every session's tasks share the server's two runtime
    // threads, where the leak showed.
    let mut config = server_config();
    config.isolation = Isolation::InProcess;
    let server = TestServer::start(config).expect("server");
    let sessions = 8;
    let seed = fresh_seed();
    for round in 0..2u64 {
        std::thread::scope(|s| {
            for i in 0..sessions as u64 {
                let config = server.client_config();
                s.spawn(move || {
                    let session = Session::connect(&config).expect("session");
                    for j in 0..4u64 {
                        round_trip(&session, 64 << 10, seed ^ (round << 16) ^ (i << 8) ^ j);
                    }
                    session.close().expect("close");
                });
            }
        });
    }
    server.stop();

    let text = logs.text();
    let opened = text.lines().filter(|l| l.contains("session opened")).count();
    assert_eq!(opened, 2 * sessions, "every session's opening is logged:\n{text}");
    // A line inside one session's span names `session{...}` once; a line
    // with two carries another session's context too.
    let mixed: Vec<&str> = text.lines().filter(|l| l.matches("session{").count() > 1).collect();
    assert!(
        mixed.is_empty(),
        "{} log lines carry two sessions' context, e.g.:\n{}",
        mixed.len(),
        mixed[..mixed.len().min(5)].join("\n")
    );
    // The lines of session work do carry their own session's context.
    let with_context = text.lines().filter(|l| l.contains("session{id=")).count();
    assert!(with_context >= 2 * sessions, "session lines carry their context:\n{text}");
}
