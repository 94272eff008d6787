//! CUDA arrays (`ArrayCreate`, `ArrayLevel`, `ArrayDestroy`), the copies
//! that touch them (`ArrayCopy`) and texture and surface objects.
//!
//! Checked here before the backend sees anything: array ids against this
//! session's table, every copy's extent against the array it touches and
//! against the session's device memory, every resource's memory against
//! the session's mappings, and the bytes arrays take against the session's
//! memory quota (they count as mapped memory). Objects are the session's:
//! destroying one it did not create is an invalid handle.

use super::{CallOutcome, SessionState, stream_of};
use crate::device::texture::{ArrayDesc, Extent, MAX_LEVELS, Place, Resource, TextureDesc, ViewDesc, channel_bytes};
use crate::device::{ACCESS_READ, ACCESS_READWRITE, BackendSession};
use crate::error::CallError;
use bytes::Bytes;
use gpupool_proto::payload;
use gpupool_proto::v1::{self, array_copy::Source, call_result::Value, copy_place::Place as WirePlace};

/// One array of the session.
pub(super) struct ArrayEntry<A> {
    pub(super) desc: ArrayDesc,
    /// Levels of a mipmapped array; 0 for a plain array or a level.
    levels: u32,
    /// The mipmapped array a level belongs to.
    parent: Option<u32>,
    /// Bytes charged to the quota (0 for a level: its parent holds them).
    bytes: u64,
    pub(super) array: A,
}

/// Texture or surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ObjectKind {
    Texture,
    Surface,
}

fn unknown_array(id: u32) -> CallError {
    CallError::invalid_handle(format!("unknown array {id}"))
}

/// A resolved copy end: device side, or the packed host bytes.
enum End {
    Array { id: u32, x: u64, y: u64, z: u64 },
    Device { addr: u64, pitch: u64, height: u64 },
    Host,
}

fn end_of(place: Option<v1::CopyPlace>) -> Result<End, CallError> {
    match place.and_then(|p| p.place) {
        Some(WirePlace::Array(a)) => Ok(End::Array { id: a.array, x: a.x, y: a.y, z: a.z }),
        Some(WirePlace::Device(d)) => Ok(End::Device { addr: d.addr, pitch: d.pitch, height: d.height }),
        Some(WirePlace::Host(_)) => Ok(End::Host),
        None => Err(CallError::invalid_value("array copy without one of its ends")),
    }
}

/// Bytes from a device end's first byte to one past its last for
/// `extent`: rows `pitch` apart, slices `pitch * height` apart.
fn device_span(pitch: u64, height: u64, extent: Extent) -> Result<u64, CallError> {
    let overflow = || CallError::invalid_value("the copy's extent overflows");
    if (extent.height > 1 || extent.depth > 1) && pitch < extent.width {
        return Err(CallError::invalid_value(format!("pitch {pitch} is less than the width {}", extent.width)));
    }
    if extent.depth > 1 && height < extent.height {
        return Err(CallError::invalid_value(format!(
            "slice height {height} is less than the copy's {}",
            extent.height
        )));
    }
    let slice = pitch.checked_mul(height).ok_or_else(overflow)?;
    let rows = (extent.height - 1).checked_mul(pitch).ok_or_else(overflow)?;
    let slices = (extent.depth - 1).checked_mul(slice).ok_or_else(overflow)?;
    rows.checked_add(slices).and_then(|s| s.checked_add(extent.width)).ok_or_else(overflow)
}

/// A resource's format and channels, checked.
fn element(format: u32, channels: u32) -> Result<u64, CallError> {
    let bytes = channel_bytes(format)
        .ok_or_else(|| CallError::not_supported(format!("texture format {format:#x} is not offered")))?;
    if !matches!(channels, 1 | 2 | 4) {
        return Err(CallError::invalid_value(format!("{channels} channels (1, 2 or 4)")));
    }
    Ok(bytes * u64::from(channels))
}

fn texture_desc(t: Option<v1::TextureDesc>) -> Result<TextureDesc, CallError> {
    let t = t.ok_or_else(|| CallError::invalid_value("texture object without a texture description"))?;
    TextureDesc::try_from(&t).map_err(|e| CallError::invalid_value(format!("texture: {e}")))
}

