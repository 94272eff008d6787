//! Demand-driven MIG layouts in the running pool (`gpupool-balancer serve
//! --mig-policy dynamic`; `docs/fleetsim.md` measures the policy). From the
//! live leases and the waiting requests, [`planner::plan`] chooses new
//! layouts for idle MIG GPUs (no lease on any of their instances). A chosen
//! GPU's instances leave placement at once (its server's description in
//! the pool loses them), and its server is ordered, at its next heartbeat,
//! to destroy them and create the new ones; it then registers again, and
//! the queue is served from the new instances. Leases elsewhere are never
//! touched: only a GPU without leases is laid out anew.

use super::fleet::{GpuModel, MODELS, ProfileShape};
use super::planner::{self, Candidate, Catalog};
use super::{ClassKey, LeaseClass, Need, Pool};
use std::collections::HashMap;

/// An order for a server: lay out one idle MIG GPU anew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayout {
    pub server_id: String,
    /// The GPU's `GPU-…` uuid.
    pub gpu_uuid: String,
    /// The new layout's profile names, by start slice.
    pub profiles: Vec<String>,
}

/// Re-layouts ordered and not yet come back.
#[derive(Debug, Default)]
pub(super) struct Relayouts {
    /// By GPU uuid: (server id, when ordered, delivered to the server).
    pending: HashMap<String, (String, u64, bool)>,
    /// Orders for each server's next heartbeat.
    orders: HashMap<String, Vec<Relayout>>,
}

/// A GPU whose re-layout has not come back after this long may be planned
/// again (its server did not act on the order, or lost it).
const PENDING_MS: u64 = 120_000;

/// A GPU the planner may look at.
struct Gpu {
    server: u32,
    index: usize,
    uuid: String,
    /// (profile id, start) of its instances.
    layout: Vec<(u32, u32)>,
    leased: bool,
}

impl Pool {
    /// Plans new layouts for idle MIG GPUs from demand (live leases and
    /// waiting requests per profile) against supply (instances per profile),
    /// at most `max_changes`; each chosen GPU leaves placement and its
    /// server gets the order with its next heartbeat
    /// ([`Pool::take_relayouts`]). Returns the orders made now.
    pub fn plan_layouts(&mut self, max_changes: usize, now_ms: u64) -> Vec<Relayout> {
        self.advance(now_ms);
        self.relayouts.pending.retain(|_, (_, at, _)| now_ms.saturating_sub(*at) < PENDING_MS);
        let mut made = Vec::new();
        let mut claimed = vec![false; self.queue.len()];
        for model in MODELS {
            if made.len() >= max_changes {
                break;
            }
            let gpus = self.mig_gpus(model);
            if gpus.iter().all(|g| g.leased) {
                continue;
            }
            let mut catalog = Catalog::new(model);
            let index = |id: u32| model.profiles.iter().position(|p| p.id == id);
            let n = model.profiles.len();
            let (mut demand, mut supply) = (vec![0u32; n], vec![0u32; n]);
            let mut candidates = Vec::new();
            for (i, gpu) in gpus.iter().enumerate() {
                for &(id, _) in &gpu.layout {
                    if let Some(p) = index(id) {
                        supply[p] += 1;
                    }
                }
                if !gpu.leased {
                    candidates.push(Candidate { gpu: i, layout: catalog.index_of(&gpu.layout), evictions: 0 });
                }
            }
            for entry in self.leases.values() {
                let inst = self.instances.get(entry.inst);
                if let Some(p) = inst.profile.as_ref().and_then(|p| index(p.id))
                    && gpus.iter().any(|g| g.server == inst.server && g.uuid == self.gpu_of(entry.inst))
                {
                    demand[p] += 1;
                }
            }
            // A waiting request counts for the smallest profile of the
            // first model that could hold it.
            for (w, waiter) in self.queue.values().enumerate() {
                if claimed[w] {
                    continue;
                }
                let need = Need::of(&waiter.req);
                if need.class != LeaseClass::Exclusive {
                    continue;
                }
                if let Some(p) = model.profiles.iter().position(|p| self.profile_fits(model, p, &need)) {
                    demand[p] += 1;
                    claimed[w] = true;
                }
            }
            let changes = planner::plan(&catalog, &demand, &supply, &candidates, max_changes - made.len());
            for change in changes {
                let gpu = &gpus[change.gpu];
                let mut layout = catalog.layouts()[change.to].clone();
                layout.sort_by_key(|&(_, start)| start);
                let profiles =
                    layout.iter().filter_map(|&(id, _)| model.profile(id).map(|p| p.name.to_owned())).collect();
                made.push(self.withdraw(gpu, profiles, now_ms));
            }
        }
        made
    }

