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
use std::collections::{BTreeMap, BTreeSet, VecDeque};
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
    /// A message of a request this UAV holds nothing for: finished, or not started here (a
    /// request starts with its step at position 0; a later one is a straggler of a request a
    /// plan dropped).
    #[error("a message of request {request} at position {position}, {why}: dropped")]
    StaleRequest { request: u64, position: usize, why: Stale },
    /// An input for a position whose step has already run (a resent or replayed copy).
    #[error("an input of request {request} for position {position} at layer {layer}, which already holds {held} tokens: dropped")]
    Duplicate { request: u64, position: usize, layer: usize, held: usize },
    /// A new request while this UAV holds as many as it may: refused (the scheduler keeps
    /// fewer in flight).
    #[error("request {request} refused: this UAV already holds {held} requests (at most {MAX_CARRIED_REQUESTS})")]
    TooManyRequests { request: u64, held: usize },
}

/// Why a request's message is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    #[error("a request that has finished")]
    Finished,
    #[error("a request not started here (its first step is at position 0)")]
    NotStarted,
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
    /// Hidden states entering layer `boundary`, encoded; `to` is its owner, `None` = back to the
    /// gateway. `context_tokens`: the request's KV capacity as this UAV learned it (0 = unknown).
    Activation {
        to: Option<String>,
        boundary: usize,
        request_id: u64,
        position: usize,
        hidden: Encoded,
        context_tokens: usize,
    },
    /// KV rows for `holder`: a boundary snapshot of this UAV's tail (to its successor) or the
    /// seed of a new head replica (to its predecessor).
    Kv { holder: String, request_id: u64, rows: KvRows },
    /// Buffered inputs of the failed successor's tail entering layer `boundary`, for its
    /// recovering successor. All of them in one message (bursts of small messages overflow
    /// subscription queues), as `(position, chunk)` in order.
    Replay {
        failed: String,
        to: String,
        boundary: usize,
        request_id: u64,
        chunks: Vec<(usize, Encoded)>,
        context_tokens: usize,
    },
}

/// Finished requests a host remembers (the most recent ones): their stragglers are dropped.
pub const FINISHED_REMEMBERED: usize = 256;

/// What one request holds on one UAV besides its rows in the shared [`Shard`]s, and its
/// recovery work waiting for state from other UAVs.
#[derive(Debug, Default)]
struct Context {
    /// Inputs of the successor's tail (outputs of its head replica), by position, as encoded
    /// for the tail: a replay sends these bytes, which decode to exactly what the tail was fed.
    buffer: BTreeMap<usize, Encoded>,
    /// The predecessor's tail snapshot, accumulated, and the epoch of its latest part.
    pred_snapshot: Option<KvRows>,
    pred_snapshot_epoch: u64,
    /// This UAV's tail rows already sent to its successor.
    snapshot_sent_until: usize,
    /// Where the current plan resumed the request (0: from scratch, or started in this epoch).
    resume: usize,
    /// Restored tail layers of the failed predecessor, to be brought from the snapshot end to
    /// the resume position by replaying buffered inputs.
    replay: Option<PendingReplay>,
    /// Replica layers waiting for the successor's head seed of this request.
    seed_layers: Vec<usize>,
    /// The successor's inputs that arrived before its head seed, `(position, input)` in arrival
    /// order: the replica computes them once seeded. Serving does not wait for the seed (over a
    /// radio it is paced behind the activations and takes a second or more); only the
    /// protection of the successor's head does.
    seed_inputs: Vec<(usize, Encoded)>,
    /// Seeds and snapshots to send once the native layers are complete.
    announce: bool,
    /// The request's prompt + maximum answer, from its activations (the largest figure seen;
    /// 0 = unknown): the capacity of its caches on every layer here (docs/design.md, Memory).
    context_tokens: usize,
}

impl Context {
    /// Learns the request's `context_tokens` (the largest figure seen; 0 = unknown): returns
    /// what its caches are sized for.
    fn learn(&mut self, context_tokens: usize) -> usize {
        self.context_tokens = self.context_tokens.max(context_tokens);
        self.context_tokens
    }
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
    /// One entry per request held (per context), by request id.
    pub requests: Vec<RequestMemory>,
}

