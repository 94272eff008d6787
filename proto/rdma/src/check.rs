//! The RDMA integration check: a whole session over a real device (a
//! loopback connection on its interface's address) or a plain skip where
//! `ibv_get_device_list` finds none. The integration test and the GPU
//! suite's `gpupool-rdma-check` both run [`run`].

use crate::Error;

/// How the check ended when nothing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The session ran over the device; what it did.
    Passed(String),
    /// Nothing to run on; why.
    Skipped(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Passed(what) => write!(f, "passed: {what}"),
            Outcome::Skipped(why) => write!(f, "skipped: {why}"),
        }
    }
}

/// Environment variable naming the IPv4 address to run on (default: the
/// first IPv4 address of an RDMA device's network interface).
pub const ADDR_ENV: &str = "GPUPOOL_RDMA_ADDR";

/// Runs the check.
pub fn run() -> Result<Outcome, Error> {
    #[cfg(not(feature = "verbs"))]
    return Ok(Outcome::Skipped("no RDMA device (built without the `verbs` feature)".into()));
    #[cfg(feature = "verbs")]
    match crate::devices() {
        Ok(devices) if devices.is_empty() => {
            Ok(Outcome::Skipped("no RDMA device (ibv_get_device_list found none)".into()))
        }
        Ok(devices) => loopback::session(&devices),
        Err(e) => Ok(Outcome::Skipped(format!("no RDMA device ({e})"))),
    }
}

#[cfg(feature = "verbs")]
mod loopback {
    use super::{ADDR_ENV, Outcome};
    use crate::Error;
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

    /// The check over the first device.
    pub(super) fn session(devices: &[String]) -> Result<Outcome, Error> {
        let (device, ip) = address(devices)?;
        let provider = crate::verbs_provider::VerbsProvider::probe()?;
        let done = super::session_over(&provider, SocketAddr::V4(SocketAddrV4::new(ip, 0)))?;
        Ok(Outcome::Passed(format!("{device} at {done}")))
    }

    /// The address to run on: the environment's, or the first IPv4 address
    /// of a device's interface (`/sys/class/infiniband/<dev>/device/net/`).
    fn address(devices: &[String]) -> Result<(String, Ipv4Addr), Error> {
        if let Ok(addr) = std::env::var(ADDR_ENV) {
            let ip = addr.parse().map_err(|_| Error::NoDevice(format!("{ADDR_ENV}={addr} is not an IPv4 address")))?;
            return Ok((devices.join(","), ip));
        }
        for device in devices {
            let Ok(netdevs) = std::fs::read_dir(format!("/sys/class/infiniband/{device}/device/net")) else { continue };
            for netdev in netdevs.flatten() {
                if let Some(ip) = crate::verbs::ipv4_of(&netdev.file_name().to_string_lossy())?.into_iter().next() {
                    return Ok((device.clone(), ip));
                }
            }
        }
        Err(Error::NoDevice(format!("devices {devices:?} have no interface with an IPv4 address; set {ADDR_ENV}")))
    }
}

