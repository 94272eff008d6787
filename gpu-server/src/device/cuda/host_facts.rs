//! What NVIDIA's NVML says about the GPU's host that the CUDA driver API
//! does not: the kernel driver's version and the GPU's PCIe link. A client
//! has no kernel driver and no PCIe link of its own; its NVML
//! (`libnvidia-ml.so.1` of the stub) reports the server's, as NVML on the
//! GPU's host would. Programs read them: XLA parses the driver version
//! (and logs an error for any other form) and estimates the host link's
//! bandwidth from the PCIe generation, width and speed.
//!
//! Read once, when the device is opened (a worker process opens its device
//! before it is handed a session, so no client waits for NVML's start).
//! Best effort: where NVML cannot be loaded or does not know a figure, the
//! figure is absent and the client's NVML answers `NOT_SUPPORTED` for it,
//! as it did before.

use gpupool_proto::v1;
use nvml_wrapper::Nvml;

/// What NVML says of the host and of the GPU at PCI address `bus_id`
/// (`domain:bus:device.function`, hexadecimal).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostFacts {
    /// E.g. "580.159.04"; empty where NVML could not say.
    pub(crate) kernel_driver_version: String,
    pub(crate) pcie: Option<v1::PcieLink>,
}

/// NVML's bus id for a CUDA device's PCI attributes
/// (`NVML_DEVICE_PCI_BUS_ID_FMT`).
pub(crate) fn bus_id(domain: i32, bus: i32, device: i32) -> String {
    format!("{domain:08X}:{bus:02X}:{device:02X}.0")
}

/// Reads the facts through NVML; logs (at debug) and leaves out what it
/// cannot read.
pub(crate) fn read(bus_id: &str) -> HostFacts {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(e) => {
            tracing::debug!(error = %e, "NVML not available: the kernel driver version and PCIe link are not reported to clients");
            return HostFacts::default();
        }
    };
    let kernel_driver_version = nvml.sys_driver_version().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "nvmlSystemGetDriverVersion failed");
        String::new()
    });
    let pcie = match nvml.device_by_pci_bus_id(bus_id) {
        Ok(gpu) => {
            // Each figure on its own: a GPU may answer some and not others.
            let figure = |name: &str, got: Result<u32, nvml_wrapper::error::NvmlError>| {
                got.unwrap_or_else(|e| {
                    tracing::debug!(query = name, error = %e, "NVML PCIe query failed");
                    0
                })
            };
            let link = v1::PcieLink {
                max_generation: figure("max_pcie_link_gen", gpu.max_pcie_link_gen()),
                max_width: figure("max_pcie_link_width", gpu.max_pcie_link_width()),
                current_generation: figure("current_pcie_link_gen", gpu.current_pcie_link_gen()),
                current_width: figure("current_pcie_link_width", gpu.current_pcie_link_width()),
                max_speed: figure("max_pcie_link_speed", gpu.max_pcie_link_speed().map(|s| s.as_c())),
                current_speed: figure("pcie_link_speed", gpu.pcie_link_speed()),
            };
            (link != v1::PcieLink::default()).then_some(link)
        }
        Err(e) => {
            tracing::debug!(bus_id, error = %e, "NVML does not know the CUDA device's PCI address");
            None
        }
    };
    HostFacts { kernel_driver_version, pcie }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_in_nvml_form() {
        assert_eq!(bus_id(0, 0x1b, 0), "00000000:1B:00.0");
        assert_eq!(bus_id(1, 0xc3, 0x1f), "00000001:C3:1F.0");
    }

    /// On a machine without NVML (CI) nothing is known and nothing fails;
    /// on a GPU host the driver version has NVIDIA's dotted form.
    #[test]
    fn reads_what_nvml_knows() {
        let facts = read("00000000:00:00.0");
        if facts.kernel_driver_version.is_empty() {
            assert_eq!(facts.pcie, None);
        } else {
            assert!(
                facts.kernel_driver_version.split('.').all(|n| n.parse::<u32>().is_ok()),
                "{}",
                facts.kernel_driver_version
            );
        }
    }
}
