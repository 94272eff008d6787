//! RDMA end to end (issue 22, `docs/rdma.md`), over the in-memory fabric
//! (`gpupool_rdma::mem`: RC semantics in one process; no machine here has
//! an RDMA device): the real server's session code and the real client,
//! the emulated device. A session whose commands and copies go over
//! "RDMA", byte for byte both ways; the fallbacks that keep a session on
//! QUIC; a lost or silent RDMA connection, after which the session resumes
//! on QUIC; hostile RDMA peers.

use gpupool_client::{ClientConfig, DeviceBuffer, KernelArg, LaunchConfig, Session, StreamId};
use gpupool_proto::rdma::{CORE_VERSION, Config, Event, RemoteRegion, Role};
use gpupool_proto::{BUILTIN_MODULE, v1};
use gpupool_rdma::mem::{MemFabric, Side};
use gpupool_rdma::{Endpoint, Regions};
use gpupool_server::{RdmaMode, ServerConfig};
use gpupool_tests::raw::Raw;
use gpupool_tests::{TOKEN, TestServer, fresh_seed, random_f32, rel_error, round_trip, server_config};
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Copy sizes past the inline limit: within one 4 MiB staging slot, across
/// slots, across all four, and past the client's 16 MiB regions (pieces).
const SIZES: [usize; 4] = [(1 << 20) + 3, (4 << 20) + 1, (9 << 20) + 7, (20 << 20) + 5];

fn rdma_server(fabric: &MemFabric, mode: RdmaMode) -> TestServer {
    // `RUST_LOG=info` shows why a session stays on QUIC.
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    TestServer::start(rdma_server_config(fabric, mode)).expect("server")
}

fn rdma_server_config(fabric: &MemFabric, mode: RdmaMode) -> ServerConfig {
    let mut c = server_config();
    c.rdma.mode = mode;
    c.rdma.provider = Some(Arc::new(fabric.clone()));
    c.rdma.idle_timeout = Some(Duration::from_secs(1));
    c.resume_grace = Duration::from_secs(20);
    c
}

