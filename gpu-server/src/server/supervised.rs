//! A session handed to a worker process (process isolation): the client is
//! redirected to the worker's own endpoint, and this server keeps the
//! client's first connection as the session's control connection, relays
//! the worker's counters, and redirects a reattaching client to the worker
//! that kept its session.

use super::commands::LINGER;
use super::metrics::SessionLabels;
use super::mps_group::MpsGroup;
use super::resume::ResumeSlot;
use super::state::Shared;
use super::transport::quic;
use super::transport::{Attachment, Link};
use crate::auth::Grant;
use crate::error::ServerError;
use crate::pool::{Worker, WorkerPool};
use crate::swap::{DeviceMemory, SessionMemory, remote};
use gpupool_proto::{close_code, frame, v1};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Hands the session to a worker process: the client is redirected to it
/// and this connection stays open as the session's control connection
/// until the worker exits. When the client's connections are lost, the
/// worker keeps the session for the resume grace period and a reattaching
/// client is redirected to it again. Returns the last control connection.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_in_worker(
    shared: &Shared,
    pool: &Arc<WorkerPool>,
    memory: &Arc<DeviceMemory>,
    group: Option<(&Arc<MpsGroup>, u32)>,
    metered: Option<(&Arc<MpsGroup>, u32)>,
    mut conn: quinn::Connection,
    id: u64,
    quota: u64,
    grant: &Grant,
    labels: &SessionLabels,
    mut send: quinn::SendStream,
    migrated_in: bool,
) -> quinn::Connection {
    let (subject, lease) = (grant.subject.as_str(), grant.lease.as_ref().map(|l| l.lease_id));
    let mut slot = ResumeSlot::register(&shared.resumable, shared.config.resume_grace, id, grant);
    let mut moves = shared.migrations.register(id);
    let ticket = hex::encode(rand::random::<[u8; 32]>());
    let mut assign = v1::WorkerAssign {
        ticket: ticket.clone(),
        subject: subject.into(),
        memory_quota: quota,
        session_id: id,
        resume_secret: slot.secret().to_string(),
        resume: false,
        ..Default::default()
    };
    // A shared session's worker is an MPS client of its GPU's daemon, with
    // its lease's share of the SMs; it joins the group's fate from here.
    let mps_env = match group {
        Some((g, percent)) => match g.client_env(percent, &shared.metrics).await {
            Ok(env) => Some(env),
            Err(e) => {
                // No daemon: the session still runs, alone (time-sliced),
                // which costs throughput but never isolation.
                tracing::error!(error = %e, "no MPS daemon; the shared session runs as an ordinary worker");
                None
            }
        },
        None => None,
    };
    // Metered by its GPU's temporal share when it time-slices: the worker
    // reports each batch's busy time and waits out the holds it is sent.
    // A worker under MPS is confined to its share of the SMs already; holds
    // on top of that only idle the GPU (on an H100, a 75 % and a 25 %
    // share both saturating ran 9.4 : 1 with both, docs/sharing.md).
    assign.time_share = mps_env.is_none() && metered.is_some_and(|(g, percent)| g.share_join(id, percent));
    let metered = metered.map(|(g, _)| g).filter(|_| assign.time_share);
    let mut fate = match (group, &mps_env) {
        (Some((g, _)), Some(_)) => Some(g.join()),
        _ => None,
    };
    let assigned = match &mps_env {
        Some(env) => pool.assign_with_env(&assign, env).await,
        None => pool.assign(&assign).await,
    };
    let mut worker = match assigned {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "no session worker");
            if let Some(g) = metered {
                g.share_leave(id);
            }
            conn.close(close_code::BUSY.into(), format!("no session worker: {e}").as_bytes());
            return conn;
        }
    };
    let pid = worker.pid();
    let port = worker.ready.port;
    // With swapping, the worker's session takes its device memory from the
    // pool's ledger, and the ledger's swap-out orders reach it on its pipe.
    memory.cap(worker.ready.total_memory);
    let (swap_tx, mut swap_orders) = mpsc::unbounded_channel::<()>();
    let (answers, mut answers_rx) = mpsc::unbounded_channel::<v1::WorkerAssign>();
    let (holds, mut holds_rx) = mpsc::unbounded_channel::<std::time::Duration>();
    let session_memory = memory.swapping().then(|| {
        let ask = move || swap_tx.send(()).is_ok();
        Arc::new(memory.register(Some(Box::new(ask))))
    });
    tracing::info!(pid, port, mps = mps_env.is_some(), "session handed to a worker process");
    let secret = slot.secret().to_string();
    let redirect = |ticket: String, resumed: bool| v1::Welcome {
        session_id: id,
        server_build: concat!("gpupool-server ", env!("CARGO_PKG_VERSION")).into(),
        redirect: Some(v1::Redirect { port, ticket }),
        resume_secret: secret.clone(),
        resumed,
        ..Default::default()
    };
    if send.write_all(&frame::encode(&redirect(ticket, false))).await.is_err() {
        worker.kill().await;
        pool.finished(pid);
        if let Some(g) = metered {
            g.share_leave(id);
        }
        return conn;
    }
    // The session lives on the worker's connection now.
    quic::narrow_to_control(&conn);
    let mut events = worker.take_events();
    let mut relay = Relay {
        shared,
        labels,
        lease,
        reported: v1::WorkerMetrics::default(),
        order: None,
        memory: session_memory,
        answers,
        session: id,
        scope: crate::ipc::Scope { tenant: labels.tenant.clone(), instance: labels.instance.clone() },
        metered: metered.map(|g| (g.as_ref(), id)),
        holds,
    };
    // A session that migrated here waits for its client: the connection it
    // came on (the source server's) ends once it arrived.
    let mut awaiting_client = migrated_in;
    // How the worker ended: by itself (a crash is a fault of its MPS group),
    // or stopped here because another member of its group faulted.
    let (mut by_itself, mut group_fault) = (false, false);
    let status = 'session: loop {
        let request = tokio::select! {
            event = events.recv(), if !events.is_closed() => {
                relay.apply(event);
                continue;
            }
            status = worker.wait() => {
                by_itself = true;
                break status;
            }
            // MPS ended this worker's context with the faulting one's: end
            // the session now, with the reason, rather than let the client
            // find a dead context, and let the MPS server take new clients
            // (it does once its faulted clients are gone).
            Some(Ok(())) = async { Some(fate.as_mut()?.changed().await) }, if fate.is_some() => {
                group_fault = true;
                worker.kill().await;
                break worker.wait().await;
            }
            Some(answer) = answers_rx.recv() => {
                // A worker that cannot be reached is exiting: its wait ends.
                let _ = worker.send_control(&frame::encode(&answer)).await;
                continue;
            }
            Some(hold) = holds_rx.recv() => {
                let hold_us = u64::try_from(hold.as_micros()).unwrap_or(u64::MAX).max(1);
                let _ = worker.send_control(&frame::encode(&v1::WorkerAssign { hold_us, ..Default::default() })).await;
                continue;
            }
            Some(()) = swap_orders.recv() => {
                let order = v1::WorkerAssign { swap_out: true, ..Default::default() };
                if worker.send_control(&frame::encode(&order)).await.is_err()
                    && let Some(m) = &relay.memory
                {
                    // Not asked after all: nobody waits for its answer.
                    m.answered(false);
                }
                continue;
            }
            Some(order) = moves.orders.recv(), if relay.order.is_none() => {
                let target = &order.target;
                let migrate = v1::Moved {
                    address: target.address.to_string(),
                    server_name: target.server_name.clone(),
                    cert_sha256: target.cert_sha256.clone(),
                    token: target.token.clone(),
                    ..Default::default()
                };
                let order_frame = v1::WorkerAssign { migrate: Some(migrate), ..Default::default() };
                match worker.send_control(&frame::encode(&order_frame)).await {
                    Ok(()) => relay.order = Some(order),
                    Err(e) => drop(order.done.send(Err(format!("cannot reach the session's worker: {e}")))),
                }
                continue;
            }
            // A client reattaching while this connection still looks open.
            r = slot.next() => r,
            _ = conn.closed() => {
                if conn.lost().is_none() && !std::mem::take(&mut awaiting_client) {
                    break worker_end(shared, &mut worker).await;
                }
                // The worker keeps the session as long: wait for the client.
                tokio::select! {
                    r = slot.wait() => r,
                    status = worker.wait() => {
                        by_itself = true;
                        break 'session status;
                    }
                }
            }
        };
        let Some(request) = request else { break worker_end(shared, &mut worker).await };
        let ticket = hex::encode(rand::random::<[u8; 32]>());
        let rearm = v1::WorkerAssign { ticket: ticket.clone(), resume: true, ..assign.clone() };
        let armed = async {
            worker.send_control(&frame::encode(&rearm)).await?;
            loop {
                match events.recv().await {
                    Some(v1::worker_event::Event::Assigned(t)) if t == ticket => return Ok(()),
                    Some(other) => relay.apply(Some(other)),
                    None => return Err(ServerError::Worker("worker exited".into())),
                }
            }
        };
        if let Err(e) = tokio::time::timeout(shared.config.handshake_timeout, armed)
            .await
            .unwrap_or_else(|_| Err(ServerError::Worker("worker did not arm the resume ticket".into())))
        {
            tracing::warn!(error = %e, "cannot resume the session");
            request.attachment.link.close(close_code::SESSION_GONE.into(), format!("cannot resume: {e}").as_bytes());
            break worker_end(shared, &mut worker).await;
        }
        let Attachment { link, mut sender, .. } = request.attachment;
        let _ = sender.write_all(&frame::encode(&redirect(ticket, true))).await;
        if conn.stable_id() != link.stable_id() {
            conn.close(close_code::NORMAL.into(), b"the client reattached on another connection");
        }
        conn = link;
        if let Some(id) = lease
            && let Some(s) = shared.leased().get_mut(&id)
        {
            s.conn = conn.clone();
        }
        tracing::info!(pid, "client redirected to its kept session");
    };
    // The last report may arrive after the exit.
    while let Ok(event) = events.try_recv() {
        relay.apply(Some(event));
    }
    if let Some(order) = relay.order.take() {
        let _ = order.done.send(Err("the session's worker exited before it reported".into()));
    }
    pool.finished(pid);
    // Its IPC exports went with its context.
    shared.ipc.release(id);
    if let Some(g) = metered {
        g.share_leave(id);
    }
    shared.metrics.worker_exited(super::metrics::WorkerExit::of(&status));
    let crashed = by_itself && !matches!(&status, Ok(s) if s.success());
    if let (true, Some((g, _)), Some(_)) = (crashed, group, &fate) {
        tracing::warn!(pid, "a shared session's worker died under MPS: ending the other sessions of its group");
        g.fault(&shared.metrics);
    }
    // The worker's memory and shared-memory region are gone with it (a
    // worker that crashed never reported them freed).
    relay.apply(Some(v1::worker_event::Event::Metrics(v1::WorkerMetrics {
        memory_mapped: 0,
        memory_swapped: 0,
        shm_regions: 0,
        shm_registered: 0,
        batches_queued: 0,
        batch_bytes_queued: 0,
        ..relay.reported
    })));
    match status {
        _ if group_fault => {
            tracing::warn!(pid, "session ended: another shared session on its GPU faulted under MPS");
            let reason = "MPS group fault: a shared session on this GPU faulted, and MPS ended this session's GPU \
                          context with it (docs/sharing.md)";
            conn.close(close_code::WORKER_EXITED.into(), reason.as_bytes());
        }
        Ok(s) if s.code() == Some(crate::worker::CONTEXT_LOST_EXIT) => {
            tracing::warn!(pid, "session ended: its GPU context was lost under MPS");
            let reason = "the session's GPU context was lost (a fault under MPS; the other sessions of its group \
                          ended with it, docs/sharing.md)";
            conn.close(close_code::WORKER_EXITED.into(), reason.as_bytes());
        }
        Ok(s) if s.success() => conn.close(close_code::NORMAL.into(), b"session ended"),
        Ok(s) => {
            tracing::warn!(pid, status = %s, "session worker ended abnormally");
            conn.close(close_code::WORKER_EXITED.into(), format!("session worker {pid} {s}").as_bytes());
        }
        Err(e) => conn.close(close_code::WORKER_EXITED.into(), format!("session worker {pid}: {e}").as_bytes()),
    }
    conn
}

