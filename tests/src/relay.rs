//! A UDP relay between one client and a server, for network faults in
//! tests: it forwards datagrams both ways unless paused (every datagram
//! dropped, a partition) and, with [`Faults`], drops, duplicates and
//! reorders them at random (seeded, so a failure can be repeated).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the relay does to each datagram, by probability (0.0 to 1.0).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Dropped.
    pub loss: f64,
    /// Sent twice.
    pub duplicate: f64,
    /// Held back and sent after the next datagram.
    pub reorder: f64,
    pub seed: u64,
}

/// How many datagrams the relay dropped, duplicated and reordered.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub forwarded: std::sync::atomic::AtomicU64,
    pub dropped: std::sync::atomic::AtomicU64,
    pub duplicated: std::sync::atomic::AtomicU64,
    pub reordered: std::sync::atomic::AtomicU64,
}

/// Forwards datagrams between one client and a server.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    pub counts: Arc<FaultCounts>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// One direction's fault state: a small xorshift generator and the
/// datagram held back for reordering.
#[derive(Debug)]
struct Pipe {
    faults: Faults,
    state: u64,
    held: Option<Vec<u8>>,
    counts: Arc<FaultCounts>,
}

impl Pipe {
    fn new(faults: Faults, salt: u64, counts: Arc<FaultCounts>) -> Self {
        Self { faults, state: faults.seed ^ salt ^ 0x9e37_79b9_7f4a_7c15 | 1, held: None, counts }
    }

    fn chance(&mut self, p: f64) -> bool {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let unit = (self.state >> 11) as f64 / (1u64 << 53) as f64;
        p > 0.0 && unit < p
    }

    /// The datagrams to send now for `datagram`, in order.
    fn pass(&mut self, datagram: &[u8]) -> Vec<Vec<u8>> {
        let c = self.counts.clone();
        if self.chance(self.faults.loss) {
            c.dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        if self.held.is_none() && self.chance(self.faults.reorder) {
            c.reordered.fetch_add(1, Ordering::Relaxed);
            self.held = Some(datagram.to_vec());
            return Vec::new();
        }
        let mut out = vec![datagram.to_vec()];
        if self.chance(self.faults.duplicate) {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            out.push(datagram.to_vec());
        }
        out.extend(self.held.take());
        c.forwarded.fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }
}

impl Relay {
    /// A relay that forwards everything.
    pub fn start(server: SocketAddr) -> Self {
        Self::with_faults(server, Faults::default())
    }

    pub fn with_faults(server: SocketAddr, faults: Faults) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind relay");
        Self::bridge(front, server, faults, Arc::default(), Arc::default())
    }

    /// Forwards between the client that sends to `front` and `server`,
    /// with a pause switch and counts shared with other relays.
    fn bridge(
        front: UdpSocket,
        server: SocketAddr,
        faults: Faults,
        paused: Arc<AtomicBool>,
        counts: Arc<FaultCounts>,
    ) -> Self {
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind relay upstream");
        back.connect(server).expect("connect upstream");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
        }
        let addr = front.local_addr().expect("relay address");
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (front, back) = (Arc::new(front), Arc::new(back));
        let up = {
            let (front, back, paused, stop, client) =
                (front.clone(), back.clone(), paused.clone(), stop.clone(), client.clone());
            let mut pipe = Pipe::new(faults, 1, counts.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        *client.lock().expect("lock") = Some(from);
                        if !paused.load(Ordering::Relaxed) {
                            for d in pipe.pass(&buf[..n]) {
                                let _ = back.send(&d);
                            }
                        }
                    }
                }
            })
        };
        let down = {
            let (paused, stop) = (paused.clone(), stop.clone());
            let mut pipe = Pipe::new(faults, 2, counts.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = back.recv(&mut buf) {
                        let to = *client.lock().expect("lock");
                        if let (Some(to), false) = (to, paused.load(Ordering::Relaxed)) {
                            for d in pipe.pass(&buf[..n]) {
                                let _ = front.send_to(&d, to);
                            }
                        }
                    }
                }
            })
        };
        Self { addr, paused, stop, counts, threads: vec![up, down] }
    }

    /// Drops every datagram while `paused` (a partition).
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// The pause switch, for another thread.
    pub fn pause_switch(&self) -> Arc<AtomicBool> {
        self.paused.clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_follow_their_probabilities() {
        let counts = Arc::new(FaultCounts::default());
        let faults = Faults { loss: 0.1, duplicate: 0.05, reorder: 0.05, seed: 7 };
        let mut pipe = Pipe::new(faults, 1, counts.clone());
        let sent: usize = (0..10_000u32).map(|i| pipe.pass(&i.to_le_bytes()).len()).sum();
        let dropped = counts.dropped.load(Ordering::Relaxed);
        assert!((800..1200).contains(&dropped), "{dropped} of 10000 dropped");
        assert!(counts.duplicated.load(Ordering::Relaxed) > 300);
        assert!(counts.reordered.load(Ordering::Relaxed) > 300);
        assert!(sent > 9_000 && sent < 10_000, "{sent}");
        let mut clean = Pipe::new(Faults::default(), 1, counts);
        assert_eq!(clean.pass(b"x"), vec![b"x".to_vec()]);
    }
}

