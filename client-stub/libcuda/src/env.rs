//! Configuration from the environment: a library loaded in place of
//! libcuda has no command line. Every problem is reported at once.
//!
//! | variable | meaning |
//! |---|---|
//! | `GPUPOOL_LEASE_FILE` | a lease another process holds (the Lambda extension writes it): open the session with its server, pin and token |
//! | `GPUPOOL_BALANCER` | balancer URL (`https://host:port`): lease a virtual GPU from the pool |
//! | `GPUPOOL_BALANCER_CERT_SHA256` | with a balancer: hex SHA-256 of its certificate (what it logs at start) |
//! | `GPUPOOL_BALANCER_CA_FILE` | or: PEM CA bundle to verify the balancer against (`GPUPOOL_BALANCER_SERVER_NAME`: the name in its certificate, default the URL's host) |
//! | `GPUPOOL_BALANCER_CA_PEM` | or: the PEM CA bundle itself (a Lambda function's environment) |
//! | `GPUPOOL_BALANCER_INSECURE` | `1`: plaintext to a balancer run with `--insecure` (an `http://` URL) |
//! | `GPUPOOL_TENANT` | with a balancer: tenant the lease is for (default: the tenant of the credential; a balancer in a legacy mode takes `default`) |
//! | `GPUPOOL_MEMORY_MIB` | with a balancer: device memory needed (default: any) |
//! | `GPUPOOL_COMPUTE_PERCENT` | with a balancer: share of a full GPU's SMs needed (default: any) |
//! | `GPUPOOL_PROFILE` | with a balancer: MIG profile by name or id (default: any instance) |
//! | `GPUPOOL_LEASE_CLASS` | with a balancer: `exclusive` (default: an instance or whole GPU of its own) or `shared` (a share of a whole GPU, `GPUPOOL_MEMORY_MIB` and `GPUPOOL_COMPUTE_PERCENT`, beside other shares of the tenant or of tenants that opted in to sharing fate) |
//! | `GPUPOOL_WAIT_MS` | with a balancer: longest wait in its queue (default 10000) |
//! | `GPUPOOL_BALANCER_SECRET` | with a balancer: the tenant's credential (the balancer takes the tenant from it) |
//! | `GPUPOOL_BALANCER_SECRET_FILE` | or: a file holding it |
//! | `GPUPOOL_SERVER` | without a balancer: gpu-server address, `host:port` |
//! | `GPUPOOL_TOKEN` | without a balancer: session token |
//! | `GPUPOOL_CERT_SHA256` | pin: hex SHA-256 of the server certificate |
//! | `GPUPOOL_CA_FILE` | or: PEM CA bundle to verify the server against |
//! | `GPUPOOL_SERVER_NAME` | name in the server certificate (CA mode; default `localhost`) |
//! | `GPUPOOL_MAX_UDP_PAYLOAD` | largest UDP payload (default 1472, bulk connections to a loopback server 65527; Lambda: 1200) |
//! | `GPUPOOL_BULK_CONNECTIONS` | extra QUIC connections for bulk copies when the server offers them (default 4; 0: copies share the session's connection) |
//! | `GPUPOOL_SHM` | `off` (or `0`): keep copies on QUIC even when the server shares this host; default on: a client on the server's host attaches a shared-memory region and copies go through it |
//! | `GPUPOOL_SHM_COMMANDS` | `off` (or `0`): keep the session's commands (batches, replies) on QUIC even with a shared-memory attachment; default on: they go through a command ring in shared memory when the server offers it (`GPUPOOL_SHM=off` turns this off too) |
//! | `GPUPOOL_ASYNC_COPIES` | `off` (or `0`): every copy to the device from ordinary memory completes on the server before the next call; default on: an asynchronous one (`cuMemcpyHtoDAsync`, `cudaMemcpyAsync`) is only queued there, ordered on its stream as natively |
//! | `GPUPOOL_SHM_MIB` | size of that region in MiB (default 32, at most 1024) |
//! | `GPUPOOL_SHM_PINNED_MIB` | most pinned host memory (`cuMemHostAlloc`, `cudaMallocHost`) kept in host regions shared with the server, in MiB (default 8192; 0: pinned memory is plain memory); beyond it pinned allocations are plain memory |
//! | `GPUPOOL_RDMA` | `off` (or `0`): never offer RDMA; default on: a client with an RDMA device (built with `rdma-verbs`) offers it, and its commands and copies go over RDMA when the server and the lease allow it (docs/rdma.md) |
//! | `GPUPOOL_BATCH_DELAY_US` | longest wait of a queued call for company while earlier batches are in flight (default 100; `off`: queued calls go only with a synchronizing call or a full batch) |
//! | `GPUPOOL_IO_SPIN_US` | keep the I/O thread awake this long after the program begins to wait for a reply, so that the reply and the next send need no kernel wake-up (default 100 where the process may use 4 CPUs or more, else 0; spends a core while the program waits) |
//! | `GPUPOOL_LOG` | log filter for stderr (default `warn`) |
//! | `GPUPOOL_CALL_STATS` | `1`: the call table at exit (`call_stats`); `gpupool_call_stats()` reads it in-process, `gpupool_call_stats_pause()` stops and resumes counting |

