//! Signing and verifying messages: Ed25519ph (RFC 8032, ed25519-dalek) over a message's
//! canonical bytes, bound to its topic, its sender and a per-sender counter.
//!
//! The signed bytes are fed straight into SHA-512 (the "ph" of Ed25519ph) as the message is
//! encoded, so a multi-megabyte KV snapshot is hashed once and never copied.
use crate::identity::NodeId;
use crate::keystore::{Member, Roster};
use crate::policy;
use ed25519_dalek::{Signature, SigningKey};
use sha2::{Digest, Sha512};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Ed25519ph context: signatures made for AeroKV cannot be valid for anything else.
pub const CONTEXT: &[u8] = b"aerokv-auth-v1";
pub const SIGNATURE_LEN: usize = ed25519_dalek::SIGNATURE_LENGTH;

/// Where canonical bytes go: a hash or MAC being computed, or a buffer.
pub trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Sha512 {
    fn put(&mut self, bytes: &[u8]) {
        Digest::update(self, bytes);
    }
}

impl Sink for hmac::Hmac<sha2::Sha256> {
    fn put(&mut self, bytes: &[u8]) {
        hmac::Mac::update(self, bytes);
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// The canonical encoding of a message: its fields in declaration order; integers little-endian
/// at their declared width, floats as their IEEE-754 bits, strings and byte arrays as a u64
/// length then the bytes, sequences as a u32 count then the elements. Unambiguous by
/// construction, independent of the middleware's serialization (see docs/security.md).
pub struct Encoder<'a> {
    sink: &'a mut dyn Sink,
}

impl<'a> Encoder<'a> {
    pub fn new(sink: &'a mut dyn Sink) -> Self {
        Encoder { sink }
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.sink.put(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.sink.put(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.sink.put(&v.to_le_bytes());
        self
    }
    pub fn f32(&mut self, v: f32) -> &mut Self {
        self.u32(v.to_bits())
    }
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.u64(v.to_bits())
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.sink.put(&[u8::from(v)]);
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.sink.put(v);
        self
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    /// A sequence: its length, then each element encoded by `each`.
    pub fn seq<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Self, &T)) -> &mut Self {
        self.u32(items.len() as u32);
        for item in items {
            each(self, item);
        }
        self
    }
}

/// What travels with a signed message (`aerokv/Auth`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auth {
    pub sender: String,
    pub counter: u64,
    pub signature: Vec<u8>,
}

/// The bytes under a signature: context, topic, sender, counter, then the message. Prefixed
/// fields carry their length, so no two (topic, sender, counter, message) encode alike.
fn envelope(sink: &mut dyn Sink, topic: &str, sender: &str, counter: u64, body: impl FnOnce(&mut Encoder)) {
    let mut e = Encoder::new(sink);
    e.str(topic).str(sender).u64(counter);
    body(&mut e);
}

fn prehash(topic: &str, sender: &str, counter: u64, body: impl FnOnce(&mut Encoder)) -> Sha512 {
    let mut h = Sha512::new();
    envelope(&mut h, topic, sender, counter, body);
    h
}

/// One node's signing key and its message counter.
pub struct Signer {
    id: NodeId,
    key: SigningKey,
    counter: AtomicU64,
}

impl Signer {
    /// The counter starts at the wall clock in nanoseconds since 1970: a restarted node keeps
    /// counting above everything it sent before, with nothing to persist (as long as its clock
    /// does not go back and it signs fewer than 10^9 messages a second).
    pub fn new(id: NodeId, key: SigningKey) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self::with_counter(id, key, now.as_nanos() as u64)
    }

    pub fn with_counter(id: NodeId, key: SigningKey, first: u64) -> Self {
        Signer { id, key, counter: AtomicU64::new(first) }
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// Signs the message `body` encodes, as sent on `topic`.
    pub fn sign(&self, topic: &str, body: impl FnOnce(&mut Encoder)) -> Auth {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let h = prehash(topic, self.id.as_str(), counter, body);
        // Fails only for a context longer than 255 bytes, which CONTEXT is not.
        let signature = self.key.sign_prehashed(h, Some(CONTEXT)).map(|s| s.to_bytes().to_vec()).unwrap_or_default();
        Auth { sender: self.id.to_string(), counter, signature }
    }
}

