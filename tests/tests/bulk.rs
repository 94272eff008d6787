//! Bulk copies over several QUIC connections (issue 18, item 2): a session's
//! chunks spread over one extra connection per bulk endpoint, each attached
//! with the session's bulk secret. Emulated device unless
//! `GPUPOOL_TEST_DEVICE=cuda`.

use gpupool_client::{Session, StreamId};
use gpupool_proto::{PROTOCOL_VERSION, close_code, frame, v1};
use gpupool_tests::raw::Raw;
use gpupool_tests::{TestServer, fresh_seed, isolated_config, random_bytes, server_config};
use std::net::SocketAddr;

const MIB_64: usize = 64 << 20;

/// The test server's client settings for copies on the bulk path: with
/// `GPUPOOL_TEST_TRANSPORT=shm` pageable copies would take the pinned
/// bounce buffer instead; without pinned memory they take the shared
/// region's slots, which the bulk service serves as well.
fn bulk_client(srv: &TestServer) -> gpupool_client::ClientConfig {
    let mut config = srv.client_config();
    config.shm_pinned_bytes = 0;
    config
}

fn round_trip_64_mib(srv: &TestServer) {
    let mut config = bulk_client(srv);
    config.bulk_connections = 4;
    let s = Session::connect(&config).expect("session");
    assert_eq!(s.welcome().bulk_ports.len(), 4, "the server offers its four bulk endpoints");
    assert_eq!(s.bulk_connections(), 4, "the client attached one connection to each");
    let data = random_bytes(MIB_64, fresh_seed());
    let dev = s.mem_alloc(MIB_64 as u64).expect("alloc");
    s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod");
    let mut back = vec![0u8; MIB_64];
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh");
    assert!(back == data, "64 MiB round trip over four connections differs");
    assert_eq!(s.bulk_connections(), 4, "no bulk connection was lost");
    s.mem_free(dev).expect("free");
    s.close().expect("close");
}

#[test]
fn copies_of_64_mib_spread_over_four_connections() {
    let mut config = server_config();
    config.bulk_endpoints = 4;
    let srv = TestServer::start(config).expect("server");
    round_trip_64_mib(&srv);
    let m = srv.metrics.snapshot();
    assert!(m.bulk_bytes_in >= MIB_64 as u64 && m.bulk_bytes_out >= MIB_64 as u64, "{m:?}");
    srv.stop();
}

#[test]
fn copies_of_64_mib_spread_over_four_connections_to_a_worker() {
    let mut config = isolated_config().expect("worker command");
    config.bulk_endpoints = 4;
    let srv = TestServer::start(config).expect("server");
    round_trip_64_mib(&srv);
    srv.stop();
}

#[test]
fn without_bulk_endpoints_copies_share_the_session_connection() {
    let mut config = server_config();
    config.bulk_endpoints = 0;
    let srv = TestServer::start(config).expect("server");
    let s = Session::connect(&bulk_client(&srv)).expect("session");
    assert!(s.welcome().bulk_ports.is_empty() && s.welcome().bulk_secret.is_empty());
    assert_eq!(s.bulk_connections(), 0);
    let data = random_bytes(9 << 20, fresh_seed());
    let dev = s.mem_alloc(data.len() as u64).expect("alloc");
    s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod");
    let mut back = vec![0u8; data.len()];
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh");
    assert!(back == data);
    srv.stop();
}

/// Sends `hello` on a new connection to `addr`; the server's close code and
/// reason when it refuses, else `None`.
async fn attach(srv: &TestServer, addr: SocketAddr, hello: v1::Hello) -> Option<(u32, String)> {
    let (_ep, conn) = Raw::connect(srv, addr).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(&frame::encode(&hello)).await.expect("hello");
    // An attached connection gets a `Welcome`; a refused one is closed.
    let answer = recv.read_to_end(1 << 20).await;
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            Some((c.error_code.into_inner() as u32, String::from_utf8_lossy(&c.reason).into_owned()))
        }
        _ => {
            assert!(answer.is_ok(), "attached: {answer:?}");
            conn.close(0u8.into(), b"done");
            None
        }
    }
}

