//! The API port's transport limits through its public interface: the unary timeout and the
//! concurrency limit (gRPC, gRPC-Web and HTTP/JSON), request messages over `--max-message-bytes`
//! (RESOURCE_EXHAUSTED; HTTP 413), idle connections closed after `--idle-timeout-secs` (500 of
//! them, counted in the server process's file descriptors), the HTTP/2 flags, and garbage or a
//! slowloris-style request that never hang the server.

mod service_common;

use std::net::SocketAddr;
use std::process::Child;
use std::time::{Duration, Instant};

use service_common::*;
use stylealign::client::Identity;
use stylealign::serve::conn::Transport;
use stylealign::serve::http::max_body_bytes;
use stylealign::serve::{ServeConfig, pb};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

fn transport(f: impl FnOnce(&mut Transport)) -> ServeConfig {
    let mut cfg = test_config();
    f(&mut cfg.transport);
    cfg
}

/// Sends `head` (and whatever body bytes it has) and leaves the request unfinished.
async fn stalled(addr: SocketAddr, head: String) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// A gRPC-Web ListModels over HTTP/1.1 whose body promises 100 bytes and sends 5.
fn stalled_grpc_web(addr: SocketAddr) -> String {
    format!(
        "POST /stylealign.v1.StyleAlign/ListModels HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/grpc-web+proto\r\ncontent-length: 100\r\n\r\n\0\0\0\0\x5f"
    )
}

/// A JSON PatchModel whose body promises 100 bytes and sends 1.
fn stalled_json(addr: SocketAddr) -> String {
    format!("POST /v1/sessions HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{")
}

