//! The JIT linker: `cuLinkCreate`, `cuLinkAddData`, `cuLinkAddFile`,
//! `cuLinkComplete`, `cuLinkDestroy`.
//!
//! The linker state lives here: inputs are collected (files are read
//! here, on the application's machine) and `cuLinkComplete` sends them to
//! the server in one call, where the real driver links them. The linked
//! cubin is owned by the state until `cuLinkDestroy`; the logs are copied
//! into the application's buffers and the sizes (and the wall time) into
//! the option slots, which the driver also writes back into (the
//! `optionValues` array of `cuLinkCreate` must live as long as the state).
//!
//! Differences from a local driver: PTX is compiled at `cuLinkComplete`,
//! so errors in an input are reported there rather than by
//! `cuLinkAddData`; options of single inputs that are outputs (logs, wall
//! time) read as empty; options that pass host pointers (global symbol
//! tables, referenced names) are `CUDA_ERROR_NOT_SUPPORTED`. The emulated
//! device cannot link: `cuLinkComplete` returns `CUDA_ERROR_NOT_SUPPORTED`
//! with "JIT linking needs a CUDA device" in the error log.

use crate::abi::{CuError, CuResult, c_str, put};
use crate::runtime::Runtime;
use bytes::Bytes;
use cudarc::driver::sys::CUlinkState;
use gpupool_client::{JitInput, JitLinkRequest};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_uint, c_void};
use std::sync::{Mutex, MutexGuard};

/// Most inputs of one link.
const MAX_INPUTS: usize = 256;
/// Most bytes of all inputs of one link.
const MAX_BYTES: u64 = 1 << 30;
/// Most options of one call.
const MAX_OPTIONS: usize = 64;
/// `CUDA_ERROR_FILE_NOT_FOUND`.
const FILE_NOT_FOUND: CuError = CuError(301);

const THREADS_PER_BLOCK: u32 = 1;
const WALL_TIME: u32 = 2;
const INFO_LOG: u32 = 3;
const INFO_LOG_SIZE: u32 = 4;
const ERROR_LOG: u32 = 5;
const ERROR_LOG_SIZE: u32 = 6;

/// Link states are tagged integers (bits 40..48), never pointers.
const STATE_TAG: usize = 0x21 << 40;
const STATE_MASK: usize = 0xff << 40;

/// The options of one call, sorted out.
#[derive(Debug, Default)]
struct Options {
    /// Plain values, sent to the server.
    scalar: Vec<(u32, u64)>,
    /// The application's option arrays, for the write-backs.
    keys: Vec<u32>,
    values: usize,
    info_log: Option<(usize, u32)>,
    error_log: Option<(usize, u32)>,
}

impl Options {
    /// Reads `n` options.
    ///
    /// # Safety
    /// `keys` and `values` are null or hold `n` entries each (the CUDA
    /// API's contract); `values` stays valid while the options are used.
    unsafe fn read(n: c_uint, keys: *const c_uint, values: *mut *mut c_void) -> CuResult<Self> {
        let n = n as usize;
        let mut out = Options { values: values as usize, ..Options::default() };
        if n == 0 {
            return Ok(out);
        }
        if keys.is_null() || values.is_null() || n > MAX_OPTIONS {
            return Err(CuError::INVALID_VALUE);
        }
        let (mut info, mut info_size, mut error, mut error_size) = (0usize, 0u32, 0usize, 0u32);
        for i in 0..n {
            // SAFETY: both arrays hold `n` entries (contract above).
            let (key, value) = unsafe { (*keys.add(i), *values.add(i) as usize) };
            out.keys.push(key);
            match key {
                WALL_TIME => {}
                INFO_LOG => info = value,
                INFO_LOG_SIZE => info_size = value as u32,
                ERROR_LOG => error = value,
                ERROR_LOG_SIZE => error_size = value as u32,
                17..=19 | 25..=28 => {
                    tracing::debug!(option = key, "JIT options that pass host pointers are not sent to a remote GPU");
                    return Err(CuError::NOT_SUPPORTED);
                }
                k if gpupool_server_scalar(k) => out.scalar.push((k, value as u64)),
                other => {
                    tracing::debug!(option = other, "unknown JIT option");
                    return Err(CuError::INVALID_VALUE);
                }
            }
        }
        out.info_log = (info != 0 && info_size > 0).then_some((info, info_size));
        out.error_log = (error != 0 && error_size > 0).then_some((error, error_size));
        Ok(out)
    }

