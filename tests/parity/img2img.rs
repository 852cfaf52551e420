//! Parity of img2img targets with the `img2img_pipe` goldens: a set whose reference row is
//! generated over the whole schedule while its targets enter at the step their strength gives,
//! from their init image's latent noised by the sampler (diffusers' img2img semantics per row).
//! A module of the parity harness (`tests/parity.rs`).

use std::path::Path;

use burn::tensor::{Device, Tensor};
use stylealign::pipeline::img2img::{Entry, start_step};
use stylealign::pipeline::{BatchSpec, Pipeline, SetState, TextCond};
use stylealign::sampling::sampler::{Sampler, SamplerKind};

use crate::common::*;
use crate::options_of;
use crate::parity_sampler::Tally;

/// CLIP and the VAE encoder; one float32 operation (`add_noise`).
const TOL_MODEL: f64 = 1e-4;
const TOL_ELEMENTWISE: f64 = 1e-5;
/// Final latents and the decoded image.
const TOL_FINAL: f64 = 2e-3;

pub fn img2img_file(dir: &Path, g: &Golden, t: &mut impl Tally, device: &Device) {
    let info = &g.info;
    let unet = info["models"]["unet"].as_str().expect("info.models.unet");
    let root = Path::new(unet).parent().expect("model folder");
    let pipe = Pipeline::load(&dir.join(root), device).expect("load pipeline");
    let ids = g.get("input_ids").rows_u32();
    let (hidden, _) = pipe.encode_ids(&ids, None).expect("encode");
    t.check("encoder_hidden_states", max_abs_diff(hidden.clone(), g.get("encoder_hidden_states")), TOL_MODEL);
    let n = info["n_images"].as_u64().expect("info.n_images") as usize;
    let uncond = TextCond { hidden: hidden.clone().narrow(0, 0, n), pooled: None };
    let cond = TextCond { hidden: hidden.narrow(0, n, n), pooled: None };

    // The VAE encoder on the float init images (the service encodes 8-bit images the same way).
    let image: Tensor<4> = g.get("init_image").tensor(device);
    let vae = pipe.vae();
    let latents = vae.encode(image * 2.0 - 1.0).expect("encode").mean * vae.config.scaling_factor;
    t.check("init_latents", max_abs_diff(latents.clone(), g.get("init_latents")), TOL_MODEL);

    let noise: Tensor<4> = g.get("noise").tensor(device);
    let [_, _, h, w] = noise.dims();
    let f = pipe.pixel_factor();
    let guidance = info["guidance_scale"].as_f64().expect("info.guidance_scale") as f32;
    let opts = options_of(&info["stylealigned"]).expect("stylealigned options");
    for case in crate::cases(&info["cases"]) {
        let p = case["tensor_prefix"].as_str().expect("tensor_prefix");
        let kind = match case["scheduler_kind"].as_str() {
            Some("ddim") => SamplerKind::Ddim,
            Some("euler") => SamplerKind::Euler,
            Some("dpmpp_2m_karras") => SamplerKind::DpmPp2mKarras,
            other => {
                t.skip(p, &format!("scheduler {other:?}"));
                continue;
            }
        };
        let config = crate::scheduler_of(&case["scheduler"]["config"], "img2img case scheduler config");
        let steps = case["steps"].as_u64().expect("steps") as usize;
        let strength = case["strength"].as_f64().expect("strength") as f32;
        let mut sampler = Sampler::new(kind, &config, steps).expect("sampler");
        let want_ts = g.get(&format!("{p}timesteps_f32")).f32();
        if sampler.timesteps() != want_ts.as_slice() {
            t.fail(&format!("{p}timesteps"), format!("{:?} != {want_ts:?}", sampler.timesteps()));
            continue;
        }
        let entry_step = start_step(steps, strength);
        let want_start = case["t_start"].as_u64().expect("t_start") as usize;
        if entry_step != want_start {
            t.fail(&format!("{p}t_start"), format!("{entry_step} != {want_start}"));
            continue;
        }
        t.check(&format!("{p}t_start (exact)"), 0.0, 0.0);
        let targets: Vec<usize> = usize_list(&case["target_rows"]);
        let entries: Vec<Entry> = targets
            .iter()
            .enumerate()
            .map(|(k, &row)| Entry {
                row,
                step: entry_step,
                latent: latents.clone().narrow(0, k, 1),
                noise: noise.clone().narrow(0, row, 1),
            })
            .collect();
        let entered: Vec<Tensor<4>> = entries.iter().map(|e| sampler.add_noise(e.latent.clone(), e.noise.clone(), e.step)).collect();
        t.check(&format!("{p}entry_latents"), max_abs_diff(Tensor::cat(entered, 0), g.get(&format!("{p}entry_latents"))), TOL_ELEMENTWISE);

        let x = noise.clone() * sampler.init_noise_sigma();
        let state = SetState {
            set: 0,
            seed: 0,
            x,
            uncond: uncond.clone(),
            cond: cond.clone(),
            replay: None,
            entries,
            controls: Vec::new(),
            loras: Vec::new(),
        };
        let batch = BatchSpec {
            width: w * f,
            height: h * f,
            steps,
            guidance,
            sampler: kind,
            patch: Some(opts),
            scope: Default::default(),
            size_conditioning: None,
        };
        let (fin, after) = crate::denoise_recording(&pipe, &batch, &mut sampler, state);
        let golden_steps = g.get(&format!("{p}latents_steps"));
        for (i, x) in after.into_iter().enumerate() {
            // After step i = entering step i + 1; the targets exist from their entry step on.
            let want = golden_steps.index(i + 1);
            let rows = if i >= entry_step { n } else { 1 };
            let want: Tensor<4> = want.tensor(device);
            let err = max_abs_diff_tensors(x.narrow(0, 0, rows), want.narrow(0, 0, rows));
            let what = if rows == n { "" } else { " (reference row)" };
            t.check(&format!("{p}latents_steps[{}]{what}", i + 1), err, 1e-4 * (i + 2) as f64);
        }
        t.check(&format!("{p}latents_final"), max_abs_diff(fin.clone(), g.get(&format!("{p}latents_final"))), TOL_FINAL);
        let image = vae.decode(fin / vae.config.scaling_factor).expect("decode");
        t.check(&format!("{p}image_decoded"), max_abs_diff(image, g.get(&format!("{p}image_decoded"))), TOL_FINAL);
    }
}

fn max_abs_diff_tensors(a: Tensor<4>, b: Tensor<4>) -> f64 {
    let shape = b.dims().to_vec();
    let data = b.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 data");
    max_abs_diff(a, &HostTensor::F32 { shape, data })
}
