//! The server's own MPS control daemon (issue 19): worker processes of
//! sessions that may share fate run as MPS clients of it, so their kernels
//! run at the same time instead of time-sliced.
//!
//! The daemon gets private pipe and log directories under the server's
//! state directory, so it is this server's alone: a process finds an MPS
//! daemon only through `CUDA_MPS_PIPE_DIRECTORY`, and one whose directory
//! holds no daemon gets an ordinary context. Nothing else about the GPU
//! changes: the compute mode stays as it is (MPS does not need
//! EXCLUSIVE_PROCESS), no clocks, no MIG layout.
//!
//! `nvidia-cuda-mps-control -d` starts the daemon, which forks and returns;
//! commands go to the same program on stdin (`get_server_list`, `quit`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The control program (on PATH on GPU hosts).
pub const CONTROL: &str = "nvidia-cuda-mps-control";

/// Why the daemon could not be managed.
#[derive(Debug, thiserror::Error)]
pub enum MpsError {
    #[error("cannot prepare {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("cannot run {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{0} failed: {1}")]
    Failed(String, String),
}

/// A running MPS control daemon owned by this server.
#[derive(Debug)]
pub struct MpsDaemon {
    control: PathBuf,
    pipe_dir: PathBuf,
    log_dir: PathBuf,
    /// `CUDA_VISIBLE_DEVICES` of the daemon (the GPU this server serves).
    devices: Option<String>,
    running: bool,
}

impl MpsDaemon {
    /// Starts a daemon with pipe and log directories under `state_dir`
    /// (created private to this user), for the GPUs `devices` names
    /// (`CUDA_VISIBLE_DEVICES`; `None`: all).
    pub fn start(control: &Path, state_dir: &Path, devices: Option<String>) -> Result<Self, MpsError> {
        let pipe_dir = state_dir.join("mps-pipe");
        let log_dir = state_dir.join("mps-log");
        for dir in [&pipe_dir, &log_dir] {
            private_dir(dir).map_err(|e| MpsError::Dir(dir.clone(), e))?;
        }
        let mut d = Self { control: control.to_path_buf(), pipe_dir, log_dir, devices, running: false };
        d.launch()?;
        Ok(d)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.control);
        c.env("CUDA_MPS_PIPE_DIRECTORY", &self.pipe_dir).env("CUDA_MPS_LOG_DIRECTORY", &self.log_dir);
        if let Some(d) = &self.devices {
            c.env("CUDA_VISIBLE_DEVICES", d);
        }
        c
    }

    fn launch(&mut self) -> Result<(), MpsError> {
        let name = self.control.display().to_string();
        let out =
            self.command().arg("-d").stdin(Stdio::null()).output().map_err(|e| MpsError::Spawn(name.clone(), e))?;
        if !out.status.success() {
            return Err(MpsError::Failed(format!("{name} -d"), String::from_utf8_lossy(&out.stderr).trim().to_owned()));
        }
        self.running = true;
        tracing::info!(pipe_dir = %self.pipe_dir.display(), "MPS control daemon started");
        Ok(())
    }

    /// Sends one command to the daemon; its answer.
    fn send(&self, line: &str) -> Result<String, MpsError> {
        let name = self.control.display().to_string();
        let mut child = self
            .command()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| MpsError::Spawn(name.clone(), e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(format!("{line}\n").as_bytes()).map_err(|e| MpsError::Spawn(name.clone(), e))?;
        }
        let out = child.wait_with_output().map_err(|e| MpsError::Spawn(name.clone(), e))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(MpsError::Failed(format!("{name} <<< {line}"), why));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether the daemon answers.
    pub fn is_alive(&self) -> bool {
        self.running && self.send("get_server_list").is_ok()
    }

    /// Makes sure a daemon runs: starts a new one when the last one stopped
    /// answering (after a client's fault ended its MPS server, for example).
    pub fn ensure_running(&mut self) -> Result<bool, MpsError> {
        if self.is_alive() {
            return Ok(false);
        }
        tracing::warn!(pipe_dir = %self.pipe_dir.display(), "MPS control daemon not answering; starting it again");
        self.running = false;
        self.launch()?;
        Ok(true)
    }

    /// The environment of a worker that is to run as an MPS client, with
    /// at most `percent` of the SMs (`None`: no limit).
    pub fn client_env(&self, percent: Option<u32>) -> Vec<(String, String)> {
        let mut env = vec![("CUDA_MPS_PIPE_DIRECTORY".to_owned(), self.pipe_dir.display().to_string())];
        if let Some(p) = percent.filter(|p| (1..100).contains(p)) {
            env.push(("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".to_owned(), p.to_string()));
        }
        env
    }

    /// Stops the daemon (`quit`); done on drop too.
    pub fn stop(&mut self) -> Result<(), MpsError> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        self.send("quit").map(drop)
    }
}

impl Drop for MpsDaemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "stopping the MPS control daemon failed");
        }
    }
}

/// Creates `dir` readable by this user only.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the control program (the real one exists only on
    /// GPU hosts): `-d` marks a daemon as running in the pipe directory,
    /// commands answer while it runs, `quit` removes it; every call is
    /// logged with its environment.
    fn stand_in(dir: &Path) -> PathBuf {
        let path = dir.join("mps-control");
        let script = r#"#!/bin/sh
log="$CUDA_MPS_PIPE_DIRECTORY/../calls"
if [ "$1" = "-d" ]; then
    echo "start $CUDA_MPS_LOG_DIRECTORY ${CUDA_VISIBLE_DEVICES:-all}" >>"$log"
    touch "$CUDA_MPS_PIPE_DIRECTORY/control"
    exit 0
fi
read -r cmd
echo "$cmd" >>"$log"
[ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ] || { echo "no daemon" >&2; exit 1; }
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"#;
        std::fs::write(&path, script).expect("write the stand-in");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn daemon_lifecycle_with_private_directories() {
        let dir = std::env::temp_dir().join(format!("gpupool-mps-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let control = stand_in(&dir);
        let mut d = MpsDaemon::start(&control, &dir, Some("0".into())).expect("start");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("mps-pipe")).expect("pipe dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "private pipe directory");
        assert!(d.is_alive());
        let env = d.client_env(Some(25));
        assert!(env.contains(&("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".into(), "25".into())), "{env:?}");
        assert_eq!(d.client_env(Some(100)).len(), 1, "100 % is no limit");

        // The daemon goes away (a fault ended it): started again.
        std::fs::remove_file(dir.join("mps-pipe/control")).expect("kill the stand-in daemon");
        assert!(!d.is_alive());
        assert!(d.ensure_running().expect("restart"), "started again");
        assert!(!d.ensure_running().expect("running"), "nothing to do");

        drop(d);
        let calls = std::fs::read_to_string(dir.join("calls")).expect("calls");
        let lines: Vec<&str> = calls.lines().collect();
        assert!(lines[0].starts_with("start ") && lines[0].ends_with(" 0"), "{calls}");
        assert_eq!(lines.iter().filter(|l| l.starts_with("start")).count(), 2, "{calls}");
        assert_eq!(lines.last(), Some(&"quit"), "stopped on drop: {calls}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_control_program_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("gpupool-mps-missing-{}", std::process::id()));
        let err = MpsDaemon::start(Path::new("/nonexistent/nvidia-cuda-mps-control"), &dir, None).unwrap_err();
        assert!(err.to_string().contains("cannot run"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
