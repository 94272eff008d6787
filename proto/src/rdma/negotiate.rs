//! Whether a session moves to RDMA: decided by the server in the QUIC
//! handshake, from the client's `Hello.rdma`, its own device and the lease.
//! QUIC stays the control connection whatever the answer, and carries the
//! session whenever the answer is no.

use super::CORE_VERSION;
use crate::v1;

/// Longest device name accepted in an offer.
pub const MAX_DEVICE_NAME: usize = 64;
/// Shortest and longest secret accepted in an acceptance.
pub const MIN_SECRET: usize = 16;
pub const MAX_SECRET: usize = 64;

/// A client's checked offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub device: String,
    pub core_version: u32,
}

impl TryFrom<&v1::RdmaOffer> for Offer {
    type Error = NegotiationError;
    fn try_from(wire: &v1::RdmaOffer) -> Result<Offer, NegotiationError> {
        if wire.device.is_empty() || wire.device.len() > MAX_DEVICE_NAME {
            return Err(NegotiationError::BadOffer(format!("device name of {} bytes", wire.device.len())));
        }
        Ok(Offer { device: wire.device.clone(), core_version: wire.core_version })
    }
}

/// A server's checked acceptance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    pub port: u16,
    pub core_version: u32,
    pub secret: Vec<u8>,
}

impl From<&Accept> for v1::RdmaAccept {
    fn from(a: &Accept) -> v1::RdmaAccept {
        v1::RdmaAccept { port: u32::from(a.port), core_version: a.core_version, secret: a.secret.clone().into() }
    }
}

/// An offer or an acceptance that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// The client's offer is out of bounds.
    #[error("bad RDMA offer: {0}")]
    BadOffer(String),
    /// The server's acceptance is out of bounds.
    #[error("bad RDMA acceptance: {0}")]
    BadAccept(String),
    /// The server accepted an offer the client did not make.
    #[error("RDMA accepted without an offer")]
    Unasked,
}

/// What the server has to offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRdma {
    /// Its RDMA device, when `ibv_get_device_list` found one and it listens.
    pub device: Option<String>,
    /// Its rdma_cm listener's port.
    pub port: u16,
    /// Whether the operator turned RDMA on.
    pub enabled: bool,
}

/// Why a session stays on QUIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The client offered nothing (no device, or an old client).
    NotOffered,
    /// The client's offer did not parse.
    BadOffer,
    /// The server's operator left RDMA off.
    Disabled,
    /// The server has no RDMA device.
    NoServerDevice,
    /// The lease does not allow RDMA.
    LeaseForbids,
    /// The two ends speak different RDMA core versions.
    VersionMismatch,
}

/// The server's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Accept: put this in `Welcome.rdma`.
    Rdma(Accept),
    /// Stay on QUIC, and why (for the logs and metrics).
    Quic(Fallback),
}

/// Decides for one session. `secret` binds the RDMA connection to it.
pub fn decide(offer: Option<&v1::RdmaOffer>, server: &ServerRdma, lease_allows: bool, secret: Vec<u8>) -> Decision {
    let Some(offer) = offer else { return Decision::Quic(Fallback::NotOffered) };
    let Ok(offer) = Offer::try_from(offer) else { return Decision::Quic(Fallback::BadOffer) };
    if !server.enabled {
        return Decision::Quic(Fallback::Disabled);
    }
    if server.device.is_none() {
        return Decision::Quic(Fallback::NoServerDevice);
    }
    if !lease_allows {
        return Decision::Quic(Fallback::LeaseForbids);
    }
    if offer.core_version != CORE_VERSION {
        return Decision::Quic(Fallback::VersionMismatch);
    }
    Decision::Rdma(Accept { port: server.port, core_version: CORE_VERSION, secret })
}

/// The client's reading of `Welcome.rdma`: `Ok(Some)` to connect over RDMA,
/// `Ok(None)` to stay on QUIC, an error for an answer that does not parse
/// (the session then stays on QUIC too, and says why).
pub fn accepted(offered: bool, welcome: Option<&v1::RdmaAccept>) -> Result<Option<Accept>, NegotiationError> {
    let Some(wire) = welcome else { return Ok(None) };
    if !offered {
        return Err(NegotiationError::Unasked);
    }
    let port = u16::try_from(wire.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| NegotiationError::BadAccept(format!("port {}", wire.port)))?;
    if wire.core_version != CORE_VERSION {
        return Err(NegotiationError::BadAccept(format!("core version {}", wire.core_version)));
    }
    if !(MIN_SECRET..=MAX_SECRET).contains(&wire.secret.len()) {
        return Err(NegotiationError::BadAccept(format!("secret of {} bytes", wire.secret.len())));
    }
    Ok(Some(Accept { port, core_version: wire.core_version, secret: wire.secret.to_vec() }))
}

