//! The driver API's structures for arrays, 3D copies and texture and
//! surface objects, with every enumerated field a plain integer: the client
//! reads them from the application and the server hands them to the
//! driver, and neither may turn a value it does not know into an invalid
//! Rust enum. Layouts are those of `cuda.h` (64-bit); the client and server
//! assert their sizes against cudarc's bindings.

use crate::v1;
use std::ffi::c_void;

/// `CUDA_ARRAY3D_LAYERED`.
pub const ARRAY_LAYERED: u32 = 0x01;
/// `CUDA_ARRAY3D_SURFACE_LDST`.
pub const ARRAY_SURFACE_LDST: u32 = 0x02;
/// `CUDA_ARRAY3D_CUBEMAP`.
pub const ARRAY_CUBEMAP: u32 = 0x04;
/// `CUDA_ARRAY3D_TEXTURE_GATHER`.
pub const ARRAY_TEXTURE_GATHER: u32 = 0x08;
/// `CUDA_ARRAY3D_DEPTH_TEXTURE`, `CUDA_ARRAY3D_COLOR_ATTACHMENT`.
pub const ARRAY_DEPTH_TEXTURE: u32 = 0x10;
pub const ARRAY_COLOR_ATTACHMENT: u32 = 0x20;
/// The flags offered: sparse and deferred-mapping arrays are not.
pub const ARRAY_FLAGS: u32 = ARRAY_LAYERED
    | ARRAY_SURFACE_LDST
    | ARRAY_CUBEMAP
    | ARRAY_TEXTURE_GATHER
    | ARRAY_DEPTH_TEXTURE
    | ARRAY_COLOR_ATTACHMENT;

/// Most mipmap levels (a 2^31-wide array has 32).
pub const MAX_LEVELS: u32 = 32;

/// Bytes of one channel of a `CUarray_format`, for the formats offered:
/// the 8-, 16- and 32-bit integer formats, half and float.
pub fn channel_bytes(format: u32) -> Option<u64> {
    match format {
        0x01 | 0x08 => Some(1),        // UNSIGNED_INT8, SIGNED_INT8
        0x02 | 0x09 | 0x10 => Some(2), // UNSIGNED_INT16, SIGNED_INT16, HALF
        0x03 | 0x0a | 0x20 => Some(4), // UNSIGNED_INT32, SIGNED_INT32, FLOAT
        _ => None,
    }
}

/// An array's shape (`CUDA_ARRAY3D_DESCRIPTOR`): `height` 0 for 1D,
/// `depth` 0 for 1D and 2D, the layer count of layered arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArrayDesc {
    pub width: u64,
    pub height: u64,
    pub depth: u64,
    pub format: u32,
    pub channels: u32,
    pub flags: u32,
}

/// Why a shape is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    /// A format or flag gpupool does not offer.
    NotOffered(String),
    /// A shape CUDA does not allow.
    Invalid(String),
}

fn bad(what: String) -> ShapeError {
    ShapeError::Invalid(what)
}

impl ArrayDesc {
    /// Checks a description from the wire against what CUDA allows of an
    /// array's shape (the device's size limits are the driver's to check).
    pub fn checked(self) -> Result<Self, ShapeError> {
        if channel_bytes(self.format).is_none() {
            return Err(ShapeError::NotOffered(format!("format {:#x}", self.format)));
        }
        if !matches!(self.channels, 1 | 2 | 4) {
            return Err(bad(format!("{} channels (1, 2 or 4)", self.channels)));
        }
        if self.flags & !ARRAY_FLAGS != 0 {
            return Err(ShapeError::NotOffered(format!("flags {:#x}", self.flags)));
        }
        if self.width == 0 || (self.height == 0 && self.depth != 0) {
            return Err(bad(format!("shape {}x{}x{}", self.width, self.height, self.depth)));
        }
        if self.flags & ARRAY_CUBEMAP != 0 {
            let faces = self.depth.max(1);
            let square = self.width == self.height;
            let layered = self.flags & ARRAY_LAYERED != 0;
            if !square || (!layered && self.depth != 6) || (layered && !faces.is_multiple_of(6)) {
                return Err(bad(format!("cube map {}x{}x{}", self.width, self.height, self.depth)));
            }
        }
        if self.flags & ARRAY_LAYERED != 0 && self.depth == 0 {
            return Err(bad("a layered array needs a layer count".into()));
        }
        self.bytes().ok_or_else(|| bad("size overflows".into()))?;
        Ok(self)
    }

