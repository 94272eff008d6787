//! End to end over real QUIC on 127.0.0.1: a real server (`run` on port 0)
//! and real client sessions. The device is the emulated one unless
//! `GPUPOOL_TEST_DEVICE=cuda`.

use gpupool_client::{ClientConfig, ClientError, DeviceBuffer, KernelArg, LaunchConfig, Session, StreamId};
use gpupool_proto::{BUILTIN_MODULE, cuda, v1, v1::call::Op};
use gpupool_server::MetricsSnapshot;
use gpupool_tests::{TestServer, fresh_seed, random_bytes, random_f32, rel_error, server_config};
use std::time::{Duration, Instant};

fn start() -> TestServer {
    TestServer::start(server_config()).expect("server starts")
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u32 {
    r.expect_err("call must fail").code()
}

#[test]
fn memory_round_trips_byte_for_byte() {
    let srv = start();
    let s = Session::connect(&srv.client_config()).expect("session");
    let inline = u64::from(s.welcome().max_inline_bytes);
    let sizes = [1usize, 7, 255, 256, 4096, 65_537, inline as usize, inline as usize + 1, (9 << 20) + 13, 33 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let data = random_bytes(n, fresh_seed() + i as u64);
        let dev = s.mem_alloc(n as u64).expect("alloc");
        s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod");
        let mut back = vec![0xa5u8; n];
        s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh");
        assert!(back == data, "round trip of {n} bytes differs");
        // Device to device, then memset of part of it.
        let dev2 = s.mem_alloc(n as u64).expect("alloc");
        s.memcpy_dtod(dev2, dev, n as u64, StreamId::DEFAULT).expect("dtod");
        let half = n as u64 / 2;
        s.memset(dev2, 0x3c, 1, half, StreamId::DEFAULT).expect("memset");
        s.memcpy_dtoh(&mut back, dev2, StreamId::DEFAULT).expect("dtoh");
        assert!(back[..half as usize].iter().all(|&b| b == 0x3c));
        assert!(back[half as usize..] == data[half as usize..], "dtod of {n} bytes differs");
        s.mem_free(dev).expect("free");
        s.mem_free(dev2).expect("free");
    }
    // 16- and 32-bit memsets.
    let dev = s.mem_alloc(64).expect("alloc");
    s.memset(dev, 0xbeef, 2, 8, StreamId::DEFAULT).expect("memset16");
    s.memset(dev + 16, 0xdead_beef, 4, 4, StreamId::DEFAULT).expect("memset32");
    let mut back = [0u8; 32];
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh");
    assert_eq!(&back[..4], &[0xef, 0xbe, 0xef, 0xbe]);
    assert_eq!(&back[16..20], &0xdead_beefu32.to_le_bytes());
    assert_eq!(s.mem_get_info().1, s.welcome().memory_quota);
    // Over bulk streams (QUIC), or through shared memory (GPUPOOL_TEST_TRANSPORT=shm).
    let shared = s.shared_memory_bytes().unwrap_or(0);
    assert!(srv.metrics.snapshot().bulk_bytes_in > 0 || shared > 0, "large copies went over the bulk path");
}

#[test]
fn builtin_kernels_match_a_cpu_reference() {
    let srv = start();
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("builtin module");
    let seed = fresh_seed();

    let n = 100_003;
    let (a, b) = (random_f32(n, seed), random_f32(n, seed + 1));
    let (da, db) = (DeviceBuffer::from_slice(&s, &a).expect("a"), DeviceBuffer::from_slice(&s, &b).expect("b"));
    let dc = DeviceBuffer::<f32>::from_slice(&s, &vec![f32::NAN; n]).expect("c");
    let add = m.function("vector_add").expect("vector_add");
    let cfg = LaunchConfig::for_elements(n as u32, 256);
    s.launch(&add, cfg, StreamId::DEFAULT, &[da.arg(), db.arg(), dc.arg(), KernelArg::U32(n as u32)]).expect("launch");
    let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| f64::from(*x) + f64::from(*y)).collect();
    assert!(rel_error(&dc.to_vec().expect("c"), &want) < 1e-6);

    let saxpy = m.function("saxpy").expect("saxpy");
    let alpha = 1.75f32;
    s.launch(&saxpy, cfg, StreamId::DEFAULT, &[KernelArg::F32(alpha), da.arg(), db.arg(), KernelArg::U32(n as u32)])
        .expect("launch");
    let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| f64::from(alpha) * f64::from(*x) + f64::from(*y)).collect();
    assert!(rel_error(&db.to_vec().expect("y"), &want) < 1e-6);

    let (mm, nn, kk) = (67usize, 45usize, 123usize);
    let (ha, hb) = (random_f32(mm * kk, seed + 2), random_f32(kk * nn, seed + 3));
    let (ga, gb) = (DeviceBuffer::from_slice(&s, &ha).expect("A"), DeviceBuffer::from_slice(&s, &hb).expect("B"));
    let gc = DeviceBuffer::<f32>::from_slice(&s, &vec![f32::NAN; mm * nn]).expect("C");
    let matmul = m.function("matmul_f32").expect("matmul");
    let cfg = LaunchConfig {
        grid: ((nn as u32).div_ceil(16), (mm as u32).div_ceil(16), 1),
        block: (16, 16, 1),
        shared_mem_bytes: 0,
    };
    let args =
        [ga.arg(), gb.arg(), gc.arg(), KernelArg::U32(mm as u32), KernelArg::U32(nn as u32), KernelArg::U32(kk as u32)];
    s.launch(&matmul, cfg, StreamId::DEFAULT, &args).expect("launch");
    let mut want = vec![0f64; mm * nn];
    for r in 0..mm {
        for c in 0..nn {
            want[r * nn + c] = (0..kk).map(|i| f64::from(ha[r * kk + i]) * f64::from(hb[i * nn + c])).sum();
        }
    }
    assert!(rel_error(&gc.to_vec().expect("C"), &want) < 1e-5);

    // Wrong argument count or size is caught before anything is sent.
    assert_eq!(code(s.launch(&add, cfg, StreamId::DEFAULT, &[da.arg()])), cuda::INVALID_VALUE);
    assert_eq!(
        code(s.launch(&add, cfg, StreamId::DEFAULT, &[da.arg(), db.arg(), dc.arg(), KernelArg::U64(1)])),
        cuda::INVALID_VALUE
    );
}

