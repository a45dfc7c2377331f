//! Missions on record: rosbag2 bags (MCAP storage, `metadata.yaml`) written and read without
//! rosbag2 and without ROS. The ROS side (subscribing, publishing) is `crate::ros::bag`.
//!
//! - [`writer`]: raw CDR messages in, a bag out; complete only once `finish` has run.
//! - [`reader`]: a bag in, its messages out, with the file and offset of anything truncated or corrupt.
//! - [`metadata`]: `metadata.yaml` and QoS profiles. [`schema`]: `ros2msg` schemas from `.msg` files.
pub mod metadata;
pub mod reader;
pub mod schema;
pub mod writer;

pub use metadata::Qos;
pub use reader::{Bag, BagMessage, Channel, Contents};
pub use writer::{BagSummary, BagWriter, TopicId};

use std::path::PathBuf;

pub const METADATA_FILE: &str = "metadata.yaml";
/// Suffix of a file still being written.
pub const PARTIAL_SUFFIX: &str = ".partial";

#[derive(Debug, thiserror::Error)]
pub enum BagError {
    #[error("{0}: not empty (a bag is written into a new directory)")]
    NotEmpty(PathBuf),
    #[error("{}: incomplete bag: no metadata.yaml (the recording did not finish{})", dir.display(),
        partial.as_ref().map(|p| format!("; it left {}", p.display())).unwrap_or_default())]
    Incomplete { dir: PathBuf, partial: Option<PathBuf> },
    #[error("{}: {why}", path.display())]
    BadMetadata { path: PathBuf, why: String },
    #[error("{}: truncated at byte offset {offset}: {what}", path.display())]
    Truncated { path: PathBuf, offset: u64, what: String },
    #[error("{}: corrupt at byte offset {offset}: {what}", path.display())]
    Corrupt { path: PathBuf, offset: u64, what: String },
    // `err`, not `source`: the message already says it (anyhow's chain would repeat it).
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{}: writing MCAP: {err}", path.display())]
    Write { path: PathBuf, err: mcap::McapError },
    #[error("no topic {0} in this bag writer")]
    UnknownTopic(usize),
}

/// Which topics a recorder keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// Exactly these topics (they are recorded once they appear).
    Topics(Vec<String>),
    /// A mission: every AeroKV topic, the battery inputs, /diagnostics and /clock; the data
    /// plane's activations and KV rows only when asked (they are most of the bytes).
    Mission { activations: bool, kv_rows: bool },
}

/// Message types of battery inputs a battery monitor follows (Gazebo/MAVROS, PX4).
const BATTERY_INPUT_TYPES: &[&str] = &["sensor_msgs/msg/BatteryState", "px4_msgs/msg/BatteryStatus"];

