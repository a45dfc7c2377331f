//! Radio cost model: an 802.11 ad-hoc channel is one shared medium.
//!
//! Every transmission in range competes for the same airtime: the activations of every hop, KV
//! snapshots, heartbeats. A frame of `b` bytes (an IP packet) costs, per attempt, the channel
//! access (DIFS + a random backoff of `CW/2` slots, `CW` doubling after each failed attempt up to
//! `cw_max`), the PHY preamble, `(mac_overhead + b) x 8 / rate`, then SIFS and an ACK at the basic
//! rate. Each attempt fails with probability `frame_loss`, up to `retry_limit` retries, so
//! attempt `i` happens with probability `frame_loss^i`. A message of `B` bytes travels as
//! `ceil((B + message_overhead) / (mtu - ip_udp_overhead))` frames; if any frame is lost after all
//! retries the (reliable) message is sent again, which divides by the chance that it gets through.
//!
//! Per token, with one token in flight (decoding):
//!
//! ```text
//! token_s = sum of the stages' compute + gateway_s
//!         + hops x hop_latency_s
//!         + (airtime of every hop's activation + snapshot airtime / T) / (1 - heartbeat share of the channel)
//! ```
//!
//! and no stage can be busier than that (a stage also computes its successor's head replica:
//! `token_s >= (native + replica layers) x layer latency`). Tokens/s is `1 / token_s`.
//!
//! Where the planners use a link rate (the energy and time of sending snapshot rows and recovery
//! handovers), [`crate::PlanConfig::channel`] replaces the UAV's nominal rate with the channel's
//! effective rate for full frames ([`Channel::effective_rate_bps`]).
use serde::{Deserialize, Serialize};

use crate::cost::effective;
use crate::error::{PlanError, Result};
use crate::types::{Layout, ModelSpec, ProtectionPlan, Ring, SwarmState};

/// Bytes of one element of the model's KV rows as `ModelSpec::kv_bytes_per_token_layer` counts them (f32).
pub const KV_BYTES_PER_ELEMENT: f64 = 4.0;

/// An 802.11 channel's MAC and loss (the PHY rate is the sending UAV's `link_bps`). Defaults:
/// 802.11a OFDM timing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Channel {
    /// Rate of control frames (ACKs), bit/s.
    pub basic_rate_bps: f64,
    pub slot_s: f64,
    pub sifs_s: f64,
    /// PLCP preamble and header, s.
    pub preamble_s: f64,
    pub cw_min: u32,
    pub cw_max: u32,
    pub retry_limit: u32,
    /// MAC header + FCS + LLC/SNAP, bytes per frame.
    pub mac_overhead_bytes: f64,
    /// IPv4 + UDP headers, bytes per frame.
    pub ip_udp_overhead_bytes: f64,
    pub mtu_bytes: f64,
    pub ack_bytes: f64,
    /// Probability that one transmission attempt of a frame fails (collision, noise).
    pub frame_loss: f64,
    /// Latency of one hop beyond its airtime (stacks, queues, middleware), s.
    pub hop_latency_s: f64,
}

impl Default for Channel {
    fn default() -> Self {
        Channel {
            basic_rate_bps: 6e6,
            slot_s: 9e-6,
            sifs_s: 16e-6,
            preamble_s: 20e-6,
            cw_min: 15,
            cw_max: 1023,
            retry_limit: 7,
            mac_overhead_bytes: 36.0,
            ip_udp_overhead_bytes: 28.0,
            mtu_bytes: 1500.0,
            ack_bytes: 14.0,
            frame_loss: 0.0,
            hop_latency_s: 1e-3,
        }
    }
}

impl Channel {
    pub fn validate(&self) -> Result<()> {
        let positive = [self.basic_rate_bps, self.slot_s, self.sifs_s, self.mtu_bytes];
        let non_negative =
            [self.preamble_s, self.mac_overhead_bytes, self.ack_bytes, self.hop_latency_s, self.ip_udp_overhead_bytes];
        let ok = positive.iter().all(|v| v.is_finite() && *v > 0.0)
            && non_negative.iter().all(|v| v.is_finite() && *v >= 0.0)
            && self.mtu_bytes > self.ip_udp_overhead_bytes
            && self.cw_max >= self.cw_min
            && (0.0..1.0).contains(&self.frame_loss);
        if ok {
            Ok(())
        } else {
            Err(PlanError::InvalidConfig(format!("radio channel: {self:?}")))
        }
    }

