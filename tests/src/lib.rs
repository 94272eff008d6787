//! Shared pieces of gpupool's end-to-end tests, demo and benchmark: start a
//! real server (its `run` on 127.0.0.1 port 0, on its own runtime thread)
//! and open clients or raw QUIC connections to it.

use anyhow::Context;
use gpupool_client::{ClientConfig, Trust};
use gpupool_server::pool::{WorkerInfo, WorkerPool};
use gpupool_server::{DeviceChoice, Isolation, Metrics, Server, ServerConfig, WorkerCommand};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Token the test servers accept.
pub const TOKEN: &str = "test-token";

/// A server running on its own thread until dropped or stopped.
#[derive(Debug)]
pub struct TestServer {
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub metrics: Arc<Metrics>,
    pub backend: &'static str,
    /// The port of its RDMA listener, when it has one.
    pub rdma_port: Option<u16>,
    /// Moves the server's sessions to other servers.
    pub migrator: gpupool_server::Migrator,
    pool: Option<Arc<WorkerPool>>,
    running: Background,
}

/// A service's `run` on a runtime of its own thread: `serve` reports what
/// callers need through `ready`, then runs until its stop future completes,
/// which [`Background::stop`] (or dropping it) brings about.
#[derive(Debug)]
struct Background {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type StopFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Background {
    fn start<T, F, Fut>(wait: Duration, serve: F) -> anyhow::Result<(T, Self)>
    where
        T: Send + 'static,
        F: FnOnce(Box<dyn FnOnce(T) + Send>, StopFuture) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<T>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!(e)));
                    return;
                }
            };
            let started = ready_tx.clone();
            let ready: Box<dyn FnOnce(T) + Send> = Box::new(move |info| {
                let _ = started.send(Ok(info));
            });
            let stop: StopFuture = Box::pin(async move { drop(stop_rx.await) });
            if let Err(e) = rt.block_on(serve(ready, stop)) {
                // Before readiness this is the caller's error; after, a log line.
                if ready_tx.send(Err(anyhow::anyhow!("{e:#}"))).is_err() {
                    eprintln!("stopped with error: {e:#}");
                }
            }
        });
        let info = ready_rx.recv_timeout(wait)??;
        Ok((info, Self { stop: Some(stop_tx), thread: Some(thread) }))
    }

    /// Stops the service and waits for its thread.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The device tests run on: `GPUPOOL_TEST_DEVICE=cuda` picks GPU 0,
/// anything else the emulated device.
pub fn test_device() -> DeviceChoice {
    match std::env::var("GPUPOOL_TEST_DEVICE").as_deref() {
        Ok("cuda") => DeviceChoice::Cuda { ordinal: 0 },
        _ => DeviceChoice::Emulated { memory: 8 << 30 },
    }
}

/// [`server_config`] whose connections time out after 1 s and which keeps
/// a lost session for `grace`: for outages made with a [`relay::Relay`].
pub fn short_idle_config(grace: Duration) -> ServerConfig {
    let mut c = server_config();
    c.idle_timeout = Duration::from_secs(1);
    c.resume_grace = grace;
    c
}

/// `config` through the relay at `relay`, timing out after 1 s as a
/// [`short_idle_config`] server does, with keep-alives every 250 ms.
pub fn through_relay(mut config: ClientConfig, relay: SocketAddr) -> ClientConfig {
    config.server = relay;
    config.idle_timeout = Duration::from_secs(1);
    config.keep_alive = Duration::from_millis(250);
    config
}

/// A test configuration on 127.0.0.1 port 0. With
/// `GPUPOOL_TEST_TRANSPORT=rdma` it listens for RDMA on [`test_fabric`].
pub fn server_config() -> ServerConfig {
    let mut c = ServerConfig::new(([127, 0, 0, 1], 0).into(), vec![TOKEN.into()]);
    c.device = test_device();
    c.memory_quota = 256 << 20;
    c.shutdown_grace = Duration::from_secs(2);
    if rdma_transport() {
        c.rdma.mode = gpupool_server::RdmaMode::On;
        c.rdma.provider = Some(Arc::new(test_fabric()));
    }
    c
}

/// Whether the tests run over RDMA (`GPUPOOL_TEST_TRANSPORT=rdma`): the
/// in-memory provider of this process, shared by its servers and clients.
fn rdma_transport() -> bool {
    std::env::var("GPUPOOL_TEST_TRANSPORT").as_deref() == Ok("rdma")
}

