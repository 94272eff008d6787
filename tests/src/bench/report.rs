//! The results: rows of native and remote figures with their ratio and the
//! issue's targets, rendered as a text table and as JSON.

use std::fmt::{self, Write as _};
use std::time::Duration;

/// Unit of a row's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    Micros,
    Millis,
    Seconds,
    GibPerSec,
}

impl Unit {
    fn label(self) -> &'static str {
        match self {
            Unit::Micros => "µs",
            Unit::Millis => "ms",
            Unit::Seconds => "s",
            Unit::GibPerSec => "GiB/s",
        }
    }

    /// The unit's name in JSON (ASCII).
    fn key(self) -> &'static str {
        match self {
            Unit::Micros => "us",
            Unit::Millis => "ms",
            Unit::Seconds => "s",
            Unit::GibPerSec => "GiB/s",
        }
    }

    /// A duration in this unit (time units only).
    pub(crate) fn of(self, d: Duration) -> f64 {
        match self {
            Unit::Micros => d.as_secs_f64() * 1e6,
            Unit::Millis => d.as_secs_f64() * 1e3,
            Unit::Seconds | Unit::GibPerSec => d.as_secs_f64(),
        }
    }

    fn format(self, v: f64) -> String {
        match self {
            Unit::Micros | Unit::Millis => format!("{v:.1} {}", self.label()),
            Unit::Seconds => format!("{v:.3} {}", self.label()),
            Unit::GibPerSec => format!("{v:.2} {}", self.label()),
        }
    }
}

/// A goal from the issue, checked against a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Target {
    /// The remote figure is at most this, in the row's unit.
    RemoteAtMost(f64),
    /// The remote figure is below this, in the row's unit.
    RemoteBelow(f64),
    /// The remote figure is at least this, in the row's unit.
    RemoteAtLeast(f64),
    /// remote / native is at most this.
    RatioAtMost(f64),
    /// remote / native is at least this (rates: the remote reaches this
    /// share of native).
    RatioAtLeast(f64),
}

impl Target {
    fn describe(self, unit: Unit) -> String {
        match self {
            Target::RemoteAtMost(v) => format!("≤ {}", unit.format(v)),
            Target::RemoteBelow(v) => format!("< {}", unit.format(v)),
            Target::RemoteAtLeast(v) => format!("≥ {}", unit.format(v)),
            Target::RatioAtMost(r) => format!("≤ {r}x native"),
            Target::RatioAtLeast(r) => format!("≥ {r}x native"),
        }
    }
}

/// Whether a row meets its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Met,
    Missed,
    /// A figure the target needs is missing.
    NotMeasured,
}

impl Verdict {
    fn text(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "MISSED",
            Verdict::NotMeasured => "n/a",
        }
    }
}

/// Which sides a row measures by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sides {
    Both,
    NativeOnly,
    RemoteOnly,
}

/// One measured quantity, native and remote.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) unit: Unit,
    /// `None`: not measured (no GPU, or native CUDA unavailable).
    pub(crate) native: Option<f64>,
    pub(crate) remote: Option<f64>,
    pub(crate) sides: Sides,
    pub(crate) target: Option<Target>,
    /// How the figures were taken, where the name does not say it.
    pub(crate) note: Option<String>,
}

impl Row {
    pub(crate) fn new(name: impl Into<String>, unit: Unit, native: Option<f64>, remote: Option<f64>) -> Self {
        Self { name: name.into(), unit, native, remote, sides: Sides::Both, target: None, note: None }
    }

    pub(crate) fn only(mut self, sides: Sides) -> Self {
        self.sides = sides;
        self
    }

    pub(crate) fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// remote / native of the figures as shown (for GiB/s rows below 1
    /// means the remote is slower).
    pub(crate) fn ratio(&self) -> Option<f64> {
        match (self.native, self.remote) {
            (Some(n), Some(r)) if n > 0.0 => Some(r / n),
            _ => None,
        }
    }

    pub(crate) fn verdict(&self) -> Option<Verdict> {
        let target = self.target?;
        let measured = match target {
            Target::RatioAtMost(_) | Target::RatioAtLeast(_) => self.ratio(),
            _ => self.remote,
        };
        let Some(v) = measured else {
            return Some(Verdict::NotMeasured);
        };
        let met = match target {
            Target::RemoteAtMost(t) | Target::RatioAtMost(t) => v <= t,
            Target::RemoteBelow(t) => v < t,
            Target::RemoteAtLeast(t) | Target::RatioAtLeast(t) => v >= t,
        };
        Some(if met { Verdict::Met } else { Verdict::Missed })
    }
}

