//! A simulated NVML MIG topology built from the profile tables.
//!
//! MIG mode cannot be toggled on the lent H100, so every MIG code path is
//! exercised here instead: GPUs of known models, MIG on or off, instances that
//! occupy memory slices, and the failures NVML gives (overlap or disallowed
//! placement: insufficient resources; MIG off: not supported; a GPU instance
//! with processes or with compute instances left: in use). UUIDs are fake but
//! deterministic: the same sequence of calls yields the same UUIDs, and a
//! re-created instance gets a new one, as on real hardware.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::profiles::{GiProfile, GpuModel, Layout, Placement};
use super::{ComputeInstanceInfo, GpuInfo, GpuInstanceInfo, MigControl, MigDeviceInfo, MigError, MigMode};

/// One GPU of a simulated topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimGpuSpec {
    /// Model (decides name, memory, SMs and profile table).
    pub model: GpuModel,
    /// MIG mode on.
    pub mig: bool,
    /// Profile names to create at start, each as a GPU instance with a full compute
    /// instance (needs `mig`); placed by [`Layout::plan`].
    pub layout: Vec<String>,
}

impl SimGpuSpec {
    /// A GPU of `model` with MIG on or off and no instances.
    pub fn new(model: GpuModel, mig: bool) -> Self {
        Self { model, mig, layout: Vec::new() }
    }

    /// The same GPU, with MIG on and these instances created at start.
    pub fn with_layout<S: AsRef<str>>(mut self, names: &[S]) -> Self {
        self.mig = true;
        self.layout = names.iter().map(|n| n.as_ref().to_owned()).collect();
        self
    }
}

/// A simulated NVML MIG topology; see the module doc.
#[derive(Debug)]
pub struct SimulatedNvml {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Namespace of this topology's UUIDs, so that two simulated servers
    /// (or two runs of one) never share a UUID, as real GPUs never do.
    host: u32,
    gpus: Vec<SimGpu>,
    /// Mutating calls that may still succeed before one fails (fault injection).
    fail_after: Option<usize>,
    /// Successful mutating calls so far.
    mutations: u64,
}

#[derive(Debug)]
struct SimGpu {
    model: GpuModel,
    mig: bool,
    uuid: String,
    gis: BTreeMap<u32, SimGi>,
    /// Counter behind MIG UUIDs, so re-created instances get new ones.
    serial: u64,
}

#[derive(Debug)]
struct SimGi {
    profile: &'static GiProfile,
    placement: Placement,
    busy: bool,
    cis: BTreeMap<u32, SimCi>,
}

#[derive(Debug)]
struct SimCi {
    uuid: String,
    profile_id: u32,
}

/// `prefix-…` in the 8-4-4-4-12 UUID shape, from the topology's namespace
/// and two numbers.
fn fake_uuid(prefix: &str, host: u32, a: u32, b: u64) -> String {
    format!("{prefix}-{host:08x}-{:04x}-4000-8000-{:012x}", a & 0xffff, b & 0xffff_ffff_ffff)
}

/// NVML's compute-instance profile id for a compute instance of `slices` compute slices
/// (the ids equal the `NVML_COMPUTE_INSTANCE_PROFILE_*` indices: 1 slice = 0 … 7 slices = 4).
fn full_ci_profile(slices: u32) -> u32 {
    match slices {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        7 => 4,
        8 => 5,
        6 => 6,
        _ => u32::MAX,
    }
}

const CREATE_GI: &str = "nvmlDeviceCreateGpuInstanceWithPlacement";
const CREATE_CI: &str = "nvmlGpuInstanceCreateComputeInstance";
const DESTROY_GI: &str = "nvmlGpuInstanceDestroy";
const DESTROY_CI: &str = "nvmlComputeInstanceDestroy";
const GET_GIS: &str = "nvmlDeviceGetGpuInstances";
const GET_CIS: &str = "nvmlGpuInstanceGetComputeInstances";
const PLACEMENTS: &str = "nvmlDeviceGetGpuInstancePossiblePlacements_v2";

impl SimulatedNvml {
    /// A topology of these GPUs (indices in order), with their start layouts created,
    /// and UUIDs in a namespace of its own.
    pub fn new(gpus: impl IntoIterator<Item = SimGpuSpec>) -> Result<Self, MigError> {
        Self::with_namespace(gpus, rand::random())
    }