/// The in-memory RDMA fabric of this test process.
pub fn test_fabric() -> gpupool_rdma::mem::MemFabric {
    static FABRIC: std::sync::OnceLock<gpupool_rdma::mem::MemFabric> = std::sync::OnceLock::new();
    FABRIC.get_or_init(|| gpupool_rdma::mem::MemFabric::new("mem0")).clone()
}

/// The worker command for process isolation in tests: `GPUPOOL_WORKER_EXE`,
/// else `gpupool-worker` (this package's binary, which cargo builds before
/// the integration tests) or `gpupool-server`, next to this executable or
/// one folder up (cargo puts test binaries in `target/<profile>/deps/`).
pub fn worker_command() -> anyhow::Result<WorkerCommand> {
    let args = vec![gpupool_server::worker::WORKER_ARG.to_string()];
    if let Some(p) = std::env::var_os("GPUPOOL_WORKER_EXE") {
        return Ok(WorkerCommand { program: p.into(), args });
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .flat_map(|dir| [dir.join("gpupool-worker"), dir.join("gpupool-server")])
        .find(|p| p.is_file())
        .context(
            "no gpupool-worker or gpupool-server binary next to the tests: build them or set GPUPOOL_WORKER_EXE",
        )?;
    Ok(WorkerCommand { program: found, args })
}

/// [`server_config`] with every session in its own worker process.
pub fn isolated_config() -> anyhow::Result<ServerConfig> {
    let mut c = server_config();
    c.isolation = Isolation::Process { command: worker_command()?, warm: 1, start_timeout: Duration::from_secs(60) };
    // Sessions in worker processes stay on QUIC (docs/rdma.md).
    c.rdma.mode = gpupool_server::RdmaMode::Off;
    Ok(c)
}

impl TestServer {
    /// Starts a server with `config`.
    pub fn start(config: ServerConfig) -> anyhow::Result<Self> {
        let (info, running) = Background::start(Duration::from_secs(120), move |ready, stop| async move {
            let server = Server::bind(config)?;
            server.ready().await?;
            let info = (
                server.local_addr(),
                server.fingerprint().to_string(),
                server.metrics(),
                server.backend(),
                server.worker_pool(),
                server.migrator(),
                server.rdma_port(),
            );
            ready(info);
            server.run(stop).await?;
            Ok(())
        })?;
        let (addr, fingerprint, metrics, backend, pool, migrator, rdma_port) = info;
        Ok(Self { addr, fingerprint, metrics, backend, rdma_port, migrator, pool, running })
    }

    /// The worker processes, warm and busy (none in-process).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.pool.as_ref().map(|p| p.snapshot()).unwrap_or_default()
    }

    /// A client configuration for this server. Its copies stay on QUIC
    /// unless `GPUPOOL_TEST_TRANSPORT=shm` (then they go through shared
    /// memory, and its commands through a command ring there),
    /// `shm-copies` (copies through shared memory, commands on QUIC) or
    /// `rdma` (commands and copies over the in-memory RDMA
    /// fabric): the same tests run over any transport.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.addr, Trust::Fingerprint(self.fingerprint.clone()), TOKEN);
        c.reply_timeout = Duration::from_secs(60);
        match std::env::var("GPUPOOL_TEST_TRANSPORT").as_deref() {
            // Commands through a ring in shared memory as well (the default
            // of a client on the server's host).
            Ok("shm") => {}
            // Copies only: the commands stay on QUIC.
            Ok("shm-copies") => c.shm_commands = false,
            _ => c.shm_region_bytes = 0,
        }
        if rdma_transport() {
            c.rdma.provider = Some(Arc::new(test_fabric()));
        }
        c
    }

    /// Where a session of another server moves to come here, with `token`.
    pub fn migration_target(&self, token: &str) -> gpupool_server::MigrationTarget {
        gpupool_server::MigrationTarget {
            address: self.addr,
            server_name: "localhost".into(),
            cert_sha256: self.fingerprint.clone(),
            token: token.into(),
        }
    }

    /// Stops the server (closing every session) and waits for it.
    pub fn stop(mut self) {
        self.running.stop();
    }
}

/// A hand-driven session: raw frames on a real QUIC connection, for tests
/// that send what a well-behaved client never would.
pub mod relay;

pub mod raw {
    use super::TestServer;
    use bytes::Bytes;
    use gpupool_proto::frame::{self, FrameDecoder};
    use gpupool_proto::v1;
    use prost::Message;
    use std::net::SocketAddr;

    /// A raw session: its connection, command stream and frame decoder.
    #[derive(Debug)]
    pub struct Raw {
        _ep: quinn::Endpoint,
        pub conn: quinn::Connection,
        pub send: quinn::SendStream,
        pub recv: quinn::RecvStream,
        dec: FrameDecoder,
    }

