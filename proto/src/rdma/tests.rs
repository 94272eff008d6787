//! Two connections over the in-memory fabric, and one fed by hand.

use super::fabric::{Fabric, Region, Side};
use super::wire::{Hello, Message};
use super::*;
use proptest::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

const CLIENT: usize = 0;
const SERVER: usize = 1;
/// Server: staging (remote write) and the bytes downloads come from.
const STAGING: u32 = 1;
const SERVER_SOURCE: u32 = 3;
/// Client: landing region (remote write) and the bytes uploads come from.
const LANDING: u32 = 1;
const CLIENT_SOURCE: u32 = 2;
const STAGING_RKEY: u32 = 0xAA01;
const LANDING_RKEY: u32 = 0xBB02;
const SESSION: u64 = 42;

#[derive(Debug, Clone, Copy)]
struct Shape {
    depth: u16,
    recv_buf: u32,
    slots: u16,
    slot_size: u32,
    get_chunk: u32,
}

const SMALL: Shape = Shape { depth: 4, recv_buf: 256, slots: 2, slot_size: 4096, get_chunk: 3000 };

fn configs(shape: Shape) -> (Config, Config) {
    let staging =
        RemoteRegion { addr: 0x10_0000, len: u64::from(shape.slots) * u64::from(shape.slot_size), rkey: STAGING_RKEY };
    let landing = RemoteRegion { addr: 0x90_0000, len: 1 << 16, rkey: LANDING_RKEY };
    let mut client = Config::new(Role::Client, landing);
    let mut server = Config::new(Role::Server, staging);
    for c in [&mut client, &mut server] {
        c.recv_depth = shape.depth;
        c.recv_buf = shape.recv_buf;
        c.send_depth = 8;
        c.max_frame = 1 << 20;
        c.max_get_chunk = shape.get_chunk;
        c.max_queued = 64;
        c.session_id = SESSION;
    }
    server.slots = shape.slots;
    server.slot_size = shape.slot_size;
    client.secret = b"session secret".to_vec();
    (client, server)
}

fn region(len: usize, addr: u64, rkey: u32, remote_write: bool) -> Region {
    Region { bytes: vec![0; len], addr, rkey, remote_write }
}

fn fabric_with(client: Config, server: Config, source: &[u8]) -> Fabric {
    let now = Instant::now();
    let mut c_regions = HashMap::new();
    c_regions.insert(LANDING, region(client.region.len as usize, client.region.addr, client.region.rkey, true));
    c_regions.insert(CLIENT_SOURCE, Region { bytes: source.to_vec(), addr: 0, rkey: 0xC0, remote_write: false });
    let mut s_regions = HashMap::new();
    // Registered with the real key whatever the config announces.
    s_regions.insert(STAGING, region(server.region.len as usize, server.region.addr, STAGING_RKEY, true));
    s_regions.insert(SERVER_SOURCE, Region { bytes: source.to_vec(), addr: 0, rkey: 0xC1, remote_write: false });
    let (c_buf, s_buf) = (client.recv_buf as usize, server.recv_buf as usize);
    let c = Side::new(Connection::new(client, now).unwrap(), c_buf, c_regions);
    let s = Side::new(Connection::new(server, now).unwrap(), s_buf, s_regions);
    let mut fabric = Fabric::new(c, s, now);
    fabric.establish();
    fabric
}

fn connected(shape: Shape, source: &[u8]) -> Fabric {
    let (client, server) = configs(shape);
    let mut fabric = fabric_with(client, server, source);
    for side in &mut fabric.sides {
        let connected = side.events.remove(0);
        assert!(matches!(connected, Event::Connected { session_id: SESSION, .. }), "{connected:?}");
    }
    assert_eq!(fabric.sides[CLIENT].conn.state(), State::Open);
    fabric
}

fn take_events(side: &mut Side) -> Vec<Event> {
    std::mem::take(&mut side.events)
}

fn frames(events: &[Event]) -> Vec<Vec<u8>> {
    events.iter().filter_map(|e| if let Event::Frame(f) = e { Some(f.clone()) } else { None }).collect()
}

fn ended(side: &Side) -> Option<Result<u32, RdmaError>> {
    side.events.iter().find_map(|e| if let Event::Ended(r) = e { Some(r.clone()) } else { None })
}

