//! Measured link rates for the planner's cost model, without ROS.
//!
//! Executors measure the goodput of the bulk data they receive (prompt chunks and replays:
//! messages of at least [`Goodput::MIN_BYTES`]) as payload bits over the time the link was busy
//! with each (see [`Goodput`]). KV rows make no sample: their senders pace them below the
//! channel's rate (docs/radio.md, "Queues and priorities"), so they would measure the pacing, and report the median of the latest samples in their
//! heartbeats (`Heartbeat.link_goodput_bps`, 0 until measured). Sender stamps and receipt are
//! compared on one clock: on separate drones that needs synchronised clocks (GNSS or PTP). On one 802.11 channel the rate between two
//! hosts is the same both ways, so a UAV's figure stands for its link. The scheduler turns it into
//! the PHY rate the cost model takes ([`aerokv_plan::Channel::rate_for_goodput_bps`]) and keeps a
//! planning rate per UAV that moves only on a real change ([`LinkRates`]), so that noise does not
//! re-plan the idle swarm. Until a UAV has measured, its configured rate stands.
//!
//! A goodput sample is a lower bound of what the link carries (a short prompt gives one prompt
//! chunk per hop, whose busy time includes every delay on the way). Where the executor knows its
//! radio's own PHY rate (`Heartbeat.link_phy_bps`, from `iw station dump`: [`crate::stations`]),
//! that rate is planned with instead, as it is: the airtime model adds the per-frame costs
//! itself ([`planning_rate`]).
use aerokv_codec::{ActivationCodec, KvCodec};
use aerokv_plan::{Channel, Traffic};
use std::collections::{BTreeMap, VecDeque};

/// Goodput of a UAV's incoming bulk data: the median of the last [`Goodput::WINDOW`] samples.
///
/// A sample is a bulk message's payload bits over the time the link was busy with it: from when
/// it could start (its sender's stamp plus the link's base latency, or when the previous message
/// from the same sender had arrived, if later: it waited behind that one) to its receipt. The base
/// latency is the median transit of the small messages (decode steps) received: what a message
/// costs beyond its bytes. Without the two corrections a burst of KV snapshot messages measures
/// its own queue, and a message its fixed latency. A message that did not wait and was busy for
/// less than the base latency makes no sample: the latency's noise would be the figure.
#[derive(Debug, Clone, Default)]
pub struct Goodput {
    samples: VecDeque<f64>,
    small: VecDeque<f64>,
    /// Per sender, when its last message arrived (seconds, the receiver's clock).
    last: BTreeMap<String, f64>,
}

impl Goodput {
    /// Smaller messages measure latency, not rate.
    pub const MIN_BYTES: usize = 16 * 1024;
    pub const WINDOW: usize = 9;

    /// Takes one message of `bytes` from `source`, stamped at `sent_s` by its sender and received
    /// at `received_s` (seconds, one clock); returns the sample (bit/s) if it makes one: a bulk
    /// message with a positive busy time.
    pub fn observe(&mut self, source: &str, bytes: usize, sent_s: f64, received_s: f64) -> Option<f64> {
        if !(sent_s.is_finite() && received_s.is_finite()) {
            return None;
        }
        let previous = self.last.insert(source.to_string(), received_s);
        let transit = received_s - sent_s;
        if bytes < Self::MIN_BYTES {
            if transit >= 0.0 {
                push(&mut self.small, transit);
            }
            return None;
        }
        let base = median(&self.small);
        let queued = previous.is_some_and(|p| p > sent_s + base);
        let start = if queued { previous.unwrap_or(sent_s) } else { sent_s + base };
        let busy = received_s - start;
        // Not queued, and no longer than its latency: the latency's own noise, not a rate.
        if busy <= 0.0 || (!queued && busy < base) {
            return None;
        }
        let bps = bytes as f64 * 8.0 / busy;
        push(&mut self.samples, bps);
        Some(bps)
    }

    /// Takes a message that its sender paced below the link's rate (KV rows): its arrival is what
    /// a later message from `source` may have queued behind, but its own timing measures the
    /// pacing, not the link.
    pub fn observe_paced(&mut self, source: &str, received_s: f64) {
        if received_s.is_finite() {
            self.last.insert(source.to_string(), received_s);
        }
    }

    /// The median sample, bit/s; 0 before any (what the heartbeat carries for "not measured").
    pub fn bps(&self) -> f64 {
        self.samples.iter().copied().fold(0.0, f64::max)
    }
}

