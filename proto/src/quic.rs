//! QUIC endpoint setup shared by the client and the server: UDP socket
//! buffers and datagram sizes.
//!
//! Two facts drive the defaults (measured, see `bench/results/`):
//! - the kernel's default UDP receive buffer (~208 KiB) overflows during bulk
//!   copies; every drop is a congestion event, and the window then caps a
//!   copy at ~0.25 GiB/s even on loopback;
//! - quinn advertises 1472-byte datagrams unless told otherwise, so MTU
//!   discovery would never find a jumbo-frame network's larger path; the
//!   ceiling is a setting on both ends.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, UdpSocket};

/// The largest UDP payload QUIC can use (65 535 minus the UDP and IPv6
/// headers' share quinn reserves).
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

/// The default datagram ceiling: Ethernet's 1500-byte MTU less the IP and UDP
/// headers. Larger ceilings measured no faster on loopback (large datagrams
/// lost to a full receive buffer read as a black hole and drop the path to
/// 1200 bytes), so they are opt-in (`max_udp_payload`).
pub const DEFAULT_UDP_PAYLOAD: u16 = 1472;

/// How long a thread that waits for the other side (the client for a reply,
/// a session thread for its next batch) polls before it sleeps, by default,
/// where the process may use at least [`SPIN_MIN_CPUS`] CPUs: a sleeping
/// thread woken by the I/O thread costs tens of microseconds on an idle
/// (virtual) CPU (bench/results/*-spin.md: on the H200 the sync round trip
/// went from ~100 to ~90 µs and its p99 from ~300 to ~170 µs with both).
pub const DEFAULT_SPIN_US: u64 = 100;
/// Below this many CPUs a spinning thread takes the CPU the I/O thread needs
/// (measured worse on a 2-core machine): no spinning by default.
pub const SPIN_MIN_CPUS: usize = 4;

/// [`DEFAULT_SPIN_US`] where this process has [`SPIN_MIN_CPUS`] CPUs or
/// more, else zero.
pub fn default_spin() -> std::time::Duration {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    std::time::Duration::from_micros(if cpus >= SPIN_MIN_CPUS { DEFAULT_SPIN_US } else { 0 })
}

/// Socket send and receive buffer asked for; the kernel caps it at
/// `net.core.{r,w}mem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 16 << 20;

/// An endpoint configuration that accepts datagrams up to `max_udp_payload`.
pub fn endpoint_config(max_udp_payload: u16) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    // Cannot fail: the value is clamped into quinn's accepted range.
    let _ = config.max_udp_payload_size(max_udp_payload.clamp(1200, MAX_UDP_PAYLOAD));
    config
}

/// MTU discovery up to `max_udp_payload`, or none when that is QUIC's
/// minimum (Lambda's 1200-byte limit).
pub fn mtu_discovery(max_udp_payload: u16) -> Option<quinn::MtuDiscoveryConfig> {
    if max_udp_payload <= 1200 {
        return None;
    }
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload.min(MAX_UDP_PAYLOAD));
    Some(mtu)
}

/// A UDP socket bound to `addr` with large send and receive buffers. A
/// kernel that grants less than asked is not an error; the sizes granted are
/// logged by the caller through [`buffer_sizes`].
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The (receive, send) buffer sizes the kernel granted `socket`.
pub fn buffer_sizes(socket: &UdpSocket) -> (usize, usize) {
    let s = socket2::SockRef::from(socket);
    (s.recv_buffer_size().unwrap_or(0), s.send_buffer_size().unwrap_or(0))
}

/// A quinn endpoint on `socket` (server when `server` is given).
pub fn endpoint(
    socket: UdpSocket,
    max_udp_payload: u16,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("no async runtime for the QUIC endpoint (must run inside tokio)"))?;
    quinn::Endpoint::new(endpoint_config(max_udp_payload), server, socket, runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_with_buffers_and_clamps_payload() {
        let socket = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let (rx, tx) = buffer_sizes(&socket);
        // Whatever the cap, at least the kernel default is there.
        assert!(rx >= 64 << 10 && tx >= 64 << 10, "rx {rx} tx {tx}");
        assert!(mtu_discovery(1200).is_none());
        assert!(mtu_discovery(9000).is_some());
        let _ = endpoint_config(u16::MAX);
    }
}
