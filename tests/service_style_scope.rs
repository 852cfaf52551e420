//! Style sharing per UNet level and per step window, end to end: PatchModel's `window` and
//! `levels` over gRPC and HTTP/JSON on the real server (embedded tiny model: down.0..down.2, mid,
//! up.0..up.2, out), their errors, the echo in Session, and the PNG metadata.

mod service_common;

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use service_common::*;
use stylealign::client::Identity;
use stylealign::pipeline::image::Image;
use stylealign::serve::pb;
use tonic::Code;
use tonic_types::StatusExt as _;

const LIMIT: Duration = Duration::from_secs(300);

const LEVELS: [&str; 8] = ["down.0", "down.1", "down.2", "mid", "up.0", "up.1", "up.2", "out"];

fn window(start: f32, end: f32) -> Option<pb::StepWindow> {
    Some(pb::StepWindow { start: Some(start), end: Some(end) })
}

fn level(name: &str) -> pb::LevelOptions {
    pb::LevelOptions { name: name.into(), ..Default::default() }
}

fn off(name: &str) -> pb::LevelOptions {
    pb::LevelOptions { enabled: Some(false), ..level(name) }
}

/// The decoded pixels of a set's images and the `stylealign` JSON of the first target.
fn pixels(images: &[pb::GeneratedImage]) -> Vec<Vec<u8>> {
    images.iter().map(|i| Image::from_png(&i.png).unwrap().0.rgb).collect()
}

fn png_text(png: &[u8], key: &str) -> String {
    let (_, text) = Image::from_png(png).unwrap();
    text.into_iter().find(|(k, _)| k == key).map(|(_, v)| v).unwrap_or_else(|| panic!("no {key} chunk"))
}

fn fields(e: &tonic::Status) -> Vec<String> {
    e.get_details_bad_request().map(|b| b.field_violations.into_iter().map(|v| v.field).collect()).unwrap_or_default()
}

const PROMPTS: [&str; 3] = ["a lighthouse, linocut print", "a fox, linocut print", "a bicycle, linocut print"];

