//! TLS 1.3 for the QUIC endpoint: a configured certificate, or a self-signed
//! one generated at start whose SHA-256 fingerprint clients pin. The
//! certificate handling is shared with the balancer (`gpupool_proto::tls`).

use crate::error::ServerError;
use std::sync::Arc;

pub use gpupool_proto::tls::{Identity, TlsSource, fingerprint};

/// A rustls server configuration: TLS 1.3 only, gpupool's ALPN.
pub fn server_config(identity: &Identity) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(gpupool_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![gpupool_proto::ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(Arc::new(cfg))
}
