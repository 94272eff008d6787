//! Mapped host memory: `cuMemHostAlloc` and `cuMemHostRegister` with
//! `DEVICEMAP`, `cuMemHostGetDevicePointer`.
//!
//! A GPU in another machine cannot reach this process's memory, so each
//! mapped range lives twice: here, and in device memory of the session
//! that kernels use; the client core mirrors the two (`Session::mirror_add`:
//! host writes travel before later calls, device writes come back when a
//! synchronizing call returns). Coherent at synchronization points, which
//! is what programs that follow CUDA's rules for mapped memory rely on;
//! a kernel polling a flag the host sets while it runs does not see it.
//!
//! `cuMemHostAlloc` places the host pages at the device range's own
//! address (inside the session's range, reserved in this process), so the
//! host pointer is the device pointer, as unified addressing promises.
//! Registered memory keeps the program's address; its device pointer is
//! the mirror's (`CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM` reads 0).
//!
//! Managed memory (`cuMemAllocManaged`, `managed.rs`) is the same
//! arrangement with one address for both halves, always. So are
//! `__managed__` module variables ([`managed_global`]), at the address the
//! server's driver gave them.

use crate::abi::{CuError, CuResult};
use crate::hostmem::{self, PAGE};
use crate::runtime::Runtime;
use gpupool_client::MirrorHost;

/// One mapped range.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mapped {
    pub(crate) size: usize,
    /// The device half's address.
    pub(crate) device: u64,
    /// The device allocation holding it (`cuMemAlloc`'s address).
    alloc: u64,
    /// How the host half was made.
    host: HostPages,
    /// Managed memory (`cuMemAllocManaged`): the advice given so far.
    pub(crate) managed: Option<Advice>,
}

/// What a program said about a managed range (`cuMemAdvise`,
/// `cuMemPrefetchAsync`), answered back by `cuMemRangeGetAttribute`. The
/// mirror keeps both halves coherent at synchronization whatever it says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Advice {
    pub(crate) read_mostly: bool,
    /// Preferred location: device ordinal, or -1 for the host.
    pub(crate) preferred: Option<i32>,
    pub(crate) accessed_by_device: bool,
    pub(crate) accessed_by_host: bool,
    /// Last prefetch target: device ordinal, or -1 for the host.
    pub(crate) last_prefetch: Option<i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostPages {
    /// Pages at the device address (`map_fixed`), `len` bytes.
    AtDevice { len: usize },
    /// A heap allocation (when the device range is not reserved here).
    Heap,
    /// The program's own memory (`cuMemHostRegister`).
    Registered,
}

/// Host memory at a fixed address that the program may write at any time:
/// read and written with raw copies, never through references.
#[derive(Debug)]
struct HostSpan {
    ptr: usize,
    len: usize,
}

impl MirrorHost for HostSpan {
    fn size(&self) -> usize {
        self.len
    }

    fn read(&self, out: &mut [u8]) {
        let n = out.len().min(self.len);
        // SAFETY: `[ptr, ptr + len)` stays mapped while the mirror exists
        // (it is removed before the pages are freed or unregistered).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr as *const u8, out.as_mut_ptr(), n) };
    }

    fn write(&self, offset: usize, data: &[u8]) {
        if offset.checked_add(data.len()).is_none_or(|end| end > self.len) {
            return;
        }
        // SAFETY: as in `read`; the range was checked above.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (self.ptr + offset) as *mut u8, data.len()) };
    }
}

/// `cuMemHostAlloc` with `DEVICEMAP`: the host pointer.
pub(crate) fn alloc(rt: &Runtime, size: usize) -> CuResult<usize> {
    alloc_mirrored(rt, size, None)
}

/// `cuMemAllocManaged`: one address for the host and the device half.
pub(crate) fn alloc_managed(rt: &Runtime, size: usize) -> CuResult<usize> {
    alloc_mirrored(rt, size, Some(Advice::default()))
}

/// Managed memory must have its host pages at the device address.
const OUT_OF_MEMORY: CuError = CuError(2);

