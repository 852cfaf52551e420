//! Parity of the ControlNet with the `controlnet_*` goldens, driven by each file's metadata.
//!
//! `info.kind == "controlnet_unet"`: per case, the ControlNet's residuals (`out.down.k`,
//! `out.mid`, already times the conditioning scale), the UNet with those residuals added
//! (`out.unet`) and without (`out.unet_no_control`). The ControlNet runs twice, loaded from the
//! diffusers folder (`info.models.controlnet`) and from the original-layout single file
//! (`info.models.controlnet_single`, else `tiny_controlnet_single/control_<stem>.safetensors`
//! for a folder named `tiny_controlnet_<stem>`); the two must give identical residuals.
//!
//! `info.kind == "controlnet_pipe"`: see [`controlnet_pipe_file`].
//! A module of the parity harness (`tests/parity.rs`), which declares `mod common;`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;
use stylealign::model::config::RawConfig;
use stylealign::model::controlnet::{ControlNet, ControlNetFormat};
use stylealign::model::unet::{AdditionalResiduals, NoHooks, TextTime, UNet};
use stylealign::pipeline::control::control_active;
use stylealign::pipeline::{BatchSpec, Pipeline, SetControl, SetState, SizeConditioning, TextCond};
use stylealign::sampling::sampler::{Sampler, SamplerKind};
use stylealign::sampling::{Conditioning, SchedulerConfig};

use crate::common::*;
use crate::options_of;
use crate::parity_sampler::Tally;

/// One ControlNet or UNet call (README tolerances, CPU).
const TOL_MODEL: f64 = 1e-4;
/// Final latents and the decoded image.
const TOL_FINAL: f64 = 2e-3;

/// Largest absolute difference of two residual sets (0 when bitwise equal).
fn residual_diff(a: &AdditionalResiduals, b: &AdditionalResiduals) -> f64 {
    let diff = |x: &Tensor<4>, y: &Tensor<4>| -> f64 {
        let x = x.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        let y = y.clone().into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
        if x.len() != y.len() {
            return f64::INFINITY;
        }
        x.iter().zip(&y).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max)
    };
    if a.down.len() != b.down.len() {
        return f64::INFINITY;
    }
    a.down.iter().zip(&b.down).map(|(x, y)| diff(x, y)).fold(diff(&a.mid, &b.mid), f64::max)
}

/// The original-layout single file of a golden's ControlNet folder.
pub fn single_file_of(dir: &Path, info: &Value) -> Option<PathBuf> {
    if let Some(s) = info["models"].get("controlnet_single").and_then(Value::as_str) {
        return Some(dir.join(s));
    }
    let folder = info["models"]["controlnet"].as_str()?;
    let stem = folder.strip_prefix("tiny_controlnet_")?;
    Some(dir.join("tiny_controlnet_single").join(format!("control_tiny_{stem}.safetensors")))
}

/// Runs every check of one `controlnet_unet` golden.
pub fn controlnet_unet_file(dir: &Path, g: &Golden, unet: &UNet, t: &mut impl Tally, device: &Device) {
    let info = &g.info;
    let folder = dir.join(info["models"]["controlnet"].as_str().expect("info.models.controlnet"));
    let net = match ControlNet::load(&folder, device) {
        Ok(n) => n,
        Err(e) => return t.fail("load folder", e.to_string()),
    };
    let mut nets = vec![("folder", net)];
    match single_file_of(dir, info) {
        Some(file) if file.is_file() => match ControlNet::load(&file, device) {
            Ok(n) if n.format() == ControlNetFormat::Original && n.family() == nets[0].1.family() => nets.push(("single", n)),
            Ok(n) => t.fail("load single file", format!("read as {:?} / {:?}", n.format(), n.family())),
            Err(e) => t.fail("load single file", e.to_string()),
        },
        _ => t.skip("single file", "no original-layout file beside the folder"),
    }
    if let Some(f) = info.get("controlnet_conditioning_downsampling").and_then(Value::as_u64)
        && f as usize != nets[0].1.config.hint_factor()
    {
        t.fail("controlnet_conditioning_downsampling", format!("ours {} != golden {f}", nets[0].1.config.hint_factor()));
    }
    for case in crate::cases(&info["cases"]) {
        let p = case["tensor_prefix"].as_str().expect("tensor_prefix");
        let key = |k: &str| format!("{p}{k}");
        let sample: Tensor<4> = g.get(&key("input.sample")).tensor(device);
        let b = sample.dims()[0];
        let ts = g.get(&key("input.timestep")).f32();
        let ts = if ts.len() == 1 { vec![ts[0]; b] } else { ts };
        let timesteps = Tensor::<1>::from_data(TensorData::new(ts, [b]), device);
        let ehs: Tensor<3> = g.get(&key("input.encoder_hidden_states")).tensor(device);
        let cond: Tensor<4> = g.get(&key("input.controlnet_cond")).tensor(device);
        let text_time = g.has(&key("input.text_embeds")).then(|| TextTime {
            text_embeds: g.get(&key("input.text_embeds")).tensor(device),
            time_ids: g.get(&key("input.time_ids")).tensor(device),
        });
        let scale = case["conditioning_scale"].as_f64().expect("conditioning_scale") as f32;
        let mut first: Option<AdditionalResiduals> = None;
        for (how, net) in &nets {
            let r = match net.forward(sample.clone(), timesteps.clone(), &ehs, text_time.as_ref(), cond.clone(), scale) {
                Ok(r) => r,
                Err(e) => {
                    t.fail(&format!("{p}{how} forward"), e.to_string());
                    continue;
                }
            };
            if let Some(n) = case.get("num_down_residuals").and_then(Value::as_u64)
                && n as usize != r.down.len()
            {
                t.fail(&format!("{p}{how} residual count"), format!("{} != {n}", r.down.len()));
                continue;
            }
            match &first {
                None => {
                    for (k, d) in r.down.iter().enumerate() {
                        t.check(&key(&format!("out.down.{k}")), max_abs_diff(d.clone(), g.get(&key(&format!("out.down.{k}")))), TOL_MODEL);
                    }
                    t.check(&key("out.mid"), max_abs_diff(r.mid.clone(), g.get(&key("out.mid"))), TOL_MODEL);
                    let with = unet
                        .forward_with_residuals(sample.clone(), timesteps.clone(), &ehs, text_time.as_ref(), &NoHooks, Some(&r))
                        .expect("unet with residuals");
                    t.check(&key("out.unet"), max_abs_diff(with, g.get(&key("out.unet"))), TOL_MODEL);
                    let without = unet.forward(sample.clone(), timesteps.clone(), &ehs, text_time.as_ref(), &NoHooks).expect("unet");
                    t.check(&key("out.unet_no_control"), max_abs_diff(without, g.get(&key("out.unet_no_control"))), TOL_MODEL);
                    first = Some(r);
                }
                Some(f) => t.check(&format!("{p}single file = folder (exact)"), residual_diff(f, &r), 0.0),
            }
        }
    }
}

