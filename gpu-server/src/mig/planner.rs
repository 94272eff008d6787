//! Brings a GPU's MIG layout to a desired list of profiles.
//!
//! The planner is a converging reconciler, not a script: each run observes the GPU,
//! plans from what is there, and acts. So running it twice, or again after a crash
//! half-way, ends in the same layout without duplicates: an instance of a desired
//! profile that already exists is adopted where it stands (and completed with a
//! compute instance if it has none); only what is missing is created.
//!
//! Rules:
//! - it never toggles MIG mode (that needs a GPU reset and is the operator's or the
//!   boot unit's job); with MIG off it reports [`MigError::MigDisabled`];
//! - it never destroys a busy instance: one with processes (NVML says so), one the
//!   caller's `busy` predicate names (a session owns it, though its worker may not have
//!   a context yet), or one NVML refuses to destroy as in use (a process that started
//!   after we looked). Busy instances stay; desired profiles they leave no room for are
//!   reported as unmet;
//! - among the layouts that place the most desired instances it picks the one that
//!   keeps the most existing instances, so a re-run does nothing and a change moves as
//!   little as possible;
//! - an invalid desired layout (unknown profile, does not fit on an empty GPU) is an
//!   error before anything is touched.

use std::collections::BTreeSet;

use super::profiles::{GiProfile, GpuModel, Layout, Placement, pack};
use super::{GpuInstanceInfo, MigControl, MigError};

/// Plans and applies MIG layouts through a [`MigControl`].
#[derive(Debug, Clone, Copy)]
pub struct Planner<'a> {
    ctl: &'a dyn MigControl,
}

/// What the planner would do to one GPU, from what it observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// GPU index.
    pub gpu: u32,
    /// Its model.
    pub model: GpuModel,
    /// Existing instances that are part of the desired layout: adopted as they are.
    pub keep: Vec<GpuInstanceInfo>,
    /// Kept instances without a compute instance: one (full-size) is created in each.
    pub complete: Vec<u32>,
    /// Idle instances that are not part of the layout: destroyed, with their compute instances.
    pub destroy: Vec<(GpuInstanceInfo, Vec<u32>)>,
    /// Busy instances that are not part of the layout: left alone.
    pub blocked: Vec<GpuInstanceInfo>,
    /// Instances to create: profile and placement.
    pub create: Vec<(&'static GiProfile, Placement)>,
    /// Desired profiles with no room now, because busy instances are in the way.
    pub unmet: Vec<&'static str>,
}

impl Plan {
    /// Whether applying the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.complete.is_empty() && self.destroy.is_empty() && self.create.is_empty()
    }

    /// Whether applying the plan reaches the desired layout exactly.
    pub fn reaches_desired(&self) -> bool {
        self.unmet.is_empty() && self.blocked.is_empty()
    }
}

/// One thing the planner did (or found).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanAction {
    /// An existing instance of a desired profile was kept where it is.
    Adopt {
        /// GPU instance id.
        gpu_instance: u32,
        /// Profile name.
        profile: &'static str,
        /// Its placement.
        placement: Placement,
    },
    /// A GPU instance was created.
    CreateGpuInstance {
        /// New GPU instance id.
        gpu_instance: u32,
        /// Profile name.
        profile: &'static str,
        /// Its placement.
        placement: Placement,
    },
    /// A full-size compute instance was created in a GPU instance.
    CreateComputeInstance {
        /// GPU instance id.
        gpu_instance: u32,
        /// New compute instance id.
        compute_instance: u32,
    },
    /// A compute instance was destroyed (before its GPU instance).
    DestroyComputeInstance {
        /// GPU instance id.
        gpu_instance: u32,
        /// Compute instance id.
        compute_instance: u32,
    },
    /// A GPU instance outside the desired layout was destroyed.
    DestroyGpuInstance {
        /// GPU instance id.
        gpu_instance: u32,
        /// NVML profile id.
        profile_id: u32,
        /// Its placement.
        placement: Placement,
    },
    /// A busy GPU instance outside the desired layout was left alone.
    KeepBusy {
        /// GPU instance id.
        gpu_instance: u32,
        /// NVML profile id.
        profile_id: u32,
        /// Its placement.
        placement: Placement,
    },
}

