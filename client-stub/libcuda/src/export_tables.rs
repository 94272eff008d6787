//! `cuGetExportTable`: private function tables the CUDA runtime (static
//! and shared) and NVIDIA's libraries ask the driver for, keyed by UUID.
//!
//! Their layouts are not documented by NVIDIA; what is known publicly
//! (slot numbers, signatures, and the integrity check, from the ZLUDA
//! project's findings) is re-implemented here from those facts:
//! - most tables start with their own size in bytes;
//! - the runtime loads registered fatbins through `CUDART_INTERFACE`
//!   (slots 1, 6, 8) and keeps per-context state in the context-local
//!   storage table;
//! - CUDA 12.3+ runtimes ask `INTEGRITY_CHECK` for an HMAC-MD2 over the
//!   process, the tables and the devices, and compare it with their own.
//!
//! Slots with no known meaning hold a function that logs the table and
//! slot and returns `CUDA_ERROR_NOT_SUPPORTED`, so a new use shows up in
//! the log instead of as a jump to address zero. Unknown table UUIDs are
//! logged with the UUID.

use crate::abi::{CuError, CuResult, put};
use crate::device::{self, API_VERSION};
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUcontext, CUdevice, CUfunction, CUmodule, CUresult, CUstream, CUuuid};
use hmac::{Mac, SimpleHmac};
use std::ffi::{c_char, c_uint, c_void};

type Slot = *const c_void;

/// A table as the runtime reads it: an array of machine words.
#[repr(C)]
pub(crate) struct Table<const N: usize>([Slot; N]);

// SAFETY: the tables are immutable arrays of function addresses.
unsafe impl<const N: usize> Sync for Table<N> {}

impl<const N: usize> Table<N> {
    fn start(&'static self) -> *const c_void {
        self.0.as_ptr().cast()
    }
}

/// The first slot of a table holding its own size.
const fn size_slot<const N: usize>() -> Slot {
    (N * std::mem::size_of::<Slot>()) as Slot
}

/// Table names, for the log.
const NAMES: [&str; 12] = [
    "CUDART_INTERFACE",
    "TOOLS_TLS",
    "TOOLS_RUNTIME_CALLBACK_HOOKS",
    "CONTEXT_LOCAL_STORAGE_INTERFACE_V0301",
    "CTX_CREATE_BYPASS",
    "HEAP_ACCESS",
    "DEVICE_EXTENDED_RT",
    "INTEGRITY_CHECK",
    "UNKNOWN_CHECKS",
    "TOOLS_CONTEXT",
    "1734DC26",
    "TOOLS_MODULE",
];

extern "C" fn unknown_slot<const TABLE: usize, const SLOT: usize>() -> CUresult {
    crate::abi::log_quietly(|| {
        gpupool_ffi::init_logging();
        tracing::debug!(
            table = NAMES[TABLE],
            slot = SLOT,
            "the CUDA runtime called an export-table slot gpupool does not implement"
        )
    });
    CUresult::CUDA_ERROR_NOT_SUPPORTED
}

macro_rules! unknown {
    ($t:literal, $s:literal) => {
        unknown_slot::<$t, $s> as Slot
    };
}

// --- CUDART_INTERFACE -------------------------------------------------------

/// The runtime's registered fatbins load through the module API.
fn module_handle(module: *mut CUmodule, wrapper: *const c_void) -> CuResult {
    crate::module::load_module(module, || crate::module::load_ptr(wrapper))
}

unsafe extern "C" fn get_module_from_cubin(module: *mut CUmodule, wrapper: *const c_void) -> CUresult {
    crate::abi::entry("CUDART_INTERFACE[1]", || module_handle(module, wrapper))
}

unsafe extern "C" fn get_primary_context(pctx: *mut CUcontext, dev: CUdevice) -> CUresult {
    // SAFETY: same contract as cuDevicePrimaryCtxRetain.
    unsafe { crate::context::cuDevicePrimaryCtxRetain(pctx, dev) }
}

unsafe extern "C" fn get_module_from_cubin_ext1(
    module: *mut CUmodule,
    wrapper: *const c_void,
    _a3: *mut c_void,
    _a4: *mut c_void,
    _a5: c_uint,
) -> CUresult {
    crate::abi::entry("CUDART_INTERFACE[6]", || module_handle(module, wrapper))
}

