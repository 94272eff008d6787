//! Messages of the RDMA command channel: one per receive buffer, a fixed
//! 16-byte header and a body of the kind's fixed layout (little endian).
//!
//! Every field read from the peer is checked here against the limits the
//! receiver set ([`Limits`]); a message that does not parse is a protocol
//! violation and ends the connection.

use super::{RdmaError, RemoteRegion};

/// Bytes of the header: kind, flags, credits returned, body length, sequence number.
pub const HEADER_LEN: usize = 16;

/// Flag of a [`Message::Data`] fragment: the last of its frame.
const FLAG_LAST: u8 = 1;

/// Largest secret a `Hello` carries.
pub const MAX_SECRET: usize = 64;

/// What a connection announces in its first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The RDMA core's protocol version ([`super::CORE_VERSION`]).
    pub version: u32,
    /// Receive buffers the sender posted: the peer's initial credits.
    pub recv_depth: u16,
    /// Bytes of each of those buffers: the largest message the peer may send.
    pub recv_buf: u32,
    /// Largest reassembled frame the sender accepts.
    pub max_frame: u32,
    /// The region the peer may write into: the server's staging for uploads,
    /// the client's landing region for downloads.
    pub region: RemoteRegion,
    /// Upload slots in the region (server) or 0 (client).
    pub slots: u16,
    /// Bytes of each slot.
    pub slot_size: u32,
    /// Largest download chunk the sender asks for (client) or answers (server).
    pub get_chunk: u32,
    /// Download chunks the sender keeps in flight (client) or accepts (server).
    pub gets_in_flight: u16,
    /// Session this connection belongs to (from the QUIC handshake).
    pub session_id: u64,
    /// Proof that the connection comes from that session's client.
    pub secret: Vec<u8>,
}

/// One message of the command channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The first message of each side.
    Hello(Hello),
    /// A fragment of a command frame (a batch or a reply).
    Data { last: bool, body: Vec<u8> },
    /// Nothing but the header's credits (also the keepalive).
    Credit,
    /// An upload chunk is in upload slot `slot` (written before this
    /// message); `total` is the upload's whole size.
    PutChunk { id: u64, total: u64, offset: u64, len: u32, slot: u16 },
    /// The server has consumed upload slot `slot`; the client may reuse it.
    /// `code` is the server's verdict on the chunk it held: 0 staged, else
    /// the CUDA error it was refused with.
    SlotFree { slot: u16, code: u32 },
    /// The client asks for `len` bytes of download `id` at `offset`, to be
    /// written at `dest` in its landing region.
    GetRequest { id: u64, offset: u64, len: u32, dest: u64 },
    /// The server wrote the bytes a `GetRequest` asked for (before this message).
    GetDone { id: u64, offset: u64, len: u32 },
    /// The server refuses a `GetRequest` (a CUDA error code).
    GetFailed { id: u64, offset: u64, code: u32 },
    /// The sender ends the connection.
    Close { code: u32 },
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => 1,
            Message::Data { .. } => 2,
            Message::Credit => 3,
            Message::PutChunk { .. } => 4,
            Message::SlotFree { .. } => 5,
            Message::GetRequest { .. } => 6,
            Message::GetDone { .. } => 7,
            Message::GetFailed { .. } => 8,
            Message::Close { .. } => 9,
        }
    }

    /// Encodes the message with its header; `credits` returned, `seq` its number.
    pub fn encode(&self, credits: u16, seq: u64) -> Vec<u8> {
        let mut body = Vec::new();
        let mut flags = 0;
        match self {
            Message::Hello(h) => {
                body.extend_from_slice(&h.version.to_le_bytes());
                body.extend_from_slice(&h.recv_depth.to_le_bytes());
                body.extend_from_slice(&h.recv_buf.to_le_bytes());
                body.extend_from_slice(&h.max_frame.to_le_bytes());
                body.extend_from_slice(&h.region.addr.to_le_bytes());
                body.extend_from_slice(&h.region.len.to_le_bytes());
                body.extend_from_slice(&h.region.rkey.to_le_bytes());
                body.extend_from_slice(&h.slots.to_le_bytes());
                body.extend_from_slice(&h.slot_size.to_le_bytes());
                body.extend_from_slice(&h.get_chunk.to_le_bytes());
                body.extend_from_slice(&h.gets_in_flight.to_le_bytes());
                body.extend_from_slice(&h.session_id.to_le_bytes());
                body.push(h.secret.len().min(MAX_SECRET) as u8);
                body.extend_from_slice(&h.secret[..h.secret.len().min(MAX_SECRET)]);
            }
            Message::Data { last, body: b } => {
                if *last {
                    flags |= FLAG_LAST;
                }
                body.extend_from_slice(b);
            }
            Message::Credit => {}
            Message::PutChunk { id, total, offset, len, slot } => {
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(&total.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
                body.extend_from_slice(&slot.to_le_bytes());
            }
            Message::SlotFree { slot, code } => {
                body.extend_from_slice(&slot.to_le_bytes());
                body.extend_from_slice(&code.to_le_bytes());
            }
            Message::GetRequest { id, offset, len, dest } => {
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
                body.extend_from_slice(&dest.to_le_bytes());
            }
            Message::GetDone { id, offset, len } => {
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&len.to_le_bytes());
            }
            Message::GetFailed { id, offset, code } => {
                body.extend_from_slice(&id.to_le_bytes());
                body.extend_from_slice(&offset.to_le_bytes());
                body.extend_from_slice(&code.to_le_bytes());
            }
            Message::Close { code } => body.extend_from_slice(&code.to_le_bytes()),
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.push(self.kind());
        out.push(flags);
        out.extend_from_slice(&credits.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// A decoded message with its header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub credits: u16,
    pub seq: u64,
    pub message: Message,
}

/// Reads little-endian fields off a body, failing on a short one.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RdmaError> {
        if self.bytes.len() < n {
            return Err(RdmaError::Violation("message body is shorter than its kind's layout".into()));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, RdmaError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RdmaError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, RdmaError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, RdmaError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    /// A length byte and that many bytes, at most [`MAX_SECRET`].
    fn secret(&mut self) -> Result<Vec<u8>, RdmaError> {
        let len = usize::from(self.u8()?);
        if len > MAX_SECRET {
            return Err(RdmaError::Violation(format!("secret of {len} bytes, above {MAX_SECRET}")));
        }
        Ok(self.take(len)?.to_vec())
    }

    fn end(self) -> Result<(), RdmaError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(RdmaError::Violation("message body is longer than its kind's layout".into()))
        }
    }
}

