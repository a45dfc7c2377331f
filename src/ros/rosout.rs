//! Node logs to `/rosout` as well as stderr: a `tracing` layer turns every event into the
//! `rcl_interfaces/Log` rcl would send, with the node's logger name (`uav1.shard_executor`), on
//! the node's rosout publisher (rcl's rosout QoS: reliable, transient local, 1000 deep, 10 s
//! lifespan). Since Iron, rcl leaves creating that publisher to the client library (rclcpp and
//! rclpy do it, r2r 0.9.7 does not), so the runtime creates it ([`attach`]). The level is the
//! `log_level` parameter, live.
use r2r::rcl_interfaces::msg::Log;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The topic and QoS rcl gives every node's rosout publisher (`rcl_qos_profile_rosout_default`).
pub const ROSOUT: &str = "/rosout";
fn rosout_qos() -> r2r::QosProfile {
    r2r::QosProfile::default().keep_last(1000).reliable().transient_local().lifespan(Duration::from_secs(10))
}

/// `rcl_interfaces/msg/Log` levels.
const DEBUG: u8 = 10;
const INFO: u8 = 20;
const WARN: u8 = 30;
const ERROR: u8 = 40;

/// The node's logger name and rosout publisher, once the node exists.
static ROSOUT_PUB: OnceLock<(String, Mutex<r2r::Publisher<Log>>)> = OnceLock::new();
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The filter of `level`, or of `RUST_LOG` when no level is given.
fn filter(level: Option<&str>) -> EnvFilter {
    match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    }
}

/// Logging of a node process: stderr (as the CLI's) plus rosout once [`attach`] is called.
pub fn init(level: Option<&str>) {
    use std::io::IsTerminal;
    let (filter, handle) = reload::Layer::new(filter(level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if tracing_subscriber::registry().with(filter).with(fmt).with(RosoutLayer).try_init().is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// From now on events also go to `/rosout`, from `node` under its logger name.
pub fn attach(node: &mut r2r::Node) -> r2r::Result<()> {
    let publisher = node.create_publisher::<Log>(ROSOUT, rosout_qos())?;
    let _ = ROSOUT_PUB.set((node.logger().to_string(), Mutex::new(publisher)));
    Ok(())
}

/// Changes the level of stderr and rosout (the `log_level` parameter).
pub fn set_level(level: &str) -> Result<(), String> {
    let handle = FILTER.get().ok_or("logging is not set up")?;
    handle.reload(filter(Some(level))).map_err(|e| e.to_string())
}

struct RosoutLayer;

impl<S: tracing::Subscriber> Layer<S> for RosoutLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        let Some((name, publisher)) = ROSOUT_PUB.get() else { return };
        let mut text = Text::default();
        event.record(&mut text);
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => ERROR,
            tracing::Level::WARN => WARN,
            tracing::Level::INFO => INFO,
            _ => DEBUG,
        };
        let msg = Log {
            stamp: crate::ros::clock::stamp(),
            level,
            name: name.clone(),
            msg: text.0,
            file: meta.file().unwrap_or_default().to_string(),
            function: meta.target().to_string(),
            line: meta.line().unwrap_or(0),
        };
        // A log line that cannot be sent is not logged again (that would recurse).
        let _ = publisher.lock().unwrap_or_else(|e| e.into_inner()).publish(&msg);
    }
}

/// An event as the fmt layer shows it: the message, then `key=value` for every other field.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            self.0.push_str(&format!(" {}={}", field.name(), value));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={:?}", field.name(), value));
        }
    }
}
