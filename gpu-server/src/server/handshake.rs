//! A new connection: the `Hello`, its checks (protocol version, token,
//! session limit), then the session it opens or reattaches to, run here or
//! handed to a worker process. Refusals are counted and logged at a bounded
//! rate.

use super::local::{Start, run_session};
use super::metrics::{SessionLabels, add};
use super::state::{AnyDevice, LeasedSession, Mode, Shared};
use super::supervised::run_in_worker;
use super::transport::quic::{self, Quic};
use super::transport::rdma::{self, Rdma};
use super::transport::shm_commands;
use super::transport::{Attachment, Link};
use crate::auth::Grant;
use gpupool_proto::rdma::negotiate::{Decision, Fallback};
use gpupool_proto::{PROTOCOL_VERSION, close_code, frame, v1};
use prost::Message;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::task::JoinSet;
use tracing::Instrument;

/// Largest `Hello` accepted.
const MAX_HELLO_BYTES: usize = 64 << 10;

/// Longest text from a peer (a client's build string) that goes into a log
/// line or a close reason.
const MAX_PEER_TEXT: usize = 128;

/// `text` from a peer as it may be logged: at most [`MAX_PEER_TEXT`]
/// characters, control characters escaped, the cut marked.
pub(crate) fn peer_text(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_PEER_TEXT).flat_map(char::escape_default).collect();
    if text.chars().nth(MAX_PEER_TEXT).is_some() {
        out.push_str(&format!("… ({} bytes)", text.len()));
    }
    out
}

/// Refusals logged per second at most; the rest are counted (in the
/// metrics, and in the next line logged), so that unauthenticated
/// connections cannot flood the log (issue 20, finding 6).
const REFUSALS_LOGGED_PER_SECOND: u64 = 10;

/// Whether this refusal is logged, and how many were not since the last
/// one that was.
fn refusal_log_slot() -> Option<u64> {
    static WINDOW: std::sync::Mutex<(u64, u64, u64)> = std::sync::Mutex::new((0, 0, 0));
    let second = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut w = WINDOW.lock().unwrap_or_else(|e| e.into_inner());
    let (start, logged, suppressed) = &mut *w;
    if *start != second {
        (*start, *logged) = (second, 0);
    }
    if *logged < REFUSALS_LOGGED_PER_SECOND {
        *logged += 1;
        Some(std::mem::take(suppressed))
    } else {
        *suppressed += 1;
        None
    }
}

fn refuse(shared: &Shared, conn: &quinn::Connection, code: u32, reason: &str) {
    add(&shared.metrics.sessions_refused, 1);
    if let Some(suppressed) = refusal_log_slot() {
        tracing::info!(remote = %conn.remote_address(), code, reason, suppressed, "session refused");
    }
    conn.close(code.into(), reason.as_bytes());
}

/// Reads a connection's `Hello` within the handshake timeout and checks its
/// protocol version; else the close code and reason of the refusal.
async fn read_hello(
    shared: &Shared,
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream, v1::Hello), (u32, String)> {
    let hs = tokio::time::timeout(shared.config.handshake_timeout, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let body = quic::read_frame(&mut recv, MAX_HELLO_BYTES).await.map_err(|e| e.to_string())?;
        let body = body.ok_or_else(|| "command stream ended before Hello".to_string())?;
        let hello = v1::Hello::decode(body).map_err(|e| format!("undecodable Hello: {e}"))?;
        Ok::<_, String>((send, recv, hello))
    })
    .await;
    let (send, recv, hello) = match hs {
        Ok(Ok(v)) => v,
        Ok(Err(reason)) => return Err((close_code::BAD_HANDSHAKE, reason)),
        Err(_) => return Err((close_code::BAD_HANDSHAKE, "no Hello within the handshake timeout".into())),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version mismatch: server speaks {PROTOCOL_VERSION}, client {} sent {}",
            peer_text(&hello.client_build),
            hello.protocol_version
        );
        return Err((close_code::VERSION_MISMATCH, reason));
    }
    Ok((send, recv, hello))
}

/// Accepts bulk connections on one of the server's bulk endpoints until it
/// closes; their tasks end with it.
pub(super) async fn serve_bulk_endpoint(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let mut tasks = JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        tasks.spawn(attach_bulk(shared.clone(), incoming));
        while tasks.try_join_next().is_some() {}
    }
}

