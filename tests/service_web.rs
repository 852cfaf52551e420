//! The API port's front doors for browsers, through the public port: gRPC-Web over HTTP/1.1
//! (tonic-web's own client layer on an HTTP/1.1 hyper client, the generated StyleAlign and
//! Health clients; grpc-web-text framed by hand), the playground page and its files at `/`,
//! plain 404 for unknown paths, and `--no-playground` / `STYLEALIGN_NO_PLAYGROUND` turning the
//! page off (the binary, spawned).

mod service_common;

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use service_common::*;
use stylealign::serve::pb::generate_response::Event;
use stylealign::serve::pb::style_align_client::StyleAlignClient;
use stylealign::serve::{SERVICE_NAME, ServeConfig, pb};
use tonic::codegen::http;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_web::{GrpcWebCall, GrpcWebClientService};

type WebChannel = GrpcWebClientService<Client<HttpConnector, GrpcWebCall<tonic::body::Body>>>;

/// A gRPC-Web channel to `addr`: requests go out as HTTP/1.1 `application/grpc-web`.
fn web_channel(addr: SocketAddr) -> (WebChannel, tonic::codegen::http::Uri) {
    let http = Client::builder(TokioExecutor::new()).build_http();
    (GrpcWebClientService::new(http), format!("http://{addr}").parse().unwrap())
}

fn web_client(addr: SocketAddr) -> StyleAlignClient<WebChannel> {
    let (ch, origin) = web_channel(addr);
    StyleAlignClient::with_origin(ch, origin)
}

fn web_health(addr: SocketAddr) -> HealthClient<WebChannel> {
    let (ch, origin) = web_channel(addr);
    HealthClient::with_origin(ch, origin)
}

fn with_id<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("x-client-id", "web-test".parse().unwrap());
    r
}

struct Reply {
    status: u16,
    version: http::Version,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A plain HTTP/1.1 request (no gRPC content type).
async fn http(method: &str, addr: SocketAddr, path: &str) -> Reply {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::builder().method(method).uri(format!("http://{addr}{path}")).body(Empty::new()).unwrap();
    let res = client.request(req).await.expect("HTTP request");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("HTTP body").to_bytes();
    Reply { status: parts.status.as_u16(), version: parts.version, headers: parts.headers, body }
}

/// A committed playground file: the bundle from `assets/playground/`, the page and style sheet
/// from `web/src/`.
fn committed(name: &str) -> String {
    let dir = if name == "app.js" { "assets/playground" } else { "web/src" };
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(name)).expect("committed playground file")
}

#[test]
fn playground_page_and_files_on_the_api_port() {
    run(Duration::from_secs(60), || async {
        let server = start(test_config()).await;
        let addr = server.addr();

        let page = http("GET", addr, "/").await;
        assert_eq!(page.status, 200, "GET /: {}", page.text());
        assert_eq!(page.version, http::Version::HTTP_11);
        assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
        assert!(page.header("content-security-policy").contains("connect-src 'self'"), "CSP: {:?}", page.header("content-security-policy"));
        assert_eq!(page.text(), committed("index.html"), "the binary serves the committed page");
        // Every file the page links is served, with its type, and is the committed file.
        for (path, file, ty) in [
            ("/playground/app.js", "app.js", "text/javascript; charset=utf-8"),
            ("/playground/style.css", "style.css", "text/css; charset=utf-8"),
        ] {
            assert!(page.text().contains(&format!("\"{path}\"")), "index.html links {path}");
            let r = http("GET", addr, path).await;
            assert_eq!(r.status, 200, "GET {path}");
            assert_eq!(r.header("content-type"), ty, "{path}");
            assert_eq!(r.header("x-content-type-options"), "nosniff");
            assert_eq!(r.text(), committed(file), "{path} is the committed {file}");
        }
        // The bundle is the gRPC-Web client of this API (generated code names the service).
        assert!(committed("app.js").contains("stylealign.v1.StyleAlign"));

        let head = http("HEAD", addr, "/").await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());

        // Unknown paths: a plain 404 for plain HTTP (not a gRPC error, not tonic-web's 400).
        for path in ["/nope", "/playground/missing.js", "/favicon.ico"] {
            let r = http("GET", addr, path).await;
            assert_eq!(r.status, 404, "GET {path}: {}", r.text());
        }
        // Health and metrics stay on the admin port only.
        assert_eq!(http("GET", addr, "/metrics").await.status, 404);
        server.shutdown().await;
    });
}