/// The server's session: consumes upload chunks (into `uploads`) and
/// answers download chunks from its source region, until nothing is left.
fn serve(fabric: &mut Fabric, uploads: &mut HashMap<u64, Vec<u8>>) {
    let mut kept = Vec::new();
    loop {
        fabric.run();
        let now = fabric.now;
        let server = &mut fabric.sides[SERVER];
        let mut served = false;
        for event in take_events(server) {
            match event {
                Event::PutChunk { id, offset, len, slot, .. } => {
                    let base = usize::from(slot) * 4096;
                    let chunk = server.regions[&STAGING].bytes[base..base + len as usize].to_vec();
                    let upload = uploads.entry(id).or_default();
                    let end = offset as usize + chunk.len();
                    if upload.len() < end {
                        upload.resize(end, 0);
                    }
                    upload[offset as usize..end].copy_from_slice(&chunk);
                    server.conn.release_slot(slot, 0, now).unwrap();
                    served = true;
                }
                Event::GetRequest(ticket) => {
                    let local = LocalSlice { region: SERVER_SOURCE, offset: ticket.offset, len: ticket.len };
                    server.conn.answer_get(ticket, local, now).unwrap();
                    served = true;
                }
                other => kept.push(other),
            }
        }
        if !served {
            fabric.sides[SERVER].events = kept;
            return;
        }
    }
}

#[test]
fn frames_cross_in_order_both_ways_in_fragments() {
    let mut fabric = connected(SMALL, &[]);
    let now = fabric.now;
    let sent: Vec<Vec<u8>> = (0..6).map(|i| (0..(i * 300 + 1)).map(|b| (b * 7 + i) as u8).collect()).collect();
    for f in &sent {
        fabric.sides[CLIENT].conn.send_frame(f, now).unwrap();
        fabric.sides[SERVER].conn.send_frame(f, now).unwrap();
    }
    fabric.run();
    assert_eq!(frames(&take_events(&mut fabric.sides[SERVER])), sent);
    assert_eq!(frames(&take_events(&mut fabric.sides[CLIENT])), sent);
}

#[test]
fn the_handshake_gives_the_server_the_clients_secret() {
    let (client, server) = configs(SMALL);
    let fabric = fabric_with(client, server, &[]);
    assert_eq!(
        fabric.sides[SERVER].events[0],
        Event::Connected { session_id: SESSION, secret: b"session secret".to_vec() }
    );
}

#[test]
fn an_upload_larger_than_the_staging_goes_slot_by_slot() {
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let mut fabric = connected(SMALL, &data);
    let now = fabric.now;
    let local = LocalSlice { region: CLIENT_SOURCE, offset: 0, len: data.len() as u32 };
    fabric.sides[CLIENT].conn.put(9, local, now).unwrap();
    let mut uploads = HashMap::new();
    serve(&mut fabric, &mut uploads);
    assert_eq!(uploads[&9], data);
    let events = take_events(&mut fabric.sides[CLIENT]);
    assert!(events.contains(&Event::PutWritten { id: 9 }), "{events:?}");
    assert!(events.ends_with(&[Event::PutDone { id: 9 }]), "{events:?}");
}