impl<S: BackendSession> SessionState<S> {
    fn array(&self, id: u32) -> Result<&ArrayEntry<S::Array>, CallError> {
        self.arrays.get(&id).ok_or_else(|| unknown_array(id))
    }

    fn new_array_id(&self, id: u32) -> Result<(), CallError> {
        super::new_id(&self.arrays, id, "array", self.limits.max_handles)
    }

    pub(super) fn array_create(&mut self, c: v1::ArrayCreate) -> CallOutcome {
        self.new_array_id(c.array)?;
        let desc = ArrayDesc {
            width: c.width,
            height: c.height,
            depth: c.depth,
            format: c.format,
            channels: c.channels,
            flags: c.flags,
        }
        .checked()?;
        if c.levels > MAX_LEVELS.min(desc.max_levels()) {
            return Err(CallError::invalid_value(format!(
                "{} levels for a {}x{}x{} array (at most {})",
                c.levels,
                c.width,
                c.height,
                c.depth,
                desc.max_levels()
            )));
        }
        let bytes = desc.bytes_with_levels(c.levels).ok_or_else(|| CallError::invalid_value("array size overflows"))?;
        self.charge(bytes, "an array")?;
        let array = self.on_device(bytes, |dev| dev.array_create(&desc, c.levels))?;
        self.mapped_bytes += bytes;
        self.arrays.insert(c.array, ArrayEntry { desc, levels: c.levels, parent: None, bytes, array });
        Ok(None)
    }

    pub(super) fn array_level(&mut self, l: v1::ArrayLevel) -> CallOutcome {
        self.new_array_id(l.array)?;
        let parent = self.array(l.mipmapped)?;
        if parent.levels == 0 {
            return Err(CallError::invalid_handle(format!("array {} is not a mipmapped array", l.mipmapped)));
        }
        if l.level >= parent.levels {
            return Err(CallError::invalid_value(format!(
                "level {} of a mipmapped array of {} levels",
                l.level, parent.levels
            )));
        }
        let desc = parent.desc.level(l.level);
        let parent = parent.array.clone();
        let array = self.dev.array_level(&parent, l.level)?;
        self.arrays.insert(l.array, ArrayEntry { desc, levels: 0, parent: Some(l.mipmapped), bytes: 0, array });
        Ok(None)
    }

    pub(super) fn array_destroy(&mut self, id: u32) -> CallOutcome {
        let entry = self.array(id)?;
        if entry.parent.is_some() {
            return Err(CallError::invalid_handle(format!("array {id} is a level of a mipmapped array")));
        }
        // Work still queued may read it (objects made from it hold it).
        self.dev.synchronize()?;
        let entry = self.arrays.remove(&id).ok_or_else(|| unknown_array(id))?;
        self.arrays.retain(|_, a| a.parent != Some(id));
        self.uncharge(entry.bytes);
        Ok(None)
    }

    /// A device-side end of a copy, checked against `extent`.
    fn place(&self, end: &End, extent: Extent, need: u32) -> Result<Place<S::Array>, CallError> {
        match *end {
            End::Array { id, x, y, z } => {
                let a = self.array(id)?;
                if a.levels != 0 {
                    return Err(CallError::invalid_value(format!(
                        "array {id} is mipmapped: copy to one of its levels"
                    )));
                }
                let fits = |offset: u64, len: u64, size: u64| offset.checked_add(len).is_some_and(|end| end <= size);
                let d = &a.desc;
                if !x.is_multiple_of(d.element_bytes()) || !extent.width.is_multiple_of(d.element_bytes()) {
                    return Err(CallError::invalid_value(format!(
                        "array copy offset {x} or width {} is not a multiple of the element size {}",
                        extent.width,
                        d.element_bytes()
                    )));
                }
                if !fits(x, extent.width, d.row_bytes())
                    || !fits(y, extent.height, d.rows())
                    || !fits(z, extent.depth, d.slices())
                {
                    return Err(CallError::invalid_value(format!(
                        "copy of {}x{}x{} at ({x}, {y}, {z}) does not fit array {id} ({} bytes x {} x {})",
                        extent.width,
                        extent.height,
                        extent.depth,
                        d.row_bytes(),
                        d.rows(),
                        d.slices()
                    )));
                }
                Ok(Place::Array { array: a.array.clone(), x, y, z })
            }
            End::Device { addr, pitch, height } => {
                let pitch = if extent.height == 1 && extent.depth == 1 { pitch.max(extent.width) } else { pitch };
                let height = if extent.depth == 1 { height.max(extent.height) } else { height };
                self.check_range(addr, device_span(pitch, height, extent)?, need)?;
                Ok(Place::Device { addr, pitch, height })
            }
            End::Host => Err(CallError::invalid_value("a host end here")),
        }
    }

