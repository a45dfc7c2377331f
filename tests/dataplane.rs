//! The data plane without ROS: ShardHosts of a 3-UAV ring exchange their `Emit`s in process
//! (the nodes only carry them over DDS). A UAV is dropped mid-answer or in the middle of a
//! prompt's chunks (several steps in flight, as the scheduler sends them), the survivors apply the
//! failover plan (replica promoted, snapshot restored, buffered activations replayed from where
//! the snapshot ends, as the successor reports it) and the answer continues exactly as one shard
//! of all layers computes it. With a lossy activation codec (f16, int8) every hop carries the
//! codec's bytes and the answer is that of one process that feeds every layer its predecessor's
//! output through the codec, with or without the failure. Uses the `tiny` variant
//! (random weights, 4 layers, same graph) and the real ONNX Runtime.
use aerokv::dataplane::{
    gateway_steps, step_at, DataPlaneError, Emit, RequestMemory, RequestResume, ShardHost, Stage, Stale, SwarmPlan,
    MAX_CARRIED_REQUESTS,
};
use aerokv_codec::{ActivationCodec, Encoded};
use aerokv_engine::{
    argmax, prompt_chunks, Gateway, Hidden, Manifest, Runtime, RuntimeConfig, Shard, PREFILL_CHUNK_TOKENS,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;

fn models() -> PathBuf {
    std::env::var_os("AEROKV_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/generated"))
}

fn runtime() -> Runtime {
    Runtime::init(RuntimeConfig::with_threads(1)).expect("ONNX Runtime (source scripts/env.sh, make setup)")
}

fn stage(uav: &str, start: usize, len: usize, k: usize, t: usize) -> Stage {
    Stage { uav: uav.into(), start, len, k, t }
}

/// A plan over the tiny model's 4 layers.
fn plan(epoch: u64, request_id: u64, resume_position: usize, stages: Vec<Stage>) -> SwarmPlan {
    SwarmPlan { epoch, num_layers: 4, stages, request_id, resume_position, replay_from: 0, requests: Vec::new() }
}

/// The swarm in one process: hosts plus the message queue between them.
struct Swarm {
    hosts: BTreeMap<String, ShardHost>,
    queue: VecDeque<(String, Emit)>,
    /// Every replayed input chunk, `(request, position, tokens)`: what crossed the link for a failover.
    replayed: Vec<(u64, usize, usize)>,
    codec: ActivationCodec,
    /// Activation payload bytes and tokens of every hop between UAVs and the gateway.
    hop_bytes: usize,
    hop_tokens: usize,
    /// While set, KV rows (snapshots, seeds) wait here instead of being delivered: over a radio
    /// they are paced behind the activations and arrive steps later.
    held: Option<Vec<(String, Emit)>>,
    /// The requests of KV rows dropped as stale.
    stale_kv: Vec<u64>,
    /// What the gateway sends as each request's `context_tokens` (absent: 0, unknown).
    context: BTreeMap<u64, usize>,
    /// KV rows overtake the activations queued before them (another topic: nothing orders them).
    kv_first: bool,
}

impl Swarm {
    /// Every host takes the plan; `gateway` is what the scheduler sends with it.
    fn apply(&mut self, plan: &SwarmPlan, gateway: Option<Emit>) {
        self.apply_all(plan, gateway)
    }

    /// [`Swarm::apply`] with any number of messages from the scheduler.
    fn apply_all(&mut self, plan: &SwarmPlan, gateway: impl IntoIterator<Item = Emit>) {
        // KV rows sent in the previous epoch and not delivered yet: the executors drop them
        // (older epoch), counted here as stale.
        let (old, rest): (VecDeque<_>, VecDeque<_>) =
            std::mem::take(&mut self.queue).into_iter().partition(|(_, e)| matches!(e, Emit::Kv { .. }));
        self.stale_kv.extend(old.iter().filter_map(|(_, e)| match e {
            Emit::Kv { request_id, .. } => Some(*request_id),
            _ => None,
        }));
        self.queue = rest;
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        for name in names {
            let emits = self.hosts.get_mut(&name).unwrap().apply_plan(plan.clone()).unwrap();
            self.queue.extend(emits.into_iter().map(|e| (name.clone(), e)));
        }
        self.queue.extend(gateway.into_iter().map(|e| ("gateway".to_string(), e)));
        assert!(self.drain().is_none(), "no activation may flow while a plan is applied");
        assert!(self.hosts.values().all(ShardHost::ready), "every host holds its layers after the plan");
    }

    fn new(hosts: impl IntoIterator<Item = (String, ShardHost)>, codec: ActivationCodec) -> Swarm {
        let mut hosts: BTreeMap<String, ShardHost> = hosts.into_iter().collect();
        for h in hosts.values_mut() {
            h.set_activation_codec(codec);
        }
        Swarm {
            hosts,
            queue: VecDeque::new(),
            replayed: Vec::new(),
            codec,
            hop_bytes: 0,
            hop_tokens: 0,
            held: None,
            stale_kv: Vec::new(),
            context: BTreeMap::new(),
            kv_first: false,
        }
    }

    /// The stage input goes to its owner and to the holder of the owner's head replica.
    #[allow(clippy::too_many_arguments)]
    fn input(
        &mut self,
        plan: &SwarmPlan,
        to: &str,
        boundary: usize,
        request: u64,
        position: usize,
        hidden: &Encoded,
        context: usize,
    ) {
        self.hop_bytes += hidden.bytes().len();
        self.hop_tokens += hidden.rows();
        if let Some(pred) = plan.pred(to).map(|s| s.uav.clone()).filter(|p| p != to) {
            if let Some(h) = self.hosts.get_mut(&pred) {
                h.on_successor_input(request, boundary, position, hidden, context).unwrap();
            }
        }
        let host = self.hosts.get_mut(to).expect("input for a live host");
        let output = host.on_input(request, boundary, position, hidden, context).unwrap();
        let snapshot = host.snapshot_due().unwrap();
        self.queue.extend(output.into_iter().chain(snapshot).map(|e| (to.to_string(), e)));
    }

    /// Delivers queued messages until the gateway gets an output (returned) or nothing is left.
    fn drain(&mut self) -> Option<Hidden> {
        self.drain_any().map(|(_, _, h)| h)
    }

