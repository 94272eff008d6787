//! CUDA IPC between sessions of one tenant on one server (docs/ipc.md).
//!
//! A program exports an event (`cuIpcGetEventHandle`) in one process and
//! opens it (`cuIpcOpenEventHandle`) in another. Through gpupool the two
//! processes are two sessions, each in its own worker process with its own
//! context, so the sharing goes through the driver's own IPC between those
//! workers. The bytes the program passes on name an export the supervisor
//! keeps ([`Registry`]), never the driver's handle: the worker does not
//! know its session's tenant, the supervisor does, and only a session of
//! the exporter's tenant on the exporter's GPU (or MIG instance) can
//! resolve the export. A worker asks its supervisor through [`RemoteIpc`]
//! (a `WorkerEvent.ipc` question, answered by `WorkerAssign.ipc`); sessions
//! served in the supervisor's own process (no isolation) have no IPC.

use crate::error::CallError;
use gpupool_proto::ipc::{HANDLE_BYTES, ID_BYTES};
use gpupool_proto::v1;
use gpupool_proto::v1::ipc_request::Kind;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Most exports one session keeps (each names one of its events).
pub const MAX_EXPORTS_PER_SESSION: usize = 4096;

/// How long a worker waits for its supervisor's answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// The session and scope an export belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub tenant: String,
    /// The GPU or MIG instance (the session's metrics label).
    pub instance: String,
}

#[derive(Debug)]
struct Export {
    owner: u64,
    scope: Scope,
    /// The driver's handle bytes.
    payload: [u8; HANDLE_BYTES],
}

/// The exports of the sessions of one server process.
#[derive(Debug, Default)]
pub struct Registry {
    exports: Mutex<HashMap<[u8; ID_BYTES], Export>>,
}

impl Registry {
    /// Registers the driver's handle of an event of session `owner`; the
    /// same event exported again keeps its id, as the driver gives the same
    /// handle again.
    pub fn export(&self, owner: u64, scope: &Scope, payload: &[u8]) -> Result<[u8; ID_BYTES], String> {
        let payload: [u8; HANDLE_BYTES] =
            payload.try_into().map_err(|_| format!("a driver IPC handle is {HANDLE_BYTES} bytes"))?;
        let mut exports = self.lock();
        let mut held = 0;
        for (id, e) in exports.iter() {
            if e.owner == owner {
                if e.payload == payload {
                    return Ok(*id);
                }
                held += 1;
            }
        }
        if held >= MAX_EXPORTS_PER_SESSION {
            return Err(format!("a session exports at most {MAX_EXPORTS_PER_SESSION} IPC handles"));
        }
        let id = loop {
            let id = rand::random::<[u8; ID_BYTES]>();
            if !exports.contains_key(&id) {
                break id;
            }
        };
        exports.insert(id, Export { owner, scope: scope.clone(), payload });
        Ok(id)
    }

    /// The driver's handle of export `id` for a session in `scope`. An
    /// export of another tenant or instance reads as unknown, as the driver
    /// answers a handle it does not know.
    pub fn resolve(&self, id: &[u8], scope: &Scope) -> Result<[u8; HANDLE_BYTES], String> {
        let unknown = || "the IPC handle names no export of this tenant on this GPU".to_string();
        let id: [u8; ID_BYTES] = id.try_into().map_err(|_| unknown())?;
        let exports = self.lock();
        let e = exports.get(&id).ok_or_else(unknown)?;
        if e.scope != *scope {
            return Err(unknown());
        }
        Ok(e.payload)
    }

    /// Forgets the exports of a session that ended.
    pub fn release(&self, owner: u64) {
        self.lock().retain(|_, e| e.owner != owner);
    }

