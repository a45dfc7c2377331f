//! The data plane of one UAV, without ROS: which layers it holds (native shard, the live replica
//! of its successor's head), what it computes for an input, its boundary snapshots, the
//! activation buffer of its successor's tail, and the recovery steps of docs/design.md §3 when a new
//! plan arrives. The `shard_executor` node turns messages into calls on [`ShardHost`] and
//! publishes the [`Emit`]s it returns.
//!
//! Layers are held one ONNX file (= one layer for the shipped variants) per [`Shard`], keyed by
//! absolute layer, so that a plan can move any layer without splitting a loaded shard.
//! Intervals are taken modulo the layer count: a stage may wrap around the gateway (after the
//! last stage fails, the first stage takes its layers). Such a stage has two inputs per token:
//! its predecessor's output and, at layer 0, the gateway's embedding; recovering its tail
//! replays both (the gateway's part comes from the scheduler).
//!
//! Activations travel encoded with the plan's activation codec (`aerokv_codec`). With a lossy
//! codec, what enters every layer but the first of the model is the previous layer's output as
//! that codec delivers it, whether a hop lies between the two layers or not. The arithmetic then
//! does not depend on which UAV holds which layers: a failover moves hops (a promoted replica
//! runs across a former hop, a new hop appears inside a former stage) and the answer stays that
//! of the same codec without the failure. Replays carry the very bytes the stage was fed.
use aerokv_codec::{ActivationCodec, CodecError, Encoded};
use aerokv_engine::{prompt_chunks, EngineError, Hidden, KvRows, LayerRows, Manifest, Runtime, Shard};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("an activation in codec {got}, but the plan's codec is {want}")]
    CodecMismatch { got: ActivationCodec, want: ActivationCodec },
    #[error("invalid plan: {0}")]
    Plan(String),
    #[error("layer {layer} is assigned to {uav} but {uav} holds no state for it at token {position}")]
    LostLayer { uav: String, layer: usize, position: usize },
    #[error("the variant's layer files hold several layers each ({0}); the swarm needs one layer per file")]
    GroupedFiles(String),
    /// A message of a request older than one this UAV has already served (request ids only grow).
    #[error("a message of request {request}, older than request {newest} already served: dropped")]
    StaleRequest { request: u64, newest: u64 },
    /// An input for a position whose step has already run (a resent or replayed copy).
    #[error("an input for position {position} at layer {layer}, which already holds {held} tokens: dropped")]
    Duplicate { position: usize, layer: usize, held: usize },
}

impl DataPlaneError {
    /// A message that arrived again or too late: dropped and counted, not a fault.
    pub fn is_stale(&self) -> bool {
        matches!(self, DataPlaneError::StaleRequest { .. } | DataPlaneError::Duplicate { .. })
    }
}

pub type Result<T> = std::result::Result<T, DataPlaneError>;

/// One UAV's part of a plan: layers `start, start+1, ... (mod L)`, `len` of them; the first `k`
/// are its head (replicated live on its ring predecessor), the rest its tail, snapshotted every
/// `t` tokens to its successor (`t == 0`: no snapshots).
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub uav: String,
    pub start: usize,
    pub len: usize,
    pub k: usize,
    pub t: usize,
}

/// A plan as the executors see it (the Assignment message).
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmPlan {
    pub epoch: u64,
    pub num_layers: usize,
    /// Ring (= pipeline) order.
    pub stages: Vec<Stage>,
    pub request_id: u64,
    /// Every KV cache is cut back to this many tokens; generation resumes at this position.
    pub resume_position: usize,
    /// After a failure: the failed UAV's successor holds its tail's snapshot at least this far,
    /// so the replay of the tail's inputs starts here, not at 0 (it crosses the radio link).
    pub replay_from: usize,
    /// Every request whose caches survive this plan, each with its own resume point
    /// (`request_id`, `resume_position` and `replay_from` above are the request the decision was
    /// made for). Empty: that one request, if any ([`SwarmPlan::carried`]).
    pub requests: Vec<RequestResume>,
}

/// Where one request resumes under a new plan (the Assignment's `requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestResume {
    pub request_id: u64,
    /// Its KV caches are cut back to this many tokens; its generation resumes here.
    pub resume_position: usize,
    /// A failed UAV's tail inputs of this request are replayed from here (see `SwarmPlan::replay_from`).
    pub replay_from: usize,
}

/// Requests one plan may carry (and one executor may hold caches for).
pub const MAX_CARRIED_REQUESTS: usize = 64;