/// What [`Planner::apply`] did to one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanReport {
    /// GPU index.
    pub gpu: u32,
    /// Actions in the order taken (adoptions and busy instances left included).
    pub actions: Vec<PlanAction>,
    /// Desired profiles that could not be placed (busy instances in the way); a later run
    /// places them once those instances are idle.
    pub unmet: Vec<&'static str>,
    /// Whether the GPU now has exactly the desired profiles, each with a compute
    /// instance (checked by observing the GPU again).
    pub converged: bool,
}

impl PlanReport {
    /// Whether anything was created or destroyed.
    pub fn changed(&self) -> bool {
        self.actions.iter().any(|a| !matches!(a, PlanAction::Adopt { .. } | PlanAction::KeepBusy { .. }))
    }
}

/// A GPU instance as observed, with its compute instances.
#[derive(Debug, Clone)]
struct Observed {
    gi: GpuInstanceInfo,
    cis: Vec<u32>,
    /// Processes run on it (NVML would refuse to destroy it).
    in_use: bool,
}

impl<'a> Planner<'a> {
    /// A planner over `ctl`.
    pub fn new(ctl: &'a dyn MigControl) -> Self {
        Self { ctl }
    }

    /// Plans, without acting, how to bring GPU `gpu` to the `desired` profiles. `busy`
    /// names instances that must not be destroyed besides those with processes (which
    /// NVML reports): typically those a session owns.
    pub fn plan<S: AsRef<str>>(
        &self,
        gpu: u32,
        desired: &[S],
        busy: &dyn Fn(&GpuInstanceInfo) -> bool,
    ) -> Result<Plan, MigError> {
        let (model, observed) = self.observe(gpu)?;
        make_plan(gpu, model, desired, &observed, busy)
    }

    /// Brings GPU `gpu` to the `desired` profiles (names of its model, e.g. `["3g.40gb",
    /// "2g.20gb", "1g.10gb", "1g.10gb"]`) and reports what it did. Safe to repeat and to
    /// re-run after a failure half-way. `busy` is as for [`Planner::plan`].
    pub fn apply<S: AsRef<str>>(
        &self,
        gpu: u32,
        desired: &[S],
        busy: &dyn Fn(&GpuInstanceInfo) -> bool,
    ) -> Result<PlanReport, MigError> {
        let mut actions = Vec::new();
        // Instances NVML refused to destroy as in use although `busy` called them idle.
        let mut found_busy: BTreeSet<u32> = BTreeSet::new();
        // Each round either finishes or learns one more busy instance, so this bounds it.
        for _round in 0..=super::profiles::MEMORY_SLICES + 1 {
            let (model, observed) = self.observe(gpu)?;
            let is_busy = |gi: &GpuInstanceInfo| found_busy.contains(&gi.id) || busy(gi);
            let plan = make_plan(gpu, model, desired, &observed, &is_busy)?;
            match self.execute(&plan, &mut actions)? {
                Some(refused) => {
                    tracing::warn!(gpu, gpu_instance = refused, "instance in use although reported idle; keeping it");
                    found_busy.insert(refused);
                }
                None => {
                    let (_, after) = self.observe(gpu)?;
                    let converged = has_exactly(model, desired, &after);
                    return Ok(PlanReport { gpu, actions, unmet: plan.unmet, converged });
                }
            }
        }
        // Unreachable in practice: there are at most 8 instances to learn about.
        Err(MigError::InUse { gpu, call: "nvmlGpuInstanceDestroy" })
    }

