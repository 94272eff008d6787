//! Frames: a 4-byte little-endian length, then one protobuf message.
//!
//! [`FrameDecoder`] is fed bytes as they arrive and yields whole frames; the
//! length is checked against a bound before any buffer is grown for it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Framing errors. The connection's stream cannot be read further after one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length exceeds the receiver's bound.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
}

/// Encodes `msg` as one frame.
pub fn encode<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u32_le(len as u32);
    // Encoding into a buffer reserved for `encoded_len` bytes cannot fail.
    msg.encode_raw(&mut buf);
    buf.freeze()
}

/// Reads the length prefix of a frame and checks it against `max`.
pub fn decode_header(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Incremental frame decoder: `push` bytes in, `next_frame` frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { buf: BytesMut::new(), max }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame's body, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.buf[..HEADER_LEN]);
        let len = decode_header(header, self.max)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(HEADER_LEN);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Call when the stream has ended: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = if self.buf.len() >= HEADER_LEN {
            let mut header = [0u8; HEADER_LEN];
            header.copy_from_slice(&self.buf[..HEADER_LEN]);
            HEADER_LEN + u32::from_le_bytes(header) as usize
        } else {
            HEADER_LEN
        };
        Err(FrameError::Truncated { have: self.buf.len(), want })
    }
}

/// The frame of a `BulkRequest` putting `put` (its `data` unset) with
/// `payload`, in two parts whose concatenation is `encode` of the whole:
/// the second is `payload.data` itself, so a bulk chunk is sent without
/// being copied into a frame first.
pub fn bulk_put_frame(put: &crate::v1::BulkPut, payload: &crate::v1::Payload) -> [Bytes; 2] {
    let fields = crate::v1::BulkPut { data: None, ..put.clone() }.encode_to_vec();
    split_frame(&fields, 4, payload, &[1])
}

/// The frame of a `BulkResponse` with `error` and `payload`, in two parts
/// as [`bulk_put_frame`]'s.
pub fn bulk_response_frame(error: Option<crate::v1::CallError>, payload: &crate::v1::Payload) -> [Bytes; 2] {
    let fields = crate::v1::BulkResponse { error, data: None }.encode_to_vec();
    split_frame(&fields, 2, payload, &[])
}

/// Bytes of a stream's start that [`bulk_response_data`] needs: more than
/// the frame header and every field before the data can take.
pub const BULK_RESPONSE_HEAD: usize = 64;

/// Where the data of a bulk response lies in its stream, from the
/// stream's first bytes (`head`, at least [`BULK_RESPONSE_HEAD`] of them or
/// the whole stream) and its length (`stream_len`): the range of an
/// uncompressed payload's data that ends the frame, as
/// [`bulk_response_frame`] writes it, so a reader can copy it from the
/// chunks it received straight to where it goes. `None` for any other
/// response (an error, compressed or empty data, fields in another order,
/// a length that does not add up): decode the frame whole instead.
pub fn bulk_response_data(head: &[u8], stream_len: usize) -> Option<std::ops::Range<usize>> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    let len = u32::from_le_bytes(head.get(..HEADER_LEN)?.try_into().ok()?) as usize;
    if HEADER_LEN.checked_add(len)? != stream_len {
        return None;
    }
    let mut buf = &head[HEADER_LEN..];
    let at = |buf: &[u8]| head.len() - buf.len();
    // BulkResponse: only `data` (2), ending the frame.
    let (field, wire) = decode_key(&mut buf).ok()?;
    if field != 2 || wire != WireType::LengthDelimited {
        return None;
    }
    let payload_len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
    if at(buf).checked_add(payload_len)? != stream_len {
        return None;
    }
    // Payload: a raw codec and a length, then `data` (3) to the end.
    loop {
        let (field, wire) = decode_key(&mut buf).ok()?;
        match (field, wire) {
            (1, WireType::Varint) if decode_varint(&mut buf).ok()? == 0 => {}
            (2, WireType::Varint) => {
                decode_varint(&mut buf).ok()?;
            }
            (3, WireType::LengthDelimited) => {
                let data_len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                let start = at(buf);
                return (start.checked_add(data_len)? == stream_len && data_len > 0).then_some(start..stream_len);
            }
            _ => return None,
        }
    }
}

