//! The standby scheduler's decisions (docs/failure-detection.md, "The standby scheduler"): which
//! role a scheduler has, when the standby takes over from a silent primary, how it follows the
//! primary's token stream, and what it resumes. Pure logic, no ROS; the scheduler node does the
//! I/O.
//!
//! The standby follows: the primary's heartbeat, the requests it admits (`RequestSpec`), the
//! tokens it streams (`TokenChunk`), its plans (`Assignment`) and the executors' epochs. When
//! the primary has been silent for `primary_timeout_s` while the executors were heard for that
//! whole time, the standby takes over: it serves the action, plans above every epoch it saw, and
//! resumes the running request from the tokens it followed, the sampler where the primary's
//! stood: on the executors' KV caches when every stage of its plan still holds them
//! ([`kv_restart`]), else an exact restart (the prompt and those tokens are fed again).
use crate::dataplane::Stage;
use crate::requests::Finish;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// A scheduler's `role` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Serves from the start.
    #[default]
    Primary,
    /// Follows the primary and serves only after it took over.
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("role must be \"primary\" or \"standby\", not {0:?}")]
pub struct BadRole(pub String);

impl FromStr for Role {
    type Err = BadRole;
    fn from_str(s: &str) -> Result<Self, BadRole> {
        match s {
            "primary" => Ok(Role::Primary),
            "standby" => Ok(Role::Standby),
            other => Err(BadRole(other.chars().take(40).collect())),
        }
    }
}

/// What a scheduler does now (its heartbeat's `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A standby before its takeover: listens, plans nothing, serves no client.
    Following,
    /// Plans and serves (a primary from the start, a standby after its takeover).
    Serving,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Following => "following",
            Phase::Serving => "serving",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        match s {
            "following" => Some(Phase::Following),
            "serving" => Some(Phase::Serving),
            _ => None,
        }
    }

    pub fn initial(role: Role) -> Phase {
        match role {
            Role::Primary => Phase::Serving,
            Role::Standby => Phase::Following,
        }
    }
}

/// The standby's takeover: the primary was silent this long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Takeover {
    pub silent_s: f64,
}

/// The primary as the standby hears it, and the takeover rule. Times are seconds on one clock.
#[derive(Debug, Clone)]
pub struct Watch {
    timeout_s: f64,
    primary_last: Option<f64>,
    executor_last: f64,
    phase: Phase,
}

impl Watch {
    /// A standby that starts listening (its phase is [`Phase::Following`]).
    pub fn new(timeout_s: f64) -> Self {
        Watch { timeout_s, primary_last: None, executor_last: f64::NEG_INFINITY, phase: Phase::Following }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The primary's heartbeat (signed by the primary, saying it serves).
    pub fn primary_heartbeat(&mut self, now: f64) {
        self.primary_last = Some(self.primary_last.map_or(now, |t| t.max(now)));
    }

    /// Any executor's heartbeat: this process hears the swarm (not a stall of its own).
    pub fn executor_heard(&mut self, now: f64) {
        self.executor_last = self.executor_last.max(now);
    }

    /// Seconds since the primary was last heard (None: never heard).
    pub fn primary_silent_s(&self, now: f64) -> Option<f64> {
        self.primary_last.map(|t| (now - t).max(0.0))
    }

    /// Takes over (once) when the primary, heard at least once, has been silent for longer than
    /// the timeout while executors were heard for the whole timeout after its last heartbeat. A
    /// standby that never heard a primary never takes over (a primary slow to start is no dead
    /// one); a standby that heard nobody (its own process or network stalled) cannot tell.
    pub fn check(&mut self, now: f64) -> Option<Takeover> {
        let last = self.primary_last?;
        let silent_s = now - last;
        if self.phase == Phase::Following && silent_s > self.timeout_s && self.executor_last - last > self.timeout_s {
            self.phase = Phase::Serving;
            return Some(Takeover { silent_s });
        }
        None
    }
}

/// What a scheduler does on hearing another scheduler's heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Nothing to do.
    Ignore,
    /// A standby's primary beats: it is alive.
    PrimaryAlive,
    /// A serving primary hears that the standby took over (it was silent long enough to be
    /// taken for dead, e.g. stalled): it must stop planning and serving, or two schedulers would
    /// plan the swarm.
    StepDown,
}

