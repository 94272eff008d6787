//! Modules, libraries, functions, kernels, module variables and occupancy.
//!
//! A library is a module loaded through the library API (what CUDA 12+
//! runtimes use for registered fatbins); a kernel handle names the same
//! function as a function handle. Function layouts and attributes came
//! with the load and are answered here without a round trip.

use crate::abi::{CuError, CuResult, c_str, intern, put};
use crate::image;
use crate::library::{Image, Images, Library};
use crate::runtime::{Runtime, Tag, function_handle, function_of, handle};
use bytes::Bytes;
use cudarc::driver::sys::{CUdevice, CUdeviceptr, CUfunction, CUkernel, CUlaunchConfig, CUlibrary, CUmodule};
use gpupool_client::{Function, JitInput, JitLinkRequest, Module};
use gpupool_proto::v1::{self, OccupancyQuery};
use std::borrow::Cow;
use std::ffi::{c_char, c_int, c_uint, c_void};
use std::sync::Arc;

/// Loads an image. Libraries need no current context (CUDA 12's library
/// API is context-independent); the module API checks for one itself.
fn load_bytes(bytes: &[u8]) -> CuResult<Module> {
    let rt = Runtime::get()?;
    rt.session.module_load(&for_device(rt, bytes)).map_err(CuError::from)
}

/// What is sent of an image: a fatbin without the code this GPU cannot load.
fn for_device<'a>(rt: &Runtime, bytes: &'a [u8]) -> Cow<'a, [u8]> {
    let (major, minor) = (rt.device.compute_capability_major, rt.device.compute_capability_minor);
    let out = crate::fatbin::for_device(bytes, major, minor);
    if out.len() != bytes.len() {
        tracing::debug!(bytes = bytes.len(), sent = out.len(), major, minor, "fatbin cut to this GPU's code");
    }
    out
}

/// Loads the image at `p`.
pub(crate) fn load_ptr(p: *const c_void) -> CuResult<Module> {
    // SAFETY: the CUDA contract: `p` is a complete module image.
    let bytes = unsafe { image::image(p.cast()) }?;
    load_bytes(bytes)
}

/// The bytes of the file at `path`.
fn read_file(path: *const c_char) -> CuResult<Vec<u8>> {
    // SAFETY: NUL-terminated per the CUDA API.
    let path = unsafe { c_str(path) }?;
    std::fs::read(path).map_err(|_| CuError(gpupool_proto::cuda::FILE_NOT_FOUND))
}

fn load_file(path: *const c_char) -> CuResult<Module> {
    load_bytes(&read_file(path)?)
}

/// A load through the module API: a current context is required and the
/// module's handle goes to `out`.
pub(crate) fn load_module(out: *mut CUmodule, load: impl FnOnce() -> CuResult<Module>) -> CuResult {
    Runtime::with_context()?;
    let m = load()?;
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(out, handle(Tag::Module, m.id.into()) as CUmodule) }
}

/// The module behind a module or library handle (`tag`); a library loads
/// at its first use.
fn module_of(rt: &Runtime, h: usize, tag: Tag) -> CuResult<Module> {
    match tag {
        Tag::Library => library_module(rt, h),
        _ => rt.module(h, tag),
    }
}

/// Number of functions of a module or library (`tag`).
fn function_count(h: usize, tag: Tag, count: *mut c_uint) -> CuResult {
    let m = module_of(Runtime::get()?, h, tag)?;
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(count, m.functions.len() as c_uint) }
}

/// An occupancy query about a launch of `c`'s shape.
fn shape_query(query: OccupancyQuery, c: &CUlaunchConfig) -> v1::Occupancy {
    let dim = |x, y, z| Some(v1::Dim3 { x, y, z });
    v1::Occupancy {
        query: query as i32,
        dynamic_smem_bytes: u64::from(c.sharedMemBytes),
        grid: dim(c.gridDimX, c.gridDimY, c.gridDimZ),
        block: dim(c.blockDimX, c.blockDimY, c.blockDimZ),
        ..Default::default()
    }
}

