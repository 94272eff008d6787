//! Property tests: random operation sequences over random fleets of MIG and
//! whole GPUs, checked after every step against the invariants and a
//! brute-force placement oracle computed from the operator view.

use super::fleet::{self, GIB};
use super::*;
use proptest::prelude::*;

const T0: u64 = 1_700_000_000_000;
const SERVERS: usize = 4;
const TTL: u64 = 3_000;
const MEMORY: [u64; 7] = [0, 5 * GIB, 10 * GIB, 20 * GIB, 40 * GIB, 80 * GIB, 100 * GIB];
const PERCENT: [u32; 7] = [0, 10, 13, 25, 46, 50, 100];
const PROFILES: [Option<&str>; 7] =
    [None, Some("1g.10gb"), Some("9"), Some("3g.40gb"), Some("0"), Some("5"), Some("2g.99gb")];
const TENANTS: [&str; 3] = ["count", "memory", "free"];

#[derive(Debug, Clone)]
enum Op {
    Register { server: usize, layouts: Vec<usize> },
    Allocate { tenant: usize, memory: usize, percent: usize, profile: usize, wait: bool },
    Release(usize),
    Renew(usize),
    Tick(u64),
    Heartbeat { server: usize, live: Vec<usize>, stranger: bool },
    Adopt { lease: usize, extend: bool },
    Cancel(usize),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..SERVERS, prop::collection::vec(0..=fleet::LAYOUTS.len(), 1..=3))
            .prop_map(|(server, layouts)| Op::Register { server, layouts }),
        8 => (0..TENANTS.len(), 0..MEMORY.len(), 0..PERCENT.len(), 0..PROFILES.len(), any::<bool>())
            .prop_map(|(tenant, memory, percent, profile, wait)| Op::Allocate { tenant, memory, percent, profile, wait }),
        3 => (0..usize::MAX).prop_map(Op::Release),
        2 => (0..usize::MAX).prop_map(Op::Renew),
        2 => (0..2_000u64).prop_map(Op::Tick),
        2 => (0..SERVERS, prop::collection::vec(0..usize::MAX, 0..4), any::<bool>())
            .prop_map(|(server, live, stranger)| Op::Heartbeat { server, live, stranger }),
        1 => (0..usize::MAX, any::<bool>()).prop_map(|(lease, extend)| Op::Adopt { lease, extend }),
        1 => (0..usize::MAX).prop_map(Op::Cancel),
        1 => Just(Op::Restart),
    ]
}

fn config(policy: Policy, recovery_ms: u64, queue_capacity: usize) -> PoolConfig {
    let mut config = PoolConfig {
        policy,
        lease_ttl_ms: TTL,
        heartbeat_timeout_ms: 2_500,
        queue_capacity,
        recovery_ms,
        id_seed: 1,
        // Shares overcommit the memory of servers that swap (odd ones).
        memory_overcommit_percent: 150,
        ..PoolConfig::default()
    };
    config.tenant_quotas.insert("count".into(), Quota { max_leases: Some(3), max_memory: None, ..Quota::default() });
    config
        .tenant_quotas
        .insert("memory".into(), Quota { max_leases: None, max_memory: Some(60 * GIB), ..Quota::default() });
    config
}

fn spec(server: usize, layouts: &[usize]) -> ServerSpec {
    let gpus = layouts
        .iter()
        .enumerate()
        .map(|(g, &l)| match fleet::LAYOUTS.get(l) {
            Some(layout) => fleet::mig_gpu(server, g as u32, layout),
            None => fleet::whole_gpu(server, g as u32),
        })
        .collect();
    let mut spec = fleet::server(server, gpus);
    spec.swap_bytes = if server % 2 == 1 { 30 * GIB } else { 0 };
    spec
}

