//! Certificates for both planes: the identity a gpu-server (QUIC) or the
//! balancer (gRPC) presents — configured PEM files, or a self-signed
//! certificate generated at start whose SHA-256 fingerprint clients pin —
//! and the two ways a client trusts it: a pinned fingerprint or CA roots.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a certificate, key, pin or CA could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not make a self-signed certificate.
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    /// A PEM file could not be read or parsed.
    #[error("reading {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A certificate file holds no certificate.
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    /// A DER key or chain given in memory is unusable.
    #[error("{0}")]
    Der(String),
    /// A pinned fingerprint is not 64 hex digits.
    #[error("certificate fingerprint {0:?} is not a SHA-256 (64 hex digits)")]
    Fingerprint(String),
    /// A CA bundle is empty or holds a bad certificate.
    #[error("CA certificates: {0}")]
    Ca(String),
    /// A balancer URL is malformed or its scheme does not match the trust.
    #[error("balancer URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Where a server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
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

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::File { path: path.to_owned(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(chain)
}

impl Identity {
    pub fn load(source: &TlsSource) -> Result<Self, TlsError> {
        match source {
            TlsSource::SelfSigned { names } => {
                let ck =
                    rcgen::generate_simple_self_signed(names.clone()).map_err(|e| TlsError::Generate(e.to_string()))?;
                let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
                    .map_err(|e| TlsError::Der(e.to_string()))?;
                Ok(Self { chain: vec![ck.cert.der().clone()], key })
            }
            TlsSource::Files { cert, key } => {
                let chain = read_chain(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| TlsError::File { path: key.clone(), reason: e.to_string() })?;
                Ok(Self { chain, key })
            }
            TlsSource::Der { chain, key } => {
                if chain.is_empty() {
                    return Err(TlsError::Der("no certificate given".into()));
                }
                let key =
                    PrivateKeyDer::try_from(key.clone()).map_err(|e| TlsError::Der(format!("private key: {e}")))?;
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
}

/// Hex SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// Parses a pinned fingerprint: 64 hex digits (what a server prints).
pub fn parse_fingerprint(hex_text: &str) -> Result<[u8; 32], TlsError> {
    hex::decode(hex_text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| TlsError::Fingerprint(hex_text.chars().take(80).collect()))
}

/// The certificates of a PEM CA bundle, as trust roots.
pub fn ca_roots(pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| TlsError::Ca(e.to_string()))?;
        roots.add(cert).map_err(|e| TlsError::Ca(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Ca("the bundle holds no certificate".into()));
    }
    Ok(roots)
}

/// The crypto provider both planes use.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts one certificate, named by its SHA-256; the handshake signature is
/// still verified, so only the holder of the key passes. The name the
/// client asked for is not checked: the pin names the certificate itself.
#[derive(Debug)]
pub struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCert {
    pub fn new(fingerprint: [u8; 32]) -> Self {
        Self { fingerprint, provider: provider() }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_identity_round_trips_through_der() {
        let id = Identity::load(&TlsSource::SelfSigned { names: vec!["localhost".into()] }).unwrap();
        let (chain, key) = id.to_der();
        let again = Identity::load(&TlsSource::Der { chain, key }).unwrap();
        assert_eq!(again.fingerprint(), id.fingerprint());
        assert_eq!(parse_fingerprint(&id.fingerprint()).unwrap().len(), 32);
    }

    #[test]
    fn bad_pins_and_bundles_are_refused() {
        assert!(matches!(parse_fingerprint("abc"), Err(TlsError::Fingerprint(_))));
        assert!(matches!(parse_fingerprint(&"zz".repeat(32)), Err(TlsError::Fingerprint(_))));
        assert!(matches!(ca_roots(b"not pem"), Err(TlsError::Ca(_))));
    }
}
