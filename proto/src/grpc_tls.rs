//! TLS on the balancer's gRPC (tonic with rustls): the balancer's server
//! settings, and the endpoints its clients (gpu-servers, libcuda, the
//! Lambda extension, the operator's CLI) open, each verifying the balancer
//! by a pinned SHA-256 fingerprint or by CA roots, as the data plane does.
//! Plaintext is an explicit opt-in on both sides.

use crate::tls::{Identity, PinnedCert, TlsError, parse_fingerprint};
use rustls::pki_types::PrivateKeyDer;
use std::path::Path;
use std::sync::Arc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, ServerTlsConfig};

/// Longest TLS handshake the balancer waits for: a client that connects
/// and sends nothing holds nothing for longer.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest CA bundle read from a file.
const MAX_CA_FILE_BYTES: u64 = 1 << 20;

/// How a client trusts the balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalancerTrust {
    /// Accept exactly the certificate with this SHA-256 (what the balancer
    /// logs at start).
    Fingerprint([u8; 32]),
    /// Verify against these PEM CA certificates, for `server_name` (default:
    /// the URL's host).
    Ca { pem: Vec<u8>, server_name: Option<String> },
    /// Plaintext `http://`: only with an explicit opt-in, on a network
    /// trusted with leases and secrets.
    Insecure,
}

impl BalancerTrust {
    /// The trust that a client's settings describe: exactly one of a
    /// pinned fingerprint, a CA bundle (PEM, see [`read_bounded`] for a
    /// file), or the plaintext opt-in.
    pub fn from_settings(
        cert_sha256: Option<&str>,
        ca_pem: Option<Vec<u8>>,
        server_name: Option<&str>,
        insecure: bool,
    ) -> Result<Self, TlsError> {
        let given = usize::from(cert_sha256.is_some()) + usize::from(ca_pem.is_some()) + usize::from(insecure);
        if given > 1 {
            return Err(TlsError::Config(
                "give one of the balancer's certificate SHA-256, a CA file, or the plaintext opt-in, not several"
                    .into(),
            ));
        }
        if let Some(hex) = cert_sha256 {
            return Ok(Self::Fingerprint(parse_fingerprint(hex)?));
        }
        if let Some(pem) = ca_pem {
            crate::tls::ca_roots(&pem)?;
            return Ok(Self::Ca { pem, server_name: server_name.map(str::to_owned) });
        }
        if insecure {
            return Ok(Self::Insecure);
        }
        Err(TlsError::Config(
            "no way to verify the balancer: give its certificate SHA-256 (what it logs at start) or a CA file, \
             or opt in to plaintext"
                .into(),
        ))
    }
}

/// Reads a PEM file of at most 1 MiB.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    if path.as_os_str().is_empty() {
        return Err(TlsError::File { path: path.to_owned(), reason: "no file named".into() });
    }
    use std::io::Read;
    let file_error = |e: std::io::Error| TlsError::File { path: path.to_owned(), reason: e.to_string() };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(file_error)?;
    if bytes.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(TlsError::File { path: path.to_owned(), reason: "larger than 1 MiB".into() });
    }
    Ok(bytes)
}

/// A tonic endpoint for the balancer at `url` that verifies it by `trust`,
/// presenting `client_identity` when the balancer asks for a certificate.
/// An `http://` URL needs [`BalancerTrust::Insecure`]; every other trust
/// needs `https://`.
pub fn endpoint(url: &str, trust: &BalancerTrust, client_identity: Option<&Identity>) -> Result<Endpoint, TlsError> {
    let bad = |reason: String| TlsError::Url { url: url.chars().take(200).collect(), reason };
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| bad(e.to_string()))?;
    let scheme = endpoint.uri().scheme_str().unwrap_or("").to_owned();
    let mut config = ClientTlsConfig::new();
    if let Some(id) = client_identity {
        let (cert, key) = to_pem(id);
        config = config.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let configured = match trust {
        BalancerTrust::Insecure if scheme == "http" => return Ok(endpoint),
        BalancerTrust::Insecure => return Err(bad("plaintext needs an http:// URL".into())),
        _ if scheme == "http" => {
            return Err(bad(
                "http:// is plaintext: use https://, or opt in to plaintext explicitly (the balancer must run \
                 with --insecure)"
                    .into(),
            ));
        }
        _ if scheme != "https" => return Err(bad("the scheme must be https://".into())),
        BalancerTrust::Fingerprint(pin) => endpoint.tls_config_with_verifier(config, Arc::new(PinnedCert::new(*pin))),
        BalancerTrust::Ca { pem, server_name } => {
            crate::tls::ca_roots(pem)?;
            if let Some(name) = server_name {
                config = config.domain_name(name.clone());
            }
            endpoint.tls_config(config.ca_certificate(Certificate::from_pem(pem)))
        }
    };
    configured.map_err(|e| TlsError::Config(e.to_string()))
}

