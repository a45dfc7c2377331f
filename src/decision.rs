//! One planning decision of the scheduler as a pure function of what it knew: [`PlanInputs`] in,
//! a [`Planned`] assignment out ([`decide`]). The scheduler builds the inputs from its live view,
//! decides, and publishes both (`PlanInputs`, then `Assignment`); `aerokv bag audit` decides
//! every recorded assignment again from its recorded inputs with the same function (crate::audit).
use crate::control::{Airframe, ControlError, Controller, ModelSize, Planned, Telemetry};
use aerokv_plan::{Channel, PlanConfig, PowerModel};
use std::collections::BTreeMap;

/// The parameters a decision depends on: the scheduler's, and the model's sizes (measured from
/// its manifest). Everything else of [`PlanConfig`] is fixed in code.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameters {
    pub recovery_deadline_s: f64,
    pub weight_load_bps: f64,
    pub snapshot_periods: Vec<u32>,
    /// 0: pure max-min.
    pub lifetime_target_factor: f64,
    pub shared_channel: bool,
    pub frame_loss: f64,
    pub airframe: Airframe,
    pub model: ModelSize,
    /// Members had a heartbeat at most this old (the audit checks the inputs against it).
    pub member_timeout_s: f64,
}

impl Parameters {
    pub fn config(&self) -> PlanConfig {
        PlanConfig {
            deadline_s: self.recovery_deadline_s,
            weight_load_bps: self.weight_load_bps,
            snapshot_periods: self.snapshot_periods.clone(),
            power: PowerModel::default(),
            recoverable_memory: true,
            lifetime_target_factor: (self.lifetime_target_factor > 0.0).then_some(self.lifetime_target_factor),
            channel: self.shared_channel.then(|| Channel { frame_loss: self.frame_loss, ..Channel::default() }),
        }
    }

    /// A controller that decides as the scheduler's did: these parameters, these planning ids.
    pub fn controller(&self, planning_ids: &[String]) -> Controller {
        let mut c = Controller::new(self.config(), self.airframe.clone(), self.model);
        c.restore_ids(planning_ids);
        c
    }
}

/// What kind of decision, with what it needs beyond the telemetry.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// A fresh layout and protection over `members` (ring order), from the inputs' resume
    /// position: 0, or where a standby taking over finds every stage's KV caches
    /// ([`crate::standby::kv_restart`]).
    Initial { members: Vec<String> },
    /// `failed`'s layers move to the survivors of the plan of `based_on_epoch` (a failure, or a
    /// planned retirement when `graceful`), resuming at the inputs' resume position.
    Failover { failed: String, graceful: bool, based_on_epoch: u64, snapshot: Option<SnapshotHeld> },
}

impl Decision {
    pub fn name(&self) -> &'static str {
        match self {
            Decision::Initial { .. } => "initial",
            Decision::Failover { graceful: false, .. } => "failover",
            Decision::Failover { graceful: true, .. } => "retirement",
        }
    }
}

/// How far the failed UAV's successor holds its tail's snapshot, and the heartbeat that said so.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapshotHeld {
    pub tokens: usize,
    pub heartbeat_sequence: u64,
}

/// One UAV's figures as the scheduler held them, and the messages they came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UavInputs {
    pub telemetry: Telemetry,
    /// Stamp (ns since the UNIX epoch) of the `BatteryHealth` message energy and capacity come from.
    pub battery_stamp_ns: u64,
    /// The last heartbeat heard from it (None: none yet).
    pub heartbeat: Option<HeartbeatSeen>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeartbeatSeen {
    pub sequence: u64,
    pub stamp_ns: u64,
}

/// Everything one decision was made from.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInputs {
    /// The epoch of the assignment decided.
    pub epoch: u64,
    pub request_id: u64,
    pub decision: Decision,
    pub total_tokens: u64,
    pub resume_position: usize,
    /// The planning core's numbering: the UAV at index i is UAV i.
    pub planning_ids: Vec<String>,
    pub uavs: BTreeMap<String, UavInputs>,
    pub params: Parameters,
    /// When the scheduler decided, ns since the UNIX epoch.
    pub stamp_ns: u64,
}

