//! Mission reports: the same figures and one-page summary for a recorded mission (a bag, through
//! `aerokv report`) and a simulated one (`aerokv sim --report`). Both are turned into a
//! [`MissionSeries`] first (the bag by `aerokv::mission`, the simulator by [`from_simulation`]);
//! everything drawn comes from it.
//!
//! Figures (PNG, 1000 x 600 or 1000 x 800): `soc.png` state of charge per UAV, `layers.png` layers
//! held per UAV (failures, failovers, restarts and retirements marked), `throughput.png` tokens/s
//! and step latency, `recovery.png` failure to next token per failure, `bytes.png` bytes per topic;
//! `summary.md` links them and lists the key numbers and events.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::error::SimError;
use crate::mission::MissionOutput;
use crate::plot::{font_ok, perr, titled};
use crate::scenario::Scenario;

/// What happened to a UAV, marked on the figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum EventKind {
    /// Declared failed (or lost, in the simulator).
    Failure,
    /// Its layers moved to the survivors from held state.
    Failover,
    /// A fresh plan and an exact replay of the whole context.
    Restart,
    /// Its layers moved away before its battery ran out.
    Retirement,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Failure => "failure",
            EventKind::Failover => "failover",
            EventKind::Restart => "restart",
            EventKind::Retirement => "retirement",
        }
    }

    fn color(self) -> RGBColor {
        match self {
            EventKind::Failure => RGBColor(220, 30, 30),
            EventKind::Failover => RGBColor(30, 140, 60),
            EventKind::Restart => RGBColor(130, 60, 170),
            EventKind::Retirement => RGBColor(230, 140, 0),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Seconds since the time origin.
    pub t_s: f64,
    pub uav: String,
    pub kind: EventKind,
    /// Anything worth saying (a reason, the token it happened at).
    pub detail: String,
}

/// One failure (or retirement) and how long the answer stalled.
#[derive(Clone, Debug, PartialEq)]
pub struct Recovery {
    pub uav: String,
    /// When it happened, seconds since the time origin.
    pub t_s: f64,
    /// Silence before the declaration (0 when not known, e.g. a retirement or the simulator).
    pub detection_s: f64,
    /// From the declaration to the next token.
    pub to_next_token_s: f64,
    /// "failover", "restart", "retirement".
    pub mode: String,
}

impl Recovery {
    pub fn total_s(&self) -> f64 {
        self.detection_s + self.to_next_token_s
    }
}

/// A mission as series over time, live or simulated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MissionSeries {
    pub title: String,
    /// Where it came from ("bag out/mission", "simulation config/scenarios/x.yaml seed 0, aerokv").
    pub source: String,
    pub duration_s: f64,
    /// What the time axis counts from ("the mission's start", "the first plan").
    pub time_origin: String,
    /// State of charge 0..1 per UAV: (s, soc).
    pub soc: BTreeMap<String, Vec<(f64, f64)>>,
    /// Native layers held per UAV, as a step function: (s, layers) at every change.
    pub layers: BTreeMap<String, Vec<(f64, f64)>>,
    pub events: Vec<Event>,
    /// (s, tokens per second).
    pub tokens_per_s: Vec<(f64, f64)>,
    /// (s, ms) per generated token.
    pub step_latency_ms: Vec<(f64, f64)>,
    pub recoveries: Vec<Recovery>,
    /// (topic, messages, bytes), most bytes first.
    pub bytes_per_topic: Vec<(String, u64, u64)>,
    /// Key numbers for the summary, in order.
    pub numbers: Vec<(String, String)>,
    /// Caveats printed under the numbers.
    pub notes: Vec<String>,
}

/// The files a report wrote.
#[derive(Clone, Debug)]
pub struct ReportFiles {
    pub summary: PathBuf,
    pub figures: Vec<PathBuf>,
}

pub const FIGURES: [(&str, &str); 5] = [
    ("soc.png", "State of charge per UAV"),
    ("layers.png", "Layers held per UAV"),
    ("throughput.png", "Tokens/s and step latency"),
    ("recovery.png", "Failure to next token"),
    ("bytes.png", "Bytes per topic"),
];

