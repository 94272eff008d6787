//! Configuration from the environment: a library loaded in place of
//! libcuda has no command line. Every problem is reported at once.
//!
//! | variable | meaning |
//! |---|---|
//! | `GPUPOOL_SERVER` | gpu-server address, `host:port` (required) |
//! | `GPUPOOL_TOKEN` | session token (required) |
//! | `GPUPOOL_CERT_SHA256` | pin: hex SHA-256 of the server certificate |
//! | `GPUPOOL_CA_FILE` | or: PEM CA bundle to verify the server against |
//! | `GPUPOOL_SERVER_NAME` | name in the server certificate (CA mode; default `localhost`) |
//! | `GPUPOOL_MAX_UDP_PAYLOAD` | largest UDP payload (default 1472; Lambda: 1200) |
//! | `GPUPOOL_LOG` | log filter for stderr (default `warn`) |

use gpupool_client::{ClientConfig, Trust};
use std::net::ToSocketAddrs;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The client configuration the environment describes.
pub(crate) fn client_config() -> Result<ClientConfig, String> {
    from_lookup(var)
}

/// Same, reading variables through `lookup` (tests).
pub(crate) fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<ClientConfig, String> {
    let mut problems = Vec::new();
    let server = match lookup("GPUPOOL_SERVER") {
        None => {
            problems.push("GPUPOOL_SERVER is not set (host:port of a gpu-server)".to_string());
            None
        }
        Some(s) => match s.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => Some(addr),
            _ => {
                problems.push(format!("GPUPOOL_SERVER={s} is not a reachable host:port"));
                None
            }
        },
    };
    let token = lookup("GPUPOOL_TOKEN").unwrap_or_default();
    if token.is_empty() {
        problems.push("GPUPOOL_TOKEN is not set".into());
    }
    let trust = match (lookup("GPUPOOL_CERT_SHA256"), lookup("GPUPOOL_CA_FILE")) {
        (Some(pin), None) => Some(Trust::Fingerprint(pin.to_ascii_lowercase())),
        (None, Some(path)) => match std::fs::read(&path) {
            Ok(pem) => Some(Trust::CaPem(pem)),
            Err(e) => {
                problems.push(format!("GPUPOOL_CA_FILE={path}: {e}"));
                None
            }
        },
        (Some(_), Some(_)) => {
            problems.push("set one of GPUPOOL_CERT_SHA256 and GPUPOOL_CA_FILE, not both".into());
            None
        }
        (None, None) => {
            problems.push("GPUPOOL_CERT_SHA256 or GPUPOOL_CA_FILE must say how to trust the server".into());
            None
        }
    };
    let payload = match lookup("GPUPOOL_MAX_UDP_PAYLOAD").map(|v| v.parse::<u16>()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            problems.push("GPUPOOL_MAX_UDP_PAYLOAD must be a number of bytes".into());
            None
        }
    };
    let (Some(server), Some(trust), true) = (server, trust, problems.is_empty()) else {
        return Err(problems.join("; "));
    };
    let mut config = ClientConfig::new(server, trust, token);
    if let Some(name) = lookup("GPUPOOL_SERVER_NAME") {
        config.server_name = name;
    }
    if let Some(p) = payload {
        config.max_udp_payload = p;
    }
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn complete_environment() {
        let pin = "ab".repeat(32);
        let c = from_lookup(lookup(&[
            ("GPUPOOL_SERVER", "127.0.0.1:4433"),
            ("GPUPOOL_TOKEN", "t"),
            ("GPUPOOL_CERT_SHA256", &pin),
            ("GPUPOOL_MAX_UDP_PAYLOAD", "1200"),
        ]))
        .expect("valid");
        assert_eq!(c.server.port(), 4433);
        assert_eq!(c.max_udp_payload, 1200);
        assert_eq!(c.trust, Trust::Fingerprint(pin));
    }

    #[test]
    fn every_problem_reported() {
        let err = from_lookup(lookup(&[("GPUPOOL_MAX_UDP_PAYLOAD", "x")])).expect_err("empty");
        for needle in ["GPUPOOL_SERVER", "GPUPOOL_TOKEN", "GPUPOOL_CERT_SHA256", "GPUPOOL_MAX_UDP_PAYLOAD"] {
            assert!(err.contains(needle), "{err}");
        }
    }
}
