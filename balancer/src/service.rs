//! The gRPC service around the [`Pool`]: converts protobuf at the edge,
//! signs leases, parks `Allocate` calls that wait in the queue, and runs the
//! ticker that expires leases and drains silent servers.
//!
//! All pool state sits behind one mutex held only for pool operations
//! (microseconds; no await while held). A waiting `Allocate` holds a oneshot
//! receiver registered under the same lock, so a grant made by any other
//! call is handed over exactly once: to the waiter, or, when the waiter has
//! gone (timeout, cancelled call), straight back to the pool.

use crate::config::{BalancerConfig, LegacyClients};
use crate::convert;
use crate::pool::{self, Allocation, Grant, Pool, PoolError, Ticket};
use crate::tenants::constant_time_eq;
use gpupool_proto::balancer as pb;
use gpupool_proto::balancer::balancer_server::{Balancer as BalancerRpc, BalancerServer};
use gpupool_proto::lease::{LeaseSigner, LeaseVerifier, unix_ms_now};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status};

/// Largest request message the balancer decodes.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Why the balancer could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// A setting is invalid (every problem is listed).
    #[error("invalid balancer configuration: {0}")]
    Config(String),
    /// The gRPC listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// The certificate, key or client CA is unusable.
    #[error("TLS setup failed: {0}")]
    Tls(#[from] gpupool_proto::tls::TlsError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(String),
}

/// Pool and parked waiters, under one lock.
#[derive(Debug)]
struct Inner {
    pool: Pool,
    waiters: HashMap<Ticket, oneshot::Sender<pool::Lease>>,
}

/// What every request handler shares.
#[derive(Debug)]
struct State {
    inner: Mutex<Inner>,
    signer: LeaseSigner,
    verifier: LeaseVerifier,
    config: BalancerConfig,
    /// Bumped on every change; `Watch` streams follow it.
    version: watch::Sender<u64>,
    queue_timeouts: AtomicU64,
    /// Refusals and grant times, for the metrics endpoint.
    allocations: crate::exporter::Allocations,
    /// The tenants' credentials now: `config.clients.tenants` at start,
    /// replaced by [`TenantsHandle::replace`] (a reloaded file).
    tenants: RwLock<Arc<crate::tenants::Tenants>>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn renew_interval_ms(&self) -> u64 {
        (self.config.pool.lease_ttl_ms / 3).max(1)
    }

    /// The lease as the client sees it, with a freshly signed token.
    fn lease_reply(&self, lease: &pool::Lease) -> pb::Lease {
        let claims = pb::LeaseClaims {
            lease_id: lease.id.0,
            tenant: lease.tenant.clone(),
            server_id: lease.server_id.clone(),
            instance_uuid: lease.instance_uuid.clone(),
            memory_bytes: lease.memory,
            issued_unix_ms: lease.issued_ms,
            expires_unix_ms: lease.expires_ms,
            // The operator's policy (`--allow-rdma`), signed with the lease.
            allow_rdma: self.config.allow_rdma.allows(&lease.tenant),
            class: convert::class_to_proto(lease.class).into(),
            compute_percent: lease.compute_percent,
        };
        pb::Lease {
            lease_id: lease.id.0,
            tenant: lease.tenant.clone(),
            server_id: lease.server_id.clone(),
            address: lease.address.clone(),
            cert_sha256: lease.cert_sha256.clone(),
            instance_uuid: lease.instance_uuid.clone(),
            profile: lease.profile.as_ref().map(convert::profile_to_proto),
            memory_bytes: lease.memory,
            multiprocessors: lease.sms,
            expires_unix_ms: lease.expires_ms,
            renew_interval_ms: self.renew_interval_ms() as u32,
            token: self.signer.sign(&claims),
            class: convert::class_to_proto(lease.class).into(),
            compute_percent: lease.compute_percent,
        }
    }

    fn check_secret<T>(&self, req: &Request<T>, secret: &str) -> Result<(), Status> {
        let presented = bearer(req).unwrap_or("");
        if constant_time_eq(presented.as_bytes(), secret.as_bytes()) {
            Ok(())
        } else if presented.is_empty() {
            Err(Status::unauthenticated("no secret presented (authorization: Bearer …)"))
        } else {
            Err(Status::unauthenticated("secret not accepted"))
        }
    }