/// Writes the figures and `summary.md` into `out` (created).
pub fn write_report(s: &MissionSeries, out: &Path) -> Result<ReportFiles, SimError> {
    std::fs::create_dir_all(out).map_err(|e| SimError::Io { path: out.display().to_string(), source: e })?;
    let f: Vec<PathBuf> = FIGURES.iter().map(|(name, _)| out.join(name)).collect();
    let pct: BTreeMap<String, Vec<(f64, f64)>> =
        s.soc.iter().map(|(u, v)| (u.clone(), v.iter().map(|&(t, x)| (t, x * 100.0)).collect())).collect();
    let xmax = s.duration_s.max(1e-3);
    let x = format!("time since {} [s]", s.time_origin);
    {
        let soc = chart_area(&f[0], (1000, 600))?;
        let title = "State of charge per UAV";
        lines_on(&soc, &f[0], title, &x, "state of charge [%]", &pct, &s.events, xmax, Some((0.0, 105.0)))?;
        soc.present().map_err(|e| perr(&f[0], e))?;
    }
    stacked_layers(&f[1], &x, &s.layers, &s.events, xmax)?;
    throughput(&f[2], s, xmax)?;
    recovery_bars(&f[3], &s.recoveries)?;
    bytes_bars(&f[4], &s.bytes_per_topic)?;
    let summary = out.join("summary.md");
    std::fs::write(&summary, summary_markdown(s))
        .map_err(|e| SimError::Io { path: summary.display().to_string(), source: e })?;
    Ok(ReportFiles { summary, figures: f })
}

/// Entries in natural order of their names: `uav2` before `uav10`.
fn natural<V>(m: &BTreeMap<String, V>) -> Vec<(&String, &V)> {
    let mut v: Vec<(&String, &V)> = m.iter().collect();
    let key = |s: &str| {
        let stem = s.trim_end_matches(|c: char| c.is_ascii_digit());
        (stem.to_string(), s[stem.len()..].parse::<u64>().unwrap_or(0), s.to_string())
    };
    v.sort_by_key(|(k, _)| key(k));
    v
}

/// Step functions stacked: between two changes, each series' value as a band over the ones
/// before it. (from, to, [(name, lower, upper)]) per interval, up to `end`.
type Bands<'a> = Vec<(f64, f64, Vec<(&'a str, f64, f64)>)>;

fn stack<'a>(series: &'a BTreeMap<String, Vec<(f64, f64)>>, end: f64) -> Bands<'a> {
    let mut times: Vec<f64> = series.values().flatten().map(|p| p.0).filter(|&t| t < end).collect();
    times.sort_by(f64::total_cmp);
    times.dedup();
    let value = |pts: &[(f64, f64)], t: f64| pts.iter().take_while(|p| p.0 <= t).last().map_or(0.0, |p| p.1);
    let mut out = Vec::new();
    for (i, &from) in times.iter().enumerate() {
        let to = times.get(i + 1).copied().unwrap_or(end);
        let mut lower = 0.0;
        let mut bands = Vec::new();
        for (name, pts) in natural(series) {
            let v = value(pts, from);
            bands.push((name.as_str(), lower, lower + v));
            lower += v;
        }
        out.push((from, to, bands));
    }
    out
}

/// The one-page summary (Markdown).
pub fn summary_markdown(s: &MissionSeries) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# {}\n\nSource: {}. Times are seconds since {}.\n", s.title, s.source, s.time_origin);
    let _ = writeln!(m, "| | |\n| --- | --- |");
    for (k, v) in &s.numbers {
        let _ = writeln!(m, "| {k} | {v} |");
    }
    for n in &s.notes {
        let _ = writeln!(m, "\n{n}");
    }
    let _ = writeln!(m, "\n## Events\n");
    if s.events.is_empty() {
        let _ = writeln!(m, "None: no failure, failover, restart or retirement.");
    } else {
        let _ = writeln!(m, "| t [s] | UAV | event | detail |\n| --- | --- | --- | --- |");
        for e in &s.events {
            let _ = writeln!(m, "| {:.2} | {} | {} | {} |", e.t_s, e.uav, e.kind.name(), e.detail);
        }
    }
    if !s.recoveries.is_empty() {
        let _ = writeln!(
            m,
            "\n## Failure to next token\n\n| UAV | t [s] | handled by | silence before the declaration [s] | declaration to next token [s] | total [s] |\n| --- | --- | --- | --- | --- | --- |"
        );
        for r in &s.recoveries {
            let _ = writeln!(
                m,
                "| {} | {:.2} | {} | {:.3} | {:.3} | {:.3} |",
                r.uav,
                r.t_s,
                r.mode,
                r.detection_s,
                r.to_next_token_s,
                r.total_s()
            );
        }
    }
    let _ = writeln!(m, "\n## Figures\n");
    for (file, title) in FIGURES {
        let _ = writeln!(m, "### {title}\n\n![{title}]({file})\n");
    }
    m
}

