//! CUDA arrays, copies that touch them and texture and surface objects on
//! the device's driver. The structures go to the driver in `cuda.h`'s
//! layout with plain integers for its enumerations
//! (`gpupool_proto::texture_abi`); the session checked every shape, offset
//! and address first.

use super::driver::{self, warn_on_error};
use super::resources::{Context, Stream};
use crate::device::DeviceResult;
use crate::device::texture::{ArrayDesc, Extent, Place, Resource, TextureDesc, ViewDesc};
use cudarc::driver::sys::{self, CUarray, CUmipmappedArray};
use gpupool_proto::texture_abi::{
    self as abi, Array3dDescriptor, MEMORY_ARRAY, MEMORY_DEVICE, MEMORY_HOST, Memcpy3d, ResourceDesc, ResourceViewDesc,
};
use std::ffi::c_void;
use std::rc::Rc;
use std::sync::Arc;

const _: () = {
    assert!(size_of::<Array3dDescriptor>() == size_of::<sys::CUDA_ARRAY3D_DESCRIPTOR>());
    assert!(size_of::<Memcpy3d>() == size_of::<sys::CUDA_MEMCPY3D>());
    assert!(size_of::<ResourceDesc>() == size_of::<sys::CUDA_RESOURCE_DESC>());
    assert!(size_of::<abi::TextureDesc>() == size_of::<sys::CUDA_TEXTURE_DESC>());
    assert!(size_of::<ResourceViewDesc>() == size_of::<sys::CUDA_RESOURCE_VIEW_DESC>());
};

/// What an [`Array`] owns.
#[derive(Debug)]
enum Owned {
    Plain(CUarray),
    Mipmapped(CUmipmappedArray),
}

#[derive(Debug)]
struct ArrayInner {
    owned: Owned,
    _context: Arc<Context>,
}

impl Drop for ArrayInner {
    fn drop(&mut self) {
        match self.owned {
            // SAFETY: created by this session and destroyed once, here; the
            // objects that read it held this value alive until now.
            Owned::Plain(a) => warn_on_error(unsafe { sys::cuArrayDestroy(a) }, "cuArrayDestroy"),
            // SAFETY: as above.
            Owned::Mipmapped(m) => warn_on_error(unsafe { sys::cuMipmappedArrayDestroy(m) }, "cuMipmappedArrayDestroy"),
        }
    }
}

/// An array, a mipmapped array, or a level of one (which holds its
/// mipmapped array). Clones share it.
#[derive(Debug, Clone)]
pub struct Array {
    inner: Rc<ArrayInner>,
    /// The `CUarray` copies and objects use: the array itself, or the level.
    raw: CUarray,
}

/// A texture or surface object; it holds the array it reads.
#[derive(Debug)]
pub struct Object {
    handle: u64,
    surface: bool,
    _array: Option<Array>,
}

impl Drop for Object {
    fn drop(&mut self) {
        if self.surface {
            // SAFETY: created by this session and destroyed once, here.
            warn_on_error(unsafe { sys::cuSurfObjectDestroy(self.handle) }, "cuSurfObjectDestroy");
        } else {
            // SAFETY: as above.
            warn_on_error(unsafe { sys::cuTexObjectDestroy(self.handle) }, "cuTexObjectDestroy");
        }
    }
}

pub(super) fn array_create(context: &Arc<Context>, desc: &ArrayDesc, levels: u32) -> DeviceResult<Array> {
    let d = Array3dDescriptor::from(desc);
    let p = (&d as *const Array3dDescriptor).cast::<sys::CUDA_ARRAY3D_DESCRIPTOR>();
    if levels == 0 {
        let mut raw: CUarray = std::ptr::null_mut();
        // SAFETY: valid out-pointer; `d` has the driver's layout (asserted
        // above) and outlives the call; the context is current.
        driver::check(unsafe { sys::cuArray3DCreate_v2(&mut raw, p) }, "cuArray3DCreate_v2")?;
        let inner = Rc::new(ArrayInner { owned: Owned::Plain(raw), _context: context.clone() });
        Ok(Array { inner, raw })
    } else {
        let mut raw: CUmipmappedArray = std::ptr::null_mut();
        // SAFETY: as above.
        driver::check(unsafe { sys::cuMipmappedArrayCreate(&mut raw, p, levels) }, "cuMipmappedArrayCreate")?;
        let inner = Rc::new(ArrayInner { owned: Owned::Mipmapped(raw), _context: context.clone() });
        Ok(Array { inner, raw: std::ptr::null_mut() })
    }
}

pub(super) fn array_level(mipmapped: &Array, level: u32) -> DeviceResult<Array> {
    let Owned::Mipmapped(m) = mipmapped.inner.owned else {
        return Err(crate::error::CallError::invalid_handle("not a mipmapped array"));
    };
    let mut raw: CUarray = std::ptr::null_mut();
    // SAFETY: valid out-pointer; a live mipmapped array of this session.
    driver::check(unsafe { sys::cuMipmappedArrayGetLevel(&mut raw, m, level) }, "cuMipmappedArrayGetLevel")?;
    Ok(Array { inner: mipmapped.inner.clone(), raw })
}

