//! Bulk transfers of a session, whatever carries them: a client puts the
//! chunks of a staged host-to-device copy and gets those of a staged
//! device-to-host copy; the session's batches move the staged bytes to and
//! from the device ([`crate::staging`]). A transport reads a request and
//! sends back what [`BulkService::answer`] returns.

use super::metrics::{Metrics, add};
use crate::error::CallError;
use crate::staging::Staging;
use bytes::Bytes;
use gpupool_proto::payload::{self, Compression};
use gpupool_proto::v1;
use prost::Message;
use std::sync::Arc;

/// Serves one session's bulk requests against its staging area.
#[derive(Debug)]
pub(crate) struct BulkService {
    staging: Arc<Staging>,
    metrics: Arc<Metrics>,
    /// Largest frame accepted; a chunk is at most half of it.
    max_frame_bytes: u32,
    compression: Compression,
    max_parallel: usize,
}

impl BulkService {
    pub(crate) fn new(
        staging: Arc<Staging>,
        metrics: Arc<Metrics>,
        max_frame_bytes: u32,
        compression: Compression,
        max_parallel: usize,
    ) -> Self {
        Self { staging, metrics, max_frame_bytes, compression, max_parallel }
    }

    /// Largest request frame accepted.
    pub(crate) fn max_request(&self) -> usize {
        self.max_frame_bytes as usize
    }

    /// Most requests served at once.
    pub(crate) fn max_parallel(&self) -> usize {
        self.max_parallel
    }

    /// The response to one request as the transport received it: the
    /// request's frame body, `None` when the client ended the request
    /// before sending it, or why it could not be read.
    pub(crate) fn answer(&self, request: Result<Option<Bytes>, impl std::fmt::Display>) -> v1::BulkResponse {
        let response = match request {
            Ok(Some(body)) => match v1::BulkRequest::decode(body) {
                Ok(req) => self.serve(req),
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

    fn serve(&self, req: v1::BulkRequest) -> Result<v1::BulkResponse, CallError> {
        let max = u64::from(self.max_frame_bytes);
        match req.op {
            Some(v1::bulk_request::Op::Put(p)) => {
                let data = p.data.ok_or_else(|| CallError::invalid_value("bulk put without data"))?;
                let bytes = payload::decode(data, max).map_err(|e| CallError::invalid_value(e.to_string()))?;
                self.staging.put(p.transfer_id, p.total_size, p.offset, &bytes)?;
                add(&self.metrics.bulk_bytes_in, bytes.len() as u64);
                Ok(v1::BulkResponse::default())
            }
            Some(v1::bulk_request::Op::Get(g)) => {
                if g.size > max / 2 {
                    return Err(CallError::invalid_value(format!(
                        "bulk get of {} bytes exceeds the chunk limit",
                        g.size
                    )));
                }
                let bytes = self.staging.get(g.transfer_id, g.offset, g.size)?;
                add(&self.metrics.bulk_bytes_out, bytes.len() as u64);
                Ok(v1::BulkResponse { error: None, data: Some(payload::encode(bytes, self.compression)) })
            }
            None => Err(CallError::invalid_value("bulk request without an operation")),
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

    #[test]
    fn puts_and_gets_staged_bytes_without_a_transport() {
        let bulk = service();
        let data = payload::encode(Bytes::from_static(b"abcdef"), Compression::Off);
        let put = v1::BulkPut { transfer_id: 3, total_size: 6, offset: 0, data: Some(data) };
        let r = bulk.answer(request(v1::bulk_request::Op::Put(put)));
        assert_eq!(r.error, None);
        assert_eq!(bulk.metrics.bulk_bytes_in.load(std::sync::atomic::Ordering::Relaxed), 6);
    }

    #[test]
    fn bad_requests_get_an_error_response() {
        let bulk = service();
        let requests: [Result<Option<Bytes>, String>; 4] =
            [Ok(None), Ok(Some(Bytes::from_static(&[0xff, 0xff]))), Ok(Some(Bytes::new())), Err("truncated".into())];
        for request in requests {
            let r = bulk.answer(request);
            assert_eq!(r.error.map(|e| e.code), Some(gpupool_proto::cuda::INVALID_VALUE));
        }
        let get = v1::BulkGet { transfer_id: 1, offset: 0, size: 1 << 20 };
        let r = bulk.answer(request(v1::bulk_request::Op::Get(get)));
        assert!(r.error.expect("refused").message.contains("chunk limit"));
        assert_eq!(bulk.metrics.frames_rejected.load(std::sync::atomic::Ordering::Relaxed), 5);
    }
}
