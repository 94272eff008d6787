//! What travels on a shared-memory session's unix socket, without I/O:
//! fixed-size little-endian messages (so that a peer cannot make the other
//! side lose its framing or allocate), their checks against the mapped
//! region, the order of sequence numbers, and the client's ring of slots.
//!
//! - [`Attach`] (client → server, once, with the region's file descriptor):
//!   the session, the region's size and the session's shm secret.
//! - [`Request`] (client → server): put or get `len` bytes of a staged
//!   transfer at `offset`, from or into the region at `region_offset`.
//!   Or (with a file descriptor attached): attach another region, one the
//!   program's pinned host memory lives in ([`Op::AddRegion`]); or detach
//!   one ([`Op::RemoveRegion`]).
//! - [`Reply`] (server → client): the request's sequence number and a CUDA
//!   result code, with a message when it is not success.

use crate::ShmError;
use std::collections::VecDeque;

/// Bytes of an [`Attach`] and of a [`Request`].
pub const MESSAGE_LEN: usize = 64;
/// Bytes of a [`Reply`].
pub const REPLY_LEN: usize = 256;
/// Longest message text a [`Reply`] carries (longer ones are cut).
pub const MAX_REPLY_TEXT: usize = REPLY_LEN - 16;
/// Bytes of a session's shm secret.
pub const SECRET_LEN: usize = 32;

/// First bytes of an [`Attach`]: the protocol and its version.
const MAGIC: [u8; 8] = *b"GPSHM\x00\x00\x01";

/// Largest region a server maps for one session.
pub const MAX_REGION_BYTES: u64 = 1 << 30;
/// Smallest region: one page.
pub const MIN_REGION_BYTES: u64 = 4096;
/// Host regions (pinned memory) one session may attach besides its bulk
/// region.
pub const MAX_HOST_REGIONS: usize = 64;
/// The bulk region's id in a [`crate::wire::Op::AddRegion`]'s id space:
/// host regions take ids from 1.
pub const BULK_REGION: u32 = 0;

/// The reply code of an `AddRegion` that cannot be mapped at the client's
/// address (`CUDA_ERROR_ALREADY_MAPPED`): the client may try another one.
pub const ADDRESS_IN_USE: u32 = 208;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

/// A client's attachment of its region to a session.
#[derive(Clone, PartialEq, Eq)]
pub struct Attach {
    pub session_id: u64,
    /// The region's size as the client made it; the server checks it
    /// against the file it received.
    pub region_len: u64,
    pub secret: [u8; SECRET_LEN],
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach").field("session_id", &self.session_id).field("region_len", &self.region_len).finish()
    }
}

impl Attach {
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut b = [0u8; MESSAGE_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..16].copy_from_slice(&self.session_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.region_len.to_le_bytes());
        b[24..24 + SECRET_LEN].copy_from_slice(&self.secret);
        b
    }

    /// Parses an attachment; the region's size must lie within
    /// [`MIN_REGION_BYTES`]..=[`MAX_REGION_BYTES`].
    pub fn decode(b: &[u8; MESSAGE_LEN]) -> Result<Self, ShmError> {
        if b[..8] != MAGIC {
            return Err(ShmError::Protocol("not a gpupool shared-memory attachment (magic or version)".into()));
        }
        let region_len = u64_at(b, 16);
        if !(MIN_REGION_BYTES..=MAX_REGION_BYTES).contains(&region_len) {
            return Err(ShmError::Protocol(format!(
                "region of {region_len} bytes outside {MIN_REGION_BYTES}..={MAX_REGION_BYTES}"
            )));
        }
        if b[24 + SECRET_LEN..].iter().any(|&x| x != 0) {
            return Err(ShmError::Protocol("reserved bytes of the attachment are not zero".into()));
        }
        let mut secret = [0u8; SECRET_LEN];
        secret.copy_from_slice(&b[24..24 + SECRET_LEN]);
        Ok(Self { session_id: u64_at(b, 8), region_len, secret })
    }
}