    /// Writes a log into the application's buffer (cut to fit, NUL
    /// terminated) and its length into the size slot.
    fn put_log(&self, buf: Option<(usize, u32)>, size_key: u32, log: &[u8]) {
        let written = match buf {
            Some((ptr, size)) => {
                let n = log.len().min(size as usize - 1);
                // SAFETY: the application gave a buffer of `size` bytes
                // for this log, valid for the life of the state.
                unsafe {
                    std::ptr::copy_nonoverlapping(log.as_ptr(), ptr as *mut u8, n);
                    (ptr as *mut u8).add(n).write(0);
                }
                n
            }
            None => 0,
        };
        self.put_value(size_key, written);
    }

    /// Overwrites the slot of option `key`, as the driver does for its
    /// outputs.
    fn put_value(&self, key: u32, value: usize) {
        for (i, _) in self.keys.iter().enumerate().filter(|(_, k)| **k == key) {
            // SAFETY: `values` holds `keys.len()` slots and stays valid
            // for the life of the state (CUDA contract).
            unsafe { (self.values as *mut *mut c_void).add(i).write(value as *mut c_void) };
        }
    }
}

/// The `CUjit_option`s whose value is a plain number (the server's list).
fn gpupool_server_scalar(option: u32) -> bool {
    matches!(option, 0 | 1 | 7..=16 | 20..=24 | 29..=33)
}

#[derive(Debug)]
struct Linker {
    options: Options,
    inputs: Vec<JitInput>,
    bytes: u64,
    /// The linked image, 8-byte aligned, owned until cuLinkDestroy.
    cubin: Option<(Vec<u64>, usize)>,
}

#[derive(Debug, Default)]
struct Linkers {
    next: usize,
    states: BTreeMap<usize, Linker>,
}

fn linkers() -> MutexGuard<'static, Linkers> {
    static LINKERS: Mutex<Linkers> = Mutex::new(Linkers { next: 0, states: BTreeMap::new() });
    LINKERS.lock().unwrap_or_else(|e| e.into_inner())
}

fn id_of(state: CUlinkState) -> CuResult<usize> {
    let h = state as usize;
    if h & STATE_MASK != STATE_TAG {
        return Err(CuError::INVALID_HANDLE);
    }
    Ok(h & !STATE_MASK)
}

fn create(n: c_uint, keys: *const c_uint, values: *mut *mut c_void, state: *mut CUlinkState) -> CuResult {
    Runtime::with_context()?;
    if state.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the CUDA contract for cuLinkCreate's option arrays.
    let options = unsafe { Options::read(n, keys, values) }?;
    let mut all = linkers();
    all.next += 1;
    let id = all.next;
    all.states.insert(id, Linker { options, inputs: Vec::new(), bytes: 0, cubin: None });
    // SAFETY: out-pointer per the CUDA API (checked above).
    unsafe { put(state, (STATE_TAG | id) as CUlinkState) }
}

