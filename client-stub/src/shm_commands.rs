//! A session's commands through shared memory, for a client on its
//! server's host (the `gpupool-shm` crate's [`Ring`]; docs/transport.md,
//! "Commands in shared memory").
//!
//! When the session has a shared-memory attachment and its `Welcome` says
//! `shm_commands`, the client makes a ring (a sealed memfd of two byte
//! pipes), attaches it over the attachment's socket before its first batch,
//! and from then on writes its batches into one pipe and reads the replies
//! from the other, as frames. A waiting thread spins for the process's
//! spin budget (`GPUPOOL_SPIN_US`, see `crate::wait`), then sleeps on the
//! pipe's futex word, in slices, looking at the QUIC connection and the
//! ring's close words between them: no core is spent while idle.
//!
//! QUIC stays the control connection and the fallback. A refused or failed
//! attach keeps the commands on QUIC (logged at `info`). A ring that ends
//! later (the server closed it: the session ended, moved, or its process
//! gave it up; or the QUIC connection closed) is a lost attachment: the
//! client gives the ring up and waits on QUIC, whose close (with where to
//! resume) [`QuicTransport`]'s resume meets, sending again the batches it
//! had no reply for. It stays on QUIC, also after a migration.

use crate::config::ClientConfig;
use crate::error::{ClientError, Result};
use crate::transport::{MAX_REPLY_FRAME, PinnedCopy, QuicTransport, Transport};
use bytes::Bytes;
use gpupool_proto::{frame, v1};
use gpupool_shm::ring::{DEFAULT_CAPACITY, Reader, Ring, Side, Writer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest sleep of a waiting thread before it looks at the connections.
const SLEEP_SLICE: Duration = Duration::from_millis(50);

/// The session's transport: QUIC, with its commands moved to a ring when
/// both ends can.
pub(crate) fn wrap(quic: QuicTransport, config: &ClientConfig) -> Box<dyn Transport> {
    if !config.shm_commands || !quic.welcome().shm_commands {
        return Box::new(quic);
    }
    let ring = match quic.attach_shm_commands(DEFAULT_CAPACITY) {
        None => return Box::new(quic),
        Some(Ok(ring)) => ring,
        Some(Err(e)) => {
            // The server reads the first batch from QUIC then.
            tracing::info!(error = %e, "no command ring; the session's commands stay on QUIC");
            return Box::new(quic);
        }
    };
    tracing::debug!(bytes = ring.len(), "the session's commands go through shared memory");
    let channel = Channel {
        resumes: quic.resumes(),
        writer: Mutex::new(ring.writer(Side::Client)),
        reader: Mutex::new(ring.reader(Side::Client)),
        ring,
    };
    Box::new(ShmCommandTransport {
        quic,
        channel: Mutex::new(Some(Arc::new(channel))),
        spin: crate::wait::spin_budget(),
        reply_timeout: config.reply_timeout,
    })
}

/// A session whose commands go through shared memory, with QUIC as its
/// control connection and fallback.
#[derive(Debug)]
pub(crate) struct ShmCommandTransport {
    quic: QuicTransport,
    /// The ring; `None` once it ended (the session is on QUIC then).
    channel: Mutex<Option<Arc<Channel>>>,
    spin: Duration,
    reply_timeout: Duration,
}

#[derive(Debug)]
struct Channel {
    /// The session's resumes when the ring was attached: any later one
    /// (over QUIC, after a loss met by a copy) left the ring behind.
    resumes: u64,
    ring: Arc<Ring>,
    writer: Mutex<Writer>,
    reader: Mutex<Reader>,
}

fn lost(what: impl std::fmt::Display) -> ClientError {
    ClientError::ConnectionLost(format!("command ring: {what}"))
}

impl ShmCommandTransport {
    fn channel(&self) -> Option<Arc<Channel>> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why waiting on the ring is pointless now: it was closed (by the
    /// server, or by this side failing over), or QUIC closed.
    fn gone(&self, ch: &Channel) -> Option<ClientError> {
        if self.quic.resumes() != ch.resumes {
            return Some(lost("the session resumed on QUIC"));
        }
        if ch.ring.closed(Side::Server).is_some() {
            return Some(lost("closed by the server"));
        }
        if ch.ring.closed(Side::Client).is_some() {
            return Some(lost("given up"));
        }
        (!self.quic.links_open()).then(|| lost("the session's QUIC connection closed"))
    }

    /// The ring is gone: the session goes on over QUIC. Its side is closed
    /// as broken, so that a server still reading the ring closes QUIC
    /// ("resume here"); a server that closed the ring closes QUIC itself
    /// (the session ended, or moved, or lost it). Either way the next wait
    /// on QUIC meets that close and resumes the session there (or follows
    /// it), sending again every batch without a reply, those written into
    /// the ring included. No wait here: a move may take longer than a
    /// connect timeout, and the reply wait on QUIC is bounded already.
    fn fail_over(&self, error: &ClientError) {
        let Some(channel) = self.channel.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            // Another thread failed over already.
            return;
        };
        tracing::info!(reason = %error, "the command ring ended; the session goes on over QUIC");
        channel.ring.close(Side::Client, false);
    }

    /// The next reply's body from the ring, within the reply timeout.
    fn receive(&self, ch: &Channel) -> Result<Vec<u8>> {
        let mut reader = ch.reader.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            if self.quic.resumes() != ch.resumes {
                // What the ring still holds, a resume sends again on QUIC.
                return Err(lost("the session resumed on QUIC"));
            }
            if let Some(body) = reader.try_frame(MAX_REPLY_FRAME).map_err(lost)? {
                return Ok(body);
            }
            if let Some(e) = self.gone(ch) {
                return Err(e);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(self.reply_timeout));
            }
            reader.wait_readable(self.spin, SLEEP_SLICE.min(deadline - now));
        }
    }
}

