//! The HTTP/JSON routes end to end: the real server on 127.0.0.1 (ephemeral ports, embedded tiny
//! model), a plain HTTP/1.1 client (hyper-util) on the API port, and the gRPC client on the same
//! port for comparison.

mod service_common;

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use service_common::*;
use stylealign::client::Identity;
use stylealign::serve::cancel::StopReason;
use stylealign::serve::http::MAX_BODY_BYTES;
use stylealign::serve::metrics::Stats;
use stylealign::serve::pb;
use stylealign::serve::pb::generate_response::Event;
use stylealign::serve::{ServeConfig, Server, Tokens};

const LIMIT: Duration = Duration::from_secs(180);

/// A plain HTTP/1.1 client for one server, with fixed request headers.
#[derive(Clone)]
struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    headers: Vec<(String, String)>,
}

impl Http {
    fn new(addr: std::net::SocketAddr) -> Self {
        Self { client: Client::builder(TokioExecutor::new()).build_http(), base: format!("http://{addr}"), headers: Vec::new() }
    }

    /// The same client with one more header.
    fn with(&self, name: &str, value: &str) -> Self {
        let mut c = self.clone();
        c.headers.push((name.to_string(), value.to_string()));
        c
    }

    async fn send(&self, method: Method, path: &str, body: Vec<u8>) -> axum::http::Response<hyper::body::Incoming> {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        self.client.request(req.body(Full::new(Bytes::from(body))).unwrap()).await.expect("HTTP request")
    }

    /// A call answered with JSON: (status, body).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_raw(method, path, body.map(|b| b.to_string().into_bytes()).unwrap_or_default()).await
    }

    async fn call_raw(&self, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let r = self.send(method, path, body).await;
        let status = r.status();
        let bytes = r.into_body().collect().await.expect("body").to_bytes();
        if bytes.is_empty() {
            return (status, Value::Null);
        }
        let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
        (status, v)
    }

    /// `POST /v1/generate`: the response's status and, on 200, its event stream.
    async fn generate(&self, body: Value) -> Result<SseStream, (StatusCode, Value)> {
        let r = self.send(Method::POST, "/v1/generate", body.to_string().into_bytes()).await;
        if r.status() != StatusCode::OK {
            let status = r.status();
            let bytes = r.into_body().collect().await.unwrap().to_bytes();
            return Err((status, serde_json::from_slice(&bytes).expect("JSON error body")));
        }
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        Ok(SseStream { body: r.into_body(), buf: String::new() })
    }
}

/// A server-sent event stream, read incrementally.
struct SseStream {
    body: hyper::body::Incoming,
    buf: String,
}

impl SseStream {
    /// The next event (name, data); comments are skipped. `None` at the end of the body.
    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut name, mut data) = (None, Vec::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = Some(v.trim_start().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                    }
                }
                if name.is_some() || !data.is_empty() {
                    return Some((name.unwrap_or_else(|| "message".into()), data.join("\n")));
                }
            }
            match self.body.frame().await {
                None => return None,
                Some(frame) => {
                    if let Ok(data) = frame.expect("SSE body").into_data() {
                        self.buf.push_str(std::str::from_utf8(&data).expect("UTF-8 SSE"));
                    }
                }
            }
        }
    }

    /// Every remaining event.
    async fn all(mut self) -> Vec<(String, String)> {
        let mut events = Vec::new();
        while let Some(e) = self.next().await {
            events.push(e);
        }
        events
    }

    /// Reads until `until` matches an event; returns the stream and the events read.
    async fn until(mut self, until: impl Fn(&str, &Value) -> bool) -> (Self, Vec<(String, String)>) {
        let mut seen = Vec::new();
        loop {
            let (name, data) = self.next().await.expect("stream ended early");
            let v: Value = serde_json::from_str(&data).unwrap();
            let done = until(&name, &v);
            seen.push((name, data));
            if done {
                return (self, seen);
            }
        }
    }
}