/// Reads what the server sends until it closes or `limit` passes.
async fn read_some(s: &mut TcpStream, limit: Duration) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if String::from_utf8_lossy(&buf).contains("\r\n\r\n") {
                    // Headers complete: give the body a moment.
                    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await {
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn a_unary_call_that_is_not_answered_in_time_is_deadline_exceeded() {
    run(Duration::from_secs(60), || async {
        let server = start(transport(|t| t.unary_timeout = Duration::from_secs(1))).await;
        let addr = server.addr();
        let t = Instant::now();
        let mut web = stalled(addr, stalled_grpc_web(addr)).await;
        let mut json = stalled(addr, stalled_json(addr)).await;
        let web = read_some(&mut web, Duration::from_secs(10)).await;
        assert!(web.to_ascii_lowercase().contains("grpc-status: 4"), "gRPC-Web: {web}");
        let json = read_some(&mut json, Duration::from_secs(10)).await;
        assert!(json.starts_with("HTTP/1.1 504"), "{json}");
        assert!(json.contains("DEADLINE_EXCEEDED") && json.contains("--unary-timeout-secs"), "{json}");
        let elapsed = t.elapsed();
        println!("stalled unary calls answered DEADLINE_EXCEEDED after {:.2} s (--unary-timeout-secs 1)", elapsed.as_secs_f64());
        assert!(elapsed >= Duration::from_millis(900), "not before the timeout: {elapsed:?}");
        // A Generate stream is not a unary call: it outlives the unary timeout.
        let mut c = connect(&server).await;
        let who = Identity::client("t");
        let s = session(&mut c, &who, default_patch()).await;
        let r = generate(&mut c, &who, request(&s, &["a", "b"], 64, 40, 1)).await.expect("Generate");
        println!("a Generate of {:.2} s with --unary-timeout-secs 1", r.elapsed.as_secs_f64());
        assert_eq!(r.images.len(), 2);
        server.shutdown().await;
    });
}

#[test]
fn unary_calls_over_the_concurrency_limit_are_resource_exhausted() {
    run(Duration::from_secs(60), || async {
        let server = start(transport(|t| t.max_concurrent_unary = 2)).await;
        let addr = server.addr();
        let mut c = connect(&server).await;
        let who = Identity::client("t");
        let s = session(&mut c, &who, default_patch()).await;
        // Two calls that hold their slots (their requests never finish).
        let held = [stalled(addr, stalled_grpc_web(addr)).await, stalled(addr, stalled_json(addr)).await];
        let mut refused = None;
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match c.list_models(who.request(pb::ListModelsRequest {}, None)).await {
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    refused = Some(e);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let e = refused.expect("a third unary call is RESOURCE_EXHAUSTED");
        assert!(e.message().contains("--max-concurrent-unary 2"), "{e}");
        let (code, body) = http_get(addr, "/v1/models").await;
        assert_eq!(code, 429, "{body}");
        assert!(body.contains("RESOURCE_EXHAUSTED"), "{body}");
        // Streams do not count: Generate still runs.
        generate(&mut c, &who, request(&s, &["a"], 64, 2, 1)).await.expect("Generate while the unary slots are full");
        // The slots come back when the held calls go away.
        drop(held);
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match c.list_models(who.request(pb::ListModelsRequest {}, None)).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::ResourceExhausted && Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        server.shutdown().await;
    });
}

#[test]
fn a_message_over_the_limit_is_resource_exhausted() {
    run(Duration::from_secs(120), || async {
        const LIMIT: usize = 1 << 20;
        let server = start(transport(|t| t.max_message_bytes = LIMIT)).await;
        let mut c = connect(&server).await;
        let who = Identity::client("t");
        let s = session(&mut c, &who, default_patch()).await;
        let big = pb::GenerateRequest { reference_image: vec![7u8; LIMIT + 1], ..request(&s, &["a"], 64, 2, 1) };
        let e = generate(&mut c, &who, big).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert!(e.message().contains("--max-message-bytes"), "{e}");
        let e =
            c.patch_model(who.request(pb::PatchModelRequest { model: "m".repeat(LIMIT + 1), ..default_patch() }, None)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        // Under the limit, the same bytes reach validation (not an image: INVALID_ARGUMENT).
        let fits = pb::GenerateRequest {
            reference_image: vec![7u8; LIMIT - 4096],
            reference_caption: "c".into(),
            ..request(&s, &["a"], 64, 2, 1)
        };
        let e = generate(&mut c, &who, fits).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        // HTTP/JSON: the body limit is the message limit's base64 size.
        let limit = max_body_bytes(LIMIT);
        let mut s = TcpStream::connect(server.addr()).await.unwrap();
        let head = format!(
            "POST /v1/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            limit + 1
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let _ = s.write_all(&vec![b' '; limit + 1]).await;
        let answer = read_some(&mut s, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("RESOURCE_EXHAUSTED"), "{answer}");
        server.shutdown().await;
    });
}

#[test]
fn the_default_limits_fit_a_20_mib_reference_image() {
    run(Duration::from_secs(120), || async {
        let server = start(test_config()).await;
        let mut c = connect(&server).await;
        let who = Identity::client("t");
        let s = session(&mut c, &who, default_patch()).await;
        // 20 MiB (the documented reference image limit) passes the transport: refused as not an image.
        let fits =
            pb::GenerateRequest { reference_image: vec![7u8; 20 << 20], reference_caption: "c".into(), ..request(&s, &["a"], 64, 2, 1) };
        let e = generate(&mut c, &who, fits).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        let over = pb::GenerateRequest { reference_image: vec![7u8; 24 << 20], ..request(&s, &["a"], 64, 2, 1) };
        assert_eq!(generate(&mut c, &who, over).await.unwrap_err().code(), tonic::Code::ResourceExhausted);
        server.shutdown().await;
    });
}

/// A `stylealign serve` child process (its file descriptors are its own).
struct Spawned {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: ServerLog,
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Spawned {
    fn start(extra: &[&str]) -> Spawned {
        let (child, addrs, log, reader) = spawn_server(
            stylealign_command()
                .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--no-warmup"])
                .args(extra),
        );
        Spawned { child, addr: addrs[0], admin: addrs[1], log, _stdout: reader }
    }

    async fn wait_serving(&self) {
        let end = Instant::now() + Duration::from_secs(60);
        while http_get(self.admin, "/healthz").await.0 != 200 {
            assert!(Instant::now() < end, "never SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.assert_no_panic();
    }
}

#[test]
fn five_hundred_idle_connections_are_closed_after_the_idle_timeout() {
    if !std::path::Path::new("/proc/self/fd").exists() {
        eprintln!("no /proc: file descriptors not countable here, skipping");
        return;
    }
    run(Duration::from_secs(120), || async {
        let server = Spawned::start(&["--idle-timeout-secs", "2"]);
        server.wait_serving().await;
        let base = server.fds();
        let t = Instant::now();
        let mut conns = Vec::new();
        for i in 0..500 {
            let mut s = TcpStream::connect(server.addr).await.expect("connect");
            // Some say nothing, some start HTTP/2, some start an HTTP/1.1 request and stall.
            match i % 3 {
                0 => {}
                1 => s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap(),
                _ => s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n").await.unwrap(),
            }
            conns.push(s);
        }
        let opened = t.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let open_fds = server.fds();
        println!("server fds: {base} before, {open_fds} with 500 idle connections (opened in {:.2} s)", opened.as_secs_f64());
        assert!(open_fds >= base + 450, "the server holds the connections: {base} -> {open_fds}");
        // Every connection is closed by the server: its read side sees the end (or a reset).
        let mut closed_after = Duration::ZERO;
        for s in &mut conns {
            let mut buf = [0u8; 1024];
            loop {
                match tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await.expect("closed within 30 s") {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            closed_after = closed_after.max(t.elapsed());
        }
        println!(
            "500 idle connections (--idle-timeout-secs 2) all closed by the server {:.2} s after the first opened",
            closed_after.as_secs_f64()
        );
        assert!(closed_after >= Duration::from_secs(2), "not before the timeout");
        drop(conns);
        let end = Instant::now() + Duration::from_secs(10);
        while server.fds() > base + 5 {
            assert!(Instant::now() < end, "fds stay up: {base} -> {}", server.fds());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("server fds back to {} (base {base})", server.fds());
        // Still SERVING and answering.
        assert_eq!(http_get(server.admin, "/healthz").await.0, 200);
        let mut c = stylealign::client::connect(&server.addr.to_string()).await.unwrap();
        c.list_models(pb::ListModelsRequest {}).await.expect("a call after the idle connections");
    });
}

#[test]
fn an_open_stream_keeps_its_connection_past_the_idle_timeout() {
    run(Duration::from_secs(60), || async {
        let server = start(transport(|t| t.idle_timeout = Duration::from_secs(1))).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr())).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let mut watch = health.watch(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        watch.message().await.expect("first status").expect("a status");
        // No message for 3 s (three idle timeouts), and no end either: the stream is alive.
        assert!(tokio::time::timeout(Duration::from_secs(3), watch.message()).await.is_err(), "the stream ended");
        server.shutdown().await;
    });
}

#[test]
fn http2_flags_are_accepted_and_checked() {
    let o = stylealign_command().args(["serve", "--max-concurrent-streams", "0"]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--max-concurrent-streams"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = stylealign_command().args(["serve", "--unary-timeout-secs", "0"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("--unary-timeout-secs"));
    run(Duration::from_secs(60), || async {
        let server = Spawned::start(&[
            "--http2-keepalive-interval-secs",
            "1",
            "--http2-keepalive-timeout-secs",
            "5",
            "--max-concurrent-streams",
            "2",
            "--unary-timeout-secs",
            "5",
            "--max-concurrent-unary",
            "8",
            "--max-message-bytes",
            "2000000",
        ]);
        server.wait_serving().await;
        // Three streams on one connection allowed two at a time: all complete.
        let mut c = stylealign::client::connect(&server.addr.to_string()).await.unwrap();
        let who = Identity::client("t");
        let s = session(&mut c, &who, default_patch()).await;
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let mut c = c.clone();
                let (who, s) = (who.clone(), s.clone());
                tokio::spawn(async move { generate(&mut c, &who, request(&s, &["a"], 64, 2, i)).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().expect("Generate");
        }
        // Keepalive PINGs are answered: the idle connection stays usable after a few intervals.
        tokio::time::sleep(Duration::from_secs(3)).await;
        c.list_models(who.request(pb::ListModelsRequest {}, None)).await.expect("after keepalive intervals");
    });
}

#[test]
fn garbage_and_slowloris_do_not_hang_the_server() {
    run(Duration::from_secs(60), || async {
        let server = start(transport(|t| t.idle_timeout = Duration::from_secs(2))).await;
        let addr = server.addr();
        // HTTP/1 garbage: an answer (400) or a close, quickly.
        let mut g = stalled(addr, "\x16\x03\x01GARBAGE \x00\x7f\r\n\r\n".into()).await;
        let answer = read_some(&mut g, Duration::from_secs(10)).await;
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer:?}");
        // Slowloris: a request head dribbled one byte every 200 ms is closed after the idle timeout.
        let t = Instant::now();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let head =
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut closed = false;
        for b in head.iter().cycle().take(200) {
            if slow.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 256];
            if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
                closed = true;
                break;
            }
            // Meanwhile the server answers others.
            if t.elapsed() < Duration::from_millis(300) {
                let mut c = connect(&server).await;
                c.list_models(pb::ListModelsRequest {}).await.expect("the server answers during the slowloris");
            }
        }
        assert!(closed, "the dribbling connection was never closed");
        println!("slowloris connection closed after {:.2} s (--idle-timeout-secs 2)", t.elapsed().as_secs_f64());
        assert!(t.elapsed() < Duration::from_secs(15));
        // A plain-std client sees the server healthy.
        let mut c = connect(&server).await;
        c.list_models(pb::ListModelsRequest {}).await.expect("still answering");
        assert!(server.is_serving());
        server.shutdown().await;
    });
}

#[test]
fn the_admin_port_lists_the_health_service_by_reflection() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
    run(Duration::from_secs(60), || async {
        let server = start(test_config()).await;
        let admin = server.admin_addr().unwrap();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{admin}")).unwrap().connect().await.unwrap();
        let ask = |m: MessageRequest| ServerReflectionRequest { host: String::new(), message_request: Some(m) };
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let answers: Vec<ServerReflectionResponse> = {
            let requests = vec![
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into())),
            ];
            let mut stream =
                reflection.server_reflection_info(tokio_stream::iter(requests)).await.expect("reflection on the admin port").into_inner();
            let mut out = Vec::new();
            while let Some(m) = stream.message().await.unwrap() {
                out.push(m);
            }
            out
        };
        let Some(MessageResponse::ListServicesResponse(list)) = &answers[0].message_response else { panic!("{:?}", answers[0]) };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        println!("admin port services: {names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        assert!(!names.contains(&"stylealign.v1.StyleAlign"), "the API stays on the API port: {names:?}");
        assert!(matches!(answers[1].message_response, Some(MessageResponse::FileDescriptorResponse(_))), "{:?}", answers[1]);
        // The documented health check on the admin port.
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: "stylealign.v1.StyleAlign".into() }).await.unwrap();
        assert_eq!(r.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
        server.shutdown().await;
    });
}
