//! Device printf through process isolation: the worker captures what the
//! driver (here the emulated device, which buffers the built-in `print_ids`
//! output like the driver's printf FIFO) writes to its stdout and hands it
//! back with the replies; the client holds it until a synchronizing call
//! returns. A flood of output must neither block the worker nor corrupt its
//! protocol with the supervisor (its stdout).
//!
//! Runs on the emulated device; on the GPU (`GPUPOOL_TEST_DEVICE=cuda`) the
//! blocks of one launch print in no fixed order, so only the first test's
//! single-block launches are compared exactly.

use gpupool_client::{KernelArg, LaunchConfig, Session, StreamId};
use gpupool_proto::BUILTIN_MODULE;
use gpupool_server::device::builtin::check_below_message;
use gpupool_tests::{TestServer, isolated_config};

fn lines(tag: u32, blocks: u32, threads: u32) -> String {
    let mut s = String::new();
    for b in 0..blocks {
        for t in 0..threads {
            s += &format!("gpupool printf {tag}: block {b} thread {t}\n");
        }
    }
    s
}

fn text(bytes: Vec<u8>) -> String {
    let s = String::from_utf8(bytes).expect("printf output is text");
    if gpupool_tests::test_device() == (gpupool_server::DeviceChoice::Emulated { memory: 8 << 30 }) {
        return s;
    }
    // A GPU orders the threads of one launch as it pleases: compare sorted.
    let mut lines: Vec<&str> = s.lines().collect();
    lines.sort_unstable();
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// The expected text, in the form [`text`] gives.
fn want(s: String) -> String {
    text(s.into_bytes())
}

fn print(s: &Session, f: &gpupool_client::Function, tag: u32, grid: u32, block: u32, stream: StreamId) {
    let cfg = LaunchConfig { grid: (grid, 1, 1), block: (block, 1, 1), shared_mem_bytes: 0 };
    s.launch(f, cfg, stream, &[KernelArg::U32(tag)]).expect("launch print_ids");
}

#[test]
fn printf_arrives_at_each_synchronization_in_order() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let f = m.function("print_ids").expect("print_ids");

    // Nothing before the synchronization, everything after, in order.
    print(&s, &f, 1, 1, 4, StreamId::DEFAULT);
    print(&s, &f, 2, 1, 2, StreamId::DEFAULT);
    s.flush().expect("flush");
    assert!(s.take_device_output().is_empty(), "no output before a synchronization");
    s.synchronize().expect("sync");
    assert_eq!(text(s.take_device_output()), want(lines(1, 1, 4) + &lines(2, 1, 2)));

    // Stream synchronize, event synchronize, a copy to the host.
    let stream = s.stream_create(0, 0).expect("stream");
    print(&s, &f, 3, 1, 3, stream);
    s.stream_synchronize(stream).expect("stream sync");
    assert_eq!(text(s.take_device_output()), want(lines(3, 1, 3)));
    let e = s.event_create(0).expect("event");
    print(&s, &f, 4, 1, 1, stream);
    s.event_record(e, stream).expect("record");
    s.event_synchronize(e).expect("event sync");
    assert_eq!(text(s.take_device_output()), want(lines(4, 1, 1)));
    let dev = s.mem_alloc(64).expect("alloc");
    print(&s, &f, 5, 1, 2, StreamId::DEFAULT);
    let mut back = [0u8; 64];
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh");
    assert_eq!(text(s.take_device_output()), want(lines(5, 1, 2)));
}

#[test]
fn a_flood_of_printf_neither_blocks_nor_corrupts_the_worker() {
    if gpupool_tests::test_device() != (gpupool_server::DeviceChoice::Emulated { memory: 8 << 30 }) {
        return; // The flood's exact shape is the emulated device's.
    }
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let f = m.function("print_ids").expect("print_ids");
    // A 64 MiB printf FIFO lets one launch print ~16 MiB, twice the
    // worker's buffer (8 MiB): the rest is dropped with a marker.
    assert_eq!(s.ctx_set_limit(1, 64 << 20).expect("set PRINTF_FIFO_SIZE"), 64 << 20);
    assert_eq!(s.ctx_get_limit(1), Some(64 << 20));
    print(&s, &f, 7, 400, 1024, StreamId::DEFAULT);
    s.synchronize().expect("sync after the flood");
    let mut out = s.take_device_output();
    // The rest comes with the next replies (bounded per reply).
    for _ in 0..8 {
        s.synchronize().expect("sync");
        out.extend(s.take_device_output());
    }
    let out = text(out);
    let marker = out.find("[gpupool] ").expect("a marker says output was dropped");
    assert!(out[marker..].contains("bytes of device printf output dropped"), "{}", &out[marker..marker + 200]);
    let kept = &out[..marker];
    assert!(kept.len() >= 7 << 20, "most of the buffer arrived: {} bytes", kept.len());
    // Whole lines up to the cut (the marker starts on a line of its own).
    let cut = kept.strip_suffix('\n').unwrap_or(kept);
    let whole = &cut[..cut.rfind('\n').map_or(0, |i| i + 1)];
    assert!(lines(7, 400, 1024).starts_with(whole), "kept output is in order");
    assert_eq!(out.matches("[gpupool] ").count(), 1, "one marker for one gap");

    // The worker and its protocol are intact: more work, more output.
    print(&s, &f, 8, 1, 2, StreamId::DEFAULT);
    s.synchronize().expect("sync");
    assert_eq!(text(s.take_device_output()), want(lines(8, 1, 2)));
    // Its counter reports (frames on its stdout) still reach the supervisor.
    let sent = s.batches_sent();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while srv.metrics.snapshot().batches < sent {
        assert!(std::time::Instant::now() < deadline, "the worker's reports still reach the supervisor");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A failed device assert through process isolation: the driver writes its
/// message to the worker's stderr (the emulated device, for the built-in
/// `check_below`, the message the driver prints for it); the worker
/// captures it apart from its own logs and the client gets it, as device
/// stderr output, with the synchronizing call that fails with
/// CUDA_ERROR_ASSERT. The context is lost afterwards, as natively.
#[test]
fn a_device_assert_reaches_the_client_as_stderr_output() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let f = m.function("check_below").expect("check_below");
    // Nothing asserts: no output, no error.
    let cfg = LaunchConfig { grid: (2, 1, 1), block: (4, 1, 1), shared_mem_bytes: 0 };
    s.launch(&f, cfg, StreamId::DEFAULT, &[KernelArg::U32(8)]).expect("launch");
    s.synchronize().expect("no thread asserts");
    assert!(s.take_device_errors().is_empty());

    // Threads 6 and 7 (block 1, threads 2 and 3) assert.
    s.launch(&f, cfg, StreamId::DEFAULT, &[KernelArg::U32(6)]).expect("the launch itself is queued");
    let err = s.synchronize().expect_err("the assert fails the synchronize");
    assert_eq!(err.code(), gpupool_proto::cuda::ASSERT, "{err}");
    let text = text(s.take_device_errors());
    let want = want((2..4).map(|t| check_below_message([1, 0, 0], [t, 0, 0])).collect());
    assert_eq!(text, want);
    assert!(s.take_device_output().is_empty(), "nothing on stdout");
    // The worker's own logs did not reach the client.
    assert!(!text.contains("gpupool_server"), "{text}");
    // The context is lost: later calls fail too.
    assert!(s.mem_alloc(64).is_err(), "a call after the assert fails");
}