/// `CU_JIT_INPUT_FATBINARY`: the linker picks the GPU's entry of each.
const JIT_INPUT_FATBINARY: u32 = 2;

/// Driver errors meaning "nothing in this image runs on this GPU".
const NO_CODE_FOR_GPU: [u32; 2] = [209, 222]; // NO_BINARY_FOR_GPU, UNSUPPORTED_PTX_VERSION

/// Takes a library without contacting the server (see [`crate::library`]):
/// the image is checked as far as its header, kept, and given a module id
/// as its handle. A file is read now, as the driver reads it.
fn load_library(code: *const c_void, file: Option<*const c_char>) -> CuResult<usize> {
    let rt = Runtime::get()?;
    let (image, prelinked) = match file {
        Some(path) => (Image::Owned(read_file(path)?.into()), Vec::new()),
        // SAFETY: the CUDA contract: `code` is a complete module image
        // (a version-2 wrapper's array filled in by the runtime).
        None => unsafe {
            let prelinked = image::prelinked(code.cast())?.into_iter().map(Image::of).collect();
            (Image::of(image::image(code.cast())?), prelinked)
        },
    };
    if image.bytes().is_empty() {
        return Err(CuError::INVALID_IMAGE);
    }
    let id = rt.session.reserve_module_id();
    let copied = matches!(image, Image::Owned(_));
    tracing::debug!(
        library = id,
        bytes = image.bytes().len(),
        copied,
        prelinked = prelinked.len(),
        "library: loads at first use"
    );
    rt.tables().libraries.insert(id, Arc::new(Library::new(Images { image, prelinked })));
    Ok(handle(Tag::Library, id.into()))
}

/// The module behind library handle `h`, loading it on the server at its
/// first use. CUDA loads libraries lazily: an image without code for this
/// GPU (cuBLAS registers fatbins for every architecture) still gives a
/// library; asking for its module fails with the driver's error, and
/// [`lookup`] names its kernels, which fail when used.
fn library_module(rt: &Runtime, h: usize) -> CuResult<Module> {
    let id = crate::runtime::id_of(Tag::Library, h).ok_or(CuError::INVALID_HANDLE)? as u32;
    let lib = rt.tables().libraries.get(&id).cloned().ok_or(CuError::INVALID_HANDLE)?;
    lib.ensure_loaded(|images| match load_images(rt, id, images) {
        Ok(m) => {
            tracing::debug!(
                library = id,
                bytes = images.image.bytes().len(),
                functions = m.functions.len(),
                "library: first use, loaded"
            );
            Ok(())
        }
        Err(e) if NO_CODE_FOR_GPU.contains(&e.code()) => {
            tracing::debug!(
                library = id,
                code = e.code(),
                "library without code for this GPU: its kernels fail when used"
            );
            rt.tables().unusable.insert(id, (e.code(), Vec::new()));
            Ok(())
        }
        Err(e) => Err(e.into()),
    })?;
    rt.module(h, Tag::Library)
}

/// Loads a library's image as module `id`; when it has no code for the
/// GPU and came with relocatable fatbins (a `-rdc` program built for an
/// older architecture), links those on the server instead, as the driver
/// does, and loads the result. The image's own error stands when that
/// link fails too.
fn load_images(rt: &Runtime, id: u32, images: &Images) -> gpupool_client::Result<Module> {
    let err = match rt.session.module_load_as(id, &for_device(rt, images.image.bytes())) {
        Err(e) if NO_CODE_FOR_GPU.contains(&e.code()) && !images.prelinked.is_empty() => e,
        other => return other,
    };
    let inputs = images
        .prelinked
        .iter()
        .enumerate()
        .map(|(i, p)| JitInput {
            kind: JIT_INPUT_FATBINARY,
            name: format!("prelinked fatbin {i}"),
            data: Bytes::from(for_device(rt, p.bytes()).into_owned()),
            options: Vec::new(),
        })
        .collect();
    let request = JitLinkRequest { options: Vec::new(), inputs, info_log_bytes: 0, error_log_bytes: 4096 };
    let linked = rt.session.jit_link(request).and_then(|out| {
        out.cubin.inspect_err(|_| {
            tracing::debug!(library = id, log = %String::from_utf8_lossy(&out.error_log), "link of the prelinked fatbins failed");
        })
    });
    match linked {
        Ok(cubin) => {
            tracing::debug!(
                library = id,
                pieces = images.prelinked.len(),
                bytes = cubin.len(),
                "library: no code for this GPU in the linked image, its relocatable fatbins linked"
            );
            rt.session.module_load_as(id, &cubin)
        }
        Err(link) => {
            tracing::debug!(library = id, error = %link, "library: the relocatable fatbins did not link either");
            Err(err)
        }
    }
}

