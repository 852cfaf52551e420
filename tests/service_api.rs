//! The gRPC service end to end: the real server on 127.0.0.1 (ephemeral ports, embedded tiny
//! model) and a real tonic client.

mod service_common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use service_common::*;
use stylealign::client::Identity;
use stylealign::pipeline::image::Image;
use stylealign::pipeline::tiny::tiny_pipeline;
use stylealign::pipeline::{BatchSpec, SetSpec};
use stylealign::sampling::sampler::SamplerKind;
use stylealign::serve::cancel::StopReason;
use stylealign::serve::metrics::Stats;
use stylealign::serve::pb::generate_response::Event;
use stylealign::serve::{SERVICE_NAME, ServeConfig, Server, Tokens, pb};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const LIMIT: Duration = Duration::from_secs(180);

fn who(id: &str) -> Identity {
    Identity::client(id)
}

/// The reproduction JSON of a PNG: its `stylealign` text chunk.
fn parameters(png: &[u8]) -> serde_json::Value {
    let (_, text) = Image::from_png(png).unwrap();
    let (_, json) = text.iter().find(|(k, _)| k == "stylealign").expect("stylealign chunk");
    serde_json::from_str(json).unwrap()
}

/// PatchModel → Generate gives the images the library gives when called directly, with every
/// parameter in the PNG; the same request gives the same bytes; the recorded parameters alone
/// reproduce the image.
#[test]
fn patch_generate_matches_library_and_reproduces() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = who("alice");
        let sess = c.patch_model(me.request(default_patch(), None)).await.unwrap().into_inner();
        assert!(sess.session_id.starts_with("sa1."), "a signed session token: {}", sess.session_id);
        assert_eq!(sess.model, "tiny");
        assert_eq!(sess.idle_ttl_seconds, 1800);
        let opts = sess.options.clone().unwrap();
        match opts.flavour.unwrap() {
            pb::patch_options::Flavour::Node(n) => {
                assert_eq!(n.share_norm, pb::ShareNorm::Both as i32);
                assert_eq!(n.share_attn, pb::ShareAttn::QK as i32);
                assert_eq!(n.scale, 1.0);
            }
            other => panic!("node options expected, got {other:?}"),
        }
        let sw = opts.switches.unwrap();
        assert!(sw.share_group_norm && sw.adain_q && sw.adain_k && !sw.adain_v && sw.gain == 1.0);
        assert!(sess.expires_at.unwrap().seconds > sess.created_at.unwrap().seconds);

        let prompts = ["a lighthouse, woodcut print", "a fox, woodcut print", "a teapot, woodcut print"];
        let req = request(&sess.session_id, &prompts, 32, 3, 1234);
        let r1 = generate(&mut c, &me, req.clone()).await.unwrap();
        assert_eq!(r1.images.len(), 3);
        assert_eq!(r1.steps, vec![1, 2, 3], "one progress event per step");
        assert_eq!(r1.positions.first(), Some(&0));
        assert!(r1.started.is_some());

        // The library, called directly.
        let p = tiny_pipeline(&Device::flex()).unwrap();
        let batch = BatchSpec::patched(32, 3, 7.5, SamplerKind::Ddim);
        let set = SetSpec {
            prompts: prompts.iter().map(|s| s.to_string()).collect(),
            negative_prompt: String::new(),
            seed: 1234,
            ..Default::default()
        };
        let direct = p.generate(&batch, &[set], &mut |_, _| vec![true]).unwrap().remove(0).unwrap();
        for (img, want) in r1.images.iter().zip(&direct) {
            let (got, _) = Image::from_png(&img.png).unwrap();
            assert_eq!(&got, want, "image {} differs from the library's", img.index);
        }

        // Parameters: everything needed to reproduce.
        for (i, img) in r1.images.iter().enumerate() {
            let v = parameters(&img.png);
            assert_eq!(v.to_string(), serde_json::from_str::<serde_json::Value>(&img.parameters).unwrap().to_string());
            assert_eq!(v["model"], "tiny");
            assert_eq!(v["model_family"], "SD1");
            assert_eq!(v["model_sha256"].as_str().unwrap().len(), 64, "the full SHA-256 of the model's UNet weights");
            assert_eq!(v["prompt"], prompts[i]);
            assert_eq!(v["index"], i);
            assert_eq!(v["prompts"].as_array().unwrap().len(), 3);
            assert_eq!(v["seed"], 1234);
            assert_eq!(v["steps"], 3);
            assert_eq!(v["sampler"], "ddim");
            assert_eq!(v["guidance_scale"], 7.5);
            assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(32), Some(32)));
            assert_eq!(v["negative_prompt"], "");
            assert_eq!(v["options"]["flavour"], "node");
            assert_eq!(v["options"]["share_norm"], "both");
            assert_eq!(v["options"]["share_attn"], "q+k");
            assert_eq!(v["options"]["scale"], 1.0);
            assert_eq!(img.prompt, prompts[i]);
            assert_eq!((img.width, img.height, img.seed), (32, 32, 1234));
        }

        // Same request, same seed: same bytes. Another seed: other images.
        let r2 = generate(&mut c, &me, req.clone()).await.unwrap();
        assert_eq!(pngs(&r1.images), pngs(&r2.images));
        let r3 = generate(&mut c, &me, pb::GenerateRequest { seed: Some(99), ..req.clone() }).await.unwrap();
        assert_ne!(pngs(&r1.images)[0], pngs(&r3.images)[0]);

        // Rebuild the request from the recorded parameters alone (new session, new client).
        let v = parameters(&r1.images[1].png);
        let other = who("bob");
        let mut c2 = connect(&server).await;
        let patch = pb::PatchModelRequest {
            model: v["model"].as_str().unwrap().into(),
            share_norm: pb::ShareNorm::from_str_name(&format!("SHARE_NORM_{}", v["options"]["share_norm"].as_str().unwrap().to_uppercase()))
                .unwrap() as i32,
            share_attn: match v["options"]["share_attn"].as_str().unwrap() {
                "q+k" => pb::ShareAttn::QK,
                "q+k+v" => pb::ShareAttn::QKV,
                _ => pb::ShareAttn::Disabled,
            } as i32,
            scale: Some(v["options"]["scale"].as_f64().unwrap() as f32),
            advanced: None,
            ..Default::default()
        };
        let s2 = session(&mut c2, &other, patch).await;
        let again = pb::GenerateRequest {
            session_id: s2,
            prompts: v["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect(),
            negative_prompt: v["negative_prompt"].as_str().unwrap().into(),
            seed: v["seed"].as_u64(),
            steps: v["steps"].as_u64().unwrap() as u32,
            guidance_scale: Some(v["guidance_scale"].as_f64().unwrap() as f32),
            width: v["width"].as_u64().unwrap() as u32,
            height: v["height"].as_u64().unwrap() as u32,
            sampler: pb::Sampler::Ddim as i32,
            ..Default::default()
        };
        let r4 = generate(&mut c2, &other, again).await.unwrap();
        assert_eq!(pngs(&r4.images), pngs(&r1.images), "parameters reproduce the images byte for byte");

        // One prompt × count equals the prompt repeated.
        let rep = generate(&mut c, &me, pb::GenerateRequest { prompts: vec!["a fox".into()], count: 3, ..req.clone() }).await.unwrap();
        let listed = generate(&mut c, &me, pb::GenerateRequest { prompts: vec!["a fox".into(); 3], ..req.clone() }).await.unwrap();
        assert_eq!(pngs(&rep.images), pngs(&listed.images));
        assert_eq!(rep.images.len(), 3);

        // Other samplers work end to end.
        for s in [pb::Sampler::Euler, pb::Sampler::EulerA, pb::Sampler::Dpmpp2m, pb::Sampler::Dpmpp2mKarras] {
            let r = generate(&mut c, &me, pb::GenerateRequest { sampler: s as i32, ..req.clone() }).await.unwrap();
            assert_eq!(r.images.len(), 3, "{s:?}");
            assert_eq!(parameters(&r.images[0].png)["sampler"], s.as_str_name().trim_start_matches("SAMPLER_").to_lowercase());
        }
        server.shutdown().await;
    });
}

