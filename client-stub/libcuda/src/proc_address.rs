//! `cuGetProcAddress`: the CUDA runtime and libraries resolve driver entry
//! points by base name and the CUDA version they were built for, not by
//! symbol. A base name maps to the versioned symbol that version's `cuda.h`
//! chose (`cuMemAlloc` -> `cuMemAlloc_v2`); the per-thread-default-stream
//! flag picks the `_ptds`/`_ptsz` variant where one exists.

use crate::abi::{CuError, CuResult, c_str, put};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

const PER_THREAD_DEFAULT_STREAM: u64 = 1 << 1;

/// Base names whose symbol changed over CUDA versions: `(base, since, symbol)`.
/// For a request of version `v`, the entry with the highest `since <= v`
/// wins; names not listed here are their own symbol, or `_v2` where only
/// that exists (the CUDA 3.2 and 4.0 renames).
const VERSIONED: &[(&str, i32, &str)] = &[
    ("cuCtxCreate", 3020, "cuCtxCreate_v2"),
    ("cuCtxCreate", 11040, "cuCtxCreate_v3"),
    ("cuCtxCreate", 12050, "cuCtxCreate_v4"),
    // CUDA 13 added an explicit context argument under the same base names.
    ("cuCtxGetDevice", 0, "cuCtxGetDevice"),
    ("cuCtxGetDevice", 13000, "cuCtxGetDevice_v2"),
    ("cuCtxSynchronize", 0, "cuCtxSynchronize"),
    ("cuCtxSynchronize", 13000, "cuCtxSynchronize_v2"),
    ("cuDeviceGetUuid", 0, "cuDeviceGetUuid"),
    ("cuDeviceGetUuid", 11040, "cuDeviceGetUuid_v2"),
    ("cuGetProcAddress", 0, "cuGetProcAddress"),
    ("cuGetProcAddress", 12000, "cuGetProcAddress_v2"),
    ("cuEventElapsedTime", 0, "cuEventElapsedTime"),
    ("cuEventElapsedTime", 12080, "cuEventElapsedTime_v2"),
    ("cuStreamGetCaptureInfo", 0, "cuStreamGetCaptureInfo"),
    ("cuStreamGetCaptureInfo", 11030, "cuStreamGetCaptureInfo_v2"),
    ("cuStreamGetCaptureInfo", 12030, "cuStreamGetCaptureInfo_v3"),
    ("cuDevicePrimaryCtxRelease", 11000, "cuDevicePrimaryCtxRelease_v2"),
    ("cuDevicePrimaryCtxReset", 11000, "cuDevicePrimaryCtxReset_v2"),
    ("cuDevicePrimaryCtxSetFlags", 11000, "cuDevicePrimaryCtxSetFlags_v2"),
    // CUDA 12.5 gave the base name a green context out-pointer.
    ("cuStreamGetCtx", 0, "cuStreamGetCtx"),
    ("cuStreamGetCtx", 12050, "cuStreamGetCtx_v2"),
    // CUDA 13.0 dropped the batch copies' `failIdx`.
    ("cuMemcpyBatchAsync", 0, "cuMemcpyBatchAsync"),
    ("cuMemcpyBatchAsync", 13000, "cuMemcpyBatchAsync_v2"),
    ("cuMemcpy3DBatchAsync", 0, "cuMemcpy3DBatchAsync"),
    ("cuMemcpy3DBatchAsync", 13000, "cuMemcpy3DBatchAsync_v2"),
    ("cuMemAdvise", 0, "cuMemAdvise"),
    ("cuMemAdvise", 12020, "cuMemAdvise_v2"),
    ("cuMemPrefetchAsync", 0, "cuMemPrefetchAsync"),
    ("cuMemPrefetchAsync", 12020, "cuMemPrefetchAsync_v2"),
    ("cuGraphInstantiate", 0, "cuGraphInstantiate"),
    ("cuGraphInstantiate", 11000, "cuGraphInstantiate_v2"),
    ("cuGraphInstantiate", 12000, "cuGraphInstantiateWithFlags"),
    // Graphs and capture (issue 16): the forms before CUDA 12.0 (kernel
    // parameters v1, exec update) and 12.3 (edge data).
    ("cuGraphAddKernelNode", 0, "cuGraphAddKernelNode"),
    ("cuGraphAddKernelNode", 12000, "cuGraphAddKernelNode_v2"),
    ("cuGraphKernelNodeGetParams", 0, "cuGraphKernelNodeGetParams"),
    ("cuGraphKernelNodeGetParams", 12000, "cuGraphKernelNodeGetParams_v2"),
    ("cuGraphKernelNodeSetParams", 0, "cuGraphKernelNodeSetParams"),
    ("cuGraphKernelNodeSetParams", 12000, "cuGraphKernelNodeSetParams_v2"),
    ("cuGraphExecKernelNodeSetParams", 0, "cuGraphExecKernelNodeSetParams"),
    ("cuGraphExecKernelNodeSetParams", 12000, "cuGraphExecKernelNodeSetParams_v2"),
    ("cuGraphExecUpdate", 0, "cuGraphExecUpdate"),
    ("cuGraphExecUpdate", 12000, "cuGraphExecUpdate_v2"),
    ("cuStreamBeginCapture", 0, "cuStreamBeginCapture"),
    ("cuStreamBeginCapture", 10010, "cuStreamBeginCapture_v2"),
    ("cuGraphAddNode", 0, "cuGraphAddNode"),
    ("cuGraphAddNode", 12030, "cuGraphAddNode_v2"),
    ("cuGraphGetEdges", 0, "cuGraphGetEdges"),
    ("cuGraphGetEdges", 12030, "cuGraphGetEdges_v2"),
    ("cuGraphNodeGetDependencies", 0, "cuGraphNodeGetDependencies"),
    ("cuGraphNodeGetDependencies", 12030, "cuGraphNodeGetDependencies_v2"),
    ("cuGraphNodeGetDependentNodes", 0, "cuGraphNodeGetDependentNodes"),
    ("cuGraphNodeGetDependentNodes", 12030, "cuGraphNodeGetDependentNodes_v2"),
    ("cuGraphAddDependencies", 0, "cuGraphAddDependencies"),
    ("cuGraphAddDependencies", 12030, "cuGraphAddDependencies_v2"),
    ("cuGraphRemoveDependencies", 0, "cuGraphRemoveDependencies"),
    ("cuGraphRemoveDependencies", 12030, "cuGraphRemoveDependencies_v2"),
    ("cuStreamUpdateCaptureDependencies", 0, "cuStreamUpdateCaptureDependencies"),
    ("cuStreamUpdateCaptureDependencies", 12030, "cuStreamUpdateCaptureDependencies_v2"),
];

