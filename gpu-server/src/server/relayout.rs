//! Lays out an idle MIG GPU anew when the balancer orders it (dynamic MIG
//! layouts, `gpupool-balancer serve --mig-policy dynamic`): the GPU's
//! instances leave service (refused when a session runs on one), their warm
//! workers stop, NVML destroys them and creates the new layout (as
//! `--mig-layout` does at start), and the instances found afterwards are
//! served by new worker pools. The link then registers again, so the
//! balancer places leases on the new instances. Whatever happens, the
//! server ends up serving the instances its GPU has.

use super::state::{Shared, Workers};
use crate::mig::{MigError, Planner};
use gpupool_proto::balancer as pb;
use std::sync::Arc;
use std::time::Duration;

/// Most profiles a layout can have (7 compute slices).
const MAX_PROFILES: usize = 7;
/// Longest profile name accepted from the wire.
const MAX_NAME: usize = 32;
/// Tries while the instances' processes (stopped warm workers) are still
/// going, and the wait between tries.
const IN_USE_TRIES: u32 = 50;
const IN_USE_WAIT: Duration = Duration::from_millis(100);

/// Carries out `order`; `Err` says why the layout is not the one ordered.
pub(super) async fn relayout(
    shared: &Arc<Shared>,
    workers: &Arc<Workers>,
    order: &pb::RelayoutOrder,
) -> Result<(), String> {
    let Some(ctl) = shared.config.mig_control.clone() else {
        return Err(
            "this server's instances do not come from NVML (--instances device): it cannot lay out a GPU".into()
        );
    };
    if order.profiles.len() > MAX_PROFILES || order.profiles.iter().any(|p| p.is_empty() || p.len() > MAX_NAME) {
        return Err(format!("a layout of at most {MAX_PROFILES} profile names is expected"));
    }
    let gpu = shared.served_gpus().iter().find(|g| g.uuid == order.gpu_uuid).cloned();
    let Some(gpu) = gpu else { return Err(format!("no GPU {} is served here", order.gpu_uuid)) };
    if !gpu.mig {
        return Err(format!("MIG is off on GPU {}", gpu.uuid));
    }
    // Out of service first, so that no session lands on them meanwhile.
    let uuids: Vec<String> = gpu.instances.iter().map(|i| i.uuid.clone()).collect();
    let old = workers.withdraw(&uuids);
    if let Some(busy) = old.iter().find(|s| s.pool.snapshot().iter().any(|w| w.session.is_some())) {
        let why = format!("a session runs on instance {}", busy.uuid);
        workers.add(old);
        return Err(why);
    }
    for s in &old {
        s.pool.close();
    }
    tracing::info!(gpu = gpu.index, uuid = %gpu.uuid, layout = ?order.profiles, "laying out a MIG GPU anew");
    let (index, profiles) = (gpu.index, order.profiles.clone());
    let control = ctl.clone();
    let applied = tokio::task::spawn_blocking(move || {
        let mut tries = 0;
        loop {
            // The warm workers just stopped may still hold their contexts.
            match Planner::new(control.as_ref()).apply(index, &profiles, &|_| false) {
                Err(MigError::InUse { .. }) if tries < IN_USE_TRIES => {
                    tries += 1;
                    std::thread::sleep(IN_USE_WAIT);
                }
                Err(e) => return Err(e.to_string()),
                Ok(report) if report.converged => return Ok(()),
                Ok(report) if tries < IN_USE_TRIES => {
                    tracing::debug!(unmet = ?report.unmet, "MIG layout not there yet; trying again");
                    tries += 1;
                    std::thread::sleep(IN_USE_WAIT);
                }
                Ok(report) => return Err(format!("only partly laid out: {:?} not created", report.unmet)),
            }
        }
    })
    .await
    .unwrap_or_else(|e| Err(format!("the MIG task failed: {e}")));
    // Serve what the GPU has now, laid out or not.
    let found = tokio::task::spawn_blocking(move || crate::mig::discover(ctl.as_ref()))
        .await
        .map_err(|e| format!("the MIG task failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    let now = match found {
        Ok(gpus) => gpus.into_iter().find(|g| g.uuid == gpu.uuid),
        Err(e) => {
            tracing::error!(error = %e, "cannot list the GPU's instances after a re-layout; it serves none");
            None
        }
    };
    let instances = now.as_ref().map(|g| g.instances.clone()).unwrap_or_default();
    let served: Vec<_> = instances.iter().map(|i| super::serve_instance(&shared.config, &workers.recipe, i)).collect();
    for s in &served {
        let (pool, uuid) = (s.pool.clone(), s.uuid.clone());
        tokio::spawn(async move {
            match pool.probe().await {
                Ok(_) => pool.fill(),
                Err(e) => tracing::error!(instance = %uuid, error = %e, "the new instance's workers cannot start"),
            }
        });
    }
    workers.add(served);
    {
        let mut gpus = shared.served_gpus();
        if let Some(g) = gpus.iter_mut().find(|g| g.uuid == gpu.uuid) {
            g.instances = instances;
        }
        let all = gpus.iter().flat_map(|g| &g.instances).map(|i| i.uuid.clone()).collect();
        shared.auth.set_instances(all);
    }
    match &applied {
        Ok(()) => tracing::info!(uuid = %gpu.uuid, "MIG GPU laid out anew"),
        Err(e) => tracing::warn!(uuid = %gpu.uuid, error = %e, "MIG GPU not laid out as ordered"),
    }
    applied
}
