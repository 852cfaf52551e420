//! Parity of LoRAs with the `lora` goldens (diffusers' `load_lora_weights` + `set_adapters`):
//! per case (no adapter, a kohya file, a PEFT file, both with weights 0.8 / -0.6), the text
//! encoders' output, one UNet call on fixed inputs, and a CFG + DDIM loop end to end (final
//! latents and the decoded image). A module of the parity harness (`tests/parity.rs`).

use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use stylealign::model::lora::{Active, Adapters, Component, scoped};
use stylealign::model::unet::{NoHooks, TextTime};
use stylealign::pipeline::{BatchSpec, Pipeline, SetState, TextCond};
use stylealign::sampling::sampler::{Sampler, SamplerKind};

use crate::common::*;
use crate::parity_sampler::Tally;

const TOL_MODEL: f64 = 1e-4;
const TOL_FINAL: f64 = 2e-3;

pub fn lora_file(dir: &Path, g: &Golden, t: &mut impl Tally, device: &Device) {
    let info = &g.info;
    let model = info["model"].as_str().expect("info.model");
    let pipe = Pipeline::load(&dir.join(model), device).expect("load pipeline");
    let ids = g.get("input_ids").rows_u32();
    let ids2 = g.has("input_ids_2").then(|| g.get("input_ids_2").rows_u32());
    let n = info["n_images"].as_u64().expect("n_images") as usize;
    let sample: Tensor<4> = g.get("unet_in.sample").tensor(device);
    let b = sample.dims()[0];
    let timesteps = Tensor::<1>::from_data(TensorData::new(g.get("unet_in.timestep").f32(), [b]), device);
    let ehs_in: Tensor<3> = g.get("unet_in.encoder_hidden_states").tensor(device);
    let text_time = g
        .has("unet_in.text_embeds")
        .then(|| TextTime { text_embeds: g.get("unet_in.text_embeds").tensor(device), time_ids: g.get("unet_in.time_ids").tensor(device) });
    let config = crate::scheduler_of(&info["scheduler"]["config"], "lora golden scheduler config");
    let steps = info["steps"].as_u64().expect("steps") as usize;
    let guidance = info["guidance_scale"].as_f64().expect("guidance_scale") as f32;
    let init: Tensor<4> = g.get("latents_init").tensor(device);
    let [_, _, h, w] = init.dims();
    let f = pipe.pixel_factor();

    assert!(info["cases"].is_array(), "info.cases");
    for case in crate::cases(&info["cases"]) {
        let c = case["name"].as_str().expect("case name");
        let mut adapters: Adapters = Vec::new();
        let mut failed = false;
        for a in case["adapters"].as_array().expect("adapters") {
            let rel = a[0].as_str().expect("adapter file");
            let weight = a[1].as_f64().expect("adapter weight") as f32;
            match pipe.load_lora(rel, &dir.join(rel)) {
                Ok(l) => adapters.push((Arc::new(l), weight)),
                Err(e) => {
                    t.fail(&format!("{c}: load {rel}"), e.to_string());
                    failed = true;
                }
            }
        }
        if failed {
            continue;
        }
        // Text encoders.
        let (hidden, pooled) = pipe.encode_ids_with(&ids, ids2.as_deref(), &adapters).expect("encode");
        t.check(
            &format!("{c}.encoder_hidden_states"),
            max_abs_diff(hidden.clone(), g.get(&format!("{c}.encoder_hidden_states"))),
            TOL_MODEL,
        );
        if let Some(p) = &pooled {
            t.check(&format!("{c}.pooled"), max_abs_diff(p.clone(), g.get(&format!("{c}.pooled"))), TOL_MODEL);
        }
        // One UNet call.
        let active = Active::uniform(Component::Unet, b, adapters.clone(), device);
        let out = scoped(active, || pipe.unet().forward(sample.clone(), timesteps.clone(), &ehs_in, text_time.as_ref(), &NoHooks))
            .expect("unet forward");
        t.check(&format!("{c}.unet_out"), max_abs_diff(out, g.get(&format!("{c}.unet_out"))), TOL_MODEL);
        // End to end: CFG + DDIM, the set's LoRAs on its UNet rows.
        let half = |t: &Tensor<3>, k: usize| t.clone().narrow(0, k * n, n);
        let halfp = |p: &Option<Tensor<2>>, k: usize| p.as_ref().map(|p| p.clone().narrow(0, k * n, n));
        let uncond = TextCond { hidden: half(&hidden, 0), pooled: halfp(&pooled, 0) };
        let cond = TextCond { hidden: half(&hidden, 1), pooled: halfp(&pooled, 1) };
        let mut sampler = Sampler::new(SamplerKind::Ddim, &config, steps).expect("sampler");
        let state = SetState {
            set: 0,
            seed: 0,
            x: init.clone() * sampler.init_noise_sigma(),
            uncond,
            cond,
            replay: None,
            entries: Vec::new(),
            controls: Vec::new(),
            loras: adapters.clone(),
        };
        let batch = BatchSpec {
            width: w * f,
            height: h * f,
            steps,
            guidance,
            sampler: SamplerKind::Ddim,
            patch: None,
            scope: Default::default(),
            size_conditioning: None,
        };
        let (fin, _) = crate::denoise_recording(&pipe, &batch, &mut sampler, state);
        t.check(&format!("{c}.latents_final"), max_abs_diff(fin.clone(), g.get(&format!("{c}.latents_final"))), TOL_FINAL);
        let vae = pipe.vae();
        let image = vae.decode(fin / vae.config.scaling_factor).expect("decode");
        t.check(&format!("{c}.image_decoded"), max_abs_diff(image, g.get(&format!("{c}.image_decoded"))), TOL_FINAL);
    }
    // The goldens themselves show the LoRAs change every output visibly.
    for (c, effects) in info["lora_effect_max_abs"].as_object().into_iter().flatten() {
        for (k, v) in effects.as_object().into_iter().flatten() {
            if v.as_f64().is_none_or(|v| v < 1e-2) {
                t.fail(&format!("{c}.{k} effect"), format!("the golden LoRA changes it by only {v:?}"));
            }
        }
    }
}