    /// Bytes of one element.
    pub fn element_bytes(&self) -> u64 {
        channel_bytes(self.format).unwrap_or(16) * u64::from(self.channels)
    }

    /// Width in bytes.
    pub fn row_bytes(&self) -> u64 {
        self.width.saturating_mul(self.element_bytes())
    }

    /// Rows of a slice (1 for a 1D array).
    pub fn rows(&self) -> u64 {
        self.height.max(1)
    }

    /// Slices or layers (1 for 1D and 2D arrays).
    pub fn slices(&self) -> u64 {
        self.depth.max(1)
    }

    /// Bytes of the array's elements (what the quota counts).
    pub fn bytes(&self) -> Option<u64> {
        self.width.checked_mul(self.element_bytes())?.checked_mul(self.rows())?.checked_mul(self.slices())
    }

    /// Level `level` of a mipmapped array of this shape: each extent
    /// halves, down to 1; layers stay.
    pub fn level(&self, level: u32) -> Self {
        let layered = self.flags & (ARRAY_LAYERED | ARRAY_CUBEMAP) != 0;
        let half = |v: u64| if v == 0 { 0 } else { (v >> level).max(1) };
        Self {
            width: half(self.width),
            height: half(self.height),
            depth: if layered { self.depth } else { half(self.depth) },
            ..*self
        }
    }

    /// How many levels a mipmapped array of this shape can have.
    pub fn max_levels(&self) -> u32 {
        let layered = self.flags & (ARRAY_LAYERED | ARRAY_CUBEMAP) != 0;
        let largest = self.width.max(self.height).max(if layered { 0 } else { self.depth });
        64 - largest.leading_zeros()
    }

    /// Bytes of `levels` levels (0: a plain array).
    pub fn bytes_with_levels(&self, levels: u32) -> Option<u64> {
        (0..levels.max(1)).try_fold(0u64, |sum, l| sum.checked_add(self.level(l).bytes()?))
    }
}

/// `CUDA_ARRAY3D_DESCRIPTOR`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Array3dDescriptor {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub format: u32,
    pub channels: u32,
    pub flags: u32,
}

/// `CUDA_ARRAY_DESCRIPTOR` (2D).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArrayDescriptor {
    pub width: usize,
    pub height: usize,
    pub format: u32,
    pub channels: u32,
}

/// `CUDA_MEMCPY3D`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Memcpy3d {
    pub src_x: usize,
    pub src_y: usize,
    pub src_z: usize,
    pub src_lod: usize,
    pub src_type: u32,
    pub src_host: *const c_void,
    pub src_device: u64,
    pub src_array: *mut c_void,
    pub reserved0: *mut c_void,
    pub src_pitch: usize,
    pub src_height: usize,
    pub dst_x: usize,
    pub dst_y: usize,
    pub dst_z: usize,
    pub dst_lod: usize,
    pub dst_type: u32,
    pub dst_host: *mut c_void,
    pub dst_device: u64,
    pub dst_array: *mut c_void,
    pub reserved1: *mut c_void,
    pub dst_pitch: usize,
    pub dst_height: usize,
    pub width: usize,
    pub height: usize,
    pub depth: usize,
}

impl Default for Memcpy3d {
    fn default() -> Self {
        Self {
            src_x: 0,
            src_y: 0,
            src_z: 0,
            src_lod: 0,
            src_type: 0,
            src_host: std::ptr::null(),
            src_device: 0,
            src_array: std::ptr::null_mut(),
            reserved0: std::ptr::null_mut(),
            src_pitch: 0,
            src_height: 0,
            dst_x: 0,
            dst_y: 0,
            dst_z: 0,
            dst_lod: 0,
            dst_type: 0,
            dst_host: std::ptr::null_mut(),
            dst_device: 0,
            dst_array: std::ptr::null_mut(),
            reserved1: std::ptr::null_mut(),
            dst_pitch: 0,
            dst_height: 0,
            width: 0,
            height: 0,
            depth: 0,
        }
    }
}

