//! The hosts of an emulated radio network: one network namespace per host (the control station,
//! each UAV) and one for the ns-3 emulator, joined only by the emulator. Host i's `eth0` is one
//! end of a veth pair; the other end sits on a bridge with tap i in the emulator's namespace, and
//! the emulator carries frames between the taps over its 802.11 channel.
//!
//! Nothing gets a name or a file: each namespace lives as long as a holder process (a `sleep`
//! that unshared its network namespace and dies with this process) or any process inside it.
//! When the holders, the emulator and the nodes are gone, so are the namespaces, their devices
//! and addresses, also when this process is killed.
use super::scenario::{EmulatedHost, Scenario};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot create the network namespace of {host}: {source}")]
    Create { host: String, source: std::io::Error },
    #[error("{host}: `{command}` failed: {why}")]
    Command { host: String, command: String, why: String },
    #[error("the radio emulator {0} is missing (run `make setup`)")]
    MissingEmulator(PathBuf),
    #[error("the radio emulator did not start: {0}")]
    Emulator(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

type Result<T> = std::result::Result<T, NetError>;

/// A network namespace, alive while its holder process (or anything inside it) runs.
pub struct Netns {
    pub host: String,
    holder: Child,
    ns: File,
}

impl Netns {
    pub fn new(host: &str) -> Result<Netns> {
        let create = |source| NetError::Create { host: host.into(), source };
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: unshare and prctl are async-signal-safe and only change the child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // spawn() returns once the child has exec'd: its namespace exists.
        let mut holder = cmd.spawn().map_err(create)?;
        match File::open(format!("/proc/{}/ns/net", holder.id())) {
            Ok(ns) => Ok(Netns { host: host.into(), holder, ns }),
            Err(e) => {
                let _ = holder.kill();
                let _ = holder.wait();
                Err(create(e))
            }
        }
    }

    /// A command that runs inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.enter_on_exec(&mut cmd);
        cmd
    }

    /// Makes `cmd` enter this namespace before it runs.
    pub fn enter_on_exec(&self, cmd: &mut Command) {
        let fd = self.ns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the descriptor stays open until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Moves the calling thread (and the threads it starts from now on) into this namespace.
    pub fn enter_this_thread(&self) -> Result<()> {
        // SAFETY: setns on a namespace descriptor we own.
        if unsafe { libc::setns(self.ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetError::Io(format!("entering {}'s network", self.host), std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The holder's pid: `ip link ... netns PID` moves a device here.
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// Runs `ip -batch -` with these commands inside the namespace.
    fn ip(&self, commands: &[String]) -> Result<()> {
        self.run("ip", &["-batch", "-"], Some(&commands.join("\n")))
    }

    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
        let failed = |why: String| NetError::Command {
            host: self.host.clone(),
            command: format!("{program} {}", args.join(" ")),
            why,
        };
        let mut child = self
            .command(program)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(e.to_string()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).map_err(|e| failed(e.to_string()))?;
        }
        let out = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Host i's address on the radio (control station first).
pub fn host_address(index: usize) -> String {
    format!("10.77.0.{}", index + 1)
}

/// The MAC ns-3 gives the radio of node i (allocated in creation order from 00:..:01).
fn radio_mac(index: usize) -> String {
    let n = index as u64 + 1;
    (0..6).rev().map(|b| format!("{:02x}", (n >> (8 * b)) & 0xff)).collect::<Vec<_>>().join(":")
}

/// Where the emulator writes each host's `iw station dump` text (`<host>.txt`, refreshed every
/// second): the run's `stations` directory.
pub fn station_dump_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("stations")
}

/// `control=00:00:00:00:00:01, uav1=00:00:00:00:00:02, ...`: the radio of each of `hosts` (in ns-3
/// node order), the executors' `station_macs`.
pub fn station_macs(hosts: &[String]) -> String {
    hosts.iter().enumerate().map(|(i, h)| format!("{h}={}", radio_mac(i))).collect::<Vec<_>>().join(", ")
}

/// The emulator's nice value (-20 highest .. 19 lowest; processes start at 0).
const EMULATOR_NICE: i32 = -10;

/// What the emulator cost and saw, at its end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EmulatorReport {
    /// CPU time of the emulator process (user + system), seconds.
    pub cpu_s: f64,
    pub wall_s: f64,
    /// Its last statistics line: real-time lag and frame counters.
    pub stats: std::collections::BTreeMap<String, f64>,
}

/// The running network: every host's namespace and the emulator that joins them.
pub struct RadioNet {
    /// In ns-3 node order: the control station, then the UAVs.
    pub hosts: Vec<Netns>,
    emulator: Option<Child>,
    clock: Option<ChildStdin>,
    log: PathBuf,
    started: Instant,
    // Dropped last: the emulator's namespace, after the emulator.
    _sim: Netns,
}

impl RadioNet {
    /// Builds the namespaces and devices and starts the emulator (`exe`) on `scenario` for
    /// `hosts`; the emulator's input and log go to `work_dir`.
    pub fn up(scenario: &Scenario, hosts: &[String], exe: &Path, work_dir: &Path) -> Result<RadioNet> {
        if !exe.is_file() {
            return Err(NetError::MissingEmulator(exe.into()));
        }
        let sim = Netns::new("radio emulator")?;
        const NO_IPV6: [&str; 3] = ["-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"];
        // No IPv6 chatter (router solicitations) on the air.
        sim.run("sysctl", &NO_IPV6, None)?;
        let mut sim_ip = vec!["link set lo up".to_string()];
        let mut nets = Vec::with_capacity(hosts.len());
        let mut emulated = Vec::with_capacity(hosts.len());
        for (i, name) in hosts.iter().enumerate() {
            let ns = Netns::new(name)?;
            ns.run("sysctl", &NO_IPV6, None)?;
            let (tap, br, vb, mac) = (format!("tap{i}"), format!("br{i}"), format!("vb{i}"), radio_mac(i));
            sim_ip.extend([
                format!("tuntap add dev {tap} mode tap"),
                format!("link add {br} type bridge stp_state 0 forward_delay 0 mcast_snooping 0"),
                format!("link add {vb} type veth peer name eth0 netns {}", ns.pid()),
                format!("link set {tap} master {br}"),
                format!("link set {vb} master {br}"),
                format!("link set {tap} up"),
                format!("link set {vb} up"),
                format!("link set {br} up"),
            ]);
            emulated.push(EmulatedHost { name: name.clone(), tap, mac });
            nets.push(ns);
        }
        sim.ip(&sim_ip)?;
        for (i, ns) in nets.iter().enumerate() {
            ns.ip(&[
                "link set lo up".into(),
                // ns-3.37 acknowledges unicast frames only for its own MAC (see the emulator).
                format!("link set eth0 address {}", emulated[i].mac),
                format!("addr add {}/24 dev eth0", host_address(i)),
                "link set eth0 up".into(),
                // DDS discovery is multicast.
                "route add 224.0.0.0/4 dev eth0".into(),
            ])?;
        }
        let input = work_dir.join("radio-input.txt");
        let log = work_dir.join("radio-emulator.log");
        let io = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |e| NetError::Io(what, e)
        };
        let stations = station_dump_dir(work_dir);
        std::fs::create_dir_all(&stations).map_err(io("creating", &stations))?;
        let text = format!("{}station_dump_dir {}\n", scenario.emulator_input(&emulated), stations.display());
        std::fs::write(&input, text).map_err(io("writing", &input))?;
        let out = File::create(&log).map_err(io("creating", &log))?;
        let err = out.try_clone().map_err(io("opening", &log))?;
        let mut cmd = sim.command(exe);
        cmd.arg(format!("--input={}", input.display())).stdin(Stdio::piped()).stdout(out).stderr(err);
        // SAFETY: prctl and setpriority only change the child: it dies with this process, and
        // it runs before the swarm's processes when the machine is short of CPU (the emulated
        // radio is hardware: it does not share the drones' cores, and a late emulator delays
        // every frame). Without the privilege to raise it, it runs at the default priority.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setpriority(libc::PRIO_PROCESS, 0, EMULATOR_NICE);
                Ok(())
            });
        }
        let mut emulator = cmd.spawn().map_err(io("starting", exe))?;
        let clock = emulator.stdin.take();
        let mut net =
            RadioNet { hosts: nets, emulator: Some(emulator), clock, log, started: Instant::now(), _sim: sim };
        net.wait_running()?;
        Ok(net)
    }

    fn wait_running(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.lines().any(|l| l.starts_with("running ")) {
                return Ok(());
            }
            let exited = self.emulator.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                let why = exited.map_or("not running after 20 s".to_string(), |s| format!("it exited ({s})"));
                let log = self.log.display();
                let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                return Err(NetError::Emulator(format!("{why}; {log}:\n{tail}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn host(&self, name: &str) -> Option<&Netns> {
        self.hosts.iter().find(|h| h.host == name)
    }

    /// Starts the scenario's mission clock (the hosts begin to follow their waypoints).
    pub fn start_mission_clock(&mut self) -> Result<()> {
        let clock = self.clock.as_mut().ok_or_else(|| NetError::Emulator("its control pipe is closed".into()))?;
        clock.write_all(b"go\n").and_then(|()| clock.flush()).map_err(|e| NetError::Io("mission clock".into(), e))
    }

    /// CPU seconds the emulator has used so far.
    pub fn emulator_cpu_s(&self) -> f64 {
        self.emulator.as_ref().map_or(0.0, |c| process_cpu_s(c.id()))
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Stops the emulator (end of its input, then SIGTERM, then SIGKILL) and reports what it
    /// cost; the namespaces go when `self` is dropped.
    pub fn stop_emulator(&mut self) -> Option<EmulatorReport> {
        let mut child = self.emulator.take()?;
        let cpu_s = process_cpu_s(child.id());
        let wall_s = self.uptime_s();
        drop(self.clock.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut signalled = false;
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            if !signalled && Instant::now() + Duration::from_secs(1) > deadline {
                // SAFETY: kill(2) on our own, not yet reaped child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                signalled = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
        Some(EmulatorReport { cpu_s, wall_s, stats: self.latest_stats() })
    }

    /// Seconds since the emulator started.
    pub fn uptime_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The emulator's latest statistics line (it writes one a second, and one at its end).
    pub fn latest_stats(&self) -> std::collections::BTreeMap<String, f64> {
        let mut text = String::new();
        let _ = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
        text.lines()
            .rev()
            .find(|l| l.starts_with("final ") || l.starts_with("stats "))
            .map(parse_stats)
            .unwrap_or_default()
    }
}

impl Drop for RadioNet {
    fn drop(&mut self) {
        self.stop_emulator();
    }
}

/// `stats t=3 lag_ms=0.2 frames_in=44` -> {t: 3, lag_ms: 0.2, frames_in: 44}.
fn parse_stats(line: &str) -> std::collections::BTreeMap<String, f64> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// User + system CPU seconds of a process (0 when /proc cannot tell).
pub fn process_cpu_s(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radio_macs_follow_ns3_allocation_order() {
        assert_eq!(radio_mac(0), "00:00:00:00:00:01");
        assert_eq!(radio_mac(255), "00:00:00:00:01:00");
        assert_eq!(host_address(2), "10.77.0.3");
        let hosts = ["control".to_string(), "uav1".to_string()];
        assert_eq!(station_macs(&hosts), "control=00:00:00:00:00:01, uav1=00:00:00:00:00:02");
        let map = crate::stations::parse_mac_map(&station_macs(&hosts)).expect("the executors read it");
        assert_eq!(map["uav1"].to_string(), "00:00:00:00:00:02");
        assert_eq!(station_dump_dir(Path::new("/run/x")), PathBuf::from("/run/x/stations"));
    }

    #[test]
    fn stats_lines_parse() {
        let s = parse_stats("final t=3.5 lag_ms=0.2 max_lag_ms=37 frames_in=44 note");
        assert_eq!((s["t"], s["max_lag_ms"], s["frames_in"]), (3.5, 37.0, 44.0));
        assert!(!s.contains_key("note"));
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(60) {
            std::hint::black_box(started.elapsed());
        }
        let cpu = process_cpu_s(std::process::id());
        assert!(cpu > 0.0, "{cpu}");
        assert_eq!(process_cpu_s(u32::MAX), 0.0);
    }
}
