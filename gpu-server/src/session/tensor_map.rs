//! TMA descriptors (`TensorMapEncode`): `cuTensorMapEncodeTiled`,
//! `cuTensorMapEncodeIm2col` and `cuTensorMapReplaceAddress` of the
//! application, encoded by the device's driver because the format is the
//! driver's own. Kernels get the descriptor as a parameter; the address it
//! names is a real device address of the session (the client's addresses
//! are the server's), so the descriptor works unchanged.
//!
//! Checked here before the driver sees anything: the rank (1 to 5, as the
//! driver allows), the length of every vector against it, and that the
//! tensor's extent lies inside the session's range.

use super::{CallOutcome, SessionState};
use crate::device::{BackendSession, TENSOR_MAP_BYTES, TensorMapCommon, TensorMapRequest};
use crate::error::CallError;
use gpupool_proto::v1::{self, TensorMapKind, call_result::Value};

/// The driver's largest tensor rank.
const MAX_RANK: usize = 5;

/// Bytes per element of a `CUtensorMapDataType`, rounded down to whole
/// bytes for the packed 4- and 6-bit types (a smaller extent checks less,
/// never more, than the driver's).
fn element_bytes(data_type: u32) -> u64 {
    match data_type {
        0 => 1,                        // UINT8
        1 | 6 | 9 => 2,                // UINT16, FLOAT16, BFLOAT16
        2 | 3 | 7 | 10 | 11 | 12 => 4, // UINT32, INT32, FLOAT32(_FTZ), TFLOAT32(_FTZ)
        4 | 5 | 8 => 8,                // UINT64, INT64, FLOAT64
        _ => 1,
    }
}

fn bad(what: String) -> CallError {
    CallError::invalid_value(format!("tensor map: {what}"))
}

/// Bytes from the tensor's first element to one past its last.
fn extent(common: &TensorMapCommon) -> Result<u64, CallError> {
    let overflow = || bad("the tensor's extent overflows".into());
    let row = common.global_dim[0].checked_mul(element_bytes(common.data_type)).ok_or_else(overflow)?;
    let mut end = row;
    for (dim, stride) in common.global_dim[1..].iter().zip(&common.global_strides) {
        let step = dim.saturating_sub(1).checked_mul(*stride).ok_or_else(overflow)?;
        end = end.checked_add(step).ok_or_else(overflow)?;
    }
    Ok(end)
}

fn common(t: &v1::TensorMapEncode) -> Result<TensorMapCommon, CallError> {
    let rank = t.rank as usize;
    if !(1..=MAX_RANK).contains(&rank) {
        return Err(bad(format!("rank {rank} is not in 1..={MAX_RANK}")));
    }
    if t.global_dim.len() != rank || t.element_strides.len() != rank || t.global_strides.len() + 1 != rank {
        return Err(bad(format!(
            "rank {rank} needs {rank} sizes, {rank} element strides and {} byte strides; got {}, {} and {}",
            rank - 1,
            t.global_dim.len(),
            t.element_strides.len(),
            t.global_strides.len()
        )));
    }
    Ok(TensorMapCommon {
        data_type: t.data_type,
        global_address: t.global_address,
        global_dim: t.global_dim.clone(),
        global_strides: t.global_strides.clone(),
        element_strides: t.element_strides.clone(),
        interleave: t.interleave,
        swizzle: t.swizzle,
        l2_promotion: t.l2_promotion,
        oob_fill: t.oob_fill,
    })
}