    impl Raw {
        /// A QUIC connection to `addr` that trusts `srv`'s certificate.
        pub async fn connect(srv: &TestServer, addr: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
            let qc = gpupool_client::transport::quinn_client_config(&srv.client_config()).expect("config");
            let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
            ep.set_default_client_config(qc);
            let conn = ep.connect(addr, "localhost").expect("connect").await.expect("quic handshake");
            (ep, conn)
        }

        /// Opens a raw session with a custom Hello; `Err` holds the close code
        /// and reason when the server refuses.
        pub async fn open(srv: &TestServer, version: u32, token: &str) -> Result<(Raw, v1::Welcome), (u32, String)> {
            Self::open_at(srv, srv.addr, version, token).await
        }

        /// Like [`Raw::open`] at another address of the same server (a worker).
        pub async fn open_at(
            srv: &TestServer,
            addr: SocketAddr,
            version: u32,
            token: &str,
        ) -> Result<(Raw, v1::Welcome), (u32, String)> {
            let hello = v1::Hello {
                protocol_version: version,
                client_build: "raw-test".into(),
                token: token.into(),
                resume: None,
                bulk: None,
                migrate: None,
                rdma: None,
            };
            Self::open_with(srv, addr, &hello).await
        }

        /// Like [`Raw::open_at`] with a Hello of the caller's.
        pub async fn open_with(
            srv: &TestServer,
            addr: SocketAddr,
            hello: &v1::Hello,
        ) -> Result<(Raw, v1::Welcome), (u32, String)> {
            let (ep, conn) = Self::connect(srv, addr).await;
            let (mut send, recv) = conn.open_bi().await.expect("stream");
            send.write_all(&frame::encode(hello)).await.expect("hello");
            let mut raw = Raw { _ep: ep, conn, send, recv, dec: FrameDecoder::new(64 << 20) };
            match raw.next().await {
                Some(body) => Ok((raw, v1::Welcome::decode(body).expect("welcome"))),
                None => match raw.conn.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                        Err((c.error_code.into_inner() as u32, String::from_utf8_lossy(&c.reason).into_owned()))
                    }
                    other => panic!("unexpected end: {other:?}"),
                },
            }
        }

        /// The next frame on the command stream; `None` when it ends.
        pub async fn next(&mut self) -> Option<Bytes> {
            loop {
                if let Some(f) = self.dec.next_frame().expect("frame") {
                    return Some(f);
                }
                match self.recv.read_chunk(1 << 20, true).await {
                    Ok(Some(c)) => self.dec.push(&c.bytes),
                    _ => return None,
                }
            }
        }

        /// The next frame as a `BatchReply`.
        pub async fn reply(&mut self) -> v1::BatchReply {
            v1::BatchReply::decode(self.next().await.expect("reply")).expect("decodes")
        }
    }
}

/// xorshift64 words from `seed`: fast, deterministic, never all zeros.
fn xorshift(seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    })
}

/// Deterministic pseudo-random floats in [-1, 1), fresh per seed.
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    xorshift(seed).take(n).map(|x| ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).collect()
}

/// Pseudo-random bytes.
/// Whether process `pid` is running (a reaped process has no /proc entry;
/// a zombie's state is `Z`).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    xorshift(seed).take(n).map(|x| (x >> 56) as u8).collect()
}

/// Copies `n` random bytes (from `seed`) to a new device buffer and back,
/// checks them byte for byte, and frees the buffer.
pub fn round_trip(s: &gpupool_client::Session, n: usize, seed: u64) {
    let data = random_bytes(n, seed);
    let dev = s.mem_alloc(n as u64).expect("alloc");
    s.memcpy_htod(dev, &data, gpupool_client::StreamId::DEFAULT).expect("htod");
    let mut back = vec![0u8; n];
    s.memcpy_dtoh(&mut back, dev, gpupool_client::StreamId::DEFAULT).expect("dtoh");
    assert!(back == data, "round trip of {n} bytes differs");
    s.mem_free(dev).expect("free");
}

/// A seed that differs per run, so kernels are checked on fresh data.
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

