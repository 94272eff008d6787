//! CUDA arrays, 3D copies and the copies that touch arrays, peer copies
//! (within the one device), texture and surface objects (`cudaMallocArray`,
//! `cudaMalloc3DArray`, `cudaMemcpy2DToArray`, `cudaMemcpy3D`,
//! `cudaMemcpyPeer`, `cudaCreateTextureObject`, `cudaCreateSurfaceObject` and
//! their driver entry points).
//!
//! Arrays live on the server; their handles here carry the session's id
//! for them, and their shapes are kept here for the descriptor queries.
//! Texture and surface handles are the server driver's own values, which
//! kernels take unchanged; the descriptions they were made from are kept
//! here for `cuTexObjectGet*`. A copy with an array end goes as one call:
//! host bytes packed into it (from the host) or answered packed (into the
//! host); 3D copies without arrays go the way 2D copies do (`memory.rs`).

use crate::abi::{CuError, CuResult, get, put};
use crate::capture::{self, Route};
use crate::graph::{Copy3D, End, Op};
use crate::runtime::{Runtime, Tag, handle, id_of};
use cudarc::driver::sys::{
    CUDA_ARRAY_DESCRIPTOR, CUDA_ARRAY3D_DESCRIPTOR, CUDA_MEMCPY3D, CUDA_MEMCPY3D_BATCH_OP, CUDA_MEMCPY3D_PEER,
    CUDA_RESOURCE_DESC, CUDA_RESOURCE_VIEW_DESC, CUDA_TEXTURE_DESC, CUarray, CUcontext, CUdeviceptr, CUmemcpy3DOperand,
    CUmipmappedArray, CUstream,
};
use gpupool_client::{ArrayEnd, HostSide, StreamId};
use gpupool_proto::texture_abi::{
    self as abi, Array3dDescriptor, ArrayDesc, ArrayDescriptor, MEMORY_ARRAY, MEMORY_DEVICE, MEMORY_HOST,
    MEMORY_UNIFIED, Memcpy3d, ResourceDesc, ResourceViewDesc, TextureDesc,
};
use gpupool_proto::v1;
use std::collections::HashMap;
use std::ffi::{c_uint, c_void};

const _: () = {
    assert!(size_of::<Array3dDescriptor>() == size_of::<CUDA_ARRAY3D_DESCRIPTOR>());
    assert!(size_of::<ArrayDescriptor>() == size_of::<CUDA_ARRAY_DESCRIPTOR>());
    assert!(size_of::<Memcpy3d>() == size_of::<CUDA_MEMCPY3D>());
    assert!(size_of::<Memcpy3d>() == size_of::<CUDA_MEMCPY3D_PEER>());
    assert!(size_of::<ResourceDesc>() == size_of::<CUDA_RESOURCE_DESC>());
    assert!(size_of::<TextureDesc>() == size_of::<CUDA_TEXTURE_DESC>());
    assert!(size_of::<ResourceViewDesc>() == size_of::<CUDA_RESOURCE_VIEW_DESC>());
};

/// An array as the application made it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ArrayInfo {
    desc: ArrayDesc,
    /// Levels of a mipmapped array (0 for an array or a level).
    levels: u32,
    /// The mipmapped array a level belongs to.
    parent: Option<u32>,
}

/// What a texture object was made from, for `cuTexObjectGet*`.
#[derive(Debug, Clone, Copy)]
struct TextureInfo {
    resource: ResourceDesc,
    texture: TextureDesc,
    view: Option<ResourceViewDesc>,
}

/// The process's arrays and objects.
#[derive(Debug, Default)]
pub(crate) struct Tables {
    arrays: HashMap<u32, ArrayInfo>,
    /// (mipmapped array, level) -> the level's array id: the driver gives
    /// the same handle each time.
    levels: HashMap<(u32, u32), u32>,
    textures: HashMap<u64, TextureInfo>,
    surfaces: HashMap<u64, ResourceDesc>,
}

fn array_handle(id: u32) -> CUarray {
    handle(Tag::Array, u64::from(id)) as CUarray
}

fn mipmapped_handle(id: u32) -> CUmipmappedArray {
    handle(Tag::MipmappedArray, u64::from(id)) as CUmipmappedArray
}

