//! Single-file checkpoints: dtype and EMA variants, missing components, `--vae`, prediction
//! types, and the loading errors (truncated file, pickle, wrong kind or family, tensors the
//! config does not use). Variants are written from the committed tiny SD1.5 / SD2 files
//! (`tests/fixtures/goldens/tiny_single/`).

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use common::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use stylealign::model::unet::NoHooks;
use stylealign::pipeline::Pipeline;
use stylealign::pipeline::single_file::{self, PredictionOrigin, SingleFileInfo, SingleFileOptions};
use stylealign::sampling::schedule::Prediction;

type Item = (String, Dtype, Vec<usize>, Vec<u8>);

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stylealign-single-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn committed(tag: &str) -> PathBuf {
    golden_dir().join(format!("tiny_single/{tag}.safetensors"))
}

fn read_items(path: &Path) -> Vec<Item> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<Item> = st.tensors().into_iter().map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_items(path: &Path, items: &[Item]) {
    let views: Vec<(String, TensorView)> =
        items.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Writes `dir/name.safetensors` (the committed `tag` file edited by `edit`) with the committed
/// sidecar beside it (edited by `sidecar`).
fn variant(dir: &Path, tag: &str, name: &str, edit: impl FnOnce(&mut Vec<Item>), sidecar: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut items = read_items(&committed(tag));
    edit(&mut items);
    let path = dir.join(format!("{name}.safetensors"));
    write_items(&path, &items);
    let mut side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(committed(tag).with_extension("json")).unwrap()).unwrap();
    sidecar(&mut side);
    std::fs::write(path.with_extension("json"), side.to_string()).unwrap();
    path
}

fn f16_to(items: &mut [Item], dtype: Dtype) {
    for (_, d, _, bytes) in items.iter_mut() {
        assert_eq!(*d, Dtype::F16);
        let values = bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32());
        *bytes = match dtype {
            Dtype::F32 => values.flat_map(f32::to_le_bytes).collect(),
            Dtype::BF16 => values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect(),
            other => panic!("{other:?}"),
        };
        *d = dtype;
    }
}

fn load(path: &Path, opts: &SingleFileOptions, device: &Device) -> Result<(Pipeline, SingleFileInfo), String> {
    single_file::load(path, opts, device).map_err(|e| e.to_string())
}

