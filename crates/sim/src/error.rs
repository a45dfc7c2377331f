//! The one error type of the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("scenario field `{field}`: {reason}")]
    Scenario { field: &'static str, reason: String },
    #[error("scenario YAML: {0}")]
    Yaml(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error(
        "unknown method `{0}` (known: np, oo, so, aerokv, aerokv-nop2, aerokv-uniform, aerokv-beam, aerokv-noretire)"
    )]
    UnknownMethod(String),
    #[error("bad seed range `{0}` (expected A..B with A < B)")]
    SeedRange(String),
    #[error("planner: {0}")]
    Plan(#[from] aerokv_plan::PlanError),
    #[error("plot {path}: {reason}")]
    Plot { path: String, reason: String },
}
