//! The pool's domain types: what servers register, what clients ask for and
//! get, the configuration, the error, and the operator's view.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// A gpu-server and the instances it serves, as it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Stable name of the server (host name or cloud instance id).
    pub id: String,
    /// QUIC address clients connect to (`host:port`).
    pub address: String,
    /// Hex SHA-256 of the server's certificate, handed to clients to pin.
    pub cert_sha256: String,
    /// The GPUs the server drives.
    pub gpus: Vec<GpuSpec>,
    /// Host memory the server swaps idle sessions into (0: it does not
    /// swap); what lets the pool overcommit its GPUs' memory.
    pub swap_bytes: u64,
}

/// One GPU of a server. With MIG off it is served as one instance whose uuid
/// is the GPU's uuid and whose profile is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSpec {
    /// `GPU-…` uuid.
    pub uuid: String,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Index on the server (NVML order).
    pub index: u32,
    /// Device memory in bytes.
    pub memory: u64,
    /// Streaming multiprocessors of the whole GPU.
    pub sms: u32,
    /// Whether MIG mode is enabled.
    pub mig: bool,
    /// What can be leased: MIG instances, or the whole GPU as one instance.
    pub instances: Vec<InstanceSpec>,
}

/// What one lease grants: a MIG instance or a whole GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// `MIG-…` uuid, or the GPU's uuid for a whole GPU.
    pub uuid: String,
    /// MIG profile; `None` for a whole GPU.
    pub profile: Option<Profile>,
    /// Device memory in bytes.
    pub memory: u64,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// First memory slice and slice count (of 8) of the GPU instance; MIG only.
    pub placement: Option<(u32, u32)>,
}

/// A MIG GPU-instance profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Profile {
    /// NVML's profile id (what create calls take), e.g. 9.
    pub id: u32,
    /// e.g. "3g.40gb".
    pub name: String,
}

/// A client's request for a virtual GPU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Who pays; quotas apply per tenant. Must not be empty.
    pub tenant: String,
    /// Device memory needed, in bytes; 0: any.
    pub memory: u64,
    /// Share of the GPU's multiprocessors needed, 1..=100 percent; 0: any.
    pub compute_percent: u32,
    /// A MIG profile by name ("3g.40gb") or id ("9"); `None`: any instance.
    pub profile: Option<String>,
    /// Exclusive (an instance alone) or shared (a part of a whole GPU).
    pub class: LeaseClass,
}

/// Whether a lease may share its GPU with other leases (issue 19). Shared
/// sessions of a GPU run under one MPS daemon, where one session's fault
/// ends the others' work: they share fate, so they are placed together only
/// when their tenants allow it (same tenant, or both opted in with
/// [`Quota::share_fate_across_tenants`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub enum LeaseClass {
    /// A MIG instance or a whole GPU, alone. What clients get by default.
    #[default]
    Exclusive,
    /// A part of a whole GPU: the request's memory and compute percent,
    /// next to other shared leases whose tenants may share fate with it.
    Shared,
}

impl LeaseClass {
    /// "exclusive" or "shared".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exclusive => "exclusive",
            Self::Shared => "shared",
        }
    }
}

/// A lease's identity. Derived from the pool's seed, so a restarted balancer
/// (with a fresh random seed) does not reissue an id that is still around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// The right to use one instance until `expires_ms` unless renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Identity; also in the signed token.
    pub id: LeaseId,
    /// Tenant the lease counts against.
    pub tenant: String,
    /// Server serving the instance.
    pub server_id: String,
    /// The server's QUIC address.
    pub address: String,
    /// Hex SHA-256 of the server's certificate.
    pub cert_sha256: String,
    /// The leased instance.
    pub instance_uuid: String,
    /// The instance's MIG profile; `None` for a whole GPU.
    pub profile: Option<Profile>,
    /// The instance's memory in bytes; a shared lease's own part of it.
    pub memory: u64,
    /// The instance's multiprocessors; a shared lease's share of them
    /// (rounded up).
    pub sms: u32,
    /// Exclusive or shared.
    pub class: LeaseClass,
    /// A shared lease's share of its GPU's multiprocessors, in percent
    /// (1..=100); 0 for an exclusive lease.
    pub compute_percent: u32,
    /// When it was granted (Unix ms).
    pub issued_ms: u64,
    /// When it ends unless renewed (Unix ms); renewing at or after this is too late.
    pub expires_ms: u64,
    /// A session holding the lease was open at the server's last heartbeat.
    pub in_use: bool,
}