/// Outputs of every component on fixed inputs: the text encoder on one prompt, one UNet call,
/// a VAE decode.
fn probe(p: &Pipeline) -> Vec<f32> {
    let d = p.device();
    let ids = vec![{
        let mut r = vec![998u32, 17, 402, 33, 999];
        r.resize(16, 999);
        r
    }];
    let (hidden, _) = p.encode_ids(&ids, None).unwrap();
    let c = p.unet().config.in_channels;
    let s = p.unet().config.sample_size;
    let n = c * s * s;
    let sample = Tensor::<4>::from_data(TensorData::new((0..n).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), [1, c, s, s]), d);
    let ts = Tensor::<1>::from_data(TensorData::new(vec![500.0f32], [1]), d);
    let out = p.unet().forward(sample.clone(), ts, &hidden, None, &NoHooks).unwrap();
    let img = p.vae().decode(sample).unwrap();
    let mut v: Vec<f32> = hidden.into_data().try_to_vec().unwrap();
    v.extend(out.into_data().try_to_vec::<f32>().unwrap());
    v.extend(img.into_data().try_to_vec::<f32>().unwrap());
    v
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn fp16_fp32_and_bf16_files_load_alike() {
    let dev = device();
    let dir = scratch("dtypes");
    let (base, info) = load(&committed("sd15"), &Default::default(), &dev).unwrap();
    assert_eq!((single_file::dtype_name(info.dtype), info.ema), ("fp16", false));
    let want = probe(&base);
    let fp32 = variant(&dir, "sd15", "fp32", |i| f16_to(i, Dtype::F32), |_| {});
    let (p, info) = load(&fp32, &Default::default(), &dev).unwrap();
    assert_eq!(single_file::dtype_name(info.dtype), "fp32");
    // f16 → f32 is exact: the same weights, the same outputs.
    assert_eq!(probe(&p), want);
    let bf16 = variant(&dir, "sd15", "bf16", |i| f16_to(i, Dtype::BF16), |_| {});
    let (p, info) = load(&bf16, &Default::default(), &dev).unwrap();
    assert_eq!(single_file::dtype_name(info.dtype), "bf16");
    let got = probe(&p);
    let err = max_diff(&got, &want);
    assert!(err > 0.0 && err < 0.5, "bf16 rounds the weights: max diff {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ema_weights_are_preferred_when_both_exist() {
    let dev = device();
    let dir = scratch("ema");
    let want = probe(&load(&committed("sd15"), &Default::default(), &dev).unwrap().0);
    // EMA copies (LDM's flattened names) hold the real weights; the plain UNet weights are
    // scaled, so reading them would change the outputs.
    let path = variant(
        &dir,
        "sd15",
        "ema",
        |items| {
            let mut ema = Vec::new();
            for (k, d, s, b) in items.iter_mut() {
                if let Some(rest) = k.strip_prefix("model.diffusion_model.") {
                    ema.push((format!("model_ema.diffusion_model{}", rest.replace('.', "")), *d, s.clone(), b.clone()));
                    for c in b.chunks_exact_mut(2) {
                        let v = half::f16::from_le_bytes([c[0], c[1]]).to_f32() * 0.5;
                        c.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
                    }
                }
            }
            assert!(ema.len() > 100, "{} EMA tensors", ema.len());
            items.extend(ema);
            items.push(("model_ema.num_updates".into(), Dtype::I64, vec![], 7i64.to_le_bytes().to_vec()));
        },
        |_| {},
    );
    let (p, info) = load(&path, &Default::default(), &dev).unwrap();
    assert!(info.ema);
    assert_eq!(probe(&p), want);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_components_are_named_and_vae_comes_from_the_option() {
    let dev = device();
    let dir = scratch("components");
    let want = probe(&load(&committed("sd15"), &Default::default(), &dev).unwrap().0);
    let mut vae_items = Vec::new();
    let no_vae = variant(
        &dir,
        "sd15",
        "no_vae",
        |items| {
            vae_items = items.iter().filter(|i| i.0.starts_with("first_stage_model.")).cloned().collect();
            items.retain(|i| !i.0.starts_with("first_stage_model."));
        },
        |_| {},
    );
    let e = load(&no_vae, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("no VAE") && e.contains("--vae"), "{e}");
    // A standalone VAE file in the original layout, without the `first_stage_model.` prefix
    // (as VAEs are published).
    let vae_file = dir.join("vae-standalone.safetensors");
    let stripped: Vec<Item> =
        vae_items.into_iter().map(|(k, d, s, b)| (k.trim_start_matches("first_stage_model.").to_string(), d, s, b)).collect();
    write_items(&vae_file, &stripped);
    let opts = SingleFileOptions { vae: Some(vae_file.clone()), ..Default::default() };
    let (p, info) = load(&no_vae, &opts, &dev).unwrap();
    assert_eq!(info.vae.as_deref(), Some(vae_file.as_path()));
    assert_eq!(probe(&p), want);
    // A diffusers VAE folder: the same weights in float32, before rounding to float16.
    let opts = SingleFileOptions { vae: Some(golden_dir().join("tiny_sd15/vae")), ..Default::default() };
    let (p, _) = load(&no_vae, &opts, &dev).unwrap();
    let err = max_diff(&probe(&p), &want);
    assert!(err < 1e-2, "{err}");

    let no_text = variant(&dir, "sd15", "no_text", |items| items.retain(|i| !i.0.starts_with("cond_stage_model.")), |_| {});
    let e = load(&no_text, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("no text encoder"), "{e}");
    let sdxl_no_second =
        variant(&dir, "sdxl", "sdxl_no_te2", |items| items.retain(|i| !i.0.starts_with("conditioner.embedders.1.")), |_| {});
    let e = load(&sdxl_no_second, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("second text encoder"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prediction_type_comes_from_the_sidecar_then_the_option() {
    let dev = device();
    let dir = scratch("prediction");
    // The committed SD2 sidecar's scheduler says v_prediction.
    let (p, info) =
        load(&committed("sd2"), &SingleFileOptions { prediction_type: Some(Prediction::Epsilon), ..Default::default() }, &dev).unwrap();
    assert_eq!((p.scheduler_config().prediction, info.prediction_origin), (Prediction::VPrediction, PredictionOrigin::Sidecar));
    // Without it, the server option decides.
    let plain = variant(&dir, "sd2", "sd2_plain", |_| {}, |s| drop(s["scheduler"].as_object_mut().unwrap().remove("prediction_type")));
    let opts = SingleFileOptions { prediction_type: Some(Prediction::VPrediction), ..Default::default() };
    let (p, info) = load(&plain, &opts, &dev).unwrap();
    assert_eq!((p.scheduler_config().prediction, info.prediction_origin), (Prediction::VPrediction, PredictionOrigin::Option));
    // A per-model `prediction_type` beats the option.
    let per_model = variant(&dir, "sd2", "sd2_eps", |_| {}, |s| s["prediction_type"] = "epsilon".into());
    let (p, info) = load(&per_model, &opts, &dev).unwrap();
    assert_eq!((p.scheduler_config().prediction, info.prediction_origin), (Prediction::Epsilon, PredictionOrigin::Sidecar));
    let bad = variant(&dir, "sd2", "sd2_bad", |_| {}, |s| s["prediction_type"] = "x0".into());
    let e = load(&bad, &opts, &dev).unwrap_err();
    assert!(e.contains("prediction_type") && e.contains("x0"), "{e}");
    let unknown = variant(&dir, "sd2", "sd2_unknown", |_| {}, |s| s["unet_config"] = serde_json::json!({}));
    let e = load(&unknown, &opts, &dev).unwrap_err();
    assert!(e.contains("unet_config") && e.contains("unknown key"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loading_errors_are_clear() {
    let dev = device();
    let dir = scratch("errors");
    // Truncated: the header promises more bytes than the file has.
    let bytes = std::fs::read(committed("sd15")).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&cut, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("truncated") && e.contains("cut.safetensors"), "{e}");
    // Pickle checkpoints are never opened, and the message names the conversion.
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let e = load(&ckpt, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("pickle") && e.contains("safetensors.torch") && e.contains("model.safetensors"), "{e}");
    // Not a Stable Diffusion checkpoint (a ControlNet file).
    let cn = golden_dir().join("tiny_controlnet_single/control_tiny_sd15.safetensors");
    let e = load(&cn, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("not a Stable Diffusion checkpoint") && e.contains("--controlnet"), "{e}");
    // No sidecar: the tiny model's family cannot be told (cross-attention width 48).
    let bare = dir.join("bare.safetensors");
    std::fs::copy(committed("sd2"), &bare).unwrap();
    let e = load(&bare, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("family not recognised") && e.contains("48") && e.contains("<stem>.json"), "{e}");
    // The wrong family's configs: the SD1.5 file read with the SD2 sidecar.
    let wrong = dir.join("wrong.safetensors");
    std::fs::copy(committed("sd15"), &wrong).unwrap();
    std::fs::copy(committed("sd2").with_extension("json"), wrong.with_extension("json")).unwrap();
    let e = load(&wrong, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("model.diffusion_model.") && (e.contains("shape") || e.contains("missing tensor")), "{e}");
    // A tensor in the UNet's part that the config does not use.
    let extra = variant(
        &dir,
        "sd15",
        "extra",
        |items| {
            items.push(("model.diffusion_model.extra_head.weight".into(), Dtype::F16, vec![2], vec![0; 4]));
            // Outside every component (LDM's schedule buffers): ignored.
            items.push(("alphas_cumprod".into(), Dtype::F32, vec![2], vec![0; 8]));
        },
        |_| {},
    );
    let e = load(&extra, &Default::default(), &dev).unwrap_err();
    assert!(e.contains("extra_head") && e.contains("not used"), "{e}");
    let fine = variant(&dir, "sd15", "buffers", |items| items.push(("alphas_cumprod".into(), Dtype::F32, vec![2], vec![0; 8])), |_| {});
    load(&fine, &Default::default(), &dev).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sd2_text_encoder_leaves_the_last_layer_and_the_projection_unused() {
    let dev = device();
    let dir = scratch("sd2-layers");
    let want = {
        let (p, _) = load(&committed("sd2"), &Default::default(), &dev).unwrap();
        p.encode_ids(&[vec![998, 40, 41, 999, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], None)
            .unwrap()
            .0
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    // As in SD2 files: one more resblock than the config runs (SD2 uses the penultimate
    // layer), the CLIP projection and `logit_scale`, none of them read.
    let path = variant(
        &dir,
        "sd2",
        "sd2_full_openclip",
        |items| {
            let p = "cond_stage_model.model.transformer.resblocks.";
            let last: Vec<Item> = items
                .iter()
                .filter(|i| i.0.starts_with(&format!("{p}1.")))
                .map(|(k, d, s, b)| (k.replacen(&format!("{p}1."), &format!("{p}2."), 1), *d, s.clone(), b.clone()))
                .collect();
            assert!(!last.is_empty());
            items.extend(last);
            items.push(("cond_stage_model.model.text_projection".into(), Dtype::F16, vec![48, 48], vec![0; 48 * 48 * 2]));
            items.push(("cond_stage_model.model.logit_scale".into(), Dtype::F16, vec![], vec![0; 2]));
        },
        |_| {},
    );
    let (p, _) = load(&path, &Default::default(), &dev).unwrap();
    let got = p
        .encode_ids(&[vec![998, 40, 41, 999, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], None)
        .unwrap()
        .0
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(got, want);
    let _ = std::fs::remove_dir_all(&dir);
}