/// The client ended the session (or vanished): gives the worker time to see
/// its own connection end, then stops it, then kills it.
async fn worker_end(shared: &Shared, worker: &mut Worker) -> std::io::Result<std::process::ExitStatus> {
    if let Ok(status) = tokio::time::timeout(LINGER, worker.wait()).await {
        return status;
    }
    worker.stop();
    if let Ok(status) = tokio::time::timeout(shared.config.shutdown_grace, worker.wait()).await {
        return status;
    }
    worker.kill().await;
    worker.wait().await
}

/// What a worker reports, relayed: its counters into the server's, its
/// session's memory into the lease's entry, a migration's outcome to whoever
/// ordered it.
struct Relay<'a> {
    shared: &'a Shared,
    /// The session's tenant and instance, whose memory and calls the
    /// reports move.
    labels: &'a SessionLabels,
    lease: Option<u64>,
    reported: v1::WorkerMetrics,
    /// The migration ordered and not yet reported.
    order: Option<super::migrate::Order>,
    /// The session's share of the pool's ledger (swapping on).
    memory: Option<Arc<SessionMemory>>,
    /// Answers to the worker's memory and IPC questions, sent by the
    /// session loop.
    answers: mpsc::UnboundedSender<v1::WorkerAssign>,
    /// The session's id and scope, which its IPC exports carry.
    session: u64,
    scope: crate::ipc::Scope,
    /// The temporal share metering the session, and its id there.
    metered: Option<(&'a MpsGroup, u64)>,
    /// Holds for the worker's next batch, sent by the session loop.
    holds: mpsc::UnboundedSender<std::time::Duration>,
}

