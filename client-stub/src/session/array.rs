//! CUDA arrays, the copies that touch them, and texture and surface
//! objects on a [`Session`]. Arrays live only on the server: the session
//! names them by ids chosen here. Creations wait for the server's answer
//! (a refused shape or an exhausted quota fails the call that asked, as
//! with the driver); destructions and copies from the host are queued.

use super::{HostBytes, Session, StreamId};
use crate::error::{ClientError, Result};
use gpupool_proto::texture_abi::ArrayDesc;
use gpupool_proto::v1::{self, array_copy::Source, call::Op, call_result::Value, copy_place::Place};

/// One end of an array copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrayEnd {
    /// An array of this session: `x` in bytes, `y` in rows, `z` in slices.
    Array { id: u32, x: u64, y: u64, z: u64 },
    /// Device memory: rows `pitch` bytes apart, slices `pitch * height`.
    Device { addr: u64, pitch: u64, height: u64 },
    /// Packed host bytes: the `data` or `out` of [`Session::array_copy`].
    Host,
}

fn place(end: ArrayEnd) -> Option<v1::CopyPlace> {
    let place = match end {
        ArrayEnd::Array { id, x, y, z } => Place::Array(v1::ArrayPlace { array: id, x, y, z }),
        ArrayEnd::Device { addr, pitch, height } => Place::Device(v1::DevicePlace { addr, pitch, height }),
        ArrayEnd::Host => Place::Host(v1::HostPlace {}),
    };
    Some(v1::CopyPlace { place: Some(place) })
}

/// Whether a copy's destination is the host (it then answers bytes).
pub(super) fn to_host(c: &v1::ArrayCopy) -> bool {
    matches!(c.dst, Some(v1::CopyPlace { place: Some(Place::Host(_)) }))
}

/// The host side of an array copy.
#[derive(Debug)]
pub enum HostSide<'a> {
    None,
    /// Packed source bytes.
    From(&'a [u8]),
    /// Where the packed bytes go.
    Into(&'a mut [u8]),
}

impl Session {
    fn object_of(value: Option<Value>, what: &str) -> Result<u64> {
        match value {
            Some(Value::Object(h)) => Ok(h),
            other => Err(ClientError::Protocol(format!("unexpected {what} result {other:?}"))),
        }
    }

    /// `cuArray3DCreate` (`levels` 0) or `cuMipmappedArrayCreate`; returns
    /// the array's id once the server made it.
    pub fn array_create(&self, shape: ArrayDesc, levels: u32) -> Result<u32> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let id = st.next_array;
        st.next_array = st.next_array.checked_add(1).ok_or(ClientError::OutOfMemory("array ids exhausted".into()))?;
        let ArrayDesc { width, height, depth, format, channels, flags } = shape;
        let op = Op::ArrayCreate(v1::ArrayCreate { array: id, width, height, depth, format, channels, flags, levels });
        self.call(&mut st, op)?;
        Ok(id)
    }

    /// `cuMipmappedArrayGetLevel`: the level under a new id.
    pub fn array_level(&self, mipmapped: u32, level: u32) -> Result<u32> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let id = st.next_array;
        st.next_array = st.next_array.checked_add(1).ok_or(ClientError::OutOfMemory("array ids exhausted".into()))?;
        self.call(&mut st, Op::ArrayLevel(v1::ArrayLevel { array: id, mipmapped, level }))?;
        Ok(id)
    }

    /// `cuArrayDestroy` / `cuMipmappedArrayDestroy`, queued.
    pub fn array_destroy(&self, id: u32) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, Op::ArrayDestroy(v1::ArrayDestroy { array: id }))
    }

    /// A copy of `width` bytes x `height` rows x `depth` slices with an
    /// array at one end at least. From the host it is queued (the bytes are
    /// taken now); into the host it waits for the bytes.
    pub fn array_copy(
        &self,
        dst: ArrayEnd,
        src: ArrayEnd,
        (width, height, depth): (u64, u64, u64),
        host: HostSide<'_>,
        stream: StreamId,
    ) -> Result<()> {
        let packed = width.checked_mul(height).and_then(|n| n.checked_mul(depth));
        let packed = packed.ok_or_else(|| ClientError::InvalidValue("the copy's extent overflows".into()))?;
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let mut copy =
            v1::ArrayCopy { stream: stream.0, dst: place(dst), src: place(src), width, height, depth, source: None };
        let bad = || ClientError::InvalidValue("an array copy's host end and bytes do not match".into());
        match (dst, src, host) {
            (ArrayEnd::Host, _, HostSide::Into(out)) => {
                if out.len() as u64 != packed {
                    return Err(bad());
                }
                let value = self.call(&mut st, Op::ArrayCopy(copy))?;
                self.take_bytes(&mut st, value, out)
            }
            (_, ArrayEnd::Host, HostSide::From(data)) => {
                if data.len() as u64 != packed {
                    return Err(bad());
                }
                let staged = match self.host_bytes(&mut st, data)? {
                    HostBytes::Inline(p) => {
                        copy.source = Some(Source::Inline(p));
                        false
                    }
                    HostBytes::Staged(s) => {
                        copy.source = Some(Source::Staged(s));
                        true
                    }
                };
                self.enqueue(&mut st, Op::ArrayCopy(copy))?;
                // Staged bytes wait in server memory until the copy runs.
                if staged { self.flush_locked(&mut st) } else { Ok(()) }
            }
            (ArrayEnd::Host, _, _) | (_, ArrayEnd::Host, _) => Err(bad()),
            (_, _, HostSide::None) => self.enqueue(&mut st, Op::ArrayCopy(copy)),
            _ => Err(bad()),
        }
    }

    /// `cuTexObjectCreate`: the driver's handle, which kernels take.
    pub fn tex_object_create(&self, request: v1::TexObjectCreate) -> Result<u64> {
        let mut st = self.lock();
        let value = self.call(&mut st, Op::TexObjectCreate(request))?;
        Self::object_of(value, "texture object")
    }

    /// `cuTexObjectDestroy`, queued.
    pub fn tex_object_destroy(&self, object: u64) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, Op::TexObjectDestroy(v1::TexObjectDestroy { object }))
    }

    /// `cuSurfObjectCreate` on an array.
    pub fn surf_object_create(&self, array: u32) -> Result<u64> {
        let mut st = self.lock();
        let value = self.call(&mut st, Op::SurfObjectCreate(v1::SurfObjectCreate { array }))?;
        Self::object_of(value, "surface object")
    }

    /// `cuSurfObjectDestroy`, queued.
    pub fn surf_object_destroy(&self, object: u64) -> Result<()> {
        let mut st = self.lock();
        self.enqueue(&mut st, Op::SurfObjectDestroy(v1::SurfObjectDestroy { object }))
    }
}
