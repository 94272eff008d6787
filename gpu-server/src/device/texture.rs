//! CUDA arrays, the copies that touch them, and texture and surface
//! objects, as the backends see them: checked descriptions with the
//! enumerated values kept as numbers (the driver checks those it has).

use crate::error::CallError;

pub use gpupool_proto::texture_abi::{
    ARRAY_CUBEMAP, ARRAY_FLAGS, ARRAY_LAYERED, ARRAY_SURFACE_LDST, ArrayDesc, MAX_LEVELS, ResourceViewDesc as ViewDesc,
    ShapeError, TextureDesc, channel_bytes,
};

impl From<ShapeError> for CallError {
    fn from(e: ShapeError) -> Self {
        match e {
            ShapeError::NotOffered(m) => CallError::not_supported(format!("array: {m}")),
            ShapeError::Invalid(m) => CallError::invalid_value(format!("array: {m}")),
        }
    }
}

/// One end of a 3D copy on the device side (`A`: the backend's array,
/// shared).
#[derive(Debug)]
pub enum Place<A> {
    /// `x` in bytes, `y` in rows, `z` in slices.
    Array { array: A, x: u64, y: u64, z: u64 },
    /// Rows `pitch` bytes apart, slices `pitch * height` apart.
    Device { addr: u64, pitch: u64, height: u64 },
}

/// A copy's extent: `width` bytes by `height` rows by `depth` slices, each
/// at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub width: u64,
    pub height: u64,
    pub depth: u64,
}

impl Extent {
    /// Bytes of the extent packed.
    pub fn bytes(&self) -> Option<u64> {
        self.width.checked_mul(self.height)?.checked_mul(self.depth)
    }
}

/// What a texture object reads.
#[derive(Debug)]
pub enum Resource<A> {
    Array(A),
    Mipmapped(A),
    Linear { addr: u64, format: u32, channels: u32, size: u64 },
    Pitch2d { addr: u64, format: u32, channels: u32, width: u64, height: u64, pitch: u64 },
}
