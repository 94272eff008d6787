//! Lease tokens: `gpl1.<claims>.<signature>`, both parts base64url without
//! padding. The claims are a protobuf [`LeaseClaims`]; the signature is
//! ed25519 over the claims' bytes exactly as sent, so no re-encoding can
//! change what was signed. The balancer signs; gpu-servers verify with the
//! balancer's public key and need no call to the balancer.

use crate::balancer::LeaseClaims;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use prost::Message;

const PREFIX: &str = "gpl1.";
/// Longest token accepted: claims are a few hundred bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Not of the form `gpl1.<claims>.<signature>`, or too long.
    #[error("not a lease token")]
    Malformed,
    /// The signature does not match the claims and the balancer's key.
    #[error("lease token signature is not valid")]
    BadSignature,
    /// The lease expired at `expires_unix_ms`.
    #[error("lease {lease_id:#x} expired at {expires_unix_ms} (now {now_unix_ms})")]
    Expired { lease_id: u64, expires_unix_ms: u64, now_unix_ms: u64 },
    /// A key is not 32 hex-encoded bytes.
    #[error("bad ed25519 key: {0}")]
    BadKey(String),
}

/// Signs lease claims.
#[derive(Clone)]
pub struct LeaseSigner {
    key: SigningKey,
}

impl std::fmt::Debug for LeaseSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseSigner").field("public_key", &self.public_key_hex()).finish_non_exhaustive()
    }
}

impl LeaseSigner {
    /// From a 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self { key: SigningKey::from_bytes(&seed) }
    }

    /// From 64 hex digits (the key file's content, whitespace trimmed).
    pub fn from_hex(hex: &str) -> Result<Self, LeaseError> {
        Ok(Self::from_seed(decode_key(hex)?))
    }

    /// The seed as 64 hex digits, for the key file.
    pub fn seed_hex(&self) -> String {
        encode_hex(self.key.as_bytes())
    }

    pub fn public_key_hex(&self) -> String {
        encode_hex(self.key.verifying_key().as_bytes())
    }

    pub fn verifier(&self) -> LeaseVerifier {
        LeaseVerifier { key: self.key.verifying_key() }
    }

    /// The token for `claims`.
    pub fn sign(&self, claims: &LeaseClaims) -> String {
        let body = claims.encode_to_vec();
        let sig = self.key.sign(&body);
        format!("{PREFIX}{}.{}", URL_SAFE_NO_PAD.encode(&body), URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

/// Checks lease tokens against the balancer's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseVerifier {
    key: VerifyingKey,
}

impl LeaseVerifier {
    /// From the balancer's public key, 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, LeaseError> {
        let bytes = decode_key(hex)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|e| LeaseError::BadKey(e.to_string()))?;
        Ok(Self { key })
    }

    pub fn public_key_hex(&self) -> String {
        encode_hex(self.key.as_bytes())
    }

    /// The claims of a token signed by this key, expired or not.
    pub fn verify_signature(&self, token: &str) -> Result<LeaseClaims, LeaseError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(LeaseError::Malformed);
        }
        let rest = token.strip_prefix(PREFIX).ok_or(LeaseError::Malformed)?;
        let (body, sig) = rest.split_once('.').ok_or(LeaseError::Malformed)?;
        let body = URL_SAFE_NO_PAD.decode(body).map_err(|_| LeaseError::Malformed)?;
        let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| LeaseError::Malformed)?;
        let sig = Signature::from_slice(&sig).map_err(|_| LeaseError::Malformed)?;
        self.key.verify(&body, &sig).map_err(|_| LeaseError::BadSignature)?;
        LeaseClaims::decode(body.as_slice()).map_err(|_| LeaseError::Malformed)
    }

    /// The claims of a valid token that has not expired at `now_unix_ms`.
    pub fn verify(&self, token: &str, now_unix_ms: u64) -> Result<LeaseClaims, LeaseError> {
        let claims = self.verify_signature(token)?;
        if claims.expires_unix_ms <= now_unix_ms {
            return Err(LeaseError::Expired {
                lease_id: claims.lease_id,
                expires_unix_ms: claims.expires_unix_ms,
                now_unix_ms,
            });
        }
        Ok(claims)
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn decode_key(hex: &str) -> Result<[u8; 32], LeaseError> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(LeaseError::BadKey("expected 64 hex digits".into()));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| LeaseError::BadKey(e.to_string()))?;
    }
    Ok(out)
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> LeaseClaims {
        LeaseClaims {
            lease_id: 7,
            tenant: "t".into(),
            server_id: "s1".into(),
            instance_uuid: "MIG-1".into(),
            memory_bytes: 10 << 30,
            issued_unix_ms: 1_000,
            expires_unix_ms: 31_000,
            allow_rdma: true,
            class: crate::balancer::LeaseClass::Shared.into(),
            compute_percent: 25,
        }
    }

    #[test]
    fn round_trip_and_expiry() {
        let signer = LeaseSigner::from_seed([3; 32]);
        let token = signer.sign(&claims());
        let v = LeaseVerifier::from_hex(&signer.public_key_hex()).expect("key");
        assert_eq!(v.verify(&token, 2_000), Ok(claims()));
        assert!(matches!(v.verify(&token, 31_000), Err(LeaseError::Expired { lease_id: 7, .. })));
        assert_eq!(LeaseSigner::from_hex(&signer.seed_hex()).expect("seed").public_key_hex(), signer.public_key_hex());
    }

    #[test]
    fn forged_tokens_are_refused() {
        let signer = LeaseSigner::from_seed([3; 32]);
        let other = LeaseSigner::from_seed([4; 32]);
        let v = signer.verifier();
        assert_eq!(v.verify(&other.sign(&claims()), 0), Err(LeaseError::BadSignature));
        // Claims changed after signing: a longer lease.
        let token = signer.sign(&claims());
        let mut longer = claims();
        longer.expires_unix_ms = u64::MAX;
        let forged_body = URL_SAFE_NO_PAD.encode(longer.encode_to_vec());
        let sig = token.rsplit('.').next().expect("sig");
        assert_eq!(v.verify(&format!("gpl1.{forged_body}.{sig}"), 0), Err(LeaseError::BadSignature));
        for bad in ["", "gpl1.", "gpl1.a.b", "gpl2.x.y", "static-secret", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert_eq!(v.verify(bad, 0), Err(LeaseError::Malformed), "{bad:?}");
        }
        assert!(LeaseVerifier::from_hex("zz").is_err());
    }
}