/// The balancer's TLS settings: its identity and, with `client_ca` (PEM),
/// client certificates verified against that CA. Clients without one still
/// connect (libcuda, the Lambda extension); the balancer decides per call
/// whether a certificate is required.
pub fn server_config(identity: &Identity, client_ca: Option<&[u8]>) -> Result<ServerTlsConfig, TlsError> {
    let (cert, key) = to_pem(identity);
    let mut config =
        ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key)).timeout(HANDSHAKE_TIMEOUT);
    if let Some(pem) = client_ca {
        crate::tls::ca_roots(pem)?;
        config = config.client_ca_root(Certificate::from_pem(pem)).client_auth_optional(true);
    }
    Ok(config)
}

/// A readable reason for a failed call: the status and every source below
/// it, where tonic keeps the TLS verdict (a wrong pin, an unknown CA).
pub fn describe(status: &tonic::Status) -> String {
    let head = format!("{}: {}", status.code().description(), status.message());
    with_sources(head, std::error::Error::source(status))
}

/// An error and its sources on one line, each said once.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    with_sources(error.to_string(), error.source())
}

fn with_sources(mut text: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// [`describe`], with a hint where a plaintext client most likely met a
/// balancer that speaks TLS (its handshake reads as a broken HTTP/2 frame).
pub fn describe_for(status: &tonic::Status, trust: &BalancerTrust) -> String {
    let text = describe(status);
    // The handshake reads as a broken frame (Internal), a refused stream
    // (Unavailable) or, when the balancer drops the connection first, a
    // broken pipe (Unknown).
    let transport = matches!(status.code(), tonic::Code::Internal | tonic::Code::Unavailable | tonic::Code::Unknown);
    if *trust == BalancerTrust::Insecure && transport {
        format!(
            "{text} (a plaintext client gets this from a balancer that runs TLS: use https:// with its certificate's \
             SHA-256 or a CA)"
        )
    } else {
        text
    }
}

/// PEM text of an identity's chain and key (tonic takes PEM).
fn to_pem(identity: &Identity) -> (String, String) {
    let chain = identity.chain.iter().map(|c| pem_block("CERTIFICATE", c.as_ref())).collect::<String>();
    let label = match &identity.key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    (chain, pem_block(label, identity.key.secret_der()))
}

/// One PEM block: `der` in base64 under `label`.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsSource;

    #[test]
    fn pem_round_trips() {
        let id = Identity::load(&TlsSource::SelfSigned { names: vec!["localhost".into()] }).unwrap();
        let (cert, key) = to_pem(&id);
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        assert_eq!(CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(), id.chain[0]);
        assert_eq!(PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap().secret_der(), id.key.secret_der());
    }

    #[test]
    fn trust_and_scheme_must_agree() {
        let pin = BalancerTrust::Fingerprint([7; 32]);
        assert!(endpoint("https://127.0.0.1:1", &pin, None).is_ok());
        assert!(matches!(endpoint("http://127.0.0.1:1", &pin, None), Err(TlsError::Url { .. })));
        assert!(endpoint("http://127.0.0.1:1", &BalancerTrust::Insecure, None).is_ok());
        assert!(matches!(endpoint("https://127.0.0.1:1", &BalancerTrust::Insecure, None), Err(TlsError::Url { .. })));
        assert!(BalancerTrust::from_settings(None, None, None, false).is_err());
        assert!(BalancerTrust::from_settings(Some(&"ab".repeat(32)), None, None, true).is_err());
        assert_eq!(BalancerTrust::from_settings(None, None, None, true).unwrap(), BalancerTrust::Insecure);
    }
}