/// A window or level options change the targets; the explicit defaults (window [0, 1], every
/// level listed with the session's switches) give the default session's pixels exactly; a
/// window that patches no step equals every level switched off; the echo lists every level.
#[test]
fn window_and_levels_change_images_and_explicit_defaults_do_not() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("scope");
        let explicit = pb::PatchModelRequest {
            window: window(0.0, 1.0),
            levels: LEVELS
                .iter()
                .map(|n| pb::LevelOptions {
                    enabled: Some(true),
                    gain: Some(1.0),
                    share_group_norm: Some(true),
                    share_attention: Some(true),
                    ..level(n)
                })
                .collect(),
            ..default_patch()
        };
        let sessions = [
            ("default", default_patch()),
            ("explicit defaults", explicit),
            ("window 0..0.5", pb::PatchModelRequest { window: window(0.0, 0.5), ..default_patch() }),
            ("window 0.5..1", pb::PatchModelRequest { window: window(0.5, 1.0), ..default_patch() }),
            ("up.1 off", pb::PatchModelRequest { levels: vec![off("up.1")], ..default_patch() }),
            (
                "down.1 gain 0.3",
                pb::PatchModelRequest { levels: vec![pb::LevelOptions { gain: Some(0.3), ..level("down.1") }], ..default_patch() },
            ),
            (
                "mid attention off",
                pb::PatchModelRequest {
                    levels: vec![pb::LevelOptions { share_attention: Some(false), ..level("mid") }],
                    ..default_patch()
                },
            ),
            ("no step patched", pb::PatchModelRequest { window: window(0.3, 0.45), ..default_patch() }),
            ("every level off", pb::PatchModelRequest { levels: LEVELS.iter().map(|n| off(n)).collect(), ..default_patch() }),
        ];
        let mut out = Vec::new();
        for (name, patch) in sessions {
            let s = c.patch_model(me.request(patch, None)).await.expect("PatchModel").into_inner();
            let set = generate(&mut c, &me, request(&s.session_id, &PROMPTS, 32, 4, 21)).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            out.push((name, s, pixels(&set.images), set.images));
        }
        let get = |name: &str| out.iter().find(|o| o.0 == name).unwrap();
        let default = &get("default").2;
        assert_eq!(&get("explicit defaults").2, default, "explicit defaults reproduce the default session's pixels");
        for name in ["window 0..0.5", "window 0.5..1", "up.1 off", "down.1 gain 0.3", "mid attention off", "no step patched"] {
            let px = &get(name).2;
            assert!(px[1..] != default[1..], "{name}: the targets must change");
        }
        assert!(get("window 0..0.5").2[1..] != get("window 0.5..1").2[1..]);
        assert_eq!(get("no step patched").2, get("every level off").2, "no patched step = every level plain");

        // The echo: the window and every level of the model, resolved.
        let opts = get("up.1 off").1.options.clone().unwrap();
        assert_eq!(opts.window, window(0.0, 1.0));
        assert_eq!(opts.levels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), LEVELS);
        for l in &opts.levels {
            let on = l.name != "up.1";
            assert_eq!((l.enabled, l.share_group_norm, l.share_attention, l.gain), (Some(on), Some(on), Some(on), Some(1.0)), "{l:?}");
        }
        let opts = get("window 0..0.5").1.options.clone().unwrap();
        assert_eq!(opts.window, window(0.0, 0.5));
        let got = c
            .get_session(me.request(pb::GetSessionRequest { session_id: get("window 0..0.5").1.session_id.clone() }, None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.options, Some(opts));

        // The PNG metadata records them (JSON and infotext); the default session's has neither.
        let (_, _, _, images) = get("down.1 gain 0.3");
        let v: Value = serde_json::from_str(&png_text(&images[1].png, "stylealign")).unwrap();
        assert_eq!(v["levels"], json!([{"name": "down.1", "gain": 0.3}]));
        assert!(v.get("window").is_none());
        assert!(png_text(&images[1].png, "parameters").contains("StyleAligned levels: \"down.1:gain=0.3\""));
        let (_, _, _, images) = get("window 0..0.5");
        let v: Value = serde_json::from_str(&png_text(&images[1].png, "stylealign")).unwrap();
        assert_eq!(v["window"], json!({"start": 0.0, "end": 0.5}));
        assert!(png_text(&images[1].png, "parameters").contains("StyleAligned window: \"0.0, 0.5\""));
        let (_, _, _, images) = get("default");
        let v: Value = serde_json::from_str(&png_text(&images[1].png, "stylealign")).unwrap();
        assert!(v.get("window").is_none() && v.get("levels").is_none(), "{v}");
        assert!(!png_text(&images[1].png, "parameters").contains("StyleAligned window"));
        server.shutdown().await;
    });
}

/// Bad windows and levels: INVALID_ARGUMENT naming each field, with the model's levels.
#[test]
fn bad_windows_and_levels_name_their_fields() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let me = Identity::client("scope-errors");
        let cases: Vec<(pb::PatchModelRequest, Vec<&str>, &str)> = vec![
            (
                pb::PatchModelRequest { levels: vec![level("down.7")], ..default_patch() },
                vec!["levels[0].name"],
                "unknown level \"down.7\"; this model has down.0..down.2, mid, up.0..up.2, out",
            ),
            (
                pb::PatchModelRequest { levels: vec![level("mid"), level("up.1"), level("middle")], ..default_patch() },
                vec!["levels[2].name"],
                "middle",
            ),
            (pb::PatchModelRequest { levels: vec![level("out"), level("out")], ..default_patch() }, vec!["levels[1].name"], "given twice"),
            (
                pb::PatchModelRequest { levels: vec![pb::LevelOptions { gain: Some(f32::NAN), ..level("up.0") }], ..default_patch() },
                vec!["levels[0].gain"],
                "not a finite number",
            ),
            (pb::PatchModelRequest { window: window(0.6, 0.4), ..default_patch() }, vec!["window.end"], "greater than window.start"),
            (
                pb::PatchModelRequest { window: Some(pb::StepWindow { start: Some(-0.5), end: None }), ..default_patch() },
                vec!["window.start"],
                "outside [0, 1]",
            ),
            (
                pb::PatchModelRequest { window: Some(pb::StepWindow { start: None, end: Some(1.5) }), ..default_patch() },
                vec!["window.end"],
                "outside [0, 1]",
            ),
            (
                pb::PatchModelRequest { levels: (0..20).map(|_| level("mid")).collect(), ..default_patch() },
                vec!["levels"],
                "20 entries; this model has 8 levels",
            ),
            (
                pb::PatchModelRequest { scale: Some(2.0), window: window(1.0, 1.0), levels: vec![level("up.9")], ..default_patch() },
                vec!["scale", "window.end", "levels[0].name"],
                "",
            ),
        ];
        for (req, want, needle) in cases {
            let e = c.patch_model(me.request(req.clone(), None)).await.unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{req:?}: {e:?}");
            assert_eq!(fields(&e), want, "{req:?}: {}", e.message());
            let text = format!("{} {:?}", e.message(), e.get_details_bad_request());
            assert!(text.contains(needle), "{text:?} should mention {needle:?}");
        }
        assert_eq!(server.state().sessions.len(), 0, "no session is created by a bad request");
        server.shutdown().await;
    });
}

