//! Parity of the samplers with the `sampler_*` goldens (`info.kind == "sampler"`), driven by each
//! file's metadata: the schedule (and every `schedule.<spacing>.<n>.*` table), teacher-forced
//! UNet + CFG and updates, the free-running loop with and without the StyleAligned patch, and the
//! decoded image. A module of the parity harness (`tests/parity.rs`), which declares `mod common;`.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde_json::Value;
use stylealign::model::clip::ClipTextModel;
use stylealign::model::config::RawConfig;
use stylealign::model::unet::{NoHooks, UNet, UNetHooks};
use stylealign::model::vae::Vae;
use stylealign::sampling::sampler::{Sampler, SamplerKind};
use stylealign::sampling::{Conditioning, Ddim, SchedulerConfig, Spacing, guided_output};
use stylealign::style_aligned::StyleAlignedHooks;

use crate::common::*;
use crate::{options_of, plan_of};

/// CLIP, UNet + CFG from `model_input_steps[i]`, one teacher-forced update (README tolerances, CPU).
const TOL_MODEL: f64 = 1e-4;
/// Final latents and the decoded image.
const TOL_FINAL: f64 = 2e-3;
/// Float schedule values, relative.
const TOL_SCHEDULE: f64 = 1e-6;
/// `scale_model_input` and `noise · init_noise_sigma`: one float32 operation.
const TOL_ELEMENTWISE: f64 = 1e-5;

/// Where the checks of one golden file are counted.
pub trait Tally {
    /// A comparison: passes when `err <= tol`.
    fn check(&mut self, what: &str, err: f64, tol: f64);
    /// A check that could not be made because something is wrong.
    fn fail(&mut self, what: &str, why: String);
    /// A check that is not implemented for this file.
    fn skip(&mut self, what: &str, why: &str);
}

