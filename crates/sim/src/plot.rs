//! PNG plots: energy per UAV over time, layers per UAV over tokens (failures marked), recovery latencies.
//! Text needs a TTF (DejaVuSans from Debian's fonts-dejavu-core, or `AEROKV_FONT`); without
//! one the plots are drawn without text.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::SimError;
use crate::mission::{RecoveryRecord, UavRow};

const FONT_PATHS: [&str; 2] =
    ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

/// Register a font once; false if none could be loaded.
pub(crate) fn font_ok() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let mut paths: Vec<String> = std::env::var("AEROKV_FONT").ok().into_iter().collect();
        paths.extend(FONT_PATHS.iter().map(|s| s.to_string()));
        for p in paths {
            if let Ok(bytes) = std::fs::read(&p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        tracing::warn!("no TTF font found (apt-get install fonts-dejavu-core); plots have no text");
        false
    })
}

pub(crate) fn perr(path: &Path, e: impl std::fmt::Display) -> SimError {
    SimError::Plot { path: path.display().to_string(), reason: e.to_string() }
}

/// Every chart's frame: a margin, and with a font the title and room for the axis labels.
pub(crate) fn titled<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    (x_labels, y_labels): (u32, u32),
) -> ChartBuilder<'a, 'static, DB> {
    let mut b = ChartBuilder::on(area);
    b.margin(15);
    if font_ok() {
        b.caption(title, ("sans-serif", 22)).x_label_area_size(x_labels).y_label_area_size(y_labels);
    }
    b
}

/// One labelled line per series on a linear chart (e.g. the engine benchmark's time per token
/// against the context length).
pub fn line_chart(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), SimError> {
    let ids: BTreeMap<u32, Vec<(f64, f64)>> = (0u32..).zip(series.iter().map(|(_, pts)| pts.clone())).collect();
    let labels: Vec<String> = series.iter().map(|(name, _)| name.clone()).collect();
    lines(path, title, xlabel, ylabel, &ids, &[], Legend::Named(&labels))
}

/// How series are named in the legend.
#[derive(Clone, Copy)]
enum Legend<'a> {
    None,
    /// "uav <id>"
    Uavs,
    /// The series' own names, in id order.
    Named(&'a [String]),
}

/// One line per series on a linear chart, with optional vertical markers.
fn lines(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &BTreeMap<u32, Vec<(f64, f64)>>,
    markers: &[f64],
    legend: Legend<'_>,
) -> Result<(), SimError> {
    let legend_on = !matches!(legend, Legend::None);
    let text = font_ok();
    let xmax = series.values().flatten().map(|p| p.0).fold(0.0, f64::max).max(1e-9);
    let ymax = series.values().flatten().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.05;
    let ymin = series.values().flatten().map(|p| p.1).fold(f64::INFINITY, f64::min).min(0.0);
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let mut chart =
        titled(&root, title, (40, 70)).build_cartesian_2d(0.0..xmax, ymin..ymax).map_err(|e| perr(path, e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(xlabel).y_desc(ylabel);
    } else {
        mesh.disable_x_mesh().disable_y_mesh().x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    for &x in markers {
        chart
            .draw_series(LineSeries::new(vec![(x, ymin), (x, ymax)], RED.mix(0.6).stroke_width(2)))
            .map_err(|e| perr(path, e))?;
    }
    for (i, (id, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let s = chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| perr(path, e))?;
        let label = match legend {
            Legend::None => None,
            Legend::Uavs => Some(format!("uav {id}")),
            Legend::Named(names) => names.get(i).cloned(),
        };
        if let (true, Some(label)) = (text, label) {
            s.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
    }
    if text && legend_on && series.len() <= 20 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()
            .map_err(|e| perr(path, e))?;
    }
    root.present().map_err(|e| perr(path, e))?;
    Ok(())
}

/// energy_<method>.png and layers_<method>.png from the per-UAV trace of one method.
pub fn method_plots(dir: &Path, method: &str, rows: &[UavRow], recs: &[RecoveryRecord]) -> Result<(), SimError> {
    let mut energy: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    let mut layers: BTreeMap<u32, Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.method == method) {
        energy.entry(r.uav).or_default().push((r.time_s, r.energy_j / 1e3));
        layers.entry(r.uav).or_default().push((r.token as f64, f64::from(r.native_layers)));
    }
    let fail_tokens: Vec<f64> = recs.iter().filter(|r| r.method == method).map(|r| r.token as f64).collect();
    let fail_times: Vec<f64> = {
        // time of each failure from the trace rows at that token
        fail_tokens
            .iter()
            .filter_map(|&t| rows.iter().find(|r| r.method == method && r.token as f64 == t).map(|r| r.time_s))
            .collect()
    };
    let legend = if energy.len() <= 20 { Legend::Uavs } else { Legend::None };
    lines(
        &dir.join(format!("energy_{method}.png")),
        &format!("{method}: energy per UAV (failures in red)"),
        "time [s]",
        "energy [kJ]",
        &energy,
        &fail_times,
        legend,
    )?;
    lines(
        &dir.join(format!("layers_{method}.png")),
        &format!("{method}: native layers per UAV (failures in red)"),
        "token",
        "layers",
        &layers,
        &fail_tokens,
        legend,
    )?;
    Ok(())
}

/// recovery.png: each recovery's latency per method (log scale), with the deadline.
pub fn recovery_plot(
    path: &Path,
    recs: &[RecoveryRecord],
    methods: &[String],
    deadline_s: f64,
) -> Result<(), SimError> {
    let text = font_ok();
    let n = recs.iter().map(|r| r.method.clone()).fold(BTreeMap::<String, usize>::new(), |mut m, k| {
        *m.entry(k).or_default() += 1;
        m
    });
    let xmax = n.values().copied().max().unwrap_or(1).max(1) as f64 + 0.5;
    let ymax = recs.iter().map(|r| r.recovery_s).fold(deadline_s, f64::max) * 2.0;
    let ymin = 1e-3;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    let mut chart = titled(&root, "recovery latency per failure (deadline dashed)", (40, 70))
        .build_cartesian_2d(0.5..xmax, (ymin..ymax).log_scale())
        .map_err(|e| perr(path, e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("failure # in the mission").y_desc("recovery latency [s]");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    chart
        .draw_series(DashedLineSeries::new(vec![(0.5, deadline_s), (xmax, deadline_s)], 8, 6, BLACK.stroke_width(2)))
        .map_err(|e| perr(path, e))?;
    for (i, m) in methods.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = recs
            .iter()
            .filter(|r| &r.method == m)
            .enumerate()
            .map(|(j, r)| (j as f64 + 1.0 + (i as f64 - methods.len() as f64 / 2.0) * 0.05, r.recovery_s.max(ymin)))
            .collect();
        let s = chart.draw_series(pts.iter().map(|&p| Circle::new(p, 6, color.filled()))).map_err(|e| perr(path, e))?;
        if text {
            s.label(m.clone()).legend(move |(x, y)| Circle::new((x + 7, y), 5, color.filled()));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| perr(path, e))?;
    }
    root.present().map_err(|e| perr(path, e))?;
    Ok(())
}