#[test]
fn a_refused_upload_chunk_is_reported_once_after_every_verdict() {
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 249) as u8).collect();
    let mut fabric = connected(SMALL, &data);
    let now = fabric.now;
    let local = LocalSlice { region: CLIENT_SOURCE, offset: 0, len: data.len() as u32 };
    fabric.sides[CLIENT].conn.put(4, local, now).unwrap();
    let mut chunks = Vec::new();
    for _ in 0..20 {
        fabric.run();
        let server = &mut fabric.sides[SERVER];
        let mut served = false;
        for event in take_events(server) {
            if let Event::PutChunk { total, offset, slot, .. } = event {
                assert_eq!(total, data.len() as u64);
                // The first chunk is staged, every later one refused.
                let code = if chunks.is_empty() { 0 } else { 2 };
                chunks.push(offset);
                server.conn.release_slot(slot, code, now).unwrap();
                served = true;
            }
        }
        if !served {
            break;
        }
    }
    assert!(chunks.len() > 2, "{chunks:?}");
    let events = take_events(&mut fabric.sides[CLIENT]);
    assert!(events.contains(&Event::PutWritten { id: 4 }), "{events:?}");
    let verdicts: Vec<_> =
        events.iter().filter(|e| matches!(e, Event::PutDone { .. } | Event::PutFailed { .. })).collect();
    assert_eq!(verdicts, vec![&Event::PutFailed { id: 4, code: 2 }]);
    // The id is free again: a piece of a larger upload goes at its offset.
    let piece = LocalSlice { region: CLIENT_SOURCE, offset: 0, len: 5000 };
    assert!(matches!(fabric.sides[CLIENT].conn.put_at(4, 6000, 2000, piece, now), Err(RdmaError::Misuse(_))));
    fabric.sides[CLIENT].conn.put_at(4, 30_000, 25_000, piece, now).unwrap();
    let mut uploads = HashMap::new();
    serve(&mut fabric, &mut uploads);
    assert_eq!(&uploads[&4][25_000..], &data[..5000]);
    assert!(take_events(&mut fabric.sides[CLIENT]).ends_with(&[Event::PutDone { id: 4 }]));
}

#[test]
fn a_download_is_written_into_the_landing_region() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    let mut fabric = connected(SMALL, &data);
    let now = fabric.now;
    fabric.sides[CLIENT].conn.get(5, 1000, 8000, 100, now).unwrap();
    serve(&mut fabric, &mut HashMap::new());
    assert_eq!(take_events(&mut fabric.sides[CLIENT]), vec![Event::GetDone { id: 5 }]);
    assert_eq!(&fabric.sides[CLIENT].regions[&LANDING].bytes[100..8100], &data[1000..9000]);
}

#[test]
fn a_client_asking_for_more_than_the_server_allows_keeps_to_the_servers_limits() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 249) as u8).collect();
    let (mut client, mut server) = configs(SMALL);
    client.max_get_chunk = 8000;
    client.max_gets_in_flight = 16;
    server.max_get_chunk = 1000;
    server.max_gets_in_flight = 2;
    let mut fabric = fabric_with(client, server, &data);
    let now = fabric.now;
    fabric.sides[CLIENT].conn.get(3, 0, 10_000, 0, now).unwrap();
    fabric.run();
    let asked =
        fabric.sides[SERVER].events.iter().filter(|e| matches!(e, Event::GetRequest(t) if t.len <= 1000)).count();
    assert_eq!(asked, 2, "two chunks of at most 1000 bytes at once");
    serve(&mut fabric, &mut HashMap::new());
    assert!(take_events(&mut fabric.sides[CLIENT]).contains(&Event::GetDone { id: 3 }));
    assert_eq!(&fabric.sides[CLIENT].regions[&LANDING].bytes[..10_000], &data[..]);
}

#[test]
fn a_refused_download_is_reported_once() {
    let mut fabric = connected(SMALL, &[]);
    let now = fabric.now;
    fabric.sides[CLIENT].conn.get(5, 0, 7000, 0, now).unwrap();
    fabric.run();
    let tickets: Vec<_> = take_events(&mut fabric.sides[SERVER])
        .into_iter()
        .filter_map(|e| if let Event::GetRequest(t) = e { Some(t) } else { None })
        .collect();
    assert_eq!(tickets.len(), 3, "7000 bytes in chunks of 3000");
    for t in tickets {
        fabric.sides[SERVER].conn.refuse_get(t, 1, now).unwrap();
    }
    fabric.run();
    assert_eq!(take_events(&mut fabric.sides[CLIENT]), vec![Event::GetFailed { id: 5, code: 1 }]);
    // The id is free again.
    fabric.sides[CLIENT].conn.get(5, 0, 10, 0, now).unwrap();
}

/// Uploads `local` on a fabric and returns how each side ended.
fn put_and_end(mut fabric: Fabric, local: LocalSlice) -> [Option<Result<u32, RdmaError>>; 2] {
    let now = fabric.now;
    fabric.sides[CLIENT].conn.put(1, local, now).unwrap();
    fabric.run();
    assert_eq!(fabric.sides[CLIENT].conn.state(), State::Ended);
    [ended(&fabric.sides[CLIENT]), ended(&fabric.sides[SERVER])]
}

