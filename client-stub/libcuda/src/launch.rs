//! Kernel launches. Arguments arrive as `void**` (or one packed buffer in
//! `extra`); the function's parameter layout, which came from the server
//! with the module, says how many bytes each points to.

use crate::abi::{CuError, CuResult};
use crate::capture::{self, Route};
use crate::graph::{Kernel, Op};
use crate::runtime::Runtime;
use cudarc::driver::sys::{CUfunction, CUlaunchConfig, CUstream};
use gpupool_client::LaunchConfig;
use gpupool_proto::v1;
use std::ffi::{c_uint, c_void};

/// `CU_LAUNCH_PARAM_*` keys of a launch's `extra` list.
pub(crate) const PARAM_END: usize = 0x00;
pub(crate) const PARAM_BUFFER_POINTER: usize = 0x01;
pub(crate) const PARAM_BUFFER_SIZE: usize = 0x02;

/// The parameter buffer for one launch.
///
/// # Safety
/// `params` is null or holds one valid pointer per parameter, each to that
/// parameter's bytes; `extra` is null or a CU_LAUNCH_PARAM_END-terminated
/// list (the CUDA launch contract).
pub(crate) unsafe fn pack(
    info: &v1::FunctionInfo,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult<Vec<u8>> {
    let size = info.params_size as usize;
    let mut buf = vec![0u8; size];
    if !params.is_null() {
        for (i, p) in info.params.iter().enumerate() {
            // SAFETY: one pointer per parameter (contract above).
            let src = unsafe { *params.add(i) };
            if src.is_null() {
                return Err(CuError::INVALID_VALUE);
            }
            let (off, len) = (p.offset as usize, p.size as usize);
            let dst = buf.get_mut(off..off + len).ok_or(CuError::INVALID_VALUE)?;
            // SAFETY: the argument has `len` readable bytes (contract above).
            dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) });
        }
        return Ok(buf);
    }
    if extra.is_null() {
        return if size == 0 { Ok(buf) } else { Err(CuError::INVALID_VALUE) };
    }
    let (mut pointer, mut length) = (std::ptr::null::<u8>(), None);
    let mut i = 0;
    loop {
        // SAFETY: the list is terminated by PARAM_END (contract above).
        let key = unsafe { *extra.add(i) } as usize;
        match key {
            PARAM_END => break,
            // SAFETY: each key is followed by its value.
            PARAM_BUFFER_POINTER => pointer = unsafe { *extra.add(i + 1) }.cast(),
            PARAM_BUFFER_SIZE => {
                // SAFETY: the value points to a size_t.
                let p = unsafe { *extra.add(i + 1) }.cast::<usize>();
                // SAFETY: non-null checked; a size_t per the contract.
                length = (!p.is_null()).then(|| unsafe { p.read_unaligned() });
            }
            _ => return Err(CuError::INVALID_VALUE),
        }
        i += 2;
    }
    let len = length.ok_or(CuError::INVALID_VALUE)?;
    if pointer.is_null() || len < size {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the buffer holds `len >= size` bytes (contract above).
    buf.copy_from_slice(unsafe { std::slice::from_raw_parts(pointer, size) });
    Ok(buf)
}

