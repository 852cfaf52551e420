//! Admission through the public interface: the memory budget (over-budget requests refused with
//! RESOURCE_EXHAUSTED and `google.rpc` details, a request at the limit admitted, ListModels'
//! limits the ones that hold), every invalid field in one `BadRequest`, reference images checked
//! from their header (a decode bomb refused without decoding), queued reference images held to
//! their pool (RSS of a spawned server), and `Retry-After` on the HTTP route.

mod service_common;

use std::time::{Duration, Instant};

use burn::tensor::Device;
use service_common::*;
use stylealign::client::Identity;
use stylealign::pipeline::cost::{CostModel, SetShape};
use stylealign::pipeline::tiny::tiny_pipeline;
use stylealign::serve::admission::request_limit_of;
use stylealign::serve::errors::{DOMAIN, MAX_VIOLATIONS};
use stylealign::serve::{ServeConfig, pb};
use tonic::Code;
use tonic_types::StatusExt as _;

fn tiny_cost() -> CostModel {
    tiny_pipeline(&Device::flex()).unwrap().cost_model()
}

fn shape(images: usize, size: usize) -> SetShape {
    SetShape { images, width: size, height: size, steps: 3, ..Default::default() }
}

/// A budget whose request limit (one worker) is exactly `limit`.
fn budget_for_limit(limit: u64) -> u64 {
    let guess = limit * 4 / 3;
    (guess.saturating_sub(8)..guess + 8).find(|&b| request_limit_of(b, 1) == limit).expect("a budget with this request limit")
}

fn reason(s: &tonic::Status) -> String {
    let info = s.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo on {s:?}"));
    assert_eq!(info.domain, DOMAIN);
    info.reason
}

/// About 15 KiB: a PNG signature and a valid IHDR declaring `w`×`h` RGB, then an IDAT of junk.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    let mut writer = enc.write_header().unwrap();
    writer.write_chunk(png::chunk::IDAT, &[0x5A; 15 * 1024]).unwrap();
    drop(writer);
    out
}

