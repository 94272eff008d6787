//! A trace-driven simulator of a MIG fleet on the balancer's own placement
//! core (issue 25; docs/fleetsim.md).
//!
//! A fleet of servers × GPUs (real MIG profile tables,
//! [`crate::pool::fleet`]) serves a serverless trace ([`trace`]) under
//! several policies ([`sim::PolicySpec`]): static layouts, whole GPUs
//! (exclusive, or shared under MPS), and dynamic layouts planned from
//! demand ([`crate::pool::planner`]) with hotness-aware eviction. Each
//! policy runs on a virtual clock against a fresh [`crate::pool::Pool`]; the
//! same trace drives them all, so their results compare.

pub mod report;
mod rng;
pub mod sim;
pub mod trace;

use serde::{Deserialize, Serialize};

use crate::pool::PoolError;
pub use sim::{Eviction, FleetParams, Layouts, Outcome, PolicySpec, simulate};
pub use trace::{Function, Invocation, NeedClass, Trace, TraceParams};

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The parameters are invalid (every problem, `; `-separated).
    #[error("invalid parameters: {0}")]
    Params(String),
    /// A CSV trace line could not be read.
    #[error("trace line {line}: {reason}")]
    Csv {
        /// Its line number, from 1.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The pool refused what the simulator asked (a simulator bug, not a result).
    #[error("pool: {0}")]
    Pool(#[source] PoolError),
    /// The simulator's bookkeeping disagrees with the pool.
    #[error("simulator: {0}")]
    Internal(String),
}

/// Adds a problem for each `(name, value)` that is not finite or is
/// negative (with `strict`, not above 0).
fn check_values(problems: &mut Vec<String>, strict: bool, values: &[(&str, f64)]) {
    for &(name, v) in values {
        let ok = v.is_finite() && if strict { v > 0.0 } else { v >= 0.0 };
        if !ok {
            problems.push(format!("{name} is {v}, not a finite value {} 0", if strict { ">" } else { ">=" }));
        }
    }
}

/// Everything one run needs: the trace, the fleet and the policies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The synthetic trace (unless a CSV trace replaces it).
    pub trace: TraceParams,
    /// The fleet and its costs.
    pub fleet: FleetParams,
    /// The policies compared.
    pub policies: Vec<PolicySpec>,
}

impl Default for Config {
    fn default() -> Self {
        Self { trace: TraceParams::default(), fleet: FleetParams::default(), policies: default_policies() }
    }
}