fn rdma_client(srv: &TestServer, fabric: &MemFabric) -> ClientConfig {
    let mut c = srv.client_config();
    c.rdma.provider = Some(Arc::new(fabric.clone()));
    c.rdma.idle_timeout = Duration::from_secs(1);
    c
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies every size up and back (checked byte for byte); the bytes each way.
fn round_trips(s: &Session) -> u64 {
    for (i, &n) in SIZES.iter().enumerate() {
        round_trip(s, n, fresh_seed() + i as u64);
    }
    SIZES.iter().sum::<usize>() as u64
}

/// A kernel's result checked against the CPU: commands, launches and
/// their arguments, and a copy back.
fn saxpy(s: &Session) {
    let m = s.module_load(BUILTIN_MODULE).expect("builtin module");
    let n = 100_003;
    let seed = fresh_seed();
    let (a, b) = (random_f32(n, seed), random_f32(n, seed + 1));
    let (da, db) = (DeviceBuffer::from_slice(s, &a).expect("a"), DeviceBuffer::from_slice(s, &b).expect("b"));
    let f = m.function("saxpy").expect("saxpy");
    let cfg = LaunchConfig::for_elements(n as u32, 256);
    s.launch(&f, cfg, StreamId::DEFAULT, &[KernelArg::F32(2.5), da.arg(), db.arg(), KernelArg::U32(n as u32)])
        .expect("launch");
    let want: Vec<f64> = a.iter().zip(&b).map(|(x, y)| 2.5 * f64::from(*x) + f64::from(*y)).collect();
    assert!(rel_error(&db.to_vec().expect("y"), &want) < 1e-6);
}

#[test]
fn commands_and_copies_go_over_rdma() {
    let fabric = MemFabric::new("mem0");
    let srv = rdma_server(&fabric, RdmaMode::On);
    let s = Session::connect(&rdma_client(&srv, &fabric)).expect("session");
    let accept = s.welcome().rdma.clone().expect("the server accepted RDMA");
    assert_eq!(accept.core_version, CORE_VERSION);
    assert!(s.rdma_attached(), "the session runs over RDMA");
    saxpy(&s);
    let total = round_trips(&s);
    s.synchronize().expect("sync");
    let m = srv.metrics.snapshot();
    assert_eq!(m.rdma_attachments, 1, "{m:?}");
    assert!(m.rdma_frames >= 10, "batches came over RDMA: {m:?}");
    assert!(m.rdma_bytes >= 2 * total, "every bulk copy went over RDMA: {m:?}");
    assert_eq!(m.rdma_bytes, m.bulk_bytes_in + m.bulk_bytes_out, "no copy over QUIC: {m:?}");
    assert!(s.rdma_attached(), "still on RDMA");
    s.close().expect("close");
    wait_until("the session ended", || srv.metrics.snapshot().sessions_active == 0);
    srv.stop();
}

/// The session stays on QUIC, works, and nothing went over RDMA.
fn stays_on_quic(srv: &TestServer, config: &ClientConfig, why: &str) {
    let s = Session::connect(config).expect("session");
    assert!(!s.rdma_attached(), "{why}: on QUIC");
    round_trip(&s, (4 << 20) + 1, fresh_seed());
    saxpy(&s);
    s.close().expect("close");
    let m = srv.metrics.snapshot();
    assert_eq!((m.rdma_attachments, m.rdma_frames, m.rdma_bytes), (0, 0, 0), "{why}: {m:?}");
}

#[test]
fn sessions_stay_on_quic_when_either_side_says_no() {
    let fabric = MemFabric::new("mem0");
    // The server's operator turned it off.
    let srv = rdma_server(&fabric, RdmaMode::Off);
    let s = Session::connect(&rdma_client(&srv, &fabric)).expect("session");
    assert!(s.welcome().rdma.is_none(), "no acceptance");
    s.close().expect("close");
    stays_on_quic(&srv, &rdma_client(&srv, &fabric), "server off");
    srv.stop();
    // The client turned it off, or has no device.
    let srv = rdma_server(&fabric, RdmaMode::On);
    let mut config = rdma_client(&srv, &fabric);
    config.rdma.enabled = false;
    stays_on_quic(&srv, &config, "client off");
    stays_on_quic(&srv, &srv.client_config(), "no client device");
    srv.stop();
}

#[test]
fn a_failed_rdma_setup_keeps_the_session_on_quic() {
    let fabric = MemFabric::new("mem0");
    let srv = rdma_server(&fabric, RdmaMode::On);
    fabric.refuse_connects(true);
    let s = Session::connect(&rdma_client(&srv, &fabric)).expect("session");
    assert!(s.welcome().rdma.is_some(), "the server accepted");
    assert!(!s.rdma_attached(), "the connect failed: QUIC");
    round_trip(&s, (9 << 20) + 7, fresh_seed());
    saxpy(&s);
    s.close().expect("close");
    let m = srv.metrics.snapshot();
    assert_eq!((m.rdma_attachments, m.rdma_bytes), (0, 0), "{m:?}");
    srv.stop();
}

#[tokio::test]
async fn offers_of_another_version_or_without_a_device_name_stay_on_quic() {
    let fabric = MemFabric::new("mem0");
    let srv = rdma_server(&fabric, RdmaMode::On);
    let hello = |offer: v1::RdmaOffer| v1::Hello {
        protocol_version: gpupool_proto::PROTOCOL_VERSION,
        client_build: "raw-test".into(),
        token: TOKEN.into(),
        rdma: Some(offer),
        ..Default::default()
    };
    for offer in [
        v1::RdmaOffer { device: "mem0".into(), core_version: CORE_VERSION + 1 },
        v1::RdmaOffer { device: String::new(), core_version: CORE_VERSION },
        v1::RdmaOffer { device: "x".repeat(65), core_version: CORE_VERSION },
    ] {
        let (raw, welcome) = Raw::open_with(&srv, srv.addr, &hello(offer.clone())).await.expect("session");
        assert!(welcome.rdma.is_none(), "{offer:?} not accepted");
        raw.conn.close(0u8.into(), b"done");
    }
    // A valid offer is accepted.
    let offer = v1::RdmaOffer { device: "mem0".into(), core_version: CORE_VERSION };
    let (raw, welcome) = Raw::open_with(&srv, srv.addr, &hello(offer)).await.expect("session");
    assert!(welcome.rdma.is_some_and(|a| a.secret.len() == 32));
    raw.conn.close(0u8.into(), b"done");
    srv.stop();
}

#[test]
fn a_silent_rdma_peer_ends_the_attachment_and_the_session_resumes_on_quic() {
    let fabric = MemFabric::new("mem0");
    let srv = rdma_server(&fabric, RdmaMode::On);
    let s = Session::connect(&rdma_client(&srv, &fabric)).expect("session");
    assert!(s.rdma_attached());
    let data: Vec<u8> = (0..(5 << 20) + 9).map(|i| (i % 251) as u8).collect();
    let dev = s.mem_alloc(data.len() as u64).expect("alloc");
    s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod over RDMA");
    // The server's side stops answering: no completion, no keepalive.
    fabric.links().last().expect("the session's connection").hang(Side::Server);
    // Both sides' idle timeouts (1 s) pass; the server closes the QUIC
    // connection to have the session resumed there.
    std::thread::sleep(Duration::from_millis(2500));
    let mut back = vec![0u8; data.len()];
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh after the resume");
    assert!(back == data, "the memory written over RDMA is intact");
    assert!(!s.rdma_attached(), "resumed on QUIC");
    round_trip(&s, (4 << 20) + 1, fresh_seed());
    saxpy(&s);
    let m = srv.metrics.snapshot();
    assert_eq!(m.resumptions, 1, "{m:?}");
    s.close().expect("close");
    srv.stop();
}

#[test]
fn a_lost_rdma_link_resumes_the_session_on_quic_with_its_batches() {
    let fabric = MemFabric::new("mem0");
    let srv = rdma_server(&fabric, RdmaMode::On);
    let s = Session::connect(&rdma_client(&srv, &fabric)).expect("session");
    assert!(s.rdma_attached());
    saxpy(&s);
    fabric.links().last().expect("the session's connection").cut();
    // Work queued now goes once the session is back (on QUIC).
    round_trip(&s, (9 << 20) + 7, fresh_seed());
    saxpy(&s);
    assert!(!s.rdma_attached());
    assert_eq!(srv.metrics.snapshot().resumptions, 1);
    s.close().expect("close");
    srv.stop();
}

/// A raw session's QUIC half, with an RDMA offer the server accepts.
async fn raw_rdma(srv: &TestServer, port: u16) -> (Raw, v1::Welcome) {
    let hello = v1::Hello {
        protocol_version: gpupool_proto::PROTOCOL_VERSION,
        client_build: "raw-test".into(),
        token: TOKEN.into(),
        rdma: Some(v1::RdmaOffer { device: "mem0".into(), core_version: CORE_VERSION }),
        ..Default::default()
    };
    let (raw, welcome) = Raw::open_with(srv, srv.addr, &hello).await.expect("session");
    assert_eq!(welcome.rdma.as_ref().map(|a| a.port), Some(u32::from(port)));
    (raw, welcome)
}

fn connect_raw(fabric: &MemFabric, port: u16, session_id: u64, secret: Vec<u8>) -> Endpoint {
    let mut c = Config::new(Role::Client, RemoteRegion { addr: 0, len: 1 << 20, rkey: 0 });
    c.session_id = session_id;
    c.secret = secret;
    let addr = ([127, 0, 0, 1], port).into();
    let regions = Regions { writable: 1 << 20, source: 1 << 20 };
    Endpoint::connect(fabric, addr, c, regions, Duration::from_secs(5)).expect("connects")
}

fn next(ep: &mut Endpoint) -> Event {
    ep.next_event(Instant::now() + Duration::from_secs(10)).expect("an event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_rdma_peers_get_errors_and_the_server_goes_on() {
    let fabric = MemFabric::new("mem0");
    let srv = rdma_server(&fabric, RdmaMode::On);
    let port = srv.rdma_port.expect("an RDMA listener");
    let (_raw, welcome) = raw_rdma(&srv, port).await;
    let secret = welcome.rdma.clone().expect("accepted").secret.to_vec();
    let id = welcome.session_id;
    let f = fabric.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        // The wrong secret, and another session's id: refused.
        let mut bad = connect_raw(&f, port, id, vec![7; 32]);
        assert!(matches!(next(&mut bad), Event::Connected { .. }));
        assert!(matches!(next(&mut bad), Event::Ended(_)), "refused");
        let mut other = connect_raw(&f, port, id + 1000, secret.clone());
        assert!(matches!(next(&mut other), Event::Connected { .. }));
        assert!(matches!(next(&mut other), Event::Ended(_)), "refused");
        // The right one: admitted, then garbage where a batch goes.
        let mut ep = connect_raw(&f, port, id, secret.clone());
        assert!(matches!(next(&mut ep), Event::Connected { .. }));
        match next(&mut ep) {
            Event::Frame(body) => assert_eq!(v1::Welcome::decode(&body[..]).expect("welcome").session_id, id),
            other => panic!("not admitted: {other:?}"),
        }
        ep.conn().send_frame(&[0xff; 100], Instant::now()).expect("queued");
        let reply = match next(&mut ep) {
            Event::Frame(body) => v1::BatchReply::decode(&body[..]).expect("a reply"),
            other => panic!("no answer: {other:?}"),
        };
        assert!(!reply.errors.is_empty(), "an error reply: {reply:?}");
        // A second connection for the session: refused (one per session).
        let mut again = connect_raw(&f, port, id, secret);
        assert!(matches!(next(&mut again), Event::Connected { .. }));
        assert!(matches!(next(&mut again), Event::Ended(_)), "refused");
        // A valid batch still runs on the first one.
        let batch = v1::Batch { seq: 1, calls: Vec::new() };
        ep.conn().send_frame(&batch.encode_to_vec(), Instant::now()).expect("queued");
        match next(&mut ep) {
            Event::Frame(body) => v1::BatchReply::decode(&body[..]).expect("a reply"),
            other => panic!("no answer: {other:?}"),
        }
    })
    .await
    .expect("the raw client");
    assert_eq!(outcome.seq, 1, "{outcome:?}");
    let m = srv.metrics.snapshot();
    assert_eq!(m.rdma_attachments, 1, "{m:?}");
    assert!(m.frames_rejected >= 1, "{m:?}");
    // The server still serves sessions over RDMA.
    let s = tokio::task::spawn_blocking({
        let c = rdma_client(&srv, &fabric);
        move || {
            let s = Session::connect(&c).expect("session");
            assert!(s.rdma_attached());
            round_trip(&s, (1 << 20) + 3, fresh_seed());
            s.close().expect("close");
        }
    });
    s.await.expect("a good session");
    srv.stop();
}
