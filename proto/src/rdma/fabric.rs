//! An in-memory fabric with the semantics of a reliable-connected queue
//! pair, for the tests of [`Connection`]: two sides, each with registered
//! memory (by local region id, and remotely by rkey with an access flag),
//! posted receive buffers of a fixed size, in-order delivery of sends and
//! writes, completions, and the failures RC reports: a remote access error
//! on a bad key or bounds, receiver-not-ready when no buffer is posted, a
//! local length error on an oversized message, flushes after the queue pair
//! went to error, a peer that stops answering, and a lost link.

use super::{Connection, Event, LocalSlice, Op, WcError};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Memory one side registered.
#[derive(Debug)]
pub(super) struct Region {
    pub(super) bytes: Vec<u8>,
    /// The address the peer uses for the first byte.
    pub(super) addr: u64,
    pub(super) rkey: u32,
    pub(super) remote_write: bool,
}

#[derive(Debug)]
enum Packet {
    Send {
        wr_id: u64,
        bytes: Vec<u8>,
    },
    Write {
        wr_id: u64,
        addr: u64,
        rkey: u32,
        bytes: Vec<u8>,
    },
    /// A send that fails when it is its turn (after those before it).
    Fail {
        wr_id: u64,
        status: WcError,
    },
}

#[derive(Debug)]
pub(super) struct Side {
    pub(super) conn: Connection,
    pub(super) regions: HashMap<u32, Region>,
    pub(super) events: Vec<Event>,
    recv_buf: usize,
    posted: VecDeque<u64>,
    /// Completions not yet handed to the connection: (wr_id, status, bytes).
    cq: VecDeque<(u64, Result<(), WcError>, Vec<u8>)>,
    /// A hung side's connection is not driven at all; its NIC still is.
    pub(super) hung: bool,
    /// A lagging side's session takes no events (its connection is driven).
    pub(super) lagging: bool,
    /// The side asked to disconnect.
    disconnected: bool,
}

/// Two connected sides and what is on the wire between them.
#[derive(Debug)]
pub(super) struct Fabric {
    pub(super) sides: [Side; 2],
    wire: [VecDeque<Packet>; 2],
    pub(super) now: Instant,
    /// The queue pairs are in error: everything completes flushed.
    errored: bool,
    /// The link is gone: nothing is delivered any more.
    pub(super) cut: bool,
    /// Sends of side `i` still to succeed before one completes with `WcError`.
    pub(super) fail_send_after: [Option<(usize, WcError)>; 2],
}

impl Side {
    pub(super) fn new(conn: Connection, recv_buf: usize, regions: HashMap<u32, Region>) -> Side {
        Side {
            conn,
            regions,
            events: Vec::new(),
            recv_buf,
            posted: VecDeque::new(),
            cq: VecDeque::new(),
            hung: false,
            lagging: false,
            disconnected: false,
        }
    }

    fn read_local(&self, local: LocalSlice) -> Option<Vec<u8>> {
        let region = self.regions.get(&local.region)?;
        let start = usize::try_from(local.offset).ok()?;
        region.bytes.get(start..start.checked_add(local.len as usize)?).map(<[u8]>::to_vec)
    }

    /// Places a write from the peer, or says why RC refuses it.
    fn place(&mut self, addr: u64, rkey: u32, bytes: &[u8]) -> Result<(), WcError> {
        let region =
            self.regions.values_mut().find(|r| r.rkey == rkey && r.remote_write).ok_or(WcError::RemoteAccess)?;
        let start = addr.checked_sub(region.addr).ok_or(WcError::RemoteAccess)? as usize;
        let end = start.checked_add(bytes.len()).filter(|e| *e <= region.bytes.len()).ok_or(WcError::RemoteAccess)?;
        region.bytes[start..end].copy_from_slice(bytes);
        Ok(())
    }
}

impl Fabric {
    pub(super) fn new(a: Side, b: Side, now: Instant) -> Fabric {
        Fabric {
            sides: [a, b],
            wire: [VecDeque::new(), VecDeque::new()],
            now,
            errored: false,
            cut: false,
            fail_send_after: [None, None],
        }
    }

    /// The connection manager connects both sides.
    pub(super) fn establish(&mut self) {
        let now = self.now;
        for side in &mut self.sides {
            side.conn.handle_established(now);
        }
        self.run();
    }

    /// Moves everything until nothing moves any more.
    pub(super) fn run(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("the fabric did not settle");
    }

    /// Time passes by `by`, in steps of a tenth of it, with traffic between.
    pub(super) fn advance(&mut self, by: Duration) {
        for _ in 0..10 {
            self.now += by / 10;
            let now = self.now;
            for side in &mut self.sides {
                if !side.hung {
                    side.conn.handle_timeout(now);
                }
            }
            self.run();
        }
    }

    fn step(&mut self) -> bool {
        let mut moved = false;
        for i in 0..2 {
            moved |= self.take_ops(i);
        }
        for i in 0..2 {
            moved |= self.deliver(i);
        }
        let now = self.now;
        for side in &mut self.sides {
            if side.hung {
                continue;
            }
            while let Some((wr_id, status, bytes)) = side.cq.pop_front() {
                side.conn.handle_completion(now, wr_id, status, &bytes);
                moved = true;
            }
            while !side.lagging
                && let Some(event) = side.conn.poll_event()
            {
                side.events.push(event);
                moved = true;
            }
        }
        moved
    }

