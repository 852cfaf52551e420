//! Single-file checkpoints through the gRPC service: a `--models-dir` holding a diffusers folder
//! and the same model as one original-layout `.safetensors` file (with its `<stem>.json`
//! sidecar) serves both; ListModels reports format, dtype, prediction type and the file's A1111
//! hash; the folder and the file give bit-identical images.
//!
//! The model is the embedded one written as a diffusers folder (its text encoder has CLIP's full
//! vocabulary, so prompts go through the API), then converted to the original layout with the
//! key rules of `stylealign::model::single_file` (those rules are checked against diffusers'
//! own `from_single_file` by the `single_file` parity goldens).

mod service_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use service_common::*;
use sha2::{Digest, Sha256};
use stylealign::client::Identity;
use stylealign::model::single_file::{unet_key, vae_key};
use stylealign::model::unet::UNetConfig;
use stylealign::model::vae::VaeConfig;
use stylealign::pipeline::image::Image;
use stylealign::serve::config::models_dir;
use stylealign::serve::pb;

const LIMIT: Duration = Duration::from_secs(240);

type Item = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

fn read_items(path: &Path) -> Vec<Item> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Writes the diffusers folder `dir/tiny-folder` and `dir/tiny-single.safetensors` (+ `.json`).
fn write_models(dir: &Path) -> (PathBuf, PathBuf) {
    let folder = dir.join("tiny-folder");
    stylealign::pipeline::tiny::write_diffusers_folder(&folder, &burn::tensor::Device::flex()).unwrap();
    let unet_cfg = UNetConfig::from_file(&folder.join("unet/config.json")).unwrap();
    let vae_cfg = VaeConfig::from_file(&folder.join("vae/config.json")).unwrap();
    let mut items = Vec::new();
    for (k, d, s, b) in read_items(&folder.join("unet/diffusion_pytorch_model.safetensors")) {
        items.push((format!("model.diffusion_model.{}", unet_key(&k, &unet_cfg)), d, s, b));
    }
    for (k, d, mut s, b) in read_items(&folder.join("vae/diffusion_pytorch_model.safetensors")) {
        let name = vae_key(&k, &vae_cfg);
        // The original VAE's mid attention is 1×1 convolutions.
        if name.contains("mid.attn_1.") && !name.contains(".norm.") && s.len() == 2 {
            s.extend([1, 1]);
        }
        items.push((format!("first_stage_model.{name}"), d, s, b));
    }
    for (k, d, s, b) in read_items(&folder.join("text_encoder/model.safetensors")) {
        items.push((format!("cond_stage_model.transformer.{k}"), d, s, b));
    }
    let views: Vec<(String, TensorView)> =
        items.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let file = dir.join("tiny-single.safetensors");
    std::fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    let sidecar = serde_json::json!({
        "unet": json(&folder.join("unet/config.json")),
        "vae": json(&folder.join("vae/config.json")),
        "text_encoder": json(&folder.join("text_encoder/config.json")),
        "scheduler": json(&folder.join("scheduler/scheduler_config.json")),
    });
    std::fs::write(file.with_extension("json"), sidecar.to_string()).unwrap();
    (folder, file)
}

fn pixels(png: &[u8]) -> Vec<u8> {
    Image::from_png(png).unwrap().0.rgb
}

