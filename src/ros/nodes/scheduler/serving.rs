//! Serving: several requests at once on one plan. The first request of a batch gets a fresh plan;
//! requests that arrive while it runs join that plan (each executor starts a request's caches at
//! its position 0) up to `max_running`, as memory admits them. Their steps interleave
//! ([`crate::interleave`]) so that every stage works on some request's step; outputs come back by
//! request id. A failure fails over every running request at once: one new plan carries each
//! request with its own resume point (`Assignment.requests`), or, when that cannot be, every
//! request is fed again from its start on a fresh plan. Each answer stays the one it would be alone.
use super::*;
use crate::dataplane::RequestResume;
use crate::interleave::{self, Lane};
use std::pin::Pin;

/// Where one decode step's time went.
#[derive(Clone, Copy)]
pub(super) struct Step {
    position: usize,
    /// From sending the step to its output: every stage and hop.
    round_trip_ms: f64,
    /// LM head, sampling, embedding and sending the next token.
    pub(super) gateway_ms: f64,
}

/// The steps' round trips and gateway times, and the slowest round trips with their positions.
fn step_stats(steps: &[Step]) -> serde_json::Value {
    let round_trips: Vec<f64> = steps.iter().map(|s| s.round_trip_ms).collect();
    let gateway: Vec<f64> = steps.iter().map(|s| s.gateway_ms).collect();
    let mut slowest = steps.to_vec();
    slowest.sort_by(|a, b| b.round_trip_ms.total_cmp(&a.round_trip_ms));
    let slowest: Vec<_> = slowest
        .iter()
        .take(3)
        .map(|s| serde_json::json!({"position": s.position, "round_trip_ms": s.round_trip_ms}))
        .collect();
    serde_json::json!({"round_trip_ms": percentiles(&round_trips), "gateway_ms": percentiles(&gateway), "slowest": slowest})
}

/// The state of one request.
pub(super) struct Run {
    pub(super) request_id: u64,
    prompt_ids: Vec<u32>,
    max_tokens: usize,
    sampler: Sampler,
    ignore_eos: bool,
    pub(super) detok: Detokenizer,
    pub(super) tokens: Vec<u32>,
    /// The oldest step without output (a prompt chunk, or one token): its first position.
    position: usize,
    /// Steps are sent up to here: several ahead of `position` when their ids are known (the
    /// prompt's chunks, tokens fed again after a restart), so that the stages work as a pipeline.
    sent_until: usize,
    started: bool,
    /// When its generation started, and its first token came out.
    began: Instant,
    first_token_at: Option<Instant>,
    prefill_s: f64,
    epochs: Vec<u64>,
    incidents: Vec<Incident>,
    /// When its latest step left the gateway, and when (the interleaving's counter) it was sent.
    sent_at: Option<Instant>,
    last_sent: u64,
    /// The decode steps so far.
    steps: Vec<Step>,
    /// Most requests that ran at once while it ran (itself included).
    peak_running: usize,
    /// Per UAV, its executor's compute per layer as its heartbeat said at each decode step.
    compute_ms: crate::linkrate::RunMeans,
}

impl Run {
    fn new(job: Job) -> Self {
        Run {
            request_id: job.request_id,
            prompt_ids: job.prompt_ids,
            max_tokens: job.max_tokens,
            sampler: Sampler::new(job.sampling),
            ignore_eos: job.ignore_eos,
            detok: Detokenizer::new(),
            tokens: Vec::new(),
            position: 0,
            sent_until: 0,
            started: false,
            began: clock::now(),
            first_token_at: None,
            prefill_s: 0.0,
            epochs: Vec::new(),
            incidents: Vec::new(),
            sent_at: None,
            last_sent: 0,
            steps: Vec::new(),
            peak_running: 1,
            compute_ms: Default::default(),
        }
    }

    /// The ids of the step that starts at `position`, once they are known.
    fn step_at(&self, position: usize) -> Option<&[u32]> {
        step_at(&self.prompt_ids, &self.tokens, position)
    }

    /// How many steps have been sent and have no output yet, and how many more are known.
    fn steps_pending(&self) -> (usize, usize) {
        let (mut at, mut in_flight) = (self.position, 0);
        while at < self.sent_until {
            at += self.step_at(at).map_or(1, <[u32]>::len);
            in_flight += 1;
        }
        let mut ready = 0;
        while let Some(ids) = self.step_at(at) {
            at += ids.len();
            ready += 1;
        }
        (in_flight, ready)
    }

    fn total_tokens(&self) -> u64 {
        (self.prompt_ids.len() + self.max_tokens) as u64
    }

    /// The KV capacity its caches need on every stage (the Activation's `context_tokens`):
    /// prompt + maximum answer, at most the model's context.
    fn context_tokens(&self, max_context: usize) -> u32 {
        self.total_tokens().min(max_context as u64).min(u32::MAX as u64) as u32
    }

    /// Back to the start: every known token is fed again, in the steps first computed.
    fn rewind(&mut self) {
        self.position = 0;
        self.sent_until = 0;
    }

    /// A token the primary generated before this standby took over (fed again with the prompt).
    fn known_tokens(&mut self, gateway: &Gateway, tokens: Vec<u32>) {
        for &t in &tokens {
            let _ = self.detok.push(gateway, t);
        }
        self.sampler.skip(tokens.len());
        self.tokens = tokens;
    }
}

