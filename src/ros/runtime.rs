//! The node runtime: typed parameters, one r2r node spun on its own thread, tracing, and graceful
//! shutdown on SIGINT/SIGTERM (a watch channel tells every task, also one that asks late; exit code 0,
//! no panic; a teardown that hangs is cut off at [`SHUTDOWN_DEADLINE`]).
use crate::params::RosArgs;
use futures::Stream;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// The longest a spinning thread waits in DDS when nothing arrives. Every timeout is a wakeup:
/// at 5 ms the swarm's ten processes woke 2,400 times a second and preempted the data plane on a
/// 2-core machine. A longer wait only delays other tasks that need the node lock to create a
/// publisher or subscription, which happens at discovery and planning, never per token.
pub const SPIN_TIMEOUT: Duration = Duration::from_millis(50);

/// From the signal (or the end of the node's body) to the end of the process, a node's shutdown
/// must fit in this: its launcher SIGKILLs after 5 s. Fast DDS can deadlock while deleting a
/// participant's entities (an open upstream bug for processes with two participants,
/// eProsima/Fast-DDS#6193; a shard executor, which has two, once never finished its shutdown in
/// CI). Past the deadline the process ends without the rest of its teardown, saying which phase
/// hung.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(4);

/// Where a node's shutdown is, for the deadline's message and exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ShutdownPhase {
    /// The node body is stopping its own work (an unfinished step here is our bug: exit code 1).
    StoppingWork = 1,
    /// The work is done and its state released; DDS entities and participants are being deleted.
    ClosingDds = 2,
    /// As `ClosingDds`, after the body failed (a cut-off teardown still exits with failure).
    ClosingDdsAfterError = 3,
}

static SHUTDOWN_PHASE: AtomicU8 = AtomicU8::new(0);

/// Records that this process's shutdown has reached `phase`.
pub fn shutdown_phase(phase: ShutdownPhase) {
    SHUTDOWN_PHASE.store(phase as u8, Ordering::Relaxed);
}

/// Ends the process `SHUTDOWN_DEADLINE` from now unless it has ended by itself.
fn arm_shutdown_deadline(node: String) {
    let spawned = std::thread::Builder::new().name("shutdown-deadline".into()).spawn(move || {
        std::thread::sleep(SHUTDOWN_DEADLINE);
        let phase = SHUTDOWN_PHASE.load(Ordering::Relaxed);
        let closing_dds = phase >= ShutdownPhase::ClosingDds as u8;
        let doing = if closing_dds { "deleting its DDS entities" } else { "stopping its work" };
        tracing::warn!(%node, "shutdown still {doing} {} s after it began: ending the process without the rest", SHUTDOWN_DEADLINE.as_secs());
        let clean = phase == ShutdownPhase::ClosingDds as u8;
        // SAFETY: _exit(2) ends the process without running destructors, which is the point:
        // the hung teardown holds locks those destructors would wait for.
        unsafe { libc::_exit(if clean { 0 } else { 1 }) }
    });
    if let Err(e) = spawned {
        tracing::warn!("cannot arm the shutdown deadline: {e}");
    }
}

/// What a node body gets: the r2r node, its identity, and the shutdown signal.
#[derive(Clone)]
pub struct NodeContext {
    pub node: Arc<Mutex<r2r::Node>>,
    /// Namespace leaf, e.g. "uav3" ("" in the root namespace).
    pub namespace: String,
    /// Becomes true once; a body that asks after that still sees it (a broadcast would not).
    shutdown: watch::Sender<bool>,
    /// Set while a [`Spinner`] spins the node from its own thread.
    spun_elsewhere: Arc<AtomicBool>,
    /// The node follows `/clock` (parameter `use_sim_time`; see [`crate::ros::clock`]).
    pub use_sim_time: bool,
    /// The `log_level` parameter at start.
    pub log_level: String,
}

/// The node spun from the thread that holds this (see [`NodeContext::spin_here`]); the runtime's
/// spin thread takes over again when it is dropped.
pub struct Spinner {
    ctx: NodeContext,
}

impl Spinner {
    /// Waits up to `timeout` for work and hands what arrived to the subscription streams.
    pub fn spin_once(&self, timeout: Duration) {
        self.ctx.lock().spin_once(timeout);
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.ctx.spun_elsewhere.store(false, Ordering::Relaxed);
    }
}

