//! One side of an RDMA connection on verbs: sets up the queue pair with
//! rdma_cm, registers its regions, and drives a `gpupool_proto::rdma`
//! [`Connection`] by posting its ops and feeding it completions and
//! connection-manager events. Polled: the caller pumps it with a deadline.

use crate::Error;
use crate::verbs::{Channel, CmEvent, CmId, QueuePair, Wc};
use gpupool_proto::rdma::{Config, Connection, Event, LocalSlice, Op, RdmaError, RemoteRegion};
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

/// Local region ids, as the core's [`LocalSlice::region`] names them.
pub const PEER_WRITABLE: u32 = 1;
/// The region bulk copies are read from (uploads on a client, downloads on a server).
pub const SOURCE: u32 = 2;

/// Registration indices inside the queue pair.
const RECV: usize = 0;
const SEND: usize = 1;
const WRITABLE: usize = 2;
const SRC: usize = 3;

/// How long rdma_cm may take to resolve an address or a route.
const RESOLVE_MS: i32 = 2000;

/// Sizes of the regions an endpoint registers besides its message buffers.
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    /// Bytes the peer may write (server: staging slots; client: landing).
    pub writable: usize,
    /// Bytes bulk copies are read from.
    pub source: usize,
}

/// A listening rdma_cm id.
#[derive(Debug)]
pub struct Listener {
    // Field order is drop order: the id before its channel.
    id: CmId,
    channel: Channel,
}

impl Listener {
    /// Listens on `addr` (an address of an RDMA device's interface; port 0 picks one).
    pub fn bind(addr: SocketAddrV4) -> Result<Listener, Error> {
        let channel = Channel::new()?;
        let id = CmId::new(&channel)?;
        id.listen(addr, 16)?;
        Ok(Listener { id, channel })
    }

    pub fn port(&self) -> u16 {
        self.id.port()
    }

