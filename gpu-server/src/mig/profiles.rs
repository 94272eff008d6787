//! MIG GPU-instance profile tables, as data, and layout planning over them.
//!
//! A MIG-capable GPU of the A100/H100/H200 families has 8 memory slices and 7
//! compute slices. A GPU instance (GI) occupies a contiguous run of memory
//! slices, its *placement* (`start:size`, NVML's `nvmlGpuInstancePlacement_t`);
//! each profile may only start at the positions its table row lists, and two
//! instances may not share a memory slice. That is the whole placement rule
//! NVML applies, so it is all [`Layout::plan`] needs to know.
//!
//! Sources of the numbers:
//! - profile ids, placements and SM counts: NVIDIA's MIG user guide
//!   ("Supported MIG Profiles") and `nvidia-smi mig -lgip` / `-lgipp`
//!   listings, as summarised in the project's DESIGN.md ("MIG facts"); the H100
//!   placements were checked against `nvmlDeviceGetGpuInstancePossiblePlacements_v2`
//!   on an H100 80GB HBM3 (the ignored test `real_nvml_discovers_whole_gpu` does it);
//! - profile indices: the `NVML_GPU_INSTANCE_PROFILE_*` constants of
//!   `nvml-wrapper-sys` (1g.10gb on an 80 GB part is `_1_SLICE`, the
//!   memory-doubled 1g.20gb is `_1_SLICE_REV2`, `_REV1` is the `+me` variant,
//!   which we do not plan with);
//! - memory sizes: the `Memory GiB` column of published `-lgip` listings for
//!   H100 80GB and A100 40GB, recalled listings for A100 80GB, and for H200
//!   the listing of the GPU machine's H200 (driver 580.159.04, 2026-12-02,
//!   `tests/fixtures/nvidia-smi/`, whose ids, placements and SMs the H200
//!   table matches too). They are given to 2 decimals of a GiB and
//!   driver-dependent; code that needs the exact size of an existing
//!   instance asks NVML (see [`super::discover`]).

use std::fmt;
use std::str::FromStr;

use nvml_wrapper_sys::bindings::{
    NVML_GPU_INSTANCE_PROFILE_1_SLICE, NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, NVML_GPU_INSTANCE_PROFILE_2_SLICE,
    NVML_GPU_INSTANCE_PROFILE_3_SLICE, NVML_GPU_INSTANCE_PROFILE_4_SLICE, NVML_GPU_INSTANCE_PROFILE_7_SLICE,
};

/// Memory slices of every MIG-capable model in the tables.
pub const MEMORY_SLICES: u32 = 8;
/// Compute slices (groups of SMs) of every MIG-capable model in the tables.
pub const COMPUTE_SLICES: u32 = 7;

/// Where a GPU instance sits: memory slices `start .. start + size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Placement {
    /// First memory slice.
    pub start: u32,
    /// Number of memory slices.
    pub size: u32,
}

impl Placement {
    /// A placement of `size` memory slices from `start`.
    pub const fn new(start: u32, size: u32) -> Self {
        Self { start, size }
    }

    /// One past the last memory slice.
    pub const fn end(self) -> u32 {
        self.start + self.size
    }

    /// Whether the two placements share a memory slice.
    pub const fn overlaps(self, other: Placement) -> bool {
        self.start < other.end() && other.start < self.end()
    }

    /// The slices as a bit mask (bit `i` = slice `i`); slices past 31 are dropped,
    /// which cannot happen with the 8-slice tables.
    pub(crate) fn mask(self) -> u32 {
        (self.start..self.end()).filter(|&s| s < 32).fold(0, |m, s| m | (1 << s))
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.start, self.size)
    }
}

