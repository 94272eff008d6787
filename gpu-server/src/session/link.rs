//! The JIT linker (`JitLink`): the inputs an application gave
//! `cuLinkAddData`/`cuLinkAddFile`, linked in one call by the device's
//! driver. Every input is bounded (count, bytes, options) before anything
//! is decoded or taken from staging; the result carries the driver's code
//! and both logs, so a refused link still tells the application why.

use super::{CallOutcome, SessionState};
use crate::device::{BackendSession, LinkInput, LinkRequest, link_option_is_scalar};
use crate::error::CallError;
use bytes::Bytes;
use gpupool_proto::payload;
use gpupool_proto::v1::{self, call_result::Value, jit_link_input, jit_link_result};

/// Most inputs one link may have.
pub(crate) const MAX_LINK_INPUTS: usize = 256;
/// Most options of the linker or of one input.
pub(crate) const MAX_LINK_OPTIONS: usize = 64;
/// Largest log buffer the server fills (the application's buffer may be
/// larger; logs are cut here).
pub(crate) const MAX_LOG_BYTES: u32 = 1 << 20;
/// Longest input name.
const MAX_NAME_BYTES: usize = 4096;
/// One past the last `CUjitInputType` (`CU_JIT_INPUT_NVVM` = 5).
const INPUT_TYPES: u32 = 6;

fn check_options(options: &[v1::JitOption], whose: &str) -> Result<Vec<(u32, u64)>, CallError> {
    if options.len() > MAX_LINK_OPTIONS {
        return Err(CallError::invalid_value(format!(
            "{whose} has {} JIT options, more than {MAX_LINK_OPTIONS}",
            options.len()
        )));
    }
    options
        .iter()
        .map(|o| {
            if link_option_is_scalar(o.option) {
                Ok((o.option, o.value))
            } else {
                Err(CallError::invalid_value(format!("{whose}: JIT option {} is not a plain value", o.option)))
            }
        })
        .collect()
}

impl<S: BackendSession> SessionState<S> {
    pub(super) fn jit_link(&mut self, l: v1::JitLink) -> CallOutcome {
        if l.inputs.len() > MAX_LINK_INPUTS {
            return Err(CallError::invalid_value(format!(
                "a link of {} inputs exceeds the limit of {MAX_LINK_INPUTS}",
                l.inputs.len()
            )));
        }
        let options = check_options(&l.options, "the linker")?;
        // Everything is checked before any input is decoded or taken.
        let limit = self.limits.max_image_bytes;
        let mut declared: u64 = 0;
        for (i, input) in l.inputs.iter().enumerate() {
            let size = match &input.data {
                Some(jit_link_input::Data::Inline(p)) => p.raw_len,
                Some(jit_link_input::Data::Staged(s)) => s.size,
                None => return Err(CallError::invalid_value(format!("link input {i} has no data"))),
            };
            declared = declared.saturating_add(size);
            if input.r#type >= INPUT_TYPES {
                return Err(CallError::invalid_value(format!("link input {i}: unknown input type {}", input.r#type)));
            }
            if input.name.len() > MAX_NAME_BYTES {
                return Err(CallError::invalid_value(format!("link input {i}: name longer than {MAX_NAME_BYTES}")));
            }
            check_options(&input.options, &format!("link input {i}"))?;
        }
        if declared > limit {
            return Err(CallError::invalid_value(format!(
                "link inputs of {declared} bytes exceed the limit of {limit}"
            )));
        }

        let mut inputs = Vec::with_capacity(l.inputs.len());
        let mut left = limit;
        for (i, input) in l.inputs.into_iter().enumerate() {
            let data: Bytes = match input.data {
                Some(jit_link_input::Data::Inline(p)) => {
                    payload::decode(p, left).map_err(|e| CallError::invalid_value(format!("link input {i}: {e}")))?
                }
                Some(jit_link_input::Data::Staged(s)) => self.staging.take_upload(s.transfer_id, s.size)?,
                None => return Err(CallError::invalid_value(format!("link input {i} has no data"))),
            };
            left = left.saturating_sub(data.len() as u64);
            inputs.push(LinkInput {
                kind: input.r#type,
                name: input.name,
                data,
                options: check_options(&input.options, "link input")?,
            });
        }
        let request = LinkRequest {
            options,
            inputs,
            info_log_bytes: l.info_log_bytes.min(MAX_LOG_BYTES) as usize,
            error_log_bytes: l.error_log_bytes.min(MAX_LOG_BYTES) as usize,
        };
        let out = self.dev.link(&request)?;
        let (code, message, cubin) = match out.cubin {
            Ok(image) => {
                let image = Bytes::from(image);
                let cubin = if image.len() as u64 <= self.limits.max_inline_bytes {
                    jit_link_result::Cubin::Inline(payload::encode(image, self.limits.compression))
                } else {
                    let size = image.len() as u64;
                    let room = self.staging.room(size)?;
                    let id = self.staging.add_download_bytes(room, image);
                    jit_link_result::Cubin::Staged(v1::StagedRef { transfer_id: id, size })
                };
                (0, String::new(), Some(cubin))
            }
            Err(e) => (e.code, e.message, None),
        };
        Ok(Some(Value::JitLink(v1::JitLinkResult {
            code,
            message,
            cubin,
            info_log: out.info_log.into(),
            error_log: out.error_log.into(),
            wall_time_ms: out.wall_time_ms,
            threads_per_block: out.threads_per_block,
        })))
    }
}