    pub(super) fn array_copy(&mut self, c: v1::ArrayCopy) -> CallOutcome {
        let extent = Extent { width: c.width, height: c.height, depth: c.depth };
        if extent.width == 0 || extent.height == 0 || extent.depth == 0 {
            return Err(CallError::invalid_value("an array copy needs a width, a height and a depth of at least 1"));
        }
        let packed = extent.bytes().ok_or_else(|| CallError::invalid_value("the copy's extent overflows"))?;
        let (dst, src) = (end_of(c.dst)?, end_of(c.src)?);
        // Without an array: pitched device memory and packed host bytes,
        // one call for rows that would otherwise each be a copy of their own.
        let pitched = matches!((&dst, &src), (End::Host, End::Device { .. }) | (End::Device { .. }, End::Host));
        if !matches!(dst, End::Array { .. }) && !matches!(src, End::Array { .. }) && !pitched {
            return Err(CallError::invalid_value("an array copy with no array end"));
        }
        let stream = stream_of(&self.streams, c.stream)?;
        match (&dst, &src) {
            (End::Host, End::Host) => Err(CallError::invalid_value("an array copy with no array end")),
            (_, End::Host) => {
                let data: Bytes = match c.source {
                    Some(Source::Inline(p)) => payload::decode(p, self.limits.max_inline_bytes.min(packed))
                        .map_err(|e| CallError::invalid_value(e.to_string()))?,
                    Some(Source::Staged(s)) if s.size == packed => self.staging.take_upload(s.transfer_id, s.size)?,
                    Some(Source::Staged(s)) => {
                        return Err(CallError::invalid_value(format!(
                            "{} staged bytes for a copy of {packed}",
                            s.size
                        )));
                    }
                    None => return Err(CallError::invalid_value("a copy from the host without its bytes")),
                };
                if data.len() as u64 != packed {
                    return Err(CallError::invalid_value(format!("{} bytes for a copy of {packed}", data.len())));
                }
                let dst = self.place(&dst, extent, ACCESS_READWRITE)?;
                self.dev.array_write(stream, dst, &data, extent)?;
                Ok(None)
            }
            (End::Host, _) => {
                let inline = packed <= self.limits.max_inline_bytes;
                // Reserved before the bytes are read (the session's bounds
                // and the host's cap).
                let staging = self.staging.clone();
                let room = if inline { None } else { Some(staging.room(packed)?) };
                let src = self.place(&src, extent, ACCESS_READ)?;
                let mut out = Vec::new();
                out.try_reserve_exact(packed as usize)
                    .map_err(|_| CallError::out_of_memory("cannot allocate the copy's host buffer"))?;
                out.resize(packed as usize, 0);
                self.dev.array_read(stream, src, &mut out, extent)?;
                let out = Bytes::from(out);
                match room {
                    None => Ok(Some(Value::Data(payload::encode(out, self.limits.compression)))),
                    Some(room) => {
                        let id = staging.add_download_bytes(room, out);
                        Ok(Some(Value::Staged(v1::StagedRef { transfer_id: id, size: packed })))
                    }
                }
            }
            _ => {
                if c.source.is_some() {
                    return Err(CallError::invalid_value("host bytes for a copy without a host end"));
                }
                let dst = self.place(&dst, extent, ACCESS_READWRITE)?;
                let src = self.place(&src, extent, ACCESS_READ)?;
                self.dev.array_copy(stream, dst, src, extent)?;
                Ok(None)
            }
        }
    }

    fn new_object(&mut self, kind: ObjectKind, handle: u64, object: S::Object) -> CallOutcome {
        if self.objects.len() >= self.limits.max_handles {
            return Err(CallError::out_of_memory(format!(
                "this session already holds {} texture and surface objects",
                self.objects.len()
            )));
        }
        self.objects.insert(handle, (kind, object));
        Ok(Some(Value::Object(handle)))
    }