/// N concurrent clients: each gets exactly the images it gets alone.
#[test]
fn concurrent_clients_get_their_own_images() {
    run(LIMIT, || async {
        let server = start(ServeConfig { cpu_workers: 2, max_batch_delay: Duration::from_millis(30), ..test_config() }).await;
        let n = 6;
        let mut tasks = Vec::new();
        for k in 0..n {
            let addr = server.addr().to_string();
            tasks.push(tokio::spawn(async move {
                let me = who(&format!("client-{k}"));
                let mut c = stylealign::client::connect(&addr).await.unwrap();
                let s = session(&mut c, &me, default_patch()).await;
                let prompts = [format!("a castle {k}, ink"), format!("a bridge {k}, ink")];
                let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
                let req = request(&s, &refs, 32, 3, 100 + k as u64);
                let r = generate(&mut c, &me, req.clone()).await.unwrap();
                (req, me, pngs(&r.images))
            }));
        }
        let results: Vec<_> = futures_join(tasks).await;
        let mut c = connect(&server).await;
        for (req, me, got) in results {
            assert_eq!(got.len(), 2);
            // Alone: a fresh session of the same client, nothing else running.
            let s = session(&mut c, &me, default_patch()).await;
            let alone = generate(&mut c, &me, pb::GenerateRequest { session_id: s, ..req }).await.unwrap();
            assert_eq!(pngs(&alone.images), got);
        }
        assert_eq!(Stats::get(&server.stats().sets_completed), 2 * n as u64);
        server.shutdown().await;
    });
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Queued compatible sets run in one UNet batch (each its own style group), with results
/// identical, byte for byte, to each set run alone; incompatible ones do not batch.
#[test]
fn batching_is_bit_exact_with_running_alone() {
    run(LIMIT, || async {
        let server = start(ServeConfig { max_batch_delay: Duration::from_millis(600), max_batch_rows: 8, ..test_config() }).await;
        let specs: Vec<(Vec<&'static str>, u64)> = vec![
            (vec!["a red barn, oil painting", "a horse, oil painting"], 1),
            (vec!["a city at night, neon", "a cat, neon", "a robot, neon"], 2),
            (vec!["a mountain, pixel art"], 3),
        ];
        // Clients and sessions first, then the three requests at once.
        let mut tasks = Vec::new();
        let mut ready = Vec::new();
        for k in 0..specs.len() {
            let me = who(&format!("batcher-{k}"));
            let mut c = connect(&server).await;
            let s = session(&mut c, &me, default_patch()).await;
            ready.push((c, me, s));
        }
        for ((mut c, me, s), (prompts, seed)) in ready.into_iter().zip(specs.iter().cloned()) {
            tasks.push(tokio::spawn(async move {
                let r = generate(&mut c, &me, request(&s, &prompts, 32, 4, seed)).await.unwrap();
                (r.started.unwrap(), pngs(&r.images))
            }));
        }
        let batched = futures_join(tasks).await;
        for (started, images) in &batched {
            assert_eq!(started.batch_sets, 3, "all three requests in one batch");
            assert_eq!(started.batch_rows, 6);
            assert!(!images.is_empty());
        }
        assert_eq!(Stats::get(&server.stats().batches), 1);
        server.shutdown().await;

        // Alone: batching off.
        let solo = start(ServeConfig { batching: false, ..test_config() }).await;
        let mut c = connect(&solo).await;
        let me = who("solo");
        let s = session(&mut c, &me, default_patch()).await;
        for ((prompts, seed), (_, batched_pngs)) in specs.iter().zip(&batched) {
            let r = generate(&mut c, &me, request(&s, prompts, 32, 4, *seed)).await.unwrap();
            assert_eq!(r.started.unwrap().batch_sets, 1);
            assert_eq!(&pngs(&r.images), batched_pngs, "batched set {prompts:?} equals running alone, bit for bit");
        }
        solo.shutdown().await;

        // Different patch options (or sizes) never share a batch.
        let server = start(ServeConfig { max_batch_delay: Duration::from_millis(400), ..test_config() }).await;
        let mut ready = Vec::new();
        for (k, patch) in [default_patch(), pb::PatchModelRequest { scale: Some(0.5), ..default_patch() }].into_iter().enumerate() {
            let me = who(&format!("mixed-{k}"));
            let mut c = connect(&server).await;
            let s = session(&mut c, &me, patch).await;
            ready.push((c, me, s));
        }
        let mut tasks = Vec::new();
        for (mut c, me, s) in ready {
            tasks.push(tokio::spawn(
                async move { generate(&mut c, &me, request(&s, &["a", "b"], 32, 2, 5)).await.unwrap().started.unwrap() },
            ));
        }
        for started in futures_join(tasks).await {
            assert_eq!(started.batch_sets, 1);
        }
        server.shutdown().await;
    });
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} mentioning {needle:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(s.message().contains(needle), "message {:?} should mention {needle:?}", s.message());
        }
    }
}