impl SwarmPlan {
    pub fn validate(&self) -> Result<()> {
        let l = self.num_layers;
        if l == 0 || self.stages.is_empty() {
            return Err(DataPlaneError::Plan("no layers or no stages".into()));
        }
        if self.replay_from > self.resume_position {
            return Err(DataPlaneError::Plan(format!(
                "replay from {} is past the resume position {}",
                self.replay_from, self.resume_position
            )));
        }
        let carried = self.carried();
        if carried.len() > MAX_CARRIED_REQUESTS {
            return Err(DataPlaneError::Plan(format!(
                "{} requests carried, at most {MAX_CARRIED_REQUESTS}",
                carried.len()
            )));
        }
        let mut ids = BTreeSet::new();
        for r in &carried {
            if r.request_id == 0 || !ids.insert(r.request_id) {
                return Err(DataPlaneError::Plan(format!("request {} carried twice or as 0", r.request_id)));
            }
            if r.replay_from > r.resume_position {
                return Err(DataPlaneError::Plan(format!(
                    "request {}: replay from {} is past its resume position {}",
                    r.request_id, r.replay_from, r.resume_position
                )));
            }
        }
        let mut seen = vec![false; l];
        let mut uavs = BTreeSet::new();
        for s in &self.stages {
            if !uavs.insert(s.uav.as_str()) {
                return Err(DataPlaneError::Plan(format!("{} appears twice", s.uav)));
            }
            if s.len == 0 || s.k > s.len || s.start >= l {
                return Err(DataPlaneError::Plan(format!("{}: start {} len {} k {}", s.uav, s.start, s.len, s.k)));
            }
            if s.start != 0 && s.start + s.k > l {
                // The replica runs from the stage's input; layer 0's input is the gateway's.
                return Err(DataPlaneError::Plan(format!(
                    "{}: a head replica of {} layers from layer {} reaches past the gateway",
                    s.uav, s.k, s.start
                )));
            }
            for layer in self.layers(s) {
                if std::mem::replace(&mut seen[layer], true) {
                    return Err(DataPlaneError::Plan(format!("layer {layer} is assigned twice")));
                }
            }
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(DataPlaneError::Plan(format!("layer {missing} is assigned to nobody")));
        }
        Ok(())
    }

    /// Every request whose caches survive this plan: `requests`, or (empty) the decision's
    /// request when it has one.
    pub fn carried(&self) -> Vec<RequestResume> {
        if !self.requests.is_empty() {
            return self.requests.clone();
        }
        let single = RequestResume {
            request_id: self.request_id,
            resume_position: self.resume_position,
            replay_from: self.replay_from,
        };
        if self.request_id == 0 {
            Vec::new()
        } else {
            vec![single]
        }
    }

    pub fn stage(&self, uav: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.uav == uav)
    }
    fn index(&self, uav: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.uav == uav)
    }
    pub fn pred(&self, uav: &str) -> Option<&Stage> {
        let i = self.index(uav)?;
        Some(&self.stages[(i + self.stages.len() - 1) % self.stages.len()])
    }
    pub fn succ(&self, uav: &str) -> Option<&Stage> {
        let i = self.index(uav)?;
        Some(&self.stages[(i + 1) % self.stages.len()])
    }
    /// Absolute layers of a stage in pipeline order.
    pub fn layers(&self, s: &Stage) -> Vec<usize> {
        (0..s.len).map(|i| (s.start + i) % self.num_layers).collect()
    }
    pub fn head(&self, s: &Stage) -> Vec<usize> {
        self.layers(s)[..s.k].to_vec()
    }
    pub fn tail(&self, s: &Stage) -> Vec<usize> {
        self.layers(s)[s.k..].to_vec()
    }
    /// Whether `layer` is one of the stage's layers (without listing them: per-token paths ask).
    pub fn holds(&self, s: &Stage, layer: usize) -> bool {
        layer < self.num_layers && (layer + self.num_layers - s.start % self.num_layers) % self.num_layers < s.len
    }
    pub fn owner(&self, layer: usize) -> Option<&Stage> {
        self.stages.iter().find(|s| self.holds(s, layer))
    }
    /// The stage whose input the gateway sends (the owner of layer 0).
    pub fn first(&self) -> Option<&Stage> {
        self.owner(0)
    }
    /// Whether the stage runs layer 0 after layers of its own (it wraps around the gateway) and
    /// layer 0 is in its tail: recovering the tail then needs the gateway to replay its
    /// embeddings since the snapshot, which no other UAV sees.
    pub fn tail_needs_gateway_replay(&self, s: &Stage) -> bool {
        s.start != 0 && self.holds(s, 0) && self.num_layers.saturating_sub(s.start) >= s.k
    }
    /// The first layer of the stage's tail when its predecessor sees (and buffers) that layer's
    /// input: the output of the head replica, or the stage's own input (K = 0, also the
    /// gateway's for the first stage). None for no tail, or a tail that starts after the gateway.
    pub fn tail_input_from_pred(&self, s: &Stage) -> Option<usize> {
        let first = (s.start + s.k) % self.num_layers;
        (s.k < s.len && (first != 0 || s.start == 0)).then_some(first)
    }
}

/// The steps that fed layer 0 in positions `from..upto`, as the gateway sent them: the prompt's
/// chunks ([`prompt_chunks`]), then one generated token per step; from the step that holds
/// `from`. `(position, token ids)`.
pub fn gateway_steps<'a>(prompt: &'a [u32], generated: &'a [u32], from: usize, upto: usize) -> Vec<(usize, &'a [u32])> {
    let tokens = generated.iter().enumerate().map(|(i, id)| (prompt.len() + i, std::slice::from_ref(id)));
    prompt_chunks(prompt)
        .chain(tokens)
        .take_while(|&(position, _)| position < upto)
        .filter(|(position, ids)| position + ids.len() > from)
        .collect()
}

