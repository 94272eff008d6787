//! Synthetic fleets built from the real MIG profile tables (H100 80GB,
//! H200 141GB, A100 80GB), for tests, benchmarks and the fleet simulator
//! (the lent GPU cannot switch MIG on).

use super::{GpuSpec, InstanceSpec, Profile, ServerSpec};

/// One GiB.
pub const GIB: u64 = 1 << 30;
/// Memory of a whole H100 80GB.
pub const H100_MEMORY: u64 = 80 * GIB;
/// Multiprocessors of a whole H100 80GB.
pub const H100_SMS: u32 = 132;
/// Memory slices of a MIG GPU.
pub const SLICES: u32 = 8;

/// Compute slices of a MIG GPU: the instances of one layout use at most
/// these many (seven 1g instances fill a GPU although one memory slice is
/// left).
pub const COMPUTE_SLICES: u32 = 7;

/// One MIG GPU-instance profile of one GPU model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileShape {
    /// NVML profile id.
    pub id: u32,
    /// Profile name.
    pub name: &'static str,
    /// Memory slices (of 8) it takes.
    pub slices: u32,
    /// Compute slices (of [`COMPUTE_SLICES`]) it takes: the `Ng` of its name.
    pub compute: u32,
    /// Its memory in MiB (NVML's profile info; the H100 rows keep the
    /// round 10 GiB a slice that the pool's tests were written with).
    pub mib: u64,
    /// Its multiprocessors.
    pub sms: u32,
    /// Slices it may start at.
    pub starts: &'static [u32],
}

impl ProfileShape {
    /// The profile as the pool names it.
    pub fn profile(&self) -> Profile {
        Profile { id: self.id, name: self.name.to_owned() }
    }

    /// Its memory in bytes.
    pub fn memory(&self) -> u64 {
        self.mib << 20
    }
}

/// A MIG-capable GPU model: whole-card facts and its profile table,
/// smallest profile first.
#[derive(Debug)]
pub struct GpuModel {
    /// Short key, e.g. `"h100-80gb"`.
    pub key: &'static str,
    /// The name NVML reports.
    pub name: &'static str,
    /// Memory of the whole GPU (MIG off).
    pub memory: u64,
    /// Multiprocessors of the whole GPU (MIG off).
    pub sms: u32,
    /// GPU-instance profiles, smallest first.
    pub profiles: &'static [ProfileShape],
}

impl GpuModel {
    /// The profile with NVML id `id`.
    pub fn profile(&self, id: u32) -> Option<&'static ProfileShape> {
        self.profiles.iter().find(|p| p.id == id)
    }

    /// The model with short key `key` (`h100-80gb`, `h200-141gb`, `a100-80gb`).
    pub fn lookup(key: &str) -> Option<&'static GpuModel> {
        MODELS.into_iter().find(|m| m.key == key)
    }
}

/// The H100 80GB GPU-instance profiles (DESIGN.md, "MIG facts").
pub const H100_PROFILES: [ProfileShape; 6] = [
    ProfileShape {
        id: 19,
        name: "1g.10gb",
        slices: 1,
        compute: 1,
        mib: 10240,
        sms: 16,
        starts: &[0, 1, 2, 3, 4, 5, 6],
    },
    ProfileShape { id: 15, name: "1g.20gb", slices: 2, compute: 1, mib: 20480, sms: 26, starts: &[0, 2, 4, 6] },
    ProfileShape { id: 14, name: "2g.20gb", slices: 2, compute: 2, mib: 20480, sms: 32, starts: &[0, 2, 4] },
    ProfileShape { id: 9, name: "3g.40gb", slices: 4, compute: 3, mib: 40960, sms: 60, starts: &[0, 4] },
    ProfileShape { id: 5, name: "4g.40gb", slices: 4, compute: 4, mib: 40960, sms: 64, starts: &[0] },
    ProfileShape { id: 0, name: "7g.80gb", slices: 8, compute: 7, mib: 81920, sms: 132, starts: &[0] },
];