/// A session with `config` that has queued 10 000 empty launches, and the
/// server's counters from before the launches.
fn ten_thousand_launches(srv: &TestServer, config: &ClientConfig) -> (Session, MetricsSnapshot) {
    let s = Session::connect(config).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let empty = m.function("empty").expect("empty");
    let cfg = LaunchConfig::for_elements(1, 1);
    // A function's first launch asks the server for its attributes first
    // (the server describes functions at first use): one launch and a sync
    // before the count.
    s.launch(&empty, cfg, StreamId::DEFAULT, &[]).expect("first launch");
    s.synchronize().expect("sync");
    let before = srv.metrics.snapshot();
    for _ in 0..10_000 {
        s.launch(&empty, cfg, StreamId::DEFAULT, &[]).expect("launch");
    }
    (s, before)
}

#[test]
fn ten_thousand_launches_cost_one_flush_without_a_delay_bound() {
    let srv = start();
    let mut config = srv.client_config();
    config.batch.max_delay = None;
    let (s, before) = ten_thousand_launches(&srv, &config);
    assert_eq!(srv.metrics.snapshot().batches, before.batches, "launches must not travel before the sync");
    s.synchronize().expect("sync");
    let after = srv.metrics.snapshot();
    assert_eq!(after.batches - before.batches, 1, "10 000 launches + sync = one batch");
    assert_eq!(after.calls - before.calls, 10_001);
}

/// With the default delay bound, queued work reaches the server while the
/// program is still issuing it (the GPU starts at once), in batches of many
/// calls, not one frame per call.
#[test]
fn queued_launches_travel_in_batches_before_the_sync() {
    let srv = start();
    // Also with the I/O thread kept awake between sends.
    let mut awake = srv.client_config();
    awake.io_spin = Duration::from_micros(200);
    for config in [srv.client_config(), awake] {
        let (s, before) = ten_thousand_launches(&srv, &config);
        s.synchronize().expect("sync");
        let after = srv.metrics.snapshot();
        assert_eq!(after.calls - before.calls, 10_001);
        let batches = after.batches - before.batches;
        assert!(batches >= 2, "the first launch goes before the sync ({batches} batches)");
        assert!(batches <= 5_000, "{batches} batches for 10 001 calls: calls must share batches");
    }
}

