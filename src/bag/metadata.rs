//! rosbag2's `metadata.yaml` (version 9, as rosbag2 on jazzy writes it) and the QoS profiles a
//! bag keeps per topic. Reading also accepts older versions' integer enums and QoS as a YAML string.
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// The metadata version written; rosbag2 on jazzy and `rosbags` read it.
pub const METADATA_VERSION: u32 = 9;

/// One QoS policy's value, by rmw's numbering; written by name (version 9), read by name or number.
macro_rules! qos_enum {
    ($name:ident { $($variant:ident = $value:literal, $text:literal),+ $(,)? }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
            fn from_number(n: i64) -> Option<Self> {
                match n { $($value => Some($name::$variant),)+ _ => None }
            }
            fn from_name(s: &str) -> Option<Self> {
                match s.to_ascii_lowercase().as_str() { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let parsed = match NumberOrName::deserialize(d)? {
                    NumberOrName::Number(n) => $name::from_number(n),
                    NumberOrName::Name(s) => $name::from_name(&s),
                };
                // An unknown value is not an error: rosbag2 itself maps it to "unknown".
                Ok(parsed.unwrap_or($name::Unknown))
            }
        }
    };
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrName {
    Number(i64),
    Name(String),
}

qos_enum!(History { SystemDefault = 0, "system_default", KeepLast = 1, "keep_last", KeepAll = 2, "keep_all", Unknown = 3, "unknown" });
qos_enum!(Reliability {
    SystemDefault = 0, "system_default", Reliable = 1, "reliable", BestEffort = 2, "best_effort",
    Unknown = 3, "unknown", BestAvailable = 4, "best_available",
});
qos_enum!(Durability {
    SystemDefault = 0, "system_default", TransientLocal = 1, "transient_local", Volatile = 2, "volatile",
    Unknown = 3, "unknown", BestAvailable = 4, "best_available",
});
qos_enum!(Liveliness {
    SystemDefault = 0, "system_default", Automatic = 1, "automatic", ManualByNode = 2, "manual_by_node",
    ManualByTopic = 3, "manual_by_topic", Unknown = 4, "unknown", BestAvailable = 5, "best_available",
});

/// A QoS duration as rosbag2 writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosTime {
    pub sec: u64,
    pub nsec: u64,
}

impl QosTime {
    /// rmw's "infinite" (RMW_DURATION_INFINITE), which is also what "not set" looks like on the wire.
    pub const INFINITE: QosTime = QosTime { sec: 9_223_372_036, nsec: 854_775_807 };
    pub const ZERO: QosTime = QosTime { sec: 0, nsec: 0 };

    /// None for zero (the default) and infinite: both mean "no such constraint".
    pub fn as_duration(self) -> Option<std::time::Duration> {
        if self == Self::ZERO || self.sec >= Self::INFINITE.sec || self.nsec >= 1_000_000_000 {
            None
        } else {
            Some(std::time::Duration::new(self.sec, self.nsec as u32))
        }
    }

    pub fn from_duration(d: std::time::Duration) -> Self {
        QosTime { sec: d.as_secs(), nsec: u64::from(d.subsec_nanos()) }
    }
}

/// One publisher's offered QoS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Qos {
    pub history: History,
    pub depth: u64,
    pub reliability: Reliability,
    pub durability: Durability,
    pub deadline: QosTime,
    pub lifespan: QosTime,
    pub liveliness: Liveliness,
    pub liveliness_lease_duration: QosTime,
    #[serde(default)]
    pub avoid_ros_namespace_conventions: bool,
}

impl Default for Qos {
    /// rclcpp's default: keep last 10, reliable, volatile.
    fn default() -> Self {
        Qos {
            history: History::KeepLast,
            depth: 10,
            reliability: Reliability::Reliable,
            durability: Durability::Volatile,
            deadline: QosTime::INFINITE,
            lifespan: QosTime::INFINITE,
            liveliness: Liveliness::Automatic,
            liveliness_lease_duration: QosTime::INFINITE,
            avoid_ros_namespace_conventions: false,
        }
    }
}