/// The H200 141GB profiles: the H100's shapes and multiprocessors with
/// more memory per slice (the GPU machine's `nvidia-smi mig -lgip`).
pub const H200_PROFILES: [ProfileShape; 6] = [
    ProfileShape {
        id: 19,
        name: "1g.18gb",
        slices: 1,
        compute: 1,
        mib: 16384,
        sms: 16,
        starts: &[0, 1, 2, 3, 4, 5, 6],
    },
    ProfileShape { id: 15, name: "1g.35gb", slices: 2, compute: 1, mib: 33280, sms: 26, starts: &[0, 2, 4, 6] },
    ProfileShape { id: 14, name: "2g.35gb", slices: 2, compute: 2, mib: 33280, sms: 32, starts: &[0, 2, 4] },
    ProfileShape { id: 9, name: "3g.71gb", slices: 4, compute: 3, mib: 71424, sms: 60, starts: &[0, 4] },
    ProfileShape { id: 5, name: "4g.71gb", slices: 4, compute: 4, mib: 71424, sms: 64, starts: &[0] },
    ProfileShape { id: 0, name: "7g.141gb", slices: 8, compute: 7, mib: 143360, sms: 132, starts: &[0] },
];

/// The A100 80GB profiles: the same placements, fewer multiprocessors
/// (98 of the card's 108 are usable with MIG on).
pub const A100_PROFILES: [ProfileShape; 6] = [
    ProfileShape { id: 19, name: "1g.10gb", slices: 1, compute: 1, mib: 9728, sms: 14, starts: &[0, 1, 2, 3, 4, 5, 6] },
    ProfileShape { id: 15, name: "1g.20gb", slices: 2, compute: 1, mib: 19968, sms: 14, starts: &[0, 2, 4, 6] },
    ProfileShape { id: 14, name: "2g.20gb", slices: 2, compute: 2, mib: 19968, sms: 28, starts: &[0, 2, 4] },
    ProfileShape { id: 9, name: "3g.40gb", slices: 4, compute: 3, mib: 40192, sms: 42, starts: &[0, 4] },
    ProfileShape { id: 5, name: "4g.40gb", slices: 4, compute: 4, mib: 40192, sms: 56, starts: &[0] },
    ProfileShape { id: 0, name: "7g.80gb", slices: 8, compute: 7, mib: 81152, sms: 98, starts: &[0] },
];

/// H100 80GB SXM5.
pub const H100: GpuModel = GpuModel {
    key: "h100-80gb",
    name: "NVIDIA H100 80GB HBM3",
    memory: H100_MEMORY,
    sms: H100_SMS,
    profiles: &H100_PROFILES,
};
/// H200 141GB SXM.
pub const H200: GpuModel =
    GpuModel { key: "h200-141gb", name: "NVIDIA H200", memory: 143_771 << 20, sms: 132, profiles: &H200_PROFILES };
/// A100 80GB SXM4.
pub const A100: GpuModel = GpuModel {
    key: "a100-80gb",
    name: "NVIDIA A100-SXM4-80GB",
    memory: 81_920 << 20,
    sms: 108,
    profiles: &A100_PROFILES,
};

/// Every model with a table.
pub const MODELS: [&GpuModel; 3] = [&H100, &H200, &A100];

/// The H100 profile with NVML id `id`.
pub fn profile(id: u32) -> Option<&'static ProfileShape> {
    H100.profile(id)
}

/// Valid MIG layouts of one H100, as (profile id, start slice) pairs.
pub const LAYOUTS: [&[(u32, u32)]; 8] = [
    &[(19, 0), (19, 1), (19, 2), (19, 3), (19, 4), (19, 5), (19, 6)],
    &[(5, 0), (9, 4)],
    &[(9, 0), (9, 4)],
    &[(15, 0), (15, 2), (15, 4), (15, 6)],
    &[(14, 0), (14, 2), (14, 4), (19, 6)],
    &[(0, 0)],
    &[(9, 0), (14, 4), (19, 6)],
    &[],
];