    /// DIFS: SIFS and two slots.
    fn difs_s(&self) -> f64 {
        self.sifs_s + 2.0 * self.slot_s
    }

    /// Expected airtime of one frame carrying an IP packet of `ip_bytes`, retries included, s.
    pub fn frame_airtime_s(&self, ip_bytes: f64, rate_bps: f64) -> f64 {
        let data = self.preamble_s + (self.mac_overhead_bytes + ip_bytes) * 8.0 / rate_bps;
        // A failed attempt waits for an ACK that does not come about as long as one takes.
        let ack = self.sifs_s + self.preamble_s + self.ack_bytes * 8.0 / self.basic_rate_bps;
        let mut total = 0.0;
        let mut reach = 1.0;
        let mut cw = f64::from(self.cw_min);
        for _ in 0..=self.retry_limit {
            total += reach * (self.difs_s() + cw / 2.0 * self.slot_s + data + ack);
            reach *= self.frame_loss;
            cw = (2.0 * cw + 1.0).min(f64::from(self.cw_max));
        }
        total
    }

    /// Expected airtime of a message of `bytes` (payload plus its own headers) sent at `rate_bps`, s.
    pub fn message_airtime_s(&self, bytes: f64, rate_bps: f64) -> f64 {
        if bytes <= 0.0 {
            return 0.0;
        }
        let per_frame = self.mtu_bytes - self.ip_udp_overhead_bytes;
        let full = (bytes / per_frame).floor();
        let rest = bytes - full * per_frame;
        let mut airtime = full * self.frame_airtime_s(self.mtu_bytes, rate_bps);
        let mut frames = full;
        if rest > 0.0 {
            airtime += self.frame_airtime_s(rest + self.ip_udp_overhead_bytes, rate_bps);
            frames += 1.0;
        }
        // A frame lost after every retry loses the message; it is sent again.
        let frame_lost = self.frame_loss.powi(self.retry_limit as i32 + 1);
        airtime / (1.0 - frame_lost).powf(frames)
    }

    /// Payload bit/s of a long transfer (full frames) at PHY rate `rate_bps`.
    pub fn effective_rate_bps(&self, rate_bps: f64) -> f64 {
        let payload = self.mtu_bytes - self.ip_udp_overhead_bytes;
        payload * 8.0 / self.message_airtime_s(payload, rate_bps)
    }

    /// The PHY rate whose effective rate ([`Self::effective_rate_bps`]) is `goodput_bps`: what a
    /// measured payload rate means for the model's per-UAV `link_bps`. Goodput above what any PHY
    /// rate up to `max_rate_bps` carries (the MAC's fixed costs cap it) gives `max_rate_bps`; a
    /// goodput that is not a positive number gives `None`.
    pub fn rate_for_goodput_bps(&self, goodput_bps: f64, max_rate_bps: f64) -> Option<f64> {
        if !(goodput_bps.is_finite() && goodput_bps > 0.0 && max_rate_bps.is_finite() && max_rate_bps > 0.0) {
            return None;
        }
        if self.effective_rate_bps(max_rate_bps) <= goodput_bps {
            return Some(max_rate_bps);
        }
        // The effective rate grows with the PHY rate: bisect on a log scale.
        let (mut lo, mut hi) = (goodput_bps.min(max_rate_bps) * 1e-3, max_rate_bps);
        for _ in 0..100 {
            let mid = (lo * hi).sqrt();
            if self.effective_rate_bps(mid) < goodput_bps {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Some(hi)
    }
}

/// What crosses the channel besides the planner's KV rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Traffic {
    /// Elements of one token's hidden state (576 for SmolLM2-135M).
    pub hidden_size: f64,
    /// Bytes per element of activations on the link: the activation codec's
    /// (`aerokv_codec::ActivationCodec::bytes_per_element`: 4 raw, 2 f16, 1 + 4/576 int8).
    pub bytes_per_element: f64,
    /// Bytes per element of KV snapshot rows: lossless whatever the activation codec
    /// (`aerokv_codec::KvCodec::bytes_per_element`: 4 raw, ~3.4 zstd).
    pub kv_bytes_per_element: f64,
    /// Headers of one message (middleware and its own fields), bytes.
    pub message_overhead_bytes: f64,
    /// One heartbeat, bytes, and how often each UAV sends one.
    pub heartbeat_bytes: f64,
    pub heartbeat_period_s: f64,
    /// The gateway's time per token (LM head, sampling, embedding), s.
    pub gateway_s: f64,
    /// The most bytes of KV rows a sender puts on the air in one go (its bulk flow controller's
    /// bytes per period): what an activation may find ahead of it.
    pub bulk_burst_bytes: f64,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            hidden_size: 576.0,
            bytes_per_element: 4.0,
            kv_bytes_per_element: KV_BYTES_PER_ELEMENT,
            message_overhead_bytes: 120.0,
            heartbeat_bytes: 200.0,
            heartbeat_period_s: 0.05,
            gateway_s: 0.0,
            bulk_burst_bytes: 6000.0,
        }
    }
}

