//! Protobuf at the edge: the service converts wire messages to pool types
//! here, and the pool never sees prost types.

use crate::pool;
use gpupool_proto::balancer as pb;

pub(crate) fn profile_to_proto(p: &pool::Profile) -> pb::MigProfile {
    pb::MigProfile { id: p.id, name: p.name.clone() }
}

/// A registration as the pool's [`pool::ServerSpec`]; refuses what cannot be
/// a real server's description.
pub(crate) fn server_spec(req: &pb::RegisterRequest) -> Result<pool::ServerSpec, String> {
    if req.server_id.is_empty() {
        return Err("server_id must not be empty".into());
    }
    if req.address.is_empty() {
        return Err("address must not be empty".into());
    }
    let gpus = req
        .gpus
        .iter()
        .map(|g| pool::GpuSpec {
            uuid: g.uuid.clone(),
            name: g.name.clone(),
            index: g.index,
            memory: g.memory_bytes,
            sms: g.multiprocessors,
            mig: g.mig_enabled,
            instances: g
                .instances
                .iter()
                .map(|i| pool::InstanceSpec {
                    uuid: i.uuid.clone(),
                    profile: i.profile.as_ref().map(|p| pool::Profile { id: p.id, name: p.name.clone() }),
                    memory: i.memory_bytes,
                    sms: i.multiprocessors,
                    placement: (i.profile.is_some() && i.placement_size > 0)
                        .then_some((i.placement_start, i.placement_size)),
                })
                .collect(),
        })
        .collect();
    Ok(pool::ServerSpec {
        id: req.server_id.clone(),
        address: req.address.clone(),
        cert_sha256: req.cert_sha256.clone(),
        gpus,
        swap_bytes: req.swap_host_bytes,
    })
}

/// Longest tenant name and MIG profile name an Allocate may carry.
pub(crate) const MAX_NAME_BYTES: usize = 128;

