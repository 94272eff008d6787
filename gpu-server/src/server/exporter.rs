//! The server's [`Metrics`] as a Prometheus endpoint (issue 20): `GET
//! /metrics` on its own TCP listener (`gpupool_proto::exporter`), off
//! unless `--metrics-listen` names an address. The counters are read at
//! each scrape (`prometheus-client` encodes them), so counting costs the
//! connection tasks and session threads nothing more than their atomics.

use super::Metrics;
use super::metrics::SessionCounts;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::net::TcpListener;

/// One family per figure of sessions by `label` (`tenant`, `instance`):
/// `<label>_sessions_active`, `_sessions_opened`, `_memory_mapped_bytes`,
/// `_calls`, `_busy_microseconds`.
fn series(r: &mut Registry, label: &str, whose: &str, counts: &BTreeMap<String, SessionCounts>) {
    let active = Family::<Vec<(String, String)>, Gauge>::default();
    let opened = Family::<Vec<(String, String)>, Counter>::default();
    let memory = Family::<Vec<(String, String)>, Gauge>::default();
    let calls = Family::<Vec<(String, String)>, Counter>::default();
    let busy = Family::<Vec<(String, String)>, Counter>::default();
    for (value, c) in counts {
        let labels = vec![(label.to_string(), value.clone())];
        active.get_or_create(&labels).set(i64::try_from(c.active).unwrap_or(i64::MAX));
        opened.get_or_create(&labels).inc_by(c.opened);
        memory.get_or_create(&labels).set(i64::try_from(c.memory).unwrap_or(i64::MAX));
        calls.get_or_create(&labels).inc_by(c.calls);
        busy.get_or_create(&labels).inc_by(c.busy_us);
    }
    r.register(format!("{label}_sessions_active"), format!("Sessions open now, by {label}"), active);
    r.register(format!("{label}_sessions_opened"), format!("Sessions opened, by {label}"), opened);
    let help = format!("Device memory held now by the sessions of {whose} in worker processes");
    r.register(format!("{label}_memory_mapped_bytes"), help, memory);
    let help = format!("Calls executed by the sessions of {whose} in worker processes");
    r.register(format!("{label}_calls"), help, calls);
    let help = format!("Time the sessions of {whose} in worker processes spent executing batches");
    r.register(format!("{label}_busy_microseconds"), help, busy);
}