/// What a [`Request`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Stage `len` bytes of upload `transfer` (of `total` bytes) at
    /// `offset`, read from the region.
    Put { total: u64 },
    /// Write `len` bytes of staged download `transfer` at `offset` into the
    /// region.
    Get,
    /// Attach the memfd sent with this request as host region `id` (1 and
    /// up) of `len` bytes: the program's pinned memory, which copies then
    /// name by region, offset and length instead of carrying bytes. `at`:
    /// the address the client mapped it at, for the server to map it at
    /// too (then the program's pointers into it are device addresses, as
    /// pinned memory's are under unified addressing), or 0 for anywhere.
    /// A server that cannot map it there refuses it with
    /// [`crate::wire::ADDRESS_IN_USE`]; only a server whose `Welcome` says
    /// `shm_region_addresses` takes a non-zero `at`.
    AddRegion { id: u32, len: u64, at: u64 },
    /// Detach host region `id` (the program freed all of it).
    RemoveRegion { id: u32 },
    /// Take the memfd sent with this request, of `len` bytes, as the
    /// session's command ring ([`crate::ring`]): its batches and replies
    /// go through it from then on.
    Commands { len: u64 },
}

impl Op {
    /// Whether the request carries a file descriptor.
    pub fn carries_fd(&self) -> bool {
        matches!(self, Op::AddRegion { .. } | Op::Commands { .. })
    }
}

/// One chunk of a bulk copy, its bytes in the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// 1 for a session's first request, one more for each after it.
    pub seq: u64,
    pub op: Op,
    pub transfer: u64,
    pub offset: u64,
    pub region_offset: u64,
    pub len: u64,
}

const OP_PUT: u32 = 1;
const OP_GET: u32 = 2;
const OP_ADD_REGION: u32 = 3;
const OP_REMOVE_REGION: u32 = 4;
const OP_COMMANDS: u32 = 5;