/// The id and shape of an array handle (not a mipmapped array).
fn array_of(rt: &Runtime, h: usize) -> CuResult<(u32, ArrayInfo)> {
    let id = id_of(Tag::Array, h).and_then(|id| u32::try_from(id).ok()).ok_or(CuError::INVALID_HANDLE)?;
    let info = *rt.tables().textures.arrays.get(&id).ok_or(CuError::INVALID_HANDLE)?;
    Ok((id, info))
}

fn mipmapped_of(rt: &Runtime, h: usize) -> CuResult<(u32, ArrayInfo)> {
    let id = id_of(Tag::MipmappedArray, h).and_then(|id| u32::try_from(id).ok()).ok_or(CuError::INVALID_HANDLE)?;
    let info = *rt.tables().textures.arrays.get(&id).ok_or(CuError::INVALID_HANDLE)?;
    if info.levels == 0 {
        return Err(CuError::INVALID_HANDLE);
    }
    Ok((id, info))
}

fn create(d: Array3dDescriptor, levels: u32) -> CuResult<u32> {
    let rt = Runtime::with_context()?;
    // Refused shapes fail here as the driver's would, without a round trip.
    let desc = ArrayDesc::from(&d).checked().map_err(|e| match e {
        abi::ShapeError::NotOffered(_) => CuError::NOT_SUPPORTED,
        abi::ShapeError::Invalid(_) => CuError::INVALID_VALUE,
    })?;
    let id = rt.session.array_create(desc, levels)?;
    rt.tables().textures.arrays.insert(id, ArrayInfo { desc, levels, parent: None });
    Ok(id)
}

fn destroy(rt: &Runtime, id: u32) -> CuResult {
    rt.session.array_destroy(id)?;
    let mut t = rt.tables();
    t.textures.arrays.remove(&id);
    t.textures.arrays.retain(|_, a| a.parent != Some(id));
    t.textures.levels.retain(|&(m, _), _| m != id);
    Ok(())
}

/// One end of a copy, resolved.
#[derive(Debug, Clone, Copy)]
enum Side {
    Array { id: u32, x: u64, y: u64, z: u64 },
    Device { addr: u64, pitch: usize, height: usize },
    Host { addr: usize, pitch: usize, height: usize },
}

/// The application's description of one end.
struct Described {
    kind: u32,
    x: usize,
    y: usize,
    z: usize,
    lod: usize,
    host: usize,
    device: u64,
    array: usize,
    pitch: usize,
    height: usize,
}

fn resolve(rt: &Runtime, d: &Described, c: &Memcpy3d) -> CuResult<Side> {
    if d.kind == MEMORY_ARRAY {
        if d.lod != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let (id, info) = array_of(rt, d.array)?;
        // Checked here too, so that a copy that does not fit fails the call
        // that asked, as the driver's does, even when it is queued.
        let a = &info.desc;
        let fits = |offset: usize, len: usize, size: u64| offset.checked_add(len).is_some_and(|e| e as u64 <= size);
        let element = a.element_bytes() as usize;
        if info.levels != 0
            || !d.x.is_multiple_of(element)
            || !c.width.is_multiple_of(element)
            || !fits(d.x, c.width, a.row_bytes())
            || !fits(d.y, c.height, a.rows())
            || !fits(d.z, c.depth, a.slices())
        {
            return Err(CuError::INVALID_VALUE);
        }
        return Ok(Side::Array { id, x: d.x as u64, y: d.y as u64, z: d.z as u64 });
    }
    // One row (and one slice) needs no pitch (and no slice height).
    let pitch = if c.height <= 1 && c.depth <= 1 { d.pitch.max(c.width) } else { d.pitch };
    let height = if c.depth <= 1 { d.height.max(c.height) } else { d.height };
    if (c.height > 1 || c.depth > 1) && pitch < c.width || (c.depth > 1 && height < c.height) {
        return Err(CuError::INVALID_VALUE);
    }
    let offset =
        d.z.checked_mul(height)
            .and_then(|rows| rows.checked_add(d.y))
            .and_then(|rows| rows.checked_mul(pitch))
            .and_then(|o| o.checked_add(d.x))
            .ok_or(CuError::INVALID_VALUE)?;
    let device = |addr: u64| Side::Device { addr: addr + offset as u64, pitch, height };
    match d.kind {
        MEMORY_HOST if d.host != 0 => Ok(Side::Host { addr: d.host + offset, pitch, height }),
        MEMORY_DEVICE if d.device != 0 => Ok(device(d.device)),
        MEMORY_UNIFIED if rt.session.is_device_ptr(d.device) => Ok(device(d.device)),
        MEMORY_UNIFIED if d.device != 0 => Ok(Side::Host { addr: d.device as usize + offset, pitch, height }),
        _ => Err(CuError::INVALID_VALUE),
    }
}