    /// [`Swarm::drain`], with the request and position the output is for.
    fn drain_any(&mut self) -> Option<(u64, usize, Hidden)> {
        let plan = self.hosts.values().next()?.plan()?.clone();
        loop {
            let kv = self.queue.iter().position(|(_, e)| matches!(e, Emit::Kv { .. })).filter(|_| self.kv_first);
            let Some((from, e)) = self.queue.remove(kv.unwrap_or(0)) else { break };
            match e {
                Emit::Activation { to: None, hidden, request_id, position, .. } => {
                    self.hop_bytes += hidden.bytes().len();
                    self.hop_tokens += hidden.rows();
                    return Some((
                        request_id,
                        position,
                        Hidden::new(hidden.decode().unwrap(), hidden.width()).unwrap(),
                    ));
                }
                Emit::Activation { to: Some(to), boundary, request_id, position, hidden, context_tokens } => {
                    self.input(&plan, &to, boundary, request_id, position, &hidden, context_tokens)
                }
                e @ Emit::Kv { .. } if self.held.is_some() => self.held.as_mut().unwrap().push((from, e)),
                Emit::Kv { holder, request_id, rows } => {
                    if let Some(h) = self.hosts.get_mut(&holder) {
                        // Rows of a request the holder has finished or dropped (a plan that did
                        // not carry it) since they were sent: dropped, as the executor does.
                        match h.on_kv(&from, request_id, rows) {
                            Ok(emits) => self.queue.extend(emits.into_iter().map(|e| (holder.clone(), e))),
                            Err(e) if e.is_stale() => self.stale_kv.push(request_id),
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                Emit::Replay { failed, to, boundary, request_id, chunks, context_tokens } => {
                    self.replayed.extend(chunks.iter().map(|(pos, h)| (request_id, *pos, h.rows())));
                    let host = self.hosts.get_mut(&to).unwrap();
                    let emits = host.on_replay(&failed, boundary, request_id, chunks, context_tokens).unwrap();
                    self.queue.extend(emits.into_iter().map(|e| (to.clone(), e)));
                }
            }
        }
        None
    }

    /// The gateway sends a step to the owner of layer 0.
    fn send(&mut self, plan: &SwarmPlan, gateway: &mut Gateway, ids: &[u32], position: usize) {
        self.send_request(plan, gateway, plan.request_id, ids, position)
    }

    /// [`Swarm::send`] for a given request.
    fn send_request(&mut self, plan: &SwarmPlan, gateway: &mut Gateway, request: u64, ids: &[u32], position: usize) {
        let first = plan.first().unwrap().uav.clone();
        let embedded = encode(self.codec, &gateway.embed(ids).unwrap());
        let context = self.context.get(&request).copied().unwrap_or(0);
        self.input(plan, &first, 0, request, position, &embedded, context);
    }

    /// Held KV rows go out now, ahead of what is queued, in the order they were sent.
    fn release_kv(&mut self) {
        for m in self.held.take().unwrap_or_default().into_iter().rev() {
            self.queue.push_front(m);
        }
    }

    /// A UAV dies: the activations on their way are of the old epoch, which the survivors drop.
    fn kill(&mut self, uav: &str) {
        self.hosts.remove(uav);
        self.queue.retain(|(_, e)| !matches!(e, Emit::Activation { .. }));
    }
}

/// Steps the gateway keeps in flight, as the scheduler does (one per stage): the first stage
/// computes all of them before the next sees one, so at a kill the stages are at different
/// positions, up to the whole window past the resume position.
const WINDOW: usize = 3;

fn encode(codec: ActivationCodec, h: &Hidden) -> Encoded {
    Encoded::encode(codec, h.as_slice(), h.width()).unwrap()
}

/// `h` as a receiver decodes it.
fn through(codec: ActivationCodec, h: Hidden) -> Hidden {
    Hidden::new(codec.round_trip(h.as_slice(), h.width()).unwrap(), h.width()).unwrap()
}

/// Greedy tokens of one process, fed the prompt in the same chunks. Raw: one shard holding every
/// layer. A lossy codec: one shard per layer, each fed its predecessor's output (the gateway's
/// embedding for the first) through the codec, and the last output through it to the LM head.
fn reference(
    rt: &Runtime,
    m: &Manifest,
    gateway: &mut Gateway,
    prompt: &[u32],
    n: usize,
    codec: ActivationCodec,
) -> Vec<u32> {
    let l = m.architecture.layers;
    let mut shards: Vec<Shard> = if codec.is_exact() {
        vec![Shard::load(rt, m, 0..l).unwrap()]
    } else {
        (0..l).map(|i| Shard::load(rt, m, i..i + 1).unwrap()).collect()
    };
    let mut forward = |gateway: &mut Gateway, ids: &[u32], position: usize| {
        let mut x = gateway.embed(ids).unwrap();
        for s in shards.iter_mut() {
            x = s.forward(&through(codec, x), position).unwrap();
        }
        argmax(&gateway.logits(&through(codec, x)).unwrap()).unwrap()
    };
    let mut next = 0;
    for (position, ids) in prompt_chunks(prompt) {
        next = forward(gateway, ids, position);
    }
    let mut out = vec![next];
    for position in prompt.len()..prompt.len() + n - 1 {
        next = forward(gateway, &[next], position);
        out.push(next);
    }
    out
}

const SHORT: &str = "Where do drones fly?";
/// Three prefill chunks (the tiny model has the real tokenizer).
const LONG: &str = "Four drones map a glacier valley: one follows the river, one climbs the ridge, one circles \
    the lake and one relays to the camp. The wind rises on the ridge and the second drone, whose battery \
    is the oldest, turns back early while the third covers its slope. Later a thermal camera finds the \
    tent of a group of hikers near the river, and the team marks it on the merged map of the valley. \
    Which drone turned back, why did it turn back, and who covered the slope it left behind? Answer in \
    one long sentence that names the river, the ridge, the lake, the camp and the hikers, and explain \
    what the relay drone did all day above the camp while the others were mapping the valley. \
    Then write a second sentence about the next morning, when the team flies again: the wind is calm, \
    the old battery has been replaced, the ridge drone maps the upper glacier, the lake drone measures \
    the water level, the river drone follows the hikers down to the village, and the relay drone \
    stays above the camp once more. Finish with a short list of three things the team should check \
    before every flight, in the order a pilot would check them on the field. Keep every sentence \
    plain and clear, do not repeat the question, and do not invent drones, places or people that the \
    briefing does not name.";

/// When the failed UAV dies: before the step that feeds the n-th generated token (n >= 1), or
/// once the prompt's chunks before the c-th have their output (later ones are in flight).
#[derive(Clone, Copy, Debug)]
enum Kill {
    AfterTokens(usize),
    BeforePromptChunk(usize),
}

/// A run with a failure: the answer, one shard of all layers' answer, and the failover's replay.
struct Outcome {
    /// Activation bytes per token and hop, and the model's hidden width.
    hop_bytes_per_token: f64,
    width: usize,
    got: Vec<u32>,
    want: Vec<u32>,
    resume_position: usize,
    replay_from: usize,
    replayed: Vec<(usize, usize)>,
}

/// Kills `failed` in every way a scenario is run, recovers with `recovery`, and checks each answer
/// (`n` tokens) against one shard of all layers: after each of `after` tokens of a short and of a
/// long prompt, and in the middle of the long prompt (its recovery replays prompt chunks). Also
/// checks that nothing the snapshot held was replayed. Returns the outcomes.
/// The gateway's side of a run: steps sent as the scheduler sends them (the prompt's chunks, then
/// one token each, up to [`WINDOW`] in flight) and the outputs turned into tokens.
#[derive(Default)]
struct Steps {
    position: usize,
    sent_until: usize,
    in_flight: usize,
}

impl Steps {
    /// Fills the window and takes the oldest step's output; true once `n` tokens are out.
    fn next(
        &mut self,
        swarm: &mut Swarm,
        plan: &SwarmPlan,
        gateway: &mut Gateway,
        prompt: &[u32],
        got: &mut Vec<u32>,
        n: usize,
    ) -> bool {
        while self.in_flight < WINDOW {
            let Some(ids) = step_at(prompt, got, self.sent_until) else { break };
            swarm.send(plan, gateway, ids, self.sent_until);
            (self.sent_until, self.in_flight) = (self.sent_until + ids.len(), self.in_flight + 1);
        }
        let out = swarm.drain().expect("the last stage answers");
        self.in_flight -= 1;
        self.position += step_at(prompt, got, self.position).unwrap().len();
        // The prompt's last chunk or a token: its output is the next token.
        if self.position >= prompt.len() {
            got.push(argmax(&gateway.logits(&out).unwrap()).unwrap());
        }
        got.len() == n
    }

    /// After a new plan the steps in flight are sent again from the resume position.
    fn resume(&mut self) {
        (self.sent_until, self.in_flight) = (self.position, 0);
    }
}

fn assert_unchanged_by_kills(
    before: &SwarmPlan,
    failed: &str,
    recovery: &SwarmPlan,
    after: &[usize],
    n: usize,
) -> Vec<(Kill, Outcome)> {
    assert_unchanged_by_kills_with(ActivationCodec::Raw, before, failed, recovery, after, n)
}

fn assert_unchanged_by_kills_with(
    codec: ActivationCodec,
    before: &SwarmPlan,
    failed: &str,
    recovery: &SwarmPlan,
    after: &[usize],
    n: usize,
) -> Vec<(Kill, Outcome)> {
    let mut cases: Vec<(&str, Kill)> =
        after.iter().flat_map(|&t| [(SHORT, Kill::AfterTokens(t)), (LONG, Kill::AfterTokens(t))]).collect();
    cases.extend([(LONG, Kill::BeforePromptChunk(1)), (LONG, Kill::BeforePromptChunk(2))]);
    let mut outcomes = Vec::new();
    for (user, kill) in cases {
        let o = run_with_failure(codec, user, before.clone(), failed, kill, recovery.clone(), n);
        let case = format!("{codec}: {failed} killed {kill:?}, long prompt {}, {before:?}", user == LONG);
        assert_eq!(o.hop_bytes_per_token, codec.row_bytes(o.width) as f64, "{case}");
        assert_eq!(o.got, o.want, "{case}");
        assert!(o.replayed.iter().all(|&(pos, len)| pos + len > o.replay_from && pos < o.resume_position), "{case}");
        outcomes.push((kill, o));
    }
    outcomes
}

fn run_with_failure(
    codec: ActivationCodec,
    user: &str,
    plan: SwarmPlan,
    failed: &str,
    kill: Kill,
    recovery: SwarmPlan,
    n: usize,
) -> Outcome {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    let prompt = gateway.encode_chat(user).unwrap();
    let want = reference(&rt, &m, &mut gateway, &prompt, n, codec);
    let kill_at = match kill {
        Kill::AfterTokens(t) => prompt.len() + t - 1,
        Kill::BeforePromptChunk(c) => {
            assert!(c * PREFILL_CHUNK_TOKENS < prompt.len(), "the prompt has no chunk {c}");
            c * PREFILL_CHUNK_TOKENS
        }
    };

    let hosts = plan.stages.iter().map(|s| (s.uav.clone(), ShardHost::new(rt.clone(), m.clone(), &s.uav).unwrap()));
    let mut swarm = Swarm::new(hosts, codec);
    swarm.apply(&plan, None);
    // The steps as the scheduler sends them: the prompt's chunks, then one token each.
    let mut got: Vec<u32> = Vec::new();
    let mut current = plan;
    let mut steps = Steps::default();
    let mut replay_from = 0;
    loop {
        let position = steps.position;
        if position == kill_at {
            // What the successor reports in its heartbeat, as the scheduler reads it.
            let succ = current.succ(failed).unwrap().uav.clone();
            replay_from = swarm.hosts[&succ].pred_snapshot_tokens(current.request_id).min(position);
            swarm.kill(failed);
            let mut next = recovery.clone();
            next.resume_position = position;
            next.replay_from = replay_from;
            // As the scheduler does for a stage around the gateway: the embeddings it was fed.
            let old = current.stage(failed).unwrap();
            let embeddings = current.tail_needs_gateway_replay(old).then(|| Emit::Replay {
                failed: failed.into(),
                to: current.succ(failed).unwrap().uav.clone(),
                boundary: 0,
                request_id: current.request_id,
                chunks: gateway_steps(&prompt, &got, replay_from, position)
                    .into_iter()
                    .map(|(pos, ids)| (pos, encode(codec, &gateway.embed(ids).unwrap())))
                    .collect(),
                context_tokens: 0,
            });
            swarm.apply(&next, embeddings);
            current = next;
            steps.resume();
        }
        if steps.next(&mut swarm, &current, &mut gateway, &prompt, &mut got, n) {
            break;
        }
    }
    let hop_bytes_per_token = swarm.hop_bytes as f64 / swarm.hop_tokens as f64;
    let width = m.architecture.hidden;
    Outcome {
        got,
        want,
        resume_position: kill_at,
        replay_from,
        replayed: swarm.replayed.iter().map(|r| (r.1, r.2)).collect(),
        hop_bytes_per_token,
        width,
    }
}

#[test]
fn a_middle_stage_dies_and_the_answer_is_unchanged() {
    // uav2's head (layer 1) lives on uav1, its tail (layer 2) is snapshotted to uav3 every 2 tokens.
    let before = plan(1, 1, 0, vec![stage("uav1", 0, 1, 1, 0), stage("uav2", 1, 2, 1, 2), stage("uav3", 3, 1, 0, 1)]);
    // uav1 promotes layer 1, uav3 restores layer 2 and replays what uav1 buffered since the snapshot.
    let recovery = plan(2, 1, 0, vec![stage("uav1", 0, 2, 1, 1), stage("uav3", 2, 2, 1, 1)]);
    let outcomes = assert_unchanged_by_kills(&before, "uav2", &recovery, &[7], 14);
    // Snapshots every 2 tokens: a failover replays only the last steps, never the whole context.
    for (kill, o) in outcomes {
        let replayed: usize = o.replayed.iter().map(|r| r.1).sum();
        assert!(o.replay_from > 0 && o.replay_from + 2 >= o.resume_position, "{kill:?}: from {}", o.replay_from);
        assert!(replayed <= o.resume_position - o.replay_from, "{kill:?}: {replayed} tokens replayed");
    }
}

#[test]
fn the_snapshot_a_successor_reports_is_never_more_than_it_could_restore() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    // uav2's tail (layer 2) is snapshotted to uav3 every 2 tokens.
    let stages = vec![stage("uav1", 0, 1, 0, 0), stage("uav2", 1, 2, 1, 2), stage("uav3", 3, 1, 0, 1)];
    let first = plan(1, 9, 0, stages.clone());
    let hosts = ["uav1", "uav2", "uav3"].map(|u| (u.to_string(), ShardHost::new(rt.clone(), m.clone(), u).unwrap()));
    let mut swarm = Swarm::new(hosts, ActivationCodec::Raw);
    swarm.apply(&first, None);
    let prompt = gateway.encode_chat(SHORT).unwrap();
    swarm.send(&first, &mut gateway, &prompt, 0);
    swarm.drain().unwrap();
    for position in prompt.len()..prompt.len() + 6 {
        swarm.send(&first, &mut gateway, &[42], position);
        swarm.drain().unwrap();
    }
    let held = swarm.hosts["uav3"].pred_snapshot_tokens(9);
    assert!(held + 2 > prompt.len() + 6 && held <= prompt.len() + 6, "{held}");
    // A new epoch that cuts the caches back (the same stages: a failure elsewhere in a larger
    // ring). Until uav2's first snapshot of it arrives, uav3 reports no more than the cut.
    let cut = prompt.len() + 1;
    let second = plan(2, 9, cut, stages);
    swarm.hosts.get_mut("uav3").unwrap().apply_plan(second.clone()).unwrap();
    assert_eq!(swarm.hosts["uav3"].pred_snapshot_tokens(9), cut);
    let emits = swarm.hosts.get_mut("uav2").unwrap().apply_plan(second.clone()).unwrap();
    swarm.queue.extend(emits.into_iter().map(|e| ("uav2".to_string(), e)));
    assert!(swarm.drain().is_none());
    assert_eq!(swarm.hosts["uav3"].pred_snapshot_tokens(9), cut);
    // A new request starts from nothing.
    swarm.hosts.get_mut("uav3").unwrap().apply_plan(plan(3, 10, 0, second.stages.clone())).unwrap();
    assert_eq!(swarm.hosts["uav3"].pred_snapshot_tokens(10), 0);
    assert_eq!(swarm.hosts["uav3"].requests(), vec![10]);
}

#[test]
fn the_last_stage_dies_and_the_first_takes_layers_across_the_gateway() {
    // No snapshot was due yet (T = 64): the whole context is replayed through the restored tail.
    let before = plan(1, 3, 0, vec![stage("uav1", 0, 2, 0, 64), stage("uav2", 2, 2, 0, 64)]);
    let recovery = plan(2, 3, 0, vec![stage("uav1", 2, 4, 0, 0)]);
    assert_unchanged_by_kills(&before, "uav2", &recovery, &[5], 10);
}

#[test]
fn the_first_stage_dies_and_its_predecessor_had_buffered_the_gateway_input() {
    // uav1's predecessor is the last stage, which subscribes to uav1's input (the embeddings).
    let before = plan(1, 4, 0, vec![stage("uav1", 0, 1, 0, 2), stage("uav2", 1, 2, 0, 2), stage("uav3", 3, 1, 0, 2)]);
    let recovery = plan(2, 4, 0, vec![stage("uav2", 0, 3, 0, 2), stage("uav3", 3, 1, 0, 2)]);
    assert_unchanged_by_kills(&before, "uav1", &recovery, &[6], 12);
}

#[test]
fn a_stage_around_the_gateway_dies_and_its_successor_replays_both_inputs() {
    // Pipeline: gateway -> uav3 (layer 0) -> uav1 (1) -> uav2 (2) -> uav3 (3) -> gateway.
    // uav3's tail is 3 and 0: uav1 restores both from the snapshot (T = 2; none with T = 64),
    // replays layer 3 with what uav2 buffered and layer 0 with the gateway's embeddings.
    for t in [2, 64] {
        let before =
            plan(1, 5, 0, vec![stage("uav1", 1, 1, 0, t), stage("uav2", 2, 1, 0, t), stage("uav3", 3, 2, 0, t)]);
        let recovery = plan(2, 5, 0, vec![stage("uav1", 3, 3, 0, t), stage("uav2", 2, 1, 0, t)]);
        assert_unchanged_by_kills(&before, "uav3", &recovery, &[1, 5, 8], 12);
    }
}

#[test]
fn a_stage_around_the_gateway_whose_replica_reaches_the_gateway_dies() {
    // uav3's head (layer 3) is replicated on uav2; its tail is layer 0 alone, fed by the gateway.
    for t in [2, 64] {
        let before =
            plan(1, 6, 0, vec![stage("uav1", 1, 1, 0, t), stage("uav2", 2, 1, 0, t), stage("uav3", 3, 2, 1, t)]);
        let recovery = plan(2, 6, 0, vec![stage("uav1", 0, 2, 0, t), stage("uav2", 2, 2, 0, t)]);
        assert_unchanged_by_kills(&before, "uav3", &recovery, &[1, 7], 12);
    }
}

#[test]
fn with_a_lossy_codec_a_failover_gives_the_answer_of_the_same_codec_without_it() {
    // The hops move: uav1 runs its own layer and uav2's promoted head without a hop between them,
    // uav3 gets a new hop inside uav2's former stage, replays carry encoded bytes; the answer
    // stays that of every layer fed through the codec (the reference).
    for codec in [ActivationCodec::F16, ActivationCodec::Int8] {
        let before =
            plan(1, 1, 0, vec![stage("uav1", 0, 1, 1, 0), stage("uav2", 1, 2, 1, 2), stage("uav3", 3, 1, 0, 1)]);
        let recovery = plan(2, 1, 0, vec![stage("uav1", 0, 2, 1, 1), stage("uav3", 2, 2, 1, 1)]);
        assert_unchanged_by_kills_with(codec, &before, "uav2", &recovery, &[7], 14);
        // The first stage: its predecessor buffered the gateway's encoded input (K = 0).
        let before =
            plan(1, 4, 0, vec![stage("uav1", 0, 1, 0, 2), stage("uav2", 1, 2, 0, 2), stage("uav3", 3, 1, 0, 2)]);
        let recovery = plan(2, 4, 0, vec![stage("uav2", 0, 3, 0, 2), stage("uav3", 3, 1, 0, 2)]);
        assert_unchanged_by_kills_with(codec, &before, "uav1", &recovery, &[6], 12);
        // Around the gateway: the buffer and the gateway's embeddings are replayed.
        let before =
            plan(1, 5, 0, vec![stage("uav1", 1, 1, 0, 2), stage("uav2", 2, 1, 0, 2), stage("uav3", 3, 2, 0, 2)]);
        let recovery = plan(2, 5, 0, vec![stage("uav1", 3, 3, 0, 2), stage("uav2", 2, 1, 0, 2)]);
        assert_unchanged_by_kills_with(codec, &before, "uav3", &recovery, &[5], 12);
    }
}

#[test]
fn an_activation_in_another_codec_than_the_plans_is_refused() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let width = m.architecture.hidden;
    let mut host = ShardHost::new(rt, m, "uav1").unwrap();
    host.set_activation_codec(ActivationCodec::Int8);
    host.apply_plan(plan(1, 1, 0, vec![stage("uav1", 0, 4, 0, 0)])).unwrap();
    let raw = Encoded::encode(ActivationCodec::Raw, &vec![0.5; width], width).unwrap();
    let e = host.on_input(1, 0, 0, &raw, 0).unwrap_err().to_string();
    assert!(e.contains("codec raw, but the plan's codec is int8"), "{e}");
    let int8 = Encoded::encode(ActivationCodec::Int8, &vec![0.5; width], width).unwrap();
    let out = host.on_input(1, 0, 0, &int8, 0).unwrap();
    assert!(matches!(&out[..], [Emit::Activation { to: None, hidden, .. }] if hidden.codec() == ActivationCodec::Int8));
    // A codec change forgets the request's KV: resuming it is refused, not computed differently.
    host.set_activation_codec(ActivationCodec::F16);
    let e = host.apply_plan(plan(2, 1, 1, vec![stage("uav1", 0, 4, 0, 0)])).unwrap_err().to_string();
    assert!(e.contains("holds no state"), "{e}");
}

#[test]
fn stragglers_and_repeated_inputs_are_dropped_without_touching_the_state() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let width = m.architecture.hidden;
    let mut host = ShardHost::new(rt, m, "uav1").unwrap();
    host.apply_plan(plan(1, 2, 0, vec![stage("uav1", 0, 4, 0, 0)])).unwrap();
    let x = |v: f32| Encoded::encode(ActivationCodec::Raw, &vec![v; width], width).unwrap();
    let out = |e: &[Emit]| match e {
        [Emit::Activation { hidden, .. }] => hidden.clone(),
        other => panic!("{other:?}"),
    };
    let first = host.on_input(2, 0, 0, &x(0.5), 0).unwrap();
    host.on_input(2, 0, 1, &x(0.25), 0).unwrap();
    // The step at position 0 again (a resent copy): dropped, the caches keep their 2 tokens.
    let e = host.on_input(2, 0, 0, &x(0.5), 0).unwrap_err();
    assert!(
        e.is_stale() && matches!(e, DataPlaneError::Duplicate { request: 2, position: 0, layer: 0, held: 2 }),
        "{e}"
    );
    assert_eq!(host.kv_tokens(2), 2);
    // A request not held, past its first step (a straggler of a request a plan dropped): stale.
    let e = host.on_input(1, 0, 2, &x(0.5), 0).unwrap_err();
    assert!(
        e.is_stale() && matches!(e, DataPlaneError::StaleRequest { request: 1, position: 2, why: Stale::NotStarted }),
        "{e}"
    );
    assert_eq!((host.kv_tokens(2), host.kv_tokens(1), host.requests()), (2, 0, vec![2]));
    // The next position still runs; a new request starts from nothing at position 0 (no plan
    // needed) and gives the first output again; request 2 keeps its rows.
    host.on_input(2, 0, 2, &x(0.125), 0).unwrap();
    let again = host.on_input(3, 0, 0, &x(0.5), 0).unwrap();
    assert_eq!(out(&first), out(&again));
    assert_eq!((host.kv_tokens(2), host.kv_tokens(3), host.requests()), (3, 1, vec![2, 3]));
    // An older id is no straggler: it starts too.
    host.on_input(1, 0, 0, &x(0.5), 0).unwrap();
    assert_eq!(host.requests(), vec![1, 2, 3]);
    // A finished request: freed, and every late message of it is stale, position 0 included.
    host.finish_request(2);
    assert_eq!((host.kv_tokens(2), host.requests()), (0, vec![1, 3]));
    for position in [3, 0] {
        let e = host.on_input(2, 0, position, &x(0.5), 0).unwrap_err();
        assert!(
            e.is_stale() && matches!(e, DataPlaneError::StaleRequest { request: 2, why: Stale::Finished, .. }),
            "{e}"
        );
    }
    assert_eq!(host.memory().requests.iter().map(|r| r.request_id).collect::<Vec<_>>(), vec![1, 3]);
    // The other requests carry on where they were.
    let next = host.on_input(3, 0, 1, &x(0.25), 0).unwrap();
    let mut alone = ShardHost::new(runtime(), Manifest::load_variant(models(), "tiny").unwrap(), "uav1").unwrap();
    alone.apply_plan(plan(1, 0, 0, vec![stage("uav1", 0, 4, 0, 0)])).unwrap();
    alone.on_input(7, 0, 0, &x(0.5), 0).unwrap();
    assert_eq!(out(&next), out(&alone.on_input(7, 0, 1, &x(0.25), 0).unwrap()));
}