/// The ids of the gateway step that starts at `position` (one of [`gateway_steps`]), once they
/// are known: a prompt chunk, or a generated token.
pub fn step_at<'a>(prompt: &'a [u32], generated: &'a [u32], position: usize) -> Option<&'a [u32]> {
    match position.checked_sub(prompt.len()) {
        None => prompt_chunks(prompt).find(|&(p, _)| p == position).map(|(_, ids)| ids),
        Some(index) => generated.get(index).map(std::slice::from_ref),
    }
}

/// Something to send.
#[derive(Debug)]
pub enum Emit {
    /// Hidden states entering layer `boundary`, encoded; `to` is its owner, `None` = back to the gateway.
    Activation { to: Option<String>, boundary: usize, request_id: u64, position: usize, hidden: Encoded },
    /// KV rows for `holder`: a boundary snapshot of this UAV's tail (to its successor) or the
    /// seed of a new head replica (to its predecessor).
    Kv { holder: String, request_id: u64, rows: KvRows },
    /// Buffered inputs of the failed successor's tail entering layer `boundary`, for its
    /// recovering successor. All of them in one message (bursts of small messages overflow
    /// subscription queues), as `(position, chunk)` in order.
    Replay { failed: String, to: String, boundary: usize, request_id: u64, chunks: Vec<(usize, Encoded)> },
}

/// Recovery work waiting for state from other UAVs.
#[derive(Debug, Default)]
struct Pending {
    /// Restored tail layers of the failed predecessor, to be brought from the snapshot end to
    /// the resume position by replaying buffered inputs.
    replay: Option<PendingReplay>,
    /// Fresh replica layers waiting for the successor's head seed.
    seed_layers: Vec<usize>,
    /// The successor's inputs that arrived before its head seed, `(request, position, input)` in
    /// arrival order: the replica computes them once seeded. Serving does not wait for the seed
    /// (over a radio it is paced behind the activations and takes a second or more); only the
    /// protection of the successor's head does.
    seed_inputs: Vec<(u64, usize, Encoded)>,
    /// Seeds and snapshots to send once the native layers are complete.
    announce: bool,
}

#[derive(Debug)]
struct PendingReplay {
    failed: String,
    from: usize,
    /// The restored layers as runs fed by one input each: one run, or two when the failed stage
    /// wrapped around the gateway (the run from layer 0 is fed the gateway's embeddings).
    segments: Vec<Segment>,
}

#[derive(Debug)]
struct Segment {
    layers: Vec<usize>,
    chunks: BTreeMap<usize, Encoded>,
}

impl PendingReplay {
    fn segment(&mut self, boundary: usize) -> Option<&mut Segment> {
        self.segments.iter_mut().find(|s| s.layers.first() == Some(&boundary))
    }
}

/// Memory held by one UAV (the heartbeat's `weight_bytes`, `kv` and `memory_bytes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    pub weight_bytes: u64,
    /// One entry per request held.
    pub requests: Vec<RequestMemory>,
}

/// What one request occupies on one UAV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestMemory {
    pub request_id: u64,
    /// Rows in the native KV caches.
    pub kv_tokens: usize,
    pub kv_bytes: u64,
}

impl Memory {
    /// Weights + every request's bytes.
    pub fn total(&self) -> u64 {
        self.weight_bytes + self.requests.iter().map(|r| r.kv_bytes).sum::<u64>()
    }
}

/// Counters for the heartbeat and the battery monitor.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    pub compute: Duration,
    pub computed_layer_tokens: u64,
    /// Single-token steps only (prefill and replays batch tokens and are cheaper per token).
    pub decode_compute: Duration,
    pub decode_layer_tokens: u64,
    /// Compute per layer of the recent single-token steps, ms: an exponentially weighted mean
    /// (weight [`DECODE_EWMA_WEIGHT`] per step), so that it follows the context's growth and the
    /// host's load without one preempted step swinging it.
    pub decode_ms_per_layer: f64,
}

/// The weight of the newest single-token step in [`Usage::decode_ms_per_layer`].
pub const DECODE_EWMA_WEIGHT: f64 = 0.1;

pub struct ShardHost {
    runtime: Runtime,
    manifest: Manifest,
    uav: String,
    plan: Option<SwarmPlan>,
    pieces: BTreeMap<usize, Shard>,
    request_id: u64,
    /// The newest request this UAV has heard of: an older one's messages are stale.
    newest_request: u64,
    /// Inputs of the successor's tail (outputs of its head replica), by position, as encoded
    /// for the tail: a replay sends these bytes, which decode to exactly what the tail was fed.
    buffer: BTreeMap<usize, Encoded>,
    codec: ActivationCodec,
    /// The predecessor's tail snapshot, accumulated, and the epoch of its latest part.
    pred_snapshot: Option<KvRows>,
    pred_snapshot_epoch: u64,
    snapshot_sent_until: usize,
    pending: Pending,
    pub usage: Usage,
}