unsafe extern "C" fn cudart_interface_fn7(_arg: usize) -> CUresult {
    CUresult::CUDA_SUCCESS
}

unsafe extern "C" fn get_module_from_cubin_ext2(
    fatbin: *const c_void,
    module: *mut CUmodule,
    _a3: *mut c_void,
    _a4: *mut c_void,
    _a5: c_uint,
) -> CUresult {
    crate::abi::entry("CUDART_INTERFACE[8]", || module_handle(module, fatbin))
}

static CUDART_INTERFACE: Table<10> = Table([
    size_slot::<10>(),
    get_module_from_cubin as Slot,
    get_primary_context as Slot,
    unknown!(0, 3),
    unknown!(0, 4),
    unknown!(0, 5),
    get_module_from_cubin_ext1 as Slot,
    cudart_interface_fn7 as Slot,
    get_module_from_cubin_ext2 as Slot,
    unknown!(0, 9),
]);

// --- TOOLS_TLS and TOOLS_RUNTIME_CALLBACK_HOOKS -----------------------------

/// Words in each thread's tools block: more than the runtime touches.
const TOOLS_BLOCK_WORDS: usize = 512;

/// The first word of a fresh block as NVIDIA's driver hands it out.
const TOOLS_BLOCK_HEADER: u64 = 1 << 32;

thread_local! {
    /// The calling thread's tools (profiler) state block: the driver's
    /// header word, then zeroes unless the runtime writes them (no tool is
    /// attached).
    static TOOLS_BLOCK: std::cell::UnsafeCell<[u64; TOOLS_BLOCK_WORDS]> = const {
        let mut words = [0; TOOLS_BLOCK_WORDS];
        words[0] = TOOLS_BLOCK_HEADER;
        std::cell::UnsafeCell::new(words)
    };
}

/// The tools block of threads whose own is already destroyed.
static EXITING_THREAD_BLOCK: Scratch<1024> = Scratch(std::cell::UnsafeCell::new([0; 1024]));

/// Hands the runtime the calling thread's tools block. The runtime asks
/// for it around its API calls once a library such as cuBLAS is loaded and
/// fails the call (`cudaErrorNotSupported`) when this does not succeed;
/// NVIDIA's driver answers with the same heap block on every call of a
/// thread (seen with `bench/diagnostics/tools-tls-probe.c`).
unsafe extern "C" fn tools_tls_block(out: *mut *mut c_void) -> CUresult {
    crate::abi::entry("TOOLS_TLS[2]", || {
        // A thread that is exiting (its thread-local storage destroyed)
        // shares one block: nothing reads it back.
        let block =
            TOOLS_BLOCK.try_with(|b| b.get().cast::<c_void>()).unwrap_or_else(|_| EXITING_THREAD_BLOCK.0.get().cast());
        // SAFETY: out-pointer from the runtime.
        unsafe { put(out, block) }
    })
}

/// Two functions, like NVIDIA's (its size word is 0x18).
static TOOLS_TLS: Table<3> = Table([size_slot::<3>(), unknown!(1, 1), tools_tls_block as Slot]);

/// Scratch buffers the runtime asks the tools hooks for and writes into.
struct Scratch<const N: usize>(std::cell::UnsafeCell<[u32; N]>);

// SAFETY: only the runtime writes these buffers, through the pointer it
// was given; this library never reads them.
unsafe impl<const N: usize> Sync for Scratch<N> {}

static SCRATCH_1: Scratch<1024> = Scratch(std::cell::UnsafeCell::new([0; 1024]));
static SCRATCH_2: Scratch<14> = Scratch(std::cell::UnsafeCell::new([0; 14]));

unsafe extern "C" fn tools_buffer_1(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: out-pointers from the runtime.
    unsafe {
        let _ = put(ptr, SCRATCH_1.0.get().cast());
        let _ = put(size, 1024);
    }
}

unsafe extern "C" fn tools_buffer_2(ptr: *mut *mut c_void, size: *mut usize) {
    // SAFETY: out-pointers from the runtime.
    unsafe {
        let _ = put(ptr, SCRATCH_2.0.get().cast());
        let _ = put(size, 14);
    }
}