impl PlanInputs {
    pub fn telemetry(&self) -> BTreeMap<String, Telemetry> {
        self.uavs.iter().map(|(u, i)| (u.clone(), i.telemetry)).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    #[error("a failover of epoch {based_on} needs that epoch's plan{}", match .have { Some(e) => format!(", not epoch {e}'s"), None => ": there is none".into() })]
    NoBasis { based_on: u64, have: Option<u64> },
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// The assignment the scheduler decides from `inputs`; `current` is the plan a failover changes.
pub fn decide(
    controller: &mut Controller,
    inputs: &PlanInputs,
    current: Option<&Planned>,
) -> Result<Planned, DecideError> {
    let telemetry = inputs.telemetry();
    match &inputs.decision {
        Decision::Initial { members } => {
            let mut planned =
                controller.initial(members, &telemetry, inputs.total_tokens, inputs.epoch, inputs.request_id)?;
            // 0, but for a standby's takeover that keeps the executors' KV caches.
            planned.plan.resume_position = inputs.resume_position;
            Ok(planned)
        }
        Decision::Failover { failed, graceful, based_on_epoch, snapshot } => {
            let current = current
                .filter(|c| c.plan.epoch == *based_on_epoch)
                .ok_or(DecideError::NoBasis { based_on: *based_on_epoch, have: current.map(|c| c.plan.epoch) })?;
            Ok(controller.failover(
                current,
                failed,
                &telemetry,
                inputs.total_tokens,
                inputs.resume_position,
                snapshot.map(|s| s.tokens),
                inputs.epoch,
                *graceful,
            )?)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn params() -> Parameters {
        Parameters {
            recovery_deadline_s: 3.0,
            weight_load_bps: 8e9,
            snapshot_periods: vec![1, 2, 4, 8, 16, 32, 64],
            lifetime_target_factor: 0.0,
            shared_channel: false,
            frame_loss: 0.0,
            airframe: Airframe {
                flight_power_w: 80.0,
                compute_power_w: 35.0,
                tx_power_w: 2.5,
                link_bps: 20e6,
                memory_bytes: 2e9,
            },
            model: ModelSize { num_layers: 30, weight_bytes_per_layer: 3.0e6, kv_bytes_per_token_layer: 1536.0 },
            member_timeout_s: 1.0,
        }
    }

    pub fn inputs(energy: &[f64], decision: Decision, epoch: u64) -> PlanInputs {
        let names: Vec<String> = (1..=energy.len()).map(|i| format!("uav{i}")).collect();
        let uavs = names
            .iter()
            .zip(energy)
            .enumerate()
            .map(|(i, (n, &e))| {
                let telemetry = Telemetry { energy_j: e, capacity_j: 2.7e6, layer_latency_s: 2e-3, link_bps: None };
                let heartbeat = Some(HeartbeatSeen { sequence: 10 + i as u64, stamp_ns: 1_000 });
                (n.clone(), UavInputs { telemetry, battery_stamp_ns: 900, heartbeat })
            })
            .collect();
        PlanInputs {
            epoch,
            request_id: 3,
            decision,
            total_tokens: 256,
            resume_position: if epoch > 1 { 40 } else { 0 },
            planning_ids: names,
            uavs,
            params: params(),
            stamp_ns: 2_000,
        }
    }

    pub fn members(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("uav{i}")).collect()
    }

    #[test]
    fn the_same_inputs_decide_the_same_plan_with_the_schedulers_numbering() {
        let i = inputs(&[2.7e6, 2.7e4, 2.7e6, 2.7e6], Decision::Initial { members: members(4) }, 1);
        let a = decide(&mut i.params.controller(&i.planning_ids), &i, None).unwrap();
        let mut shuffled = i.params.controller(&i.planning_ids);
        assert_eq!(shuffled.planning_ids(), i.planning_ids);
        let b = decide(&mut shuffled, &i, None).unwrap();
        assert_eq!(a.plan, b.plan);
        assert_eq!((a.plan.epoch, a.plan.request_id, a.plan.resume_position), (1, 3, 0));
        // The low battery gets fewer layers: the telemetry went in.
        assert!(a.plan.stage("uav2").unwrap().len < a.plan.stage("uav1").unwrap().len);
        // Other figures, another plan.
        let mut j = i.clone();
        j.uavs.get_mut("uav2").unwrap().telemetry.energy_j = 2.7e6;
        assert_ne!(decide(&mut j.params.controller(&j.planning_ids), &j, None).unwrap().plan, a.plan);
    }

    #[test]
    fn a_failover_needs_the_plan_it_changes() {
        let i = inputs(&[2.7e6; 4], Decision::Initial { members: members(4) }, 1);
        let first = decide(&mut i.params.controller(&i.planning_ids), &i, None).unwrap();
        let snapshot = Some(SnapshotHeld { tokens: 32, heartbeat_sequence: 12 });
        let f = inputs(
            &[2.7e6; 4],
            Decision::Failover { failed: "uav2".into(), graceful: false, based_on_epoch: 1, snapshot },
            2,
        );
        let p = decide(&mut f.params.controller(&f.planning_ids), &f, Some(&first)).unwrap();
        assert!(p.plan.stage("uav2").is_none());
        assert_eq!((p.plan.epoch, p.plan.resume_position, p.plan.replay_from), (2, 40, 32));
        assert_eq!(f.decision.name(), "failover");
        let e = decide(&mut f.params.controller(&f.planning_ids), &f, None).unwrap_err();
        assert!(matches!(e, DecideError::NoBasis { based_on: 1, have: None }), "{e}");
        let mut later = first.clone();
        later.plan.epoch = 5;
        let e = decide(&mut f.params.controller(&f.planning_ids), &f, Some(&later)).unwrap_err();
        assert!(e.to_string().contains("not epoch 5"), "{e}");
    }

    #[test]
    fn parameters_make_the_schedulers_config() {
        let mut p = params();
        assert!(p.config().channel.is_none() && p.config().lifetime_target_factor.is_none());
        p.shared_channel = true;
        p.frame_loss = 0.1;
        p.lifetime_target_factor = 2.0;
        let c = p.config();
        assert_eq!((c.channel.map(|c| c.frame_loss), c.lifetime_target_factor), (Some(0.1), Some(2.0)));
    }
}