/// A kernel handle in an unusable library, for `name`.
fn unusable_kernel(rt: &Runtime, library: usize, name: &str) -> CuResult<usize> {
    let id = crate::runtime::id_of(Tag::Library, library).ok_or(CuError::INVALID_HANDLE)? as u32;
    let mut t = rt.tables();
    let (_, names) = t.unusable.get_mut(&id).ok_or(CuError::INVALID_HANDLE)?;
    let index = match names.iter().position(|n| n == name) {
        Some(i) => i,
        None => {
            names.push(name.to_owned());
            names.len() - 1
        }
    };
    Ok(function_handle(Tag::Kernel, id, index as u32))
}

fn unload_module(h: usize) -> CuResult {
    let rt = Runtime::get()?;
    let m = rt.module(h, Tag::Module)?;
    rt.session.module_unload(&m)?;
    crate::mapped::module_unloaded(rt, m.id);
    Ok(())
}

/// Unloads a library: one never used never reached the server.
fn unload_library(h: usize) -> CuResult {
    let rt = Runtime::get()?;
    let id = crate::runtime::id_of(Tag::Library, h).ok_or(CuError::INVALID_HANDLE)? as u32;
    let lib = rt.tables().libraries.remove(&id).ok_or(CuError::INVALID_HANDLE)?;
    // Waits for a first use in progress on another thread.
    if !lib.is_loaded() || rt.tables().unusable.remove(&id).is_some() {
        return Ok(());
    }
    let m = rt.module(h, Tag::Library)?;
    rt.session.module_unload(&m)?;
    crate::mapped::module_unloaded(rt, m.id);
    Ok(())
}

/// The function handle (of kind `tag`) for `name` in module handle `h`.
fn lookup(h: usize, module_tag: Tag, name: *const c_char, tag: Tag) -> CuResult<usize> {
    let rt = Runtime::get()?;
    // SAFETY: NUL-terminated per the CUDA API.
    let name = unsafe { c_str(name) }?;
    let m = match module_of(rt, h, module_tag) {
        Ok(m) => m,
        Err(CuError(e)) if module_tag == Tag::Library && tag == Tag::Kernel && NO_CODE_FOR_GPU.contains(&e) => {
            return unusable_kernel(rt, h, name);
        }
        Err(e) => return Err(e),
    };
    let f = m.function(name).map_err(|_| CuError::NOT_FOUND)?;
    Ok(function_handle(tag, f.module, f.index))
}

/// A module variable's address and size (`cuModuleGetGlobal`,
/// `cuLibraryGetGlobal`; with `managed_only`, `cuLibraryGetManaged`, which
/// knows only `__managed__` variables). A managed variable gets its host
/// half here ([`crate::mapped::managed_global`]).
fn global(
    h: usize,
    tag: Tag,
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    name: *const c_char,
    managed_only: bool,
) -> CuResult {
    let rt = Runtime::get()?;
    let m = module_of(rt, h, tag)?;
    // SAFETY: NUL-terminated per the CUDA API.
    let name = unsafe { c_str(name) }?;
    let g = rt.session.module_get_global(m.id, name)?;
    if managed_only && !g.managed {
        return Err(CuError::NOT_FOUND);
    }
    crate::mapped::managed_global(rt, m.id, g)?;
    let (addr, size) = (g.addr, g.size);
    tracing::debug!(
        module = m.id,
        name,
        addr = format_args!("{addr:#x}"),
        size,
        managed = g.managed,
        "module variable"
    );
    // SAFETY: each out-pointer may be null per the CUDA API.
    unsafe {
        if !dptr.is_null() {
            put(dptr, addr)?;
        }
        if !bytes.is_null() {
            put(bytes, size as usize)?;
        }
    }
    Ok(())
}

