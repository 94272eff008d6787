//! A session worker process: one session, its own device context.
//!
//! The supervisor ([`crate::pool`]) starts the worker with
//! [`WORKER_ARG`] and speaks to it over stdin and stdout in the usual
//! framing:
//! 1. stdin: one `WorkerSpec` (device, limits, the supervisor's certificate);
//! 2. stdout: `WorkerReady` once the device is open and the QUIC endpoint is
//!    bound on an ephemeral port (or `failed` with the reason);
//! 3. stdin: one `WorkerAssign` (a one-time ticket, the tenant, its quota);
//!    stdout: `assigned` with the ticket;
//! 4. the client connects with the ticket; when that session ends the
//!    worker exits, and with it the context and all its memory.
//!
//! The worker also exits when the ticket is not used within the handshake
//! timeout, or when stdin closes (the supervisor is gone); its open session
//! is then closed with `SHUTDOWN`. Logs go to stderr, never stdout. The
//! protocol uses a duplicate of fd 1: fd 1 itself is a pipe that collects
//! device printf output for the client ([`crate::device_output`]).

use crate::auth::{AuthError, Authenticator, Grant, constant_time_eq};
use crate::error::ServerError;
use crate::server::{Metrics, Server};
use gpupool_proto::{frame, v1};
use prost::Message;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// First argument that makes a gpupool binary run as a worker.
pub const WORKER_ARG: &str = "worker";

/// Set (to `1`) in the environment of a worker that runs as an MPS client
/// of a shared session group.
pub const MPS_CLIENT_ENV: &str = "GPUPOOL_MPS_CLIENT";

/// Exit status of an MPS client worker whose context was lost: its
/// supervisor ends the other sessions of the group (MPS ended their
/// contexts too) and counts the fault.
pub const CONTEXT_LOST_EXIT: i32 = 70;

/// How long a worker whose context was lost waits before it exits, so that
/// the reply carrying the error reaches its client first.
const CONTEXT_LOST_LINGER: Duration = Duration::from_millis(100);

/// How long a stopping worker waits for its module images to reach the
/// disk (within the supervisor's shutdown grace, 5 s by default).
const IMAGE_FLUSH_BOUND: Duration = Duration::from_secs(4);

/// Largest control frame read from stdin.
const MAX_CONTROL_FRAME: usize = 1 << 20;

/// Runs as a worker when this process was started as one (first argument
/// [`WORKER_ARG`]), then exits the process; returns otherwise. Binaries that
/// can serve as their own worker command call this first thing in `main`.
pub fn run_if_worker() {
    if std::env::args().nth(1).as_deref() == Some(WORKER_ARG) {
        let code = match run_stdio() {
            Ok(()) => 0,
            Err(e) => {
                use std::io::Write as _;
                let _ = writeln!(crate::device_output::LogWriter, "gpupool worker: {e}");
                1
            }
        };
        std::process::exit(code);
    }
}

/// Where [`write_event`] writes: the protocol's duplicate of fd 1, once
/// [`crate::device_output::install`] moved stdout to the capture pipe.
static PROTOCOL_OUT: OnceLock<Mutex<std::fs::File>> = OnceLock::new();

