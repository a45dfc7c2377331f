//! CSV files and the printed tables.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::error::SimError;
use crate::mission::{RecoveryRecord, Summary, TokenRow, UavRow};

fn esc(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write(path: &Path, header: &str, rows: impl Iterator<Item = String>) -> Result<(), SimError> {
    let mut text = String::with_capacity(1 << 16);
    text.push_str(header);
    text.push('\n');
    for r in rows {
        text.push_str(&r);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| SimError::Io { path: path.display().to_string(), source: e })
}

pub const SUMMARY_HEADER: &str = "method,seed,mission_success,failure_reason,tokens_done,completion_s,failures,retirements,total_recovery_latency_s,max_recovery_latency_s,deadline_met,deadline_misses,tx_energy_j,protection_compute_energy_j,reconfiguration_energy_j,min_remaining_energy_j,avg_remaining_energy_j,peak_memory_bytes,peak_memory_fraction,expected_remaining_tokens";

fn summary_row(s: &Summary) -> String {
    format!(
        "{},{},{},{},{},{:.6},{},{},{:.6},{:.6},{},{},{:.6},{:.6},{:.6},{:.3},{:.3},{:.0},{:.6},{:.3}",
        esc(&s.method),
        s.seed,
        s.mission_success,
        esc(&s.failure_reason),
        s.tokens_done,
        s.completion_s,
        s.failures,
        s.retirements,
        s.total_recovery_latency_s,
        s.max_recovery_latency_s,
        s.deadline_met,
        s.deadline_misses,
        s.tx_energy_j,
        s.protection_compute_energy_j,
        s.reconfiguration_energy_j,
        s.min_remaining_energy_j,
        s.avg_remaining_energy_j,
        s.peak_memory_bytes,
        s.peak_memory_fraction,
        s.expected_remaining_tokens
    )
}

pub fn write_summary(path: &Path, rows: &[Summary]) -> Result<(), SimError> {
    write(path, SUMMARY_HEADER, rows.iter().map(summary_row))
}

pub fn write_tokens(path: &Path, rows: &[TokenRow]) -> Result<(), SimError> {
    write(
        path,
        "method,token,time_s,latency_s,epoch,alive,min_energy_j,event",
        rows.iter().map(|r| {
            format!(
                "{},{},{:.6},{:.6},{},{},{:.3},{}",
                r.method,
                r.token,
                r.time_s,
                r.latency_s,
                r.epoch,
                r.alive,
                r.min_energy_j,
                esc(&r.event)
            )
        }),
    )
}

pub fn write_uavs(path: &Path, rows: &[UavRow]) -> Result<(), SimError> {
    write(
        path,
        "method,token,time_s,uav,alive,energy_j,native_layers,replica_layers,snapshot_layers,memory_bytes,power_fraction",
        rows.iter().map(|r| {
            format!(
                "{},{},{:.6},{},{},{:.3},{},{},{},{:.0},{:.6}",
                r.method, r.token, r.time_s, r.uav, r.alive, r.energy_j, r.native_layers, r.replica_layers, r.snapshot_layers, r.memory_bytes, r.power_fraction
            )
        }),
    )
}

pub fn write_recoveries(path: &Path, rows: &[RecoveryRecord]) -> Result<(), SimError> {
    write(
        path,
        "method,token,uav,kind,pred,succ,head_layers,tail_layers,replay_tokens,recovery_s,deadline_met,rebuild_s,rebuild_tx_j,moved_layers",
        rows.iter().map(|r| {
            format!(
                "{},{},{},{},{},{},{},{},{},{:.6},{},{:.6},{:.6},{}",
                r.method, r.token, r.uav, r.kind, r.pred, r.succ, r.head_layers, r.tail_layers, r.replay_tokens, r.recovery_s, r.deadline_met, r.rebuild_s, r.rebuild_tx_j, r.moved_layers
            )
        }),
    )
}

/// Mean and sample standard deviation.
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    let v = if xs.len() > 1 { xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (m, v.sqrt())
}

type Col = (&'static str, fn(&Summary) -> f64);

const COLS: [Col; 12] = [
    ("failures", |s| f64::from(s.failures)),
    ("retirements", |s| f64::from(s.retirements)),
    ("completion_s", |s| s.completion_s),
    ("total_recovery_latency_s", |s| s.total_recovery_latency_s),
    ("max_recovery_latency_s", |s| s.max_recovery_latency_s),
    ("tx_energy_j", |s| s.tx_energy_j),
    ("protection_compute_energy_j", |s| s.protection_compute_energy_j),
    ("reconfiguration_energy_j", |s| s.reconfiguration_energy_j),
    ("min_remaining_energy_j", |s| s.min_remaining_energy_j),
    ("avg_remaining_energy_j", |s| s.avg_remaining_energy_j),
    ("peak_memory_bytes", |s| s.peak_memory_bytes),
    ("expected_remaining_tokens", |s| s.expected_remaining_tokens),
];

/// Group rows by method in first-seen order.
fn groups(rows: &[Summary]) -> Vec<(String, Vec<&Summary>)> {
    let mut order: Vec<String> = Vec::new();
    let mut map: BTreeMap<String, Vec<&Summary>> = BTreeMap::new();
    for r in rows {
        if !map.contains_key(&r.method) {
            order.push(r.method.clone());
        }
        map.entry(r.method.clone()).or_default().push(r);
    }
    order
        .into_iter()
        .map(|m| {
            let v = map.remove(&m).unwrap_or_default();
            (m, v)
        })
        .collect()
}

pub fn write_aggregate(path: &Path, rows: &[Summary]) -> Result<(), SimError> {
    let mut header = String::from("method,seeds,mission_success_rate,deadline_met_rate");
    for (c, _) in COLS {
        let _ = write!(header, ",{c}_mean,{c}_sd");
    }
    let lines = groups(rows).into_iter().map(|(m, g)| {
        let n = g.len() as f64;
        let succ = g.iter().filter(|s| s.mission_success).count() as f64 / n;
        let dl = g.iter().filter(|s| s.mission_success && s.deadline_met).count() as f64 / n;
        let mut line = format!("{},{},{:.4},{:.4}", m, g.len(), succ, dl);
        for (_, f) in COLS {
            let xs: Vec<f64> = g.iter().map(|s| f(s)).filter(|x| x.is_finite()).collect();
            let (mu, sd) = mean_sd(&xs);
            let _ = write!(line, ",{mu:.6},{sd:.6}");
        }
        line
    });
    let lines: Vec<String> = lines.collect();
    write(path, &header, lines.into_iter())
}

/// The human table: means ± sample standard deviations over seeds.
pub fn table(rows: &[Summary]) -> String {
    let gib = 1024f64.powi(3);
    let mut out = String::new();
    let seeds = rows.iter().map(|r| r.seed).collect::<std::collections::BTreeSet<_>>().len();
    let _ = writeln!(out, "{seeds} seed(s); mean ± sd over seeds. success = all tokens generated; deadline = every recovery within tau (successful missions)");
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>9} {:>9} {:>16} {:>14} {:>15} {:>13} {:>13} {:>12} {:>15} {:>14}",
        "method",
        "success",
        "deadline",
        "failures",
        "recovery_sum_s",
        "recovery_max_s",
        "completion_s",
        "tx_kJ",
        "prot_comp_kJ",
        "peak_mem_GiB",
        "min_energy_kJ",
        "exp_tokens"
    );
    for (m, g) in groups(rows) {
        let n = g.len();
        let succ = g.iter().filter(|s| s.mission_success).count();
        let dl = g.iter().filter(|s| s.mission_success && s.deadline_met).count();
        let ms = |f: fn(&Summary) -> f64, scale: f64, prec: usize| {
            let xs: Vec<f64> = g.iter().map(|s| f(s) / scale).filter(|x| x.is_finite()).collect();
            let (mu, sd) = mean_sd(&xs);
            format!("{mu:.prec$}±{sd:.prec$}")
        };
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>9} {:>9} {:>16} {:>14} {:>15} {:>13} {:>13} {:>12} {:>15} {:>14}",
            m,
            format!("{succ}/{n}"),
            format!("{dl}/{n}"),
            ms(|s| f64::from(s.failures), 1.0, 1),
            ms(|s| s.total_recovery_latency_s, 1.0, 2),
            ms(|s| s.max_recovery_latency_s, 1.0, 2),
            ms(|s| s.completion_s, 1.0, 1),
            ms(|s| s.tx_energy_j, 1e3, 2),
            ms(|s| s.protection_compute_energy_j, 1e3, 2),
            ms(|s| s.peak_memory_bytes, gib, 2),
            ms(|s| s.min_remaining_energy_j, 1e3, 0),
            ms(|s| s.expected_remaining_tokens, 1.0, 0),
        );
    }
    let reasons: Vec<String> = rows
        .iter()
        .filter(|r| !r.mission_success)
        .map(|r| format!("  {} seed {}: {}", r.method, r.seed, r.failure_reason))
        .collect();
    if !reasons.is_empty() {
        let _ = writeln!(out, "failed missions:");
        for r in reasons.iter().take(20) {
            let _ = writeln!(out, "{r}");
        }
        if reasons.len() > 20 {
            let _ = writeln!(out, "  ... and {} more (see the CSV)", reasons.len() - 20);
        }
    }
    out
}
