//! img2img targets (diffusers' `StableDiffusionImg2ImgPipeline` / SDXL img2img semantics, per
//! target row): a target with an init image skips the first steps of the schedule. With `n` steps
//! and strength `s`, `k = min(⌊n·s⌋, n)` steps are run: the row enters at step `n − k` with the
//! init image's latent noised to that step's level by the sampler's `add_noise`, the noise being
//! the row's own seeded initial draw. The set's reference row (and targets without an init image)
//! run every step, so the reference is generated (or replayed from a real image) as in any set.
//! Until it enters, an img2img row is computed with the others and then overwritten; nothing of it
//! reaches the other rows, whose attention and norms read only themselves and their reference.

use burn::tensor::Tensor;

use super::{Image, Pipeline, PipelineError, invalid};
use crate::sampling::sampler::Sampler;

/// A target's init image and strength.
#[derive(Clone, Debug, PartialEq)]
pub struct InitImage {
    /// The image, at the request size (the service fits it like a reference image).
    pub image: Image,
    /// In (0, 1]: the share of the schedule run from the noised init image.
    pub strength: f32,
}

/// The step at which a row with `strength` enters a schedule of `steps` steps: diffusers'
/// `get_timesteps` (`init_timestep = min(int(steps · strength), steps)`, start `steps −
/// init_timestep`), with the strength read as the decimal the client wrote (f32 → shortest
/// decimal → f64, as Python holds it).
pub fn start_step(steps: usize, strength: f32) -> usize {
    let s: f64 = strength.to_string().parse().unwrap_or(strength as f64);
    let run = ((steps as f64 * s) as usize).min(steps);
    steps - run
}

/// Why `strength` is not usable with `steps` steps, if it is not: it must be in (0, 1] and leave at
/// least one step to run.
pub fn strength_error(steps: usize, strength: f32) -> Option<String> {
    if !strength.is_finite() || strength <= 0.0 || strength > 1.0 {
        Some(format!("{strength} is outside (0, 1]"))
    } else if start_step(steps, strength) >= steps {
        Some(format!("{strength} × {steps} steps leaves no step to run (at least 1 / steps)"))
    } else {
        None
    }
}

/// Checks an init image against the batch: its strength ([`strength_error`]), the image at the
/// request size. `field` names it in errors (e.g. `init_images[0]`).
pub fn check(field: &str, init: &InitImage, steps: usize, width: usize, height: usize) -> Result<(), PipelineError> {
    if let Some(m) = strength_error(steps, init.strength) {
        return Err(invalid(&format!("{field}.strength"), m));
    }
    if (init.image.width, init.image.height) != (width, height) {
        return Err(invalid(
            &format!("{field}.image"),
            format!("is {}x{}, the request is {width}x{height} (fit it first)", init.image.width, init.image.height),
        ));
    }
    Ok(())
}

/// A row of a set that enters the batch late: at step `step` its latents become `latent` noised
/// to that step with `noise`.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Row within the set.
    pub row: usize,
    pub step: usize,
    /// The init image's latent (1, C, h, w).
    pub latent: Tensor<4>,
    /// The row's N(0, I) draw (1, C, h, w).
    pub noise: Tensor<4>,
}

impl Pipeline {
    /// The entries of a set's img2img rows: `inits[k] = (row, init image)`; `noise` is the set's
    /// initial N(0, I) draw (rows, C, h, w).
    pub fn img2img_entries(&self, inits: &[(usize, &InitImage)], noise: &Tensor<4>, steps: usize) -> Result<Vec<Entry>, PipelineError> {
        inits
            .iter()
            .map(|&(row, init)| {
                Ok(Entry {
                    row,
                    step: start_step(steps, init.strength),
                    latent: self.encode_image(&init.image)?,
                    noise: noise.clone().narrow(0, row, 1),
                })
            })
            .collect()
    }
}

/// Puts the rows that enter at step `i` into `x` (a set's latents). Returns the rows that entered.
pub fn enter(entries: &[Entry], sampler: &Sampler, i: usize, x: Tensor<4>) -> (Tensor<4>, Vec<usize>) {
    let entering: Vec<&Entry> = entries.iter().filter(|e| e.step == i).collect();
    if entering.is_empty() {
        return (x, Vec::new());
    }
    let rows = x.dims()[0];
    let mut parts: Vec<Tensor<4>> = (0..rows).map(|r| x.clone().narrow(0, r, 1)).collect();
    for e in &entering {
        parts[e.row] = sampler.add_noise(e.latent.clone(), e.noise.clone(), i);
    }
    (Tensor::cat(parts, 0), entering.iter().map(|e| e.row).collect())
}

#[cfg(test)]
mod tests {
    use super::start_step;

    #[test]
    fn start_step_is_diffusers_get_timesteps() {
        // int(10 * 0.7) = 7 in Python (0.7 as a double), though 10 * (0.7f32 as f64) = 6.99999988.
        assert_eq!(start_step(10, 0.7), 3);
        assert_eq!(start_step(10, 1.0), 0);
        assert_eq!(start_step(50, 0.75), 13);
        assert_eq!(start_step(30, 0.3), 21);
        assert_eq!(start_step(10, 0.05), 10);
    }
}
