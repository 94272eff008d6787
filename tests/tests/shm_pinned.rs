//! The program's pinned memory in host regions shared with the server
//! (issue 18, item 3; docs/transport.md, "Pinned memory in the region"):
//! copies from and to it name (region, offset, length) and the server
//! copies between its registered mapping and the device, asynchronous ones
//! queued in stream order. Byte for byte in both directions, sync and
//! async, at the region's edges; ranges outside a region refused; no
//! region left mapped or registered when the client is killed or the
//! session ends; a session holding pinned memory in a region moves to
//! another server once the regions are revoked through its command ring
//! (without a ring it is refused cleanly, and moves once it freed them).
//! Emulated device unless `GPUPOOL_TEST_DEVICE=cuda`.

use gpupool_client::{ClientConfig, DEFAULT_SHM_REGION_BYTES, Session, StreamId};
use gpupool_proto::cuda;
use gpupool_proto::v1::{self, call::Op};
use gpupool_tests::{TOKEN, TestServer, fresh_seed, isolated_config, random_bytes, server_config};
use std::time::{Duration, Instant};

/// The size of the client's host regions for small allocations.
const REGION: usize = 64 << 20;

fn shm_config(srv: &TestServer) -> ClientConfig {
    let mut c = srv.client_config();
    c.shm_region_bytes = DEFAULT_SHM_REGION_BYTES;
    c
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `len` bytes of pinned memory at `addr` as a slice, as a program uses it.
#[allow(unsafe_code)]
fn pinned_slice<'a>(addr: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: `addr` came from `Session::pinned_alloc` of at least `len`
    // bytes, mapped in this process until freed; no copy into it is in
    // flight while the slice is used (each test synchronizes first).
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

/// Uploads `data` from pinned memory at `src` asynchronously and reads it
/// back asynchronously into pinned memory at `back`, then checks it.
fn async_round_trip(s: &Session, src: usize, back: usize, data: &[u8], stream: StreamId) {
    let n = data.len();
    s.pinned_write(src, data).expect("fill");
    s.pinned_write(back, &vec![0u8; n]).expect("clear");
    let dev = s.mem_alloc(n as u64).expect("alloc");
    s.memcpy_htod_pinned(dev, src, n, stream).expect("htod");
    s.memcpy_dtoh_pinned(back, n, dev, stream).expect("dtoh");
    s.stream_synchronize(stream).expect("sync");
    let mut got = vec![0u8; n];
    s.pinned_read(back, &mut got).expect("read back");
    assert!(got == data, "async round trip of {n} bytes through pinned memory differs");
    s.mem_free(dev).expect("free");
}

#[test]
fn pinned_copies_name_the_region_byte_for_byte() {
    let srv = TestServer::start(server_config()).expect("server");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    assert_eq!(s.shared_memory_bytes(), Some(0), "attached");
    let seed = fresh_seed();
    let stream = s.stream_create(0, 0).expect("stream");

    // Two small blocks share the first region; a whole region is the
    // second (its last byte is the region's last).
    let small = (1 << 20) + 3;
    let a = s.pinned_alloc(small).expect("pinned in a region");
    let b = s.pinned_alloc(small).expect("pinned in the same region");
    assert_eq!(a % 4096, 0, "page-aligned");
    let whole = s.pinned_alloc(REGION).expect("a region of its own");
    let m = srv.metrics.snapshot();
    assert_eq!((m.shm_registered, m.shm_regions), (2, 3), "two host regions registered, three mapped: {m:?}");

    for (i, stream) in [StreamId::DEFAULT, stream].into_iter().enumerate() {
        async_round_trip(&s, a, b, &random_bytes(small, seed + i as u64), stream);
    }
    async_round_trip(&s, whole, a, &random_bytes(small, seed + 3), stream);

    // The region's edges: its first and last bytes, and a span ending at
    // its end.
    let data = random_bytes(REGION, seed + 4);
    s.pinned_write(whole, &data).expect("fill");
    let dev = s.mem_alloc(REGION as u64).expect("alloc");
    for (offset, len) in [(0, 1), (REGION - 1, 1), (REGION - 4099, 4099), (0, REGION)] {
        s.memcpy_htod_pinned(dev + offset as u64, whole + offset, len, stream).expect("htod at the edge");
    }
    // Asynchronous: the source is read when the copies run.
    s.stream_synchronize(stream).expect("sync");
    s.pinned_write(whole, &vec![0u8; REGION]).expect("clear");
    s.memcpy_dtoh_pinned(whole + REGION - 1, 1, dev + REGION as u64 - 1, StreamId::DEFAULT).expect("last byte");
    s.memcpy_dtoh_pinned(whole, REGION - 1, dev, StreamId::DEFAULT).expect("the rest");
    s.synchronize().expect("sync");
    let mut got = vec![0u8; REGION];
    s.pinned_read(whole, &mut got).expect("read");
    assert!(got == data, "a whole region up and back differs");

    // The synchronous and unified entry points of a program (`cuMemcpy*`
    // from pinned memory): the region is named, the call waits.
    let n = small;
    let src = pinned_slice(a, n);
    let back = pinned_slice(b, n);
    let data = random_bytes(n, seed + 5);
    src.copy_from_slice(&data);
    back.fill(0);
    s.memcpy_htod(dev, src, StreamId::DEFAULT).expect("sync htod");
    src.fill(0xAA); // reused at once, as a synchronous copy allows
    s.memcpy_dtoh(back, dev, StreamId::DEFAULT).expect("sync dtoh");
    assert!(back == &data[..], "synchronous copies through pinned memory differ");
    s.memcpy_htod_async(dev, &pinned_slice(a, n)[..], stream).expect("async htod, slice");
    s.memcpy_dtoh_async(back, dev, stream).expect("async dtoh, slice");
    s.stream_synchronize(stream).expect("sync");
    assert!(back.iter().all(|&x| x == 0xAA), "async copies through slices of pinned memory");

    // None of it went through the bulk ring.
    assert_eq!(s.shared_memory_bytes(), Some(0), "no bytes through the bulk slots");
    assert_eq!(srv.metrics.snapshot().bulk_bytes_in, 0);

    // Freeing gives the blocks back; an emptied region is detached.
    assert!(s.pinned_free(whole).expect("free"));
    wait_until("the whole region is unregistered", || srv.metrics.snapshot().shm_registered == 1);
    assert!(!s.pinned_free(whole).expect("free again"), "no longer pinned");
    let again = s.pinned_alloc(small).expect("reuses the first region");
    assert_eq!(srv.metrics.snapshot().shm_registered, 1);
    for p in [a, b, again] {
        assert!(s.pinned_free(p).expect("free"));
    }
    wait_until("every host region is unregistered", || srv.metrics.snapshot().shm_registered == 0);
    s.mem_free(dev).expect("free");
    s.close().expect("close");
    wait_until("every region is unmapped", || srv.metrics.snapshot().shm_regions == 0);
    srv.stop();
}

/// Pinned memory is device memory at its host address, as under unified
/// addressing natively (XLA memsets and copies into it by that address):
/// its host region is mapped at the same address by the process serving
/// the session. In a worker process: memsets and device copies by the
/// pinned address land in the program's pages, a range past the region is
/// refused and the session goes on. A server in the client's own process
/// cannot map the region at the client's address (the client has it there):
/// the region is attached elsewhere, and using the pointer on the device is
/// refused, as without shared memory.
#[test]
fn pinned_memory_is_device_memory_at_its_host_address() {
    let srv = TestServer::start(isolated_config().expect("config")).expect("server");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    let stream = s.stream_create(0, 0).expect("stream");
    let n = (1 << 20) + 4;
    let p = s.pinned_alloc(n).expect("pinned");
    assert!(s.pinned_device_addressable(p, n), "the worker maps the region at the client's address");
    assert!(!s.pinned_device_addressable(p, REGION + 1), "past the region");
    let host = pinned_slice(p, n);
    host.fill(0);
    s.memset(p as u64, 0x5a6b_7c8d, 4, (n / 4) as u64, stream).expect("memset by the pinned address");
    s.memset(p as u64 + 1, 0x11, 1, 2, stream).expect("memset of bytes");
    s.stream_synchronize(stream).expect("sync");
    assert_eq!(&host[..8], &[0x8d, 0x11, 0x11, 0x5a, 0x8d, 0x7c, 0x6b, 0x5a], "memsets in the program's pages");
    assert!(host[8..].chunks(4).all(|w| w == [0x8d, 0x7c, 0x6b, 0x5a]), "every word set");

    let data = random_bytes(n, fresh_seed());
    let dev = s.mem_alloc(n as u64).expect("alloc");
    s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("upload");
    s.memcpy_dtod(p as u64, dev, n as u64, stream).expect("device copy into pinned memory");
    s.stream_synchronize(stream).expect("sync");
    assert!(host[..] == data[..], "a device copy into pinned memory differs");
    host.fill(0x3c);
    s.memcpy_dtod(dev, p as u64, n as u64, stream).expect("device copy out of pinned memory");
    let mut back = vec![0u8; n];
    s.memcpy_dtoh(&mut back, dev, stream).expect("download");
    assert!(back.iter().all(|&b| b == 0x3c), "a device copy out of pinned memory differs");

    // Past the region's end: refused, and the session goes on.
    let err = s.memset(p as u64 + REGION as u64 - 4, 0, 4, 2, stream).and_then(|()| s.stream_synchronize(stream));
    assert_eq!(err.expect_err("past the region").code(), cuda::INVALID_VALUE);
    gpupool_tests::round_trip(&s, 1 << 20, fresh_seed());
    assert!(s.pinned_free(p).expect("free"));
    s.mem_free(dev).expect("free");
    s.close().expect("close");

    // The server in this process: attached elsewhere, not device memory.
    let local = TestServer::start(server_config()).expect("server");
    let s = Session::connect(&shm_config(&local)).expect("session");
    let p = s.pinned_alloc(n).expect("pinned, in a region");
    assert_eq!(local.metrics.snapshot().shm_registered, 1, "still a host region: copies name it");
    assert!(!s.pinned_device_addressable(p, n), "not at the client's address in the server");
    let err = s.memset(p as u64, 0, 4, 1, StreamId::DEFAULT).and_then(|()| s.synchronize());
    assert_eq!(err.expect_err("not device memory").code(), cuda::INVALID_VALUE);
    gpupool_tests::round_trip(&s, 1 << 20, fresh_seed());
    s.close().expect("close");
    local.stop();
    srv.stop();
}

#[test]
fn ranges_outside_a_host_region_are_refused_and_the_session_goes_on() {
    let srv = TestServer::start(server_config()).expect("server");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    let p = s.pinned_alloc(4096).expect("pinned");
    let dev = s.mem_alloc(1 << 20).expect("alloc");
    // Region 1 is the session's first host region, REGION bytes long.
    let region = |offset: u64, size: u64| v1::HostRegionRef { region: 1, offset, size };
    let htod = |r: v1::HostRegionRef| {
        Op::MemcpyHtod(v1::MemcpyHtoD {
            dst: dev,
            source: Some(v1::memcpy_hto_d::Source::Region(r)),
            ..Default::default()
        })
    };
    let refused = |op: Op, why: &str| {
        let e = s.raw_call(op).expect_err(why);
        assert_eq!(e.code(), cuda::INVALID_VALUE, "{why}: {e}");
    };
    refused(htod(region(REGION as u64 - 1, 2)), "across the end");
    refused(htod(region(REGION as u64, 1)), "past the end");
    refused(htod(region(u64::MAX, 2)), "offset overflow");
    refused(htod(region(0, u64::MAX)), "length overflow");
    refused(htod(region(0, 0)), "empty");
    refused(htod(v1::HostRegionRef { region: 7, offset: 0, size: 1 }), "no such region");
    refused(htod(v1::HostRegionRef { region: 0, offset: 0, size: 1 }), "the bulk region is no host region");
    let dtoh =
        |r: v1::HostRegionRef, size| Op::MemcpyDtoh(v1::MemcpyDtoH { src: dev, size, stream: 0, into_region: Some(r) });
    refused(dtoh(region(0, 8), 4), "size and region length differ");
    refused(dtoh(region(REGION as u64 - 4, 8), 8), "into the region, across its end");
    // Device ranges are checked as for any copy.
    let past = Op::MemcpyHtod(v1::MemcpyHtoD {
        dst: 16,
        stream: 0,
        source: Some(v1::memcpy_hto_d::Source::Region(region(0, 4096))),
        asynchronous: true,
    });
    refused(past, "outside the session's device memory");

    // The session and the attachment are unharmed.
    let data = random_bytes(4096, fresh_seed());
    let back = s.pinned_alloc(4096).expect("pinned");
    s.pinned_write(p, &data).expect("fill");
    s.memcpy_htod_pinned(dev, p, 4096, StreamId::DEFAULT).expect("htod");
    s.memcpy_dtoh_pinned(back, 4096, dev, StreamId::DEFAULT).expect("dtoh");
    s.synchronize().expect("sync");
    let mut got = vec![0u8; 4096];
    s.pinned_read(back, &mut got).expect("read");
    assert_eq!(got, data);
    s.close().expect("close");
    wait_until("no region registered", || srv.metrics.snapshot().shm_registered == 0);
    srv.stop();
}

#[test]
fn pinned_memory_is_plain_memory_without_shared_memory_or_beyond_the_bound() {
    let srv = TestServer::start(server_config()).expect("server");
    let mut config = shm_config(&srv);
    config.shm_region_bytes = 0;
    let s = Session::connect(&config).expect("session");
    assert_eq!(s.pinned_alloc(4096), None, "no attachment: plain memory");
    s.close().expect("close");
    let mut config = shm_config(&srv);
    config.shm_pinned_bytes = 8 << 20;
    let s = Session::connect(&config).expect("session");
    let p = s.pinned_alloc(4 << 20).expect("within the bound");
    assert_eq!(s.pinned_alloc(8 << 20), None, "beyond the bound: plain memory");
    assert!(s.pinned_free(p).expect("free"));
    s.close().expect("close");
    srv.stop();
}

/// Set in the child process of the killed-client test: the server's
/// address and certificate fingerprint.
const PINNED_CHILD: &str = "GPUPOOL_TEST_PINNED_CHILD";

/// The killed client: pinned memory in a region, a copy, then it waits to
/// be killed.
#[test]
fn pinned_child() {
    let Ok(target) = std::env::var(PINNED_CHILD) else { return };
    let mut words = target.split_whitespace();
    let addr = words.next().and_then(|a| a.parse().ok()).expect("an address");
    let pin = words.next().expect("a fingerprint").to_owned();
    let mut config = ClientConfig::new(addr, gpupool_client::Trust::Fingerprint(pin), TOKEN);
    config.shm_region_bytes = DEFAULT_SHM_REGION_BYTES;
    let s = Session::connect(&config).expect("session");
    let p = s.pinned_alloc(1 << 20).expect("pinned");
    let dev = s.mem_alloc(1 << 20).expect("alloc");
    s.memcpy_htod_pinned(dev, p, 1 << 20, StreamId::DEFAULT).expect("htod");
    s.synchronize().expect("sync");
    println!("PINNED READY");
    std::thread::sleep(Duration::from_secs(600));
}

fn killed_client_leaves_nothing(srv: TestServer) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", "pinned_child", "--nocapture", "--test-threads", "1"])
        .env(PINNED_CHILD, format!("{} {}", srv.addr, srv.fingerprint))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the client process starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    loop {
        let line = lines.next().expect("the client says it is ready").expect("a line");
        if line.contains("PINNED READY") {
            break;
        }
    }
    wait_until("the host region is registered", || srv.metrics.snapshot().shm_registered == 1);
    child.kill().expect("SIGKILL the client");
    child.wait().expect("reaped");
    // The session may be kept for a resume; its regions go at once.
    wait_until("no region registered", || srv.metrics.snapshot().shm_registered == 0);
    wait_until("no region mapped", || srv.metrics.snapshot().shm_regions == 0);
    srv.stop();
}