/// `CUmemorytype` values.
pub const MEMORY_HOST: u32 = 1;
pub const MEMORY_DEVICE: u32 = 2;
pub const MEMORY_ARRAY: u32 = 3;
pub const MEMORY_UNIFIED: u32 = 4;

/// `CUresourcetype` values.
pub const RESOURCE_ARRAY: u32 = 0;
pub const RESOURCE_MIPMAPPED_ARRAY: u32 = 1;
pub const RESOURCE_LINEAR: u32 = 2;
pub const RESOURCE_PITCH2D: u32 = 3;

/// `CUDA_RESOURCE_DESC`: the union as its largest member (pitch2D), whose
/// first word is the array handle of the array kinds.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ResourceDesc {
    pub kind: u32,
    /// `hArray`, `hMipmappedArray` or `devPtr`.
    pub handle: u64,
    pub format: u32,
    pub channels: u32,
    /// `sizeInBytes` (linear) or `width` (pitch2D).
    pub size_or_width: usize,
    pub height: usize,
    pub pitch: usize,
    /// The rest of the union's 128 bytes.
    pub reserved: [u8; 88],
    pub flags: u32,
}

impl Default for ResourceDesc {
    fn default() -> Self {
        Self {
            kind: 0,
            handle: 0,
            format: 0,
            channels: 0,
            size_or_width: 0,
            height: 0,
            pitch: 0,
            reserved: [0; 88],
            flags: 0,
        }
    }
}

/// `CUDA_TEXTURE_DESC`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TextureDesc {
    pub address_mode: [u32; 3],
    pub filter_mode: u32,
    pub flags: u32,
    pub max_anisotropy: u32,
    pub mipmap_filter_mode: u32,
    pub mipmap_level_bias: f32,
    pub min_mipmap_level_clamp: f32,
    pub max_mipmap_level_clamp: f32,
    pub border_color: [f32; 4],
    pub reserved: [i32; 12],
}

/// `CUDA_RESOURCE_VIEW_DESC`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceViewDesc {
    pub format: u32,
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub first_mipmap_level: u32,
    pub last_mipmap_level: u32,
    pub first_layer: u32,
    pub last_layer: u32,
    pub reserved: [u32; 16],
}

impl From<&ArrayDesc> for Array3dDescriptor {
    fn from(d: &ArrayDesc) -> Self {
        Self {
            width: d.width as usize,
            height: d.height as usize,
            depth: d.depth as usize,
            format: d.format,
            channels: d.channels,
            flags: d.flags,
        }
    }
}

impl From<&Array3dDescriptor> for ArrayDesc {
    fn from(d: &Array3dDescriptor) -> Self {
        Self {
            width: d.width as u64,
            height: d.height as u64,
            depth: d.depth as u64,
            format: d.format,
            channels: d.channels,
            flags: d.flags,
        }
    }
}

impl From<&TextureDesc> for v1::TextureDesc {
    fn from(t: &TextureDesc) -> Self {
        Self {
            address_mode: t.address_mode.to_vec(),
            filter_mode: t.filter_mode,
            flags: t.flags,
            max_anisotropy: t.max_anisotropy,
            mipmap_filter_mode: t.mipmap_filter_mode,
            mipmap_level_bias: t.mipmap_level_bias,
            min_mipmap_level_clamp: t.min_mipmap_level_clamp,
            max_mipmap_level_clamp: t.max_mipmap_level_clamp,
            border_color: t.border_color.to_vec(),
        }
    }
}

impl TryFrom<&v1::TextureDesc> for TextureDesc {
    type Error = String;

    /// Fails when the address modes are not 3 or the border colour not 4.
    fn try_from(t: &v1::TextureDesc) -> Result<Self, String> {
        Ok(Self {
            address_mode: t.address_mode[..]
                .try_into()
                .map_err(|_| format!("{} address modes, not 3", t.address_mode.len()))?,
            filter_mode: t.filter_mode,
            flags: t.flags,
            max_anisotropy: t.max_anisotropy,
            mipmap_filter_mode: t.mipmap_filter_mode,
            mipmap_level_bias: t.mipmap_level_bias,
            min_mipmap_level_clamp: t.min_mipmap_level_clamp,
            max_mipmap_level_clamp: t.max_mipmap_level_clamp,
            border_color: t.border_color[..]
                .try_into()
                .map_err(|_| format!("{} border colour components, not 4", t.border_color.len()))?,
            reserved: [0; 12],
        })
    }
}