#[test]
fn queued_errors_are_latched_until_the_next_sync() {
    let srv = start();
    let s = Session::connect(&srv.client_config()).expect("session");
    let dev = s.mem_alloc(1024).expect("alloc");
    // The client API checks bounds itself; a raw call past the mapping is
    // queued and refused by the server.
    assert_eq!(
        s.memset(dev + (4 << 20), 0, 1, 16, StreamId::DEFAULT).expect_err("local check").code(),
        cuda::INVALID_VALUE
    );
    let past = v1::Memset { dst: dev + (4 << 20), value: 0, element_size: 1, count: 16, stream: 0 };
    s.raw_enqueue(Op::Memset(past)).expect("queued");
    s.raw_enqueue(Op::StreamSynchronize(v1::StreamSynchronize { stream: 77 })).expect("queued");
    let err = s.synchronize().expect_err("latched error");
    assert_eq!(err.code(), cuda::INVALID_VALUE, "first error is returned: {err}");
    // Reported once; the session goes on.
    s.synchronize().expect("clean after the latched error was returned");
    let mut back = [1u8; 4];
    s.memset(dev, 9, 1, 4, StreamId::DEFAULT).expect("memset");
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh");
    assert_eq!(back, [9; 4]);
}

#[test]
fn streams_and_events() {
    let srv = start();
    let s = Session::connect(&srv.client_config()).expect("session");
    let (s1, s2) = (s.stream_create(1, 0).expect("s1"), s.stream_create(1, -1).expect("s2"));
    let (e1, e2) = (s.event_create(0).expect("e1"), s.event_create(0).expect("e2"));
    let data = random_bytes(1 << 20, fresh_seed());
    let (a, b) = (s.mem_alloc(1 << 20).expect("a"), s.mem_alloc(1 << 20).expect("b"));
    s.event_record(e1, s1).expect("record");
    s.memcpy_htod(a, &data, s1).expect("htod");
    s.event_record(e2, s1).expect("record");
    s.stream_wait_event(s2, e2).expect("wait");
    s.memcpy_dtod(b, a, 1 << 20, s2).expect("dtod");
    s.stream_synchronize(s2).expect("sync s2");
    assert!(s.stream_query(s1).expect("query"));
    s.event_synchronize(e2).expect("event sync");
    assert!(s.event_query(e2).expect("event query"));
    let ms = s.event_elapsed(e1, e2).expect("elapsed");
    assert!(ms >= 0.0 && ms.is_finite());
    let mut back = vec![0u8; 1 << 20];
    s.memcpy_dtoh(&mut back, b, s2).expect("dtoh");
    assert!(back == data);
    s.event_destroy(e1).expect("destroy");
    s.stream_destroy(s1).expect("destroy");
    assert_eq!(code(s.event_query(e1)), cuda::INVALID_HANDLE);
    assert_eq!(code(s.stream_synchronize(s1)), cuda::INVALID_HANDLE);
}

