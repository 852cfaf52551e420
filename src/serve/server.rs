//! The gRPC server: the `stylealign.v1.StyleAlign` service, `grpc.health.v1`, server reflection
//! (v1 and v1alpha), gRPC-Web for browsers and the playground page on the API port, the admin
//! HTTP listener (`/metrics`, `/healthz`, plaintext gRPC health) and the drain on shutdown.
//!
//! Life cycle ([`Server`]):
//! 1. [`Server::bind`]: listeners up, health NOT_SERVING, every StyleAlign call UNAVAILABLE.
//! 2. [`Server::load`]: models loaded on blocking threads, one warm-up step per model and device,
//!    workers started; health SERVING.
//! 3. [`Server::shutdown`] (SIGTERM): health NOT_SERVING, new calls UNAVAILABLE, queued and
//!    running work finishes up to the drain timeout; then the [`Engine`] cuts it off (stopped
//!    within a step, or inside it: UNAVAILABLE), the listeners close and the workers are joined,
//!    each wait bounded, so the process exits soon after the drain deadline whatever a worker
//!    is doing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::Instrument as _;

use super::admission::{self, Admission, Admitted};
use super::config::{ModelSource, ServeConfig};
use super::convert::{self, FieldError, Limits};
use super::engine::{Engine, JobStream, SubmitError};
use super::errors::{self, Reason};
use super::job::{FailCode, JobEvent, JobSpec, Provenance};
use super::layers::{self, Caller};
use super::metrics::{self as m, Stats};
use super::pb;
use super::pb::style_align_server::{StyleAlign, StyleAlignServer};
use super::queue::BatchPolicy;
use super::session::{SessionError, SessionSecret, SessionStore, random_u64, shown};
use super::validate::{self, ModelFacts};
use super::worker::Models;
use crate::device::{self, DeviceSpec};
use crate::pipeline::{BatchSpec, Family, Pipeline, PipelineError, ReferenceImage, SetSpec};
use crate::sampling::sampler::SamplerKind;
use crate::style_aligned::StyleAligned;

/// The full gRPC name of the service (health checks take it as `service`).
pub const SERVICE_NAME: &str = "stylealign.v1.StyleAlign";

const LOADING: u8 = 0;
const SERVING: u8 = 1;
const DRAINING: u8 = 2;
const STOPPED: u8 = 3;

/// A loaded model as the API describes it.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    pub name: Arc<str>,
    pub family: Family,
    pub native_size: usize,
    pub size_multiple: usize,
    pub source: String,
    /// SHA-256 of the UNet weights file (lower-case hex; see [`crate::model::hash`]).
    pub sha256: Arc<str>,
    /// For validation (any device's copy).
    pub pipeline: Pipeline,
}

/// Shared state of the service.
pub struct State {
    cfg: ServeConfig,
    limits: Limits,
    models: RwLock<BTreeMap<Arc<str>, ModelEntry>>,
    pub sessions: SessionStore,
    /// The queue, the workers and the jobs' stop tokens.
    pub engine: Engine,
    pub stats: Arc<Stats>,
    health: HealthReporter,
    phase: AtomicU8,
    active_streams: AtomicUsize,
    /// The memory budget, set once the models are loaded.
    admission: std::sync::OnceLock<Arc<Admission>>,
}

