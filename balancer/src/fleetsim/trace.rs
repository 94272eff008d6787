//! Invocation traces: a synthetic generator with the published shape of
//! production serverless workloads, or a trace read from CSV.
//!
//! The shape (Shahrad et al., "Serverless in the Wild", ATC'20, on Azure
//! Functions; the FluidFaaS paper reuses it for GPU functions):
//! - per-function rates spread over many orders of magnitude, most functions
//!   invoked less than once a minute, a few very often: here the log10 of a
//!   function's mean rate is normal, clipped;
//! - durations log-normal, most under a second: a per-function median,
//!   log-normal across functions, and log-normal spread around it;
//! - a diurnal cycle common to all functions, and bursts: now and then a
//!   function's rate is multiplied for some minutes;
//! - per-function memory and compute needs, drawn from classes that match
//!   the MIG profiles (memory in GiB, compute slices of 7).
//!
//! A function's arrivals and durations come from its own random stream, so
//! the trace is the same for a seed whatever the number of threads or the
//! order of generation.

use std::collections::HashMap;
use std::io::BufRead;

use serde::{Deserialize, Serialize};

use super::SimError;
use super::rng::Rng;

/// One class of function needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeedClass {
    /// Share of functions in this class (the shares are normalised).
    pub share: f64,
    /// Memory needed, GiB: uniform in [low, high].
    pub memory_gib: [f64; 2],
    /// Compute slices (of 7) needed: 1, 2, 3, 4 or 7.
    pub compute: u32,
}

/// Parameters of the synthetic trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceParams {
    /// Seed of every draw.
    pub seed: u64,
    /// Length of the trace.
    pub hours: f64,
    /// Number of functions.
    pub functions: u32,
    /// Mean of log10(mean invocations per second) over functions.
    pub rate_log10_mean: f64,
    /// Its standard deviation.
    pub rate_log10_sd: f64,
    /// Clip of log10(rate): lowest and highest.
    pub rate_log10_range: [f64; 2],
    /// Median over functions of a function's median duration, ms.
    pub duration_median_ms: f64,
    /// Sigma (natural log) of functions' median durations.
    pub duration_function_sigma: f64,
    /// Sigma (natural log) of one function's durations around its median.
    pub duration_invocation_sigma: f64,
    /// Longest duration, ms.
    pub duration_max_ms: f64,
    /// Diurnal amplitude: the rate swings between (1 - a) and (1 + a) times its mean.
    pub diurnal_amplitude: f64,
    /// Hour of the day (from the trace start) of the peak.
    pub diurnal_peak_hour: f64,
    /// Expected bursts per function per day.
    pub bursts_per_day: f64,
    /// Mean length of a burst, minutes (exponential).
    pub burst_minutes: f64,
    /// Rate multiplier during a burst.
    pub burst_factor: f64,
    /// SLO of each function on queue wait + start-up: the larger of this
    /// floor and `slo_factor` times its median duration, ms.
    pub slo_floor_ms: f64,
    /// See `slo_floor_ms`.
    pub slo_factor: f64,
    /// Classes of memory and compute needs.
    pub classes: Vec<NeedClass>,
}

impl Default for TraceParams {
    fn default() -> Self {
        let class = |share, lo, hi, compute| NeedClass { share, memory_gib: [lo, hi], compute };
        Self {
            seed: 1,
            hours: 24.0,
            functions: 20_000,
            rate_log10_mean: -3.3,
            rate_log10_sd: 1.0,
            rate_log10_range: [-5.5, 1.0],
            duration_median_ms: 250.0,
            duration_function_sigma: 0.8,
            duration_invocation_sigma: 0.5,
            duration_max_ms: 60_000.0,
            diurnal_amplitude: 0.5,
            diurnal_peak_hour: 14.0,
            bursts_per_day: 1.0,
            burst_minutes: 5.0,
            burst_factor: 10.0,
            slo_floor_ms: 2_000.0,
            slo_factor: 5.0,
            classes: vec![
                class(0.55, 1.0, 9.0, 1),
                class(0.15, 10.0, 19.0, 1),
                class(0.15, 4.0, 19.0, 2),
                class(0.08, 20.0, 39.0, 3),
                class(0.07, 20.0, 39.0, 4),
            ],
        }
    }
}

