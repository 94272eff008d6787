//! Per-tenant client credentials (issue 20, finding 10).
//!
//! With one secret shared by every client, the tenant was whatever an
//! `Allocate` said: any holder could use up or bill another tenant's quota
//! and read every tenant's leases. Here each tenant has a credential of its
//! own, and the tenant of a request is the one its credential belongs to.
//!
//! The balancer keeps only the SHA-256 digest of each credential, never the
//! credential itself, so its configuration (a file, a secret store) does not
//! hold anything a client could present. A fast hash is enough because the
//! credentials are random 256-bit strings ([`generate_secret`], Terraform's
//! `random_password`), not passwords a person picked: nobody can search
//! 2^256 candidates, so a slow password hash (argon2, scrypt) would cost
//! every request CPU time and buy nothing. Digests are compared in constant
//! time, and every tenant's digest is compared (no early exit), so the time
//! of a refusal says nothing about how close a guess came or which tenant
//! was nearest.
//!
//! The tenants file, one credential a line (`#` starts a comment):
//!
//! ```text
//! # tenant   digest of its credential                                          quota (optional)
//! team-a     sha256:3f1c…64 hex digits…                                          leases:4,memory-gib:160
//! team-b     sha256:9be0…
//! team-b     sha256:04aa…   # a second credential: rotate without a gap
//! ```
//!
//! A tenant may have several credentials (rotation: add the new one, move
//! the clients, remove the old one); its quota is given on at most one of
//! its lines and has the `--quota` syntax ([`parse_quota`]).

use crate::pool::Quota;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Largest tenants file read (a line is ~100 bytes: ample for 10 000
/// credentials, and a wrong path to a huge file fails fast).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Longest tenant name (as for names an `Allocate` carries).
const MAX_TENANT_BYTES: usize = 128;

/// The SHA-256 of a credential, as the balancer stores it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CredentialDigest([u8; 32]);

impl CredentialDigest {
    /// The digest of `secret` (its UTF-8 bytes, as sent in
    /// `authorization: Bearer <secret>`).
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// `sha256:<64 hex digits>`, as the tenants file writes it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let hex_digits = text
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{text:?} is not a digest: write sha256:<64 hex digits>"))?;
        let bytes = hex::decode(hex_digits).map_err(|_| "a sha256: digest must be 64 hex digits".to_owned())?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| "a sha256: digest must be 64 hex digits".to_owned())?;
        Ok(Self(bytes))
    }
}

impl std::fmt::Display for CredentialDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for CredentialDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Harmless to show (it cannot be presented), but logs need no more
        // than a prefix to tell two apart.
        write!(f, "sha256:{}…", hex::encode(&self.0[..4]))
    }
}

