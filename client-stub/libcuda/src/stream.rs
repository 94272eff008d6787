//! Streams and events. Ids are assigned here and created on the server
//! with the next batch; queries and synchronizations wait once.

use crate::abi::{CuError, CuResult, put};
use crate::capture::{self, Route};
use crate::context::PRIORITY_RANGE;
use crate::graph::Op;
use crate::runtime::{Runtime, StreamInfo, Tag, handle, id_of};
use cudarc::driver::sys::{
    CUcontext, CUevent, CUgreenCtx, CUhostFn, CUipcEventHandle, CUresult, CUstream, CUstreamCallback,
};
use std::ffi::{c_float, c_int, c_uint, c_ulonglong, c_void};

fn create(ph: *mut CUstream, flags: c_uint, priority: c_int) -> CuResult {
    let rt = Runtime::with_context()?;
    // Clamp like the driver: out-of-range priorities take the nearest end.
    let priority = priority.clamp(PRIORITY_RANGE.1, PRIORITY_RANGE.0);
    let id = rt.session.stream_create(flags, priority)?;
    let ctx = crate::runtime::current_context().ok_or(CuError::INVALID_CONTEXT)?;
    rt.tables().streams.insert(u64::from(id.0), StreamInfo { id, flags, priority, ctx });
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(ph, handle(Tag::Stream, u64::from(id.0)) as CUstream) }
}

/// Writes one fact about stream `h` to `out` (the stream queries).
fn stream_fact<T>(h: CUstream, out: *mut T, fact: impl FnOnce(&StreamInfo) -> T) -> CuResult {
    let s = Runtime::with_context()?.stream_info(h as usize)?;
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(out, fact(&s)) }
}

/// The stream's context: the one current when it was created.
fn context_of(s: &StreamInfo) -> CUcontext {
    s.ctx as CUcontext
}

/// `cuStreamGetCtx_v2`: the stream's context, and no green context.
fn stream_ctx_v2(h: CUstream, ctx: *mut CUcontext, green: *mut CUgreenCtx) -> CuResult {
    stream_fact(h, ctx, context_of)?;
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(green, std::ptr::null_mut()) }
}

/// Waits for stream `h`'s work (`cuStreamSynchronize`).
pub(crate) fn synchronize(h: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    capture::check_sync(rt, h)?;
    let s = rt.stream(h as usize)?;
    rt.session.stream_synchronize(s)?;
    crate::mempool::synced(rt, Some(s))
}

fn query(h: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    capture::check_sync(rt, h)?;
    let s = rt.stream(h as usize)?;
    if rt.session.stream_query(s)? { Ok(()) } else { Err(CuError::NOT_READY) }
}

/// CU_EVENT_WAIT_EXTERNAL and CU_EVENT_RECORD_EXTERNAL: inside a capture,
/// a wait or record node rather than a fork/join point.
const EXTERNAL: c_uint = 1;

fn wait_event(h: CUstream, e: CUevent, flags: c_uint) -> CuResult {
    let rt = Runtime::with_context()?;
    rt.event(e as usize)?;
    let Some(s) = capture::wait_event(rt, h, e as usize, flags & EXTERNAL != 0)? else { return Ok(()) };
    crate::mempool::event_waited(s, e as usize);
    let e = rt.event(e as usize)?;
    rt.session.stream_wait_event(s, e).map_err(CuError::from)
}

fn record(e: CUevent, h: CUstream, flags: c_uint) -> CuResult {
    let rt = Runtime::with_context()?;
    let id = rt.event(e as usize)?;
    let Some(s) = capture::event_record(rt, e as usize, h, flags & EXTERNAL != 0)? else { return Ok(()) };
    crate::mempool::event_recorded(e as usize, s);
    rt.session.event_record(id, s).map_err(CuError::from)
}

/// `cuIpcGetEventHandle`: the server registers the event's driver handle
/// and answers the bytes that name it (docs/ipc.md).
fn ipc_export(out: *mut CUipcEventHandle, e: CUevent) -> CuResult {
    if out.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let rt = Runtime::with_context()?;
    let id = rt.event(e as usize)?;
    let bytes = rt.session.event_ipc_handle(id)?;
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(out, CUipcEventHandle { reserved: bytes.map(|b| b as std::ffi::c_char) }) }
}

