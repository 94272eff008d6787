//! The pool as a state machine: servers, GPUs, instances, leases, quotas and
//! the wait queue. No I/O and no clock: every call that depends on time takes
//! `now_ms` (Unix milliseconds), and the state at a given time is the same
//! whichever call brings it there (each call first expires the leases and
//! drains the servers that are due, so [`Pool::tick`] only reports them).
//!
//! # Placement
//! A request is granted the free instance with the least memory that is at
//! least the memory asked, then the fewest multiprocessors that are at least
//! the share of its GPU asked, among those of the profile asked. Among equally
//! good instances on different servers the [`Policy`] picks the server (fewest
//! or most leases), ties going to the server registered first.
//!
//! Free instances are indexed by shape class (memory, multiprocessors, GPU
//! multiprocessors, profile), a handful per fleet, and within a class by
//! (server lease count, registration order), so an allocation costs
//! O(classes + log servers), not a scan of the fleet.
//!
//! # Queue
//! Requests that may wait queue in FIFO order, bounded by
//! [`PoolConfig::queue_capacity`]. When capacity frees, waiters are served in
//! order; one that does not fit what is free keeps its place and later ones
//! may still be served (no head-of-line blocking: a large request does not
//! hold small ones back, at the price that a steady stream of small requests
//! can keep a large one waiting until its timeout, which the service enforces
//! with [`Pool::cancel`]).
//!
//! # Grants
//! A waiter is granted when capacity frees: a release, a registration, or
//! time (an expiry, the end of the recovery window) noticed by any call.
//! [`Pool::register`], [`Pool::release`] and [`Pool::tick`] return the
//! grants made so far; after [`Pool::allocate`], [`Pool::renew`],
//! [`Pool::adopt`] and [`Pool::heartbeat`] call [`Pool::take_grants`] to
//! deliver them at once rather than at the next tick.
//!
//! # Quotas
//! A tenant's held and queued leases count against its quota; a request that
//! would exceed it fails at once and never queues. Queued requests count with
//! the memory of the smallest registered instance that fits them. Adopted
//! leases are not refused for quota but count afterwards.
//!
//! # Classes (issue 19)
//! An exclusive lease holds an instance alone: a MIG instance or a whole
//! GPU. A shared lease holds a part of a whole GPU (its memory and compute
//! percent) next to other shared leases: a GPU with shared leases is out of
//! the free index, and its shares never add up to more than 100 % or to more
//! than its memory. Shared leases share fate (one MPS daemon per GPU), so
//! they are placed together only when their tenants may share it: the same
//! tenant, or tenants whose [`Quota::share_fate_across_tenants`] is set.
//! A shared lease joins the GPU it may join that was least busy at its
//! server's last heartbeat, then the one with the least compute placed, and
//! takes a free whole GPU only when it can join none, keeping whole GPUs for
//! exclusive leases. Draining does not move shared leases yet: they stay as
//! `stuck`.
//!
//! # Recovery
//! With [`PoolConfig::recovery_ms`] > 0 a new pool grants nothing until the
//! window ends: servers re-register and leases come back with
//! [`Pool::adopt`] first, and requests that may wait queue meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Bound;

pub mod fleet;
pub mod planner;
mod rebalance;
mod relayout;
mod slab;
mod types;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use rebalance::{COOLDOWN_MS, REBALANCE_COLD, REBALANCE_HOT};
pub use relayout::Relayout;
use slab::Slab;
pub use types::{
    Adopt, Allocation, Counters, DrainPlan, GpuSpec, GpuView, Grant, InstanceSpec, Lease, LeaseClass, LeaseId, Load,
    Policy, PoolConfig, PoolError, PoolView, Profile, QueueEntry, Quota, Request, ServerSpec, ServerView, Tick, Ticket,
};

/// How many ended lease ids are remembered, so that a late renewal hears
/// `LeaseExpired` rather than `UnknownLease` and an ended lease is not
/// adopted back.
const ENDED_MEMORY: usize = 65_536;

/// Multiplier of the lease id sequence (odd: the sequence visits every u64).
const ID_STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// Why a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Released,
    Expired,
    Lost,
}

#[derive(Debug)]
struct Server {
    spec: ServerSpec,
    /// Registration order, for deterministic tie-breaks.
    seq: u64,
    registered_ms: u64,
    last_seen_ms: u64,
    sessions: u32,
    memory_used: u64,
    /// Instance keys in the spec's order (GPU by GPU).
    insts: Vec<u32>,
    /// Free instances by class; only classes with some.
    free: Vec<(u32, BTreeSet<u32>)>,
    /// Leases on its instances.
    leases: u32,
    /// Being drained: its free instances are not indexed (nothing new is
    /// placed on it) and its leases move elsewhere.
    draining: bool,
    /// Measured busy time by GPU uuid, in thousandths, as last reported.
    gpu_busy: HashMap<String, u32>,
    /// MPS group faults, as last reported.
    group_faults: u64,
}

/// A lease moved off a draining server whose session has not reported
/// its migration yet.
#[derive(Debug, Clone)]
struct Move {
    /// The server and instance it came from, by id (slab keys are reused).
    from_server: String,
    from_instance: String,
    /// The session reported its migration; its old server may list it
    /// until it has let go of it.
    done: bool,
}

#[derive(Debug)]
struct Instance {
    uuid: String,
    server: u32,
    class: u32,
    memory: u64,
    sms: u32,
    profile: Option<Profile>,
    /// The exclusive lease holding it.
    lease: Option<LeaseId>,
    /// Shared leases on it (a whole GPU), in placement order.
    shared: Vec<LeaseId>,
    /// Sums of their compute percents and memory.
    shared_percent: u32,
    shared_memory: u64,
}

impl Instance {
    /// Neither an exclusive lease nor a shared one holds it.
    fn is_free(&self) -> bool {
        self.lease.is_none() && self.shared.is_empty()
    }
}

/// What makes instances interchangeable for placement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClassKey {
    memory: u64,
    sms: u32,
    gpu_sms: u32,
    profile: Option<Profile>,
}

#[derive(Debug)]
struct Class {
    key: ClassKey,
    /// Instances registered.
    total: u32,
    /// Instances free.
    free: u32,
    /// Servers with a free instance of this class: (leases, seq, server).
    servers: BTreeSet<(u32, u64, u32)>,
}

#[derive(Debug)]
struct LeaseEntry {
    lease: Lease,
    server: u32,
    inst: u32,
    /// Why its session did not move at the last order (kept until the
    /// next order), as the server reported it.
    move_refused: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    leases: u64,
    memory: u64,
    queued: u64,
    queued_memory: u64,
}

#[derive(Debug)]
struct Waiter {
    req: Request,
    enqueued_ms: u64,
    /// Memory counted against the tenant's quota while it waits.
    reserve: u64,
}

/// A validated request.
#[derive(Debug)]
struct Need<'a> {
    memory: u64,
    percent: u32,
    profile: Option<ProfileSel<'a>>,
    class: LeaseClass,
}

#[derive(Debug)]
struct ProfileSel<'a> {
    name: &'a str,
    id: Option<u32>,
}

impl<'a> Need<'a> {
    fn parse(req: &'a Request) -> Result<Self, PoolError> {
        let mut problems = Vec::new();
        if req.tenant.is_empty() {
            problems.push("tenant is empty".to_owned());
        }
        if req.compute_percent > 100 {
            problems.push(format!("compute_percent is {}, more than 100", req.compute_percent));
        }
        if req.profile.as_deref().is_some_and(str::is_empty) {
            problems.push("profile is empty (leave it out for any instance)".to_owned());
        }
        if req.class == LeaseClass::Shared {
            if req.memory == 0 {
                problems.push("a shared lease must name its memory (its part of the GPU's)".to_owned());
            }
            if req.compute_percent == 0 {
                problems.push("a shared lease must name its compute_percent (1..=100)".to_owned());
            }
            if req.profile.is_some() {
                problems.push("a shared lease is a part of a whole GPU: it takes no MIG profile".to_owned());
            }
        }
        if !problems.is_empty() {
            return Err(PoolError::InvalidRequest(problems.join("; ")));
        }
        Ok(Self::of(req))
    }

    /// A request already validated by [`Need::parse`].
    fn of(req: &'a Request) -> Self {
        Self {
            memory: req.memory,
            percent: req.compute_percent,
            profile: req.profile.as_deref().map(|name| ProfileSel { name, id: name.parse().ok() }),
            class: req.class,
        }
    }
}

impl ClassKey {
    fn fits(&self, need: &Need<'_>) -> bool {
        // sms >= ceil(percent * gpu_sms / 100)  <=>  percent * gpu_sms <= 100 * sms
        self.memory >= need.memory
            // A shared lease takes a part of a whole GPU (no profile).
            && (need.class == LeaseClass::Exclusive || self.profile.is_none())
            && u64::from(need.percent) * u64::from(self.gpu_sms) <= 100 * u64::from(self.sms)
            && need
                .profile
                .as_ref()
                .is_none_or(|sel| self.profile.as_ref().is_some_and(|p| p.name == sel.name || Some(p.id) == sel.id))
    }
}

