//! What NVIDIA's NVML says about the GPU's host that the CUDA driver API
//! does not: the kernel driver's version and the GPU's PCIe link. A client
//! has no kernel driver and no PCIe link of its own; its NVML
//! (`libnvidia-ml.so.1` of the stub) reports the server's, as NVML on the
//! GPU's host would. Programs read them: XLA parses the driver version
//! (and logs an error for any other form) and estimates the host link's
//! bandwidth from the PCIe generation, width and speed.
//!
//! Read once per server: the supervisor reads the whole host's
//! ([`read_host`]) and hands them to its worker processes in their
//! `WorkerSpec`, so that no worker starts NVML (which takes time) before
//! its session's `Welcome`, shared workers included, which start after
//! their lease is granted. A server without a supervisor reads them when
//! it opens its device. Best effort: where NVML cannot be loaded or does
//! not know a figure, it is absent and the client's NVML answers
//! `NOT_SUPPORTED` for it.

use gpupool_proto::v1;
use nvml_wrapper::Nvml;

/// What NVML says of the host and of one of its GPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostFacts {
    /// E.g. "580.159.04"; empty where NVML could not say.
    pub(crate) kernel_driver_version: String,
    pub(crate) pcie: Option<v1::PcieLink>,
}

/// NVML's bus id for a CUDA device's PCI attributes
/// (`NVML_DEVICE_PCI_BUS_ID_FMT`), the keys of `pcie_by_bus_id`.
pub(crate) fn bus_id(domain: i32, bus: i32, device: i32) -> String {
    format!("{domain:08X}:{bus:02X}:{device:02X}.0")
}

/// A bus id as NVML may spell it (`domain:bus:device.function`, any case,
/// a 4- or 8-digit domain) in [`bus_id`]'s form; `None` if malformed.
fn canonical(text: &str) -> Option<String> {
    let hex = |s: &str| {
        if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        i64::from_str_radix(s, 16).ok()
    };
    let mut parts = text.trim().trim_end_matches('\0').split(':');
    let (domain, bus, rest) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let (device, function) = rest.split_once('.')?;
    let n = |s| hex(s).and_then(|v| i32::try_from(v).ok());
    (n(function)? == 0).then_some(())?;
    Some(bus_id(n(domain)?, n(bus)?, n(device)?))
}

/// The facts of the GPU at `bus_id` out of a host's.
pub(crate) fn pick(host: &v1::HostFacts, bus_id: &str) -> HostFacts {
    let pcie = host.pcie_by_bus_id.iter().find(|(k, _)| canonical(k).as_deref() == Some(bus_id)).map(|(_, v)| *v);
    HostFacts { kernel_driver_version: host.kernel_driver_version.clone(), pcie }
}

/// Reads the host's facts through NVML: the driver version and every
/// GPU's PCIe link. Logs (at debug) and leaves out what it cannot read.
pub(crate) fn read_host() -> v1::HostFacts {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(e) => {
            tracing::debug!(error = %e, "NVML not available: the kernel driver version and PCIe link are not reported to clients");
            return v1::HostFacts::default();
        }
    };
    let kernel_driver_version = nvml.sys_driver_version().unwrap_or_else(|e| {
        tracing::debug!(error = %e, "nvmlSystemGetDriverVersion failed");
        String::new()
    });
    let mut pcie_by_bus_id = std::collections::HashMap::new();
    for index in 0..nvml.device_count().unwrap_or(0) {
        let Ok(gpu) = nvml.device_by_index(index) else { continue };
        let Some(key) = gpu.pci_info().ok().and_then(|p| canonical(&p.bus_id)) else { continue };
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
        if link != v1::PcieLink::default() {
            pcie_by_bus_id.insert(key, link);
        }
    }
    v1::HostFacts { kernel_driver_version, pcie_by_bus_id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_in_nvml_form() {
        assert_eq!(bus_id(0, 0x1b, 0), "00000000:1B:00.0");
        assert_eq!(bus_id(1, 0xc3, 0x1f), "00000001:C3:1F.0");
        assert_eq!(canonical("00000000:1B:00.0").as_deref(), Some("00000000:1B:00.0"));
        assert_eq!(canonical("0000:1b:00.0\0\0").as_deref(), Some("00000000:1B:00.0"), "legacy, lower case");
        for bad in ["", "1B:00.0", "0:1B:00", "0:1B:00.1", "0:0:0:0.0", "x:1B:00.0", "000000000:1B:00.0"] {
            assert_eq!(canonical(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_gpus_facts_are_picked_by_its_bus_id() {
        let link = v1::PcieLink { max_generation: 5, max_width: 16, ..Default::default() };
        let host = v1::HostFacts {
            kernel_driver_version: "580.159.04".into(),
            pcie_by_bus_id: [("0000:1b:00.0".to_string(), link)].into(),
        };
        let found = pick(&host, &bus_id(0, 0x1b, 0));
        assert_eq!(found.kernel_driver_version, "580.159.04");
        assert_eq!(found.pcie, Some(link));
        assert_eq!(pick(&host, &bus_id(0, 0x1c, 0)).pcie, None, "another GPU's link is not reported");
    }

    /// On a machine without NVML (CI) nothing is known and nothing fails;
    /// on a GPU host the driver version has NVIDIA's dotted form.
    #[test]
    fn reads_what_nvml_knows() {
        let host = read_host();
        if host.kernel_driver_version.is_empty() {
            assert!(host.pcie_by_bus_id.is_empty());
        } else {
            assert!(
                host.kernel_driver_version.split('.').all(|n| n.parse::<u32>().is_ok()),
                "{}",
                host.kernel_driver_version
            );
        }
    }
}