/// Whether `instance` (of a GPU with `gpu_sms`) satisfies `req`.
fn fits(req: &Request, memory: u64, sms: u32, gpu_sms: u32, profile: Option<&Profile>) -> bool {
    memory >= req.memory
        && u64::from(req.compute_percent) * u64::from(gpu_sms) <= 100 * u64::from(sms)
        && req.profile.as_deref().is_none_or(|sel| profile.is_some_and(|p| p.name == sel || p.id.to_string() == sel))
}

struct Model {
    pool: Pool,
    config: PoolConfig,
    now: u64,
    /// Every lease ever granted or adopted.
    issued: Vec<Lease>,
    ids: HashSet<LeaseId>,
    /// Queued requests not yet granted or cancelled.
    waiting: HashMap<Ticket, Request>,
    specs: HashMap<String, ServerSpec>,
    restarts: u64,
}

impl Model {
    fn check_lease(&mut self, lease: &Lease, req: &Request) {
        assert_eq!(lease.tenant, req.tenant);
        assert!(
            fits(req, lease.memory, lease.sms, fleet::H100_SMS, lease.profile.as_ref()),
            "{lease:?} does not satisfy {req:?}"
        );
        assert_eq!((lease.issued_ms, lease.expires_ms), (self.now, self.now + TTL));
        assert!(self.ids.insert(lease.id), "lease id {} issued twice", lease.id);
        self.issued.push(lease.clone());
    }

    fn check_grants(&mut self, grants: Vec<Grant>) {
        for g in grants {
            let req = self.waiting.remove(&g.ticket).unwrap_or_else(|| panic!("grant for unknown {:?}", g.ticket));
            self.check_lease(&g.lease, &req);
        }
    }

    fn pick<T: Clone>(list: &[T], i: usize) -> Option<T> {
        (!list.is_empty()).then(|| list[i % list.len()].clone())
    }

