//! One side of an RDMA connection as a state machine.

use super::wire::{self, HEADER_LEN, Hello, Message};
use super::{
    CORE_VERSION, LocalSlice, MAX_CHUNK, MAX_FRAME, MAX_RECV_BUF, MAX_RECV_DEPTH, MAX_SLOTS, MIN_RECV_BUF,
    MIN_RECV_DEPTH, RdmaError, RemoteRegion, WcError,
};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Which end of the session this side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Writes uploads into the server's staging, asks for downloads.
    Client,
    /// Offers staging slots, writes downloads back.
    Server,
}

/// Settings of one side.
#[derive(Debug, Clone)]
pub struct Config {
    pub role: Role,
    /// Receive buffers posted before connecting (the peer's credits).
    pub recv_depth: u16,
    /// Bytes of each receive buffer.
    pub recv_buf: u32,
    /// Send queue entries (sends and writes in flight at once).
    pub send_depth: u16,
    /// Largest frame accepted from the peer.
    pub max_frame: u32,
    /// Frames, upload chunks and download requests queued before
    /// [`RdmaError::Backpressure`].
    pub max_queued: usize,
    /// This side's registered region the peer may write into.
    pub region: RemoteRegion,
    /// Upload slots in that region (server; 0 for a client).
    pub slots: u16,
    /// Bytes of each slot (server).
    pub slot_size: u32,
    /// Largest download chunk asked for (client) or accepted (server).
    pub max_get_chunk: u32,
    /// Download chunks in flight at once.
    pub max_gets_in_flight: u16,
    /// How long the peer's `Hello` may take.
    pub handshake_timeout: Duration,
    /// How long the peer may stay silent; keepalives go every quarter of it.
    pub idle_timeout: Duration,
    /// The session (from the QUIC handshake) and its proof (client).
    pub session_id: u64,
    pub secret: Vec<u8>,
}

impl Config {
    /// Settings with the defaults, for `role` and its registered region.
    pub fn new(role: Role, region: RemoteRegion) -> Config {
        let (slots, slot_size) = match role {
            Role::Client => (0, 0),
            Role::Server => (2, 8 << 20),
        };
        Config {
            role,
            recv_depth: 32,
            recv_buf: 64 << 10,
            send_depth: 64,
            max_frame: 64 << 20,
            max_queued: 1024,
            region,
            slots,
            slot_size,
            max_get_chunk: 4 << 20,
            max_gets_in_flight: 8,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            session_id: 0,
            secret: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), RdmaError> {
        let mut bad = Vec::new();
        if !(MIN_RECV_DEPTH..=MAX_RECV_DEPTH).contains(&self.recv_depth) {
            bad.push(format!("recv_depth {} outside {MIN_RECV_DEPTH}..={MAX_RECV_DEPTH}", self.recv_depth));
        }
        if !(MIN_RECV_BUF..=MAX_RECV_BUF).contains(&self.recv_buf) {
            bad.push(format!("recv_buf {} outside {MIN_RECV_BUF}..={MAX_RECV_BUF}", self.recv_buf));
        }
        if self.send_depth < 2 {
            bad.push("send_depth below 2 (a write and its notice)".into());
        }
        if self.max_frame == 0 || self.max_frame > MAX_FRAME {
            bad.push(format!("max_frame {} outside 1..={MAX_FRAME}", self.max_frame));
        }
        if self.max_get_chunk == 0 || self.max_get_chunk > MAX_CHUNK {
            bad.push(format!("max_get_chunk {} outside 1..={MAX_CHUNK}", self.max_get_chunk));
        }
        if self.max_gets_in_flight == 0 || self.max_queued == 0 {
            bad.push("max_gets_in_flight and max_queued must be positive".into());
        }
        if self.secret.len() > wire::MAX_SECRET {
            bad.push(format!("secret of {} bytes, above {}", self.secret.len(), wire::MAX_SECRET));
        }
        if let Err(e) = check_slots(self.role, &self.region, self.slots, self.slot_size) {
            bad.push(e);
        }
        if bad.is_empty() { Ok(()) } else { Err(RdmaError::BadConfig(bad.join("; "))) }
    }
}

/// Checks a side's upload slots against its role and region.
fn check_slots(role: Role, region: &RemoteRegion, slots: u16, slot_size: u32) -> Result<(), String> {
    region.check().map_err(|e| e.to_string())?;
    match role {
        Role::Client if slots != 0 => Err(format!("a client offers no upload slots, {slots} announced")),
        Role::Client => Ok(()),
        Role::Server => {
            if slots == 0 || slots > MAX_SLOTS || slot_size == 0 || slot_size > MAX_CHUNK {
                return Err(format!("{slots} slots of {slot_size} bytes (1..={MAX_SLOTS} of 1..={MAX_CHUNK})"));
            }
            if u64::from(slots) * u64::from(slot_size) > region.len {
                return Err(format!("{slots} slots of {slot_size} bytes exceed a region of {}", region.len));
            }
            Ok(())
        }
    }
}

/// A work request for the binding to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Post receive buffer `buf` (0..recv_depth) with this id.
    PostRecv { wr_id: u64, buf: u16 },
    /// Post a signaled send of these bytes (copied into a registered buffer).
    Send { wr_id: u64, bytes: Vec<u8> },
    /// Post a signaled RDMA WRITE of `local` to the peer's `remote_addr`.
    Write { wr_id: u64, local: LocalSlice, remote_addr: u64, rkey: u32 },
    /// Disconnect the queue pair (`rdma_disconnect`): the connection is over.
    Disconnect,
}

