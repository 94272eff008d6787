//! Live migration of a session to another gpu-server (`docs/migration.md`):
//! the orders a session's task takes, and the server-to-server transfer.
//!
//! The source connects to the target over QUIC like a client, with a
//! `Hello` carrying the token the target accepts for the session (with a
//! balancer: the lease, moved to the target and signed by the balancer)
//! and `migrate` set. So the target authenticates the source exactly as it
//! would the session's client: whoever holds that token could open a
//! session there anyway. The state follows as `MigrateFrame`s; the target
//! runs it through the same checks as a client's calls and answers with a
//! `MigrateDone`.

use crate::images::ImageCache;
use crate::session::Exported;
use bytes::Bytes;
use gpupool_proto::{PROTOCOL_VERSION, frame, v1};
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Where a session goes.
#[derive(Debug, Clone)]
pub struct MigrationTarget {
    /// The target's QUIC address.
    pub address: SocketAddr,
    /// Its TLS name (the client's `server_name`).
    pub server_name: String,
    /// Its certificate's SHA-256 (hex), pinned by the source and handed to
    /// the client.
    pub cert_sha256: String,
    /// The token the target accepts for the session (a lease for it).
    pub token: String,
}

/// A migration that succeeded.
#[derive(Debug, Clone)]
pub struct Migrated {
    /// The session's id on the target.
    pub target_session: u64,
    /// Device bytes moved.
    pub memory_bytes: u64,
    /// How long the session ran no call: from the order to the client's
    /// redirect.
    pub pause: Duration,
}

/// An order to a session's task.
#[derive(Debug)]
pub(crate) struct Order {
    pub(crate) target: MigrationTarget,
    pub(crate) started: Instant,
    pub(crate) done: oneshot::Sender<Result<Migrated, String>>,
}

/// The sessions of this process that can be ordered to move, by id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<u64, mpsc::Sender<Order>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<Order>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers session `id`; its orders arrive on the slot.
    pub(crate) fn register(&self, id: u64) -> Slot<'_> {
        let (tx, rx) = mpsc::channel(1);
        self.lock().insert(id, tx);
        Slot { registry: self, id, orders: rx }
    }

    /// Ids of the sessions that can be moved.
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// Orders session `id` to move to `target`; waits up to `limit` for the
    /// outcome.
    pub(crate) async fn migrate(&self, id: u64, target: MigrationTarget, limit: Duration) -> Result<Migrated, String> {
        let tx = self.lock().get(&id).cloned().ok_or_else(|| format!("no session {id} here"))?;
        let (done, outcome) = oneshot::channel();
        tx.try_send(Order { target, started: Instant::now(), done })
            .map_err(|_| format!("session {id} is already moving or has ended"))?;
        match tokio::time::timeout(limit, outcome).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(format!("session {id} ended before it moved")),
            Err(_) => Err(format!("session {id} did not move within {limit:?}")),
        }
    }
}

/// A session's place in the [`Registry`]; unregistered on drop.
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    registry: &'a Registry,
    id: u64,
    pub(crate) orders: mpsc::Receiver<Order>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Bytes of device memory per `MemChunk` (well under a frame's limit).
pub(crate) const CHUNK_BYTES: usize = 2 << 20;

/// How long a whole transfer may take, either side.
pub(crate) const TRANSFER_LIMIT: Duration = Duration::from_secs(120);

/// What the source sends besides the session's exported state.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) exported: Exported,
    pub(crate) received_seq: u64,
    /// The replies the client may not have received, their log's
    /// acknowledged and forgotten sequence numbers.
    pub(crate) replies: Vec<Bytes>,
    pub(crate) replies_acked: u64,
    pub(crate) replies_forgotten: u64,
    /// The session's work queue, which reads its memory piece by piece.
    pub(crate) work: tokio::sync::mpsc::Sender<super::thread::Work>,
}

/// Pieces of memory read ahead on the session's thread while the one
/// before is sent.
const READS_AHEAD: usize = 4;

/// The frame of a `MigrateFrame` carrying `MemChunk { addr, data }` up to
/// its data, which the caller sends after it unchanged: the frame as
/// `frame::encode` makes it, without copying the piece into it.
fn memory_frame_head(addr: u64, data_len: usize) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let data_len = data_len as u64;
    let chunk = (key_len(1) + encoded_len_varint(addr) + key_len(2) + encoded_len_varint(data_len)) as u64 + data_len;
    let frame = key_len(3) as u64 + encoded_len_varint(chunk) as u64 + chunk;
    let mut head = bytes::BytesMut::with_capacity(32);
    head.extend_from_slice(&(frame as u32).to_le_bytes());
    encode_key(3, WireType::LengthDelimited, &mut head);
    encode_varint(chunk, &mut head);
    encode_key(1, WireType::Varint, &mut head);
    encode_varint(addr, &mut head);
    encode_key(2, WireType::LengthDelimited, &mut head);
    encode_varint(data_len, &mut head);
    head.freeze()
}

