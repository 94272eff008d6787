//! Typed balancer configuration; the binary fills it from flags and
//! environment, [`BalancerConfig::validate`] reports every bad value at once.

use crate::pool::PoolConfig;
use crate::tenants::Tenants;
use gpupool_proto::lease::LeaseSigner;
use gpupool_proto::tls::TlsSource;
use std::net::SocketAddr;
use std::time::Duration;

/// Everything a balancer needs to run.
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// TCP address of the gRPC service (port 0 picks one).
    pub listen: SocketAddr,
    /// Placement, quotas, lease and heartbeat timing, queue bound.
    pub pool: PoolConfig,
    /// Key that signs leases. Keep it across restarts (a key file): servers
    /// verify leases with its public half, and a restarted balancer takes
    /// back the leases clients and servers still hold only if it signed them.
    pub signer: LeaseSigner,
    /// Servers must heartbeat at least this often (told to them at
    /// registration); a server silent for `pool.heartbeat_timeout_ms` is
    /// drained.
    pub heartbeat_interval: Duration,
    /// How often leases, servers and the queue are checked for deadlines.
    pub tick_interval: Duration,
    /// Secret gpu-servers present (`authorization: Bearer …`) to register
    /// and heartbeat, so no stranger can join the pool and receive clients.
    pub server_secret: String,
    /// How clients (`Allocate`, `Renew`, `Release`, `Status`, `Watch`)
    /// prove which tenant they are.
    pub clients: ClientAuth,
    /// Longest wait an `Allocate` may ask for.
    pub max_wait: Duration,
    /// Least time between two `Watch` updates.
    pub watch_interval: Duration,
    /// Time open connections get to close after a shutdown signal.
    pub shutdown_grace: Duration,
    /// TCP address of the Prometheus endpoint (`GET /metrics`); `None`
    /// (the default): no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on the gRPC service; `None`: plaintext, an explicit opt-in
    /// (`--insecure`) for networks trusted with leases and secrets.
    pub tls: Option<TlsSettings>,
    /// Dynamic MIG layouts (`--mig-policy dynamic`): how often idle MIG
    /// GPUs are planned anew from demand (`pool::relayout`); `None` (the
    /// default): layouts stay as servers registered them.
    pub mig_plan_interval: Option<Duration>,
    /// How often shared leases move off GPUs their servers report busy to
    /// idle ones (`pool::rebalance`; their sessions migrate); `None` (the
    /// default): never.
    pub rebalance_interval: Option<Duration>,
    /// Which tenants' leases allow RDMA (`LeaseClaims.allow_rdma`, signed
    /// with the lease; `docs/rdma.md`). None by default.
    pub allow_rdma: RdmaPolicy,
}

/// Whose sessions may leave QUIC for RDMA. RDMA needs the client and the
/// server on one RDMA fabric, and the client's traffic then bypasses the
/// QUIC (TLS) path: an operator opts tenants in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RdmaPolicy {
    /// No lease allows it.
    #[default]
    Nobody,
    /// Every lease allows it.
    Everyone,
    /// Leases of these tenants.
    Tenants(std::collections::BTreeSet<String>),
}

impl RdmaPolicy {
    /// Whether a lease of `tenant` allows RDMA.
    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            Self::Nobody => false,
            Self::Everyone => true,
            Self::Tenants(t) => t.contains(tenant),
        }
    }
}

impl std::str::FromStr for RdmaPolicy {
    type Err = String;
    /// `none`, `all`, or tenants separated by commas.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "none" => Ok(Self::Nobody),
            "all" => Ok(Self::Everyone),
            list => {
                let tenants: std::collections::BTreeSet<String> =
                    list.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect();
                if tenants.is_empty() {
                    return Err(format!("no tenant in {list:?}"));
                }
                Ok(Self::Tenants(tenants))
            }
        }
    }
}

/// How clients authenticate.
///
/// Per tenant by default: each tenant presents its own credential
/// (`authorization: Bearer <secret>`), the balancer takes the tenant from
/// it, and the tenant can neither lease for, nor release, renew or see the
/// leases of another. The servers' secret is the operator's credential:
/// `Status` and `Watch` show it the whole pool.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    /// The tenants and the digests of their credentials.
    pub tenants: Tenants,
    /// A legacy mode, for deployments that still migrate to per-tenant
    /// credentials; setting it is the explicit opt-in (logged as a
    /// warning at start).
    pub legacy: Option<LegacyClients>,
}