/// Relative L2 error of `got` against `want`.
pub fn rel_error(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if got.iter().any(|g| g.is_nan()) {
        return f64::INFINITY;
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Secret test servers present to the test balancer.
pub const SERVER_SECRET: &str = "test-server-secret";

/// A balancer running on its own thread until dropped or stopped.
#[derive(Debug)]
pub struct TestBalancer {
    pub addr: SocketAddr,
    pub public_key: String,
    /// SHA-256 of its gRPC certificate; `None` when it runs in plaintext.
    pub fingerprint: Option<String>,
    /// The Prometheus endpoint, when the configuration asked for one.
    pub metrics: Option<SocketAddr>,
    running: Background,
}

/// The certificate of every test balancer in this process: self-signed
/// once, so that a restarted balancer keeps the fingerprint clients pin.
pub fn balancer_identity() -> gpupool_proto::tls::TlsSource {
    static IDENTITY: std::sync::OnceLock<gpupool_proto::tls::TlsSource> = std::sync::OnceLock::new();
    IDENTITY
        .get_or_init(|| {
            let names = vec!["localhost".into(), "127.0.0.1".into()];
            let identity = gpupool_proto::tls::Identity::load(&gpupool_proto::tls::TlsSource::SelfSigned { names })
                .expect("a self-signed certificate");
            let (chain, key) = identity.to_der();
            gpupool_proto::tls::TlsSource::Der { chain, key }
        })
        .clone()
}

/// A certificate authority for tests: it signs the certificates of a
/// balancer verified by CA and of gpu-servers presenting client
/// certificates.
#[derive(Debug)]
pub struct TestCa {
    /// The CA certificate, PEM (what clients and the balancer trust).
    pub pem: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> anyhow::Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "gpupool test CA");
        let cert = params.self_signed(&key)?;
        let pem = gpupool_proto::grpc_tls::pem_block("CERTIFICATE", cert.der()).into_bytes();
        Ok(Self { pem, issuer: rcgen::Issuer::new(params, key) })
    }

    /// A certificate for `names` signed by this CA, with its key.
    pub fn issue(&self, names: &[&str]) -> anyhow::Result<gpupool_proto::tls::TlsSource> {
        let key = rcgen::KeyPair::generate()?;
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(gpupool_proto::tls::TlsSource::Der { chain: vec![cert.der().to_vec()], key: key.serialize_der() })
    }
}

/// A gpu-server serving the simulated topology `spec` (with `layout` applied
/// to its MIG-enabled GPUs), sessions in worker processes on the emulated
/// device, joined to `balancer` as `id`.
pub fn pooled_server(balancer: &TestBalancer, id: &str, spec: &str, layout: Option<&[&str]>) -> TestServer {
    linked_server(balancer.link(id), spec, layout)
}

/// A gpu-server serving `spec`, joined to a balancer through `link`.
pub fn linked_server(link: gpupool_server::BalancerLink, spec: &str, layout: Option<&[&str]>) -> TestServer {
    TestServer::start(linked_config(link, spec, layout)).expect("server starts")
}

/// The configuration of [`linked_server`], to change before it starts.
pub fn linked_config(link: gpupool_server::BalancerLink, spec: &str, layout: Option<&[&str]>) -> ServerConfig {
    let mut c = isolated_config().expect("worker command");
    c.device = DeviceChoice::Emulated { memory: 1 << 30 };
    c.tokens = Vec::new();
    let nvml = gpupool_server::mig::SimulatedNvml::from_spec(spec).expect("topology");
    c.gpus = gpupool_server::mig::prepare(&nvml, layout).expect("layout");
    c.mig_control = Some(Arc::new(nvml));
    c.balancer = Some(link);
    c
}

/// Tenants with credentials of their own in [`tenant_balancer_config`]:
/// name and secret (what a client sets as `GPUPOOL_BALANCER_SECRET`).
pub const TENANT_SECRETS: &[(&str, &str)] = &[
    ("team-a", "gpt1_team-a-test-credential-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("team-b", "gpt1_team-b-test-credential-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"),
];

/// The credential of `tenant` in [`TENANT_SECRETS`].
pub fn tenant_secret(tenant: &str) -> &'static str {
    TENANT_SECRETS.iter().find(|(t, _)| *t == tenant).map(|(_, s)| *s).expect("a test tenant")
}

/// [`balancer_config`] with per-tenant credentials only ([`TENANT_SECRETS`]),
/// as a new deployment runs: a client's tenant is its credential's.
pub fn tenant_balancer_config(signer: gpupool_proto::lease::LeaseSigner) -> gpupool_balancer::BalancerConfig {
    let mut c = balancer_config(signer);
    let mut tenants = gpupool_balancer::tenants::Tenants::new();
    for (tenant, secret) in TENANT_SECRETS {
        tenants = tenants.with_secret(tenant, secret).expect("distinct test credentials");
    }
    c.clients = gpupool_balancer::ClientAuth::tenants(tenants);
    c
}