/// Decodes one received message (the bytes a receive completion reported).
pub fn decode(bytes: &[u8]) -> Result<Received, RdmaError> {
    if bytes.len() < HEADER_LEN {
        return Err(RdmaError::Violation(format!("message of {} bytes, below the header's {HEADER_LEN}", bytes.len())));
    }
    let kind = bytes[0];
    let flags = bytes[1];
    let credits = u16::from_le_bytes([bytes[2], bytes[3]]);
    let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    let seq = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let body = &bytes[HEADER_LEN..];
    if body.len() != len {
        return Err(RdmaError::Violation(format!("header says {len} body bytes, {} arrived", body.len())));
    }
    if flags & !FLAG_LAST != 0 || (flags != 0 && kind != 2) {
        return Err(RdmaError::Violation(format!("unknown flags {flags:#x} on kind {kind}")));
    }
    let mut r = Reader { bytes: body };
    let message = match kind {
        1 => Message::Hello(Hello {
            version: r.u32()?,
            recv_depth: r.u16()?,
            recv_buf: r.u32()?,
            max_frame: r.u32()?,
            region: RemoteRegion { addr: r.u64()?, len: r.u64()?, rkey: r.u32()? },
            slots: r.u16()?,
            slot_size: r.u32()?,
            get_chunk: r.u32()?,
            gets_in_flight: r.u16()?,
            session_id: r.u64()?,
            secret: r.secret()?,
        }),
        2 => {
            let body = r.take(len)?.to_vec();
            Message::Data { last: flags & FLAG_LAST != 0, body }
        }
        3 => Message::Credit,
        4 => Message::PutChunk { id: r.u64()?, total: r.u64()?, offset: r.u64()?, len: r.u32()?, slot: r.u16()? },
        5 => Message::SlotFree { slot: r.u16()?, code: r.u32()? },
        6 => Message::GetRequest { id: r.u64()?, offset: r.u64()?, len: r.u32()?, dest: r.u64()? },
        7 => Message::GetDone { id: r.u64()?, offset: r.u64()?, len: r.u32()? },
        8 => Message::GetFailed { id: r.u64()?, offset: r.u64()?, code: r.u32()? },
        9 => Message::Close { code: r.u32()? },
        other => return Err(RdmaError::Violation(format!("unknown message kind {other}"))),
    };
    r.end()?;
    Ok(Received { credits, seq, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn region() -> impl Strategy<Value = RemoteRegion> {
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(addr, len, rkey)| RemoteRegion { addr, len, rkey })
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u32>(),
                any::<u16>(),
                any::<u32>(),
                any::<u32>(),
                region(),
                any::<u16>(),
                any::<u32>(),
                (any::<u32>(), any::<u16>()),
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..=MAX_SECRET)
            )
                .prop_map(
                    |(version, recv_depth, recv_buf, max_frame, region, slots, slot_size, gets, session_id, secret)| {
                        Message::Hello(Hello {
                            version,
                            recv_depth,
                            recv_buf,
                            max_frame,
                            region,
                            slots,
                            slot_size,
                            get_chunk: gets.0,
                            gets_in_flight: gets.1,
                            session_id,
                            secret,
                        })
                    }
                ),
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(last, body)| Message::Data { last, body }),
            Just(Message::Credit),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>(), any::<u16>())
                .prop_map(|(id, total, offset, len, slot)| Message::PutChunk { id, total, offset, len, slot }),
            (any::<u16>(), any::<u32>()).prop_map(|(slot, code)| Message::SlotFree { slot, code }),
            (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>())
                .prop_map(|(id, offset, len, dest)| Message::GetRequest { id, offset, len, dest }),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(id, offset, len)| Message::GetDone {
                id,
                offset,
                len
            }),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(id, offset, code)| Message::GetFailed {
                id,
                offset,
                code
            }),
            any::<u32>().prop_map(|code| Message::Close { code }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(m in message(), credits in any::<u16>(), seq in any::<u64>()) {
            let bytes = m.encode(credits, seq);
            prop_assert_eq!(decode(&bytes).unwrap(), Received { credits, seq, message: m });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn a_truncated_message_is_refused(m in message(), cut in 1usize..16) {
            let bytes = m.encode(0, 0);
            let keep = bytes.len().saturating_sub(cut);
            prop_assert!(decode(&bytes[..keep]).is_err());
        }
    }

    #[test]
    fn a_longer_body_than_the_layout_is_refused() {
        let mut bytes = Message::SlotFree { slot: 1, code: 0 }.encode(0, 0);
        bytes.push(0);
        bytes[4] = 7;
        assert!(matches!(decode(&bytes), Err(RdmaError::Violation(m)) if m.contains("longer")));
    }

    #[test]
    fn flags_on_other_kinds_are_refused() {
        let mut bytes = Message::Credit.encode(0, 0);
        bytes[1] = FLAG_LAST;
        assert!(decode(&bytes).is_err());
    }
}
