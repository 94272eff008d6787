//! Process isolation: every session runs in its own worker process (the
//! `gpupool-server` binary started with `worker`), reached through a one-time
//! ticket, with the first connection kept as the control connection.

use gpupool_client::{ClientError, DeviceBuffer, KernelArg, LaunchConfig, Session, StreamId};
use gpupool_proto::{BUILTIN_MODULE, PROTOCOL_VERSION, close_code};
use gpupool_server::WorkerCommand;
use gpupool_server::config::Isolation;
use gpupool_tests::raw::Raw;
use gpupool_tests::{TOKEN, TestServer, alive, fresh_seed, isolated_config, random_bytes, random_f32, rel_error};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of the worker serving `s`.
fn worker_of(srv: &TestServer, s: &Session) -> u32 {
    let id = s.welcome().session_id;
    srv.workers().iter().find(|w| w.session == Some(id)).map(|w| w.pid).expect("a worker serves the session")
}

/// Correct results from a kernel and byte-exact copies (inline and bulk).
fn works(s: &Session, seed: u64) {
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let n = 10_007;
    let (a, b) = (random_f32(n, seed), random_f32(n, seed + 1));
    let (da, db) = (DeviceBuffer::from_slice(s, &a).expect("a"), DeviceBuffer::from_slice(s, &b).expect("b"));
    let dc = DeviceBuffer::<f32>::new(s, n).expect("c");
    let add = m.function("vector_add").expect("vector_add");
    let cfg = LaunchConfig::for_elements(n as u32, 256);
    s.launch(&add, cfg, StreamId::DEFAULT, &[da.arg(), db.arg(), dc.arg(), KernelArg::U32(n as u32)]).expect("launch");
    let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| f64::from(*x) + f64::from(*y)).collect();
    assert!(rel_error(&dc.to_vec().expect("c"), &want) < 1e-6);
    for n in [100, 9 << 20] {
        let data = random_bytes(n, seed + n as u64);
        let dev = s.mem_alloc(n as u64).expect("alloc");
        s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod");
        let mut back = vec![0u8; n];
        s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh");
        assert!(back == data, "{n} bytes differ");
        s.mem_free(dev).expect("free");
    }
}

#[test]
fn each_session_gets_its_own_worker_process_which_exits_with_it() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let me = std::process::id();
    let a = Session::connect(&srv.client_config()).expect("a");
    let b = Session::connect(&srv.client_config()).expect("b");
    let (pa, pb) = (worker_of(&srv, &a), worker_of(&srv, &b));
    assert!(pa != pb && pa != me && pb != me, "workers {pa} {pb}, test {me}");
    assert!(alive(pa) && alive(pb));
    let seed = fresh_seed();
    works(&a, seed);
    works(&b, seed + 100);
    // The session's quota is the virtual GPU's memory, from the worker.
    assert_eq!(a.mem_get_info().1, a.welcome().memory_quota);

    // Workers report their counters to the supervisor.
    let sent = a.batches_sent() + b.batches_sent();
    wait_until("both workers' counters reached the supervisor", || {
        let m = srv.metrics.snapshot();
        m.batches >= sent && m.bulk_bytes_in >= 2 * (9 << 20)
    });

    drop(a);
    wait_until("A's worker has exited", || !alive(pa));
    assert!(alive(pb), "B's worker is untouched");
    works(&b, seed + 200);
    // A warm worker is kept ready for the next session.
    wait_until("a warm worker is ready", || srv.workers().iter().any(|w| w.session.is_none()));
    let c = Session::connect(&srv.client_config()).expect("c");
    works(&c, seed + 300);
}