/// The requests being served, by request id.
type Runs = BTreeMap<u64, Run>;

/// Adds `run` to `runs`, and counts it in every running request's peak.
fn add(runs: &mut Runs, run: Run) {
    runs.insert(run.request_id, run);
    let n = runs.len();
    for r in runs.values_mut() {
        r.peak_running = r.peak_running.max(n);
    }
}

/// What the output of a request's step did.
enum Stepped {
    /// A prompt chunk before the last, or a known token fed again.
    Advanced,
    /// A new token: its index, its id, and the request's end if it ends with it.
    Token { index: usize, id: u32, finish: Option<Finish>, round_trip_ms: Option<f64>, received_at: Instant },
    /// The model ended the answer.
    Ended(Finish),
}

/// Why a batch stopped serving.
pub(super) enum BatchEnd {
    /// Every request ended.
    Idle,
    /// The node is asked to stop.
    Shutdown,
}

impl Scheduler {
    /// Serves `job` (`resumed`: a request the primary ran, from the tokens this standby followed)
    /// and every request that joins it while it runs, until none is left.
    pub(super) async fn serve_batch(
        &mut self,
        job: Job,
        resumed: Option<Resumed>,
        shutdown: &mut Pin<&mut (impl std::future::Future<Output = ()> + Send)>,
    ) -> BatchEnd {
        let mut runs = Runs::new();
        let first = tokio::select! {
            r = self.begin(job, resumed) => r,
            _ = shutdown.as_mut() => return BatchEnd::Shutdown,
        };
        match first {
            Ok(run) => add(&mut runs, run),
            Err(answer) => {
                self.desk.finish(&answer);
                return BatchEnd::Idle;
            }
        }
        // The standby's other requests of the primary, fed again on this plan.
        for r in std::mem::take(&mut self.resumed_more) {
            self.announce(&r.job);
            let mut run = Run::new(r.job.clone());
            let (mut known, _) = self.desk.progress(run.request_id);
            known.truncate(r.have);
            run.known_tokens(&self.gateway, known);
            match standby::resume(run.tokens.len(), run.max_tokens, run.prompt_ids.len(), self.max_context) {
                Resume::Finished(finish) => {
                    let answer = self.answer(run, Ok(finish));
                    self.desk.finish(&answer);
                }
                Resume::Continue { .. } => {
                    self.join(&mut run);
                    add(&mut runs, run);
                }
            }
        }
        let mut last_output = clock::now();
        let mut watch = clock::interval(Duration::from_millis(50));
        loop {
            if runs.is_empty() {
                return BatchEnd::Idle;
            }
            if let Err(e) = self.send_steps(&mut runs) {
                self.fail_all(&mut runs, e);
                continue;
            }
            let ids: Vec<u64> = runs.keys().copied().collect();
            let room = runs.len() < self.p.max_running;
            let admitted = self.admission_rule(&runs);
            tokio::select! {
                _ = shutdown.as_mut() => return BatchEnd::Shutdown,
                Some(msg) = self.outputs.next() => {
                    let Some(hidden) = self.output_of(&runs, &msg) else { continue };
                    last_output = clock::now();
                    let id = msg.request_id;
                    self.on_output(&mut runs, id, hidden).await;
                }
                Some(ev) = self.failures.recv() => {
                    if self.note_failure(&ev) && self.in_plan(&ev.uav_id) {
                        if let Err(e) = self.recover(&mut runs, &ev.uav_id, "failure").await {
                            self.fail_all(&mut runs, e);
                        }
                        last_output = clock::now();
                    }
                }
                job = self.desk.next_if(admitted), if room => {
                    if let Some(run) = self.admit(job, &runs) {
                        add(&mut runs, run);
                    }
                }
                id = self.desk.canceled(&ids) => {
                    if runs.remove(&id).is_some() {
                        let answer = self.canceled(id);
                        self.desk.finish(&answer);
                    }
                }
                _ = watch.tick() => {
                    let waiting = runs.values().any(|r| r.sent_until > r.position);
                    if waiting && clock::since(last_output).as_secs_f64() > self.p.step_timeout_s {
                        let why = self.stall(&runs);
                        self.fail_all(&mut runs, Interrupt::Fatal(why));
                    }
                }
            }
        }
    }

    /// The first request of a batch, up to its plan: checked against the swarm, announced, and
    /// planned (a fresh plan, or a takeover's on the executors' KV). Err: its answer already.
    async fn begin(&mut self, job: Job, resumed: Option<Resumed>) -> Result<Run, Answer> {
        self.announce(&job);
        self.await_settled().await;
        if self.members().is_empty() {
            let why = crate::requests::Refusal::NoUav;
            tracing::warn!("request refused: {why}");
            return Err(Answer::refused(job.request_id, &why));
        }
        let tokens = (job.prompt_ids.len() + job.max_tokens) as u64;
        if let Verdict::Refuse(why) = admission::admit(&self.uav_memory(), &[], self.p.max_running, tokens) {
            tracing::warn!(request = job.request_id, "request refused: {why}");
            return Err(Answer::refused(job.request_id, &why));
        }
        let mut run = Run::new(job);
        let planned = match resumed {
            Some(r) => self.resume(&mut run, r).await,
            None => {
                let total = run.total_tokens();
                self.plan_restart(run.request_id, total, "request").await.map(|()| None)
            }
        };
        match planned {
            Ok(None) => {
                run.epochs.push(self.epoch);
                self.started(&mut run);
                Ok(run)
            }
            Ok(Some(finish)) => Err(self.answer(run, Ok(finish))),
            Err(e) => Err(self.answer(run, Err(e))),
        }
    }

