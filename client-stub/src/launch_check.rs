//! Launch configurations checked before a launch is queued, as the CUDA
//! driver checks them in `cuLaunchKernel`: a bad configuration fails the
//! launch call itself and latches nothing, so the next synchronization
//! succeeds. The limits come from the device attributes of the `Welcome`
//! and the function's attributes from its module load (as raised by
//! `cuFuncSetAttribute`).
//!
//! The codes, in the driver's order of checks (confirmed on the GPU by
//! `tests/programs/launch_config.cu`):
//! - a zero dimension, a block dimension over MAX_BLOCK_DIM_X/Y/Z, more
//!   threads per block than the device's MAX_THREADS_PER_BLOCK, a grid
//!   dimension over MAX_GRID_DIM_X/Y/Z: `CUDA_ERROR_INVALID_VALUE`;
//! - more threads than the function's MAX_THREADS_PER_BLOCK (its register
//!   use allows): `CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES`;
//! - dynamic shared memory over the function's MAX_DYNAMIC_SHARED_SIZE_BYTES,
//!   or static plus dynamic over the device's per-block opt-in maximum:
//!   `CUDA_ERROR_INVALID_VALUE`;
//! - a cluster that does not divide the grid, or of more than 8 blocks (16
//!   with NON_PORTABLE_CLUSTER_SIZE_ALLOWED): `CUDA_ERROR_INVALID_CLUSTER_SIZE`.

use crate::error::{ClientError, Result};
use gpupool_proto::cuda;
use gpupool_proto::v1;

// CUdevice_attribute numbers.
const DEV_MAX_THREADS_PER_BLOCK: u32 = 1;
const DEV_MAX_BLOCK_DIM: [u32; 3] = [2, 3, 4];
const DEV_MAX_GRID_DIM: [u32; 3] = [5, 6, 7];
const DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: u32 = 97;
// CUfunction_attribute numbers.
const FUNC_MAX_THREADS_PER_BLOCK: u32 = 0;
const FUNC_SHARED_SIZE_BYTES: u32 = 1;
const FUNC_NUM_REGS: u32 = 4;
const DEV_MAX_REGISTERS_PER_BLOCK: u32 = 12;
const FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES: u32 = 8;
const FUNC_NON_PORTABLE_CLUSTER_SIZE_ALLOWED: u32 = 14;

/// Largest portable cluster, and the largest with the non-portable opt-in.
const PORTABLE_CLUSTER: u64 = 8;
const NON_PORTABLE_CLUSTER: u64 = 16;

/// The shape of one launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
    /// Blocks per cluster; `[0; 3]`: no cluster.
    pub cluster: [u32; 3],
}

fn cuda_error(code: u32, message: String) -> ClientError {
    ClientError::Cuda { code, message }
}

/// Checks `shape` against the device and the function, as the driver does.
/// Attributes the server did not report are not checked (the server's
/// driver still is).
/// The device limits a launch is checked against, read once from the
/// device's attributes (a map of ~150 entries): `None` where the server
/// did not report one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceLimits {
    max_block: [Option<u64>; 3],
    max_grid: [Option<u64>; 3],
    max_threads_per_block: Option<u64>,
    max_registers_per_block: Option<u64>,
    max_shared_per_block_optin: Option<u64>,
}

