//! Starts the processes of a launch description on this machine and stops them by their ids
//! (SIGTERM, then SIGKILL after a grace period). Used by `aerokv launch` and `aerokv swarm`.
use crate::launch::NodeProcess;
use crate::radio::netns::Netns;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("executable `{0}` not found (run `make build`)")]
    MissingExecutable(PathBuf),
    #[error("cannot start {exe}: {source}")]
    Spawn { exe: PathBuf, source: std::io::Error },
}

/// How a stopped process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Exited(i32),
    /// Ended by a signal it did not handle (e.g. SIGSEGV, SIGABRT).
    Signal(i32),
    /// Still running after the grace period: SIGKILLed.
    KilledAfter(Duration),
}

impl Stopped {
    pub fn is_clean(self) -> bool {
        self == Stopped::Exited(0)
    }
}

impl From<std::process::ExitStatus> for Stopped {
    fn from(s: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(code), _) => Stopped::Exited(code),
            (None, Some(sig)) => Stopped::Signal(sig),
            (None, None) => Stopped::Exited(-1),
        }
    }
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Exited(code) => write!(f, "exit code {code}"),
            Stopped::Signal(sig) => {
                // SAFETY: strsignal returns a valid C string for any signal number.
                let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(*sig)) };
                write!(f, "killed by signal {sig} ({})", name.to_string_lossy())
            }
            Stopped::KilledAfter(grace) => {
                write!(f, "still running {:.0} s after SIGTERM, SIGKILLed", grace.as_secs_f64())
            }
        }
    }
}