/// How to choose among equally good instances on different servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// The server with the fewest leases: spreads load and failure risk.
    #[default]
    Spread,
    /// The server with the most leases: fills servers up and leaves others empty.
    Binpack,
}

impl Policy {
    /// "spread" or "binpack".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spread => "spread",
            Self::Binpack => "binpack",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spread" => Ok(Self::Spread),
            "binpack" => Ok(Self::Binpack),
            other => Err(format!("unknown placement policy {other:?} (spread or binpack)")),
        }
    }
}

/// Limits on what one tenant may hold at once; queued requests count too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    /// Most leases (held plus queued).
    pub max_leases: Option<u32>,
    /// Most instance memory in bytes (held plus queued).
    pub max_memory: Option<u64>,
    /// The tenant's shared leases may be placed on a GPU with the shared
    /// leases of other tenants that opted in too, sharing their fate (a
    /// fault of one session ends the work of all on the GPU). Without it a
    /// tenant's shared leases share a GPU only with its own.
    pub share_fate_across_tenants: bool,
}

/// The pool's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Placement policy.
    pub policy: Policy,
    /// How long a lease lasts from its grant or last renewal.
    pub lease_ttl_ms: u64,
    /// A server silent (no heartbeat or registration) for longer is drained.
    pub heartbeat_timeout_ms: u64,
    /// Most requests waiting at once.
    pub queue_capacity: usize,
    /// After a start, grant nothing new for this long, so that leases from
    /// before the restart can come back first (0: no recovery window).
    pub recovery_ms: u64,
    /// Quota of tenants without their own.
    pub default_quota: Quota,
    /// Quotas by tenant.
    pub tenant_quotas: HashMap<String, Quota>,
    /// Seed of lease ids; pass a random one at every start.
    pub id_seed: u64,
    /// Shared leases on a whole GPU may together ask this many percent of
    /// its memory (100: no overcommit), on servers that swap idle sessions
    /// out, and by at most the host memory such a server swaps into.
    pub memory_overcommit_percent: u32,
    /// MIG GPUs may be laid out anew ([`Pool::plan_layouts`]): a request
    /// that no registered instance fits waits when a profile of a
    /// registered MIG GPU would fit it.
    pub dynamic_layouts: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            policy: Policy::Spread,
            lease_ttl_ms: 30_000,
            heartbeat_timeout_ms: 10_000,
            queue_capacity: 1_024,
            recovery_ms: 0,
            default_quota: Quota::default(),
            tenant_quotas: HashMap::new(),
            id_seed: 0,
            memory_overcommit_percent: 100,
            dynamic_layouts: false,
        }
    }
}

/// Largest memory overcommit accepted, in percent of a GPU's memory.
const MAX_OVERCOMMIT_PERCENT: u32 = 1_000;

/// Longest lease ttl, heartbeat timeout or recovery window accepted: a day.
const MAX_DURATION_MS: u64 = 24 * 3_600 * 1_000;
/// Largest queue accepted.
const MAX_QUEUE: usize = 1 << 20;

impl PoolConfig {
    /// Checks the settings; the error lists every problem, one per line.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for (name, value) in [("lease_ttl_ms", self.lease_ttl_ms), ("heartbeat_timeout_ms", self.heartbeat_timeout_ms)]
        {
            if value == 0 {
                problems.push(format!("{name} must be at least 1 ms"));
            }
            if value > MAX_DURATION_MS {
                problems.push(format!("{name} is {value} ms, more than a day ({MAX_DURATION_MS} ms)"));
            }
        }
        if self.recovery_ms > MAX_DURATION_MS {
            problems.push(format!("recovery_ms is {} ms, more than a day ({MAX_DURATION_MS} ms)", self.recovery_ms));
        }
        if self.queue_capacity == 0 {
            problems.push("queue_capacity must be at least 1 (callers that must not wait pass wait = false)".into());
        }
        if !(100..=MAX_OVERCOMMIT_PERCENT).contains(&self.memory_overcommit_percent) {
            problems.push(format!(
                "memory_overcommit_percent is {}, not within 100..={MAX_OVERCOMMIT_PERCENT}",
                self.memory_overcommit_percent
            ));
        }
        if self.queue_capacity > MAX_QUEUE {
            problems.push(format!("queue_capacity is {}, more than {MAX_QUEUE}", self.queue_capacity));
        }
        let mut tenants: Vec<_> = self.tenant_quotas.keys().collect();
        tenants.sort();
        for tenant in tenants {
            if tenant.is_empty() {
                problems.push("tenant_quotas has an empty tenant name".into());
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
    }

    /// The quota that applies to `tenant`.
    pub fn quota(&self, tenant: &str) -> Quota {
        // Placing a shared lease asks this for every lease on every GPU it
        // may join: skip hashing the name when no tenant has its own.
        if self.tenant_quotas.is_empty() {
            return self.default_quota;
        }
        self.tenant_quotas.get(tenant).copied().unwrap_or(self.default_quota)
    }
}

/// A queued request's place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// A queued request that has been granted a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The ticket [`Pool::allocate`](super::Pool::allocate) returned.
    pub ticket: Ticket,
    /// The lease granted to it.
    pub lease: Lease,
}

