//! QUIC (quinn): the server's endpoint, its connections' windows, and the
//! [`Transport`] of a session over one connection: the command channel is
//! the connection's first bidirectional stream, each bulk transfer chunk a
//! bidirectional stream of its own.

use super::{FrameReceiver, FrameSender, Link, RecvError, SendError, Transport};
use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::server::bulk::BulkService;
use crate::tls::Identity;
use bytes::Bytes;
use gpupool_proto::frame;
use gpupool_proto::quic as endpoint_setup;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Sessions over QUIC.
#[derive(Debug)]
pub(crate) struct Quic;

impl Transport for Quic {
    type Link = quinn::Connection;
    type Sender = quinn::SendStream;
    type Receiver = quinn::RecvStream;
}

impl Link for quinn::Connection {
    fn ended(&self) -> impl Future<Output = ()> + Send {
        let conn = self.clone();
        async move {
            conn.closed().await;
        }
    }

    fn lost(&self) -> Option<&'static str> {
        match self.close_reason() {
            Some(quinn::ConnectionError::TimedOut) => Some("idle timeout"),
            Some(quinn::ConnectionError::Reset) => Some("connection reset"),
            _ => None,
        }
    }

    fn end(&self, code: u32, reason: &[u8]) {
        self.close(code.into(), reason);
    }

    fn peer(&self) -> String {
        self.remote_address().to_string()
    }

    fn serve_bulk(self, bulk: Arc<BulkService>) -> impl Future<Output = ()> + Send {
        accept_bulk(self, bulk)
    }
}

impl FrameSender for quinn::SendStream {
    async fn send_frame(&mut self, frame: &[u8]) -> Result<(), SendError> {
        self.write_all(frame).await.map_err(|e| SendError(e.to_string()))
    }

    async fn finish_within(mut self, linger: Duration) {
        if self.finish().is_ok() {
            let _ = tokio::time::timeout(linger, self.stopped()).await;
        }
    }
}

impl FrameReceiver for quinn::RecvStream {
    fn recv_frame(&mut self, max: usize) -> impl Future<Output = Result<Option<Bytes>, RecvError>> + Send {
        read_frame(self, max)
    }
}

/// Reads one frame body; `Ok(None)` on a clean end of stream.
pub(crate) async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<Bytes>, RecvError> {
    let mut header = [0u8; frame::HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(RecvError::Frame(frame::FrameError::Truncated { have: n, want: frame::HEADER_LEN }));
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(RecvError::Stream(e.to_string())),
    }
    let len = frame::decode_header(header, max).map_err(RecvError::Frame)?;
    // Received chunks are appended as they come into a reused buffer: no
    // zeroed buffer first, no fresh 4 MiB faulted in for every bulk chunk.
    let mut body = crate::staging::buffers()
        .take(len)
        .ok_or_else(|| RecvError::Stream(format!("cannot allocate {len} bytes for a frame")))?;
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(RecvError::Frame(frame::FrameError::Truncated {
                    have: frame::HEADER_LEN + body.len(),
                    want: frame::HEADER_LEN + len,
                }));
            }
            Err(e) => return Err(RecvError::Stream(e.to_string())),
        }
    }
    Ok(Some(body.freeze()))
}

/// Serves the session's bulk streams, a bounded number at a time.
/// The session's connections share the bound (a bulk connection's streams
/// wait for the same permits as its first connection's).
async fn accept_bulk(conn: quinn::Connection, bulk: Arc<BulkService>) {
    let mut tasks = JoinSet::new();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let Some(permit) = bulk.permit().await else { break };
        let bulk = bulk.clone();
        tasks.spawn(async move {
            bulk_stream(&bulk, send, recv).await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
}

/// One bulk request and its response on their own stream.
async fn bulk_stream(bulk: &BulkService, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let request = read_frame(&mut recv, bulk.max_request()).await;
    let response = bulk.answer(request).await;
    // A chunk's bytes go out as they are staged, not copied into a frame.
    let mut parts = match &response.data {
        Some(payload) => frame::bulk_response_frame(response.error.clone(), payload),
        None => [frame::encode(&response), Bytes::new()],
    };
    if send.write_all_chunks(&mut parts).await.is_ok() {
        let _ = send.finish();
    }
}

/// The QUIC configuration of the server's endpoint: `identity`'s
/// certificate, timeouts and windows.
pub(crate) fn server_config(config: &ServerConfig, identity: &Identity) -> Result<quinn::ServerConfig, ServerError> {
    let tls = crate::tls::server_config(identity)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ServerError::Tls(format!("TLS configuration unusable for QUIC: {e}")))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(transport_config(config)?));
    Ok(server_config)
}