impl State {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::SeqCst)
    }

    fn check_serving(&self) -> Result<(), Status> {
        match self.phase() {
            SERVING => Ok(()),
            LOADING => Err(errors::error(Reason::WarmingUp, "warming up: models are loading; retry shortly")),
            _ => Err(errors::error(Reason::ShuttingDown, "server is shutting down")),
        }
    }

    /// The common checks of a call on one session: serving, the caller's identity (from the
    /// identity layer), a session id.
    fn session_call<'a, T>(&self, request: &Request<T>, id: &'a str) -> Result<(String, &'a str), Status> {
        self.check_serving()?;
        let owner = Caller::of(request)?.id;
        if id.is_empty() {
            return Err(FieldError::new("session_id", "required").status());
        }
        Ok((owner, id))
    }

    fn model(&self, name: &str) -> Option<ModelEntry> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    fn model_names(&self) -> Vec<String> {
        self.models.read().unwrap_or_else(|p| p.into_inner()).keys().map(|k| k.to_string()).collect()
    }

    async fn set_health(&self, status: ServingStatus) {
        self.health.set_service_status("", status).await;
        self.health.set_service_status(SERVICE_NAME, status).await;
    }

    fn update_session_gauge(&self) {
        metrics::gauge!(m::SESSIONS).set(self.sessions.len() as f64);
    }

    /// The memory budget (set by [`Server::load`], before SERVING).
    pub fn admission(&self) -> Option<&Arc<Admission>> {
        self.admission.get()
    }

    /// Admits a validated request: its estimated peak against the request limit, its reference
    /// pixels against the pool; the job carries the result.
    fn admit(&self, model: &ModelEntry, v: &validate::ValidRequest, patch: &StyleAligned) -> Result<Admitted, Status> {
        let Some(adm) = self.admission.get() else {
            return Err(errors::error(Reason::WarmingUp, "warming up: models are loading; retry shortly"));
        };
        let cost = model.pipeline.cost_model();
        let shape = admission::shape_of(v, patch);
        let estimate = cost.estimate(&shape);
        let reservation = adm.admit(&estimate)?;
        let max_rows = adm.max_rows(&cost, v.width, v.height, v.steps, self.cfg.max_batch_rows).max(shape.images);
        tracing::debug!(estimate_bytes = estimate.total, reference_bytes = estimate.reference_pixels, max_rows, "admitted");
        Ok(Admitted { reservation, max_rows })
    }

    /// The largest square size a one-image request of this model may ask for.
    fn model_max_size(&self, e: &ModelEntry) -> usize {
        match self.admission.get() {
            Some(a) => a.max_size(&e.pipeline.cost_model(), e.size_multiple, self.limits.max_size, self.limits.default_steps),
            None => self.limits.max_size,
        }
    }

    /// Most rows of a batch at the model's native size.
    fn model_max_rows(&self, e: &ModelEntry) -> usize {
        match self.admission.get() {
            Some(a) => {
                a.max_rows(&e.pipeline.cost_model(), e.native_size, e.native_size, self.limits.default_steps, self.cfg.max_batch_rows)
            }
            None => self.cfg.max_batch_rows,
        }
    }
}

fn invalid_metadata(key: &str, message: &str) -> Status {
    errors::invalid_fields_with(Reason::InvalidMetadata, &[FieldError::new(key, message)])
}

fn count(method: &'static str, code: tonic::Code) {
    metrics::counter!(m::REQUESTS, "method" => method, "code" => code_name(code)).increment(1);
}

/// The canonical gRPC name of a code (`OK`, `INVALID_ARGUMENT`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn counted<T>(method: &'static str, r: Result<T, Status>) -> Result<T, Status> {
    match &r {
        Ok(_) => count(method, tonic::Code::Ok),
        Err(s) => {
            count(method, s.code());
            tracing::debug!(method, code = code_name(s.code()), message = s.message(), "request refused");
        }
    }
    r
}

fn session_status(e: SessionError) -> Status {
    match e {
        SessionError::NotFound(_) => errors::error(Reason::SessionNotFound, e.to_string()),
        SessionError::GlobalCap(_) => errors::error(Reason::SessionLimit, e.to_string()),
    }
}

/// Parses a `grpc-timeout` value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `stylealign.v1.StyleAlign` implementation.
#[derive(Clone)]
pub struct Service {
    pub(crate) state: Arc<State>,
}

type GenerateStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl StyleAlign for Service {
    async fn patch_model(&self, request: Request<pb::PatchModelRequest>) -> Result<Response<pb::Session>, Status> {
        counted("PatchModel", self.patch_model_inner(request))
    }

    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let r = self.generate_inner(request).await;
        // Successful streams are counted when they end (with their final code).
        if let Err(s) = &r {
            count("Generate", s.code());
            tracing::info!(code = code_name(s.code()), message = s.message(), "generate refused");
        }
        r
    }

    async fn get_session(&self, request: Request<pb::GetSessionRequest>) -> Result<Response<pb::Session>, Status> {
        counted(
            "GetSession",
            (|| {
                let st = &self.state;
                let (owner, id) = st.session_call(&request, &request.get_ref().session_id)?;
                let s = st.sessions.get(&owner, id).map_err(session_status)?;
                Ok(Response::new(convert::session_to_proto(&s, s.idle_ttl)))
            })(),
        )
    }

    async fn release_session(&self, request: Request<pb::ReleaseSessionRequest>) -> Result<Response<pb::ReleaseSessionResponse>, Status> {
        counted(
            "ReleaseSession",
            (|| {
                let st = &self.state;
                let (owner, id) = st.session_call(&request, &request.get_ref().session_id)?;
                st.sessions.release(&owner, id).map_err(session_status)?;
                st.update_session_gauge();
                tracing::info!(client = %owner, session = %shown(id), "session released");
                Ok(Response::new(pb::ReleaseSessionResponse {}))
            })(),
        )
    }

    async fn list_models(&self, request: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        counted(
            "ListModels",
            (|| {
                let st = &self.state;
                st.check_serving()?;
                Caller::of(&request)?;
                let admission = st.admission.get();
                let models = st
                    .models
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(|e| pb::ModelInfo {
                        name: e.name.to_string(),
                        family: match e.family {
                            Family::Sd1 => pb::Family::Sd1,
                            Family::Sd2 => pb::Family::Sd2,
                            Family::Sdxl => pb::Family::Sdxl,
                        } as i32,
                        hash: crate::model::hash::short_hash(&e.sha256).to_string(),
                        native_width: e.native_size as u32,
                        native_height: e.native_size as u32,
                        size_multiple: e.size_multiple as u32,
                        source: e.source.clone(),
                        max_size: st.model_max_size(e) as u32,
                        max_batch_rows: st.model_max_rows(e) as u32,
                    })
                    .collect();
                let l = &st.limits;
                Ok(Response::new(pb::ListModelsResponse {
                    models,
                    samplers: SamplerKind::ALL.iter().map(|s| s.as_str().to_string()).collect(),
                    max_prompts: l.max_prompts as u32,
                    max_steps: l.max_steps as u32,
                    max_size: l.max_size as u32,
                    default_steps: l.default_steps as u32,
                    default_guidance_scale: l.default_guidance,
                    memory_budget_bytes: admission.map_or(0, |a| a.budget()),
                }))
            })(),
        )
    }
}

impl Service {
    fn patch_model_inner(&self, request: Request<pb::PatchModelRequest>) -> Result<Response<pb::Session>, Status> {
        let st = &self.state;
        st.check_serving()?;
        let owner = Caller::of(&request)?.id;
        let req = request.into_inner();
        if req.model.is_empty() {
            return Err(FieldError::new("model", format!("required; loaded models: {}", st.model_names().join(", "))).status());
        }
        let Some(model) = st.model(&req.model) else {
            let e = FieldError::new(
                "model",
                format!("unknown model {:?}; loaded models: {}", convert::bounded(&req.model), st.model_names().join(", ")),
            );
            return Err(errors::invalid_fields_with(Reason::UnknownModel, &[e]));
        };
        let patch = validate::patch(&req).map_err(|e| errors::invalid_fields(&e))?;
        let s = st.sessions.create(&owner, &model.name, patch).map_err(session_status)?;
        st.update_session_gauge();
        tracing::info!(client = %owner, session = %s.short_id(), model = %s.model, options = ?s.patch, "session created");
        Ok(Response::new(convert::session_to_proto(&s, s.idle_ttl)))
    }

    async fn generate_inner(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let arrived = Instant::now();
        let st = &self.state;
        st.check_serving()?;
        let owner = Caller::of(&request)?.id;
        let timeout = match request.metadata().get("grpc-timeout") {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(parse_grpc_timeout)
                    .ok_or_else(|| invalid_metadata("grpc-timeout", "not a timeout (1 to 8 digits and a unit: H, M, S, m, u, n)"))?,
            ),
            None => None,
        };
        let deadline = timeout.map(|t| arrived + t);
        let req = request.into_inner();
        if req.session_id.is_empty() {
            return Err(FieldError::new("session_id", "required (from PatchModel)").status());
        }
        let session = st.sessions.get(&owner, &req.session_id).map_err(session_status)?;
        let model = st
            .model(&session.model)
            .ok_or_else(|| errors::error(Reason::ModelNotLoaded, format!("the session's model {:?} is no longer loaded", session.model)))?;
        let facts = ModelFacts { native_size: model.native_size, size_multiple: model.size_multiple, sdxl: model.family == Family::Sdxl };
        let mut v = validate::generate(req, &facts, &st.limits, random_u64).map_err(|e| errors::invalid_fields(&e))?;
        // Admission before the reference image is decoded: its pixels are reserved first.
        let mut admitted = st.admit(&model, &v, &session.patch)?;
        let reference = match v.reference.take() {
            Some(r) => {
                let r = validate::decode_reference(r, (v.width, v.height)).await.map_err(|e| e.status())?;
                admitted.reservation.shrink_to(r.image.rgb.len() as u64);
                Some(r)
            }
            None => None,
        };
        let batch = BatchSpec {
            width: v.width,
            height: v.height,
            steps: v.steps,
            guidance: v.guidance,
            sampler: v.sampler,
            patch: Some(session.patch),
            size_conditioning: v.size_conditioning,
        };
        let reference_sha256 = reference.as_ref().map(|r| r.sha256.clone());
        let reference = reference.map(|r| ReferenceImage {
            image: r.image,
            caption: r.caption,
            offset: r.offset,
            guidance: r.guidance,
            scope: session.id.to_string(),
        });
        let set = SetSpec { prompts: v.prompts, negative_prompt: v.negative_prompt, seed: v.seed, reference };
        validate::with_model(&model.pipeline, &batch, &set).map_err(|e| errors::invalid_fields(&e))?;

