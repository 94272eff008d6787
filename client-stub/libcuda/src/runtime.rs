//! Process-wide state behind the exports: the one session (opened by
//! `cuInit`), the virtual GPU's description, and the tables that turn CUDA
//! handles into session ids.
//!
//! Handles are small tagged integers, never pointers to our memory: a
//! handle from the application is looked up in a table before use, so a
//! stale or forged one is an error, not a wild read.

use crate::abi::{CuError, CuResult};
use crate::env;
use crate::library::Library;
use gpupool_client::{EventId, Module, Session, StreamId};
use gpupool_proto::v1;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Handle kinds, in bits 40..48 of a handle's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum Tag {
    Context = 0x11,
    Stream = 0x12,
    Event = 0x13,
    Module = 0x14,
    Function = 0x15,
    Library = 0x16,
    Kernel = 0x17,
    Array = 0x18,
    MipmappedArray = 0x19,
    UserObject = 0x1A,
}

const TAG_SHIFT: u32 = 40;
const ID_MASK: u64 = (1 << TAG_SHIFT) - 1;

/// The handle value for `id` of kind `tag`.
pub(crate) fn handle(tag: Tag, id: u64) -> usize {
    (((tag as u64) << TAG_SHIFT) | (id & ID_MASK)) as usize
}

/// The id inside a handle of kind `tag`, if it is one.
pub(crate) fn id_of(tag: Tag, h: usize) -> Option<u64> {
    let v = h as u64;
    (v >> TAG_SHIFT == tag as u64).then_some(v & ID_MASK)
}

/// A function handle packs the module id and the function's index.
pub(crate) fn function_handle(tag: Tag, module: u32, index: u32) -> usize {
    handle(tag, (u64::from(module) << 20) | u64::from(index & 0xF_FFFF))
}

/// `(module, index)` of a function or kernel handle: the CUDA runtime
/// passes kernels where functions are expected, as CUDA allows.
pub(crate) fn function_of(h: usize) -> CuResult<(u32, u32)> {
    let id = id_of(Tag::Function, h).or_else(|| id_of(Tag::Kernel, h)).ok_or(CuError::INVALID_HANDLE)?;
    Ok(((id >> 20) as u32, (id & 0xF_FFFF) as u32))
}

/// What the application sees of a stream beyond its id.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamInfo {
    pub(crate) id: StreamId,
    pub(crate) flags: u32,
    pub(crate) priority: i32,
    /// The context (handle) current when it was created; the special
    /// streams belong to the caller's current one.
    pub(crate) ctx: usize,
}

/// A context. All contexts of the process share the session (one device
/// context on the server); each keeps its own flags and the CUDA runtime's
/// per-context storage.
#[derive(Debug, Default)]
pub(crate) struct ContextInfo {
    pub(crate) flags: u32,
    /// Context-local storage of the CUDA runtime: key -> (value, destructor).
    pub(crate) storage: HashMap<usize, (usize, usize)>,
}

/// Handle tables.
#[derive(Debug, Default)]
pub(crate) struct Tables {
    pub(crate) contexts: HashMap<u64, ContextInfo>,
    /// Device allocations made while a context other than the primary one
    /// was current: start -> that context's handle (what
    /// `CU_POINTER_ATTRIBUTE_CONTEXT` answers; the primary one otherwise).
    pub(crate) alloc_contexts: HashMap<u64, usize>,
    pub(crate) primary_refs: u32,
    pub(crate) streams: HashMap<u64, StreamInfo>,
    pub(crate) events: HashMap<u64, EventId>,
    /// Host memory from cuMemAllocHost/cuMemHostAlloc: address -> (size, flags).
    pub(crate) host_allocs: std::collections::BTreeMap<usize, (usize, u32)>,
    /// Host ranges registered with cuMemHostRegister: address -> (size, flags).
    pub(crate) host_registered: std::collections::BTreeMap<usize, (usize, u32)>,
    /// Mapped host memory (DEVICEMAP) by host address (`mapped.rs`).
    pub(crate) mapped: std::collections::BTreeMap<usize, crate::mapped::Mapped>,
    /// Host halves of `__managed__` module variables (`mapped.rs`).
    pub(crate) managed_globals: crate::mapped::ManagedGlobals,
    /// Libraries by id (the module id their module gets at first use).
    pub(crate) libraries: HashMap<u32, Arc<Library>>,
    /// Libraries whose image has no code this GPU can run: library id ->
    /// (the driver's error, kernel names asked for). CUDA loads libraries
    /// lazily, so such a library loads and its kernels can be named; the
    /// error comes when a kernel is used.
    pub(crate) unusable: HashMap<u32, (u32, Vec<String>)>,
    pub(crate) next_context: u64,
    pub(crate) cache_config: u32,
    /// Arrays, texture and surface objects (`texture.rs`).
    pub(crate) textures: crate::texture::Tables,
}

/// The process's connection to its virtual GPU.
#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) session: Session,
    pub(crate) device: v1::DeviceInfo,
    /// Device attributes as the application sees them.
    pub(crate) attributes: HashMap<u32, i32>,
    pub(crate) tables: Mutex<Tables>,
}

