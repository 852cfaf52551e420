//! PNG metadata through the gRPC service: the `parameters` chunk is an AUTOMATIC1111 infotext
//! that A1111's parser reads back field by field (prompts with commas, quotes, colons and
//! newlines included); the `stylealign` chunk is our reproduction JSON; ListModels reports each
//! model's A1111 short hash (the first 10 hex digits of the SHA-256 of the UNet weights file).

mod service_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;
use service_common::*;
use sha2::{Digest, Sha256};
use stylealign::client::Identity;
use stylealign::pipeline::image::Image;
use stylealign::serve::{ModelSource, pb};

const LIMIT: Duration = Duration::from_secs(240);

/// AUTOMATIC1111's `parse_generation_parameters` (modules/infotext_utils.py), written here from
/// its documented behaviour: the last line holds the `key: value` pairs if the parameter regex
/// finds at least 3 of them there; the lines before it are the prompt until a line starting with
/// `Negative prompt:`, then the negative prompt (each line stripped, joined with newlines);
/// a value in double quotes is unquoted as JSON; `WxH` values become `key-1` and `key-2`.
fn parse_generation_parameters(x: &str) -> BTreeMap<String, String> {
    let re_param = Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).unwrap();
    let re_imagesize = Regex::new(r"^(\d+)x(\d+)$").unwrap();
    let mut res = BTreeMap::new();
    let (mut prompt, mut negative_prompt) = (String::new(), String::new());
    let mut done_with_prompt = false;
    let mut lines: Vec<&str> = x.trim().split('\n').collect();
    let mut lastline = lines.pop().unwrap_or("");
    if re_param.captures_iter(lastline).count() < 3 {
        lines.push(lastline);
        lastline = "";
    }
    for line in lines {
        let mut line = line.trim();
        if line.starts_with("Negative prompt:") {
            done_with_prompt = true;
            line = line["Negative prompt:".len()..].trim();
        }
        let target = if done_with_prompt { &mut negative_prompt } else { &mut prompt };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    for c in re_param.captures_iter(lastline) {
        let (k, mut v) = (c[1].to_string(), c[2].to_string());
        if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
            v = serde_json::from_str::<String>(&v).unwrap_or_else(|e| panic!("A1111 would fail to unquote {v}: {e}"));
        }
        if let Some(m) = re_imagesize.captures(&v) {
            res.insert(format!("{k}-1"), m[1].to_string());
            res.insert(format!("{k}-2"), m[2].to_string());
        } else {
            res.insert(k, v);
        }
    }
    res.insert("Prompt".into(), prompt);
    res.insert("Negative prompt".into(), negative_prompt);
    res
}

fn chunks(png: &[u8]) -> BTreeMap<String, String> {
    Image::from_png(png).unwrap().1.into_iter().collect()
}

