//! The ROS side of bags: a recorder that follows topics as they appear and keeps their raw CDR
//! messages, and a player that republishes a bag with its timing and QoS. The bag format itself
//! is `crate::bag` (no ROS).
use crate::bag::metadata::{self, Durability, History, Liveliness, QosTime, Reliability};
use crate::bag::schema::MsgSearchPath;
use crate::bag::{Bag, BagSummary, BagWriter, Qos, Selection, TopicId};
use futures::{FutureExt, Stream, StreamExt};
use r2r::qos::{DurabilityPolicy, HistoryPolicy, LivelinessPolicy, ReliabilityPolicy};
use r2r::QosProfile;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn to_r2r_qos(q: &Qos) -> QosProfile {
    QosProfile {
        history: match q.history {
            History::KeepAll => HistoryPolicy::KeepAll,
            History::KeepLast => HistoryPolicy::KeepLast,
            _ => HistoryPolicy::SystemDefault,
        },
        depth: usize::try_from(q.depth).unwrap_or(usize::MAX),
        reliability: match q.reliability {
            Reliability::Reliable => ReliabilityPolicy::Reliable,
            Reliability::BestEffort => ReliabilityPolicy::BestEffort,
            _ => ReliabilityPolicy::SystemDefault,
        },
        durability: match q.durability {
            Durability::TransientLocal => DurabilityPolicy::TransientLocal,
            Durability::Volatile => DurabilityPolicy::Volatile,
            _ => DurabilityPolicy::SystemDefault,
        },
        deadline: q.deadline.as_duration().unwrap_or_default(),
        lifespan: q.lifespan.as_duration().unwrap_or_default(),
        liveliness: match q.liveliness {
            Liveliness::ManualByTopic => LivelinessPolicy::ManualByTopic,
            Liveliness::Automatic => LivelinessPolicy::Automatic,
            _ => LivelinessPolicy::SystemDefault,
        },
        liveliness_lease_duration: q.liveliness_lease_duration.as_duration().unwrap_or_default(),
        avoid_ros_namespace_conventions: q.avoid_ros_namespace_conventions,
    }
}

fn from_r2r_qos(q: &QosProfile) -> Qos {
    Qos {
        history: match q.history {
            HistoryPolicy::KeepAll => History::KeepAll,
            HistoryPolicy::KeepLast => History::KeepLast,
            HistoryPolicy::SystemDefault => History::SystemDefault,
            _ => History::Unknown,
        },
        depth: q.depth as u64,
        reliability: match q.reliability {
            ReliabilityPolicy::Reliable => Reliability::Reliable,
            ReliabilityPolicy::BestEffort => Reliability::BestEffort,
            ReliabilityPolicy::SystemDefault => Reliability::SystemDefault,
            _ => Reliability::Unknown,
        },
        durability: match q.durability {
            DurabilityPolicy::TransientLocal => Durability::TransientLocal,
            DurabilityPolicy::Volatile => Durability::Volatile,
            DurabilityPolicy::SystemDefault => Durability::SystemDefault,
            _ => Durability::Unknown,
        },
        deadline: QosTime::from_duration(q.deadline),
        lifespan: QosTime::from_duration(q.lifespan),
        liveliness: match q.liveliness {
            LivelinessPolicy::Automatic => Liveliness::Automatic,
            LivelinessPolicy::ManualByTopic => Liveliness::ManualByTopic,
            LivelinessPolicy::SystemDefault => Liveliness::SystemDefault,
            _ => Liveliness::Unknown,
        },
        liveliness_lease_duration: QosTime::from_duration(q.liveliness_lease_duration),
        avoid_ros_namespace_conventions: q.avoid_ros_namespace_conventions,
    }
}

fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// The longest the recorder waits in DDS for a message.
const RECORDER_WAIT: Duration = Duration::from_millis(100);

/// What the recorder hands its writer thread.
enum Entry {
    Topic { name: String, type_name: String, schema: Option<String>, offered: Vec<Qos> },
    Message { topic: usize, log_time: u64, data: Vec<u8> },
}

