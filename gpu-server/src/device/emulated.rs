//! The emulated device: device memory in host memory and the built-in
//! reference kernels. It stands in where no GPU exists (CI, laptops) so that
//! the whole data path runs end to end; it says so whenever it is chosen.
//! Streams complete work at once, so queries are always ready and events
//! carry host timestamps.

use super::{Backend, BackendSession, DeviceDescription, DeviceResult, FunctionInfo, LaunchDims, builtin};
use crate::error::CallError;
use gpupool_proto::cuda;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Mapping granularity of the emulated device (what an H100 reports).
pub const GRANULARITY: u64 = 2 << 20;
/// Where the first session's range starts; later sessions follow it.
const VA_START: u64 = 0x7f00_0000_0000;

/// An emulated GPU with `total_memory` bytes.
#[derive(Debug)]
pub struct EmulatedDevice {
    description: DeviceDescription,
    next_base: AtomicU64,
}

impl EmulatedDevice {
    pub fn new(total_memory: u64) -> Self {
        tracing::warn!("emulated device selected: no GPU is in use; kernels run as CPU reference code");
        let sms = 132;
        let attributes = vec![
            (1, 1024),     // MAX_THREADS_PER_BLOCK
            (2, 1024),     // MAX_BLOCK_DIM_X
            (3, 1024),     // MAX_BLOCK_DIM_Y
            (4, 64),       // MAX_BLOCK_DIM_Z
            (5, i32::MAX), // MAX_GRID_DIM_X
            (6, 65535),    // MAX_GRID_DIM_Y
            (7, 65535),    // MAX_GRID_DIM_Z
            (8, 49152),    // MAX_SHARED_MEMORY_PER_BLOCK
            (10, 32),      // WARP_SIZE
            (16, sms),     // MULTIPROCESSOR_COUNT
            (75, 9),       // COMPUTE_CAPABILITY_MAJOR
            (76, 0),       // COMPUTE_CAPABILITY_MINOR
        ];
        Self {
            description: DeviceDescription {
                name: "gpupool emulated device (no GPU)".into(),
                backend: "emulated",
                uuid: "GPU-00000000-0000-0000-0000-e30000000000".into(),
                compute_capability: (9, 0),
                multiprocessor_count: sms as u32,
                total_memory,
                granularity: GRANULARITY,
                attributes,
                driver_version: 13000,
            },
            next_base: AtomicU64::new(VA_START),
        }
    }
}

impl Backend for EmulatedDevice {
    type Session = EmulatedSession;

    fn description(&self) -> &DeviceDescription {
        &self.description
    }

    fn open_session(&self, va_size: u64) -> DeviceResult<EmulatedSession> {
        let size = va_size.div_ceil(GRANULARITY) * GRANULARITY;
        let base = self.next_base.fetch_add(size + GRANULARITY, Ordering::Relaxed);
        Ok(EmulatedSession { base, memory: Rc::default(), epoch: Instant::now() })
    }
}

type Store = Rc<RefCell<BTreeMap<u64, Vec<u8>>>>;

/// One session's memory and handles on the emulated device.
#[derive(Debug)]
pub struct EmulatedSession {
    base: u64,
    memory: Store,
    epoch: Instant,
}

/// A mapped range; dropping it releases the host memory behind it.
#[derive(Debug)]
pub struct Mapping {
    addr: u64,
    memory: Store,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.memory.borrow_mut().remove(&self.addr);
    }
}

/// A loaded module (only the built-in one exists here).
#[derive(Debug)]
pub struct Module;

/// A stream; work completes when issued.
#[derive(Debug)]
pub struct Stream;

/// An event: the host time it was last recorded.
#[derive(Debug)]
pub struct Event {
    recorded_ms: Option<f64>,
}

struct Mem<'a>(&'a Store);

impl Mem<'_> {
    fn locate(&self, addr: u64, len: usize) -> DeviceResult<(u64, usize)> {
        let map = self.0.borrow();
        let (&start, buf) = map.range(..=addr).next_back().ok_or_else(|| illegal(addr, len))?;
        let off = (addr - start) as usize;
        if off.checked_add(len).is_none_or(|end| end > buf.len()) {
            return Err(illegal(addr, len));
        }
        Ok((start, off))
    }
}

fn illegal(addr: u64, len: usize) -> CallError {
    CallError::new(cuda::ILLEGAL_ADDRESS, format!("access to {len} bytes at {addr:#x} outside mapped memory"))
}