/// One GPU-instance profile of one GPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiProfile {
    /// NVML profile *id*: what `nvmlDeviceCreateGpuInstance*` and `nvmlDeviceGetGpuInstances` take
    /// (and `nvidia-smi mig -cgi` prints).
    pub id: u32,
    /// NVML profile *index* (`NVML_GPU_INSTANCE_PROFILE_*`): what `nvmlDeviceGetGpuInstanceProfileInfo` takes.
    pub index: u32,
    /// Profile name as NVIDIA spells it for this model, e.g. `"3g.40gb"`.
    pub name: &'static str,
    /// Compute slices (the `Ng` of the name), out of [`COMPUTE_SLICES`].
    pub compute_slices: u32,
    /// Memory slices, out of [`MEMORY_SLICES`]; every placement has this size.
    pub memory_slices: u32,
    /// Approximate usable memory of an instance, in bytes (see the module doc for sources).
    pub memory_bytes: u64,
    /// Streaming multiprocessors of an instance.
    pub sms: u32,
    /// Valid placement starts, ascending.
    pub starts: &'static [u32],
}

impl GiProfile {
    /// Every placement NVML allows for this profile.
    pub fn placements(&self) -> impl Iterator<Item = Placement> + '_ {
        self.starts.iter().map(|&s| Placement::new(s, self.memory_slices))
    }

    /// Whether `p` is one of this profile's valid placements.
    pub fn allows(&self, p: Placement) -> bool {
        p.size == self.memory_slices && self.starts.contains(&p.start)
    }
}

/// A GPU model with a known MIG profile table.
#[allow(non_camel_case_types)] // the variants spell NVIDIA's product names
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuModel {
    /// A100 40 GB (SXM4 or PCIe).
    A100_40GB,
    /// A100 80 GB (SXM4 or PCIe).
    A100_80GB,
    /// H100 80 GB SXM5 (`NVIDIA H100 80GB HBM3`); the PCIe and NVL parts have other SM counts.
    H100_80GB,
    /// H200 141 GB SXM (`NVIDIA H200`).
    H200_141GB,
}

/// Whole-card facts and the profile table of one [`GpuModel`].
#[derive(Debug)]
pub struct ModelSpec {
    /// Short key used in specs and configs, e.g. `"h100-80gb"`.
    pub key: &'static str,
    /// The name NVML reports for the usual (SXM) part.
    pub nvml_name: &'static str,
    /// Approximate total memory with MIG off, in bytes (what `nvidia-smi` shows as total).
    pub memory_bytes: u64,
    /// SMs of the whole GPU with MIG off. With MIG on, the full-GPU profile has fewer
    /// on the A100 (98 of 108): some SMs are not usable by any instance.
    pub sms: u32,
    /// GPU-instance profiles, smallest first (as `nvidia-smi mig -lgip` lists them).
    pub profiles: &'static [GiProfile],
}

const MIB: u64 = 1024 * 1024;

/// Valid starts per profile, shared by every model (DESIGN.md "MIG facts").
const STARTS_1G: &[u32] = &[0, 1, 2, 3, 4, 5, 6];
const STARTS_1G_2X: &[u32] = &[0, 2, 4, 6];
const STARTS_2G: &[u32] = &[0, 2, 4];
const STARTS_3G: &[u32] = &[0, 4];
const STARTS_4G: &[u32] = &[0];
const STARTS_7G: &[u32] = &[0];

/// The shape every A100/H100/H200 table shares, smallest first: NVML profile id, NVML
/// profile index, compute slices, memory slices, valid starts.
const SHAPES: [(u32, u32, u32, u32, &[u32]); 6] = [
    (19, NVML_GPU_INSTANCE_PROFILE_1_SLICE, 1, 1, STARTS_1G),
    (15, NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 1, 2, STARTS_1G_2X),
    (14, NVML_GPU_INSTANCE_PROFILE_2_SLICE, 2, 2, STARTS_2G),
    (9, NVML_GPU_INSTANCE_PROFILE_3_SLICE, 3, 4, STARTS_3G),
    (5, NVML_GPU_INSTANCE_PROFILE_4_SLICE, 4, 4, STARTS_4G),
    (0, NVML_GPU_INSTANCE_PROFILE_7_SLICE, 7, 8, STARTS_7G),
];

