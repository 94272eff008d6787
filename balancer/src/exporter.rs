//! The pool as a Prometheus endpoint (issue 20): `GET /metrics` on a TCP
//! listener of its own (`gpupool_proto::exporter`), off unless
//! `--metrics-listen` names an address. Each scrape renders the same
//! snapshot `gpupool-balancer status` shows: lease counters since the
//! start, leases and queue now, and per server its sessions, memory in use
//! and heartbeat age, and per tenant its leases and their memory; and what
//! the allocation path counts itself ([`Allocations`]): refusals by reason
//! and how long granted allocations took.

use gpupool_proto::balancer as pb;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;

type Labels = Vec<(String, String)>;

/// Counted by the allocation path (`Allocate`), kept across scrapes.
#[derive(Debug, Clone)]
pub struct Allocations {
    refused: Family<Labels, Counter>,
    seconds: Histogram,
    /// Time requests that queued waited, granted or not.
    queued: Histogram,
}

impl Default for Allocations {
    fn default() -> Self {
        // 100 µs to ~100 s: an immediate grant up to a long queue wait.
        let buckets = || Histogram::new(exponential_buckets(1e-4, 4.0, 11));
        Self { refused: Family::default(), seconds: buckets(), queued: buckets() }
    }
}

impl Allocations {
    /// A granted allocation that took `seconds` (queue wait included).
    pub fn granted(&self, seconds: f64) {
        self.seconds.observe(seconds);
    }

    /// A request that queued waited `seconds`, until its grant or the end
    /// of its wait.
    pub fn waited(&self, seconds: f64) {
        self.queued.observe(seconds);
    }

    /// An allocation answered with `code` instead of a lease.
    pub fn refused(&self, code: tonic::Code) {
        let reason = format!("{code:?}");
        self.refused.get_or_create(&vec![("reason".to_string(), reason)]).inc();
    }
}

fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `status` and `allocations` in Prometheus' text format.
pub fn render(status: &pb::PoolStatus, allocations: &Allocations) -> String {
    let mut r = Registry::with_prefix("gpupool_balancer");
    r.register("allocations_refused", "Allocations answered without a lease, by reason", allocations.refused.clone());
    r.register("allocation_seconds", "Time from request to lease of granted allocations", allocations.seconds.clone());
    let help = "Time requests that queued waited, until their grant or the end of their wait";
    r.register("queue_wait_seconds", help, allocations.queued.clone());
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| r.register(name, help, ConstCounter::new(v));
    let gauge = |r: &mut Registry, name: &str, help: &str, v: u64| r.register(name, help, ConstGauge::new(int(v)));
    counter(&mut r, "leases_granted", "Leases granted since the start", status.allocations);
    counter(&mut r, "leases_released", "Leases released by their holders", status.releases);
    counter(&mut r, "leases_expired", "Leases that expired without a renewal", status.expirations);
    counter(
        &mut r,
        "leases_rebalanced",
        "Shared leases moved off busy GPUs (their sessions migrated)",
        status.rebalanced,
    );
    counter(&mut r, "mig_relayouts", "MIG GPUs ordered to be laid out anew (dynamic layouts)", status.relayouts);
    counter(&mut r, "queue_timeouts", "Requests that waited in the queue past their limit", status.queue_timeouts);
    gauge(&mut r, "leases", "Leases held now", status.leases.len() as u64);
    gauge(&mut r, "leases_in_use", "Leases with a session open on their server", {
        status.leases.iter().filter(|l| l.in_use).count() as u64
    });
    gauge(&mut r, "queue_length", "Requests waiting for capacity", status.queue.len() as u64);
    let oldest = status.queue.iter().map(|q| q.waited_ms).max().unwrap_or(0);
    gauge(&mut r, "queue_oldest_wait_milliseconds", "Wait so far of the longest-waiting request", oldest);
    gauge(&mut r, "servers", "gpu-servers registered", status.servers.len() as u64);
    gauge(&mut r, "recovering", "1 while the balancer takes leases back after a start", u64::from(status.recovering));

    let per_server = |name: &str, help: &str, value: &dyn Fn(&pb::ServerStatus) -> u64, r: &mut Registry| {
        let family = Family::<Labels, Gauge>::default();
        for s in &status.servers {
            family.get_or_create(&vec![("server".to_string(), s.server_id.clone())]).set(int(value(s)));
        }
        r.register(name, help, family);
    };
    per_server("server_sessions", "Sessions open on the server", &|s| u64::from(s.sessions), &mut r);
    per_server("server_memory_used_bytes", "Device memory in use on the server", &|s| s.memory_used_bytes, &mut r);
    per_server(
        "server_heartbeat_age_milliseconds",
        "Time since the server's last heartbeat",
        &|s| s.heartbeat_age_ms,
        &mut r,
    );
    per_server("server_gpus", "GPUs the server offers", &|s| s.gpus.len() as u64, &mut r);
    per_server(
        "server_draining",
        "1 while the server is being drained (no new leases; its sessions migrate away)",
        &|s| u64::from(s.draining),
        &mut r,
    );
    per_server(
        "server_mps_group_faults",
        "Shared sessions whose fault under MPS ended their group, since the server started",
        &|s| s.mps_group_faults,
        &mut r,
    );

    // Per GPU, its leases by class (issue 19), its shares and busy time.
    let gpu_leases = Family::<Labels, Gauge>::default();
    let gpu_shared_percent = Family::<Labels, Gauge>::default();
    let gpu_busy = Family::<Labels, Gauge>::default();
    for s in &status.servers {
        for g in &s.gpu_leases {
            let gpu = || vec![("server".to_string(), s.server_id.clone()), ("gpu".to_string(), g.uuid.clone())];
            for (class, n) in [("exclusive", g.exclusive), ("shared", g.shared)] {
                let mut labels = gpu();
                labels.push(("class".to_string(), class.to_string()));
                gpu_leases.get_or_create(&labels).set(i64::from(n));
            }
            gpu_shared_percent.get_or_create(&gpu()).set(i64::from(g.shared_percent));
            gpu_busy.get_or_create(&gpu()).set(i64::from(g.busy_permille));
        }
    }
    r.register("gpu_leases", "Leases on the GPU, by class (exclusive or shared)", gpu_leases);
    r.register("gpu_shared_percent", "Sum of the compute percent of the GPU's shared leases", gpu_shared_percent);
    r.register("gpu_busy_permille", "GPU busy time at the server's last heartbeat, in thousandths", gpu_busy);

    // Tenants in a stable order.
    let mut tenants: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for l in &status.leases {
        let t = tenants.entry(l.tenant.as_str()).or_default();
        t.0 += 1;
        t.1 += l.memory_bytes;
    }
    let leases = Family::<Labels, Gauge>::default();
    let memory = Family::<Labels, Gauge>::default();
    for (tenant, (n, bytes)) in tenants {
        let labels = vec![("tenant".to_string(), tenant.to_string())];
        leases.get_or_create(&labels).set(int(n));
        memory.get_or_create(&labels).set(int(bytes));
    }
    r.register("tenant_leases", "Leases the tenant holds", leases);
    r.register("tenant_memory_bytes", "Device memory the tenant's leases hold", memory);

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_labelled_series() {
        let status = pb::PoolStatus {
            servers: vec![pb::ServerStatus {
                server_id: "gpu-a".into(),
                sessions: 2,
                memory_used_bytes: 1 << 30,
                heartbeat_age_ms: 1500,
                draining: true,
                gpu_leases: vec![pb::GpuLeases {
                    uuid: "GPU-1".into(),
                    exclusive: 0,
                    shared: 3,
                    shared_percent: 75,
                    busy_permille: 640,
                }],
                ..Default::default()
            }],
            leases: vec![
                pb::LeaseStatus { tenant: "t1".into(), memory_bytes: 4 << 30, in_use: true, ..Default::default() },
                pb::LeaseStatus { tenant: "t1".into(), memory_bytes: 2 << 30, ..Default::default() },
                pb::LeaseStatus { tenant: "t2".into(), memory_bytes: 1 << 30, ..Default::default() },
            ],
            queue: vec![pb::QueuedRequest { waited_ms: 40, ..Default::default() }],
            allocations: 9,
            expirations: 1,
            ..Default::default()
        };
        let allocations = Allocations::default();
        allocations.granted(0.002);
        allocations.refused(tonic::Code::ResourceExhausted);
        allocations.refused(tonic::Code::ResourceExhausted);
        allocations.waited(0.5);
        allocations.waited(2.0);
        let text = render(&status, &allocations);
        assert!(text.contains("gpupool_balancer_allocation_seconds_count 1"), "{text}");
        assert!(text.contains("gpupool_balancer_queue_wait_seconds_count 2"), "{text}");
        assert!(text.contains("gpupool_balancer_queue_wait_seconds_sum 2.5"), "{text}");
        assert!(text.contains("gpupool_balancer_allocations_refused_total{reason=\"ResourceExhausted\"} 2"), "{text}");
        for line in [
            "gpupool_balancer_leases_granted_total 9",
            "gpupool_balancer_leases_expired_total 1",
            "gpupool_balancer_leases 3",
            "gpupool_balancer_leases_in_use 1",
            "gpupool_balancer_queue_length 1",
            "gpupool_balancer_queue_oldest_wait_milliseconds 40",
            "gpupool_balancer_servers 1",
            "gpupool_balancer_server_sessions{server=\"gpu-a\"} 2",
            "gpupool_balancer_server_heartbeat_age_milliseconds{server=\"gpu-a\"} 1500",
            "gpupool_balancer_server_draining{server=\"gpu-a\"} 1",
            "gpupool_balancer_tenant_leases{tenant=\"t1\"} 2",
            "gpupool_balancer_tenant_memory_bytes{tenant=\"t1\"} 6442450944",
            "gpupool_balancer_tenant_leases{tenant=\"t2\"} 1",
            "gpupool_balancer_gpu_leases{server=\"gpu-a\",gpu=\"GPU-1\",class=\"shared\"} 3",
            "gpupool_balancer_gpu_leases{server=\"gpu-a\",gpu=\"GPU-1\",class=\"exclusive\"} 0",
            "gpupool_balancer_gpu_shared_percent{server=\"gpu-a\",gpu=\"GPU-1\"} 75",
            "gpupool_balancer_gpu_busy_permille{server=\"gpu-a\",gpu=\"GPU-1\"} 640",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