/// A download chunk the client asked for, to be answered by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GetTicket {
    pub id: u64,
    pub offset: u64,
    pub len: u32,
    /// Offset in the client's landing region.
    pub dest: u64,
}

/// What happened, for the session above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Both `Hello`s are through. The server checks the secret.
    Connected { session_id: u64, secret: Vec<u8> },
    /// A whole command frame from the peer.
    Frame(Vec<u8>),
    /// Server: an upload chunk of an upload of `total` bytes sits in slot
    /// `slot`; call `release_slot` once consumed, with the verdict.
    PutChunk { id: u64, total: u64, offset: u64, len: u32, slot: u16 },
    /// Client: every chunk of upload `id` was written; its memory may be reused.
    PutWritten { id: u64 },
    /// Client: the server staged every chunk of upload `id`.
    PutDone { id: u64 },
    /// Client: the server refused a chunk of upload `id` (a CUDA error
    /// code); reported once, when every chunk was answered.
    PutFailed { id: u64, code: u32 },
    /// Server: the client asks for a download chunk; `answer_get` or `refuse_get`.
    GetRequest(GetTicket),
    /// Client: every chunk of download `id` landed.
    GetDone { id: u64 },
    /// Client: the server refused a chunk of download `id`.
    GetFailed { id: u64, code: u32 },
    /// The connection ended: cleanly (`Ok(code)`) or with an error.
    Ended(Result<u32, RdmaError>),
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Receive buffers posted; the connection manager has not connected yet.
    Connecting,
    /// Connected; our `Hello` is out, the peer's not in yet.
    Handshake,
    /// Both `Hello`s through.
    Open,
    /// Our `Close` is queued or on its way.
    Closing,
    /// Over (see the last `Event::Ended`).
    Ended,
}

/// What the peer announced.
#[derive(Debug, Clone)]
struct Peer {
    recv_depth: u16,
    recv_buf: u32,
    max_frame: u32,
    region: RemoteRegion,
    slot_size: u32,
    get_chunk: u32,
    gets_in_flight: u16,
}

/// Something waiting for credits, send-queue room or a slot, in order.
#[derive(Debug)]
enum Outgoing {
    Message(Message),
    /// A frame, sent as fragments from `sent` on.
    Frame {
        body: Vec<u8>,
        sent: usize,
    },
    /// Client: one chunk of an upload.
    PutChunk {
        id: u64,
        total: u64,
        offset: u64,
        local: LocalSlice,
    },
    /// Client: one chunk of a download to ask for.
    Get(GetTicket),
    /// Server: the write of a download chunk, then its `GetDone`.
    GetAnswer {
        ticket: GetTicket,
        local: LocalSlice,
    },
}

/// What a posted work request was.
#[derive(Debug, Clone, Copy)]
enum Posted {
    Recv(u16),
    Send {
        close: bool,
    },
    /// A write: of an upload chunk (its id) or a download answer.
    Write {
        put: Option<u64>,
    },
}

/// Bit of the work-request ids of receives, so a receive buffer's id tells its index.
const RECV_TAG: u64 = 1 << 63;