/// A thread that spins a node (hands DDS's messages to the subscription streams) until stopped;
/// it pauses while `paused` is set, when another thread spins the node (see [`Spinner`]).
pub struct SpinThread {
    stop: Arc<AtomicBool>,
    pub paused: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl SpinThread {
    pub fn start(node: Arc<Mutex<r2r::Node>>) -> std::io::Result<Self> {
        let (stop, paused) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (flag, pause) = (stop.clone(), paused.clone());
        let thread = std::thread::Builder::new().name("ros-spin".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if pause.load(Ordering::Relaxed) {
                    std::thread::sleep(SPIN_TIMEOUT);
                    continue;
                }
                node.lock().unwrap_or_else(|e| e.into_inner()).spin_once(SPIN_TIMEOUT);
                // A thread waiting for the node lock (creating a publisher, a service) gets a
                // chance now: std's mutex is not fair, and re-locking at once can starve it.
                std::thread::yield_now();
            }
        })?;
        Ok(SpinThread { stop, paused, thread })
    }

    /// Stops spinning within one spin timeout and waits for the thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

impl NodeContext {
    /// Resolves when the node is asked to stop.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|&stop| stop).await;
        }
    }

    /// True once the node is asked to stop: for threads that cannot await [`Self::shutdown`].
    pub fn stop_requested(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Spin the node from the calling thread from now on. A data-plane thread waiting in
    /// `spin_once` itself is woken by DDS directly: two thread hand-offs per message fewer than a
    /// subscription stream polled by a task, on a path every token crosses once per drone.
    pub fn spin_here(&self) -> Spinner {
        self.spun_elsewhere.store(true, Ordering::Relaxed);
        Spinner { ctx: self.clone() }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, r2r::Node> {
        // A poisoned lock only means another task panicked while holding it; the node is still usable.
        self.node.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn publisher<T: r2r::WrappedTypesupport>(
        &self,
        topic: &str,
        qos: r2r::QosProfile,
    ) -> anyhow::Result<r2r::Publisher<T>> {
        Ok(self.lock().create_publisher::<T>(topic, qos)?)
    }

    /// A subscription drained into an unbounded channel by its own task: r2r drops messages when
    /// its small internal queue is full, which the data plane must never do.
    pub fn subscribe<T>(
        &self,
        topic: &str,
        qos: r2r::QosProfile,
    ) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<T>>
    where
        T: r2r::WrappedTypesupport + Send + 'static,
    {
        let stream = self.lock().subscribe::<T>(topic, qos)?;
        Ok(drain(stream))
    }
}

/// Publishers kept per topic, each created at its topic's first message: DDS matching takes time,
/// so a topic keeps its publisher (and its matched readers) for the node's life.
pub struct Publishers<T: r2r::WrappedTypesupport>(HashMap<String, r2r::Publisher<T>>);

impl<T: r2r::WrappedTypesupport> Default for Publishers<T> {
    fn default() -> Self {
        Publishers(HashMap::new())
    }
}

impl<T: r2r::WrappedTypesupport> Publishers<T> {
    /// The topic's publisher; created with `qos` if the topic has none yet.
    pub fn get(&mut self, ctx: &NodeContext, topic: &str, qos: r2r::QosProfile) -> anyhow::Result<&r2r::Publisher<T>> {
        if !self.0.contains_key(topic) {
            let publisher = ctx.publisher::<T>(topic, qos)?;
            self.0.insert(topic.to_string(), publisher);
        }
        Ok(&self.0[topic])
    }

    /// Destroys the topic's publisher, if any, with what it has not sent yet.
    pub fn remove(&mut self, ctx: &NodeContext, topic: &str) {
        if let Some(p) = self.0.remove(topic) {
            ctx.lock().destroy_publisher(p);
        }
    }
}

fn drain<T: Send + 'static>(
    mut stream: impl Stream<Item = T> + Unpin + Send + 'static,
) -> tokio::sync::mpsc::UnboundedReceiver<T> {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            if tx.send(msg).is_err() {
                break;
            }
        }
    });
    rx
}

/// Milliseconds since a message's stamp (same clock: the machine's, or /clock's).
pub fn hop_ms(stamp: &r2r::builtin_interfaces::msg::Time) -> f64 {
    (unix_now() - stamp_secs(stamp)) * 1e3
}

