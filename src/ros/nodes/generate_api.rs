//! The scheduler's front desk (docs/generate-api.md): the `/aerokv/generate` action and service
//! take requests into one queue ([`crate::requests`]) while the scheduler runs another; goals get
//! their tokens as feedback and their answer as the result; a cancel takes a goal off its request,
//! and a request nobody follows any more leaves the queue or stops. Only I/O: the rules are in
//! `requests`.
use crate::requests::{
    self, Admission, Answer, CancelEffect, CatchUp, FollowerId, Job, Limits, Refusal, Requests, Spec,
};
use crate::ros::{names, NodeContext};
use aerokv_engine::PromptEncoder;
use futures::StreamExt;
use r2r::aerokv::action::Generate as GenerateAction;
use r2r::aerokv::srv::Generate;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

type Goal = r2r::ActionServerGoal<GenerateAction::Action>;

/// The request fields of a goal or a service request (the same names in both).
macro_rules! spec_of {
    ($r:expr) => {
        Spec {
            user: $r.user.clone(),
            prompt: $r.prompt.clone(),
            max_tokens: $r.max_tokens,
            temperature: $r.temperature,
            top_p: $r.top_p,
            seed: $r.seed,
            ignore_eos: $r.ignore_eos,
        }
    };
}
/// An action result or a service response (the same fields) holding `a`.
macro_rules! answer_msg {
    ($t:path, $a:expr) => {{
        let ids = |v: &[u32]| v.iter().map(|&t| t as i32).collect::<Vec<i32>>();
        $t {
            accepted: $a.accepted,
            error: $a.error.clone(),
            request_id: $a.request_id,
            prompt_ids: ids(&$a.prompt_ids),
            token_ids: ids(&$a.tokens),
            text: $a.text.clone(),
            finish_reason: $a.finish.as_str().into(),
            tokens_per_s: $a.tokens_per_s,
            stats_json: $a.stats_json.clone(),
        }
    }};
}

/// Where a request's tokens and answer go.
enum Sink {
    /// An action goal. Dropping `_watch` ends the task that waits for its cancel requests.
    Goal { goal: Goal, _watch: oneshot::Sender<()> },
    /// A service call: the answer only.
    Call(r2r::ServiceRequest<Generate::Service>),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Goal { goal, .. } => write!(f, "goal {}", goal.uuid),
            Sink::Call(_) => write!(f, "service call"),
        }
    }
}

/// The request table shared by the intake tasks and the scheduler's loop.
pub struct Desk {
    table: Mutex<Requests<Sink>>,
    /// A request was queued.
    queued: Notify,
    /// A running request lost its last follower.
    canceled: Notify,
    encoder: PromptEncoder,
}

impl Desk {
    /// The request table, serving nobody yet ([`Self::serve`] opens it to clients).
    pub fn new(encoder: PromptEncoder, limits: Limits) -> Arc<Desk> {
        Arc::new(Desk {
            table: Mutex::new(Requests::new(limits)),
            queued: Notify::new(),
            canceled: Notify::new(),
            encoder,
        })
    }

    /// Serves the action and the service on `ctx`'s node (a standby scheduler only once it has
    /// taken over: one action server at a time).
    pub fn serve(self: &Arc<Self>, ctx: &NodeContext) -> anyhow::Result<()> {
        let mut goals = ctx.lock().create_action_server::<GenerateAction::Action>(names::GENERATE)?;
        let mut calls = ctx.lock().create_service::<Generate::Service>(names::GENERATE, r2r::QosProfile::default())?;
        let d = self.clone();
        tokio::spawn(async move {
            while let Some(req) = goals.next().await {
                d.take_goal(req);
            }
        });
        let d = self.clone();
        tokio::spawn(async move {
            while let Some(call) = calls.next().await {
                d.take_call(call);
            }
        });
        // Requests it holds already (followed) may run.
        self.queued.notify_one();
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Requests<Sink>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, spec: &Spec, limits: &Limits) -> Result<Job, Refusal> {
        requests::check(spec, limits, |s| {
            let ids =
                if s.prompt.is_empty() { self.encoder.encode_chat(&s.user) } else { self.encoder.encode(&s.prompt) };
            ids.map_err(|e| e.to_string())
        })
    }

