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
use gpupool_proto::v1::call::Op;
use gpupool_proto::{PROTOCOL_VERSION, cuda, frame, v1};
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
    /// Of those, bytes sent while the session still ran (pre-copy) and not
    /// written since, so not sent again during the pause.
    pub precopied: u64,
    /// How long the session ran no call: from its stop (after the pre-copy)
    /// to the client's redirect.
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
    /// Complete uploads the session had staged and not used yet.
    pub(crate) uploads: Vec<crate::staging::StagedUpload>,
}

/// Pieces of memory read ahead on the session's thread while the one
/// before is sent.
const READS_AHEAD: usize = 4;

/// `MigrateFrame` fields of a `MemChunk` sent by [`memory_frame_head`].
const MEMORY_FIELD: u32 = 3;
const PRECOPY_FIELD: u32 = 7;

/// The frame of a `MigrateFrame` carrying `MemChunk { addr, data }` up to
/// its data, which the caller sends after it unchanged: the frame as
/// `frame::encode` makes it, without copying the piece into it.
fn memory_frame_head(field: u32, addr: u64, data_len: usize) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let data_len = data_len as u64;
    let chunk = (key_len(1) + encoded_len_varint(addr) + key_len(2) + encoded_len_varint(data_len)) as u64 + data_len;
    let frame = key_len(field) as u64 + encoded_len_varint(chunk) as u64 + chunk;
    let mut head = bytes::BytesMut::with_capacity(32);
    head.extend_from_slice(&(frame as u32).to_le_bytes());
    encode_key(field, WireType::LengthDelimited, &mut head);
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

/// The source's connection to a target that accepted a migrating session
/// (redirected to a worker process when the target has them).
pub(crate) struct Link {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    /// The target's first connection, kept open while a worker receives.
    control: Option<quinn::Connection>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Pre-copied bytes the target keeps (0: no pre-copy).
    precopy_bytes: u64,
    /// Whether the `Hello` announced a pre-copy.
    precopy: bool,
}

impl Link {
    fn fail(&self, e: &dyn std::fmt::Display) -> String {
        refusal(&self.conn).unwrap_or_else(|| e.to_string())
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let r = self.send.write_all(bytes).await;
        r.map_err(|e| self.fail(&e))
    }

    /// Closes the connections; the closes go out in the background.
    fn close(self, why: &[u8]) {
        for c in std::iter::once(&self.conn).chain(&self.control) {
            c.close(0u32.into(), why);
        }
        let endpoint = self.endpoint;
        tokio::spawn(async move { endpoint.wait_idle().await });
    }
}

/// Opens a migration to `target`: `migrate` is the session's range and,
/// without a pre-copy, everything the target needs to know up front.
pub(crate) async fn connect(target: &MigrationTarget, migrate: v1::MigrateIn) -> Result<Link, String> {
    let bind: SocketAddr = if target.address.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|e: std::net::AddrParseError| e.to_string())?;
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("cannot bind {bind}: {e}"))?;
    endpoint.set_default_client_config(client_config(target)?);
    let precopy = migrate.precopy;
    let hello = v1::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_build: concat!("gpupool-server ", env!("CARGO_PKG_VERSION"), " (migration)").into(),
        token: target.token.clone(),
        resume: None,
        bulk: None,
        rdma: None,
        migrate: Some(migrate),
    };
    let opened = tokio::time::timeout(TRANSFER_LIMIT, async {
        let (first, send, recv, welcome) = open(&endpoint, target.address, &target.server_name, &hello).await?;
        // A target with worker processes sends the session on to one, as
        // it does a client; its first connection stays open meanwhile.
        match welcome.redirect {
            Some(redirect) => {
                let port = u16::try_from(redirect.port).map_err(|_| format!("redirect to port {}", redirect.port))?;
                let worker = SocketAddr::new(target.address.ip(), port);
                let hello = v1::Hello { token: redirect.ticket, ..hello.clone() };
                let (conn, send, recv, welcome) = open(&endpoint, worker, &target.server_name, &hello).await?;
                if welcome.redirect.is_some() {
                    return Err("the target redirected twice".into());
                }
                Ok((conn, Some(first), send, recv, welcome.precopy_bytes))
            }
            None => Ok((first, None, send, recv, welcome.precopy_bytes)),
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no answer from {} within {TRANSFER_LIMIT:?}", target.address)));
    match opened {
        Ok((conn, control, send, recv, precopy_bytes)) => {
            Ok(Link { endpoint, conn, control, send, recv, precopy_bytes, precopy })
        }
        Err(e) => {
            tokio::spawn(async move { endpoint.wait_idle().await });
            Err(e)
        }
    }
}

/// A piece of memory being read on the session's thread.
type PieceRead = oneshot::Receiver<Result<Vec<u8>, crate::error::CallError>>;

/// Reads pieces of the session's memory on its thread, [`READS_AHEAD`]
/// ahead of the one the caller sends.
struct Reads<'a, I: Iterator<Item = (u64, u64)>> {
    work: &'a tokio::sync::mpsc::Sender<super::thread::Work>,
    pieces: I,
    pending: std::collections::VecDeque<(u64, PieceRead)>,
}

impl<I: Iterator<Item = (u64, u64)>> Reads<'_, I> {
    async fn next(&mut self) -> Result<Option<(u64, Vec<u8>)>, String> {
        let ended = || "the session has ended".to_string();
        while self.pending.len() < READS_AHEAD {
            let Some((addr, len)) = self.pieces.next() else { break };
            let (tx, rx) = oneshot::channel();
            self.work.send(super::thread::Work::ExportMemory(addr, len, tx)).await.map_err(|_| ended())?;
            self.pending.push_back((addr, rx));
        }
        let Some((addr, rx)) = self.pending.pop_front() else { return Ok(None) };
        let data = rx.await.map_err(|_| ended())?.map_err(|e| e.message)?;
        Ok(Some((addr, data)))
    }
}

