//! An in-memory RDMA fabric: a [`Provider`] whose queue pairs connect two
//! sides in one process (a server and a client in a test, or a laptop
//! without a device) with the semantics of a reliable-connected queue pair:
//! registered regions named by rkey with a remote-write flag, receive
//! buffers posted ahead, sends and writes delivered in order, completions,
//! and the failures RC reports: a remote access error on a bad key, bounds
//! or access; receiver-not-ready when no buffer is posted; a local length
//! error on an oversized message; a local protection error on memory
//! outside a registration; everything flushed once a queue pair is in error.
//!
//! Failures can be injected per connection ([`MemLink`]): a side that hangs
//! (its NIC still receives while its buffers last, it answers nothing), a
//! link cut (both sides told by the connection manager), the n-th send of a
//! side completing with a chosen status; and per fabric, connects refused
//! ([`MemFabric::refuse_connects`]).
//!
//! Delivery is immediate, under one lock per connection: a post completes
//! (on both sides) before it returns, as if the wire had no latency.

use crate::Error;
use crate::nic::{CmNotice, Completion, Depths, Listen, Nic, Provider, SendWr, Wake};
use gpupool_proto::rdma::{RemoteRegion, WcError};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Connect requests a listener holds before it accepts them.
const BACKLOG: usize = 16;

/// Which end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that connected.
    Client = 0,
    /// The side that accepted.
    Server = 1,
}

/// An in-process fabric: listeners by port, and the connections made.
#[derive(Debug, Clone)]
pub struct MemFabric {
    inner: Arc<Fabric>,
}

#[derive(Debug)]
struct Fabric {
    device: String,
    listeners: Mutex<HashMap<u16, Arc<Backlog>>>,
    next_port: AtomicU16,
    links: Mutex<Vec<Weak<Link>>>,
    refuse: AtomicBool,
}

#[derive(Debug, Default)]
struct Backlog {
    queue: Mutex<VecDeque<MemNic>>,
    ready: Condvar,
}

/// One connection: both sides' NIC state under one lock.
#[derive(Debug)]
struct Link {
    state: Mutex<LinkState>,
    moved: Condvar,
}

#[derive(Debug, Default)]
struct LinkState {
    sides: [SideState; 2],
    /// Both queue pairs are in error: everything completes flushed.
    errored: bool,
    /// The link is gone: nothing is delivered any more.
    cut: bool,
    /// Sends of side `i` still to succeed before one completes with the status.
    fail_send_after: [Option<(usize, WcError)>; 2],
}

#[derive(Debug, Default)]
struct SideState {
    regions: Vec<Region>,
    /// Receives posted: (wr_id, region, offset, len).
    posted: VecDeque<(u64, usize, u64, u32)>,
    cq: VecDeque<Completion>,
    cm: VecDeque<CmNotice>,
    started: bool,
    disconnected: bool,
    /// Answers nothing: no completion or event is handed out, nothing it
    /// posts goes out.
    hung: bool,
    /// A waker was called.
    poked: bool,
}

#[derive(Debug)]
struct Region {
    bytes: Vec<u8>,
    addr: u64,
    rkey: u32,
    remote_write: bool,
}

impl MemFabric {
    /// A fabric whose device is called `device`.
    pub fn new(device: &str) -> MemFabric {
        MemFabric {
            inner: Arc::new(Fabric {
                device: device.into(),
                listeners: Mutex::default(),
                next_port: AtomicU16::new(18_000),
                links: Mutex::default(),
                refuse: AtomicBool::new(false),
            }),
        }
    }

    /// Makes every connect fail (or succeed again): a setup error.
    pub fn refuse_connects(&self, refuse: bool) {
        self.inner.refuse.store(refuse, Ordering::Release);
    }

    /// The connections made so far that still exist, oldest first.
    pub fn links(&self) -> Vec<MemLink> {
        let mut links = lock(&self.inner.links);
        links.retain(|l| l.strong_count() > 0);
        links.iter().filter_map(Weak::upgrade).map(MemLink).collect()
    }
}

/// A connection of the fabric, for failure injection.
#[derive(Debug, Clone)]
pub struct MemLink(Arc<Link>);

impl MemLink {
    /// `side` stops answering: its NIC still takes what arrives while its
    /// receive buffers last, but nothing completes for it and nothing it
    /// posts goes out (a frozen or wedged peer).
    pub fn hang(&self, side: Side) {
        self.0.lock().sides[side as usize].hung = true;
        self.0.moved.notify_all();
    }