/// Every error path with its status code; messages name the field.
#[test]
fn error_paths_have_their_status_codes() {
    run(LIMIT, || async {
        let server = start(ServeConfig { limits: Limits { max_prompts: 4, max_steps: 50, ..test_config().limits }, ..test_config() }).await;
        let mut c = connect(&server).await;
        let me = who("errors");

        // PatchModel.
        let patch = |p: pb::PatchModelRequest| {
            let mut c = c.clone();
            let me = me.clone();
            async move { c.patch_model(me.request(p, None)).await.map(|r| r.into_inner()) }
        };
        assert_code(patch(pb::PatchModelRequest { model: "sdxl-base".into(), ..default_patch() }).await, Code::InvalidArgument, "`model`");
        assert_code(patch(pb::PatchModelRequest { model: "".into(), ..default_patch() }).await, Code::InvalidArgument, "`model`");
        assert_code(patch(pb::PatchModelRequest { scale: Some(1.5), ..default_patch() }).await, Code::InvalidArgument, "`scale`");
        assert_code(patch(pb::PatchModelRequest { scale: Some(-0.1), ..default_patch() }).await, Code::InvalidArgument, "`scale`");
        assert_code(patch(pb::PatchModelRequest { share_norm: 17, ..default_patch() }).await, Code::InvalidArgument, "`share_norm`");
        assert_code(patch(pb::PatchModelRequest { share_attn: 17, ..default_patch() }).await, Code::InvalidArgument, "`share_attn`");
        let adv = pb::OfficialArgs { only_self_level: Some(1.5), ..Default::default() };
        assert_code(
            patch(pb::PatchModelRequest { advanced: Some(adv), ..default_patch() }).await,
            Code::InvalidArgument,
            "`advanced.only_self_level`",
        );
        assert_code(
            patch(pb::PatchModelRequest { advanced: Some(Default::default()), share_norm: pb::ShareNorm::Group as i32, ..default_patch() })
                .await,
            Code::InvalidArgument,
            "`advanced`",
        );
        // The official flavour works and reports its resolved arguments.
        let official = patch(pb::PatchModelRequest {
            advanced: Some(pb::OfficialArgs { adain_values: Some(true), ..Default::default() }),
            ..default_patch()
        })
        .await
        .unwrap();
        match official.options.unwrap().flavour.unwrap() {
            pb::patch_options::Flavour::Official(a) => assert!(a.adain_values && a.share_group_norm && a.shared_score_scale == 1.0),
            other => panic!("{other:?}"),
        }

        // Generate.
        let s = session(&mut c, &me, default_patch()).await;
        let good = request(&s, &["a", "b"], 32, 2, 1);
        let gen_err = |r: pb::GenerateRequest, who: Identity| {
            let mut c = c.clone();
            async move { generate(&mut c, &who, r).await.map(|r| r.images.len()) }
        };
        assert_code(
            gen_err(pb::GenerateRequest { session_id: "".into(), ..good.clone() }, me.clone()).await,
            Code::InvalidArgument,
            "`session_id`",
        );
        assert_code(
            gen_err(pb::GenerateRequest { session_id: "0123456789abcdef0123456789abcdef".into(), ..good.clone() }, me.clone()).await,
            Code::NotFound,
            "not found",
        );
        assert_code(gen_err(good.clone(), who("mallory")).await, Code::NotFound, "not found");
        assert_code(gen_err(pb::GenerateRequest { prompts: vec![], ..good.clone() }, me.clone()).await, Code::InvalidArgument, "`prompts`");
        assert_code(
            gen_err(pb::GenerateRequest { prompts: vec!["x".into(); 5], ..good.clone() }, me.clone()).await,
            Code::InvalidArgument,
            "`prompts`",
        );
        assert_code(
            gen_err(pb::GenerateRequest { prompts: vec!["x".into()], count: 5, ..good.clone() }, me.clone()).await,
            Code::InvalidArgument,
            "`count`",
        );
        assert_code(gen_err(pb::GenerateRequest { count: 2, ..good.clone() }, me.clone()).await, Code::InvalidArgument, "`count`");
        assert_code(gen_err(pb::GenerateRequest { width: 40, ..good.clone() }, me.clone()).await, Code::InvalidArgument, "`width`");
        assert_code(gen_err(pb::GenerateRequest { height: 36, ..good.clone() }, me.clone()).await, Code::InvalidArgument, "`height`");
        assert_code(gen_err(pb::GenerateRequest { width: 512, ..good.clone() }, me.clone()).await, Code::InvalidArgument, "`width`");
        assert_code(gen_err(pb::GenerateRequest { steps: 51, ..good.clone() }, me.clone()).await, Code::InvalidArgument, "`steps`");
        assert_code(
            gen_err(pb::GenerateRequest { guidance_scale: Some(f32::NAN), ..good.clone() }, me.clone()).await,
            Code::InvalidArgument,
            "`guidance_scale`",
        );
        assert_code(
            gen_err(pb::GenerateRequest { guidance_scale: Some(1000.0), ..good.clone() }, me.clone()).await,
            Code::InvalidArgument,
            "`guidance_scale`",
        );
        assert_code(gen_err(pb::GenerateRequest { sampler: 42, ..good.clone() }, me.clone()).await, Code::InvalidArgument, "`sampler`");
        assert_code(gen_err(pb::GenerateRequest { priority: 42, ..good.clone() }, me.clone()).await, Code::InvalidArgument, "`priority`");
        assert_code(
            gen_err(pb::GenerateRequest { prompts: vec!["a".into(), "x".repeat(3000)], ..good.clone() }, me.clone()).await,
            Code::InvalidArgument,
            "`prompts[1]`",
        );
        // Bad metadata.
        let mut bad = me.request(good.clone(), None);
        bad.metadata_mut().insert("grpc-timeout", "soon".parse().unwrap());
        assert_code(c.clone().generate(bad).await.map(|_| ()), Code::InvalidArgument, "grpc-timeout");
        assert_code(gen_err(good.clone(), who(&"x".repeat(200))).await, Code::InvalidArgument, "x-client-id");
        // Nothing was queued by any of these.
        assert_eq!(Stats::get(&server.stats().batches), 0);
        assert_eq!(generate(&mut c.clone(), &me, good.clone()).await.unwrap().images.len(), 2);

        // Sessions.
        let get = |id: &str, w: &Identity| {
            let mut c = c.clone();
            let r = w.request(pb::GetSessionRequest { session_id: id.into() }, None);
            async move { c.get_session(r).await.map(|r| r.into_inner()) }
        };
        let release = |id: &str, w: &Identity| {
            let mut c = c.clone();
            let r = w.request(pb::ReleaseSessionRequest { session_id: id.into() }, None);
            async move { c.release_session(r).await.map(|r| r.into_inner()) }
        };
        let got = get(&s, &me).await.unwrap();
        assert_eq!(got.session_id, s);
        assert_code(get(&s, &who("mallory")).await, Code::NotFound, "not found");
        assert_code(get("", &me).await, Code::InvalidArgument, "`session_id`");
        assert_code(release(&s, &who("mallory")).await, Code::NotFound, "not found");
        release(&s, &me).await.unwrap();
        assert_code(release(&s, &me).await, Code::NotFound, "not found");
        assert_code(get(&s, &me).await, Code::NotFound, "not found");
        assert_code(gen_err(good.clone(), me.clone()).await, Code::NotFound, "not found");
        server.shutdown().await;
    });
}

