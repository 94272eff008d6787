//! The JIT linker: `cuLinkCreate_v2`, `cuLinkAddData_v2`, `cuLinkComplete`
//! over a [`LinkState`] that owns the driver's state, the option arrays and
//! the log buffers the driver writes into until `cuLinkDestroy`.
//!
//! The entry points are called through raw signatures with the option and
//! input-type numbers as plain integers: they come from the wire, and
//! building cudarc's enums from numbers they do not list would be undefined
//! behaviour. Only options whose value is a plain number are passed
//! ([`link_option_is_scalar`], checked again here).

use super::driver;
use crate::device::{DeviceResult, LinkOutput, LinkRequest, link_option_is_scalar};
use crate::error::CallError;
use cudarc::driver::sys;
use gpupool_proto::cuda;
use std::ffi::{CString, c_char, c_int, c_uint, c_void};

/// `CU_JIT_WALL_TIME`, `CU_JIT_INFO_LOG_BUFFER` (+ size),
/// `CU_JIT_ERROR_LOG_BUFFER` (+ size) and `CU_JIT_THREADS_PER_BLOCK`.
const WALL_TIME: c_int = 2;
const INFO_LOG: c_int = 3;
const INFO_LOG_SIZE: c_int = 4;
const ERROR_LOG: c_int = 5;
const ERROR_LOG_SIZE: c_int = 6;
const THREADS_PER_BLOCK: u32 = 1;
/// `CU_JIT_INPUT_PTX`.
const INPUT_PTX: u32 = 1;

type LinkCreate = unsafe extern "C" fn(c_uint, *mut c_int, *mut *mut c_void, *mut sys::CUlinkState) -> c_int;
type LinkAddData = unsafe extern "C" fn(
    sys::CUlinkState,
    c_int,
    *mut c_void,
    usize,
    *const c_char,
    c_uint,
    *mut c_int,
    *mut *mut c_void,
) -> c_int;
type LinkComplete = unsafe extern "C" fn(sys::CUlinkState, *mut *mut c_void, *mut usize) -> c_int;
type LinkDestroy = unsafe extern "C" fn(sys::CUlinkState) -> c_int;

/// The four entry points, looked up once per link.
struct Api {
    create: LinkCreate,
    add_data: LinkAddData,
    complete: LinkComplete,
    destroy: LinkDestroy,
}

fn api() -> DeviceResult<Api> {
    let missing = |name: &str| CallError::new(cuda::NOT_SUPPORTED, format!("libcuda has no {name}"));
    // SAFETY: called on a session of an open device (`check_driver` passed,
    // the library is loaded); each signature matches the driver's
    // prototype, enums being ints in the C ABI.
    unsafe {
        let lib = sys::culib();
        Ok(Api {
            create: *lib.get::<LinkCreate>(b"cuLinkCreate_v2").map_err(|_| missing("cuLinkCreate_v2"))?,
            add_data: *lib.get::<LinkAddData>(b"cuLinkAddData_v2").map_err(|_| missing("cuLinkAddData_v2"))?,
            complete: *lib.get::<LinkComplete>(b"cuLinkComplete").map_err(|_| missing("cuLinkComplete"))?,
            destroy: *lib.get::<LinkDestroy>(b"cuLinkDestroy").map_err(|_| missing("cuLinkDestroy"))?,
        })
    }
}

/// Option arrays in the form the driver reads (and writes back into).
struct Options {
    keys: Vec<c_int>,
    values: Vec<*mut c_void>,
}

impl Options {
    fn scalar(options: &[(u32, u64)]) -> DeviceResult<Self> {
        let mut out = Options { keys: Vec::with_capacity(options.len() + 5), values: Vec::new() };
        for &(option, value) in options {
            if !link_option_is_scalar(option) {
                return Err(CallError::invalid_value(format!("JIT option {option} cannot be sent over the network")));
            }
            out.push(option as c_int, value as usize as *mut c_void);
        }
        Ok(out)
    }

    fn push(&mut self, key: c_int, value: *mut c_void) {
        self.keys.push(key);
        self.values.push(value);
    }

    fn value_of(&self, key: c_int) -> Option<usize> {
        self.keys.iter().position(|&k| k == key).map(|i| self.values[i] as usize)
    }
}

/// A driver link state and everything the driver may write into until it
/// is destroyed.
struct LinkState {
    raw: sys::CUlinkState,
    destroy: LinkDestroy,
    options: Options,
    info_log: Vec<u8>,
    error_log: Vec<u8>,
}