/// Server `s`'s id.
pub fn server_id(s: usize) -> String {
    format!("srv-{s:05}")
}

/// GPU `g` of server `s` with MIG on and `layout` (profile id, start slice)
/// carved out. Instance uuids depend only on the server, GPU, profile and
/// start, so the same layout re-registers the same instances.
///
/// # Panics
/// On a profile id not in [`H100_PROFILES`].
pub fn mig_gpu(s: usize, g: u32, layout: &[(u32, u32)]) -> GpuSpec {
    mig_gpu_of(&H100, s, g, layout)
}

/// [`mig_gpu`] of `model`.
///
/// # Panics
/// On a profile id not in `model`'s table.
pub fn mig_gpu_of(model: &GpuModel, s: usize, g: u32, layout: &[(u32, u32)]) -> GpuSpec {
    let instances = layout
        .iter()
        .map(|&(id, start)| {
            let shape = model.profile(id).expect("a profile id of the model");
            InstanceSpec {
                uuid: format!("MIG-{s:05}-{g}-{id}-{start}"),
                profile: Some(shape.profile()),
                memory: shape.memory(),
                sms: shape.sms,
                placement: Some((start, shape.slices)),
            }
        })
        .collect();
    GpuSpec {
        uuid: format!("GPU-{s:05}-{g}"),
        name: model.name.into(),
        index: g,
        memory: model.memory,
        sms: model.sms,
        mig: true,
        instances,
    }
}

/// GPU `g` of server `s` with MIG off: one instance, the whole GPU.
pub fn whole_gpu(s: usize, g: u32) -> GpuSpec {
    whole_gpu_of(&H100, s, g)
}

/// [`whole_gpu`] of `model`.
pub fn whole_gpu_of(model: &GpuModel, s: usize, g: u32) -> GpuSpec {
    let uuid = format!("GPU-{s:05}-{g}");
    let (memory, sms) = (model.memory, model.sms);
    GpuSpec {
        uuid: uuid.clone(),
        name: model.name.into(),
        index: g,
        memory,
        sms,
        mig: false,
        instances: vec![InstanceSpec { uuid, profile: None, memory, sms, placement: None }],
    }
}

/// Server `s` with `gpus`.
pub fn server(s: usize, gpus: Vec<GpuSpec>) -> ServerSpec {
    ServerSpec {
        id: server_id(s),
        address: format!("10.{}.{}.{}:4433", s >> 16 & 0xff, s >> 8 & 0xff, s & 0xff),
        cert_sha256: format!("{s:064x}"),
        gpus,
        swap_bytes: 0,
    }
}

/// `servers` servers of `gpus` H100s each: with `instances` = 1 every GPU is
/// whole (MIG off); otherwise MIG is on with `instances` 1g.10gb instances
/// (at most 7) per GPU.
pub fn synthetic(servers: usize, gpus: u32, instances: u32) -> Vec<ServerSpec> {
    let layout = &LAYOUTS[0][..instances.min(7) as usize];
    (0..servers)
        .map(|s| {
            let gpus =
                (0..gpus).map(|g| if instances == 1 { whole_gpu(s, g) } else { mig_gpu(s, g, layout) }).collect();
            server(s, gpus)
        })
        .collect()
}

/// `servers` servers of `gpus` H100s each, cycling through the MIG layouts
/// of [`LAYOUTS`] and whole GPUs.
pub fn mixed(servers: usize, gpus: u32) -> Vec<ServerSpec> {
    (0..servers)
        .map(|s| {
            let gpus = (0..gpus)
                .map(|g| match (s * gpus as usize + g as usize) % (LAYOUTS.len() + 1) {
                    i if i < LAYOUTS.len() => mig_gpu(s, g, LAYOUTS[i]),
                    _ => whole_gpu(s, g),
                })
                .collect();
            server(s, gpus)
        })
        .collect()
}
