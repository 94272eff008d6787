//! `nvmlInit`/`nvmlShutdown` and the device handles.
//!
//! NVML counts inits: every `nvmlInit` needs its `nvmlShutdown`, and calls
//! between the last shutdown and the next init fail with
//! `NVML_ERROR_UNINITIALIZED`. The driver and the devices are set up by the
//! first init that succeeds and kept for the life of the process (a
//! [`System`] is leaked on purpose): `libcuda.so.1` stays loaded for the
//! application anyway, and a device handle is a pointer to its [`Gpu`], so
//! a handle kept across a shutdown and a new init still names the same
//! device, as with NVIDIA's NVML.
//!
//! A handle from the caller is only compared with the handles handed out,
//! never dereferenced: a stale or forged one is `NVML_ERROR_INVALID_ARGUMENT`.

use crate::driver::{Driver, LibCuda};
use crate::error::Error;
use crate::gpu::{Gpu, Memory};
use nvml_wrapper_sys::bindings::{nvmlDevice_st, nvmlDevice_t};
use std::sync::Mutex;

/// More devices than any machine has: a count above it is a driver bug.
const MAX_DEVICES: u32 = 1024;

/// The driver and its devices.
pub(crate) struct System {
    driver: Box<dyn Driver>,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub(crate) cuda_version: i32,
    pub(crate) gpus: Box<[Gpu]>,
}

impl std::fmt::Debug for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("System").field("cuda_version", &self.cuda_version).field("gpus", &self.gpus).finish()
    }
}

impl System {
    /// Initializes the driver and reads what NVML reports of each device.
    /// A driver that cannot start (for gpupool: the pool is unreachable) is
    /// `DriverNotLoaded`, as NVML says when there is no working driver.
    pub(crate) fn open(driver: Box<dyn Driver>) -> Result<System, Error> {
        driver.init().map_err(|e| Error::DriverNotLoaded(e.to_string()))?;
        let cuda_version = driver.version()?;
        let count = driver.device_count()?;
        let count = u32::try_from(count)
            .ok()
            .filter(|n| *n <= MAX_DEVICES)
            .ok_or_else(|| Error::DriverNotLoaded(format!("cuDeviceGetCount reported {count} devices")))?;
        let gpus = (0..count).map(|i| Gpu::probe(&*driver, i)).collect::<Result<Vec<_>, _>>()?.into_boxed_slice();
        Ok(System { driver, cuda_version, gpus })
    }

    /// The server's kernel driver version, as its NVML reported it (the
    /// first device's: one server drives them all); `None` where unknown.
    pub(crate) fn kernel_driver_version(&self) -> Option<String> {
        self.gpus.first().and_then(|g| g.host.kernel_driver_version())
    }

    /// The handle of a device: its address, stable for the process's life.
    pub(crate) fn handle_of(gpu: &'static Gpu) -> nvmlDevice_t {
        (gpu as *const Gpu).cast_mut().cast::<nvmlDevice_st>()
    }

    /// The device a caller's handle names, if it is one of ours.
    pub(crate) fn gpu(&self, handle: nvmlDevice_t) -> Result<&Gpu, Error> {
        self.gpus
            .iter()
            .find(|g| std::ptr::eq(*g, handle.cast::<Gpu>().cast_const()))
            .ok_or(Error::InvalidArgument("unknown device handle"))
    }

    /// The device with NVML index `index`.
    pub(crate) fn by_index(&self, index: u32) -> Result<&Gpu, Error> {
        self.gpus.get(index as usize).ok_or(Error::InvalidArgument("device index out of range"))
    }

    /// The device with this UUID text.
    pub(crate) fn by_uuid(&self, uuid: &str) -> Result<&Gpu, Error> {
        self.gpus.iter().find(|g| g.has_uuid(uuid)).ok_or(Error::NotFound)
    }

    /// The device at this PCI bus id.
    pub(crate) fn by_pci_bus_id(&self, bus_id: &str) -> Result<&Gpu, Error> {
        self.gpus.iter().find(|g| g.pci.matches(bus_id)).ok_or(Error::NotFound)
    }

    /// The device's memory now.
    pub(crate) fn memory(&self, gpu: &Gpu) -> Result<Memory, Error> {
        gpu.memory(&*self.driver)
    }
}

/// The init count and, once an init has succeeded, the system.
#[derive(Debug)]
pub(crate) struct Registry {
    refs: u32,
    system: Option<&'static System>,
}

impl Registry {
    pub(crate) const fn new() -> Registry {
        Registry { refs: 0, system: None }
    }

