//! Commands through shared memory (issue 18, item 3): a client on the
//! server's host sends its batches and takes its replies through a command
//! ring in a memfd of its own; the settings that keep them on QUIC; a
//! hostile ring; and the fall back to QUIC of a session that resumes.
//! Emulated device unless `GPUPOOL_TEST_DEVICE=cuda`. (With
//! `GPUPOOL_TEST_TRANSPORT=shm` the other end-to-end tests run over the
//! ring too; `.ci/run` does.)

use gpupool_client::{ClientConfig, DEFAULT_SHM_REGION_BYTES, LaunchConfig, Session, StreamId};
use gpupool_proto::{BUILTIN_MODULE, v1};
use gpupool_shm::channel;
use gpupool_shm::region::Region;
use gpupool_shm::ring::{Ring, Side};
use gpupool_shm::wire::{Attach, Op, REPLY_LEN, Reply, Request, SECRET_LEN};
use gpupool_tests::{TestServer, fresh_seed, isolated_config, round_trip, server_config};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn shm_config(srv: &TestServer) -> ClientConfig {
    let mut c = srv.client_config();
    c.shm_region_bytes = DEFAULT_SHM_REGION_BYTES;
    c.shm_commands = true;
    c
}

/// `n` empty launches, each followed by a synchronize: one batch and one
/// reply each.
fn launches_and_syncs(s: &Session, n: usize) {
    let m = s.module_load(BUILTIN_MODULE).expect("module");
    let empty = m.function("empty").expect("empty");
    let cfg = LaunchConfig::for_elements(1, 1);
    for _ in 0..n {
        s.launch(&empty, cfg, StreamId::DEFAULT, &[]).expect("launch");
        s.stream_synchronize(StreamId::DEFAULT).expect("synchronize");
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn commands_go_through_a_ring_in_shared_memory() {
    let srv = TestServer::start(server_config()).expect("server");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    assert!(s.welcome().shm_commands, "the server offers a command ring");
    assert!(s.shm_commands_attached(), "the commands go through shared memory");
    launches_and_syncs(&s, 200);
    // Replies that carry bytes (an inline copy back) and bulk copies beside.
    round_trip(&s, 300_000, fresh_seed());
    round_trip(&s, (3 << 20) + 5, fresh_seed() + 1);
    assert!(s.shm_commands_attached(), "still on the ring");
    let m = srv.metrics.snapshot();
    assert_eq!(m.shm_command_rings, 1, "{m:?}");
    assert!(m.shm_command_frames >= 200, "every batch came through the ring: {m:?}");
    assert_eq!((m.sessions_opened, m.resumptions), (1, 0), "{m:?}");
    s.close().expect("close");
    srv.stop();
}

/// The server's reader and writer spinning for their next frame
/// (`--io-spin-us`), in the server's process and in a worker: the same
/// batches and replies, in order, through the ring.
#[test]
fn commands_go_through_the_ring_with_the_server_spinning() {
    for (mut config, in_process) in [(server_config(), true), (isolated_config().expect("worker config"), false)] {
        config.io_spin = Duration::from_micros(200);
        let srv = TestServer::start(config).expect("server");
        let s = Session::connect(&shm_config(&srv)).expect("session");
        assert!(s.shm_commands_attached(), "the commands go through shared memory");
        launches_and_syncs(&s, 100);
        round_trip(&s, 300_000, fresh_seed());
        assert!(s.shm_commands_attached(), "still on the ring");
        // A worker process relays its ring's counts to the server's.
        let what = format!("the ring's frames counted by the server (in process: {in_process})");
        wait_until(&what, || srv.metrics.snapshot().shm_command_frames >= 100);
        assert_eq!(srv.metrics.snapshot().shm_command_rings, 1, "in process: {in_process}");
        s.close().expect("close");
        srv.stop();
    }
}

#[test]
fn the_settings_keep_the_commands_on_quic() {
    let srv = TestServer::start(server_config()).expect("server");
    // GPUPOOL_SHM_COMMANDS=off: copies through memory, commands on QUIC.
    let mut config = shm_config(&srv);
    config.shm_commands = false;
    let s = Session::connect(&config).expect("session");
    assert!(s.shared_memory_bytes().is_some(), "copies still through shared memory");
    assert!(!s.shm_commands_attached());
    launches_and_syncs(&s, 20);
    round_trip(&s, (1 << 20) + 3, fresh_seed());
    s.close().expect("close");
    // GPUPOOL_SHM=off: no shared memory at all.
    let mut config = shm_config(&srv);
    config.shm_region_bytes = 0;
    let s = Session::connect(&config).expect("session");
    assert!(s.shared_memory_bytes().is_none() && !s.shm_commands_attached());
    launches_and_syncs(&s, 20);
    s.close().expect("close");
    let m = srv.metrics.snapshot();
    assert_eq!((m.shm_command_rings, m.shm_command_frames), (0, 0), "{m:?}");
    srv.stop();
    // A server without shared memory offers no ring.
    let mut config = server_config();
    config.shm_dir = None;
    let srv = TestServer::start(config).expect("server");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    assert!(!s.welcome().shm_commands && !s.shm_commands_attached());
    launches_and_syncs(&s, 5);
    s.close().expect("close");
    srv.stop();
}

#[test]
fn a_worker_process_takes_the_commands_through_shared_memory() {
    let srv = TestServer::start(isolated_config().expect("worker command")).expect("server");
    let s = Session::connect(&shm_config(&srv)).expect("session");
    assert!(s.shm_commands_attached(), "attached to the worker's ring");
    launches_and_syncs(&s, 100);
    round_trip(&s, (1 << 20) + 3, fresh_seed());
    assert!(s.shm_commands_attached());
    s.close().expect("close");
    srv.stop();
}

fn reply(stream: &UnixStream) -> Reply {
    let b = channel::read_message::<REPLY_LEN>(stream).expect("read").expect("an answer");
    Reply::decode(&b).expect("a reply")
}

#[test]
fn a_hostile_ring_ends_in_a_resume_on_quic_and_the_server_goes_on() {
    let srv = TestServer::start(server_config()).expect("server");
    // A session whose client takes no shared memory: its offer is used by
    // hand, before its first batch.
    let mut config = srv.client_config();
    config.shm_region_bytes = 0;
    let s = Session::connect(&config).expect("session");
    let w: &v1::Welcome = s.welcome();
    assert!(w.shm_commands);
    let secret: [u8; SECRET_LEN] = hex::decode(&w.shm_secret).expect("hex").try_into().expect("32 bytes");
    let stream = UnixStream::connect(&w.shm_socket).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let region = Region::create("gpupool-test", 1 << 20).expect("region");
    let attach = Attach { session_id: w.session_id, region_len: 1 << 20, secret };
    channel::send_with_fd(&stream, &attach.encode(), region.fd()).expect("attach");
    assert_eq!(reply(&stream), Reply::ok(0));
    // A ring of the wrong length is refused; the attachment goes on.
    let ring = Ring::create(4096).expect("ring");
    let wrong = Region::create("gpupool-test", 8192).expect("region");
    let mut bad = Request::region(1, Op::Commands { len: ring.len() }).encode();
    channel::send_with_fd(&stream, &bad, wrong.fd()).expect("send");
    assert_ne!(reply(&stream).code, 0, "a memfd that is not the announced ring");
    // The ring is taken; the frame in it claims 4 GiB.
    bad = Request::region(2, Op::Commands { len: ring.len() }).encode();
    channel::send_with_fd(&stream, &bad, ring.fd()).expect("send");
    assert_eq!(reply(&stream), Reply::ok(2), "the session waited for a ring");
    // A second one is not.
    let again = Ring::create(4096).expect("ring");
    channel::send_with_fd(&stream, &Request::region(3, Op::Commands { len: again.len() }).encode(), again.fd())
        .expect("send");
    assert_ne!(reply(&stream).code, 0, "one ring per session");
    let mut writer = ring.writer(Side::Client);
    writer.try_write(&u32::MAX.to_le_bytes()).expect("write");
    wait_until("the server gave the ring up", || ring.closed(Side::Server).is_some());
    // The real client was told to resume ("here"), and goes on over QUIC.
    launches_and_syncs(&s, 10);
    let m = srv.metrics.snapshot();
    assert_eq!((m.sessions_opened, m.shm_command_rings, m.resumptions), (1, 1, 1), "{m:?}");
    s.close().expect("close");
    // Another session is served as before.
    let s = Session::connect(&shm_config(&srv)).expect("session");
    assert!(s.shm_commands_attached());
    launches_and_syncs(&s, 10);
    s.close().expect("close");
    srv.stop();
}

#[test]
fn a_resumed_session_goes_on_over_quic() {
    // QUIC through a relay that drops everything for a while: both ends
    // reach their idle timeout and the client reattaches (on QUIC); the
    // batches and replies on their way are neither lost nor repeated.
    let srv = TestServer::start(gpupool_tests::short_idle_config(Duration::from_secs(20))).expect("server");
    let relay = gpupool_tests::relay::Relay::start(srv.addr);
    let s = Session::connect(&gpupool_tests::through_relay(shm_config(&srv), relay.addr)).expect("session");
    launches_and_syncs(&s, 20);
    assert!(s.shm_commands_attached());

    relay.pause(true);
    std::thread::sleep(Duration::from_millis(2500));
    relay.pause(false);

    launches_and_syncs(&s, 20);
    round_trip(&s, 300_000, fresh_seed());
    assert!(!s.shm_commands_attached(), "a resumed session stays on QUIC");
    assert!(s.shared_memory_bytes().is_some(), "its copies still go through shared memory");
    let m = srv.metrics.snapshot();
    assert_eq!((m.sessions_opened, m.resumptions), (1, 1), "one session, resumed once: {m:?}");
    s.close().expect("close");
    srv.stop();
}