impl Relay<'_> {
    fn apply(&mut self, event: Option<v1::worker_event::Event>) {
        match event {
            Some(v1::worker_event::Event::Metrics(m)) => {
                self.shared.metrics.add_worker_delta(&m, &self.reported);
                self.shared.metrics.labels_worker_delta(self.labels, &m, &self.reported);
                if let Some(id) = self.lease
                    && let Some(s) = self.shared.leased().get_mut(&id)
                {
                    s.memory_used = m.memory_mapped;
                }
                self.reported = m;
            }
            Some(v1::worker_event::Event::Migrated(outcome)) => {
                let Some(order) = self.order.take() else { return };
                let report = if outcome.error.is_empty() {
                    Ok(super::migrate::Migrated {
                        target_session: outcome.target_session,
                        memory_bytes: outcome.memory_bytes,
                        precopied: outcome.precopied_bytes,
                        pause: std::time::Duration::from_micros(outcome.pause_us),
                    })
                } else {
                    Err(outcome.error)
                };
                let _ = order.done.send(report);
            }
            Some(v1::worker_event::Event::Memory(request)) => self.memory_request(request),
            Some(v1::worker_event::Event::Ipc(request)) => {
                let answer = self.shared.ipc.serve(self.session, &self.scope, &request);
                let _ = self.answers.send(v1::WorkerAssign { ipc: Some(answer), ..Default::default() });
            }
            Some(v1::worker_event::Event::BusyUs(us)) => {
                let Some((group, id)) = self.metered else { return };
                let busy = std::time::Duration::from_micros(us);
                if let Some(hold) = group.share_report(id, busy, &self.shared.metrics) {
                    let _ = self.holds.send(hold);
                }
            }
            _ => {}
        }
    }
}

impl Relay<'_> {
    /// Applies a worker's memory request to its share of the ledger; a
    /// question that may wait for other sessions to swap out is served off
    /// the runtime, and every answer goes back through the session loop.
    fn memory_request(&self, request: v1::MemoryRequest) {
        let answer = |a| v1::WorkerAssign { memory: Some(a), ..Default::default() };
        let Some(session) = &self.memory else {
            if request.seq != 0 {
                let error = "this server does not swap".to_string();
                let _ = self.answers.send(answer(v1::MemoryAnswer { seq: request.seq, error, ok: false }));
            }
            return;
        };
        if remote::blocks(&request) {
            let (session, answers) = (session.clone(), self.answers.clone());
            tokio::task::spawn_blocking(move || {
                if let Some(a) = remote::serve(&session, &request) {
                    let _ = answers.send(answer(a));
                }
            });
        } else if let Some(a) = remote::serve(session, &request) {
            let _ = self.answers.send(answer(a));
        }
    }
}