/// Session limits: per-client cap evicts that client's LRU session; the global cap refuses
/// (RESOURCE_EXHAUSTED); idle sessions expire.
#[test]
fn session_caps_and_ttl() {
    run(LIMIT, || async {
        let server =
            start(ServeConfig { max_sessions_per_client: 2, max_sessions: 3, session_ttl: Duration::from_millis(400), ..test_config() })
                .await;
        let mut c = connect(&server).await;
        let (a, b) = (who("a"), who("b"));
        let a1 = session(&mut c, &a, default_patch()).await;
        let a2 = session(&mut c, &a, default_patch()).await;
        let b1 = session(&mut c, &b, default_patch()).await;
        // Global cap reached (3).
        let r = c.patch_model(who("c").request(default_patch(), None)).await;
        assert_code(r, Code::ResourceExhausted, "maximum");
        // Touch a1, then a third session of `a` evicts a2 (a's LRU), not b's.
        c.get_session(a.request(pb::GetSessionRequest { session_id: a1.clone() }, None)).await.unwrap();
        let a3 = session(&mut c, &a, default_patch()).await;
        let alive = |id: String, w: Identity| {
            let mut c = c.clone();
            async move { c.get_session(w.request(pb::GetSessionRequest { session_id: id }, None)).await.is_ok() }
        };
        assert!(!alive(a2.clone(), a.clone()).await, "a2 evicted");
        assert!(alive(a1.clone(), a.clone()).await);
        assert!(alive(a3.clone(), a.clone()).await);
        assert!(alive(b1.clone(), b.clone()).await);
        // TTL: idle sessions go.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!alive(b1, b.clone()).await, "expired");
        assert!(session(&mut c, &who("c"), default_patch()).await.starts_with("sa1."), "expired sessions free the global cap");
        server.shutdown().await;
    });
}