impl ShardHost {
    pub fn new(runtime: Runtime, manifest: Manifest, uav: impl Into<String>) -> Result<Self> {
        if let Some(f) =
            manifest.layer_files_for(0, manifest.architecture.layers)?.iter().find(|f| f.end - f.start != 1)
        {
            return Err(DataPlaneError::GroupedFiles(f.name.clone()));
        }
        Ok(ShardHost {
            runtime,
            manifest,
            uav: uav.into(),
            plan: None,
            pieces: BTreeMap::new(),
            request_id: 0,
            newest_request: 0,
            buffer: BTreeMap::new(),
            codec: ActivationCodec::Raw,
            pred_snapshot: None,
            pred_snapshot_epoch: 0,
            snapshot_sent_until: 0,
            pending: Pending::default(),
            usage: Usage::default(),
        })
    }

    pub fn plan(&self) -> Option<&SwarmPlan> {
        self.plan.as_ref()
    }
    pub fn architecture(&self) -> &aerokv_engine::Architecture {
        &self.manifest.architecture
    }
    pub fn epoch(&self) -> u64 {
        self.plan.as_ref().map_or(0, |p| p.epoch)
    }
    /// True when this UAV can serve the current plan: its native layers are complete. A head
    /// replica still waiting for its seed does not count (it catches up when the seed arrives).
    pub fn ready(&self) -> bool {
        self.plan.as_ref().is_some_and(|p| p.stage(&self.uav).is_none() || self.pending.replay.is_none())
    }
    /// True while the successor's head replica waits for its seed (the successor's head is not
    /// protected yet: a failure of the successor now means an exact restart).
    pub fn replica_pending(&self) -> bool {
        !self.pending.seed_layers.is_empty()
    }
    pub fn my_stage(&self) -> Option<Stage> {
        self.plan.as_ref()?.stage(&self.uav).cloned()
    }
    pub fn replica_layers(&self) -> Vec<usize> {
        self.replica_of(self.plan.as_ref())
    }
    fn replica_of(&self, plan: Option<&SwarmPlan>) -> Vec<usize> {
        match plan {
            Some(p) => match (p.stage(&self.uav), p.succ(&self.uav)) {
                (Some(_), Some(s)) if s.uav != self.uav => p.head(s),
                _ => Vec::new(),
            },
            None => Vec::new(),
        }
    }
    /// Tokens in the native KV caches.
    pub fn kv_tokens(&self) -> usize {
        self.my_stage()
            .and_then(|s| self.plan.as_ref().map(|p| p.layers(&s)))
            .and_then(|ls| ls.iter().filter_map(|l| self.pieces.get(l)).map(Shard::kv_len).min())
            .unwrap_or(0)
    }
    /// What this UAV holds: the weights of its loaded layers (one [`Shard`] per absolute layer,
    /// so a layer that is both native and replica, or a replica promoted to native, is loaded
    /// once) and, for the request it serves, its KV rows, the predecessor's tail snapshot and
    /// the buffered inputs of the successor's tail.
    pub fn memory(&self) -> Memory {
        let mut weight_bytes = 0;
        let mut kv_bytes = 0;
        for s in self.pieces.values() {
            let m = s.memory_bytes();
            weight_bytes += m.weight_bytes;
            kv_bytes += m.kv_bytes;
        }
        kv_bytes += self.pred_snapshot.as_ref().map_or(0, |s| s.byte_len() as u64);
        kv_bytes += self.buffer.values().map(|h| h.bytes().len() as u64).sum::<u64>();
        let requests = if self.request_id == 0 {
            Vec::new()
        } else {
            vec![RequestMemory { request_id: self.request_id, kv_tokens: self.kv_tokens(), kv_bytes }]
        };
        Memory { weight_bytes, requests }
    }

    /// The swarm's activation codec (the assignment's). Every UAV must use the same one. The KV
    /// held for a request was computed under the codec it had: a change forgets it, so that a
    /// plan resuming that request fails (state lost) instead of mixing two arithmetics.
    pub fn set_activation_codec(&mut self, codec: ActivationCodec) {
        if codec != self.codec {
            tracing::info!(from = %self.codec, to = %codec, "activation codec changed");
            self.codec = codec;
            self.forget_context();
        }
    }

    /// An input as this UAV's layers see it (and checks it is in the plan's codec).
    fn decode(&self, e: &Encoded) -> Result<Hidden> {
        if e.codec() != self.codec {
            return Err(DataPlaneError::CodecMismatch { got: e.codec(), want: self.codec });
        }
        Ok(Hidden::new(e.decode()?, e.width())?)
    }

    fn encode(&self, h: &Hidden) -> Result<Encoded> {
        Ok(Encoded::encode(self.codec, h.as_slice(), h.width())?)
    }

    fn load(&self, layer: usize) -> Result<Shard> {
        Ok(Shard::load(&self.runtime, &self.manifest, layer..layer + 1)?)
    }

    /// Makes `request_id` the request held (forgetting another's context), unless it is older
    /// than one already heard of.
    fn new_request(&mut self, request_id: u64) -> Result<()> {
        if request_id < self.newest_request {
            return Err(DataPlaneError::StaleRequest { request: request_id, newest: self.newest_request });
        }
        self.newest_request = request_id;
        if request_id != self.request_id {
            self.request_id = request_id;
            self.forget_context();
        }
        Ok(())
    }