impl Config {
    /// Reads a configuration from JSON; fields left out keep their defaults.
    pub fn from_json(text: &str) -> Result<Self, SimError> {
        let config: Config = serde_json::from_str(text).map_err(|e| SimError::Params(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Every problem with the configuration.
    pub fn validate(&self) -> Result<(), SimError> {
        let mut problems = Vec::new();
        for r in [self.trace.validate(), self.fleet.validate().map(|_| ())] {
            if let Err(SimError::Params(p)) = r {
                problems.push(p);
            }
        }
        if self.policies.is_empty() {
            problems.push("no policy to run".to_owned());
        }
        if problems.is_empty() { Ok(()) } else { Err(SimError::Params(problems.join("; "))) }
    }
}

/// The policies the issue compares, named for the results. Layouts are of
/// profile ids and start slices, common to the H100, H200 and A100 tables.
pub fn default_policies() -> Vec<PolicySpec> {
    let seven_1g: Vec<(u32, u32)> = (0..7).map(|s| (19, s)).collect();
    let mix = vec![(5, 0), (14, 4), (19, 6)];
    let p = |name: &str, layouts, eviction| PolicySpec { name: name.into(), layouts, eviction };
    vec![
        p("static 7x1g", Layouts::Static(seven_1g), Eviction::Lru),
        p("static 4g+2g+1g", Layouts::Static(mix.clone()), Eviction::Lru),
        p("whole GPU exclusive", Layouts::WholeExclusive, Eviction::Lru),
        p("whole GPU shared (MPS)", Layouts::WholeShared, Eviction::Lru),
        p("static 4g+2g+1g + hotness", Layouts::Static(mix.clone()), Eviction::Hotness),
        p("dynamic + LRU", Layouts::Dynamic(mix.clone()), Eviction::Lru),
        p("dynamic + hotness", Layouts::Dynamic(mix), Eviction::Hotness),
    ]
}

/// Runs every policy of `config` over `trace` on `threads` threads; results
/// in the policies' order.
pub fn run_all(config: &Config, trace: &Trace, threads: usize) -> Result<Vec<Outcome>, SimError> {
    parallel(config.policies.len(), threads, |i| simulate(trace, &config.fleet, &config.policies[i]))
        .into_iter()
        .collect()
}

/// `job(0) .. job(n - 1)` on `threads` threads (each job one policy's
/// simulation, which is single-threaded); results in job order.
pub fn parallel<T: Send>(n: usize, threads: usize, job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::with_capacity(n));
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let result = job(i);
                    done.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((i, result));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// The smallest number of servers (of `fleet.gpus_per_server` GPUs) with
/// which `policy` meets `target` SLO hit rate on `trace`, searched between
/// 1 and `fleet.servers`, with the outcome there; `None` when even
/// `fleet.servers` does not meet it (its outcome is returned then).
/// `below`: a fleet size expected to miss the target (0 if unknown), which
/// narrows the search when it does; it is checked, not trusted.
pub fn capacity(
    trace: &Trace,
    fleet: &FleetParams,
    policy: &PolicySpec,
    target: f64,
    below: usize,
) -> Result<(Option<usize>, Outcome), SimError> {
    let at = |servers: usize| simulate(trace, &FleetParams { servers, ..fleet.clone() }, policy);
    let top = at(fleet.servers)?;
    if top.slo_hit_rate() < target {
        return Ok((None, top));
    }
    let (mut lo, mut hi, mut best) = (0, fleet.servers, top);
    if below > 0 && below < hi {
        let o = at(below)?;
        if o.slo_hit_rate() >= target {
            (hi, best) = (below, o);
        } else {
            lo = below;
        }
    }
    // Invariant: `hi` servers meet the target, `lo` do not (0 trivially).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let o = at(mid)?;
        if o.slo_hit_rate() >= target {
            hi = mid;
            best = o;
        } else {
            lo = mid;
        }
    }
    Ok((Some(hi), best))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet and trace small enough for CI.
    fn small() -> (Config, Trace) {
        let config = Config {
            trace: TraceParams { hours: 1.0, functions: 400, seed: 9, ..TraceParams::default() },
            fleet: FleetParams { servers: 2, ..FleetParams::default() },
            ..Config::default()
        };
        let trace = Trace::generate(&config.trace);
        (config, trace)
    }

    #[test]
    fn the_committed_default_parses_and_matches_the_built_in_one() {
        let text = include_str!("../../fleetsim.json");
        assert_eq!(Config::from_json(text).unwrap(), Config::default());
    }

    #[test]
    fn every_policy_runs_and_accounts_for_every_invocation() {
        let (config, trace) = small();
        let outcomes = run_all(&config, &trace, 2).unwrap();
        assert_eq!(outcomes.len(), config.policies.len());
        for o in &outcomes {
            assert_eq!(o.invocations, trace.invocations.len() as u64, "{}", o.policy);
            // Each arrival is served, unservable or dropped; served ones may still run at the end.
            assert_eq!(o.served + o.unservable + o.dropped, o.invocations, "{}", o.policy);
            assert!(o.within_slo <= o.served);
            assert!((0.0..=1.0).contains(&o.sm_utilization), "{}: {}", o.policy, o.sm_utilization);
            assert!((0.0..=1.0).contains(&o.memory_utilization), "{}: {}", o.policy, o.memory_utilization);
            assert_eq!(o.cold_starts + o.lukewarm_starts > 0, o.served > 0);
        }
        let dynamic = outcomes.iter().find(|o| o.policy == "dynamic + hotness").unwrap();
        assert!(dynamic.reconfigurations > 0, "the planner re-laid out nothing");
        let seven = outcomes.iter().find(|o| o.policy == "static 7x1g").unwrap();
        assert!(seven.unservable > 0, "7x1g cannot hold the large functions");
    }

    #[test]
    fn a_run_is_deterministic() {
        let (config, trace) = small();
        let policy = &config.policies[6];
        let a = simulate(&trace, &config.fleet, policy).unwrap();
        let b = simulate(&trace, &config.fleet, policy).unwrap();
        let strip = |o: Outcome| Outcome { wall_s: 0.0, ..o };
        assert_eq!(strip(a), strip(b));
    }

    #[test]
    fn capacity_search_finds_the_smallest_fleet_meeting_the_target() {
        let (config, trace) = small();
        let policy = &config.policies[2];
        let fleet = FleetParams { servers: 4, ..config.fleet };
        let (servers, outcome) = capacity(&trace, &fleet, policy, 0.5, 0).unwrap();
        assert_eq!(capacity(&trace, &fleet, policy, 0.5, 3).unwrap().0, servers, "a wrong hint is checked");
        let servers = servers.expect("4 servers reach 50 %");
        assert!(outcome.slo_hit_rate() >= 0.5);
        if servers > 1 {
            let fewer = simulate(&trace, &FleetParams { servers: servers - 1, ..fleet }, policy).unwrap();
            assert!(fewer.slo_hit_rate() < 0.5);
        }
    }
}