fn push(window: &mut VecDeque<f64>, v: f64) {
    if window.len() == Goodput::WINDOW {
        window.pop_front();
    }
    window.push_back(v);
}

/// The median (the upper one of an even count); 0 when empty.
fn median(v: &VecDeque<f64>) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// The largest goodput a heartbeat may report, bit/s (shared memory on one host measures a few
/// Gbit/s; more is not a measurement).
pub const MAX_GOODPUT_BPS: f64 = 1e11;

/// Where a UAV's planning rate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkSource {
    /// The radio's own PHY rate toward the UAV's next hop (`Heartbeat.link_phy_bps`, `iw station
    /// dump`'s "tx bitrate"): what the airtime model takes as it is.
    Phy,
    /// The PHY rate its measured goodput implies (a lower bound: one bulk message's goodput).
    Goodput,
}

/// The PHY rate to plan with from one heartbeat: its radio's own rate when it knows one (a
/// positive `phy_bps`), else the rate whose effective rate over `channel` is its measured
/// goodput, capped at `max_rate_bps` (a goodput is no PHY rate: the MAC's per-frame costs lie
/// between them); `None` when it has neither.
pub fn planning_rate(
    phy_bps: f64,
    goodput_bps: f64,
    channel: &Channel,
    max_rate_bps: f64,
) -> Option<(f64, LinkSource)> {
    if phy_bps.is_finite() && phy_bps > 0.0 {
        return Some((phy_bps, LinkSource::Phy));
    }
    channel.rate_for_goodput_bps(goodput_bps, max_rate_bps).map(|r| (r, LinkSource::Goodput))
}

/// Per UAV, the link rate the planner uses: the configured rate until the UAV reports one, then
/// [`planning_rate`]'s (the radio's PHY rate, else the PHY rate its measured goodput implies).
/// A new figure replaces the planning rate only when it differs by more than `hysteresis`
/// (a fraction) from it, or comes from a better source (a PHY rate over a goodput).
#[derive(Debug, Clone)]
pub struct LinkRates {
    pub configured_bps: f64,
    pub max_rate_bps: f64,
    pub hysteresis: f64,
    channel: Channel,
    rates: BTreeMap<String, (f64, LinkSource)>,
}

impl LinkRates {
    pub fn new(configured_bps: f64, channel: Channel) -> Self {
        // 802.11n's fastest 20 MHz rate; a measured goodput never plans above it.
        LinkRates { configured_bps, max_rate_bps: 72.2e6, hysteresis: 0.25, channel, rates: BTreeMap::new() }
    }

    /// Takes a UAV's reported PHY rate and goodput (0: unknown, not measured yet; ignored like
    /// any non-positive figure).
    pub fn observe(&mut self, uav: &str, phy_bps: f64, goodput_bps: f64) {
        let Some((rate, source)) = planning_rate(phy_bps, goodput_bps, &self.channel, self.max_rate_bps) else {
            return;
        };
        match self.rates.get_mut(uav) {
            Some((r, s)) if *s == source && (rate / *r - 1.0).abs() <= self.hysteresis => {}
            // A goodput does not move a rate the radio itself reported: it is a lower bound.
            Some((_, LinkSource::Phy)) if source == LinkSource::Goodput => {}
            Some(r) => *r = (rate, source),
            None => {
                self.rates.insert(uav.to_string(), (rate, source));
            }
        }
    }

    /// The measured rate to plan with for `uav`; `None` until it has reported one (the
    /// configured rate, [`Self::configured_bps`], stands).
    pub fn measured(&self, uav: &str) -> Option<f64> {
        self.rates.get(uav).map(|r| r.0)
    }

    /// Where `uav`'s planning rate comes from (`None`: the configured rate).
    pub fn source(&self, uav: &str) -> Option<LinkSource> {
        self.rates.get(uav).map(|r| r.1)
    }
}

/// Per UAV, the mean of a figure sampled over one answer: the executors' compute per layer at
/// every decode step. Their heartbeat carries an exponentially weighted mean (weight 0.1) that
/// follows the latest ~10 steps; a prediction of the whole answer's speed wants the whole
/// answer's compute (one stalled stretch early in an answer moved the prediction by 15 %).
#[derive(Debug, Clone, Default)]
pub struct RunMeans {
    sums: BTreeMap<String, (f64, u32)>,
}

impl RunMeans {
    /// Takes `uav`'s current figure (0 or less, or not finite: none yet, ignored).
    pub fn observe(&mut self, uav: &str, value: f64) {
        if value.is_finite() && value > 0.0 {
            let (sum, n) = self.sums.entry(uav.to_string()).or_insert((0.0, 0));
            *sum += value;
            *n += 1;
        }
    }