/// Bearer-token auth: identity from the token; no/unknown token is UNAUTHENTICATED; sessions
/// are per identity.
#[test]
fn auth_tokens_identify_clients() {
    run(LIMIT, || async {
        let tokens = Tokens::parse("alice=tok-alice\nbob=tok-bob").unwrap();
        let server = start(ServeConfig { auth: Some(tokens), ..test_config() }).await;
        let mut c = connect(&server).await;
        let alice = Identity { token: Some("tok-alice".into()), client_id: None };
        let bob = Identity { token: Some("tok-bob".into()), client_id: Some("alice".into()) };
        assert_code(
            c.list_models(Identity::default().request(pb::ListModelsRequest {}, None)).await,
            Code::Unauthenticated,
            "authorization",
        );
        let wrong = Identity { token: Some("nope".into()), client_id: None };
        assert_code(c.patch_model(wrong.request(default_patch(), None)).await, Code::Unauthenticated, "unknown token");
        let s = session(&mut c, &alice, default_patch()).await;
        // x-client-id is ignored when auth is on: bob cannot pose as alice.
        assert_code(c.get_session(bob.request(pb::GetSessionRequest { session_id: s.clone() }, None)).await, Code::NotFound, "not found");
        let r = generate(&mut c, &alice, request(&s, &["a"], 32, 2, 1)).await.unwrap();
        assert_eq!(r.images.len(), 1);
        server.shutdown().await;
    });
}