    /// Every KV row, buffered input and snapshot of the request: it starts (again) from token 0.
    fn forget_context(&mut self) {
        for s in self.pieces.values_mut() {
            s.reset();
        }
        self.buffer.clear();
        self.pred_snapshot = None;
        self.snapshot_sent_until = 0;
    }

    /// The request this UAV's caches belong to (0 = none yet).
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// How far this UAV could restore its predecessor's tail now (for the heartbeat, and from
    /// there the scheduler's `replay_from`): the snapshot's rows when they cover every layer of
    /// that tail in the current plan, else 0. Never more than a restore later in this epoch
    /// finds: a snapshot from an older epoch counts only up to the resume position, because the
    /// predecessor's first snapshot of this epoch replaces it with that many rows.
    pub fn pred_snapshot_tokens(&self) -> usize {
        let (Some(plan), Some(s)) = (&self.plan, &self.pred_snapshot) else { return 0 };
        let Some(pred) = plan.pred(&self.uav).filter(|p| p.uav != self.uav) else { return 0 };
        let tail = plan.tail(pred);
        if s.token_start != 0 || tail.is_empty() || !tail.iter().all(|&l| layer_rows(s, l).is_some()) {
            return 0;
        }
        if self.pred_snapshot_epoch == plan.epoch {
            s.tokens
        } else {
            s.tokens.min(plan.resume_position)
        }
    }

    /// Applies a new plan (epoch). Returns what to send now (replays for a failed successor's
    /// tail, and, once complete, seeds and snapshots for the new neighbours).
    pub fn apply_plan(&mut self, new: SwarmPlan) -> Result<Vec<Emit>> {
        new.validate()?;
        let old = self.plan.take();
        let p = new.resume_position;
        let mut emits = Vec::new();
        if new.request_id != self.request_id || p == 0 {
            self.request_id = new.request_id;
            self.newest_request = self.newest_request.max(new.request_id);
            self.forget_context();
        }
        // A failed successor: its recovering successor needs the buffered inputs of its tail.
        let mut local_replay = None;
        if let (Some(old), true) = (&old, p > 0) {
            if let Some(failed) = old.succ(&self.uav).filter(|s| s.uav != self.uav && new.stage(&s.uav).is_none()) {
                if let (Some(to), Some(boundary)) = (old.succ(&failed.uav), old.tail_input_from_pred(failed)) {
                    // From the step that holds `replay_from`: the rest is in the snapshot.
                    let chunks: Vec<(usize, Encoded)> = self
                        .buffer
                        .range(..p)
                        .filter(|(&pos, h)| pos + h.rows() > new.replay_from)
                        .map(|(&pos, h)| (pos, h.clone()))
                        .collect();
                    if to.uav == self.uav {
                        // A ring of two: the recovering successor is this UAV.
                        local_replay = Some((boundary, chunks));
                    } else if !chunks.is_empty() {
                        emits.push(Emit::Replay {
                            failed: failed.uav.clone(),
                            to: to.uav.clone(),
                            boundary,
                            request_id: self.request_id,
                            chunks,
                        });
                    }
                }
            }
        }
        self.buffer.retain(|&pos, _| pos < p);
        if let Some(snap) = &self.pred_snapshot {
            if snap.token_start != 0 {
                self.pred_snapshot = None;
            }
        }

        let mut pending = Pending { announce: p > 0, ..Pending::default() };
        let Some(me) = new.stage(&self.uav).cloned() else {
            // Not a member of this plan: hold nothing.
            self.pieces.clear();
            self.plan = Some(new);
            self.pending = pending;
            return Ok(emits);
        };
        let native = new.layers(&me);
        let replica = self.replica_of(Some(&new));
        let mut keep = BTreeMap::new();
        let mut restored = Vec::new();
        for &layer in native.iter().chain(replica.iter()) {
            if keep.contains_key(&layer) {
                continue;
            }
            if let Some(mut shard) = self.pieces.remove(&layer) {
                shard.truncate(p)?;
                if shard.kv_len() == p {
                    keep.insert(layer, shard);
                    continue;
                }
                // Fewer rows than needed (e.g. a replica that missed tokens): treat as not held.
            }
            let mut shard = self.load(layer)?;
            if p > 0 && native.contains(&layer) {
                // The failed predecessor's tail: its last snapshot, or nothing when none was due
                // yet; the replay of its buffered inputs brings it to the resume position.
                let tail_of_pred = old.as_ref().is_some_and(|o| {
                    o.pred(&self.uav)
                        .is_some_and(|f| f.uav != self.uav && new.stage(&f.uav).is_none() && o.tail(f).contains(&layer))
                });
                if !tail_of_pred {
                    return Err(DataPlaneError::LostLayer { uav: self.uav.clone(), layer, position: p });
                }
                let snap = self.pred_snapshot.as_ref().and_then(|s| layer_rows(s, layer).map(|r| (s, r)));
                match snap {
                    Some((s, rows)) => {
                        let upto = s.tokens.min(p);
                        shard.import_kv(&single_layer(s, rows, upto))?;
                        restored.push((layer, upto));
                    }
                    None => restored.push((layer, 0)),
                }
            } else if p > 0 {
                pending.seed_layers.push(layer);
            }
            keep.insert(layer, shard);
        }
        self.pieces = keep;
        if !restored.is_empty() {
            let from = restored.iter().map(|r| r.1).min().unwrap_or(0);
            let mut segments: Vec<Segment> = Vec::new();
            for &(layer, _) in &restored {
                if let Some(s) = self.pieces.get_mut(&layer) {
                    s.truncate(from)?;
                }
                // In pipeline order; the run breaks only where the gateway's input enters.
                match segments.last_mut() {
                    Some(seg) if layer != 0 => seg.layers.push(layer),
                    _ => segments.push(Segment { layers: vec![layer], chunks: BTreeMap::new() }),
                }
            }
            let failed = old.as_ref().and_then(|o| o.pred(&self.uav)).map(|s| s.uav.clone()).unwrap_or_default();
            pending.replay = Some(PendingReplay { failed, from, segments });
        }
        self.plan = Some(new);
        self.pending = pending;
        if let (Some(r), Some((boundary, chunks))) = (&mut self.pending.replay, local_replay) {
            if let Some(seg) = r.segment(boundary) {
                seg.chunks.extend(chunks);
            }
        }
        emits.extend(self.try_complete()?);
        Ok(emits)
    }

