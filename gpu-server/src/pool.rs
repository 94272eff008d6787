//! The supervisor's pool of session worker processes (see [`crate::worker`]).
//!
//! `warm` workers are kept started, device open, so that a new session only
//! waits for the assignment round trip. A worker serves one session and then
//! exits; taking one starts its replacement in the background. Workers are
//! killed when the pool is dropped, and they exit by themselves when their
//! stdin closes, so none outlives the supervisor.

use crate::config::WorkerCommand;
use crate::error::ServerError;
use crate::staging::host::{HostLedger, SlotLease};
use gpupool_proto::frame::{self, FrameDecoder};
use gpupool_proto::v1::{self, worker_event::Event};
use prost::Message;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// Longest wait for a worker to acknowledge its assignment. An answer takes
/// milliseconds; the bound is for a worker that hangs. 5 s was too short on
/// a loaded host: in a clean-clone CI run (2 cores, the soak's 64 clients
/// at once) a started worker missed it and its client was refused.
const ASSIGN_TIMEOUT: Duration = Duration::from_secs(15);

/// A started worker, device open and endpoint bound.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::Receiver<Event>,
    pub ready: v1::WorkerReady,
    /// The worker's shared-memory socket file, checked against the pool's
    /// directory and the process id spawned (not taken on the worker's
    /// word): removed on drop.
    shm_socket: Option<std::path::PathBuf>,
    /// The worker's slot of the host's staging ledger: what it still had
    /// staged goes back to the host when this drops (after it exited).
    _staging: Option<SlotLease>,
}

impl Worker {
    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.ready.pid
    }

    /// Waits for the worker to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// The worker's events from now on (metrics reports, mostly).
    pub fn take_events(&mut self) -> mpsc::Receiver<Event> {
        std::mem::replace(&mut self.events, mpsc::channel(1).1)
    }

    /// Writes one framed control message to the worker's stdin.
    pub async fn send_control(&mut self, frame: &[u8]) -> Result<(), ServerError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| ServerError::Worker("worker stdin closed".into()))?;
        stdin.write_all(frame).await.map_err(|e| ServerError::Worker(format!("writing to the worker: {e}")))?;
        stdin.flush().await.map_err(|e| ServerError::Worker(format!("writing to the worker: {e}")))
    }

    /// Closes stdin: the worker ends its session (`SHUTDOWN`) and exits.
    pub fn stop(&mut self) {
        self.stdin = None;
    }

    /// Kills the worker now.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

impl Drop for Worker {
    /// The worker has exited or is being killed (`kill_on_drop`): a killed
    /// worker could not remove its shared-memory socket's file itself.
    fn drop(&mut self) {
        if let Some(path) = &self.shm_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A worker process as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub pid: u32,
    pub port: u16,
    /// The session it serves; `None` while warm.
    pub session: Option<u64>,
}

/// Keeps warm workers and hands them out.
#[derive(Debug)]
pub struct WorkerPool {
    command: WorkerCommand,
    /// Set in each worker's environment before it starts (its instance's
    /// `CUDA_VISIBLE_DEVICES`: CUDA reads it once, at `cuInit`).
    env: Vec<(String, String)>,
    spec: v1::WorkerSpec,
    /// The host's staging ledger, which every worker inherits with a slot
    /// of its own (none: workers stage under no host cap).
    staging: Option<Arc<HostLedger>>,
    /// Where workers bind their shared-memory sockets (none: they do not).
    shm_dir: Option<std::path::PathBuf>,
    warm: usize,
    start_timeout: Duration,
    idle: Mutex<Vec<Worker>>,
    starting: AtomicUsize,
    busy: Mutex<Vec<WorkerInfo>>,
    closed: AtomicBool,
    /// The first worker's answer: its description, or why it failed.
    first: tokio::sync::OnceCell<Result<v1::WorkerReady, String>>,
    /// Counts the workers started (`worker_starts`), when set.
    metrics: std::sync::OnceLock<Arc<crate::server::Metrics>>,
}

impl WorkerPool {
    pub fn new(
        command: WorkerCommand,
        spec: &v1::WorkerSpec,
        staging: Option<Arc<HostLedger>>,
        warm: usize,
        start_timeout: Duration,
    ) -> Arc<Self> {
        Self::with_env(command, Vec::new(), spec, staging, warm, start_timeout)
    }