/// A message made of `fields` (encoded) then `payload` as field `field`,
/// nested in one-field messages `outer` (innermost first): its frame up to
/// the payload's data, and the data.
fn split_frame(fields: &[u8], field: u32, payload: &crate::v1::Payload, outer: &[u32]) -> [Bytes; 2] {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let data = payload.data.clone();
    let head = crate::v1::Payload { data: Bytes::new(), ..payload.clone() }.encode_to_vec();
    let data_len = data.len() as u64;
    let data_field = if data.is_empty() { 0 } else { key_len(3) + encoded_len_varint(data_len) };
    let payload_len = (head.len() + data_field + data.len()) as u64;
    let mut lens = vec![(fields.len() + key_len(field) + encoded_len_varint(payload_len)) as u64 + payload_len];
    for &f in outer {
        let inner = lens[lens.len() - 1];
        lens.push((key_len(f) + encoded_len_varint(inner)) as u64 + inner);
    }
    let total = lens[lens.len() - 1];
    let mut buf = BytesMut::with_capacity(HEADER_LEN + (total - data_len) as usize);
    buf.put_u32_le(total as u32);
    for (i, &f) in outer.iter().enumerate().rev() {
        encode_key(f, WireType::LengthDelimited, &mut buf);
        encode_varint(lens[i], &mut buf);
    }
    buf.put_slice(fields);
    encode_key(field, WireType::LengthDelimited, &mut buf);
    encode_varint(payload_len, &mut buf);
    buf.put_slice(&head);
    if !data.is_empty() {
        encode_key(3, WireType::LengthDelimited, &mut buf);
        encode_varint(data_len, &mut buf);
    }
    [buf.freeze(), data]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_bulk_frames_are_the_whole_encoding() {
        use crate::v1;
        for (codec, len) in [(0, 0), (0, 1), (0, 300), (1, 70_000), (0, 4 << 20)] {
            let payload = v1::Payload { codec, raw_len: len as u64 * 2, data: Bytes::from(vec![7u8; len]) };
            let put = v1::BulkPut { transfer_id: 9, total_size: 1 << 40, offset: 4 << 20, data: None };
            let whole = encode(&v1::BulkRequest {
                op: Some(v1::bulk_request::Op::Put(v1::BulkPut { data: Some(payload.clone()), ..put.clone() })),
            });
            assert_eq!(bulk_put_frame(&put, &payload).concat(), whole.to_vec(), "put of {len}");
            let error = (len == 1).then(|| v1::CallError { index: 0, code: 1, message: "x".into() });
            let whole = encode(&v1::BulkResponse { error: error.clone(), data: Some(payload.clone()) });
            assert_eq!(bulk_response_frame(error, &payload).concat(), whole.to_vec(), "response of {len}");
        }
    }

    #[test]
    fn bulk_response_data_is_found_where_the_split_frame_put_it() {
        use crate::v1;
        for len in [1usize, 127, 128, 300, 70_000, 4 << 20] {
            let data = Bytes::from((0..len).map(|i| i as u8).collect::<Vec<_>>());
            let payload = v1::Payload { codec: 0, raw_len: len as u64, data: data.clone() };
            let stream = bulk_response_frame(None, &payload).concat();
            let head = &stream[..stream.len().min(BULK_RESPONSE_HEAD)];
            let range = bulk_response_data(head, stream.len()).expect("found");
            assert_eq!(&stream[range], &data[..], "{len} bytes");
            // Too short a stream, or a longer one: not this frame.
            assert_eq!(bulk_response_data(head, stream.len() + 1), None);
        }
        // Compressed, empty, an error: decoded whole.
        let lz4 = v1::Payload { codec: 1, raw_len: 10, data: Bytes::from_static(b"xyz") };
        let stream = bulk_response_frame(None, &lz4).concat();
        assert_eq!(bulk_response_data(&stream, stream.len()), None);
        let empty = encode(&v1::BulkResponse::default());
        assert_eq!(bulk_response_data(&empty, empty.len()), None);
        let error = v1::CallError { index: 0, code: 1, message: "x".into() };
        let raw = v1::Payload { codec: 0, raw_len: 3, data: Bytes::from_static(b"abc") };
        let stream = bulk_response_frame(Some(error), &raw).concat();
        assert_eq!(bulk_response_data(&stream, stream.len()), None);
    }
    use crate::v1;
    use proptest::prelude::*;

    #[test]
    fn round_trip_split_anywhere() {
        let msg = v1::Hello {
            protocol_version: 1,
            client_build: "x".into(),
            token: "t".into(),
            resume: None,
            bulk: None,
            migrate: None,
            rdma: None,
        };
        let bytes = encode(&msg);
        for cut in 0..=bytes.len() {
            let mut dec = FrameDecoder::new(1024);
            dec.push(&bytes[..cut]);
            let first = dec.next_frame().expect("valid");
            dec.push(&bytes[cut..]);
            let body = first.or_else(|| dec.next_frame().expect("valid")).expect("whole frame");
            assert_eq!(v1::Hello::decode(body).expect("decodes"), msg);
        }
    }

    #[test]
    fn oversize_refused_before_buffering() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&100u32.to_le_bytes());
        assert_eq!(dec.next_frame(), Err(FrameError::TooLarge { len: 100, max: 16 }));
    }

    #[test]
    fn truncated_reported() {
        let mut dec = FrameDecoder::new(16);
        dec.push(&[8, 0, 0, 0, 1, 2]);
        assert_eq!(dec.next_frame(), Ok(None));
        assert_eq!(dec.finish(), Err(FrameError::Truncated { have: 6, want: 12 }));
    }

    proptest! {
        // Any head is read without a panic, and a range found lies in the stream.
        #[test]
        fn bulk_response_data_total(head in proptest::collection::vec(any::<u8>(), 0..80), extra in 0usize..1000) {
            let stream_len = head.len() + extra;
            if let Some(r) = bulk_response_data(&head, stream_len) {
                prop_assert!(r.start <= r.end && r.end == stream_len);
            }
        }
    }

    proptest! {
        // Arbitrary bytes never panic the decoder, and every frame it yields
        // lies within the bound.
        #[test]
        fn decoder_total(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut dec = FrameDecoder::new(64);
            dec.push(&data);
            while let Ok(Some(f)) = dec.next_frame() {
                prop_assert!(f.len() <= 64);
                let _ = v1::Batch::decode(f);
            }
            let _ = dec.finish();
        }
    }
}