#[test]
fn a_killed_worker_ends_only_its_session_with_a_clear_error() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let a = Session::connect(&srv.client_config()).expect("a");
    let b = Session::connect(&srv.client_config()).expect("b");
    let pa = worker_of(&srv, &a);
    let status = std::process::Command::new("kill").args(["-9", &pa.to_string()]).status().expect("kill runs");
    assert!(status.success());

    let t = Instant::now();
    let err = loop {
        match a.synchronize() {
            Err(e) => break e,
            Ok(()) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert!(matches!(err, ClientError::ConnectionLost(_)), "{err:?}");
    assert!(err.to_string().contains("worker"), "says what failed: {err}");
    // Told by the control connection, not by the data connection's idle timeout.
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    let killed = || {
        let exits = srv.metrics.worker_exits();
        exits.iter().find(|(how, _)| *how == gpupool_server::server::metrics::WorkerExit::Signal).map(|e| e.1)
    };
    wait_until("the supervisor counted the killed worker", || killed() == Some(1));

    works(&b, fresh_seed());
    let c = Session::connect(&srv.client_config()).expect("a new session after the crash");
    works(&c, fresh_seed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_one_time_secret_and_expire() {
    let mut config = isolated_config().expect("worker binary");
    config.handshake_timeout = Duration::from_millis(1500);
    let srv = TestServer::start(config).expect("server starts");

    let (control, welcome) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("redirected");
    let redirect = welcome.redirect.clone().expect("a redirect");
    let worker: SocketAddr = ([127, 0, 0, 1], redirect.port as u16).into();
    let pid = srv.workers().iter().find(|w| w.session == Some(welcome.session_id)).expect("assigned").pid;

    // The supervisor's token is not the ticket.
    let (code, reason) = Raw::open_at(&srv, worker, PROTOCOL_VERSION, TOKEN).await.expect_err("refused");
    assert_eq!(code, close_code::UNAUTHORIZED, "{reason}");
    let (_session, w) = Raw::open_at(&srv, worker, PROTOCOL_VERSION, &redirect.ticket).await.expect("the ticket works");
    assert_eq!(w.session_id, welcome.session_id);
    assert!(w.redirect.is_none() && w.memory_quota > 0 && w.va_size > 0);
    let (code, reason) = Raw::open_at(&srv, worker, PROTOCOL_VERSION, &redirect.ticket).await.expect_err("spent");
    assert_eq!(code, close_code::UNAUTHORIZED);
    assert!(reason.contains("already used"), "{reason}");
    drop(control);

    // A ticket nobody uses expires, and its worker exits.
    let (_control, welcome) = Raw::open(&srv, PROTOCOL_VERSION, TOKEN).await.expect("redirected");
    let unused = srv.workers().iter().find(|w| w.session == Some(welcome.session_id)).expect("assigned").pid;
    assert_ne!(unused, pid);
    tokio::task::spawn_blocking(move || wait_until("the unused worker has exited", || !alive(unused)))
        .await
        .expect("waited");
}

#[test]
fn a_worker_that_cannot_start_is_reported() {
    let mut config = isolated_config().expect("worker binary");
    config.isolation = Isolation::Process {
        command: WorkerCommand { program: "/nonexistent/gpupool-server".into(), args: vec!["worker".into()] },
        warm: 1,
        start_timeout: Duration::from_secs(5),
    };
    let err = TestServer::start(config).expect_err("must fail").to_string();
    assert!(err.contains("/nonexistent/gpupool-server"), "{err}");

    let mut config = isolated_config().expect("worker binary");
    config.isolation = Isolation::Process {
        command: WorkerCommand { program: "/bin/false".into(), args: vec![] },
        warm: 1,
        start_timeout: Duration::from_secs(5),
    };
    let err = TestServer::start(config).expect_err("must fail").to_string();
    assert!(err.contains("exited before it was ready"), "{err}");
}

/// Issue 17, "fast first call": the second program to use an image finds it
/// loaded. Under process isolation each session has a fresh worker process;
/// without an `--image-cache` the server keeps a private image directory for
/// its workers, and a worker waiting for its session loads the images the
/// sessions before it used (also those written after it started: the one
/// for the next session starts while `a` runs).
#[test]
fn a_waiting_worker_preloads_the_images_earlier_sessions_used() {
    let mut config = isolated_config().expect("worker binary");
    assert!(config.image_cache_dir.is_none(), "the private directory is what is tested");
    config.image_preload_bytes = 1 << 20;
    let srv = TestServer::start(config).expect("server starts");
    // A PTX module of its own (the comment makes its hash new), loadable on
    // a GPU as on the emulated device.
    let image = format!(
        "// gpupool preload test {}\n.version 7.0\n.target sm_50\n.address_size 64\n\
         .visible .entry gpupool_preload_test()\n{{\n    ret;\n}}\n\0",
        fresh_seed()
    )
    .into_bytes();
    let a = Session::connect(&srv.client_config()).expect("a");
    a.module_load(&image).expect("a loads the image (sent)");
    a.module_load(BUILTIN_MODULE).expect("the built-in module loads as always");
    drop(a);
    // The waiting worker looks for new images every 250 ms; a session that
    // comes before it looked loads the image itself (and its successor's
    // worker, started later, has it).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let b = Session::connect(&srv.client_config()).expect("b");
        b.module_load(&image).expect("b loads the image");
        works(&b, fresh_seed());
        drop(b);
        let used = || srv.metrics.snapshot().modules_preloaded_used;
        let ended = Instant::now() + Duration::from_secs(5);
        while used() == 0 && Instant::now() < ended {
            std::thread::sleep(Duration::from_millis(20));
        }
        if used() >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no session took a preloaded module");
    }
    let s = srv.metrics.snapshot();
    assert!(s.modules_preloaded >= s.modules_preloaded_used, "{s:?}");
}

/// Issue 20, metrics: worker starts, the time sessions spent executing
/// batches (relayed from the workers) and the queued-batches gauge, which
/// is back at 0 once the work is done, on the Prometheus page too.
#[test]
fn worker_starts_busy_time_and_queued_batches_are_counted() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    works(&s, fresh_seed());
    // A batch sent while a slow one runs (a 384^3 matmul on the emulated
    // device: tens of milliseconds) waits for it on the session's thread.
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let n = 384usize;
    let x = DeviceBuffer::from_slice(&s, &random_f32(n * n, 7)).expect("x");
    let y = DeviceBuffer::<f32>::new(&s, n * n).expect("y");
    let matmul = m.function("matmul_f32").expect("matmul");
    let cfg = LaunchConfig { grid: (n as u32 / 16, n as u32 / 16, 1), block: (16, 16, 1), shared_mem_bytes: 0 };
    let dims = [KernelArg::U32(n as u32), KernelArg::U32(n as u32), KernelArg::U32(n as u32)];
    let args = [x.arg(), x.arg(), y.arg(), dims[0], dims[1], dims[2]];
    s.launch(&matmul, cfg, StreamId::DEFAULT, &args).expect("slow launch");
    s.flush().expect("sent");
    s.launch(&m.function("empty").expect("empty"), LaunchConfig::for_elements(1, 1), StreamId::DEFAULT, &[])
        .expect("launch behind it");
    s.flush().expect("sent behind it");
    s.synchronize().expect("both ran");
    // The buffers and the module hold the session too.
    drop((x, y, m, s));
    wait_until("the worker reported its busy time and the wait", || {
        let m = srv.metrics.snapshot();
        m.busy_us > 0 && m.batches_waited > 0
    });
    let m = srv.metrics.snapshot();
    assert!(m.batch_wait_us >= 1_000, "the batch behind the matmul waited: {m:?}");
    // The probe, the session's (warm) worker and its replacement.
    assert!(m.worker_starts >= 2, "{m:?}");
    wait_until("no batch queued", || srv.metrics.snapshot().batches_queued == 0);
    wait_until("the session ended", || srv.metrics.instances().get("device").is_some_and(|c| c.active == 0));
    // Over HTTP, as Prometheus scrapes it (`--metrics-listen`).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let page = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(gpupool_server::server::exporter::serve(listener, srv.metrics.clone(), async {
            let _ = stopped.await;
        }));
        let page = gpupool_proto::exporter::get(addr, "/metrics").await.expect("scrape");
        let _ = stop.send(());
        server.await.expect("exporter ends");
        page
    });
    let value = |name: &str| -> u64 {
        let line =
            page.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}: {page}"));
        line[name.len() + 1..].parse().unwrap_or_else(|_| panic!("{line}"))
    };
    assert!(value("gpupool_server_worker_starts_total") >= 2, "{page}");
    assert!(value("gpupool_server_busy_microseconds_total") > 0, "{page}");
    assert_eq!(value("gpupool_server_batches_queued"), 0, "{page}");
    assert!(value("gpupool_server_calls_total") > 0, "{page}");
    assert!(value("gpupool_server_batches_waited_total") >= 1, "{page}");
    assert!(value("gpupool_server_batch_wait_microseconds_total") >= 1_000, "{page}");
    // The session by tenant and by instance (the server's one device).
    let tenant = "gpupool_server_tenant_sessions_opened_total{tenant=\"(static token)\"}";
    let instance = "gpupool_server_gpu_instance_sessions_opened_total{gpu_instance=\"device\"}";
    assert_eq!(value(tenant), 1, "{page}");
    assert_eq!(value(instance), 1, "{page}");
    assert_eq!(value("gpupool_server_gpu_instance_sessions_active{gpu_instance=\"device\"}"), 0, "{page}");
    assert!(value("gpupool_server_gpu_instance_calls_total{gpu_instance=\"device\"}") > 0, "{page}");
    let busy = value("gpupool_server_tenant_busy_microseconds_total{tenant=\"(static token)\"}");
    assert!(busy > 0 && busy <= value("gpupool_server_busy_microseconds_total"), "{page}");
}