#[test]
fn a_killed_client_leaves_no_region_mapped_or_registered() {
    killed_client_leaves_nothing(TestServer::start(server_config()).expect("server"));
}

#[test]
fn a_killed_client_of_a_worker_process_leaves_no_region_mapped_or_registered() {
    killed_client_leaves_nothing(TestServer::start(isolated_config().expect("worker command")).expect("server"));
}

/// A session on `srv` through shared memory (its commands in a command ring
/// when `ring`) with two blocks of `n` bytes of pinned memory, one round
/// trip through them done; and the seed it used.
fn pinned_session(srv: &TestServer, ring: bool, n: usize) -> (Session, usize, usize, u64) {
    let mut c = shm_config(srv);
    c.shm_commands = ring;
    let s = Session::connect(&c).expect("session");
    let (src, back) = (s.pinned_alloc(n).expect("pinned"), s.pinned_alloc(n).expect("pinned"));
    let seed = fresh_seed();
    async_round_trip(&s, src, back, &random_bytes(n, seed), StreamId::DEFAULT);
    (s, src, back, seed)
}

/// With its commands in a command ring, a session whose pinned memory is
/// in host regions moves: the source revokes the regions through the ring
/// (the client stops naming them and sends their bytes instead), runs
/// every batch that may still name one, then stops. A program copying
/// through its pinned memory the whole time sees every copy byte for byte,
/// before, during and after the move. In process and in a worker process.
#[test]
fn a_session_with_pinned_memory_moves_once_its_regions_are_revoked() {
    if std::env::var("GPUPOOL_TEST_DEVICE").as_deref() == Ok("cuda") {
        // Two servers on one GPU cannot both reserve the session's range:
        // the GPU suite covers migration.
        return;
    }
    let configs: [fn() -> gpupool_server::ServerConfig; 2] = [server_config, || isolated_config().expect("worker")];
    for config in configs {
        let (a, b) = (TestServer::start(config()).expect("a"), TestServer::start(config()).expect("b"));
        let n = (1 << 20) + 11;
        let (s, src, back, seed) = pinned_session(&a, true, n);
        assert!(s.shm_commands_attached(), "commands through a ring");
        // The program keeps copying through its pinned memory while it moves.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let program = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) || rounds < 3 {
                    async_round_trip(&s, src, back, &random_bytes(n, seed + 1 + rounds), StreamId::DEFAULT);
                    rounds += 1;
                }
                rounds
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let ids = a.migrator.sessions();
        let moved = rt.block_on(a.migrator.migrate(ids[0], b.migration_target(TOKEN))).expect("moved");
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, std::sync::atomic::Ordering::Release);
        let rounds = program.join().expect("the program's copies were all right");
        eprintln!("moved after its regions were revoked: pause {:?}; {rounds} round trips", moved.pause);
        // Pinned memory is plain memory with the new server (it maps none).
        async_round_trip(&s, src, back, &random_bytes(n, seed + 1000), StreamId::DEFAULT);
        assert_eq!(s.pinned_alloc(n), None, "no shared memory with the new server");
        assert_eq!(b.metrics.snapshot().shm_registered, 0);
        wait_until("the source let go of its regions", || a.metrics.snapshot().shm_registered == 0);
        assert!(s.pinned_free(src).expect("free") && s.pinned_free(back).expect("free"));
        s.close().expect("close");
        a.stop();
        b.stop();
    }
}

