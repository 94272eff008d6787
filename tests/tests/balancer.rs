//! End to end with the balancer: one balancer and gpu-servers (their `run`
//! functions on 127.0.0.1 port 0, sessions in worker processes on the
//! emulated device, instances from simulated NVML topologies), clients
//! leasing virtual GPUs, running work and releasing them; drained servers,
//! lease expiry, queue timeouts, a balancer restart, and refused tokens.

use gpupool_balancer::TlsSettings;
use gpupool_client::{
    BalancerTrust, ClientConfig, ClientError, KernelArg, LaunchConfig, LeasedGpu, PoolRequest, Session, StreamId, Trust,
};
use gpupool_proto::balancer as pb;
use gpupool_proto::balancer::balancer_client::BalancerClient;
use gpupool_proto::grpc_tls;
use gpupool_proto::lease::{LeaseSigner, unix_ms_now};
use gpupool_tests::{
    SERVER_SECRET, TestBalancer, TestCa, TestServer, balancer_config, linked_server, pooled_server,
    tenant_balancer_config, tenant_secret,
};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A gRPC client on a runtime of its own (the tests are blocking).
struct Grpc {
    rt: tokio::runtime::Runtime,
    client: BalancerClient<Channel>,
    /// The credential every call presents, if any.
    secret: Option<String>,
}