    /// Answers a worker's question for its session `owner` in `scope`.
    pub fn serve(&self, owner: u64, scope: &Scope, request: &v1::IpcRequest) -> v1::IpcAnswer {
        let mut answer = v1::IpcAnswer { seq: request.seq, ..Default::default() };
        let outcome = match Kind::try_from(request.kind) {
            Ok(Kind::ExportEvent) => {
                self.export(owner, scope, &request.payload).map(|id| answer.id = id.to_vec().into())
            }
            Ok(Kind::ResolveEvent) => self.resolve(&request.id, scope).map(|p| answer.payload = p.to_vec().into()),
            Err(_) => Err(format!("unknown IPC request kind {}", request.kind)),
        };
        if let Err(e) = outcome {
            answer.error = e;
        }
        answer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; ID_BYTES], Export>> {
        self.exports.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Sends one question to the supervisor; `false` when it cannot.
pub type SendRequest = Box<dyn Fn(v1::IpcRequest) -> bool + Send + Sync>;

/// A worker's way to its supervisor's [`Registry`]: one question at a time
/// from the session thread, answered on the control pipe.
pub struct RemoteIpc {
    send: SendRequest,
    state: Mutex<RemoteState>,
    answered: Condvar,
}

impl std::fmt::Debug for RemoteIpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteIpc").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct RemoteState {
    last_seq: u64,
    pending: Option<u64>,
    answer: Option<v1::IpcAnswer>,
    gone: bool,
}

static REMOTE: OnceLock<Arc<RemoteIpc>> = OnceLock::new();

/// Makes this process's sessions reach the supervisor's registry through
/// `remote` (a worker process does, once).
pub fn install(remote: Arc<RemoteIpc>) {
    let _ = REMOTE.set(remote);
}

/// This process's way to the registry: none where sessions are served in
/// the supervisor's own process.
pub fn remote() -> Option<&'static RemoteIpc> {
    REMOTE.get().map(Arc::as_ref)
}

/// The error of an IPC call where sessions have no IPC.
pub fn unavailable() -> CallError {
    CallError::not_supported(
        "CUDA IPC needs sessions in worker processes (the server's process isolation); this server serves \
         sessions in its own process",
    )
}

impl RemoteIpc {
    pub fn new(send: SendRequest) -> Arc<Self> {
        Arc::new(Self { send, state: Mutex::new(RemoteState::default()), answered: Condvar::new() })
    }

    /// Registers the driver's handle of one of the session's events; the
    /// export's id.
    pub fn export_event(&self, payload: &[u8; HANDLE_BYTES]) -> Result<[u8; ID_BYTES], CallError> {
        let a = self.question(Kind::ExportEvent, payload.to_vec(), Vec::new())?;
        a.id[..]
            .try_into()
            .map_err(|_| CallError::invalid_value("the supervisor answered an export id of a wrong size"))
    }

    /// The driver's handle of event export `id`.
    pub fn resolve_event(&self, id: &[u8; ID_BYTES]) -> Result<[u8; HANDLE_BYTES], CallError> {
        let a = self.question(Kind::ResolveEvent, Vec::new(), id.to_vec())?;
        a.payload[..]
            .try_into()
            .map_err(|_| CallError::invalid_value("the supervisor answered a driver handle of a wrong size"))
    }

    /// Takes an answer; one to no pending question (late, after a
    /// timeout) is dropped.
    pub fn answer(&self, answer: v1::IpcAnswer) {
        let mut s = self.lock();
        if s.pending == Some(answer.seq) {
            s.answer = Some(answer);
            drop(s);
            self.answered.notify_all();
        }
    }

    /// The supervisor is gone: questions fail from now on.
    pub fn close(&self) {
        self.lock().gone = true;
        self.answered.notify_all();
    }

