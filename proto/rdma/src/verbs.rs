//! The only `unsafe` of the RDMA transport: thin owners of librdmacm and
//! libibverbs objects (rdma-sys), each freed in `Drop`, with safe methods
//! that check their arguments before any call. Registered memory is never
//! seen as a Rust reference (the NIC writes it behind the compiler's back):
//! it is read and written only by copies through raw pointers.
#![allow(unsafe_code)]

use crate::Error;
use gpupool_proto::rdma::WcError;
use rdma_sys::*;
use std::ffi::CStr;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ptr::{self, NonNull};

/// `errno` of the last failed call, as a typed error.
fn os_error(call: &'static str) -> Error {
    Error::Verbs { call, source: std::io::Error::last_os_error() }
}

/// Checks a C return code (0 is success, -1 sets errno).
fn check(call: &'static str, rc: i32) -> Result<(), Error> {
    if rc == 0 { Ok(()) } else { Err(os_error(call)) }
}

/// Names of the RDMA devices `ibv_get_device_list` finds.
pub(crate) fn device_names() -> Result<Vec<String>, Error> {
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(os_error("ibv_get_device_list"));
    }
    let mut names = Vec::new();
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: the list holds `n` valid device pointers.
        let name = unsafe { ibv_get_device_name(*list.add(i)) };
        if !name.is_null() {
            // SAFETY: a NUL-terminated name owned by the device list, copied before the free.
            names.push(unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned());
        }
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(names)
}

/// The IPv4 addresses of network interface `netdev` (getifaddrs).
pub(crate) fn ipv4_of(netdev: &str) -> Result<Vec<Ipv4Addr>, Error> {
    let mut head: *mut libc::ifaddrs = ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; the list is freed below.
    check("getifaddrs", unsafe { libc::getifaddrs(&mut head) })?;
    let mut found = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
        // SAFETY: ifa_addr is null or a sockaddr whose family says its type.
        if name.to_bytes() == netdev.as_bytes()
            && !ifa.ifa_addr.is_null()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
            found.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// An rdma_cm event channel, non-blocking.
#[derive(Debug)]
pub(crate) struct Channel(NonNull<rdma_event_channel>);

/// What a connection-manager event said.
#[derive(Debug)]
pub(crate) enum CmEvent {
    AddrResolved,
    RouteResolved,
    /// A client's request, with its new id (events on the listener's channel
    /// until migrated).
    ConnectRequest(CmId),
    Established,
    Disconnected,
    /// Any error or other event: its name and status.
    Other {
        name: String,
        status: i32,
    },
}

impl std::fmt::Display for CmEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CmEvent::Other { name, status } => write!(f, "{name} (status {status})"),
            other => write!(f, "{other:?}"),
        }
    }
}