/// A new random credential: 256 bits, hex, with a recognisable prefix
/// (secret scanners and people can tell what it is).
pub fn generate_secret() -> String {
    format!("gpt1_{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// Whether `a` and `b` are equal, in time that depends only on their
/// lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A quota, `leases:N,memory-gib:M,share-fate` (each part optional).
pub fn parse_quota(limits: &str) -> Result<Quota, String> {
    let mut quota = Quota::default();
    for part in limits.split(',') {
        if part == "share-fate" {
            quota.share_fate_across_tenants = true;
            continue;
        }
        match part.split_once(':') {
            Some(("leases", n)) => {
                quota.max_leases = Some(n.parse().map_err(|_| format!("leases:N wants a number, not {n:?}"))?);
            }
            Some(("memory-gib", n)) => {
                let gib: u64 = n.parse().map_err(|_| format!("memory-gib:M wants a number, not {n:?}"))?;
                quota.max_memory =
                    Some(gib.checked_mul(1 << 30).ok_or_else(|| format!("memory-gib:{gib} is too large"))?);
            }
            _ => return Err(format!("unknown quota limit {part:?}: use leases:N, memory-gib:M or share-fate")),
        }
    }
    Ok(quota)
}

/// One credential and whose it is.
#[derive(Debug, Clone)]
struct Credential {
    tenant: String,
    digest: CredentialDigest,
}

/// The tenants and their credentials' digests (and, from a file, their
/// quotas).
#[derive(Debug, Clone, Default)]
pub struct Tenants {
    credentials: Vec<Credential>,
    quotas: BTreeMap<String, Quota>,
}

impl Tenants {
    /// No tenant: no client can authenticate with a tenant's credential.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a credential of `tenant` by its digest. A digest already given
    /// to another tenant is refused: it could then not tell the two apart.
    pub fn add(&mut self, tenant: impl Into<String>, digest: CredentialDigest) -> Result<(), String> {
        let tenant = tenant.into();
        check_tenant_name(&tenant)?;
        if let Some(c) = self.credentials.iter().find(|c| c.digest == digest) {
            return Err(if c.tenant == tenant {
                format!("tenant {tenant:?} lists the same credential twice")
            } else {
                format!("tenants {:?} and {tenant:?} have the same credential", c.tenant)
            });
        }
        self.credentials.push(Credential { tenant, digest });
        Ok(())
    }

    /// Adds `secret` as a credential of `tenant` (for tests and programs
    /// that make their own credentials; files hold digests only).
    pub fn with_secret(mut self, tenant: &str, secret: &str) -> Result<Self, String> {
        self.add(tenant, CredentialDigest::of(secret))?;
        Ok(self)
    }

    /// Reads a tenants file (see the module doc); every problem is
    /// reported, one a line.
    pub fn parse(text: &str) -> Result<Self, Vec<String>> {
        let mut tenants = Self::new();
        let mut problems = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split_once('#').map_or(line, |(before, _)| before);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let parsed = match fields.as_slice() {
                [] => continue,
                [tenant, digest] => tenants.line(tenant, digest, None),
                [tenant, digest, quota] => tenants.line(tenant, digest, Some(quota)),
                _ => Err("write: tenant sha256:<digest> [quota]".into()),
            };
            if let Err(e) = parsed {
                problems.push(format!("line {}: {e}", n + 1));
            }
        }
        if problems.is_empty() { Ok(tenants) } else { Err(problems) }
    }

    fn line(&mut self, tenant: &str, digest: &str, quota: Option<&str>) -> Result<(), String> {
        let digest = CredentialDigest::parse(digest)?;
        if let Some(q) = quota {
            let quota = parse_quota(q)?;
            if self.quotas.insert(tenant.to_owned(), quota).is_some() {
                return Err(format!("tenant {tenant:?} has a quota on more than one line"));
            }
        }
        self.add(tenant, digest)
    }

    /// Reads and parses the tenants file at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| format!("tenants file {}: {e}", path.display()))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(format!("tenants file {} is larger than {MAX_FILE_BYTES} bytes", path.display()));
        }
        Self::parse(&text).map_err(|p| format!("tenants file {}: {}", path.display(), p.join("; ")))
    }

    /// The tenant whose credential `presented` is, if any. Every
    /// credential is compared, in constant time, whatever the outcome.
    pub fn authenticate(&self, presented: &str) -> Option<&str> {
        self.tenant_of(&CredentialDigest::of(presented))
    }

    /// The tenant whose credential has `digest`, if any (constant time, as
    /// [`Tenants::authenticate`]).
    pub fn tenant_of(&self, digest: &CredentialDigest) -> Option<&str> {
        let mut found = None;
        for c in &self.credentials {
            // No early exit: the time does not depend on where (or whether)
            // the credential is found.
            if constant_time_eq(&c.digest.0, &digest.0) {
                found = Some(c.tenant.as_str());
            }
        }
        found
    }

    /// Quotas the file set, by tenant.
    pub fn quotas(&self) -> &BTreeMap<String, Quota> {
        &self.quotas
    }

    /// Whether no credential is known.
    pub fn is_empty(&self) -> bool {
        self.credentials.is_empty()
    }

    /// How many tenants have credentials.
    pub fn tenant_count(&self) -> usize {
        let mut names: Vec<&str> = self.credentials.iter().map(|c| c.tenant.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }
}

