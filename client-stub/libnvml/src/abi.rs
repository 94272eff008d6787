//! The fenced border: every exported function runs its body through
//! `entry`, which turns errors and panics into an `nvmlReturn_t`, and
//! reads and writes its pointer arguments through the null-checking helpers
//! here.

use crate::error::Error;
use nvml_wrapper_sys::bindings as nv;
use std::ffi::{CStr, c_char, c_uint};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs one exported call: an error becomes its code, a panic becomes
/// `NVML_ERROR_UNKNOWN` (logged), never an unwind into C.
pub(crate) fn entry(name: &'static str, body: impl FnOnce() -> Result<(), Error>) -> nv::nvmlReturn_t {
    gpupool_ffi::init_logging();
    guard(name, nv::nvmlReturn_enum_NVML_ERROR_UNKNOWN, || match body() {
        Ok(()) => nv::nvmlReturn_enum_NVML_SUCCESS,
        Err(e) => {
            tracing::debug!(call = name, error = %e, "returns an error");
            e.code()
        }
    })
}

/// Runs `body`, or returns `on_panic` if it panics: the panic boundary of
/// every export, including those that do not return an `nvmlReturn_t`.
pub(crate) fn guard<T>(name: &'static str, on_panic: T, body: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v,
        Err(panic) => {
            let what = gpupool_ffi::panic_message(panic.as_ref());
            tracing::error!(call = name, panic = %what, "internal error in gpupool libnvidia-ml");
            on_panic
        }
    }
}

/// Logs, once per name, a question the virtual GPU cannot answer.
///
/// At `info`, not `warn`: NVML users probe optional queries (temperature,
/// power, clocks) as a matter of course and handle the answer, so a
/// warning for each would be noise on every monitoring tool's stderr.
pub(crate) fn log_unsupported(name: &'static str) {
    if gpupool_ffi::first_time(name) {
        gpupool_ffi::init_logging();
        tracing::debug!("{name} is not supported by gpupool's libnvidia-ml; it returns NVML_ERROR_NOT_SUPPORTED");
    }
}

/// An entry point gpupool does not implement: logged once, then
/// `NVML_ERROR_NOT_SUPPORTED`.
pub(crate) fn unsupported(name: &'static str) -> nv::nvmlReturn_t {
    guard(name, nv::nvmlReturn_enum_NVML_ERROR_UNKNOWN, || {
        log_unsupported(name);
        nv::nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED
    })
}

/// Writes `value` to an out-pointer.
///
/// # Safety
/// `p` is null or valid for writing a `T` (NVML's contract).
pub(crate) unsafe fn put<T>(p: *mut T, value: T) -> Result<(), Error> {
    if p.is_null() {
        return Err(Error::InvalidArgument("null pointer"));
    }
    // SAFETY: non-null, and valid for writes by the caller's contract.
    unsafe { p.write_unaligned(value) };
    Ok(())
}

/// Reads an in-pointer.
///
/// # Safety
/// `p` is null or valid for reading a `T`.
pub(crate) unsafe fn get<T: Copy>(p: *const T) -> Result<T, Error> {
    if p.is_null() {
        return Err(Error::InvalidArgument("null pointer"));
    }
    // SAFETY: non-null, and valid for reads by the caller's contract.
    Ok(unsafe { p.read_unaligned() })
}

/// A C string argument.
///
/// # Safety
/// `p` is null or a NUL-terminated string that outlives the call.
pub(crate) unsafe fn c_str<'a>(p: *const c_char) -> Result<&'a str, Error> {
    if p.is_null() {
        return Err(Error::InvalidArgument("null string"));
    }
    // SAFETY: NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_str().map_err(|_| Error::InvalidArgument("string is not UTF-8"))
}

/// Copies `s` and its NUL into a caller buffer of `len` bytes. NVML does
/// not cut answers short: a buffer that cannot hold all of `s` gets
/// `NVML_ERROR_INSUFFICIENT_SIZE` and is left alone.
///
/// # Safety
/// `dst` is null or valid for writing `len` bytes.
pub(crate) unsafe fn put_str(dst: *mut c_char, len: c_uint, s: &str) -> Result<(), Error> {
    if dst.is_null() {
        return Err(Error::InvalidArgument("null buffer"));
    }
    let needed = s.len() + 1;
    if (len as usize) < needed {
        return Err(Error::InsufficientSize { needed });
    }
    // SAFETY: `needed <= len` bytes, valid for writes by the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), dst.cast::<u8>(), s.len());
        dst.add(s.len()).write(0);
    }
    Ok(())
}

/// `s` in a fixed C array field, NUL-terminated and cut to fit (struct
/// fields such as `nvmlPciInfo_t::busId` have room for what NVML puts there).
pub(crate) fn c_array<const N: usize>(s: &str) -> [c_char; N] {
    let mut out = [0 as c_char; N];
    for (dst, src) in out.iter_mut().zip(s.bytes().take(N.saturating_sub(1))) {
        *dst = src as c_char;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_and_panics_become_codes() {
        assert_eq!(entry("ok", || Ok(())), 0);
        assert_eq!(entry("bad", || Err(Error::InvalidArgument("x"))), 2);
        assert_eq!(entry("boom", || panic!("boom")), 999);
        assert_eq!(unsupported("nvmlNothing"), 3);
        assert_eq!(unsupported("nvmlNothing"), 3);
    }

    #[test]
    fn pointers_checked() {
        // SAFETY: null pointers are what is under test; the others are live locals.
        unsafe {
            assert_eq!(put::<u32>(std::ptr::null_mut(), 1), Err(Error::InvalidArgument("null pointer")));
            assert_eq!(get::<u32>(std::ptr::null()), Err(Error::InvalidArgument("null pointer")));
            assert!(c_str(std::ptr::null()).is_err());
            let mut v = 0u32;
            put(&mut v, 7).expect("live");
            assert_eq!(get(&v), Ok(7));
        }
    }

    #[test]
    fn strings_are_never_cut() {
        let mut buf = [7 as c_char; 4];
        // SAFETY: `buf` holds 4 bytes.
        unsafe {
            assert_eq!(put_str(buf.as_mut_ptr(), 4, "abcd"), Err(Error::InsufficientSize { needed: 5 }));
            assert_eq!(buf, [7; 4], "left alone");
            put_str(buf.as_mut_ptr(), 4, "abc").expect("fits");
            assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str(), Ok("abc"));
            assert!(put_str(std::ptr::null_mut(), 4, "a").is_err());
        }
        let a: [c_char; 4] = c_array("abcdef");
        assert_eq!(a, [b'a' as c_char, b'b' as c_char, b'c' as c_char, 0]);
    }
}