/// `CU_MEMCPY_OPERAND_TYPE_POINTER` and `CU_MEMCPY_OPERAND_TYPE_ARRAY`.
const OPERAND_POINTER: u32 = 1;
const OPERAND_ARRAY: u32 = 2;

/// One operation of `cuMemcpy3DBatchAsync` as the `CUDA_MEMCPY3D` it
/// stands for (the extent in elements: the array's element size, which
/// both arrays of an array-to-array copy must share, or 1 between
/// pointers), and its source pointer when the source is one.
pub(crate) fn batch_op(rt: &Runtime, op: &CUDA_MEMCPY3D_BATCH_OP) -> CuResult<(Memcpy3d, Option<CUdeviceptr>)> {
    let e = op.extent;
    if e.width == 0 || e.height == 0 || e.depth == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let element_of = |o: &CUmemcpy3DOperand| -> CuResult<Option<usize>> {
        match o.type_ as u32 {
            OPERAND_POINTER => Ok(None),
            // SAFETY: the union's member for this operand type.
            OPERAND_ARRAY => {
                Ok(Some(array_of(rt, unsafe { o.op.array }.array as usize)?.1.desc.element_bytes() as usize))
            }
            _ => Err(CuError::INVALID_VALUE),
        }
    };
    let element = match (element_of(&op.src)?, element_of(&op.dst)?) {
        (Some(a), Some(b)) if a != b => return Err(CuError::INVALID_VALUE),
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => 1,
    };
    let width = e.width.checked_mul(element).ok_or(CuError::INVALID_VALUE)?;
    // (type, x in bytes, y, z, pointer, array, pitch in bytes, height)
    type End = (u32, usize, usize, usize, CUdeviceptr, usize, usize, usize);
    let end = |o: &CUmemcpy3DOperand| -> CuResult<End> {
        if o.type_ as u32 == OPERAND_ARRAY {
            // SAFETY: the union's member for this operand type.
            let a = unsafe { o.op.array };
            let x = a.offset.x.checked_mul(element).ok_or(CuError::INVALID_VALUE)?;
            return Ok((MEMORY_ARRAY, x, a.offset.y, a.offset.z, 0, a.array as usize, 0, 0));
        }
        // SAFETY: as above.
        let p = unsafe { o.op.ptr };
        // A row length and layer height of 0 mean the copy's own.
        let (row, layer) = (
            if p.rowLength == 0 { e.width } else { p.rowLength },
            if p.layerHeight == 0 { e.height } else { p.layerHeight },
        );
        if row < e.width || layer < e.height {
            return Err(CuError::INVALID_VALUE);
        }
        let pitch = row.checked_mul(element).ok_or(CuError::INVALID_VALUE)?;
        Ok((MEMORY_UNIFIED, 0, 0, 0, p.ptr, 0, pitch, layer))
    };
    let (s, d) = (end(&op.src)?, end(&op.dst)?);
    let copy = Memcpy3d {
        src_type: s.0,
        src_x: s.1,
        src_y: s.2,
        src_z: s.3,
        src_device: s.4,
        src_array: s.5 as *mut c_void,
        src_pitch: s.6,
        src_height: s.7,
        dst_type: d.0,
        dst_x: d.1,
        dst_y: d.2,
        dst_z: d.3,
        dst_device: d.4,
        dst_array: d.5 as *mut c_void,
        dst_pitch: d.6,
        dst_height: d.7,
        width,
        height: e.height,
        depth: e.depth,
        ..Memcpy3d::default()
    };
    Ok((copy, (s.0 == MEMORY_UNIFIED).then_some(s.4)))
}

fn ends(c: &Memcpy3d) -> (Described, Described) {
    let src = Described {
        kind: c.src_type,
        x: c.src_x,
        y: c.src_y,
        z: c.src_z,
        lod: c.src_lod,
        host: c.src_host as usize,
        device: c.src_device,
        array: c.src_array as usize,
        pitch: c.src_pitch,
        height: c.src_height,
    };
    let dst = Described {
        kind: c.dst_type,
        x: c.dst_x,
        y: c.dst_y,
        z: c.dst_z,
        lod: c.dst_lod,
        host: c.dst_host as usize,
        device: c.dst_device,
        array: c.dst_array as usize,
        pitch: c.dst_pitch,
        height: c.dst_height,
    };
    (dst, src)
}