    fn check_server<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let wants_certificate = self.config.tls.as_ref().is_some_and(|t| t.server_client_ca.is_some());
        // rustls verified any certificate presented against the CA.
        if wants_certificate && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "this balancer requires gpu-servers to present a client certificate from its CA",
            ));
        }
        self.check_secret(req, &self.config.server_secret)
    }

    /// Who sent a client request, by its credential. The servers' secret
    /// counts (as the operator) only where `operator` allows: it reads the
    /// whole pool but leases nothing.
    fn caller<T>(&self, req: &Request<T>, operator: bool) -> Result<Caller, Status> {
        let clients = &self.config.clients;
        let presented = bearer(req);
        if let Some(p) = presented {
            let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner()).clone();
            // Every tenant's digest is compared whatever the outcome, and so
            // is the servers' secret: the time does not tell which matched.
            let tenant = tenants.authenticate(p);
            let is_operator = constant_time_eq(p.as_bytes(), self.config.server_secret.as_bytes());
            if let Some(t) = tenant {
                return Ok(Caller::Tenant(t.to_owned()));
            }
            if is_operator {
                return if operator {
                    Ok(Caller::Operator)
                } else {
                    Err(Status::permission_denied(
                        "the servers' secret reads the pool but leases nothing: present a tenant's credential",
                    ))
                };
            }
        }
        match (&clients.legacy, presented) {
            (Some(LegacyClients::Anonymous), _) => Ok(Caller::Legacy),
            (Some(LegacyClients::SharedSecret(s)), Some(p)) if constant_time_eq(p.as_bytes(), s.as_bytes()) => {
                Ok(Caller::Legacy)
            }
            (_, None) => Err(Status::unauthenticated(
                "no credential presented (authorization: Bearer <the tenant's secret>, GPUPOOL_BALANCER_SECRET)",
            )),
            (_, Some(_)) => Err(Status::unauthenticated("credential not accepted")),
        }
    }

    /// Verifies a lease token presented for `lease_id`.
    fn claims(&self, token: &str, lease_id: u64) -> Result<pb::LeaseClaims, Status> {
        let claims = self.verifier.verify_signature(token).map_err(|e| Status::unauthenticated(e.to_string()))?;
        if claims.lease_id != lease_id {
            return Err(Status::invalid_argument(format!(
                "token is for lease {:#x}, not {lease_id:#x}",
                claims.lease_id
            )));
        }
        Ok(claims)
    }
}

/// `authorization: Bearer <credential>`, when present.
fn bearer<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|v| !v.is_empty())
}

/// Who a client request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Caller {
    /// A tenant by its own credential: it leases for itself only, renews
    /// and releases only its own leases, and sees only those.
    Tenant(String),
    /// A legacy client (a shared secret, or none; explicit opt-ins): it
    /// names any tenant and sees the whole pool, as before tenants had
    /// credentials of their own.
    Legacy,
    /// The fleet's operator (the servers' secret): sees the whole pool.
    Operator,
}

impl Caller {
    /// The tenant an `Allocate` that asked for `asked` is for.
    fn tenant_for(&self, asked: &str) -> Result<String, Status> {
        match self {
            Self::Tenant(t) if asked.is_empty() || asked == t => Ok(t.clone()),
            // `asked` passed the name check: bounded, printable.
            Self::Tenant(t) => Err(Status::permission_denied(format!(
                "this credential is tenant {t:?}'s: it cannot allocate for tenant {asked:?}"
            ))),
            // What clients sent before the tenant could come from the
            // credential (GPUPOOL_TENANT's old default).
            Self::Legacy if asked.is_empty() => Ok("default".into()),
            Self::Legacy => Ok(asked.to_owned()),
            Self::Operator => Err(Status::permission_denied("the operator's credential leases nothing")),
        }
    }

    /// Refuses a lease (by its verified claims) that is not the caller's.
    fn check_owns(&self, claims: &pb::LeaseClaims) -> Result<(), Status> {
        match self {
            Self::Tenant(t) if *t != claims.tenant => Err(Status::permission_denied(format!(
                "lease {:#x} is not tenant {t:?}'s: a tenant renews and releases only its own leases",
                claims.lease_id
            ))),
            _ => Ok(()),
        }
    }

    /// The part of the pool's status this caller may see.
    fn scope(&self, mut status: pb::PoolStatus) -> pb::PoolStatus {
        if let Self::Tenant(t) = self {
            // Servers (addresses, pins, load) and pool-wide counters are the
            // operator's; a tenant sees what it holds and waits for.
            status.servers.clear();
            status.leases.retain(|l| l.tenant == *t);
            status.queue.retain(|q| q.tenant == *t);
            (status.allocations, status.releases, status.expirations, status.queue_timeouts) = (0, 0, 0, 0);
            status.tenant = t.clone();
        }
        status
    }
}