/// `cuIpcOpenEventHandle`: the event another process exported.
fn ipc_open(ph: *mut CUevent, shared: CUipcEventHandle) -> CuResult {
    if ph.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let rt = Runtime::with_context()?;
    let e = rt.session.event_ipc_open(&shared.reserved.map(|b| b as u8))?;
    rt.tables().events.insert(u64::from(e.0), e);
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(ph, handle(Tag::Event, u64::from(e.0)) as CUevent) }
}

/// Host functions run on the calling thread once the stream's earlier
/// work is done: the order CUDA promises, without a callback thread.
/// While the stream captures, the function becomes a host node.
fn host_func(h: CUstream, f: CUhostFn, data: *mut c_void) -> CuResult {
    let f = f.ok_or(CuError::INVALID_VALUE)?;
    let rt = Runtime::with_context()?;
    if let Route::Capture(s) = capture::route(rt, h)? {
        return capture::add(s, Op::Host { func: f as usize, data: data as usize }).map(drop);
    }
    synchronize(h)?;
    // SAFETY: the application's callback with its own argument.
    unsafe { f(data) };
    Ok(())
}

fn add_callback(h: CUstream, cb: CUstreamCallback, data: *mut c_void, flags: c_uint) -> CuResult {
    let cb = cb.ok_or(CuError::INVALID_VALUE)?;
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // Stream callbacks cannot be captured (CUDA's rule; cuLaunchHostFunc can).
    if let Route::Capture(_) = capture::route(Runtime::with_context()?, h)? {
        return Err(CuError(900));
    }
    let status = match synchronize(h) {
        Ok(()) => CUresult::CUDA_SUCCESS,
        Err(e) => crate::codes::from_raw(e.0),
    };
    // SAFETY: the application's callback with its stream and argument.
    unsafe { cb(h, status, data) };
    Ok(())
}

fn elapsed(ms: *mut c_float, start: CUevent, end: CUevent) -> CuResult {
    let rt = Runtime::with_context()?;
    let (a, b) = (rt.event(start as usize)?, rt.event(end as usize)?);
    let v = rt.session.event_elapsed(a, b)?;
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(ms, v) }
}

/// Objects that stand for streams in the private tools table
/// (`export_tables`, `TOOLS_CONTEXT[51]` and `[39]`): cuBLAS reads a
/// stream's id through them before each GEMM. Keyed by stream id; each is
/// `[1, id]`, the first word as NVIDIA's driver has it.
static STREAM_OBJECTS: std::sync::Mutex<std::collections::BTreeMap<u64, Box<[u64; 2]>>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The id `cuStreamGetId` gives for stream handle `h`.
fn stream_id(h: CUstream) -> CuResult<u64> {
    Ok(u64::from(Runtime::with_context()?.stream_info(h as usize)?.id.0))
}

/// The object standing for stream `h` (see [`STREAM_OBJECTS`]).
pub(crate) fn stream_object(h: CUstream) -> CuResult<*const u64> {
    let id = stream_id(h)?;
    let mut objects = STREAM_OBJECTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(objects.entry(id).or_insert_with(|| Box::new([1, id])).as_ptr())
}

/// The stream id behind an object from [`stream_object`].
pub(crate) fn stream_object_id(obj: *const u64) -> CuResult<u64> {
    let objects = STREAM_OBJECTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    objects.iter().find(|(_, o)| o.as_ptr() == obj).map(|(id, _)| *id).ok_or(CuError::INVALID_HANDLE)
}

fn forget_stream_object(id: u64) {
    STREAM_OBJECTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&id);
}

/// The stream attributes offered (`CUstreamAttrID`): ACCESS_POLICY_WINDOW,
/// SYNCHRONIZATION_POLICY, PRIORITY, MEM_SYNC_DOMAIN_MAP, MEM_SYNC_DOMAIN.
const STREAM_ATTRIBUTES: [c_uint; 5] = [1, 3, 8, 9, 10];
const ATTR_PRIORITY: c_uint = 8;

/// Bytes of a `CUstreamAttrValue` (a union).
const ATTRIBUTE_BYTES: usize = 64;

