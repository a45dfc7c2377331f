//! AeroKV authentication (docs/security.md): every message is attributable to a member of the
//! swarm. Node identities and roles, the keystore directory and its roster, which role may sign
//! on which topic, Ed25519ph signing and verification with per-sender replay windows, and a
//! benchmark of the cost. Pure Rust, no ROS; the ROS nodes call it at their publish and receive
//! points.
pub mod bench;
pub mod identity;
pub mod keystore;
pub mod policy;
pub mod sign;

pub use identity::{NodeId, Role};
pub use keystore::{swarm_identities, Keystore, KeystoreError, Member, Roster};
pub use sign::{Auth, Claim, Counts, Encoder, Rejection, ReplayWindow, Signer, Verifier};