/// A launch of `f` with its parameters in `params` or `extra` (the
/// `cuLaunchKernel` contract).
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch(
    f: CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    stream: CUstream,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    attributes: Option<v1::LaunchAttributes>,
) -> CuResult {
    let rt = Runtime::with_context()?;
    let function = rt.function(f as usize)?;
    let route = capture::route(rt, stream)?;
    if [grid.0, grid.1, grid.2, block.0, block.1, block.2].contains(&0) {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: the CUDA launch contract on `params` and `extra`.
    let buf = unsafe { pack(&function.info, params, extra) }?;
    match route {
        Route::Send(s) => {
            let cfg = LaunchConfig { grid, block, shared_mem_bytes: shared };
            rt.session.launch_with(&function, cfg, attributes, s, buf).map_err(CuError::from)
        }
        Route::Capture(s) => {
            let k = Kernel {
                func: f as usize,
                given: [f as usize, 0],
                grid: [grid.0, grid.1, grid.2],
                block: [block.0, block.1, block.2],
                shared,
                params: buf,
                attributes: attributes.map(|a| prost::Message::encode_to_vec(&a)),
            };
            capture::add(s, Op::Kernel(k)).map(drop)
        }
    }
}

// CUlaunchAttributeID numbers (cudarc's sys, CUDA 13.0 headers).
const ATTR_IGNORE: u32 = 0;
const ATTR_ACCESS_POLICY_WINDOW: u32 = 1;
const ATTR_COOPERATIVE: u32 = 2;
const ATTR_SYNCHRONIZATION_POLICY: u32 = 3;
const ATTR_CLUSTER_DIMENSION: u32 = 4;
const ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE: u32 = 5;
const ATTR_PROGRAMMATIC_STREAM_SERIALIZATION: u32 = 6;
const ATTR_PROGRAMMATIC_EVENT: u32 = 7;
const ATTR_PRIORITY: u32 = 8;
const ATTR_MEM_SYNC_DOMAIN_MAP: u32 = 9;
const ATTR_MEM_SYNC_DOMAIN: u32 = 10;
const ATTR_PREFERRED_CLUSTER_DIMENSION: u32 = 11;
const ATTR_LAUNCH_COMPLETION_EVENT: u32 = 12;
/// A hint, like the function attribute of the same name.
const ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT: u32 = 14;

/// Bytes of a `CUlaunchAttributeValue` (a 64-byte union).
pub(crate) const VALUE_BYTES: usize = 64;

/// The attributes of a launch configuration as `(id, value bytes)`, read as
/// integers so that an unknown id is just a number.
///
/// # Safety
/// `c.attrs` holds `c.numAttrs` attributes (the CUDA contract).
unsafe fn attributes(c: &CUlaunchConfig) -> impl Iterator<Item = (u32, [u8; VALUE_BYTES])> + '_ {
    (0..c.numAttrs as usize).map(move |i| {
        // SAFETY: each attribute is an id (4 bytes), 4 bytes of padding and
        // a 64-byte value union.
        unsafe {
            let a = c.attrs.add(i).cast::<u8>();
            (a.cast::<u32>().read_unaligned(), a.add(8).cast::<[u8; VALUE_BYTES]>().read_unaligned())
        }
    })
}

fn word(v: &[u8; VALUE_BYTES], at: usize) -> u32 {
    u32::from_le_bytes([v[at], v[at + 1], v[at + 2], v[at + 3]])
}

fn dword(v: &[u8; VALUE_BYTES], at: usize) -> u64 {
    u64::from(word(v, at)) | (u64::from(word(v, at + 4)) << 32)
}

fn dims(v: &[u8; VALUE_BYTES]) -> Option<v1::Dim3> {
    Some(v1::Dim3 { x: word(v, 0), y: word(v, 4), z: word(v, 8) })
}

/// The launch attributes of a `cuLaunchKernelEx` configuration, with event
/// handles mapped to the session's event ids. An attribute gpupool cannot
/// carry is CUDA_ERROR_NOT_SUPPORTED (logged).
fn launch_attributes(
    list: impl Iterator<Item = (u32, [u8; VALUE_BYTES])>,
    event: impl Fn(usize) -> CuResult<u32>,
) -> CuResult<v1::LaunchAttributes> {
    let mut a = v1::LaunchAttributes::default();
    for (id, v) in list {
        apply_attribute(&mut a, id, &v, &event)?;
    }
    normalize(&mut a);
    Ok(a)
}

/// Cluster dimensions of all zero mean none, as the driver reads them.
fn normalize(a: &mut v1::LaunchAttributes) {
    let none = |d: &Option<v1::Dim3>| d.is_some_and(|d| d.x == 0 && d.y == 0 && d.z == 0);
    if none(&a.cluster) {
        a.cluster = None;
    }
    if none(&a.preferred_cluster) {
        a.preferred_cluster = None;
    }
}

/// Attributes a kernel node of a graph takes (`CUkernelNodeAttrID`): those
/// of a launch that describe the kernel, not the stream it runs on.
const NODE_ATTRIBUTES: [u32; 8] = [
    ATTR_ACCESS_POLICY_WINDOW,
    ATTR_COOPERATIVE,
    ATTR_CLUSTER_DIMENSION,
    ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE,
    ATTR_PRIORITY,
    ATTR_MEM_SYNC_DOMAIN_MAP,
    ATTR_MEM_SYNC_DOMAIN,
    ATTR_PREFERRED_CLUSTER_DIMENSION,
];