static TOOLS_RUNTIME_CALLBACK_HOOKS: Table<7> = Table([
    size_slot::<7>(),
    unknown!(2, 1),
    tools_buffer_1 as Slot,
    unknown!(2, 3),
    unknown!(2, 4),
    unknown!(2, 5),
    tools_buffer_2 as Slot,
]);

// --- CONTEXT_LOCAL_STORAGE_INTERFACE_V0301 (no size slot) --------------------

unsafe extern "C" fn storage_put(ctx: CUcontext, key: *mut c_void, value: *mut c_void, dtor: usize) -> CUresult {
    crate::abi::entry("CONTEXT_LOCAL_STORAGE[0]", || {
        crate::context::storage_put(ctx, key as usize, value as usize, dtor)
    })
}

unsafe extern "C" fn storage_delete(ctx: CUcontext, key: *mut c_void) -> CUresult {
    crate::abi::entry("CONTEXT_LOCAL_STORAGE[1]", || crate::context::storage_delete(ctx, key as usize))
}

unsafe extern "C" fn storage_get(value: *mut *mut c_void, ctx: CUcontext, key: *mut c_void) -> CUresult {
    crate::abi::entry("CONTEXT_LOCAL_STORAGE[2]", || {
        let v = crate::context::storage_get(ctx, key as usize)?;
        // SAFETY: out-pointer from the runtime.
        unsafe { put(value, v as *mut c_void) }
    })
}

static CONTEXT_LOCAL_STORAGE: Table<4> =
    Table([storage_put as Slot, storage_delete as Slot, storage_get as Slot, unknown!(3, 3)]);

// --- CTX_CREATE_BYPASS, HEAP_ACCESS, DEVICE_EXTENDED_RT -----------------------

unsafe extern "C" fn ctx_create_bypass(pctx: *mut CUcontext, flags: c_uint, dev: CUdevice) -> CUresult {
    // SAFETY: same contract as cuCtxCreate_v2.
    unsafe { crate::context::cuCtxCreate_v2(pctx, flags, dev) }
}

static CTX_CREATE_BYPASS: Table<2> = Table([size_slot::<2>(), ctx_create_bypass as Slot]);

static HEAP_ACCESS: Table<3> = Table([size_slot::<3>(), unknown!(5, 1), unknown!(5, 2)]);

static DEVICE_EXTENDED_RT: Table<26> = Table([
    size_slot::<26>(),
    unknown!(6, 1),
    unknown!(6, 2),
    unknown!(6, 3),
    unknown!(6, 4),
    unknown!(6, 5),
    unknown!(6, 6),
    unknown!(6, 7),
    unknown!(6, 8),
    unknown!(6, 9),
    unknown!(6, 10),
    unknown!(6, 11),
    unknown!(6, 12),
    unknown!(6, 13),
    unknown!(6, 14),
    unknown!(6, 15),
    unknown!(6, 16),
    unknown!(6, 17),
    unknown!(6, 18),
    unknown!(6, 19),
    unknown!(6, 20),
    unknown!(6, 21),
    unknown!(6, 22),
    unknown!(6, 23),
    unknown!(6, 24),
    unknown!(6, 25),
]);

// --- INTEGRITY_CHECK and UNKNOWN_CHECKS ----------------------------------------

/// The HMAC key: a fixed 16-byte value both sides derive the same way.
const INTEGRITY_KEY: [u8; 16] =
    [0x14, 0x6A, 0xDD, 0xAE, 0x53, 0xA9, 0xA7, 0x52, 0xAA, 0x08, 0x41, 0x36, 0x0B, 0xF5, 0x5A, 0x9F];

/// What the check hashes about the process, in this layout.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct IntegrityInput {
    pub(crate) driver_version: u32,
    pub(crate) version: u32,
    pub(crate) process: u32,
    pub(crate) thread: u32,
    pub(crate) cudart_table: usize,
    pub(crate) integrity_table: usize,
    pub(crate) function: usize,
    pub(crate) unix_seconds: u64,
}