/// A move that fails after the source revoked the regions and stopped (the
/// target refuses the session): the session goes on at the source, and its
/// copies through pinned memory stay right (their bytes travel: the
/// regions are not named again).
#[test]
fn a_session_with_pinned_memory_goes_on_when_its_move_fails_after_the_stop() {
    if std::env::var("GPUPOOL_TEST_DEVICE").as_deref() == Ok("cuda") {
        return;
    }
    let (a, b) = (TestServer::start(server_config()).expect("a"), TestServer::start(server_config()).expect("b"));
    let n = (1 << 20) + 11;
    let (s, src, back, seed) = pinned_session(&a, true, n);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let ids = a.migrator.sessions();
    let refused = rt.block_on(a.migrator.migrate(ids[0], b.migration_target("not-a-token"))).expect_err("refused");
    assert!(refused.to_string().contains("refused"), "{refused}");
    for i in 1..4 {
        async_round_trip(&s, src, back, &random_bytes(n, seed + i), StreamId::DEFAULT);
    }
    assert_eq!(a.migrator.sessions().len(), 1, "still on the source");
    assert!(s.pinned_free(src).expect("free") && s.pinned_free(back).expect("free"));
    s.close().expect("close");
    a.stop();
    b.stop();
}

/// Without a command ring the regions cannot be revoked: a session holding
/// pinned memory in them is not moved (refused cleanly, before it stops),
/// and once the program freed it, it moves.
#[test]
fn a_session_with_pinned_memory_and_no_ring_is_not_moved_until_it_frees_it() {
    if std::env::var("GPUPOOL_TEST_DEVICE").as_deref() == Ok("cuda") {
        return;
    }
    let (a, b) = (TestServer::start(server_config()).expect("a"), TestServer::start(server_config()).expect("b"));
    let n = (3 << 20) + 11;
    let (s, src, back, seed) = pinned_session(&a, false, n);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let ids = a.migrator.sessions();
    let refused = rt.block_on(a.migrator.migrate(ids[0], b.migration_target(TOKEN))).expect_err("refused");
    assert!(refused.to_string().contains("host region"), "{refused}");

    // Refused cleanly: the session goes on where it was, through its region.
    async_round_trip(&s, src, back, &random_bytes(n, seed + 1), StreamId::DEFAULT);
    assert_eq!(a.metrics.snapshot().shm_registered, 1);

    // Once the program freed its pinned memory the session moves, and
    // pinned memory is plain memory there (the new server maps none).
    assert!(s.pinned_free(src).expect("free") && s.pinned_free(back).expect("free"));
    wait_until("the region is detached", || a.metrics.snapshot().shm_registered == 0);
    rt.block_on(a.migrator.migrate(ids[0], b.migration_target(TOKEN))).expect("moved");
    let data = random_bytes(n, seed + 2);
    let dev = s.mem_alloc(n as u64).expect("alloc");
    s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod after the move");
    assert_eq!(s.pinned_alloc(n), None, "no shared memory with the new server");
    let mut got = vec![0u8; n];
    s.memcpy_dtoh(&mut got, dev, StreamId::DEFAULT).expect("dtoh");
    assert!(got == data, "copies after the move");
    assert_eq!(b.metrics.snapshot().shm_registered, 0);
    s.close().expect("close");
    a.stop();
    b.stop();
}

