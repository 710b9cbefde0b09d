//! PNG plots for BENCHMARKS.md (plotters' bitmap backend; text drawn with a TrueType font found
//! on the machine, e.g. Debian's fonts-dejavu-core, so no fontconfig is needed).

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::record::Report;

const FONT_PLACES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let path = FONT_PLACES
        .iter()
        .find(|p| Path::new(p).is_file())
        .context("no TrueType font found: apt-get install fonts-dejavu-core")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    register_font_bytes(bytes)
}

fn register_font_bytes(bytes: &'static [u8]) -> anyhow::Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("the font could not be read"))
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e:?}")
}

/// The peak run: offered and accepted requests/s, collector p99, backlog (the queues sampled),
/// per second.
pub fn peak(report: &Report, out: &Path) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, (1200, 1100)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let root = root
        .titled(&format!("Peak run: {}", report.name), ("sans-serif", 26))
        .map_err(err)?;
    let panels = root.split_evenly((3, 1));
    let end = report.series.len().max(1) as u64;

    let rate_max = report
        .series
        .iter()
        .map(|p| p.offered.max(p.accepted_requests))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(&panels[0])
        .margin(10)
        .caption("requests per second", ("sans-serif", 20))
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0u64..end, 0f64..rate_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            report.series.iter().map(|p| (p.t, p.offered as f64)),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?
        .label("offered")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            report
                .series
                .iter()
                .map(|p| (p.t, p.accepted_requests as f64)),
            GREEN.stroke_width(2),
        ))
        .map_err(err)?
        .label("accepted (2xx)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(
            report.series.iter().map(|p| (p.t, p.refused as f64)),
            RED.stroke_width(2),
        ))
        .map_err(err)?
        .label("refused (non-2xx)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;

    line_panel(
        &panels[1],
        "collector p99 latency (ms, from intended send time)",
        end,
        report
            .series
            .iter()
            .filter_map(|p| p.p99_ms.map(|v| (p.t, v)))
            .collect(),
        MAGENTA,
    )?;
    line_panel(
        &panels[2],
        "backlog: raw + sink queue (messages ready)",
        end,
        report
            .series
            .iter()
            .filter_map(|p| p.depth.map(|d| (p.t, d as f64)))
            .collect(),
        BLACK,
    )?;
    root.present().map_err(err)?;
    Ok(())
}

/// One panel of the peak plot: a single line over the run's seconds.
fn line_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    end: u64,
    points: Vec<(u64, f64)>,
    color: RGBColor,
) -> anyhow::Result<()> {
    let y_max = points.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .margin(10)
        .caption(caption, ("sans-serif", 20))
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0u64..end, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))
        .map_err(err)?;
    Ok(())
}

/// One latency measurement: a rate and the p50/p99 of the collector and of the bare publisher.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LatencyPoint {
    pub label: String,
    pub rate: f64,
    pub collector_p50: f64,
    pub collector_p99: f64,
    pub bare_p50: f64,
    pub bare_p99: f64,
}

/// Collector latency beside the bare publisher's publish-to-confirm latency at the same rates.
pub fn latency(points: &[LatencyPoint], out: &Path) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let x_max = points.iter().map(|p| p.rate).fold(1.0, f64::max) * 1.1;
    let y_max = points
        .iter()
        .map(|p| p.collector_p99.max(p.bare_p99))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .margin(15)
        .caption(
            "latency at 25/50/75% of the collector's max rate (open loop)",
            ("sans-serif", 22),
        )
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("requests per second")
        .y_desc("ms")
        .draw()
        .map_err(err)?;
    type Line = (&'static str, RGBColor, fn(&LatencyPoint) -> f64);
    let lines: [Line; 4] = [
        ("collector p99", RED, |p| p.collector_p99),
        ("collector p50", MAGENTA, |p| p.collector_p50),
        ("bare publish p99", BLUE, |p| p.bare_p99),
        ("bare publish p50", CYAN, |p| p.bare_p50),
    ];
    for (name, color, value) in lines {
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.rate, value(p))),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.rate, value(p)), 4, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Throughput of each service beside its ceiling, as bars.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Bar {
    pub label: String,
    pub value: f64,
    pub ceiling: f64,
}

pub fn bars(title: &str, bars: &[Bar], out: &Path) -> anyhow::Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let y_max = bars
        .iter()
        .map(|b| b.value.max(b.ceiling))
        .fold(1.0, f64::max)
        * 1.15;
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .margin(15)
        .caption(title, ("sans-serif", 22))
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("events per second")
        .draw()
        .map_err(err)?;
    for (i, bar) in bars.iter().enumerate() {
        let x = i as f64;
        chart
            .draw_series([
                Rectangle::new(
                    [(x + 0.1, 0.0), (x + 0.45, bar.ceiling)],
                    BLUE.mix(0.6).filled(),
                ),
                Rectangle::new(
                    [(x + 0.5, 0.0), (x + 0.85, bar.value)],
                    RED.mix(0.7).filled(),
                ),
            ])
            .map_err(err)?;
        chart
            .draw_series([Text::new(
                format!(
                    "{} ({:.0}%)",
                    bar.label,
                    100.0 * bar.value / bar.ceiling.max(1e-9)
                ),
                (x + 0.1, y_max * 0.97),
                ("sans-serif", 16),
            )])
            .map_err(err)?;
    }
    chart
        .draw_series([Text::new(
            "blue: bare ceiling, red: service".to_string(),
            (0.05, y_max * 0.90),
            ("sans-serif", 16),
        )])
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