    /// The re-layout orders for `server_id`'s next heartbeat.
    pub fn take_relayouts(&mut self, server_id: &str) -> Vec<Relayout> {
        let orders = self.relayouts.orders.remove(server_id).unwrap_or_default();
        for o in &orders {
            if let Some(p) = self.relayouts.pending.get_mut(&o.gpu_uuid) {
                p.2 = true;
            }
        }
        orders
    }

    /// Re-layouts ordered whose GPU has not come back yet.
    pub fn relayouts_pending(&self) -> usize {
        self.relayouts.pending.len()
    }

    /// A server registered: the GPUs whose order it had taken are back.
    pub(super) fn relayouts_registered(&mut self, server_id: &str) {
        self.relayouts.pending.retain(|_, (server, _, delivered)| !(*delivered && server == server_id));
    }

    /// The memory of the smallest profile of a registered MIG GPU's model
    /// that would hold `need` (an instance a re-layout could create).
    pub(super) fn creatable_memory(&self, need: &Need<'_>) -> Option<u64> {
        let models = self.servers.iter().flat_map(|(_, s)| &s.spec.gpus).filter(|g| g.mig);
        let models = models.filter_map(|g| MODELS.into_iter().find(|m| m.name == g.name));
        let mut best: Option<u64> = None;
        for model in models {
            if let Some(p) = model.profiles.iter().find(|p| self.profile_fits(model, p, need)) {
                let memory = self.profile_memory(p);
                best = Some(best.map_or(memory, |b| b.min(memory)));
            }
        }
        best
    }

    /// The MIG GPUs of `model` on servers that take new leases, with no
    /// re-layout pending.
    fn mig_gpus(&self, model: &GpuModel) -> Vec<Gpu> {
        let mut out = Vec::new();
        for (s, server) in self.servers.iter() {
            if server.draining {
                continue;
            }
            let mut keys = server.insts.iter();
            for (index, g) in server.spec.gpus.iter().enumerate() {
                let insts: Vec<u32> = keys.by_ref().take(g.instances.len()).copied().collect();
                if !g.mig || g.name != model.name || self.relayouts.pending.contains_key(&g.uuid) {
                    continue;
                }
                let leased = insts.iter().any(|&k| !self.instances.get(k).is_free());
                let mut layout: Vec<(u32, u32)> = g
                    .instances
                    .iter()
                    .filter_map(|i| Some((i.profile.as_ref()?.id, i.placement.map_or(0, |p| p.0))))
                    .collect();
                layout.sort_by_key(|&(_, start)| start);
                out.push(Gpu { server: s, index, uuid: g.uuid.clone(), layout, leased });
            }
        }
        out
    }

    /// The uuid of the GPU that instance `k` is on.
    fn gpu_of(&self, k: u32) -> String {
        let inst = self.instances.get(k);
        let server = self.servers.get(inst.server);
        let mut keys = server.insts.iter();
        for g in &server.spec.gpus {
            if keys.by_ref().take(g.instances.len()).any(|&i| i == k) {
                return g.uuid.clone();
            }
        }
        String::new()
    }

    /// Whether an instance of profile `p` would hold `need`: its memory as
    /// registered instances of the profile report it (the smallest), else
    /// as the model's table says.
    fn profile_fits(&self, model: &GpuModel, p: &ProfileShape, need: &Need<'_>) -> bool {
        let key =
            ClassKey { memory: self.profile_memory(p), sms: p.sms, gpu_sms: model.sms, profile: Some(p.profile()) };
        key.fits(need)
    }

    /// Profile `p`'s memory as registered instances of it report it (the
    /// smallest), else as the model's table says.
    fn profile_memory(&self, p: &ProfileShape) -> u64 {
        let registered = self.instances.iter().filter(|(_, i)| i.profile.as_ref().is_some_and(|q| q.id == p.id));
        registered.map(|(_, i)| i.memory).min().unwrap_or_else(|| p.memory())
    }

    /// Takes `gpu`'s instances out of placement and queues the order.
    fn withdraw(&mut self, gpu: &Gpu, profiles: Vec<String>, now_ms: u64) -> Relayout {
        let mut spec = self.servers.get(gpu.server).spec.clone();
        spec.gpus[gpu.index].instances.clear();
        self.replace_server(gpu.server, spec, now_ms);
        let server_id = self.servers.get(gpu.server).spec.id.clone();
        let order = Relayout { server_id: server_id.clone(), gpu_uuid: gpu.uuid.clone(), profiles };
        self.relayouts.pending.insert(gpu.uuid.clone(), (server_id.clone(), now_ms, false));
        self.relayouts.orders.entry(server_id).or_default().push(order.clone());
        self.counters.relayouts += 1;
        order
    }
}
