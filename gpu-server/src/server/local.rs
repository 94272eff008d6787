//! A session served in this process: its calls on a thread of its own
//! ([`super::thread`]), its frames on an [`Attachment`] of any transport,
//! and, when the attachment is lost, on the client's next one (see
//! [`ResumeSlot`]).

use super::bulk::BulkService;
use super::commands::{Ended, MAX_QUEUED_BATCH_BYTES, Replies, frame_error_reply, read_commands, write_replies};
use super::resume::ResumeSlot;
use super::state::Shared;
use super::thread::{self, Work, WorkQueue};
use super::transport::quic::Quic;
use super::transport::{Attachment, FrameSender, Link, Transport};
use crate::auth::Grant;
use crate::device::Backend;
use crate::images::ImageCache;
use crate::session::SessionLimits;
use crate::staging::Staging;
use gpupool_proto::payload::Compression;
use gpupool_proto::{close_code, frame, v1};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Errors listed per reply; more are only counted.
const MAX_LISTED_ERRORS: usize = 16;

/// Runs session `id` with `quota` bytes of device memory on `device`,
/// first on `attachment`. Returns the last attachment's link.
///
/// Reattachments arrive on QUIC, the control transport; a transport that
/// carries sessions off QUIC converts them into its own attachment (the
/// `Into` bound).
pub(super) async fn run_session<B: Backend, T: Transport>(
    shared: &Arc<Shared>,
    device: Arc<B>,
    attachment: Attachment<T>,
    id: u64,
    quota: u64,
    grant: &Grant,
) -> T::Link
where
    Attachment<Quic>: Into<Attachment<T>>,
{
    let Attachment { link: mut conn, sender: mut send, receiver: mut recv } = attachment;
    let mut slot = ResumeSlot::register(&shared.resumable, shared.config.resume_grace, id, grant);
    let cfg = &shared.config;
    let desc = device.description().clone();
    let g = desc.granularity;
    let quota = quota.div_ceil(g) * g;
    // Room for fragmentation: twice the quota, at least 64 MiB.
    let va_size = (quota * 2).max(64 << 20).div_ceil(g) * g;
    let limits = SessionLimits {
        memory_quota: quota,
        va_size,
        granularity: g,
        max_inline_bytes: u64::from(cfg.max_inline_bytes),
        // Staged images may be larger than a frame (cuBLAS's fatbins are);
        // staging itself is bounded by max_staging_bytes.
        max_image_bytes: cfg.max_staging_bytes.min(1 << 30),
        max_handles: cfg.max_handles,
        max_listed_errors: MAX_LISTED_ERRORS,
        max_output_bytes: (u64::from(cfg.max_frame_bytes) - u64::from(cfg.max_inline_bytes)) / 2,
        compression: compression(cfg.compression),
    };
    let staging = Arc::new(Staging::new(cfg.max_staging_bytes, cfg.max_bulk_streams * 4));
    let bulk = Arc::new(BulkService::new(
        staging.clone(),
        shared.metrics.clone(),
        cfg.max_frame_bytes,
        compression(cfg.compression),
        cfg.max_bulk_streams,
    ));
    // Extra bulk connections attach while the session lives; closed when it ends.
    let bulk_slot = shared.bulk.register(id, bulk.clone());
    let (bulk_ports, bulk_secret) = bulk_slot.offer();
    // A client on this host may carry them through shared memory instead;
    // its region is unmapped when the session ends (the slot drops).
    let shm_slot = shared.shm.register(id, bulk.clone());
    let (shm_socket, shm_secret) = shm_slot.offer();
    let (work_tx, work_rx) = mpsc::channel::<Work>(cfg.batch_queue);
    let (reply_tx, reply_rx) = mpsc::channel::<v1::BatchReply>(cfg.batch_queue);
    let (ready_tx, ready_rx) = oneshot::channel();
    let memory = shared.device_memory.register(Some(thread::swap_asker(&work_tx)));
    let started = spawn_thread(
        id,
        device,
        limits,
        staging,
        shared,
        WorkQueue { rx: work_rx, spin: cfg.session_spin },
        reply_tx,
        ready_tx,
        memory,
    );
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start a session worker thread");
        conn.end(close_code::BUSY, b"server cannot start a session worker");
        return conn;
    }
    let (va_base, context_limits) = match ready_rx.await {
        Ok(Ok(ready)) => ready,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot open a device session");
            conn.end(close_code::BUSY, format!("device session failed: {e}").as_bytes());
            return conn;
        }
        Err(_) => {
            conn.end(close_code::BUSY, b"session worker ended early");
            return conn;
        }
    };
    let welcome = v1::Welcome {
        session_id: id,
        server_build: concat!("gpupool-server ", env!("CARGO_PKG_VERSION")).into(),
        va_base,
        va_size,
        granularity: g,
        memory_quota: quota,
        device: Some(v1::DeviceInfo {
            name: desc.name.clone(),
            backend: desc.backend.into(),
            uuid: desc.uuid.clone(),
            compute_capability_major: desc.compute_capability.0,
            compute_capability_minor: desc.compute_capability.1,
            multiprocessor_count: desc.multiprocessor_count,
            attributes: desc.attributes.iter().copied().collect(),
            driver_version: desc.driver_version,
            error_strings: desc.error_strings.iter().cloned().collect(),
            limits: context_limits.into_iter().collect(),
        }),
        max_frame_bytes: cfg.max_frame_bytes,
        max_inline_bytes: cfg.max_inline_bytes,
        redirect: None,
        resume_secret: slot.secret().to_string(),
        resumed: false,
        resumed_seq: 0,
        bulk_ports,
        bulk_secret,
        shm_socket,
        shm_secret,
        // The server has no RDMA listener yet (docs/rdma.md): every offer
        // falls back to QUIC, as `rdma::negotiate::decide` does without a device.
        rdma: None,
    };
    if send.send_frame(&frame::encode(&welcome)).await.is_err() {
        return conn;
    }
    let mut replies = Replies::new(reply_rx, slot.resumable());
    let queue_budget = Arc::new(Semaphore::new(MAX_QUEUED_BATCH_BYTES));
    let mut received_seq = 0;
    let mut acked = None;
    loop {
        // Replies go out in order as the session thread produces them.
        let writer = tokio::spawn(write_replies(replies, send, conn.clone(), acked));
        let bulk_task = tokio::spawn(conn.clone().serve_bulk(bulk.clone()));
        let ended = read_commands(shared, &conn, &mut recv, &work_tx, &queue_budget, &mut received_seq).await;
        bulk_task.abort();
        match ended {
            Ended::Finished => {
                drop(work_tx);
                let _ = writer.await;
                conn.end(close_code::NORMAL, b"session ended");
                return conn;
            }
            Ended::Violation(e) => {
                // Framing is lost: answer, then end the session.
                let _ = work_tx.send(Work::Reply(frame_error_reply(format!("malformed frame: {e}")))).await;
                drop(work_tx);
                let _ = writer.await;
                conn.end(close_code::PROTOCOL_VIOLATION, format!("malformed frame: {e}").as_bytes());
                return conn;
            }
            Ended::Lost(why) => {
                tracing::info!(why, "session connection lost");
                let Ok(kept) = writer.await else { return conn };
                replies = kept;
                let Some(request) = slot.wait().await else { return conn };
                let again: Attachment<T> = request.attachment.into();
                if !replies.covers(request.acked_seq) {
                    again.link.end(close_code::SESSION_GONE, b"the replies the client missed are gone");
                    return conn;
                }
                Attachment { link: conn, sender: send, receiver: recv } = again;
                acked = Some(request.acked_seq);
                let welcome = v1::Welcome { resumed: true, resumed_seq: received_seq, ..welcome.clone() };
                // A failed send shows on the command channel as a lost attachment.
                let _ = send.send_frame(&frame::encode(&welcome)).await;
                tracing::info!(remote = %conn.peer(), received_seq, "session resumed");
            }
        }
    }
}

fn compression(on: bool) -> Compression {
    if on { Compression::Auto } else { Compression::Off }
}

/// Starts the session's thread.
#[allow(clippy::too_many_arguments)]
fn spawn_thread<B: Backend>(
    id: u64,
    device: Arc<B>,
    limits: SessionLimits,
    staging: Arc<Staging>,
    shared: &Shared,
    work: WorkQueue,
    replies: mpsc::Sender<v1::BatchReply>,
    ready: oneshot::Sender<Result<thread::SessionReady, crate::error::CallError>>,
    memory: crate::swap::SessionMemory,
) -> std::io::Result<()> {
    let images: Arc<ImageCache> = shared.images.clone();
    let metrics = shared.metrics.clone();
    std::thread::Builder::new()
        .name(format!("gpupool-session-{id}"))
        .spawn(move || thread::run(device, limits, staging, images, metrics, work, replies, ready, memory))
        .map(drop)
}
