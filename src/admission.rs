//! Admission by memory (docs/generate-api.md, "Admission"): a request runs only if, on every UAV
//! of the plan, the weights it holds plus the KV of every admitted request and of the new one, each
//! at its maximum length (prompt + max_tokens), fit the UAV's memory budget. A request that does
//! not fit now waits for running requests to end; one that would not fit even alone is refused,
//! with the UAV and the bytes. No ROS: the scheduler hands in the plan and the heartbeats' figures.
use crate::dataplane::SwarmPlan;
use crate::requests::Refusal;
use std::collections::BTreeMap;

/// What one UAV of a plan holds and may hold, bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UavMemory {
    pub uav: String,
    pub budget_bytes: u64,
    /// Weights of its layers (native and replica).
    pub weight_bytes: u64,
    /// What one token of one request adds: KV rows of its native and replica layers and of the
    /// predecessor's tail snapshot it keeps, and the successor's tail input it buffers.
    pub bytes_per_token: u64,
}

impl UavMemory {
    /// Weights + `tokens` tokens of requests.
    fn need(&self, tokens: u64) -> u64 {
        self.weight_bytes.saturating_add(tokens.saturating_mul(self.bytes_per_token))
    }
}

/// Per-model figures for [`plan_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelBytes {
    pub weight_bytes_per_layer: u64,
    pub kv_bytes_per_token_layer: u64,
    /// One token's hidden state as the activation codec sends it (the successor's buffered tail input).
    pub activation_bytes_per_token: u64,
}

/// Every UAV's memory under `plan`. Weights are the larger of what its layers weigh by the
/// manifest and what its executor reports loaded (`reported`, heartbeats): an executor that
/// still holds layers of an older plan counts them.
pub fn plan_memory(
    plan: &SwarmPlan,
    model: ModelBytes,
    budget_bytes: u64,
    reported: &BTreeMap<String, u64>,
) -> Vec<UavMemory> {
    let ring = plan.stages.len();
    plan.stages
        .iter()
        .map(|s| {
            let (pred, succ) = (plan.pred(&s.uav), plan.succ(&s.uav));
            let alone = ring < 2;
            let replica = succ.filter(|_| !alone).map_or(0, |n| n.k);
            let snapshot = pred.filter(|p| !alone && p.t > 0).map_or(0, |p| p.len - p.k);
            let buffered = succ.filter(|n| !alone && plan.tail_input_from_pred(n).is_some()).is_some();
            let layers = (s.len + replica) as u64;
            let planned = layers * model.weight_bytes_per_layer;
            UavMemory {
                uav: s.uav.clone(),
                budget_bytes,
                weight_bytes: planned.max(reported.get(&s.uav).copied().unwrap_or(0)),
                bytes_per_token: (layers + snapshot as u64) * model.kv_bytes_per_token_layer
                    + if buffered { model.activation_bytes_per_token } else { 0 },
            }
        })
        .collect()
}

/// What to do with the next waiting request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// It fits: run it.
    Admit,
    /// It fits once running requests end.
    Wait(Wait),
    /// It never fits (not even alone).
    Refuse(Refusal),
}

/// Why a request waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// `max_running` requests run already.
    Running { max_running: usize },
    /// With the running requests, `uav` would need `need_bytes` of its `budget_bytes`.
    Memory { uav: String, need_bytes: u64, budget_bytes: u64 },
}