    /// One `nvmlInit`: opens the system with `open` the first time (and
    /// again after a failed first time), then counts.
    pub(crate) fn init(&mut self, open: impl FnOnce() -> Result<System, Error>) -> Result<&'static System, Error> {
        let system = match self.system {
            Some(s) => s,
            None => *self.system.insert(Box::leak(Box::new(open()?))),
        };
        self.refs = self.refs.checked_add(1).ok_or(Error::InvalidArgument("too many nvmlInit calls"))?;
        Ok(system)
    }

    /// One `nvmlShutdown`.
    pub(crate) fn shutdown(&mut self) -> Result<(), Error> {
        self.refs = self.refs.checked_sub(1).ok_or(Error::Uninitialized)?;
        Ok(())
    }

    /// The system, between an init and its shutdown.
    pub(crate) fn current(&self) -> Result<&'static System, Error> {
        match self.system {
            Some(s) if self.refs > 0 => Ok(s),
            _ => Err(Error::Uninitialized),
        }
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry::new());

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // A panic while holding the lock leaves the registry consistent: each
    // method changes at most one field, after its fallible steps.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// `nvmlInit`: the first one loads `libcuda.so.1` and initializes it.
/// Concurrent inits wait for the first one, which may take as long as
/// opening a session to the pool.
pub(crate) fn init() -> Result<&'static System, Error> {
    registry().init(|| System::open(Box::new(LibCuda::load()?)))
}

/// `nvmlShutdown`.
pub(crate) fn shutdown() -> Result<(), Error> {
    registry().shutdown()
}

/// The system, or `NVML_ERROR_UNINITIALIZED` outside init/shutdown.
pub(crate) fn system() -> Result<&'static System, Error> {
    registry().current()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::tests::FakeDriver;

    fn open(driver: FakeDriver) -> impl FnOnce() -> Result<System, Error> {
        move || System::open(Box::new(driver))
    }

    #[test]
    fn init_is_counted() {
        let mut r = Registry::new();
        assert_eq!(r.current().err(), Some(Error::Uninitialized));
        assert_eq!(r.shutdown(), Err(Error::Uninitialized));
        let s = r.init(open(FakeDriver::default())).expect("init");
        // Later inits reuse the system; `open` is not called again.
        let again = r.init(|| panic!("opened twice")).expect("init");
        assert!(std::ptr::eq(s, again));
        r.shutdown().expect("first shutdown");
        assert!(r.current().is_ok(), "one init is still open");
        r.shutdown().expect("second shutdown");
        assert_eq!(r.current().err(), Some(Error::Uninitialized));
        assert_eq!(r.shutdown(), Err(Error::Uninitialized));
    }

    #[test]
    fn failed_init_is_retried() {
        let mut r = Registry::new();
        let failing = FakeDriver { init_error: Some(100), ..FakeDriver::default() };
        let e = r.init(open(failing)).expect_err("cuInit fails");
        assert_eq!(e.code(), nvml_wrapper_sys::bindings::nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED);
        assert!(e.to_string().contains("cuInit"), "{e}");
        assert_eq!(r.current().err(), Some(Error::Uninitialized));
        r.init(open(FakeDriver::default())).expect("second try");
        assert_eq!(r.current().expect("open").gpus.len(), 1);
    }

    #[test]
    fn handles_are_checked() {
        let mut r = Registry::new();
        let s = r.init(open(FakeDriver { devices: 2, ..FakeDriver::default() })).expect("init");
        let h0 = System::handle_of(s.by_index(0).expect("0"));
        let h1 = System::handle_of(s.by_index(1).expect("1"));
        assert_ne!(h0, h1);
        assert_eq!(s.gpu(h0).expect("h0").index, 0);
        assert_eq!(s.gpu(h1).expect("h1").index, 1);
        assert_eq!(s.by_index(2).err(), Some(Error::InvalidArgument("device index out of range")));
        let unknown = Error::InvalidArgument("unknown device handle");
        assert_eq!(s.gpu(std::ptr::null_mut()).err(), Some(unknown.clone()));
        // One byte into a device's record is not a handle.
        assert_eq!(s.gpu(h0.cast::<u8>().wrapping_add(1).cast()).err(), Some(unknown.clone()));
        let mut local = 0u64;
        assert_eq!(s.gpu((&mut local as *mut u64).cast()).err(), Some(unknown));
        assert_eq!(s.by_uuid("GPU-00010203-0405-0607-0809-0a0b0c0d0e10").expect("uuid").index, 1);
        assert_eq!(s.by_uuid("GPU-nope").err(), Some(Error::NotFound));
        assert_eq!(s.by_pci_bus_id("00000000:1C:00.0").expect("pci").index, 1);
        assert_eq!(s.by_pci_bus_id("00000000:1D:00.0").err(), Some(Error::NotFound));
        assert_eq!(s.cuda_version, 13000);
        assert_eq!(s.memory(s.by_index(0).expect("0")).expect("memory").used, 768 << 20);
    }

    #[test]
    fn absurd_device_count_refused() {
        let e = System::open(Box::new(FakeDriver { devices: -1, ..FakeDriver::default() })).expect_err("count");
        assert!(matches!(e, Error::DriverNotLoaded(_)), "{e:?}");
    }
}
