//! Synthetic fleets built from the real H100 80GB MIG profile table, for
//! tests and benchmarks (the lent H100 cannot switch MIG on).

use super::{GpuSpec, InstanceSpec, Profile, ServerSpec};

/// One GiB.
pub const GIB: u64 = 1 << 30;
/// Memory of a whole H100 80GB.
pub const H100_MEMORY: u64 = 80 * GIB;
/// Multiprocessors of a whole H100 80GB.
pub const H100_SMS: u32 = 132;
/// Memory slices of a MIG GPU.
pub const SLICES: u32 = 8;

/// One MIG GPU-instance profile of the H100 80GB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProfileShape {
    /// NVML profile id.
    pub id: u32,
    /// Profile name.
    pub name: &'static str,
    /// Memory slices (of 8) it takes.
    pub slices: u32,
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

    /// Its memory: 10 GiB per slice.
    pub fn memory(&self) -> u64 {
        u64::from(self.slices) * 10 * GIB
    }
}

/// The H100 80GB GPU-instance profiles (DESIGN.md, "MIG facts").
pub const H100_PROFILES: [ProfileShape; 6] = [
    ProfileShape { id: 19, name: "1g.10gb", slices: 1, sms: 16, starts: &[0, 1, 2, 3, 4, 5, 6] },
    ProfileShape { id: 15, name: "1g.20gb", slices: 2, sms: 26, starts: &[0, 2, 4, 6] },
    ProfileShape { id: 14, name: "2g.20gb", slices: 2, sms: 32, starts: &[0, 2, 4] },
    ProfileShape { id: 9, name: "3g.40gb", slices: 4, sms: 60, starts: &[0, 4] },
    ProfileShape { id: 5, name: "4g.40gb", slices: 4, sms: 64, starts: &[0] },
    ProfileShape { id: 0, name: "7g.80gb", slices: 8, sms: 132, starts: &[0] },
];

/// The H100 profile with NVML id `id`.
pub fn profile(id: u32) -> Option<&'static ProfileShape> {
    H100_PROFILES.iter().find(|p| p.id == id)
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
    let instances = layout
        .iter()
        .map(|&(id, start)| {
            let shape = profile(id).expect("an H100 profile id");
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
        name: "NVIDIA H100 80GB HBM3".into(),
        index: g,
        memory: H100_MEMORY,
        sms: H100_SMS,
        mig: true,
        instances,
    }
}

/// GPU `g` of server `s` with MIG off: one instance, the whole GPU.
pub fn whole_gpu(s: usize, g: u32) -> GpuSpec {
    let uuid = format!("GPU-{s:05}-{g}");
    GpuSpec {
        uuid: uuid.clone(),
        name: "NVIDIA H100 80GB HBM3".into(),
        index: g,
        memory: H100_MEMORY,
        sms: H100_SMS,
        mig: false,
        instances: vec![InstanceSpec { uuid, profile: None, memory: H100_MEMORY, sms: H100_SMS, placement: None }],
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
