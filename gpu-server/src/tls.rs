//! TLS 1.3 for the QUIC endpoint: a configured certificate, or a self-signed
//! one generated at start whose SHA-256 fingerprint clients pin.

use crate::error::ServerError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// Generate a self-signed certificate for these DNS names / IPs.
    SelfSigned { names: Vec<String> },
    /// PEM files: certificate chain and private key.
    Files { cert: PathBuf, key: PathBuf },
    /// DER certificate chain and private key in memory (a worker process
    /// gets its supervisor's this way).
    Der { chain: Vec<Vec<u8>>, key: Vec<u8> },
}

/// A loaded certificate chain and key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn load(source: &TlsSource) -> Result<Self, ServerError> {
        match source {
            TlsSource::SelfSigned { names } => {
                let ck = rcgen::generate_simple_self_signed(names.clone())
                    .map_err(|e| ServerError::Tls(format!("generating a self-signed certificate: {e}")))?;
                let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
                    .map_err(|e| ServerError::Tls(e.to_string()))?;
                Ok(Self { chain: vec![ck.cert.der().clone()], key })
            }
            TlsSource::Files { cert, key } => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| ServerError::Tls(format!("reading {}: {e}", cert.display())))?;
                if chain.is_empty() {
                    return Err(ServerError::Tls(format!("{} holds no certificate", cert.display())));
                }
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| ServerError::Tls(format!("reading {}: {e}", key.display())))?;
                Ok(Self { chain, key })
            }
            TlsSource::Der { chain, key } => {
                if chain.is_empty() {
                    return Err(ServerError::Tls("no certificate given".into()));
                }
                let key =
                    PrivateKeyDer::try_from(key.clone()).map_err(|e| ServerError::Tls(format!("private key: {e}")))?;
                Ok(Self { chain: chain.iter().map(|c| CertificateDer::from(c.clone())).collect(), key })
            }
        }
    }

    /// The chain and key as DER, for [`TlsSource::Der`].
    pub fn to_der(&self) -> (Vec<Vec<u8>>, Vec<u8>) {
        (self.chain.iter().map(|c| c.to_vec()).collect(), self.key.secret_der().to_vec())
    }

    /// Hex SHA-256 of the end-entity certificate: what clients pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    /// A rustls server configuration: TLS 1.3 only, gpupool's ALPN.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, ServerError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ServerError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| ServerError::Tls(e.to_string()))?;
        cfg.alpn_protocols = vec![gpupool_proto::ALPN.to_vec()];
        cfg.max_early_data_size = 0;
        Ok(Arc::new(cfg))
    }
}

/// Hex SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}