/// Runs every check of one sampler golden with the file's models (`info.models`: text encoder,
/// UNet, VAE), loaded by the caller.
pub fn sampler_file(_dir: &Path, g: &Golden, unet: &UNet, clip: &ClipTextModel, vae: &Vae, t: &mut impl Tally, device: &Device) {
    let info = &g.info;
    let (kind, config) = match sampler_of(info) {
        Ok(k) => k,
        Err(e) => return t.skip(&g.name, &e),
    };
    if let Some(named) = info.get("sampler").and_then(Value::as_str)
        && SamplerKind::parse(named) != Some(kind)
    {
        return t.fail("sampler", format!("info.sampler {named} but the scheduler config is {}", kind.as_str()));
    }
    let steps = info["num_inference_steps"].as_u64().expect("info.num_inference_steps") as usize;
    let guidance = info["cfg_scale"].as_f64().expect("info.cfg_scale") as f32;
    let new_sampler = |config: &SchedulerConfig, steps| Sampler::new(kind, config, steps).map_err(|e| e.to_string());
    let sampler = match new_sampler(&config, steps) {
        Ok(s) => s,
        Err(e) => return t.fail("Sampler::new", e),
    };

    // Schedules: the run's own, then every table for other spacings and step counts.
    for what in ["timesteps", "timesteps_f32", "sigmas", "init_noise_sigma"] {
        if g.has(what) {
            check_schedule(t, what, g.get(what), &sampler, config.num_train_timesteps);
        }
    }
    if kind == SamplerKind::Ddim {
        let ddim = Ddim::new(config.clone(), steps);
        let (a_t, a_prev): (Vec<f32>, Vec<f32>) = ddim.timesteps.iter().map(|&s| ddim.alphas(s)).unzip();
        t.check("alpha_prod_t (relative)", rel_err(&a_t, g.get("alpha_prod_t")), TOL_SCHEDULE);
        t.check("alpha_prod_t_prev (relative)", rel_err(&a_prev, g.get("alpha_prod_t_prev")), TOL_SCHEDULE);
    }
    for (key, want) in g.tensors.iter().filter(|(k, _)| k.starts_with("schedule.")) {
        let parts: Vec<&str> = key.splitn(4, '.').collect();
        let spacing = match parts.get(1).copied() {
            Some("leading") => Spacing::Leading,
            Some("linspace") => Spacing::Linspace,
            Some("trailing") => Spacing::Trailing,
            _ => {
                t.skip(key, "unknown spacing");
                continue;
            }
        };
        let Some(n) = parts.get(2).and_then(|n| n.parse().ok()).filter(|_| parts.len() == 4) else {
            t.skip(key, "not schedule.<spacing>.<steps>.<what>");
            continue;
        };
        match new_sampler(&SchedulerConfig { spacing, ..config.clone() }, n) {
            Ok(s) => check_schedule(t, key, want, &s, config.num_train_timesteps),
            Err(e) => t.fail(key, e),
        }
    }

    // Text: CFG rows [uncond × B | prompts], the uncond being input_ids row 0.
    let ids = g.get("input_ids").rows_u32();
    let b = ids.len() - 1;
    let rows: Vec<i64> = std::iter::repeat_n(0, b).chain(1..=b as i64).collect();
    let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [2 * b]), device);
    let ehs = clip.forward(&ids).expect("clip forward").last_hidden_state.select(0, rows);
    t.check("encoder_hidden_states", max_abs_diff(ehs.clone(), g.get("encoder_hidden_states")), TOL_MODEL);

    let sa = &info["stylealigned"];
    let hooks = match options_of(sa)
        .and_then(|o| StyleAlignedHooks::new(&o, plan_of(sa), unet.self_attention_layers(), device).map_err(|e| e.to_string()))
    {
        Ok(h) => h,
        Err(e) => return t.fail("stylealigned", e),
    };
    let ancestral = g.tensors.get("ancestral_noise_steps");
    let noise_at = |s: &Sampler, i: usize| {
        s.needs_noise().then(|| ancestral.expect("ancestral_noise_steps for an ancestral sampler").index(i).tensor::<4>(device))
    };

    // Teacher forcing: every step from the golden's own inputs (and conditioning).
    let golden_cond = Conditioning { encoder_hidden_states: g.get("encoder_hidden_states").tensor(device), text_time: None };
    let (latents, model_in, eps, x0) =
        (g.get("latents_steps"), g.get("model_input_steps"), g.get("guided_eps_steps"), g.get("pred_x0_steps"));
    let mut forced = new_sampler(&config, steps).expect("sampler");
    for i in 0..steps {
        let x: Tensor<4> = latents.index(i).tensor(device);
        let tag = |name: &str| format!("teacher-forced {name}[{i}]");
        t.check(&tag("model_input_steps"), max_abs_diff(forced.scale_model_input(x.clone(), i), &model_in.index(i)), TOL_ELEMENTWISE);
        let out =
            guided_output(unet, model_in.index(i).tensor(device), forced.timesteps()[i], &golden_cond, guidance, &hooks).expect("unet");
        t.check(&tag("guided_eps_steps"), max_abs_diff(out, &eps.index(i)), TOL_MODEL);
        let noise = noise_at(&forced, i);
        let (next, pred) = forced.step(eps.index(i).tensor(device), i, x, noise);
        t.check(&tag("latents_steps"), max_abs_diff(next, &latents.index(i + 1)), TOL_MODEL);
        t.check(&tag("pred_x0_steps"), max_abs_diff(pred, &x0.index(i)), TOL_MODEL);
    }

    // Free-running loops from noise · init_noise_sigma, with our own text embeddings.
    let init = g.get("noise").tensor::<4>(device) * sampler.init_noise_sigma();
    t.check("latents_init", max_abs_diff(init.clone(), g.get("latents_init")), TOL_ELEMENTWISE);
    let cond = Conditioning { encoder_hidden_states: ehs, text_time: None };
    let run = |hooks: &dyn UNetHooks, on_step: &mut dyn FnMut(usize, &Tensor<4>)| {
        let mut s = new_sampler(&config, steps).expect("sampler");
        let mut x = init.clone();
        for i in 0..steps {
            let x_in = s.scale_model_input(x.clone(), i);
            let out = guided_output(unet, x_in, s.timesteps()[i], &cond, guidance, hooks).expect("unet");
            let noise = noise_at(&s, i);
            x = s.step(out, i, x, noise).0;
            on_step(i, &x);
        }
        x
    };
    let mut step_errs = Vec::new();
    let patched = run(&hooks, &mut |i, x| step_errs.push(max_abs_diff(x.clone(), &latents.index(i + 1))));
    for (i, err) in step_errs.into_iter().enumerate() {
        let k = i + 1;
        t.check(&format!("latents_steps[{k}]"), err, 1e-4 * (k + 1) as f64);
    }
    t.check("latents_final", max_abs_diff(patched.clone(), g.get("latents_final")), TOL_FINAL);
    let image = vae.decode(patched / vae.config.scaling_factor).expect("decode");
    t.check("image_decoded", max_abs_diff(image, g.get("image_decoded")), TOL_FINAL);
    let unpatched = run(&NoHooks, &mut |_, _| {});
    t.check("latents_final_unpatched", max_abs_diff(unpatched, g.get("latents_final_unpatched")), TOL_FINAL);
}

