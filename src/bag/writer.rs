//! Writes a rosbag2 bag: one MCAP file (profile `ros2`, `ros2msg` schemas, `cdr` messages, each
//! channel's offered QoS) and `metadata.yaml`. The MCAP file is written as `<name>_0.mcap.partial`
//! and renamed when it is complete; `metadata.yaml` comes last, so a directory without it is a
//! recording that did not finish.
use super::metadata::{
    BagInfo, FileInformation, Nanoseconds, QosProfiles, StartingTime, TopicMetadata, TopicWithMessageCount,
    METADATA_VERSION,
};
use super::{BagError, Qos, METADATA_FILE, PARTIAL_SUFFIX};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A topic added to a [`BagWriter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TopicId(usize);

struct Topic {
    meta: TopicMetadata,
    channel: u16,
    count: u64,
}

pub struct BagWriter {
    dir: PathBuf,
    file_name: String,
    partial: PathBuf,
    mcap: mcap::Writer<BufWriter<File>>,
    schemas: HashMap<String, u16>,
    topics: Vec<Topic>,
    /// First and last log time (ns since the epoch).
    span: Option<(u64, u64)>,
    sequence: u32,
    ros_distro: String,
}

/// What a finished bag holds.
#[derive(Clone, Debug)]
pub struct BagSummary {
    pub dir: PathBuf,
    pub info: BagInfo,
}

impl BagWriter {
    /// Starts a bag in `dir`, which must not exist yet or be empty.
    pub fn create(dir: &Path) -> Result<Self, BagError> {
        let io = |err| BagError::Io { path: dir.to_path_buf(), err };
        if dir.exists() && std::fs::read_dir(dir).map_err(io)?.next().is_some() {
            return Err(BagError::NotEmpty(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let stem = dir.file_name().and_then(|n| n.to_str()).filter(|n| !n.is_empty()).unwrap_or("bag");
        let file_name = format!("{stem}_0.mcap");
        let partial = dir.join(format!("{file_name}{PARTIAL_SUFFIX}"));
        let file = File::create(&partial).map_err(|err| BagError::Io { path: partial.clone(), err })?;
        let mcap = mcap::WriteOptions::new()
            .profile("ros2")
            .library(concat!("aerokv-", env!("CARGO_PKG_VERSION")))
            // Float hidden states and short telemetry compress poorly; the recorder's time is better spent writing.
            .compression(None)
            // Small chunks: a recorder that is killed leaves less behind in memory.
            .chunk_size(Some(256 * 1024))
            .create(BufWriter::new(file))
            .map_err(|err| BagError::Write { path: partial.clone(), err })?;
        Ok(BagWriter {
            dir: dir.to_path_buf(),
            file_name,
            partial,
            mcap,
            schemas: HashMap::new(),
            topics: Vec::new(),
            span: None,
            sequence: 0,
            ros_distro: std::env::var("ROS_DISTRO").unwrap_or_default(),
        })
    }

    fn write_err(&self) -> impl Fn(mcap::McapError) -> BagError + '_ {
        |err| BagError::Write { path: self.partial.clone(), err }
    }

    /// Adds a topic of `type_name` (`pkg/msg/Name`) with its `ros2msg` schema (None: the bag
    /// carries no definition for it) and the QoS its publishers offered.
    pub fn add_topic(
        &mut self,
        name: &str,
        type_name: &str,
        schema: Option<&str>,
        offered: &[Qos],
    ) -> Result<TopicId, BagError> {
        let schema_id = match (schema, self.schemas.get(type_name)) {
            (_, Some(&id)) => id,
            (None, None) => 0,
            (Some(text), None) => {
                let id = self.mcap.add_schema(type_name, "ros2msg", text.as_bytes()).map_err(self.write_err())?;
                self.schemas.insert(type_name.to_string(), id);
                id
            }
        };
        let qos = QosProfiles(offered.to_vec());
        let metadata = BTreeMap::from([("offered_qos_profiles".to_string(), qos.to_yaml())]);
        let channel = self.mcap.add_channel(schema_id, name, "cdr", &metadata).map_err(self.write_err())?;
        self.topics.push(Topic {
            meta: TopicMetadata {
                name: name.to_string(),
                type_name: type_name.to_string(),
                serialization_format: "cdr".into(),
                offered_qos_profiles: qos,
                type_description_hash: String::new(),
            },
            channel,
            count: 0,
        });
        Ok(TopicId(self.topics.len() - 1))
    }

    /// Appends one CDR-serialized message received at `log_time_ns` (ns since the UNIX epoch).
    pub fn write(&mut self, topic: TopicId, log_time_ns: u64, cdr: &[u8]) -> Result<(), BagError> {
        let t = self.topics.get_mut(topic.0).ok_or(BagError::UnknownTopic(topic.0))?;
        t.count += 1;
        let header = mcap::records::MessageHeader {
            channel_id: t.channel,
            sequence: self.sequence,
            log_time: log_time_ns,
            publish_time: log_time_ns,
        };
        self.sequence = self.sequence.wrapping_add(1);
        self.span =
            Some(self.span.map_or((log_time_ns, log_time_ns), |(a, b)| (a.min(log_time_ns), b.max(log_time_ns))));
        let partial = self.partial.clone();
        self.mcap.write_to_known_channel(&header, cdr).map_err(|err| BagError::Write { path: partial, err })
    }

    pub fn message_count(&self) -> u64 {
        self.topics.iter().map(|t| t.count).sum()
    }

    fn info(&self) -> BagInfo {
        let (start, end) = self.span.unwrap_or((0, 0));
        let count = self.message_count();
        let starting_time = StartingTime { nanoseconds_since_epoch: start };
        let duration = Nanoseconds { nanoseconds: end - start };
        BagInfo {
            version: METADATA_VERSION,
            storage_identifier: "mcap".into(),
            duration,
            starting_time,
            message_count: count,
            topics_with_message_count: self
                .topics
                .iter()
                .map(|t| TopicWithMessageCount { message_count: t.count, topic_metadata: t.meta.clone() })
                .collect(),
            compression_format: String::new(),
            compression_mode: String::new(),
            relative_file_paths: vec![self.file_name.clone()],
            files: vec![FileInformation {
                path: self.file_name.clone(),
                starting_time,
                duration,
                message_count: count,
            }],
            custom_data: None,
            ros_distro: self.ros_distro.clone(),
        }
    }

    /// Completes the MCAP file (summary, footer), renames it to its final name and writes
    /// `metadata.yaml` (through a temporary name too).
    pub fn finish(mut self) -> Result<BagSummary, BagError> {
        let info = self.info();
        let yaml = info
            .to_yaml()
            .map_err(|e| BagError::BadMetadata { path: self.dir.join(METADATA_FILE), why: e.to_string() })?;
        // rosbag2 keeps a copy of the metadata inside the MCAP file as well.
        let record = mcap::records::Metadata {
            name: "rosbag2".into(),
            metadata: BTreeMap::from([("serialized_metadata".to_string(), yaml.clone())]),
        };
        self.mcap.write_metadata(&record).map_err(self.write_err())?;
        self.mcap.finish().map_err(self.write_err())?;
        let partial = self.partial.clone();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |err| BagError::Io { path, err }
        };
        let file = self
            .mcap
            .into_inner()
            .into_inner()
            .map_err(|e| BagError::Io { path: partial.clone(), err: e.into_error() })?;
        file.sync_all().map_err(io(&partial))?;
        let done = self.dir.join(&self.file_name);
        std::fs::rename(&partial, &done).map_err(io(&partial))?;
        let meta_tmp = self.dir.join(format!("{METADATA_FILE}{PARTIAL_SUFFIX}"));
        let mut f = File::create(&meta_tmp).map_err(io(&meta_tmp))?;
        f.write_all(yaml.as_bytes()).and_then(|_| f.sync_all()).map_err(io(&meta_tmp))?;
        std::fs::rename(&meta_tmp, self.dir.join(METADATA_FILE)).map_err(io(&meta_tmp))?;
        Ok(BagSummary { dir: self.dir, info })
    }
}
