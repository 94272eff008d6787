//! CUDA backend (placeholder until the cudarc implementation lands).

use super::{Backend, BackendSession, DeviceDescription, DeviceResult, FunctionInfo, LaunchDims};
use crate::error::CallError;
use gpupool_proto::cuda;

/// A GPU (or MIG instance) driven through the CUDA driver API.
#[derive(Debug)]
pub struct CudaDevice {
    description: DeviceDescription,
}

impl CudaDevice {
    /// Opens device `ordinal` and creates its warm context.
    pub fn open(ordinal: usize) -> DeviceResult<Self> {
        Err(CallError::new(cuda::NO_DEVICE, format!("CUDA backend not built (device {ordinal})")))
    }
}

/// Session on a CUDA device.
#[derive(Debug)]
pub struct CudaSession;

impl Backend for CudaDevice {
    type Session = CudaSession;
    fn description(&self) -> &DeviceDescription {
        &self.description
    }
    fn open_session(&self, _va_size: u64) -> DeviceResult<CudaSession> {
        Err(CallError::new(cuda::NO_DEVICE, "CUDA backend not built"))
    }
}

impl BackendSession for CudaSession {
    type Mapping = ();
    type Module = ();
    type Stream = ();
    type Event = ();
    fn va_base(&self) -> u64 { 0 }
    fn map(&mut self, _: u64, _: u64) -> DeviceResult<()> { Err(nd()) }
    fn write(&mut self, _: Option<&()>, _: u64, _: &[u8]) -> DeviceResult<()> { Err(nd()) }
    fn read(&mut self, _: Option<&()>, _: u64, _: &mut [u8]) -> DeviceResult<()> { Err(nd()) }
    fn copy(&mut self, _: Option<&()>, _: u64, _: u64, _: u64) -> DeviceResult<()> { Err(nd()) }
    fn memset(&mut self, _: Option<&()>, _: u64, _: u32, _: u32, _: u64) -> DeviceResult<()> { Err(nd()) }
    fn load_module(&mut self, _: &[u8]) -> DeviceResult<((), Vec<FunctionInfo>)> { Err(nd()) }
    fn launch(&mut self, _: &(), _: usize, _: LaunchDims, _: Option<&()>, _: &[u8]) -> DeviceResult<()> { Err(nd()) }
    fn stream_create(&mut self, _: u32, _: i32) -> DeviceResult<()> { Err(nd()) }
    fn stream_synchronize(&mut self, _: Option<&()>) -> DeviceResult<()> { Err(nd()) }
    fn stream_query(&mut self, _: Option<&()>) -> DeviceResult<bool> { Err(nd()) }
    fn stream_wait_event(&mut self, _: Option<&()>, _: &()) -> DeviceResult<()> { Err(nd()) }
    fn event_create(&mut self, _: u32) -> DeviceResult<()> { Err(nd()) }
    fn event_record(&mut self, _: &mut (), _: Option<&()>) -> DeviceResult<()> { Err(nd()) }
    fn event_query(&mut self, _: &()) -> DeviceResult<bool> { Err(nd()) }
    fn event_synchronize(&mut self, _: &()) -> DeviceResult<()> { Err(nd()) }
    fn event_elapsed(&mut self, _: &(), _: &()) -> DeviceResult<f32> { Err(nd()) }
    fn synchronize(&mut self) -> DeviceResult<()> { Err(nd()) }
}

fn nd() -> CallError {
    CallError::new(cuda::NO_DEVICE, "CUDA backend not built")
}