impl Request {
    /// A request for a region operation (no transfer, no range).
    pub fn region(seq: u64, op: Op) -> Self {
        Self { seq, op, transfer: 0, offset: 0, region_offset: 0, len: 0 }
    }

    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut b = [0u8; MESSAGE_LEN];
        let (op, transfer, total, len) = match self.op {
            Op::Put { total } => (OP_PUT, self.transfer, total, self.len),
            Op::Get => (OP_GET, self.transfer, 0, self.len),
            Op::AddRegion { id, len, .. } => (OP_ADD_REGION, u64::from(id), 0, len),
            Op::RemoveRegion { id } => (OP_REMOVE_REGION, u64::from(id), 0, 0),
            Op::Commands { len } => (OP_COMMANDS, 0, 0, len),
        };
        let offset = match self.op {
            Op::AddRegion { at, .. } => at,
            _ => self.offset,
        };
        b[..4].copy_from_slice(&op.to_le_bytes());
        for (i, v) in [self.seq, transfer, total, offset, self.region_offset, len].iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Parses a request, unchecked against any region (see
    /// [`Request::check`]).
    pub fn decode(b: &[u8; MESSAGE_LEN]) -> Result<Self, ShmError> {
        if u32_at(b, 4) != 0 || b[56..].iter().any(|&x| x != 0) {
            return Err(ShmError::Protocol("reserved bytes of a request are not zero".into()));
        }
        let region_id = || {
            u32::try_from(u64_at(b, 16)).ok().filter(|&id| id != BULK_REGION).ok_or_else(|| {
                ShmError::Protocol(format!("host region id {} (1 to {} allowed)", u64_at(b, 16), u32::MAX))
            })
        };
        // A region operation names no transfer range: those bytes are zero
        // (but an addition's address, in the offset's place).
        let no_range = |with_len: bool, with_at: bool| {
            if u64_at(b, 24) != 0
                || (!with_at && u64_at(b, 32) != 0)
                || u64_at(b, 40) != 0
                || (!with_len && u64_at(b, 48) != 0)
            {
                return Err(ShmError::Protocol("a region operation with transfer fields".into()));
            }
            Ok(())
        };
        let op = match u32_at(b, 0) {
            OP_PUT => Op::Put { total: u64_at(b, 24) },
            OP_GET if u64_at(b, 24) == 0 => Op::Get,
            OP_GET => return Err(ShmError::Protocol("a get with a total size".into())),
            OP_ADD_REGION => {
                no_range(true, true)?;
                let len = u64_at(b, 48);
                if !(MIN_REGION_BYTES..=MAX_REGION_BYTES).contains(&len) {
                    return Err(ShmError::Protocol(format!(
                        "host region of {len} bytes outside {MIN_REGION_BYTES}..={MAX_REGION_BYTES}"
                    )));
                }
                let at = u64_at(b, 32);
                if at.checked_add(len).is_none_or(|end| end > crate::region::USER_ADDRESS_END) {
                    return Err(ShmError::Protocol(format!("host region at {at:#x} (+{len}) past the user addresses")));
                }
                return Ok(Self::region(u64_at(b, 8), Op::AddRegion { id: region_id()?, len, at }));
            }
            OP_REMOVE_REGION => {
                no_range(false, false)?;
                return Ok(Self::region(u64_at(b, 8), Op::RemoveRegion { id: region_id()? }));
            }
            OP_COMMANDS => {
                no_range(true, false)?;
                if u64_at(b, 16) != 0 {
                    return Err(ShmError::Protocol("a command ring with a region id".into()));
                }
                let len = u64_at(b, 48);
                crate::ring::capacity_of(len)?;
                return Ok(Self::region(u64_at(b, 8), Op::Commands { len }));
            }
            other => return Err(ShmError::Protocol(format!("unknown request operation {other}"))),
        };
        Ok(Self {
            seq: u64_at(b, 8),
            op,
            transfer: u64_at(b, 16),
            offset: u64_at(b, 32),
            region_offset: u64_at(b, 40),
            len: u64_at(b, 48),
        })
    }

    /// The request's bytes in a region of `region_len` bytes, at most
    /// `max_len` of them: `(start, len)` as `usize`, or why not.
    pub fn check(&self, region_len: usize, max_len: usize) -> Result<(usize, usize), ShmError> {
        let outside = || {
            ShmError::Protocol(format!(
                "bytes [{}, +{}) lie outside the region of {region_len} bytes",
                self.region_offset, self.len
            ))
        };
        let start = usize::try_from(self.region_offset).map_err(|_| outside())?;
        let len = usize::try_from(self.len).map_err(|_| outside())?;
        if len == 0 || len > max_len {
            return Err(ShmError::Protocol(format!("a chunk of {len} bytes (1 to {max_len} allowed)")));
        }
        start.checked_add(len).filter(|&end| end <= region_len).ok_or_else(outside)?;
        Ok((start, len))
    }
}

/// The bytes `[offset, offset + len)` of a host region of `region_len`
/// bytes, as named by a copy command (never trusted): `(start, len)` as
/// `usize`, or why not. An empty range is refused (a copy of nothing
/// carries no region).
pub fn host_range(region_len: usize, offset: u64, len: u64) -> Result<(usize, usize), ShmError> {
    let outside =
        || ShmError::Protocol(format!("bytes [{offset}, +{len}) lie outside the host region of {region_len} bytes"));
    let start = usize::try_from(offset).map_err(|_| outside())?;
    let n = usize::try_from(len).map_err(|_| outside())?;
    if n == 0 {
        return Err(ShmError::Protocol("an empty range of a host region".into()));
    }
    start.checked_add(n).filter(|&end| end <= region_len).ok_or_else(outside)?;
    Ok((start, n))
}

/// The answer to an [`Attach`] (`seq` 0) or a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub seq: u64,
    /// A CUDA result: 0 is success.
    pub code: u32,
    pub message: String,
}

impl Reply {
    pub fn ok(seq: u64) -> Self {
        Self { seq, code: 0, message: String::new() }
    }

    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.code.to_le_bytes());
        // Cut at a character boundary.
        let mut n = self.message.len().min(MAX_REPLY_TEXT);
        while !self.message.is_char_boundary(n) {
            n -= 1;
        }
        b[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        b[16..16 + n].copy_from_slice(&self.message.as_bytes()[..n]);
        b
    }

    pub fn decode(b: &[u8; REPLY_LEN]) -> Result<Self, ShmError> {
        let n = u32_at(b, 12) as usize;
        let text = b.get(16..16 + n).ok_or_else(|| ShmError::Protocol(format!("reply text of {n} bytes")))?;
        Ok(Self { seq: u64_at(b, 0), code: u32_at(b, 8), message: String::from_utf8_lossy(text).into_owned() })
    }
}

/// The server's view of a session's sequence numbers: each request's is
/// one more than the one before, starting at 1.
#[derive(Debug, Default)]
pub struct SeqCheck {
    last: u64,
}