impl Channel {
    pub(crate) fn new() -> Result<Channel, Error> {
        // SAFETY: no arguments; null means failure.
        let ch = NonNull::new(unsafe { rdma_create_event_channel() })
            .ok_or_else(|| os_error("rdma_create_event_channel"))?;
        let channel = Channel(ch);
        // SAFETY: `fd` is the open descriptor of the live channel.
        let fd = unsafe { ch.as_ref().fd };
        // SAFETY: fcntl on an open descriptor with integer flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(os_error("fcntl(O_NONBLOCK)"));
        }
        Ok(channel)
    }

    /// The next event, if one is there.
    pub(crate) fn poll(&self) -> Result<Option<CmEvent>, Error> {
        let mut event: *mut rdma_cm_event = ptr::null_mut();
        // SAFETY: a live channel and a valid out-pointer.
        if unsafe { rdma_get_cm_event(self.0.as_ptr(), &mut event) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(Error::Verbs { call: "rdma_get_cm_event", source: err });
        }
        // SAFETY: rdma_get_cm_event succeeded: `event` is valid until acked.
        let (kind, status, id) = unsafe { ((*event).event, (*event).status, (*event).id) };
        let out = match kind {
            rdma_cm_event_type::RDMA_CM_EVENT_ADDR_RESOLVED => CmEvent::AddrResolved,
            rdma_cm_event_type::RDMA_CM_EVENT_ROUTE_RESOLVED => CmEvent::RouteResolved,
            rdma_cm_event_type::RDMA_CM_EVENT_CONNECT_REQUEST => match NonNull::new(id) {
                Some(id) => CmEvent::ConnectRequest(CmId { id, qp: false }),
                None => CmEvent::Other { name: "connect request without an id".into(), status },
            },
            rdma_cm_event_type::RDMA_CM_EVENT_ESTABLISHED => CmEvent::Established,
            rdma_cm_event_type::RDMA_CM_EVENT_DISCONNECTED => CmEvent::Disconnected,
            other => {
                // SAFETY: rdma_event_str returns a static string for any value.
                let name = unsafe { CStr::from_ptr(rdma_event_str(other)) }.to_string_lossy().into_owned();
                CmEvent::Other { name, status }
            }
        };
        // SAFETY: acked once; the request's new id stays ours (acking does not free it).
        check("rdma_ack_cm_event", unsafe { rdma_ack_cm_event(event) })?;
        Ok(Some(out))
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        // SAFETY: every id on the channel was destroyed before (owners drop first).
        unsafe { rdma_destroy_event_channel(self.0.as_ptr()) };
    }
}

/// An rdma_cm id, destroyed (with its queue pair) on drop.
#[derive(Debug)]
pub(crate) struct CmId {
    id: NonNull<rdma_cm_id>,
    qp: bool,
}

// SAFETY: an id is used by one owner at a time; librdmacm ids are not tied to a thread.
unsafe impl Send for CmId {}
// SAFETY: as for CmId: the channel's descriptor may be used from any thread.
unsafe impl Send for Channel {}

impl CmId {
    /// A reliable-connected (TCP port space) id on `channel`.
    pub(crate) fn new(channel: &Channel) -> Result<CmId, Error> {
        let mut id = ptr::null_mut();
        // SAFETY: a live channel and a valid out-pointer.
        check("rdma_create_id", unsafe {
            rdma_create_id(channel.0.as_ptr(), &mut id, ptr::null_mut(), rdma_port_space::RDMA_PS_TCP)
        })?;
        let id = NonNull::new(id).ok_or_else(|| os_error("rdma_create_id"))?;
        Ok(CmId { id, qp: false })
    }

    /// Binds to `addr` and listens.
    pub(crate) fn listen(&self, addr: SocketAddrV4, backlog: i32) -> Result<(), Error> {
        let mut sin = sockaddr_in(addr);
        // SAFETY: a live id and a sockaddr_in that outlives the call.
        check("rdma_bind_addr", unsafe { rdma_bind_addr(self.id.as_ptr(), (&raw mut sin).cast()) })?;
        // SAFETY: a bound id.
        check("rdma_listen", unsafe { rdma_listen(self.id.as_ptr(), backlog) })
    }

    /// The local port (after a bind).
    pub(crate) fn port(&self) -> u16 {
        // SAFETY: a live id; the port comes back in network order.
        u16::from_be(unsafe { rdma_get_src_port(self.id.as_ptr()) })
    }

    pub(crate) fn resolve_addr(&self, dst: SocketAddrV4, timeout_ms: i32) -> Result<(), Error> {
        let mut sin = sockaddr_in(dst);
        // SAFETY: a live id, no source address, a destination that outlives the call.
        check("rdma_resolve_addr", unsafe {
            rdma_resolve_addr(self.id.as_ptr(), ptr::null_mut(), (&raw mut sin).cast(), timeout_ms)
        })
    }

    pub(crate) fn resolve_route(&self, timeout_ms: i32) -> Result<(), Error> {
        // SAFETY: an id whose address was resolved.
        check("rdma_resolve_route", unsafe { rdma_resolve_route(self.id.as_ptr(), timeout_ms) })
    }

