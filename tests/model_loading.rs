//! Config parsing and weight loading errors, and the fp16 weight variant.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};
use common::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use stylealign::model::ModelError;
use stylealign::model::config::RawConfig;
use stylealign::model::unet::{NoHooks, UNet, UNetConfig};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stylealign-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("unet")).unwrap();
    d
}

fn tiny_unet_dir() -> PathBuf {
    golden_dir().join("tiny_sd15/unet")
}

fn unet_config_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(tiny_unet_dir().join("config.json")).unwrap()).unwrap()
}

fn config_error(edit: impl FnOnce(&mut serde_json::Value)) -> ModelError {
    let mut v = unet_config_json();
    edit(&mut v);
    let raw = RawConfig::parse(Path::new("unet/config.json"), &v.to_string()).unwrap();
    UNetConfig::from_raw(&raw).expect_err("config should be rejected")
}

fn field_of(e: &ModelError) -> &str {
    match e {
        ModelError::Config { field, .. } => field,
        other => panic!("expected a config error, got {other}"),
    }
}

#[test]
fn unsupported_configs_name_the_field() {
    let e = config_error(|v| v["down_block_types"][0] = "SimpleCrossAttnDownBlock2D".into());
    assert_eq!(field_of(&e), "down_block_types");
    assert!(e.to_string().contains("SimpleCrossAttnDownBlock2D"), "{e}");
    assert_eq!(field_of(&config_error(|v| v["attention_head_dim"] = serde_json::json!([2, 2]))), "attention_head_dim");
    assert_eq!(field_of(&config_error(|v| v["class_embed_type"] = "timestep".into())), "class_embed_type");
    assert_eq!(field_of(&config_error(|v| v["addition_embed_type"] = "text".into())), "addition_embed_type");
    assert_eq!(field_of(&config_error(|v| v["norm_num_groups"] = 5.into())), "norm_num_groups");
    assert_eq!(field_of(&config_error(|v| v["time_embedding_type"] = "fourier".into())), "time_embedding_type");
    assert_eq!(
        field_of(&config_error(|v| v["transformer_layers_per_block"] = serde_json::json!([[1], [1], [1]]))),
        "transformer_layers_per_block"
    );
    assert_eq!(
        field_of(&config_error(|v| {
            v.as_object_mut().unwrap().remove("block_out_channels");
        })),
        "block_out_channels"
    );
    assert_eq!(field_of(&config_error(|v| v["layers_per_block"] = "two".into())), "layers_per_block");
}

#[test]
fn supported_configs_parse() {
    let sd15 = UNetConfig::from_file(&tiny_unet_dir().join("config.json")).unwrap();
    assert_eq!(sd15.num_attention_heads, vec![2, 2, 2]);
    assert!(!sd15.use_linear_projection && sd15.text_time.is_none());
    let sdxl = UNetConfig::from_file(&golden_dir().join("tiny_sdxl/unet/config.json")).unwrap();
    assert_eq!(sdxl.transformer_layers_per_block, vec![1, 2]);
    assert_eq!(sdxl.text_time, Some((8, 80)));
    assert_eq!(sdxl.text_embeds_dim(), Some(32));
}

/// Rewrites the tiny UNet's weights with `edit` applied to the tensor map, into `dir/unet`.
fn rewrite_weights(dir: &Path, file_name: &str, edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    std::fs::copy(tiny_unet_dir().join("config.json"), dir.join("unet/config.json")).unwrap();
    let bytes = std::fs::read(tiny_unet_dir().join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    edit(&mut map);
    let views: Vec<(String, TensorView)> =
        map.iter().map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("unet").join(file_name)).unwrap();
}

fn load_err(dir: &Path) -> String {
    let e = UNet::load(&dir.join("unet"), &device()).expect_err("load should fail");
    e.to_string()
}

#[test]
fn missing_tensor_names_key_and_shape() {
    let dir = scratch("missing");
    rewrite_weights(&dir, "diffusion_pytorch_model.safetensors", |m| {
        m.remove("mid_block.attentions.0.proj_in.weight");
    });
    let e = load_err(&dir);
    assert!(e.contains("missing tensor `mid_block.attentions.0.proj_in.weight`") && e.contains("[32, 32, 1, 1]"), "{e}");
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let dir = scratch("shape");
    rewrite_weights(&dir, "diffusion_pytorch_model.safetensors", |m| {
        let t = m.get_mut("conv_in.bias").unwrap();
        t.1 = vec![8];
        t.2.truncate(8 * 4);
    });
    let e = load_err(&dir);
    assert!(e.contains("`conv_in.bias` has shape [8], the config expects [16]"), "{e}");
}

#[test]
fn extra_tensor_is_reported() {
    let dir = scratch("extra");
    rewrite_weights(&dir, "diffusion_pytorch_model.safetensors", |m| {
        m.insert("class_embedding.linear_1.weight".into(), (Dtype::F32, vec![2, 2], vec![0u8; 16]));
    });
    let e = load_err(&dir);
    assert!(e.contains("class_embedding.linear_1.weight [2, 2]") && e.contains("not used"), "{e}");
}

#[test]
fn missing_weight_file_and_bad_header() {
    let dir = scratch("nofile");
    std::fs::copy(tiny_unet_dir().join("config.json"), dir.join("unet/config.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("no weight file") && e.contains("diffusion_pytorch_model.fp16.safetensors"), "{e}");
    std::fs::write(dir.join("unet/diffusion_pytorch_model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("not a safetensors file"), "{e}");
}

#[test]
fn fp16_variant_loads_and_matches_f32() {
    let dir = scratch("fp16");
    rewrite_weights(&dir, "diffusion_pytorch_model.fp16.safetensors", |m| {
        for (d, _, b) in m.values_mut() {
            *b = b.chunks_exact(4).flat_map(|c| half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()).collect();
            *d = Dtype::F16;
        }
    });
    let dev = device();
    let fp16 = UNet::load(&dir.join("unet"), &dev).expect("fp16 variant loads");
    let f32m = UNet::load(&tiny_unet_dir(), &dev).unwrap();
    let g = Golden::read(&golden_dir().join("unet_sd15_cfg8_comfy.safetensors"));
    let sample: Tensor<4> = g.get("input.sample").tensor(&dev);
    let b = sample.dims()[0];
    let ts = Tensor::<1>::from_data(TensorData::new(vec![421.0f32; b], [b]), &dev);
    let ehs: Tensor<3> = g.get("input.encoder_hidden_states").tensor(&dev);
    let a = fp16.forward(sample.clone(), ts.clone(), &ehs, None, &NoHooks).unwrap();
    let want = g.get("out.unpatched");
    let err16 = max_abs_diff(a, want);
    let err32 = max_abs_diff(f32m.forward(sample, ts, &ehs, None, &NoHooks).unwrap(), want);
    // Weights rounded to f16 (11-bit mantissa) move the output by ~1e-3; f32 stays at the noise floor.
    assert!(err16 < 2e-2 && err16 > err32, "fp16 {err16:.3e}, f32 {err32:.3e}");
}