/// What it hashes about each device, in this layout.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeviceInput {
    pub(crate) uuid: [u8; 16],
    pub(crate) pci_domain: i32,
    pub(crate) pci_bus: i32,
    pub(crate) pci_device: i32,
}

fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: `T` is a repr(C) struct of integers without padding (checked
    // by the size assertions below); any byte of it may be read.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

const _: () = assert!(std::mem::size_of::<IntegrityInput>() == 48);
const _: () = assert!(std::mem::size_of::<DeviceInput>() == 28);

/// The integrity answer: HMAC-MD2 of the process and device facts, or a
/// fixed value for the check versions that ask for one.
pub(crate) fn integrity_hash(input: &IntegrityInput, devices: &[DeviceInput]) -> [u64; 2] {
    match input.version % 10 {
        0 => return [0x3341181C03CB675C, 0x8ED383AA1F4CD1E8],
        1 => return [0x1841181C03CB675C, 0x8ED383AA1F4CD1E8],
        _ => {}
    }
    let mut mac = <SimpleHmac<md2::Md2> as Mac>::new_from_slice(&INTEGRITY_KEY).expect("HMAC takes any key length");
    mac.update(bytes_of(input));
    for d in devices {
        mac.update(bytes_of(d));
    }
    let out = mac.finalize().into_bytes();
    let word = |i: usize| u64::from_ne_bytes(out[i..i + 8].try_into().expect("8 bytes"));
    [word(0), word(8)]
}

fn device_inputs(rt: &Runtime) -> Vec<DeviceInput> {
    let a = |n| device::attribute(rt, n).unwrap_or(0);
    vec![DeviceInput {
        uuid: device::uuid_bytes(&rt.device.uuid),
        pci_domain: a(50),
        pci_bus: a(33),
        pci_device: a(34),
    }]
}

unsafe extern "C" fn integrity_check(version: c_uint, unix_seconds: u64, result: *mut [u64; 2]) -> CUresult {
    crate::abi::entry("INTEGRITY_CHECK[1]", || {
        let rt = Runtime::get()?;
        let input = IntegrityInput {
            driver_version: API_VERSION as u32,
            version,
            process: std::process::id(),
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() } as u32,
            cudart_table: CUDART_INTERFACE.start() as usize,
            integrity_table: INTEGRITY_CHECK.start() as usize,
            function: INTEGRITY_CHECK.0[1] as usize,
            unix_seconds,
        };
        let hash = integrity_hash(&input, &device_inputs(rt));
        // SAFETY: out-pointer from the runtime.
        unsafe { put(result, hash) }
    })
}

static INTEGRITY_CHECK: Table<3> = Table([size_slot::<3>(), integrity_check as Slot, unknown!(7, 2)]);

unsafe extern "C" fn context_check(_ctx: CUcontext, flag: *mut u32, _extra: *mut *const c_void) -> CUresult {
    // SAFETY: out-pointer from the runtime.
    crate::abi::entry("UNKNOWN_CHECKS[2]", || unsafe { put(flag, 0) })
}

extern "C" fn check_fn3() -> u32 {
    0
}

static UNKNOWN_CHECKS: Table<4> = Table([size_slot::<4>(), unknown!(8, 1), context_check as Slot, check_fn3 as Slot]);

// --- TOOLS_CONTEXT (21318C60-…): context and module facts for tools --------

/// Asked with the calling thread's tools block (`TOOLS_TLS[2]`) before
/// every runtime call once cuBLAS is loaded; NVIDIA's driver writes 1 for a
/// thread's block (seen with `bench/diagnostics/export-table-probe.c`), and
/// the runtime fails the call (`cublasSgemm` answered
/// `CUBLAS_STATUS_NOT_SUPPORTED`) when this does not succeed.
unsafe extern "C" fn tools_block_state(block: *mut c_void, out: *mut u64) -> CUresult {
    crate::abi::entry("TOOLS_CONTEXT[4]", || {
        if block.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        // SAFETY: out-pointer from the caller.
        unsafe { put(out, 1) }
    })
}