    /// Moves the id's events to `channel` (an accepted id leaves the listener's).
    pub(crate) fn migrate(&self, channel: &Channel) -> Result<(), Error> {
        // SAFETY: a live id and channel.
        check("rdma_migrate_id", unsafe { rdma_migrate_id(self.id.as_ptr(), channel.0.as_ptr()) })
    }

    fn conn_param() -> rdma_conn_param {
        rdma_conn_param {
            private_data: ptr::null(),
            private_data_len: 0,
            responder_resources: 1,
            initiator_depth: 1,
            flow_control: 0,
            // 7: the most retries; 7 receiver-not-ready retries means "forever",
            // but credits keep a well-behaved peer from ever needing them.
            retry_count: 7,
            rnr_retry_count: 7,
            srq: 0,
            qp_num: 0,
        }
    }

    pub(crate) fn connect(&self) -> Result<(), Error> {
        let mut param = Self::conn_param();
        // SAFETY: an id with a route and a queue pair; `param` outlives the call.
        check("rdma_connect", unsafe { rdma_connect(self.id.as_ptr(), &mut param) })
    }

    pub(crate) fn accept(&self) -> Result<(), Error> {
        let mut param = Self::conn_param();
        // SAFETY: a connect request's id with a queue pair; `param` outlives the call.
        check("rdma_accept", unsafe { rdma_accept(self.id.as_ptr(), &mut param) })
    }

    pub(crate) fn disconnect(&self) {
        // SAFETY: a live id; an error (not connected) leaves nothing to do.
        unsafe { rdma_disconnect(self.id.as_ptr()) };
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the queue pair (when created) and the id are destroyed once, the
        // queue pair first; its completion queue and domain are freed by their owner after.
        unsafe {
            if self.qp {
                rdma_destroy_qp(self.id.as_ptr());
            }
            rdma_destroy_id(self.id.as_ptr());
        }
    }
}

/// Page-aligned memory registered with the protection domain.
#[derive(Debug)]
struct Registered {
    ptr: NonNull<u8>,
    layout: std::alloc::Layout,
    mr: NonNull<ibv_mr>,
}

/// A completion, as the core wants it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wc {
    pub(crate) wr_id: u64,
    pub(crate) status: Result<(), WcError>,
    pub(crate) byte_len: u32,
}

fn wc_error(status: u32) -> WcError {
    match status {
        ibv_wc_status::IBV_WC_LOC_LEN_ERR => WcError::LocalLength,
        ibv_wc_status::IBV_WC_LOC_PROT_ERR => WcError::LocalProtection,
        ibv_wc_status::IBV_WC_WR_FLUSH_ERR => WcError::Flushed,
        ibv_wc_status::IBV_WC_REM_ACCESS_ERR => WcError::RemoteAccess,
        ibv_wc_status::IBV_WC_REM_OP_ERR => WcError::RemoteOperation,
        ibv_wc_status::IBV_WC_RETRY_EXC_ERR => WcError::RetryExceeded,
        ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => WcError::ReceiverNotReady,
        other => WcError::Other(other),
    }
}

/// A reliable-connected queue pair on a connected (or connecting) id, with
/// its protection domain, one completion queue and registered regions.
/// Field order is drop order: regions, then the id (and its queue pair),
/// then the completion queue and the domain in `Drop`.
#[derive(Debug)]
pub(crate) struct QueuePair {
    regions: Vec<Registered>,
    id: Option<CmId>,
    cq: NonNull<ibv_cq>,
    pd: NonNull<ibv_pd>,
}

// SAFETY: the queue pair and its resources are used by one owner at a time.
unsafe impl Send for QueuePair {}

/// A region's address, length and keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RegionInfo {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) lkey: u32,
    pub(crate) rkey: u32,
}