/// A `builtin_interfaces/Time` in seconds.
pub fn stamp_secs(stamp: &r2r::builtin_interfaces::msg::Time) -> f64 {
    f64::from(stamp.sec) + f64::from(stamp.nanosec) * 1e-9
}

/// `{"n", "p50", "p99"}` of a sample.
pub fn percentiles(v: &[f64]) -> serde_json::Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s.get(((s.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN);
    let mean = if s.is_empty() { f64::NAN } else { s.iter().sum::<f64>() / s.len() as f64 };
    serde_json::json!({"n": s.len(), "p50": at(0.5), "p99": at(0.99), "mean": mean})
}

/// Seconds since the UNIX epoch on the node's clock (the wall clock unless `use_sim_time`).
pub fn unix_now() -> f64 {
    crate::ros::clock::unix_now()
}

/// `builtin_interfaces/Time` of the node's clock.
pub fn now_stamp() -> r2r::builtin_interfaces::msg::Time {
    crate::ros::clock::stamp()
}

/// Runs a node: loads its typed parameters (refusing a bad file with the file and field named,
/// exit code 2), creates the r2r node, spins it, runs `body` until it ends or a signal arrives.
pub fn run_node<P, F, Fut>(default_name: &str, body: F) -> ExitCode
where
    P: DeserializeOwned,
    F: FnOnce(NodeContext, P) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let args = match RosArgs::from_env() {
        Ok(a) => a,
        Err(e) => {
            crate::cli::init_tracing();
            eprintln!("error: {default_name}: {e}");
            return ExitCode::from(2);
        }
    };
    let common = match args.common(default_name) {
        Ok(c) => c,
        Err(e) => {
            crate::cli::init_tracing();
            eprintln!("error: {default_name}: bad parameters: {e}");
            return ExitCode::from(2);
        }
    };
    crate::ros::clock::init(common.use_sim_time);
    crate::ros::rosout::init(common.log_level.as_deref());
    let params: P = match args.load(default_name) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {default_name}: bad parameters: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {default_name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let ctx = r2r::Context::create()?;
        let name = args.node_name.clone().unwrap_or_else(|| default_name.to_string());
        let mut node = r2r::Node::create(ctx.clone(), &name, "")?;
        crate::ros::rosout::attach(&mut node)?;
        let node = Arc::new(Mutex::new(node));
        let (shutdown, _) = watch::channel(false);
        let spin = SpinThread::start(node.clone())?;
        let nc = NodeContext {
            node,
            namespace: args.namespace_leaf(),
            shutdown: shutdown.clone(),
            spun_elsewhere: spin.paused.clone(),
            use_sim_time: common.use_sim_time,
            log_level: common.log_level.clone().unwrap_or_else(|| "info".into()),
        };
        tracing::info!(node = %args.fqn(default_name), use_sim_time = common.use_sim_time, "started");
        // An async body does nothing until polled: it starts once the clock runs.
        let work = body(nc.clone(), params);
        let mut task = tokio::spawn(async move {
            if nc.use_sim_time {
                crate::ros::clock::follow_sim_time(&nc, ctx, &name).await?;
                if nc.stop_requested() {
                    return Ok(());
                }
            }
            work.await
        });
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let outcome = tokio::select! {
            r = &mut task => Some(r),
            _ = tokio::signal::ctrl_c() => None,
            _ = sigterm.recv() => None,
        };
        // Whether the body ended by itself or was asked to, the rest gets the same deadline.
        arm_shutdown_deadline(args.fqn(default_name));
        let result = match outcome {
            Some(joined) => joined.map_err(anyhow::Error::from).and_then(|r| r),
            None => {
                tracing::info!("signal received, shutting down");
                shutdown_phase(ShutdownPhase::StoppingWork);
                shutdown.send_replace(true);
                // No timeout of our own: a body stuck in blocking code cannot be aborted, and
                // exiting under it crashes (ONNX Runtime, DDS); the deadline ends the process.
                task.await.map_err(anyhow::Error::from).and_then(|r| r)
            }
        };
        if let Err(e) = &result {
            // Said before the teardown, which the deadline may cut short.
            eprintln!("error: {default_name}: {e:#}");
        }
        shutdown_phase(if result.is_ok() { ShutdownPhase::ClosingDds } else { ShutdownPhase::ClosingDdsAfterError });
        spin.stop();
        // Outer: setting the node up failed; inner: the body's result, already reported.
        anyhow::Ok(result)
    });
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(Ok(())) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Ok(Err(_)) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {default_name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
