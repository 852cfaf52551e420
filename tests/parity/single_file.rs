//! Parity of single-file checkpoints with the `single_file` goldens: the tiny SD1.5-, SD2- and
//! SDXL-like models saved in the original layout (float16), loaded by
//! [`stylealign::pipeline::single_file::load`] and compared with diffusers' pipeline loaded from
//! the same file by `from_single_file`: text encoders, one UNet call, VAE encode and decode, and
//! a full CFG run. A module of the parity harness (`tests/parity.rs`).

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use stylealign::model::unet::{NoHooks, TextTime};
use stylealign::pipeline::single_file::{self, SingleFileOptions};
use stylealign::pipeline::{BatchSpec, SetState, TextCond};
use stylealign::sampling::sampler::{Sampler, SamplerKind};

use crate::common::*;
use crate::parity_sampler::Tally;

/// Text encoders, one UNet call, the VAE.
const TOL_MODEL: f64 = 1e-4;
/// Final latents and the decoded image.
const TOL_FINAL: f64 = 2e-3;

pub fn single_file_file(dir: &Path, g: &Golden, t: &mut impl Tally, device: &Device) {
    let info = &g.info;
    let file = dir.join(info["model_file"].as_str().expect("info.model_file"));
    let (pipe, loaded) = match single_file::load(&file, &SingleFileOptions::default(), device) {
        Ok(p) => p,
        Err(e) => return t.fail("load", format!("{}: {e}", file.display())),
    };
    let want_prediction = info["prediction_type"].as_str().unwrap_or("epsilon");
    let got = single_file::prediction_name(pipe.scheduler_config().prediction);
    if got != want_prediction {
        t.fail("prediction_type", format!("{got} != {want_prediction} ({:?})", loaded.prediction_origin));
    }

    let ids = g.get("input_ids").rows_u32();
    let ids_2 = g.has("input_ids_2").then(|| g.get("input_ids_2").rows_u32());
    let (hidden, pooled) = pipe.encode_ids(&ids, ids_2.as_deref()).expect("encode");
    t.check("prompt_embeds", max_abs_diff(hidden.clone(), g.get("prompt_embeds")), TOL_MODEL);
    if let Some(p) = &pooled {
        t.check("pooled_prompt_embeds", max_abs_diff(p.clone(), g.get("pooled_prompt_embeds")), TOL_MODEL);
    }

    // One UNet call on both prompts.
    let sample: Tensor<4> = g.get("unet.sample").tensor(device);
    let rows = sample.dims()[0];
    let ts = Tensor::<1>::from_data(TensorData::new(vec![g.get("unet.timestep").f32()[0]; rows], [rows]), device);
    let tt = pooled.clone().map(|p| TextTime { text_embeds: p, time_ids: g.get("unet.time_ids").tensor(device) });
    let out = pipe.unet().forward(sample, ts, &hidden, tt.as_ref(), &NoHooks).expect("unet");
    t.check("unet.out", max_abs_diff(out, g.get("unet.out")), TOL_MODEL);

    // The VAE both ways.
    let vae = pipe.vae();
    let mean = vae.encode(g.get("vae.image").tensor(device)).expect("vae encode").mean;
    t.check("vae.latent_mean", max_abs_diff(mean, g.get("vae.latent_mean")), TOL_MODEL);
    let decoded = vae.decode(g.get("vae.latents").tensor(device)).expect("vae decode");
    t.check("vae.decoded", max_abs_diff(decoded, g.get("vae.decoded")), TOL_MODEL);

    // End to end: row 1 is the prompt; the unconditional half is the empty prompt (SD1/SD2) or
    // zeros (SDXL's force_zeros_for_empty_prompt).
    let cond = TextCond { hidden: hidden.clone().narrow(0, 1, 1), pooled: pooled.clone().map(|p| p.narrow(0, 1, 1)) };
    let uncond = match &pooled {
        Some(_) => pipe.encode_negative("", 1).expect("negative"),
        None => TextCond { hidden: hidden.narrow(0, 0, 1), pooled: None },
    };
    let kind = match info["scheduler_class"].as_str() {
        Some("DDIMScheduler") => SamplerKind::Ddim,
        Some("EulerDiscreteScheduler") => SamplerKind::Euler,
        other => return t.skip("end to end", &format!("scheduler {other:?}")),
    };
    let steps = info["steps"].as_u64().expect("info.steps") as usize;
    let (w, h) = (info["width"].as_u64().unwrap() as usize, info["height"].as_u64().unwrap() as usize);
    let mut sampler = Sampler::new(kind, pipe.scheduler_config(), steps).expect("sampler");
    let x = g.get("noise").tensor::<4>(device) * sampler.init_noise_sigma();
    let batch = BatchSpec {
        width: w,
        height: h,
        steps,
        guidance: info["guidance_scale"].as_f64().expect("info.guidance_scale") as f32,
        sampler: kind,
        patch: None,
        scope: Default::default(),
        size_conditioning: None,
    };
    let state = SetState { set: 0, seed: 0, x, uncond, cond, replay: None, entries: Vec::new(), controls: Vec::new(), loras: Vec::new() };
    let mut on_step = |_: &stylealign::pipeline::StepView| vec![true];
    let fin = pipe.denoise(&batch, &mut sampler, vec![state], &mut on_step).expect("denoise").pop().expect("one set").1;
    t.check("latents_final", max_abs_diff(fin.clone(), g.get("latents_final")), TOL_FINAL);
    let image = vae.decode(fin / vae.config.scaling_factor).expect("decode");
    t.check("image_decoded", max_abs_diff(image, g.get("image_decoded")), TOL_FINAL);
}