pub struct RecordOptions {
    pub dir: PathBuf,
    pub selection: Selection,
    /// How often the ROS graph is searched for new topics.
    pub discovery_period: Duration,
    /// Messages waiting for the writer; beyond this they are dropped (and counted).
    pub queue: usize,
}

/// What a recording did.
#[derive(Debug)]
pub struct RecordReport {
    pub summary: BagSummary,
    /// Messages dropped because the writer fell behind, per topic.
    pub dropped: BTreeMap<String, u64>,
    /// Topics that matched but could not be recorded, with the reason.
    pub skipped: BTreeMap<String, String>,
    /// Named topics that never appeared.
    pub never_seen: Vec<String>,
}

type RawStream = Box<dyn Stream<Item = Vec<u8>> + Unpin + Send>;

struct Subscribed {
    index: usize,
    name: String,
    stream: RawStream,
}

/// Records until `stop` is set: subscribes to every selected topic as it appears (with QoS that
/// matches its publishers), stamps each message on arrival and hands it to a writer thread
/// through a bounded queue, so that a slow disk drops messages (counted) instead of slowing the
/// ROS side. The bag is finished properly when `stop` is set, e.g. by SIGINT or SIGTERM.
pub fn record(opts: RecordOptions, stop: &AtomicBool) -> anyhow::Result<RecordReport> {
    let mut writer = BagWriter::create(&opts.dir)?;
    tracing::info!("recording into {} (SIGINT or SIGTERM to finish)", opts.dir.display());
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "aerokv_bag_recorder", "")?;
    let search = MsgSearchPath::from_env();

    let (tx, rx) = mpsc::sync_channel::<Entry>(opts.queue.max(1));
    let writer_thread = std::thread::Builder::new().name("bag-writer".into()).spawn(move || {
        let mut ids: Vec<TopicId> = Vec::new();
        let mut failed = None;
        for entry in rx {
            if failed.is_some() {
                continue; // keep draining so the recorder never blocks on a dead writer
            }
            let result = match entry {
                Entry::Topic { name, type_name, schema, offered } => {
                    writer.add_topic(&name, &type_name, schema.as_deref(), &offered).map(|id| ids.push(id))
                }
                Entry::Message { topic, log_time, data } => writer.write(ids[topic], log_time, &data),
            };
            if let Err(e) = result {
                tracing::error!("bag writer: {e}; recording stops writing");
                failed = Some(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => writer.finish(),
        }
    })?;

    let mut subs: Vec<Subscribed> = Vec::new();
    let mut known: HashSet<String> = HashSet::new();
    let mut skipped: BTreeMap<String, String> = BTreeMap::new();
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_discovery: Option<Instant> = None;
    let mut recorded: u64 = 0;
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if last_discovery.is_none_or(|t| t.elapsed() >= opts.discovery_period) {
            last_discovery = Some(Instant::now());
            discover(&mut node, &opts.selection, &search, &tx, &mut subs, &mut known, &mut skipped)?;
        }
        // One message per ready subscription per spin: drained right after, so r2r's small
        // per-subscription queue never overflows (DDS keeps the rest in the reader's history).
        if subs.is_empty() {
            // rcl reports an empty wait set as an error: nothing to wait for yet.
            std::thread::sleep(RECORDER_WAIT);
            continue;
        }
        // Returns as soon as a message is there; the timeout only paces discovery and the stop
        // check, and every wakeup is CPU the swarm's own processes do not get.
        node.spin_once(RECORDER_WAIT);
        let now = unix_ns();
        for s in &mut subs {
            while let Some(Some(data)) = s.stream.next().now_or_never() {
                match tx.try_send(Entry::Message { topic: s.index, log_time: now, data }) {
                    Ok(()) => recorded += 1,
                    Err(mpsc::TrySendError::Full(_)) => *dropped.entry(s.name.clone()).or_default() += 1,
                    Err(mpsc::TrySendError::Disconnected(_)) => anyhow::bail!("the bag writer stopped"),
                }
            }
        }
    }
    tracing::info!(
        "stopping after {:.1} s: {recorded} messages on {} topics queued for the bag",
        started.elapsed().as_secs_f64(),
        subs.len()
    );
    drop(subs);
    drop(tx);
    let summary = writer_thread.join().map_err(|_| anyhow::anyhow!("the bag writer panicked"))??;
    let never_seen = match &opts.selection {
        Selection::Topics(names) => names.iter().filter(|n| !known.contains(*n)).cloned().collect(),
        Selection::Mission { .. } => Vec::new(),
    };
    Ok(RecordReport { summary, dropped, skipped, never_seen })
}