/// The images of an event list, decoded as protobuf messages from their JSON.
fn images(events: &[(String, String)]) -> Vec<pb::GeneratedImage> {
    events
        .iter()
        .filter(|(n, _)| n == "image")
        .map(|(_, d)| match serde_json::from_str::<pb::GenerateResponse>(d).unwrap().event {
            Some(Event::Image(i)) => i,
            other => panic!("an image event carries {other:?}"),
        })
        .collect()
}

fn assert_error(got: (StatusCode, Value), status: u16, code: &str, needle: &str) {
    let (s, body) = got;
    assert_eq!(s.as_u16(), status, "{body}");
    assert_eq!(body["status"], code, "{body}");
    assert!(body["code"].is_i64(), "{body}");
    assert!(body["details"].is_array(), "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(needle), "message {message:?} should mention {needle:?}");
}

/// The field named by an error body's `google.rpc.BadRequest` detail.
fn violated_field(body: &Value) -> &str {
    assert_eq!(body["details"][0]["@type"], "type.googleapis.com/google.rpc.BadRequest", "{body}");
    body["details"][0]["fieldViolations"][0]["field"].as_str().unwrap()
}

/// Every route answers what the gRPC call answers; Generate's events arrive in order and its
/// images (also with a real-image reference, sent as base64) equal the gRPC result byte for byte.
#[test]
fn every_route_matches_grpc() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let http = Http::new(server.addr()).with("x-client-id", "web");
        let me = Identity::client("web");
        let mut c = connect(&server).await;

        // ListModels.
        let (status, models) = http.call(Method::GET, "/v1/models", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(models["models"][0]["family"], "FAMILY_SD1", "enums by name: {models}");
        assert_eq!(models["models"][0]["nativeWidth"], 64, "lowerCamelCase names: {models}");
        let grpc_models = c.list_models(me.request(pb::ListModelsRequest {}, None)).await.unwrap().into_inner();
        assert_eq!(serde_json::from_value::<pb::ListModelsResponse>(models).unwrap(), grpc_models);

        // PatchModel: proto field names and lowerCamelCase both accepted.
        let (status, created) = http
            .call(
                Method::POST,
                "/v1/sessions",
                Some(json!({"model": "tiny", "share_norm": "SHARE_NORM_GROUP", "shareAttn": "SHARE_ATTN_Q_K_V", "scale": 0.5})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{created}");
        assert_eq!(created["options"]["node"]["shareNorm"], "SHARE_NORM_GROUP");
        assert!(created["createdAt"].as_str().unwrap().starts_with("20"), "RFC 3339 timestamp: {created}");
        let created: pb::Session = serde_json::from_value(created).unwrap();
        let patch = pb::PatchModelRequest {
            share_norm: pb::ShareNorm::Group as i32,
            share_attn: pb::ShareAttn::QKV as i32,
            scale: Some(0.5),
            ..default_patch()
        };
        let grpc_created = c.patch_model(me.request(patch, None)).await.unwrap().into_inner();
        assert_eq!(created.options, grpc_created.options);
        assert_eq!(created.idle_ttl_seconds, grpc_created.idle_ttl_seconds);
        let id = created.session_id.clone();

        // GetSession: over HTTP and over gRPC, the one session store.
        let (status, got) = http.call(Method::GET, &format!("/v1/sessions/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{got}");
        let got: pb::Session = serde_json::from_value(got).unwrap();
        assert_eq!((&got.session_id, &got.options, &got.created_at), (&id, &created.options, &created.created_at));
        let grpc_got = c.get_session(me.request(pb::GetSessionRequest { session_id: id.clone() }, None)).await.unwrap().into_inner();
        assert_eq!((&grpc_got.session_id, &grpc_got.options, &grpc_got.created_at), (&id, &created.options, &created.created_at));

        // Generate: events in order, then images equal to gRPC's.
        let steps = 3;
        let body = json!({"sessionId": id, "prompts": ["a lighthouse, linocut print", "a fox, linocut print"], "seed": "42", "steps": steps, "width": 32, "height": 32, "guidanceScale": 7.5});
        let events = http.generate(body).await.unwrap().all().await;
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        let queued = names.iter().take_while(|n| **n == "queued").count();
        assert!(queued >= 1, "{names:?}");
        let mut expected = vec!["queued"; queued];
        expected.push("started");
        expected.extend(["progress"; 3]);
        expected.extend(["image", "image", "done"]);
        assert_eq!(names, expected);
        for (i, (_, data)) in events.iter().filter(|(n, _)| n == "progress").enumerate() {
            match serde_json::from_str::<pb::GenerateResponse>(data).unwrap().event {
                Some(Event::Progress(p)) => assert_eq!((p.step, p.total_steps), (i as u32 + 1, steps)),
                other => panic!("{other:?}"),
            }
        }
        let image_json: Value = serde_json::from_str(&events[queued + 4].1).unwrap();
        assert_eq!(image_json["image"]["seed"], "42", "uint64 as a string");
        let http_images = images(&events);
        assert_eq!(BASE64.decode(image_json["image"]["png"].as_str().unwrap()).unwrap(), http_images[0].png, "PNG bytes in base64");
        assert_eq!(events.last().unwrap().1, r#"{"status":"OK","images":2}"#);
        let grpc =
            generate(&mut c, &me, request(&id, &["a lighthouse, linocut print", "a fox, linocut print"], 32, steps, 42)).await.unwrap();
        assert_eq!(http_images.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(pngs(&http_images), pngs(&grpc.images), "HTTP and gRPC give the same PNG bytes");
        assert_eq!(http_images, grpc.images);

        // A real-image reference travels as base64.
        let reference = &grpc.images[0].png;
        let body = json!({"sessionId": id, "prompts": ["a boat"], "seed": "7", "steps": steps, "width": 32, "height": 32, "guidanceScale": 7.5,
            "referenceImage": BASE64.encode(reference), "referenceCaption": "a lighthouse, linocut print", "referenceOffset": 1});
        let events = http.generate(body).await.unwrap().all().await;
        assert_eq!(events.last().unwrap(), &("done".to_string(), r#"{"status":"OK","images":1}"#.to_string()), "{events:?}");
        let grpc = generate(
            &mut c,
            &me,
            pb::GenerateRequest {
                reference_image: reference.clone(),
                reference_caption: "a lighthouse, linocut print".into(),
                reference_offset: 1,
                ..request(&id, &["a boat"], 32, steps, 7)
            },
        )
        .await
        .unwrap();
        assert_eq!(pngs(&images(&events)), pngs(&grpc.images));

        // ReleaseSession, then the session is gone for both protocols.
        assert_eq!(http.call(Method::DELETE, &format!("/v1/sessions/{id}"), None).await, (StatusCode::OK, json!({})));
        assert_error(http.call(Method::GET, &format!("/v1/sessions/{id}"), None).await, 404, "NOT_FOUND", "not found");
        assert_error(http.call(Method::DELETE, &format!("/v1/sessions/{id}"), None).await, 404, "NOT_FOUND", "not found");
        let r = c.get_session(me.request(pb::GetSessionRequest { session_id: id.clone() }, None)).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::NotFound);
        // gRPC still answers on the shared port.
        assert_eq!(generate(&mut c, &me, request(&grpc_created.session_id, &["a"], 32, 1, 1)).await.unwrap().images.len(), 1);
        server.shutdown().await;
    });
}

/// A huge unknown enum value is quoted by the JSON error only in part: the message and the
/// BadRequest field violation each quote at most 1 KiB of it.
/// img2img targets and ControlNets in camelCase JSON (images as base64) give the gRPC call's PNG
/// bytes; their errors name the JSON field path.
#[test]
fn img2img_and_controls_over_http_match_grpc() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let http = Http::new(server.addr()).with("x-client-id", "web");
        let me = Identity::client("web");
        let mut c = connect(&server).await;
        let (_, created) = http.call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny"}))).await;
        let sid = created["sessionId"].as_str().unwrap().to_string();
        let rgb: Vec<u8> = (0..20 * 24 * 3).map(|i| (i * 13 % 256) as u8).collect();
        let png = stylealign::pipeline::Image { width: 20, height: 24, rgb }.to_png(&[]);
        let b64 = BASE64.encode(&png);
        let body = json!({
            "sessionId": sid, "prompts": ["a house", "a tree", "a boat"], "seed": "5", "steps": 3, "width": 32, "height": 32,
            "guidanceScale": 7.5,
            "initImages": [{"index": 2, "image": b64, "strength": 0.7}],
            "controls": [{"model": "tiny-controlnet", "images": [b64], "conditioningScale": 0.8, "end": 0.9}],
        });
        let events = http.generate(body.clone()).await.expect("200").all().await;
        let got = images(&events);
        let req = pb::GenerateRequest {
            init_images: vec![pb::InitImage { index: 2, image: png.clone(), strength: Some(0.7) }],
            controls: vec![pb::Control {
                model: "tiny-controlnet".into(),
                images: vec![png.clone()],
                conditioning_scale: Some(0.8),
                start: None,
                end: Some(0.9),
            }],
            ..request(&sid, &["a house", "a tree", "a boat"], 32, 3, 5)
        };
        let want = generate(&mut c, &me, req).await.expect("gRPC");
        assert_eq!(pngs(&got), pngs(&want.images), "HTTP/JSON and gRPC give the same PNGs");
        let mut bad = body;
        bad["controls"][0]["model"] = json!("depth");
        let err = http.generate(bad).await.err().expect("refused");
        assert_eq!(err.0, StatusCode::BAD_REQUEST, "{}", err.1);
        assert_eq!(violated_field(&err.1), "controls[0].model");
    });
}

#[test]
fn huge_json_values_are_quoted_short() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let http = Http::new(server.addr()).with("x-client-id", "hostile");
        let body = format!("{{\"model\":\"tiny\",\"shareNorm\":\"{}\"}}", "x".repeat(100_000));
        let (status, reply) = http.call_raw(Method::POST, "/v1/sessions", body.into_bytes()).await;
        let reply = reply.to_string();
        assert_eq!(status, 400, "{}", &reply[..reply.len().min(300)]);
        assert!(reply.contains("shareNorm"), "names the field: {}", &reply[..reply.len().min(300)]);
        assert!(reply.len() <= 3 * 1024, "{} bytes of reply", reply.len());
        let (status, _) = http.call(Method::GET, "/v1/models", None).await;
        assert_eq!(status, 200, "still serving");
    });
}