/// A kernel node's attributes with attribute `id` set to the value `v`
/// (`cuGraphKernelNodeSetAttribute`); `attributes` are the node's,
/// protobuf-encoded (none: the defaults).
pub(crate) fn set_node_attribute(attributes: Option<&[u8]>, id: u32, v: &[u8; VALUE_BYTES]) -> CuResult<Vec<u8>> {
    if !NODE_ATTRIBUTES.contains(&id) {
        tracing::debug!(attribute = id, "kernel node attribute not supported by gpupool");
        return Err(CuError::NOT_SUPPORTED);
    }
    let mut a = decode(attributes)?;
    apply_attribute(&mut a, id, v, &|_| Err(CuError::INVALID_VALUE))?;
    normalize(&mut a);
    Ok(prost::Message::encode_to_vec(&a))
}

/// The value of a kernel node's attribute `id`
/// (`cuGraphKernelNodeGetAttribute`): what was set, else the default.
pub(crate) fn node_attribute(attributes: Option<&[u8]>, id: u32) -> CuResult<[u8; VALUE_BYTES]> {
    if !NODE_ATTRIBUTES.contains(&id) {
        tracing::debug!(attribute = id, "kernel node attribute not supported by gpupool");
        return Err(CuError::NOT_SUPPORTED);
    }
    let a = decode(attributes)?;
    let mut v = [0u8; VALUE_BYTES];
    let mut put = |at: usize, word: u32| v[at..at + 4].copy_from_slice(&word.to_le_bytes());
    let dims = |d: &Option<v1::Dim3>| d.map_or([0; 3], |d| [d.x, d.y, d.z]);
    match id {
        ATTR_ACCESS_POLICY_WINDOW => {
            if let Some(w) = &a.access_policy_window {
                put(0, w.base as u32);
                put(4, (w.base >> 32) as u32);
                put(8, w.num_bytes as u32);
                put(12, (w.num_bytes >> 32) as u32);
                put(16, w.hit_ratio.to_bits());
                put(20, w.hit_prop);
                put(24, w.miss_prop);
            }
        }
        ATTR_COOPERATIVE => put(0, u32::from(a.cooperative)),
        ATTR_CLUSTER_DIMENSION | ATTR_PREFERRED_CLUSTER_DIMENSION => {
            let d = dims(if id == ATTR_CLUSTER_DIMENSION { &a.cluster } else { &a.preferred_cluster });
            for (i, x) in d.into_iter().enumerate() {
                put(4 * i, x);
            }
        }
        ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE => put(0, a.cluster_scheduling_policy),
        ATTR_PRIORITY => put(0, a.priority.unwrap_or(0) as u32),
        ATTR_MEM_SYNC_DOMAIN_MAP => {
            if let Some(m) = &a.mem_sync_domain_map {
                v[0] = m.default_domain as u8;
                v[1] = m.remote_domain as u8;
            }
        }
        _ => put(0, a.mem_sync_domain.unwrap_or(0)),
    }
    Ok(v)
}

fn decode(attributes: Option<&[u8]>) -> CuResult<v1::LaunchAttributes> {
    attributes.map_or(Ok(v1::LaunchAttributes::default()), |b| {
        <v1::LaunchAttributes as prost::Message>::decode(b).map_err(|_| CuError::INVALID_VALUE)
    })
}