#[test]
fn a_models_dir_serves_folders_and_single_files_alike() {
    run(LIMIT, || async {
        let dir = std::env::temp_dir().join(format!("stylealign-models-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (_folder, file) = write_models(&dir);
        std::fs::write(dir.join("notes.txt"), "not a model").unwrap();
        let models = models_dir(&dir).unwrap();
        assert_eq!(models.len(), 2, "the folder and the file (not the sidecar, not the notes): {models:?}");
        let cfg = stylealign::serve::ServeConfig { models, warmup: false, ..test_config() };
        let server = start(cfg).await;
        let mut c = connect(&server).await;
        let me = Identity::client("single");
        let list = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner().models;
        let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["tiny-folder", "tiny-single"]);
        let (f, s) = (&list[0], &list[1]);
        assert_eq!((f.format.as_str(), f.dtype.as_str(), f.prediction_type.as_str()), ("diffusers", "fp32", "epsilon"));
        assert_eq!(f.prediction_type_source, "config");
        assert_eq!((s.format.as_str(), s.dtype.as_str(), s.prediction_type.as_str()), ("single_file", "fp32", "epsilon"));
        assert_eq!((s.prediction_type_source.as_str(), s.ema), ("sidecar", false));
        let sha: String = Sha256::digest(std::fs::read(&file).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s.hash, sha[..10], "A1111's short hash of a single file: its whole SHA-256");
        assert_eq!(s.source, file.display().to_string());
        assert_eq!((s.family, s.native_width, s.size_multiple), (f.family, f.native_width, f.size_multiple));

        // The same request on both models: the same pixels.
        let mut images = Vec::new();
        for model in ["tiny-folder", "tiny-single"] {
            let sid = session(&mut c, &me, pb::PatchModelRequest { model: model.into(), ..Default::default() }).await;
            let r = generate(&mut c, &me, request(&sid, &["a red house", "a blue car"], 32, 3, 11)).await.unwrap();
            images.push(r.images.iter().map(|i| pixels(&i.png)).collect::<Vec<_>>());
        }
        assert_eq!(images[0].len(), 2);
        assert!(images[0] == images[1], "folder and single file differ");
        assert_ne!(images[0][0], images[0][1], "two prompts, two images");
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn models_dir_refuses_pickles_and_empty_folders() {
    let dir = std::env::temp_dir().join(format!("stylealign-models-dir-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    assert!(models_dir(&dir).unwrap().is_empty());
    std::fs::write(dir.join("old.ckpt"), "x").unwrap();
    let e = models_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("old.ckpt") && e.contains("pickle") && e.contains("safetensors"), "{e}");
    assert!(models_dir(&dir.join("missing")).unwrap_err().to_string().contains("--models-dir"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `stylealign serve` refuses what it cannot serve at startup, naming the file and the reason.
#[test]
fn serve_refuses_bad_single_files_by_name() {
    let dir = std::env::temp_dir().join(format!("stylealign-serve-single-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let serve = |extra: &[&str]| {
        let o = stylealign_command()
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"])
            .args(extra)
            .env_remove("STYLEALIGN_MODEL")
            .output()
            .expect("run stylealign serve");
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let ckpt = dir.join("v1-5-pruned.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let err = serve(&["--model", ckpt.to_str().unwrap()]);
    assert!(err.contains("v1-5-pruned.ckpt") && err.contains("pickle") && err.contains("v1-5-pruned.safetensors"), "{err}");
    let err = serve(&["--models-dir", dir.to_str().unwrap()]);
    assert!(err.contains("--models-dir") && err.contains("v1-5-pruned.ckpt"), "{err}");
    std::fs::remove_file(&ckpt).unwrap();
    // The tiny SD2 file without its sidecar: the family is not recognised.
    let bare = dir.join("tiny-sd2.safetensors");
    std::fs::copy(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens/tiny_single/sd2.safetensors"), &bare).unwrap();
    let err = serve(&["--models-dir", dir.to_str().unwrap()]);
    assert!(err.contains("tiny-sd2.safetensors") && err.contains("family not recognised"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// ListModels says where a single file's prediction type comes from: its sidecar, else the
/// server's `--prediction-type`.
#[test]
fn list_models_reports_the_prediction_type_and_its_source() {
    run(LIMIT, || async {
        let dir = std::env::temp_dir().join(format!("stylealign-prediction-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let goldens = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens/tiny_single");
        let file = dir.join("sd2-noname.safetensors");
        std::fs::copy(goldens.join("sd2.safetensors"), &file).unwrap();
        let mut side = json(&goldens.join("sd2.json"));
        side["scheduler"].as_object_mut().unwrap().remove("prediction_type");
        std::fs::write(file.with_extension("json"), side.to_string()).unwrap();
        let sd15 = goldens.join("sd15.safetensors");
        let cfg = stylealign::serve::ServeConfig {
            models: vec![stylealign::serve::ModelSource::File(file.clone()), stylealign::serve::ModelSource::File(sd15)],
            single_file: stylealign::pipeline::single_file::SingleFileOptions {
                prediction_type: Some(stylealign::sampling::schedule::Prediction::VPrediction),
                vae: None,
            },
            controlnets: Vec::new(),
            warmup: false,
            ..test_config()
        };
        let server = start(cfg).await;
        let mut c = connect(&server).await;
        let me = Identity::client("prediction");
        let list = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner().models;
        let by: std::collections::BTreeMap<&str, &pb::ModelInfo> = list.iter().map(|m| (m.name.as_str(), m)).collect();
        let m = by["sd2-noname"];
        assert_eq!((m.prediction_type.as_str(), m.prediction_type_source.as_str()), ("v_prediction", "option"));
        assert_eq!((m.format.as_str(), m.dtype.as_str(), m.family), ("single_file", "fp16", pb::Family::Sd2 as i32));
        let m = by["sd15"];
        assert_eq!((m.prediction_type.as_str(), m.prediction_type_source.as_str()), ("epsilon", "sidecar"));
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}
