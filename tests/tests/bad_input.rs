//! Bad input of every kind gets its documented error, and the server keeps
//! serving other clients afterwards.

use bytes::Bytes;
use gpupool_client::{ClientError, KernelArg, LaunchConfig, Session, StreamId, Trust};
use gpupool_proto::frame;
use gpupool_proto::v1::{self, call::Op};
use gpupool_proto::{BUILTIN_MODULE, PROTOCOL_VERSION, close_code, cuda};
use gpupool_tests::raw::Raw;
use gpupool_tests::{TOKEN, TestServer, isolated_config, server_config};
use prost::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn start() -> TestServer {
    TestServer::start(server_config()).expect("server starts")
}

/// A healthy client still gets correct results.
fn still_serves(srv: &TestServer) {
    let s = Session::connect(&srv.client_config()).expect("session after bad input");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let add = m.function("vector_add").expect("fn");
    let a = gpupool_client::DeviceBuffer::from_slice(&s, &[1f32, 2., 3.]).expect("a");
    let c = gpupool_client::DeviceBuffer::<f32>::new(&s, 3).expect("c");
    s.launch(
        &add,
        LaunchConfig::for_elements(3, 32),
        StreamId::DEFAULT,
        &[a.arg(), a.arg(), c.arg(), KernelArg::U32(3)],
    )
    .expect("launch");
    assert_eq!(c.to_vec().expect("c"), vec![2., 4., 6.]);
}

/// A queued call on memory the session does not own fails with
/// `INVALID_VALUE`: at once when the address lies in the client's own range
/// (it knows its allocations), else at the next synchronize (the server
/// checks its tables).
fn refused_now_or_at_sync(s: &Session, queued: Result<(), ClientError>) {
    let code = match queued {
        Err(e) => e.code(),
        Ok(()) => s.synchronize().expect_err("refused at the synchronize").code(),
    };
    assert_eq!(code, cuda::INVALID_VALUE);
}

fn call_code(r: Result<Option<v1::call_result::Value>, ClientError>) -> u32 {
    r.expect_err("must fail").code()
}

#[tokio::test]
async fn wrong_missing_token_and_version_mismatch_are_refused() {
    let srv = start();
    let (code, reason) = Raw::open(&srv, PROTOCOL_VERSION, "wrong").await.expect_err("refused");
    assert_eq!(code, close_code::UNAUTHORIZED, "{reason}");
    let (code, reason) = Raw::open(&srv, PROTOCOL_VERSION, "").await.expect_err("refused");
    assert_eq!((code, reason.as_str()), (close_code::UNAUTHORIZED, "no session token presented"));
    let (code, reason) = Raw::open(&srv, 99, TOKEN).await.expect_err("refused");
    assert_eq!(code, close_code::VERSION_MISMATCH);
    assert!(reason.contains("server speaks 1") && reason.contains("sent 99"), "{reason}");
    // Through the client API the refusal is a typed error.
    let mut cfg = srv.client_config();
    cfg.token = "nope".into();
    match Session::connect(&cfg) {
        Err(e @ ClientError::Refused { code: close_code::UNAUTHORIZED, .. }) => assert_eq!(e.code(), cuda::NO_DEVICE),
        other => panic!("expected UNAUTHORIZED, got {other:?}"),
    }
    // A pinned fingerprint that does not match never reaches the server's Hello.
    let mut cfg = srv.client_config();
    cfg.trust = Trust::Fingerprint("00".repeat(32));
    assert!(matches!(Session::connect(&cfg), Err(ClientError::Connect(_))));
    let m = srv.metrics.snapshot();
    assert_eq!((m.sessions_refused, m.sessions_opened), (4, 0));
    tokio::task::spawn_blocking(move || still_serves(&srv)).await.expect("healthy");
}

