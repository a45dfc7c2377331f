//! Token sampling: greedy, or temperature + top-p with a seeded PRNG. Given the same logits and
//! seed the choice is the same on every machine (self-contained PRNG, f64 arithmetic, fixed order).
use crate::error::{EngineError, Result};

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The highest logit (lowest id on ties; NaN never wins).
    Greedy,
    /// Softmax of `logits / temperature`, keep the smallest set of most likely tokens whose
    /// probability reaches `top_p`, draw from it with a PRNG seeded by `seed`.
    TopP { temperature: f32, top_p: f32, seed: u64 },
}

impl Sampling {
    /// `Greedy` when `temperature` is 0 or absent, `TopP` otherwise (validated).
    pub fn from_options(temperature: Option<f32>, top_p: Option<f32>, seed: Option<u64>) -> Result<Sampling> {
        let temperature = temperature.unwrap_or(0.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(EngineError::InvalidSampling(format!("temperature {temperature} must be finite and >= 0")));
        }
        if temperature == 0.0 {
            return Ok(Sampling::Greedy);
        }
        let top_p = top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(EngineError::InvalidSampling(format!("top_p {top_p} must be in (0, 1]")));
        }
        Ok(Sampling::TopP { temperature, top_p, seed: seed.unwrap_or(0) })
    }
}

/// SplitMix64: tiny, well-mixed, and fully specified here so a seed means the same everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks tokens from logits; keeps the PRNG state across steps of one generation.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Sampler {
        let seed = match sampling {
            Sampling::TopP { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Sampler { sampling, rng: SplitMix64::new(seed) }
    }

    /// Where this sampler would stand after `n` samples: a process that resumes an answer of `n`
    /// tokens (fed again, not sampled) samples the next one exactly as the first process would
    /// have. Every sample of top-p draws one random number; greedy draws none.
    pub fn skip(&mut self, n: usize) {
        if let Sampling::TopP { .. } = self.sampling {
            for _ in 0..n {
                self.rng.next_f64();
            }
        }
    }

    /// The next token id. Fails only on empty or all-NaN logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        match self.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::TopP { temperature, top_p, .. } => {
                let best = argmax(logits)?;
                let max = logits[best as usize] as f64;
                let t = temperature as f64;
                let mut probs: Vec<(u32, f64)> = logits
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| !l.is_nan())
                    .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
                    .filter(|(_, p)| *p > 0.0)
                    .collect();
                // Descending probability, ascending id on ties: a total, platform-independent order.
                probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let total: f64 = probs.iter().map(|p| p.1).sum();
                let mut kept = 0.0;
                let mut cut = probs.len();
                for (i, p) in probs.iter().enumerate() {
                    kept += p.1;
                    if kept / total >= top_p as f64 {
                        cut = i + 1;
                        break;
                    }
                }
                probs.truncate(cut.max(1));
                let mass: f64 = probs.iter().map(|p| p.1).sum();
                let mut target = self.rng.next_f64() * mass;
                for (id, p) in &probs {
                    if target < *p {
                        return Ok(*id);
                    }
                    target -= p;
                }
                Ok(probs.last().map(|p| p.0).unwrap_or(best))
            }
        }
    }
}

/// Index of the largest logit, first one on ties, NaN ignored.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i as u32).ok_or_else(|| EngineError::InvalidInput("logits are empty or all NaN".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, f32::NAN, 3.0]).unwrap(), 1);
        assert!(argmax(&[f32::NAN]).is_err());
        assert!(argmax(&[]).is_err());
    }

    #[test]
    fn a_sampler_that_skips_n_samples_continues_like_one_that_made_them() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let sampling = Sampling::from_options(Some(0.9), Some(0.95), Some(42)).unwrap();
        let mut whole = Sampler::new(sampling);
        let all: Vec<u32> = (0..12).map(|_| whole.sample(&logits).unwrap()).collect();
        let mut resumed = Sampler::new(sampling);
        resumed.skip(7);
        let rest: Vec<u32> = (0..5).map(|_| resumed.sample(&logits).unwrap()).collect();
        assert_eq!(rest, all[7..]);
    }

    #[test]
    fn top_p_is_deterministic_given_the_seed() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(Sampling::TopP { temperature: 0.8, top_p: 0.9, seed });
            (0..50).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let mut s = Sampler::new(Sampling::TopP { temperature: 1.0, top_p: 1e-6, seed: 3 });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits).unwrap(), 1);
        }
    }

    #[test]
    fn bad_options_are_refused() {
        assert!(Sampling::from_options(Some(-1.0), None, None).is_err());
        assert!(Sampling::from_options(Some(1.0), Some(0.0), None).is_err());
        assert!(Sampling::from_options(Some(1.0), Some(1.5), None).is_err());
        assert_eq!(Sampling::from_options(None, Some(0.5), None).unwrap(), Sampling::Greedy);
    }
}
