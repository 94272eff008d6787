//! Leases that no longer stand (issue 20, finding 9): a released or expired
//! lease's token stays validly signed until its expiry, and by then its
//! instance may be another tenant's. Before it admits a session of a lease,
//! the server asks the balancer (`CheckLease`), and it remembers the leases
//! the balancer said had ended (answers and heartbeat replies), so that
//! those stay refused while the balancer cannot be reached.
//!
//! An unreachable balancer, or one still taking leases back after a restart,
//! does not block admission: the token's signature, server and instance were
//! checked already, and the next heartbeat ends the session of a lease that
//! turns out to be gone. Availability is kept; the window is the balancer's
//! outage, not every lease's remaining lifetime.

use crate::config::BalancerLink;
use gpupool_proto::balancer as pb;
use gpupool_proto::balancer::balancer_client::BalancerClient;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Longest wait for the balancer's answer before admitting anyway.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an ended lease is remembered (longer than any lease lives
/// without renewal).
const REMEMBER: Duration = Duration::from_secs(3600);
/// Most ended leases remembered; the oldest go first.
const MAX_REMEMBERED: usize = 65_536;

/// Asks the balancer whether leases stand; remembers those that ended.
#[derive(Debug)]
pub(crate) struct LeaseCheck {
    link: BalancerLink,
    client: tokio::sync::OnceCell<Option<BalancerClient<Channel>>>,
    ended: Mutex<HashMap<u64, Instant>>,
}

impl LeaseCheck {
    pub(crate) fn new(link: BalancerLink) -> Self {
        Self { link, client: tokio::sync::OnceCell::new(), ended: Mutex::new(HashMap::new()) }
    }

    fn ended(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers leases that ended (the balancer said so).
    pub(crate) fn note_ended(&self, ids: impl IntoIterator<Item = u64>) {
        let now = Instant::now();
        let mut ended = self.ended();
        for id in ids {
            ended.insert(id, now);
        }
        if ended.len() > MAX_REMEMBERED {
            ended.retain(|_, at| now.duration_since(*at) < REMEMBER);
            while ended.len() > MAX_REMEMBERED {
                let Some((&oldest, _)) = ended.iter().min_by_key(|(_, at)| **at) else { break };
                ended.remove(&oldest);
            }
        }
    }

    fn known_ended(&self, lease_id: u64) -> bool {
        self.ended().get(&lease_id).is_some_and(|at| at.elapsed() < REMEMBER)
    }

    /// `Err` with the reason when the lease no longer stands.
    pub(crate) async fn admit(&self, lease_id: u64) -> Result<(), String> {
        if self.known_ended(lease_id) {
            return Err(format!("lease {lease_id:#x} has ended"));
        }
        let client = self
            .client
            .get_or_init(|| async {
                match self.link.endpoint() {
                    Ok(endpoint) => Some(BalancerClient::new(endpoint.connect_timeout(CHECK_TIMEOUT).connect_lazy())),
                    Err(e) => {
                        tracing::warn!(url = %self.link.url, error = %e, "cannot reach the balancer as configured; leases are not checked");
                        None
                    }
                }
            })
            .await;
        let Some(mut client) = client.clone() else { return Ok(()) };
        let mut req = tonic::Request::new(pb::CheckLeaseRequest { server_id: self.link.server_id.clone(), lease_id });
        req.set_timeout(CHECK_TIMEOUT);
        if let Ok(v) = format!("Bearer {}", self.link.secret).parse() {
            req.metadata_mut().insert("authorization", v);
        }
        match tokio::time::timeout(CHECK_TIMEOUT, client.check_lease(req)).await {
            Ok(Ok(reply)) if reply.get_ref().state() == pb::LeaseState::Ended => {
                self.note_ended([lease_id]);
                Err(format!("lease {lease_id:#x} has ended at the balancer"))
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => {
                tracing::warn!(lease = lease_id, error = %gpupool_proto::grpc_tls::describe(&status), "cannot check the lease with the balancer; admitting on its signature");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(
                    lease = lease_id,
                    "the balancer did not answer the lease check in time; admitting on its signature"
                );
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> LeaseCheck {
        LeaseCheck::new(BalancerLink {
            url: "http://127.0.0.1:9".into(),
            trust: gpupool_proto::grpc_tls::BalancerTrust::Insecure,
            client_identity: None,
            server_id: "s".into(),
            advertise: String::new(),
            secret: "x".into(),
            lease_key: String::new(),
        })
    }

    #[tokio::test]
    async fn remembered_ends_refuse_and_an_unreachable_balancer_admits() {
        let c = check();
        c.note_ended([7]);
        assert!(c.admit(7).await.unwrap_err().contains("ended"));
        // Nothing listens on port 9: admitted on the token's own checks.
        assert_eq!(c.admit(8).await, Ok(()));
    }

    #[test]
    fn the_memory_is_bounded() {
        let c = check();
        c.note_ended(0..(MAX_REMEMBERED as u64 + 10));
        assert!(c.ended().len() <= MAX_REMEMBERED);
    }
}