/// Sets one end of `c` (`src` or not) to a device-side place.
fn set_place(c: &mut Memcpy3d, place: &Place<Array>, src: bool) {
    let (kind, x, y, z, device, array, pitch, height) = match *place {
        Place::Array { ref array, x, y, z } => (MEMORY_ARRAY, x, y, z, 0, array.raw.cast::<c_void>(), 0, 0),
        Place::Device { addr, pitch, height } => (MEMORY_DEVICE, 0, 0, 0, addr, std::ptr::null_mut(), pitch, height),
    };
    let (x, y, z, pitch, height) = (x as usize, y as usize, z as usize, pitch as usize, height as usize);
    if src {
        (c.src_type, c.src_x, c.src_y, c.src_z, c.src_device, c.src_array, c.src_pitch, c.src_height) =
            (kind, x, y, z, device, array, pitch, height);
    } else {
        (c.dst_type, c.dst_x, c.dst_y, c.dst_z, c.dst_device, c.dst_array, c.dst_pitch, c.dst_height) =
            (kind, x, y, z, device, array, pitch, height);
    }
}

fn extent_of(extent: Extent) -> Memcpy3d {
    Memcpy3d {
        width: extent.width as usize,
        height: extent.height as usize,
        depth: extent.depth as usize,
        ..Default::default()
    }
}

/// Runs `c` on `stream`; with host memory in it, waits for the copy so the
/// caller's buffer may go.
fn run(c: &Memcpy3d, stream: Option<&Stream>, host: bool) -> DeviceResult<()> {
    let raw = stream.map_or(std::ptr::null_mut(), |s| s.raw);
    let p = (c as *const Memcpy3d).cast::<sys::CUDA_MEMCPY3D>();
    // SAFETY: `c` has the driver's layout and names live arrays of this
    // session, device memory the session checked and host memory the caller
    // keeps until this returns (the stream is synchronized below).
    driver::check(unsafe { sys::cuMemcpy3DAsync_v2(p, raw) }, "cuMemcpy3DAsync_v2")?;
    if host {
        // SAFETY: a live stream of this session, or the legacy stream.
        driver::check(unsafe { sys::cuStreamSynchronize(raw) }, "cuStreamSynchronize")?;
    }
    Ok(())
}

pub(super) fn array_copy(
    stream: Option<&Stream>,
    dst: Place<Array>,
    src: Place<Array>,
    extent: Extent,
) -> DeviceResult<()> {
    let mut c = extent_of(extent);
    set_place(&mut c, &dst, false);
    set_place(&mut c, &src, true);
    run(&c, stream, false)
}

pub(super) fn array_write(stream: Option<&Stream>, dst: Place<Array>, data: &[u8], extent: Extent) -> DeviceResult<()> {
    let mut c = extent_of(extent);
    set_place(&mut c, &dst, false);
    (c.src_type, c.src_host, c.src_pitch, c.src_height) =
        (MEMORY_HOST, data.as_ptr().cast(), extent.width as usize, extent.height as usize);
    run(&c, stream, true)
}

pub(super) fn array_read(
    stream: Option<&Stream>,
    src: Place<Array>,
    out: &mut [u8],
    extent: Extent,
) -> DeviceResult<()> {
    let mut c = extent_of(extent);
    set_place(&mut c, &src, true);
    (c.dst_type, c.dst_host, c.dst_pitch, c.dst_height) =
        (MEMORY_HOST, out.as_mut_ptr().cast(), extent.width as usize, extent.height as usize);
    run(&c, stream, true)
}

pub(super) fn texture_create(
    resource: Resource<Array>,
    desc: &TextureDesc,
    view: Option<&ViewDesc>,
) -> DeviceResult<(u64, Object)> {
    let mut r = ResourceDesc::default();
    let array = match resource {
        Resource::Array(a) => {
            (r.kind, r.handle) = (abi::RESOURCE_ARRAY, a.raw as u64);
            Some(a)
        }
        Resource::Mipmapped(a) => {
            let Owned::Mipmapped(m) = a.inner.owned else {
                return Err(crate::error::CallError::invalid_handle("not a mipmapped array"));
            };
            (r.kind, r.handle) = (abi::RESOURCE_MIPMAPPED_ARRAY, m as u64);
            Some(a)
        }
        Resource::Linear { addr, format, channels, size } => {
            (r.kind, r.handle, r.format, r.channels, r.size_or_width) =
                (abi::RESOURCE_LINEAR, addr, format, channels, size as usize);
            None
        }
        Resource::Pitch2d { addr, format, channels, width, height, pitch } => {
            (r.kind, r.handle, r.format, r.channels) = (abi::RESOURCE_PITCH2D, addr, format, channels);
            (r.size_or_width, r.height, r.pitch) = (width as usize, height as usize, pitch as usize);
            None
        }
    };
    let v_ptr = view.map_or(std::ptr::null(), |v| (v as *const ResourceViewDesc).cast());
    let mut handle = 0;
    // SAFETY: valid out-pointer; the three structures have the driver's
    // layouts (asserted above) and outlive the call; the resource's array
    // or memory belongs to this session (checked by the session).
    let result = unsafe {
        sys::cuTexObjectCreate(
            &mut handle,
            (&r as *const ResourceDesc).cast(),
            (desc as *const abi::TextureDesc).cast(),
            v_ptr,
        )
    };
    driver::check(result, "cuTexObjectCreate")?;
    Ok((handle, Object { handle, surface: false, _array: array }))
}

pub(super) fn surface_create(array: &Array) -> DeviceResult<(u64, Object)> {
    let r = ResourceDesc { kind: abi::RESOURCE_ARRAY, handle: array.raw as u64, ..Default::default() };
    let mut handle = 0;
    // SAFETY: valid out-pointer; `r` has the driver's layout and names a
    // live array of this session.
    driver::check(
        unsafe { sys::cuSurfObjectCreate(&mut handle, (&r as *const ResourceDesc).cast()) },
        "cuSurfObjectCreate",
    )?;
    Ok((handle, Object { handle, surface: true, _array: Some(array.clone()) }))
}