/// One side of an RDMA connection.
#[derive(Debug)]
pub struct Connection {
    config: Config,
    state: State,
    peer: Option<Peer>,
    /// Messages the peer has buffers for.
    credits: u32,
    /// Our buffers reposted and not yet announced.
    to_return: u32,
    send_seq: u64,
    recv_seq: u64,
    next_wr: u64,
    posted: HashMap<u64, Posted>,
    /// Sends and writes in flight.
    sq_used: u16,
    queue: VecDeque<Outgoing>,
    /// A frame being reassembled.
    partial: Vec<u8>,
    ops: VecDeque<Op>,
    events: VecDeque<Event>,
    /// Receive buffers held back while the session lags behind the events.
    held: VecDeque<u16>,
    /// Client: free upload slots; server: slots holding an unconsumed chunk.
    free_slots: VecDeque<u16>,
    busy_slots: Vec<bool>,
    /// Client: chunks of each upload not yet written.
    puts: HashMap<u64, u32>,
    /// Client: the upload whose chunk each of the server's slots holds.
    slot_owner: Vec<Option<u64>>,
    /// Client: chunks of each upload the server has not answered yet, and
    /// the first refusal.
    verdicts: HashMap<u64, (u32, Option<u32>)>,
    /// Client: download chunks asked for, and chunks left (and refusal) per download.
    gets_out: HashMap<(u64, u64), u32>,
    gets: HashMap<u64, (u32, bool)>,
    /// Server: download chunks asked for and not answered.
    tickets: HashMap<(u64, u64), GetTicket>,
    deadline: Option<Instant>,
    /// The latest time the connection was handed, for work started by `poll_event`.
    clock: Instant,
    last_heard: Instant,
    last_sent: Instant,
}