    fn take_ops(&mut self, i: usize) -> bool {
        let mut moved = false;
        while !self.sides[i].hung
            && let Some(op) = self.sides[i].conn.poll_op()
        {
            moved = true;
            let side = &mut self.sides[i];
            match op {
                Op::PostRecv { wr_id, buf } => {
                    assert!(usize::from(buf) < 1024);
                    if self.errored {
                        side.cq.push_back((wr_id, Err(WcError::Flushed), Vec::new()));
                    } else {
                        side.posted.push_back(wr_id);
                    }
                }
                Op::Send { wr_id, bytes } => {
                    let fail = match &mut self.fail_send_after[i] {
                        Some((0, status)) => Some(*status),
                        Some((n, _)) => {
                            *n -= 1;
                            None
                        }
                        None => None,
                    };
                    if let Some(status) = fail {
                        self.fail_send_after[i] = None;
                        self.wire[i].push_back(Packet::Fail { wr_id, status });
                    } else if self.errored {
                        side.cq.push_back((wr_id, Err(WcError::Flushed), Vec::new()));
                    } else {
                        self.wire[i].push_back(Packet::Send { wr_id, bytes });
                    }
                }
                Op::Write { wr_id, local, remote_addr, rkey } => match side.read_local(local) {
                    None => {
                        side.cq.push_back((wr_id, Err(WcError::LocalProtection), Vec::new()));
                        self.error();
                    }
                    Some(_) if self.errored => side.cq.push_back((wr_id, Err(WcError::Flushed), Vec::new())),
                    Some(bytes) => self.wire[i].push_back(Packet::Write { wr_id, addr: remote_addr, rkey, bytes }),
                },
                Op::Disconnect => {
                    side.disconnected = true;
                    let peer = &mut self.sides[1 - i];
                    if !peer.disconnected && !peer.hung {
                        peer.conn.handle_disconnected();
                    }
                }
            }
        }
        moved
    }

    /// Delivers side `i`'s packets to the other side, in order.
    fn deliver(&mut self, i: usize) -> bool {
        if self.cut {
            return false;
        }
        let mut moved = false;
        while let Some(packet) = self.wire[i].pop_front() {
            moved = true;
            if self.errored {
                let (Packet::Send { wr_id, .. } | Packet::Write { wr_id, .. } | Packet::Fail { wr_id, .. }) = packet;
                self.sides[i].cq.push_back((wr_id, Err(WcError::Flushed), Vec::new()));
                continue;
            }
            let (sender, receiver) = pair(&mut self.sides, i);
            match packet {
                Packet::Send { wr_id, bytes } => match receiver.posted.pop_front() {
                    None => {
                        sender.cq.push_back((wr_id, Err(WcError::ReceiverNotReady), Vec::new()));
                        self.error();
                    }
                    Some(recv) if bytes.len() > receiver.recv_buf => {
                        receiver.cq.push_back((recv, Err(WcError::LocalLength), Vec::new()));
                        sender.cq.push_back((wr_id, Err(WcError::RemoteOperation), Vec::new()));
                        self.error();
                    }
                    Some(recv) => {
                        receiver.cq.push_back((recv, Ok(()), bytes));
                        sender.cq.push_back((wr_id, Ok(()), Vec::new()));
                    }
                },
                Packet::Fail { wr_id, status } => {
                    sender.cq.push_back((wr_id, Err(status), Vec::new()));
                    self.error();
                }
                Packet::Write { wr_id, addr, rkey, bytes } => match receiver.place(addr, rkey, &bytes) {
                    Ok(()) => sender.cq.push_back((wr_id, Ok(()), Vec::new())),
                    Err(status) => {
                        sender.cq.push_back((wr_id, Err(status), Vec::new()));
                        self.error();
                    }
                },
            }
        }
        moved
    }

    /// Both queue pairs go to error: what is posted completes flushed.
    fn error(&mut self) {
        self.errored = true;
        for (i, side) in self.sides.iter_mut().enumerate() {
            while let Some(recv) = side.posted.pop_front() {
                side.cq.push_back((recv, Err(WcError::Flushed), Vec::new()));
            }
            for packet in self.wire[i].drain(..) {
                let (Packet::Send { wr_id, .. } | Packet::Write { wr_id, .. } | Packet::Fail { wr_id, .. }) = packet;
                side.cq.push_back((wr_id, Err(WcError::Flushed), Vec::new()));
            }
        }
    }

    /// The link goes away: the connection manager tells both sides.
    pub(super) fn lose_link(&mut self) {
        self.cut = true;
        for side in &mut self.sides {
            if !side.hung {
                side.conn.handle_disconnected();
            }
        }
        self.run();
    }
}

fn pair(sides: &mut [Side; 2], sender: usize) -> (&mut Side, &mut Side) {
    let (a, b) = sides.split_at_mut(1);
    if sender == 0 { (&mut a[0], &mut b[0]) } else { (&mut b[0], &mut a[0]) }
}
