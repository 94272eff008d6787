//! Unit tests: one or more per operation and error.

use super::fleet::{self, GIB};
use super::*;

const T0: u64 = 1_700_000_000_000;

fn config() -> PoolConfig {
    PoolConfig { id_seed: 7, ..PoolConfig::default() }
}

fn pool_with(config: PoolConfig, servers: Vec<ServerSpec>) -> Pool {
    let mut pool = Pool::new(config, T0);
    for spec in servers {
        assert_eq!(pool.register(spec, T0), Ok(vec![]));
    }
    pool.check_invariants();
    pool
}

fn req(tenant: &str, memory: u64) -> Request {
    Request { tenant: tenant.into(), memory, ..Request::default() }
}

fn pct(tenant: &str, compute_percent: u32) -> Request {
    Request { tenant: tenant.into(), compute_percent, ..Request::default() }
}

fn profile(tenant: &str, profile: &str) -> Request {
    Request { tenant: tenant.into(), profile: Some(profile.into()), ..Request::default() }
}

#[track_caller]
fn granted(a: Result<Allocation, PoolError>) -> Lease {
    match a {
        Ok(Allocation::Granted(lease)) => lease,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[track_caller]
fn queued(a: Result<Allocation, PoolError>) -> Ticket {
    match a {
        Ok(Allocation::Queued(t)) => t,
        other => panic!("expected a ticket, got {other:?}"),
    }
}

/// One server with a 4g.40gb + 3g.40gb GPU, a 7 × 1g.10gb GPU and a whole GPU.
fn assorted() -> ServerSpec {
    fleet::server(
        0,
        vec![fleet::mig_gpu(0, 0, fleet::LAYOUTS[1]), fleet::mig_gpu(0, 1, fleet::LAYOUTS[0]), fleet::whole_gpu(0, 2)],
    )
}

fn profile_name(lease: &Lease) -> Option<&str> {
    lease.profile.as_ref().map(|p| p.name.as_str())
}

#[test]
fn best_fit_picks_the_smallest_fitting_instance() {
    let mut pool = pool_with(config(), vec![assorted()]);
    let small = granted(pool.allocate(req("a", 5 * GIB), T0, false));
    assert_eq!(profile_name(&small), Some("1g.10gb"));
    assert_eq!(small.memory, 10 * GIB);
    // 40 GiB instances: 3g.40gb has fewer multiprocessors than 4g.40gb.
    let mid = granted(pool.allocate(req("a", 15 * GIB), T0, false));
    assert_eq!(profile_name(&mid), Some("3g.40gb"));
    let next = granted(pool.allocate(req("a", 15 * GIB), T0, false));
    assert_eq!(profile_name(&next), Some("4g.40gb"));
    let big = granted(pool.allocate(req("a", 50 * GIB), T0, false));
    assert_eq!((big.profile.clone(), big.instance_uuid.as_str()), (None, "GPU-00000-2"));
    assert_eq!(big.sms, fleet::H100_SMS);
    assert_eq!(pool.allocate(req("a", 50 * GIB), T0, false), Err(PoolError::Exhausted));
    pool.check_invariants();
}

#[test]
fn compute_percent_needs_that_share_of_the_gpu() {
    let mut pool = pool_with(config(), vec![assorted()]);
    // ceil(12% of 132) = 16: a 1g.10gb.
    assert_eq!(profile_name(&granted(pool.allocate(pct("a", 12), T0, false))), Some("1g.10gb"));
    // ceil(13% of 132) = 18: more than a 1g's 16, so a 3g.40gb (60).
    assert_eq!(profile_name(&granted(pool.allocate(pct("a", 13), T0, false))), Some("3g.40gb"));
    // ceil(46% of 132) = 61: a 4g.40gb (64).
    assert_eq!(profile_name(&granted(pool.allocate(pct("a", 46), T0, false))), Some("4g.40gb"));
    assert_eq!(granted(pool.allocate(pct("a", 100), T0, false)).sms, 132);
    assert_eq!(pool.allocate(pct("a", 100), T0, false), Err(PoolError::Exhausted));
    pool.check_invariants();
}

#[test]
fn profile_matches_by_name_or_id() {
    let mut pool = pool_with(config(), vec![assorted()]);
    assert_eq!(profile_name(&granted(pool.allocate(profile("a", "4g.40gb"), T0, false))), Some("4g.40gb"));
    assert_eq!(pool.allocate(profile("a", "5"), T0, false), Err(PoolError::Exhausted));
    assert_eq!(profile_name(&granted(pool.allocate(profile("a", "9"), T0, false))), Some("3g.40gb"));
    let one = granted(pool.allocate(Request { memory: 1, ..profile("a", "19") }, T0, false));
    assert_eq!(profile_name(&one), Some("1g.10gb"));
    for unknown in ["9g.99gb", "42", "7g.80gb"] {
        match pool.allocate(profile("a", unknown), T0, true) {
            Err(PoolError::Unsatisfiable { reason }) => assert!(reason.contains("profile"), "{reason}"),
            other => panic!("{unknown}: {other:?}"),
        }
    }
    // A profile never matches a whole GPU.
    let mut whole = pool_with(config(), vec![fleet::server(1, vec![fleet::whole_gpu(1, 0)])]);
    assert!(matches!(whole.allocate(profile("a", "0"), T0, false), Err(PoolError::Unsatisfiable { .. })));
}

#[test]
fn spread_and_binpack_place_differently() {
    let servers = || fleet::synthetic(2, 1, 7);
    let place = |policy| {
        let mut pool = pool_with(PoolConfig { policy, ..config() }, servers());
        let placed: Vec<String> = (0..8).map(|_| granted(pool.allocate(req("a", 0), T0, false)).server_id).collect();
        pool.check_invariants();
        placed
    };
    let (a, b) = (fleet::server_id(0), fleet::server_id(1));
    assert_eq!(place(Policy::Spread), [&a, &b, &a, &b, &a, &b, &a, &b].map(String::clone));
    assert_eq!(place(Policy::Binpack), [&a, &a, &a, &a, &a, &a, &a, &b].map(String::clone));
}

#[test]
fn binpack_prefers_the_busiest_server_even_if_registered_later() {
    let mut pool = pool_with(PoolConfig { policy: Policy::Binpack, ..config() }, fleet::synthetic(3, 1, 7));
    let leases: Vec<Lease> = (0..9).map(|_| granted(pool.allocate(req("a", 0), T0, false))).collect();
    // Server 0 is full, server 1 has 2; free the first server's leases but one.
    for l in leases.iter().filter(|l| l.server_id == fleet::server_id(0)).skip(1) {
        pool.release(l.id).unwrap();
    }
    assert_eq!(granted(pool.allocate(req("a", 0), T0, false)).server_id, fleet::server_id(1));
    pool.check_invariants();
}

#[test]
fn quotas_limit_leases_and_memory() {
    let mut config = config();
    config.default_quota = Quota { max_leases: Some(2), max_memory: None, ..Quota::default() };
    config
        .tenant_quotas
        .insert("small".into(), Quota { max_leases: None, max_memory: Some(25 * GIB), ..Quota::default() });
    let mut pool = pool_with(config, fleet::synthetic(2, 1, 7));
    let first = granted(pool.allocate(req("a", 0), T0, false));
    granted(pool.allocate(req("a", 0), T0, false));
    for wait in [false, true] {
        match pool.allocate(req("a", 0), T0, wait) {
            Err(PoolError::QuotaExceeded { tenant, reason }) => {
                assert_eq!(tenant, "a");
                assert!(reason.contains("at most 2"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pool.queue_len(), 0, "never queued for quota");
    // Another tenant has its own count.
    granted(pool.allocate(req("b", 0), T0, false));
    pool.release(first.id).unwrap();
    granted(pool.allocate(req("a", 0), T0, false));
    // Memory: two 10 GiB instances fit in 25 GiB, a third does not.
    granted(pool.allocate(req("small", 0), T0, false));
    granted(pool.allocate(req("small", 0), T0, false));
    assert!(matches!(pool.allocate(req("small", 0), T0, true), Err(PoolError::QuotaExceeded { .. })));
    pool.check_invariants();
}

#[test]
fn queued_requests_count_against_the_quota() {
    let mut config = config();
    config.default_quota.max_leases = Some(2);
    let mut pool = pool_with(config, vec![fleet::server(0, vec![fleet::whole_gpu(0, 0)])]);
    granted(pool.allocate(req("a", 0), T0, false));
    queued(pool.allocate(req("a", 0), T0, true));
    assert!(matches!(pool.allocate(req("a", 0), T0, true), Err(PoolError::QuotaExceeded { .. })));
    pool.check_invariants();
}

#[test]
fn queue_is_fifo_and_bounded() {
    let config = PoolConfig { queue_capacity: 2, ..config() };
    let mut pool = pool_with(config, vec![fleet::server(0, vec![fleet::whole_gpu(0, 0)])]);
    let held = granted(pool.allocate(req("a", 0), T0, true));
    assert_eq!(pool.allocate(req("b", 0), T0, false), Err(PoolError::Exhausted));
    let t1 = queued(pool.allocate(req("b", 0), T0 + 1, true));
    let t2 = queued(pool.allocate(req("c", 0), T0 + 2, true));
    assert_eq!(pool.allocate(req("d", 0), T0 + 3, true), Err(PoolError::QueueFull));
    let view = pool.status(T0 + 10);
    assert_eq!(view.queue.iter().map(|q| (q.ticket, q.waited_ms)).collect::<Vec<_>>(), [(t1, 9), (t2, 8)]);
    pool.check_invariants();
    let grants = pool.release(held.id).unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!((grants[0].ticket, grants[0].lease.tenant.as_str()), (t1, "b"));
    assert_eq!(pool.lease(grants[0].lease.id), Some(&grants[0].lease));
    let grants = pool.release(grants[0].lease.id).unwrap();
    assert_eq!((grants[0].ticket, grants[0].lease.tenant.as_str()), (t2, "c"));
    assert_eq!(pool.queue_len(), 0);
    pool.check_invariants();
}

#[test]
fn cancel_takes_a_request_out_of_the_queue() {
    let mut pool = pool_with(config(), vec![fleet::server(0, vec![fleet::whole_gpu(0, 0)])]);
    let held = granted(pool.allocate(req("a", 0), T0, true));
    let t1 = queued(pool.allocate(req("b", 0), T0, true));
    let t2 = queued(pool.allocate(req("c", 0), T0, true));
    assert!(pool.cancel(t1));
    assert!(!pool.cancel(t1));
    assert!(!pool.cancel(Ticket(999)));
    pool.check_invariants();
    let grants = pool.release(held.id).unwrap();
    assert_eq!(grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), [t2]);
    assert!(!pool.cancel(t2), "already granted");
    assert_eq!(pool.counters().cancelled, 1);
    pool.check_invariants();
}

#[test]
fn a_waiter_that_does_not_fit_does_not_block_later_ones() {
    let spec = fleet::server(0, vec![fleet::mig_gpu(0, 0, &[(19, 0)]), fleet::whole_gpu(0, 1)]);
    let mut pool = pool_with(config(), vec![spec]);
    let small = granted(pool.allocate(req("a", 0), T0, false));
    let _big = granted(pool.allocate(req("a", 0), T0, false));
    let t_big = queued(pool.allocate(req("b", 50 * GIB), T0, true));
    let t_small = queued(pool.allocate(req("c", 5 * GIB), T0, true));
    let grants = pool.release(small.id).unwrap();
    assert_eq!(grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), [t_small]);
    assert_eq!(pool.status(T0).queue[0].ticket, t_big);
    pool.check_invariants();
}

#[test]
fn unsatisfiable_and_exhausted() {
    let mut pool = Pool::new(config(), T0);
    assert!(matches!(pool.allocate(req("a", 0), T0, true), Err(PoolError::Unsatisfiable { .. })));
    pool.register(fleet::server(0, vec![fleet::whole_gpu(0, 0)]), T0).unwrap();
    match pool.allocate(req("a", 81 * GIB), T0, true) {
        Err(PoolError::Unsatisfiable { reason }) => assert!(reason.contains("largest"), "{reason}"),
        other => panic!("{other:?}"),
    }
    granted(pool.allocate(req("a", 80 * GIB), T0, false));
    assert_eq!(pool.allocate(req("a", 80 * GIB), T0, false), Err(PoolError::Exhausted));
    assert_eq!(pool.queue_len(), 0);
}

#[test]
fn invalid_requests_are_refused() {
    let mut pool = pool_with(config(), vec![assorted()]);
    for (bad, what) in [
        (pct("a", 101), "compute_percent"),
        (req("", 0), "tenant"),
        (Request { profile: Some(String::new()), ..req("a", 0) }, "profile"),
    ] {
        match pool.allocate(bad, T0, true) {
            Err(PoolError::InvalidRequest(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn expiry_through_tick() {
    let mut pool = pool_with(PoolConfig { lease_ttl_ms: 1_000, ..config() }, vec![assorted()]);
    let lease = granted(pool.allocate(req("a", 0), T0, false));
    assert_eq!(lease.expires_ms, T0 + 1_000);
    assert!(!pool.tick(T0 + 999).changed());
    let tick = pool.tick(T0 + 1_000);
    assert_eq!(tick.expired, [lease.id]);
    assert!(pool.lease(lease.id).is_none());
    assert_eq!(pool.renew(lease.id, T0 + 1_001), Err(PoolError::LeaseExpired(lease.id)));
    assert_eq!(pool.release(lease.id), Err(PoolError::LeaseExpired(lease.id)));
    assert_eq!(pool.counters().expirations, 1);
    assert_eq!(pool.instance_counts().0, pool.instance_counts().1);
    pool.check_invariants();
}

#[test]
fn expiry_through_renew() {
    let mut pool = pool_with(PoolConfig { lease_ttl_ms: 1_000, ..config() }, vec![assorted()]);
    let lease = granted(pool.allocate(req("a", 0), T0, false));
    let renewed = pool.renew(lease.id, T0 + 600).unwrap();
    assert_eq!(renewed.expires_ms, T0 + 1_600);
    assert!(!pool.tick(T0 + 1_500).changed());
    assert_eq!(pool.renew(lease.id, T0 + 1_600), Err(PoolError::LeaseExpired(lease.id)));
    assert!(pool.lease(lease.id).is_none());
    pool.check_invariants();
    assert_eq!(pool.tick(T0 + 1_600).expired, [lease.id]);
    assert_eq!(pool.renew(LeaseId(1), T0), Err(PoolError::UnknownLease(LeaseId(1))));
}

#[test]
fn an_expired_lease_serves_the_queue() {
    let mut pool =
        pool_with(PoolConfig { lease_ttl_ms: 1_000, ..config() }, vec![fleet::server(0, vec![fleet::whole_gpu(0, 0)])]);
    let lease = granted(pool.allocate(req("a", 0), T0, false));
    let t = queued(pool.allocate(req("b", 0), T0, true));
    let tick = pool.tick(T0 + 1_000);
    assert_eq!(tick.expired, [lease.id]);
    assert_eq!(tick.grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), [t]);
    assert_eq!(tick.grants[0].lease.expires_ms, T0 + 2_000);
    pool.check_invariants();
}

#[test]
fn release_frees_and_serves() {
    let mut pool = pool_with(config(), vec![fleet::server(0, vec![fleet::whole_gpu(0, 0)])]);
    let lease = granted(pool.allocate(req("a", 0), T0, false));
    let t = queued(pool.allocate(req("b", 0), T0, true));
    let grants = pool.release(lease.id).unwrap();
    assert_eq!(grants[0].ticket, t);
    assert_eq!(pool.release(lease.id), Err(PoolError::UnknownLease(lease.id)));
    assert_eq!(pool.counters().releases, 1);
    assert_eq!(pool.counters().allocations, 2);
    pool.check_invariants();
}

#[test]
fn silent_servers_are_drained() {
    let mut pool = pool_with(config(), fleet::synthetic(2, 1, 7));
    let (a, b) = (fleet::server_id(0), fleet::server_id(1));
    let on_a = granted(pool.allocate(req("a", 0), T0, false));
    let on_b = granted(pool.allocate(req("a", 0), T0, false));
    assert_eq!((on_a.server_id.as_str(), on_b.server_id.as_str()), (a.as_str(), b.as_str()));
    pool.heartbeat(&a, Load::default(), T0 + 6_000).unwrap();
    // No drain at exactly the timeout.
    assert!(!pool.tick(T0 + 10_000).changed());
    let tick = pool.tick(T0 + 10_001);
    assert_eq!(tick.drained, std::slice::from_ref(&b));
    assert_eq!(tick.lost, [on_b.id]);
    assert_eq!(pool.renew(on_b.id, T0 + 10_001), Err(PoolError::LeaseExpired(on_b.id)));
    assert_eq!(pool.instance_counts().0, 7);
    for _ in 0..6 {
        assert_eq!(granted(pool.allocate(req("a", 0), T0 + 10_001, false)).server_id, a);
    }
    assert_eq!(pool.allocate(req("a", 0), T0 + 10_001, false), Err(PoolError::Exhausted));
    assert_eq!(pool.heartbeat(&b, Load::default(), T0 + 10_002), Err(PoolError::UnknownServer(b.clone())));
    pool.check_invariants();
    // It comes back by registering.
    pool.register(fleet::synthetic(2, 1, 7).remove(1), T0 + 10_003).unwrap();
    assert_eq!(granted(pool.allocate(req("a", 0), T0 + 10_003, false)).server_id, b);
    pool.check_invariants();
}

#[test]
fn re_registration_keeps_leases_on_instances_still_there() {
    let mut pool = pool_with(PoolConfig { policy: Policy::Binpack, ..config() }, fleet::synthetic(1, 1, 7));
    let leases: Vec<Lease> = (0..7).map(|_| granted(pool.allocate(req("a", 0), T0, false))).collect();
    let t = queued(pool.allocate(req("b", 0), T0, true));
    // The server restarts with six instances, at a new address.
    let mut spec = fleet::synthetic(1, 1, 6).remove(0);
    spec.address = "10.9.9.9:4433".into();
    let gone: Vec<LeaseId> = leases.iter().filter(|l| l.instance_uuid.ends_with("-6")).map(|l| l.id).collect();
    assert_eq!(gone.len(), 1);
    assert_eq!(pool.register(spec.clone(), T0 + 5), Ok(vec![]));
    pool.check_invariants();
    for l in &leases {
        match pool.lease(l.id) {
            Some(kept) => assert_eq!((kept.address.as_str(), &kept.instance_uuid), ("10.9.9.9:4433", &l.instance_uuid)),
            None => assert_eq!(gone, [l.id]),
        }
    }
    assert_eq!(pool.tick(T0 + 5).lost, gone);
    // Back with seven: the seventh serves the waiter.
    let grants = pool.register(fleet::synthetic(1, 1, 7).remove(0), T0 + 6).unwrap();
    assert_eq!(grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), [t]);
    assert!(grants[0].lease.instance_uuid.ends_with("-6"));
    // A different shape under the same uuid ends the lease.
    let mut changed = fleet::synthetic(1, 1, 7).remove(0);
    changed.gpus[0].instances[0].memory = 5 * GIB;
    let on_first = pool.status(T0).servers[0].gpus[0].leases[0].unwrap();
    pool.register(changed, T0 + 7).unwrap();
    assert!(pool.lease(on_first).is_none());
    pool.check_invariants();
}

#[test]
fn registrations_are_checked() {
    let mut pool = Pool::new(config(), T0);
    let mut dup = fleet::synthetic(1, 2, 7).remove(0);
    dup.gpus[1].instances[0].uuid = dup.gpus[0].instances[0].uuid.clone();
    let mut overlap = fleet::server(1, vec![fleet::mig_gpu(1, 0, &[(9, 0), (9, 4)])]);
    overlap.gpus[0].instances[1].placement = Some((2, 4));
    let mut outside = fleet::server(2, vec![fleet::mig_gpu(2, 0, &[(9, 4)])]);
    outside.gpus[0].instances[0].placement = Some((6, 4));
    let mut two_whole = fleet::server(3, vec![fleet::whole_gpu(3, 0)]);
    let again = two_whole.gpus[0].instances[0].clone();
    two_whole.gpus[0].instances.push(again);
    let mut too_much = fleet::server(4, vec![fleet::mig_gpu(4, 0, &[(9, 0), (9, 4)])]);
    too_much.gpus[0].instances[0].memory = 50 * GIB;
    let mut no_profile = fleet::server(5, vec![fleet::mig_gpu(5, 0, &[(19, 0)])]);
    no_profile.gpus[0].instances[0].profile = None;
    let mut empty_id = fleet::server(6, vec![]);
    empty_id.id.clear();
    for (spec, what) in [
        (dup, "appears twice"),
        (overlap, "overlap"),
        (outside, "outside"),
        (two_whole, "must be one instance"),
        (too_much, "more than its"),
        (no_profile, "no profile"),
        (empty_id, "server id is empty"),
    ] {
        match pool.register(spec, T0) {
            Err(PoolError::InvalidRequest(msg)) => assert!(msg.contains(what), "{what}: {msg}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(pool.instance_counts(), (0, 0));
    // An instance another server registered.
    pool.register(fleet::server(7, vec![fleet::whole_gpu(7, 0)]), T0).unwrap();
    let mut thief = fleet::server(8, vec![fleet::whole_gpu(7, 0)]);
    thief.gpus[0].index = 1;
    assert!(matches!(pool.register(thief, T0), Err(PoolError::InvalidRequest(msg)) if msg.contains("registered by")));
    pool.check_invariants();
}

#[test]
fn recovery_window_grants_nothing_new() {
    let config = PoolConfig { recovery_ms: 5_000, ..config() };
    let mut pool = Pool::new(config, T0);
    assert!(pool.recovering(T0));
    // Nothing registered yet: not unsatisfiable while servers come back.
    assert_eq!(pool.allocate(req("a", 0), T0, false), Err(PoolError::Exhausted));
    let early = queued(pool.allocate(req("a", 0), T0, true));
    pool.register(fleet::server(0, vec![fleet::whole_gpu(0, 0), fleet::whole_gpu(0, 1)]), T0 + 1).unwrap();
    let adopted = pool
        .adopt(
            Adopt {
                id: LeaseId(0x1234),
                tenant: "old".into(),
                server_id: fleet::server_id(0),
                instance_uuid: "GPU-00000-1".into(),
                memory: fleet::H100_MEMORY,
                class: LeaseClass::Exclusive,
                compute_percent: 0,
                issued_ms: T0 - 10_000,
                expires_ms: T0 + 20_000,
            },
            T0 + 2,
        )
        .unwrap();
    assert_eq!(adopted.expires_ms, T0 + 20_000);
    let late = queued(pool.allocate(req("b", 0), T0 + 3, true));
    assert_eq!(pool.allocate(req("c", 0), T0 + 3, false), Err(PoolError::Exhausted));
    assert!(!pool.tick(T0 + 4_999).changed());
    assert!(pool.recovering(T0 + 4_999));
    let tick = pool.tick(T0 + 5_000);
    assert!(tick.recovery_ended);
    assert!(!pool.recovering(T0 + 5_000));
    assert_eq!(tick.grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), [early]);
    assert_eq!(pool.status(T0 + 5_000).queue[0].ticket, late);
    assert_eq!(pool.counters().adoptions, 1);
    pool.check_invariants();
}

#[test]
fn recovery_ends_on_any_call() {
    let config = PoolConfig { recovery_ms: 5_000, ..config() };
    let mut pool = Pool::new(config, T0);
    pool.register(fleet::server(0, vec![fleet::whole_gpu(0, 0)]), T0).unwrap();
    let t = queued(pool.allocate(req("a", 0), T0, true));
    // The first call after the window serves the waiter first.
    assert_eq!(pool.allocate(req("b", 0), T0 + 5_000, false), Err(PoolError::Exhausted));
    assert_eq!(pool.take_grants().iter().map(|g| g.ticket).collect::<Vec<_>>(), [t]);
    assert!(pool.tick(T0 + 5_000).recovery_ended);
}

fn claims(pool: &Pool, lease: &Lease) -> Adopt {
    let _ = pool;
    Adopt::of(lease)
}

#[test]
fn adopt_takes_leases_back_after_a_restart() {
    let mut old = pool_with(config(), vec![assorted()]);
    let leases: Vec<Lease> = (0..3).map(|i| granted(old.allocate(req("a", i * 20 * GIB), T0, false))).collect();
    let mut pool = pool_with(PoolConfig { id_seed: 99, recovery_ms: 1_000, ..config() }, vec![assorted()]);
    for l in &leases {
        let back = pool.adopt(claims(&old, l), T0 + 1).unwrap();
        assert_eq!(back, Lease { in_use: false, ..l.clone() });
        // Idempotent.
        assert_eq!(pool.adopt(claims(&old, l), T0 + 2), Ok(back));
    }
    assert_eq!(pool.lease_count(), 3);
    pool.check_invariants();
    // Conflict: the instance is held by another lease.
    let clash = Adopt { id: LeaseId(5), ..claims(&old, &leases[0]) };
    assert_eq!(
        pool.adopt(clash, T0),
        Err(PoolError::Conflict { lease: leases[0].id, instance: leases[0].instance_uuid.clone() })
    );
    // Same id, another instance.
    let moved = Adopt { instance_uuid: "GPU-00000-2".into(), ..claims(&old, &leases[0]) };
    assert!(matches!(pool.adopt(moved, T0), Err(PoolError::Conflict { .. })));
    // Expired.
    let stale = Adopt {
        id: LeaseId(6),
        instance_uuid: "MIG-00000-1-19-5".into(),
        memory: 10 * GIB,
        expires_ms: T0,
        ..claims(&old, &leases[0])
    };
    assert_eq!(pool.adopt(stale.clone(), T0), Err(PoolError::LeaseExpired(LeaseId(6))));
    // Unknown server or instance; wrong memory.
    let lost = Adopt { server_id: "srv-nope".into(), expires_ms: T0 + 9, ..stale.clone() };
    assert_eq!(pool.adopt(lost, T0), Err(PoolError::UnknownServer("srv-nope".into())));
    let nowhere = Adopt { instance_uuid: "MIG-nope".into(), expires_ms: T0 + 9, ..stale.clone() };
    assert!(matches!(pool.adopt(nowhere, T0), Err(PoolError::UnknownInstance { .. })));
    let shrunk = Adopt { memory: 1, expires_ms: T0 + 9, ..stale.clone() };
    assert!(matches!(pool.adopt(shrunk, T0), Err(PoolError::InvalidRequest(_))));
    // A lease ended in this pool's life is not taken back.
    pool.release(leases[1].id).unwrap();
    assert_eq!(pool.adopt(claims(&old, &leases[1]), T0 + 3), Err(PoolError::LeaseEnded(leases[1].id)));
    pool.check_invariants();
}

#[test]
fn adopted_leases_count_against_the_quota() {
    let mut config = config();
    config.default_quota.max_leases = Some(1);
    let mut pool = pool_with(config, fleet::synthetic(1, 2, 1));
    let claim = Adopt {
        id: LeaseId(77),
        tenant: "a".into(),
        server_id: fleet::server_id(0),
        instance_uuid: "GPU-00000-0".into(),
        memory: fleet::H100_MEMORY,
        class: LeaseClass::Exclusive,
        compute_percent: 0,
        issued_ms: T0,
        expires_ms: T0 + 30_000,
    };
    pool.adopt(claim.clone(), T0).unwrap();
    pool.adopt(Adopt { id: LeaseId(78), instance_uuid: "GPU-00000-1".into(), ..claim }, T0).unwrap();
    assert!(matches!(pool.allocate(req("a", 0), T0, true), Err(PoolError::QuotaExceeded { .. })));
    pool.check_invariants();
}

#[test]
fn heartbeat_marks_sessions_and_returns_unknown_leases() {
    let mut pool = pool_with(config(), fleet::synthetic(2, 1, 7));
    let (a, b) = (fleet::server_id(0), fleet::server_id(1));
    let on_a = granted(pool.allocate(req("a", 0), T0, false));
    let on_b = granted(pool.allocate(req("a", 0), T0, false));
    let on_a2 = granted(pool.allocate(req("a", 0), T0, false));
    let released = granted(pool.allocate(req("a", 0), T0, false));
    pool.release(released.id).unwrap();
    let load = Load {
        sessions: 3,
        memory_used: 7,
        live_leases: vec![on_a.id, LeaseId(42), on_b.id, released.id],
        gpu_busy: vec![],
        group_faults: 2,
    };
    let ended = pool.heartbeat(&a, load, T0 + 100).unwrap();
    assert_eq!(ended, [LeaseId(42), on_b.id, released.id]);
    let view = pool.status(T0 + 100);
    let reported = view.servers.iter().find(|s| s.id == a).map(|s| s.group_faults);
    assert_eq!(reported, Some(2), "the server's MPS group faults, as reported");
    assert!(pool.lease(on_a.id).unwrap().in_use);
    assert!(!pool.lease(on_a2.id).unwrap().in_use);
    assert!(!pool.lease(on_b.id).unwrap().in_use);
    let view = pool.status(T0 + 150);
    assert_eq!((view.servers[0].sessions, view.servers[0].memory_used, view.servers[0].heartbeat_age_ms), (3, 7, 50));
    assert_eq!(view.servers[1].heartbeat_age_ms, 150);
    // A later heartbeat without it clears in_use.
    pool.heartbeat(&a, Load::default(), T0 + 200).unwrap();
    assert!(!pool.lease(on_a.id).unwrap().in_use);
    assert_eq!(pool.heartbeat("nobody", Load::default(), T0), Err(PoolError::UnknownServer("nobody".into())));
    let _ = b;
    pool.check_invariants();
}

#[test]
fn status_shows_the_pool() {
    let mut pool = pool_with(config(), vec![assorted()]);
    let lease = granted(pool.allocate(profile("a", "3g.40gb"), T0, false));
    let view = pool.status(T0 + 1);
    assert_eq!(view.policy, Policy::Spread);
    assert!(!view.recovering);
    assert_eq!((view.instances, view.free_instances), (10, 9));
    assert_eq!(view.leases, std::slice::from_ref(&lease));
    let holders: Vec<(&str, Option<LeaseId>)> = view.servers[0]
        .gpus
        .iter()
        .flat_map(GpuView::instances)
        .filter(|(_, lease)| lease.is_some())
        .map(|(i, lease)| (i.uuid.as_str(), lease))
        .collect();
    assert_eq!(holders, [(lease.instance_uuid.as_str(), Some(lease.id))]);
    assert_eq!(view.servers[0].leases, 1);
    assert_eq!(view.counters.allocations, 1);
}

#[test]
fn lease_ids_are_unique_and_depend_on_the_seed() {
    let ids = |seed| {
        let mut pool = pool_with(PoolConfig { id_seed: seed, ..config() }, fleet::synthetic(10, 8, 7));
        (0..560).map(|_| granted(pool.allocate(req("a", 0), T0, false)).id).collect::<Vec<_>>()
    };
    let a = ids(1);
    let b = ids(2);
    let unique: HashSet<LeaseId> = a.iter().chain(&b).copied().collect();
    assert_eq!(unique.len(), 1_120);
}

#[test]
fn config_validation_lists_every_problem() {
    assert_eq!(PoolConfig::default().validate(), Ok(()));
    let mut bad = PoolConfig { lease_ttl_ms: 0, heartbeat_timeout_ms: 0, queue_capacity: 0, ..PoolConfig::default() };
    bad.tenant_quotas.insert(String::new(), Quota::default());
    let msg = bad.validate().unwrap_err();
    for what in ["lease_ttl_ms", "heartbeat_timeout_ms", "queue_capacity", "empty tenant"] {
        assert!(msg.contains(what), "{what}: {msg}");
    }
    assert_eq!(msg.lines().count(), 4);
    assert_eq!("binpack".parse::<Policy>(), Ok(Policy::Binpack));
    assert!("random".parse::<Policy>().is_err());
}

#[test]
fn synthetic_fleets_register() {
    let mut pool = pool_with(config(), fleet::mixed(18, 8));
    assert!(pool.instance_counts().0 > 18 * 8);
    pool.register(fleet::synthetic(1, 8, 7).remove(0), T0).unwrap();
    pool.check_invariants();
    for spec in fleet::synthetic(3, 2, 1).into_iter().chain(fleet::synthetic(3, 2, 0)) {
        assert!(validate_spec(&spec).is_empty(), "{spec:?}");
    }
}

/// Draining moves every lease of a server to free instances elsewhere,
/// keeps the old server's sessions alive until they report, places nothing
/// new on it, and a failed migration brings the lease back.
#[test]
fn draining_moves_leases_and_a_failed_migration_brings_one_back() {
    let two = |s| fleet::server(s, vec![fleet::whole_gpu(s, 0), fleet::whole_gpu(s, 1)]);
    let mut pool = pool_with(config(), vec![two(0)]);
    let a = granted(pool.allocate(req("t", GIB), T0, false));
    let b = granted(pool.allocate(req("t", GIB), T0, false));
    assert_eq!(pool.register(two(1), T0), Ok(vec![]));
    let src = fleet::server_id(0);
    let live = Load { sessions: 2, memory_used: 0, live_leases: vec![a.id, b.id], gpu_busy: vec![], group_faults: 0 };
    assert_eq!(pool.heartbeat(&src, live.clone(), T0), Ok(vec![]));

    let plan = pool.drain_server(&src, T0).expect("drain");
    assert_eq!(plan, DrainPlan { moving: vec![a.id, b.id], stuck: vec![] });
    pool.check_invariants();
    for id in [a.id, b.id] {
        assert_eq!(pool.lease(id).map(|l| l.server_id.clone()), Some(fleet::server_id(1)), "the lease follows");
    }
    let orders: Vec<LeaseId> = pool.take_orders(&src, T0).iter().map(|l| l.id).collect();
    assert_eq!(orders, vec![a.id, b.id]);
    assert!(pool.take_orders(&src, T0).is_empty(), "each order once");
    // The sessions are still on the source: not ended.
    assert_eq!(pool.heartbeat(&src, live, T0), Ok(vec![]));
    // Nothing new goes to the draining server, nothing is free elsewhere.
    assert_eq!(pool.allocate(req("t", GIB), T0, false), Err(PoolError::Exhausted));

    assert_eq!(pool.migrated(&src, a.id, Ok(())), None);
    // a's session may still be listed while it leaves: not ended.
    let leaving =
        Load { sessions: 2, memory_used: 0, live_leases: vec![a.id, b.id], gpu_busy: vec![], group_faults: 0 };
    assert_eq!(pool.heartbeat(&src, leaving, T0), Ok(vec![]));
    assert_eq!(pool.migrated(&src, b.id, Err("target refused".into())), Some(true));
    pool.check_invariants();
    assert_eq!(pool.lease(b.id).map(|l| l.server_id.clone()), Some(src.clone()), "b went back");
    assert_eq!(pool.lease(a.id).map(|l| l.server_id.clone()), Some(fleet::server_id(1)));
    let view = pool.status(T0);
    assert!(view.servers.iter().any(|s| s.id == src && s.draining && s.leases == 1));
    // Why b stayed, for the operator (`drain`, `status`); a moved on.
    let refused: Vec<(LeaseId, String)> = view.move_refused.into_iter().collect();
    assert_eq!(refused, vec![(b.id, "target refused".to_string())]);
    // b's session reports on the source again: its lease is there.
    let only_b = Load { sessions: 1, memory_used: 0, live_leases: vec![b.id], gpu_busy: vec![], group_faults: 0 };
    assert_eq!(pool.heartbeat(&src, only_b, T0), Ok(vec![]));
    // a is gone from the source now: listing it again is a stale session.
    let stale = Load { sessions: 2, memory_used: 0, live_leases: vec![a.id, b.id], gpu_busy: vec![], group_faults: 0 };
    assert_eq!(pool.heartbeat(&src, stale, T0), Ok(vec![a.id]));
    // Draining again retries b; a release on the old server frees nothing there.
    let again = pool.drain_server(&src, T0).expect("drain again");
    assert_eq!(again.moving, vec![b.id]);
    assert!(pool.status(T0).move_refused.is_empty(), "a new order forgets the last refusal");
    assert_eq!(pool.migrated(&src, b.id, Ok(())), None);
    pool.check_invariants();
    assert!(pool.release(a.id).is_ok());
    pool.check_invariants();
    assert_eq!(pool.drain_server("nobody", T0), Err(PoolError::UnknownServer("nobody".into())));
}

// ---- classes (issue 19) ----------------------------------------------------

fn shared(tenant: &str, memory_gib: u64, compute_percent: u32) -> Request {
    Request {
        tenant: tenant.into(),
        memory: memory_gib * GIB,
        compute_percent,
        class: LeaseClass::Shared,
        ..Request::default()
    }
}

/// One server with `gpus` whole GPUs (GPU-00000-0, -1, …).
fn whole_gpus(config: PoolConfig, gpus: u32) -> Pool {
    pool_with(config, vec![fleet::server(0, (0..gpus).map(|g| fleet::whole_gpu(0, g)).collect())])
}

/// Tenants "x" and "y" share fate across tenants; others do not.
fn opted_in() -> PoolConfig {
    let mut config = config();
    let open = Quota { share_fate_across_tenants: true, ..Quota::default() };
    config.tenant_quotas.insert("x".into(), open);
    config.tenant_quotas.insert("y".into(), open);
    config
}

#[test]
fn shared_leases_of_a_tenant_fill_one_gpu_up_to_100_percent() {
    let mut pool = whole_gpus(config(), 2);
    let a = granted(pool.allocate(shared("a", 10, 50), T0, false));
    assert_eq!((a.class, a.compute_percent, a.memory, a.sms), (LeaseClass::Shared, 50, 10 * GIB, 66));
    let b = granted(pool.allocate(shared("a", 10, 50), T0, false));
    assert_eq!(b.instance_uuid, a.instance_uuid, "joins the GPU already shared");
    let c = granted(pool.allocate(shared("a", 10, 1), T0, false));
    assert_ne!(c.instance_uuid, a.instance_uuid, "the first GPU has 100 % placed");
    let view = pool.status(T0);
    let gpus = &view.servers[0].gpus;
    assert_eq!((gpus[0].shared.clone(), gpus[0].shared_percent), (vec![a.id, b.id], 100));
    assert_eq!((gpus[1].shared.clone(), gpus[1].shared_percent), (vec![c.id], 1));
    assert_eq!(gpus[0].leases, [None], "no exclusive holder");
    assert_eq!(view.servers[0].leases, 3);
    assert_eq!(pool.instance_counts(), (2, 0));
    pool.check_invariants();
}

#[test]
fn shares_never_take_more_than_the_gpus_memory() {
    let mut pool = whole_gpus(config(), 2);
    let a = granted(pool.allocate(shared("a", 50, 10), T0, false));
    let b = granted(pool.allocate(shared("a", 40, 10), T0, false));
    assert_ne!(a.instance_uuid, b.instance_uuid, "50 + 40 GiB is more than an 80 GiB GPU");
    let c = granted(pool.allocate(shared("a", 30, 10), T0, false));
    assert_eq!(c.instance_uuid, a.instance_uuid);
    assert_eq!(pool.allocate(shared("a", 41, 10), T0, false), Err(PoolError::Exhausted));
    pool.check_invariants();
}

#[test]
fn shares_overcommit_memory_only_on_servers_that_swap() {
    let mut config = config();
    config.memory_overcommit_percent = 200;
    // A server that does not swap: no overcommit.
    let mut pool = whole_gpus(config.clone(), 1);
    granted(pool.allocate(shared("a", 50, 10), T0, false));
    assert_eq!(pool.allocate(shared("a", 40, 10), T0, false), Err(PoolError::Exhausted));
    pool.check_invariants();

    // One that swaps into 60 GiB of host memory: 200 % of 80 GiB would be
    // 160 GiB of shares, its swap space bounds them at 140.
    let mut spec = fleet::server(0, vec![fleet::whole_gpu(0, 0)]);
    spec.swap_bytes = 60 * GIB;
    let mut pool = pool_with(config, vec![spec]);
    let a = granted(pool.allocate(shared("a", 50, 10), T0, false));
    let b = granted(pool.allocate(shared("a", 40, 10), T0, false));
    let c = granted(pool.allocate(shared("a", 50, 10), T0, false));
    assert!(a.instance_uuid == b.instance_uuid && b.instance_uuid == c.instance_uuid, "one GPU, 140 GiB of shares");
    assert_eq!(pool.allocate(shared("a", 1, 10), T0, false), Err(PoolError::Exhausted), "past the swap space");
    pool.check_invariants();
    pool.release(b.id).expect("release");
    // No one share is more than the GPU holds, overcommitted or not.
    assert!(pool.allocate(shared("a", 81, 10), T0, false).is_err(), "a share larger than the GPU");
    granted(pool.allocate(shared("a", 40, 10), T0, false));
    pool.check_invariants();
}

#[test]
fn overcommit_settings_are_checked() {
    let mut config = config();
    for (percent, ok) in [(99, false), (100, true), (250, true), (1_000, true), (1_001, false)] {
        config.memory_overcommit_percent = percent;
        assert_eq!(config.validate().is_ok(), ok, "{percent} %");
    }
}

#[test]
fn an_exclusive_lease_never_shares_its_gpu() {
    let mut pool = whole_gpus(config(), 1);
    let s = granted(pool.allocate(shared("a", 1, 10), T0, false));
    assert_eq!(pool.allocate(req("a", 0), T0, false), Err(PoolError::Exhausted), "the GPU holds a share");
    pool.release(s.id).unwrap();
    let e = granted(pool.allocate(req("a", 0), T0, false));
    assert_eq!((e.class, e.compute_percent, e.memory), (LeaseClass::Exclusive, 0, fleet::H100_MEMORY));
    assert_eq!(pool.allocate(shared("a", 1, 10), T0, false), Err(PoolError::Exhausted), "the GPU is held alone");
    pool.check_invariants();
}

#[test]
fn shared_leases_go_on_whole_gpus_only() {
    let mut pool = pool_with(config(), vec![fleet::server(0, vec![fleet::mig_gpu(0, 0, fleet::LAYOUTS[0])])]);
    match pool.allocate(shared("a", 1, 10), T0, true) {
        Err(PoolError::Unsatisfiable { reason }) => assert!(reason.contains("whole GPU"), "{reason}"),
        other => panic!("expected unsatisfiable, got {other:?}"),
    }
    let mut pool = pool_with(config(), vec![assorted()]);
    let s = granted(pool.allocate(shared("a", 1, 10), T0, false));
    assert_eq!((s.instance_uuid.as_str(), s.profile.as_ref()), ("GPU-00000-2", None));
    pool.check_invariants();
}

#[test]
fn a_shared_request_names_its_memory_and_compute_and_no_profile() {
    let mut pool = whole_gpus(config(), 1);
    for (request, problem) in [
        (shared("a", 0, 10), "memory"),
        (shared("a", 1, 0), "compute_percent"),
        (Request { profile: Some("1g.10gb".into()), ..shared("a", 1, 10) }, "MIG profile"),
        (shared("a", 1, 101), "more than 100"),
    ] {
        match pool.allocate(request, T0, false) {
            Err(PoolError::InvalidRequest(why)) => assert!(why.contains(problem), "{why}"),
            other => panic!("expected an invalid request ({problem}), got {other:?}"),
        }
    }
}

#[test]
fn tenants_share_a_gpu_only_with_their_own_or_when_both_opted_in() {
    let mut pool = whole_gpus(opted_in(), 3);
    let x = granted(pool.allocate(shared("x", 1, 10), T0, false));
    let y = granted(pool.allocate(shared("y", 1, 10), T0, false));
    assert_eq!(y.instance_uuid, x.instance_uuid, "x and y both opted in");
    let z = granted(pool.allocate(shared("z", 1, 10), T0, false));
    assert_ne!(z.instance_uuid, x.instance_uuid, "z did not opt in");
    let z2 = granted(pool.allocate(shared("z", 1, 10), T0, false));
    assert_eq!(z2.instance_uuid, z.instance_uuid, "z shares with itself");
    let x2 = granted(pool.allocate(shared("x", 1, 10), T0, false));
    assert_eq!(x2.instance_uuid, x.instance_uuid, "x does not join z");
    let w = granted(pool.allocate(shared("w", 1, 10), T0, false));
    assert!(![&x.instance_uuid, &z.instance_uuid].contains(&&w.instance_uuid), "w joins nobody");
    assert_eq!(pool.allocate(shared("v", 1, 10), T0, false), Err(PoolError::Exhausted), "every GPU has a group");
    pool.check_invariants();
}

#[test]
fn a_shared_lease_joins_the_least_busy_gpu_then_the_least_placed() {
    let mut pool = whole_gpus(config(), 2);
    let g0 = granted(pool.allocate(shared("a", 1, 30), T0, false)).instance_uuid;
    let g1 = granted(pool.allocate(shared("a", 1, 80), T0, false)).instance_uuid;
    assert_ne!(g0, g1);
    // Equally busy: the one with less placed.
    assert_eq!(granted(pool.allocate(shared("a", 1, 10), T0, false)).instance_uuid, g0);
    let busy = Load { gpu_busy: vec![(g0.clone(), 900), (g1.clone(), 100)], ..Load::default() };
    pool.heartbeat(&fleet::server_id(0), busy, T0).unwrap();
    assert_eq!(granted(pool.allocate(shared("a", 1, 10), T0, false)).instance_uuid, g1, "less busy");
    // 90 % is placed on the less busy one now: 15 % fits only on the other.
    assert_eq!(granted(pool.allocate(shared("a", 1, 15), T0, false)).instance_uuid, g0);
    let view = pool.status(T0);
    let busy: Vec<u32> = view.servers[0].gpus.iter().map(|g| g.busy_permille).collect();
    assert_eq!(busy, [900, 100]);
    pool.check_invariants();
}

#[test]
fn a_busy_report_is_capped_and_only_for_the_servers_gpus() {
    let mut pool = whole_gpus(config(), 1);
    let load = Load { gpu_busy: vec![("GPU-00000-0".into(), 5_000), ("GPU-elsewhere".into(), 10)], ..Load::default() };
    pool.heartbeat(&fleet::server_id(0), load, T0).unwrap();
    assert_eq!(pool.status(T0).servers[0].gpus[0].busy_permille, 1_000);
}

#[test]
fn releasing_shares_frees_them_and_the_last_frees_the_gpu() {
    let mut pool = whole_gpus(config(), 1);
    let a = granted(pool.allocate(shared("a", 10, 60), T0, false));
    let waiting = queued(pool.allocate(shared("a", 10, 60), T0, true));
    let b = granted(pool.allocate(shared("a", 10, 40), T0, false));
    let grants = pool.release(a.id).unwrap();
    assert_eq!(grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), [waiting], "60 % freed");
    let c = &grants[0].lease;
    assert_eq!(c.instance_uuid, b.instance_uuid);
    assert_eq!(pool.instance_counts(), (1, 0));
    pool.release(b.id).unwrap();
    assert_eq!(pool.instance_counts(), (1, 0), "one share is left");
    pool.release(c.id).unwrap();
    assert_eq!(pool.instance_counts(), (1, 1), "the last share frees the GPU");
    let view = pool.status(T0);
    assert_eq!((view.servers[0].leases, view.servers[0].gpus[0].shared_percent), (0, 0));
    granted(pool.allocate(req("b", 0), T0, false));
    pool.check_invariants();
}

#[test]
fn expired_and_lost_shares_free_their_part() {
    let mut pool = whole_gpus(config(), 1);
    let a = granted(pool.allocate(shared("a", 10, 50), T0, false));
    let b = granted(pool.allocate(shared("a", 10, 50), T0, false));
    for t in [9_000, 18_000, 27_000] {
        pool.heartbeat(&fleet::server_id(0), Load::default(), T0 + t).unwrap();
    }
    pool.renew(b.id, T0 + 20_000).unwrap();
    assert_eq!(pool.tick(T0 + 30_000).expired, [a.id]);
    assert_eq!(granted(pool.allocate(shared("a", 10, 50), T0 + 30_000, false)).instance_uuid, b.instance_uuid);
    pool.check_invariants();
    // The server goes silent: every share is lost, the GPU leaves.
    let tick = pool.tick(T0 + 27_000 + 10_001);
    assert_eq!(tick.lost.len(), 2);
    assert_eq!((pool.lease_count(), pool.instance_counts()), (0, (0, 0)));
    pool.check_invariants();
}

#[test]
fn shared_quota_counts_the_memory_asked() {
    let mut config = config();
    config.default_quota = Quota { max_memory: Some(15 * GIB), ..Quota::default() };
    let mut pool = whole_gpus(config, 1);
    granted(pool.allocate(shared("a", 10, 10), T0, false));
    assert!(matches!(pool.allocate(shared("a", 10, 10), T0, false), Err(PoolError::QuotaExceeded { .. })));
    granted(pool.allocate(shared("a", 5, 10), T0, false));
    pool.check_invariants();
}

#[test]
fn shared_leases_come_back_after_a_restart_and_keep_their_groups() {
    let mut old = whole_gpus(opted_in(), 1);
    let leases =
        [granted(old.allocate(shared("x", 10, 40), T0, false)), granted(old.allocate(shared("y", 10, 40), T0, false))];
    let mut new = Pool::new(PoolConfig { recovery_ms: 5_000, id_seed: 9, ..opted_in() }, T0);
    new.register(fleet::server(0, vec![fleet::whole_gpu(0, 0)]), T0).unwrap();
    for l in &leases {
        assert_eq!(new.adopt(claims(&old, l), T0).unwrap(), Lease { in_use: false, ..l.clone() });
    }
    new.check_invariants();
    // A stranger's shared lease on the same GPU does not come back.
    let stranger = Adopt { id: LeaseId(99), tenant: "z".into(), ..claims(&old, &leases[0]) };
    assert!(matches!(new.adopt(stranger, T0), Err(PoolError::Conflict { .. })));
    // Nor one past the GPU's 100 %.
    let greedy = Adopt { id: LeaseId(98), compute_percent: 30, ..claims(&old, &leases[0]) };
    assert!(matches!(new.adopt(greedy, T0), Err(PoolError::Conflict { .. })));
    // Nor an exclusive one.
    let alone = Adopt {
        id: LeaseId(97),
        class: LeaseClass::Exclusive,
        compute_percent: 0,
        memory: fleet::H100_MEMORY,
        ..claims(&old, &leases[0])
    };
    assert!(matches!(new.adopt(alone, T0), Err(PoolError::Conflict { .. })));
    new.check_invariants();
}

#[test]
fn a_reregistration_keeps_shares_on_an_unchanged_gpu() {
    let mut pool = whole_gpus(config(), 2);
    let a = granted(pool.allocate(shared("a", 10, 40), T0, false));
    let b = granted(pool.allocate(shared("a", 10, 40), T0, false));
    pool.register(fleet::server(0, (0..2).map(|g| fleet::whole_gpu(0, g)).collect()), T0 + 1).unwrap();
    assert_eq!((pool.lease(a.id).is_some(), pool.lease(b.id).is_some()), (true, true));
    assert_eq!(pool.status(T0 + 1).servers[0].gpus[0].shared_percent, 80);
    pool.check_invariants();
}

#[test]
fn draining_moves_shared_leases_only_next_to_leases_they_may_share_fate_with() {
    let servers = (0..3).map(|s| fleet::server(s, vec![fleet::whole_gpu(s, 0)])).collect();
    let mut pool = pool_with(config(), servers);
    let a1 = granted(pool.allocate(shared("a", 10, 40), T0, false));
    let a2 = granted(pool.allocate(shared("a", 10, 30), T0, false));
    assert_eq!(a1.instance_uuid, a2.instance_uuid, "one tenant's shares join one GPU");
    let b = granted(pool.allocate(shared("b", 10, 10), T0, false));
    assert_ne!(b.server_id, a1.server_id, "tenants that did not opt in do not share a GPU");
    let plan = pool.drain_server(&a1.server_id, T0 + 1).unwrap();
    let mut moving = plan.moving.clone();
    moving.sort();
    let mut want = vec![a1.id, a2.id];
    want.sort();
    assert_eq!((moving, plan.stuck.clone()), (want, vec![]), "{plan:?}");
    let (m1, m2) = (pool.lease(a1.id).unwrap().clone(), pool.lease(a2.id).unwrap().clone());
    assert_eq!(m1.instance_uuid, m2.instance_uuid, "the group moves to one GPU");
    assert_ne!(m1.server_id, a1.server_id);
    assert_ne!(m1.server_id, b.server_id, "not next to another tenant's share");
    assert_eq!((m1.memory, m1.compute_percent, m1.class), (a1.memory, 40, LeaseClass::Shared));
    // Nothing new joins a draining server's GPU.
    let t = granted(pool.allocate(shared("a", 10, 10), T0 + 2, false));
    assert_ne!(t.server_id, a1.server_id);
    pool.check_invariants();
    // One migration fails: its lease goes back to its (draining) GPU.
    let orders: Vec<LeaseId> = pool.take_orders(&a1.server_id, T0 + 3).iter().map(|l| l.id).collect();
    assert_eq!(orders.len(), 2);
    assert_eq!(pool.migrated(&a1.server_id, a2.id, Err("refused".into())), Some(true));
    assert_eq!(pool.lease(a2.id).unwrap().instance_uuid, a2.instance_uuid);
    assert_eq!(pool.migrated(&a1.server_id, a1.id, Ok(())), None);
    pool.check_invariants();
}

#[test]
fn a_shared_lease_with_nowhere_to_go_stays() {
    let servers = (0..2).map(|s| fleet::server(s, vec![fleet::whole_gpu(s, 0)])).collect();
    let mut pool = pool_with(config(), servers);
    let a = granted(pool.allocate(shared("a", 10, 60), T0, false));
    let b = granted(pool.allocate(shared("b", 10, 60), T0, false));
    let plan = pool.drain_server(&a.server_id, T0 + 1).unwrap();
    assert_eq!((plan.moving, plan.stuck), (vec![], vec![a.id]), "60 % + 60 % do not fit, nor may they share fate");
    assert_eq!(pool.lease(b.id).unwrap().server_id, b.server_id);
    pool.check_invariants();
}

/// Every tenant may share a GPU with every other (the fleet simulator's setting).
fn everyone_shares() -> PoolConfig {
    PoolConfig { default_quota: Quota { share_fate_across_tenants: true, ..Quota::default() }, ..config() }
}

#[test]
fn a_shared_lease_joins_the_gpu_with_least_placed_that_has_room() {
    let mut pool = whole_gpus(everyone_shares(), 3);
    let a = granted(pool.allocate(shared("a", 70, 10), T0, false));
    let b = granted(pool.allocate(shared("b", 20, 30), T0, false));
    assert_ne!(a.instance_uuid, b.instance_uuid, "70 + 20 GiB do not fit one GPU");
    // The GPU with least placed (a's, 10 %) lacks the memory: the next in order takes it.
    let c = granted(pool.allocate(shared("c", 20, 5), T0, false));
    assert_eq!(c.instance_uuid, b.instance_uuid);
    let d = granted(pool.allocate(shared("d", 5, 5), T0, false));
    assert_eq!(d.instance_uuid, a.instance_uuid, "least placed first when it has room");
    pool.release(b.id).unwrap();
    pool.release(c.id).unwrap();
    pool.check_invariants();
    // b's GPU is free again: a share joins a's rather than taking it.
    let e = granted(pool.allocate(shared("e", 1, 1), T0, false));
    assert_eq!(e.instance_uuid, a.instance_uuid);
    pool.check_invariants();
}

#[test]
fn queued_shares_that_ask_more_than_a_failed_one_wait_and_smaller_ones_are_served() {
    let mut pool = whole_gpus(everyone_shares(), 1);
    let big = granted(pool.allocate(shared("a", 60, 60), T0, false));
    let small = granted(pool.allocate(shared("a", 10, 10), T0, false));
    let Ok(Allocation::Queued(t1)) = pool.allocate(shared("b", 30, 20), T0, true) else { panic!("queued") };
    let Ok(Allocation::Queued(t2)) = pool.allocate(shared("c", 40, 30), T0, true) else { panic!("queued") };
    let Ok(Allocation::Queued(t3)) = pool.allocate(shared("d", 15, 10), T0, true) else { panic!("queued") };
    // 20 GiB and 30 % free: b fails, c asks more than b (skipped), d fits.
    let grants = pool.release(small.id).unwrap();
    assert_eq!(grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), vec![t3]);
    pool.check_invariants();
    // 65 GiB and 90 % free: b fits; then c (40 GiB) no longer does and waits.
    let grants = pool.release(big.id).unwrap();
    assert_eq!(grants.iter().map(|g| g.ticket).collect::<Vec<_>>(), vec![t1]);
    assert_eq!(pool.status(T0).queue.iter().map(|q| q.ticket).collect::<Vec<_>>(), vec![t2]);
    pool.check_invariants();
}

/// Places `names` (H100 profile names) on a GPU the way a server would:
/// each at the first start it may take that nothing occupies.
fn placed(names: &[String]) -> Vec<(u32, u32)> {
    let mut used = 0u32;
    let mut layout = Vec::new();
    for name in names {
        let p = fleet::H100.profiles.iter().find(|p| p.name == name).expect("an H100 profile");
        let start = p.starts.iter().copied().find(|&s| used & (((1 << p.slices) - 1) << s) == 0).expect("room");
        used |= ((1 << p.slices) - 1) << start;
        layout.push((p.id, start));
    }
    layout
}

#[test]
fn dynamic_layouts_lay_out_an_idle_gpu_for_what_waits_and_lose_no_lease() {
    let spec = |second: &[(u32, u32)]| {
        fleet::server(0, vec![fleet::mig_gpu(0, 0, fleet::LAYOUTS[0]), fleet::mig_gpu(0, 1, second)])
    };
    let dynamic = PoolConfig { dynamic_layouts: true, ..config() };
    // Static layouts: no 3g.40gb anywhere is a request that cannot be met.
    let mut pool = pool_with(config(), vec![spec(fleet::LAYOUTS[0])]);
    let refused = pool.allocate(profile("b", "3g.40gb"), T0 + 1, true);
    assert!(matches!(refused, Err(PoolError::Unsatisfiable { .. })), "{refused:?}");
    let mut pool = pool_with(dynamic, vec![spec(fleet::LAYOUTS[0])]);
    // Nothing waits: nothing to change.
    assert!(pool.plan_layouts(8, T0 + 1).is_empty());
    let small = granted(pool.allocate(profile("a", "1g.10gb"), T0 + 2, false));
    let ticket = queued(pool.allocate(profile("b", "3g.40gb"), T0 + 3, true));
    let orders = pool.plan_layouts(8, T0 + 4);
    assert_eq!(orders.len(), 1, "{orders:?}");
    let order = &orders[0];
    let idle = small.instance_uuid.clone();
    assert!(!idle.is_empty());
    assert!(order.profiles.iter().any(|p| p == "3g.40gb"), "{order:?}");
    assert_eq!(order.server_id, fleet::server_id(0));
    // The GPU chosen is the idle one (the other holds a lease), and its
    // instances left placement at once.
    assert_eq!(pool.instance_counts().0, 7, "only the first GPU's instances stay");
    assert!(pool.plan_layouts(8, T0 + 5).is_empty(), "a GPU out for re-layout is not planned again");
    assert_eq!(pool.take_relayouts(&fleet::server_id(0)), orders);
    assert!(pool.take_relayouts(&fleet::server_id(0)).is_empty(), "an order is delivered once");
    assert_eq!(pool.relayouts_pending(), 1);
    // The server laid it out and registers again: the waiter is served
    // from the new instance, the other lease stays.
    let grants = pool.register(spec(&placed(&order.profiles)), T0 + 6).expect("registers");
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!((grants[0].ticket, profile_name(&grants[0].lease)), (ticket, Some("3g.40gb")));
    assert!(pool.lease(small.id).is_some(), "the lease on the other GPU stays");
    assert_eq!(pool.relayouts_pending(), 0);
    assert_eq!(pool.counters().relayouts, 1);
    assert_eq!(pool.counters().lost, 0);
    pool.check_invariants();
}

#[test]
fn a_gpu_with_a_lease_is_never_laid_out_anew() {
    let mut pool = pool_with(
        PoolConfig { dynamic_layouts: true, ..config() },
        vec![fleet::server(0, vec![fleet::mig_gpu(0, 0, fleet::LAYOUTS[0])])],
    );
    let held = granted(pool.allocate(profile("a", "1g.10gb"), T0 + 1, false));
    queued(pool.allocate(profile("b", "3g.40gb"), T0 + 2, true));
    assert!(pool.plan_layouts(8, T0 + 3).is_empty(), "its only GPU holds a lease");
    assert!(pool.lease(held.id).is_some());
    // Released: now it may be.
    pool.release(held.id).expect("release");
    assert_eq!(pool.plan_layouts(8, T0 + 4).len(), 1);
    pool.check_invariants();
}

/// Three servers with one whole GPU each; `busy` reported for each.
fn three_shared_servers(busy: [u32; 3]) -> (Pool, Vec<String>) {
    let servers = (0..3).map(|s| fleet::server(s, vec![fleet::whole_gpu(s, 0)])).collect();
    // Silent for a cooldown without being drained or the leases expiring.
    let quiet = PoolConfig { heartbeat_timeout_ms: 10 * COOLDOWN_MS, lease_ttl_ms: 10 * COOLDOWN_MS, ..config() };
    let mut pool = pool_with(quiet, servers);
    let gpus: Vec<String> = (0..3).map(|s| pool.status(T0).servers[s].gpus[0].spec.uuid.clone()).collect();
    for (s, (gpu, b)) in gpus.iter().zip(busy).enumerate() {
        let load = Load { gpu_busy: vec![(gpu.clone(), b)], ..Load::default() };
        pool.heartbeat(&fleet::server_id(s), load, T0).unwrap();
    }
    (pool, gpus)
}

#[test]
fn rebalancing_moves_the_largest_share_off_a_busy_gpu_to_an_idle_one() {
    let (mut pool, gpus) = three_shared_servers([0, 0, 0]);
    // Tenant a's shares all land on one GPU (they join the first).
    let small = granted(pool.allocate(shared("a", 4, 20), T0, false));
    let large = granted(pool.allocate(shared("a", 4, 50), T0, false));
    assert_eq!(small.instance_uuid, large.instance_uuid);
    let hot = gpus.iter().position(|g| *g == small.instance_uuid).unwrap();
    // Another tenant's share on a second GPU: a's may not join it.
    let other = granted(pool.allocate(shared("b", 4, 10), T0, false));
    assert_ne!(other.instance_uuid, small.instance_uuid);
    // Nothing busy: nothing moves.
    assert!(pool.rebalance(4, T0 + 1).is_empty());
    let busy: Vec<u32> = (0..3).map(|i| if i == hot { 950 } else { 100 }).collect();
    for (s, gpu) in gpus.iter().enumerate() {
        let load = Load { gpu_busy: vec![(gpu.clone(), busy[s])], live_leases: vec![], ..Load::default() };
        pool.heartbeat(&fleet::server_id(s), load, T0 + 2).unwrap();
    }
    let moved = pool.rebalance(4, T0 + 3);
    assert_eq!(moved, vec![large.id], "the largest share moves");
    let now = pool.lease(large.id).unwrap().clone();
    assert_ne!(now.instance_uuid, small.instance_uuid);
    assert_ne!(now.instance_uuid, other.instance_uuid, "not next to a tenant it may not share fate with");
    assert_eq!((now.memory, now.compute_percent), (large.memory, 50), "it keeps its part");
    assert_eq!(pool.counters().rebalanced, 1);
    // Its session is ordered to migrate from the busy GPU's server.
    let orders = pool.take_orders(&small.server_id, T0 + 4);
    assert_eq!(orders.iter().map(|l| l.id).collect::<Vec<_>>(), vec![large.id]);
    // One share left there: nothing more to move; the GPUs sit out anyway.
    assert!(pool.rebalance(4, T0 + 5).is_empty());
    pool.check_invariants();
}

#[test]
fn a_gpu_sits_out_after_a_move_and_never_gives_to_a_busy_one() {
    let (mut pool, gpus) = three_shared_servers([0, 0, 0]);
    let ids: Vec<LeaseId> = (0..4).map(|_| granted(pool.allocate(shared("a", 2, 20), T0, false)).id).collect();
    let hot = gpus.iter().position(|g| *g == pool.lease(ids[0]).unwrap().instance_uuid).unwrap();
    let report = |pool: &mut Pool, busy: [u32; 3], at: u64| {
        for (s, gpu) in gpus.iter().enumerate() {
            pool.heartbeat(
                &fleet::server_id(s),
                Load { gpu_busy: vec![(gpu.clone(), busy[s])], ..Load::default() },
                at,
            )
            .unwrap();
        }
    };
    // Every GPU busy: nowhere to go.
    report(&mut pool, [900, 900, 900], T0 + 1);
    assert!(pool.rebalance(4, T0 + 2).is_empty(), "no idle GPU");
    let mut busy = [100, 100, 100];
    busy[hot] = 900;
    report(&mut pool, busy, T0 + 3);
    assert_eq!(pool.rebalance(4, T0 + 4).len(), 1);
    report(&mut pool, busy, T0 + 5);
    assert!(pool.rebalance(4, T0 + 6).is_empty(), "the GPU sits out after a move");
    report(&mut pool, busy, T0 + 6 + COOLDOWN_MS);
    assert_eq!(pool.rebalance(4, T0 + 7 + COOLDOWN_MS).len(), 1, "after the cooldown, another share moves");
    pool.check_invariants();
}
