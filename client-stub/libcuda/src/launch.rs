//! Kernel launches. Arguments arrive as `void**` (or one packed buffer in
//! `extra`); the function's parameter layout, which came from the server
//! with the module, says how many bytes each points to.

use crate::abi::{CuError, CuResult};
use crate::capture::{self, Route};
use crate::graph::{Kernel, Op};
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUfunction, CUlaunchConfig, CUstream};
use gpupool_client::LaunchConfig;
use gpupool_proto::v1;
use std::ffi::{c_uint, c_void};

const PARAM_END: usize = 0x00;
const PARAM_BUFFER_POINTER: usize = 0x01;
const PARAM_BUFFER_SIZE: usize = 0x02;

/// The parameter buffer for one launch.
///
/// # Safety
/// `params` is null or holds one valid pointer per parameter, each to that
/// parameter's bytes; `extra` is null or a CU_LAUNCH_PARAM_END-terminated
/// list (the CUDA launch contract).
pub(crate) unsafe fn pack(
    info: &v1::FunctionInfo,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult<Vec<u8>> {
    let size = info.params_size as usize;
    let mut buf = vec![0u8; size];
    if !params.is_null() {
        for (i, p) in info.params.iter().enumerate() {
            // SAFETY: one pointer per parameter (contract above).
            let src = unsafe { *params.add(i) };
            if src.is_null() {
                return Err(CuError::INVALID_VALUE);
            }
            let (off, len) = (p.offset as usize, p.size as usize);
            let dst = buf.get_mut(off..off + len).ok_or(CuError::INVALID_VALUE)?;
            // SAFETY: the argument has `len` readable bytes (contract above).
            dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) });
        }
        return Ok(buf);
    }
    if extra.is_null() {
        return if size == 0 { Ok(buf) } else { Err(CuError::INVALID_VALUE) };
    }
    let (mut pointer, mut length) = (std::ptr::null::<u8>(), None);
    let mut i = 0;
    loop {
        // SAFETY: the list is terminated by PARAM_END (contract above).
        let key = unsafe { *extra.add(i) } as usize;
        match key {
            PARAM_END => break,
            // SAFETY: each key is followed by its value.
            PARAM_BUFFER_POINTER => pointer = unsafe { *extra.add(i + 1) }.cast(),
            PARAM_BUFFER_SIZE => {
                // SAFETY: the value points to a size_t.
                let p = unsafe { *extra.add(i + 1) }.cast::<usize>();
                // SAFETY: non-null checked; a size_t per the contract.
                length = (!p.is_null()).then(|| unsafe { p.read_unaligned() });
            }
            _ => return Err(CuError::INVALID_VALUE),
        }
        i += 2;
    }
    let len = length.ok_or(CuError::INVALID_VALUE)?;
    if pointer.is_null() || len < size {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the buffer holds `len >= size` bytes (contract above).
    buf.copy_from_slice(unsafe { std::slice::from_raw_parts(pointer, size) });
    Ok(buf)
}

