//! Contexts. The process has one session, so one device context on the
//! server; the primary context and any created ones are views of it with
//! their own flags and runtime storage, and a per-thread current stack as
//! the driver keeps.

use crate::abi::{CuError, CuResult, put};
use crate::device::check_device;
use crate::runtime::{self, ContextInfo, PRIMARY, Runtime, Tag, handle, id_of};
use cudarc::driver::sys::{CUcontext, CUctxCreateParams, CUdevice, CUevent, CUexecAffinityParam};
use std::ffi::{c_int, c_uint, c_ulonglong};

/// Stream priorities of current NVIDIA GPUs: 0 is the lowest, -5 the
/// highest (what cuCtxGetStreamPriorityRange reports on Hopper).
pub(crate) const PRIORITY_RANGE: (c_int, c_int) = (0, -5);

/// `CUDA_ERROR_UNSUPPORTED_LIMIT`.
const UNSUPPORTED_LIMIT: u32 = 215;

/// CU_LIMIT_CIG_ENABLED and CU_LIMIT_CIG_SHMEM_FALLBACK_ENABLED (CUDA
/// 12.9+). CUDA-in-graphics is off in every context gpupool creates
/// (`cuCtxCreate_v4` refuses CIG parameters), and the driver answers 0 for
/// such contexts. cuBLAS 13 asks for CIG_ENABLED when it creates a handle
/// and, answered with an error, went on with an unset value: GEMMs failed
/// with ARCH_MISMATCH or NOT_SUPPORTED, or the process crashed (seen on the
/// H200, 2026-12-04).
const CIG_LIMITS: [u32; 2] = [8, 9];

fn exec_affinity_unsupported() -> CuError {
    tracing::debug!("cuCtxCreate: execution affinity (an SM count per context) is not supported by gpupool");
    CuError::NOT_SUPPORTED
}

fn primary_handle() -> usize {
    handle(Tag::Context, PRIMARY)
}

/// The context a call names, or the current one for a null handle.
pub(crate) fn resolve(rt: &Runtime, ctx: CUcontext) -> CuResult<usize> {
    let h = if ctx.is_null() { runtime::current_context().ok_or(CuError::INVALID_CONTEXT)? } else { ctx as usize };
    if rt.context_exists(h) { Ok(h) } else { Err(CuError::INVALID_CONTEXT) }
}

/// `cuCtxRecordEvent` (`wait` false) and `cuCtxWaitEvent`.
fn context_event(ctx: CUcontext, event: CUevent, wait: bool) -> CuResult {
    let rt = Runtime::get()?;
    resolve(rt, ctx)?;
    let e = rt.event(event as usize)?;
    crate::capture::check_context_event()?;
    let sent = if wait { rt.session.context_wait_event(e) } else { rt.session.context_record_event(e) };
    sent.map_err(CuError::from)
}

fn create(flags: c_uint, dev: CUdevice, pctx: *mut CUcontext) -> CuResult {
    let rt = Runtime::get()?;
    check_device(dev)?;
    let h = {
        let mut t = rt.tables();
        let id = t.next_context;
        t.next_context += 1;
        t.contexts.insert(id, ContextInfo { flags, ..ContextInfo::default() });
        handle(Tag::Context, id)
    };
    runtime::push_context(h);
    // SAFETY: out-pointer per the CUDA API.
    unsafe { put(pctx, h as CUcontext) }
}

/// Waits for all work of the session.
pub(crate) fn synchronize() -> CuResult {
    let rt = Runtime::with_context()?;
    crate::capture::check_unsafe(true)?;
    rt.session.synchronize()?;
    crate::mempool::synced(rt, None)
}