#[test]
fn concurrent_clients() {
    let srv = start();
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let cfg = srv.client_config();
            std::thread::spawn(move || {
                let s = Session::connect(&cfg).expect("session");
                let m = s.module_load(BUILTIN_MODULE).expect("module");
                let add = m.function("vector_add").expect("fn");
                for round in 0..5u64 {
                    let n = 10_000 + t * 17;
                    let seed = fresh_seed() ^ (t as u64 * 1000 + round);
                    let (a, b) = (random_f32(n, seed), random_f32(n, seed + 7));
                    let da = DeviceBuffer::from_slice(&s, &a).expect("a");
                    let db = DeviceBuffer::from_slice(&s, &b).expect("b");
                    let dc = DeviceBuffer::<f32>::new(&s, n).expect("c");
                    let cfg = LaunchConfig::for_elements(n as u32, 128);
                    s.launch(&add, cfg, StreamId::DEFAULT, &[da.arg(), db.arg(), dc.arg(), KernelArg::U32(n as u32)])
                        .expect("launch");
                    let c = dc.to_vec().expect("c");
                    assert!(c.iter().zip(a.iter().zip(&b)).all(|(c, (a, b))| *c == a + b), "client {t} wrong");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(srv.metrics.snapshot().sessions_opened, 6);
}

#[test]
fn server_shutdown_mid_session_is_a_clear_error() {
    let srv = start();
    let cfg = srv.client_config();
    let s = Session::connect(&cfg).expect("session");
    let dev = s.mem_alloc(4096).expect("alloc");
    s.synchronize().expect("sync");
    srv.stop();
    let t = Instant::now();
    let err = s.memcpy_dtoh(&mut [0u8; 16], dev, StreamId::DEFAULT).expect_err("server is gone");
    assert!(matches!(err, ClientError::ConnectionLost(_)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    // Every later call fails the same way instead of hanging.
    assert!(matches!(s.synchronize(), Err(ClientError::ConnectionLost(_))));
    assert_eq!(err.code(), cuda::DEVICE_UNAVAILABLE);
    // A new server takes new sessions.
    let srv2 = start();
    let s2 = Session::connect(&srv2.client_config()).expect("new session");
    s2.synchronize().expect("sync");
}

#[test]
fn session_limit_refuses_with_busy() {
    let mut cfg = server_config();
    cfg.max_sessions = 1;
    let srv = TestServer::start(cfg).expect("server");
    let _first = Session::connect(&srv.client_config()).expect("first");
    match Session::connect(&srv.client_config()) {
        Err(ClientError::Refused { code, reason }) => {
            assert_eq!(code, gpupool_proto::close_code::BUSY);
            assert!(reason.contains("limit"), "{reason}");
        }
        other => panic!("expected BUSY, got {other:?}"),
    }
}

/// Module images larger than a batch (cuBLAS ships fatbins of several MiB)
/// travel over bulk streams; the load is answered like any other. On the
/// emulated device an image it cannot run loads with no functions; a real
/// driver refuses random bytes with its own error, after the upload.
#[test]
fn large_module_images_are_staged() {
    let srv = start();
    let s = Session::connect(&srv.client_config()).expect("session");
    let mut image = random_bytes(3 << 20, fresh_seed());
    image[0] = b'/'; // not a fatbin, cubin or builtin module
    if std::env::var("GPUPOOL_TEST_DEVICE").as_deref() == Ok("cuda") {
        let err = s.module_load(&image).expect_err("random bytes are no image");
        assert!(matches!(err, ClientError::Cuda { .. }), "{err}");
        s.synchronize().expect("the session goes on");
        return;
    }
    let m = s.module_load(&image).expect("large image loads");
    assert!(m.functions.is_empty());
    assert_eq!(code(m.function("kernel")), cuda::NOT_FOUND);
    // The image is cached now: a second load sends only its hash.
    let again = s.module_load(&image).expect("cached image loads");
    assert_ne!(again.id, m.id);
    // Above the inline bound but compressible below it: inline, packed.
    let mut sparse = vec![0u8; 3 << 19];
    sparse[0] = b'/';
    sparse[1000..1016].copy_from_slice(&fresh_seed().to_le_bytes().repeat(2));
    let packed = s.module_load(&sparse).expect("a compressible image loads");
    assert!(packed.functions.is_empty());
    s.synchronize().expect("sync");
}

/// A sticky error (a kernel's illegal address) loses the context: as with
/// a local GPU, every later call of the session fails with it, allocations
/// included, and after the program resets the context the device stays
/// unavailable (CUDA documents the process as unusable until it restarts).
#[test]
fn a_sticky_error_fails_every_later_call() {
    let srv = start();
    let s = Session::connect(&srv.client_config()).expect("session");
    let gone = s.mem_alloc(1 << 20).expect("alloc");
    s.mem_free(gone).expect("free");
    let add = s.module_load(BUILTIN_MODULE).expect("module").function("vector_add").expect("fn");
    let args = [KernelArg::Ptr(gone), KernelArg::Ptr(gone), KernelArg::Ptr(gone), KernelArg::U32(4)];
    s.launch(&add, LaunchConfig::for_elements(4, 32), StreamId::DEFAULT, &args).expect("queued");
    assert_eq!(code(s.synchronize()), cuda::ILLEGAL_ADDRESS);
    assert!(s.context_lost());
    assert_eq!(code(s.mem_alloc(4096)), cuda::ILLEGAL_ADDRESS, "an allocation after the fault");
    assert_eq!(code(s.synchronize()), cuda::ILLEGAL_ADDRESS, "sticky");
    assert!(s.reset_lost_context());
    assert_eq!(code(s.mem_alloc(4096)), cuda::DEVICE_UNAVAILABLE, "after the reset");
    drop(s);

    // Other sessions are untouched.
    let t = Session::connect(&srv.client_config()).expect("another session");
    assert!(!t.context_lost() && !t.reset_lost_context());
    let buf = t.mem_alloc(4096).expect("alloc");
    t.memcpy_htod(buf, &[7u8; 4096], StreamId::DEFAULT).expect("copy");
    t.synchronize().expect("works");
    srv.stop();
}
