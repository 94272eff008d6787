//! The server's side of the balancer: register the served instances, send
//! heartbeats with the sessions' leases, end the sessions of leases the
//! balancer ended, and register again whenever the balancer has forgotten
//! this server (its restart, or a drain after a network partition) — then
//! with the tokens of the live sessions, so that a restarted balancer takes
//! them back.

use super::state::Shared;
use crate::config::BalancerLink;
use crate::mig::ServedGpu;
use gpupool_proto::balancer as pb;
use gpupool_proto::balancer::balancer_client::BalancerClient;
use gpupool_proto::close_code;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Longest wait between two tries to reach the balancer.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait for one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The served GPUs as the balancer's `Register` describes them.
pub(crate) fn registration_gpus(gpus: &[ServedGpu]) -> Vec<pb::Gpu> {
    gpus.iter()
        .map(|g| pb::Gpu {
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
                    profile: i.profile.as_ref().map(|(id, name)| pb::MigProfile { id: *id, name: name.clone() }),
                    memory_bytes: i.memory,
                    multiprocessors: i.sms,
                    placement_start: i.placement.map_or(0, |p| p.0),
                    placement_size: i.placement.map_or(0, |p| p.1),
                })
                .collect(),
        })
        .collect()
}

fn authorized<T>(secret: &str, message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(CALL_TIMEOUT);
    if let Ok(v) = format!("Bearer {secret}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// Ends the sessions of leases the balancer no longer holds.
fn end_sessions(shared: &Shared, ids: impl IntoIterator<Item = u64>, why: &str) {
    let mut leased = shared.leased();
    for id in ids {
        shared.forget_resumable(id);
        if let Some(s) = leased.remove(&id) {
            tracing::info!(lease = id, why, "ending the session of an ended lease");
            s.conn.close(close_code::UNAUTHORIZED.into(), format!("lease {id:#x} {why}").as_bytes());
        }
    }
}

/// Outcomes of ordered migrations not yet reported.
type Outcomes = Arc<std::sync::Mutex<Vec<pb::MigrationResult>>>;

/// Moves the session of an order's lease to the server the lease names
/// now (the balancer drains this one); its outcome goes into `outcomes`.
fn migrate(shared: &Arc<Shared>, order: pb::MigrationOrder, outcomes: &Outcomes) {
    let Some(lease) = order.lease else { return };
    let report = {
        let outcomes = outcomes.clone();
        let lease_id = lease.lease_id;
        move |error: String| {
            outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(pb::MigrationResult { lease_id, error })
        }
    };
    let Some(session) = shared.leased().get(&lease.lease_id).map(|s| s.session_id) else {
        // No session here: the lease moves alone.
        return report(String::new());
    };
    let address = match lease.address.parse() {
        Ok(a) => a,
        Err(_) => return report(format!("the target's address {:?} is unusable", lease.address)),
    };
    let target = super::MigrationTarget {
        address,
        // The certificate is pinned; the name is not checked.
        server_name: "gpupool-server".into(),
        cert_sha256: lease.cert_sha256,
        token: lease.token,
    };
    let migrator = super::Migrator { shared: shared.clone() };
    tracing::info!(lease = lease.lease_id, session, to = %address, "the balancer moves a session");
    tokio::spawn(async move {
        let error = match migrator.migrate(session, target).await {
            Ok(m) => {
                tracing::info!(lease = lease.lease_id, pause_ms = m.pause.as_millis() as u64, "session migrated");
                String::new()
            }
            Err(e) => {
                tracing::warn!(lease = lease.lease_id, error = %e, "session not migrated; it stays here");
                e.to_string()
            }
        };
        report(error);
    });
}

/// Outcomes of ordered re-layouts not yet reported, and the signal to
/// register again once one is done.
#[derive(Default)]
struct Relayouts {
    outcomes: std::sync::Mutex<Vec<pb::RelayoutResult>>,
    done: tokio::sync::Notify,
    /// GPUs being laid out now: a second order for one is refused.
    busy: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Relayouts {
    fn report(&self, gpu_uuid: String, result: Result<(), String>) {
        let error = result.err().unwrap_or_default();
        self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(pb::RelayoutResult { gpu_uuid, error });
        self.done.notify_one();
    }

    fn take(&self) -> Vec<pb::RelayoutResult> {
        std::mem::take(&mut *self.outcomes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Lays out a MIG GPU anew as the balancer ordered (`super::relayout`),
/// off the heartbeat loop; its outcome makes the loop register again.
fn relayout(
    shared: &Arc<Shared>,
    workers: Option<&Arc<super::state::Workers>>,
    order: pb::RelayoutOrder,
    relayouts: &Arc<Relayouts>,
) {
    let Some(workers) = workers.cloned() else {
        let why = "sessions run in this process (--isolation in-process): no MIG instances to lay out";
        return relayouts.report(order.gpu_uuid, Err(why.into()));
    };
    if !relayouts.busy.lock().unwrap_or_else(|e| e.into_inner()).insert(order.gpu_uuid.clone()) {
        return relayouts.report(order.gpu_uuid, Err("the GPU is being laid out already".into()));
    }
    let (shared, relayouts) = (shared.clone(), relayouts.clone());
    tokio::spawn(async move {
        let result = super::relayout::relayout(&shared, &workers, &order).await;
        relayouts.busy.lock().unwrap_or_else(|e| e.into_inner()).remove(&order.gpu_uuid);
        relayouts.report(order.gpu_uuid, result);
    });
}

/// Keeps this server registered until `stop` turns true. `workers`: the
/// worker pools (none in-process), which re-layouts change.
pub(crate) async fn run(
    link: BalancerLink,
    fingerprint: String,
    shared: Arc<Shared>,
    workers: Option<Arc<super::state::Workers>>,
    mut stop: watch::Receiver<bool>,
) {
    let channel = match link.endpoint() {
        Ok(endpoint) => endpoint.connect_timeout(CALL_TIMEOUT).connect_lazy(),
        Err(e) => {
            tracing::error!(url = %link.url, error = %e, "cannot reach the balancer as configured; not joining the pool");
            return;
        }
    };
    let mut client = BalancerClient::new(channel);
    let mut backoff = Duration::from_millis(100);
    // Opened once: the loop registers again whenever the balancer forgets us.
    let mut busy = super::load::NvmlBusy::open();
    // Outcomes of the migrations the balancer ordered, for the next heartbeat.
    let outcomes: Outcomes = Arc::default();
    let relayouts: Arc<Relayouts> = Arc::default();
    loop {
        // What is served now (re-layouts change it).
        let gpus = registration_gpus(&shared.served_gpus());
        let live_leases = shared.leased().values().map(|s| s.token.clone()).collect();
        let register = pb::RegisterRequest {
            server_id: link.server_id.clone(),
            address: link.advertise.clone(),
            cert_sha256: fingerprint.clone(),
            gpus: gpus.clone(),
            live_leases,
            server_build: concat!("gpupool-server ", env!("CARGO_PKG_VERSION")).into(),
            swap_host_bytes: shared.config.swap.map_or(0, |s| s.host_bytes),
        };
        let interval = tokio::select! {
            r = client.register(authorized(&link.secret, register)) => match r {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if !reply.lease_public_key.eq_ignore_ascii_case(&link.lease_key) {
                        tracing::error!(
                            balancer = %reply.lease_public_key,
                            configured = %link.lease_key,
                            "the balancer signs with another key than the one configured: its leases will be refused"
                        );
                    }
                    let refused: Vec<u64> = {
                        let leased = shared.leased();
                        let refused: std::collections::HashSet<&str> =
                            reply.refused_leases.iter().map(String::as_str).collect();
                        leased.iter().filter(|(_, s)| refused.contains(s.token.as_str())).map(|(id, _)| *id).collect()
                    };
                    end_sessions(&shared, refused, "was not taken back by the balancer");
                    tracing::info!(url = %link.url, server = %link.server_id, "registered with the balancer");
                    backoff = Duration::from_millis(100);
                    Duration::from_millis(u64::from(reply.heartbeat_interval_ms).max(50))
                }
                Err(e) => {
                    tracing::warn!(url = %link.url, error = %gpupool_proto::grpc_tls::describe(&e), "cannot register with the balancer");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        // Heartbeats until the balancer forgets this server.
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.changed() => return,
                // A GPU was laid out anew (or not): the balancer learns its
                // instances from a registration.
                () = relayouts.done.notified() => break,
            }
            let (sessions, memory, ids) = {
                let leased = shared.leased();
                (leased.len() as u32, leased.values().map(|s| s.memory_used).sum(), leased.keys().copied().collect())
            };
            let migrations = std::mem::take(&mut *outcomes.lock().unwrap_or_else(|e| e.into_inner()));
            let relaid = relayouts.take();
            let beat = pb::HeartbeatRequest {
                server_id: link.server_id.clone(),
                sessions,
                memory_used_bytes: memory,
                live_lease_ids: ids,
                migrations: migrations.clone(),
                // GPUs left out (no NVML, MIG) count as idle at the balancer.
                gpu_loads: busy.as_mut().map_or_else(Vec::new, |b| super::load::gpu_loads(b, &gpus)),
                relayouts: relaid.clone(),
                mps_group_faults: shared.metrics.mps_group_faults.load(std::sync::atomic::Ordering::Relaxed),
            };
            match client.heartbeat(authorized(&link.secret, beat)).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    for order in reply.migrations {
                        migrate(&shared, order, &outcomes);
                    }
                    for order in reply.relayouts {
                        relayout(&shared, workers.as_ref(), order, &relayouts);
                    }
                    let ended = reply.ended_lease_ids;
                    if let Some(check) = &shared.lease_check {
                        check.note_ended(ended.iter().copied());
                    }
                    end_sessions(&shared, ended, "ended at the balancer")
                }
                Err(e) if e.code() == tonic::Code::NotFound => {
                    tracing::warn!(
                        "the balancer does not know this server (restarted or drained it): registering again"
                    );
                    break;
                }
                Err(e) => {
                    // Reported again with the next heartbeat.
                    outcomes.lock().unwrap_or_else(|e| e.into_inner()).extend(migrations);
                    relayouts.outcomes.lock().unwrap_or_else(|e| e.into_inner()).extend(relaid);
                    tracing::warn!(error = %gpupool_proto::grpc_tls::describe(&e), "heartbeat failed");
                }
            }
        }
    }
}
