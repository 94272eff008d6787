//! Device memory, copies, memsets, host memory and pointer attributes.
//!
//! Device addresses come from the session's range (assigned locally, no
//! round trip) or are module variables the server resolved. Every other
//! address is host memory of this process. The per-thread default stream
//! (`_ptds`/`_ptsz` entry points) is served as the default stream.

use crate::abi::{CuError, CuResult, put};
use crate::capture::{self, Route};
use crate::graph::{Copy3D, End, Op, Set2D};
use crate::hostmem;
use crate::runtime::{PRIMARY, Runtime, Tag, handle};
use cudarc::driver::sys::{CUDA_MEMCPY2D, CUdeviceptr, CUstream};
use gpupool_client::StreamId;
use gpupool_proto::texture_abi::Memcpy3d;
use std::ffi::{c_uint, c_void};

/// Pitch alignment of cuMemAllocPitch rows.
const PITCH_ALIGN: usize = 512;

/// `CU_MEMHOSTALLOC_DEVICEMAP` / `CU_MEMHOSTREGISTER_DEVICEMAP`.
const DEVICEMAP: c_uint = 0x02;

/// Where a copy's end lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loc {
    Host(usize),
    Device(u64),
}

fn classify(rt: &Runtime, addr: u64) -> Loc {
    if rt.session.is_device_ptr(addr) { Loc::Device(addr) } else { Loc::Host(addr as usize) }
}

/// One linear copy. Host-to-device copies capture the bytes before
/// returning; device-to-host copies wait for the data (as CUDA may for
/// any copy into pageable memory). An asynchronous copy whose host end is
/// pinned memory in a host region shared with the server is only queued
/// (the server's DMA moves the bytes when it runs, as natively).
fn copy(rt: &Runtime, dst: Loc, src: Loc, size: usize, stream: StreamId, asynchronous: bool) -> CuResult {
    if size == 0 {
        return Ok(());
    }
    match (dst, src) {
        (Loc::Device(d), Loc::Host(h)) => {
            if h == 0 {
                return Err(CuError::INVALID_VALUE);
            }
            // SAFETY: the CUDA contract: `h` points to `size` readable bytes.
            let bytes = unsafe { std::slice::from_raw_parts(h as *const u8, size) };
            if asynchronous {
                rt.session.memcpy_htod_async(d, bytes, stream)?;
            } else {
                rt.session.memcpy_htod(d, bytes, stream)?;
            }
        }
        (Loc::Host(h), Loc::Device(s)) => {
            if h == 0 {
                return Err(CuError::INVALID_VALUE);
            }
            // SAFETY: the CUDA contract: `h` points to `size` writable bytes.
            let out = unsafe { std::slice::from_raw_parts_mut(h as *mut u8, size) };
            if asynchronous {
                rt.session.memcpy_dtoh_async(out, s, stream)?;
            } else {
                rt.session.memcpy_dtoh(out, s, stream)?;
            }
        }
        (Loc::Device(d), Loc::Device(s)) => rt.session.memcpy_dtod(d, s, size as u64, stream)?,
        (Loc::Host(d), Loc::Host(s)) => {
            if d == 0 || s == 0 {
                return Err(CuError::INVALID_VALUE);
            }
            // Ordered after queued work like any copy on the stream.
            rt.session.stream_synchronize(stream)?;
            // SAFETY: the CUDA contract: both ranges hold `size` bytes.
            unsafe { std::ptr::copy(s as *const u8, d as *mut u8, size) };
        }
    }
    Ok(())
}

/// One linear copy on stream `stream`, or a copy node while it captures.
fn linear(rt: &Runtime, dst: Loc, src: Loc, n: usize, stream: CUstream, asynchronous: bool) -> CuResult {
    match capture::route(rt, stream)? {
        Route::Send(s) => copy(rt, dst, src, n, s, asynchronous),
        Route::Capture(s) => {
            if n == 0 {
                return Ok(());
            }
            let end = |l: Loc| match l {
                Loc::Host(h) => (false, h as u64),
                Loc::Device(d) => (true, d),
            };
            if matches!(dst, Loc::Host(0)) || matches!(src, Loc::Host(0)) {
                return Err(CuError::INVALID_VALUE);
            }
            capture::add(s, Op::Memcpy(Copy3D::linear(end(dst), end(src), n))).map(drop)
        }
    }
}

/// `asynchronous`: the `*Async` entry points.
fn htod(dst: CUdeviceptr, src: *const c_void, n: usize, stream: CUstream, asynchronous: bool) -> CuResult {
    let rt = Runtime::with_context()?;
    linear(rt, Loc::Device(dst), Loc::Host(src as usize), n, stream, asynchronous)
}

