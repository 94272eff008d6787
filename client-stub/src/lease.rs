//! A virtual GPU from the balancer: allocate a lease, keep it renewed while
//! the session lives, release it at the end.
//!
//! The balancer speaks gRPC (tonic); this module runs it on a small tokio
//! runtime of its own so callers stay blocking, like the rest of the core.
//! A background thread renews the lease at the interval the balancer asked
//! for and keeps the newest token.

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use gpupool_proto::balancer as pb;
use gpupool_proto::balancer::balancer_client::BalancerClient;
use gpupool_proto::grpc_tls::BalancerTrust;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

/// Longest wait for a release.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// What virtual GPU to ask the balancer for.
#[derive(Clone, PartialEq, Eq)]
pub struct PoolRequest {
    /// The balancer's gRPC URL, e.g. `https://10.0.0.5:50051`.
    pub balancer: String,
    /// How the balancer's certificate is verified (pin or CA), or the
    /// plaintext opt-in with an `http://` URL.
    pub trust: BalancerTrust,
    /// The client's credential: its tenant's own secret (the balancer takes
    /// the tenant from it), or a legacy shared secret; `None` for a
    /// balancer that allows anonymous clients.
    pub secret: Option<String>,
    /// Who pays; quotas apply per tenant. Empty: the tenant of
    /// [`PoolRequest::secret`] (a legacy balancer takes `default`). A
    /// tenant's credential cannot lease for another tenant.
    pub tenant: String,
    /// Device memory needed, in bytes (0: any).
    pub memory: u64,
    /// Share of a full GPU's multiprocessors needed, in percent (0: any).
    pub compute_percent: u32,
    /// A MIG profile by name or id.
    pub profile: Option<String>,
    /// A share of a whole GPU (its memory and `compute_percent`) next to
    /// other shared leases of this tenant, or of tenants that opted in to
    /// sharing fate, instead of an instance of its own (docs/sharing.md).
    pub shared: bool,
    /// How long to wait in the balancer's queue when nothing fits now.
    pub wait: Duration,
    /// Longest wait for one balancer call (besides the queue wait).
    pub call_timeout: Duration,
}

impl std::fmt::Debug for PoolRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential is the tenant's: it never reaches a log.
        f.debug_struct("PoolRequest")
            .field("balancer", &self.balancer)
            .field("trust", &self.trust)
            .field("secret", &self.secret.as_ref().map(|_| "…"))
            .field("tenant", &self.tenant)
            .field("memory", &self.memory)
            .field("compute_percent", &self.compute_percent)
            .field("profile", &self.profile)
            .field("shared", &self.shared)
            .field("wait", &self.wait)
            .field("call_timeout", &self.call_timeout)
            .finish()
    }
}

