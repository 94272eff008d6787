//! Server certificate checks for the data plane: a pinned SHA-256
//! fingerprint, or a CA (the verifier is shared with the balancer's clients,
//! `gpupool_proto::tls`).

use crate::config::Trust;
use crate::error::ClientError;
use gpupool_proto::tls::{PinnedCert, ca_roots, parse_fingerprint};
use std::sync::Arc;

/// A rustls client configuration for `trust`: TLS 1.3 only, gpupool's ALPN.
pub(crate) fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, ClientError> {
    let builder = rustls::ClientConfig::builder_with_provider(gpupool_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let config_error = |e: gpupool_proto::tls::TlsError| ClientError::Config(e.to_string());
    let mut cfg = match trust {
        Trust::Fingerprint(hexfp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert::new(
                parse_fingerprint(hexfp).map_err(config_error)?,
            )))
            .with_no_client_auth(),
        Trust::CaPem(pem) => builder.with_root_certificates(ca_roots(pem).map_err(config_error)?).with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![gpupool_proto::ALPN.to_vec()];
    Ok(cfg)
}