    /// The link goes away: the connection manager tells both sides.
    pub fn cut(&self) {
        let mut state = self.0.lock();
        state.cut = true;
        for side in &mut state.sides {
            side.cm.push_back(CmNotice::Disconnected);
        }
        state.error();
        drop(state);
        self.0.moved.notify_all();
    }

    /// After `n` more sends of `side` succeed, the next completes with `status`.
    pub fn fail_send_after(&self, side: Side, n: usize, status: WcError) {
        self.0.lock().fail_send_after[side as usize] = Some((n, status));
    }

    /// Whether both sides connected and neither disconnected.
    pub fn is_up(&self) -> bool {
        let state = self.0.lock();
        state.sides.iter().all(|s| s.started && !s.disconnected) && !state.errored && !state.cut
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.state)
    }
}

impl LinkState {
    /// Both queue pairs go to error: what is posted completes flushed.
    fn error(&mut self) {
        self.errored = true;
        for side in &mut self.sides {
            while let Some((wr_id, ..)) = side.posted.pop_front() {
                side.cq.push_back(Completion { wr_id, status: Err(WcError::Flushed), byte_len: 0 });
            }
        }
    }

    fn complete(&mut self, side: usize, wr_id: u64, status: Result<(), WcError>, byte_len: u32) {
        self.sides[side].cq.push_back(Completion { wr_id, status, byte_len });
    }

    /// A send or write of side `i`, delivered at once.
    fn transmit(&mut self, i: usize, wr_id: u64, bytes: Vec<u8>, remote: Option<(u64, u32)>) {
        let peer = 1 - i;
        if remote.is_none()
            && let Some((n, status)) = self.fail_send_after[i]
        {
            if n == 0 {
                self.fail_send_after[i] = None;
                self.complete(i, wr_id, Err(status), 0);
                self.error();
                return;
            }
            self.fail_send_after[i] = Some((n - 1, status));
        }
        if self.errored || self.cut {
            return self.complete(i, wr_id, Err(WcError::Flushed), 0);
        }
        match remote {
            None => match self.sides[peer].posted.pop_front() {
                None => {
                    self.complete(i, wr_id, Err(WcError::ReceiverNotReady), 0);
                    self.error();
                }
                Some((recv, _, _, len)) if bytes.len() > len as usize => {
                    self.complete(peer, recv, Err(WcError::LocalLength), 0);
                    self.complete(i, wr_id, Err(WcError::RemoteOperation), 0);
                    self.error();
                }
                Some((recv, region, offset, _)) => {
                    let start = offset as usize;
                    self.sides[peer].regions[region].bytes[start..start + bytes.len()].copy_from_slice(&bytes);
                    self.complete(peer, recv, Ok(()), bytes.len() as u32);
                    self.complete(i, wr_id, Ok(()), 0);
                }
            },
            Some((addr, rkey)) => {
                let placed =
                    self.sides[peer].regions.iter_mut().find(|r| r.rkey == rkey && r.remote_write).and_then(|r| {
                        let start = usize::try_from(addr.checked_sub(r.addr)?).ok()?;
                        let end = start.checked_add(bytes.len()).filter(|e| *e <= r.bytes.len())?;
                        r.bytes[start..end].copy_from_slice(&bytes);
                        Some(())
                    });
                match placed {
                    Some(()) => self.complete(i, wr_id, Ok(()), 0),
                    None => {
                        self.complete(i, wr_id, Err(WcError::RemoteAccess), 0);
                        self.error();
                    }
                }
            }
        }
    }
}

/// One side's queue pair on the fabric.
#[derive(Debug)]
pub struct MemNic {
    link: Arc<Link>,
    side: usize,
}

impl MemNic {
    fn state(&self) -> MutexGuard<'_, LinkState> {
        self.link.lock()
    }

    fn bounds(&self, region: usize, offset: u64, len: usize) -> Error {
        let _ = self;
        Error::LocalBounds { region, offset, len }
    }

    fn span(state: &LinkState, side: usize, region: usize, offset: u64, len: usize) -> Option<(usize, usize)> {
        let r = state.sides[side].regions.get(region)?;
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len).filter(|e| *e <= r.bytes.len())?;
        Some((start, end))
    }
}

impl Nic for MemNic {
    fn register(&mut self, len: usize, remote_write: bool) -> Result<(usize, RemoteRegion), Error> {
        let mut state = self.state();
        let side = &mut state.sides[self.side];
        let index = side.regions.len();
        // Distinct, non-overlapping addresses per side and region.
        let addr = ((self.side as u64 + 1) << 48) | ((index as u64 + 1) << 38);
        let rkey = 0x5100 + (self.side as u32) * 0x100 + index as u32;
        let bytes = vec![0; len];
        side.regions.push(Region { bytes, addr, rkey, remote_write });
        Ok((index, RemoteRegion { addr, len: len as u64, rkey }))
    }

