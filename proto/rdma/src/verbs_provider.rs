//! The verbs [`Provider`]: rdma_cm ids and queue pairs of [`crate::verbs`]
//! behind the [`Nic`] interface. Polled (no completion channel): an idle
//! wait is a 50 µs sleep.

use crate::Error;
use crate::nic::{CmNotice, Completion, Depths, Listen, Nic, Provider, SendWr, Wake};
use crate::verbs::{Channel, CmEvent, CmId, QueuePair, Wc};
use gpupool_proto::rdma::RemoteRegion;
use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// How long rdma_cm may take to resolve an address or a route.
const RESOLVE_MS: i32 = 2000;

/// The idle wait of a polled queue pair.
const POLL_SLEEP: Duration = Duration::from_micros(50);

/// RDMA devices through libibverbs and librdmacm.
#[derive(Debug, Clone)]
pub struct VerbsProvider {
    device: String,
}

impl VerbsProvider {
    /// The provider when `ibv_get_device_list` finds a device; else why not.
    pub fn probe() -> Result<VerbsProvider, Error> {
        let devices = crate::verbs::device_names()?;
        match devices.first() {
            Some(first) => Ok(VerbsProvider { device: first.clone() }),
            None => Err(Error::NoDevice("ibv_get_device_list found none".into())),
        }
    }
}

fn v4(addr: SocketAddr) -> Result<SocketAddrV4, Error> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => Err(Error::NoDevice(format!("{a}: only IPv4 addresses are supported"))),
    }
}

impl Provider for VerbsProvider {
    fn device(&self) -> String {
        self.device.clone()
    }

    fn listen(&self, addr: SocketAddr) -> Result<Box<dyn Listen>, Error> {
        let channel = Channel::new()?;
        let id = CmId::new(&channel)?;
        id.listen(v4(addr)?, 16)?;
        Ok(Box::new(VerbsListener { id, channel }))
    }

    fn connect(&self, addr: SocketAddr, depths: Depths, timeout: Duration) -> Result<Box<dyn Nic>, Error> {
        let deadline = Instant::now() + timeout;
        let channel = Channel::new()?;
        let id = CmId::new(&channel)?;
        id.resolve_addr(v4(addr)?, RESOLVE_MS)?;
        wait_for(&channel, deadline, "address resolution", |e| matches!(e, CmEvent::AddrResolved))?;
        id.resolve_route(RESOLVE_MS)?;
        wait_for(&channel, deadline, "route resolution", |e| matches!(e, CmEvent::RouteResolved))?;
        let qp = QueuePair::new(id, u32::from(depths.send), u32::from(depths.recv))?;
        Ok(Box::new(VerbsNic { qp, channel, active: true, wcs: Vec::with_capacity(16) }))
    }
}

/// A listening rdma_cm id.
#[derive(Debug)]
struct VerbsListener {
    // Field order is drop order: the id before its channel.
    id: CmId,
    channel: Channel,
}

impl Listen for VerbsListener {
    fn port(&self) -> u16 {
        self.id.port()
    }

    fn accept(&mut self, depths: Depths, timeout: Duration) -> Result<Option<Box<dyn Nic>>, Error> {
        let deadline = Instant::now() + timeout;
        let id = loop {
            match self.channel.poll()? {
                Some(CmEvent::ConnectRequest(id)) => break id,
                Some(other) => return Err(Error::Cm(format!("{other} while waiting for a connect request"))),
                None if Instant::now() >= deadline => return Ok(None),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        let channel = Channel::new()?;
        id.migrate(&channel)?;
        let qp = QueuePair::new(id, u32::from(depths.send), u32::from(depths.recv))?;
        Ok(Some(Box::new(VerbsNic { qp, channel, active: false, wcs: Vec::with_capacity(16) })))
    }
}

/// One queue pair on a device.
#[derive(Debug)]
struct VerbsNic {
    // Field order is drop order: the queue pair (and its id) before the channel.
    qp: QueuePair,
    channel: Channel,
    /// Connects (client) rather than accepts.
    active: bool,
    wcs: Vec<Wc>,
}

impl Nic for VerbsNic {
    fn register(&mut self, len: usize, remote_write: bool) -> Result<(usize, RemoteRegion), Error> {
        let index = self.qp.register(len, remote_write)?;
        let info = self.qp.info(index).ok_or(Error::LocalBounds { region: index, offset: 0, len })?;
        Ok((index, RemoteRegion { addr: info.addr, len: info.len, rkey: info.rkey }))
    }

    fn read(&self, region: usize, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        self.qp.read(region, offset, out)
    }

    fn write(&mut self, region: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.qp.write(region, offset, data)
    }

    fn post_recv(&mut self, wr_id: u64, region: usize, offset: u64, len: u32) -> Result<(), Error> {
        self.qp.post_recv(wr_id, region, offset, len)
    }

    fn post_send(&mut self, wr: SendWr) -> Result<(), Error> {
        self.qp.post_send(wr.wr_id, wr.region, wr.offset, wr.len, wr.remote)
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) -> Result<(), Error> {
        self.wcs.clear();
        self.qp.poll(&mut self.wcs)?;
        out.extend(self.wcs.iter().map(|wc| Completion { wr_id: wc.wr_id, status: wc.status, byte_len: wc.byte_len }));
        Ok(())
    }

    fn poll_cm(&mut self) -> Result<Option<CmNotice>, Error> {
        Ok(self.channel.poll()?.map(|event| match event {
            CmEvent::Established => CmNotice::Established,
            CmEvent::Disconnected => CmNotice::Disconnected,
            other => CmNotice::Failed(other.to_string()),
        }))
    }

    fn start(&mut self) -> Result<(), Error> {
        if self.active { self.qp.id().connect() } else { self.qp.id().accept() }
    }

    fn disconnect(&mut self) {
        self.qp.id().disconnect();
    }

    fn wait(&mut self, max: Duration) {
        std::thread::sleep(max.min(POLL_SLEEP));
    }

    fn waker(&self) -> Wake {
        // Polled: a waiter wakes within POLL_SLEEP anyway.
        Wake::new(|| {})
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