/// Builds one model's table from its names, memory (MiB) and SMs, in [`SHAPES`] order.
const fn table(names: [&'static str; 6], mib: [u64; 6], sms: [u32; 6]) -> [GiProfile; 6] {
    const fn row(i: usize, names: &[&'static str; 6], mib: &[u64; 6], sms: &[u32; 6]) -> GiProfile {
        let (id, index, compute_slices, memory_slices, starts) = SHAPES[i];
        GiProfile {
            id,
            index,
            name: names[i],
            compute_slices,
            memory_slices,
            memory_bytes: mib[i] * MIB,
            sms: sms[i],
            starts,
        }
    }
    [
        row(0, &names, &mib, &sms),
        row(1, &names, &mib, &sms),
        row(2, &names, &mib, &sms),
        row(3, &names, &mib, &sms),
        row(4, &names, &mib, &sms),
        row(5, &names, &mib, &sms),
    ]
}

static A100_40GB_PROFILES: [GiProfile; 6] = table(
    ["1g.5gb", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"],
    [4864, 9856, 9856, 19968, 19968, 40192],
    [14, 14, 28, 42, 56, 98],
);
static A100_80GB_PROFILES: [GiProfile; 6] = table(
    ["1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"],
    [9728, 19968, 19968, 40192, 40192, 81152],
    [14, 14, 28, 42, 56, 98],
);
static H100_80GB_PROFILES: [GiProfile; 6] = table(
    ["1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"],
    [9984, 20096, 20096, 40448, 40448, 81152],
    [16, 26, 32, 60, 64, 132],
);
static H200_141GB_PROFILES: [GiProfile; 6] = table(
    ["1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"],
    [16384, 33280, 33280, 71424, 71424, 143360],
    [16, 26, 32, 60, 64, 132],
);

static A100_40GB: ModelSpec = ModelSpec {
    key: "a100-40gb",
    nvml_name: "NVIDIA A100-SXM4-40GB",
    memory_bytes: 40960 * MIB,
    sms: 108,
    profiles: &A100_40GB_PROFILES,
};
static A100_80GB: ModelSpec = ModelSpec {
    key: "a100-80gb",
    nvml_name: "NVIDIA A100-SXM4-80GB",
    memory_bytes: 81920 * MIB,
    sms: 108,
    profiles: &A100_80GB_PROFILES,
};
static H100_80GB: ModelSpec = ModelSpec {
    key: "h100-80gb",
    nvml_name: "NVIDIA H100 80GB HBM3",
    memory_bytes: 81559 * MIB,
    sms: 132,
    profiles: &H100_80GB_PROFILES,
};
static H200_141GB: ModelSpec = ModelSpec {
    key: "h200-141gb",
    nvml_name: "NVIDIA H200",
    memory_bytes: 143771 * MIB,
    sms: 132,
    profiles: &H200_141GB_PROFILES,
};

impl GpuModel {
    /// Every model with a table.
    pub const ALL: [GpuModel; 4] =
        [GpuModel::A100_40GB, GpuModel::A100_80GB, GpuModel::H100_80GB, GpuModel::H200_141GB];

    /// Whole-card facts and profile table.
    pub fn spec(self) -> &'static ModelSpec {
        match self {
            GpuModel::A100_40GB => &A100_40GB,
            GpuModel::A100_80GB => &A100_80GB,
            GpuModel::H100_80GB => &H100_80GB,
            GpuModel::H200_141GB => &H200_141GB,
        }
    }

    /// Short key, e.g. `"h100-80gb"`.
    pub fn key(self) -> &'static str {
        self.spec().key
    }

    /// GPU-instance profiles, smallest first.
    pub fn profiles(self) -> &'static [GiProfile] {
        self.spec().profiles
    }

    /// The profile with NVML profile id `id`.
    pub fn profile_by_id(self, id: u32) -> Option<&'static GiProfile> {
        self.profiles().iter().find(|p| p.id == id)
    }

    /// The profile named `name` on this model: `"3g.40gb"`, also `"MIG 3g.40gb"` or
    /// upper case as tools print it.
    pub fn profile_by_name(self, name: &str) -> Option<&'static GiProfile> {
        let name = name.trim();
        let name = name.strip_prefix("MIG ").or_else(|| name.strip_prefix("mig ")).unwrap_or(name).trim();
        self.profiles().iter().find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// The profile that spans the whole GPU (id 0, `7g.*`).
    pub fn full_profile(self) -> &'static GiProfile {
        // Every table is built by `table`, whose last row is the 7-slice profile.
        &self.profiles()[SHAPES.len() - 1]
    }

    /// Recognises a model from the name NVML reports (`nvmlDeviceGetName`), e.g.
    /// `"NVIDIA H100 80GB HBM3"`, `"NVIDIA H200"`, `"NVIDIA A100-SXM4-80GB"`,
    /// `"NVIDIA A100 80GB PCIe"`, `"A100-PCIE-40GB"`. Matching ignores case, spaces,
    /// hyphens and underscores. Parts whose tables differ from ours (H100 PCIe and
    /// NVL, H200 NVL, H100 94/96 GB) are not recognised rather than guessed.
    pub fn from_nvml_name(name: &str) -> Option<GpuModel> {
        let n: String = name.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();
        if n.contains("a100") {
            if n.contains("80gb") {
                return Some(GpuModel::A100_80GB);
            }
            if n.contains("40gb") {
                return Some(GpuModel::A100_40GB);
            }
            return None;
        }
        if n.contains("h100") {
            // The SXM5 part reports "H100 80GB HBM3"; the PCIe part ("H100 PCIe") has
            // 114 SMs and other MIG SM counts, so it must not match.
            let sxm = n.contains("80gb") && !n.contains("pcie") && !n.contains("nvl");
            return sxm.then_some(GpuModel::H100_80GB);
        }
        if n.contains("h200") {
            let other = n.contains("nvl") || n.contains("gh200") || n.contains("144g");
            return (!other).then_some(GpuModel::H200_141GB);
        }
        None
    }

    /// Recognises a short key (`"h100-80gb"`, also `"h100"`, `"h200"`) or, failing that,
    /// an NVML name (see [`GpuModel::from_nvml_name`]).
    pub fn lookup(s: &str) -> Option<GpuModel> {
        let k = s.trim().to_ascii_lowercase();
        let by_key = match k.as_str() {
            "h100" | "h100-80gb" => Some(GpuModel::H100_80GB),
            "h200" | "h200-141gb" => Some(GpuModel::H200_141GB),
            "a100-80gb" => Some(GpuModel::A100_80GB),
            "a100-40gb" => Some(GpuModel::A100_40GB),
            _ => None,
        };
        by_key.or_else(|| GpuModel::from_nvml_name(s))
    }
}