    /// Like [`SimulatedNvml::new`] with UUIDs in namespace `host`: the same
    /// calls give the same UUIDs.
    pub fn with_namespace(gpus: impl IntoIterator<Item = SimGpuSpec>, host: u32) -> Result<Self, MigError> {
        let specs: Vec<SimGpuSpec> = gpus.into_iter().collect();
        let sim = SimulatedNvml {
            state: Mutex::new(State {
                host,
                gpus: specs
                    .iter()
                    .enumerate()
                    .map(|(i, s)| SimGpu {
                        model: s.model,
                        mig: s.mig,
                        uuid: fake_uuid("GPU", host, i as u32, 0),
                        gis: BTreeMap::new(),
                        serial: 0,
                    })
                    .collect(),
                fail_after: None,
                mutations: 0,
            }),
        };
        for (i, s) in specs.iter().enumerate() {
            if s.layout.is_empty() {
                continue;
            }
            let gpu = i as u32;
            let placements = Layout::plan(s.model, &s.layout)?;
            for (name, at) in s.layout.iter().zip(placements) {
                // `plan` resolved every name already.
                let id = s.model.profile_by_name(name).map_or(u32::MAX, |p| p.id);
                let gi = sim.create_gpu_instance(gpu, id, at)?;
                sim.create_compute_instance(gpu, gi.id)?;
            }
        }
        sim.lock().mutations = 0;
        Ok(sim)
    }

    /// Parses a short spec: comma-separated GPUs, each a model key (`h100-80gb`,
    /// `h200-141gb`, `a100-80gb`, `a100-40gb`, or an NVML name) with an optional
    /// `:mig` (MIG on, no instances), `:mig=3g.40gb+2g.20gb+…` (MIG on with those
    /// instances) or `:off` (the default). Example: `"h100-80gb:mig,h200-141gb,a100-80gb:mig"`.
    pub fn from_spec(spec: &str) -> Result<Self, MigError> {
        let bad = |part: &str, reason: &str| MigError::BadSpec { spec: part.to_owned(), reason: reason.to_owned() };
        if spec.trim().is_empty() {
            return Err(bad(spec, "no GPUs"));
        }
        let mut gpus = Vec::new();
        for item in spec.split(',') {
            let item = item.trim();
            let (model, opt) = match item.split_once(':') {
                Some((m, o)) => (m.trim(), Some(o.trim())),
                None => (item, None),
            };
            let model = GpuModel::lookup(model)
                .ok_or_else(|| bad(item, "unknown model (known: a100-40gb, a100-80gb, h100-80gb, h200-141gb)"))?;
            let gpu = match opt {
                None | Some("off") | Some("nomig") => SimGpuSpec::new(model, false),
                Some("mig") => SimGpuSpec::new(model, true),
                Some(o) => match o.strip_prefix("mig=") {
                    Some(list) => {
                        let names: Vec<&str> = list.split('+').map(str::trim).filter(|n| !n.is_empty()).collect();
                        SimGpuSpec::new(model, true).with_layout(&names)
                    }
                    None => return Err(bad(item, "expected :mig, :mig=<profile>+<profile>… or :off")),
                },
            };
            gpus.push(gpu);
        }
        SimulatedNvml::new(gpus)
    }

    /// Marks a GPU instance as having processes (or not): a busy instance, and its
    /// compute instances, cannot be destroyed ([`MigError::InUse`]), and
    /// [`MigControl::gpu_instance_in_use`] says so.
    pub fn set_busy(&self, gpu: u32, gpu_instance: u32, busy: bool) -> Result<(), MigError> {
        let mut st = self.lock();
        let g = st.gpu_mut(gpu)?;
        let gi = g.gis.get_mut(&gpu_instance).ok_or(MigError::NotFound { gpu, call: "set_busy" })?;
        gi.busy = busy;
        Ok(())
    }

    /// Turns MIG mode on or off at once, as an operator and a GPU reset would. Turning
    /// it off with instances present fails ([`MigError::InUse`]), as NVML does.
    pub fn set_mig_mode(&self, gpu: u32, on: bool) -> Result<(), MigError> {
        let mut st = self.lock();
        let g = st.gpu_mut(gpu)?;
        if !on && !g.gis.is_empty() {
            return Err(MigError::InUse { gpu, call: "nvmlDeviceSetMigMode" });
        }
        g.mig = on;
        Ok(())
    }