#[test]
fn gateway_steps_are_the_prompt_chunks_then_one_token_each_and_step_at_finds_them() {
    let (prompt, generated) = ([7, 8, 9], [1, 2, 3]);
    let steps = gateway_steps(&prompt, &generated, 0, 5);
    assert_eq!(steps, vec![(0, &prompt[..]), (3, &generated[..1]), (4, &generated[1..2])]);
    assert!(gateway_steps(&prompt, &generated, 0, 0).is_empty());
    assert_eq!(gateway_steps(&prompt, &generated, 0, 3), vec![(0, &prompt[..])]);
    // From a position: the step that holds it and the later ones.
    assert_eq!(gateway_steps(&prompt, &generated, 2, 5), steps);
    assert_eq!(gateway_steps(&prompt, &generated, 3, 5), steps[1..]);
    assert_eq!(gateway_steps(&prompt, &generated, 5, 5), vec![]);
    // A prompt of two and a half chunks, in the middle of it and after it.
    let c = PREFILL_CHUNK_TOKENS;
    let prompt: Vec<u32> = (0..(2 * c + c / 2) as u32).collect();
    let starts = |from, upto| {
        gateway_steps(&prompt, &generated, from, upto).iter().map(|s| (s.0, s.1.len())).collect::<Vec<_>>()
    };
    assert_eq!(starts(0, c + 1), vec![(0, c), (c, c)]);
    assert_eq!(starts(0, prompt.len() + 1), vec![(0, c), (c, c), (2 * c, c / 2), (prompt.len(), 1)]);
    assert_eq!(starts(c + 1, prompt.len() + 1), vec![(c, c), (2 * c, c / 2), (prompt.len(), 1)]);
    // step_at finds the same steps by their position, and nothing between them or beyond.
    let end = prompt.len() + generated.len();
    for (position, ids) in gateway_steps(&prompt, &generated, 0, end) {
        assert_eq!(step_at(&prompt, &generated, position), Some(ids));
    }
    assert_eq!(step_at(&prompt, &generated, 1), None);
    assert_eq!(step_at(&prompt, &generated, end), None);
}