#[tokio::test]
async fn malformed_truncated_and_oversize_frames() {
    let srv = start();
    // A frame whose body is not a Batch: error reply, session goes on.
    let (mut raw, _) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("session");
    let mut garbage = 5u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff]);
    raw.send.write_all(&garbage).await.expect("send");
    let r = raw.reply().await;
    assert_eq!((r.seq, r.errors[0].code), (0, cuda::INVALID_VALUE));
    assert!(r.errors[0].message.contains("malformed frame"), "{}", r.errors[0].message);
    let ok =
        v1::Batch { seq: 1, calls: vec![v1::Call { op: Some(Op::ContextSynchronize(v1::ContextSynchronize {})) }] };
    raw.send.write_all(&frame::encode(&ok)).await.expect("send");
    let r = raw.reply().await;
    assert_eq!((r.seq, r.error_count), (1, 0));

    // A frame announcing more than the limit: error reply, then the
    // connection is closed because framing is lost.
    let (mut raw, welcome) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("session");
    raw.send.write_all(&(welcome.max_frame_bytes + 1).to_le_bytes()).await.expect("send");
    let r = raw.reply().await;
    assert!(r.errors[0].message.contains("exceeds the limit"), "{}", r.errors[0].message);
    let closed = raw.conn.closed().await;
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code.into_inner() as u32 == close_code::PROTOCOL_VIOLATION)
    );

    // A stream that ends inside a frame.
    let (mut raw, _) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("session");
    raw.send.write_all(&[100, 0, 0, 0, 1, 2, 3]).await.expect("send");
    raw.send.finish().expect("finish");
    let r = raw.reply().await;
    assert!(r.errors[0].message.contains("ended inside a frame"), "{}", r.errors[0].message);

    // A bulk stream with garbage and one naming an unknown transfer.
    let (raw, _) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("session");
    for req in [
        Bytes::from_static(&[3, 0, 0, 0, 0xff, 0xfe, 0xfd]),
        frame::encode(&v1::BulkRequest {
            op: Some(v1::bulk_request::Op::Get(v1::BulkGet { transfer_id: 42, offset: 0, size: 10 })),
        }),
    ] {
        let (mut s, mut r) = raw.conn.open_bi().await.expect("bulk");
        s.write_all(&req).await.expect("send");
        s.finish().expect("finish");
        let bytes = r.read_to_end(1 << 16).await.expect("response");
        let resp = v1::BulkResponse::decode(&bytes[4..]).expect("decodes");
        let err = resp.error.expect("error response");
        assert!(err.code == cuda::INVALID_VALUE || err.code == cuda::INVALID_HANDLE, "{err:?}");
    }
    assert!(srv.metrics.snapshot().frames_rejected >= 5);
    tokio::task::spawn_blocking(move || still_serves(&srv)).await.expect("healthy");
}