fn chart_area(
    path: &Path,
    size: (u32, u32),
) -> Result<DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>, SimError> {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| perr(path, e))?;
    Ok(root)
}

/// Lines per series over the mission's time, events as vertical lines in their kind's colour.
#[allow(clippy::too_many_arguments)]
fn lines_on(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &BTreeMap<String, Vec<(f64, f64)>>,
    events: &[Event],
    xmax: f64,
    yrange: Option<(f64, f64)>,
) -> Result<(), SimError> {
    let text = font_ok();
    let (ymin, ymax) = yrange.unwrap_or_else(|| {
        let ys = series.values().flatten().map(|p| p.1);
        let hi = ys.clone().fold(0.0, f64::max);
        (ys.fold(0.0, f64::min), if hi > 0.0 { hi * 1.1 } else { 1.0 })
    });
    let mut chart =
        titled(area, title, (40, 70)).build_cartesian_2d(0.0..xmax, ymin..ymax).map_err(|e| perr(path, e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(xlabel).y_desc(ylabel);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    let mut kinds_seen = Vec::new();
    for e in events {
        let c = e.kind.color();
        let s = chart
            .draw_series(LineSeries::new(vec![(e.t_s, ymin), (e.t_s, ymax)], c.mix(0.7).stroke_width(2)))
            .map_err(|e| perr(path, e))?;
        if text && !kinds_seen.contains(&e.kind) {
            kinds_seen.push(e.kind);
            s.label(e.kind.name()).legend(move |(x, y)| PathElement::new(vec![(x + 7, y - 6), (x + 7, y + 6)], c));
        }
        if text {
            let label = format!("{} {}", e.kind.name(), e.uav);
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    (e.t_s, ymax - (ymax - ymin) * (0.04 + 0.05 * (kinds_seen.len().max(1) - 1) as f64)),
                    ("sans-serif", 13).into_font().color(&c),
                )))
                .map_err(|e| perr(path, e))?;
        }
    }
    for (i, (name, pts)) in natural(series).into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let s = chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| perr(path, e))?;
        if text {
            s.label(name.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        }
    }
    if text && (series.len() + kinds_seen.len()) <= 24 && (!series.is_empty() || !kinds_seen.is_empty()) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| perr(path, e))?;
    }
    Ok(())
}

/// Layers held per UAV as stacked bands (the model's layers in all), events marked.
fn stacked_layers(
    path: &Path,
    xlabel: &str,
    layers: &BTreeMap<String, Vec<(f64, f64)>>,
    events: &[Event],
    xmax: f64,
) -> Result<(), SimError> {
    let text = font_ok();
    let root = chart_area(path, (1000, 600))?;
    let bands = stack(layers, xmax);
    let top = bands.iter().flat_map(|b| b.2.last().map(|x| x.2)).fold(1.0, f64::max) * 1.15;
    let mut chart = titled(&root, "Layers held per UAV (stacked)", (40, 70))
        .build_cartesian_2d(0.0..xmax, 0.0..top)
        .map_err(|e| perr(path, e))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(xlabel).y_desc("native layers, stacked");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    for (i, (name, _)) in natural(layers).into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let rects = bands.iter().filter_map(|(from, to, bs)| {
            let &(_, lo, hi) = bs.iter().find(|b| b.0 == name)?;
            (hi > lo).then(|| Rectangle::new([(*from, lo), (*to, hi)], color.mix(0.75).filled()))
        });
        let s = chart.draw_series(rects).map_err(|e| perr(path, e))?;
        if text {
            s.label(name.clone()).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        }
    }
    if text {
        // Each band's layer count where it starts.
        let labels = bands.iter().filter(|(from, to, _)| to - from > xmax * 0.04).flat_map(|(from, _, bs)| {
            let x = *from + xmax * 0.005;
            bs.iter().filter(|b| b.2 - b.1 >= 1.0).map(move |&(name, lo, hi)| {
                Text::new(format!("{name}: {}", (hi - lo) as u32), (x, (lo + hi) / 2.0), ("sans-serif", 13))
            })
        });
        chart.draw_series(labels).map_err(|e| perr(path, e))?;
    }
    let mut kinds_seen = Vec::new();
    for (j, e) in events.iter().enumerate() {
        let c = e.kind.color();
        let s = chart
            .draw_series(LineSeries::new(vec![(e.t_s, 0.0), (e.t_s, top)], c.stroke_width(2)))
            .map_err(|e| perr(path, e))?;
        if text && !kinds_seen.contains(&e.kind) {
            kinds_seen.push(e.kind);
            s.label(e.kind.name()).legend(move |(x, y)| PathElement::new(vec![(x + 6, y - 6), (x + 6, y + 6)], c));
        }
        if text {
            let y = top * (0.97 - 0.04 * (j % 3) as f64);
            let label =
                Text::new(format!("{} {}", e.kind.name(), e.uav), (e.t_s, y), ("sans-serif", 13).into_font().color(&c));
            chart.draw_series(std::iter::once(label)).map_err(|e| perr(path, e))?;
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| perr(path, e))?;
    }
    root.present().map_err(|e| perr(path, e))
}