/// Tenant names as `Allocate` accepts them: printable ASCII, bounded, not
/// `*` (the quota default).
fn check_tenant_name(tenant: &str) -> Result<(), String> {
    if tenant.is_empty() || tenant.len() > MAX_TENANT_BYTES || tenant == "*" {
        return Err(format!("tenant name {tenant:?}: 1 to {MAX_TENANT_BYTES} bytes, not \"*\""));
    }
    if !tenant.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!("tenant name {tenant:?}: printable ASCII only"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_names_its_tenant_and_nothing_else_does() {
        let tenants =
            Tenants::new().with_secret("team-a", "secret-a").unwrap().with_secret("team-b", "secret-b").unwrap();
        assert_eq!(tenants.authenticate("secret-a"), Some("team-a"));
        assert_eq!(tenants.authenticate("secret-b"), Some("team-b"));
        assert_eq!(tenants.authenticate("secret-"), None);
        assert_eq!(tenants.authenticate(""), None);
        assert_eq!(tenants.authenticate(&CredentialDigest::of("secret-a").to_string()), None, "the digest is no key");
    }

    #[test]
    fn the_file_holds_digests_quotas_and_rotations() {
        let a = CredentialDigest::of("a1");
        let a2 = CredentialDigest::of("a2");
        let b = CredentialDigest::of("b");
        let text = format!("# tenants\n\nteam-a {a} leases:2,memory-gib:80  # the first\nteam-a {a2}\n  team-b {b}\n");
        let tenants = Tenants::parse(&text).expect("parses");
        assert_eq!(tenants.authenticate("a1"), Some("team-a"));
        assert_eq!(tenants.authenticate("a2"), Some("team-a"));
        assert_eq!(tenants.authenticate("b"), Some("team-b"));
        assert_eq!(tenants.tenant_count(), 2);
        let q = &tenants.quotas()["team-a"];
        assert_eq!((q.max_leases, q.max_memory), (Some(2), Some(80 << 30)));
        assert!(!tenants.quotas().contains_key("team-b"));
    }

    #[test]
    fn every_bad_line_is_reported() {
        let a = CredentialDigest::of("a");
        let text = format!(
            "team-a {a}\nteam-b {a}\nteam-c sha256:00\nteam-d plain-secret\nteam-e {b} leases:x\n* {c}\nx y z w\n\
             team-a {d} leases:1\nteam-a {e} leases:2\n",
            b = CredentialDigest::of("b"),
            c = CredentialDigest::of("c"),
            d = CredentialDigest::of("d"),
            e = CredentialDigest::of("e"),
        );
        let problems = Tenants::parse(&text).expect_err("bad lines");
        let all = problems.join("\n");
        for needle in [
            "line 2: tenants \"team-a\" and \"team-b\" have the same credential",
            "line 3: a sha256: digest must be 64 hex digits",
            "line 4: \"plain-secret\" is not a digest",
            "line 5: leases:N wants a number",
            "line 6: tenant name \"*\"",
            "line 7: write: tenant sha256:<digest> [quota]",
            "line 9: tenant \"team-a\" has a quota on more than one line",
        ] {
            assert!(all.contains(needle), "{needle:?} missing from:\n{all}");
        }
        assert_eq!(problems.len(), 7, "{all}");
    }

    #[test]
    fn digests_print_as_the_file_writes_them_and_secrets_are_random() {
        let d = CredentialDigest::of("x");
        assert_eq!(CredentialDigest::parse(&d.to_string()), Ok(d));
        let (s1, s2) = (generate_secret(), generate_secret());
        assert_ne!(s1, s2);
        assert!(s1.starts_with("gpt1_") && s1.len() == 5 + 64, "{s1}");
        assert!(!format!("{d:?}").contains(&hex::encode(d.0)), "Debug shows a prefix only");
    }
}