/// How clients authenticated before per-tenant credentials. A legacy
/// client names any tenant and sees the whole pool: the tenant isolation
/// of [`ClientAuth`] holds only once no legacy mode is left.
#[derive(Clone, PartialEq, Eq)]
pub enum LegacyClients {
    /// One secret shared by every client.
    SharedSecret(String),
    /// No credential at all (a private network only).
    Anonymous,
}

impl std::fmt::Debug for LegacyClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Configurations are logged at times; the secret is not.
        match self {
            Self::SharedSecret(_) => f.write_str("SharedSecret(…)"),
            Self::Anonymous => f.write_str("Anonymous"),
        }
    }
}

impl ClientAuth {
    /// Tenants presenting their own credentials, nothing else.
    pub fn tenants(tenants: Tenants) -> Self {
        Self { tenants, legacy: None }
    }

    /// Any client, with or without a credential, naming any tenant (and
    /// tenants with their own credential, scoped as usual).
    pub fn anonymous() -> Self {
        Self { tenants: Tenants::new(), legacy: Some(LegacyClients::Anonymous) }
    }
}

/// The balancer's certificate and what it asks of client certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Its certificate: PEM files, or self-signed at start (clients pin the
    /// fingerprint it logs).
    pub identity: TlsSource,
    /// PEM CA that gpu-servers' client certificates must chain to; when
    /// set, `Register`, `Heartbeat` and `CheckLease` require one. Clients
    /// that lease (libcuda, the Lambda extension) need none.
    pub server_client_ca: Option<Vec<u8>>,
}

impl TlsSettings {
    /// A self-signed certificate for `localhost` and 127.0.0.1, no client
    /// certificates.
    pub fn self_signed() -> Self {
        Self {
            identity: TlsSource::SelfSigned { names: vec!["localhost".into(), "127.0.0.1".into()] },
            server_client_ca: None,
        }
    }
}

impl BalancerConfig {
    /// Defaults on `listen`, signing with `signer`, servers presenting
    /// `server_secret`; no client can lease until [`BalancerConfig::clients`]
    /// names tenants (or a legacy mode).
    pub fn new(listen: SocketAddr, signer: LeaseSigner, server_secret: impl Into<String>) -> Self {
        let pool = PoolConfig::default();
        Self {
            listen,
            heartbeat_interval: Duration::from_millis(pool.heartbeat_timeout_ms / 4),
            pool,
            signer,
            tick_interval: Duration::from_millis(100),
            server_secret: server_secret.into(),
            clients: ClientAuth::default(),
            max_wait: Duration::from_secs(300),
            watch_interval: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(5),
            metrics_listen: None,
            tls: Some(TlsSettings::self_signed()),
            mig_plan_interval: None,
            rebalance_interval: None,
            allow_rdma: RdmaPolicy::Nobody,
        }
    }

    /// Checks every setting and reports all problems together.
    pub fn validate(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        if let Err(e) = self.pool.validate() {
            bad.push(e);
        }
        if self.server_secret.is_empty() {
            bad.push("the server secret must not be empty".into());
        }
        match &self.clients.legacy {
            Some(LegacyClients::SharedSecret(s)) if s.is_empty() => {
                bad.push("the shared client secret, when allowed, must not be empty".into());
            }
            None if self.clients.tenants.is_empty() => bad.push(
                "no client could lease: give the tenants and their credentials (--tenants FILE), or allow a \
                 legacy mode (--client-secret with --allow-shared-client-secret, or --allow-anonymous-clients)"
                    .into(),
            ),
            _ => {}
        }
        // One credential with two meanings would be taken as the tenant's.
        if self.clients.tenants.authenticate(&self.server_secret).is_some() {
            bad.push("the servers' secret is also a tenant's credential".into());
        }
        if let Some(LegacyClients::SharedSecret(s)) = &self.clients.legacy
            && (self.clients.tenants.authenticate(s).is_some() || *s == self.server_secret)
        {
            bad.push("the shared client secret is also a tenant's credential or the servers' secret".into());
        }
        for tenant in self.clients.tenants.quotas().keys() {
            if self.pool.tenant_quotas.contains_key(tenant) {
                bad.push(format!("tenant {tenant:?} has a quota both in --quota and in the tenants file"));
            }
        }
        if self.heartbeat_interval.is_zero() || self.tick_interval.is_zero() || self.watch_interval.is_zero() {
            bad.push("heartbeat, tick and watch intervals must be positive".into());
        }
        if self.heartbeat_interval.as_millis() as u64 * 2 > self.pool.heartbeat_timeout_ms {
            bad.push("the heartbeat timeout must be at least twice the heartbeat interval".into());
        }
        if bad.is_empty() { Ok(()) } else { Err(bad.join("; ")) }
    }