fn exports() -> &'static HashMap<&'static str, usize> {
    static TABLE: OnceLock<HashMap<&'static str, usize>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut all = HashMap::new();
        for part in [
            crate::device::table(),
            crate::batch::table(),
            crate::user_object::table(),
            crate::legacy_launch::table(),
            crate::context::table(),
            crate::memory::table(),
            crate::module::table(),
            crate::launch::table(),
            crate::stream::table(),
            crate::export_tables::table(),
            crate::vmm::table(),
            crate::tensor_map::table(),
            crate::texture::table(),
            crate::link::table(),
            // Graphs, stream capture, memory pools (issue 16, items 4-5).
            crate::graph_api::table(),
            crate::graph_api::v1::table(),
            crate::capture::table(),
            crate::mempool::table(),
            crate::managed::table(),
            crate::mem_ops::table(),
            table(),
            // Implemented names take precedence over the unsupported list.
            crate::unsupported::table(),
        ] {
            for (name, addr) in part {
                all.entry(name).or_insert(addr);
            }
        }
        all
    })
}

/// The pre-rename symbols (`crate::legacy`), reached only when a version's
/// mapping names one of them.
fn legacy() -> &'static HashMap<&'static str, usize> {
    static TABLE: OnceLock<HashMap<&'static str, usize>> = OnceLock::new();
    TABLE.get_or_init(|| crate::legacy::table().into_iter().collect())
}