/// Serves one session as a worker on this process's stdin and stdout.
pub fn run_stdio() -> Result<(), ServerError> {
    // Before the device opens: the driver writes device printf to fd 1,
    // which must not be the protocol pipe.
    let proto = crate::device_output::install()
        .map_err(|e| ServerError::Worker(format!("cannot capture stdout for device printf: {e}")))?;
    // And stderr, where the driver writes a device assert's message; the
    // worker's own logs move to a duplicate of it.
    crate::device_output::install_stderr()
        .map_err(|e| ServerError::Worker(format!("cannot capture stderr for device asserts: {e}")))?;
    let _ = PROTOCOL_OUT.set(Mutex::new(proto));
    let mut stdin = std::io::stdin();
    let spec: v1::WorkerSpec =
        read_message(&mut stdin)?.ok_or_else(|| ServerError::Worker("stdin closed before the WorkerSpec".into()))?;
    let config = crate::worker_spec::config_from_spec(&spec)?;
    // One I/O thread for the one session: reader, writer and quinn's
    // drivers wake each other without crossing threads; the device work
    // runs on the session's own thread (bench/results/*-io-threads.md).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gpupool-worker-io")
        .enable_all()
        .build()
        .map_err(|e| ServerError::Worker(format!("cannot start the I/O runtime: {e}")))?;
    let tickets = Arc::new(Ticket::default());
    let handshake_timeout = config.handshake_timeout;
    // The supervisor swaps: this session's device memory is its ledger's.
    if spec.swap {
        crate::host_buffer::set_spare_cap(spec.swap_spare_bytes);
    }
    let remote = spec.swap.then(|| {
        let send = |request| write_event(v1::worker_event::Event::Memory(request));
        crate::swap::RemoteMemory::new(Box::new(send), Duration::from_millis(spec.swap_wait_ms))
    });
    let swap_dir = Some(std::path::PathBuf::from(&spec.swap_dir)).filter(|d| d.is_absolute());
    // Active once an assignment says the session is metered.
    let gate = crate::share::install_gate(Box::new(|busy: Duration| {
        let us = u64::try_from(busy.as_micros()).unwrap_or(u64::MAX).max(1);
        write_event(v1::worker_event::Event::BusyUs(us));
    }));
    let memory = remote.clone().map(|r| crate::swap::DeviceMemory::remote(r, swap_dir));
    // CUDA IPC exports are the supervisor's: it knows the session's tenant.
    let ipc = crate::ipc::RemoteIpc::new(Box::new(|request| write_event(v1::worker_event::Event::Ipc(request))));
    crate::ipc::install(ipc.clone());
    // The host's staging cap: the supervisor's ledger, in this worker's slot.
    let staging = if spec.staging_ledger_fd > 0 {
        let ledger = crate::staging::host::HostLedger::inherited(spec.staging_ledger_fd)?;
        Some(ledger.share(spec.staging_slot as usize)?)
    } else {
        None
    };
    // Set when the session is assigned: the preload stops.
    let preload_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = rt.block_on(async {
        let server = match Server::bind_worker(config, tickets.clone(), memory, staging) {
            Ok(s) => s,
            Err(e) => {
                write_event(v1::worker_event::Event::Failed(e.to_string()));
                return Err(e);
            }
        };
        let Some(d) = server.description() else {
            return Err(ServerError::Worker("a worker serves in-process".into()));
        };
        write_event(v1::worker_event::Event::Ready(v1::WorkerReady {
            port: u32::from(server.local_addr().port()),
            pid: std::process::id(),
            backend: d.backend.into(),
            device_name: d.name.clone(),
            shm_socket: server.shm_socket().map(|p| p.display().to_string()).unwrap_or_default(),
            total_memory: d.total_memory,
        }));
        let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
        let t = tickets.clone();
        let assigned = preload_stop.clone();
        // stdin is blocking: read it on a plain thread.
        std::thread::Builder::new()
            .name("gpupool-worker-control".into())
            .spawn(move || {
                read_control(stdin, &t, handshake_timeout, &control_tx, remote.as_deref(), gate, &assigned);
                // The supervisor is gone: IPC questions fail from now on.
                ipc.close();
            })
            .map_err(|e| ServerError::Worker(format!("cannot start the control thread: {e}")))?;
        let metrics = server.metrics();
        let mps_client = std::env::var_os(MPS_CLIENT_ENV).is_some_and(|v| v == "1");
        let reporter = tokio::spawn(report_metrics(metrics.clone(), mps_client));
        let migrator = server.migrator();
        let images = server.images();
        // While no session is assigned: the images recent sessions used.
        if let Some(preloader) = server.preloader() {
            let stop = preload_stop.clone();
            let spawned =
                std::thread::Builder::new().name("gpupool-worker-preload".into()).spawn(move || preloader.run(&stop));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the preload thread; images load when used");
            }
        }
        let result = server
            .run(async move {
                let why = until_stop(control_rx, &tickets, &migrator).await;
                tracing::info!(why, "worker stopping");
            })
            .await;
        reporter.abort();
        // The images this session loaded are written to the shared
        // directory off its thread: on disk before the process goes, for
        // the next worker.
        if !images.flushed(IMAGE_FLUSH_BOUND).await {
            tracing::warn!("module images still being written when the worker stopped");
        }
        write_event(v1::worker_event::Event::Metrics(metrics.worker_report()));
        result
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// Reports the counters to the supervisor when they change. An MPS client
/// (`mps_client`) whose context was lost exits with
/// [`CONTEXT_LOST_EXIT`]: under MPS the fault ended the contexts of the
/// whole group, and the supervisor can end the others' sessions at once
/// only when it learns of it (a sticky error leaves the worker alive).
async fn report_metrics(metrics: Arc<Metrics>, mps_client: bool) {
    let mut last = v1::WorkerMetrics::default();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        if mps_client && metrics.context_lost_errors.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            tokio::time::sleep(CONTEXT_LOST_LINGER).await;
            write_event(v1::worker_event::Event::Metrics(metrics.worker_report()));
            tracing::error!("the GPU context is lost under MPS; the worker exits so that its group is ended");
            std::process::exit(CONTEXT_LOST_EXIT);
        }
        ticks = ticks.wrapping_add(1);
        // Counters every 200 ms, as before; the context check every 50.
        if !ticks.is_multiple_of(4) {
            continue;
        }
        let now = metrics.worker_report();
        if now != last {
            write_event(v1::worker_event::Event::Metrics(now));
            last = now;
        }
    }
}