/// The pool. See the [module documentation](self).
pub struct Pool {
    config: PoolConfig,
    /// Latest time seen; grants made by [`Pool::release`] are issued then.
    now_ms: u64,
    /// End of the recovery window while it is open.
    recovery_end: Option<u64>,
    servers: Slab<Server>,
    server_ids: HashMap<String, u32>,
    next_seq: u64,
    /// (last heartbeat or registration, server).
    heartbeats: BTreeSet<(u64, u32)>,
    instances: Slab<Instance>,
    instance_ids: HashMap<String, u32>,
    classes: Slab<Class>,
    class_ids: HashMap<ClassKey, u32>,
    /// (memory, sms, class): classes in best-fit order.
    class_order: BTreeSet<(u64, u32, u32)>,
    free_total: usize,
    /// Boxed so that growing the map moves pointers, not leases.
    leases: IdMap<Box<LeaseEntry>>,
    /// (expires, lease).
    expiries: BTreeSet<(u64, LeaseId)>,
    tenants: HashMap<String, Usage>,
    /// Waiters by ticket number: ticket order is arrival order.
    queue: BTreeMap<u64, Waiter>,
    next_ticket: u64,
    id_state: u64,
    ended: IdMap<End>,
    ended_order: VecDeque<LeaseId>,
    /// Events for the next [`Pool::tick`]; grants for the next call that returns them.
    pending: Tick,
    counters: Counters,
    /// Leases moved off draining servers, until their sessions report.
    moves: HashMap<LeaseId, Move>,
    /// Migration orders for the next heartbeat of each source server.
    orders: HashMap<String, Vec<LeaseId>>,
    /// Instances (whole GPUs) holding shared leases.
    shared_hosts: BTreeSet<u32>,
    /// The same hosts in the order a shared lease prefers them:
    /// (busy at the last heartbeat, compute percent placed, server seq, instance).
    shared_order: BTreeSet<SharedKey>,
    /// Dynamic MIG layouts: orders and GPUs out for re-layout.
    relayouts: relayout::Relayouts,
    /// Instances that gave or took a lease in a rebalance, until when they
    /// sit out ([`Pool::rebalance`]).
    cooldown: HashMap<u32, u64>,
}

