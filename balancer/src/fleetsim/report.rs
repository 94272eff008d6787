//! Results as a markdown table and SVG plots over time.
//!
//! SVG rather than PNG: it needs no drawing crate (plotters' bitmap backend
//! pulls font and image dependencies), diffs as text and renders on GitHub.

use std::fmt::Write as _;

use super::sim::Outcome;

/// Percent with one decimal.
fn pct(v: f64) -> String {
    format!("{:.1}", 100.0 * v)
}

/// The per-policy table.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut t = String::new();
    t.push_str(
        "| policy | GPUs | invocations | SLO hit % | served / GPU-h | within SLO / GPU-h | unservable | dropped \
         | cold starts | lukewarm | evictions | SM util % | mem util % | fragmentation % | reconfig / GPU-h \
         | events | wall s | events/s |\n",
    );
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for o in outcomes {
        let gh = o.gpu_hours().max(f64::MIN_POSITIVE);
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {:.1} | {:.2e} |",
            o.policy,
            o.gpus,
            o.invocations,
            format_args!("{:.2}", 100.0 * o.slo_hit_rate()),
            o.served as f64 / gh,
            o.within_slo as f64 / gh,
            o.unservable,
            o.dropped,
            o.cold_starts,
            o.lukewarm_starts,
            o.evictions,
            pct(o.sm_utilization),
            pct(o.memory_utilization),
            pct(o.fragmentation),
            o.reconfigurations as f64 / gh,
            o.events,
            o.wall_s,
            o.events as f64 / o.wall_s.max(1e-9),
        );
    }
    t
}

/// Line colours, one per policy (cycled).
const COLOURS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// An SVG line chart of timeline column `column` (1: SLO hit rate, 2: SM
/// utilization, 3: memory utilization, 4: waiting requests) of every
/// policy over hours.
pub fn svg(outcomes: &[Outcome], column: usize, title: &str) -> String {
    let (w, h, left, right, top, bottom) = (900.0, 420.0, 60.0, 230.0, 30.0, 40.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let points = || outcomes.iter().flat_map(|o| o.timeline.iter());
    let x_max = points().map(|p| p[0]).fold(0.0, f64::max).max(1e-9);
    let (mut y_min, mut y_max) =
        points().map(|p| p[column]).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if y_min > y_max {
        (y_min, y_max) = (0.0, 1.0);
    }
    if column == 4 || column == 2 || column == 3 {
        y_min = 0.0;
    }
    if y_max - y_min < 1e-9 {
        y_max = y_min + 1.0;
    }
    let x = |v: f64| left + v / x_max * pw;
    let y = |v: f64| top + ph - (v - y_min) / (y_max - y_min) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{left}" y="18" font-size="14">{}</text>"#, escape(title));
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black" stroke-width="0.5"/>"#
    );
    for i in 0..=4 {
        let v = y_min + (y_max - y_min) * f64::from(i) / 4.0;
        let label = if column == 4 { format!("{v:.0}") } else { format!("{:.1} %", 100.0 * v) };
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">{label}</text>"#, left - 4.0, y(v) + 4.0);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#ddd" stroke-width="0.5"/>"##,
            left + pw,
            y(v),
            y(v)
        );
    }
    let ticks = 6;
    for i in 0..=ticks {
        let v = x_max * f64::from(i) / f64::from(ticks);
        let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{v:.1} h</text>"#, x(v), top + ph + 16.0);
    }
    for (i, o) in outcomes.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = o.timeline.iter().map(|p| format!("{:.1},{:.1}", x(p[0]), y(p[column]))).collect();
        if !path.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = top + 14.0 + 16.0 * i as f64;
        let lx = left + pw + 10.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/>"#,
            lx + 18.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, lx + 22.0, ly + 4.0, escape(&o.policy));
    }
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_plot_name_every_policy() {
        let o = |name: &str| Outcome {
            policy: name.into(),
            gpus: 8,
            hours: 1.0,
            invocations: 10,
            served: 10,
            within_slo: 9,
            timeline: vec![[0.5, 0.9, 0.1, 0.2, 0.0], [1.0, 1.0, 0.2, 0.3, 2.0]],
            ..Outcome::default()
        };
        let outcomes = [o("a & b"), o("c")];
        let t = table(&outcomes);
        assert_eq!(t.lines().count(), 4);
        assert!(t.contains("| a & b | 8 | 10 | 90.00 |"), "{t}");
        let svg = svg(&outcomes, 1, "SLO");
        assert!(svg.contains("a &amp; b") && svg.contains(">c<"));
        assert_eq!(svg.matches("<polyline").count(), 2);
    }
}