impl PoolRequest {
    pub fn new(balancer: impl Into<String>, trust: BalancerTrust, tenant: impl Into<String>) -> Self {
        Self {
            balancer: balancer.into(),
            trust,
            secret: None,
            tenant: tenant.into(),
            memory: 0,
            compute_percent: 0,
            profile: None,
            shared: false,
            wait: Duration::ZERO,
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// Times a lease request is sent when the connection drops it.
const ALLOCATE_TRIES: u32 = 3;
/// Pause before the second request (twice that before the third).
const ALLOCATE_BACKOFF: Duration = Duration::from_millis(200);

/// Whether `s` says the request was lost with its connection rather than
/// answered by the balancer (which then says why, with another code).
fn connection_lost(s: &tonic::Status) -> bool {
    match s.code() {
        tonic::Code::Unavailable => true,
        // A stream that ends without an answer: hyper's and rustls's errors
        // reach here as Unknown with the transport's description.
        tonic::Code::Unknown => {
            let m = s.message().to_ascii_lowercase();
            ["transport", "connection", "stream", "close_notify", "broken pipe", "reset"].iter().any(|w| m.contains(w))
        }
        _ => false,
    }
}

fn pool_error(s: &tonic::Status, trust: &BalancerTrust) -> ClientError {
    // The description carries the TLS verdict (a wrong pin, an unknown CA).
    ClientError::Pool { code: format!("{:?}", s.code()), message: gpupool_proto::grpc_tls::describe_for(s, trust) }
}

/// A balancer connection with its own runtime.
#[derive(Debug)]
struct Control {
    rt: tokio::runtime::Runtime,
    client: BalancerClient<Channel>,
    /// `authorization: Bearer <credential>`, marked sensitive (hidden from
    /// tonic's and hyper's debug output).
    secret: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    trust: BalancerTrust,
    timeout: Duration,
}

impl Control {
    fn connect(req: &PoolRequest) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Connect(format!("cannot start the balancer client's runtime: {e}")))?;
        let endpoint = gpupool_proto::grpc_tls::endpoint(&req.balancer, &req.trust, None)
            .map_err(|e| ClientError::Config(e.to_string()))?
            .connect_timeout(req.call_timeout);
        let channel = {
            let _guard = rt.enter();
            endpoint.connect_lazy()
        };
        Ok(Self {
            rt,
            client: BalancerClient::new(channel),
            secret: match &req.secret {
                Some(s) => {
                    let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                        format!("Bearer {s}").parse().map_err(|_| {
                            ClientError::Config("the balancer credential holds characters a header cannot".into())
                        })?;
                    v.set_sensitive(true);
                    Some(v)
                }
                None => None,
            },
            trust: req.trust.clone(),
            timeout: req.call_timeout,
        })
    }

    fn request<T>(&self, message: T, wait: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.set_timeout(self.timeout + wait);
        if let Some(v) = &self.secret {
            r.metadata_mut().insert("authorization", v.clone());
        }
        r
    }

    /// Asks for a lease; a request the connection lost before an answer
    /// (the balancer restarting, a TLS stream cut) is sent again, up to
    /// [`ALLOCATE_TRIES`] times. A lease granted whose answer was lost is
    /// never renewed, so the balancer takes it back when it expires.
    fn allocate(&mut self, req: &PoolRequest) -> Result<pb::Lease> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.allocate_once(req) {
                Err(s) if tries < ALLOCATE_TRIES && connection_lost(&s) => {
                    tracing::warn!(error = %s.message(), tries, "the lease request was cut off; asking again");
                    std::thread::sleep(ALLOCATE_BACKOFF * tries);
                }
                done => return done.map_err(|s| pool_error(&s, &self.trust)),
            }
        }
    }

    fn allocate_once(&mut self, req: &PoolRequest) -> Result<pb::Lease, tonic::Status> {
        let message = pb::AllocateRequest {
            tenant: req.tenant.clone(),
            memory_bytes: req.memory,
            compute_percent: req.compute_percent,
            profile: req.profile.clone().unwrap_or_default(),
            wait_timeout_ms: req.wait.as_millis().min(u128::from(u32::MAX)) as u32,
            class: if req.shared { pb::LeaseClass::Shared } else { pb::LeaseClass::Exclusive }.into(),
        };
        let r = self.request(message, req.wait);
        let mut client = self.client.clone();
        self.rt.block_on(client.allocate(r)).map(tonic::Response::into_inner)
    }

    fn renew(&mut self, lease: &pb::Lease) -> Result<pb::Lease, tonic::Status> {
        let r = self.request(pb::RenewRequest { lease_id: lease.lease_id, token: lease.token.clone() }, Duration::ZERO);
        let mut client = self.client.clone();
        self.rt.block_on(client.renew(r)).map(tonic::Response::into_inner)
    }

    fn release(&mut self, lease: &pb::Lease) -> Result<(), tonic::Status> {
        let mut r =
            self.request(pb::ReleaseRequest { lease_id: lease.lease_id, token: lease.token.clone() }, Duration::ZERO);
        // Often called at exit: do not hold the process long.
        r.set_timeout(self.timeout.min(RELEASE_TIMEOUT));
        let mut client = self.client.clone();
        self.rt.block_on(client.release(r)).map(drop)
    }
}