#[test]
fn a_plan_that_needs_state_nobody_holds_is_refused_with_the_layer() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut host = ShardHost::new(rt, m, "uav3").unwrap();
    host.apply_plan(plan(1, 1, 0, vec![stage("uav1", 0, 2, 0, 0), stage("uav3", 2, 2, 0, 0)])).unwrap();
    // resuming at token 5 on layers 0..4 that uav3 never computed
    let bad = plan(2, 1, 5, vec![stage("uav3", 0, 4, 0, 0)]);
    let e = host.apply_plan(bad).unwrap_err().to_string();
    assert!(e.contains("layer 2 is assigned to uav3 but uav3 holds no state for it at token 5"), "{e}");
    let overlap = plan(3, 1, 0, vec![stage("uav1", 0, 3, 0, 0), stage("uav3", 2, 2, 0, 0)]);
    assert!(host.apply_plan(overlap).unwrap_err().to_string().contains("assigned twice"));
    // uav3 runs 3, 0, 1: its predecessor can replicate layer 3 only (layer 0 takes embeddings)
    let past_gateway = plan(4, 1, 0, vec![stage("uav1", 2, 1, 0, 0), stage("uav3", 3, 3, 2, 0)]);
    let e = host.apply_plan(past_gateway).unwrap_err().to_string();
    assert!(e.contains("uav3: a head replica of 2 layers from layer 3 reaches past the gateway"), "{e}");
}

#[test]
fn holds_agrees_with_the_listed_layers_for_every_stage_shape() {
    // Including stages that wrap around the gateway and layers past the model's last.
    for num_layers in 1..=6 {
        for start in 0..num_layers {
            for len in 1..=num_layers {
                let s = stage("uav1", start, len, 0, 0);
                let p = SwarmPlan {
                    epoch: 1,
                    num_layers,
                    stages: vec![s.clone()],
                    request_id: 1,
                    resume_position: 0,
                    replay_from: 0,
                    requests: Vec::new(),
                };
                for layer in 0..num_layers + 2 {
                    assert_eq!(p.holds(&s, layer), p.layers(&s).contains(&layer), "L={num_layers} {s:?} layer {layer}");
                }
            }
        }
    }
}

