//! The generation requests a scheduler holds (docs/generate-api.md): checked when they arrive,
//! queued (first in, first out, bounded), running, finished (a bounded table, so that a client can
//! resume an answer by its request id), and who follows each one (action goals, service calls)
//! from which token on. No ROS: the node hands its goal and service handles in as `F`.
//!
//! Up to [`Limits::max_running`] requests run at once; the scheduler interleaves their steps.
use aerokv_engine::Sampling;
use std::collections::{BTreeMap, VecDeque};

/// A prompt longer than this many bytes per allowed prompt token is refused before it is
/// tokenized (a hostile client could send megabytes). No token of the model's vocabulary is this
/// long, so no prompt that fits `max_prompt_tokens` is refused by it.
pub const MAX_PROMPT_BYTES_PER_TOKEN: usize = 32;

/// A request as a client writes it: the action's goal and the service's request, without the
/// request id and the resume position. Two goals with the same request id must carry the same one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec {
    pub user: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub ignore_eos: bool,
}

/// The scheduler's limits on requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest answer (`max_tokens_limit`).
    pub max_tokens: u32,
    /// Longest prompt, tokens (`max_prompt_tokens`).
    pub max_prompt_tokens: u32,
    /// The model's context: prompt + answer.
    pub max_context: usize,
    /// Requests that may wait (`max_queue`, at least 1: a request that arrives while the swarm
    /// is idle waits too, until the scheduler takes it).
    pub max_queue: usize,
    /// Finished requests kept for resumption (`finished_kept`).
    pub finished_kept: usize,
    /// Requests served at once (`max_running`, at least 1).
    pub max_running: usize,
}

/// A request checked and ready to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub request_id: u64,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub ignore_eos: bool,
}

/// Why a request is refused (the text goes to the client).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("empty request: set `user` (a question) or `prompt`")]
    Empty,
    #[error("prompt of {bytes} bytes is longer than any prompt of max_prompt_tokens {max_tokens} tokens")]
    PromptBytes { bytes: usize, max_tokens: u32 },
    #[error("max_tokens must be within 1..={limit}, not {got}")]
    MaxTokens { got: u32, limit: u32 },
    #[error("temperature must be finite and >= 0, not {0}")]
    Temperature(f32),
    #[error("top_p must be within [0, 1] (0 or 1: off), not {0}")]
    TopP(f32),
    #[error("cannot tokenize the prompt: {0}")]
    Tokenize(String),
    #[error("the prompt encodes to no tokens")]
    NoTokens,
    #[error("prompt of {prompt} tokens + max_tokens {max_tokens} exceeds the context limit of {limit} tokens")]
    Context { prompt: usize, max_tokens: u32, limit: usize },
    #[error("prompt of {prompt} tokens exceeds max_prompt_tokens {limit} (its prefill time grows with the square of its length)")]
    PromptTooLong { prompt: usize, limit: u32 },
    #[error("{0}")]
    Sampling(String),
    #[error("the queue is full: {max} requests already wait (the scheduler's max_queue); try again later")]
    QueueFull { max: usize },
    #[error("request id {0} belongs to another request (other prompt or options): choose another id, or 0")]
    IdInUse(u64),
    #[error("nothing to resume: request id {id} is not queued, running or among the last finished requests (resume_from {from} needs one)")]
    NothingToResume { id: u64, from: u32 },
    #[error("resume_from {from} is beyond the {have} tokens request {id} has generated")]
    ResumeBeyond { id: u64, from: u32, have: usize },
    #[error("the scheduler is shutting down")]
    ShuttingDown,
    #[error("no UAV is up (no heartbeat and battery health from any shard executor)")]
    NoUav,
    #[error("{uav} cannot hold this request: its weights and the KV of {tokens} tokens (prompt + max_tokens) need {need_bytes} bytes, its memory budget is {budget_bytes} bytes (ask for fewer tokens)")]
    Memory { uav: String, tokens: u64, need_bytes: u64, budget_bytes: u64 },
}