impl Selection {
    pub fn wants(&self, topic: &str, type_name: &str) -> bool {
        match self {
            Selection::Topics(names) => names.iter().any(|n| n == topic),
            Selection::Mission { activations, kv_rows } => match type_name {
                "aerokv/msg/Activation" => *activations,
                "aerokv/msg/KvSnapshot" => *kv_rows,
                t if t.starts_with("aerokv/msg/") => true,
                t if BATTERY_INPUT_TYPES.contains(&t) => true,
                "diagnostic_msgs/msg/DiagnosticArray" => topic == "/diagnostics",
                "rosgraph_msgs/msg/Clock" => topic == "/clock",
                _ => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::metadata::{Durability, Reliability};
    use super::*;
    use std::path::Path;

    const SCHEMA: &str = "string data\n";

    fn write_bag(dir: &Path, n: u64) -> BagSummary {
        let mut w = BagWriter::create(dir).unwrap();
        let latched = Qos { durability: Durability::TransientLocal, ..Qos::default() };
        let a = w.add_topic("/a", "std_msgs/msg/String", Some(SCHEMA), std::slice::from_ref(&latched)).unwrap();
        let b = w.add_topic("/b", "std_msgs/msg/String", Some(SCHEMA), &[]).unwrap();
        for i in 0..n {
            // Long enough payloads that the bag spans several chunks.
            let payload = vec![i as u8; 4096];
            w.write(if i % 3 == 0 { b } else { a }, 1_000 + i * 10, &payload).unwrap();
        }
        // Nothing is final before finish().
        assert!(!dir.join(METADATA_FILE).exists());
        w.finish().unwrap()
    }

    #[test]
    fn mission_selection_keeps_telemetry_and_asks_for_bulk_data() {
        let m = Selection::Mission { activations: false, kv_rows: false };
        assert!(m.wants("/aerokv/failures", "aerokv/msg/FailureEvent"));
        assert!(m.wants("/uav2/heartbeat", "aerokv/msg/Heartbeat"));
        assert!(m.wants("/uav2/battery_state", "sensor_msgs/msg/BatteryState"));
        assert!(m.wants("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray"));
        assert!(m.wants("/clock", "rosgraph_msgs/msg/Clock"));
        assert!(!m.wants("/uav2/input", "aerokv/msg/Activation"));
        assert!(!m.wants("/uav2/kv", "aerokv/msg/KvSnapshot"));
        assert!(!m.wants("/rosout", "rcl_interfaces/msg/Log"));
        assert!(!m.wants("/parameter_events", "rcl_interfaces/msg/ParameterEvent"));
        let all = Selection::Mission { activations: true, kv_rows: true };
        assert!(all.wants("/uav2/input", "aerokv/msg/Activation") && all.wants("/uav2/kv", "aerokv/msg/KvSnapshot"));
        let named = Selection::Topics(vec!["/rosout".into()]);
        assert!(named.wants("/rosout", "rcl_interfaces/msg/Log") && !named.wants("/diagnostics", "x/msg/Y"));
    }

    #[test]
    fn a_written_bag_reads_back_message_for_message() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mission");
        let summary = write_bag(&dir, 200);
        assert_eq!(summary.info.message_count, 200);
        assert!(dir.join("mission_0.mcap").is_file());
        assert!(!std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .any(|e| e.path().to_string_lossy().ends_with(PARTIAL_SUFFIX)));
        let bag = Bag::open(&dir).unwrap();
        assert_eq!(bag.info, summary.info);
        let contents = bag.check().unwrap();
        assert_eq!((contents.counts["/a"], contents.counts["/b"]), (133, 67));
        assert_eq!((contents.first, contents.last), (Some(1_000), Some(1_000 + 199 * 10)));
        for (i, m) in bag.messages().enumerate() {
            let m = m.unwrap();
            assert_eq!(m.log_time, 1_000 + i as u64 * 10);
            assert_eq!(m.data, vec![i as u8; 4096]);
            assert_eq!(m.channel.topic, if i % 3 == 0 { "/b" } else { "/a" });
            assert_eq!((m.channel.type_name.as_str(), m.channel.schema.as_str()), ("std_msgs/msg/String", SCHEMA));
            let want = if i % 3 == 0 {
                Vec::new()
            } else {
                vec![Qos { durability: Durability::TransientLocal, ..Qos::default() }]
            };
            assert_eq!(m.channel.offered_qos, want);
        }
        assert_eq!(
            bag.info.topics_with_message_count[0].topic_metadata.offered_qos_profiles.0[0].reliability,
            Reliability::Reliable
        );
        // A bag is written into a new directory only.
        assert!(matches!(BagWriter::create(&dir), Err(BagError::NotEmpty(_))));
    }

    #[test]
    fn truncated_and_corrupt_files_name_the_file_and_the_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        write_bag(&dir, 200);
        let file = dir.join("m_0.mcap");
        let whole = std::fs::read(&file).unwrap();
        let error_of = |bytes: &[u8]| {
            std::fs::write(&file, bytes).unwrap();
            let bag = Bag::open(&dir).unwrap();
            let err = bag.check().unwrap_err();
            (err.to_string(), err)
        };
        // Cut in the middle: the record that crosses the end is named with its offset.
        let (text, err) = error_of(&whole[..whole.len() / 2]);
        assert!(
            matches!(err, BagError::Truncated { offset, .. } if offset > 0 && offset < whole.len() as u64 / 2),
            "{text}"
        );
        assert!(text.contains(&file.display().to_string()) && text.contains("truncated at byte offset"), "{text}");
        // Cut after the last whole record before the footer.
        let (text, err) = error_of(&whole[..whole.len() - 20]);
        assert!(matches!(err, BagError::Truncated { .. }), "{text}");
        // A flipped byte inside a chunk's messages: the chunk's CRC does not match.
        let mut flipped = whole.clone();
        flipped[whole.len() / 3] ^= 0x55;
        let (text, err) = error_of(&flipped);
        assert!(matches!(err, BagError::Corrupt { offset, .. } if offset > 0), "{text}");
        assert!(text.contains("corrupt at byte offset"), "{text}");
        // Not an MCAP file at all.
        let (text, err) = error_of(b"hello, this is not a bag at all");
        assert!(matches!(err, BagError::Corrupt { offset: 0, .. }), "{text}");
        // A record length that runs past the end of the file.
        let mut long = whole.clone();
        long[9..17].copy_from_slice(&u64::MAX.to_le_bytes());
        let (text, err) = error_of(&long);
        assert!(matches!(err, BagError::Truncated { offset: 8, .. }), "{text}");
        // Metadata that does not match the file.
        std::fs::write(&file, &whole).unwrap();
        let meta = std::fs::read_to_string(dir.join(METADATA_FILE)).unwrap();
        std::fs::write(dir.join(METADATA_FILE), meta.replace("message_count: 133", "message_count: 134")).unwrap();
        let err = Bag::open(&dir).unwrap().check().unwrap_err().to_string();
        assert!(err.contains("it lists 134 messages on /a, the bag holds 133"), "{err}");
    }

    #[test]
    fn an_unfinished_recording_is_not_a_bag() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cut");
        let mut w = BagWriter::create(&dir).unwrap();
        let t = w.add_topic("/a", "std_msgs/msg/String", Some(SCHEMA), &[]).unwrap();
        w.write(t, 1, b"\0\x01\0\0\x01\0\0\0\0").unwrap();
        std::mem::forget(w); // as if the recorder were SIGKILLed
        let err = Bag::open(&dir).unwrap_err();
        assert!(
            matches!(&err, BagError::Incomplete { partial: Some(p), .. } if p.ends_with("cut_0.mcap.partial")),
            "{err}"
        );
        assert!(err.to_string().contains("incomplete bag: no metadata.yaml"), "{err}");
    }
}