    /// A request that runs from now on (its takeover's recovery, if any, ends here).
    fn started(&self, run: &mut Run) {
        run.started = true;
        run.began = clock::now();
        for inc in run.incidents.iter_mut().filter(|i| i.recovered_at == 0.0) {
            inc.recovered_at = unix_now();
            inc.epoch = self.epoch;
        }
    }

    /// A request joins the running ones on the current plan.
    fn join(&self, run: &mut Run) {
        run.epochs.push(self.epoch);
        self.started(run);
        tracing::info!(request = run.request_id, epoch = self.epoch, "request joins the running ones");
    }

    /// Whether a waiting request fits beside `runs` in every UAV's memory (a request that would
    /// not fit even alone is taken, to be refused with the reason).
    fn admission_rule(&self, runs: &Runs) -> impl Fn(&Job) -> bool {
        let (uavs, running, max) =
            (self.uav_memory(), runs.values().map(Run::total_tokens).collect::<Vec<_>>(), self.p.max_running);
        move |job: &Job| {
            let tokens = (job.prompt_ids.len() + job.max_tokens) as u64;
            !matches!(admission::admit(&uavs, &running, max, tokens), Verdict::Wait(_))
        }
    }

    /// A request taken from the queue while others run: it joins them, or it is refused.
    fn admit(&mut self, job: Job, runs: &Runs) -> Option<Run> {
        let tokens = (job.prompt_ids.len() + job.max_tokens) as u64;
        let running: Vec<u64> = runs.values().map(Run::total_tokens).collect();
        if let Verdict::Refuse(why) = admission::admit(&self.uav_memory(), &running, self.p.max_running, tokens) {
            tracing::warn!(request = job.request_id, "request refused: {why}");
            self.desk.finish(&Answer::refused(job.request_id, &why));
            return None;
        }
        self.announce(&job);
        let mut run = Run::new(job);
        self.join(&mut run);
        Some(run)
    }

    /// The hidden states of an output that is the next one of a running request, in this epoch.
    fn output_of(&mut self, runs: &Runs, msg: &Activation) -> Option<Hidden> {
        let expected = runs.get(&msg.request_id).map(|r| r.position);
        if msg.epoch != self.epoch || expected != Some(msg.position as usize) {
            self.stale_dropped += 1;
            tracing::debug!(
                epoch = msg.epoch,
                request = msg.request_id,
                position = msg.position,
                "stale output dropped"
            );
            return None;
        }
        match convert::hidden(msg) {
            Ok(h) => {
                self.hops.push(hop_ms(&msg.stamp));
                Some(h)
            }
            // Not the stage's output (that one decodes): keep waiting for it.
            Err(e) => {
                tracing::warn!(source = %msg.source, "undecodable output ignored: {e}");
                None
            }
        }
    }

    /// The output of request `id`'s oldest step: the next token out (the next step leaves
    /// first), the request's end, a retirement check.
    async fn on_output(&mut self, runs: &mut Runs, id: u64, hidden: Hidden) {
        let Some(run) = runs.get_mut(&id) else { return };
        let stepped = match self.sample(run, &hidden) {
            Ok(s) => s,
            Err(e) => return self.end(runs, id, Err(e)),
        };
        match stepped {
            Stepped::Advanced => {}
            Stepped::Ended(finish) => self.end(runs, id, Ok(finish)),
            Stepped::Token { index, id: token, finish, round_trip_ms, received_at } => {
                if finish.is_none() {
                    if let Err(e) = self.send_steps(runs) {
                        return self.fail_all(runs, e);
                    }
                }
                let Some(run) = runs.get_mut(&id) else { return };
                if let Some(round_trip_ms) = round_trip_ms {
                    for (uav, (_, hb)) in &self.lock().beats {
                        run.compute_ms.observe(uav, hb.compute_ms_per_layer);
                    }
                    run.steps.push(Step {
                        position: run.position,
                        round_trip_ms,
                        gateway_ms: clock::since(received_at).as_secs_f64() * 1e3,
                    });
                }
                self.stream_token(run, index, token);
                if let Some(finish) = finish {
                    return self.end(runs, id, Ok(finish));
                }
                if self.p.retirement {
                    if let Err(e) = self.maybe_retire(runs).await {
                        self.fail_all(runs, e);
                    }
                }
            }
        }
    }