/// An object standing for `stream`, for [`stream_id_of`]. cuBLAS reads the
/// id of the stream it launches on this way (`bench/diagnostics/tools-context-probe.c`
/// shows NVIDIA's driver answering slot 51, then slot 39 with the stream's
/// `cuStreamGetId`).
unsafe extern "C" fn stream_object(_block: *mut c_void, stream: CUstream, out: *mut *const u64) -> CUresult {
    crate::abi::entry("TOOLS_CONTEXT[51]", || {
        let obj = crate::stream::stream_object(stream)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(out, obj) }
    })
}

/// The id of the stream behind an object from [`stream_object`].
unsafe extern "C" fn stream_id_of(_block: *mut c_void, obj: *const u64, out: *mut u64) -> CUresult {
    crate::abi::entry("TOOLS_CONTEXT[39]", || {
        let id = crate::stream::stream_object_id(obj)?;
        // SAFETY: out-pointer from the caller.
        unsafe { put(out, id) }
    })
}

macro_rules! tools_context_slots {
    ($($slot:literal)*) => {
        [size_slot::<93>(), $(match $slot {
            4 => tools_block_state as Slot,
            39 => stream_id_of as Slot,
            51 => stream_object as Slot,
            _ => unknown_slot::<9, $slot> as Slot,
        }),*]
    };
}

/// 92 functions, like NVIDIA's driver 580 (its size word is 0x2e8).
static TOOLS_CONTEXT: Table<93> = Table(tools_context_slots!(
    1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30
    31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60
    61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90
    91 92
));

// --- 1734DC26-… and TOOLS_MODULE (6E163FBE-…) --------------------------------

/// A table of `N` words: its size, then slots that log and answer
/// `CUDA_ERROR_NOT_SUPPORTED`.
macro_rules! logging_table {
    ($table:literal, $n:literal; $($slot:literal)*) => {
        Table::<$n>([size_slot::<$n>(), $(unknown_slot::<$table, $slot> as Slot),*])
    };
}

/// Asked for by cuBLAS on PyTorch's bf16/fp16 paths; NVIDIA's driver 580 has
/// 16 functions here (size word 0x88). Answering the UUID with an error
/// crashed the process (the caller uses the table regardless). Natively the
/// caller calls slot 4 (two out-pointers: the driver allocates two objects)
/// and then slot 13 with them; answering slot 4 with an error is taken as
/// "not available" and cuBLAS carries on (bf16 and fp16 GEMMs correct on the
/// H200, `bench/results/*-compat.md`).
static TABLE_1734DC26: Table<17> = logging_table!(10, 17; 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);

/// What TOOLS_MODULE[7] calls for each function of a module.
type FunctionVisitor = unsafe extern "C" fn(user: *mut c_void, function: CUfunction, name: *const c_char, zero: usize);

/// Calls `visit(user, function, name, 0)` for every function of `module`
/// and returns how many it visited. cuFFT finds the kernel of each module it
/// loads this way instead of by name. Established on the H200 with
/// `bench/diagnostics/export-table-probe.c` (`PROBE_CALLBACK_SLOTS=6e163fbe:7:2`):
/// NVIDIA's driver calls the visitor once per function (cuFFT's modules hold
/// one kernel each; `cuFuncGetName` of its second argument names it) and
/// answers 1; the visitor stores the function through `user`.
unsafe extern "C" fn module_each_function(
    _ctx: CUcontext,
    module: CUmodule,
    visit: Option<FunctionVisitor>,
    user: *mut c_void,
) -> c_uint {
    let mut visited = 0;
    let status = crate::abi::entry("TOOLS_MODULE[7]", || {
        let visit = visit.ok_or(CuError::INVALID_VALUE)?;
        let rt = Runtime::get()?;
        let m = rt.module(module as usize, crate::runtime::Tag::Module)?;
        for (i, f) in m.functions.iter().enumerate() {
            let handle = crate::runtime::function_handle(crate::runtime::Tag::Function, m.id, i as u32);
            // SAFETY: the caller's visitor, with the arguments the driver
            // passes it (see above).
            unsafe { visit(user, handle as CUfunction, crate::abi::intern(&f.name), 0) };
            visited += 1;
        }
        Ok(())
    });
    if status != CUresult::CUDA_SUCCESS {
        crate::abi::log_quietly(|| tracing::debug!(?status, "TOOLS_MODULE[7] visited no function"));
    }
    visited
}

