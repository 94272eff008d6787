//! `gpupool-balancer`: runs the balancer (`serve`), makes its signing key
//! (`keygen`) and tenants' credentials (`new-tenant`), shows the pool to
//! operators and tenants (`status`) and drains a server (`drain`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use gpupool_balancer::pool::{Policy, Quota};
use gpupool_balancer::tenants::{self, CredentialDigest, Tenants};
use gpupool_balancer::{BalancerConfig, LegacyClients, TlsSettings, table};
use gpupool_proto::balancer::balancer_client::BalancerClient;
use gpupool_proto::balancer::{DrainRequest, StatusRequest, WatchRequest};
use gpupool_proto::grpc_tls::{self, BalancerTrust};
use gpupool_proto::lease::{LeaseSigner, unix_ms_now};
use gpupool_proto::tls::TlsSource;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(version, about = "gpupool balancer: leases virtual GPUs on a shared pool of MIG instances and GPUs")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the balancer.
    Serve(Box<Serve>),
    /// Create the lease-signing key file if it does not exist; print its
    /// public key (what gpu-servers take as `--lease-key`).
    Keygen {
        #[arg(long, env = "GPUPOOL_KEY_FILE")]
        key_file: PathBuf,
    },
    /// Make a credential for a tenant: prints the secret to give the
    /// tenant (its GPUPOOL_BALANCER_SECRET) and the line to add to the
    /// tenants file (only the secret's digest; the balancer never stores
    /// the secret).
    NewTenant {
        /// The tenant's name.
        tenant: String,
        /// Its quota, `leases:N,memory-gib:M,share-fate` (as `--quota`).
        #[arg(long)]
        quota: Option<String>,
    },
    /// Show the pool: servers, GPUs, instances, leases, queue (with the
    /// servers' secret); a tenant's credential shows its own leases and
    /// queued requests only.
    Status {
        /// The balancer's URL.
        #[arg(long, env = "GPUPOOL_BALANCER", default_value = "https://127.0.0.1:50051")]
        balancer: String,
        /// A credential: a tenant's (its own leases), or the servers'
        /// secret (the whole pool).
        #[arg(long, env = "GPUPOOL_BALANCER_SECRET")]
        secret: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
        /// Keep following changes.
        #[arg(long)]
        watch: bool,
    },
    /// Drain a server: nothing new is placed on it, and its sessions
    /// migrate to other servers with their leases (docs/migration.md).
    /// Waits until the server has no session left.
    Drain {
        /// The server's id (as `status` lists it).
        server: String,
        /// The balancer's URL.
        #[arg(long, env = "GPUPOOL_BALANCER", default_value = "https://127.0.0.1:50051")]
        balancer: String,
        /// The secret gpu-servers present (draining is the fleet's call;
        /// the drain is followed with it too).
        #[arg(long, env = "GPUPOOL_SERVER_SECRET")]
        server_secret: String,
        /// Ignored (the drain is followed with the servers' secret); kept
        /// so that older scripts still run.
        #[arg(long, hide = true)]
        secret: Option<String>,
        #[command(flatten)]
        trust: TrustArgs,
        /// How long to wait for the sessions to leave, in seconds (0: do
        /// not wait).
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
    },
}

/// How the CLI verifies the balancer (the variables libcuda reads too).
#[derive(Debug, clap::Args)]
struct TrustArgs {
    /// Hex SHA-256 of the balancer's certificate (what `serve` logs).
    #[arg(long, env = "GPUPOOL_BALANCER_CERT_SHA256")]
    cert_sha256: Option<String>,
    /// Or: a PEM CA bundle to verify the balancer's certificate against.
    #[arg(long, env = "GPUPOOL_BALANCER_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Name in the certificate with `--ca-file` (default: the URL's host).
    #[arg(long, env = "GPUPOOL_BALANCER_SERVER_NAME")]
    server_name: Option<String>,
    /// Plaintext, to a balancer run with `--insecure` (an `http://` URL).
    #[arg(long, env = "GPUPOOL_BALANCER_INSECURE")]
    insecure: bool,
}