impl Drop for LinkState {
    fn drop(&mut self) {
        // SAFETY: `raw` came from cuLinkCreate_v2 and is destroyed only
        // here; the option arrays and log buffers it references are fields
        // of `self`, still alive.
        let r = unsafe { (self.destroy)(self.raw) };
        if r != 0 {
            tracing::warn!(code = r, "cuLinkDestroy failed");
        }
    }
}

impl LinkState {
    /// The log the driver wrote into `buf`, up to its NUL.
    fn log(buf: &[u8], filled: Option<usize>) -> Vec<u8> {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        buf[..end.min(filled.unwrap_or(end))].to_vec()
    }

    fn logs(&self) -> (Vec<u8>, Vec<u8>) {
        (
            Self::log(&self.info_log, self.options.value_of(INFO_LOG_SIZE)),
            Self::log(&self.error_log, self.options.value_of(ERROR_LOG_SIZE)),
        )
    }
}

/// Links the request's inputs. A driver refusal (bad PTX, unresolved
/// symbols) is an `Ok` output whose `cubin` is the error, so the logs
/// still reach the application.
pub(super) fn link(request: &LinkRequest) -> DeviceResult<LinkOutput> {
    let api = api()?;
    let mut options = Options::scalar(&request.options)?;
    let mut info_log = vec![0u8; request.info_log_bytes];
    let mut error_log = vec![0u8; request.error_log_bytes];
    options.push(WALL_TIME, std::ptr::null_mut());
    if !info_log.is_empty() {
        options.push(INFO_LOG, info_log.as_mut_ptr().cast());
        options.push(INFO_LOG_SIZE, info_log.len() as *mut c_void);
    }
    if !error_log.is_empty() {
        options.push(ERROR_LOG, error_log.as_mut_ptr().cast());
        options.push(ERROR_LOG_SIZE, error_log.len() as *mut c_void);
    }
    let mut raw: sys::CUlinkState = std::ptr::null_mut();
    // SAFETY: both arrays hold `keys.len()` entries; every value is a plain
    // number except the log buffers, which point to writable buffers of
    // the sizes passed beside them. The arrays and buffers move into the
    // `LinkState` below (moving a `Vec` keeps its heap buffer), which keeps
    // them until cuLinkDestroy.
    let r = unsafe {
        (api.create)(options.keys.len() as c_uint, options.keys.as_mut_ptr(), options.values.as_mut_ptr(), &mut raw)
    };
    if r != 0 {
        return Err(driver::error_of_raw(r, "cuLinkCreate_v2"));
    }
    let state = LinkState { raw, destroy: api.destroy, options, info_log, error_log };

    for input in &request.inputs {
        let mut input_options = Options::scalar(&input.options)?;
        let name = CString::new(input.name.replace('\0', " ")).unwrap_or_default();
        // PTX must end in a NUL; binary inputs go as they came.
        let mut data = input.data.to_vec();
        if input.kind == INPUT_PTX && data.last() != Some(&0) {
            data.push(0);
        }
        // SAFETY: a live link state; `data` holds `len` readable bytes that
        // the driver copies or compiles before returning; `name` is
        // NUL-terminated; the option arrays hold `len` plain-number entries.
        let r = unsafe {
            (api.add_data)(
                state.raw,
                input.kind as c_int,
                data.as_mut_ptr().cast(),
                data.len(),
                name.as_ptr(),
                input_options.keys.len() as c_uint,
                input_options.keys.as_mut_ptr(),
                input_options.values.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Ok(output(&state, Err(driver::error_of_raw(r, &format!("cuLinkAddData_v2({})", input.name)))));
        }
    }

    let mut cubin: *mut c_void = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: a live link state and valid out-pointers; the image the
    // driver returns lives until cuLinkDestroy, and is copied before.
    let r = unsafe { (api.complete)(state.raw, &mut cubin, &mut size) };
    let image = if r != 0 {
        Err(driver::error_of_raw(r, "cuLinkComplete"))
    } else if cubin.is_null() {
        Err(CallError::new(cuda::UNKNOWN, "cuLinkComplete returned no image"))
    } else {
        // SAFETY: on success the driver returns `size` readable bytes owned
        // by the link state, which is still alive.
        Ok(unsafe { std::slice::from_raw_parts(cubin.cast::<u8>(), size) }.to_vec())
    };
    Ok(output(&state, image))
}

fn output(state: &LinkState, cubin: Result<Vec<u8>, CallError>) -> LinkOutput {
    let (info_log, error_log) = state.logs();
    // The driver overwrites the wall time's slot with the float's bits.
    let wall_time_ms = state.options.value_of(WALL_TIME).map_or(0.0, |bits| f32::from_bits(bits as u32));
    let threads_per_block =
        state.options.value_of(THREADS_PER_BLOCK as c_int).and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    LinkOutput { cubin, info_log, error_log, wall_time_ms, threads_per_block }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::device::cuda::CudaDevice;
    use crate::device::{ACCESS_READWRITE, Backend, BackendSession, LinkInput};

    const MAIN_PTX: &str = ".version 7.5\n.target sm_75\n.address_size 64\n\
        .extern .func (.param .b32 r) twice(.param .b32 x);\n\
        .visible .entry k(.param .u64 out)\n{\n.reg .b32 %r<3>;\n.reg .b64 %rd<3>;\n\
        ld.param.u64 %rd1, [out];\ncvta.to.global.u64 %rd2, %rd1;\nmov.u32 %r1, 21;\n\
        {\n.param .b32 p0;\nst.param.b32 [p0], %r1;\n.param .b32 r0;\n\
        call.uni (r0), twice, (p0);\nld.param.b32 %r2, [r0];\n}\n\
        st.global.u32 [%rd2], %r2;\nret;\n}\n";
    const LIB_PTX: &str = ".version 7.5\n.target sm_75\n.address_size 64\n\
        .visible .func (.param .b32 r) twice(.param .b32 x)\n{\n.reg .b32 %r<3>;\n\
        ld.param.u32 %r1, [x];\nshl.b32 %r2, %r1, 1;\nst.param.b32 [r], %r2;\nret;\n}\n";

    fn ptx(name: &str, text: &'static str) -> LinkInput {
        LinkInput {
            kind: INPUT_PTX,
            name: name.into(),
            data: bytes::Bytes::from_static(text.as_bytes()),
            options: vec![],
        }
    }

    /// The linker and VMM aliasing on a real GPU; skipped where there is
    /// no CUDA device.
    #[test]
    fn link_and_aliases_on_a_gpu() {
        let dev = match CudaDevice::open(0) {
            Err(e) if e.code == cuda::NO_DEVICE => {
                eprintln!("no CUDA device: skipping ({e})");
                return;
            }
            other => other.expect("open device 0"),
        };
        let g = dev.description().granularity;
        let mut s = dev.open_session(8 * g).expect("session");
        let request = LinkRequest {
            options: vec![(12, 1)],
            inputs: vec![ptx("main.ptx", MAIN_PTX), ptx("lib.ptx", LIB_PTX)],
            info_log_bytes: 4096,
            error_log_bytes: 4096,
        };
        let out = s.link(&request).expect("link");
        let cubin = out.cubin.expect("linked");
        assert_eq!(&cubin[..4], b"\x7fELF");
        assert!(!out.info_log.is_empty(), "verbose info log");
        let (module, functions) = s.load_module(&cubin).expect("load the cubin");
        assert_eq!(functions[0].name, "k");

        // One allocation at two addresses; the kernel writes through one.
        let base = s.va_base();
        let allocation = s.create(g).expect("create");
        let a = s.map_allocation(&allocation, 0, base, g).expect("map a");
        let b = s.map_allocation(&allocation, 0, base + 4 * g, g).expect("map b");
        s.set_access(&a, ACCESS_READWRITE).expect("access a");
        s.set_access(&b, ACCESS_READWRITE).expect("access b");
        let dims = crate::device::LaunchDims { grid: [1; 3], block: [1; 3], shared_mem_bytes: 0 };
        s.launch(
            &module,
            0,
            dims,
            &crate::device::LaunchAttrs::default(),
            crate::device::LaunchEvents::default(),
            None,
            &base.to_le_bytes(),
        )
        .expect("launch");
        let mut back = [0u8; 4];
        s.read(None, base + 4 * g, &mut back).expect("read the alias");
        assert_eq!(u32::from_le_bytes(back), 42);

        let missing = LinkRequest { inputs: vec![ptx("main.ptx", MAIN_PTX)], ..request };
        let out = s.link(&missing).expect("the call itself works");
        assert!(out.cubin.is_err(), "unresolved function");
        assert!(!out.error_log.is_empty(), "error log says why");
    }

    #[test]
    fn logs_stop_at_the_nul_or_the_filled_size() {
        assert_eq!(LinkState::log(b"abc\0\0\0", None), b"abc");
        assert_eq!(LinkState::log(b"abcdef", Some(4)), b"abcd");
        assert_eq!(LinkState::log(b"", Some(9)), b"");
    }

    #[test]
    fn only_scalar_options_reach_the_driver() {
        assert!(Options::scalar(&[(0, 32), (7, 4), (9, 90)]).is_ok());
        for pointer_option in [3, 5, 17, 18, 25, 27] {
            let err = Options::scalar(&[(pointer_option, 1)]).err().expect("refused");
            assert_eq!(err.code, cuda::INVALID_VALUE);
        }
    }
}