/// A name from a client: at most [`MAX_NAME_BYTES`] bytes of printable
/// ASCII. Names are kept (queue, leases, Status), so an unbounded one let
/// 32 waiting requests grow the balancer by 250 MiB and broke `Status`
/// (issue 20, finding 11).
fn checked_name(what: &str, name: &str) -> Result<(), tonic::Status> {
    if name.len() > MAX_NAME_BYTES {
        return Err(tonic::Status::invalid_argument(format!(
            "{what} is {} bytes long; at most {MAX_NAME_BYTES} are allowed",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(tonic::Status::invalid_argument(format!("{what} holds {:?}: only printable ASCII is allowed", c)));
    }
    Ok(())
}

pub(crate) fn request(req: &pb::AllocateRequest) -> Result<pool::Request, tonic::Status> {
    checked_name("the tenant name", &req.tenant)?;
    checked_name("the profile name", &req.profile)?;
    let class = pb::LeaseClass::try_from(req.class)
        .map_err(|_| tonic::Status::invalid_argument(format!("unknown lease class {}", req.class)))?;
    Ok(pool::Request {
        tenant: req.tenant.clone(),
        memory: req.memory_bytes,
        compute_percent: req.compute_percent,
        profile: (!req.profile.is_empty()).then(|| req.profile.clone()),
        class: class_from_proto(class),
    })
}

pub(crate) fn class_from_proto(c: pb::LeaseClass) -> pool::LeaseClass {
    match c {
        pb::LeaseClass::Exclusive => pool::LeaseClass::Exclusive,
        pb::LeaseClass::Shared => pool::LeaseClass::Shared,
    }
}

pub(crate) fn class_to_proto(c: pool::LeaseClass) -> pb::LeaseClass {
    match c {
        pool::LeaseClass::Exclusive => pb::LeaseClass::Exclusive,
        pool::LeaseClass::Shared => pb::LeaseClass::Shared,
    }
}

pub(crate) fn adopt(c: &pb::LeaseClaims) -> pool::Adopt {
    pool::Adopt {
        id: pool::LeaseId(c.lease_id),
        tenant: c.tenant.clone(),
        server_id: c.server_id.clone(),
        instance_uuid: c.instance_uuid.clone(),
        memory: c.memory_bytes,
        // An unknown class (a newer balancer's) is taken as exclusive: it
        // then holds its instance alone, which cannot break a group's rule.
        class: class_from_proto(c.class()),
        compute_percent: c.compute_percent,
        issued_ms: c.issued_unix_ms,
        expires_ms: c.expires_unix_ms,
    }
}

/// A registered GPU as the protocol carries it.
pub fn gpu_to_proto(g: &pool::GpuSpec) -> pb::Gpu {
    pb::Gpu {
        uuid: g.uuid.clone(),
        name: g.name.clone(),
        index: g.index,
        memory_bytes: g.memory,
        multiprocessors: g.sms,
        mig_enabled: g.mig,
        instances: g
            .instances
            .iter()
            .map(|i| pb::Instance {
                uuid: i.uuid.clone(),
                profile: i.profile.as_ref().map(profile_to_proto),
                memory_bytes: i.memory,
                multiprocessors: i.sms,
                placement_start: i.placement.map_or(0, |p| p.0),
                placement_size: i.placement.map_or(0, |p| p.1),
            })
            .collect(),
    }
}

/// The pool's view as the operator's `PoolStatus`.
pub(crate) fn status(view: &pool::PoolView) -> pb::PoolStatus {
    pb::PoolStatus {
        servers: view
            .servers
            .iter()
            .map(|s| pb::ServerStatus {
                server_id: s.id.clone(),
                address: s.address.clone(),
                gpus: s.gpus.iter().map(|g| gpu_to_proto(&g.spec)).collect(),
                sessions: s.sessions,
                memory_used_bytes: s.memory_used,
                heartbeat_age_ms: s.heartbeat_age_ms,
                draining: s.draining,
                mps_group_faults: s.group_faults,
                gpu_leases: s
                    .gpus
                    .iter()
                    .map(|g| pb::GpuLeases {
                        uuid: g.spec.uuid.clone(),
                        exclusive: g.leases.iter().flatten().count() as u32,
                        shared: g.shared.len() as u32,
                        shared_percent: g.shared_percent,
                        busy_permille: g.busy_permille,
                    })
                    .collect(),
            })
            .collect(),
        leases: view
            .leases
            .iter()
            .map(|l| pb::LeaseStatus {
                lease_id: l.id.0,
                tenant: l.tenant.clone(),
                server_id: l.server_id.clone(),
                instance_uuid: l.instance_uuid.clone(),
                memory_bytes: l.memory,
                expires_unix_ms: l.expires_ms,
                in_use: l.in_use,
                class: class_to_proto(l.class).into(),
                compute_percent: l.compute_percent,
                move_refused: view.move_refused.get(&l.id).cloned().unwrap_or_default(),
            })
            .collect(),
        queue: view
            .queue
            .iter()
            .map(|q| pb::QueuedRequest {
                tenant: q.request.tenant.clone(),
                memory_bytes: q.request.memory,
                compute_percent: q.request.compute_percent,
                profile: q.request.profile.clone().unwrap_or_default(),
                waited_ms: q.waited_ms,
                class: class_to_proto(q.request.class).into(),
            })
            .collect(),
        policy: view.policy.as_str().into(),
        recovering: view.recovering,
        allocations: view.counters.allocations,
        releases: view.counters.releases,
        expirations: view.counters.expirations,
        queue_timeouts: 0,
        tenant: String::new(),
        relayouts: view.counters.relayouts,
        rebalanced: view.counters.rebalanced,
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    /// Issue 20, finding 11: 3.9 MiB tenant names were queued and kept.
    #[test]
    fn names_from_clients_are_bounded() {
        let req = |tenant: &str| pb::AllocateRequest { tenant: tenant.into(), ..Default::default() };
        assert!(request(&req("team-a")).is_ok());
        assert!(request(&req(&"t".repeat(MAX_NAME_BYTES))).is_ok());
        let long = request(&req(&"t".repeat(4 << 20))).unwrap_err();
        assert_eq!(long.code(), tonic::Code::InvalidArgument);
        assert!(long.message().len() < 200, "the refusal does not echo the name");
        assert_eq!(request(&req("a\nb")).unwrap_err().code(), tonic::Code::InvalidArgument);
        let profile = pb::AllocateRequest { profile: "p".repeat(1000), ..Default::default() };
        assert_eq!(request(&profile).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}

#[cfg(test)]
mod class_tests {
    use super::*;

    #[test]
    fn the_class_defaults_to_exclusive_and_an_unknown_one_is_refused() {
        let req = |class: i32| pb::AllocateRequest { tenant: "t".into(), class, ..Default::default() };
        assert_eq!(request(&pb::AllocateRequest { tenant: "t".into(), ..Default::default() }).unwrap().class, {
            pool::LeaseClass::Exclusive
        });
        assert_eq!(request(&req(pb::LeaseClass::Shared.into())).unwrap().class, pool::LeaseClass::Shared);
        assert_eq!(request(&req(7)).unwrap_err().code(), tonic::Code::InvalidArgument);
        let claims =
            pb::LeaseClaims { class: pb::LeaseClass::Shared.into(), compute_percent: 25, ..Default::default() };
        let adopt = adopt(&claims);
        assert_eq!((adopt.class, adopt.compute_percent), (pool::LeaseClass::Shared, 25));
    }
}