impl TrustArgs {
    fn trust(&self) -> anyhow::Result<BalancerTrust> {
        let ca_pem = self.ca_file.as_deref().map(grpc_tls::read_bounded).transpose()?;
        BalancerTrust::from_settings(self.cert_sha256.as_deref(), ca_pem, self.server_name.as_deref(), self.insecure)
            .context("verifying the balancer (--cert-sha256, --ca-file or --insecure)")
    }
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// TCP address of the gRPC service.
    #[arg(long, env = "GPUPOOL_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Lease-signing key file (created, mode 0600, when missing). Keep it:
    /// servers verify leases with its public key, and a restarted balancer
    /// takes back live leases only if it signed them.
    #[arg(long, env = "GPUPOOL_KEY_FILE")]
    key_file: PathBuf,
    /// Secret gpu-servers present to register.
    #[arg(long, env = "GPUPOOL_SERVER_SECRET")]
    server_secret: String,
    /// The tenants file: each tenant's name, the SHA-256 of its credential
    /// and optionally its quota, one credential a line (`new-tenant` makes
    /// them; docs/balancer.md). A client's tenant is the one its credential
    /// belongs to. SIGHUP reads it again.
    #[arg(long, env = "GPUPOOL_TENANTS_FILE")]
    tenants: Option<PathBuf>,
    /// Legacy: one secret shared by every client, which then leases for any
    /// tenant and sees every lease. Accepted only with
    /// `--allow-shared-client-secret`, while clients move to per-tenant
    /// credentials.
    #[arg(long, env = "GPUPOOL_CLIENT_SECRET", requires = "allow_shared_client_secret")]
    client_secret: Option<String>,
    /// Accept `--client-secret` (logs a warning): tenants are then not
    /// isolated from one another.
    #[arg(long, env = "GPUPOOL_ALLOW_SHARED_CLIENT_SECRET", requires = "client_secret")]
    allow_shared_client_secret: bool,
    /// Legacy: clients need no credential and lease for any tenant (logs a
    /// warning; a trusted network only).
    #[arg(long, env = "GPUPOOL_ALLOW_ANONYMOUS_CLIENTS", conflicts_with = "client_secret")]
    allow_anonymous_clients: bool,
    /// Placement among equally good instances: `spread` (least-loaded
    /// server) or `binpack` (fill servers up).
    #[arg(long, env = "GPUPOOL_POLICY", default_value = "spread", value_parser = ["spread", "binpack"])]
    policy: String,
    /// Lease lifetime without a renewal, in ms (clients renew every third).
    #[arg(long, env = "GPUPOOL_LEASE_TTL_MS", default_value_t = 30_000)]
    lease_ttl_ms: u64,
    /// Interval servers send heartbeats at, in ms.
    #[arg(long, env = "GPUPOOL_HEARTBEAT_MS", default_value_t = 2_000)]
    heartbeat_ms: u64,
    /// A server silent this long (ms) is drained.
    #[arg(long, env = "GPUPOOL_HEARTBEAT_TIMEOUT_MS", default_value_t = 10_000)]
    heartbeat_timeout_ms: u64,
    /// Requests waiting at most.
    #[arg(long, env = "GPUPOOL_QUEUE", default_value_t = 1024)]
    queue: usize,
    /// Shared leases on a whole GPU may together ask this many percent of
    /// its memory (100: no overcommit); only on servers that swap idle
    /// sessions out (`gpupool-server --swap-host-mib`), and by at most the
    /// host memory they swap into.
    #[arg(long, env = "GPUPOOL_MEMORY_OVERCOMMIT_PERCENT", default_value_t = 100)]
    memory_overcommit_percent: u32,
    /// MIG layouts: `static` (as servers registered them) or `dynamic`
    /// (idle MIG GPUs laid out anew from the demand of leases and waiting
    /// requests, every --mig-plan-interval-ms; docs/fleetsim.md).
    #[arg(long, env = "GPUPOOL_MIG_POLICY", default_value = "static", value_parser = ["static", "dynamic"])]
    mig_policy: String,
    /// With `--mig-policy dynamic`: how often to plan (ms).
    #[arg(long, env = "GPUPOOL_MIG_PLAN_INTERVAL_MS", default_value_t = 10_000)]
    mig_plan_interval_ms: u64,
    /// How often (ms) shared leases move off GPUs their servers report
    /// busy (85 %+) to idle ones (50 % or less) on other servers, their
    /// sessions migrating (each move pauses its session briefly); 0: never.
    #[arg(long, env = "GPUPOOL_REBALANCE_INTERVAL_MS", default_value_t = 0)]
    rebalance_interval_ms: u64,
    /// Whose leases allow RDMA between client and server (signed in the
    /// lease; the server still needs a device and `--rdma`): `none`,
    /// `all`, or tenants separated by commas.
    #[arg(long, env = "GPUPOOL_ALLOW_RDMA", default_value = "none")]
    allow_rdma: String,
    /// After a start, grant nothing new for this long (ms) so that live
    /// leases come back first. Default: one renew interval plus one
    /// heartbeat interval plus a second.
    #[arg(long, env = "GPUPOOL_RECOVERY_MS")]
    recovery_ms: Option<u64>,
    /// TCP address of a Prometheus endpoint (`GET /metrics`): lease
    /// counters, leases and queue, servers and tenants. Off by default.
    #[arg(long, env = "GPUPOOL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Per-tenant quota, `tenant=leases:N,memory-gib:M,share-fate` (each
    /// part optional; repeatable; tenant `*` sets the default). `share-fate`:
    /// the tenant's shared leases may run on one GPU with other opted-in
    /// tenants' (a fault of one session ends the others' work).
    #[arg(long = "quota", env = "GPUPOOL_QUOTAS", value_delimiter = ';')]
    quotas: Vec<String>,
    /// PEM certificate chain of the gRPC service (with `--key`); without
    /// them a self-signed certificate is generated and its SHA-256 logged.
    #[arg(long, env = "GPUPOOL_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(long, env = "GPUPOOL_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// PEM CA that gpu-servers' client certificates must chain to; with it,
    /// servers must present one to register and heartbeat.
    #[arg(long, env = "GPUPOOL_SERVER_CLIENT_CA", conflicts_with = "insecure")]
    server_client_ca: Option<PathBuf>,
    /// Serve gRPC in plaintext: leases and secrets cross the network in
    /// clear. For a trusted network only; logs a warning.
    #[arg(long, env = "GPUPOOL_INSECURE", conflicts_with_all = ["cert", "key"])]
    insecure: bool,
}

