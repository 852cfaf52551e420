//! Noise schedules from a diffusers `scheduler_config.json`: betas, ᾱ (float32, as torch computes
//! them) and the inference timesteps of each `timestep_spacing`.

use std::path::Path;

use serde_json::json;

use crate::model::ModelError;
use crate::model::config::RawConfig;

/// Timestep spacing (diffusers `timestep_spacing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Linspace,
    Trailing,
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

/// The training schedule and inference settings of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: String,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub spacing: Spacing,
    /// Whether the config file named `timestep_spacing`. When it did not, diffusers gives each
    /// scheduler class its own default: leading for DDIM, linspace for Euler, Euler a and DPM-Solver.
    pub spacing_given: bool,
    pub prediction: Prediction,
    pub clip_sample: Option<f32>,
}

impl Default for SchedulerConfig {
    /// Stable Diffusion's schedule (scaled_linear 0.00085–0.012, 1000 steps, offset 1, leading).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            steps_offset: 1,
            set_alpha_to_one: false,
            spacing: Spacing::Leading,
            spacing_given: true,
            prediction: Prediction::Epsilon,
            clip_sample: None,
        }
    }
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`. A missing `timestep_spacing` defaults to `leading`
    /// (DDIM's default).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_raw(&RawConfig::read(path)?)
    }

    /// Reads a scheduler config from parsed JSON.
    pub fn from_raw(c: &RawConfig) -> Result<Self, ModelError> {
        c.require("thresholding", &[json!(false)])?;
        c.require("rescale_betas_zero_snr", &[json!(false)])?;
        c.require("trained_betas", &[])?;
        let beta_schedule = c.str_or("beta_schedule", "scaled_linear")?;
        if !matches!(beta_schedule.as_str(), "scaled_linear" | "linear") {
            return Err(c.err("beta_schedule", format!("{beta_schedule} is not supported (scaled_linear, linear)")));
        }
        let spacing_given = c.is_set("timestep_spacing");
        let spacing = match c.str_or("timestep_spacing", "leading")?.as_str() {
            "leading" => Spacing::Leading,
            "linspace" => Spacing::Linspace,
            "trailing" => Spacing::Trailing,
            other => return Err(c.err("timestep_spacing", format!("{other} is not supported (leading, linspace, trailing)"))),
        };
        let prediction = match c.str_or("prediction_type", "epsilon")?.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => return Err(c.err("prediction_type", format!("{other} is not supported (epsilon, v_prediction, sample)"))),
        };
        let num_train_timesteps = c.usize_or("num_train_timesteps", 1000)?;
        if num_train_timesteps < 2 {
            return Err(c.err("num_train_timesteps", "must be at least 2"));
        }
        let clip_sample = if c.bool_or("clip_sample", false)? { Some(c.f64_or("clip_sample_range", 1.0)? as f32) } else { None };
        Ok(Self {
            num_train_timesteps,
            beta_start: c.f64_or("beta_start", 0.00085)?,
            beta_end: c.f64_or("beta_end", 0.012)?,
            beta_schedule,
            steps_offset: c.usize_or("steps_offset", 0)?,
            set_alpha_to_one: c.bool_or("set_alpha_to_one", true)?,
            spacing,
            spacing_given,
            prediction,
            clip_sample,
        })
    }

    /// ᾱ_t for t in 0..T, float32 as torch computes it (its CPU cumprod keeps the running product
    /// in f64).
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let t = self.num_train_timesteps;
        let betas: Vec<f32> = match self.beta_schedule.as_str() {
            "linear" => linspace_f32(self.beta_start as f32, self.beta_end as f32, t),
            _ => linspace_f32((self.beta_start.sqrt()) as f32, (self.beta_end.sqrt()) as f32, t).into_iter().map(|b| b * b).collect(),
        };
        let mut acc = 1f64;
        betas
            .into_iter()
            .map(|b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect()
    }
}

/// torch.linspace in float32 (CPU kernel: the first half counts up from `start`, the second half
/// down from `end`, each value one fused multiply-add).
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) }).collect()
}

/// numpy-style round half to even.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 { 2.0 * (x / 2.0).round() } else { r }
}

/// DDIM / Euler-style integer timesteps for `n` inference steps, high to low.
pub fn ddim_timesteps(cfg: &SchedulerConfig, n: usize) -> Vec<usize> {
    let t = cfg.num_train_timesteps;
    match cfg.spacing {
        Spacing::Leading => {
            let ratio = t / n;
            (0..n).rev().map(|k| k * ratio + cfg.steps_offset).collect()
        }
        Spacing::Linspace => {
            // np.linspace(0, T-1, n).round()[::-1]
            (0..n)
                .rev()
                .map(|k| {
                    let v = if n == 1 { 0.0 } else { (t - 1) as f64 * k as f64 / (n - 1) as f64 };
                    round_half_even(v) as usize
                })
                .collect()
        }
        Spacing::Trailing => {
            // np.round(np.arange(T, 0, -T/n)) - 1
            let step = t as f64 / n as f64;
            (0..n).map(|k| round_half_even(t as f64 - k as f64 * step) as usize - 1).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_timesteps_sd() {
        let cfg = SchedulerConfig::default();
        assert_eq!(ddim_timesteps(&cfg, 10), vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
        assert_eq!(ddim_timesteps(&cfg, 8), vec![876, 751, 626, 501, 376, 251, 126, 1]);
    }

    #[test]
    fn trailing_and_linspace() {
        let mut cfg = SchedulerConfig { spacing: Spacing::Trailing, ..Default::default() };
        assert_eq!(ddim_timesteps(&cfg, 4), vec![999, 749, 499, 249]);
        cfg.spacing = Spacing::Linspace;
        assert_eq!(ddim_timesteps(&cfg, 4), vec![999, 666, 333, 0]);
    }

    #[test]
    fn alphas_cumprod_endpoints() {
        let ac = SchedulerConfig::default().alphas_cumprod();
        assert_eq!(ac.len(), 1000);
        assert!((ac[0] - 0.99915).abs() < 1e-6);
        assert!(ac[999] > 0.004 && ac[999] < 0.005);
    }
}

#[cfg(test)]
mod spacing_default_tests {
    use std::path::Path;

    use super::*;
    use crate::sampling::sampler::{Sampler, SamplerKind};

    /// The original SD1.5 scheduler config has no `timestep_spacing`: DDIM then uses leading,
    /// Euler and DPM-Solver linspace (as diffusers' `from_config` does).
    #[test]
    fn missing_spacing_takes_each_class_default() {
        let raw = RawConfig::parse(
            Path::new("sd15/scheduler_config.json"),
            r#"{"beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": false}"#,
        )
        .unwrap();
        let cfg = SchedulerConfig::from_raw(&raw).unwrap();
        assert!(!cfg.spacing_given);
        let ddim = Sampler::new(SamplerKind::Ddim, &cfg, 8).unwrap();
        assert_eq!(ddim.timesteps()[0], 876.0);
        let euler = Sampler::new(SamplerKind::Euler, &cfg, 8).unwrap();
        assert_eq!(euler.timesteps()[0], 999.0);
        assert!((euler.timesteps()[1] - 856.2857).abs() < 1e-3, "{:?}", euler.timesteps());
        assert_eq!(*euler.timesteps().last().unwrap(), 0.0);
        let dpm = Sampler::new(SamplerKind::DpmPp2m, &cfg, 8).unwrap();
        assert_eq!(dpm.timesteps(), &[999.0, 874.0, 749.0, 624.0, 500.0, 375.0, 250.0, 125.0]);
    }
}
