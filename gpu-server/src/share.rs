//! Temporal share of one GPU (issue 19): each session's GPU busy time is
//! metered, and when the GPU is contended a session past its share of the
//! current period waits for the next one. Idle capacity is lent out: a
//! session past its share still runs while no other session within its
//! share is waiting (work-conserving), as FaST-GShare's token buckets do.
//!
//! Sans-I/O: the caller says when a session wants to run a batch
//! ([`TimeShare::admit`]), how long its work kept the GPU busy
//! ([`TimeShare::record`], measured with events around its batches) and
//! when a session ends; time comes in as [`Instant`]s, so the tests drive a
//! fake clock. Shares are weights (a lease's `compute_percent`, 0 counting
//! as the default weight): each period, the sessions that asked for the GPU
//! in it split the period in proportion to their weights.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Longest hold a worker accepts (a period is tens of milliseconds).
const MAX_HOLD: Duration = Duration::from_secs(1);

/// A worker process's side of the temporal share: while active (its
/// session is metered), each batch first waits out the hold its supervisor
/// sent, and its busy time is reported once it ran. One per process: a
/// worker serves one session.
pub struct Gate {
    active: AtomicBool,
    hold_until: Mutex<Option<Instant>>,
    report: Box<dyn Fn(Duration) + Send + Sync>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("active", &self.active)
            .field("hold_until", &self.hold_until)
            .finish_non_exhaustive()
    }
}

static GATE: OnceLock<Gate> = OnceLock::new();

/// Installs this process's gate, inactive, reporting with `report`.
pub fn install_gate(report: Box<dyn Fn(Duration) + Send + Sync>) -> &'static Gate {
    GATE.get_or_init(|| Gate { active: AtomicBool::new(false), hold_until: Mutex::new(None), report })
}

/// The gate, when this process's session is metered.
pub fn gate() -> Option<&'static Gate> {
    GATE.get().filter(|g| g.active.load(Ordering::Relaxed))
}

impl Gate {
    /// The session is metered from now on.
    pub fn activate(&self) {
        self.active.store(true, Ordering::Relaxed);
    }

    /// The next batch waits `hold` (at most [`MAX_HOLD`]).
    pub fn hold_for(&self, hold: Duration) {
        let until = Instant::now() + hold.min(MAX_HOLD);
        let mut h = self.hold_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *h = Some(h.map_or(until, |t| t.max(until)));
    }

    /// Before a batch: waits out a hold.
    pub fn before_batch(&self) {
        let until = self.hold_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(wait) = until.and_then(|t| t.checked_duration_since(Instant::now())) {
            std::thread::sleep(wait);
        }
    }

    /// After a batch: reports how long it kept the session busy.
    pub fn after_batch(&self, busy: Duration) {
        (self.report)(busy);
    }
}

/// Weight of a session whose lease names no share.
pub const DEFAULT_WEIGHT: u32 = 100;

/// What a session may do with its next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Run it now.
    Run,
    /// Hold it until this instant (the next period), then ask again.
    HoldUntil(Instant),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    weight: u32,
    /// Busy time charged in the current period.
    used: Duration,
    /// Asked for the GPU in the current period (counts for the split).
    active: bool,
    /// Held now, waiting for the next period.
    waiting: bool,
}

/// The temporal share of one GPU.
#[derive(Debug)]
pub struct TimeShare {
    period: Duration,
    period_start: Instant,
    sessions: HashMap<u64, Entry>,
    /// Batches held so far, for status and metrics.
    holds: u64,
}

impl TimeShare {
    /// A share with periods of `period` (FaST-GShare uses tens of ms).
    pub fn new(period: Duration, now: Instant) -> Self {
        Self { period: period.max(Duration::from_millis(1)), period_start: now, sessions: HashMap::new(), holds: 0 }
    }

    /// Registers a session with its weight (`compute_percent`; 0: default).
    pub fn add(&mut self, session: u64, weight: u32) {
        let weight = if weight == 0 { DEFAULT_WEIGHT } else { weight };
        self.sessions.insert(session, Entry { weight, used: Duration::ZERO, active: false, waiting: false });
    }

    /// Forgets a session (it ended).
    pub fn remove(&mut self, session: u64) {
        self.sessions.remove(&session);
    }

    /// Batches held so far.
    pub fn holds(&self) -> u64 {
        self.holds
    }

    /// Busy time `session` was charged in the current period.
    pub fn used(&self, session: u64) -> Option<Duration> {
        self.sessions.get(&session).map(|e| e.used)
    }

    fn roll(&mut self, now: Instant) {
        if now < self.period_start + self.period {
            return;
        }
        // Whole periods passed: start the one `now` lies in.
        let periods = (now - self.period_start).as_nanos() / self.period.as_nanos();
        let step = self.period.saturating_mul(u32::try_from(periods).unwrap_or(u32::MAX));
        self.period_start += step;
        for e in self.sessions.values_mut() {
            e.used = Duration::ZERO;
            e.active = e.waiting;
            e.waiting = false;
        }
    }

