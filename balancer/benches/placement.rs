//! Placement benchmark of the balancer's pool (no gRPC): registering a fleet
//! of 1 000 servers × 8 GPUs × 7 MIG instances, allocate+release pairs on a
//! half-leased pool for both policies, and single allocations on an empty and
//! a nearly full pool. Run with
//! `cargo bench -p gpupool-balancer --bench placement`.

use gpupool_balancer::pool::fleet::{self, GIB};
use gpupool_balancer::pool::{
    Allocation, LeaseClass, LeaseId, Policy, Pool, PoolConfig, PoolError, Request, ServerSpec,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const SERVERS: usize = 1_000;
const GPUS: u32 = 8;
const INSTANCES: u32 = 7;
const PAIRS: usize = 200_000;
const SINGLES: usize = 20_000;
const NOW: u64 = 1_700_000_000_000;

/// xorshift64*: deterministic and cheap.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn config(policy: Policy) -> PoolConfig {
    PoolConfig {
        policy,
        lease_ttl_ms: 3_600_000,
        heartbeat_timeout_ms: 3_600_000,
        id_seed: 42,
        ..PoolConfig::default()
    }
}

fn register(specs: &[ServerSpec], policy: Policy) -> (Pool, Duration) {
    let mut pool = Pool::new(config(policy), NOW);
    let start = Instant::now();
    for spec in specs {
        pool.register(spec.clone(), NOW).expect("a valid fleet");
    }
    (pool, start.elapsed())
}

fn any() -> Request {
    Request { tenant: "bench".into(), ..Request::default() }
}

/// Requests for the mixed fleet: sizes, compute shares and profiles.
fn mixed_requests() -> Vec<Request> {
    let r = |memory, compute_percent, profile: Option<&str>| Request {
        tenant: "bench".into(),
        memory,
        compute_percent,
        profile: profile.map(str::to_owned),
        class: LeaseClass::Exclusive,
    };
    vec![
        r(0, 0, None),
        r(5 * GIB, 0, None),
        r(15 * GIB, 0, None),
        r(0, 20, None),
        r(30 * GIB, 0, None),
        r(0, 0, Some("3g.40gb")),
        r(0, 0, Some("19")),
        r(0, 46, None),
        r(60 * GIB, 0, None),
    ]
}

#[derive(Default)]
struct Stats {
    samples: Vec<u64>,
}

impl Stats {
    fn push(&mut self, d: Duration) {
        self.samples.push(d.as_nanos() as u64);
    }

    /// Samples over 1 ms.
    fn slow(&self) -> usize {
        self.samples.iter().filter(|&&ns| ns > 1_000_000).count()
    }

    /// p50, p99 and max in microseconds, and the count over 1 ms.
    fn summary(&mut self) -> (f64, f64, f64, usize) {
        let slow = self.slow();
        self.samples.sort_unstable();
        let at = |q: f64| {
            let i = ((self.samples.len() as f64 - 1.0) * q).round() as usize;
            self.samples[i] as f64 / 1_000.0
        };
        (at(0.50), at(0.99), at(1.0), slow)
    }
}

struct Warm {
    pairs_per_s: f64,
    alloc: (f64, f64, f64, usize),
    pair: (f64, f64, f64, usize),
    exhausted: usize,
    leased: usize,
    total: usize,
}

/// Leases about half of the pool, then runs allocate + release-a-random-lease
/// pairs, keeping the pool about half full.
fn warm(pool: &mut Pool, requests: &[Request], rng: &mut Rng) -> Warm {
    let (total, _) = pool.instance_counts();
    let mut live: Vec<LeaseId> = Vec::with_capacity(total);
    let mut misses = 0;
    while live.len() < total / 2 && misses < total {
        match pool.allocate(requests[rng.below(requests.len())].clone(), NOW, false) {
            Ok(Allocation::Granted(l)) => live.push(l.id),
            _ => misses += 1,
        }
    }
    let leased = live.len();
    let (mut alloc, mut pair) = (Stats::default(), Stats::default());
    let mut exhausted = 0;
    let start = Instant::now();
    for _ in 0..PAIRS {
        let req = requests[rng.below(requests.len())].clone();
        let t0 = Instant::now();
        let result = pool.allocate(req, NOW, false);
        let t1 = Instant::now();
        match result {
            Ok(Allocation::Granted(l)) => live.push(l.id),
            Err(PoolError::Exhausted) => exhausted += 1,
            other => panic!("{other:?}"),
        }
        let id = live.swap_remove(rng.below(live.len()));
        let t2 = Instant::now();
        black_box(pool.release(id).expect("a held lease"));
        let t3 = Instant::now();
        alloc.push(t1 - t0);
        pair.push((t1 - t0) + (t3 - t2));
    }
    let elapsed = start.elapsed();
    Warm {
        pairs_per_s: PAIRS as f64 / elapsed.as_secs_f64(),
        alloc: alloc.summary(),
        pair: pair.summary(),
        exhausted,
        leased,
        total,
    }
}