        let id = st.engine.next_id();
        let span = tracing::info_span!(target: crate::telemetry::TARGET, "Generate", job = id as i64, rows = set.prompts.len() as i64, steps = v.steps as i64, code = tracing::field::Empty);
        let rows = set.prompts.len();
        let spec = JobSpec {
            id,
            priority: v.priority,
            model: model.name.clone(),
            provenance: Provenance { model: model.name.clone(), family: model.family.as_str(), model_sha256: model.sha256.clone() },
            batch,
            set,
            reference_sha256,
            deadline,
            span: span.clone(),
            admitted,
        };
        let job = st.engine.submit(spec).map_err(|e| match e {
            SubmitError::Full { capacity } => errors::error_with(
                Reason::QueueFull,
                format!("admission queue full ({capacity} requests waiting); retry later"),
                &[("queue_capacity", capacity.to_string())],
            ),
            SubmitError::Closed => errors::error(Reason::ShuttingDown, "server is shutting down"),
            SubmitError::DeadlineExceeded => errors::error(Reason::Deadline, "deadline exceeded before the request was queued"),
        })?;
        tracing::info!(job = id, client = %owner, session = %session.short_id(), rows, steps = v.steps, priority = v.priority.as_str(), timeout_ms = timeout.map(|t| t.as_millis() as u64), "generate queued");
        let (out_tx, out_rx) = mpsc::channel(16);
        st.active_streams.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(forward(self.state.clone(), job, out_tx, arrived).instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// Translates a job's events into its response stream. The client leaving (or the stream's
/// end) drops the [`JobStream`], which cancels the job.
async fn forward(st: Arc<State>, mut job: JobStream, out: mpsc::Sender<Result<pb::GenerateResponse, Status>>, arrived: Instant) {
    use pb::generate_response::Event;
    let id = job.id();
    let code = loop {
        let event = tokio::select! {
            biased;
            e = job.next() => e,
            _ = out.closed() => break tonic::Code::Cancelled,
        };
        let msg = match event {
            Some(JobEvent::Queued { position, depth }) => {
                Ok(Event::Queued(pb::Queued { position: position as u32, queue_depth: depth as u32 }))
            }
            Some(JobEvent::Started { batch_rows, batch_sets, queue_time }) => Ok(Event::Started(pb::Started {
                batch_rows: batch_rows as u32,
                batch_sets: batch_sets as u32,
                queue_seconds: queue_time.as_secs_f64(),
            })),
            Some(JobEvent::Progress { step, total }) => Ok(Event::Progress(pb::Progress { step: step as u32, total_steps: total as u32 })),
            Some(JobEvent::Image(img)) => Ok(Event::Image(pb::GeneratedImage {
                index: img.index as u32,
                prompt: img.prompt,
                width: img.width as u32,
                height: img.height as u32,
                seed: img.seed,
                png: img.png,
                parameters: img.parameters,
            })),
            Some(JobEvent::Done) => break tonic::Code::Ok,
            Some(JobEvent::Failed { code, message }) => Err(match code {
                FailCode::InvalidArgument => errors::error(Reason::InvalidField, message),
                FailCode::DeadlineExceeded => errors::error(Reason::Deadline, message),
                FailCode::Cancelled => errors::error(Reason::Cancelled, message),
                FailCode::Unavailable => errors::error(Reason::ShuttingDown, message),
                FailCode::Internal => errors::error(Reason::Internal, message),
            }),
            None => Err(errors::error(Reason::Internal, "the job ended without a result")),
        };
        match msg {
            Ok(event) => {
                if out.send(Ok(pb::GenerateResponse { event: Some(event) })).await.is_err() {
                    break tonic::Code::Cancelled;
                }
            }
            Err(status) => {
                let code = status.code();
                let _ = out.send(Err(status)).await;
                break code;
            }
        }
    };
    // A job that has not ended (client gone) is cancelled here.
    drop(job);
    let job = id;
    count("Generate", code);
    tracing::Span::current().record("code", code_name(code));
    if code == tonic::Code::Ok {
        metrics::histogram!(m::GENERATE_TIME).record(arrived.elapsed().as_secs_f64());
    }
    tracing::info!(job, code = code_name(code), elapsed_ms = arrived.elapsed().as_millis() as u64, "generate finished");
    st.active_streams.fetch_sub(1, Ordering::SeqCst);
}

/// A running server (see the module docs for its life cycle).
pub struct Server {
    state: Arc<State>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

impl Server {
    /// Binds the listeners and starts serving: health NOT_SERVING until [`load`](Self::load).
    pub async fn bind(cfg: ServeConfig) -> anyhow::Result<Self> {
        cfg.check().map_err(anyhow::Error::msg)?;
        let metrics = m::install();
        let (health, health_svc) = tonic_health::server::health_reporter();
        let session_secret = match &cfg.session_secret {
            Some(s) => {
                tracing::info!(fingerprint = %s.fingerprint(), max_lifetime_s = cfg.max_session_lifetime.as_secs(), "session tokens signed with the configured secret (replicas sharing it accept each other's sessions)");
                s.clone()
            }
            None => {
                let s = SessionSecret::random();
                tracing::warn!(
                    fingerprint = %s.fingerprint(),
                    "no session secret configured (--session-secret-file / STYLEALIGN_SESSION_SECRET): generated a random one; session ids do not survive a restart and other replicas refuse them"
                );
                s
            }
        };
        let stats = Arc::new(Stats::default());
        let state = Arc::new(State {
            limits: cfg.limits.clone(),
            models: RwLock::new(BTreeMap::new()),
            sessions: SessionStore::with_secret(
                cfg.session_ttl,
                cfg.max_sessions_per_client,
                cfg.max_sessions,
                session_secret,
                cfg.max_session_lifetime,
            ),
            engine: Engine::new(
                cfg.max_queue,
                BatchPolicy { batching: cfg.batching, max_rows: cfg.max_batch_rows, max_delay: cfg.max_batch_delay },
                stats.clone(),
            ),
            stats,
            health,
            phase: AtomicU8::new(LOADING),
            active_streams: AtomicUsize::new(0),
            admission: std::sync::OnceLock::new(),
            cfg,
        });
        state.set_health(ServingStatus::NotServing).await;

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("reflection v1alpha")?;

        let listener = tokio::net::TcpListener::bind(state.cfg.listen)
            .await
            .with_context(|| format!("binding the gRPC listener {}", state.cfg.listen))?;
        let addr = listener.local_addr()?;
        let tls = match &state.cfg.tls {
            Some(files) => Some(Arc::new(super::tls::TlsReloader::new(files.clone())?)),
            None => None,
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let signal = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let mut tasks = Vec::new();
        let svc = Service { state: state.clone() };
        let t = state.cfg.transport.clone();
        // One router on the API port: the gRPC services (HTTP/2 gRPC, and gRPC-Web over HTTP/1.1
        // or HTTP/2 for browsers) merged with plain HTTP routes (JSON, the playground). The
        // gRPC-Web layer wraps the gRPC services only: it refuses every plain HTTP/1.1 request.
        let grpc_services = tonic::service::Routes::new(StyleAlignServer::new(svc.clone()).max_decoding_message_size(t.max_message_bytes))
            .add_service(health_svc)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .into_axum_router()
            .reset_fallback()
            .layer(tonic_web::GrpcWebLayer::new());
        let mut api = grpc_services.merge(super::http::router(svc, super::http::max_body_bytes(t.max_message_bytes)));
        if state.cfg.playground {
            api = api.merge(super::playground::router());
        }
        // The middleware (src/serve/layers.rs), outermost last.
        let limits = layers::UnaryLimits::new(t.max_concurrent_unary, t.unary_timeout, t.max_message_bytes);
        let auth = state.cfg.auth.clone().map(Arc::new);
        let api = api
            .fallback(api_fallback)
            .layer(axum::middleware::from_fn_with_state(limits, layers::limit_unary))
            .layer(axum::middleware::from_fn_with_state(auth, layers::identify))
            .layer(axum::middleware::from_fn(layers::track))
            .layer(axum::middleware::from_fn(layers::trace));
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(t.http2_keepalive_interval)
            .http2_keepalive_timeout(Some(t.http2_keepalive_timeout))
            .max_concurrent_streams(t.max_concurrent_streams)
            .accept_http1(true)
            .add_routes(tonic::service::Routes::from(api))
            .serve_with_incoming_shutdown(
                super::conn::incoming(listener, tls, t.idle_timeout, shutdown_rx.clone()),
                signal(shutdown_rx.clone()),
            );
        tasks.push(tokio::spawn(async move {
            if let Err(e) = grpc.await {
                tracing::error!(error = %e, "gRPC server failed");
            }
        }));

        let admin_addr = match state.cfg.admin_listen {
            Some(a) => {
                let listener = tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding the admin listener {a}"))?;
                let admin_addr = listener.local_addr()?;
                let health_svc = tonic_health::pb::health_server::HealthServer::new(
                    tonic_health::server::HealthService::from_health_reporter(state.health.clone()),
                );
                let handle = metrics.clone();
                let st = state.clone();
                // Reflection lists the health service (`grpcurl … list`, `describe`).
                let admin_reflection = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1()
                    .context("admin reflection v1")?;
                let admin_reflection_v1alpha = tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                    .build_v1alpha()
                    .context("admin reflection v1alpha")?;
                let router = tonic::service::Routes::new(health_svc)
                    .add_service(admin_reflection)
                    .add_service(admin_reflection_v1alpha)
                    .into_axum_router()
                    .route(
                        "/metrics",
                        axum::routing::get(move || {
                            m::update_process_memory();
                            std::future::ready(handle.render())
                        }),
                    )
                    .route(
                        "/healthz",
                        axum::routing::get(move || {
                            let phase = st.phase();
                            std::future::ready(match phase {
                                SERVING => (axum::http::StatusCode::OK, "SERVING\n"),
                                _ => (axum::http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n"),
                            })
                        }),
                    );
                let admin = tonic::transport::Server::builder()
                    .trace_fn(|req| tracing::debug_span!("admin", path = %req.uri().path()))
                    .accept_http1(true)
                    .add_routes(tonic::service::Routes::from(router))
                    .serve_with_incoming_shutdown(incoming(listener), signal(shutdown_rx.clone()));
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = admin.await {
                        tracing::error!(error = %e, "admin server failed");
                    }
                }));
                Some(admin_addr)
            }
            None => None,
        };

        // Upkeep: histograms, the session sweep, gauges.
        let st = state.clone();
        let handle = metrics.clone();
        let mut rx = shutdown_rx.clone();
        let sweep_every = (st.cfg.session_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(sweep_every.min(Duration::from_secs(5)));
            let mut last_sweep = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.wait_for(|v| *v) => break,
                }
                handle.run_upkeep();
                if last_sweep.elapsed() >= sweep_every {
                    last_sweep = Instant::now();
                    let n = st.sessions.sweep();
                    if n > 0 {
                        tracing::info!(expired = n, "sessions expired");
                    }
                }
                st.update_session_gauge();
                metrics::gauge!(m::QUEUE_DEPTH).set(st.engine.depth() as f64);
            }
        }));
        let scheme = if state.cfg.tls.is_some() { "https" } else { "http" };
        let playground = if state.cfg.playground { format!("{scheme}://{addr}/") } else { "off".into() };
        let tls = match &state.cfg.tls {
            Some(f) if f.client_ca.is_some() => "mTLS",
            Some(_) => "TLS",
            None => "off",
        };
        tracing::info!(%addr, admin = ?admin_addr, %playground, tls, "listening (NOT_SERVING until the models are loaded and warm)");
        Ok(Self { state, addr, admin_addr, shutdown, tasks: Mutex::new(tasks), metrics })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.state.stats
    }

    /// The serving core: queue, workers, stop tokens.
    pub fn engine(&self) -> &Engine {
        &self.state.engine
    }

    /// The Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        self.metrics.render()
    }

    pub fn is_serving(&self) -> bool {
        self.state.phase() == SERVING
    }

    /// Loads the models on every device, runs one warm-up step of each, starts the workers and
    /// reports SERVING.
    pub async fn load(&self) -> anyhow::Result<()> {
        let st = self.state.clone();
        let cfg = st.cfg.clone();
        let loaded: Vec<(DeviceSpec, Models, Vec<ModelEntry>)> =
            tokio::task::spawn_blocking(move || load_all(&cfg)).await.context("model loading panicked")??;
        {
            let mut models = st.models.write().unwrap_or_else(|p| p.into_inner());
            for e in &loaded[0].2 {
                models.insert(e.name.clone(), e.clone());
            }
        }
        // The memory budget, now that the models are resident (a CPU's workers share it).
        let workers = if st.cfg.devices.contains(&DeviceSpec::Cpu) { st.cfg.cpu_workers } else { 1 };
        let adm = st.admission.get_or_init(|| Arc::new(Admission::configure(st.cfg.memory_budget, workers)));
        tracing::info!(
            budget_bytes = adm.budget(),
            request_limit_bytes = adm.request_limit(),
            reference_pool_bytes = adm.reference_pool(),
            source = adm.source(),
            "memory budget"
        );
        for (spec, models, _) in loaded {
            let n = if spec == DeviceSpec::Cpu { st.cfg.cpu_workers } else { 1 };
            for i in 0..n {
                st.engine.start_worker(format!("worker-{spec}-{i}"), models.clone()).context("spawning a worker thread")?;
            }
        }
        if st.phase.compare_exchange(LOADING, SERVING, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            st.set_health(ServingStatus::Serving).await;
            tracing::info!(models = ?st.model_names(), "SERVING");
        }
        Ok(())
    }

    /// Starts draining: health NOT_SERVING, new calls UNAVAILABLE, the queue refuses new work.
    pub async fn begin_drain(&self) {
        let st = &self.state;
        if st.phase.swap(DRAINING, Ordering::SeqCst) >= DRAINING {
            return;
        }
        st.set_health(ServingStatus::NotServing).await;
        st.engine.close();
        tracing::info!(
            queued = st.engine.depth(),
            running = st.engine.running(),
            timeout_s = st.cfg.drain_timeout.as_secs_f64(),
            "draining"
        );
    }

    /// Drains (see [`begin_drain`](Self::begin_drain)), waits for queued and running work up to
    /// the drain timeout, then cuts it off, and closes the listeners. Every wait after the drain
    /// deadline is bounded: it returns within [`SHUTDOWN_SLACK`] of it, whatever a worker does.
    pub async fn shutdown(&self) {
        self.begin_drain().await;
        let st = self.state.clone();
        let drain_end = Instant::now() + st.cfg.drain_timeout;
        let hard_end = drain_end + SHUTDOWN_SLACK;
        // The slack is shared out: cut-off work stopping, streams' last messages, listeners, workers.
        let part = |share: u32| (Instant::now() + SHUTDOWN_SLACK * share / 8).min(hard_end);
        if !st.engine.drain(drain_end).await {
            let stopped = st.engine.cut_off();
            tracing::warn!(
                stopped,
                queued = st.engine.depth(),
                running = st.engine.running(),
                "drain timeout: cutting off the remaining work"
            );
            if !st.engine.drain(part(3)).await {
                let n = st.engine.abandon();
                tracing::warn!(jobs = n, "work still running after the cut-off (a step that cannot be interrupted): answered UNAVAILABLE");
            }
        }
        // Let the streams deliver their last messages.
        wait_until(part(2), || st.active_streams.load(Ordering::SeqCst) == 0).await;
        st.phase.store(STOPPED, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let tasks_end = part(2);
        for t in tasks {
            // Long-lived calls (health Watch) would hold a graceful shutdown forever.
            let abort = t.abort_handle();
            if tokio::time::timeout_at(tasks_end.into(), t).await.is_err() {
                abort.abort();
            }
        }
        let engine = st.engine.clone();
        let left = hard_end.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        let joined = tokio::task::spawn_blocking(move || engine.join_workers(left)).await.unwrap_or(false);
        if !joined {
            tracing::warn!("a worker is still inside an operation that cannot be interrupted: exiting without it");
        }
        tracing::info!("stopped");
    }
}