    /// Fault injection: after `n` more successful creates or destroys, the next one
    /// fails with `NVML_ERROR_UNKNOWN` (as a crash or a driver error half-way through a
    /// change would leave things); `None` turns it off. Fires once.
    pub fn fail_after(&self, n: Option<usize>) {
        self.lock().fail_after = n;
    }

    /// Successful creates and destroys since construction.
    pub fn mutations(&self) -> u64 {
        self.lock().mutations
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (every change is one assignment), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FromStr for SimulatedNvml {
    type Err = MigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SimulatedNvml::from_spec(s)
    }
}

impl State {
    fn gpu(&self, gpu: u32) -> Result<&SimGpu, MigError> {
        self.gpus.get(gpu as usize).ok_or(MigError::NoSuchGpu(gpu))
    }

    fn gpu_mut(&mut self, gpu: u32) -> Result<&mut SimGpu, MigError> {
        self.gpus.get_mut(gpu as usize).ok_or(MigError::NoSuchGpu(gpu))
    }

    /// A GPU with MIG on, as instance calls need.
    fn mig_gpu_mut(&mut self, gpu: u32, call: &'static str) -> Result<&mut SimGpu, MigError> {
        let g = self.gpu_mut(gpu)?;
        if !g.mig {
            return Err(MigError::NotSupported { gpu, call });
        }
        Ok(g)
    }