/// Two panels: tokens/s above, step latency below, failures marked on both.
fn throughput(path: &Path, s: &MissionSeries, xmax: f64) -> Result<(), SimError> {
    let root = chart_area(path, (1000, 800))?;
    let (top, bottom) = root.split_vertically(400);
    let one = |name: &str, pts: &[(f64, f64)]| BTreeMap::from([(name.to_string(), pts.to_vec())]);
    let marks: Vec<Event> = s.events.iter().filter(|e| e.kind != EventKind::Failover).cloned().collect();
    let x = format!("time since {} [s]", s.time_origin);
    lines_on(&top, path, "Tokens per second", &x, "tokens/s", &one("tokens/s", &s.tokens_per_s), &marks, xmax, None)?;
    lines_on(
        &bottom,
        path,
        "Step latency (time between two tokens)",
        &x,
        "ms",
        &one("step latency", &s.step_latency_ms),
        &marks,
        xmax,
        None,
    )?;
    root.present().map_err(|e| perr(path, e))
}

/// One stacked bar per failure: silence before the declaration, then declaration to next token.
fn recovery_bars(path: &Path, recs: &[Recovery]) -> Result<(), SimError> {
    let text = font_ok();
    let root = chart_area(path, (1000, 600))?;
    let n = recs.len().max(1);
    let ymax = recs.iter().map(Recovery::total_s).fold(0.0, f64::max).max(1e-3) * 1.2;
    let mut chart = titled(&root, "Failure to next token, per failure", (50, 70))
        .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..ymax)
        .map_err(|e| perr(path, e))?;
    let labels: Vec<String> = recs.iter().map(|r| format!("{} ({}) at {:.1} s", r.uav, r.mode, r.t_s)).collect();
    let label = |x: &f64| category(&labels, *x);
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh();
    if text {
        mesh.y_desc("seconds").x_labels(n + 1).x_label_formatter(&label);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    let (detect, recover) = (RGBColor(220, 30, 30), RGBColor(30, 100, 200));
    let d = chart
        .draw_series(recs.iter().enumerate().map(|(i, r)| {
            Rectangle::new([(i as f64 - 0.2, 0.0), (i as f64 + 0.2, r.detection_s)], detect.mix(0.8).filled())
        }))
        .map_err(|e| perr(path, e))?;
    if text {
        d.label("silence before the declaration")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], detect.filled()));
    }
    let r = chart
        .draw_series(recs.iter().enumerate().map(|(i, r)| {
            Rectangle::new([(i as f64 - 0.2, r.detection_s), (i as f64 + 0.2, r.total_s())], recover.mix(0.8).filled())
        }))
        .map_err(|e| perr(path, e))?;
    if text {
        r.label("declaration to next token")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], recover.filled()));
        if recs.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new(
                    "no failure in this mission",
                    (-0.3, ymax / 2.0),
                    ("sans-serif", 20),
                )))
                .map_err(|e| perr(path, e))?;
        } else {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| perr(path, e))?;
        }
    }
    root.present().map_err(|e| perr(path, e))
}