#[test]
fn a_replica_seeded_steps_after_the_plan_catches_up_and_protects_the_next_failover() {
    // uav2 dies after 4 tokens: uav1 promotes layer 1 and becomes uav3's predecessor, with a new
    // replica of uav3's head (layer 2) to be seeded by uav3. The seed (and every snapshot) arrives
    // only 3 steps later; the swarm serves meanwhile. Then uav3 dies: uav1 runs its layers 2
    // (the late-seeded replica) and 3 (uav3's snapshot plus the replay of what the replica fed
    // uav3's tail). The answer is that of one shard of all layers.
    let first = plan(1, 7, 0, vec![stage("uav1", 0, 1, 1, 0), stage("uav2", 1, 2, 1, 2), stage("uav3", 3, 1, 0, 1)]);
    let second = plan(2, 7, 0, vec![stage("uav1", 0, 2, 1, 1), stage("uav3", 2, 2, 1, 1)]);
    let third = plan(3, 7, 0, vec![stage("uav1", 0, 4, 0, 0)]);
    let n = 14;
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    let prompt = gateway.encode_chat(SHORT).unwrap();
    let want = reference(&rt, &m, &mut gateway, &prompt, n, ActivationCodec::Raw);
    let hosts = first.stages.iter().map(|s| (s.uav.clone(), ShardHost::new(rt.clone(), m.clone(), &s.uav).unwrap()));
    let mut swarm = Swarm::new(hosts, ActivationCodec::Raw);
    swarm.apply(&first, None);
    // (position to fail at, who, the plan after it)
    let mut failures = VecDeque::from([(prompt.len() + 3, "uav2", second), (prompt.len() + 9, "uav3", third)]);
    let (mut got, mut current) = (Vec::new(), first);
    let mut steps = Steps::default();
    let mut release_at = None;
    let mut served_while_pending = 0;
    loop {
        let position = steps.position;
        if failures.front().is_some_and(|f| f.0 == position) {
            let (_, failed, mut next) = failures.pop_front().unwrap();
            let succ = current.succ(failed).unwrap().uav.clone();
            next.resume_position = position;
            next.replay_from = swarm.hosts[&succ].pred_snapshot_tokens(current.request_id).min(position);
            swarm.kill(failed);
            if release_at.is_none() {
                swarm.held = Some(Vec::new());
                release_at = Some(position + 3);
            }
            swarm.apply(&next, None);
            current = next;
            steps.resume();
        }
        if release_at == Some(position) {
            assert!(swarm.hosts["uav1"].replica_pending(), "the seed was held back");
            swarm.release_kv();
        } else {
            served_while_pending += usize::from(swarm.hosts.get("uav1").is_some_and(ShardHost::replica_pending));
        }
        if steps.next(&mut swarm, &current, &mut gateway, &prompt, &mut got, n) {
            break;
        }
    }
    assert_eq!(served_while_pending, 3, "steps served while the replica waited for its seed");
    assert!(failures.is_empty() && !swarm.hosts["uav1"].replica_pending());
    assert_eq!(got, want);
}

#[test]
fn the_memory_a_host_reports_is_its_weights_once_and_the_requests_rows() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    let weights =
        |layers: &[usize]| -> u64 { layers.iter().map(|&l| m.interval_memory(l, l + 1).unwrap().weight_bytes).sum() };
    let per_token_layer = m.architecture.kv_bytes_per_token_per_layer();
    let row_bytes = (m.architecture.hidden * 4) as u64; // one raw f32 hidden state
                                                        // uav1 holds layer 0 and uav2's head (layer 1); uav3 holds layer 3 and uav2's tail snapshot.
    let stages = vec![stage("uav1", 0, 1, 0, 0), stage("uav2", 1, 2, 1, 2), stage("uav3", 3, 1, 0, 1)];
    let first = plan(1, 9, 0, stages);
    let hosts = ["uav1", "uav2", "uav3"].map(|u| (u.to_string(), ShardHost::new(rt.clone(), m.clone(), u).unwrap()));
    let mut swarm = Swarm::new(hosts, ActivationCodec::Raw);
    swarm.apply(&first, None);
    // Loaded, the plan's request not begun: weights only.
    let idle = swarm.hosts["uav1"].memory();
    assert_eq!(idle.weight_bytes, weights(&[0, 1]));
    assert_eq!(
        idle.requests,
        vec![RequestMemory { request_id: 9, kv_tokens: 0, kv_bytes: 0, pred_snapshot_tokens: 0 }]
    );
    assert_eq!(idle.total(), idle.weight_bytes);
    let prompt = gateway.encode_chat(SHORT).unwrap();
    swarm.send(&first, &mut gateway, &prompt, 0);
    swarm.drain().unwrap();
    for position in prompt.len()..prompt.len() + 5 {
        swarm.send(&first, &mut gateway, &[42], position);
        swarm.drain().unwrap();
    }
    let n = (prompt.len() + 5) as u64;
    let snapshot = |uav: &str| swarm.hosts[uav].pred_snapshot_tokens(9) as u64;
    // uav1: KV of layers 0 and 1, uav2's tail input buffered for every position, and the
    // snapshot of uav3's tail (layer 3) as far as it reached.
    let uav1 = swarm.hosts["uav1"].memory();
    assert_eq!(uav1.weight_bytes, weights(&[0, 1]));
    assert_eq!(uav1.requests.len(), 1);
    let r = uav1.requests[0];
    assert_eq!((r.request_id, r.kv_tokens as u64), (9, n));
    assert!(snapshot("uav1") > 0);
    assert_eq!(r.pred_snapshot_tokens as u64, snapshot("uav1"));
    assert_eq!(r.kv_bytes, (2 * n + snapshot("uav1")) * per_token_layer + n * row_bytes);
    assert_eq!(uav1.total(), uav1.weight_bytes + r.kv_bytes);
    // uav3: KV of layer 3, the snapshot of uav2's tail (layer 2), and uav1's input (uav1's tail
    // has no head before it).
    let uav3 = swarm.hosts["uav3"].memory();
    assert!(snapshot("uav3") > 0);
    assert_eq!(uav3.weight_bytes, weights(&[3]));
    assert_eq!(uav3.requests[0].kv_bytes, (n + snapshot("uav3")) * per_token_layer + n * row_bytes);
    // uav2 fails: uav1 promotes its replica of layer 1 (the loaded layer, not a second copy) and
    // takes uav3's head (layer 2) as its new replica; each layer's weights count once.
    let recovery = SwarmPlan {
        resume_position: n as usize,
        ..plan(2, 9, 0, vec![stage("uav1", 0, 2, 1, 1), stage("uav3", 2, 2, 1, 1)])
    };
    swarm.kill("uav2");
    swarm.apply(&recovery, None);
    let uav1 = swarm.hosts["uav1"].memory();
    assert_eq!(uav1.weight_bytes, weights(&[0, 1, 2]));
    assert_eq!(uav1.requests[0].kv_tokens as u64, n);
}

/// A third prompt, of one chunk, for the runs with several requests.
const OTHER: &str = "Name three things a relay drone does above a camp.";

/// One request's gateway side when several share the swarm: its steps sent as the scheduler
/// sends them (the prompt's chunks, then one token each, up to [`WINDOW`] in flight), its outputs
/// in position order.
struct Job {
    id: u64,
    prompt: Vec<u32>,
    n: usize,
    /// Outputs the swarm gives (any request's) before this request starts.
    start: usize,
    got: Vec<u32>,
    /// The step whose output the gateway waits for, the next step to send, steps in flight.
    position: usize,
    sent_until: usize,
    in_flight: usize,
    /// Every output, in position order: compared bit by bit between runs.
    outputs: Vec<Hidden>,
    /// The `context_tokens` the gateway sends for it (0: unknown).
    context: usize,
}

impl Job {
    fn new(id: u64, gateway: &mut Gateway, user: &str, n: usize, start: usize) -> Job {
        let prompt = gateway.encode_chat(user).unwrap();
        Job {
            id,
            prompt,
            n,
            start,
            got: Vec::new(),
            position: 0,
            sent_until: 0,
            in_flight: 0,
            outputs: Vec::new(),
            context: 0,
        }
    }
    fn done(&self) -> bool {
        self.got.len() == self.n
    }
    fn fill(&mut self, swarm: &mut Swarm, plan: &SwarmPlan, gateway: &mut Gateway) {
        while !self.done() && self.in_flight < WINDOW {
            let Some(ids) = step_at(&self.prompt, &self.got, self.sent_until) else { break };
            swarm.send_request(plan, gateway, self.id, ids, self.sent_until);
            (self.sent_until, self.in_flight) = (self.sent_until + ids.len(), self.in_flight + 1);
        }
    }
    fn take(&mut self, gateway: &mut Gateway, position: usize, out: Hidden) {
        assert_eq!(position, self.position, "request {}: outputs in order", self.id);
        self.in_flight -= 1;
        self.position += step_at(&self.prompt, &self.got, position).unwrap().len();
        if self.position >= self.prompt.len() {
            self.got.push(argmax(&gateway.logits(&out).unwrap()).unwrap());
        }
        self.outputs.push(out);
    }
}

/// A UAV killed once the swarm has given `at` outputs (none if it is not in the plan: a new plan
/// for another reason); `next`'s stages take over, carrying every request in flight. `hold_kv`: KV rows (seeds, snapshots) sent from then on arrive that many
/// outputs later (paced behind the activations, as over a radio).
struct Failure {
    at: usize,
    failed: &'static str,
    next: SwarmPlan,
    hold_kv: Option<usize>,
}