/// The client side of the transfer: the source's TLS configuration, which
/// pins the target's certificate.
fn client_config(target: &MigrationTarget) -> Result<quinn::ClientConfig, String> {
    let pin = gpupool_proto::tls::parse_fingerprint(&target.cert_sha256).map_err(|e| e.to_string())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(gpupool_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(gpupool_proto::tls::PinnedCert::new(pin)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![gpupool_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut qc = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.send_window(256 << 20);
    // A target that does not answer fails the migration soon.
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(10_000))));
    qc.transport_config(Arc::new(t));
    Ok(qc)
}

/// Why the target closed `conn`, if it did.
fn refusal(conn: &quinn::Connection) -> Option<String> {
    match conn.close_reason()? {
        quinn::ConnectionError::ApplicationClosed(c) => {
            Some(format!("the target refused: {}", String::from_utf8_lossy(&c.reason)))
        }
        other => Some(format!("the connection to the target failed: {other}")),
    }
}

/// Opens a connection to `addr`, sends `hello` and reads the `Welcome`.
async fn open(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    name: &str,
    hello: &v1::Hello,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream, v1::Welcome), String> {
    let conn = endpoint
        .connect(addr, name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("cannot reach {addr}: {e}"))?;
    let failed = |e: &dyn std::fmt::Display| refusal(&conn).unwrap_or_else(|| e.to_string());
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
    send.write_all(&frame::encode(hello)).await.map_err(|e| failed(&e))?;
    let welcome = match super::transport::quic::read_frame(&mut recv, MAX_ANSWER_BYTES).await {
        Ok(Some(body)) => v1::Welcome::decode(body).map_err(|e| format!("undecodable Welcome: {e}"))?,
        _ => {
            // The close may be on its way behind the end of the stream.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            return Err(failed(&"the target ended the connection without a Welcome"));
        }
    };
    Ok((conn, send, recv, welcome))
}

/// Largest `Welcome` or `MigrateDone` read from a target.
const MAX_ANSWER_BYTES: usize = 64 << 10;

