//! The keystore directory: one Ed25519 key per node and the public roster.
//!
//! ```text
//! DIR/roster.yaml                        public: every member's id, role and public key
//! DIR/private/                           mode 0700
//! DIR/private/aerokv/scheduler.pem       mode 0600, PKCS#8 PEM (readable by `openssl pkey`)
//! DIR/private/aerokv/watchdog.pem
//! DIR/private/uavN/shard_executor.pem
//! DIR/private/uavN/battery_monitor.pem
//! ```
//! Every node of a swarm gets the roster; each node gets only its own private key.
use crate::identity::{BadNodeId, NodeId, Role};
use ed25519_dalek::pkcs8::{spki::der::pem::LineEnding, DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const ROSTER_FILE: &str = "roster.yaml";
pub const PRIVATE_DIR: &str = "private";
const FORMAT: &str = "aerokv-roster-v1";
const ALGORITHM: &str = "ed25519";

#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file}: {message}")]
    Malformed { file: PathBuf, message: String },
    #[error("{file}: private key is accessible to group or others (mode {mode:o}); run `chmod 600 {file}`")]
    Permissions { file: PathBuf, mode: u32 },
    #[error("{file}: key does not match the public key of {id} in the roster")]
    KeyMismatch { file: PathBuf, id: NodeId },
    #[error("{dir}: a keystore exists already (pass --force to replace it)")]
    Exists { dir: PathBuf },
    #[error("{roster}: {id} is not on the roster")]
    NotAMember { roster: PathBuf, id: NodeId },
    #[error(transparent)]
    Id(#[from] BadNodeId),
}

fn io(file: &Path) -> impl FnOnce(std::io::Error) -> KeystoreError + '_ {
    move |source| KeystoreError::Io { file: file.to_path_buf(), source }
}

/// One member of the swarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub role: Role,
    pub key: VerifyingKey,
}

impl Member {
    /// The UAV this member belongs to (None for the swarm-wide nodes).
    pub fn uav(&self) -> Option<&str> {
        self.role.per_uav().then(|| self.id.namespace())
    }

    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RosterFile {
    format: String,
    algorithm: String,
    members: Vec<MemberEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberEntry {
    id: String,
    role: Role,
    /// 32 bytes, hex.
    public_key: String,
}

/// The swarm's members, by identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roster {
    members: BTreeMap<NodeId, Member>,
}

impl Roster {
    pub fn new(members: impl IntoIterator<Item = Member>) -> Self {
        Roster { members: members.into_iter().map(|m| (m.id.clone(), m)).collect() }
    }

    pub fn get(&self, id: &str) -> Option<&Member> {
        NodeId::parse(id).ok().and_then(|id| self.members.get(&id))
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The UAVs on the roster: those with a shard executor identity. Only these are planned.
    pub fn uavs(&self) -> BTreeSet<String> {
        self.members().filter(|m| m.role == Role::ShardExecutor).map(|m| m.id.namespace().to_string()).collect()
    }

    pub fn load(file: &Path) -> Result<Self, KeystoreError> {
        let bad = |message: String| KeystoreError::Malformed { file: file.to_path_buf(), message };
        let text = fs::read_to_string(file).map_err(io(file))?;
        let parsed: RosterFile = serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if parsed.format != FORMAT || parsed.algorithm != ALGORITHM {
            return Err(bad(format!(
                "format {:?} / algorithm {:?}: this build reads {FORMAT:?} / {ALGORITHM:?}",
                parsed.format, parsed.algorithm
            )));
        }
        let mut members = BTreeMap::new();
        let mut keys = BTreeSet::new();
        for entry in parsed.members {
            let id = NodeId::parse(&entry.id).map_err(|e| bad(e.to_string()))?;
            let expected = NodeId::of(entry.role, Some(id.namespace()))?;
            // The standby scheduler is the one member a role has besides its own node.
            let standby = entry.role == Role::Scheduler && id == NodeId::standby_scheduler();
            if id != expected && !standby {
                return Err(bad(format!("member {id}: role {} belongs to a node named {expected}", entry.role)));
            }
            let raw: [u8; 32] = hex::decode(&entry.public_key)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad(format!("member {id}: public_key is not 32 bytes of hex")))?;
            let key = VerifyingKey::from_bytes(&raw)
                .map_err(|_| bad(format!("member {id}: public_key is not an Ed25519 point")))?;
            if !keys.insert(raw) {
                return Err(bad(format!("member {id}: public key shared with another member")));
            }
            if members.insert(id.clone(), Member { id: id.clone(), role: entry.role, key }).is_some() {
                return Err(bad(format!("member {id} listed twice")));
            }
        }
        Ok(Roster { members })
    }

    fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        let file = RosterFile {
            format: FORMAT.into(),
            algorithm: ALGORITHM.into(),
            members: self
                .members()
                .map(|m| MemberEntry { id: m.id.to_string(), role: m.role, public_key: hex::encode(m.key.as_bytes()) })
                .collect(),
        };
        Ok(format!(
            "# AeroKV roster: the swarm's members (public; see docs/security.md)\n{}",
            serde_yaml::to_string(&file)?
        ))
    }
}

/// A keystore directory.
#[derive(Debug, Clone)]
pub struct Keystore {
    pub dir: PathBuf,
    pub roster: Roster,
}

/// The identities of a swarm of `uavs` UAVs named `uav1..uavN`.
pub fn swarm_identities(uavs: usize) -> Result<Vec<(NodeId, Role)>, BadNodeId> {
    let mut out = vec![
        (NodeId::of(Role::Scheduler, None)?, Role::Scheduler),
        (NodeId::standby_scheduler(), Role::Scheduler),
        (NodeId::of(Role::Watchdog, None)?, Role::Watchdog),
    ];
    for i in 1..=uavs {
        let uav = format!("uav{i}");
        for role in [Role::ShardExecutor, Role::BatteryMonitor] {
            out.push((NodeId::of(role, Some(&uav))?, role));
        }
    }
    Ok(out)
}

impl Keystore {
    /// Creates a keystore for `identities` with fresh keys from the OS's random source. An
    /// existing keystore is refused unless `force`, which replaces it.
    pub fn init(dir: &Path, identities: &[(NodeId, Role)], force: bool) -> Result<Self, KeystoreError> {
        let roster_file = dir.join(ROSTER_FILE);
        let private = dir.join(PRIVATE_DIR);
        if roster_file.exists() || private.exists() {
            if !force {
                return Err(KeystoreError::Exists { dir: dir.to_path_buf() });
            }
            if private.exists() {
                fs::remove_dir_all(&private).map_err(io(&private))?;
            }
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        private_dir(&private)?;
        let mut members = Vec::new();
        for (id, role) in identities {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let file = key_file(dir, id);
            if let Some(parent) = file.parent() {
                private_dir(parent)?;
            }
            // PKCS#8 v1 (no public key inside): the form OpenSSL 3.0 reads too.
            let bytes = KeypairBytes { secret_key: key.to_bytes(), public_key: None };
            let pem = bytes.to_pkcs8_pem(LineEnding::LF).map_err(|e| KeystoreError::Malformed {
                file: file.clone(),
                message: format!("cannot encode the key: {e}"),
            })?;
            // Created with mode 0600: there is no moment at which the key is readable by others.
            let mut f =
                fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&file).map_err(io(&file))?;
            f.write_all(pem.as_bytes()).map_err(io(&file))?;
            members.push(Member { id: id.clone(), role: *role, key: key.verifying_key() });
        }
        let roster = Roster::new(members);
        let yaml = roster
            .to_yaml()
            .map_err(|e| KeystoreError::Malformed { file: roster_file.clone(), message: e.to_string() })?;
        fs::write(&roster_file, yaml).map_err(io(&roster_file))?;
        Ok(Keystore { dir: dir.to_path_buf(), roster })
    }

    /// Opens a keystore: reads and checks its roster.
    pub fn open(dir: &Path) -> Result<Self, KeystoreError> {
        Ok(Keystore { dir: dir.to_path_buf(), roster: Roster::load(&dir.join(ROSTER_FILE))? })
    }

    /// The private key of `id`, checked: mode 0600 or stricter, PKCS#8 Ed25519, matching the roster.
    pub fn signing_key(&self, id: &NodeId) -> Result<SigningKey, KeystoreError> {
        let member = self
            .roster
            .members
            .get(id)
            .ok_or_else(|| KeystoreError::NotAMember { roster: self.dir.join(ROSTER_FILE), id: id.clone() })?;
        let file = key_file(&self.dir, id);
        let mut f = fs::File::open(&file).map_err(io(&file))?;
        // The mode of the file opened, not of the path: no window between check and read.
        let mode = f.metadata().map_err(io(&file))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(KeystoreError::Permissions { file, mode: mode & 0o7777 });
        }
        let mut pem = String::new();
        f.read_to_string(&mut pem).map_err(io(&file))?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeystoreError::Malformed {
            file: file.clone(),
            message: format!("not a PKCS#8 Ed25519 private key: {e}"),
        })?;
        if key.verifying_key() != member.key {
            return Err(KeystoreError::KeyMismatch { file, id: id.clone() });
        }
        Ok(key)
    }
}

/// `DIR/private/<namespace>/<node>.pem`.
pub fn key_file(dir: &Path, id: &NodeId) -> PathBuf {
    dir.join(PRIVATE_DIR).join(format!("{id}.pem"))
}