macro_rules! tools_module_slots {
    ($($slot:literal)*) => {
        [size_slot::<99>(), $(match $slot {
            7 => module_each_function as Slot,
            _ => unknown_slot::<11, $slot> as Slot,
        }),*]
    };
}

/// The tools module table, asked for by cuFFT; 98 functions in driver 580
/// (size word 0x318).
static TOOLS_MODULE: Table<99> = Table(tools_module_slots!(
    1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30
    31 32 33 34 35 36 37 38 39 40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59 60
    61 62 63 64 65 66 67 68 69 70 71 72 73 74 75 76 77 78 79 80 81 82 83 84 85 86 87 88 89 90
    91 92 93 94 95 96 97 98
));

/// The UUID's bytes as CUDA stores them, from its text form.
const fn uuid(text: &[u8; 36]) -> [u8; 16] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("not a hex digit"),
        }
    }
    let mut out = [0u8; 16];
    let (mut i, mut o) = (0, 0);
    while i < 36 {
        if text[i] == b'-' {
            i += 1;
            continue;
        }
        out[o] = nibble(text[i]) << 4 | nibble(text[i + 1]);
        o += 1;
        i += 2;
    }
    out
}

/// Every table by UUID.
fn table_for(id: &[u8; 16]) -> Option<*const c_void> {
    const IDS: [([u8; 16], usize); 12] = [
        (uuid(b"6BD5FB6C-5BF4-E74A-8987-D93912FD9DF9"), 0),
        (uuid(b"42D85A81-23F6-CB47-8298-F6E78A3AECDC"), 1),
        (uuid(b"A094798C-2E74-2E74-93F2-0800200C0A66"), 2),
        (uuid(b"C693336E-1121-DF11-A8C3-68F355D89593"), 3),
        (uuid(b"0CA50B8C-1004-929A-89A7-D0DF10E77286"), 4),
        (uuid(b"195BCBF4-D67D-024A-ACC5-1D29CEA631AE"), 5),
        (uuid(b"B10541E1-F7C7-C74A-9F64-F223BE99F1E2"), 6),
        (uuid(b"D4082055-BDE6-704B-8D34-BA123C66E1F2"), 7),
        (uuid(b"263E8860-7CD2-6143-92F6-BBD5006DFA7E"), 8),
        (uuid(b"21318C60-9714-3248-8CA6-41FF7324C8F2"), 9),
        (uuid(b"1734DC26-800D-4745-8726-C0F1E7DD8BCA"), 10),
        (uuid(b"6E163FBE-B958-444D-835C-E182AFF1991E"), 11),
    ];
    let index = IDS.iter().find(|(u, _)| u == id)?.1;
    tracing::debug!(table = NAMES[index], "export table requested");
    Some(match index {
        0 => CUDART_INTERFACE.start(),
        1 => TOOLS_TLS.start(),
        2 => TOOLS_RUNTIME_CALLBACK_HOOKS.start(),
        3 => CONTEXT_LOCAL_STORAGE.start(),
        4 => CTX_CREATE_BYPASS.start(),
        5 => HEAP_ACCESS.start(),
        6 => DEVICE_EXTENDED_RT.start(),
        7 => INTEGRITY_CHECK.start(),
        8 => UNKNOWN_CHECKS.start(),
        9 => TOOLS_CONTEXT.start(),
        10 => TABLE_1734DC26.start(),
        _ => TOOLS_MODULE.start(),
    })
}