static RUNTIME: OnceLock<Result<Runtime, CuError>> = OnceLock::new();

thread_local! {
    /// The calling thread's context stack (top = current).
    static CONTEXT_STACK: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// The primary context's id.
pub(crate) const PRIMARY: u64 = 1;

/// A process using the drop-in library never drops its session: at exit
/// the session ends (the server frees its memory and worker at once, not
/// after the connection's idle timeout and the resume grace) and a lease
/// goes back to the pool instead of expiring.
///
/// The close runs on a thread of its own: `exit` has destroyed this
/// thread's thread-local storage already, and the logger needs it (with
/// `GPUPOOL_LOG=trace` the close's log lines panicked here, which aborted
/// the program: every exit status became SIGABRT). Nothing may unwind into
/// the C library's `exit` either way.
extern "C" fn end_session_at_exit() {
    fn close() {
        if let Some(Ok(rt)) = RUNTIME.get() {
            rt.session.release_lease();
            rt.session.close_at_exit(std::time::Duration::from_millis(50));
        }
    }
    let joined = std::thread::Builder::new().name("gpupool-exit".into()).spawn(close).map(|t| t.join());
    if joined.is_err() {
        let _ = std::panic::catch_unwind(close);
    }
}

unsafe extern "C" {
    /// The C library's `stdout` stream.
    #[link_name = "stdout"]
    static C_STDOUT: *mut libc::FILE;
    /// The C library's `stderr` stream.
    #[link_name = "stderr"]
    static C_STDERR: *mut libc::FILE;
}

/// Device output, written as the driver writes it: device printf to the C
/// `stdout` stream, a failed assert's message to `stderr`, by the thread
/// whose synchronizing call returns, so that it interleaves with the
/// program's own output as natively (also when stdout is a pipe or a file
/// and fully buffered).
fn write_c_stream(stream: gpupool_client::OutputStream, bytes: &[u8]) {
    // SAFETY: `stdout` and `stderr` are the C library's initialized
    // streams; fwrite reads `bytes.len()` bytes from a live slice.
    unsafe {
        let out = match stream {
            gpupool_client::OutputStream::Stdout => C_STDOUT,
            gpupool_client::OutputStream::Stderr => C_STDERR,
        };
        libc::fwrite(bytes.as_ptr().cast(), 1, bytes.len(), out);
        libc::fflush(out);
    }
}

impl Runtime {
    /// Opens the session on first use (`cuInit`); later calls return the
    /// same outcome. A failure is reported on stderr once.
    pub(crate) fn init() -> CuResult<&'static Runtime> {
        RUNTIME
            .get_or_init(|| {
                gpupool_ffi::init_logging();
                let target = env::target().map_err(|msg| {
                    eprintln!("gpupool: {msg}");
                    CuError(gpupool_proto::cuda::NO_DEVICE)
                })?;
                let session = match &target {
                    env::Target::Direct(config) => Session::connect(config),
                    env::Target::Pooled(request, template) => Session::connect_pooled(request, template),
                    env::Target::Handoff(path, template) => gpupool_client::LeaseHandoff::read(path)
                        .and_then(|lease| lease.client_config(template))
                        .and_then(|mut config| {
                            // A resume after a freeze presents the token as last renewed.
                            config.token_source = gpupool_client::TokenSource::LeaseFile(path.clone());
                            Session::connect(&config)
                        }),
                }
                .map_err(|e| {
                    eprintln!("gpupool: cannot open a session on {}: {e}", target.describe());
                    CuError(e.code())
                })?;
                if !gpupool_ffi::at_exit(end_session_at_exit) {
                    tracing::warn!("cannot register an exit handler: the server keeps the session until it times out");
                }
                session.set_output_sink(Box::new(write_c_stream));
                let device = session.device();
                let attributes = crate::device::visible_attributes(&device);
                crate::hostmem::reserve_device_range(session.reserved_range());
                let mut tables = Tables { next_context: PRIMARY + 1, ..Tables::default() };
                tables.contexts.insert(PRIMARY, ContextInfo::default());
                tracing::info!(device = %device.name, backend = %device.backend, "gpupool session open");
                Ok(Runtime { session, device, attributes, tables: Mutex::new(tables) })
            })
            .as_ref()
            .map_err(|e| *e)
    }

    /// The runtime, or `CUDA_ERROR_NOT_INITIALIZED` before `cuInit`.
    pub(crate) fn get() -> CuResult<&'static Runtime> {
        match RUNTIME.get() {
            Some(Ok(rt)) => Ok(rt),
            Some(Err(e)) => Err(*e),
            None => Err(CuError::NOT_INITIALIZED),
        }
    }

    /// The runtime, requiring a current context like the driver does for
    /// calls that work on one.
    pub(crate) fn with_context() -> CuResult<&'static Runtime> {
        let rt = Self::get()?;
        current_context().ok_or(CuError::INVALID_CONTEXT)?;
        Ok(rt)
    }

    pub(crate) fn tables(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream behind a `CUstream` (null and the two special handles
    /// are the default stream).
    pub(crate) fn stream(&self, h: usize) -> CuResult<StreamId> {
        self.stream_info(h).map(|s| s.id)
    }

    /// What the application sees of a stream; the default stream has no
    /// flags and the default priority.
    pub(crate) fn stream_info(&self, h: usize) -> CuResult<StreamInfo> {
        if h <= 2 {
            let ctx = current_context().unwrap_or_else(|| handle(Tag::Context, PRIMARY));
            return Ok(StreamInfo { id: StreamId::DEFAULT, flags: 0, priority: 0, ctx });
        }
        let id = id_of(Tag::Stream, h).ok_or(CuError::INVALID_HANDLE)?;
        self.tables().streams.get(&id).copied().ok_or(CuError::INVALID_HANDLE)
    }

    pub(crate) fn event(&self, h: usize) -> CuResult<EventId> {
        let id = id_of(Tag::Event, h).ok_or(CuError::INVALID_HANDLE)?;
        self.tables().events.get(&id).copied().ok_or(CuError::INVALID_HANDLE)
    }

    /// The module behind a module or library handle.
    pub(crate) fn module(&self, h: usize, tag: Tag) -> CuResult<Module> {
        let id = id_of(tag, h).ok_or(CuError::INVALID_HANDLE)?;
        self.session.module(id as u32).ok_or_else(|| self.unusable_error(id as u32))
    }

    /// The error of an unusable library, else INVALID_HANDLE.
    pub(crate) fn unusable_error(&self, id: u32) -> CuError {
        self.tables().unusable.get(&id).map_or(CuError::INVALID_HANDLE, |(code, _)| CuError(*code))
    }

    /// The function behind a function or kernel handle, with its current
    /// (cached) attributes.
    pub(crate) fn function(&self, h: usize) -> CuResult<gpupool_client::Function> {
        let (module, index) = function_of(h)?;
        let m = self.session.module(module).ok_or_else(|| self.unusable_error(module))?;
        let info = m.functions.get(index as usize).cloned().ok_or(CuError::INVALID_HANDLE)?;
        Ok(gpupool_client::Function { module, index, info })
    }

    /// `true` when `h` names a live context.
    pub(crate) fn context_exists(&self, h: usize) -> bool {
        id_of(Tag::Context, h).is_some_and(|id| self.tables().contexts.contains_key(&id))
    }
}

/// The calling thread's current context handle. A thread whose
/// thread-local storage is already destroyed (a library's destructor
/// calling the driver while the thread exits) has none.
pub(crate) fn current_context() -> Option<usize> {
    CONTEXT_STACK.try_with(|s| s.borrow().last().copied()).ok().flatten()
}

/// Runs `f` on the calling thread's context stack, unless the thread is
/// exiting and the stack is gone already.
fn with_stack<T: Default>(f: impl FnOnce(&mut Vec<usize>) -> T) -> T {
    CONTEXT_STACK.try_with(|s| f(&mut s.borrow_mut())).unwrap_or_default()
}

/// Replaces the current context (`cuCtxSetCurrent`); `None` unsets it.
pub(crate) fn set_current_context(ctx: Option<usize>) {
    with_stack(|s| {
        s.pop();
        if let Some(c) = ctx {
            s.push(c);
        }
    });
}

pub(crate) fn push_context(ctx: usize) {
    with_stack(|s| s.push(ctx));
}

pub(crate) fn pop_context() -> Option<usize> {
    with_stack(|s| s.pop())
}

/// Removes a destroyed context from the calling thread's stack.
pub(crate) fn forget_context(ctx: usize) {
    with_stack(|s| s.retain(|&c| c != ctx));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_keep_kinds_apart() {
        let h = handle(Tag::Stream, 7);
        assert_eq!(id_of(Tag::Stream, h), Some(7));
        assert_eq!(id_of(Tag::Event, h), None);
        assert!(h > 2, "never collides with the special stream handles");
        let f = function_handle(Tag::Function, 3, 9);
        assert_eq!(function_of(f), Ok((3, 9)));
        let k = function_handle(Tag::Kernel, 3, 9);
        assert_eq!(function_of(k), Ok((3, 9)));
        assert_eq!(function_of(h), Err(CuError::INVALID_HANDLE));
        assert_eq!(function_of(0x1234), Err(CuError::INVALID_HANDLE));
    }

    #[test]
    fn context_stack_per_thread() {
        assert_eq!(current_context(), None);
        push_context(handle(Tag::Context, 1));
        push_context(handle(Tag::Context, 2));
        assert_eq!(current_context(), Some(handle(Tag::Context, 2)));
        std::thread::spawn(|| assert_eq!(current_context(), None)).join().expect("thread");
        set_current_context(Some(handle(Tag::Context, 3)));
        assert_eq!(pop_context(), Some(handle(Tag::Context, 3)));
        forget_context(handle(Tag::Context, 1));
        assert_eq!(current_context(), None);
    }
}