/// The pieces `ranges` are sent in.
fn pieces(ranges: &[(u64, u64)]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let chunk = CHUNK_BYTES as u64;
    ranges.iter().flat_map(move |&(addr, size)| {
        (0..size.div_ceil(chunk)).map(move |i| (addr + i * chunk, chunk.min(size - i * chunk)))
    })
}

/// A pre-copy done.
pub(crate) struct Precopied {
    /// The open link to the target.
    pub(crate) link: Link,
    /// The pieces sent, by (address, length).
    pub(crate) sent: std::collections::HashSet<(u64, u64)>,
    /// The mappings announced to the target (address, size), which it
    /// created then and wrote the pieces into.
    pub(crate) mapped: Vec<(u64, u64)>,
}

/// A `Calls` frame of one `MemMap` per mapping: how a pre-copy announces
/// the session's mappings before their pieces (a target that keeps pieces
/// in host memory runs it as any batch).
fn mappings_frame(mappings: &[(u64, u64)]) -> Bytes {
    let calls = mappings.iter().map(|&(addr, size)| v1::Call { op: Some(Op::MemMap(v1::MemMap { addr, size })) });
    let batch = v1::Batch { seq: 0, calls: calls.collect() };
    frame::encode(&v1::MigrateFrame { item: Some(v1::migrate_frame::Item::Calls(batch)) })
}

/// The calls that re-create a session (`calls`, its mappings' `MemMap`s
/// first) on a target that holds `mapped` already (the mappings a
/// pre-copy announced): those gone or resized since are unmapped first,
/// those still there are not mapped again. Their contents are tracked as
/// written (`Dirty`), so they go again.
fn calls_on_target(calls: &[v1::Call], mapped: &[(u64, u64)]) -> Vec<v1::Call> {
    use std::collections::HashSet;
    let map_of = |c: &v1::Call| match &c.op {
        Some(Op::MemMap(m)) => Some((m.addr, m.size)),
        _ => None,
    };
    let now: HashSet<(u64, u64)> = calls.iter().filter_map(map_of).collect();
    let there: HashSet<(u64, u64)> = mapped.iter().copied().collect();
    let gone = mapped.iter().filter(|m| !now.contains(m));
    let unmaps = gone.map(|&(addr, _)| v1::Call { op: Some(Op::MemUnmap(v1::MemUnmap { addr })) });
    let rest = calls.iter().filter(|c| !map_of(c).is_some_and(|m| there.contains(&m))).cloned();
    unmaps.chain(rest).collect()
}

/// Why a pre-copy failed, and what the migration does next.
#[derive(Debug)]
pub(crate) enum PrecopyFailed {
    /// The session itself refused before anything began (it holds what
    /// cannot move): the migration ends here and the session is not
    /// stopped.
    Stays(String),
    /// The target refused or could not be reached: no second try.
    Target(String),
    /// The pre-copy broke off: everything goes after the stop instead.
    Retry(String),
}