impl TraceParams {
    /// Every problem with the parameters, at once.
    pub fn validate(&self) -> Result<(), SimError> {
        let mut p = Vec::new();
        if !(self.hours > 0.0 && self.hours <= 24.0 * 366.0) {
            p.push(format!("hours is {}, not in (0, 8784]", self.hours));
        }
        if self.functions == 0 {
            p.push("functions is 0".to_owned());
        }
        if self.rate_log10_range[0] > self.rate_log10_range[1] || self.rate_log10_range[1] > 4.0 {
            p.push(format!("rate_log10_range {:?} is not [low <= high <= 4]", self.rate_log10_range));
        }
        super::check_values(
            &mut p,
            false,
            &[
                ("rate_log10_sd", self.rate_log10_sd),
                ("duration_function_sigma", self.duration_function_sigma),
                ("duration_invocation_sigma", self.duration_invocation_sigma),
                ("bursts_per_day", self.bursts_per_day),
            ],
        );
        super::check_values(
            &mut p,
            true,
            &[
                ("duration_median_ms", self.duration_median_ms),
                ("duration_max_ms", self.duration_max_ms),
                ("burst_minutes", self.burst_minutes),
                ("burst_factor", self.burst_factor),
                ("slo_floor_ms", self.slo_floor_ms),
            ],
        );
        if !(0.0..1.0).contains(&self.diurnal_amplitude) {
            p.push(format!("diurnal_amplitude is {}, not in [0, 1)", self.diurnal_amplitude));
        }
        if self.classes.is_empty() || self.classes.iter().map(|c| c.share).sum::<f64>() <= 0.0 {
            p.push("classes is empty or its shares add up to 0".to_owned());
        }
        for c in &self.classes {
            if !matches!(c.compute, 1 | 2 | 3 | 4 | 7) {
                p.push(format!("a class asks {} compute slices: 1, 2, 3, 4 or 7", c.compute));
            }
            if !(c.share >= 0.0 && c.memory_gib[0] > 0.0 && c.memory_gib[0] <= c.memory_gib[1]) {
                p.push(format!("a class has share {} and memory {:?} GiB", c.share, c.memory_gib));
            }
        }
        if p.is_empty() { Ok(()) } else { Err(SimError::Params(p.join("; "))) }
    }
}

/// One function.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    /// Its name (`f<n>` for generated ones).
    pub name: String,
    /// Memory it needs, MiB.
    pub memory_mib: u64,
    /// Compute slices (of 7) it needs.
    pub compute: u32,
    /// SLO on queue wait + start-up, ms.
    pub slo_ms: u32,
    /// Mean invocations per second over the trace (informative).
    pub rate: f64,
}

/// One invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Invocation {
    /// Arrival, ms from the trace start.
    pub at_ms: u64,
    /// Index of its function.
    pub function: u32,
    /// Run time on an instance of the size it asks, ms.
    pub duration_ms: u32,
}

/// A trace: functions and their invocations by arrival.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// The functions.
    pub functions: Vec<Function>,
    /// Invocations, by arrival.
    pub invocations: Vec<Invocation>,
    /// Its length, ms.
    pub length_ms: u64,
}

/// Stream numbers: function `f`'s profile and its arrivals.
const PROFILE_STREAM: u64 = 1 << 40;

impl Trace {
    /// Generates the synthetic trace of `params` (validate them first).
    pub fn generate(params: &TraceParams) -> Trace {
        let length_ms = (params.hours * 3_600_000.0) as u64;
        let total_share: f64 = params.classes.iter().map(|c| c.share).sum();
        let mut functions = Vec::with_capacity(params.functions as usize);
        let mut invocations = Vec::new();
        for f in 0..params.functions {
            let mut r = Rng::new(params.seed, PROFILE_STREAM + u64::from(f));
            let log_rate = (params.rate_log10_mean + params.rate_log10_sd * r.normal())
                .clamp(params.rate_log10_range[0], params.rate_log10_range[1]);
            let rate = 10f64.powf(log_rate);
            let mut pick = r.unit() * total_share;
            let class = params
                .classes
                .iter()
                .find(|c| {
                    pick -= c.share;
                    pick < 0.0
                })
                .unwrap_or(&params.classes[params.classes.len() - 1]);
            let gib = class.memory_gib[0] + r.unit() * (class.memory_gib[1] - class.memory_gib[0]);
            let median = params.duration_median_ms * (params.duration_function_sigma * r.normal()).exp();
            let median = median.clamp(1.0, params.duration_max_ms);
            let slo_ms = params.slo_floor_ms.max(params.slo_factor * median).min(f64::from(u32::MAX)) as u32;
            functions.push(Function {
                name: format!("f{f}"),
                memory_mib: (gib * 1024.0).round().max(1.0) as u64,
                compute: class.compute,
                slo_ms,
                rate,
            });
            let mut r = Rng::new(params.seed, u64::from(f));
            arrivals(params, rate, length_ms, &mut r, |at_ms, r| {
                let d = median * (params.duration_invocation_sigma * r.normal()).exp();
                let duration_ms = d.clamp(1.0, params.duration_max_ms) as u32;
                invocations.push(Invocation { at_ms, function: f, duration_ms });
            });
        }
        invocations.sort_unstable();
        Trace { functions, invocations, length_ms }
    }

