//! One side of an RDMA connection on any [`Nic`]: registers its regions,
//! posts its receives, connects, and drives a `gpupool_proto::rdma`
//! [`Connection`] by posting its ops and feeding it completions and
//! connection-manager events. The caller pumps it ([`Endpoint::pump`],
//! [`Endpoint::next_event`]).

use crate::Error;
use crate::nic::{CmNotice, Completion, Depths, Listen, Nic, Provider, SendWr, Wake};
use gpupool_proto::rdma::{Config, Connection, Event, LocalSlice, Op, RdmaError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Local region ids, as the core's [`LocalSlice::region`] names them.
pub const PEER_WRITABLE: u32 = 1;
/// The region bulk copies are read from (uploads on a client, downloads on a server).
pub const SOURCE: u32 = 2;

/// Registration indices inside the queue pair, in the order registered.
const RECV: usize = 0;
const SEND: usize = 1;
const WRITABLE: usize = 2;
const SRC: usize = 3;

/// Sizes of the regions an endpoint registers besides its message buffers.
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    /// Bytes the peer may write (server: staging slots; client: landing).
    pub writable: usize,
    /// Bytes bulk copies are read from.
    pub source: usize,
}

/// One connected side.
#[derive(Debug)]
pub struct Endpoint {
    nic: Box<dyn Nic>,
    conn: Connection,
    recv_buf: u32,
    send_free: Vec<u64>,
    /// Send buffer of each send in flight.
    sending: HashMap<u64, u64>,
    /// Receive buffer of each receive posted.
    receiving: HashMap<u64, u16>,
    wcs: Vec<Completion>,
    scratch: Vec<u8>,
}

impl Endpoint {
    /// Connects to a listener at `addr` within `timeout`, as a client with `config`.
    pub fn connect(
        provider: &dyn Provider,
        addr: SocketAddr,
        config: Config,
        regions: Regions,
        timeout: Duration,
    ) -> Result<Endpoint, Error> {
        let deadline = Instant::now() + timeout;
        let nic = provider.connect(addr, depths(&config), timeout)?;
        let mut endpoint = Endpoint::new(nic, config, regions)?;
        endpoint.nic.start()?;
        endpoint.wait_established(deadline)?;
        Ok(endpoint)
    }

    /// Accepts the next connect request that comes within `wait`, as a
    /// server with `config`, connected within `timeout` after it came;
    /// `None` when no request came.
    pub fn accept(
        listener: &mut dyn Listen,
        config: Config,
        regions: Regions,
        wait: Duration,
        timeout: Duration,
    ) -> Result<Option<Endpoint>, Error> {
        let Some(nic) = listener.accept(depths(&config), wait)? else { return Ok(None) };
        let deadline = Instant::now() + timeout;
        let mut endpoint = Endpoint::new(nic, config, regions)?;
        endpoint.nic.start()?;
        endpoint.wait_established(deadline)?;
        Ok(Some(endpoint))
    }

    /// The queue pair's regions, and the core with its receives posted.
    fn new(mut nic: Box<dyn Nic>, mut config: Config, regions: Regions) -> Result<Endpoint, Error> {
        let (depth, send_depth, recv_buf) = (config.recv_depth, config.send_depth, config.recv_buf);
        let buf = recv_buf as usize;
        nic.register(usize::from(depth) * buf, false)?;
        nic.register(usize::from(send_depth) * buf, false)?;
        config.region = nic.register(regions.writable, true)?.1;
        nic.register(regions.source, false)?;
        let conn = Connection::new(config, Instant::now())?;
        let mut endpoint = Endpoint {
            nic,
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
            match self.nic.poll_cm()? {
                Some(CmNotice::Established) => {
                    self.conn.handle_established(Instant::now());
                    return self.run_ops();
                }
                Some(other) => return Err(Error::Cm(format!("{other:?} while connecting"))),
                None if Instant::now() >= deadline => return Err(Error::Timeout("the connection")),
                None => self.nic.wait(Duration::from_millis(1)),
            }
        }
    }

    /// The protocol state machine: send frames, start copies, close.
    pub fn conn(&mut self) -> &mut Connection {
        &mut self.conn
    }

    /// Copies bytes out of one of this side's regions ([`PEER_WRITABLE`] or [`SOURCE`]).
    pub fn read(&self, region: u32, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        self.nic.read(local_region(region)?, offset, out)
    }