/// The rule for another scheduler's heartbeat (`role` and `phase` as it says; authenticated).
pub fn peer(me: Role, my_phase: Phase, their_role: Role, their_phase: Phase) -> Peer {
    match (me, their_role, their_phase) {
        (Role::Standby, Role::Primary, Phase::Serving) if my_phase == Phase::Following => Peer::PrimaryAlive,
        (Role::Primary, Role::Standby, Phase::Serving) if my_phase == Phase::Serving => Peer::StepDown,
        _ => Peer::Ignore,
    }
}

/// One chunk of the primary's token stream, as the standby applies it to a request it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStep {
    /// The next token of the request: append it.
    Append,
    /// A token the standby already has (a duplicate delivery): ignore.
    Duplicate,
    /// A token beyond the next one (one was lost): the standby's copy ends at `have`; it resumes
    /// from there (the tokens are regenerated exactly).
    Gap { have: usize, got: usize },
    /// The request ended with `finish` after `tokens` tokens.
    Done { finish: Finish, tokens: usize },
    /// A chunk that makes no sense (unknown finish reason): ignore.
    Invalid,
}

/// What a chunk (`index`, `done`, `finish_reason`) does to a followed request of `have` tokens.
pub fn token_step(have: usize, index: usize, done: bool, finish_reason: &str) -> TokenStep {
    if done {
        return match Finish::parse(finish_reason) {
            Some(finish) => TokenStep::Done { finish, tokens: index },
            None => TokenStep::Invalid,
        };
    }
    match index.cmp(&have) {
        std::cmp::Ordering::Less => TokenStep::Duplicate,
        std::cmp::Ordering::Equal => TokenStep::Append,
        std::cmp::Ordering::Greater => TokenStep::Gap { have, got: index },
    }
}

/// What the standby does with the request that was running when it took over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Generate on from token `from` (the tokens before it were followed): an exact restart.
    Continue { from: usize },
    /// Every token was out already (`max_tokens` reached, or the context full): only the end is
    /// missing.
    Finished(Finish),
}

/// The resume point of a running request with `have` followed tokens.
pub fn resume(have: usize, max_tokens: usize, prompt_len: usize, max_context: usize) -> Resume {
    if have >= max_tokens {
        Resume::Finished(Finish::Length)
    } else if prompt_len + have + 1 > max_context {
        Resume::Finished(Finish::Context)
    } else {
        Resume::Continue { from: have }
    }
}

/// What one executor holds, from its last heartbeat: its native layers `layer_start` up to
/// `layer_end` (exclusive; past the model's last layer when they wrap around) and, per request,
/// the rows in their KV caches (`kv`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KvHolder {
    pub layer_start: usize,
    pub layer_end: usize,
    pub kv: Vec<(u64, usize)>,
}

/// How the standby restarts the running request on its takeover plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvRestart {
    /// Every stage holds the request's KV up to `position`: the plan resumes there (each cache
    /// is cut back to it, also one that computed a step the standby never saw) and the step at
    /// `position` (the last followed token) is fed next.
    Resume { position: usize },
    /// The prompt and the followed tokens are fed again, from position 0.
    Refeed(Refeed),
}

/// Why the KV caches cannot be reused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refeed {
    #[error("no token was followed (the prompt is fed in chunks)")]
    NoToken,
    #[error("{0} was not heard")]
    Unheard(String),
    #[error("{uav} holds layers {held_start}..{held_end}, the plan gives it {start}..{end}")]
    OtherLayers { uav: String, held_start: usize, held_end: usize, start: usize, end: usize },
    #[error("{0} holds no KV of the request")]
    OtherRequest(String),
    #[error("{uav} holds {held} tokens of the request, {need} are needed")]
    Short { uav: String, held: usize, need: usize },
}