/// The child started by `cmd` gets `signal` when the thread that starts it ends.
pub fn signal_when_parent_dies(cmd: &mut Command, signal: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; it only marks the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub struct Running {
    pub node: NodeProcess,
    pub child: Child,
}

/// The processes of one swarm on this machine.
pub struct Supervisor {
    pub bin_dir: PathBuf,
    pub log_dir: Option<PathBuf>,
    pub running: Vec<Running>,
}

impl Supervisor {
    pub fn new(bin_dir: impl Into<PathBuf>, log_dir: Option<PathBuf>) -> Self {
        Supervisor { bin_dir: bin_dir.into(), log_dir, running: Vec::new() }
    }

    /// Starts one node; its output goes to `<log_dir>/<ns>_<name>.log` (or is inherited).
    pub fn start(&mut self, node: &NodeProcess) -> Result<u32, SupervisorError> {
        self.start_in(node, None)
    }

    /// Starts one node inside a network namespace (a host of an emulated radio network), or in
    /// this process's own with `None`.
    pub fn start_in(&mut self, node: &NodeProcess, netns: Option<&Netns>) -> Result<u32, SupervisorError> {
        let exe = self.bin_dir.join(&node.executable);
        if !exe.is_file() {
            return Err(SupervisorError::MissingExecutable(exe));
        }
        let mut cmd = Command::new(&exe);
        if let Some(ns) = netns {
            ns.enter_on_exec(&mut cmd);
        }
        cmd.args(node.ros_args()).stdin(Stdio::null());
        // A node must not outlive its launcher, even one that was SIGKILLed.
        signal_when_parent_dies(&mut cmd, libc::SIGTERM);
        // Its own process group: a terminal's Ctrl-C reaches the launcher only, which decides
        // (`aerokv swarm` cancels its goal first; every launcher stops its nodes with SIGTERM).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if let (Some(dir), Some(file)) = (&self.log_dir, self.log_file(node)) {
            let _ = std::fs::create_dir_all(dir);
            match std::fs::File::create(&file) {
                Ok(f) => {
                    let f2 = f.try_clone().map_err(|source| SupervisorError::Spawn { exe: exe.clone(), source })?;
                    cmd.stdout(f).stderr(f2);
                }
                Err(source) => return Err(SupervisorError::Spawn { exe, source }),
            }
        }
        let child = cmd.spawn().map_err(|source| SupervisorError::Spawn { exe: exe.clone(), source })?;
        let pid = child.id();
        tracing::debug!(node = %node.fqn(), pid, "started");
        self.running.push(Running { node: node.clone(), child });
        Ok(pid)
    }

    /// Where `node`'s output goes (with a log directory).
    pub fn log_file(&self, node: &NodeProcess) -> Option<PathBuf> {
        let name = format!("{}.log", node.fqn().trim_start_matches('/').replace('/', "_"));
        self.log_dir.as_ref().map(|d| d.join(name))
    }

    /// The first process that has ended (any way, or only by a non-zero exit code of its own
    /// when `own_failures_only`: not killed by a signal), with [`startup_report`].
    pub fn failed_to_start(&mut self, own_failures_only: bool) -> Option<String> {
        let (fqn, status) = self.exited().into_iter().find(|(_, status)| {
            let stopped = Stopped::from(*status);
            !own_failures_only || matches!(stopped, Stopped::Exited(code) if code != 0)
        })?;
        let r = self.running.iter().find(|r| r.node.fqn() == fqn)?;
        let path = self.log_file(&r.node);
        let text = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
        let log = path.as_deref().zip(text.as_deref());
        Some(startup_report(&r.node, Stopped::from(status), log))
    }

    pub fn pid_of(&self, fqn: &str) -> Option<u32> {
        self.running.iter().find(|r| r.node.fqn() == fqn).map(|r| r.child.id())
    }

    /// Sends `signal` to one of our processes.
    pub fn signal(&self, fqn: &str, signal: i32) -> bool {
        match self.pid_of(fqn) {
            // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
            Some(pid) => unsafe { libc::kill(pid as i32, signal) == 0 },
            None => false,
        }
    }

    /// Processes that have exited, with their status (does not block).
    pub fn exited(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for r in &mut self.running {
            if let Ok(Some(status)) = r.child.try_wait() {
                out.push((r.node.fqn(), status));
            }
        }
        out
    }

    /// SIGTERM to every process still running, then SIGKILL after `grace`. Returns how each
    /// one ended.
    pub fn stop_all(&mut self, grace: Duration) -> Vec<(String, Stopped)> {
        for r in &mut self.running {
            if matches!(r.child.try_wait(), Ok(None)) {
                // SAFETY: kill(2) on our own, not yet reaped child.
                unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + grace;
        let mut out = Vec::new();
        for r in &mut self.running {
            let stopped = loop {
                match r.child.try_wait() {
                    Ok(Some(s)) => break Stopped::from(s),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = r.child.kill();
                        let _ = r.child.wait();
                        break Stopped::KilledAfter(grace);
                    }
                }
            };
            out.push((r.node.fqn(), stopped));
        }
        self.running.clear();
        let orphans = clean_orphaned_shm();
        if orphans > 0 {
            tracing::debug!(orphans, "removed shared-memory files of dead DDS participants");
        }
        out
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if !self.running.is_empty() {
            self.stop_all(Duration::from_secs(3));
        }
    }
}

/// Lines of a node's log shown when it fails to start.
pub const LOG_TAIL_LINES: usize = 12;

/// Why a node that exited during start-up did: its name, how it ended, the last lines of its log
/// and, when the log blames a parameter, where that parameter's value came from (the `-p`
/// override of the launch, which wins, or the last parameter file that sets it).
pub fn startup_report(node: &NodeProcess, stopped: Stopped, log: Option<(&Path, &str)>) -> String {
    let mut out = format!("{} exited during start-up: {stopped}", node.fqn());
    if let Some(key) = log.and_then(|(_, text)| blamed_parameter(text)) {
        match parameter_source(node, &key) {
            Some(source) => out += &format!("\n  cause: parameter `{key}`, set by {source}"),
            None => out += &format!("\n  cause: parameter `{key}` (its default: no parameter file sets it)"),
        }
    }
    if let Some((path, text)) = log {
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        out += &format!("\n  last lines of {}:", path.display());
        for l in tail {
            out += &format!("\n    {l}");
        }
    }
    out
}

/// The parameter a node's log names as wrong: "field `x`" (a parameter file refused when it is
/// read) or "parameter `x`" (a value the node refused), the last such mention.
fn blamed_parameter(log: &str) -> Option<String> {
    log.lines().rev().find_map(|line| {
        ["field `", "parameter `"].iter().find_map(|marker| {
            let rest = &line[line.find(marker)? + marker.len()..];
            let key = rest.split('`').next()?;
            let key = key.split(['.', '[']).next()?;
            (!key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')).then(|| key.to_string())
        })
    })
}

/// Where `key`'s value comes from for `node`: its `-p` override, or the last parameter file with
/// the key in a section (the file and line).
fn parameter_source(node: &NodeProcess, key: &str) -> Option<String> {
    if let Some((k, v)) = node.params.iter().rev().find(|(k, _)| k == key) {
        return Some(format!("the override `-p {k}:={v}`"));
    }
    node.params_files.iter().rev().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        let line = text.lines().position(|l| {
            let t = l.trim_start();
            l.starts_with(' ') && t.strip_prefix(key).is_some_and(|r| r.trim_start().starts_with(':'))
        })?;
        Some(format!("{}:{}", file.display(), line + 1))
    })
}

