//! One policy over one trace: the event loop around the real pool.
//!
//! The simulator plays the parts around the balancer: the functions'
//! runtime (keep-alive of warm sessions, cold and lukewarm starts, eviction
//! of idle sessions under pressure) and the gpu-servers (MIG layouts, their
//! re-layout). Every placement decision is the pool's own ([`Pool`]):
//! allocation, its queue and grants, releases and re-registration with a
//! new layout. The dynamic planner is the pool's too
//! ([`crate::pool::planner`]).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::SimError;
use super::trace::{Function, Trace};
use crate::pool::fleet::{self, COMPUTE_SLICES, GpuModel, SLICES};
use crate::pool::planner::{self, Candidate, Catalog, Layout};
use crate::pool::{
    Allocation, LeaseClass, LeaseId, Policy as Placement, Pool, PoolConfig, PoolError, Quota, Request, ServerSpec,
    Ticket,
};

const MIB: u64 = 1 << 20;

/// How a policy lays out its GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layouts {
    /// Every GPU has this MIG layout for the whole run.
    Static(Layout),
    /// MIG off: whole GPUs, leased alone.
    WholeExclusive,
    /// MIG off: whole GPUs shared under MPS by several functions' sessions.
    WholeShared,
    /// Every GPU starts with this layout; the planner re-lays out GPUs with
    /// no session running from demand per profile.
    Dynamic(Layout),
}

/// Which idle warm session makes room when a request finds nothing free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Eviction {
    /// The least recently used; its state is dropped (the next start of
    /// its function is cold).
    Lru,
    /// The one whose function is expected back last (last use plus its
    /// mean time between invocations); its memory is swapped to host
    /// memory (lukewarm), from where a later start restores it at the
    /// swap rate, skipping the runtime, context and module start.
    Hotness,
}

/// A policy: a layout and an eviction rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Its name in the results.
    pub name: String,
    /// How GPUs are laid out.
    pub layouts: Layouts,
    /// Which idle session makes room.
    pub eviction: Eviction,
}

/// The fleet and the costs the simulator charges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetParams {
    /// Servers in the fleet.
    pub servers: usize,
    /// GPUs per server.
    pub gpus_per_server: u32,
    /// GPU model: `h100-80gb`, `h200-141gb` or `a100-80gb`.
    pub model: String,
    /// An idle warm session is kept this long after its last invocation.
    pub keepalive_s: f64,
    /// An invocation that has waited this long for a session is dropped (an SLO miss).
    pub max_wait_s: f64,
    /// Cold start: runtime and framework start in the function, ms.
    pub runtime_init_ms: f64,
    /// Cold start: CUDA context creation (measured on an H100: ~360 ms).
    pub context_ms: f64,
    /// Cold start: module load (measured: ~130 ms).
    pub module_ms: f64,
    /// Cold start: loading the function's memory (weights), ms per GiB.
    pub load_ms_per_gib: f64,
    /// Lukewarm start: swap-in rate from host memory, GiB/s (pinned HtoD on the H200: ~49 GiB/s).
    pub swap_gib_per_s: f64,
    /// Lukewarm start: fixed cost, ms.
    pub swap_overhead_ms: f64,
    /// How long a lukewarm copy stays in host memory, s.
    pub lukewarm_keep_s: f64,
    /// Host memory for lukewarm copies, GiB per server.
    pub host_gib_per_server: f64,
    /// Slow-down of an invocation on a whole GPU shared under MPS (measured
    /// on the H200: four small clients at once each took 234 ms for 229 ms
    /// alone).
    pub mps_slowdown: f64,
    /// Dynamic layouts: the planner runs every this many seconds, on the
    /// demand seen since it last ran.
    pub plan_window_s: f64,
    /// Dynamic layouts: most GPUs re-laid out per window.
    pub plan_max_changes: usize,
    /// Dynamic layouts: demand is the window's peak times (1 + headroom).
    pub demand_headroom: f64,
    /// Dynamic layouts: time a GPU is out of service while its instances are
    /// destroyed and created, ms.
    pub reconfig_ms: f64,
    /// Metrics sampling interval (fragmentation, plots), s.
    pub sample_s: f64,
}

impl Default for FleetParams {
    fn default() -> Self {
        Self {
            servers: 125,
            gpus_per_server: 8,
            model: "h100-80gb".into(),
            keepalive_s: 600.0,
            max_wait_s: 60.0,
            runtime_init_ms: 1_000.0,
            context_ms: 360.0,
            module_ms: 130.0,
            load_ms_per_gib: 20.0,
            swap_gib_per_s: 40.0,
            swap_overhead_ms: 10.0,
            lukewarm_keep_s: 3_600.0,
            host_gib_per_server: 1_024.0,
            mps_slowdown: 1.03,
            plan_window_s: 60.0,
            plan_max_changes: 32,
            demand_headroom: 0.1,
            reconfig_ms: 2_000.0,
            sample_s: 60.0,
        }
    }
}