#[allow(clippy::too_many_arguments)]
fn launch(
    f: CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult {
    let rt = Runtime::with_context()?;
    let function = rt.function(f as usize)?;
    let route = capture::route(rt, stream)?;
    if [grid.0, grid.1, grid.2, block.0, block.1, block.2].contains(&0) {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the CUDA launch contract on `params` and `extra`.
    let buf = unsafe { pack(&function.info, params, extra) }?;
    match route {
        Route::Send(s) => {
            let cfg = LaunchConfig { grid, block, shared_mem_bytes: shared };
            rt.session.launch_raw(&function, cfg, s, buf).map_err(CuError::from)
        }
        Route::Capture(s) => {
            let k = Kernel {
                func: f as usize,
                given: [f as usize, 0],
                grid: [grid.0, grid.1, grid.2],
                block: [block.0, block.1, block.2],
                shared,
                params: buf,
            };
            capture::add(s, Op::Kernel(k)).map(drop)
        }
    }
}

/// Launch attributes (CUlaunchAttributeID) that change nothing here: the
/// launch is ordered on its stream either way.
fn attribute_is_harmless(id: u32, first_word: u32) -> bool {
    match id {
        0 => true,            // IGNORE
        5 => first_word == 0, // PROGRAMMATIC_STREAM_SERIALIZATION off
        8 => true,            // PRIORITY: a scheduling hint
        _ => false,
    }
}

/// The attributes of a launch configuration as `(id, first three words of
/// the value)`, read as integers so that an unknown id is just a number.
///
/// # Safety
/// `c.attrs` holds `c.numAttrs` attributes (the CUDA contract).
unsafe fn attributes(c: &CUlaunchConfig) -> impl Iterator<Item = (u32, [u32; 3])> + '_ {
    (0..c.numAttrs as usize).map(move |i| {
        // SAFETY: each attribute starts with its id; its value is at byte 8
        // and at least 12 bytes long (a 64-byte union).
        unsafe {
            let a = c.attrs.add(i).cast::<u8>();
            let v = a.add(8).cast::<u32>();
            (
                a.cast::<u32>().read_unaligned(),
                [v.read_unaligned(), v.add(1).read_unaligned(), v.add(2).read_unaligned()],
            )
        }
    })
}

/// The cluster shape a launch configuration asks for (attribute 4,
/// CLUSTER_DIMENSION), zero when none.
///
/// # Safety
/// `c.attrs` holds `c.numAttrs` attributes.
pub(crate) unsafe fn cluster_of(c: &CUlaunchConfig) -> [u32; 3] {
    // SAFETY: forwarded contract.
    unsafe { attributes(c) }.find(|(id, _)| *id == 4).map_or([0; 3], |(_, dims)| dims)
}

fn launch_ex(
    config: *const CUlaunchConfig,
    f: CUfunction,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult {
    // SAFETY: the CUDA contract: `config` points to a CUlaunchConfig.
    let c = unsafe { crate::abi::get(config) }?;
    // SAFETY: `attrs` holds `numAttrs` attributes (the CUDA contract).
    if let Some((id, _)) = unsafe { attributes(&c) }.find(|&(id, [word, ..])| !attribute_is_harmless(id, word)) {
        tracing::warn!(attribute = id, "launch attribute not supported by gpupool");
        return Err(CuError::NOT_SUPPORTED);
    }
    launch(
        f,
        (c.gridDimX, c.gridDimY, c.gridDimZ),
        (c.blockDimX, c.blockDimY, c.blockDimZ),
        c.sharedMemBytes,
        c.hStream,
        params,
        extra,
    )
}

crate::exports! {
    fn cuLaunchKernel(
        f: CUfunction, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint,
        shared: c_uint, stream: CUstream, params: *mut *mut c_void, extra: *mut *mut c_void,
    ) {
        launch(f, (gx, gy, gz), (bx, by, bz), shared, stream, params, extra)
    }

    fn cuLaunchKernel_ptsz(
        f: CUfunction, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint,
        shared: c_uint, stream: CUstream, params: *mut *mut c_void, extra: *mut *mut c_void,
    ) {
        launch(f, (gx, gy, gz), (bx, by, bz), shared, stream, params, extra)
    }

    fn cuLaunchKernelEx(config: *const CUlaunchConfig, f: CUfunction, params: *mut *mut c_void, extra: *mut *mut c_void) {
        launch_ex(config, f, params, extra)
    }

    fn cuLaunchKernelEx_ptsz(config: *const CUlaunchConfig, f: CUfunction, params: *mut *mut c_void, extra: *mut *mut c_void) {
        launch_ex(config, f, params, extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> v1::FunctionInfo {
        v1::FunctionInfo {
            name: "k".into(),
            params: vec![v1::ParamInfo { offset: 0, size: 8 }, v1::ParamInfo { offset: 8, size: 4 }],
            params_size: 12,
            ..Default::default()
        }
    }

    #[test]
    fn pointer_array_packed_by_layout() {
        let (mut a, mut b) = (0x1122_3344_5566_7788u64, 7u32);
        let mut ptrs = [(&raw mut a).cast::<c_void>(), (&raw mut b).cast::<c_void>()];
        // SAFETY: one live pointer per parameter.
        let buf = unsafe { pack(&info(), ptrs.as_mut_ptr(), std::ptr::null_mut()) }.expect("pack");
        assert_eq!(&buf[..8], &a.to_le_bytes());
        assert_eq!(&buf[8..], &7u32.to_le_bytes());
    }

    #[test]
    fn extra_buffer_and_errors() {
        let mut packed = [9u8; 12];
        let mut size = 12usize;
        let mut extra = [
            PARAM_BUFFER_POINTER as *mut c_void,
            packed.as_mut_ptr().cast(),
            PARAM_BUFFER_SIZE as *mut c_void,
            (&raw mut size).cast(),
            PARAM_END as *mut c_void,
        ];
        // SAFETY: a terminated list with a 12-byte buffer.
        let buf = unsafe { pack(&info(), std::ptr::null_mut(), extra.as_mut_ptr()) }.expect("pack");
        assert_eq!(buf, vec![9u8; 12]);
        // SAFETY: the size slot points at `size`, a live local.
        unsafe { *extra[3].cast::<usize>() = 4 };
        // SAFETY: as above, with a too-small size.
        let short = unsafe { pack(&info(), std::ptr::null_mut(), extra.as_mut_ptr()) };
        assert_eq!(short, Err(CuError::INVALID_VALUE));
        // SAFETY: both null: only valid for a kernel without parameters.
        let none = unsafe { pack(&info(), std::ptr::null_mut(), std::ptr::null_mut()) };
        assert_eq!(none, Err(CuError::INVALID_VALUE));
        assert!(attribute_is_harmless(5, 0) && !attribute_is_harmless(5, 1) && !attribute_is_harmless(4, 0));
    }
}