    fn observe(&self, gpu: u32) -> Result<(GpuModel, Vec<Observed>), MigError> {
        let info = self.ctl.gpu(gpu)?;
        let model = info.model().ok_or_else(|| MigError::UnknownModel { gpu, name: info.name.clone() })?;
        if !info.mig_enabled() {
            return Err(MigError::MigDisabled { gpu });
        }
        let mut observed = Vec::new();
        for gi in self.ctl.gpu_instances(gpu)? {
            let cis = self.ctl.compute_instances(gpu, gi.id)?.into_iter().map(|c| c.id).collect();
            let in_use = self.ctl.gpu_instance_in_use(gpu, gi.id)?;
            observed.push(Observed { gi, cis, in_use });
        }
        Ok((model, observed))
    }

    /// Carries out `plan`, appending to `actions`. Returns the id of an instance NVML
    /// refused to destroy as in use (the caller re-plans with it kept), else `None`.
    fn execute(&self, plan: &Plan, actions: &mut Vec<PlanAction>) -> Result<Option<u32>, MigError> {
        let gpu = plan.gpu;
        for (gi, cis) in &plan.destroy {
            for &ci in cis {
                match self.ctl.destroy_compute_instance(gpu, gi.id, ci) {
                    Ok(()) => {
                        tracing::info!(gpu, gpu_instance = gi.id, compute_instance = ci, "destroyed compute instance");
                        actions.push(PlanAction::DestroyComputeInstance { gpu_instance: gi.id, compute_instance: ci });
                    }
                    Err(MigError::InUse { .. }) => return Ok(Some(gi.id)),
                    Err(e) => return Err(e),
                }
            }
            match self.ctl.destroy_gpu_instance(gpu, gi.id) {
                Ok(()) => {
                    let placement = gi.placement.to_string();
                    tracing::info!(
                        gpu,
                        gpu_instance = gi.id,
                        profile = gi.profile_id,
                        placement,
                        "destroyed GPU instance"
                    );
                    actions.push(PlanAction::DestroyGpuInstance {
                        gpu_instance: gi.id,
                        profile_id: gi.profile_id,
                        placement: gi.placement,
                    });
                }
                Err(MigError::InUse { .. }) => return Ok(Some(gi.id)),
                Err(e) => return Err(e),
            }
        }
        for gi in &plan.blocked {
            let placement = gi.placement.to_string();
            tracing::warn!(
                gpu,
                gpu_instance = gi.id,
                profile = gi.profile_id,
                placement,
                "busy instance left in place"
            );
            push_once(
                actions,
                PlanAction::KeepBusy { gpu_instance: gi.id, profile_id: gi.profile_id, placement: gi.placement },
            );
        }
        for gi in &plan.keep {
            let profile = plan.model.profile_by_id(gi.profile_id).map_or("?", |p| p.name);
            push_once(actions, PlanAction::Adopt { gpu_instance: gi.id, profile, placement: gi.placement });
        }
        for &gi in &plan.complete {
            let ci = self.ctl.create_compute_instance(gpu, gi)?;
            tracing::info!(
                gpu,
                gpu_instance = gi,
                compute_instance = ci.id,
                "completed GPU instance with a compute instance"
            );
            actions.push(PlanAction::CreateComputeInstance { gpu_instance: gi, compute_instance: ci.id });
        }
        for &(profile, placement) in &plan.create {
            let gi = self.ctl.create_gpu_instance(gpu, profile.id, placement)?;
            tracing::info!(gpu, gpu_instance = gi.id, profile = profile.name, %placement, "created GPU instance");
            actions.push(PlanAction::CreateGpuInstance { gpu_instance: gi.id, profile: profile.name, placement });
            let ci = self.ctl.create_compute_instance(gpu, gi.id)?;
            actions.push(PlanAction::CreateComputeInstance { gpu_instance: gi.id, compute_instance: ci.id });
        }
        if !plan.unmet.is_empty() {
            tracing::warn!(gpu, unmet = ?plan.unmet, "desired MIG instances without room while busy instances stay");
        }
        Ok(None)
    }
}