fn dtoh(dst: *mut c_void, src: CUdeviceptr, n: usize, stream: CUstream, asynchronous: bool) -> CuResult {
    let rt = Runtime::with_context()?;
    linear(rt, Loc::Host(dst as usize), Loc::Device(src), n, stream, asynchronous)
}

pub(crate) fn dtod(dst: CUdeviceptr, src: CUdeviceptr, n: usize, stream: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    linear(rt, Loc::Device(dst), Loc::Device(src), n, stream, true)
}

/// `cuMemcpy`: the direction follows from the addresses.
fn unified(dst: CUdeviceptr, src: CUdeviceptr, n: usize, stream: CUstream, asynchronous: bool) -> CuResult {
    let rt = Runtime::with_context()?;
    linear(rt, classify(rt, dst), classify(rt, src), n, stream, asynchronous)
}

/// An asynchronous copy between any two addresses (`cuMemcpyAsync`).
pub(crate) fn copy_async(rt: &Runtime, dst: CUdeviceptr, src: CUdeviceptr, n: usize, stream: CUstream) -> CuResult {
    linear(rt, classify(rt, dst), classify(rt, src), n, stream, true)
}

/// Whether a queued copy from `src` has read it by the time the call
/// returns: pageable host memory, which the stub reads into the call.
/// Device memory is read in stream order, page-locked host memory maybe by
/// the server's DMA when the copy runs.
pub(crate) fn read_when_queued(rt: &Runtime, src: CUdeviceptr) -> bool {
    !rt.session.is_device_ptr(src) && host_block(rt, src as usize).is_none()
}

fn memset(dst: CUdeviceptr, value: u32, element: u32, count: usize, stream: CUstream) -> CuResult {
    memset_2d(dst, count * element as usize, value, element, count, 1, stream)
}

fn memset_2d(
    dst: CUdeviceptr,
    pitch: usize,
    value: u32,
    element: u32,
    width: usize,
    height: usize,
    stream: CUstream,
) -> CuResult {
    let rt = Runtime::with_context()?;
    let route = capture::route(rt, stream)?;
    let row_bytes = width.checked_mul(element as usize).ok_or(CuError::INVALID_VALUE)?;
    if height > 1 && pitch < row_bytes {
        return Err(CuError::INVALID_VALUE);
    }
    if width == 0 || height == 0 {
        return Ok(());
    }
    let set = Set2D { dst, pitch, value, element, width, height };
    match route {
        Route::Send(s) => run_memset(rt, &set, s),
        Route::Capture(s) => capture::add(s, Op::Memset(set)).map(drop),
    }
}

/// A (2D) memset on stream `s`: one queued call per row, one in all when
/// the rows are contiguous.
pub(crate) fn run_memset(rt: &Runtime, m: &Set2D, s: StreamId) -> CuResult {
    let row = m.width * m.element as usize;
    if m.height == 1 || m.pitch == row {
        let count = (m.width * m.height) as u64;
        return rt.session.memset(m.dst, m.value, m.element, count, s).map_err(CuError::from);
    }
    for r in 0..m.height {
        rt.session.memset(m.dst + (r * m.pitch) as u64, m.value, m.element, m.width as u64, s)?;
    }
    Ok(())
}

fn loc(e: &End, offset: u64) -> Loc {
    if e.device { Loc::Device(e.addr + offset) } else { Loc::Host((e.addr + offset) as usize) }
}

/// Rows narrower than this, between device memory and the host, go as one
/// pitched copy the server gathers or scatters ([`pitched_copy`]) rather
/// than as a copy a row.
const NARROW_ROW: usize = 64 << 10;

/// Largest pitched copy ([`pitched_copy`]): its packed bytes are one
/// message or one staged transfer, within the session's staging bound;
/// larger copies keep the paths that move them in pieces.
const PITCHED_MAX: usize = 256 << 20;

