//! Launch configurations and attributes end to end (worker processes, the
//! emulated device): a bad configuration fails at the launch and latches
//! nothing; cooperative grids too large to be co-resident fail at the
//! launch; cluster and other attributes travel; dimensions that would
//! overflow are refused by the server, whatever the client sends.

use gpupool_client::{ClientError, LaunchConfig, Session, StreamId};
use gpupool_proto::{BUILTIN_MODULE, cuda, v1};
use gpupool_tests::{TestServer, isolated_config};

fn code(r: Result<(), ClientError>) -> u32 {
    r.map_or_else(|e| e.code(), |()| 0)
}

fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32), shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid, block, shared_mem_bytes }
}

#[test]
fn bad_configurations_fail_at_the_launch_and_latch_nothing() {
    bad_configurations(isolated_config().expect("worker binary"));
}

/// The same with every module loaded undescribed (as a GPU server loads
/// cuBLAS's): the client describes a function before its first launch
/// check, once, and the attribute set before that is in the description.
#[test]
fn functions_loaded_undescribed_are_described_at_their_first_launch() {
    let mut config = isolated_config().expect("worker binary");
    config.eager_describe_max = 0;
    let srv = TestServer::start(config.clone()).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    assert!(m.functions.iter().all(|f| f.undescribed && f.attributes.is_empty()), "loaded undescribed");
    let vadd = m.function("vector_add").expect("vector_add");
    s.func_set_attribute(&vadd, 8, 60 << 10).expect("MAX_DYNAMIC_SHARED_SIZE_BYTES before any description");
    let described = s.described(&vadd).expect("described");
    assert!(!described.undescribed && described.max_threads_per_block == 1024, "{described:?}");
    assert_eq!(described.attributes.get(&8), Some(&(60 << 10)), "the attribute set before");
    assert!(std::sync::Arc::ptr_eq(&described, &s.described(&vadd).expect("again")), "kept, not asked again");
    srv.stop();
    bad_configurations(config);
}

fn bad_configurations(config: gpupool_server::ServerConfig) {
    let srv = TestServer::start(config).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let empty = m.function("empty").expect("empty");
    let launch = |c: LaunchConfig| code(s.launch(&empty, c, StreamId::DEFAULT, &[]));
    for (c, want) in [
        (cfg((1, 1, 1), (4096, 1, 1), 0), cuda::INVALID_VALUE),
        (cfg((1, 1, 1), (1, 1, 65), 0), cuda::INVALID_VALUE),
        (cfg((1, 65536, 1), (1, 1, 1), 0), cuda::INVALID_VALUE),
        (cfg((0, 1, 1), (1, 1, 1), 0), cuda::INVALID_VALUE),
        (cfg((1, 1, 1), (32, 1, 1), (48 << 10) + 1), cuda::INVALID_VALUE),
    ] {
        assert_eq!(launch(c), want, "{c:?}");
        assert_eq!(code(s.synchronize()), 0, "nothing latched after {c:?}");
    }
    // Raised by cuFuncSetAttribute, the same shared memory is fine.
    s.func_set_attribute(&empty, 8, 64 << 10).expect("raise MAX_DYNAMIC_SHARED_SIZE_BYTES");
    assert_eq!(launch(cfg((1, 1, 1), (32, 1, 1), (48 << 10) + 1)), 0);
    assert_eq!(code(s.synchronize()), 0);
    srv.stop();
}