    /// Reads a trace from CSV: a header line, then
    /// `time_ms,function,duration_ms,memory_mib,compute,slo_ms` per
    /// invocation. A function's needs and SLO are those of its first row.
    pub fn read_csv(input: impl BufRead) -> Result<Trace, SimError> {
        let mut ids: HashMap<String, u32> = HashMap::new();
        let mut functions: Vec<Function> = Vec::new();
        let mut invocations = Vec::new();
        for (n, line) in input.lines().enumerate() {
            let line = line.map_err(|e| SimError::Csv { line: n + 1, reason: e.to_string() })?;
            let line = line.trim();
            if n == 0 || line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: String| SimError::Csv { line: n + 1, reason };
            let cols: Vec<&str> = line.split(',').map(str::trim).collect();
            let [at, name, duration, memory, compute, slo] = cols[..] else {
                return Err(bad(format!("{} columns, 6 expected", cols.len())));
            };
            let num = |what: &str, v: &str| v.parse::<u64>().map_err(|e| bad(format!("{what} {v:?}: {e}")));
            let (at_ms, duration, memory_mib, compute, slo) = (
                num("time_ms", at)?,
                num("duration_ms", duration)?,
                num("memory_mib", memory)?,
                num("compute", compute)?,
                num("slo_ms", slo)?,
            );
            if !matches!(compute, 1 | 2 | 3 | 4 | 7) || memory_mib == 0 {
                return Err(bad(format!("compute {compute} (1, 2, 3, 4 or 7) or memory_mib {memory_mib} (> 0)")));
            }
            let function = match ids.get(name) {
                Some(&f) => f,
                None => {
                    let f = u32::try_from(functions.len()).map_err(|_| bad("too many functions".into()))?;
                    ids.insert(name.to_owned(), f);
                    functions.push(Function {
                        name: name.to_owned(),
                        memory_mib,
                        compute: compute as u32,
                        slo_ms: u32::try_from(slo).unwrap_or(u32::MAX),
                        rate: 0.0,
                    });
                    f
                }
            };
            let duration_ms = u32::try_from(duration.max(1)).unwrap_or(u32::MAX);
            invocations.push(Invocation { at_ms, function, duration_ms });
        }
        invocations.sort_unstable();
        let length_ms = invocations.last().map_or(0, |i| i.at_ms + 1);
        let secs = length_ms as f64 / 1000.0;
        for i in &invocations {
            functions[i.function as usize].rate += 1.0 / secs.max(1.0);
        }
        Ok(Trace { functions, invocations, length_ms })
    }

    /// Writes the trace in the CSV form [`Trace::read_csv`] reads.
    pub fn write_csv(&self, mut out: impl std::io::Write) -> std::io::Result<()> {
        writeln!(out, "time_ms,function,duration_ms,memory_mib,compute,slo_ms")?;
        for i in &self.invocations {
            let f = &self.functions[i.function as usize];
            writeln!(out, "{},{},{},{},{},{}", i.at_ms, f.name, i.duration_ms, f.memory_mib, f.compute, f.slo_ms)?;
        }
        Ok(())
    }
}

