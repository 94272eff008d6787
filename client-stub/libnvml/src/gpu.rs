//! What NVML says about one device, derived from the CUDA driver's answers.
//!
//! The fixed facts (name, UUID, PCI address, compute capability) are read
//! once, when `nvmlInit` first succeeds, into a [`Gpu`]; memory is asked
//! for at each query, since allocations change it.

use crate::driver::{Driver, attr};
use crate::error::Error;
use gpupool_ffi::host_facts::HostFacts;
use nvml_wrapper_sys::bindings as nv;

/// A PCI address as the driver reports it (function 0: CUDA devices have
/// no other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PciAddress {
    pub(crate) domain: u32,
    pub(crate) bus: u32,
    pub(crate) device: u32,
}

impl PciAddress {
    /// NVML's bus id, `%08X:%02X:%02X.0` (`NVML_DEVICE_PCI_BUS_ID_FMT`).
    pub(crate) fn bus_id(&self) -> String {
        format!("{:08X}:{:02X}:{:02X}.0", self.domain, self.bus, self.device)
    }

    /// The legacy form with a 4-digit domain (`nvmlPciInfo_t::busIdLegacy`).
    pub(crate) fn bus_id_legacy(&self) -> String {
        format!("{:04X}:{:02X}:{:02X}.0", self.domain, self.bus, self.device)
    }

    /// Whether `text` names this address, in any form
    /// `nvmlDeviceGetHandleByPciBusId` accepts (hexadecimal numbers):
    /// `domain:bus:device.function`, `domain:bus:device` or
    /// `bus:device.function` (domain 0).
    pub(crate) fn matches(&self, text: &str) -> bool {
        parse_bus_id(text).is_some_and(|(addr, function)| addr == *self && function == 0)
    }
}

/// `(address, function)` of a bus id string, or `None` if malformed.
fn parse_bus_id(text: &str) -> Option<(PciAddress, u32)> {
    let hex = |s: &str| -> Option<u32> {
        (!s.is_empty() && s.len() <= 8).then_some(())?;
        u32::from_str_radix(s, 16).ok()
    };
    let parts: Vec<&str> = text.trim().split(':').collect();
    let (domain, bus, rest) = match parts.as_slice() {
        [d, b, rest] => (hex(d)?, hex(b)?, *rest),
        [b, rest] if rest.contains('.') => (0, hex(b)?, *rest),
        _ => return None,
    };
    let (device, function) = match rest.split_once('.') {
        Some((d, f)) => (hex(d)?, hex(f)?),
        None => (hex(rest)?, 0),
    };
    Some((PciAddress { domain, bus, device }, function))
}

/// NVML's UUID text for 16 UUID bytes:
/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower-case hexadecimal.
pub(crate) fn uuid_text(b: &[u8; 16]) -> String {
    let hex = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
}

/// NVML's architecture for a compute capability.
pub(crate) fn architecture(major: i32, minor: i32) -> nv::nvmlDeviceArchitecture_t {
    match (major, minor) {
        (3, _) => nv::NVML_DEVICE_ARCH_KEPLER,
        (5, _) => nv::NVML_DEVICE_ARCH_MAXWELL,
        (6, _) => nv::NVML_DEVICE_ARCH_PASCAL,
        (7, 5) => nv::NVML_DEVICE_ARCH_TURING,
        (7, _) => nv::NVML_DEVICE_ARCH_VOLTA,
        (8, 9) => nv::NVML_DEVICE_ARCH_ADA,
        (8, _) => nv::NVML_DEVICE_ARCH_AMPERE,
        (9, _) => nv::NVML_DEVICE_ARCH_HOPPER,
        (10..=12, _) => nv::NVML_DEVICE_ARCH_BLACKWELL,
        _ => nv::NVML_DEVICE_ARCH_UNKNOWN,
    }
}