/// Hands `grants`, and those the pool made while catching up on time inside
/// the last call, to their waiters. A grant whose waiter is gone goes back to
/// the pool, which may grant the capacity to the next waiter. Every pool call
/// that can free capacity is followed by this.
fn deliver(inner: &mut Inner, grants: Vec<Grant>) {
    let mut work = grants;
    work.extend(inner.pool.take_grants());
    while let Some(grant) = work.pop() {
        let undelivered = match inner.waiters.remove(&grant.ticket) {
            Some(tx) => tx.send(grant.lease).err(),
            None => Some(grant.lease),
        };
        if let Some(lease) = undelivered {
            match inner.pool.release(lease.id) {
                Ok(more) => work.extend(more),
                Err(e) => tracing::warn!(lease = lease.id.0, error = %e, "returning an undelivered grant"),
            }
        }
    }
}

/// The error a client sees for a pool error.
fn status(e: PoolError) -> Status {
    let msg = e.to_string();
    match e {
        PoolError::Unsatisfiable { .. } => Status::failed_precondition(msg),
        PoolError::Exhausted | PoolError::QueueFull | PoolError::QuotaExceeded { .. } => {
            Status::resource_exhausted(msg)
        }
        PoolError::UnknownLease(_) | PoolError::UnknownServer(_) | PoolError::UnknownInstance { .. } => {
            Status::not_found(msg)
        }
        PoolError::LeaseExpired(_) | PoolError::LeaseEnded(_) => Status::failed_precondition(msg),
        PoolError::Conflict { .. } => Status::aborted(msg),
        PoolError::InvalidRequest(_) => Status::invalid_argument(msg),
        PoolError::Recovering => Status::unavailable(msg),
    }
}

/// A parked `Allocate`: if its call goes away before the grant arrives, the
/// ticket leaves the queue, and a grant already made goes back to the pool.
struct Waiting {
    state: Arc<State>,
    ticket: Ticket,
    rx: Option<oneshot::Receiver<pool::Lease>>,
}

impl Waiting {
    /// Ends the wait: the ticket leaves the queue, or, when the grant was
    /// made meanwhile (under the lock, so exactly one of the two holds), the
    /// granted lease.
    fn finish(&mut self) -> Option<pool::Lease> {
        let mut rx = self.rx.take()?;
        let mut inner = self.state.lock();
        let lease = if inner.pool.cancel(self.ticket) {
            inner.waiters.remove(&self.ticket);
            None
        } else {
            rx.try_recv().ok()
        };
        drop(inner);
        self.state.changed();
        lease
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(lease) = self.finish() {
            let mut inner = self.state.lock();
            let grants = inner.pool.release(lease.id).unwrap_or_default();
            deliver(&mut inner, grants);
        }
    }
}