impl PrecopyFailed {
    pub(crate) fn reason(&self) -> &str {
        match self {
            Self::Stays(r) | Self::Target(r) | Self::Retry(r) => r,
        }
    }
}

/// Pre-copy, while the session still runs: its writes are tracked from now
/// on, a migration to `target` is opened, the session's mappings are
/// announced (the target creates them at once) and their contents go to
/// it (as much as the target takes), which writes each piece as it
/// arrives.
pub(crate) async fn precopy(
    target: &MigrationTarget,
    work: &tokio::sync::mpsc::Sender<super::thread::Work>,
) -> Result<Precopied, PrecopyFailed> {
    let (tx, rx) = oneshot::channel();
    let ended = || "the session has ended".to_string();
    work.send(super::thread::Work::PrecopyStart(tx)).await.map_err(|_| PrecopyFailed::Retry(ended()))?;
    let start = match rx.await.map_err(|_| PrecopyFailed::Retry(ended()))? {
        Ok(start) => start,
        // `SessionState::movable` said no: nothing began.
        Err(e) if e.code == cuda::NOT_SUPPORTED => return Err(PrecopyFailed::Stays(e.message)),
        Err(e) => return Err(PrecopyFailed::Retry(e.message)),
    };
    let total = start.mappings.iter().map(|&(_, size)| size).sum();
    let migrate = v1::MigrateIn {
        va_base: start.va_base,
        va_size: start.va_size,
        memory_bytes: total,
        precopy: true,
        ..Default::default()
    };
    let mut link = connect(target, migrate).await.map_err(PrecopyFailed::Target)?;
    // A target that takes no pre-copy (`Welcome.precopy_bytes` 0) gets
    // nothing before the stop, not even the mappings.
    let mappings = if link.precopy_bytes > 0 { start.mappings } else { Vec::new() };
    let mut budget = link.precopy_bytes;
    let within = pieces(&mappings).take_while(move |&(_, len)| {
        let fits = len <= budget;
        budget = budget.saturating_sub(len);
        fits
    });
    let mut reads = Reads { work, pieces: within, pending: Default::default() };
    let mut sent = std::collections::HashSet::new();
    let link_ref = &mut link;
    let sending = async {
        let link = link_ref;
        if !mappings.is_empty() {
            link.write(&mappings_frame(&mappings)).await?;
        }
        while let Some((addr, data)) = reads.next().await? {
            link.write(&memory_frame_head(PRECOPY_FIELD, addr, data.len())).await?;
            let len = data.len() as u64;
            let r = link.send.write_chunk(Bytes::from(data)).await;
            r.map_err(|e| link.fail(&e))?;
            sent.insert((addr, len));
        }
        Ok::<_, String>(())
    };
    let done = tokio::time::timeout(TRANSFER_LIMIT, sending)
        .await
        .unwrap_or_else(|_| Err(format!("the pre-copy took longer than {TRANSFER_LIMIT:?}")));
    drop(reads);
    match done {
        Ok(()) => Ok(Precopied { link, sent, mapped: mappings }),
        Err(e) => {
            link.close(b"pre-copy failed");
            Err(PrecopyFailed::Retry(e))
        }
    }
}

/// The target's record of a pre-copy before the session stops (sans I/O:
/// the frames' checks, tested without a connection). The source announces
/// the session's mappings (a `Calls` frame of `MemMap`s), which the target
/// creates at once, then sends their contents in pieces, each written to
/// the device as it arrives; only its address and length stay here, until
/// the source names it as unchanged after the stop. A source that announces
/// no mappings (one built before pieces were written on arrival) has its
/// pieces kept in host memory and written when named, as it expects.
#[derive(Debug)]
pub(crate) struct PrecopyIn {
    /// The mappings announced, by address: their size.
    mappings: std::collections::BTreeMap<u64, u64>,
    /// The pieces received and not named yet, by address: their length, and
    /// their data while kept in host memory.
    pieces: std::collections::BTreeMap<u64, (u64, Option<Bytes>)>,
    /// Bytes received, at most `max_bytes`, in at most `max_pieces` pieces.
    received: u64,
    max_bytes: u64,
    max_pieces: usize,
}