/// What a run with several requests gave.
struct JobsRun {
    jobs: Vec<Job>,
    /// The request of every output, in the order the gateway got them.
    order: Vec<u64>,
    /// Most requests any UAV held at once.
    most_held: usize,
    /// What each failover plan carried.
    carried: Vec<Vec<RequestResume>>,
    /// Replayed input chunks `(request, position, tokens)`, per failover.
    replayed: Vec<Vec<(u64, usize, usize)>>,
    /// Outputs given while a head replica waited for a seed.
    served_while_pending: usize,
    /// After each new plan, the requests whose head replica waits for a seed (on any UAV).
    seeds_pending: Vec<Vec<u64>>,
    /// Every KV capacity each request's caches had, on any UAV and layer, over the run.
    capacities: BTreeMap<u64, BTreeSet<usize>>,
    /// Most KV bytes the swarm had allocated at once (every UAV's caches at their capacities).
    most_reserved: u64,
}

/// Runs `jobs` through the swarm of `first` at once, each keeping up to [`WINDOW`] steps in
/// flight, with `failures` on the way (the harness plays the scheduler: the failover plan carries
/// every request in flight, each resuming at its next position, its `replay_from` from the
/// successor's heartbeat entry for it, and the gateway's embeddings replayed per request for a
/// stage around the gateway). A request that has all its tokens is finished on every UAV.
fn run_jobs(
    rt: &Runtime,
    m: &Manifest,
    gateway: &mut Gateway,
    first: SwarmPlan,
    jobs: Vec<Job>,
    failures: Vec<Failure>,
) -> JobsRun {
    run_jobs_with(rt, m, gateway, first, jobs, failures, false)
}

/// [`run_jobs`]; `kv_first`: KV rows overtake the activations sent before them.
fn run_jobs_with(
    rt: &Runtime,
    m: &Manifest,
    gateway: &mut Gateway,
    first: SwarmPlan,
    mut jobs: Vec<Job>,
    failures: Vec<Failure>,
    kv_first: bool,
) -> JobsRun {
    let hosts = first.stages.iter().map(|s| (s.uav.clone(), ShardHost::new(rt.clone(), m.clone(), &s.uav).unwrap()));
    let mut swarm = Swarm::new(hosts, ActivationCodec::Raw);
    swarm.kv_first = kv_first;
    swarm.context = jobs.iter().filter(|j| j.context > 0).map(|j| (j.id, j.context)).collect();
    let (mut capacities, mut most_reserved) = (BTreeMap::<u64, BTreeSet<usize>>::new(), 0);
    swarm.apply(&first, None);
    let mut current = first;
    let mut failures = VecDeque::from(failures);
    let (mut taken, mut order, mut most_held, mut release_at) = (0, Vec::new(), 0, None);
    let (mut carried, mut replayed, mut served_while_pending) = (Vec::new(), Vec::new(), 0);
    let mut seeds_pending = Vec::new();
    loop {
        if release_at == Some(taken) {
            swarm.release_kv();
            release_at = None;
        }
        if failures.front().is_some_and(|f| f.at == taken) {
            let Failure { failed, mut next, hold_kv, .. } = failures.pop_front().unwrap();
            // What the failed UAV's successor reports per request in its heartbeat's `kv`.
            let succ = current.succ(failed).map_or(String::new(), |s| s.uav.clone());
            let held: BTreeMap<u64, usize> = swarm.hosts.get(&succ).map_or(BTreeMap::new(), |h| {
                h.memory().requests.iter().map(|r| (r.request_id, r.pred_snapshot_tokens)).collect()
            });
            if current.stage(failed).is_some() {
                swarm.kill(failed);
            } else {
                // No failure (a plan for another reason): the activations in flight are of the
                // old epoch all the same.
                swarm.queue.retain(|(_, e)| !matches!(e, Emit::Activation { .. }));
            }
            next.requests = jobs
                .iter()
                .filter(|j| j.start <= taken && !j.done())
                .map(|j| RequestResume {
                    request_id: j.id,
                    resume_position: j.position,
                    replay_from: held.get(&j.id).copied().unwrap_or(0).min(j.position),
                })
                .collect();
            let decision = next.requests[0];
            (next.request_id, next.resume_position, next.replay_from) =
                (decision.request_id, decision.resume_position, decision.replay_from);
            let mut embeddings = Vec::new();
            if current.stage(failed).is_some_and(|old| current.tail_needs_gateway_replay(old)) {
                for (r, j) in next.requests.iter().zip(jobs.iter().filter(|j| j.start <= taken && !j.done())) {
                    embeddings.push(Emit::Replay {
                        failed: failed.into(),
                        to: succ.clone(),
                        boundary: 0,
                        request_id: j.id,
                        chunks: gateway_steps(&j.prompt, &j.got, r.replay_from, r.resume_position)
                            .into_iter()
                            .map(|(pos, ids)| (pos, encode(ActivationCodec::Raw, &gateway.embed(ids).unwrap())))
                            .collect(),
                        context_tokens: swarm.context.get(&j.id).copied().unwrap_or(0),
                    });
                }
            }
            // KV rows of the old epoch still held never arrive (the executors drop them).
            (swarm.held, release_at) = (None, None);
            if let Some(later) = hold_kv {
                swarm.held = Some(Vec::new());
                release_at = Some(taken + later);
            }
            swarm.replayed.clear();
            swarm.apply_all(&next, embeddings);
            carried.push(next.requests.clone());
            let mut waiting: Vec<u64> = swarm.hosts.values().flat_map(ShardHost::seeds_pending).collect();
            waiting.sort_unstable();
            seeds_pending.push(waiting);
            replayed.push(std::mem::take(&mut swarm.replayed));
            current = next;
            for j in &mut jobs {
                (j.sent_until, j.in_flight) = (j.position, 0);
            }
        }
        for j in jobs.iter_mut().filter(|j| j.start <= taken) {
            j.fill(&mut swarm, &current, gateway);
        }
        most_held = most_held.max(swarm.hosts.values().map(|h| h.memory().requests.len()).max().unwrap_or(0));
        if jobs.iter().all(Job::done) {
            break;
        }
        let (id, position, out) = swarm.drain_any().expect("a step in flight answers");
        for h in swarm.hosts.values() {
            for r in h.requests() {
                capacities.entry(r).or_default().extend(h.kv_capacity(r).into_iter().map(|(_, c)| c));
            }
        }
        most_reserved = most_reserved.max(swarm.hosts.values().map(ShardHost::kv_reserved_bytes).sum());
        let j = jobs.iter_mut().find(|j| j.id == id).unwrap();
        j.take(gateway, position, out);
        if j.done() {
            for h in swarm.hosts.values_mut() {
                h.finish_request(id);
            }
        }
        order.push(id);
        taken += 1;
        served_while_pending += usize::from(swarm.hosts.values().any(ShardHost::replica_pending));
    }
    assert!(failures.is_empty() && release_at.is_none(), "every failure happened, every KV row arrived");
    for h in swarm.hosts.values() {
        assert!(h.memory().requests.is_empty() && !h.replica_pending(), "finished requests leave nothing behind");
    }
    JobsRun {
        jobs,
        order,
        most_held,
        carried,
        replayed,
        served_while_pending,
        seeds_pending,
        capacities,
        most_reserved,
    }
}

/// The three requests of the runs below (ids, prompts, tokens, when each joins).
fn three_jobs(gateway: &mut Gateway) -> Vec<Job> {
    vec![Job::new(11, gateway, SHORT, 10, 0), Job::new(12, gateway, LONG, 8, 2), Job::new(13, gateway, OTHER, 9, 5)]
}

/// Every job of `got` gave bit for bit the outputs of the same job in `want`, and one shard's
/// greedy tokens.
fn assert_same_outputs(got: &JobsRun, want: &[Job], rt: &Runtime, m: &Manifest, gateway: &mut Gateway, case: &str) {
    for (g, w) in got.jobs.iter().zip(want) {
        assert_eq!(g.id, w.id);
        assert_eq!(g.outputs.len(), w.outputs.len(), "{case}: request {}", g.id);
        for (i, (a, b)) in g.outputs.iter().zip(&w.outputs).enumerate() {
            assert!(a.bit_identical(b), "{case}: request {} output {i} differs", g.id);
        }
        let reference = reference(rt, m, gateway, &g.prompt, g.n, ActivationCodec::Raw);
        assert_eq!(g.got, reference, "{case}: request {}", g.id);
    }
}

/// The middle stage's head is replicated on uav1, its tail snapshotted to uav3 every 2 tokens.
fn three_stages() -> Vec<Stage> {
    vec![stage("uav1", 0, 1, 1, 0), stage("uav2", 1, 2, 1, 2), stage("uav3", 3, 1, 0, 1)]
}

#[test]
fn requests_interleaved_step_by_step_give_the_outputs_of_each_run_alone() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    // No request in the plan: each starts with its step at position 0.
    let first = plan(1, 0, 0, three_stages());
    let together = {
        let jobs = three_jobs(&mut gateway);
        run_jobs(&rt, &m, &mut gateway, first.clone(), jobs, Vec::new())
    };
    assert_eq!(together.most_held, 3, "the three requests were held at once");
    // The outputs of the requests alternate (their steps share the pipeline).
    let switches = together.order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches >= 10, "{:?}", together.order);
    let alone: Vec<Job> = three_jobs(&mut gateway)
        .into_iter()
        .map(|j| {
            let j = Job { start: 0, ..j };
            run_jobs(&rt, &m, &mut gateway, first.clone(), vec![j], Vec::new()).jobs.remove(0)
        })
        .collect();
    assert_same_outputs(&together, &alone, &rt, &m, &mut gateway, "interleaved");
}