/// Subscribes to selected topics that have appeared since the last look.
fn discover(
    node: &mut r2r::Node,
    selection: &Selection,
    search: &MsgSearchPath,
    tx: &mpsc::SyncSender<Entry>,
    subs: &mut Vec<Subscribed>,
    known: &mut HashSet<String>,
    skipped: &mut BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let topics = match node.get_topic_names_and_types() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!("topic discovery failed: {e}");
            return Ok(());
        }
    };
    for (name, types) in topics {
        if known.contains(&name) || skipped.contains_key(&name) {
            continue;
        }
        let Some(type_name) = types.first() else { continue };
        if !selection.wants(&name, type_name) {
            continue;
        }
        if types.len() > 1 {
            skipped.insert(name.clone(), format!("several types on one topic: {}", types.join(", ")));
            continue;
        }
        // The QoS to match is the publishers': wait for one (a topic may first appear through a subscriber).
        let publishers = match node.get_publishers_info_by_topic(&name, false) {
            Ok(p) if !p.is_empty() => p,
            _ => continue,
        };
        let offered: Vec<Qos> = publishers.iter().map(|p| from_r2r_qos(&p.qos_profile)).collect();
        let qos = to_r2r_qos(&metadata::subscription_qos(&offered));
        let stream = match node.subscribe_raw(&name, type_name, qos) {
            Ok(s) => Box::new(s) as RawStream,
            Err(e) => {
                let why = format!("cannot subscribe to {type_name} (not among this build's interfaces?): {e}");
                tracing::warn!(topic = %name, "{why}");
                skipped.insert(name, why);
                continue;
            }
        };
        let schema = match search.ros2msg(type_name) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(topic = %name, "recorded without a message definition: {e}");
                None
            }
        };
        tracing::info!(topic = %name, r#type = %type_name, publishers = publishers.len(), "recording");
        tx.send(Entry::Topic { name: name.clone(), type_name: type_name.clone(), schema, offered })
            .map_err(|_| anyhow::anyhow!("the bag writer stopped"))?;
        subs.push(Subscribed { index: subs.len(), name: name.clone(), stream });
        known.insert(name);
    }
    Ok(())
}

pub struct PlayOptions {
    pub dir: PathBuf,
    /// Speed factor: 2.0 plays twice as fast.
    pub rate: f64,
    /// Publish /clock (the bag's time) at this many Hz while playing.
    pub clock_hz: Option<f64>,
    /// Only these topics (empty: all).
    pub topics: Vec<String>,
    pub repeat: bool,
    /// Time for subscribers to match the new publishers before the first message.
    pub delay: Duration,
    /// Before the delay, wait until every topic played has a subscriber (in another process).
    pub wait_for_subscribers: bool,
}

#[derive(Debug, Default)]
pub struct PlayReport {
    pub published: BTreeMap<String, u64>,
    pub clock_ticks: u64,
    pub skipped: BTreeMap<String, String>,
}