fn alloc_mirrored(rt: &Runtime, size: usize, managed: Option<Advice>) -> CuResult<usize> {
    if size == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let len = size.checked_next_multiple_of(PAGE).ok_or(CuError(2))?;
    // One spare page: the device half starts at a page boundary.
    let alloc = rt.session.mem_alloc((len + PAGE) as u64)?;
    let device = (alloc as usize).next_multiple_of(PAGE);
    let (ptr, host) = if hostmem::map_fixed(device, len).is_ok() {
        (device, HostPages::AtDevice { len })
    } else if managed.is_some() {
        let _ = rt.session.mem_free(alloc);
        return Err(OUT_OF_MEMORY);
    } else {
        match hostmem::alloc(len) {
            Ok(p) => (p as usize, HostPages::Heap),
            Err(e) => {
                let _ = rt.session.mem_free(alloc);
                return Err(e);
            }
        }
    };
    let mapped = Mapped { size, device: device as u64, alloc, host, managed };
    if let Err(e) = rt.session.mirror_add(device as u64, Box::new(HostSpan { ptr, len: size })) {
        release_pages(ptr, mapped);
        let _ = rt.session.mem_free(alloc);
        return Err(e.into());
    }
    rt.tables().mapped.insert(ptr, mapped);
    tracing::debug!(size, ptr = format_args!("{ptr:#x}"), "mapped host memory allocated");
    Ok(ptr)
}

/// `cuMemHostRegister` with `DEVICEMAP` of the program's `[ptr, ptr + size)`.
pub(crate) fn register(rt: &Runtime, ptr: usize, size: usize) -> CuResult {
    let alloc = rt.session.mem_alloc(size as u64)?;
    if let Err(e) = rt.session.mirror_add(alloc, Box::new(HostSpan { ptr, len: size })) {
        let _ = rt.session.mem_free(alloc);
        return Err(e.into());
    }
    let mapped = Mapped { size, device: alloc, alloc, host: HostPages::Registered, managed: None };
    rt.tables().mapped.insert(ptr, mapped);
    Ok(())
}

/// Ends the mapping that starts at host address `ptr`, if there is one:
/// `Some` with its size. Host pages this module made are freed.
pub(crate) fn release(rt: &Runtime, ptr: usize) -> CuResult<Option<usize>> {
    let Some(m) = rt.tables().mapped.remove(&ptr) else { return Ok(None) };
    // The mirror goes first: it reads the host pages until then.
    let removed = rt.session.mirror_remove(m.device);
    release_pages(ptr, m);
    rt.session.mem_free(m.alloc)?;
    removed?;
    Ok(Some(m.size))
}

fn release_pages(ptr: usize, m: Mapped) {
    match m.host {
        HostPages::AtDevice { len } => hostmem::unmap_fixed(ptr, len),
        // SAFETY: allocated by `hostmem::alloc` with this page-rounded size.
        HostPages::Heap => unsafe { hostmem::free(ptr as *mut u8, m.size.next_multiple_of(PAGE)) },
        HostPages::Registered => {}
    }
}

/// The managed allocation holding `[ptr, ptr + count)`: its start and
/// mapping.
pub(crate) fn managed_range(rt: &Runtime, ptr: usize, count: usize) -> Option<(usize, Mapped)> {
    let t = rt.tables();
    let (&start, m) = t.mapped.range(..=ptr).next_back()?;
    let end = ptr.checked_add(count)?;
    (m.managed.is_some() && end <= start + m.size).then_some((start, *m))
}

/// Changes the advice of the managed allocation starting at `start`.
pub(crate) fn advise(rt: &Runtime, start: usize, f: impl FnOnce(&mut Advice)) {
    if let Some(a) = rt.tables().mapped.get_mut(&start).and_then(|m| m.managed.as_mut()) {
        f(a);
    }
}

/// Whether device address `addr` is the device half of a mapped (or
/// managed) range.
pub(crate) fn mirrors(rt: &Runtime, addr: u64) -> bool {
    rt.tables().mapped.values().any(|m| m.device <= addr && addr - m.device < m.size as u64)
}

/// `cuMemHostGetDevicePointer`: the device address of host address `ptr`
/// inside a mapped range.
pub(crate) fn device_pointer(rt: &Runtime, ptr: usize) -> CuResult<u64> {
    // Pinned memory in a host region the server maps at the same address:
    // the device reaches it there, as under unified addressing natively.
    if rt.session.pinned_device_addressable(ptr, 1) {
        return Ok(ptr as u64);
    }
    let t = rt.tables();
    let (&start, m) = t.mapped.range(..=ptr).next_back().ok_or(CuError::INVALID_VALUE)?;
    if ptr >= start + m.size {
        return Err(CuError::INVALID_VALUE);
    }
    Ok(m.device + (ptr - start) as u64)
}