impl Grpc {
    fn connect(balancer: &TestBalancer) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let client = rt.block_on(balancer.client()).expect("connect to the balancer");
        Self { rt, client, secret: None }
    }

    /// A client presenting `secret` (a tenant's credential or the servers'
    /// secret) in every call.
    fn with_secret(balancer: &TestBalancer, secret: &str) -> Self {
        Self { secret: Some(secret.into()), ..Self::connect(balancer) }
    }

    fn req<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        if let Some(s) = &self.secret {
            r.metadata_mut().insert("authorization", format!("Bearer {s}").parse().expect("header"));
        }
        r
    }

    fn allocate(&mut self, tenant: &str, memory: u64, profile: &str, wait_ms: u32) -> Result<pb::Lease, tonic::Status> {
        let req = pb::AllocateRequest {
            tenant: tenant.into(),
            memory_bytes: memory,
            compute_percent: 0,
            profile: profile.into(),
            wait_timeout_ms: wait_ms,
            class: pb::LeaseClass::Exclusive.into(),
        };
        let req = self.req(req);
        self.rt.block_on(self.client.allocate(req)).map(tonic::Response::into_inner)
    }

    fn renew(&mut self, lease: &pb::Lease) -> Result<pb::Lease, tonic::Status> {
        let req = self.req(pb::RenewRequest { lease_id: lease.lease_id, token: lease.token.clone() });
        self.rt.block_on(self.client.renew(req)).map(tonic::Response::into_inner)
    }

    fn release(&mut self, lease: &pb::Lease) -> Result<(), tonic::Status> {
        let req = self.req(pb::ReleaseRequest { lease_id: lease.lease_id, token: lease.token.clone() });
        self.rt.block_on(self.client.release(req)).map(drop)
    }

    fn status(&mut self) -> pb::PoolStatus {
        self.try_status().expect("status")
    }

    /// The first update of a `Watch` stream.
    fn first_watched(&mut self) -> pb::PoolStatus {
        let req = self.req(pb::WatchRequest { min_interval_ms: 0 });
        self.rt.block_on(async {
            let mut stream = self.client.watch(req).await.expect("watch").into_inner();
            stream.message().await.expect("an update").expect("a first update")
        })
    }

    fn try_status(&mut self) -> Result<pb::PoolStatus, tonic::Status> {
        let req = self.req(pb::StatusRequest {});
        self.rt.block_on(self.client.status(req)).map(tonic::Response::into_inner)
    }

    /// Waits until `ok` holds for the pool status.
    fn wait_for(&mut self, what: &str, ok: impl Fn(&pb::PoolStatus) -> bool) -> pb::PoolStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; pool: {s:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn instances(s: &pb::PoolStatus) -> usize {
    s.servers.iter().flat_map(|s| &s.gpus).map(|g| g.instances.len()).sum()
}

/// A session configuration for a lease obtained directly.
fn leased_config(lease: &pb::Lease) -> ClientConfig {
    let mut c = ClientConfig::new(
        lease.address.parse().expect("server address"),
        Trust::Fingerprint(lease.cert_sha256.clone()),
        lease.token.clone(),
    );
    c.reply_timeout = Duration::from_secs(60);
    c
}

/// Some work whose result is checked byte for byte.
fn round_trip(session: &Session, seed: u8) {
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let dev = session.mem_alloc(data.len() as u64).expect("alloc");
    session.memcpy_htod(dev, &data, StreamId::DEFAULT).expect("upload");
    session.memset(dev + 4096, u32::from(seed), 1, 4096, StreamId::DEFAULT).expect("memset");
    let mut back = vec![0u8; data.len()];
    session.memcpy_dtoh(&mut back, dev, StreamId::DEFAULT).expect("download");
    let mut want = data;
    want[4096..8192].fill(seed);
    assert!(back == want, "bytes differ after the round trip");
    session.mem_free(dev).expect("free");
}

/// Waits until calls on `session` fail for good.
fn wait_until_dead(session: &Session, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match session.mem_alloc(1 << 20).and_then(|_| session.flush()) {
            Err(e) if e.is_fatal() => return,
            Err(e) => panic!("{what}: unexpected error {e}"),
            Ok(()) => assert!(Instant::now() < deadline, "{what} lives on"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A balancer signing with `seed` and one gpu-server serving `spec`,
/// registered; the server lives as long as what is returned.
fn one_server(seed: u8, id: &str, spec: &str) -> (TestBalancer, TestServer, Grpc) {
    let balancer = TestBalancer::start(balancer_config(LeaseSigner::from_seed([seed; 32]))).expect("balancer");
    let server = pooled_server(&balancer, id, spec, None);
    let mut grpc = Grpc::connect(&balancer);
    grpc.wait_for("the server", |s| s.servers.len() == 1);
    (balancer, server, grpc)
}

fn template() -> ClientConfig {
    let mut c = ClientConfig::for_leases();
    c.reply_timeout = Duration::from_secs(60);
    c
}

const H100_LAYOUT: &[&str] = &["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"];

/// Shared leases of one tenant (`GPUPOOL_LEASE_CLASS=shared` in the
/// drop-in library): two 50 % shares on the one whole GPU, each session
/// bounded by its share's memory; a third share does not fit beside them,
/// and an exclusive lease does not either.
#[test]
fn shared_leases_of_a_tenant_share_a_whole_gpu_within_its_compute() {
    let (balancer, server, _grpc) = one_server(7, "h200", "h200-141gb");
    let request = |shared: bool| {
        let mut req = PoolRequest::new(balancer.url(), balancer.trust(), "team-a");
        (req.memory, req.compute_percent, req.shared) = (4 << 30, 50, shared);
        req
    };
    let a = Session::connect_pooled(&request(true), &template()).expect("first share");
    let b = Session::connect_pooled(&request(true), &template()).expect("second share");
    let (la, lb) = (a.lease().expect("lease"), b.lease().expect("lease"));
    assert_eq!(la.instance_uuid, lb.instance_uuid, "both shares on the one GPU");
    assert_ne!(la.lease_id, lb.lease_id);
    for (s, l) in [(&a, &la), (&b, &lb)] {
        assert_eq!(l.class, pb::LeaseClass::Shared as i32);
        let quota = s.welcome().memory_quota;
        assert!(quota.abs_diff(4 << 30) <= s.welcome().granularity, "a share's memory, not the GPU's: {quota}");
    }
    round_trip(&a, 1);
    round_trip(&b, 2);
    // The server counts them under their tenant (not one series per lease).
    let team = server.metrics.tenants().get("team-a").copied().unwrap_or_default();
    assert_eq!((team.active, team.opened), (2, 2), "{:?}", server.metrics.tenants());
    let third = Session::connect_pooled(&request(true), &template()).expect_err("100 % of the GPU is placed");
    assert!(matches!(third, ClientError::Pool { .. }), "the balancer says no: {third:?}");
    let whole = Session::connect_pooled(&request(false), &template()).expect_err("the GPU holds shares");
    assert!(matches!(whole, ClientError::Pool { .. }), "the balancer says no: {whole:?}");
}

/// The balancer's Prometheus endpoint follows the pool: a registered
/// server, a granted lease with its tenant, then the release.
#[test]
fn metrics_endpoint_follows_the_pool() {
    let mut config = balancer_config(LeaseSigner::from_seed([3; 32]));
    config.metrics_listen = Some(([127, 0, 0, 1], 0).into());
    let balancer = TestBalancer::start(config).expect("balancer");
    let addr = balancer.metrics.expect("a metrics endpoint");
    let _server = pooled_server(&balancer, "h200", "h200-141gb", None);
    let mut grpc = Grpc::connect(&balancer);
    grpc.wait_for("the server", |s| s.servers.len() == 1);
    let scrape = |grpc: &Grpc| grpc.rt.block_on(gpupool_proto::exporter::get(addr, "/metrics")).expect("scrape");
    let has = |text: &str, line: &str| text.lines().any(|l| l == line);

    let lease = grpc.allocate("team-a", 1 << 30, "", 0).expect("lease");
    let refused = grpc.allocate("team-a", 1 << 40, "", 0).expect_err("1 TiB fits nowhere");
    let text = scrape(&grpc);
    let reason = format!("gpupool_balancer_allocations_refused_total{{reason=\"{:?}\"}} 1", refused.code());
    assert!(has(&text, &reason), "{reason} missing:\n{text}");
    assert!(has(&text, "gpupool_balancer_allocation_seconds_count 1"), "{text}");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for line in [
        "gpupool_balancer_servers 1",
        "gpupool_balancer_leases 1",
        "gpupool_balancer_leases_granted_total 1",
        "gpupool_balancer_tenant_leases{tenant=\"team-a\"} 1",
    ] {
        assert!(has(&text, line), "{line} missing:\n{text}");
    }
    assert!(text.contains("gpupool_balancer_server_heartbeat_age_milliseconds{server=\"h200\"}"), "{text}");

    grpc.release(&lease).expect("release");
    let text = scrape(&grpc);
    assert!(
        has(&text, "gpupool_balancer_leases 0") && has(&text, "gpupool_balancer_leases_released_total 1"),
        "{text}"
    );
}

#[test]
fn many_clients_share_three_servers() {
    // Not a test of expiry: a heartbeat or renewal late under CI load must
    // not end a server's leases here.
    let mut config = balancer_config(LeaseSigner::from_seed([1; 32]));
    config.pool.heartbeat_timeout_ms = 15_000;
    config.pool.lease_ttl_ms = 30_000;
    let balancer = TestBalancer::start(config).expect("balancer");
    let _servers = [
        pooled_server(&balancer, "h100", "h100-80gb:mig", Some(H100_LAYOUT)),
        pooled_server(&balancer, "a100", "a100-80gb:mig", Some(&["4g.40gb", "3g.40gb"])),
        pooled_server(&balancer, "h200", "h200-141gb", None),
    ];
    let mut grpc = Grpc::connect(&balancer);
    let s = grpc.wait_for("three servers", |s| s.servers.len() == 3);
    assert_eq!(instances(&s), 7, "4 + 2 MIG instances and one whole GPU");

    // More clients than instances: the rest wait in the queue for a release.
    let clients: Vec<_> = (0..14u8)
        .map(|i| {
            let (url, trust) = (balancer.url(), balancer.trust());
            std::thread::spawn(move || {
                let mut req = PoolRequest::new(url, trust, format!("tenant-{}", i % 3));
                req.memory = 12 << 30;
                req.wait = Duration::from_secs(60);
                let session = Session::connect_pooled(&req, &template()).expect("leased session");
                let lease = session.lease().expect("lease");
                let welcome = session.welcome();
                assert!(
                    welcome.memory_quota.abs_diff(lease.memory_bytes) <= welcome.granularity,
                    "the session gets its instance's memory"
                );
                assert!(lease.memory_bytes >= 12 << 30);
                round_trip(&session, i);
                (lease.lease_id, lease.instance_uuid)
            })
        })
        .collect();
    let results: Vec<(u64, String)> = clients.into_iter().map(|t| t.join().expect("client")).collect();
    let ids: HashSet<u64> = results.iter().map(|r| r.0).collect();
    assert_eq!(ids.len(), 14, "every lease has its own id");
    let s = grpc.wait_for("every lease released", |s| s.leases.is_empty());
    assert_eq!((s.allocations, s.releases), (14, 14));
    // The 1g.10gb instances are too small for 12 GiB: never leased.
    let small: HashSet<String> = s
        .servers
        .iter()
        .flat_map(|s| &s.gpus)
        .flat_map(|g| &g.instances)
        .filter(|i| i.memory_bytes < 12 << 30)
        .map(|i| i.uuid.clone())
        .collect();
    assert_eq!(small.len(), 2);
    assert!(results.iter().all(|(_, uuid)| !small.contains(uuid)));

    // Best fit: a 1g.10gb request gets a 1g.10gb instance.
    let lease = grpc.allocate("t", 1 << 30, "", 0).expect("small lease");
    assert!(small.contains(&lease.instance_uuid), "best fit picks the smallest instance");
    let by_profile = grpc.allocate("t", 0, "2g.20gb", 0).expect("by profile");
    assert_eq!(by_profile.profile.expect("profile").name, "2g.20gb");
    let err = grpc.allocate("t", 1 << 40, "", 0).expect_err("1 TiB fits nowhere");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let text = gpupool_balancer::table::render(&grpc.status(), unix_ms_now());
    assert!(text.contains("h100") && text.contains("2g.20gb (14)") && text.contains("whole GPU"), "{text}");
}

#[test]
fn a_silent_server_is_drained_and_avoided() {
    let balancer = TestBalancer::start(balancer_config(LeaseSigner::from_seed([2; 32]))).expect("balancer");
    let doomed = pooled_server(&balancer, "doomed", "h100-80gb", None);
    let survivor = pooled_server(&balancer, "survivor", "h100-80gb:mig", Some(&["3g.40gb", "3g.40gb"]));
    let mut grpc = Grpc::connect(&balancer);
    grpc.wait_for("two servers", |s| s.servers.len() == 2);

    // A session mid-run on the server that goes away.
    let lease = grpc.allocate("t", 70 << 30, "", 0).expect("the whole GPU");
    assert_eq!(lease.server_id, "doomed");
    let session = Session::connect(&leased_config(&lease)).expect("session");
    round_trip(&session, 1);
    doomed.stop();
    wait_until_dead(&session, "the session on the stopped server");
    let s = grpc.wait_for("the silent server drained", |s| s.servers.len() == 1);
    assert_eq!(s.servers[0].server_id, "survivor");
    let err = grpc.renew(&lease).expect_err("its lease is gone");
    assert!(matches!(err.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition), "{err:?}");

    for _ in 0..2 {
        let l = grpc.allocate("t", 1 << 30, "", 0).expect("lease on the survivor");
        assert_eq!(l.server_id, "survivor");
    }
    let err = grpc.allocate("t", 1 << 30, "", 0).expect_err("pool exhausted");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    drop(survivor);
}

#[test]
fn unrenewed_leases_expire_and_their_sessions_end() {
    let (_balancer, _server, mut grpc) = one_server(3, "s", "a100-80gb");

    let lease = grpc.allocate("t", 0, "", 0).expect("lease");
    let session = Session::connect(&leased_config(&lease)).expect("session");
    round_trip(&session, 2);
    // The server's heartbeats carry the memory its sessions hold.
    let held = session.mem_alloc(24 << 20).expect("alloc");
    session.flush().expect("flush");
    grpc.wait_for("the session seen in use, with its memory", |s| {
        s.leases.iter().any(|l| l.in_use) && s.servers.iter().any(|v| v.memory_used_bytes >= 24 << 20)
    });
    session.mem_free(held).expect("free");
    session.flush().expect("flush");
    grpc.wait_for("the memory seen freed", |s| s.servers.iter().all(|v| v.memory_used_bytes < 24 << 20));
    // Renewed once, then left alone: the lease expires 3 s later.
    let renewed = grpc.renew(&lease).expect("renew");
    assert!(renewed.expires_unix_ms > lease.expires_unix_ms);
    let s = grpc.wait_for("the lease expired", |s| s.leases.is_empty());
    assert_eq!(s.expirations, 1);
    // The server ended the session at its next heartbeat.
    wait_until_dead(&session, "the session of the expired lease");
    let err = grpc.renew(&renewed).expect_err("expired");
    assert!(matches!(err.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition), "{err:?}");
    // The instance is free again.
    grpc.allocate("t", 0, "", 0).expect("the instance again");
}

#[test]
fn the_queue_times_out_or_serves_a_release() {
    let (balancer, _server, mut grpc) = one_server(4, "s", "h200-141gb");

    // An operator following the pool sees the allocation.
    let mut watch =
        grpc.rt.block_on(grpc.client.watch(pb::WatchRequest { min_interval_ms: 0 })).expect("watch").into_inner();
    let first = grpc.rt.block_on(watch.message()).expect("stream").expect("first status");
    assert!(first.leases.is_empty());
    let held = grpc.allocate("t", 0, "", 0).expect("the only instance");
    let next = grpc.rt.block_on(watch.message()).expect("stream").expect("next status");
    assert_eq!(next.leases.len(), 1, "the watch shows the new lease");
    drop(watch);
    let started = Instant::now();
    let err = grpc.allocate("t", 0, "", 300).expect_err("nothing frees up");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300), "answered before the wait ran out");
    assert_eq!(grpc.status().queue_timeouts, 1);

    let (url, trust) = (balancer.url(), balancer.trust());
    let waiter = std::thread::spawn(move || {
        let mut req = PoolRequest::new(url, trust, "waiter");
        req.wait = Duration::from_secs(20);
        let session = Session::connect_pooled(&req, &template()).expect("granted after the release");
        round_trip(&session, 3);
        session.lease().expect("lease").tenant
    });
    grpc.wait_for("the waiter queued", |s| s.queue.len() == 1);
    grpc.release(&held).expect("release");
    assert_eq!(waiter.join().expect("waiter"), "waiter");
    grpc.wait_for("all released", |s| s.leases.is_empty() && s.queue.is_empty());
}

#[test]
fn a_restarted_balancer_loses_no_lease() {
    let signer = LeaseSigner::from_seed([5; 32]);
    let first = TestBalancer::start(balancer_config(signer.clone())).expect("balancer");
    let addr = first.addr;
    let servers = [
        pooled_server(&first, "a", "h100-80gb:mig", Some(&["4g.40gb", "3g.40gb"])),
        pooled_server(&first, "b", "h100-80gb:mig", Some(&["4g.40gb", "3g.40gb"])),
    ];
    let mut grpc = Grpc::connect(&first);
    grpc.wait_for("two servers", |s| s.servers.len() == 2);
    // One lease in use by a renewing session, one held but not connected.
    let mut req = PoolRequest::new(first.url(), first.trust(), "in-use");
    req.profile = Some("4g.40gb".into());
    let session = Session::connect_pooled(&req, &template()).expect("session");
    round_trip(&session, 4);
    let in_use = session.lease().expect("lease");
    let idle = grpc.allocate("idle", 0, "4g.40gb", 0).expect("idle lease");
    grpc.wait_for("the session seen in use", |s| s.leases.iter().any(|l| l.in_use));
    // Outlive the token the server holds (3 s leases): only the client's
    // renewals keep the session's lease alive now.
    let mut idle = idle;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(1_000));
        idle = grpc.renew(&idle).expect("renew the idle lease");
    }
    assert!(session.lease().expect("lease").expires_unix_ms > in_use.expires_unix_ms + 2_000);
    first.stop();

    let mut config = balancer_config(signer);
    config.listen = addr;
    config.pool.recovery_ms = 1_500;
    let second = TestBalancer::start(config).expect("restarted balancer");
    let mut grpc = Grpc::connect(&second);
    assert!(grpc.status().recovering);
    // Nothing new while recovering: a request that may not wait is refused.
    let err = grpc.allocate("new", 0, "4g.40gb", 0).expect_err("recovering");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // The idle lease comes back from its holder (once its server is back).
    let deadline = Instant::now() + Duration::from_secs(15);
    let idle = loop {
        match grpc.renew(&idle) {
            Ok(l) => break l,
            Err(e) if e.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("not taken back at renewal: {e:?}"),
        }
    };
    let s = grpc.wait_for("both leases back and recovery over", |s| s.leases.len() == 2 && !s.recovering);
    let ids: HashSet<u64> = s.leases.iter().map(|l| l.lease_id).collect();
    assert_eq!(ids, HashSet::from([in_use.lease_id, idle.lease_id]));
    // New leases avoid the instances taken back: both 4g.40gb are held.
    let err = grpc.allocate("new", 0, "4g.40gb", 0).expect_err("both 4g.40gb instances are held");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let fresh = grpc.allocate("new", 0, "", 0).expect("a 3g.40gb is free");
    assert!(![&in_use.instance_uuid, &idle.instance_uuid].contains(&&fresh.instance_uuid));
    // The session went on through the restart and its renewals continue.
    round_trip(&session, 5);
    let deadline = Instant::now() + Duration::from_secs(10);
    while session.lease().expect("lease").expires_unix_ms <= in_use.expires_unix_ms {
        assert!(Instant::now() < deadline, "the session's lease is not renewed after the restart");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(servers);
}

#[test]
fn servers_refuse_forged_expired_and_foreign_leases() {
    let signer = LeaseSigner::from_seed([6; 32]);
    let balancer = TestBalancer::start(balancer_config(signer.clone())).expect("balancer");
    let a = pooled_server(&balancer, "a", "a100-80gb", None);
    let b = pooled_server(&balancer, "b", "a100-80gb", None);
    let mut grpc = Grpc::connect(&balancer);
    grpc.wait_for("two servers", |s| s.servers.len() == 2);
    let lease = grpc.allocate("t", 0, "", 0).expect("lease");
    let (mine, other) = if lease.server_id == "a" { (&a, &b) } else { (&b, &a) };
    let claims = || pb::LeaseClaims {
        lease_id: lease.lease_id,
        tenant: "t".into(),
        server_id: lease.server_id.clone(),
        instance_uuid: lease.instance_uuid.clone(),
        memory_bytes: lease.memory_bytes,
        issued_unix_ms: unix_ms_now(),
        expires_unix_ms: unix_ms_now() + 60_000,
        allow_rdma: false,
        ..Default::default()
    };
    let refused = |server: &TestServer, token: String, why: &str| {
        let mut c = server.client_config();
        c.token = token;
        match Session::connect(&c) {
            Err(ClientError::Refused { code, reason }) => {
                assert_eq!(code, gpupool_proto::close_code::UNAUTHORIZED, "{why}: {reason}");
                reason
            }
            other => panic!("{why}: expected a refusal, got {other:?}"),
        }
    };
    // The real lease works on its own server only.
    Session::connect(&leased_config(&lease)).map(|s| round_trip(&s, 6)).expect("the lease's own server");
    let r = refused(other, lease.token.clone(), "another server");
    assert!(r.contains("server"), "{r}");
    let r = refused(mine, LeaseSigner::from_seed([7; 32]).sign(&claims()), "forged");
    assert!(r.contains("signature"), "{r}");
    let mut expired = claims();
    expired.expires_unix_ms = unix_ms_now() - 1;
    let r = refused(mine, signer.sign(&expired), "expired");
    assert!(r.contains("expired"), "{r}");
    let mut foreign = claims();
    foreign.instance_uuid = "MIG-00000000-0000-0000-0000-000000000000".into();
    let r = refused(mine, signer.sign(&foreign), "foreign instance");
    assert!(r.contains("instance"), "{r}");
    refused(mine, "test-token".into(), "a shared secret the server does not accept");
    let mut tampered = lease.token.clone();
    tampered.insert(10, 'x');
    refused(mine, tampered, "tampered");

    // The balancer refuses strangers and forged tokens too.
    let err = grpc
        .rt
        .block_on(grpc.client.register(pb::RegisterRequest { server_id: "x".into(), ..Default::default() }))
        .expect_err("no server secret");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut forged = lease.clone();
    forged.token = LeaseSigner::from_seed([7; 32]).sign(&claims());
    assert_eq!(grpc.renew(&forged).expect_err("forged").code(), tonic::Code::Unauthenticated);
    assert_eq!(grpc.release(&forged).expect_err("forged").code(), tonic::Code::Unauthenticated);
    grpc.release(&lease).expect("release with the real token");
    // Released, the lease's token is still validly signed until it expires:
    // the server asks the balancer before it admits (issue 20, finding 9).
    let r = refused(mine, lease.token.clone(), "a released lease");
    assert!(r.contains("ended"), "{r}");
}

/// The balancer's status as a client verifying it by `trust` at `url` gets
/// it, or the reason it does not (connection or call), as one line.
fn status_via(url: &str, trust: &BalancerTrust, secret: Option<&str>) -> Result<pb::PoolStatus, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let endpoint = grpc_tls::endpoint(url, trust, None).map_err(|e| e.to_string())?;
        let channel =
            endpoint.connect_timeout(Duration::from_secs(5)).connect().await.map_err(|e| grpc_tls::error_chain(&e))?;
        let mut req = tonic::Request::new(pb::StatusRequest {});
        req.set_timeout(Duration::from_secs(5));
        if let Some(s) = secret {
            req.metadata_mut().insert("authorization", format!("Bearer {s}").parse().expect("header"));
        }
        BalancerClient::new(channel)
            .status(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| grpc_tls::describe_for(&s, trust))
    })
}