fn array_end(side: Side) -> ArrayEnd {
    match side {
        Side::Array { id, x, y, z } => ArrayEnd::Array { id, x, y, z },
        Side::Device { addr, pitch, height } => ArrayEnd::Device { addr, pitch: pitch as u64, height: height as u64 },
        Side::Host { .. } => ArrayEnd::Host,
    }
}

/// Byte offsets of each row of a host end, in packed order.
fn host_rows(c: &Memcpy3d, pitch: usize, height: usize) -> impl Iterator<Item = usize> + '_ {
    (0..c.depth).flat_map(move |z| (0..c.height).map(move |y| (z * height + y) * pitch))
}

/// A 3D (or 2D) copy as `CUDA_MEMCPY3D` describes it, on `stream`.
pub(crate) fn copy_3d(c: &Memcpy3d, stream: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    let route = capture::route(rt, stream)?;
    let (dst, src) = ends(c);
    let (dst, src) = (resolve(rt, &dst, c)?, resolve(rt, &src, c)?);
    if c.width == 0 || c.height == 0 || c.depth == 0 {
        return Ok(());
    }
    let linear_end = |s: Side| match s {
        Side::Device { addr, pitch, height } => Some(End { device: true, addr, pitch, height }),
        Side::Host { addr, pitch, height } => Some(End { device: false, addr: addr as u64, pitch, height }),
        Side::Array { .. } => None,
    };
    if let (Some(d), Some(s)) = (linear_end(dst), linear_end(src)) {
        let copy = Copy3D { dst: d, src: s, width: c.width, height: c.height, depth: c.depth };
        return match route {
            Route::Send(s) => crate::memory::run_copy(rt, &copy, s),
            Route::Capture(s) => capture::add(s, Op::Memcpy(copy)).map(drop),
        };
    }
    // Array copies are not recorded into graphs.
    let Route::Send(stream) = route else { return Err(CuError::NOT_SUPPORTED) };
    array_copy(rt, c, dst, src, stream)
}

fn array_copy(rt: &Runtime, c: &Memcpy3d, dst: Side, src: Side, stream: StreamId) -> CuResult {
    let extent = (c.width as u64, c.height as u64, c.depth as u64);
    let packed = c.width.checked_mul(c.height).and_then(|n| n.checked_mul(c.depth)).ok_or(CuError::INVALID_VALUE)?;
    match (dst, src) {
        (Side::Host { .. }, Side::Host { .. }) => Err(CuError::INVALID_VALUE),
        (_, Side::Host { addr, pitch, height }) => {
            let mut data = Vec::with_capacity(packed);
            for row in host_rows(c, pitch, height) {
                // SAFETY: the CUDA contract: each source row holds `width` bytes.
                data.extend_from_slice(unsafe { std::slice::from_raw_parts((addr + row) as *const u8, c.width) });
            }
            rt.session.array_copy(array_end(dst), ArrayEnd::Host, extent, HostSide::From(&data), stream)?;
            Ok(())
        }
        (Side::Host { addr, pitch, height }, _) => {
            let mut data = vec![0u8; packed];
            rt.session.array_copy(ArrayEnd::Host, array_end(src), extent, HostSide::Into(&mut data), stream)?;
            for (row, chunk) in host_rows(c, pitch, height).zip(data.chunks_exact(c.width)) {
                // SAFETY: the CUDA contract: each destination row holds `width` bytes.
                unsafe { std::ptr::copy_nonoverlapping(chunk.as_ptr(), (addr + row) as *mut u8, c.width) };
            }
            Ok(())
        }
        _ => Ok(rt.session.array_copy(array_end(dst), array_end(src), extent, HostSide::None, stream)?),
    }
}

/// A peer copy: every context of the process is on the session's one
/// device, so it is a copy within the device once both contexts are known.
fn peer(dst: CUdeviceptr, dst_ctx: CUcontext, src: CUdeviceptr, src_ctx: CUcontext, n: usize, s: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    crate::context::resolve(rt, dst_ctx)?;
    crate::context::resolve(rt, src_ctx)?;
    crate::memory::dtod(dst, src, n, s)
}

