//! `stylealign bench` as tools/gpu_bench.sh runs it: the built binary on the CPU with the tiny
//! configs (JSON on standard output and in `--out`), its refusals of bad flags, and a
//! `--write-model` folder served by `stylealign serve` and generated from with `stylealign generate`.

mod service_common;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use service_common::{run_to_end, spawn_server, stylealign_clean};

/// Runs the binary to the end (at most five minutes) and fails on a panic in its output.
fn run(args: &[&str]) -> Output {
    let output = run_to_end(args, Duration::from_secs(300));
    assert!(!text(&output.stderr).contains("panicked"), "stylealign {args:?} panicked:\n{}", text(&output.stderr));
    output
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stylealign-bench-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rows<'a>(doc: &'a Value, key: &str) -> &'a Vec<Value> {
    doc[key].as_array().unwrap_or_else(|| panic!("no `{key}` array in {doc}"))
}

#[test]
fn tiny_bench_measures_every_setting_and_operation() {
    let dir = temp_dir("tiny");
    let out_file = dir.join("ours.json");
    let o = run(&["bench", "--tiny", "--steps", "2", "--warmup", "1", "--op-iters", "2", "--json", "--out", out_file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let doc: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {}", text(&o.stdout)));
    let saved: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(doc, saved, "--out holds the document printed");
    assert_eq!(doc["impl"], "stylealign");
    assert_eq!((doc["batch"].as_u64(), doc["steps"].as_u64(), doc["tiny"].as_bool()), (Some(8), Some(2), Some(true)));
    assert!(rows(&doc, "errors").is_empty(), "{doc}");

    let unet = rows(&doc, "unet");
    for model in ["sd15", "sdxl"] {
        let of = |variant: &str| {
            unet.iter()
                .find(|r| r["model"] == model && r["variant"] == variant)
                .unwrap_or_else(|| panic!("no {model} {variant} row in {doc}"))
        };
        let plain = of("plain");
        for r in [plain, of("sa-google"), of("sa-node")] {
            let ms = r["ms"].as_f64().unwrap();
            assert!(ms > 0.0 && r["min_ms"].as_f64().unwrap() <= ms && ms <= r["max_ms"].as_f64().unwrap(), "{r}");
            assert_eq!((r["size"].as_u64(), r["dtype"].as_str(), r["mode"].as_str()), (Some(128), Some("f32"), Some("burn")));
            let mean = r["out_abs_mean"].as_f64().unwrap();
            assert!(mean.is_finite() && mean > 0.0, "{r}");
        }
        // The StyleAligned rows ran the patch: their outputs differ from the plain UNet's.
        for v in ["sa-google", "sa-node"] {
            assert_ne!(of(v)["out_abs_mean"], plain["out_abs_mean"], "{model} {v} computed the plain UNet");
        }
    }
    assert_eq!(unet.len(), 6);

    let ops = rows(&doc, "ops");
    let expected = [
        ("group_norm", "plain"),
        ("group_norm", "shared"),
        ("conv3x3", "plain"),
        ("attention", "plain"),
        ("attention", "sa-google"),
        ("attention", "sa-node"),
        ("ff_matmul", "plain"),
    ];
    for model in ["sd15", "sdxl"] {
        for (op, variant) in expected {
            let r = ops
                .iter()
                .find(|r| r["model"] == model && r["op"] == op && r["variant"] == variant)
                .unwrap_or_else(|| panic!("no {model} {op} {variant} row in {doc}"));
            assert!(r["ms"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(r["dtype"], "f32", "{r}");
        }
        // The feed-forward runs on the attention level's tokens of all 8 rows.
        let find = |op: &str| ops.iter().find(|r| r["model"] == model && r["op"] == op).unwrap()["shape"].as_array().unwrap().clone();
        let (attn, ff) = (find("attention"), find("ff_matmul"));
        assert_eq!(attn[0], 8);
        assert_eq!(ff[0].as_u64(), Some(8 * attn[1].as_u64().unwrap()));
        assert_eq!((ff[1].clone(), ff[2].as_u64()), (attn[2].clone(), Some(4 * attn[2].as_u64().unwrap())));
    }
    // The tiny SD1.5 config: 16 channels at the first level, attention there on 16×16 tokens.
    let attn = ops.iter().find(|r| r["model"] == "sd15" && r["op"] == "attention").unwrap();
    assert_eq!(attn["shape"], serde_json::json!([8, 256, 16]));
    let table = text(&o.stderr);
    assert!(table.contains("stylealign bench:") && table.contains("sa-google"), "the human table goes to stderr:\n{table}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_unet_and_the_operations_run_in_the_dtype_asked_for() {
    let o = run(&[
        "bench",
        "--tiny",
        "--model",
        "sd15",
        "--dtype",
        "f16",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--op-iters",
        "1",
        "--variant",
        "plain",
        "--json",
    ]);
    let err = text(&o.stderr);
    if !o.status.success() {
        // A device without f16 refuses the flag by name.
        assert!(err.contains("--dtype f16"), "{err}");
        return;
    }
    let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["dtype"], "f16");
    for r in rows(&doc, "ops") {
        assert_eq!(r["dtype"], "f16", "{r}");
    }
    for r in rows(&doc, "unet") {
        assert_eq!(r["dtype"], "f16", "the UNet rows say the dtype they ran in: {r}");
        assert!(r["out_abs_mean"].as_f64().is_some_and(|m| m.is_finite() && m > 0.0), "{r}");
    }
}

#[test]
fn bad_flags_are_refused_by_name() {
    for (args, flag) in [
        (&["bench", "--tiny", "--batch", "0"][..], "--batch"),
        (&["bench", "--tiny", "--size", "100"][..], "--size"),
        (&["bench", "--tiny", "--steps", "0"][..], "--steps"),
        (&["bench", "--model", "sd3"][..], "--model"),
        (&["bench", "--device", "tpu"][..], "--device"),
        (&["bench", "--dtype", "f8"][..], "--dtype"),
        (&["bench", "--variant", "full"][..], "--variant"),
    ] {
        let o = run(args);
        assert!(!o.status.success(), "{args:?} was accepted");
        let err = text(&o.stderr);
        assert!(err.contains(flag), "{args:?}: the error does not name {flag}:\n{err}");
        assert!(o.stdout.is_empty(), "{args:?} printed a result");
    }
}

#[test]
fn a_written_model_folder_is_served_and_generates_a_set() {
    let dir = temp_dir("folder");
    let model = dir.join("sd15");
    let o = run(&["bench", "--tiny", "--write-model", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    ] {
        assert!(model.join(f).is_file(), "{f} missing");
    }

    let mut cmd = stylealign_clean();
    cmd.args(["serve", "--model", model.to_str().unwrap(), "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"]);
    let (mut child, addrs, mut log, _stdout) = spawn_server(&mut cmd);
    let images = dir.join("images");
    let addr = addrs[0].to_string();
    let args =
        ["generate", "--server", &addr, "--model", "sd15", "--prompt", "a lighthouse, watercolor", "--prompt", "a fox", "--steps", "2"];
    let args = [&args[..], &["--seed", "7", "--out", images.to_str().unwrap()]].concat();
    // The server answers UNAVAILABLE (WARMING_UP) until its models are loaded.
    let end = Instant::now() + Duration::from_secs(120);
    let o = loop {
        let o = run(&args);
        if o.status.success() || !text(&o.stderr).contains("WARMING_UP") || Instant::now() > end {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    log.assert_no_panic();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let pngs = std::fs::read_dir(&images).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png")).count();
    assert_eq!(pngs, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--tiny` uses the configs of the golden tiny models; the binary embeds copies (the build reads
/// nothing under tests/), which must stay equal to them.
#[test]
fn the_embedded_tiny_configs_are_the_goldens() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for (copy, golden) in [
        ("src/bench/tiny/unet_sd15.json", "tests/fixtures/goldens/tiny_sd15/unet/config.json"),
        ("src/bench/tiny/unet_sdxl.json", "tests/fixtures/goldens/tiny_sdxl/unet/config.json"),
        ("src/bench/tiny/vae_sd15.json", "tests/fixtures/goldens/tiny_sd15/vae/config.json"),
    ] {
        let (a, b) = (std::fs::read(root.join(copy)).unwrap(), std::fs::read(root.join(golden)).unwrap());
        assert!(a == b, "{copy} differs from {golden}");
    }
}