impl SeqCheck {
    /// Accepts `seq` when it is the next one.
    pub fn next(&mut self, seq: u64) -> Result<(), ShmError> {
        if self.last.checked_add(1) != Some(seq) {
            return Err(ShmError::Protocol(format!("request {seq} out of order (after {})", self.last)));
        }
        self.last = seq;
        Ok(())
    }
}

/// A slot of the region in use by one request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot<T> {
    pub seq: u64,
    pub region_offset: usize,
    pub len: usize,
    /// What the caller needs back when the reply arrives.
    pub tag: T,
}

/// The client's ring over its region: `slots` slots of `slot_bytes` each,
/// used in turn; a slot is free again once the reply of the request that
/// used it arrived. Replies arrive in order (the server answers one request
/// at a time), so a reply must be the oldest request in flight's.
#[derive(Debug)]
pub struct SlotRing<T> {
    slot_bytes: usize,
    slots: usize,
    next_seq: u64,
    next_slot: usize,
    in_flight: VecDeque<Slot<T>>,
}

impl<T: Copy> SlotRing<T> {
    /// A ring over `region_len` bytes in slots of `slot_bytes` (at least
    /// one slot); `None` when not even one slot fits.
    pub fn new(region_len: usize, slot_bytes: usize) -> Option<Self> {
        let slots = region_len.checked_div(slot_bytes).filter(|&n| n > 0)?;
        Some(Self { slot_bytes, slots, next_seq: 1, next_slot: 0, in_flight: VecDeque::new() })
    }

    /// Bytes of each slot: the largest chunk of one request.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next slot for a request of `len` bytes (at most
    /// [`Self::slot_bytes`]) and its sequence number; `None` while every
    /// slot is in flight (wait for a reply first).
    pub fn acquire(&mut self, len: usize, tag: T) -> Option<Slot<T>> {
        if self.in_flight.len() == self.slots || len > self.slot_bytes {
            return None;
        }
        let slot = Slot { seq: self.next_seq, region_offset: self.next_slot * self.slot_bytes, len, tag };
        self.next_seq += 1;
        self.next_slot = (self.next_slot + 1) % self.slots;
        self.in_flight.push_back(slot);
        Some(slot)
    }

    /// Frees the slot of the reply `seq`, which must be the oldest in
    /// flight's; returns it.
    pub fn complete(&mut self, seq: u64) -> Result<Slot<T>, ShmError> {
        match self.in_flight.front() {
            Some(oldest) if oldest.seq == seq => Ok(self.in_flight.pop_front().expect("front exists")),
            Some(oldest) => {
                Err(ShmError::Protocol(format!("reply {seq} while request {} is the oldest in flight", oldest.seq)))
            }
            None => Err(ShmError::Protocol(format!("reply {seq} with no request in flight"))),
        }
    }

