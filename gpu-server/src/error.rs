use gpupool_proto::cuda::{self, CuResult};

/// A failed call: a `CUresult` and what went wrong. This is what travels back
/// to the client, so the code is kept exactly as the driver gave it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} ({code}): {message}", cuda::name(*code))]
pub struct CallError {
    /// The raw `CUresult`.
    pub code: CuResult,
    /// Human-readable detail.
    pub message: String,
}

impl CallError {
    pub fn new(code: CuResult, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
    pub fn invalid_value(message: impl Into<String>) -> Self {
        Self::new(cuda::INVALID_VALUE, message)
    }
    pub fn invalid_handle(message: impl Into<String>) -> Self {
        Self::new(cuda::INVALID_HANDLE, message)
    }
    pub fn out_of_memory(message: impl Into<String>) -> Self {
        Self::new(cuda::OUT_OF_MEMORY, message)
    }
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(cuda::NOT_SUPPORTED, message)
    }

    /// Whether `code` means the context is lost
    /// ([`gpupool_proto::cuda::ends_context`]). Used to end a shared
    /// worker's session group (`docs/sharing.md`).
    pub fn ends_context(code: CuResult) -> bool {
        gpupool_proto::cuda::ends_context(code)
    }
}

/// Errors that stop a server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The TLS certificate or key could not be loaded or generated.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// A certificate, key or CA file of the balancer link is unusable.
    #[error("TLS setup failed: {0}")]
    Certificate(#[from] gpupool_proto::tls::TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    /// The device could not be opened.
    #[error("device unavailable: {0}")]
    Device(CallError),
    /// A session worker process failed to start or to take a session.
    #[error("session worker: {0}")]
    Worker(String),
    /// The host's staging ledger (its shared page) cannot be made or
    /// opened (`staging::host`).
    #[error("host staging ledger: {0}")]
    Staging(String),
    /// A session could not be moved to another server; it keeps running
    /// here (`docs/migration.md`).
    #[error("migration of session {session} failed: {reason}")]
    Migration { session: u64, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_and_mps_termination_errors_end_the_context() {
        for code in [cuda::ILLEGAL_ADDRESS, 710, 714, 719, 810] {
            assert!(CallError::ends_context(code), "{code}");
        }
        for code in [cuda::SUCCESS, cuda::INVALID_VALUE, cuda::OUT_OF_MEMORY, cuda::LAUNCH_OUT_OF_RESOURCES, 720, 999] {
            assert!(!CallError::ends_context(code), "{code}");
        }
    }
}
