//! LoRAs through the gRPC API: ListLoras lists the LoRA folder with each file's family, format
//! and the models it fits; a session's LoRAs change its images, which equal the library's with
//! the same LoRAs; sessions with different LoRAs share one batch and get the images they get
//! alone; bad LoRAs (unknown, another family, malformed file, bad weight, over the cache budget)
//! are refused naming the field; the cache shares, evicts least recently used unheld LoRAs and
//! refuses what a running batch's LoRAs leave no room for.

mod service_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use service_common::*;
use stylealign::client::Identity;
use stylealign::model::lora::{LoraFormat, synthetic_file};
use stylealign::pipeline::tiny::tiny_pipeline;
use stylealign::pipeline::{BatchSpec, Image, SetSpec};
use stylealign::sampling::sampler::SamplerKind;
use stylealign::serve::config::ServeConfig;
use stylealign::serve::pb;
use tonic::Code;

fn device() -> burn::tensor::Device {
    stylealign::device::open(&stylealign::device::DeviceSpec::Cpu).unwrap()
}

/// A LoRA folder: two random LoRAs for the embedded model (kohya `ink`, PEFT `paper`), the SDXL
/// kohya fixture (`sdxl_style`), and a file that is not a LoRA (`broken`).
fn lora_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stylealign-test-{}-loras-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pipe = tiny_pipeline(&device()).unwrap();
    std::fs::write(dir.join("ink.safetensors"), synthetic_file(&pipe.lora_targets(), LoraFormat::Kohya, 1, 4, 1.0)).unwrap();
    std::fs::write(dir.join("paper.safetensors"), synthetic_file(&pipe.lora_targets(), LoraFormat::Peft, 2, 4, 1.0)).unwrap();
    let goldens = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens/loras");
    std::fs::copy(goldens.join("sdxl_kohya.safetensors"), dir.join("sdxl_style.safetensors")).unwrap();
    std::fs::write(dir.join("broken.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}").unwrap();
    dir
}

fn lora_config(dir: &Path) -> ServeConfig {
    ServeConfig { lora_dir: Some(dir.to_path_buf()), warmup: false, ..test_config() }
}

fn with_loras(loras: &[(&str, f32)]) -> pb::PatchModelRequest {
    pb::PatchModelRequest {
        loras: loras.iter().map(|(n, w)| pb::LoraWeight { name: n.to_string(), weight: *w }).collect(),
        ..default_patch()
    }
}

fn pixels(images: &[pb::GeneratedImage]) -> Vec<Vec<u8>> {
    pngs(images).iter().map(|p| Image::from_png(p).unwrap().0.rgb).collect()
}