impl PoolRequest {
    /// The request the `GPUPOOL_*` variables describe, read through
    /// `lookup`: `GPUPOOL_BALANCER` (required, a URL), `GPUPOOL_TENANT`
    /// (optional: unset, the balancer takes the tenant from the credential
    /// in `GPUPOOL_BALANCER_SECRET`),
    /// `GPUPOOL_MEMORY_MIB`, `GPUPOOL_COMPUTE_PERCENT`, `GPUPOOL_PROFILE`,
    /// `GPUPOOL_LEASE_CLASS` (`exclusive`, the default, or `shared`),
    /// `GPUPOOL_WAIT_MS`, `GPUPOOL_BALANCER_SECRET` or
    /// `GPUPOOL_BALANCER_SECRET_FILE` (the tenant's credential), and how the balancer is
    /// verified: `GPUPOOL_BALANCER_CERT_SHA256` (a pin) or
    /// `GPUPOOL_BALANCER_CA_FILE` or `GPUPOOL_BALANCER_CA_PEM` (the bundle
    /// itself, for a Lambda environment; with `GPUPOOL_BALANCER_SERVER_NAME`), or
    /// `GPUPOOL_BALANCER_INSECURE=1` for plaintext. The drop-in libcuda
    /// and the Lambda extension both read it this way. Every problem is
    /// reported at once.
    pub fn from_lookup(lookup: &impl Fn(&str) -> Option<String>) -> std::result::Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let mut number = |name: &str, default: u64| match lookup(name).map(|v| v.trim().parse::<u64>()) {
            None => default,
            Some(Ok(v)) => v,
            Some(Err(_)) => {
                problems.push(format!("{name} must be a whole number"));
                default
            }
        };
        let memory_mib = number("GPUPOOL_MEMORY_MIB", 0);
        let compute = number("GPUPOOL_COMPUTE_PERCENT", 0);
        let wait_ms = number("GPUPOOL_WAIT_MS", 10_000);
        if compute > 100 {
            problems.push("GPUPOOL_COMPUTE_PERCENT must be at most 100".into());
        }
        let balancer = lookup("GPUPOOL_BALANCER").unwrap_or_default();
        if balancer.is_empty() {
            problems.push("GPUPOOL_BALANCER is not set (the balancer's URL, e.g. https://10.0.0.5:50051)".into());
        } else if !balancer.starts_with("http://") && !balancer.starts_with("https://") {
            problems.push(format!("GPUPOOL_BALANCER={balancer} must be a URL (https://host:port)"));
        }
        let shared = match lookup("GPUPOOL_LEASE_CLASS").as_deref().map(str::trim) {
            None | Some("" | "exclusive") => false,
            Some("shared") => true,
            Some(other) => {
                problems.push(format!("GPUPOOL_LEASE_CLASS={other} must be exclusive or shared"));
                false
            }
        };
        let insecure = match lookup("GPUPOOL_BALANCER_INSECURE").as_deref().map(str::trim) {
            None | Some("" | "0" | "false") => false,
            Some("1" | "true") => true,
            Some(_) => {
                problems.push("GPUPOOL_BALANCER_INSECURE must be 1 or 0".into());
                false
            }
        };
        let ca_pem = match (lookup("GPUPOOL_BALANCER_CA_PEM"), lookup("GPUPOOL_BALANCER_CA_FILE")) {
            (Some(pem), None) => Some(pem.into_bytes()),
            (None, Some(path)) => gpupool_proto::grpc_tls::read_bounded(std::path::Path::new(&path))
                .map_err(|e| problems.push(format!("GPUPOOL_BALANCER_CA_FILE: {e}")))
                .ok(),
            (Some(_), Some(_)) => {
                problems.push("set GPUPOOL_BALANCER_CA_PEM or GPUPOOL_BALANCER_CA_FILE, not both".into());
                None
            }
            (None, None) => None,
        };
        let trust = BalancerTrust::from_settings(
            lookup("GPUPOOL_BALANCER_CERT_SHA256").as_deref(),
            ca_pem,
            lookup("GPUPOOL_BALANCER_SERVER_NAME").as_deref(),
            insecure,
        )
        .unwrap_or_else(|e| {
            problems.push(format!(
                "{e} (GPUPOOL_BALANCER_CERT_SHA256, GPUPOOL_BALANCER_CA_FILE, GPUPOOL_BALANCER_CA_PEM or \
                 GPUPOOL_BALANCER_INSECURE=1)"
            ));
            BalancerTrust::Insecure
        });
        if !balancer.is_empty()
            && let Err(e) = gpupool_proto::grpc_tls::endpoint(&balancer, &trust, None)
            && problems.is_empty()
        {
            problems.push(format!("GPUPOOL_BALANCER: {e}"));
        }
        // Unset, the tenant is the credential's: nothing to keep in step.
        let mut request = Self::new(balancer, trust, lookup("GPUPOOL_TENANT").unwrap_or_default());
        request.memory = memory_mib << 20;
        request.compute_percent = compute.min(100) as u32;
        request.profile = lookup("GPUPOOL_PROFILE");
        request.shared = shared;
        request.wait = Duration::from_millis(wait_ms);
        request.secret = match (lookup("GPUPOOL_BALANCER_SECRET"), lookup("GPUPOOL_BALANCER_SECRET_FILE")) {
            (Some(secret), None) => Some(secret),
            // A file keeps the credential out of the process environment
            // (which other tools list and log).
            (None, Some(path)) => gpupool_proto::grpc_tls::read_bounded(std::path::Path::new(&path))
                .map_err(|e| problems.push(format!("GPUPOOL_BALANCER_SECRET_FILE: {e}")))
                .ok()
                .and_then(|bytes| {
                    String::from_utf8(bytes)
                        .map_err(|_| problems.push("GPUPOOL_BALANCER_SECRET_FILE does not hold text".into()))
                        .ok()
                }),
            (Some(_), Some(_)) => {
                problems.push("set GPUPOOL_BALANCER_SECRET or GPUPOOL_BALANCER_SECRET_FILE, not both".into());
                None
            }
            (None, None) => None,
        }
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
        if problems.is_empty() { Ok(request) } else { Err(problems) }
    }
}