/// The offer a client with device `device` makes.
pub fn offer(device: &str) -> v1::RdmaOffer {
    v1::RdmaOffer { device: device.chars().take(MAX_DEVICE_NAME).collect(), core_version: CORE_VERSION }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerRdma {
        ServerRdma { device: Some("mlx5_0".into()), port: 4791, enabled: true }
    }

    fn secret() -> Vec<u8> {
        vec![7; 32]
    }

    #[test]
    fn both_devices_and_the_lease_give_rdma_and_the_client_reads_it_back() {
        let offer = offer("mlx5_1");
        let Decision::Rdma(accept) = decide(Some(&offer), &server(), true, secret()) else {
            panic!("expected RDMA");
        };
        assert_eq!(accept.port, 4791);
        let wire = v1::RdmaAccept::from(&accept);
        assert_eq!(accepted(true, Some(&wire)), Ok(Some(accept)));
    }

    #[test]
    fn every_missing_condition_falls_back_to_quic_with_its_reason() {
        let good = offer("mlx5_1");
        assert_eq!(decide(None, &server(), true, secret()), Decision::Quic(Fallback::NotOffered));
        let nameless = v1::RdmaOffer { device: String::new(), core_version: CORE_VERSION };
        assert_eq!(decide(Some(&nameless), &server(), true, secret()), Decision::Quic(Fallback::BadOffer));
        let long = v1::RdmaOffer { device: "x".repeat(MAX_DEVICE_NAME + 1), core_version: CORE_VERSION };
        assert_eq!(decide(Some(&long), &server(), true, secret()), Decision::Quic(Fallback::BadOffer));
        let off = ServerRdma { enabled: false, ..server() };
        assert_eq!(decide(Some(&good), &off, true, secret()), Decision::Quic(Fallback::Disabled));
        let deviceless = ServerRdma { device: None, ..server() };
        assert_eq!(decide(Some(&good), &deviceless, true, secret()), Decision::Quic(Fallback::NoServerDevice));
        assert_eq!(decide(Some(&good), &server(), false, secret()), Decision::Quic(Fallback::LeaseForbids));
        let other = v1::RdmaOffer { core_version: CORE_VERSION + 1, ..good };
        assert_eq!(decide(Some(&other), &server(), true, secret()), Decision::Quic(Fallback::VersionMismatch));
    }

    #[test]
    fn the_client_stays_on_quic_without_an_acceptance_and_refuses_bad_ones() {
        assert_eq!(accepted(true, None), Ok(None));
        let good = v1::RdmaAccept { port: 4791, core_version: CORE_VERSION, secret: secret().into() };
        assert_eq!(accepted(false, Some(&good)), Err(NegotiationError::Unasked));
        for bad in [
            v1::RdmaAccept { port: 0, ..good.clone() },
            v1::RdmaAccept { port: 70_000, ..good.clone() },
            v1::RdmaAccept { core_version: 9, ..good.clone() },
            v1::RdmaAccept { secret: vec![1; MIN_SECRET - 1].into(), ..good.clone() },
            v1::RdmaAccept { secret: vec![1; MAX_SECRET + 1].into(), ..good.clone() },
        ] {
            assert!(matches!(accepted(true, Some(&bad)), Err(NegotiationError::BadAccept(_))), "{bad:?}");
        }
    }

    #[test]
    fn offers_survive_the_wire_and_long_names_are_cut() {
        use prost::Message;
        let hello = v1::Hello { rdma: Some(offer(&"d".repeat(100))), ..Default::default() };
        let back = v1::Hello::decode(hello.encode_to_vec().as_slice()).unwrap();
        let parsed = Offer::try_from(back.rdma.as_ref().unwrap()).unwrap();
        assert_eq!(parsed.device.len(), MAX_DEVICE_NAME);
        assert_eq!(parsed.core_version, CORE_VERSION);
    }
}
