//! Fuzz targets for the decoders of this crate that read bytes from the
//! network or from another process (`docs/fuzzing.md`): frames, every
//! data-plane message the server or a worker decodes, lz4 payloads, the
//! resumption replay log, and the RDMA command channel (its messages, and a
//! connection fed anything). Each runs a bounded number of cases on stable
//! Rust; `GPUPOOL_FUZZ_CASES=100000 cargo test -p gpupool-proto --test fuzz`
//! runs longer.
//!
//! Every target checks that decoding returns a value or an error, never a
//! panic, and that what it allocates is bounded by the bytes received, not
//! by a length the input claims: a counting allocator measures the peak of
//! each decode on its own thread.
#![allow(unsafe_code)]

use bytes::Bytes;
use gpupool_proto::frame::{self, FrameDecoder, FrameError};
use gpupool_proto::fuzz::{config, mutate, mutations};
use gpupool_proto::payload::{self, PayloadError};
use gpupool_proto::rdma::wire::{self as rdma_wire, Hello as RdmaHello, Message as RdmaMessage};
use gpupool_proto::rdma::{self, Connection, Event, Op, RemoteRegion, Role};
use gpupool_proto::replay::{ReplayLimit, ReplayLog};
use gpupool_proto::v1;
use proptest::prelude::*;
use prost::Message;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Counts the bytes live on each thread and their peak.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: nothing is counted while the thread's locals are torn down.
    let _ = LIVE.try_with(|live| {
        live.set(live.get() + delta);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
    });
}

// SAFETY: every call is forwarded to `System` with the caller's arguments;
// the counting touches only const-initialised thread locals, which do not
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// `f`'s result and the most bytes it held allocated at once.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let r = f();
    (r, (PEAK.with(Cell::get) - start).max(0) as usize)
}

/// What decoding `n` bytes may allocate: decoded structs are larger than
/// their encoding (an empty `Call` is 2 bytes on the wire and ~100 in
/// memory, and vectors grow by doubling), but by a constant factor.
fn alloc_bound(n: usize) -> usize {
    256 * n + (64 << 10)
}