/// TLS on the control plane (issue 20): a TLS balancer refuses a plaintext
/// client; a client pinning another certificate refuses the balancer and
/// says so, at the gRPC level and through the client core's lease; a
/// gpu-server linked in plaintext never joins.
#[test]
fn the_balancer_refuses_plaintext_and_clients_refuse_a_wrong_pin() {
    let balancer = TestBalancer::start(balancer_config(LeaseSigner::from_seed([9; 32]))).expect("balancer");
    assert!(balancer.url().starts_with("https://"), "{}", balancer.url());
    status_via(&balancer.url(), &balancer.trust(), None).expect("a pinned client is answered");

    let plain = format!("http://{}", balancer.addr);
    let err = status_via(&plain, &BalancerTrust::Insecure, None).expect_err("a plaintext client is refused");
    assert!(err.contains("a plaintext client gets this from a balancer that runs TLS"), "{err}");

    let wrong = [0xab; 32];
    let err = status_via(&balancer.url(), &BalancerTrust::Fingerprint(wrong), None).expect_err("wrong pin");
    assert!(err.contains("does not match the pinned") && err.contains(&"ab".repeat(32)), "{err}");
    let fingerprint = balancer.fingerprint.clone().expect("TLS");
    assert!(err.contains(&fingerprint), "names the certificate it found: {err}");

    // The client core (libcuda's and the Lambda extension's lease path).
    let req = PoolRequest::new(balancer.url(), BalancerTrust::Fingerprint(wrong), "pinned-wrong");
    match LeasedGpu::allocate(&req) {
        Err(ClientError::Pool { message, .. }) => {
            assert!(message.contains("does not match the pinned"), "{message}")
        }
        other => panic!("a wrong pin must refuse the balancer: {other:?}"),
    }
    // An http:// URL is refused before anything is sent unless plaintext
    // is asked for.
    let req = PoolRequest::new(plain.clone(), balancer.trust(), "pinned-plaintext");
    let err = LeasedGpu::allocate(&req).expect_err("a pin with http://");
    assert!(err.to_string().contains("http:// is plaintext"), "{err}");

    // A gpu-server linked in plaintext does not join.
    let mut link = balancer.link("plaintext");
    link.url = plain;
    link.trust = BalancerTrust::Insecure;
    let server = linked_server(link, "a100-80gb", None);
    std::thread::sleep(Duration::from_millis(1_500));
    let status = status_via(&balancer.url(), &balancer.trust(), None).expect("status");
    assert!(status.servers.is_empty(), "a plaintext server registered: {:?}", status.servers);
    drop(server);
}