/// ListModels: the loaded models with family and native size; limits and samplers.
#[test]
fn list_models_describes_the_tiny_model() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let r = c.list_models(who("x").request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner();
        assert_eq!(r.models.len(), 1);
        let m = &r.models[0];
        assert_eq!(m.name, "tiny");
        assert_eq!(m.family, pb::Family::Sd1 as i32);
        assert_eq!((m.native_width, m.native_height, m.size_multiple), (64, 64, 16));
        assert_eq!(r.samplers, ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]);
        assert_eq!(r.default_steps, 3);
        // Width 0 means native.
        let s = session(&mut c, &who("x"), default_patch()).await;
        let img = generate(&mut c, &who("x"), pb::GenerateRequest { width: 0, height: 0, ..request(&s, &["a"], 0, 1, 1) }).await.unwrap();
        assert_eq!((img.images[0].width, img.images[0].height), (64, 64));
        server.shutdown().await;
    });
}

async fn health(ch: tonic::transport::Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let r = HealthClient::new(ch).check(HealthCheckRequest { service: service.into() }).await?;
    Ok(r.into_inner().status())
}

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Health: NOT_SERVING until loaded and warm, SERVING, NOT_SERVING while draining (overall and
/// per service, on the API port and the admin port); StyleAlign calls UNAVAILABLE outside
/// SERVING. Admin /healthz and /metrics.
#[test]
fn health_transitions_and_admin_endpoints() {
    run(LIMIT, || async {
        let server = Server::bind(test_config()).await.unwrap();
        let (api, admin) = (channel(server.addr()).await, channel(server.admin_addr().unwrap()).await);
        for ch in [&api, &admin] {
            assert_eq!(health(ch.clone(), "").await.unwrap(), ServingStatus::NotServing);
            assert_eq!(health(ch.clone(), SERVICE_NAME).await.unwrap(), ServingStatus::NotServing);
        }
        assert_eq!(health(api.clone(), "no.such.Service").await.unwrap_err().code(), Code::NotFound);
        let mut c = connect(&server).await;
        assert_code(c.list_models(who("x").request(pb::ListModelsRequest {}, None)).await, Code::Unavailable, "warming up");
        assert_eq!(http_get(server.admin_addr().unwrap(), "/healthz").await.0, 503);

        server.load().await.unwrap();
        for ch in [&api, &admin] {
            assert_eq!(health(ch.clone(), "").await.unwrap(), ServingStatus::Serving);
            assert_eq!(health(ch.clone(), SERVICE_NAME).await.unwrap(), ServingStatus::Serving);
        }
        assert_eq!(http_get(server.admin_addr().unwrap(), "/healthz").await.0, 200);
        let s = session(&mut c, &who("x"), default_patch()).await;
        generate(&mut c, &who("x"), request(&s, &["a"], 32, 2, 1)).await.unwrap();
        let (code, body) = http_get(server.admin_addr().unwrap(), "/metrics").await;
        assert_eq!(code, 200);
        for name in [
            "stylealign_requests_total",
            "stylealign_queue_depth",
            "stylealign_queue_time_seconds",
            "stylealign_step_time_seconds",
            "stylealign_batch_rows",
            "stylealign_sessions",
            "stylealign_images_total",
        ] {
            assert!(body.contains(name), "/metrics lacks {name}");
        }
        assert!(body.contains("method=\"Generate\"") && body.contains("code=\"OK\""), "requests by outcome");

        server.begin_drain().await;
        for ch in [&api, &admin] {
            assert_eq!(health(ch.clone(), "").await.unwrap(), ServingStatus::NotServing);
            assert_eq!(health(ch.clone(), SERVICE_NAME).await.unwrap(), ServingStatus::NotServing);
        }
        assert_code(generate(&mut c, &who("x"), request(&s, &["a"], 32, 2, 1)).await, Code::Unavailable, "shutting down");
        assert_code(c.patch_model(who("x").request(default_patch(), None)).await, Code::Unavailable, "shutting down");
        assert_eq!(http_get(server.admin_addr().unwrap(), "/healthz").await.0, 503);
        server.shutdown().await;
    });
}

/// Server reflection v1 and v1alpha list the services and serve their descriptors.
#[test]
fn reflection_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let ch = channel(server.addr()).await;
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
        };
        let mut s = v1::server_reflection_client::ServerReflectionClient::new(ch.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let resp = s.message().await.unwrap().unwrap();
        let names: Vec<String> = match resp.message_response.unwrap() {
            v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => l.service.into_iter().map(|s| s.name).collect(),
            other => panic!("{other:?}"),
        };
        for want in [SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "stylealign.v1.GenerateRequest".into(),
            )),
        };
        let mut s = v1::server_reflection_client::ServerReflectionClient::new(ch.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        match s.message().await.unwrap().unwrap().message_response.unwrap() {
            v1::server_reflection_response::MessageResponse::FileDescriptorResponse(f) => assert!(!f.file_descriptor_proto.is_empty()),
            other => panic!("{other:?}"),
        }
        let req = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
        };
        let mut s = v1alpha::server_reflection_client::ServerReflectionClient::new(ch)
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        match s.message().await.unwrap().unwrap().message_response.unwrap() {
            v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
                assert!(l.service.iter().any(|s| s.name == SERVICE_NAME))
            }
            other => panic!("{other:?}"),
        }
        server.shutdown().await;
    });
}

