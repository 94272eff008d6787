//! gpupool's drop-in `libnvidia-ml.so.1`: NVML for the remote virtual GPU.
//!
//! Tools and frameworks (PyTorch, pynvml, NCCL, nvidia-smi-like monitors)
//! ask NVML what GPUs the machine has. On a gpupool client the GPU is in
//! another machine, reached through gpupool's `libcuda.so.1`; this library
//! answers NVML's questions from that same driver API instead of opening a
//! session of its own. A process therefore has one session, and the memory
//! NVML reports as used is what the process's CUDA allocations took.
//!
//! - [`abi`]: the border (panic boundary, pointer checks, return codes);
//! - [`error`]: the crate's error type and NVML's error strings;
//! - `driver`: the CUDA driver API as loaded from `libcuda.so.1`, behind a
//!   trait so the core is tested without a library;
//! - `gpu`: what NVML says about one device, derived from the driver's
//!   answers (UUID text, PCI bus id, architecture, ...);
//! - `state`: `nvmlInit`/`nvmlShutdown` reference counting and the device
//!   handles;
//! - [`system`], [`device`]: the implemented NVML entry points;
//! - [`unsupported`]: every other NVML entry point, returning
//!   `NVML_ERROR_NOT_SUPPORTED`.
//!
//! Known gaps (see README.md): utilization, clocks, power, temperature and
//! the processes on the GPU are not known to the client and are reported as
//! not supported (or as no processes); nothing is made up.
//!
//! `unsafe` is allowed in this crate only because it is an FFI border: it
//! exports C functions and calls into a dlopen'ed library. Every block
//! carries a `// SAFETY:` line; the contract of each pointer argument is
//! NVML's (callers) or the CUDA driver API's (libcuda).
#![allow(unsafe_code)]
#![allow(non_snake_case)]

/// Defines exported NVML functions. Each body runs inside [`abi::entry`]
/// and returns `Result<(), error::Error>`.
macro_rules! exports {
    ($( $(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block )*) => {
        $(
            $(#[$m])*
            ///
            /// # Safety
            /// Pointer arguments follow NVML's contract: null or valid for
            /// the access the function makes.
            #[unsafe(no_mangle)]
            pub unsafe extern "C" fn $name($($arg: $ty),*) -> nvml_wrapper_sys::bindings::nvmlReturn_t {
                $crate::abi::entry(stringify!($name), || -> Result<(), $crate::error::Error> { $body })
            }
        )*
        /// This module's exports, for the symbol-list check.
        #[cfg(test)]
        pub(crate) const EXPORTED: &[&str] = &[$(stringify!($name)),*];
    };
}

pub mod abi;
pub mod device;
mod driver;
pub mod error;
mod gpu;
mod state;
pub mod system;
pub mod unsupported;