/// What one request occupies on one UAV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestMemory {
    pub request_id: u64,
    /// Rows in the native KV caches.
    pub kv_tokens: usize,
    pub kv_bytes: u64,
    /// How far this UAV could restore its predecessor's tail of this request
    /// ([`ShardHost::pred_snapshot_tokens`]), never more than `kv_tokens` (a lower bound either
    /// way: this UAV's rows cover every position the gateway has an answer for).
    pub pred_snapshot_tokens: usize,
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
    /// The loaded layers, shared by every request (weights once); each holds one KV cache per
    /// request ([`Shard::switch_request`]).
    pieces: BTreeMap<usize, Shard>,
    /// Every request held, by id.
    contexts: BTreeMap<u64, Context>,
    /// The request of the latest native step (after a plan: the plan's request): the
    /// heartbeat's top-level figures are its.
    recent: u64,
    /// The request whose native step ran last, until its snapshot was considered.
    stepped: Option<u64>,
    /// Finished requests, oldest first, at most [`FINISHED_REMEMBERED`].
    finished: VecDeque<u64>,
    codec: ActivationCodec,
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
            contexts: BTreeMap::new(),
            recent: 0,
            stepped: None,
            finished: VecDeque::new(),
            codec: ActivationCodec::Raw,
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
    /// True when this UAV can serve the current plan: its native layers are complete for every
    /// request it holds (no replay pending). A head replica still waiting for a seed does not
    /// count (it catches up when the seed arrives).
    pub fn ready(&self) -> bool {
        self.plan
            .as_ref()
            .is_some_and(|p| p.stage(&self.uav).is_none() || self.contexts.values().all(|c| c.replay.is_none()))
    }
    /// True while the successor's head replica waits for a seed of some request (the
    /// successor's head is not protected yet: a failure of the successor now means an exact
    /// restart).
    pub fn replica_pending(&self) -> bool {
        self.contexts.values().any(|c| !c.seed_layers.is_empty())
    }
    /// The requests whose part of the head replica waits for the successor's seed.
    pub fn seeds_pending(&self) -> Vec<u64> {
        self.contexts.iter().filter(|(_, c)| !c.seed_layers.is_empty()).map(|(&id, _)| id).collect()
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
    /// Every request held (one context each), in id order.
    pub fn requests(&self) -> Vec<u64> {
        self.contexts.keys().copied().collect()
    }
    /// Tokens of `request` in the native KV caches.
    pub fn kv_tokens(&self, request: u64) -> usize {
        let Some(plan) = &self.plan else { return 0 };
        let Some(me) = plan.stage(&self.uav) else { return 0 };
        plan.layers(me).iter().filter_map(|l| self.pieces.get(l)).map(|s| rows_of(s, request)).min().unwrap_or(0)
    }
    /// The capacity of `request`'s KV caches on every loaded layer where they are allocated,
    /// `(layer, tokens)` in layer order.
    pub fn kv_capacity(&self, request: u64) -> Vec<(usize, usize)> {
        self.pieces.iter().filter_map(|(&l, s)| s.kv_capacity_of(request).map(|c| (l, c))).collect()
    }
    /// KV bytes allocated on this UAV, every request's caches at their capacities (address
    /// space; pages become resident as rows are written).
    pub fn kv_reserved_bytes(&self) -> u64 {
        self.pieces.values().map(|s| s.memory_bytes().kv_reserved_bytes).sum()
    }
    /// What this UAV holds: the weights of its loaded layers (one [`Shard`] per absolute layer,
    /// so a layer that is both native and replica, or a replica promoted to native, is loaded
    /// once) and, for every request it holds, its KV rows, the predecessor's tail snapshot and
    /// the buffered inputs of the successor's tail.
    pub fn memory(&self) -> Memory {
        let weight_bytes = self.pieces.values().map(|s| s.memory_bytes().weight_bytes).sum();
        let per_row = self.manifest.architecture.kv_bytes_per_token_per_layer();
        let requests = self
            .contexts
            .iter()
            .map(|(&id, c)| {
                let rows: u64 = self.pieces.values().map(|s| rows_of(s, id) as u64).sum();
                let kv_bytes = rows * per_row
                    + c.pred_snapshot.as_ref().map_or(0, |s| s.byte_len() as u64)
                    + c.buffer.values().map(|h| h.bytes().len() as u64).sum::<u64>();
                let kv_tokens = self.kv_tokens(id);
                let pred_snapshot_tokens = self.pred_snapshot_tokens(id).min(kv_tokens);
                RequestMemory { request_id: id, kv_tokens, kv_bytes, pred_snapshot_tokens }
            })
            .collect();
        Memory { weight_bytes, requests }
    }

    /// The swarm's activation codec (the assignment's). Every UAV must use the same one. The KV
    /// held for a request was computed under the codec it had: a change forgets every request,
    /// so that a plan resuming one fails (state lost) instead of mixing two arithmetics.
    pub fn set_activation_codec(&mut self, codec: ActivationCodec) {
        if codec != self.codec {
            tracing::info!(from = %self.codec, to = %codec, "activation codec changed");
            self.codec = codec;
            for id in self.requests() {
                self.drop_context(id);
            }
        }
    }

    fn encode(&self, h: &Hidden) -> Result<Encoded> {
        Ok(Encoded::encode(self.codec, h.as_slice(), h.width())?)
    }

    fn load(&self, layer: usize) -> Result<Shard> {
        Ok(Shard::load(&self.runtime, &self.manifest, layer..layer + 1)?)
    }

    fn is_finished(&self, request: u64) -> bool {
        self.finished.contains(&request)
    }

    /// Whether a message of `request` at `position` may be used, before anything changes: a
    /// request held, or the first step (position 0) of a new one while there is room for it.
    fn admit(&self, request: u64, position: usize) -> Result<()> {
        let stale = |why| Err(DataPlaneError::StaleRequest { request, position, why });
        if self.is_finished(request) {
            return stale(Stale::Finished);
        }
        if self.contexts.contains_key(&request) {
            return Ok(());
        }
        if request == 0 || position != 0 {
            return stale(Stale::NotStarted);
        }
        if self.contexts.len() >= MAX_CARRIED_REQUESTS {
            return Err(DataPlaneError::TooManyRequests { request, held: self.contexts.len() });
        }
        Ok(())
    }

    /// The context of `request`, made (with empty caches) if it has none.
    fn open(&mut self, request: u64) -> &mut Context {
        if !self.contexts.contains_key(&request) {
            for s in self.pieces.values_mut() {
                s.drop_request(request);
            }
        }
        self.contexts.entry(request).or_default()
    }

    /// Forgets `request`: its KV caches on every layer, its snapshot, buffer and recovery work.
    fn drop_context(&mut self, request: u64) {
        self.contexts.remove(&request);
        for s in self.pieces.values_mut() {
            s.drop_request(request);
        }
        if self.stepped == Some(request) {
            self.stepped = None;
        }
    }

    /// `request` is over (its last token went out): its caches and context are freed, and its
    /// late messages (any position) are dropped as [`DataPlaneError::StaleRequest`] from now on.
    pub fn finish_request(&mut self, request: u64) {
        self.drop_context(request);
        if !self.is_finished(request) {
            if self.finished.len() == FINISHED_REMEMBERED {
                self.finished.pop_front();
            }
            self.finished.push_back(request);
        }
    }

    /// The request of the latest native step (after a plan: the plan's request; 0 = none yet).
    pub fn request_id(&self) -> u64 {
        self.recent
    }

    /// How far this UAV could restore its predecessor's tail of `request` now (for the
    /// heartbeat, and from there the scheduler's `replay_from`): the snapshot's rows when they
    /// cover every layer of that tail in the current plan, else 0. Never more than a restore later
    /// in this epoch finds: a snapshot from an older epoch counts only up to the request's resume
    /// position, because the predecessor's first snapshot of this epoch replaces it with that
    /// many rows.
    pub fn pred_snapshot_tokens(&self, request: u64) -> usize {
        let (Some(plan), Some(c)) = (&self.plan, self.contexts.get(&request)) else { return 0 };
        let Some(s) = &c.pred_snapshot else { return 0 };
        let Some(pred) = plan.pred(&self.uav).filter(|p| p.uav != self.uav) else { return 0 };
        let tail = plan.tail(pred);
        if s.token_start != 0 || tail.is_empty() || !tail.iter().all(|&l| layer_rows(s, l).is_some()) {
            return 0;
        }
        if c.pred_snapshot_epoch == plan.epoch {
            s.tokens
        } else {
            s.tokens.min(c.resume)
        }
    }

    /// Applies a new plan (epoch). Every request it carries ([`SwarmPlan::carried`]) keeps its
    /// state, cut back to its resume position; the others are forgotten. Returns what to send now
    /// (replays for a failed successor's tail, and, once complete, seeds and snapshots for the new
    /// neighbours), per carried request.
    pub fn apply_plan(&mut self, new: SwarmPlan) -> Result<Vec<Emit>> {
        new.validate()?;
        // A finished request carried from scratch needs nothing; carried further it cannot be
        // resumed here (its state is gone): the layers below say so.
        let carried: Vec<RequestResume> =
            new.carried().into_iter().filter(|r| r.resume_position > 0 || !self.is_finished(r.request_id)).collect();
        let old = self.plan.take();
        self.stepped = None;
        let kept: BTreeSet<u64> = carried.iter().map(|r| r.request_id).collect();
        for id in self.requests().into_iter().filter(|id| !kept.contains(id)) {
            self.drop_context(id);
        }
        for r in &carried {
            if r.resume_position == 0 {
                self.drop_context(r.request_id);
            }
            if !self.is_finished(r.request_id) {
                let c = self.open(r.request_id);
                let p = r.resume_position;
                c.resume = p;
                (c.replay, c.announce) = (None, p > 0);
                c.seed_layers.clear();
                c.seed_inputs.clear();
                c.snapshot_sent_until = c.snapshot_sent_until.min(p);
            }
        }
        let mut emits = Vec::new();
        // A failed successor: its recovering successor needs the buffered inputs of its tail,
        // for every request carried.
        let mut local_replays = Vec::new();
        if let Some(old) = &old {
            if let Some(failed) = old.succ(&self.uav).filter(|s| s.uav != self.uav && new.stage(&s.uav).is_none()) {
                if let (Some(to), Some(boundary)) = (old.succ(&failed.uav), old.tail_input_from_pred(failed)) {
                    for r in carried.iter().filter(|r| r.resume_position > 0) {
                        let Some(c) = self.contexts.get(&r.request_id) else { continue };
                        // From the step that holds `replay_from`: the rest is in the snapshot.
                        let chunks: Vec<(usize, Encoded)> = c
                            .buffer
                            .range(..r.resume_position)
                            .filter(|(&pos, h)| pos + h.rows() > r.replay_from)
                            .map(|(&pos, h)| (pos, h.clone()))
                            .collect();
                        if to.uav == self.uav {
                            // A ring of two: the recovering successor is this UAV.
                            local_replays.push((r.request_id, boundary, chunks));
                        } else if !chunks.is_empty() {
                            emits.push(Emit::Replay {
                                failed: failed.uav.clone(),
                                to: to.uav.clone(),
                                boundary,
                                request_id: r.request_id,
                                chunks,
                                context_tokens: c.context_tokens,
                            });
                        }
                    }
                }
            }
        }
        for r in &carried {
            if let Some(c) = self.contexts.get_mut(&r.request_id) {
                c.buffer.retain(|&pos, _| pos < r.resume_position);
                if c.pred_snapshot.as_ref().is_some_and(|s| s.token_start != 0) {
                    c.pred_snapshot = None;
                }
            }
        }

        let Some(me) = new.stage(&self.uav).cloned() else {
            // Not a member of this plan: hold nothing.
            self.pieces.clear();
            self.contexts.clear();
            self.recent = new.request_id;
            self.plan = Some(new);
            return Ok(emits);
        };
        let native = new.layers(&me);
        let replica = self.replica_of(Some(&new));
        // The failed predecessor's tail: restored here from its snapshot and a replay.
        let failed_pred = old.as_ref().and_then(|o| {
            o.pred(&self.uav)
                .filter(|f| f.uav != self.uav && new.stage(&f.uav).is_none())
                .map(|f| (f.uav.clone(), o.tail(f)))
        });
        let resuming: Vec<(u64, usize)> =
            carried.iter().filter(|r| r.resume_position > 0).map(|r| (r.request_id, r.resume_position)).collect();
        let mut keep: BTreeMap<usize, Shard> = BTreeMap::new();
        let mut restore: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let mut lost = None;
        'layers: for &layer in native.iter().chain(replica.iter()) {
            if keep.contains_key(&layer) {
                continue;
            }
            let mut shard = match self.pieces.remove(&layer) {
                Some(s) => s,
                None => match self.load(layer) {
                    Ok(s) => s,
                    Err(e) => {
                        lost = Some(e);
                        break 'layers;
                    }
                },
            };
            let is_native = native.contains(&layer);
            for &(id, p) in &resuming {
                let intact = !self.is_finished(id) && {
                    shard.switch_request(id)?;
                    shard.truncate(p)?;
                    shard.kv_len() == p
                };
                if intact {
                    continue;
                }
                // Fewer rows than needed (a layer new here, a replica that missed tokens): this
                // request's rows on it start over, restored from the failed predecessor's
                // snapshot or the successor's seed; the other requests' rows stay (a reload
                // would drop them).
                shard.drop_request(id);
                let restorable =
                    !self.is_finished(id) && failed_pred.as_ref().is_some_and(|(_, tail)| tail.contains(&layer));
                if is_native && !restorable {
                    lost = Some(DataPlaneError::LostLayer { uav: self.uav.clone(), layer, position: p });
                } else if is_native {
                    restore.entry(id).or_default().push(layer);
                } else if let Some(c) = self.contexts.get_mut(&id) {
                    c.seed_layers.push(layer);
                }
            }
            keep.insert(layer, shard);
            if lost.is_some() {
                break;
            }
        }
        if let Some(e) = lost {
            // Refused: the loaded layers stay (the next plan may use them), the requests do not.
            self.pieces.extend(keep);
            for id in self.requests() {
                self.drop_context(id);
            }
            return Err(e);
        }
        self.pieces = keep;
        let failed = failed_pred.map(|f| f.0).unwrap_or_default();
        for (id, layers) in restore {
            let Some(c) = self.contexts.get_mut(&id) else { continue };
            // Its last snapshot, or nothing when none was due yet; the replay of its buffered
            // inputs brings it to the resume position.
            let mut from = c.resume;
            for &layer in &layers {
                let snap = c.pred_snapshot.as_ref().and_then(|s| layer_rows(s, layer).map(|r| (s, r)));
                let upto = snap.map_or(0, |(s, _)| s.tokens.min(c.resume));
                if let (Some((s, rows)), Some(shard)) = (snap, self.pieces.get_mut(&layer)) {
                    // Sized for the request's figure (unknown here: the model's context).
                    sized(shard, id, c.context_tokens, upto)?;
                    shard.import_kv(&single_layer(s, rows, upto))?;
                }
                from = from.min(upto);
            }
            let mut segments: Vec<Segment> = Vec::new();
            for &layer in &layers {
                if let Some(s) = self.pieces.get_mut(&layer) {
                    s.switch_request(id)?;
                    s.truncate(from)?;
                }
                // In pipeline order; the run breaks only where the gateway's input enters.
                match segments.last_mut() {
                    Some(seg) if layer != 0 => seg.layers.push(layer),
                    _ => segments.push(Segment { layers: vec![layer], chunks: BTreeMap::new() }),
                }
            }
            c.replay = Some(PendingReplay { failed: failed.clone(), from, segments });
        }
        for (id, boundary, chunks) in local_replays {
            if let Some(seg) =
                self.contexts.get_mut(&id).and_then(|c| c.replay.as_mut()).and_then(|r| r.segment(boundary))
            {
                seg.chunks.extend(chunks);
            }
        }
        self.recent = new.request_id;
        self.plan = Some(new);
        emits.extend(self.try_complete()?);
        Ok(emits)
    }

    /// Runs pending replays and sends seeds once possible, for every request.
    fn try_complete(&mut self) -> Result<Vec<Emit>> {
        let due: Vec<u64> =
            self.contexts.iter().filter(|(_, c)| c.replay.is_some() || c.announce).map(|(&id, _)| id).collect();
        let mut emits = Vec::new();
        for id in due {
            emits.extend(self.complete(id)?);
        }
        Ok(emits)
    }

    /// Runs the pending replay of `request` once its inputs are all there, then sends its seed
    /// and tail snapshot to the new neighbours.
    fn complete(&mut self, request: u64) -> Result<Vec<Emit>> {
        let Some(plan) = &self.plan else { return Ok(Vec::new()) };
        let Some(c) = self.contexts.get_mut(&request) else { return Ok(Vec::new()) };
        let (p, want) = (c.resume, c.context_tokens);
        if let Some(r) = &c.replay {
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
        }
        if let Some(r) = c.replay.take() {
            for seg in &r.segments {
                tracing::info!(request, failed = %r.failed, layers = ?seg.layers, from = r.from, to = p, chunks = seg.chunks.len(), "replaying buffered inputs through the recovered tail");
                for (&pos, h) in seg.chunks.range(r.from..p) {
                    // One chunk at a time, as the failed UAV computed them (exactness).
                    let x = decode(self.codec, h)?;
                    run_layers(&mut self.pieces, self.codec, &seg.layers, request, want, x, pos)?;
                }
            }
        }
        let mut emits = Vec::new();
        if std::mem::take(&mut c.announce) {
            if let Some(me) = plan.stage(&self.uav) {
                if let Some(pred) = plan.pred(&self.uav).filter(|s| s.uav != self.uav) {
                    let head = plan.head(me);
                    if !head.is_empty() {
                        let rows = export(&mut self.pieces, &head, request, 0..p)?;
                        emits.push(Emit::Kv { holder: pred.uav.clone(), request_id: request, rows });
                    }
                }
                if let Some(succ) = plan.succ(&self.uav).filter(|s| s.uav != self.uav) {
                    let tail = plan.tail(me);
                    if me.t > 0 && !tail.is_empty() {
                        let rows = export(&mut self.pieces, &tail, request, 0..p)?;
                        emits.push(Emit::Kv { holder: succ.uav.clone(), request_id: request, rows });
                    }
                }
                c.snapshot_sent_until = p;
            }
        }
        Ok(emits)
    }

    /// Hidden states of `request` for this UAV's native layers starting at `boundary`: returns
    /// the output for the next stage (or the gateway). Call [`ShardHost::snapshot_due`] once it
    /// is on its way. Position 0 of a request not held starts it; a later position of one, or
    /// any of a finished one, is [`DataPlaneError::StaleRequest`].
    /// `context_tokens` is the request's prompt + maximum answer as the message carries it (0 =
    /// unknown): the capacity of its caches here ([`ShardHost::kv_capacity`]).
    pub fn on_input(
        &mut self,
        request_id: u64,
        boundary: usize,
        position: usize,
        input: &Encoded,
        context_tokens: usize,
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
        self.admit(request_id, position)?;
        if self.contexts.contains_key(&request_id) {
            let held = self.pieces.get(&boundary).map_or(0, |s| rows_of(s, request_id));
            if position < held {
                return Err(DataPlaneError::Duplicate { request: request_id, position, layer: boundary, held });
            }
        }
        let x = decode(self.codec, input)?;
        let context_tokens = self.open(request_id).learn(context_tokens);
        (self.recent, self.stepped) = (request_id, Some(request_id));
        let started = std::time::Instant::now();
        let layers: Vec<usize> = (boundary..end).collect();
        let y = run_layers(&mut self.pieces, self.codec, &layers, request_id, context_tokens, x, position)?;
        let hidden = self.encode(&y)?;
        self.account(started.elapsed(), end - boundary, input.rows());
        Ok(vec![Emit::Activation { to, boundary: end % num_layers, request_id, position, hidden, context_tokens }])
    }

    /// The successor's input: compute its head replica and buffer the output (its tail's input).
    /// Requests start and go stale as in [`ShardHost::on_input`].
    pub fn on_successor_input(
        &mut self,
        request_id: u64,
        boundary: usize,
        position: usize,
        input: &Encoded,
        context_tokens: usize,
    ) -> Result<()> {
        let succ_has_tail = match self.plan.as_ref().map(|p| (p, p.succ(&self.uav))) {
            Some((plan, Some(succ))) if succ.uav != self.uav && boundary == succ.start => {
                plan.tail_input_from_pred(succ).is_some()
            }
            _ => return Ok(()),
        };
        self.admit(request_id, position)?;
        let codec = self.codec;
        if let Some(c) = self.contexts.get_mut(&request_id).filter(|c| !c.seed_layers.is_empty()) {
            // Checked now (a malformed input is refused as it would be seeded), computed later.
            decode(codec, input)?;
            c.learn(context_tokens);
            c.seed_inputs.push((position, input.clone()));
            return Ok(());
        }
        if let Some(&first) = self.replica_layers().first() {
            let held = self.pieces.get(&first).map_or(0, |s| rows_of(s, request_id));
            if self.contexts.contains_key(&request_id) && position < held {
                return Err(DataPlaneError::Duplicate { request: request_id, position, layer: first, held });
            }
        }
        self.run_replica(request_id, position, input, succ_has_tail, context_tokens)
    }

    /// The head replica's step for the successor's input at `position`, and the buffered input of
    /// the successor's tail.
    fn run_replica(
        &mut self,
        request_id: u64,
        position: usize,
        input: &Encoded,
        succ_has_tail: bool,
        context_tokens: usize,
    ) -> Result<()> {
        let head = self.replica_layers();
        let x = decode(self.codec, input)?;
        let context_tokens = self.open(request_id).learn(context_tokens);
        let started = std::time::Instant::now();
        let y = run_layers(&mut self.pieces, self.codec, &head, request_id, context_tokens, x, position)?;
        self.account(started.elapsed(), head.len(), input.rows());
        // With no head (K = 0) the tail's input is the stage input itself. A tail that starts
        // at layer 0 is fed by the gateway: the scheduler replays it.
        if succ_has_tail {
            let tail_input = if head.is_empty() { input.clone() } else { self.encode(&y)? };
            self.open(request_id).buffer.insert(position, tail_input);
        }
        Ok(())
    }

    /// KV rows of `request_id` from another UAV: the predecessor's tail snapshot, or the
    /// successor's head seed. A request not held is taken only from its start (`token_start` 0)
    /// and when the plan carries it; otherwise the rows are [`DataPlaneError::StaleRequest`].
    pub fn on_kv(&mut self, source: &str, request_id: u64, rows: KvRows) -> Result<Vec<Emit>> {
        let Some(plan) = self.plan.clone() else { return Ok(Vec::new()) };
        if !self.contexts.contains_key(&request_id) {
            // Carried by the plan, or the current predecessor's first snapshot of a request
            // whose first activation has not arrived here yet (it may overtake it): taken.
            let carried = plan.carried().iter().any(|r| r.request_id == request_id)
                || (plan.pred(&self.uav).is_some_and(|p| p.uav == source && p.uav != self.uav)
                    && !self.is_finished(request_id));
            if rows.token_start != 0 || !carried {
                let why = if self.is_finished(request_id) { Stale::Finished } else { Stale::NotStarted };
                return Err(DataPlaneError::StaleRequest { request: request_id, position: rows.token_start, why });
            }
            self.admit(request_id, 0)?;
            self.open(request_id);
        }
        // In a ring of two the successor is also the predecessor: its seed and its tail snapshot
        // come from the same UAV; the layers they carry tell them apart.
        let c = self.contexts.get_mut(&request_id).expect("opened above");
        let seed = plan.succ(&self.uav).is_some_and(|s| s.uav == source)
            && !c.seed_layers.is_empty()
            && c.seed_layers.iter().all(|&l| layer_rows(&rows, l).is_some());
        if seed {
            let want = c.context_tokens;
            for layer in std::mem::take(&mut c.seed_layers) {
                let shard = self
                    .pieces
                    .get_mut(&layer)
                    .ok_or_else(|| DataPlaneError::Plan(format!("seed for layer {layer}, not loaded")))?;
                if let Some(r) = layer_rows(&rows, layer) {
                    sized(shard, request_id, want, rows.token_start + rows.tokens)?;
                    shard.import_kv(&single_layer(&rows, r, rows.tokens))?;
                }
            }
            let caught_up = std::mem::take(&mut c.seed_inputs);
            tracing::info!(%source, request = request_id, tokens = rows.tokens, inputs_after = caught_up.len(), "head replica seeded");
            let succ_has_tail = plan.succ(&self.uav).is_some_and(|s| plan.tail_input_from_pred(s).is_some());
            for (position, input) in caught_up {
                if position >= rows.tokens {
                    self.run_replica(request_id, position, &input, succ_has_tail, 0)?;
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
                let c = self.contexts.get_mut(&request_id).expect("opened above");
                match (&mut c.pred_snapshot, rows.token_start) {
                    (_, 0) => {
                        c.pred_snapshot = Some(rows);
                        c.pred_snapshot_epoch = plan.epoch;
                    }
                    (Some(s), _) if s.token_start + s.tokens == rows.token_start => {
                        s.append(&rows)?;
                        c.pred_snapshot_epoch = plan.epoch;
                    }
                    (s, start) => {
                        tracing::warn!(request = request_id, start, held = ?s.as_ref().map(|s| s.tokens), "snapshot out of order, ignored")
                    }
                }
            }
        }
        self.complete(request_id)
    }

    /// Inputs of `request_id` for a failed UAV's tail entering layer `boundary`, for the replay:
    /// buffered by its predecessor, or the gateway's embeddings for the layers after the gateway.
    pub fn on_replay(
        &mut self,
        failed: &str,
        boundary: usize,
        request_id: u64,
        chunks: Vec<(usize, Encoded)>,
        context_tokens: usize,
    ) -> Result<Vec<Emit>> {
        if let Some(c) = self.contexts.get_mut(&request_id) {
            c.learn(context_tokens);
        }
        let pending = self.contexts.get_mut(&request_id).and_then(|c| c.replay.as_mut()).filter(|r| r.failed == failed);
        tracing::debug!(
            failed,
            boundary,
            request = request_id,
            chunks = chunks.len(),
            waiting = pending.is_some(),
            "replay received"
        );
        match pending.map(|r| r.segment(boundary)) {
            Some(Some(seg)) => {
                seg.chunks.extend(chunks);
                self.complete(request_id)
            }
            Some(None) => Err(DataPlaneError::Plan(format!(
                "replay of {failed} at layer {boundary}: no restored layers start there"
            ))),
            None => Ok(Vec::new()),
        }
    }

    /// The boundary snapshot of the request of the last step owed to the successor, if `t`
    /// tokens of it have accumulated since its previous one. Separate from
    /// [`ShardHost::on_input`] so that the step's output leaves first and the next drone computes
    /// while this one exports and sends ~1 MB of KV rows. Call it before the next input.
    pub fn snapshot_due(&mut self) -> Result<Vec<Emit>> {
        // Called after every step: borrows the plan, copies only when a snapshot is due.
        let Some(request) = self.stepped.take() else { return Ok(Vec::new()) };
        let Some(plan) = &self.plan else { return Ok(Vec::new()) };
        let Some(me) = plan.stage(&self.uav) else { return Ok(Vec::new()) };
        let Some(succ) = plan.succ(&self.uav).filter(|s| s.uav != self.uav) else { return Ok(Vec::new()) };
        let Some(c) = self.contexts.get_mut(&request) else { return Ok(Vec::new()) };
        let tail = plan.tail(me);
        if me.t == 0 || tail.is_empty() {
            return Ok(Vec::new());
        }
        let upto = tail.iter().filter_map(|l| self.pieces.get(l)).map(|s| rows_of(s, request)).min().unwrap_or(0);
        if upto < c.snapshot_sent_until + me.t {
            return Ok(Vec::new());
        }
        let holder = succ.uav.clone();
        let rows = export(&mut self.pieces, &tail, request, c.snapshot_sent_until..upto)?;
        c.snapshot_sent_until = upto;
        Ok(vec![Emit::Kv { holder, request_id: request, rows }])
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

/// Runs `x` of `request` through `layers` in order and returns the last one's output (each
/// layer switched to that request's caches first). Every layer after the first is fed its
/// predecessor's output as `codec` delivers it (module comment: exactness). With no layers, `x`
/// itself.
#[allow(clippy::too_many_arguments)]
fn run_layers(
    pieces: &mut BTreeMap<usize, Shard>,
    codec: ActivationCodec,
    layers: &[usize],
    request: u64,
    context_tokens: usize,
    mut x: Hidden,
    position: usize,
) -> Result<Hidden> {
    for (i, layer) in layers.iter().enumerate() {
        if i > 0 && !codec.is_exact() {
            x = Hidden::new(codec.round_trip(x.as_slice(), x.width())?, x.width())?;
        }
        let shard = pieces.get_mut(layer).ok_or_else(|| DataPlaneError::Plan(format!("layer {layer} not loaded")))?;
        sized(shard, request, context_tokens, position + x.tokens())?;
        x = shard.forward(&x, position)?;
    }
    Ok(x)
}

/// Makes `request`'s caches on `shard` the current ones, with room for `context_tokens` (its
/// prompt + maximum answer; 0 = unknown: the model's context): a context that holds no rows yet
/// is sized to it, one that holds rows grows when the figure grew (rows are copied; the bits of
/// a step do not depend on the capacity), never shrinks. A step past the figure (a figure too
/// small) gets the model's context at once rather than a copy per token.
fn sized(shard: &mut Shard, request: u64, context_tokens: usize, need: usize) -> Result<()> {
    shard.switch_request(request)?;
    let max = shard.architecture().max_context;
    let mut want = if context_tokens == 0 { max } else { context_tokens.min(max) };
    if need > want {
        want = max;
    }
    let capacity = shard.kv_capacity();
    if (shard.kv_len() == 0 && capacity != want) || want > capacity {
        tracing::debug!(request, layers = ?shard.layers(), from = capacity, to = want, "KV caches sized");
        shard.set_kv_capacity(want)?;
    }
    Ok(())
}

/// Rows of `request`'s tokens `tokens` on `layers`, in pipeline order: a wrapped interval
/// (29, 0, 1) travels as one contiguous range mod L.
fn export(
    pieces: &mut BTreeMap<usize, Shard>,
    layers: &[usize],
    request: u64,
    tokens: std::ops::Range<usize>,
) -> Result<KvRows> {
    let mut out: Option<KvRows> = None;
    for &layer in layers {
        let shard =
            pieces.get_mut(&layer).ok_or_else(|| DataPlaneError::Plan(format!("export of layer {layer}, not held")))?;
        shard.switch_request(request)?;
        let rows = shard.export_kv(layer..layer + 1, tokens.clone())?;
        match &mut out {
            None => out = Some(rows),
            Some(o) => o.layers.extend(rows.layers),
        }
    }
    out.ok_or_else(|| DataPlaneError::Plan("export of no layers".into()))
}

/// The rows `request` holds on a one-layer shard (without switching it).
fn rows_of(shard: &Shard, request: u64) -> usize {
    if shard.request() == request {
        shard.kv_len()
    } else {
        shard.requests().into_iter().find(|&(id, _)| id == request).map_or(0, |(_, n)| n)
    }
}

/// An input as this UAV's layers see it (and checks it is in the plan's codec).
fn decode(codec: ActivationCodec, e: &Encoded) -> Result<Hidden> {
    if e.codec() != codec {
        return Err(DataPlaneError::CodecMismatch { got: e.codec(), want: codec });
    }
    Ok(Hidden::new(e.decode()?, e.width())?)
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