/// Why a message was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Rejection {
    #[error("unsigned")]
    Unsigned,
    #[error("sender not on the roster")]
    UnknownSender,
    #[error("sender's role or UAV may not sign on this topic")]
    WrongRole,
    #[error("signature does not verify")]
    BadSignature,
    #[error("counter already seen or too old (replay)")]
    Replayed,
    #[error("malformed authentication fields")]
    Malformed,
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::Unsigned,
        Rejection::UnknownSender,
        Rejection::WrongRole,
        Rejection::BadSignature,
        Rejection::Replayed,
        Rejection::Malformed,
    ];

    /// Stable snake_case name (diagnostics keys, docs).
    pub fn name(self) -> &'static str {
        match self {
            Rejection::Unsigned => "unsigned",
            Rejection::UnknownSender => "unknown_sender",
            Rejection::WrongRole => "wrong_role",
            Rejection::BadSignature => "bad_signature",
            Rejection::Replayed => "replayed",
            Rejection::Malformed => "malformed",
        }
    }
}

/// Messages accepted and rejected (per reason) by one verifier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub accepted: u64,
    rejected: [u64; 6],
}

impl Counts {
    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected[why as usize]
    }
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
    fn record(&mut self, outcome: Result<(), Rejection>) {
        match outcome {
            Ok(()) => self.accepted += 1,
            Err(why) => self.rejected[why as usize] += 1,
        }
    }
}

/// Replay protection: the highest counter accepted and which of the [`ReplayWindow::SIZE`]
/// below it were accepted too (the anti-replay window of IPsec, RFC 4303 §3.4.3). Counters may
/// arrive out of order within the window; each is accepted once; older ones never.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    highest: Option<u64>,
    /// Bit i: `highest - i` was accepted.
    seen: u128,
}

impl ReplayWindow {
    pub const SIZE: u64 = 128;