impl FleetParams {
    /// The model, or every problem with the parameters.
    pub fn validate(&self) -> Result<&'static GpuModel, SimError> {
        let mut p = Vec::new();
        let model = GpuModel::lookup(&self.model);
        if model.is_none() {
            p.push(format!("model {:?} is not h100-80gb, h200-141gb or a100-80gb", self.model));
        }
        if self.servers == 0 || self.servers > 100_000 || self.gpus_per_server == 0 || self.gpus_per_server > 64 {
            p.push(format!("{} servers of {} GPUs: 1..=100000 of 1..=64", self.servers, self.gpus_per_server));
        }
        super::check_values(
            &mut p,
            true,
            &[
                ("keepalive_s", self.keepalive_s),
                ("max_wait_s", self.max_wait_s),
                ("swap_gib_per_s", self.swap_gib_per_s),
                ("plan_window_s", self.plan_window_s),
                ("sample_s", self.sample_s),
                ("mps_slowdown", self.mps_slowdown),
            ],
        );
        super::check_values(
            &mut p,
            false,
            &[
                ("runtime_init_ms", self.runtime_init_ms),
                ("context_ms", self.context_ms),
                ("module_ms", self.module_ms),
                ("load_ms_per_gib", self.load_ms_per_gib),
                ("swap_overhead_ms", self.swap_overhead_ms),
                ("lukewarm_keep_s", self.lukewarm_keep_s),
                ("host_gib_per_server", self.host_gib_per_server),
                ("demand_headroom", self.demand_headroom),
                ("reconfig_ms", self.reconfig_ms),
            ],
        );
        match model {
            Some(model) if p.is_empty() => Ok(model),
            _ => Err(SimError::Params(p.join("; "))),
        }
    }
}

/// What one policy did over the trace.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcome {
    /// The policy's name.
    pub policy: String,
    /// GPUs in the fleet.
    pub gpus: usize,
    /// Simulated time, h.
    pub hours: f64,
    /// Invocations that arrived.
    pub invocations: u64,
    /// Invocations that started.
    pub served: u64,
    /// Invocations that started within their SLO (queue wait + start-up).
    pub within_slo: u64,
    /// Invocations that no instance of the fleet can ever hold.
    pub unservable: u64,
    /// Invocations dropped after waiting `max_wait_s`, or still waiting at the end.
    pub dropped: u64,
    /// Starts that were cold.
    pub cold_starts: u64,
    /// Starts restored from a lukewarm copy.
    pub lukewarm_starts: u64,
    /// Idle sessions evicted to make room.
    pub evictions: u64,
    /// GPUs re-laid out.
    pub reconfigurations: u64,
    /// Mean busy compute (running or starting an invocation) over the fleet's compute slices.
    pub sm_utilization: f64,
    /// Mean memory the sessions need over the fleet's memory.
    pub memory_utilization: f64,
    /// Mean, over samples with requests waiting, of the free memory slices
    /// that fit none of them over all memory slices.
    pub fragmentation: f64,
    /// Samples with requests waiting, over all samples.
    pub waiting_samples: f64,
    /// Events handled (arrivals, completions, keep-alive checks, planner and sampling ticks).
    pub events: u64,
    /// Wall-clock time of the run, s.
    pub wall_s: f64,
    /// Per sample: (hours, SLO hit rate in the interval, SM utilization, memory utilization, waiting requests).
    #[serde(skip)]
    pub timeline: Vec<[f64; 5]>,
}

impl Outcome {
    /// Within-SLO starts over arrivals.
    pub fn slo_hit_rate(&self) -> f64 {
        if self.invocations == 0 { 1.0 } else { self.within_slo as f64 / self.invocations as f64 }
    }

    /// GPU-hours of the fleet.
    pub fn gpu_hours(&self) -> f64 {
        self.gpus as f64 * self.hours
    }
}

/// An instance the fleet has had (its uuid's index in `Sim::instances`).
#[derive(Debug, Clone, Copy)]
struct Inst {
    gpu: u32,
    /// Index into the model's profiles; `None`: a whole GPU.
    profile: Option<u8>,
    slices: u32,
    compute: f64,
    /// Sessions on it (more than one only for a shared whole GPU).
    sessions: u32,
    /// Part of its GPU's current layout (instances of earlier layouts stay in the table).
    live: bool,
}

#[derive(Debug, Clone)]
struct Gpu {
    server: u32,
    /// Catalog index of its layout (MIG policies).
    layout: usize,
    reconfiguring: bool,
    /// Live sessions on it.
    sessions: Vec<u32>,
    /// Of those, running or starting an invocation.
    busy: u32,
    /// Its instances as last registered.
    insts: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Busy,
    Idle,
    Dead,
}

#[derive(Debug, Clone)]
struct Session {
    function: u32,
    lease: LeaseId,
    inst: u32,
    state: State,
    last_used: u64,
    /// A keep-alive check is queued.
    check_queued: bool,
    /// Key in the idle index while idle.
    idle_key: (u8, u64),
    generation: u32,
    compute: f64,
    renewed: u64,
}

#[derive(Debug, Default, Clone)]
struct FnState {
    /// Invocations waiting for a session: (arrival, duration).
    waiting: VecDeque<(u64, u32)>,
    /// Pool tickets for new sessions, oldest first (never more than waiting).
    tickets: Vec<Ticket>,
    /// Idle sessions, most recently used last.
    idle: Vec<u32>,
    live: u32,
    /// Expiry times of lukewarm copies in host memory.
    lukewarm: VecDeque<u64>,
    last_arrival: Option<u64>,
    /// Mean time between invocations (EWMA), ms.
    gap_ms: f64,
    listed_waiting: bool,
}

