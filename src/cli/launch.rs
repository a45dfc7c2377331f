//! `aerokv launch FILE [name:=value ...]`: a stand-in for `ros2 launch` (not installable from
//! PyPI): starts the nodes the launch file describes and stops them on SIGINT/SIGTERM.
use crate::launch::Launcher;
use crate::supervisor::{bin_dir, share_dir, Supervisor};
use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;

/// A node that exits with an error this soon after the launch started failed to start.
const STARTUP_WINDOW: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Launch file (a name such as `swarm.launch.xml` is looked up in the package's launch/).
    pub file: PathBuf,
    /// Launch arguments, `name:=value`.
    pub args: Vec<String>,
    /// Write each node's output to DIR/<namespace>_<node>.log instead of this terminal.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Start nothing: print the processes the file describes, one JSON object per line
    /// (package, executable, fully qualified name, ROS arguments).
    #[arg(long)]
    pub print: bool,
}

pub fn run(a: LaunchArgs) -> anyhow::Result<()> {
    let share = share_dir();
    let file = if a.file.exists() { a.file.clone() } else { share.join("launch").join(&a.file) };
    let pairs: Vec<(&str, &str)> = a
        .args
        .iter()
        .map(|s| s.split_once(":=").with_context(|| format!("launch argument `{s}`: expected name:=value")))
        .collect::<anyhow::Result<_>>()?;
    let nodes = Launcher::new(&share).load(&file, &pairs)?;
    if a.print {
        for n in &nodes {
            let line = serde_json::json!({"package": n.package, "executable": n.executable, "fqn": n.fqn(), "args": n.ros_args()});
            println!("{line}");
        }
        return Ok(());
    }
    let mut sup = Supervisor::new(bin_dir(), a.log_dir);
    for n in &nodes {
        let pid = sup.start(n)?;
        eprintln!("[launch] {} (pid {pid})", n.fqn());
    }
    let started = std::time::Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let failed_start = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = poll.tick() => {
                    // A node that fails by itself while starting ends the launch at once; one
                    // killed by a signal later is a failure for the swarm to handle, not this.
                    if started.elapsed() < STARTUP_WINDOW {
                        if let Some(report) = sup.failed_to_start(true) {
                            return anyhow::Ok(Some(report));
                        }
                    }
                    for (fqn, status) in sup.exited() {
                        eprintln!("[launch] {fqn} exited: {status}");
                    }
                    if sup.running.iter_mut().all(|r| matches!(r.child.try_wait(), Ok(Some(_)))) { break; }
                }
            }
        }
        anyhow::Ok(None)
    })?;
    if let Some(report) = failed_start {
        sup.stop_all(Duration::from_secs(5));
        anyhow::bail!("{report}");
    }
    let mut failed = 0;
    for (fqn, stopped) in sup.stop_all(Duration::from_secs(5)) {
        eprintln!("[launch] {fqn} stopped: {stopped}");
        if !stopped.is_clean() {
            failed += 1;
        }
    }
    anyhow::ensure!(failed == 0, "{failed} node(s) did not exit cleanly");
    Ok(())
}
