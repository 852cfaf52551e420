//! The samplers of the generation loop, with the schedules and updates of diffusers' schedulers:
//! DDIM (η = 0, `DDIMScheduler`), Euler (`EulerDiscreteScheduler`, `s_churn = 0`), Euler ancestral
//! (`EulerAncestralDiscreteScheduler`) and DPM-Solver++ 2M (`DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, `solver_type="midpoint"`,
//! `final_sigmas_type="zero"`), optionally on Karras sigmas (`use_karras_sigmas=true`).
//!
//! Schedule numbers are float32 values computed as diffusers computes them (numpy float64 where
//! diffusers uses numpy, then rounded to f32); every update is evaluated in float32 in diffusers'
//! order. One loop step `i`:
//!
//! ```text
//! x_in = sampler.scale_model_input(x, i);
//! out  = guided model output at timestep sampler.timesteps()[i];
//! (x, x0) = sampler.step(out, i, x, noise_i);   // noise_i: Some(N(0,1)) iff needs_noise()
//! ```
//!
//! starting from `x = noise · init_noise_sigma()`.

use burn::tensor::Tensor;

use super::ddim::Ddim;
use super::schedule::{Prediction, SchedulerConfig, Spacing, ddim_timesteps, round_half_even};
use crate::model::ModelError;

/// Which sampler a run uses. As a command-line value: the names below, plus the older spellings
/// `euler-a`, `dpmpp2m` and `dpmpp2m-karras`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum SamplerKind {
    /// DDIM, η = 0.
    #[serde(rename = "ddim")]
    #[value(name = "ddim")]
    Ddim,
    /// Euler (Karras et al. Algorithm 2 without churn).
    #[serde(rename = "euler")]
    #[value(name = "euler")]
    Euler,
    /// Euler ancestral: Euler to σ_down plus fresh noise of scale σ_up.
    #[serde(rename = "euler_a")]
    #[value(name = "euler_a", alias = "euler-a")]
    EulerAncestral,
    /// DPM-Solver++ 2M (multistep, midpoint), first order on the first and last step.
    #[serde(rename = "dpmpp_2m")]
    #[value(name = "dpmpp_2m", alias = "dpmpp2m")]
    DpmPp2m,
    /// DPM-Solver++ 2M on Karras sigmas (ρ = 7).
    #[serde(rename = "dpmpp_2m_karras")]
    #[value(name = "dpmpp_2m_karras", alias = "dpmpp2m-karras")]
    DpmPp2mKarras,
}

impl SamplerKind {
    /// Every sampler, in a fixed order.
    pub const ALL: [SamplerKind; 5] = [Self::Ddim, Self::Euler, Self::EulerAncestral, Self::DpmPp2m, Self::DpmPp2mKarras];

    /// The name: `ddim`, `euler`, `euler_a`, `dpmpp_2m` or `dpmpp_2m_karras` (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::DpmPp2m => "dpmpp_2m",
            Self::DpmPp2mKarras => "dpmpp_2m_karras",
        }
    }

    /// The sampler named `s` (see [`as_str`](Self::as_str)).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A sampler set up for one run of `steps` steps. DPM-Solver++ keeps the previous step's data
/// prediction, so use a fresh `Sampler` (or restart at step 0) for every run.
#[derive(Clone, Debug)]
pub struct Sampler {
    kind: SamplerKind,
    prediction: Prediction,
    timesteps: Vec<f32>,
    /// σ_0 … σ_n (σ_n = 0); empty for DDIM.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    ddim: Option<Ddim>,
    /// DPM-Solver++: the step index and data prediction of the last step.
    previous: Option<(usize, Tensor<4>)>,
    /// Rows that entered the batch at the coming step (img2img): their first update is first
    /// order, as a scheduler started there would make it.
    entering: Vec<usize>,
}

/// `t` with the batch rows `rows` set to zero.
fn zero_rows(t: Tensor<4>, rows: &[usize]) -> Tensor<4> {
    let [b, ..] = t.dims();
    let keep: Vec<f32> = (0..b).map(|r| if rows.contains(&r) { 0.0 } else { 1.0 }).collect();
    let mask = Tensor::<1>::from_data(burn::tensor::TensorData::new(keep, [b]), &t.device()).reshape([b, 1, 1, 1]);
    t * mask
}