/// One horizontal bar per topic (bytes, log scale), most first.
fn bytes_bars(path: &Path, topics: &[(String, u64, u64)]) -> Result<(), SimError> {
    let text = font_ok();
    let root = chart_area(path, (1000, 600))?;
    let n = topics.len().max(1);
    let xmax = topics.iter().map(|t| t.2).max().unwrap_or(1).max(1) as f64 * 12.0;
    let mut chart = titled(&root, "Bytes on the air per topic (as recorded)", (40, 220))
        .build_cartesian_2d((1.0..xmax).log_scale(), -0.5..n as f64 - 0.5)
        .map_err(|e| perr(path, e))?;
    // The most bytes at the top.
    let labels: Vec<String> = topics.iter().rev().map(|t| t.0.clone()).collect();
    let label = |y: &f64| category(&labels, *y);
    let mut mesh = chart.configure_mesh();
    mesh.disable_y_mesh();
    if text {
        mesh.x_desc("bytes (log scale)").y_labels(n + 1).y_label_formatter(&label);
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| perr(path, e))?;
    let color = RGBColor(30, 100, 200);
    chart
        .draw_series(topics.iter().enumerate().map(|(i, t)| {
            let y = (n - 1 - i) as f64;
            Rectangle::new([(1.0, y - 0.3), ((t.2.max(1)) as f64, y + 0.3)], color.mix(0.8).filled())
        }))
        .map_err(|e| perr(path, e))?;
    if text {
        chart
            .draw_series(topics.iter().enumerate().map(|(i, t)| {
                let y = (n - 1 - i) as f64;
                Text::new(format!("{} B, {} msgs", t.2, t.1), ((t.2.max(1)) as f64 * 1.1, y + 0.1), ("sans-serif", 13))
            }))
            .map_err(|e| perr(path, e))?;
        if topics.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new("no topics (not modelled)", (2.0, 0.0), ("sans-serif", 20))))
                .map_err(|e| perr(path, e))?;
        }
    }
    root.present().map_err(|e| perr(path, e))
}

/// The label of the category at `x` (categories sit at 0, 1, 2 ...; nothing between them).
fn category(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 0.01 || i < 0.0 {
        return String::new();
    }
    labels.get(i as usize).cloned().unwrap_or_default()
}

/// A simulated mission (one method, one seed, with traces) as series.
pub fn from_simulation(scn: &Scenario, out: &MissionOutput, method: &str, seed: u64) -> MissionSeries {
    let capacity_j = scn.capacity_kj.unwrap_or(scn.energy_kj.max()) * 1e3;
    let name = |id: u32| format!("uav{}", id + 1);
    let mut soc: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut layers: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in &out.uavs {
        soc.entry(name(r.uav)).or_default().push((r.time_s, (r.energy_j / capacity_j).clamp(0.0, 1.0)));
        let v = layers.entry(name(r.uav)).or_default();
        let held = if r.alive { f64::from(r.native_layers) } else { 0.0 };
        if v.last().is_none_or(|&(_, y)| y != held) {
            v.push((r.time_s, held));
        }
    }
    let time_at = |token: u64| out.tokens.iter().find(|t| t.token >= token).map_or(0.0, |t| t.time_s);
    let mut events = Vec::new();
    let mut recoveries = Vec::new();
    for r in &out.recoveries {
        let t = time_at(r.token);
        let (mode, first) = match r.kind.as_str() {
            "retire" => ("retirement", EventKind::Retirement),
            _ => ("failover", EventKind::Failure),
        };
        events.push(Event {
            t_s: t,
            uav: name(r.uav),
            kind: first,
            detail: format!("{} at token {}", r.kind, r.token),
        });
        if first == EventKind::Failure {
            let detail = format!("{} layers to its predecessor, {} to its successor", r.head_layers, r.tail_layers);
            events.push(Event { t_s: t + r.recovery_s, uav: name(r.uav), kind: EventKind::Failover, detail });
        }
        recoveries.push(Recovery {
            uav: name(r.uav),
            t_s: t,
            detection_s: 0.0,
            to_next_token_s: r.recovery_s,
            mode: mode.into(),
        });
    }
    let step_latency_ms: Vec<(f64, f64)> = out.tokens.iter().map(|t| (t.time_s, t.latency_s * 1e3)).collect();
    let tokens_per_s = rate(&out.tokens.iter().map(|t| t.time_s).collect::<Vec<_>>());
    let duration_s = out.tokens.last().map_or(0.0, |t| t.time_s);
    let mut numbers = vec![
        ("tokens".to_string(), out.tokens.len().to_string()),
        ("duration".to_string(), format!("{duration_s:.1} s")),
        ("UAVs".to_string(), scn.uavs.to_string()),
    ];
    if let Some(s) = &out.summary {
        numbers.push(("mission".into(), if s.mission_success { "completed".into() } else { s.failure_reason.clone() }));
        numbers.push(("failures / retirements".into(), format!("{} / {}", s.failures, s.retirements)));
        numbers.push((
            "slowest recovery".into(),
            format!("{:.3} s (deadline {} s)", s.max_recovery_latency_s, scn.deadline_s),
        ));
    }
    MissionSeries {
        title: format!("Simulated mission: {} ({method}, seed {seed})", scn.name),
        source: format!("aerokv sim, scenario {}, method {method}, seed {seed}", scn.name),
        duration_s,
        time_origin: "the mission's start".into(),
        soc,
        layers,
        events,
        tokens_per_s,
        step_latency_ms,
        recoveries,
        bytes_per_topic: Vec::new(),
        numbers,
        notes: vec!["The simulator models radio energy, not topics: the bytes figure is empty.".into()],
    }
}

