//! Predicted decoding tokens/s of a 4-UAV swarm over one shared 802.11 channel, by codec (bytes
//! per element) and frame loss: `cargo run --release -p aerokv-plan --example radio_budget [-- LINK_BPS LAYER_MS GATEWAY_MS]`.
//! Defaults: a 20 Mbit/s PHY rate, 0.4 ms per layer, 2 ms at the gateway (roughly this machine's
//! SmolLM2-135M q4); a benchmark with measured figures passes its own.
use aerokv_plan::{
    plan_initial_layout, plan_protection, predict_tokens_per_s, Channel, ModelSpec, PlanConfig, SwarmState, Traffic,
    UavState,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = |i: usize, default: f64| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (link_bps, layer_s, gateway_s) = (arg(1, 20e6), arg(2, 0.4) * 1e-3, arg(3, 2.0) * 1e-3);
    let uav = |id| UavState {
        id,
        energy_j: 2.7e6,
        capacity_j: 2.7e6,
        memory_bytes: 2e9,
        link_bps,
        flight_power_w: 80.0,
        compute_power_w: 35.0,
        layer_latency_s: layer_s,
        latency_measured: true,
        tx_power_w: 2.5,
    };
    let model = ModelSpec {
        num_layers: 30,
        weight_bytes_per_layer: 3.0e6,
        kv_bytes_per_token_layer: 1536.0,
        total_tokens: 512,
        tokens_done: 0,
    };
    println!("link {:.0} Mbit/s, {:.2} ms/layer, gateway {:.1} ms", link_bps / 1e6, layer_s * 1e3, gateway_s * 1e3);
    println!("codec B/elem  loss   effective Mbit/s  tokens/s  act. airtime ms  snap. airtime ms  channel use");
    // Activation bytes per element of aerokv-codec's codecs (int8: one f32 scale per 576); KV rows raw.
    for (codec, bytes) in [("f32", 4.0), ("f16", 2.0), ("int8", 1.0 + 4.0 / 576.0)] {
        for loss in [0.0, 0.01, 0.05, 0.2] {
            let channel = Channel { frame_loss: loss, ..Channel::default() };
            let config = PlanConfig { deadline_s: 0.25, channel: Some(channel.clone()), ..PlanConfig::default() };
            let swarm = SwarmState { uavs: (1..=4).map(uav).collect(), config };
            let layout = plan_initial_layout(&swarm, &model)?;
            let ring = layout.ring();
            let plan = plan_protection(&swarm, &model, &layout, &ring)?;
            let traffic = Traffic { bytes_per_element: bytes, gateway_s, ..Traffic::default() };
            let p = predict_tokens_per_s(&swarm, &model, &layout, &ring, &plan, &channel, &traffic)?;
            println!(
                "{codec:5} {bytes:6.2}  {:4.0}%  {:16.1}  {:8.1}  {:15.2}  {:16.2}  {:10.0}%",
                loss * 100.0,
                channel.effective_rate_bps(link_bps) / 1e6,
                p.tokens_per_s,
                p.activation_airtime_s * 1e3,
                p.snapshot_airtime_s * 1e3,
                p.channel_share * 100.0
            );
        }
    }
    Ok(())
}