/// A balancer verified by a CA that requires client certificates from
/// gpu-servers: a server without one is refused, one with a certificate
/// from the CA registers, and a client verifying by CA leases a GPU and
/// runs work on it over TLS end to end.
#[test]
fn servers_present_client_certificates_and_clients_verify_by_ca() {
    let ca = TestCa::new().expect("CA");
    let mut config = balancer_config(LeaseSigner::from_seed([10; 32]));
    config.tls = Some(TlsSettings {
        identity: ca.issue(&["localhost", "127.0.0.1"]).expect("balancer certificate"),
        server_client_ca: Some(ca.pem.clone()),
    });
    // As a new deployment runs: clients present their tenant's credential.
    config.clients = tenant_balancer_config(LeaseSigner::from_seed([10; 32])).clients;
    let balancer = TestBalancer::start(config).expect("balancer");
    let by_ca = BalancerTrust::Ca { pem: ca.pem.clone(), server_name: None };

    // Without a client certificate: refused, and told why.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let err = rt
        .block_on(async {
            let channel = grpc_tls::endpoint(&balancer.url(), &by_ca, None)?.connect().await?;
            let mut req = tonic::Request::new(pb::HeartbeatRequest { server_id: "x".into(), ..Default::default() });
            let secret = format!("Bearer {}", gpupool_tests::SERVER_SECRET);
            req.metadata_mut().insert("authorization", secret.parse()?);
            let reply = BalancerClient::new(channel).heartbeat(req).await;
            anyhow::Ok(reply)
        })
        .expect("connected by CA")
        .expect_err("no client certificate");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("client certificate"), "{err:?}");
    // Clients that lease need none: the status is read by CA.
    status_via(&balancer.url(), &by_ca, Some(tenant_secret("team-a"))).expect("a client verifying by CA");

    let mut link = balancer.link("with-cert");
    link.trust = by_ca.clone();
    link.client_identity = Some(ca.issue(&["with-cert"]).expect("client certificate"));
    let server = linked_server(link, "a100-80gb", None);
    balancer.wait_for_servers(1).expect("the server with a certificate registers");

    // No tenant named: the credential's.
    let mut req = PoolRequest::new(balancer.url(), by_ca, "");
    req.secret = Some(tenant_secret("team-a").into());
    req.wait = Duration::from_secs(10);
    let session = Session::connect_pooled(&req, &template()).expect("a session on a lease over TLS");
    assert_eq!(session.lease().expect("leased").tenant, "team-a");
    round_trip(&session, 9);
    drop(session);
    drop(server);
}