    /// Runs pending replays and sends seeds once possible.
    fn try_complete(&mut self) -> Result<Vec<Emit>> {
        let Some(plan) = self.plan.clone() else { return Ok(Vec::new()) };
        let p = plan.resume_position;
        if let Some(r) = &self.pending.replay {
            // Complete when every segment's chunks cover [from, p) exactly.
            let covers = |seg: &Segment| {
                let mut at = r.from;
                for (&pos, h) in seg.chunks.range(r.from..) {
                    if pos != at {
                        break;
                    }
                    at += h.rows();
                }
                at >= p
            };
            if !r.segments.iter().all(covers) {
                return Ok(Vec::new());
            }
            let r = self.pending.replay.take().expect("checked above");
            for seg in &r.segments {
                tracing::info!(failed = %r.failed, layers = ?seg.layers, from = r.from, to = p, chunks = seg.chunks.len(), "replaying buffered inputs through the recovered tail");
                for (&pos, h) in seg.chunks.range(r.from..p) {
                    // One chunk at a time, as the failed UAV computed them (exactness).
                    let x = self.decode(h)?;
                    run_layers(&mut self.pieces, self.codec, &seg.layers, x, pos)?;
                }
            }
        }
        let mut emits = Vec::new();
        if self.pending.announce {
            self.pending.announce = false;
            let me = plan.stage(&self.uav).cloned();
            if let Some(me) = me {
                let (pred, succ) = (plan.pred(&self.uav).cloned(), plan.succ(&self.uav).cloned());
                if let Some(pred) = pred.filter(|s| s.uav != self.uav) {
                    let head = plan.head(&me);
                    if !head.is_empty() {
                        emits.push(Emit::Kv {
                            holder: pred.uav,
                            request_id: self.request_id,
                            rows: self.export(&head, 0..p)?,
                        });
                    }
                }
                if let Some(succ) = succ.filter(|s| s.uav != self.uav) {
                    let tail = plan.tail(&me);
                    if me.t > 0 && !tail.is_empty() {
                        emits.push(Emit::Kv {
                            holder: succ.uav,
                            request_id: self.request_id,
                            rows: self.export(&tail, 0..p)?,
                        });
                    }
                }
                self.snapshot_sent_until = p;
            }
        }
        Ok(emits)
    }

    fn export(&self, layers: &[usize], tokens: std::ops::Range<usize>) -> Result<KvRows> {
        // In pipeline order: a wrapped interval (29, 0, 1) travels as one contiguous range mod L.
        let mut out: Option<KvRows> = None;
        for &layer in layers {
            let shard = self
                .pieces
                .get(&layer)
                .ok_or_else(|| DataPlaneError::Plan(format!("export of layer {layer}, not held")))?;
            let rows = shard.export_kv(layer..layer + 1, tokens.clone())?;
            match &mut out {
                None => out = Some(rows),
                Some(o) => o.layers.extend(rows.layers),
            }
        }
        out.ok_or_else(|| DataPlaneError::Plan("export of no layers".into()))
    }

