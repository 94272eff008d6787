//! A session served in this process: its calls on a thread of its own
//! ([`super::thread`]), its frames on an [`Attachment`] of any transport,
//! and, when the attachment is lost, on the client's next one (see
//! [`ResumeSlot`]).

use super::bulk::BulkService;
use super::commands::{Ended, QueuedSeq, Replies, frame_error_reply, read_commands, write_replies};
use super::migrate::{Migrated, MigrationTarget, Outgoing, PrecopyFailed};
use super::resume::ResumeSlot;
use super::state::Shared;
use super::thread::{self, Import, Work, WorkQueue};
use super::transport::quic::Quic;
use super::transport::{Attachment, FrameReceiver, FrameSender, Link, Transport};
use crate::auth::Grant;
use crate::device::Backend;
use crate::images::ImageCache;
use crate::session::SessionLimits;
use crate::staging::Staging;
use gpupool_proto::payload::Compression;
use gpupool_proto::{close_code, frame, v1};
use prost::Message;
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
    start: Start,
) -> T::Link
where
    Attachment<Quic>: Into<Attachment<T>>,
{
    let Attachment { link: mut conn, sender: mut send, receiver: mut recv } = attachment;
    let mut slot = ResumeSlot::register(&shared.resumable, shared.config.resume_grace, id, grant);
    let mut moves = shared.migrations.register(id);
    let cfg = &shared.config;
    let desc = device.description().clone();
    let g = desc.granularity;
    let quota = quota.div_ceil(g) * g;
    // Room for fragmentation: twice the quota, at least 64 MiB.
    let mut va_size = (quota * 2).max(64 << 20).div_ceil(g) * g;
    // A migrated session keeps its range, within what its quota gives here.
    let base = match &start {
        Start::Fresh => None,
        Start::Migrated(m) => {
            if m.va_size == 0 || m.va_size > va_size || !m.va_size.is_multiple_of(g) || m.memory_bytes > quota {
                let reason = format!(
                    "a session of {} bytes in a range of {} does not fit a quota of {quota} (range {va_size})",
                    m.memory_bytes, m.va_size
                );
                refuse_migration(send, &conn, reason).await;
                return conn;
            }
            va_size = m.va_size;
            Some(m.va_base)
        }
    };
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
    let staging =
        Arc::new(Staging::with_host(cfg.max_staging_bytes, cfg.max_bulk_streams * 4, shared.host_staging.clone()));
    // The session's staged uploads move with it.
    let session_staging = staging.clone();
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
    // Its pinned memory lives in host regions it attaches there too, which
    // the session's copies name; registered with the driver as they come.
    let host_regions = Arc::new(crate::host_regions::HostRegions::default());
    let shm_slot = shared.shm.register(id, bulk.clone(), host_regions.clone(), device.host_pinner());
    let session_regions = host_regions.clone();
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
        base,
        session_regions,
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
            if matches!(start, Start::Migrated(_)) {
                refuse_migration(send, &conn, format!("device session failed: {e}")).await;
            } else {
                conn.end(close_code::BUSY, format!("device session failed: {e}").as_bytes());
            }
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
            kernel_driver_version: desc.kernel_driver_version.clone(),
            pcie: desc.pcie,
        }),
        max_frame_bytes: cfg.max_frame_bytes,
        max_inline_bytes: cfg.max_inline_bytes,
        max_staging_bytes: cfg.max_staging_bytes,
        redirect: None,
        resume_secret: slot.secret().to_string(),
        resumed: false,
        resumed_seq: 0,
        bulk_ports,
        bulk_secret,
        shm_host_regions: !shm_socket.is_empty(),
        shm_region_addresses: !shm_socket.is_empty(),
        // A fresh session whose transport can take a command ring waits
        // for one in the registry (docs/transport.md).
        shm_commands: match &start {
            Start::Fresh => conn.offer_shm_commands(&shm_slot),
            Start::Migrated(_) => false,
        },
        shm_socket,
        shm_secret,
        // A session the negotiation moved to RDMA registers for its
        // connection here (with its bulk service); others offer nothing.
        rdma: match &start {
            Start::Fresh => conn.welcome_rdma(&bulk),
            Start::Migrated(_) => None,
        },
        // Pre-copied memory is written into the session's mappings as it
        // arrives (kept in host memory for a source that announces no
        // mappings): at most the session's quota and the configured bound.
        precopy_bytes: match &start {
            Start::Migrated(m) if m.precopy => quota.min(cfg.migrate_precopy_bytes),
            _ => 0,
        },
    };
    // Validated to fit a semaphore.
    let queue_budget = Arc::new(Semaphore::new(cfg.max_queued_batch_bytes as usize));
    // The last batch read (see `read_commands`).
    let received_seq = QueuedSeq::default();
    let mut acked = None;
    let mut replies = match start {
        Start::Fresh => {
            if send.send_frame(&frame::encode(&welcome)).await.is_err() {
                return conn;
            }
            Replies::new(reply_rx, slot.resumable())
        }
        Start::Migrated(m) => {
            // The source sends the session once it is welcomed.
            if send.send_frame(&frame::encode(&welcome)).await.is_err() {
                return conn;
            }
            let limits =
                ImportLimits { max_precopy: welcome.precopy_bytes, granularity: g, ..limits_of_import(shared) };
            let received = tokio::time::timeout(
                super::migrate::TRANSFER_LIMIT,
                receive_session(&shared.images, &m, &mut recv, &work_tx, &session_staging, limits),
            )
            .await
            .unwrap_or_else(|_| Err("the transfer took too long".into()));
            let received = match received {
                Ok(received) if slot.resumable() => received,
                Ok(_) => {
                    refuse_migration(send, &conn, "this server keeps no sessions for a resume".into()).await;
                    return conn;
                }
                Err(reason) => {
                    tracing::warn!(reason, "migrated session refused");
                    refuse_migration(send, &conn, reason).await;
                    return conn;
                }
            };
            let done = v1::MigrateDone { session_id: id, resume_secret: slot.secret().to_string(), error: None };
            // Not lingering for its acknowledgement: the client may be
            // reattaching already.
            let _ = send.send_frame(&frame::encode(&done)).await;
            tracing::info!(
                bytes = received.memory_bytes,
                precopied = received.precopied,
                received_seq = received.received_seq,
                "migrated session arrived; waiting for its client"
            );
            received_seq.set(received.received_seq);
            let replies =
                Replies::taken_over(reply_rx, received.replies_acked, received.replies_forgotten, received.replies);
            // Its client comes as after a lost connection.
            let Some((again, seq)) = reattach(&mut slot, &replies, &welcome, received_seq.get(), "migrated here").await
            else {
                return conn;
            };
            Attachment { link: conn, sender: send, receiver: recv } = again;
            acked = Some(seq);
            replies
        }
    };
    loop {
        // Replies go out in order as the session thread produces them.
        let stop = Arc::new(tokio::sync::Notify::new());
        let writer = tokio::spawn(write_replies(replies, send, conn.clone(), acked, stop.clone(), cfg.io_spin));
        let bulk_task = tokio::spawn(conn.clone().serve_bulk(bulk.clone()));
        // A migration order starts a pre-copy beside the session, which
        // keeps running; the session stops once the pre-copy is over.
        let (pre_tx, mut pre_rx) = oneshot::channel();
        let mut pre_tx = Some(pre_tx);
        let mut pending: Option<(Box<super::migrate::Order>, AbortOnDrop)> = None;
        let mut precopied = None;
        // A move waiting for the batches that may still name the client's
        // host regions (revoked through the command ring).
        let mut revoking: Option<Revoking> = None;
        let ended = {
            let reading = read_commands(shared, &conn, &mut recv, &work_tx, &queue_budget, &received_seq);
            tokio::pin!(reading);
            loop {
                let waiting = revoking.as_ref().map(|r| (r.last, r.deadline));
                tokio::select! {
                    ended = &mut reading => break ended,
                    Some(order) = moves.orders.recv(), if pending.is_none() && revoking.is_none() => {
                        // Pinned memory in this host's shared memory
                        // cannot follow the session: none attaches once
                        // the move starts, and the client must be told to
                        // stop naming what is there (through its command
                        // ring; without one there is no move).
                        if let Err(reason) = host_regions.freeze(conn.command_ring().is_some()) {
                            tracing::info!(%reason, "migration refused");
                            let _ = order.done.send(Err(reason));
                            continue;
                        }
                        let (work, target, tx) = (work_tx.clone(), order.target.clone(), pre_tx.take());
                        let task = tokio::spawn(async move {
                            let result = super::migrate::precopy(&target, &work).await;
                            if let Some(tx) = tx {
                                let _ = tx.send(result);
                            }
                        });
                        pending = Some((Box::new(order), AbortOnDrop(task)));
                    }
                    result = &mut pre_rx, if pending.is_some() => {
                        let (order, _task) = pending.take().expect("a pre-copy runs");
                        let result = result.unwrap_or_else(|_| {
                            Err(PrecopyFailed::Retry("the pre-copy ended early".into()))
                        });
                        match result {
                            // The session holds what cannot move: it was
                            // not stopped and goes on as it was.
                            Err(PrecopyFailed::Stays(reason)) => {
                                call_off(*order, reason, &host_regions, &mut pre_tx, &mut pre_rx);
                            }
                            result if host_regions.any() => match conn.command_ring() {
                                Some(ring) => {
                                    let last = ring.revoke_regions();
                                    precopied = Some(result);
                                    if received_seq.get() >= last {
                                        break Ended::Migrate(order);
                                    }
                                    let deadline = tokio::time::Instant::now() + REVOKE_LIMIT;
                                    revoking = Some(Revoking { order, ring, last, deadline });
                                }
                                None => {
                                    let reason = "the command ring ended during the pre-copy: the client's host \
                                                  regions cannot be revoked";
                                    call_off(*order, reason.into(), &host_regions, &mut pre_tx, &mut pre_rx);
                                }
                            },
                            result => {
                                precopied = Some(result);
                                break Ended::Migrate(order);
                            }
                        }
                    }
                    reached = async {
                        let (last, deadline) = waiting.expect("a revocation runs");
                        tokio::time::timeout_at(deadline, received_seq.reached(last)).await.is_ok()
                    }, if waiting.is_some() => {
                        let r = revoking.take().expect("a revocation runs");
                        if reached {
                            break Ended::Migrate(r.order);
                        }
                        // The client never sent that batch: the move is
                        // off and the regions are the client's again.
                        r.ring.restore_regions();
                        precopied = None;
                        let reason = format!(
                            "batch {} (the last that may name the client's host regions) did not come within {REVOKE_LIMIT:?}",
                            r.last
                        );
                        call_off(*r.order, reason, &host_regions, &mut pre_tx, &mut pre_rx);
                    }
                }
            }
        };
        if let Some(r) = revoking.take() {
            let _ = r.order.done.send(Err("the session ended, or lost its client, before it could move".into()));
        }
        bulk_task.abort();
        if let Some((order, _task)) = pending.take() {
            // The session ended (or lost its client) while it pre-copied.
            let _ = order.done.send(Err("the session ended, or lost its client, during the pre-copy".into()));
        }
        match ended {
            Ended::Migrate(order) => {
                // No batch is read any more: those on their way stay in the
                // client's replay log and go to wherever the session runs.
                // The session is read out after the batches queued before,
                // so their replies are all out of its thread by then.
                let stopped = std::time::Instant::now();
                // The batches that may still name the client's host
                // regions (up to the last one it noted, all read by now)
                // run before the regions go with the attachment.
                if host_regions.any() {
                    let (tx, rx) = oneshot::channel();
                    if work_tx.send(Work::Flush(tx)).await.is_ok() {
                        let _ = rx.await;
                    }
                }
                // No upload lands here from now on (the staged ones move).
                bulk_slot.close_links();
                shm_slot.detach();
                conn.stop_copies().await;
                let exported = export(&work_tx).await;
                stop.notify_one();
                let Ok((kept, _open)) = writer.await else { return conn };
                replies = kept;
                let outcome = match exported {
                    Ok(_) if !slot.resumable() => {
                        Err("this server keeps no sessions for a resume, so the client could not follow".into())
                    }
                    Ok(exported) => match precopied.take() {
                        // The target refused, or was not reached: no second try.
                        Some(Err(e @ (PrecopyFailed::Target(_) | PrecopyFailed::Stays(_)))) => {
                            Err(e.reason().to_owned())
                        }
                        precopy => {
                            let precopy = match precopy {
                                Some(Ok(p)) => Some(p),
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e.reason(), "pre-copy failed; the session's memory goes over now");
                                    None
                                }
                                None => None,
                            };
                            let received = received_seq.get();
                            let out = (exported, &replies, received, session_staging.complete_uploads());
                            migrate_out(shared, &work_tx, out, &order.target, precopy).await
                        }
                    },
                    Err(e) => Err(e),
                };
                let (moved, report) = match outcome {
                    Ok((done, bytes, precopied)) => {
                        let pause = stopped.elapsed();
                        let total = order.started.elapsed();
                        tracing::info!(
                            target = %order.target.address,
                            bytes,
                            precopied,
                            pause_ms = pause.as_millis() as u64,
                            total_ms = total.as_millis() as u64,
                            "session migrated"
                        );
                        let report =
                            Ok(Migrated { target_session: done.session_id, memory_bytes: bytes, precopied, pause });
                        let moved = v1::Moved {
                            address: order.target.address.to_string(),
                            server_name: order.target.server_name.clone(),
                            cert_sha256: order.target.cert_sha256.clone(),
                            token: order.target.token.clone(),
                            session_id: done.session_id,
                            resume_secret: done.resume_secret,
                        };
                        (moved, report)
                    }
                    Err(reason) => {
                        tracing::warn!(target = %order.target.address, reason, "migration failed; the session keeps running here");
                        // An empty `Moved`: resume here.
                        (v1::Moved::default(), Err(reason))
                    }
                };
                let here = moved.address.is_empty();
                conn.end(close_code::MIGRATED, &moved.encode_to_vec());
                let _ = order.done.send(report);
                if !here {
                    drop(work_tx);
                    return conn;
                }
                // The session stays: its client may attach bulk connections again.
                bulk_slot.reopen();
                let why = "after a failed migration";
                let Some((again, seq)) = reattach(&mut slot, &replies, &welcome, received_seq.get(), why).await else {
                    return conn;
                };
                Attachment { link: conn, sender: send, receiver: recv } = again;
                acked = Some(seq);
            }
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
                let Ok((kept, _)) = writer.await else { return conn };
                replies = kept;
                let Some((again, seq)) =
                    reattach(&mut slot, &replies, &welcome, received_seq.get(), "after a loss").await
                else {
                    return conn;
                };
                Attachment { link: conn, sender: send, receiver: recv } = again;
                acked = Some(seq);
            }
        }
    }
}

