//! Who may open a session. The server asks an [`Authenticator`] about the
//! token in every `Hello`: shared secrets ([`StaticTokens`]) or leases the
//! balancer signed ([`LeaseTokens`]), checked offline against its public key.

use gpupool_proto::lease::{LeaseError, LeaseVerifier, unix_ms_now};
use std::collections::HashSet;

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who holds the token, for logs.
    pub subject: String,
    /// The tenant whose session it is, for per-tenant metrics: the lease's
    /// tenant, or the kind of token when it names none.
    pub tenant: String,
    /// Memory quota for the session, when the token sets one.
    pub memory_quota: Option<u64>,
    /// Session id to use, when the token was issued for one session (a
    /// worker process's ticket).
    pub session_id: Option<u64>,
    /// The balancer's lease the session runs under, when it presented one.
    pub lease: Option<LeaseGrant>,
    /// The session's resume secret, when it was chosen upstream (a worker
    /// process's ticket carries the supervisor's).
    pub resume_secret: Option<String>,
    /// Whether the session may run over RDMA: the lease's signed
    /// `allow_rdma` (the balancer's policy); a static token is the
    /// operator's own and allows it (the server's `--rdma` still decides).
    pub allow_rdma: bool,
}

/// What a lease token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    pub lease_id: u64,
    /// The instance the session must run on.
    pub instance_uuid: String,
    /// The token itself, shown to a restarted balancer.
    pub token: String,
    /// A shared lease's share of its whole GPU's SMs in percent (1..=100);
    /// `None` for an exclusive lease. Shared sessions run as MPS clients
    /// (`docs/sharing.md`).
    pub shared_percent: Option<u32>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("no session token presented")]
    Missing,
    /// The token is not one the server accepts.
    #[error("session token not accepted")]
    Invalid,
    /// A one-time ticket was already used or has expired.
    #[error("session ticket already used or expired")]
    Spent,
    /// A lease token that is forged, expired or malformed.
    #[error("lease refused: {0}")]
    Lease(#[from] LeaseError),
    /// A valid lease for another server or for an instance this server does
    /// not serve.
    #[error("lease {lease_id:#x} is for {what}, which this server does not serve")]
    Foreign { lease_id: u64, what: String },
}

/// Decides whether a token opens a session.
pub trait Authenticator: Send + Sync + std::fmt::Debug + 'static {
    fn authenticate(&self, token: &str) -> Result<Grant, AuthError>;

    /// The instances served changed (a MIG GPU laid out anew): leases name
    /// these from now on. Authenticators that do not check instances ignore it.
    fn set_instances(&self, _instances: HashSet<String>) {}
}

/// A fixed set of shared-secret tokens.
#[derive(Debug, Clone)]
pub struct StaticTokens {
    tokens: Vec<String>,
}

impl StaticTokens {
    pub fn new(tokens: Vec<String>) -> Self {
        Self { tokens }
    }
}

/// Compares without an early exit, so timing does not reveal a prefix.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for StaticTokens {
    fn authenticate(&self, token: &str) -> Result<Grant, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut ok = false;
        for t in &self.tokens {
            ok |= constant_time_eq(t.as_bytes(), token.as_bytes());
        }
        if ok {
            Ok(Grant {
                subject: "static-token".into(),
                tenant: "(static token)".into(),
                memory_quota: None,
                session_id: None,
                lease: None,
                resume_secret: None,
                allow_rdma: true,
            })
        } else {
            Err(AuthError::Invalid)
        }
    }
}

/// Leases signed by the balancer, for this server's instances; shared
/// secrets too when configured (operators' and tests' direct access).
#[derive(Debug)]
pub struct LeaseTokens {
    verifier: LeaseVerifier,
    server_id: String,
    instances: std::sync::RwLock<HashSet<String>>,
    statics: StaticTokens,
}

impl LeaseTokens {
    pub fn new(verifier: LeaseVerifier, server_id: String, instances: HashSet<String>, statics: Vec<String>) -> Self {
        Self { verifier, server_id, instances: std::sync::RwLock::new(instances), statics: StaticTokens::new(statics) }
    }
}