    /// LM head and sampling on the output of `run`'s oldest step.
    fn sample(&mut self, run: &mut Run, hidden: &Hidden) -> Result<Stepped, Interrupt> {
        let step = run.step_at(run.position).map_or(1, <[u32]>::len);
        if run.position < run.prompt_ids.len() {
            self.report_progress(run, run.position + step);
        }
        // The output of the prompt's last chunk yields token 0, each token's the next one.
        let Some(index) = (run.position + step).checked_sub(run.prompt_ids.len()) else {
            run.position += step; // a prompt chunk before the last
            return Ok(Stepped::Advanced);
        };
        if index < run.tokens.len() {
            run.position += step; // a known token fed again after a restart
            return Ok(Stepped::Advanced);
        }
        let received_at = clock::now();
        // Decode steps only, not the prompt's.
        let round_trip_ms =
            run.sent_at.filter(|_| run.position >= run.prompt_ids.len()).map(|t| (received_at - t).as_secs_f64() * 1e3);
        let logits = self.gateway.logits(hidden).map_err(|e| Interrupt::Fatal(format!("LM head: {e}")))?;
        let id = run.sampler.sample(&logits).map_err(|e| Interrupt::Fatal(format!("sampling: {e}")))?;
        if run.first_token_at.is_none() {
            run.first_token_at = Some(clock::now());
            run.prefill_s = clock::since(run.began).as_secs_f64();
        }
        let now = unix_now();
        for inc in run.incidents.iter_mut().filter(|i| i.next_token_at == 0.0) {
            inc.next_token_at = now;
        }
        if !run.ignore_eos && self.gateway.is_stop(id) {
            return Ok(Stepped::Ended(Finish::Eos));
        }
        run.tokens.push(id);
        run.position += step;
        let finish = if run.tokens.len() >= run.max_tokens {
            Some(Finish::Length)
        } else if run.position + 1 > self.max_context {
            Some(Finish::Context)
        } else {
            None
        };
        Ok(Stepped::Token { index, id, finish, round_trip_ms, received_at })
    }

    /// Request `id` ended: its clients get the answer.
    fn end(&mut self, runs: &mut Runs, id: u64, result: Result<Finish, Interrupt>) {
        if let Some(run) = runs.remove(&id) {
            let answer = self.answer(run, result);
            self.desk.finish(&answer);
        }
    }

    /// Every running request ends with the fault `e` (it stops the swarm for all of them).
    fn fail_all(&mut self, runs: &mut Runs, e: Interrupt) {
        let why = e.to_string();
        for id in runs.keys().copied().collect::<Vec<_>>() {
            self.end(runs, id, Err(Interrupt::Fatal(why.clone())));
        }
    }

    /// The answer of a request that ended (its done chunk goes out on the token topic).
    pub(super) fn answer(&mut self, mut run: Run, result: Result<Finish, Interrupt>) -> Answer {
        self.requests_served += 1;
        let finish = result.as_ref().map_or(Finish::Error, |&f| f);
        // The done chunk carries what the detokenizer still held (an incomplete character).
        let rest = run.detok.finish(&self.gateway).ok().flatten().unwrap_or_default();
        self.publish_done(run.request_id, run.tokens.len(), rest, finish);
        let text = self.gateway.decode(&run.tokens).unwrap_or_default();
        let decode_s = run.first_token_at.map_or(0.0, |t| clock::since(t).as_secs_f64());
        let tokens_per_s =
            if run.tokens.len() > 1 && decode_s > 0.0 { (run.tokens.len() - 1) as f64 / decode_s } else { 0.0 };
        let stats = serde_json::json!({
            "request_id": run.request_id,
            "activation_codec": self.codec.name(),
            "epochs": run.epochs,
            "incidents": run.incidents,
            "stale_dropped": self.stale_dropped,
            "watchdog": self.fallback.status(),
            "auth": self.auth.counters_json(),
            "prefill_s": run.prefill_s,
            "peak_running": run.peak_running,
            "gateway_hop_ms": percentiles(&std::mem::take(&mut self.hops)),
            "steps": step_stats(&run.steps),
            "prediction": self.prediction(&run.steps, &run.compute_ms),
            "layout": self.current.as_ref().map(|c| c.plan.stages.iter().map(|s| serde_json::json!({"uav": s.uav, "start": s.start, "layers": s.len, "k": s.k, "t": s.t})).collect::<Vec<_>>()),
        });
        let (accepted, error) = match result {
            Ok(_) => (true, String::new()),
            Err(e) => {
                tracing::error!(request = run.request_id, "generation failed: {e}");
                (run.started, e.to_string())
            }
        };
        Answer {
            accepted,
            error,
            request_id: run.request_id,
            prompt_ids: std::mem::take(&mut run.prompt_ids),
            tokens: std::mem::take(&mut run.tokens),
            text,
            finish,
            tokens_per_s,
            stats_json: stats.to_string(),
        }
    }

    /// Why no output came for `step_timeout_s`.
    fn stall(&self, runs: &Runs) -> String {
        let Some(plan) = self.current.as_ref().map(|c| c.plan.clone()) else { return "no plan".into() };
        let reports = self.reports(&plan);
        let Some(run) = runs.values().find(|r| r.sent_until > r.position) else { return "nothing in flight".into() };
        let why = epochs::diagnose_stall(
            plan.epoch,
            run.request_id,
            reports.iter().map(|(u, r)| (u.as_str(), r.as_ref())),
            self.membership.member_timeout,
        );
        format!(
            "no output for position {} of request {} within {} s and no failure declared; {why}",
            run.position, run.request_id, self.p.step_timeout_s
        )
    }