impl QueuePair {
    /// Creates the domain, completion queue and queue pair on `id`, whose
    /// address is resolved (client) or which came with a connect request.
    pub(crate) fn new(mut id: CmId, send_depth: u32, recv_depth: u32) -> Result<QueuePair, Error> {
        // SAFETY: a resolved id has its device context (null otherwise, checked).
        let verbs = unsafe { id.id.as_ref().verbs };
        if verbs.is_null() {
            return Err(Error::NoDevice("the connection manager bound no device to the address".into()));
        }
        // SAFETY: a live device context.
        let pd = NonNull::new(unsafe { ibv_alloc_pd(verbs) }).ok_or_else(|| os_error("ibv_alloc_pd"))?;
        let cqe = i32::try_from(send_depth + recv_depth).unwrap_or(i32::MAX);
        // SAFETY: a live context; no completion channel (polled), vector 0.
        let cq = match NonNull::new(unsafe { ibv_create_cq(verbs, cqe, ptr::null_mut(), ptr::null_mut(), 0) }) {
            Some(cq) => cq,
            None => {
                let err = os_error("ibv_create_cq");
                // SAFETY: the domain was just allocated and holds nothing.
                unsafe { ibv_dealloc_pd(pd.as_ptr()) };
                return Err(err);
            }
        };
        let mut qp = QueuePair { regions: Vec::new(), id: None, cq, pd };
        // SAFETY: a zeroed init attribute is valid C; the fields that matter are set.
        let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.as_ptr();
        attr.recv_cq = cq.as_ptr();
        attr.cap = ibv_qp_cap {
            max_send_wr: send_depth,
            max_recv_wr: recv_depth,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 0,
        };
        attr.qp_type = ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        // SAFETY: a live id, domain and attribute; on success the id owns the queue pair.
        check("rdma_create_qp", unsafe { rdma_create_qp(id.id.as_ptr(), pd.as_ptr(), &mut attr) })?;
        id.qp = true;
        qp.id = Some(id);
        Ok(qp)
    }

    pub(crate) fn id(&self) -> &CmId {
        self.id.as_ref().expect("set in new")
    }

