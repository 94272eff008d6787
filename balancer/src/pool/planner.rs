//! Demand-driven MIG layouts: which idle GPUs to lay out anew, and how.
//!
//! A fixed layout loses where demand per profile does not match it:
//! instances of a profile nobody asks for sit free while requests for
//! another queue (fragmentation). The planner compares, per profile, the
//! instances wanted over a recent window (`demand`) with those the fleet
//! has (`supply`), and picks GPUs that may change (no session running on
//! them; idle warm sessions, if any, would be evicted) and a new layout for
//! each that lowers the unmet demand most.
//!
//! Unmet demand weighs each missing instance by its memory slices, so that
//! the planner never breaks up an instance of a large profile that is
//! still wanted to make several small ones (one missing 7g instance
//! outweighs seven missing 1g ones).
//!
//! Like the rest of the pool it has no I/O and no clock: the caller (the
//! fleet simulator today; a balancer `--mig-policy dynamic` later) measures
//! demand, applies the changes (destroy and create the instances, register
//! the new ones) and accounts for their cost.

use super::fleet::{COMPUTE_SLICES, GpuModel, SLICES};

/// A MIG layout: (profile id, start slice) of each instance, by start.
pub type Layout = Vec<(u32, u32)>;

/// Every maximal layout of one model (nothing more fits), with its count of
/// instances per profile.
#[derive(Debug, Clone)]
pub struct Catalog {
    model: &'static GpuModel,
    layouts: Vec<Layout>,
    /// Instances per profile (index into the model's table) of each layout.
    counts: Vec<Vec<u32>>,
}

impl Catalog {
    /// Every maximal layout of `model`: instances on valid starts, no memory
    /// slice shared, at most [`COMPUTE_SLICES`] compute slices in all, and
    /// no further instance fits.
    pub fn new(model: &'static GpuModel) -> Self {
        let mut layouts = Vec::new();
        let mut current = Vec::new();
        enumerate(model, 0, 0, 0, &mut current, &mut layouts);
        layouts.sort();
        layouts.dedup();
        let counts = layouts.iter().map(|l| counts_of(model, l)).collect();
        Self { model, layouts, counts }
    }

    /// The model.
    pub fn model(&self) -> &'static GpuModel {
        self.model
    }

    /// The layouts.
    pub fn layouts(&self) -> &[Layout] {
        &self.layouts
    }

    /// Instances per profile of layout `i`.
    pub fn counts(&self, i: usize) -> &[u32] {
        &self.counts[i]
    }

    /// The index of `layout` (in any order), adding it if it is not maximal
    /// or not yet known, so that a fleet may start from any valid layout.
    pub fn index_of(&mut self, layout: &[(u32, u32)]) -> usize {
        let mut sorted = layout.to_vec();
        sorted.sort_by_key(|&(_, start)| start);
        if let Some(i) = self.layouts.iter().position(|l| *l == sorted) {
            return i;
        }
        self.counts.push(counts_of(self.model, &sorted));
        self.layouts.push(sorted);
        self.layouts.len() - 1
    }
}

/// Instances per profile (index into `model`'s table) of `layout`.
fn counts_of(model: &GpuModel, layout: &[(u32, u32)]) -> Vec<u32> {
    let mut counts = vec![0; model.profiles.len()];
    for &(id, _) in layout {
        if let Some(i) = model.profiles.iter().position(|p| p.id == id) {
            counts[i] += 1;
        }
    }
    counts
}

/// Depth-first over slices: at `slice`, either an instance starts there or
/// the slice stays empty. `used` is the slice mask, `compute` the compute
/// slices taken so far.
fn enumerate(model: &GpuModel, slice: u32, used: u32, compute: u32, current: &mut Layout, out: &mut Vec<Layout>) {
    if slice == SLICES {
        if !current.is_empty() && is_maximal(model, used, compute) {
            out.push(current.clone());
        }
        return;
    }
    for p in model.profiles {
        let mask = ((1u32 << p.slices) - 1) << slice;
        if p.starts.contains(&slice)
            && slice + p.slices <= SLICES
            && used & mask == 0
            && compute + p.compute <= COMPUTE_SLICES
        {
            current.push((p.id, slice));
            enumerate(model, slice + p.slices, used | mask, compute + p.compute, current, out);
            current.pop();
        }
    }
    enumerate(model, slice + 1, used, compute, current, out);
}

/// Whether no instance of any profile fits next to `used` slices and
/// `compute` compute slices.
fn is_maximal(model: &GpuModel, used: u32, compute: u32) -> bool {
    !model.profiles.iter().any(|p| {
        p.starts.iter().any(|&s| {
            let mask = ((1u32 << p.slices) - 1) << s;
            s + p.slices <= SLICES && used & mask == 0 && compute + p.compute <= COMPUTE_SLICES
        })
    })
}