/// A shared host's place in [`Pool::shared_order`].
type SharedKey = (u32, u32, u64, u32);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("policy", &self.config.policy)
            .field("servers", &self.servers.len())
            .field("instances", &self.instances.len())
            .field("free", &self.free_total)
            .field("leases", &self.leases.len())
            .field("queued", &self.queue.len())
            .field("recovering", &self.recovery_end.is_some())
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool started at `now_ms`. Check `config` with
    /// [`PoolConfig::validate`] first.
    pub fn new(config: PoolConfig, now_ms: u64) -> Self {
        let recovery_end = (config.recovery_ms > 0).then(|| now_ms.saturating_add(config.recovery_ms));
        let id_state = config.id_seed;
        Self {
            config,
            now_ms,
            recovery_end,
            servers: Slab::default(),
            server_ids: HashMap::new(),
            next_seq: 0,
            heartbeats: BTreeSet::new(),
            instances: Slab::default(),
            instance_ids: HashMap::new(),
            classes: Slab::default(),
            class_ids: HashMap::new(),
            class_order: BTreeSet::new(),
            free_total: 0,
            leases: IdMap::default(),
            expiries: BTreeSet::new(),
            tenants: HashMap::new(),
            queue: BTreeMap::new(),
            next_ticket: 1,
            id_state,
            // Full size at once: growing it later would stall one call.
            // Room for twice what it holds: it never grows, and removals
            // seldom leave tombstones that force a rehash.
            ended: IdMap::with_capacity_and_hasher(2 * ENDED_MEMORY, BuildHasherDefault::default()),
            ended_order: VecDeque::with_capacity(ENDED_MEMORY),
            pending: Tick::default(),
            counters: Counters::default(),
            moves: HashMap::new(),
            orders: HashMap::new(),
            shared_hosts: BTreeSet::new(),
            shared_order: BTreeSet::new(),
            relayouts: relayout::Relayouts::default(),
            cooldown: HashMap::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Replaces the per-tenant quotas (a reloaded tenants file). They apply
    /// to requests from now on; leases held and requests queued stay.
    pub fn set_tenant_quotas(&mut self, quotas: HashMap<String, Quota>) {
        self.config.tenant_quotas = quotas;
    }

    /// Whether the recovery window is open at `now_ms`.
    pub fn recovering(&self, now_ms: u64) -> bool {
        self.recovery_end.is_some_and(|end| now_ms < end)
    }

    /// The lease `id`, if held.
    pub fn lease(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.get(&id).map(|e| &e.lease)
    }

    /// Leases held.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Instances registered, and those free.
    pub fn instance_counts(&self) -> (usize, usize) {
        (self.instances.len(), self.free_total)
    }

    /// Requests waiting.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Totals since the start.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Adds a server, or replaces its description (same id: the same server,
    /// e.g. after its restart). Leases on instances it still has with the
    /// same shape stay; the others end (reported as `lost` by the next
    /// [`Pool::tick`]). Returns the grants its new capacity made, with any
    /// earlier ones not yet returned.
    pub fn register(&mut self, spec: ServerSpec, now_ms: u64) -> Result<Vec<Grant>, PoolError> {
        self.advance(now_ms);
        let mut problems = validate_spec(&spec);
        for inst in spec.gpus.iter().flat_map(|g| &g.instances) {
            if let Some(&k) = self.instance_ids.get(&inst.uuid) {
                let owner = &self.servers.get(self.instances.get(k).server).spec.id;
                if *owner != spec.id {
                    problems.push(format!("instance {} is registered by server {owner}", inst.uuid));
                }
            }
        }
        if !problems.is_empty() {
            return Err(PoolError::InvalidRequest(problems.join("; ")));
        }
        self.relayouts_registered(&spec.id);
        let s = match self.server_ids.get(&spec.id) {
            Some(&s) => {
                self.replace_server(s, spec, now_ms);
                s
            }
            None => {
                let s = self.servers.insert(Server {
                    spec,
                    seq: self.next_seq,
                    registered_ms: now_ms,
                    last_seen_ms: now_ms,
                    sessions: 0,
                    memory_used: 0,
                    insts: Vec::new(),
                    free: Vec::new(),
                    leases: 0,
                    draining: false,
                    gpu_busy: HashMap::new(),
                    group_faults: 0,
                });
                self.next_seq += 1;
                self.server_ids.insert(self.servers.get(s).spec.id.clone(), s);
                self.heartbeats.insert((now_ms, s));
                self.build_server(s);
                s
            }
        };
        debug_assert!(self.heartbeats.contains(&(self.servers.get(s).last_seen_ms, s)));
        // There are never more leases than instances: size the lease map for
        // twice that now, so that allocations never wait for it to grow.
        let room = 2 * self.instances.len();
        if self.leases.capacity() < room {
            self.leases.reserve(room - self.leases.len());
        }
        self.serve(now_ms);
        Ok(std::mem::take(&mut self.pending.grants))
    }

    /// Takes back a lease granted before a restart (its token's signature
    /// checked by the caller). Idempotent; quotas are not enforced.
    pub fn adopt(&mut self, claims: Adopt, now_ms: u64) -> Result<Lease, PoolError> {
        self.advance(now_ms);
        if claims.tenant.is_empty() {
            return Err(PoolError::InvalidRequest("tenant is empty".into()));
        }
        if let Some(e) = self.leases.get(&claims.id) {
            if e.lease.server_id == claims.server_id && e.lease.instance_uuid == claims.instance_uuid {
                return Ok(e.lease.clone());
            }
            return Err(PoolError::Conflict { lease: claims.id, instance: claims.instance_uuid });
        }
        if self.ended.contains_key(&claims.id) {
            return Err(PoolError::LeaseEnded(claims.id));
        }
        if claims.expires_ms <= now_ms {
            return Err(PoolError::LeaseExpired(claims.id));
        }
        let s = *self
            .server_ids
            .get(&claims.server_id)
            .ok_or_else(|| PoolError::UnknownServer(claims.server_id.clone()))?;
        let k = self.instance_ids.get(&claims.instance_uuid).copied().filter(|&k| self.instances.get(k).server == s);
        let Some(k) = k else {
            return Err(PoolError::UnknownInstance { server: claims.server_id, instance: claims.instance_uuid });
        };
        let inst = self.instances.get(k);
        if let Some(holder) =
            inst.lease.or_else(|| inst.shared.first().copied().filter(|_| claims.class == LeaseClass::Exclusive))
        {
            return Err(PoolError::Conflict { lease: holder, instance: claims.instance_uuid });
        }
        match claims.class {
            LeaseClass::Exclusive if inst.memory != claims.memory => {
                return Err(PoolError::InvalidRequest(format!(
                    "instance {} has {} bytes now, the lease was for {}",
                    claims.instance_uuid, inst.memory, claims.memory
                )));
            }
            LeaseClass::Exclusive => {}
            LeaseClass::Shared => {
                let need = Need {
                    memory: claims.memory,
                    percent: claims.compute_percent,
                    profile: None,
                    class: LeaseClass::Shared,
                };
                if inst.profile.is_some() || claims.compute_percent == 0 || claims.compute_percent > 100 {
                    return Err(PoolError::InvalidRequest(format!(
                        "the lease claims {}% of instance {}: a share is 1..=100 % of a whole GPU",
                        claims.compute_percent, claims.instance_uuid
                    )));
                }
                if !self.may_join(k, &need, &claims.tenant, true) {
                    let holder = inst.shared.first().copied().unwrap_or(claims.id);
                    return Err(PoolError::Conflict { lease: holder, instance: claims.instance_uuid });
                }
            }
        }
        let (memory, sms) = match claims.class {
            LeaseClass::Exclusive => (inst.memory, inst.sms),
            LeaseClass::Shared => (claims.memory, share_of(inst.sms, claims.compute_percent)),
        };
        let server = self.servers.get(s);
        let lease = Lease {
            id: claims.id,
            tenant: claims.tenant,
            server_id: claims.server_id,
            address: server.spec.address.clone(),
            cert_sha256: server.spec.cert_sha256.clone(),
            instance_uuid: claims.instance_uuid,
            profile: inst.profile.clone(),
            memory,
            sms,
            class: claims.class,
            compute_percent: if claims.class == LeaseClass::Shared { claims.compute_percent } else { 0 },
            issued_ms: claims.issued_ms,
            expires_ms: claims.expires_ms,
            in_use: false,
        };
        self.counters.adoptions += 1;
        Ok(self.insert_lease(lease, s, k).clone())
    }

    /// Records a server's load and which of its leases have a session open.
    /// Returns the ids in `load.live_leases` the pool does not hold for this
    /// server (ended, expired, unknown): their sessions should end.
    pub fn heartbeat(&mut self, server_id: &str, load: Load, now_ms: u64) -> Result<Vec<LeaseId>, PoolError> {
        self.advance(now_ms);
        let s = *self.server_ids.get(server_id).ok_or_else(|| PoolError::UnknownServer(server_id.to_owned()))?;
        let server = self.servers.get_mut(s);
        self.heartbeats.remove(&(server.last_seen_ms, s));
        server.last_seen_ms = server.last_seen_ms.max(now_ms);
        self.heartbeats.insert((server.last_seen_ms, s));
        server.sessions = load.sessions;
        server.memory_used = load.memory_used;
        server.group_faults = load.group_faults;
        for (uuid, busy) in load.gpu_busy {
            if server.spec.gpus.iter().any(|g| g.uuid == uuid) {
                let busy = busy.min(1000);
                // A shared host (a whole GPU: its instance has its uuid) moves in the order.
                if let Some(&k) = self.instance_ids.get(&uuid).filter(|k| self.shared_hosts.contains(k)) {
                    let (percent, old) = (self.instances.get(k).shared_percent, server.gpu_busy.get(&uuid).copied());
                    self.shared_order.remove(&(old.unwrap_or(0), percent, server.seq, k));
                    self.shared_order.insert((busy, percent, server.seq, k));
                }
                server.gpu_busy.insert(uuid, busy);
            }
        }
        let live: HashSet<LeaseId> = load.live_leases.iter().copied().collect();
        for &k in &server.insts {
            let inst = self.instances.get(k);
            for &id in inst.lease.iter().chain(&inst.shared) {
                let entry = self.leases.get_mut(&id).expect("a held instance's lease exists");
                entry.lease.in_use = live.contains(&id);
            }
        }
        // A session whose lease moved on stays until it reports its
        // migration, and is not ended while it leaves; once the server no
        // longer lists it, it is gone from there.
        self.moves.retain(|id, m| !(m.done && m.from_server == server_id && !live.contains(id)));
        let moving = |id: &LeaseId| self.moves.get(id).is_some_and(|m| m.from_server == server_id);
        Ok(load
            .live_leases
            .into_iter()
            .filter(|id| self.leases.get(id).is_none_or(|e| e.server != s) && !moving(id))
            .collect())
    }

    /// Starts draining `server_id`: nothing new is placed on it, and each of
    /// its leases moves to the free instance elsewhere that best fits its
    /// memory. The moved leases' sessions are ordered to migrate at the
    /// server's next heartbeat ([`Pool::take_orders`]); until they report
    /// ([`Pool::migrated`]) the server keeps them. Leases for which nothing
    /// is free stay; draining again retries them.
    pub fn drain_server(&mut self, server_id: &str, now_ms: u64) -> Result<DrainPlan, PoolError> {
        self.advance(now_ms);
        if self.recovery_end.is_some() {
            return Err(PoolError::Recovering);
        }
        let s = *self.server_ids.get(server_id).ok_or_else(|| PoolError::UnknownServer(server_id.to_owned()))?;
        if !self.servers.get(s).draining {
            self.unindex_server(s);
        }
        let held: Vec<LeaseId> = self
            .servers
            .get(s)
            .insts
            .iter()
            .filter_map(|&k| self.instances.get(k).lease)
            .filter(|id| !self.moves.contains_key(id))
            .collect();
        let mut plan = DrainPlan::default();
        // Shared leases move too, each to a GPU whose shares it may join
        // (room, and tenants that may share its fate) or a free whole GPU;
        // its session's worker joins the target GPU's MPS group.
        let shared: Vec<LeaseId> = self
            .servers
            .get(s)
            .insts
            .iter()
            .flat_map(|&k| self.instances.get(k).shared.iter().copied())
            .filter(|id| !self.moves.contains_key(id))
            .collect();
        for id in held.into_iter().chain(shared) {
            let entry = &self.leases[&id];
            let (class, percent) = (entry.lease.class, entry.lease.compute_percent);
            let need = Need { memory: entry.lease.memory, percent, profile: None, class };
            let from_instance = entry.lease.instance_uuid.clone();
            let from = Move { from_server: server_id.to_owned(), from_instance, done: false };
            let tenant = entry.lease.tenant.clone();
            match self.best_place(&need, &tenant) {
                Some(k) => {
                    self.move_lease(id, k);
                    if let Some(e) = self.leases.get_mut(&id) {
                        e.move_refused = None;
                    }
                    self.moves.insert(id, from);
                    self.orders.entry(server_id.to_owned()).or_default().push(id);
                    plan.moving.push(id);
                }
                None => plan.stuck.push(id),
            }
        }
        Ok(plan)
    }

    /// The leases whose sessions `server_id` is to migrate, each once,
    /// renewed: their tokens, handed to the target and to the client, then
    /// last a whole lease lifetime.
    pub fn take_orders(&mut self, server_id: &str, now_ms: u64) -> Vec<Lease> {
        let ids = self.orders.remove(server_id).unwrap_or_default();
        ids.into_iter().filter_map(|id| self.renew(id, now_ms).ok()).collect()
    }

    /// A server reports how a lease's session migrated: done (or it had no
    /// session), or failed: then the lease moves back to the instance it
    /// came from when that is still free, so that the session, which stayed
    /// there, keeps its lease.
    /// Returns, for a failure, whether the lease went back.
    pub fn migrated(&mut self, server_id: &str, id: LeaseId, outcome: Result<(), String>) -> Option<bool> {
        let from = self.moves.get_mut(&id).filter(|m| m.from_server == server_id && !m.done)?;
        if outcome.is_ok() {
            from.done = true;
            return None;
        }
        let from = self.moves.remove(&id)?;
        if let (Some(e), Err(reason)) = (self.leases.get_mut(&id), &outcome) {
            e.move_refused = Some(reason.clone());
        }
        let fits = |k: u32| match self.leases.get(&id) {
            Some(e) if e.lease.class == LeaseClass::Shared => {
                let need = Need {
                    memory: e.lease.memory,
                    percent: e.lease.compute_percent,
                    profile: None,
                    class: LeaseClass::Shared,
                };
                self.may_join(k, &need, &e.lease.tenant, true)
            }
            _ => self.instances.get(k).is_free(),
        };
        let back = self.instance_ids.get(&from.from_instance).copied().filter(|&k| fits(k));
        match (back, self.leases.contains_key(&id)) {
            (Some(k), true) => {
                self.move_lease(id, k);
                Some(true)
            }
            _ => Some(false),
        }
    }

    /// Grants the best free instance for `req`, or queues it when `wait` and
    /// something registered could fit. See the [module documentation](self).
    pub fn allocate(&mut self, req: Request, now_ms: u64, wait: bool) -> Result<Allocation, PoolError> {
        self.advance(now_ms);
        let need = Need::parse(&req)?;
        self.check_leases_quota(&req.tenant, 0)?;
        let recovering = self.recovery_end.is_some();
        if !recovering && let Some(k) = self.best_place(&need, &req.tenant) {
            self.check_memory_quota(&req.tenant, self.grant_memory(k, &need), 0)?;
            let id = self.grant(k, &req, now_ms);
            return Ok(Allocation::Granted(self.leases[&id].lease.clone()));
        }
        let reserve = match self.min_fitting_memory(&need) {
            Some(memory) => memory,
            // While recovering, servers may still be coming back.
            None if recovering => req.memory,
            // A MIG GPU laid out anew may hold it.
            None => match self.config.dynamic_layouts.then(|| self.creatable_memory(&need)).flatten() {
                Some(memory) => memory,
                None => return Err(PoolError::Unsatisfiable { reason: self.unsatisfiable_reason(&need) }),
            },
        };
        self.check_memory_quota(&req.tenant, reserve, 0)?;
        if !wait {
            return Err(PoolError::Exhausted);
        }
        if self.queue.len() >= self.config.queue_capacity {
            return Err(PoolError::QueueFull);
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let usage = self.tenants.entry(req.tenant.clone()).or_default();
        usage.queued += 1;
        usage.queued_memory += reserve;
        self.queue.insert(ticket, Waiter { req, enqueued_ms: now_ms, reserve });
        self.counters.queued += 1;
        Ok(Allocation::Queued(Ticket(ticket)))
    }

    /// Takes a request out of the queue; false if it was not there (granted,
    /// cancelled, or unknown).
    pub fn cancel(&mut self, ticket: Ticket) -> bool {
        let Some(w) = self.queue.remove(&ticket.0) else { return false };
        self.unreserve(&w.req.tenant, w.reserve);
        self.counters.cancelled += 1;
        true
    }

    /// Extends a lease to `now_ms` + ttl.
    pub fn renew(&mut self, id: LeaseId, now_ms: u64) -> Result<Lease, PoolError> {
        self.advance(now_ms);
        let Some(entry) = self.leases.get_mut(&id) else { return Err(self.gone(id)) };
        let expires = now_ms.saturating_add(self.config.lease_ttl_ms).max(entry.lease.expires_ms);
        self.expiries.remove(&(entry.lease.expires_ms, id));
        entry.lease.expires_ms = expires;
        self.expiries.insert((expires, id));
        Ok(entry.lease.clone())
    }

    /// Ends a lease and frees its instance; returns the grants that made,
    /// with any earlier ones not yet returned. They are issued at the latest
    /// time the pool has seen.
    pub fn release(&mut self, id: LeaseId) -> Result<Vec<Grant>, PoolError> {
        if !self.end_lease(id, End::Released) {
            return Err(self.gone(id));
        }
        self.counters.releases += 1;
        self.serve(self.now_ms);
        Ok(std::mem::take(&mut self.pending.grants))
    }

    /// Expires leases, drains silent servers, ends the recovery window when
    /// due and serves the queue; reports all that since the last tick. Cheap
    /// when nothing is due.
    pub fn tick(&mut self, now_ms: u64) -> Tick {
        self.advance(now_ms);
        std::mem::take(&mut self.pending)
    }

    /// Grants made by calls that do not return them ([`Pool::allocate`],
    /// [`Pool::renew`], [`Pool::adopt`], [`Pool::heartbeat`] when time made
    /// something due), also returned by the next `register`, `release` or
    /// `tick`.
    pub fn take_grants(&mut self) -> Vec<Grant> {
        std::mem::take(&mut self.pending.grants)
    }

    /// The whole pool, for operators.
    pub fn status(&self, now_ms: u64) -> PoolView {
        let mut servers: Vec<&Server> = self.servers.iter().map(|(_, s)| s).collect();
        servers.sort_by_key(|s| s.seq);
        let servers = servers
            .into_iter()
            .map(|server| {
                let mut keys = server.insts.iter();
                let gpus = server
                    .spec
                    .gpus
                    .iter()
                    .map(|g| {
                        let insts: Vec<&Instance> =
                            g.instances.iter().filter_map(|_| keys.next().map(|&k| self.instances.get(k))).collect();
                        GpuView {
                            spec: g.clone(),
                            leases: insts.iter().map(|i| i.lease).collect(),
                            shared: insts.iter().flat_map(|i| i.shared.iter().copied()).collect(),
                            shared_percent: insts.iter().map(|i| i.shared_percent).sum(),
                            busy_permille: server.gpu_busy.get(&g.uuid).copied().unwrap_or(0),
                        }
                    })
                    .collect();
                ServerView {
                    id: server.spec.id.clone(),
                    address: server.spec.address.clone(),
                    cert_sha256: server.spec.cert_sha256.clone(),
                    registered_ms: server.registered_ms,
                    heartbeat_age_ms: now_ms.saturating_sub(server.last_seen_ms),
                    sessions: server.sessions,
                    memory_used: server.memory_used,
                    leases: server.leases,
                    draining: server.draining,
                    gpus,
                    group_faults: server.group_faults,
                }
            })
            .collect();
        let mut leases: Vec<Lease> = self.leases.values().map(|e| e.lease.clone()).collect();
        leases.sort_by_key(|l| (l.issued_ms, l.id));
        let move_refused = self.leases.iter().filter_map(|(&id, e)| e.move_refused.clone().map(|r| (id, r))).collect();
        let queue = self
            .queue
            .iter()
            .map(|(&t, w)| QueueEntry {
                ticket: Ticket(t),
                request: w.req.clone(),
                waited_ms: now_ms.saturating_sub(w.enqueued_ms),
            })
            .collect();
        PoolView {
            policy: self.config.policy,
            recovering: self.recovering(now_ms),
            servers,
            leases,
            move_refused,
            queue,
            counters: self.counters,
            instances: self.instances.len(),
            free_instances: self.free_total,
        }
    }

    // ---- time -------------------------------------------------------------

    /// Brings the state to `now_ms`: expires leases, drains servers, ends the
    /// recovery window, and serves the queue if capacity freed.
    fn advance(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let mut freed = false;
        while let Some(&(expires, id)) = self.expiries.first() {
            if expires > now_ms {
                break;
            }
            self.end_lease(id, End::Expired);
            freed = true;
        }
        let timeout = self.config.heartbeat_timeout_ms;
        while let Some(&(seen, s)) = self.heartbeats.first() {
            if now_ms.saturating_sub(seen) <= timeout {
                break;
            }
            self.drain(s);
        }
        if self.recovery_end.is_some_and(|end| now_ms >= end) {
            self.recovery_end = None;
            self.pending.recovery_ended = true;
            freed = true;
        }
        if freed {
            self.serve(now_ms);
        }
    }

    /// Why a lease id is not held.
    fn gone(&self, id: LeaseId) -> PoolError {
        match self.ended.get(&id) {
            Some(End::Expired | End::Lost) => PoolError::LeaseExpired(id),
            Some(End::Released) | None => PoolError::UnknownLease(id),
        }
    }

    // ---- servers ----------------------------------------------------------

    /// Replaces server `s`'s description, keeping the leases whose instance
    /// it still has with the same shape.
    fn replace_server(&mut self, s: u32, spec: ServerSpec, now_ms: u64) {
        let shapes: HashMap<&str, (u64, u32, Option<&Profile>)> = spec
            .gpus
            .iter()
            .flat_map(|g| &g.instances)
            .map(|i| (i.uuid.as_str(), (i.memory, i.sms, i.profile.as_ref())))
            .collect();
        let mut survivors = Vec::new();
        let mut lost = Vec::new();
        for &k in &self.servers.get(s).insts {
            let inst = self.instances.get(k);
            let same = shapes.get(inst.uuid.as_str()) == Some(&(inst.memory, inst.sms, inst.profile.as_ref()));
            for &id in inst.lease.iter().chain(&inst.shared) {
                if same {
                    survivors.push((inst.uuid.clone(), id));
                } else {
                    lost.push(id);
                }
            }
        }
        for id in lost {
            self.end_lease(id, End::Lost);
        }
        self.teardown(s);
        let server = self.servers.get_mut(s);
        self.heartbeats.remove(&(server.last_seen_ms, s));
        server.last_seen_ms = server.last_seen_ms.max(now_ms);
        self.heartbeats.insert((server.last_seen_ms, s));
        server.registered_ms = now_ms;
        server.spec = spec;
        server.leases = 0;
        self.build_server(s);
        let (address, cert) = (self.servers.get(s).spec.address.clone(), self.servers.get(s).spec.cert_sha256.clone());
        for (uuid, id) in survivors {
            let k = self.instance_ids[&uuid];
            self.hold(k, id);
            let entry = self.leases.get_mut(&id).expect("a surviving lease exists");
            entry.inst = k;
            entry.lease.address.clone_from(&address);
            entry.lease.cert_sha256.clone_from(&cert);
        }
    }

    /// Links server `s`'s instances (from its spec) into the pool, all free.
    fn build_server(&mut self, s: u32) {
        let server = self.servers.get_mut(s);
        let spec = std::mem::take(&mut server.spec.gpus);
        for gpu in &spec {
            for inst in &gpu.instances {
                self.link_instance(s, gpu.sms, inst);
            }
        }
        self.servers.get_mut(s).spec.gpus = spec;
    }

    fn link_instance(&mut self, s: u32, gpu_sms: u32, spec: &InstanceSpec) {
        let key = ClassKey { memory: spec.memory, sms: spec.sms, gpu_sms, profile: spec.profile.clone() };
        let cid = match self.class_ids.get(&key) {
            Some(&c) => c,
            None => {
                let (memory, sms) = (key.memory, key.sms);
                let c = self.classes.insert(Class { key: key.clone(), total: 0, free: 0, servers: BTreeSet::new() });
                self.class_ids.insert(key, c);
                self.class_order.insert((memory, sms, c));
                c
            }
        };
        let k = self.instances.insert(Instance {
            uuid: spec.uuid.clone(),
            server: s,
            class: cid,
            memory: spec.memory,
            sms: spec.sms,
            profile: spec.profile.clone(),
            lease: None,
            shared: Vec::new(),
            shared_percent: 0,
            shared_memory: 0,
        });
        self.instance_ids.insert(spec.uuid.clone(), k);
        self.classes.get_mut(cid).total += 1;
        self.servers.get_mut(s).insts.push(k);
        self.add_free(k);
    }

    /// Unlinks all of server `s`'s instances. Leases on them must be ended
    /// or moved by the caller.
    fn teardown(&mut self, s: u32) {
        let server = self.servers.get_mut(s);
        let indexed = !server.draining;
        for (cid, _) in &server.free {
            self.classes.get_mut(*cid).servers.remove(&(server.leases, server.seq, s));
        }
        server.free.clear();
        for k in std::mem::take(&mut server.insts) {
            let inst = self.instances.remove(k);
            self.instance_ids.remove(&inst.uuid);
            if self.shared_hosts.remove(&k) {
                let busy = server.gpu_busy.get(&inst.uuid).copied().unwrap_or(0);
                self.shared_order.remove(&(busy, inst.shared_percent, server.seq, k));
            }
            let class = self.classes.get_mut(inst.class);
            class.total -= 1;
            if inst.is_free() && indexed {
                class.free -= 1;
                self.free_total -= 1;
            }
            if class.total == 0 {
                debug_assert!(class.free == 0 && class.servers.is_empty());
                let class = self.classes.remove(inst.class);
                self.class_order.remove(&(class.key.memory, class.key.sms, inst.class));
                self.class_ids.remove(&class.key);
            }
        }
    }

    /// Removes a silent server: its leases end, its instances leave.
    fn drain(&mut self, s: u32) {
        let held: Vec<LeaseId> = self
            .servers
            .get(s)
            .insts
            .iter()
            .flat_map(|&k| {
                let inst = self.instances.get(k);
                inst.lease.into_iter().chain(inst.shared.iter().copied())
            })
            .collect();
        for id in held {
            self.end_lease(id, End::Lost);
        }
        self.teardown(s);
        let server = self.servers.remove(s);
        self.heartbeats.remove(&(server.last_seen_ms, s));
        self.server_ids.remove(&server.spec.id);
        // Its sessions will not report their migrations.
        self.moves.retain(|_, m| m.from_server != server.spec.id);
        self.orders.remove(&server.spec.id);
        self.pending.drained.push(server.spec.id);
    }

    // ---- the free index ---------------------------------------------------

    /// Places lease `id` (held in `self.leases`) on instance `k`: alone or
    /// as a share, by its class.
    fn hold(&mut self, k: u32, id: LeaseId) {
        let lease = &self.leases[&id].lease;
        let (class, percent, memory) = (lease.class, lease.compute_percent, lease.memory);
        match class {
            LeaseClass::Exclusive => self.take(k, id),
            LeaseClass::Shared => self.join(k, id, percent, memory),
        }
    }

    /// Marks free instance `k` held by `id`.
    fn take(&mut self, k: u32, id: LeaseId) {
        let inst = self.instances.get_mut(k);
        debug_assert!(inst.is_free());
        inst.lease = Some(id);
        self.occupy(k);
    }

    /// Adds shared lease `id` to instance `k` (free, or holding shares).
    fn join(&mut self, k: u32, id: LeaseId, percent: u32, memory: u64) {
        let first = self.instances.get(k).shared.is_empty();
        if !first {
            let old = self.shared_key(k);
            self.shared_order.remove(&old);
        }
        let inst = self.instances.get_mut(k);
        debug_assert!(inst.lease.is_none() && inst.profile.is_none());
        inst.shared.push(id);
        inst.shared_percent += percent;
        inst.shared_memory += memory;
        if first {
            self.shared_hosts.insert(k);
            self.occupy(k);
        } else {
            let s = inst.server;
            let leases = self.servers.get(s).leases + 1;
            self.set_server_leases(s, leases);
        }
        let key = self.shared_key(k);
        self.shared_order.insert(key);
    }

    /// Shared host `k`'s place in [`Pool::shared_order`].
    fn shared_key(&self, k: u32) -> SharedKey {
        let inst = self.instances.get(k);
        let server = self.servers.get(inst.server);
        let busy = server.gpu_busy.get(&inst.uuid).copied().unwrap_or(0);
        (busy, inst.shared_percent, server.seq, k)
    }

    /// Takes shared lease `id` off instance `k`, which is free again when
    /// it was the last.
    fn leave(&mut self, k: u32, id: LeaseId, percent: u32, memory: u64) {
        let old = self.shared_key(k);
        self.shared_order.remove(&old);
        let inst = self.instances.get_mut(k);
        let pos = inst.shared.iter().position(|&l| l == id).expect("a shared lease is on its instance");
        inst.shared.remove(pos);
        inst.shared_percent -= percent;
        inst.shared_memory -= memory;
        let (s, last) = (inst.server, inst.shared.is_empty());
        let leases = self.servers.get(s).leases;
        self.set_server_leases(s, leases - 1);
        if last {
            self.shared_hosts.remove(&k);
            self.add_free(k);
        } else {
            let key = self.shared_key(k);
            self.shared_order.insert(key);
        }
    }

    /// Takes free instance `k` out of the free index, counting one more
    /// lease on its server.
    fn occupy(&mut self, k: u32) {
        let inst = self.instances.get(k);
        let (s, cid) = (inst.server, inst.class);
        let server = self.servers.get_mut(s);
        if server.draining {
            // Not indexed: only the count changes.
            let leases = server.leases + 1;
            self.set_server_leases(s, leases);
            return;
        }
        let pos = server.free.iter().position(|(c, _)| *c == cid).expect("a free instance is indexed");
        server.free[pos].1.remove(&k);
        let class = self.classes.get_mut(cid);
        class.free -= 1;
        if server.free[pos].1.is_empty() {
            server.free.swap_remove(pos);
            class.servers.remove(&(server.leases, server.seq, s));
        }
        let leases = server.leases + 1;
        self.free_total -= 1;
        self.set_server_leases(s, leases);
    }

    /// Marks held instance `k` free.
    fn put_back(&mut self, k: u32) {
        let inst = self.instances.get_mut(k);
        debug_assert!(inst.lease.is_some() && inst.shared.is_empty());
        inst.lease = None;
        let s = inst.server;
        let leases = self.servers.get(s).leases;
        self.set_server_leases(s, leases - 1);
        self.add_free(k);
    }

    fn add_free(&mut self, k: u32) {
        let inst = self.instances.get(k);
        let (s, cid) = (inst.server, inst.class);
        let server = self.servers.get_mut(s);
        if server.draining {
            return;
        }
        let class = self.classes.get_mut(cid);
        match server.free.iter_mut().find(|(c, _)| *c == cid) {
            Some((_, set)) => {
                set.insert(k);
            }
            None => {
                server.free.push((cid, BTreeSet::from([k])));
                class.servers.insert((server.leases, server.seq, s));
            }
        }
        class.free += 1;
        self.free_total += 1;
    }

    /// Takes a server's free instances out of the free index, for good
    /// (it drains).
    fn unindex_server(&mut self, s: u32) {
        let server = self.servers.get_mut(s);
        for (cid, set) in std::mem::take(&mut server.free) {
            let class = self.classes.get_mut(cid);
            class.servers.remove(&(server.leases, server.seq, s));
            class.free -= set.len() as u32;
            self.free_total -= set.len();
        }
        server.draining = true;
    }

    /// Moves lease `id` to free instance `k` (on another server, or back).
    fn move_lease(&mut self, id: LeaseId, k: u32) {
        let (old, class, percent, memory) = {
            let entry = &self.leases[&id];
            (entry.inst, entry.lease.class, entry.lease.compute_percent, entry.lease.memory)
        };
        match class {
            LeaseClass::Exclusive => {
                self.put_back(old);
                self.take(k, id);
            }
            LeaseClass::Shared => {
                self.leave(old, id, percent, memory);
                self.join(k, id, percent, memory);
            }
        }
        let inst = self.instances.get(k);
        let server = self.servers.get(inst.server);
        let entry = self.leases.get_mut(&id).expect("a moved lease is held");
        let lease = &mut entry.lease;
        // A shared lease keeps its part (memory, percent) on the new GPU.
        let (memory, sms) = match class {
            LeaseClass::Exclusive => (inst.memory, inst.sms),
            LeaseClass::Shared => (lease.memory, share_of(inst.sms, percent)),
        };
        let usage = self.tenants.get_mut(&lease.tenant).expect("a lease's tenant has usage");
        usage.memory = usage.memory - lease.memory + memory;
        entry.server = inst.server;
        entry.inst = k;
        lease.server_id.clone_from(&server.spec.id);
        lease.address.clone_from(&server.spec.address);
        lease.cert_sha256.clone_from(&server.spec.cert_sha256);
        lease.instance_uuid.clone_from(&inst.uuid);
        lease.profile.clone_from(&inst.profile);
        lease.memory = memory;
        lease.sms = sms;
        lease.in_use = false;
    }

    fn set_server_leases(&mut self, s: u32, leases: u32) {
        let server = self.servers.get_mut(s);
        for (cid, _) in &server.free {
            let class = self.classes.get_mut(*cid);
            class.servers.remove(&(server.leases, server.seq, s));
            class.servers.insert((leases, server.seq, s));
        }
        server.leases = leases;
    }

    /// The policy's choice among a class's servers: (leases, seq, server).
    fn pick(&self, servers: &BTreeSet<(u32, u64, u32)>) -> Option<(u32, u64, u32)> {
        match self.config.policy {
            Policy::Spread => servers.first().copied(),
            Policy::Binpack => {
                let most = servers.last()?.0;
                servers.range((most, 0, 0)..).next().copied()
            }
        }
    }

    fn better(&self, a: (u32, u64, u32), b: (u32, u64, u32)) -> bool {
        match self.config.policy {
            Policy::Spread => (a.0, a.1) < (b.0, b.1),
            Policy::Binpack => (std::cmp::Reverse(a.0), a.1) < (std::cmp::Reverse(b.0), b.1),
        }
    }

    /// Where to place `need` for `tenant`: for an exclusive lease the best
    /// free instance; for a shared one the GPU it may join that is least busy
    /// (then has the least compute placed), else the best free whole GPU.
    fn best_place(&self, need: &Need<'_>, tenant: &str) -> Option<u32> {
        if need.class == LeaseClass::Exclusive {
            return self.best_free(need);
        }
        // In preference order: the first it may join is the best.
        let best = self.shared_order.iter().map(|&(.., k)| k).find(|&k| self.may_join(k, need, tenant, false));
        best.or_else(|| self.best_free(need))
    }

    /// Whether a shared lease of `tenant` for `need` fits on instance `k`
    /// next to its shared leases and may share their fate (`draining`: also
    /// on a draining server, for leases taken back).
    fn may_join(&self, k: u32, need: &Need<'_>, tenant: &str, draining: bool) -> bool {
        let inst = self.instances.get(k);
        inst.lease.is_none()
            && inst.profile.is_none()
            && (draining || !self.servers.get(inst.server).draining)
            && inst.shared_percent + need.percent <= 100
            && inst.shared_memory.saturating_add(need.memory) <= self.shared_memory_limit(k)
            && inst.shared.iter().all(|id| self.may_share_fate(&self.leases[id].lease.tenant, tenant))
    }

    /// Memory the shared leases on instance `k` may ask together: the
    /// instance's, overcommitted as configured when its server swaps idle
    /// sessions out, by at most the host memory it swaps into.
    fn shared_memory_limit(&self, k: u32) -> u64 {
        let inst = self.instances.get(k);
        let swap = self.servers.get(inst.server).spec.swap_bytes;
        let over = u64::from(self.config.memory_overcommit_percent.saturating_sub(100));
        let extra = (u128::from(inst.memory) * u128::from(over) / 100).min(u128::from(swap));
        inst.memory.saturating_add(u64::try_from(extra).unwrap_or(u64::MAX))
    }

    /// Whether shared sessions of tenants `a` and `b` may run under one MPS
    /// daemon, where a fault of one ends the work of the other.
    fn may_share_fate(&self, a: &str, b: &str) -> bool {
        a == b || (self.config.quota(a).share_fate_across_tenants && self.config.quota(b).share_fate_across_tenants)
    }

    /// Memory a lease for `need` placed on instance `k` holds.
    fn grant_memory(&self, k: u32, need: &Need<'_>) -> u64 {
        match need.class {
            LeaseClass::Exclusive => self.instances.get(k).memory,
            LeaseClass::Shared => need.memory,
        }
    }

    /// The free instance best fitting `need`.
    fn best_free(&self, need: &Need<'_>) -> Option<u32> {
        let mut group = None;
        let mut best: Option<((u32, u64, u32), u32)> = None;
        for &(memory, sms, cid) in self.class_order.range((need.memory, 0, 0)..) {
            if group.is_some_and(|g| g != (memory, sms)) {
                break;
            }
            let class = self.classes.get(cid);
            if class.free == 0 || !class.key.fits(need) {
                continue;
            }
            group = Some((memory, sms));
            let Some(candidate) = self.pick(&class.servers) else { continue };
            if best.is_none_or(|(b, _)| self.better(candidate, b)) {
                best = Some((candidate, cid));
            }
        }
        let ((_, _, s), cid) = best?;
        let server = self.servers.get(s);
        server.free.iter().find(|(c, _)| *c == cid).and_then(|(_, set)| set.first().copied())
    }

    /// Memory of the smallest registered instance that fits `need`.
    fn min_fitting_memory(&self, need: &Need<'_>) -> Option<u64> {
        self.class_order
            .range((need.memory, 0, 0)..)
            .find(|&&(_, _, cid)| self.classes.get(cid).key.fits(need))
            .map(|&(memory, _, _)| if need.class == LeaseClass::Shared { need.memory } else { memory })
    }

    fn unsatisfiable_reason(&self, need: &Need<'_>) -> String {
        let classes = || self.class_order.iter().map(|&(_, _, c)| &self.classes.get(c).key);
        if classes().next().is_none() {
            return "no instance is registered".into();
        }
        if need.class == LeaseClass::Shared && !classes().any(|k| k.profile.is_none()) {
            return "a shared lease needs a whole GPU (MIG off), and none is registered".into();
        }
        if let Some(sel) = &need.profile {
            let known =
                classes().any(|k| k.profile.as_ref().is_some_and(|p| p.name == sel.name || Some(p.id) == sel.id));
            if !known {
                return format!("no instance has profile {:?}", sel.name);
            }
        }
        let largest = classes().map(|k| k.memory).max().unwrap_or(0);
        if need.memory > largest {
            return format!("{} bytes asked, the largest instance has {largest}", need.memory);
        }
        format!(
            "no instance has {} bytes, {}% of its GPU's multiprocessors{}",
            need.memory,
            need.percent,
            need.profile.as_ref().map(|p| format!(" and profile {:?}", p.name)).unwrap_or_default()
        )
    }

    // ---- leases -----------------------------------------------------------

    fn next_lease_id(&mut self) -> LeaseId {
        loop {
            self.id_state = self.id_state.wrapping_add(ID_STEP);
            let id = LeaseId(mix(self.id_state));
            if id.0 != 0 && !self.leases.contains_key(&id) && !self.ended.contains_key(&id) {
                return id;
            }
        }
    }

    /// Leases instance `k` to `req`'s tenant: alone (free `k`) or a share
    /// of it (`k` from [`Pool::best_place`]).
    fn grant(&mut self, k: u32, req: &Request, now_ms: u64) -> LeaseId {
        let id = self.next_lease_id();
        let inst = self.instances.get(k);
        let s = inst.server;
        let server = self.servers.get(s);
        let (memory, sms, compute_percent) = match req.class {
            LeaseClass::Exclusive => (inst.memory, inst.sms, 0),
            LeaseClass::Shared => (req.memory, share_of(inst.sms, req.compute_percent), req.compute_percent),
        };
        let lease = Lease {
            id,
            tenant: req.tenant.clone(),
            server_id: server.spec.id.clone(),
            address: server.spec.address.clone(),
            cert_sha256: server.spec.cert_sha256.clone(),
            instance_uuid: inst.uuid.clone(),
            profile: inst.profile.clone(),
            memory,
            sms,
            class: req.class,
            compute_percent,
            issued_ms: now_ms,
            expires_ms: now_ms.saturating_add(self.config.lease_ttl_ms),
            in_use: false,
        };
        self.counters.allocations += 1;
        self.insert_lease(lease, s, k);
        id
    }

    fn insert_lease(&mut self, lease: Lease, s: u32, k: u32) -> &Lease {
        let id = lease.id;
        match lease.class {
            LeaseClass::Exclusive => self.take(k, id),
            LeaseClass::Shared => self.join(k, id, lease.compute_percent, lease.memory),
        }
        self.expiries.insert((lease.expires_ms, id));
        match self.tenants.get_mut(&lease.tenant) {
            Some(u) => {
                u.leases += 1;
                u.memory += lease.memory;
            }
            None => {
                self.tenants
                    .insert(lease.tenant.clone(), Usage { leases: 1, memory: lease.memory, ..Usage::default() });
            }
        }
        &self
            .leases
            .entry(id)
            .insert_entry(Box::new(LeaseEntry { lease, server: s, inst: k, move_refused: None }))
            .into_mut()
            .lease
    }

    /// Ends lease `id`, freeing its instance; false if not held.
    fn end_lease(&mut self, id: LeaseId, why: End) -> bool {
        let Some(entry) = self.leases.remove(&id) else { return false };
        self.moves.remove(&id);
        self.expiries.remove(&(entry.lease.expires_ms, id));
        let usage = self.tenants.get_mut(&entry.lease.tenant).expect("a lease's tenant has usage");
        usage.leases -= 1;
        usage.memory -= entry.lease.memory;
        if *usage == Usage::default() {
            self.tenants.remove(&entry.lease.tenant);
        }
        match entry.lease.class {
            LeaseClass::Exclusive => self.put_back(entry.inst),
            LeaseClass::Shared => self.leave(entry.inst, id, entry.lease.compute_percent, entry.lease.memory),
        }
        match why {
            End::Released => {}
            End::Expired => {
                self.counters.expirations += 1;
                self.pending.expired.push(id);
            }
            End::Lost => {
                self.counters.lost += 1;
                self.pending.lost.push(id);
            }
        }
        if self.ended_order.len() == ENDED_MEMORY
            && let Some(old) = self.ended_order.pop_front()
        {
            self.ended.remove(&old);
        }
        self.ended.insert(id, why);
        self.ended_order.push_back(id);
        true
    }

    // ---- quotas and the queue ---------------------------------------------

    /// Whether `tenant` may hold one more lease; `already` is 1 when that
    /// one is a waiter, already counted among the queued.
    fn check_leases_quota(&self, tenant: &str, already: u64) -> Result<(), PoolError> {
        let Some(max) = self.config.quota(tenant).max_leases else { return Ok(()) };
        let u = self.tenants.get(tenant).copied().unwrap_or_default();
        let after = u.leases + u.queued + 1 - already;
        if after > u64::from(max) {
            return Err(PoolError::QuotaExceeded {
                tenant: tenant.to_owned(),
                reason: format!("{after} leases held and queued with this one, at most {max}"),
            });
        }
        Ok(())
    }

    /// Whether `tenant` may add `memory`; `reserved` of it is already counted
    /// (a waiter's reservation).
    fn check_memory_quota(&self, tenant: &str, memory: u64, reserved: u64) -> Result<(), PoolError> {
        let Some(max) = self.config.quota(tenant).max_memory else { return Ok(()) };
        let u = self.tenants.get(tenant).copied().unwrap_or_default();
        let after = (u.memory + u.queued_memory - reserved).saturating_add(memory);
        if after > max {
            return Err(PoolError::QuotaExceeded {
                tenant: tenant.to_owned(),
                reason: format!("{after} bytes held and queued with this one, at most {max}"),
            });
        }
        Ok(())
    }

    fn unreserve(&mut self, tenant: &str, reserve: u64) {
        let usage = self.tenants.get_mut(tenant).expect("a waiter's tenant has usage");
        usage.queued -= 1;
        usage.queued_memory -= reserve;
        if *usage == Usage::default() {
            self.tenants.remove(tenant);
        }
    }

    /// Grants waiters in FIFO order what is free; a waiter that does not fit
    /// keeps its place. Request shapes that found nothing are not tried again
    /// in the same pass (the free set only shrinks during it).
    fn serve(&mut self, now_ms: u64) {
        if self.recovery_end.is_some()
            || self.queue.is_empty()
            || (self.free_total == 0 && self.shared_hosts.is_empty())
        {
            return;
        }
        // Where a shared lease may go depends on its tenant too.
        type Shape = (u64, u32, Option<String>, Option<String>);
        let mut failed: HashSet<Shape> = HashSet::new();
        // When every tenant may share a GPU with every other, a shared
        // request fails on room alone, and room only shrinks during a pass:
        // one that asks at least as much as one that failed fails too.
        let everyone_shares =
            self.config.tenant_quotas.is_empty() && self.config.default_quota.share_fate_across_tenants;
        let mut shared_failed: Vec<(u64, u32)> = Vec::new();
        let mut cursor = 0;
        while self.free_total > 0 || !self.shared_hosts.is_empty() {
            let Some((&t, w)) = self.queue.range((Bound::Excluded(cursor), Bound::Unbounded)).next() else { break };
            cursor = t;
            let by_room = everyone_shares && w.req.class == LeaseClass::Shared;
            let (memory, percent) = (w.req.memory, w.req.compute_percent);
            if by_room && shared_failed.iter().any(|&(m, p)| m <= memory && p <= percent) {
                continue;
            }
            let shape = (!by_room).then(|| {
                let tenant = (w.req.class == LeaseClass::Shared).then(|| w.req.tenant.clone());
                (memory, percent, w.req.profile.clone(), tenant)
            });
            if shape.as_ref().is_some_and(|shape| failed.contains(shape)) {
                continue;
            }
            let need = Need::of(&w.req);
            let Some(k) = self.best_place(&need, &w.req.tenant) else {
                match shape {
                    Some(shape) => {
                        failed.insert(shape);
                    }
                    None => shared_failed.push((memory, percent)),
                }
                continue;
            };
            let quota = self
                .check_leases_quota(&w.req.tenant, 1)
                .and_then(|()| self.check_memory_quota(&w.req.tenant, self.grant_memory(k, &need), w.reserve));
            if quota.is_err() {
                continue;
            }
            let w = self.queue.remove(&t).expect("the waiter is queued");
            self.unreserve(&w.req.tenant, w.reserve);
            let id = self.grant(k, &w.req, now_ms);
            let lease = self.leases[&id].lease.clone();
            self.pending.grants.push(Grant { ticket: Ticket(t), lease });
        }
    }

    // ---- checks -------------------------------------------------------------

    /// Panics if an internal invariant does not hold. O(everything).
    #[cfg(test)]
    fn check_invariants(&self) {
        // Leases and instances point at each other.
        for (&id, e) in &self.leases {
            assert_eq!(e.lease.id, id);
            let inst = self.instances.try_get(e.inst).unwrap_or_else(|| panic!("lease {id} has no instance"));
            match e.lease.class {
                LeaseClass::Exclusive => {
                    assert_eq!(inst.lease, Some(id), "instance of {id} held by another");
                    assert!(inst.shared.is_empty(), "exclusive lease {id} shares its instance");
                    assert_eq!(inst.memory, e.lease.memory);
                    assert_eq!(e.lease.compute_percent, 0);
                }
                LeaseClass::Shared => {
                    assert!(inst.shared.contains(&id), "shared lease {id} is not on its instance");
                    assert_eq!(inst.lease, None, "shared lease {id} is on an exclusively held instance");
                    assert!(inst.profile.is_none(), "shared lease {id} is on a MIG instance");
                    assert!((1..=100).contains(&e.lease.compute_percent));
                }
            }
            assert_eq!(inst.server, e.server);
            assert_eq!(inst.uuid, e.lease.instance_uuid);
            let server = self.servers.get(e.server);
            assert_eq!(server.spec.id, e.lease.server_id);
            assert_eq!(server.spec.address, e.lease.address);
            assert!(self.expiries.contains(&(e.lease.expires_ms, id)));
            assert!(!self.ended.contains_key(&id));
        }
        assert_eq!(self.expiries.len(), self.leases.len());
        let mut held = HashSet::new();
        let mut free = 0;
        for (k, inst) in self.instances.iter() {
            assert_eq!(self.instance_ids.get(&inst.uuid), Some(&k));
            for &id in inst.lease.iter().chain(&inst.shared) {
                assert!(held.insert(id), "lease {id} holds two instances");
                assert_eq!(self.leases[&id].inst, k);
            }
            // A draining server's free instances are not counted free.
            if inst.is_free() && !self.servers.get(inst.server).draining {
                free += 1;
            }
            assert_eq!(self.shared_hosts.contains(&k), !inst.shared.is_empty());
            if !inst.shared.is_empty() {
                assert!(self.shared_order.contains(&self.shared_key(k)), "{} is out of the shared order", inst.uuid);
            }
            let shared: Vec<&Lease> = inst.shared.iter().map(|id| &self.leases[id].lease).collect();
            assert_eq!(inst.shared_percent, shared.iter().map(|l| l.compute_percent).sum::<u32>());
            assert_eq!(inst.shared_memory, shared.iter().map(|l| l.memory).sum::<u64>());
            assert!(inst.shared_percent <= 100, "{} has {}% placed", inst.uuid, inst.shared_percent);
            let limit = self.shared_memory_limit(k);
            assert!(inst.shared_memory <= limit, "{} memory over-committed by shares", inst.uuid);
            for a in &shared {
                for b in &shared {
                    assert!(self.may_share_fate(&a.tenant, &b.tenant), "{} and {} share fate", a.tenant, b.tenant);
                }
            }
        }
        assert_eq!(held.len(), self.leases.len());
        assert_eq!(self.shared_order.len(), self.shared_hosts.len());
        assert_eq!(free, self.free_total);
        assert_eq!(self.instance_ids.len(), self.instances.len());
        // The free index.
        let mut class_total: HashMap<u32, u32> = HashMap::new();
        let mut class_free: HashMap<u32, u32> = HashMap::new();
        for (k, inst) in self.instances.iter() {
            *class_total.entry(inst.class).or_default() += 1;
            if inst.is_free() && !self.servers.get(inst.server).draining {
                *class_free.entry(inst.class).or_default() += 1;
            }
            let _ = k;
        }
        assert_eq!(self.classes.len(), class_total.len(), "empty classes are removed");
        assert_eq!(self.class_order.len(), self.classes.len());
        assert_eq!(self.class_ids.len(), self.classes.len());
        for (cid, class) in self.classes.iter() {
            assert_eq!(class.total, class_total[&cid]);
            assert_eq!(class.free, class_free.get(&cid).copied().unwrap_or(0));
            assert_eq!(self.class_ids[&class.key], cid);
            assert!(self.class_order.contains(&(class.key.memory, class.key.sms, cid)));
            let expected: BTreeSet<(u32, u64, u32)> = self
                .servers
                .iter()
                .filter(|(_, server)| server.free.iter().any(|(c, _)| *c == cid))
                .map(|(s, server)| (server.leases, server.seq, s))
                .collect();
            assert_eq!(class.servers, expected);
        }
        // Servers.
        let mut seqs = HashSet::new();
        for (s, server) in self.servers.iter() {
            assert!(seqs.insert(server.seq));
            assert_eq!(self.server_ids[&server.spec.id], s);
            assert!(self.heartbeats.contains(&(server.last_seen_ms, s)));
            let leased = server.insts.iter().filter(|&&k| !self.instances.get(k).is_free()).count();
            let leases: usize = server
                .insts
                .iter()
                .map(|&k| self.instances.get(k))
                .map(|i| usize::from(i.lease.is_some()) + i.shared.len())
                .sum();
            assert_eq!(server.leases as usize, leases);
            assert_eq!(server.insts.len(), server.spec.gpus.iter().map(|g| g.instances.len()).sum::<usize>());
            let mut keys = server.insts.iter();
            for gpu in &server.spec.gpus {
                let (mut leased_memory, mut overcommit) = (0, 0);
                for spec in &gpu.instances {
                    let k = *keys.next().expect("an instance key per spec");
                    let inst = self.instances.get(k);
                    overcommit += self.shared_memory_limit(k) - inst.memory;
                    assert_eq!(inst.uuid, spec.uuid);
                    assert_eq!(inst.server, s);
                    let key = &self.classes.get(inst.class).key;
                    assert_eq!((key.memory, key.sms, key.gpu_sms), (spec.memory, spec.sms, gpu.sms));
                    if inst.lease.is_some() {
                        leased_memory += inst.memory;
                    }
                    leased_memory += inst.shared_memory;
                }
                assert!(leased_memory <= gpu.memory + overcommit, "GPU {} memory over-committed", gpu.uuid);
                let mut slices = [false; fleet::SLICES as usize];
                for spec in &gpu.instances {
                    if let Some((start, size)) = spec.placement {
                        for slot in start..start + size {
                            assert!(!slices[slot as usize], "placements overlap on {}", gpu.uuid);
                            slices[slot as usize] = true;
                        }
                    }
                }
            }
            for (cid, set) in &server.free {
                assert!(!set.is_empty());
                for &k in set {
                    let inst = self.instances.get(k);
                    assert!(inst.is_free());
                    assert_eq!((inst.server, inst.class), (s, *cid));
                }
            }
            let indexed: usize = server.free.iter().map(|(_, set)| set.len()).sum();
            // A draining server's free instances are not indexed.
            let free = if server.draining { 0 } else { server.insts.len() - leased };
            assert_eq!(indexed, free);
        }
        assert_eq!(self.heartbeats.len(), self.servers.len());
        assert_eq!(self.server_ids.len(), self.servers.len());
        // Tenants.
        let mut usage: HashMap<&str, Usage> = HashMap::new();
        for e in self.leases.values() {
            let u = usage.entry(&e.lease.tenant).or_default();
            u.leases += 1;
            u.memory += e.lease.memory;
        }
        for w in self.queue.values() {
            let u = usage.entry(&w.req.tenant).or_default();
            u.queued += 1;
            u.queued_memory += w.reserve;
        }
        assert_eq!(usage.len(), self.tenants.len());
        for (tenant, u) in usage {
            assert_eq!(self.tenants[tenant], u, "usage of {tenant}");
        }
        assert!(self.queue.len() <= self.config.queue_capacity);
        assert_eq!(self.ended.len(), self.ended_order.len());
    }
}

/// Maps keyed by lease id, hashed with [`mix`] rather than SipHash: ids are
/// not chosen by strangers (they are issued here, or signed by this balancer).
type IdMap<V> = HashMap<LeaseId, V, BuildHasherDefault<IdHasher>>;

#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = mix(self.0 ^ n);
    }
}