/// A 2D or 3D copy on stream `s`: one call when both ends are contiguous;
/// a device-to-host copy reads each slice's span once and scatters its
/// rows here (one round trip a slice, not one a row) unless the rows are
/// sparse; narrow or sparse rows between device memory and the host go as
/// one pitched copy; else a call a row.
pub(crate) fn run_copy(rt: &Runtime, c: &Copy3D, s: StreamId) -> CuResult {
    if c.is_contiguous() {
        return copy(rt, loc(&c.dst, 0), loc(&c.src, 0), c.width * c.height * c.depth, s, false);
    }
    let packed = c.width * c.height * c.depth;
    if !c.dst.device && c.src.device {
        let span = (c.height.saturating_sub(1)) * c.src.pitch + c.width;
        // Sparse rows: reading each slice's whole span would move mostly
        // bytes nobody asked for (a 4-byte column of a 12 GiB buffer read
        // all 12 GiB).
        if span > 2 * packed.max(1) && packed <= PITCHED_MAX {
            return pitched_copy(rt, c, s);
        }
        let mut buf = vec![0u8; span];
        for z in 0..c.depth {
            rt.session.memcpy_dtoh(&mut buf, c.src.addr + Copy3D::offset(&c.src, 0, z), s)?;
            for row in 0..c.height {
                let from = &buf[row * c.src.pitch..row * c.src.pitch + c.width];
                let to = (c.dst.addr + Copy3D::offset(&c.dst, row, z)) as usize;
                // SAFETY: the CUDA contract: each destination row holds `width` bytes.
                unsafe { std::ptr::copy_nonoverlapping(from.as_ptr(), to as *mut u8, c.width) };
            }
        }
        return Ok(());
    }
    if c.dst.device && !c.src.device && c.width < NARROW_ROW && packed <= PITCHED_MAX {
        return pitched_copy(rt, c, s);
    }
    for z in 0..c.depth {
        for row in 0..c.height {
            let (d, src) = (Copy3D::offset(&c.dst, row, z), Copy3D::offset(&c.src, row, z));
            copy(rt, loc(&c.dst, d), loc(&c.src, src), c.width, s, false)?;
        }
    }
    Ok(())
}

/// A copy between pitched device memory and host rows as one call: the
/// host rows packed here, the device rows gathered or scattered by the
/// server (`ArrayCopy` with a device and a host end).
fn pitched_copy(rt: &Runtime, c: &Copy3D, s: StreamId) -> CuResult {
    use gpupool_client::{ArrayEnd, HostSide};
    let (w, h, d) = (c.width, c.height, c.depth);
    let packed = w.checked_mul(h).and_then(|n| n.checked_mul(d)).ok_or(CuError::INVALID_VALUE)?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(packed).map_err(|_| CuError(2))?;
    buf.resize(packed, 0);
    let device = |e: &End| ArrayEnd::Device { addr: e.addr, pitch: e.pitch as u64, height: e.height as u64 };
    let extent = (w as u64, h as u64, d as u64);
    let rows = (0..d).flat_map(|z| (0..h).map(move |row| (z, row)));
    if c.src.device {
        rt.session.array_copy(ArrayEnd::Host, device(&c.src), extent, HostSide::Into(&mut buf), s)?;
        for (i, (z, row)) in rows.enumerate() {
            let to = (c.dst.addr + Copy3D::offset(&c.dst, row, z)) as usize;
            // SAFETY: the CUDA contract: each destination row holds `width` bytes.
            unsafe { std::ptr::copy_nonoverlapping(buf[i * w..].as_ptr(), to as *mut u8, w) };
        }
    } else {
        for (i, (z, row)) in rows.enumerate() {
            let from = (c.src.addr + Copy3D::offset(&c.src, row, z)) as usize;
            // SAFETY: the CUDA contract: each source row holds `width` bytes.
            unsafe { std::ptr::copy_nonoverlapping(from as *const u8, buf[i * w..].as_mut_ptr(), w) };
        }
        rt.session.array_copy(device(&c.dst), ArrayEnd::Host, extent, HostSide::From(&buf), s)?;
    }
    Ok(())
}

/// `CUDA_MEMCPY2D` with its memory-type fields as plain integers, so that
/// a value this library does not know cannot become an invalid enum.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Memcpy2D {
    src_x: usize,
    src_y: usize,
    src_type: u32,
    src_host: usize,
    src_device: u64,
    src_array: usize,
    src_pitch: usize,
    dst_x: usize,
    dst_y: usize,
    dst_type: u32,
    dst_host: usize,
    dst_device: u64,
    dst_array: usize,
    dst_pitch: usize,
    width: usize,
    height: usize,
}

const _: () = assert!(std::mem::size_of::<Memcpy2D>() == std::mem::size_of::<CUDA_MEMCPY2D>());