#[test]
fn grpc_web_over_http1_reaches_every_call() {
    run(Duration::from_secs(120), || async {
        let server = start(test_config()).await;
        let addr = server.addr();
        let mut c = web_client(addr);

        // Health over gRPC-Web: overall and for the service.
        let mut h = web_health(addr);
        for service in ["", SERVICE_NAME] {
            let st = h.check(HealthCheckRequest { service: service.into() }).await.expect("health over gRPC-Web").into_inner().status();
            assert_eq!(st, ServingStatus::Serving, "health {service:?}");
        }

        let models = c.list_models(with_id(pb::ListModelsRequest {})).await.expect("ListModels over gRPC-Web").into_inner();
        assert_eq!(models.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["tiny"]);
        assert!(models.samplers.iter().any(|s| s == "ddim"));

        let patch = pb::PatchModelRequest {
            model: "tiny".into(),
            share_norm: pb::ShareNorm::Group as i32,
            share_attn: pb::ShareAttn::QKV as i32,
            scale: Some(0.5),
            ..Default::default()
        };
        let session = c.patch_model(with_id(patch)).await.expect("PatchModel over gRPC-Web").into_inner();
        let node = match session.options.as_ref().and_then(|o| o.flavour.as_ref()) {
            Some(pb::patch_options::Flavour::Node(n)) => *n,
            other => panic!("node options expected, got {other:?}"),
        };
        assert_eq!((node.share_norm, node.share_attn, node.scale), (pb::ShareNorm::Group as i32, pb::ShareAttn::QKV as i32, 0.5));
        let got = c
            .get_session(with_id(pb::GetSessionRequest { session_id: session.session_id.clone() }))
            .await
            .expect("GetSession")
            .into_inner();
        assert_eq!(got.session_id, session.session_id);

        // The server stream arrives message by message: progress for every step, then the images.
        let steps = 3;
        let prompts = ["a lighthouse", "a fox", "a bicycle"];
        let mut stream =
            c.generate(with_id(request(&session.session_id, &prompts, 32, steps, 7))).await.expect("Generate over gRPC-Web").into_inner();
        let mut progress = Vec::new();
        let mut images = Vec::new();
        let mut started = false;
        while let Some(msg) = stream.message().await.expect("stream") {
            match msg.event.expect("event") {
                Event::Queued(_) => assert!(!started, "queued after started"),
                Event::Started(s) => {
                    started = true;
                    assert_eq!(s.batch_rows, 3);
                }
                Event::Progress(p) => {
                    assert!(images.is_empty(), "progress after an image");
                    assert_eq!(p.total_steps, steps);
                    progress.push(p.step);
                }
                Event::Image(i) => images.push(i),
            }
        }
        assert!(started);
        assert_eq!(progress, (1..=steps).collect::<Vec<_>>());
        assert_eq!(images.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 1, 2]);
        for (i, img) in images.iter().enumerate() {
            assert_eq!(img.prompt, prompts[i]);
            assert_eq!((img.width, img.height), (32, 32));
            assert!(img.png.starts_with(b"\x89PNG\r\n\x1a\n"), "image {i} is a PNG");
            assert!(img.parameters.contains("\"seed\""), "image {i} carries its parameters");
        }

        // The same set over native gRPC (HTTP/2) on the same port gives the same bytes.
        let mut native = connect(&server).await;
        let who = stylealign::client::Identity::client("web-test");
        let again = generate(&mut native, &who, request(&session.session_id, &prompts, 32, steps, 7)).await.expect("native Generate");
        assert_eq!(pngs(&again.images), pngs(&images), "gRPC-Web and gRPC give the same images");

        c.release_session(with_id(pb::ReleaseSessionRequest { session_id: session.session_id.clone() }))
            .await
            .expect("ReleaseSession over gRPC-Web");
        let gone = c.get_session(with_id(pb::GetSessionRequest { session_id: session.session_id })).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound);
        server.shutdown().await;
    });
}

/// Splits a gRPC-Web response body into its data messages and its trailer block.
fn web_frames(mut body: &[u8]) -> (Vec<Vec<u8>>, String) {
    let (mut messages, mut trailers) = (Vec::new(), String::new());
    while body.len() >= 5 {
        let (flag, len) = (body[0], u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize);
        let payload = &body[5..5 + len];
        if flag & 0x80 != 0 {
            trailers.push_str(std::str::from_utf8(payload).expect("trailers are text"));
        } else {
            messages.push(payload.to_vec());
        }
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "trailing bytes after the last frame");
    (messages, trailers)
}

#[test]
fn grpc_web_text_framed_by_hand() {
    use base64::Engine as _;
    use http_body_util::Full;
    use prost::Message as _;
    run(Duration::from_secs(60), || async {
        let server = start(test_config()).await;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut frame = vec![0u8];
        let msg = pb::ListModelsRequest {}.encode_to_vec();
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = http::Request::post(format!("http://{}/stylealign.v1.StyleAlign/ListModels", server.addr()))
            .header("content-type", "application/grpc-web-text")
            .header("accept", "application/grpc-web-text")
            .header("x-grpc-web", "1")
            .header("x-client-id", "web-text")
            .body(Full::new(Bytes::from(b64.encode(&frame))))
            .unwrap();
        let res = client.request(req).await.expect("grpc-web-text call");
        assert_eq!(res.status(), 200);
        assert_eq!(res.version(), http::Version::HTTP_11);
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/grpc-web-text"), "{:?}", res.headers());
        let text = res.into_body().collect().await.unwrap().to_bytes();
        // The body is base64 (one chunk per frame, each padded).
        let mut raw = Vec::new();
        for chunk in text.split(|b| *b == b'=').filter(|c| !c.is_empty()) {
            let padded = format!("{}{}", std::str::from_utf8(chunk).unwrap(), "=".repeat((4 - chunk.len() % 4) % 4));
            raw.extend(b64.decode(padded).expect("base64 body"));
        }
        let (messages, trailers) = web_frames(&raw);
        assert!(trailers.to_ascii_lowercase().contains("grpc-status:0"), "trailers: {trailers:?}");
        assert_eq!(messages.len(), 1);
        let models = pb::ListModelsResponse::decode(messages[0].as_slice()).expect("a ListModelsResponse");
        assert_eq!(models.models[0].name, "tiny");
        server.shutdown().await;
    });
}