fn parse_quota(s: &str) -> anyhow::Result<(String, Quota)> {
    let (tenant, limits) = s.split_once('=').context("a quota is tenant=leases:N,memory-gib:M,share-fate")?;
    let quota = tenants::parse_quota(limits).map_err(|e| anyhow::anyhow!("quota of {tenant:?}: {e}"))?;
    Ok((tenant.to_string(), quota))
}

/// Reads the key file, or creates it (readable by its owner only).
fn load_or_create_key(path: &Path) -> anyhow::Result<LeaseSigner> {
    match std::fs::read_to_string(path) {
        Ok(text) => LeaseSigner::from_hex(&text).with_context(|| format!("key file {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let signer = LeaseSigner::from_seed(rand::random());
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating key file {}", path.display()))?;
            writeln!(f, "{}", signer.seed_hex())?;
            tracing::info!(path = %path.display(), "created a new lease-signing key");
            Ok(signer)
        }
        Err(e) => Err(e).with_context(|| format!("reading key file {}", path.display())),
    }
}

fn config(s: Serve) -> anyhow::Result<BalancerConfig> {
    let signer = load_or_create_key(&s.key_file)?;
    let mut c = BalancerConfig::new(s.listen, signer, s.server_secret);
    if let Some(path) = &s.tenants {
        c.clients.tenants = Tenants::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    c.clients.legacy = match (s.client_secret, s.allow_anonymous_clients) {
        (Some(secret), _) => Some(LegacyClients::SharedSecret(secret)),
        (None, true) => Some(LegacyClients::Anonymous),
        (None, false) => None,
    };
    c.metrics_listen = s.metrics_listen;
    c.tls = if s.insecure {
        None
    } else {
        let mut tls = TlsSettings::self_signed();
        if let (Some(cert), Some(key)) = (s.cert, s.key) {
            tls.identity = TlsSource::Files { cert, key };
        }
        if let Some(path) = &s.server_client_ca {
            tls.server_client_ca = Some(gpupool_proto::grpc_tls::read_bounded(path)?);
        }
        Some(tls)
    };
    c.pool.policy = if s.policy == "binpack" { Policy::Binpack } else { Policy::Spread };
    c.pool.lease_ttl_ms = s.lease_ttl_ms;
    c.pool.heartbeat_timeout_ms = s.heartbeat_timeout_ms;
    c.pool.queue_capacity = s.queue;
    c.pool.memory_overcommit_percent = s.memory_overcommit_percent;
    c.mig_plan_interval = (s.mig_policy == "dynamic").then(|| Duration::from_millis(s.mig_plan_interval_ms.max(100)));
    c.rebalance_interval = (s.rebalance_interval_ms > 0).then(|| Duration::from_millis(s.rebalance_interval_ms));
    c.allow_rdma = s.allow_rdma.parse().map_err(|e: String| anyhow::anyhow!("--allow-rdma: {e}"))?;
    c.heartbeat_interval = Duration::from_millis(s.heartbeat_ms);
    c.pool.recovery_ms = s.recovery_ms.unwrap_or(s.lease_ttl_ms / 3 + s.heartbeat_ms + 1_000);
    for q in &s.quotas {
        let (tenant, quota) = parse_quota(q)?;
        if tenant == "*" {
            c.pool.default_quota = quota;
        } else {
            c.pool.tenant_quotas.insert(tenant, quota);
        }
    }
    c.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(c)
}

async fn connect(balancer: &str, trust: &BalancerTrust) -> anyhow::Result<BalancerClient<tonic::transport::Channel>> {
    let channel = grpc_tls::endpoint(balancer, trust, None)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {balancer}: {}", grpc_tls::error_chain(&e)))?;
    Ok(BalancerClient::new(channel))
}

/// Adds `authorization: Bearer <secret>` to a request.
fn authorize(secret: Option<&str>, r: &mut tonic::metadata::MetadataMap) {
    if let Some(s) = secret
        && let Ok(v) = format!("Bearer {s}").parse()
    {
        r.insert("authorization", v);
    }
}

async fn status(balancer: String, secret: Option<String>, trust: BalancerTrust, watch: bool) -> anyhow::Result<()> {
    let mut client = connect(&balancer, &trust).await?;
    let call_error = |status: tonic::Status| anyhow::anyhow!("{}", grpc_tls::describe_for(&status, &trust));
    let authorize = |r: &mut tonic::metadata::MetadataMap| authorize(secret.as_deref(), r);
    if watch {
        let mut req = tonic::Request::new(WatchRequest { min_interval_ms: 1000 });
        authorize(req.metadata_mut());
        let mut stream = client.watch(req).await.map_err(call_error)?.into_inner();
        while let Some(s) = stream.message().await.map_err(call_error)? {
            print!("\x1b[2J\x1b[H{}", table::render(&s, unix_ms_now()));
        }
        return Ok(());
    }
    let mut req = tonic::Request::new(StatusRequest {});
    authorize(req.metadata_mut());
    let s = client.status(req).await.map_err(call_error)?.into_inner();
    print!("{}", table::render(&s, unix_ms_now()));
    Ok(())
}

/// The `drain` command's arguments, the trust resolved.
struct DrainArgs {
    server: String,
    balancer: String,
    server_secret: String,
    trust: BalancerTrust,
    wait: Duration,
}

async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let DrainArgs { server, balancer, server_secret, trust, wait } = args;
    let mut client = connect(&balancer, &trust).await?;
    let call_error = |status: tonic::Status| anyhow::anyhow!("{}", grpc_tls::describe_for(&status, &trust));
    let mut req = tonic::Request::new(DrainRequest { server_id: server.clone() });
    authorize(Some(&server_secret), req.metadata_mut());
    let plan = client.drain(req).await.map_err(call_error)?.into_inner();
    println!(
        "draining {server}: {} sessions' leases moving, {} with no room elsewhere",
        plan.moving.len(),
        plan.stuck.len()
    );
    for id in &plan.stuck {
        println!("  lease {id:#018x} stays: no free instance elsewhere fits it (drain again when there is)");
    }
    if wait.is_zero() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut told = std::collections::HashSet::new();
    loop {
        // The servers' secret sees every server's sessions.
        let mut req = tonic::Request::new(StatusRequest {});
        authorize(Some(&server_secret), req.metadata_mut());
        let status = client.status(req).await.map_err(call_error)?.into_inner();
        let sessions = status.servers.iter().find(|s| s.server_id == server).map_or(0, |s| s.sessions);
        if sessions == 0 {
            println!("{server} holds no session");
            return Ok(());
        }
        // Sessions of the plan's leases that refused to move stay: said
        // once each; when no other session is left to move, the drain
        // cannot finish.
        let refused: Vec<&gpupool_proto::balancer::LeaseStatus> = status
            .leases
            .iter()
            .filter(|l| l.server_id == server && !l.move_refused.is_empty() && plan.moving.contains(&l.lease_id))
            .collect();
        for l in &refused {
            if told.insert(l.lease_id) {
                println!("  lease {:#018x} stays on {server}: {}", l.lease_id, l.move_refused);
            }
        }
        if !refused.is_empty() && refused.len() >= sessions as usize {
            anyhow::bail!("{server} still holds {sessions} sessions: {} did not move (above)", refused.len());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{server} still holds {sessions} sessions after {wait:?}");
        }
        println!("{server}: {sessions} sessions left");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.command {
        Command::Keygen { key_file } => {
            let signer = load_or_create_key(&key_file)?;
            println!("{}", signer.public_key_hex());
            Ok(())
        }
        Command::Status { balancer, secret, trust, watch } => {
            let trust = trust.trust()?;
            rt.block_on(status(balancer, secret, trust, watch))
        }
        Command::Drain { server, balancer, server_secret, secret: _, trust, wait_secs } => {
            let trust = trust.trust()?;
            let wait = Duration::from_secs(wait_secs);
            rt.block_on(drain(DrainArgs { server, balancer, server_secret, trust, wait }))
        }
        Command::NewTenant { tenant, quota } => {
            let secret = tenants::generate_secret();
            let digest = CredentialDigest::of(&secret);
            // The name and quota as the balancer will read them.
            Tenants::new().add(tenant.as_str(), digest).map_err(|e| anyhow::anyhow!("{e}"))?;
            let line = match &quota {
                Some(q) => {
                    tenants::parse_quota(q).map_err(|e| anyhow::anyhow!("--quota: {e}"))?;
                    format!("{tenant} {digest} {q}")
                }
                None => format!("{tenant} {digest}"),
            };
            println!("# the credential of tenant {tenant} (its GPUPOOL_BALANCER_SECRET; not stored anywhere):");
            println!("{secret}");
            println!("# its line in the balancer's tenants file (--tenants):");
            println!("{line}");
            Ok(())
        }
        Command::Serve(s) => {
            let tenants_file = s.tenants.clone();
            let config = config(*s)?;
            rt.block_on(async {
                let balancer = gpupool_balancer::Balancer::bind(config).await?;
                if let Some(path) = tenants_file {
                    // Listening before the first line is printed: from then
                    // on a SIGHUP reloads, never ends the process.
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                        Ok(hangup) => {
                            tokio::spawn(reload_tenants_on_hangup(path, balancer.tenants(), hangup));
                        }
                        Err(e) => tracing::warn!(error = %e, "no SIGHUP: the tenants file is read at start only"),
                    }
                }
                let transport = match balancer.fingerprint() {
                    Some(fingerprint) => format!("TLS, certificate SHA-256 {fingerprint}"),
                    None => "plaintext".to_string(),
                };
                println!(
                    "gpupool-balancer listening on {} ({transport}, lease public key {})",
                    balancer.local_addr(),
                    balancer.public_key_hex()
                );
                if let Some(addr) = balancer.metrics_addr() {
                    println!("gpupool-balancer metrics on http://{addr}/metrics");
                }
                balancer.run(shutdown_signal()).await?;
                Ok(())
            })
        }
    }
}

/// Reads the tenants file again at every SIGHUP: credentials added,
/// rotated or removed without a restart. A file with a problem changes
/// nothing (the problem is logged).
async fn reload_tenants_on_hangup(
    path: PathBuf,
    handle: gpupool_balancer::TenantsHandle,
    mut hangup: tokio::signal::unix::Signal,
) {
    while hangup.recv().await.is_some() {
        let replaced = Tenants::load(&path).and_then(|t| handle.replace(t).map_err(|e| e.to_string()));
        if let Err(e) = replaced {
            tracing::warn!(error = %e, "tenants file not reloaded; the tenants before it stay");
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