/// A 2D copy is a 3D copy of one slice (`texture::copy_3d`).
fn copy_2d(p: *const CUDA_MEMCPY2D, stream: CUstream) -> CuResult {
    // SAFETY: `p` points to a CUDA_MEMCPY2D (CUDA contract); `Memcpy2D`
    // has the same layout with integer fields in place of enums.
    let c = unsafe { crate::abi::get(p.cast::<Memcpy2D>()) }?;
    crate::texture::copy_3d(&as_3d(&c), stream)
}

/// A 2D copy as the 3D copy it is (one slice).
fn as_3d(c: &Memcpy2D) -> Memcpy3d {
    Memcpy3d {
        src_x: c.src_x,
        src_y: c.src_y,
        src_type: c.src_type,
        src_host: c.src_host as *const c_void,
        src_device: c.src_device,
        src_array: c.src_array as *mut c_void,
        src_pitch: c.src_pitch,
        src_height: c.height,
        dst_x: c.dst_x,
        dst_y: c.dst_y,
        dst_type: c.dst_type,
        dst_host: c.dst_host as *mut c_void,
        dst_device: c.dst_device,
        dst_array: c.dst_array as *mut c_void,
        dst_pitch: c.dst_pitch,
        dst_height: c.height,
        width: c.width,
        height: c.height,
        depth: 1,
        ..Default::default()
    }
}

/// `size` bytes of pinned memory: in a shared host region when there is
/// one with room, else plain memory.
fn pinned(rt: &Runtime, size: usize) -> CuResult<*mut u8> {
    if size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    match rt.session.pinned_alloc(size) {
        Some(p) => Ok(p as *mut u8),
        None => hostmem::alloc(size),
    }
}

fn host_block(rt: &Runtime, addr: usize) -> Option<(usize, usize, u32)> {
    let t = rt.tables();
    [&t.host_allocs, &t.host_registered]
        .into_iter()
        .filter_map(|m| m.range(..=addr).next_back().map(|(&s, &(size, flags))| (s, size, flags)))
        .find(|&(s, size, _)| addr < s + size)
}

/// Notes the context a device allocation at `addr` was made in, when it
/// is not the primary one.
fn note_context(rt: &Runtime, addr: CUdeviceptr) {
    let current = crate::runtime::current_context().unwrap_or_else(|| handle(Tag::Context, PRIMARY));
    if current != handle(Tag::Context, PRIMARY) {
        rt.tables().alloc_contexts.insert(addr, current);
    }
}

/// Value of one pointer attribute: `None` when it does not apply.
fn pointer_attribute(rt: &Runtime, attribute: c_uint, ptr: CUdeviceptr) -> Option<u64> {
    // Host memory first: mapped host memory lies in the device range.
    if let Some((start, size, _)) = host_block(rt, ptr as usize) {
        return match attribute {
            1 => Some(handle(Tag::Context, PRIMARY) as u64),
            2 => Some(1), // MEMORY_TYPE: host
            3 => crate::mapped::device_pointer(rt, ptr as usize).ok(),
            4 => Some(ptr),
            8 => Some(0),
            9 => Some(0),
            11 => Some(start as u64),
            12 => Some(size as u64),
            13 => Some(1),
            _ => None,
        };
    }
    if let Some((start, m)) = crate::mapped::managed_range(rt, ptr as usize, 1) {
        return match attribute {
            1 => Some(handle(Tag::Context, PRIMARY) as u64), // CONTEXT
            2 => Some(2),                                    // MEMORY_TYPE: device
            3 | 4 => Some(ptr),                              // DEVICE_POINTER, HOST_POINTER: one address
            6 => Some(1),                                    // SYNC_MEMOPS
            8 => Some(1),                                    // IS_MANAGED
            9 => Some(0),                                    // DEVICE_ORDINAL
            7 | 20 | 11 | 19 => Some(start as u64),          // BUFFER_ID, ..., RANGE_START_ADDR
            12 | 18 => Some(m.size as u64),                  // RANGE_SIZE, MAPPING_SIZE
            13 => Some(1),                                   // MAPPED
            _ => None,
        };
    }
    if let Some((start, size)) = rt.session.address_range(ptr) {
        // cuMemMap ranges have the access cuMemSetAccess gave them.
        let access = rt.session.mem_access(ptr).map_or(3, u64::from);
        let context = rt.tables().alloc_contexts.get(&start).copied().unwrap_or_else(|| handle(Tag::Context, PRIMARY));
        return match attribute {
            1 => Some(context as u64),   // CONTEXT
            2 => Some(2),                // MEMORY_TYPE: device
            3 => Some(ptr),              // DEVICE_POINTER
            6 => Some(1),                // SYNC_MEMOPS
            7 | 20 => Some(start),       // BUFFER_ID, MEMORY_BLOCK_ID
            8 | 10 | 15 | 21 => Some(0), // IS_MANAGED, ..., no
            9 => Some(0),                // DEVICE_ORDINAL
            11 | 19 => Some(start),      // RANGE_START_ADDR, MAPPING_BASE_ADDR
            12 | 18 => Some(size),       // RANGE_SIZE, MAPPING_SIZE
            13 => Some(1),               // MAPPED
            14 => Some(0),               // ALLOWED_HANDLE_TYPES
            16 => Some(access),          // ACCESS_FLAGS
            _ => None,
        };
    }
    None
}