impl From<&ResourceViewDesc> for v1::ResourceView {
    fn from(v: &ResourceViewDesc) -> Self {
        Self {
            format: v.format,
            width: v.width as u64,
            height: v.height as u64,
            depth: v.depth as u64,
            first_mipmap_level: v.first_mipmap_level,
            last_mipmap_level: v.last_mipmap_level,
            first_layer: v.first_layer,
            last_layer: v.last_layer,
        }
    }
}

impl From<&v1::ResourceView> for ResourceViewDesc {
    fn from(v: &v1::ResourceView) -> Self {
        Self {
            format: v.format,
            width: v.width as usize,
            height: v.height as usize,
            depth: v.depth as usize,
            first_mipmap_level: v.first_mipmap_level,
            last_mipmap_level: v.last_mipmap_level,
            first_layer: v.first_layer,
            last_layer: v.last_layer,
            reserved: [0; 16],
        }
    }
}

const _: () = {
    assert!(std::mem::size_of::<Array3dDescriptor>() == 40);
    assert!(std::mem::size_of::<ArrayDescriptor>() == 24);
    assert!(std::mem::size_of::<Memcpy3d>() == 200);
    assert!(std::mem::size_of::<ResourceDesc>() == 144);
    assert!(std::mem::size_of::<TextureDesc>() == 104);
    assert!(std::mem::size_of::<ResourceViewDesc>() == 112);
};

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(width: u64, height: u64, depth: u64, flags: u32) -> ArrayDesc {
        ArrayDesc { width, height, depth, format: 0x20, channels: 4, flags }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(desc(16, 0, 0, 0).checked().is_ok(), "1D");
        assert!(desc(16, 8, 0, 0).checked().is_ok(), "2D");
        assert!(desc(16, 8, 4, 0).checked().is_ok(), "3D");
        assert!(desc(16, 0, 4, 0).checked().is_err(), "depth without height");
        assert!(desc(0, 8, 0, 0).checked().is_err(), "no width");
        assert!(desc(16, 16, 6, ARRAY_CUBEMAP).checked().is_ok());
        assert!(desc(16, 8, 6, ARRAY_CUBEMAP).checked().is_err(), "faces are square");
        assert!(desc(16, 16, 12, ARRAY_CUBEMAP | ARRAY_LAYERED).checked().is_ok());
        assert!(desc(16, 16, 7, ARRAY_CUBEMAP | ARRAY_LAYERED).checked().is_err());
        assert!(desc(16, 8, 0, ARRAY_LAYERED).checked().is_err(), "layers counted");
        assert!(desc(16, 8, 0, 0x40).checked().is_err(), "sparse");
        assert!(ArrayDesc { format: 0x91, ..desc(16, 8, 0, 0) }.checked().is_err(), "block-compressed");
        assert!(ArrayDesc { channels: 3, ..desc(16, 8, 0, 0) }.checked().is_err());
        assert!(desc(u64::MAX, 2, 0, 0).checked().is_err(), "overflow");
    }

    #[test]
    fn levels_halve_down_to_one() {
        let d = desc(64, 16, 0, 0);
        assert_eq!(d.max_levels(), 7);
        assert_eq!(d.level(3), desc(8, 2, 0, 0));
        assert_eq!(d.level(6), desc(1, 1, 0, 0));
        assert_eq!(d.bytes_with_levels(0), Some(64 * 16 * 16));
        let sum: u64 = (0..7).map(|l| d.level(l).bytes().unwrap()).sum();
        assert_eq!(d.bytes_with_levels(7), Some(sum));
        let layered = desc(8, 8, 5, ARRAY_LAYERED);
        assert_eq!(layered.level(2).depth, 5, "layers stay");
        assert_eq!(layered.max_levels(), 4);
    }
}
