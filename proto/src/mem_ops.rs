//! Stream memory operations (`cuStreamWaitValue*`, `cuStreamWriteValue*`,
//! `cuStreamBatchMemOp`): the wire form checked by CUDA's rules into
//! [`MemOp`]s, by the client (so a bad request fails at its call, as
//! natively) and again by the server, whose backends run them in order on
//! a stream.

use crate::v1;

/// CUDA's bound on one `cuStreamBatchMemOp`.
pub const MAX_MEM_OPS: usize = 256;

/// `CUstreamBatchMemOpType`.
pub const WAIT_32: u32 = 1;
pub const WRITE_32: u32 = 2;
pub const FLUSH_REMOTE_WRITES: u32 = 3;
pub const WAIT_64: u32 = 4;
pub const WRITE_64: u32 = 5;
pub const BARRIER: u32 = 6;

/// Bytes of the word an operation of type `kind` waits on or writes; `None`
/// for flushes, barriers and unknown types.
pub fn word_size(kind: u32) -> Option<u64> {
    match kind {
        WAIT_32 | WRITE_32 => Some(4),
        WAIT_64 | WRITE_64 => Some(8),
        _ => None,
    }
}

/// `CU_STREAM_WAIT_VALUE_FLUSH`: may be or-ed into a wait's condition.
pub const WAIT_FLUSH: u32 = 1 << 30;

/// What a wait waits for (`CUstreamWaitValue_flags` without the flush bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// `(int32)(*addr - value) >= 0` (wrapping comparison, as CUDA's).
    Geq = 0,
    Eq = 1,
    /// `(*addr & value) != 0`.
    And = 2,
    /// `~(*addr | value) != 0`.
    Nor = 3,
}

impl Condition {
    fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Geq,
            1 => Self::Eq,
            2 => Self::And,
            3 => Self::Nor,
            _ => return None,
        })
    }

    /// Whether a word holding `current` ends a wait for `value`; `wide`:
    /// 64-bit words.
    pub fn holds(self, current: u64, value: u64, wide: bool) -> bool {
        let mask = if wide { u64::MAX } else { u64::from(u32::MAX) };
        let (current, value) = (current & mask, value & mask);
        match self {
            Self::Geq if wide => (current.wrapping_sub(value) as i64) >= 0,
            Self::Geq => (current.wrapping_sub(value) as u32 as i32) >= 0,
            Self::Eq => current == value,
            Self::And => current & value != 0,
            Self::Nor => !(current | value) & mask != 0,
        }
    }
}

/// One checked stream memory operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemOp {
    Wait {
        address: u64,
        value: u64,
        /// 64-bit word (else 32-bit).
        wide: bool,
        condition: Condition,
        /// `CU_STREAM_WAIT_VALUE_FLUSH`.
        flush: bool,
    },
    Write {
        address: u64,
        value: u64,
        wide: bool,
    },
    FlushRemoteWrites,
    /// A memory barrier of GPU scope (else system scope).
    Barrier {
        gpu_scope: bool,
    },
}

impl MemOp {
    /// The word a wait reads or a write stores: address and size.
    pub fn word(&self) -> Option<(u64, u64)> {
        match *self {
            MemOp::Wait { address, wide, .. } | MemOp::Write { address, wide, .. } => {
                Some((address, if wide { 8 } else { 4 }))
            }
            MemOp::FlushRemoteWrites | MemOp::Barrier { .. } => None,
        }
    }

    /// Checks one operation from the wire by CUDA's rules: a known type,
    /// known flags, an address aligned to its word, a 32-bit operation's
    /// value in 32 bits. Whether the word is the session's is checked by
    /// the caller.
    pub fn parse(op: &v1::StreamMemOp) -> Result<Self, String> {
        let word = word_size(op.kind);
        let wide = word == Some(8);
        if let Some(size) = word {
            if !op.address.is_multiple_of(size) {
                return Err(format!(
                    "stream memory operation at {:#x}: not aligned to its {size}-byte word",
                    op.address
                ));
            }
            if !wide && op.value > u64::from(u32::MAX) {
                return Err("a 32-bit stream memory operation's value exceeds 32 bits".into());
            }
        }
        let flags = op.flags;
        let bad_flags = || format!("stream memory operation {}: flags {flags:#x}", op.kind);
        Ok(match op.kind {
            WAIT_32 | WAIT_64 => MemOp::Wait {
                address: op.address,
                value: op.value,
                wide,
                condition: Condition::from_raw(flags & !WAIT_FLUSH).ok_or_else(bad_flags)?,
                flush: flags & WAIT_FLUSH != 0,
            },
            // CUDA's v2 operations refuse CU_STREAM_WRITE_VALUE_NO_MEMORY_BARRIER
            // (the driver on an H100 answers CUDA_ERROR_INVALID_VALUE).
            WRITE_32 | WRITE_64 if flags == 0 => MemOp::Write { address: op.address, value: op.value, wide },
            FLUSH_REMOTE_WRITES if flags == 0 => MemOp::FlushRemoteWrites,
            BARRIER if flags <= 1 => MemOp::Barrier { gpu_scope: flags == 1 },
            WRITE_32 | WRITE_64 | FLUSH_REMOTE_WRITES | BARRIER => return Err(bad_flags()),
            other => {
                return Err(format!("unknown stream memory operation type {other}"));
            }
        })
    }