/// Runs with process isolation, the server's default: on a GPU only
/// separate contexts keep one tenant's kernels out of another's memory.
#[test]
fn unknown_ids_foreign_and_out_of_range_addresses_oversize_requests() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let a = Session::connect(&srv.client_config()).expect("a");
    let b = Session::connect(&srv.client_config()).expect("b");
    // Workers in separate processes may number their ranges alike: pad A so
    // that `secret` is an address B never maps.
    let g = a.welcome().granularity;
    let _pad = a.mem_alloc(3 * g).expect("padding");
    let secret = a.mem_alloc(4096).expect("alloc");
    a.memset(secret, 0x5a, 1, 4096, StreamId::DEFAULT).expect("memset");
    a.synchronize().expect("sync");

    // Unknown ids.
    let launch = v1::Launch {
        module: 999,
        function: 0,
        grid: Some(v1::Dim3 { x: 1, y: 1, z: 1 }),
        block: Some(v1::Dim3 { x: 1, y: 1, z: 1 }),
        ..Default::default()
    };
    assert_eq!(call_code(b.raw_call(Op::Launch(launch))), cuda::INVALID_HANDLE);
    let m = b.module_load(BUILTIN_MODULE).expect("module");
    let launch = v1::Launch { module: m.id, function: 77, ..Default::default() };
    assert_eq!(call_code(b.raw_call(Op::Launch(launch))), cuda::INVALID_HANDLE);
    assert_eq!(call_code(b.raw_call(Op::EventRecord(v1::EventRecord { event: 5, stream: 0 }))), cuda::INVALID_HANDLE);
    assert_eq!(call_code(b.raw_call(Op::StreamDestroy(v1::StreamDestroy { stream: 0 }))), cuda::INVALID_HANDLE);
    assert_eq!(call_code(b.raw_call(Op::ModuleUnload(v1::ModuleUnload { module: 31 }))), cuda::INVALID_HANDLE);

    // Another session's memory: refused, nothing read or written.
    let mut buf = [0u8; 16];
    assert_eq!(b.memcpy_dtoh(&mut buf, secret, StreamId::DEFAULT).expect_err("foreign").code(), cuda::INVALID_VALUE);
    assert_eq!(buf, [0; 16]);
    refused_now_or_at_sync(&b, b.memset(secret, 0, 1, 16, StreamId::DEFAULT));
    let mine = b.mem_alloc(64).expect("alloc");
    refused_now_or_at_sync(&b, b.memcpy_dtod(mine, secret, 16, StreamId::DEFAULT));
    let mut check = [0u8; 4096];
    a.memcpy_dtoh(&mut check, secret, StreamId::DEFAULT).expect("owner reads");
    assert!(check.iter().all(|&x| x == 0x5a), "another session changed the memory");

    // Outside the range.
    assert_eq!(b.memcpy_dtoh(&mut buf, 0x1000, StreamId::DEFAULT).expect_err("range").code(), cuda::INVALID_VALUE);

    // Oversize: allocation over the quota (client side and server side),
    // a copy longer than its allocation, an inline payload over the limit.
    let quota = b.welcome().memory_quota;
    assert!(matches!(b.mem_alloc(quota + 1), Err(ClientError::OutOfMemory(_))));
    let base = b.welcome().va_base;
    let map = Op::MemMap(v1::MemMap { addr: base + 64 * g, size: quota + g });
    assert_eq!(call_code(b.raw_call(map)), cuda::OUT_OF_MEMORY);
    let mut big = vec![0u8; 8192];
    assert_eq!(b.memcpy_dtoh(&mut big, mine, StreamId::DEFAULT).expect_err("too long").code(), cuda::INVALID_VALUE);
    let raw_len = u64::from(b.welcome().max_inline_bytes) + 1;
    let payload = v1::Payload { codec: v1::Codec::Lz4 as i32, raw_len, data: Bytes::from_static(&[0]) };
    let htod =
        v1::MemcpyHtoD { source: Some(v1::memcpy_hto_d::Source::Inline(payload)), dst: mine, ..Default::default() };
    assert_eq!(call_code(b.raw_call(Op::MemcpyHtod(htod))), cuda::INVALID_VALUE);
    let staged = v1::StagedRef { transfer_id: 1 << 40, size: 1 << 50 };
    let htod =
        v1::MemcpyHtoD { source: Some(v1::memcpy_hto_d::Source::Staged(staged)), dst: mine, ..Default::default() };
    assert_eq!(call_code(b.raw_call(Op::MemcpyHtod(htod))), cuda::INVALID_VALUE);
    let memset = Op::Memset(v1::Memset { dst: mine, value: 0, element_size: 4, count: u64::MAX / 2, stream: 0 });
    assert_eq!(call_code(b.raw_call(memset)), cuda::INVALID_VALUE);
    assert_eq!(
        call_code(b.raw_call(Op::ModuleLoad(v1::ModuleLoad {
            module: 50,
            sha256: Bytes::from_static(b"short"),
            image: None,
            staged: None,
        }))),
        cuda::INVALID_VALUE
    );
    let wrong = v1::ModuleLoad {
        module: 51,
        sha256: Bytes::from(vec![7u8; 32]),
        image: Some(v1::Payload { codec: 0, raw_len: 3, data: Bytes::from_static(b"abc") }),
        staged: None,
    };
    assert_eq!(call_code(b.raw_call(Op::ModuleLoad(wrong.clone()))), cuda::INVALID_VALUE);
    // An image both inline and staged, and a staged image never uploaded.
    let staged = Some(v1::StagedRef { transfer_id: 999, size: 3 });
    let both = v1::ModuleLoad { module: 52, staged, ..wrong.clone() };
    assert_eq!(call_code(b.raw_call(Op::ModuleLoad(both))), cuda::INVALID_VALUE);
    let ghost = v1::ModuleLoad { module: 53, image: None, staged, ..wrong };
    assert_ne!(call_code(b.raw_call(Op::ModuleLoad(ghost))), cuda::SUCCESS);

    // Both sessions still work.
    b.synchronize().expect("b usable");
    a.synchronize().expect("a usable");

    // Last, because on a GPU the fault ends B's context: a kernel pointed at
    // A's memory faults in B's own address space and cannot reach A's.
    let add = m.function("vector_add").expect("fn");
    b.launch(
        &add,
        LaunchConfig::for_elements(4, 32),
        StreamId::DEFAULT,
        &[KernelArg::Ptr(secret), KernelArg::Ptr(secret), KernelArg::Ptr(secret), KernelArg::U32(4)],
    )
    .expect("queued");
    let err = b.synchronize().expect_err("kernel on foreign memory");
    assert_eq!(err.code(), cuda::ILLEGAL_ADDRESS, "{err}");
    a.memcpy_dtoh(&mut check, secret, StreamId::DEFAULT).expect("owner reads");
    assert!(check.iter().all(|&x| x == 0x5a), "another session's kernel changed the memory");
    a.synchronize().expect("a unaffected by b's fault");
    still_serves(&srv);
}

