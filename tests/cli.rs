//! The command line (`stylealign generate`, `stylealign loadtest`) as a user runs it: the built
//! binary against a `stylealign serve` process on the tiny model (127.0.0.1, ephemeral port), with
//! standard output and error captured (so not a terminal).
//!
//! Every server process is killed when its handle drops (also when a test fails).

mod service_common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use service_common::{ServerLog, run_to_end, spawn_server, stylealign_clean};
use stylealign::client::{self, Identity};
use stylealign::serve::pb;
use tonic::Code;

/// The binary, with a clean `STYLEALIGN_*` environment.
fn stylealign() -> Command {
    stylealign_clean()
}

/// Runs the binary to the end (at most two minutes).
fn run(args: &[&str]) -> Output {
    run_to_end(args, Duration::from_secs(120))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A `stylealign serve --model tiny` child process, SERVING.
struct Server {
    child: Child,
    addr: String,
    _stdout: BufReader<ChildStdout>,
    log: ServerLog,
}

impl Server {
    fn spawn() -> Server {
        Self::spawn_with(&[])
    }

    /// [`Server::spawn`] with more `serve` flags.
    fn spawn_with(extra: &[&str]) -> Server {
        let (child, addrs, log, reader) = spawn_server(
            stylealign()
                .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"])
                .args(["--default-steps", "3", "--max-size", "256", "--max-batch-delay-ms", "0", "--drain-timeout-secs", "2"])
                .args(extra)
                .env("STYLEALIGN_SESSION_SECRET", "cli-test-session-secret-0123456789abcdefghij"),
        );
        let addr = addrs[0].to_string();
        let server = Server { child, addr, _stdout: reader, log };
        server.wait_serving();
        server
    }

    fn wait_serving(&self) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let end = Instant::now() + Duration::from_secs(60);
            let mut c = client::connect(&self.addr).await.expect("connect");
            loop {
                match c.list_models(Identity::client("probe").request(pb::ListModelsRequest {}, None)).await {
                    Ok(_) => return,
                    Err(s) if s.code() == Code::Unavailable && Instant::now() < end => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(s) => panic!("{} never served: {s}", self.addr),
                }
            }
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.assert_no_panic();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stylealign-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `generate` on the server: two prompts; 32 × 32 and 2 steps unless `extra` says otherwise.
fn generate(server: &Server, out: &Path, extra: &[&str]) -> Output {
    let mut args =
        vec!["generate", "--server", &server.addr, "--out", out.to_str().unwrap(), "--prompt", "a house, ink", "--prompt", "a tree, ink"];
    for (flag, value) in [("--width", "32"), ("--height", "32"), ("--steps", "2")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend(extra);
    run(&args)
}

fn assert_clean(o: &Output) {
    let err = text(&o.stderr);
    assert!(!err.contains("panicked") && !err.contains("Status {") && !err.contains("RUST_BACKTRACE"), "stderr: {err}");
}

/// The paths printed on stdout, each an existing PNG; with the sampler named in its metadata (the
/// text chunk holding the request's JSON).
fn written(o: &Output) -> Vec<(PathBuf, String)> {
    text(&o.stdout)
        .lines()
        .map(|l| {
            let p = PathBuf::from(l);
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{l}: {e}"));
            let (_, meta) = stylealign::pipeline::image::Image::from_png(&bytes).expect("a PNG");
            let sampler = meta
                .iter()
                .filter_map(|(_, v)| serde_json::from_str::<serde_json::Value>(v).ok())
                .find_map(|j| j["sampler"].as_str().map(str::to_string))
                .unwrap_or_else(|| panic!("{l}: no sampler in the PNG metadata {meta:?}"));
            (p, sampler)
        })
        .collect()
}

#[test]
fn samplers_by_their_api_names_and_old_spellings() {
    let server = Server::spawn();
    let dir = temp_dir("samplers");
    for (arg, name) in [("euler_a", "euler_a"), ("euler-a", "euler_a"), ("dpmpp_2m_karras", "dpmpp_2m_karras"), ("dpmpp2m", "dpmpp_2m")] {
        let o = generate(&server, &dir.join(arg), &["--sampler", arg, "--seed", "11"]);
        assert!(o.status.success(), "--sampler {arg}: {}", text(&o.stderr));
        assert_clean(&o);
        let files = written(&o);
        assert_eq!(files.len(), 2, "--sampler {arg}: {}", text(&o.stdout));
        for (p, sampler) in &files {
            assert_eq!(sampler, name, "{}", p.display());
        }
    }
    // An unknown name lists the accepted ones.
    let o = generate(&server, &dir.join("bad"), &["--sampler", "heun"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("--sampler") && err.contains("euler_a") && err.contains("dpmpp_2m_karras"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn init_image_makes_a_target_img2img() {
    let server = Server::spawn();
    let dir = temp_dir("img2img");
    std::fs::create_dir_all(&dir).unwrap();
    let picture = dir.join("init.png");
    let rgb: Vec<u8> = (0..24 * 20 * 3).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&picture, stylealign::pipeline::Image { width: 24, height: 20, rgb }.to_png(&[])).unwrap();
    let init = picture.to_str().unwrap();
    let o = generate(&server, &dir.join("out"), &["--seed", "5", "--init-image", init, "--strength", "0.5"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_clean(&o);
    let infotext = |p: &Path| {
        let (_, meta) = stylealign::pipeline::image::Image::from_png(&std::fs::read(p).unwrap()).unwrap();
        meta.into_iter().find(|(k, _)| k == "parameters").map(|(_, v)| v).unwrap()
    };
    let files = written(&o);
    assert_eq!(files.len(), 2);
    assert!(!infotext(&files[0].0).contains("Denoising strength"), "the reference is generated");
    assert!(infotext(&files[1].0).contains("Denoising strength: 0.5"), "{}", infotext(&files[1].0));
    // A strength outside (0, 1] is the server's INVALID_ARGUMENT naming the field.
    let o = generate(&server, &dir.join("bad"), &["--init-image", init, "--strength", "2"]);
    assert!(!o.status.success());
    assert_clean(&o);
    let err = text(&o.stderr);
    assert!(err.contains("INVALID_ARGUMENT") || err.contains("invalid"), "{err}");
    assert!(err.contains("init_images[0].strength"), "{err}");
    // A missing file is the client's own readable error.
    let o = generate(&server, &dir.join("bad"), &["--init-image", "/nonexistent/init.png"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--init-image /nonexistent/init.png"), "{}", text(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn controlnet_flags_control_the_targets() {
    let server = Server::spawn();
    let dir = temp_dir("controlnet");
    std::fs::create_dir_all(&dir).unwrap();
    let edges = dir.join("edges.png");
    let rgb: Vec<u8> = (0..30 * 30 * 3).map(|i| if (i / 3) % 7 == 0 { 255 } else { 0 }).collect();
    std::fs::write(&edges, stylealign::pipeline::Image { width: 30, height: 30, rgb }.to_png(&[])).unwrap();
    let e = edges.to_str().unwrap();
    let args = ["--seed", "3", "--controlnet", "tiny-controlnet", "--control", e, "--control-scale", "0.7", "--control-end", "0.8"];
    let o = generate(&server, &dir.join("out"), &args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_clean(&o);
    let files = written(&o);
    let json = |p: &Path| {
        let (_, meta) = stylealign::pipeline::image::Image::from_png(&std::fs::read(p).unwrap()).unwrap();
        let v = meta.into_iter().find(|(k, _)| k == "stylealign").map(|(_, v)| v).unwrap();
        serde_json::from_str::<serde_json::Value>(&v).unwrap()
    };
    let c = &json(&files[1].0)["controls"][0];
    assert_eq!((c["model"].as_str(), c["conditioning_scale"].as_f64(), c["end"].as_f64()), (Some("tiny-controlnet"), Some(0.7), Some(0.8)));
    // An unknown ControlNet is the server's INVALID_ARGUMENT naming the field.
    let o = generate(&server, &dir.join("bad"), &["--controlnet", "depth", "--control", e]);
    assert!(!o.status.success());
    assert_clean(&o);
    assert!(text(&o.stderr).contains("controls[0].model"), "{}", text(&o.stderr));
    // --controlnet without --control is the client's usage error.
    let o = generate(&server, &dir.join("bad"), &["--controlnet", "tiny-controlnet"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--control"), "{}", text(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn controlnet_dir_refuses_what_it_cannot_serve() {
    let dir = temp_dir("controlnet-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let serve = |d: &Path| {
        run(&["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--controlnet-dir", d.to_str().unwrap()])
    };
    // A pickle checkpoint is never read: named, with the reason.
    std::fs::write(dir.join("control_v11p_sd15_canny.pth"), b"not read").unwrap();
    let o = serve(&dir);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("control_v11p_sd15_canny.pth") && err.contains("pickle"), "{err}");
    std::fs::remove_file(dir.join("control_v11p_sd15_canny.pth")).unwrap();
    // A ControlNet single file (original layout) that fits no served model is refused by name.
    let single = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/goldens/tiny_controlnet_single");
    for f in ["control_tiny_sd15.safetensors", "control_tiny_sd15.json"] {
        std::fs::copy(single.join(f), dir.join(f)).unwrap();
    }
    let o = serve(&dir);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("control_tiny_sd15") && err.contains("fits none of the served models"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn runs_into_one_folder_keep_every_file() {
    let server = Server::spawn();
    let dir = temp_dir("numbering");
    // The same seed twice: the same image content, and still both runs stay.
    let first = generate(&server, &dir, &["--seed", "5"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let first = written(&first);
    let before: Vec<Vec<u8>> = first.iter().map(|(p, _)| std::fs::read(p).unwrap()).collect();
    let second = generate(&server, &dir, &["--seed", "5"]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    let second = written(&second);
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(first.iter().map(|(p, _)| name(p)).collect::<Vec<_>>(), ["00000-5-0.png", "00000-5-1.png"]);
    assert_eq!(second.iter().map(|(p, _)| name(p)).collect::<Vec<_>>(), ["00001-5-0.png", "00001-5-1.png"]);
    for ((p, _), b) in first.iter().zip(&before) {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn progress_without_a_terminal_is_one_line_per_event() {
    let server = Server::spawn();
    let dir = temp_dir("progress");
    let o = generate(&server, &dir, &["--steps", "3"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(!err.contains('\r') && !err.contains('\u{1b}'), "{err:?}");
    let lines: Vec<&str> = err.lines().collect();
    for l in &lines {
        assert!(
            ["queued: position ", "started: batch of ", "step ", "image "].iter().any(|p| l.starts_with(p)),
            "unexpected line {l:?} in {err}"
        );
    }
    let steps: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps, ["step 1/3", "step 2/3", "step 3/3"]);
    assert_eq!(lines.iter().filter(|l| l.starts_with("started: ")).count(), 1);
    assert_eq!(lines.iter().filter(|l| l.starts_with("image ")).count(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_request_is_a_readable_error() {
    let server = Server::spawn();
    let dir = temp_dir("errors");
    // Rejected by the server: the code and the message naming the field.
    let o = generate(&server, &dir, &["--width", "33"]);
    assert!(!o.status.success());
    assert_clean(&o);
    let err = text(&o.stderr);
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("`width`"), "{err}");
    assert!(text(&o.stdout).is_empty() && !dir.exists(), "nothing is written");
    // Rejected by the command line: the flag is named.
    for (flag, value) in [("--timeout", "0"), ("--share-attn", "q"), ("--priority", "urgent")] {
        let o = generate(&server, &dir, &[flag, value]);
        assert!(!o.status.success());
        assert_clean(&o);
        assert!(text(&o.stderr).contains(flag), "{flag}: {}", text(&o.stderr));
    }
    // A deadline that passes is DEADLINE_EXCEEDED, not a hang.
    let o = generate(&server, &dir, &["--timeout", "1ms", "--steps", "100"]);
    assert!(!o.status.success());
    assert_clean(&o);
    assert!(text(&o.stderr).contains("DEADLINE_EXCEEDED"), "{}", text(&o.stderr));
    // No server: the address and the cause.
    let o = run(&["generate", "--server", "127.0.0.1:9", "--out", dir.to_str().unwrap(), "--prompt", "x"]);
    assert!(!o.status.success());
    assert_clean(&o);
    assert!(text(&o.stderr).contains("127.0.0.1:9"), "{}", text(&o.stderr));
}

/// A stand-in server that refuses everything with google.rpc details, as a server under load
/// or with field checks would.
mod refusing {
    use std::collections::HashMap;
    use std::time::Duration;

    use stylealign::serve::pb;
    use stylealign::serve::pb::style_align_server::{StyleAlign, StyleAlignServer};
    use tonic::{Code, Request, Response, Status};
    use tonic_types::{ErrorDetails, StatusExt as _};

    pub struct Refusing;

    fn refusal() -> Status {
        let mut d = ErrorDetails::with_retry_info(Some(Duration::from_secs(2)));
        d.set_error_info("QUEUE_FULL", "stylealign", HashMap::from([("queue_depth".to_string(), "64".to_string())]));
        d.add_bad_request_violation("prompts[0]", "must not be empty");
        Status::with_error_details(Code::ResourceExhausted, "admission queue full", d)
    }

    #[tonic::async_trait]
    impl StyleAlign for Refusing {
        type GenerateStream = tokio_stream::Empty<Result<pb::GenerateResponse, Status>>;
        async fn patch_model(&self, _: Request<pb::PatchModelRequest>) -> Result<Response<pb::Session>, Status> {
            Err(refusal())
        }
        async fn generate(&self, _: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
            Err(refusal())
        }
        async fn get_session(&self, _: Request<pb::GetSessionRequest>) -> Result<Response<pb::Session>, Status> {
            Err(refusal())
        }
        async fn release_session(&self, _: Request<pb::ReleaseSessionRequest>) -> Result<Response<pb::ReleaseSessionResponse>, Status> {
            Err(refusal())
        }
        async fn list_models(&self, _: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
            Err(refusal())
        }
        async fn list_loras(&self, _: Request<pb::ListLorasRequest>) -> Result<Response<pb::ListLorasResponse>, Status> {
            Err(refusal())
        }
    }

    /// Serves on a free loopback port from a background thread; returns the address.
    pub fn start() -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().to_string()).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let _ =
                    tonic::transport::Server::builder().add_service(StyleAlignServer::new(Refusing)).serve_with_incoming(incoming).await;
            });
        });
        rx.recv().unwrap()
    }
}

#[test]
fn error_details_are_decoded() {
    let addr = refusing::start();
    let dir = temp_dir("details");
    let o = run(&["generate", "--server", &addr, "--out", dir.to_str().unwrap(), "--prompt", "x"]);
    assert!(!o.status.success());
    assert_clean(&o);
    let err = text(&o.stderr);
    for want in [
        "RESOURCE_EXHAUSTED: admission queue full",
        "retry after 2s",
        "reason QUEUE_FULL from stylealign (queue_depth=64)",
        "field `prompts[0]`: must not be empty",
    ] {
        assert!(err.contains(want), "{want:?} missing from {err}");
    }
}

/// The real server's refusals as the CLI prints them: every invalid field, the ErrorInfo reason
/// with its metadata, the RetryInfo delay.
#[test]
fn server_error_details_read_well() {
    let server = Server::spawn_with(&["--memory-budget", "1MiB"]);
    let dir = temp_dir("server-details");
    let o = generate(&server, &dir, &["--width", "65", "--steps", "9999"]);
    assert!(!o.status.success());
    assert_clean(&o);
    let err = text(&o.stderr);
    for want in [
        "INVALID_ARGUMENT: invalid `steps`",
        "field `steps`: 9999 exceeds the limit of 150",
        "field `width`: 65 is not a multiple of 16",
        "reason INVALID_FIELD from stylealign.v1 (fields=2)",
    ] {
        assert!(err.contains(want), "{want:?} missing from {err}");
    }
    // Two 32×32 images do not fit a 1 MiB budget.
    let o = generate(&server, &dir, &[]);
    assert!(!o.status.success());
    assert_clean(&o);
    let err = text(&o.stderr);
    for want in [
        "RESOURCE_EXHAUSTED: the request's estimated peak memory",
        "reason OVER_MEMORY_BUDGET from stylealign.v1 (budget_bytes=1048576, estimate_bytes=",
        "retry after 1m",
    ] {
        assert!(err.contains(want), "{want:?} missing from {err}");
    }
}

#[test]
fn loadtest_output_into_a_closed_pipe_does_not_panic() {
    let load = ["loadtest", "--clients", "1", "--requests", "1", "--batching", "on", "--images", "1", "--steps", "1", "--size", "16"];
    // --json: the reader is gone before anything is written.
    let mut child = stylealign().args(load).arg("--json").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{:?}: {}", o.status, text(&o.stderr));
    assert_clean(&o);
    // The table: the reader takes the first line and leaves (`| head -1`).
    let mut child = stylealign().args(load).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("mix sampler=ddim:1"), "{first:?}");
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{:?}: {}", o.status, text(&o.stderr));
    assert_clean(&o);
}

/// `--style-window` and `--style-level` reach the session: the PNG's JSON records them, the
/// targets differ from the default session's; a bad level is the server's INVALID_ARGUMENT naming
/// the field, a malformed flag is refused before any call.
#[test]
fn style_window_and_levels_from_flags() {
    let server = Server::spawn();
    let dir = temp_dir("style-scope");
    let json_of = |o: &Output| -> Vec<serde_json::Value> {
        text(&o.stdout)
            .lines()
            .map(|l| {
                let (_, meta) = stylealign::pipeline::image::Image::from_png(&std::fs::read(l).unwrap()).unwrap();
                let (_, j) = meta.iter().find(|(k, _)| k == "stylealign").expect("stylealign chunk");
                serde_json::from_str(j).unwrap()
            })
            .collect()
    };
    let pixels = |o: &Output| -> Vec<Vec<u8>> {
        text(&o.stdout).lines().map(|l| stylealign::pipeline::image::Image::from_png(&std::fs::read(l).unwrap()).unwrap().0.rgb).collect()
    };
    let plain = generate(&server, &dir.join("plain"), &["--seed", "3", "--steps", "4"]);
    assert!(plain.status.success(), "{}", text(&plain.stderr));
    let scoped = generate(
        &server,
        &dir.join("scoped"),
        &[
            "--seed",
            "3",
            "--steps",
            "4",
            "--style-window",
            "0,0.5",
            "--style-level",
            "up.1:off",
            "--style-level",
            "down.0:gain=0.5,norm=off",
        ],
    );
    assert!(scoped.status.success(), "{}", text(&scoped.stderr));
    assert_clean(&scoped);
    let j = &json_of(&scoped)[1];
    assert_eq!(j["window"], serde_json::json!({"start": 0.0, "end": 0.5}), "{j}");
    assert_eq!(
        j["levels"],
        serde_json::json!([{"name": "up.1", "enabled": false}, {"name": "down.0", "gain": 0.5, "share_group_norm": false}]),
        "{j}"
    );
    assert!(json_of(&plain)[1].get("window").is_none());
    assert_ne!(pixels(&plain)[1], pixels(&scoped)[1], "the scope changes the target");

    let o = generate(&server, &dir.join("bad"), &["--style-level", "down.9:off"]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("INVALID_ARGUMENT") && err.contains("levels[0].name") && err.contains("down.0..down.2, mid, up.0..up.2, out"),
        "{err}"
    );
    for (flag, value) in [("--style-window", "0.5"), ("--style-level", "up.1:sideways"), ("--style-level", "up.1:gain=lots")] {
        let o = generate(&server, &dir.join("malformed"), &[flag, value]);
        assert!(!o.status.success(), "{flag} {value}");
        assert!(text(&o.stderr).contains(flag), "{flag} {value}: {}", text(&o.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `serve --lora-dir` and `generate --lora NAME[:WEIGHT]`: the images record the LoRAs with their
/// weights (a negative one too), and an unknown LoRA is refused naming the field.
#[test]
fn generate_with_loras_from_the_lora_dir() {
    use stylealign::model::lora::{LoraFormat, synthetic_file};
    let dir = temp_dir("loras");
    std::fs::create_dir_all(&dir).unwrap();
    let dev = stylealign::device::open(&stylealign::device::DeviceSpec::Cpu).unwrap();
    let pipe = stylealign::pipeline::tiny::tiny_pipeline(&dev).unwrap();
    std::fs::write(dir.join("ink.safetensors"), synthetic_file(&pipe.lora_targets(), LoraFormat::Kohya, 3, 4, 1.0)).unwrap();
    std::fs::write(dir.join("paper.safetensors"), synthetic_file(&pipe.lora_targets(), LoraFormat::Peft, 4, 4, 1.0)).unwrap();
    let server = Server::spawn_with(&["--lora-dir", dir.to_str().unwrap(), "--lora-cache-mb", "64"]);
    let out = temp_dir("loras-out");
    let o = generate(&server, &out, &["--lora", "ink:0.8", "--lora", "paper:-0.5"]);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    assert_clean(&o);
    let first = text(&o.stdout).lines().next().unwrap().to_string();
    let png = std::fs::read(first.trim()).unwrap();
    let (_, chunks) = stylealign::pipeline::Image::from_png(&png).unwrap();
    let json: serde_json::Value = serde_json::from_str(&chunks.iter().find(|(k, _)| k == "stylealign").unwrap().1).unwrap();
    assert_eq!(json["loras"][0]["name"], "ink");
    assert_eq!(json["loras"][0]["weight"].as_f64(), Some(0.8));
    assert_eq!(json["loras"][1]["name"], "paper");
    assert_eq!(json["loras"][1]["weight"].as_f64(), Some(-0.5));
    let bad = generate(&server, &out, &["--lora", "nope"]);
    assert!(!bad.status.success());
    let err = text(&bad.stderr);
    assert!(err.contains("INVALID_ARGUMENT") && err.contains("loras[0].name") && err.contains("unknown LoRA"), "{err}");
    assert_clean(&bad);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&out);
}