#[test]
fn a_write_with_a_key_the_server_never_registered_fails_with_remote_access() {
    let (client, mut server) = configs(SMALL);
    server.region.rkey = 0xDEAD;
    let local = LocalSlice { region: CLIENT_SOURCE, offset: 0, len: 100 };
    let [client, server] = put_and_end(fabric_with(client, server, &[1; 100]), local);
    assert_eq!(client, Some(Err(RdmaError::Completion { op: "write", status: WcError::RemoteAccess })));
    assert!(matches!(server, Some(Err(_))), "the server's receives are flushed: {server:?}");
}

#[test]
fn a_write_from_unregistered_memory_fails_with_local_protection() {
    let local = LocalSlice { region: CLIENT_SOURCE, offset: 50, len: 100 };
    let [client, _] = put_and_end(connected(SMALL, &[1; 100]), local);
    assert_eq!(client, Some(Err(RdmaError::Completion { op: "write", status: WcError::LocalProtection })));
}

#[test]
fn a_peer_that_stops_answering_times_out() {
    let mut fabric = connected(SMALL, &[]);
    fabric.sides[SERVER].hung = true;
    let now = fabric.now;
    for _ in 0..10 {
        let _ = fabric.sides[CLIENT].conn.send_frame(&[1; 100], now);
    }
    fabric.run();
    assert_eq!(ended(&fabric.sides[CLIENT]), None, "credits hold the frames back, nothing fails yet");
    let idle = Config::new(Role::Client, RemoteRegion { addr: 0, len: 0, rkey: 0 }).idle_timeout;
    fabric.advance(idle + idle / 5);
    assert_eq!(
        ended(&fabric.sides[CLIENT]),
        Some(Err(RdmaError::TimedOut { waited: idle, what: "no message from the peer" }))
    );
    assert_eq!(fabric.sides[CLIENT].conn.poll_timeout(), None);
}

#[test]
fn a_session_that_lags_holds_its_buffers_and_the_peer_waits_for_credits() {
    let mut fabric = connected(SMALL, &[]);
    fabric.sides[SERVER].lagging = true;
    let now = fabric.now;
    let sent: Vec<Vec<u8>> = (0..12u8).map(|i| vec![i; 40]).collect();
    for f in &sent {
        fabric.sides[CLIENT].conn.send_frame(f, now).unwrap();
    }
    fabric.run();
    assert!(fabric.sides[SERVER].events.is_empty());
    assert_eq!(ended(&fabric.sides[CLIENT]), None, "no receiver-not-ready: credits held the frames back");
    let waiting = fabric.sides[CLIENT].conn.queued();
    assert!(waiting >= 12 - 2 * usize::from(SMALL.depth), "{waiting} frames wait for credits");
    fabric.sides[SERVER].lagging = false;
    fabric.run();
    assert_eq!(frames(&take_events(&mut fabric.sides[SERVER])), sent, "without waiting for a keepalive");
}

#[test]
fn an_idle_connection_stays_up_on_keepalives() {
    let mut fabric = connected(SMALL, &[]);
    let idle = Config::new(Role::Client, RemoteRegion { addr: 0, len: 0, rkey: 0 }).idle_timeout;
    for _ in 0..5 {
        fabric.advance(idle);
    }
    assert_eq!(ended(&fabric.sides[CLIENT]), None);
    assert_eq!(ended(&fabric.sides[SERVER]), None);
    let now = fabric.now;
    fabric.sides[CLIENT].conn.send_frame(b"still here", now).unwrap();
    fabric.run();
    assert_eq!(frames(&take_events(&mut fabric.sides[SERVER])), vec![b"still here".to_vec()]);
}

#[test]
fn the_handshake_times_out_without_the_peers_hello() {
    let (client, _) = configs(SMALL);
    let now = Instant::now();
    let mut conn = Connection::new(client, now).unwrap();
    conn.handle_established(now);
    let due = conn.poll_timeout().unwrap();
    conn.handle_timeout(due - Duration::from_millis(1));
    assert_eq!(conn.state(), State::Handshake);
    conn.handle_timeout(due);
    let events: Vec<_> = std::iter::from_fn(|| conn.poll_event()).collect();
    assert!(matches!(events[..], [Event::Ended(Err(RdmaError::TimedOut { what: "the peer's Hello", .. }))]));
    assert!(std::iter::from_fn(|| conn.poll_op()).any(|op| op == Op::Disconnect));
}

