//! The balancer over gRPC: allocate+release throughput and latency on one
//! balancer with a warm pool of 1 000 servers × 8 GPUs × 7 MIG instances
//! (half of them leased), at several numbers of concurrent clients. The
//! balancer and its clients share this process and its cores. Run with
//! `cargo bench -p gpupool-balancer --bench grpc`.

use gpupool_balancer::pool::ServerSpec;
use gpupool_balancer::pool::fleet;
use gpupool_balancer::{Balancer, BalancerConfig};
use gpupool_proto::balancer as pb;
use gpupool_proto::balancer::balancer_client::BalancerClient;
use gpupool_proto::grpc_tls::BalancerTrust;
use gpupool_proto::lease::LeaseSigner;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const PAIRS_PER_LEVEL: usize = 40_000;
const SECRET: &str = "bench";

fn register_request(s: &ServerSpec) -> pb::RegisterRequest {
    pb::RegisterRequest {
        server_id: s.id.clone(),
        address: s.address.clone(),
        cert_sha256: s.cert_sha256.clone(),
        gpus: s.gpus.iter().map(gpupool_balancer::gpu_to_proto).collect(),
        live_leases: Vec::new(),
        server_build: "bench".into(),
        swap_host_bytes: s.swap_bytes,
    }
}

fn authorized<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut().insert("authorization", format!("Bearer {SECRET}").parse().expect("header"));
    r
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn level(channels: &[Channel], clients: usize) -> (f64, Vec<u32>, Vec<u32>) {
    let per_client = PAIRS_PER_LEVEL / clients;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let mut client = BalancerClient::new(channels[c % channels.len()].clone());
            tokio::spawn(async move {
                let (mut alloc, mut pair) = (Vec::with_capacity(per_client), Vec::with_capacity(per_client));
                for _ in 0..per_client {
                    let t0 = Instant::now();
                    let req =
                        pb::AllocateRequest { tenant: format!("t{c}"), memory_bytes: 8 << 30, ..Default::default() };
                    let lease = client.allocate(req).await.expect("allocate").into_inner();
                    let t1 = Instant::now();
                    client
                        .release(pb::ReleaseRequest { lease_id: lease.lease_id, token: lease.token })
                        .await
                        .expect("release");
                    alloc.push((t1 - t0).as_micros() as u32);
                    pair.push(t0.elapsed().as_micros() as u32);
                }
                (alloc, pair)
            })
        })
        .collect();
    let (mut alloc, mut pair) = (Vec::new(), Vec::new());
    for t in tasks {
        let (a, p) = t.await.expect("client task");
        alloc.extend(a);
        pair.extend(p);
    }
    let rate = pair.len() as f64 / started.elapsed().as_secs_f64();
    alloc.sort_unstable();
    pair.sort_unstable();
    (rate, alloc, pair)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut config =
            BalancerConfig::new(([127, 0, 0, 1], 0).into(), LeaseSigner::from_seed(rand::random()), SECRET);
        // Many tenants ("t0", "t1", …) without credentials of their own:
        // the legacy mode measures the allocation path alone.
        config.clients = gpupool_balancer::ClientAuth::anonymous();
        // The synthetic servers never heartbeat: keep them for the run.
        config.pool.heartbeat_timeout_ms = 3_600_000;
        config.heartbeat_interval = Duration::from_secs(60);
        config.pool.lease_ttl_ms = 600_000;
        // Over TLS (self-signed, pinned), as deployed.
        let balancer = Balancer::bind(config).await.expect("bind");
        let url = format!("https://{}", balancer.local_addr());
        let pin = gpupool_proto::tls::parse_fingerprint(balancer.fingerprint().expect("TLS")).expect("fingerprint");
        let endpoint = gpupool_proto::grpc_tls::endpoint(&url, &BalancerTrust::Fingerprint(pin), None).expect("endpoint");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(balancer.run(async { drop(stopped.await) }));

        eprintln!("balancer on {url}");
        let channel = endpoint.connect().await.expect("connect");
        eprintln!("connected");
        let mut client = BalancerClient::new(channel.clone());
        let servers: usize = std::env::var("BENCH_SERVERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
        let fleet = fleet::synthetic(servers, 8, 7);
        let instances: usize = fleet.iter().flat_map(|s| &s.gpus).map(|g| g.instances.len()).sum();
        let t = Instant::now();
        for s in &fleet {
            client.register(authorized(register_request(s))).await.expect("register");
        }
        let register = t.elapsed();
        // Half the pool leased and kept, so placement has to search.
        let t = Instant::now();
        for _ in 0..instances / 2 {
            let req = pb::AllocateRequest { tenant: "holder".into(), ..Default::default() };
            client.allocate(req).await.expect("warm-up allocation");
        }
        let warm = t.elapsed();
        println!("gRPC balancer benchmark: {servers} servers × 8 GPUs × 7 MIG instances = {instances} instances");
        println!(
            "register: {:.0} ms ({:.0} µs/server) · leasing half the pool one by one: {:.0} ms ({:.0} µs each)",
            register.as_secs_f64() * 1e3,
            register.as_secs_f64() * 1e6 / servers as f64,
            warm.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e6 / (instances / 2) as f64
        );
        println!(
            "\n| clients | HTTP/2 connections | alloc+release pairs/s | allocate p50 | allocate p99 | pair p50 | pair p99 | target ≥10 000/s, p99 < 1 ms |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let mut channels = vec![channel];
        for _ in 0..3 {
            channels.push(endpoint.connect().await.expect("connect"));
        }
        for clients in [1, 4, 16, 64] {
            let (rate, alloc, pair) = level(&channels, clients).await;
            let p99 = percentile(&alloc, 0.99);
            println!(
                "| {clients} | {} | {rate:.0} | {} µs | {p99} µs | {} µs | {} µs | {} |",
                channels.len().min(clients),
                percentile(&alloc, 0.5),
                percentile(&pair, 0.5),
                percentile(&pair, 0.99),
                if rate >= 10_000.0 && p99 < 1_000 { "met" } else { "not met" }
            );
        }
        let _ = stop.send(());
        let _ = server.await;
    });
}