    /// Hidden states for this UAV's native layers starting at `boundary`: returns the output for
    /// the next stage (or the gateway). Call [`ShardHost::snapshot_due`] once it is on its way.
    pub fn on_input(
        &mut self,
        request_id: u64,
        boundary: usize,
        position: usize,
        input: &Encoded,
    ) -> Result<Vec<Emit>> {
        // Runs once per token: the route comes from a borrow of the plan, not a copy of it.
        let (misrouted, end, to, num_layers) = {
            let plan = self.plan.as_ref().ok_or_else(|| DataPlaneError::Plan("input before any plan".into()))?;
            let me = plan
                .stage(&self.uav)
                .ok_or_else(|| DataPlaneError::Plan(format!("{} has no layers in epoch {}", self.uav, plan.epoch)))?;
            let misrouted = (!plan.holds(me, boundary))
                .then(|| format!("input at layer {boundary}, but {} holds {:?}", self.uav, plan.layers(me)));
            // From `boundary` to this stage's last layer or the model's last, whichever comes first.
            let end = (boundary..plan.num_layers).find(|&l| !plan.holds(me, l)).unwrap_or(plan.num_layers);
            let to = if end == plan.num_layers { None } else { plan.owner(end).map(|s| s.uav.clone()) };
            (misrouted, end, to, plan.num_layers)
        };
        if let Some(why) = misrouted {
            return Err(DataPlaneError::Plan(why));
        }
        // Checked and decoded before anything changes: a malformed, stale or repeated message
        // leaves the state as it was.
        if request_id == self.request_id {
            let held = self.pieces.get(&boundary).map_or(0, Shard::kv_len);
            if position < held {
                return Err(DataPlaneError::Duplicate { position, layer: boundary, held });
            }
        }
        let x = self.decode(input)?;
        self.new_request(request_id)?;
        let started = std::time::Instant::now();
        let layers: Vec<usize> = (boundary..end).collect();
        let y = run_layers(&mut self.pieces, self.codec, &layers, x, position)?;
        let hidden = self.encode(&y)?;
        self.account(started.elapsed(), end - boundary, input.rows());
        Ok(vec![Emit::Activation { to, boundary: end % num_layers, request_id, position, hidden }])
    }

    /// The successor's input: compute its head replica and buffer the output (its tail's input).
    pub fn on_successor_input(
        &mut self,
        request_id: u64,
        boundary: usize,
        position: usize,
        input: &Encoded,
    ) -> Result<()> {
        let succ_has_tail = match self.plan.as_ref().map(|p| (p, p.succ(&self.uav))) {
            Some((plan, Some(succ))) if succ.uav != self.uav && boundary == succ.start => {
                plan.tail_input_from_pred(succ).is_some()
            }
            _ => return Ok(()),
        };
        if !self.pending.seed_layers.is_empty() {
            // Checked now (a malformed input is refused as it would be seeded), computed later.
            self.decode(input)?;
            self.pending.seed_inputs.push((request_id, position, input.clone()));
            return Ok(());
        }
        self.run_replica(request_id, position, input, succ_has_tail)
    }

    /// The head replica's step for the successor's input at `position`, and the buffered input of
    /// the successor's tail.
    fn run_replica(&mut self, request_id: u64, position: usize, input: &Encoded, succ_has_tail: bool) -> Result<()> {
        let head = self.replica_layers();
        let x = self.decode(input)?;
        self.new_request(request_id)?;
        let started = std::time::Instant::now();
        let y = run_layers(&mut self.pieces, self.codec, &head, x, position)?;
        self.account(started.elapsed(), head.len(), input.rows());
        // With no head (K = 0) the tail's input is the stage input itself. A tail that starts
        // at layer 0 is fed by the gateway: the scheduler replays it.
        if succ_has_tail {
            let tail_input = if head.is_empty() { input.clone() } else { self.encode(&y)? };
            self.buffer.insert(position, tail_input);
        }
        Ok(())
    }

    /// KV rows from another UAV: the predecessor's tail snapshot, or the successor's head seed.
    pub fn on_kv(&mut self, source: &str, request_id: u64, rows: KvRows) -> Result<Vec<Emit>> {
        let Some(plan) = self.plan.clone() else { return Ok(Vec::new()) };
        self.new_request(request_id)?;
        // In a ring of two the successor is also the predecessor: its seed and its tail snapshot
        // come from the same UAV; the layers they carry tell them apart.
        let seed = plan.succ(&self.uav).is_some_and(|s| s.uav == source)
            && !self.pending.seed_layers.is_empty()
            && self.pending.seed_layers.iter().all(|&l| layer_rows(&rows, l).is_some());
        if seed {
            for layer in std::mem::take(&mut self.pending.seed_layers) {
                let shard = self
                    .pieces
                    .get_mut(&layer)
                    .ok_or_else(|| DataPlaneError::Plan(format!("seed for layer {layer}, not loaded")))?;
                if let Some(r) = layer_rows(&rows, layer) {
                    shard.import_kv(&single_layer(&rows, r, rows.tokens))?;
                }
            }
            let caught_up = std::mem::take(&mut self.pending.seed_inputs);
            tracing::info!(%source, tokens = rows.tokens, inputs_after = caught_up.len(), "head replica seeded");
            let succ_has_tail = plan.succ(&self.uav).is_some_and(|s| plan.tail_input_from_pred(s).is_some());
            for (request, position, input) in caught_up {
                if request == self.request_id && position >= rows.tokens {
                    self.run_replica(request, position, &input, succ_has_tail)?;
                }
            }
        }
        if plan.pred(&self.uav).is_some_and(|s| s.uav == source) && plan.stage(source).is_some_and(|s| s.t > 0) {
            let tail = plan.stage(source).map(|s| plan.tail(s)).unwrap_or_default();
            let mut ls: Vec<usize> = rows.layers.iter().map(|l| l.layer).collect();
            ls.sort_unstable();
            let mut want = tail.clone();
            want.sort_unstable();
            if ls == want {
                match (&mut self.pred_snapshot, rows.token_start) {
                    (_, 0) => {
                        self.pred_snapshot = Some(rows);
                        self.pred_snapshot_epoch = plan.epoch;
                    }
                    (Some(s), _) if s.token_start + s.tokens == rows.token_start => {
                        s.append(&rows)?;
                        self.pred_snapshot_epoch = plan.epoch;
                    }
                    (s, start) => {
                        tracing::warn!(start, held = ?s.as_ref().map(|s| s.tokens), "snapshot out of order, ignored")
                    }
                }
            }
        }
        self.try_complete()
    }