/// Adds an input after checking the bounds; `data` gives the bytes once
/// their size is known to fit.
#[allow(clippy::too_many_arguments)]
fn add(
    state: CUlinkState,
    kind: c_uint,
    size: u64,
    name: String,
    data: impl FnOnce() -> CuResult<Vec<u8>>,
    n: c_uint,
    keys: *const c_uint,
    values: *mut *mut c_void,
) -> CuResult {
    Runtime::with_context()?;
    let id = id_of(state)?;
    if kind > 5 || size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the CUDA contract for cuLinkAddData's option arrays.
    let options = unsafe { Options::read(n, keys, values) }?;
    {
        let all = linkers();
        let linker = all.states.get(&id).ok_or(CuError::INVALID_HANDLE)?;
        if linker.inputs.len() >= MAX_INPUTS || linker.bytes.saturating_add(size) > MAX_BYTES {
            tracing::debug!(
                inputs = linker.inputs.len(),
                bytes = linker.bytes,
                size,
                "link inputs exceed gpupool's bounds"
            );
            return Err(CuError::INVALID_VALUE);
        }
    }
    let bytes = data()?;
    // Outputs of a single input's options: nothing to report before the link.
    options.put_log(options.info_log, INFO_LOG_SIZE, b"");
    options.put_log(options.error_log, ERROR_LOG_SIZE, b"");
    options.put_value(WALL_TIME, 0);
    let mut all = linkers();
    let linker = all.states.get_mut(&id).ok_or(CuError::INVALID_HANDLE)?;
    if linker.bytes.saturating_add(bytes.len() as u64) > MAX_BYTES {
        return Err(CuError::INVALID_VALUE);
    }
    linker.bytes += bytes.len() as u64;
    linker.inputs.push(JitInput { kind, name, data: Bytes::from(bytes), options: options.scalar });
    Ok(())
}

fn complete(state: CUlinkState, cubin_out: *mut *mut c_void, size_out: *mut usize) -> CuResult {
    let rt = Runtime::with_context()?;
    let id = id_of(state)?;
    if cubin_out.is_null() || size_out.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let request = {
        let all = linkers();
        let linker = all.states.get(&id).ok_or(CuError::INVALID_HANDLE)?;
        JitLinkRequest {
            options: linker.options.scalar.clone(),
            inputs: linker.inputs.clone(),
            info_log_bytes: linker.options.info_log.map_or(0, |(_, n)| n),
            error_log_bytes: linker.options.error_log.map_or(0, |(_, n)| n),
        }
    };
    let outcome = rt.session.jit_link(request);
    let mut all = linkers();
    let linker = all.states.get_mut(&id).ok_or(CuError::INVALID_HANDLE)?;
    let o = &linker.options;
    let out = match outcome {
        Ok(out) => out,
        Err(e) => {
            // The call failed as a whole (a device that cannot link, a
            // refused request): its reason goes to the error log.
            o.put_log(o.info_log, INFO_LOG_SIZE, b"");
            o.put_log(o.error_log, ERROR_LOG_SIZE, e.to_string().as_bytes());
            return Err(e.into());
        }
    };
    o.put_log(o.info_log, INFO_LOG_SIZE, &out.info_log);
    o.put_log(o.error_log, ERROR_LOG_SIZE, &out.error_log);
    o.put_value(WALL_TIME, out.wall_time_ms.to_bits() as usize);
    if out.threads_per_block > 0 {
        o.put_value(THREADS_PER_BLOCK, out.threads_per_block as usize);
    }
    let image = out.cubin?;
    let len = image.len();
    let words: Vec<u64> = image
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_ne_bytes(w)
        })
        .collect();
    let ptr = words.as_ptr() as *mut c_void;
    linker.cubin = Some((words, len));
    // SAFETY: out-pointers per the CUDA API (checked above); the image
    // stays with the state until cuLinkDestroy.
    unsafe {
        put(cubin_out, ptr)?;
        put(size_out, len)
    }
}

/// Reads an input file here, on the application's machine, bounded by
/// what the link may still take.
fn read_file(path: &str) -> CuResult<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        tracing::debug!(path, error = %e, "cuLinkAddFile cannot read the file");
        FILE_NOT_FOUND
    })
}

