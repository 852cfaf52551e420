//! OpenTelemetry traces over OTLP/gRPC, off unless an endpoint is configured
//! (`--otlp-endpoint`, or `OTEL_EXPORTER_OTLP_ENDPOINT`).
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

/// How long shutting down waits for the last spans to leave.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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
        Ok((tracing_opentelemetry::layer().with_tracer(tracer), Telemetry { provider, runtime }))
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