/// The sampler and scheduler config of a golden: `info.scheduler_config` with
/// `info.scheduler_overrides` applied; `Err` names what this crate does not implement.
fn sampler_of(info: &Value) -> Result<(SamplerKind, SchedulerConfig), String> {
    let mut c = info["scheduler_config"].clone();
    for (k, v) in info["scheduler_overrides"].as_object().into_iter().flatten() {
        c[k] = v.clone();
    }
    let class = c["_class_name"].as_str().or(info["scheduler_class"].as_str()).ok_or("no scheduler class")?.to_string();
    // Settings that must keep diffusers' default (absent or null also means the default).
    let defaults: &[(&str, Value)] = match class.as_str() {
        "DDIMScheduler" | "EulerAncestralDiscreteScheduler" => &[],
        "EulerDiscreteScheduler" => &[
            ("use_karras_sigmas", false.into()),
            ("use_exponential_sigmas", false.into()),
            ("use_beta_sigmas", false.into()),
            ("interpolation_type", "linear".into()),
            ("timestep_type", "discrete".into()),
            ("final_sigmas_type", "zero".into()),
        ],
        "DPMSolverMultistepScheduler" => &[
            ("algorithm_type", "dpmsolver++".into()),
            ("solver_order", 2.into()),
            ("solver_type", "midpoint".into()),
            ("final_sigmas_type", "zero".into()),
            ("euler_at_final", false.into()),
            ("lambda_min_clipped", "-inf".into()),
            ("variance_type", Value::Null),
            ("use_lu_lambdas", false.into()),
            ("use_exponential_sigmas", false.into()),
            ("use_beta_sigmas", false.into()),
            ("use_flow_sigmas", false.into()),
            ("use_dynamic_shifting", false.into()),
        ],
        other => return Err(format!("scheduler class {other} is not implemented")),
    };
    for (key, want) in defaults {
        if let Some(v) = c.get(*key).filter(|v| !v.is_null() && *v != want) {
            return Err(format!("{class} with {key} = {v} is not implemented"));
        }
    }
    let kind = match class.as_str() {
        "DDIMScheduler" => SamplerKind::Ddim,
        "EulerDiscreteScheduler" => SamplerKind::Euler,
        "EulerAncestralDiscreteScheduler" => SamplerKind::EulerAncestral,
        _ if c["use_karras_sigmas"].as_bool() == Some(true) => SamplerKind::DpmPp2mKarras,
        _ => SamplerKind::DpmPp2m,
    };
    let raw = RawConfig::parse(Path::new("info.scheduler_config"), &c.to_string()).map_err(|e| e.to_string())?;
    Ok((kind, SchedulerConfig::from_raw(&raw).map_err(|e| e.to_string())?))
}

/// Compares one schedule quantity (`timesteps`, `timesteps_f32`, `sigmas`, `init_noise_sigma`,
/// DDIM's `prev_timesteps`): integer tensors exactly, float tensors to 1e-6 relative.
fn check_schedule(t: &mut impl Tally, name: &str, want: &HostTensor, s: &Sampler, train_steps: usize) {
    let what = name.rsplit('.').next().unwrap_or(name);
    let n = s.timesteps().len();
    let got: Vec<f32> = match what {
        "timesteps" | "timesteps_f32" => s.timesteps().to_vec(),
        "sigmas" => match s.sigmas() {
            Some(x) => x.to_vec(),
            None => return t.fail(name, format!("{} has no sigmas", s.kind().as_str())),
        },
        "init_noise_sigma" => vec![s.init_noise_sigma()],
        "prev_timesteps" => s.timesteps().iter().map(|&x| x - (train_steps / n) as f32).collect(),
        _ => return t.skip(name, "not a schedule quantity"),
    };
    match want {
        HostTensor::I64 { data, .. } if data.len() == got.len() => {
            let err = got.iter().zip(data).map(|(&g, &w)| (g as f64 - w as f64).abs()).fold(0.0, f64::max);
            t.check(name, err, 0.0);
        }
        HostTensor::F32 { .. } => t.check(&format!("{name} (relative)"), rel_err(&got, want), TOL_SCHEDULE),
        _ => t.fail(name, format!("{} values, golden {:?}", got.len(), want.shape())),
    }
}

/// Max |got − want| / |want| (0 where both are equal, +∞ on a length mismatch).
fn rel_err(got: &[f32], want: &HostTensor) -> f64 {
    let want = want.f32();
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter().zip(&want).map(|(&g, &w)| if g == w { 0.0 } else { ((g - w) as f64 / w as f64).abs() }).fold(0.0, f64::max)
}