    /// Like [`WorkerPool::new`], with variables set in each worker's
    /// environment.
    pub fn with_env(
        command: WorkerCommand,
        env: Vec<(String, String)>,
        spec: &v1::WorkerSpec,
        staging: Option<Arc<HostLedger>>,
        warm: usize,
        start_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            command,
            env,
            spec: spec.clone(),
            staging,
            shm_dir: Some(std::path::PathBuf::from(&spec.shm_dir)).filter(|d| !d.as_os_str().is_empty()),
            warm,
            start_timeout,
            idle: Mutex::new(Vec::new()),
            starting: AtomicUsize::new(0),
            busy: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            first: tokio::sync::OnceCell::new(),
            metrics: std::sync::OnceLock::new(),
        })
    }

    /// Counts the workers this pool starts in `metrics` (the first
    /// setting stays).
    pub fn count_in(&self, metrics: Arc<crate::server::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// Starts one worker and waits for it: proves the device opens in a
    /// worker, and tells what it is. The result is kept.
    pub async fn probe(self: &Arc<Self>) -> Result<v1::WorkerReady, ServerError> {
        let r = self
            .first
            .get_or_init(|| async {
                match self.start().await {
                    Ok(w) => {
                        let ready = w.ready.clone();
                        self.put_idle(w);
                        Ok(ready)
                    }
                    Err(ServerError::Worker(reason)) => Err(reason),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await;
        r.clone().map_err(ServerError::Worker)
    }

    /// The first worker's description, once [`WorkerPool::probe`] succeeded.
    pub fn probe_result(&self) -> Option<&v1::WorkerReady> {
        self.first.get().and_then(|r| r.as_ref().ok())
    }

    /// Starts workers in the background until `warm` are idle or starting.
    pub fn fill(self: &Arc<Self>) {
        loop {
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            let have = lock(&self.idle).len() + self.starting.load(Ordering::Relaxed);
            if have >= self.warm {
                return;
            }
            self.starting.fetch_add(1, Ordering::Relaxed);
            let pool = self.clone();
            tokio::spawn(async move {
                let started = pool.start().await;
                pool.starting.fetch_sub(1, Ordering::Relaxed);
                match started {
                    Ok(w) => pool.put_idle(w),
                    Err(e) => tracing::error!(error = %e, "cannot start a warm session worker"),
                }
            });
        }
    }

    fn put_idle(&self, w: Worker) {
        if !self.closed.load(Ordering::Relaxed) {
            lock(&self.idle).push(w);
        }
    }

    /// A worker for `assign`: a warm one if there is one, else a new one.
    /// Returns once the worker has armed the ticket.
    pub async fn assign(self: &Arc<Self>, assign: &v1::WorkerAssign) -> Result<Worker, ServerError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(ServerError::Worker("server is shutting down".into()));
        }
        let bytes = frame::encode(assign);
        // A warm worker may have died while idle: try the next one.
        loop {
            let warm = lock(&self.idle).pop();
            let from_pool = warm.is_some();
            let mut w = match warm {
                Some(w) => w,
                None => self.start().await?,
            };
            self.fill();
            match Self::hand_over(&mut w, &bytes, &assign.ticket).await {
                Ok(()) => {
                    let info = WorkerInfo { pid: w.pid(), port: w.ready.port as u16, session: Some(assign.session_id) };
                    lock(&self.busy).push(info);
                    return Ok(w);
                }
                Err(e) if from_pool => {
                    tracing::warn!(pid = w.pid(), error = %e, "warm worker unusable; trying another")
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A new worker for `assign`, started with `extra_env` on top of the
    /// pool's environment: a worker of a shared lease, which must be an MPS
    /// client with its lease's share from `cuInit` on. Such workers are
    /// started cold, never kept warm: the environment differs per lease
    /// (its percentage), and a warm worker's context was created without
    /// it (`docs/sharing.md`).
    pub async fn assign_with_env(
        self: &Arc<Self>,
        assign: &v1::WorkerAssign,
        extra_env: &[(String, String)],
    ) -> Result<Worker, ServerError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(ServerError::Worker("server is shutting down".into()));
        }
        let mut w = self.start_with(extra_env).await?;
        Self::hand_over(&mut w, &frame::encode(assign), &assign.ticket).await?;
        let info = WorkerInfo { pid: w.pid(), port: w.ready.port as u16, session: Some(assign.session_id) };
        lock(&self.busy).push(info);
        Ok(w)
    }

    async fn hand_over(w: &mut Worker, assign: &[u8], ticket: &str) -> Result<(), ServerError> {
        w.send_control(assign).await?;
        let deadline = tokio::time::Instant::now() + ASSIGN_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, w.events.recv()).await {
                Ok(Some(Event::Assigned(t))) if t == ticket => return Ok(()),
                // A waiting worker reports what it preloaded; reports are
                // totals, so the next one (relayed) includes this one.
                Ok(Some(Event::Metrics(_))) => continue,
                Ok(Some(Event::Failed(reason))) => return Err(ServerError::Worker(reason)),
                Ok(Some(other)) => return Err(ServerError::Worker(format!("unexpected worker event {other:?}"))),
                Ok(None) => return Err(ServerError::Worker("worker exited".into())),
                Err(_) => return Err(ServerError::Worker(format!("worker did not answer within {ASSIGN_TIMEOUT:?}"))),
            }
        }
    }

    /// Marks the worker of `pid` as gone.
    pub fn finished(&self, pid: u32) {
        lock(&self.busy).retain(|w| w.pid != pid);
    }

    /// Every live worker, warm and busy.
    pub fn snapshot(&self) -> Vec<WorkerInfo> {
        let mut all: Vec<WorkerInfo> = lock(&self.idle)
            .iter()
            .map(|w| WorkerInfo { pid: w.pid(), port: w.ready.port as u16, session: None })
            .collect();
        all.extend(lock(&self.busy).iter().cloned());
        all
    }

    /// Stops starting workers and kills the warm ones.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        lock(&self.idle).clear();
    }

    /// Spawns a worker, sends the spec and waits for `WorkerReady`.
    async fn start(&self) -> Result<Worker, ServerError> {
        self.start_with(&[]).await
    }

    /// [`WorkerPool::start`] with `extra_env` set as well.
    async fn start_with(&self, extra_env: &[(String, String)]) -> Result<Worker, ServerError> {
        let program = &self.command.program;
        let mut command = Command::new(program);
        command
            .args(&self.command.args)
            .envs(self.env.iter().chain(extra_env).map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // The worker stages in a slot of the host's ledger, inherited.
        let mut spec = self.spec.clone();
        let (staging, inheritable) = match &self.staging {
            Some(ledger) => {
                let lease = ledger
                    .claim()
                    .ok_or_else(|| ServerError::Worker("no free slot in the host's staging ledger".into()))?;
                let inheritable = ledger.inheritable()?;
                if let Some(fd) = &inheritable {
                    spec.staging_ledger_fd = fd.raw();
                    spec.staging_slot = lease.slot() as u32;
                }
                (Some(lease), inheritable)
            }
            None => (None, None),
        };
        let spec = frame::encode(&spec);
        let spawned = command.spawn();
        // The child has its copy (or none was made).
        drop(inheritable);
        let mut child = spawned.map_err(|e| ServerError::Worker(format!("cannot start {}: {e}", program.display())))?;
        let spawned = child.id();
        let mut stdin = child.stdin.take().ok_or_else(|| ServerError::Worker("worker has no stdin".into()))?;
        let stdout = child.stdout.take().ok_or_else(|| ServerError::Worker("worker has no stdout".into()))?;
        let (tx, mut events) = mpsc::channel(4);
        tokio::spawn(read_events(stdout, tx));
        // A worker that dies at once closes its pipes: the write fails or
        // the events end, and its exit status says why.
        let written = async {
            stdin.write_all(&spec).await?;
            stdin.flush().await
        }
        .await;
        let first = match written {
            Ok(()) => tokio::time::timeout(self.start_timeout, events.recv()).await,
            Err(e) => {
                tracing::debug!(error = %e, "writing the worker spec failed");
                Ok(None)
            }
        };
        let ready = match first {
            Ok(Some(Event::Ready(r))) => {
                if let Some(m) = self.metrics.get() {
                    crate::server::metrics::add(&m.worker_starts, 1);
                }
                r
            }
            Ok(Some(Event::Failed(reason))) => return Err(ServerError::Worker(reason)),
            Ok(Some(other)) => return Err(ServerError::Worker(format!("unexpected worker event {other:?}"))),
            Ok(None) => {
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                return Err(ServerError::Worker(format!("worker exited before it was ready ({status})")));
            }
            Err(_) => {
                return Err(ServerError::Worker(format!("worker not ready within {:?}", self.start_timeout)));
            }
        };
        tracing::debug!(pid = ready.pid, port = ready.port, backend = %ready.backend, "worker ready");
        let shm_socket = self.shm_socket_of(spawned, &ready.shm_socket);
        Ok(Worker { child, stdin: Some(stdin), events, ready, shm_socket, _staging: staging })
    }

    /// `reported` when it names a socket file of process `pid` in the
    /// workers' shared-memory directory (`<dir>/gpupool-<pid>-<hex>.sock`).
    fn shm_socket_of(&self, pid: Option<u32>, reported: &str) -> Option<std::path::PathBuf> {
        let (dir, pid) = (self.shm_dir.as_ref()?, pid?);
        let path = std::path::Path::new(reported);
        let name = path.file_name()?.to_str()?;
        let hex = name.strip_prefix(&format!("gpupool-{pid}-"))?.strip_suffix(".sock")?;
        let own = path.parent() == Some(dir.as_path()) && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit());
        own.then(|| path.to_path_buf())
    }
}