/// A target whose row did not run, and why.
#[derive(Debug, Clone)]
pub(crate) struct Skipped {
    pub(crate) goal: String,
    pub(crate) reason: String,
}

/// Where and on what the benchmark ran.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    /// `YYYY-MM-DD HH:MM:SS UTC`.
    pub(crate) date: String,
    pub(crate) host: String,
    /// The GPU's name, or `None` when no GPU was used.
    pub(crate) gpu: Option<String>,
    pub(crate) commit: String,
    /// The server's backend: `cuda` or `emulated`.
    pub(crate) backend: String,
    /// The name the server reports for its device.
    pub(crate) server_device: String,
    /// `None` when native figures were taken, else why not.
    pub(crate) native_missing: Option<String>,
    /// The settings, as `name=value` pairs.
    pub(crate) settings: Vec<(&'static str, String)>,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) header: Header,
    pub(crate) rows: Vec<Row>,
    pub(crate) skipped_targets: Vec<Skipped>,
}

impl Report {
    /// The human-readable table.
    pub(crate) fn table(&self) -> String {
        let h = &self.header;
        let mut out = String::new();
        let _ = writeln!(out, "gpupool-bench: native CUDA (cudarc) vs remote gpupool on the same GPU");
        let _ = writeln!(out, "date     {}", h.date);
        let gpu = h.gpu.as_deref().unwrap_or("none");
        let _ = writeln!(out, "machine  {} (GPU: {gpu})", h.host);
        let _ = writeln!(out, "commit   {}", h.commit);
        let _ = writeln!(out, "server   in-process on 127.0.0.1, backend {} ({})", h.backend, h.server_device);
        if h.gpu.is_none() {
            let _ = writeln!(
                out,
                "!!! NO GPU WAS USED: emulated device, the remote figures measure the transport only !!!"
            );
        }
        if let Some(why) = &h.native_missing {
            let _ = writeln!(out, "native   n/a: {why}");
        }
        let settings: Vec<String> = h.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "settings {}", settings.join(" "));
        out.push('\n');

        let mut cells = vec![["row", "native", "remote", "remote/native", "target", "met"].map(String::from)];
        for row in &self.rows {
            // "-": not measured by design; "n/a": could not be measured.
            let figure = |v: Option<f64>, measured: bool| match v {
                Some(v) => row.unit.format(v),
                None if measured => "n/a".to_string(),
                None => "-".to_string(),
            };
            let ratio = match row.ratio() {
                Some(r) => format!("{r:.2}x"),
                None if row.sides == Sides::Both => "n/a".to_string(),
                None => "-".to_string(),
            };
            cells.push([
                row.name.clone(),
                figure(row.native, row.sides != Sides::RemoteOnly),
                figure(row.remote, row.sides != Sides::NativeOnly),
                ratio,
                row.target.map(|t| t.describe(row.unit)).unwrap_or_default(),
                row.verdict().map(|v| v.text().to_string()).unwrap_or_default(),
            ]);
        }
        let widths: Vec<usize> =
            (0..6).map(|c| cells.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        for (i, r) in cells.iter().enumerate() {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                // Names and targets read left to right, figures line up right.
                if matches!(c, 1..=3) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad));
                }
                line.push_str("  ");
            }
            let _ = writeln!(out, "{}", line.trim_end());
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }

        let notes: Vec<&Row> = self.rows.iter().filter(|r| r.note.is_some()).collect();
        if !notes.is_empty() || !self.skipped_targets.is_empty() {
            out.push('\n');
        }
        for row in notes {
            let _ = writeln!(out, "note: {}: {}", row.name, row.note.as_deref().unwrap_or_default());
        }
        for s in &self.skipped_targets {
            let _ = writeln!(out, "target not measured: {}: {}", s.goal, s.reason);
        }
        out
    }

    /// The same figures as JSON.
    pub(crate) fn json(&self) -> Json {
        let h = &self.header;
        let opt_num = |v: Option<f64>| v.map_or(Json::Null, Json::Num);
        let rows = self
            .rows
            .iter()
            .map(|r| {
                Json::obj([
                    ("name", Json::str(&r.name)),
                    ("unit", Json::str(r.unit.key())),
                    ("native", opt_num(r.native)),
                    ("remote", opt_num(r.remote)),
                    ("ratio_remote_over_native", opt_num(r.ratio())),
                    ("target", r.target.map_or(Json::Null, |t| Json::str(t.describe(r.unit)))),
                    ("verdict", r.verdict().map_or(Json::Null, |v| Json::str(v.text().to_lowercase()))),
                    ("note", r.note.as_deref().map_or(Json::Null, Json::str)),
                ])
            })
            .collect();
        let skipped = self
            .skipped_targets
            .iter()
            .map(|s| Json::obj([("target", Json::str(&s.goal)), ("reason", Json::str(&s.reason))]))
            .collect();
        let settings = Json::Obj(h.settings.iter().map(|(k, v)| ((*k).to_string(), Json::str(v))).collect());
        Json::obj([
            ("date", Json::str(&h.date)),
            ("host", Json::str(&h.host)),
            ("gpu", h.gpu.as_deref().map_or(Json::Null, Json::str)),
            ("gpu_used", Json::Bool(h.gpu.is_some())),
            ("commit", Json::str(&h.commit)),
            ("backend", Json::str(&h.backend)),
            ("server_device", Json::str(&h.server_device)),
            ("native_missing", h.native_missing.as_deref().map_or(Json::Null, Json::str)),
            ("settings", settings),
            ("rows", Json::Arr(rows)),
            ("targets_not_measured", Json::Arr(skipped)),
        ])
    }
}