impl Traffic {
    pub fn validate(&self) -> Result<()> {
        let ok = [self.hidden_size, self.bytes_per_element, self.kv_bytes_per_element, self.heartbeat_period_s]
            .iter()
            .all(|v| v.is_finite() && *v > 0.0)
            && [self.message_overhead_bytes, self.heartbeat_bytes, self.gateway_s, self.bulk_burst_bytes]
                .iter()
                .all(|v| v.is_finite() && *v >= 0.0);
        if ok {
            Ok(())
        } else {
            Err(PlanError::InvalidConfig(format!("radio traffic: {self:?}")))
        }
    }

    /// Bytes of one token's activation message.
    pub fn activation_bytes(&self) -> f64 {
        self.hidden_size * self.bytes_per_element + self.message_overhead_bytes
    }
}

/// Where a token's time goes over radio.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RadioPrediction {
    pub tokens_per_s: f64,
    pub token_s: f64,
    /// Compute on the critical path (every stage's native layers) and the gateway, s.
    pub compute_s: f64,
    /// Activation transmissions per token (hops, plus the gateway's copy for a head replica).
    pub hops: u32,
    /// Airtime of every hop's activation, s per token.
    pub activation_airtime_s: f64,
    /// Snapshot airtime per token (each burst spread over its T tokens), s. Paced KV rows take
    /// channel time beside the token's path, not on it: they count through `contention_s` and
    /// `channel_s`.
    pub snapshot_airtime_s: f64,
    /// The token's own path: compute, activation airtime, hop latency and contention, s.
    pub critical_path_s: f64,
    /// Expected wait of the token's activations behind KV rows already on the air, s per token.
    pub contention_s: f64,
    /// Channel time every token needs (activations, snapshots, heartbeats): a channel that
    /// cannot carry it sets the pace, s.
    pub channel_s: f64,
    /// Per-hop latency beyond airtime, s per token.
    pub hop_latency_s: f64,
    /// Share of the channel's time the heartbeats take.
    pub heartbeat_share: f64,
    /// Share of the channel's time in use while decoding at this rate.
    pub channel_share: f64,
    /// The slowest stage's busy time (native + replica layers), s; bounds `token_s` from below.
    pub busiest_stage_s: f64,
}