fn format_uuid(b: &[u8; 16]) -> String {
    let h = hex::encode_upper(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

crate::exports! {
    fn cuGetExportTable(table: *mut *const c_void, id: *const CUuuid) {
        // SAFETY: in-pointer per the CUDA API.
        let id = unsafe { crate::abi::get(id) }?.bytes.map(|b| b as u8);
        match table_for(&id) {
            // SAFETY: out-pointer per the CUDA API.
            Some(t) => unsafe { put(table, t) },
            None => {
                gpupool_ffi::init_logging();
                tracing::debug!(uuid = %format_uuid(&id), "unknown export table requested; answering CUDA_ERROR_INVALID_VALUE");
                Err(CuError::INVALID_VALUE)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_in_cuda_byte_order() {
        let u = uuid(b"6BD5FB6C-5BF4-E74A-8987-D93912FD9DF9");
        assert_eq!(u, [0x6b, 0xd5, 0xfb, 0x6c, 0x5b, 0xf4, 0xe7, 0x4a, 0x89, 0x87, 0xd9, 0x39, 0x12, 0xfd, 0x9d, 0xf9]);
        assert_eq!(format_uuid(&u), "6BD5FB6C-5BF4-E74A-8987-D93912FD9DF9");
        assert!(table_for(&u).is_some());
        assert!(table_for(&[0; 16]).is_none());
    }

    #[test]
    fn tables_start_with_their_size() {
        // SAFETY: reading the first word of a static table.
        let first = unsafe { *(CUDART_INTERFACE.start() as *const usize) };
        assert_eq!(first, 80);
        // SAFETY: as above.
        assert_eq!(unsafe { *(DEVICE_EXTENDED_RT.start() as *const usize) }, 26 * 8);
        // The sizes NVIDIA's driver 580 reports for these two.
        // SAFETY: as above.
        assert_eq!(unsafe { *(TOOLS_TLS.start() as *const usize) }, 0x18);
        // SAFETY: as above.
        assert_eq!(unsafe { *(TOOLS_CONTEXT.start() as *const usize) }, 0x2e8);
    }

    #[test]
    fn tools_blocks_are_per_thread_and_state_is_one() {
        let block = || {
            let mut p = std::ptr::null_mut();
            // SAFETY: a valid out-pointer.
            assert_eq!(unsafe { tools_tls_block(&mut p) }, CUresult::CUDA_SUCCESS);
            p as usize
        };
        let here = block();
        assert_ne!(here, 0);
        assert_eq!(block(), here, "one block per thread");
        // SAFETY: the block is this thread's, at least one word long.
        assert_eq!(unsafe { *(here as *const u64) }, TOOLS_BLOCK_HEADER);
        let there = std::thread::spawn(block).join().expect("thread");
        assert_ne!(there, here);
        let mut state = 0u64;
        // SAFETY: a live block and a valid out-pointer.
        assert_eq!(unsafe { tools_block_state(here as *mut c_void, &mut state) }, CUresult::CUDA_SUCCESS);
        assert_eq!(state, 1);
        // SAFETY: a null block is refused before anything is written.
        assert_ne!(unsafe { tools_block_state(std::ptr::null_mut(), &mut state) }, CUresult::CUDA_SUCCESS);
        let mut id = 0u64;
        // SAFETY: an object this library never handed out is refused.
        assert_ne!(unsafe { stream_id_of(std::ptr::null_mut(), [1u64, 9].as_ptr(), &mut id) }, CUresult::CUDA_SUCCESS);
    }

    /// HMAC-MD2 built by hand from MD2, to pin the construction the check
    /// uses: MD2 over (key ^ 0x5c) and MD2 over (key ^ 0x36) || message.
    #[test]
    fn integrity_is_hmac_md2() {
        use md2::Digest;
        let input = IntegrityInput {
            driver_version: 13000,
            version: 12082,
            process: 4242,
            thread: 77,
            cudart_table: 0x1000,
            integrity_table: 0x2000,
            function: 0x3000,
            unix_seconds: 1_790_000_000,
        };
        let dev = DeviceInput { uuid: [5; 16], pci_domain: 0, pci_bus: 0x1b, pci_device: 0 };
        let inner = md2::Md2::new()
            .chain_update(INTEGRITY_KEY.map(|b| b ^ 0x36))
            .chain_update(bytes_of(&input))
            .chain_update(bytes_of(&dev))
            .finalize();
        let outer = md2::Md2::new().chain_update(INTEGRITY_KEY.map(|b| b ^ 0x5c)).chain_update(inner).finalize();
        let expect =
            [u64::from_ne_bytes(outer[..8].try_into().unwrap()), u64::from_ne_bytes(outer[8..].try_into().unwrap())];
        assert_eq!(integrity_hash(&input, &[dev]), expect);
        let fixed = IntegrityInput { version: 12080, ..input };
        assert_eq!(integrity_hash(&fixed, &[dev])[1], 0x8ED383AA1F4CD1E8);
    }
}
