//! CUDA IPC events between sessions (docs/ipc.md): an export is
//! registered with the supervisor ([`crate::ipc`]), which alone knows the
//! session's tenant, and the handle the program passes on names it.

use super::{CallOutcome, SessionState, new_id, unknown_event};
use crate::device::BackendSession;
use crate::error::CallError;
use gpupool_proto::ipc::{Handle, Kind};
use gpupool_proto::v1::{self, call_result::Value};

impl<S: BackendSession> SessionState<S> {
    /// `cuIpcGetEventHandle`.
    pub(super) fn ipc_event_export(&mut self, event: u32) -> CallOutcome {
        let remote = crate::ipc::remote().ok_or_else(crate::ipc::unavailable)?;
        let e = self.events.get(&event).ok_or_else(|| unknown_event(event))?;
        let driver = self.dev.event_ipc_export(e)?;
        let id = remote.export_event(&driver)?;
        self.ipc_shared = true;
        Ok(Some(Value::IpcHandle(Handle::event(id).encode().to_vec().into())))
    }

    /// `cuIpcOpenEventHandle`.
    pub(super) fn ipc_event_open(&mut self, open: v1::IpcEventOpen) -> CallOutcome {
        let remote = crate::ipc::remote().ok_or_else(crate::ipc::unavailable)?;
        let handle = Handle::parse(&open.handle).map_err(CallError::invalid_value)?;
        if handle.kind != Kind::Event {
            return Err(CallError::invalid_value("a memory IPC handle is not an event's"));
        }
        new_id(&self.events, open.event, "event", self.limits.max_handles)?;
        let driver = remote.resolve_event(&handle.id)?;
        let event = self.dev.event_ipc_open(&driver)?;
        self.events.insert(open.event, event);
        self.ipc_shared = true;
        Ok(None)
    }
}