/// What the control thread saw on stdin.
enum Control {
    /// A ticket was armed; it expires at this instant.
    Assigned(Instant),
    /// Move the session to another server.
    Migrate(v1::Moved),
    Closed,
}

/// Reads the `WorkerAssign`, arms the ticket and reports it; then arms the
/// resume tickets of later `WorkerAssign`s (a client reattaching to the
/// session after losing its connection) until stdin closes (the
/// supervisor's way of stopping the worker). Answers to the session's
/// memory requests and swap-out orders go to `memory`, answers to its IPC
/// questions to [`crate::ipc::remote`].
fn read_control(
    mut stdin: std::io::Stdin,
    ticket: &Ticket,
    handshake_timeout: Duration,
    out: &tokio::sync::mpsc::UnboundedSender<Control>,
    memory: Option<&crate::swap::RemoteMemory>,
    gate: &crate::share::Gate,
    assigned: &std::sync::atomic::AtomicBool,
) {
    let mut first = true;
    loop {
        let a = match read_message::<v1::WorkerAssign>(&mut stdin) {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => {
                tracing::error!(error = %e, "bad control frame");
                break;
            }
        };
        if let Some(order) = a.migrate {
            let _ = out.send(Control::Migrate(order));
            continue;
        }
        if let Some(answer) = a.ipc {
            match crate::ipc::remote() {
                Some(r) => r.answer(answer),
                None => tracing::error!("IPC answer in a process without IPC; ignored"),
            }
            continue;
        }
        if a.hold_us > 0 {
            gate.hold_for(Duration::from_micros(a.hold_us));
            continue;
        }
        if a.memory.is_some() || a.swap_out {
            match (memory, a.memory) {
                (Some(m), Some(answer)) => m.answer(answer),
                (Some(m), None) => m.swap_out(),
                (None, _) => tracing::error!("memory frame from a supervisor that does not swap; ignored"),
            }
            continue;
        }
        // A session (new or resumed) is coming: the preload gives way.
        assigned.store(true, std::sync::atomic::Ordering::Release);
        if a.resume == first {
            tracing::error!(resume = a.resume, "out-of-order assignment ignored");
            continue;
        }
        let grant = Grant {
            subject: a.subject.clone(),
            // Counted per tenant by the supervisor, not here.
            tenant: String::new(),
            memory_quota: Some(a.memory_quota).filter(|q| *q > 0),
            session_id: Some(a.session_id),
            lease: None,
            resume_secret: Some(a.resume_secret.clone()).filter(|s| !s.is_empty()),
            // Sessions in worker processes stay on QUIC (docs/rdma.md).
            allow_rdma: false,
        };
        if a.time_share {
            gate.activate();
        }
        let expires = Instant::now() + handshake_timeout;
        ticket.arm(a.ticket.clone(), grant, expires);
        write_event(v1::worker_event::Event::Assigned(a.ticket));
        // Only the first ticket ends the worker when it goes unused: a
        // session waiting for its client has its own grace period.
        if first {
            let _ = out.send(Control::Assigned(expires));
        }
        first = false;
    }
    if let Some(m) = memory {
        m.close();
    }
    let _ = out.send(Control::Closed);
}

/// Completes when the worker should stop: stdin closed, or the ticket was
/// not used in time.
async fn until_stop(
    mut control: tokio::sync::mpsc::UnboundedReceiver<Control>,
    ticket: &Ticket,
    migrator: &crate::server::Migrator,
) -> &'static str {
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let expiry = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            c = control.recv() => match c {
                Some(Control::Assigned(expires)) => deadline = Some(expires.into()),
                Some(Control::Migrate(order)) => {
                    tokio::spawn(migrate(migrator.clone(), order));
                }
                Some(Control::Closed) | None => return "supervisor closed stdin",
            },
            () = expiry => {
                deadline = None;
                if ticket.expire_unused() {
                    return "ticket expired unused";
                }
            }
        }
    }
}

/// The one-time ticket of a worker: armed by the supervisor, spent by the
/// first `Hello` that presents it.
#[derive(Debug, Default)]
struct Ticket {
    slot: Mutex<Slot>,
}

#[derive(Debug, Default)]
enum Slot {
    #[default]
    Empty,
    Armed {
        ticket: String,
        // Boxed: a grant is large next to the other variants.
        grant: Box<Grant>,
        expires: Instant,
    },
    Spent,
}