    pub(super) fn tex_object_create(&mut self, t: v1::TexObjectCreate) -> CallOutcome {
        let desc = texture_desc(t.texture)?;
        let view = t.view.as_ref().map(ViewDesc::from);
        let r = t.resource.ok_or_else(|| CallError::invalid_value("texture object without a resource"))?;
        if r.flags != 0 {
            return Err(CallError::invalid_value(format!("resource flags {:#x} (must be 0)", r.flags)));
        }
        use v1::texture_resource::Kind;
        let resource = match r.kind {
            Some(Kind::Array(id)) => {
                let a = self.array(id)?;
                if a.levels != 0 {
                    return Err(CallError::invalid_value(format!("array {id} is mipmapped: bind it as one")));
                }
                Resource::Array(a.array.clone())
            }
            Some(Kind::Mipmapped(id)) => {
                let a = self.array(id)?;
                if a.levels == 0 {
                    return Err(CallError::invalid_handle(format!("array {id} is not a mipmapped array")));
                }
                Resource::Mipmapped(a.array.clone())
            }
            Some(Kind::Linear(l)) => {
                element(l.format, l.channels)?;
                self.check_range(l.addr, l.size, ACCESS_READ)?;
                Resource::Linear { addr: l.addr, format: l.format, channels: l.channels, size: l.size }
            }
            Some(Kind::Pitch2d(p)) => {
                let row = p.width.checked_mul(element(p.format, p.channels)?);
                let extent = Extent { width: row.unwrap_or(u64::MAX), height: p.height.max(1), depth: 1 };
                self.check_range(p.addr, device_span(p.pitch, p.height, extent)?, ACCESS_READ)?;
                Resource::Pitch2d {
                    addr: p.addr,
                    format: p.format,
                    channels: p.channels,
                    width: p.width,
                    height: p.height,
                    pitch: p.pitch,
                }
            }
            None => return Err(CallError::invalid_value("texture object without a resource")),
        };
        let (handle, object) = self.dev.texture_create(resource, &desc, view.as_ref())?;
        self.new_object(ObjectKind::Texture, handle, object)
    }

    pub(super) fn surf_object_create(&mut self, s: v1::SurfObjectCreate) -> CallOutcome {
        let a = self.array(s.array)?;
        if a.levels != 0 {
            return Err(CallError::invalid_value(format!("array {} is mipmapped: take a level", s.array)));
        }
        let array = a.array.clone();
        let (handle, object) = self.dev.surface_create(&array)?;
        self.new_object(ObjectKind::Surface, handle, object)
    }

