//! gpupool's shared-memory transport, for clients on the GPU server's own
//! host (docs/transport.md, "Shared memory").
//!
//! A session still opens on QUIC, the control transport. Its `Welcome`
//! offers a unix socket path and a per-session secret; a client that can
//! connect to that socket and pass it a sealed memfd ([`region::Region`])
//! with the secret ([`wire::Attach`]) is on the server's host, and the
//! process serving the session (a worker process under process isolation)
//! maps the region. Bulk copies then go through the region: the client
//! writes a chunk into a slot ([`wire::SlotRing`]) and sends a 64-byte
//! [`wire::Request`]; the server checks it against the mapping and its
//! sequence, copies the bytes, and answers with a [`wire::Reply`]. The
//! socket is both the descriptor channel and the wake-up.
//!
//! The session's commands may follow: a second memfd attached the same way
//! ([`wire::Op::Commands`]) holds a [`ring::Ring`], two byte pipes of
//! frames (batches to the server, replies to the client) with a bounded
//! spin and a futex as the wake-up.
//!
//! Linux only (memfd, seals, `SCM_RIGHTS`).

#![deny(unsafe_code)]

pub mod channel;
pub mod region;
pub mod ring;
pub mod wire;

/// What can go wrong on a shared-memory attachment.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The socket failed or ended.
    #[error("shared-memory socket: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol (a bad message, a range outside the
    /// region, a sequence out of order).
    #[error("shared-memory protocol: {0}")]
    Protocol(String),
    /// The region cannot be made, checked or mapped.
    #[error("shared-memory region: {0}")]
    Region(String),
    /// A region cannot be mapped at the address asked for: something is
    /// mapped there already.
    #[error("shared-memory region address in use: {0}")]
    AddressInUse(String),
}
