//! Parity of the style scope (per step window, per UNet level) with the `style_window_*` goldens
//! (`info.kind == "style_window_pipe"`): a DDIM CFG StyleAligned loop where the patch is active at
//! step i iff the window rule holds, on the case's levels only (the other levels run plain).
//! Checks the level names and their members (GroupNorms, self-attentions per level), the steps
//! the window selects, and every step's latents, the final latents and the decoded image of every
//! case, of the full patch and of the unpatched loop. A module of the parity harness
//! (`tests/parity.rs`), which declares `mod common;`.

use burn::tensor::{Device, Tensor};
use serde_json::Value;
use stylealign::model::clip::ClipTextModel;
use stylealign::model::config::RawConfig;
use stylealign::model::unet::{NoHooks, UNet, UNetHooks};
use stylealign::model::vae::Vae;
use stylealign::sampling::sampler::{Sampler, SamplerKind};
use stylealign::sampling::{Conditioning, SchedulerConfig, guided_output};
use stylealign::style_aligned::scope::level_layers;
use stylealign::style_aligned::{LevelOptions, StepWindow, StyleAlignedHooks, StyleScope};

use crate::common::*;
use crate::parity_sampler::Tally;
use crate::{options_of, plan_of};

const TOL_MODEL: f64 = 1e-4;
const TOL_FINAL: f64 = 2e-3;

/// The scope of a case: its window, and every level of the model not in its `levels` switched off.
fn scope_of(case: &Value, model_levels: &[String]) -> Result<StyleScope, String> {
    let window = match case.get("window") {
        Some(w) => {
            let w = f32_list(w);
            if w.len() != 2 {
                return Err(format!("window {w:?} is not [start, end]"));
            }
            StepWindow { start: w[0], end: w[1] }
        }
        None => StepWindow::default(),
    };
    let on: Vec<&str> = case["levels"].as_array().ok_or("no levels")?.iter().filter_map(Value::as_str).collect();
    if let Some(unknown) = on.iter().find(|l| !model_levels.iter().any(|m| m == *l)) {
        return Err(format!("level {unknown} is not a level of the model"));
    }
    let levels = model_levels
        .iter()
        .filter(|l| !on.contains(&l.as_str()))
        .map(|l| LevelOptions { name: l.clone(), enabled: Some(false), ..Default::default() })
        .collect();
    Ok(StyleScope { window, levels })
}

