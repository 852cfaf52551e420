//! ControlNet: loading (folder, original single file, errors that name the file and the key),
//! and its use in the pipeline (targets only, window, scale, batching with other sets).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use common::*;
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use stylealign::model::controlnet::{ControlNet, ControlNetFormat};
use stylealign::model::{Family, ModelError};
use stylealign::pipeline::tiny::{tiny_controlnet, tiny_pipeline};
use stylealign::pipeline::{BatchSpec, ControlSpec, Image, PipelineError, SetSpec};
use stylealign::sampling::sampler::SamplerKind;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stylealign-test-{}-controlnet-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn single_file(stem: &str) -> PathBuf {
    golden_dir().join("tiny_controlnet_single").join(format!("control_tiny_{stem}.safetensors"))
}

/// Rewrites a safetensors file with `edit` applied to its (name, dtype, shape, bytes) list.
fn rewrite(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(dst, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A copy of a single file (and its sidecar config, when `with_config`) under `dir`.
fn copy_single(stem: &str, dir: &Path, with_config: bool) -> PathBuf {
    let src = single_file(stem);
    let dst = dir.join(src.file_name().unwrap());
    std::fs::copy(&src, &dst).unwrap();
    if with_config {
        std::fs::copy(src.with_extension("json"), dst.with_extension("json")).unwrap();
    }
    dst
}

#[test]
fn folder_and_single_file_load_with_their_family() {
    let dev = Device::flex();
    for (stem, family) in [("sd15", Family::Sd1), ("sd2", Family::Sd2), ("sdxl", Family::Sdxl)] {
        let folder = ControlNet::load(&golden_dir().join(format!("tiny_controlnet_{stem}")), &dev).unwrap();
        assert_eq!(folder.format(), ControlNetFormat::Diffusers);
        assert_eq!(folder.family(), family);
        let single = ControlNet::load(&single_file(stem), &dev).unwrap();
        assert_eq!(single.format(), ControlNetFormat::Original);
        assert_eq!(single.family(), family);
        assert_eq!(single.config, folder.config);
    }
}

#[test]
fn pickle_checkpoints_are_refused_with_a_conversion_hint() {
    let dir = scratch("pickle");
    for ext in ["ckpt", "pt", "pth", "bin"] {
        let path = dir.join(format!("control_canny.{ext}"));
        std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
        let e = ControlNet::load(&path, &Device::flex()).unwrap_err().to_string();
        assert!(e.contains(path.to_str().unwrap()), "{e}");
        assert!(e.contains("pickle") && e.contains("safetensors"), "{e}");
    }
    let e = ControlNet::load(&dir.join("missing.safetensors"), &Device::flex()).unwrap_err().to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
}

#[test]
fn a_truncated_file_names_the_file() {
    let dir = scratch("truncated");
    let path = dir.join("control_tiny_sd15.safetensors");
    let bytes = std::fs::read(single_file("sd15")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::copy(single_file("sd15").with_extension("json"), path.with_extension("json")).unwrap();
    let e = ControlNet::load(&path, &Device::flex()).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e}");
    assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
    std::fs::write(&path, &bytes[..4]).unwrap();
    assert!(ControlNet::load(&path, &Device::flex()).unwrap_err().to_string().contains("not a safetensors file"));
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_named_in_the_original_layout() {
    let dev = Device::flex();
    let dir = scratch("keys");
    let src = copy_single("sd15", &dir, true);

    let missing = dir.join("missing.safetensors");
    std::fs::copy(src.with_extension("json"), missing.with_extension("json")).unwrap();
    rewrite(&src, &missing, |t| t.retain(|(k, ..)| k != "control_model.input_blocks.1.0.in_layers.0.weight"));
    let e = ControlNet::load(&missing, &dev).unwrap_err();
    assert!(matches!(e, ModelError::MissingTensor { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("missing.safetensors") && msg.contains("control_model.input_blocks.1.0.in_layers.0.weight"), "{msg}");
    assert!(msg.contains("down_blocks.0.resnets.0.norm1.weight"), "the diffusers name too: {msg}");

    let extra = dir.join("extra.safetensors");
    std::fs::copy(src.with_extension("json"), extra.with_extension("json")).unwrap();
    rewrite(&src, &extra, |t| t.push(("control_model.zero_convs.99.0.weight".into(), safetensors::Dtype::F32, vec![1], vec![0; 4])));
    let e = ControlNet::load(&extra, &dev).unwrap_err();
    assert!(matches!(e, ModelError::ExtraTensors { .. }), "{e}");
    assert!(e.to_string().contains("control_model.zero_convs.99.0.weight"), "{e}");

    let shape = dir.join("shape.safetensors");
    std::fs::copy(src.with_extension("json"), shape.with_extension("json")).unwrap();
    rewrite(&src, &shape, |t| {
        let e = t.iter_mut().find(|(k, ..)| k == "control_model.middle_block_out.0.bias").unwrap();
        e.2 = vec![e.2[0] / 2];
        e.3.truncate(e.3.len() / 2);
    });
    let e = ControlNet::load(&shape, &dev).unwrap_err();
    assert!(matches!(e, ModelError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("control_model.middle_block_out.0.bias"), "{e}");

    let outside = dir.join("outside.safetensors");
    rewrite(&src, &outside, |t| t.push(("model.diffusion_model.out.0.weight".into(), safetensors::Dtype::F32, vec![1], vec![0; 4])));
    let e = ControlNet::load(&outside, &dev).unwrap_err().to_string();
    assert!(e.contains("model.diffusion_model.out.0.weight"), "{e}");
}

#[test]
fn the_family_of_a_file_without_config_comes_from_its_tensors() {
    let dev = Device::flex();
    let dir = scratch("family");
    // The tiny nets are no family's default architecture: without their sidecar config the
    // detection says what it found.
    let sd15 = copy_single("sd15", &dir, false);
    let e = ControlNet::load(&sd15, &dev).unwrap_err().to_string();
    assert!(e.contains("family not recognised") && e.contains("32") && e.contains(".json"), "{e}");
    let sdxl = copy_single("sdxl", &dir, false);
    let e = ControlNet::load(&sdxl, &dev).unwrap_err().to_string();
    assert!(e.contains("SDXL") && e.contains("80"), "{e}");
    let sd2 = copy_single("sd2", &dir, false);
    let e = ControlNet::load(&sd2, &dev).unwrap_err().to_string();
    assert!(e.contains("family not recognised") && e.contains("48") && e.contains("Some(true)"), "{e}");
    // A width of 1024 is SD2 (linear projections): the embedded SD2 default config is used, and
    // the tiny weights then fail against it.
    let wide2 = dir.join("wide2.safetensors");
    rewrite(&sd2, &wide2, |t| {
        for (k, _, s, b) in t.iter_mut() {
            if k.ends_with("attn2.to_k.weight") {
                *s = vec![s[0], 1024];
                *b = vec![0; s[0] * 1024 * 4];
            }
        }
    });
    let e = ControlNet::load(&wide2, &dev).unwrap_err();
    assert!(matches!(e, ModelError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("wide2.safetensors"), "{e}");
    // A width of 768 with conv projections is SD1: the embedded SD1 default config is used, and
    // the tiny weights then fail against it, naming the first tensor that does not fit.
    let wide = dir.join("wide.safetensors");
    rewrite(&sd15, &wide, |t| {
        for (k, _, s, b) in t.iter_mut() {
            if k.ends_with("attn2.to_k.weight") {
                *s = vec![s[0], 768];
                *b = vec![0; s[0] * 768 * 4];
            }
        }
    });
    let e = ControlNet::load(&wide, &dev).unwrap_err();
    assert!(matches!(e, ModelError::ShapeMismatch { .. }), "{e}");
    assert!(e.to_string().contains("wide.safetensors"), "{e}");
    // A UNet is not a ControlNet.
    let e = ControlNet::load(&golden_dir().join("tiny_sd15/unet/diffusion_pytorch_model.safetensors"), &dev).unwrap_err().to_string();
    assert!(e.contains("is not a ControlNet"), "{e}");
}

#[test]
fn a_controlnet_for_another_model_does_not_fit() {
    let dev = Device::flex();
    let sdxl_net = ControlNet::load(&golden_dir().join("tiny_controlnet_sdxl"), &dev).unwrap();
    let sd_net = ControlNet::load(&golden_dir().join("tiny_controlnet_sd15"), &dev).unwrap();
    let sd_unet = stylealign::model::unet::UNetConfig::from_file(&golden_dir().join("tiny_sd15/unet/config.json")).unwrap();
    assert!(sd_net.check_fits(&sd_unet).is_ok());
    let e = sdxl_net.check_fits(&sd_unet).unwrap_err();
    assert!(e.contains("SDXL") && e.contains("SD1"), "{e}");
    let sd2_net = ControlNet::load(&golden_dir().join("tiny_controlnet_sd2"), &dev).unwrap();
    let sd2_unet = stylealign::model::unet::UNetConfig::from_file(&golden_dir().join("tiny_sd2/unet/config.json")).unwrap();
    assert!(sd2_net.check_fits(&sd2_unet).is_ok());
    let e = sd2_net.check_fits(&sd_unet).unwrap_err();
    assert!(e.contains("SD2") && e.contains("SD1"), "{e}");
    let e = sd_net.check_fits(&sd2_unet).unwrap_err();
    assert!(e.contains("SD1") && e.contains("SD2"), "{e}");

    let pipe = tiny_pipeline(&dev).unwrap();
    let mut set = plain_set(&["a", "b"], 1);
    set.controls.push(control(Arc::new(sd_net), vec![gradient(8, 8)], 1.0, 0.0, 1.0));
    match pipe.validate(&batch(SamplerKind::Ddim), &[set]) {
        Err(PipelineError::Invalid { field, message }) => assert_eq!(field, "controls[0].net", "{message}"),
        other => panic!("expected an invalid controls[0].net, got {other:?}"),
    }
}

fn plain_set(prompts: &[&str], seed: u64) -> SetSpec {
    SetSpec {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: String::new(),
        seed,
        reference: None,
        controls: Vec::new(),
        ..Default::default()
    }
}

fn control(net: Arc<ControlNet>, images: Vec<Image>, scale: f32, start: f32, end: f32) -> ControlSpec {
    ControlSpec { net, images, conditioning_scale: scale, start, end }
}

/// A control image: a diagonal gradient with a bright square (any size; it is fitted).
fn gradient(w: usize, h: usize) -> Image {
    let mut im = Image::filled(w, h, [0, 0, 0]);
    for y in 0..h {
        for x in 0..w {
            let v = ((x + y) * 255 / (w + h)) as u8;
            im.put(x, y, [v, 255 - v, (x * 255 / w) as u8]);
        }
    }
    im.fill_rect(w / 4, h / 4, w / 3, h / 3, [255, 255, 255]);
    im
}

fn batch(sampler: SamplerKind) -> BatchSpec {
    BatchSpec::patched(32, 5, 7.5, sampler)
}

fn run(pipe: &stylealign::pipeline::Pipeline, b: &BatchSpec, sets: &[SetSpec]) -> Vec<Vec<Image>> {
    pipe.validate(b, sets).unwrap();
    pipe.generate(b, sets, &mut |_, _| vec![true; sets.len()]).unwrap().into_iter().map(|s| s.unwrap()).collect()
}

/// The reference image is the plain model's; the targets change; a window that never opens and a
/// zero scale change nothing; two ControlNets add up (a net used twice at half scale equals once
/// at full scale, up to rounding).
#[test]
fn control_acts_on_targets_only_within_its_window() {
    let dev = Device::flex();
    let pipe = tiny_pipeline(&dev).unwrap();
    let net = Arc::new(tiny_controlnet(&dev).unwrap());
    let b = batch(SamplerKind::Ddim);
    let prompts = ["a lighthouse, linocut", "a fox, linocut", "a boat, linocut"];
    let plain = run(&pipe, &b, &[plain_set(&prompts, 5)]).remove(0);
    let with = |controls: Vec<ControlSpec>| {
        let mut s = plain_set(&prompts, 5);
        s.controls = controls;
        run(&pipe, &b, &[s]).remove(0)
    };
    let images = vec![gradient(40, 24), gradient(16, 16)];
    let controlled = with(vec![control(net.clone(), images.clone(), 1.0, 0.0, 1.0)]);
    assert_eq!(controlled[0], plain[0], "the reference row gets no control");
    assert_ne!(controlled[1], plain[1], "a target follows its control");
    assert_ne!(controlled[2], plain[2], "a target follows its control");
    // 5 steps, window [0, 0.1]: (i + 1) / 5 > 0.1 at every step, so it never acts.
    assert_eq!(with(vec![control(net.clone(), images.clone(), 1.0, 0.0, 0.1)]), plain, "a window that never opens");
    assert_eq!(with(vec![control(net.clone(), images.clone(), 0.0, 0.0, 1.0)]), plain, "scale 0");
    let narrow = with(vec![control(net.clone(), images.clone(), 1.0, 0.4, 1.0)]);
    assert_ne!(narrow, controlled, "a window [0.4, 1] acts on fewer steps");
    assert_eq!(narrow[0], plain[0]);
    // One image for all targets equals that image given per target.
    let one = with(vec![control(net.clone(), vec![images[1].clone()], 1.0, 0.0, 1.0)]);
    let each = with(vec![control(net.clone(), vec![images[1].clone(), images[1].clone()], 1.0, 0.0, 1.0)]);
    assert_eq!(one, each);
}

/// Sets with and without ControlNets (the same net in two sets, at different scales and windows)
/// share a batch, and each set's images equal those it gets alone, for every sampler.
#[test]
fn controlled_and_plain_sets_batched_equal_running_alone() {
    let dev = Device::flex();
    let pipe = tiny_pipeline(&dev).unwrap();
    let net = Arc::new(tiny_controlnet(&dev).unwrap());
    let other = Arc::new(tiny_controlnet(&dev).unwrap());
    let mut a = plain_set(&["a lighthouse, linocut", "a fox, linocut", "a boat, linocut"], 21);
    a.controls.push(control(net.clone(), vec![gradient(32, 32), gradient(20, 36)], 1.0, 0.0, 1.0));
    let b_set = plain_set(&["a tree, watercolor", "a house, watercolor"], 22);
    let mut c = plain_set(&["a cat, ink", "a dog, ink"], 23);
    c.controls.push(control(net.clone(), vec![gradient(64, 48)], 0.7, 0.2, 0.8));
    c.controls.push(control(other, vec![gradient(32, 32)], 0.5, 0.0, 0.6));
    let sets = [a, b_set, c];
    for sampler in [SamplerKind::Ddim, SamplerKind::EulerAncestral, SamplerKind::DpmPp2m] {
        let b = batch(sampler);
        let together = run(&pipe, &b, &sets);
        for (k, s) in sets.iter().enumerate() {
            let alone = run(&pipe, &b, std::slice::from_ref(s)).remove(0);
            assert!(alone == together[k], "{sampler:?}: set {k} batched differs from running alone");
        }
    }
}

/// Sets with ControlNets and different LoRAs share a batch and get the images they get alone: the
/// LoRAs act on the UNet only (the ControlNet, with the UNet's layer names, never sees them).
#[test]
fn controlled_sets_with_different_loras_batched_equal_running_alone() {
    use stylealign::model::lora::{LoraFormat, synthetic_file};
    let dev = Device::flex();
    let pipe = tiny_pipeline(&dev).unwrap();
    let net = Arc::new(tiny_controlnet(&dev).unwrap());
    let dir = scratch("loras");
    let mut loras = Vec::new();
    for (k, format) in [LoraFormat::Kohya, LoraFormat::Peft].into_iter().enumerate() {
        let path = dir.join(format!("l{k}.safetensors"));
        std::fs::write(&path, synthetic_file(&pipe.lora_targets(), format, 60 + k as u64, 4, 1.0)).unwrap();
        loras.push(Arc::new(pipe.load_lora(&format!("l{k}"), &path).unwrap()));
    }
    let mut a = plain_set(&["a lighthouse, linocut", "a fox, linocut"], 31);
    a.controls.push(control(net.clone(), vec![gradient(32, 32)], 1.0, 0.0, 1.0));
    a.loras = vec![(loras[0].clone(), 0.9)];
    let mut b_set = plain_set(&["a tree, watercolor", "a house, watercolor"], 32);
    b_set.controls.push(control(net.clone(), vec![gradient(20, 36)], 0.6, 0.2, 1.0));
    b_set.loras = vec![(loras[1].clone(), -0.7)];
    let c = plain_set(&["a cat, ink", "a dog, ink"], 33);
    let sets = [a.clone(), b_set, c];
    let b = batch(SamplerKind::Ddim);
    let together = run(&pipe, &b, &sets);
    for (k, s) in sets.iter().enumerate() {
        let alone = run(&pipe, &b, std::slice::from_ref(s)).remove(0);
        assert!(alone == together[k], "set {k} batched differs from running alone");
    }
    a.loras.clear();
    assert_ne!(run(&pipe, &b, &[a]).remove(0), together[0], "the LoRA changes the controlled set");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_controls_name_the_field() {
    let dev = Device::flex();
    let pipe = tiny_pipeline(&dev).unwrap();
    let net = Arc::new(tiny_controlnet(&dev).unwrap());
    let b = batch(SamplerKind::Ddim);
    let check = |c: ControlSpec, want: &str| {
        let mut s = plain_set(&["a", "b", "c"], 1);
        s.controls.push(c);
        match pipe.validate(&b, &[s]) {
            Err(PipelineError::Invalid { field, message }) => {
                assert_eq!(field, want, "{message}");
                message
            }
            other => panic!("expected {want} to be refused, got {other:?}"),
        }
    };
    let m = check(control(net.clone(), vec![gradient(8, 8); 3], 1.0, 0.0, 1.0), "controls[0].images");
    assert!(m.contains("3 images for 2 targets"), "{m}");
    check(control(net.clone(), vec![], 1.0, 0.0, 1.0), "controls[0].images");
    check(control(net.clone(), vec![Image { width: 2, height: 2, rgb: vec![0; 5] }], 1.0, 0.0, 1.0), "controls[0].images");
    check(control(net.clone(), vec![gradient(8, 8)], f32::NAN, 0.0, 1.0), "controls[0].conditioning_scale");
    check(control(net.clone(), vec![gradient(8, 8)], 1.0, 0.5, 0.5), "controls[0].start");
    check(control(net.clone(), vec![gradient(8, 8)], 1.0, -0.1, 1.0), "controls[0].start");
    check(control(net.clone(), vec![gradient(8, 8)], 1.0, 0.0, 1.5), "controls[0].start");
    // generate() checks too: no panic on a request that skipped validate().
    let mut s = plain_set(&["a", "b", "c"], 1);
    s.controls.push(control(net, vec![gradient(8, 8); 3], 1.0, 0.0, 1.0));
    assert!(matches!(pipe.generate(&b, &[s], &mut |_, _| vec![true]), Err(PipelineError::Invalid { .. })));
}

/// A controlled set cancelled after step 2 of 5 leaves its batch mates (one controlled by the same
/// net, one plain) exactly as they are alone.
#[test]
fn a_controlled_set_cancelled_mid_run_leaves_its_batch_mates_unchanged() {
    let dev = Device::flex();
    let pipe = tiny_pipeline(&dev).unwrap();
    let net = Arc::new(tiny_controlnet(&dev).unwrap());
    let mut kept = plain_set(&["a lighthouse, linocut", "a fox, linocut"], 31);
    kept.controls.push(control(net.clone(), vec![gradient(32, 32)], 0.9, 0.0, 1.0));
    let plain = plain_set(&["a tree, watercolor", "a house, watercolor"], 32);
    let mut cancelled = plain_set(&["a cat, ink", "a dog, ink", "a bird, ink"], 33);
    cancelled.controls.push(control(net, vec![gradient(24, 40), gradient(40, 24)], 1.2, 0.0, 1.0));
    for sampler in [SamplerKind::Ddim, SamplerKind::DpmPp2m] {
        let b = batch(sampler);
        let all = [kept.clone(), cancelled.clone(), plain.clone()];
        let out = pipe.generate(&b, &all, &mut |step, _| vec![true, step < 2, true]).unwrap();
        assert!(out[1].is_none(), "{sampler:?}: the cancelled set returns nothing");
        for (k, s) in [(0, &kept), (2, &plain)] {
            let alone = run(&pipe, &b, std::slice::from_ref(s)).remove(0);
            assert!(out[k].as_ref() == Some(&alone), "{sampler:?}: set {k} differs from running alone");
        }
    }
}

/// Inputs of the wrong shape are errors naming the input, for the ControlNet and for the UNet's
/// residuals.
#[test]
fn misshapen_inputs_and_residuals_name_the_input() {
    use burn::tensor::{Distribution, Tensor};
    use stylealign::model::unet::{NoHooks, UNet};
    let dev = Device::flex();
    let net = ControlNet::load(&golden_dir().join("tiny_controlnet_sd15"), &dev).unwrap();
    let unet = UNet::load(&golden_dir().join("tiny_sd15/unet"), &dev).unwrap();
    let sample = Tensor::<4>::random([2, 4, 8, 8], Distribution::Default, &dev);
    let ts = Tensor::<1>::from_floats([500.0, 500.0], &dev);
    let ehs = Tensor::<3>::random([2, 5, 32], Distribution::Default, &dev);
    let field = |e: ModelError| match e {
        ModelError::Input { field, .. } => field,
        other => panic!("expected an input error, got {other}"),
    };
    let cond = |h: usize, w: usize| Tensor::<4>::random([2, 3, h, w], Distribution::Default, &dev);
    let e = net.forward(sample.clone(), ts.clone(), &ehs, None, cond(8, 8), 1.0).unwrap_err();
    assert_eq!(field(e), "controlnet_cond");
    let e = net.forward_scaled(sample.clone(), ts.clone(), &ehs, None, cond(16, 16), &[1.0, 0.5, 0.2]).unwrap_err();
    assert_eq!(field(e), "conditioning_scale");
    let r = net.forward(sample.clone(), ts.clone(), &ehs, None, cond(16, 16), 1.0).unwrap();
    assert!(unet.forward_with_residuals(sample.clone(), ts.clone(), &ehs, None, &NoHooks, Some(&r)).is_ok());
    let mut short = r.clone();
    short.down.pop();
    let e = unet.forward_with_residuals(sample.clone(), ts.clone(), &ehs, None, &NoHooks, Some(&short)).unwrap_err();
    assert_eq!(field(e), "down_block_additional_residuals");
    let mut wrong = r.clone();
    wrong.mid = wrong.mid.narrow(0, 0, 1);
    let e = unet.forward_with_residuals(sample, ts, &ehs, None, &NoHooks, Some(&wrong)).unwrap_err();
    assert_eq!(field(e), "mid_block_additional_residual");
}

/// The admission helper's residual size is what a ControlNet returns.
#[test]
fn residual_bytes_match_the_residuals() {
    use burn::tensor::{Distribution, Tensor};
    let dev = Device::flex();
    for (net, unet) in [
        ("tiny_controlnet_sd15", "tiny_sd15/unet"),
        ("tiny_controlnet_sd2", "tiny_sd2/unet"),
        ("tiny_controlnet_sdxl", "tiny_sdxl_pipe/unet"),
    ] {
        let net = ControlNet::load(&golden_dir().join(net), &dev).unwrap();
        let cfg = stylealign::model::unet::UNetConfig::from_file(&golden_dir().join(unet).join("config.json")).unwrap();
        let (b, h, w) = (3, 8, 16);
        let f = net.config.hint_factor();
        let tt = cfg.text_time.map(|_| stylealign::model::unet::TextTime {
            text_embeds: Tensor::random([b, cfg.text_embeds_dim().unwrap()], Distribution::Default, &dev),
            time_ids: Tensor::random([b, 6], Distribution::Default, &dev),
        });
        let r = net
            .forward(
                Tensor::random([b, 4, h, w], Distribution::Default, &dev),
                Tensor::from_floats([10.0, 20.0, 30.0], &dev),
                &Tensor::random([b, 7, cfg.cross_attention_dim[0]], Distribution::Default, &dev),
                tt.as_ref(),
                Tensor::random([b, 3, h * f, w * f], Distribution::Default, &dev),
                1.0,
            )
            .unwrap();
        let elems: usize = r.down.iter().chain([&r.mid]).map(|t| t.dims().iter().product::<usize>()).sum();
        assert_eq!(stylealign::pipeline::control::residual_bytes(&cfg, b, h, w), (elems * 4) as u64);
    }
}
