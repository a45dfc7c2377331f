//! `scheduler`: one per swarm, the control plane and the gateway.
use super::discovery::uavs_with_topic;
use crate::ros::{names, now_stamp, NodeContext};
use r2r::aerokv::msg::{Assignment, UavAssignment};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Params {
    /// Plan once this many UAVs are up.
    pub expected_uavs: usize,
    pub models_dir: String,
    pub variant: String,
    pub threads: usize,
    pub num_layers: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params { expected_uavs: 4, models_dir: String::new(), variant: "q4".into(), threads: 1, num_layers: 30 }
    }
}

pub async fn run(ctx: NodeContext, p: Params) -> anyhow::Result<()> {
    anyhow::ensure!(p.expected_uavs >= 1, "parameter `expected_uavs` must be at least 1");
    let assign_pub = ctx.publisher::<Assignment>(names::ASSIGNMENT, names::latched())?;
    let mut discover = tokio::time::interval(Duration::from_millis(200));
    let mut epoch = 0u64;
    let shutdown = ctx.shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = discover.tick() => {
                let uavs: Vec<String> = uavs_with_topic(&ctx, "heartbeat").into_iter().collect();
                if epoch == 0 && uavs.len() >= p.expected_uavs {
                    epoch = 1;
                    let n = uavs.len() as u32;
                    let mut start = 0;
                    let entries = uavs.iter().enumerate().map(|(i, u)| {
                        let end = p.num_layers * (i as u32 + 1) / n;
                        let e = UavAssignment { uav_id: u.clone(), layer_start: start, layer_end: end, overlap_layers: 0, snapshot_period: 0 };
                        start = end;
                        e
                    }).collect();
                    let msg = Assignment { epoch, stamp: now_stamp(), model_variant: p.variant.clone(), num_layers: p.num_layers, ring: uavs.clone(), uavs: entries, reason: "initial".into(), request_id: 0, resume_position: 0 };
                    assign_pub.publish(&msg)?;
                    tracing::info!(epoch, ?uavs, "assignment published");
                }
            }
        }
    }
}