/// Allocate then release the same lease, `SINGLES` times; allocate latency.
fn singles(pool: &mut Pool, req: &Request) -> (f64, f64, f64, usize) {
    let mut stats = Stats::default();
    for _ in 0..SINGLES {
        let t0 = Instant::now();
        let result = pool.allocate(req.clone(), NOW, false);
        stats.push(t0.elapsed());
        match result {
            Ok(Allocation::Granted(l)) => {
                pool.release(l.id).expect("a held lease");
            }
            other => panic!("{other:?}"),
        }
    }
    stats.summary()
}

fn main() {
    let uniform = fleet::synthetic(SERVERS, GPUS, INSTANCES);
    let mixed = fleet::mixed(SERVERS, GPUS);
    let count = |specs: &[ServerSpec]| specs.iter().flat_map(|s| &s.gpus).map(|g| g.instances.len()).sum::<usize>();
    println!("gpupool balancer: pool placement benchmark (one core, no I/O)");
    println!(
        "fleets: uniform {SERVERS} servers x {GPUS} GPUs x {INSTANCES} x 1g.10gb = {} instances; \
         mixed {SERVERS} x {GPUS} H100s cycling 8 MIG layouts and whole GPUs = {} instances",
        count(&uniform),
        count(&mixed)
    );
    println!();

    println!("(a) registering the fleet");
    for (name, specs) in [("uniform", &uniform), ("mixed", &mixed)] {
        let (_, took) = register(specs, Policy::Spread);
        println!(
            "    {name:<8} {:>8.1} ms in all, {:>6.1} us per server",
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e6 / SERVERS as f64
        );
    }
    println!();

    println!("(b) {PAIRS} allocate+release pairs, pool about half leased (times in us)");
    println!(
        "    {:<8} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>15} {:>5}",
        "policy",
        "fleet",
        "pairs/s",
        "alloc p50",
        "alloc p99",
        "alloc max",
        "pair p50",
        "pair p99",
        "pair max",
        "exhausted",
        "leased/total",
        ">1ms"
    );
    let uniform_requests = vec![any()];
    let mixed_requests = mixed_requests();
    for policy in [Policy::Spread, Policy::Binpack] {
        for (name, specs, requests) in [("uniform", &uniform, &uniform_requests), ("mixed", &mixed, &mixed_requests)] {
            let (mut pool, _) = register(specs, policy);
            let w = warm(&mut pool, requests, &mut Rng(0x9e37_79b9_7f4a_7c15));
            println!(
                "    {:<8} {:<8} {:>9.0} {:>9.2} {:>9.2} {:>9.1} {:>9.2} {:>9.2} {:>9.1} {:>9} {:>15} {:>5}",
                policy.as_str(),
                name,
                w.pairs_per_s,
                w.alloc.0,
                w.alloc.1,
                w.alloc.2,
                w.pair.0,
                w.pair.1,
                w.pair.2,
                w.exhausted,
                format!("{}/{}", w.leased, w.total),
                w.pair.3
            );
        }
    }
    println!();

    println!("(c) one allocate (then release), uniform fleet, {SINGLES} times (us)");
    println!("    {:<8} {:<12} {:>9} {:>9} {:>9} {:>5}", "policy", "pool", "p50", "p99", "max", ">1ms");
    for policy in [Policy::Spread, Policy::Binpack] {
        let (mut pool, _) = register(&uniform, policy);
        let empty = singles(&mut pool, &any());
        // Nearly full: lease everything, then free 10 instances at random.
        let mut live = Vec::new();
        let fill = Instant::now();
        while let Ok(Allocation::Granted(l)) = pool.allocate(any(), NOW, false) {
            live.push(l.id);
        }
        let fill = fill.elapsed();
        let mut rng = Rng(7);
        for _ in 0..10 {
            let id = live.swap_remove(rng.below(live.len()));
            pool.release(id).expect("a held lease");
        }
        let full = singles(&mut pool, &any());
        let exhausted = {
            let mut stats = Stats::default();
            for _ in 0..10 {
                pool.allocate(any(), NOW, false).ok();
            }
            for _ in 0..SINGLES {
                let t0 = Instant::now();
                let r = pool.allocate(any(), NOW, false);
                stats.push(t0.elapsed());
                assert_eq!(r, Err(PoolError::Exhausted));
            }
            stats.summary()
        };
        let tick = {
            let mut stats = Stats::default();
            for _ in 0..SINGLES {
                let t0 = Instant::now();
                black_box(pool.tick(NOW));
                stats.push(t0.elapsed());
            }
            stats.summary()
        };
        for (what, s) in [("empty", empty), ("10 free", full), ("full (exh.)", exhausted), ("tick (idle)", tick)] {
            println!("    {:<8} {:<12} {:>9.2} {:>9.2} {:>9.1} {:>5}", policy.as_str(), what, s.0, s.1, s.2, s.3);
        }
        println!(
            "    {:<8} filling all {} instances one by one: {:.1} ms ({:.2} us each)",
            policy.as_str(),
            live.len() + 10,
            fill.as_secs_f64() * 1e3,
            fill.as_secs_f64() * 1e6 / (live.len() + 10) as f64
        );
    }
}