    /// Copies bytes into one of this side's regions.
    pub fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.nic.write(local_region(region)?, offset, data)
    }

    /// Waits up to `max` for the NIC (a completion, an event, a wake-up).
    pub fn wait(&mut self, max: Duration) {
        self.nic.wait(max);
    }

    /// A handle that ends a [`Self::wait`] early.
    pub fn waker(&self) -> Wake {
        self.nic.waker()
    }

    /// Drives the connection until `step` breaks with the end: each round
    /// pumps the NIC, runs `step` (whether it moved anything), posts what it
    /// queued, and waits up to `idle` when nothing moved.
    pub fn drive<T>(
        &mut self,
        idle: Duration,
        mut step: impl FnMut(&mut Endpoint) -> std::ops::ControlFlow<T, bool>,
    ) -> Result<T, Error> {
        loop {
            let mut moved = self.pump()?;
            match step(self) {
                std::ops::ControlFlow::Break(end) => return Ok(end),
                std::ops::ControlFlow::Continue(m) => moved |= m,
            }
            self.run_ops()?;
            if !moved {
                self.nic.wait(idle);
            }
        }
    }

    /// Posts what the core asked for since the last pump (after calls on
    /// [`Self::conn`]).
    pub fn flush(&mut self) -> Result<(), Error> {
        self.run_ops()
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
                self.nic.wait(Duration::from_micros(200).min(deadline.saturating_duration_since(Instant::now())));
            }
        }
    }

    /// One round: connection-manager events, completions, timers, ops.
    /// Whether anything happened.
    pub fn pump(&mut self) -> Result<bool, Error> {
        let now = Instant::now();
        let mut moved = false;
        // Completions first: a peer's last message (its `Close`) arrives
        // before the disconnect that follows it is taken as a loss.
        self.wcs.clear();
        self.nic.poll_completions(&mut self.wcs)?;
        moved |= self.complete(now)?;
        while let Some(event) = self.nic.poll_cm()? {
            moved = true;
            if matches!(event, CmNotice::Disconnected | CmNotice::Failed(_)) {
                // Completions that came meanwhile go first.
                self.wcs.clear();
                self.nic.poll_completions(&mut self.wcs)?;
                self.complete(now)?;
                self.conn.handle_disconnected();
            }
        }
        if self.conn.poll_timeout().is_some_and(|t| now >= t) {
            self.conn.handle_timeout(now);
        }
        self.run_ops()?;
        Ok(moved)
    }

    /// Feeds the completions polled into `wcs` to the core; whether any.
    fn complete(&mut self, now: Instant) -> Result<bool, Error> {
        for i in 0..self.wcs.len() {
            let wc = self.wcs[i];
            let len = (wc.byte_len as usize).min(self.scratch.len());
            if let Some(buf) = self.sending.remove(&wc.wr_id) {
                self.send_free.push(buf);
            }
            let received = self.receiving.remove(&wc.wr_id);
            if let (Some(buf), Ok(())) = (received, wc.status) {
                let mut scratch = std::mem::take(&mut self.scratch);
                self.nic.read(RECV, u64::from(buf) * u64::from(self.recv_buf), &mut scratch[..len])?;
                self.conn.handle_completion(now, wc.wr_id, wc.status, &scratch[..len]);
                self.scratch = scratch;
            } else {
                self.conn.handle_completion(now, wc.wr_id, wc.status, &[]);
            }
        }
        Ok(!self.wcs.is_empty())
    }

    /// Posts what the core asks for.
    fn run_ops(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        while let Some(op) = self.conn.poll_op() {
            match op {
                Op::PostRecv { wr_id, buf } => {
                    let offset = u64::from(buf) * u64::from(self.recv_buf);
                    self.nic.post_recv(wr_id, RECV, offset, self.recv_buf)?;
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
                    self.nic.write(SEND, offset, &bytes)?;
                    self.nic.post_send(SendWr {
                        wr_id,
                        region: SEND,
                        offset,
                        len: bytes.len() as u32,
                        remote: None,
                    })?;
                    self.sending.insert(wr_id, buf);
                }
                Op::Write { wr_id, local, remote_addr, rkey } => {
                    let posted = local_region(local.region).and_then(|region| {
                        let remote = Some((remote_addr, rkey));
                        self.nic.post_send(SendWr { wr_id, region, offset: local.offset, len: local.len, remote })
                    });
                    if posted.is_err() {
                        // What the NIC would answer for memory outside a registration.
                        let status = Err(gpupool_proto::rdma::WcError::LocalProtection);
                        self.conn.handle_completion(now, wr_id, status, &[]);
                    }
                }
                Op::Disconnect => self.nic.disconnect(),
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

/// The queue sizes a configuration needs.
fn depths(config: &Config) -> Depths {
    Depths { send: config.send_depth, recv: config.recv_depth }
}

/// A slice of this side's source region, for `put` and `answer_get`.
pub fn source(offset: u64, len: u32) -> LocalSlice {
    LocalSlice { region: SOURCE, offset, len }
}