/// One bulk connection: its `Hello` must carry a `BulkAttach` with the
/// session's bulk secret (the token is not checked: in a worker process it
/// is the one-time ticket the session's own connection spent, and the
/// secret, sent in that session's `Welcome`, proves as much). No session
/// permit is taken: the session's connections are bounded by its bulk
/// endpoints, and closed when it ends.
async fn attach_bulk(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let Ok(conn) = incoming.await else { return };
    let (mut send, _recv, hello) = match read_hello(&shared, &conn).await {
        Ok(v) => v,
        Err((code, reason)) => return refuse(&shared, &conn, code, &reason),
    };
    let Some(attach) = hello.bulk else {
        return refuse(&shared, &conn, close_code::BAD_HANDSHAKE, "a bulk endpoint takes only bulk connections");
    };
    let service = match shared.bulk.attach(&attach, &conn) {
        Ok(s) => s,
        Err(reason) => return refuse(&shared, &conn, close_code::UNAUTHORIZED, &reason),
    };
    quic::open_bulk_windows(&conn, &shared.config);
    // The client uses the connection once it knows it is attached.
    let attached = v1::Welcome { session_id: attach.session_id, ..Default::default() };
    if send.write_all(&frame::encode(&attached)).await.is_err() {
        return;
    }
    let _ = send.finish();
    tracing::debug!(session = attach.session_id, index = attach.index, remote = %conn.remote_address(), "bulk connection attached");
    conn.serve_bulk(service).await;
}

/// The series a session counts in: its tenant, and the instance it runs
/// on (its lease's; else the one a worker pool serves first, or the
/// server's device).
fn session_labels(grant: &Grant, mode: &Mode) -> SessionLabels {
    let uuid = match (&grant.lease, mode) {
        (Some(lease), _) => lease.instance_uuid.clone(),
        (None, Mode::Workers(workers)) => workers.first_uuid(),
        (None, Mode::Local(_)) => String::new(),
    };
    SessionLabels::new(&grant.tenant, &uuid)
}

