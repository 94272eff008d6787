//! gpupool's drop-in `libcuda.so.1`.
//!
//! Programs, the CUDA runtime (static or shared) and libraries such as
//! cuBLAS load this library in place of NVIDIA's driver and get a remote
//! virtual GPU: every export is a thin, checked call into the tested client
//! core ([`gpupool_client::Session`]). The CUDA runtime stays in the
//! application; its kernels reach the server as module images.
//!
//! - [`abi`]: the border (panic boundary, pointer checks, error codes);
//! - [`runtime`]: the session and the handle tables;
//! - [`device`], [`context`], [`memory`], [`module`], [`launch`], [`stream`]:
//!   the driver API by area; [`library`]: libraries, loaded on the server
//!   at first use; [`fatbin`]: fatbins cut to this GPU's code before they
//!   are sent;
//! - `mapped`: mapped host memory, mirrored by device memory;
//! - [`vmm`], [`link`]: virtual memory management for applications and
//!   the JIT linker;
//! - [`graph`] (the sans-I/O core) and [`graph_api`]: CUDA graphs as
//!   client-side objects, replayed as queued calls at launch; [`capture`]:
//!   stream capture, the one "capturing?" check of every stream call;
//!   [`mempool`]: the stream-ordered allocator and graph memory;
//! - [`tensor_map`]: TMA descriptors, encoded by the server's driver;
//! - [`texture`]: arrays, 3D copies, texture and surface objects;
//! - [`proc_address`]: `cuGetProcAddress` over every export;
//! - [`export_tables`]: `cuGetExportTable`, the runtime's private tables;
//! - [`unsupported`]: entry points that return `CUDA_ERROR_NOT_SUPPORTED`;
//! - [`legacy`]: the pre-rename symbols NVIDIA's driver still exports.
//!
//! `unsafe` is allowed in this crate only: it is an FFI border. Every block
//! carries a `// SAFETY:` line; the contract of each pointer argument is the
//! CUDA driver API's.
#![allow(unsafe_code)]
#![allow(non_snake_case)]

/// Defines exported driver functions and a `table()` of them for
/// `cuGetProcAddress`. Each body runs inside [`abi::entry`].
#[macro_export]
#[doc(hidden)]
macro_rules! exports {
    ($( $(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block )*) => {
        $(
            $(#[$m])*
            ///
            /// # Safety
            /// Pointer arguments follow the CUDA driver API's contract.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> cudarc::driver::sys::CUresult {
                $crate::abi::entry(stringify!($name), || -> $crate::abi::CuResult { $body })
            }
        )*
        /// This module's exports, for `cuGetProcAddress`.
        pub(crate) fn table() -> Vec<(&'static str, usize)> {
            vec![$((stringify!($name), $name as *const () as usize)),*]
        }
    };
}

/// Defines exported driver functions that answer `CUDA_ERROR_NOT_SUPPORTED`
/// and log their name once, and a `table()` of them for `cuGetProcAddress`.
///
/// The stubs take no parameters: under the C calling conventions of the
/// platforms gpupool ships for (x86-64 and AArch64 System V), the caller
/// passes and cleans up the arguments, so a callee that ignores them is
/// safe whatever the real signature.
#[macro_export]
#[doc(hidden)]
macro_rules! unsupported {
    ($($name:ident)*) => {
        $(
            #[unsafe(no_mangle)]
            pub extern "C" fn $name() -> cudarc::driver::sys::CUresult {
                $crate::abi::unsupported(stringify!($name))
            }
        )*
        /// The stubs, for `cuGetProcAddress`.
        pub(crate) fn table() -> Vec<(&'static str, usize)> {
            vec![$((stringify!($name), $name as *const () as usize)),*]
        }
    };
}

pub mod abi;
pub mod batch;
pub mod call_stats;
pub mod capture;
mod codes;
pub mod context;
pub mod device;
mod env;
pub mod export_tables;
pub mod fatbin;
pub mod graph;
pub mod graph_api;
mod hostmem;
mod image;
pub mod launch;
pub mod legacy;
pub mod legacy_launch;
pub mod library;
pub mod link;
pub mod managed;
mod mapped;
pub mod mem_ops;
pub mod memory;
pub mod mempool;
pub mod module;
pub mod proc_address;
pub mod runtime;
pub mod stream;
pub mod tensor_map;
pub mod texture;
pub mod unsupported;
pub mod user_object;
pub mod vmm;
