//! Seeded Gaussian noise, computed on the host so that a seed gives the same latents on every
//! backend (CPU or GPU) and every batch size.
//!
//! # Algorithm
//!
//! A `(seed, stream)` pair names one sequence of N(0, 1) values:
//!
//! 1. `key = mix(mix(seed) ^ stream)`, where `mix` is the SplitMix64 output function
//!    (`z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31`,
//!    wrapping 64-bit arithmetic).
//! 2. The stream's 64-bit words are SplitMix64 started at `key`: word `j` (from 0) is
//!    `mix(key + (j + 1) · 0x9E3779B97F4A7C15)`.
//! 3. Values `2m` and `2m + 1` come from words `a = 2m`, `b = 2m + 1` by Box–Muller in f64:
//!    `u1 = ((a >> 11) + 1) · 2⁻⁵³ ∈ (0, 1]`, `u2 = (b >> 11) · 2⁻⁵³ ∈ [0, 1)`,
//!    `r = √(−2 ln u1)`, `θ = 2π u2`, value `2m = r cos θ`, value `2m + 1 = r sin θ`, each rounded
//!    to f32.
//!
//! Value `i` depends only on `(seed, stream, i)`, so a shorter draw is a prefix of a longer one.
//! Integer steps and `√` are exact IEEE operations; `ln`, `cos` and `sin` come from the platform's
//! f64 math library, whose last-bit differences (if any) survive the rounding to f32 only in rare
//! ties.
//!
//! # Streams
//!
//! Each batch row draws from its own stream, so an image's noise depends on the seed and its row,
//! not on the batch size or the device. [`gaussian_tensor`] fills row `r` from stream
//! `stream + r`; the purposes are 2³² streams apart:
//!
//! - [`INITIAL`] (0): the initial latents (`x_T = noise · init_noise_sigma`).
//! - [`step_stream(i)`](step_stream) = `(i + 1) · 2³²`: the N(0, 1) draw of sampler step `i`, for
//!   samplers whose [`needs_noise`](super::sampler::Sampler::needs_noise) is true (Euler
//!   ancestral), passed to [`Sampler::step`](super::sampler::Sampler::step).

use burn::tensor::{Device, Tensor, TensorData};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The stream of the initial latents (row `r` uses `INITIAL + r`).
pub const INITIAL: u64 = 0;

/// The stream of sampler step `i`'s noise (row `r` uses `step_stream(i) + r`).
pub const fn step_stream(i: usize) -> u64 {
    (i as u64 + 1) << 32
}

/// The SplitMix64 output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` N(0, 1) values of stream `stream` of `seed` (see the module documentation).
pub fn gaussian(seed: u64, stream: u64, len: usize) -> Vec<f32> {
    let key = mix(mix(seed) ^ stream);
    let word = |j: u64| mix(key.wrapping_add((j + 1).wrapping_mul(GAMMA)));
    let unit = 1.0 / (1u64 << 53) as f64;
    let mut out = Vec::with_capacity(len + 1);
    for m in 0..len.div_ceil(2) as u64 {
        let u1 = ((word(2 * m) >> 11) + 1) as f64 * unit;
        let u2 = (word(2 * m + 1) >> 11) as f64 * unit;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        out.push((r * c) as f32);
        out.push((r * s) as f32);
    }
    out.truncate(len);
    out
}

/// A (B, C, H, W) tensor of N(0, 1) values on `device`; row `r` is
/// `gaussian(seed, stream + r, C·H·W)`.
pub fn gaussian_tensor(seed: u64, stream: u64, shape: [usize; 4], device: &Device) -> Tensor<4> {
    let row = shape[1] * shape[2] * shape[3];
    let values: Vec<f32> = (0..shape[0] as u64).flat_map(|r| gaussian(seed, stream.wrapping_add(r), row)).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_prefix_stable() {
        let a = gaussian(42, INITIAL, 1001);
        assert_eq!(a, gaussian(42, INITIAL, 1001));
        assert_eq!(a[..10], gaussian(42, INITIAL, 10)[..]);
        assert_eq!(a[..7], gaussian(42, INITIAL, 7)[..]);
    }

    #[test]
    fn pinned_values() {
        // Guards the documented algorithm (these values were computed independently from the
        // description above): changing it changes every seed's images.
        assert_eq!(gaussian(0, INITIAL, 4), [-0.45275775, 0.20776604, 2.650606, -0.49042282]);
    }

    #[test]
    fn standard_normal_moments() {
        let x = gaussian(7, step_stream(3), 100_000);
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        assert!(mean.abs() < 0.015, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
        assert!(x.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn streams_and_seeds_differ() {
        let base = gaussian(1, INITIAL, 64);
        for other in [gaussian(1, INITIAL + 1, 64), gaussian(1, step_stream(0), 64), gaussian(2, INITIAL, 64)] {
            assert!(base.iter().zip(&other).filter(|(a, b)| a == b).count() == 0);
        }
    }

    #[cfg(feature = "cpu")]
    #[test]
    fn tensor_rows_use_their_own_streams() {
        let t = gaussian_tensor(5, step_stream(2), [3, 2, 2, 2], &Device::flex());
        let v = t.into_data().try_to_vec::<f32>().unwrap();
        for r in 0..3 {
            assert_eq!(v[r * 8..(r + 1) * 8], gaussian(5, step_stream(2) + r as u64, 8)[..]);
        }
    }
}