/// How a session starts.
#[derive(Debug)]
pub(super) enum Start {
    /// A client opened it.
    Fresh,
    /// Another server hands it over (live migration); its state follows on
    /// the attachment, then its client reattaches.
    Migrated(v1::MigrateIn),
}

/// Waits for the session's client to reattach (after a loss or a
/// migration), and welcomes it back; the new attachment and the last reply
/// the client had, or `None` when it does not come or cannot be served.
async fn reattach<T: Transport>(
    slot: &mut ResumeSlot<'_>,
    replies: &Replies,
    welcome: &v1::Welcome,
    received_seq: u64,
    why: &'static str,
) -> Option<(Attachment<T>, u64)>
where
    Attachment<Quic>: Into<Attachment<T>>,
{
    let request = slot.wait().await?;
    let mut again: Attachment<T> = request.attachment.into();
    if !replies.covers(request.acked_seq) {
        again.link.end(close_code::SESSION_GONE, b"the replies the client missed are gone");
        return None;
    }
    // A resumed session stays on QUIC (the attachment it came with).
    let welcome =
        v1::Welcome { resumed: true, resumed_seq: received_seq, rdma: None, shm_commands: false, ..welcome.clone() };
    // A failed send shows on the command channel as a lost attachment.
    let _ = again.sender.send_frame(&frame::encode(&welcome)).await;
    tracing::info!(remote = %again.link.peer(), received_seq, why, "session resumed");
    Some((again, request.acked_seq))
}