    /// The mean of `uav`'s figures so far; `None` before its first.
    pub fn mean(&self, uav: &str) -> Option<f64> {
        self.sums.get(uav).filter(|(_, n)| *n > 0).map(|(sum, n)| sum / f64::from(*n))
    }
}

/// What crosses the channel per token under activation codec `codec` and the executors' KV codec
/// `kv` (bytes per element from the codecs themselves: zstd's is its measured mean ratio), for
/// hidden states of `width` elements, with the gateway's time per token.
pub fn traffic(codec: ActivationCodec, kv: KvCodec, width: usize, gateway_s: f64) -> Traffic {
    Traffic {
        hidden_size: width as f64,
        bytes_per_element: codec.bytes_per_element(width),
        kv_bytes_per_element: kv.bytes_per_element(),
        gateway_s: if gateway_s.is_finite() && gateway_s >= 0.0 { gateway_s } else { 0.0 },
        ..Traffic::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goodput_counts_bulk_messages_less_their_latency_and_queue() {
        let mut g = Goodput::default();
        assert_eq!(g.bps(), 0.0);
        // A decode step: 3 ms of latency whatever its bytes, no sample.
        assert_eq!(g.observe("uav1", 2304, 10.0, 10.003), None);
        // 64 KiB that took 3 ms + 26.2 ms: 20 Mbit/s.
        let took = 65536.0 * 8.0 / 20e6;
        let s = g.observe("uav1", 65536, 11.0, 11.003 + took).expect("a sample");
        assert!((s / 20e6 - 1.0).abs() < 1e-9, "{s}");
        // The next message of a burst, stamped with the first, waited for it: its time starts when
        // the first had arrived.
        let s = g.observe("uav1", 65536, 11.0, 11.003 + 2.0 * took).expect("a sample");
        assert!((s / 20e6 - 1.0).abs() < 1e-9, "{s}");
        assert!((g.bps() / 20e6 - 1.0).abs() < 1e-9);
        // Another sender's message starts on its own; one that came within twice the base
        // latency makes no sample (the latency's noise would be the figure).
        assert!(g.observe("gateway", 65536, 12.0, 12.002).is_none());
        assert!(g.observe("gateway", 65536, 13.0, 13.005).is_none());
        for bad in [f64::NAN, f64::INFINITY] {
            assert_eq!(g.observe("uav1", 65536, bad, 13.0), None);
            assert_eq!(g.observe("uav1", 65536, 13.0, bad), None);
        }
        // Only the latest samples count.
        for i in 0..Goodput::WINDOW {
            g.observe("uav2", 100_000, 20.0 + i as f64, 20.103 + i as f64);
        }
        assert!((g.bps() / 8e6 - 1.0).abs() < 1e-9, "{}", g.bps());
    }

    #[test]
    fn paced_messages_make_no_sample_but_a_queue() {
        let mut g = Goodput::default();
        g.observe("uav3", 2304, 10.0, 10.003);
        // KV rows paced at 4.8 Mbit/s: 240 KB over 0.4 s would read as 4.8 Mbit/s.
        g.observe_paced("uav3", 10.403);
        g.observe_paced("uav3", f64::NAN);
        assert_eq!(g.bps(), 0.0);
        // A prompt chunk stamped before the rows' arrival waited behind them: its busy time starts
        // there (64 KiB in 26.2 ms: 20 Mbit/s), not at its own stamp.
        let took = 65536.0 * 8.0 / 20e6;
        let s = g.observe("uav3", 65536, 10.2, 10.403 + took).expect("a sample");
        assert!((s / 20e6 - 1.0).abs() < 1e-9, "{s}");
    }

    #[test]
    fn link_rates_follow_measurements_with_hysteresis() {
        let channel = Channel::default();
        let mut r = LinkRates::new(20e6, channel.clone());
        assert_eq!(r.measured("uav1"), None);
        r.observe("uav1", 0.0, 0.0);
        assert_eq!(r.measured("uav1"), None, "0 means not measured");
        let at12 = channel.effective_rate_bps(12e6);
        r.observe("uav1", 0.0, at12);
        let rate = r.measured("uav1").expect("measured");
        assert!((rate / 12e6 - 1.0).abs() < 1e-6, "{rate}");
        // A 10 % wobble keeps the planning rate; halving it moves it.
        r.observe("uav1", 0.0, at12 * 1.1);
        assert_eq!(r.measured("uav1"), Some(rate));
        r.observe("uav1", 0.0, channel.effective_rate_bps(6e6));
        assert!((r.measured("uav1").expect("measured") / 6e6 - 1.0).abs() < 1e-6);
        // Shared memory's gigabits plan at the fastest radio rate; other UAVs are not measured.
        r.observe("uav2", 0.0, 5e9);
        assert_eq!(r.measured("uav2"), Some(r.max_rate_bps));
        assert_eq!((r.measured("uav3"), r.configured_bps), (None, 20e6));
    }

    #[test]
    fn the_radios_phy_rate_is_planned_with_as_it_is_and_beats_a_goodput() {
        let channel = Channel::default();
        // A PHY rate is what the airtime model takes: no conversion, no cap.
        assert_eq!(planning_rate(54e6, 9e6, &channel, 72.2e6), Some((54e6, LinkSource::Phy)));
        assert_eq!(planning_rate(144.4e6, 0.0, &channel, 72.2e6), Some((144.4e6, LinkSource::Phy)));
        // No PHY rate: the goodput's PHY rate, which carries that goodput.
        let (r, s) = planning_rate(0.0, channel.effective_rate_bps(12e6), &channel, 72.2e6).expect("a rate");
        assert!((r / 12e6 - 1.0).abs() < 1e-6 && s == LinkSource::Goodput, "{r}");
        for bad in [f64::NAN, -1.0, f64::INFINITY] {
            assert_eq!(planning_rate(bad, 0.0, &channel, 72.2e6), None, "{bad}");
        }
        // Session 14's raw runs: one prompt chunk's goodput (9.3 Mbit/s PHY) where the radio used
        // 54 Mbit/s. The PHY rate replaces the goodput's rate at once, within the hysteresis too ...
        let mut links = LinkRates::new(20e6, channel.clone());
        links.observe("uav1", 0.0, channel.effective_rate_bps(9.3e6));
        assert_eq!(links.source("uav1"), Some(LinkSource::Goodput));
        links.observe("uav1", 10e6, channel.effective_rate_bps(9.3e6));
        assert_eq!((links.measured("uav1"), links.source("uav1")), (Some(10e6), Some(LinkSource::Phy)));
        // ... moves with the hysteresis like any rate, and a later goodput-only heartbeat (the
        // dump went stale) does not pull it down to the lower bound.
        links.observe("uav1", 11e6, 0.0);
        assert_eq!(links.measured("uav1"), Some(10e6));
        links.observe("uav1", 54e6, 0.0);
        assert_eq!(links.measured("uav1"), Some(54e6));
        links.observe("uav1", 0.0, channel.effective_rate_bps(2.6e6));
        assert_eq!((links.measured("uav1"), links.source("uav1")), (Some(54e6), Some(LinkSource::Phy)));
        assert_eq!(links.source("uav2"), None);
    }

    #[test]
    fn run_means_average_every_sample_of_the_answer() {
        let mut m = RunMeans::default();
        assert_eq!(m.mean("uav1"), None);
        for v in [0.0, f64::NAN, -1.0, f64::INFINITY] {
            m.observe("uav1", v);
        }
        assert_eq!(m.mean("uav1"), None, "no figure yet");
        for v in [0.9, 0.6, 0.6] {
            m.observe("uav1", v);
        }
        m.observe("uav2", 1.2);
        assert!((m.mean("uav1").expect("mean") - 0.7).abs() < 1e-12);
        assert_eq!(m.mean("uav2"), Some(1.2));
    }

    #[test]
    fn traffic_carries_the_codecs_bytes() {
        let raw = traffic(ActivationCodec::Raw, KvCodec::Raw, 576, 0.002);
        let f16 = traffic(ActivationCodec::F16, KvCodec::Raw, 576, 0.002);
        let int8 = traffic(ActivationCodec::Int8, KvCodec::Zstd, 576, f64::NAN);
        assert_eq!(raw.kv_bytes_per_element, 4.0);
        assert_eq!(int8.kv_bytes_per_element, KvCodec::Zstd.bytes_per_element());
        assert!(int8.kv_bytes_per_element < 4.0);
        assert_eq!(raw.bytes_per_element, 4.0);
        assert_eq!(f16.bytes_per_element, 2.0);
        assert!((int8.bytes_per_element - (1.0 + 4.0 / 576.0)).abs() < 1e-12);
        assert_eq!(int8.gateway_s, 0.0);
        assert!(raw.activation_bytes() > f16.activation_bytes() && f16.activation_bytes() > int8.activation_bytes());
        assert!(raw.validate().is_ok() && int8.validate().is_ok());
    }
}