/// Relays in front of a server and of the ports its worker processes
/// listen on (`ServerConfig::worker_ports`), for network faults in sessions
/// that a server hands to a worker: each relay listens on [`GROUP_IP`] at
/// the port of what it fronts, so a client that reaches the server through
/// the group follows the redirect through the group too (a client keeps
/// the address it connected to and takes the port it is redirected to).
/// One pause switch for all of them.
#[derive(Debug)]
pub struct Relays {
    /// Where clients connect: the server's port on [`GROUP_IP`].
    pub addr: SocketAddr,
    paused: Arc<AtomicBool>,
    /// The server's relay first.
    relays: Vec<Relay>,
}

/// The loopback address the group's relays listen on (the servers of the
/// tests listen on 127.0.0.1).
pub const GROUP_IP: [u8; 4] = [127, 0, 0, 2];

impl Relays {
    /// Relays for `server` (on 127.0.0.1) and its worker ports `low..=high`.
    pub fn start(server: SocketAddr, (low, high): (u16, u16), faults: Faults) -> Self {
        let paused = Arc::new(AtomicBool::new(false));
        // The server's own port first (it may lie in the range: a server
        // listening on port 0 takes one of its worker ports).
        let ports = std::iter::once(server.port()).chain((low..=high).filter(|&p| p != server.port()));
        let relays: Vec<Relay> = ports
            .map(|port| {
                let front = UdpSocket::bind(SocketAddr::from((GROUP_IP, port))).expect("bind a group relay");
                let target = SocketAddr::new(server.ip(), port);
                let faults = Faults { seed: faults.seed ^ u64::from(port), ..faults };
                Relay::bridge(front, target, faults, paused.clone(), Arc::default())
            })
            .collect();
        Self { addr: relays[0].addr, paused, relays }
    }

    /// Datagrams forwarded by the relays of the worker ports (not the
    /// server's): a session's traffic that followed its redirect here.
    pub fn forwarded_to_workers(&self) -> u64 {
        self.relays[1..].iter().map(|r| r.counts.forwarded.load(Ordering::Relaxed)).sum()
    }

    /// Datagrams the relays dropped.
    pub fn dropped(&self) -> u64 {
        self.relays.iter().map(|r| r.counts.dropped.load(Ordering::Relaxed)).sum()
    }

    /// Drops every datagram of every relay while `paused` (a partition).
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }
}

/// `n` consecutive UDP ports free on 127.0.0.1 and on [`GROUP_IP`] now,
/// for a server's worker ports fronted by [`Relays`].
pub fn free_ports(n: u16) -> (u16, u16) {
    let free = |port: u16| {
        UdpSocket::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(SocketAddr::from((GROUP_IP, port))).is_ok()
    };
    let start = 20_000 + (std::process::id() as u16 % 2000) * 16;
    (0..2000u16)
        .map(|i| 20_000 + (start - 20_000 + i * 16) % 32_000)
        .find(|&low| (low..low + n).all(free))
        .map(|low| (low, low + n - 1))
        .expect("free ports")
}