#[test]
fn a_lost_link_ends_both_sides() {
    let mut fabric = connected(SMALL, &[]);
    let now = fabric.now;
    fabric.sides[CLIENT].conn.send_frame(b"in flight", now).unwrap();
    fabric.lose_link();
    for side in &fabric.sides {
        assert_eq!(ended(side), Some(Err(RdmaError::ConnectionLost)));
    }
    assert!(matches!(fabric.sides[CLIENT].conn.send_frame(b"x", now), Err(RdmaError::Misuse(_))));
}

#[test]
fn a_send_completing_in_error_ends_the_connection() {
    let mut fabric = connected(SMALL, &[]);
    fabric.fail_send_after[CLIENT] = Some((1, WcError::RetryExceeded));
    let now = fabric.now;
    for i in 0..3u8 {
        fabric.sides[CLIENT].conn.send_frame(&[i], now).unwrap();
    }
    fabric.run();
    assert_eq!(
        ended(&fabric.sides[CLIENT]),
        Some(Err(RdmaError::Completion { op: "send", status: WcError::RetryExceeded }))
    );
    assert_eq!(frames(&fabric.sides[SERVER].events), vec![vec![0]], "the first frame went before the failure");
}

#[test]
fn a_close_ends_both_sides_cleanly_after_what_was_queued() {
    let mut fabric = connected(SMALL, &[]);
    let now = fabric.now;
    fabric.sides[CLIENT].conn.send_frame(b"last", now).unwrap();
    fabric.sides[CLIENT].conn.close(7, now);
    fabric.run();
    let server = take_events(&mut fabric.sides[SERVER]);
    assert_eq!(server, vec![Event::Frame(b"last".to_vec()), Event::Ended(Ok(7))]);
    assert_eq!(ended(&fabric.sides[CLIENT]), Some(Ok(0)));
}

#[test]
fn a_full_queue_refuses_with_backpressure() {
    let mut fabric = connected(SMALL, &[]);
    fabric.sides[SERVER].hung = true;
    let now = fabric.now;
    let mut refused = None;
    for i in 0..200 {
        if let Err(e) = fabric.sides[CLIENT].conn.send_frame(&[1; 10], now) {
            refused = Some((i, e));
            break;
        }
    }
    let (i, e) = refused.expect("the queue is bounded");
    assert!(matches!(e, RdmaError::Backpressure(64)), "{e:?}");
    assert!(i >= 64);
}

#[test]
fn a_frame_above_the_peers_limit_is_refused_here() {
    let mut fabric = connected(SMALL, &[]);
    let now = fabric.now;
    let err = fabric.sides[CLIENT].conn.send_frame(&vec![0; (1 << 20) + 1], now).unwrap_err();
    assert!(matches!(err, RdmaError::TooLarge { what: "frame", .. }));
}

#[test]
fn calls_outside_a_sides_role_are_refused() {
    let mut fabric = connected(SMALL, &[]);
    let now = fabric.now;
    let local = LocalSlice { region: SERVER_SOURCE, offset: 0, len: 1 };
    assert!(matches!(fabric.sides[SERVER].conn.put(1, local, now), Err(RdmaError::Misuse(_))));
    assert!(matches!(fabric.sides[CLIENT].conn.release_slot(0, 0, now), Err(RdmaError::Misuse(_))));
    assert!(
        matches!(fabric.sides[SERVER].conn.release_slot(0, 0, now), Err(RdmaError::Misuse(_))),
        "slot holds nothing"
    );
    let ticket = GetTicket { id: 1, offset: 0, len: 1, dest: 0 };
    assert!(matches!(fabric.sides[SERVER].conn.answer_get(ticket, local, now), Err(RdmaError::Misuse(_))));
    assert!(matches!(fabric.sides[CLIENT].conn.get(1, 0, 10, 1 << 16, now), Err(RdmaError::Misuse(_))));
}