impl builtin::Memory for Mem<'_> {
    fn load(&self, addr: u64, out: &mut [u8]) -> DeviceResult<()> {
        let (start, off) = self.locate(addr, out.len())?;
        out.copy_from_slice(&self.0.borrow()[&start][off..off + out.len()]);
        Ok(())
    }
    fn store(&mut self, addr: u64, data: &[u8]) -> DeviceResult<()> {
        let (start, off) = self.locate(addr, data.len())?;
        if let Some(buf) = self.0.borrow_mut().get_mut(&start) {
            buf[off..off + data.len()].copy_from_slice(data);
        }
        Ok(())
    }
}

impl BackendSession for EmulatedSession {
    type Mapping = Mapping;
    type Module = Module;
    type Stream = Stream;
    type Event = Event;

    fn va_base(&self) -> u64 {
        self.base
    }

    fn map(&mut self, addr: u64, size: u64) -> DeviceResult<Mapping> {
        let len = usize::try_from(size).map_err(|_| CallError::out_of_memory("mapping too large"))?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| CallError::out_of_memory(format!("cannot allocate {size} bytes of host memory")))?;
        buf.resize(len, 0);
        self.memory.borrow_mut().insert(addr, buf);
        Ok(Mapping { addr, memory: self.memory.clone() })
    }

    fn write(&mut self, _: Option<&Stream>, dst: u64, data: &[u8]) -> DeviceResult<()> {
        builtin::Memory::store(&mut Mem(&self.memory), dst, data)
    }

    fn read(&mut self, _: Option<&Stream>, src: u64, out: &mut [u8]) -> DeviceResult<()> {
        builtin::Memory::load(&Mem(&self.memory), src, out)
    }

    fn copy(&mut self, _: Option<&Stream>, dst: u64, src: u64, size: u64) -> DeviceResult<()> {
        let mut tmp = vec![0u8; size as usize];
        let mut mem = Mem(&self.memory);
        builtin::Memory::load(&mem, src, &mut tmp)?;
        builtin::Memory::store(&mut mem, dst, &tmp)
    }

    fn memset(&mut self, _: Option<&Stream>, dst: u64, value: u32, element_size: u32, count: u64) -> DeviceResult<()> {
        let pattern = &value.to_le_bytes()[..element_size as usize];
        let bytes: Vec<u8> = pattern.iter().copied().cycle().take((count * u64::from(element_size)) as usize).collect();
        builtin::Memory::store(&mut Mem(&self.memory), dst, &bytes)
    }

    fn load_module(&mut self, image: &[u8]) -> DeviceResult<(Module, Vec<FunctionInfo>)> {
        if builtin::is_builtin(image) {
            Ok((Module, builtin::functions()))
        } else {
            Err(CallError::new(
                cuda::NOT_SUPPORTED,
                "the emulated device runs only the built-in module; PTX, cubin and fatbin images need a GPU server",
            ))
        }
    }

    fn launch(
        &mut self,
        _: &Module,
        function: usize,
        dims: LaunchDims,
        _: Option<&Stream>,
        params: &[u8],
    ) -> DeviceResult<()> {
        builtin::run(function, dims, params, &mut Mem(&self.memory))
    }

    fn stream_create(&mut self, _flags: u32, _priority: i32) -> DeviceResult<Stream> {
        Ok(Stream)
    }
    fn stream_synchronize(&mut self, _: Option<&Stream>) -> DeviceResult<()> {
        Ok(())
    }
    fn stream_query(&mut self, _: Option<&Stream>) -> DeviceResult<bool> {
        Ok(true)
    }
    fn stream_wait_event(&mut self, _: Option<&Stream>, _: &Event) -> DeviceResult<()> {
        Ok(())
    }
    fn event_create(&mut self, _flags: u32) -> DeviceResult<Event> {
        Ok(Event { recorded_ms: None })
    }
    fn event_record(&mut self, event: &mut Event, _: Option<&Stream>) -> DeviceResult<()> {
        event.recorded_ms = Some(self.epoch.elapsed().as_secs_f64() * 1e3);
        Ok(())
    }
    fn event_query(&mut self, _: &Event) -> DeviceResult<bool> {
        Ok(true)
    }
    fn event_synchronize(&mut self, _: &Event) -> DeviceResult<()> {
        Ok(())
    }
    fn event_elapsed(&mut self, start: &Event, end: &Event) -> DeviceResult<f32> {
        match (start.recorded_ms, end.recorded_ms) {
            (Some(a), Some(b)) => Ok((b - a) as f32),
            _ => Err(CallError::invalid_handle("event has not been recorded")),
        }
    }
    fn synchronize(&mut self) -> DeviceResult<()> {
        Ok(())
    }
}