impl Ticket {
    fn arm(&self, ticket: String, grant: Grant, expires: Instant) {
        *self.lock() = Slot::Armed { ticket, grant: Box::new(grant), expires };
    }

    /// Spends an armed ticket that has passed its expiry; true if it did.
    fn expire_unused(&self) -> bool {
        let mut slot = self.lock();
        if matches!(&*slot, Slot::Armed { expires, .. } if Instant::now() >= *expires) {
            *slot = Slot::Spent;
            return true;
        }
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Authenticator for Ticket {
    fn authenticate(&self, token: &str) -> Result<Grant, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut slot = self.lock();
        match &*slot {
            Slot::Armed { ticket, grant, expires } if constant_time_eq(ticket.as_bytes(), token.as_bytes()) => {
                if Instant::now() >= *expires {
                    *slot = Slot::Spent;
                    return Err(AuthError::Spent);
                }
                let grant = Grant::clone(grant);
                *slot = Slot::Spent;
                Ok(grant)
            }
            Slot::Spent => Err(AuthError::Spent),
            _ => Err(AuthError::Invalid),
        }
    }
}

/// Moves the worker's session as the supervisor ordered, and reports how
/// it went (the reason alone: the supervisor names the session).
async fn migrate(migrator: crate::server::Migrator, order: v1::Moved) {
    let outcome = match (migrator.sessions().first(), order.address.parse()) {
        (None, _) => Err("the worker holds no session".to_string()),
        (_, Err(_)) => Err(format!("unusable target address {:?}", order.address)),
        (Some(&id), Ok(address)) => {
            let target = crate::server::MigrationTarget {
                address,
                server_name: order.server_name,
                cert_sha256: order.cert_sha256,
                token: order.token,
            };
            migrator.migrate(id, target).await.map_err(|e| match e {
                ServerError::Migration { reason, .. } => reason,
                e => e.to_string(),
            })
        }
    };
    let outcome = match outcome {
        Ok(m) => v1::MigrateOutcome {
            error: String::new(),
            target_session: m.target_session,
            memory_bytes: m.memory_bytes,
            precopied_bytes: m.precopied,
            pause_us: u64::try_from(m.pause.as_micros()).unwrap_or(u64::MAX),
        },
        Err(error) => v1::MigrateOutcome { error, ..Default::default() },
    };
    write_event(v1::worker_event::Event::Migrated(outcome));
}

/// Reads one framed message; `Ok(None)` at a clean end of input.
pub(crate) fn read_message<M: Message + Default>(r: &mut impl Read) -> Result<Option<M>, ServerError> {
    let mut header = [0u8; frame::HEADER_LEN];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(ServerError::Worker(format!("reading a control frame: {e}"))),
    }
    let len = frame::decode_header(header, MAX_CONTROL_FRAME).map_err(|e| ServerError::Worker(e.to_string()))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| ServerError::Worker(format!("reading a control frame: {e}")))?;
    M::decode(body.as_slice()).map(Some).map_err(|e| ServerError::Worker(format!("bad control frame: {e}")))
}

/// Writes one event to stdout; whether it was written. A supervisor that
/// stopped reading is gone; stdin's end stops the worker then, so a failed
/// write is only logged.
fn write_event(event: v1::worker_event::Event) -> bool {
    let bytes = frame::encode(&v1::WorkerEvent { event: Some(event) });
    let written = match PROTOCOL_OUT.get() {
        Some(out) => {
            let mut out = out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            out.write_all(&bytes).and_then(|()| out.flush())
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&bytes).and_then(|()| out.flush())
        }
    };
    if let Err(e) = &written {
        tracing::warn!(error = %e, "cannot report to the supervisor");
    }
    written.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_is_one_time_and_expires() {
        let t = Ticket::default();
        assert_eq!(t.authenticate("abc"), Err(AuthError::Invalid));
        let grant = Grant {
            subject: "t".into(),
            tenant: String::new(),
            memory_quota: Some(1 << 20),
            session_id: Some(7),
            lease: None,
            resume_secret: None,
            allow_rdma: false,
        };
        t.arm("abc".into(), grant.clone(), Instant::now() + Duration::from_secs(60));
        assert_eq!(t.authenticate(""), Err(AuthError::Missing));
        assert_eq!(t.authenticate("abd"), Err(AuthError::Invalid));
        assert_eq!(t.authenticate("abc"), Ok(grant.clone()));
        assert_eq!(t.authenticate("abc"), Err(AuthError::Spent));

        let t = Ticket::default();
        t.arm("abc".into(), grant, Instant::now());
        assert!(t.expire_unused());
        assert_eq!(t.authenticate("abc"), Err(AuthError::Spent));
    }
}