/// `cuMemcpy3DPeer`: `CUDA_MEMCPY3D_PEER` is `CUDA_MEMCPY3D` with the
/// contexts where the latter has its reserved words.
fn peer_3d(p: *const CUDA_MEMCPY3D_PEER, stream: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    // SAFETY: a CUDA_MEMCPY3D_PEER per the CUDA API (same layout).
    let mut c = unsafe { get(p.cast::<Memcpy3d>()) }?;
    crate::context::resolve(rt, c.reserved0.cast())?;
    crate::context::resolve(rt, c.reserved1.cast())?;
    (c.reserved0, c.reserved1) = (std::ptr::null_mut(), std::ptr::null_mut());
    copy_3d(&c, stream)
}

/// One end of a linear copy (`cuMemcpy?toA`, `cuMemcpyAto?`): `offset`
/// bytes into a 1D array, or memory.
#[derive(Debug, Clone, Copy)]
enum Linear {
    Array(CUarray, usize),
    Host(usize),
    Device(CUdeviceptr),
}

/// A linear copy of `n` bytes with an array at one end at least.
fn linear(dst: Linear, src: Linear, n: usize, stream: CUstream) -> CuResult {
    let mut c = Memcpy3d { width: n, height: 1, depth: 1, ..Default::default() };
    match dst {
        Linear::Array(array, x) => (c.dst_type, c.dst_array, c.dst_x) = (MEMORY_ARRAY, array.cast(), x),
        Linear::Host(p) => (c.dst_type, c.dst_host) = (MEMORY_HOST, p as *mut c_void),
        Linear::Device(p) => (c.dst_type, c.dst_device) = (MEMORY_DEVICE, p),
    }
    match src {
        Linear::Array(array, x) => (c.src_type, c.src_array, c.src_x) = (MEMORY_ARRAY, array.cast(), x),
        Linear::Host(p) => (c.src_type, c.src_host) = (MEMORY_HOST, p as *const c_void),
        Linear::Device(p) => (c.src_type, c.src_device) = (MEMORY_DEVICE, p),
    }
    copy_3d(&c, stream)
}

fn in_array(array: CUarray, offset: usize) -> Linear {
    Linear::Array(array, offset)
}

fn host<T>(p: *const T) -> Linear {
    Linear::Host(p as usize)
}

fn device(p: CUdeviceptr) -> Linear {
    Linear::Device(p)
}

/// What texture object `object` was made from.
fn texture_info(rt: &Runtime, object: u64) -> CuResult<TextureInfo> {
    rt.tables().textures.textures.get(&object).copied().ok_or(CuError::INVALID_VALUE)
}

/// Reads a texture or surface resource description and names its array.
fn resource(rt: &Runtime, r: &ResourceDesc) -> CuResult<v1::TextureResource> {
    use v1::texture_resource::Kind;
    let kind = match r.kind {
        abi::RESOURCE_ARRAY => Kind::Array(array_of(rt, r.handle as usize)?.0),
        abi::RESOURCE_MIPMAPPED_ARRAY => Kind::Mipmapped(mipmapped_of(rt, r.handle as usize)?.0),
        abi::RESOURCE_LINEAR => Kind::Linear(v1::LinearResource {
            addr: r.handle,
            format: r.format,
            channels: r.channels,
            size: r.size_or_width as u64,
        }),
        abi::RESOURCE_PITCH2D => Kind::Pitch2d(v1::Pitch2dResource {
            addr: r.handle,
            format: r.format,
            channels: r.channels,
            width: r.size_or_width as u64,
            height: r.height as u64,
            pitch: r.pitch as u64,
        }),
        _ => return Err(CuError::INVALID_VALUE),
    };
    Ok(v1::TextureResource { kind: Some(kind), flags: r.flags })
}