/// Multiprocessors of a `percent` share of `sms`, rounded up.
fn share_of(sms: u32, percent: u32) -> u32 {
    (u64::from(sms) * u64::from(percent)).div_ceil(100) as u32
}

/// A bijection of u64 (splitmix64's finalizer): consecutive states give
/// unrelated-looking ids, and distinct states distinct ids.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Every problem with a registration on its own (not against other servers).
fn validate_spec(spec: &ServerSpec) -> Vec<String> {
    let mut p = Vec::new();
    if spec.id.is_empty() {
        p.push("server id is empty".to_owned());
    }
    if spec.address.is_empty() {
        p.push("address is empty".to_owned());
    }
    let mut gpu_uuids = HashSet::new();
    let mut inst_uuids = HashSet::new();
    for gpu in &spec.gpus {
        let g = &gpu.uuid;
        if g.is_empty() {
            p.push(format!("GPU {} has an empty uuid", gpu.index));
        } else if !gpu_uuids.insert(g) {
            p.push(format!("GPU uuid {g} appears twice"));
        }
        if gpu.memory == 0 {
            p.push(format!("GPU {g} has no memory"));
        }
        if !gpu.mig {
            match gpu.instances.as_slice() {
                [i] => {
                    if i.uuid != *g {
                        p.push(format!("GPU {g} has MIG off: its instance must have the GPU's uuid, not {}", i.uuid));
                    }
                    if i.profile.is_some() || i.placement.is_some() {
                        p.push(format!("GPU {g} has MIG off: its instance has no profile or placement"));
                    }
                }
                other => p.push(format!("GPU {g} has MIG off and must be one instance, not {}", other.len())),
            }
        }
        let mut slices: [Option<&str>; fleet::SLICES as usize] = [None; fleet::SLICES as usize];
        let mut memory = 0u64;
        for inst in &gpu.instances {
            let u = &inst.uuid;
            if u.is_empty() {
                p.push(format!("an instance of GPU {g} has an empty uuid"));
            } else if !inst_uuids.insert(u) {
                p.push(format!("instance uuid {u} appears twice"));
            }
            if inst.memory == 0 {
                p.push(format!("instance {u} has no memory"));
            }
            if inst.sms > gpu.sms {
                p.push(format!("instance {u} has {} multiprocessors, its GPU {}", inst.sms, gpu.sms));
            }
            memory = memory.saturating_add(inst.memory);
            if !gpu.mig {
                continue;
            }
            match &inst.profile {
                None => p.push(format!("MIG instance {u} has no profile")),
                Some(profile) if profile.name.is_empty() => {
                    p.push(format!("MIG instance {u} has an empty profile name"))
                }
                Some(_) => {}
            }
            if let Some((start, size)) = inst.placement {
                if size == 0 || start.checked_add(size).is_none_or(|end| end > fleet::SLICES) {
                    p.push(format!("instance {u} has placement {start}:{size}, outside {} slices", fleet::SLICES));
                } else if let Some(other) = (start..start + size).find_map(|i| slices[i as usize]) {
                    p.push(format!("instances {other} and {u} overlap on GPU {g}"));
                } else {
                    for i in start..start + size {
                        slices[i as usize] = Some(u);
                    }
                }
            }
        }
        if memory > gpu.memory {
            p.push(format!("instances of GPU {g} have {memory} bytes in all, more than its {}", gpu.memory));
        }
    }
    p
}