/// Admission of a request of `tokens` (prompt + max_tokens) while requests of `running` tokens
/// each run, at most `max_running` at once. No UAV (no plan yet) admits: the request's own plan
/// decides then.
pub fn admit(uavs: &[UavMemory], running: &[u64], max_running: usize, tokens: u64) -> Verdict {
    if let Some(u) = uavs.iter().find(|u| u.need(tokens) > u.budget_bytes) {
        return Verdict::Refuse(Refusal::Memory {
            uav: u.uav.clone(),
            tokens,
            need_bytes: u.need(tokens),
            budget_bytes: u.budget_bytes,
        });
    }
    if running.len() >= max_running {
        return Verdict::Wait(Wait::Running { max_running });
    }
    let all = running.iter().fold(tokens, |sum, &t| sum.saturating_add(t));
    if let Some(u) = uavs.iter().find(|u| u.need(all) > u.budget_bytes) {
        return Verdict::Wait(Wait::Memory {
            uav: u.uav.clone(),
            need_bytes: u.need(all),
            budget_bytes: u.budget_bytes,
        });
    }
    Verdict::Admit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Stage;

    fn uav(name: &str, budget: u64, weights: u64, per_token: u64) -> UavMemory {
        UavMemory { uav: name.into(), budget_bytes: budget, weight_bytes: weights, bytes_per_token: per_token }
    }

    #[test]
    fn a_request_runs_when_every_uav_holds_its_weights_and_every_admitted_kv() {
        // uav2 is the tightest: 600 + 10 per token of 1,000.
        let uavs = [uav("uav1", 1_000, 100, 5), uav("uav2", 1_000, 600, 10)];
        assert_eq!(admit(&uavs, &[], 4, 40), Verdict::Admit);
        // 600 + (20 + 15) x 10 = 950.
        assert_eq!(admit(&uavs, &[20], 4, 15), Verdict::Admit);
        // 600 + (20 + 15 + 6) x 10 = 1,010: waits for the running ones, naming the UAV and bytes.
        assert_eq!(
            admit(&uavs, &[20, 15], 4, 6),
            Verdict::Wait(Wait::Memory { uav: "uav2".into(), need_bytes: 1_010, budget_bytes: 1_000 })
        );
        // Exactly full fits.
        assert_eq!(admit(&uavs, &[20, 15], 4, 5), Verdict::Admit);
        // The number of requests in flight is bounded too.
        assert_eq!(admit(&uavs, &[1, 1], 2, 1), Verdict::Wait(Wait::Running { max_running: 2 }));
    }

    #[test]
    fn a_request_that_never_fits_is_refused_with_the_uav_and_the_bytes() {
        let uavs = [uav("uav1", 1_000, 100, 5), uav("uav2", 1_000, 600, 10)];
        let v = admit(&uavs, &[], 4, 41);
        let want = Refusal::Memory { uav: "uav2".into(), tokens: 41, need_bytes: 1_010, budget_bytes: 1_000 };
        assert_eq!(v, Verdict::Refuse(want.clone()));
        let text = want.to_string();
        assert!(text.contains("uav2") && text.contains("1010") && text.contains("1000"), "{text}");
        // Refused even while others run (waiting would not help), and never an overflow.
        assert!(matches!(admit(&uavs, &[1; 8], 2, 41), Verdict::Refuse(_)));
        assert!(matches!(
            admit(&uavs, &[], 4, u64::MAX),
            Verdict::Refuse(Refusal::Memory { need_bytes: u64::MAX, .. })
        ));
        // Weights alone over the budget: nothing fits.
        assert!(matches!(admit(&[uav("uav3", 10, 11, 0)], &[], 4, 1), Verdict::Refuse(_)));
        // No plan yet: the request's own plan decides.
        assert_eq!(admit(&[], &[5], 4, 1), Verdict::Admit);
    }

    fn stage(uav: &str, start: usize, len: usize, k: usize, t: usize) -> Stage {
        Stage { uav: uav.into(), start, len, k, t }
    }

    #[test]
    fn a_plan_gives_each_uav_its_layers_replica_snapshot_and_buffer() {
        let plan = SwarmPlan {
            epoch: 1,
            num_layers: 10,
            // uav2's head (2 layers) lives on uav1; its tail (2 layers) is snapshotted to uav3.
            stages: vec![stage("uav1", 0, 4, 1, 0), stage("uav2", 4, 4, 2, 8), stage("uav3", 8, 2, 0, 1)],
            request_id: 0,
            resume_position: 0,
            replay_from: 0,
            requests: Vec::new(),
        };
        let model =
            ModelBytes { weight_bytes_per_layer: 1_000, kv_bytes_per_token_layer: 10, activation_bytes_per_token: 7 };
        let reported = BTreeMap::from([("uav3".to_string(), 99_999), ("uav1".to_string(), 5)]);
        let m = plan_memory(&plan, model, 50_000, &reported);
        // uav1: 4 native + 2 replica layers, buffers uav2's tail input, keeps uav3's tail
        // snapshot (uav3 has K = 0: 2 tail layers).
        assert_eq!(m[0], uav("uav1", 50_000, 6_000, (6 + 2) * 10 + 7));
        // uav2: 4 native + uav3's head (0); uav1's tail is not snapshotted (T = 0); uav3 has a tail.
        assert_eq!(m[1], uav("uav2", 50_000, 4_000, 4 * 10 + 7));
        // uav3: 2 native + uav1's head (1 layer), uav2's tail snapshot (2 layers); uav1's tail
        // (layers 1..4) is fed by uav3's replica output: buffered. Its executor reports more weights.
        assert_eq!(m[2], uav("uav3", 50_000, 99_999, (3 + 2) * 10 + 7));
        // One UAV alone: no replica, no snapshot, no buffer.
        let alone = SwarmPlan { stages: vec![stage("uav1", 0, 10, 3, 4)], ..plan };
        assert_eq!(plan_memory(&alone, model, 1, &BTreeMap::new()), vec![uav("uav1", 1, 10_000, 100)]);
    }
}