/// Runs every check of one `controlnet_pipe` golden: the DDIM CFG StyleAligned loop of one set
/// (reference row 0, targets 1..) with the ControlNet on the targets, through the pipeline's own
/// `denoise` (per-step latents, final latents, decoded image), the step-0 residuals of the CFG
/// batch (zero on the reference rows) where stored, and the loop without control.
pub fn controlnet_pipe_file(dir: &Path, g: &Golden, t: &mut impl Tally, device: &Device) {
    let info = &g.info;
    let models = &info["models"];
    let root = match models.get("pipeline_folder").and_then(Value::as_str) {
        Some(p) => PathBuf::from(p),
        None => Path::new(models["unet"].as_str().expect("info.models.unet")).parent().expect("model folder").to_path_buf(),
    };
    let pipe = Pipeline::load(&dir.join(root), device).expect("load pipeline");
    let net = match ControlNet::load(&dir.join(models["controlnet"].as_str().expect("info.models.controlnet")), device) {
        Ok(n) => Arc::new(n),
        Err(e) => return t.fail("load controlnet", e.to_string()),
    };
    let steps = info["steps"].as_u64().expect("info.steps") as usize;
    let guidance = info["guidance_scale"].as_f64().expect("info.guidance_scale") as f32;
    let sched = scheduler_config(&info["scheduler"]["config"]);
    if &sched != pipe.scheduler_config() {
        return t.fail("scheduler", "the golden's scheduler config differs from the model folder's".into());
    }
    let new_sampler = || Sampler::new(SamplerKind::Ddim, pipe.scheduler_config(), steps).expect("sampler");
    let want_ts = g.get("timesteps_f32").f32();
    if new_sampler().timesteps() != want_ts.as_slice() {
        return t.fail("timesteps", format!("{:?} != {want_ts:?}", new_sampler().timesteps()));
    }
    let sdxl = info["sdxl"].as_bool().unwrap_or(false);
    let (uncond, cond) = if sdxl {
        let hidden: Tensor<3> = g.get("prompt_embeds").tensor(device);
        let pooled: Tensor<2> = g.get("pooled_prompt_embeds").tensor(device);
        (
            TextCond {
                hidden: g.get("negative_prompt_embeds").tensor(device),
                pooled: Some(g.get("negative_pooled_prompt_embeds").tensor(device)),
            },
            TextCond { hidden, pooled: Some(pooled) },
        )
    } else {
        let ehs: Tensor<3> = g.get("encoder_hidden_states").tensor(device);
        let rows = ehs.dims()[0] / 2;
        (TextCond { hidden: ehs.clone().narrow(0, 0, rows), pooled: None }, TextCond { hidden: ehs.narrow(0, rows, rows), pooled: None })
    };
    let init: Tensor<4> = g.get("latents_init").tensor(device);
    let [_, _, lh, lw] = init.dims();
    let f = pipe.pixel_factor();
    let size_conditioning = sdxl.then(|| {
        let pair = |k: &str| {
            let v = usize_list(&info[k]);
            (v[0], v[1])
        };
        SizeConditioning {
            original_size: pair("original_size"),
            crop_top_left: pair("crops_coords_top_left"),
            target_size: pair("target_size"),
        }
    });
    let opts = match options_of(&info["stylealigned"]) {
        Ok(o) => o,
        Err(e) => return t.skip(&g.name, &e),
    };
    let batch = BatchSpec {
        width: lw * f,
        height: lh * f,
        steps,
        guidance,
        sampler: SamplerKind::Ddim,
        patch: Some(opts),
        scope: Default::default(),
        size_conditioning,
    };
    let images: Tensor<4> = g.get("control_images").tensor(device);
    let state = |controls: Vec<SetControl>| SetState {
        set: 0,
        seed: 0,
        x: init.clone(),
        uncond: uncond.clone(),
        cond: cond.clone(),
        replay: None,
        entries: Vec::new(),
        controls,
        loras: Vec::new(),
    };

    let (plain, _) = crate::denoise_recording(&pipe, &batch, &mut new_sampler(), state(Vec::new()));
    t.check("latents_final_no_control", max_abs_diff(plain.clone(), g.get("latents_final_no_control")), TOL_FINAL);

    for case in crate::cases(&info["cases"]) {
        let p = case["tensor_prefix"].as_str().expect("tensor_prefix");
        let key = |k: &str| format!("{p}{k}");
        let control = SetControl {
            net: net.clone(),
            images: images.clone(),
            conditioning_scale: case["conditioning_scale"].as_f64().expect("conditioning_scale") as f32,
            start: case["control_guidance_start"].as_f64().expect("control_guidance_start") as f32,
            end: case["control_guidance_end"].as_f64().expect("control_guidance_end") as f32,
        };
        if let Some(active) = case.get("control_active_steps").and_then(Value::as_array) {
            let want: Vec<bool> = active.iter().map(|v| v.as_bool().unwrap_or(false)).collect();
            let ours: Vec<bool> = (0..steps).map(|i| control_active(i, steps, control.start, control.end)).collect();
            if ours != want {
                t.fail(&key("control_active_steps"), format!("{ours:?} != {want:?}"));
                continue;
            }
        }
        if case["step0_residuals_stored"].as_bool() == Some(true) {
            let live = vec![state(vec![control.clone()])];
            let sampler = new_sampler();
            let x_in = sampler.scale_model_input(init.clone(), 0);
            let ehs = Tensor::cat(vec![uncond.hidden.clone(), cond.hidden.clone()], 0);
            let text_time = sdxl.then(|| {
                let ids = g.get("add_time_ids").f32();
                let rows = 2 * init.dims()[0];
                let ids: Vec<f32> = ids.iter().chain(ids.iter()).copied().collect();
                TextTime {
                    text_embeds: Tensor::cat(vec![uncond.pooled.clone().unwrap(), cond.pooled.clone().unwrap()], 0),
                    time_ids: Tensor::from_data(TensorData::new(ids, [rows, 6]), device),
                }
            });
            let c = Conditioning { encoder_hidden_states: ehs, text_time };
            match pipe.control_residuals(&live, &x_in, sampler.timesteps()[0], &c, 0, steps) {
                Ok(Some(r)) => {
                    for (k, d) in r.down.iter().enumerate() {
                        t.check(
                            &key(&format!("step0.down.{k}")),
                            max_abs_diff(d.clone(), g.get(&key(&format!("step0.down.{k}")))),
                            TOL_MODEL,
                        );
                    }
                    t.check(&key("step0.mid"), max_abs_diff(r.mid, g.get(&key("step0.mid"))), TOL_MODEL);
                }
                Ok(None) => t.fail(&key("step0"), "no residuals at step 0".into()),
                Err(e) => t.fail(&key("step0"), e.to_string()),
            }
        }
        let (fin, steps_x) = crate::denoise_recording(&pipe, &batch, &mut new_sampler(), state(vec![control]));
        let golden_steps = g.get(&key("latents_steps"));
        for (k, x) in steps_x.into_iter().enumerate() {
            t.check(&key(&format!("latents_steps[{}]", k + 1)), max_abs_diff(x, &golden_steps.index(k + 1)), 1e-4 * (k + 2) as f64);
        }
        t.check(&key("latents_final"), max_abs_diff(fin.clone(), g.get(&key("latents_final"))), TOL_FINAL);
        // The reference row gets no control: bitwise the same as without any.
        t.check(&key("reference row = no control (exact)"), tensor_diff(fin.clone().narrow(0, 0, 1), plain.clone().narrow(0, 0, 1)), 0.0);
        let image = pipe.vae().decode(fin / pipe.vae().config.scaling_factor).expect("decode");
        t.check(&key("image_decoded"), max_abs_diff(image, g.get(&key("image_decoded"))), TOL_FINAL);
    }
}

fn scheduler_config(v: &Value) -> SchedulerConfig {
    let raw = RawConfig::parse(Path::new("info.scheduler.config"), &v.to_string()).expect("json");
    SchedulerConfig::from_raw(&raw).expect("scheduler config")
}

fn tensor_diff(a: Tensor<4>, b: Tensor<4>) -> f64 {
    let a = a.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
    let b = b.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32");
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max)
}