/// Issue 20, finding 1: before its Hello is authenticated a connection may
/// open one stream and make the server buffer only a small window. Streams
/// the server never reads once took 256 MiB each connection (six such
/// connections took the supervisor to 1.9 GiB).
#[tokio::test]
async fn unauthenticated_connections_get_a_small_window() {
    let srv = start();
    let (_ep, conn) = Raw::connect(&srv, srv.addr).await;
    let (mut first, _recv) = conn.open_bi().await.expect("the command stream");
    // Half a frame header: the server waits for the rest of the Hello.
    first.write_all(&[1, 0]).await.expect("two bytes");
    let flood = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let (mut s, _r) = conn.open_bi().await.expect("stream");
        s.write_all(&vec![0u8; 8 << 20]).await
    })
    .await;
    assert!(flood.is_err(), "8 MiB went on a second stream the server never reads: {flood:?}");
    drop(conn);
    still_serves(&srv);
}

/// Issue 20, finding 1, the budget: at most `max_pending_handshakes`
/// connections are accepted and not yet authenticated at once (each may
/// hold a pre-authentication window); a later one waits to be accepted
/// until one of them is authenticated or times out, and then gets its
/// session.
#[tokio::test]
async fn unauthenticated_connections_take_a_bounded_number_of_windows() {
    let mut config = server_config();
    config.max_pending_handshakes = 2;
    config.handshake_timeout = std::time::Duration::from_millis(1500);
    let srv = TestServer::start(config).expect("server starts");
    let mut held = Vec::new();
    for _ in 0..2 {
        let (ep, conn) = Raw::connect(&srv, srv.addr).await;
        let (mut first, recv) = conn.open_bi().await.expect("the command stream");
        // Half a frame header: the Hello never comes.
        first.write_all(&[1, 0]).await.expect("two bytes");
        held.push((ep, conn, first, recv));
    }
    let started = std::time::Instant::now();
    let third = tokio::time::timeout(std::time::Duration::from_millis(600), Raw::connect(&srv, srv.addr)).await;
    assert!(third.is_err(), "a third unauthenticated connection was accepted past the budget of 2");
    let config = srv.client_config();
    let session = tokio::task::spawn_blocking(move || Session::connect(&config)).await.expect("thread");
    let session = session.expect("a session once a pending handshake timed out");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1), "it waited for a permit");
    drop(session);
    drop(held);
    still_serves(&srv);
}

/// Issue 20, finding 2: with worker processes, the supervisor's connection
/// carries only the Hello and the redirect; a tenant sending on it after the
/// redirect cannot make the supervisor hold more than the pre-session window.
#[tokio::test]
async fn supervisor_connection_stays_small_after_the_redirect() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let (mut raw, welcome) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("redirected");
    assert!(welcome.redirect.is_some(), "process isolation redirects");
    let flood = vec![0u8; 8 << 20];
    let sent = tokio::time::timeout(std::time::Duration::from_secs(2), raw.send.write_all(&flood)).await;
    assert!(sent.is_err(), "8 MiB accepted on the supervisor's connection after the redirect");
    let stream = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        let (mut s, _r) = raw.conn.open_bi().await.expect("stream");
        s.write_all(b"x").await
    })
    .await;
    assert!(stream.is_err(), "a new stream on the supervisor's connection after the redirect");
}