/// `s`, a session of an MPS group one of whose workers just faulted, ends
/// within 1 s with the reason, and the server has counted `faults` group
/// faults so far (the neighbour's ending is not one).
fn ends_with_its_group(s: &Session, server: &TestServer, faults: u64) {
    let t0 = Instant::now();
    let err = loop {
        match s.synchronize() {
            Err(e) => break e,
            Ok(()) if t0.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(20)),
            Ok(()) => panic!("the group's other session still runs"),
        }
    };
    assert!(t0.elapsed() < Duration::from_secs(1), "ended at once, not after {:?}", t0.elapsed());
    assert!(err.to_string().contains("MPS group fault"), "a clear reason: {err}");
    let counted = || server.metrics.mps_group_faults.load(std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    while counted() < faults && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counted(), faults, "the fault is counted once");
}

/// Writes an executable shell script.
fn script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).expect("write the script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Issue 19: a shared lease's worker runs as a client of the server's MPS
/// daemon with its lease's share; an exclusive lease's does not. The
/// daemon (a stand-in control program, as in `mps.rs`'s tests) starts once,
/// on the first shared session; when one shared worker dies, the other
/// session of its group ends at once with the reason, the fault is counted,
/// and the daemon, gone meanwhile, is started again for the next session.
#[test]
fn shared_leases_run_under_the_servers_mps_daemon_and_share_fate() {
    let dir = std::env::temp_dir().join(format!("gpupool-mps-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let control = dir.join("mps-control");
    script(
        &control,
        r#"#!/bin/sh
log="$CUDA_MPS_PIPE_DIRECTORY/../../../calls"
if [ "$1" = "-d" ]; then echo start >>"$log"; touch "$CUDA_MPS_PIPE_DIRECTORY/control"; exit 0; fi
read -r cmd
echo "$cmd" >>"$log"
[ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ] || exit 1
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"#,
    );
    // The worker command, wrapped: each worker records its MPS environment
    // under its process id (exec keeps it) before it starts.
    let real = gpupool_tests::worker_command().expect("worker command");
    let envs = dir.join("worker-env");
    let wrapper = dir.join("worker");
    script(
        &wrapper,
        &format!(
            "#!/bin/sh\necho \"$$ ${{CUDA_MPS_PIPE_DIRECTORY:-none}} ${{CUDA_MPS_ACTIVE_THREAD_PERCENTAGE:-none}}\" >>{}\nexec {} \"$@\"\n",
            envs.display(),
            real.program.display()
        ),
    );
    let balancer = TestBalancer::start(balancer_config(LeaseSigner::from_seed([19; 32]))).expect("balancer");
    let mut c = gpupool_tests::linked_config(balancer.link("h200"), "h200-141gb", None);
    c.isolation = gpupool_server::Isolation::Process {
        command: gpupool_server::WorkerCommand { program: wrapper, args: real.args },
        warm: 1,
        start_timeout: Duration::from_secs(60),
    };
    c.mps = gpupool_server::MpsSettings {
        mode: gpupool_server::MpsMode::On,
        control: control.clone(),
        dir: Some(dir.join("mps")),
        // On, but MPS workers are confined by their SM share instead.
        time_share: Some(Duration::from_millis(50)),
    };
    let server = TestServer::start(c).expect("server starts");
    balancer.wait_for_servers(1).expect("registered");
    let env_of = |pid: u32| {
        let text = std::fs::read_to_string(&envs).unwrap_or_default();
        let line = text.lines().find(|l| l.split(' ').next() == Some(&pid.to_string())).map(str::to_owned);
        line.unwrap_or_else(|| panic!("worker {pid} recorded no environment: {text}"))
    };
    let worker_of = |s: &Session| {
        let id = s.welcome().session_id;
        server.workers().into_iter().find(|w| w.session == Some(id)).map(|w| w.pid).expect("the session's worker")
    };
    let starts =
        || std::fs::read_to_string(dir.join("calls")).unwrap_or_default().lines().filter(|l| *l == "start").count();
    let request = |shared: bool| {
        let mut req = PoolRequest::new(balancer.url(), balancer.trust(), "team-a");
        (req.memory, req.compute_percent, req.shared) = (1 << 30, 25, shared);
        req
    };

    // Exclusive: an ordinary (warm) worker, and no daemon.
    let x = Session::connect_pooled(&request(false), &template()).expect("exclusive lease");
    round_trip(&x, 1);
    assert!(env_of(worker_of(&x)).ends_with(" none none"), "no MPS: {}", env_of(worker_of(&x)));
    drop(x);
    assert_eq!(starts(), 0, "no daemon for exclusive sessions");

    // Two shares: MPS clients with 25 % each, under one daemon.
    let a = Session::connect_pooled(&request(true), &template()).expect("first share");
    let b = Session::connect_pooled(&request(true), &template()).expect("second share");
    round_trip(&a, 2);
    round_trip(&b, 3);
    let pipe = dir.join("mps/i0/mps-pipe");
    for s in [&a, &b] {
        assert_eq!(env_of(worker_of(s)), format!("{} {} 25", worker_of(s), pipe.display()));
    }
    assert_eq!(starts(), 1, "one daemon, started on first need");
    // Both always busy for a while: MPS clients are not metered by the
    // temporal share (their SM share confines them), so none is held.
    std::thread::scope(|scope| {
        for (s, seed) in [(&a, 6u8), (&b, 7u8)] {
            scope.spawn(move || {
                let dev = s.mem_alloc(256 << 10).expect("alloc");
                let until = std::time::Instant::now() + Duration::from_millis(600);
                while std::time::Instant::now() < until {
                    s.memset(dev, u32::from(seed), 1, 256 << 10, StreamId::DEFAULT).expect("memset");
                    s.synchronize().expect("synchronize");
                }
                s.mem_free(dev).expect("free");
            });
        }
    });
    assert_eq!(server.metrics.time_share_holds.load(std::sync::atomic::Ordering::Relaxed), 0, "MPS clients held");

    // a's worker dies: b ends with the reason, at once.
    let killed = std::process::Command::new("kill").args(["-9", &worker_of(&a).to_string()]).status();
    assert!(killed.expect("kill").success());
    ends_with_its_group(&b, &server, 1);
    drop((a, b));

    // The daemon is gone meanwhile: the next shared session starts it again.
    std::fs::remove_file(pipe.join("control")).expect("the stand-in daemon ran");
    let c = Session::connect_pooled(&request(true), &template()).expect("a fresh share");
    round_trip(&c, 4);
    assert_eq!(starts(), 2, "started again");
    assert_eq!(server.metrics.mps_daemon_starts.load(std::sync::atomic::Ordering::Relaxed), 2);

    // A fault that leaves the worker alive (an illegal address: a sticky
    // error): the worker of the MPS client exits, and its group ends.
    let d = Session::connect_pooled(&request(true), &template()).expect("a second fresh share");
    round_trip(&d, 5);
    let gone = c.mem_alloc(1 << 20).expect("alloc");
    c.mem_free(gone).expect("free");
    let add = c.module_load(gpupool_proto::BUILTIN_MODULE).expect("module").function("vector_add").expect("fn");
    let args = [KernelArg::Ptr(gone), KernelArg::Ptr(gone), KernelArg::Ptr(gone), KernelArg::U32(4)];
    c.launch(&add, LaunchConfig::for_elements(4, 32), StreamId::DEFAULT, &args).expect("queued");
    let sticky = c.synchronize().expect_err("a kernel on freed memory");
    assert_eq!(sticky.code(), gpupool_proto::cuda::ILLEGAL_ADDRESS, "{sticky}");
    ends_with_its_group(&d, &server, 2);
    drop((c, d));
    // The balancer counts them too, from the server's heartbeats.
    let mut grpc = Grpc::connect(&balancer);
    grpc.wait_for("the group faults at the balancer", |s| s.servers.iter().any(|s| s.mps_group_faults == 2));
    server.stop();
    let calls = std::fs::read_to_string(dir.join("calls")).unwrap_or_default();
    assert_eq!(calls.lines().last(), Some("quit"), "stopped with the server: {calls}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Tenant isolation (issue 20, finding 10): the tenant comes from the
/// credential. Tenant A's credential cannot lease as B (so B's quota is
/// untouched), cannot renew or release B's lease even with B's token, and
/// sees only its own leases in `Status`; the operator (the servers'
/// secret) sees every tenant's. Before per-tenant credentials any client
/// named any tenant and saw everything.
#[test]
fn a_tenants_credential_cannot_act_for_another_tenant() {
    let mut config = tenant_balancer_config(LeaseSigner::from_seed([11; 32]));
    config
        .pool
        .tenant_quotas
        .insert("team-b".into(), gpupool_balancer::pool::Quota { max_leases: Some(1), ..Default::default() });
    let balancer = TestBalancer::start(config).expect("balancer");
    let server = pooled_server(&balancer, "iso", "h100-80gb:mig", Some(H100_LAYOUT));
    balancer.wait_for_servers(1).expect("the server registers");
    let mut a = Grpc::with_secret(&balancer, tenant_secret("team-a"));
    let mut b = Grpc::with_secret(&balancer, tenant_secret("team-b"));
    let mut operator = Grpc::with_secret(&balancer, SERVER_SECRET);

    // A's credential leases for A, named or not.
    let a1 = a.allocate("", 0, "", 0).expect("A leases without naming itself");
    assert_eq!(a1.tenant, "team-a");
    let a2 = a.allocate("team-a", 0, "", 0).expect("A leases naming itself");
    // ... and never for B: refused, nothing leased, nothing billed to B.
    let denied = a.allocate("team-b", 0, "", 0).expect_err("A leases as B");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("cannot allocate for tenant \"team-b\""), "{denied:?}");
    let all = operator.status();
    assert!(all.leases.iter().all(|l| l.tenant == "team-a"), "{:?}", all.leases);
    assert!(all.queue.is_empty());
    // B's quota of one lease is whole.
    let b1 = b.allocate("", 0, "", 0).expect("B's quota is untouched");
    assert_eq!(b1.tenant, "team-b");
    let over = b.allocate("", 0, "", 0).expect_err("B's quota holds");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over:?}");

    // A cannot renew or release B's lease, even holding B's token.
    for refused in [a.renew(&b1).map(drop), a.release(&b1)] {
        let e = refused.expect_err("A acts on B's lease");
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("is not tenant \"team-a\"'s"), "{e:?}");
    }
    assert!(operator.status().leases.iter().any(|l| l.lease_id == b1.lease_id), "B's lease stands");
    b.renew(&b1).expect("B renews its own lease");

    // Each tenant sees its own leases only; the operator sees all.
    let ids = |s: &pb::PoolStatus| s.leases.iter().map(|l| l.lease_id).collect::<HashSet<_>>();
    let mine = a.status();
    assert_eq!(ids(&mine), HashSet::from([a1.lease_id, a2.lease_id]));
    assert_eq!(mine.tenant, "team-a");
    assert!(mine.servers.is_empty(), "servers are the operator's: {:?}", mine.servers);
    assert_eq!(ids(&b.status()), HashSet::from([b1.lease_id]));
    assert_eq!(ids(&a.first_watched()), HashSet::from([a1.lease_id, a2.lease_id]), "Watch is scoped too");
    let all = operator.status();
    assert_eq!(ids(&all), HashSet::from([a1.lease_id, a2.lease_id, b1.lease_id]));
    assert!(all.tenant.is_empty() && all.servers.len() == 1);

    // No credential, a wrong one, or the servers' secret: no lease.
    let mut nobody = Grpc::connect(&balancer);
    assert_eq!(nobody.allocate("team-b", 0, "", 0).expect_err("anonymous").code(), tonic::Code::Unauthenticated);
    assert_eq!(nobody.try_status().expect_err("anonymous status").code(), tonic::Code::Unauthenticated);
    let mut wrong = Grpc::with_secret(&balancer, "gpt1_guess");
    assert_eq!(wrong.allocate("team-b", 0, "", 0).expect_err("wrong").code(), tonic::Code::Unauthenticated);
    let op = operator.allocate("team-b", 0, "", 0).expect_err("the operator leases nothing");
    assert_eq!(op.code(), tonic::Code::PermissionDenied);

    // The client core (libcuda, the Lambda extension): the credential
    // alone names the tenant; naming another is refused with the reason.
    let mut req = PoolRequest::new(balancer.url(), balancer.trust(), "team-b");
    req.secret = Some(tenant_secret("team-a").into());
    match LeasedGpu::allocate(&req) {
        Err(ClientError::Pool { code, message }) => {
            assert!(code.contains("PermissionDenied") && message.contains("cannot allocate"), "{code}: {message}")
        }
        other => panic!("A's credential leased as B: {other:?}"),
    }
    req.tenant.clear();
    let leased = LeasedGpu::allocate(&req).expect("A leases through the client core");
    assert_eq!(leased.lease().tenant, "team-a");

    // Releases by their owners go through.
    drop(leased);
    a.release(&a1).expect("A releases its lease");
    a.release(&a2).expect("A releases its lease");
    b.release(&b1).expect("B releases its lease");
    operator.wait_for("every lease released", |s| s.leases.is_empty());
    drop(server);
}

/// The temporal share across worker processes (issue 19): two shared
/// leases of 75 % and 25 % of one GPU, both always busy, on a server with a
/// 200 ms period. Each worker reports its batches' busy time, the server
/// holds the batches of a session past its share: the 75 % session gets
/// through clearly more work than the 25 % one, and holds are counted.
#[test]
fn the_temporal_share_splits_a_gpu_by_the_leases_percentages() {
    let balancer = TestBalancer::start(balancer_config(LeaseSigner::from_seed([25; 32]))).expect("balancer");
    let mut c = gpupool_tests::linked_config(balancer.link("h200"), "h200-141gb", None);
    c.mps = gpupool_server::MpsSettings {
        mode: gpupool_server::MpsMode::Off,
        time_share: Some(Duration::from_millis(200)),
        ..gpupool_server::MpsSettings::default()
    };
    let server = TestServer::start(c).expect("server starts");
    balancer.wait_for_servers(1).expect("registered");
    let request = |percent: u32| {
        let mut req = PoolRequest::new(balancer.url(), balancer.trust(), "team-a");
        (req.memory, req.compute_percent, req.shared) = (256 << 20, percent, true);
        req
    };
    let big = Session::connect_pooled(&request(75), &template()).expect("75 % share");
    let small = Session::connect_pooled(&request(25), &template()).expect("25 % share");
    assert_eq!(big.lease().expect("lease").instance_uuid, small.lease().expect("lease").instance_uuid);
    let stop = std::sync::atomic::AtomicBool::new(false);
    // Busy work of a few milliseconds a batch, its result checked at the end.
    let busy = |s: &Session, seed: u8| {
        let len = 256u64 << 10;
        let dev = s.mem_alloc(len).expect("alloc");
        let mut rounds = 0u32;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            s.memset(dev, u32::from(seed.wrapping_add(rounds as u8)), 1, len, StreamId::DEFAULT).expect("memset");
            s.synchronize().expect("synchronize");
            rounds += 1;
        }
        let mut tail = vec![0u8; 4096];
        s.memcpy_dtoh(&mut tail, dev + len - 4096, StreamId::DEFAULT).expect("download");
        assert!(tail.iter().all(|&b| b == seed.wrapping_add((rounds - 1) as u8)), "the last memset's bytes");
        rounds
    };
    let (big_rounds, small_rounds) = std::thread::scope(|scope| {
        let b = scope.spawn(|| busy(&big, 1));
        let s = scope.spawn(|| busy(&small, 2));
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (b.join().expect("75 % session"), s.join().expect("25 % session"))
    });
    let holds = server.metrics.time_share_holds.load(std::sync::atomic::Ordering::Relaxed);
    let ratio = f64::from(big_rounds) / f64::from(small_rounds.max(1));
    eprintln!("75 %: {big_rounds} rounds, 25 %: {small_rounds} rounds, ratio {ratio:.2}, {holds} holds");
    assert!(holds > 0, "the 25 % session was never held");
    assert!(small_rounds > 0, "the 25 % session still runs");
    assert!(ratio >= 1.8, "75 % against 25 % got a ratio of {ratio:.2} ({big_rounds}/{small_rounds})");
}

/// Dynamic MIG layouts end to end (issue 25): a balancer with
/// `--mig-policy dynamic` and a server on a simulated H100 pair, one GPU
/// with one 1g.10gb instance, the other with two. A client holds a 1g.10gb
/// lease; another asks for a 3g.40gb, which no GPU has: the request waits,
/// the balancer plans a new layout for an idle GPU, the server lays it out
/// through (simulated) NVML and registers the new instances, and the
/// waiting client gets its 3g.40gb lease and works. The first lease and its
/// session are untouched.
#[test]
fn dynamic_layouts_lay_out_an_idle_gpu_for_a_waiting_lease() {
    let mut config = balancer_config(LeaseSigner::from_seed([26; 32]));
    config.mig_plan_interval = Some(Duration::from_millis(200));
    let balancer = TestBalancer::start(config).expect("balancer");
    let spec = "h100-80gb:mig=1g.10gb,h100-80gb:mig=1g.10gb+1g.10gb";
    let mut c = gpupool_tests::linked_config(balancer.link("h100"), spec, None);
    c.isolation = match c.isolation {
        gpupool_server::Isolation::Process { command, start_timeout, .. } => {
            gpupool_server::Isolation::Process { command, warm: 0, start_timeout }
        }
        other => other,
    };
    let _server = TestServer::start(c).expect("server starts");
    let mut grpc = Grpc::connect(&balancer);
    grpc.wait_for("the server", |s| instances(s) == 3);
    let request = |profile: &str| {
        let mut req = PoolRequest::new(balancer.url(), balancer.trust(), "team-a");
        req.profile = Some(profile.into());
        req.wait = Duration::from_secs(60);
        req
    };
    let small = Session::connect_pooled(&request("1g.10gb"), &template()).expect("a 1g.10gb lease");
    round_trip(&small, 1);
    let small_lease = small.lease().expect("lease");
    let large = Session::connect_pooled(&request("3g.40gb"), &template()).expect("a 3g.40gb lease, once laid out");
    let large_lease = large.lease().expect("lease");
    assert_eq!(large_lease.profile.map(|p| p.name).as_deref(), Some("3g.40gb"));
    round_trip(&large, 2);
    // The first lease and session are untouched.
    round_trip(&small, 3);
    let status = grpc.status();
    assert!(status.leases.iter().any(|l| l.lease_id == small_lease.lease_id), "the first lease stands");
    assert_eq!(status.relayouts, 1, "one GPU laid out anew");
    let profiles: Vec<String> = status
        .servers
        .iter()
        .flat_map(|s| &s.gpus)
        .flat_map(|g| &g.instances)
        .filter_map(|i| i.profile.as_ref().map(|p| p.name.clone()))
        .collect();
    assert!(profiles.contains(&"3g.40gb".to_string()), "the new instance is registered: {profiles:?}");
    assert!(profiles.contains(&"1g.10gb".to_string()), "the leased one stays: {profiles:?}");
}