/// The tonic service.
#[derive(Debug, Clone)]
struct Service {
    state: Arc<State>,
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::PoolStatus, Status>> + Send>>;

impl Service {
    /// `Allocate` without its bookkeeping: a lease now, after a wait in the
    /// queue, or the reason there is none.
    async fn allocate_lease(&self, req: Request<pb::AllocateRequest>) -> Result<Response<pb::Lease>, Status> {
        let caller = self.state.caller(&req, false)?;
        let req = req.into_inner();
        let wait = Duration::from_millis(u64::from(req.wait_timeout_ms)).min(self.state.config.max_wait);
        let mut request = convert::request(&req)?;
        // The credential, not the request, says who pays (issue 20,
        // finding 10).
        request.tenant = caller.tenant_for(&request.tenant)?;
        let (ticket, rx) = {
            let mut inner = self.state.lock();
            let allocated = inner.pool.allocate(request, unix_ms_now(), !wait.is_zero());
            // Catching up on time may have freed capacity for earlier waiters.
            deliver(&mut inner, Vec::new());
            match allocated.map_err(status)? {
                Allocation::Granted(lease) => {
                    drop(inner);
                    self.state.changed();
                    return Ok(Response::new(self.state.lease_reply(&lease)));
                }
                Allocation::Queued(ticket) => {
                    let (tx, rx) = oneshot::channel();
                    inner.waiters.insert(ticket, tx);
                    (ticket, rx)
                }
            }
        };
        self.state.changed();
        let queued = std::time::Instant::now();
        let mut waiting = Waiting { state: self.state.clone(), ticket, rx: Some(rx) };
        let rx = waiting.rx.as_mut().expect("receiver present until the wait ends");
        let waited = tokio::time::timeout(wait, rx).await;
        self.state.allocations.waited(queued.elapsed().as_secs_f64());
        let lease = match waited {
            Ok(Ok(lease)) => lease,
            Ok(Err(_)) => return Err(Status::internal("the grant was lost")),
            // Granted while the wait ran out, or not at all.
            Err(_) => match waiting.finish() {
                Some(lease) => lease,
                None => {
                    self.state.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err(Status::resource_exhausted(format!(
                        "no instance fits the request within its wait of {} ms",
                        wait.as_millis()
                    )));
                }
            },
        };
        waiting.rx = None;
        Ok(Response::new(self.state.lease_reply(&lease)))
    }
}

#[tonic::async_trait]
impl BalancerRpc for Service {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterReply>, Status> {
        self.state.check_server(&req)?;
        let req = req.into_inner();
        let spec = convert::server_spec(&req).map_err(Status::invalid_argument)?;
        let server_id = spec.id.clone();
        let now = unix_ms_now();
        let mut refused = Vec::new();
        {
            let mut inner = self.state.lock();
            let grants = inner.pool.register(spec, now).map_err(status)?;
            let recovering = inner.pool.recovering(now);
            for token in &req.live_leases {
                let adopted = match self.state.verifier.verify_signature(token) {
                    Ok(c) if c.server_id != server_id => Err(format!("lease is for server {}", c.server_id)),
                    Ok(c) => match inner.pool.lease(pool::LeaseId(c.lease_id)) {
                        Some(_) => Ok(()),
                        None if !recovering => Err("lease ended".into()),
                        None => {
                            // The server holds the token its client first
                            // presented; renewals since then happened here and
                            // were lost with the restart. A live session
                            // vouched for by its (authenticated) server gets a
                            // fresh lifetime; its holder's renewals take over.
                            let mut adopt = convert::adopt(&c);
                            adopt.expires_ms = adopt.expires_ms.max(now + self.state.config.pool.lease_ttl_ms);
                            inner.pool.adopt(adopt, now).map(drop).map_err(|e| e.to_string())
                        }
                    },
                    Err(e) => Err(e.to_string()),
                };
                if let Err(reason) = adopted {
                    tracing::info!(server = %server_id, %reason, "live lease not taken back");
                    refused.push(token.clone());
                }
            }
            deliver(&mut inner, grants);
        }
        tracing::info!(server = %server_id, address = %req.address, gpus = req.gpus.len(), "server registered");
        self.state.changed();
        Ok(Response::new(pb::RegisterReply {
            heartbeat_interval_ms: self.state.config.heartbeat_interval.as_millis() as u32,
            lease_public_key: self.state.signer.public_key_hex(),
            refused_leases: refused,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatReply>, Status> {
        self.state.check_server(&req)?;
        let req = req.into_inner();
        let load = pool::Load {
            sessions: req.sessions,
            memory_used: req.memory_used_bytes,
            live_leases: req.live_lease_ids.iter().map(|&id| pool::LeaseId(id)).collect(),
            gpu_busy: req.gpu_loads.iter().map(|g| (g.uuid.clone(), g.busy_permille)).collect(),
            group_faults: req.mps_group_faults,
        };
        let (ended, orders, relayouts) = {
            let mut inner = self.state.lock();
            for m in &req.migrations {
                let outcome = if m.error.is_empty() { Ok(()) } else { Err(m.error.clone()) };
                match inner.pool.migrated(&req.server_id, pool::LeaseId(m.lease_id), outcome) {
                    Some(back) => tracing::warn!(
                        lease = %pool::LeaseId(m.lease_id),
                        server = req.server_id,
                        reason = m.error,
                        back,
                        "a session did not migrate; it stays on its server (back: its lease too)"
                    ),
                    None => {
                        tracing::info!(lease = %pool::LeaseId(m.lease_id), from = req.server_id, "session migrated")
                    }
                }
            }
            let now = unix_ms_now();
            let ended = inner.pool.heartbeat(&req.server_id, load, now);
            let orders = inner.pool.take_orders(&req.server_id, now);
            let relayouts = inner.pool.take_relayouts(&req.server_id);
            deliver(&mut inner, Vec::new());
            (ended.map_err(status)?, orders, relayouts)
        };
        for r in &req.relayouts {
            if r.error.is_empty() {
                tracing::info!(server = req.server_id, gpu = r.gpu_uuid, "MIG GPU laid out anew");
            } else {
                tracing::warn!(server = req.server_id, gpu = r.gpu_uuid, reason = r.error, "MIG GPU not laid out anew");
            }
        }
        let migrations = orders.iter().map(|l| pb::MigrationOrder { lease: Some(self.state.lease_reply(l)) }).collect();
        Ok(Response::new(pb::HeartbeatReply {
            ended_lease_ids: ended.into_iter().map(|id| id.0).collect(),
            migrations,
            relayouts: relayouts
                .into_iter()
                .map(|r| pb::RelayoutOrder { gpu_uuid: r.gpu_uuid, profiles: r.profiles })
                .collect(),
        }))
    }

    async fn check_lease(&self, req: Request<pb::CheckLeaseRequest>) -> Result<Response<pb::CheckLeaseReply>, Status> {
        self.state.check_server(&req)?;
        let req = req.into_inner();
        let now = unix_ms_now();
        let state = {
            let inner = self.state.lock();
            lease_state(inner.pool.lease(pool::LeaseId(req.lease_id)), inner.pool.recovering(now), &req.server_id, now)
        };
        Ok(Response::new(pb::CheckLeaseReply { state: state as i32 }))
    }

    async fn allocate(&self, req: Request<pb::AllocateRequest>) -> Result<Response<pb::Lease>, Status> {
        let start = std::time::Instant::now();
        let answer = self.allocate_lease(req).await;
        match &answer {
            Ok(_) => self.state.allocations.granted(start.elapsed().as_secs_f64()),
            Err(e) => self.state.allocations.refused(e.code()),
        }
        answer
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::Lease>, Status> {
        let caller = self.state.caller(&req, false)?;
        let req = req.into_inner();
        let claims = self.state.claims(&req.token, req.lease_id)?;
        caller.check_owns(&claims)?;
        let now = unix_ms_now();
        let lease = {
            let mut inner = self.state.lock();
            let id = pool::LeaseId(req.lease_id);
            let renewed = match inner.pool.renew(id, now) {
                Err(PoolError::UnknownLease(_)) if inner.pool.recovering(now) => {
                    // A lease granted before a restart, presented by its holder.
                    let adopted = inner.pool.adopt(convert::adopt(&claims), now);
                    if adopted.is_ok() {
                        tracing::info!(lease = req.lease_id, "lease taken back from its holder");
                    }
                    adopted.and_then(|_| inner.pool.renew(id, now))
                }
                other => other,
            };
            let recovering = inner.pool.recovering(now);
            deliver(&mut inner, Vec::new());
            match renewed {
                Ok(lease) => lease,
                // Its server has not registered again yet: worth a retry.
                Err(PoolError::UnknownServer(server)) if recovering => {
                    return Err(Status::unavailable(format!(
                        "the balancer is recovering and server {server:?} has not registered again yet; retry"
                    )));
                }
                Err(e) => return Err(status(e)),
            }
        };
        self.state.changed();
        Ok(Response::new(self.state.lease_reply(&lease)))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseReply>, Status> {
        let caller = self.state.caller(&req, false)?;
        let req = req.into_inner();
        caller.check_owns(&self.state.claims(&req.token, req.lease_id)?)?;
        {
            let mut inner = self.state.lock();
            let grants = inner.pool.release(pool::LeaseId(req.lease_id)).map_err(status)?;
            deliver(&mut inner, grants);
        }
        self.state.changed();
        Ok(Response::new(pb::ReleaseReply {}))
    }

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainReply>, Status> {
        // Moving every session of a server is the fleet's operators' call.
        self.state.check_secret(&req, &self.state.config.server_secret)?;
        let server_id = req.into_inner().server_id;
        let plan = {
            let mut inner = self.state.lock();
            let plan = inner.pool.drain_server(&server_id, unix_ms_now());
            deliver(&mut inner, Vec::new());
            plan.map_err(status)?
        };
        tracing::info!(server = server_id, moving = plan.moving.len(), stuck = plan.stuck.len(), "draining");
        let ids = |v: Vec<pool::LeaseId>| v.into_iter().map(|id| id.0).collect();
        Ok(Response::new(pb::DrainReply { moving: ids(plan.moving), stuck: ids(plan.stuck) }))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::PoolStatus>, Status> {
        let caller = self.state.caller(&req, true)?;
        Ok(Response::new(caller.scope(snapshot(&self.state))))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.state.caller(&req, true)?;
        // A stream outlives the call: a tenant's credential removed by a
        // reload ends it at the next update.
        let digest = bearer(&req).map(crate::tenants::CredentialDigest::of);
        let asked = Duration::from_millis(u64::from(req.into_inner().min_interval_ms));
        let interval = asked.max(self.state.config.watch_interval);
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let state = self.state.clone();
        let mut version = state.version.subscribe();
        tokio::spawn(async move {
            loop {
                if let Caller::Tenant(t) = &caller {
                    let tenants = state.tenants.read().unwrap_or_else(|e| e.into_inner()).clone();
                    if digest.as_ref().and_then(|d| tenants.tenant_of(d)) != Some(t.as_str()) {
                        let _ = tx.send(Err(Status::unauthenticated("the credential is no longer accepted"))).await;
                        return;
                    }
                }
                if tx.send(Ok(caller.scope(snapshot(&state)))).await.is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
                tokio::select! {
                    changed = version.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

fn snapshot(state: &State) -> pb::PoolStatus {
    let now = unix_ms_now();
    let view = state.lock().pool.status(now);
    let mut status = convert::status(&view);
    status.queue_timeouts = state.queue_timeouts.load(Ordering::Relaxed);
    status
}

/// Most MIG GPUs one plan lays out anew.
const MAX_RELAYOUTS: usize = 8;
/// Most shared leases one rebalance moves.
const MAX_REBALANCE_MOVES: usize = 4;

/// Expires leases, drains silent servers and serves the queue, every tick.
async fn ticker(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(state.config.tick_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut planned = tokio::time::Instant::now();
    let mut balanced = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        // Dynamic MIG layouts: idle GPUs planned anew from demand.
        let plan = state.config.mig_plan_interval.is_some_and(|every| planned.elapsed() >= every);
        // Shared leases off busy GPUs.
        let rebalance = state.config.rebalance_interval.is_some_and(|every| balanced.elapsed() >= every);
        let (tick, relayouts, moved) = {
            let mut inner = state.lock();
            let now = unix_ms_now();
            let relayouts = if plan { inner.pool.plan_layouts(MAX_RELAYOUTS, now) } else { Vec::new() };
            let moved = if rebalance { inner.pool.rebalance(MAX_REBALANCE_MOVES, now) } else { Vec::new() };
            let mut tick = inner.pool.tick(now);
            deliver(&mut inner, std::mem::take(&mut tick.grants));
            (tick, relayouts, moved)
        };
        if plan {
            planned = tokio::time::Instant::now();
        }
        if rebalance {
            balanced = tokio::time::Instant::now();
        }
        for id in &moved {
            tracing::info!(lease = %id, "shared lease moved off a busy GPU; its session migrates");
        }
        for r in &relayouts {
            tracing::info!(server = r.server_id, gpu = r.gpu_uuid, layout = ?r.profiles, "MIG GPU to be laid out anew");
        }
        if !relayouts.is_empty() || !moved.is_empty() {
            state.changed();
        }
        for server in &tick.drained {
            tracing::warn!(%server, "server missed its heartbeats: drained, its instances left the pool");
        }
        if !tick.expired.is_empty() {
            tracing::info!(count = tick.expired.len(), "leases expired");
        }
        if tick.changed() {
            state.changed();
        }
    }
}

/// A bound, not yet running, balancer.
#[derive(Debug)]
pub struct Balancer {
    listener: tokio::net::TcpListener,
    /// TLS settings for tonic and the certificate's fingerprint; `None`:
    /// plaintext.
    tls: Option<(tonic::transport::ServerTlsConfig, String)>,
    /// The Prometheus endpoint's listener, when configured.
    metrics: Option<tokio::net::TcpListener>,
    state: Arc<State>,
}

impl Balancer {
    /// Validates `config` and binds the gRPC listener. Call inside a tokio
    /// runtime.
    pub async fn bind(config: BalancerConfig) -> Result<Self, BalancerError> {
        config.validate().map_err(BalancerError::Config)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| BalancerError::Bind { addr: config.listen, source })?;
        let metrics = match config.metrics_listen {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| BalancerError::Bind { addr, source })?)
            }
            None => None,
        };
        let tls = match &config.tls {
            Some(settings) => {
                let identity = gpupool_proto::tls::Identity::load(&settings.identity)?;
                let tonic_config =
                    gpupool_proto::grpc_tls::server_config(&identity, settings.server_client_ca.as_deref())?;
                tracing::info!(fingerprint = %identity.fingerprint(), "gRPC over TLS (certificate SHA-256)");
                Some((tonic_config, identity.fingerprint()))
            }
            None => {
                tracing::warn!(
                    "gRPC in plaintext (--insecure): leases and secrets cross the network in clear; \
                     use this on a trusted network only"
                );
                None
            }
        };
        let now = unix_ms_now();
        match &config.clients.legacy {
            Some(LegacyClients::SharedSecret(_)) => tracing::warn!(
                "clients may present the shared client secret (--allow-shared-client-secret): its holders lease \
                 for any tenant and see every lease; give each tenant its own credential (--tenants)"
            ),
            Some(LegacyClients::Anonymous) => tracing::warn!(
                "clients need no credential (--allow-anonymous-clients): anyone who reaches the balancer leases \
                 for any tenant and sees every lease; give each tenant its own credential (--tenants)"
            ),
            None => {}
        }
        tracing::info!(tenants = config.clients.tenants.tenant_count(), "per-tenant client credentials");
        let mut pool_config = config.pool_config();
        if pool_config.id_seed == 0 {
            pool_config.id_seed = rand::random();
        }
        let pool = Pool::new(pool_config, now);
        let state = Arc::new(State {
            tenants: RwLock::new(Arc::new(config.clients.tenants.clone())),
            inner: Mutex::new(Inner { pool, waiters: HashMap::new() }),
            verifier: config.signer.verifier(),
            signer: config.signer.clone(),
            config,
            version: watch::channel(0).0,
            queue_timeouts: AtomicU64::new(0),
            allocations: crate::exporter::Allocations::default(),
        });
        Ok(Self { listener, tls, metrics, state })
    }

    /// A handle that replaces the tenants' credentials and quotas while the
    /// balancer runs (the binary's SIGHUP).
    pub fn tenants(&self) -> TenantsHandle {
        TenantsHandle { state: self.state.clone() }
    }

    /// The Prometheus endpoint's bound address, when there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound TCP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.state.config.listen)
    }

    /// Hex SHA-256 of the gRPC certificate (what clients pin); `None` in
    /// plaintext.
    pub fn fingerprint(&self) -> Option<&str> {
        self.tls.as_ref().map(|(_, f)| f.as_str())
    }

    /// Hex ed25519 public key servers verify leases with.
    pub fn public_key_hex(&self) -> String {
        self.state.signer.public_key_hex()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BalancerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let ticker = tokio::spawn(ticker(self.state.clone(), stop_rx.clone()));
        let exporter = self.metrics.map(|listener| {
            let state = self.state.clone();
            let mut stop = stop_rx;
            tokio::spawn(gpupool_proto::exporter::serve(
                listener,
                move || crate::exporter::render(&snapshot(&state), &state.allocations),
                async move {
                    let _ = stop.changed().await;
                },
            ))
        });
        // The builder's `tcp_nodelay` applies only to listeners it binds:
        // without it here every small reply waits for a delayed ACK (~40 ms).
        let incoming =
            tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(self.listener), |s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            });
        // Requests are small (a registration lists a server's GPUs and the
        // tokens of its live sessions); 1 MiB bounds what one can make the
        // balancer decode and keep.
        let service =
            BalancerServer::new(Service { state: self.state.clone() }).max_decoding_message_size(MAX_REQUEST_BYTES);
        let (fired_tx, fired_rx) = oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            let _ = fired_tx.send(());
        };
        let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
        if let Some((tls, _)) = self.tls {
            builder = builder.tls_config(tls).map_err(|e| BalancerError::Serve(e.to_string()))?;
        }
        let serve = builder.add_service(service).serve_with_incoming_shutdown(incoming, signal);
        let grace = self.state.config.shutdown_grace;
        // Clients keep idle HTTP/2 connections open; after the grace period
        // they are closed rather than waited for.
        let served = tokio::select! {
            r = serve => r,
            () = async move {
                if fired_rx.await.is_ok() {
                    tokio::time::sleep(grace).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::info!("connections still open after the grace period: closing them");
                Ok(())
            }
        };
        let _ = stop_tx.send(true);
        let _ = ticker.await;
        if let Some(exporter) = exporter {
            let _ = exporter.await;
        }
        served.map_err(|e| BalancerError::Serve(e.to_string()))
    }
}

/// Replaces the tenants of a running balancer ([`Balancer::tenants`]).
#[derive(Debug, Clone)]
pub struct TenantsHandle {
    state: Arc<State>,
}

impl TenantsHandle {
    /// Makes `tenants` the credentials and file quotas from now on, if the
    /// configuration with them is valid (else nothing changes). A removed
    /// credential is refused at its next call; leases held stay until
    /// released or expired, and new quotas apply to new requests.
    pub fn replace(&self, tenants: crate::tenants::Tenants) -> Result<(), BalancerError> {
        let mut config = self.state.config.clone();
        config.clients.tenants = tenants;
        config.validate().map_err(BalancerError::Config)?;
        let quotas = config.pool_config().tenant_quotas;
        let count = config.clients.tenants.tenant_count();
        // Quotas first: a new tenant's first request meets its quota.
        self.state.lock().pool.set_tenant_quotas(quotas);
        *self.state.tenants.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config.clients.tenants);
        // Watch streams look again: one whose credential went ends.
        self.state.changed();
        tracing::info!(tenants = count, "tenants' credentials replaced");
        Ok(())
    }
}

/// Binds a balancer for `config` and runs it until `shutdown` completes.
pub async fn run(config: BalancerConfig, shutdown: impl Future<Output = ()>) -> Result<(), BalancerError> {
    Balancer::bind(config).await?.run(shutdown).await
}

/// Whether a lease stands for `server_id` at `now_ms` (`CheckLease`): a
/// lease the balancer does not hold has ended, unless it is still taking
/// leases back after a restart.
pub(crate) fn lease_state(
    lease: Option<&pool::Lease>,
    recovering: bool,
    server_id: &str,
    now_ms: u64,
) -> pb::LeaseState {
    match lease {
        Some(l) if l.server_id == server_id && now_ms < l.expires_ms => pb::LeaseState::Live,
        Some(_) => pb::LeaseState::Ended,
        None if recovering => pb::LeaseState::Unknown,
        None => pb::LeaseState::Ended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_stands_only_while_held_unexpired_on_its_server() {
        let lease = pool::Lease {
            id: pool::LeaseId(1),
            tenant: "t".into(),
            server_id: "a".into(),
            address: String::new(),
            cert_sha256: String::new(),
            instance_uuid: String::new(),
            profile: None,
            memory: 0,
            sms: 0,
            class: pool::LeaseClass::Exclusive,
            compute_percent: 0,
            issued_ms: 0,
            expires_ms: 100,
            in_use: false,
        };
        assert_eq!(lease_state(Some(&lease), false, "a", 50), pb::LeaseState::Live);
        assert_eq!(lease_state(Some(&lease), false, "b", 50), pb::LeaseState::Ended, "another server");
        assert_eq!(lease_state(Some(&lease), false, "a", 100), pb::LeaseState::Ended, "expired");
        assert_eq!(lease_state(None, false, "a", 50), pb::LeaseState::Ended, "released");
        assert_eq!(lease_state(None, true, "a", 50), pb::LeaseState::Unknown, "taking leases back");
    }

    #[test]
    fn a_tenants_credential_acts_for_that_tenant_only() {
        let a = Caller::Tenant("a".into());
        assert_eq!(a.tenant_for("").unwrap(), "a", "the tenant comes from the credential");
        assert_eq!(a.tenant_for("a").unwrap(), "a");
        let refused = a.tenant_for("b").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("tenant \"a\"'s: it cannot allocate for tenant \"b\""), "{refused:?}");
        assert_eq!(Caller::Legacy.tenant_for("b").unwrap(), "b", "legacy clients name any tenant");
        assert_eq!(Caller::Legacy.tenant_for("").unwrap(), "default");
        assert_eq!(Caller::Operator.tenant_for("b").unwrap_err().code(), tonic::Code::PermissionDenied);

        let claims = |tenant: &str| pb::LeaseClaims { lease_id: 5, tenant: tenant.into(), ..Default::default() };
        assert!(a.check_owns(&claims("a")).is_ok());
        assert_eq!(a.check_owns(&claims("b")).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert!(Caller::Legacy.check_owns(&claims("b")).is_ok());
    }

    #[test]
    fn a_tenant_sees_only_its_own_leases_and_queue() {
        let lease =
            |id: u64, tenant: &str| pb::LeaseStatus { lease_id: id, tenant: tenant.into(), ..Default::default() };
        let queued = |tenant: &str| pb::QueuedRequest { tenant: tenant.into(), ..Default::default() };
        let all = pb::PoolStatus {
            servers: vec![pb::ServerStatus { server_id: "s".into(), ..Default::default() }],
            leases: vec![lease(1, "a"), lease(2, "b"), lease(3, "a")],
            queue: vec![queued("b"), queued("a")],
            allocations: 9,
            ..Default::default()
        };
        let mine = Caller::Tenant("a".into()).scope(all.clone());
        assert_eq!(mine.leases.iter().map(|l| l.lease_id).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(mine.queue.len(), 1);
        assert!(mine.servers.is_empty() && mine.allocations == 0);
        assert_eq!(mine.tenant, "a");
        assert_eq!(Caller::Operator.scope(all.clone()), all, "the operator sees the whole pool");
        assert_eq!(Caller::Legacy.scope(all.clone()), all);
    }
}