/// Precomputed per function.
#[derive(Debug, Clone)]
struct FnInfo {
    request: Request,
    memory: u64,
    cold_ms: u64,
    lukewarm_ms: u64,
    slo_ms: u64,
    /// Smallest profile that fits it (its demand class); `None`: none does.
    need: Option<u8>,
    /// Instance classes (profile index, or the whole GPU last) that fit it, smallest first.
    fits: Vec<u8>,
    gib: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Done(u32, u32),
    Check(u32, u32),
    Plan,
    Reconfigured(u32),
    Sample,
    Sweep,
    Heartbeat,
}

/// The simulation of one policy.
struct Sim<'a> {
    trace: &'a Trace,
    params: &'a FleetParams,
    policy: &'a PolicySpec,
    model: &'static GpuModel,
    catalog: Catalog,
    pool: Pool,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    gpus: Vec<Gpu>,
    instances: Vec<Inst>,
    uuids: HashMap<String, u32>,
    sessions: Vec<Session>,
    free_sessions: Vec<u32>,
    fns: Vec<FnState>,
    info: Vec<FnInfo>,
    tickets: HashMap<Ticket, u32>,
    waiting_fns: Vec<u32>,
    /// Idle sessions by instance class, (key, session): the first is evicted first.
    idle_index: Vec<BTreeSet<(u64, u32)>>,
    /// Dynamic layouts: live sessions plus tickets per demand class, now and the window's peak.
    demand_now: Vec<u32>,
    demand_peak: Vec<u32>,
    /// Requests refused in the window because no instance fits them, by demand class.
    refused: Vec<u32>,
    lukewarm_gib: f64,
    // Integrals over time.
    busy_compute: f64,
    need_memory: u64,
    last_t: u64,
    area_compute: f64,
    area_memory: f64,
    interval: (u64, u64),
    frag_sum: f64,
    samples: u64,
    waiting_samples: u64,
    out: Outcome,
}

/// Runs `policy` over `trace` on the fleet of `params` (validated).
pub fn simulate(trace: &Trace, params: &FleetParams, policy: &PolicySpec) -> Result<Outcome, SimError> {
    let started = std::time::Instant::now();
    let mut sim = Sim::new(trace, params, policy)?;
    sim.run()?;
    sim.out.wall_s = started.elapsed().as_secs_f64();
    Ok(sim.out)
}

impl<'a> Sim<'a> {
    fn new(trace: &'a Trace, params: &'a FleetParams, policy: &'a PolicySpec) -> Result<Self, SimError> {
        let model = params.validate()?;
        let mut catalog = Catalog::new(model);
        let config = PoolConfig {
            // Packing leases onto busy servers leaves others' GPUs idle, free to re-lay out.
            policy: Placement::Binpack,
            lease_ttl_ms: 86_400_000,
            heartbeat_timeout_ms: 86_400_000,
            queue_capacity: 1 << 20,
            // The simulated functions all opt in to sharing a GPU (whole-shared policy).
            default_quota: Quota { share_fate_across_tenants: true, ..Quota::default() },
            ..PoolConfig::default()
        };
        config.validate().map_err(SimError::Params)?;
        let initial = match &policy.layouts {
            Layouts::Static(l) | Layouts::Dynamic(l) => {
                check_layout(model, l)?;
                catalog.index_of(l)
            }
            Layouts::WholeExclusive | Layouts::WholeShared => 0,
        };
        let n_gpus = params.servers * params.gpus_per_server as usize;
        let gpus = (0..n_gpus)
            .map(|g| Gpu {
                server: (g / params.gpus_per_server as usize) as u32,
                layout: initial,
                reconfiguring: false,
                sessions: Vec::new(),
                busy: 0,
                insts: Vec::new(),
            })
            .collect();
        let shared = policy.layouts == Layouts::WholeShared;
        let info = trace.functions.iter().map(|f| fn_info(f, model, params, shared)).collect();
        let classes = model.profiles.len() + 1;
        let mut sim = Sim {
            trace,
            params,
            policy,
            model,
            catalog,
            pool: Pool::new(config, 0),
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            gpus,
            instances: Vec::new(),
            uuids: HashMap::new(),
            sessions: Vec::new(),
            free_sessions: Vec::new(),
            fns: vec![FnState { gap_ms: 3_600_000.0, ..FnState::default() }; trace.functions.len()],
            info,
            tickets: HashMap::new(),
            waiting_fns: Vec::new(),
            idle_index: vec![BTreeSet::new(); classes],
            demand_now: vec![0; classes],
            demand_peak: vec![0; classes],
            refused: vec![0; classes],
            lukewarm_gib: 0.0,
            busy_compute: 0.0,
            need_memory: 0,
            last_t: 0,
            area_compute: 0.0,
            area_memory: 0.0,
            interval: (0, 0),
            frag_sum: 0.0,
            samples: 0,
            waiting_samples: 0,
            out: Outcome {
                policy: policy.name.clone(),
                gpus: n_gpus,
                hours: trace.length_ms as f64 / 3_600_000.0,
                ..Outcome::default()
            },
        };
        for s in 0..params.servers {
            let spec = sim.server_spec(s);
            let grants = sim.pool.register(spec, 0).map_err(SimError::Pool)?;
            debug_assert!(grants.is_empty());
        }
        sim.schedule(ms(params.sample_s * 1000.0), Ev::Sample);
        sim.schedule(1_000, Ev::Sweep);
        sim.schedule(3_600_000, Ev::Heartbeat);
        if matches!(policy.layouts, Layouts::Dynamic(_)) {
            sim.schedule(ms(params.plan_window_s * 1000.0), Ev::Plan);
        }
        Ok(sim)
    }