/// A lease held, renewed in the background, released on drop (or by
/// [`LeasedGpu::release`]).
#[derive(Debug)]
pub struct LeasedGpu {
    lease: Arc<Mutex<pb::Lease>>,
    /// Dropping the sender tells the renewer to release the lease and end.
    stop: Mutex<Option<mpsc::Sender<()>>>,
    renewer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set by the renewer when the balancer no longer knows the lease.
    gone: Arc<std::sync::atomic::AtomicBool>,
}

impl LeasedGpu {
    /// Asks the balancer for a virtual GPU and starts renewing it.
    pub fn allocate(req: &PoolRequest) -> Result<Self> {
        let mut control = Control::connect(req)?;
        let lease = control.allocate(req)?;
        tracing::info!(lease = lease.lease_id, server = %lease.address, instance = %lease.instance_uuid, "leased a virtual GPU");
        let lease = Arc::new(Mutex::new(lease));
        let (stop, stopped) = mpsc::channel();
        let (shared, gone) = (lease.clone(), Arc::new(std::sync::atomic::AtomicBool::new(false)));
        let flag = gone.clone();
        let renewer = std::thread::Builder::new()
            .name("gpupool-lease".into())
            .spawn(move || renew_until_stopped(control, shared, stopped, &flag))
            .map_err(|e| ClientError::Connect(format!("cannot start the lease renewer: {e}")))?;
        Ok(Self { lease, stop: Mutex::new(Some(stop)), renewer: Mutex::new(Some(renewer)), gone })
    }