#[test]
fn grpc_web_errors_carry_the_status() {
    run(Duration::from_secs(60), || async {
        let server = start(test_config()).await;
        let addr = server.addr();
        let mut c = web_client(addr);
        let session = c.patch_model(with_id(default_patch())).await.expect("PatchModel").into_inner().session_id;

        // A bad field: INVALID_ARGUMENT naming it, through the gRPC-Web trailers.
        let err = c.generate(with_id(request(&session, &["a"], 13, 2, 1))).await.map(|_| ()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("width"), "names the field: {}", err.message());
        let err = c
            .patch_model(with_id(pb::PatchModelRequest { model: "tiny".into(), scale: Some(2.0), ..Default::default() }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("scale"), "{}", err.message());
        let err = c.get_session(with_id(pb::GetSessionRequest { session_id: "nope".into() })).await.unwrap_err();
        assert!(matches!(err.code(), tonic::Code::NotFound | tonic::Code::InvalidArgument), "{err:?}");

        // An unknown service: UNIMPLEMENTED over gRPC-Web and over gRPC (not the HTTP 404).
        let (ch, origin) = web_channel(addr);
        let mut raw = tonic::client::Grpc::with_origin(ch, origin);
        raw.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/nope.v1.Nope/Call");
        let codec = tonic_prost::ProstCodec::<pb::ListModelsRequest, pb::ListModelsResponse>::default();
        let err = raw.unary(tonic::Request::new(pb::ListModelsRequest {}), path.clone(), codec).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "gRPC-Web: {err:?}");
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut raw = tonic::client::Grpc::new(ch);
        raw.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<pb::ListModelsRequest, pb::ListModelsResponse>::default();
        let err = raw.unary(tonic::Request::new(pb::ListModelsRequest {}), path, codec).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented, "gRPC: {err:?}");
        server.shutdown().await;
    });
}

#[test]
fn no_playground_in_config_means_404_and_grpc_web_still_works() {
    run(Duration::from_secs(60), || async {
        let server = start(ServeConfig { playground: false, ..test_config() }).await;
        let addr = server.addr();
        for path in ["/", "/playground/app.js", "/playground/style.css"] {
            assert_eq!(http("GET", addr, path).await.status, 404, "{path} with the playground off");
        }
        let models = web_client(addr).list_models(with_id(pb::ListModelsRequest {})).await.expect("ListModels over gRPC-Web").into_inner();
        assert_eq!(models.models.len(), 1);
        server.shutdown().await;
    });
}

/// `stylealign serve` on ephemeral ports; killed on drop.
struct Proc {
    child: Child,
    api: SocketAddr,
    log: ServerLog,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.assert_no_panic();
    }
}

fn spawn_serve(extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = stylealign_command();
    cmd.args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"]).args(extra);
    cmd.env_remove("STYLEALIGN_NO_PLAYGROUND");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let (child, addrs, log, _) = spawn_server(cmd.stdin(Stdio::null()));
    Proc { child, api: addrs[0], log }
}

async fn wait_serving(addr: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let st = web_health(addr).check(HealthCheckRequest { service: SERVICE_NAME.into() }).await.map(|r| r.into_inner().status());
        if matches!(st, Ok(ServingStatus::Serving)) {
            return;
        }
        assert!(Instant::now() < end, "never SERVING: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn serve_flag_and_env_turn_the_playground_off() {
    run(Duration::from_secs(120), || async {
        let on = spawn_serve(&[], &[]);
        wait_serving(on.api).await;
        assert_eq!(http("GET", on.api, "/").await.status, 200, "default: playground on");
        drop(on);

        for (args, env) in [(&["--no-playground"][..], &[][..]), (&[][..], &[("STYLEALIGN_NO_PLAYGROUND", "true")][..])] {
            let off = spawn_serve(args, env);
            wait_serving(off.api).await;
            let r = http("GET", off.api, "/").await;
            assert_eq!(r.status, 404, "{args:?} {env:?}: {}", r.text());
            let models = web_client(off.api)
                .list_models(with_id(pb::ListModelsRequest {}))
                .await
                .expect("gRPC-Web with the playground off")
                .into_inner();
            assert_eq!(models.models[0].name, "tiny");
        }
    });
}