/// Parses and checks a request from the wire (sans I/O, tested below).
pub(super) fn request(t: &v1::TensorMapEncode) -> Result<TensorMapRequest, CallError> {
    match TensorMapKind::try_from(t.kind) {
        Ok(TensorMapKind::Tiled) => {
            let common = common(t)?;
            if t.box_dim.len() != common.global_dim.len() {
                return Err(bad(format!("{} box sizes for rank {}", t.box_dim.len(), t.rank)));
            }
            Ok(TensorMapRequest::Tiled { common, box_dim: t.box_dim.clone() })
        }
        Ok(TensorMapKind::Im2col) => {
            let common = common(t)?;
            let corners = common.global_dim.len().checked_sub(2).filter(|&n| n > 0);
            let Some(corners) = corners else {
                return Err(bad(format!("an im2col map needs rank 3 to 5, not {}", t.rank)));
            };
            if t.lower_corner.len() != corners || t.upper_corner.len() != corners {
                return Err(bad(format!("rank {} needs {corners} corner coordinates", t.rank)));
            }
            Ok(TensorMapRequest::Im2col {
                common,
                lower: t.lower_corner.clone(),
                upper: t.upper_corner.clone(),
                channels_per_pixel: t.channels_per_pixel,
                pixels_per_column: t.pixels_per_column,
            })
        }
        Ok(TensorMapKind::ReplaceAddress) => {
            let map: [u8; TENSOR_MAP_BYTES] = t.tensor_map[..]
                .try_into()
                .map_err(|_| bad(format!("a map is {TENSOR_MAP_BYTES} bytes, not {}", t.tensor_map.len())))?;
            Ok(TensorMapRequest::ReplaceAddress { map, global_address: t.global_address })
        }
        Err(_) => Err(bad(format!("unknown kind {}", t.kind))),
    }
}

impl<S: BackendSession> SessionState<S> {
    pub(super) fn tensor_map(&mut self, t: v1::TensorMapEncode) -> CallOutcome {
        let request = request(&t)?;
        let (addr, len) = match &request {
            TensorMapRequest::Tiled { common, .. } | TensorMapRequest::Im2col { common, .. } => {
                (common.global_address, extent(common)?)
            }
            TensorMapRequest::ReplaceAddress { global_address, .. } => (*global_address, 1),
        };
        let base = self.dev.va_base();
        let end = addr.checked_add(len).ok_or_else(|| bad("the tensor's extent overflows".into()))?;
        if addr < base || end > base.saturating_add(self.limits.va_size) {
            return Err(bad(format!(
                "the tensor at {addr:#x} (+{len}) is outside this session's range {base:#x}..{:#x}",
                base.saturating_add(self.limits.va_size)
            )));
        }
        let map = self.dev.tensor_map(&request)?;
        Ok(Some(Value::TensorMap(bytes::Bytes::copy_from_slice(&map))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiled(rank: u32) -> v1::TensorMapEncode {
        let r = rank as usize;
        v1::TensorMapEncode {
            kind: TensorMapKind::Tiled as i32,
            data_type: 7,
            rank,
            global_address: 0x1000,
            global_dim: vec![64; r],
            global_strides: (1..r).map(|i| 256u64 << (6 * (i - 1))).collect(),
            box_dim: vec![16; r],
            element_strides: vec![1; r],
            ..Default::default()
        }
    }

    #[test]
    fn shapes_are_checked_against_the_rank() {
        assert!(request(&tiled(2)).is_ok());
        assert!(request(&tiled(5)).is_ok());
        assert!(request(&tiled(0)).is_err());
        assert!(request(&tiled(6)).is_err());
        let mut t = tiled(3);
        t.box_dim.pop();
        assert!(request(&t).is_err());
        let mut t = tiled(3);
        t.global_strides.push(1);
        assert!(request(&t).is_err());
        let mut t = tiled(3);
        t.kind = 99;
        assert!(request(&t).is_err());
        let mut t = tiled(4);
        t.kind = TensorMapKind::Im2col as i32;
        assert!(request(&t).is_err(), "corners missing");
        t.lower_corner = vec![0, 0];
        t.upper_corner = vec![-1, -1];
        assert!(request(&t).is_ok());
        let replace = v1::TensorMapEncode {
            kind: TensorMapKind::ReplaceAddress as i32,
            tensor_map: vec![0; 127].into(),
            ..Default::default()
        };
        assert!(request(&replace).is_err());
    }

    #[test]
    fn extent_covers_the_last_element_without_overflow() {
        let TensorMapRequest::Tiled { common, .. } = request(&tiled(2)).unwrap() else { unreachable!() };
        // 64 floats a row, 64 rows 256 bytes apart.
        assert_eq!(extent(&common).unwrap(), 63 * 256 + 64 * 4);
        let mut t = tiled(2);
        t.global_dim = vec![u64::MAX, u64::MAX];
        let TensorMapRequest::Tiled { common, .. } = request(&t).unwrap() else { unreachable!() };
        assert!(extent(&common).is_err());
    }
}