fn set_attribute(h: CUstream, attribute: c_uint, value: *const c_void) -> CuResult {
    let rt = Runtime::with_context()?;
    if !STREAM_ATTRIBUTES.contains(&attribute) {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: a CUstreamAttrValue per the CUDA API.
    let v = unsafe { crate::abi::get(value.cast::<[u8; ATTRIBUTE_BYTES]>()) }?;
    let info = rt.stream_info(h as usize)?;
    if attribute == ATTR_PRIORITY {
        // The stream's priority as cuStreamGetPriority answers it, clamped
        // as at creation.
        let p = i32::from_le_bytes([v[0], v[1], v[2], v[3]]).clamp(PRIORITY_RANGE.1, PRIORITY_RANGE.0);
        if let Some(s) = rt.tables().streams.get_mut(&u64::from(info.id.0)) {
            s.priority = p;
        }
    }
    rt.session.stream_set_attribute(info.id, attribute, v).map_err(CuError::from)
}

fn get_attribute(h: CUstream, attribute: c_uint, out: *mut c_void) -> CuResult {
    let rt = Runtime::with_context()?;
    if !STREAM_ATTRIBUTES.contains(&attribute) {
        return Err(CuError::INVALID_VALUE);
    }
    let s = rt.stream(h as usize)?;
    let v = rt.session.stream_get_attribute(s, attribute)?;
    // SAFETY: out-pointer to a CUstreamAttrValue per the CUDA API.
    unsafe { put(out.cast::<[u8; ATTRIBUTE_BYTES]>(), v) }
}

/// `cuStreamCopyAttributes`: every offered attribute of `src` onto `dst`.
fn copy_attributes(dst: CUstream, src: CUstream) -> CuResult {
    let rt = Runtime::with_context()?;
    rt.stream(dst as usize)?;
    let s = rt.stream(src as usize)?;
    for a in STREAM_ATTRIBUTES {
        let v = rt.session.stream_get_attribute(s, a)?;
        set_attribute(dst, a, v.as_ptr().cast())?;
    }
    Ok(())
}

crate::exports! {
    fn cuStreamSetAttribute(h: CUstream, attribute: c_uint, value: *const c_void) { set_attribute(h, attribute, value) }
    fn cuStreamSetAttribute_ptsz(h: CUstream, attribute: c_uint, value: *const c_void) { set_attribute(h, attribute, value) }
    fn cuStreamGetAttribute(h: CUstream, attribute: c_uint, out: *mut c_void) { get_attribute(h, attribute, out) }
    fn cuStreamGetAttribute_ptsz(h: CUstream, attribute: c_uint, out: *mut c_void) { get_attribute(h, attribute, out) }
    fn cuStreamCopyAttributes(dst: CUstream, src: CUstream) { copy_attributes(dst, src) }
    fn cuStreamCopyAttributes_ptsz(dst: CUstream, src: CUstream) { copy_attributes(dst, src) }

    fn cuStreamCreate(ph: *mut CUstream, flags: c_uint) { create(ph, flags, 0) }
    fn cuStreamCreateWithPriority(ph: *mut CUstream, flags: c_uint, priority: c_int) { create(ph, flags, priority) }

    fn cuStreamDestroy_v2(h: CUstream) {
        let rt = Runtime::with_context()?;
        let id = id_of(Tag::Stream, h as usize).ok_or(CuError::INVALID_HANDLE)?;
        let s = rt.tables().streams.remove(&id).ok_or(CuError::INVALID_HANDLE)?;
        forget_stream_object(u64::from(s.id.0));
        capture::forget_stream(s.id);
        rt.session.stream_destroy(s.id).map_err(CuError::from)
    }

    fn cuStreamSynchronize(h: CUstream) { synchronize(h) }
    fn cuStreamSynchronize_ptsz(h: CUstream) { synchronize(h) }
    fn cuStreamQuery(h: CUstream) { query(h) }
    fn cuStreamQuery_ptsz(h: CUstream) { query(h) }
    fn cuStreamWaitEvent(h: CUstream, e: CUevent, flags: c_uint) { wait_event(h, e, flags) }
    fn cuStreamWaitEvent_ptsz(h: CUstream, e: CUevent, flags: c_uint) { wait_event(h, e, flags) }
    fn cuLaunchHostFunc(h: CUstream, f: CUhostFn, data: *mut c_void) { host_func(h, f, data) }
    fn cuLaunchHostFunc_ptsz(h: CUstream, f: CUhostFn, data: *mut c_void) { host_func(h, f, data) }
    fn cuStreamAddCallback(h: CUstream, cb: CUstreamCallback, data: *mut c_void, flags: c_uint) { add_callback(h, cb, data, flags) }
    fn cuStreamAddCallback_ptsz(h: CUstream, cb: CUstreamCallback, data: *mut c_void, flags: c_uint) { add_callback(h, cb, data, flags) }

    fn cuStreamGetPriority(h: CUstream, p: *mut c_int) { stream_fact(h, p, |s| s.priority) }
    fn cuStreamGetPriority_ptsz(h: CUstream, p: *mut c_int) { stream_fact(h, p, |s| s.priority) }
    fn cuStreamGetFlags(h: CUstream, flags: *mut c_uint) { stream_fact(h, flags, |s| s.flags) }
    fn cuStreamGetFlags_ptsz(h: CUstream, flags: *mut c_uint) { stream_fact(h, flags, |s| s.flags) }
    fn cuStreamGetId(h: CUstream, id: *mut c_ulonglong) { stream_fact(h, id, |s| u64::from(s.id.0)) }
    fn cuStreamGetId_ptsz(h: CUstream, id: *mut c_ulonglong) { stream_fact(h, id, |s| u64::from(s.id.0)) }
    fn cuStreamGetCtx(h: CUstream, ctx: *mut CUcontext) { stream_fact(h, ctx, context_of) }
    /// gpupool offers no green contexts: the second answer is always null.
    fn cuStreamGetCtx_v2(h: CUstream, ctx: *mut CUcontext, green: *mut CUgreenCtx) { stream_ctx_v2(h, ctx, green) }
    fn cuStreamGetCtx_v2_ptsz(h: CUstream, ctx: *mut CUcontext, green: *mut CUgreenCtx) { stream_ctx_v2(h, ctx, green) }
    fn cuStreamGetCtx_ptsz(h: CUstream, ctx: *mut CUcontext) { stream_fact(h, ctx, context_of) }
    fn cuStreamGetDevice(h: CUstream, dev: *mut c_int) { stream_fact(h, dev, |_| 0) }
    fn cuStreamGetDevice_ptsz(h: CUstream, dev: *mut c_int) { stream_fact(h, dev, |_| 0) }

    fn cuEventCreate(ph: *mut CUevent, flags: c_uint) {
        let rt = Runtime::with_context()?;
        let e = rt.session.event_create(flags)?;
        rt.tables().events.insert(u64::from(e.0), e);
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(ph, handle(Tag::Event, u64::from(e.0)) as CUevent) }
    }

    fn cuEventDestroy_v2(h: CUevent) {
        let rt = Runtime::with_context()?;
        let id = id_of(Tag::Event, h as usize).ok_or(CuError::INVALID_HANDLE)?;
        let e = rt.tables().events.remove(&id).ok_or(CuError::INVALID_HANDLE)?;
        rt.session.event_destroy(e).map_err(CuError::from)
    }

    fn cuIpcGetEventHandle(out: *mut CUipcEventHandle, e: CUevent) { ipc_export(out, e) }
    fn cuIpcOpenEventHandle(ph: *mut CUevent, shared: CUipcEventHandle) { ipc_open(ph, shared) }

    fn cuEventRecord(e: CUevent, h: CUstream) { record(e, h, 0) }
    fn cuEventRecord_ptsz(e: CUevent, h: CUstream) { record(e, h, 0) }
    fn cuEventRecordWithFlags(e: CUevent, h: CUstream, flags: c_uint) { record(e, h, flags) }
    fn cuEventRecordWithFlags_ptsz(e: CUevent, h: CUstream, flags: c_uint) { record(e, h, flags) }

    fn cuEventQuery(e: CUevent) {
        let rt = Runtime::with_context()?;
        let e = rt.event(e as usize)?;
        if rt.session.event_query(e)? { Ok(()) } else { Err(CuError::NOT_READY) }
    }

    fn cuEventSynchronize(e: CUevent) {
        let rt = Runtime::with_context()?;
        let e = rt.event(e as usize)?;
        rt.session.event_synchronize(e).map_err(CuError::from)
    }

    fn cuEventElapsedTime(ms: *mut c_float, start: CUevent, end: CUevent) { elapsed(ms, start, end) }
    fn cuEventElapsedTime_v2(ms: *mut c_float, start: CUevent, end: CUevent) { elapsed(ms, start, end) }
}