crate::exports! {
    fn cuDevicePrimaryCtxRetain(pctx: *mut CUcontext, dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        rt.tables().primary_refs += 1;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pctx, primary_handle() as CUcontext) }
    }

    fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        let mut t = rt.tables();
        t.primary_refs = t.primary_refs.checked_sub(1).ok_or(CuError::INVALID_CONTEXT)?;
        Ok(())
    }

    fn cuDevicePrimaryCtxSetFlags_v2(dev: CUdevice, flags: c_uint) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        if let Some(c) = rt.tables().contexts.get_mut(&PRIMARY) {
            c.flags = flags;
        }
        Ok(())
    }

    fn cuDevicePrimaryCtxGetState(dev: CUdevice, flags: *mut c_uint, active: *mut c_int) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        let t = rt.tables();
        // SAFETY: out-pointers per the CUDA API.
        unsafe {
            put(flags, t.contexts.get(&PRIMARY).map_or(0, |c| c.flags))?;
            put(active, c_int::from(t.primary_refs > 0))
        }
    }

    /// Waits for the session's work and drops the primary context's state.
    /// Device memory stays allocated: the session, not the context, owns it.
    /// A context lost to a sticky error resets as a local one does: the
    /// reset succeeds and the device is unavailable from then on.
    fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) {
        let rt = Runtime::get()?;
        check_device(dev)?;
        let synced = if rt.session.context_lost() { Ok(()) } else { rt.session.synchronize() };
        if let Err(e) = synced
            && !rt.session.context_lost()
        {
            return Err(e.into());
        }
        rt.session.reset_lost_context();
        let mut t = rt.tables();
        t.primary_refs = 0;
        if let Some(c) = t.contexts.get_mut(&PRIMARY) {
            c.flags = 0;
            c.storage.clear();
        }
        Ok(())
    }

    fn cuCtxCreate_v2(pctx: *mut CUcontext, flags: c_uint, dev: CUdevice) {
        create(flags, dev, pctx)
    }

    /// Execution affinity (an SM count for the context) is not offered.
    fn cuCtxCreate_v3(pctx: *mut CUcontext, params: *mut CUexecAffinityParam, num_params: c_int, flags: c_uint, dev: CUdevice) {
        if num_params < 0 || (num_params > 0 && params.is_null()) {
            return Err(CuError::INVALID_VALUE);
        }
        if num_params > 0 {
            return Err(exec_affinity_unsupported());
        }
        create(flags, dev, pctx)
    }

    /// CUDA 13's form: null params, or params without execution affinity
    /// and without CIG (a graphics client's context), create as `_v2` does.
    fn cuCtxCreate_v4(pctx: *mut CUcontext, params: *mut CUctxCreateParams, flags: c_uint, dev: CUdevice) {
        if !params.is_null() {
            // SAFETY: non-null, a CUctxCreateParams per the CUDA API.
            let p = unsafe { crate::abi::get(params) }?;
            if p.numExecAffinityParams < 0 || (p.numExecAffinityParams > 0 && p.execAffinityParams.is_null()) {
                return Err(CuError::INVALID_VALUE);
            }
            if p.numExecAffinityParams > 0 {
                return Err(exec_affinity_unsupported());
            }
            if !p.cigParams.is_null() {
                tracing::debug!("cuCtxCreate_v4: CUDA-in-graphics (CIG) contexts are not supported by gpupool");
                return Err(CuError::NOT_SUPPORTED);
            }
        }
        create(flags, dev, pctx)
    }

    fn cuCtxDestroy_v2(ctx: CUcontext) {
        let rt = Runtime::get()?;
        let id = id_of(Tag::Context, ctx as usize).ok_or(CuError::INVALID_CONTEXT)?;
        if id == PRIMARY {
            return Err(CuError::INVALID_CONTEXT);
        }
        rt.tables().contexts.remove(&id).ok_or(CuError::INVALID_CONTEXT)?;
        runtime::forget_context(ctx as usize);
        Ok(())
    }

    fn cuCtxGetCurrent(pctx: *mut CUcontext) {
        Runtime::get()?;
        let h = runtime::current_context().unwrap_or(0);
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(pctx, h as CUcontext) }
    }

    fn cuCtxSetCurrent(ctx: CUcontext) {
        let rt = Runtime::get()?;
        if ctx.is_null() {
            runtime::set_current_context(None);
            return Ok(());
        }
        if !rt.context_exists(ctx as usize) {
            return Err(CuError::INVALID_CONTEXT);
        }
        runtime::set_current_context(Some(ctx as usize));
        Ok(())
    }

    fn cuCtxPushCurrent_v2(ctx: CUcontext) {
        let rt = Runtime::get()?;
        if !rt.context_exists(ctx as usize) {
            return Err(CuError::INVALID_CONTEXT);
        }
        runtime::push_context(ctx as usize);
        Ok(())
    }

    fn cuCtxPopCurrent_v2(pctx: *mut CUcontext) {
        Runtime::get()?;
        let h = runtime::pop_context().ok_or(CuError::INVALID_CONTEXT)?;
        if !pctx.is_null() {
            // SAFETY: non-null out-pointer per the CUDA API.
            unsafe { put(pctx, h as CUcontext) }?;
        }
        Ok(())
    }

    fn cuCtxGetDevice(dev: *mut CUdevice) {
        Runtime::with_context()?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(dev, 0) }
    }

    fn cuCtxGetDevice_v2(dev: *mut CUdevice, ctx: CUcontext) {
        resolve(Runtime::get()?, ctx)?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(dev, 0) }
    }

    fn cuCtxGetFlags(flags: *mut c_uint) {
        let f = with_info(std::ptr::null_mut(), |c| Ok(c.flags))?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(flags, f) }
    }

    fn cuCtxSetFlags(flags: c_uint) {
        with_info(std::ptr::null_mut(), |c| {
            c.flags = flags;
            Ok(())
        })
    }

    fn cuCtxGetId(ctx: CUcontext, ctx_id: *mut c_ulonglong) {
        let h = resolve(Runtime::get()?, ctx)?;
        let id = id_of(Tag::Context, h).unwrap_or(PRIMARY);
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(ctx_id, id) }
    }

    fn cuCtxSynchronize() {
        synchronize()
    }

    fn cuCtxSynchronize_v2(ctx: CUcontext) {
        let rt = Runtime::get()?;
        resolve(rt, ctx)?;
        crate::capture::check_unsafe(true)?;
        rt.session.synchronize()?;
        crate::mempool::synced(rt, None)
    }

    /// The event captures all work of the session (every context of the
    /// process shares its one device context).
    fn cuCtxRecordEvent(ctx: CUcontext, event: CUevent) { context_event(ctx, event, false) }

    fn cuCtxWaitEvent(ctx: CUcontext, event: CUevent) { context_event(ctx, event, true) }

    fn cuCtxGetApiVersion(ctx: CUcontext, version: *mut c_uint) {
        resolve(Runtime::get()?, ctx)?;
        // The API version of contexts made by cuCtxCreate_v2 and later.
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(version, 3020) }
    }

    fn cuCtxGetStreamPriorityRange(least: *mut c_int, greatest: *mut c_int) {
        Runtime::with_context()?;
        // SAFETY: each out-pointer may be null per the CUDA API.
        unsafe {
            if !least.is_null() {
                put(least, PRIORITY_RANGE.0)?;
            }
            if !greatest.is_null() {
                put(greatest, PRIORITY_RANGE.1)?;
            }
        }
        Ok(())
    }

    /// Answered locally: the values the session's context reported at
    /// the start, updated by each set. A limit the server's device does
    /// not have is CUDA_ERROR_UNSUPPORTED_LIMIT, as natively.
    fn cuCtxGetLimit(value: *mut usize, limit: c_uint) {
        let rt = Runtime::with_context()?;
        let v = rt
            .session
            .ctx_get_limit(limit)
            .or_else(|| CIG_LIMITS.contains(&limit).then_some(0))
            .ok_or(CuError(UNSUPPORTED_LIMIT))?;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(value, usize::try_from(v).unwrap_or(usize::MAX)) }
    }

    /// Set on the session's context on the server (one round trip); the
    /// value the driver reports afterwards (it rounds some) is kept.
    /// Queued work runs first, as the driver synchronizes for some limits.
    fn cuCtxSetLimit(limit: c_uint, value: usize) {
        let rt = Runtime::with_context()?;
        if rt.session.ctx_get_limit(limit).is_none() {
            return Err(CuError(UNSUPPORTED_LIMIT));
        }
        rt.session.ctx_set_limit(limit, value as u64).map(drop).map_err(CuError::from)
    }

    /// Cache configuration is a preference; the device may ignore it.
    fn cuCtxGetCacheConfig(config: *mut c_uint) {
        let rt = Runtime::with_context()?;
        let c = rt.tables().cache_config;
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(config, c) }
    }

    fn cuCtxSetCacheConfig(config: c_uint) {
        if config > 3 {
            return Err(CuError::INVALID_VALUE);
        }
        Runtime::with_context()?.tables().cache_config = config;
        Ok(())
    }

    fn cuCtxGetSharedMemConfig(config: *mut c_uint) {
        Runtime::with_context()?;
        // Four-byte banks: the only mode of current GPUs.
        // SAFETY: out-pointer per the CUDA API.
        unsafe { put(config, 1) }
    }

    fn cuCtxSetSharedMemConfig(config: c_uint) {
        Runtime::with_context()?;
        if config > 2 { Err(CuError::INVALID_VALUE) } else { Ok(()) }
    }

    /// Persisting L2 lines are a performance hint.
    fn cuCtxResetPersistingL2Cache() {
        Runtime::with_context().map(drop)
    }

    fn cuProfilerStart() {
        Runtime::get().map(drop)
    }

    fn cuProfilerStop() {
        Runtime::get().map(drop)
    }
}