/// Valid messages of every kind the server, a worker or the supervisor
/// decodes, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let payload = |data: &[u8]| payload::encode(Bytes::copy_from_slice(data), payload::Compression::Off);
    let lz4 = payload::encode(Bytes::from(vec![5u8; 8192]), payload::Compression::Auto);
    let calls = vec![
        v1::call::Op::MemMap(v1::MemMap { addr: 1 << 40, size: 2 << 20 }),
        v1::call::Op::MemcpyHtod(v1::MemcpyHtoD {
            dst: 1 << 40,
            stream: 1,
            source: Some(v1::memcpy_hto_d::Source::Inline(lz4.clone())),
            asynchronous: true,
        }),
        v1::call::Op::ModuleLoad(v1::ModuleLoad {
            module: 1,
            sha256: Bytes::from(vec![7; 32]),
            image: Some(payload(gpupool_proto::BUILTIN_MODULE)),
            staged: None,
        }),
        v1::call::Op::Launch(v1::Launch {
            module: 1,
            function: 2,
            grid: Some(v1::Dim3 { x: 4, y: 1, z: 1 }),
            block: Some(v1::Dim3 { x: 128, y: 1, z: 1 }),
            params: Bytes::from(vec![1; 24]),
            ..Default::default()
        }),
        v1::call::Op::TensorMapEncode(v1::TensorMapEncode {
            rank: 2,
            global_dim: vec![64, 64],
            global_strides: vec![256],
            box_dim: vec![8, 8],
            element_strides: vec![1, 1],
            ..Default::default()
        }),
        v1::call::Op::JitLink(v1::JitLink {
            options: vec![v1::JitOption { option: 7, value: 3 }],
            inputs: vec![v1::JitLinkInput {
                r#type: 1,
                name: "a.ptx".into(),
                data: Some(v1::jit_link_input::Data::Inline(payload(b".version 8.0"))),
                options: vec![],
            }],
            info_log_bytes: 64,
            error_log_bytes: 64,
        }),
        v1::call::Op::ContextSynchronize(v1::ContextSynchronize {}),
    ];
    let batch = v1::Batch { seq: 3, calls: calls.into_iter().map(|op| v1::Call { op: Some(op) }).collect() };
    let event = |e| v1::WorkerEvent { event: Some(e) }.encode_to_vec();
    vec![
        v1::Hello {
            protocol_version: gpupool_proto::PROTOCOL_VERSION,
            client_build: "gpupool-client 0.1".into(),
            token: "gpl1.abc.def".into(),
            resume: Some(v1::Resume { session_id: 9, secret: "s".into(), acked_seq: 4 }),
            bulk: None,
            migrate: None,
            rdma: Some(v1::RdmaOffer { device: "mlx5_0".into(), core_version: 1 }),
        }
        .encode_to_vec(),
        v1::Hello {
            protocol_version: gpupool_proto::PROTOCOL_VERSION,
            client_build: "gpupool-client 0.1".into(),
            bulk: Some(v1::BulkAttach { session_id: 9, secret: "b".into(), index: 3 }),
            ..Default::default()
        }
        .encode_to_vec(),
        batch.encode_to_vec(),
        v1::BulkRequest {
            op: Some(v1::bulk_request::Op::Put(v1::BulkPut {
                transfer_id: 1,
                total_size: 1 << 20,
                offset: 4096,
                data: Some(lz4),
            })),
        }
        .encode_to_vec(),
        v1::BulkRequest { op: Some(v1::bulk_request::Op::Get(v1::BulkGet { transfer_id: 1, offset: 0, size: 4096 })) }
            .encode_to_vec(),
        v1::WorkerSpec {
            device: "emulated:1073741824".into(),
            listen_ip: "127.0.0.1".into(),
            cert_chain_der: vec![Bytes::from(vec![0x30; 40])],
            key_der: Bytes::from(vec![0x30; 20]),
            memory_quota: 1 << 30,
            max_frame_bytes: 16 << 20,
            port_low: 40000,
            port_high: 40100,
            ..Default::default()
        }
        .encode_to_vec(),
        v1::WorkerAssign {
            ticket: "t".into(),
            subject: "tenant".into(),
            memory_quota: 1 << 30,
            session_id: 5,
            resume_secret: "r".into(),
            resume: true,
            ..Default::default()
        }
        .encode_to_vec(),
        v1::WorkerAssign {
            memory: Some(v1::MemoryAnswer { seq: 3, error: String::new(), ok: true }),
            ..Default::default()
        }
        .encode_to_vec(),
        event(v1::worker_event::Event::Memory(v1::MemoryRequest { kind: 0, seq: 3, bytes: 1 << 20, ok: false })),
        event(v1::worker_event::Event::Ready(v1::WorkerReady {
            port: 40001,
            pid: 77,
            backend: "emulated".into(),
            device_name: "emu".into(),
            shm_socket: String::new(),
            total_memory: 1 << 34,
        })),
        event(v1::worker_event::Event::Metrics(v1::WorkerMetrics { calls: 5, ..Default::default() })),
        v1::Hello {
            protocol_version: gpupool_proto::PROTOCOL_VERSION,
            token: "gpl1.abc.def".into(),
            migrate: Some(v1::MigrateIn {
                va_base: 1 << 44,
                va_size: 1 << 26,
                memory_bytes: 1 << 21,
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec(),
        v1::MigrateFrame {
            item: Some(v1::migrate_frame::Item::Memory(v1::MemChunk { addr: 1 << 44, data: vec![7; 64].into() })),
        }
        .encode_to_vec(),
        v1::MigrateFrame {
            item: Some(v1::migrate_frame::Item::Image(v1::ImageChunk {
                sha256: vec![1; 32].into(),
                total_size: 100,
                offset: 0,
                data: vec![2; 50].into(),
            })),
        }
        .encode_to_vec(),
        v1::Moved { address: "127.0.0.1:4433".into(), token: "t".into(), session_id: 3, ..Default::default() }
            .encode_to_vec(),
    ]
}

/// Decodes `bytes` as every message the servers decode; checks the
/// allocation bound and that what decodes encodes again.
fn decode_all(bytes: &[u8]) -> Result<(), TestCaseError> {
    fn one<M: Message + Default>(bytes: &[u8]) -> Result<(), TestCaseError> {
        let input = Bytes::copy_from_slice(bytes);
        let (decoded, peak) = peak_of(|| M::decode(input.clone()));
        prop_assert!(peak <= alloc_bound(bytes.len()), "{} bytes decoded with a peak of {peak}", bytes.len());
        if let Ok(m) = decoded {
            // Unknown fields are skipped, so the encoding is at most as long,
            // but for repeated scalars sent unpacked: packed again, a single
            // element takes a length byte more (at worst 3 bytes for 2).
            let len = m.encoded_len();
            prop_assert!(len <= bytes.len() + bytes.len() / 2, "{} bytes encode again as {len}", bytes.len());
            // What decodes encodes to what decodes again, as long (equality
            // would not do: a NaN float is not equal to itself).
            let again = M::decode(m.encode_to_vec().as_slice()).map(|m| m.encoded_len());
            prop_assert_eq!(again.ok(), Some(len));
        }
        Ok(())
    }
    one::<v1::Hello>(bytes)?;
    one::<v1::Batch>(bytes)?;
    one::<v1::BulkRequest>(bytes)?;
    one::<v1::WorkerSpec>(bytes)?;
    one::<v1::WorkerAssign>(bytes)?;
    one::<v1::WorkerEvent>(bytes)?;
    // What a server decodes from another moving a session to it, and its
    // answer.
    one::<v1::MigrateFrame>(bytes)?;
    one::<v1::MigrateDone>(bytes)?;
    // What clients decode from a server.
    one::<v1::Welcome>(bytes)?;
    one::<v1::BatchReply>(bytes)?;
    one::<v1::Moved>(bytes)?;
    one::<v1::BulkResponse>(bytes)
}

/// Found by `messages_mutated` in CI: a `Welcome` whose repeated
/// `bulk_ports` came unpacked (tag 14, varint) decodes, and encodes again
/// packed, one byte longer than it came.
#[test]
fn an_unpacked_repeated_field_decodes_and_encodes_again_packed() {
    let bytes = [8u8, 103, 112, 108];
    let w = v1::Welcome::decode(&bytes[..]).expect("decodes");
    assert_eq!((w.session_id, w.bulk_ports.as_slice()), (103, &[108u32][..]));
    assert_eq!(w.encoded_len(), bytes.len() + 1);
    decode_all(&bytes).expect("within the bounds");
}

proptest! {
    #![proptest_config(config(512))]

    /// Raw bytes as every message.
    #[test]
    fn messages_from_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&bytes)?;
    }

    /// Valid messages with a few edits: wrong wire types, cut fields,
    /// lengths and varints at their largest.
    #[test]
    fn messages_mutated(seed in 0usize..64, edits in mutations()) {
        let seeds = seeds();
        decode_all(&mutate(seeds[seed % seeds.len()].clone(), &edits))?;
    }

    /// Frames split anywhere: the decoder yields exactly the frames sent,
    /// refuses announced lengths above its bound before buffering for them,
    /// and holds no more than it was given.
    #[test]
    fn frames(
        bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..6),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        cuts in proptest::collection::vec(1usize..200, 1..8),
    ) {
        const MAX: usize = 256;
        let mut wire = Vec::new();
        for b in &bodies {
            wire.extend_from_slice(&(b.len() as u32).to_le_bytes());
            wire.extend_from_slice(b);
        }
        wire.extend_from_slice(&garbage);
        let mut dec = FrameDecoder::new(MAX);
        let mut got = Vec::new();
        let mut failed = None;
        let mut at = 0;
        for cut in cuts.iter().cycle() {
            if at >= wire.len() || failed.is_some() {
                break;
            }
            let end = (at + cut).min(wire.len());
            dec.push(&wire[at..end]);
            at = end;
            loop {
                match dec.next_frame() {
                    Ok(Some(f)) => {
                        prop_assert!(f.len() <= MAX);
                        got.push(f.to_vec());
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        // The frames within the bound before the first oversize one arrive
        // whole and in order; the oversize one is refused.
        let fitting = bodies.iter().take_while(|b| b.len() <= MAX).count();
        prop_assert!(got.len() >= fitting.min(got.len()));
        prop_assert_eq!(&got[..fitting.min(got.len())], &bodies[..fitting.min(got.len())]);
        if fitting < bodies.len() {
            prop_assert!(matches!(failed, Some(FrameError::TooLarge { .. })), "{:?}", failed);
        }
        if failed.is_none() {
            let _ = dec.finish();
        }
    }

    /// Headers announcing any length: nothing is allocated for the length
    /// itself, only for bytes pushed.
    #[test]
    fn frame_headers_claiming_any_length(len in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let ((), peak) = peak_of(|| {
            let mut dec = FrameDecoder::new(16 << 20);
            dec.push(&len.to_le_bytes());
            dec.push(&tail);
            let _ = dec.next_frame();
            let _ = dec.finish();
        });
        prop_assert!(peak <= 4096, "peak {}", peak);
        let header = frame::decode_header(len.to_le_bytes(), 16 << 20);
        prop_assert_eq!(header.is_ok(), (len as usize) <= 16 << 20);
    }

    /// lz4 and raw payloads: any codec, any announced size, any data. An
    /// announced size the data cannot decompress to is refused before
    /// anything is allocated for it.
    #[test]
    fn payloads(
        codec in -1i32..3,
        raw_len in prop_oneof![0u64..100_000, any::<u64>(), Just(1u64 << 26)],
        data in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let n = data.len();
        let p = v1::Payload { codec, raw_len, data: Bytes::from(data) };
        let (out, peak) = peak_of(|| payload::decode(p, 1 << 26));
        prop_assert!(peak <= 255 * n + 4096, "{} bytes announcing {} decoded with a peak of {}", n, raw_len, peak);
        if let Ok(out) = out {
            prop_assert_eq!(out.len() as u64, raw_len);
        }
    }

    /// Compressed payloads cut or edited after encoding.
    #[test]
    fn payloads_mutated(
        data in proptest::collection::vec(0u8..3, 4096..20_000),
        edits in mutations(),
        announced in prop_oneof![Just(None), (0u64..1 << 26).prop_map(Some)],
    ) {
        let mut p = payload::encode(Bytes::from(data), payload::Compression::Auto);
        p.data = Bytes::from(mutate(p.data.to_vec(), &edits));
        if let Some(len) = announced {
            p.raw_len = len;
        }
        let n = p.data.len();
        let (out, peak) = peak_of(|| payload::decode(p, 1 << 26));
        prop_assert!(peak <= 255 * n + 4096, "peak {} for {} bytes", peak, n);
        if let Err(e) = out {
            prop_assert!(!matches!(e, PayloadError::TooLarge { .. }), "{}", e);
        }
    }

    /// The replay log driven as a peer drives it: any sequence numbers, in
    /// any order, acknowledged at any point. Its bounds hold, and it never
    /// replays more than it keeps.
    #[test]
    fn replay_log(
        frames in 1usize..8,
        bytes in 1usize..4096,
        ops in proptest::collection::vec((any::<bool>(), prop_oneof![0u64..40, any::<u64>()], 0usize..2048), 0..64),
    ) {
        let mut log = ReplayLog::new(ReplayLimit { frames, bytes });
        for (record, seq, len) in ops {
            if record {
                log.record(seq, Bytes::from(vec![0u8; len]));
            } else {
                log.ack(seq);
            }
            prop_assert!(log.len() <= frames);
            prop_assert!(log.bytes() <= bytes);
            let _ = log.covers(seq);
            prop_assert!(log.replay_after(seq.min(50)).len() <= log.len());
        }
    }
}

/// A client's valid RDMA `Hello` and one of each other message, to mutate.
fn rdma_seeds() -> Vec<Vec<u8>> {
    let hello = RdmaMessage::Hello(RdmaHello {
        version: rdma::CORE_VERSION,
        recv_depth: 8,
        recv_buf: 512,
        max_frame: 4096,
        region: RemoteRegion { addr: 0x9000, len: 1 << 16, rkey: 3 },
        slots: 0,
        slot_size: 0,
        get_chunk: 4096,
        gets_in_flight: 4,
        session_id: 1,
        secret: b"secret".to_vec(),
    });
    [
        hello,
        RdmaMessage::Data { last: true, body: b"batch".to_vec() },
        RdmaMessage::PutChunk { id: 1, total: 100, offset: 0, len: 100, slot: 0 },
        RdmaMessage::GetRequest { id: 2, offset: 0, len: 100, dest: 0 },
        RdmaMessage::SlotFree { slot: 1, code: 0 },
        RdmaMessage::Close { code: 0 },
    ]
    .iter()
    .enumerate()
    .map(|(seq, m)| m.encode(1, seq as u64))
    .collect()
}

/// A server-side RDMA connection, handed what arrives as receive
/// completions; sends and writes complete as soon as they are posted.
struct RdmaServer {
    conn: Connection,
    recvs: Vec<u64>,
}

impl RdmaServer {
    fn new() -> RdmaServer {
        let staging = RemoteRegion { addr: 0x1000, len: 1 << 16, rkey: 9 };
        let mut config = rdma::Config::new(Role::Server, staging);
        config.recv_depth = 8;
        config.recv_buf = 512;
        config.slots = 4;
        config.slot_size = 1 << 12;
        let now = std::time::Instant::now();
        let mut server = RdmaServer { conn: Connection::new(config, now).expect("valid config"), recvs: Vec::new() };
        server.conn.handle_established(now);
        server.pump();
        server
    }

    fn pump(&mut self) {
        let now = std::time::Instant::now();
        while let Some(op) = self.conn.poll_op() {
            match op {
                Op::PostRecv { wr_id, .. } => self.recvs.push(wr_id),
                Op::Send { wr_id, .. } | Op::Write { wr_id, .. } => {
                    self.conn.handle_completion(now, wr_id, Ok(()), &[])
                }
                Op::Disconnect => {}
            }
        }
    }

    /// Feeds one receive; whether the connection is still up.
    fn receive(&mut self, bytes: &[u8]) -> bool {
        let Some(wr_id) = self.recvs.pop() else { return false };
        self.conn.handle_completion(std::time::Instant::now(), wr_id, Ok(()), bytes);
        self.pump();
        let mut up = true;
        while let Some(event) = self.conn.poll_event() {
            match event {
                Event::PutChunk { slot, .. } => {
                    let _ = self.conn.release_slot(slot, 0, std::time::Instant::now());
                }
                Event::Ended(_) => up = false,
                _ => {}
            }
        }
        self.pump();
        up && self.conn.state() != rdma::State::Ended
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// RDMA command-channel messages, random or valid ones edited: a value
    /// or an error, and allocation bounded by what arrived.
    #[test]
    fn rdma_messages(seed in 0usize..6, edits in mutations(), bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let seeds = rdma_seeds();
        for input in [bytes, mutate(seeds[seed % seeds.len()].clone(), &edits)] {
            let (_, peak) = peak_of(|| rdma_wire::decode(&input));
            prop_assert!(peak <= alloc_bound(input.len()), "{peak} bytes for {}", input.len());
        }
    }

    /// An RDMA server connection fed a valid `Hello` (or not), then any
    /// receives, edited valid messages among them: it never panics, and
    /// once it has ended it stays ended and asks for nothing but nothing.
    #[test]
    fn rdma_connection_fed_anything(
        hello in any::<bool>(),
        inputs in proptest::collection::vec((0usize..6, mutations(), proptest::collection::vec(any::<u8>(), 0..64), any::<bool>()), 0..24),
    ) {
        let seeds = rdma_seeds();
        let mut server = RdmaServer::new();
        let mut up = !hello || server.receive(&seeds[0]);
        for (seed, edits, raw, edited) in inputs {
            let input = if edited { mutate(seeds[seed].clone(), &edits) } else { raw };
            let still = server.receive(&input);
            prop_assert!(up || !still, "an ended connection came back");
            up = still;
        }
        if !up {
            prop_assert_eq!(server.conn.state(), rdma::State::Ended);
            prop_assert!(server.conn.poll_op().is_none());
            prop_assert!(server.conn.poll_timeout().is_none());
        }
    }
}

/// Messages whose length fields claim far more than was sent: decoding
/// fails without allocating for the claim.
#[test]
fn huge_length_claims_allocate_nothing() {
    let claims: [&[u8]; 3] = [
        // Batch.calls (field 2) claiming 2^62 bytes.
        &[0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f, 0x00],
        // Hello.client_build (field 2) claiming 4 GiB.
        &[0x12, 0x80, 0x80, 0x80, 0x80, 0x10, b'x'],
        // A call (Batch field 2) holding TensorMapEncode (field 27) whose
        // packed global_dim (field 5) claims 2^31 bytes.
        &[0x12, 0x0a, 0xda, 0x01, 0x07, 0x2a, 0x80, 0x80, 0x80, 0x80, 0x08, 0x01],
    ];
    for bytes in claims {
        decode_all(bytes).expect("bounded");
        assert!(v1::Batch::decode(bytes).is_err(), "{bytes:?}");
    }
}

/// A one-byte lz4 payload announcing the largest size allowed used to
/// allocate (and zero) that size before finding the data corrupt.
#[test]
fn lz4_claim_beyond_the_data_is_refused_before_allocating() {
    let p = v1::Payload { codec: v1::Codec::Lz4 as i32, raw_len: 1 << 30, data: Bytes::from_static(&[0]) };
    let (out, peak) = peak_of(|| payload::decode(p, 1 << 30));
    assert!(matches!(out, Err(PayloadError::Corrupt(_))), "{out:?}");
    assert!(peak < 4096, "peak {peak}");
}
