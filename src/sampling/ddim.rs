//! DDIM (η = 0), as diffusers' `DDIMScheduler.step`, and DDIM inversion's step.

use burn::tensor::Tensor;

use super::schedule::{Prediction, SchedulerConfig, ddim_timesteps};

/// A DDIM schedule for a fixed number of steps.
#[derive(Clone, Debug)]
pub struct Ddim {
    pub config: SchedulerConfig,
    pub alphas_cumprod: Vec<f32>,
    pub timesteps: Vec<usize>,
    step_ratio: usize,
    final_alpha_cumprod: f32,
}

/// The result of one step.
#[derive(Clone, Debug)]
pub struct StepOutput {
    pub prev_sample: Tensor<4>,
    pub pred_original_sample: Tensor<4>,
}

impl Ddim {
    pub fn new(config: SchedulerConfig, steps: usize) -> Self {
        let alphas_cumprod = config.alphas_cumprod();
        let timesteps = ddim_timesteps(&config, steps);
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Self { step_ratio: config.num_train_timesteps / steps, alphas_cumprod, timesteps, final_alpha_cumprod, config }
    }

    /// ᾱ at `t` and at the previous timestep `t − T/n` (ᾱ_final below 0).
    pub fn alphas(&self, t: usize) -> (f32, f32) {
        let prev = t as isize - self.step_ratio as isize;
        let a_prev = if prev >= 0 { self.alphas_cumprod[prev as usize] } else { self.final_alpha_cumprod };
        (self.alphas_cumprod[t], a_prev)
    }

    /// x0 and ε from the model output at ᾱ_t.
    fn split(&self, x: Tensor<4>, out: Tensor<4>, a_t: f32) -> (Tensor<4>, Tensor<4>) {
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        match self.config.prediction {
            Prediction::Epsilon => ((x - out.clone() * sb) / sa, out),
            Prediction::Sample => {
                let eps = (x - out.clone() * sa) / sb;
                (out, eps)
            }
            Prediction::VPrediction => (x.clone() * sa - out.clone() * sb, out * sa + x * sb),
        }
    }

    /// One DDIM step from `x` at timestep `t` with the (guided) model output.
    pub fn step(&self, out: Tensor<4>, t: usize, x: Tensor<4>) -> StepOutput {
        let (a_t, a_prev) = self.alphas(t);
        let (mut x0, eps) = self.split(x, out, a_t);
        if let Some(r) = self.config.clip_sample {
            x0 = x0.clamp(-r, r);
        }
        let prev = x0.clone() * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt();
        StepOutput { prev_sample: prev, pred_original_sample: x0 }
    }
}