    /// Would `counter` be new?
    pub fn check(&self, counter: u64) -> Result<(), Rejection> {
        match self.highest {
            Some(h) if counter <= h => {
                let back = h - counter;
                if back >= Self::SIZE || self.seen & (1 << back) != 0 {
                    Err(Rejection::Replayed)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Records `counter` (after [`Self::check`] and the signature passed).
    pub fn accept(&mut self, counter: u64) {
        match self.highest {
            Some(h) if counter <= h => self.seen |= 1 << (h - counter),
            Some(h) => {
                let shift = counter - h;
                self.seen = if shift >= Self::SIZE { 0 } else { self.seen << shift };
                self.seen |= 1;
                self.highest = Some(counter);
            }
            None => {
                self.seen = 1;
                self.highest = Some(counter);
            }
        }
    }
}

/// The authentication fields of a received message.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub sender: &'a str,
    pub counter: u64,
    pub signature: &'a [u8],
}

/// Checks received messages against the roster and the topic's authority; counts the outcomes.
pub struct Verifier {
    roster: Roster,
    /// Per sender and topic: a sender's messages on one topic come from one writer, in order;
    /// across topics DDS may reorder them arbitrarily.
    windows: HashMap<(NodeId, String), ReplayWindow>,
    counts: Counts,
}

impl Verifier {
    pub fn new(roster: Roster) -> Self {
        Verifier { roster, windows: HashMap::new(), counts: Counts::default() }
    }

    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Accepts the message `body` encodes, received on `topic` with `claim`, or says why not.
    /// Cheap checks first, the signature last; the window moves only for a valid signature.
    pub fn verify(
        &mut self,
        topic: &str,
        claim: Claim<'_>,
        body: impl FnOnce(&mut Encoder),
    ) -> Result<Member, Rejection> {
        self.verify_attributed(topic, claim, None, body)
    }

    /// [`Self::verify`] for a message that names its own author in a field (an activation's
    /// `source`, a heartbeat's `uav_id`): the sender must be `author`, or it is
    /// [`Rejection::WrongRole`] (a member signing what it attributes to another).
    pub fn verify_attributed(
        &mut self,
        topic: &str,
        claim: Claim<'_>,
        author: Option<&str>,
        body: impl FnOnce(&mut Encoder),
    ) -> Result<Member, Rejection> {
        let outcome = self.check(topic, claim, author, body);
        self.counts.record(outcome.as_ref().map(|_| ()).map_err(|e| *e));
        outcome
    }

    fn check(
        &mut self,
        topic: &str,
        claim: Claim<'_>,
        author: Option<&str>,
        body: impl FnOnce(&mut Encoder),
    ) -> Result<Member, Rejection> {
        if claim.sender.is_empty() && claim.signature.is_empty() {
            return Err(Rejection::Unsigned);
        }
        let id = NodeId::parse(claim.sender).map_err(|_| Rejection::Malformed)?;
        let signature: [u8; SIGNATURE_LEN] = claim.signature.try_into().map_err(|_| Rejection::Malformed)?;
        let member = self.roster.get(claim.sender).ok_or(Rejection::UnknownSender)?.clone();
        let rule = policy::rule(topic).ok_or(Rejection::WrongRole)?;
        let own_topic = !rule.own_uav_only || member.uav().is_some_and(|u| Some(u) == policy::topic_uav(topic));
        if !rule.roles.contains(&member.role) || !own_topic || author.is_some_and(|a| a != claim.sender) {
            return Err(Rejection::WrongRole);
        }
        let key = (id, topic.to_string());
        self.windows.get(&key).map_or(Ok(()), |w| w.check(claim.counter))?;
        let h = prehash(topic, claim.sender, claim.counter, body);
        member
            .key
            .verify_prehashed_strict(h, Some(CONTEXT), &Signature::from_bytes(&signature))
            .map_err(|_| Rejection::BadSignature)?;
        self.windows.entry(key).or_default().accept(claim.counter);
        Ok(member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;
    use crate::keystore::Member;

    const ASSIGN: &str = "/aerokv/assignment";

    struct Swarm {
        scheduler: Signer,
        watchdog: Signer,
        uav1: Signer,
        verifier: Verifier,
    }

    fn signer(id: &str) -> (Signer, Member) {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let id = NodeId::parse(id).unwrap();
        let role = Role::ALL.into_iter().find(|r| id.as_str().ends_with(r.node_name())).unwrap();
        let member = Member { id: id.clone(), role, key: key.verifying_key() };
        (Signer::with_counter(id, key, 1), member)
    }

    fn swarm() -> Swarm {
        let (scheduler, a) = signer("aerokv/scheduler");
        let (watchdog, b) = signer("aerokv/watchdog");
        let (uav1, c) = signer("uav1/shard_executor");
        Swarm { scheduler, watchdog, uav1, verifier: Verifier::new(Roster::new([a, b, c])) }
    }

    fn body(epoch: u64) -> impl FnOnce(&mut Encoder) {
        move |e: &mut Encoder| {
            e.u64(epoch).str("uav1").seq(&[1u32, 2], |e, v| {
                e.u32(*v);
            });
        }
    }

    fn claim(a: &Auth) -> Claim<'_> {
        Claim { sender: &a.sender, counter: a.counter, signature: &a.signature }
    }

    #[test]
    fn a_message_attributed_to_another_member_is_wrong_role() {
        let mut s = swarm();
        let topic = "/uav2/input";
        // uav1's executor signs an activation whose `source` says uav2.
        let a = s.uav1.sign(topic, body(1));
        let r = s.verifier.verify_attributed(topic, claim(&a), Some("uav2/shard_executor"), body(1));
        assert_eq!(r.err(), Some(Rejection::WrongRole));
        let a = s.uav1.sign(topic, body(2));
        assert!(s.verifier.verify_attributed(topic, claim(&a), Some("uav1/shard_executor"), body(2)).is_ok());
        // The scheduler feeds the first stage as the gateway.
        let g = s.scheduler.sign(topic, body(3));
        assert!(s.verifier.verify_attributed(topic, claim(&g), Some("aerokv/scheduler"), body(3)).is_ok());
        assert_eq!(s.verifier.counts().rejected(Rejection::WrongRole), 1);
        let _ = &s.watchdog;
    }

    #[test]
    fn a_signed_message_verifies_and_is_attributed() {
        let mut s = swarm();
        let auth = s.scheduler.sign(ASSIGN, body(7));
        assert_eq!(auth.signature.len(), SIGNATURE_LEN);
        let m = s.verifier.verify(ASSIGN, claim(&auth), body(7)).unwrap();
        assert_eq!((m.id.as_str(), m.role), ("aerokv/scheduler", Role::Scheduler));
        assert_eq!(s.verifier.counts().accepted, 1);
    }

    #[test]
    fn every_rejection_reason_is_detected_and_counted() {
        let mut s = swarm();
        let v = &mut s.verifier;
        let good = s.scheduler.sign(ASSIGN, body(7));
        // Unsigned: no sender, no signature.
        let unsigned = Claim { sender: "", counter: 0, signature: &[] };
        assert_eq!(v.verify(ASSIGN, unsigned, body(7)).unwrap_err(), Rejection::Unsigned);
        // Malformed: a signature of the wrong length, a sender that is not an identity.
        let short = Claim { signature: &good.signature[..10], ..claim(&good) };
        assert_eq!(v.verify(ASSIGN, short, body(7)).unwrap_err(), Rejection::Malformed);
        let bad_id = Claim { sender: "../../etc/passwd", ..claim(&good) };
        assert_eq!(v.verify(ASSIGN, bad_id, body(7)).unwrap_err(), Rejection::Malformed);
        // UnknownSender: a well-formed identity not on the roster, even with a valid signature of its own.
        let (stranger, _) = signer("uav9/shard_executor");
        let a = stranger.sign(ASSIGN, body(7));
        assert_eq!(v.verify(ASSIGN, claim(&a), body(7)).unwrap_err(), Rejection::UnknownSender);
        // WrongRole: an executor signing an assignment; the scheduler declaring a failure; a
        // UAV's node signing another UAV's telemetry; a topic nobody may sign on.
        let a = s.uav1.sign(ASSIGN, body(7));
        assert_eq!(v.verify(ASSIGN, claim(&a), body(7)).unwrap_err(), Rejection::WrongRole);
        let a = s.scheduler.sign("/aerokv/failures", body(7));
        assert_eq!(v.verify("/aerokv/failures", claim(&a), body(7)).unwrap_err(), Rejection::WrongRole);
        let a = s.uav1.sign("/uav2/heartbeat", body(7));
        assert_eq!(v.verify("/uav2/heartbeat", claim(&a), body(7)).unwrap_err(), Rejection::WrongRole);
        let a = s.uav1.sign("/uav1/heartbeat", body(7));
        assert!(v.verify("/uav1/heartbeat", claim(&a), body(7)).is_ok());
        let a = s.scheduler.sign("/aerokv/other", body(7));
        assert_eq!(v.verify("/aerokv/other", claim(&a), body(7)).unwrap_err(), Rejection::WrongRole);
        // BadSignature: a changed field, a changed counter, another topic, another sender's
        // signature, random bytes.
        assert_eq!(v.verify(ASSIGN, claim(&good), body(8)).unwrap_err(), Rejection::BadSignature);
        let moved = Claim { counter: good.counter + 1, ..claim(&good) };
        assert_eq!(v.verify(ASSIGN, moved, body(7)).unwrap_err(), Rejection::BadSignature);
        let w = s.watchdog.sign("/aerokv/failures", body(7));
        assert_eq!(
            v.verify("/aerokv/failures", Claim { counter: w.counter + 5, ..claim(&w) }, body(7)).unwrap_err(),
            Rejection::BadSignature
        );
        let stolen = Claim { sender: "aerokv/scheduler", ..claim(&w) };
        assert_eq!(v.verify(ASSIGN, stolen, body(7)).unwrap_err(), Rejection::BadSignature);
        let random = Claim { signature: &[0x5a; SIGNATURE_LEN], ..claim(&good) };
        assert_eq!(v.verify(ASSIGN, random, body(7)).unwrap_err(), Rejection::BadSignature);
        // Replayed: the same message twice.
        assert!(v.verify(ASSIGN, claim(&good), body(7)).is_ok());
        assert_eq!(v.verify(ASSIGN, claim(&good), body(7)).unwrap_err(), Rejection::Replayed);

        let c = v.counts();
        assert_eq!(c.accepted, 2);
        let expected = [
            (Rejection::Unsigned, 1),
            (Rejection::Malformed, 2),
            (Rejection::UnknownSender, 1),
            (Rejection::WrongRole, 4),
            (Rejection::BadSignature, 5),
            (Rejection::Replayed, 1),
        ];
        for (why, n) in expected {
            assert_eq!(c.rejected(why), n, "{why:?}");
        }
        assert_eq!(c.rejected_total(), 14);
    }

    #[test]
    fn a_forgery_does_not_move_the_window() {
        let mut s = swarm();
        let next = s.scheduler.sign(ASSIGN, body(1));
        // A forged message claiming a far-ahead counter must not make genuine ones look old.
        let forged = Claim { counter: next.counter + 1_000_000, ..claim(&next) };
        assert_eq!(s.verifier.verify(ASSIGN, forged, body(1)).unwrap_err(), Rejection::BadSignature);
        assert!(s.verifier.verify(ASSIGN, claim(&next), body(1)).is_ok());
    }

    #[test]
    fn windows_are_per_sender_and_topic() {
        let mut s = swarm();
        let tokens = s.scheduler.sign("/aerokv/tokens", body(1));
        let assignment = s.scheduler.sign(ASSIGN, body(1));
        // The later counter on one topic does not make the earlier one on another a replay.
        assert!(s.verifier.verify(ASSIGN, claim(&assignment), body(1)).is_ok());
        assert!(s.verifier.verify("/aerokv/tokens", claim(&tokens), body(1)).is_ok());
    }

    #[test]
    fn replay_window_accepts_reordering_within_and_refuses_duplicates_and_old() {
        let mut w = ReplayWindow::default();
        let mut take = |c: u64| {
            let r = w.check(c);
            if r.is_ok() {
                w.accept(c);
            }
            r
        };
        assert!(take(1000).is_ok());
        assert!(take(1002).is_ok());
        assert!(take(1001).is_ok(), "reordered within the window");
        assert_eq!(take(1001), Err(Rejection::Replayed));
        assert_eq!(take(1000), Err(Rejection::Replayed));
        assert!(take(1002 - ReplayWindow::SIZE + 1).is_ok(), "oldest slot still open");
        assert_eq!(take(1002 - ReplayWindow::SIZE), Err(Rejection::Replayed), "beyond the window");
        assert!(take(5000).is_ok(), "a jump clears the window");
        assert_eq!(take(1002), Err(Rejection::Replayed));
        assert!(take(4999).is_ok());
        assert_eq!(take(5000), Err(Rejection::Replayed));
        assert!(take(u64::MAX).is_ok());
        assert_eq!(take(u64::MAX), Err(Rejection::Replayed));
    }

    #[test]
    fn encoding_is_unambiguous() {
        let enc = |f: &dyn Fn(&mut Encoder)| {
            let mut v = Vec::new();
            f(&mut Encoder::new(&mut v));
            v
        };
        assert_ne!(
            enc(&|e| {
                e.str("ab").str("c");
            }),
            enc(&|e| {
                e.str("a").str("bc");
            })
        );
        assert_ne!(
            enc(&|e| {
                e.seq(&[1u32], |e, v| {
                    e.u32(*v);
                })
                .u32(2);
            }),
            enc(&|e| {
                e.seq(&[1u32, 2], |e, v| {
                    e.u32(*v);
                });
            })
        );
        let mut a = Vec::new();
        envelope(&mut a, "/aerokv/assignment", "aerokv/scheduler", 1, |_| {});
        let mut b = Vec::new();
        envelope(&mut b, "/aerokv/assignmen", "taerokv/scheduler", 1, |_| {});
        assert_ne!(a, b);
    }

    #[test]
    fn counters_grow_and_restart_above_the_last_run() {
        let (s, _) = signer("aerokv/scheduler");
        let a = s.sign(ASSIGN, body(1)).counter;
        assert_eq!(s.sign(ASSIGN, body(1)).counter, a + 1);
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let first = Signer::new(NodeId::parse("aerokv/scheduler").unwrap(), key.clone());
        let c1 = first.sign(ASSIGN, body(1)).counter;
        std::thread::sleep(std::time::Duration::from_millis(1));
        let restarted = Signer::new(NodeId::parse("aerokv/scheduler").unwrap(), key);
        assert!(restarted.sign(ASSIGN, body(1)).counter > c1);
    }
}