/// Sets attribute `id` of `a` to the value `v`.
fn apply_attribute(
    a: &mut v1::LaunchAttributes,
    id: u32,
    v: &[u8; VALUE_BYTES],
    event: &impl Fn(usize) -> CuResult<u32>,
) -> CuResult {
    let v = *v;
    match id {
        ATTR_IGNORE | ATTR_PREFERRED_SHARED_MEMORY_CARVEOUT => {}
        ATTR_ACCESS_POLICY_WINDOW => {
            a.access_policy_window = Some(v1::AccessPolicyWindow {
                base: dword(&v, 0),
                num_bytes: dword(&v, 8),
                hit_ratio: f32::from_bits(word(&v, 16)),
                hit_prop: word(&v, 20),
                miss_prop: word(&v, 24),
            })
        }
        ATTR_COOPERATIVE => a.cooperative = word(&v, 0) != 0,
        ATTR_SYNCHRONIZATION_POLICY => a.synchronization_policy = Some(word(&v, 0)),
        ATTR_CLUSTER_DIMENSION => a.cluster = dims(&v),
        ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE => a.cluster_scheduling_policy = word(&v, 0),
        ATTR_PROGRAMMATIC_STREAM_SERIALIZATION => a.programmatic_serialization = word(&v, 0) != 0,
        ATTR_PROGRAMMATIC_EVENT => {
            a.programmatic_event = Some(v1::LaunchEvent {
                event: event(dword(&v, 0) as usize)?,
                flags: word(&v, 8) as i32,
                trigger_at_block_start: word(&v, 12) != 0,
            })
        }
        ATTR_PRIORITY => a.priority = Some(word(&v, 0) as i32),
        ATTR_MEM_SYNC_DOMAIN_MAP => {
            a.mem_sync_domain_map =
                Some(v1::MemSyncDomainMap { default_domain: u32::from(v[0]), remote_domain: u32::from(v[1]) })
        }
        ATTR_MEM_SYNC_DOMAIN => a.mem_sync_domain = Some(word(&v, 0)),
        ATTR_PREFERRED_CLUSTER_DIMENSION => a.preferred_cluster = dims(&v),
        ATTR_LAUNCH_COMPLETION_EVENT => {
            a.completion_event = Some(v1::LaunchEvent {
                event: event(dword(&v, 0) as usize)?,
                flags: word(&v, 8) as i32,
                trigger_at_block_start: false,
            })
        }
        other => {
            tracing::debug!(attribute = other, "launch attribute not supported by gpupool");
            return Err(CuError::NOT_SUPPORTED);
        }
    }
    Ok(())
}

/// The cluster shape a launch configuration asks for (attribute 4,
/// CLUSTER_DIMENSION), zero when none.
///
/// # Safety
/// `c.attrs` holds `c.numAttrs` attributes.
pub(crate) unsafe fn cluster_of(c: &CUlaunchConfig) -> [u32; 3] {
    // SAFETY: forwarded contract.
    unsafe { attributes(c) }
        .find(|(id, _)| *id == ATTR_CLUSTER_DIMENSION)
        .map_or([0; 3], |(_, v)| [word(&v, 0), word(&v, 4), word(&v, 8)])
}