    /// The pool's configuration with the tenants file's quotas added.
    pub(crate) fn pool_config(&self) -> PoolConfig {
        let mut pool = self.pool.clone();
        pool.dynamic_layouts |= self.mig_plan_interval.is_some();
        for (tenant, quota) in self.clients.tenants.quotas() {
            pool.tenant_quotas.entry(tenant.clone()).or_insert(*quota);
        }
        pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(clients: ClientAuth) -> BalancerConfig {
        let mut c = BalancerConfig::new(([127, 0, 0, 1], 0).into(), LeaseSigner::from_seed([1; 32]), "servers");
        c.clients = clients;
        c
    }

    #[test]
    fn the_rdma_policy_names_nobody_everyone_or_tenants() {
        assert_eq!(
            BalancerConfig::new(([127, 0, 0, 1], 0).into(), LeaseSigner::from_seed([1; 32]), "s").allow_rdma,
            RdmaPolicy::Nobody
        );
        let none: RdmaPolicy = "none".parse().expect("none");
        assert!(!none.allows("a"));
        let all: RdmaPolicy = "all".parse().expect("all");
        assert!(all.allows("a") && all.allows("b"));
        let some: RdmaPolicy = "a, c".parse().expect("tenants");
        assert!(some.allows("a") && some.allows("c") && !some.allows("b") && !some.allows("a, c"));
        assert!(",".parse::<RdmaPolicy>().is_err());
    }

    #[test]
    fn clients_are_per_tenant_unless_a_legacy_mode_is_asked_for() {
        let err = config(ClientAuth::default()).validate().expect_err("no client could lease");
        assert!(err.contains("--tenants FILE"), "{err}");
        let tenants = Tenants::new().with_secret("a", "secret-a").expect("tenant");
        config(ClientAuth::tenants(tenants.clone())).validate().expect("per tenant");
        config(ClientAuth::anonymous()).validate().expect("legacy: anonymous");
        let shared =
            |s: &str| ClientAuth { tenants: tenants.clone(), legacy: Some(LegacyClients::SharedSecret(s.into())) };
        config(shared("shared")).validate().expect("legacy: a shared secret beside tenants");
        for clash in ["secret-a", "servers", ""] {
            assert!(config(shared(clash)).validate().is_err(), "shared secret {clash:?}");
        }
        let servers = Tenants::new().with_secret("a", "servers").expect("tenant");
        let err = config(ClientAuth::tenants(servers)).validate().expect_err("clash");
        assert!(err.contains("also a tenant's credential"), "{err}");
        assert_eq!(format!("{:?}", shared("shared").legacy), "Some(SharedSecret(…))", "no secret in Debug");
    }

    #[test]
    fn a_quota_is_set_in_one_place() {
        let tenants = Tenants::parse(&format!("a {} leases:1\n", crate::tenants::CredentialDigest::of("s")))
            .expect("tenants file");
        let mut c = config(ClientAuth::tenants(tenants));
        assert_eq!(c.pool_config().tenant_quotas["a"].max_leases, Some(1), "the file's quota applies");
        c.pool.tenant_quotas.insert("a".into(), crate::pool::Quota::default());
        assert!(c.validate().expect_err("twice").contains("both in --quota and in the tenants file"));
    }
}
