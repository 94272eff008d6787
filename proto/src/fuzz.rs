//! Helpers of the fuzz targets (`docs/fuzzing.md`), shared by the crates
//! that fuzz their decoders: a bounded case count, and edits that turn a
//! valid encoding into the inputs decoders get wrong most often. Compiled
//! only with the `fuzzing` feature, which the crates' dev-dependencies turn
//! on.

use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per target: `default` keeps CI within a few seconds per target;
/// `GPUPOOL_FUZZ_CASES` runs longer.
pub fn config(default: u32) -> Config {
    let cases = std::env::var("GPUPOOL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// Edits for [`mutate`]: (kind, position, byte).
pub fn mutations() -> impl Strategy<Value = Vec<(u8, usize, u8)>> {
    proptest::collection::vec((0u8..6, any::<usize>(), any::<u8>()), 0..8)
}

/// `b` with `edits` applied: flipped, inserted, removed bytes, a cut, a
/// varint at its largest, a length-delimited field claiming 4 GiB.
pub fn mutate(mut b: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(kind, at, byte) in edits {
        let at = if b.is_empty() { 0 } else { at % (b.len() + 1) };
        match kind {
            0 if at < b.len() => b[at] ^= byte | 1,
            1 => b.insert(at, byte),
            2 if at < b.len() => {
                b.remove(at);
            }
            3 => b.truncate(at),
            4 => {
                b.splice(at..at, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
            }
            // Field `byte >> 3`, wire type 2.
            _ => {
                b.splice(at..at, [(byte & 0xf8) | 2, 0xff, 0xff, 0xff, 0xff, 0x0f]);
            }
        }
    }
    b
}
