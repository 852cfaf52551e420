//! Parity of the ControlNet with the `controlnet_*` goldens, driven by each file's metadata.
//!
//! `info.kind == "controlnet_unet"`: per case, the ControlNet's residuals (`out.down.k`,
//! `out.mid`, already times the conditioning scale), the UNet with those residuals added
//! (`out.unet`) and without (`out.unet_no_control`). The ControlNet runs twice, loaded from the
//! diffusers folder (`info.models.controlnet`) and from the original-layout single file
//! (`info.models.controlnet_single`, else `tiny_controlnet_single/control_<stem>.safetensors`
//! for a folder named `tiny_controlnet_<stem>`); the two must give identical residuals.
//! A module of the parity harness (`tests/parity.rs`), which declares `mod common;`.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use serde_json::Value;
use stylealign::model::controlnet::{ControlNet, ControlNetFormat};
use stylealign::model::unet::{AdditionalResiduals, NoHooks, TextTime, UNet};

use crate::common::*;
use crate::parity_sampler::Tally;

/// One ControlNet or UNet call (README tolerances, CPU).
const TOL_MODEL: f64 = 1e-4;

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
    for case in info["cases"].as_array().into_iter().flatten() {
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