#[test]
fn configurations_out_of_bounds_are_refused_with_every_reason() {
    let (mut client, mut server) = configs(SMALL);
    client.recv_depth = 2;
    client.slots = 1;
    let Err(RdmaError::BadConfig(why)) = Connection::new(client, Instant::now()) else { panic!() };
    assert!(why.contains("recv_depth") && why.contains("upload slots"), "{why}");
    server.slots = 3;
    assert!(Connection::new(server, Instant::now()).is_err(), "3 slots of 4096 exceed the staging");
}

/// A server connection fed by hand, for what a well-behaved peer never sends.
struct Raw {
    conn: Connection,
    recvs: VecDeque<u64>,
    seq: u64,
    now: Instant,
}

impl Raw {
    fn server() -> Raw {
        let (_, server) = configs(SMALL);
        let now = Instant::now();
        let mut raw = Raw { conn: Connection::new(server, now).unwrap(), recvs: VecDeque::new(), seq: 0, now };
        raw.conn.handle_established(now);
        raw.pump();
        raw
    }

    fn client_hello() -> Hello {
        Hello {
            version: CORE_VERSION,
            recv_depth: 4,
            recv_buf: 256,
            max_frame: 4096,
            region: RemoteRegion { addr: 0x9000, len: 8192, rkey: 5 },
            slots: 0,
            slot_size: 0,
            get_chunk: 3000,
            gets_in_flight: 8,
            session_id: SESSION,
            secret: vec![],
        }
    }

    /// Completes sends, keeps the receive ids.
    fn pump(&mut self) {
        while let Some(op) = self.conn.poll_op() {
            match op {
                Op::PostRecv { wr_id, .. } => self.recvs.push_back(wr_id),
                Op::Send { wr_id, .. } | Op::Write { wr_id, .. } => {
                    self.conn.handle_completion(self.now, wr_id, Ok(()), &[]);
                }
                Op::Disconnect => {}
            }
        }
    }

    fn feed_bytes(&mut self, bytes: &[u8]) {
        let wr_id = self.recvs.pop_front().expect("a posted receive");
        self.conn.handle_completion(self.now, wr_id, Ok(()), bytes);
        self.pump();
    }

    fn feed(&mut self, message: Message, credits: u16) {
        let bytes = message.encode(credits, self.seq);
        self.seq += 1;
        self.feed_bytes(&bytes);
    }

    fn error(&mut self) -> Option<RdmaError> {
        std::iter::from_fn(|| self.conn.poll_event())
            .find_map(|e| if let Event::Ended(Err(e)) = e { Some(e) } else { None })
    }
}

#[test]
fn what_a_peer_must_not_send_ends_the_connection() {
    let hello = Raw::client_hello();
    let get = |dest, len| Message::GetRequest { id: 1, offset: 0, len, dest };
    let cases: Vec<(&str, Vec<Message>, u16)> = vec![
        ("data before the Hello", vec![Message::Credit], 0),
        ("a second Hello", vec![Message::Hello(hello.clone()), Message::Hello(hello.clone())], 0),
        ("a download beyond the landing region", vec![Message::Hello(hello.clone()), get(8000, 500)], 0),
        ("a download chunk above the limit", vec![Message::Hello(hello.clone()), get(0, 3001)], 0),
        (
            "an upload into a missing slot",
            vec![Message::Hello(hello.clone()), Message::PutChunk { id: 1, total: 10, offset: 0, len: 10, slot: 2 }],
            0,
        ),
        (
            "an upload chunk above its slot",
            vec![
                Message::Hello(hello.clone()),
                Message::PutChunk { id: 1, total: 5000, offset: 0, len: 4097, slot: 0 },
            ],
            0,
        ),
        (
            "an upload into a slot not released",
            vec![
                Message::Hello(hello.clone()),
                Message::PutChunk { id: 1, total: 20, offset: 0, len: 10, slot: 0 },
                Message::PutChunk { id: 1, total: 20, offset: 10, len: 10, slot: 0 },
            ],
            0,
        ),
        ("credits beyond the buffers announced", vec![Message::Hello(hello.clone()), Message::Credit], 4),
        (
            "an upload chunk past its upload's size",
            vec![Message::Hello(hello.clone()), Message::PutChunk { id: 1, total: 15, offset: 10, len: 10, slot: 0 }],
            0,
        ),
        ("a SlotFree to the server", vec![Message::Hello(hello.clone()), Message::SlotFree { slot: 0, code: 0 }], 0),
        (
            "a GetDone to the server",
            vec![Message::Hello(hello.clone()), Message::GetDone { id: 1, offset: 0, len: 1 }],
            0,
        ),
        (
            "a region that wraps",
            vec![Message::Hello(Hello {
                region: RemoteRegion { addr: u64::MAX - 10, len: 100, rkey: 1 },
                ..hello.clone()
            })],
            0,
        ),
        ("a client offering slots", vec![Message::Hello(Hello { slots: 1, slot_size: 10, ..hello.clone() })], 0),
        ("too few buffers", vec![Message::Hello(Hello { recv_depth: 1, ..hello.clone() })], 0),
        ("no download chunks in flight", vec![Message::Hello(Hello { gets_in_flight: 0, ..hello.clone() })], 0),
        (
            "download chunks above the limit",
            vec![Message::Hello(Hello { get_chunk: MAX_CHUNK + 1, ..hello.clone() })],
            0,
        ),
    ];
    for (what, messages, credits) in cases {
        let mut raw = Raw::server();
        for m in messages {
            raw.feed(m, credits);
        }
        let err = raw.error();
        assert!(matches!(err, Some(RdmaError::Violation(_))), "{what}: {err:?}");
        assert_eq!(raw.conn.state(), State::Ended, "{what}");
    }
}