pub fn style_window_file(g: &Golden, unet: &UNet, clip: &ClipTextModel, vae: &Vae, t: &mut dyn Tally, device: &Device) {
    let info = &g.info;

    // The levels: names in execution order, and the layers each holds.
    let names: Vec<String> = unet.levels().iter().map(|l| l.to_string()).collect();
    let want_names: Vec<String> =
        info["level_names"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(String::from)).collect();
    if names != want_names {
        t.fail("level_names", format!("ours {names:?} != golden {want_names:?}"));
        return;
    }
    let members_err = level_layers(&unet.config)
        .iter()
        .map(|(level, norms, attn)| {
            let m = &info["level_members"][level.to_string()];
            let want = (m["groupnorms"].as_u64().unwrap_or(u64::MAX) as usize, m["attn1"].as_u64().unwrap_or(u64::MAX) as usize);
            if want == (*norms, *attn) { 0.0 } else { 1.0 }
        })
        .fold(0.0, f64::max);
    t.check("level_members (GroupNorms, attn1 per level; exact)", members_err, 0.0);

    let ids = g.get("input_ids").rows_u32();
    let ehs = clip.forward(&ids).expect("clip").last_hidden_state;
    t.check("encoder_hidden_states", max_abs_diff(ehs.clone(), g.get("encoder_hidden_states")), TOL_MODEL);

    let sched = &info["scheduler"];
    if sched["class"].as_str() != Some("DDIMScheduler") {
        t.skip(&g.name, &format!("scheduler {:?}", sched["class"]));
        return;
    }
    let raw = RawConfig::parse(std::path::Path::new("style_window scheduler.config"), &sched["config"].to_string()).unwrap();
    let cfg = SchedulerConfig::from_raw(&raw).expect("scheduler config");
    let steps = info["steps"].as_u64().expect("steps") as usize;
    let sampler = || Sampler::new(SamplerKind::Ddim, &cfg, steps).expect("sampler");
    let want_ts = g.get("timesteps_f32").f32();
    if sampler().timesteps() != want_ts.as_slice() {
        t.fail("timesteps", format!("{:?} != {want_ts:?}", sampler().timesteps()));
        return;
    }
    let guidance = info["guidance_scale"].as_f64().expect("guidance_scale") as f32;
    let cond = Conditioning { encoder_hidden_states: g.get("encoder_hidden_states").tensor(device), text_time: None };
    let init: Tensor<4> = g.get("latents_init").tensor(device);
    let sa = &info["stylealigned"];
    let opts = match options_of(sa) {
        Ok(o) => o,
        Err(e) => {
            t.skip(&g.name, &e);
            return;
        }
    };
    let global = opts.resolve().expect("golden options resolve");

    // `None`: the unpatched loop.
    let run = |scope: Option<&StyleScope>, p: &str, t: &mut dyn Tally| {
        let resolved = match scope.map(|s| s.resolve(&global, &unet.levels())).transpose() {
            Ok(r) => r,
            Err(e) => {
                t.fail(&format!("{p}scope"), e.to_string());
                return;
            }
        };
        let hooks = resolved
            .as_ref()
            .map(|r| StyleAlignedHooks::new(&opts, plan_of(sa), unet.self_attention_layers(), device).expect("hooks").with_scope(r));
        let mut sampler = sampler();
        let n = sampler.timesteps().len();
        let golden_steps = g.get(&format!("{p}latents_steps"));
        let mut x = init.clone();
        for i in 0..n {
            let h: &dyn UNetHooks = match (&hooks, &resolved) {
                (Some(h), Some(r)) if r.window.contains(i, n) => h,
                _ => &NoHooks,
            };
            let x_in = sampler.scale_model_input(x.clone(), i);
            let eps = guided_output(unet, x_in, sampler.timesteps()[i], &cond, guidance, h).expect("unet");
            x = sampler.step(eps, i, x, None).0;
            t.check(&format!("{p}latents_steps[{}]", i + 1), max_abs_diff(x.clone(), &golden_steps.index(i + 1)), 1e-4 * (i + 2) as f64);
        }
        t.check(&format!("{p}latents_final"), max_abs_diff(x.clone(), g.get(&format!("{p}latents_final"))), TOL_FINAL);
        let image = vae.decode(x / vae.config.scaling_factor).expect("decode");
        t.check(&format!("{p}image_decoded"), max_abs_diff(image, g.get(&format!("{p}image_decoded"))), TOL_FINAL);
    };

    for case in crate::cases(&info["cases"]).chain([&info["full"]]) {
        let p = case["tensor_prefix"].as_str().expect("tensor_prefix");
        let scope = match scope_of(case, &names) {
            Ok(s) => s,
            Err(e) => {
                t.fail(p, e);
                continue;
            }
        };
        if let Some(active) = case.get("active_steps").and_then(Value::as_array) {
            let ours: Vec<bool> = (0..steps).map(|i| scope.window.contains(i, steps)).collect();
            let want: Vec<bool> = active.iter().map(|v| v.as_bool().unwrap_or(false)).collect();
            if ours == want {
                t.check(&format!("{p}active_steps (exact)"), 0.0, 0.0);
            } else {
                t.fail(&format!("{p}active_steps"), format!("ours {ours:?} != golden {want:?}"));
            }
        }
        run(Some(&scope), p, t);
    }
    run(None, info["unpatched"]["tensor_prefix"].as_str().unwrap_or("unpatched."), t);
}