    fn read(&self, region: usize, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        let state = self.state();
        let (start, end) =
            Self::span(&state, self.side, region, offset, out.len()).ok_or(self.bounds(region, offset, out.len()))?;
        out.copy_from_slice(&state.sides[self.side].regions[region].bytes[start..end]);
        Ok(())
    }

    fn write(&mut self, region: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
        let mut state = self.state();
        let (start, end) =
            Self::span(&state, self.side, region, offset, data.len()).ok_or(self.bounds(region, offset, data.len()))?;
        state.sides[self.side].regions[region].bytes[start..end].copy_from_slice(data);
        Ok(())
    }

    fn post_recv(&mut self, wr_id: u64, region: usize, offset: u64, len: u32) -> Result<(), Error> {
        let mut state = self.state();
        Self::span(&state, self.side, region, offset, len as usize).ok_or(self.bounds(region, offset, len as usize))?;
        if state.errored {
            state.complete(self.side, wr_id, Err(WcError::Flushed), 0);
        } else {
            state.sides[self.side].posted.push_back((wr_id, region, offset, len));
        }
        drop(state);
        self.link.moved.notify_all();
        Ok(())
    }

    fn post_send(&mut self, wr: SendWr) -> Result<(), Error> {
        let SendWr { wr_id, region, offset, len, remote } = wr;
        let mut state = self.state();
        if state.sides[self.side].hung {
            return Ok(());
        }
        let Some((start, end)) = Self::span(&state, self.side, region, offset, len as usize) else {
            // What the NIC answers for memory outside a registration.
            state.complete(self.side, wr_id, Err(WcError::LocalProtection), 0);
            state.error();
            drop(state);
            self.link.moved.notify_all();
            return Ok(());
        };
        let bytes = state.sides[self.side].regions[region].bytes[start..end].to_vec();
        state.transmit(self.side, wr_id, bytes, remote);
        drop(state);
        self.link.moved.notify_all();
        Ok(())
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> Result<(), Error> {
        let mut state = self.state();
        let side = &mut state.sides[self.side];
        if !side.hung {
            out.extend(side.cq.drain(..));
        }
        Ok(())
    }

    fn poll_cm(&mut self) -> Result<Option<CmNotice>, Error> {
        let mut state = self.state();
        let side = &mut state.sides[self.side];
        Ok(if side.hung { None } else { side.cm.pop_front() })
    }

    fn start(&mut self) -> Result<(), Error> {
        let mut state = self.state();
        if state.cut || state.errored {
            return Err(Error::Cm("the connection is gone".into()));
        }
        state.sides[self.side].started = true;
        if state.sides.iter().all(|s| s.started) {
            for side in &mut state.sides {
                side.cm.push_back(CmNotice::Established);
            }
        }
        drop(state);
        self.link.moved.notify_all();
        Ok(())
    }

    fn disconnect(&mut self) {
        let mut state = self.state();
        if state.sides[self.side].disconnected {
            return;
        }
        state.sides[self.side].disconnected = true;
        let peer = &mut state.sides[1 - self.side];
        if !peer.disconnected {
            peer.cm.push_back(CmNotice::Disconnected);
        }
        state.error();
        drop(state);
        self.link.moved.notify_all();
    }

    fn wait(&mut self, max: Duration) {
        let deadline = Instant::now() + max;
        let mut state = self.state();
        loop {
            let side = &mut state.sides[self.side];
            if side.poked || (!side.hung && (!side.cq.is_empty() || !side.cm.is_empty())) {
                side.poked = false;
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self.link.moved.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn waker(&self) -> Wake {
        let (link, side) = (self.link.clone(), self.side);
        Wake::new(move || {
            link.lock().sides[side].poked = true;
            link.moved.notify_all();
        })
    }
}

impl Drop for MemNic {
    fn drop(&mut self) {
        self.disconnect();
    }
}

/// A listener of the fabric; its port is free again once it drops.
#[derive(Debug)]
pub struct MemListener {
    fabric: Arc<Fabric>,
    port: u16,
    backlog: Arc<Backlog>,
}

impl Listen for MemListener {
    fn port(&self) -> u16 {
        self.port
    }

    fn accept(&mut self, _depths: Depths, timeout: Duration) -> Result<Option<Box<dyn Nic>>, Error> {
        let deadline = Instant::now() + timeout;
        let mut queue = lock(&self.backlog.queue);
        loop {
            if let Some(nic) = queue.pop_front() {
                return Ok(Some(Box::new(nic)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            queue = self.backlog.ready.wait_timeout(queue, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Drop for MemListener {
    fn drop(&mut self) {
        lock(&self.fabric.listeners).remove(&self.port);
    }
}

impl Provider for MemFabric {
    fn device(&self) -> String {
        self.inner.device.clone()
    }

    fn listen(&self, addr: SocketAddr) -> Result<Box<dyn Listen>, Error> {
        let mut listeners = lock(&self.inner.listeners);
        let port = match addr.port() {
            0 => loop {
                let port = self.inner.next_port.fetch_add(1, Ordering::Relaxed).max(1);
                if !listeners.contains_key(&port) {
                    break port;
                }
            },
            port if listeners.contains_key(&port) => {
                return Err(Error::Cm(format!("port {port} is already listened on")));
            }
            port => port,
        };
        let backlog = Arc::new(Backlog::default());
        listeners.insert(port, backlog.clone());
        Ok(Box::new(MemListener { fabric: self.inner.clone(), port, backlog }))
    }

    fn connect(&self, addr: SocketAddr, _depths: Depths, _timeout: Duration) -> Result<Box<dyn Nic>, Error> {
        if self.inner.refuse.load(Ordering::Acquire) {
            return Err(Error::Cm(format!("connect to {addr} refused (injected)")));
        }
        let backlog = lock(&self.inner.listeners)
            .get(&addr.port())
            .cloned()
            .ok_or_else(|| Error::Cm(format!("nothing listens at {addr}")))?;
        let link = Arc::new(Link { state: Mutex::new(LinkState::default()), moved: Condvar::new() });
        {
            let mut queue = lock(&backlog.queue);
            if queue.len() >= BACKLOG {
                return Err(Error::Cm(format!("the listener at {addr} has {BACKLOG} requests waiting")));
            }
            queue.push_back(MemNic { link: link.clone(), side: Side::Server as usize });
        }
        backlog.ready.notify_all();
        let mut links = lock(&self.inner.links);
        links.retain(|l| l.strong_count() > 0);
        links.push(Arc::downgrade(&link));
        Ok(Box::new(MemNic { link, side: Side::Client as usize }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Endpoint, Regions};
    use gpupool_proto::rdma::{Config, Event, RdmaError, Role};

    const DEPTHS: Depths = Depths { send: 8, recv: 8 };

    /// A connected pair of raw queue pairs, each with one 4 KiB region the
    /// peer may write and one it may not.
    fn pair(fabric: &MemFabric) -> (Box<dyn Nic>, Box<dyn Nic>, [RemoteRegion; 2]) {
        let mut listener = fabric.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], listener.port()));
        let mut client = fabric.connect(addr, DEPTHS, Duration::from_secs(1)).unwrap();
        let mut server = listener.accept(DEPTHS, Duration::from_secs(1)).unwrap().expect("a request");
        let mut writable = [RemoteRegion { addr: 0, len: 0, rkey: 0 }; 2];
        for (i, nic) in [&mut client, &mut server].into_iter().enumerate() {
            writable[i] = nic.register(4096, true).unwrap().1;
            nic.register(4096, false).unwrap();
        }
        client.start().unwrap();
        assert_eq!(client.poll_cm().unwrap(), None, "not before both accepted");
        server.start().unwrap();
        for nic in [&mut client, &mut server] {
            assert_eq!(nic.poll_cm().unwrap(), Some(CmNotice::Established));
        }
        (client, server, writable)
    }

    fn completions(nic: &mut Box<dyn Nic>) -> Vec<Completion> {
        let mut out = Vec::new();
        nic.poll_completions(&mut out).unwrap();
        out
    }

    fn send(wr_id: u64, region: usize, len: u32, remote: Option<(u64, u32)>) -> SendWr {
        SendWr { wr_id, region, offset: 0, len, remote }
    }

    #[test]
    fn sends_land_in_posted_buffers_and_writes_in_writable_regions() {
        let fabric = MemFabric::new("mem0");
        let (mut c, mut s, writable) = pair(&fabric);
        s.post_recv(1, 0, 100, 200).unwrap();
        c.write(1, 0, b"hello").unwrap();
        c.post_send(send(7, 1, 5, None)).unwrap();
        assert_eq!(completions(&mut c), vec![Completion { wr_id: 7, status: Ok(()), byte_len: 0 }]);
        assert_eq!(completions(&mut s), vec![Completion { wr_id: 1, status: Ok(()), byte_len: 5 }]);
        let mut got = [0; 5];
        s.read(0, 100, &mut got).unwrap();
        assert_eq!(&got, b"hello");
        c.post_send(send(8, 1, 5, Some((writable[1].addr + 10, writable[1].rkey)))).unwrap();
        assert_eq!(completions(&mut c)[0].status, Ok(()));
        s.read(0, 10, &mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn rc_failures_put_both_queue_pairs_in_error() {
        let fabric = MemFabric::new("mem0");
        // A write with an unknown key, or out of bounds: remote access error.
        let (mut c, mut s, writable) = pair(&fabric);
        s.post_recv(1, 0, 0, 64).unwrap();
        c.post_send(send(2, 1, 16, Some((writable[1].addr + 4090, writable[1].rkey)))).unwrap();
        assert_eq!(completions(&mut c)[0].status, Err(WcError::RemoteAccess));
        assert_eq!(completions(&mut s)[0].status, Err(WcError::Flushed), "the posted receive is flushed");
        c.post_send(send(3, 1, 4, None)).unwrap();
        assert_eq!(completions(&mut c)[0].status, Err(WcError::Flushed));
        // A send with no receive posted: receiver not ready.
        let (mut c, _s, _) = pair(&fabric);
        c.post_send(send(4, 1, 4, None)).unwrap();
        assert_eq!(completions(&mut c)[0].status, Err(WcError::ReceiverNotReady));
        // A message larger than the buffer; memory outside a registration.
        let (mut c, mut s, _) = pair(&fabric);
        s.post_recv(1, 0, 0, 8).unwrap();
        c.post_send(send(5, 1, 16, None)).unwrap();
        assert_eq!(completions(&mut s)[0].status, Err(WcError::LocalLength));
        let (mut c, _s, writable) = pair(&fabric);
        c.post_send(SendWr { offset: 4000, ..send(6, 1, 200, Some((writable[1].addr, writable[1].rkey))) }).unwrap();
        assert_eq!(completions(&mut c)[0].status, Err(WcError::LocalProtection));
    }

    #[test]
    fn a_cut_link_and_a_disconnect_reach_the_connection_manager() {
        let fabric = MemFabric::new("mem0");
        let (mut c, mut s, _) = pair(&fabric);
        fabric.links().last().unwrap().cut();
        assert_eq!(c.poll_cm().unwrap(), Some(CmNotice::Disconnected));
        assert_eq!(s.poll_cm().unwrap(), Some(CmNotice::Disconnected));
        let (mut c, mut s, _) = pair(&fabric);
        assert!(fabric.links().last().unwrap().is_up());
        c.disconnect();
        assert_eq!(s.poll_cm().unwrap(), Some(CmNotice::Disconnected));
        assert_eq!(c.poll_cm().unwrap(), None, "the side that disconnected is not told");
        fabric.refuse_connects(true);
        let addr = "127.0.0.1:1".parse().unwrap();
        assert!(fabric.connect(addr, DEPTHS, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn a_hung_peer_times_the_connection_out() {
        let fabric = MemFabric::new("mem0");
        let mut listener = fabric.listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], listener.port()));
        let config = |role| {
            let mut c = Config::new(role, RemoteRegion { addr: 0, len: 1 << 20, rkey: 0 });
            c.idle_timeout = Duration::from_millis(300);
            if role == Role::Server {
                c.slot_size = 4096;
            }
            c
        };
        let regions = Regions { writable: 1 << 20, source: 1 << 20 };
        let server = std::thread::spawn(move || {
            let limit = Duration::from_secs(5);
            let mut ep =
                Endpoint::accept(&mut *listener, config(Role::Server), regions, limit, limit).unwrap().unwrap();
            assert!(matches!(ep.next_event(Instant::now() + limit).unwrap(), Event::Connected { .. }));
            ep
        });
        let mut ep = Endpoint::connect(&fabric, addr, config(Role::Client), regions, Duration::from_secs(5)).unwrap();
        assert!(matches!(ep.next_event(Instant::now() + Duration::from_secs(5)).unwrap(), Event::Connected { .. }));
        let _server = server.join().unwrap();
        fabric.links().last().unwrap().hang(Side::Server);
        let ended = ep.next_event(Instant::now() + Duration::from_secs(5)).unwrap();
        assert!(matches!(ended, Event::Ended(Err(RdmaError::TimedOut { .. }))), "{ended:?}");
    }
}