    /// `session`'s share of the current period, among the active sessions.
    fn quota(&self, session: u64) -> Duration {
        let total: u64 = self.sessions.values().filter(|e| e.active).map(|e| u64::from(e.weight)).sum();
        let Some(own) = self.sessions.get(&session) else { return self.period };
        if total == 0 {
            return self.period;
        }
        let nanos = self.period.as_nanos() * u128::from(own.weight) / u128::from(total);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// May `session` run a batch now? An unknown session runs (it is
    /// not metered). A session past its share waits for the next period
    /// only while another session within its share wants the GPU.
    pub fn admit(&mut self, session: u64, now: Instant) -> Admission {
        self.roll(now);
        let Some(e) = self.sessions.get_mut(&session) else { return Admission::Run };
        e.active = true;
        let used = e.used;
        if used < self.quota(session) {
            self.set_waiting(session, false);
            return Admission::Run;
        }
        let contended = self
            .sessions
            .iter()
            .any(|(&id, other)| id != session && other.active && (other.waiting || other.used < self.quota(id)));
        if !contended {
            self.set_waiting(session, false);
            return Admission::Run;
        }
        self.set_waiting(session, true);
        self.holds += 1;
        Admission::HoldUntil(self.period_start + self.period)
    }

    fn set_waiting(&mut self, session: u64, waiting: bool) {
        if let Some(e) = self.sessions.get_mut(&session) {
            e.waiting = waiting;
        }
    }

    /// Charges `busy` GPU time to `session`, measured at `now`.
    pub fn record(&mut self, session: u64, busy: Duration, now: Instant) {
        self.roll(now);
        if let Some(e) = self.sessions.get_mut(&session) {
            e.used += busy;
            e.active = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs sessions that always have work, each batch `batch` long, for
    /// `periods` periods of 100 ms; returns each session's busy time.
    fn simulate(weights: &[u32], batch: Duration, periods: u32) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut share = TimeShare::new(100 * MS, t0);
        for (i, &w) in weights.iter().enumerate() {
            share.add(i as u64, w);
        }
        let mut busy = vec![Duration::ZERO; weights.len()];
        let mut held_until = vec![t0; weights.len()];
        let mut now = t0;
        let end = t0 + 100 * MS * periods;
        while now < end {
            // One batch at a time on the GPU: the first session allowed runs.
            let mut ran = false;
            for i in 0..weights.len() {
                if held_until[i] > now {
                    continue;
                }
                match share.admit(i as u64, now) {
                    Admission::Run => {
                        now += batch;
                        share.record(i as u64, batch, now);
                        busy[i] += batch;
                        ran = true;
                    }
                    Admission::HoldUntil(t) => held_until[i] = t,
                }
            }
            if !ran {
                now = *held_until.iter().min().expect("sessions");
            }
        }
        busy
    }

    #[test]
    fn busy_sessions_split_the_gpu_by_weight() {
        let busy = simulate(&[75, 25], MS, 20);
        let total: Duration = busy.iter().sum();
        let first = busy[0].as_secs_f64() / total.as_secs_f64();
        assert!((0.70..=0.80).contains(&first), "75 % share got {first:.3}");
    }

    #[test]
    fn equal_weights_share_equally() {
        let busy = simulate(&[0, 0, 0, 0], MS, 10);
        for b in &busy {
            let part = b.as_secs_f64() / busy.iter().sum::<Duration>().as_secs_f64();
            assert!((0.22..=0.28).contains(&part), "{busy:?}");
        }
    }

    #[test]
    fn a_lone_session_past_its_share_keeps_running() {
        let t0 = Instant::now();
        let mut share = TimeShare::new(100 * MS, t0);
        share.add(1, 10);
        share.add(2, 90);
        // Session 2 never asks: session 1 may use the whole period.
        let mut now = t0;
        for _ in 0..90 {
            assert_eq!(share.admit(1, now), Admission::Run);
            now += MS;
            share.record(1, MS, now);
        }
        assert_eq!(share.holds(), 0, "idle capacity is lent");
    }

    #[test]
    fn a_session_past_its_share_waits_for_the_next_period_while_contended() {
        let t0 = Instant::now();
        let mut share = TimeShare::new(100 * MS, t0);
        share.add(1, 50);
        share.add(2, 50);
        assert_eq!(share.admit(2, t0), Admission::Run); // 2 wants the GPU too
        share.record(1, 60 * MS, t0 + 60 * MS);
        assert_eq!(share.admit(1, t0 + 60 * MS), Admission::HoldUntil(t0 + 100 * MS));
        assert_eq!(share.holds(), 1);
        // Next period: charges reset, the held session runs again.
        assert_eq!(share.admit(1, t0 + 100 * MS), Admission::Run);
        assert_eq!(share.used(1), Some(Duration::ZERO));
        // Periods skipped while idle are skipped whole.
        assert_eq!(share.admit(1, t0 + 1000 * MS + 5 * MS), Admission::Run);
        share.remove(1);
        assert_eq!(share.admit(1, t0 + 1100 * MS), Admission::Run, "unknown sessions are not metered");
    }
}