/// What [`Pool::allocate`](super::Pool::allocate) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    /// Granted now.
    Granted(Lease),
    /// Queued; a later call returns a [`Grant`] for this ticket, or the caller
    /// gives up with [`Pool::cancel`](super::Pool::cancel).
    Queued(Ticket),
}

/// A lease's claims, as its signed token states them, to take back after a
/// balancer restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopt {
    /// The lease's id.
    pub id: LeaseId,
    /// Its tenant.
    pub tenant: String,
    /// Its server.
    pub server_id: String,
    /// Its instance.
    pub instance_uuid: String,
    /// Its instance's memory when granted; a shared lease's part of it.
    pub memory: u64,
    /// Exclusive or shared.
    pub class: LeaseClass,
    /// A shared lease's compute percent.
    pub compute_percent: u32,
    /// When it was granted.
    pub issued_ms: u64,
    /// When it ends unless renewed.
    pub expires_ms: u64,
}

#[cfg(test)]
impl Adopt {
    /// The claims a token of `lease` states.
    pub(crate) fn of(lease: &Lease) -> Self {
        Self {
            id: lease.id,
            tenant: lease.tenant.clone(),
            server_id: lease.server_id.clone(),
            instance_uuid: lease.instance_uuid.clone(),
            memory: lease.memory,
            class: lease.class,
            compute_percent: lease.compute_percent,
            issued_ms: lease.issued_ms,
            expires_ms: lease.expires_ms,
        }
    }
}

/// A server's heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Load {
    /// Sessions open now.
    pub sessions: u32,
    /// Device memory in use by sessions, in bytes.
    pub memory_used: u64,
    /// Leases of the sessions open now.
    pub live_leases: Vec<LeaseId>,
    /// Measured busy time by GPU uuid, in thousandths of the interval;
    /// GPUs left out keep their last value.
    pub gpu_busy: Vec<(String, u32)>,
    /// Shared sessions whose fault ended their MPS group on the server, since
    /// it started (issue 19).
    pub group_faults: u64,
}

/// What happened since the last [`Pool::tick`](super::Pool::tick) (events
/// caused by other calls' time are reported here too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tick {
    /// Leases that reached their expiry unrenewed.
    pub expired: Vec<LeaseId>,
    /// Leases that ended because their server was drained or re-registered
    /// without their instance.
    pub lost: Vec<LeaseId>,
    /// Servers drained for missing their heartbeats.
    pub drained: Vec<String>,
    /// Queued requests granted and not yet returned by another call.
    pub grants: Vec<Grant>,
    /// The recovery window ended.
    pub recovery_ended: bool,
}

impl Tick {
    /// Whether anything happened.
    pub fn changed(&self) -> bool {
        !(self.expired.is_empty()
            && self.lost.is_empty()
            && self.drained.is_empty()
            && self.grants.is_empty()
            && !self.recovery_ended)
    }
}

/// Totals since the pool started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Leases granted (immediately or from the queue).
    pub allocations: u64,
    /// Leases released by their holders.
    pub releases: u64,
    /// Leases that expired unrenewed.
    pub expirations: u64,
    /// Leases lost with their server or instance.
    pub lost: u64,
    /// Leases taken back after a restart.
    pub adoptions: u64,
    /// Requests queued.
    pub queued: u64,
    /// Queued requests cancelled (timed out or given up).
    pub cancelled: u64,
    /// MIG GPUs ordered to be laid out anew (dynamic layouts).
    pub relayouts: u64,
    /// Shared leases moved off busy GPUs ([`Pool::rebalance`](super::Pool::rebalance)).
    pub rebalanced: u64,
}