    /// Checks a batch: 1 to [`MAX_MEM_OPS`] operations.
    pub fn parse_all(ops: &[v1::StreamMemOp]) -> Result<Vec<Self>, String> {
        if ops.is_empty() || ops.len() > MAX_MEM_OPS {
            return Err(format!("{} stream memory operations in one batch (1 to {MAX_MEM_OPS})", ops.len()));
        }
        ops.iter().map(Self::parse).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: u32, address: u64, value: u64, flags: u32) -> v1::StreamMemOp {
        v1::StreamMemOp { kind, address, value, flags }
    }

    #[test]
    fn operations_are_checked_by_cuda_rules() {
        let wait = MemOp::parse(&op(WAIT_32, 0x1000, 7, 1 | WAIT_FLUSH)).expect("wait");
        assert_eq!(wait, MemOp::Wait { address: 0x1000, value: 7, wide: false, condition: Condition::Eq, flush: true });
        assert_eq!(wait.word(), Some((0x1000, 4)));
        let write = MemOp::parse(&op(WRITE_64, 0x1008, u64::MAX, 0)).expect("write");
        assert_eq!(write, MemOp::Write { address: 0x1008, value: u64::MAX, wide: true });
        assert_eq!(write.word(), Some((0x1008, 8)));
        assert_eq!(MemOp::parse(&op(BARRIER, 0, 0, 1)), Ok(MemOp::Barrier { gpu_scope: true }));
        assert_eq!(MemOp::parse(&op(FLUSH_REMOTE_WRITES, 0, 0, 0)), Ok(MemOp::FlushRemoteWrites));
        for bad in [
            op(WAIT_32, 0x1002, 0, 0),        // unaligned
            op(WAIT_64, 0x1004, 0, 0),        // unaligned for 64 bits
            op(WRITE_32, 0x1000, 1 << 32, 0), // value past 32 bits
            op(WAIT_32, 0x1000, 0, 4),        // unknown condition
            op(WRITE_32, 0x1000, 0, 2),       // unknown write flag
            op(BARRIER, 0, 0, 2),             // unknown scope
            op(FLUSH_REMOTE_WRITES, 0, 0, 1), // no flags
            op(0, 0x1000, 0, 0),              // unknown type
            op(7, 0x1000, 0, 0),              // unknown type
        ] {
            assert!(MemOp::parse(&bad).is_err(), "{bad:?}");
        }
        assert!(MemOp::parse_all(&[]).is_err(), "empty batch");
        assert!(MemOp::parse_all(&vec![op(BARRIER, 0, 0, 0); MAX_MEM_OPS + 1]).is_err(), "too many");
        assert_eq!(MemOp::parse_all(&vec![op(BARRIER, 0, 0, 0); MAX_MEM_OPS]).map(|v| v.len()), Ok(MAX_MEM_OPS));
    }

    #[test]
    fn conditions_compare_as_cuda_does() {
        use Condition::*;
        assert!(Geq.holds(5, 5, false) && Geq.holds(6, 5, false) && !Geq.holds(4, 5, false));
        // Wrapping: a counter that passed the 32-bit boundary is still ahead.
        assert!(Geq.holds(1, u64::from(u32::MAX), false));
        assert!(Geq.holds(1, u64::MAX, true) && !Geq.holds(u64::MAX, 1, true));
        assert!(Eq.holds(9, 9, true) && !Eq.holds(9, 8, true));
        // Only the low 32 bits of a 32-bit word count.
        assert!(Eq.holds(9 | 1 << 40, 9, false));
        assert!(And.holds(0b110, 0b010, false) && !And.holds(0b100, 0b010, false));
        assert!(Nor.holds(0b0, 0b1, false) && !Nor.holds(u64::from(u32::MAX), 0, false));
        assert!(!Nor.holds(u64::MAX, 0, true) && Nor.holds(0, 0, true));
    }
}