/// Calls `emit` at each arrival of a function of mean rate `rate` (per
/// second) over `length_ms`: a Poisson process whose rate follows the
/// diurnal cycle and the function's bursts, drawn by thinning, one
/// stretch (in or out of a burst) at a time so that rare bursts do not
/// make every draw pay for their peak.
fn arrivals(params: &TraceParams, rate: f64, length_ms: u64, r: &mut Rng, mut emit: impl FnMut(u64, &mut Rng)) {
    let length = length_ms as f64;
    let day = 86_400_000.0;
    let mut bursts: Vec<(f64, f64)> = (0..r.poisson(params.bursts_per_day * length / day))
        .map(|_| {
            let start = r.unit() * length;
            (start, start + r.exp(params.burst_minutes * 60_000.0))
        })
        .collect();
    bursts.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Stretches [from, to) with their rate multiplier.
    let mut stretches = Vec::with_capacity(2 * bursts.len() + 1);
    let mut at = 0.0;
    for (start, end) in bursts {
        let (start, end) = (start.max(at), end.min(length));
        if end <= start {
            continue;
        }
        stretches.push((at, start, 1.0));
        stretches.push((start, end, params.burst_factor));
        at = end;
    }
    stretches.push((at, length, 1.0));
    let a = params.diurnal_amplitude;
    let peak = params.diurnal_peak_hour * 3_600_000.0;
    let per_ms = rate / 1000.0;
    for (from, to, factor) in stretches {
        let max = per_ms * factor * (1.0 + a);
        if max <= 0.0 || to <= from {
            continue;
        }
        let mut t = from;
        loop {
            t += r.exp(1.0 / max);
            if t >= to {
                break;
            }
            let diurnal = 1.0 + a * (std::f64::consts::TAU * (t - peak) / day).cos();
            if r.unit() * (1.0 + a) < diurnal {
                emit(t as u64, r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> TraceParams {
        TraceParams { seed, hours: 2.0, functions: 300, ..TraceParams::default() }
    }

    #[test]
    fn the_default_parameters_are_valid_and_bad_ones_are_all_reported() {
        TraceParams::default().validate().unwrap();
        let bad = TraceParams { hours: 0.0, functions: 0, diurnal_amplitude: 1.5, ..TraceParams::default() };
        let SimError::Params(why) = bad.validate().unwrap_err() else { panic!("a parameter error") };
        assert!(why.contains("hours") && why.contains("functions") && why.contains("diurnal"), "{why}");
    }

    #[test]
    fn a_seed_gives_the_same_trace_and_another_seed_another() {
        let a = Trace::generate(&small(5));
        assert_eq!(a, Trace::generate(&small(5)));
        assert_ne!(a.invocations, Trace::generate(&small(6)).invocations);
        assert!(a.invocations.windows(2).all(|w| w[0] <= w[1]));
        assert!(a.invocations.iter().all(|i| i.at_ms < a.length_ms));
    }

    #[test]
    fn generated_trace_has_the_published_shape() {
        let params = TraceParams { hours: 24.0, functions: 2_000, ..TraceParams::default() };
        let t = Trace::generate(&params);
        // Most functions are invoked less than once a minute.
        let rare = t.functions.iter().filter(|f| f.rate < 1.0 / 60.0).count();
        assert!(rare * 10 > t.functions.len() * 7, "{rare} of {}", t.functions.len());
        // Rates span many orders of magnitude.
        let (lo, hi) = t.functions.iter().fold((f64::MAX, 0f64), |(lo, hi), f| (lo.min(f.rate), hi.max(f.rate)));
        assert!(hi / lo > 1e4, "{lo} .. {hi}");
        // Most durations are under a second.
        let short = t.invocations.iter().filter(|i| i.duration_ms < 1_000).count();
        assert!(short * 10 > t.invocations.len() * 7, "{short} of {}", t.invocations.len());
        // The diurnal peak hour sees more than the trough hour.
        let in_hour = |h: u64| t.invocations.iter().filter(|i| i.at_ms / 3_600_000 == h).count();
        assert!(in_hour(14) > in_hour(2) * 2, "{} vs {}", in_hour(14), in_hour(2));
    }

    #[test]
    fn csv_round_trips_and_bad_rows_name_their_line() {
        let t = Trace::generate(&small(3));
        let mut out = Vec::new();
        t.write_csv(&mut out).unwrap();
        let back = Trace::read_csv(&out[..]).unwrap();
        assert_eq!(back.invocations.len(), t.invocations.len());
        let used: Vec<&Function> = {
            let mut seen = vec![false; t.functions.len()];
            t.invocations.iter().for_each(|i| seen[i.function as usize] = true);
            t.functions.iter().zip(seen).filter(|(_, s)| *s).map(|(f, _)| f).collect()
        };
        assert_eq!(back.functions.len(), used.len());
        for f in &back.functions {
            let orig = used.iter().find(|g| g.name == f.name).unwrap();
            assert_eq!((f.memory_mib, f.compute, f.slo_ms), (orig.memory_mib, orig.compute, orig.slo_ms));
        }
        let err = Trace::read_csv(&b"time_ms,function,duration_ms,memory_mib,compute,slo_ms\n1,a,2,3,5,6\n"[..]);
        assert!(matches!(err, Err(SimError::Csv { line: 2, .. })), "{err:?}");
    }
}
