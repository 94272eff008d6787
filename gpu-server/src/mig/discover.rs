//! What a server can serve: whole GPUs where MIG is off, MIG devices where it is on.

use super::profiles::GpuModel;
use super::{GpuInfo, GpuInstanceInfo, MigControl, MigError};

/// A GPU and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedGpu {
    /// NVML index.
    pub index: u32,
    /// `GPU-…` UUID.
    pub uuid: String,
    /// NVML name.
    pub name: String,
    /// Total memory in bytes.
    pub memory: u64,
    /// SMs of the whole GPU; 0 when NVML cannot tell (a model without a table, MIG off):
    /// the server then takes CUDA's `MULTIPROCESSOR_COUNT`.
    pub sms: u32,
    /// MIG mode is on now.
    pub mig: bool,
    /// What workers can be bound to: the whole GPU (MIG off) or one entry per MIG device.
    pub instances: Vec<ServedInstance>,
}

/// One thing a worker can be bound to: a whole GPU or a MIG device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedInstance {
    /// UUID: the GPU's (`GPU-…`) for a whole GPU, the MIG device's (`MIG-…`) otherwise.
    pub uuid: String,
    /// GPU-instance profile id and name, for MIG devices (the name is the table's for known
    /// models, `"profile-<id>"` for others).
    pub profile: Option<(u32, String)>,
    /// Memory in bytes.
    pub memory: u64,
    /// SMs; 0 when unknown (as for [`ServedGpu::sms`]).
    pub sms: u32,
    /// Memory slices `(start, size)` of the GPU instance, for MIG devices. (Which GPU and
    /// compute instance a MIG UUID is: [`MigControl::mig_devices`].)
    pub placement: Option<(u32, u32)>,
    /// What to put in `CUDA_VISIBLE_DEVICES` for a worker bound to this instance (set
    /// before `cuInit`): the MIG UUID itself (it starts with `MIG-`) or the GPU's UUID.
    pub visible_devices: String,
}

impl ServedInstance {
    /// Whether this is a MIG device rather than a whole GPU.
    pub fn is_mig(&self) -> bool {
        self.profile.is_some()
    }
}

/// Lists every GPU and what it serves: one whole-GPU instance when MIG is off (or not
/// supported), one instance per MIG device when MIG is on. GPU instances without a
/// compute instance have no MIG device and are not served (logged). A GPU that fails
/// to answer is logged and left out, so one lost GPU does not take the others down;
/// only a failure to list GPUs at all is an error.
pub fn discover(ctl: &dyn MigControl) -> Result<Vec<ServedGpu>, MigError> {
    let mut out = Vec::new();
    for gpu in ctl.gpus()? {
        match served(ctl, &gpu) {
            Ok(s) => out.push(s),
            Err(e) => tracing::error!(gpu = gpu.index, uuid = %gpu.uuid, error = %e, "cannot read GPU; not serving it"),
        }
    }
    Ok(out)
}

fn served(ctl: &dyn MigControl, gpu: &GpuInfo) -> Result<ServedGpu, MigError> {
    let mig = gpu.mig_enabled();
    if let Some(m) = gpu.mig.filter(|m| m.current != m.pending) {
        tracing::warn!(
            gpu = gpu.index,
            current = m.current,
            pending = m.pending,
            "MIG mode change pending a GPU reset"
        );
    }
    let instances = if mig { mig_instances(ctl, gpu)? } else { vec![whole(gpu)] };
    if mig && instances.is_empty() {
        tracing::warn!(gpu = gpu.index, "MIG is on but there is no MIG device: this GPU serves nothing");
    }
    Ok(ServedGpu {
        index: gpu.index,
        uuid: gpu.uuid.clone(),
        name: gpu.name.clone(),
        memory: gpu.memory_bytes,
        sms: gpu.sms.unwrap_or(0),
        mig,
        instances,
    })
}

fn whole(gpu: &GpuInfo) -> ServedInstance {
    ServedInstance {
        uuid: gpu.uuid.clone(),
        profile: None,
        memory: gpu.memory_bytes,
        sms: gpu.sms.unwrap_or(0),
        placement: None,
        visible_devices: gpu.uuid.clone(),
    }
}

