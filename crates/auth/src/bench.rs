//! What authentication costs: sign and verify time per message of a given size, for the
//! Ed25519ph signatures AeroKV uses and, for comparison, HMAC-SHA256 (a shared-key MAC).
use crate::identity::{NodeId, Role};
use crate::keystore::{Member, Roster};
use crate::sign::{Auth, Claim, Encoder, Signer, Sink, Verifier};
use ed25519_dalek::SigningKey;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{Duration, Instant};

/// CPU microseconds per message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub sign_us: f64,
    pub verify_us: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub bytes: usize,
    pub ed25519: Cost,
    pub hmac_sha256: Cost,
}

const TOPIC: &str = "/uav2/input";

/// CPU time of the calling thread, seconds: the cost itself, not the time spent waiting for a
/// core on a busy machine.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `f(0)`, `f(1)`, ... until `budget` (wall clock) is spent or `f` says false; mean CPU
/// microseconds per successful run (NaN if none succeeded).
fn time_each(budget: Duration, mut f: impl FnMut(usize) -> bool) -> f64 {
    let start = Instant::now();
    let cpu = thread_cpu_s();
    let mut n = 0;
    while n == 0 || start.elapsed() < budget {
        if !f(n) {
            break;
        }
        n += 1;
    }
    if n == 0 {
        return f64::NAN;
    }
    (thread_cpu_s() - cpu) * 1e6 / n as f64
}

/// Measures both schemes on a `bytes`-byte payload, spending about `budget` on each figure.
/// Ed25519 goes through the real [`Signer`] and [`Verifier`] (roster, policy, replay window).
pub fn measure(bytes: usize, budget: Duration) -> Measured {
    let payload: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    let body = |e: &mut Encoder| {
        e.bytes(&payload);
    };
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let id = NodeId::of(Role::ShardExecutor, Some("uav1")).unwrap_or_else(|_| unreachable!("uav1 is a valid id"));
    let member = Member { id: id.clone(), role: Role::ShardExecutor, key: key.verifying_key() };
    let signer = Signer::with_counter(id, key, 1);
    let mut verifier = Verifier::new(Roster::new([member]));
    let mut auths: Vec<Auth> = Vec::new();
    let sign_us = time_each(budget, |_| {
        auths.push(signer.sign(TOPIC, body));
        true
    });
    let verify_us = time_each(budget, |i| {
        auths.get(i).is_some_and(|a| {
            let claim = Claim { sender: &a.sender, counter: a.counter, signature: &a.signature };
            verifier.verify(TOPIC, claim, body).is_ok()
        })
    });

    let mac_key = [7u8; 32];
    let mac = |counter: u64| {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&mac_key).unwrap_or_else(|_| unreachable!("any key length"));
        let mut e = Encoder::new(&mut m as &mut dyn Sink);
        e.str(TOPIC).str("uav1/shard_executor").u64(counter);
        body(&mut e);
        m
    };
    let tag = mac(1).finalize().into_bytes();
    let hmac_sign = time_each(budget, |i| {
        std::hint::black_box(mac(i as u64).finalize().into_bytes());
        true
    });
    let hmac_verify = time_each(budget, |_| mac(1).verify_slice(&tag).is_ok());
    Measured {
        bytes,
        ed25519: Cost { sign_us, verify_us },
        hmac_sha256: Cost { sign_us: hmac_sign, verify_us: hmac_verify },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_positive_costs_through_the_real_verifier() {
        let m = measure(2304, Duration::from_millis(5));
        for c in [m.ed25519, m.hmac_sha256] {
            assert!(c.sign_us > 0.0 && c.verify_us > 0.0 && c.verify_us.is_finite(), "{m:?}");
        }
    }
}
