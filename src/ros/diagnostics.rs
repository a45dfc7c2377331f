//! `/diagnostics` from the pure [`crate::diagnostics`] statuses.
use crate::diagnostics::Status;
use crate::ros::{clock, names, NodeContext};
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use std::time::{Duration, Instant};

/// How often a node's own status goes to `/diagnostics`.
pub const PERIOD: Duration = Duration::from_secs(1);

pub fn to_msg(s: Status) -> DiagnosticStatus {
    DiagnosticStatus {
        level: s.level as u8,
        name: s.name,
        message: s.message,
        hardware_id: s.hardware_id,
        values: s.values.into_iter().map(|(key, value)| KeyValue { key, value }).collect(),
    }
}

pub fn array(status: Vec<Status>) -> DiagnosticArray {
    DiagnosticArray {
        header: r2r::std_msgs::msg::Header { stamp: clock::stamp(), frame_id: String::new() },
        status: status.into_iter().map(to_msg).collect(),
    }
}

/// A node's `/diagnostics` publisher, at most once per [`PERIOD`] of the node's clock unless
/// forced.
pub struct Diagnostics {
    publisher: r2r::Publisher<DiagnosticArray>,
    last: Option<Instant>,
}

impl Diagnostics {
    pub fn new(ctx: &NodeContext) -> anyhow::Result<Self> {
        Ok(Diagnostics { publisher: ctx.publisher(names::DIAGNOSTICS, r2r::QosProfile::default())?, last: None })
    }

    /// True when a period has passed since the last publication (or there was none).
    pub fn is_due(&self, now: Instant) -> bool {
        self.last.is_none_or(|t| now.saturating_duration_since(t) >= PERIOD)
    }

    /// Publishes what `build` says when a period has passed since the last time.
    pub fn due(&mut self, build: impl FnOnce() -> Vec<Status>) {
        let now = clock::now();
        if self.is_due(now) {
            self.publish_at(now, build());
        }
    }

    pub fn publish_at(&mut self, now: Instant, status: Vec<Status>) {
        self.last = Some(now);
        self.publish(status);
    }

    pub fn publish(&self, status: Vec<Status>) {
        if status.is_empty() {
            return;
        }
        if let Err(e) = self.publisher.publish(&array(status)) {
            tracing::warn!("publish diagnostics: {e}");
        }
    }
}