fn sha256_hex(path: &Path) -> String {
    Sha256::digest(std::fs::read(path).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

fn golden_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens/tiny_sd15")
}

/// Copies a diffusers folder, renaming the UNet weights to the `.fp16.safetensors` variant.
fn fp16_variant_copy(src: &Path) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("stylealign-hash-{}/tiny_fp16name", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    for part in ["text_encoder", "unet", "vae", "scheduler"] {
        std::fs::create_dir_all(dst.join(part)).unwrap();
        for e in std::fs::read_dir(src.join(part)).unwrap() {
            let e = e.unwrap();
            let name =
                e.file_name().to_string_lossy().replace("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors");
            std::fs::copy(e.path(), dst.join(part).join(name)).unwrap();
        }
    }
    dst
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// ListModels reports the short hash of each model's UNet weights file (also of the
/// `.fp16.safetensors` variant), the embedded model's hash is fixed, and images record the hash.
#[test]
fn list_models_reports_the_unet_file_hash() {
    run(LIMIT, || async {
        let folder = golden_model();
        let fp16 = fp16_variant_copy(&folder);
        let cfg = stylealign::serve::ServeConfig {
            models: vec![ModelSource::Tiny, ModelSource::Dir(folder.clone()), ModelSource::Dir(fp16.clone())],
            warmup: false,
            ..test_config()
        };
        let server = start(cfg).await;
        let mut c = connect(&server).await;
        let me = Identity::client("hash");
        let models = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner().models;
        let by_name: BTreeMap<&str, &pb::ModelInfo> = models.iter().map(|m| (m.name.as_str(), m)).collect();
        let want = sha256_hex(&folder.join("unet/diffusion_pytorch_model.safetensors"));
        assert_eq!(by_name["tiny_sd15"].hash, want[..10], "folder model: first 10 hex digits of the UNet file's SHA-256");
        assert_eq!(by_name["tiny_fp16name"].hash, sha256_hex(&fp16.join("unet/diffusion_pytorch_model.fp16.safetensors"))[..10]);
        let tiny = by_name["tiny"].hash.clone();
        assert!(is_hex(&tiny, 10), "embedded model hash: {tiny:?}");
        assert_ne!(tiny, by_name["tiny_sd15"].hash);

        // Images carry it: `Model hash` in the infotext, the full SHA-256 in the JSON. (The
        // folder model is a test UNet with a 1000-token vocabulary: it cannot encode prompts.)
        let s = session(&mut c, &me, default_patch()).await;
        let r = generate(&mut c, &me, request(&s, &["a cat", "a dog"], 32, 2, 5)).await.unwrap();
        let t = chunks(&r.images[1].png);
        let info = parse_generation_parameters(&t["parameters"]);
        assert_eq!((info["Model hash"].as_str(), info["Model"].as_str()), (tiny.as_str(), "tiny"));
        let json: serde_json::Value = serde_json::from_str(&t["stylealign"]).unwrap();
        let sha = json["model_sha256"].as_str().unwrap();
        assert!(is_hex(sha, 64) && sha.starts_with(&tiny), "{sha}");
        server.shutdown().await;

        // The embedded model's hash is deterministic: a new server reports the same.
        let server = start(stylealign::serve::ServeConfig { warmup: false, ..test_config() }).await;
        let mut c = connect(&server).await;
        let again = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner().models;
        assert_eq!(again[0].hash, tiny);
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(fp16.parent().unwrap());
    });
}

/// Every field of the infotext reads back through A1111's parser, for prompts with commas,
/// quotes, colons and newlines, every sampler name, node and official options, and a real
/// reference image; the `stylealign` chunk is the message's reproduction JSON.
#[test]
fn infotext_reads_back_with_a1111_parser() {
    run(LIMIT, || async {
        let server = start(stylealign::serve::ServeConfig { warmup: false, ..test_config() }).await;
        let mut c = connect(&server).await;
        let me = Identity::client("infotext");
        let hash = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner().models[0].hash.clone();
        let patch = pb::PatchModelRequest {
            model: "tiny".into(),
            share_norm: pb::ShareNorm::Group as i32,
            share_attn: pb::ShareAttn::QKV as i32,
            scale: Some(0.8),
            advanced: None,
            ..Default::default()
        };
        let s = session(&mut c, &me, patch).await;
        let prompts = [
            "a lighthouse, linocut print",
            "a \"quoted\" fox: red, with \\ backslash",
            "first line\nsecond line, with: colon",
            "Steps: 3, Sampler: Euler, Seed: 1",
        ];
        let negative = "blurry, \"low\" quality\nwatermark: none";
        let samplers = [
            (pb::Sampler::Ddim, "DDIM"),
            (pb::Sampler::Euler, "Euler"),
            (pb::Sampler::EulerA, "Euler a"),
            (pb::Sampler::Dpmpp2m, "DPM++ 2M"),
            (pb::Sampler::Dpmpp2mKarras, "DPM++ 2M Karras"),
        ];
        for (i, (sampler, name)) in samplers.into_iter().enumerate() {
            let req = pb::GenerateRequest {
                sampler: sampler as i32,
                negative_prompt: if i == 0 { negative.into() } else { String::new() },
                guidance_scale: Some(if i == 0 { 6.0 } else { 7.5 }),
                ..request(&s, &prompts, 32, 2, 4242 + i as u64)
            };
            let r = generate(&mut c, &me, req).await.unwrap();
            for img in &r.images {
                let t = chunks(&img.png);
                let json: serde_json::Value = serde_json::from_str(&t["stylealign"]).unwrap();
                assert_eq!(
                    json,
                    serde_json::from_str::<serde_json::Value>(&img.parameters).unwrap(),
                    "the stylealign chunk is the message's parameters"
                );
                let p = parse_generation_parameters(&t["parameters"]);
                let idx = img.index as usize;
                let want: BTreeMap<&str, String> = [
                    ("Prompt", prompts[idx].to_string()),
                    ("Negative prompt", if i == 0 { negative.to_string() } else { String::new() }),
                    ("Steps", "2".into()),
                    ("Sampler", name.into()),
                    ("CFG scale", if i == 0 { "6.0".into() } else { "7.5".into() }),
                    ("Seed", (4242 + i).to_string()),
                    ("Size-1", "32".into()),
                    ("Size-2", "32".into()),
                    ("Model hash", hash.clone()),
                    ("Model", "tiny".into()),
                    ("StyleAligned flavour", "node".into()),
                    ("StyleAligned share_norm", "group".into()),
                    ("StyleAligned share_attn", "q+k+v".into()),
                    ("StyleAligned scale", "0.8".into()),
                    ("StyleAligned image index", idx.to_string()),
                    ("StyleAligned set size", "4".into()),
                    ("StyleAligned reference index", "0".into()),
                    ("Version", "stylealign 0.1.0".into()),
                ]
                .into_iter()
                .collect();
                let got: BTreeMap<&str, String> = p.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                assert_eq!(got, want, "image {idx} with {name}; infotext:\n{}", t["parameters"]);
            }
        }

        // Official options and a real reference image (its caption with commas and quotes).
        let adv = pb::OfficialArgs { adain_values: Some(true), shared_score_shift: Some(0.5), ..Default::default() };
        let s2 = session(&mut c, &me, pb::PatchModelRequest { model: "tiny".into(), advanced: Some(adv), ..Default::default() }).await;
        let picture = Image { width: 8, height: 8, rgb: (0..8 * 8 * 3).map(|i| (i * 5 % 256) as u8).collect() };
        let caption = "a harbour, \"watercolor\": soft";
        let req = pb::GenerateRequest {
            reference_image: picture.to_png(&[]),
            reference_caption: caption.into(),
            reference_offset: 1,
            ..request(&s2, &["a boat, at dusk"], 32, 2, 9)
        };
        let r = generate(&mut c, &me, req).await.unwrap();
        let t = chunks(&r.images[0].png);
        let p = parse_generation_parameters(&t["parameters"]);
        let json: serde_json::Value = serde_json::from_str(&t["stylealign"]).unwrap();
        assert_eq!(p["Prompt"], "a boat, at dusk");
        assert_eq!(p["StyleAligned flavour"], "official");
        for (k, v) in [
            ("adain_values", "true"),
            ("adain_queries", "true"),
            ("full_attention_share", "false"),
            ("shared_score_shift", "0.5"),
            ("shared_score_scale", "1.0"),
            ("only_self_level", "0.0"),
        ] {
            assert_eq!(p[&format!("StyleAligned {k}")], v, "{k}");
        }
        assert_eq!(p["StyleAligned reference caption"], caption);
        assert_eq!(p["StyleAligned reference offset"], "1");
        assert_eq!(p["StyleAligned reference CFG scale"], "2.0");
        assert_eq!(p["StyleAligned reference image sha256"], json["reference"]["image_sha256"].as_str().unwrap());
        assert!(!p.contains_key("StyleAligned reference index"), "with a reference image every prompt is a target");
        server.shutdown().await;
    });
}