    /// Registers `len` zeroed bytes; `remote_write` lets the peer RDMA WRITE them.
    pub(crate) fn register(&mut self, len: usize, remote_write: bool) -> Result<usize, Error> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).map_err(|_| Error::TooLarge(len as u64))?;
        // SAFETY: a layout of non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).ok_or(Error::TooLarge(len as u64))?;
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        // SAFETY: a live domain and `len` bytes that stay allocated until deregistered.
        let mr = unsafe { ibv_reg_mr(self.pd.as_ptr(), ptr.as_ptr().cast(), len, access.0 as i32) };
        let Some(mr) = NonNull::new(mr) else {
            let err = os_error("ibv_reg_mr");
            // SAFETY: allocated above with this layout, never registered.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
            return Err(err);
        };
        self.regions.push(Registered { ptr, layout, mr });
        Ok(self.regions.len() - 1)
    }

    pub(crate) fn info(&self, region: usize) -> Option<RegionInfo> {
        let r = self.regions.get(region)?;
        // SAFETY: a live registration.
        let mr = unsafe { r.mr.as_ref() };
        Some(RegionInfo { addr: r.ptr.as_ptr() as u64, len: mr.length as u64, lkey: mr.lkey, rkey: mr.rkey })
    }

    /// The region's bounds check: its base pointer when `offset..offset+len` fits.
    fn span(&self, region: usize, offset: u64, len: usize) -> Result<(*mut u8, RegionInfo), Error> {
        let info = self.info(region).ok_or(Error::LocalBounds { region, offset, len })?;
        let end = offset.checked_add(len as u64).ok_or(Error::LocalBounds { region, offset, len })?;
        if end > info.len {
            return Err(Error::LocalBounds { region, offset, len });
        }
        // SAFETY: offset is within the allocation (checked above).
        Ok((unsafe { self.regions[region].ptr.as_ptr().add(offset as usize) }, info))
    }

    /// Copies `out.len()` bytes of a region out.
    pub(crate) fn read(&self, region: usize, offset: u64, out: &mut [u8]) -> Result<(), Error> {
        let (src, _) = self.span(region, offset, out.len())?;
        // SAFETY: in bounds (span); `out` is a distinct Rust buffer.
        unsafe { ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into a region.
    pub(crate) fn write(&mut self, region: usize, offset: u64, data: &[u8]) -> Result<(), Error> {
        let (dst, _) = self.span(region, offset, data.len())?;
        // SAFETY: in bounds (span); `data` is a distinct Rust buffer.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    fn sge(&self, region: usize, offset: u64, len: u32) -> Result<ibv_sge, Error> {
        let (addr, info) = self.span(region, offset, len as usize)?;
        Ok(ibv_sge { addr: addr as u64, length: len, lkey: info.lkey })
    }

    pub(crate) fn post_recv(&mut self, wr_id: u64, region: usize, offset: u64, len: u32) -> Result<(), Error> {
        let mut sge = self.sge(region, offset, len)?;
        let mut wr = ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad = ptr::null_mut();
        // SAFETY: a live queue pair; `wr` and `sge` outlive the call (the provider copies them).
        check("ibv_post_recv", unsafe { ibv_post_recv(self.qp_ptr(), &mut wr, &mut bad) })
    }

    /// A signaled SEND, or an RDMA WRITE to `remote` (address, rkey).
    pub(crate) fn post_send(
        &mut self,
        wr_id: u64,
        region: usize,
        offset: u64,
        len: u32,
        remote: Option<(u64, u32)>,
    ) -> Result<(), Error> {
        let mut sge = self.sge(region, offset, len)?;
        // SAFETY: a zeroed send request is valid C; the fields that matter are set.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        match remote {
            None => wr.opcode = ibv_wr_opcode::IBV_WR_SEND,
            Some((remote_addr, rkey)) => {
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = rdma_t { remote_addr, rkey };
            }
        }
        let mut bad = ptr::null_mut();
        // SAFETY: a live queue pair; `wr` and `sge` outlive the call (the provider copies them).
        check("ibv_post_send", unsafe { ibv_post_send(self.qp_ptr(), &mut wr, &mut bad) })
    }

    /// Takes up to `out.capacity()` completions.
    pub(crate) fn poll(&mut self, out: &mut Vec<Wc>) -> Result<(), Error> {
        const BATCH: usize = 16;
        // SAFETY: ibv_wc is plain C data; zeroed is valid.
        let mut wcs: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: a live completion queue and room for BATCH entries.
        let n = unsafe { ibv_poll_cq(self.cq.as_ptr(), BATCH as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(Error::Verbs { call: "ibv_poll_cq", source: std::io::Error::from_raw_os_error(-n) });
        }
        out.extend(wcs[..n as usize].iter().map(|wc| Wc {
            wr_id: wc.wr_id,
            status: if wc.status == ibv_wc_status::IBV_WC_SUCCESS { Ok(()) } else { Err(wc_error(wc.status)) },
            byte_len: wc.byte_len,
        }));
        Ok(())
    }

    fn qp_ptr(&self) -> *mut ibv_qp {
        // SAFETY: the id is live and has its queue pair (created in new).
        unsafe { self.id().id.as_ref().qp }
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        for r in self.regions.drain(..) {
            // SAFETY: each registration and allocation is released once, the
            // registration first, while the domain is alive.
            unsafe {
                ibv_dereg_mr(r.mr.as_ptr());
                std::alloc::dealloc(r.ptr.as_ptr(), r.layout);
            }
        }
        // The queue pair and id go before the completion queue and domain they use.
        self.id = None;
        // SAFETY: nothing uses the completion queue or domain any more.
        unsafe {
            ibv_destroy_cq(self.cq.as_ptr());
            ibv_dealloc_pd(self.pd.as_ptr());
        }
    }
}
