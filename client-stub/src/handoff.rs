//! A lease handed from one process to another through a file: the Lambda
//! extension leases a GPU during the environment's INIT phase and keeps it
//! renewed; the function's drop-in libcuda (`GPUPOOL_LEASE_FILE`) opens its
//! session with the lease's server, pin and token without asking the
//! balancer itself.
//!
//! The file is `key=value` lines, written to a temporary name and renamed
//! into place (a reader never sees half a file), mode 0600 (the token is a
//! credential).

use crate::{ClientConfig, ClientError, Result, Trust};
use gpupool_proto::balancer as pb;
use std::io::{Read, Write};
use std::net::ToSocketAddrs;
use std::path::Path;

/// Longest hand-off file read: its five lines are a few hundred bytes (a
/// token is at most `gpupool_proto::lease::MAX_TOKEN_LEN`).
pub const MAX_HANDOFF_BYTES: u64 = 16 << 10;

/// What a session needs from a lease held elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHandoff {
    pub lease_id: u64,
    /// QUIC address of the leased server, `host:port`.
    pub address: String,
    /// Hex SHA-256 of the server's certificate.
    pub cert_sha256: String,
    /// The lease's session token.
    pub token: String,
    /// Unix time in milliseconds after which the lease is void unless renewed.
    pub expires_unix_ms: u64,
}

impl From<&pb::Lease> for LeaseHandoff {
    fn from(l: &pb::Lease) -> Self {
        Self {
            lease_id: l.lease_id,
            address: l.address.clone(),
            cert_sha256: l.cert_sha256.clone(),
            token: l.token.clone(),
            expires_unix_ms: l.expires_unix_ms,
        }
    }
}

impl LeaseHandoff {
    /// The file's text.
    pub fn encode(&self) -> String {
        format!(
            "lease_id={}\naddress={}\ncert_sha256={}\ntoken={}\nexpires_unix_ms={}\n",
            self.lease_id, self.address, self.cert_sha256, self.token, self.expires_unix_ms
        )
    }

    /// Parses the file's text; every key must be present, values without
    /// line breaks.
    pub fn decode(text: &str) -> Result<Self> {
        let bad = |why: String| ClientError::Config(format!("lease hand-off file: {why}"));
        let mut fields = std::collections::HashMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once('=').ok_or_else(|| {
                let shown: String = line.chars().take(64).collect();
                bad(format!("line {shown:?} is not key=value"))
            })?;
            fields.insert(k.trim(), v.trim().to_string());
        }
        let mut take = |key: &str| fields.remove(key).ok_or_else(|| bad(format!("{key} is missing")));
        let number = |key: &str, v: String| v.parse::<u64>().map_err(|_| bad(format!("{key} is not a number")));
        let lease_id = number("lease_id", take("lease_id")?)?;
        let address = take("address")?;
        let cert_sha256 = take("cert_sha256")?;
        let token = take("token")?;
        let expires_unix_ms = number("expires_unix_ms", take("expires_unix_ms")?)?;
        if token.is_empty() || address.is_empty() {
            return Err(bad("address and token must not be empty".into()));
        }
        Ok(Self { lease_id, address, cert_sha256, token, expires_unix_ms })
    }

    /// Writes the file atomically with mode 0600.
    pub fn write(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| ClientError::Config(format!("writing {}: {e}", path.display()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp).map_err(io)?;
        f.write_all(self.encode().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads the file, at most [`MAX_HANDOFF_BYTES`] of it: a path that
    /// names something else (a device, a log) fails instead of filling
    /// memory.
    pub fn read(path: &Path) -> Result<Self> {
        let missing = |e: std::io::Error| ClientError::Connect(format!("no lease hand-off at {}: {e}", path.display()));
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_HANDOFF_BYTES + 1).read_to_string(&mut text))
            .map_err(missing)?;
        if text.len() as u64 > MAX_HANDOFF_BYTES {
            return Err(ClientError::Config(format!(
                "lease hand-off file {} is longer than {MAX_HANDOFF_BYTES} bytes",
                path.display()
            )));
        }
        Self::decode(&text)
    }

    /// A session configuration for the leased server: `template` with the
    /// lease's address, certificate pin and token.
    pub fn client_config(&self, template: &ClientConfig) -> Result<ClientConfig> {
        let server = self.address.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or_else(|| {
            ClientError::Connect(format!("the leased server's address {:?} does not resolve", self.address))
        })?;
        let mut c = template.clone();
        c.server = server;
        c.token = self.token.clone();
        if !self.cert_sha256.is_empty() {
            c.trust = Trust::Fingerprint(self.cert_sha256.clone());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LeaseHandoff {
        LeaseHandoff {
            lease_id: 42,
            address: "127.0.0.1:4433".into(),
            cert_sha256: "ab".repeat(32),
            token: "gpl1.claims.sig".into(),
            expires_unix_ms: 1_790_000_000_000,
        }
    }

    #[test]
    fn round_trip_through_a_private_file() {
        let dir = std::env::temp_dir().join(format!("gpupool-handoff-{}", std::process::id()));
        let path = dir.join("lease");
        sample().write(&path).expect("write");
        assert_eq!(LeaseHandoff::read(&path).expect("read"), sample());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let c = sample().client_config(&ClientConfig::for_leases()).expect("config");
        assert_eq!(c.server.port(), 4433);
        assert_eq!(c.token, "gpl1.claims.sig");
        assert!(matches!(c.trust, Trust::Fingerprint(ref p) if p == &"ab".repeat(32)));
        std::fs::remove_dir_all(dir).expect("clean up");
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let text = sample().encode().replace("token=gpl1.claims.sig\n", "");
        let e = LeaseHandoff::decode(&text).expect_err("no token");
        assert!(e.to_string().contains("token is missing"), "{e}");
        let e = LeaseHandoff::decode("lease_id=x\n").expect_err("bad number");
        assert!(e.to_string().contains("lease_id is not a number"), "{e}");
        assert!(LeaseHandoff::decode("garbage").is_err());
        assert!(LeaseHandoff::read(Path::new("/nonexistent/gpupool/lease")).is_err());
    }

    /// A path naming an endless file (seen while writing the fuzz targets):
    /// read whole, it filled memory; now it is refused at the cap.
    #[cfg(unix)]
    #[test]
    fn endless_files_are_refused_at_the_cap() {
        let e = LeaseHandoff::read(Path::new("/dev/zero")).expect_err("endless");
        assert!(e.to_string().contains("longer than"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(gpupool_proto::fuzz::config(256))]

        /// Any text: a value or an error, never a panic; what decodes has
        /// every field without line breaks.
        #[test]
        fn decode_any_text(text in "(?s).{0,400}") {
            if let Ok(h) = LeaseHandoff::decode(&text) {
                proptest::prop_assert!(!h.token.is_empty() && !h.token.contains('\n'));
            }
        }

        /// Valid files with edits decode or fail; valid values round trip.
        #[test]
        fn mutated_files(edits in gpupool_proto::fuzz::mutations(), token in "[!-~]{1,100}", id in proptest::prelude::any::<u64>()) {
            let h = LeaseHandoff { lease_id: id, token, ..sample() };
            let text = h.encode();
            proptest::prop_assert_eq!(LeaseHandoff::decode(&text).expect("valid"), h);
            let bytes = gpupool_proto::fuzz::mutate(text.into_bytes(), &edits);
            let _ = LeaseHandoff::decode(&String::from_utf8_lossy(&bytes));
        }
    }
}