impl Transport for ShmCommandTransport {
    fn welcome(&self) -> &v1::Welcome {
        self.quic.welcome()
    }

    fn send_batch(&self, batch: &v1::Batch) -> Result<()> {
        let Some(ch) = self.channel() else { return self.quic.send_batch(batch) };
        let bytes = frame::encode(batch);
        // Kept for a resume, which sends it again over QUIC; after one (the
        // ring was left behind) it goes over QUIC now.
        if !self.quic.record_unless_resumed(batch.seq, bytes.clone(), ch.resumes) {
            self.fail_over(&lost("the session resumed on QUIC"));
            return self.quic.send_batch(batch);
        }
        if ch.ring.closed(Side::Server).is_some() {
            // Resumed on QUIC, the batch goes with the others not answered.
            self.fail_over(&lost("closed by the server"));
            return Ok(());
        }
        let deadline = Instant::now() + self.reply_timeout;
        let written = ch.writer.lock().unwrap_or_else(|e| e.into_inner()).write_all(
            &bytes,
            self.spin,
            SLEEP_SLICE,
            deadline,
            || self.gone(&ch).map(|e| gpupool_shm::ShmError::Protocol(e.to_string())),
        );
        if let Err(e) = written {
            // As above: the batch is in the replay log.
            self.fail_over(&lost(e));
        }
        Ok(())
    }

    fn recv_reply(&self) -> Result<v1::BatchReply> {
        while let Some(ch) = self.channel() {
            match self.receive(&ch) {
                Ok(body) => {
                    if let Some(reply) = self.quic.reply_of(Bytes::from(body))? {
                        return Ok(reply);
                    }
                }
                Err(e @ ClientError::ConnectionLost(_)) => {
                    self.fail_over(&e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        self.quic.recv_reply()
    }

    fn try_recv_reply(&self) -> Option<Result<v1::BatchReply>> {
        let Some(ch) = self.channel() else { return self.quic.try_recv_reply() };
        if self.quic.resumes() != ch.resumes {
            // Met by the next blocking read.
            return None;
        }
        let mut reader = ch.reader.try_lock().ok()?;
        // A broken ring is met by the next blocking read.
        let body = reader.try_frame(MAX_REPLY_FRAME).ok()??;
        drop(reader);
        self.quic.reply_of(Bytes::from(body)).transpose()
    }

    fn bulk_put(&self, id: u64, data: &[u8]) -> Result<()> {
        self.quic.bulk_put(id, data)
    }

    fn bulk_get(&self, id: u64, out: &mut [u8]) -> Result<()> {
        self.quic.bulk_get(id, out)
    }

    fn close(&self) {
        if let Some(ch) = self.channel.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // The session ends: the server's side sees a clean close.
            ch.ring.close(Side::Client, true);
        }
        self.quic.close();
    }

    fn close_at_exit(&self, limit: Duration) {
        if let Some(ch) = self.channel.lock().unwrap_or_else(|e| e.into_inner()).take() {
            ch.ring.close(Side::Client, true);
        }
        self.quic.close_at_exit(limit);
    }

    fn bulk_connections(&self) -> usize {
        self.quic.bulk_connections()
    }

    fn shared_memory_bytes(&self) -> Option<u64> {
        self.quic.shared_memory_bytes()
    }

    fn pinned_alloc(&self, size: usize) -> Option<usize> {
        self.quic.pinned_alloc(size)
    }

    fn pinned_free(&self, ptr: usize) -> bool {
        self.quic.pinned_free(ptr)
    }

    fn pinned_copy(&self, addr: usize, len: usize, copy: PinnedCopy<'_>) -> Result<()> {
        self.quic.pinned_copy(addr, len, copy)
    }

    fn is_pinned(&self, ptr: usize) -> bool {
        self.quic.is_pinned(ptr)
    }

    fn pinned_device_addressable(&self, ptr: usize, len: usize) -> bool {
        self.quic.pinned_device_addressable(ptr, len)
    }

    fn host_region(&self, ptr: usize, len: usize, batch: Option<u64>) -> Option<v1::HostRegionRef> {
        // Noted first, then the revocation looked at (gpupool_shm::ring):
        // a server about to move the session runs every batch up to the
        // last one noted before it stops. Without the ring (it ended) no
        // call names a region: a server moving the session could not know.
        if let Some(seq) = batch {
            let channel = self.channel()?;
            if !channel.ring.region_batch(seq) {
                return None;
            }
        }
        self.quic.host_region(ptr, len, batch)
    }

    fn shm_commands_attached(&self) -> bool {
        self.channel().is_some()
    }
}