/// Issue 20, finding 3: a frame of many tiny calls expands ~50 times when
/// decoded; a batch of more calls than a client sends is refused before it
/// is decoded, and the session goes on.
#[tokio::test]
async fn batches_of_too_many_calls_are_refused_before_decoding() {
    let srv = start();
    let (mut raw, _) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("session");
    let sync = v1::Call { op: Some(Op::ContextSynchronize(v1::ContextSynchronize {})) };
    let flood = v1::Batch { seq: 1, calls: vec![sync.clone(); 70_000] };
    raw.send.write_all(&frame::encode(&flood)).await.expect("send");
    let r = raw.reply().await;
    assert_eq!(r.errors[0].code, cuda::INVALID_VALUE);
    assert!(r.errors[0].message.contains("70000 calls exceeds"), "{}", r.errors[0].message);
    let ok = v1::Batch { seq: 1, calls: vec![sync; 3] };
    raw.send.write_all(&frame::encode(&ok)).await.expect("send");
    let r = raw.reply().await;
    assert_eq!((r.seq, r.error_count), (1, 0));
}

/// Decoded batches a session may queue in the tests of the byte budget.
const QUEUE_BUDGET: u64 = 8 << 20;

/// Issue 20, finding 3: a batch that alone holds more than the queue's
/// byte budget decoded is refused, and the session goes on.
#[tokio::test]
async fn a_batch_larger_than_the_queue_budget_is_refused() {
    let mut config = server_config();
    config.max_queued_batch_bytes = QUEUE_BUDGET;
    let srv = TestServer::start(config).expect("server starts");
    let (mut raw, _) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("session");
    let launch = v1::Launch { params: Bytes::from(vec![0u8; 9 << 20]), ..Default::default() };
    let large = v1::Batch { seq: 1, calls: vec![v1::Call { op: Some(Op::Launch(launch)) }] };
    raw.send.write_all(&frame::encode(&large)).await.expect("send");
    let r = raw.reply().await;
    assert_eq!((r.seq, r.errors[0].code), (0, cuda::INVALID_VALUE));
    assert!(r.errors[0].message.ends_with("exceeds the queue's 8388608"), "{}", r.errors[0].message);
    let ok =
        v1::Batch { seq: 1, calls: vec![v1::Call { op: Some(Op::ContextSynchronize(v1::ContextSynchronize {})) }] };
    raw.send.write_all(&frame::encode(&ok)).await.expect("send");
    let r = raw.reply().await;
    assert_eq!((r.seq, r.error_count), (1, 0));
}

/// Calls in each batch of the flood in [`queued_batches_stay_within_their_byte_budget`]
/// (a batch holds ~1 MB decoded).
const FLOOD_BATCH_CALLS: usize = 4096;

/// How long the matmuls keep the session's thread busy while the flood
/// arrives.
const BUSY: Duration = Duration::from_millis(1200);

/// The built-in matmul on two `n`×`n` matrices of the session's memory.
struct Matmul {
    function: gpupool_client::Function,
    config: LaunchConfig,
    args: [KernelArg; 6],
}

impl Matmul {
    fn new(s: &Session, n: u32) -> Self {
        let module = s.module_load(BUILTIN_MODULE).expect("module");
        let bytes = u64::from(n) * u64::from(n) * 4;
        let (a, c) = (s.mem_alloc(bytes).expect("a"), s.mem_alloc(bytes).expect("c"));
        Self {
            function: module.function("matmul_f32").expect("matmul"),
            config: LaunchConfig { grid: (n.div_ceil(16), n.div_ceil(16), 1), block: (16, 16, 1), shared_mem_bytes: 0 },
            args: [
                KernelArg::Ptr(a),
                KernelArg::Ptr(a),
                KernelArg::Ptr(c),
                KernelArg::U32(n),
                KernelArg::U32(n),
                KernelArg::U32(n),
            ],
        }
    }