    fn take_call(self: &Arc<Self>, call: r2r::ServiceRequest<Generate::Service>) {
        let spec = spec_of!(call.message);
        let mut table = self.lock();
        let limits = *table.limits();
        match table.submit(0, 0, spec, |s| self.check(s, &limits), Sink::Call(call)) {
            Admission::Queued { request_id, ahead, .. } => {
                tracing::info!(request = request_id, ahead, "service request queued");
                self.queued.notify_one();
            }
            Admission::Refused { reason, sink } => {
                tracing::warn!("request refused: {reason}");
                answer(sink, &Answer::refused(0, &reason));
            }
            // A new request (id 0) neither follows nor finds another.
            Admission::Following { .. } | Admission::Finished { .. } => {}
        }
    }

    fn take_goal(self: &Arc<Self>, req: r2r::ActionServerGoalRequest<GenerateAction::Action>) {
        let g = &req.goal;
        let (request_id, resume_from) = (g.request_id, g.resume_from);
        let spec = spec_of!(g);
        // Accepted at once (a ROS goal response has no room for a reason): a refusal ends the goal
        // aborted with the reason in the result.
        let (goal, cancels) = match req.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("accepting a goal: {e}");
                return;
            }
        };
        let (watch, unwatched) = oneshot::channel();
        let sink = Sink::Goal { goal: goal.clone(), _watch: watch };
        let mut table = self.lock();
        let limits = *table.limits();
        let follower = match table.submit(request_id, resume_from, spec, |s| self.check(s, &limits), sink) {
            Admission::Queued { request_id, follower, ahead } => {
                tracing::info!(request = request_id, goal = %goal.uuid, ahead, "goal queued");
                self.queued.notify_one();
                follower
            }
            Admission::Following { request_id, follower, catch_up } => {
                tracing::info!(request = request_id, goal = %goal.uuid, from = catch_up.from, "goal follows the running request");
                feedback(&goal, request_id, &catch_up);
                follower
            }
            Admission::Finished { catch_up, answer: a, sink } => {
                tracing::info!(request = a.request_id, goal = %goal.uuid, from = catch_up.from, "goal resumes a finished request");
                feedback(&goal, a.request_id, &catch_up);
                answer(sink, &a);
                return;
            }
            Admission::Refused { reason, sink } => {
                tracing::warn!(goal = %goal.uuid, "goal refused: {reason}");
                answer(sink, &Answer::refused(request_id, &reason));
                return;
            }
        };
        drop(table);
        let desk = self.clone();
        tokio::spawn(async move { desk.watch_cancels(follower, cancels, unwatched).await });
    }

    /// Serves a goal's cancel requests until its sink is dropped (the goal ended).
    async fn watch_cancels(
        &self,
        follower: FollowerId,
        mut cancels: impl futures::Stream<Item = r2r::ActionServerCancelRequest> + Unpin,
        mut unwatched: oneshot::Receiver<()>,
    ) {
        loop {
            let request = tokio::select! {
                Some(request) = cancels.next() => request,
                _ = &mut unwatched => return,
                else => return,
            };
            let Some(c) = self.lock().cancel(follower) else {
                request.reject();
                continue;
            };
            tracing::info!(request = c.request_id, effect = ?c.effect, "goal canceled");
            request.accept();
            if c.effect == CancelEffect::Stop {
                self.canceled.notify_waiters();
            }
            if let Sink::Goal { mut goal, .. } = c.sink {
                let result = GenerateAction::Result {
                    accepted: true,
                    error: "canceled by the client".into(),
                    request_id: c.request_id,
                    token_ids: c.tokens.iter().map(|&t| t as i32).collect(),
                    text: c.text,
                    finish_reason: requests::Finish::Canceled.as_str().into(),
                    ..Default::default()
                };
                if let Err(e) = goal.cancel(result) {
                    tracing::warn!("result of a canceled goal: {e}");
                }
            }
            return;
        }
    }

    /// The next request to run (waits for one).
    pub async fn next(&self) -> Job {
        self.next_if(|_| true).await
    }

    /// The next request to run once `fits` takes it (waits, first in line, while it does not:
    /// a running request's end wakes it to try again).
    pub async fn next_if(&self, fits: impl Fn(&Job) -> bool) -> Job {
        loop {
            let queued = self.queued.notified();
            if let Some(job) = self.lock().start_next_if(&fits) {
                return job;
            }
            queued.await;
        }
    }

    /// Resolves with the first of `request_ids` (running) that nobody follows any more.
    pub async fn canceled(&self, request_ids: &[u64]) -> u64 {
        loop {
            let canceled = self.canceled.notified();
            tokio::pin!(canceled);
            canceled.as_mut().enable();
            if let Some(&id) = request_ids.iter().find(|&&id| self.lock().is_canceled(id)) {
                return id;
            }
            canceled.await;
        }
    }

    /// A running request's next token, with the text it adds: `stream` (the token topic), then
    /// feedback to its goals, so that a standby has every token a client has. False when nobody
    /// wants the request any more (the token goes nowhere).
    pub fn token(&self, request_id: u64, token: u32, text: &str, stream: impl FnOnce()) -> bool {
        let mut table = self.lock();
        let Some((index, sinks)) = table.push_token(request_id, token, text.to_string()) else { return false };
        stream();
        let fb = CatchUp { from: index, tokens: vec![token], text: text.to_string() };
        for sink in sinks {
            if let Sink::Goal { goal, .. } = sink {
                feedback(goal, request_id, &fb);
            }
        }
        true
    }

    /// A running request's tokens so far and their text.
    pub fn progress(&self, request_id: u64) -> (Vec<u32>, String) {
        self.lock().progress(request_id).map(|(t, s)| (t.to_vec(), s)).unwrap_or_default()
    }

    /// A running request ended: every client that follows it gets `a`; it is kept for resumption.
    pub fn finish(&self, a: &Answer) {
        let followers = self.lock().finish(a);
        for f in followers {
            answer(f.sink, a);
        }
        // The next one may start.
        self.queued.notify_one();
    }

    /// See [`Requests::ids_above`].
    pub fn ids_above(&self, floor: u64) {
        self.lock().ids_above(floor);
    }

    /// The spec of a running request (published for a standby).
    pub fn spec(&self, request_id: u64) -> Option<Spec> {
        self.lock().spec(request_id).cloned()
    }

    /// A request the primary started (a standby follows it). False when it was refused.
    pub fn follow(&self, spec: Spec, job: Job) -> bool {
        let id = job.request_id;
        let mut table = self.lock();
        table.follow(spec, job) && table.followed_start(id)
    }

    /// A followed request's next token. False when the request is not running here.
    pub fn followed_token(&self, request_id: u64, token: u32, text: String) -> bool {
        self.lock().push_token(request_id, token, text).is_some()
    }

    /// How many tokens a followed request has here (None: not running here).
    pub fn followed_tokens(&self, request_id: u64) -> Option<usize> {
        self.lock().progress(request_id).map(|(t, _)| t.len())
    }

    /// See [`Requests::forget`].
    pub fn forget(&self, request_id: u64) {
        for sink in self.lock().forget(request_id) {
            answer(sink, &Answer::refused(request_id, &Refusal::ShuttingDown));
        }
    }

    /// See [`Requests::running`].
    pub fn running(&self) -> Vec<(Job, usize)> {
        self.lock().running()
    }

    /// The prompt of a running request (empty when it is not running).
    pub fn prompt_ids(&self, request_id: u64) -> Vec<u32> {
        self.lock().running_job(request_id).map(|j| j.prompt_ids.clone()).unwrap_or_default()
    }

    /// The scheduler stops: every waiting and running request's clients are told.
    pub fn shutdown(&self) {
        let why = Refusal::ShuttingDown;
        for sink in self.lock().drain() {
            let mut a = Answer::refused(0, &why);
            a.finish = requests::Finish::Error;
            answer(sink, &a);
        }
    }
}

fn feedback(goal: &Goal, request_id: u64, c: &CatchUp) {
    if c.tokens.is_empty() {
        return;
    }
    let msg = GenerateAction::Feedback {
        request_id,
        index: c.from as u32,
        token_ids: c.tokens.iter().map(|&t| t as i32).collect(),
        text: c.text.clone(),
    };
    if let Err(e) = goal.publish_feedback(msg) {
        tracing::warn!(goal = %goal.uuid, "feedback: {e}");
    }
}

/// Gives `a` to one client: a goal succeeds (complete answers) or is aborted; a call is answered.
fn answer(sink: Sink, a: &Answer) {
    match sink {
        Sink::Goal { mut goal, .. } => {
            let result = answer_msg!(GenerateAction::Result, a);
            let sent = if a.finish.succeeded() { goal.succeed(result) } else { goal.abort(result) };
            if let Err(e) = sent {
                tracing::warn!(goal = %goal.uuid, "result: {e}");
            }
        }
        Sink::Call(call) => {
            if let Err(e) = call.respond(answer_msg!(Generate::Response, a)) {
                tracing::error!("responding to a generate request: {e}");
            }
        }
    }
}