mod hostile {
    use super::*;
    use gpupool_shm::channel;
    use gpupool_shm::region::Region;
    use gpupool_shm::wire::{Attach, MAX_REGION_BYTES, Op, REPLY_LEN, Reply, Request, SECRET_LEN};
    use std::os::unix::net::UnixStream;

    fn reply(stream: &UnixStream) -> Option<Reply> {
        let b = channel::read_message::<REPLY_LEN>(stream).ok()??;
        Reply::decode(&b).ok()
    }

    /// A raw attachment to a session opened without shared memory.
    fn attached(srv: &TestServer) -> (Session, UnixStream, Region) {
        let mut config = srv.client_config();
        config.shm_region_bytes = 0;
        let s = Session::connect(&config).expect("session");
        let w: &v1::Welcome = s.welcome();
        let secret: [u8; SECRET_LEN] = hex::decode(&w.shm_secret).expect("hex").try_into().expect("32 bytes");
        let bulk = Region::create("gpupool-shm-test", 1 << 20).expect("region");
        let stream = UnixStream::connect(&w.shm_socket).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let attach = Attach { session_id: w.session_id, region_len: 1 << 20, secret };
        channel::send_with_fd(&stream, &attach.encode(), bulk.fd()).expect("send");
        assert_eq!(reply(&stream).expect("answer"), Reply::ok(0));
        (s, stream, bulk)
    }

