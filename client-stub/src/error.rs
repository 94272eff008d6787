use gpupool_proto::cuda::{self, CuResult};

/// Errors of the client core. Every variant maps to one `CUresult`
/// ([`ClientError::code`]), which is what the C ABI returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// A call failed on the server (or a queued call failed earlier and its
    /// error was latched); the code is the server driver's own.
    #[error("{} ({code}): {message}", cuda::name(*code))]
    Cuda { code: CuResult, message: String },
    /// The server refused the session (close code and reason).
    #[error("server refused the session (code {code:#x}): {reason}")]
    Refused { code: u32, reason: String },
    /// The server could not be reached.
    #[error("cannot connect to the GPU server: {0}")]
    Connect(String),
    /// The connection was lost; the session's device state is gone.
    #[error("connection to the GPU server lost: {0}")]
    ConnectionLost(String),
    /// No reply within the configured time.
    #[error("no reply from the GPU server within {0:?}")]
    Timeout(std::time::Duration),
    /// The server sent something that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A bad argument, caught before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidValue(String),
    /// The virtual GPU's memory quota or address range is exhausted.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// A handle that this session does not hold.
    #[error("invalid handle: {0}")]
    InvalidHandle(String),
    /// Invalid client configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The balancer gave no virtual GPU (the gRPC status and its message).
    #[error("the balancer refused: {code}: {message}")]
    Pool { code: String, message: String },
}

impl ClientError {
    /// The `CUresult` an application sees for this error.
    pub fn code(&self) -> CuResult {
        match self {
            Self::Cuda { code, .. } => *code,
            Self::Refused { .. } | Self::Connect(_) | Self::Config(_) | Self::Pool { .. } => cuda::NO_DEVICE,
            Self::ConnectionLost(_) | Self::Timeout(_) | Self::Protocol(_) => cuda::DEVICE_UNAVAILABLE,
            Self::InvalidValue(_) => cuda::INVALID_VALUE,
            Self::OutOfMemory(_) => cuda::OUT_OF_MEMORY,
            Self::InvalidHandle(_) => cuda::INVALID_HANDLE,
        }
    }

    /// `true` when the session is unusable and a new one is needed.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::Refused { .. } | Self::ConnectionLost(_) | Self::Protocol(_) | Self::Timeout(_))
    }
}

/// Result of client calls.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