fn private_dir(path: &Path) -> Result<(), KeystoreError> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(io(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(uavs: usize) -> (tempfile::TempDir, Keystore) {
        let tmp = tempfile::tempdir().unwrap();
        let ks = Keystore::init(tmp.path(), &swarm_identities(uavs).unwrap(), false).unwrap();
        (tmp, ks)
    }

    #[test]
    fn init_writes_private_keys_0600_and_a_roster_that_loads_back() {
        let (tmp, ks) = store(2);
        assert_eq!(ks.roster.members().count(), 7);
        assert_eq!(ks.roster.uavs(), BTreeSet::from(["uav1".to_string(), "uav2".to_string()]));
        let reopened = Keystore::open(tmp.path()).unwrap();
        assert_eq!(reopened.roster, ks.roster);
        for m in ks.roster.members() {
            let file = key_file(tmp.path(), &m.id);
            assert_eq!(fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "{}", file.display());
            assert_eq!(reopened.signing_key(&m.id).unwrap().verifying_key(), m.key);
        }
        let private = tmp.path().join(PRIVATE_DIR);
        assert_eq!(fs::metadata(private).unwrap().permissions().mode() & 0o777, 0o700);
    }

    #[test]
    fn init_refuses_an_existing_keystore_unless_forced() {
        let (tmp, ks) = store(1);
        let ids = swarm_identities(3).unwrap();
        assert!(matches!(Keystore::init(tmp.path(), &ids, false), Err(KeystoreError::Exists { .. })));
        assert_eq!(Keystore::open(tmp.path()).unwrap().roster, ks.roster, "refusal changed the keystore");
        let forced = Keystore::init(tmp.path(), &ids, true).unwrap();
        assert_eq!(forced.roster.members().count(), 9);
        let old = ks.roster.get("aerokv/scheduler").unwrap().key;
        assert_ne!(forced.roster.get("aerokv/scheduler").unwrap().key, old, "keys were not renewed");
    }

    #[test]
    fn group_or_world_readable_keys_are_refused_naming_the_file() {
        let (tmp, ks) = store(1);
        let id = NodeId::parse("uav1/shard_executor").unwrap();
        let file = key_file(tmp.path(), &id);
        for mode in [0o640, 0o604, 0o660, 0o644, 0o610] {
            fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
            let err = ks.signing_key(&id).unwrap_err();
            assert!(matches!(err, KeystoreError::Permissions { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains(&file.display().to_string()), "{err}");
        }
        fs::set_permissions(&file, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(ks.signing_key(&id).is_ok());
    }

    #[test]
    fn malformed_files_are_refused_naming_the_file() {
        let (tmp, ks) = store(1);
        let roster = tmp.path().join(ROSTER_FILE);
        let good = fs::read_to_string(&roster).unwrap();
        let some_key = hex::encode(ks.roster.get("uav1/shard_executor").unwrap().key.as_bytes());
        let cases = [
            "not: [valid".to_string(),
            good.replace("aerokv-roster-v1", "aerokv-roster-v9"),
            good.replacen(&some_key, "abcd", 1),
            good.replacen("role: battery_monitor", "role: scheduler", 1),
            good.replacen("uav1/shard_executor", "uav1/../x", 1),
            good.replacen(&hex::encode(ks.roster.get("uav1/battery_monitor").unwrap().key.as_bytes()), &some_key, 1),
            format!("{good}extra: 1\n"),
        ];
        for bad in cases {
            fs::write(&roster, &bad).unwrap();
            let err = Keystore::open(tmp.path()).unwrap_err();
            assert!(matches!(err, KeystoreError::Malformed { .. }), "{bad}: {err}");
            assert!(err.to_string().starts_with(&roster.display().to_string()), "{err}");
        }
        fs::write(&roster, good).unwrap();
        let id = NodeId::parse("aerokv/watchdog").unwrap();
        let file = key_file(tmp.path(), &id);
        fs::write(&file, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let err = ks.signing_key(&id).unwrap_err();
        assert!(matches!(err, KeystoreError::Malformed { .. }) && err.to_string().contains("watchdog.pem"), "{err}");
        // A valid key that is not the roster's.
        let other = SigningKey::generate(&mut rand::rngs::OsRng).to_pkcs8_pem(LineEnding::LF).unwrap();
        fs::write(&file, other.as_bytes()).unwrap();
        assert!(matches!(ks.signing_key(&id), Err(KeystoreError::KeyMismatch { .. })));
        let stranger = NodeId::parse("uav9/shard_executor").unwrap();
        assert!(matches!(ks.signing_key(&stranger), Err(KeystoreError::NotAMember { .. })));
    }
}
