//! The fenced border: every exported function runs its body through
//! [`entry`], which turns errors and panics into a `CUresult`, and reads its
//! pointer arguments through the null-checking helpers here.

use crate::codes;
use cudarc::driver::sys::CUresult;
use gpupool_client::ClientError;
use gpupool_proto::cuda;
use std::ffi::{CStr, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

/// A failed call: the raw `CUresult` the application gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CuError(pub(crate) u32);

impl CuError {
    pub(crate) const INVALID_VALUE: CuError = CuError(cuda::INVALID_VALUE);
    pub(crate) const NOT_INITIALIZED: CuError = CuError(cuda::NOT_INITIALIZED);
    pub(crate) const INVALID_CONTEXT: CuError = CuError(cuda::INVALID_CONTEXT);
    pub(crate) const INVALID_HANDLE: CuError = CuError(cuda::INVALID_HANDLE);
    pub(crate) const NOT_FOUND: CuError = CuError(cuda::NOT_FOUND);
    pub(crate) const NOT_READY: CuError = CuError(cuda::NOT_READY);
    pub(crate) const NOT_SUPPORTED: CuError = CuError(cuda::NOT_SUPPORTED);
    pub(crate) const INVALID_DEVICE: CuError = CuError(101);
    pub(crate) const INVALID_IMAGE: CuError = CuError(cuda::INVALID_IMAGE);
}

impl From<ClientError> for CuError {
    fn from(e: ClientError) -> Self {
        tracing::debug!(error = %e, "call failed");
        CuError(e.code())
    }
}

pub(crate) type CuResult<T = ()> = Result<T, CuError>;

/// Runs one exported call: errors become their code, a panic becomes
/// `CUDA_ERROR_UNKNOWN` (logged), never an unwind into C.
///
/// Logging itself may panic when the calling thread is exiting (its
/// thread-local storage is being destroyed while a library's destructor
/// still calls the driver): such a panic is swallowed too, because one
/// outside `catch_unwind` here would abort the process. Once the process
/// is exiting the subscriber drops every event (`gpupool_ffi`).
pub(crate) fn entry(name: &'static str, body: impl FnOnce() -> CuResult) -> CUresult {
    let traced = || {
        tracing::trace!(call = name, "call");
        body()
    };
    match catch_unwind(AssertUnwindSafe(|| crate::call_stats::measure(name, traced))) {
        Ok(Ok(())) => CUresult::CUDA_SUCCESS,
        Ok(Err(CuError(code))) => {
            log_quietly(|| tracing::trace!(call = name, code, "returns an error"));
            codes::from_raw(code)
        }
        Err(panic) => {
            let what = gpupool_ffi::panic_message(panic.as_ref());
            log_quietly(|| tracing::error!(call = name, panic = %what, "internal error in gpupool libcuda"));
            CUresult::CUDA_ERROR_UNKNOWN
        }
    }
}

/// Logs, ignoring a panic of the logging itself (see [`entry`]).
pub(crate) fn log_quietly(log: impl FnOnce()) {
    let _ = catch_unwind(AssertUnwindSafe(log));
}

/// The error of another export's result, to call one export from another.
pub(crate) fn status(r: CUresult) -> CuResult {
    if r == CUresult::CUDA_SUCCESS { Ok(()) } else { Err(CuError(r as u32)) }
}

/// Logs an entry point gpupool does not implement, once per name.
pub(crate) fn unsupported(name: &'static str) -> CUresult {
    if gpupool_ffi::first_time(name) {
        gpupool_ffi::init_logging();
        tracing::debug!("{name} is not supported by gpupool's libcuda; it returns CUDA_ERROR_NOT_SUPPORTED");
    }
    CUresult::CUDA_ERROR_NOT_SUPPORTED
}

/// Writes `value` to an out-pointer.
///
/// # Safety
/// `p` is null or valid for writing a `T` (the CUDA API's contract).
pub(crate) unsafe fn put<T>(p: *mut T, value: T) -> CuResult {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: non-null, and valid for writes by the caller's contract.
    unsafe { p.write_unaligned(value) };
    Ok(())
}

/// Reads an in-pointer.
///
/// # Safety
/// `p` is null or valid for reading a `T`.
pub(crate) unsafe fn get<T: Copy>(p: *const T) -> CuResult<T> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: non-null, and valid for reads by the caller's contract.
    Ok(unsafe { p.read_unaligned() })
}

/// A C string argument.
///
/// # Safety
/// `p` is null or a NUL-terminated string that outlives the call.
pub(crate) unsafe fn c_str<'a>(p: *const c_char) -> CuResult<&'a str> {
    if p.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| CuError::INVALID_VALUE)
}

/// Copies `s` into a caller buffer of `len` bytes, NUL-terminated and cut
/// to fit (`cuDeviceGetName`).
///
/// # Safety
/// `dst` is null or valid for writing `len` bytes.
pub(crate) unsafe fn put_str(dst: *mut c_char, len: i32, s: &str) -> CuResult {
    if dst.is_null() || len <= 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let n = s.len().min(len as usize - 1);
    // SAFETY: `n + 1 <= len` bytes, valid for writes by the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), dst.cast::<u8>(), n);
        dst.add(n).write(0);
    }
    Ok(())
}

/// A `'static` C string for `s`, interned: CUDA hands out pointers to
/// strings that never go away (names, error strings).
pub(crate) fn intern(s: &str) -> *const c_char {
    static TABLE: Mutex<Vec<&'static CStr>> = Mutex::new(Vec::new());
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = table.iter().find(|c| c.to_bytes() == s.as_bytes()) {
        return found.as_ptr();
    }
    let owned = std::ffi::CString::new(s.replace('\0', " ")).unwrap_or_default();
    let leaked: &'static CStr = Box::leak(owned.into_boxed_c_str());
    table.push(leaked);
    leaked.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_panics_become_codes() {
        assert_eq!(entry("ok", || Ok(())), CUresult::CUDA_SUCCESS);
        assert_eq!(entry("bad", || Err(CuError::INVALID_VALUE)), CUresult::CUDA_ERROR_INVALID_VALUE);
        assert_eq!(entry("odd", || Err(CuError(123_456))), CUresult::CUDA_ERROR_UNKNOWN);
        assert_eq!(entry("boom", || panic!("boom")), CUresult::CUDA_ERROR_UNKNOWN);
        assert_eq!(unsupported("cuNothing"), CUresult::CUDA_ERROR_NOT_SUPPORTED);
    }

    #[test]
    fn pointers_checked() {
        // SAFETY: null pointers are what is under test; the others are live locals.
        unsafe {
            assert_eq!(put::<i32>(std::ptr::null_mut(), 1), Err(CuError::INVALID_VALUE));
            assert_eq!(get::<i32>(std::ptr::null()), Err(CuError::INVALID_VALUE));
            let mut buf = [7 as c_char; 4];
            put_str(buf.as_mut_ptr(), 4, "abcdef").expect("fits");
            assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().expect("utf8"), "abc");
        }
        let a = intern("x");
        assert_eq!(a, intern("x"));
    }
}