    /// Inputs of a failed UAV's tail entering layer `boundary`, for the replay: buffered by its
    /// predecessor, or the gateway's embeddings for the layers after the gateway.
    pub fn on_replay(&mut self, failed: &str, boundary: usize, chunks: Vec<(usize, Encoded)>) -> Result<Vec<Emit>> {
        tracing::debug!(
            failed,
            boundary,
            chunks = chunks.len(),
            waiting = self.pending.replay.is_some(),
            "replay received"
        );
        match self.pending.replay.as_mut().filter(|r| r.failed == failed).map(|r| r.segment(boundary)) {
            Some(Some(seg)) => {
                seg.chunks.extend(chunks);
                self.try_complete()
            }
            Some(None) => Err(DataPlaneError::Plan(format!(
                "replay of {failed} at layer {boundary}: no restored layers start there"
            ))),
            None => Ok(Vec::new()),
        }
    }

    /// The boundary snapshot owed to the successor after the last step, if `t` tokens have
    /// accumulated since the previous one. Separate from [`ShardHost::on_input`] so that the
    /// step's output leaves first and the next drone computes while this one exports and sends
    /// ~1 MB of KV rows. Call it before the next input.
    pub fn snapshot_due(&mut self) -> Result<Vec<Emit>> {
        // Called after every step: borrows the plan, copies only when a snapshot is due.
        let Some(plan) = &self.plan else { return Ok(Vec::new()) };
        let Some(me) = plan.stage(&self.uav) else { return Ok(Vec::new()) };
        let Some(succ) = plan.succ(&self.uav).filter(|s| s.uav != self.uav) else { return Ok(Vec::new()) };
        let tail = plan.tail(me);
        if me.t == 0 || tail.is_empty() {
            return Ok(Vec::new());
        }
        let upto = tail.iter().filter_map(|l| self.pieces.get(l)).map(Shard::kv_len).min().unwrap_or(0);
        if upto < self.snapshot_sent_until + me.t {
            return Ok(Vec::new());
        }
        let holder = succ.uav.clone();
        let rows = self.export(&tail, self.snapshot_sent_until..upto)?;
        self.snapshot_sent_until = upto;
        Ok(vec![Emit::Kv { holder, request_id: self.request_id, rows }])
    }

    fn account(&mut self, took: Duration, layers: usize, tokens: usize) {
        self.usage.compute += took;
        self.usage.computed_layer_tokens += (layers * tokens) as u64;
        if layers > 0 && tokens == 1 {
            self.usage.decode_compute += took;
            self.usage.decode_layer_tokens += layers as u64;
            let ms = took.as_secs_f64() * 1e3 / layers as f64;
            let u = &mut self.usage;
            u.decode_ms_per_layer = if u.decode_ms_per_layer > 0.0 {
                u.decode_ms_per_layer + DECODE_EWMA_WEIGHT * (ms - u.decode_ms_per_layer)
            } else {
                ms
            };
        }
    }
}

/// Runs `x` through `layers` in order and returns the last one's output. Every layer after the
/// first is fed its predecessor's output as `codec` delivers it (module comment: exactness).
/// With no layers, `x` itself.
fn run_layers(
    pieces: &mut BTreeMap<usize, Shard>,
    codec: ActivationCodec,
    layers: &[usize],
    mut x: Hidden,
    position: usize,
) -> Result<Hidden> {
    for (i, layer) in layers.iter().enumerate() {
        if i > 0 && !codec.is_exact() {
            x = Hidden::new(codec.round_trip(x.as_slice(), x.width())?, x.width())?;
        }
        let shard = pieces.get_mut(layer).ok_or_else(|| DataPlaneError::Plan(format!("layer {layer} not loaded")))?;
        x = shard.forward(&x, position)?;
    }
    Ok(x)
}

fn layer_rows(rows: &KvRows, layer: usize) -> Option<&LayerRows> {
    rows.layers.iter().find(|l| l.layer == layer)
}

/// The first `tokens` rows of one layer of a snapshot, as a snapshot of its own.
fn single_layer(all: &KvRows, rows: &LayerRows, tokens: usize) -> KvRows {
    let (h, d, n) = (all.kv_heads, all.head_dim, all.tokens);
    // Rows are [heads, tokens, dim]: keep the first `tokens` of every head.
    let cut = |v: &[f32]| -> Vec<f32> {
        let mut out = Vec::with_capacity(h * tokens * d);
        for head in 0..h {
            out.extend_from_slice(&v[head * n * d..head * n * d + tokens * d]);
        }
        out
    };
    KvRows {
        token_start: all.token_start,
        tokens,
        kv_heads: h,
        head_dim: d,
        layers: vec![LayerRows { layer: rows.layer, key: cut(&rows.key), value: cut(&rows.value) }],
    }
}