/// Runs `f` on the context a call names (null: the calling thread's current
/// one); a missing context is CUDA_ERROR_INVALID_CONTEXT.
fn with_info<T>(ctx: CUcontext, f: impl FnOnce(&mut ContextInfo) -> CuResult<T>) -> CuResult<T> {
    let rt = Runtime::get()?;
    let h = if ctx.is_null() { runtime::current_context().ok_or(CuError::INVALID_CONTEXT)? } else { ctx as usize };
    let id = id_of(Tag::Context, h).ok_or(CuError::INVALID_CONTEXT)?;
    f(rt.tables().contexts.get_mut(&id).ok_or(CuError::INVALID_CONTEXT)?)
}

/// The runtime's context-local storage (used by the export tables).
pub(crate) fn storage_put(ctx: CUcontext, key: usize, value: usize, dtor: usize) -> CuResult {
    with_info(ctx, |c| {
        c.storage.insert(key, (value, dtor));
        Ok(())
    })
}

pub(crate) fn storage_get(ctx: CUcontext, key: usize) -> CuResult<usize> {
    with_info(ctx, |c| c.storage.get(&key).map(|(v, _)| *v).ok_or(CuError::INVALID_HANDLE))
}

pub(crate) fn storage_delete(ctx: CUcontext, key: usize) -> CuResult {
    with_info(ctx, |c| {
        c.storage.remove(&key);
        Ok(())
    })
}