/// How the request `request_id` of `prompt_len` prompt tokens, `have` of its tokens followed,
/// restarts on a plan of `stages`, given what the executors hold (`held`, by UAV). The caches
/// hold the prompt and every token fed, so with `have` tokens they must reach the position of
/// the last one, `prompt_len + have - 1`, which is fed again (its output is token `have`). A
/// stage is usable only if it keeps the native layers it computed them with.
pub fn kv_restart(
    stages: &[Stage],
    held: &BTreeMap<String, KvHolder>,
    request_id: u64,
    prompt_len: usize,
    have: usize,
) -> KvRestart {
    let Some(position) = (prompt_len + have).checked_sub(1).filter(|_| have > 0) else {
        return KvRestart::Refeed(Refeed::NoToken);
    };
    for s in stages {
        let Some(h) = held.get(&s.uav) else { return KvRestart::Refeed(Refeed::Unheard(s.uav.clone())) };
        if (h.layer_start, h.layer_end) != (s.start, s.start + s.len) {
            return KvRestart::Refeed(Refeed::OtherLayers {
                uav: s.uav.clone(),
                held_start: h.layer_start,
                held_end: h.layer_end,
                start: s.start,
                end: s.start + s.len,
            });
        }
        let Some(&(_, tokens)) = h.kv.iter().find(|(id, _)| *id == request_id) else {
            return KvRestart::Refeed(Refeed::OtherRequest(s.uav.clone()));
        };
        if tokens < position {
            return KvRestart::Refeed(Refeed::Short { uav: s.uav.clone(), held: tokens, need: position });
        }
    }
    if stages.is_empty() {
        return KvRestart::Refeed(Refeed::Unheard("any stage".into()));
    }
    KvRestart::Resume { position }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_phases_parse_and_name_themselves() {
        assert_eq!("primary".parse::<Role>(), Ok(Role::Primary));
        assert_eq!("standby".parse::<Role>(), Ok(Role::Standby));
        assert!("Standby".parse::<Role>().is_err());
        assert_eq!(Role::default(), Role::Primary);
        for p in [Phase::Following, Phase::Serving] {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::initial(Role::Standby), Phase::Following);
        assert_eq!(Phase::initial(Role::Primary), Phase::Serving);
    }

    #[test]
    fn the_standby_takes_over_once_after_the_primary_is_silent_for_the_timeout() {
        let mut w = Watch::new(0.5);
        for t in 0..10 {
            let now = t as f64 * 0.1;
            w.primary_heartbeat(now);
            w.executor_heard(now);
            assert_eq!(w.check(now), None);
        }
        // The primary dies at 0.9; executors go on.
        for t in 10..14 {
            w.executor_heard(t as f64 * 0.1);
            assert_eq!(w.check(t as f64 * 0.1), None, "at {t}");
        }
        w.executor_heard(1.45);
        let t = w.check(1.45).expect("takeover");
        assert!((t.silent_s - 0.55).abs() < 1e-9);
        assert_eq!(w.phase(), Phase::Serving);
        assert_eq!(w.check(2.0), None, "only once");
    }

    #[test]
    fn no_takeover_without_a_primary_ever_heard_or_while_nothing_is_heard() {
        let mut w = Watch::new(0.5);
        w.executor_heard(10.0);
        assert_eq!(w.check(10.0), None, "never heard a primary");
        w.primary_heartbeat(11.0);
        // This process stalled: no executor heard after the primary's last beat.
        assert_eq!(w.check(20.0), None);
        w.executor_heard(11.3);
        assert_eq!(w.check(20.0), None, "executors heard for less than the timeout");
        w.executor_heard(20.0);
        assert!(w.check(20.0).is_some());
        assert_eq!(w.primary_silent_s(20.0), Some(9.0));
    }

    #[test]
    fn a_primary_steps_down_when_the_standby_serves() {
        use Phase::*;
        assert_eq!(peer(Role::Standby, Following, Role::Primary, Serving), Peer::PrimaryAlive);
        assert_eq!(peer(Role::Standby, Serving, Role::Primary, Serving), Peer::Ignore);
        assert_eq!(peer(Role::Primary, Serving, Role::Standby, Following), Peer::Ignore);
        assert_eq!(peer(Role::Primary, Serving, Role::Standby, Serving), Peer::StepDown);
        assert_eq!(peer(Role::Primary, Serving, Role::Primary, Serving), Peer::Ignore);
    }

    #[test]
    fn the_token_stream_is_followed_in_order() {
        assert_eq!(token_step(0, 0, false, ""), TokenStep::Append);
        assert_eq!(token_step(3, 1, false, ""), TokenStep::Duplicate);
        assert_eq!(token_step(3, 5, false, ""), TokenStep::Gap { have: 3, got: 5 });
        assert_eq!(token_step(3, 3, true, "eos"), TokenStep::Done { finish: Finish::Eos, tokens: 3 });
        assert_eq!(token_step(3, 3, true, "bogus"), TokenStep::Invalid);
    }

    #[test]
    fn the_running_request_resumes_from_the_tokens_followed() {
        assert_eq!(resume(5, 48, 10, 2048), Resume::Continue { from: 5 });
        assert_eq!(resume(0, 48, 10, 2048), Resume::Continue { from: 0 });
        assert_eq!(resume(48, 48, 10, 2048), Resume::Finished(Finish::Length));
        assert_eq!(resume(5, 48, 2043, 2048), Resume::Finished(Finish::Context));
    }

    fn stages() -> Vec<Stage> {
        vec![
            Stage { uav: "uav1".into(), start: 0, len: 10, k: 2, t: 4 },
            Stage { uav: "uav2".into(), start: 10, len: 12, k: 2, t: 4 },
            Stage { uav: "uav3".into(), start: 22, len: 8, k: 2, t: 4 },
        ]
    }

    fn holders(kv: &[(u64, usize)]) -> BTreeMap<String, KvHolder> {
        stages()
            .iter()
            .map(|s| (s.uav.clone(), KvHolder { layer_start: s.start, layer_end: s.start + s.len, kv: kv.to_vec() }))
            .collect()
    }

    #[test]
    fn the_takeover_resumes_on_the_kv_when_every_stage_holds_it() {
        // 10 prompt tokens, 5 followed: rows 0..14 are needed, the step at 14 (token 4) is next.
        assert_eq!(kv_restart(&stages(), &holders(&[(7, 14)]), 7, 10, 5), KvRestart::Resume { position: 14 });
        // A stage ahead (it computed a step the standby never saw): cut back to 14.
        let mut held = holders(&[(7, 14)]);
        held.get_mut("uav2").expect("uav2").kv = vec![(7, 15)];
        assert_eq!(kv_restart(&stages(), &held, 7, 10, 5), KvRestart::Resume { position: 14 });
        assert_eq!(kv_restart(&stages(), &holders(&[(7, 10)]), 7, 10, 1), KvRestart::Resume { position: 10 });
    }

    #[test]
    fn the_takeover_feeds_again_when_a_stage_falls_short() {
        let mut held = holders(&[(7, 14)]);
        held.get_mut("uav3").expect("uav3").kv = vec![(7, 13)];
        assert_eq!(
            kv_restart(&stages(), &held, 7, 10, 5),
            KvRestart::Refeed(Refeed::Short { uav: "uav3".into(), held: 13, need: 14 })
        );
        let mut held = holders(&[(7, 14)]);
        held.get_mut("uav1").expect("uav1").kv = vec![(6, 40)];
        assert_eq!(kv_restart(&stages(), &held, 7, 10, 5), KvRestart::Refeed(Refeed::OtherRequest("uav1".into())));
        let mut held = holders(&[(7, 14)]);
        held.get_mut("uav2").expect("uav2").layer_end = 21;
        assert!(matches!(kv_restart(&stages(), &held, 7, 10, 5), KvRestart::Refeed(Refeed::OtherLayers { .. })));
        let mut held = holders(&[(7, 14)]);
        held.remove("uav3");
        assert_eq!(kv_restart(&stages(), &held, 7, 10, 5), KvRestart::Refeed(Refeed::Unheard("uav3".into())));
    }

    #[test]
    fn the_takeover_feeds_again_when_nothing_is_held() {
        assert_eq!(
            kv_restart(&stages(), &holders(&[]), 7, 10, 5),
            KvRestart::Refeed(Refeed::OtherRequest("uav1".into()))
        );
        assert_eq!(
            kv_restart(&stages(), &BTreeMap::new(), 7, 10, 5),
            KvRestart::Refeed(Refeed::Unheard("uav1".into()))
        );
        assert_eq!(kv_restart(&stages(), &holders(&[(7, 14)]), 7, 10, 0), KvRestart::Refeed(Refeed::NoToken));
        assert!(matches!(kv_restart(&[], &holders(&[(7, 14)]), 7, 10, 5), KvRestart::Refeed(Refeed::Unheard(_))));
    }
}
