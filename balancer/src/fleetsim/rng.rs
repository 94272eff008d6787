//! A small seeded generator (xoshiro256**, seeded through SplitMix64).
//!
//! Own code rather than `rand`'s `StdRng`, whose algorithm may change
//! between releases: a trace must stay the same for a seed across builds.

/// SplitMix64's step: spreads a seed (or a seed and a stream number) over
/// 64 bits.
pub(crate) fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256**.
#[derive(Debug, Clone)]
pub(crate) struct Rng([u64; 4]);

impl Rng {
    /// The generator of stream `stream` of `seed`: streams of one seed are
    /// independent, so a function's draws do not depend on the others'.
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        let mut s = seed ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03);
        Self([splitmix(&mut s), splitmix(&mut s), splitmix(&mut s), splitmix(&mut s)])
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in (0, 1]: safe under `ln`.
    fn open_unit(&mut self) -> f64 {
        1.0 - self.unit()
    }

    /// Standard normal (Box-Muller; the second value is dropped to keep the
    /// generator's state a plain function of the draws made).
    pub(crate) fn normal(&mut self) -> f64 {
        let (u, v) = (self.open_unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Exponential with mean `mean`.
    pub(crate) fn exp(&mut self, mean: f64) -> f64 {
        -self.open_unit().ln() * mean
    }

    /// Poisson with mean `mean` (inversion; the means here are small).
    pub(crate) fn poisson(&mut self, mean: f64) -> u32 {
        let limit = (-mean).exp();
        let mut p = self.unit();
        let mut k = 0;
        while p > limit && k < 10_000 {
            p *= self.unit();
            k += 1;
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let draw = |seed, stream| {
            let mut r = Rng::new(seed, stream);
            (0..4).map(|_| r.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 1), draw(7, 1));
        assert_ne!(draw(7, 1), draw(7, 2));
        assert_ne!(draw(7, 1), draw(8, 1));
    }

    #[test]
    fn draws_have_their_means() {
        let mut r = Rng::new(1, 0);
        let n = 200_000;
        let mean = |f: &mut dyn FnMut() -> f64| (0..n).map(|_| f()).sum::<f64>() / f64::from(n);
        assert!((mean(&mut || r.unit()) - 0.5).abs() < 0.01);
        assert!(mean(&mut || r.normal()).abs() < 0.01);
        assert!((mean(&mut || r.exp(3.0)) - 3.0).abs() < 0.05);
        assert!((mean(&mut || f64::from(r.poisson(2.5))) - 2.5).abs() < 0.03);
    }
}