fn function(h: usize) -> CuResult<(&'static Runtime, Function)> {
    let rt = Runtime::get()?;
    let f = rt.function(h)?;
    Ok((rt, f))
}

fn get_attribute(pi: *mut c_int, attrib: c_uint, h: usize) -> CuResult {
    let (rt, f) = function(h)?;
    let info = rt.session.described(&f)?;
    let v = info.attributes.get(&attrib).copied().ok_or(CuError::INVALID_VALUE)?;
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(pi, v) }
}

fn param_info(h: usize, index: usize, offset: *mut usize, size: *mut usize) -> CuResult {
    let (_, f) = function(h)?;
    let p = f.info.params.get(index).ok_or(CuError::INVALID_VALUE)?;
    // SAFETY: each out-pointer may be null per the CUDA API.
    unsafe {
        if !offset.is_null() {
            put(offset, p.offset as usize)?;
        }
        if !size.is_null() {
            put(size, p.size as usize)?;
        }
    }
    Ok(())
}

/// Writes the handles of all functions of a module, as kind `tag`.
fn enumerate(h: usize, module_tag: Tag, out: *mut usize, n: c_uint, tag: Tag) -> CuResult {
    let rt = Runtime::get()?;
    let m = module_of(rt, h, module_tag)?;
    if out.is_null() || (n as usize) < m.functions.len() {
        return Err(CuError::INVALID_VALUE);
    }
    for i in 0..m.functions.len() {
        // SAFETY: `out` holds `n >= len` entries per the CUDA API.
        unsafe { out.add(i).write(function_handle(tag, m.id, i as u32)) };
    }
    Ok(())
}

fn active_blocks(rt: &Runtime, f: &Function, block_size: c_int, smem: usize, flags: c_uint) -> CuResult<i64> {
    if block_size <= 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let q = v1::Occupancy {
        query: OccupancyQuery::ActiveBlocks as i32,
        block_size: block_size as u32,
        dynamic_smem_bytes: smem as u64,
        flags,
        ..Default::default()
    };
    let blocks = rt.session.occupancy(f, q)?.0;
    tracing::debug!(function = %f.info.name, block_size, smem, flags, blocks, "active blocks per SM");
    Ok(blocks)
}

type SmemForBlock = Option<unsafe extern "C" fn(c_int) -> usize>;

fn potential_block_size(
    min_grid: *mut c_int,
    block: *mut c_int,
    h: CUfunction,
    smem_for_block: SmemForBlock,
    smem: usize,
    limit: c_int,
    flags: c_uint,
) -> CuResult {
    let (rt, f) = function(h as usize)?;
    let (grid, size) = match smem_for_block {
        None => {
            let q = v1::Occupancy {
                query: OccupancyQuery::PotentialBlockSize as i32,
                block_size: limit.max(0) as u32,
                dynamic_smem_bytes: smem as u64,
                flags,
                ..Default::default()
            };
            let (g, b) = rt.session.occupancy(&f, q)?;
            (g, b)
        }
        Some(callback) => {
            // The shared memory depends on the block size through a
            // callback that cannot travel: search here, one query per
            // candidate size (multiples of the warp size).
            let max = match (rt.session.described(&f)?.max_threads_per_block as c_int, limit) {
                (m, l) if l > 0 => m.min(l),
                (m, _) => m,
            };
            let mut best = (0i64, 0i64, 0 as c_int);
            let mut size = max - max % 32;
            while size > 0 {
                // SAFETY: the application's callback, called as CUDA does.
                let need = unsafe { callback(size) };
                let blocks = active_blocks(rt, &f, size, need, flags)?;
                if blocks * i64::from(size) > best.0 {
                    best = (blocks * i64::from(size), blocks, size);
                }
                size -= 32;
            }
            (best.1 * i64::from(f_sms(rt)), best.2)
        }
    };
    // SAFETY: out-pointers per the CUDA API.
    unsafe {
        put(min_grid, grid as c_int)?;
        put(block, size)
    }
}

