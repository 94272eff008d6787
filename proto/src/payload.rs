//! Bulk bytes on the wire, lz4-compressed when that pays.
//!
//! Compression is tried on a sample first, so incompressible data (weights,
//! random inputs) costs one small probe, not a full pass. Decoding checks the
//! announced size against the receiver's bound before allocating.

use crate::v1::{Codec, Payload};
use bytes::Bytes;

/// Below this size compression is never tried: the saving cannot pay for it.
pub const MIN_COMPRESS: usize = 4096;
/// Bytes compressed to decide whether the whole buffer is worth it.
const SAMPLE: usize = 64 * 1024;
/// Compress only when the sample shrinks to at most this share (in 1/16).
const WORTH_SIXTEENTHS: usize = 13;

/// When to compress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Never: send raw bytes.
    Off,
    /// When a sample shows it pays.
    Auto,
}

/// Payload decoding errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// The announced size exceeds what the receiver accepts.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
    /// lz4 data is corrupt or does not decode to `raw_len` bytes.
    #[error("corrupt lz4 payload: {0}")]
    Corrupt(String),
    /// A raw payload's length differs from `raw_len`.
    #[error("payload length {have} differs from the announced {want}")]
    LengthMismatch { have: u64, want: u64 },
    /// An unknown codec number.
    #[error("unknown payload codec {0}")]
    UnknownCodec(i32),
}

/// Wraps `data`, compressing it when `mode` allows and it pays.
pub fn encode(data: Bytes, mode: Compression) -> Payload {
    let raw_len = data.len() as u64;
    if mode == Compression::Auto && data.len() >= MIN_COMPRESS && worth_compressing(&data) {
        let packed = lz4_flex::block::compress(&data);
        if packed.len() < data.len() {
            return Payload { codec: Codec::Lz4 as i32, raw_len, data: Bytes::from(packed) };
        }
    }
    Payload { codec: Codec::Raw as i32, raw_len, data }
}

fn worth_compressing(data: &[u8]) -> bool {
    let sample = &data[..data.len().min(SAMPLE)];
    let packed = lz4_flex::block::compress(sample);
    packed.len() * 16 <= sample.len() * WORTH_SIXTEENTHS
}

/// The bytes of `payload`, refusing more than `max` bytes.
pub fn decode(payload: Payload, max: u64) -> Result<Bytes, PayloadError> {
    if payload.raw_len > max {
        return Err(PayloadError::TooLarge { len: payload.raw_len, max });
    }
    match Codec::try_from(payload.codec) {
        Ok(Codec::Raw) => {
            if payload.data.len() as u64 != payload.raw_len {
                return Err(PayloadError::LengthMismatch { have: payload.data.len() as u64, want: payload.raw_len });
            }
            Ok(payload.data)
        }
        Ok(Codec::Lz4) => {
            // The decompressor allocates `raw_len` up front; a size the data
            // cannot expand to is refused before that (issue 20, fuzzing).
            if payload.raw_len > max_lz4_output(payload.data.len()) {
                return Err(PayloadError::Corrupt(format!(
                    "{} bytes of lz4 cannot expand to {} bytes",
                    payload.data.len(),
                    payload.raw_len
                )));
            }
            let out = lz4_flex::block::decompress(&payload.data, payload.raw_len as usize)
                .map_err(|e| PayloadError::Corrupt(e.to_string()))?;
            if out.len() as u64 != payload.raw_len {
                return Err(PayloadError::LengthMismatch { have: out.len() as u64, want: payload.raw_len });
            }
            Ok(Bytes::from(out))
        }
        Err(_) => Err(PayloadError::UnknownCodec(payload.codec)),
    }
}

/// The most an lz4 block of `compressed` bytes decompresses to. Each
/// sequence costs at least 3 bytes (token, offset) and each further byte of
/// a match length adds at most 255 bytes of output, so no block expands by
/// more than 255 times.
fn max_lz4_output(compressed: usize) -> u64 {
    (compressed as u64).saturating_mul(255)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_data_is_compressed() {
        let data = Bytes::from(vec![7u8; 1 << 20]);
        let p = encode(data.clone(), Compression::Auto);
        assert_eq!(p.codec, Codec::Lz4 as i32);
        assert!(p.data.len() < data.len() / 10);
        assert_eq!(decode(p, 1 << 20).expect("decodes"), data);
    }

    #[test]
    fn the_most_compressible_data_stays_within_the_expansion_bound() {
        for len in [4096, 1 << 16, 1 << 24] {
            let data = Bytes::from(vec![0u8; len]);
            let p = encode(data.clone(), Compression::Auto);
            assert!(p.raw_len <= max_lz4_output(p.data.len()), "{len} bytes compressed to {}", p.data.len());
            assert_eq!(decode(p, 1 << 24).expect("decodes"), data);
        }
    }

    #[test]
    fn random_data_stays_raw() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..1 << 18)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let p = encode(Bytes::from(data), Compression::Auto);
        assert_eq!(p.codec, Codec::Raw as i32);
    }

    #[test]
    fn oversize_refused() {
        let p = Payload { codec: Codec::Lz4 as i32, raw_len: 1 << 40, data: Bytes::from_static(&[0]) };
        assert_eq!(decode(p, 1 << 20), Err(PayloadError::TooLarge { len: 1 << 40, max: 1 << 20 }));
    }

    proptest! {
        #[test]
        fn decode_never_panics(codec in 0i32..3, raw_len in 0u64..100_000, data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(Payload { codec, raw_len, data: Bytes::from(data) }, 1 << 16);
        }

        #[test]
        fn round_trip(data in proptest::collection::vec(0u8..4, 0..20_000)) {
            let b = Bytes::from(data);
            prop_assert_eq!(decode(encode(b.clone(), Compression::Auto), 1 << 20).expect("decodes"), b);
        }
    }
}
