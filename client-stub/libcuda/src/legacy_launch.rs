//! The execution control API CUDA deprecated in 4.0 but still exports:
//! a function's block shape (`cuFuncSetBlockShape`), its dynamic shared
//! memory (`cuFuncSetSharedSize`) and a parameter buffer filled piece by
//! piece (`cuParamSetSize`, `cuParamSeti`, `cuParamSetf`, `cuParamSetv`),
//! kept per function handle, then `cuLaunch`, `cuLaunchGrid` and
//! `cuLaunchGridAsync`, which launch with them as `cuLaunchKernel` does
//! with a parameter buffer. `cuParamSetTexRef` stays NOT_SUPPORTED with
//! the texture references it needs.

use crate::abi::{CuError, CuResult};
use crate::launch::{PARAM_BUFFER_POINTER, PARAM_BUFFER_SIZE, PARAM_END};
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUfunction, CUstream};
use std::collections::HashMap;
use std::ffi::{c_float, c_int, c_uint, c_void};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Largest parameter buffer (CUDA's bound on a launch's parameters).
const MAX_PARAM_BYTES: usize = 32_764;

/// What the legacy calls set for one function handle.
#[derive(Debug, Default, Clone)]
struct Setup {
    block: (u32, u32, u32),
    shared: u32,
    params: Vec<u8>,
}

fn setups() -> MutexGuard<'static, HashMap<usize, Setup>> {
    static SETUPS: OnceLock<Mutex<HashMap<usize, Setup>>> = OnceLock::new();
    SETUPS.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Changes function `f`'s setup (a function of the session: checked).
fn with_setup(f: CUfunction, change: impl FnOnce(&mut Setup) -> CuResult) -> CuResult {
    let rt = Runtime::with_context()?;
    rt.function(f as usize)?;
    change(setups().entry(f as usize).or_default())
}

/// Writes `bytes` at `offset` of the parameter buffer, inside its size.
fn set_param(f: CUfunction, offset: c_int, bytes: &[u8]) -> CuResult {
    with_setup(f, |s| {
        let start = usize::try_from(offset).map_err(|_| CuError::INVALID_VALUE)?;
        let dst = start.checked_add(bytes.len()).and_then(|end| s.params.get_mut(start..end));
        dst.ok_or(CuError::INVALID_VALUE)?.copy_from_slice(bytes);
        Ok(())
    })
}

/// Launches `f` on a `w` x `h` grid with its setup.
fn launch_grid(f: CUfunction, w: c_int, h: c_int, stream: CUstream) -> CuResult {
    let (w, h) =
        (u32::try_from(w).map_err(|_| CuError::INVALID_VALUE)?, u32::try_from(h).map_err(|_| CuError::INVALID_VALUE)?);
    let setup = setups().get(&(f as usize)).cloned().unwrap_or_default();
    let mut params = setup.params;
    let mut size = params.len();
    let mut extra: [*mut c_void; 5] = [
        PARAM_BUFFER_POINTER as *mut c_void,
        params.as_mut_ptr().cast(),
        PARAM_BUFFER_SIZE as *mut c_void,
        std::ptr::from_mut(&mut size).cast(),
        PARAM_END as *mut c_void,
    ];
    crate::launch::launch(
        f,
        (w, h, 1),
        setup.block,
        setup.shared,
        stream,
        std::ptr::null_mut(),
        extra.as_mut_ptr(),
        None,
    )
}

crate::exports! {
    fn cuFuncSetBlockShape(f: CUfunction, x: c_int, y: c_int, z: c_int) {
        let dim = |d: c_int| u32::try_from(d).map_err(|_| CuError::INVALID_VALUE);
        let block = (dim(x)?, dim(y)?, dim(z)?);
        with_setup(f, |s| {
            s.block = block;
            Ok(())
        })
    }

    fn cuFuncSetSharedSize(f: CUfunction, bytes: c_uint) {
        with_setup(f, |s| {
            s.shared = bytes;
            Ok(())
        })
    }

    fn cuParamSetSize(f: CUfunction, bytes: c_uint) {
        let bytes = bytes as usize;
        if bytes > MAX_PARAM_BYTES {
            return Err(CuError::INVALID_VALUE);
        }
        with_setup(f, |s| {
            s.params.resize(bytes, 0);
            Ok(())
        })
    }

    fn cuParamSeti(f: CUfunction, offset: c_int, value: c_uint) {
        set_param(f, offset, &value.to_ne_bytes())
    }

    fn cuParamSetf(f: CUfunction, offset: c_int, value: c_float) {
        set_param(f, offset, &value.to_ne_bytes())
    }

    fn cuParamSetv(f: CUfunction, offset: c_int, ptr: *mut c_void, bytes: c_uint) {
        if ptr.is_null() && bytes > 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let value = if bytes == 0 {
            &[][..]
        } else {
            // SAFETY: `ptr` holds `bytes` readable bytes (the CUDA API's contract).
            unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), bytes as usize) }
        };
        set_param(f, offset, value)
    }

    fn cuLaunch(f: CUfunction) {
        launch_grid(f, 1, 1, std::ptr::null_mut())
    }

    fn cuLaunchGrid(f: CUfunction, w: c_int, h: c_int) {
        launch_grid(f, w, h, std::ptr::null_mut())
    }

    fn cuLaunchGridAsync(f: CUfunction, w: c_int, h: c_int, stream: CUstream) {
        launch_grid(f, w, h, stream)
    }
}