/// Tokens per second over time from the times tokens came out: over a sliding window of 1 s
/// (or of 8 tokens when they come slower), one point per token.
pub fn rate(times: &[f64]) -> Vec<(f64, f64)> {
    let mut v = Vec::with_capacity(times.len());
    let mut start = 0;
    for (i, &t) in times.iter().enumerate() {
        while start < i && (t - times[start] > 1.0 && i - start > 8) {
            start += 1;
        }
        let dt = t - times[start];
        if i > start && dt > 0.0 {
            v.push((t, (i - start) as f64 / dt));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_tokens_over_their_window() {
        // 10 tokens/s for 3 s, then a 2 s stall, then 10 tokens/s again.
        let mut times: Vec<f64> = (0..30).map(|i| i as f64 * 0.1).collect();
        times.extend((0..10).map(|i| 5.0 + i as f64 * 0.1));
        let r = rate(&times);
        assert_eq!(r.len(), times.len() - 1);
        assert!((r[20].1 - 10.0).abs() < 1e-9, "{:?}", r[20]);
        // Just after the stall the window spans it: the rate drops.
        let after = r.iter().find(|p| p.0 == 5.0).unwrap();
        assert!(after.1 < 5.0, "{after:?}");
        assert!(rate(&[1.0]).is_empty());
    }

    #[test]
    fn names_sort_naturally() {
        let m = BTreeMap::from([("uav10".to_string(), 0), ("uav2".to_string(), 0), ("gw".to_string(), 0)]);
        assert_eq!(natural(&m).into_iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), vec!["gw", "uav2", "uav10"]);
    }

    #[test]
    fn layers_stack_between_changes() {
        let s = BTreeMap::from([
            ("uav1".to_string(), vec![(0.0, 10.0), (2.0, 15.0)]),
            ("uav2".to_string(), vec![(0.0, 20.0), (2.0, 0.0)]),
            ("uav3".to_string(), vec![(1.0, 5.0)]),
        ]);
        let b = stack(&s, 5.0);
        assert_eq!(
            b,
            vec![
                (0.0, 1.0, vec![("uav1", 0.0, 10.0), ("uav2", 10.0, 30.0), ("uav3", 30.0, 30.0)]),
                (1.0, 2.0, vec![("uav1", 0.0, 10.0), ("uav2", 10.0, 30.0), ("uav3", 30.0, 35.0)]),
                (2.0, 5.0, vec![("uav1", 0.0, 15.0), ("uav2", 15.0, 15.0), ("uav3", 15.0, 20.0)]),
            ]
        );
    }

    #[test]
    fn a_simulated_mission_gives_every_series_and_a_report() {
        let scn = Scenario::parse(include_str!("../../../config/scenarios/paper.yaml")).unwrap();
        let out = crate::run_mission(&scn, crate::Method::AeroKv, 1, true);
        let s = from_simulation(&scn, &out, "aerokv", 1);
        assert_eq!(s.soc.len(), scn.uavs as usize);
        assert!(s.soc.values().flatten().all(|&(_, x)| (0.0..=1.0).contains(&x)));
        assert!(!s.tokens_per_s.is_empty() && !s.step_latency_ms.is_empty());
        let failures = out.recoveries.iter().filter(|r| r.kind != "retire").count();
        assert_eq!(s.events.iter().filter(|e| e.kind == EventKind::Failure).count(), failures);
        assert_eq!(s.recoveries.len(), out.recoveries.len());
        let md = summary_markdown(&s);
        for (file, _) in FIGURES {
            assert!(md.contains(&format!("]({file})")), "{file}");
        }
        let dir = std::env::temp_dir().join(format!("aerokv-report-{}", std::process::id()));
        let files = write_report(&s, &dir).unwrap();
        for f in files.figures.iter().chain([&files.summary]) {
            assert!(std::fs::metadata(f).unwrap().len() > 0, "{}", f.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