fn mig_instances(ctl: &dyn MigControl, gpu: &GpuInfo) -> Result<Vec<ServedInstance>, MigError> {
    let model = gpu.model();
    let gis = ctl.gpu_instances(gpu.index)?;
    let devices = ctl.mig_devices(gpu.index)?;
    for gi in gis.iter().filter(|gi| !devices.iter().any(|d| d.gpu_instance_id == gi.id)) {
        tracing::warn!(
            gpu = gpu.index,
            gpu_instance = gi.id,
            profile = gi.profile_id,
            placement = %gi.placement,
            "GPU instance has no compute instance: not served (the MIG planner completes it)"
        );
    }
    let mut out: Vec<ServedInstance> = devices
        .into_iter()
        .map(|d| {
            let gi: Option<&GpuInstanceInfo> = gis.iter().find(|g| g.id == d.gpu_instance_id);
            let table = gi.and_then(|g| model.and_then(|m: GpuModel| m.profile_by_id(g.profile_id)));
            let profile = gi
                .map(|g| (g.profile_id, table.map_or_else(|| format!("profile-{}", g.profile_id), |p| p.name.into())));
            let visible_devices = if d.uuid.starts_with("MIG-") { d.uuid.clone() } else { format!("MIG-{}", d.uuid) };
            ServedInstance {
                visible_devices,
                uuid: d.uuid,
                profile,
                memory: d.memory_bytes,
                sms: d.sms.or(table.map(|p| p.sms)).unwrap_or(0),
                placement: gi.map(|g| (g.placement.start, g.placement.size)),
            }
        })
        .collect();
    // By position on the chip, then UUID: a stable order for the balancer.
    out.sort_by(|a, b| (a.placement, &a.uuid).cmp(&(b.placement, &b.uuid)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{Placement, RealNvml, SimulatedNvml};
    use super::*;

    #[test]
    fn mig_off_serves_the_whole_gpu() {
        let sim = SimulatedNvml::from_spec("h100-80gb,a100-40gb").unwrap();
        let served = discover(&sim).unwrap();
        assert_eq!(served.len(), 2);
        for g in &served {
            assert!(!g.mig);
            assert_eq!(g.instances.len(), 1);
            let i = &g.instances[0];
            assert_eq!(i.uuid, g.uuid);
            assert_eq!(i.visible_devices, g.uuid);
            assert_eq!(i.memory, g.memory);
            assert!(!i.is_mig() && i.profile.is_none() && i.placement.is_none());
        }
        assert_eq!(served[0].sms, 132);
        assert_eq!(served[1].sms, 108);
    }

    #[test]
    fn mig_on_serves_each_mig_device() {
        let sim = SimulatedNvml::from_spec("h200:mig=3g.71gb+2g.35gb+1g.18gb+1g.18gb,h100:mig").unwrap();
        // A GPU instance without compute instance is not served.
        let lone = sim.create_gpu_instance(1, 9, Placement::new(0, 4)).unwrap();
        let served = discover(&sim).unwrap();
        let g = &served[0];
        assert!(g.mig);
        let names: Vec<_> = g.instances.iter().map(|i| i.profile.clone().unwrap().1).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, ["1g.18gb", "1g.18gb", "2g.35gb", "3g.71gb"]);
        for i in &g.instances {
            assert!(i.is_mig());
            assert!(i.uuid.starts_with("MIG-"));
            assert_eq!(i.visible_devices, i.uuid);
            assert_ne!(i.uuid, g.uuid);
            let p = GpuModel::H200_141GB.profile_by_name(&i.profile.as_ref().unwrap().1).unwrap();
            assert_eq!(i.sms, p.sms);
            assert_eq!(i.memory, p.memory_bytes);
            let (start, size) = i.placement.unwrap();
            assert!(p.allows(Placement::new(start, size)));
        }
        assert!(served[1].mig);
        assert!(served[1].instances.is_empty(), "{:?} has no compute instance", lone);
        sim.create_compute_instance(1, lone.id).unwrap();
        let served = discover(&sim).unwrap();
        assert_eq!(served[1].instances.len(), 1);
        assert_eq!(served[1].instances[0].profile, Some((9, "3g.40gb".into())));
    }

    #[test]
    #[ignore = "needs a GPU and NVML: run on the GPU machine"]
    fn real_nvml_discovers_whole_gpu() {
        let nvml = RealNvml::open().expect("NVML and a GPU");
        let served = discover(&nvml).unwrap();
        assert!(!served.is_empty(), "no GPU found");
        for g in &served {
            println!("GPU {} {} {} memory {} B sms {:?} mig {}", g.index, g.uuid, g.name, g.memory, g.sms, g.mig);
            for i in &g.instances {
                println!("  instance {i:?}");
            }
            assert!(!g.name.is_empty());
            assert!(g.memory > 0);
            if !g.mig {
                assert_eq!(g.instances.len(), 1);
                assert_eq!(g.instances[0].uuid, g.uuid);
                assert_eq!(g.instances[0].visible_devices, g.uuid);
                assert!(g.instances[0].memory > 0);
            }
            // Read-only probes of the raw calls; they change nothing.
            let info = nvml.gpu(g.index).unwrap();
            println!("  mig mode {:?} model {:?}", info.mig, info.model());
            if let Some(model) = info.model() {
                for p in model.profiles() {
                    match nvml.possible_placements(g.index, p.id) {
                        Ok(pl) => {
                            println!("  {} (id {}) placements {pl:?}", p.name, p.id);
                            // Seen on an H100 with MIG off: NVML's list is exactly the table's.
                            if !pl.is_empty() {
                                assert_eq!(pl, p.placements().collect::<Vec<_>>(), "{}", p.name);
                            }
                        }
                        Err(e) => println!("  {} (id {}) placements: {e}", p.name, p.id),
                    }
                }
            }
            if !g.mig {
                assert!(matches!(nvml.gpu_instances(g.index), Err(MigError::NotSupported { .. })));
                assert!(nvml.mig_devices(g.index).unwrap().is_empty());
            }
        }
    }
}