    /// Accepts the next connection within `timeout`, as a server with `config`.
    pub fn accept(&self, config: Config, regions: Regions, timeout: Duration) -> Result<Endpoint, Error> {
        let deadline = Instant::now() + timeout;
        let id = loop {
            match self.channel.poll()? {
                Some(CmEvent::ConnectRequest(id)) => break id,
                Some(other) => return Err(Error::Cm(format!("{other} while waiting for a connect request"))),
                None if Instant::now() >= deadline => return Err(Error::Timeout("a connect request")),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let channel = Channel::new()?;
        id.migrate(&channel)?;
        let mut endpoint = Endpoint::new(id, channel, config, regions)?;
        endpoint.qp.id().accept()?;
        endpoint.wait_established(deadline)?;
        Ok(endpoint)
    }
}

/// One connected side.
#[derive(Debug)]
pub struct Endpoint {
    // Field order is drop order: the queue pair (and its id) before the channel.
    qp: QueuePair,
    channel: Channel,
    conn: Connection,
    recv_buf: u32,
    send_free: Vec<u64>,
    /// Send buffer of each send in flight.
    sending: HashMap<u64, u64>,
    /// Receive buffer of each receive posted.
    receiving: HashMap<u64, u16>,
    wcs: Vec<Wc>,
    scratch: Vec<u8>,
}

impl Endpoint {
    /// Connects to a listener at `addr` within `timeout`, as a client with `config`.
    pub fn connect(addr: SocketAddrV4, config: Config, regions: Regions, timeout: Duration) -> Result<Endpoint, Error> {
        let deadline = Instant::now() + timeout;
        let channel = Channel::new()?;
        let id = CmId::new(&channel)?;
        id.resolve_addr(addr, RESOLVE_MS)?;
        wait_for(&channel, deadline, "address resolution", |e| matches!(e, CmEvent::AddrResolved))?;
        id.resolve_route(RESOLVE_MS)?;
        wait_for(&channel, deadline, "route resolution", |e| matches!(e, CmEvent::RouteResolved))?;
        let mut endpoint = Endpoint::new(id, channel, config, regions)?;
        endpoint.qp.id().connect()?;
        endpoint.wait_established(deadline)?;
        Ok(endpoint)
    }

    /// The queue pair, its regions, and the core with its receives posted.
    fn new(id: CmId, channel: Channel, mut config: Config, regions: Regions) -> Result<Endpoint, Error> {
        let (depth, send_depth, recv_buf) = (config.recv_depth, config.send_depth, config.recv_buf);
        let mut qp = QueuePair::new(id, u32::from(send_depth), u32::from(depth))?;
        let buf = recv_buf as usize;
        qp.register(usize::from(depth) * buf, false)?;
        qp.register(usize::from(send_depth) * buf, false)?;
        qp.register(regions.writable, true)?;
        qp.register(regions.source, false)?;
        let writable = qp.info(WRITABLE).expect("registered above");
        config.region = RemoteRegion { addr: writable.addr, len: writable.len, rkey: writable.rkey };
        let conn = Connection::new(config, Instant::now())?;
        let mut endpoint = Endpoint {
            qp,
            channel,
            conn,
            recv_buf,
            send_free: (0..u64::from(send_depth)).collect(),
            sending: HashMap::new(),
            receiving: HashMap::new(),
            wcs: Vec::with_capacity(16),
            scratch: vec![0; buf],
        };
        endpoint.run_ops()?;
        Ok(endpoint)
    }

    fn wait_established(&mut self, deadline: Instant) -> Result<(), Error> {
        loop {
            match self.channel.poll()? {
                Some(CmEvent::Established) => {
                    self.conn.handle_established(Instant::now());
                    return self.run_ops();
                }
                Some(other) => return Err(Error::Cm(format!("{other} while connecting"))),
                None if Instant::now() >= deadline => return Err(Error::Timeout("the connection")),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// The protocol state machine: send frames, start copies, close.
    pub fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Copies bytes out of one of this side's regions ([`PEER_WRITABLE`] or [`SOURCE`]).
    pub fn read(&self, region: u32, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        self.qp.read(local_region(region)?, offset, out)
    }

    /// Copies bytes into one of this side's regions.
    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.qp.write(local_region(region)?, offset, data)
    }

    /// Pumps until the core has an event, or `deadline`.
    pub fn next_event(&mut self, deadline: Instant) -> Result<Event, Error> {
        self.run_ops()?;
        loop {
            if let Some(event) = self.conn.poll_event() {
                self.run_ops()?;
                return Ok(event);
            }
            let moved = self.pump()?;
            if Instant::now() >= deadline {
                return Err(Error::Timeout("an RDMA event"));
            }
            if !moved {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// One round: connection-manager events, completions, timers, ops.
    /// Whether anything happened.
    fn pump(&mut self) -> Result<bool, Error> {
        let now = Instant::now();
        let mut moved = false;
        while let Some(event) = self.channel.poll()? {
            moved = true;
            if matches!(event, CmEvent::Disconnected | CmEvent::Other { .. }) {
                self.conn.handle_disconnected();
            }
        }
        self.wcs.clear();
        self.qp.poll(&mut self.wcs)?;
        for i in 0..self.wcs.len() {
            moved = true;
            let wc = self.wcs[i];
            let len = (wc.byte_len as usize).min(self.scratch.len());
            if let Some(buf) = self.sending.remove(&wc.wr_id) {
                self.send_free.push(buf);
            }
            let received = self.receiving.remove(&wc.wr_id);
            if let (Some(buf), Ok(())) = (received, wc.status) {
                let mut scratch = std::mem::take(&mut self.scratch);
                self.qp.read(RECV, u64::from(buf) * u64::from(self.recv_buf), &mut scratch[..len])?;
                self.conn.handle_completion(now, wc.wr_id, wc.status, &scratch[..len]);
                self.scratch = scratch;
            } else {
                self.conn.handle_completion(now, wc.wr_id, wc.status, &[]);
            }
        }
        if self.conn.poll_timeout().is_some_and(|t| now >= t) {
            self.conn.handle_timeout(now);
        }
        self.run_ops()?;
        Ok(moved)
    }

    /// Posts what the core asks for.
    fn run_ops(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        while let Some(op) = self.conn.poll_op() {
            match op {
                Op::PostRecv { wr_id, buf } => {
                    let offset = u64::from(buf) * u64::from(self.recv_buf);
                    self.qp.post_recv(wr_id, RECV, offset, self.recv_buf)?;
                    self.receiving.insert(wr_id, buf);
                }
                Op::Send { wr_id, bytes } => {
                    // The core sends at most its own buffer size and no more
                    // sends than the send queue holds; checked all the same.
                    if bytes.len() > self.recv_buf as usize {
                        return Err(RdmaError::Misuse("a message larger than the send buffers").into());
                    }
                    let buf = self.send_free.pop().ok_or(RdmaError::Misuse("more sends than the send queue holds"))?;
                    let offset = buf * u64::from(self.recv_buf);
                    self.qp.write(SEND, offset, &bytes)?;
                    self.qp.post_send(wr_id, SEND, offset, bytes.len() as u32, None)?;
                    self.sending.insert(wr_id, buf);
                }
                Op::Write { wr_id, local, remote_addr, rkey } => {
                    let posted = local_region(local.region)
                        .and_then(|r| self.qp.post_send(wr_id, r, local.offset, local.len, Some((remote_addr, rkey))));
                    if posted.is_err() {
                        // What the NIC would answer for memory outside a registration.
                        let status = Err(gpupool_proto::rdma::WcError::LocalProtection);
                        self.conn.handle_completion(now, wr_id, status, &[]);
                    }
                }
                Op::Disconnect => self.qp.id().disconnect(),
            }
        }
        Ok(())
    }
}

/// A core region id as a registration index.
fn local_region(region: u32) -> Result<usize, Error> {
    match region {
        PEER_WRITABLE => Ok(WRITABLE),
        SOURCE => Ok(SRC),
        other => Err(Error::LocalBounds { region: other as usize, offset: 0, len: 0 }),
    }
}

/// Waits for the event `want` on `channel`; any other is an error.
fn wait_for(
    channel: &Channel,
    deadline: Instant,
    what: &'static str,
    want: impl Fn(&CmEvent) -> bool,
) -> Result<(), Error> {
    loop {
        match channel.poll()? {
            Some(event) if want(&event) => return Ok(()),
            Some(other) => return Err(Error::Cm(format!("{other} during {what}"))),
            None if Instant::now() >= deadline => return Err(Error::Timeout(what)),
            None => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// A slice of this side's source region, for `put` and `answer_get`.
pub fn source(offset: u64, len: u32) -> LocalSlice {
    LocalSlice { region: SOURCE, offset, len }
}