/// What a recorder subscribes with, given what the topic's publishers offer (rosbag2's rule):
/// reliable only if every publisher is, transient local only if every publisher is (a late
/// subscriber then still gets their history), and a deep queue so that bursts are kept.
pub fn subscription_qos(offered: &[Qos]) -> Qos {
    let all = |f: &dyn Fn(&Qos) -> bool| !offered.is_empty() && offered.iter().all(f);
    Qos {
        history: History::KeepLast,
        depth: 1000,
        reliability: if all(&|q| q.reliability == Reliability::Reliable) {
            Reliability::Reliable
        } else {
            Reliability::BestEffort
        },
        durability: if all(&|q| q.durability == Durability::TransientLocal) {
            Durability::TransientLocal
        } else {
            Durability::Volatile
        },
        ..Qos::default()
    }
}

/// What a player publishes a topic with: the recorded publishers' QoS (the first one, made
/// reliable/transient local only if all were), or the default when the bag has none. A remote
/// publisher's history is not visible to a recorder (DDS does not announce it; it reads as
/// unknown, depth 0): then keep the last 10, the default.
pub fn playback_qos(offered: &[Qos]) -> Qos {
    let Some(first) = offered.first() else { return Qos::default() };
    let adapted = subscription_qos(offered);
    let (history, depth) = match first.history {
        History::KeepAll => (History::KeepAll, first.depth),
        History::KeepLast if first.depth > 0 => (History::KeepLast, first.depth),
        _ => (History::KeepLast, Qos::default().depth),
    };
    Qos { reliability: adapted.reliability, durability: adapted.durability, history, depth, ..first.clone() }
}

/// Offered QoS profiles: a list (version 9) or a YAML string holding one (versions 4-8).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QosProfiles(pub Vec<Qos>);

impl QosProfiles {
    /// The YAML text rosbag2 keeps in an MCAP channel's `offered_qos_profiles` metadata.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(&self.0).unwrap_or_default().trim_end().to_string()
    }

    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        if text.trim().is_empty() {
            return Ok(QosProfiles::default());
        }
        Ok(QosProfiles(serde_yaml::from_str(text)?))
    }
}