/// A real PNG of `w`×`h` noise (incompressible: the encoded size is about the pixels').
fn noise_png(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

/// A real PNG of `w`×`h` in a repeating pattern: small encoded, `3·w·h` bytes decoded.
fn pattern_png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

fn reference_request(session: &str, png: Vec<u8>) -> pb::GenerateRequest {
    pb::GenerateRequest { reference_image: png, reference_caption: "a photo".into(), ..request(session, &["a cat"], 64, 3, 1) }
}

/// Over the request limit: RESOURCE_EXHAUSTED, ErrorInfo OVER_MEMORY_BUDGET with the estimate and
/// the limit, RetryInfo. At the limit exactly: admitted and generated. ListModels reports the
/// size and row limits that the admission applies.
#[test]
fn the_budget_is_enforced_and_listed() {
    run(Duration::from_secs(300), || async {
        let cost = tiny_cost();
        let at_limit = cost.estimate(&shape(1, 64)).total;
        let budget = budget_for_limit(at_limit);
        let server = start(ServeConfig { memory_budget: Some(budget), ..test_config() }).await;
        let mut c = connect(&server).await;
        let me = Identity::client("admission");
        let s = session(&mut c, &me, default_patch()).await;

        // At the limit: admitted, and it runs.
        let ok = generate(&mut c, &me, request(&s, &["a cat"], 64, 3, 1)).await.expect("a request at the limit is admitted");
        assert_eq!(ok.images.len(), 1);

        // One size step above: refused, with the numbers.
        let over = cost.estimate(&shape(1, 80)).total;
        assert!(over > at_limit);
        let e = generate(&mut c, &me, request(&s, &["a cat"], 80, 3, 1)).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
        assert_eq!(reason(&e), "OVER_MEMORY_BUDGET");
        let info = e.get_details_error_info().unwrap();
        assert_eq!(info.metadata["estimate_bytes"], over.to_string());
        assert_eq!(info.metadata["limit_bytes"], at_limit.to_string());
        assert_eq!(info.metadata["budget_bytes"], budget.to_string());
        assert!(e.get_details_retry_info().and_then(|r| r.retry_delay).is_some(), "RetryInfo");
        assert!(e.message().contains("exceeds the limit"), "{}", e.message());
        // Two images at the native size do not fit either.
        let e = generate(&mut c, &me, request(&s, &["a cat", "a dog"], 64, 3, 1)).await.unwrap_err();
        assert_eq!(reason(&e), "OVER_MEMORY_BUDGET");

        // ListModels: the limits that hold.
        let models = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner();
        assert_eq!(models.memory_budget_bytes, budget);
        let tiny = &models.models[0];
        assert_eq!((tiny.max_size, tiny.max_batch_rows), (64, 1));
        server.shutdown().await;

        // A larger budget: what ListModels lists is admitted, one step more is not.
        let limit = cost.estimate(&shape(2, 128)).total;
        let server = start(ServeConfig { memory_budget: Some(budget_for_limit(limit)), ..test_config() }).await;
        let mut c = connect(&server).await;
        let s = session(&mut c, &me, default_patch()).await;
        let models = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner();
        let tiny = &models.models[0];
        assert!(tiny.max_size >= 128 && tiny.max_size < 256, "{tiny:?}");
        assert!(tiny.max_batch_rows >= 2, "{tiny:?}");
        let size = tiny.max_size;
        generate(&mut c, &me, request(&s, &["a cat"], size, 2, 1)).await.expect("max_size is admitted");
        let e = generate(&mut c, &me, request(&s, &["a cat"], size + 16, 2, 1)).await.unwrap_err();
        assert_eq!(reason(&e), "OVER_MEMORY_BUDGET");
        let rows = tiny.max_batch_rows as usize;
        let prompts: Vec<&str> = vec!["a cat"; rows];
        generate(&mut c, &me, request(&s, &prompts, 64, 2, 1)).await.expect("max_batch_rows images are admitted");
        if rows < 8 {
            let prompts: Vec<&str> = vec!["a cat"; rows + 1];
            let e = generate(&mut c, &me, request(&s, &prompts, 64, 2, 1)).await.unwrap_err();
            assert_eq!(reason(&e), "OVER_MEMORY_BUDGET");
        }
        server.shutdown().await;
    });
}

/// A request with several bad fields: one INVALID_ARGUMENT whose BadRequest lists them all.
#[test]
fn bad_request_lists_every_invalid_field() {
    run(Duration::from_secs(120), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("fields");
        let s = session(&mut c, &me, default_patch()).await;
        let bad = pb::GenerateRequest {
            width: 65,
            height: 4096,
            steps: 999,
            sampler: 42,
            guidance_scale: Some(-1.0),
            negative_prompt: "x".repeat(5000),
            reference_caption: "no image".into(),
            ..request(&s, &["a cat"], 64, 3, 1)
        };
        let e = generate(&mut c, &me, bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(reason(&e), "INVALID_FIELD");
        let mut fields: Vec<String> = e.get_details_bad_request().unwrap().field_violations.into_iter().map(|v| v.field).collect();
        fields.sort();
        assert_eq!(fields, ["guidance_scale", "height", "negative_prompt", "reference_caption", "sampler", "steps", "width"]);
        assert!(e.message().contains("and 6 more invalid fields"), "{}", e.message());
        assert!(e.get_details_retry_info().is_none());

        // Many bad prompts: at most MAX_VIOLATIONS listed, each bounded.
        let long = "y".repeat(3000);
        let prompts: Vec<&str> = vec![long.as_str(); 8];
        let e = generate(&mut c, &me, pb::GenerateRequest { steps: 999, width: 7, ..request(&s, &prompts, 64, 3, 1) }).await.unwrap_err();
        let v = e.get_details_bad_request().unwrap().field_violations;
        assert!(v.len() <= MAX_VIOLATIONS && v.len() >= 10, "{}", v.len());
        assert!(v.iter().all(|v| v.description.len() <= 1100 && v.field.len() <= 1100));

        // PatchModel too: both bad enums at once; an unknown model has its own reason.
        let e =
            c.patch_model(me.request(pb::PatchModelRequest { share_norm: 9, share_attn: 9, ..default_patch() }, None)).await.unwrap_err();
        assert_eq!(e.get_details_bad_request().unwrap().field_violations.len(), 2);
        let e = c.patch_model(me.request(pb::PatchModelRequest { model: "nope".into(), ..default_patch() }, None)).await.unwrap_err();
        assert_eq!((e.code(), reason(&e).as_str()), (Code::InvalidArgument, "UNKNOWN_MODEL"));
        let e = c.get_session(me.request(pb::GetSessionRequest { session_id: "forged".into() }, None)).await.unwrap_err();
        assert_eq!((e.code(), reason(&e).as_str()), (Code::NotFound, "SESSION_NOT_FOUND"));
        server.shutdown().await;
    });
}

/// A 15 KiB PNG declaring 4096×4096 is refused from its header (INVALID_ARGUMENT naming
/// `reference_image`) at once; the server stays SERVING and keeps generating.
#[test]
fn decode_bomb_is_refused_from_the_header() {
    run(Duration::from_secs(120), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("bomb");
        let s = session(&mut c, &me, default_patch()).await;
        for (w, h) in [(4096, 4096), (100_000, 1), (65_535, 65_535)] {
            let bomb = png_declaring(w, h);
            assert!(bomb.len() < 16 * 1024);
            let t = Instant::now();
            let e = generate(&mut c, &me, reference_request(&s, bomb)).await.unwrap_err();
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
            assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
            let v = e.get_details_bad_request().unwrap().field_violations;
            assert_eq!(v[0].field, "reference_image");
            assert!(v[0].description.contains(&format!("{w}x{h}")), "{}", v[0].description);
        }
        // A header that agrees but data that does not decode: refused after decoding, by field.
        let e = generate(&mut c, &me, reference_request(&s, png_declaring(64, 64))).await.unwrap_err();
        assert_eq!(e.get_details_bad_request().unwrap().field_violations[0].field, "reference_image");
        assert!(server.is_serving());
        let ok = generate(&mut c, &me, reference_request(&s, noise_png(96, 80))).await.expect("a valid reference");
        assert_eq!(ok.images.len(), 1);
        server.shutdown().await;
    });
}

fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
    kib * 1024
}

/// Requests with a 2048×2048 reference behind a long job, on a spawned server with a 512 MiB
/// budget. Twenty sent one after another are all queued: once decoded, a queued request keeps
/// only the reference fitted to its size (64×64), not the upload's 12 MiB of pixels, and returns
/// the rest of its reservation. Twenty more sent at once: decoding reserves the upload's pixels
/// in the pool, so what does not fit is RESOURCE_EXHAUSTED REFERENCE_POOL_FULL with RetryInfo;
/// RSS stays within the budget throughout.
#[test]
fn queued_references_stay_within_the_budget() {
    run(Duration::from_secs(600), || async {
        let budget: u64 = 512 << 20;
        let (mut child, addrs, mut log, _out) = spawn_server(
            stylealign_command()
                .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--max-size", "256"])
                .args(["--memory-budget", "512MiB", "--max-queue", "64", "--max-steps", "1000", "--drain-timeout-secs", "1"])
                .env_remove("STYLEALIGN_MEMORY_BUDGET"),
        );
        let addr = addrs[0].to_string();
        let me = Identity::client("rss");
        let mut c = loop {
            if let Ok(mut c) = stylealign::client::connect(&addr).await
                && c.list_models(me.request(pb::ListModelsRequest {}, None)).await.is_ok()
            {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let s = session(&mut c, &me, default_patch()).await;
        let pid = child.id();
        let png = pattern_png(2048, 2048);
        assert!(png.len() < 4 << 20, "{} bytes: over gRPC's default message limit", png.len());
        let idle = vm_rss(pid);

        // A long job holds the worker.
        let (long, _) = open_until(&mut c, &me, request(&s, &["busy"], 256, 900, 1), None, is_started).await;
        let mut queued = Vec::new();
        for i in 0..20 {
            let stream = c.generate(me.request(reference_request(&s, png.clone()), None)).await;
            queued.push(stream.unwrap_or_else(|e| panic!("request {i} refused: {e:?}")).into_inner());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let one_by_one = vm_rss(pid).saturating_sub(idle);
        eprintln!("RSS idle {idle} B; 20 reference requests queued one by one: +{one_by_one} B ({} B per request)", one_by_one / 20);
        assert!(one_by_one < budget, "RSS grew by {one_by_one} B, over the budget {budget} B");

        let mut sends = Vec::new();
        for _ in 0..20 {
            let (mut c, me, req) = (c.clone(), me.clone(), reference_request(&s, png.clone()));
            sends.push(tokio::spawn(async move { c.generate(me.request(req, None)).await }));
        }
        let mut refused = 0;
        for send in sends {
            match send.await.expect("send task") {
                Ok(stream) => queued.push(stream.into_inner()),
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
                    assert_eq!(reason(&e), "REFERENCE_POOL_FULL");
                    assert!(e.get_details_retry_info().is_some());
                    refused += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let growth = vm_rss(pid).saturating_sub(idle);
        assert_eq!(queued.len() + refused, 40);
        eprintln!("20 more at once: {} queued, {refused} refused; RSS +{growth} B over idle", queued.len() - 20);
        assert!(growth < budget, "RSS grew by {growth} B with {} requests queued, over the budget {budget} B", queued.len());
        drop(queued);
        drop(long);
        let _ = child.kill();
        let _ = child.wait();
        log.assert_no_panic();
    });
}

/// POST /v1/generate over the budget: 429 with `Retry-After` and the details in the body.
#[test]
fn http_route_gives_retry_after() {
    run(Duration::from_secs(120), || async {
        let cost = tiny_cost();
        let budget = budget_for_limit(cost.estimate(&shape(1, 64)).total);
        let server = start(ServeConfig { memory_budget: Some(budget), ..test_config() }).await;
        let mut c = connect(&server).await;
        let s = session(&mut c, &Identity::default(), default_patch()).await;
        let body = format!(r#"{{"sessionId":"{s}","prompts":["a cat"],"width":128,"height":128,"steps":2}}"#);
        let (head, json) = http_post(server.addr(), "/v1/generate", &body).await;
        assert!(head.starts_with("HTTP/1.1 429"), "{head}");
        let retry_after = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no Retry-After in {head}"));
        assert_eq!(retry_after, "60");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["status"], "RESOURCE_EXHAUSTED");
        let details = v["details"].as_array().unwrap();
        let info = details.iter().find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo").expect("ErrorInfo");
        assert_eq!(info["reason"], "OVER_MEMORY_BUDGET");
        assert_eq!(info["domain"], DOMAIN);
        let retry = details.iter().find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo").expect("RetryInfo");
        assert_eq!(retry["retryDelay"], "60s");
        // A field error over HTTP: every field, and no Retry-After.
        let body = format!(r#"{{"sessionId":"{s}","prompts":["a cat"],"width":65,"steps":9999}}"#);
        let (head, json) = http_post(server.addr(), "/v1/generate", &body).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("retry-after"));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["details"][0]["fieldViolations"].as_array().unwrap().len(), 2, "{v}");
        server.shutdown().await;
    });
}

/// `POST path` with a JSON body over plain HTTP/1.1; returns (status line and headers, body).
async fn http_post(addr: std::net::SocketAddr, path: &str, body: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}