    fn allocate(&mut self, req: Request, wait: bool) {
        let view = self.pool.status(self.now);
        let quota = self.config.quota(&req.tenant);
        let held: Vec<&Lease> = view.leases.iter().filter(|l| l.tenant == req.tenant).collect();
        let queued = view.queue.iter().filter(|q| q.request.tenant == req.tenant).count();
        // Free instances that fit, with their server's position and lease count.
        let mut free = Vec::new();
        let mut registered = false;
        for (pos, server) in view.servers.iter().enumerate() {
            for gpu in &server.gpus {
                for (i, lease) in gpu.instances() {
                    if fits(&req, i.memory, i.sms, gpu.spec.sms, i.profile.as_ref()) {
                        registered = true;
                        if lease.is_none() {
                            free.push(((i.memory, i.sms), pos, server.leases));
                        }
                    }
                }
            }
        }
        let result = self.pool.allocate(req.clone(), self.now, wait);
        let count_exceeded = quota.max_leases.is_some_and(|max| held.len() + queued + 1 > max as usize);
        match result {
            Ok(Allocation::Granted(lease)) => {
                assert!(!view.recovering && !count_exceeded);
                let best = free.iter().map(|f| f.0).min().expect("granted with nothing free fitting");
                assert_eq!((lease.memory, lease.sms), best, "not the best fit");
                let candidates = free.iter().filter(|f| f.0 == best);
                let expected = match self.config.policy {
                    Policy::Spread => candidates.min_by_key(|f| (f.2, f.1)),
                    Policy::Binpack => candidates.min_by_key(|f| (std::cmp::Reverse(f.2), f.1)),
                }
                .expect("a candidate");
                assert_eq!(lease.server_id, view.servers[expected.1].id, "not the policy's server");
                if let Some(max) = quota.max_memory {
                    assert!(held.iter().map(|l| l.memory).sum::<u64>() + lease.memory <= max);
                }
                self.check_lease(&lease, &req);
            }
            Ok(Allocation::Queued(ticket)) => {
                assert!(wait && !count_exceeded);
                assert!(view.recovering || (free.is_empty() && registered), "queued though {free:?}");
                assert!(view.queue.len() < self.config.queue_capacity);
                self.waiting.insert(ticket, req);
            }
            Err(PoolError::Exhausted) => {
                assert!(!wait);
                assert!(view.recovering || (free.is_empty() && registered));
            }
            Err(PoolError::QueueFull) => {
                assert!(wait && view.queue.len() == self.config.queue_capacity);
            }
            Err(PoolError::Unsatisfiable { .. }) => assert!(!view.recovering && !registered),
            Err(PoolError::QuotaExceeded { .. }) => {
                assert!(count_exceeded || quota.max_memory.is_some(), "{req:?}");
            }
            Err(e) => panic!("{req:?}: {e}"),
        }
        let grants = self.pool.take_grants();
        self.check_grants(grants);
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Register { server, layouts } => {
                let spec = spec(*server, layouts);
                let grants = self.pool.register(spec.clone(), self.now).expect("a valid registration");
                self.specs.insert(spec.id.clone(), spec);
                self.check_grants(grants);
            }
            Op::Allocate { tenant, memory, percent, profile, wait } => {
                let req = Request {
                    tenant: TENANTS[*tenant].into(),
                    memory: MEMORY[*memory],
                    compute_percent: PERCENT[*percent],
                    profile: PROFILES[*profile].map(str::to_owned),
                    class: LeaseClass::Exclusive,
                };
                self.allocate(req, *wait);
            }
            Op::Release(i) => {
                let Some(lease) = Self::pick(&self.issued, *i) else { return };
                let held = self.pool.lease(lease.id).is_some();
                match self.pool.release(lease.id) {
                    Ok(grants) => {
                        assert!(held);
                        self.check_grants(grants);
                    }
                    Err(PoolError::UnknownLease(_) | PoolError::LeaseExpired(_)) => assert!(!held),
                    Err(e) => panic!("{e}"),
                }
            }
            Op::Renew(i) => {
                let Some(lease) = Self::pick(&self.issued, *i) else { return };
                let before = self.pool.lease(lease.id).cloned();
                match self.pool.renew(lease.id, self.now) {
                    Ok(renewed) => {
                        let before = before.expect("renewed a lease not held");
                        assert_eq!(renewed.expires_ms, before.expires_ms.max(self.now + TTL));
                    }
                    Err(PoolError::UnknownLease(_) | PoolError::LeaseExpired(_)) => assert!(before.is_none()),
                    Err(e) => panic!("{e}"),
                }
                let grants = self.pool.take_grants();
                self.check_grants(grants);
            }
            Op::Tick(dt) => {
                self.now += dt;
                let before: HashSet<LeaseId> = self.pool.status(self.now - dt).leases.iter().map(|l| l.id).collect();
                let tick = self.pool.tick(self.now);
                for id in tick.expired.iter().chain(&tick.lost) {
                    assert!(before.contains(id) || self.ids.contains(id));
                    assert!(self.pool.lease(*id).is_none());
                }
                self.check_grants(tick.grants);
            }
            Op::Heartbeat { server, live, stranger } => {
                let id = fleet::server_id(*server);
                let view = self.pool.status(self.now);
                let mut ids: Vec<LeaseId> =
                    live.iter().filter_map(|&i| Self::pick(&self.issued, i)).map(|l| l.id).collect();
                if *stranger {
                    ids.push(LeaseId(0xdead));
                }
                let expected: Vec<LeaseId> = ids
                    .iter()
                    .copied()
                    .filter(|lid| !view.leases.iter().any(|l| l.id == *lid && l.server_id == id))
                    .collect();
                let load = Load {
                    sessions: ids.len() as u32,
                    memory_used: 0,
                    live_leases: ids.clone(),
                    gpu_busy: vec![],
                    group_faults: 0,
                };
                match self.pool.heartbeat(&id, load, self.now) {
                    Ok(ended) => {
                        assert_eq!(ended, expected);
                        for l in &view.leases {
                            if l.server_id == id {
                                let in_use = self.pool.lease(l.id).expect("still held").in_use;
                                assert_eq!(in_use, ids.contains(&l.id));
                            }
                        }
                    }
                    Err(PoolError::UnknownServer(_)) => assert!(!view.servers.iter().any(|s| s.id == id)),
                    Err(e) => panic!("{e}"),
                }
                let grants = self.pool.take_grants();
                self.check_grants(grants);
            }
            Op::Adopt { lease, extend } => {
                let Some(lease) = Self::pick(&self.issued, *lease) else { return };
                let claims =
                    Adopt { expires_ms: if *extend { self.now + TTL } else { lease.expires_ms }, ..Adopt::of(&lease) };
                let held = self.pool.lease(lease.id).cloned();
                match self.pool.adopt(claims.clone(), self.now) {
                    Ok(adopted) => {
                        assert_eq!(adopted.instance_uuid, claims.instance_uuid);
                        if let Some(held) = held {
                            assert_eq!(adopted, held);
                        }
                    }
                    Err(
                        PoolError::Conflict { .. }
                        | PoolError::LeaseEnded(_)
                        | PoolError::LeaseExpired(_)
                        | PoolError::UnknownServer(_)
                        | PoolError::UnknownInstance { .. }
                        | PoolError::InvalidRequest(_),
                    ) => assert!(held.is_none_or(|h| h.instance_uuid != claims.instance_uuid)),
                    Err(e) => panic!("{e}"),
                }
                let grants = self.pool.take_grants();
                self.check_grants(grants);
            }
            Op::Cancel(i) => {
                let mut tickets: Vec<Ticket> = self.waiting.keys().copied().collect();
                tickets.sort();
                let Some(ticket) = Self::pick(&tickets, *i) else { return };
                assert!(self.pool.cancel(ticket));
                assert!(!self.pool.cancel(ticket));
                self.waiting.remove(&ticket);
            }
            Op::Restart => {
                // The balancer restarts: servers re-register, holders bring their leases back.
                self.restarts += 1;
                let view = self.pool.status(self.now);
                let config = PoolConfig { id_seed: 1 + self.restarts * 1_000_003, ..self.config.clone() };
                let mut pool = Pool::new(config, self.now);
                for server in &view.servers {
                    pool.register(self.specs[&server.id].clone(), self.now).expect("re-registration");
                }
                for lease in &view.leases {
                    let claims = Adopt::of(lease);
                    let adopted = pool.adopt(claims, self.now).expect("every live lease comes back");
                    assert_eq!(adopted, Lease { in_use: false, ..lease.clone() });
                }
                self.pool = pool;
                self.waiting.clear();
            }
        }
    }

    fn check(&self) {
        self.pool.check_invariants();
        let view = self.pool.status(self.now);
        let mut holders = HashSet::new();
        for server in &view.servers {
            for gpu in &server.gpus {
                for (i, lease) in gpu.instances() {
                    if let Some(id) = lease {
                        assert!(holders.insert(id), "lease {id} holds two instances");
                        let lease = self.pool.lease(id).expect("an instance's lease is held");
                        assert_eq!(lease.instance_uuid, i.uuid);
                    }
                }
            }
        }
        assert_eq!(holders.len(), view.leases.len());
        let queued: Vec<Ticket> = view.queue.iter().map(|q| q.ticket).collect();
        let mut waiting: Vec<Ticket> = self.waiting.keys().copied().collect();
        waiting.sort();
        assert_eq!(queued, waiting);
        // Served to completion: a waiter without quota never waits while something free fits it.
        if !view.recovering {
            for q in view.queue.iter().filter(|q| q.request.tenant == "free") {
                for server in &view.servers {
                    for gpu in &server.gpus {
                        for (i, _) in gpu.instances().filter(|(_, lease)| lease.is_none()) {
                            assert!(
                                !fits(&q.request, i.memory, i.sms, gpu.spec.sms, i.profile.as_ref()),
                                "{:?} waits while {} is free",
                                q.request,
                                i.uuid
                            );
                        }
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_invariants(
        binpack in any::<bool>(),
        recovery in prop_oneof![Just(0u64), Just(1_500u64)],
        queue_capacity in 1usize..6,
        fleet in prop::collection::vec((0..SERVERS, prop::collection::vec(0..=fleet::LAYOUTS.len(), 1..=3)), 0..4),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let policy = if binpack { Policy::Binpack } else { Policy::Spread };
        let config = config(policy, recovery, queue_capacity);
        let mut model = Model {
            pool: Pool::new(config.clone(), T0),
            config,
            now: T0,
            issued: Vec::new(),
            ids: HashSet::new(),
            waiting: HashMap::new(),
            specs: HashMap::new(),
            restarts: 0,
        };
        for (server, layouts) in fleet {
            model.step(&Op::Register { server, layouts });
        }
        model.check();
        for op in &ops {
            model.step(op);
            model.check();
        }
    }
}

// ---- classes (issue 19) ----------------------------------------------------

/// Tenants of the class model: "x" and "y" share fate across tenants.
const CLASS_TENANTS: [&str; 4] = ["x", "y", "z", "w"];
const SHARE_MEMORY: [u64; 5] = [GIB, 5 * GIB, 20 * GIB, 40 * GIB, 81 * GIB];
const SHARE_PERCENT: [u32; 6] = [1, 10, 25, 33, 50, 100];

#[derive(Debug, Clone)]
enum ClassOp {
    Shared { tenant: usize, memory: usize, percent: usize, wait: bool },
    Exclusive { tenant: usize, wait: bool },
    Release(usize),
    Busy { server: usize, gpu: usize, permille: u32 },
    Tick(u64),
    Drain(usize),
    Rebalance,
    Restart,
}

fn class_op() -> impl Strategy<Value = ClassOp> {
    prop_oneof![
        8 => (0..CLASS_TENANTS.len(), 0..SHARE_MEMORY.len(), 0..SHARE_PERCENT.len(), any::<bool>())
            .prop_map(|(tenant, memory, percent, wait)| ClassOp::Shared { tenant, memory, percent, wait }),
        2 => (0..CLASS_TENANTS.len(), any::<bool>()).prop_map(|(tenant, wait)| ClassOp::Exclusive { tenant, wait }),
        4 => (0..usize::MAX).prop_map(ClassOp::Release),
        2 => (0..2usize, 0..4usize, 0..=1_000u32)
            .prop_map(|(server, gpu, permille)| ClassOp::Busy { server, gpu, permille }),
        1 => (0..2_000u64).prop_map(ClassOp::Tick),
        1 => (0..2usize).prop_map(ClassOp::Drain),
        1 => Just(ClassOp::Rebalance),
        1 => Just(ClassOp::Restart),
    ]
}

fn class_config() -> PoolConfig {
    let mut config =
        PoolConfig { lease_ttl_ms: TTL, heartbeat_timeout_ms: 60_000, id_seed: 3, ..PoolConfig::default() };
    let open = Quota { share_fate_across_tenants: true, ..Quota::default() };
    config.tenant_quotas.insert("x".into(), open);
    config.tenant_quotas.insert("y".into(), open);
    config
}

/// Two servers of three whole GPUs and one MIG GPU each.
fn class_fleet() -> Vec<ServerSpec> {
    (0..2)
        .map(|s| {
            let mut gpus: Vec<GpuSpec> = (0..3).map(|g| fleet::whole_gpu(s, g)).collect();
            gpus.push(fleet::mig_gpu(s, 3, fleet::LAYOUTS[0]));
            fleet::server(s, gpus)
        })
        .collect()
}

fn may_share(a: &str, b: &str) -> bool {
    a == b || (["x", "y"].contains(&a) && ["x", "y"].contains(&b))
}

/// A GPU a share may join: its uuid and (busy, placed percent).
type Joinable = (String, (u32, u32));

struct ClassModel {
    pool: Pool,
    now: u64,
    held: Vec<LeaseId>,
    restarts: u64,
}

impl ClassModel {
    /// The whole GPUs a shared request of `tenant` may join now, with their
    /// (busy, placed percent); and whether a whole GPU is free.
    fn candidates(&self, tenant: &str, memory: u64, percent: u32) -> (Vec<Joinable>, bool) {
        let view = self.pool.status(self.now);
        let leases: HashMap<LeaseId, &Lease> = view.leases.iter().map(|l| (l.id, l)).collect();
        let mut joinable = Vec::new();
        let mut free = false;
        for server in view.servers.iter().filter(|s| !s.draining) {
            for gpu in server.gpus.iter().filter(|g| !g.spec.mig) {
                if gpu.leases[0].is_some() {
                    continue;
                }
                if gpu.shared.is_empty() {
                    free = true;
                    continue;
                }
                let shares: Vec<&Lease> = gpu.shared.iter().map(|id| leases[id]).collect();
                let placed: u32 = shares.iter().map(|l| l.compute_percent).sum();
                let used: u64 = shares.iter().map(|l| l.memory).sum();
                if placed + percent <= 100
                    && used + memory <= gpu.spec.memory
                    && shares.iter().all(|l| may_share(&l.tenant, tenant))
                {
                    joinable.push((gpu.spec.uuid.clone(), (gpu.busy_permille, placed)));
                }
            }
        }
        (joinable, free)
    }

    fn step(&mut self, op: &ClassOp) {
        match *op {
            ClassOp::Shared { tenant, memory, percent, wait } => {
                let tenant = CLASS_TENANTS[tenant];
                let (memory, percent) = (SHARE_MEMORY[memory], SHARE_PERCENT[percent]);
                let (joinable, free) = self.candidates(tenant, memory, percent);
                let req = Request {
                    tenant: tenant.into(),
                    memory,
                    compute_percent: percent,
                    class: LeaseClass::Shared,
                    ..Request::default()
                };
                match self.pool.allocate(req, self.now, wait) {
                    Ok(Allocation::Granted(lease)) => {
                        assert_eq!(
                            (lease.class, lease.compute_percent, lease.memory),
                            (LeaseClass::Shared, percent, memory)
                        );
                        assert!(lease.profile.is_none(), "a share of a MIG instance");
                        match joinable.iter().map(|j| j.1).min() {
                            Some(best) => {
                                let on = joinable.iter().find(|j| j.0 == lease.instance_uuid);
                                assert_eq!(on.map(|j| j.1), Some(best), "not the least busy, least placed GPU");
                            }
                            None => assert!(free, "granted with nothing to join and no free GPU"),
                        }
                        self.held.push(lease.id);
                    }
                    Ok(Allocation::Queued(_)) | Err(PoolError::Exhausted) => {
                        assert!(joinable.is_empty() && !free, "refused though {joinable:?} or a free GPU");
                    }
                    Err(PoolError::Unsatisfiable { .. }) => assert!(memory > fleet::H100_MEMORY),
                    Err(e) => panic!("{e}"),
                }
            }
            ClassOp::Exclusive { tenant, wait } => {
                let req = Request { tenant: CLASS_TENANTS[tenant].into(), ..Request::default() };
                if let Ok(Allocation::Granted(lease)) = self.pool.allocate(req, self.now, wait) {
                    assert_eq!(lease.class, LeaseClass::Exclusive);
                    self.held.push(lease.id);
                }
            }
            ClassOp::Release(i) => {
                if self.held.is_empty() {
                    return;
                }
                let id = self.held.swap_remove(i % self.held.len());
                let Some(lease) = self.pool.lease(id).cloned() else { return };
                let (_, free_before) = self.pool.instance_counts();
                let shares_before = self.shares_on(&lease.instance_uuid);
                let grants = self.pool.release(id).expect("a held lease releases");
                self.held.extend(grants.iter().map(|g| g.lease.id));
                assert!(self.pool.lease(id).is_none());
                assert!(!self.shares_on(&lease.instance_uuid).contains(&id));
                if grants.is_empty() {
                    // The instance is free again exactly when no lease is left on it.
                    let last = lease.class == LeaseClass::Exclusive || shares_before.len() == 1;
                    let (_, free_after) = self.pool.instance_counts();
                    let draining =
                        self.pool.status(self.now).servers.iter().any(|s| s.id == lease.server_id && s.draining);
                    let freed = usize::from(last && !draining);
                    assert_eq!(free_after, free_before + freed);
                }
            }
            ClassOp::Busy { server, gpu, permille } => {
                let uuid = format!("GPU-{server:05}-{gpu}");
                let load = Load { gpu_busy: vec![(uuid, permille)], ..Load::default() };
                // A drained server is gone until it registers again.
                let _ = self.pool.heartbeat(&fleet::server_id(server), load, self.now);
            }
            ClassOp::Tick(ms) => {
                self.now += ms;
                let tick = self.pool.tick(self.now);
                self.held.extend(tick.grants.iter().map(|g| g.lease.id));
            }
            ClassOp::Drain(server) => {
                if let Ok(plan) = self.pool.drain_server(&fleet::server_id(server), self.now) {
                    for id in &plan.stuck {
                        let lease = self.pool.lease(*id).expect("a stuck lease is held");
                        assert_eq!(lease.server_id, fleet::server_id(server));
                    }
                    // Moved leases, shared ones too, land elsewhere (the
                    // fate-sharing and share rules are checked after every op).
                    for id in &plan.moving {
                        let lease = self.pool.lease(*id).expect("a moving lease is held");
                        assert_ne!(lease.server_id, fleet::server_id(server));
                    }
                }
            }
            ClassOp::Rebalance => {
                let before: HashMap<LeaseId, String> =
                    self.pool.status(self.now).leases.iter().map(|l| (l.id, l.server_id.clone())).collect();
                for id in self.pool.rebalance(2, self.now) {
                    // A moved share is shared, and on another server now
                    // (the share and fate rules are checked after every op).
                    let lease = self.pool.lease(id).expect("a rebalanced lease is held");
                    assert_eq!(lease.class, LeaseClass::Shared);
                    assert_ne!(Some(&lease.server_id), before.get(&id));
                }
            }
            ClassOp::Restart => {
                self.restarts += 1;
                let view = self.pool.status(self.now);
                let config = PoolConfig { id_seed: 100 + self.restarts, ..class_config() };
                let mut pool = Pool::new(config, self.now);
                for spec in class_fleet() {
                    pool.register(spec, self.now).expect("re-registration");
                }
                for lease in &view.leases {
                    let claims = Adopt::of(lease);
                    let adopted = pool.adopt(claims, self.now).expect("every live lease comes back");
                    assert_eq!(adopted, Lease { in_use: false, ..lease.clone() });
                }
                self.pool = pool;
                self.held = view.leases.iter().map(|l| l.id).collect();
            }
        }
    }

    fn shares_on(&self, uuid: &str) -> Vec<LeaseId> {
        let view = self.pool.status(self.now);
        view.servers
            .iter()
            .flat_map(|s| &s.gpus)
            .filter(|g| g.spec.uuid == uuid)
            .flat_map(|g| g.shared.clone())
            .collect()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// No exclusive lease shares a GPU, shares stay within a fate group,
    /// 100 % and the GPU's memory; a share goes where the rule says; releases
    /// free what they held (and `check_invariants` checks it all).
    #[test]
    fn shared_and_exclusive_leases_keep_their_rules(ops in prop::collection::vec(class_op(), 1..120)) {
        let mut model = ClassModel { pool: Pool::new(class_config(), T0), now: T0, held: Vec::new(), restarts: 0 };
        for spec in class_fleet() {
            model.pool.register(spec, T0).expect("registration");
        }
        for op in &ops {
            model.step(op);
            model.pool.check_invariants();
        }
    }
}
