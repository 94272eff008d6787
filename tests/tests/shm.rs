//! Shared memory for clients on the server's host (issue 18, item 3): bulk
//! copies through a sealed memfd region that the process serving the
//! session maps, the fallback to QUIC, hostile attachments and requests,
//! and the region's end with its session. Emulated device unless
//! `GPUPOOL_TEST_DEVICE=cuda`.

use gpupool_client::{ClientConfig, DEFAULT_SHM_REGION_BYTES, Session};
use gpupool_proto::{cuda, v1};
use gpupool_shm::channel;
use gpupool_shm::region::Region;
use gpupool_shm::wire::{Attach, MESSAGE_LEN, Op, REPLY_LEN, Reply, Request, SECRET_LEN};
use gpupool_tests::{TestServer, fresh_seed, isolated_config, round_trip, server_config};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Copy sizes: inline copies (up to 512 KiB) never reach the bulk path;
/// these do, in one slot, across slots, and across the whole ring.
const SIZES: [usize; 4] = [(1 << 20) + 3, (4 << 20) + 1, (9 << 20) + 7, 64 << 20];

fn shm_config(srv: &TestServer) -> ClientConfig {
    let mut c = srv.client_config();
    c.shm_region_bytes = DEFAULT_SHM_REGION_BYTES;
    c
}

/// Copies every size up and back and checks the bytes; returns the bytes
/// copied each way.
fn round_trips(s: &Session) -> u64 {
    for (i, &n) in SIZES.iter().enumerate() {
        round_trip(s, n, fresh_seed() + i as u64);
    }
    SIZES.iter().sum::<usize>() as u64
}

/// Mappings of memfds named `name` in process `pid`'s address space.
fn mappings(pid: &str, name: &str) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let needle = format!("/memfd:{name} ");
    maps.lines().filter(|l| l.contains(&needle) || l.ends_with(&format!("/memfd:{name}"))).count()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn copies_of_several_sizes_go_through_shared_memory() {
    // Pageable copies go through a pinned bounce buffer in a host region
    // the server registered: its DMA reads and writes the shared pages.
    let srv = TestServer::start(server_config()).expect("server");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    assert!(!s.welcome().shm_socket.is_empty(), "the server offers shared memory");
    assert_eq!(s.shared_memory_bytes(), Some(0), "attached, nothing copied yet");
    let total = round_trips(&s);
    assert_eq!(s.shared_memory_bytes(), Some(2 * total), "every bulk copy went through shared memory");
    let m = srv.metrics.snapshot();
    assert_eq!((m.shm_bytes, m.bulk_bytes_in, m.bulk_bytes_out), (0, 0, 0), "nothing through the slots: {m:?}");
    assert_eq!((m.shm_regions, m.shm_registered), (2, 1), "the bulk region and the bounce buffer's: {m:?}");
    s.close().expect("close");
    wait_until("the server unmapped the regions", || srv.metrics.snapshot().shm_regions == 0);
    srv.stop();

    // Without room for pinned memory, through the bulk region's slots.
    let srv = TestServer::start(server_config()).expect("server");
    let mut config = shm_config(&srv);
    config.shm_pinned_bytes = 0;
    let s = Session::connect(&config).expect("session");
    let total = round_trips(&s);
    assert_eq!(s.shared_memory_bytes(), Some(2 * total), "every bulk copy went through the region");
    let m = srv.metrics.snapshot();
    assert_eq!(m.shm_bytes, 2 * total, "{m:?}");
    assert_eq!(m.shm_regions, 1);
    s.close().expect("close");
    wait_until("the server unmapped the region", || srv.metrics.snapshot().shm_regions == 0);
    srv.stop();
}