impl fmt::Display for GpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl FromStr for GpuModel {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        GpuModel::lookup(s).ok_or_else(|| LayoutError::UnknownModel(s.to_owned()))
    }
}

/// Why a layout cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The model name matches no table.
    #[error("unknown GPU model {0:?} (known: a100-40gb, a100-80gb, h100-80gb, h200-141gb)")]
    UnknownModel(String),
    /// A profile name does not exist on this model (names differ per model: 1g.10gb on H100 is 1g.18gb on H200).
    #[error("no MIG profile {name:?} on {model} (profiles: {})", known_names(*.model))]
    UnknownProfile {
        /// The model.
        model: GpuModel,
        /// The name asked for.
        name: String,
    },
    /// The profiles cannot all be placed on one GPU without sharing a memory slice.
    #[error("MIG layout [{}] does not fit on one {model}: no non-overlapping placements exist", .names.join(", "))]
    DoesNotFit {
        /// The model.
        model: GpuModel,
        /// The layout asked for.
        names: Vec<String>,
    },
}

fn known_names(model: GpuModel) -> String {
    model.profiles().iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

/// Layout planning: which placement each instance of a list of profiles gets.
#[derive(Debug, Clone, Copy)]
pub struct Layout;

impl Layout {
    /// Resolves profile names for `model`, keeping their order.
    pub fn resolve<S: AsRef<str>>(model: GpuModel, names: &[S]) -> Result<Vec<&'static GiProfile>, LayoutError> {
        names
            .iter()
            .map(|n| {
                model
                    .profile_by_name(n.as_ref())
                    .ok_or_else(|| LayoutError::UnknownProfile { model, name: n.as_ref().to_owned() })
            })
            .collect()
    }

    /// Places every named profile on an empty GPU of `model`: one placement per name, in
    /// the order given, or an error naming the problem. Finds a packing whenever one exists.
    pub fn plan<S: AsRef<str>>(model: GpuModel, names: &[S]) -> Result<Vec<Placement>, LayoutError> {
        Self::plan_around(model, names, &[], &[])
    }

    /// Like [`Layout::plan`], on a GPU where the `occupied` placements stay taken, and
    /// preferring `(profile id, placement)` pairs from `preferred` (instances that already
    /// exist and could be kept): among all packings it returns one that uses the most of them.
    pub fn plan_around<S: AsRef<str>>(
        model: GpuModel,
        names: &[S],
        occupied: &[Placement],
        preferred: &[(u32, Placement)],
    ) -> Result<Vec<Placement>, LayoutError> {
        let profiles = Self::resolve(model, names)?;
        let fixed = occupied.iter().fold(0, |m, p| m | p.mask());
        let best = pack(&profiles, fixed, preferred, false);
        match best {
            Some(found) if found.iter().all(Option::is_some) => Ok(found.into_iter().flatten().collect()),
            _ => Err(LayoutError::DoesNotFit { model, names: names.iter().map(|n| n.as_ref().to_owned()).collect() }),
        }
    }
}