/// A GPU that may be laid out anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The caller's name for it.
    pub gpu: usize,
    /// Its current layout (index into the [`Catalog`]).
    pub layout: usize,
    /// Idle sessions that would have to leave it first.
    pub evictions: u32,
}

/// One GPU to lay out anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// The candidate's `gpu`.
    pub gpu: usize,
    /// Its current layout.
    pub from: usize,
    /// The layout to give it (index into the [`Catalog`]).
    pub to: usize,
}

/// Unmet demand: missing instances per profile, each weighted by its
/// memory slices.
fn unmet(catalog: &Catalog, demand: &[u32], supply: &[i64]) -> i64 {
    catalog
        .model
        .profiles
        .iter()
        .enumerate()
        .map(|(i, p)| (i64::from(demand[i]) - supply[i]).max(0) * i64::from(p.slices))
        .sum()
}

/// Chooses up to `max_changes` candidates and a new layout for each, greedily,
/// each change the one that lowers unmet demand most (then adds most
/// instances of profiles with some demand, then evicts fewest sessions).
/// Changes that lower nothing are not made, so a fleet whose supply meets
/// demand stays as it is.
///
/// `demand` and `supply` are instances per profile (index into the model's
/// table); candidates must be distinct GPUs.
pub fn plan(
    catalog: &Catalog,
    demand: &[u32],
    supply: &[u32],
    candidates: &[Candidate],
    max_changes: usize,
) -> Vec<Change> {
    let n = catalog.model.profiles.len();
    assert!(demand.len() == n && supply.len() == n, "one demand and one supply per profile");
    let mut supply: Vec<i64> = supply.iter().map(|&s| i64::from(s)).collect();
    // Candidates with the same layout differ only by their evictions: keep
    // them cheapest first, per layout, so that a step weighs each layout once.
    let mut by_layout: Vec<Vec<Candidate>> = vec![Vec::new(); catalog.layouts.len()];
    for c in candidates {
        by_layout[c.layout].push(*c);
    }
    for group in &mut by_layout {
        // Reversed: the cheapest is popped first.
        group.sort_by_key(|c| (std::cmp::Reverse(c.evictions), std::cmp::Reverse(c.gpu)));
    }
    let mut changes = Vec::new();
    while changes.len() < max_changes {
        let before = unmet(catalog, demand, &supply);
        if before == 0 {
            break;
        }
        // (gain, useful instances added, -evictions), from, to
        let mut best: Option<((i64, i64, i64), usize, usize)> = None;
        for (from, group) in by_layout.iter().enumerate() {
            let Some(c) = group.last() else { continue };
            for to in 0..catalog.layouts.len() {
                if to == from {
                    continue;
                }
                let mut after = supply.clone();
                let mut useful = 0;
                for i in 0..n {
                    let delta = i64::from(catalog.counts[to][i]) - i64::from(catalog.counts[from][i]);
                    after[i] += delta;
                    if demand[i] > 0 {
                        useful += delta * i64::from(catalog.model.profiles[i].slices);
                    }
                }
                let gain = before - unmet(catalog, demand, &after);
                let score = (gain, useful, -i64::from(c.evictions));
                if gain > 0 && best.is_none_or(|(b, _, _)| score > b) {
                    best = Some((score, from, to));
                }
            }
        }
        let Some((_, from, to)) = best else { break };
        let c = by_layout[from].pop().expect("the best change has a candidate");
        for (i, s) in supply.iter_mut().enumerate() {
            *s += i64::from(catalog.counts[to][i]) - i64::from(catalog.counts[from][i]);
        }
        changes.push(Change { gpu: c.gpu, from, to });
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::super::fleet::{A100, H100, H200, MODELS};
    use super::*;

    fn index(catalog: &Catalog, layout: &[(u32, u32)]) -> usize {
        catalog.layouts().iter().position(|l| l == layout).unwrap_or_else(|| panic!("{layout:?} is in the catalog"))
    }

    const SEVEN_1G: &[(u32, u32)] = &[(19, 0), (19, 1), (19, 2), (19, 3), (19, 4), (19, 5), (19, 6)];
    const MIX: &[(u32, u32)] = &[(5, 0), (14, 4), (19, 6)];
    const WHOLE: &[(u32, u32)] = &[(0, 0)];

    #[test]
    fn catalog_holds_every_maximal_valid_layout_once() {
        for model in MODELS {
            let catalog = Catalog::new(model);
            assert!(catalog.layouts().len() > 10, "{}: {}", model.key, catalog.layouts().len());
            for (i, layout) in catalog.layouts().iter().enumerate() {
                let mut used = 0u32;
                let mut compute = 0;
                for &(id, start) in layout {
                    let p = model.profile(id).expect("a known profile");
                    assert!(p.starts.contains(&start), "{layout:?}");
                    let mask = ((1u32 << p.slices) - 1) << start;
                    assert_eq!(used & mask, 0, "{layout:?} overlaps");
                    used |= mask;
                    compute += p.compute;
                }
                assert!(compute <= COMPUTE_SLICES, "{layout:?}");
                assert!(is_maximal(model, used, compute), "{layout:?} is not maximal");
                assert!(!catalog.layouts()[..i].contains(layout), "{layout:?} twice");
            }
            for layout in [SEVEN_1G, MIX, WHOLE] {
                index(&catalog, layout);
            }
        }
    }

    #[test]
    fn a_known_layout_keeps_its_index_and_a_new_one_is_added() {
        let mut catalog = Catalog::new(&H100);
        let len = catalog.layouts().len();
        let mix = index(&catalog, MIX);
        assert_eq!(catalog.index_of(&[(19, 6), (5, 0), (14, 4)]), mix);
        let partial = catalog.index_of(&[(19, 0)]);
        assert_eq!(partial, len);
        assert_eq!(catalog.counts(partial), &[1, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn unmet_small_demand_re_lays_out_an_idle_whole_gpu() {
        let catalog = Catalog::new(&H200);
        let whole = index(&catalog, WHOLE);
        let demand = [7, 0, 0, 0, 0, 0];
        let supply = [0, 0, 0, 0, 0, 1];
        let changes = plan(&catalog, &demand, &supply, &[Candidate { gpu: 3, layout: whole, evictions: 0 }], 4);
        assert_eq!(changes, vec![Change { gpu: 3, from: whole, to: index(&catalog, SEVEN_1G) }]);
    }

    #[test]
    fn met_demand_changes_nothing() {
        let catalog = Catalog::new(&H100);
        let mix = index(&catalog, MIX);
        let demand = [1, 0, 1, 0, 1, 0];
        let supply = [1, 0, 1, 0, 1, 0];
        assert!(plan(&catalog, &demand, &supply, &[Candidate { gpu: 0, layout: mix, evictions: 0 }], 4).is_empty());
    }

    #[test]
    fn a_wanted_large_instance_is_not_broken_up_for_small_ones() {
        let catalog = Catalog::new(&A100);
        let whole = index(&catalog, WHOLE);
        // One whole GPU wanted and had; seven 1g wanted and none had.
        let demand = [7, 0, 0, 0, 0, 1];
        let supply = [0, 0, 0, 0, 0, 1];
        assert!(plan(&catalog, &demand, &supply, &[Candidate { gpu: 0, layout: whole, evictions: 0 }], 4).is_empty());
    }

    #[test]
    fn idle_gpus_go_before_ones_with_sessions_to_evict_and_changes_are_bounded() {
        let catalog = Catalog::new(&H100);
        let whole = index(&catalog, WHOLE);
        let candidates: Vec<Candidate> =
            (0..6).map(|gpu| Candidate { gpu, layout: whole, evictions: if gpu < 3 { 1 } else { 0 } }).collect();
        let demand = [70, 0, 0, 0, 0, 0];
        let supply = [0, 0, 0, 0, 0, 6];
        let changes = plan(&catalog, &demand, &supply, &candidates, 4);
        let gpus: Vec<usize> = changes.iter().map(|c| c.gpu).collect();
        assert_eq!(gpus, vec![3, 4, 5, 0]);
        assert!(changes.iter().all(|c| c.to == index(&catalog, SEVEN_1G)));
    }

    #[test]
    fn mixed_demand_gets_a_layout_with_each_profile_asked() {
        let catalog = Catalog::new(&H100);
        let seven = index(&catalog, SEVEN_1G);
        // One 4g and one 2g missing, 1g in surplus.
        let demand = [6, 0, 1, 0, 1, 0];
        let supply = [14, 0, 0, 0, 0, 0];
        let candidates =
            [Candidate { gpu: 0, layout: seven, evictions: 0 }, Candidate { gpu: 1, layout: seven, evictions: 0 }];
        let changes = plan(&catalog, &demand, &supply, &candidates, 4);
        assert_eq!(changes.len(), 1, "{changes:?}");
        let counts = catalog.counts(changes[0].to);
        assert_eq!((counts[2], counts[4]), (1, 1), "{:?}", catalog.layouts()[changes[0].to]);
    }
}