impl DeviceLimits {
    pub fn of(device: &v1::DeviceInfo) -> Self {
        let dev = |a: u32| device.attributes.get(&a).and_then(|&v| u64::try_from(v).ok());
        Self {
            max_block: DEV_MAX_BLOCK_DIM.map(dev),
            max_grid: DEV_MAX_GRID_DIM.map(dev),
            max_threads_per_block: dev(DEV_MAX_THREADS_PER_BLOCK),
            max_registers_per_block: dev(DEV_MAX_REGISTERS_PER_BLOCK),
            max_shared_per_block_optin: dev(DEV_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
        }
    }
}

pub fn check(device: &DeviceLimits, f: &v1::FunctionInfo, shape: &LaunchShape) -> Result<()> {
    let func = |a: u32| f.attributes.get(&a).and_then(|&v| u64::try_from(v).ok());
    let invalid = |m: String| cuda_error(cuda::INVALID_VALUE, format!("{}: {m}", f.name));
    let LaunchShape { grid, block, shared_mem_bytes, cluster } = *shape;
    if grid.contains(&0) || block.contains(&0) {
        return Err(invalid(format!("grid {grid:?} and block {block:?} need every dimension at least 1")));
    }
    for (axis, (&d, max)) in block.iter().zip(device.max_block).enumerate() {
        if max.is_some_and(|max| u64::from(d) > max) {
            return Err(invalid(format!("block dimension {axis} of {d} exceeds the device's limit")));
        }
    }
    let threads = block.iter().try_fold(1u64, |a, &d| a.checked_mul(u64::from(d))).unwrap_or(u64::MAX);
    if let Some(max) = device.max_threads_per_block.filter(|&max| threads > max) {
        return Err(invalid(format!("block of {threads} threads exceeds the device's {max}")));
    }
    for (axis, (&d, max)) in grid.iter().zip(device.max_grid).enumerate() {
        if max.is_some_and(|max| u64::from(d) > max) {
            return Err(invalid(format!("grid dimension {axis} of {d} exceeds the device's limit")));
        }
    }
    let func_max_threads = func(FUNC_MAX_THREADS_PER_BLOCK).unwrap_or(u64::from(f.max_threads_per_block));
    if func_max_threads > 0 && threads > func_max_threads {
        // The driver answers "too many resources" when the block's
        // registers do not fit, and "invalid value" when only a launch
        // bound (`__launch_bounds__`, PTX `.maxntid`) caps the block (both
        // seen on the H200). Registers are allocated per warp in units of
        // 256.
        let regs_per_warp = func(FUNC_NUM_REGS).map(|r| (r * 32).div_ceil(256) * 256);
        let regs = regs_per_warp.map(|w| threads.div_ceil(32).saturating_mul(w));
        let over_registers = regs.zip(device.max_registers_per_block).is_some_and(|(need, have)| need > have);
        let (code, why) = if over_registers {
            (cuda::LAUNCH_OUT_OF_RESOURCES, "its registers allow")
        } else {
            (cuda::INVALID_VALUE, "its launch bounds allow")
        };
        return Err(cuda_error(
            code,
            format!("{}: block of {threads} threads exceeds the {func_max_threads} {why}", f.name),
        ));
    }
    let dynamic = u64::from(shared_mem_bytes);
    if let Some(max) = func(FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES).filter(|&max| dynamic > max) {
        return Err(invalid(format!(
            "{dynamic} bytes of dynamic shared memory exceed its MAX_DYNAMIC_SHARED_SIZE_BYTES of {max} (cuFuncSetAttribute raises it)"
        )));
    }
    let static_shared = func(FUNC_SHARED_SIZE_BYTES).unwrap_or(0);
    if let Some(max) = device.max_shared_per_block_optin.filter(|&max| static_shared + dynamic > max) {
        return Err(invalid(format!(
            "{static_shared} bytes of static and {dynamic} of dynamic shared memory exceed the device's {max} per block"
        )));
    }
    if cluster != [0; 3] {
        let bad = |m: String| cuda_error(cuda::INVALID_CLUSTER_SIZE, format!("{}: {m}", f.name));
        if cluster.contains(&0) || cluster.iter().zip(grid).any(|(&c, g)| g % c != 0) {
            return Err(bad(format!("cluster {cluster:?} does not divide grid {grid:?}")));
        }
        let size = cluster.iter().try_fold(1u64, |a, &d| a.checked_mul(u64::from(d))).unwrap_or(u64::MAX);
        let max = if func(FUNC_NON_PORTABLE_CLUSTER_SIZE_ALLOWED).unwrap_or(0) != 0 {
            NON_PORTABLE_CLUSTER
        } else {
            PORTABLE_CLUSTER
        };
        if size > max {
            return Err(bad(format!("cluster of {size} blocks exceeds {max}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h200() -> DeviceLimits {
        let attributes = [
            (1, 1024),
            (2, 1024),
            (3, 1024),
            (4, 64),
            (5, i32::MAX),
            (6, 65535),
            (7, 65535),
            (12, 65536),
            (97, 232448),
        ];
        DeviceLimits::of(&v1::DeviceInfo { attributes: attributes.into_iter().collect(), ..Default::default() })
    }

    fn kernel(max_threads: i32) -> v1::FunctionInfo {
        v1::FunctionInfo {
            name: "k".into(),
            max_threads_per_block: max_threads as u32,
            attributes: [(0, max_threads), (1, 1024), (8, 48 << 10), (14, 0)].into_iter().collect(),
            ..Default::default()
        }
    }

    fn shape(grid: [u32; 3], block: [u32; 3]) -> LaunchShape {
        LaunchShape { grid, block, shared_mem_bytes: 0, cluster: [0; 3] }
    }

    fn code(r: Result<()>) -> u32 {
        r.map_or_else(|e| e.code(), |()| 0)
    }

    #[test]
    fn dimensions_and_threads() {
        let (d, k) = (h200(), kernel(1024));
        assert_eq!(code(check(&d, &k, &shape([1, 1, 1], [256, 1, 1]))), 0);
        assert_eq!(code(check(&d, &k, &shape([0, 1, 1], [1, 1, 1]))), cuda::INVALID_VALUE);
        assert_eq!(code(check(&d, &k, &shape([1, 1, 1], [1, 0, 1]))), cuda::INVALID_VALUE);
        assert_eq!(code(check(&d, &k, &shape([1, 1, 1], [4096, 1, 1]))), cuda::INVALID_VALUE);
        assert_eq!(code(check(&d, &k, &shape([1, 1, 1], [1, 1, 65]))), cuda::INVALID_VALUE);
        assert_eq!(code(check(&d, &k, &shape([1, 1, 1], [64, 64, 1]))), cuda::INVALID_VALUE, "4096 threads");
        assert_eq!(code(check(&d, &k, &shape([1, 65536, 1], [1, 1, 1]))), cuda::INVALID_VALUE);
        assert_eq!(code(check(&d, &k, &shape([i32::MAX as u32, 65535, 65535], [1, 1, 1]))), 0);
        assert_eq!(code(check(&d, &k, &shape([u32::MAX, 1, 1], [1, 1, 1]))), cuda::INVALID_VALUE);
        let big = shape([1, 1, 1], [u32::MAX, u32::MAX, u32::MAX]);
        assert_eq!(code(check(&d, &k, &big)), cuda::INVALID_VALUE, "no overflow");
        // Register-limited kernel: within the device limit, over its own.
        // A launch bound: the registers would fit.
        let mut k = kernel(512);
        k.attributes.insert(FUNC_NUM_REGS, 32);
        assert_eq!(code(check(&d, &k, &shape([1, 1, 1], [1024, 1, 1]))), cuda::INVALID_VALUE);
        assert_eq!(code(check(&d, &k, &shape([1, 1, 1], [512, 1, 1]))), 0);
        // 128 registers a thread: 1024 threads need 131 072 of 65 536.
        k.attributes.insert(FUNC_NUM_REGS, 128);
        assert_eq!(code(check(&d, &k, &shape([1, 1, 1], [1024, 1, 1]))), cuda::LAUNCH_OUT_OF_RESOURCES);
    }

    #[test]
    fn shared_memory() {
        let (d, mut k) = (h200(), kernel(1024));
        let with = |bytes| LaunchShape { shared_mem_bytes: bytes, ..shape([1, 1, 1], [32, 1, 1]) };
        assert_eq!(code(check(&d, &k, &with(48 << 10))), 0);
        assert_eq!(code(check(&d, &k, &with((48 << 10) + 1))), cuda::INVALID_VALUE);
        // Raised by cuFuncSetAttribute: up to the opt-in maximum less static.
        k.attributes.insert(8, 232448 - 1024);
        assert_eq!(code(check(&d, &k, &with(232448 - 1024))), 0);
        k.attributes.insert(8, 232448);
        assert_eq!(code(check(&d, &k, &with(232448))), cuda::INVALID_VALUE, "static + dynamic over opt-in");
    }

    #[test]
    fn clusters() {
        let (d, mut k) = (h200(), kernel(1024));
        let with = |grid, cluster| LaunchShape { cluster, ..shape(grid, [32, 1, 1]) };
        assert_eq!(code(check(&d, &k, &with([8, 2, 1], [8, 1, 1]))), 0);
        assert_eq!(code(check(&d, &k, &with([6, 1, 1], [4, 1, 1]))), cuda::INVALID_CLUSTER_SIZE);
        assert_eq!(code(check(&d, &k, &with([16, 1, 1], [16, 1, 1]))), cuda::INVALID_CLUSTER_SIZE);
        assert_eq!(code(check(&d, &k, &with([16, 1, 1], [0, 1, 1]))), cuda::INVALID_CLUSTER_SIZE);
        k.attributes.insert(14, 1);
        assert_eq!(code(check(&d, &k, &with([16, 1, 1], [16, 1, 1]))), 0);
        assert_eq!(code(check(&d, &k, &with([32, 1, 1], [32, 1, 1]))), cuda::INVALID_CLUSTER_SIZE);
    }
}