/// Answers a migration the target cannot take, and ends its attachment.
/// How long a move waits for the last batch that may name the client's host
/// regions after revoking them, and how often it looks.
const REVOKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A move waiting, after revoking the client's host regions, for the
/// batches that may still name them (`gpupool_shm::ring`): every batch up
/// to `last` runs here before the session stops.
struct Revoking {
    order: Box<super::migrate::Order>,
    ring: Arc<gpupool_shm::ring::Ring>,
    last: u64,
    deadline: tokio::time::Instant,
}

/// Pre-copy results, sent by the task that runs one.
type PrecopyResult = Result<super::migrate::Precopied, PrecopyFailed>;

/// Calls off a move before the session stopped: the order hears why, the
/// client's host regions are its own again, and a later order may start
/// another pre-copy.
fn call_off(
    order: super::migrate::Order,
    reason: String,
    host_regions: &crate::host_regions::HostRegions,
    pre_tx: &mut Option<oneshot::Sender<PrecopyResult>>,
    pre_rx: &mut oneshot::Receiver<PrecopyResult>,
) {
    tracing::info!(%reason, "migration refused");
    host_regions.thaw();
    let _ = order.done.send(Err(reason));
    let (tx, rx) = oneshot::channel();
    (*pre_tx, *pre_rx) = (Some(tx), rx);
}