/// A balancer configuration on 127.0.0.1 port 0 with short timings: leases
/// live 3 s, servers heartbeat every 200 ms and are drained after 1 s of
/// silence, and no recovery window (a fresh pool). gRPC runs over TLS with
/// [`balancer_identity`]. Clients need no credential (the legacy mode, an
/// explicit opt-in), so tests name tenants freely; tests of tenant
/// isolation use [`tenant_balancer_config`].
pub fn balancer_config(signer: gpupool_proto::lease::LeaseSigner) -> gpupool_balancer::BalancerConfig {
    let mut c = gpupool_balancer::BalancerConfig::new(([127, 0, 0, 1], 0).into(), signer, SERVER_SECRET);
    c.clients = gpupool_balancer::ClientAuth::anonymous();
    c.tls = Some(gpupool_balancer::TlsSettings { identity: balancer_identity(), server_client_ca: None });
    c.pool.lease_ttl_ms = 3_000;
    c.pool.heartbeat_timeout_ms = 1_000;
    c.pool.recovery_ms = 0;
    c.heartbeat_interval = Duration::from_millis(200);
    c.tick_interval = Duration::from_millis(50);
    c.watch_interval = Duration::from_millis(50);
    c.shutdown_grace = Duration::from_millis(300);
    c
}

impl TestBalancer {
    /// Starts a balancer with `config`.
    pub fn start(config: gpupool_balancer::BalancerConfig) -> anyhow::Result<Self> {
        let (info, running) = Background::start(Duration::from_secs(30), move |ready, stop| async move {
            let balancer = gpupool_balancer::Balancer::bind(config).await?;
            let fingerprint = balancer.fingerprint().map(str::to_owned);
            ready((balancer.local_addr(), balancer.public_key_hex(), fingerprint, balancer.metrics_addr()));
            balancer.run(stop).await?;
            Ok(())
        })?;
        let (addr, public_key, fingerprint, metrics) = info;
        Ok(Self { addr, public_key, fingerprint, metrics, running })
    }

    /// The balancer's gRPC URL: `https://` with TLS, else `http://`.
    pub fn url(&self) -> String {
        let scheme = if self.fingerprint.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// How clients verify it: its pinned fingerprint, or plaintext.
    pub fn trust(&self) -> gpupool_proto::grpc_tls::BalancerTrust {
        match &self.fingerprint {
            Some(f) => gpupool_proto::grpc_tls::BalancerTrust::Fingerprint(
                gpupool_proto::tls::parse_fingerprint(f).expect("the balancer's fingerprint"),
            ),
            None => gpupool_proto::grpc_tls::BalancerTrust::Insecure,
        }
    }

    /// The environment that points libcuda or the Lambda extension at it.
    pub fn client_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("GPUPOOL_BALANCER", self.url())];
        match &self.fingerprint {
            Some(f) => env.push(("GPUPOOL_BALANCER_CERT_SHA256", f.clone())),
            None => env.push(("GPUPOOL_BALANCER_INSECURE", "1".into())),
        }
        env
    }

    /// A gRPC client of it, verifying it as [`TestBalancer::trust`] says.
    pub async fn client(
        &self,
    ) -> anyhow::Result<gpupool_proto::balancer::balancer_client::BalancerClient<tonic::transport::Channel>> {
        let channel = gpupool_proto::grpc_tls::endpoint(&self.url(), &self.trust(), None)?.connect().await?;
        Ok(gpupool_proto::balancer::balancer_client::BalancerClient::new(channel))
    }

    /// A server link to this balancer for a server named `server_id`.
    pub fn link(&self, server_id: &str) -> gpupool_server::BalancerLink {
        gpupool_server::BalancerLink {
            url: self.url(),
            trust: self.trust(),
            client_identity: None,
            server_id: server_id.into(),
            advertise: "127.0.0.1:0".into(),
            secret: SERVER_SECRET.into(),
            lease_key: self.public_key.clone(),
        }
    }

    /// Waits until `n` servers have registered (a lease asked for before
    /// that is refused: nothing could ever satisfy it).
    pub fn wait_for_servers(&self, n: usize) -> anyhow::Result<()> {
        use gpupool_proto::balancer::StatusRequest;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut client = self.client().await?;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                // The operator's credential sees the servers, whatever the
                // clients' mode.
                let mut req = tonic::Request::new(StatusRequest {});
                req.metadata_mut().insert("authorization", format!("Bearer {SERVER_SECRET}").parse()?);
                let status = client.status(req).await?.into_inner();
                if status.servers.len() >= n {
                    return Ok(());
                }
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "{} of {n} servers registered after 30 s",
                    status.servers.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }

    /// Stops the balancer and waits for it.
    pub fn stop(mut self) {
        self.running.stop();
    }
}