/// Checks a request's fields against the limits; `encode` tokenizes its prompt (the raw `prompt`
/// when set, else `user` in the chat template). The id of the returned job is 0 (the table
/// assigns it).
pub fn check(
    spec: &Spec,
    limits: &Limits,
    encode: impl FnOnce(&Spec) -> Result<Vec<u32>, String>,
) -> Result<Job, Refusal> {
    if spec.prompt.is_empty() && spec.user.is_empty() {
        return Err(Refusal::Empty);
    }
    let bytes = spec.prompt.len().max(spec.user.len());
    if bytes > limits.max_prompt_tokens as usize * MAX_PROMPT_BYTES_PER_TOKEN {
        return Err(Refusal::PromptBytes { bytes, max_tokens: limits.max_prompt_tokens });
    }
    if spec.max_tokens == 0 || spec.max_tokens > limits.max_tokens {
        return Err(Refusal::MaxTokens { got: spec.max_tokens, limit: limits.max_tokens });
    }
    if !spec.temperature.is_finite() || spec.temperature < 0.0 {
        return Err(Refusal::Temperature(spec.temperature));
    }
    if !(0.0..=1.0).contains(&spec.top_p) {
        return Err(Refusal::TopP(spec.top_p));
    }
    let prompt_ids = encode(spec).map_err(Refusal::Tokenize)?;
    if prompt_ids.is_empty() {
        return Err(Refusal::NoTokens);
    }
    if prompt_ids.len() + spec.max_tokens as usize > limits.max_context {
        return Err(Refusal::Context {
            prompt: prompt_ids.len(),
            max_tokens: spec.max_tokens,
            limit: limits.max_context,
        });
    }
    if prompt_ids.len() > limits.max_prompt_tokens as usize {
        return Err(Refusal::PromptTooLong { prompt: prompt_ids.len(), limit: limits.max_prompt_tokens });
    }
    let top_p = (spec.top_p > 0.0).then_some(spec.top_p);
    let sampling = Sampling::from_options(Some(spec.temperature), top_p, Some(spec.seed))
        .map_err(|e| Refusal::Sampling(e.to_string()))?;
    Ok(Job { request_id: 0, prompt_ids, max_tokens: spec.max_tokens as usize, sampling, ignore_eos: spec.ignore_eos })
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model ended the answer (EOS or `<|im_end|>`).
    Eos,
    /// `max_tokens` generated.
    Length,
    /// The model's context is full.
    Context,
    /// The swarm could not go on (the answer's `error` says why).
    Error,
    /// Every client that followed it canceled.
    Canceled,
    /// Never ran (the answer's `error` says why).
    Refused,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
            Finish::Context => "context",
            Finish::Error => "error",
            Finish::Canceled => "canceled",
            Finish::Refused => "refused",
        }
    }

    /// The name [`Self::as_str`] gives (a `TokenChunk`'s `finish_reason`).
    pub fn parse(s: &str) -> Option<Finish> {
        [Finish::Eos, Finish::Length, Finish::Context, Finish::Error, Finish::Canceled, Finish::Refused]
            .into_iter()
            .find(|f| f.as_str() == s)
    }

    /// The answer is complete (the goal succeeds).
    pub fn succeeded(self) -> bool {
        matches!(self, Finish::Eos | Finish::Length | Finish::Context)
    }
}

/// A request's answer, as every client that followed it gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// False when the request never ran (refused, or nobody to serve it).
    pub accepted: bool,
    pub error: String,
    pub request_id: u64,
    pub prompt_ids: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: Finish,
    pub tokens_per_s: f64,
    pub stats_json: String,
}

impl Answer {
    /// The answer to a request that never ran.
    pub fn refused(request_id: u64, why: &Refusal) -> Answer {
        Answer {
            accepted: false,
            error: why.to_string(),
            request_id,
            prompt_ids: Vec::new(),
            tokens: Vec::new(),
            text: String::new(),
            finish: Finish::Refused,
            tokens_per_s: 0.0,
            stats_json: String::new(),
        }
    }
}

/// Tokens a follower has not had yet: `tokens` start at generated token `from`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CatchUp {
    pub from: usize,
    pub tokens: Vec<u32>,
    pub text: String,
}

/// Identifies one follower (one goal or service call) of a request.
pub type FollowerId = u64;

/// A client that follows a request: it gets every token from `from` on, then the answer.
#[derive(Debug)]
pub struct Follower<F> {
    pub id: FollowerId,
    pub from: usize,
    pub sink: F,
}

/// What became of a request that arrived.
#[derive(Debug)]
pub enum Admission<F> {
    /// Queued (a new request, or a follower of one that waits): `ahead` requests run or wait
    /// before it.
    Queued { request_id: u64, follower: FollowerId, ahead: usize },
    /// Follows the running request from `catch_up.from`: send `catch_up` now, then its tokens.
    Following { request_id: u64, follower: FollowerId, catch_up: CatchUp },
    /// The request has finished: send `catch_up`, then `answer`, to `sink`.
    Finished { catch_up: CatchUp, answer: Answer, sink: F },
    /// Refused: tell `sink` why.
    Refused { reason: Refusal, sink: F },
}