/// Runs one connection: handshake, then the session until either side ends it.
pub(super) async fn handle_connection(shared: Arc<Shared>, mode: Mode, incoming: quinn::Incoming) {
    // Accepted only with a permit: unauthenticated connections buffer at
    // most `max_pending_handshakes` pre-authentication windows together
    // (issue 20, finding 1); the permit goes once the peer is known.
    let Ok(pre_auth) = shared.pre_auth.clone().acquire_owned().await else { return };
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "connection failed during the QUIC handshake");
            return;
        }
    };
    let (send, recv, hello) = match read_hello(&shared, &conn).await {
        Ok(v) => v,
        Err((code, reason)) => return refuse(&shared, &conn, code, &reason),
    };
    let grant = match shared.auth.authenticate(&hello.token) {
        Ok(g) => g,
        Err(e) => return refuse(&shared, &conn, close_code::UNAUTHORIZED, &e.to_string()),
    };
    // A validly signed token of a lease that was released or expired at
    // the balancer (its instance may be another tenant's now).
    if let (Some(lease), Some(check)) = (&grant.lease, &shared.lease_check)
        && let Err(reason) = check.admit(lease.lease_id).await
    {
        return refuse(&shared, &conn, close_code::UNAUTHORIZED, &reason);
    }
    drop(pre_auth);
    // A supervisor's connection only carries the Hello and the redirect
    // (the session runs on the worker's connection): it keeps its small
    // window, so a tenant cannot pin the supervisor's memory by sending on
    // it (256 MiB a session before; issue 20, finding 2).
    if !matches!(mode, Mode::Workers(_)) {
        quic::open_windows(&conn, &shared.config);
    }
    if let Some(resume) = hello.resume {
        let attachment = Attachment { link: conn.clone(), sender: send, receiver: recv };
        return match shared.resumable.hand_over(&grant, &resume, attachment) {
            Ok(()) => {
                add(&shared.metrics.resumptions, 1);
                tracing::info!(session = resume.session_id, remote = %conn.remote_address(), "client reattaching")
            }
            Err(reason) => {
                add(&shared.metrics.resumptions_refused, 1);
                refuse(&shared, &conn, close_code::SESSION_GONE, &reason)
            }
        };
    }
    let Ok(permit) = shared.sessions.clone().try_acquire_owned() else {
        let reason = format!("server is at its limit of {} sessions", shared.config.max_sessions);
        return refuse(&shared, &conn, close_code::BUSY, &reason);
    };
    let id = grant.session_id.unwrap_or_else(|| shared.next_session.fetch_add(1, Ordering::Relaxed));
    let span = tracing::info_span!("session", id, remote = %conn.remote_address());
    // The span follows this task across its awaits: entered with a guard
    // instead, it stayed entered on the runtime thread while the task was
    // parked, and other sessions' lines on that thread carried this
    // session's id (issue 20, finding 12).
    async move {
        tracing::info!(client = %peer_text(&hello.client_build), subject = %grant.subject, "session opened");
        add(&shared.metrics.sessions_opened, 1);
        add(&shared.metrics.sessions_active, 1);
        let labels = session_labels(&grant, &mode);
        shared.metrics.session_opened(&labels);
        // A lease grants its whole instance; other tokens get the server's quota.
        let quota = match (&grant.lease, grant.memory_quota) {
            (Some(_), Some(q)) => q,
            _ => grant.memory_quota.unwrap_or(shared.config.memory_quota).min(shared.config.memory_quota),
        };
        if let Some(lease) = &grant.lease {
            let session =
                LeasedSession { token: lease.token.clone(), session_id: id, memory_used: 0, conn: conn.clone() };
            // One session per lease: a client that reconnects (a thawed Lambda
            // environment) replaces its old session.
            if let Some(old) = shared.leased().insert(lease.lease_id, session) {
                old.conn.close(close_code::NORMAL.into(), b"replaced by a new session of the same lease");
            }
        }
        // Whether the session's commands may move to RDMA (fresh sessions
        // in this process only; docs/rdma.md).
        let decision = match (&mode, &hello.migrate) {
            (Mode::Local(_), None) => rdma::decide(shared.rdma.as_ref(), hello.rdma.as_ref(), grant.allow_rdma),
            _ => Decision::Quic(Fallback::Disabled),
        };
        match &decision {
            Decision::Rdma(_) => tracing::info!("RDMA offered and accepted"),
            Decision::Quic(Fallback::NotOffered) => {}
            Decision::Quic(why) if hello.rdma.is_some() => {
                tracing::info!(?why, "RDMA offered; the session stays on QUIC")
            }
            Decision::Quic(_) => {}
        }
        let start = match hello.migrate {
            Some(m) => {
                tracing::info!(bytes = m.memory_bytes, "a session migrates here");
                Start::Migrated(m)
            }
            None => Start::Fresh,
        };
        let conn = match mode {
            Mode::Local(device) => {
                let attachment = Attachment::<Quic> { link: conn, sender: send, receiver: recv };
                match (decision, &shared.rdma) {
                    (Decision::Rdma(accept), Some(host)) => {
                        let attachment: Attachment<Rdma> = rdma::pending(host.clone(), id, accept, attachment);
                        let link = match device {
                            AnyDevice::Cuda(d) => run_session(&shared, d, attachment, id, quota, &grant, start).await,
                            AnyDevice::Emulated(d) => {
                                run_session(&shared, d, attachment, id, quota, &grant, start).await
                            }
                        };
                        link.quic().clone()
                    }
                    // A fresh session on a server that offers shared
                    // memory may move its commands to a ring there.
                    _ if shared.shm.enabled() && matches!(start, Start::Fresh) => {
                        let cfg = &shared.config;
                        let attachment = shm_commands::pending(
                            attachment,
                            cfg.handshake_timeout,
                            cfg.max_frame_bytes as usize,
                            cfg.io_spin,
                            shared.metrics.clone(),
                        );
                        let link = match device {
                            AnyDevice::Cuda(d) => run_session(&shared, d, attachment, id, quota, &grant, start).await,
                            AnyDevice::Emulated(d) => {
                                run_session(&shared, d, attachment, id, quota, &grant, start).await
                            }
                        };
                        link.quic().clone()
                    }
                    _ => match device {
                        AnyDevice::Cuda(d) => run_session(&shared, d, attachment, id, quota, &grant, start).await,
                        AnyDevice::Emulated(d) => run_session(&shared, d, attachment, id, quota, &grant, start).await,
                    },
                }
            }
            Mode::Workers(workers) => match workers.for_session(&grant) {
                Some((pool, memory)) => {
                    let migrated_in = matches!(start, Start::Migrated(_));
                    let group = workers.group_for(&grant);
                    let group = group.as_ref().map(|(g, percent)| (g, *percent));
                    let metered = workers.share_for(&grant);
                    let metered = metered.as_ref().map(|(g, percent)| (g, *percent));
                    let labels = &labels;
                    run_in_worker(
                        &shared,
                        &pool,
                        &memory,
                        group,
                        metered,
                        conn,
                        id,
                        quota,
                        &grant,
                        labels,
                        send,
                        migrated_in,
                    )
                    .await
                }
                None => {
                    conn.close(close_code::UNAUTHORIZED.into(), b"the lease's instance is not served here");
                    conn
                }
            },
        };
        if let Some(lease) = &grant.lease {
            let mut leased = shared.leased();
            if leased.get(&lease.lease_id).is_some_and(|s| s.conn.stable_id() == conn.stable_id()) {
                leased.remove(&lease.lease_id);
            }
        }
        shared.metrics.sessions_active.fetch_sub(1, Ordering::Relaxed);
        shared.metrics.session_closed(&labels);
        drop(permit);
        shared.session_ended.notify_one();
        tracing::info!("session ended");
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, finding 6: a 60 KiB build string once went whole into a
    /// log line for every refused connection.
    #[test]
    fn peer_text_is_cut_and_escaped() {
        let long = "x".repeat(60 << 10);
        let shown = peer_text(&long);
        assert!(shown.len() < 200, "{}", shown.len());
        assert!(shown.ends_with(&format!("({} bytes)", 60 << 10)));
        assert_eq!(peer_text("gpupool 0.1\n\u{1b}[31m"), "gpupool 0.1\\n\\u{1b}[31m");
    }

    #[test]
    fn refusals_are_logged_at_a_bounded_rate() {
        let logged = (0..1000).filter(|_| refusal_log_slot().is_some()).count() as u64;
        // At most two one-second windows can be touched by the loop.
        assert!(logged <= 2 * REFUSALS_LOGGED_PER_SECOND, "{logged}");
        assert!(logged >= 1);
    }
}