    /// The lease as last renewed.
    pub fn lease(&self) -> pb::Lease {
        self.lease.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A session configuration for the leased server: `template` with the
    /// lease's address, certificate pin and token.
    pub fn client_config(&self, template: &ClientConfig) -> Result<ClientConfig> {
        crate::LeaseHandoff::from(&self.lease()).client_config(template)
    }

    /// The lease as the renewer keeps it (a resumed session presents its
    /// newest token).
    pub fn lease_cell(&self) -> Arc<Mutex<pb::Lease>> {
        self.lease.clone()
    }

    /// Whether the balancer no longer knows the lease (it expired, e.g.
    /// while the process was frozen, or was ended): its GPU is gone and a
    /// new lease is needed.
    pub fn is_gone(&self) -> bool {
        self.gone.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl LeasedGpu {
    /// Stops renewing and releases the lease now (once; later calls do
    /// nothing). A process that never drops its session (the drop-in
    /// libcuda) calls this at exit, so its GPU returns to the pool at once
    /// rather than when the lease expires.
    pub fn release(&self) {
        // The renewer releases the lease on its way out.
        drop(self.stop.lock().unwrap_or_else(|e| e.into_inner()).take());
        let renewer = self.renewer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = renewer {
            let _ = t.join();
        }
    }
}

impl Drop for LeasedGpu {
    fn drop(&mut self) {
        self.release();
    }
}

fn renew_until_stopped(
    mut control: Control,
    lease: Arc<Mutex<pb::Lease>>,
    stopped: mpsc::Receiver<()>,
    gone: &std::sync::atomic::AtomicBool,
) {
    let current = || lease.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut failures = 0u32;
    loop {
        let held = current();
        let every = Duration::from_millis(u64::from(held.renew_interval_ms.max(100)));
        let wait = if failures == 0 { every } else { (every / 4).max(Duration::from_millis(50)) };
        match stopped.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Dropped (or told to stop): release and end.
            _ => {
                if let Err(e) = control.release(&held) {
                    tracing::debug!(lease = held.lease_id, error = %e.message(), "releasing the lease failed");
                }
                return;
            }
        }
        match control.renew(&held) {
            Ok(renewed) => {
                failures = 0;
                *lease.lock().unwrap_or_else(|e| e.into_inner()) = renewed;
            }
            Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition) => {
                tracing::warn!(lease = held.lease_id, error = %s.message(), "the lease is gone; the session will end");
                gone.store(true, std::sync::atomic::Ordering::Relaxed);
                // Nothing left to renew or release; wait to be dropped.
                let _ = stopped.recv();
                return;
            }
            Err(s) => {
                failures += 1;
                tracing::warn!(lease = held.lease_id, error = %s.message(), failures, "renewing the lease failed; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_lost_with_their_connection_are_sent_again() {
        let status = |code, m: &str| tonic::Status::new(code, m);
        for lost in [
            status(tonic::Code::Unavailable, "tcp connect error: Connection refused"),
            status(tonic::Code::Unknown, "transport error"),
            status(tonic::Code::Unknown, "peer closed connection without sending TLS close_notify"),
            status(tonic::Code::Unknown, "h2 protocol error: stream error received"),
        ] {
            assert!(connection_lost(&lost), "{lost:?}");
        }
        for answered in [
            status(tonic::Code::ResourceExhausted, "no instance has room"),
            status(tonic::Code::PermissionDenied, "unknown tenant"),
            status(tonic::Code::DeadlineExceeded, "waited 30 s"),
            status(tonic::Code::InvalidArgument, "memory_bytes is 0"),
            status(tonic::Code::Unknown, "the balancer failed"),
        ] {
            assert!(!connection_lost(&answered), "{answered:?}");
        }
    }
}