    /// Sends `times` launches and a synchronize in one batch: the emulated
    /// device computes them on the session's thread, which waits for a
    /// GPU's at the synchronize.
    fn send(&self, s: &Session, times: usize) {
        for _ in 0..times {
            s.launch(&self.function, self.config, StreamId::DEFAULT, &self.args).expect("launch");
        }
        s.raw_enqueue(Op::ContextSynchronize(v1::ContextSynchronize {})).expect("synchronize");
        s.flush().expect("sent");
    }

    /// Launches that keep the session's thread busy for at least about
    /// `busy` on this machine (debug or release build, emulated device or
    /// GPU), timed in batches that take an eighth of it. The fastest of
    /// three counts: a test beside this one that loads the cores while it
    /// times would make it launch too few.
    fn launches_for(&self, s: &Session, busy: Duration) -> usize {
        // The first launch also touches the matrices' memory.
        self.send(s, 1);
        s.synchronize().expect("a matmul ran");
        let (mut times, mut timed, mut fastest) = (1, 0, f64::MAX);
        while timed < 3 {
            let started = Instant::now();
            self.send(s, times);
            s.synchronize().expect("matmuls ran");
            let took = started.elapsed();
            if took < busy / 8 {
                times *= 2;
                continue;
            }
            fastest = fastest.min(took.as_secs_f64() / times as f64);
            timed += 1;
        }
        (busy.as_secs_f64() / fastest).ceil() as usize
    }
}

/// Issue 20, finding 3: a session's queue is bounded in decoded bytes, not
/// in batches. Behind matmuls that keep the session's thread busy, the
/// client sends twice the budget in batches of empty calls (5 bytes each
/// on the wire, over 200 decoded): the queue fills to the budget and no
/// further (the rest waits in QUIC flow control; a count bound of 64 would
/// have taken every batch), and once the thread is free every call runs and
/// the gauge is back at 0.
fn queued_batches_stay_within_their_byte_budget(mut config: gpupool_server::ServerConfig) {
    config.max_queued_batch_bytes = QUEUE_BUDGET;
    let srv = TestServer::start(config).expect("server starts");
    let mut client = srv.client_config();
    // Batches are cut at FLOOD_BATCH_CALLS calls, flushes and synchronizes
    // only.
    client.batch.max_calls = FLOOD_BATCH_CALLS;
    client.batch.max_delay = None;
    let s = Session::connect(&client).expect("session");
    // A GPU needs a larger product to stay busy for a few launches.
    let matmul = Matmul::new(&s, if srv.backend == "emulated" { 96 } else { 2048 });
    let busy_launches = matmul.launches_for(&s, BUSY);
    let sync = v1::Call { op: Some(Op::ContextSynchronize(v1::ContextSynchronize {})) };
    let calls = vec![sync; FLOOD_BATCH_CALLS];
    let batch_bytes =
        (v1::Batch { seq: 1 << 20, calls }.encoded_len() + FLOOD_BATCH_CALLS * std::mem::size_of::<v1::Call>()) as u64;
    let flood_batches = 2 * QUEUE_BUDGET / batch_bytes + 1;
    let calls_before = srv.metrics.snapshot().calls;
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let (ran, peak) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(scraped(&srv, "gpupool_server_batch_bytes_queued"));
                std::thread::sleep(Duration::from_millis(1));
            }
            peak
        });
        let ran = (|| {
            matmul.send(&s, busy_launches);
            for _ in 0..flood_batches as usize * FLOOD_BATCH_CALLS {
                s.raw_enqueue(Op::ContextSynchronize(v1::ContextSynchronize {}))?;
            }
            s.synchronize()
        })();
        done.store(true, Ordering::Relaxed);
        (ran, sampler.join().expect("sampler"))
    });
    let took = started.elapsed();
    ran.expect("every call ran");
    eprintln!(
        "{busy_launches} matmuls, then {flood_batches} batches of {batch_bytes} bytes decoded: \
         at most {peak} of {QUEUE_BUDGET} bytes queued; all ran in {took:?}"
    );
    assert!(peak <= QUEUE_BUDGET, "{peak} bytes queued past the budget of {QUEUE_BUDGET}");
    assert!(peak + batch_bytes > QUEUE_BUDGET, "the queue held {peak} bytes: not full while the thread was busy");
    // A worker process reports its counters every 200 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scraped(&srv, "gpupool_server_batch_bytes_queued") != 0 {
        assert!(Instant::now() < deadline, "queued bytes stay after the calls ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let calls = srv.metrics.snapshot().calls - calls_before;
    assert!(calls > flood_batches * FLOOD_BATCH_CALLS as u64, "{calls} calls counted");
}