impl Serialize for QosProfiles {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for QosProfiles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum ListOrText {
            List(Vec<Qos>),
            Text(String),
        }
        match ListOrText::deserialize(d)? {
            ListOrText::List(v) => Ok(QosProfiles(v)),
            ListOrText::Text(t) => QosProfiles::from_yaml(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nanoseconds {
    pub nanoseconds: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartingTime {
    pub nanoseconds_since_epoch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicMetadata {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: String,
    pub serialization_format: String,
    #[serde(default)]
    pub offered_qos_profiles: QosProfiles,
    #[serde(default)]
    pub type_description_hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicWithMessageCount {
    pub message_count: u64,
    pub topic_metadata: TopicMetadata,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInformation {
    pub path: String,
    pub starting_time: StartingTime,
    pub duration: Nanoseconds,
    pub message_count: u64,
}

/// `rosbag2_bagfile_information` of `metadata.yaml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BagInfo {
    pub version: u32,
    pub storage_identifier: String,
    pub duration: Nanoseconds,
    pub starting_time: StartingTime,
    pub message_count: u64,
    pub topics_with_message_count: Vec<TopicWithMessageCount>,
    #[serde(default)]
    pub compression_format: String,
    #[serde(default)]
    pub compression_mode: String,
    pub relative_file_paths: Vec<String>,
    #[serde(default)]
    pub files: Vec<FileInformation>,
    #[serde(default)]
    pub custom_data: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub ros_distro: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataFile {
    pub rosbag2_bagfile_information: BagInfo,
}

impl BagInfo {
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(&MetadataFile { rosbag2_bagfile_information: self.clone() })
    }

    pub fn from_yaml(text: &str) -> Result<Self, serde_yaml::Error> {
        Ok(serde_yaml::from_str::<MetadataFile>(text)?.rosbag2_bagfile_information)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(reliability: Reliability, durability: Durability) -> Qos {
        Qos { reliability, durability, ..Qos::default() }
    }

    #[test]
    fn qos_reads_names_and_numbers_and_writes_names() {
        let v9 = "- history: keep_last\n  depth: 5\n  reliability: best_effort\n  durability: transient_local\n  \
                  deadline: {sec: 9223372036, nsec: 854775807}\n  lifespan: {sec: 1, nsec: 5}\n  liveliness: automatic\n  \
                  liveliness_lease_duration: {sec: 0, nsec: 0}\n  avoid_ros_namespace_conventions: false\n";
        let v8 = v9
            .replace("keep_last", "1")
            .replace("best_effort", "2")
            .replace("transient_local", "1")
            .replace("automatic", "1");
        let a = QosProfiles::from_yaml(v9).unwrap();
        let b = QosProfiles::from_yaml(&v8).unwrap();
        assert_eq!(a, b);
        let q = &a.0[0];
        assert_eq!(
            (q.history, q.depth, q.reliability, q.durability),
            (History::KeepLast, 5, Reliability::BestEffort, Durability::TransientLocal)
        );
        assert_eq!(q.deadline.as_duration(), None);
        assert_eq!(q.lifespan.as_duration(), Some(std::time::Duration::new(1, 5)));
        let text = a.to_yaml();
        assert!(text.contains("reliability: best_effort") && text.contains("durability: transient_local"), "{text}");
        assert_eq!(QosProfiles::from_yaml(&text).unwrap(), a);
        // An unknown value is "unknown", not a failure.
        let odd = QosProfiles::from_yaml(&v9.replace("best_effort", "sometimes")).unwrap();
        assert_eq!(odd.0[0].reliability, Reliability::Unknown);
    }

    #[test]
    fn recorder_subscribes_reliable_or_latched_only_when_every_publisher_offers_it() {
        use Durability::*;
        use Reliability::*;
        let s = subscription_qos(&[profile(Reliable, TransientLocal), profile(Reliable, TransientLocal)]);
        assert_eq!((s.reliability, s.durability), (Reliable, TransientLocal));
        let s = subscription_qos(&[profile(Reliable, TransientLocal), profile(BestEffort, Volatile)]);
        assert_eq!((s.reliability, s.durability), (BestEffort, Volatile));
        let s = subscription_qos(&[]);
        assert_eq!((s.reliability, s.durability), (BestEffort, Volatile));
        assert_eq!(playback_qos(&[]), Qos::default());
        let p = playback_qos(&[Qos { depth: 3, ..profile(Reliable, TransientLocal) }]);
        assert_eq!((p.depth, p.reliability, p.durability), (3, Reliable, TransientLocal));
        // As a recorder sees a remote publisher: history unknown, depth 0.
        let p = playback_qos(&[Qos { history: History::Unknown, depth: 0, ..profile(BestEffort, Volatile) }]);
        assert_eq!((p.history, p.depth, p.reliability), (History::KeepLast, 10, BestEffort));
    }

    #[test]
    fn metadata_round_trips_and_accepts_qos_as_text() {
        let info = BagInfo {
            version: METADATA_VERSION,
            storage_identifier: "mcap".into(),
            duration: Nanoseconds { nanoseconds: 7 },
            starting_time: StartingTime { nanoseconds_since_epoch: 11 },
            message_count: 2,
            topics_with_message_count: vec![TopicWithMessageCount {
                message_count: 2,
                topic_metadata: TopicMetadata {
                    name: "/a".into(),
                    type_name: "std_msgs/msg/String".into(),
                    serialization_format: "cdr".into(),
                    offered_qos_profiles: QosProfiles(vec![Qos::default()]),
                    type_description_hash: String::new(),
                },
            }],
            compression_format: String::new(),
            compression_mode: String::new(),
            relative_file_paths: vec!["x_0.mcap".into()],
            files: vec![],
            custom_data: None,
            ros_distro: "jazzy".into(),
        };
        let text = info.to_yaml().unwrap();
        assert!(text.starts_with("rosbag2_bagfile_information:"), "{text}");
        assert_eq!(BagInfo::from_yaml(&text).unwrap(), info);
        // Versions 4-8 keep the profiles as one YAML string.
        let qos_text = QosProfiles(vec![Qos::default()]).to_yaml();
        let old = format!(
            "name: /a\ntype: std_msgs/msg/String\nserialization_format: cdr\noffered_qos_profiles: {}\n",
            serde_yaml::to_string(&qos_text).unwrap().trim_end()
        );
        let parsed: TopicMetadata = serde_yaml::from_str(&old).unwrap_or_else(|e| panic!("{e}\n{old}"));
        assert_eq!(parsed.offered_qos_profiles, QosProfiles(vec![Qos::default()]));
    }
}