/// Binds the server's endpoint on `config.listen`.
pub(crate) fn endpoint(
    config: &ServerConfig,
    server_config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, ServerError> {
    bind_endpoint(config, config.listen, server_config)
}

/// Binds `config.bulk_endpoints` endpoints for bulk connections on the
/// listen address's IP, each on a port of its own (in `worker_ports` when
/// set), their drivers on `runtime`: each endpoint is one UDP socket read
/// by one task, so that several of them spread a session's copies over
/// several cores.
pub(crate) fn bulk_endpoints(
    config: &ServerConfig,
    server_config: &quinn::ServerConfig,
    runtime: &tokio::runtime::Handle,
) -> Result<Vec<quinn::Endpoint>, ServerError> {
    let _inside = runtime.enter();
    let addr = SocketAddr::new(config.listen.ip(), 0);
    (0..config.bulk_endpoints).map(|_| bind_endpoint(config, addr, server_config.clone())).collect()
}

fn bind_endpoint(
    config: &ServerConfig,
    addr: SocketAddr,
    server_config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, ServerError> {
    let socket = bind_listen(addr, config.worker_ports)?;
    let (rx, tx) = endpoint_setup::buffer_sizes(&socket);
    if rx < endpoint_setup::SOCKET_BUFFER_BYTES / 8 {
        tracing::warn!(
            granted = rx,
            wanted = endpoint_setup::SOCKET_BUFFER_BYTES,
            "UDP receive buffer capped by net.core.rmem_max; bulk copies may lose packets (raise it with sysctl)"
        );
    }
    tracing::debug!(rx, tx, "UDP socket buffers");
    endpoint_setup::endpoint(socket, config.max_udp_payload, Some(server_config))
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Binds `addr`; port 0 with a port range takes the first free port of the
/// range, starting at a random one so that workers started together rarely
/// collide.
fn bind_listen(addr: SocketAddr, worker_ports: Option<(u16, u16)>) -> Result<std::net::UdpSocket, ServerError> {
    let bind_error = |source| ServerError::Bind { addr, source };
    let Some((low, high)) = worker_ports.filter(|_| addr.port() == 0) else {
        return endpoint_setup::bind_udp(addr).map_err(bind_error);
    };
    let span = u32::from(high - low) + 1;
    let start = rand::random::<u32>() % span;
    for i in 0..span {
        let port = low + ((start + i) % span) as u16;
        match endpoint_setup::bind_udp(SocketAddr::new(addr.ip(), port)) {
            Ok(socket) => return Ok(socket),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(bind_error(e)),
        }
    }
    Err(bind_error(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("every worker port in {low}-{high} is taken"),
    )))
}

/// Receive window of a connection that has not been authenticated: room
/// for its Hello.
const PRE_AUTH_RECEIVE_WINDOW: u32 = 1 << 20;

/// Receive window of an authenticated session's connection (bulk copies).
const SESSION_RECEIVE_WINDOW: u32 = 256 << 20;

/// Receive window left on a supervisor's control connection once its
/// session moved to a worker: nothing is read there any more.
const CONTROL_RECEIVE_WINDOW: u32 = 64 << 10;

/// Receive window of an attached bulk connection: its share of a session's
/// copies in flight (the client keeps a few 4 MiB chunks per connection in
/// flight), with room for the bandwidth-delay product of 10 Gbit/s at
/// 20 ms on top.
const BULK_RECEIVE_WINDOW: u32 = 64 << 20;

/// Gives an attached bulk connection its windows and streams (no command
/// stream on it).
pub(crate) fn open_bulk_windows(conn: &quinn::Connection, config: &ServerConfig) {
    conn.set_receive_window(quinn::VarInt::from_u32(BULK_RECEIVE_WINDOW));
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(config.max_bulk_streams as u32));
}

/// Gives an authenticated connection its session's windows and streams.
pub(crate) fn open_windows(conn: &quinn::Connection, config: &ServerConfig) {
    conn.set_receive_window(quinn::VarInt::from_u32(SESSION_RECEIVE_WINDOW));
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(config.max_bulk_streams as u32 + 1));
}

/// A supervisor's connection once its session lives on the worker's: no
/// new streams, and no more credit than the pre-session window gave.
pub(crate) fn narrow_to_control(conn: &quinn::Connection) {
    conn.set_receive_window(quinn::VarInt::from_u32(CONTROL_RECEIVE_WINDOW));
    conn.set_max_concurrent_bi_streams(0u8.into());
}

fn transport_config(config: &ServerConfig) -> Result<quinn::TransportConfig, ServerError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(config.idle_timeout)
        .map_err(|e| ServerError::Config(format!("idle_timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    // Until its Hello is authenticated a connection gets one stream and a
    // small receive window: a connection that opens streams the server
    // never reads can make it buffer no more than this (6 such connections
    // once took the supervisor to 1.9 GiB; issue 20, finding 1).
    // `open_windows` raises both once the peer is known.
    t.max_concurrent_bidi_streams(1u8.into());
    t.max_concurrent_uni_streams(0u8.into());
    // Per stream the session's window (it cannot be raised later); the
    // connection's window bounds all streams together.
    t.stream_receive_window(quinn::VarInt::from_u32(32 << 20));
    t.receive_window(quinn::VarInt::from_u32(PRE_AUTH_RECEIVE_WINDOW));
    t.send_window(256 << 20);
    t.mtu_discovery_config(endpoint_setup::mtu_discovery(config.max_udp_payload));
    Ok(t)
}