/// Decodes the worker's stdout into events until it closes.
async fn read_events(mut stdout: tokio::process::ChildStdout, tx: mpsc::Sender<Event>) {
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match decoder.next_frame() {
            Ok(Some(body)) => match v1::WorkerEvent::decode(body) {
                Ok(v1::WorkerEvent { event: Some(e) }) => {
                    if tx.send(e).await.is_err() {
                        return;
                    }
                    continue;
                }
                other => {
                    tracing::error!(?other, "undecodable worker event");
                    return;
                }
            },
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "bad frame from a worker");
                return;
            }
        }
        match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => decoder.push(&buf[..n]),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A worker reports its socket's path; the supervisor, which may run
    /// with more rights, removes only a file of that worker's own name in
    /// the workers' directory.
    #[test]
    fn only_a_workers_own_socket_file_is_removed() {
        let spec = v1::WorkerSpec { shm_dir: "/run/gpupool".into(), ..Default::default() };
        let command = WorkerCommand { program: "gpupool-server".into(), args: Vec::new() };
        let pool = WorkerPool::new(command, &spec, None, 0, Duration::from_secs(1));
        let own = "/run/gpupool/gpupool-42-0a1b2c.sock";
        assert_eq!(pool.shm_socket_of(Some(42), own), Some(PathBuf::from(own)));
        for other in [
            "/etc/passwd",
            "/run/gpupool/gpupool-43-0a1b2c.sock",
            "/run/gpupool/../etc/gpupool-42-0a1b2c.sock",
            "/run/other/gpupool-42-0a1b2c.sock",
            "/run/gpupool/gpupool-42-.sock",
            "/run/gpupool/gpupool-42-zz.sock",
            "",
        ] {
            assert_eq!(pool.shm_socket_of(Some(42), other), None, "{other}");
        }
        assert_eq!(pool.shm_socket_of(None, own), None, "no process id");
    }
}