/// The session of the check over `provider`, its listener on `addr`.
mod session {
    use crate::endpoint::{PEER_WRITABLE, source};
    use crate::{Endpoint, Error, Listen, Provider, Regions};
    use gpupool_proto::rdma::{Config, Event, RdmaError, RemoteRegion, Role};
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    const SESSION: u64 = 7;
    const SECRET: &[u8] = b"gpupool rdma integration check!!";
    const SLOT: u32 = 1 << 20;
    const COPY: usize = 3 << 20;
    const LIMIT: Duration = Duration::from_secs(20);

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(131) + 7) as u8).collect()
    }

    fn config(role: Role) -> Config {
        let mut c = Config::new(role, RemoteRegion { addr: 0, len: 0, rkey: 0 });
        c.session_id = SESSION;
        if role == Role::Server {
            c.slots = 2;
            c.slot_size = SLOT;
            // Filled in by the endpoint; long enough for the slots until then.
            c.region.len = 2 * u64::from(SLOT);
        } else {
            c.secret = SECRET.to_vec();
            c.region.len = COPY as u64;
        }
        c
    }

    fn expect(endpoint: &mut Endpoint, what: &'static str) -> Result<Event, Error> {
        match endpoint.next_event(Instant::now() + LIMIT) {
            Ok(Event::Ended(Err(e))) => Err(e.into()),
            Ok(event) => Ok(event),
            Err(Error::Timeout(_)) => Err(Error::Timeout(what)),
            Err(e) => Err(e),
        }
    }

    fn violation(what: String) -> Error {
        Error::Rdma(RdmaError::Violation(what))
    }

    fn server(mut listener: Box<dyn Listen>) -> Result<(), Error> {
        let regions = Regions { writable: 2 * SLOT as usize, source: COPY };
        let accepted = Endpoint::accept(&mut *listener, config(Role::Server), regions, LIMIT, LIMIT)?;
        let mut ep = accepted.ok_or(Error::Timeout("a connect request"))?;
        ep.write(crate::endpoint::SOURCE, 0, &pattern(COPY))?;
        let expected = pattern(COPY);
        let mut uploaded = 0usize;
        loop {
            let now = Instant::now();
            match expect(&mut ep, "the client")? {
                Event::Connected { secret, .. } if secret == SECRET => {}
                Event::Connected { .. } => return Err(violation("wrong secret".into())),
                Event::Frame(f) => ep.conn().send_frame(&[b"reply to ", &f[..]].concat(), now)?,
                Event::PutChunk { offset, len, slot, .. } => {
                    let mut chunk = vec![0; len as usize];
                    ep.read(PEER_WRITABLE, u64::from(slot) * u64::from(SLOT), &mut chunk)?;
                    if chunk[..] != expected[offset as usize..offset as usize + chunk.len()] {
                        return Err(violation(format!("upload chunk at {offset} differs")));
                    }
                    uploaded += chunk.len();
                    ep.conn().release_slot(slot, 0, now)?;
                }
                Event::GetRequest(t) => ep.conn().answer_get(t, source(t.offset, t.len), now)?,
                Event::Ended(Ok(_)) if uploaded == COPY => return Ok(()),
                other => return Err(violation(format!("server: unexpected {other:?}"))),
            }
        }
    }

    /// Runs the session; what it did, for the check's line.
    pub(crate) fn run(provider: &dyn Provider, at: SocketAddr) -> Result<String, Error> {
        let listener = provider.listen(at)?;
        let addr = SocketAddr::new(at.ip(), listener.port());
        let server = std::thread::spawn(move || server(listener));
        let started = Instant::now();
        let regions = Regions { writable: COPY, source: COPY };
        let mut ep = Endpoint::connect(provider, addr, config(Role::Client), regions, LIMIT)?;
        ep.write(crate::endpoint::SOURCE, 0, &pattern(COPY))?;
        if !matches!(expect(&mut ep, "the Hello")?, Event::Connected { session_id: SESSION, .. }) {
            return Err(violation("no Connected first".into()));
        }
        ep.conn().send_frame(b"batch", Instant::now())?;
        let reply = expect(&mut ep, "the reply")?;
        if reply != Event::Frame(b"reply to batch".to_vec()) {
            return Err(violation(format!("client: {reply:?} for the reply")));
        }
        let t = Instant::now();
        ep.conn().put(1, source(0, COPY as u32), t)?;
        if expect(&mut ep, "the upload")? != (Event::PutWritten { id: 1 }) {
            return Err(violation("client: no PutWritten".into()));
        }
        if expect(&mut ep, "the upload's verdict")? != (Event::PutDone { id: 1 }) {
            return Err(violation("client: no PutDone".into()));
        }
        let up = t.elapsed();
        let t = Instant::now();
        ep.conn().get(2, 0, COPY as u64, 0, t)?;
        if expect(&mut ep, "the download")? != (Event::GetDone { id: 2 }) {
            return Err(violation("client: no GetDone".into()));
        }
        let down = t.elapsed();
        let mut landed = vec![0; COPY];
        ep.read(PEER_WRITABLE, 0, &mut landed)?;
        if landed != pattern(COPY) {
            return Err(violation("downloaded bytes differ".into()));
        }
        ep.conn().close(0, Instant::now());
        let _ = ep.next_event(Instant::now() + LIMIT);
        server.join().map_err(|_| violation("the server thread panicked".into()))??;
        Ok(format!(
            "{addr}: handshake, a frame each way, {COPY} bytes up in {up:?} and down in {down:?}, close; {:?} in all",
            started.elapsed()
        ))
    }
}

/// The check's session over any provider (the in-memory fabric in the
/// tests, a device in [`run`]): what it did, or what failed.
pub fn session_over(provider: &dyn crate::Provider, at: std::net::SocketAddr) -> Result<String, Error> {
    session::run(provider, at)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_check_passes_over_the_in_memory_fabric() {
        let fabric = crate::mem::MemFabric::new("mem0");
        let done = super::session_over(&fabric, "127.0.0.1:0".parse().unwrap()).expect("the check's session");
        assert!(done.contains("bytes up"), "{done}");
    }
}