/// What becomes of a pre-copied piece that arrived.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Written to the device now (inside a mapping announced).
    Write(Bytes),
    /// Kept until it is named (no mappings were announced).
    Kept,
}

/// A pre-copied piece named unchanged after the stop.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Named {
    /// On the device since it arrived: its length.
    Written(u64),
    /// Kept in host memory: write it now.
    Kept(Bytes),
}

/// Whether `[addr, end)` overlaps a range of `ranges` (start: length).
fn overlaps<V>(ranges: &std::collections::BTreeMap<u64, V>, addr: u64, end: u64, len: impl Fn(&V) -> u64) -> bool {
    ranges.range(..end).next_back().is_some_and(|(&start, v)| start.saturating_add(len(v)) > addr)
}

impl PrecopyIn {
    /// A pre-copy of a session of `memory_bytes` (as `MigrateIn` says) in a
    /// device of `granularity`, of which at most `max_bytes` are sent.
    pub(crate) fn new(max_bytes: u64, memory_bytes: u64, granularity: u64) -> Self {
        // Pieces are `CHUNK_BYTES` but a mapping's last, and a mapping is
        // at least one granule.
        let pieces = max_bytes.div_ceil(CHUNK_BYTES as u64).saturating_add(memory_bytes / granularity.max(1));
        Self {
            mappings: Default::default(),
            pieces: Default::default(),
            received: 0,
            max_bytes,
            max_pieces: usize::try_from(pieces).unwrap_or(usize::MAX),
        }
    }

    /// A batch of calls before the stop: the mappings' `MemMap`s only,
    /// before any piece. The batch then runs as a client's would (range,
    /// granularity and quota checks).
    pub(crate) fn announce(&mut self, batch: &v1::Batch) -> Result<(), String> {
        if !self.pieces.is_empty() {
            return Err("mappings announced after pre-copied pieces".into());
        }
        for call in &batch.calls {
            let Some(Op::MemMap(m)) = &call.op else {
                return Err("a pre-copy announces mappings only (`MemMap` calls) before the final frame".into());
            };
            let end = m.addr.checked_add(m.size).filter(|_| m.size > 0);
            let end = end.ok_or_else(|| format!("an announced mapping at {:#x} of {} bytes", m.addr, m.size))?;
            if overlaps(&self.mappings, m.addr, end, |&size| size) {
                return Err(format!("an announced mapping at {:#x} overlaps another", m.addr));
            }
            self.mappings.insert(m.addr, m.size);
        }
        Ok(())
    }

    /// A pre-copied piece: where it may be, and what becomes of it.
    pub(crate) fn arrive(&mut self, addr: u64, data: Bytes) -> Result<Arrival, String> {
        let len = data.len() as u64;
        if len == 0 {
            return Err(format!("an empty pre-copied piece at {addr:#x}"));
        }
        let end = addr.checked_add(len).ok_or_else(|| format!("a pre-copied piece at {addr:#x} overflows"))?;
        if self.pieces.contains_key(&addr) {
            return Err(format!("a piece at {addr:#x} pre-copied twice"));
        }
        if overlaps(&self.pieces, addr, end, |&(len, _)| len) {
            return Err(format!("a pre-copied piece at {addr:#x} overlaps another"));
        }
        let keep = self.mappings.is_empty();
        let inside = self.mappings.range(..=addr).next_back().is_some_and(|(&start, &size)| end <= start + size);
        if !keep && !inside {
            return Err(format!("a pre-copied piece at {addr:#x} (+{len}) outside the mappings announced"));
        }
        if self.received.saturating_add(len) > self.max_bytes {
            return Err(format!("more pre-copied memory than the {} bytes agreed", self.max_bytes));
        }
        if self.pieces.len() >= self.max_pieces {
            return Err(format!("more than {} pre-copied pieces", self.max_pieces));
        }
        self.received += len;
        if keep {
            self.pieces.insert(addr, (len, Some(data)));
            return Ok(Arrival::Kept);
        }
        self.pieces.insert(addr, (len, None));
        Ok(Arrival::Write(data))
    }

    /// A piece named unchanged after the stop (each piece once, with the
    /// length it was sent with).
    pub(crate) fn name(&mut self, piece: &v1::PieceRef) -> Result<Named, String> {
        match self.pieces.remove(&piece.addr) {
            Some((len, data)) if len == piece.size => Ok(data.map_or(Named::Written(len), Named::Kept)),
            Some((len, _)) => {
                Err(format!("a pre-copied piece at {:#x} named with {} bytes, sent with {len}", piece.addr, piece.size))
            }
            None => Err(format!("a pre-copied piece at {:#x} that was not sent, or named twice", piece.addr)),
        }
    }
}