/// Republishes a bag: each message at its recorded offset from the first (divided by `rate`),
/// on a publisher with the QoS its topic was recorded with. The whole bag is read and checked
/// first, so a truncated or corrupt bag fails before anything is published.
pub fn play(opts: PlayOptions, stop: &AtomicBool) -> anyhow::Result<PlayReport> {
    anyhow::ensure!(opts.rate.is_finite() && opts.rate > 0.0, "--rate must be a positive number");
    if let Some(hz) = opts.clock_hz {
        anyhow::ensure!(hz.is_finite() && hz > 0.0, "--clock must be a positive rate in Hz");
    }
    let bag = Bag::open(&opts.dir)?;
    let contents = bag.check()?;
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "aerokv_bag_player", "")?;
    let mut report = PlayReport::default();
    let mut publishers = HashMap::new();
    for t in &bag.info.topics_with_message_count {
        let meta = &t.topic_metadata;
        if !opts.topics.is_empty() && !opts.topics.contains(&meta.name) {
            continue;
        }
        let qos = to_r2r_qos(&metadata::playback_qos(&meta.offered_qos_profiles.0));
        match node.create_publisher_untyped(&meta.name, &meta.type_name, qos) {
            Ok(p) => {
                publishers.insert(meta.name.clone(), p);
            }
            Err(e) => {
                let why = format!("cannot publish {} (not among this build's interfaces?): {e}", meta.type_name);
                tracing::warn!(topic = %meta.name, "{why}");
                report.skipped.insert(meta.name.clone(), why);
            }
        }
    }
    for name in opts.topics.iter().filter(|n| !contents.counts.contains_key(*n)) {
        tracing::warn!("--topics {name}: not in this bag");
    }
    // Reliable, so that both reliable and best-effort /clock subscribers match.
    let clock = match opts.clock_hz {
        Some(_) => Some(node.create_publisher::<r2r::rosgraph_msgs::msg::Clock>(
            "/clock",
            QosProfile::default().keep_last(1).reliable().volatile(),
        )?),
        None => None,
    };
    let Some(first) = contents.first else {
        tracing::info!("the bag holds no messages");
        return Ok(report);
    };
    if opts.wait_for_subscribers {
        let waiting = |p: &r2r::PublisherUntyped| p.get_inter_process_subscription_count().unwrap_or(0) == 0;
        let started = Instant::now();
        while publishers.values().any(waiting) && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!("every topic has a subscriber after {:.1} s", started.elapsed().as_secs_f64());
    }
    pause(opts.delay, stop);
    let clock_period = opts.clock_hz.map(|hz| Duration::from_secs_f64(1.0 / hz));
    loop {
        let start = Instant::now();
        let mut next_tick = start;
        // The bag's time at a wall-clock instant of this pass.
        let bag_time = |at: Instant| first + (at.duration_since(start).as_secs_f64() * opts.rate * 1e9) as u64;
        for m in bag.messages() {
            let m = m?;
            let due = start + Duration::from_secs_f64(m.log_time.saturating_sub(first) as f64 / 1e9 / opts.rate);
            // Wait for the message's time, ticking /clock on the way.
            loop {
                if stop.load(Ordering::Relaxed) {
                    return Ok(report);
                }
                let now = Instant::now();
                if let (Some(pub_clock), Some(period)) = (&clock, clock_period) {
                    if now >= next_tick {
                        let t = bag_time(now);
                        let stamp = r2r::builtin_interfaces::msg::Time {
                            sec: (t / 1_000_000_000) as i32,
                            nanosec: (t % 1_000_000_000) as u32,
                        };
                        if pub_clock.publish(&r2r::rosgraph_msgs::msg::Clock { clock: stamp }).is_ok() {
                            report.clock_ticks += 1;
                        }
                        next_tick += period;
                    }
                }
                if now >= due {
                    break;
                }
                let wake = if clock.is_some() { due.min(next_tick) } else { due };
                std::thread::sleep(wake.saturating_duration_since(now).min(Duration::from_millis(50)));
            }
            if let Some(p) = publishers.get(&m.channel.topic) {
                match p.publish_raw(&m.data) {
                    Ok(()) => *report.published.entry(m.channel.topic.clone()).or_default() += 1,
                    Err(e) => tracing::warn!(topic = %m.channel.topic, "publish failed: {e}"),
                }
            }
        }
        if !opts.repeat || stop.load(Ordering::Relaxed) {
            break;
        }
    }
    // DDS delivers (and re-sends) reliable messages from its own threads after publish returns;
    // leaving at once would lose the last ones. r2r cannot wait for acknowledgements: linger.
    std::thread::sleep(LINGER);
    Ok(report)
}

/// How long the player stays after its last message.
const LINGER: Duration = Duration::from_millis(500);

/// Sleeps `d` unless asked to stop.
fn pause(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}