use gpupool_client::{ClientConfig, PoolRequest, Trust};
use std::net::ToSocketAddrs;

/// Where the session comes from.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// A gpu-server named directly, with a shared-secret token.
    Direct(ClientConfig),
    /// A lease from the balancer; the configuration is a template whose
    /// server, pin and token the lease fills in.
    Pooled(PoolRequest, ClientConfig),
    /// A lease another process holds and hands over in a file
    /// ([`gpupool_client::LeaseHandoff`]); same template.
    Handoff(std::path::PathBuf, ClientConfig),
}

impl Target {
    /// Where the session is opened, for messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Direct(c) => c.server.to_string(),
            Self::Pooled(r, _) => format!("a GPU leased from {}", r.balancer),
            Self::Handoff(path, _) => format!("the GPU leased in {}", path.display()),
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The session the environment describes.
pub(crate) fn target() -> Result<Target, String> {
    target_from_lookup(var)
}

/// `name` as `on` or `off` (`None`: not set, or not either, which is a problem).
fn on_off(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    problems: &mut Vec<&'static str>,
) -> Option<bool> {
    match lookup(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => None,
        Some(v) if ["off", "0", "false", "no"].contains(&v.as_str()) => Some(false),
        Some(v) if ["on", "1", "true", "yes"].contains(&v.as_str()) => Some(true),
        Some(_) => {
            problems.push(match name {
                "GPUPOOL_SHM" => "GPUPOOL_SHM must be `on` or `off`",
                "GPUPOOL_SHM_COMMANDS" => "GPUPOOL_SHM_COMMANDS must be `on` or `off`",
                "GPUPOOL_ASYNC_COPIES" => "GPUPOOL_ASYNC_COPIES must be `on` or `off`",
                _ => "GPUPOOL_RDMA must be `on` or `off`",
            });
            None
        }
    }
}

/// Client tuning from the environment: `GPUPOOL_BULK_CONNECTIONS`,
/// `GPUPOOL_SHM`, `GPUPOOL_SHM_COMMANDS`, `GPUPOOL_ASYNC_COPIES`, `GPUPOOL_SHM_MIB`, `GPUPOOL_SHM_PINNED_MIB`, `GPUPOOL_RDMA`, `GPUPOOL_BATCH_DELAY_US`, `GPUPOOL_IO_SPIN_US` (`None`: not set).
#[derive(Debug, Default)]
struct Tuning {
    bulk_connections: Option<usize>,
    download_piece_bytes: Option<usize>,
    shm_region_bytes: Option<usize>,
    shm_pinned_bytes: Option<usize>,
    shm_commands: Option<bool>,
    async_copies: Option<bool>,
    rdma: Option<bool>,
    batch_delay: Option<Option<std::time::Duration>>,
    io_spin: Option<std::time::Duration>,
}

impl Tuning {
    /// Reads the variables, reporting every bad value at once.
    fn from_lookup(lookup: &impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut problems = Vec::new();
        let mut t = Self::default();
        match lookup("GPUPOOL_BULK_CONNECTIONS").map(|v| v.trim().parse::<usize>()) {
            None => {}
            Some(Ok(n)) if n <= 64 => t.bulk_connections = Some(n),
            Some(_) => problems.push("GPUPOOL_BULK_CONNECTIONS must be a whole number from 0 to 64"),
        }
        match lookup("GPUPOOL_DOWNLOAD_PIECE_MIB").map(|v| v.trim().parse::<usize>()) {
            None => {}
            Some(Ok(n)) if (1..=512).contains(&n) => t.download_piece_bytes = Some(n << 20),
            Some(_) => problems.push("GPUPOOL_DOWNLOAD_PIECE_MIB must be a whole number from 1 to 512"),
        }
        let shm_on = on_off(lookup, "GPUPOOL_SHM", &mut problems).unwrap_or(true);
        t.rdma = on_off(lookup, "GPUPOOL_RDMA", &mut problems);
        t.shm_commands = on_off(lookup, "GPUPOOL_SHM_COMMANDS", &mut problems);
        t.async_copies = on_off(lookup, "GPUPOOL_ASYNC_COPIES", &mut problems);
        match lookup("GPUPOOL_SHM_MIB").map(|v| v.trim().parse::<usize>()) {
            None => {}
            Some(Ok(n)) if (1..=1024).contains(&n) => t.shm_region_bytes = Some(n << 20),
            Some(_) => problems.push("GPUPOOL_SHM_MIB must be a whole number from 1 to 1024"),
        }
        match lookup("GPUPOOL_SHM_PINNED_MIB").map(|v| v.trim().parse::<usize>()) {
            None => {}
            Some(Ok(n)) if n <= 1 << 20 => t.shm_pinned_bytes = Some(n << 20),
            Some(_) => problems.push("GPUPOOL_SHM_PINNED_MIB must be a whole number from 0 to 1048576"),
        }
        if !shm_on {
            t.shm_region_bytes = Some(0);
        }
        match lookup("GPUPOOL_BATCH_DELAY_US").map(|v| v.trim().to_ascii_lowercase()) {
            None => {}
            Some(v) if v == "off" => t.batch_delay = Some(None),
            Some(v) => match v.parse::<u64>() {
                Ok(us) if us <= 1_000_000 => t.batch_delay = Some(Some(std::time::Duration::from_micros(us))),
                _ => problems.push("GPUPOOL_BATCH_DELAY_US must be `off` or microseconds from 0 to 1000000"),
            },
        }
        match lookup("GPUPOOL_IO_SPIN_US").map(|v| v.trim().parse::<u64>()) {
            None => {}
            Some(Ok(us)) if us <= 1_000_000 => t.io_spin = Some(std::time::Duration::from_micros(us)),
            Some(_) => problems.push("GPUPOOL_IO_SPIN_US must be microseconds from 0 to 1000000"),
        }
        if problems.is_empty() { Ok(t) } else { Err(problems.join("; ")) }
    }