    /// Server `s`'s description as it registers now; links new instance uuids.
    fn server_spec(&mut self, s: usize) -> ServerSpec {
        let per = self.params.gpus_per_server;
        let mut gpus = Vec::with_capacity(per as usize);
        for g in 0..per {
            let gi = s * per as usize + g as usize;
            let gpu = &self.gpus[gi];
            let spec = match &self.policy.layouts {
                Layouts::WholeExclusive | Layouts::WholeShared => fleet::whole_gpu_of(self.model, s, g),
                Layouts::Static(_) | Layouts::Dynamic(_) if gpu.reconfiguring => {
                    fleet::mig_gpu_of(self.model, s, g, &[])
                }
                Layouts::Static(_) | Layouts::Dynamic(_) => {
                    fleet::mig_gpu_of(self.model, s, g, &self.catalog.layouts()[gpu.layout])
                }
            };
            for k in std::mem::take(&mut self.gpus[gi].insts) {
                self.instances[k as usize].live = false;
            }
            for inst in &spec.instances {
                if let Some(&k) = self.uuids.get(&inst.uuid) {
                    self.instances[k as usize].live = true;
                    self.gpus[gi].insts.push(k);
                    continue;
                }
                let profile = inst
                    .profile
                    .as_ref()
                    .and_then(|p| self.model.profiles.iter().position(|m| m.id == p.id))
                    .map(|i| i as u8);
                let (slices, compute) = match profile {
                    Some(i) => (self.model.profiles[i as usize].slices, self.model.profiles[i as usize].compute),
                    None => (SLICES, COMPUTE_SLICES),
                };
                let k = self.instances.len() as u32;
                self.uuids.insert(inst.uuid.clone(), k);
                self.gpus[gi].insts.push(k);
                self.instances.push(Inst {
                    gpu: gi as u32,
                    profile,
                    slices,
                    compute: f64::from(compute),
                    sessions: 0,
                    live: true,
                });
            }
            gpus.push(spec);
        }
        fleet::server(s, gpus)
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    fn run(&mut self) -> Result<(), SimError> {
        let end = self.trace.length_ms;
        let mut next = 0;
        loop {
            let arrival = self.trace.invocations.get(next).map(|i| i.at_ms);
            let event = self.events.peek().map(|Reverse((t, _, _))| *t).filter(|&t| t < end);
            // Events first on a tie: a completion frees its session for the arrival.
            let take_event = match (arrival, event) {
                (None, None) => break,
                (Some(a), Some(e)) => e <= a,
                (None, Some(_)) => true,
                (Some(_), None) => false,
            };
            self.out.events += 1;
            if take_event {
                let Reverse((t, _, ev)) = self.events.pop().expect("peeked");
                self.advance(t);
                self.handle(ev)?;
            } else {
                let inv = self.trace.invocations[next];
                next += 1;
                self.advance(inv.at_ms);
                self.arrive(inv.function, inv.duration_ms)?;
            }
        }
        self.advance(end);
        // Still waiting at the end: not served.
        self.out.dropped += self.fns.iter().map(|f| f.waiting.len() as u64).sum::<u64>();
        let span = end.max(1) as f64;
        let compute_total = self.gpus.len() as f64 * f64::from(COMPUTE_SLICES);
        let memory_total = self.gpus.len() as f64 * self.model.memory as f64;
        self.out.sm_utilization = self.area_compute / span / compute_total;
        self.out.memory_utilization = self.area_memory / span / memory_total;
        self.out.fragmentation =
            if self.waiting_samples == 0 { 0.0 } else { self.frag_sum / self.waiting_samples as f64 };
        self.out.waiting_samples = self.waiting_samples as f64 / self.samples.max(1) as f64;
        Ok(())
    }

    fn advance(&mut self, t: u64) {
        if t > self.last_t {
            let dt = (t - self.last_t) as f64;
            self.area_compute += self.busy_compute * dt;
            self.area_memory += self.need_memory as f64 * dt;
            self.last_t = t;
        }
        self.now = t;
    }

    fn handle(&mut self, ev: Ev) -> Result<(), SimError> {
        match ev {
            Ev::Done(s, g) => self.done(s, g),
            Ev::Check(s, g) => self.check(s, g),
            Ev::Plan => {
                self.plan()?;
                self.schedule(self.now + ms(self.params.plan_window_s * 1000.0), Ev::Plan);
                Ok(())
            }
            Ev::Reconfigured(g) => self.reconfigured(g),
            Ev::Sample => {
                self.sample();
                self.schedule(self.now + ms(self.params.sample_s * 1000.0), Ev::Sample);
                Ok(())
            }
            Ev::Sweep => {
                self.sweep();
                self.schedule(self.now + 1_000, Ev::Sweep);
                Ok(())
            }
            Ev::Heartbeat => {
                // Servers report in; the pool drains a silent one.
                for s in 0..self.params.servers {
                    self.pool.heartbeat(&fleet::server_id(s), Default::default(), self.now).map_err(SimError::Pool)?;
                }
                self.grants_pending()?;
                self.schedule(self.now + 3_600_000, Ev::Heartbeat);
                Ok(())
            }
        }
    }

    // ---- invocations ------------------------------------------------------

    fn arrive(&mut self, f: u32, duration: u32) -> Result<(), SimError> {
        self.out.invocations += 1;
        self.interval.1 += 1;
        let st = &mut self.fns[f as usize];
        if let Some(last) = st.last_arrival {
            st.gap_ms = 0.8 * st.gap_ms + 0.2 * (self.now - last) as f64;
        }
        st.last_arrival = Some(self.now);
        if let Some(s) = st.idle.pop() {
            self.unidle(s);
            self.start(s, self.now, duration, 0);
            return Ok(());
        }
        st.waiting.push_back((self.now, duration));
        self.request_session(f)
    }

    /// Asks the pool for a new session of `f` (it has a waiting invocation).
    fn request_session(&mut self, f: u32) -> Result<(), SimError> {
        let request = self.info[f as usize].request.clone();
        match self.pool.allocate(request, self.now, true) {
            Ok(Allocation::Granted(lease)) => self.new_session(f, lease.id, &lease.instance_uuid)?,
            Ok(Allocation::Queued(ticket)) => {
                self.tickets.insert(ticket, f);
                let st = &mut self.fns[f as usize];
                st.tickets.push(ticket);
                if !st.listed_waiting {
                    st.listed_waiting = true;
                    self.waiting_fns.push(f);
                }
                self.demand_add(f, 1);
                self.make_room(f)?;
            }
            Err(PoolError::Unsatisfiable { .. }) => {
                self.fns[f as usize].waiting.pop_back();
                self.out.unservable += 1;
                // No instance of the fleet fits it now; a planner may make one.
                if let Some(c) = self.info[f as usize].need {
                    self.refused[c as usize] += 1;
                }
            }
            Err(PoolError::QueueFull | PoolError::Exhausted) => {
                self.fns[f as usize].waiting.pop_back();
                self.out.dropped += 1;
            }
            Err(e) => return Err(SimError::Pool(e)),
        }
        self.grants_pending()
    }

    /// Evicts idle sessions that `f`'s request could use until its ticket
    /// is granted or none is left (a few at most: each frees an instance
    /// the request fits, except on shared GPUs).
    fn make_room(&mut self, f: u32) -> Result<(), SimError> {
        // On a shared GPU one eviction may not free enough: the next ones
        // are taken from the same GPU, so that the room adds up somewhere.
        let mut focus: Option<usize> = None;
        for _ in 0..8 {
            if self.fns[f as usize].tickets.is_empty() {
                break;
            }
            let victim = match focus {
                Some(g) => {
                    self.gpus[g].sessions.iter().copied().find(|&s| self.sessions[s as usize].state == State::Idle)
                }
                None => self.info[f as usize]
                    .fits
                    .iter()
                    .find_map(|&c| self.idle_index[c as usize].first().map(|&(_, s)| s)),
            };
            let Some(s) = victim else { break };
            if self.policy.layouts == Layouts::WholeShared {
                focus = Some(self.instances[self.sessions[s as usize].inst as usize].gpu as usize);
            }
            self.out.evictions += 1;
            self.end_session(s, self.policy.eviction == Eviction::Hotness)?;
        }
        Ok(())
    }

    fn new_session(&mut self, f: u32, lease: LeaseId, uuid: &str) -> Result<(), SimError> {
        let inst = *self.uuids.get(uuid).ok_or_else(|| SimError::Internal(format!("unknown instance {uuid}")))?;
        let i = self.instances[inst as usize];
        let compute = match self.info[f as usize].request.class {
            LeaseClass::Shared => {
                f64::from(self.info[f as usize].request.compute_percent) * f64::from(COMPUTE_SLICES) / 100.0
            }
            LeaseClass::Exclusive => i.compute,
        };
        let session = Session {
            function: f,
            lease,
            inst,
            state: State::Idle,
            last_used: self.now,
            check_queued: false,
            idle_key: (0, 0),
            generation: 0,
            compute,
            renewed: self.now,
        };
        let s = match self.free_sessions.pop() {
            Some(s) => {
                let generation = self.sessions[s as usize].generation + 1;
                self.sessions[s as usize] = Session { generation, ..session };
                s
            }
            None => {
                self.sessions.push(session);
                (self.sessions.len() - 1) as u32
            }
        };
        self.instances[inst as usize].sessions += 1;
        self.gpus[i.gpu as usize].sessions.push(s);
        self.need_memory += self.info[f as usize].memory;
        self.fns[f as usize].live += 1;
        self.demand_add(f, 1);
        // A lukewarm copy (not expired) restores faster than a cold start.
        let now = self.now;
        let st = &mut self.fns[f as usize];
        while st.lukewarm.front().is_some_and(|&e| e <= now) {
            st.lukewarm.pop_front();
            self.lukewarm_gib -= self.info[f as usize].gib;
        }
        let startup = if st.lukewarm.pop_back().is_some() {
            self.lukewarm_gib -= self.info[f as usize].gib;
            self.out.lukewarm_starts += 1;
            self.info[f as usize].lukewarm_ms
        } else {
            self.out.cold_starts += 1;
            self.info[f as usize].cold_ms
        };
        match self.next_waiting(f) {
            Some((at, duration)) => self.start(s, at, duration, startup),
            // Every waiting invocation was served or dropped meanwhile.
            None => self.rest(s),
        }
        Ok(())
    }

    /// The oldest invocation of `f` still worth serving.
    fn next_waiting(&mut self, f: u32) -> Option<(u64, u32)> {
        let max_wait = ms(self.params.max_wait_s * 1000.0);
        let st = &mut self.fns[f as usize];
        while let Some(&(at, d)) = st.waiting.front() {
            st.waiting.pop_front();
            if self.now - at <= max_wait {
                return Some((at, d));
            }
            self.out.dropped += 1;
        }
        None
    }

    /// Starts an invocation that arrived at `at` on session `s`, after `startup` ms.
    fn start(&mut self, s: u32, at: u64, duration: u32, startup: u64) {
        let session = &mut self.sessions[s as usize];
        let f = session.function as usize;
        session.state = State::Busy;
        let gpu = self.instances[session.inst as usize].gpu as usize;
        self.gpus[gpu].busy += 1;
        self.busy_compute += session.compute;
        let latency = self.now - at + startup;
        self.out.served += 1;
        if latency <= self.info[f].slo_ms {
            self.out.within_slo += 1;
            self.interval.0 += 1;
        }
        let run = match self.info[f].request.class {
            LeaseClass::Shared => (f64::from(duration) * self.params.mps_slowdown) as u64,
            LeaseClass::Exclusive => u64::from(duration),
        };
        let generation = session.generation;
        if self.now - session.renewed > 43_200_000 {
            // Leases last a day: a session in use that long renews.
            session.renewed = self.now;
            let lease = session.lease;
            let _ = self.pool.renew(lease, self.now);
        }
        self.schedule(self.now + startup + run, Ev::Done(s, generation));
    }

    fn done(&mut self, s: u32, generation: u32) -> Result<(), SimError> {
        let session = &self.sessions[s as usize];
        if session.generation != generation || session.state != State::Busy {
            return Ok(());
        }
        let f = session.function;
        let gpu = self.instances[session.inst as usize].gpu as usize;
        self.gpus[gpu].busy -= 1;
        self.busy_compute -= session.compute;
        if let Some((at, duration)) = self.next_waiting(f) {
            self.start(s, at, duration, 0);
            let st = &mut self.fns[f as usize];
            if st.tickets.len() > st.waiting.len()
                && let Some(t) = st.tickets.pop()
            {
                self.tickets.remove(&t);
                self.pool.cancel(t);
                self.demand_add(f, -1);
            }
            return Ok(());
        }
        self.rest(s);
        Ok(())
    }

    fn rest(&mut self, s: u32) {
        let now = self.now;
        let session = &mut self.sessions[s as usize];
        session.state = State::Idle;
        session.last_used = now;
        let f = session.function as usize;
        let class = self.instances[session.inst as usize].profile.map_or(self.model.profiles.len() as u8, |p| p);
        let key = match self.policy.eviction {
            Eviction::Lru => now,
            // Expected back last goes first.
            Eviction::Hotness => u64::MAX - (now + self.fns[f].gap_ms as u64),
        };
        session.idle_key = (class, key);
        self.idle_index[class as usize].insert((key, s));
        self.fns[f].idle.push(s);
        if !session.check_queued {
            session.check_queued = true;
            let generation = session.generation;
            self.schedule(now + ms(self.params.keepalive_s * 1000.0), Ev::Check(s, generation));
        }
    }

    /// Takes idle session `s` out of the idle index (it starts, or ends).
    fn unidle(&mut self, s: u32) {
        let session = &self.sessions[s as usize];
        let (class, key) = session.idle_key;
        self.idle_index[class as usize].remove(&(key, s));
    }

    fn check(&mut self, s: u32, generation: u32) -> Result<(), SimError> {
        let session = &mut self.sessions[s as usize];
        if session.generation != generation || session.state == State::Dead {
            return Ok(());
        }
        session.check_queued = false;
        if session.state != State::Idle {
            return Ok(());
        }
        let due = session.last_used + ms(self.params.keepalive_s * 1000.0);
        if due > self.now {
            session.check_queued = true;
            self.schedule(due, Ev::Check(s, generation));
            return Ok(());
        }
        // Kept alive long enough: hotness-aware runtimes keep a lukewarm copy.
        self.end_session(s, self.policy.eviction == Eviction::Hotness)
    }

    /// Ends idle session `s` and releases its lease; `lukewarm`: its memory
    /// goes to host memory first.
    fn end_session(&mut self, s: u32, lukewarm: bool) -> Result<(), SimError> {
        self.unidle(s);
        let session = &mut self.sessions[s as usize];
        debug_assert_eq!(session.state, State::Idle);
        session.state = State::Dead;
        let (f, inst, lease) = (session.function, session.inst, session.lease);
        self.free_sessions.push(s);
        let st = &mut self.fns[f as usize];
        let pos = st.idle.iter().position(|&x| x == s).expect("an idle session is listed idle");
        st.idle.remove(pos);
        st.live -= 1;
        let gib = self.info[f as usize].gib;
        if lukewarm && self.lukewarm_gib + gib <= self.params.host_gib_per_server * self.params.servers as f64 {
            st.lukewarm.push_back(self.now + ms(self.params.lukewarm_keep_s * 1000.0));
            self.lukewarm_gib += gib;
        }
        self.need_memory -= self.info[f as usize].memory;
        self.demand_add(f, -1);
        let i = &mut self.instances[inst as usize];
        i.sessions -= 1;
        let gpu = &mut self.gpus[i.gpu as usize];
        let pos = gpu.sessions.iter().position(|&x| x == s).expect("a session is listed on its GPU");
        gpu.sessions.swap_remove(pos);
        let grants = self.pool.release(lease).map_err(SimError::Pool)?;
        self.grant_all(grants)
    }

    fn grants_pending(&mut self) -> Result<(), SimError> {
        let grants = self.pool.take_grants();
        self.grant_all(grants)
    }

    fn grant_all(&mut self, grants: Vec<crate::pool::Grant>) -> Result<(), SimError> {
        for g in grants {
            let f = self.tickets.remove(&g.ticket).ok_or_else(|| SimError::Internal("a grant for no ticket".into()))?;
            let st = &mut self.fns[f as usize];
            let pos = st.tickets.iter().position(|&t| t == g.ticket).expect("a function lists its tickets");
            st.tickets.remove(pos);
            self.demand_add(f, -1);
            self.new_session(f, g.lease.id, &g.lease.instance_uuid)?;
        }
        Ok(())
    }

    /// Drops invocations that waited too long and the tickets they no longer need.
    fn sweep(&mut self) {
        let max_wait = ms(self.params.max_wait_s * 1000.0);
        let mut keep = Vec::with_capacity(self.waiting_fns.len());
        for f in std::mem::take(&mut self.waiting_fns) {
            let st = &mut self.fns[f as usize];
            while st.waiting.front().is_some_and(|&(at, _)| self.now - at > max_wait) {
                st.waiting.pop_front();
                self.out.dropped += 1;
            }
            let surplus = st.tickets.len().saturating_sub(st.waiting.len());
            let cancelled: Vec<Ticket> = st.tickets.drain(st.tickets.len() - surplus..).collect();
            for t in cancelled {
                self.tickets.remove(&t);
                self.pool.cancel(t);
                self.demand_add(f, -1);
            }
            let st = &mut self.fns[f as usize];
            if st.waiting.is_empty() && st.tickets.is_empty() {
                st.listed_waiting = false;
            } else {
                keep.push(f);
            }
        }
        self.waiting_fns = keep;
    }

    // ---- dynamic layouts --------------------------------------------------

    fn demand_add(&mut self, f: u32, delta: i32) {
        if let Some(c) = self.info[f as usize].need {
            let c = c as usize;
            self.demand_now[c] = self.demand_now[c].saturating_add_signed(delta);
            self.demand_peak[c] = self.demand_peak[c].max(self.demand_now[c]);
        }
    }

    fn plan(&mut self) -> Result<(), SimError> {
        let n = self.model.profiles.len();
        let demand: Vec<u32> = (0..n)
            .map(|c| {
                let peak = f64::from(self.demand_peak[c]) * (1.0 + self.params.demand_headroom);
                peak.ceil() as u32 + self.refused[c].min(self.gpus.len() as u32)
            })
            .collect();
        self.demand_peak.clone_from(&self.demand_now);
        self.refused.fill(0);
        let mut supply = vec![0u32; n];
        let mut candidates = Vec::new();
        for (g, gpu) in self.gpus.iter().enumerate() {
            if gpu.reconfiguring {
                continue;
            }
            for (c, count) in self.catalog.counts(gpu.layout).iter().enumerate() {
                supply[c] += count;
            }
            if gpu.busy == 0 {
                candidates.push(Candidate { gpu: g, layout: gpu.layout, evictions: gpu.sessions.len() as u32 });
            }
        }
        let changes = planner::plan(&self.catalog, &demand, &supply, &candidates, self.params.plan_max_changes);
        let mut servers = BTreeSet::new();
        for change in changes {
            let g = change.gpu;
            for s in self.gpus[g].sessions.clone() {
                self.out.evictions += 1;
                self.end_session(s, self.policy.eviction == Eviction::Hotness)?;
            }
            let gpu = &mut self.gpus[g];
            gpu.layout = change.to;
            gpu.reconfiguring = true;
            servers.insert(gpu.server);
            self.out.reconfigurations += 1;
            self.schedule(self.now + ms(self.params.reconfig_ms), Ev::Reconfigured(g as u32));
        }
        for s in servers {
            self.register(s as usize)?;
        }
        Ok(())
    }

    fn reconfigured(&mut self, g: u32) -> Result<(), SimError> {
        self.gpus[g as usize].reconfiguring = false;
        let s = self.gpus[g as usize].server;
        self.register(s as usize)
    }

    /// Re-registers server `s` with its GPUs' current layouts: the pool keeps
    /// leases on instances that stay, and serves its queue from new ones.
    fn register(&mut self, s: usize) -> Result<(), SimError> {
        let spec = self.server_spec(s);
        let grants = self.pool.register(spec, self.now).map_err(SimError::Pool)?;
        self.grant_all(grants)
    }

    // ---- metrics ----------------------------------------------------------

    fn sample(&mut self) {
        self.samples += 1;
        let waiting: Vec<u32> =
            self.waiting_fns.iter().copied().filter(|&f| !self.fns[f as usize].tickets.is_empty()).collect();
        let total_slices = (self.gpus.len() as u32 * SLICES) as f64;
        if !waiting.is_empty() && self.policy.layouts != Layouts::WholeShared {
            self.waiting_samples += 1;
            let classes = self.model.profiles.len() + 1;
            let mut useful = vec![false; classes];
            for &f in &waiting {
                for &c in &self.info[f as usize].fits {
                    useful[c as usize] = true;
                }
            }
            let stranded: u32 = self
                .instances
                .iter()
                .filter(|i| i.sessions == 0 && i.live)
                .filter(|i| !useful[i.profile.map_or(classes - 1, usize::from)])
                .map(|i| i.slices)
                .sum();
            self.frag_sum += f64::from(stranded) / total_slices;
        }
        let (hits, arrivals) = std::mem::take(&mut self.interval);
        let compute_total = self.gpus.len() as f64 * f64::from(COMPUTE_SLICES);
        let memory_total = self.gpus.len() as f64 * self.model.memory as f64;
        let rate = if arrivals == 0 { 1.0 } else { hits as f64 / arrivals as f64 };
        self.out.timeline.push([
            self.now as f64 / 3_600_000.0,
            rate,
            self.busy_compute / compute_total,
            self.need_memory as f64 / memory_total,
            waiting.len() as f64,
        ]);
    }
}

/// Milliseconds from a non-negative float.
fn ms(v: f64) -> u64 {
    v.max(0.0).round() as u64
}

fn check_layout(model: &GpuModel, layout: &[(u32, u32)]) -> Result<(), SimError> {
    let mut used = 0u32;
    let mut compute = 0;
    for &(id, start) in layout {
        let Some(p) = model.profile(id) else {
            return Err(SimError::Params(format!("layout {layout:?}: no profile id {id} on {}", model.key)));
        };
        let mask = ((1u32 << p.slices) - 1) << start;
        if !p.starts.contains(&start) || used & mask != 0 {
            return Err(SimError::Params(format!("layout {layout:?}: {} cannot start at {start}", p.name)));
        }
        used |= mask;
        compute += p.compute;
    }
    if compute > COMPUTE_SLICES {
        return Err(SimError::Params(format!("layout {layout:?} takes {compute} compute slices, more than 7")));
    }
    Ok(())
}

fn fn_info(f: &Function, model: &GpuModel, params: &FleetParams, shared: bool) -> FnInfo {
    let memory = f.memory_mib * MIB;
    let gib = f.memory_mib as f64 / 1024.0;
    // The multiprocessors of the model's profile with that many compute slices.
    let sms = model.profiles.iter().find(|p| p.compute >= f.compute).map_or(model.sms, |p| p.sms);
    // Largest percent whose share of the GPU still fits in `sms`.
    let percent = ((u64::from(sms) * 100) / u64::from(model.sms)).clamp(1, 100) as u32;
    let fits_profile = |p: &fleet::ProfileShape| {
        p.memory() >= memory && u64::from(percent) * u64::from(model.sms) <= 100 * u64::from(p.sms)
    };
    let mut fits: Vec<u8> = Vec::new();
    let mut order: Vec<usize> = (0..model.profiles.len()).filter(|&i| fits_profile(&model.profiles[i])).collect();
    order.sort_by_key(|&i| (model.profiles[i].slices, model.profiles[i].compute));
    let need = order.first().map(|&i| i as u8);
    fits.extend(order.iter().map(|&i| i as u8));
    if memory <= model.memory {
        fits.push(model.profiles.len() as u8);
    }
    let cold = params.runtime_init_ms + params.context_ms + params.module_ms + gib * params.load_ms_per_gib;
    let lukewarm = params.swap_overhead_ms + gib * 1000.0 / params.swap_gib_per_s;
    let request = Request {
        tenant: f.name.clone(),
        memory,
        compute_percent: percent,
        profile: None,
        class: if shared { LeaseClass::Shared } else { LeaseClass::Exclusive },
    };
    FnInfo {
        request,
        memory,
        cold_ms: ms(cold),
        lukewarm_ms: ms(lukewarm),
        slo_ms: u64::from(f.slo_ms),
        need,
        fits,
        gib,
    }
}