/// CUDA cores per multiprocessor, as the CUDA samples' `_ConvertSMVer2Cores`
/// tabulates them; `None` for a capability the table does not know.
pub(crate) fn cores_per_multiprocessor(major: i32, minor: i32) -> Option<u32> {
    Some(match (major, minor) {
        (3, _) => 192,
        (5, _) => 128,
        (6, 0) => 64,
        (6, _) => 128,
        (7, _) => 64,
        (8, 0) => 64,
        (8, _) => 128,
        (9, 0) | (10, _) | (11, 0) | (12, _) => 128,
        _ => return None,
    })
}

/// The brand NVML would give, read from the marketing name. The driver API
/// has no brand; only names that say it outright map to one, the rest are
/// `NVML_BRAND_UNKNOWN` rather than a guess.
pub(crate) fn brand(name: &str) -> nv::nvmlBrandType_t {
    let upper = name.to_ascii_uppercase();
    if upper.contains("QUADRO") {
        nv::nvmlBrandType_enum_NVML_BRAND_QUADRO
    } else if upper.contains("TESLA") {
        nv::nvmlBrandType_enum_NVML_BRAND_TESLA
    } else if upper.contains("GEFORCE") {
        nv::nvmlBrandType_enum_NVML_BRAND_GEFORCE
    } else if upper.contains("TITAN") {
        nv::nvmlBrandType_enum_NVML_BRAND_TITAN
    } else {
        nv::nvmlBrandType_enum_NVML_BRAND_UNKNOWN
    }
}

/// Memory figures of `nvmlDeviceGetMemoryInfo`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Memory {
    pub(crate) total: u64,
    pub(crate) free: u64,
    pub(crate) used: u64,
}

/// One device as NVML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gpu {
    /// NVML index (= CUDA ordinal: gpupool's libcuda shows the devices of
    /// the session in one order to both).
    pub(crate) index: u32,
    /// The `CUdevice` for driver calls.
    pub(crate) dev: i32,
    pub(crate) name: String,
    /// `GPU-...` text.
    pub(crate) uuid: String,
    pub(crate) pci: PciAddress,
    pub(crate) compute_capability: (i32, i32),
    pub(crate) multiprocessors: u32,
    /// Bytes, from `cuDeviceTotalMem_v2`: for gpupool, the session's quota.
    pub(crate) total_memory: u64,
    /// What the server's NVML says of its host and this GPU's PCIe link
    /// (`gpupool_host_facts`); all unknown where libcuda cannot say.
    pub(crate) host: HostFacts,
}

impl Gpu {
    /// Reads the fixed facts of ordinal `index` from the driver.
    pub(crate) fn probe(driver: &dyn Driver, index: u32) -> Result<Gpu, Error> {
        let dev = driver.device(index as i32)?;
        let a = |attrib| driver.attribute(dev, attrib);
        // The driver reports these as non-negative ints; a negative one
        // would be a driver bug, shown as 0 rather than a huge number.
        let u = |v: i32| u32::try_from(v).unwrap_or(0);
        Ok(Gpu {
            index,
            dev,
            name: driver.name(dev)?,
            uuid: uuid_text(&driver.uuid(dev)?),
            pci: PciAddress {
                domain: u(a(attr::PCI_DOMAIN_ID)?),
                bus: u(a(attr::PCI_BUS_ID)?),
                device: u(a(attr::PCI_DEVICE_ID)?),
            },
            compute_capability: (a(attr::COMPUTE_CAPABILITY_MAJOR)?, a(attr::COMPUTE_CAPABILITY_MINOR)?),
            multiprocessors: u(a(attr::MULTIPROCESSOR_COUNT)?),
            total_memory: driver.total_mem(dev)?,
            host: match driver.host_facts(dev) {
                Ok(facts) => facts.unwrap_or_default(),
                // Not worth failing NVML for: these figures then read as
                // not supported.
                Err(e) => {
                    tracing::debug!(error = %e, "the server's host facts are not available");
                    HostFacts::default()
                }
            },
        })
    }

    /// A PCIe figure of the server's NVML, or `NOT_SUPPORTED` where it
    /// did not give it.
    pub(crate) fn pcie(&self, figure: fn(&HostFacts) -> u32) -> Result<u32, Error> {
        match figure(&self.host) {
            0 => Err(Error::NotSupported),
            v => Ok(v),
        }
    }

