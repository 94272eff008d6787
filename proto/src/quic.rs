//! QUIC endpoint setup shared by the client and the server: UDP socket
//! buffers and datagram sizes.
//!
//! Two facts drive the defaults (measured, see `bench/results/`):
//! - the kernel's default UDP receive buffer (~208 KiB) overflows during bulk
//!   copies; every drop is a congestion event, and the window then caps a
//!   copy at ~0.25 GiB/s even on loopback;
//! - quinn advertises 1472-byte datagrams unless told otherwise, so MTU
//!   discovery would never find a jumbo-frame network's or loopback's larger
//!   path; the ceiling is a setting on both ends (largest on the server and
//!   for bulk connections to a loopback server, Ethernet's elsewhere).

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The largest UDP payload QUIC can use (65 535 minus the UDP and IPv6
/// headers' share quinn reserves).
pub const MAX_UDP_PAYLOAD: u16 = 65_527;

/// The default datagram ceiling of a client's session connection:
/// Ethernet's 1500-byte MTU less the IP and UDP headers.
pub const DEFAULT_UDP_PAYLOAD: u16 = 1472;

/// The default datagram ceiling of a server, and of a client's bulk
/// connections to a server on a loopback address: what a peer may send is
/// the smaller of its own ceiling and this end's, so a server may accept the
/// largest; MTU discovery then finds what the path carries (65 495 on Linux
/// loopback, where a bulk copy costs ~45x fewer packets, each one
/// encrypted, tracked and acknowledged on its own).
pub const LOOPBACK_UDP_PAYLOAD: u16 = MAX_UDP_PAYLOAD;

/// The datagram ceiling of a client's bulk connections to `server` when its
/// session connection's is `configured`: the largest on loopback unless
/// `configured` is below Ethernet's (a deliberate small setting, such as
/// Lambda's 1200). The session connection keeps `configured`: with large
/// datagrams there, a server's refusal (close with a reason) was often seen
/// by the client as a stateless reset instead, losing the reason (the e2e
/// refusal tests, 10 failures in 12 runs); not yet understood.
pub fn bulk_udp_payload(server: std::net::IpAddr, configured: u16) -> u16 {
    if server.is_loopback() && configured >= DEFAULT_UDP_PAYLOAD { LOOPBACK_UDP_PAYLOAD } else { configured }
}

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

/// Socket send and receive buffer asked for. The kernel caps it at
/// `net.core.{r,w}mem_max` (208 KiB on many hosts), unless the process may
/// override the cap (Linux: `CAP_NET_ADMIN`, as root in a container), which
/// [`bind_udp`] then does: a capped receive buffer overflows while a bulk
/// copy's window is in flight, and each drop is a congestion event.
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
    force_buffers(&socket);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Where the kernel granted less than [`SOCKET_BUFFER_BYTES`] (its
/// `rmem_max`/`wmem_max` cap), asks again with `SO_RCVBUFFORCE` /
/// `SO_SNDBUFFORCE`, which privileged processes may use; refused is not an
/// error (the caller logs the sizes it got).
#[cfg(target_os = "linux")]
fn force_buffers(socket: &Socket) {
    // The kernel reports twice the size set (its bookkeeping share).
    if socket.recv_buffer_size().unwrap_or(0) < 2 * SOCKET_BUFFER_BYTES {
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(socket, SOCKET_BUFFER_BYTES);
    }
    if socket.send_buffer_size().unwrap_or(0) < 2 * SOCKET_BUFFER_BYTES {
        let _ = rustix::net::sockopt::set_socket_send_buffer_size_force(socket, SOCKET_BUFFER_BYTES);
    }
}

#[cfg(not(target_os = "linux"))]
fn force_buffers(_socket: &Socket) {}

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
    let socket = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(GsoBounded { inner: socket });
    quinn::Endpoint::new_with_abstract_socket(endpoint_config(max_udp_payload), server, socket, runtime)
}

/// The most bytes one segmentation-offload send may carry: one UDP
/// datagram's length field (65 535) less the IPv4 and UDP headers.
const MAX_GSO_BYTES: usize = 65_507;

/// The runtime's UDP socket, whose batches are split to fit one send.
///
/// quinn batches up to 10 datagrams per send (segmentation offload)
/// whatever their size; above 6 550 bytes ten exceed what one UDP send may
/// carry, the kernel refuses the whole batch with `EMSGSIZE`, and quinn,
/// which takes that for a failed MTU probe, ignores it: each such batch is
/// lost, black-hole detection drops the path to 1 200 bytes, and a larger
/// datagram ceiling measured slower than the default (see
/// `bench/results/*-datagrams.md`). Sent here as several batches instead.
#[derive(Debug)]
struct GsoBounded {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
}

/// How many bytes of a batch of `segment`-byte datagrams one send carries:
/// whole datagrams, at least one.
fn batch_bytes(segment: usize) -> usize {
    (MAX_GSO_BYTES / segment.max(1)).max(1) * segment.max(1)
}

impl quinn::AsyncUdpSocket for GsoBounded {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> io::Result<()> {
        let Some(segment) = transmit.segment_size.filter(|_| transmit.contents.len() > MAX_GSO_BYTES) else {
            return self.inner.try_send(transmit);
        };
        // A part sent before a later one would block goes again with the
        // retried batch: the peer drops the duplicate packets.
        for part in transmit.contents.chunks(batch_bytes(segment)) {
            let segment_size = (part.len() > segment).then_some(segment);
            self.inner.try_send(&quinn::udp::Transmit { contents: part, segment_size, ..*transmit })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
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

    #[test]
    fn split_batches_fit_one_udp_send() {
        for segment in [1200, 1472, 6552, 9000, 16_384, 65_495, usize::from(MAX_UDP_PAYLOAD)] {
            let bytes = batch_bytes(segment);
            assert_eq!(bytes % segment, 0, "whole datagrams");
            assert!(bytes <= MAX_GSO_BYTES || bytes == segment, "{segment}: {bytes}");
        }
        assert!(batch_bytes(1472) >= 10 * 1472, "quinn's own bound stays the limit at Ethernet sizes");
    }
}