crate::exports! {
    fn cuLinkCreate_v2(n: c_uint, options: *mut c_uint, values: *mut *mut c_void, state: *mut CUlinkState) {
        create(n, options, values, state)
    }

    fn cuLinkAddData_v2(
        state: CUlinkState,
        kind: c_uint,
        data: *mut c_void,
        size: usize,
        name: *const c_char,
        n: c_uint,
        options: *mut c_uint,
        values: *mut *mut c_void,
    ) {
        if data.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: NUL-terminated per the CUDA API, or null.
        let name = if name.is_null() { String::new() } else { unsafe { c_str(name) }?.to_owned() };
        let bytes = || {
            // SAFETY: `data` holds `size` readable bytes (CUDA contract).
            Ok(unsafe { std::slice::from_raw_parts(data as *const u8, size) }.to_vec())
        };
        add(state, kind, size as u64, name, bytes, n, options, values)
    }

    fn cuLinkAddFile_v2(
        state: CUlinkState,
        kind: c_uint,
        path: *const c_char,
        n: c_uint,
        options: *mut c_uint,
        values: *mut *mut c_void,
    ) {
        // SAFETY: NUL-terminated per the CUDA API.
        let path = unsafe { c_str(path) }?.to_owned();
        let size = std::fs::metadata(&path).map_err(|_| FILE_NOT_FOUND)?.len();
        let name = path.clone();
        add(state, kind, size.max(1), name, || read_file(&path), n, options, values)
    }

    fn cuLinkComplete(state: CUlinkState, cubin_out: *mut *mut c_void, size_out: *mut usize) {
        complete(state, cubin_out, size_out)
    }

    fn cuLinkDestroy(state: CUlinkState) {
        let id = id_of(state)?;
        linkers().states.remove(&id).map(drop).ok_or(CuError::INVALID_HANDLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_sorted_and_outputs_written_back() {
        let mut log = [0xffu8; 8];
        let keys = [0u32, INFO_LOG, INFO_LOG_SIZE, WALL_TIME, 8];
        let mut values: [*mut c_void; 5] =
            [32 as *mut c_void, log.as_mut_ptr().cast(), 8 as *mut c_void, std::ptr::null_mut(), std::ptr::null_mut()];
        // SAFETY: both arrays hold five entries and outlive `o`.
        let o = unsafe { Options::read(5, keys.as_ptr(), values.as_mut_ptr()) }.expect("options");
        assert_eq!(o.scalar, vec![(0, 32), (8, 0)]);
        assert_eq!(o.info_log.map(|(_, n)| n), Some(8));
        o.put_log(o.info_log, INFO_LOG_SIZE, b"a long log line");
        o.put_value(WALL_TIME, 1.5f32.to_bits() as usize);
        assert_eq!(&log, b"a long \0");
        assert_eq!(values[2] as usize, 7, "the filled size replaces the buffer size");
        assert_eq!(f32::from_bits(values[3] as usize as u32), 1.5);
    }

    #[test]
    fn pointer_options_and_unknown_ones_are_refused() {
        let mut values: [*mut c_void; 1] = [std::ptr::null_mut()];
        for (key, code) in
            [(17u32, CuError::NOT_SUPPORTED), (25, CuError::NOT_SUPPORTED), (999, CuError::INVALID_VALUE)]
        {
            // SAFETY: one-entry arrays.
            let r = unsafe { Options::read(1, [key].as_ptr(), values.as_mut_ptr()) };
            assert_eq!(r.err(), Some(code), "option {key}");
        }
        // SAFETY: null arrays with a count are what is under test.
        let r = unsafe { Options::read(1, std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(r.err(), Some(CuError::INVALID_VALUE));
    }

    #[test]
    fn get_proc_address_finds_the_linker_and_vmm() {
        use crate::proc_address::resolve;
        assert_eq!(resolve("cuLinkCreate", 13000, 0), Some(cuLinkCreate_v2 as *const () as usize));
        assert_eq!(resolve("cuLinkAddData", 13000, 0), Some(cuLinkAddData_v2 as *const () as usize));
        assert_eq!(resolve("cuLinkComplete", 13000, 0), Some(cuLinkComplete as *const () as usize));
        assert_eq!(resolve("cuMemCreate", 13000, 0), Some(crate::vmm::cuMemCreate as *const () as usize));
        assert_eq!(resolve("cuMemMap", 13000, 0), Some(crate::vmm::cuMemMap as *const () as usize));
    }

    #[test]
    fn foreign_states_are_invalid_handles() {
        assert_eq!(id_of(std::ptr::null_mut()), Err(CuError::INVALID_HANDLE));
        assert_eq!(id_of(0x1234 as CUlinkState), Err(CuError::INVALID_HANDLE));
        assert_eq!(id_of((STATE_TAG | 3) as CUlinkState), Ok(3));
    }
}
