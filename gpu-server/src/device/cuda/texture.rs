//! CUDA arrays, copies that touch them and texture and surface objects on
//! the device's driver. The structures go to the driver in `cuda.h`'s
//! layout with plain integers for its enumerations
//! (`gpupool_proto::texture_abi`); the session checked every shape, offset
//! and address first.

use super::driver::{self, warn_on_error};
use super::pinned::{BOUNCE_BYTES, Bounce};
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

/// One piece of a copy between the host and the device: `slices` slices
/// from slice `z`, or (`slices` 1) `rows` rows from row `row` of slice `z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    z: u64,
    row: u64,
    rows: u64,
    slices: u64,
}

/// `extent` in pieces of at most `cap` packed bytes, in packed order: whole
/// slices where one fits, else rows; `None` when a row does not fit.
fn pieces(extent: Extent, cap: u64) -> Option<impl Iterator<Item = Piece>> {
    let Extent { width, height, depth } = extent;
    if width > cap {
        return None;
    }
    let slice = width * height;
    let (slices, rows) = if slice <= cap { ((cap / slice).min(depth), height) } else { (1, cap / width) };
    let row_steps = height.div_ceil(rows);
    let slice_steps = depth.div_ceil(slices);
    Some((0..slice_steps).flat_map(move |zs| {
        let z = zs * slices;
        (0..row_steps).map(move |rs| {
            let row = rs * rows;
            Piece { z, row, rows: rows.min(height - row), slices: slices.min(depth - z) }
        })
    }))
}

/// A copy of `piece` of `extent` between `place` and packed host bytes at
/// `host` (its side given by `to_host`; the driver only reads `host` when
/// it is the source).
fn piece_copy(place: &Place<Array>, extent: Extent, piece: Piece, host: *mut u8, to_host: bool) -> Memcpy3d {
    let mut c = extent_of(Extent { width: extent.width, height: piece.rows, depth: piece.slices });
    set_place(&mut c, place, to_host);
    let (z, row) = (piece.z as usize, piece.row as usize);
    let shift = |kind: u32, device: &mut u64, y: &mut usize, zz: &mut usize, pitch: usize, height: usize| {
        if kind == MEMORY_DEVICE {
            *device += ((z * height + row) * pitch) as u64;
        } else {
            (*y, *zz) = (*y + row, *zz + z);
        }
    };
    let (w, rows) = (extent.width as usize, piece.rows as usize);
    if to_host {
        shift(c.src_type, &mut c.src_device, &mut c.src_y, &mut c.src_z, c.src_pitch, c.src_height);
        (c.dst_type, c.dst_host, c.dst_pitch, c.dst_height) = (MEMORY_HOST, host.cast(), w, rows);
    } else {
        shift(c.dst_type, &mut c.dst_device, &mut c.dst_y, &mut c.dst_z, c.dst_pitch, c.dst_height);
        (c.src_type, c.src_host, c.src_pitch, c.src_height) = (MEMORY_HOST, host.cast_const().cast(), w, rows);
    }
    c
}

/// The host end of a copy between the host and the device.
enum HostBytes<'a> {
    From(&'a [u8]),
    Into(&'a mut [u8]),
}

/// A copy between packed host bytes and an array or pitched device memory,
/// through the session's pinned `bounce` in pieces: from and to pageable
/// memory the driver may copy a pitched copy row by row, and natively a
/// column of 786 000 4-byte rows, 16 KiB apart, takes ~9 ms into pageable
/// memory and ~1 ms into pinned (H100, `bench/probes/pitched_copy.c`).
/// A copy whose rows are each larger than the bounce goes directly.
fn host_copy(
    stream: Option<&Stream>,
    place: Place<Array>,
    mut host: HostBytes<'_>,
    extent: Extent,
    bounce: &mut Bounce,
) -> DeviceResult<()> {
    let (to_host, len) = match &host {
        HostBytes::From(d) => (false, d.len()),
        HostBytes::Into(o) => (true, o.len()),
    };
    let Some(pieces) = pieces(extent, BOUNCE_BYTES as u64) else {
        let ptr = match &mut host {
            HostBytes::From(d) => d.as_ptr().cast_mut(),
            HostBytes::Into(o) => o.as_mut_ptr(),
        };
        let whole = Piece { z: 0, row: 0, rows: extent.height, slices: extent.depth };
        return run(&piece_copy(&place, extent, whole, ptr, to_host), stream, true);
    };
    let buf = bounce.get(len.min(BOUNCE_BYTES))?;
    let mut at = 0;
    for piece in pieces {
        let n = (extent.width * piece.rows * piece.slices) as usize;
        if let HostBytes::From(d) = &host {
            buf[..n].copy_from_slice(&d[at..at + n]);
        }
        run(&piece_copy(&place, extent, piece, buf.as_mut_ptr(), to_host), stream, true)?;
        if let HostBytes::Into(o) = &mut host {
            o[at..at + n].copy_from_slice(&buf[..n]);
        }
        at += n;
    }
    Ok(())
}

/// Host bytes to an array or pitched device memory ([`host_copy`]).
pub(super) fn array_write(
    stream: Option<&Stream>,
    dst: Place<Array>,
    data: &[u8],
    extent: Extent,
    bounce: &mut Bounce,
) -> DeviceResult<()> {
    host_copy(stream, dst, HostBytes::From(data), extent, bounce)
}

/// An array or pitched device memory to host bytes ([`host_copy`]).
pub(super) fn array_read(
    stream: Option<&Stream>,
    src: Place<Array>,
    out: &mut [u8],
    extent: Extent,
    bounce: &mut Bounce,
) -> DeviceResult<()> {
    host_copy(stream, src, HostBytes::Into(out), extent, bounce)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every packed byte once, in order, in pieces of at most `cap`.
    fn covered(extent: Extent, cap: u64) -> Option<Vec<Piece>> {
        let all: Vec<Piece> = pieces(extent, cap)?.collect();
        let mut at = 0;
        for p in &all {
            assert!(extent.width * p.rows * p.slices <= cap, "{p:?} is larger than {cap}");
            assert_eq!((p.z * extent.height + p.row) * extent.width, at, "{p:?} is not where the last ended");
            assert!(p.slices == 1 || (p.row == 0 && p.rows == extent.height), "{p:?}: slices must be whole");
            at += extent.width * p.rows * p.slices;
        }
        assert_eq!(Some(at), extent.bytes());
        Some(all)
    }

    #[test]
    fn copies_go_in_pieces_that_cover_the_extent_in_packed_order() {
        // A column of a large buffer: rows in pieces of the cap.
        let column = covered(Extent { width: 4, height: 786_000, depth: 1 }, 1 << 20).unwrap();
        assert_eq!(column.len(), 3);
        // Small slices: several whole slices a piece.
        let slices = covered(Extent { width: 64, height: 8, depth: 100 }, 4096).unwrap();
        assert_eq!(slices.len(), 13);
        // Slices larger than the cap: rows of each slice.
        assert_eq!(covered(Extent { width: 100, height: 50, depth: 3 }, 1000).unwrap().len(), 15);
        // One piece when it all fits; none when a row does not.
        assert_eq!(covered(Extent { width: 3, height: 5, depth: 7 }, 1 << 20).unwrap().len(), 1);
        assert!(covered(Extent { width: 2000, height: 2, depth: 1 }, 1000).is_none());
    }
}