/// The search behind [`Layout`] and the planner.
///
/// Places `profiles` on the slices not in `fixed`, returning one entry per profile in the
/// input order (`None` = left out, only when `allow_skip`). Among all packings it picks
/// the one placing the most profiles and, among those, reusing the most `preferred`
/// pairs. Larger profiles are tried first and the search backtracks, so a packing is
/// found whenever one exists. Identical profiles take ascending starts (and are left out
/// last-first), which removes the permutations of equal entries from the search; with at
/// most 7 instances of at most 7 placements each, it stays small.
pub(crate) fn pack(
    profiles: &[&'static GiProfile],
    fixed: u32,
    preferred: &[(u32, Placement)],
    allow_skip: bool,
) -> Option<Vec<Option<Placement>>> {
    let mut order: Vec<usize> = (0..profiles.len()).collect();
    order.sort_by_key(|&i| {
        let p = profiles[i];
        (std::cmp::Reverse(p.memory_slices), std::cmp::Reverse(p.compute_slices), p.id, i)
    });
    let mut search = Search {
        profiles,
        order: &order,
        preferred,
        allow_skip,
        chosen: vec![None; profiles.len()],
        best: None,
        best_score: 0,
    };
    search.go(0, fixed, 0);
    let best = search.best?;
    let mut out = vec![None; profiles.len()];
    for (slot, &i) in order.iter().enumerate() {
        out[i] = best[slot];
    }
    Some(out)
}

struct Search<'a> {
    profiles: &'a [&'static GiProfile],
    order: &'a [usize],
    preferred: &'a [(u32, Placement)],
    allow_skip: bool,
    /// Choice per position of `order`.
    chosen: Vec<Option<Placement>>,
    best: Option<Vec<Option<Placement>>>,
    best_score: u32,
}

/// Score weights: placing one more instance outweighs any number of reuses (at most 8).
const PLACED: u32 = 16;