async fn refuse_migration(mut send: impl FrameSender, link: &impl Link, reason: String) {
    let error = v1::CallError { index: 0, code: gpupool_proto::cuda::NOT_SUPPORTED, message: reason.clone() };
    let done = v1::MigrateDone { error: Some(error), ..Default::default() };
    let _ = send.send_frame(&frame::encode(&done)).await;
    send.finish_within(super::commands::LINGER).await;
    link.end(close_code::NORMAL, b"migration refused");
}

/// Reads the session out on its thread, after the batches queued before.
async fn export(work: &mpsc::Sender<Work>) -> Result<crate::session::Exported, String> {
    let (tx, rx) = oneshot::channel();
    work.send(Work::Migrate(tx)).await.map_err(|_| "the session has ended".to_string())?;
    rx.await.map_err(|_| "the session has ended".to_string())?.map_err(|e| e.message)
}

/// The source's side: sends the session read out (with its replies and the
/// last batch received) to `target`, over the pre-copy's link when there
/// is one. Returns the target's answer, the bytes moved and those of them
/// pre-copied and not sent again.
async fn migrate_out(
    shared: &Shared,
    work: &mpsc::Sender<Work>,
    (exported, replies, received_seq, uploads): (
        crate::session::Exported,
        &Replies,
        u64,
        Vec<crate::staging::StagedUpload>,
    ),
    target: &MigrationTarget,
    precopy: Option<super::migrate::Precopied>,
) -> Result<(v1::MigrateDone, u64, u64), String> {
    let bytes = exported.memory_bytes();
    let (kept, replies_acked, replies_forgotten) = replies.kept();
    let out = Outgoing {
        exported,
        received_seq,
        replies: kept,
        replies_acked,
        replies_forgotten,
        work: work.clone(),
        uploads,
    };
    match precopy {
        Some(precopied) => {
            let (done, reused) = super::migrate::finish(precopied, &shared.images, out).await?;
            Ok((done, bytes, reused))
        }
        None => Ok((super::migrate::send_session(target, &shared.images, out).await?, bytes, 0)),
    }
}

/// A task aborted when this is dropped (a pre-copy the session no longer
/// needs).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Bounds of what a migrated session may bring.
#[derive(Debug, Clone, Copy)]
struct ImportLimits {
    max_frame: usize,
    max_image: u64,
    max_images: usize,
    /// Image bytes one transfer may bring in all: what the image cache
    /// holds (images past it would be evicted before the calls that load
    /// them run).
    max_image_bytes: u64,
    /// Pre-copied bytes taken at most (`Welcome.precopy_bytes`).
    max_precopy: u64,
    /// The device's mapping granularity (bounds the pieces' count).
    granularity: u64,
}

fn limits_of_import(shared: &Shared) -> ImportLimits {
    let cfg = &shared.config;
    ImportLimits {
        max_frame: cfg.max_frame_bytes as usize,
        max_image: cfg.max_staging_bytes.min(1 << 30),
        max_images: cfg.max_handles,
        max_image_bytes: cfg.image_cache_bytes,
        max_precopy: 0,
        granularity: 1,
    }
}