    pub(super) fn object_destroy(&mut self, kind: ObjectKind, handle: u64) -> CallOutcome {
        match self.objects.get(&handle) {
            Some((k, _)) if *k == kind => {
                // Kernels still queued may read it.
                self.dev.synchronize()?;
                self.objects.remove(&handle);
                Ok(None)
            }
            _ => Err(CallError::invalid_handle(format!("unknown {kind:?} object {handle:#x}").to_lowercase())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::tests::{code, session};
    use gpupool_proto::cuda;
    use gpupool_proto::v1::call::Op;

    fn create(id: u32, width: u64, height: u64, depth: u64, levels: u32) -> Op {
        Op::ArrayCreate(v1::ArrayCreate {
            array: id,
            width,
            height,
            depth,
            format: 0x20,
            channels: 1,
            flags: 0,
            levels,
        })
    }

    fn array_place(array: u32, x: u64, y: u64, z: u64) -> Option<v1::CopyPlace> {
        Some(v1::CopyPlace { place: Some(WirePlace::Array(v1::ArrayPlace { array, x, y, z })) })
    }

    fn host() -> Option<v1::CopyPlace> {
        Some(v1::CopyPlace { place: Some(WirePlace::Host(v1::HostPlace {})) })
    }

    fn device(addr: u64, pitch: u64, height: u64) -> Option<v1::CopyPlace> {
        Some(v1::CopyPlace { place: Some(WirePlace::Device(v1::DevicePlace { addr, pitch, height })) })
    }

    fn upload(array: u32, x: u64, y: u64, width: u64, height: u64, data: Vec<u8>) -> Op {
        Op::ArrayCopy(v1::ArrayCopy {
            dst: array_place(array, x, y, 0),
            src: host(),
            width,
            height,
            depth: 1,
            source: Some(Source::Inline(payload::encode(data.into(), payload::Compression::Off))),
            ..Default::default()
        })
    }

    fn download(array: u32, x: u64, y: u64, width: u64, height: u64) -> Op {
        Op::ArrayCopy(v1::ArrayCopy {
            dst: host(),
            src: array_place(array, x, y, 0),
            width,
            height,
            depth: 1,
            ..Default::default()
        })
    }

    fn bytes_of(outcome: CallOutcome) -> Vec<u8> {
        match outcome {
            Ok(Some(Value::Data(p))) => payload::decode(p, 1 << 20).unwrap().to_vec(),
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[test]
    fn arrays_take_bytes_in_and_give_them_back() {
        let mut s = session();
        assert_eq!(code(s.execute(create(1, 8, 4, 0, 0))), 0);
        assert_eq!(s.mapped_bytes(), 8 * 4 * 4, "arrays count against the quota");
        let data: Vec<u8> = (0..128).collect();
        assert_eq!(code(s.execute(upload(1, 0, 0, 32, 4, data.clone()))), 0);
        assert_eq!(bytes_of(s.execute(download(1, 0, 0, 32, 4))), data);
        // A sub-rectangle: columns 2..4 (bytes 8..16) of rows 1..3.
        let inner = bytes_of(s.execute(download(1, 8, 1, 8, 2)));
        let expected: Vec<u8> = [(40..48), (72..80)].into_iter().flatten().collect();
        assert_eq!(inner, expected);
        assert_eq!(code(s.execute(Op::ArrayDestroy(v1::ArrayDestroy { array: 1 }))), 0);
        assert_eq!(s.mapped_bytes(), 0);
        assert_eq!(code(s.execute(download(1, 0, 0, 4, 1))), cuda::INVALID_HANDLE, "destroyed");
    }

    #[test]
    fn copies_stay_inside_arrays_and_the_session() {
        let mut s = session();
        assert_eq!(code(s.execute(create(1, 8, 4, 0, 0))), 0);
        assert_eq!(code(s.execute(download(1, 4, 0, 32, 1))), cuda::INVALID_VALUE, "past the row");
        assert_eq!(code(s.execute(download(1, 0, 3, 4, 2))), cuda::INVALID_VALUE, "past the last row");
        assert_eq!(code(s.execute(download(1, 2, 0, 4, 1))), cuda::INVALID_VALUE, "inside an element");
        assert_eq!(code(s.execute(download(1, u64::MAX - 3, 0, 4, 1))), cuda::INVALID_VALUE, "overflow");
        assert_eq!(code(s.execute(upload(1, 0, 0, 32, 1, vec![0; 31]))), cuda::INVALID_VALUE, "short");
        assert_eq!(code(s.execute(download(9, 0, 0, 4, 1))), cuda::INVALID_HANDLE, "unknown");
        // Device ends must be the session's memory.
        let base = s.va_base();
        assert_eq!(code(s.execute(Op::MemMap(v1::MemMap { addr: base, size: super::super::tests::GRANULARITY }))), 0);
        let to_device = |addr, pitch, height| {
            Op::ArrayCopy(v1::ArrayCopy {
                dst: device(addr, pitch, height),
                src: array_place(1, 0, 0, 0),
                width: 32,
                height: 4,
                depth: 1,
                ..Default::default()
            })
        };
        assert_eq!(code(s.execute(to_device(base, 64, 4))), 0);
        assert_eq!(code(s.execute(to_device(base - 4096, 64, 4))), cuda::INVALID_VALUE, "outside");
        assert_eq!(code(s.execute(to_device(base, 16, 4))), cuda::INVALID_VALUE, "pitch below the width");
        let end = base + super::super::tests::GRANULARITY - 100;
        assert_eq!(code(s.execute(to_device(end, 64, 4))), cuda::INVALID_VALUE, "runs off the mapping");
        // Through device memory and back.
        let data: Vec<u8> = (0..128).rev().collect();
        assert_eq!(code(s.execute(upload(1, 0, 0, 32, 4, data.clone()))), 0);
        assert_eq!(code(s.execute(to_device(base, 64, 4))), 0);
        assert_eq!(code(s.execute(create(2, 8, 4, 0, 0))), 0);
        let back = Op::ArrayCopy(v1::ArrayCopy {
            dst: array_place(2, 0, 0, 0),
            src: device(base, 64, 4),
            width: 32,
            height: 4,
            depth: 1,
            ..Default::default()
        });
        assert_eq!(code(s.execute(back)), 0);
        assert_eq!(bytes_of(s.execute(download(2, 0, 0, 32, 4))), data);
    }

    #[test]
    fn the_quota_counts_arrays() {
        let mut s = session();
        let quota = super::super::tests::limits().memory_quota;
        // One float per element: a square array just over the quota.
        let side = ((quota / 4) as f64).sqrt() as u64 + 2;
        assert_eq!(code(s.execute(create(1, side, side, 0, 0))), cuda::OUT_OF_MEMORY);
        assert_eq!(s.mapped_bytes(), 0);
        assert_eq!(code(s.execute(create(1, 64, 64, 0, 0))), 0);
        assert_eq!(code(s.execute(create(1, 64, 64, 0, 0))), cuda::INVALID_VALUE, "id in use");
    }

    #[test]
    fn mipmapped_levels_and_objects() {
        let mut s = session();
        assert_eq!(code(s.execute(create(1, 16, 16, 0, 5))), 0);
        let expected: u64 = [16u64, 8, 4, 2, 1].iter().map(|w| w * w * 4).sum();
        assert_eq!(s.mapped_bytes(), expected);
        assert_eq!(code(s.execute(create(2, 16, 16, 0, 6))), cuda::INVALID_VALUE, "too many levels");
        let level = |array, level| Op::ArrayLevel(v1::ArrayLevel { array, mipmapped: 1, level });
        assert_eq!(code(s.execute(level(3, 2))), 0);
        assert_eq!(code(s.execute(level(4, 5))), cuda::INVALID_VALUE);
        assert_eq!(code(s.execute(upload(3, 0, 0, 16, 4, vec![7; 64]))), 0);
        assert_eq!(bytes_of(s.execute(download(3, 0, 0, 16, 4))), vec![7; 64]);
        assert_eq!(code(s.execute(Op::ArrayDestroy(v1::ArrayDestroy { array: 3 }))), cuda::INVALID_HANDLE);
        let texture = |kind| {
            Op::TexObjectCreate(v1::TexObjectCreate {
                resource: Some(v1::TextureResource { kind: Some(kind), flags: 0 }),
                texture: Some(v1::TextureDesc {
                    address_mode: vec![0; 3],
                    border_color: vec![0.0; 4],
                    ..Default::default()
                }),
                view: None,
            })
        };
        use v1::texture_resource::Kind;
        let handle = match s.execute(texture(Kind::Mipmapped(1))) {
            Ok(Some(Value::Object(h))) => h,
            other => panic!("expected an object, got {other:?}"),
        };
        assert_eq!(code(s.execute(texture(Kind::Array(1)))), cuda::INVALID_VALUE, "mipmapped as plain");
        assert_eq!(code(s.execute(texture(Kind::Array(3)))), 0, "a level as plain");
        let bad_linear = v1::LinearResource { addr: s.va_base(), format: 0x20, channels: 1, size: 64 };
        assert_eq!(code(s.execute(texture(Kind::Linear(bad_linear)))), cuda::INVALID_VALUE, "unmapped");
        let surface = Op::SurfObjectDestroy(v1::SurfObjectDestroy { object: handle });
        assert_eq!(code(s.execute(surface)), cuda::INVALID_HANDLE, "a texture, not a surface");
        let destroy = Op::TexObjectDestroy(v1::TexObjectDestroy { object: handle });
        assert_eq!(code(s.execute(destroy.clone())), 0);
        assert_eq!(code(s.execute(destroy)), cuda::INVALID_HANDLE, "destroyed");
        assert_eq!(code(s.execute(Op::ArrayDestroy(v1::ArrayDestroy { array: 1 }))), 0);
        assert_eq!(s.mapped_bytes(), 0);
        assert_eq!(code(s.execute(download(3, 0, 0, 4, 1))), cuda::INVALID_HANDLE, "levels go with it");
    }
}