fn f_sms(rt: &Runtime) -> i32 {
    rt.device.multiprocessor_count as i32
}

crate::exports! {
    fn cuModuleLoadData(module: *mut CUmodule, image: *const c_void) {
        load_module(module, || load_ptr(image))
    }

    /// JIT options tune the server's compile and its logs; the server
    /// compiles with its defaults.
    fn cuModuleLoadDataEx(module: *mut CUmodule, image: *const c_void, _n: c_uint, _opts: *mut c_uint, _vals: *mut *mut c_void) {
        load_module(module, || load_ptr(image))
    }

    fn cuModuleLoadFatBinary(module: *mut CUmodule, fat: *const c_void) {
        load_module(module, || load_ptr(fat))
    }

    fn cuModuleLoad(module: *mut CUmodule, fname: *const c_char) {
        load_module(module, || load_file(fname))
    }

    fn cuModuleUnload(module: CUmodule) {
        unload_module(module as usize)
    }

    fn cuModuleGetFunction(f: *mut CUfunction, module: CUmodule, name: *const c_char) {
        let h = lookup(module as usize, Tag::Module, name, Tag::Function)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(f, h as CUfunction) }
    }

    fn cuModuleGetGlobal_v2(dptr: *mut CUdeviceptr, bytes: *mut usize, module: CUmodule, name: *const c_char) {
        global(module as usize, Tag::Module, dptr, bytes, name, false)
    }

    fn cuModuleGetLoadingMode(mode: *mut c_uint) {
        // Modules load eagerly on the server (CU_MODULE_EAGER_LOADING).
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(mode, 1) }
    }

    fn cuModuleGetFunctionCount(count: *mut c_uint, module: CUmodule) {
        Runtime::with_context()?;
        function_count(module as usize, Tag::Module, count)
    }

    fn cuModuleEnumerateFunctions(functions: *mut CUfunction, n: c_uint, module: CUmodule) {
        enumerate(module as usize, Tag::Module, functions.cast(), n, Tag::Function)
    }

    /// JIT and library options are compile and loading preferences; the
    /// server loads with its defaults.
    fn cuLibraryLoadData(
        library: *mut CUlibrary,
        code: *const c_void,
        _jit_options: *mut c_uint,
        _jit_values: *mut *mut c_void,
        _n_jit: c_uint,
        _lib_options: *mut c_uint,
        _lib_values: *mut *mut c_void,
        _n_lib: c_uint,
    ) {
        let h = load_library(code, None)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(library, h as CUlibrary) }
    }

    fn cuLibraryLoadFromFile(
        library: *mut CUlibrary,
        file: *const c_char,
        _jit_options: *mut c_uint,
        _jit_values: *mut *mut c_void,
        _n_jit: c_uint,
        _lib_options: *mut c_uint,
        _lib_values: *mut *mut c_void,
        _n_lib: c_uint,
    ) {
        let h = load_library(std::ptr::null(), Some(file))?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(library, h as CUlibrary) }
    }

    fn cuLibraryUnload(library: CUlibrary) {
        unload_library(library as usize)
    }

    fn cuLibraryGetKernel(kernel: *mut CUkernel, library: CUlibrary, name: *const c_char) {
        let h = lookup(library as usize, Tag::Library, name, Tag::Kernel)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(kernel, h as CUkernel) }
    }

    fn cuLibraryGetModule(module: *mut CUmodule, library: CUlibrary) {
        let m = library_module(Runtime::get()?, library as usize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(module, handle(Tag::Module, m.id.into()) as CUmodule) }
    }

    fn cuLibraryGetGlobal(dptr: *mut CUdeviceptr, bytes: *mut usize, library: CUlibrary, name: *const c_char) {
        global(library as usize, Tag::Library, dptr, bytes, name, false)
    }

    fn cuLibraryGetManaged(dptr: *mut CUdeviceptr, bytes: *mut usize, library: CUlibrary, name: *const c_char) {
        global(library as usize, Tag::Library, dptr, bytes, name, true)
    }

    fn cuLibraryGetKernelCount(count: *mut c_uint, library: CUlibrary) {
        function_count(library as usize, Tag::Library, count)
    }

    fn cuLibraryEnumerateKernels(kernels: *mut CUkernel, n: c_uint, library: CUlibrary) {
        enumerate(library as usize, Tag::Library, kernels.cast(), n, Tag::Kernel)
    }

    fn cuKernelGetFunction(f: *mut CUfunction, kernel: CUkernel) {
        Runtime::with_context()?;
        let (module, index) = function_of(kernel as usize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(f, function_handle(Tag::Function, module, index) as CUfunction) }
    }

    fn cuKernelGetLibrary(library: *mut CUlibrary, kernel: CUkernel) {
        let (_, f) = function(kernel as usize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(library, handle(Tag::Library, f.module.into()) as CUlibrary) }
    }

    fn cuFuncGetModule(module: *mut CUmodule, f: CUfunction) {
        let (_, f) = function(f as usize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(module, handle(Tag::Module, f.module.into()) as CUmodule) }
    }

    fn cuFuncGetAttribute(pi: *mut c_int, attrib: c_uint, f: CUfunction) {
        get_attribute(pi, attrib, f as usize)
    }

    fn cuKernelGetAttribute(pi: *mut c_int, attrib: c_uint, kernel: CUkernel, dev: CUdevice) {
        crate::device::check_device(dev)?;
        get_attribute(pi, attrib, kernel as usize)
    }

    fn cuFuncSetAttribute(f: CUfunction, attrib: c_uint, value: c_int) {
        let (rt, f) = function(f as usize)?;
        rt.session.func_set_attribute(&f, attrib, value).map_err(CuError::from)
    }

    fn cuKernelSetAttribute(attrib: c_uint, value: c_int, kernel: CUkernel, dev: CUdevice) {
        crate::device::check_device(dev)?;
        let (rt, f) = function(kernel as usize)?;
        tracing::debug!(function = %f.info.name, attrib, value, "cuKernelSetAttribute");
        rt.session.func_set_attribute(&f, attrib, value).map_err(CuError::from)
    }

    /// Cache and shared-memory configurations are preferences the device
    /// may ignore.
    fn cuFuncSetCacheConfig(f: CUfunction, config: c_uint) {
        function(f as usize)?;
        if config > 3 { Err(CuError::INVALID_VALUE) } else { Ok(()) }
    }

    fn cuKernelSetCacheConfig(kernel: CUkernel, config: c_uint, dev: CUdevice) {
        crate::device::check_device(dev)?;
        function(kernel as usize)?;
        if config > 3 { Err(CuError::INVALID_VALUE) } else { Ok(()) }
    }

    fn cuFuncSetSharedMemConfig(f: CUfunction, config: c_uint) {
        function(f as usize)?;
        if config > 2 { Err(CuError::INVALID_VALUE) } else { Ok(()) }
    }

    fn cuFuncGetName(name: *mut *const c_char, f: CUfunction) {
        let (_, f) = function(f as usize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(name, intern(&f.info.name)) }
    }

    fn cuKernelGetName(name: *mut *const c_char, kernel: CUkernel) {
        let (_, f) = function(kernel as usize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(name, intern(&f.info.name)) }
    }

    fn cuFuncGetParamInfo(f: CUfunction, index: usize, offset: *mut usize, size: *mut usize) {
        param_info(f as usize, index, offset, size)
    }

    fn cuKernelGetParamInfo(kernel: CUkernel, index: usize, offset: *mut usize, size: *mut usize) {
        param_info(kernel as usize, index, offset, size)
    }

    fn cuFuncGetParamCount(f: CUfunction, count: *mut usize) {
        let (_, f) = function(f as usize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(count, f.info.params.len()) }
    }

    fn cuFuncIsLoaded(state: *mut c_uint, f: CUfunction) {
        function(f as usize)?;
        // CU_FUNCTION_LOADING_STATE_LOADED: modules load eagerly.
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(state, 1) }
    }

    fn cuFuncLoad(f: CUfunction) {
        function(f as usize).map(drop)
    }

    fn cuOccupancyMaxActiveBlocksPerMultiprocessor(n: *mut c_int, f: CUfunction, block: c_int, smem: usize) {
        let (rt, f) = function(f as usize)?;
        let blocks = active_blocks(rt, &f, block, smem, 0)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(n, blocks as c_int) }
    }

    fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(n: *mut c_int, f: CUfunction, block: c_int, smem: usize, flags: c_uint) {
        let (rt, f) = function(f as usize)?;
        let blocks = active_blocks(rt, &f, block, smem, flags)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(n, blocks as c_int) }
    }

    fn cuOccupancyMaxPotentialBlockSize(grid: *mut c_int, block: *mut c_int, f: CUfunction, cb: SmemForBlock, smem: usize, limit: c_int) {
        potential_block_size(grid, block, f, cb, smem, limit, 0)
    }

    fn cuOccupancyMaxPotentialBlockSizeWithFlags(grid: *mut c_int, block: *mut c_int, f: CUfunction, cb: SmemForBlock, smem: usize, limit: c_int, flags: c_uint) {
        potential_block_size(grid, block, f, cb, smem, limit, flags)
    }

    fn cuOccupancyMaxActiveClusters(clusters: *mut c_int, f: CUfunction, config: *const CUlaunchConfig) {
        let (rt, f) = function(f as usize)?;
        // SAFETY: `config` points to a CUlaunchConfig (CUDA contract).
        let c = unsafe { crate::abi::get(config) }?;
        // SAFETY: `attrs` holds `numAttrs` attributes (CUDA contract).
        let cluster = unsafe { crate::launch::cluster_of(&c) };
        let q = v1::Occupancy {
            cluster: Some(v1::Dim3 { x: cluster[0], y: cluster[1], z: cluster[2] }),
            ..shape_query(OccupancyQuery::ActiveClusters, &c)
        };
        let (n, _) = rt.session.occupancy(&f, q)?;
        tracing::debug!(function = %f.info.name, ?cluster, clusters = n, "cuOccupancyMaxActiveClusters");
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(clusters, n as c_int) }
    }

    fn cuOccupancyMaxPotentialClusterSize(size: *mut c_int, f: CUfunction, config: *const CUlaunchConfig) {
        let (rt, f) = function(f as usize)?;
        // SAFETY: `config` points to a CUlaunchConfig (CUDA contract).
        let c = unsafe { crate::abi::get(config) }?;
        let q = shape_query(OccupancyQuery::PotentialClusterSize, &c);
        let (n, _) = rt.session.occupancy(&f, q)?;
        tracing::debug!(function = %f.info.name, size = n, "cuOccupancyMaxPotentialClusterSize");
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(size, n as c_int) }
    }

    fn cuOccupancyAvailableDynamicSMemPerBlock(smem: *mut usize, f: CUfunction, blocks: c_int, block: c_int) {
        let (rt, f) = function(f as usize)?;
        if blocks <= 0 || block <= 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let q = v1::Occupancy {
            query: OccupancyQuery::AvailableDynamicSmem as i32,
            block_size: block as u32,
            num_blocks: blocks as u32,
            ..Default::default()
        };
        let (bytes, _) = rt.session.occupancy(&f, q)?;
        tracing::debug!(function = %f.info.name, blocks, block, bytes, "available dynamic shared memory");
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(smem, bytes as usize) }
    }
}