/// Re-plans after a refusal repeat the adoptions; report each once.
fn push_once(actions: &mut Vec<PlanAction>, a: PlanAction) {
    if !actions.contains(&a) {
        actions.push(a);
    }
}

fn make_plan<S: AsRef<str>>(
    gpu: u32,
    model: GpuModel,
    desired: &[S],
    observed: &[Observed],
    busy: &dyn Fn(&GpuInstanceInfo) -> bool,
) -> Result<Plan, MigError> {
    // The desired layout must fit on an empty GPU, whatever is there now.
    Layout::plan(model, desired)?;
    let wanted = Layout::resolve(model, desired)?;

    let mut plan = Plan {
        gpu,
        model,
        keep: Vec::new(),
        complete: Vec::new(),
        destroy: Vec::new(),
        blocked: Vec::new(),
        create: Vec::new(),
        unmet: Vec::new(),
    };

    // Busy instances stay. Those of a desired profile count towards it; the rest block.
    let mut remaining: Vec<&'static GiProfile> = wanted;
    let mut fixed = 0u32;
    let mut idle: Vec<&Observed> = Vec::new();
    for o in observed {
        if !o.in_use && !busy(&o.gi) {
            idle.push(o);
            continue;
        }
        fixed |= o.gi.placement.mask();
        match remaining.iter().position(|p| p.id == o.gi.profile_id) {
            Some(i) => {
                remaining.remove(i);
                plan.keep.push(o.gi);
                if o.cis.is_empty() {
                    plan.complete.push(o.gi.id);
                }
            }
            None => plan.blocked.push(o.gi),
        }
    }

    // Place the rest around the busy ones, keeping as many idle instances as possible.
    let preferred: Vec<(u32, Placement)> = idle
        .iter()
        .filter(|o| model.profile_by_id(o.gi.profile_id).is_some_and(|p| p.allows(o.gi.placement)))
        .map(|o| (o.gi.profile_id, o.gi.placement))
        .collect();
    let placed = pack(&remaining, fixed, &preferred, true).unwrap_or_else(|| vec![None; remaining.len()]);
    let mut reused: BTreeSet<u32> = BTreeSet::new();
    for (profile, at) in remaining.iter().zip(placed) {
        let Some(at) = at else {
            plan.unmet.push(profile.name);
            continue;
        };
        let existing =
            idle.iter().find(|o| o.gi.profile_id == profile.id && o.gi.placement == at && !reused.contains(&o.gi.id));
        match existing {
            Some(o) => {
                reused.insert(o.gi.id);
                plan.keep.push(o.gi);
                if o.cis.is_empty() {
                    plan.complete.push(o.gi.id);
                }
            }
            None => plan.create.push((profile, at)),
        }
    }
    for o in idle.into_iter().filter(|o| !reused.contains(&o.gi.id)) {
        plan.destroy.push((o.gi, o.cis.clone()));
    }
    plan.keep.sort_by_key(|g| g.id);
    Ok(plan)
}