crate::exports! {
    fn cuArrayCreate_v2(out: *mut CUarray, p: *const CUDA_ARRAY_DESCRIPTOR) {
        // SAFETY: a CUDA_ARRAY_DESCRIPTOR per the CUDA API (same layout).
        let d = unsafe { get(p.cast::<ArrayDescriptor>()) }?;
        let d3 = Array3dDescriptor { width: d.width, height: d.height, depth: 0, format: d.format, channels: d.channels, flags: 0 };
        let id = create(d3, 0)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, array_handle(id)) }
    }

    fn cuArray3DCreate_v2(out: *mut CUarray, p: *const CUDA_ARRAY3D_DESCRIPTOR) {
        // SAFETY: a CUDA_ARRAY3D_DESCRIPTOR per the CUDA API (same layout).
        let d = unsafe { get(p.cast::<Array3dDescriptor>()) }?;
        let id = create(d, 0)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, array_handle(id)) }
    }

    fn cuMipmappedArrayCreate(out: *mut CUmipmappedArray, p: *const CUDA_ARRAY3D_DESCRIPTOR, levels: c_uint) {
        // SAFETY: a CUDA_ARRAY3D_DESCRIPTOR per the CUDA API (same layout).
        let d = unsafe { get(p.cast::<Array3dDescriptor>()) }?;
        if levels == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let id = create(d, levels)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, mipmapped_handle(id)) }
    }

    fn cuMipmappedArrayGetLevel(out: *mut CUarray, m: CUmipmappedArray, level: c_uint) {
        let rt = Runtime::with_context()?;
        let (mid, info) = mipmapped_of(rt, m as usize)?;
        if level >= info.levels {
            return Err(CuError::INVALID_VALUE);
        }
        let known = rt.tables().textures.levels.get(&(mid, level)).copied();
        let id = match known {
            Some(id) => id,
            None => {
                let id = rt.session.array_level(mid, level)?;
                let mut t = rt.tables();
                let desc = info.desc.level(level);
                t.textures.arrays.insert(id, ArrayInfo { desc, levels: 0, parent: Some(mid) });
                t.textures.levels.insert((mid, level), id);
                id
            }
        };
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, array_handle(id)) }
    }

    fn cuArrayDestroy(array: CUarray) {
        let rt = Runtime::with_context()?;
        let (id, info) = array_of(rt, array as usize)?;
        if info.parent.is_some() {
            return Err(CuError::INVALID_HANDLE);
        }
        destroy(rt, id)
    }

    fn cuMipmappedArrayDestroy(m: CUmipmappedArray) {
        let rt = Runtime::with_context()?;
        let (id, _) = mipmapped_of(rt, m as usize)?;
        destroy(rt, id)
    }

    fn cuArrayGetDescriptor_v2(out: *mut CUDA_ARRAY_DESCRIPTOR, array: CUarray) {
        let rt = Runtime::with_context()?;
        let d = array_of(rt, array as usize)?.1.desc;
        let desc = ArrayDescriptor { width: d.width as usize, height: d.height as usize, format: d.format, channels: d.channels };
        // SAFETY: out-pointer per the CUDA API (same layout).
        unsafe { put(out.cast::<ArrayDescriptor>(), desc) }
    }

    fn cuArray3DGetDescriptor_v2(out: *mut CUDA_ARRAY3D_DESCRIPTOR, array: CUarray) {
        let rt = Runtime::with_context()?;
        let d = array_of(rt, array as usize)?.1.desc;
        // SAFETY: out-pointer per the CUDA API (same layout).
        unsafe { put(out.cast::<Array3dDescriptor>(), Array3dDescriptor::from(&d)) }
    }

    fn cuMemcpy3D_v2(p: *const CUDA_MEMCPY3D) {
        // SAFETY: a CUDA_MEMCPY3D per the CUDA API (same layout).
        copy_3d(&unsafe { get(p.cast::<Memcpy3d>()) }?, std::ptr::null_mut())
    }
    fn cuMemcpy3D_v2_ptds(p: *const CUDA_MEMCPY3D) {
        // SAFETY: as above.
        copy_3d(&unsafe { get(p.cast::<Memcpy3d>()) }?, std::ptr::null_mut())
    }
    fn cuMemcpy3DAsync_v2(p: *const CUDA_MEMCPY3D, stream: CUstream) {
        // SAFETY: as above.
        copy_3d(&unsafe { get(p.cast::<Memcpy3d>()) }?, stream)
    }
    fn cuMemcpy3DAsync_v2_ptsz(p: *const CUDA_MEMCPY3D, stream: CUstream) {
        // SAFETY: as above.
        copy_3d(&unsafe { get(p.cast::<Memcpy3d>()) }?, stream)
    }

    fn cuMemcpyHtoA_v2(dst: CUarray, offset: usize, src: *const c_void, n: usize) { linear(in_array(dst, offset), host(src), n, std::ptr::null_mut()) }
    fn cuMemcpyHtoA_v2_ptds(dst: CUarray, offset: usize, src: *const c_void, n: usize) { linear(in_array(dst, offset), host(src), n, std::ptr::null_mut()) }
    fn cuMemcpyHtoAAsync_v2(dst: CUarray, offset: usize, src: *const c_void, n: usize, s: CUstream) { linear(in_array(dst, offset), host(src), n, s) }
    fn cuMemcpyHtoAAsync_v2_ptsz(dst: CUarray, offset: usize, src: *const c_void, n: usize, s: CUstream) { linear(in_array(dst, offset), host(src), n, s) }
    fn cuMemcpyAtoH_v2(dst: *mut c_void, src: CUarray, offset: usize, n: usize) { linear(host(dst), in_array(src, offset), n, std::ptr::null_mut()) }
    fn cuMemcpyAtoH_v2_ptds(dst: *mut c_void, src: CUarray, offset: usize, n: usize) { linear(host(dst), in_array(src, offset), n, std::ptr::null_mut()) }
    fn cuMemcpyAtoHAsync_v2(dst: *mut c_void, src: CUarray, offset: usize, n: usize, s: CUstream) { linear(host(dst), in_array(src, offset), n, s) }
    fn cuMemcpyAtoHAsync_v2_ptsz(dst: *mut c_void, src: CUarray, offset: usize, n: usize, s: CUstream) { linear(host(dst), in_array(src, offset), n, s) }
    fn cuMemcpyDtoA_v2(dst: CUarray, offset: usize, src: CUdeviceptr, n: usize) { linear(in_array(dst, offset), device(src), n, std::ptr::null_mut()) }
    fn cuMemcpyDtoA_v2_ptds(dst: CUarray, offset: usize, src: CUdeviceptr, n: usize) { linear(in_array(dst, offset), device(src), n, std::ptr::null_mut()) }
    fn cuMemcpyAtoD_v2(dst: CUdeviceptr, src: CUarray, offset: usize, n: usize) { linear(device(dst), in_array(src, offset), n, std::ptr::null_mut()) }
    fn cuMemcpyAtoD_v2_ptds(dst: CUdeviceptr, src: CUarray, offset: usize, n: usize) { linear(device(dst), in_array(src, offset), n, std::ptr::null_mut()) }
    fn cuMemcpyAtoA_v2(dst: CUarray, dst_offset: usize, src: CUarray, src_offset: usize, n: usize) { linear(in_array(dst, dst_offset), in_array(src, src_offset), n, std::ptr::null_mut()) }
    fn cuMemcpyAtoA_v2_ptds(dst: CUarray, dst_offset: usize, src: CUarray, src_offset: usize, n: usize) { linear(in_array(dst, dst_offset), in_array(src, src_offset), n, std::ptr::null_mut()) }

    fn cuMemcpyPeer(dst: CUdeviceptr, dc: CUcontext, src: CUdeviceptr, sc: CUcontext, n: usize) { peer(dst, dc, src, sc, n, std::ptr::null_mut()) }
    fn cuMemcpyPeer_ptds(dst: CUdeviceptr, dc: CUcontext, src: CUdeviceptr, sc: CUcontext, n: usize) { peer(dst, dc, src, sc, n, std::ptr::null_mut()) }
    fn cuMemcpyPeerAsync(dst: CUdeviceptr, dc: CUcontext, src: CUdeviceptr, sc: CUcontext, n: usize, s: CUstream) { peer(dst, dc, src, sc, n, s) }
    fn cuMemcpyPeerAsync_ptsz(dst: CUdeviceptr, dc: CUcontext, src: CUdeviceptr, sc: CUcontext, n: usize, s: CUstream) { peer(dst, dc, src, sc, n, s) }
    fn cuMemcpy3DPeer(p: *const CUDA_MEMCPY3D_PEER) { peer_3d(p, std::ptr::null_mut()) }
    fn cuMemcpy3DPeer_ptds(p: *const CUDA_MEMCPY3D_PEER) { peer_3d(p, std::ptr::null_mut()) }
    fn cuMemcpy3DPeerAsync(p: *const CUDA_MEMCPY3D_PEER, s: CUstream) { peer_3d(p, s) }
    fn cuMemcpy3DPeerAsync_ptsz(p: *const CUDA_MEMCPY3D_PEER, s: CUstream) { peer_3d(p, s) }

    fn cuTexObjectCreate(
        out: *mut u64, res: *const CUDA_RESOURCE_DESC, tex: *const CUDA_TEXTURE_DESC, view: *const CUDA_RESOURCE_VIEW_DESC,
    ) {
        let rt = Runtime::with_context()?;
        // SAFETY: the CUDA API's structures (same layouts); `view` may be null.
        let (r, t, v) = unsafe {
            let v = if view.is_null() { None } else { Some(get(view.cast::<ResourceViewDesc>())?) };
            (get(res.cast::<ResourceDesc>())?, get(tex.cast::<TextureDesc>())?, v)
        };
        let request = v1::TexObjectCreate {
            resource: Some(resource(rt, &r)?),
            texture: Some(v1::TextureDesc::from(&t)),
            view: v.as_ref().map(v1::ResourceView::from),
        };
        let object = rt.session.tex_object_create(request)?;
        rt.tables().textures.textures.insert(object, TextureInfo { resource: r, texture: t, view: v });
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, object) }
    }

    fn cuTexObjectDestroy(object: u64) {
        let rt = Runtime::with_context()?;
        rt.tables().textures.textures.remove(&object).ok_or(CuError::INVALID_VALUE)?;
        rt.session.tex_object_destroy(object).map_err(CuError::from)
    }

    fn cuTexObjectGetResourceDesc(out: *mut CUDA_RESOURCE_DESC, object: u64) {
        let rt = Runtime::with_context()?;
        let info = texture_info(rt, object)?;
        // SAFETY: out-pointer per the CUDA API (same layout).
        unsafe { put(out.cast::<ResourceDesc>(), info.resource) }
    }

    fn cuTexObjectGetTextureDesc(out: *mut CUDA_TEXTURE_DESC, object: u64) {
        let rt = Runtime::with_context()?;
        let info = texture_info(rt, object)?;
        // The driver does not give the border color back: it reads 0 what
        // a program set (0.5 on the H100, driver 580, tests/programs/
        // arrays_nokernel.cu), and the stub answers as it does.
        let texture = TextureDesc { border_color: [0.0; 4], ..info.texture };
        // SAFETY: out-pointer per the CUDA API (same layout).
        unsafe { put(out.cast::<TextureDesc>(), texture) }
    }

    fn cuTexObjectGetResourceViewDesc(out: *mut CUDA_RESOURCE_VIEW_DESC, object: u64) {
        let rt = Runtime::with_context()?;
        let info = texture_info(rt, object)?;
        // Natively: INVALID_VALUE when the object was made without a view.
        let view = info.view.ok_or(CuError::INVALID_VALUE)?;
        // SAFETY: out-pointer per the CUDA API (same layout).
        unsafe { put(out.cast::<ResourceViewDesc>(), view) }
    }

    fn cuSurfObjectCreate(out: *mut u64, res: *const CUDA_RESOURCE_DESC) {
        let rt = Runtime::with_context()?;
        // SAFETY: a CUDA_RESOURCE_DESC per the CUDA API (same layout).
        let r = unsafe { get(res.cast::<ResourceDesc>()) }?;
        if r.kind != abi::RESOURCE_ARRAY {
            return Err(CuError::INVALID_VALUE);
        }
        let (id, _) = array_of(rt, r.handle as usize)?;
        let object = rt.session.surf_object_create(id)?;
        rt.tables().textures.surfaces.insert(object, r);
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(out, object) }
    }

    fn cuSurfObjectDestroy(object: u64) {
        let rt = Runtime::with_context()?;
        rt.tables().textures.surfaces.remove(&object).ok_or(CuError::INVALID_VALUE)?;
        rt.session.surf_object_destroy(object).map_err(CuError::from)
    }

    fn cuSurfObjectGetResourceDesc(out: *mut CUDA_RESOURCE_DESC, object: u64) {
        let rt = Runtime::with_context()?;
        let r = *rt.tables().textures.surfaces.get(&object).ok_or(CuError::INVALID_VALUE)?;
        // SAFETY: out-pointer per the CUDA API (same layout).
        unsafe { put(out.cast::<ResourceDesc>(), r) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rows_walk_rows_then_slices() {
        let c = Memcpy3d { width: 4, height: 2, depth: 2, ..Default::default() };
        let rows: Vec<usize> = host_rows(&c, 16, 3).collect();
        assert_eq!(rows, vec![0, 16, 48, 64]);
    }
}