/// Bad JSON, bad fields, bad headers, unknown sessions and routes, oversized bodies: each with
/// its HTTP status and a JSON body naming the problem; nothing is queued by any of them.
#[test]
fn errors_have_http_statuses_and_json_bodies() {
    run(LIMIT, || async {
        let server = start(test_config()).await;
        let http = Http::new(server.addr()).with("x-client-id", "errors");
        let (_, s) = http.call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny"}))).await;
        let id = s["sessionId"].as_str().unwrap().to_string();
        let good = json!({"sessionId": id, "prompts": ["a", "b"], "seed": "1", "steps": 2, "width": 32, "height": 32});
        let with = |k: &str, v: Value| {
            let mut b = good.clone();
            b[k] = v;
            b
        };
        let gen_err = |body: Value| {
            let http = http.clone();
            async move {
                match http.generate(body).await {
                    Ok(s) => panic!("expected an error, got events {:?}", s.all().await),
                    Err(e) => e,
                }
            }
        };

        // Bad JSON: the path of the offending field, or what is wrong.
        let (s, body) = gen_err(with("width", json!("abc"))).await;
        assert_error((s, body.clone()), 400, "INVALID_ARGUMENT", "`width`");
        assert_eq!(violated_field(&body), "width");
        let (s, body) = http.call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny", "bogus": 1}))).await;
        assert_error((s, body.clone()), 400, "INVALID_ARGUMENT", "unknown field `bogus`");
        assert_eq!(violated_field(&body), "bogus");
        let (s, body) = http.call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny", "shareNorm": "SHARE_NORM_NOPE"}))).await;
        assert_error((s, body.clone()), 400, "INVALID_ARGUMENT", "SHARE_NORM_NOPE");
        assert_eq!(violated_field(&body), "shareNorm");
        let (s, body) = gen_err(with("referenceImage", json!("not base64!"))).await;
        assert_error((s, body.clone()), 400, "INVALID_ARGUMENT", "`referenceImage`");
        assert_error(
            http.call_raw(Method::POST, "/v1/sessions", b"{\"model\": ".to_vec()).await,
            400,
            "INVALID_ARGUMENT",
            "invalid JSON PatchModelRequest",
        );
        assert_error(http.call_raw(Method::POST, "/v1/sessions", b"{} {}".to_vec()).await, 400, "INVALID_ARGUMENT", "trailing characters");
        assert_error(http.call_raw(Method::POST, "/v1/sessions", Vec::new()).await, 400, "INVALID_ARGUMENT", "empty request body");
        assert_error(http.call_raw(Method::POST, "/v1/generate", b"[1]".to_vec()).await, 400, "INVALID_ARGUMENT", "GenerateRequest");

        // The service's validation, with the field in the details.
        for (body, field) in [
            (with("width", json!(40)), "width"),
            (with("steps", json!(500)), "steps"),
            (with("prompts", json!([])), "prompts"),
            (with("sampler", json!(42)), "sampler"),
        ] {
            let (s, body) = gen_err(body).await;
            assert_error((s, body.clone()), 400, "INVALID_ARGUMENT", &format!("`{field}`"));
            assert_eq!(violated_field(&body), field);
        }
        let (s, body) = http.call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny", "scale": 1.5}))).await;
        assert_error((s, body.clone()), 400, "INVALID_ARGUMENT", "`scale`");
        assert_eq!(violated_field(&body), "scale");
        assert_error(http.call(Method::POST, "/v1/sessions", Some(json!({"model": "sdxl"}))).await, 400, "INVALID_ARGUMENT", "`model`");
        assert_error(gen_err(with("sessionId", json!(""))).await, 400, "INVALID_ARGUMENT", "`session_id`");

        // Headers become metadata, checked by the service.
        assert_error(
            http.with("grpc-timeout", "soon").generate(good.clone()).await.err().unwrap(),
            400,
            "INVALID_ARGUMENT",
            "grpc-timeout",
        );
        assert_error(
            http.with("x-timeout-seconds", "soon").generate(good.clone()).await.err().unwrap(),
            400,
            "INVALID_ARGUMENT",
            "`x-timeout-seconds`",
        );
        let long = Http::new(server.addr()).with("x-client-id", &"x".repeat(200));
        assert_error(long.call(Method::GET, "/v1/models", None).await, 400, "INVALID_ARGUMENT", "x-client-id");

        // Sessions of another client, unknown sessions.
        let other = Http::new(server.addr()).with("x-client-id", "mallory");
        assert_error(other.call(Method::GET, &format!("/v1/sessions/{id}"), None).await, 404, "NOT_FOUND", "not found");
        assert_error(other.call(Method::DELETE, &format!("/v1/sessions/{id}"), None).await, 404, "NOT_FOUND", "not found");
        assert_error(other.generate(good.clone()).await.err().unwrap(), 404, "NOT_FOUND", "not found");
        assert_error(http.call(Method::GET, "/v1/sessions/sa1.nope", None).await, 404, "NOT_FOUND", "not found");

        // Unknown routes and methods.
        assert_error(http.call(Method::GET, "/v1/nope", None).await, 404, "UNIMPLEMENTED", "no route GET /v1/nope");
        assert_eq!(http.call(Method::GET, "/v1/generate", None).await.0, StatusCode::METHOD_NOT_ALLOWED);

        // Body size: a reference image just over its 20 MiB limit fits in the body limit and is
        // refused by the service naming the field; a body over the limit is 413.
        let big = vec![0u8; 20 * 1024 * 1024 + 1];
        let (s, body) =
            gen_err(json!({"sessionId": id, "prompts": ["a"], "referenceImage": BASE64.encode(&big), "referenceCaption": "x"})).await;
        assert_error((s, body.clone()), 400, "INVALID_ARGUMENT", "`reference_image`");
        assert_eq!(violated_field(&body), "reference_image");
        let mut huge = br#"{"sessionId":""#.to_vec();
        huge.resize(MAX_BODY_BYTES - 1, b'a');
        huge.extend(br#""}"#);
        assert_eq!(huge.len(), MAX_BODY_BYTES + 1);
        assert_error(http.call_raw(Method::POST, "/v1/generate", huge).await, 413, "RESOURCE_EXHAUSTED", "request body over the limit");

        // Nothing was queued; the good request works.
        assert_eq!(Stats::get(&server.stats().batches), 0);
        let events = http.generate(good.clone()).await.unwrap().all().await;
        assert_eq!(images(&events).len(), 2);
        server.shutdown().await;
    });
}

/// Bearer tokens over HTTP: no or unknown token is 401; the token's client owns its sessions
/// (`x-client-id` is ignored when auth is on).
#[test]
fn auth_over_http() {
    run(LIMIT, || async {
        let tokens = Tokens::parse("alice=tok-alice\nbob=tok-bob").unwrap();
        let server = start(ServeConfig { auth: Some(tokens), ..test_config() }).await;
        let anon = Http::new(server.addr());
        assert_error(anon.call(Method::GET, "/v1/models", None).await, 401, "UNAUTHENTICATED", "authorization");
        assert_error(
            anon.with("authorization", "Bearer nope").call(Method::GET, "/v1/models", None).await,
            401,
            "UNAUTHENTICATED",
            "unknown token",
        );
        assert_error(
            anon.with("authorization", "tok-alice").call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny"}))).await,
            401,
            "UNAUTHENTICATED",
            "Bearer",
        );
        let alice = anon.with("authorization", "Bearer tok-alice");
        let bob = anon.with("authorization", "Bearer tok-bob").with("x-client-id", "alice");
        assert_eq!(alice.call(Method::GET, "/v1/models", None).await.0, StatusCode::OK);
        let (status, s) = alice.call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny"}))).await;
        assert_eq!(status, StatusCode::OK);
        let id = s["sessionId"].as_str().unwrap();
        assert_error(bob.call(Method::GET, &format!("/v1/sessions/{id}"), None).await, 404, "NOT_FOUND", "not found");
        assert_error(
            anon.generate(json!({"sessionId": id, "prompts": ["a"]})).await.err().unwrap(),
            401,
            "UNAUTHENTICATED",
            "authorization",
        );
        assert_eq!(alice.call(Method::GET, &format!("/v1/sessions/{id}"), None).await.0, StatusCode::OK);
        // Numbers are accepted for 64-bit integers and enums too.
        let events = alice
            .generate(json!({"sessionId": id, "prompts": ["a"], "steps": 1, "width": 32, "height": 32, "seed": 5, "sampler": 2}))
            .await
            .unwrap()
            .all()
            .await;
        let image = &images(&events)[0];
        assert_eq!(image.seed, 5);
        assert!(image.parameters.contains(r#""sampler":"euler""#), "{}", image.parameters);
        // The same token over gRPC sees the session created over HTTP.
        let mut c = connect(&server).await;
        let grpc_alice = Identity { token: Some("tok-alice".into()), client_id: None };
        assert!(c.get_session(grpc_alice.request(pb::GetSessionRequest { session_id: id.to_string() }, None)).await.is_ok());
        server.shutdown().await;
    });
}

/// While the models load, every route is 503 UNAVAILABLE.
#[test]
fn unavailable_while_loading() {
    run(LIMIT, || async {
        let server = Server::bind(test_config()).await.unwrap();
        let http = Http::new(server.addr());
        assert_error(http.call(Method::GET, "/v1/models", None).await, 503, "UNAVAILABLE", "loading");
        assert_error(http.call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny"}))).await, 503, "UNAVAILABLE", "loading");
        server.shutdown().await;
    });
}

/// Queue full → 429; a deadline (`x-timeout-seconds`) → an `error` event DEADLINE_EXCEEDED then
/// `done`; a client that disconnects from the event stream cancels its request, both while it
/// waits in the queue and while it runs.
#[test]
fn queue_full_deadline_and_disconnect() {
    run(LIMIT, || async {
        let server = start(ServeConfig { batching: false, max_queue: 1, ..test_config() }).await;
        let http = Http::new(server.addr()).with("x-client-id", "sse");
        let (_, s) = http.call(Method::POST, "/v1/sessions", Some(json!({"model": "tiny"}))).await;
        let id = s["sessionId"].as_str().unwrap().to_string();
        let req = |prompt: &str, steps: u32, size: u32| json!({"sessionId": id, "prompts": [prompt], "seed": "3", "steps": steps, "width": size, "height": size});

        // A long request holds the single worker until dropped.
        let long = json!({"sessionId": id, "prompts": ["slow", "slow"], "steps": 200, "width": 64, "height": 64});
        let (holder, _) = http.generate(long).await.unwrap().until(|n, _| n == "progress").await;

        // One request waits in the queue; the next is refused at once.
        let (waiting, seen) = http.generate(req("queued", 2, 32)).await.unwrap().until(|n, _| n == "queued").await;
        assert_eq!(serde_json::from_str::<Value>(&seen[0].1).unwrap(), json!({"queued": {"queueDepth": 1}}));
        assert_error(http.generate(req("refused", 2, 32)).await.err().unwrap(), 429, "RESOURCE_EXHAUSTED", "queue full");

        // Disconnecting while queued takes the request out of the queue.
        drop(waiting);
        eventually(Duration::from_secs(10), "cancelled in the queue", || Stats::get(&server.stats().cancelled_in_queue) == 1).await;
        assert_eq!(server.engine().depth(), 0);

        // A deadline passing in the queue.
        let events = http.with("x-timeout-seconds", "0.3").generate(req("hurried", 2, 32)).await.unwrap().all().await;
        let (error, done) = (&events[events.len() - 2], &events[events.len() - 1]);
        assert_eq!(error.0, "error", "{events:?}");
        let error: Value = serde_json::from_str(&error.1).unwrap();
        assert_eq!((error["code"].as_i64(), error["status"].as_str()), (Some(4), Some("DEADLINE_EXCEEDED")));
        assert!(error["message"].as_str().unwrap().contains("while queued"), "{error}");
        assert_eq!(done, &("done".to_string(), r#"{"status":"DEADLINE_EXCEEDED","images":0}"#.to_string()));
        assert_eq!(Stats::get(&server.stats().expired_in_queue), 1);

        // Disconnecting while running stops the request at its next step.
        drop(holder);
        eventually(Duration::from_secs(10), "idle", || server.engine().is_idle()).await;
        let steps = 120;
        let (running, _) = http
            .generate(req("running", steps, 64))
            .await
            .unwrap()
            .until(|n, v| n == "progress" && v["progress"]["step"].as_u64() >= Some(2))
            .await;
        drop(running);
        eventually(Duration::from_secs(10), "stop recorded", || server.stats().stops().iter().any(|s| s.total_steps == steps)).await;
        let stops: Vec<_> = server.stats().stops().into_iter().filter(|s| s.total_steps == steps).collect();
        assert_eq!(stops.len(), 1, "{stops:?}");
        let stop = &stops[0];
        assert_eq!(stop.reason, StopReason::ClientGone);
        assert!(stop.stopped_after_step < steps && stop.stopped_after_step <= stop.requested_at_step + 1, "{stop:?}");
        eventually(Duration::from_secs(10), "idle", || server.engine().is_idle()).await;
        server.shutdown().await;
    });
}