/// Sends a session to `target` and returns its answer.
pub(crate) async fn send_session(
    target: &MigrationTarget,
    images: &ImageCache,
    out: Outgoing,
) -> Result<v1::MigrateDone, String> {
    let bind: SocketAddr = if target.address.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("cannot bind {bind}: {e}"))?;
    endpoint.set_default_client_config(client_config(target)?);
    let sent = tokio::time::timeout(TRANSFER_LIMIT, async {
        let ex = &out.exported;
        let hello = v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_build: concat!("gpupool-server ", env!("CARGO_PKG_VERSION"), " (migration)").into(),
            token: target.token.clone(),
            resume: None,
            bulk: None,
            rdma: None,
            migrate: Some(v1::MigrateIn {
                va_base: ex.va_base,
                va_size: ex.va_size,
                memory_bytes: ex.memory_bytes(),
                received_seq: out.received_seq,
                replies_acked: out.replies_acked,
                replies_forgotten: out.replies_forgotten,
            }),
        };
        let (first, mut send, mut recv, welcome) = open(&endpoint, target.address, &target.server_name, &hello).await?;
        // A target with worker processes sends the session on to one, as
        // it does a client; its first connection stays open meanwhile.
        let (conn, control) = match welcome.redirect {
            Some(redirect) => {
                let port = u16::try_from(redirect.port).map_err(|_| format!("redirect to port {}", redirect.port))?;
                let worker = SocketAddr::new(target.address.ip(), port);
                let hello = v1::Hello { token: redirect.ticket, ..hello.clone() };
                let (conn, worker_send, worker_recv, welcome) =
                    open(&endpoint, worker, &target.server_name, &hello).await?;
                if welcome.redirect.is_some() {
                    return Err("the target redirected twice".into());
                }
                (send, recv) = (worker_send, worker_recv);
                (conn, Some(first))
            }
            None => (first, None),
        };
        // The target's reason, when it closed the connection, says more
        // than the failed write.
        let fail = |e: &dyn std::fmt::Display| refusal(&conn).unwrap_or_else(|| e.to_string());
        let write = |item: v1::migrate_frame::Item| frame::encode(&v1::MigrateFrame { item: Some(item) });
        let mut frames = Vec::new();
        for key in &ex.images {
            let Some(image) = <[u8; 32]>::try_from(&key[..]).ok().and_then(|k| images.get(&k)) else { continue };
            for (i, piece) in image.chunks(CHUNK_BYTES).enumerate() {
                frames.push(write(v1::migrate_frame::Item::Image(v1::ImageChunk {
                    sha256: key.clone().into(),
                    total_size: image.len() as u64,
                    offset: (i * CHUNK_BYTES) as u64,
                    data: Bytes::copy_from_slice(piece),
                })));
            }
        }
        frames.push(write(v1::migrate_frame::Item::Calls(v1::Batch { seq: 0, calls: ex.calls.clone() })));
        for reply in &out.replies {
            frames.push(write(v1::migrate_frame::Item::Reply(reply.clone())));
        }
        for f in frames {
            send.write_all(&f).await.map_err(|e| fail(&e))?;
        }
        // Reading a piece on the session's thread, sending the one before
        // and the target's writing the one before that overlap.
        let chunk = CHUNK_BYTES as u64;
        let mut pieces = ex.memory.iter().flat_map(|&(addr, size)| {
            (0..size.div_ceil(chunk)).map(move |i| (addr + i * chunk, chunk.min(size - i * chunk)))
        });
        let ended = || "the session has ended".to_string();
        let mut reads = std::collections::VecDeque::new();
        loop {
            while reads.len() < READS_AHEAD {
                let Some((addr, len)) = pieces.next() else { break };
                let (tx, rx) = tokio::sync::oneshot::channel();
                out.work.send(super::thread::Work::ExportMemory(addr, len, tx)).await.map_err(|_| ended())?;
                reads.push_back((addr, rx));
            }
            let Some((addr, rx)) = reads.pop_front() else { break };
            let data = rx.await.map_err(|_| ended())?.map_err(|e| e.message)?;
            send.write_all(&memory_frame_head(addr, data.len())).await.map_err(|e| fail(&e))?;
            send.write_chunk(Bytes::from(data)).await.map_err(|e| fail(&e))?;
        }
        for (addr, shadow) in &ex.mirrors {
            for (i, piece) in shadow.chunks(CHUNK_BYTES).enumerate() {
                let chunk = v1::MemChunk { addr: addr + (i * CHUNK_BYTES) as u64, data: Bytes::copy_from_slice(piece) };
                send.write_all(&write(v1::migrate_frame::Item::Mirror(chunk))).await.map_err(|e| fail(&e))?;
            }
        }
        if !ex.calls_after.is_empty() {
            let after = v1::Batch { seq: 0, calls: ex.calls_after.clone() };
            send.write_all(&write(v1::migrate_frame::Item::Calls(after))).await.map_err(|e| fail(&e))?;
        }
        send.write_all(&write(v1::migrate_frame::Item::End(v1::MigrateEnd {}))).await.map_err(|e| fail(&e))?;
        let body = super::transport::quic::read_frame(&mut recv, MAX_ANSWER_BYTES).await;
        let done = match body {
            Ok(Some(body)) => v1::MigrateDone::decode(body).map_err(|e| format!("undecodable answer: {e}"))?,
            _ => return Err(fail(&"the target ended the transfer without an answer")),
        };
        for c in std::iter::once(&conn).chain(&control) {
            c.close(0u32.into(), b"migration done");
        }
        Ok::<_, String>(done)
    })
    .await;
    // The closes go out in the background: the session waits no more.
    tokio::spawn(async move { endpoint.wait_idle().await });
    let done = sent.map_err(|_| format!("the transfer took longer than {TRANSFER_LIMIT:?}"))??;
    match &done.error {
        Some(e) => Err(format!("the target refused the session: {} (CUDA error {})", e.message, e.code)),
        None => Ok(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head and the piece sent after it make the frame `frame::encode`
    /// makes of the same `MemChunk`, and decode back to it.
    #[test]
    fn a_memory_frame_head_and_its_piece_are_the_encoded_frame() {
        for (addr, len) in [(0x7f00_0000_0000u64, CHUNK_BYTES), (1, 0), (0, 300), (u64::MAX, 127)] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let chunk = v1::MemChunk { addr, data: Bytes::from(data.clone()) };
            let item = v1::migrate_frame::Item::Memory(chunk.clone());
            let whole = frame::encode(&v1::MigrateFrame { item: Some(item.clone()) });
            let mut ours = memory_frame_head(addr, len).to_vec();
            ours.extend_from_slice(&data);
            // The encoder leaves zero values out; the head writes them.
            if addr != 0 && len != 0 {
                assert_eq!(ours, whole.to_vec(), "addr {addr:#x}, {len} bytes");
            }
            let header: [u8; frame::HEADER_LEN] = ours[..frame::HEADER_LEN].try_into().expect("header");
            assert_eq!(frame::decode_header(header, usize::MAX), Ok(ours.len() - frame::HEADER_LEN));
            let back = v1::MigrateFrame::decode(&ours[frame::HEADER_LEN..]).expect("decodes");
            assert_eq!(back.item, Some(item));
        }
    }
}