#[test]
fn a_failure_with_requests_in_flight_at_different_positions_recovers_each_exactly() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    let scenarios = [
        // The middle stage: uav1 promotes layer 1, uav3 restores layer 2 from each request's snapshot
        // and replays what uav1 buffered for it.
        (
            plan(1, 0, 0, three_stages()),
            "uav2",
            plan(2, 0, 0, vec![stage("uav1", 0, 2, 1, 1), stage("uav3", 2, 2, 1, 1)]),
        ),
        // Around the gateway: uav1 restores layers 3 and 0, replays uav2's buffer and the gateway's
        // embeddings, per request.
        (
            plan(1, 0, 0, vec![stage("uav1", 1, 1, 0, 2), stage("uav2", 2, 1, 0, 2), stage("uav3", 3, 2, 0, 2)]),
            "uav3",
            plan(2, 0, 0, vec![stage("uav1", 3, 3, 0, 2), stage("uav2", 2, 1, 0, 2)]),
        ),
    ];
    for (first, failed, next) in scenarios {
        let want = {
            let jobs = three_jobs(&mut gateway);
            run_jobs(&rt, &m, &mut gateway, first.clone(), jobs, Vec::new())
        }
        .jobs;
        // While the long prompt's chunks are in flight, after they are through, late in the answers.
        for at in [4, 9, 16] {
            let failures = vec![Failure { at, failed, next: next.clone(), hold_kv: None }];
            let got = {
                let jobs = three_jobs(&mut gateway);
                run_jobs(&rt, &m, &mut gateway, first.clone(), jobs, failures)
            };
            let case = format!("{failed} killed after {at} outputs");
            assert_same_outputs(&got, &want, &rt, &m, &mut gateway, &case);
            // Several requests carried, each at its own position; only what followed each
            // request's snapshot was replayed.
            let carried = &got.carried[0];
            let positions: BTreeSet<usize> = carried.iter().map(|r| r.resume_position).collect();
            assert!(carried.len() >= 2 && positions.len() == carried.len(), "{case}: {carried:?}");
            for &(request, position, tokens) in &got.replayed[0] {
                let r = carried.iter().find(|r| r.request_id == request).unwrap();
                assert!(position + tokens > r.replay_from && position < r.resume_position, "{case}: {carried:?}");
            }
            eprintln!("{case}: carried {carried:?}, replayed {:?}", got.replayed[0]);
        }
    }
}

#[test]
fn seeds_per_request_arrive_late_and_the_replicas_protect_the_next_failover() {
    // uav2 dies: uav1 takes a new replica of uav3's head (layer 2), seeded by uav3 once per
    // request in flight; the seeds arrive 4 outputs later while every request is served. Then
    // uav3 dies: uav1 runs layer 2 (the late-seeded replica) and layer 3 (uav3's snapshot of each
    // request and the replay of what the replica fed it).
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    let first = plan(1, 0, 0, three_stages());
    let second = plan(2, 0, 0, vec![stage("uav1", 0, 2, 1, 1), stage("uav3", 2, 2, 1, 1)]);
    let third = plan(3, 0, 0, vec![stage("uav1", 0, 4, 0, 0)]);
    let want = {
        let jobs = three_jobs(&mut gateway);
        run_jobs(&rt, &m, &mut gateway, first.clone(), jobs, Vec::new())
    }
    .jobs;
    // The first failure after request 13 started (three carried), or before (13 starts while
    // the seeds of 11 and 12 are on their way: a new request needs none).
    for (at, carried) in [(7, [3, 3]), (4, [2, 3])] {
        let failures = vec![
            Failure { at, failed: "uav2", next: second.clone(), hold_kv: Some(4) },
            Failure { at: 17, failed: "uav3", next: third.clone(), hold_kv: None },
        ];
        let got = {
            let jobs = three_jobs(&mut gateway);
            run_jobs(&rt, &m, &mut gateway, first.clone(), jobs, failures)
        };
        let case = format!("uav2 killed after {at} outputs, uav3 after 17, late seeds");
        assert_same_outputs(&got, &want, &rt, &m, &mut gateway, &case);
        assert_eq!(got.served_while_pending, 4, "{case}: outputs served while the seeds were on their way");
        assert_eq!(got.carried.iter().map(Vec::len).collect::<Vec<_>>(), carried, "{case}");
    }
}

#[test]
fn a_replica_short_for_some_requests_is_seeded_again_for_those_only() {
    // uav2 dies after 4 outputs: uav1's new replica of layer 2 waits for the seeds of requests 11
    // and 12, held back; request 13 starts meanwhile and runs through it from position 0. A new
    // plan (same stages, no failure) comes before those seeds: the replica layer is short for 11
    // and 12 (they start over there and wait for this epoch's seeds) and intact for 13 (its rows
    // stay: reloading the layer would drop them). Then uav3 dies and uav1 runs layer 2 for all.
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    let first = plan(1, 0, 0, three_stages());
    let second = plan(2, 0, 0, vec![stage("uav1", 0, 2, 1, 1), stage("uav3", 2, 2, 1, 1)]);
    let third = SwarmPlan { epoch: 3, ..second.clone() };
    let fourth = plan(4, 0, 0, vec![stage("uav1", 0, 4, 0, 0)]);
    let want = {
        let jobs = three_jobs(&mut gateway);
        run_jobs(&rt, &m, &mut gateway, first.clone(), jobs, Vec::new())
    }
    .jobs;
    let failures = vec![
        Failure { at: 4, failed: "uav2", next: second, hold_kv: Some(100) },
        Failure { at: 7, failed: "none", next: third, hold_kv: Some(3) },
        Failure { at: 17, failed: "uav3", next: fourth, hold_kv: None },
    ];
    let got = {
        let jobs = three_jobs(&mut gateway);
        run_jobs(&rt, &m, &mut gateway, first, jobs, failures)
    };
    assert_same_outputs(&got, &want, &rt, &m, &mut gateway, "a re-plan before the seeds");
    assert_eq!(got.carried.iter().map(Vec::len).collect::<Vec<_>>(), [2, 3, 3]);
    assert_eq!(got.seeds_pending[1], vec![11, 12], "13 is intact on the replica: no seed");
}

#[test]
fn a_plan_that_does_not_carry_a_request_drops_it_and_memory_has_one_entry_per_request() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    let first = plan(1, 0, 0, three_stages());
    let hosts = ["uav1", "uav2", "uav3"].map(|u| (u.to_string(), ShardHost::new(rt.clone(), m.clone(), u).unwrap()));
    let mut swarm = Swarm::new(hosts, ActivationCodec::Raw);
    swarm.apply(&first, None);
    let prompt = gateway.encode_chat(SHORT).unwrap();
    // Request 21: the prompt and 4 tokens; request 22: the prompt and 1 token.
    let mut outputs = BTreeMap::new();
    for (id, tokens) in [(21, 4), (22, 1)] {
        swarm.send_request(&first, &mut gateway, id, &prompt, 0);
        outputs.insert(id, swarm.drain().unwrap());
        for position in prompt.len()..prompt.len() + tokens {
            swarm.send_request(&first, &mut gateway, id, &[42], position);
            swarm.drain().unwrap();
        }
    }
    let n = prompt.len();
    for (uav, host) in &swarm.hosts {
        let memory = host.memory();
        let held: Vec<(u64, usize)> = memory.requests.iter().map(|r| (r.request_id, r.kv_tokens)).collect();
        assert_eq!(held, vec![(21, n + 4), (22, n + 1)], "{uav}");
        assert!(memory.requests.iter().all(|r| r.kv_bytes > 0 && r.pred_snapshot_tokens <= r.kv_tokens), "{uav}");
        assert_eq!(memory.total(), memory.weight_bytes + memory.requests.iter().map(|r| r.kv_bytes).sum::<u64>());
    }
    // uav3 holds uav2's tail snapshot of each request, as far as each went.
    let snap = |id| swarm.hosts["uav3"].pred_snapshot_tokens(id);
    assert!(snap(21) > n && snap(22) >= n, "{} {}", snap(21), snap(22));
    // A plan (the same stages) that carries request 21 cut back by one token, not 22.
    let carried = RequestResume { request_id: 21, resume_position: n + 3, replay_from: 0 };
    let second = SwarmPlan { requests: vec![carried], ..plan(2, 21, n + 3, three_stages()) };
    swarm.apply(&second, None);
    // 22's snapshots still on their way when the plan came are dropped as stale.
    assert!(!swarm.stale_kv.is_empty() && swarm.stale_kv.iter().all(|&r| r == 22), "{:?}", swarm.stale_kv);
    for (uav, host) in &swarm.hosts {
        let held: Vec<(u64, usize)> = host.memory().requests.iter().map(|r| (r.request_id, r.kv_tokens)).collect();
        assert_eq!(held, vec![(21, n + 3)], "{uav}");
        assert_eq!(host.kv_tokens(22), 0);
    }
    // 22's stragglers are stale; it may start again from position 0, and gives the same output.
    let x = encode(ActivationCodec::Raw, &gateway.embed(&[42]).unwrap());
    let e = swarm.hosts.get_mut("uav1").unwrap().on_input(22, 0, n + 1, &x, 0).unwrap_err();
    assert!(matches!(e, DataPlaneError::StaleRequest { request: 22, why: Stale::NotStarted, .. }), "{e}");
    let e = swarm.hosts.get_mut("uav3").unwrap().on_successor_input(22, 1, n + 1, &x, 0);
    assert!(e.is_ok(), "uav3 replicates nobody's head: not its successor's input");
    let e = swarm.hosts.get_mut("uav1").unwrap().on_successor_input(22, 1, n + 1, &x, 0).unwrap_err();
    assert!(matches!(e, DataPlaneError::StaleRequest { request: 22, .. }), "{e}");
    swarm.send_request(&second, &mut gateway, 22, &prompt, 0);
    assert!(swarm.drain().unwrap().bit_identical(&outputs[&22]));
    // A fresh plan (nothing carried) drops everything.
    swarm.apply(&plan(3, 0, 0, three_stages()), None);
    assert!(swarm.hosts.values().all(|h| h.memory().requests.is_empty()));
}