#[test]
fn bulk_attach_needs_the_session_secret() {
    let mut config = server_config();
    config.bulk_endpoints = 2;
    let srv = TestServer::start(config).expect("server");
    let mut client = bulk_client(&srv);
    client.bulk_connections = 0;
    let s = Session::connect(&client).expect("session");
    let w = s.welcome().clone();
    assert_eq!(w.bulk_ports.len(), 2);
    let addr = SocketAddr::new(srv.addr.ip(), w.bulk_ports[0] as u16);
    let hello = |session_id, secret: &str, index| v1::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_build: "bulk-test".into(),
        token: String::new(),
        resume: None,
        bulk: Some(v1::BulkAttach { session_id, secret: secret.into(), index }),
        migrate: None,
        rdma: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut wrong = w.bulk_secret.clone().into_bytes();
        wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
        let wrong = String::from_utf8(wrong).expect("hex");
        let refusals = [
            hello(w.session_id, &wrong, 0),
            hello(w.session_id, "", 0),
            hello(w.session_id + 1, &w.bulk_secret, 0),
            hello(w.session_id, &w.bulk_secret, 2),
        ];
        for h in refusals {
            let (code, reason) = attach(&srv, addr, h.clone()).await.expect("refused");
            assert_eq!(code, close_code::UNAUTHORIZED, "{h:?}: {reason}");
        }
        // A session's token is no bulk attachment.
        let plain = v1::Hello { bulk: None, token: gpupool_tests::TOKEN.into(), ..hello(0, "", 0) };
        let (code, _) = attach(&srv, addr, plain).await.expect("refused");
        assert_eq!(code, close_code::BAD_HANDSHAKE);
        // The right secret attaches.
        assert_eq!(attach(&srv, addr, hello(w.session_id, &w.bulk_secret, 1)).await, None);
    });
    // The session works on, and once it ends its secret attaches nothing.
    let dev = s.mem_alloc(1 << 20).expect("alloc");
    s.memcpy_htod(dev, &random_bytes(1 << 20, 1), StreamId::DEFAULT).expect("htod");
    s.close().expect("close");
    rt.block_on(async {
        // The server ends the session once it sees the close.
        for _ in 0..100 {
            if let Some((code, _)) = attach(&srv, addr, hello(w.session_id, &w.bulk_secret, 0)).await {
                assert_eq!(code, close_code::UNAUTHORIZED);
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the ended session's secret still attaches");
    });
    srv.stop();
}

/// Bulk connections lost while the session's own connection is fine (here
/// replaced by other attachments with the session's secret, which the
/// server closes them for): the next copies succeed over the session's
/// connection instead of failing the program's copy.
#[test]
fn a_lost_bulk_connection_is_replaced_and_copies_go_on() {
    let mut config = server_config();
    config.bulk_endpoints = 2;
    let srv = TestServer::start(config).expect("server");
    let mut client = bulk_client(&srv);
    client.bulk_connections = 2;
    let s = Session::connect(&client).expect("session");
    assert_eq!(s.bulk_connections(), 2);
    let w = s.welcome().clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    for index in 0..2u32 {
        let addr = SocketAddr::new(srv.addr.ip(), w.bulk_ports[index as usize] as u16);
        let hello = v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_build: "bulk-test".into(),
            bulk: Some(v1::BulkAttach { session_id: w.session_id, secret: w.bulk_secret.clone(), index }),
            ..Default::default()
        };
        // Attached in the session's place: the server closes the session's own.
        assert_eq!(rt.block_on(attach(&srv, addr, hello)), None);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.bulk_connections() > 0 {
        assert!(std::time::Instant::now() < deadline, "the replaced connections close");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let data = random_bytes(MIB_64, fresh_seed());
    let dev = s.mem_alloc(MIB_64 as u64).expect("alloc");
    s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod after the loss");
    let mut back = vec![0u8; MIB_64];
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh after the loss");
    assert!(back == data, "64 MiB round trip after the bulk connections were lost");
    s.close().expect("close");
}

/// A copy larger than the server stages for a session goes in pieces (its
/// bytes were all staged at once before: a copy past the bound failed,
/// with the default 3 GiB bound a 4 GiB tensor could not be uploaded).
#[test]
fn large_uploads_go_to_the_device_piece_by_piece() {
    // Under the default bound: pieces of 64 MiB, each copy queued (its own
    // batch) as soon as it is staged, none waiting for the whole upload.
    let srv = TestServer::start(server_config()).expect("server");
    let s = Session::connect(&bulk_client(&srv)).expect("session");
    let n = (130 << 20) + 4099;
    let data = random_bytes(n, fresh_seed());
    let dev = s.mem_alloc(n as u64).expect("alloc");
    let before = s.batches_sent();
    s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod");
    assert!(s.batches_sent() - before >= 3, "three pieces, three batches ({} sent)", s.batches_sent() - before);
    let mut back = vec![0u8; n];
    s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh");
    assert!(back == data, "an upload in pieces differs");
    s.close().expect("close");
    srv.stop();
}

#[test]
fn copies_larger_than_the_staging_bound_go_in_pieces() {
    for isolated in [false, true] {
        let mut config = if isolated { isolated_config().expect("worker binary") } else { server_config() };
        config.max_staging_bytes = 8 << 20;
        let srv = TestServer::start(config).expect("server");
        let s = Session::connect(&bulk_client(&srv)).expect("session");
        assert_eq!(s.welcome().max_staging_bytes, 8 << 20, "the server says its bound");
        let n = (40 << 20) + 4099;
        let data = random_bytes(n, fresh_seed());
        let dev = s.mem_alloc(n as u64).expect("alloc");
        s.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("htod of 5x the bound");
        let mut back = vec![0u8; n];
        s.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("dtoh of 5x the bound");
        assert!(back == data, "a copy in pieces differs (isolated: {isolated})");
        // The pieces land at their offsets: a copy from inside the buffer.
        let mut part = vec![0u8; 9 << 20];
        s.memcpy_dtoh(&mut part, dev + 12345, StreamId::DEFAULT).expect("dtoh at an offset");
        assert!(part[..] == data[12345..12345 + part.len()]);
        s.close().expect("close");
        srv.stop();
    }
}