impl Sampler {
    /// Sets up `kind` for `steps` inference steps (1 ≤ steps ≤ `num_train_timesteps`) on the
    /// training schedule and `timestep_spacing` of `config`.
    pub fn new(kind: SamplerKind, config: &SchedulerConfig, steps: usize) -> Result<Self, ModelError> {
        let train = config.num_train_timesteps;
        let bad_steps = |message: String| ModelError::Input { field: "steps".into(), message };
        if steps == 0 || steps > train {
            return Err(bad_steps(format!("{steps} steps: must be between 1 and num_train_timesteps = {train}")));
        }
        let defaulted;
        let config = if !config.spacing_given && kind != SamplerKind::Ddim && config.spacing != Spacing::Linspace {
            defaulted = SchedulerConfig { spacing: Spacing::Linspace, ..config.clone() };
            &defaulted
        } else {
            config
        };
        let table = sigma_table(config);
        let mut sampler = Sampler {
            kind,
            prediction: config.prediction,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            init_noise_sigma: 1.0,
            ddim: None,
            previous: None,
            entering: Vec::new(),
        };
        match kind {
            SamplerKind::Ddim => {
                let ddim = Ddim::new(config.clone(), steps);
                if let Some(&t) = ddim.timesteps.iter().find(|&&t| t >= train) {
                    return Err(bad_steps(format!("{steps} steps with steps_offset {} reach timestep {t} ≥ {train}", config.steps_offset)));
                }
                sampler.timesteps = ddim.timesteps.iter().map(|&t| t as f32).collect();
                sampler.ddim = Some(ddim);
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                sampler.timesteps = match config.spacing {
                    Spacing::Linspace => linspace((train - 1) as f64, steps).into_iter().rev().map(|t| t as f32).collect(),
                    _ => ddim_timesteps(config, steps).into_iter().map(|t| t as f32).collect(),
                };
                sampler.sigmas = sampler.timesteps.iter().map(|&t| interp(&table, t as f64)).chain([0.0]).collect();
                let max = sampler.sigmas.iter().copied().fold(0.0, f32::max);
                sampler.init_noise_sigma = if config.spacing == Spacing::Leading { (max * max + 1.0).sqrt() } else { max };
            }
            SamplerKind::DpmPp2m => {
                let timesteps = dpm_timesteps(config, steps);
                sampler.sigmas = timesteps.iter().map(|&t| interp(&table, t as f64)).chain([0.0]).collect();
                sampler.timesteps = timesteps.into_iter().map(|t| t as f32).collect();
            }
            SamplerKind::DpmPp2mKarras => (sampler.timesteps, sampler.sigmas) = karras(&table, steps),
        }
        Ok(sampler)
    }

    /// Which sampler this is.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }

    /// The timestep the UNet gets at each step, high to low (fractional for Euler with
    /// `linspace` spacing).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// σ_0 … σ_n with σ_n = 0 (n + 1 values) for Euler, Euler ancestral and DPM-Solver++; `None`
    /// for DDIM.
    pub fn sigmas(&self) -> Option<&[f32]> {
        (!self.sigmas.is_empty()).then_some(&self.sigmas[..])
    }