    /// A request the primary ran, from the tokens followed: on the executors' KV when they hold
    /// it, else an exact restart (the prompt and those tokens are fed again; the sampler stands
    /// where the primary's stood). Some: the request had already ended.
    async fn resume(&mut self, run: &mut Run, r: Resumed) -> Result<Option<Finish>, Interrupt> {
        let (mut known, _) = self.desk.progress(run.request_id);
        known.truncate(r.have);
        run.known_tokens(&self.gateway, known);
        let have = run.tokens.len();
        run.incidents.push(Incident {
            uav: "scheduler".into(),
            reason: "primary silent".into(),
            token: have,
            mode: "takeover".into(),
            resume_position: 0,
            replay_from: 0,
            epoch: self.next_epoch(),
            detected_at: r.at,
            recovered_at: 0.0,
            next_token_at: 0.0,
            planned_recovery_s: 0.0,
            why: format!("the primary was silent for {:.3} s", r.silent_s),
            stages: BTreeMap::new(),
        });
        match standby::resume(have, run.max_tokens, run.prompt_ids.len(), self.max_context) {
            Resume::Finished(finish) => Ok(Some(finish)),
            Resume::Continue { from } => {
                tracing::info!(request = run.request_id, from, "resuming from the followed tokens");
                self.plan_takeover(run).await?;
                Ok(None)
            }
        }
    }

