//! Mapped host memory's device half (`MirrorAdd`, `MirrorRemove`).
//!
//! A program's mapped host memory (`cuMemHostAlloc` with DEVICEMAP,
//! `cuMemHostRegister` with DEVICEMAP) cannot be reached by a GPU in
//! another machine, so it lives twice: in the client, and in a range of one
//! of this session's mappings that kernels use. The client sends its host
//! writes as ordinary copies before later work; this side sends the
//! device's writes back with the reply of every batch that synchronizes.
//!
//! Each range keeps a shadow of what the client last saw, so a reply
//! carries only the 4 KiB chunks that changed, up to the inline limit per
//! reply; beyond it, only where they are (the client then copies them).
//! Bounded per session: [`MAX_MIRROR_BYTES`] in all, [`MAX_MIRRORS`] ranges.

use super::{CallOutcome, SessionState};
use crate::device::{ACCESS_READWRITE, BackendSession};
use crate::error::CallError;
use gpupool_proto::mirror::changed_runs;
use gpupool_proto::v1;
use std::collections::BTreeMap;

/// Mirrored bytes per session (the shadows are server memory).
pub(crate) const MAX_MIRROR_BYTES: u64 = 64 << 20;
/// Mirrored ranges per session.
pub(crate) const MAX_MIRRORS: usize = 1024;
/// The session's mirrored ranges by address.
#[derive(Debug, Default)]
pub(super) struct Mirrors {
    ranges: BTreeMap<u64, Vec<u8>>,
    bytes: u64,
}

impl Mirrors {
    pub(super) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The client wrote `data` at `addr`: what it sent is what it knows, so
    /// the shadows of the mirrored ranges it touches take it.
    pub(super) fn note_host_write(&mut self, addr: u64, data: &[u8]) {
        if self.ranges.is_empty() {
            return;
        }
        let end = addr.saturating_add(data.len() as u64);
        for (&start, shadow) in self.ranges.range_mut(..end) {
            if let Some((src, dst, n)) = gpupool_proto::mirror::overlap(addr, data.len(), start, shadow.len()) {
                shadow[dst..dst + n].copy_from_slice(&data[src..src + n]);
            }
        }
    }
}

impl<S: BackendSession> SessionState<S> {
    pub(super) fn mirror_add(&mut self, m: v1::MirrorAdd) -> CallOutcome {
        if m.size == 0 {
            return Err(CallError::invalid_value("a mirrored range needs a size"));
        }
        self.check_range(m.addr, m.size, ACCESS_READWRITE)?;
        let end = m.addr + m.size;
        let overlaps = self.mirrors.ranges.range(..end).next_back().is_some_and(|(&a, s)| a + s.len() as u64 > m.addr);
        if overlaps {
            return Err(CallError::invalid_value(format!("mirrored range at {:#x} overlaps another", m.addr)));
        }
        if self.mirrors.ranges.len() >= MAX_MIRRORS {
            return Err(CallError::out_of_memory(format!("a session mirrors at most {MAX_MIRRORS} ranges")));
        }
        if self.mirrors.bytes + m.size > MAX_MIRROR_BYTES {
            return Err(CallError::out_of_memory(format!(
                "a session mirrors at most {} MiB of mapped host memory",
                MAX_MIRROR_BYTES >> 20
            )));
        }
        let mut shadow = Vec::new();
        shadow
            .try_reserve_exact(m.size as usize)
            .map_err(|_| CallError::out_of_memory("cannot allocate the mirror's shadow"))?;
        shadow.resize(m.size as usize, 0);
        self.mirrors.ranges.insert(m.addr, shadow);
        self.mirrors.bytes += m.size;
        Ok(None)
    }

    pub(super) fn mirror_remove(&mut self, addr: u64) -> CallOutcome {
        let shadow = self
            .mirrors
            .ranges
            .remove(&addr)
            .ok_or_else(|| CallError::invalid_handle(format!("no mirrored range at {addr:#x}")))?;
        self.mirrors.bytes -= shadow.len() as u64;
        Ok(None)
    }

    /// The device's changes to every mirrored range since the client last
    /// saw them, read after a synchronizing call. A range whose memory is
    /// gone (unmapped under it) is dropped.
    pub(super) fn mirror_changes(&mut self) -> Vec<v1::MirrorData> {
        let mut out = Vec::new();
        let mut budget = self.limits.max_inline_bytes as usize;
        let addrs: Vec<u64> = self.mirrors.ranges.keys().copied().collect();
        for addr in addrs {
            let size = self.mirrors.ranges[&addr].len();
            let mut now = vec![0u8; size];
            // A read on the legacy stream would wait for other streams'
            // work; the synchronizing call already waited for what the
            // program waits for.
            let read = self
                .check_range(addr, size as u64, ACCESS_READWRITE)
                .and_then(|()| self.ensure_mirror_stream())
                .and_then(|()| self.dev.read(self.mirror_stream.as_ref(), addr, &mut now));
            if let Err(e) = read {
                tracing::debug!(addr = format_args!("{addr:#x}"), error = %e.message, "mirrored range dropped");
                let _ = self.mirror_remove(addr);
                continue;
            }
            let shadow = self.mirrors.ranges.get_mut(&addr).expect("listed above");
            for (offset, len) in changed_runs(shadow, &now) {
                shadow[offset..offset + len].copy_from_slice(&now[offset..offset + len]);
                let data = if len <= budget {
                    budget -= len;
                    now[offset..offset + len].to_vec().into()
                } else {
                    budget = 0;
                    Default::default()
                };
                out.push(v1::MirrorData { addr: addr + offset as u64, size: len as u64, data });
            }
        }
        out
    }

    /// The mirrored ranges as calls that re-create them on a migration's
    /// target, and their shadows (what the client last saw: the device's
    /// writes since then still have to reach it, from the target).
    pub(super) fn mirror_export(&self) -> (Vec<v1::call::Op>, Vec<(u64, Vec<u8>)>) {
        let calls = self
            .mirrors
            .ranges
            .iter()
            .map(|(&addr, s)| v1::call::Op::MirrorAdd(v1::MirrorAdd { addr, size: s.len() as u64 }));
        let shadows = self.mirrors.ranges.iter().map(|(&addr, s)| (addr, s.clone()));
        (calls.collect(), shadows.collect())
    }

    /// A migration's piece of a shadow: only inside a mirrored range the
    /// migration's calls re-created.
    pub fn import_mirror(&mut self, addr: u64, data: &[u8]) -> Result<(), CallError> {
        let outside = || CallError::invalid_value(format!("shadow piece at {addr:#x} is in no mirrored range"));
        let (&start, shadow) = self.mirrors.ranges.range_mut(..=addr).next_back().ok_or_else(outside)?;
        let offset = usize::try_from(addr - start).map_err(|_| outside())?;
        let end = offset.checked_add(data.len()).filter(|&e| e <= shadow.len()).ok_or_else(outside)?;
        shadow[offset..end].copy_from_slice(data);
        Ok(())
    }

    /// Creates the session's own non-blocking stream for reading mirrors.
    fn ensure_mirror_stream(&mut self) -> Result<(), CallError> {
        if self.mirror_stream.is_none() {
            self.mirror_stream = Some(self.dev.stream_create(1, 0)?); // CU_STREAM_NON_BLOCKING
        }
        Ok(())
    }
}