    /// The scale of the initial latents: `x_T = N(0, I) · init_noise_sigma`.
    pub fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    /// The UNet input at step `i`: `x / √(σ_i² + 1)` for Euler and Euler ancestral, `x` otherwise.
    pub fn scale_model_input(&self, x: Tensor<4>, i: usize) -> Tensor<4> {
        match self.kind {
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let s = self.sigmas[i];
                x / (s * s + 1.0).sqrt()
            }
            _ => x,
        }
    }

    /// Whether [`step`](Self::step) needs a fresh N(0, I) draw (Euler ancestral).
    pub fn needs_noise(&self) -> bool {
        self.kind == SamplerKind::EulerAncestral
    }

    /// `x0` noised to the level of step `i`, as diffusers' `add_noise` does for a schedule that
    /// starts there (img2img): `√ᾱ_t·x0 + √(1−ᾱ_t)·noise` for DDIM, `x0 + σ_i·noise` for Euler and
    /// Euler ancestral, `α_i·x0 + α_i·σ_i·noise` with `α_i = 1/√(σ_i² + 1)` for DPM-Solver++.
    pub fn add_noise(&self, x0: Tensor<4>, noise: Tensor<4>, i: usize) -> Tensor<4> {
        match self.kind {
            SamplerKind::Ddim => {
                let ddim = self.ddim.as_ref().expect("DDIM schedule");
                let (a, _) = ddim.alphas(ddim.timesteps[i]);
                x0 * a.sqrt() + noise * (1.0 - a).sqrt()
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => x0 + noise * self.sigmas[i],
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => {
                let sigma = self.sigmas[i];
                let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
                x0 * alpha + noise * (sigma * alpha)
            }
        }
    }

    /// Marks batch `rows` as entering at the next [`step`](Self::step): DPM-Solver++ makes their
    /// update first order (no history of theirs exists); the other samplers keep no history.
    pub fn enter_rows(&mut self, rows: &[usize]) {
        self.entering.extend_from_slice(rows);
    }

    /// Keeps only the batch rows `ranges` (`(first row, rows)`, in order) of the state carried
    /// from one step to the next: call it when sets leave a running batch, so the remaining rows
    /// continue exactly as before.
    pub fn keep_rows(&mut self, ranges: &[(usize, usize)]) {
        if let Some((j, previous)) = self.previous.take()
            && !ranges.is_empty()
        {
            let kept = ranges.iter().map(|&(first, rows)| previous.clone().narrow(0, first, rows)).collect();
            self.previous = Some((j, Tensor::cat(kept, 0)));
        }
    }

    /// One update from `x` at step `i` with the guided model output; `noise` is the N(0, I) draw
    /// of the latents' shape for ancestral samplers (`None` otherwise, ignored if given). Returns
    /// the new latents and the step's x0 / data prediction.
    ///
    /// DPM-Solver++ uses second order when step `i − 1` was the previous call (and `i` is not the
    /// last step), first order otherwise.
    ///
    /// # Panics
    /// If `i` is not below the number of steps, or if [`needs_noise`](Self::needs_noise) and
    /// `noise` is `None`.
    pub fn step(&mut self, model_output: Tensor<4>, i: usize, x: Tensor<4>, noise: Option<Tensor<4>>) -> (Tensor<4>, Tensor<4>) {
        assert!(i < self.timesteps.len(), "step {i} of a {}-step sampler", self.timesteps.len());
        if self.kind != SamplerKind::DpmPp2m && self.kind != SamplerKind::DpmPp2mKarras {
            self.entering.clear();
        }
        match self.kind {
            SamplerKind::Ddim => {
                let ddim = self.ddim.as_ref().expect("DDIM schedule");
                let out = ddim.step(model_output, ddim.timesteps[i], x);
                (out.prev_sample, out.pred_original_sample)
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let (s, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let x0 = match self.prediction {
                    Prediction::Epsilon => x.clone() - model_output * s,
                    Prediction::VPrediction => model_output * (-s / (s * s + 1.0).sqrt()) + x.clone() / (s * s + 1.0),
                    Prediction::Sample => model_output,
                };
                let d = (x.clone() - x0.clone()) / s;
                let prev = if self.kind == SamplerKind::Euler {
                    x + d * (next - s)
                } else {
                    let up = (next * next * (s * s - next * next) / (s * s)).sqrt();
                    let down = (next * next - up * up).sqrt();
                    let noise = noise.expect("Euler ancestral needs noise");
                    x + d * (down - s) + noise * up
                };
                (prev, x0)
            }
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mKarras => {
                // α = 1/√(σ² + 1), s = σ·α, λ = ln α − ln s.
                let at = |k: usize| {
                    let sigma = self.sigmas[k];
                    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
                    let s = sigma * alpha;
                    (alpha, s, alpha.ln() - s.ln())
                };
                let (alpha_s, s_s, lambda_s) = at(i);
                let (alpha_t, s_t, lambda_t) = at(i + 1);
                let x0 = match self.prediction {
                    Prediction::Epsilon => (x.clone() - model_output * s_s) / alpha_s,
                    Prediction::VPrediction => x.clone() * alpha_s - model_output * s_s,
                    Prediction::Sample => model_output,
                };
                let h = lambda_t - lambda_s;
                let c = alpha_t * ((-h).exp() - 1.0);
                let mut prev = x * (s_t / s_s) - x0.clone() * c;
                let last = i + 1 == self.timesteps.len();
                let entering = std::mem::take(&mut self.entering);
                if let Some((j, d_prev)) = self.previous.take()
                    && j + 1 == i
                    && !last
                {
                    let r = (lambda_s - at(j).2) / h;
                    let d1 = (x0.clone() - d_prev) * (1.0 / r);
                    let d1 = if entering.is_empty() { d1 } else { zero_rows(d1, &entering) };
                    prev = prev - d1 * (0.5 * c);
                }
                self.previous = Some((i, x0.clone()));
                (prev, x0)
            }
        }
    }
}

/// σ(t) = √((1 − ᾱ_t) / ᾱ_t) for t in 0..T, float32.
fn sigma_table(config: &SchedulerConfig) -> Vec<f32> {
    config.alphas_cumprod().into_iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// `numpy.linspace(0, stop, num)` (float64).
fn linspace(stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![0.0];
    }
    let step = stop / (num - 1) as f64;
    (0..num).map(|k| if k + 1 == num { stop } else { k as f64 * step }).collect()
}

/// `numpy.interp(t, arange(len), table)`, rounded to f32.
fn interp(table: &[f32], t: f64) -> f32 {
    let last = table.len() - 1;
    if t >= last as f64 {
        return table[last];
    }
    if t <= 0.0 {
        return table[0];
    }
    let j = t.floor() as usize;
    let (lo, hi) = (table[j] as f64, table[j + 1] as f64);
    if t == j as f64 { table[j] } else { ((hi - lo) * (t - j as f64) + lo) as f32 }
}

/// DPM-Solver's timesteps (`last_timestep` = T, i.e. `lambda_min_clipped = -inf`).
fn dpm_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<usize> {
    let train = config.num_train_timesteps;
    match config.spacing {
        Spacing::Leading => (1..=steps).rev().map(|k| k * (train / (steps + 1)) + config.steps_offset).collect(),
        Spacing::Linspace => {
            let t = linspace((train - 1) as f64, steps + 1);
            (1..=steps).rev().map(|k| round_half_even(t[k]) as usize).collect()
        }
        Spacing::Trailing => ddim_timesteps(config, steps),
    }
}

/// Karras sigmas (ρ = 7) over the whole training range and their rounded timesteps; returns
/// (timesteps, sigmas + [0]).
fn karras(table: &[f32], steps: usize) -> (Vec<f32>, Vec<f32>) {
    let rho = 7.0;
    let min_inv = (table[0] as f64).powf(1.0 / rho);
    let max_inv = (table[table.len() - 1] as f64).powf(1.0 / rho);
    let sigmas: Vec<f64> = linspace(1.0, steps).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect();
    // diffusers' `_sigma_to_t`: linear interpolation in log σ on the float32 log table.
    let log_table: Vec<f32> = table.iter().map(|&s| (s as f64).ln() as f32).collect();
    let to_t = |sigma: f64| {
        let ls = sigma.max(1e-10).ln();
        let low = log_table.iter().rposition(|&l| ls - l as f64 >= 0.0).unwrap_or(0).min(log_table.len() - 2);
        let (lo, hi) = (log_table[low], log_table[low + 1]);
        let w = ((lo as f64 - ls) / (lo - hi) as f64).clamp(0.0, 1.0);
        round_half_even((1.0 - w) * low as f64 + w * (low + 1) as f64) as f32
    };
    let timesteps = sigmas.iter().map(|&s| to_t(s)).collect();
    (timesteps, sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> SchedulerConfig {
        SchedulerConfig::default()
    }

    #[test]
    fn names_round_trip() {
        for k in SamplerKind::ALL {
            assert_eq!(SamplerKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{}\"", k.as_str()));
        }
        assert_eq!(SamplerKind::parse("euler_ancestral"), None);
    }

    #[test]
    fn leading_schedules_of_the_readme() {
        let ts = |k| Sampler::new(k, &sd(), 8).unwrap().timesteps().to_vec();
        assert_eq!(ts(SamplerKind::Euler), [876.0, 751.0, 626.0, 501.0, 376.0, 251.0, 126.0, 1.0]);
        assert_eq!(ts(SamplerKind::DpmPp2m), [889.0, 778.0, 667.0, 556.0, 445.0, 334.0, 223.0, 112.0]);
        assert_eq!(ts(SamplerKind::DpmPp2mKarras), [999.0, 890.0, 746.0, 549.0, 299.0, 90.0, 12.0, 0.0]);
        let euler = Sampler::new(SamplerKind::Euler, &sd(), 8).unwrap();
        assert!((euler.init_noise_sigma() - 7.439363).abs() < 1e-5);
        assert_eq!(euler.sigmas().unwrap().len(), 9);
        assert_eq!(Sampler::new(SamplerKind::Ddim, &sd(), 8).unwrap().sigmas(), None);
    }

    #[test]
    fn rejects_bad_step_counts() {
        for steps in [0, 1001] {
            let err = Sampler::new(SamplerKind::Euler, &sd(), steps).unwrap_err();
            assert!(err.to_string().contains("`steps`"), "{err}");
        }
        assert!(Sampler::new(SamplerKind::Ddim, &sd(), 1000).is_err());
        assert!(Sampler::new(SamplerKind::DpmPp2mKarras, &sd(), 1).is_ok());
    }
}
