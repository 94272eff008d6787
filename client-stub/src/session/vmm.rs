//! The application's virtual memory management on a [`Session`]: checked
//! against the address space's tables here and queued, no round trip (see
//! `alloc::vmm`).

use super::Session;
use crate::alloc::AllocationId;
use crate::error::{ClientError, Result};
use gpupool_proto::v1::call_result::Value;

impl Session {
    /// The session's mapping granularity (`cuMemGetAllocationGranularity`).
    pub fn granularity(&self) -> u64 {
        self.lock().space.granularity()
    }

    /// `cuMemAddressReserve`, no round trip.
    pub fn address_reserve(&self, size: u64, alignment: u64, hint: u64) -> Result<u64> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        st.space.reserve(size, alignment, hint)
    }

    /// `cuMemAddressFree`, no round trip.
    pub fn address_free(&self, addr: u64, size: u64) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        st.space.unreserve(addr, size)
    }

    /// `cuMemCreate`: the handle is chosen here and the quota checked here
    /// (an over-quota request fails at once); the creation is queued.
    pub fn mem_create(&self, size: u64) -> Result<AllocationId> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let (handle, op) = st.space.create(size, false)?;
        self.enqueue(&mut st, op)?;
        Ok(handle)
    }

    /// `cuMemCreate` asking for compressible memory: the one creation that
    /// waits, for the server's driver to say whether it granted compression
    /// (`cuMemGetAllocationPropertiesFromHandle` reports it, and programs
    /// check it). A refusal takes the handle and its quota back.
    pub fn mem_create_compressible(&self, size: u64) -> Result<AllocationId> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let (handle, op) = st.space.create(size, true)?;
        match self.call(&mut st, op) {
            Ok(Some(Value::Compressed(granted))) => {
                st.space.set_compressed(handle, granted);
                Ok(handle)
            }
            Ok(other) => {
                st.space.forget_created(handle);
                Err(ClientError::Protocol(format!("unexpected compressible allocation result {other:?}")))
            }
            Err(e) => {
                st.space.forget_created(handle);
                Err(e)
            }
        }
    }

    /// Whether a live allocation handle's memory is compressible.
    pub fn allocation_compressed(&self, handle: AllocationId) -> Option<bool> {
        self.lock().space.allocation_compressed(handle)
    }

    /// Records the shareable handle types requested for `handle`.
    pub fn set_allocation_handle_types(&self, handle: AllocationId, types: u32) {
        self.lock().space.set_handle_types(handle, types);
    }

    /// The shareable handle types requested for a live allocation handle.
    pub fn allocation_handle_types(&self, handle: AllocationId) -> Option<u32> {
        self.lock().space.allocation_handle_types(handle)
    }

    /// `cuMemRelease`, queued.
    pub fn mem_release(&self, handle: AllocationId) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let op = st.space.release(handle)?;
        self.enqueue(&mut st, op)
    }

    /// `cuMemRetainAllocationHandle`, queued.
    pub fn mem_retain(&self, addr: u64) -> Result<AllocationId> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let (handle, op) = st.space.retain(addr)?;
        self.enqueue(&mut st, op)?;
        Ok(handle)
    }

    /// Size of a live allocation handle.
    pub fn allocation_size(&self, handle: AllocationId) -> Option<u64> {
        self.lock().space.allocation_size(handle)
    }

    /// `cuMemMap`, queued.
    pub fn mem_map(&self, addr: u64, size: u64, offset: u64, handle: AllocationId) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let op = st.space.map(addr, size, offset, handle)?;
        self.enqueue(&mut st, op)
    }

    /// `cuMemUnmap`, queued (the server waits for the work using it).
    pub fn mem_unmap(&self, addr: u64, size: u64) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let op = st.space.unmap(addr, size)?;
        self.enqueue(&mut st, op)
    }

    /// `cuMemSetAccess` for the session's device, queued.
    pub fn mem_set_access(&self, addr: u64, size: u64, flags: u32) -> Result<()> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let op = st.space.set_access(addr, size, flags)?;
        self.enqueue(&mut st, op)
    }

    /// `cuMemGetAccess`: the flags of the mapping containing `addr`.
    pub fn mem_access(&self, addr: u64) -> Option<u32> {
        self.lock().space.access_of(addr)
    }
}
