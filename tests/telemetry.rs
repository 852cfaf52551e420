//! OpenTelemetry through the real binary: `stylealign serve --otlp-endpoint` exports its spans to
//! an OTLP/gRPC receiver started inside the test. A Generate call carrying a W3C `traceparent`
//! continues the caller's trace; its span has queue wait, batch, denoising steps, decode and
//! PNG encoding below it.

mod service_common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use service_common::*;
use stylealign::client::{self, Identity};

/// An OTLP trace receiver that keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    /// Serves on an ephemeral port of 127.0.0.1; returns its endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

struct Proc {
    child: Child,
    log: ServerLog,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log.assert_no_panic();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()).and_then(|v| v.value.clone())
}

/// The names of a span's ancestors that were exported, nearest first, and the id it ends at.
fn ancestry<'a>(span: &'a Span, by_id: &HashMap<Vec<u8>, &'a Span>) -> (Vec<&'a str>, Vec<u8>) {
    let mut names = Vec::new();
    let mut parent = span.parent_span_id.clone();
    while let Some(p) = by_id.get(&parent) {
        names.push(p.name.as_str());
        parent = p.parent_span_id.clone();
    }
    (names, parent)
}

#[test]
fn generate_is_traced_under_the_callers_trace() {
    run(Duration::from_secs(180), || async {
        let receiver = Receiver::default();
        let endpoint = receiver.start().await;
        let (child, addrs, log, _stdout) = spawn_server(
            stylealign_command()
                .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"])
                .args(["--max-batch-delay-ms", "0", "--otlp-endpoint", &endpoint])
                .env("OTEL_BSP_SCHEDULE_DELAY", "50")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null()),
        );
        let server = Proc { child, log };

        let mut c = client::connect(&addrs[0].to_string()).await.expect("connect");
        let who = Identity::client("tracer");
        let end = Instant::now() + Duration::from_secs(60);
        let session = loop {
            match c.patch_model(who.request(default_patch(), None)).await {
                Ok(s) => break s.into_inner().session_id,
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => panic!("PatchModel: {s}"),
            }
        };

        let (trace_id, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
        let mut req = who.request(request(&session, &["a red fox", "a blue owl"], 32, 3, 7), None);
        req.metadata_mut().insert("traceparent", format!("00-{trace_id}-{caller_span}-01").parse().unwrap());
        let images = finish(c.generate(req).await.expect("Generate").into_inner()).await.expect("images");
        assert_eq!(images.len(), 2);

        // The batch processor sends every 50 ms: wait for the whole tree.
        let wanted = ["Generate", "queue", "batch", "step", "decode", "encode"];
        let end = Instant::now() + Duration::from_secs(30);
        let spans = loop {
            let spans: Vec<Span> = receiver.spans().into_iter().filter(|s| hex(&s.trace_id) == trace_id).collect();
            if wanted.iter().all(|w| spans.iter().any(|s| s.name == *w)) || Instant::now() > end {
                break spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
        for w in wanted {
            assert!(names.contains(&w), "no `{w}` span in the caller's trace: {names:?}");
        }
        let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
        let generate = spans.iter().find(|s| s.name == "Generate").unwrap();
        let (_, root_parent) = ancestry(generate, &by_id);
        assert_eq!(hex(&root_parent), caller_span, "the trace continues from the caller's span");
        for s in spans.iter().filter(|s| wanted[1..].contains(&s.name.as_str())) {
            let (up, _) = ancestry(s, &by_id);
            assert!(up.contains(&"Generate"), "`{}` is not below Generate: {up:?}", s.name);
            assert!(s.start_time_unix_nano <= s.end_time_unix_nano);
        }
        assert_eq!(names.iter().filter(|n| **n == "step").count(), 3, "one span per denoising step");
        assert_eq!(names.iter().filter(|n| **n == "encode").count(), 2, "one span per PNG");
        let batch = spans.iter().find(|s| s.name == "batch").unwrap();
        assert_eq!(attr(batch, "rows"), Some(Value::IntValue(2)), "{:?}", batch.attributes);
        assert_eq!(attr(batch, "sets"), Some(Value::IntValue(1)), "{:?}", batch.attributes);

        // Without a traceparent a call starts a trace of its own.
        let before: usize = receiver.spans().len();
        let req = who.request(request(&session, &["a green frog"], 32, 2, 8), None);
        finish(c.generate(req).await.expect("Generate").into_inner()).await.expect("images");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = receiver.spans();
            let fresh: Vec<&Span> = spans[before..].iter().filter(|s| s.name == "Generate").collect();
            if let Some(g) = fresh.first() {
                assert_ne!(hex(&g.trace_id), trace_id, "a new trace");
                break;
            }
            assert!(Instant::now() < end, "the second call's span never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(server);
    });
}

/// A collector that is down costs nothing but the lost spans: calls succeed, nothing panics. An
/// endpoint that is not a URL is refused at start.
#[test]
fn an_unreachable_collector_does_not_hurt_and_a_bad_endpoint_is_refused() {
    run(Duration::from_secs(120), || async {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (child, addrs, log, _stdout) = spawn_server(
            stylealign_command()
                .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--no-warmup"])
                .args(["--otlp-endpoint", &format!("http://{closed}")])
                .env("OTEL_BSP_SCHEDULE_DELAY", "20")
                .stdin(Stdio::null()),
        );
        let server = Proc { child, log };
        let mut c = client::connect(&addrs[0].to_string()).await.expect("connect");
        let who = Identity::client("lost-spans");
        let end = Instant::now() + Duration::from_secs(60);
        let session = loop {
            match c.patch_model(who.request(default_patch(), None)).await {
                Ok(s) => break s.into_inner().session_id,
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => panic!("PatchModel: {s}"),
            }
        };
        for seed in 0..3 {
            let req = who.request(request(&session, &["a", "b"], 32, 2, seed), None);
            finish(c.generate(req).await.expect("Generate").into_inner()).await.expect("images without a collector");
        }
        // Several export attempts have failed meanwhile.
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(server);

        let out = Command::new(env!("CARGO_BIN_EXE_stylealign"))
            .args(["serve", "--model", "tiny", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--otlp-endpoint", "not a url"])
            .stdin(Stdio::null())
            .output()
            .expect("run stylealign serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a bad endpoint must stop the server: {err}");
        assert!(err.contains("--otlp-endpoint") && !err.contains("panicked"), "{err}");
    });
}