/// Predicted decoding tokens/s of a layout and protection plan over a shared radio channel, with
/// each UAV's per-layer latency from `swarm` (battery-aware, or measured) and each sender's PHY
/// rate its `link_bps`.
pub fn predict_tokens_per_s(
    swarm: &SwarmState,
    model: &ModelSpec,
    layout: &Layout,
    ring: &Ring,
    plan: &ProtectionPlan,
    channel: &Channel,
    traffic: &Traffic,
) -> Result<RadioPrediction> {
    swarm.validate()?;
    model.validate()?;
    channel.validate()?;
    traffic.validate()?;
    layout.check_ring(ring)?;
    let order = ring.order();
    let m = order.len();
    let l = layout.num_layers();
    let act = traffic.activation_bytes();
    let kv_bytes = model.kv_bytes_per_token_layer / KV_BYTES_PER_ELEMENT * traffic.kv_bytes_per_element;
    // The gateway's own link: the slowest member's rate (it flies with them).
    let gateway_rate = swarm.uavs.iter().map(|u| u.link_bps).fold(f64::INFINITY, f64::min);
    let mut compute_s = traffic.gateway_s;
    let mut busiest: f64 = 0.0;
    let mut activation_airtime_s = channel.message_airtime_s(act, gateway_rate);
    let mut snapshot_airtime_s = 0.0;
    let mut hops = 1u32;
    for (i, &u) in order.iter().enumerate() {
        let s = swarm.uav(u)?;
        let lat = effective(s, model, &swarm.config).layer_latency_s;
        let iv = layout.interval(u).ok_or(PlanError::UnknownUav { uav: u })?;
        let n = iv.len();
        let p = plan.get(u);
        let k = p.k.min(n);
        let succ_k = if m > 1 { plan.get(order[(i + 1) % m]).k.min(layout.layers_of(order[(i + 1) % m])) } else { 0 };
        compute_s += f64::from(n) * lat;
        busiest = busiest.max(f64::from(n + succ_k) * lat);
        // Its output: to the next stage, or to the gateway; a stage around the gateway also
        // hands its first part's output to the gateway and gets the next embedding back.
        let sends = 1 + u32::from(iv.wraps(l));
        activation_airtime_s += f64::from(sends) * channel.message_airtime_s(act, s.link_bps);
        hops += sends;
        if iv.normalized(l).start == 0 && m > 1 && k > 0 {
            // Its input comes from the gateway: its head replica's holder needs a copy too.
            activation_airtime_s += channel.message_airtime_s(act, gateway_rate);
            hops += 1;
        }
        if let (Some(t), true) = (p.period, m > 1 && n > k) {
            let burst = f64::from(n - k) * f64::from(t) * kv_bytes + traffic.message_overhead_bytes;
            snapshot_airtime_s += channel.message_airtime_s(burst, s.link_bps) / f64::from(t);
        }
    }
    let heartbeat_share = swarm
        .uavs
        .iter()
        .map(|u| channel.message_airtime_s(traffic.heartbeat_bytes, u.link_bps) / traffic.heartbeat_period_s)
        .sum::<f64>();
    if heartbeat_share >= 1.0 {
        return Err(PlanError::InvalidConfig(format!("heartbeats alone fill the channel ({heartbeat_share:.2})")));
    }
    let activation_s = activation_airtime_s / (1.0 - heartbeat_share);
    let hop_latency_s = f64::from(hops) * channel.hop_latency_s;
    let path_s = compute_s + activation_s + hop_latency_s;
    // An activation that finds KV rows on the air (the channel's share busy with them, rho = S/x)
    // waits for the rest of that burst, on average half its airtime: x = path + hops rho B/2 has
    // the root below. Snapshots are paced and sent while the stages compute, so their airtime
    // is not on the path itself.
    let burst_s = if snapshot_airtime_s > 0.0 {
        channel.message_airtime_s(traffic.bulk_burst_bytes, mean_rate(swarm)) / 2.0
    } else {
        0.0
    };
    let critical_path_s =
        (path_s + (path_s * path_s + 4.0 * f64::from(hops) * snapshot_airtime_s * burst_s).sqrt()) / 2.0;
    let contention_s = critical_path_s - path_s;
    let channel_s = (activation_airtime_s + snapshot_airtime_s) / (1.0 - heartbeat_share);
    let token_s = critical_path_s.max(channel_s).max(busiest);
    Ok(RadioPrediction {
        tokens_per_s: 1.0 / token_s,
        token_s,
        compute_s,
        hops,
        activation_airtime_s,
        snapshot_airtime_s,
        critical_path_s,
        contention_s,
        channel_s,
        hop_latency_s,
        heartbeat_share,
        channel_share: heartbeat_share + (activation_airtime_s + snapshot_airtime_s) / token_s,
        busiest_stage_s: busiest,
    })
}

