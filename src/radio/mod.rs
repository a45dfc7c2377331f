//! The swarm over an emulated radio: scenarios (pure) and the network namespaces joined by the
//! ns-3 emulator (`aerokv swarm --radio`).
pub mod netns;
pub mod scenario;