#[test]
fn attributes_travel_and_cooperative_grids_are_checked_at_the_launch() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let empty = m.function("empty").expect("empty");
    let with =
        |c: LaunchConfig, a: v1::LaunchAttributes| code(s.launch_with(&empty, c, Some(a), StreamId::DEFAULT, vec![]));
    let cooperative = || v1::LaunchAttributes { cooperative: true, ..Default::default() };
    assert_eq!(with(cfg((1 << 20, 1, 1), (1024, 1, 1), 0), cooperative()), cuda::COOPERATIVE_LAUNCH_TOO_LARGE);
    assert_eq!(code(s.synchronize()), 0, "the refused cooperative launch latched nothing");
    assert_eq!(with(cfg((132, 1, 1), (1024, 1, 1), 0), cooperative()), 0);

    let cluster = |x| v1::LaunchAttributes { cluster: Some(v1::Dim3 { x, y: 1, z: 1 }), ..Default::default() };
    assert_eq!(with(cfg((8, 1, 1), (32, 1, 1), 0), cluster(2)), 0);
    assert_eq!(with(cfg((6, 1, 1), (32, 1, 1), 0), cluster(4)), cuda::INVALID_CLUSTER_SIZE);
    assert_eq!(with(cfg((16, 1, 1), (32, 1, 1), 0), cluster(16)), cuda::INVALID_CLUSTER_SIZE, "portable: 8");
    // Launch completion events must not time (CU_EVENT_DISABLE_TIMING).
    let e = s.event_create(2).expect("event");
    let everything = v1::LaunchAttributes {
        programmatic_serialization: true,
        priority: Some(-2),
        mem_sync_domain: Some(1),
        cluster_scheduling_policy: 1,
        completion_event: Some(v1::LaunchEvent { event: e.0, ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(with(cfg((4, 1, 1), (32, 1, 1), 0), everything), 0);
    assert_eq!(code(s.synchronize()), 0);
}

#[test]
fn the_server_refuses_dimensions_that_would_overflow() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let huge = Some(v1::Dim3 { x: 1 << 31, y: 1 << 31, z: 1 << 31 });
    let one = Some(v1::Dim3 { x: 1, y: 1, z: 1 });
    // Past the client's checks: what a hostile client could send.
    for (grid, block) in [(one, huge), (huge, one)] {
        let op = v1::call::Op::Launch(v1::Launch { module: m.id, function: 0, grid, block, ..Default::default() });
        s.raw_enqueue(op).expect("queued");
        let err = s.synchronize().expect_err("refused by the server");
        assert_eq!(err.code(), cuda::INVALID_VALUE, "{err}");
    }
    assert_eq!(code(s.synchronize()), 0, "the session goes on");
}

/// TMA descriptors travel to the server, which checks them before its
/// driver sees them: the emulated device has no driver to encode with and
/// says so; a tensor outside the session's range, a rank the driver does
/// not have or vectors of the wrong length are refused; the session goes on.
#[test]
fn tensor_maps_are_checked_and_encoded_by_the_server() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let buf = s.mem_alloc(1 << 20).expect("alloc");
    let tiled = |addr: u64, rank: u32| v1::TensorMapEncode {
        kind: v1::TensorMapKind::Tiled as i32,
        data_type: 7,
        rank,
        global_address: addr,
        global_dim: vec![64; rank as usize],
        global_strides: vec![256; rank.saturating_sub(1) as usize],
        box_dim: vec![16; rank as usize],
        element_strides: vec![1; rank as usize],
        ..Default::default()
    };
    let code = |r: Result<[u8; 128], ClientError>| r.map_or_else(|e| e.code(), |_| 0);
    assert_eq!(code(s.tensor_map(tiled(buf, 2))), cuda::NOT_SUPPORTED, "no driver to encode with");
    assert_eq!(code(s.tensor_map(tiled(0x1000, 2))), cuda::INVALID_VALUE, "outside the session");
    assert_eq!(code(s.tensor_map(tiled(buf, 6))), cuda::INVALID_VALUE, "rank 6");
    let mut short = tiled(buf, 3);
    short.box_dim.pop();
    assert_eq!(code(s.tensor_map(short)), cuda::INVALID_VALUE, "box of the wrong rank");
    s.memcpy_htod(buf, &[7u8; 64], StreamId::DEFAULT).expect("the session goes on");
    let mut back = [0u8; 64];
    s.memcpy_dtoh(&mut back, buf, StreamId::DEFAULT).expect("read back");
    assert_eq!(back, [7u8; 64]);
}

/// Occupancy answers are kept: a repeated query sends nothing, a different
/// one or one after the function's attributes changed asks the server.
#[test]
fn repeated_occupancy_queries_are_answered_locally() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let f = m.function("empty").expect("empty");
    let query =
        |block_size| v1::Occupancy { query: v1::OccupancyQuery::ActiveBlocks as i32, block_size, ..Default::default() };
    let first = s.occupancy(&f, query(128)).expect("query");
    let sent = s.batches_sent();
    assert_eq!(s.occupancy(&f, query(128)).expect("again"), first);
    assert_eq!(s.batches_sent(), sent, "answered from the cache");
    s.occupancy(&f, query(256)).expect("another block size");
    assert_eq!(s.batches_sent(), sent + 1);
    s.func_set_attribute(&f, 8, 64 << 10).expect("set an attribute");
    s.occupancy(&f, query(128)).expect("after the attribute changed");
    assert!(s.batches_sent() > sent + 1, "asked again after the attribute changed");
}

/// A stream synchronization after a waited call saw the stream idle (the
/// `.item()` pattern: a device-to-host copy, then a synchronize) sends
/// nothing; after new work on the stream it waits for the server again,
/// and a failure of that work is still returned.
#[test]
fn synchronizing_an_idle_stream_needs_no_round_trip() {
    let srv = TestServer::start(isolated_config().expect("worker binary")).expect("server starts");
    let s = Session::connect(&srv.client_config()).expect("session");
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let empty = m.function("empty").expect("empty");
    let stream = s.stream_create(0, 0).expect("stream");
    let buf = s.mem_alloc(4096).expect("alloc");
    s.memset(buf, 7, 1, 4096, stream).expect("memset");
    let mut out = [0u8; 16];
    s.memcpy_dtoh(&mut out, buf, stream).expect("copy waits for the stream");
    assert_eq!(out, [7; 16]);
    let sent = s.batches_sent();
    s.stream_synchronize(stream).expect("sync");
    assert!(s.stream_query(stream).expect("query"), "idle");
    assert_eq!(s.batches_sent(), sent, "answered without a round trip");

    s.launch(&empty, cfg((1, 1, 1), (32, 1, 1), 0), stream, &[]).expect("launch");
    s.stream_synchronize(stream).expect("sync after work");
    assert!(s.batches_sent() > sent, "new work: the server is asked");
    let sent = s.batches_sent();
    s.stream_synchronize(stream).expect("sync again");
    assert_eq!(s.batches_sent(), sent);

    // Work that fails on the server (a launch the client cannot check:
    // its argument block is the wrong size): the error comes back from the
    // next synchronization, which therefore goes to the server.
    s.launch_raw(&empty, cfg((1, 1, 1), (32, 1, 1), 0), stream, vec![0; 4096]).expect("queued");
    assert_ne!(code(s.stream_synchronize(stream)), 0, "the failure is returned");
    assert_eq!(code(s.stream_synchronize(stream)), 0, "returned once");
}