/// What a follower's cancel did.
#[derive(Debug)]
pub struct Canceled<F> {
    pub request_id: u64,
    pub sink: F,
    /// The request's tokens so far (for the canceled goal's result).
    pub tokens: Vec<u32>,
    pub text: String,
    pub effect: CancelEffect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelEffect {
    /// Other clients still follow the request: it goes on.
    Detached,
    /// Nobody follows the waiting request any more: it left the queue.
    Dequeued,
    /// Nobody follows the running request any more: the swarm stops its work on it.
    Stop,
}

#[derive(Debug)]
struct Entry<F> {
    spec: Spec,
    job: Job,
    followers: Vec<Follower<F>>,
    tokens: Vec<u32>,
    /// The text each token added, as streamed.
    texts: Vec<String>,
    canceled: bool,
}

impl<F> Entry<F> {
    fn catch_up(&self, from: usize) -> CatchUp {
        if from > self.tokens.len() {
            // A client ahead of this scheduler (it had them from another): it waits for them.
            return CatchUp { from, ..CatchUp::default() };
        }
        CatchUp { from, tokens: self.tokens[from..].to_vec(), text: self.texts[from..].concat() }
    }
}

#[derive(Debug)]
struct Done {
    request_id: u64,
    spec: Spec,
    texts: Vec<String>,
    answer: Answer,
}

/// Every request the scheduler holds.
#[derive(Debug)]
pub struct Requests<F> {
    limits: Limits,
    queue: VecDeque<Entry<F>>,
    running: BTreeMap<u64, Entry<F>>,
    /// Oldest first; at most `limits.finished_kept`.
    finished: VecDeque<Done>,
    next_request: u64,
    next_follower: FollowerId,
}

impl<F> Requests<F> {
    pub fn new(limits: Limits) -> Self {
        Requests {
            limits,
            queue: VecDeque::new(),
            running: BTreeMap::new(),
            finished: VecDeque::new(),
            next_request: 1,
            next_follower: 1,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Requests waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    fn known(&self, id: u64) -> bool {
        self.queue.iter().any(|e| e.job.request_id == id)
            || self.running.contains_key(&id)
            || self.finished.iter().any(|d| d.request_id == id)
    }

    fn follower_id(&mut self) -> FollowerId {
        let id = self.next_follower;
        self.next_follower += 1;
        id
    }

    /// Takes a request: `request_id` 0 lets the table choose one; a known id (queued, running or
    /// finished) with the same `spec` follows that request from `resume_from`; `check` checks a
    /// new request (see [`check`]).
    pub fn submit(
        &mut self,
        request_id: u64,
        resume_from: u32,
        spec: Spec,
        check: impl FnOnce(&Spec) -> Result<Job, Refusal>,
        sink: F,
    ) -> Admission<F> {
        let from = resume_from as usize;
        if request_id != 0 && self.known(request_id) {
            let beyond = |have| Refusal::ResumeBeyond { id: request_id, from: resume_from, have };
            let follower = self.next_follower;
            if let Some((ahead, e)) = self.queue.iter_mut().enumerate().find(|(_, e)| e.job.request_id == request_id) {
                if e.spec != spec {
                    return Admission::Refused { reason: Refusal::IdInUse(request_id), sink };
                }
                if from > 0 {
                    return Admission::Refused { reason: beyond(0), sink };
                }
                e.followers.push(Follower { id: follower, from, sink });
                self.next_follower += 1;
                return Admission::Queued { request_id, follower, ahead: ahead + self.running.len() };
            }
            if let Some(e) = self.running.get_mut(&request_id) {
                if e.spec != spec {
                    return Admission::Refused { reason: Refusal::IdInUse(request_id), sink };
                }
                // A client may have more tokens than this scheduler (a standby that took over
                // regenerates the ones it did not follow): it gets them from `from` on.
                if from > e.job.max_tokens {
                    return Admission::Refused { reason: beyond(e.tokens.len()), sink };
                }
                let catch_up = e.catch_up(from);
                e.followers.push(Follower { id: follower, from, sink });
                self.next_follower += 1;
                return Admission::Following { request_id, follower, catch_up };
            }
            if let Some(d) = self.finished.iter().find(|d| d.request_id == request_id) {
                if d.spec != spec {
                    return Admission::Refused { reason: Refusal::IdInUse(request_id), sink };
                }
                let tokens = &d.answer.tokens;
                if from > tokens.len() {
                    return Admission::Refused { reason: beyond(tokens.len()), sink };
                }
                let catch_up = CatchUp { from, tokens: tokens[from..].to_vec(), text: d.texts[from..].concat() };
                return Admission::Finished { catch_up, answer: d.answer.clone(), sink };
            }
        }
        if resume_from > 0 {
            return Admission::Refused { reason: Refusal::NothingToResume { id: request_id, from: resume_from }, sink };
        }
        let mut job = match check(&spec) {
            Ok(job) => job,
            Err(reason) => return Admission::Refused { reason, sink },
        };
        if self.queue.len() >= self.limits.max_queue {
            return Admission::Refused { reason: Refusal::QueueFull { max: self.limits.max_queue }, sink };
        }
        job.request_id = if request_id != 0 {
            request_id
        } else {
            while self.known(self.next_request) {
                self.next_request += 1;
            }
            self.next_request += 1;
            self.next_request - 1
        };
        let follower = self.follower_id();
        let ahead = self.queue.len() + self.running.len();
        let request_id = job.request_id;
        self.queue.push_back(Entry {
            spec,
            job,
            followers: vec![Follower { id: follower, from, sink }],
            tokens: Vec::new(),
            texts: Vec::new(),
            canceled: false,
        });
        Admission::Queued { request_id, follower, ahead }
    }

    /// Automatic ids continue above `floor`: a request an executor still holds (a restarted
    /// scheduler must not reuse its id).
    pub fn ids_above(&mut self, floor: u64) {
        self.next_request = self.next_request.max(floor.saturating_add(1));
    }

    /// The next request to run, if fewer than [`Limits::max_running`] run.
    pub fn start_next(&mut self) -> Option<Job> {
        self.start_next_if(|_| true)
    }

    /// The next request to run, if fewer than [`Limits::max_running`] run and `fits` takes it
    /// (otherwise it stays first in the queue: a request waits for memory, it is not overtaken).
    pub fn start_next_if(&mut self, fits: impl FnOnce(&Job) -> bool) -> Option<Job> {
        if self.running.len() >= self.limits.max_running.max(1) || !fits(&self.queue.front()?.job) {
            return None;
        }
        let e = self.queue.pop_front()?;
        let job = e.job.clone();
        self.running.insert(job.request_id, e);
        Some(job)
    }

    /// Records a running request's next token (and the text it adds); returns its index and the
    /// followers that want it. None when nobody wants the request any more (canceled): the token
    /// goes nowhere.
    pub fn push_token(&mut self, request_id: u64, token: u32, text: String) -> Option<(usize, Vec<&F>)> {
        let e = self.running.get_mut(&request_id).filter(|e| !e.canceled)?;
        let index = e.tokens.len();
        e.tokens.push(token);
        e.texts.push(text);
        Some((index, e.followers.iter().filter(|f| f.from <= index).map(|f| &f.sink).collect()))
    }

    /// The spec of a running request.
    pub fn spec(&self, request_id: u64) -> Option<&Spec> {
        self.running.get(&request_id).map(|e| &e.spec)
    }

    /// A running request's tokens so far and their text.
    pub fn progress(&self, request_id: u64) -> Option<(&[u32], String)> {
        self.running.get(&request_id).map(|e| (e.tokens.as_slice(), e.texts.concat()))
    }

    /// A follower cancels: it leaves its request; a request nobody follows any more leaves the
    /// queue, or (running) is marked for the swarm to stop. None when the follower is gone (its
    /// request ended).
    pub fn cancel(&mut self, follower: FollowerId) -> Option<Canceled<F>> {
        let take = |e: &mut Entry<F>| {
            let i = e.followers.iter().position(|f| f.id == follower)?;
            Some(e.followers.remove(i).sink)
        };
        if let Some(q) = self.queue.iter().position(|e| e.followers.iter().any(|f| f.id == follower)) {
            let sink = take(&mut self.queue[q])?;
            let request_id = self.queue[q].job.request_id;
            let effect = if self.queue[q].followers.is_empty() {
                self.queue.remove(q);
                CancelEffect::Dequeued
            } else {
                CancelEffect::Detached
            };
            return Some(Canceled { request_id, sink, tokens: Vec::new(), text: String::new(), effect });
        }
        let e = self.running.values_mut().find(|e| e.followers.iter().any(|f| f.id == follower))?;
        let sink = take(e)?;
        let effect = if e.followers.is_empty() {
            e.canceled = true;
            CancelEffect::Stop
        } else {
            CancelEffect::Detached
        };
        let (tokens, text) = (e.tokens.clone(), e.texts.concat());
        Some(Canceled { request_id: e.job.request_id, sink, tokens, text, effect })
    }

    /// True once nobody follows the running request any more.
    pub fn is_canceled(&self, request_id: u64) -> bool {
        self.running.get(&request_id).is_some_and(|e| e.canceled)
    }

    /// A running request ended: it joins the finished table (the oldest leaves it when it is
    /// full); returns its followers, to be given `answer`.
    pub fn finish(&mut self, answer: &Answer) -> Vec<Follower<F>> {
        let Some(e) = self.running.remove(&answer.request_id) else { return Vec::new() };
        if self.limits.finished_kept > 0 {
            while self.finished.len() >= self.limits.finished_kept {
                self.finished.pop_front();
            }
            let mut texts = e.texts;
            // Tokens the table did not see streamed (none today) have no text of their own.
            texts.resize(answer.tokens.len(), String::new());
            self.finished.push_back(Done {
                request_id: answer.request_id,
                spec: e.spec,
                texts,
                answer: answer.clone(),
            });
        }
        e.followers
    }

    /// A request another scheduler admitted (a standby follows the primary's): queued with
    /// nobody following it yet. False when its id is known already or the queue is full.
    pub fn follow(&mut self, spec: Spec, job: Job) -> bool {
        if job.request_id == 0 || self.known(job.request_id) || self.queue.len() >= self.limits.max_queue {
            return false;
        }
        self.next_request = self.next_request.max(job.request_id.saturating_add(1));
        self.queue.push_back(Entry {
            spec,
            job,
            followers: Vec::new(),
            tokens: Vec::new(),
            texts: Vec::new(),
            canceled: false,
        });
        true
    }

    /// The other scheduler started the followed request `request_id`: it runs. Requests queued
    /// before it that never started left that scheduler's queue (canceled): they leave this one.
    /// False when it is neither queued nor running here.
    pub fn followed_start(&mut self, request_id: u64) -> bool {
        if self.running.contains_key(&request_id) {
            return true;
        }
        let Some(at) = self.queue.iter().position(|e| e.job.request_id == request_id) else { return false };
        self.queue.drain(..at);
        if let Some(e) = self.queue.pop_front() {
            self.running.insert(request_id, e);
        }
        true
    }

    /// Forgets a followed request whose answer this scheduler cannot give exactly (it missed
    /// tokens of it and it has ended): a client that resumes it is told there is nothing to resume.
    pub fn forget(&mut self, request_id: u64) -> Vec<F> {
        let e = self.running.remove(&request_id);
        e.into_iter().flat_map(|e| e.followers).map(|f| f.sink).collect()
    }

    /// The running requests and how many tokens each has (a standby resumes them at its takeover).
    pub fn running(&self) -> Vec<(Job, usize)> {
        self.running.values().map(|e| (e.job.clone(), e.tokens.len())).collect()
    }

    /// A running request's job.
    pub fn running_job(&self, request_id: u64) -> Option<&Job> {
        self.running.get(&request_id).map(|e| &e.job)
    }

    /// Every follower of a waiting or running request (the scheduler stops).
    pub fn drain(&mut self) -> Vec<F> {
        let running = std::mem::take(&mut self.running).into_values();
        let queued = std::mem::take(&mut self.queue);
        running.chain(queued).flat_map(|e| e.followers).map(|f| f.sink).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_tokens: 64,
        max_prompt_tokens: 100,
        max_context: 128,
        max_queue: 2,
        finished_kept: 2,
        max_running: 1,
    };

    fn spec(user: &str) -> Spec {
        Spec { user: user.into(), max_tokens: 8, ..Spec::default() }
    }

    /// One token per byte.
    fn encode(s: &Spec) -> Result<Vec<u32>, String> {
        let text = if s.prompt.is_empty() { &s.user } else { &s.prompt };
        Ok(text.bytes().map(u32::from).collect())
    }

    fn ok(s: &Spec) -> Result<Job, Refusal> {
        check(s, &LIMITS, encode)
    }

    fn refusal(s: Spec) -> Refusal {
        check(&s, &LIMITS, encode).unwrap_err()
    }

    fn table() -> Requests<&'static str> {
        Requests::new(LIMITS)
    }

    fn queued(a: Admission<&str>) -> (u64, FollowerId, usize) {
        match a {
            Admission::Queued { request_id, follower, ahead } => (request_id, follower, ahead),
            other => panic!("not queued: {other:?}"),
        }
    }

    fn refused(a: Admission<&str>) -> Refusal {
        match a {
            Admission::Refused { reason, .. } => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    fn answer(request_id: u64, tokens: Vec<u32>, finish: Finish) -> Answer {
        Answer {
            accepted: true,
            error: String::new(),
            request_id,
            prompt_ids: vec![1],
            text: tokens.iter().map(|t| t.to_string()).collect(),
            tokens,
            finish,
            tokens_per_s: 1.0,
            stats_json: "{}".into(),
        }
    }

    #[test]
    fn every_field_is_checked_with_its_reason() {
        assert_eq!(refusal(Spec { max_tokens: 8, ..Spec::default() }), Refusal::Empty);
        assert_eq!(refusal(Spec { max_tokens: 0, ..spec("hi") }), Refusal::MaxTokens { got: 0, limit: 64 });
        assert_eq!(refusal(Spec { max_tokens: 65, ..spec("hi") }), Refusal::MaxTokens { got: 65, limit: 64 });
        assert!(matches!(refusal(Spec { temperature: f32::NAN, ..spec("hi") }), Refusal::Temperature(_)));
        assert_eq!(refusal(Spec { temperature: -0.5, ..spec("hi") }), Refusal::Temperature(-0.5));
        assert_eq!(refusal(Spec { top_p: 1.5, ..spec("hi") }), Refusal::TopP(1.5));
        assert!(matches!(refusal(Spec { top_p: f32::NAN, ..spec("hi") }), Refusal::TopP(_)));
        assert_eq!(
            refusal(Spec { max_tokens: 40, ..spec(&"x".repeat(90)) }),
            Refusal::Context { prompt: 90, max_tokens: 40, limit: 128 }
        );
        assert_eq!(refusal(spec(&"x".repeat(101))), Refusal::PromptTooLong { prompt: 101, limit: 100 });
        let huge = spec(&"x".repeat(100 * MAX_PROMPT_BYTES_PER_TOKEN + 1));
        assert!(matches!(refusal(huge), Refusal::PromptBytes { max_tokens: 100, .. }));
        let none = check(&spec("hi"), &LIMITS, |_| Ok(Vec::new())).unwrap_err();
        assert_eq!(none, Refusal::NoTokens);
        let bad = check(&spec("hi"), &LIMITS, |_| Err("broken".into())).unwrap_err();
        assert_eq!(bad.to_string(), "cannot tokenize the prompt: broken");
        // The reasons name the field and the limit.
        assert!(Refusal::MaxTokens { got: 0, limit: 64 }.to_string().contains("max_tokens must be within 1..=64"));
        let job = ok(&Spec { temperature: 0.7, top_p: 0.9, seed: 3, ..spec("hi") }).unwrap();
        assert_eq!(job.prompt_ids, vec![104, 105]);
        assert!(matches!(job.sampling, Sampling::TopP { seed: 3, .. }));
        assert!(matches!(ok(&spec("hi")).unwrap().sampling, Sampling::Greedy));
        // The raw prompt wins over `user`.
        assert_eq!(ok(&Spec { prompt: "a".into(), ..spec("hi") }).unwrap().prompt_ids, vec![97]);
    }

    #[test]
    fn requests_are_served_first_in_first_out_with_ids_in_order_and_a_bounded_queue() {
        let mut t = table();
        assert_eq!(queued(t.submit(0, 0, spec("a"), ok, "A")), (1, 1, 0));
        // Refused requests take no id.
        assert!(matches!(refused(t.submit(0, 0, spec(""), ok, "x")), Refusal::Empty));
        assert_eq!(queued(t.submit(0, 0, spec("b"), ok, "B")), (2, 2, 1));
        assert_eq!(refused(t.submit(0, 0, spec("c"), ok, "C")), Refusal::QueueFull { max: 2 });
        assert_eq!(t.start_next().unwrap().request_id, 1);
        // One at a time.
        assert!(t.start_next().is_none());
        assert_eq!(queued(t.submit(0, 0, spec("c"), ok, "C")), (3, 3, 2));
        t.finish(&answer(1, vec![5], Finish::Eos));
        assert_eq!(t.start_next().unwrap().request_id, 2);
        t.finish(&answer(2, vec![5], Finish::Eos));
        assert_eq!(t.start_next().unwrap().request_id, 3);
        assert!(t.start_next().is_none());
    }

    #[test]
    fn several_requests_run_up_to_the_limit_and_one_that_does_not_fit_waits_first_in_line() {
        let mut t = Requests::new(Limits { max_running: 2, max_queue: 4, ..LIMITS });
        for user in ["a", "b", "c", "d"] {
            queued(t.submit(0, 0, spec(user), ok, user));
        }
        assert_eq!(t.start_next().unwrap().request_id, 1);
        // 2 does not fit now: it stays first, 3 does not overtake it.
        assert!(t.start_next_if(|j| j.request_id != 2).is_none());
        assert_eq!(t.start_next_if(|j| j.request_id == 2).unwrap().request_id, 2);
        assert!(t.start_next().is_none(), "two run");
        t.finish(&answer(1, vec![5], Finish::Eos));
        assert_eq!(t.start_next().unwrap().request_id, 3);
    }

    #[test]
    fn client_chosen_ids_are_kept_and_never_given_to_another_request() {
        let mut t = table();
        assert_eq!(queued(t.submit(2, 0, spec("a"), ok, "A")).0, 2);
        assert_eq!(queued(t.submit(0, 0, spec("b"), ok, "B")).0, 1);
        // 2 is taken: the next free one.
        let job = t.start_next().unwrap();
        t.finish(&answer(job.request_id, vec![], Finish::Eos));
        assert_eq!(t.start_next().unwrap().request_id, 1);
        assert_eq!(queued(t.submit(0, 0, spec("c"), ok, "C")).0, 3);
        // The same id with another request is refused, whatever its state.
        assert_eq!(refused(t.submit(2, 0, spec("other"), ok, "X")), Refusal::IdInUse(2));
        assert_eq!(refused(t.submit(1, 0, spec("other"), ok, "X")), Refusal::IdInUse(1));
        assert_eq!(refused(t.submit(3, 0, spec("other"), ok, "X")), Refusal::IdInUse(3));
        // An unknown id cannot be resumed.
        assert_eq!(refused(t.submit(9, 4, spec("a"), ok, "X")), Refusal::NothingToResume { id: 9, from: 4 });
    }

    #[test]
    fn tokens_go_to_each_follower_from_its_own_position() {
        let mut t = table();
        let (id, first, _) = queued(t.submit(7, 0, spec("a"), ok, "first"));
        t.start_next().unwrap();
        for (tok, text) in [(10, "x"), (11, "y"), (12, "z")] {
            let (index, to) = t.push_token(id, tok, text.into()).unwrap();
            assert_eq!(to, vec![&"first"]);
            assert_eq!(index, tok as usize - 10);
        }
        // A client that lost its connection after 2 tokens resumes: the third, then the live ones.
        match t.submit(id, 2, spec("a"), ok, "again") {
            Admission::Following { request_id, follower, catch_up } => {
                assert_eq!((request_id, catch_up), (id, CatchUp { from: 2, tokens: vec![12], text: "z".into() }));
                assert_ne!(follower, first);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.push_token(id, 13, "w".into()).unwrap(), (3, vec![&"first", &"again"]));
        // More than it has (a client ahead of a standby that took over): it waits for them.
        match t.submit(id, 5, spec("a"), ok, "ahead") {
            Admission::Following { catch_up, .. } => assert_eq!(catch_up, CatchUp { from: 5, ..CatchUp::default() }),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.push_token(id, 14, "v".into()).unwrap(), (4, vec![&"first", &"again"]));
        // More than the request can have: refused.
        assert_eq!(refused(t.submit(id, 9, spec("a"), ok, "X")), Refusal::ResumeBeyond { id, from: 9, have: 5 });
        let followers = t.finish(&answer(id, vec![10, 11, 12, 13], Finish::Length));
        assert_eq!(followers.iter().map(|f| f.sink).collect::<Vec<_>>(), vec!["first", "again", "ahead"]);
        // Finished: the rest at once, and the answer.
        match t.submit(id, 1, spec("a"), ok, "late") {
            Admission::Finished { catch_up, answer, sink } => {
                assert_eq!(catch_up, CatchUp { from: 1, tokens: vec![11, 12, 13], text: "yzw".into() });
                assert_eq!((answer.tokens.len(), answer.finish, sink), (4, Finish::Length, "late"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(t.submit(id, 4, spec("a"), ok, "all"), Admission::Finished { catch_up, .. } if catch_up.tokens.is_empty())
        );
        assert_eq!(refused(t.submit(id, 5, spec("a"), ok, "X")), Refusal::ResumeBeyond { id, from: 5, have: 4 });
    }

    /// A standby mirrors the primary's table: requests queued there, started there (those
    /// canceled there never start), their tokens; it resumes the running one.
    #[test]
    fn a_standby_follows_the_primarys_requests() {
        let mut t = table();
        let job = |id| Job { request_id: id, ..ok(&spec("a")).unwrap() };
        assert!(t.follow(spec("a"), job(3)));
        assert!(t.follow(spec("a"), job(4)));
        assert!(!t.follow(spec("a"), job(4)), "known already");
        assert!(!t.follow(spec("a"), job(5)), "queue full");
        assert!(t.followed_start(4), "3 was canceled on the primary");
        assert!(!t.followed_start(3));
        assert_eq!(t.queued(), 0);
        assert_eq!(t.push_token(4, 7, "x".into()).unwrap().0, 0);
        assert_eq!(t.running().iter().map(|(j, n)| (j.request_id, *n)).collect::<Vec<_>>(), vec![(4, 1)]);
        // A client resumes it by id; new ids continue above the ones followed.
        assert!(matches!(t.submit(4, 1, spec("a"), ok, "c"), Admission::Following { .. }));
        assert_eq!(queued(t.submit(0, 0, spec("b"), ok, "d")).0, 5);
        assert_eq!(t.forget(4), vec!["c"]);
        assert!(t.running().is_empty());
    }

    #[test]
    fn the_finished_table_keeps_the_newest() {
        let mut t = table();
        for id in 1..=3 {
            queued(t.submit(id, 0, spec("a"), ok, "A"));
            t.start_next().unwrap();
            t.finish(&answer(id, vec![1], Finish::Eos));
        }
        assert_eq!(refused(t.submit(1, 1, spec("a"), ok, "X")), Refusal::NothingToResume { id: 1, from: 1 });
        assert!(matches!(t.submit(2, 1, spec("a"), ok, "X"), Admission::Finished { .. }));
        assert!(matches!(t.submit(3, 0, spec("a"), ok, "X"), Admission::Finished { .. }));
        // Evicted: the id is free again, for a new request.
        assert_eq!(queued(t.submit(1, 0, spec("new"), ok, "N")).0, 1);
    }

    #[test]
    fn a_cancel_stops_a_request_only_when_nobody_follows_it() {
        let mut t = table();
        let (a, fa, _) = queued(t.submit(0, 0, spec("a"), ok, "A"));
        let (b, fb, _) = queued(t.submit(0, 0, spec("b"), ok, "B"));
        let (_, fb2, ahead) = queued(t.submit(b, 0, spec("b"), ok, "B2"));
        assert_eq!(ahead, 1);
        t.start_next().unwrap();
        t.push_token(a, 4, "q".into());
        // A queued request followed twice: the first cancel detaches, the second dequeues it.
        assert_eq!(t.cancel(fb).unwrap().effect, CancelEffect::Detached);
        let c = t.cancel(fb2).unwrap();
        assert_eq!((c.request_id, c.sink, c.effect), (b, "B2", CancelEffect::Dequeued));
        assert_eq!(t.queued(), 0);
        // The running one: marked for the swarm to stop, with its tokens so far.
        assert!(!t.is_canceled(a));
        let c = t.cancel(fa).unwrap();
        assert_eq!((c.sink, c.tokens, c.text, c.effect), ("A", vec![4], "q".to_string(), CancelEffect::Stop));
        assert!(t.is_canceled(a));
        assert!(t.cancel(fa).is_none());
        // A token computed after the cancel goes nowhere and is not recorded.
        assert!(t.push_token(a, 5, "r".into()).is_none());
        assert_eq!(t.progress(a).unwrap().0, &[4]);
        assert!(t.finish(&answer(a, vec![4], Finish::Canceled)).is_empty());
        assert!(t.start_next().is_none());
    }

    #[test]
    fn drain_hands_back_every_waiting_and_running_follower() {
        let mut t = table();
        queued(t.submit(0, 0, spec("a"), ok, "A"));
        queued(t.submit(0, 0, spec("b"), ok, "B"));
        t.start_next();
        assert_eq!(t.drain(), vec!["A", "B"]);
        assert!(t.start_next().is_none());
    }
}
