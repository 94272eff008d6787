//! The example function's GPU worker: a child process that holds the CUDA
//! context, so that the process answering Lambda can replace it when the
//! session is lost for good (a CUDA context cannot be re-created inside a
//! process once the driver library reported it lost).
//!
//! Protocol: one JSON object per line, requests ([`Request`]) on the
//! worker's stdin, [`Reply`] lines on its stdout: first `opened` (or
//! `failed`), then one `done` or `failed` per request. The worker's logs go
//! to stderr; a stdout line that is not a reply (something a library
//! printed) is logged and skipped.

use crate::matmul::{Gpu, Kernels, Request, Response};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// What the worker says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The GPU is open (the first line).
    Opened { kernels: Kernels, setup_ms: f64 },
    /// A request's answer.
    Done { response: Response },
    /// Opening the GPU or a request failed. With `session_lost`, the GPU
    /// session is gone for good and the worker ends after this line.
    Failed { message: String, session_lost: bool },
}

/// Whether `e` says the GPU session is gone (`CUDA_ERROR_DEVICE_UNAVAILABLE`
/// from the drop-in libcuda once a session cannot be resumed).
pub fn session_lost(e: &anyhow::Error) -> bool {
    use cudarc::driver::{DriverError, sys::CUresult};
    e.chain().any(|c| c.downcast_ref::<DriverError>().is_some_and(|d| d.0 == CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE))
}

fn send(out: &mut impl Write, reply: &Reply) -> Result<()> {
    serde_json::to_writer(&mut *out, reply)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// The worker's main loop (`--gpu-worker`): opens the GPU, then answers
/// requests from stdin until it closes or the session is lost.
pub fn serve() -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut gpu = match Gpu::open() {
        Ok(gpu) => gpu,
        Err(e) => {
            send(&mut out, &Reply::Failed { message: format!("{e:#}"), session_lost: session_lost(&e) })?;
            bail!("cannot open the GPU: {e:#}");
        }
    };
    send(&mut out, &Reply::Opened { kernels: gpu.kernels(), setup_ms: gpu.setup_ms() })?;
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading a request")?;
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Failed { message: format!("malformed request: {e}"), session_lost: false },
            Ok(req) => match gpu.run(&req) {
                Ok(response) => Reply::Done { response },
                Err(e) => Reply::Failed { message: format!("{e:#}"), session_lost: session_lost(&e) },
            },
        };
        send(&mut out, &reply)?;
        if matches!(reply, Reply::Failed { session_lost: true, .. }) {
            bail!("the GPU session is lost");
        }
    }
    Ok(())
}

/// A running worker, seen from the function's process. Dropping it ends
/// the worker.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    kernels: Kernels,
}

impl WorkerProcess {
    /// Starts this executable as a worker and waits until it has opened the
    /// GPU (or failed to). `GPUPOOL_WORKER_WRAPPER`, when set, is a command
    /// (split on whitespace) the worker runs under, e.g. an emulator or
    /// `strace -f`, as Lambda's `AWS_LAMBDA_EXEC_WRAPPER` does for runtimes.
    pub fn start() -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let wrapper = std::env::var("GPUPOOL_WORKER_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = command
            .arg("--gpu-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the GPU worker")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the GPU worker has no pipes");
        };
        let mut worker = Self { child, stdin, stdout: BufReader::new(stdout), kernels: Kernels::Builtin };
        match worker.reply()? {
            Reply::Opened { kernels, setup_ms } => {
                tracing::info!(?kernels, setup_ms, pid = worker.child.id(), "GPU worker ready");
                worker.kernels = kernels;
                Ok(worker)
            }
            Reply::Failed { message, .. } => Err(anyhow!("the GPU worker could not open the GPU: {message}")),
            Reply::Done { .. } => Err(anyhow!("the GPU worker answered before it was asked")),
        }
    }

    /// Where the worker's kernel came from.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Sends one request and waits for its reply. An error means the
    /// worker is gone (ended, or its pipes broke).
    pub fn call(&mut self, req: &Request) -> Result<Reply> {
        let mut line = serde_json::to_vec(req).context("encoding the request")?;
        line.push(b'\n');
        self.stdin
            .write_all(&line)
            .and_then(|()| self.stdin.flush())
            .context("sending the request to the GPU worker")?;
        self.reply()
    }

    fn reply(&mut self) -> Result<Reply> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line).context("reading the GPU worker")? == 0 {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                bail!("the GPU worker ended ({status})");
            }
            match serde_json::from_str::<Reply>(line.trim_end()) {
                Ok(reply) => return Ok(reply),
                Err(_) => tracing::info!(output = line.trim_end(), "GPU worker stdout"),
            }
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::Timing;

    #[test]
    fn replies_round_trip_as_tagged_lines() {
        let response = Response {
            c: vec![1.0, 2.0],
            checksum: 3.0,
            device: "d".into(),
            kernels: Kernels::Nvrtc,
            cold: true,
            recovered: false,
            timing: Timing::default(),
        };
        for reply in [
            Reply::Opened { kernels: Kernels::Builtin, setup_ms: 1.5 },
            Reply::Done { response },
            Reply::Failed { message: "gone".into(), session_lost: true },
        ] {
            let mut buf = Vec::new();
            send(&mut buf, &reply).expect("encode");
            assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            let back: Reply = serde_json::from_slice(&buf).expect("decode");
            assert_eq!(format!("{back:?}"), format!("{reply:?}"));
        }
        let line = br#"{"reply":"failed","message":"x","session_lost":false}"#;
        assert!(matches!(serde_json::from_slice(line).expect("decode"), Reply::Failed { session_lost: false, .. }));
    }
}