/// The code of a CUDA error, or a panic naming what came instead.
fn cuda_code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u32 {
    match r {
        Err(ClientError::Cuda { code, .. }) => code,
        other => panic!("expected a CUDA error, got {other:?}"),
    }
}

/// CUDA IPC events (docs/ipc.md): one session exports an event, another of
/// the same tenant on the same server opens it, records and waits on it;
/// an event made without `INTERPROCESS`, a handle gpupool did not make and
/// another server's handle are refused as the driver refuses them; an
/// export goes with its session; sessions in the server's own process have
/// no IPC.
#[test]
fn ipc_events_are_shared_between_sessions_of_one_server() {
    use gpupool_proto::cuda::{INVALID_HANDLE, INVALID_VALUE, NOT_SUPPORTED};
    const INTERPROCESS: u32 = 0x4 | 0x2;
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let a = Session::connect(&srv.client_config()).expect("a");
    let b = Session::connect(&srv.client_config()).expect("b");

    let plain = a.event_create(0).expect("event");
    // The driver's answer (H100, driver 580).
    assert_eq!(cuda_code(a.event_ipc_handle(plain)), INVALID_HANDLE, "not INTERPROCESS");
    let shared = a.event_create(INTERPROCESS).expect("event");
    a.event_record(shared, StreamId::DEFAULT).expect("record, answered");
    let handle = a.event_ipc_handle(shared).expect("export");
    assert_eq!(a.event_ipc_handle(shared).expect("again"), handle, "the same event, the same handle");

    let opened = b.event_ipc_open(&handle).expect("open in the other session");
    b.stream_wait_event(StreamId::DEFAULT, opened).expect("wait");
    b.event_record(opened, StreamId::DEFAULT).expect("record in the importer");
    b.event_synchronize(opened).expect("synchronize");
    assert!(b.event_query(opened).expect("query"), "complete");
    a.event_synchronize(shared).expect("the exporter's side");
    works(&b, fresh_seed());
    b.event_destroy(opened).expect("destroy the import");
    b.synchronize().expect("the destroy ran");

    assert_eq!(cuda_code(b.event_ipc_open(&[0u8; 64])), INVALID_VALUE, "zeros");
    assert_eq!(cuda_code(b.event_ipc_open(&handle[..40])), INVALID_VALUE, "short");
    let mut forged = handle;
    forged[8] ^= 1;
    assert_eq!(cuda_code(b.event_ipc_open(&forged)), INVALID_VALUE, "an id never exported");

    // Another server does not know this server's exports.
    let other = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let c = Session::connect(&other.client_config()).expect("c");
    assert_eq!(cuda_code(c.event_ipc_open(&handle)), INVALID_VALUE, "another server's handle");

    // The export goes with its session's worker.
    let pa = worker_of(&srv, &a);
    drop(a);
    wait_until("A's worker has exited", || !alive(pa));
    wait_until("A's export is gone", || b.event_ipc_open(&handle).is_err());
    assert_eq!(cuda_code(b.event_ipc_open(&handle)), INVALID_VALUE);
    b.synchronize().expect("B is unharmed");

    // Sessions in the server's own process have no IPC.
    let in_process = TestServer::start(gpupool_tests::server_config()).expect("server starts");
    let d = Session::connect(&in_process.client_config()).expect("d");
    let e = d.event_create(INTERPROCESS).expect("event");
    assert_eq!(cuda_code(d.event_ipc_handle(e)), NOT_SUPPORTED);
}
