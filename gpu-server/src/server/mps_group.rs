//! The sessions of shared leases on one whole GPU: their worker processes
//! run as clients of the server's MPS daemon for that GPU ([`crate::mps`]),
//! and so share fate (`docs/sharing.md`).
//!
//! The daemon starts on the first shared session, not with the server: a
//! server that never gets a shared lease never runs one. Before every
//! shared worker starts, the daemon is asked whether it still answers and
//! started again when it does not (a fault may have ended it). When one
//! worker of the group dies abnormally, MPS has ended the contexts of the
//! others as well: every other session of the group is told at once
//! ([`MpsGroup::fault`]), so that its client gets a clear close reason
//! instead of waiting on a context that is gone, and its worker exits (an
//! MPS server takes new clients only once the faulted ones are gone).

use super::metrics::{Metrics, add};
use crate::config::{MpsMode, MpsSettings};
use crate::mps::{MpsDaemon, MpsError};
use crate::share::{Admission, TimeShare};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One whole GPU's MPS daemon and the shared sessions under it.
#[derive(Debug)]
pub(crate) struct MpsGroup {
    mode: MpsMode,
    control: PathBuf,
    /// Parent of the daemon's private pipe and log directories.
    state_dir: PathBuf,
    /// The daemon's `CUDA_VISIBLE_DEVICES` (none: the process's own).
    devices: Option<String>,
    /// Started on first need; touched only on blocking threads (the
    /// control program is a process run to completion).
    daemon: Arc<Mutex<Option<MpsDaemon>>>,
    /// Faults of the group so far; members watch it.
    faults: watch::Sender<u64>,
    /// The temporal share of the GPU's shared sessions (none: off). Their
    /// workers report each batch's busy time; a session past its share is
    /// sent a hold for its next batch (`crate::share`).
    share: Option<Mutex<TimeShare>>,
}

impl MpsGroup {
    /// The group of the GPU that `devices` names, its daemon's directories
    /// under `state_dir`.
    pub(crate) fn new(settings: &MpsSettings, state_dir: PathBuf, devices: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            mode: settings.mode,
            control: settings.control.clone(),
            state_dir,
            devices,
            daemon: Arc::new(Mutex::new(None)),
            faults: watch::channel(0).0,
            share: settings.time_share.map(|period| Mutex::new(TimeShare::new(period, Instant::now()))),
        })
    }

    fn time_share(&self) -> Option<std::sync::MutexGuard<'_, TimeShare>> {
        Some(self.share.as_ref()?.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Meters `session` with `percent` of the GPU's time; false when the
    /// temporal share is off.
    pub(crate) fn share_join(&self, session: u64, percent: u32) -> bool {
        self.time_share().map(|mut s| s.add(session, percent)).is_some()
    }

    /// `session` ended: it is metered no more.
    pub(crate) fn share_leave(&self, session: u64) {
        if let Some(mut s) = self.time_share() {
            s.remove(session);
        }
    }

    /// A batch of `session` kept its worker busy for `busy`: the hold its
    /// next batch waits out, when it is past its share of the period while
    /// another session wants the GPU.
    pub(crate) fn share_report(&self, session: u64, busy: Duration, metrics: &Metrics) -> Option<Duration> {
        let now = Instant::now();
        let mut share = self.time_share()?;
        share.record(session, busy, now);
        match share.admit(session, now) {
            Admission::Run => None,
            Admission::HoldUntil(t) => {
                add(&metrics.time_share_holds, 1);
                Some(t.saturating_duration_since(now))
            }
        }
    }

    /// Whether shared sessions run under MPS, given the backend the
    /// group's workers reported (`"cuda"`, `"emulated"`).
    pub(crate) fn applies(&self, backend: Option<&str>) -> bool {
        match self.mode {
            MpsMode::Off => false,
            MpsMode::On => true,
            MpsMode::Auto => backend == Some("cuda") && found(&self.control),
        }
    }

    /// The environment of a shared worker with `percent` of the SMs: starts
    /// the daemon on first need, and again when it stopped answering.
    pub(crate) async fn client_env(&self, percent: u32, metrics: &Metrics) -> Result<Vec<(String, String)>, MpsError> {
        let (daemon, control, state_dir, devices) =
            (self.daemon.clone(), self.control.clone(), self.state_dir.clone(), self.devices.clone());
        let (env, started) = tokio::task::spawn_blocking(move || {
            let mut slot = daemon.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let started = match slot.as_mut() {
                Some(d) => d.ensure_running()?,
                None => {
                    *slot = Some(MpsDaemon::start(&control, &state_dir, devices)?);
                    true
                }
            };
            let mut env = slot.as_ref().map(|d| d.client_env(Some(percent))).unwrap_or_default();
            env.push((crate::worker::MPS_CLIENT_ENV.to_owned(), "1".to_owned()));
            Ok::<_, MpsError>((env, started))
        })
        .await
        .map_err(|e| MpsError::Failed("the MPS control task".into(), e.to_string()))??;
        if started {
            add(&metrics.mps_daemon_starts, 1);
        }
        Ok(env)
    }

    /// A member's view of the group's faults, from now on.
    pub(crate) fn join(&self) -> watch::Receiver<u64> {
        self.faults.subscribe()
    }

    /// A member's worker died abnormally: every other member is told.
    pub(crate) fn fault(&self, metrics: &Metrics) {
        add(&metrics.mps_group_faults, 1);
        self.faults.send_modify(|n| *n += 1);
    }

    /// Stops the daemon, if one was started (server shutdown).
    pub(crate) async fn stop(&self) {
        let daemon = self.daemon.clone();
        let stopped = tokio::task::spawn_blocking(move || {
            let taken = daemon.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
            taken.map(|mut d| d.stop()).transpose()
        })
        .await;
        match stopped {
            Ok(Ok(Some(()))) => tracing::info!(dir = %self.state_dir.display(), "MPS control daemon stopped"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "stopping the MPS control daemon failed"),
            Err(e) => tracing::warn!(error = %e, "stopping the MPS control daemon failed"),
        }
    }
}