    /// The takeover's plan for the running request: on the executors' KV caches when every
    /// stage of a fresh plan, or else of the primary's latest plan, holds them up to the last
    /// followed token ([`standby::kv_restart`]: it resumes there), else an exact restart from
    /// position 0.
    async fn plan_takeover(&mut self, run: &mut Run) -> Result<(), Interrupt> {
        let members = self.members();
        let held: BTreeMap<String, standby::KvHolder> =
            self.kv_holders().into_iter().filter(|(uav, _)| members.contains(uav)).collect();
        let mut why = Vec::new();
        // A fresh plan, else the primary's latest plan (decided again from its inputs): the
        // layout the executors hold, when a battery's drain since moved a boundary.
        let fresh = if members.is_empty() {
            Err("no member yet".to_string())
        } else {
            let decision = Decision::Initial { members };
            let inputs = self.inputs(self.next_epoch(), run.request_id, decision, run.total_tokens(), 0);
            self.decide(&inputs).map(|p| (p, inputs)).map_err(|e| e.to_string())
        };
        for candidate in [fresh, self.primary_plan(run.request_id)] {
            let (planned, inputs) = match candidate {
                Ok(c) => c,
                Err(e) => {
                    why.push(e);
                    continue;
                }
            };
            let restart = standby::kv_restart(
                &planned.plan.stages,
                &held,
                run.request_id,
                run.prompt_ids.len(),
                run.tokens.len(),
            );
            match restart {
                KvRestart::Resume { position } => match self.resume_on_kv(run, planned, inputs, position).await {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        why.push(format!("the plan resuming at {position} did not apply: {e}"));
                        break;
                    }
                },
                KvRestart::Refeed(r) => why.push(r.to_string()),
            }
        }
        let why = why.join("; ");
        tracing::info!(request = run.request_id, %why, "takeover: feeding the prompt and the followed tokens again");
        if let Some(inc) = run.incidents.last_mut() {
            inc.why = format!("{}; fed again: {why}", inc.why);
        }
        run.rewind();
        let total = run.total_tokens();
        self.plan_restart(run.request_id, total, "takeover").await
    }

    /// Publishes `planned` resuming at `position` and waits until every stage applied it.
    async fn resume_on_kv(
        &mut self,
        run: &mut Run,
        mut planned: Planned,
        inputs: PlanInputs,
        position: usize,
    ) -> Result<(), Interrupt> {
        let inputs = PlanInputs { resume_position: position, ..inputs };
        planned.plan.resume_position = position;
        self.publish(planned, &inputs, "takeover").map_err(|e| Interrupt::Fatal(e.to_string()))?;
        self.wait_ready().await?;
        tracing::info!(request = run.request_id, position, "takeover: resuming on the executors' KV caches");
        run.position = position;
        run.sent_until = position;
        if let Some(inc) = run.incidents.last_mut() {
            inc.resume_position = position;
        }
        Ok(())
    }

    fn report_progress(&self, run: &Run, done: usize) {
        let total = run.prompt_ids.len();
        tracing::debug!(request = run.request_id, done, total, "prompt progress");
        let msg = PromptProgress {
            request_id: run.request_id,
            done: done as u32,
            total: total as u32,
            epoch: self.epoch,
            ..Default::default()
        };
        if let Err(e) = self.progress_pub.publish(&msg) {
            tracing::warn!("publish prompt progress: {e}");
        }
    }

    fn stream_token(&mut self, run: &mut Run, index: usize, id: u32) {
        let text = run.detok.push(&self.gateway, id).ok().flatten().unwrap_or_default();
        let chunk = TokenChunk {
            request_id: run.request_id,
            index: index as u32,
            token_id: id as i32,
            text: text.clone(),
            done: false,
            finish_reason: String::new(),
            epoch: self.epoch,
            ..Default::default()
        };
        // On the token topic before the goals' feedback (a primary killed in between leaves its
        // standby no token behind its clients); a request nobody wants any more streams nothing.
        let token_pub = &self.token_pub;
        let wanted = self.desk.token(run.request_id, id, &text, || {
            if let Err(e) = token_pub.publish(&chunk) {
                tracing::warn!("publish token: {e}");
            }
        });
        if !wanted {
            return;
        }
        self.publish_diagnostics(Some(&*run));
    }

    /// Embeds and sends to the owner of layer 0 the steps [`interleave::next_steps`] picks: while
    /// fewer than one per stage (at most [`MAX_STEPS_IN_FLIGHT`]) are in flight over all requests.
    fn send_steps(&mut self, runs: &mut Runs) -> Result<(), Interrupt> {
        let plan = &self.current.as_ref().ok_or_else(|| Interrupt::Fatal("no plan".into()))?.plan;
        let first = plan.first().ok_or_else(|| Interrupt::Fatal("the plan has no first stage".into()))?.uav.clone();
        let (epoch, window) = (plan.epoch, plan.stages.len().clamp(1, MAX_STEPS_IN_FLIGHT));
        let lanes: Vec<Lane> = runs
            .values()
            .map(|r| {
                let (in_flight, ready) = r.steps_pending();
                Lane { request_id: r.request_id, in_flight, ready, last_sent: r.last_sent }
            })
            .collect();
        let topic = names::stage_input(&first);
        for id in interleave::next_steps(&lanes, window) {
            let Some(run) = runs.get(&id) else { continue };
            let Some(ids) = run.step_at(run.sent_until) else { continue };
            let (request_id, position) = (run.request_id, run.sent_until);
            let hidden = self.embed(ids)?;
            let mut msg = convert::activation(epoch, request_id, 0, position, 0, names::GATEWAY_SOURCE, &hidden);
            msg.context_tokens = run.context_tokens(self.max_context);
            self.auth.sign_activation(&topic, &mut msg);
            let publisher = self.activation_pub(&topic).map_err(|e| Interrupt::Fatal(e.to_string()))?;
            publisher.publish(&msg).map_err(|e| Interrupt::Fatal(format!("publish to {topic}: {e}")))?;
            self.steps_sent += 1;
            if let Some(run) = runs.get_mut(&id) {
                run.sent_until += hidden.rows();
                run.sent_at = Some(clock::now());
                run.last_sent = self.steps_sent;
            }
        }
        Ok(())
    }

    /// The embeddings of `ids`, encoded as they travel.
    fn embed(&mut self, ids: &[u32]) -> Result<Encoded, Interrupt> {
        let hidden = self.gateway.embed(ids).map_err(|e| Interrupt::Fatal(format!("embedding: {e}")))?;
        Encoded::encode(self.codec, hidden.as_slice(), hidden.width())
            .map_err(|e| Interrupt::Fatal(format!("encoding the embeddings: {e}")))
    }

    /// The publisher of a stage input or replay topic.
    pub(super) fn activation_pub(&mut self, topic: &str) -> anyhow::Result<&r2r::Publisher<Activation>> {
        self.activation_pubs.get(&self.ctx, topic, names::activation_qos(topic))
    }

    /// A stage around the gateway fails: its recovering successor replays the tail's layers after
    /// the gateway with the embeddings they were fed, which only the gateway has. Every step of
    /// `run` that fed layer 0 from `from` (the successor's snapshot holds the rest) to its resume
    /// position, chunked as it was sent (the prompt's chunks, then a token at a time).
    fn replay_embeddings(&mut self, run: &Run, failed: &str, from: usize) -> Result<(), Interrupt> {
        let mut chunks = Vec::new();
        for (position, ids) in gateway_steps(&run.prompt_ids, &run.tokens, from, run.position) {
            // Encoded again: the same bytes the stage was fed (the codecs are deterministic).
            chunks.push((position, self.embed(ids)?));
        }
        let mut msg = convert::packed_activation(self.epoch, run.request_id, 0, names::GATEWAY_SOURCE, &chunks)
            .map_err(|e| Interrupt::Fatal(format!("replay of {failed}'s embeddings: {e}")))?;
        msg.context_tokens = run.context_tokens(self.max_context);
        let topic = names::replay(failed);
        self.auth.sign_activation(&topic, &mut msg);
        tracing::info!(
            failed,
            request = run.request_id,
            steps = chunks.len(),
            tokens = msg.token_count,
            "replaying the embeddings of a stage around the gateway"
        );
        let publisher = self.activation_pub(&topic).map_err(|e| Interrupt::Fatal(e.to_string()))?;
        publisher.publish(&msg).map_err(|e| Interrupt::Fatal(format!("publish to {topic}: {e}")))
    }

    pub(super) fn in_plan(&self, uav: &str) -> bool {
        self.current.as_ref().is_some_and(|c| c.plan.stage(uav).is_some())
    }

    /// Failover of `failed` for every running request, each at its oldest step in flight; an
    /// exact restart of all of them when failover is impossible.
    async fn recover(&mut self, runs: &mut Runs, failed: &str, reason: &str) -> Result<(), Interrupt> {
        let detected_at = unix_now();
        let current = self.current.clone().ok_or_else(|| Interrupt::Fatal("no plan".into()))?;
        let graceful = reason == "retirement";
        // The decision is made for the request with the most context (its recovery is the
        // longest); every other request is carried by the same layout.
        let lead = runs
            .values()
            .max_by_key(|r| (r.position, std::cmp::Reverse(r.request_id)))
            .map(|r| (r.request_id, r.position, r.total_tokens()))
            .ok_or_else(|| Interrupt::Fatal("no request to recover".into()))?;
        let snapshots: BTreeMap<u64, Option<SnapshotHeld>> =
            runs.keys().map(|&id| (id, self.snapshot_held_after(&current.plan, failed, id))).collect();
        let snapshot = snapshots.get(&lead.0).copied().flatten();
        let decision =
            Decision::Failover { failed: failed.into(), graceful, based_on_epoch: current.plan.epoch, snapshot };
        // Every running request's tokens: the survivors must hold all their KV (the recovery's
        // memory check) and serve all of them (the lifespan).
        let total = runs.values().map(Run::total_tokens).sum::<u64>().max(lead.2);
        let inputs = self.inputs(self.next_epoch(), lead.0, decision, total, lead.1);
        let planned = self.decide(&inputs).map_err(|e| e.to_string());
        let needs_embeddings = current.plan.stage(failed).is_some_and(|s| current.plan.tail_needs_gateway_replay(s));
        let mut incident = Incident {
            uav: failed.into(),
            reason: reason.into(),
            token: 0,
            mode: if graceful { "retirement" } else { "failover" }.into(),
            resume_position: 0,
            replay_from: 0,
            epoch: self.next_epoch(),
            detected_at,
            recovered_at: 0.0,
            next_token_at: 0.0,
            planned_recovery_s: 0.0,
            why: String::new(),
            stages: BTreeMap::new(),
        };
        let why = match planned {
            Ok(mut planned) if planned.plan.resume_position > 0 => {
                incident.planned_recovery_s = planned.protection.worst_recovery_s;
                // Each request resumes at its own oldest step, its failed tail replayed from its
                // own snapshot (the decision's rule for the lead's `replay_from`: the snapshot, at
                // most the resume position).
                planned.plan.requests = runs
                    .values()
                    .map(|r| RequestResume {
                        request_id: r.request_id,
                        resume_position: r.position,
                        replay_from: snapshots
                            .get(&r.request_id)
                            .copied()
                            .flatten()
                            .map_or(0, |s| s.tokens.min(r.position)),
                    })
                    .collect();
                let carried = planned.plan.requests.clone();
                self.publish(planned, &inputs, &format!("{reason} of {failed}"))
                    .map_err(|e| Interrupt::Fatal(e.to_string()))?;
                incident.epoch = self.epoch;
                if needs_embeddings {
                    for c in carried.iter().filter(|c| c.resume_position > c.replay_from) {
                        if let Some(run) = runs.get(&c.request_id) {
                            self.replay_embeddings(run, failed, c.replay_from)?;
                        }
                    }
                }
                match self.wait_ready().await {
                    Ok(stages) => {
                        incident.stages = stages
                            .into_iter()
                            .map(|(uav, t)| {
                                (
                                    uav,
                                    StageReady { loaded_s: t.loaded_s - detected_at, ready_s: t.ready_s - detected_at },
                                )
                            })
                            .collect();
                        None
                    }
                    Err(Interrupt::Failed(other)) => Some(format!("another failure during recovery: {other}")),
                    Err(e) => Some(format!("failover did not complete: {e}")),
                }
            }
            Ok(_) => Some("the failure came during the prompt's first chunk: nothing to recover".to_string()),
            Err(why) => Some(format!("no failover plan: {why}")),
        };
        if let Some(why) = why {
            tracing::warn!(failed, %why, "restarting exactly");
            incident.why = why;
            incident.mode = "restart".into();
            for run in runs.values_mut() {
                run.rewind();
            }
            self.plan_restart(lead.0, total, &format!("restart after {reason} of {failed}")).await?;
            incident.epoch = self.epoch;
        }
        incident.recovered_at = unix_now();
        tracing::info!(failed, mode = %incident.mode, requests = runs.len(), recovery_s = incident.recovered_at - detected_at, "recovered");
        let carried = self.current.as_ref().map(|c| c.plan.carried()).unwrap_or_default();
        for run in runs.values_mut() {
            // The steps in flight went out in an older epoch: they are sent again.
            run.sent_until = run.position;
            run.epochs.push(self.epoch);
            let resumed = carried.iter().find(|c| c.request_id == run.request_id);
            run.incidents.push(Incident {
                token: run.tokens.len(),
                resume_position: resumed.map_or(0, |c| c.resume_position),
                replay_from: resumed.map_or(0, |c| c.replay_from),
                ..incident.clone()
            });
        }
        Ok(())
    }

    /// How far `failed`'s successor holds its tail's snapshot of `request_id`, from its last
    /// heartbeat in this plan's epoch (a lower bound: snapshots only grow within an epoch).
    fn snapshot_held_after(&self, plan: &SwarmPlan, failed: &str, request_id: u64) -> Option<SnapshotHeld> {
        let succ = plan.succ(failed).filter(|s| s.uav != failed)?;
        let live = self.lock();
        let (_, hb) = live.beats.get(&succ.uav)?;
        if hb.epoch != plan.epoch {
            return None;
        }
        let tokens = match hb.kv.iter().find(|k| k.request_id == request_id) {
            Some(k) => k.pred_snapshot_tokens,
            None if hb.request_id == request_id => hb.pred_snapshot_tokens,
            None => return None,
        };
        Some(SnapshotHeld { tokens: tokens as usize, heartbeat_sequence: hb.sequence })
    }

    /// A fresh plan over the members, every request from position 0 (the start of a batch, or a
    /// restart); `request_id` and `total_tokens` are what the plan is decided for.
    async fn plan_restart(&mut self, request_id: u64, total_tokens: u64, reason: &str) -> Result<(), Interrupt> {
        // A DDS stall after a drone is killed can silence live drones for a second (false failure
        // declarations); they count as members again once their heartbeats resume. Give them that
        // long before the request fails for want of drones.
        let grace = clock::now() + Duration::from_secs_f64(2.0 * self.p.member_timeout_s);
        loop {
            let members = self.members();
            if members.is_empty() {
                if clock::now() < grace {
                    clock::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                return Err(Interrupt::Fatal("no UAV left to serve the request".into()));
            }
            let decision = Decision::Initial { members };
            let inputs = self.inputs(self.next_epoch(), request_id, decision, total_tokens, 0);
            let planned = self
                .decide(&inputs)
                .map_err(|e| Interrupt::Fatal(format!("the swarm cannot serve this request: {e}")))?;
            self.publish(planned, &inputs, reason).map_err(|e| Interrupt::Fatal(e.to_string()))?;
            match self.wait_ready().await {
                Ok(_) => return Ok(()),
                Err(Interrupt::Failed(uav)) => {
                    tracing::warn!(%uav, "failed while the plan was applied: planning again")
                }
                Err(Interrupt::Superseded { uav, epoch }) => {
                    tracing::warn!(%uav, epoch, "an executor runs a later epoch: planning again above it")
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until every stage of the current plan runs it (heartbeat epoch and state "ready").
    async fn wait_ready(&mut self) -> Result<BTreeMap<String, StageReady>, Interrupt> {
        let plan = self.current.as_ref().map(|c| c.plan.clone()).ok_or_else(|| Interrupt::Fatal("no plan".into()))?;
        let deadline = clock::now() + Duration::from_secs_f64(self.p.ready_timeout_s);
        let mut poll = clock::interval(Duration::from_millis(5));
        let mut seen: BTreeMap<String, StageReady> = BTreeMap::new();
        loop {
            tokio::select! {
                Some(ev) = self.failures.recv() => {
                    if self.note_failure(&ev) && plan.stage(&ev.uav_id).is_some() {
                        return Err(Interrupt::Failed(ev.uav_id));
                    }
                }
                _ = poll.tick() => {
                    let reports = self.reports(&plan);
                    let now = unix_now();
                    for (uav, r) in &reports {
                        if let Some(r) = r.as_ref().filter(|r| r.epoch == plan.epoch) {
                            let t = seen.entry(uav.clone()).or_insert(StageReady { loaded_s: now, ready_s: 0.0 });
                            if r.state == ExecutorState::Ready && t.ready_s == 0.0 {
                                t.ready_s = now;
                            }
                        }
                    }
                    match epochs::readiness(plan.epoch, reports.iter().map(|(u, r)| (u.as_str(), r.as_ref()))) {
                        Readiness::Ready => return Ok(seen),
                        Readiness::Superseded { uav, epoch } => return Err(Interrupt::Superseded { uav, epoch }),
                        Readiness::Refused { uav, why } => {
                            return Err(Interrupt::Fatal(format!("{uav} cannot apply epoch {}: {why}", plan.epoch)));
                        }
                        Readiness::Waiting(lags) if clock::now() > deadline => {
                            let lags: Vec<String> = lags.iter().map(ToString::to_string).collect();
                            return Err(Interrupt::Fatal(format!("not ready with epoch {} after {} s: {}", plan.epoch, self.p.ready_timeout_s, lags.join("; "))));
                        }
                        Readiness::Waiting(_) => {}
                    }
                }
            }
        }
    }

    /// Planned retirement: a member whose battery will not last the running requests hands its
    /// layers over now, between two tokens, with no failure.
    async fn maybe_retire(&mut self, runs: &mut Runs) -> Result<(), Interrupt> {
        let telemetry = self.telemetry();
        // Runs every token: borrow the plan, do not copy it.
        let Some(current) = self.current.as_ref() else { return Ok(()) };
        // The work left over every request, as one request's length and progress.
        let total: u64 = runs.values().map(Run::total_tokens).sum();
        let done: u64 = runs.values().map(|r| r.position as u64).sum();
        match self.controller.retirement_candidate(current, &telemetry, total, done, self.p.retirement_horizon_tokens) {
            Ok(Some(uav)) => {
                tracing::warn!(%uav, "battery will not last the request: retiring it");
                self.recover(runs, &uav, "retirement").await?;
                // It stays out of plans until it restarts (recharged, as a new process).
                let seq = self.lock().beats.get(&uav).map_or(0, |(_, hb)| hb.sequence);
                self.membership.retire(&uav, seq);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("retirement check: {e}"),
        }
        Ok(())
    }
}
