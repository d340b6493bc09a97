//! Latency reports: percentiles, HdrHistogram's `.hgrm` text, an SVG
//! percentile plot, and the environment of the run.
//!
//! Owns turning histograms into what a person reads; never measures.

use std::fmt::Write;

use hdrhistogram::Histogram;

/// Microsecond histogram: 1 µs to 60 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

pub fn percentiles(histogram: &Histogram<u64>) -> Percentiles {
    Percentiles {
        count: histogram.len(),
        p50_us: histogram.value_at_quantile(0.50),
        p90_us: histogram.value_at_quantile(0.90),
        p95_us: histogram.value_at_quantile(0.95),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
    }
}

/// The percentile distribution in HdrHistogram's text format (values in ms),
/// readable by HdrHistogram's plotter.
pub fn hgrm(histogram: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for step in histogram.iter_quantiles(5) {
        let quantile = step.quantile_iterated_to();
        let value_ms = step.value_iterated_to() as f64 / 1000.0;
        if quantile < 1.0 {
            let _ = writeln!(
                out,
                "{value_ms:>12.3} {quantile:>14.12} {:>10} {:>14.2}",
                step.count_since_last_iteration(),
                1.0 / (1.0 - quantile)
            );
        } else {
            let _ = writeln!(
                out,
                "{value_ms:>12.3} {quantile:>14.12} {:>10}",
                step.count_since_last_iteration()
            );
        }
    }
    let mean_ms = histogram.mean() / 1000.0;
    let stdev_ms = histogram.stdev() / 1000.0;
    let _ = writeln!(
        out,
        "#[Mean    = {mean_ms:>12.3}, StdDeviation   = {stdev_ms:>12.3}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        histogram.max() as f64 / 1000.0,
        histogram.len()
    );
    out
}

/// A latency-by-percentile plot (log scale on the percentile axis), one line per series.
/// Every plot's size, margins and series colours.
const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

pub fn svg(title: &str, series: &[(&str, &Histogram<u64>)]) -> String {
    let nines_max = 5.0; // up to 99.999%
    let max_us = series
        .iter()
        .map(|(_, h)| h.max())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |quantile: f64| {
        LEFT + (-(1.0 - quantile).max(1e-5).log10() / nines_max) * (WIDTH - LEFT - 60.0)
    };
    let y = |value_us: f64| HEIGHT - BOTTOM - (value_us / max_us) * (HEIGHT - BOTTOM - 40.0);
    let mut out = svg_frame(title);
    for (label, quantile) in [
        ("0%", 0.0),
        ("90%", 0.9),
        ("99%", 0.99),
        ("99.9%", 0.999),
        ("99.99%", 0.9999),
        ("99.999%", 0.99999),
    ] {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            x(quantile),
            HEIGHT - BOTTOM + 18.0
        );
    }
    for fraction in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let value = max_us * fraction;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{:.2} ms</text>"#,
            LEFT - 6.0,
            y(value) + 4.0,
            value / 1000.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">percentile</text>"#,
        (LEFT + WIDTH) / 2.0,
        HEIGHT - 10.0
    );
    for (index, (label, histogram)) in series.iter().enumerate() {
        let points: Vec<String> = histogram
            .iter_quantiles(5)
            .filter(|step| step.quantile_iterated_to() <= 0.99999)
            .map(|step| {
                format!(
                    "{:.1},{:.1}",
                    x(step.quantile_iterated_to()),
                    y(step.value_iterated_to() as f64)
                )
            })
            .collect();
        series_line(&mut out, index, label, &points);
    }
    out.push_str("</svg>\n");
    out
}

/// One series: its line (`points`: "x,y" pairs) and its label in the legend.
fn series_line(out: &mut String, index: usize, label: &str, points: &[String]) {
    let color = COLORS[index % COLORS.len()];
    let _ = writeln!(
        out,
        r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
        points.join(" ")
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" fill="{color}">{label}</text>"#,
        LEFT + 10.0,
        45.0 + 16.0 * index as f64
    );
}

/// An SVG's opening, white background, title and the two axes.
fn svg_frame(title: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{LEFT}" y="20" font-size="14">{title}</text>"#
    );
    let _ = writeln!(
        out,
        r#"<line x1="{LEFT}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{LEFT}" y1="30" x2="{LEFT}" y2="{0}" stroke="black"/>"#,
        HEIGHT - BOTTOM,
        WIDTH - 20.0,
    );
    out
}

/// A line plot of time series ((seconds, value) points), values from 0.
pub fn line_svg(title: &str, unit: &str, series: &[(&str, &[(f64, f64)])]) -> String {
    let points = series.iter().flat_map(|(_, points)| points.iter());
    let max_t = points.clone().map(|p| p.0).fold(1.0, f64::max);
    let max_v = points.map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let x = |t: f64| LEFT + t / max_t * (WIDTH - LEFT - 30.0);
    let y = |v: f64| HEIGHT - BOTTOM - v / max_v * (HEIGHT - BOTTOM - 40.0);
    let mut out = svg_frame(title);
    for fraction in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0} s</text><text x="{}" y="{:.1}" text-anchor="end">{:.0} {unit}</text>"#,
            x(max_t * fraction),
            HEIGHT - BOTTOM + 18.0,
            max_t * fraction,
            LEFT - 6.0,
            y(max_v * fraction) + 4.0,
            max_v * fraction,
        );
    }
    for (index, (label, points)) in series.iter().enumerate() {
        let line: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        series_line(&mut out, index, label, &line);
    }
    out.push_str("</svg>\n");
    out
}

/// Kernel, CPU, limits and relevant sysctls, for the report's header.
pub fn environment() -> serde_json::Value {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        .unwrap_or_default();
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    serde_json::json!({
        "kernel": read("/proc/sys/kernel/osrelease"),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "memory_kib": read("/proc/meminfo").lines().next().unwrap_or("").split_whitespace().nth(1).unwrap_or(""),
        "somaxconn": read("/proc/sys/net/core/somaxconn"),
        "tcp_rmem": read("/proc/sys/net/ipv4/tcp_rmem"),
        "tcp_wmem": read("/proc/sys/net/ipv4/tcp_wmem"),
        "io_uring_disabled": read("/proc/sys/kernel/io_uring_disabled"),
        "git_revision": git,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_report_the_combined_distribution() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for value in 1..=500 {
            a.record(value).unwrap();
        }
        for value in 501..=1000 {
            b.record(value).unwrap();
        }
        a.add(&b).unwrap();
        let p = percentiles(&a);
        assert_eq!(p.count, 1000);
        assert!((499..=501).contains(&p.p50_us), "{p:?}");
        assert!((989..=991).contains(&p.p99_us), "{p:?}");
        assert_eq!(p.max_us, 1000);
    }

    #[test]
    fn hgrm_lists_percentiles_in_ms_and_totals() {
        let mut histogram = new_histogram();
        for value in [100, 200, 300, 400, 1000] {
            histogram.record(value).unwrap();
        }
        let text = hgrm(&histogram);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("       0.100 0.000000000000"), "{text}");
        assert!(text.contains("Total count    =            5]"), "{text}");
        let last_row = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        assert!(
            last_row.trim_start().starts_with("1.000 1.000000000000"),
            "{last_row}"
        );
    }

    #[test]
    fn svg_has_one_line_per_series() {
        let mut histogram = new_histogram();
        histogram.record(250).unwrap();
        let plot = svg("test", &[("gateway", &histogram), ("peer", &histogram)]);
        assert_eq!(plot.matches("<polyline").count(), 2);
        assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
    }
}
