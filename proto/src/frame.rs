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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1;
    use proptest::prelude::*;

    #[test]
    fn round_trip_split_anywhere() {
        let msg = v1::Hello { protocol_version: 1, client_build: "x".into(), token: "t".into(), resume: None };
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