impl Search<'_> {
    fn go(&mut self, k: usize, used: u32, score: u32) {
        let remaining = (self.order.len() - k) as u32;
        // Nothing left can beat what we have: every remaining entry placed and reused.
        if self.best.is_some() && score + remaining * (PLACED + 1) <= self.best_score {
            return;
        }
        if k == self.order.len() {
            self.best_score = score;
            self.best = Some(self.chosen.clone());
            return;
        }
        let profile = self.profiles[self.order[k]];
        // Symmetry breaking against the previous entry of the same profile.
        let prev = (k > 0 && self.profiles[self.order[k - 1]].id == profile.id).then(|| self.chosen[k - 1]);
        let skipped_prev = matches!(prev, Some(None));
        if !skipped_prev {
            let min_start = match prev {
                Some(Some(p)) => p.start + 1,
                _ => 0,
            };
            // Preferred placements first, so good answers are found early and prune more.
            let mut candidates: Vec<Placement> = profile.placements().filter(|p| p.start >= min_start).collect();
            candidates.sort_by_key(|p| !self.preferred.contains(&(profile.id, *p)));
            for p in candidates {
                if used & p.mask() != 0 {
                    continue;
                }
                let reuse = u32::from(self.preferred.contains(&(profile.id, p)));
                self.chosen[k] = Some(p);
                self.go(k + 1, used | p.mask(), score + PLACED + reuse);
                if self.done() {
                    return;
                }
            }
        }
        if self.allow_skip {
            self.chosen[k] = None;
            self.go(k + 1, used, score);
        }
        self.chosen[k] = None;
    }

    /// Whether the best answer so far cannot be improved (all placed, and all reused that could be).
    fn done(&self) -> bool {
        let n = self.order.len() as u32;
        let reusable = (self.preferred.len() as u32).min(n);
        self.best.is_some() && self.best_score >= n * PLACED + reusable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_valid(model: GpuModel, names: &[&str], placements: &[Placement]) {
        assert_eq!(names.len(), placements.len());
        for (i, (n, p)) in names.iter().zip(placements).enumerate() {
            let prof = model.profile_by_name(n).unwrap();
            assert!(prof.allows(*p), "{model}: {n} at {p} is not allowed");
            for q in &placements[i + 1..] {
                assert!(!p.overlaps(*q), "{model}: {p} overlaps {q} in {names:?}");
            }
        }
    }

    #[test]
    fn tables_are_consistent() {
        for model in GpuModel::ALL {
            let spec = model.spec();
            let ids: Vec<u32> = spec.profiles.iter().map(|p| p.id).collect();
            assert_eq!(ids, [19, 15, 14, 9, 5, 0], "{model}");
            let mut names: Vec<_> = spec.profiles.iter().map(|p| p.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), 6, "{model}: duplicate names");
            for p in spec.profiles {
                assert!(p.name.starts_with(&format!("{}g.", p.compute_slices)), "{model} {}", p.name);
                assert!(p.compute_slices <= COMPUTE_SLICES && p.memory_slices <= MEMORY_SLICES);
                for pl in p.placements() {
                    assert!(pl.end() <= MEMORY_SLICES, "{model} {} {pl}", p.name);
                    assert_eq!(pl.start % p.memory_slices.min(4), 0, "{model} {} {pl}: unaligned", p.name);
                }
                assert!(p.memory_bytes > 0 && p.memory_bytes < spec.memory_bytes);
                assert!(p.sms > 0 && p.sms <= spec.sms);
            }
            let full = model.full_profile();
            assert_eq!((full.id, full.compute_slices, full.memory_slices), (0, 7, 8));
            assert_eq!(full.placements().collect::<Vec<_>>(), [Placement::new(0, 8)]);
            // SMs grow with compute slices; memory with memory slices.
            let mut by_compute: Vec<_> = spec.profiles.to_vec();
            by_compute.sort_by_key(|p| (p.compute_slices, p.sms));
            assert!(by_compute.windows(2).all(|w| w[0].sms <= w[1].sms), "{model}");
            let mut by_mem: Vec<_> = spec.profiles.to_vec();
            by_mem.sort_by_key(|p| (p.memory_slices, p.memory_bytes));
            assert!(by_mem.windows(2).all(|w| w[0].memory_bytes <= w[1].memory_bytes), "{model}");
        }
    }

    #[test]
    fn design_md_placements_and_indices() {
        let want: [(u32, &[u32], u32, u32); 6] = [
            (19, &[0, 1, 2, 3, 4, 5, 6], 1, NVML_GPU_INSTANCE_PROFILE_1_SLICE),
            (15, &[0, 2, 4, 6], 2, 9),
            (14, &[0, 2, 4], 2, 1),
            (9, &[0, 4], 4, 2),
            (5, &[0], 4, 3),
            (0, &[0], 8, 4),
        ];
        for model in GpuModel::ALL {
            for (id, starts, size, index) in want {
                let p = model.profile_by_id(id).unwrap();
                assert_eq!(p.starts, starts, "{model} id {id}");
                assert_eq!(p.memory_slices, size, "{model} id {id}");
                assert_eq!(p.index, index, "{model} id {id}");
            }
        }
        let h100: Vec<_> = GpuModel::H100_80GB.profiles().iter().map(|p| (p.id, p.name, p.sms)).collect();
        assert_eq!(
            h100,
            [
                (19, "1g.10gb", 16),
                (15, "1g.20gb", 26),
                (14, "2g.20gb", 32),
                (9, "3g.40gb", 60),
                (5, "4g.40gb", 64),
                (0, "7g.80gb", 132),
            ]
        );
        let h200: Vec<_> = GpuModel::H200_141GB.profiles().iter().map(|p| p.name).collect();
        assert_eq!(h200, ["1g.18gb", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"]);
        let a100: Vec<_> = GpuModel::A100_80GB.profiles().iter().map(|p| (p.name, p.sms)).collect();
        assert_eq!(
            a100,
            [("1g.10gb", 14), ("1g.20gb", 14), ("2g.20gb", 28), ("3g.40gb", 42), ("4g.40gb", 56), ("7g.80gb", 98)]
        );
    }

    #[test]
    fn model_names() {
        let cases = [
            ("NVIDIA H100 80GB HBM3", Some(GpuModel::H100_80GB)),
            ("nvidia h100 80gb hbm3", Some(GpuModel::H100_80GB)),
            ("NVIDIA H100 PCIe", None),
            ("NVIDIA H100 NVL", None),
            ("NVIDIA H200", Some(GpuModel::H200_141GB)),
            ("NVIDIA H200 NVL", None),
            ("NVIDIA GH200 480GB", None),
            ("NVIDIA A100-SXM4-80GB", Some(GpuModel::A100_80GB)),
            ("NVIDIA A100 80GB PCIe", Some(GpuModel::A100_80GB)),
            ("NVIDIA A100-SXM4-40GB", Some(GpuModel::A100_40GB)),
            ("A100-PCIE-40GB", Some(GpuModel::A100_40GB)),
            ("Tesla T4", None),
            ("", None),
        ];
        for (name, want) in cases {
            assert_eq!(GpuModel::from_nvml_name(name), want, "{name:?}");
        }
        for model in GpuModel::ALL {
            assert_eq!(GpuModel::from_nvml_name(model.spec().nvml_name), Some(model));
            assert_eq!(GpuModel::lookup(model.key()), Some(model));
            assert_eq!(model.key().parse::<GpuModel>(), Ok(model));
        }
        assert_eq!(GpuModel::lookup("H100"), Some(GpuModel::H100_80GB));
        assert!(matches!("v100".parse::<GpuModel>(), Err(LayoutError::UnknownModel(_))));
    }

    #[test]
    fn profile_names() {
        let m = GpuModel::H100_80GB;
        assert_eq!(m.profile_by_name("3g.40gb").unwrap().id, 9);
        assert_eq!(m.profile_by_name("MIG 3g.40gb").unwrap().id, 9);
        assert_eq!(m.profile_by_name(" 3G.40GB ").unwrap().id, 9);
        assert!(m.profile_by_name("1g.18gb").is_none());
        assert_eq!(GpuModel::H200_141GB.profile_by_name("1g.18gb").unwrap().id, 19);
        assert_eq!(GpuModel::A100_40GB.profile_by_name("1g.10gb").unwrap().id, 15);
        assert_eq!(GpuModel::A100_80GB.profile_by_name("1g.10gb").unwrap().id, 19);
    }

    /// The same layouts, spelled in each model's names.
    fn layouts_ok() -> Vec<Vec<usize>> {
        // Indices into `by_size` below: 0=1g, 1=1g-doubled, 2=2g, 3=3g, 4=4g, 5=7g.
        vec![
            vec![5],
            vec![4, 3],
            vec![3, 3],
            vec![3, 2, 0, 0],
            vec![0; 7],
            vec![1; 4],
            vec![2, 2, 2],
            vec![2, 2, 2, 0],
            vec![4, 2, 0],
            vec![4, 0, 0, 0],
            vec![3, 0, 0, 0, 0],
            vec![1, 1, 1, 0],
            vec![2, 1, 1, 0],
            vec![],
        ]
    }

    fn layouts_bad() -> Vec<Vec<usize>> {
        vec![
            vec![4, 4],
            vec![5, 0],
            vec![0; 8],
            vec![1; 5],
            vec![3, 3, 0],
            vec![2, 2, 2, 2],
            vec![4, 3, 0],
            vec![3, 2, 2, 0, 0],
            vec![1, 1, 1, 1, 0],
        ]
    }

    fn by_size(model: GpuModel) -> [&'static str; 6] {
        let n = |id| model.profile_by_id(id).unwrap().name;
        [n(19), n(15), n(14), n(9), n(5), n(0)]
    }

    #[test]
    fn plan_valid_and_invalid_layouts_every_model() {
        for model in GpuModel::ALL {
            let names = by_size(model);
            for l in layouts_ok() {
                let l: Vec<&str> = l.iter().map(|&i| names[i]).collect();
                let placed = Layout::plan(model, &l).unwrap_or_else(|e| panic!("{model} {l:?}: {e}"));
                assert_valid(model, &l, &placed);
            }
            for l in layouts_bad() {
                let l: Vec<&str> = l.iter().map(|&i| names[i]).collect();
                let err = Layout::plan(model, &l).unwrap_err();
                assert!(matches!(err, LayoutError::DoesNotFit { .. }), "{model} {l:?}: {err}");
            }
        }
    }

    #[test]
    fn plan_h100_examples_from_the_brief() {
        let m = GpuModel::H100_80GB;
        let p = Layout::plan(m, &["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]).unwrap();
        // The 3g must take the upper half: the 1g profiles cannot start at slice 7.
        assert_eq!(p[0], Placement::new(4, 4));
        assert_valid(m, &["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], &p);
        assert!(Layout::plan(m, &["4g.40gb", "3g.40gb"]).is_ok());
        assert!(Layout::plan(m, &["4g.40gb", "4g.40gb"]).is_err());
        assert!(Layout::plan(m, &["1g.10gb"; 7]).is_ok());
        assert!(Layout::plan(m, &["1g.20gb"; 4]).is_ok());
        assert!(Layout::plan(m, &["1g.20gb"; 5]).is_err());
        let err = Layout::plan(m, &["1g.18gb"]).unwrap_err();
        assert_eq!(err, LayoutError::UnknownProfile { model: m, name: "1g.18gb".into() });
        assert!(err.to_string().contains("1g.10gb"), "{err}");
        let err = Layout::plan(m, &["4g.40gb", "4g.40gb"]).unwrap_err();
        assert!(err.to_string().contains("4g.40gb, 4g.40gb"), "{err}");
    }

    #[test]
    fn plan_around_respects_occupied_and_prefers_existing() {
        let m = GpuModel::H100_80GB;
        // A 1g at slice 4 blocks the 3g's upper half and the 2g at 4; a 2g cannot start at 6.
        let taken = [Placement::new(4, 1)];
        assert!(Layout::plan_around(m, &["3g.40gb", "2g.20gb"], &taken, &[]).is_err());
        let p = Layout::plan_around(m, &["3g.40gb", "1g.10gb"], &taken, &[]).unwrap();
        assert_eq!(p[0], Placement::new(0, 4));
        assert!(!p[1].overlaps(taken[0]));
        // Preferred placements are used when they fit.
        let pref = [(19, Placement::new(5, 1)), (19, Placement::new(2, 1))];
        let p = Layout::plan_around(m, &["1g.10gb", "1g.10gb"], &[], &pref).unwrap();
        let mut got = p.clone();
        got.sort();
        assert_eq!(got, [Placement::new(2, 1), Placement::new(5, 1)]);
    }

    #[test]
    fn pack_skips_what_cannot_fit_when_allowed() {
        let m = GpuModel::H100_80GB;
        let profs = Layout::resolve(m, &["4g.40gb", "3g.40gb", "1g.10gb"]).unwrap();
        // Slice 0 taken: the 4g cannot be placed, the 3g and 1g can.
        let got = pack(&profs, Placement::new(0, 1).mask(), &[], true).unwrap();
        assert_eq!(got[0], None);
        assert_eq!(got[1], Some(Placement::new(4, 4)));
        assert!(got[2].is_some());
        assert!(pack(&profs, Placement::new(0, 1).mask(), &[], false).is_none());
    }
}