impl Connection {
    /// A connection whose receive buffers are to be posted now (before the
    /// connection manager connects, so the peer's first message has one).
    pub fn new(config: Config, now: Instant) -> Result<Connection, RdmaError> {
        config.validate()?;
        let mut conn = Connection {
            state: State::Connecting,
            peer: None,
            credits: 0,
            to_return: 0,
            send_seq: 0,
            recv_seq: 0,
            next_wr: 1,
            posted: HashMap::new(),
            sq_used: 0,
            queue: VecDeque::new(),
            partial: Vec::new(),
            ops: VecDeque::new(),
            events: VecDeque::new(),
            held: VecDeque::new(),
            free_slots: VecDeque::new(),
            busy_slots: vec![false; usize::from(config.slots)],
            puts: HashMap::new(),
            slot_owner: Vec::new(),
            verdicts: HashMap::new(),
            gets_out: HashMap::new(),
            gets: HashMap::new(),
            tickets: HashMap::new(),
            deadline: Some(now + config.handshake_timeout),
            clock: now,
            last_heard: now,
            last_sent: now,
            config,
        };
        for buf in 0..conn.config.recv_depth {
            conn.post_recv(buf);
        }
        Ok(conn)
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn role(&self) -> Role {
        self.config.role
    }

    /// Frames, upload chunks and download requests waiting for credits,
    /// slots or send-queue room (at most `max_queued`).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The connection manager connected the queue pair: send our `Hello`
    /// (the peer posted its buffers before it connected, so one is there).
    pub fn handle_established(&mut self, now: Instant) {
        if self.state != State::Connecting {
            return;
        }
        self.state = State::Handshake;
        let hello = Message::Hello(Hello {
            version: CORE_VERSION,
            recv_depth: self.config.recv_depth,
            recv_buf: self.config.recv_buf,
            max_frame: self.config.max_frame,
            region: self.config.region,
            slots: self.config.slots,
            slot_size: self.config.slot_size,
            get_chunk: self.config.max_get_chunk,
            gets_in_flight: self.config.max_gets_in_flight,
            session_id: self.config.session_id,
            secret: self.config.secret.clone(),
        });
        self.credits = 1;
        self.post_send(&hello, false, now);
        self.credits = 0;
    }

    /// The connection manager reported a disconnect or an error event.
    pub fn handle_disconnected(&mut self) {
        match self.state {
            State::Ended => {}
            State::Closing => self.finish(Ok(0)),
            _ => self.finish(Err(RdmaError::ConnectionLost)),
        }
    }

    /// A completion of a work request this connection asked for; `received`
    /// is what a receive brought (`byte_len` bytes of its buffer).
    pub fn handle_completion(&mut self, now: Instant, wr_id: u64, status: Result<(), WcError>, received: &[u8]) {
        let Some(posted) = self.posted.remove(&wr_id) else {
            if self.state != State::Ended {
                self.fail(RdmaError::Violation(format!("completion of unknown work request {wr_id:#x}")));
            }
            return;
        };
        if self.state == State::Ended {
            return;
        }
        if let Err(status) = status {
            let op = match posted {
                Posted::Recv(_) => "receive",
                Posted::Send { .. } => "send",
                Posted::Write { .. } => "write",
            };
            self.fail(RdmaError::Completion { op, status });
            return;
        }
        match posted {
            Posted::Recv(buf) => {
                self.last_heard = now;
                if let Err(e) = self.on_receive(received, now) {
                    self.fail(e);
                    return;
                }
                if self.state == State::Ended {
                    return;
                }
                if self.events.len() >= usize::from(self.config.recv_depth) {
                    self.held.push_back(buf);
                } else {
                    self.post_recv(buf);
                    self.to_return += 1;
                }
            }
            Posted::Send { close } => {
                self.sq_used -= 1;
                if close {
                    self.finish(Ok(0));
                    return;
                }
            }
            Posted::Write { put } => {
                self.sq_used -= 1;
                if let Some(id) = put {
                    let left = self.puts.get_mut(&id).expect("an upload's chunk count lives until its last write");
                    *left -= 1;
                    if *left == 0 {
                        self.puts.remove(&id);
                        self.events.push_back(Event::PutWritten { id });
                    }
                }
            }
        }
        self.drive(now);
    }

    /// Time passed: timeouts and keepalives.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        match self.state {
            State::Ended => {}
            State::Connecting | State::Handshake => {
                if self.deadline.is_some_and(|d| now >= d) {
                    let waited = self.config.handshake_timeout;
                    self.fail(RdmaError::TimedOut { waited, what: "the peer's Hello" });
                }
            }
            State::Open | State::Closing => {
                if now.duration_since(self.last_heard) >= self.config.idle_timeout {
                    let waited = self.config.idle_timeout;
                    self.fail(RdmaError::TimedOut { waited, what: "no message from the peer" });
                } else if now.duration_since(self.last_sent) >= self.keepalive() && self.credits >= 1 {
                    self.post_send(&Message::Credit, false, now);
                }
            }
        }
    }

    /// When [`Self::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Ended => None,
            State::Connecting | State::Handshake => self.deadline,
            State::Open | State::Closing => {
                Some((self.last_heard + self.config.idle_timeout).min(self.last_sent + self.keepalive()))
            }
        }
    }

    pub fn poll_op(&mut self) -> Option<Op> {
        self.ops.pop_front()
    }

    /// The next event. Taking one may free a receive buffer held back
    /// while the session lagged, and return it to the peer.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front()?;
        if self.state != State::Ended
            && self.events.len() < usize::from(self.config.recv_depth)
            && let Some(buf) = self.held.pop_front()
        {
            self.post_recv(buf);
            self.to_return += 1;
            self.drive(self.clock);
        }
        Some(event)
    }

    /// Queues a command frame (a batch or a reply) for the peer.
    pub fn send_frame(&mut self, body: &[u8], now: Instant) -> Result<(), RdmaError> {
        let max = self.peer.as_ref().map_or(0, |p| p.max_frame);
        if body.len() as u64 > u64::from(max) {
            return Err(RdmaError::TooLarge { what: "frame", len: body.len() as u64, max: u64::from(max) });
        }
        self.enqueue(vec![Outgoing::Frame { body: body.to_vec(), sent: 0 }], now)
    }

    /// Client: uploads `local` as transfer `id`, chunk by chunk into the
    /// server's staging slots. [`Event::PutWritten`] tells when it is out,
    /// [`Event::PutDone`] (or `PutFailed`) when the server staged it.
    pub fn put(&mut self, id: u64, local: LocalSlice, now: Instant) -> Result<(), RdmaError> {
        self.put_at(id, u64::from(local.len), 0, local, now)
    }

    /// Client: uploads `local` as the piece at `at` of transfer `id` of
    /// `total` bytes (an upload larger than the source region goes piece by
    /// piece, each after the last one's verdict).
    pub fn put_at(&mut self, id: u64, total: u64, at: u64, local: LocalSlice, now: Instant) -> Result<(), RdmaError> {
        let peer = self.open_as(Role::Client)?;
        if local.len == 0 || self.puts.contains_key(&id) || self.verdicts.contains_key(&id) {
            return Err(RdmaError::Misuse("an upload needs bytes and an id not in flight"));
        }
        if at.checked_add(u64::from(local.len)).is_none_or(|end| end > total) {
            return Err(RdmaError::Misuse("an upload piece beyond its upload's size"));
        }
        let chunk = u64::from(peer.slot_size);
        let mut items = Vec::new();
        let mut offset = 0u64;
        while offset < u64::from(local.len) {
            let len = chunk.min(u64::from(local.len) - offset) as u32;
            let piece = LocalSlice { region: local.region, offset: local.offset + offset, len };
            items.push(Outgoing::PutChunk { id, total, offset: at + offset, local: piece });
            offset += u64::from(len);
        }
        let chunks = items.len() as u32;
        self.enqueue(items, now)?;
        self.puts.insert(id, chunks);
        self.verdicts.insert(id, (chunks, None));
        Ok(())
    }

    /// Client: downloads `len` bytes of transfer `id` from `offset` into
    /// the landing region at `dest`. [`Event::GetDone`] tells when they are there.
    pub fn get(&mut self, id: u64, offset: u64, len: u64, dest: u64, now: Instant) -> Result<(), RdmaError> {
        let peer = self.open_as(Role::Client)?;
        self.config
            .region
            .address_of(dest, len)
            .map_err(|_| RdmaError::Misuse("download outside the landing region"))?;
        if len == 0 || self.gets.contains_key(&id) || offset.checked_add(len).is_none() {
            return Err(RdmaError::Misuse("a download needs bytes and an id not in flight"));
        }
        // Chunks no larger than either side allows.
        let chunk = u64::from(self.config.max_get_chunk.min(peer.get_chunk));
        let mut items = Vec::new();
        let mut done = 0u64;
        while done < len {
            let part = chunk.min(len - done) as u32;
            items.push(Outgoing::Get(GetTicket { id, offset: offset + done, len: part, dest: dest + done }));
            done += u64::from(part);
        }
        let chunks = items.len() as u32;
        self.enqueue(items, now)?;
        self.gets.insert(id, (chunks, false));
        Ok(())
    }

    /// Server: the chunk in `slot` was consumed (`code` 0: staged; else the
    /// CUDA error it was refused with); the client may write the slot again.
    pub fn release_slot(&mut self, slot: u16, code: u32, now: Instant) -> Result<(), RdmaError> {
        self.open_as(Role::Server)?;
        match self.busy_slots.get_mut(usize::from(slot)) {
            Some(busy) if *busy => *busy = false,
            _ => return Err(RdmaError::Misuse("release of a slot that holds no chunk")),
        }
        self.queue.push_back(Outgoing::Message(Message::SlotFree { slot, code }));
        self.drive(now);
        Ok(())
    }

    /// Server: writes `local` (the ticket's bytes) to the client, then tells it.
    pub fn answer_get(&mut self, ticket: GetTicket, local: LocalSlice, now: Instant) -> Result<(), RdmaError> {
        self.open_as(Role::Server)?;
        if local.len != ticket.len {
            return Err(RdmaError::Misuse("a download answer must have the chunk's length"));
        }
        if self.tickets.remove(&(ticket.id, ticket.offset)) != Some(ticket) {
            return Err(RdmaError::Misuse("answer to a download chunk not asked for"));
        }
        self.queue.push_back(Outgoing::GetAnswer { ticket, local });
        self.drive(now);
        Ok(())
    }

    /// Server: refuses a download chunk with a CUDA error code.
    pub fn refuse_get(&mut self, ticket: GetTicket, code: u32, now: Instant) -> Result<(), RdmaError> {
        self.open_as(Role::Server)?;
        if self.tickets.remove(&(ticket.id, ticket.offset)).is_none() {
            return Err(RdmaError::Misuse("refusal of a download chunk not asked for"));
        }
        self.queue.push_back(Outgoing::Message(Message::GetFailed { id: ticket.id, offset: ticket.offset, code }));
        self.drive(now);
        Ok(())
    }

    /// Ends the connection after what is queued, with `code` for the peer.
    pub fn close(&mut self, code: u32, now: Instant) {
        match self.state {
            State::Open => {
                self.state = State::Closing;
                self.queue.push_back(Outgoing::Message(Message::Close { code }));
                self.drive(now);
            }
            State::Connecting | State::Handshake => self.finish(Ok(code)),
            State::Closing | State::Ended => {}
        }
    }

    fn keepalive(&self) -> Duration {
        self.config.idle_timeout / 4
    }

    fn open_as(&self, role: Role) -> Result<Peer, RdmaError> {
        if self.config.role != role {
            return Err(RdmaError::Misuse("not this side's role"));
        }
        match (&self.peer, self.state) {
            (Some(peer), State::Open) => Ok(peer.clone()),
            _ => Err(RdmaError::Misuse("the connection is not open")),
        }
    }

    fn enqueue(&mut self, items: Vec<Outgoing>, now: Instant) -> Result<(), RdmaError> {
        if self.state != State::Open {
            return Err(RdmaError::Misuse("the connection is not open"));
        }
        if self.queue.len() + items.len() > self.config.max_queued {
            return Err(RdmaError::Backpressure(self.queue.len()));
        }
        self.queue.extend(items);
        self.drive(now);
        Ok(())
    }

    fn wr_id(&mut self) -> u64 {
        let id = self.next_wr;
        self.next_wr = (self.next_wr + 1) & !RECV_TAG;
        id
    }

    fn post_recv(&mut self, buf: u16) {
        let wr_id = RECV_TAG | u64::from(buf);
        self.posted.insert(wr_id, Posted::Recv(buf));
        self.ops.push_back(Op::PostRecv { wr_id, buf });
    }

    /// Posts a message, spending a credit and returning ours.
    fn post_send(&mut self, message: &Message, close: bool, now: Instant) {
        let returned = self.to_return.min(u32::from(u16::MAX));
        let bytes = message.encode(returned as u16, self.send_seq);
        self.to_return -= returned;
        self.send_seq += 1;
        self.credits -= 1;
        self.sq_used += 1;
        self.last_sent = now;
        let wr_id = self.wr_id();
        self.posted.insert(wr_id, Posted::Send { close });
        self.ops.push_back(Op::Send { wr_id, bytes });
    }

    fn post_write(&mut self, local: LocalSlice, remote_addr: u64, rkey: u32, put: Option<u64>) {
        self.sq_used += 1;
        let wr_id = self.wr_id();
        self.posted.insert(wr_id, Posted::Write { put });
        self.ops.push_back(Op::Write { wr_id, local, remote_addr, rkey });
    }

    /// Sends what the queue holds as far as credits, send-queue room,
    /// slots and the bound on downloads in flight allow, in order.
    fn drive(&mut self, now: Instant) {
        self.clock = self.clock.max(now);
        if !matches!(self.state, State::Open | State::Closing) {
            return;
        }
        let Some(peer) = self.peer.clone() else { return };
        while let Some(head) = self.queue.front() {
            // One credit stays for credit returns, except for the last message.
            let (credits, entries, ready) = match head {
                Outgoing::Message(Message::Close { .. }) => (1, 1, true),
                Outgoing::Message(_) | Outgoing::Frame { .. } => (2, 1, true),
                Outgoing::PutChunk { .. } => (2, 2, !self.free_slots.is_empty()),
                Outgoing::Get(_) => {
                    let bound = self.config.max_gets_in_flight.min(peer.gets_in_flight);
                    (2, 1, self.gets_out.len() < usize::from(bound))
                }
                Outgoing::GetAnswer { .. } => (2, 2, true),
            };
            if self.credits < credits || self.config.send_depth - self.sq_used < entries || !ready {
                break;
            }
            match self.queue.pop_front().expect("peeked above") {
                Outgoing::Message(m) => {
                    let close = matches!(m, Message::Close { .. });
                    self.post_send(&m, close, now);
                }
                Outgoing::Frame { body, sent } => {
                    // No larger than either side's buffers: the binding's send
                    // buffers have this side's receive size.
                    let fragment = peer.recv_buf.min(self.config.recv_buf) as usize - HEADER_LEN;
                    let end = (sent + fragment).min(body.len());
                    let last = end == body.len();
                    self.post_send(&Message::Data { last, body: body[sent..end].to_vec() }, false, now);
                    if !last {
                        self.queue.push_front(Outgoing::Frame { body, sent: end });
                    }
                }
                Outgoing::PutChunk { id, total, offset, local } => {
                    let slot = self.free_slots.pop_front().expect("checked above");
                    let addr = peer.region.addr + u64::from(slot) * u64::from(peer.slot_size);
                    self.slot_owner[usize::from(slot)] = Some(id);
                    self.post_write(local, addr, peer.region.rkey, Some(id));
                    // RC delivers the notice after the write's bytes are placed.
                    self.post_send(&Message::PutChunk { id, total, offset, len: local.len, slot }, false, now);
                }
                Outgoing::Get(t) => {
                    self.gets_out.insert((t.id, t.offset), t.len);
                    let m = Message::GetRequest { id: t.id, offset: t.offset, len: t.len, dest: t.dest };
                    self.post_send(&m, false, now);
                }
                Outgoing::GetAnswer { ticket: t, local } => {
                    // The destination was checked when the request arrived.
                    self.post_write(local, peer.region.addr + t.dest, peer.region.rkey, None);
                    self.post_send(&Message::GetDone { id: t.id, offset: t.offset, len: t.len }, false, now);
                }
            }
        }
        let threshold = (u32::from(self.config.recv_depth) / 2).max(1);
        if self.state == State::Open
            && self.to_return >= threshold
            && self.credits >= 1
            && self.sq_used < self.config.send_depth
        {
            self.post_send(&Message::Credit, false, now);
        }
    }

    fn on_receive(&mut self, bytes: &[u8], now: Instant) -> Result<(), RdmaError> {
        if bytes.len() > self.config.recv_buf as usize {
            return Err(RdmaError::Violation(format!(
                "{} bytes received into a buffer of {}",
                bytes.len(),
                self.config.recv_buf
            )));
        }
        let received = wire::decode(bytes)?;
        if received.seq != self.recv_seq {
            return Err(RdmaError::Violation(format!("message {} arrived, {} expected", received.seq, self.recv_seq)));
        }
        self.recv_seq += 1;
        let hello = matches!(received.message, Message::Hello(_));
        match (&self.peer, hello) {
            (None, false) => return Err(RdmaError::Violation("the first message was not a Hello".into())),
            (Some(_), true) => return Err(RdmaError::Violation("a second Hello".into())),
            _ => {}
        }
        if let Some(peer) = &self.peer {
            let credits = self.credits + u32::from(received.credits);
            if credits > u32::from(peer.recv_depth) {
                return Err(RdmaError::Violation(format!(
                    "credits returned beyond the {} buffers announced",
                    peer.recv_depth
                )));
            }
            self.credits = credits;
        }
        match received.message {
            Message::Hello(hello) => self.on_hello(hello, now)?,
            Message::Data { last, body } => {
                if self.partial.len() + body.len() > self.config.max_frame as usize {
                    return Err(RdmaError::Violation(format!(
                        "frame above the {} bytes announced",
                        self.config.max_frame
                    )));
                }
                self.partial.extend_from_slice(&body);
                if last {
                    self.events.push_back(Event::Frame(std::mem::take(&mut self.partial)));
                }
            }
            Message::Credit => {}
            Message::PutChunk { id, total, offset, len, slot } => {
                self.server_only("PutChunk")?;
                let busy = self.busy_slots.get_mut(usize::from(slot));
                let Some(busy) = busy.filter(|b| !**b) else {
                    return Err(RdmaError::Violation(format!("upload into slot {slot}, not a free slot")));
                };
                if len == 0
                    || len > self.config.slot_size
                    || offset.checked_add(u64::from(len)).is_none_or(|e| e > total)
                {
                    return Err(RdmaError::Violation(format!("upload chunk of {len} bytes at {offset} of {total}")));
                }
                *busy = true;
                self.events.push_back(Event::PutChunk { id, total, offset, len, slot });
            }
            Message::SlotFree { slot, code } => {
                if self.config.role != Role::Client {
                    return Err(RdmaError::Violation("SlotFree sent to the server".into()));
                }
                let Some(id) = self.slot_owner.get_mut(usize::from(slot)).and_then(Option::take) else {
                    return Err(RdmaError::Violation(format!("slot {slot} freed while not in use")));
                };
                self.free_slots.push_back(slot);
                let entry = self.verdicts.get_mut(&id).expect("a chunk in a slot has its upload");
                entry.0 -= 1;
                if code != 0 {
                    entry.1.get_or_insert(code);
                }
                if let (0, refused) = *entry {
                    self.verdicts.remove(&id);
                    self.events.push_back(match refused {
                        None => Event::PutDone { id },
                        Some(code) => Event::PutFailed { id, code },
                    });
                }
            }
            Message::GetRequest { id, offset, len, dest } => {
                self.server_only("GetRequest")?;
                let region = self.peer.as_ref().map(|p| p.region).expect("after the Hello");
                if len == 0 || len > self.config.max_get_chunk || offset.checked_add(u64::from(len)).is_none() {
                    return Err(RdmaError::Violation(format!("download chunk of {len} bytes at {offset}")));
                }
                region.address_of(dest, u64::from(len))?;
                if self.tickets.len() >= usize::from(self.config.max_gets_in_flight) {
                    return Err(RdmaError::Violation("more download chunks in flight than allowed".into()));
                }
                let ticket = GetTicket { id, offset, len, dest };
                if self.tickets.insert((id, offset), ticket).is_some() {
                    return Err(RdmaError::Violation(format!("download chunk {id}@{offset} asked for twice")));
                }
                self.events.push_back(Event::GetRequest(ticket));
            }
            Message::GetDone { id, offset, len } => self.on_get_answer(id, offset, Some(len))?,
            Message::GetFailed { id, offset, code } => {
                self.on_get_answer(id, offset, None)?;
                if let Some((_, refused)) = self.gets.get_mut(&id)
                    && !*refused
                {
                    *refused = true;
                    self.events.push_back(Event::GetFailed { id, code });
                }
                self.end_get_if_done(id);
            }
            Message::Close { code } => self.finish(Ok(code)),
        }
        Ok(())
    }

    fn server_only(&self, what: &str) -> Result<(), RdmaError> {
        if self.config.role == Role::Server {
            Ok(())
        } else {
            Err(RdmaError::Violation(format!("{what} sent to the client")))
        }
    }

    fn on_hello(&mut self, hello: Hello, now: Instant) -> Result<(), RdmaError> {
        if hello.version != CORE_VERSION {
            return Err(RdmaError::VersionMismatch { ours: CORE_VERSION, theirs: hello.version });
        }
        if !(MIN_RECV_DEPTH..=MAX_RECV_DEPTH).contains(&hello.recv_depth)
            || !(MIN_RECV_BUF..=MAX_RECV_BUF).contains(&hello.recv_buf)
            || hello.max_frame == 0
            || hello.max_frame > MAX_FRAME
            || hello.get_chunk == 0
            || hello.get_chunk > MAX_CHUNK
            || hello.gets_in_flight == 0
        {
            return Err(RdmaError::Violation(format!(
                "Hello out of bounds: {} buffers of {} bytes, frames of {}, download chunks of {} ({} at once)",
                hello.recv_depth, hello.recv_buf, hello.max_frame, hello.get_chunk, hello.gets_in_flight
            )));
        }
        let peer_role = match self.config.role {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        };
        check_slots(peer_role, &hello.region, hello.slots, hello.slot_size).map_err(RdmaError::Violation)?;
        // A server's listener serves every session: its Hello names none
        // (0) before the client's arrived, or the client's own.
        if self.config.role == Role::Client && hello.session_id != 0 && hello.session_id != self.config.session_id {
            return Err(RdmaError::Violation("the server's Hello names another session".into()));
        }
        if self.state == State::Connecting {
            // The receive completed before the connection manager's event.
            self.handle_established(now);
        }
        // Our Hello used one of the peer's buffers.
        self.credits = u32::from(hello.recv_depth) - 1;
        self.free_slots = (0..hello.slots).collect();
        self.slot_owner = vec![None; usize::from(hello.slots)];
        self.peer = Some(Peer {
            recv_depth: hello.recv_depth,
            recv_buf: hello.recv_buf,
            max_frame: hello.max_frame,
            region: hello.region,
            slot_size: hello.slot_size,
            get_chunk: hello.get_chunk,
            gets_in_flight: hello.gets_in_flight,
        });
        self.state = State::Open;
        self.deadline = None;
        self.events.push_back(Event::Connected { session_id: hello.session_id, secret: hello.secret });
        Ok(())
    }

    /// Client: a `GetDone` (with its length) or `GetFailed` for a chunk asked for.
    fn on_get_answer(&mut self, id: u64, offset: u64, len: Option<u32>) -> Result<(), RdmaError> {
        if self.config.role != Role::Client {
            return Err(RdmaError::Violation("a download answer sent to the server".into()));
        }
        let Some(asked) = self.gets_out.remove(&(id, offset)) else {
            return Err(RdmaError::Violation(format!("answer to download chunk {id}@{offset}, not asked for")));
        };
        if len.is_some_and(|len| len != asked) {
            return Err(RdmaError::Violation(format!("download chunk {id}@{offset} of {len:?} bytes, {asked} asked")));
        }
        let entry = self.gets.get_mut(&id).expect("a chunk in flight has its download");
        entry.0 -= 1;
        if len.is_some() {
            self.end_get_if_done(id);
        }
        Ok(())
    }

    fn end_get_if_done(&mut self, id: u64) {
        if let Some(&(0, refused)) = self.gets.get(&id) {
            self.gets.remove(&id);
            if !refused {
                self.events.push_back(Event::GetDone { id });
            }
        }
    }

    fn fail(&mut self, error: RdmaError) {
        self.finish(Err(error));
    }

    fn finish(&mut self, result: Result<u32, RdmaError>) {
        if self.state == State::Ended {
            return;
        }
        self.state = State::Ended;
        self.queue.clear();
        self.events.push_back(Event::Ended(result));
        self.ops.push_back(Op::Disconnect);
    }
}