/// Sends a session to `target` and returns its answer (no pre-copy).
pub(crate) async fn send_session(
    target: &MigrationTarget,
    images: &ImageCache,
    out: Outgoing,
) -> Result<v1::MigrateDone, String> {
    let ex = &out.exported;
    let migrate = v1::MigrateIn {
        va_base: ex.va_base,
        va_size: ex.va_size,
        memory_bytes: ex.memory_bytes(),
        received_seq: out.received_seq,
        replies_acked: out.replies_acked,
        replies_forgotten: out.replies_forgotten,
        precopy: false,
    };
    let link = connect(target, migrate).await?;
    let precopied = Precopied { link, sent: Default::default(), mapped: Vec::new() };
    Ok(finish(precopied, images, out).await?.0)
}

/// How long a migration waits for the image cache to finish checking the
/// images sessions loaded just before.
const IMAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends the rest of a session to the target `link` leads to, now that it
/// stopped, and returns the target's answer and the bytes not sent again:
/// pieces pre-copied (`sent`) that the session did not write since are
/// named, and the mappings announced are not created again.
pub(crate) async fn finish(
    Precopied { mut link, sent: precopied, mapped }: Precopied,
    images: &ImageCache,
    out: Outgoing,
) -> Result<(v1::MigrateDone, u64), String> {
    // An image the session loaded just before is checked and cached by the
    // cache's own thread: wait for it (bounded), so that the target gets
    // every image the session's modules need.
    if !images.flushed(IMAGE_WAIT).await {
        tracing::warn!("module images still being checked when the migration sent the session's images");
    }
    let precopied = &precopied;
    let mut reused = 0u64;
    let sent = tokio::time::timeout(TRANSFER_LIMIT, async {
        let ex = &out.exported;
        let write = |item: v1::migrate_frame::Item| frame::encode(&v1::MigrateFrame { item: Some(item) });
        let mut frames = Vec::new();
        if link.precopy {
            frames.push(write(v1::migrate_frame::Item::Final(v1::MigrateFinal {
                memory_bytes: ex.memory_bytes(),
                received_seq: out.received_seq,
                replies_acked: out.replies_acked,
                replies_forgotten: out.replies_forgotten,
            })));
        }
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
        let calls = calls_on_target(&ex.calls, &mapped);
        frames.push(write(v1::migrate_frame::Item::Calls(v1::Batch { seq: 0, calls })));
        for (transfer_id, total, chunks) in &out.uploads {
            for (offset, data) in chunks {
                let (transfer_id, total, offset) = (*transfer_id, *total, *offset);
                let chunk = v1::StagedChunk { transfer_id, total, offset, data: data.clone() };
                frames.push(write(v1::migrate_frame::Item::Staged(chunk)));
            }
        }
        for reply in &out.replies {
            frames.push(write(v1::migrate_frame::Item::Reply(reply.clone())));
        }
        for f in frames {
            link.write(&f).await?;
        }
        // Pieces pre-copied and not written since are named; the others
        // are read on the session's thread ahead of the one sent, and the
        // target writes behind the one it receives.
        let unchanged = |addr: u64, len: u64| {
            precopied.contains(&(addr, len)) && ex.precopy_dirty.as_ref().is_some_and(|d| !d.touches(addr, len))
        };
        for (addr, len) in pieces(&ex.memory).filter(|&(a, l)| unchanged(a, l)) {
            link.write(&write(v1::migrate_frame::Item::Precopied(v1::PieceRef { addr, size: len }))).await?;
            reused += len;
        }
        let fresh = pieces(&ex.memory).filter(|&(a, l)| !unchanged(a, l));
        let mut reads = Reads { work: &out.work, pieces: fresh, pending: Default::default() };
        while let Some((addr, data)) = reads.next().await? {
            link.write(&memory_frame_head(MEMORY_FIELD, addr, data.len())).await?;
            let r = link.send.write_chunk(Bytes::from(data)).await;
            r.map_err(|e| link.fail(&e))?;
        }
        for (addr, shadow) in &ex.mirrors {
            for (i, piece) in shadow.chunks(CHUNK_BYTES).enumerate() {
                let chunk = v1::MemChunk { addr: addr + (i * CHUNK_BYTES) as u64, data: Bytes::copy_from_slice(piece) };
                link.write(&write(v1::migrate_frame::Item::Mirror(chunk))).await?;
            }
        }
        if !ex.calls_after.is_empty() {
            let after = v1::Batch { seq: 0, calls: ex.calls_after.clone() };
            link.write(&write(v1::migrate_frame::Item::Calls(after))).await?;
        }
        link.write(&write(v1::migrate_frame::Item::End(v1::MigrateEnd {}))).await?;
        let body = super::transport::quic::read_frame(&mut link.recv, MAX_ANSWER_BYTES).await;
        match body {
            Ok(Some(body)) => v1::MigrateDone::decode(body).map_err(|e| format!("undecodable answer: {e}")),
            _ => Err(link.fail(&"the target ended the transfer without an answer")),
        }
    })
    .await;
    link.close(b"migration done");
    let done = sent.map_err(|_| format!("the transfer took longer than {TRANSFER_LIMIT:?}"))??;
    match &done.error {
        Some(e) => Err(format!("the target refused the session: {} (CUDA error {})", e.message, e.code)),
        None => Ok((done, reused)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn maps(mappings: &[(u64, u64)]) -> v1::Batch {
        let calls = mappings.iter().map(|&(addr, size)| v1::Call { op: Some(Op::MemMap(v1::MemMap { addr, size })) });
        v1::Batch { seq: 0, calls: calls.collect() }
    }

    fn piece(len: u64) -> Bytes {
        Bytes::from(vec![7u8; len as usize])
    }

    /// Announced mappings take pieces written at once, inside them only,
    /// each address once, without overlaps, within the bytes agreed; a
    /// piece is named once, with the length it was sent with.
    #[test]
    fn a_target_writes_pre_copied_pieces_inside_the_announced_mappings_only() {
        let base = 0x7f00_0000_0000u64;
        let mut pre = PrecopyIn::new(6 * MIB, 8 * MIB, 2 * MIB);
        pre.announce(&maps(&[(base, 4 * MIB), (base + 6 * MIB, 2 * MIB)])).expect("announce");
        assert_eq!(pre.arrive(base, piece(2 * MIB)), Ok(Arrival::Write(piece(2 * MIB))));
        let err = |r: Result<Arrival, String>| r.expect_err("refused");
        assert!(err(pre.arrive(base + 4 * MIB, piece(MIB))).contains("outside the mappings announced"));
        assert!(err(pre.arrive(base + 3 * MIB, piece(2 * MIB))).contains("outside"), "across a mapping's end");
        assert!(err(pre.arrive(base, piece(2 * MIB))).contains("twice"));
        assert!(err(pre.arrive(base + MIB, piece(2 * MIB))).contains("overlaps"));
        assert!(err(pre.arrive(base + 2 * MIB, Bytes::new())).contains("empty"));
        assert!(err(pre.arrive(u64::MAX - 3, piece(8))).contains("overflows"));
        let mut pre = PrecopyIn::new(4 * MIB, 8 * MIB, 2 * MIB);
        pre.announce(&maps(&[(base, 8 * MIB)])).expect("announce");
        pre.arrive(base, piece(2 * MIB)).expect("first");
        pre.arrive(base + 2 * MIB, piece(2 * MIB)).expect("second");
        assert!(err(pre.arrive(base + 4 * MIB, piece(1))).contains("bytes agreed"), "past Welcome.precopy_bytes");
        assert!(pre.name(&v1::PieceRef { addr: base, size: MIB }).expect_err("size").contains("sent with"));
        assert_eq!(pre.name(&v1::PieceRef { addr: base + 2 * MIB, size: 2 * MIB }), Ok(Named::Written(2 * MIB)));
        let twice = pre.name(&v1::PieceRef { addr: base + 2 * MIB, size: 2 * MIB });
        assert!(twice.expect_err("named twice").contains("not sent"));
        assert!(pre.name(&v1::PieceRef { addr: base + 6 * MIB, size: 2 * MIB }).is_err(), "never sent");
    }

    /// Before the stop, calls announce mappings only, before any piece; a
    /// source that announces none (one from before pieces were written on
    /// arrival) has its pieces kept and written when named.
    #[test]
    fn a_pre_copy_announces_mappings_only_and_unannounced_pieces_are_kept() {
        let base = 0x7f00_0000_0000u64;
        let mut pre = PrecopyIn::new(8 * MIB, 8 * MIB, 2 * MIB);
        let stream = v1::Call { op: Some(Op::StreamCreate(v1::StreamCreate { stream: 1, flags: 0, priority: 0 })) };
        let e = pre.announce(&v1::Batch { seq: 0, calls: vec![stream] }).expect_err("not a mapping");
        assert!(e.contains("mappings only"), "{e}");
        assert!(pre.announce(&maps(&[(base, 0)])).is_err(), "an empty mapping");
        assert!(pre.announce(&maps(&[(u64::MAX - MIB, 2 * MIB)])).is_err(), "past the address space");
        let e = pre.announce(&maps(&[(base, 4 * MIB), (base + 2 * MIB, 2 * MIB)])).expect_err("overlap");
        assert!(e.contains("overlaps"), "{e}");

        let mut old = PrecopyIn::new(8 * MIB, 8 * MIB, 2 * MIB);
        assert_eq!(old.arrive(base, piece(2 * MIB)), Ok(Arrival::Kept));
        let e = old.announce(&maps(&[(base, 2 * MIB)])).expect_err("too late");
        assert!(e.contains("after pre-copied pieces"), "{e}");
        assert_eq!(old.name(&v1::PieceRef { addr: base, size: 2 * MIB }), Ok(Named::Kept(piece(2 * MIB))));
    }

    /// Pieces past what an honest source sends (full chunks, and a
    /// mapping's last) are refused: tiny pieces cannot grow the record.
    #[test]
    fn pre_copied_pieces_are_bounded_in_number() {
        let base = 0x7f00_0000_0000u64;
        let mut pre = PrecopyIn::new(4 * MIB, 4 * MIB, 2 * MIB);
        pre.announce(&maps(&[(base, 4 * MIB)])).expect("announce");
        let mut refused = None;
        for i in 0..8 {
            if let Err(e) = pre.arrive(base + i * 4096, piece(16)) {
                refused = Some((i, e));
                break;
            }
        }
        let (i, e) = refused.expect("refused");
        assert_eq!(i, 4, "2 chunks and 2 granules' worth of mappings");
        assert!(e.contains("pieces"), "{e}");
    }

    /// The final calls on a target holding the announced mappings: those
    /// still there are not mapped again, those gone or resized are unmapped
    /// first, new ones mapped; everything else stays in order.
    #[test]
    fn the_final_calls_keep_the_announced_mappings_that_still_exist() {
        let call = |op| v1::Call { op: Some(op) };
        let map = |addr, size| call(Op::MemMap(v1::MemMap { addr, size }));
        let unmap = |addr| call(Op::MemUnmap(v1::MemUnmap { addr }));
        let stream = call(Op::StreamCreate(v1::StreamCreate { stream: 3, flags: 0, priority: 0 }));
        let calls = vec![map(0x1000, 10), map(0x3000, 20), map(0x5000, 5), stream.clone()];
        let mapped = [(0x1000, 10), (0x3000, 10), (0x4000, 8)];
        let want = vec![unmap(0x3000), unmap(0x4000), map(0x3000, 20), map(0x5000, 5), stream];
        assert_eq!(calls_on_target(&calls, &mapped), want);
        assert_eq!(calls_on_target(&calls, &[]), calls, "nothing announced: every call");
    }

    /// The head and the piece sent after it make the frame `frame::encode`
    /// makes of the same `MemChunk`, and decode back to it.
    #[test]
    fn a_memory_frame_head_and_its_piece_are_the_encoded_frame() {
        let cases = [(0x7f00_0000_0000u64, CHUNK_BYTES), (1, 0), (0, 300), (u64::MAX, 127)];
        for ((addr, len), precopy) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let chunk = v1::MemChunk { addr, data: Bytes::from(data.clone()) };
            let (item, field) = if precopy {
                (v1::migrate_frame::Item::Precopy(chunk.clone()), PRECOPY_FIELD)
            } else {
                (v1::migrate_frame::Item::Memory(chunk.clone()), MEMORY_FIELD)
            };
            let whole = frame::encode(&v1::MigrateFrame { item: Some(item.clone()) });
            let mut ours = memory_frame_head(field, addr, len).to_vec();
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
