//! TMA descriptors: `cuTensorMapEncodeTiled`, `cuTensorMapEncodeIm2col`
//! and `cuTensorMapReplaceAddress`. The 128-byte `CUtensorMap` is in the
//! driver's own format, so the server's driver encodes it (one round trip);
//! the address in it is a real device address of the session, and kernels
//! (cuDNN's and CUTLASS's Hopper kernels, Triton's) take it as a parameter
//! unchanged.

use crate::abi::{CuError, CuResult};
use crate::runtime::Runtime;
use cudarc::driver::sys::CUtensorMap;
use gpupool_proto::v1::{self, TensorMapKind};
use std::ffi::{c_int, c_uint, c_void};

/// The driver's largest tensor rank.
const MAX_RANK: usize = 5;

/// `n` elements at `p`, or INVALID_VALUE for a null pointer.
///
/// # Safety
/// `p` is null or points to `n` readable elements.
unsafe fn array<T: Copy>(p: *const T, n: usize) -> CuResult<Vec<T>> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: `n` readable elements (contract above).
    Ok(unsafe { std::slice::from_raw_parts(p, n) }.to_vec())
}

fn rank_of(rank: c_uint) -> CuResult<usize> {
    let r = rank as usize;
    if (1..=MAX_RANK).contains(&r) { Ok(r) } else { Err(CuError::INVALID_VALUE) }
}

fn encode(out: *mut CUtensorMap, request: v1::TensorMapEncode) -> CuResult {
    if out.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let rt = Runtime::get()?;
    let map = rt.session.tensor_map(request)?;
    // SAFETY: non-null, a CUtensorMap (128 bytes) per the CUDA API.
    unsafe { out.cast::<[u8; 128]>().write_unaligned(map) };
    Ok(())
}

crate::exports! {
    fn cuTensorMapEncodeTiled(
        map: *mut CUtensorMap, data_type: c_uint, rank: c_uint, address: *mut c_void,
        global_dim: *const u64, global_strides: *const u64, box_dim: *const u32,
        element_strides: *const u32, interleave: c_uint, swizzle: c_uint, l2: c_uint, oob: c_uint,
    ) {
        let r = rank_of(rank)?;
        // SAFETY: arrays of the lengths the rank gives (the CUDA API).
        let request = unsafe {
            v1::TensorMapEncode {
                kind: TensorMapKind::Tiled as i32,
                data_type,
                rank,
                global_address: address as u64,
                global_dim: array(global_dim, r)?,
                global_strides: if r > 1 { array(global_strides, r - 1)? } else { Vec::new() },
                box_dim: array(box_dim, r)?,
                element_strides: array(element_strides, r)?,
                interleave,
                swizzle,
                l2_promotion: l2,
                oob_fill: oob,
                ..Default::default()
            }
        };
        encode(map, request)
    }

    fn cuTensorMapEncodeIm2col(
        map: *mut CUtensorMap, data_type: c_uint, rank: c_uint, address: *mut c_void,
        global_dim: *const u64, global_strides: *const u64, lower: *const c_int, upper: *const c_int,
        channels_per_pixel: c_uint, pixels_per_column: c_uint, element_strides: *const u32,
        interleave: c_uint, swizzle: c_uint, l2: c_uint, oob: c_uint,
    ) {
        let r = rank_of(rank)?;
        if r < 3 {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: arrays of the lengths the rank gives (the CUDA API).
        let request = unsafe {
            v1::TensorMapEncode {
                kind: TensorMapKind::Im2col as i32,
                data_type,
                rank,
                global_address: address as u64,
                global_dim: array(global_dim, r)?,
                global_strides: array(global_strides, r - 1)?,
                lower_corner: array(lower, r - 2)?,
                upper_corner: array(upper, r - 2)?,
                channels_per_pixel,
                pixels_per_column,
                element_strides: array(element_strides, r)?,
                interleave,
                swizzle,
                l2_promotion: l2,
                oob_fill: oob,
                ..Default::default()
            }
        };
        encode(map, request)
    }

    fn cuTensorMapReplaceAddress(map: *mut CUtensorMap, address: *mut c_void) {
        if map.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: non-null, a CUtensorMap (128 bytes) per the CUDA API.
        let old = unsafe { map.cast::<[u8; 128]>().read_unaligned() };
        let request = v1::TensorMapEncode {
            kind: TensorMapKind::ReplaceAddress as i32,
            global_address: address as u64,
            tensor_map: old.to_vec().into(),
            ..Default::default()
        };
        encode(map, request)
    }
}