/// The host halves of `__managed__` module variables. The server's driver
/// puts each in managed memory at an address of its choosing, and the CUDA
/// runtime gives the program that address to read and write directly
/// (`cuLibraryGetManaged`, `cuModuleGetGlobal`). So each variable gets host
/// pages at that same address in this process and a mirror, as managed
/// allocations do. Pages are shared by the variables on them and go when
/// the last of those goes with its module.
#[derive(Debug, Default)]
pub(crate) struct ManagedGlobals {
    /// Variable address -> (module id, size).
    vars: std::collections::BTreeMap<u64, (u32, usize)>,
    /// Host pages made for them -> how many variables lie on each.
    pages: std::collections::BTreeMap<usize, u32>,
}

/// The pages `[addr, addr + size)` touches.
fn pages_of(addr: usize, size: usize) -> impl Iterator<Item = usize> {
    let first = addr - addr % PAGE;
    (first..addr + size).step_by(PAGE)
}

/// Gives the managed variable `g` of module `module` its host half and
/// mirror, once: pages at its address holding the device's bytes (its
/// initial value), kept coherent at synchronization from then on. Fails
/// with `OUT_OF_MEMORY` where this process already uses that address.
pub(crate) fn managed_global(rt: &Runtime, module: u32, g: gpupool_client::Global) -> CuResult {
    if !g.managed || g.size == 0 {
        return Ok(());
    }
    let addr = usize::try_from(g.addr).map_err(|_| CuError::INVALID_VALUE)?;
    let size = usize::try_from(g.size).map_err(|_| CuError::INVALID_VALUE)?;
    addr.checked_add(size).and_then(|end| end.checked_next_multiple_of(PAGE)).ok_or(CuError::INVALID_VALUE)?;
    {
        let mut t = rt.tables();
        let globals = &mut t.managed_globals;
        if globals.vars.contains_key(&g.addr) {
            return Ok(());
        }
        let mut made = Vec::new();
        for page in pages_of(addr, size).filter(|p| !globals.pages.contains_key(p)) {
            if let Err(e) = hostmem::map_exact(page, PAGE) {
                made.into_iter().for_each(|p| hostmem::unmap_exact(p, PAGE));
                tracing::debug!(
                    addr = format_args!("{addr:#x}"),
                    size,
                    "this process already has memory at a managed variable's address"
                );
                return Err(e);
            }
            made.push(page);
        }
        for page in pages_of(addr, size) {
            *globals.pages.entry(page).or_insert(0) += 1;
        }
        globals.vars.insert(g.addr, (module, size));
    }
    // SAFETY: the pages under `[addr, addr + size)` were mapped above and
    // the program has not been given the address yet.
    let host = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, size) };
    let mirrored = rt
        .session
        .memcpy_dtoh(host, g.addr, gpupool_client::StreamId::DEFAULT)
        .and_then(|()| rt.session.mirror_add(g.addr, Box::new(HostSpan { ptr: addr, len: size })));
    if let Err(e) = mirrored {
        forget_global(rt, g.addr);
        return Err(e.into());
    }
    tracing::debug!(addr = format_args!("{addr:#x}"), size, "managed module variable mirrored");
    Ok(())
}

/// Drops the host half of the managed variable at `addr` (its mirror is
/// gone or never made): pages no other variable uses are unmapped.
fn forget_global(rt: &Runtime, addr: u64) {
    let mut t = rt.tables();
    let globals = &mut t.managed_globals;
    let Some((_, size)) = globals.vars.remove(&addr) else { return };
    for page in pages_of(addr as usize, size) {
        if let Some(n) = globals.pages.get_mut(&page) {
            *n -= 1;
            if *n == 0 {
                globals.pages.remove(&page);
                hostmem::unmap_exact(page, PAGE);
            }
        }
    }
}

/// Module `module` was unloaded (its variables' mirrors with it): the host
/// halves of its managed variables go.
pub(crate) fn module_unloaded(rt: &Runtime, module: u32) {
    let gone: Vec<u64> =
        rt.tables().managed_globals.vars.iter().filter(|(_, (m, _))| *m == module).map(|(&a, _)| a).collect();
    for addr in gone {
        forget_global(rt, addr);
    }
}
