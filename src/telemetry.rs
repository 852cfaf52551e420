//! The process's log (standard error, text or JSON, filtered by `RUST_LOG`) and its
//! OpenTelemetry traces over OTLP/gRPC, off unless an endpoint is configured (`--otlp-endpoint`).
//!
//! The `tracing` spans of the service become OpenTelemetry spans (`tracing-opentelemetry`) and are
//! sent in batches by the OTLP exporter. A call whose metadata carries a W3C `traceparent` (and
//! `tracestate`) continues the caller's trace ([`continue_trace`]).
//!
//! The SDK's batch processor exports from a thread of its own, while the tonic exporter needs a
//! Tokio reactor: [`OnRuntime`] runs every export on a small runtime owned by [`Telemetry`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;

/// The target of the spans that are exported (the log's own spans are not): the RPC, and a
/// Generate call's queue wait, batch, steps, decode and encode.
/// Numeric fields of these spans are `i64`: the OpenTelemetry layer records unsigned integers
/// as strings.
pub const TARGET: &str = "stylealign::trace";

/// How long shutting down waits for the last spans to leave.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How the log is written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs to standard error at `default_filter` unless `RUST_LOG` says otherwise; with an OTLP
/// endpoint, spans also go to the collector (the returned handle flushes them at exit).
pub fn init(format: LogFormat, default_filter: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Option<Telemetry>> {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (otel, telemetry) = match otlp_endpoint {
        Some(endpoint) => {
            let (layer, telemetry) = Telemetry::otlp(endpoint, "stylealign")?;
            (Some(layer), Some(telemetry))
        }
        None => (None, None),
    };
    // The log's filter (RUST_LOG) is the log's alone: exported spans are chosen by target.
    let _ = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).try_init();
    Ok(telemetry)
}

/// The exporter's side of tracing: keep it alive while the process runs, then [`shutdown`]
/// (Self::shutdown) to send what is still buffered.
pub struct Telemetry {
    provider: SdkTracerProvider,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Starts an OTLP/gRPC exporter to `endpoint` (e.g. `http://otel-collector:4317`) and returns
    /// the `tracing` layer that feeds it, together with the handle that flushes it.
    pub fn otlp<S>(endpoint: &str, service_name: &str) -> anyhow::Result<(impl tracing_subscriber::Layer<S>, Telemetry)>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let runtime = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-export")
                .enable_all()
                .build()
                .context("starting the OTLP export runtime")?,
        );
        let exporter = {
            let _entered = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(Duration::from_secs(10))
                .build()
                .with_context(|| format!("OTLP exporter for {endpoint}"))?
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(OnRuntime { inner: Arc::new(exporter), runtime: runtime.clone() })
            .with_resource(Resource::builder().with_service_name(service_name.to_string()).build())
            .build();
        let tracer = provider.tracer("stylealign");
        let only_ours = tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::INFO);
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_ours);
        Ok((layer, Telemetry { provider, runtime }))
    }

    /// Sends the buffered spans (bounded by a timeout) and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
            eprintln!("stylealign: flushing traces: {e}");
        }
        // The runtime may be the last owner here, inside no other runtime: dropping it is fine.
        drop(self.runtime);
    }
}

/// An exporter whose exports run on a Tokio runtime of their own.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let inner = self.inner.clone();
        match self.runtime.spawn(async move { inner.export(batch).await }).await {
            Ok(r) => r,
            Err(e) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(format!("span export task: {e}"))),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _entered = self.runtime.enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called once while building the provider, before any export shares `inner`.
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// Reads W3C trace context from HTTP headers (gRPC metadata).
struct Headers<'a>(&'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the caller's span when `headers` carry a valid `traceparent`
/// (W3C Trace Context); otherwise `span` stays a root. Without an exporter this does nothing.
pub fn continue_trace(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    let _ = span.set_parent(cx);
}
