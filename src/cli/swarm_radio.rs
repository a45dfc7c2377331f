//! `aerokv swarm --radio SCENARIO`: the swarm's hosts on an emulated 802.11 ad-hoc network. The
//! control station (scheduler, watchdog and this command) and every UAV get a network namespace
//! of their own, joined only by the ns-3 emulator (`crate::radio`); DDS runs over UDP with the
//! radio profile (`config/fastdds_radio.xml`) instead of shared memory.
use crate::launch::NodeProcess;
use crate::radio::netns::RadioNet;
use crate::radio::scenario::{uav_number, Scenario, CONTROL_HOST};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Radio {
    pub scenario_path: PathBuf,
    pub scenario: Scenario,
    pub net: RadioNet,
    /// When the mission clock started (the request was sent) and the emulator's CPU then.
    clock: Option<(Instant, f64)>,
    /// The emulator's CPU seconds and the wall seconds of the answer.
    answer: Option<(f64, f64)>,
}

/// The emulator, built by `make setup`.
fn emulator_exe(share: &Path) -> PathBuf {
    std::env::var_os("AEROKV_RADIO_EMULATOR")
        .map(PathBuf::from)
        .unwrap_or_else(|| share.join("build/radio/bin/aerokv_radio"))
}

impl Radio {
    /// Loads the scenario, builds the hosts' namespaces, starts the emulator and points this
    /// process's (and its children's) DDS at the radio profile.
    pub fn up(path: &Path, uavs: usize, share: &Path, work_dir: &Path) -> anyhow::Result<Radio> {
        let scenario = Scenario::load(path)?;
        let hosts = scenario.swarm_hosts(uavs).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let profile = share.join("config/fastdds_radio.xml");
        anyhow::ensure!(profile.is_file(), "the radio's Fast DDS profile {} is missing", profile.display());
        // Set before any thread exists: the nodes inherit them, and this process's DDS uses them.
        std::env::set_var("FASTDDS_BUILTIN_TRANSPORTS", "UDPv4");
        std::env::set_var("FASTRTPS_DEFAULT_PROFILES_FILE", &profile);
        std::env::set_var("FASTDDS_DEFAULT_PROFILES_FILE", &profile);
        std::env::set_var("RMW_FASTRTPS_USE_QOS_FROM_XML", "1");
        let net = RadioNet::up(&scenario, &hosts, &emulator_exe(share), work_dir)
            .context("setting up the emulated radio network")?;
        eprintln!(
            "[radio] {}: {} hosts ({}) on {:?} {:?}, emulator log {}",
            path.display(),
            hosts.len(),
            hosts.join(", "),
            scenario.standard,
            scenario.rate_control,
            net.log_path().display()
        );
        Ok(Radio { scenario_path: path.into(), scenario, net, clock: None, answer: None })
    }

    /// The host a node runs on: a UAV's nodes on the UAV, the swarm's on the control station.
    pub fn host_of(&self, node: &NodeProcess) -> anyhow::Result<&crate::radio::netns::Netns> {
        let ns = node.namespace.trim_matches('/');
        let host = if uav_number(ns).is_some() { ns } else { CONTROL_HOST };
        self.net.host(host).with_context(|| format!("no radio host for {}", node.fqn()))
    }

    /// Runs the rest of this thread (the command's DDS participant) on the control station.
    pub fn enter_control_station(&self) -> anyhow::Result<()> {
        let host = self.net.host(CONTROL_HOST).context("the scenario has no control station")?;
        Ok(host.enter_this_thread()?)
    }

    /// The request goes out: the scenario's mission clock starts.
    pub fn request_sent(&mut self) -> anyhow::Result<()> {
        self.net.start_mission_clock()?;
        self.clock = Some((Instant::now(), self.net.emulator_cpu_s()));
        Ok(())
    }

    /// Seconds on the mission clock (0 before the request).
    pub fn mission_time_s(&self) -> f64 {
        self.clock.map_or(0.0, |(t, _)| t.elapsed().as_secs_f64())
    }

    pub fn answer_done(&mut self) {
        if let Some((t, cpu)) = self.clock {
            self.answer = Some((self.net.emulator_cpu_s() - cpu, t.elapsed().as_secs_f64()));
        }
    }

    /// What the emulator has cost so far, and what it saw.
    pub fn report(&self) -> serde_json::Value {
        let cpu_s = self.net.emulator_cpu_s();
        let wall_s = self.net.uptime_s();
        let (answer_cpu_s, answer_wall_s) = self.answer.unwrap_or((f64::NAN, f64::NAN));
        serde_json::json!({
            "scenario": self.scenario_path,
            "emulator": {
                "cpu_s": cpu_s,
                "wall_s": wall_s,
                "cpu_share": cpu_s / wall_s.max(1e-9),
                "answer_cpu_s": answer_cpu_s,
                "answer_wall_s": answer_wall_s,
                "answer_cpu_share": answer_cpu_s / answer_wall_s,
                "stats": self.net.latest_stats(),
            },
        })
    }
}