/// The symbol for `name` requested at CUDA version `version`.
pub(crate) fn symbol_for(name: &str, version: c_int) -> String {
    let chosen =
        VERSIONED.iter().filter(|(b, since, _)| *b == name && *since <= version).max_by_key(|(_, since, _)| *since);
    if let Some((_, _, sym)) = chosen {
        return (*sym).to_string();
    }
    let table = exports();
    let v2 = format!("{name}_v2");
    if !table.contains_key(name) && table.contains_key(v2.as_str()) { v2 } else { name.to_string() }
}

/// The address for a request, or `None` when nothing matches.
pub(crate) fn resolve(name: &str, version: c_int, flags: u64) -> Option<usize> {
    let table = exports();
    let sym = symbol_for(name, version);
    if flags & PER_THREAD_DEFAULT_STREAM != 0 {
        for suffix in ["_ptsz", "_ptds"] {
            if let Some(&addr) = table.get(format!("{sym}{suffix}").as_str()) {
                return Some(addr);
            }
        }
    }
    table.get(sym.as_str()).or_else(|| legacy().get(sym.as_str())).copied()
}

fn get_proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_int,
) -> CuResult {
    // SAFETY: NUL-terminated per the CUDA API.
    let name = unsafe { c_str(symbol) }?;
    let found = resolve(name, version, flags);
    tracing::trace!(name, version, flags, found = found.is_some(), "cuGetProcAddress");
    // SAFETY: out-pointers per the CUDA API (`status` optional).
    unsafe {
        if !status.is_null() {
            // CU_GET_PROC_ADDRESS_SUCCESS = 0, SYMBOL_NOT_FOUND = 1.
            put(status, if found.is_some() { 0 } else { 1 })?;
        }
        put(pfn, found.unwrap_or(0) as *mut c_void)?;
    }
    if found.is_some() { Ok(()) } else { Err(CuError::NOT_FOUND) }
}