/// The whole pool, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// Placement policy.
    pub policy: Policy,
    /// Whether the recovery window is still open.
    pub recovering: bool,
    /// Servers in registration order.
    pub servers: Vec<ServerView>,
    /// Leases by issue time, then id.
    pub leases: Vec<Lease>,
    /// Leases whose session did not move at their last order to move,
    /// with the reason (they stay where they were).
    pub move_refused: std::collections::BTreeMap<LeaseId, String>,
    /// Waiting requests, first in line first.
    pub queue: Vec<QueueEntry>,
    /// Totals.
    pub counters: Counters,
    /// Instances registered.
    pub instances: usize,
    /// Instances not leased.
    pub free_instances: usize,
}

/// One server in the [`PoolView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerView {
    /// Server id.
    pub id: String,
    /// QUIC address.
    pub address: String,
    /// Hex SHA-256 of its certificate.
    pub cert_sha256: String,
    /// When it (last) registered.
    pub registered_ms: u64,
    /// Milliseconds since its last heartbeat or registration.
    pub heartbeat_age_ms: u64,
    /// Sessions open at its last heartbeat.
    pub sessions: u32,
    /// Device memory in use at its last heartbeat.
    pub memory_used: u64,
    /// Leases on its instances.
    pub leases: u32,
    /// Being drained: nothing new is placed on it.
    pub draining: bool,
    /// Its GPUs as registered.
    pub gpus: Vec<GpuView>,
    /// MPS group faults it reported (since it started).
    pub group_faults: u64,
}

/// One GPU in the [`PoolView`]: as its server registered it, with the
/// lease holding each instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuView {
    pub spec: GpuSpec,
    /// The lease holding each of `spec.instances` alone, in the same order.
    pub leases: Vec<Option<LeaseId>>,
    /// Shared leases on the whole GPU (MIG off), in placement order.
    pub shared: Vec<LeaseId>,
    /// Sum of their compute percents (at most 100).
    pub shared_percent: u32,
    /// Busy time at the last heartbeat, in thousandths.
    pub busy_permille: u32,
}

impl GpuView {
    /// Each instance with the lease holding it.
    pub fn instances(&self) -> impl Iterator<Item = (&InstanceSpec, Option<LeaseId>)> {
        self.spec.instances.iter().zip(self.leases.iter().copied())
    }
}

/// One waiting request in the [`PoolView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// Its ticket.
    pub ticket: Ticket,
    /// The request.
    pub request: Request,
    /// How long it has waited.
    pub waited_ms: u64,
}

/// Why a pool operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No registered instance could ever satisfy the request (too much memory
    /// or compute, or a profile no server has).
    #[error("no registered instance can satisfy the request: {reason}")]
    Unsatisfiable {
        /// What could not be met.
        reason: String,
    },
    /// Nothing free fits now and the caller does not wait.
    #[error("no free instance fits the request now")]
    Exhausted,
    /// Granting would take the tenant over its quota.
    #[error("tenant {tenant:?} would exceed its quota: {reason}")]
    QuotaExceeded {
        /// The tenant.
        tenant: String,
        /// Which limit.
        reason: String,
    },
    /// The wait queue is full.
    #[error("the wait queue is full")]
    QueueFull,
    /// No such lease (never granted, released, or forgotten).
    #[error("unknown lease {0}")]
    UnknownLease(LeaseId),
    /// The lease expired, or was lost with its server.
    #[error("lease {0} has expired")]
    LeaseExpired(LeaseId),
    /// The lease ended in this pool's lifetime (released, expired or lost)
    /// and cannot be taken back.
    #[error("lease {0} has ended and cannot be taken back")]
    LeaseEnded(LeaseId),
    /// No such server registered (or it was drained): it should register.
    #[error("unknown server {0:?}")]
    UnknownServer(String),
    /// The server has no such instance.
    #[error("server {server:?} has no instance {instance:?}")]
    UnknownInstance {
        /// The server.
        server: String,
        /// The instance uuid.
        instance: String,
    },
    /// The instance is held by another lease.
    #[error("instance {instance:?} is held by lease {lease}")]
    Conflict {
        /// The lease holding the instance.
        lease: LeaseId,
        /// The instance.
        instance: String,
    },
    /// The request or registration is malformed (every problem is listed).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Leases cannot move while the pool rebuilds its state after a start.
    #[error("the balancer is still taking leases back after its start; try again")]
    Recovering,
}

/// What draining a server set in motion ([`super::Pool::drain_server`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainPlan {
    /// Leases moved to instances on other servers: their sessions are to
    /// migrate there (ordered at the server's next heartbeat).
    pub moving: Vec<LeaseId>,
    /// Leases that found no free instance elsewhere: they stay for now.
    pub stuck: Vec<LeaseId>,
}
