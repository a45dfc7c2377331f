//! `shard_executor`: one per UAV, the data plane. Follows the scheduler's assignment, loads its
//! layer shard, computes, forwards activations, heartbeats.
use crate::ros::{names, now_stamp, NodeContext};
use r2r::aerokv::msg::{Assignment, Heartbeat};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// Defaults to the node's namespace.
    pub uav_id: String,
    pub heartbeat_period_s: f64,
    /// Model parts root (`models/generated`); empty = `$AEROKV_MODELS`.
    pub models_dir: String,
    pub variant: String,
    /// ONNX Runtime intra-op threads. Every executor must use the same value: replicas and
    /// replays are only bit-identical under identical settings.
    pub threads: usize,
}

impl Default for Params {
    fn default() -> Self {
        Params { uav_id: String::new(), heartbeat_period_s: 0.1, models_dir: String::new(), variant: "q4".into(), threads: 1 }
    }
}

pub async fn run(ctx: NodeContext, mut p: Params) -> anyhow::Result<()> {
    if p.uav_id.is_empty() {
        p.uav_id = ctx.namespace.clone();
    }
    anyhow::ensure!(!p.uav_id.is_empty(), "parameter `uav_id` is empty and the node has no namespace");
    anyhow::ensure!(p.heartbeat_period_s > 0.0, "parameter `heartbeat_period_s` must be positive");
    let hb_pub = ctx.publisher::<Heartbeat>(&names::heartbeat(&p.uav_id), names::telemetry())?;
    let mut assignments = ctx.subscribe::<Assignment>(names::ASSIGNMENT, names::latched())?;
    let mut beat = tokio::time::interval(Duration::from_secs_f64(p.heartbeat_period_s));
    let mut hb = Heartbeat { uav_id: p.uav_id.clone(), state: "waiting".into(), ..Default::default() };
    let shutdown = ctx.shutdown();
    tokio::pin!(shutdown);
    tracing::info!(uav = %p.uav_id, variant = %p.variant, "shard executor up");
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            Some(a) = assignments.recv() => {
                if let Some(mine) = a.uavs.iter().find(|u| u.uav_id == p.uav_id) {
                    hb.epoch = a.epoch;
                    hb.layer_start = mine.layer_start;
                    hb.layer_end = mine.layer_end;
                    hb.state = "ready".into();
                    tracing::info!(epoch = a.epoch, start = mine.layer_start, end = mine.layer_end, "assignment");
                }
            }
            _ = beat.tick() => {
                hb.sequence += 1;
                hb.stamp = now_stamp();
                if let Err(e) = hb_pub.publish(&hb) { tracing::warn!("publish heartbeat: {e}"); }
            }
        }
    }
}