/// HTTP/JSON: the same fields (lowerCamelCase or proto names), the same echo, the same images,
/// the same errors as gRPC.
#[test]
fn http_json_window_and_levels() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let http: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let base = format!("http://{}", server.addr());
        let post = |body: Value| {
            let http = http.clone();
            let uri = format!("{base}/v1/sessions");
            async move {
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(uri)
                    .header("x-client-id", "web")
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap();
                let r = http.request(req).await.expect("HTTP request");
                let status = r.status();
                let bytes = r.into_body().collect().await.unwrap().to_bytes();
                (status, serde_json::from_slice::<Value>(&bytes).unwrap())
            }
        };
        let (status, created) = post(json!({
            "model": "tiny",
            "window": {"start": 0.25, "end": 1},
            "levels": [{"name": "up.1", "enabled": false}, {"name": "down.0", "gain": 0.5, "share_group_norm": false}]
        }))
        .await;
        assert_eq!(status, StatusCode::OK, "{created}");
        assert_eq!(created["options"]["window"], json!({"start": 0.25, "end": 1.0}), "{created}");
        assert_eq!(
            created["options"]["levels"][0],
            json!({"name": "down.0", "enabled": true, "gain": 0.5, "shareGroupNorm": false, "shareAttention": true})
        );
        assert_eq!(created["options"]["levels"][5]["enabled"], false);
        let created: pb::Session = serde_json::from_value(created).unwrap();

        let me = Identity::client("web");
        let mut c = connect(&server).await;
        let grpc = c
            .patch_model(me.request(
                pb::PatchModelRequest {
                    window: Some(pb::StepWindow { start: Some(0.25), end: None }),
                    levels: vec![off("up.1"), pb::LevelOptions { gain: Some(0.5), share_group_norm: Some(false), ..level("down.0") }],
                    ..default_patch()
                },
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(created.options, grpc.options);
        let a = generate(&mut c, &me, request(&created.session_id, &PROMPTS, 32, 4, 5)).await.unwrap();
        let b = generate(&mut c, &me, request(&grpc.session_id, &PROMPTS, 32, 4, 5)).await.unwrap();
        assert_eq!(pngs(&a.images), pngs(&b.images), "the same options give the same PNGs");

        let (status, body) = post(json!({"model": "tiny", "levels": [{"name": "down.3"}]})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["details"][0]["fieldViolations"][0]["field"], "levels[0].name", "{body}");
        assert!(body["message"].as_str().unwrap().contains("this model has down.0..down.2, mid, up.0..up.2, out"), "{body}");
        let (status, body) = post(json!({"model": "tiny", "window": {"start": 0.9, "end": 0.1}})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["details"][0]["fieldViolations"][0]["field"], "window.end", "{body}");
        server.shutdown().await;
    });
}