/// What a migrated session brought besides its state on the thread.
struct Received {
    /// Replies the client may not have received.
    replies: Vec<(u64, bytes::Bytes)>,
    received_seq: u64,
    replies_acked: u64,
    replies_forgotten: u64,
    /// Device bytes written, and those of them pre-copied.
    memory_bytes: u64,
    precopied: u64,
}

/// The target's side: reads a migrating session's frames and rebuilds it on
/// its thread. With a pre-copy, the session's mappings are created as the
/// source announces them and the memory sent while the session still ran
/// is written as it arrives ([`super::migrate::PrecopyIn`]); after the stop
/// only pieces written since come again, the others are named. A failure
/// leaves the caller to end the session, which releases its mappings.
async fn receive_session(
    cache: &ImageCache,
    m: &v1::MigrateIn,
    recv: &mut impl FrameReceiver,
    work: &mpsc::Sender<Work>,
    staging: &Staging,
    limits: ImportLimits,
) -> Result<Received, String> {
    use gpupool_proto::v1::migrate_frame::Item;
    // Images being received, and those received whole (in the cache now).
    let mut images: std::collections::HashMap<[u8; 32], Vec<u8>> = std::collections::HashMap::new();
    let mut complete = std::collections::HashSet::new();
    let mut image_bytes = 0u64;
    let mut replies = Vec::new();
    let mut reply_bytes = 0;
    let mut memory = 0u64;
    // Pre-copied pieces, and what the source said at its stop.
    let mut pre =
        super::migrate::PrecopyIn::new(limits.max_precopy.min(m.memory_bytes), m.memory_bytes, limits.granularity);
    let mut precopied = 0u64;
    let mut last: Option<v1::MigrateFinal> = None;
    let announced = |last: &Option<v1::MigrateFinal>| last.as_ref().map_or(m.memory_bytes, |f| f.memory_bytes);
    // Queues an import on the session's thread; its outcome comes later.
    let start = |item: Import| async move {
        let (tx, rx) = oneshot::channel();
        work.send(Work::Import(item, tx)).await.map_err(|_| "the session has ended".to_string())?;
        Ok::<_, String>(rx)
    };
    let outcome = |rx: oneshot::Receiver<Result<(), crate::error::CallError>>| async move {
        rx.await.map_err(|_| "the session has ended".to_string())?.map_err(|e| e.message)
    };
    // Memory pieces being written while the next ones arrive (at most
    // WRITES_AHEAD frames held), by address.
    let mut writes = std::collections::VecDeque::new();
    let written =
        |(addr, rx): (u64, _)| async move { outcome(rx).await.map_err(|e| format!("memory at {addr:#x}: {e}")) };
    // Queues the write of a piece of memory.
    macro_rules! queue_write {
        ($addr:expr, $data:expr) => {{
            let addr: u64 = $addr;
            writes.push_back((addr, start(Import::Memory(addr, $data)).await?));
            if writes.len() > WRITES_AHEAD
                && let Some(w) = writes.pop_front()
            {
                written(w).await?;
            }
        }};
    }
    // Counts a piece of memory of the session as it is now against what was
    // announced.
    macro_rules! count {
        ($len:expr) => {{
            memory = memory.saturating_add($len);
            if memory > announced(&last) {
                return Err(format!("more memory than the {} bytes announced", announced(&last)));
            }
        }};
    }
    loop {
        let body = match recv.recv_frame(limits.max_frame).await {
            Ok(Some(body)) => body,
            Ok(None) => return Err("the source ended the transfer early".into()),
            Err(e) => return Err(format!("transfer failed: {e:?}")),
        };
        let item = v1::MigrateFrame::decode(body).map_err(|e| format!("undecodable frame: {e}"))?.item;
        match item.ok_or("a frame without an item")? {
            Item::Image(c) => {
                let key: [u8; 32] = c.sha256[..].try_into().map_err(|_| "an image hash that is not 32 bytes")?;
                if c.total_size > limits.max_image {
                    return Err(format!(
                        "an image of {} bytes exceeds the limit of {}",
                        c.total_size, limits.max_image
                    ));
                }
                if complete.contains(&key) {
                    return Err("an image sent twice".into());
                }
                if !images.contains_key(&key) && images.len() + complete.len() >= limits.max_images {
                    return Err(format!("more than {} images", limits.max_images));
                }
                image_bytes = image_bytes.saturating_add(c.data.len() as u64);
                if image_bytes > limits.max_image_bytes {
                    return Err(format!(
                        "more than {} bytes of images (the image cache's size)",
                        limits.max_image_bytes
                    ));
                }
                let image = images.entry(key).or_default();
                if c.offset != image.len() as u64 || c.offset + c.data.len() as u64 > c.total_size {
                    return Err("image pieces out of order or past their size".into());
                }
                image.extend_from_slice(&c.data);
                if image.len() as u64 == c.total_size {
                    if crate::images::key_of(image) != key {
                        return Err("an image does not match its SHA-256".into());
                    }
                    cache.insert(key, Arc::from(&image[..]));
                    // The cache holds it now: no second copy while the rest comes.
                    images.remove(&key);
                    complete.insert(key);
                }
            }
            Item::Calls(batch) => {
                if m.precopy && last.is_none() {
                    pre.announce(&batch)?;
                }
                outcome(start(Import::Calls(batch)).await?).await?
            }
            Item::Reply(frame) => {
                let seq = frame
                    .get(frame::HEADER_LEN..)
                    .and_then(|b| v1::BatchReply::decode(b).ok())
                    .ok_or("an undecodable reply")?
                    .seq;
                reply_bytes += frame.len();
                if replies.len() >= super::commands::KEPT_REPLIES.frames
                    || reply_bytes > super::commands::KEPT_REPLIES.bytes
                {
                    return Err("more replies than a session keeps".into());
                }
                replies.push((seq, frame));
            }
            Item::Memory(c) => {
                if m.precopy && last.is_none() {
                    return Err("memory before the pre-copy's final frame".into());
                }
                count!(c.data.len() as u64);
                queue_write!(c.addr, c.data);
            }
            Item::Precopy(c) => {
                if !m.precopy || last.is_some() {
                    return Err("pre-copied memory outside a pre-copy".into());
                }
                if let super::migrate::Arrival::Write(data) = pre.arrive(c.addr, c.data)? {
                    queue_write!(c.addr, data);
                }
            }
            // Bounded by the session's staging limits and the host's cap,
            // as a client's puts.
            Item::Staged(c) => {
                let put = staging.put_async(c.transfer_id, c.total, c.offset, c.data).await;
                put.map_err(|e| format!("a staged upload: {}", e.message))?;
            }
            Item::Final(f) => {
                if !m.precopy || last.is_some() {
                    return Err("a final frame outside a pre-copy, or twice".into());
                }
                last = Some(f);
            }
            Item::Precopied(r) => {
                if last.is_none() {
                    return Err("a pre-copied piece named before the final frame".into());
                }
                count!(r.size);
                precopied += r.size;
                if let super::migrate::Named::Kept(data) = pre.name(&r)? {
                    queue_write!(r.addr, data);
                }
            }
            // Bounded by the shadows the calls made (at most
            // `MAX_MIRROR_BYTES`): a piece outside them is an error.
            Item::Mirror(c) => outcome(start(Import::Mirror(c.addr, c.data)).await?).await?,
            Item::End(_) if m.precopy && last.is_none() => {
                return Err("a pre-copy ended without its final frame".into());
            }
            Item::End(_) if memory == announced(&last) => {
                for w in writes.drain(..) {
                    written(w).await?;
                }
                let f = last.unwrap_or(v1::MigrateFinal {
                    memory_bytes: m.memory_bytes,
                    received_seq: m.received_seq,
                    replies_acked: m.replies_acked,
                    replies_forgotten: m.replies_forgotten,
                });
                return Ok(Received {
                    replies,
                    received_seq: f.received_seq,
                    replies_acked: f.replies_acked,
                    replies_forgotten: f.replies_forgotten,
                    memory_bytes: memory,
                    precopied,
                });
            }
            Item::End(_) => {
                return Err(format!("{memory} bytes of memory came of {} announced", announced(&last)));
            }
        }
    }
}