/// How long [`Server::shutdown`] may take after the drain deadline.
pub const SHUTDOWN_SLACK: Duration = Duration::from_secs(5);

/// Unknown paths on the API port: UNIMPLEMENTED for gRPC and gRPC-Web calls (in the caller's
/// content type), 404 for plain HTTP.
async fn api_fallback(req: axum::extract::Request) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode, header};
    use axum::response::IntoResponse as _;
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/grpc") {
        return (StatusCode::NOT_FOUND, "not found\n").into_response();
    }
    let path = convert::bounded(req.uri().path()).into_owned();
    let mut res = errors::error(Reason::UnknownMethod, format!("unknown method {path}")).into_http::<axum::body::Body>();
    if content_type.starts_with("application/grpc-web")
        && let Ok(v) = HeaderValue::from_str(content_type)
    {
        res.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    res
}

/// Accepted connections with TCP_NODELAY: without it, a response whose message exceeds h2's
/// 256-byte copy threshold (a `Session` with its token) goes out in two writes, and Nagle's
/// algorithm holds the second until the client's delayed ACK (~40 ms per call).
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn wait_until(end: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SHA-256 of a model's UNet weights file (see [`crate::model::hash`]).
fn model_sha256(src: &ModelSource, dev: &burn::tensor::Device) -> anyhow::Result<Arc<str>> {
    let t = Instant::now();
    let h = match src {
        ModelSource::Tiny => crate::pipeline::tiny::unet_sha256(dev).context("hashing the embedded model")?,
        ModelSource::Dir(d) => crate::model::hash::diffusers_unet_sha256(d).with_context(|| format!("hashing model {}", d.display()))?,
    };
    tracing::info!(model = ?src, sha256 = %h, elapsed_ms = t.elapsed().as_millis() as u64, "model hashed");
    Ok(Arc::from(h))
}

/// Loads every model on every device and warms each up with one step.
fn load_all(cfg: &ServeConfig) -> anyhow::Result<Vec<(DeviceSpec, Models, Vec<ModelEntry>)>> {
    let mut out = Vec::new();
    // Model hashes, computed once per model (not per device).
    let mut hashes: Vec<Option<Arc<str>>> = vec![None; cfg.models.len()];
    for spec in &cfg.devices {
        let dev = device::open(spec).with_context(|| format!("opening device {spec}"))?;
        let mut models = Models::new();
        let mut entries = Vec::new();
        for (src, hash) in cfg.models.iter().zip(hashes.iter_mut()) {
            let t = Instant::now();
            let p = match src {
                ModelSource::Tiny => crate::pipeline::tiny::tiny_pipeline(&dev),
                ModelSource::Dir(d) => Pipeline::load(d, &dev),
            }
            .with_context(|| format!("loading model {src:?} on {spec}"))?;
            let sha256 = match hash {
                Some(h) => h.clone(),
                None => hash.insert(model_sha256(src, &dev)?).clone(),
            };
            let name: Arc<str> = Arc::from(p.name());
            if models.contains_key(&name) {
                anyhow::bail!("two models are named {name:?}; serve folders with distinct names");
            }
            tracing::info!(model = %name, family = p.family().as_str(), device = %spec, elapsed_ms = t.elapsed().as_millis() as u64, "model loaded");
            if cfg.warmup {
                let t = Instant::now();
                warm_up(&p).with_context(|| format!("warming up {name} on {spec}"))?;
                tracing::info!(model = %name, device = %spec, elapsed_ms = t.elapsed().as_millis() as u64, "warm-up step done");
            }
            let source = match src {
                ModelSource::Tiny => "<embedded>".to_string(),
                ModelSource::Dir(d) => d.display().to_string(),
            };
            entries.push(ModelEntry {
                name: name.clone(),
                family: p.family(),
                native_size: p.native_size(),
                size_multiple: p.size_multiple(),
                source,
                sha256,
                pipeline: p.clone(),
            });
            models.insert(name, p);
        }
        out.push((spec.clone(), models, entries));
    }
    Ok(out)
}

/// One denoising step of a two-image patched set at the smallest size.
fn warm_up(p: &Pipeline) -> Result<(), PipelineError> {
    let s = p.size_multiple();
    let batch = BatchSpec {
        width: s,
        height: s,
        steps: 1,
        guidance: 5.0,
        sampler: SamplerKind::Ddim,
        patch: Some(StyleAligned::default()),
        size_conditioning: None,
    };
    let set = SetSpec { prompts: vec!["warm-up".into(), "warm-up".into()], negative_prompt: String::new(), seed: 0, reference: None };
    p.generate(&batch, &[set], &mut |_, _| vec![true]).map(|_| ())
}

/// Runs the server until SIGTERM / SIGINT, then drains and returns (exit 0).
pub async fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let server = Server::bind(cfg).await?;
    println!(
        "stylealign: gRPC on {}{}",
        server.addr(),
        server.admin_addr().map(|a| format!(", admin (metrics, health) on {a}")).unwrap_or_default()
    );
    let signal = shutdown_signal();
    tokio::pin!(signal);
    tokio::select! {
        r = server.load() => r?,
        _ = &mut signal => {
            tracing::info!("signal during loading: stopping");
            server.shutdown().await;
            return Ok(());
        }
    }
    signal.await;
    server.shutdown().await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parses() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