fn launch_ex(
    config: *const CUlaunchConfig,
    f: CUfunction,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CuResult {
    // SAFETY: the CUDA contract: `config` points to a CUlaunchConfig.
    let c = unsafe { crate::abi::get(config) }?;
    if c.numAttrs > 0 && c.attrs.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let rt = Runtime::with_context()?;
    let event = |h: usize| rt.event(h).map(|e| e.0);
    // SAFETY: `attrs` holds `numAttrs` attributes (the CUDA contract).
    let attributes = launch_attributes(unsafe { attributes(&c) }, event)?;
    launch(
        f,
        (c.gridDimX, c.gridDimY, c.gridDimZ),
        (c.blockDimX, c.blockDimY, c.blockDimZ),
        c.sharedMemBytes,
        c.hStream,
        params,
        extra,
        Some(attributes).filter(|a| *a != v1::LaunchAttributes::default()),
    )
}

#[allow(clippy::too_many_arguments)]
fn launch_cooperative(
    f: CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    stream: CUstream,
    params: *mut *mut c_void,
) -> CuResult {
    let attributes = v1::LaunchAttributes { cooperative: true, ..Default::default() };
    launch(f, grid, block, shared, stream, params, std::ptr::null_mut(), Some(attributes))
}

crate::exports! {
    fn cuLaunchKernel(
        f: CUfunction, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint,
        shared: c_uint, stream: CUstream, params: *mut *mut c_void, extra: *mut *mut c_void,
    ) {
        launch(f, (gx, gy, gz), (bx, by, bz), shared, stream, params, extra, None)
    }

    fn cuLaunchKernel_ptsz(
        f: CUfunction, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint,
        shared: c_uint, stream: CUstream, params: *mut *mut c_void, extra: *mut *mut c_void,
    ) {
        launch(f, (gx, gy, gz), (bx, by, bz), shared, stream, params, extra, None)
    }

    fn cuLaunchKernelEx(config: *const CUlaunchConfig, f: CUfunction, params: *mut *mut c_void, extra: *mut *mut c_void) {
        launch_ex(config, f, params, extra)
    }

    fn cuLaunchKernelEx_ptsz(config: *const CUlaunchConfig, f: CUfunction, params: *mut *mut c_void, extra: *mut *mut c_void) {
        launch_ex(config, f, params, extra)
    }

    fn cuLaunchCooperativeKernel(
        f: CUfunction, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint,
        shared: c_uint, stream: CUstream, params: *mut *mut c_void,
    ) {
        launch_cooperative(f, (gx, gy, gz), (bx, by, bz), shared, stream, params)
    }

    fn cuLaunchCooperativeKernel_ptsz(
        f: CUfunction, gx: c_uint, gy: c_uint, gz: c_uint, bx: c_uint, by: c_uint, bz: c_uint,
        shared: c_uint, stream: CUstream, params: *mut *mut c_void,
    ) {
        launch_cooperative(f, (gx, gy, gz), (bx, by, bz), shared, stream, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> v1::FunctionInfo {
        v1::FunctionInfo {
            name: "k".into(),
            params: vec![v1::ParamInfo { offset: 0, size: 8 }, v1::ParamInfo { offset: 8, size: 4 }],
            params_size: 12,
            ..Default::default()
        }
    }

    #[test]
    fn kernel_node_attributes_read_back_as_set() {
        let value = |words: &[u32]| {
            let mut v = [0u8; VALUE_BYTES];
            for (i, w) in words.iter().enumerate() {
                v[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
            }
            v
        };
        // Defaults: nothing set.
        assert_eq!(node_attribute(None, ATTR_CLUSTER_DIMENSION), Ok([0; VALUE_BYTES]));
        assert_eq!(node_attribute(None, ATTR_PRIORITY), Ok([0; VALUE_BYTES]));
        let a = set_node_attribute(None, ATTR_CLUSTER_DIMENSION, &value(&[2, 1, 1])).expect("cluster");
        let a = set_node_attribute(Some(&a), ATTR_PRIORITY, &value(&[(-3i32) as u32])).expect("priority");
        let a = set_node_attribute(Some(&a), ATTR_COOPERATIVE, &value(&[1])).expect("cooperative");
        assert_eq!(node_attribute(Some(&a), ATTR_CLUSTER_DIMENSION), Ok(value(&[2, 1, 1])), "kept by later sets");
        assert_eq!(node_attribute(Some(&a), ATTR_PRIORITY), Ok(value(&[(-3i32) as u32])));
        assert_eq!(node_attribute(Some(&a), ATTR_COOPERATIVE), Ok(value(&[1])));
        let w = [0x1000, 0x7f, 1 << 20, 0, 0.5f32.to_bits(), 1, 2];
        let a = set_node_attribute(Some(&a), ATTR_ACCESS_POLICY_WINDOW, &value(&w)).expect("window");
        assert_eq!(node_attribute(Some(&a), ATTR_ACCESS_POLICY_WINDOW), Ok(value(&w)));
        // Zeros are no cluster.
        let a = set_node_attribute(Some(&a), ATTR_CLUSTER_DIMENSION, &value(&[0, 0, 0])).expect("none");
        assert_eq!(node_attribute(Some(&a), ATTR_CLUSTER_DIMENSION), Ok([0; VALUE_BYTES]));
        // Attributes of a launch, not of a node, and unknown ids.
        for id in [ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, ATTR_LAUNCH_COMPLETION_EVENT, 99] {
            assert_eq!(set_node_attribute(None, id, &value(&[1])), Err(CuError::NOT_SUPPORTED), "{id}");
            assert_eq!(node_attribute(None, id), Err(CuError::NOT_SUPPORTED), "{id}");
        }
    }

    #[test]
    fn pointer_array_packed_by_layout() {
        let (mut a, mut b) = (0x1122_3344_5566_7788u64, 7u32);
        let mut ptrs = [(&raw mut a).cast::<c_void>(), (&raw mut b).cast::<c_void>()];
        // SAFETY: one live pointer per parameter.
        let buf = unsafe { pack(&info(), ptrs.as_mut_ptr(), std::ptr::null_mut()) }.expect("pack");
        assert_eq!(&buf[..8], &a.to_le_bytes());
        assert_eq!(&buf[8..], &7u32.to_le_bytes());
    }

    #[test]
    fn extra_buffer_and_errors() {
        let mut packed = [9u8; 12];
        let mut size = 12usize;
        let mut extra = [
            PARAM_BUFFER_POINTER as *mut c_void,
            packed.as_mut_ptr().cast(),
            PARAM_BUFFER_SIZE as *mut c_void,
            (&raw mut size).cast(),
            PARAM_END as *mut c_void,
        ];
        // SAFETY: a terminated list with a 12-byte buffer.
        let buf = unsafe { pack(&info(), std::ptr::null_mut(), extra.as_mut_ptr()) }.expect("pack");
        assert_eq!(buf, vec![9u8; 12]);
        // SAFETY: the size slot points at `size`, a live local.
        unsafe { *extra[3].cast::<usize>() = 4 };
        // SAFETY: as above, with a too-small size.
        let short = unsafe { pack(&info(), std::ptr::null_mut(), extra.as_mut_ptr()) };
        assert_eq!(short, Err(CuError::INVALID_VALUE));
        // SAFETY: both null: only valid for a kernel without parameters.
        let none = unsafe { pack(&info(), std::ptr::null_mut(), std::ptr::null_mut()) };
        assert_eq!(none, Err(CuError::INVALID_VALUE));
    }

    fn value(words: &[u32]) -> [u8; VALUE_BYTES] {
        let mut v = [0u8; VALUE_BYTES];
        for (i, w) in words.iter().enumerate() {
            v[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        v
    }

    #[test]
    fn attributes_follow_the_driver_numbering() {
        let events = |h: usize| if h == 0x77 { Ok(3) } else { Err(CuError::INVALID_HANDLE) };
        let list = vec![
            (ATTR_COOPERATIVE, value(&[1])),
            (ATTR_CLUSTER_DIMENSION, value(&[2, 1, 1])),
            (ATTR_CLUSTER_SCHEDULING_POLICY_PREFERENCE, value(&[1])),
            (ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, value(&[1])),
            (ATTR_PRIORITY, value(&[(-3i32) as u32])),
            (ATTR_MEM_SYNC_DOMAIN, value(&[1])),
            (ATTR_MEM_SYNC_DOMAIN_MAP, value(&[0x0100])),
            (ATTR_LAUNCH_COMPLETION_EVENT, value(&[0x77, 0, 1])),
            (ATTR_PROGRAMMATIC_EVENT, value(&[0x77, 0, 2, 1])),
            (ATTR_PREFERRED_CLUSTER_DIMENSION, value(&[0, 0, 0])),
        ];
        let a = launch_attributes(list.into_iter(), events).expect("parsed");
        assert!(a.cooperative && a.programmatic_serialization);
        assert_eq!(a.cluster, Some(v1::Dim3 { x: 2, y: 1, z: 1 }));
        assert_eq!(a.preferred_cluster, None, "all zero: none");
        assert_eq!((a.cluster_scheduling_policy, a.priority, a.mem_sync_domain), (1, Some(-3), Some(1)));
        assert_eq!(a.mem_sync_domain_map, Some(v1::MemSyncDomainMap { default_domain: 0, remote_domain: 1 }));
        assert_eq!(a.completion_event, Some(v1::LaunchEvent { event: 3, flags: 1, trigger_at_block_start: false }));
        assert_eq!(a.programmatic_event, Some(v1::LaunchEvent { event: 3, flags: 2, trigger_at_block_start: true }));
        // Programmatic serialization off is the same as not set.
        let off = launch_attributes([(ATTR_PROGRAMMATIC_STREAM_SERIALIZATION, value(&[0]))].into_iter(), events);
        assert_eq!(off, Ok(v1::LaunchAttributes::default()));
        let bad_event = launch_attributes([(ATTR_LAUNCH_COMPLETION_EVENT, value(&[0x78]))].into_iter(), events);
        assert_eq!(bad_event, Err(CuError::INVALID_HANDLE));
        let unknown = launch_attributes([(13, value(&[1]))].into_iter(), events);
        assert_eq!(unknown, Err(CuError::NOT_SUPPORTED));
    }
}
