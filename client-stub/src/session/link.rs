//! The JIT linker on a [`Session`]: the inputs an application collected
//! with `cuLinkAddData`/`cuLinkAddFile` go to the server in one `JitLink`
//! call (large ones first over bulk streams, like large module images);
//! the linked cubin and both logs come back.

use super::Session;
use crate::error::{ClientError, Result};
use bytes::Bytes;
use gpupool_proto::payload;
use gpupool_proto::v1::{self, call::Op, call_result::Value, jit_link_input, jit_link_result};

/// Largest linked image accepted back from the server.
const MAX_CUBIN_BYTES: u64 = 1 << 30;

/// One input of a link (`cuLinkAddData`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitInput {
    /// A `CUjitInputType`.
    pub kind: u32,
    pub name: String,
    pub data: Bytes,
    /// Scalar `CUjit_option`s of this input: (option, value).
    pub options: Vec<(u32, u64)>,
}

/// A whole link (`cuLinkCreate` .. `cuLinkComplete`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JitLinkRequest {
    /// Scalar `CUjit_option`s of the linker: (option, value).
    pub options: Vec<(u32, u64)>,
    pub inputs: Vec<JitInput>,
    /// Sizes of the application's log buffers (0: no log wanted).
    pub info_log_bytes: u32,
    pub error_log_bytes: u32,
}

/// What the server's driver made of a link.
#[derive(Debug, Clone, PartialEq)]
pub struct JitLinkOutput {
    /// The linked cubin, or the driver's refusal.
    pub cubin: Result<Vec<u8>>,
    pub info_log: Vec<u8>,
    pub error_log: Vec<u8>,
    pub wall_time_ms: f32,
    /// `CU_JIT_THREADS_PER_BLOCK` as the driver wrote it back (0: not asked).
    pub threads_per_block: u32,
}

fn options(options: &[(u32, u64)]) -> Vec<v1::JitOption> {
    options.iter().map(|&(option, value)| v1::JitOption { option, value }).collect()
}

impl Session {
    /// Links `request` on the server. `Err` when the call itself fails
    /// (a bad request, a device that cannot link: no logs); a link the
    /// driver refuses is `Ok` with `cubin` the error and the logs.
    pub fn jit_link(&self, request: JitLinkRequest) -> Result<JitLinkOutput> {
        let mut st = self.lock();
        Self::check_alive(&st)?;
        let max_inline = u64::from(self.inner.welcome.max_inline_bytes);
        let mut inline_bytes = 0u64;
        let mut inputs = Vec::with_capacity(request.inputs.len());
        for input in request.inputs {
            let size = input.data.len() as u64;
            // Small inputs ride in the call while they fit one inline copy's
            // budget together; the others are uploaded first.
            let data = if inline_bytes + size <= max_inline {
                inline_bytes += size;
                jit_link_input::Data::Inline(payload::encode(input.data, self.inner.compression))
            } else {
                let transfer_id = st.next_transfer;
                st.next_transfer += 1;
                self.inner.transport.bulk_put(transfer_id, &input.data).map_err(|e| Self::mark_dead(&mut st, e))?;
                jit_link_input::Data::Staged(v1::StagedRef { transfer_id, size })
            };
            inputs.push(v1::JitLinkInput {
                r#type: input.kind,
                name: input.name,
                data: Some(data),
                options: options(&input.options),
            });
        }
        let op = Op::JitLink(v1::JitLink {
            options: options(&request.options),
            inputs,
            info_log_bytes: request.info_log_bytes,
            error_log_bytes: request.error_log_bytes,
        });
        let Some(Value::JitLink(r)) = self.call(&mut st, op)? else {
            return Err(ClientError::Protocol("the link returned no result".into()));
        };
        let cubin = match (r.code, r.cubin) {
            (0, Some(jit_link_result::Cubin::Inline(p))) => payload::decode(p, MAX_CUBIN_BYTES)
                .map(|b| b.to_vec())
                .map_err(|e| ClientError::Protocol(e.to_string()))?,
            (0, Some(jit_link_result::Cubin::Staged(s))) if s.size <= MAX_CUBIN_BYTES => {
                let mut out = vec![0u8; s.size as usize];
                self.inner.transport.bulk_get(s.transfer_id, &mut out).map_err(|e| Self::mark_dead(&mut st, e))?;
                out
            }
            (0, other) => return Err(ClientError::Protocol(format!("the link returned no usable image: {other:?}"))),
            (code, _) => {
                return Ok(JitLinkOutput {
                    cubin: Err(ClientError::Cuda { code, message: r.message }),
                    info_log: r.info_log.to_vec(),
                    error_log: r.error_log.to_vec(),
                    wall_time_ms: r.wall_time_ms,
                    threads_per_block: r.threads_per_block,
                });
            }
        };
        Ok(JitLinkOutput {
            cubin: Ok(cubin),
            info_log: r.info_log.to_vec(),
            error_log: r.error_log.to_vec(),
            wall_time_ms: r.wall_time_ms,
            threads_per_block: r.threads_per_block,
        })
    }
}