    /// Memory now: total is the quota, free is what `cuMemGetInfo` says is
    /// left of it, used the rest (the process's allocations and the
    /// server's own overhead, if it counts any against the quota).
    pub(crate) fn memory(&self, driver: &dyn Driver) -> Result<Memory, Error> {
        let (free, _) = driver.mem_info(self.dev)?;
        let total = self.total_memory;
        let free = free.min(total);
        Ok(Memory { total, free, used: total - free })
    }

    /// Whether `text` is this device's UUID. NVML compares the whole
    /// string; case is ignored, as hexadecimal digits may come either way.
    pub(crate) fn has_uuid(&self, text: &str) -> bool {
        self.uuid.eq_ignore_ascii_case(text.trim())
    }

    pub(crate) fn architecture(&self) -> nv::nvmlDeviceArchitecture_t {
        architecture(self.compute_capability.0, self.compute_capability.1)
    }

    /// CUDA cores, or `None` where the architecture's count per
    /// multiprocessor is not known.
    pub(crate) fn cores(&self) -> Option<u32> {
        let (major, minor) = self.compute_capability;
        cores_per_multiprocessor(major, minor).map(|c| c * self.multiprocessors)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A driver with fixed answers (those of the C fake in
    /// `tests/fake_cuda.c`, with one device per ordinal).
    #[derive(Debug)]
    pub(crate) struct FakeDriver {
        pub(crate) init_error: Option<u32>,
        pub(crate) devices: i32,
        pub(crate) free: Mutex<u64>,
    }

    impl Default for FakeDriver {
        fn default() -> Self {
            FakeDriver { init_error: None, devices: 1, free: Mutex::new(256 << 20) }
        }
    }

    impl Driver for FakeDriver {
        fn init(&self) -> Result<(), Error> {
            match self.init_error {
                Some(code) => Err(Error::Cuda { call: "cuInit", code }),
                None => Ok(()),
            }
        }
        fn version(&self) -> Result<i32, Error> {
            Ok(13000)
        }
        fn device_count(&self) -> Result<i32, Error> {
            Ok(self.devices)
        }
        fn device(&self, ordinal: i32) -> Result<i32, Error> {
            if (0..self.devices).contains(&ordinal) {
                Ok(ordinal)
            } else {
                Err(Error::Cuda { call: "cuDeviceGet", code: 101 })
            }
        }
        fn name(&self, dev: i32) -> Result<String, Error> {
            Ok(format!("Fake GPU {dev}"))
        }
        fn uuid(&self, dev: i32) -> Result<[u8; 16], Error> {
            let mut b: [u8; 16] = std::array::from_fn(|i| i as u8);
            b[15] += dev as u8;
            Ok(b)
        }
        fn total_mem(&self, _dev: i32) -> Result<u64, Error> {
            Ok(1 << 30)
        }
        fn attribute(&self, dev: i32, attrib: i32) -> Result<i32, Error> {
            Ok(match attrib {
                attr::MULTIPROCESSOR_COUNT => 132,
                attr::PCI_BUS_ID => 0x1b + dev,
                attr::PCI_DEVICE_ID | attr::PCI_DOMAIN_ID => 0,
                attr::COMPUTE_CAPABILITY_MAJOR => 9,
                attr::COMPUTE_CAPABILITY_MINOR => 0,
                _ => return Err(Error::Cuda { call: "cuDeviceGetAttribute", code: 1 }),
            })
        }
        fn mem_info(&self, _dev: i32) -> Result<(u64, u64), Error> {
            Ok((*self.free.lock().expect("lock"), 1 << 30))
        }
        fn host_facts(&self, _dev: i32) -> Result<Option<HostFacts>, Error> {
            let mut f = HostFacts { pcie_max_generation: 5, pcie_max_width: 16, ..HostFacts::default() };
            f.set_kernel_driver_version("580.159.04");
            Ok(Some(f))
        }
    }

    #[test]
    fn uuid_formatting() {
        let bytes: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(uuid_text(&bytes), "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f");
        assert_eq!(uuid_text(&[0xff; 16]), "GPU-ffffffff-ffff-ffff-ffff-ffffffffffff");
        assert_eq!(uuid_text(&bytes).len() + 1, nv::NVML_DEVICE_UUID_ASCII_LEN as usize);
    }

    #[test]
    fn bus_ids() {
        let a = PciAddress { domain: 0, bus: 0x1b, device: 0 };
        assert_eq!(a.bus_id(), "00000000:1B:00.0");
        assert_eq!(a.bus_id_legacy(), "0000:1B:00.0");
        for ok in ["00000000:1B:00.0", "0000:1b:00.0", "0:1B:0", "1B:00.0", " 00000000:1B:00.0 "] {
            assert!(a.matches(ok), "{ok}");
        }
        for bad in ["00000000:1B:00.1", "00000001:1B:00.0", "1B:00", "", "x:1B:00.0", "0:0:0:0", "000000000:1B:00.0"] {
            assert!(!a.matches(bad), "{bad}");
        }
    }

    #[test]
    fn architectures_and_cores() {
        assert_eq!(architecture(9, 0), nv::NVML_DEVICE_ARCH_HOPPER);
        assert_eq!(architecture(8, 9), nv::NVML_DEVICE_ARCH_ADA);
        assert_eq!(architecture(8, 6), nv::NVML_DEVICE_ARCH_AMPERE);
        assert_eq!(architecture(7, 5), nv::NVML_DEVICE_ARCH_TURING);
        assert_eq!(architecture(7, 0), nv::NVML_DEVICE_ARCH_VOLTA);
        assert_eq!(architecture(12, 0), nv::NVML_DEVICE_ARCH_BLACKWELL);
        assert_eq!(architecture(42, 0), nv::NVML_DEVICE_ARCH_UNKNOWN);
        assert_eq!(cores_per_multiprocessor(8, 0), Some(64));
        assert_eq!(cores_per_multiprocessor(8, 6), Some(128));
        assert_eq!(cores_per_multiprocessor(42, 0), None);
    }

    #[test]
    fn brands_only_when_named() {
        assert_eq!(brand("NVIDIA GeForce RTX 4090"), nv::nvmlBrandType_enum_NVML_BRAND_GEFORCE);
        assert_eq!(brand("Tesla V100-SXM2-16GB"), nv::nvmlBrandType_enum_NVML_BRAND_TESLA);
        assert_eq!(brand("NVIDIA H100 80GB HBM3"), nv::nvmlBrandType_enum_NVML_BRAND_UNKNOWN);
    }

    #[test]
    fn probe_and_memory() {
        let d = FakeDriver::default();
        let g = Gpu::probe(&d, 0).expect("probe");
        assert_eq!(g.name, "Fake GPU 0");
        assert_eq!(g.uuid, "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f");
        assert_eq!(g.pci.bus_id(), "00000000:1B:00.0");
        assert_eq!(g.compute_capability, (9, 0));
        assert_eq!(g.cores(), Some(132 * 128));
        assert!(g.has_uuid("GPU-00010203-0405-0607-0809-0A0B0C0D0E0F"));
        assert!(!g.has_uuid("GPU-00010203"));
        let m = g.memory(&d).expect("memory");
        assert_eq!(m, Memory { total: 1 << 30, free: 256 << 20, used: 768 << 20 });
        // A driver that says more is free than the quota cannot make used negative.
        *d.free.lock().expect("lock") = 2 << 30;
        assert_eq!(g.memory(&d).expect("memory").used, 0);
        assert!(Gpu::probe(&d, 1).is_err());
        assert_eq!(g.host.kernel_driver_version().as_deref(), Some("580.159.04"));
        assert_eq!(g.pcie(|h| h.pcie_max_generation), Ok(5));
        assert_eq!(g.pcie(|h| h.pcie_current_speed), Err(Error::NotSupported));
    }
}