#[test]
fn queued_batches_of_a_session_in_the_server_process_stay_within_their_byte_budget() {
    queued_batches_stay_within_their_byte_budget(server_config());
}

#[test]
fn queued_batches_of_a_session_in_a_worker_process_stay_within_their_byte_budget() {
    queued_batches_stay_within_their_byte_budget(isolated_config().expect("worker binary"));
}

/// A bulk put of `data` at `offset` of upload `id` (of `total` bytes) on its
/// own stream of `conn`, and the server's response.
async fn bulk_put(conn: &quinn::Connection, id: u64, total: u64, offset: u64, data: Bytes) -> v1::BulkResponse {
    use gpupool_proto::payload::{self, Compression};
    let (mut send, mut recv) = conn.open_bi().await.expect("bulk stream");
    let put =
        v1::BulkPut { transfer_id: id, total_size: total, offset, data: Some(payload::encode(data, Compression::Off)) };
    let request = v1::BulkRequest { op: Some(v1::bulk_request::Op::Put(put)) };
    send.write_all(&frame::encode(&request)).await.expect("put");
    let _ = send.finish();
    let body = recv.read_to_end(1 << 20).await.expect("response");
    let mut dec = frame::FrameDecoder::new(1 << 20);
    dec.push(&body);
    v1::BulkResponse::decode(dec.next_frame().expect("a frame").expect("a response")).expect("decodes")
}

/// A raw session: the connection to the server and, under process
/// isolation, the one to the session's worker (the first is kept: closing
/// it ends the session), and the session's id.
async fn raw_session(srv: &TestServer) -> (Raw, Option<Raw>, u64) {
    let (first, welcome) = Raw::open(srv, PROTOCOL_VERSION, TOKEN).await.expect("a session");
    let Some(redirect) = welcome.redirect else { return (first, None, welcome.session_id) };
    let addr = ([127, 0, 0, 1], redirect.port as u16).into();
    let (worker, _) = Raw::open_at(srv, addr, PROTOCOL_VERSION, &redirect.ticket).await.expect("the ticket works");
    (first, Some(worker), welcome.session_id)
}

/// A series of `srv`'s scrape without labels.
fn scraped(srv: &TestServer, name: &str) -> u64 {
    let text = gpupool_server::server::exporter::render(&srv.metrics);
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} in {text}"));
    line[name.len() + 1..].parse::<u64>().expect("a number")
}

/// The host's staged bytes and its cap, as a scrape shows them.
fn host_staging(srv: &TestServer) -> (u64, u64) {
    (scraped(srv, "gpupool_server_staging_host_bytes"), scraped(srv, "gpupool_server_staging_host_limit_bytes"))
}