/// Bytes each pointer attribute occupies in the caller's buffer.
fn attribute_width(attribute: c_uint) -> usize {
    match attribute {
        2 | 6 | 8 | 9 | 10 | 13 | 15 | 16 | 21 => 4,
        _ => 8,
    }
}

/// # Safety
/// `data` is valid for writing the attribute's width.
unsafe fn write_attribute(data: *mut c_void, attribute: c_uint, value: u64) -> CuResult {
    // SAFETY: forwarded contract.
    unsafe {
        if attribute_width(attribute) == 4 {
            put(data.cast::<u32>(), value as u32)
        } else {
            put(data.cast::<u64>(), value)
        }
    }
}

crate::exports! {
    fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) {
        let rt = Runtime::with_context()?;
        capture::check_unsafe(false)?;
        let addr = rt.session.mem_alloc(bytesize as u64)?;
        note_context(rt, addr);
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(dptr, addr) }
    }

    fn cuMemAllocPitch_v2(dptr: *mut CUdeviceptr, pitch: *mut usize, width: usize, height: usize, element: c_uint) {
        if !matches!(element, 4 | 8 | 16) || width == 0 || height == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let rt = Runtime::with_context()?;
        let row = width.div_ceil(PITCH_ALIGN) * PITCH_ALIGN;
        let total = row.checked_mul(height).ok_or(CuError::INVALID_VALUE)?;
        let addr = rt.session.mem_alloc(total as u64)?;
        note_context(rt, addr);
        // SAFETY: out-pointers per the CUDA API.
        unsafe {
            put(pitch, row)?;
            put(dptr, addr)
        }
    }

    fn cuMemFree_v2(dptr: CUdeviceptr) {
        let rt = Runtime::with_context()?;
        if dptr == 0 {
            return Ok(());
        }
        capture::check_unsafe(false)?;
        if crate::mempool::free_sync(rt, dptr)? {
            return Ok(());
        }
        if crate::mapped::managed_range(rt, dptr as usize, 1).is_some_and(|(start, _)| start == dptr as usize) {
            return crate::mapped::release(rt, dptr as usize).map(drop);
        }
        rt.session.mem_free(dptr).map_err(CuError::from)?;
        rt.tables().alloc_contexts.remove(&dptr);
        Ok(())
    }

    fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) {
        let rt = Runtime::with_context()?;
        let (f, t) = rt.session.mem_get_info();
        // SAFETY: out-pointers per the CUDA API.
        unsafe {
            put(free, f as usize)?;
            put(total, t as usize)
        }
    }

    fn cuMemGetAddressRange_v2(base: *mut CUdeviceptr, size: *mut usize, dptr: CUdeviceptr) {
        let rt = Runtime::with_context()?;
        let (start, len) = rt.session.address_range(dptr).ok_or(CuError::NOT_FOUND)?;
        // SAFETY: each out-pointer may be null per the CUDA API.
        unsafe {
            if !base.is_null() {
                put(base, start)?;
            }
            if !size.is_null() {
                put(size, len as usize)?;
            }
        }
        Ok(())
    }

    fn cuMemcpy(dst: CUdeviceptr, src: CUdeviceptr, n: usize) { unified(dst, src, n, std::ptr::null_mut(), false) }
    fn cuMemcpy_ptds(dst: CUdeviceptr, src: CUdeviceptr, n: usize) { unified(dst, src, n, std::ptr::null_mut(), false) }
    fn cuMemcpyAsync(dst: CUdeviceptr, src: CUdeviceptr, n: usize, stream: CUstream) { unified(dst, src, n, stream, true) }
    fn cuMemcpyAsync_ptsz(dst: CUdeviceptr, src: CUdeviceptr, n: usize, stream: CUstream) { unified(dst, src, n, stream, true) }
    fn cuMemcpyHtoD_v2(dst: CUdeviceptr, src: *const c_void, n: usize) { htod(dst, src, n, std::ptr::null_mut(), false) }
    fn cuMemcpyHtoD_v2_ptds(dst: CUdeviceptr, src: *const c_void, n: usize) { htod(dst, src, n, std::ptr::null_mut(), false) }
    fn cuMemcpyHtoDAsync_v2(dst: CUdeviceptr, src: *const c_void, n: usize, stream: CUstream) { htod(dst, src, n, stream, true) }
    fn cuMemcpyHtoDAsync_v2_ptsz(dst: CUdeviceptr, src: *const c_void, n: usize, stream: CUstream) { htod(dst, src, n, stream, true) }
    fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) { dtoh(dst, src, n, std::ptr::null_mut(), false) }
    fn cuMemcpyDtoH_v2_ptds(dst: *mut c_void, src: CUdeviceptr, n: usize) { dtoh(dst, src, n, std::ptr::null_mut(), false) }
    fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: CUdeviceptr, n: usize, stream: CUstream) { dtoh(dst, src, n, stream, true) }
    fn cuMemcpyDtoHAsync_v2_ptsz(dst: *mut c_void, src: CUdeviceptr, n: usize, stream: CUstream) { dtoh(dst, src, n, stream, true) }
    fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize) { dtod(dst, src, n, std::ptr::null_mut()) }
    fn cuMemcpyDtoD_v2_ptds(dst: CUdeviceptr, src: CUdeviceptr, n: usize) { dtod(dst, src, n, std::ptr::null_mut()) }
    fn cuMemcpyDtoDAsync_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize, stream: CUstream) { dtod(dst, src, n, stream) }
    fn cuMemcpyDtoDAsync_v2_ptsz(dst: CUdeviceptr, src: CUdeviceptr, n: usize, stream: CUstream) { dtod(dst, src, n, stream) }
    fn cuMemcpy2D_v2(p: *const CUDA_MEMCPY2D) { copy_2d(p, std::ptr::null_mut()) }
    fn cuMemcpy2D_v2_ptds(p: *const CUDA_MEMCPY2D) { copy_2d(p, std::ptr::null_mut()) }
    fn cuMemcpy2DUnaligned_v2(p: *const CUDA_MEMCPY2D) { copy_2d(p, std::ptr::null_mut()) }
    fn cuMemcpy2DUnaligned_v2_ptds(p: *const CUDA_MEMCPY2D) { copy_2d(p, std::ptr::null_mut()) }
    fn cuMemcpy2DAsync_v2(p: *const CUDA_MEMCPY2D, stream: CUstream) { copy_2d(p, stream) }
    fn cuMemcpy2DAsync_v2_ptsz(p: *const CUDA_MEMCPY2D, stream: CUstream) { copy_2d(p, stream) }

    fn cuMemsetD8_v2(dst: CUdeviceptr, v: u8, n: usize) { memset(dst, v.into(), 1, n, std::ptr::null_mut()) }
    fn cuMemsetD8_v2_ptds(dst: CUdeviceptr, v: u8, n: usize) { memset(dst, v.into(), 1, n, std::ptr::null_mut()) }
    fn cuMemsetD16_v2(dst: CUdeviceptr, v: u16, n: usize) { memset(dst, v.into(), 2, n, std::ptr::null_mut()) }
    fn cuMemsetD16_v2_ptds(dst: CUdeviceptr, v: u16, n: usize) { memset(dst, v.into(), 2, n, std::ptr::null_mut()) }
    fn cuMemsetD32_v2(dst: CUdeviceptr, v: c_uint, n: usize) { memset(dst, v, 4, n, std::ptr::null_mut()) }
    fn cuMemsetD32_v2_ptds(dst: CUdeviceptr, v: c_uint, n: usize) { memset(dst, v, 4, n, std::ptr::null_mut()) }
    fn cuMemsetD8Async(dst: CUdeviceptr, v: u8, n: usize, s: CUstream) { memset(dst, v.into(), 1, n, s) }
    fn cuMemsetD8Async_ptsz(dst: CUdeviceptr, v: u8, n: usize, s: CUstream) { memset(dst, v.into(), 1, n, s) }
    fn cuMemsetD16Async(dst: CUdeviceptr, v: u16, n: usize, s: CUstream) { memset(dst, v.into(), 2, n, s) }
    fn cuMemsetD16Async_ptsz(dst: CUdeviceptr, v: u16, n: usize, s: CUstream) { memset(dst, v.into(), 2, n, s) }
    fn cuMemsetD32Async(dst: CUdeviceptr, v: c_uint, n: usize, s: CUstream) { memset(dst, v, 4, n, s) }
    fn cuMemsetD32Async_ptsz(dst: CUdeviceptr, v: c_uint, n: usize, s: CUstream) { memset(dst, v, 4, n, s) }
    fn cuMemsetD2D8_v2(dst: CUdeviceptr, pitch: usize, v: u8, w: usize, h: usize) { memset_2d(dst, pitch, v.into(), 1, w, h, std::ptr::null_mut()) }
    fn cuMemsetD2D8_v2_ptds(dst: CUdeviceptr, pitch: usize, v: u8, w: usize, h: usize) { memset_2d(dst, pitch, v.into(), 1, w, h, std::ptr::null_mut()) }
    fn cuMemsetD2D16_v2(dst: CUdeviceptr, pitch: usize, v: u16, w: usize, h: usize) { memset_2d(dst, pitch, v.into(), 2, w, h, std::ptr::null_mut()) }
    fn cuMemsetD2D16_v2_ptds(dst: CUdeviceptr, pitch: usize, v: u16, w: usize, h: usize) { memset_2d(dst, pitch, v.into(), 2, w, h, std::ptr::null_mut()) }
    fn cuMemsetD2D32_v2(dst: CUdeviceptr, pitch: usize, v: c_uint, w: usize, h: usize) { memset_2d(dst, pitch, v, 4, w, h, std::ptr::null_mut()) }
    fn cuMemsetD2D32_v2_ptds(dst: CUdeviceptr, pitch: usize, v: c_uint, w: usize, h: usize) { memset_2d(dst, pitch, v, 4, w, h, std::ptr::null_mut()) }
    fn cuMemsetD2D8Async(dst: CUdeviceptr, pitch: usize, v: u8, w: usize, h: usize, s: CUstream) { memset_2d(dst, pitch, v.into(), 1, w, h, s) }
    fn cuMemsetD2D8Async_ptsz(dst: CUdeviceptr, pitch: usize, v: u8, w: usize, h: usize, s: CUstream) { memset_2d(dst, pitch, v.into(), 1, w, h, s) }
    fn cuMemsetD2D16Async(dst: CUdeviceptr, pitch: usize, v: u16, w: usize, h: usize, s: CUstream) { memset_2d(dst, pitch, v.into(), 2, w, h, s) }
    fn cuMemsetD2D16Async_ptsz(dst: CUdeviceptr, pitch: usize, v: u16, w: usize, h: usize, s: CUstream) { memset_2d(dst, pitch, v.into(), 2, w, h, s) }
    fn cuMemsetD2D32Async(dst: CUdeviceptr, pitch: usize, v: c_uint, w: usize, h: usize, s: CUstream) { memset_2d(dst, pitch, v, 4, w, h, s) }
    fn cuMemsetD2D32Async_ptsz(dst: CUdeviceptr, pitch: usize, v: c_uint, w: usize, h: usize, s: CUstream) { memset_2d(dst, pitch, v, 4, w, h, s) }

    /// Pinned memory lives in a host region shared with the server when
    /// the session has shared memory (copies from and to it are the
    /// server's DMA), else it is plain page-aligned memory.
    fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) {
        let rt = Runtime::with_context()?;
        let p = pinned(rt, bytesize)?;
        rt.tables().host_allocs.insert(p as usize, (bytesize, 0));
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pp, p.cast()) }
    }

    /// DEVICEMAP: mirrored by device memory (`mapped.rs`), which moves with
    /// the session to another server (a host region, which another server
    /// cannot map, would not).
    fn cuMemHostAlloc(pp: *mut *mut c_void, bytesize: usize, flags: c_uint) {
        let rt = Runtime::with_context()?;
        let p = if flags & DEVICEMAP != 0 { crate::mapped::alloc(rt, bytesize)? as *mut u8 } else { pinned(rt, bytesize)? };
        rt.tables().host_allocs.insert(p as usize, (bytesize, flags));
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pp, p.cast()) }
    }

    fn cuMemFreeHost(p: *mut c_void) {
        let rt = Runtime::get()?;
        let (size, flags) = rt.tables().host_allocs.remove(&(p as usize)).ok_or(CuError::INVALID_VALUE)?;
        if flags & DEVICEMAP != 0 {
            return crate::mapped::release(rt, p as usize).map(drop);
        }
        if rt.session.pinned_free(p as usize)? {
            return Ok(());
        }
        // SAFETY: `p` came from hostmem::alloc with `size` (looked up above)
        // and is no longer in the table.
        unsafe { hostmem::free(p.cast(), size) };
        Ok(())
    }

    fn cuMemHostGetFlags(flags: *mut c_uint, p: *mut c_void) {
        let rt = Runtime::with_context()?;
        let (_, _, f) = host_block(rt, p as usize).ok_or(CuError::INVALID_VALUE)?;
        // With unified addressing the driver maps all pinned memory, and
        // says so: a PORTABLE allocation reads back PORTABLE | DEVICEMAP
        // (the H100, driver 580, tests/programs/pinned_copies.c).
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(flags, f | DEVICEMAP) }
    }

    /// Registration only records the range: copies from and to any host
    /// memory already go through the network.
    fn cuMemHostRegister_v2(p: *mut c_void, bytesize: usize, flags: c_uint) {
        if p.is_null() || bytesize == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let rt = Runtime::with_context()?;
        if rt.tables().host_registered.contains_key(&(p as usize)) {
            return Err(CuError(712)); // HOST_MEMORY_ALREADY_REGISTERED
        }
        if flags & DEVICEMAP != 0 {
            crate::mapped::register(rt, p as usize, bytesize)?;
        }
        rt.tables().host_registered.insert(p as usize, (bytesize, flags));
        Ok(())
    }

    fn cuMemHostUnregister(p: *mut c_void) {
        let rt = Runtime::with_context()?;
        rt.tables().host_registered.remove(&(p as usize)).ok_or(CuError(713))?; // NOT_REGISTERED
        crate::mapped::release(rt, p as usize).map(drop)
    }

    /// Mapped host memory's device address (`mapped.rs`).
    fn cuMemHostGetDevicePointer_v2(pdptr: *mut CUdeviceptr, p: *mut c_void, flags: c_uint) {
        let rt = Runtime::with_context()?;
        if flags != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let d = crate::mapped::device_pointer(rt, p as usize)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pdptr, d) }
    }

    fn cuPointerGetAttribute(data: *mut c_void, attribute: c_uint, ptr: CUdeviceptr) {
        let rt = Runtime::get()?;
        let value = pointer_attribute(rt, attribute, ptr).ok_or(CuError::INVALID_VALUE)?;
        // SAFETY: `data` holds the attribute's type per the CUDA API.
        unsafe { write_attribute(data, attribute, value) }
    }

    /// `CU_POINTER_ATTRIBUTE_SYNC_MEMOPS`, the one attribute CUDA lets a
    /// program set, on device memory: synchronous copies through gpupool
    /// always finish before they return, so the guarantee it asks for holds
    /// either way (and reads back as set).
    fn cuPointerSetAttribute(value: *const c_void, attribute: c_uint, ptr: CUdeviceptr) {
        let rt = Runtime::with_context()?;
        const SYNC_MEMOPS: c_uint = 6;
        if value.is_null() || attribute != SYNC_MEMOPS {
            return Err(CuError::INVALID_VALUE);
        }
        if pointer_attribute(rt, SYNC_MEMOPS, ptr).is_none() {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(())
    }

    /// Attributes that do not apply read as zero, as the driver does.
    fn cuPointerGetAttributes(count: c_uint, attributes: *mut c_uint, data: *mut *mut c_void, ptr: CUdeviceptr) {
        let rt = Runtime::get()?;
        if attributes.is_null() || data.is_null() {
            return Err(CuError::INVALID_VALUE);
        }
        for i in 0..count as usize {
            // SAFETY: both arrays hold `count` entries per the CUDA API.
            let (attribute, slot) = unsafe { (*attributes.add(i), *data.add(i)) };
            if slot.is_null() {
                continue;
            }
            let value = pointer_attribute(rt, attribute, ptr).unwrap_or(0);
            // SAFETY: each slot holds its attribute's type per the CUDA API.
            unsafe { write_attribute(slot, attribute, value) }?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcpy2d_mirror_matches_cuda_layout() {
        assert_eq!(std::mem::offset_of!(Memcpy2D, src_type), std::mem::offset_of!(CUDA_MEMCPY2D, srcMemoryType));
        assert_eq!(std::mem::offset_of!(Memcpy2D, dst_device), std::mem::offset_of!(CUDA_MEMCPY2D, dstDevice));
        assert_eq!(std::mem::offset_of!(Memcpy2D, height), std::mem::offset_of!(CUDA_MEMCPY2D, Height));
    }

    #[test]
    fn attribute_widths() {
        assert_eq!(attribute_width(2), 4);
        assert_eq!(attribute_width(1), 8);
        assert_eq!(attribute_width(12), 8);
    }
}