/// A JSON value, written by `Display` (two-space indentation).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    /// Non-finite numbers are written as `null`.
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub(crate) fn str(s: impl Into<String>) -> Self {
        Json::Str(s.into())
    }

    pub(crate) fn obj<const N: usize>(fields: [(&str, Json); N]) -> Self {
        Json::Obj(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    fn write(&self, f: &mut fmt::Formatter<'_>, indent: usize) -> fmt::Result {
        let pad = "  ".repeat(indent + 1);
        let end = "  ".repeat(indent);
        match self {
            Json::Null => f.write_str("null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::Num(n) if n.is_finite() => write!(f, "{n}"),
            Json::Num(_) => f.write_str("null"),
            Json::Str(s) => write_json_string(f, s),
            Json::Arr(items) if items.is_empty() => f.write_str("[]"),
            Json::Arr(items) => {
                f.write_str("[\n")?;
                for (i, item) in items.iter().enumerate() {
                    f.write_str(&pad)?;
                    item.write(f, indent + 1)?;
                    f.write_str(if i + 1 < items.len() { ",\n" } else { "\n" })?;
                }
                write!(f, "{end}]")
            }
            Json::Obj(fields) if fields.is_empty() => f.write_str("{}"),
            Json::Obj(fields) => {
                f.write_str("{\n")?;
                for (i, (k, v)) in fields.iter().enumerate() {
                    f.write_str(&pad)?;
                    write_json_string(f, k)?;
                    f.write_str(": ")?;
                    v.write(f, indent + 1)?;
                    f.write_str(if i + 1 < fields.len() { ",\n" } else { "\n" })?;
                }
                write!(f, "{end}}}")
            }
        }
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, 0)
    }
}

fn write_json_string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            '\n' => f.write_str("\\n")?,
            '\r' => f.write_str("\\r")?,
            '\t' => f.write_str("\\t")?,
            c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
            c => f.write_char(c)?,
        }
    }
    f.write_char('"')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let rtt = Row::new("rtt", Unit::Micros, None, Some(40.0)).target(Target::RemoteAtMost(50.0));
        assert_eq!(rtt.verdict(), Some(Verdict::Met));
        let launches = Row::new("launches", Unit::Seconds, Some(1.0), Some(2.0)).target(Target::RatioAtMost(1.5));
        assert_eq!(launches.ratio(), Some(2.0));
        assert_eq!(launches.verdict(), Some(Verdict::Missed));
        let no_native = Row::new("launches", Unit::Seconds, None, Some(2.0)).target(Target::RatioAtMost(1.5));
        assert_eq!(no_native.verdict(), Some(Verdict::NotMeasured));
        let pinned = Row::new("pinned", Unit::GibPerSec, Some(50.0), Some(41.0)).target(Target::RatioAtLeast(0.8));
        assert_eq!(pinned.verdict(), Some(Verdict::Met));
        let cold = Row::new("cold", Unit::Millis, None, Some(50.0)).target(Target::RemoteBelow(50.0));
        assert_eq!(cold.verdict(), Some(Verdict::Missed));
        assert_eq!(Row::new("x", Unit::Millis, None, None).verdict(), None);
    }

    #[test]
    fn json_is_escaped_and_nested() {
        let j = Json::obj([
            ("a\"b", Json::str("line\nnext\u{1}")),
            ("n", Json::Arr(vec![Json::Num(1.5), Json::Num(f64::NAN), Json::Null])),
            ("e", Json::Obj(vec![])),
        ]);
        let text = j.to_string();
        assert_eq!(
            text,
            "{\n  \"a\\\"b\": \"line\\nnext\\u0001\",\n  \"n\": [\n    1.5,\n    null,\n    null\n  ],\n  \"e\": {}\n}"
        );
    }
}