/// Where our launch/ and config/ live: `$AEROKV_SHARE`, else the installed `share/aerokv` next to
/// the executable, else the source checkout (`$AEROKV_ROOT` or the current directory).
pub fn share_dir() -> PathBuf {
    if let Ok(d) = std::env::var("AEROKV_SHARE") {
        return d.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        // <prefix>/lib/aerokv/aerokv -> <prefix>/share/aerokv
        if let Some(prefix) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            let share = prefix.join("share/aerokv");
            if share.join("launch").is_dir() {
                return share;
            }
        }
    }
    std::env::var("AEROKV_ROOT").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("."))
}

/// Directory of the running executable (the node binaries sit beside `aerokv`).
pub fn bin_dir() -> PathBuf {
    std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from("."))
}

/// Removes Fast DDS shared-memory files that no live process holds (what `fastdds shm clean`
/// does): a killed drone leaves its segment behind. A live participant keeps an exclusive lock
/// on `<file>_el`, so only orphans are removed. Returns how many files went.
pub fn clean_orphaned_shm() -> usize {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else { return 0 };
    let mapped = mapped_shm_files();
    let mut removed = 0;
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        // Listening ports (one per participant and domain) and their mutexes: orphaned when no
        // process maps them; every ROS domain used leaves its own otherwise.
        if let Some(port) = name.strip_prefix("fastrtps_port").filter(|p| p.bytes().all(|b| b.is_ascii_digit())) {
            let sem = format!("sem.fastrtps_port{port}_mutex");
            if !mapped.contains(&name) && !mapped.contains(&sem) {
                removed += usize::from(std::fs::remove_file(entry.path()).is_ok());
                removed += usize::from(std::fs::remove_file(entry.path().with_file_name(sem)).is_ok());
            }
            continue;
        }
        let Some(base) = name.strip_prefix("fastrtps_").and_then(|n| n.strip_suffix("_el")) else { continue };
        let lock_path = entry.path();
        let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(&lock_path) else { continue };
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; released when `file` is dropped.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let data = lock_path.with_file_name(format!("fastrtps_{base}"));
            removed += usize::from(std::fs::remove_file(&data).is_ok());
            removed += usize::from(std::fs::remove_file(&lock_path).is_ok());
        }
    }
    removed
}

/// Names of the /dev/shm files some process has mapped (from /proc/<pid>/maps).
fn mapped_shm_files() -> std::collections::HashSet<String> {
    let mut out = std::collections::HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        if !p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(maps) = std::fs::read_to_string(p.path().join("maps")) {
            for line in maps.lines() {
                if let Some(i) = line.find("/dev/shm/") {
                    let name = line[i + 9..].trim_end_matches(" (deleted)");
                    out.insert(name.to_string());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(files: Vec<PathBuf>, params: Vec<(&str, &str)>) -> NodeProcess {
        NodeProcess {
            package: "aerokv".into(),
            executable: "scheduler".into(),
            name: "scheduler".into(),
            namespace: "/aerokv".into(),
            params_files: files,
            params: params.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
        }
    }

    #[test]
    fn a_start_up_failure_names_the_file_and_key_at_fault() {
        let dir = std::env::temp_dir().join(format!("aerokv-startup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("swarm.yaml"), dir.join("override.yaml"));
        std::fs::write(&a, "/**/scheduler:\n  ros__parameters:\n    threads: 1\n    step_timeout_s: 30.0\n").unwrap();
        std::fs::write(&b, "/**/scheduler:\n  ros__parameters:\n    step_timeout_s: -1.0\n").unwrap();
        let n = node(vec![a.clone(), b.clone()], vec![("expected_uavs", "4"), ("use_sim_time", "false")]);
        let log = "INFO starting\nError: parameter `step_timeout_s` must be positive, not -1\n";
        let r = startup_report(&n, Stopped::Exited(1), Some((Path::new("/logs/aerokv_scheduler.log"), log)));
        assert!(r.starts_with("/aerokv/scheduler exited during start-up: exit code 1"), "{r}");
        // The later file wins, and the command-line overrides are not blamed.
        assert!(r.contains(&format!("cause: parameter `step_timeout_s`, set by {}:3", b.display())), "{r}");
        assert!(r.contains("    Error: parameter `step_timeout_s` must be positive"), "{r}");
        let log = "Error: /x/swarm.yaml: field `expected_uavs`: invalid type\n";
        let r = startup_report(&n, Stopped::Exited(1), Some((Path::new("l"), log)));
        assert!(r.contains("cause: parameter `expected_uavs`, set by the override `-p expected_uavs:=4`"), "{r}");
        let r = startup_report(&n, Stopped::Signal(11), Some((Path::new("l"), "Error: parameter `threadz` is odd")));
        assert!(r.contains("(its default: no parameter file sets it)") && r.contains("signal 11"), "{r}");
        let long: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let r = startup_report(&n, Stopped::Exited(101), Some((Path::new("l"), &long)));
        assert!(r.contains("line 39") && r.contains("line 28") && !r.contains("line 27\n"), "{r}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
