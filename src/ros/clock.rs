//! The process's clock ([`crate::clock`]): the wall clock, or with `use_sim_time:=true` the
//! simulated time `/clock` carries. One node per process: [`crate::ros::runtime::run_node`] sets
//! it before the node's body starts; a process that sets none (the CLI) uses the wall clock.
use crate::clock::{Clock, Interval, SimClock, WallClock};
use crate::ros::NodeContext;
use r2r::builtin_interfaces::msg::Time;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

static CLOCK: OnceLock<Arc<dyn Clock>> = OnceLock::new();
static SIM: OnceLock<Arc<SimClock>> = OnceLock::new();

/// Chooses the process's clock; called first thing, before anything reads the clock (a log
/// line's stamp does).
pub fn init(use_sim_time: bool) {
    let clock: Arc<dyn Clock> = if use_sim_time { SIM.get_or_init(SimClock::new).clone() } else { Arc::new(WallClock) };
    let _ = CLOCK.set(clock);
}

/// The topic a simulator (Gazebo, `aerokv bag play --clock`, a test) publishes time on.
pub const CLOCK_TOPIC: &str = "/clock";

/// The process's clock.
pub fn clock() -> Arc<dyn Clock> {
    CLOCK.get_or_init(|| Arc::new(WallClock)).clone()
}

/// The clock's time as an `Instant` (for durations).
pub fn now() -> Instant {
    clock().instant()
}

/// Resolves once the clock has moved `d`.
pub async fn sleep(d: Duration) {
    clock().sleep(d).await
}

/// A periodic timer on the clock (first tick at once).
pub fn interval(period: Duration) -> Interval {
    Interval::new(clock(), period)
}

/// `fut`, or an error once the clock has moved `d`.
pub async fn timeout<F: std::future::Future>(d: Duration, fut: F) -> Result<F::Output, crate::clock::Elapsed> {
    crate::clock::timeout(clock().as_ref(), d, fut).await
}

/// Seconds since the UNIX epoch on the clock.
pub fn unix_now() -> f64 {
    clock().now().as_secs_f64()
}

/// `builtin_interfaces/Time` of the clock.
pub fn stamp() -> Time {
    let d = clock().now();
    Time { sec: d.as_secs() as i32, nanosec: d.subsec_nanos() }
}

/// Makes this process follow `/clock`: a node of its own (`<node>_clock`, in the same context),
/// spun by a thread of its own, sets the simulated time from every `/clock` message, so the clock
/// moves even while the node's own spinning waits (a data-plane thread that spins the node
/// itself computes between its spins). Waits for the first message (or the node's shutdown).
/// Called once, after [`init`], before the node's body starts.
pub async fn follow_sim_time(ctx: &NodeContext, context: r2r::Context, node_name: &str) -> anyhow::Result<()> {
    let Some(sim) = SIM.get().cloned() else {
        anyhow::bail!("use_sim_time is true but the process's clock is the wall clock (clock::init)");
    };
    let namespace = if ctx.namespace.is_empty() { String::new() } else { format!("/{}", ctx.namespace) };
    let mut node = r2r::Node::create(context, &format!("{node_name}_clock"), &namespace)?;
    // Best effort matches every publisher (Gazebo's and rclpy's are reliable, rosbag2's too).
    let mut rx = node.subscribe::<r2r::rosgraph_msgs::msg::Clock>(CLOCK_TOPIC, r2r::QosProfile::sensor_data())?;
    let first = Arc::new(tokio::sync::Notify::new());
    let (s, f) = (sim.clone(), first.clone());
    let stop = ctx.clone();
    std::thread::Builder::new().name("ros-clock".into()).spawn(move || {
        use futures::{FutureExt, StreamExt};
        while !stop.stop_requested() {
            node.spin_once(Duration::from_millis(20));
            while let Some(Some(m)) = rx.next().now_or_never() {
                let t = Duration::new(m.clock.sec.max(0) as u64, m.clock.nanosec.min(999_999_999));
                let was_started = s.started();
                s.set(t);
                if !was_started {
                    f.notify_one();
                }
            }
        }
    })?;
    if !sim.started() {
        tracing::info!("use_sim_time: waiting for {CLOCK_TOPIC}");
        tokio::select! {
            _ = first.notified() => {}
            _ = ctx.shutdown() => return Ok(()),
        }
    }
    tracing::info!(sim_time_s = sim.now().as_secs_f64(), "use_sim_time: following {CLOCK_TOPIC}");
    Ok(())
}

/// How far the clock has moved since `t` (an earlier [`now`]).
pub fn since(t: Instant) -> Duration {
    now().saturating_duration_since(t)
}