/// The mean of the members' link rates, bit/s.
fn mean_rate(swarm: &SwarmState) -> f64 {
    swarm.uavs.iter().map(|u| u.link_bps).sum::<f64>() / swarm.uavs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{LayerInterval, PlanConfig, Protection, UavState};
    use crate::{plan_protection, ProtectionPlan};

    fn uav(id: u32, link_bps: f64) -> UavState {
        UavState {
            id,
            energy_j: 1e6,
            capacity_j: 1e6,
            memory_bytes: 2e9,
            link_bps,
            flight_power_w: 80.0,
            compute_power_w: 35.0,
            layer_latency_s: 2e-3,
            latency_measured: true,
            tx_power_w: 2.5,
        }
    }

    fn swarm(m: u32) -> SwarmState {
        SwarmState { uavs: (0..m).map(|i| uav(i, 24e6)).collect(), config: PlanConfig::default() }
    }

    fn model() -> ModelSpec {
        ModelSpec {
            num_layers: 30,
            weight_bytes_per_layer: 3e6,
            kv_bytes_per_token_layer: 1536.0,
            total_tokens: 512,
            tokens_done: 0,
        }
    }

    fn uniform(m: u32) -> Layout {
        let per = 30 / m;
        let counts: Vec<u32> = (0..m).map(|i| if i + 1 == m { 30 - per * (m - 1) } else { per }).collect();
        Layout::from_counts(30, &Ring::new((0..m).collect()).expect("ring"), &counts).expect("layout")
    }

    fn predict(m: u32, plan: Option<&ProtectionPlan>, channel: &Channel, traffic: &Traffic) -> RadioPrediction {
        let layout = uniform(m);
        let none = ProtectionPlan::none(&layout);
        predict_tokens_per_s(&swarm(m), &model(), &layout, &layout.ring(), plan.unwrap_or(&none), channel, traffic)
            .expect("prediction")
    }

    /// Whole frames only, so that airtime is exactly proportional to bytes.
    fn whole_frames() -> Traffic {
        Traffic { hidden_size: 1472.0, message_overhead_bytes: 0.0, ..Traffic::default() }
    }

    #[test]
    fn one_frame_costs_access_preamble_payload_and_ack() {
        let c = Channel::default();
        let rate = 24e6;
        let expected =
            (16e-6 + 18e-6) + 7.5 * 9e-6 + 20e-6 + (36.0 + 1500.0) * 8.0 / rate + 16e-6 + 20e-6 + 14.0 * 8.0 / 6e6;
        assert!((c.frame_airtime_s(1500.0, rate) - expected).abs() < 1e-12);
        // 802.11a at 54 Mbit/s moves ~30 Mbit/s of UDP payload at best.
        let eff = c.effective_rate_bps(54e6);
        assert!(eff > 25e6 && eff < 35e6, "{eff}");
        assert!(c.effective_rate_bps(24e6) < 24e6);
    }

    #[test]
    fn a_measured_goodput_gives_back_the_phy_rate_that_carries_it() {
        let c = Channel { frame_loss: 0.05, ..Channel::default() };
        for rate in [1e6, 6e6, 24e6, 54e6] {
            let goodput = c.effective_rate_bps(rate);
            let back = c.rate_for_goodput_bps(goodput, 1e9).expect("a rate");
            assert!((back / rate - 1.0).abs() < 1e-6, "{rate}: {back}");
        }
        // More than the MAC can carry at the highest rate: that rate.
        assert_eq!(c.rate_for_goodput_bps(1e9, 54e6), Some(54e6));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(c.rate_for_goodput_bps(bad, 54e6), None, "{bad}");
        }
    }

    #[test]
    fn loss_raises_airtime() {
        let mut last = 0.0;
        for loss in [0.0, 0.01, 0.05, 0.1, 0.3] {
            let c = Channel { frame_loss: loss, ..Channel::default() };
            let a = c.message_airtime_s(2304.0, 24e6);
            assert!(a > last, "loss {loss}: {a} <= {last}");
            last = a;
        }
        let clean = Channel::default().effective_rate_bps(24e6);
        assert!(Channel { frame_loss: 0.05, ..Channel::default() }.effective_rate_bps(24e6) < clean);
    }

    #[test]
    fn doubling_hops_doubles_activation_airtime() {
        let c = Channel::default();
        let t = Traffic::default();
        let one = predict(1, None, &c, &t);
        let three = predict(3, None, &c, &t);
        assert_eq!((one.hops, three.hops), (2, 4));
        assert!((three.activation_airtime_s - 2.0 * one.activation_airtime_s).abs() < 1e-15);
        assert!((three.hop_latency_s - 2.0 * one.hop_latency_s).abs() < 1e-15);
    }

    #[test]
    fn halving_bytes_per_element_halves_airtime() {
        let c = Channel { frame_loss: 0.05, ..Channel::default() };
        let raw = predict(4, None, &c, &Traffic { bytes_per_element: 4.0, ..whole_frames() });
        let half = predict(4, None, &c, &Traffic { bytes_per_element: 2.0, ..whole_frames() });
        // (up to the chance that a frame is lost after all its retries: 0.05^8 per frame)
        assert!((half.activation_airtime_s * 2.0 - raw.activation_airtime_s).abs() < 1e-9 * raw.activation_airtime_s);
        assert!(half.tokens_per_s > raw.tokens_per_s);
    }

    #[test]
    fn snapshots_add_their_bytes_spread_over_their_period() {
        let c = Channel::default();
        let t = Traffic { message_overhead_bytes: 0.0, ..Traffic::default() };
        let layout = uniform(4);
        let plan = |period| ProtectionPlan {
            per_uav: layout.entries().iter().map(|&(u, _)| (u, Protection { k: 2, period: Some(period) })).collect(),
            ..ProtectionPlan::none(&layout)
        };
        let (p4, p8) = (plan(4), plan(8));
        let a = predict(4, Some(&p4), &c, &t);
        let b = predict(4, Some(&p8), &c, &t);
        let none = predict(4, None, &c, &t);
        assert_eq!(none.snapshot_airtime_s, 0.0);
        // Every tail layer's 1536 B per token (raw f32): the same bytes per token at any T, fewer
        // frame headers at the longer period.
        let tails: u32 = layout.entries().iter().map(|(_, iv)| iv.len() - 2).sum();
        let per_token = f64::from(tails) * 1536.0 * 8.0 / c.effective_rate_bps(24e6);
        assert!((a.snapshot_airtime_s / per_token - 1.0).abs() < 0.02, "{} vs {per_token}", a.snapshot_airtime_s);
        assert!(b.snapshot_airtime_s <= a.snapshot_airtime_s);
        // The first stage's head replica needs the gateway's copy of its input: one hop more.
        assert_eq!(a.hops, none.hops + 1);
        assert!(a.tokens_per_s < none.tokens_per_s);
    }

    #[test]
    fn paced_snapshots_cost_contention_until_they_fill_the_channel() {
        let c = Channel::default();
        let t = Traffic { gateway_s: 4e-3, ..Traffic::default() };
        let layout = uniform(4);
        let plan = |period| ProtectionPlan {
            per_uav: layout.entries().iter().map(|&(u, _)| (u, Protection { k: 2, period: Some(period) })).collect(),
            ..ProtectionPlan::none(&layout)
        };
        let light = predict(4, Some(&plan(16)), &c, &t);
        // Off the token's path: a wait behind at most half a burst per hop, no more.
        assert!(light.contention_s > 0.0);
        let burst = c.message_airtime_s(t.bulk_burst_bytes, 24e6);
        assert!(light.contention_s < f64::from(light.hops) * burst / 2.0, "{light:?}");
        let path = light.compute_s + light.activation_airtime_s / (1.0 - light.heartbeat_share) + light.hop_latency_s;
        assert!((light.critical_path_s - path - light.contention_s).abs() < 1e-12);
        assert!(light.token_s < path + light.snapshot_airtime_s);
        // The same snapshots on a slow channel fill it: the channel sets the pace.
        let slow = SwarmState {
            uavs: swarm(4).uavs.into_iter().map(|u| UavState { link_bps: 2e6, ..u }).collect(),
            ..swarm(4)
        };
        let p = predict_tokens_per_s(&slow, &model(), &layout, &layout.ring(), &plan(16), &c, &t).expect("prediction");
        assert!(p.channel_s > p.critical_path_s, "{p:?}");
        assert_eq!(p.token_s, p.channel_s);
        assert!((p.channel_share - 1.0).abs() < 1e-9, "{}", p.channel_share);
    }

    #[test]
    fn tokens_per_s_adds_compute_airtime_and_latency() {
        let c = Channel::default();
        let t = Traffic { gateway_s: 4e-3, ..Traffic::default() };
        let p = predict(4, None, &c, &t);
        let airtime = p.activation_airtime_s / (1.0 - p.heartbeat_share);
        assert!((p.compute_s - (30.0 * 2e-3 + 4e-3)).abs() < 1e-12);
        assert!((p.token_s - (p.compute_s + airtime + p.hop_latency_s)).abs() < 1e-12);
        assert!((p.tokens_per_s * p.token_s - 1.0).abs() < 1e-12);
        assert!(p.heartbeat_share > 0.0 && p.channel_share < 1.0);
        // Heartbeats that fill the channel are refused.
        let flood = Traffic { heartbeat_period_s: 1e-5, ..t };
        let layout = uniform(4);
        let r = predict_tokens_per_s(
            &swarm(4),
            &model(),
            &layout,
            &layout.ring(),
            &ProtectionPlan::none(&layout),
            &c,
            &flood,
        );
        assert!(matches!(r, Err(PlanError::InvalidConfig(_))), "{r:?}");
    }

    #[test]
    fn a_wrapping_stage_costs_one_hop_more() {
        let s = swarm(3);
        let layout = Layout::new(
            30,
            vec![(0, LayerInterval::new(5, 15)), (1, LayerInterval::new(15, 25)), (2, LayerInterval::new(25, 35))],
        )
        .expect("layout");
        let p = predict_tokens_per_s(
            &s,
            &model(),
            &layout,
            &layout.ring(),
            &ProtectionPlan::none(&layout),
            &Channel::default(),
            &Traffic::default(),
        )
        .expect("prediction");
        assert_eq!(p.hops, 5);
    }

    #[test]
    fn the_planners_use_the_effective_rate_when_a_channel_is_set() {
        let m = model();
        let layout = uniform(4);
        let nominal = swarm(4);
        let radio = SwarmState {
            config: PlanConfig {
                channel: Some(Channel { frame_loss: 0.05, ..Channel::default() }),
                ..PlanConfig::default()
            },
            ..nominal.clone()
        };
        let e_nominal = effective(&nominal.uavs[0], &m, &nominal.config);
        let e_radio = effective(&radio.uavs[0], &m, &radio.config);
        assert!(e_radio.tx_layer_token_j > e_nominal.tx_layer_token_j);
        let ratio = e_radio.tx_layer_token_j / e_nominal.tx_layer_token_j;
        assert!((ratio - 24e6 / radio.config.channel.as_ref().expect("set").effective_rate_bps(24e6)).abs() < 1e-9);
        // P1 plans under it and its figures agree with the cost model.
        let plan = plan_protection(&radio, &m, &layout, &layout.ring()).expect("P1");
        let cost = crate::evaluate(&radio, &m, &layout, &layout.ring(), &plan, m.total_tokens).expect("cost");
        assert!((cost.expected_remaining_tokens - plan.min_expected_tokens).abs() <= 1e-9 * plan.min_expected_tokens);
        let bad = SwarmState {
            config: PlanConfig {
                channel: Some(Channel { frame_loss: 1.0, ..Channel::default() }),
                ..PlanConfig::default()
            },
            ..nominal
        };
        assert!(bad.validate().is_err());
    }
}
