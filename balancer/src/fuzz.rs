//! Fuzz targets for what the balancer decodes (`docs/fuzzing.md`): every
//! gRPC request as bytes, the conversion of each to pool types, and lease
//! tokens (presented in `Register`, `Renew` and `Release`, and by clients to
//! gpu-servers). Bounded case counts; `GPUPOOL_FUZZ_CASES` runs longer.

use crate::convert;
use gpupool_proto::balancer as pb;
use gpupool_proto::fuzz::{config, mutate, mutations};
use gpupool_proto::lease::{LeaseError, LeaseSigner, MAX_TOKEN_LEN};
use proptest::prelude::*;
use prost::Message;

fn claims() -> pb::LeaseClaims {
    pb::LeaseClaims {
        lease_id: 7,
        tenant: "t".into(),
        server_id: "s1".into(),
        expires_unix_ms: 31_000,
        ..Default::default()
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let token = LeaseSigner::from_seed([1; 32]).sign(&claims());
    let instance = pb::Instance {
        uuid: "MIG-1".into(),
        profile: Some(pb::MigProfile { id: 9, name: "3g.40gb".into() }),
        memory_bytes: 40 << 30,
        multiprocessors: 60,
        placement_start: 0,
        placement_size: 4,
    };
    vec![
        pb::RegisterRequest {
            server_id: "s1".into(),
            address: "10.0.0.1:4433".into(),
            cert_sha256: "ab".repeat(32),
            gpus: vec![pb::Gpu {
                uuid: "GPU-1".into(),
                name: "H200".into(),
                memory_bytes: 140 << 30,
                multiprocessors: 132,
                mig_enabled: true,
                instances: vec![instance],
                ..Default::default()
            }],
            live_leases: vec![token.clone()],
            server_build: "b".into(),
            swap_host_bytes: 1 << 30,
        }
        .encode_to_vec(),
        pb::HeartbeatRequest {
            server_id: "s1".into(),
            sessions: 2,
            memory_used_bytes: 1 << 30,
            live_lease_ids: vec![7, 8],
            migrations: vec![pb::MigrationResult { lease_id: 7, error: "refused".into() }],
            gpu_loads: vec![pb::GpuLoad { uuid: "GPU-1".into(), busy_permille: 420 }],
            relayouts: vec![pb::RelayoutResult { gpu_uuid: "GPU-1".into(), error: "in use".into() }],
            mps_group_faults: 3,
        }
        .encode_to_vec(),
        pb::DrainRequest { server_id: "s1".into() }.encode_to_vec(),
        pb::AllocateRequest {
            tenant: "t".into(),
            memory_bytes: 1 << 30,
            compute_percent: 50,
            profile: "3g.40gb".into(),
            wait_timeout_ms: 100,
            class: pb::LeaseClass::Shared.into(),
        }
        .encode_to_vec(),
        pb::RenewRequest { lease_id: 7, token: token.clone() }.encode_to_vec(),
        pb::ReleaseRequest { lease_id: 7, token }.encode_to_vec(),
        pb::WatchRequest { min_interval_ms: 10 }.encode_to_vec(),
        pb::CheckLeaseRequest { server_id: "s1".into(), lease_id: 7 }.encode_to_vec(),
    ]
}

/// Decodes `bytes` as every request and converts what decodes as the
/// service does.
fn decode_all(bytes: &[u8]) {
    let verifier = LeaseSigner::from_seed([1; 32]).verifier();
    if let Ok(r) = pb::RegisterRequest::decode(bytes) {
        let _ = convert::server_spec(&r);
        for token in &r.live_leases {
            if let Ok(c) = verifier.verify_signature(token) {
                let _ = convert::adopt(&c);
            }
        }
    }
    let _ = pb::HeartbeatRequest::decode(bytes);
    if let Ok(r) = pb::AllocateRequest::decode(bytes)
        && let Ok(req) = convert::request(&r)
    {
        assert!(req.tenant.len() <= convert::MAX_NAME_BYTES);
    }
    if let Ok(r) = pb::RenewRequest::decode(bytes) {
        let _ = verifier.verify(&r.token, 2_000);
    }
    if let Ok(r) = pb::ReleaseRequest::decode(bytes) {
        let _ = verifier.verify_signature(&r.token);
    }
    let _ = pb::WatchRequest::decode(bytes);
    if let Ok(r) = pb::CheckLeaseRequest::decode(bytes) {
        let _ = crate::service::lease_state(None, false, &r.server_id, 0);
    }
    let _ = pb::StatusRequest::decode(bytes);
    let _ = pb::DrainRequest::decode(bytes);
    let _ = pb::LeaseClaims::decode(bytes);
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn requests_from_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&bytes);
    }

    #[test]
    fn requests_mutated(seed in 0usize..7, edits in mutations()) {
        let seeds = seeds();
        decode_all(&mutate(seeds[seed % seeds.len()].clone(), &edits));
    }

    /// Any text as a token: refused unless it is the signer's, untouched.
    #[test]
    fn tokens_from_random_text(text in ".{0,200}", prefixed in any::<bool>()) {
        let verifier = LeaseSigner::from_seed([1; 32]).verifier();
        let token = if prefixed { format!("gpl1.{text}") } else { text };
        prop_assert!(verifier.verify_signature(&token).is_err());
    }

    /// A valid token with edits: any change to the claims or the signature
    /// is refused; only the token itself verifies.
    #[test]
    fn tokens_mutated(edits in mutations()) {
        let signer = LeaseSigner::from_seed([1; 32]);
        let token = signer.sign(&claims());
        let bytes = mutate(token.clone().into_bytes(), &edits);
        let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
        match signer.verifier().verify_signature(&text) {
            Ok(c) => prop_assert_eq!(c, claims()),
            Err(e) => prop_assert!(matches!(e, LeaseError::Malformed | LeaseError::BadSignature), "{}", e),
        }
    }

    /// Claims that are not a `LeaseClaims` yet carry a valid signature (a
    /// leaked signing key, or a future version): refused or decoded, never
    /// a panic.
    #[test]
    fn signed_garbage_claims(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        use base64::Engine;
        use ed25519_dalek::Signer;
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let token = format!("gpl1.{}.{}", engine.encode(&body), engine.encode(key.sign(&body).to_bytes()));
        let verified = LeaseSigner::from_seed([1; 32]).verifier().verify_signature(&token);
        if token.len() > MAX_TOKEN_LEN {
            prop_assert_eq!(verified, Err(LeaseError::Malformed));
        } else {
            prop_assert!(verified.is_ok() == pb::LeaseClaims::decode(body.as_slice()).is_ok());
        }
    }
}