/// Waits until the host's staged bytes are `bytes`.
async fn host_staging_becomes(srv: &TestServer, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while host_staging(srv).0 != bytes {
        assert!(std::time::Instant::now() < deadline, "host staging {:?}, want {bytes}", host_staging(srv));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

const CHUNK: usize = 4 << 20;

/// Issue 20, finding 4 (second half): the sessions of a host stage at most
/// the host's cap together, in separate worker processes or in the
/// server's. Each of four sessions announces a 1 GiB upload and sends 8 MiB
/// of it (well within its own 3 GiB); with a 20 MiB host cap, puts past it
/// wait a bounded time and fail with OUT_OF_MEMORY, the host total never
/// passes the cap, and other sessions keep working; once the sessions end,
/// their bytes are the host's again.
async fn sessions_stage_at_most_the_host_cap(mut config: gpupool_server::ServerConfig) {
    config.staging_host_bytes = 20 << 20;
    config.staging_wait = std::time::Duration::from_millis(300);
    let srv = TestServer::start(config).expect("server starts");
    assert_eq!(host_staging(&srv), (0, 20 << 20));
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(raw_session(&srv).await);
    }
    let (mut kept, mut refused) = (0u64, 0);
    for (i, (first, worker, _)) in sessions.iter().enumerate() {
        let conn = &worker.as_ref().unwrap_or(first).conn;
        for c in 0..2u64 {
            let r = bulk_put(conn, 1, 1 << 30, c * CHUNK as u64, Bytes::from(vec![i as u8; CHUNK])).await;
            match r.error {
                None => kept += CHUNK as u64,
                Some(e) => {
                    assert_eq!(e.code, cuda::OUT_OF_MEMORY, "{}", e.message);
                    assert!(e.message.contains("staging memory is full"), "{}", e.message);
                    refused += 1;
                }
            }
            assert!(host_staging(&srv).0 <= 20 << 20, "past the host's cap: {:?}", host_staging(&srv));
        }
    }
    assert_eq!((kept, refused), (20 << 20, 3), "five chunks fit the cap, three do not");
    assert_eq!(host_staging(&srv).0, kept, "the scrape counts what the sessions hold");
    // Another session still works (its copies inline: the cap is full).
    let probe = srv.client_config();
    tokio::task::spawn_blocking(move || {
        let s = Session::connect(&probe).expect("a session while the cap is full");
        let d = gpupool_client::DeviceBuffer::from_slice(&s, &[7u8; 1000]).expect("inline copy");
        assert_eq!(d.to_vec().expect("back"), vec![7u8; 1000]);
    })
    .await
    .expect("probe");
    drop(sessions);
    host_staging_becomes(&srv, 0).await;
    // With the room back, a large copy stages again.
    round_trip_in_new_session(&srv, 12 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_all_workers_stage_at_most_the_host_cap() {
    let mut config = isolated_config().expect("worker binary");
    config.isolation = gpupool_server::config::Isolation::Process {
        command: gpupool_tests::worker_command().expect("worker binary"),
        warm: 4,
        start_timeout: std::time::Duration::from_secs(60),
    };
    sessions_stage_at_most_the_host_cap(config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_the_server_process_stage_at_most_the_host_cap() {
    let mut config = server_config();
    // Puts on the raw sessions' QUIC connections, whatever the test transport.
    config.rdma.mode = gpupool_server::RdmaMode::Off;
    sessions_stage_at_most_the_host_cap(config).await;
}

/// A worker killed with SIGKILL in the middle of an upload gives nothing
/// back itself; its supervisor returns the worker's staged bytes to the
/// host when it sees the worker exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_gives_its_staged_bytes_back() {
    let mut config = isolated_config().expect("worker binary");
    config.staging_host_bytes = 64 << 20;
    let srv = TestServer::start(config).expect("server starts");
    let (_control, worker, id) = raw_session(&srv).await;
    let pid = srv.workers().iter().find(|w| w.session == Some(id)).expect("assigned").pid;
    let session = worker.expect("process isolation redirects");
    for c in 0..3u64 {
        let r = bulk_put(&session.conn, 9, 1 << 30, c * CHUNK as u64, Bytes::from(vec![1u8; CHUNK])).await;
        assert_eq!(r.error, None);
    }
    assert_eq!(host_staging(&srv).0, 3 * CHUNK as u64);
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill runs");
    assert!(status.success());
    host_staging_becomes(&srv, 0).await;
    round_trip_in_new_session(&srv, 9 << 20).await;
}

/// A new session copies `n` bytes to the device and back (staged when
/// larger than an inline copy).
async fn round_trip_in_new_session(srv: &TestServer, n: usize) {
    let config = srv.client_config();
    tokio::task::spawn_blocking(move || {
        let s = Session::connect(&config).expect("a session");
        gpupool_tests::round_trip(&s, n, gpupool_tests::fresh_seed());
    })
    .await
    .expect("a round trip");
}