    /// The sequence number of a request that uses no slot (a region
    /// operation), sent and answered while no other request is in flight;
    /// `None` while one is.
    pub fn control(&mut self) -> Option<u64> {
        if !self.in_flight.is_empty() {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(seq)
    }

    /// Forgets every request in flight (their channel is gone).
    pub fn reset(&mut self) {
        self.in_flight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip() {
        let a = Attach { session_id: 7, region_len: 1 << 20, secret: [9; SECRET_LEN] };
        assert_eq!(Attach::decode(&a.encode()).expect("attach"), a);
        for op in [Op::Put { total: 100 }, Op::Get] {
            let r = Request { seq: 3, op, transfer: 4, offset: 5, region_offset: 6, len: 7 };
            assert_eq!(Request::decode(&r.encode()).expect("request"), r);
        }
        let ring = crate::ring::region_len(crate::ring::DEFAULT_CAPACITY);
        for op in [
            Op::AddRegion { id: 3, len: 1 << 20, at: 0 },
            Op::AddRegion { id: 4, len: 1 << 20, at: 0x1000_0000_0000 },
            Op::RemoveRegion { id: u32::MAX },
            Op::Commands { len: ring },
        ] {
            let r = Request::region(9, op);
            assert_eq!(Request::decode(&r.encode()).expect("region request"), r);
            assert_eq!(op.carries_fd(), !matches!(op, Op::RemoveRegion { .. }));
        }
        // A command ring of a length that is not one.
        let bad = Request::region(9, Op::Commands { len: ring + 1 }).encode();
        assert!(Request::decode(&bad).is_err());
        let reply = Reply { seq: 2, code: 1, message: "é".repeat(200) };
        let back = Reply::decode(&reply.encode()).expect("reply");
        assert_eq!(back.code, 1);
        assert!(back.message.len() <= MAX_REPLY_TEXT && reply.message.starts_with(&back.message));
    }

    #[test]
    fn hostile_messages_are_refused() {
        let mut a = Attach { session_id: 1, region_len: 1 << 20, secret: [1; SECRET_LEN] }.encode();
        a[0] = b'X';
        assert!(Attach::decode(&a).is_err(), "magic");
        for len in [0, MIN_REGION_BYTES - 1, MAX_REGION_BYTES + 1, u64::MAX] {
            let a = Attach { session_id: 1, region_len: len, secret: [1; SECRET_LEN] }.encode();
            assert!(Attach::decode(&a).is_err(), "region of {len}");
        }
        let mut r = Request { seq: 1, op: Op::Get, transfer: 1, offset: 0, region_offset: 0, len: 1 }.encode();
        r[0] = 9;
        assert!(Request::decode(&r).is_err(), "unknown op");
        let mut r = Request { seq: 1, op: Op::Get, transfer: 1, offset: 0, region_offset: 0, len: 1 }.encode();
        r[24] = 1;
        assert!(Request::decode(&r).is_err(), "get with a total");
        // Region operations: the bulk region's id, ids past u32, sizes out
        // of bounds, stray transfer fields.
        for (op, why) in [
            (Op::AddRegion { id: BULK_REGION, len: 1 << 20, at: 0 }, "the bulk region's id"),
            (Op::RemoveRegion { id: BULK_REGION }, "removing the bulk region"),
            (Op::AddRegion { id: 1, len: MIN_REGION_BYTES - 1, at: 0 }, "too small"),
            (Op::AddRegion { id: 1, len: MAX_REGION_BYTES + 1, at: 0 }, "too large"),
            (Op::AddRegion { id: 1, len: 1 << 20, at: crate::region::USER_ADDRESS_END }, "past the user addresses"),
            (Op::AddRegion { id: 1, len: 1 << 20, at: u64::MAX - 4095 }, "an address that overflows"),
        ] {
            assert!(Request::decode(&Request::region(1, op).encode()).is_err(), "{why}");
        }
        let mut r = Request::region(1, Op::AddRegion { id: 1, len: 1 << 20, at: 0 }).encode();
        r[16..24].copy_from_slice(&(u64::from(u32::MAX) + 1).to_le_bytes());
        assert!(Request::decode(&r).is_err(), "an id past u32");
        for at in [24, 40] {
            let mut r = Request::region(1, Op::AddRegion { id: 1, len: 1 << 20, at: 0 }).encode();
            r[at] = 1;
            assert!(Request::decode(&r).is_err(), "a transfer field at byte {at}");
        }
        for op in
            [Op::RemoveRegion { id: 1 }, Op::Commands { len: crate::ring::region_len(crate::ring::DEFAULT_CAPACITY) }]
        {
            let mut r = Request::region(1, op).encode();
            r[32] = 1;
            assert!(Request::decode(&r).is_err(), "an address in {op:?}");
        }
        let mut r = Request::region(1, Op::RemoveRegion { id: 1 }).encode();
        r[48] = 1;
        assert!(Request::decode(&r).is_err(), "a removal with a length");
        let mut bad = Reply::ok(1).encode();
        bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Reply::decode(&bad).is_err(), "text longer than the reply");
    }

    #[test]
    fn requests_are_checked_against_the_region() {
        let req = |region_offset, len| Request { seq: 1, op: Op::Get, transfer: 1, offset: 0, region_offset, len };
        assert_eq!(req(4096, 4096).check(8192, 4096).expect("fits"), (4096, 4096));
        assert!(req(4097, 4096).check(8192, 4096).is_err(), "past the end");
        assert!(req(u64::MAX, 2).check(8192, 4096).is_err(), "offset overflow");
        assert!(req(0, u64::MAX).check(8192, usize::MAX).is_err(), "length overflow");
        assert!(req(0, 0).check(8192, 4096).is_err(), "empty");
        assert!(req(0, 8192).check(8192, 4096).is_err(), "over the chunk limit");
    }

    #[test]
    fn host_ranges_are_checked() {
        assert_eq!(host_range(8192, 0, 8192).expect("whole"), (0, 8192));
        assert_eq!(host_range(8192, 8191, 1).expect("last byte"), (8191, 1));
        assert!(host_range(8192, 8192, 1).is_err(), "one past the end");
        assert!(host_range(8192, 8191, 2).is_err(), "across the end");
        assert!(host_range(8192, u64::MAX, 1).is_err(), "offset overflow");
        assert!(host_range(8192, 1, u64::MAX).is_err(), "length overflow");
        assert!(host_range(8192, 0, 0).is_err(), "empty");
    }

    #[test]
    fn sequence_numbers_go_one_by_one() {
        let mut s = SeqCheck::default();
        assert!(s.next(1).is_ok() && s.next(2).is_ok());
        assert!(s.next(2).is_err(), "repeated");
        assert!(s.next(4).is_err(), "skipped");
        assert!(SeqCheck::default().next(0).is_err(), "zero");
    }

    #[test]
    fn control_requests_wait_for_an_empty_ring() {
        let mut ring = SlotRing::<()>::new(8192, 4096).expect("ring");
        assert_eq!(ring.control(), Some(1));
        let slot = ring.acquire(10, ()).expect("slot");
        assert_eq!(slot.seq, 2);
        assert_eq!(ring.control(), None, "a slot is in flight");
        ring.complete(2).expect("oldest");
        assert_eq!(ring.control(), Some(3));
    }

    proptest! {
        /// Whatever the order of acquisitions and replies: slots in flight
        /// never overlap, lie within the region, carry consecutive sequence
        /// numbers, and only the oldest one's reply is accepted.
        #[test]
        fn ring_slots_never_overlap(
            region in 1usize..1 << 16,
            slot in 1usize..1 << 12,
            ops in proptest::collection::vec((any::<bool>(), 0usize..1 << 12, any::<bool>()), 0..200),
        ) {
            let Some(mut ring) = SlotRing::<usize>::new(region, slot) else {
                prop_assert!(region < slot);
                return Ok(());
            };
            let mut expected_seq = 1;
            for (i, (acquire, len, wrong)) in ops.into_iter().enumerate() {
                if acquire {
                    match ring.acquire(len, i) {
                        Some(s) => {
                            prop_assert_eq!(s.seq, expected_seq);
                            expected_seq += 1;
                            prop_assert!(s.region_offset + s.len <= region && s.len <= slot);
                        }
                        None => prop_assert!(len > slot || ring.in_flight() == region / slot),
                    }
                } else if ring.in_flight() > 0 {
                    let oldest = ring.in_flight.front().copied().expect("in flight");
                    if wrong {
                        prop_assert!(ring.complete(oldest.seq + 1).is_err());
                    }
                    prop_assert_eq!(ring.complete(oldest.seq).expect("oldest").tag, oldest.tag);
                } else {
                    prop_assert!(ring.complete(expected_seq).is_err());
                }
                let mut spans: Vec<_> = ring.in_flight.iter().map(|s| (s.region_offset, s.region_offset + slot)).collect();
                spans.sort();
                prop_assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "overlap: {:?}", spans);
            }
        }

        /// Any 64 bytes decode to a request or an error, and a decoded
        /// request that passes its check lies within the region.
        #[test]
        fn any_bytes_are_a_checked_request_or_an_error(bytes in proptest::collection::vec(any::<u8>(), MESSAGE_LEN)) {
            let b: [u8; MESSAGE_LEN] = bytes.try_into().expect("64 bytes");
            if let Ok(r) = Request::decode(&b)
                && let Ok((start, len)) = r.check(1 << 20, 1 << 16)
            {
                prop_assert!(start + len <= 1 << 20);
            }
            let _ = Attach::decode(&b);
        }

        /// Any (offset, length) a copy names is inside the region or an error.
        #[test]
        fn any_host_range_is_inside_or_an_error(region in 1usize..1 << 20, offset in any::<u64>(), len in any::<u64>()) {
            if let Ok((start, n)) = host_range(region, offset, len) {
                prop_assert!(n > 0 && start + n <= region);
            }
        }
    }
}