/// The metrics in Prometheus' text format.
pub fn render(metrics: &Metrics) -> String {
    let s = metrics.snapshot();
    let mut r = Registry::with_prefix("gpupool_server");
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| r.register(name, help, ConstCounter::new(v));
    let gauge = |r: &mut Registry, name: &str, help: &str, v: u64| {
        r.register(name, help, ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)))
    };
    counter(&mut r, "sessions_opened", "Sessions opened", s.sessions_opened);
    counter(&mut r, "sessions_refused", "Connections refused at the handshake", s.sessions_refused);
    gauge(&mut r, "sessions_active", "Sessions open now", s.sessions_active);
    counter(&mut r, "batches", "Batches received", s.batches);
    counter(&mut r, "calls", "Calls executed", s.calls);
    counter(&mut r, "call_errors", "Calls that failed", s.call_errors);
    counter(&mut r, "frames_rejected", "Frames that could not be decoded", s.frames_rejected);
    counter(&mut r, "bulk_received_bytes", "Bytes received over bulk streams", s.bulk_bytes_in);
    counter(&mut r, "bulk_sent_bytes", "Bytes sent over bulk streams", s.bulk_bytes_out);
    gauge(&mut r, "memory_mapped_bytes", "Device memory sessions hold on the device now", s.memory_mapped);
    gauge(&mut r, "memory_swapped_bytes", "Device memory of sessions swapped out to host memory now", s.memory_swapped);
    counter(&mut r, "swapped_out_bytes", "Bytes of device memory swapped out to host memory", s.swapped_out_bytes);
    counter(&mut r, "swapped_in_bytes", "Bytes of device memory swapped back in", s.swapped_in_bytes);
    gauge(&mut r, "shm_regions", "Shared-memory regions of local clients mapped now", s.shm_regions);
    gauge(&mut r, "shm_registered", "Shared-memory regions registered with the driver now", s.shm_registered);
    counter(&mut r, "shm_copied_bytes", "Bytes copied through shared-memory regions", s.shm_bytes);
    counter(&mut r, "rdma_attachments", "RDMA connections admitted to their session", s.rdma_attachments);
    counter(&mut r, "rdma_frames", "Command frames received over RDMA", s.rdma_frames);
    counter(&mut r, "shm_command_rings", "Command rings in shared memory taken by their session", s.shm_command_rings);
    counter(&mut r, "shm_command_frames", "Command frames received through shared memory", s.shm_command_frames);
    counter(&mut r, "rdma_copied_bytes", "Bulk bytes copied over RDMA", s.rdma_bytes);
    counter(&mut r, "resumptions", "Clients reattached to their kept session", s.resumptions);
    counter(&mut r, "resumptions_refused", "Reattachments refused (session gone, wrong secret)", s.resumptions_refused);
    counter(&mut r, "modules_preloaded", "Module images workers loaded before their session came", s.modules_preloaded);
    counter(
        &mut r,
        "modules_preloaded_used",
        "Preloaded module images a session used instead of loading them",
        s.modules_preloaded_used,
    );
    gauge(&mut r, "batches_queued", "Batches read and waiting for their session's thread now", s.batches_queued);
    gauge(
        &mut r,
        "batch_bytes_queued",
        "Bytes decoded batches hold from being read until they ran, now",
        s.batch_bytes_queued,
    );
    counter(&mut r, "busy_microseconds", "Time sessions spent executing batches on the device", s.busy_us);
    counter(&mut r, "worker_starts", "Session worker processes started, warm ones included", s.worker_starts);
    counter(
        &mut r,
        "batches_waited",
        "Batches that waited more than 1 ms between being read and starting (behind their session's earlier work, or held by the temporal share)",
        s.batches_waited,
    );
    counter(&mut r, "batch_wait_microseconds", "Time batches waited between being read and starting", s.batch_wait_us);
    if let Some(ledger) = metrics.staging.get() {
        gauge(
            &mut r,
            "staging_host_bytes",
            "Bytes staged for bulk copies by all sessions of the host now",
            ledger.used(),
        );
        gauge(&mut r, "staging_host_limit_bytes", "Most bytes all sessions of the host may stage", ledger.cap());
    }
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    counter(
        &mut r,
        "time_share_holds",
        "Batches of shared sessions held by the temporal share",
        load(&metrics.time_share_holds),
    );
    counter(
        &mut r,
        "mps_group_faults",
        "Shared sessions whose worker died under MPS, ending their group's other sessions",
        load(&metrics.mps_group_faults),
    );
    counter(
        &mut r,
        "mps_daemon_starts",
        "MPS control daemons started (first start and restarts)",
        load(&metrics.mps_daemon_starts),
    );
    let exits = Family::<Vec<(String, String)>, Counter>::default();
    for (how, n) in metrics.worker_exits() {
        exits.get_or_create(&vec![("how".to_string(), how.label().to_string())]).inc_by(n);
    }
    r.register("worker_exits", "Session worker processes ended, by how (normal, failed, signal, unknown)", exits);
    // Sessions by tenant and by instance (at most MAX_LABELS series each,
    // the rest as "(other)").
    series(&mut r, "tenant", "the tenant", &metrics.tenants());
    // Not `instance`: Prometheus gives every series its scrape target's.
    series(&mut r, "gpu_instance", "the GPU instance", &metrics.instances());
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// Serves scrapes on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: impl Future<Output = ()>) {
    gpupool_proto::exporter::serve(listener, move || render(&metrics), shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        gpupool_proto::exporter::get(addr, path).await.expect("scrape")
    }

    /// A scrape over TCP shows the counters as they are at that moment.
    #[tokio::test]
    async fn scrapes_follow_the_counters() {
        let metrics = Arc::new(Metrics::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, metrics.clone(), async {
            let _ = stopped.await;
        }));
        let first = get(addr, "/metrics").await;
        assert!(first.starts_with("HTTP/1.1 200 OK"), "{first}");
        assert!(first.contains("gpupool_server_calls_total 0\n"), "{first}");
        metrics.calls.fetch_add(3, Ordering::Relaxed);
        metrics.memory_mapped.fetch_add(2 << 20, Ordering::Relaxed);
        let second = get(addr, "/metrics").await;
        assert!(second.contains("gpupool_server_calls_total 3\n"), "{second}");
        assert!(second.contains("gpupool_server_memory_mapped_bytes 2097152\n"), "{second}");
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
        stop.send(()).expect("stop");
        task.await.expect("ends at shutdown");
    }

    /// Sessions by tenant and by instance: opened and active per label,
    /// and past MAX_LABELS labels the rest under one.
    #[test]
    fn sessions_are_counted_by_tenant_and_instance_and_bounded() {
        use crate::server::metrics::{MAX_LABELS, OTHER_LABELS, SessionLabels};
        let metrics = Metrics::default();
        let (a, b) = (SessionLabels::new("team-a", "GPU-1"), SessionLabels::new("team-b", ""));
        metrics.session_opened(&a);
        metrics.session_opened(&a);
        metrics.session_opened(&b);
        metrics.session_closed(&a);
        let text = render(&metrics);
        assert!(text.contains("gpupool_server_tenant_sessions_active{tenant=\"team-a\"} 1\n"), "{text}");
        assert!(text.contains("gpupool_server_tenant_sessions_opened_total{tenant=\"team-a\"} 2\n"), "{text}");
        assert!(text.contains("gpupool_server_tenant_sessions_active{tenant=\"team-b\"} 1\n"), "{text}");
        assert!(text.contains("gpupool_server_gpu_instance_sessions_active{gpu_instance=\"GPU-1\"} 1\n"), "{text}");
        assert!(
            text.contains("gpupool_server_gpu_instance_sessions_opened_total{gpu_instance=\"GPU-1\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("gpupool_server_gpu_instance_sessions_active{gpu_instance=\"device\"} 1\n"), "{text}");
        for i in 0..MAX_LABELS + 10 {
            metrics.session_opened(&SessionLabels::new(&format!("t{i}"), "GPU-1"));
        }
        let tenants = metrics.tenants();
        assert_eq!(tenants.len(), MAX_LABELS + 1, "bounded, plus the one for the rest");
        assert_eq!(tenants[OTHER_LABELS].opened, 12);
        metrics.session_closed(&SessionLabels::new("t1030", "GPU-1"));
        assert_eq!(metrics.tenants()[OTHER_LABELS].active, 11);
        assert_eq!(metrics.instances()["GPU-1"].active, 1 + MAX_LABELS as u64 + 10 - 1);
    }

    /// Workers' reports move their tenant's and instance's memory and
    /// calls; worker exits and resumptions are counted by kind.
    #[test]
    fn workers_count_into_their_tenant_and_instance_and_their_exits_by_kind() {
        use crate::server::metrics::{SessionLabels, WorkerExit};
        use gpupool_proto::v1;
        use std::os::unix::process::ExitStatusExt;
        let metrics = Metrics::default();
        let labels = SessionLabels::new("team-a", "MIG-7");
        metrics.session_opened(&labels);
        let report =
            |memory_mapped, calls, busy_us| v1::WorkerMetrics { memory_mapped, calls, busy_us, ..Default::default() };
        let (first, second) = (report(8 << 20, 10, 700), report(2 << 20, 25, 1500));
        metrics.labels_worker_delta(&labels, &first, &v1::WorkerMetrics::default());
        metrics.labels_worker_delta(&labels, &second, &first);
        let t = metrics.tenants()["team-a"];
        assert_eq!((t.memory, t.calls, t.busy_us), (2 << 20, 25, 1500));
        assert_eq!(metrics.instances()["MIG-7"], t, "the instance counts the same");
        metrics.labels_worker_delta(&labels, &v1::WorkerMetrics::default(), &second);
        assert_eq!(metrics.tenants()["team-a"].memory, 0, "the worker's memory goes when it ends");
        assert_eq!(metrics.instances()["MIG-7"].memory, 0);

        let status = |raw| Ok(std::process::ExitStatus::from_raw(raw));
        metrics.worker_exited(WorkerExit::of(&status(0)));
        metrics.worker_exited(WorkerExit::of(&status(1 << 8)));
        metrics.worker_exited(WorkerExit::of(&status(9)));
        metrics.worker_exited(WorkerExit::of(&status(9)));
        metrics.resumptions.fetch_add(1, Ordering::Relaxed);
        let ledger = crate::staging::host::HostLedger::local(1 << 20, std::time::Duration::ZERO);
        assert!(ledger.share(0).expect("slot").try_reserve(4096));
        metrics.staging.set(ledger).expect("set once");
        let text = render(&metrics);
        for line in [
            "gpupool_server_worker_exits_total{how=\"normal\"} 1\n",
            "gpupool_server_worker_exits_total{how=\"failed\"} 1\n",
            "gpupool_server_worker_exits_total{how=\"signal\"} 2\n",
            "gpupool_server_worker_exits_total{how=\"unknown\"} 0\n",
            "gpupool_server_resumptions_total 1\n",
            "gpupool_server_tenant_calls_total{tenant=\"team-a\"} 25\n",
            "gpupool_server_tenant_memory_mapped_bytes{tenant=\"team-a\"} 0\n",
            "gpupool_server_staging_host_bytes 4096\n",
            "gpupool_server_staging_host_limit_bytes 1048576\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    /// The decoded bytes a worker's session has queued are a gauge: its
    /// reports move the supervisor's, and its last one brings it back.
    #[test]
    fn queued_batch_bytes_of_workers_are_a_gauge() {
        use gpupool_proto::v1;
        let metrics = Metrics::default();
        let queued = |bytes| v1::WorkerMetrics { batch_bytes_queued: bytes, ..Default::default() };
        metrics.add_worker_delta(&queued(5 << 20), &queued(0));
        metrics.add_worker_delta(&queued(3 << 20), &queued(5 << 20));
        assert!(render(&metrics).contains("gpupool_server_batch_bytes_queued 3145728\n"));
        metrics.add_worker_delta(&queued(0), &queued(3 << 20));
        assert!(render(&metrics).contains("gpupool_server_batch_bytes_queued 0\n"));
    }
}