#[test]
fn a_worker_process_maps_the_region() {
    let srv = TestServer::start(isolated_config().expect("worker command")).expect("server");
    // Through the slots (no pinned bounce buffer), so the server counts
    // the bytes.
    let mut config = shm_config(&srv);
    config.shm_pinned_bytes = 0;
    let s = Session::connect(&config).expect("session");
    assert!(s.shared_memory_bytes().is_some(), "attached to the worker");
    let total = round_trips(&s);
    assert_eq!(s.shared_memory_bytes(), Some(2 * total));
    let worker = srv.workers().into_iter().find(|w| w.session.is_some()).expect("a busy worker");
    // The worker serves this session only: its one mapping is this region.
    assert_eq!(mappings(&worker.pid.to_string(), "gpupool-shm"), 1, "the worker maps the region");
    wait_until("the supervisor relayed the worker's counters", || srv.metrics.snapshot().shm_bytes == 2 * total);
    let socket = s.welcome().shm_socket.clone();
    assert!(socket.contains(&format!("gpupool-{}-", worker.pid)), "the worker's own socket: {socket}");
    let pids: Vec<u32> = srv.workers().iter().map(|w| w.pid).collect();
    s.close().expect("close");
    srv.stop();
    // Warm workers are killed at the stop and cannot remove their files:
    // the supervisor does.
    let dir = std::path::Path::new(&socket).parent().expect("a directory");
    let left: Vec<String> = std::fs::read_dir(dir)
        .expect("directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| pids.iter().any(|p| name.starts_with(&format!("gpupool-{p}-"))))
        .collect();
    assert!(left.is_empty(), "socket files left behind: {left:?}");
}

#[test]
fn copies_use_quic_when_shared_memory_is_off_on_either_side() {
    // The client turns it off.
    let srv = TestServer::start(server_config()).expect("server");
    let mut config = shm_config(&srv);
    config.shm_region_bytes = 0;
    let s = Session::connect(&config).expect("session");
    assert_eq!(s.shared_memory_bytes(), None);
    round_trips(&s);
    s.close().expect("close");
    assert_eq!(srv.metrics.snapshot().shm_bytes, 0);
    srv.stop();
    // The server offers none.
    let mut config = server_config();
    config.shm_dir = None;
    let srv = TestServer::start(config).expect("server");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    assert!(s.welcome().shm_socket.is_empty() && s.welcome().shm_secret.is_empty());
    assert_eq!(s.shared_memory_bytes(), None);
    round_trips(&s);
    s.close().expect("close");
    srv.stop();
}

#[test]
fn an_unreachable_socket_falls_back_to_quic() {
    // As for a client on another host: the path is not there.
    let mut config = server_config();
    let dir = std::env::temp_dir().join(format!("gpupool-shm-test-{}", fresh_seed()));
    std::fs::create_dir_all(&dir).expect("dir");
    config.shm_dir = Some(dir.clone());
    let srv = TestServer::start(config).expect("server");
    std::fs::remove_dir_all(&dir).expect("socket removed");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    assert!(!s.welcome().shm_socket.is_empty());
    assert_eq!(s.shared_memory_bytes(), None, "not attached");
    round_trips(&s);
    s.close().expect("close");
    srv.stop();
}

/// A session whose client did not attach: its welcome's offer, for a
/// hand-made attachment.
fn offer(srv: &TestServer) -> (Session, String, [u8; SECRET_LEN]) {
    let mut config = srv.client_config();
    config.shm_region_bytes = 0;
    let s = Session::connect(&config).expect("session");
    let w: &v1::Welcome = s.welcome();
    let secret: [u8; SECRET_LEN] = hex::decode(&w.shm_secret).expect("hex").try_into().expect("32 bytes");
    let socket = w.shm_socket.clone();
    (s, socket, secret)
}

fn reply(stream: &UnixStream) -> Option<Reply> {
    let b = channel::read_message::<REPLY_LEN>(stream).ok()??;
    Reply::decode(&b).ok()
}

/// Sends `message` with `fd` and returns the server's answer.
fn attach_raw(socket: &str, message: &[u8; MESSAGE_LEN], fd: Option<&Region>) -> (UnixStream, Reply) {
    let stream = UnixStream::connect(socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    match fd {
        Some(region) => channel::send_with_fd(&stream, message, region.fd()).expect("send"),
        None => channel::write_message(&stream, message).expect("send"),
    }
    let r = reply(&stream).expect("an answer");
    (stream, r)
}

fn attached(socket: &str, session_id: u64, secret: [u8; SECRET_LEN], region: &Region) -> UnixStream {
    let a = Attach { session_id, region_len: region.len() as u64, secret };
    let (stream, r) = attach_raw(socket, &a.encode(), Some(region));
    assert_eq!(r, Reply::ok(0), "a valid attachment is taken");
    stream
}

#[test]
fn hostile_attachments_and_requests_get_errors_and_the_server_goes_on() {
    let srv = TestServer::start(server_config()).expect("server");
    let (s, socket, secret) = offer(&srv);
    let id = s.welcome().session_id;
    let region = Region::create("gpupool-shm-test", 1 << 20).expect("region");
    let attach = |secret, len| Attach { session_id: id, region_len: len, secret }.encode();

    // Refused attachments: each gets an error reply.
    let (_, r) = attach_raw(&socket, &attach([0; SECRET_LEN], 1 << 20), Some(&region));
    assert_eq!(r.code, cuda::NOT_PERMITTED, "wrong secret: {r:?}");
    let (_, r) = attach_raw(&socket, &attach(secret, 1 << 20), None);
    assert!(r.code != 0 && r.message.contains("no file descriptor"), "{r:?}");
    let (_, r) = attach_raw(&socket, &attach(secret, 2 << 20), Some(&region));
    assert!(r.code != 0 && r.message.contains("holds"), "size larger than the memfd: {r:?}");
    let (_, r) = attach_raw(&socket, &attach(secret, 1 << 40), Some(&region));
    assert!(r.code != 0 && r.message.contains("outside"), "region over the bound: {r:?}");
    let mut garbage = attach(secret, 1 << 20);
    garbage[3] ^= 0xff;
    let (_, r) = attach_raw(&socket, &garbage, Some(&region));
    assert!(r.code != 0 && r.message.contains("magic"), "{r:?}");
    // A memfd the client could shrink under the server's mapping.
    let unsealed = rustix::fs::memfd_create("gpupool-shm-test", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&unsealed, 1 << 20).expect("size");
    let stream = UnixStream::connect(&socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    channel::send_with_fd(&stream, &attach(secret, 1 << 20), std::os::fd::AsFd::as_fd(&unsealed)).expect("send");
    let r = reply(&stream).expect("answer");
    assert!(r.code != 0 && r.message.contains("sealed"), "{r:?}");

    // Requests that break the protocol end the attachment with an error.
    let get =
        |seq, region_offset, len| Request { seq, op: Op::Get, transfer: 1, offset: 0, region_offset, len }.encode();
    let hostile: [(&str, [u8; MESSAGE_LEN]); 5] = [
        ("outside", get(1, (1 << 20) - 10, 4096)),
        ("outside", get(1, u64::MAX - 1, 16)),
        ("chunk of", get(1, 0, 1 << 30)),
        ("out of order", get(7, 0, 4096)),
        ("unknown request operation", {
            let mut b = get(1, 0, 16);
            b[0] = 77;
            b
        }),
    ];
    for (why, message) in hostile {
        let stream = attached(&socket, id, secret, &region);
        channel::write_message(&stream, &message).expect("request");
        let r = reply(&stream).expect("an error reply");
        assert!(r.code != 0 && r.message.contains(why), "{why}: {r:?}");
        assert!(reply(&stream).is_none(), "{why}: the attachment ended");
    }

    // Requests the session refuses get their error; the attachment goes on.
    let stream = attached(&socket, id, secret, &region);
    channel::write_message(&stream, &get(1, 0, 4096)).expect("request");
    let r = reply(&stream).expect("reply");
    assert_eq!((r.seq, r.code), (1, cuda::INVALID_HANDLE), "no such staged download: {r:?}");
    let put = Request { seq: 2, op: Op::Put { total: 1 << 40 }, transfer: 5, offset: 0, region_offset: 0, len: 4096 };
    channel::write_message(&stream, &put.encode()).expect("request");
    let r = reply(&stream).expect("reply");
    assert_eq!((r.seq, r.code), (2, cuda::OUT_OF_MEMORY), "over the staging limit: {r:?}");
    drop(stream);

    // The session and the server are unharmed.
    round_trip(&s, 3 << 20, fresh_seed());
    s.close().expect("close");
    wait_until("every region was unmapped", || srv.metrics.snapshot().shm_regions == 0);
    let other = Session::connect(&shm_config(&srv)).expect("a new session");
    round_trips(&other);
    other.close().expect("close");
    srv.stop();
}

#[test]
fn the_region_is_unmapped_when_its_session_ends() {
    let srv = TestServer::start(server_config()).expect("server");
    let (s, socket, secret) = offer(&srv);
    let region = Region::create("gpupool-shm-ends", 1 << 20).expect("region");
    let stream = attached(&socket, s.welcome().session_id, secret, &region);
    wait_until("the server mapped it", || mappings("self", "gpupool-shm-ends") == 2);
    assert_eq!(srv.metrics.snapshot().shm_regions, 1);
    // The client's socket stays open: the session's end alone unmaps it.
    s.close().expect("close");
    wait_until("the server unmapped it", || mappings("self", "gpupool-shm-ends") == 1);
    assert_eq!(srv.metrics.snapshot().shm_regions, 0);
    assert!(reply(&stream).is_none(), "the server ended the socket");
    srv.stop();
}

#[test]
fn a_client_that_exits_mid_copy_leaves_no_region_mapped() {
    let srv = TestServer::start(isolated_config().expect("worker command")).expect("server");
    let (s, socket, secret) = offer(&srv);
    let worker = srv.workers().into_iter().find(|w| w.session.is_some()).expect("a busy worker");
    let region = Region::create("gpupool-shm-exit", 4 << 20).expect("region");
    let stream = attached(&socket, s.welcome().session_id, secret, &region);
    let pid = worker.pid.to_string();
    assert_eq!(mappings(&pid, "gpupool-shm-exit"), 1, "the worker maps it");
    // Half of an upload's chunks, then the client is gone (socket, region
    // and QUIC connection together, as at a process exit).
    let put =
        Request { seq: 1, op: Op::Put { total: 8 << 20 }, transfer: 9, offset: 0, region_offset: 0, len: 4 << 20 };
    channel::write_message(&stream, &put.encode()).expect("request");
    drop((stream, region));
    drop(s);
    wait_until("the worker exited or unmapped the region", || mappings(&pid, "gpupool-shm-exit") == 0);
    srv.stop();
}

#[test]
fn a_resumed_session_keeps_copying_through_shared_memory() {
    // QUIC through a relay that drops everything for a while: both ends
    // reach their idle timeout and the client reattaches; the region and
    // its socket do not depend on the QUIC connection.
    let srv = TestServer::start(gpupool_tests::short_idle_config(Duration::from_secs(20))).expect("server");
    let relay = gpupool_tests::relay::Relay::start(srv.addr);
    let s = Session::connect(&gpupool_tests::through_relay(shm_config(&srv), relay.addr)).expect("session");
    let n = (3 << 20) + 5;
    round_trip(&s, n, fresh_seed());
    let before = s.shared_memory_bytes().expect("attached");
    assert_eq!(before, 2 * n as u64);

    relay.pause(true);
    std::thread::sleep(Duration::from_millis(2500));
    relay.pause(false);

    round_trip(&s, n, fresh_seed() + 1);
    assert_eq!(s.shared_memory_bytes(), Some(before + 2 * n as u64), "after the resume, still through the region");
    let m = srv.metrics.snapshot();
    // The bulk region and the bounce buffer's host region, both kept.
    assert_eq!((m.sessions_opened, m.shm_regions), (1, 2), "one session, resumed, its regions: {m:?}");
    s.close().expect("close");
    srv.stop();
}
