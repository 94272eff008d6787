//! How busy the served GPUs are, for the balancer's placement of shared
//! leases (issue 19): each heartbeat carries, per whole GPU, the share of
//! time its driver saw a kernel running (NVML's utilization rate over the
//! driver's last sample period, 1/6 s to 1 s depending on the product).
//! MIG GPUs are left out: NVML gives no rate per instance, and a MIG
//! instance is leased exclusively anyway. Without NVML (no driver, the
//! emulated device) nothing is reported and the balancer takes the GPUs as
//! idle, placing by the shares it granted.

use gpupool_proto::balancer as pb;
use nvml_wrapper::Nvml;

/// Reads a GPU's busy share, in percent, by its `GPU-…` uuid.
pub(crate) trait BusySource: Send {
    fn busy_percent(&mut self, uuid: &str) -> Option<u32>;
}

/// The driver's view, through NVML.
pub(crate) struct NvmlBusy(Nvml);

impl NvmlBusy {
    /// NVML, when a driver is there.
    pub(crate) fn open() -> Option<Self> {
        match Nvml::init() {
            Ok(nvml) => Some(Self(nvml)),
            Err(e) => {
                tracing::debug!(error = %e, "no NVML: GPU busy time is not reported to the balancer");
                None
            }
        }
    }
}

impl BusySource for NvmlBusy {
    fn busy_percent(&mut self, uuid: &str) -> Option<u32> {
        let device = self.0.device_by_uuid(uuid).ok()?;
        device.utilization_rates().ok().map(|u| u.gpu)
    }
}

/// The busy share of every whole GPU of `gpus` that `source` knows, in
/// thousandths (at most 1000).
pub(crate) fn gpu_loads(source: &mut dyn BusySource, gpus: &[pb::Gpu]) -> Vec<pb::GpuLoad> {
    gpus.iter()
        .filter(|g| !g.mig_enabled)
        .filter_map(|g| {
            let percent = source.busy_percent(&g.uuid)?;
            Some(pb::GpuLoad { uuid: g.uuid.clone(), busy_permille: percent.min(100) * 10 })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fixed(HashMap<&'static str, u32>);

    impl BusySource for Fixed {
        fn busy_percent(&mut self, uuid: &str) -> Option<u32> {
            self.0.get(uuid).copied()
        }
    }

    fn gpu(uuid: &str, mig_enabled: bool) -> pb::Gpu {
        pb::Gpu { uuid: uuid.into(), mig_enabled, ..Default::default() }
    }

    #[test]
    fn whole_gpus_the_source_knows_are_reported_in_thousandths() {
        let mut source = Fixed(HashMap::from([("GPU-a", 37), ("GPU-b", 250), ("GPU-mig", 80)]));
        let gpus = [gpu("GPU-a", false), gpu("GPU-b", false), gpu("GPU-mig", true), gpu("GPU-unknown", false)];
        let loads = gpu_loads(&mut source, &gpus);
        let got: Vec<(&str, u32)> = loads.iter().map(|l| (l.uuid.as_str(), l.busy_permille)).collect();
        assert_eq!(got, [("GPU-a", 370), ("GPU-b", 1000)], "MIG GPUs and unknown GPUs left out, rates capped");
    }
}
