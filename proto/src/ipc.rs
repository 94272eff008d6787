//! CUDA IPC handles as gpupool makes them (docs/ipc.md).
//!
//! A program passes a `CUipcEventHandle` or `CUipcMemHandle` (64 opaque
//! bytes) from one process to another; through gpupool those bytes name an
//! export kept by the server, never the driver's own handle. Layout:
//! a magic, the kind, a 16-byte random export id, and for memory the
//! export's size and the pointer's offset in it; the rest is zero.

/// Bytes of a CUDA IPC handle (`CU_IPC_HANDLE_SIZE`).
pub const HANDLE_BYTES: usize = 64;

/// Bytes of an export's id.
pub const ID_BYTES: usize = 16;

const MAGIC: &[u8; 7] = b"gpupool";

/// What a handle names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event = 1,
    Memory = 2,
}

/// A parsed handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    pub kind: Kind,
    pub id: [u8; ID_BYTES],
    /// Memory: the export's size in bytes (0 for an event).
    pub size: u64,
    /// Memory: the exported pointer's offset in the export (0 for an event).
    pub offset: u64,
}

impl Handle {
    /// An event's handle.
    pub fn event(id: [u8; ID_BYTES]) -> Self {
        Self { kind: Kind::Event, id, size: 0, offset: 0 }
    }

    pub fn encode(&self) -> [u8; HANDLE_BYTES] {
        let mut b = [0u8; HANDLE_BYTES];
        b[..7].copy_from_slice(MAGIC);
        b[7] = self.kind as u8;
        b[8..24].copy_from_slice(&self.id);
        b[24..32].copy_from_slice(&self.size.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Parses a handle a program passed; `Err` names what is wrong (the
    /// driver answers such a handle with `CUDA_ERROR_INVALID_VALUE`).
    pub fn parse(b: &[u8]) -> Result<Self, &'static str> {
        let b: &[u8; HANDLE_BYTES] = b.try_into().map_err(|_| "an IPC handle is 64 bytes")?;
        if &b[..7] != MAGIC {
            return Err("not an IPC handle made by gpupool");
        }
        let kind = match b[7] {
            1 => Kind::Event,
            2 => Kind::Memory,
            _ => return Err("unknown IPC handle kind"),
        };
        if b[40..].iter().any(|&x| x != 0) {
            return Err("not an IPC handle made by gpupool");
        }
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let (size, offset) = (word(24), word(32));
        let valid = match kind {
            Kind::Event => size == 0 && offset == 0,
            Kind::Memory => size > 0 && offset < size,
        };
        if !valid {
            return Err("IPC handle with an inconsistent size or offset");
        }
        let id = b[8..24].try_into().expect("16 bytes");
        Ok(Self { kind, id, size, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_garbage_is_refused() {
        let h = Handle::event([7; ID_BYTES]);
        assert_eq!(Handle::parse(&h.encode()), Ok(h));
        let m = Handle { kind: Kind::Memory, id: [1; ID_BYTES], size: 1 << 21, offset: 4096 };
        assert_eq!(Handle::parse(&m.encode()), Ok(m));

        assert!(Handle::parse(&[0; 63]).is_err());
        assert!(Handle::parse(&[0; HANDLE_BYTES]).is_err());
        let mut b = h.encode();
        b[7] = 9;
        assert!(Handle::parse(&b).is_err(), "unknown kind");
        let mut b = h.encode();
        b[63] = 1;
        assert!(Handle::parse(&b).is_err(), "trailing bytes");
        let mut b = h.encode();
        b[24] = 1;
        assert!(Handle::parse(&b).is_err(), "an event has no size");
        let past = Handle { offset: 1 << 21, ..m };
        assert!(Handle::parse(&past.encode()).is_err(), "offset past the size");
    }
}