/// Whether the GPU has exactly the desired profiles, each with a compute instance.
fn has_exactly<S: AsRef<str>>(model: GpuModel, desired: &[S], observed: &[Observed]) -> bool {
    let mut want: Vec<u32> = desired.iter().filter_map(|n| model.profile_by_name(n.as_ref()).map(|p| p.id)).collect();
    let mut have: Vec<u32> = observed.iter().map(|o| o.gi.profile_id).collect();
    want.sort_unstable();
    have.sort_unstable();
    want == have && observed.iter().all(|o| !o.cis.is_empty())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::sim::tests::check_invariants;
    use super::super::{SimGpuSpec, SimulatedNvml};
    use super::*;

    fn never(_: &GpuInstanceInfo) -> bool {
        false
    }
    const IDLE: &dyn Fn(&GpuInstanceInfo) -> bool = &never;

    fn profile_names(sim: &SimulatedNvml, gpu: u32, model: GpuModel) -> Vec<&'static str> {
        let mut v: Vec<_> =
            sim.gpu_instances(gpu).unwrap().iter().map(|g| model.profile_by_id(g.profile_id).unwrap().name).collect();
        v.sort_unstable();
        v
    }

    fn sorted<'s>(v: &[&'s str]) -> Vec<&'s str> {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    }

    #[test]
    fn from_empty() {
        let sim = SimulatedNvml::from_spec("h100-80gb:mig").unwrap();
        let want = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"];
        let report = Planner::new(&sim).apply(0, &want, IDLE).unwrap();
        assert!(report.converged && report.unmet.is_empty() && report.changed());
        let creates = report.actions.iter().filter(|a| matches!(a, PlanAction::CreateGpuInstance { .. })).count();
        assert_eq!(creates, 4);
        assert_eq!(profile_names(&sim, 0, GpuModel::H100_80GB), sorted(&want));
        assert_eq!(sim.mig_devices(0).unwrap().len(), 4);
        check_invariants(&sim, 0, GpuModel::H100_80GB);
    }

    #[test]
    fn idempotent() {
        let sim = SimulatedNvml::from_spec("h200:mig").unwrap();
        let want = ["4g.71gb", "2g.35gb", "1g.18gb"];
        let planner = Planner::new(&sim);
        planner.apply(0, &want, IDLE).unwrap();
        let before = (sim.mutations(), sim.mig_devices(0).unwrap());
        let again = planner.apply(0, &want, IDLE).unwrap();
        assert!(again.converged && !again.changed(), "{:?}", again.actions);
        assert_eq!(again.actions.len(), 3, "three adoptions");
        assert_eq!((sim.mutations(), sim.mig_devices(0).unwrap()), before);
        assert!(planner.plan(0, &want, IDLE).unwrap().is_noop());
    }

    #[test]
    fn completes_and_adopts_after_a_crash_half_way() {
        // A previous run created two GPU instances and crashed before their compute instances.
        let sim = SimulatedNvml::from_spec("a100-80gb:mig").unwrap();
        let a = sim.create_gpu_instance(0, 9, Placement::new(4, 4)).unwrap();
        let b = sim.create_gpu_instance(0, 14, Placement::new(0, 2)).unwrap();
        let want = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"];
        let report = Planner::new(&sim).apply(0, &want, IDLE).unwrap();
        assert!(report.converged, "{report:?}");
        assert!(report.actions.contains(&PlanAction::Adopt {
            gpu_instance: a.id,
            profile: "3g.40gb",
            placement: a.placement
        }));
        assert!(
            report.actions.contains(&PlanAction::CreateComputeInstance { gpu_instance: b.id, compute_instance: 0 })
        );
        assert!(!report.actions.iter().any(|x| matches!(x, PlanAction::DestroyGpuInstance { .. })));
        assert_eq!(sim.gpu_instances(0).unwrap().len(), 4);
    }

    #[test]
    fn converges_after_a_failure_at_every_step() {
        let want = ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"];
        for k in 0..12 {
            // Start from another layout so destroys are interrupted too.
            let sim = SimulatedNvml::from_spec("h100:mig=4g.40gb+1g.20gb+1g.10gb").unwrap();
            sim.fail_after(Some(k));
            let planner = Planner::new(&sim);
            let first = planner.apply(0, &want, IDLE);
            check_invariants(&sim, 0, GpuModel::H100_80GB);
            let report = planner.apply(0, &want, IDLE).unwrap();
            assert!(report.converged, "fault after {k}: {first:?} then {report:?}");
            assert_eq!(profile_names(&sim, 0, GpuModel::H100_80GB), sorted(&want), "fault after {k}");
            let m = sim.mutations();
            assert!(!planner.apply(0, &want, IDLE).unwrap().changed());
            assert_eq!(sim.mutations(), m);
        }
    }

    #[test]
    fn reshapes_an_existing_layout() {
        let sim = SimulatedNvml::from_spec("h100:mig=1g.10gb+1g.10gb+1g.10gb+1g.10gb+1g.10gb+1g.10gb+1g.10gb").unwrap();
        let report = Planner::new(&sim).apply(0, &["4g.40gb", "1g.10gb", "1g.10gb", "1g.10gb"], IDLE).unwrap();
        assert!(report.converged);
        // The 4g needs slices 0-3; the 1g instances at 4, 5 and 6 are kept.
        let kept = report.actions.iter().filter(|a| matches!(a, PlanAction::Adopt { .. })).count();
        assert_eq!(kept, 3, "{:?}", report.actions);
    }

    #[test]
    fn moves_an_idle_instance_that_is_in_the_way() {
        // A 1g at slice 4 blocks both 3g+2g placements; being idle, it is re-created elsewhere.
        let sim = SimulatedNvml::from_spec("h100:mig").unwrap();
        let gi = sim.create_gpu_instance(0, 19, Placement::new(4, 1)).unwrap();
        sim.create_compute_instance(0, gi.id).unwrap();
        let report = Planner::new(&sim).apply(0, &["3g.40gb", "2g.20gb", "1g.10gb"], IDLE).unwrap();
        assert!(report.converged, "{report:?}");
        assert!(
            report
                .actions
                .iter()
                .any(|a| matches!(a, PlanAction::DestroyGpuInstance { gpu_instance, .. } if *gpu_instance == gi.id))
        );
    }

    #[test]
    fn never_destroys_busy_instances() {
        let sim = SimulatedNvml::from_spec("h100:mig=4g.40gb+2g.20gb+1g.10gb").unwrap();
        let gis = sim.gpu_instances(0).unwrap();
        let four = gis.iter().find(|g| g.profile_id == 5).unwrap().id;
        let busy: BTreeSet<u32> = [four].into();
        // The 4g is busy (per the caller) and not desired; the 3g+3g layout cannot be reached.
        let report = Planner::new(&sim).apply(0, &["3g.40gb", "3g.40gb"], &|g| busy.contains(&g.id)).unwrap();
        assert!(!report.converged);
        assert_eq!(report.unmet, ["3g.40gb"]);
        assert!(sim.gpu_instances(0).unwrap().iter().any(|g| g.id == four));
        assert!(
            report
                .actions
                .iter()
                .any(|a| matches!(a, PlanAction::KeepBusy { gpu_instance, .. } if *gpu_instance == four))
        );
        // The other half was freed and used.
        assert_eq!(profile_names(&sim, 0, GpuModel::H100_80GB), ["3g.40gb", "4g.40gb"]);

        // Once idle, a re-run finishes the job.
        let report = Planner::new(&sim).apply(0, &["3g.40gb", "3g.40gb"], IDLE).unwrap();
        assert!(report.converged);
        assert_eq!(profile_names(&sim, 0, GpuModel::H100_80GB), ["3g.40gb", "3g.40gb"]);
    }

    #[test]
    fn busy_per_nvml_although_reported_idle_is_kept() {
        let sim = SimulatedNvml::from_spec("h200:mig=7g.141gb").unwrap();
        let full = sim.gpu_instances(0).unwrap()[0].id;
        sim.set_busy(0, full, true).unwrap();
        let report = Planner::new(&sim).apply(0, &["1g.18gb"], IDLE).unwrap();
        assert!(!report.converged);
        assert_eq!(report.unmet, ["1g.18gb"]);
        assert_eq!(sim.gpu_instances(0).unwrap().len(), 1);
        assert_eq!(sim.mig_devices(0).unwrap().len(), 1, "its compute instance is untouched too");
    }

    /// A topology whose process query misses every process, as a race with a worker
    /// starting would: only NVML's refusal to destroy tells the planner.
    #[derive(Debug)]
    struct MissesProcesses(SimulatedNvml);

    impl MigControl for MissesProcesses {
        fn gpus(&self) -> Result<Vec<super::super::GpuInfo>, MigError> {
            self.0.gpus()
        }
        fn gpu_instances(&self, gpu: u32) -> Result<Vec<GpuInstanceInfo>, MigError> {
            self.0.gpu_instances(gpu)
        }
        fn compute_instances(&self, gpu: u32, gi: u32) -> Result<Vec<super::super::ComputeInstanceInfo>, MigError> {
            self.0.compute_instances(gpu, gi)
        }
        fn possible_placements(&self, gpu: u32, profile_id: u32) -> Result<Vec<Placement>, MigError> {
            self.0.possible_placements(gpu, profile_id)
        }
        fn create_gpu_instance(&self, gpu: u32, id: u32, at: Placement) -> Result<GpuInstanceInfo, MigError> {
            self.0.create_gpu_instance(gpu, id, at)
        }
        fn create_compute_instance(&self, gpu: u32, gi: u32) -> Result<super::super::ComputeInstanceInfo, MigError> {
            self.0.create_compute_instance(gpu, gi)
        }
        fn destroy_compute_instance(&self, gpu: u32, gi: u32, ci: u32) -> Result<(), MigError> {
            self.0.destroy_compute_instance(gpu, gi, ci)
        }
        fn destroy_gpu_instance(&self, gpu: u32, gi: u32) -> Result<(), MigError> {
            self.0.destroy_gpu_instance(gpu, gi)
        }
        fn mig_devices(&self, gpu: u32) -> Result<Vec<super::super::MigDeviceInfo>, MigError> {
            self.0.mig_devices(gpu)
        }
        fn gpu_instance_in_use(&self, _gpu: u32, _gi: u32) -> Result<bool, MigError> {
            Ok(false)
        }
    }

    #[test]
    fn refused_as_in_use_mid_way_is_kept() {
        let sim = SimulatedNvml::from_spec("h100:mig=3g.40gb+2g.20gb+1g.10gb+1g.10gb").unwrap();
        let gis = sim.gpu_instances(0).unwrap();
        let three = gis.iter().find(|g| g.profile_id == 9).unwrap().id;
        sim.set_busy(0, three, true).unwrap();
        let ctl = MissesProcesses(sim);
        let report = Planner::new(&ctl).apply(0, &["7g.80gb"], IDLE).unwrap();
        assert!(!report.converged);
        assert_eq!(report.unmet, ["7g.80gb"]);
        let left = ctl.0.gpu_instances(0).unwrap();
        assert!(left.iter().any(|g| g.id == three), "busy instance destroyed: {left:?}");
        assert!(
            report
                .actions
                .iter()
                .any(|a| matches!(a, PlanAction::KeepBusy { gpu_instance, .. } if *gpu_instance == three))
        );
        check_invariants(&ctl, 0, GpuModel::H100_80GB);
    }

    #[test]
    fn busy_instance_of_a_desired_profile_counts_towards_it() {
        let sim = SimulatedNvml::from_spec("h100:mig=1g.10gb").unwrap();
        let gi = sim.gpu_instances(0).unwrap()[0];
        sim.set_busy(0, gi.id, true).unwrap();
        let busy = |g: &GpuInstanceInfo| g.id == gi.id;
        let report = Planner::new(&sim).apply(0, &["1g.10gb", "1g.10gb"], &busy).unwrap();
        assert!(report.converged);
        assert_eq!(sim.gpu_instances(0).unwrap().len(), 2);
    }

    #[test]
    fn errors_before_touching_anything() {
        let sim = SimulatedNvml::from_spec("h100:mig=7g.80gb,h100,a100-40gb:mig").unwrap();
        let p = Planner::new(&sim);
        assert!(matches!(p.apply(0, &["4g.40gb", "4g.40gb"], IDLE), Err(MigError::Layout(_))));
        assert!(matches!(p.apply(0, &["1g.18gb"], IDLE), Err(MigError::Layout(_))));
        assert_eq!(sim.mutations(), 0);
        assert_eq!(sim.gpu_instances(0).unwrap().len(), 1);
        assert!(matches!(p.apply(1, &["1g.10gb"], IDLE), Err(MigError::MigDisabled { gpu: 1 })));
        assert!(sim.gpu(1).unwrap().mig == Some(super::super::MigMode { current: false, pending: false }));
        assert!(matches!(p.apply(7, &["1g.10gb"], IDLE), Err(MigError::NoSuchGpu(7))));
        // A100 40GB names.
        assert!(p.apply(2, &["1g.5gb", "1g.10gb"], IDLE).unwrap().converged);
        // Empty desired layout: everything idle goes.
        assert!(p.apply(0, &[] as &[&str], IDLE).unwrap().converged);
        assert!(sim.gpu_instances(0).unwrap().is_empty());
    }

    fn names(model: GpuModel, idx: &[usize]) -> Vec<&'static str> {
        idx.iter().map(|&i| model.profiles()[i % 6].name).collect()
    }

    proptest! {
        #[test]
        fn planner_converges_and_keeps_invariants(
            model in prop::sample::select(GpuModel::ALL.to_vec()),
            start in prop::collection::vec((0usize..6, 0u32..8, any::<bool>(), 0u8..4), 0..10),
            desired in prop::collection::vec(0usize..6, 0..8),
            tell_busy in any::<bool>(),
            fault in prop::option::of(0usize..10),
        ) {
            let sim = SimulatedNvml::new([SimGpuSpec::new(model, true)]).unwrap();
            // A random starting state: some instances, some without compute instance, some busy.
            let mut busy_ids: BTreeSet<u32> = BTreeSet::new();
            for (p, s, with_ci, busy) in start {
                let prof = &model.profiles()[p];
                if let Ok(gi) = sim.create_gpu_instance(0, prof.id, Placement::new(s, prof.memory_slices)) {
                    if with_ci { sim.create_compute_instance(0, gi.id).unwrap(); }
                    if busy == 0 {
                        sim.set_busy(0, gi.id, true).unwrap();
                        busy_ids.insert(gi.id);
                    }
                }
            }
            let busy_before: Vec<GpuInstanceInfo> =
                sim.gpu_instances(0).unwrap().into_iter().filter(|g| busy_ids.contains(&g.id)).collect();
            let want = names(model, &desired);
            let told = |g: &GpuInstanceInfo| tell_busy && busy_ids.contains(&g.id);
            let planner = Planner::new(&sim);
            let valid = Layout::plan(model, &want).is_ok();

            sim.fail_after(fault);
            let first = planner.apply(0, &want, &told);
            sim.fail_after(None);
            check_invariants(&sim, 0, model);
            if !valid {
                prop_assert!(matches!(first, Err(MigError::Layout(_))));
                return Ok(());
            }
            let report = planner.apply(0, &want, &told).unwrap();
            check_invariants(&sim, 0, model);

            // Busy instances are all still there, unchanged.
            let now = sim.gpu_instances(0).unwrap();
            for b in &busy_before {
                prop_assert!(now.contains(b), "busy {b:?} was destroyed");
            }
            if report.converged {
                let mut have: Vec<_> = now.iter().map(|g| g.profile_id).collect();
                let mut w: Vec<_> = want.iter().map(|n| model.profile_by_name(n).unwrap().id).collect();
                have.sort_unstable();
                w.sort_unstable();
                prop_assert_eq!(have, w);
                prop_assert_eq!(sim.mig_devices(0).unwrap().len(), now.len());
            }
            if busy_before.is_empty() {
                prop_assert!(report.converged, "{:?}", report);
            }
            // Idempotent: a second run changes nothing.
            let m = sim.mutations();
            let again = planner.apply(0, &want, &told).unwrap();
            prop_assert!(!again.changed(), "{:?}", again.actions);
            prop_assert_eq!(sim.mutations(), m);
            prop_assert_eq!(again.converged, report.converged);
        }
    }
}
