//! Bulk transfers of a session, whatever carries them: a client puts the
//! chunks of a staged host-to-device copy and gets those of a staged
//! device-to-host copy; the session's batches move the staged bytes to and
//! from the device ([`crate::staging`]). A transport reads a request and
//! sends back what [`BulkService::answer`] returns.
//!
//! Over QUIC a session may also carry its bulk transfers on extra
//! connections to the server's bulk endpoints, one core each: the
//! [`Registry`] lets such a connection attach to its session with the
//! session's bulk secret, and closes them when the session ends.

use super::metrics::{Metrics, add};
use crate::auth::constant_time_eq;
use crate::error::CallError;
use crate::staging::Staging;
use bytes::Bytes;
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::{close_code, v1};
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Serves one session's bulk requests against its staging area.
#[derive(Debug)]
pub(crate) struct BulkService {
    staging: Arc<Staging>,
    metrics: Arc<Metrics>,
    /// Largest frame accepted; a chunk is at most half of it.
    max_frame_bytes: u32,
    compression: Compression,
    /// Requests served at once, over all of the session's connections.
    parallel: Arc<Semaphore>,
}

impl BulkService {
    pub(crate) fn new(
        staging: Arc<Staging>,
        metrics: Arc<Metrics>,
        max_frame_bytes: u32,
        compression: Compression,
        max_parallel: usize,
    ) -> Self {
        Self { staging, metrics, max_frame_bytes, compression, parallel: Arc::new(Semaphore::new(max_parallel)) }
    }

    /// Largest request frame accepted.
    pub(crate) fn max_request(&self) -> usize {
        self.max_frame_bytes as usize
    }

    /// A turn to serve one request; the session's connections share them.
    pub(crate) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.parallel.clone().acquire_owned().await.ok()
    }

    /// The response to one request as the transport received it: the
    /// request's frame body, `None` when the client ended the request
    /// before sending it, or why it could not be read. A put waits here
    /// (a bounded time) for room under the host's staging cap.
    pub(crate) async fn answer(&self, request: Result<Option<Bytes>, impl std::fmt::Display>) -> v1::BulkResponse {
        let response = match request {
            Ok(Some(body)) => match v1::BulkRequest::decode(body) {
                Ok(req) => self.serve(req).await,
                Err(e) => Err(CallError::invalid_value(format!("malformed bulk request: {e}"))),
            },
            Ok(None) => Err(CallError::invalid_value("bulk stream ended before its request")),
            Err(e) => Err(CallError::invalid_value(format!("malformed bulk request: {e}"))),
        };
        response.unwrap_or_else(|e| {
            add(&self.metrics.frames_rejected, 1);
            v1::BulkResponse { error: Some(v1::CallError { index: 0, code: e.code, message: e.message }), data: None }
        })
    }

    /// Largest chunk of one put or get.
    pub(crate) fn max_chunk(&self) -> usize {
        self.max_frame_bytes as usize / 2
    }

    /// Stages `bytes` at `offset` of upload `id` of `total` bytes; waits
    /// for room under the host's cap blocking the calling thread (a
    /// transport's own).
    pub(crate) fn put(&self, id: u64, total: u64, offset: u64, bytes: Bytes) -> Result<(), CallError> {
        let len = bytes.len() as u64;
        self.staging.put(id, total, offset, bytes)?;
        add(&self.metrics.bulk_bytes_in, len);
        Ok(())
    }

    /// [`BulkService::put`] for a task.
    async fn put_async(&self, id: u64, total: u64, offset: u64, bytes: Bytes) -> Result<(), CallError> {
        let len = bytes.len() as u64;
        self.staging.put_async(id, total, offset, bytes).await?;
        add(&self.metrics.bulk_bytes_in, len);
        Ok(())
    }

    /// `size` bytes at `offset` of staged download `id`.
    pub(crate) fn get(&self, id: u64, offset: u64, size: u64) -> Result<Bytes, CallError> {
        if size > self.max_chunk() as u64 {
            return Err(CallError::invalid_value(format!("bulk get of {size} bytes exceeds the chunk limit")));
        }
        let bytes = self.staging.get(id, offset, size)?;
        add(&self.metrics.bulk_bytes_out, bytes.len() as u64);
        Ok(bytes)
    }

    /// The counters, for a transport's own.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    async fn serve(&self, req: v1::BulkRequest) -> Result<v1::BulkResponse, CallError> {
        let max = u64::from(self.max_frame_bytes);
        match req.op {
            Some(v1::bulk_request::Op::Put(p)) => {
                let data = p.data.ok_or_else(|| CallError::invalid_value("bulk put without data"))?;
                let bytes = payload::decode(data, max).map_err(|e| CallError::invalid_value(e.to_string()))?;
                // A slice of the received frame: staged without a copy.
                self.put_async(p.transfer_id, p.total_size, p.offset, bytes).await?;
                Ok(v1::BulkResponse::default())
            }
            Some(v1::bulk_request::Op::Get(g)) => {
                let bytes = self.get(g.transfer_id, g.offset, g.size)?;
                Ok(v1::BulkResponse { error: None, data: Some(payload::encode(bytes, self.compression)) })
            }
            None => Err(CallError::invalid_value("bulk request without an operation")),
        }
    }
}

/// Sessions whose client may attach extra bulk connections, by session id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// The bulk endpoints' UDP ports, offered in each `Welcome`.
    ports: Vec<u16>,
    sessions: Mutex<HashMap<u64, Attachable>>,
}

#[derive(Debug)]
struct Attachable {
    secret: String,
    service: Arc<BulkService>,
    /// The attached connections by index; a new one replaces the old.
    links: Vec<Option<quinn::Connection>>,
    /// No connection may attach (the session is moving).
    frozen: bool,
}