#[test]
fn a_frame_longer_than_announced_is_refused() {
    let mut raw = Raw::server();
    raw.feed(Message::Hello(Raw::client_hello()), 0);
    // The server's max_frame is 1 MiB: 5000 fragments of 230 bytes pass it.
    let mut err = None;
    for _ in 0..5000 {
        raw.feed(Message::Data { last: false, body: vec![0; 230] }, 0);
        if raw.conn.state() == State::Ended {
            err = raw.error();
            break;
        }
    }
    assert!(matches!(err, Some(RdmaError::Violation(m)) if m.contains("frame above")));
}

#[test]
fn a_gap_in_sequence_numbers_and_another_version_are_refused() {
    let mut raw = Raw::server();
    raw.feed(Message::Hello(Raw::client_hello()), 0);
    raw.seq += 1;
    raw.feed(Message::Credit, 0);
    assert!(matches!(raw.error(), Some(RdmaError::Violation(m)) if m.contains("expected")));

    let mut raw = Raw::server();
    raw.feed(Message::Hello(Hello { version: CORE_VERSION + 1, ..Raw::client_hello() }), 0);
    assert_eq!(raw.error(), Some(RdmaError::VersionMismatch { ours: CORE_VERSION, theirs: CORE_VERSION + 1 }));

    let mut raw = Raw::server();
    raw.feed_bytes(&[0xff; 20]);
    assert!(matches!(raw.error(), Some(RdmaError::Violation(_))));
}

#[test]
fn a_completion_nobody_asked_for_is_a_violation() {
    let mut raw = Raw::server();
    raw.conn.handle_completion(raw.now, 12345, Ok(()), &[]);
    assert!(matches!(raw.error(), Some(RdmaError::Violation(m)) if m.contains("unknown work request")));
}

#[test]
fn a_receive_before_the_connection_managers_event_still_connects() {
    let (client, server) = configs(SMALL);
    let now = Instant::now();
    let mut s = Connection::new(server, now).unwrap();
    let mut c = Connection::new(client, now).unwrap();
    let s_recv = std::iter::from_fn(|| s.poll_op())
        .find_map(|op| if let Op::PostRecv { wr_id, .. } = op { Some(wr_id) } else { None });
    c.handle_established(now);
    let hello = std::iter::from_fn(|| c.poll_op())
        .find_map(|op| if let Op::Send { bytes, .. } = op { Some(bytes) } else { None });
    s.handle_completion(now, s_recv.unwrap(), Ok(()), &hello.unwrap());
    assert_eq!(s.state(), State::Open);
    assert!(std::iter::from_fn(|| s.poll_op()).any(|op| matches!(op, Op::Send { .. })), "the server's Hello goes out");
}