    fn question(&self, kind: Kind, payload: Vec<u8>, id: Vec<u8>) -> Result<v1::IpcAnswer, CallError> {
        let unreachable = || CallError::invalid_value("the server's supervisor cannot be reached for CUDA IPC");
        let seq = {
            let mut s = self.lock();
            if s.gone {
                return Err(unreachable());
            }
            s.last_seq += 1;
            s.pending = Some(s.last_seq);
            s.answer = None;
            s.last_seq
        };
        if !(self.send)(v1::IpcRequest { kind: kind.into(), seq, payload: payload.into(), id: id.into() }) {
            self.lock().pending = None;
            return Err(unreachable());
        }
        let deadline = Instant::now() + ANSWER_WAIT;
        let mut s = self.lock();
        let answer = loop {
            if let Some(a) = s.answer.take() {
                break a;
            }
            let now = Instant::now();
            if s.gone || now >= deadline {
                s.pending = None;
                return Err(unreachable());
            }
            s = self.answered.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        };
        s.pending = None;
        if !answer.error.is_empty() {
            // The driver's answer to a handle it does not know.
            return Err(CallError::invalid_value(answer.error));
        }
        Ok(answer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RemoteState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(tenant: &str, instance: &str) -> Scope {
        Scope { tenant: tenant.into(), instance: instance.into() }
    }

    #[test]
    fn exports_resolve_in_their_scope_only_and_go_with_their_session() {
        let r = Registry::default();
        let a = scope("acme", "gpu0");
        let id = r.export(1, &a, &[7; HANDLE_BYTES]).expect("export");
        assert_eq!(r.export(1, &a, &[7; HANDLE_BYTES]), Ok(id), "the same event keeps its id");
        let other = r.export(1, &a, &[8; HANDLE_BYTES]).expect("export");
        assert_ne!(id, other);
        assert_eq!(r.resolve(&id, &a), Ok([7; HANDLE_BYTES]));
        assert!(r.resolve(&id, &scope("evil", "gpu0")).is_err(), "another tenant");
        assert!(r.resolve(&id, &scope("acme", "gpu1")).is_err(), "another instance");
        assert!(r.resolve(&[0; ID_BYTES], &a).is_err(), "unknown id");
        assert!(r.resolve(&id[..8], &a).is_err(), "short id");
        assert!(r.export(1, &a, &[0; 63]).is_err(), "short payload");
        r.release(2);
        assert_eq!(r.lock().len(), 2, "another session's end keeps them");
        r.release(1);
        assert!(r.lock().is_empty());
        assert!(r.resolve(&id, &a).is_err(), "gone with its session");
    }

    #[test]
    fn a_session_exports_a_bounded_number() {
        let r = Registry::default();
        let a = scope("acme", "gpu0");
        for i in 0..MAX_EXPORTS_PER_SESSION {
            let mut p = [0u8; HANDLE_BYTES];
            p[..8].copy_from_slice(&(i as u64).to_le_bytes());
            r.export(1, &a, &p).expect("within the bound");
        }
        assert!(r.export(1, &a, &[0xff; HANDLE_BYTES]).is_err());
        assert!(r.export(2, &a, &[0xff; HANDLE_BYTES]).is_ok(), "per session");
    }

    #[test]
    fn a_worker_asks_its_supervisor() {
        let registry = Arc::new(Registry::default());
        let slot: Arc<OnceLock<Arc<RemoteIpc>>> = Arc::default();
        let (reg, to) = (registry.clone(), slot.clone());
        // The supervisor answers on another thread, as the pipes do.
        let remote = RemoteIpc::new(Box::new(move |req| {
            let (reg, to) = (reg.clone(), to.clone());
            std::thread::spawn(move || {
                let a = reg.serve(9, &scope("acme", "gpu0"), &req);
                to.get().expect("installed").answer(a);
            });
            true
        }));
        let _ = slot.set(remote.clone());
        let id = remote.export_event(&[3; HANDLE_BYTES]).expect("export");
        assert_eq!(remote.resolve_event(&id).expect("resolve"), [3; HANDLE_BYTES]);
        let e = remote.resolve_event(&[0; ID_BYTES]).expect_err("unknown");
        assert_eq!(e.code, gpupool_proto::cuda::INVALID_VALUE);
        let bad = registry.serve(9, &scope("acme", "gpu0"), &v1::IpcRequest { kind: 99, seq: 1, ..Default::default() });
        assert!(!bad.error.is_empty());
        remote.close();
        assert!(remote.export_event(&[4; HANDLE_BYTES]).is_err(), "the supervisor is gone");
    }
}