/// `tests/fixtures/loras/tiny-ink.safetensors`, the LoRA of the embedded model that the Python
/// client's and the browser playground's tests serve: the synthetic kohya LoRA of seed 11, rank 1
/// (`STYLEALIGN_WRITE_FIXTURES=1` rewrites it).
#[test]
fn the_committed_embedded_model_lora_is_the_synthetic_one() {
    let pipe = tiny_pipeline(&device()).unwrap();
    let bytes = synthetic_file(&pipe.lora_targets(), LoraFormat::Kohya, 11, 1, 1.0);
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/loras/tiny-ink.safetensors");
    if std::env::var_os("STYLEALIGN_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bytes).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(committed == bytes, "{} is not the synthetic LoRA (STYLEALIGN_WRITE_FIXTURES=1 rewrites it)", path.display());
}

#[test]
fn list_loras_shows_family_format_and_fitting_models() {
    run(Duration::from_secs(120), || async {
        let dir = lora_dir("list");
        let server = start(lora_config(&dir)).await;
        let mut c = connect(&server).await;
        let me = Identity::client("lora-list");
        let list = c.list_loras(me.request(pb::ListLorasRequest {}, None)).await.unwrap().into_inner();
        let names: Vec<&str> = list.loras.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["broken", "ink", "paper", "sdxl_style"]);
        let by = |n: &str| list.loras.iter().find(|l| l.name == n).unwrap();
        let ink = by("ink");
        assert_eq!(
            (ink.family, ink.format.as_str(), ink.rank, ink.models.clone()),
            (pb::Family::Sd1 as i32, "kohya", 4, vec!["tiny".into()])
        );
        assert!(ink.layers > 0 && ink.memory_bytes > 0 && ink.size_bytes > 0);
        assert_eq!(ink.hash.len(), 10);
        assert_eq!(by("paper").format, "peft");
        let sdxl = by("sdxl_style");
        assert_eq!(sdxl.family, pb::Family::Sdxl as i32, "an SDXL LoRA by its keys");
        assert!(sdxl.models.is_empty() && sdxl.problems[0].starts_with("tiny: "), "{:?}", sdxl.problems);
        let broken = by("broken");
        assert_eq!(broken.family, pb::Family::Unspecified as i32);
        assert!(broken.models.is_empty() && !broken.problems.is_empty());
        assert_eq!(list.cache_budget_bytes, ServeConfig::default().lora_cache_bytes);

        // The HTTP/JSON route.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let req = format!("GET /v1/loras HTTP/1.1\r\nHost: {}\r\nx-client-id: web\r\nConnection: close\r\n\r\n", server.addr());
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).to_string();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let body: serde_json::Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["loras"][1]["name"], "ink");
        assert_eq!(body["loras"][1]["models"][0], "tiny");
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn session_loras_change_the_images_and_match_the_library() {
    run(Duration::from_secs(300), || async {
        let dir = lora_dir("images");
        let server = start(lora_config(&dir)).await;
        let mut c = connect(&server).await;
        let me = Identity::client("lora-images");
        let plain = session(&mut c, &me, default_patch()).await;
        let patched = c.patch_model(me.request(with_loras(&[("ink", 0.8), ("paper", -0.6)]), None)).await.unwrap().into_inner();
        assert_eq!(
            patched.loras,
            [pb::LoraWeight { name: "ink".into(), weight: 0.8 }, pb::LoraWeight { name: "paper".into(), weight: -0.6 }]
        );
        let got = c.get_session(me.request(pb::GetSessionRequest { session_id: patched.session_id.clone() }, None)).await.unwrap();
        assert_eq!(got.into_inner().loras, patched.loras, "GetSession shows the LoRAs");
        let prompts = ["a house", "a tree"];
        let a = generate(&mut c, &me, request(&plain, &prompts, 32, 4, 5)).await.expect("plain set");
        let b = generate(&mut c, &me, request(&patched.session_id, &prompts, 32, 4, 5)).await.expect("set with LoRAs");
        let params: serde_json::Value = serde_json::from_str(&b.images[1].parameters).unwrap();
        assert_eq!(params["loras"][0]["name"], "ink");
        assert_eq!(params["loras"][1]["weight"].as_f64(), Some(-0.6));
        let sha = stylealign::model::hash::sha256_file(&dir.join("paper.safetensors")).unwrap();
        assert_eq!(params["loras"][1]["sha256"].as_str(), Some(sha.as_str()));
        let text = Image::from_png(&pngs(&b.images)[1]).unwrap().1.into_iter().find(|(k, _)| k == "parameters").unwrap().1;
        assert!(text.contains("Lora hashes: \"ink: ") && text.contains(&format!("paper: {}", &sha[..10])), "{text}");
        let (a, b) = (pixels(&a.images), pixels(&b.images));
        assert_ne!(a[0], b[0], "the LoRAs change the reference too");
        assert_ne!(a[1], b[1], "the LoRAs change the target");

        // The library with the same LoRAs gives the same pixels.
        let pipe = tiny_pipeline(&device()).unwrap();
        let loras = vec![
            (Arc::new(pipe.load_lora("ink", &dir.join("ink.safetensors")).unwrap()), 0.8),
            (Arc::new(pipe.load_lora("paper", &dir.join("paper.safetensors")).unwrap()), -0.6),
        ];
        let set = SetSpec { prompts: prompts.iter().map(|p| p.to_string()).collect(), seed: 5, loras, ..Default::default() };
        let lib = pipe.generate(&BatchSpec::patched(32, 4, 7.5, SamplerKind::Ddim), &[set], &mut |_, _| vec![true]).unwrap();
        let lib: Vec<Vec<u8>> = lib[0].as_ref().unwrap().iter().map(|i| i.rgb.clone()).collect();
        assert_eq!(b, lib, "service images equal the library's");
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn sessions_with_different_loras_share_a_batch_and_get_their_own_images() {
    run(Duration::from_secs(300), || async {
        let dir = lora_dir("batch");
        let cfg = ServeConfig { max_batch_delay: Duration::from_millis(1500), ..lora_config(&dir) };
        let server = start(cfg).await;
        let mut c = connect(&server).await;
        let me = Identity::client("lora-batch");
        let patches = [with_loras(&[("ink", 1.0)]), with_loras(&[("paper", 0.7), ("ink", -0.4)]), default_patch()];
        let mut sessions = Vec::new();
        for p in &patches {
            sessions.push(session(&mut c, &me, p.clone()).await);
        }
        let prompts = ["a hill", "a cat"];
        // Alone, one after another.
        let mut alone = Vec::new();
        for s in &sessions {
            alone.push(pixels(&generate(&mut c, &me, request(s, &prompts, 32, 3, 21)).await.unwrap().images));
        }
        // Together: sent at once, they run as one batch.
        let mut tasks = Vec::new();
        for s in &sessions {
            let mut c = c.clone();
            let me = me.clone();
            let req = request(s, &prompts, 32, 3, 21);
            tasks.push(tokio::spawn(async move { generate(&mut c, &me, req).await.unwrap() }));
        }
        let mut together = Vec::new();
        for t in tasks {
            together.push(t.await.unwrap());
        }
        for (k, r) in together.iter().enumerate() {
            assert_eq!(r.started.as_ref().map(|s| s.batch_sets), Some(3), "set {k} ran in one batch with the others");
            assert_eq!(pixels(&r.images), alone[k], "set {k}: the same images as alone");
        }
        assert_ne!(alone[0], alone[2], "the LoRA changes the images");
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn bad_loras_are_refused_naming_the_field() {
    run(Duration::from_secs(120), || async {
        let dir = lora_dir("bad");
        let server = start(lora_config(&dir)).await;
        let mut c = connect(&server).await;
        let me = Identity::client("lora-bad");
        type Case<'a> = (Vec<(&'a str, f32)>, &'a str, &'a str);
        let cases: Vec<Case> = vec![
            (vec![("nope", 1.0)], "loras[0].name", "unknown LoRA"),
            (vec![("ink", 1.0), ("sdxl_style", 1.0)], "loras[1].name", "does not fit model \"tiny\""),
            (vec![("broken", 1.0)], "loras[0].name", "does not fit"),
            (vec![("ink", f32::NAN)], "loras[0].weight", "not a number"),
            (vec![("ink", 11.0)], "loras[0].weight", "[-10, 10]"),
            (vec![("ink", 1.0), ("ink", 0.5)], "loras[1].name", "given twice"),
        ];
        for (loras, field, why) in cases {
            let err = c.patch_model(me.request(with_loras(&loras), None)).await.expect_err("must be refused");
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
            assert!(err.message().contains(field) && err.message().contains(why), "{field} / {why}: {}", err.message());
        }
        let too_many: Vec<(&str, f32)> = (0..9).map(|_| ("ink", 1.0)).collect();
        let err = c.patch_model(me.request(with_loras(&too_many), None)).await.expect_err("too many");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("loras"), "{}", err.message());
        server.shutdown().await;

        // A cache budget smaller than the LoRA: RESOURCE_EXHAUSTED naming it.
        let server = start(ServeConfig { lora_cache_bytes: 1024, ..lora_config(&dir) }).await;
        let mut c = connect(&server).await;
        let err = c.patch_model(me.request(with_loras(&[("ink", 1.0)]), None)).await.expect_err("over budget");
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("loras[0].name") && err.message().contains("\"ink\""), "{}", err.message());
        server.shutdown().await;

        // Without a LoRA folder, asking for one names the field.
        let server = start(ServeConfig { warmup: false, ..test_config() }).await;
        let mut c = connect(&server).await;
        let err = c.patch_model(me.request(with_loras(&[("ink", 1.0)]), None)).await.expect_err("no LoRAs served");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("loras"), "{}", err.message());
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// The cache loads a LoRA once per model and device, evicts the least recently used LoRA that no
/// batch holds to make room, and refuses (naming the LoRA) when the room is held by a batch.
#[test]
fn the_lora_cache_evicts_least_recently_used_unheld_loras() {
    use stylealign::serve::loras::{LoraError, LoraLibrary};
    let dir = lora_dir("cache");
    let pipe = tiny_pipeline(&device()).unwrap();
    let probe = LoraLibrary::open(&dir, &[("tiny".to_string(), pipe.clone())], u64::MAX).unwrap();
    let one = probe.files().find(|f| f.name == "ink").unwrap().summary().unwrap().bytes;
    // Room for one of the two (same size) LoRAs.
    let lib = LoraLibrary::open(&dir, &[("tiny".to_string(), pipe.clone())], one + one / 2).unwrap();
    let ink = lib.get("tiny", &pipe, "ink").unwrap();
    let again = lib.get("tiny", &pipe, "ink").unwrap();
    assert!(Arc::ptr_eq(&ink, &again), "loaded once, shared");
    assert_eq!(lib.stats().loads, 1);
    // `ink` is held (a running batch): `paper` does not fit beside it.
    match lib.get("tiny", &pipe, "paper") {
        Err(e @ LoraError::Busy { .. }) => assert!(e.to_string().contains("\"paper\""), "{e}"),
        other => panic!("expected Busy, got {other:?}"),
    }
    drop((ink, again));
    // No longer held: evicted for `paper`.
    let paper = lib.get("tiny", &pipe, "paper").unwrap();
    let s = lib.stats();
    assert_eq!((s.resident, s.loads, s.evictions), (1, 2, 1));
    assert_eq!(s.resident_bytes, paper.bytes);
    // A LoRA loaded for another model is refused by the pipeline, naming it.
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens");
    let sd15 = stylealign::pipeline::Pipeline::load(&golden.join("tiny_sd15"), &device()).unwrap();
    let foreign = Arc::new(sd15.load_lora("sd15_kohya", &golden.join("loras/sd15_kohya.safetensors")).unwrap());
    let set = SetSpec { prompts: vec!["a".into()], loras: vec![(foreign, 1.0)], ..Default::default() };
    match pipe.validate(&BatchSpec::patched(32, 2, 7.5, SamplerKind::Ddim), &[set]) {
        Err(stylealign::pipeline::PipelineError::Invalid { field, message }) => {
            assert_eq!(field, "loras[0]", "{message}");
            assert!(message.contains("another model"), "{message}");
        }
        other => panic!("expected an invalid loras[0], got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A session with LoRAs adopted from its token by a replica that does not serve them: Generate is
/// INVALID_ARGUMENT naming `session_id` and the LoRA, before anything is queued.
#[test]
fn a_replica_without_the_sessions_lora_refuses_naming_it() {
    run(Duration::from_secs(120), || async {
        use stylealign::serve::session::SessionSecret;
        let secret = || Some(SessionSecret::new(b"lora-replica-test-secret-0123456789abcdefghij").unwrap());
        let dir = lora_dir("replica");
        let a = start(ServeConfig { session_secret: secret(), ..lora_config(&dir) }).await;
        let b = start(ServeConfig { session_secret: secret(), warmup: false, ..test_config() }).await;
        let me = Identity::client("lora-replica");
        let mut ca = connect(&a).await;
        let s = session(&mut ca, &me, with_loras(&[("ink", 0.5)])).await;
        let mut cb = connect(&b).await;
        let err = generate(&mut cb, &me, request(&s, &["a hill"], 32, 2, 1)).await.expect_err("no such LoRA here");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("session_id") && err.message().contains("\"ink\""), "{}", err.message());
        generate(&mut ca, &me, request(&s, &["a hill"], 32, 2, 1)).await.expect("the replica with the LoRA runs it");
        a.shutdown().await;
        b.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}
