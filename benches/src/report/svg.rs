//! `latency.svg`: latency by percentile, hand-written SVG.
//!
//! x: `log10(1/(1-p))` from p0 (0) to p99.99 (4), labelled 50, 90, 99, 99.9, 99.99.
//! y: latency in ms on a log scale, whole decades. One polyline per scenario.

use std::fmt::Write as _;

use super::{CURVE_MAX_DECADES, Report};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 560.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 220.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// Escapes text for XML content and attributes.
pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `log10(1/(1-p))` for a percentile `p` in 0..100, clamped to the plotted range.
pub(crate) fn x_of_percentile(percentile: f64) -> f64 {
    let q = (percentile / 100.0).clamp(0.0, 1.0);
    let x = if q >= 1.0 {
        f64::MAX
    } else {
        (1.0 / (1.0 - q)).log10()
    };
    x.clamp(0.0, f64::from(CURVE_MAX_DECADES))
}

/// Whole decades (log10 of ms) enclosing all latencies, at least one decade tall.
pub(crate) fn y_decades(min_us: u64, max_us: u64) -> (i32, i32) {
    let lo = ((min_us.max(1) as f64) / 1000.0).log10().floor() as i32;
    let hi = ((max_us.max(1) as f64) / 1000.0).log10().ceil() as i32;
    (lo, hi.max(lo + 1))
}

fn decade_label(d: i32) -> String {
    if d >= 0 {
        format!("{}", 10u64.pow(d.unsigned_abs()))
    } else {
        format!("{:.*}", d.unsigned_abs() as usize, 10f64.powi(d))
    }
}

/// Renders the chart.
pub fn render_svg(report: &Report) -> String {
    let curves: Vec<_> = report
        .scenarios
        .iter()
        .filter(|s| !s.curve.is_empty())
        .collect();
    let all = curves
        .iter()
        .flat_map(|s| s.curve.iter().map(|p| p.latency_us));
    let (min_us, max_us) = all.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if curves.is_empty() {
        (-2, 1)
    } else {
        y_decades(min_us, max_us)
    };
    let pw = WIDTH - LEFT - RIGHT;
    let ph = HEIGHT - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / f64::from(CURVE_MAX_DECADES) * pw;
    let sy = |us: u64| {
        let v = ((us.max(1) as f64) / 1000.0).log10();
        TOP + ph - (v - f64::from(lo)) / f64::from(hi - lo) * ph
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        o,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let rounds = if report.rounds > 1 {
        format!("; median of {} rounds", report.rounds)
    } else {
        String::new()
    };
    let _ = writeln!(
        o,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">Latency by percentile ({} rps, {} connections; corrected for coordinated omission{rounds})</text>"#,
        LEFT + pw / 2.0,
        report.load.rate,
        report.load.connections
    );
    // Horizontal grid: decades (labelled) and 2x, 5x.
    for d in lo..=hi {
        for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            if d == hi && !major {
                continue;
            }
            let us = (m * 10f64.powi(d) * 1000.0).round() as u64;
            let y = sy(us);
            let (stroke, width) = if major { ("#bbb", 1.0) } else { ("#eee", 0.8) };
            let _ = writeln!(
                o,
                r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{stroke}" stroke-width="{width}"/>"#,
                LEFT + pw
            );
            if major {
                let _ = writeln!(
                    o,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                    LEFT - 6.0,
                    y + 4.0,
                    decade_label(d)
                );
            }
        }
    }
    // Vertical grid at the labelled percentiles.
    for (p, label) in [
        (0.0, "0"),
        (50.0, "50"),
        (90.0, "90"),
        (99.0, "99"),
        (99.9, "99.9"),
        (99.99, "99.99"),
    ] {
        let x = sx(x_of_percentile(p));
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd" stroke-width="1"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            o,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + ph + 18.0
        );
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile (log scale of 1/(1-p))</text>"#,
        LEFT + pw / 2.0,
        HEIGHT - 20.0
    );
    let _ = writeln!(
        o,
        r#"<text x="20" y="{:.1}" text-anchor="middle" transform="rotate(-90 20 {:.1})">latency (ms, log scale)</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    for (i, s) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = s
            .curve
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    sx(x_of_percentile(p.percentile)),
                    sy(p.latency_us)
                )
            })
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 10.0 + 22.0 * i as f64;
        let lx = LEFT + pw + 16.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 30.0,
            ly + 4.0,
            xml_escape(&s.result.scenario)
        );
    }
    let _ = writeln!(o, "</svg>");
    o
}
