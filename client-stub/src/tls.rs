//! Server certificate checks: a pinned SHA-256 fingerprint, or a CA.

use crate::config::Trust;
use crate::error::ClientError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Accepts one certificate, named by its SHA-256; the handshake signature is
/// still verified, so only the holder of the key passes.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate SHA-256 {} does not match the pinned {}",
                hex::encode(got),
                hex::encode(self.fingerprint)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A rustls client configuration for `trust`: TLS 1.3 only, gpupool's ALPN.
pub(crate) fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let mut cfg = match trust {
        Trust::Fingerprint(hexfp) => {
            let bytes = hex::decode(hexfp).map_err(|e| ClientError::Config(format!("fingerprint: {e}")))?;
            let fingerprint: [u8; 32] =
                bytes.try_into().map_err(|_| ClientError::Config("fingerprint must be 32 bytes".into()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert { fingerprint, provider }))
                .with_no_client_auth()
        }
        Trust::CaPem(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
                roots.add(cert).map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![gpupool_proto::ALPN.to_vec()];
    Ok(cfg)
}