/// Whether `program` exists: as a path, or by name on PATH.
fn found(program: &Path) -> bool {
    if program.components().count() > 1 {
        return program.is_file();
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Where a server's MPS daemons keep their directories when the settings
/// name none: private to this process, so two servers on a host never
/// share a daemon.
pub(crate) fn default_dir() -> PathBuf {
    std::env::temp_dir().join(format!("gpupool-mps-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_needs_a_gpu_and_the_control_program() {
        let settings = |mode, control: &str| MpsSettings { mode, control: control.into(), dir: None, time_share: None };
        let g = MpsGroup::new(&settings(MpsMode::Auto, "sh"), "/tmp/x".into(), None);
        assert!(g.applies(Some("cuda")), "sh is on PATH");
        assert!(!g.applies(Some("emulated")), "no MPS on the emulated device");
        let g = MpsGroup::new(&settings(MpsMode::Auto, "/nonexistent/nvidia-cuda-mps-control"), "/tmp/x".into(), None);
        assert!(!g.applies(Some("cuda")), "no control program");
        let g = MpsGroup::new(&settings(MpsMode::On, "/nonexistent"), "/tmp/x".into(), None);
        assert!(g.applies(Some("emulated")));
        let g = MpsGroup::new(&settings(MpsMode::Off, "sh"), "/tmp/x".into(), None);
        assert!(!g.applies(Some("cuda")));
    }

    #[test]
    fn members_see_a_fault_and_it_is_counted() {
        let g = MpsGroup::new(&MpsSettings::default(), "/tmp/x".into(), None);
        let metrics = Metrics::default();
        let member = g.join();
        assert!(!member.has_changed().unwrap_or(true));
        g.fault(&metrics);
        assert!(member.has_changed().unwrap_or(false));
        assert_eq!(metrics.mps_group_faults.load(std::sync::atomic::Ordering::Relaxed), 1);
        let late = g.join();
        assert!(!late.has_changed().unwrap_or(true), "a session that joins later is not affected");
    }

    #[test]
    fn a_session_past_its_share_is_held_while_another_wants_the_gpu() {
        let metrics = Metrics::default();
        let off = MpsGroup::new(&MpsSettings::default(), "/tmp/x".into(), None);
        assert!(!off.share_join(1, 50), "no temporal share unless configured");
        assert_eq!(off.share_report(1, Duration::from_secs(1), &metrics), None);
        let settings = MpsSettings { time_share: Some(Duration::from_secs(10)), ..MpsSettings::default() };
        let g = MpsGroup::new(&settings, "/tmp/x".into(), None);
        assert!(g.share_join(1, 75) && g.share_join(2, 25));
        // Both report within the (long) period: session 2 past its quarter.
        assert_eq!(g.share_report(1, Duration::from_millis(10), &metrics), None);
        let hold = g.share_report(2, Duration::from_secs(3), &metrics).expect("held");
        assert!(hold > Duration::from_secs(6) && hold <= Duration::from_secs(10), "{hold:?}");
        assert_eq!(metrics.time_share_holds.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Alone, it is lent the idle time.
        g.share_leave(1);
        assert_eq!(g.share_report(2, Duration::from_secs(1), &metrics), None);
    }
}