impl Registry {
    /// A registry offering the bulk endpoints on `ports` (none: sessions
    /// get no extra connections).
    pub(crate) fn new(ports: Vec<u16>) -> Self {
        Self { ports, sessions: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Attachable>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes session `id`'s bulk transfers reachable on the bulk endpoints
    /// until the returned slot drops.
    pub(crate) fn register(&self, id: u64, service: Arc<BulkService>) -> BulkSlot<'_> {
        if self.ports.is_empty() {
            return BulkSlot { registry: self, id, secret: String::new() };
        }
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let entry = Attachable { secret: secret.clone(), service, links: vec![None; self.ports.len()], frozen: false };
        self.lock().insert(id, entry);
        BulkSlot { registry: self, id, secret }
    }

    /// Attaches `conn` as bulk connection `attach.index` of its session when
    /// the secret is the session's (compared in constant time); returns the
    /// session's bulk service, or why not. An earlier connection with the
    /// same index is closed: a session has at most one per bulk endpoint.
    pub(crate) fn attach(&self, attach: &v1::BulkAttach, conn: &quinn::Connection) -> Result<Arc<BulkService>, String> {
        let mut sessions = self.lock();
        let refused = || format!("no session {} takes bulk connections with this secret", attach.session_id);
        let entry = sessions.get_mut(&attach.session_id).ok_or_else(refused)?;
        if entry.secret.is_empty() || !constant_time_eq(entry.secret.as_bytes(), attach.secret.as_bytes()) {
            return Err(refused());
        }
        if entry.frozen {
            return Err(format!("session {} is moving: no bulk connection attaches now", attach.session_id));
        }
        let slot = entry
            .links
            .get_mut(attach.index as usize)
            .ok_or_else(|| format!("bulk connection index {} out of range", attach.index))?;
        if let Some(old) = slot.replace(conn.clone()) {
            old.close(close_code::NORMAL.into(), b"replaced by a new bulk connection");
        }
        Ok(entry.service.clone())
    }
}

/// Session `id`'s entry in the [`Registry`]: unregistered on drop, which
/// also closes its bulk connections (their tasks then end and free what
/// they held of the session's staging).
#[derive(Debug)]
pub(crate) struct BulkSlot<'a> {
    registry: &'a Registry,
    id: u64,
    secret: String,
}

impl BulkSlot<'_> {
    /// The bulk endpoints' ports and the secret for the session's
    /// `Welcome` (none and empty when the server has no bulk endpoints).
    pub(crate) fn offer(&self) -> (Vec<u32>, String) {
        if self.secret.is_empty() {
            return (Vec::new(), String::new());
        }
        (self.registry.ports.iter().map(|&p| u32::from(p)).collect(), self.secret.clone())
    }

    /// Closes the bulk connections attached now (the session stops for a
    /// migration: no upload may land here after its staged ones were read
    /// out; the client puts again where the session goes, or here again
    /// after it reattached when the migration failed).
    pub(crate) fn close_links(&self) {
        let mut sessions = self.registry.lock();
        let links = sessions.get_mut(&self.id).map(|e| {
            e.frozen = true;
            e.links.iter_mut().filter_map(Option::take).collect::<Vec<_>>()
        });
        for conn in links.into_iter().flatten() {
            conn.close(close_code::NORMAL.into(), b"the session is moving");
        }
    }

    /// Lets bulk connections attach again (the migration failed: the
    /// session stays here).
    pub(crate) fn reopen(&self) {
        if let Some(e) = self.registry.lock().get_mut(&self.id) {
            e.frozen = false;
        }
    }
}

impl Drop for BulkSlot<'_> {
    fn drop(&mut self) {
        if self.secret.is_empty() {
            return;
        }
        let entry = self.registry.lock().remove(&self.id);
        for conn in entry.into_iter().flat_map(|e| e.links).flatten() {
            conn.close(close_code::NORMAL.into(), b"session ended");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> BulkService {
        let staging = Arc::new(Staging::new(1 << 20, 4));
        BulkService::new(staging, Arc::default(), 1 << 20, Compression::Off, 4)
    }

    fn request(op: v1::bulk_request::Op) -> Result<Option<Bytes>, String> {
        Ok(Some(v1::BulkRequest { op: Some(op) }.encode_to_vec().into()))
    }

    #[tokio::test]
    async fn puts_and_gets_staged_bytes_without_a_transport() {
        let bulk = service();
        let data = payload::encode(Bytes::from_static(b"abcdef"), Compression::Off);
        let put = v1::BulkPut { transfer_id: 3, total_size: 6, offset: 0, data: Some(data) };
        let r = bulk.answer(request(v1::bulk_request::Op::Put(put))).await;
        assert_eq!(r.error, None);
        assert_eq!(bulk.metrics.bulk_bytes_in.load(std::sync::atomic::Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn bad_requests_get_an_error_response() {
        let bulk = service();
        let requests: [Result<Option<Bytes>, String>; 4] =
            [Ok(None), Ok(Some(Bytes::from_static(&[0xff, 0xff]))), Ok(Some(Bytes::new())), Err("truncated".into())];
        for request in requests {
            let r = bulk.answer(request).await;
            assert_eq!(r.error.map(|e| e.code), Some(gpupool_proto::cuda::INVALID_VALUE));
        }
        let get = v1::BulkGet { transfer_id: 1, offset: 0, size: 1 << 20 };
        let r = bulk.answer(request(v1::bulk_request::Op::Get(get))).await;
        assert!(r.error.expect("refused").message.contains("chunk limit"));
        assert_eq!(bulk.metrics.frames_rejected.load(std::sync::atomic::Ordering::Relaxed), 5);
    }
}