    fn apply(&self, config: &mut ClientConfig) {
        if let Some(n) = self.bulk_connections {
            config.bulk_connections = n;
        }
        if let Some(n) = self.download_piece_bytes {
            config.download_piece_bytes = n;
        }
        if let Some(n) = self.shm_pinned_bytes {
            config.shm_pinned_bytes = n;
        }
        if let Some(n) = self.shm_region_bytes {
            config.shm_region_bytes = n;
        }
        if let Some(on) = self.rdma {
            config.rdma.enabled = on;
        }
        if let Some(on) = self.shm_commands {
            config.shm_commands = on;
        }
        if let Some(on) = self.async_copies {
            config.async_copies = on;
        }
        if let Some(d) = self.batch_delay {
            config.batch.max_delay = d;
        }
        if let Some(s) = self.io_spin {
            config.io_spin = s;
        }
    }
}

/// Same, reading variables through `lookup` (tests).
pub(crate) fn target_from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Target, String> {
    if let Some(path) = lookup("GPUPOOL_LEASE_FILE") {
        return lease_template(&lookup).map(|t| Target::Handoff(path.into(), t));
    }
    if lookup("GPUPOOL_BALANCER").is_none() {
        return from_lookup(lookup).map(Target::Direct);
    }
    let request = PoolRequest::from_lookup(&lookup);
    let mut problems = request.as_ref().err().cloned().unwrap_or_default();
    match (request, lease_template(&lookup)) {
        (Ok(request), Ok(template)) => Ok(Target::Pooled(request, template)),
        (_, template) => {
            problems.extend(template.err());
            Err(problems.join("; "))
        }
    }
}

/// The session configuration a lease completes (server, pin and token come
/// from the lease).
fn lease_template(lookup: &impl Fn(&str) -> Option<String>) -> Result<ClientConfig, String> {
    let default_payload = gpupool_proto::quic::DEFAULT_UDP_PAYLOAD;
    let payload = match lookup("GPUPOOL_MAX_UDP_PAYLOAD").map(|v| v.trim().parse::<u16>()) {
        None => default_payload,
        Some(Ok(v)) => v,
        Some(Err(_)) => return Err("GPUPOOL_MAX_UDP_PAYLOAD must be a whole number".into()),
    };
    let mut template = ClientConfig::for_leases();
    template.max_udp_payload = payload;
    Tuning::from_lookup(lookup)?.apply(&mut template);
    if let Some(name) = lookup("GPUPOOL_SERVER_NAME") {
        template.server_name = name;
    }
    template.validate()?;
    Ok(template)
}

/// Same, reading variables through `lookup` (tests).
pub(crate) fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<ClientConfig, String> {
    let mut problems = Vec::new();
    let server = match lookup("GPUPOOL_SERVER") {
        None => {
            problems.push(
                "GPUPOOL_BALANCER or GPUPOOL_SERVER must be set (a balancer URL, or host:port of a gpu-server)"
                    .to_string(),
            );
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
    let tuning = Tuning::from_lookup(&lookup).unwrap_or_else(|e| {
        problems.push(e);
        Tuning::default()
    });
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
    tuning.apply(&mut config);
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
    fn balancer_target() {
        let pin = "ab".repeat(32);
        let t = target_from_lookup(lookup(&[
            ("GPUPOOL_BALANCER", "https://10.0.0.5:50051"),
            ("GPUPOOL_BALANCER_CERT_SHA256", &pin),
            ("GPUPOOL_TENANT", "team-a"),
            ("GPUPOOL_MEMORY_MIB", "2048"),
            ("GPUPOOL_PROFILE", "1g.10gb"),
            ("GPUPOOL_MAX_UDP_PAYLOAD", "1200"),
        ]))
        .expect("valid");
        let Target::Pooled(r, c) = t else { panic!("expected a pooled target") };
        assert_eq!((r.tenant.as_str(), r.memory, r.profile.as_deref()), ("team-a", 2 << 30, Some("1g.10gb")));
        assert!(!r.shared, "exclusive unless asked");
        let shared = [
            ("GPUPOOL_BALANCER", "https://10.0.0.5:50051"),
            ("GPUPOOL_BALANCER_CERT_SHA256", pin.as_str()),
            ("GPUPOOL_LEASE_CLASS", "shared"),
        ];
        let Ok(Target::Pooled(r, _)) = target_from_lookup(lookup(&shared)) else { panic!("a shared lease") };
        assert!(r.shared);
        assert_eq!(c.max_udp_payload, 1200);
        assert!(matches!(r.trust, gpupool_client::BalancerTrust::Fingerprint(_)));
        // Plaintext only with the opt-in, and never with a pin.
        let plain = target_from_lookup(lookup(&[("GPUPOOL_BALANCER", "http://10.0.0.5:50051")]));
        assert!(plain.expect_err("no trust").contains("GPUPOOL_BALANCER_INSECURE"));
        let plain = [("GPUPOOL_BALANCER", "http://10.0.0.5:50051"), ("GPUPOOL_BALANCER_INSECURE", "1")];
        assert!(target_from_lookup(lookup(&plain)).is_ok());
        let mixed = [("GPUPOOL_BALANCER", "http://10.0.0.5:50051"), ("GPUPOOL_BALANCER_CERT_SHA256", pin.as_str())];
        assert!(target_from_lookup(lookup(&mixed)).expect_err("pinned plaintext").contains("http:// is plaintext"));
        let bad = target_from_lookup(lookup(&[
            ("GPUPOOL_BALANCER", "10.0.0.5:50051"),
            ("GPUPOOL_BALANCER_INSECURE", "1"),
            ("GPUPOOL_MEMORY_MIB", "lots"),
            ("GPUPOOL_COMPUTE_PERCENT", "150"),
            ("GPUPOOL_LEASE_CLASS", "roomy"),
        ]))
        .expect_err("invalid");
        for needle in ["URL", "GPUPOOL_MEMORY_MIB", "GPUPOOL_COMPUTE_PERCENT", "GPUPOOL_LEASE_CLASS"] {
            assert!(bad.contains(needle), "{needle} missing from {bad}");
        }
    }

    /// The tenant comes from the credential unless named; the credential
    /// from the variable or a file, not both.
    #[test]
    fn the_credential_names_the_tenant() {
        let pin = "ab".repeat(32);
        let base = [("GPUPOOL_BALANCER", "https://10.0.0.5:50051"), ("GPUPOOL_BALANCER_CERT_SHA256", pin.as_str())];
        let with = |extra: &[(&str, &str)]| {
            let pairs: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
            target_from_lookup(lookup(&pairs))
        };
        let Ok(Target::Pooled(r, _)) = with(&[("GPUPOOL_BALANCER_SECRET", " gpt1_abc\n")]) else { panic!("pooled") };
        assert_eq!((r.tenant.as_str(), r.secret.as_deref()), ("", Some("gpt1_abc")), "tenant left to the balancer");
        let file = std::env::temp_dir().join(format!("gpupool-secret-{}", std::process::id()));
        std::fs::write(&file, "gpt1_from_file\n").expect("secret file");
        let path = file.to_str().expect("path");
        let Ok(Target::Pooled(r, _)) = with(&[("GPUPOOL_BALANCER_SECRET_FILE", path)]) else { panic!("pooled") };
        assert_eq!(r.secret.as_deref(), Some("gpt1_from_file"));
        let both = with(&[("GPUPOOL_BALANCER_SECRET", "x"), ("GPUPOOL_BALANCER_SECRET_FILE", path)]);
        assert!(both.expect_err("both").contains("not both"));
        let _ = std::fs::remove_file(&file);
        let missing = with(&[("GPUPOOL_BALANCER_SECRET_FILE", "/nonexistent/gpupool-secret")]);
        assert!(missing.expect_err("no file").contains("GPUPOOL_BALANCER_SECRET_FILE"));
    }

    #[test]
    fn lease_file_target_takes_precedence() {
        let t = target_from_lookup(lookup(&[
            ("GPUPOOL_LEASE_FILE", "/tmp/gpupool/lease"),
            ("GPUPOOL_BALANCER", "https://10.0.0.5:50051"),
            ("GPUPOOL_MAX_UDP_PAYLOAD", "1200"),
        ]))
        .expect("valid");
        let Target::Handoff(path, c) = t else { panic!("expected a hand-off target") };
        assert_eq!(path, std::path::Path::new("/tmp/gpupool/lease"));
        assert_eq!(c.max_udp_payload, 1200);
        let bad = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_MAX_UDP_PAYLOAD", "big")]));
        assert!(bad.expect_err("invalid").contains("GPUPOOL_MAX_UDP_PAYLOAD"));
    }

    #[test]
    fn complete_environment() {
        let pin = "ab".repeat(32);
        let c = from_lookup(lookup(&[
            ("GPUPOOL_SERVER", "127.0.0.1:4433"),
            ("GPUPOOL_TOKEN", "t"),
            ("GPUPOOL_CERT_SHA256", &pin),
            ("GPUPOOL_MAX_UDP_PAYLOAD", "1200"),
            ("GPUPOOL_BULK_CONNECTIONS", "8"),
            ("GPUPOOL_BATCH_DELAY_US", "20"),
            ("GPUPOOL_SHM_MIB", "64"),
            ("GPUPOOL_SHM_PINNED_MIB", "512"),
            ("GPUPOOL_DOWNLOAD_PIECE_MIB", "64"),
        ]))
        .expect("valid");
        assert_eq!(c.download_piece_bytes, 64 << 20);
        assert_eq!(c.shm_region_bytes, 64 << 20);
        assert_eq!(c.shm_pinned_bytes, 512 << 20);
        assert_eq!(c.server.port(), 4433);
        assert_eq!(c.max_udp_payload, 1200);
        assert_eq!(c.bulk_connections, 8);
        assert_eq!(c.batch.max_delay, Some(std::time::Duration::from_micros(20)));
        let off = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_BATCH_DELAY_US", "OFF")]));
        let Ok(Target::Handoff(_, template)) = off else { panic!("a hand-off target") };
        assert_eq!(template.batch.max_delay, None);
        assert_eq!(template.shm_region_bytes, gpupool_client::DEFAULT_SHM_REGION_BYTES, "on by default");
        let no_shm = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_SHM", "off")]));
        let Ok(Target::Handoff(_, template)) = no_shm else { panic!("a hand-off target") };
        assert_eq!(template.shm_region_bytes, 0, "GPUPOOL_SHM=off");
        let bad = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_SHM_PINNED_MIB", "-1")]));
        assert!(bad.expect_err("invalid").contains("GPUPOOL_SHM_PINNED_MIB"));
        assert!(template.rdma.enabled, "RDMA offered by default");
        let no_rdma = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_RDMA", "off")]));
        let Ok(Target::Handoff(_, template)) = no_rdma else { panic!("a hand-off target") };
        assert!(!template.rdma.enabled, "GPUPOOL_RDMA=off");
        let bad = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_RDMA", "maybe")]));
        assert!(bad.is_err_and(|e| e.contains("GPUPOOL_RDMA must be")));
        assert!(template.shm_commands, "commands through shared memory by default");
        let no_ring = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_SHM_COMMANDS", "off")]));
        let Ok(Target::Handoff(_, template)) = no_ring else { panic!("a hand-off target") };
        assert!(!template.shm_commands, "GPUPOOL_SHM_COMMANDS=off");
        assert_ne!(template.shm_region_bytes, 0, "copies still through shared memory");
        let bad = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_SHM_COMMANDS", "x")]));
        assert!(bad.is_err_and(|e| e.contains("GPUPOOL_SHM_COMMANDS must be")));
        assert!(template.async_copies, "asynchronous copies only queue by default");
        let sync = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_ASYNC_COPIES", "off")]));
        let Ok(Target::Handoff(_, template)) = sync else { panic!("a hand-off target") };
        assert!(!template.async_copies, "GPUPOOL_ASYNC_COPIES=off");
        let bad = target_from_lookup(lookup(&[("GPUPOOL_LEASE_FILE", "/x"), ("GPUPOOL_ASYNC_COPIES", "later")]));
        assert!(bad.is_err_and(|e| e.contains("GPUPOOL_ASYNC_COPIES must be")));
        assert_eq!(c.trust, Trust::Fingerprint(pin));
    }

    #[test]
    fn every_problem_reported() {
        let err = from_lookup(lookup(&[
            ("GPUPOOL_MAX_UDP_PAYLOAD", "x"),
            ("GPUPOOL_BULK_CONNECTIONS", "many"),
            ("GPUPOOL_BATCH_DELAY_US", "soon"),
            ("GPUPOOL_SHM", "maybe"),
            ("GPUPOOL_SHM_MIB", "0"),
            ("GPUPOOL_DOWNLOAD_PIECE_MIB", "0"),
        ]))
        .expect_err("empty");
        for needle in [
            "GPUPOOL_SERVER",
            "GPUPOOL_TOKEN",
            "GPUPOOL_CERT_SHA256",
            "GPUPOOL_MAX_UDP_PAYLOAD",
            "GPUPOOL_BULK_CONNECTIONS",
            "GPUPOOL_BATCH_DELAY_US",
            "GPUPOOL_SHM must",
            "GPUPOOL_SHM_MIB",
            "GPUPOOL_DOWNLOAD_PIECE_MIB",
        ] {
            assert!(err.contains(needle), "{err}");
        }
    }
}
