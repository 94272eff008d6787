//! Sessions kept for a client that lost its connection: the registry a
//! reattaching `Hello` is checked against, and each session's slot in it.
//! What is sent again once the client is back is decided by
//! [`gpupool_proto::replay::ReplayLog`], shared with the client.

use super::transport::Attachment;
use super::transport::quic::Quic;
use crate::auth::{Grant, constant_time_eq};
use gpupool_proto::v1;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// Sessions a client may reattach to, by session id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<u64, Resumable>>,
}

/// A live session a client may reattach to after losing its connection.
#[derive(Debug)]
struct Resumable {
    secret: String,
    lease_id: Option<u64>,
    subject: String,
    /// To the session's task; dropping it ends a session waiting for a resume.
    requests: mpsc::Sender<ResumeRequest>,
}

/// A client's reattachment, handed to the session's task. Reattachments
/// arrive on QUIC, the control transport.
#[derive(Debug)]
pub(crate) struct ResumeRequest {
    pub(crate) attachment: Attachment<Quic>,
    /// The last reply the client received.
    pub(crate) acked_seq: u64,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Resumable>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets the sessions of `lease_id` (the lease ended): a session
    /// waiting for its client then ends.
    pub(crate) fn forget_lease(&self, lease_id: u64) {
        self.lock().retain(|_, r| r.lease_id != Some(lease_id));
    }

    /// Hands a `Hello` with a `Resume` over to the session's task when the
    /// session is kept here for this client; else says why not.
    pub(crate) fn hand_over(
        &self,
        grant: &Grant,
        resume: &v1::Resume,
        attachment: Attachment<Quic>,
    ) -> Result<(), String> {
        let lease_id = grant.lease.as_ref().map(|l| l.lease_id);
        let requests = self.lock().get(&resume.session_id).and_then(|r| {
            let own = constant_time_eq(r.secret.as_bytes(), resume.secret.as_bytes())
                && r.lease_id == lease_id
                && (lease_id.is_some() || r.subject == grant.subject)
                && grant.session_id.is_none_or(|id| id == resume.session_id);
            own.then(|| r.requests.clone())
        });
        let Some(requests) = requests else {
            return Err(format!(
                "session {} is not kept here (its grace period passed, its lease ended, or it is not this client's)",
                resume.session_id
            ));
        };
        let request = ResumeRequest { attachment, acked_seq: resume.acked_seq };
        requests.try_send(request).map_err(|_| "the session is being resumed by another connection".to_string())
    }
}

/// Registers session `id` as resumable (when resumption is on) and
/// unregisters it on drop.
#[derive(Debug)]
pub(crate) struct ResumeSlot<'a> {
    registry: &'a Registry,
    grace: Duration,
    id: u64,
    secret: String,
    requests: Option<mpsc::Receiver<ResumeRequest>>,
}

impl<'a> ResumeSlot<'a> {
    /// A slot for session `id`, kept `grace` after a loss (zero: not kept).
    pub(crate) fn register(registry: &'a Registry, grace: Duration, id: u64, grant: &Grant) -> Self {
        if grace.is_zero() {
            return Self { registry, grace, id, secret: String::new(), requests: None };
        }
        let secret = grant.resume_secret.clone().unwrap_or_else(|| hex::encode(rand::random::<[u8; 32]>()));
        let (tx, rx) = mpsc::channel(1);
        let entry = Resumable {
            secret: secret.clone(),
            lease_id: grant.lease.as_ref().map(|l| l.lease_id),
            subject: grant.subject.clone(),
            requests: tx,
        };
        registry.lock().insert(id, entry);
        Self { registry, grace, id, secret, requests: Some(rx) }
    }

    /// The secret a client presents to reattach (empty: not resumable).
    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    /// Whether the session is kept after a loss.
    pub(crate) fn resumable(&self) -> bool {
        self.requests.is_some()
    }

    /// The next reattachment, whenever it comes (never when the session is
    /// not resumable): a client may reattach while its old connection still
    /// looks open here (after a failed migration, its worker ended the
    /// session's connection and kept the session).
    pub(crate) async fn next(&mut self) -> Option<ResumeRequest> {
        match self.requests.as_mut() {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }

    /// Waits up to the grace period for the client to reattach.
    pub(crate) async fn wait(&mut self) -> Option<ResumeRequest> {
        let grace = self.grace;
        let rx = self.requests.as_mut()?;
        tracing::info!(grace_ms = grace.as_millis() as u64, "connection lost; keeping the session for its client");
        match tokio::time::timeout(grace, rx.recv()).await {
            Ok(Some(r)) => Some(r),
            Ok(None) => {
                tracing::info!("the session's lease ended while it waited for its client");
                None
            }
            Err(_) => {
                tracing::info!("the client did not come back within the grace period");
                None
            }
        }
    }
}

impl Drop for ResumeSlot<'_> {
    fn drop(&mut self) {
        if self.requests.is_some() {
            self.registry.lock().remove(&self.id);
        }
    }
}