    fn add(seq: u64, id: u32, len: u64) -> [u8; 64] {
        Request::region(seq, Op::AddRegion { id, len, at: 0 }).encode()
    }

    #[test]
    fn hostile_region_requests_get_errors_and_the_server_goes_on() {
        let srv = TestServer::start(server_config()).expect("server");
        let (s, stream, _bulk) = attached(&srv);
        let host = Region::create("gpupool-host-test", 1 << 20).expect("host region");

        // Refused additions: the reply says why; the attachment goes on.
        channel::send_with_fd(&stream, &add(1, 1, 2 << 20), host.fd()).expect("send");
        let r = reply(&stream).expect("reply");
        assert!(r.seq == 1 && r.code == cuda::INVALID_VALUE && r.message.contains("holds"), "size: {r:?}");
        let unsealed = rustix::fs::memfd_create("gpupool-host-test", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
        rustix::fs::ftruncate(&unsealed, 1 << 20).expect("size");
        channel::send_with_fd(&stream, &add(2, 1, 1 << 20), std::os::fd::AsFd::as_fd(&unsealed)).expect("send");
        let r = reply(&stream).expect("reply");
        assert!(r.seq == 2 && r.code != 0 && r.message.contains("sealed"), "unsealed: {r:?}");
        channel::send_with_fd(&stream, &add(3, 1, 1 << 20), host.fd()).expect("send");
        assert_eq!(reply(&stream).expect("reply"), Reply::ok(3), "a good one");
        channel::send_with_fd(&stream, &add(4, 1, 1 << 20), host.fd()).expect("send");
        let r = reply(&stream).expect("reply");
        assert!(r.seq == 4 && r.code != 0 && r.message.contains("already"), "same id: {r:?}");
        assert_eq!(srv.metrics.snapshot().shm_registered, 1);
        channel::write_message(&stream, &Request::region(5, Op::RemoveRegion { id: 9 }).encode()).expect("send");
        let r = reply(&stream).expect("reply");
        assert!(r.seq == 5 && r.code != 0, "no such region: {r:?}");

        // At the client's address: refused where this process (the
        // server's) has a mapping there already, or where the address is
        // not page aligned; the attachment goes on.
        let at = |seq, id, at: u64| Request::region(seq, Op::AddRegion { id, len: 1 << 20, at }).encode();
        channel::send_with_fd(&stream, &at(6, 2, host.as_ptr() as u64), host.fd()).expect("send");
        let r = reply(&stream).expect("reply");
        assert!(r.seq == 6 && r.code == gpupool_shm::wire::ADDRESS_IN_USE, "an address in use: {r:?}");
        channel::send_with_fd(&stream, &at(7, 2, 0x1000_0000_0001), host.fd()).expect("send");
        let r = reply(&stream).expect("reply");
        assert!(r.seq == 7 && r.code == cuda::INVALID_VALUE && r.message.contains("aligned"), "unaligned: {r:?}");
        let free = gpupool_shm::region::pick_address(1 << 20) as u64;
        channel::send_with_fd(&stream, &at(8, 2, free), host.fd()).expect("send");
        assert_eq!(reply(&stream).expect("reply"), Reply::ok(8), "a free address");
        assert_eq!(srv.metrics.snapshot().shm_registered, 2);

        // Breaking the protocol ends the attachment, and its regions go.
        channel::write_message(&stream, &add(9, 3, 1 << 20)).expect("an addition without a descriptor");
        let r = reply(&stream).expect("an error reply");
        assert!(r.code != 0 && r.message.contains("descriptor"), "{r:?}");
        assert!(reply(&stream).is_none(), "the attachment ended");
        wait_until("the host region is gone", || srv.metrics.snapshot().shm_registered == 0);

        let (s2, stream, _bulk) = attached(&srv);
        let get = Request { seq: 1, op: Op::Get, transfer: 1, offset: 0, region_offset: 0, len: 16 };
        channel::send_with_fd(&stream, &get.encode(), host.fd()).expect("a get with a descriptor");
        let r = reply(&stream).expect("an error reply");
        assert!(r.code != 0 && r.message.contains("descriptor"), "{r:?}");
        let (s3, stream, _bulk) = attached(&srv);
        let mut too_big = add(1, 1, 1 << 20);
        too_big[48..56].copy_from_slice(&(MAX_REGION_BYTES + 1).to_le_bytes());
        channel::send_with_fd(&stream, &too_big, host.fd()).expect("send");
        let r = reply(&stream).expect("an error reply");
        assert!(r.code != 0 && r.message.contains("outside"), "{r:?}");

        // The server and its sessions are unharmed.
        for s in [s, s2, s3] {
            gpupool_tests::round_trip(&s, 3 << 20, fresh_seed());
            s.close().expect("close");
        }
        wait_until("nothing mapped", || srv.metrics.snapshot().shm_regions == 0);
        srv.stop();
    }
}