crate::exports! {
    fn cuGetProcAddress(symbol: *const c_char, pfn: *mut *mut c_void, version: c_int, flags: u64) {
        get_proc_address(symbol, pfn, version, flags, std::ptr::null_mut())
    }

    fn cuGetProcAddress_v2(symbol: *const c_char, pfn: *mut *mut c_void, version: c_int, flags: u64, status: *mut c_int) {
        get_proc_address(symbol, pfn, version, flags, status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_pick_symbols() {
        assert_eq!(symbol_for("cuCtxCreate", 13000), "cuCtxCreate_v4");
        assert_eq!(symbol_for("cuCtxCreate", 12000), "cuCtxCreate_v3");
        assert_eq!(symbol_for("cuMemAlloc", 13000), "cuMemAlloc_v2");
        assert_eq!(symbol_for("cuInit", 13000), "cuInit");
        assert_eq!(symbol_for("cuEventElapsedTime", 12000), "cuEventElapsedTime");
        assert_eq!(symbol_for("cuCtxSynchronize", 12090), "cuCtxSynchronize");
        assert_eq!(symbol_for("cuCtxSynchronize", 13000), "cuCtxSynchronize_v2");
        assert_eq!(symbol_for("cuCtxGetDevice", 13000), "cuCtxGetDevice_v2");
    }

    #[test]
    fn per_thread_variants_and_misses() {
        let plain = resolve("cuMemcpyHtoD", 13000, 0).expect("exported");
        let ptds = resolve("cuMemcpyHtoD", 13000, PER_THREAD_DEFAULT_STREAM).expect("exported");
        assert_ne!(plain, ptds);
        assert_eq!(resolve("cuInit", 13000, PER_THREAD_DEFAULT_STREAM), resolve("cuInit", 13000, 0));
        assert_eq!(resolve("cuNoSuchFunction", 13000, 0), None);
        // Entry points gpupool does not implement still resolve, to a
        // function that answers CUDA_ERROR_NOT_SUPPORTED.
        assert!(resolve("cuTexObjectCreate", 13000, 0).is_some());
        assert_eq!(resolve("cuGraphCreate", 13000, 0), Some(crate::graph_api::cuGraphCreate as *const () as usize));
        assert_eq!(
            resolve("cuGraphInstantiate", 13000, 0),
            Some(crate::graph_api::cuGraphInstantiateWithFlags as *const () as usize)
        );
        assert_eq!(
            resolve("cuStreamBeginCapture", 13000, PER_THREAD_DEFAULT_STREAM),
            Some(crate::capture::cuStreamBeginCapture_v2_ptsz as *const () as usize)
        );
    }

    #[test]
    fn older_versions_reach_legacy_symbols() {
        // The legacy symbol never shadows the `_v2` of a current request...
        assert_eq!(
            resolve("cuCtxPushCurrent", 13000, 0),
            Some(crate::context::cuCtxPushCurrent_v2 as *const () as usize)
        );
        assert_eq!(resolve("cuMemAlloc", 13000, 0), Some(crate::memory::cuMemAlloc_v2 as *const () as usize));
        // ...and an old version's mapping finds it.
        assert_eq!(resolve("cuMemAdvise", 8000, 0), Some(crate::managed::legacy::cuMemAdvise as *const () as usize));
        assert_eq!(
            resolve("cuStreamGetCaptureInfo", 10000, 0),
            Some(crate::capture::cuStreamGetCaptureInfo as *const () as usize)
        );
        assert_eq!(
            resolve("cuGraphInstantiate", 11000, 0),
            Some(crate::graph_api::v1::cuGraphInstantiate_v2 as *const () as usize)
        );
        // Graph calls of CUDA 12.0-12.2 runtimes get the forms without edge data.
        assert_eq!(
            resolve("cuGraphAddDependencies", 12020, 0),
            Some(crate::graph_api::v1::cuGraphAddDependencies as *const () as usize)
        );
        assert_eq!(
            resolve("cuGraphAddDependencies", 12030, 0),
            Some(crate::graph_api::cuGraphAddDependencies_v2 as *const () as usize)
        );
        assert_eq!(
            resolve("cuGraphAddKernelNode", 11080, 0),
            Some(crate::graph_api::v1::cuGraphAddKernelNode as *const () as usize)
        );
    }
}

/// The three symbol sets against the CUDA 13.0 driver API of cudarc's
/// bindings (see `gpupool_ffi::symbols`). `GPUPOOL_WRITE_SYMBOLS=1 cargo
/// test -p gpupool-libcuda symbol_lists` rewrites `unsupported.rs` from them.
#[cfg(test)]
mod symbol_lists {
    use gpupool_ffi::symbols;
    use std::collections::BTreeSet;
    use std::path::Path;

    #[test]
    fn symbol_lists_cover_the_driver_api() {
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let cudarc = symbols::registry_source(&crate_dir.join("../.."), "cudarc").expect("cudarc sources");
        let bindings = std::fs::read_to_string(cudarc.join("src/driver/sys/mod.rs")).expect("cudarc's sys bindings");
        let api = symbols::binding_functions(&bindings, "cu", Some("cuda-13000"));
        assert!(api.len() > 400, "only {} driver functions found in cudarc's bindings", api.len());
        let names = |t: Vec<(&'static str, usize)>| t.into_iter().map(|(n, _)| n.to_string()).collect::<BTreeSet<_>>();
        let unsupported = names(crate::unsupported::table());
        let stub_addresses: BTreeSet<usize> = crate::unsupported::table().into_iter().map(|(_, a)| a).collect();
        let implemented: BTreeSet<String> =
            super::exports().iter().filter(|(_, a)| !stub_addresses.contains(a)).map(|(n, _)| n.to_string()).collect();
        let legacy = names(crate::legacy::table());
        if std::env::var_os("GPUPOOL_WRITE_SYMBOLS").is_some() {
            let wanted = api.iter().filter(|n| !implemented.contains(*n) && !legacy.contains(*n)).cloned().collect();
            symbols::regenerate(&crate_dir.join("src/unsupported.rs"), "crate::unsupported!", &wanted)
                .expect("rewriting unsupported.rs");
            return;
        }
        let problems = symbols::check(&api, &implemented, &unsupported, &legacy);
        assert!(
            problems.is_empty(),
            "symbol lists out of date (GPUPOOL_WRITE_SYMBOLS=1 regenerates unsupported.rs):\n{}",
            problems.join("\n")
        );
    }
}