impl Authenticator for LeaseTokens {
    fn authenticate(&self, token: &str) -> Result<Grant, AuthError> {
        if !token.starts_with("gpl1.") {
            return self.statics.authenticate(token);
        }
        let claims = self.verifier.verify(token, unix_ms_now())?;
        if claims.server_id != self.server_id {
            return Err(AuthError::Foreign { lease_id: claims.lease_id, what: format!("server {}", claims.server_id) });
        }
        let served =
            self.instances.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&claims.instance_uuid);
        if !served {
            return Err(AuthError::Foreign {
                lease_id: claims.lease_id,
                what: format!("instance {}", claims.instance_uuid),
            });
        }
        Ok(Grant {
            subject: format!("tenant {} lease {:#x}", claims.tenant, claims.lease_id),
            tenant: claims.tenant.clone(),
            memory_quota: Some(claims.memory_bytes),
            session_id: None,
            lease: Some(LeaseGrant {
                lease_id: claims.lease_id,
                instance_uuid: claims.instance_uuid,
                token: token.into(),
                // An unknown class number is not a share: such a session
                // runs alone, which never weakens isolation.
                shared_percent: (claims.class == gpupool_proto::balancer::LeaseClass::Shared as i32)
                    .then(|| claims.compute_percent.clamp(1, 100)),
            }),
            resume_secret: None,
            allow_rdma: claims.allow_rdma,
        })
    }

    fn set_instances(&self, instances: HashSet<String>) {
        *self.instances.write().unwrap_or_else(std::sync::PoisonError::into_inner) = instances;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpupool_proto::balancer::LeaseClaims;
    use gpupool_proto::lease::LeaseSigner;

    #[test]
    fn leases_for_this_server_and_its_instances_only() {
        let signer = LeaseSigner::from_seed([9; 32]);
        let auth = LeaseTokens::new(
            signer.verifier(),
            "s1".into(),
            ["MIG-a".to_string()].into_iter().collect(),
            vec!["direct".into()],
        );
        let now = unix_ms_now();
        let claims = |server: &str, instance: &str, expires: u64| LeaseClaims {
            lease_id: 5,
            tenant: "t".into(),
            server_id: server.into(),
            instance_uuid: instance.into(),
            memory_bytes: 10 << 30,
            issued_unix_ms: now,
            expires_unix_ms: expires,
            allow_rdma: false,
            ..Default::default()
        };
        let ok = auth.authenticate(&signer.sign(&claims("s1", "MIG-a", now + 60_000))).expect("valid lease");
        assert_eq!(ok.memory_quota, Some(10 << 30));
        let lease = ok.lease.expect("lease");
        assert_eq!(lease.instance_uuid, "MIG-a");
        assert_eq!(lease.shared_percent, None, "exclusive");
        assert!(!ok.allow_rdma, "the lease does not allow RDMA");
        let rdma = LeaseClaims { allow_rdma: true, ..claims("s1", "MIG-a", now + 60_000) };
        assert!(auth.authenticate(&signer.sign(&rdma)).expect("valid lease").allow_rdma, "carried from the claims");
        let shared = LeaseClaims {
            class: gpupool_proto::balancer::LeaseClass::Shared.into(),
            compute_percent: 25,
            ..claims("s1", "MIG-a", now + 60_000)
        };
        let lease = auth.authenticate(&signer.sign(&shared)).expect("shared lease").lease.expect("lease");
        assert_eq!(lease.shared_percent, Some(25));
        assert!(matches!(
            auth.authenticate(&signer.sign(&claims("s2", "MIG-a", now + 60_000))),
            Err(AuthError::Foreign { .. })
        ));
        assert!(matches!(
            auth.authenticate(&signer.sign(&claims("s1", "MIG-b", now + 60_000))),
            Err(AuthError::Foreign { .. })
        ));
        assert!(matches!(
            auth.authenticate(&signer.sign(&claims("s1", "MIG-a", now - 1))),
            Err(AuthError::Lease(LeaseError::Expired { .. }))
        ));
        let forged = LeaseSigner::from_seed([1; 32]).sign(&claims("s1", "MIG-a", now + 60_000));
        assert_eq!(auth.authenticate(&forged), Err(AuthError::Lease(LeaseError::BadSignature)));
        assert!(auth.authenticate("direct").is_ok());
        assert_eq!(auth.authenticate("other"), Err(AuthError::Invalid));
    }

    #[test]
    fn static_tokens() {
        let a = StaticTokens::new(vec!["s3cret".into()]);
        assert!(a.authenticate("s3cret").is_ok());
        assert_eq!(a.authenticate("s3cre"), Err(AuthError::Invalid));
        assert_eq!(a.authenticate(""), Err(AuthError::Missing));
    }
}