    /// Counts down the injected fault; the call about to mutate fails when it fires.
    fn check_fault(&mut self, call: &'static str) -> Result<(), MigError> {
        match self.fail_after {
            Some(0) => {
                self.fail_after = None;
                Err(MigError::Nvml { call, code: nvml_wrapper_sys::bindings::nvmlReturn_enum_NVML_ERROR_UNKNOWN })
            }
            Some(n) => {
                self.fail_after = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl MigControl for SimulatedNvml {
    fn gpus(&self) -> Result<Vec<GpuInfo>, MigError> {
        let st = self.lock();
        Ok(st
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let spec = g.model.spec();
                GpuInfo {
                    index: i as u32,
                    uuid: g.uuid.clone(),
                    name: spec.nvml_name.to_owned(),
                    memory_bytes: spec.memory_bytes,
                    sms: Some(spec.sms),
                    mig: Some(MigMode { current: g.mig, pending: g.mig }),
                }
            })
            .collect())
    }

    fn gpu_instances(&self, gpu: u32) -> Result<Vec<GpuInstanceInfo>, MigError> {
        let mut st = self.lock();
        let g = st.mig_gpu_mut(gpu, GET_GIS)?;
        Ok(g.gis
            .iter()
            .map(|(&id, gi)| GpuInstanceInfo { id, profile_id: gi.profile.id, placement: gi.placement })
            .collect())
    }

    fn compute_instances(&self, gpu: u32, gpu_instance: u32) -> Result<Vec<ComputeInstanceInfo>, MigError> {
        let mut st = self.lock();
        let g = st.mig_gpu_mut(gpu, GET_CIS)?;
        let gi = g.gis.get(&gpu_instance).ok_or(MigError::NotFound { gpu, call: GET_CIS })?;
        Ok(gi
            .cis
            .iter()
            .map(|(&id, ci)| ComputeInstanceInfo { gpu_instance_id: gpu_instance, id, profile_id: ci.profile_id })
            .collect())
    }

    fn possible_placements(&self, gpu: u32, profile_id: u32) -> Result<Vec<Placement>, MigError> {
        let st = self.lock();
        let g = st.gpu(gpu)?;
        // NVML answers regardless of MIG mode: the placements are a property of the chip.
        let profile = g.model.profile_by_id(profile_id).ok_or(MigError::InvalidArgument { gpu, call: PLACEMENTS })?;
        Ok(profile.placements().collect())
    }

    fn create_gpu_instance(
        &self,
        gpu: u32,
        profile_id: u32,
        placement: Placement,
    ) -> Result<GpuInstanceInfo, MigError> {
        let mut st = self.lock();
        let g = st.mig_gpu_mut(gpu, CREATE_GI)?;
        let profile = g.model.profile_by_id(profile_id).ok_or(MigError::InvalidArgument { gpu, call: CREATE_GI })?;
        let overlaps = g.gis.values().any(|gi| gi.placement.overlaps(placement));
        if !profile.allows(placement) || overlaps {
            return Err(MigError::InsufficientResources { gpu, call: CREATE_GI });
        }
        st.check_fault(CREATE_GI)?;
        let g = st.gpu_mut(gpu)?;
        // NVML numbers the full-GPU instance 0 and others from 1; ids are opaque to callers.
        let id = if profile.id == 0 { 0 } else { (1..).find(|i| !g.gis.contains_key(i)).unwrap_or(u32::MAX) };
        g.gis.insert(id, SimGi { profile, placement, busy: false, cis: BTreeMap::new() });
        st.mutations += 1;
        Ok(GpuInstanceInfo { id, profile_id, placement })
    }

    fn create_compute_instance(&self, gpu: u32, gpu_instance: u32) -> Result<ComputeInstanceInfo, MigError> {
        let mut st = self.lock();
        let g = st.mig_gpu_mut(gpu, CREATE_CI)?;
        let gi = g.gis.get(&gpu_instance).ok_or(MigError::NotFound { gpu, call: CREATE_CI })?;
        // A full-size compute instance takes every compute slice: there is room for one.
        if !gi.cis.is_empty() {
            return Err(MigError::InsufficientResources { gpu, call: CREATE_CI });
        }
        st.check_fault(CREATE_CI)?;
        let host = st.host;
        let g = st.gpu_mut(gpu)?;
        g.serial += 1;
        let uuid = fake_uuid("MIG", host, gpu, g.serial);
        let gi = g.gis.get_mut(&gpu_instance).ok_or(MigError::NotFound { gpu, call: CREATE_CI })?;
        let profile_id = full_ci_profile(gi.profile.compute_slices);
        gi.cis.insert(0, SimCi { uuid, profile_id });
        st.mutations += 1;
        Ok(ComputeInstanceInfo { gpu_instance_id: gpu_instance, id: 0, profile_id })
    }

    fn destroy_compute_instance(&self, gpu: u32, gpu_instance: u32, compute_instance: u32) -> Result<(), MigError> {
        let mut st = self.lock();
        let g = st.mig_gpu_mut(gpu, DESTROY_CI)?;
        let gi = g.gis.get(&gpu_instance).ok_or(MigError::NotFound { gpu, call: DESTROY_CI })?;
        if !gi.cis.contains_key(&compute_instance) {
            return Err(MigError::NotFound { gpu, call: DESTROY_CI });
        }
        if gi.busy {
            return Err(MigError::InUse { gpu, call: DESTROY_CI });
        }
        st.check_fault(DESTROY_CI)?;
        let g = st.gpu_mut(gpu)?;
        if let Some(gi) = g.gis.get_mut(&gpu_instance) {
            gi.cis.remove(&compute_instance);
        }
        st.mutations += 1;
        Ok(())
    }

    fn destroy_gpu_instance(&self, gpu: u32, gpu_instance: u32) -> Result<(), MigError> {
        let mut st = self.lock();
        let g = st.mig_gpu_mut(gpu, DESTROY_GI)?;
        let gi = g.gis.get(&gpu_instance).ok_or(MigError::NotFound { gpu, call: DESTROY_GI })?;
        if gi.busy || !gi.cis.is_empty() {
            return Err(MigError::InUse { gpu, call: DESTROY_GI });
        }
        st.check_fault(DESTROY_GI)?;
        st.gpu_mut(gpu)?.gis.remove(&gpu_instance);
        st.mutations += 1;
        Ok(())
    }

    fn gpu_instance_in_use(&self, gpu: u32, gpu_instance: u32) -> Result<bool, MigError> {
        let mut st = self.lock();
        let g = st.mig_gpu_mut(gpu, "nvmlDeviceGetComputeRunningProcesses_v3")?;
        let gi = g.gis.get(&gpu_instance).ok_or(MigError::NotFound { gpu, call: "nvmlDeviceGetGpuInstanceById" })?;
        Ok(gi.busy)
    }

    fn mig_devices(&self, gpu: u32) -> Result<Vec<MigDeviceInfo>, MigError> {
        let st = self.lock();
        let g = st.gpu(gpu)?;
        if !g.mig {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (&gi_id, gi) in &g.gis {
            for (&ci_id, ci) in &gi.cis {
                out.push(MigDeviceInfo {
                    uuid: ci.uuid.clone(),
                    gpu_instance_id: gi_id,
                    compute_instance_id: ci_id,
                    memory_bytes: gi.profile.memory_bytes,
                    sms: Some(gi.profile.sms),
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::super::profiles::{COMPUTE_SLICES, MEMORY_SLICES};
    use super::*;

    fn h100() -> SimulatedNvml {
        SimulatedNvml::with_namespace([SimGpuSpec::new(GpuModel::H100_80GB, true)], 7).unwrap()
    }

    #[test]
    fn topologies_never_share_uuids() {
        let a = SimulatedNvml::from_spec("h100-80gb").unwrap();
        let b = SimulatedNvml::from_spec("h100-80gb").unwrap();
        assert_ne!(a.gpus().unwrap()[0].uuid, b.gpus().unwrap()[0].uuid);
    }

    #[test]
    fn spec_parsing() {
        let sim = SimulatedNvml::from_spec("h100-80gb:mig, h200-141gb ,a100-80gb:mig,A100-40GB:off").unwrap();
        let gpus = sim.gpus().unwrap();
        assert_eq!(gpus.len(), 4);
        assert_eq!(gpus[0].name, "NVIDIA H100 80GB HBM3");
        assert!(gpus[0].mig_enabled());
        assert_eq!(gpus[1].name, "NVIDIA H200");
        assert!(!gpus[1].mig_enabled());
        assert_eq!(gpus[1].mig, Some(MigMode { current: false, pending: false }));
        assert_eq!(gpus[2].model(), Some(GpuModel::A100_80GB));
        assert_eq!(gpus[3].model(), Some(GpuModel::A100_40GB));
        assert_eq!(gpus[0].sms, Some(132));
        assert!(gpus.iter().all(|g| g.uuid.starts_with("GPU-") && g.uuid.len() == 40));
        let uuids: std::collections::BTreeSet<_> = gpus.iter().map(|g| &g.uuid).collect();
        assert_eq!(uuids.len(), 4);

        let sim: SimulatedNvml = "h100:mig=3g.40gb+2g.20gb+1g.10gb+1g.10gb".parse().unwrap();
        assert_eq!(sim.gpu_instances(0).unwrap().len(), 4);
        assert_eq!(sim.mig_devices(0).unwrap().len(), 4);
        assert_eq!(sim.mutations(), 0);

        for bad in ["", "v100", "h100-80gb:maybe", "h100:mig=4g.40gb+4g.40gb", "h100:mig=1g.18gb"] {
            assert!(SimulatedNvml::from_spec(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(SimulatedNvml::from_spec("h100:mig=4g.40gb+4g.40gb"), Err(MigError::Layout(_))));
        assert!(matches!(SimulatedNvml::from_spec("x"), Err(MigError::BadSpec { .. })));
    }

    #[test]
    fn create_and_destroy() {
        let sim = h100();
        let gi = sim.create_gpu_instance(0, 9, Placement::new(4, 4)).unwrap();
        assert_eq!(gi.profile_id, 9);
        assert_eq!(sim.gpu_instances(0).unwrap(), [gi]);
        assert!(sim.mig_devices(0).unwrap().is_empty(), "no compute instance yet");
        let ci = sim.create_compute_instance(0, gi.id).unwrap();
        assert_eq!((ci.gpu_instance_id, ci.id, ci.profile_id), (gi.id, 0, 2));
        assert_eq!(sim.compute_instances(0, gi.id).unwrap(), [ci]);
        let devs = sim.mig_devices(0).unwrap();
        assert_eq!(devs.len(), 1);
        assert!(devs[0].uuid.starts_with("MIG-"));
        assert_eq!(devs[0].sms, Some(60));
        assert_eq!(devs[0].memory_bytes, GpuModel::H100_80GB.profile_by_id(9).unwrap().memory_bytes);
        let first_uuid = devs[0].uuid.clone();

        // Only one full-size compute instance fits.
        assert!(matches!(sim.create_compute_instance(0, gi.id), Err(MigError::InsufficientResources { .. })));
        // A GPU instance with compute instances left is in use.
        assert!(matches!(sim.destroy_gpu_instance(0, gi.id), Err(MigError::InUse { .. })));
        sim.destroy_compute_instance(0, gi.id, 0).unwrap();
        sim.destroy_gpu_instance(0, gi.id).unwrap();
        assert!(sim.gpu_instances(0).unwrap().is_empty());
        assert!(matches!(sim.destroy_gpu_instance(0, gi.id), Err(MigError::NotFound { .. })));
        assert!(matches!(sim.destroy_compute_instance(0, gi.id, 0), Err(MigError::NotFound { .. })));

        // Re-created instances get new UUIDs.
        let gi = sim.create_gpu_instance(0, 9, Placement::new(4, 4)).unwrap();
        sim.create_compute_instance(0, gi.id).unwrap();
        assert_ne!(sim.mig_devices(0).unwrap()[0].uuid, first_uuid);
        assert_eq!(sim.mutations(), 6);

        // Same calls, same UUIDs.
        let again = h100();
        let gi2 = again.create_gpu_instance(0, 9, Placement::new(4, 4)).unwrap();
        again.create_compute_instance(0, gi2.id).unwrap();
        assert_eq!(again.mig_devices(0).unwrap()[0].uuid, first_uuid);
    }

    #[test]
    fn create_fails_as_nvml_does() {
        let sim = SimulatedNvml::from_spec("h100-80gb:mig,h100-80gb").unwrap();
        sim.create_gpu_instance(0, 5, Placement::new(0, 4)).unwrap();
        let e = |r: Result<GpuInstanceInfo, MigError>| r.unwrap_err();
        // Overlap.
        assert!(matches!(
            e(sim.create_gpu_instance(0, 9, Placement::new(0, 4))),
            MigError::InsufficientResources { .. }
        ));
        assert!(matches!(
            e(sim.create_gpu_instance(0, 19, Placement::new(3, 1))),
            MigError::InsufficientResources { .. }
        ));
        // Disallowed placements: 1g at 7, 2g at 6, wrong size.
        assert!(matches!(
            e(sim.create_gpu_instance(0, 19, Placement::new(7, 1))),
            MigError::InsufficientResources { .. }
        ));
        assert!(matches!(
            e(sim.create_gpu_instance(0, 14, Placement::new(6, 2))),
            MigError::InsufficientResources { .. }
        ));
        assert!(matches!(
            e(sim.create_gpu_instance(0, 14, Placement::new(4, 1))),
            MigError::InsufficientResources { .. }
        ));
        // Unknown profile.
        assert!(matches!(e(sim.create_gpu_instance(0, 20, Placement::new(4, 1))), MigError::InvalidArgument { .. }));
        // MIG off.
        let off = e(sim.create_gpu_instance(1, 19, Placement::new(0, 1)));
        assert!(matches!(off, MigError::NotSupported { gpu: 1, .. }), "{off}");
        assert_eq!(off.nvml_code(), Some(3));
        assert!(matches!(sim.gpu_instances(1), Err(MigError::NotSupported { .. })));
        assert!(sim.mig_devices(1).unwrap().is_empty());
        // No such GPU.
        assert!(matches!(e(sim.create_gpu_instance(2, 19, Placement::new(0, 1))), MigError::NoSuchGpu(2)));
        // Placements are answered regardless of MIG mode.
        assert_eq!(sim.possible_placements(1, 9).unwrap(), [Placement::new(0, 4), Placement::new(4, 4)]);
        assert!(matches!(sim.possible_placements(1, 42), Err(MigError::InvalidArgument { .. })));
        assert_eq!(sim.mutations(), 1);
    }

    #[test]
    fn busy_instances_cannot_be_destroyed() {
        let sim = SimulatedNvml::from_spec("h200:mig=3g.71gb+3g.71gb").unwrap();
        let gis = sim.gpu_instances(0).unwrap();
        sim.set_busy(0, gis[0].id, true).unwrap();
        assert!(sim.gpu_instance_in_use(0, gis[0].id).unwrap());
        assert!(!sim.gpu_instance_in_use(0, gis[1].id).unwrap());
        assert!(matches!(sim.destroy_compute_instance(0, gis[0].id, 0), Err(MigError::InUse { .. })));
        sim.destroy_compute_instance(0, gis[1].id, 0).unwrap();
        sim.destroy_gpu_instance(0, gis[1].id).unwrap();
        sim.set_busy(0, gis[0].id, false).unwrap();
        sim.destroy_compute_instance(0, gis[0].id, 0).unwrap();
        assert!(matches!(sim.set_busy(0, 99, true), Err(MigError::NotFound { .. })));
        assert!(matches!(sim.set_mig_mode(0, false), Err(MigError::InUse { .. })));
        sim.destroy_gpu_instance(0, gis[0].id).unwrap();
        sim.set_mig_mode(0, false).unwrap();
        assert!(!sim.gpu(0).unwrap().mig_enabled());
    }

    #[test]
    fn fault_injection_fires_once() {
        let sim = h100();
        sim.fail_after(Some(1));
        let gi = sim.create_gpu_instance(0, 19, Placement::new(0, 1)).unwrap();
        let err = sim.create_compute_instance(0, gi.id).unwrap_err();
        assert_eq!(err.nvml_code(), Some(999));
        sim.create_compute_instance(0, gi.id).unwrap();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Create { profile: usize, start: u32 },
        CreateCi { pick: usize },
        DestroyCi { pick: usize },
        DestroyGi { pick: usize },
        Busy { pick: usize, busy: bool },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..6, 0u32..8).prop_map(|(profile, start)| Op::Create { profile, start }),
            2 => (0usize..8).prop_map(|pick| Op::CreateCi { pick }),
            2 => (0usize..8).prop_map(|pick| Op::DestroyCi { pick }),
            2 => (0usize..8).prop_map(|pick| Op::DestroyGi { pick }),
            1 => (0usize..8, any::<bool>()).prop_map(|(pick, busy)| Op::Busy { pick, busy }),
        ]
    }

    /// Placements never overlap, each is one the table allows, slices add up.
    pub(crate) fn check_invariants(sim: &dyn MigControl, gpu: u32, model: GpuModel) {
        let gis = sim.gpu_instances(gpu).unwrap();
        let mut mem = 0;
        let mut compute = 0;
        for (i, a) in gis.iter().enumerate() {
            let p = model.profile_by_id(a.profile_id).expect("known profile");
            assert!(p.allows(a.placement), "{} at {}", p.name, a.placement);
            mem += a.placement.size;
            compute += p.compute_slices;
            for b in &gis[i + 1..] {
                assert!(!a.placement.overlaps(b.placement), "{a:?} overlaps {b:?}");
            }
        }
        assert!(mem <= MEMORY_SLICES && compute <= COMPUTE_SLICES, "mem {mem} compute {compute}");
    }

    proptest! {
        #[test]
        fn random_create_destroy_keeps_invariants(
            model in prop::sample::select(GpuModel::ALL.to_vec()),
            ops in prop::collection::vec(op(), 0..60),
        ) {
            let sim = SimulatedNvml::new([SimGpuSpec::new(model, true)]).unwrap();
            for op in ops {
                let gis = sim.gpu_instances(0).unwrap();
                let pick = |i: usize| gis.get(i % gis.len().max(1)).map(|g| g.id);
                match op {
                    Op::Create { profile, start } => {
                        let p = &model.profiles()[profile];
                        let at = Placement::new(start, p.memory_slices);
                        let r = sim.create_gpu_instance(0, p.id, at);
                        let free = gis.iter().all(|g| !g.placement.overlaps(at));
                        prop_assert_eq!(r.is_ok(), p.allows(at) && free, "{} at {}", p.name, at);
                    }
                    Op::CreateCi { pick: i } => if let Some(id) = pick(i) {
                        let had = !sim.compute_instances(0, id).unwrap().is_empty();
                        prop_assert_eq!(sim.create_compute_instance(0, id).is_ok(), !had);
                    },
                    Op::DestroyCi { pick: i } => if let Some(id) = pick(i) {
                        let _ = sim.destroy_compute_instance(0, id, 0);
                    },
                    Op::DestroyGi { pick: i } => if let Some(id) = pick(i) {
                        let has_ci = !sim.compute_instances(0, id).unwrap().is_empty();
                        let r = sim.destroy_gpu_instance(0, id);
                        let in_use = matches!(r, Err(MigError::InUse { .. }));
                        if has_ci { prop_assert!(in_use); }
                    },
                    Op::Busy { pick: i, busy } => if let Some(id) = pick(i) {
                        sim.set_busy(0, id, busy).unwrap();
                    },
                }
                check_invariants(&sim, 0, model);
                // Every compute instance shows as one MIG device, with a unique UUID.
                let devs = sim.mig_devices(0).unwrap();
                let cis: usize = sim.gpu_instances(0).unwrap().iter()
                    .map(|g| sim.compute_instances(0, g.id).unwrap().len()).sum();
                prop_assert_eq!(devs.len(), cis);
                let uuids: std::collections::BTreeSet<_> = devs.iter().map(|d| &d.uuid).collect();
                prop_assert_eq!(uuids.len(), devs.len());
            }
        }
    }
}