/// A long request that holds the single worker until dropped.
async fn blocker(server: &Server) -> tonic::Streaming<pb::GenerateResponse> {
    let mut c = connect(server).await;
    let me = who("blocker");
    let s = session(&mut c, &me, pb::PatchModelRequest { scale: Some(0.25), ..default_patch() }).await;
    let (stream, _) = open_until(&mut c, &me, request(&s, &["slow", "slow"], 64, 150, 1), None, |e| matches!(e, Event::Progress(_))).await;
    stream
}

/// Client cancel: the cancelled set's rows leave the batch within one step; its batch-mate
/// finishes with exactly the images it gets alone.
#[test]
fn cancel_stops_within_a_step_and_spares_batch_mates() {
    run(LIMIT, || async {
        let server = start(ServeConfig { max_batch_delay: Duration::from_millis(500), ..test_config() }).await;
        let mut c = connect(&server).await;
        let (a, b) = (who("canceller"), who("stayer"));
        let sa = session(&mut c, &a, default_patch()).await;
        let sb = session(&mut c, &b, default_patch()).await;
        let steps = 40;
        let ra = request(&sa, &["a tower, charcoal", "a boat, charcoal"], 64, steps, 11);
        let rb = request(&sb, &["a tree, charcoal", "a bird, charcoal"], 64, steps, 22);
        let mut cb = c.clone();
        let b2 = b.clone();
        let rb2 = rb.clone();
        let stayer = tokio::spawn(async move { generate(&mut cb, &b2, rb2).await });
        let (stream_a, seen) = open_until(&mut c, &a, ra, None, |e| matches!(e, Event::Progress(p) if p.step >= 3)).await;
        let started = seen.iter().find_map(|e| if let Event::Started(s) = e { Some(*s) } else { None }).unwrap();
        assert_eq!(started.batch_sets, 2, "the two requests share a batch");
        drop(stream_a); // client cancel
        let b_result = stayer.await.unwrap().unwrap();
        assert_eq!(b_result.images.len(), 2);
        assert_eq!(b_result.steps.len(), steps as usize, "the batch-mate ran every step");

        let stops = server.stats().stops();
        assert_eq!(stops.len(), 1, "{stops:?}");
        let stop = &stops[0];
        assert_eq!(stop.reason, StopReason::ClientGone);
        assert!(stop.requested_at_step >= 3);
        assert!(stop.stopped_after_step <= stop.requested_at_step + 1, "stopped within one step: {stop:?}");
        assert!(stop.stopped_after_step < steps);

        // The batch-mate's images equal running alone.
        let alone = generate(&mut c, &b, rb).await.unwrap();
        assert_eq!(alone.started.unwrap().batch_sets, 1);
        assert_eq!(pngs(&alone.images), pngs(&b_result.images));
        server.shutdown().await;
    });
}