/// What one side does in a random workload.
#[derive(Debug, Clone)]
enum Action {
    Frame { from_client: bool, len: usize },
    Put { len: u32 },
    Get { offset: u64, len: u64 },
    Run,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (any::<bool>(), 0usize..1500).prop_map(|(from_client, len)| Action::Frame { from_client, len }),
        1 => (1u32..12_000).prop_map(|len| Action::Put { len }),
        1 => (0u64..4000, 1u64..8000).prop_map(|(offset, len)| Action::Get { offset, len }),
        2 => Just(Action::Run),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any mix of frames, uploads and downloads, with any small credit
    /// window, arrives whole and in order, with no receiver-not-ready and
    /// no failure: credits and slots never let a side overrun the other.
    #[test]
    fn any_workload_arrives_whole_and_in_order(
        depth in 4u16..9,
        recv_buf in 256u32..700,
        actions in proptest::collection::vec(action(), 1..40),
    ) {
        let source: Vec<u8> = (0..16_000u32).map(|i| (i * 31 % 256) as u8).collect();
        let shape = Shape { depth, recv_buf, ..SMALL };
        let mut fabric = connected(shape, &source);
        let mut sent = [Vec::new(), Vec::new()];
        let mut puts = HashMap::new();
        let mut gets = Vec::new();
        let mut uploads = HashMap::new();
        let mut client_events = Vec::new();
        for (n, a) in actions.into_iter().enumerate() {
            let now = fabric.now;
            let id = n as u64;
            match a {
                Action::Frame { from_client, len } => {
                    let side = if from_client { CLIENT } else { SERVER };
                    let body: Vec<u8> = (0..len).map(|i| (i + n) as u8).collect();
                    if fabric.sides[side].conn.send_frame(&body, now).is_ok() {
                        sent[side].push(body);
                    }
                }
                Action::Put { len } => {
                    let local = LocalSlice { region: CLIENT_SOURCE, offset: 0, len };
                    if fabric.sides[CLIENT].conn.put(id, local, now).is_ok() {
                        puts.insert(id, source[..len as usize].to_vec());
                    }
                }
                Action::Get { offset, len } => {
                    // Each download lands in its own place: sequential ids over a 64 KiB region.
                    let dest = (gets.len() as u64 * 8000) % ((1 << 16) - 8000);
                    if fabric.sides[CLIENT].conn.get(id, offset, len, dest, now).is_ok() {
                        gets.push((id, offset, len, dest));
                    }
                }
                Action::Run => serve(&mut fabric, &mut uploads),
            }
            client_events.extend(take_events(&mut fabric.sides[CLIENT]));
            // Check downloads as they land, before a later one overwrites the place.
            for (id, offset, len, dest) in &gets {
                if client_events.contains(&Event::GetDone { id: *id }) {
                    let landing = &fabric.sides[CLIENT].regions[&LANDING].bytes;
                    prop_assert_eq!(&landing[*dest as usize..(*dest + *len) as usize], &source[*offset as usize..(*offset + *len) as usize]);
                }
            }
            gets.retain(|(id, ..)| !client_events.contains(&Event::GetDone { id: *id }));
        }
        for _ in 0..4 {
            serve(&mut fabric, &mut uploads);
            client_events.extend(take_events(&mut fabric.sides[CLIENT]));
        }
        for (id, offset, len, dest) in &gets {
            let done = client_events.contains(&Event::GetDone { id: *id });
            prop_assert!(done, "download {} not done", id);
            let landing = &fabric.sides[CLIENT].regions[&LANDING].bytes;
            prop_assert_eq!(&landing[*dest as usize..(*dest + *len) as usize], &source[*offset as usize..(*offset + *len) as usize]);
        }
        prop_assert!(ended(&fabric.sides[SERVER]).is_none() && !client_events.iter().any(|e| matches!(e, Event::Ended(_))));
        prop_assert_eq!(frames(&client_events), sent[SERVER].clone());
        prop_assert_eq!(frames(&fabric.sides[SERVER].events), sent[CLIENT].clone());
        for (id, data) in &puts {
            let written = client_events.contains(&Event::PutWritten { id: *id });
            prop_assert!(written, "upload {} not written", id);
            prop_assert!(client_events.contains(&Event::PutDone { id: *id }), "upload {} not staged", id);
            prop_assert_eq!(&uploads[id], data);
        }
    }
}