#[test]
fn a_host_holds_at_most_the_carried_requests_bound_and_refuses_more() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let width = m.architecture.hidden;
    let mut host = ShardHost::new(rt, m, "uav1").unwrap();
    // One layer here (the rest elsewhere): 64 contexts of one layer's caches.
    host.apply_plan(plan(1, 0, 0, vec![stage("uav1", 0, 1, 0, 0), stage("uav2", 1, 3, 0, 0)])).unwrap();
    let x = Encoded::encode(ActivationCodec::Raw, &vec![0.5; width], width).unwrap();
    for id in 1..=MAX_CARRIED_REQUESTS as u64 {
        host.on_input(id, 0, 0, &x, 0).unwrap();
    }
    let e = host.on_input(1000, 0, 0, &x, 0).unwrap_err();
    assert!(!e.is_stale() && matches!(e, DataPlaneError::TooManyRequests { request: 1000, held: 64 }), "{e}");
    assert_eq!(host.requests().len(), MAX_CARRIED_REQUESTS);
    // The requests held are served on; a finished one makes room.
    host.on_input(5, 0, 1, &x, 0).unwrap();
    host.finish_request(5);
    host.on_input(1000, 0, 0, &x, 0).unwrap();
    assert_eq!(host.kv_tokens(1000), 1);
}

#[test]
fn each_requests_caches_are_sized_for_its_context_tokens_and_the_outputs_do_not_change() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let max = m.architecture.max_context;
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    let first = plan(1, 0, 0, three_stages());
    let jobs = three_jobs(&mut gateway);
    let unknown = run_jobs(&rt, &m, &mut gateway, first.clone(), jobs, Vec::new());
    // The gateway knows each request's prompt + maximum answer (one of them with room to spare).
    let mut jobs = three_jobs(&mut gateway);
    for (j, spare) in jobs.iter_mut().zip([0, 5, 0]) {
        j.context = j.prompt.len() + j.n + spare;
    }
    let want: BTreeMap<u64, BTreeSet<usize>> = jobs.iter().map(|j| (j.id, BTreeSet::from([j.context]))).collect();
    let sized = run_jobs(&rt, &m, &mut gateway, first, jobs, Vec::new());
    assert_eq!(sized.capacities, want, "every layer of every UAV, for each request its own figure");
    let everywhere: BTreeMap<u64, BTreeSet<usize>> = want.keys().map(|&id| (id, BTreeSet::from([max]))).collect();
    assert_eq!(unknown.capacities, everywhere, "unknown: the model's context");
    assert_same_outputs(&sized, &unknown.jobs, &rt, &m, &mut gateway, "sized caches");
    // What the swarm reserved at most: the three requests' figures, not three model contexts.
    let per_token = m.architecture.kv_bytes_per_token_per_layer();
    let layers = m.architecture.layers as u64;
    // Every layer once plus the head replicas of uav2 (layer 1, on uav1) and uav1 (layer 0, on uav3).
    let most = |figures: &[usize]| figures.iter().map(|&f| f as u64).sum::<u64>() * (layers + 2) * per_token;
    let figures: Vec<usize> = want.values().flatten().copied().collect();
    assert!(sized.most_reserved <= most(&figures), "{} > {}", sized.most_reserved, most(&figures));
    assert_eq!(unknown.most_reserved, most(&[max; 3]));
    assert!(sized.most_reserved * 10 < unknown.most_reserved, "{} {}", sized.most_reserved, unknown.most_reserved);
    println!(
        "KV reserved at most: {} bytes with context_tokens {figures:?}, {} unknown",
        sized.most_reserved, unknown.most_reserved
    );
}

#[test]
fn a_larger_context_tokens_grows_the_caches_and_a_step_past_it_gets_the_models_context() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let (width, max, layers) = (m.architecture.hidden, m.architecture.max_context, m.architecture.layers);
    let whole = || vec![stage("uav1", 0, 4, 0, 0)];
    let mut host = ShardHost::new(rt.clone(), m.clone(), "uav1").unwrap();
    let mut reference = ShardHost::new(rt, m, "uav1").unwrap();
    host.apply_plan(plan(1, 0, 0, whole())).unwrap();
    reference.apply_plan(plan(1, 0, 0, whole())).unwrap();
    let x = |v: f32, n: usize| Encoded::encode(ActivationCodec::Raw, &vec![v; n * width], width).unwrap();
    let out = |e: Vec<Emit>| match &e[..] {
        [Emit::Activation { hidden, context_tokens, .. }] => (hidden.clone(), *context_tokens),
        other => panic!("{other:?}"),
    };
    let capacity =
        |h: &ShardHost, r: u64, c: usize| assert_eq!(h.kv_capacity(r), (0..layers).map(|l| (l, c)).collect::<Vec<_>>());
    // (position, tokens, the figure the message carries, the capacity after it)
    let steps = [(0, 3, 5, 5), (3, 1, 5, 5), (4, 1, 9, 9), (5, 1, 0, 9), (6, 1, 7, 9), (7, 3, 9, max)];
    for (i, &(position, tokens, figure, after)) in steps.iter().enumerate() {
        let input = x(0.5 / (i + 1) as f32, tokens);
        let (got, forwarded) = out(host.on_input(4, 0, position, &input, figure).unwrap());
        let (want, _) = out(reference.on_input(4, 0, position, &input, 0).unwrap());
        assert_eq!(got.bytes(), want.bytes(), "step at {position}: the capacity changes no bit");
        assert_eq!(forwarded, after.min(9), "the largest figure seen goes on with the output");
        capacity(&host, 4, after);
        capacity(&reference, 4, max);
    }
    // Another request beside it has its own.
    host.on_input(6, 0, 0, &x(0.25, 2), 3).unwrap();
    capacity(&host, 6, 3);
    capacity(&host, 4, max);
}

#[test]
fn a_snapshot_that_overtakes_the_first_activation_is_kept_and_the_failover_replays_after_it() {
    let rt = runtime();
    let m = Manifest::load_variant(models(), "tiny").unwrap();
    let mut gateway = Gateway::load(&rt, &m).unwrap();
    // A layer each: uav2's (its tail, K = 0) is snapshotted to uav3 every token, and uav3 sees
    // nothing of a request before uav2's output (it replicates uav4's head, not uav1's).
    let ring = vec![
        stage("uav1", 0, 1, 1, 0),
        stage("uav2", 1, 1, 0, 1),
        stage("uav3", 2, 1, 1, 0),
        stage("uav4", 3, 1, 1, 0),
    ];
    let first = plan(1, 0, 0, ring);
    // uav2 dies mid-answer; its snapshots reached uav3 ahead of its activations all along.
    let failure = || Failure {
        at: 9,
        failed: "uav2",
        next: plan(2, 0, 0, vec![stage("uav1", 0, 1, 1, 0), stage("uav3", 1, 2, 0, 1), stage("uav4", 3, 1, 1, 0)]),
        hold_kv: None,
    };
    let jobs = |g: &mut Gateway| vec![Job::new(11, g, SHORT, 10, 0), Job::new(12, g, LONG, 8, 2)];
    let js = jobs(&mut gateway);
    let plain = run_jobs(&rt, &m, &mut gateway, first.clone(), js, Vec::new());
    let js = jobs(&mut gateway);
    let raced = run_jobs_with(&rt, &m, &mut gateway, first, js, vec![failure()], true);
    assert_same_outputs(&raced, &plain.jobs, &rt, &m, &mut gateway, "snapshots first");
    for r in &raced.carried[0] {
        assert!(
            r.replay_from > 0,
            "request {}: replay from {} (the snapshot was dropped)",
            r.request_id,
            r.replay_from
        );
        let replayed: Vec<usize> =
            raced.replayed[0].iter().filter(|(id, ..)| *id == r.request_id).map(|&(_, p, _)| p).collect();
        assert!(replayed.iter().all(|&p| p + 1 > r.replay_from), "request {}: {replayed:?}", r.request_id);
    }
}