/// Deadlines: expired while queued → DEADLINE_EXCEEDED without running; expired mid-run →
/// stopped at the next step.
#[test]
fn deadlines_in_queue_and_mid_run() {
    run(LIMIT, || async {
        let server = start(ServeConfig { batching: false, ..test_config() }).await;
        let hold = blocker(&server).await;
        let mut c = connect(&server).await;
        let me = who("hurried");
        let s = session(&mut c, &me, default_patch()).await;
        let t = Instant::now();
        let r = stylealign::client::generate(&mut c, &me, request(&s, &["a"], 32, 2, 1), Some(Duration::from_millis(300)), |_| {}).await;
        let waited = t.elapsed();
        assert_code(r, Code::DeadlineExceeded, "while queued");
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "{waited:?}");
        assert_eq!(Stats::get(&server.stats().expired_in_queue), 1);
        drop(hold);
        eventually(Duration::from_secs(10), "idle", || server.engine().is_idle()).await;
        assert_eq!(Stats::get(&server.stats().batches), 1, "the expired request never ran");

        // Mid-run: a 150-step request with a 1.5 s deadline.
        let t = Instant::now();
        let r = stylealign::client::generate(&mut c, &me, request(&s, &["b", "c"], 64, 150, 2), Some(Duration::from_millis(1500)), |_| {})
            .await;
        assert_code(r, Code::DeadlineExceeded, "while running");
        assert!(t.elapsed() < Duration::from_secs(5));
        eventually(Duration::from_secs(10), "stop recorded", || server.stats().stops().iter().any(|s| s.reason == StopReason::Deadline))
            .await;
        let stop = server.stats().stops().into_iter().find(|s| s.reason == StopReason::Deadline).unwrap();
        assert!(stop.stopped_after_step < 150, "{stop:?}");
        assert!(stop.stopped_after_step <= stop.requested_at_step + 1, "stopped at the next step: {stop:?}");
        server.shutdown().await;
    });
}

/// A full admission queue answers RESOURCE_EXHAUSTED at once.
#[test]
fn queue_full_is_resource_exhausted_at_once() {
    run(LIMIT, || async {
        let server = start(ServeConfig { batching: false, max_queue: 1, ..test_config() }).await;
        let hold = blocker(&server).await;
        let mut c = connect(&server).await;
        let me = who("queuer");
        let s = session(&mut c, &me, default_patch()).await;
        let (waiting, _) = open_until(&mut c, &me, request(&s, &["a"], 32, 2, 1), None, is_queued).await;
        let t = Instant::now();
        assert_code(generate(&mut c, &me, request(&s, &["b"], 32, 2, 2)).await, Code::ResourceExhausted, "queue full");
        assert!(t.elapsed() < Duration::from_millis(500), "refused at once, not after waiting: {:?}", t.elapsed());
        drop(hold);
        assert_eq!(finish(waiting).await.unwrap().len(), 1, "the queued request still runs");
        server.shutdown().await;
    });
}

/// Priorities: higher first, FIFO within a priority; queue positions are reported while waiting.
#[test]
fn priorities_and_queue_positions() {
    run(LIMIT, || async {
        let server = start(ServeConfig { batching: false, ..test_config() }).await;
        let hold = blocker(&server).await;
        let mut c = connect(&server).await;
        let me = who("prio");
        let s = session(&mut c, &me, default_patch()).await;
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = HashMap::new();
        for (name, prio) in [
            ("low", pb::Priority::Low),
            ("normal-1", pb::Priority::Normal),
            ("high", pb::Priority::High),
            ("normal-2", pb::Priority::Unspecified),
        ] {
            let req = pb::GenerateRequest { priority: prio as i32, ..request(&s, &[name], 32, 6, 1) };
            let (stream, seen) = open_until(&mut c, &me, req, None, is_queued).await;
            assert!(matches!(seen.last(), Some(Event::Queued(_))));
            let order = order.clone();
            tasks.insert(
                name,
                tokio::spawn(async move {
                    let mut positions = Vec::new();
                    let mut s = stream;
                    if let Some(Event::Queued(q)) = seen.last() {
                        positions.push(q.position);
                    }
                    while let Some(m) = s.message().await.unwrap() {
                        match m.event.unwrap() {
                            Event::Queued(q) => positions.push(q.position),
                            Event::Started(_) => order.lock().unwrap().push(name),
                            _ => {}
                        }
                    }
                    positions
                }),
            );
        }
        drop(hold);
        let mut positions = HashMap::new();
        for (name, t) in tasks {
            positions.insert(name, t.await.unwrap());
        }
        assert_eq!(*order.lock().unwrap(), ["high", "normal-1", "normal-2", "low"]);
        // low: alone (0), behind normal-1 (1), behind high (2), behind normal-2 (3), then moving up.
        assert_eq!(positions["low"], [0, 1, 2, 3, 2, 1, 0]);
        assert_eq!(positions["high"], [0]);
        server.shutdown().await;
    });
}