/// Memory pieces of a migration written on the target's session thread
/// while it receives the next ones.
const WRITES_AHEAD: usize = 4;

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
    base: Option<u64>,
    host_regions: Arc<crate::host_regions::HostRegions>,
) -> std::io::Result<()> {
    let images: Arc<ImageCache> = shared.images.clone();
    let metrics = shared.metrics.clone();
    std::thread::Builder::new()
        .name(format!("gpupool-session-{id}"))
        .spawn(move || {
            thread::run(device, limits, staging, images, metrics, work, replies, ready, memory, base, host_regions)
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    //! The target's side of a pre-copy, on a real session thread over the
    //! emulated device, fed frames in memory.
    use super::*;
    use crate::device::BackendSession;
    use crate::device::emulated::EmulatedDevice;
    use bytes::Bytes;
    use gpupool_proto::v1::migrate_frame::Item;

    const G: u64 = crate::device::emulated::GRANULARITY;

    /// Frames the test hands over; tells when it waits for the next one.
    struct Script {
        rx: mpsc::Receiver<Bytes>,
        waiting: Arc<tokio::sync::Notify>,
    }

    impl FrameReceiver for Script {
        async fn recv_frame(&mut self, _max: usize) -> Result<Option<Bytes>, super::super::transport::RecvError> {
            if let Ok(f) = self.rx.try_recv() {
                return Ok(Some(f));
            }
            self.waiting.notify_one();
            Ok(self.rx.recv().await)
        }
    }

    /// A target's session thread (quota: 4 granules) at `base` or anywhere.
    struct Target {
        work: mpsc::Sender<Work>,
        thread: std::thread::JoinHandle<()>,
        base: u64,
        _replies: mpsc::Receiver<v1::BatchReply>,
    }

    async fn target(device: &Arc<EmulatedDevice>, base: Option<u64>) -> Target {
        let limits = SessionLimits {
            memory_quota: 4 * G,
            va_size: 16 * G,
            granularity: G,
            max_inline_bytes: 1 << 16,
            max_image_bytes: 1 << 20,
            max_handles: 8,
            max_listed_errors: 4,
            max_output_bytes: 1 << 20,
            compression: Compression::Off,
        };
        let (work, rx) = mpsc::channel(16);
        let (replies, replies_rx) = mpsc::channel(16);
        let (ready, ready_rx) = oneshot::channel();
        let (device, staging) = (device.clone(), Arc::new(Staging::new(1 << 24, 8)));
        let images = Arc::new(ImageCache::new(None, 1 << 20));
        let queue = WorkQueue { rx, spin: std::time::Duration::ZERO };
        let memory = crate::swap::SessionMemory::detached();
        let thread = std::thread::spawn(move || {
            thread::run(
                device,
                limits,
                staging,
                images,
                Arc::default(),
                queue,
                replies,
                ready,
                memory,
                base,
                Arc::default(),
            )
        });
        let (base, _) = ready_rx.await.expect("ready").expect("device session");
        Target { work, thread, base, _replies: replies_rx }
    }

    impl Target {
        /// Reads the session's memory on its thread, after what was queued.
        async fn read(&self, addr: u64, len: u64) -> Vec<u8> {
            let (tx, rx) = oneshot::channel();
            self.work.send(Work::ExportMemory(addr, len, tx)).await.expect("queued");
            rx.await.expect("answer").expect("read")
        }

        /// Ends the session (as `run_session` does after a refusal).
        fn end(self) {
            drop(self.work);
            self.thread.join().expect("session thread");
        }
    }

    fn frame(item: Item) -> Bytes {
        v1::MigrateFrame { item: Some(item) }.encode_to_vec().into()
    }

    fn maps(mappings: &[(u64, u64)]) -> Item {
        let calls =
            mappings.iter().map(|&(addr, size)| v1::Call { op: Some(v1::call::Op::MemMap(v1::MemMap { addr, size })) });
        Item::Calls(v1::Batch { seq: 0, calls: calls.collect() })
    }

    fn piece(addr: u64, byte: u8, len: u64) -> v1::MemChunk {
        v1::MemChunk { addr, data: vec![byte; len as usize].into() }
    }

    fn limits(max_precopy: u64) -> ImportLimits {
        ImportLimits {
            max_frame: 64 << 20,
            max_image: 1 << 20,
            max_images: 8,
            max_image_bytes: 1 << 20,
            max_precopy,
            granularity: G,
        }
    }

    fn precopy_in(base: u64, memory_bytes: u64) -> v1::MigrateIn {
        v1::MigrateIn { va_base: base, va_size: 16 * G, memory_bytes, precopy: true, ..Default::default() }
    }

    /// The mappings are created when announced and each pre-copied piece is
    /// on the device before the session stops; after the stop only the
    /// piece written since comes again, the other is named, and a mapping
    /// the session resized meanwhile is made again (the source's final
    /// calls unmap it first).
    #[tokio::test]
    async fn pre_copied_pieces_are_on_the_device_before_the_stop() {
        let device = Arc::new(EmulatedDevice::new(64 << 20));
        let t = target(&device, None).await;
        let base = t.base;
        let (tx, rx) = mpsc::channel(64);
        let waiting = Arc::new(tokio::sync::Notify::new());
        let mut script = Script { rx, waiting: waiting.clone() };
        let announced = [
            maps(&[(base, 2 * G), (base + 2 * G, G)]),
            Item::Precopy(piece(base, 1, G)),
            Item::Precopy(piece(base + G, 2, G)),
            Item::Precopy(piece(base + 2 * G, 8, G)),
        ];
        for item in announced {
            tx.send(frame(item)).await.expect("queued");
        }
        let (cache, staging) = (ImageCache::new(None, 1 << 20), Staging::new(1 << 24, 8));
        let m = precopy_in(base, 3 * G);
        let receiving = receive_session(&cache, &m, &mut script, &t.work, &staging, limits(3 * G));
        let driving = async {
            // Every frame so far was taken: the session has not stopped.
            waiting.notified().await;
            let before = t.read(base, 2 * G).await;
            assert!(before[..G as usize].iter().all(|&b| b == 1) && before[G as usize..].iter().all(|&b| b == 2));
            assert!(t.read(base + 2 * G, G).await.iter().all(|&b| b == 8));
            let last = v1::MigrateFinal { memory_bytes: 4 * G, received_seq: 7, ..Default::default() };
            let call = |op| v1::Call { op: Some(op) };
            let calls = vec![
                call(v1::call::Op::MemUnmap(v1::MemUnmap { addr: base + 2 * G })),
                call(v1::call::Op::MemMap(v1::MemMap { addr: base + 2 * G, size: 2 * G })),
            ];
            let rest = [
                Item::Final(last),
                Item::Calls(v1::Batch { seq: 0, calls }),
                Item::Precopied(v1::PieceRef { addr: base, size: G }),
                Item::Memory(piece(base + G, 3, G)),
                Item::Memory(piece(base + 2 * G, 5, 2 * G)),
                Item::End(v1::MigrateEnd {}),
            ];
            for item in rest {
                tx.send(frame(item)).await.expect("queued");
            }
        };
        let (received, ()) = tokio::join!(receiving, driving);
        let received = received.expect("the session arrives");
        assert_eq!((received.memory_bytes, received.precopied, received.received_seq), (4 * G, G, 7));
        let after = t.read(base, 2 * G).await;
        assert!(after[..G as usize].iter().all(|&b| b == 1) && after[G as usize..].iter().all(|&b| b == 3));
        assert!(t.read(base + 2 * G, 2 * G).await.iter().all(|&b| b == 5), "the resized mapping, whole");
        t.end();
    }

    /// A hostile or broken source: each case fails with its reason, never
    /// a panic, and once the session ends its mappings are released (the
    /// next case maps the whole device again at the same range).
    #[tokio::test]
    async fn a_pre_copy_refused_midway_leaves_nothing_mapped() {
        let device = Arc::new(EmulatedDevice::new(4 * G));
        let base = target(&device, None).await;
        let base = {
            let b = base.base;
            base.end();
            b
        };
        let whole = || maps(&[(base, 4 * G)]);
        let named = |addr, size| Item::Precopied(v1::PieceRef { addr, size });
        let last = || Item::Final(v1::MigrateFinal { memory_bytes: 4 * G, ..Default::default() });
        let stream = v1::Call { op: Some(v1::call::Op::StreamCreate(v1::StreamCreate::default())) };
        let bad_call = v1::Call { op: Some(v1::call::Op::MemUnmap(v1::MemUnmap { addr: base + 8 * G })) };
        let cases: Vec<(&str, Vec<Item>, &str)> = vec![
            ("out of range", vec![whole(), Item::Precopy(piece(base + 4 * G, 1, G))], "outside the mappings announced"),
            ("twice", vec![whole(), Item::Precopy(piece(base, 1, G)), Item::Precopy(piece(base, 1, G))], "twice"),
            (
                "overlapping",
                vec![whole(), Item::Precopy(piece(base, 1, 2 * G)), Item::Precopy(piece(base + G, 1, G))],
                "overlaps",
            ),
            (
                "named with another size",
                vec![whole(), Item::Precopy(piece(base, 1, 2 * G)), last(), named(base, G)],
                "sent with",
            ),
            (
                "named twice",
                vec![whole(), Item::Precopy(piece(base, 1, G)), last(), named(base, G), named(base, G)],
                "named twice",
            ),
            (
                "memory before the final frame",
                vec![whole(), Item::Memory(piece(base, 1, G))],
                "before the pre-copy's final",
            ),
            (
                "a call that is not a mapping",
                vec![Item::Calls(v1::Batch { seq: 0, calls: vec![stream] })],
                "mappings only",
            ),
            ("past the quota", vec![maps(&[(base, 6 * G)])], "call 0"),
            (
                "past the bytes agreed",
                vec![whole(), Item::Precopy(piece(base, 1, 2 * G)), Item::Precopy(piece(base + 2 * G, 1, G))],
                "bytes agreed",
            ),
            ("the source goes away", vec![whole(), Item::Precopy(piece(base, 1, G))], "ended the transfer early"),
            (
                "refused after the stop",
                vec![
                    whole(),
                    Item::Precopy(piece(base, 1, G)),
                    last(),
                    Item::Calls(v1::Batch { seq: 0, calls: vec![bad_call] }),
                ],
                "call 0",
            ),
        ];
        for (what, items, why) in cases {
            let t = target(&device, Some(base)).await;
            let (tx, rx) = mpsc::channel(64);
            for item in items {
                tx.send(frame(item)).await.expect("queued");
            }
            drop(tx);
            let mut script = Script { rx, waiting: Arc::default() };
            let (cache, staging) = (ImageCache::new(None, 1 << 20), Staging::new(1 << 24, 8));
            let m = precopy_in(base, 4 * G);
            let r = receive_session(&cache, &m, &mut script, &t.work, &staging, limits(2 * G)).await;
            let e = r.err().unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(e.contains(why), "{what}: {e}");
            t.end();
            // Released: the range is free and the whole device maps.
            let mut s = device.open_session_at(16 * G, base).unwrap_or_else(|e| panic!("{what}: range kept: {e}"));
            let mapping = s.map(base, 4 * G).unwrap_or_else(|e| panic!("{what}: memory kept: {e}"));
            drop(mapping);
        }
    }

    /// A source from before pieces were written on arrival announces no
    /// mappings: its pieces are kept and written when named.
    #[tokio::test]
    async fn a_source_that_announces_no_mappings_still_moves() {
        let device = Arc::new(EmulatedDevice::new(64 << 20));
        let t = target(&device, None).await;
        let base = t.base;
        let last = v1::MigrateFinal { memory_bytes: 2 * G, ..Default::default() };
        let items = [
            Item::Precopy(piece(base, 4, G)),
            Item::Precopy(piece(base + G, 5, G)),
            Item::Final(last),
            maps(&[(base, 2 * G)]),
            Item::Precopied(v1::PieceRef { addr: base, size: G }),
            Item::Memory(piece(base + G, 6, G)),
            Item::End(v1::MigrateEnd {}),
        ];
        let (tx, rx) = mpsc::channel(64);
        for item in items {
            tx.send(frame(item)).await.expect("queued");
        }
        let mut script = Script { rx, waiting: Arc::default() };
        let (cache, staging) = (ImageCache::new(None, 1 << 20), Staging::new(1 << 24, 8));
        let m = precopy_in(base, 2 * G);
        let r = receive_session(&cache, &m, &mut script, &t.work, &staging, limits(2 * G)).await;
        let received = r.expect("the session arrives");
        assert_eq!((received.memory_bytes, received.precopied), (2 * G, G));
        let after = t.read(base, 2 * G).await;
        assert!(after[..G as usize].iter().all(|&b| b == 4) && after[G as usize..].iter().all(|&b| b == 6));
        t.end();
    }
}
